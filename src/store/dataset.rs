//! Reading a dataset: the manifest, the atom table, and memory-mapped trajectories.

use super::{Manifest, FORMAT_VERSION, HEADER_BYTES, MAGIC};
use crate::traj::UnitCell;
use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use std::path::{Path, PathBuf};

/// One row of the atom table.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredAtom {
    /// Index of the atom in the topology file.
    pub source_index: usize,
    /// Atom name.
    pub name: String,
    /// Residue name.
    pub resname: String,
    /// Residue number in the file.
    pub resid: i32,
    /// 0-based residue index among the selected atoms.
    pub residue: u32,
    /// Chain (or segment) identifier.
    pub chain: String,
    /// Element symbol.
    pub element: String,
    /// Atomic number.
    pub atomic_number: u8,
    /// Mass in daltons.
    pub mass: f32,
    /// 0-based token this atom is merged into (its residue, unless a custom map was given).
    pub token: u32,
}

/// The header fields of a trajectory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub natoms: u64,
    pub nframes: u64,
    pub has_box: bool,
    pub has_time: bool,
    pub complete: bool,
}

impl Header {
    pub(crate) fn boxes_offset(&self) -> u64 {
        HEADER_BYTES + self.nframes * self.natoms * 12
    }
    pub(crate) fn times_offset(&self) -> u64 {
        self.boxes_offset() + if self.has_box { self.nframes * 36 } else { 0 }
    }
    pub(crate) fn file_len(&self) -> u64 {
        self.times_offset() + if self.has_time { self.nframes * 8 } else { 0 }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_BYTES as usize];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        let flags = self.has_box as u32 | (self.has_time as u32) << 1 | (self.complete as u32) << 2;
        h[12..16].copy_from_slice(&flags.to_le_bytes());
        h[16..24].copy_from_slice(&self.natoms.to_le_bytes());
        h[24..32].copy_from_slice(&self.nframes.to_le_bytes());
        h
    }

    pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        ensure!(
            bytes.len() >= 32,
            "{}: too short for a hiermd trajectory header",
            path.display()
        );
        ensure!(
            bytes[0..8] == MAGIC,
            "{}: not a hiermd trajectory file (bad magic)",
            path.display()
        );
        let u32at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let u64at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        let version = u32at(8);
        ensure!(
            version == FORMAT_VERSION,
            "{}: store format version {version}, this hiermd reads version {FORMAT_VERSION}",
            path.display()
        );
        let flags = u32at(12);
        Ok(Self {
            natoms: u64at(16),
            nframes: u64at(24),
            has_box: flags & 1 != 0,
            has_time: flags & 2 != 0,
            complete: flags & 4 != 0,
        })
    }
}

/// A memory-mapped trajectory of a dataset.
pub struct StoredTrajectory {
    path: PathBuf,
    map: Mmap,
    header: Header,
}

impl StoredTrajectory {
    /// Maps a store file and checks its header against its size.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: store files are written once by import and never modified afterwards; a
        // concurrent writer would be a user error outside what we can guard against.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("{}: cannot map", path.display()))?;
        let header = Header::decode(&map, path)?;
        ensure!(
            header.complete,
            "{}: incomplete trajectory file (import was interrupted)",
            path.display()
        );
        ensure!(
            map.len() as u64 == header.file_len(),
            "{}: file is {} bytes but its header describes {} ({} frames of {} atoms): truncated or corrupt",
            path.display(),
            map.len(),
            header.file_len(),
            header.nframes,
            header.natoms
        );
        #[cfg(unix)]
        {
            // Training reads frames in shuffled order.
            let _ = map.advise(memmap2::Advice::Random);
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            header,
        })
    }

    /// Frames.
    pub fn frames(&self) -> usize {
        self.header.nframes as usize
    }

    /// Atoms per frame.
    pub fn atoms(&self) -> usize {
        self.header.natoms as usize
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All coordinates, `[frames][atoms][3]` flattened, in Angstrom.
    pub fn coords(&self) -> &[f32] {
        let end = self.header.boxes_offset() as usize;
        bytemuck::cast_slice(&self.map[HEADER_BYTES as usize..end])
    }

    /// Coordinates of frame `i` (`atoms * 3` values); panics if `i` is out of range.
    pub fn frame(&self, i: usize) -> &[f32] {
        let n = self.atoms() * 3;
        &self.coords()[i * n..(i + 1) * n]
    }

    /// Unit cell of frame `i`, if the trajectory has boxes.
    pub fn unit_cell(&self, i: usize) -> Option<UnitCell> {
        if !self.header.has_box {
            return None;
        }
        let off = self.header.boxes_offset() as usize + i * 36;
        let v: &[f32] = bytemuck::cast_slice(&self.map[off..off + 36]);
        Some(UnitCell {
            vectors: [[v[0], v[1], v[2]], [v[3], v[4], v[5]], [v[6], v[7], v[8]]],
        })
    }

    /// Time of frame `i` in ps, if the trajectory has times.
    pub fn time_ps(&self, i: usize) -> Option<f64> {
        if !self.header.has_time {
            return None;
        }
        let off = self.header.times_offset() as usize + i * 8;
        Some(f64::from_le_bytes(
            self.map[off..off + 8].try_into().unwrap(),
        ))
    }
}

