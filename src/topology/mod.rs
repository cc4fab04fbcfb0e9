//! Topologies: atoms with their names, residues, chains, elements and masses, read from PDB
//! (including multi-model files), GRO and PSF.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

pub mod element;
mod gro;
mod pdb;
mod psf;

pub use gro::read_gro;
pub use pdb::{read_pdb, AltLocFilter};
pub use psf::read_psf;

/// One atom of a topology.
#[derive(Clone, Debug, PartialEq)]
pub struct Atom {
    /// Atom name (`CA`, `OG1`, ...), trimmed.
    pub name: String,
    /// Residue name (`ALA`, ...), trimmed.
    pub resname: String,
    /// Residue number as written in the file.
    pub resid: i32,
    /// Insertion code (PDB), or ' '.
    pub icode: char,
    /// Chain identifier (PDB chain, else segment id), trimmed; may be empty.
    pub chain: String,
    /// Segment id (PSF segid, PDB columns 73-76), trimmed; may be empty.
    pub segid: String,
    /// Element symbol, capitalised (`C`, `Fe`); `X` if unknown.
    pub element: String,
    /// Atomic number (0 if unknown).
    pub atomic_number: u8,
    /// Mass in daltons (from the file when it has one, else the element's standard mass).
    pub mass: f32,
    /// Partial charge (PSF), else 0.
    pub charge: f32,
}

/// A topology: the atoms, plus the first frame's coordinates and box when the file has them
/// (PDB, GRO).
#[derive(Clone, Debug)]
pub struct Topology {
    /// The file it was read from.
    pub source: PathBuf,
    /// Atoms in file order.
    pub atoms: Vec<Atom>,
    /// Coordinates of the first model/frame, in Angstrom, if present.
    pub coords: Option<Vec<[f32; 3]>>,
    /// Unit cell of the first model/frame, if present.
    pub unit_cell: Option<crate::traj::UnitCell>,
}

impl Topology {
    /// Number of atoms.
    pub fn len(&self) -> usize {
        self.atoms.len()
    }

    /// Whether it has no atom.
    pub fn is_empty(&self) -> bool {
        self.atoms.is_empty()
    }

    /// Residue index (0-based, consecutive) of every atom: a new residue starts whenever chain,
    /// segment, residue number, insertion code or residue name changes from the previous atom.
    pub fn residue_indices(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.atoms.len());
        let mut idx: i64 = -1;
        let mut prev: Option<&Atom> = None;
        for a in &self.atoms {
            let new = match prev {
                None => true,
                Some(p) => {
                    p.resid != a.resid
                        || p.icode != a.icode
                        || p.resname != a.resname
                        || p.chain != a.chain
                        || p.segid != a.segid
                }
            };
            if new {
                idx += 1;
            }
            out.push(idx as u32);
            prev = Some(a);
        }
        out
    }
}

/// Reads a topology, choosing the reader by extension (`.pdb`/`.ent`, `.gro`, `.psf`, each
/// optionally gzipped: `.pdb.gz`).
pub fn read_topology(path: &Path) -> Result<Topology> {
    let ext_of = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    let mut ext = ext_of(path);
    if ext == "gz" {
        // The readers decompress gzip themselves; the format is the extension under `.gz`.
        ext = path
            .file_stem()
            .map(|s| ext_of(Path::new(s)))
            .unwrap_or_default();
    }
    match ext.as_str() {
        "pdb" | "ent" => read_pdb(path),
        "gro" => read_gro(path),
        "psf" => read_psf(path),
        _ => bail!(
            "{}: unknown topology format {ext:?} (expected .pdb, .gro or .psf)",
            path.display()
        ),
    }
}

/// Reads a whole topology file, decompressing it when it is gzipped (recognised by its magic
/// bytes, whatever its name).
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    use anyhow::Context;
    use std::io::Read;
    let raw = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{}: bad gzip data", path.display()))?;
        return Ok(out);
    }
    Ok(raw)
}

/// Lines of a text file without their line ending (`\n` or `\r\n`), numbered from 1.
fn numbered_lines(data: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let data = data.strip_suffix(b"\n").unwrap_or(data);
    data.split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l.strip_suffix(b"\r").unwrap_or(l)))
}

/// Columns `[a, b)` (0-based byte offsets) of a fixed-width line, clipped to its length, as text
/// trimmed of blanks: short lines read as blank fields.
fn column(line: &[u8], a: usize, b: usize) -> std::borrow::Cow<'_, str> {
    let a = a.min(line.len());
    let b = b.clamp(a, line.len());
    match String::from_utf8_lossy(&line[a..b]) {
        std::borrow::Cow::Borrowed(s) => std::borrow::Cow::Borrowed(s.trim()),
        std::borrow::Cow::Owned(s) => std::borrow::Cow::Owned(s.trim().to_string()),
    }
}

/// Element symbol, atomic number and mass of an atom: `z` from the file or a guess, `mass` from
/// the file when it has one, else the element's standard mass (0 when unknown).
fn element_fields(z: Option<u8>, file_mass: Option<f32>) -> (String, u8, f32) {
    let z = z.unwrap_or(0);
    let m = file_mass.unwrap_or_else(|| element::mass(z));
    (element::symbol(z).to_string(), z, m)
}
