//! `hiermd train`: VAMPnet or SPIB training on time-lagged pairs, with validation, early
//! stopping, per-epoch checkpoints and exact resumption.
//!
//! Reproducibility: the pair order of an epoch is drawn from (seed, epoch), dropout masks and
//! SPIB's samples from (seed, epoch, batch), so everything a step does is a function of the
//! weights and those numbers. A run killed at any point and resumed from its last checkpoint
//! redoes the unfinished epoch exactly and ends with the same weights, bit for bit (on the same
//! device), as a run that was never interrupted.

use super::checkpoint::Checkpoints;
use super::config::{ObjectiveKind, RunConfig};
use super::network::Network;
use super::run::{files, predict_frames, Run};
use crate::analysis::kmeans::KMeans;
use crate::objectives::spib::SpibLabels;
use crate::objectives::vamp::{vamp_loss, vamp_score};
use crate::optim::Optimizer;
use crate::output::{DirOutput, OutputKind};
use crate::store::{LaggedPairs, PairIndex};
use crate::tape::Tape;
use crate::testing::{splitmix64, Rng};
use crate::{Device, Tensor};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How `train` runs.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// Continue from the run folder's latest checkpoint (its saved configuration is used).
    pub resume: bool,
    /// Replace an existing run folder.
    pub force: bool,
    /// Progress lines on stderr.
    pub progress: bool,
    /// Tests: stop (as if killed) after this many optimiser steps of this invocation, before the
    /// epoch's checkpoint.
    pub abort_after_steps: Option<u64>,
    /// With `abort_after_steps`: end the process there (`abort`, no unwinding, no cleanup), as
    /// a kill would.
    pub abort_process: bool,
}

/// What the loop keeps between epochs (saved in every checkpoint).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct LoopState {
    /// Finished epochs.
    epoch: u64,
    best_score: Option<f64>,
    best_epoch: u64,
    bad_epochs: u64,
    stopped_early: bool,
    /// SPIB only.
    spib: Option<SpibState>,
    optimizer_restarts: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct SpibState {
    labels: SpibLabels,
    /// (state, trajectory, frame) of each representative.
    representatives: Representatives,
}

/// One epoch's numbers, as written to `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epoch (1-based).
    pub epoch: u64,
    /// Mean training loss over the batches.
    pub train_loss: f64,
    /// Mean training score over the batches (VAMP score; SPIB: -loss).
    pub train_score: f64,
    /// Validation score (VAMP: the score of all validation pairs at once; SPIB: -loss).
    pub validation_score: f64,
    /// Training pairs per second.
    pub samples_per_s: f64,
    /// Learning rate of the last step.
    pub lr: f64,
    /// Seconds for the epoch (training + validation).
    pub seconds: f64,
    /// SPIB: cross-entropy and KL of the training batches, active states, relabelled frames.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spib: Option<serde_json::Value>,
}

/// The end of a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    /// The run folder.
    pub run: PathBuf,
    /// Objective.
    pub objective: String,
    /// Epochs trained.
    pub epochs: u64,
    /// Epoch whose weights were kept.
    pub best_epoch: u64,
    /// Its validation score.
    pub best_validation_score: f64,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Training and validation pairs.
    pub pairs: (usize, usize),
    /// Lag in frames (of the first trajectory).
    pub lag_frames: usize,
    /// Seconds of this invocation.
    pub seconds: f64,
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("{} does not exist", p.display()))
}

/// Makes the data paths absolute so that the run folder can be analysed from anywhere.
fn resolve_paths(cfg: &mut RunConfig) -> Result<()> {
    cfg.data.dataset = absolute(&cfg.data.dataset).context("data.dataset")?;
    if let Some(p) = &cfg.data.features {
        cfg.data.features = Some(absolute(p).context("data.features")?);
    }
    if let Some(p) = &cfg.data.atom_model {
        cfg.data.atom_model = Some(absolute(p).context("data.atom_model")?);
    }
    if let Some(p) = &cfg.data.weights {
        cfg.data.weights = Some(absolute(p).context("data.weights")?);
    }
    if let Some(p) = &cfg.objective.init_labels_from {
        cfg.objective.init_labels_from = Some(absolute(p).context("objective.init_labels_from")?);
    }
    Ok(())
}

