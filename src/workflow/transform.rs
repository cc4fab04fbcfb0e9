//! `hiermd transform RUN --data DIR --out F.npy`: the trained network's outputs for every frame,
//! like deeptime's `model.transform`, so any score can be re-checked from Python.

use super::config::ObjectiveKind;
use super::run::{files, Run};
use crate::Device;
use anyhow::{ensure, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What `transform` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct TransformReport {
    /// The .npy file: `[frames, columns]` f32, trajectories one after another.
    pub out: PathBuf,
    /// Column names.
    pub columns: Vec<String>,
    /// First row of each trajectory, and the total at the end.
    pub offsets: Vec<usize>,
    /// Source trajectory files.
    pub trajectories: Vec<String>,
}

/// Applies the run in `run_dir` to every frame of the dataset `data` (default: the run's own)
/// and writes the rows to `out` plus `out` with `.json` (columns and trajectory offsets); neither
/// may exist (see [`transform_with`]).
pub fn transform(
    run_dir: &Path,
    data: Option<&Path>,
    features: Option<&Path>,
    out: &Path,
    device: &Device,
    progress: bool,
) -> Result<TransformReport> {
    transform_with(run_dir, data, features, out, false, device, progress)
}

/// [`transform`], replacing existing output files when `force`. Both files are written
/// atomically, and never over the run's own files, the dataset or the features (issue 16).
pub fn transform_with(
    run_dir: &Path,
    data: Option<&Path>,
    features: Option<&Path>,
    out: &Path,
    force: bool,
    device: &Device,
    progress: bool,
) -> Result<TransformReport> {
    let json = out.with_extension("json");
    ensure!(
        json != out,
        "--out {}: the columns go to a .json beside the .npy; give the .npy file name",
        out.display()
    );
    let mut run = Run::open_on(run_dir, device, data, features)?;
    // Checked before the (long) prediction: what the run reads is an input.
    let model = run_dir.join(files::MODEL);
    let config = run_dir.join(files::CONFIG);
    let mut inputs: Vec<(&str, &Path)> = vec![
        ("model", &model),
        ("run configuration", &config),
        ("dataset", &run.config.data.dataset),
    ];
    if let Some(f) = &run.config.data.features {
        inputs.push(("feature store", f));
    }
    for o in [out, &json] {
        crate::output::check_file_output(o, force, &inputs)?;
    }
    let rows = run.predict_all(progress)?;
    let w = run.prediction_width();
    let columns: Vec<String> = match run.net.objective {
        ObjectiveKind::Vamp => (0..w).map(|i| format!("p{i}")).collect(),
        ObjectiveKind::Spib => (0..w - 1)
            .map(|i| format!("z{}", i + 1))
            .chain(["state".to_string()])
            .collect(),
    };
    let mut offsets = vec![0];
    let mut flat = Vec::new();
    for r in &rows {
        flat.extend(r.iter().map(|&x| x as f32));
        offsets.push(offsets.last().unwrap() + r.len() / w);
    }
    let n = offsets.last().copied().unwrap_or(0);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    crate::npy::write_f32(out, &[n, w], &flat)?;
    let report = TransformReport {
        out: out.to_path_buf(),
        columns,
        offsets,
        trajectories: run
            .net
            .ds
            .manifest
            .trajectories
            .iter()
            .map(|t| t.source.path.clone())
            .collect(),
    };
    crate::output::write_atomic(&json, &serde_json::to_vec_pretty(&report)?)?;
    Ok(report)
}
