//! `hiermd analyze RUN`: validation VAMP-2 vs lag time, singular values, implied timescales vs
//! lag time, state assignments, an MSM on the learned states (transition matrix, stationary
//! distribution, mean first passage times), the Chapman-Kolmogorov test, state populations over
//! time, a state map and attention maps; each a picture (SVG and PNG) plus one `analysis.json`
//! and an `index.html` that shows every picture with a caption.
//!
//! A VAMPnet's states are checked, not assumed ([`crate::analysis::states`]): the argmax of its
//! outputs is used only when it passes the consistency checks ([`crate::analysis::checks`]:
//! every state holds enough frames, the MSM's slowest implied timescale agrees with the VAMP
//! singular-value timescale, the Chapman-Kolmogorov test passes); otherwise the states come from
//! seeded k-means on the VAMP singular functions, as many as the singular-value gap suggests.
//! Every failed check of the states used is printed as `WARNING: <check>: <numbers>` on stderr
//! and stored in `analysis.json`, and the headline always gives both timescales.

use super::config::{ObjectiveKind, SplitKind};
use super::run::{files, Run};
use crate::analysis::checks::{check_states, Consistency};
use crate::analysis::msm::{ck_test, implied_timescales_lenient, Msm};
use crate::analysis::states::{
    assign_checked_states, assign_vamp_states, fit_vamp, Rejected, StateOptions,
};
use crate::model::token_labels;
use crate::objectives::vamp::{vamp_score, VampModel, VampOptions, VampScore};
use crate::output::{DirOutput, OutputKind};
use crate::plot::{category_color, Heatmap, LinePlot, ScatterPlot, Series};
use crate::store::{Lag, LaggedPairs, PairIndex, Split};
use crate::Device;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What `analyze` computes.
#[derive(Clone, Debug)]
pub struct AnalyzeOptions {
    /// Lag times in frames for the scans (empty: a default ladder up to 10x the training lag).
    pub lags: Vec<usize>,
    /// Output folder (default RUN/analysis).
    pub out: Option<PathBuf>,
    /// Frames averaged in the attention maps.
    pub attention_frames: usize,
    /// Steps of the CK test (multiples of the lag).
    pub ck_steps: usize,
    /// Progress on stderr.
    pub progress: bool,
    /// VAMP runs: states by k-means on the VAMP singular functions even when the argmax of the
    /// outputs passes the checks.
    pub kmeans_states: bool,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        Self {
            lags: Vec::new(),
            out: None,
            attention_frames: 64,
            ck_steps: 5,
            progress: false,
            kmeans_states: false,
        }
    }
}

/// The numbers of an analysis (`analysis.json`).
#[derive(Clone, Debug, Serialize)]
pub struct AnalysisSummary {
    /// The run.
    pub run: PathBuf,
    /// "vamp" or "spib".
    pub objective: String,
    /// Time between frames in ps, when the dataset knows it.
    pub dt_ps: Option<f64>,
    /// The training lag in frames.
    pub lag_frames: usize,
    /// How frames got their states: "argmax" of the outputs (SPIB: of the decoder) or "kmeans"
    /// (k-means on the VAMP singular functions scaled by the singular values).
    pub state_assignment: String,
    /// The number of states the gap in the singular values suggests (VAMP runs).
    pub states_from_gap: usize,
    /// Assignments tried first and rejected, with their checks (the argmax, when it failed).
    pub rejected_assignments: Vec<Rejected>,
    /// The consistency checks of the states used (timescales in frames).
    pub state_checks: Consistency,
    /// One `WARNING: <check>: <numbers>` line per failed check (empty when all passed).
    pub warnings: Vec<String>,
    /// The slowest VAMP singular-value timescale `-lag / ln sigma_1` at the training lag, in
    /// `timescale_unit` (VAMP runs: of the outputs; SPIB runs: of the latent z).
    pub singular_value_timescale: f64,
    /// The one-line summary: both timescales, the states, and whether the checks passed.
    pub headline: String,
    /// Lags of the scans, frames.
    pub lags: Vec<usize>,
    /// Validation VAMP-2 of the network's outputs at each lag.
    pub validation_vamp2: Vec<f64>,
    /// Singular values of the outputs' Koopman matrix at the training lag (all frames).
    pub singular_values: Vec<f64>,
    /// Implied timescales (frames) from the VAMP singular values at each lag, `[lag][i]`.
    pub vamp_timescales: Vec<Vec<f64>>,
    /// Implied timescales (frames) of the MSM on the learned states at each lag, `[lag][i]`.
    pub msm_timescales: Vec<Vec<f64>>,
    /// The slowest MSM implied timescale at the training lag, in ps when dt is known (else
    /// frames). Read it with `singular_value_timescale` and `warnings`: from a degenerate
    /// partition it is meaningless.
    pub slowest_timescale: f64,
    /// Its unit.
    pub timescale_unit: String,
    /// The MSM at the training lag.
    pub msm: Msm,
    /// Mean first passage times between the MSM's states (frames).
    pub mfpt: Vec<Vec<f64>>,
    /// Frames in each state.
    pub state_counts: Vec<usize>,
    /// The Chapman-Kolmogorov test.
    pub ck_test: crate::analysis::msm::CkTest,
    /// Pictures written.
    pub figures: Vec<PathBuf>,
}

