//! Topologies: atoms with their names, residues, chains, elements and masses, read from PDB
//! (including multi-model files), GRO and PSF.
//!
//! Reading is bounded ([`crate::traj::input`]): only regular files (a device, FIFO or directory
//! is refused by its type at once, also through a symlink), at most
//! [`MAX_TEXT_BYTES`](crate::traj::input::MAX_TEXT_BYTES) of text, gzip inflating to at most
//! [`GZIP_MAX_RATIO`](crate::traj::input::GZIP_MAX_RATIO) times its size, and at most
//! [`MAX_ATOMS`] atoms.
//!
//! Atoms whose element is unknown (virtual sites such as TIP4P's `MW` and TIP5P's `LP`/`EP`,
//! coarse-grained beads such as Martini's `GL1`, an element column of `X`) are kept as element
//! `X` (Z = 0): `all`, `water` and `resname` select them, `heavy` leaves them out, and the atom
//! stage refuses them unless they are dropped (see `crate::model::atom::AtomInputs`).

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
    /// Segment id, filled as MDAnalysis fills it: the PSF segid; the PDB segID columns 73-76,
    /// or the chain IDs when no atom of the file has a segID, or `SYSTEM` when none has either;
    /// `SYSTEM` for GRO files. Trimmed; may be empty (PSF, or PDB atoms without one in a file
    /// where others have one).
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

/// Segment id MDAnalysis gives atoms when the file has none (GRO; PDB without segID or chain).
pub const PLACEHOLDER_SEGID: &str = "SYSTEM";

/// Most atoms a topology may hold (the trajectory readers' limit, 100 million): a count above it
/// is a corrupt file, not a system.
pub const MAX_ATOMS: usize = 100_000_000;

/// Reads a whole topology file, decompressing it when it is gzipped (recognised by its magic
/// bytes, whatever its name), within the bounds of [`crate::traj::input::read_whole`]: only a
/// regular file, at most [`crate::traj::input::MAX_TEXT_BYTES`].
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    crate::traj::input::read_whole(path, crate::traj::input::MAX_TEXT_BYTES)
}

/// Fails unless `n` atoms (declared by a file or counted so far) is within [`MAX_ATOMS`].
fn check_atom_count(path: &Path, n: usize) -> Result<()> {
    if n > MAX_ATOMS {
        bail!(
            "{}: {n} atoms, more than the {MAX_ATOMS} hiermd reads (a corrupt atom count?)",
            path.display()
        );
    }
    Ok(())
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
