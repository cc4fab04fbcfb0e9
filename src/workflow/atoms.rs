//! The atom-stage commands: `hiermd init-model` (a model from a TOML config and a seed),
//! `hiermd featurize` (residue tokens of every frame into a feature store or `.npy` files) and
//! `hiermd pretrain` (denoising pretraining on the dataset's own trajectories, resumable).

use super::checkpoint::Checkpoints;
use crate::model::atom::{AtomInputs, AtomModel, AtomModelConfig};
use crate::optim::{OptimConfig, Optimizer};
use crate::output::{DirOutput, OutputKind};
use crate::progress::Progress;
use crate::store::{Dataset, FeatureDtype, FeatureSettings, FeatureWriter};
use crate::tape::{ParamId, ParamStore, Tape};
use crate::tensor::Tensor;
use crate::testing::{splitmix64, Rng};
use crate::traj::UnitCell;
use crate::Device;
use anyhow::{bail, ensure, Context, Result};
use half::f16;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Atoms per featurisation batch when `--batch` is not given: a few hundred MB of activations.
const BATCH_ATOMS: usize = 8192;
/// The most frames per default featurisation batch.
const MAX_DEFAULT_BATCH: usize = 512;

// -------------------------------------------------------------------------------- init-model --

/// Arguments of `hiermd init-model`.
#[derive(clap::Args, Debug, Clone)]
pub struct InitModelArgs {
    /// Model configuration (TOML: `reduce`, `neighbor_cutoff` and a `[backbone]` table); the
    /// defaults without it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Seed of the initialisation (overrides the configuration's `backbone.seed`).
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// The model file to write (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing file at --out.
    #[arg(long)]
    pub force: bool,
}

/// The model configuration of `--config` (defaults without), with `--seed` applied.
fn read_config(config: Option<&Path>, seed: Option<u64>) -> Result<AtomModelConfig> {
    let mut c = match config {
        Some(p) => {
            AtomModelConfig::from_file(p).with_context(|| format!("--config {}", p.display()))?
        }
        None => AtomModelConfig::default(),
    };
    if let Some(s) = seed {
        c.backbone.seed = s;
    }
    Ok(c)
}

/// Describes a model's shape in one line.
fn describe(c: &AtomModelConfig, params: usize) -> String {
    format!(
        "{:?} backbone, H = {}, {} layers, {} {:?} radial functions, cutoff {} A, neighbor cutoff {} A, {:?} \
         merge, seed {}: {params} parameters",
        c.backbone.kind,
        c.backbone.hidden,
        c.backbone.layers,
        c.backbone.rbf,
        c.backbone.rbf_kind,
        c.backbone.cutoff,
        c.cutoff(),
        c.reduce,
        c.backbone.seed
    )
}

/// Runs `hiermd init-model`.
pub fn init_model(args: &InitModelArgs, device: &Device) -> Result<()> {
    let config = read_config(args.config.as_deref(), args.seed)?;
    // Never over its configuration; an existing file only with --force (issue 16).
    let inputs: Vec<(&str, &Path)> = args
        .config
        .iter()
        .map(|c| ("configuration", c.as_path()))
        .collect();
    crate::output::check_file_output(&args.out, args.force, &inputs)?;
    let (model, ps) = AtomModel::create(config, device)?;
    model
        .save(&ps, &args.out)
        .with_context(|| format!("--out {}", args.out.display()))?;
    println!(
        "wrote atom model to {} ({})",
        args.out.display(),
        describe(model.config(), model.numel(&ps))
    );
    Ok(())
}

/// The model of `--model` (a saved one) or, without it, a fresh one from `--config`/`--seed`;
/// and a line saying which.
fn model_from_args(
    model: Option<&Path>,
    config: Option<&Path>,
    seed: Option<u64>,
    device: &Device,
) -> Result<(AtomModel, ParamStore, String)> {
    match model {
        Some(p) => {
            ensure!(
                config.is_none(),
                "--model and --config exclude each other: a saved model carries its configuration"
            );
            let (m, ps) =
                AtomModel::load(p, device).with_context(|| format!("--model {}", p.display()))?;
            let what = format!(
                "model {} ({})",
                p.display(),
                describe(m.config(), m.numel(&ps))
            );
            Ok((m, ps, what))
        }
        None => {
            let c = read_config(config, seed)?;
            let (m, ps) = AtomModel::create(c, device)?;
            let what = format!(
                "a freshly initialised model (no --model; {}{})",
                match config {
                    Some(p) => format!("config {}, ", p.display()),
                    None => "default config, ".to_string(),
                },
                describe(m.config(), m.numel(&ps))
            );
            Ok((m, ps, what))
        }
    }
}

/// Opens `--data` and checks it has frames.
fn open_dataset(dir: &Path) -> Result<Dataset> {
    let ds = Dataset::open(dir).with_context(|| format!("--data {}", dir.display()))?;
    let frames: usize = ds.trajectories.iter().map(|t| t.frames()).sum();
    ensure!(
        frames > 0,
        "--data {}: the dataset has no frames",
        dir.display()
    );
    Ok(ds)
}