fn default_lags(lag: usize, frames: usize) -> Vec<usize> {
    let mut out = Vec::new();
    for f in [0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0] {
        let l = ((lag as f64) * f).round() as usize;
        if l >= 1 && l < frames / 4 && !out.contains(&l) {
            out.push(l);
        }
    }
    if out.is_empty() {
        out.push(lag.max(1));
    }
    out
}

/// One-hot rows of discrete states (SPIB runs score their states with VAMP this way).
fn one_hot(states: &[u32], k: usize) -> Vec<f64> {
    let mut out = vec![0.0; states.len() * k];
    for (i, &s) in states.iter().enumerate() {
        out[i * k + s as usize] = 1.0;
    }
    out
}

/// Gathers rows of `x` (`[traj][frame * w + j]`) for pairs: (at t, at t + lag).
fn pair_rows(x: &[Vec<f64>], w: usize, pairs: &[PairIndex]) -> (Vec<f64>, Vec<f64>) {
    let mut a = Vec::with_capacity(pairs.len() * w);
    let mut b = Vec::with_capacity(pairs.len() * w);
    for p in pairs {
        let t = p.t as usize;
        let l = (p.t + p.lag) as usize;
        a.extend_from_slice(&x[p.traj as usize][t * w..(t + 1) * w]);
        b.extend_from_slice(&x[p.traj as usize][l * w..(l + 1) * w]);
    }
    (a, b)
}

/// Analyses a run with the default state assignment and checks ([`StateOptions::default`], the
/// k-means forced by `opts.kmeans_states`); see [`analyze_with`].
pub fn analyze(run_dir: &Path, device: &Device, opts: &AnalyzeOptions) -> Result<AnalysisSummary> {
    analyze_with(run_dir, device, opts, &StateOptions::default())
}

