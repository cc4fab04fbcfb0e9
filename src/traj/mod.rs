//! Trajectory readers: DCD, XTC, TRR and multi-model PDB, one frame at a time (memory O(one
//! frame)). Coordinates are returned in Angstrom, times in picoseconds.

use anyhow::{bail, Result};
use std::path::Path;

mod bytes;
mod dcd;
mod pdb;
mod trr;
mod xtc;

pub use bytes::Endian;
pub use dcd::DcdHeader;
pub use dcd::DcdReader;
pub use pdb::PdbTrajectoryReader;
pub use trr::TrrReader;
pub use xtc::XtcReader;

/// A periodic unit cell as three box vectors (rows a, b, c) in Angstrom, in the GROMACS
/// convention: a along x, b in the xy plane (lower-triangular matrix).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UnitCell {
    /// Rows are the box vectors a, b, c.
    pub vectors: [[f32; 3]; 3],
}

impl UnitCell {
    /// From edge lengths (Angstrom) and angles alpha (b,c), beta (a,c), gamma (a,b) in degrees.
    pub fn from_lengths_angles(a: f64, b: f64, c: f64, alpha: f64, beta: f64, gamma: f64) -> Self {
        let (al, be, ga) = (alpha.to_radians(), beta.to_radians(), gamma.to_radians());
        // Right angles are snapped so an orthorhombic box has exact zeros off the diagonal.
        let cos = |x: f64, deg: f64| {
            if (deg - 90.0).abs() < 1e-6 {
                0.0
            } else {
                x.cos()
            }
        };
        let (ca, cb, cg) = (cos(al, alpha), cos(be, beta), cos(ga, gamma));
        let sg = if (gamma - 90.0).abs() < 1e-6 {
            1.0
        } else {
            ga.sin()
        };
        let bx = b * cg;
        let by = b * sg;
        let cx = c * cb;
        let cy = c * (ca - cb * cg) / sg;
        let cz = (c * c - cx * cx - cy * cy).max(0.0).sqrt();
        Self {
            vectors: [
                [a as f32, 0.0, 0.0],
                [bx as f32, by as f32, 0.0],
                [cx as f32, cy as f32, cz as f32],
            ],
        }
    }

    /// Edge lengths (Angstrom) and angles alpha, beta, gamma (degrees).
    pub fn lengths_angles(&self) -> [f64; 6] {
        let v = self.vectors.map(|r| r.map(|x| x as f64));
        let len = |r: [f64; 3]| (r[0] * r[0] + r[1] * r[1] + r[2] * r[2]).sqrt();
        let dot = |p: [f64; 3], q: [f64; 3]| p[0] * q[0] + p[1] * q[1] + p[2] * q[2];
        let (a, b, c) = (len(v[0]), len(v[1]), len(v[2]));
        let ang = |p, q, lp: f64, lq: f64| {
            if lp == 0.0 || lq == 0.0 {
                90.0
            } else {
                (dot(p, q) / (lp * lq)).clamp(-1.0, 1.0).acos().to_degrees()
            }
        };
        [
            a,
            b,
            c,
            ang(v[1], v[2], b, c),
            ang(v[0], v[2], a, c),
            ang(v[0], v[1], a, b),
        ]
    }

    /// Whether all off-diagonal entries are zero.
    pub fn is_orthorhombic(&self) -> bool {
        let v = &self.vectors;
        v[0][1] == 0.0
            && v[0][2] == 0.0
            && v[1][0] == 0.0
            && v[1][2] == 0.0
            && v[2][0] == 0.0
            && v[2][1] == 0.0
    }
}

/// One frame: coordinates (atoms x 3, Angstrom), and the box, time and step when the format has
/// them. Reused across reads to avoid allocation.
#[derive(Clone, Debug, Default)]
pub struct Frame {
    /// Flattened coordinates `[x0, y0, z0, x1, ...]` in Angstrom.
    pub coords: Vec<f32>,
    /// Unit cell, if the file has one for this frame.
    pub unit_cell: Option<UnitCell>,
    /// Time in picoseconds, if the file records it.
    pub time_ps: Option<f64>,
    /// MD step, if the file records it.
    pub step: Option<i64>,
}

/// A reader that yields frames one by one.
pub trait TrajectoryReader: Send {
    /// Atoms per frame.
    fn natoms(&self) -> usize;
    /// Number of frames if known without reading them all (DCD: from the file size).
    fn nframes_hint(&self) -> Option<usize>;
    /// Reads the next frame into `frame`; `Ok(false)` at the end of the file. Errors name the file
    /// and the frame index.
    fn read_frame(&mut self, frame: &mut Frame) -> Result<bool>;
    /// Index of the next frame to be read.
    fn position(&self) -> usize;
    /// The file being read.
    fn path(&self) -> &Path;
}

/// Opens a trajectory, choosing the reader by extension (`.dcd`, `.xtc`, `.trr`, `.pdb`).
pub fn open_trajectory(path: &Path) -> Result<Box<dyn TrajectoryReader>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    Ok(match ext.as_str() {
        "dcd" => Box::new(DcdReader::open(path)?),
        "xtc" => Box::new(XtcReader::open(path)?),
        "trr" => Box::new(TrrReader::open(path)?),
        "pdb" | "ent" => Box::new(PdbTrajectoryReader::open(path)?),
        _ => bail!(
            "{}: unknown trajectory format {ext:?} (expected .dcd, .xtc, .trr or .pdb)",
            path.display()
        ),
    })
}
