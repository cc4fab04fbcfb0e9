//! A trained run folder opened again (for `analyze`, `transform` and SPIB's initial labels), and
//! predictions of its network over frames.

use super::config::{ObjectiveKind, RunConfig};
use super::network::Network;
use crate::tape::Tape;
use crate::Device;
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};

/// File names inside a run folder.
pub mod files {
    /// The resolved configuration.
    pub const CONFIG: &str = "config.toml";
    /// The final (best) weights.
    pub const MODEL: &str = "model.safetensors";
    /// The best weights so far (early stopping).
    pub const BEST: &str = "best.safetensors";
    /// One JSON line per epoch.
    pub const METRICS: &str = "metrics.jsonl";
    /// The end-of-training summary.
    pub const SUMMARY: &str = "summary.json";
    /// SPIB's final labels and representatives.
    pub const SPIB_STATE: &str = "spib.json";
}

/// A trained run: its configuration and network with the trained weights on a tape.
pub struct Run {
    /// The run folder.
    pub dir: PathBuf,
    /// Its configuration.
    pub config: RunConfig,
    /// The network.
    pub net: Network,
    /// A tape holding the trained parameters (evaluation mode).
    pub tape: Tape,
}

impl Run {
    /// Opens a finished run (its `model.safetensors`) on `device`.
    pub fn open(dir: &Path, device: &Device) -> Result<Self> {
        Self::open_on(dir, device, None, None)
    }

    /// Opens a run to apply it to another dataset (`dataset`), whose features (`features`) a run
    /// trained on frozen features needs too.
    pub fn open_on(
        dir: &Path,
        device: &Device,
        dataset: Option<&Path>,
        features: Option<&Path>,
    ) -> Result<Self> {
        let cpath = dir.join(files::CONFIG);
        let text = std::fs::read_to_string(&cpath).with_context(|| {
            format!(
                "{} is not a training run (no {})",
                dir.display(),
                files::CONFIG
            )
        })?;
        let mut config = RunConfig::from_toml_with(&text, &[])
            .with_context(|| format!("in {}", cpath.display()))?;
        if let Some(ds) = dataset {
            let ds = std::fs::canonicalize(ds)
                .with_context(|| format!("--data {} does not exist", ds.display()))?;
            if ds != config.data.dataset {
                config.data.dataset = ds;
                if config.data.features.is_some() {
                    let Some(f) = features else {
                        anyhow::bail!(
                            "{} was trained on frozen features: give --features, the                              `hiermd featurize` output of {} made with the same atom model",
                            dir.display(),
                            config.data.dataset.display()
                        );
                    };
                    config.data.features = Some(f.to_path_buf());
                }
            }
        }
        if let (Some(f), Some(_)) = (features, &config.data.features) {
            config.data.features = Some(f.to_path_buf());
        }
        let model = dir.join(files::MODEL);
        ensure!(
            model.exists(),
            "{}: the run has no {} (still training? `hiermd train --resume` finishes it)",
            dir.display(),
            files::MODEL
        );
        // The model's recorded XXH3 first (issue 16): a damaged model is an error, not weights.
        crate::store::verify::check_model_file(&model)?;
        let (net, mut ps) = Network::build(&config, device)?;
        ps.load(&model)?;
        let mut tape = Tape::new(ps, config.train.seed);
        tape.set_training(false);
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            net,
            tape,
        })
    }

    /// Width of [`Run::predict_all`]'s rows.
    pub fn prediction_width(&self) -> usize {
        match self.net.objective {
            ObjectiveKind::Vamp => self.config.objective.outputs,
            ObjectiveKind::Spib => self.config.objective.spib.z_dim + 1,
        }
    }

    /// Predictions for every frame of every trajectory, `[trajectory][frame * width + j]`: VAMP
    /// runs give the state probabilities (softmax outputs); SPIB runs give the encoder mean z
    /// followed by the decoder's most likely state.
    pub fn predict_all(&mut self, progress: bool) -> Result<Vec<Vec<f64>>> {
        let counts: Vec<usize> = self
            .net
            .ds
            .trajectories
            .iter()
            .map(|t| t.frames())
            .collect();
        predict_frames(
            &self.net,
            &mut self.tape,
            &counts,
            self.config.train.eval_batch,
            progress,
        )
    }
}

/// Runs the network in evaluation mode over every frame of trajectories with `counts` frames.
pub fn predict_frames(
    net: &Network,
    tape: &mut Tape,
    counts: &[usize],
    batch: usize,
    progress: bool,
) -> Result<Vec<Vec<f64>>> {
    let was = tape.training();
    tape.set_training(false);
    let total: usize = counts.iter().sum();
    let mut bar = crate::progress::Progress::new("predicting", Some(total), "frames", progress);
    let mut out = Vec::with_capacity(counts.len());
    let mut done = 0;
    for (t, &n) in counts.iter().enumerate() {
        let mut rows = Vec::new();
        let mut start = 0;
        while start < n {
            let end = (start + batch).min(n);
            let frames: Vec<(usize, usize)> = (start..end).map(|i| (t, i)).collect();
            rows.extend(predict_batch(net, tape, &frames)?);
            done += end - start;
            bar.set(done, 0);
            start = end;
        }
        out.push(rows);
    }
    bar.finish();
    tape.set_training(was);
    Ok(out)
}

/// Predictions for one batch of frames (see [`Run::predict_all`]), row-major.
pub fn predict_batch(
    net: &Network,
    tape: &mut Tape,
    frames: &[(usize, usize)],
) -> Result<Vec<f64>> {
    tape.reset();
    let out = net.encode(tape, frames)?;
    let rows = match (&net.spib, net.objective) {
        (Some(head), ObjectiveKind::Spib) => {
            let (mu, _logvar, logp) = head.predict(tape, out.out)?;
            let mu_v = tape.value(mu).to_vec()?;
            let lp = tape.value(logp).to_vec()?;
            let n = frames.len();
            let d = mu_v.len() / n;
            let k = lp.len() / n;
            let mut rows = Vec::with_capacity(n * (d + 1));
            for i in 0..n {
                rows.extend(mu_v[i * d..(i + 1) * d].iter().map(|&x| x as f64));
                rows.push(argmax(&lp[i * k..(i + 1) * k]) as f64);
            }
            rows
        }
        _ => {
            let chi = crate::nn::softmax(tape, out.out, 1.0, None, 1)?;
            tape.value(chi)
                .to_vec()?
                .into_iter()
                .map(f64::from)
                .collect()
        }
    };
    tape.reset();
    Ok(rows)
}

/// Index of the largest value (the first of ties).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}