/// Analyses a run; writes pictures (SVG and PNG), `analysis.json` and `index.html` into the
/// output folder. `states` sets the number of k-means states, the seed (default: the run's
/// training seed) and the thresholds of the consistency checks; `opts.ck_steps` overrides
/// `states.checks.ck_steps`, and `opts.kmeans_states` forces the k-means. Failed checks are
/// printed on stderr as `WARNING: ...` lines (always, whatever `opts.progress`).
pub fn analyze_with(
    run_dir: &Path,
    device: &Device,
    opts: &AnalyzeOptions,
    states: &StateOptions,
) -> Result<AnalysisSummary> {
    let mut run = Run::open(run_dir, device)?;
    let final_dir = opts.out.clone().unwrap_or_else(|| run_dir.join("analysis"));
    let ds = run.net.ds.clone();
    // The analysis is built beside its folder and swapped in whole: an earlier analysis is
    // replaced (it is hiermd's and can be made again), anything else is refused, and the run's
    // own files and the dataset are never written over (the default, RUN/analysis, is inside
    // the run but overlaps none of its files).
    let run_files: Vec<(&str, PathBuf)> = vec![
        ("run configuration", run_dir.join(files::CONFIG)),
        ("model", run_dir.join(files::MODEL)),
        ("best model", run_dir.join(files::BEST)),
        ("checkpoints", run_dir.join("checkpoints")),
        ("dataset", ds.dir().to_path_buf()),
    ];
    let inputs: Vec<(&str, &Path)> = run_files.iter().map(|(w, p)| (*w, p.as_path())).collect();
    let mut output = DirOutput::check(&final_dir, OutputKind::Analysis, true, &inputs)?;
    let out_dir = output.begin()?.to_path_buf();
    let cfg = run.config.clone();
    let dt = ds.manifest.time_step_ps;
    let counts: Vec<usize> = ds.trajectories.iter().map(|t| t.frames()).collect();
    let pairs0 = LaggedPairs::new(&ds, cfg.data.lag()?, &cfg.data.split())?;
    let lag = pairs0.lag_frames[0];
    let min_frames = *counts.iter().min().unwrap_or(&0);
    let lags = if opts.lags.is_empty() {
        default_lags(lag, min_frames)
    } else {
        opts.lags.clone()
    };
    let pred = run.predict_all(opts.progress)?;
    let w = run.prediction_width();
    let objective = cfg.objective.kind;
    // Discrete states, checked (see the module documentation). SPIB's states are its decoder's;
    // they are checked against the VAMP timescale of its latent z.
    let mut sopts = states.clone();
    sopts.force_kmeans |= opts.kmeans_states;
    sopts.checks.ck_steps = opts.ck_steps.max(1);
    let seed = sopts.seed.unwrap_or(cfg.train.seed);
    sopts.seed = Some(seed);
    let vopts = VampOptions {
        score: VampScore::Vamp2,
        ..cfg.objective.vamp
    };
    let assignment = match objective {
        ObjectiveKind::Vamp => {
            let k = cfg.objective.outputs;
            let all: Vec<PairIndex> = pairs0
                .train
                .iter()
                .chain(&pairs0.validation)
                .copied()
                .collect();
            let (a, b) = pair_rows(&pred, w, &all);
            let model = VampModel::fit(&a, &b, all.len(), w, None, &vopts)?;
            let asg = assign_vamp_states(&pred, k, lag, &model, &sopts)?;
            if opts.progress {
                for r in &asg.rejected {
                    eprintln!(
                        "analyze: the argmax of the outputs fails the checks ({}); states by k-means on the VAMP singular functions instead ({} states{})",
                        r.consistency.failed_names(),
                        asg.n_states,
                        if states.states.is_some() { ", as asked" } else { ", from the singular-value gap" }
                    );
                }
            }
            asg
        }
        ObjectiveKind::Spib => {
            let d = cfg.objective.spib.z_dim;
            let k = cfg.objective.spib.states;
            let st: Vec<Vec<u32>> = pred
                .iter()
                .map(|rows| rows.chunks_exact(d + 1).map(|r| r[d] as u32).collect())
                .collect();
            let z: Vec<Vec<f64>> = pred
                .iter()
                .map(|rows| {
                    rows.chunks_exact(d + 1)
                        .flat_map(|r| r[..d].iter().copied())
                        .collect()
                })
                .collect();
            match fit_vamp(&z, d, lag, &vopts) {
                // The decoder's states when they pass the checks, else k-means on the kinetic
                // map of z, as for a VAMPnet's outputs.
                Ok(model) => {
                    let candidate = (!sopts.force_kmeans).then_some((st, k));
                    let asg = assign_checked_states(candidate, &z, d, lag, &model, &sopts)?;
                    if opts.progress {
                        for r in &asg.rejected {
                            eprintln!(
                                "analyze: the SPIB decoder's states fail the checks ({}); states by k-means on the VAMP singular functions of z instead ({} states)",
                                r.consistency.failed_names(),
                                asg.n_states
                            );
                        }
                    }
                    asg
                }
                // No VAMP model of z (too few frames): the decoder's states, checked against
                // an unknown timescale.
                Err(_) => {
                    let consistency = check_states(&st, k, lag, f64::NAN, &sopts.checks);
                    crate::analysis::states::StateAssignment {
                        method: "argmax".into(),
                        states: st,
                        n_states: k,
                        gap_states: 1,
                        singular_values: Vec::new(),
                        consistency,
                        rejected: Vec::new(),
                    }
                }
            }
        }
    };
    let mut assignment = assignment;
    if let Some(d) = dt.filter(|&d| d != 1.0) {
        // The checks count frames; say the times in ps too.
        let c = &mut assignment.consistency;
        let (m, v) = (c.msm_timescale * d, c.singular_value_timescale * d);
        if let Some(check) = c.checks.iter_mut().find(|c| c.name == "timescales") {
            check.detail.push_str(&format!(
                " (MSM {} ps, singular values {} ps; 1 frame = {d} ps)",
                fmt_time(m),
                fmt_time(v)
            ));
        }
    }
    let states = assignment.states.clone();
    let k = assignment.n_states;
    let state_assignment = assignment.method.clone();
    let warnings = assignment.consistency.warnings();
    for w in &warnings {
        eprintln!("{w}");
    }
    let (scored, sw): (Vec<Vec<f64>>, usize) = match objective {
        ObjectiveKind::Vamp => (pred.clone(), w),
        ObjectiveKind::Spib => (states.iter().map(|s| one_hot(s, k)).collect(), k),
    };
    let mut figures = Vec::new();
    let to_time = |frames: f64| dt.map_or(frames, |d| frames * d);
    let unit = if dt.is_some() { "ps" } else { "frames" };

    // Validation VAMP-2 and VAMP timescales over lags.
    let mut val_scores = Vec::new();
    let mut vamp_ts = Vec::new();
    for &l in &lags {
        let split = match cfg.data.split {
            SplitKind::Time => Split::ByTime {
                train_fraction: cfg.data.train_fraction,
            },
            SplitKind::Trajectory => cfg.data.split(),
        };
        let p = LaggedPairs::new(&ds, Lag::Frames(l), &split)?;
        let v = if p.validation.len() >= 2 {
            let (a, b) = pair_rows(&scored, sw, &p.validation);
            vamp_score(&a, &b, p.validation.len(), sw, None, &vopts, false)?.score
        } else {
            f64::NAN
        };
        val_scores.push(v);
        let all: Vec<PairIndex> = p.train.iter().chain(&p.validation).copied().collect();
        let (a, b) = pair_rows(&scored, sw, &all);
        let m = VampModel::fit(&a, &b, all.len(), sw, None, &vopts)?;
        vamp_ts.push(m.timescales(l as f64));
    }
    let all0: Vec<PairIndex> = pairs0
        .train
        .iter()
        .chain(&pairs0.validation)
        .copied()
        .collect();
    let (a, b) = pair_rows(&scored, sw, &all0);
    let model0 = VampModel::fit(&a, &b, all0.len(), sw, None, &vopts)?;
    let singular_values = model0.singular_values().to_vec();

    // MSM on the learned states.
    let its = implied_timescales_lenient(&states, &lags, k, k.saturating_sub(1).max(1));
    let msm = Msm::estimate(&states, lag, k, true)
        .with_context(|| format!("MSM on the {state_assignment} states at lag {lag}"))?;
    let msm_ts = msm.timescales(msm.states.len().saturating_sub(1).max(1));
    let mfpt: Vec<Vec<f64>> = match msm.try_mfpt_matrix() {
        Ok(m) => (0..m.nrows())
            .map(|i| (0..m.ncols()).map(|j| m[(i, j)]).collect())
            .collect(),
        Err(_) => vec![vec![f64::NAN; msm.n_states()]; msm.n_states()],
    };
    // As many CK steps as can be estimated (a degenerate partition may have no counts at long
    // lags; the check says so).
    let ck = {
        let mut steps = opts.ck_steps.max(1);
        loop {
            match ck_test(&states, lag, k, steps, true) {
                Ok(ck) => break ck,
                Err(e) if steps <= 1 => return Err(e.context("Chapman-Kolmogorov test")),
                Err(_) => steps -= 1,
            }
        }
    };
    let mut state_counts = vec![0usize; k];
    for s in states.iter().flatten() {
        state_counts[*s as usize] += 1;
    }

    // Pictures.
    let lag_t: Vec<f64> = lags.iter().map(|&l| to_time(l as f64)).collect();
    {
        let p = LinePlot::new()
            .title("Validation VAMP-2 vs lag time")
            .x_label(format!("lag time ({unit})"))
            .y_label("VAMP-2")
            .series(Series::new("validation", &lag_t, &val_scores).markers(true));
        let path = out_dir.join("vamp2_vs_lag.svg");
        p.save_svg(&path)?;
        figures.push(path);
    }
    {
        let mut p = LinePlot::new()
            .title("Implied timescales")
            .x_label(format!("lag time ({unit})"))
            .y_label(format!("timescale ({unit})"))
            .log_y(true);
        let n_show = 3.min(k.saturating_sub(1)).max(1);
        for i in 0..n_show {
            let y: Vec<f64> = its
                .timescales
                .iter()
                .map(|t| t.get(i).map_or(f64::NAN, |&x| to_time(x)))
                .collect();
            p = p.series(
                Series::new(format!("MSM {}", i + 1), &lag_t, &y)
                    .markers(true)
                    .color(category_color(i)),
            );
            let yv: Vec<f64> = vamp_ts
                .iter()
                .map(|t| t.get(i).map_or(f64::NAN, |&x| to_time(x)))
                .collect();
            p = p.series(
                Series::new(format!("VAMP {}", i + 1), &lag_t, &yv)
                    .dashed()
                    .color(category_color(i)),
            );
        }
        // Below the line lag = timescale nothing can be resolved.
        p = p.series(Series::new("lag = timescale", &lag_t, &lag_t).color([128, 128, 128]));
        let path = out_dir.join("implied_timescales.svg");
        p.save_svg(&path)?;
        figures.push(path);
    }
    {
        let idx: Vec<f64> = (1..=singular_values.len()).map(|i| i as f64).collect();
        let p = LinePlot::new()
            .title(format!("Singular values at lag {}", to_time(lag as f64)))
            .x_label("index")
            .y_label("singular value")
            .series(Series::new("sigma", &idx, &singular_values).markers(true));
        let path = out_dir.join("singular_values.svg");
        p.save_svg(&path)?;
        figures.push(path);
    }
    {
        let n = msm.states.len();
        let t: Vec<f64> = msm.transition_matrix.iter().copied().collect();
        // nalgebra is column-major: transpose into rows.
        let mut rows = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                rows[i * n + j] = t[j * n + i];
            }
        }
        let names: Vec<String> = msm.states.iter().map(|s| format!("S{s}")).collect();
        let h = Heatmap::new(n, n, &rows)
            .title(format!(
                "MSM transition matrix (lag {} {unit})",
                to_time(lag as f64)
            ))
            .x_label("to")
            .y_label("from")
            .value_label("probability")
            .x_labels(names.clone())
            .y_labels(names)
            .range(0.0, 1.0);
        let path = out_dir.join("msm_transition_matrix.svg");
        h.save_svg(&path)?;
        figures.push(path);
    }
    {
        // Mean first passage times (log colour scale: they span orders of magnitude).
        let n = mfpt.len();
        let mut rows = vec![f64::NAN; n * n];
        for i in 0..n {
            for j in 0..n {
                if i != j && mfpt[i][j].is_finite() && mfpt[i][j] > 0.0 {
                    rows[i * n + j] = to_time(mfpt[i][j]).log10();
                }
            }
        }
        let names: Vec<String> = msm.states.iter().map(|s| format!("S{s}")).collect();
        let h = Heatmap::new(n, n, &rows)
            .title("Mean first passage times")
            .x_label("to")
            .y_label("from")
            .value_label(format!("log10 MFPT ({unit})"))
            .x_labels(names.clone())
            .y_labels(names);
        let path = out_dir.join("msm_mfpt.svg");
        h.save_svg(&path)?;
        figures.push(path);
        let idx: Vec<f64> = msm.states.iter().map(|&s| s as f64).collect();
        let p = LinePlot::new()
            .title("MSM stationary distribution")
            .x_label("state")
            .y_label("probability")
            .y_range(0.0, 1.0)
            .series(
                Series::new("stationary", &idx, &msm.stationary)
                    .markers(true)
                    .line(false),
            );
        let path = out_dir.join("msm_stationary.svg");
        p.save_svg(&path)?;
        figures.push(path);
    }
    {
        let steps: Vec<f64> = ck
            .steps
            .iter()
            .map(|&s| to_time((s * lag) as f64))
            .collect();
        let mut p = LinePlot::new()
            .title("Chapman-Kolmogorov test: P(i -> i)")
            .x_label(format!("time ({unit})"))
            .y_label("probability")
            .y_range(0.0, 1.0);
        let n = ck.predictions.first().map_or(0, |m| m.len());
        for i in 0..n {
            let pred: Vec<f64> = ck.predictions.iter().map(|m| m[i][i]).collect();
            let est: Vec<f64> = ck.estimates.iter().map(|m| m[i][i]).collect();
            p = p
                .series(
                    Series::new(format!("S{} predicted", msm.states[i]), &steps, &pred)
                        .dashed()
                        .color(category_color(i)),
                )
                .series(
                    Series::new(format!("S{} estimated", msm.states[i]), &steps, &est)
                        .markers(true)
                        .line(false)
                        .color(category_color(i)),
                );
        }
        let path = out_dir.join("ck_test.svg");
        p.save_svg(&path)?;
        figures.push(path);
    }
    {
        // Populations in windows of about 1/50 of the longest trajectory, per trajectory one after
        // another on the time axis.
        let window = (counts.iter().max().copied().unwrap_or(1) / 50).max(1);
        let mut xs = Vec::new();
        let mut ys = vec![Vec::new(); k];
        let mut offset = 0usize;
        for s in &states {
            for (c, chunk) in s.chunks(window).enumerate() {
                xs.push(to_time((offset + c * window) as f64));
                for (st, y) in ys.iter_mut().enumerate() {
                    y.push(
                        chunk.iter().filter(|&&x| x as usize == st).count() as f64
                            / chunk.len() as f64,
                    );
                }
            }
            offset += s.len();
        }
        let mut p = LinePlot::new()
            .title("State populations over time (trajectories back to back)")
            .x_label(format!("time ({unit})"))
            .y_label("fraction")
            .y_range(0.0, 1.0);
        for (st, y) in ys.iter().enumerate() {
            if state_counts[st] > 0 {
                p = p.series(Series::new(format!("S{st}"), &xs, y).color(category_color(st)));
            }
        }
        let path = out_dir.join("state_populations.svg");
        p.save_svg(&path)?;
        figures.push(path);
    }
    {
        // State map: SPIB's z, or the first two VAMP singular functions, coloured by state.
        let (x, y, xl, yl) = match objective {
            ObjectiveKind::Spib => {
                let d = cfg.objective.spib.z_dim;
                let z: Vec<&[f64]> = pred.iter().flat_map(|r| r.chunks_exact(d + 1)).collect();
                let x: Vec<f64> = z.iter().map(|r| r[0]).collect();
                let y: Vec<f64> = z.iter().map(|r| if d > 1 { r[1] } else { 0.0 }).collect();
                (x, y, "z1", "z2")
            }
            ObjectiveKind::Vamp => {
                let all: Vec<f64> = pred.iter().flatten().copied().collect();
                let n = all.len() / w;
                let proj = model0.project(&all, n);
                let dim = proj.len() / n.max(1);
                let x: Vec<f64> = (0..n).map(|i| proj[i * dim]).collect();
                let y: Vec<f64> = (0..n)
                    .map(|i| if dim > 1 { proj[i * dim + 1] } else { 0.0 })
                    .collect();
                (x, y, "singular function 1", "singular function 2")
            }
        };
        let labels: Vec<usize> = states.iter().flatten().map(|&s| s as usize).collect();
        let names: Vec<String> = (0..k).map(|s| format!("S{s}")).collect();
        let p = ScatterPlot::new(&x, &y)
            .title("State map")
            .x_label(xl)
            .y_label(yl)
            .categories(&labels)
            .category_names(names);
        let path = out_dir.join("state_map.svg");
        p.save_svg(&path)?;
        figures.push(path);
    }
    // Attention maps over frames spread through the first trajectory.
    {
        let n0 = counts[0];
        let nf = opts.attention_frames.clamp(1, n0);
        let frames: Vec<(usize, usize)> = (0..nf).map(|i| (0, i * n0 / nf)).collect();
        run.tape.reset();
        let out = run.net.encode(&mut run.tape, &frames)?;
        let maps = run.net.token.attention_maps(&run.tape, &out, None)?;
        let mut resid = Vec::new();
        let mut seen = std::collections::BTreeMap::new();
        for a in &ds.atoms {
            seen.entry(a.token).or_insert(a.resid);
        }
        resid.extend(seen.values().copied());
        let labels = token_labels(&resid, run.net.token.config().window);
        for m in &maps {
            if labels.len() == m.tokens {
                figures.extend(m.save(out_dir.join("attention"), &labels)?);
            } else {
                let generic: Vec<String> = (0..m.tokens).map(|t| t.to_string()).collect();
                figures.extend(m.save(out_dir.join("attention"), &generic)?);
            }
        }
        run.tape.reset();
    }
    // State assignments for scripts.
    {
        let flat: Vec<i32> = states.iter().flatten().map(|&s| s as i32).collect();
        crate::npy::write_i32(out_dir.join("states.npy"), &[flat.len()], &flat)?;
    }
    let slowest = msm_ts.first().copied().unwrap_or(f64::NAN);
    let t_sv = to_time(assignment.consistency.singular_value_timescale);
    let occupied = state_counts.iter().filter(|&&c| c > 0).count();
    let headline = headline(&HeadlineParts {
        objective: &format!("{objective:?}").to_lowercase(),
        lag: to_time(lag as f64),
        unit,
        msm: to_time(slowest),
        singular: t_sv,
        states: occupied,
        method: &state_assignment,
        failed: &assignment.consistency.failed_names(),
    });
    if opts.progress {
        eprintln!("analyze: {headline}");
    }
    let summary = AnalysisSummary {
        run: run_dir.to_path_buf(),
        objective: format!("{objective:?}").to_lowercase(),
        dt_ps: dt,
        lag_frames: lag,
        state_assignment,
        states_from_gap: assignment.gap_states,
        rejected_assignments: assignment.rejected.clone(),
        state_checks: assignment.consistency.clone(),
        warnings,
        singular_value_timescale: t_sv,
        headline,
        lags,
        validation_vamp2: val_scores,
        singular_values,
        vamp_timescales: vamp_ts,
        msm_timescales: its.timescales.clone(),
        slowest_timescale: to_time(slowest),
        timescale_unit: unit.into(),
        msm,
        mfpt,
        state_counts,
        ck_test: ck,
        // Where they will be once the folder is in place.
        figures: figures
            .into_iter()
            .map(|f| match f.strip_prefix(&out_dir) {
                Ok(rel) => final_dir.join(rel),
                Err(_) => f,
            })
            .collect(),
    };
    crate::optim::write_atomic(
        &out_dir.join("analysis.json"),
        &serde_json::to_vec_pretty(&summary)?,
    )?;
    write_index(&out_dir)?;
    output.commit()?;
    Ok(summary)
}