/// Unit cells of frames `range` of trajectory `traj`: all of them, or none when the trajectory
/// has no boxes.
fn cells_of(ds: &Dataset, traj: usize, frames: &[usize]) -> Option<Vec<UnitCell>> {
    let t = &ds.trajectories[traj];
    frames.iter().map(|&i| t.unit_cell(i)).collect()
}

// --------------------------------------------------------------------------------- featurize --

/// Output format of `hiermd featurize`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureFormat {
    /// A memory-mapped feature store (what `hiermd train` reads).
    Store,
    /// One NumPy array per trajectory, `feat-NNNN.npy` `[frames, tokens, 4, H]` (rows s, v_x,
    /// v_y, v_z), with the C-alpha positions in `ca-NNNN.npy` `[frames, tokens, 3]` (f32).
    Npy,
}

/// Arguments of `hiermd featurize`.
#[derive(clap::Args, Debug, Clone)]
pub struct FeaturizeArgs {
    /// The dataset folder (from `hiermd import`).
    #[arg(long)]
    pub data: PathBuf,
    /// The atom model (from `hiermd init-model` or `hiermd pretrain`); without it a freshly
    /// initialised model from --config and --seed.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Model configuration (TOML) for a fresh model, when --model is not given.
    #[arg(long, conflicts_with = "model")]
    pub config: Option<PathBuf>,
    /// Seed of a fresh model, when --model is not given.
    #[arg(long, conflicts_with = "model", allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// The output: a feature store folder, or with `--format npy` a folder of .npy files.
    #[arg(long)]
    pub out: PathBuf,
    /// store or npy.
    #[arg(long, value_enum, default_value = "store")]
    pub format: FeatureFormat,
    /// Element type of the features: f32 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: FeatureDtype,
    /// Frames per batch (default: about 8192 atoms' worth, at most 512 frames).
    #[arg(long, allow_negative_numbers = true)]
    pub batch: Option<usize>,
    /// Replace an existing output.
    #[arg(long)]
    pub force: bool,
}

/// What featurisation produced: per trajectory, in order, batches of residue tokens.
struct Batch<'a> {
    traj: usize,
    /// Scalars `[n, R, H]`.
    s: &'a [f32],
    /// Vectors `[n, R, 3, H]`.
    v: &'a [f32],
    /// C-alpha positions `[n, R, 3]`.
    ca: &'a [f32],
}