/// An imported dataset.
pub struct Dataset {
    dir: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
    /// The atom table.
    pub atoms: Vec<StoredAtom>,
    /// The trajectories, in manifest order.
    pub trajectories: Vec<StoredTrajectory>,
}

impl Dataset {
    /// Opens a dataset folder and checks it is whole: manifest, atom table and every trajectory
    /// agree on atom and frame counts.
    pub fn open(dir: &Path) -> Result<Self> {
        let mpath = dir.join("manifest.toml");
        let text = std::fs::read_to_string(&mpath).with_context(|| {
            format!(
                "{}: not a hiermd dataset (no readable manifest.toml)",
                dir.display()
            )
        })?;
        let manifest: Manifest = toml::from_str(&text)
            .with_context(|| format!("{}: invalid manifest", mpath.display()))?;
        ensure!(
            manifest.format == "hiermd-dataset",
            "{}: format is {:?}, not hiermd-dataset",
            mpath.display(),
            manifest.format
        );
        ensure!(
            manifest.version == FORMAT_VERSION,
            "{}: dataset version {}, this hiermd reads version {FORMAT_VERSION}",
            mpath.display(),
            manifest.version
        );
        let atoms = read_atom_table(&dir.join(&manifest.atom_table))?;
        ensure!(
            atoms.len() == manifest.atoms,
            "{}: atom table has {} rows, manifest says {}",
            dir.display(),
            atoms.len(),
            manifest.atoms
        );
        let mut trajectories = Vec::with_capacity(manifest.trajectories.len());
        for t in &manifest.trajectories {
            let st = StoredTrajectory::open(&dir.join(&t.file))?;
            ensure!(
                st.atoms() == manifest.atoms && st.frames() == t.frames,
                "{}: holds {} frames of {} atoms, manifest says {} of {}",
                st.path().display(),
                st.frames(),
                st.atoms(),
                t.frames,
                manifest.atoms
            );
            trajectories.push(st);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            atoms,
            trajectories,
        })
    }

    /// The dataset folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Atoms per frame.
    pub fn natoms(&self) -> usize {
        self.manifest.atoms
    }

    /// Token index of every atom (for atom-to-token merging).
    pub fn token_map(&self) -> Vec<u32> {
        self.atoms.iter().map(|a| a.token).collect()
    }

    /// Atomic number of every atom.
    pub fn atomic_numbers(&self) -> Vec<u8> {
        self.atoms.iter().map(|a| a.atomic_number).collect()
    }
}

pub(crate) const ATOM_TABLE_HEADER: &str =
    "source_index\tname\tresname\tresid\tresidue\tchain\telement\tatomic_number\tmass\ttoken";

pub(crate) fn write_atom_row(out: &mut String, a: &StoredAtom) {
    use std::fmt::Write;
    // Empty chains are written as "-" so that the columns stay aligned for any TSV reader.
    let chain = if a.chain.is_empty() { "-" } else { &a.chain };
    let _ = writeln!(
        out,
        "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        a.source_index,
        a.name,
        a.resname,
        a.resid,
        a.residue,
        chain,
        a.element,
        a.atomic_number,
        a.mass,
        a.token
    );
}

fn read_atom_table(path: &Path) -> Result<Vec<StoredAtom>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the atom table", path.display()))?;
    let mut lines = text.lines();
    if lines.next() != Some(ATOM_TABLE_HEADER) {
        bail!("{}: unexpected atom table header", path.display());
    }
    lines
        .enumerate()
        .map(|(i, l)| {
            let f: Vec<&str> = l.split('\t').collect();
            let bad = || {
                format!(
                    "{}: line {}: malformed atom row {l:?}",
                    path.display(),
                    i + 2
                )
            };
            ensure!(f.len() == 10, "{}", bad());
            Ok(StoredAtom {
                source_index: f[0].parse().with_context(bad)?,
                name: f[1].to_string(),
                resname: f[2].to_string(),
                resid: f[3].parse().with_context(bad)?,
                residue: f[4].parse().with_context(bad)?,
                chain: if f[5] == "-" {
                    String::new()
                } else {
                    f[5].to_string()
                },
                element: f[6].to_string(),
                atomic_number: f[7].parse().with_context(bad)?,
                mass: f[8].parse().with_context(bad)?,
                token: f[9].parse().with_context(bad)?,
            })
        })
        .collect()
}
