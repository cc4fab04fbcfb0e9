//! Discrete states of a VAMPnet that are checked, not assumed.
//!
//! A VAMPnet's softmax outputs are only defined up to an invertible linear map as far as the
//! VAMP score is concerned, so their argmax can be a degenerate partition (all frames but three
//! in one state) although the outputs separate the slow process well. [`assign_vamp_states`]
//! therefore
//! 1. takes the argmax of the outputs and runs the consistency checks of
//!    [`super::checks::check_states`] on it; it keeps the argmax only when every check passes;
//! 2. otherwise (or when asked to) clusters the frames' *kinetic map*, the VAMP singular
//!    functions scaled by their singular values ([`kinetic_map`], the projection deeptime's
//!    `VAMP.transform` gives, weighted so that distances are kinetic), with seeded k-means into a
//!    number of states chosen from the largest gap between singular values ([`states_from_gap`])
//!    unless given, and checks those states the same way.
//!
//! The result says which assignment was used, why the argmax was rejected, and how the final
//! states fared, so that a failed check reaches the user as a warning instead of a silent
//! number.

use super::checks::{check_states, singular_value_timescale, CheckOptions, Consistency};
use super::kmeans::KMeans;
use crate::objectives::vamp::{VampModel, VampOptions};
use anyhow::{ensure, Result};
use serde::Serialize;

/// How [`assign_vamp_states`] assigns states.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StateOptions {
    /// Number of k-means states (default: from the singular-value gap, see
    /// [`states_from_gap`]).
    pub states: Option<usize>,
    /// Skip the argmax and cluster the kinetic map directly.
    pub force_kmeans: bool,
    /// Most states the singular-value gap may choose (default 10).
    pub max_states: usize,
    /// Seed of the k-means (default: 0; `analyze` uses the run's training seed).
    pub seed: Option<u64>,
    /// Thresholds of the consistency checks.
    pub checks: CheckOptions,
}

impl Default for StateOptions {
    fn default() -> Self {
        Self {
            states: None,
            force_kmeans: false,
            max_states: 10,
            seed: None,
            checks: CheckOptions::default(),
        }
    }
}

/// An assignment tried and rejected, with the checks that failed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rejected {
    /// "argmax".
    pub method: String,
    /// Its checks.
    pub consistency: Consistency,
}

/// The states of every frame and how they were found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StateAssignment {
    /// "argmax" (of the outputs) or "kmeans" (on the kinetic map).
    pub method: String,
    /// States per trajectory (`[traj][frame]`).
    #[serde(skip)]
    pub states: Vec<Vec<u32>>,
    /// Number of states (every state index is below it; some may be empty for the argmax).
    pub n_states: usize,
    /// The number of states the singular-value gap suggests.
    pub gap_states: usize,
    /// The singular values the choice and the checks used.
    pub singular_values: Vec<f64>,
    /// The checks of the states used.
    pub consistency: Consistency,
    /// Assignments tried before and rejected (the argmax, when it failed a check).
    pub rejected: Vec<Rejected>,
}

/// The number of states suggested by the singular values `sigma_1 >= sigma_2 >= ...` (the
/// stationary process excluded): `m + 1`, where `m` in `1..=min(len, max_states - 1)` maximises
/// the gap `sigma_m - sigma_{m+1}` (`sigma` beyond the last is 0), i.e. the slow processes are
/// those above the largest drop. Two states when there are no singular values; at least 2 and at
/// most `max(max_states, 2)`.
pub fn states_from_gap(singular_values: &[f64], max_states: usize) -> usize {
    let top = singular_values.len().min(max_states.max(2) - 1);
    if top == 0 {
        return 2;
    }
    let s = |i: usize| {
        singular_values
            .get(i)
            .copied()
            .filter(|v| v.is_finite())
            .unwrap_or(0.0)
            .max(0.0)
    };
    let mut best = (1, f64::NEG_INFINITY);
    for m in 1..=top {
        let gap = s(m - 1) - s(m);
        if gap > best.1 {
            best = (m, gap);
        }
    }
    best.0 + 1
}

/// Fits a VAMP model on all time-lagged pairs `(t, t + lag)` within each trajectory of rows
/// `[traj][frame * k + j]`.
pub fn fit_vamp(
    outputs: &[Vec<f64>],
    k: usize,
    lag: usize,
    opts: &VampOptions,
) -> Result<VampModel> {
    ensure!(k > 0, "fit_vamp: no outputs");
    ensure!(lag > 0, "fit_vamp: lag 0");
    let mut a = Vec::new();
    let mut b = Vec::new();
    for rows in outputs {
        ensure!(
            rows.len() % k == 0,
            "fit_vamp: a trajectory has {} values, not a multiple of {k} outputs",
            rows.len()
        );
        let n = rows.len() / k;
        if n > lag {
            a.extend_from_slice(&rows[..(n - lag) * k]);
            b.extend_from_slice(&rows[lag * k..]);
        }
    }
    let n = a.len() / k;
    ensure!(
        n >= 2,
        "fit_vamp: fewer than 2 pairs at lag {lag} (trajectories too short)"
    );
    VampModel::fit(&a, &b, n, k, None, opts)
}