/// The numbers of a headline.
struct HeadlineParts<'a> {
    objective: &'a str,
    lag: f64,
    unit: &'a str,
    msm: f64,
    singular: f64,
    states: usize,
    method: &'a str,
    failed: &'a str,
}

fn fmt_time(t: f64) -> String {
    if t.is_finite() {
        format!("{t:.1}")
    } else if t.is_infinite() {
        "infinite".into()
    } else {
        "n/a".into()
    }
}

/// "vamp, lag 20 ps: slowest implied timescale 150.2 ps (MSM on 2 states, argmax) vs 160.1 ps
/// (VAMP singular values); all checks passed" or "...; WARNING: checks failed: ...".
fn headline(p: &HeadlineParts) -> String {
    let how = match p.method {
        "kmeans" => "k-means on the singular functions",
        "argmax" if p.objective == "spib" => "SPIB decoder",
        m => m,
    };
    let singular = if p.objective == "spib" {
        "VAMP singular values of z"
    } else {
        "VAMP singular values"
    };
    format!(
        "{}, lag {} {}: slowest implied timescale {} {} (MSM on {} states, {how}) vs {} {} ({singular}); {}",
        p.objective,
        fmt_time(p.lag),
        p.unit,
        fmt_time(p.msm),
        p.unit,
        p.states,
        fmt_time(p.singular),
        p.unit,
        if p.failed.is_empty() {
            "all consistency checks passed".to_string()
        } else {
            format!("WARNING: failed checks: {} (the MSM number is not to be trusted)", p.failed)
        }
    )
}