/// Runs `model` over every frame of every trajectory in batches of `batch` frames (batches do
/// not span trajectories), handing each batch's tokens to `sink` in order. No gradient is
/// recorded: every parameter is frozen on the tape.
fn run_frames(
    model: &AtomModel,
    ps: ParamStore,
    inputs: &AtomInputs,
    ds: &Dataset,
    batch: usize,
    mut sink: impl FnMut(Batch<'_>) -> Result<()>,
) -> Result<()> {
    let mut ps = ps;
    for i in 0..ps.len() {
        ps.freeze(ParamId(i));
    }
    let mut tape = Tape::new(ps, 0);
    tape.set_training(false);
    for (t, traj) in ds.trajectories.iter().enumerate() {
        let n = traj.frames();
        let mut start = 0;
        while start < n {
            let end = (start + batch).min(n);
            let f = end - start;
            // Checked as read (issue 16): a NaN or 1e30 in the store is an error naming it.
            let pos = ds.checked_frames(t, start..end)?;
            let idx: Vec<usize> = (start..end).collect();
            let cells = cells_of(ds, t, &idx);
            tape.reset();
            let tok = model
                .tokens(&mut tape, inputs, pos, f, cells.as_deref())
                .with_context(|| format!("trajectory {t}, frames {start}..{end}"))?;
            let s = tape.value(tok.s).to_vec()?;
            let v = tape.value(tok.v).to_vec()?;
            sink(Batch {
                traj: t,
                s: &s,
                v: &v,
                ca: &tok.ca,
            })?;
            start = end;
        }
    }
    Ok(())
}

/// The default frames per batch for `atoms` atoms per frame.
fn default_batch(atoms: usize) -> usize {
    (BATCH_ATOMS / atoms.max(1)).clamp(1, MAX_DEFAULT_BATCH)
}

/// Writes one trajectory's `.npy` files: `[frames, R, 4, H]` features and `[frames, R, 3]`
/// C-alpha positions, streamed.
struct NpyTraj {
    feat: BufWriter<std::fs::File>,
    ca: BufWriter<std::fs::File>,
    frames: usize,
    written: usize,
}

/// The `.npy` output of featurize: files built in a temporary folder beside `--out`, renamed
/// into place when every trajectory is whole (a failed run leaves nothing at `--out`).
struct NpyOut {
    /// The output folder, checked at create and built in its temporary folder (issue 16).
    target: DirOutput,
    tokens: usize,
    hidden: usize,
    dtype: FeatureDtype,
    current: Option<(usize, NpyTraj)>,
    rows: Vec<f32>,
    bytes: u64,
}

impl NpyOut {
    fn create(
        out: &Path,
        force: bool,
        inputs: &[(&str, &Path)],
        tokens: usize,
        hidden: usize,
        dtype: FeatureDtype,
    ) -> Result<Self> {
        let mut target = DirOutput::check(out, OutputKind::NpyFeatures, force, inputs)?;
        target.begin()?;
        Ok(Self {
            target,
            tokens,
            hidden,
            dtype,
            current: None,
            rows: Vec::new(),
            bytes: 0,
        })
    }

    fn tmp(&self) -> &Path {
        self.target.staging()
    }

    fn open_traj(&self, traj: usize, frames: usize) -> Result<NpyTraj> {
        let (r, h) = (self.tokens, self.hidden);
        let create = |name: String| -> Result<BufWriter<std::fs::File>> {
            let p = self.tmp().join(name);
            let f = std::fs::File::create(&p)
                .with_context(|| format!("{}: cannot create", p.display()))?;
            Ok(BufWriter::with_capacity(1 << 20, f))
        };
        let mut feat = create(format!("feat-{traj:04}.npy"))?;
        let mut header = crate::npy::header(crate::npy::Dtype::F32, &[frames, r, 4, h]);
        if self.dtype == FeatureDtype::F16 {
            // '<f2' has the length of '<f4': the header keeps its padding (as
            // FeatureStore::write_npy does; npy.rs has no f16 type).
            let at = header
                .windows(5)
                .position(|w| w == b"'<f4'")
                .context("the npy header names its dtype")?;
            header[at..at + 5].copy_from_slice(b"'<f2'");
        }
        feat.write_all(&header)?;
        let mut ca = create(format!("ca-{traj:04}.npy"))?;
        ca.write_all(&crate::npy::header(crate::npy::Dtype::F32, &[frames, r, 3]))?;
        Ok(NpyTraj {
            feat,
            ca,
            frames,
            written: 0,
        })
    }

    fn close_current(&mut self) -> Result<()> {
        if let Some((t, cur)) = self.current.take() {
            ensure!(
                cur.written == cur.frames,
                "npy output: trajectory {t} got {} of its {} frames",
                cur.written,
                cur.frames
            );
            for w in [cur.feat, cur.ca] {
                let f = w.into_inner().map_err(|e| e.into_error())?;
                f.sync_all()?;
            }
        }
        Ok(())
    }

    fn append(&mut self, ds: &Dataset, b: &Batch<'_>) -> Result<()> {
        if self.current.as_ref().map(|c| c.0) != Some(b.traj) {
            self.close_current()?;
            let cur = self.open_traj(b.traj, ds.trajectories[b.traj].frames())?;
            self.current = Some((b.traj, cur));
        }
        let (r, h) = (self.tokens, self.hidden);
        let n = b.s.len() / (r * h);
        // Interleave to [n, R, 4, H]: row 0 = s, rows 1-3 = v's x, y, z.
        self.rows.clear();
        self.rows.reserve(n * r * 4 * h);
        for tok in 0..n * r {
            self.rows.extend_from_slice(&b.s[tok * h..(tok + 1) * h]);
            self.rows
                .extend_from_slice(&b.v[tok * 3 * h..(tok + 1) * 3 * h]);
        }
        let (t, cur) = self.current.as_mut().expect("opened above");
        let frame_of = |k: usize| cur.written + k / (r * 4 * h);
        if let Some(k) = self.rows.iter().position(|x| !x.is_finite()) {
            bail!(
                "npy output: trajectory {t}: frame {}: non-finite feature value {}",
                frame_of(k),
                self.rows[k]
            );
        }
        match self.dtype {
            FeatureDtype::F32 => {
                let bytes: &[u8] = bytemuck::cast_slice(&self.rows);
                cur.feat.write_all(bytes)?;
                self.bytes += bytes.len() as u64;
            }
            FeatureDtype::F16 => {
                let half: Vec<f16> = self.rows.iter().map(|&x| f16::from_f32(x)).collect();
                if let Some(k) = half.iter().position(|x| x.is_infinite()) {
                    bail!(
                        "npy output: trajectory {t}: frame {}: feature value {} overflows f16 \
                         (largest {}); use --dtype f32",
                        frame_of(k),
                        self.rows[k],
                        f16::MAX
                    );
                }
                let bytes: &[u8] = bytemuck::cast_slice(&half);
                cur.feat.write_all(bytes)?;
                self.bytes += bytes.len() as u64;
            }
        }
        cur.ca.write_all(bytemuck::cast_slice(b.ca))?;
        cur.written += n;
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        self.close_current()?;
        // Swapped in whole; an old output (with --force) stays until the new one is in.
        self.target.commit()
    }
}

/// Runs `hiermd featurize`.
pub fn featurize(args: &FeaturizeArgs, device: &Device) -> Result<()> {
    let start = Instant::now();
    // What featurize reads, which --out may not overlap (issue 16): checked before any work.
    let mut reads: Vec<(&str, &Path)> = vec![("dataset", &args.data)];
    reads.extend(args.model.as_deref().map(|m| ("model", m)));
    reads.extend(args.config.as_deref().map(|c| ("configuration", c)));
    crate::output::refuse_overlap(&args.out, &reads)?;
    let ds = open_dataset(&args.data)?;
    let (model, ps, what) = model_from_args(
        args.model.as_deref(),
        args.config.as_deref(),
        args.seed,
        device,
    )?;
    if let Some(b) = args.batch {
        ensure!(b > 0, "--batch must be at least 1 frame");
    }
    let batch = args.batch.unwrap_or_else(|| default_batch(ds.natoms()));
    let inputs =
        AtomInputs::new(&ds, device).with_context(|| format!("--data {}", args.data.display()))?;
    let (r, h) = (inputs.tokens(), model.hidden());
    let total: usize = ds.trajectories.iter().map(|t| t.frames()).sum();
    let frame_bytes = (r * 4 * h * args.dtype.size()) as u64;
    // Said before anything is written: features of long trajectories are large (8,000 frames
    // of 214 tokens at H = 32 are 0.9 GB in f32).
    let out_bytes = total as u64 * (frame_bytes + (r * 3 * 4) as u64);
    eprintln!(
        "featurize: {total} frames of {} atoms -> {r} tokens x 4 x {h} ({}), {batch} frames per \
         batch on {}, with {what}; {:.1} MB to write{}",
        inputs.atoms(),
        args.dtype,
        device.name(),
        out_bytes as f64 / 1e6,
        if args.dtype == FeatureDtype::F32 {
            " (--dtype f16 halves the features)"
        } else {
            ""
        }
    );
    let mut progress = Progress::new("featurize", Some(total), "frames", true);
    let mut done = 0usize;
    match args.format {
        FeatureFormat::Store => {
            let settings = FeatureSettings {
                channels: h,
                dtype: args.dtype,
                ca_positions: true,
                backbone: args.model.clone(),
                force: args.force,
                progress: false,
            };
            let mut w = FeatureWriter::create(&ds, &args.out, &settings)
                .with_context(|| format!("--out {}", args.out.display()))?;
            run_frames(&model, ps, &inputs, &ds, batch, |b| {
                w.append_frames(b.traj, b.s, b.v, Some(b.ca))?;
                done += b.s.len() / (r * h);
                progress.set(done, done as u64 * frame_bytes);
                Ok(())
            })?;
            w.finish()?;
        }
        FeatureFormat::Npy => {
            let mut out = NpyOut::create(&args.out, args.force, &reads, r, h, args.dtype)?;
            run_frames(&model, ps, &inputs, &ds, batch, |b| {
                out.append(&ds, &b)?;
                done += b.s.len() / (r * h);
                progress.set(done, out.bytes);
                Ok(())
            })?;
            out.finish()?;
        }
    }
    progress.finish();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "featurized {total} frames ({} trajectories, {r} tokens x 4 x {h} {}) in {secs:.2} s \
         ({:.1} frames/s) -> {} ({})",
        ds.trajectories.len(),
        args.dtype,
        total as f64 / secs.max(1e-9),
        args.out.display(),
        match args.format {
            FeatureFormat::Store => "feature store",
            FeatureFormat::Npy => "npy files",
        }
    );
    Ok(())
}