/// The kinetic map of `n` frames of outputs `[n, k]`: the left singular functions
/// ([`VampModel::project`]: outputs less their mean, whitened with `C00^-1/2` and projected on
/// the Koopman matrix's left singular vectors) each scaled by its singular value, so that
/// Euclidean distances weigh each process by how slow it is. `[n, dim]`.
pub fn kinetic_map(model: &VampModel, rows: &[f64], n: usize) -> Vec<f64> {
    let mut p = model.project(rows, n);
    let dim = model.dim();
    let s = model.singular_values();
    for row in p.chunks_exact_mut(dim.max(1)) {
        for (v, sigma) in row.iter_mut().zip(s) {
            *v *= sigma;
        }
    }
    p
}

/// The argmax state of every frame of outputs `[traj][frame * k + j]` (the first on ties; NaN
/// never wins).
pub fn argmax_states(outputs: &[Vec<f64>], k: usize) -> Vec<Vec<u32>> {
    outputs
        .iter()
        .map(|rows| {
            rows.chunks_exact(k)
                .map(|r| {
                    let mut best = 0;
                    for (i, &v) in r.iter().enumerate() {
                        if v > r[best] || r[best].is_nan() {
                            best = i;
                        }
                    }
                    best as u32
                })
                .collect()
        })
        .collect()
}

/// Assigns states to the frames of VAMPnet outputs `[traj][frame * k + j]` (see the module
/// documentation): the argmax when it passes every check, else seeded k-means on the kinetic map
/// of `model` (a VAMP model of these outputs at `lag`, e.g. from [`fit_vamp`]). The checks use
/// the singular-value timescale of `model` at `lag`.
///
/// Errors: rows not a multiple of `k`, fewer frames than states, or non-finite outputs.
pub fn assign_vamp_states(
    outputs: &[Vec<f64>],
    k: usize,
    lag: usize,
    model: &VampModel,
    opts: &StateOptions,
) -> Result<StateAssignment> {
    let candidate = (!opts.force_kmeans).then(|| (argmax_states(outputs, k), k));
    assign_checked_states(candidate, outputs, k, lag, model, opts)
}

/// Assigns states given a candidate partition `(states [traj][frame], number of states)` (a
/// VAMPnet's argmax, a SPIB decoder's states): the candidate when it passes every check, else
/// seeded k-means on the kinetic map of `model`, a VAMP model at `lag` of the rows
/// `[traj][frame * k + j]` (outputs, or SPIB's latent z). `None`: k-means only. The candidate is
/// reported as method "argmax".
pub fn assign_checked_states(
    candidate: Option<(Vec<Vec<u32>>, usize)>,
    outputs: &[Vec<f64>],
    k: usize,
    lag: usize,
    model: &VampModel,
    opts: &StateOptions,
) -> Result<StateAssignment> {
    ensure!(k > 0, "states: no outputs");
    for (t, rows) in outputs.iter().enumerate() {
        ensure!(
            rows.len() % k == 0,
            "states: trajectory {t} has {} values, not a multiple of {k} outputs",
            rows.len()
        );
    }
    let sv = model.singular_values().to_vec();
    let t_sv = singular_value_timescale(sv.first().copied().unwrap_or(f64::NAN), lag);
    let gap_states = states_from_gap(&sv, opts.max_states);
    let mut rejected = Vec::new();
    if let Some((states, n)) = candidate {
        let consistency = check_states(&states, n, lag, t_sv, &opts.checks);
        if consistency.passed() {
            return Ok(StateAssignment {
                method: "argmax".into(),
                states,
                n_states: n,
                gap_states,
                singular_values: sv,
                consistency,
                rejected,
            });
        }
        rejected.push(Rejected {
            method: "argmax".into(),
            consistency,
        });
    }
    let n_states = opts.states.unwrap_or(gap_states).max(1);
    let all: Vec<f64> = outputs.iter().flatten().copied().collect();
    let n = all.len() / k;
    ensure!(
        n >= n_states,
        "states: {n} frames for {n_states} k-means states"
    );
    let map = kinetic_map(model, &all, n);
    let dim = model.dim().max(1);
    let km = KMeans::fit(&map, n, dim, n_states, opts.seed.unwrap_or(0), 300)?;
    let labels = km.assign(&map, n);
    let mut states = Vec::with_capacity(outputs.len());
    let mut at = 0;
    for rows in outputs {
        let m = rows.len() / k;
        states.push(labels[at..at + m].to_vec());
        at += m;
    }
    let consistency = check_states(&states, n_states, lag, t_sv, &opts.checks);
    Ok(StateAssignment {
        method: "kmeans".into(),
        states,
        n_states,
        gap_states,
        singular_values: sv,
        consistency,
        rejected,
    })
}
