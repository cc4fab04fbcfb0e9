//! Command-line arguments of `train`, `analyze` and `transform`. Named flags cover the common
//! options; `--set section.field=value` reaches every field of the run configuration.

use super::analyze::{analyze_with, AnalyzeOptions};
use super::config::RunConfig;
use super::train::{train as run_train, TrainOptions};
use crate::analysis::checks::CheckOptions;
use crate::analysis::states::StateOptions;
use crate::{Device, DeviceSpec};
use anyhow::{ensure, Context, Result};
use std::path::PathBuf;

/// `hiermd train`. Numeric flags take negative numbers as values (`--lr -1`), so that the
/// configuration's checks reject them by name instead of the parser taking them for flags.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// The run folder to create (or to continue with --resume).
    #[arg(long)]
    pub run: PathBuf,
    /// The run configuration (TOML); without it, the defaults plus the flags.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// data.dataset: the imported dataset.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// data.features: train on these frozen features.
    #[arg(long)]
    pub features: Option<PathBuf>,
    /// data.atom_model: end-to-end training from this atom model.
    #[arg(long)]
    pub atom_model: Option<PathBuf>,
    /// data.lag in frames.
    #[arg(long, allow_negative_numbers = true)]
    pub lag: Option<usize>,
    /// data.lag_ps in picoseconds.
    #[arg(long, allow_negative_numbers = true)]
    pub lag_ps: Option<f64>,
    /// objective.kind: vamp or spib.
    #[arg(long)]
    pub objective: Option<String>,
    /// objective.outputs: VAMP states or SPIB encoder features.
    #[arg(long, allow_negative_numbers = true)]
    pub outputs: Option<usize>,
    /// objective.init_labels_from: the VAMP run SPIB starts from.
    #[arg(long)]
    pub init_labels_from: Option<PathBuf>,
    /// train.epochs.
    #[arg(long, allow_negative_numbers = true)]
    pub epochs: Option<u64>,
    /// train.batch (pairs).
    #[arg(long, allow_negative_numbers = true)]
    pub batch: Option<usize>,
    /// train.seed.
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// optimizer.lr.
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Any field: `--set model.hidden=64 --set objective.vamp.score='"vamp1"'`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue the run from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Replace an existing run folder (only a hiermd training run, and only once the new run
    /// is complete).
    #[arg(long)]
    pub force: bool,
}

fn quoted(p: &std::path::Path) -> String {
    // TOML basic string: escape backslashes and quotes.
    format!(
        "\"{}\"",
        p.display()
            .to_string()
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
    )
}

impl TrainArgs {
    /// The overrides the flags stand for, in order, then the `--set` ones.
    pub fn overrides(&self) -> Result<Vec<(String, String)>> {
        let mut o: Vec<(String, String)> = Vec::new();
        let mut put = |k: &str, v: String| o.push((k.to_string(), v));
        if let Some(p) = &self.data {
            put("data.dataset", quoted(p));
        }
        if let Some(p) = &self.features {
            put("data.features", quoted(p));
        }
        if let Some(p) = &self.atom_model {
            put("data.atom_model", quoted(p));
        }
        if let Some(v) = self.lag {
            put("data.lag", v.to_string());
        }
        if let Some(v) = self.lag_ps {
            put("data.lag_ps", format!("{v:?}"));
        }
        if let Some(v) = &self.objective {
            put("objective.kind", format!("\"{v}\""));
        }
        if let Some(v) = self.outputs {
            put("objective.outputs", v.to_string());
        }
        if let Some(p) = &self.init_labels_from {
            put("objective.init_labels_from", quoted(p));
        }
        if let Some(v) = self.epochs {
            put("train.epochs", v.to_string());
        }
        if let Some(v) = self.batch {
            put("train.batch", v.to_string());
        }
        if let Some(v) = self.seed {
            put("train.seed", v.to_string());
        }
        if let Some(v) = self.lr {
            put("optimizer.lr", format!("{v:?}"));
        }
        for s in &self.set {
            let (k, v) = s
                .split_once('=')
                .with_context(|| format!("--set {s}: expected KEY=VALUE, e.g. train.epochs=10"))?;
            o.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(o)
    }
}

/// Runs `hiermd train` on the device `spec` (the global `--device`; when that is `auto`, the
/// configuration's `train.device` decides).
pub fn train(args: &TrainArgs, spec: DeviceSpec) -> Result<()> {
    let cfg = if args.resume {
        // The saved configuration is used; the flags may not change it.
        let path = args.run.join(super::run::files::CONFIG);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("--resume: {} is not a run folder", args.run.display()))?;
        RunConfig::from_toml_with(&text, &[]).with_context(|| format!("in {}", path.display()))?
    } else {
        if let Some(c) = &args.config {
            // The configuration file is an input too (issue 16).
            crate::output::refuse_overlap(&args.run, &[("configuration", c)])?;
        }
        RunConfig::load(args.config.as_deref(), &args.overrides()?)?
    };
    let spec = match (&cfg.train.device, spec) {
        (Some(d), DeviceSpec::Auto) => d.parse().context("train.device")?,
        _ => spec,
    };
    let device = &Device::open(spec)?;
    let opts = TrainOptions {
        resume: args.resume,
        force: args.force,
        progress: true,
        abort_after_steps: std::env::var("HIERMD_FAULT_ABORT_TRAIN_AFTER_STEPS")
            .ok()
            .and_then(|v| v.parse().ok()),
        abort_process: true,
    };
    let s = run_train(&cfg, &args.run, device, &opts)?;
    println!(
        "trained {} for {} epochs (best epoch {}, validation score {:.5}{}) in {:.1} s; model in {}",
        s.objective,
        s.epochs,
        s.best_epoch,
        s.best_validation_score,
        if s.stopped_early { ", stopped early" } else { "" },
        s.seconds,
        args.run.join(super::run::files::MODEL).display()
    );
    Ok(())
}

