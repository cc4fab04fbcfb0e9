//! Consistency checks of a state assignment: does the Markov state model on these states tell
//! the same story as the continuous model they came from?
//!
//! [`check_states`] runs three checks on discrete trajectories at the analysis lag and never
//! fails (a degenerate partition is what it is there to catch, so an MSM that cannot be
//! estimated is a failed check, not an error):
//! - **state populations**: every state that holds frames holds at least
//!   [`CheckOptions::min_state_fraction`] of them, and at least two states hold frames. A
//!   partition of 7,997 and 3 frames fails here.
//! - **timescales**: the MSM's slowest implied timescale and the VAMP singular-value timescale
//!   `-lag / ln sigma_1` agree within a factor [`CheckOptions::timescale_factor`]. Both are
//!   estimates of the slowest relaxation from below (the singular value variationally, the MSM
//!   through its discretisation), so a large disagreement means that the states miss the slow
//!   process the model found (or the model found none that the states show).
//! - **Chapman-Kolmogorov test**: the MSM at lag `tau` predicts the transition probabilities
//!   estimated directly at `n tau` (`n = 1..=ck_steps`) within [`CheckOptions::ck_sigmas`]
//!   standard errors plus an absolute [`CheckOptions::ck_tolerance`]. The standard error of an
//!   estimated `p` out of state `i` is `sqrt(p (1 - p) / N_i)` with `N_i` the sliding-window
//!   counts out of `i` at that lag divided by the lag (the number of nearly independent
//!   transitions).
//!
//! Each failure becomes a line `WARNING: <check>: <numbers>` ([`Consistency::warnings`]).

use super::msm::{ck_test, count_matrix, CkTest, Msm};
use serde::Serialize;

/// Thresholds of the consistency checks.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CheckOptions {
    /// Smallest fraction of all frames that every occupied state must hold (default 0.02).
    pub min_state_fraction: f64,
    /// Largest ratio allowed between the MSM's slowest implied timescale and the VAMP
    /// singular-value timescale, either way round (default 2).
    pub timescale_factor: f64,
    /// Standard errors allowed in the Chapman-Kolmogorov test (default 3).
    pub ck_sigmas: f64,
    /// Absolute deviation allowed in the Chapman-Kolmogorov test on top of the statistical
    /// error, for the small model error any MSM of real dynamics has (default 0.05).
    pub ck_tolerance: f64,
    /// Steps of the Chapman-Kolmogorov test, in multiples of the lag (default 5).
    pub ck_steps: usize,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            min_state_fraction: 0.02,
            timescale_factor: 2.0,
            ck_sigmas: 3.0,
            ck_tolerance: 0.05,
            ck_steps: 5,
        }
    }
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    /// "state populations", "timescales" or "Chapman-Kolmogorov test".
    pub name: String,
    /// Whether it passed.
    pub passed: bool,
    /// The numbers it looked at, in words.
    pub detail: String,
}

/// All checks of one state assignment, with the numbers they compared.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Consistency {
    /// The lag of the checks, frames.
    pub lag: usize,
    /// Frames per state (index = state).
    pub state_counts: Vec<usize>,
    /// The MSM's slowest implied timescale at the lag, frames (NaN when there is no MSM with two
    /// or more states; serialised as `null`).
    pub msm_timescale: f64,
    /// The VAMP singular-value timescale `-lag / ln sigma_1`, frames (NaN when not known).
    pub singular_value_timescale: f64,
    /// Largest Chapman-Kolmogorov deviation |predicted - estimated| over states, targets and
    /// steps (NaN when the test could not run).
    pub ck_max_deviation: f64,
    /// Every check, in the order above.
    pub checks: Vec<Check>,
}