// ---------------------------------------------------------------------------------- pretrain --

/// Fault injection for the resumption tests: `hiermd pretrain` aborts (as a kill would: no
/// destructors, no final model) right after saving the checkpoint of this epoch. Never set it
/// outside tests.
pub const PRETRAIN_FAULT_ABORT_ENV: &str = "HIERMD_FAULT_ABORT_PRETRAIN_AFTER_EPOCH";

/// Arguments of `hiermd pretrain`.
#[derive(clap::Args, Debug, Clone)]
pub struct PretrainArgs {
    /// The dataset folder (from `hiermd import`).
    #[arg(long)]
    pub data: PathBuf,
    /// The run folder: checkpoints, metrics.jsonl, and the final model.safetensors.
    #[arg(long)]
    pub out: PathBuf,
    /// Start from this saved atom model.
    #[arg(long, conflicts_with = "config")]
    pub model: Option<PathBuf>,
    /// Start from a fresh model of this configuration (TOML; defaults without --model/--config).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Epochs in all (a resumed run continues up to this many).
    #[arg(long, default_value_t = 10, allow_negative_numbers = true)]
    pub epochs: u64,
    /// Frames per step [default: as many as fit 16,384 atoms, at most 8].
    #[arg(long, allow_negative_numbers = true)]
    pub batch: Option<usize>,
    /// Use every Nth frame of each trajectory (training and validation) [default: 1].
    #[arg(long, allow_negative_numbers = true)]
    pub stride: Option<usize>,
    /// At most this many training frames, evenly spaced over the (strided) data; validation
    /// frames are thinned in proportion [default: all].
    #[arg(long, allow_negative_numbers = true)]
    pub max_frames: Option<usize>,
    /// Stop after this many optimiser steps in all (the epoch in progress ends there, is
    /// checkpointed, and the model is written) [default: no limit].
    #[arg(long, allow_negative_numbers = true)]
    pub max_steps: Option<u64>,
    /// Learning rate of AdamW [default: 5e-4].
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Decoupled weight decay of AdamW [default: 1e-2].
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// Standard deviation of the Gaussian coordinate noise in Angstrom [default: 0.2].
    #[arg(long, allow_negative_numbers = true)]
    pub sigma: Option<f64>,
    /// Clip the global gradient norm to this value [default: no clipping].
    #[arg(long, allow_negative_numbers = true)]
    pub clip_norm: Option<f64>,
    /// Seed of the data order and the noise (and of a fresh model's initialisation) [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// Fraction of each trajectory, at its end, held out for validation [default: 0.2].
    #[arg(long, allow_negative_numbers = true)]
    pub val_fraction: Option<f64>,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    pub keep: usize,
    /// Continue from the latest checkpoint in --out (the run's settings are kept).
    #[arg(long)]
    pub resume: bool,
}