impl AnalysisSummary {
    /// The one-line summary for a terminal (the `headline` field): both slowest timescales, MSM
    /// and singular-value, the states and how they were assigned, and whether the checks passed.
    /// `hiermd analyze` should print this rather than `slowest_timescale` alone.
    pub fn headline(&self) -> &str {
        &self.headline
    }
}

/// Captions of the pictures `analyze` (and the demo) writes, by file stem.
fn caption_for(stem: &str) -> Option<&'static str> {
    Some(match stem {
        "vamp2_vs_lag" => "Validation VAMP-2 score of the outputs against lag time.",
        "implied_timescales" => {
            "Implied timescales against lag time: MSM on the states (solid, markers) and VAMP singular values (dashed); below the grey line lag = timescale nothing is resolved."
        }
        "singular_values" => "Singular values of the Koopman matrix at the training lag: the gap after the slow ones sets the number of states.",
        "msm_transition_matrix" => "Transition matrix of the MSM on the states at the training lag.",
        "msm_mfpt" => "Mean first passage times between the MSM's states (log scale).",
        "msm_stationary" => "Stationary distribution of the MSM.",
        "ck_test" => "Chapman-Kolmogorov test: self-transition probabilities predicted by the MSM at the lag (dashed) against those estimated at multiples of it (markers).",
        "state_populations" => "Fraction of frames in each state over time, trajectories back to back.",
        "state_map" => "Frames on the first two singular functions (SPIB: its latent z), coloured by state.",
        "ramachandran_states" => "The states on the (phi, psi) plane.",
        _ => return None,
    })
}

