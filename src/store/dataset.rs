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
        // A corrupt header's counts may overflow the size computation: refused, not wrapped.
        let fits = header
            .natoms
            .checked_add(4)
            .and_then(|a| a.checked_mul(header.nframes))
            .and_then(|n| n.checked_mul(12))
            .is_some_and(|n| n < u64::MAX / 2);
        ensure!(
            fits,
            "{}: header claims {} frames of {} atoms: corrupt",
            path.display(),
            header.nframes,
            header.natoms
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

    /// The whole mapped file, header included (for `hiermd verify`).
    pub(crate) fn raw(&self) -> &[u8] {
        &self.map
    }

    /// The decoded header (for `hiermd verify`).
    pub(crate) fn header(&self) -> Header {
        self.header
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
    /// Opens a dataset folder and checks it is whole, cheaply (no payload is read): the manifest
    /// (format, version, total frames, every file path confined to the folder), the atom table
    /// (row count, token and residue indices in range) and every trajectory (header against the
    /// file size and against the manifest's atoms, frames, box and time flags). `hiermd verify`
    /// checks the rest (checksums, coordinates).
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = read_manifest(dir)?;
        let table = confined(dir, &manifest.atom_table, "atom_table")?;
        let atoms = read_atom_table(&table)?;
        check_atoms(&manifest, &atoms, &table)?;
        let trajectories = (0..manifest.trajectories.len())
            .map(|i| open_entry(dir, &manifest, i))
            .collect::<Result<Vec<_>>>()?;
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

    // ---- integrity (issue 16): frames checked as they are read ----

    /// Coordinates of frames `frames` of trajectory `traj` (`[frames][atoms][3]` flattened),
    /// after checking that every value is finite and within
    /// [`MAX_ABS_COORDINATE`](super::verify::MAX_ABS_COORDINATE) Angstrom: a corrupt payload
    /// (NaN, 1e30, a flipped exponent bit) is an error naming the file, frame and atom instead of
    /// flowing into features or exported files. One comparison per value, so cheap beside any
    /// use of the frames.
    pub fn checked_frames(&self, traj: usize, frames: std::ops::Range<usize>) -> Result<&[f32]> {
        let t = self.trajectories.get(traj).with_context(|| {
            format!(
                "trajectory {traj}: the dataset has {} (0-based)",
                self.trajectories.len()
            )
        })?;
        ensure!(
            frames.start <= frames.end && frames.end <= t.frames(),
            "{}: frames {}..{} asked for, the trajectory has {}",
            t.path().display(),
            frames.start,
            frames.end,
            t.frames()
        );
        let n = t.atoms() * 3;
        let x = &t.coords()[frames.start * n..frames.end * n];
        if let Some(k) = first_implausible(x) {
            let (frame, atom) = (frames.start + k / n.max(1), (k % n.max(1)) / 3);
            bail!(
                "{}: frame {frame}: atom {atom}{}: coordinate {} is {}: the stored trajectory is \
                 corrupt (`hiermd verify {}` checks the whole dataset)",
                t.path().display(),
                self.atoms
                    .get(atom)
                    .map(|a| format!(" ({} of residue {} {})", a.name, a.resname, a.resid))
                    .unwrap_or_default(),
                x[k],
                if x[k].is_finite() {
                    "beyond 1e6 A"
                } else {
                    "not finite"
                },
                self.dir.display()
            );
        }
        Ok(x)
    }

    /// Coordinates of frame `frame` of trajectory `traj`, checked as by
    /// [`checked_frames`](Self::checked_frames).
    pub fn checked_frame(&self, traj: usize, frame: usize) -> Result<&[f32]> {
        self.checked_frames(traj, frame..frame + 1)
    }
}

/// Index of the first value that is not finite or lies beyond
/// [`MAX_ABS_COORDINATE`](super::verify::MAX_ABS_COORDINATE) in magnitude, if any.
pub(crate) fn first_implausible(x: &[f32]) -> Option<usize> {
    // Blocks are folded without an early exit (so the loop vectorises); only a bad block is
    // searched.
    const BLOCK: usize = 4096;
    for (j, c) in x.chunks(BLOCK).enumerate() {
        if !c.iter().fold(true, |ok, &v| ok & plausible(v)) {
            return c.iter().position(|&v| !plausible(v)).map(|p| j * BLOCK + p);
        }
    }
    None
}

/// Whether a stored coordinate is finite and within
/// [`MAX_ABS_COORDINATE`](super::verify::MAX_ABS_COORDINATE): `|v| <= max` is false for NaN
/// and infinities, so one comparison covers all three.
pub(crate) fn plausible(v: f32) -> bool {
    v.abs() <= super::verify::MAX_ABS_COORDINATE
}

/// Reads and checks `DIR/manifest.toml`: format, version, total frames, and every file path
/// confined to the folder. Errors name the manifest.
pub(crate) fn read_manifest(dir: &Path) -> Result<Manifest> {
    let mpath = dir.join("manifest.toml");
    let text = std::fs::read_to_string(&mpath).with_context(|| {
        format!(
            "{}: not a hiermd dataset (no readable manifest.toml)",
            dir.display()
        )
    })?;
    let manifest: Manifest =
        toml::from_str(&text).with_context(|| format!("{}: invalid manifest", mpath.display()))?;
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
    confined(dir, &manifest.atom_table, "atom_table")?;
    for t in &manifest.trajectories {
        confined(dir, &t.file, "file")?;
    }
    let total = manifest
        .trajectories
        .iter()
        .try_fold(0usize, |a, t| a.checked_add(t.frames));
    ensure!(
        total == Some(manifest.total_frames),
        "{}: total_frames is {}, but the trajectories list {} frames: the manifest was edited or \
         is corrupt",
        mpath.display(),
        manifest.total_frames,
        total.map_or("more than 2^64".to_string(), |t| t.to_string())
    );
    Ok(manifest)
}

/// `dir/rel` for a path written in a manifest (field `field`), refused unless it stays inside
/// `dir`: only plain relative components (no `..`, no root, no drive), so an edited manifest
/// cannot make hiermd read (or a later command overwrite) files outside the folder.
pub(crate) fn confined(dir: &Path, rel: &str, field: &str) -> Result<PathBuf> {
    use std::path::Component;
    let p = Path::new(rel);
    let inside = !rel.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        && p.components().any(|c| matches!(c, Component::Normal(_)));
    ensure!(
        inside,
        "{}: {field} = {rel:?} is not a path inside the folder (only relative paths without \
         `..` are allowed): refused",
        dir.join("manifest.toml").display()
    );
    let path = dir.join(p);
    // A symbolic link inside the folder could still lead out of it (or to a device such as
    // /dev/zero): hiermd writes no links, so where one resolves outside the folder, or to
    // something other than a plain file, it is refused.
    if let (Ok(target), Ok(root)) = (path.canonicalize(), dir.canonicalize()) {
        ensure!(
            target.starts_with(&root),
            "{}: {field} = {rel:?} is a link to {}, outside the folder: refused",
            dir.join("manifest.toml").display(),
            target.display()
        );
        let meta = std::fs::metadata(&target)
            .with_context(|| format!("{}: reading its metadata", target.display()))?;
        ensure!(
            meta.is_file(),
            "{}: {field} = {rel:?} is not a plain file: refused",
            dir.join("manifest.toml").display()
        );
    }
    Ok(path)
}

/// Checks the atom table `atoms` (read from `path`) against the manifest: row count, and every
/// token and residue index within the manifest's counts (a token may also be
/// [`EXCLUDED`](crate::ops::scatter::EXCLUDED), an atom no token takes). Errors name the line.
pub(crate) fn check_atoms(manifest: &Manifest, atoms: &[StoredAtom], path: &Path) -> Result<()> {
    ensure!(
        atoms.len() == manifest.atoms,
        "{}: the atom table has {} rows, the manifest says {} atoms",
        path.display(),
        atoms.len(),
        manifest.atoms
    );
    for (i, a) in atoms.iter().enumerate() {
        ensure!(
            (a.token as usize) < manifest.tokens || a.token == crate::ops::scatter::EXCLUDED,
            "{}: line {}: atom {} ({} of residue {} {}) has token {}, but the dataset has {} \
             tokens (0..{}): the atom table was edited or is corrupt",
            path.display(),
            i + 2,
            i,
            a.name,
            a.resname,
            a.resid,
            a.token,
            manifest.tokens,
            manifest.tokens.saturating_sub(1)
        );
        ensure!(
            (a.residue as usize) < manifest.residues,
            "{}: line {}: atom {} ({} of residue {} {}) has residue index {}, but the dataset \
             has {} residues: the atom table was edited or is corrupt",
            path.display(),
            i + 2,
            i,
            a.name,
            a.resname,
            a.resid,
            a.residue,
            manifest.residues
        );
    }
    Ok(())
}

/// Opens trajectory `i` of the manifest of the dataset at `dir` and checks its header against
/// the manifest: atoms, frames, and the box and time flags.
pub(crate) fn open_entry(dir: &Path, manifest: &Manifest, i: usize) -> Result<StoredTrajectory> {
    let t = &manifest.trajectories[i];
    let st = StoredTrajectory::open(&confined(dir, &t.file, "file")?)?;
    ensure!(
        st.atoms() == manifest.atoms && st.frames() == t.frames,
        "{}: holds {} frames of {} atoms, the manifest says {} of {}",
        st.path().display(),
        st.frames(),
        st.atoms(),
        t.frames,
        manifest.atoms
    );
    ensure!(
        st.header.has_box == t.has_box && st.header.has_time == t.has_time,
        "{}: its header says box {}, times {}; the manifest says box {}, times {}",
        st.path().display(),
        st.header.has_box,
        st.header.has_time,
        t.has_box,
        t.has_time
    );
    Ok(st)
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

pub(crate) fn read_atom_table(path: &Path) -> Result<Vec<StoredAtom>> {
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