/// The settings a pretraining run keeps across resumption (in every checkpoint's state).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct PretrainSettings {
    batch: usize,
    lr: f64,
    weight_decay: f64,
    sigma: f64,
    clip_norm: Option<f64>,
    seed: u64,
    val_fraction: f64,
    /// Every stride-th frame (1 in runs written before the flag existed).
    #[serde(default = "one")]
    stride: usize,
    /// At most this many training frames.
    #[serde(default)]
    max_frames: Option<usize>,
}

fn one() -> usize {
    1
}

/// Atoms per pretraining batch the default batch aims at: frames of a large system are big
/// (memory grows with atoms x neighbours), so they come fewer per step.
pub const PRETRAIN_BATCH_ATOMS: usize = 16_384;

/// The default batch for `atoms` atoms a frame: as many frames as fit
/// [`PRETRAIN_BATCH_ATOMS`], at least 1 and at most 8.
pub fn default_pretrain_batch(atoms: usize) -> usize {
    (PRETRAIN_BATCH_ATOMS / atoms.max(1)).clamp(1, 8)
}

impl PretrainSettings {
    /// The settings of a new run; `atoms` sets the default batch, `model_seed` the default seed
    /// (a seed in the model's configuration file wins over the flag's default; only an explicit
    /// `--seed` overrides it).
    fn from_args(a: &PretrainArgs, atoms: usize, model_seed: u64) -> Self {
        Self {
            stride: a.stride.unwrap_or(1),
            max_frames: a.max_frames,
            batch: a.batch.unwrap_or_else(|| default_pretrain_batch(atoms)),
            lr: a.lr.unwrap_or(5e-4),
            weight_decay: a.weight_decay.unwrap_or(1e-2),
            sigma: a.sigma.unwrap_or(0.2),
            clip_norm: a.clip_norm,
            seed: a.seed.unwrap_or(model_seed),
            val_fraction: a.val_fraction.unwrap_or(0.2),
        }
    }

    fn validate(&self) -> Result<()> {
        ensure!(self.batch > 0, "--batch must be at least 1 frame");
        ensure!(self.stride > 0, "--stride must be at least 1 frame");
        ensure!(
            self.max_frames != Some(0),
            "--max-frames must be at least 1 frame"
        );
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "--lr {} must be positive",
            self.lr
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "--weight-decay {} must be non-negative",
            self.weight_decay
        );
        ensure!(
            self.sigma.is_finite() && self.sigma > 0.0,
            "--sigma {} must be a positive distance in Angstrom",
            self.sigma
        );
        if let Some(c) = self.clip_norm {
            ensure!(c.is_finite() && c > 0.0, "--clip-norm {c} must be positive");
        }
        ensure!(
            (0.0..1.0).contains(&self.val_fraction),
            "--val-fraction {} must be in [0, 1)",
            self.val_fraction
        );
        Ok(())
    }

    /// On resume: a flag given explicitly must agree with the run's setting.
    fn check_resumed(&self, a: &PretrainArgs) -> Result<()> {
        let clash = |flag: &str, given: String, run: String| -> Result<()> {
            bail!(
                "--{flag} {given} differs from the resumed run's {run}; a resumed run keeps its \
                 settings (start a new run to change them)"
            )
        };
        if let Some(b) = a.batch.filter(|&b| b != self.batch) {
            clash("batch", b.to_string(), self.batch.to_string())?;
        }
        if let Some(x) = a.lr.filter(|&x| x != self.lr) {
            clash("lr", x.to_string(), self.lr.to_string())?;
        }
        if let Some(x) = a.weight_decay.filter(|&x| x != self.weight_decay) {
            clash("weight-decay", x.to_string(), self.weight_decay.to_string())?;
        }
        if let Some(x) = a.sigma.filter(|&x| x != self.sigma) {
            clash("sigma", x.to_string(), self.sigma.to_string())?;
        }
        if a.clip_norm.is_some() && a.clip_norm != self.clip_norm {
            clash(
                "clip-norm",
                format!("{:?}", a.clip_norm),
                format!("{:?}", self.clip_norm),
            )?;
        }
        if let Some(x) = a.seed.filter(|&x| x != self.seed) {
            clash("seed", x.to_string(), self.seed.to_string())?;
        }
        if let Some(x) = a.val_fraction.filter(|&x| x != self.val_fraction) {
            clash("val-fraction", x.to_string(), self.val_fraction.to_string())?;
        }
        if let Some(x) = a.stride.filter(|&x| x != self.stride) {
            clash("stride", x.to_string(), self.stride.to_string())?;
        }
        if a.max_frames.is_some() && a.max_frames != self.max_frames {
            clash(
                "max-frames",
                format!("{:?}", a.max_frames),
                format!("{:?}", self.max_frames),
            )?;
        }
        Ok(())
    }
}

