//! Trajectory readers: DCD, XTC, TRR and multi-model PDB (plain or gzipped), one frame at a time
//! (memory O(one frame)). Coordinates are returned in Angstrom, times in picoseconds.
//!
//! Only regular files are opened ([`input::open_regular`]): a device, FIFO or directory named as
//! a trajectory is refused at once. Values a file may hold but that make no physical sense
//! (a time that is not finite, a DCD time step of 2.5e-322 ps) do not stop the reading: the
//! times are dropped and a warning naming the file and frame is left for
//! [`TrajectoryReader::take_warnings`].

use anyhow::{bail, Result};
use std::path::Path;

mod bytes;
mod dcd;
pub mod input;
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
    /// Warnings about values the file holds that make no physical sense and were dropped (an
    /// implausible time step, a frame time that is not finite), each naming the file and frame;
    /// taken once (the list is emptied).
    fn take_warnings(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// Where the frame times come from, in words with their unit, for `hiermd info` (e.g. a
    /// DCD's DELTA in AKMA units times NSAVC); None when the file has no times.
    fn time_source(&self) -> Option<String> {
        None
    }
}

/// Shortest time between saved frames taken as real, in ps: one attosecond, a thousandth of the
/// shortest MD integration step. Anything below (such as the 2.5e-322 ps of a CHARMM DCD header
/// read as X-PLOR's) is a misread header.
pub const MIN_TIME_STEP_PS: f64 = 1e-6;

/// Longest time between saved frames taken as real, in ps: one second, beyond any simulation.
pub const MAX_TIME_STEP_PS: f64 = 1e12;

/// Whether `dt` (ps) is a plausible time between saved frames: finite and between
/// [`MIN_TIME_STEP_PS`] and [`MAX_TIME_STEP_PS`].
pub fn plausible_time_step(dt: f64) -> bool {
    dt.is_finite() && (MIN_TIME_STEP_PS..=MAX_TIME_STEP_PS).contains(&dt)
}

/// Checks the frame times a file gave (ps, one per frame): `Err` with a warning naming the file
/// and the frame unless the first step is [plausible](plausible_time_step) (so a file whose
/// frames all say t = 0, or go back in time, gives no time step rather than a wrong one).
pub fn check_frame_times(path: &Path, times: &[f64]) -> Result<(), String> {
    if let Some(i) = times.iter().position(|t| !t.is_finite()) {
        return Err(format!(
            "{}: frame {i}: time {} ps is not finite; the file's times are dropped (give --dt)",
            path.display(),
            times[i]
        ));
    }
    if let [t0, t1, ..] = times {
        let dt = t1 - t0;
        if !plausible_time_step(dt) {
            return Err(format!(
                "{}: frame 1: time {t1} ps after frame 0 at {t0} ps is a time step of {dt} ps, \
                 which is not plausible; the file's times are dropped (give --dt)",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Opens a trajectory, choosing the reader by extension (`.dcd`, `.xtc`, `.trr`, `.pdb`; PDB
/// also gzipped: `.pdb.gz`). Only regular files are opened.
pub fn open_trajectory(path: &Path) -> Result<Box<dyn TrajectoryReader>> {
    let ext_of = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    let ext = ext_of(path);
    if matches!(ext.as_str(), "gz" | "bz2") {
        let inner = path
            .file_stem()
            .map(|s| ext_of(Path::new(s)))
            .unwrap_or_default();
        return match (ext.as_str(), inner.as_str()) {
            ("gz", "pdb" | "ent") => Ok(Box::new(PdbTrajectoryReader::open(path)?)),
            ("bz2", _) => bail!(
                "{}: bzip2-compressed trajectories are not read (no bzip2 decoder is built in): \
                 decompress it first (bunzip2 -k), or recompress with gzip for PDB",
                path.display()
            ),
            _ => bail!(
                "{}: a compressed {inner:?} trajectory: only PDB trajectories are read gzipped \
                 (.pdb.gz); decompress it first (gunzip -k)",
                path.display()
            ),
        };
    }
    Ok(match ext.as_str() {
        "dcd" => Box::new(DcdReader::open(path)?),
        "xtc" => Box::new(XtcReader::open(path)?),
        "trr" => Box::new(TrrReader::open(path)?),
        "pdb" | "ent" => Box::new(PdbTrajectoryReader::open(path)?),
        _ => bail!(
            "{}: unknown trajectory format {ext:?} (expected .dcd, .xtc, .trr, .pdb or .pdb.gz)",
            path.display()
        ),
    })
}