/// The `<title>` of an SVG file, if any.
fn svg_title(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let a = text.find("<title>")? + "<title>".len();
    let b = a + text[a..].find("</title>")?;
    Some(
        text[a..b]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Every `.svg` under `dir` (recursively), as paths relative to it, top-level files first, each
/// level sorted by name.
fn svgs_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(root.join(rel)) else {
            return;
        };
        let mut files = Vec::new();
        let mut dirs = Vec::new();
        for e in rd.flatten() {
            let name = PathBuf::from(e.file_name());
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                dirs.push(name);
            } else if name.extension().is_some_and(|x| x == "svg") {
                files.push(rel.join(name));
            }
        }
        files.sort();
        dirs.sort();
        out.extend(files);
        for d in dirs {
            walk(root, &rel.join(d), out);
        }
    }
    let mut out = Vec::new();
    walk(dir, Path::new(""), &mut out);
    out
}

/// Writes `index.html` into an analysis folder: the headline, warnings and checks from its
/// `analysis.json` (when there is one), then every SVG picture under the folder, shown as its
/// PNG (the SVG where there is no PNG) with a caption and links to both. Call it again after
/// adding pictures. Returns the path written.
pub fn write_index(dir: &Path) -> Result<PathBuf> {
    use std::fmt::Write as _;
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    h.push_str("<title>hiermd analysis</title>\n<style>\n");
    h.push_str("body { font-family: sans-serif; margin: 1.5em; max-width: 1400px; }\n");
    h.push_str(".warn { color: #a00; font-weight: bold; }\n.ok { color: #070; }\n");
    h.push_str(
        "figure { display: inline-block; vertical-align: top; margin: 0.8em; max-width: 660px; }\n",
    );
    h.push_str("figure img { max-width: 640px; width: 100%; border: 1px solid #ddd; }\n");
    h.push_str("figcaption { font-size: 0.9em; color: #333; }\n</style>\n</head>\n<body>\n");
    h.push_str("<h1>hiermd analysis</h1>\n");
    let json: Option<serde_json::Value> = std::fs::read_to_string(dir.join("analysis.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    if let Some(j) = &json {
        if let Some(run) = j["run"].as_str() {
            let _ = writeln!(h, "<p>Run: <code>{}</code></p>", html_escape(run));
        }
        if let Some(line) = j["headline"].as_str() {
            let _ = writeln!(h, "<p><b>{}</b></p>", html_escape(line));
        }
        let warnings: Vec<&str> = j["warnings"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        for w in &warnings {
            let _ = writeln!(h, "<p class=\"warn\">{}</p>", html_escape(w));
        }
        if let Some(checks) = j["state_checks"]["checks"].as_array() {
            h.push_str("<ul>\n");
            for c in checks {
                let passed = c["passed"].as_bool().unwrap_or(false);
                let _ = writeln!(
                    h,
                    "<li class=\"{}\">{}: {}: {}</li>",
                    if passed { "ok" } else { "warn" },
                    if passed { "passed" } else { "FAILED" },
                    html_escape(c["name"].as_str().unwrap_or("")),
                    html_escape(c["detail"].as_str().unwrap_or(""))
                );
            }
            h.push_str("</ul>\n");
        }
        h.push_str("<p>Numbers: <a href=\"analysis.json\">analysis.json</a>; states per frame: <code>states.npy</code>.</p>\n");
    }
    for svg in svgs_under(dir) {
        let rel = |p: &Path| {
            p.components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/")
        };
        let png = svg.with_extension("png");
        let has_png = dir.join(&png).exists();
        let stem = svg
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let title = svg_title(&dir.join(&svg)).unwrap_or_default();
        let caption = match caption_for(&stem) {
            Some(c) if title.is_empty() => c.to_string(),
            Some(c) => format!("{title}. {c}"),
            None if !title.is_empty() => title,
            None => stem.clone(),
        };
        let (s_rel, p_rel) = (html_escape(&rel(&svg)), html_escape(&rel(&png)));
        let _ = writeln!(
            h,
            "<figure id=\"{}\">\n<a href=\"{s_rel}\"><img src=\"{}\" alt=\"{}\" loading=\"lazy\"></a>\n<figcaption>{} (<a href=\"{s_rel}\">SVG</a>{})</figcaption>\n</figure>",
            html_escape(&rel(&svg).replace('/', "-")),
            if has_png { &p_rel } else { &s_rel },
            html_escape(&caption),
            html_escape(&caption),
            if has_png {
                format!(", <a href=\"{p_rel}\">PNG</a>")
            } else {
                String::new()
            }
        );
    }
    h.push_str("</body>\n</html>\n");
    let path = dir.join("index.html");
    crate::optim::write_atomic(&path, h.as_bytes())?;
    Ok(path)
}
