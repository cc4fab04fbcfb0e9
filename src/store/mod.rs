//! The trajectory store: a dataset folder written once by `hiermd import` and read through memory
//! maps by training, without loading whole trajectories into memory.
//!
//! ```text
//! DIR/manifest.toml     what the dataset holds (TOML, see [`Manifest`])
//! DIR/atoms.tsv         the atom table of the selected atoms, with their token (residue) index
//! DIR/traj-0000.hmdt    one file per trajectory: a 4 KiB header, then f32 coordinates
//!                       [frames][atoms][3] in Angstrom, then f32 boxes [frames][3][3] (if any),
//!                       then f64 times in ps [frames]
//! ```
//! All numbers are little-endian. The header is written last, with a `complete` flag, so a file
//! cut short by a crash is recognised; and the whole folder is built under a temporary name and
//! renamed into place, so a failed or killed import leaves no dataset behind.

mod dataset;
mod export;
mod features;
mod import;
mod pairs;
pub mod verify;

pub use dataset::{Dataset, StoredAtom, StoredTrajectory};
pub use export::{export, export_with, parse_frames, ExportFormat};
pub use features::{
    write_npy, FeatureData, FeatureDtype, FeatureFrame, FeatureManifest, FeatureSettings,
    FeatureStore, FeatureTrajectory, FeatureWriter, FAULT_ABORT_ENV, FEATURE_HEADER_BYTES,
    FEATURE_MAGIC, FEATURE_VERSION,
};
pub use import::{import, ImportOptions, ImportReport};
pub use pairs::{Batch, BatchLoader, Lag, LaggedPairs, PairIndex, Split};

use serde::{Deserialize, Serialize};

/// Magic bytes at the start of every trajectory file.
pub const MAGIC: [u8; 8] = *b"HIERMDTJ";
/// Version of the trajectory file layout and the manifest.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes reserved for the trajectory file header; the coordinates start here (page-aligned, so
/// the memory map hands out aligned f32 slices).
pub const HEADER_BYTES: u64 = 4096;

/// The manifest of a dataset (`manifest.toml`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Always "hiermd-dataset".
    pub format: String,
    /// [`FORMAT_VERSION`] of the writer.
    pub version: u32,
    /// Version of hiermd that wrote it.
    pub written_by: String,
    /// Atoms per frame (after selection).
    pub atoms: usize,
    /// Distinct residues among the selected atoms.
    pub residues: usize,
    /// Distinct tokens (residues, or the groups of a custom token map).
    pub tokens: usize,
    /// Distinct chains.
    pub chains: usize,
    /// The selection expression the atoms were chosen by.
    pub selection: String,
    /// Atoms in the topology before selection.
    pub topology_atoms: usize,
    /// The topology file.
    pub topology: SourceFile,
    /// A custom atom-to-token map, if one was given.
    pub token_map: Option<SourceFile>,
    /// The atom table file (relative to the dataset folder).
    pub atom_table: String,
    /// XXH3-64 (hex) of the atom table file; absent in datasets written before checksums were
    /// recorded (they still open; `hiermd verify` says "no checksum recorded").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub atom_table_xxh3: Option<String>,
    /// Time between saved frames in ps (from the first trajectory's times or `--dt`), if known.
    pub time_step_ps: Option<f64>,
    /// Total frames over all trajectories.
    pub total_frames: usize,
    /// The trajectories, in import order.
    pub trajectories: Vec<TrajectoryEntry>,
}

/// A source file and its checksum.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SourceFile {
    /// Path as given to import (made absolute).
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// XXH3-64 of the contents, hex.
    pub xxh3: String,
}

/// One stored trajectory.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrajectoryEntry {
    /// The store file (relative to the dataset folder).
    pub file: String,
    /// Where it came from.
    pub source: SourceFile,
    /// Frames.
    pub frames: usize,
    /// Whether every frame has a unit cell.
    pub has_box: bool,
    /// Whether frames have times.
    pub has_time: bool,
    /// Time of the first frame in ps, if known.
    pub first_time_ps: Option<f64>,
    /// Time between frames in ps, if known (from the times, else the dataset's `time_step_ps`).
    pub time_step_ps: Option<f64>,
    /// XXH3-64 (hex) of the stored file's payload: every byte after its 4 KiB header (the header
    /// itself is checked field by field against this entry). Absent in datasets written before
    /// checksums were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_xxh3: Option<String>,
    /// Where the times come from, with their unit (a DCD's DELTA in AKMA units x NSAVC, an
    /// XTC's stored times, `--dt`); absent in older datasets and for files without times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_source: Option<String>,
}

/// A human-readable summary of a dataset, for `hiermd info`.
pub fn describe(ds: &Dataset) -> String {
    use std::fmt::Write;
    let m = &ds.manifest;
    let mut s = String::new();
    let _ = writeln!(s, "dataset      {}", ds.dir().display());
    let _ = writeln!(s, "written by   {} (format {})", m.written_by, m.version);
    let _ = writeln!(
        s,
        "topology     {} ({} atoms)",
        m.topology.path, m.topology_atoms
    );
    let _ = writeln!(
        s,
        "selection    {:?}: {} atoms, {} residues, {} tokens, {} chains",
        m.selection, m.atoms, m.residues, m.tokens, m.chains
    );
    let dt = m
        .time_step_ps
        .map(|d| format!("{d} ps"))
        .unwrap_or_else(|| "unknown".into());
    let _ = writeln!(
        s,
        "frames       {} in {} trajectories, time step {dt}",
        m.total_frames,
        m.trajectories.len()
    );
    let mut bytes = 0u64;
    for (i, t) in m.trajectories.iter().enumerate() {
        let size = std::fs::metadata(ds.dir().join(&t.file))
            .map(|m| m.len())
            .unwrap_or(0);
        bytes += size;
        let _ = writeln!(
            s,
            "  [{i}] {} frames{}{}{} <- {}",
            t.frames,
            if t.has_box { ", box" } else { "" },
            t.first_time_ps
                .map(|t0| format!(", from {t0} ps"))
                .unwrap_or_default(),
            t.time_step_ps
                .map(|d| format!(" every {d} ps"))
                .unwrap_or_default(),
            t.source.path
        );
        if let Some(src) = &t.time_source {
            let _ = writeln!(s, "       times: {src}");
        }
    }
    let _ = writeln!(s, "size         {:.1} MB", bytes as f64 / 1e6);
    s
}

/// Checksum of a file, streamed.
pub(crate) fn source_file(path: &std::path::Path) -> anyhow::Result<SourceFile> {
    use anyhow::Context;
    use std::io::Read;
    let abs =
        std::fs::canonicalize(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut f =
        std::fs::File::open(&abs).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}: read error", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(SourceFile {
        path: abs.display().to_string(),
        bytes,
        xxh3: format!("{:016x}", h.digest()),
    })
}