/// What a run reads (its configuration's paths, resolved), which its folder may not overlap.
fn run_inputs(cfg: &RunConfig) -> Vec<(&'static str, &Path)> {
    let d = &cfg.data;
    let mut v: Vec<(&'static str, &Path)> = vec![("data.dataset", &d.dataset)];
    let optional = [
        ("data.features", &d.features),
        ("data.atom_model", &d.atom_model),
        ("data.weights", &d.weights),
        (
            "objective.init_labels_from",
            &cfg.objective.init_labels_from,
        ),
    ];
    v.extend(
        optional
            .into_iter()
            .filter_map(|(k, p)| Some((k, p.as_deref()?))),
    );
    v
}

/// Per-frame weights, `[trajectory][frame]`, from `data.weights`.
fn frame_weights(cfg: &RunConfig, counts: &[usize]) -> Result<Option<Vec<Vec<f64>>>> {
    let Some(path) = &cfg.data.weights else {
        return Ok(None);
    };
    let (shape, w) = match crate::npy::read_f64(path) {
        Ok(x) => x,
        Err(_) => {
            let (s, w) = crate::npy::read_f32(path)
                .with_context(|| format!("data.weights {}", path.display()))?;
            (s, w.into_iter().map(f64::from).collect())
        }
    };
    let total: usize = counts.iter().sum();
    ensure!(
        w.len() == total,
        "data.weights {}: {} weights (shape {shape:?}) for {total} frames",
        path.display(),
        w.len()
    );
    if let Some(i) = w.iter().position(|x| !x.is_finite() || *x < 0.0) {
        bail!(
            "data.weights {}: weight {i} is {} (weights must be finite and >= 0)",
            path.display(),
            w[i]
        );
    }
    let mut out = Vec::new();
    let mut at = 0;
    for &n in counts {
        out.push(w[at..at + n].to_vec());
        at += n;
    }
    Ok(Some(out))
}

fn make_optimizer(cfg: &RunConfig, tape: &mut Tape) -> Result<Optimizer> {
    let ps = tape.params_mut();
    let (names, values, _) = ps.trainable();
    let values: Vec<&Tensor<f32>> = values.into_iter().map(|v| &*v).collect();
    Optimizer::named(cfg.optimizer.config()?, &names, &values)
}

fn epoch_order(pairs: &[PairIndex], seed: u64, epoch: u64) -> Vec<PairIndex> {
    let mut order = pairs.to_vec();
    let mut rng = Rng::new(splitmix64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// The SPIB labels at the start: k-means (seeded) on the state probabilities of the VAMP run
/// `objective.init_labels_from`, over every frame.
fn initial_spib_labels(cfg: &RunConfig, device: &Device, progress: bool) -> Result<SpibLabels> {
    let Some(dir) = &cfg.objective.init_labels_from else {
        bail!(
            "objective.init_labels_from is required for SPIB: the VAMP run whose outputs \
             k-means turns into the initial labels"
        );
    };
    let mut vamp = Run::open(dir, device).context("objective.init_labels_from")?;
    ensure!(
        vamp.net.objective == ObjectiveKind::Vamp,
        "objective.init_labels_from {}: not a VAMP run",
        dir.display()
    );
    ensure!(
        vamp.config.data.dataset == cfg.data.dataset,
        "objective.init_labels_from {}: trained on {}, this run uses {}",
        dir.display(),
        vamp.config.data.dataset.display(),
        cfg.data.dataset.display()
    );
    let chi = vamp.predict_all(progress)?;
    let k = vamp.prediction_width();
    let all: Vec<f64> = chi.iter().flatten().copied().collect();
    let n = all.len() / k;
    let km = KMeans::fit(&all, n, k, cfg.objective.spib.states, cfg.train.seed, 300)?;
    let labels: Vec<Vec<u32>> = chi.iter().map(|c| km.assign(c, c.len() / k)).collect();
    SpibLabels::new(labels, cfg.objective.spib.states)
}

/// (state, trajectory, frame) of each SPIB representative.
type Representatives = Vec<(usize, usize, usize)>;

/// Per trajectory: SPIB's encoder means `[frame * d + j]`, and the decoder's most likely
/// state of every frame.
type SpibEncodings = (Vec<Vec<f64>>, Vec<Vec<u32>>);

/// [`SpibEncodings`] of every frame (what relabelling and the choice of representatives need).
fn spib_encode_all(net: &Network, tape: &mut Tape, cfg: &RunConfig) -> Result<SpibEncodings> {
    let counts: Vec<usize> = net.ds.trajectories.iter().map(|t| t.frames()).collect();
    let pred = predict_frames(net, tape, &counts, cfg.train.eval_batch, false)?;
    let d = cfg.objective.spib.z_dim;
    let z: Vec<Vec<f64>> = pred
        .iter()
        .map(|rows| {
            rows.chunks_exact(d + 1)
                .flat_map(|r| r[..d].iter().copied())
                .collect()
        })
        .collect();
    let argmax: Vec<Vec<u32>> = pred
        .iter()
        .map(|rows| rows.chunks_exact(d + 1).map(|r| r[d] as u32).collect())
        .collect();
    Ok((z, argmax))
}

fn append_metrics(path: &Path, m: &EpochMetrics) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(m)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Keeps the first `epochs` lines of the metrics log (a resumed run rewrites the rest).
fn truncate_metrics(path: &Path, epochs: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<EpochMetrics>(l)
                .map(|m| m.epoch <= epochs)
                .unwrap_or(false)
        })
        .collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    crate::optim::write_atomic(path, out.as_bytes())
}

/// Validation: VAMP score of all validation pairs at once, or SPIB's mean loss (negated).
fn validate(
    cfg: &RunConfig,
    net: &Network,
    tape: &mut Tape,
    pairs: &[PairIndex],
    weights: &Option<Vec<Vec<f64>>>,
    spib: Option<&SpibState>,
) -> Result<f64> {
    if pairs.is_empty() {
        return Ok(f64::NAN);
    }
    tape.set_training(false);
    let bsz = (cfg.train.eval_batch / 2).max(1);
    let result = match (cfg.objective.kind, spib) {
        (ObjectiveKind::Vamp, _) => {
            let k = cfg.objective.outputs;
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for chunk in pairs.chunks(bsz) {
                let ft: Vec<_> = chunk
                    .iter()
                    .map(|p| (p.traj as usize, p.t as usize))
                    .collect();
                let fl: Vec<_> = chunk
                    .iter()
                    .map(|p| (p.traj as usize, (p.t + p.lag) as usize))
                    .collect();
                a.extend(super::run::predict_batch(net, tape, &ft)?);
                b.extend(super::run::predict_batch(net, tape, &fl)?);
            }
            let w = pair_weights(pairs, weights);
            vamp_score(
                &a,
                &b,
                pairs.len(),
                k,
                w.as_deref(),
                &cfg.objective.vamp,
                false,
            )?
            .score
        }
        (ObjectiveKind::Spib, Some(state)) => {
            let head = net.spib.as_ref().expect("SPIB network has a head");
            let (mut total, mut n) = (0.0, 0usize);
            for (i, chunk) in pairs.chunks(bsz).enumerate() {
                tape.reset();
                let (frames, reps, labels) = spib_batch(chunk, state);
                let out = net.encode(tape, &frames)?;
                let l = head.loss(
                    tape,
                    out.out,
                    &reps,
                    &labels,
                    splitmix64(cfg.train.seed ^ 0x5A5A_0000 ^ i as u64),
                )?;
                total += (l.ce + cfg.objective.spib.beta * l.kl) * chunk.len() as f64;
                n += chunk.len();
            }
            tape.reset();
            -total / n as f64
        }
        (ObjectiveKind::Spib, None) => bail!("SPIB validation without labels"),
    };
    tape.set_training(true);
    Ok(result)
}

fn pair_weights(pairs: &[PairIndex], weights: &Option<Vec<Vec<f64>>>) -> Option<Vec<f64>> {
    weights.as_ref().map(|w| {
        pairs
            .iter()
            .map(|p| w[p.traj as usize][p.t as usize])
            .collect()
    })
}

/// A SPIB batch: the pairs' first frames then one representative per active state; the
/// representatives' states; the labels of the lagged frames.
fn spib_batch(
    chunk: &[PairIndex],
    state: &SpibState,
) -> (Vec<(usize, usize)>, Vec<usize>, Vec<u32>) {
    let mut frames: Vec<(usize, usize)> = chunk
        .iter()
        .map(|p| (p.traj as usize, p.t as usize))
        .collect();
    let mut reps = Vec::new();
    for &(s, t, f) in &state.representatives {
        frames.push((t, f));
        reps.push(s);
    }
    let labels = chunk
        .iter()
        .map(|p| state.labels.labels[p.traj as usize][(p.t + p.lag) as usize])
        .collect();
    (frames, reps, labels)
}

/// Trains the run described by `cfg` into `run_dir` (with `opts.resume`, the configuration
/// saved there is used instead and training continues from the latest checkpoint).
pub fn train(
    cfg: &RunConfig,
    run_dir: &Path,
    device: &Device,
    opts: &TrainOptions,
) -> Result<TrainSummary> {
    let started = Instant::now();
    let mut cfg = cfg.clone();
    // Where the run is written (issue 16): a new run in place (a killed one resumes there); a
    // run replacing an old one (--force) in a temporary folder beside it, swapped in at the end,
    // so that the old run stays whole until the new one is complete.
    let mut replacement: Option<DirOutput> = None;
    if opts.resume {
        let config_path = run_dir.join(files::CONFIG);
        let text = std::fs::read_to_string(&config_path).with_context(|| {
            format!(
                "--resume: {} is not a run folder (no {})",
                run_dir.display(),
                files::CONFIG
            )
        })?;
        cfg = RunConfig::from_toml_with(&text, &[])
            .with_context(|| format!("in {}", config_path.display()))?;
        // Leftovers of killed processes: the run's files are written through temporaries.
        for dir in [run_dir.to_path_buf(), run_dir.join("checkpoints")] {
            crate::output::clean_stale(&dir);
        }
    } else {
        resolve_paths(&mut cfg)?;
        // Never over an input; an existing folder only with --force, and only a run.
        let target = DirOutput::check(run_dir, OutputKind::Run, opts.force, &run_inputs(&cfg))?;
        if target.replaces() {
            replacement = Some(target);
        }
    }
    let work_dir = match &replacement {
        Some(r) => r.staging().to_path_buf(),
        None => run_dir.to_path_buf(),
    };

    let (net, ps) = Network::build(&cfg, device)?;
    let ds = net.ds.clone();
    let lag = cfg.data.lag()?;
    let pairs = LaggedPairs::new(&ds, lag, &cfg.data.split())?;
    let stride = cfg.data.stride;
    let train_pairs: Vec<PairIndex> = pairs.train.iter().step_by(stride).copied().collect();
    let val_pairs: Vec<PairIndex> = pairs.validation.iter().step_by(stride).copied().collect();
    ensure!(
        train_pairs.len() >= 2,
        "only {} training pairs: lower data.lag or data.stride",
        train_pairs.len()
    );
    let counts: Vec<usize> = ds.trajectories.iter().map(|t| t.frames()).collect();
    let weights = frame_weights(&cfg, &counts)?;
    let checkpoints = Checkpoints::new(&work_dir, cfg.train.keep_checkpoints);
    let metrics_path = work_dir.join(files::METRICS);
    let best_path = work_dir.join(files::BEST);

    let mut tape = Tape::new(ps, cfg.train.seed);
    let mut opt = make_optimizer(&cfg, &mut tape)?;
    let mut state = LoopState::default();
    let resumed = if opts.resume {
        checkpoints.latest()?
    } else {
        None
    };
    if let Some((dir, epoch)) = &resumed {
        let value = Checkpoints::load(dir, tape.params_mut(), &mut opt)?;
        state = serde_json::from_value(value)
            .with_context(|| format!("{}: run state", dir.display()))?;
        ensure!(
            state.epoch == *epoch,
            "{}: the state says epoch {}",
            dir.display(),
            state.epoch
        );
        truncate_metrics(&metrics_path, *epoch)?;
        if opts.progress {
            eprintln!("resuming {} after epoch {epoch}", run_dir.display());
        }
    } else {
        if opts.resume && opts.progress {
            eprintln!(
                "no checkpoint in {}: starting from the beginning",
                run_dir.display()
            );
        }
        truncate_metrics(&metrics_path, 0)?;
        if cfg.objective.kind == ObjectiveKind::Spib {
            let labels = initial_spib_labels(&cfg, device, opts.progress)?;
            let (z, _) = spib_encode_all(&net, &mut tape, &cfg)?;
            let representatives = labels.representatives(&z, cfg.objective.spib.z_dim);
            state.spib = Some(SpibState {
                labels,
                representatives,
            });
        }
    }
    let lag_frames = pairs.lag_frames.first().copied().unwrap_or(0);
    if opts.progress {
        eprintln!(
            "training {} on {} ({}), lag {lag_frames} frames: {} training / {} validation pairs, {} parameters, device {}",
            match cfg.objective.kind {
                ObjectiveKind::Vamp => "a VAMPnet",
                ObjectiveKind::Spib => "SPIB",
            },
            ds.dir().display(),
            if net.end_to_end() { "end to end from coordinates" } else { "frozen features" },
            train_pairs.len(),
            val_pairs.len(),
            tape.params().numel(),
            device.name()
        );
    }

    if !opts.resume {
        // The run folder appears only now, with the configuration and the data checked
        // (issue 16): a mistake found above leaves nothing to clean up.
        match &mut replacement {
            Some(r) => {
                r.begin()?;
            }
            None => std::fs::create_dir_all(run_dir)
                .with_context(|| format!("creating {}", run_dir.display()))?,
        }
        crate::output::write_atomic(&work_dir.join(files::CONFIG), cfg.to_toml()?.as_bytes())?;
    }

    let mut steps_this_run = 0u64;
    while state.epoch < cfg.train.epochs && !state.stopped_early {
        let epoch = state.epoch + 1;
        let t0 = Instant::now();
        let order = epoch_order(&train_pairs, cfg.train.seed, epoch);
        let mut batches: Vec<&[PairIndex]> = order.chunks(cfg.train.batch).collect();
        // A last batch of one pair has no covariance: it joins the previous one.
        if batches.len() > 1 && batches.last().is_some_and(|b| b.len() < 2) {
            batches.pop();
        }
        if let Some(m) = cfg.train.max_batches {
            batches.truncate(m.max(1));
        }
        let (mut loss_sum, mut score_sum, mut ce_sum, mut kl_sum) = (0.0, 0.0, 0.0, 0.0);
        let mut samples = 0usize;
        let mut lr = 0.0;
        tape.set_training(true);
        for (b, chunk) in batches.iter().enumerate() {
            tape.reset();
            tape.set_step((epoch << 32) | b as u64);
            tape.params_mut().zero_grads()?;
            let loss = match cfg.objective.kind {
                ObjectiveKind::Vamp => {
                    let ft: Vec<_> = chunk
                        .iter()
                        .map(|p| (p.traj as usize, p.t as usize))
                        .collect();
                    let fl: Vec<_> = chunk
                        .iter()
                        .map(|p| (p.traj as usize, (p.t + p.lag) as usize))
                        .collect();
                    let a = net.encode(&mut tape, &ft)?.out;
                    let a = crate::nn::softmax(&mut tape, a, 1.0, None, 1)?;
                    let bv = net.encode(&mut tape, &fl)?.out;
                    let bv = crate::nn::softmax(&mut tape, bv, 1.0, None, 1)?;
                    let w = pair_weights(chunk, &weights);
                    let (loss, res) =
                        vamp_loss(&mut tape, a, bv, w.as_deref(), &cfg.objective.vamp)?;
                    loss_sum += -res.score;
                    score_sum += res.score;
                    loss
                }
                ObjectiveKind::Spib => {
                    let st = state.spib.as_ref().expect("SPIB state");
                    let head = net.spib.as_ref().expect("SPIB head");
                    let (frames, reps, labels) = spib_batch(chunk, st);
                    let out = net.encode(&mut tape, &frames)?;
                    let l = head.loss(
                        &mut tape,
                        out.out,
                        &reps,
                        &labels,
                        splitmix64(cfg.train.seed ^ (epoch << 32) ^ b as u64),
                    )?;
                    let total = l.ce + cfg.objective.spib.beta * l.kl;
                    loss_sum += total;
                    score_sum += -total;
                    ce_sum += l.ce;
                    kl_sum += l.kl;
                    l.loss
                }
            };
            let one = Tensor::from_slice(tape.device(), tape.shape(loss), &[1.0f32])?;
            tape.backward(loss, one)?;
            let (_, mut values, grads) = tape.params_mut().trainable();
            let report = opt
                .step(&mut values, &grads)
                .with_context(|| format!("epoch {epoch}, batch {b}"))?;
            lr = report.lr;
            samples += chunk.len();
            steps_this_run += 1;
            if opts.progress && (b % 10 == 9 || b + 1 == batches.len()) {
                eprint!(
                    "\repoch {epoch}: batch {}/{} loss {:.5} ({:.0} pairs/s)   ",
                    b + 1,
                    batches.len(),
                    loss_sum / (b + 1) as f64,
                    samples as f64 / t0.elapsed().as_secs_f64().max(1e-9)
                );
            }
            if opts.abort_after_steps == Some(steps_this_run) {
                if opts.abort_process {
                    eprintln!("\naborting after {steps_this_run} steps (fault hook)");
                    std::process::abort();
                }
                bail!("aborted after {steps_this_run} steps (test hook)");
            }
        }
        let train_secs = t0.elapsed().as_secs_f64();
        tape.reset();
        let nb = batches.len() as f64;
        let val = validate(
            &cfg,
            &net,
            &mut tape,
            &val_pairs,
            &weights,
            state.spib.as_ref(),
        )?;
        state.epoch = epoch;
        // Early stopping on the validation score (the training score when nothing validates).
        let watched = if val.is_finite() { val } else { score_sum / nb };
        if state.best_score.is_none_or(|b| watched > b) {
            state.best_score = Some(watched);
            state.best_epoch = epoch;
            state.bad_epochs = 0;
            // Sealed: the file records its own XXH3 (issue 16).
            crate::store::verify::save_params_sealed(
                tape.params(),
                &best_path,
                &std::collections::HashMap::from([("epoch".to_string(), epoch.to_string())]),
            )?;
        } else {
            state.bad_epochs += 1;
            if cfg.train.patience > 0 && state.bad_epochs >= cfg.train.patience {
                state.stopped_early = true;
            }
        }
        let mut spib_metrics = None;
        if cfg.objective.kind == ObjectiveKind::Spib {
            let mut st = state.spib.take().expect("SPIB state");
            let mut relabelled = serde_json::Value::Null;
            if st.labels.observe(loss_sum / nb, &cfg.objective.spib) {
                // One pass over every frame gives both the new labels and, with them, the new
                // representatives (the weights do not change in between).
                let (z, argmax) = spib_encode_all(&net, &mut tape, &cfg)?;
                let report = st.labels.relabel(argmax)?;
                st.representatives = st.labels.representatives(&z, cfg.objective.spib.z_dim);
                // SPIB's restart: equal prior weights over the new states, fresh moments.
                net.spib
                    .as_ref()
                    .expect("SPIB head")
                    .reset_prior(tape.params_mut())?;
                opt = make_optimizer(&cfg, &mut tape)?;
                state.optimizer_restarts += 1;
                // The labels changed: scores before and after are not comparable.
                state.best_score = None;
                state.bad_epochs = 0;
                state.stopped_early = false;
                relabelled = serde_json::to_value(&report)?;
            }
            spib_metrics = Some(serde_json::json!({
                "ce": ce_sum / nb,
                "kl": kl_sum / nb,
                "active_states": st.labels.active.iter().filter(|a| **a).count(),
                "refinements": st.labels.refinements,
                "relabel": relabelled,
            }));
            state.spib = Some(st);
        }
        let m = EpochMetrics {
            epoch,
            train_loss: loss_sum / nb,
            train_score: score_sum / nb,
            validation_score: val,
            samples_per_s: samples as f64 / train_secs.max(1e-9),
            lr,
            seconds: t0.elapsed().as_secs_f64(),
            spib: spib_metrics,
        };
        if opts.progress {
            eprintln!(
                "\repoch {epoch}/{}: loss {:.5}  train score {:.5}  validation score {:.5}  {:.0} pairs/s  {:.1} s{}",
                cfg.train.epochs,
                m.train_loss,
                m.train_score,
                m.validation_score,
                m.samples_per_s,
                m.seconds,
                if state.stopped_early { "  (early stop)" } else { "" }
            );
        }
        append_metrics(&metrics_path, &m)?;
        checkpoints.save(epoch, tape.params(), &opt, &serde_json::to_value(&state)?)?;
    }

    // The best weights become the model.
    if best_path.exists() {
        // A damaged best.safetensors must not become the model (issue 16).
        crate::store::verify::check_model_file(&best_path)?;
        tape.params_mut().load(&best_path)?;
    }
    // One metadata entry: safetensors writes a map's entries in hash order, so two keys would
    // make the same weights two different files.
    let meta = std::collections::HashMap::from([(
        "hiermd.run".to_string(),
        serde_json::json!({"config": cfg.to_toml()?, "best_epoch": state.best_epoch}).to_string(),
    )]);
    crate::store::verify::save_params_sealed(tape.params(), &work_dir.join(files::MODEL), &meta)?;
    if let Some(st) = &state.spib {
        crate::optim::write_atomic(&work_dir.join(files::SPIB_STATE), &serde_json::to_vec(st)?)?;
    }
    let summary = TrainSummary {
        run: run_dir.to_path_buf(),
        objective: format!("{:?}", cfg.objective.kind).to_lowercase(),
        epochs: state.epoch,
        best_epoch: state.best_epoch,
        best_validation_score: state.best_score.unwrap_or(f64::NAN),
        stopped_early: state.stopped_early,
        pairs: (train_pairs.len(), val_pairs.len()),
        lag_frames,
        seconds: started.elapsed().as_secs_f64(),
    };
    crate::optim::write_atomic(
        &work_dir.join(files::SUMMARY),
        &serde_json::to_vec_pretty(&summary)?,
    )?;
    if let Some(r) = replacement {
        // Complete: the new run takes the old one's place (issue 16).
        r.commit()?;
    }
    Ok(summary)
}