/// A seed for stream `stream` at (epoch, step) of a run seeded `seed`: a resumed run draws the
/// same numbers as an uninterrupted one.
fn stream_seed(seed: u64, stream: u64, epoch: u64, step: u64) -> u64 {
    splitmix64(splitmix64(splitmix64(seed ^ stream) ^ epoch) ^ step)
}
/// The streams of [`stream_seed`]: the training order, the training noise, the validation noise.
const STREAM_ORDER: u64 = 1;
const STREAM_NOISE: u64 = 2;
const STREAM_VAL: u64 = 3;

/// One denoising step's forward pass over `frames` (trajectory, frame): noisy positions, the
/// model's prediction of the normalised noise, the MSE over heavy-atom coordinates. Returns the
/// loss and, when `backward`, back-propagates it into the parameters' gradients.
#[allow(clippy::too_many_arguments)] // the model, its inputs, the data, the noise and the mode
fn denoise_step(
    model: &AtomModel,
    tape: &mut Tape,
    inputs: &AtomInputs,
    ds: &Dataset,
    frames: &[(usize, usize)],
    sigma: f64,
    noise_seed: u64,
    backward: bool,
) -> Result<f64> {
    let a = inputs.atoms();
    let b = frames.len();
    let heavy = inputs.heavy();
    let mut rng = Rng::new(noise_seed);
    let mut noisy = Vec::with_capacity(b * a * 3);
    let mut eps = vec![0f32; b * a * 3];
    for (k, &(t, i)) in frames.iter().enumerate() {
        // Checked: a corrupt stored frame is an error naming file, frame and atom, not a NaN loss.
        let x = ds.checked_frame(t, i)?;
        for j in 0..a {
            for c in 0..3 {
                let e = if heavy[j] { rng.normal() } else { 0.0 };
                eps[(k * a + j) * 3 + c] = e as f32;
                noisy.push((x[j * 3 + c] as f64 + sigma * e) as f32);
            }
        }
    }
    let cells: Option<Vec<UnitCell>> = {
        let cs: Vec<Option<UnitCell>> = frames
            .iter()
            .map(|&(t, i)| ds.trajectories[t].unit_cell(i))
            .collect();
        match cs.iter().filter(|c| c.is_some()).count() {
            0 => None,
            n if n == cs.len() => Some(cs.into_iter().flatten().collect()),
            _ => bail!("a batch mixes frames with and without periodic boxes"),
        }
    };
    tape.reset();
    let (pos, nl) = model.graph(tape, inputs, &noisy, b, cells.as_deref(), false)?;
    let (s, v) = model.atoms(tape, inputs, pos, &nl)?;
    let pred = model.denoise(tape, s, v)?;
    let p = tape.value(pred).to_vec()?;
    let count = (heavy.iter().filter(|&&h| h).count() * 3 * b).max(1) as f64;
    let mut loss = 0f64;
    let mut grad = vec![0f32; p.len()];
    for (n, (&y, &e)) in p.iter().zip(&eps).enumerate() {
        if heavy[(n / 3) % a] {
            let d = y as f64 - e as f64;
            loss += d * d;
            grad[n] = (2.0 * d / count) as f32;
        }
    }
    let loss = loss / count;
    ensure!(loss.is_finite(), "the denoising loss is {loss}");
    if backward {
        let seed = Tensor::from_slice(tape.device(), &[p.len() / 3, 3], &grad)?;
        tape.backward(pred, seed)?;
    }
    Ok(loss)
}

/// `k` of `items`, evenly spaced from the first (all of them when `k` is at least their count).
fn evenly_spaced<T: Copy>(items: &[T], k: usize) -> Vec<T> {
    if k >= items.len() {
        return items.to_vec();
    }
    (0..k).map(|i| items[i * items.len() / k]).collect()
}

/// Rewrites `path` keeping the JSON lines whose `epoch` is at most `epoch` (a resumed run
/// continues the metrics of its checkpoint, not of epochs it is about to redo).
fn truncate_metrics(path: &Path, epoch: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("epoch").and_then(|e| e.as_u64()))
                .is_some_and(|e| e <= epoch)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::optim::write_atomic(path, kept.as_bytes())
}