impl Consistency {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// One line `WARNING: <check>: <numbers>` per failed check.
    pub fn warnings(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| format!("WARNING: {}: {}", c.name, c.detail))
            .collect()
    }

    /// The failed checks' names, comma-separated ("" when all passed).
    pub fn failed_names(&self) -> String {
        self.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The VAMP singular-value timescale `-lag / ln sigma` in frames: infinite for `sigma >= 1`, 0
/// for `sigma <= 0`, NaN for NaN.
pub fn singular_value_timescale(sigma: f64, lag: usize) -> f64 {
    if sigma.is_nan() {
        f64::NAN
    } else if sigma >= 1.0 {
        f64::INFINITY
    } else if sigma <= 0.0 {
        0.0
    } else {
        -(lag as f64) / sigma.ln()
    }
}

fn fmt_frames(t: f64) -> String {
    if t.is_nan() {
        "n/a".into()
    } else if t.is_infinite() {
        "infinite".into()
    } else {
        format!("{t:.1}")
    }
}

/// Runs the checks (see the module documentation) on discrete trajectories `dtrajs` with
/// states below `n_states`, at `lag` frames; `sv_timescale` is the VAMP singular-value
/// timescale in frames (NaN: the timescale check fails, saying it is unknown). Never panics and
/// never fails: out-of-range states, empty input or an MSM that cannot be estimated make the
/// checks fail with the reason.
pub fn check_states(
    dtrajs: &[Vec<u32>],
    n_states: usize,
    lag: usize,
    sv_timescale: f64,
    opts: &CheckOptions,
) -> Consistency {
    let mut checks = Vec::new();
    let bad = |name: &str, detail: String| Check {
        name: name.into(),
        passed: false,
        detail,
    };
    // Input sanity: everything else builds on it.
    let total: usize = dtrajs.iter().map(Vec::len).sum();
    let out_of_range = dtrajs.iter().flatten().find(|&&s| s as usize >= n_states);
    if total == 0 || n_states == 0 || out_of_range.is_some() || lag == 0 {
        let why = if total == 0 {
            "no frames".to_string()
        } else if n_states == 0 {
            "no states".to_string()
        } else if let Some(s) = out_of_range {
            format!("state {s} is out of range ({n_states} states)")
        } else {
            "lag 0".to_string()
        };
        for name in ["state populations", "timescales", "Chapman-Kolmogorov test"] {
            checks.push(bad(name, why.clone()));
        }
        return Consistency {
            lag,
            state_counts: vec![0; n_states],
            msm_timescale: f64::NAN,
            singular_value_timescale: sv_timescale,
            ck_max_deviation: f64::NAN,
            checks,
        };
    }

    // 1. Populations.
    let mut counts = vec![0usize; n_states];
    for &s in dtrajs.iter().flatten() {
        counts[s as usize] += 1;
    }
    let occupied: Vec<(usize, usize)> = counts
        .iter()
        .copied()
        .enumerate()
        .filter(|&(_, c)| c > 0)
        .collect();
    let list = occupied
        .iter()
        .map(|(s, c)| format!("S{s} {c} ({:.2}%)", 100.0 * *c as f64 / total as f64))
        .collect::<Vec<_>>()
        .join(", ");
    let min_frames = opts.min_state_fraction * total as f64;
    let small: Vec<usize> = occupied
        .iter()
        .filter(|&&(_, c)| (c as f64) < min_frames)
        .map(|&(s, _)| s)
        .collect();
    checks.push(if occupied.len() < 2 {
        bad(
            "state populations",
            format!("only one state holds frames ({list} of {total} frames)"),
        )
    } else if !small.is_empty() {
        bad(
            "state populations",
            format!(
                "{} below {:.1}% of the frames: {list} of {total} frames",
                small
                    .iter()
                    .map(|s| format!("S{s}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                100.0 * opts.min_state_fraction
            ),
        )
    } else {
        Check {
            name: "state populations".into(),
            passed: true,
            detail: format!(
                "{list} of {total} frames (at least {:.1}% each)",
                100.0 * opts.min_state_fraction
            ),
        }
    });

    // 2. Timescales.
    let msm = Msm::estimate(dtrajs, lag, n_states, true);
    let msm_timescale = match &msm {
        Ok(m) if m.n_states() >= 2 => m.timescales(1).first().copied().unwrap_or(f64::NAN),
        _ => f64::NAN,
    };
    let (t_m, t_s) = (msm_timescale, sv_timescale);
    let ratio = if t_m.is_finite() && t_s.is_finite() && t_m > 0.0 && t_s > 0.0 {
        (t_m / t_s).max(t_s / t_m)
    } else {
        f64::NAN
    };
    let numbers = format!(
        "MSM {} frames, singular values {} frames at lag {lag}",
        fmt_frames(t_m),
        fmt_frames(t_s)
    );
    checks.push(match &msm {
        Err(e) => bad(
            "timescales",
            format!(
                "no MSM at lag {lag} ({e:#}); singular values {} frames",
                fmt_frames(t_s)
            ),
        ),
        Ok(m) if m.n_states() < 2 => bad(
            "timescales",
            format!(
                "the MSM's connected set at lag {lag} has {} state; singular values {} frames",
                m.n_states(),
                fmt_frames(t_s)
            ),
        ),
        Ok(_) if ratio.is_nan() => bad("timescales", format!("{numbers}: cannot be compared")),
        Ok(_) if ratio > opts.timescale_factor => bad(
            "timescales",
            format!(
                "{numbers}: they differ by a factor {ratio:.1} (at most {} allowed)",
                opts.timescale_factor
            ),
        ),
        Ok(_) => Check {
            name: "timescales".into(),
            passed: true,
            detail: format!(
                "{numbers}: factor {ratio:.2} (at most {})",
                opts.timescale_factor
            ),
        },
    });

    // 3. Chapman-Kolmogorov.
    let (ck_check, ck_max) = match &msm {
        Err(_) => (
            bad("Chapman-Kolmogorov test", "no MSM at the lag".into()),
            f64::NAN,
        ),
        Ok(_) => ck_check(dtrajs, n_states, lag, opts),
    };
    checks.push(ck_check);
    Consistency {
        lag,
        state_counts: counts,
        msm_timescale,
        singular_value_timescale: sv_timescale,
        ck_max_deviation: ck_max,
        checks,
    }
}

/// The Chapman-Kolmogorov check: the test with as many steps as can be estimated (up to
/// `opts.ck_steps`), each deviation against its allowed error.
fn ck_check(dtrajs: &[Vec<u32>], n_states: usize, lag: usize, opts: &CheckOptions) -> (Check, f64) {
    let name = "Chapman-Kolmogorov test";
    let mut steps = opts.ck_steps.max(1);
    let ck: CkTest = loop {
        match ck_test(dtrajs, lag, n_states, steps, true) {
            Ok(ck) => break ck,
            Err(e) if steps <= 1 => {
                return (
                    Check {
                        name: name.into(),
                        passed: false,
                        detail: format!("cannot run ({e:#})"),
                    },
                    f64::NAN,
                )
            }
            Err(_) => steps -= 1,
        }
    };
    let n = ck.states.len();
    // (deviation, allowed, step, i, j, predicted, estimated, standard error): the largest
    // excess over what is allowed, and the largest deviation.
    type Entry = (f64, f64, usize, usize, usize, f64, f64, f64);
    let mut worst: Option<Entry> = None;
    let mut largest: Option<Entry> = None;
    let mut max_dev: f64 = 0.0;
    let mut missing: Vec<String> = Vec::new();
    for (si, &step) in ck.steps.iter().enumerate().skip(1) {
        let l = step * lag;
        let c = count_matrix(dtrajs, l, n_states);
        for i in 0..n {
            let row_counts: f64 = (0..n_states).map(|j| c[(ck.states[i], j)]).sum();
            let n_eff = row_counts / l as f64;
            for j in 0..n {
                let p = ck.predictions[si][i][j];
                let e = ck.estimates[si][i][j];
                if !e.is_finite() {
                    if j == 0 {
                        missing.push(format!("S{} at {step} x lag", ck.states[i]));
                    }
                    continue;
                }
                let se = if n_eff > 0.0 {
                    (e * (1.0 - e)).max(0.0).sqrt() / n_eff.sqrt()
                } else {
                    f64::INFINITY
                };
                let allowed = opts.ck_sigmas * se + opts.ck_tolerance;
                let dev = (p - e).abs();
                max_dev = max_dev.max(dev);
                // The worst is the largest excess over what is allowed.
                let excess = dev - allowed;
                let entry = (dev, allowed, step, i, j, p, e, se);
                if worst.is_none_or(|w| excess > w.0 - w.1) {
                    worst = Some(entry);
                }
                if largest.is_none_or(|w| dev > w.0) {
                    largest = Some(entry);
                }
            }
        }
    }
    let mut passed = worst.is_some_and(|w| w.0 <= w.1);
    // A failure shows the entry furthest beyond its allowance, a pass the largest deviation.
    let shown = if passed { largest } else { worst };
    let mut detail = match shown {
        Some((dev, allowed, step, i, j, p, e, se)) => format!(
            "{} {dev:.3} at {step} x lag: P(S{} -> S{}) predicted {p:.3}, estimated {e:.3} +- {se:.3} (allowed {allowed:.3} = {} sigma + {})",
            if passed { "largest deviation" } else { "deviation" },
            ck.states[i], ck.states[j], opts.ck_sigmas, opts.ck_tolerance
        ),
        None => "no steps to compare".into(),
    };
    if steps < opts.ck_steps {
        detail.push_str(&format!(
            "; only {steps} of {} steps could be estimated",
            opts.ck_steps
        ));
        passed = false;
    }
    if !missing.is_empty() {
        detail.push_str(&format!("; no transitions out of {}", missing.join(", ")));
        passed = false;
    }
    (
        Check {
            name: name.into(),
            passed,
            detail,
        },
        max_dev,
    )
}
