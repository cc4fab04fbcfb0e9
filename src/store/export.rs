//! `hiermd export`: frames of a stored trajectory back out as PDB, XYZ or NumPy `.npy`, so any
//! dataset can be checked from other tools.

use super::Dataset;
use anyhow::{bail, ensure, Context, Result};
use std::io::Write;
use std::path::Path;
use std::str::FromStr;

/// Output formats of `hiermd export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// Multi-model PDB with CRYST1 records when the trajectory has boxes.
    Pdb,
    /// XYZ: atom count, a comment line with frame and time, then element x y z.
    Xyz,
    /// NumPy array `[frames, atoms, 3]` of little-endian f32 (Angstrom).
    Npy,
}

impl FromStr for ExportFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "pdb" => Ok(Self::Pdb),
            "xyz" => Ok(Self::Xyz),
            "npy" => Ok(Self::Npy),
            _ => bail!("unknown export format {s:?}: expected pdb, xyz or npy"),
        }
    }
}

/// Parses `A:B` (frames A..B, B exclusive; either side may be empty) against `n` frames.
pub fn parse_frames(spec: &str, n: usize) -> Result<std::ops::Range<usize>> {
    let (a, b) = spec
        .split_once(':')
        .with_context(|| format!("frames {spec:?}: expected START:END, e.g. 0:100 or 10: or :5"))?;
    let a: usize = if a.is_empty() {
        0
    } else {
        a.parse()
            .with_context(|| format!("frames {spec:?}: bad start"))?
    };
    let b: usize = if b.is_empty() {
        n
    } else {
        b.parse()
            .with_context(|| format!("frames {spec:?}: bad end"))?
    };
    ensure!(
        a < b && b <= n,
        "frames {spec:?}: the trajectory has frames 0..{n}"
    );
    Ok(a..b)
}

/// Writes frames `frames` (`A:B`) of trajectory `traj` of `ds` to `out`, which must not exist
/// (see [`export_with`]).
pub fn export(
    ds: &Dataset,
    traj: usize,
    frames: &str,
    format: ExportFormat,
    out: &Path,
) -> Result<usize> {
    export_with(ds, traj, frames, format, out, false)
}

/// Writes frames `frames` (`A:B`) of trajectory `traj` of `ds` to `out`, atomically (a temporary
/// file beside it, renamed over it when complete). An existing `out` is replaced only with
/// `force`; an `out` inside the dataset is always refused (issue 16).
pub fn export_with(
    ds: &Dataset,
    traj: usize,
    frames: &str,
    format: ExportFormat,
    out: &Path,
    force: bool,
) -> Result<usize> {
    let t = ds.trajectories.get(traj).with_context(|| {
        format!(
            "trajectory {traj}: the dataset has {} (0-based)",
            ds.trajectories.len()
        )
    })?;
    let range = parse_frames(frames, t.frames())?;
    let n = range.len();
    // Issue 16: never into the dataset, never over a file without force.
    crate::output::check_file_output(out, force, &[("dataset", ds.dir())])?;
    let mut w = crate::output::AtomicFile::create(out)?;
    match format {
        ExportFormat::Npy => {
            // The header (64-byte aligned data, as NumPy writes it), then frames one at a time.
            w.write_all(&crate::npy::header(
                crate::npy::Dtype::F32,
                &[n, ds.natoms(), 3],
            ))?;
            for i in range.clone() {
                // Each frame is checked as it is read (issue 16): finite, within 1e6 A.
                w.write_all(bytemuck::cast_slice(ds.checked_frame(traj, i)?))?;
            }
        }
        ExportFormat::Xyz => {
            for i in range.clone() {
                writeln!(w, "{}", ds.natoms())?;
                let time = t
                    .time_ps(i)
                    .map(|t| format!(" time {t} ps"))
                    .unwrap_or_default();
                writeln!(w, "frame {i}{time}")?;
                let x = ds.checked_frame(traj, i)?;
                for (a, c) in ds.atoms.iter().zip(x.chunks_exact(3)) {
                    writeln!(w, "{:<2} {:.4} {:.4} {:.4}", a.element, c[0], c[1], c[2])?;
                }
            }
        }
        ExportFormat::Pdb => {
            for (m, i) in range.clone().enumerate() {
                if let Some(uc) = t.unit_cell(i) {
                    let [a, b, c, al, be, ga] = uc.lengths_angles();
                    writeln!(
                        w,
                        "CRYST1{a:9.3}{b:9.3}{c:9.3}{al:7.2}{be:7.2}{ga:7.2} P 1           1"
                    )?;
                }
                writeln!(w, "MODEL     {:>4}", m + 1)?;
                let x = ds.checked_frame(traj, i)?;
                for (k, (a, c)) in ds.atoms.iter().zip(x.chunks_exact(3)).enumerate() {
                    // Four-character names start in column 13, shorter ones in column 14.
                    let name = if a.name.len() >= 4 {
                        a.name.clone()
                    } else {
                        format!(" {}", a.name)
                    };
                    // A one-letter chain goes in the chain column; a longer identifier (a PSF
                    // segment) in the segment columns 73-76, which readers take as the chain
                    // when the chain column is blank.
                    let (chain, segid) = match a.chain.chars().count() {
                        1 => (a.chain.as_str(), ""),
                        _ => (" ", a.chain.get(..a.chain.len().min(4)).unwrap_or("")),
                    };
                    writeln!(
                        w,
                        "ATOM  {:>5} {:<4} {:<4}{}{:>4}    {:8.3}{:8.3}{:8.3}{:6.2}{:6.2}      {:<4}{:>2}",
                        (k + 1) % 100_000,
                        name,
                        a.resname,
                        chain,
                        a.resid.rem_euclid(10_000),
                        c[0],
                        c[1],
                        c[2],
                        1.0,
                        0.0,
                        segid,
                        a.element
                    )?;
                }
                writeln!(w, "ENDMDL")?;
            }
            writeln!(w, "END")?;
        }
    }
    w.commit()?;
    Ok(n)
}