/// Runs `hiermd pretrain`.
pub fn pretrain(args: &PretrainArgs, device: &Device) -> Result<()> {
    // What pretrain reads, which --out may not overlap (issue 16).
    let mut reads: Vec<(&str, &Path)> = vec![("dataset", &args.data)];
    reads.extend(args.model.as_deref().map(|m| ("model", m)));
    reads.extend(args.config.as_deref().map(|c| ("configuration", c)));
    crate::output::refuse_overlap(&args.out, &reads)?;
    // Leftovers of killed processes beside the run, in it and among its checkpoints.
    for dir in [
        crate::output::parent_of(&args.out),
        args.out.clone(),
        args.out.join("checkpoints"),
    ] {
        crate::output::clean_stale(&dir);
    }
    let ds = open_dataset(&args.data)?;
    let ckpts = Checkpoints::new(&args.out, args.keep);
    let latest = ckpts.latest()?;
    if latest.is_some() && !args.resume {
        bail!(
            "--out {}: holds a run with checkpoints; pass --resume to continue it or choose \
             another folder",
            args.out.display()
        );
    }
    let resumed = match (&latest, args.resume) {
        (Some((dir, epoch)), true) => {
            let state = Checkpoints::state(dir)?;
            let config: AtomModelConfig = serde_json::from_value(state["model"].clone())
                .with_context(|| format!("{}: the model configuration", dir.display()))?;
            let settings: PretrainSettings = serde_json::from_value(state["settings"].clone())
                .with_context(|| format!("{}: the run settings", dir.display()))?;
            ensure!(
                args.model.is_none() && args.config.is_none(),
                "--resume continues the run's own model: drop --model/--config"
            );
            settings.check_resumed(args)?;
            Some((dir.clone(), *epoch, config, settings))
        }
        (None, true) => {
            eprintln!(
                "pretrain: no checkpoint in {} to resume; starting a new run",
                args.out.display()
            );
            None
        }
        _ => None,
    };
    if resumed.is_none() {
        // A new run writes into --out over time (resumable), so --out must be new, empty, or a
        // pretraining run of its own holding nothing else (issue 16).
        crate::output::check_in_place(&args.out, OutputKind::PretrainRun, &reads)
            .with_context(|| format!("--out {}", args.out.display()))?;
    }
    if let Some(0) = args.max_steps {
        bail!("--max-steps must be at least 1 step");
    }
    let (model, ps, what) = match &resumed {
        Some((_, epoch, config, _)) => {
            let (m, ps) = AtomModel::create(config.clone(), device)?;
            let what = format!(
                "the run's model from checkpoint epoch {epoch} ({})",
                describe(m.config(), m.numel(&ps))
            );
            (m, ps, what)
        }
        None => model_from_args(
            args.model.as_deref(),
            args.config.as_deref(),
            args.seed,
            device,
        )?,
    };
    let inputs =
        AtomInputs::new(&ds, device).with_context(|| format!("--data {}", args.data.display()))?;
    ensure!(
        inputs.heavy().iter().any(|&h| h),
        "--data {}: the dataset has no heavy atoms to perturb",
        args.data.display()
    );
    let settings = match &resumed {
        Some((_, _, _, s)) => s.clone(),
        None => PretrainSettings::from_args(args, inputs.atoms(), model.config().backbone.seed),
    };
    settings.validate()?;

    // The split by time: the last val_fraction of each (strided) trajectory is held out.
    let mut train = Vec::new();
    let mut val = Vec::new();
    for (t, traj) in ds.trajectories.iter().enumerate() {
        let frames: Vec<usize> = (0..traj.frames()).step_by(settings.stride).collect();
        let n = frames.len();
        let nv = ((n as f64 * settings.val_fraction).round() as usize).min(n.saturating_sub(1));
        train.extend(frames[..n - nv].iter().map(|&i| (t, i)));
        val.extend(frames[n - nv..].iter().map(|&i| (t, i)));
    }
    if let Some(max) = settings.max_frames {
        // Evenly spaced subsets keep the whole time range; validation shrinks in proportion.
        let keep_val = (val.len() as f64 * max as f64 / train.len().max(1) as f64).ceil() as usize;
        train = evenly_spaced(&train, max);
        val = evenly_spaced(&val, keep_val);
    }
    ensure!(
        !train.is_empty(),
        "--data {}: no training frames",
        args.data.display()
    );

    let mut optim = OptimConfig::adamw(settings.lr, settings.weight_decay);
    optim.clip_norm = settings.clip_norm;
    let mut tape = Tape::new(ps, settings.seed);
    let mut opt = {
        let (names, values, _) = tape.params_mut().trainable();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let values: Vec<&Tensor<f32>> = values.into_iter().map(|v| &*v).collect();
        Optimizer::named(optim, &names, &values)?
    };
    let mut first_epoch = 1;
    if let Some((dir, epoch, _, _)) = &resumed {
        Checkpoints::load(dir, tape.params_mut(), &mut opt)?;
        first_epoch = epoch + 1;
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out {}: cannot create", args.out.display()))?;
    let metrics_path = args.out.join("metrics.jsonl");
    match &resumed {
        Some((_, epoch, _, _)) => truncate_metrics(&metrics_path, *epoch)?,
        None => {
            let _ = std::fs::remove_file(&metrics_path);
        }
    }
    std::fs::write(args.out.join("model.toml"), model.config().to_toml()?)
        .with_context(|| format!("--out {}: cannot write model.toml", args.out.display()))?;
    eprintln!(
        "pretrain: {} training and {} validation frames{} of {} atoms on {}, {what}; sigma {} A, \
         batch {} frames ({} atoms{}), AdamW lr {} weight decay {}{}{}",
        train.len(),
        val.len(),
        match (settings.stride, settings.max_frames) {
            (1, None) => String::new(),
            (s, m) => format!(
                " (stride {s}{})",
                m.map(|m| format!(", at most {m} for training"))
                    .unwrap_or_default()
            ),
        },
        inputs.atoms(),
        device.name(),
        settings.sigma,
        settings.batch,
        settings.batch * inputs.atoms(),
        if args.batch.is_none() && resumed.is_none() {
            format!("; --batch to choose, the default fits {PRETRAIN_BATCH_ATOMS} atoms")
        } else {
            String::new()
        },
        settings.lr,
        settings.weight_decay,
        settings
            .clip_norm
            .map(|c| format!(", clip norm {c}"))
            .unwrap_or_default(),
        args.max_steps
            .map(|m| format!(", at most {m} steps"))
            .unwrap_or_default()
    );
    if first_epoch > args.epochs {
        eprintln!(
            "pretrain: the run already has {} epochs (--epochs {})",
            first_epoch - 1,
            args.epochs
        );
    }

    let abort_after: Option<u64> = std::env::var(PRETRAIN_FAULT_ABORT_ENV)
        .ok()
        .and_then(|v| v.parse().ok());
    for epoch in first_epoch..=args.epochs {
        let t0 = Instant::now();
        let mut order = train.clone();
        let mut rng = Rng::new(stream_seed(settings.seed, STREAM_ORDER, epoch, 0));
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut progress = Progress::new(
            &format!("epoch {epoch}/{}", args.epochs),
            Some(order.len()),
            "frames",
            true,
        );
        let (mut sum, mut grad_norm) = (0f64, 0f64);
        let (mut steps, mut seen) = (0usize, 0usize);
        for (step, chunk) in order.chunks(settings.batch).enumerate() {
            if args.max_steps.is_some_and(|m| opt.steps() >= m) {
                break;
            }
            let seed = stream_seed(settings.seed, STREAM_NOISE, epoch, step as u64);
            tape.params_mut().zero_grads()?;
            let loss = denoise_step(
                &model,
                &mut tape,
                &inputs,
                &ds,
                chunk,
                settings.sigma,
                seed,
                true,
            )
            .with_context(|| format!("epoch {epoch}, step {}", step + 1))?;
            let report = {
                let (_, mut values, grads) = tape.params_mut().trainable();
                opt.step(&mut values, &grads)
                    .with_context(|| format!("epoch {epoch}, step {}", step + 1))?
            };
            sum += loss * chunk.len() as f64;
            grad_norm += report.grad_norm;
            steps += 1;
            seen += chunk.len();
            progress.set((step * settings.batch + chunk.len()).min(order.len()), 0);
        }
        tape.reset();
        if steps == 0 {
            // --max-steps was reached by a resumed run before this epoch.
            break;
        }
        let train_loss = sum / seen as f64;
        let train_secs = t0.elapsed().as_secs_f64();
        let val_loss = if val.is_empty() {
            None
        } else {
            let mut s = 0f64;
            for (k, chunk) in val.chunks(settings.batch).enumerate() {
                let seed = stream_seed(settings.seed, STREAM_VAL, 0, k as u64);
                s += denoise_step(
                    &model,
                    &mut tape,
                    &inputs,
                    &ds,
                    chunk,
                    settings.sigma,
                    seed,
                    false,
                )? * chunk.len() as f64;
            }
            tape.reset();
            Some(s / val.len() as f64)
        };
        let fps = seen as f64 / train_secs.max(1e-9);
        let state = serde_json::json!({
            "kind": "hiermd.pretrain",
            "epoch": epoch,
            "model": model.config(),
            "settings": settings,
            "train_loss": train_loss,
            "val_loss": val_loss,
        });
        let line = serde_json::json!({
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "frames_per_s": fps,
            "seconds": t0.elapsed().as_secs_f64(),
            "steps": opt.steps(),
            "mean_grad_norm": grad_norm / steps.max(1) as f64,
            "lr": settings.lr,
        });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("{}: cannot open", metrics_path.display()))?;
        writeln!(f, "{line}")
            .with_context(|| format!("{}: write error", metrics_path.display()))?;
        drop(f);
        // The metrics line goes out before the checkpoint: a run killed in between resumes from
        // the previous checkpoint and drops this line (truncate_metrics), never loses one.
        ckpts
            .save(epoch, tape.params(), &opt, &state)
            .with_context(|| format!("epoch {epoch}: saving the checkpoint"))?;
        if abort_after == Some(epoch) {
            std::process::abort();
        }
        eprintln!(
            "\repoch {epoch}/{}: train loss {train_loss:.5}, val loss {}, {fps:.1} frames/s, \
             {:.2} s\x1b[K",
            args.epochs,
            val_loss.map_or("-".to_string(), |v| format!("{v:.5}")),
            t0.elapsed().as_secs_f64()
        );
        if let Some(m) = args.max_steps.filter(|&m| opt.steps() >= m) {
            eprintln!("pretrain: stopped after {m} steps (--max-steps), in epoch {epoch}");
            break;
        }
    }
    let out = args.out.join("model.safetensors");
    model.save(tape.params(), &out)?;
    println!(
        "pretrained atom model ({} epochs) written to {}",
        args.epochs.max(first_epoch - 1),
        out.display()
    );
    Ok(())
}