/// `hiermd analyze`.
#[derive(clap::Args, Debug, Clone)]
pub struct AnalyzeArgs {
    /// The run folder.
    pub run: PathBuf,
    /// Lag times in frames for the scans (comma-separated; default: a ladder around the
    /// training lag).
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    pub lags: Vec<usize>,
    /// Output folder (default RUN/analysis).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Frames averaged in the attention maps.
    #[arg(long, default_value_t = 64, allow_negative_numbers = true)]
    pub attention_frames: usize,
    /// Steps of the Chapman-Kolmogorov test.
    #[arg(long, default_value_t = 5, allow_negative_numbers = true)]
    pub ck_steps: usize,
    /// VAMP runs: states by k-means on the VAMP singular functions, never the outputs' argmax.
    #[arg(long)]
    pub kmeans_states: bool,
    /// Number of k-means states (default: from the gap in the VAMP singular values).
    #[arg(long, allow_negative_numbers = true)]
    pub states: Option<usize>,
    /// Smallest fraction of all frames every occupied state must hold (a check: a smaller state
    /// gives a WARNING and, for the argmax, the k-means instead).
    #[arg(long, default_value_t = 0.02, allow_negative_numbers = true)]
    pub min_state_fraction: f64,
    /// Largest ratio, either way round, between the MSM's slowest implied timescale and the
    /// VAMP singular-value timescale at the analysis lag (a check, as above).
    #[arg(long, default_value_t = 2.0, allow_negative_numbers = true)]
    pub timescale_factor: f64,
    /// Seed of the k-means (default: the run's training seed).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Runs `hiermd analyze`.
pub fn analyze(args: &AnalyzeArgs, device: &Device) -> Result<()> {
    let opts = AnalyzeOptions {
        lags: args.lags.clone(),
        out: args.out.clone(),
        attention_frames: args.attention_frames,
        ck_steps: args.ck_steps,
        progress: true,
        kmeans_states: args.kmeans_states,
    };
    ensure!(
        args.states.is_none_or(|k| (2..=100).contains(&k)),
        "--states {}: between 2 and 100 states",
        args.states.unwrap_or(0)
    );
    ensure!(
        (0.0..0.5).contains(&args.min_state_fraction),
        "--min-state-fraction {}: a fraction in [0, 0.5)",
        args.min_state_fraction
    );
    ensure!(
        args.timescale_factor >= 1.0 && args.timescale_factor.is_finite(),
        "--timescale-factor {}: a finite factor of at least 1",
        args.timescale_factor
    );
    let states = StateOptions {
        states: args.states,
        seed: args.seed,
        checks: CheckOptions {
            min_state_fraction: args.min_state_fraction,
            timescale_factor: args.timescale_factor,
            ..CheckOptions::default()
        },
        ..StateOptions::default()
    };
    let s = analyze_with(&args.run, device, &opts, &states)?;
    let last = s
        .validation_vamp2
        .iter()
        .zip(&s.lags)
        .find(|(_, &l)| l == s.lag_frames);
    // The headline gives both timescales (MSM and singular values) and the checks' verdict,
    // never a lone number from a partition that may be degenerate.
    println!("{}", s.headline());
    println!(
        "run {}: validation VAMP-2 {} at the training lag; {} figures (SVG and PNG) and index.html in {}",
        s.run.display(),
        last.map_or("n/a".to_string(), |(v, _)| format!("{v:.4}")),
        s.figures.len(),
        args.out
            .clone()
            .unwrap_or_else(|| args.run.join("analysis"))
            .display()
    );
    Ok(())
}

/// `hiermd transform`.
#[derive(clap::Args, Debug, Clone)]
pub struct TransformArgs {
    /// The run folder.
    pub run: PathBuf,
    /// The dataset to transform (default: the run's own).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Its feature store, for runs trained on frozen features.
    #[arg(long)]
    pub features: Option<PathBuf>,
    /// The .npy file to write (a .json beside it gives columns and trajectory offsets).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace existing files at --out and its .json.
    #[arg(long)]
    pub force: bool,
}

/// Runs `hiermd transform`.
pub fn transform(args: &TransformArgs, device: &Device) -> Result<()> {
    let r = super::transform::transform_with(
        &args.run,
        args.data.as_deref(),
        args.features.as_deref(),
        &args.out,
        args.force,
        device,
        true,
    )?;
    println!(
        "wrote {} frames x {} columns ({}) to {}",
        r.offsets.last().copied().unwrap_or(0),
        r.columns.len(),
        r.columns.join(", "),
        r.out.display()
    );
    Ok(())
}
