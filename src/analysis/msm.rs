//! Markov state models (MSMs) on discrete trajectories, following deeptime 0.4.4.
//!
//! The pieces, and what they match in deeptime (`tests/msm.rs` compares them with
//! `tests/golden/msm_deeptime.json`, made by `datasets/deeptime/make_golden_msm`):
//! - [`count_matrix`]: sliding-window transition counts (`TransitionCountEstimator(lag,
//!   "sliding")`).
//! - [`connected_sets`] / [`largest_connected_set`]: strongly connected components of the count
//!   graph, largest first, ties in the order deeptime gives them (`connected_sets(directed=True)`,
//!   which is scipy's iterative Pearce algorithm followed by a stable sort by size).
//! - [`Msm::estimate`]: the maximum-likelihood MSM on the largest strongly connected set, either
//!   reversible (deeptime's dense `mle_trev` fixed-point iteration, `maxiter` 1e6, `maxerr`
//!   1e-8) or non-reversible (row-normalised counts).
//! - [`Msm::eigenvalues`], [`Msm::timescales`], [`Msm::mfpt`], [`Msm::propagate`],
//!   [`implied_timescales`] and [`ck_test`] (the Chapman-Kolmogorov test with one-hot memberships
//!   on the active states).
//!
//! Everything is host-side f64 with nalgebra; the matrices are small (states from k-means or
//! SPIB: tens to a few hundred), so the cost is in counting, which is linear in the frames.
//!
//! One deliberate difference from deeptime: its non-reversible `MaximumLikelihoodMSM` restricts
//! to the largest *weakly* connected set, which can keep transient states (rows or columns of
//! zero counts) and then has no unique stationary distribution. Here both estimates use the
//! largest *strongly* connected set, where the chain is ergodic.

use anyhow::{bail, ensure, Context, Result};
use nalgebra::{DMatrix, DVector, SymmetricEigen};
use rayon::prelude::*;
use serde::{Serialize, Serializer};

/// Maximum number of fixed-point iterations of the reversible estimator (deeptime's default).
pub const REVERSIBLE_MAXITER: usize = 1_000_000;
/// Convergence tolerance of the reversible estimator: the largest relative change of the
/// stationary iterate between two iterations (deeptime's `maxerr` default for MSMs).
pub const REVERSIBLE_MAXERR: f64 = 1e-8;
/// The reversible estimator fails when a stationary iterate falls to or below this (deeptime's
/// `eps_mu`): the counts then do not support a reversible chain.
const REVERSIBLE_EPS_MU: f64 = 1e-15;

/// Checks the trajectories: at least one, and every state below `n_states` (the error names the
/// trajectory and frame of the first offender).
fn validate_dtrajs(dtrajs: &[Vec<u32>], n_states: usize) -> Result<()> {
    ensure!(!dtrajs.is_empty(), "msm: no discrete trajectories given");
    ensure!(n_states > 0, "msm: n_states must be at least 1");
    if let Some((ti, frame, s)) = first_out_of_range(dtrajs, n_states) {
        bail!("msm: trajectory {ti}, frame {frame}: state {s} is out of range (n_states = {n_states})");
    }
    Ok(())
}

/// The first (trajectory, frame, state) with a state `>= n_states`.
fn first_out_of_range(dtrajs: &[Vec<u32>], n_states: usize) -> Option<(usize, usize, u32)> {
    dtrajs.iter().enumerate().find_map(|(ti, traj)| {
        traj.iter()
            .enumerate()
            .find(|(_, &s)| s as usize >= n_states)
            .map(|(f, &s)| (ti, f, s))
    })
}

/// Checks a lag time against the trajectories: it must be at least 1 and shorter than at least
/// one trajectory, otherwise there is nothing to count.
fn validate_lag(dtrajs: &[Vec<u32>], lag: usize) -> Result<()> {
    ensure!(lag >= 1, "msm: the lag time must be at least 1 frame");
    let longest = dtrajs.iter().map(Vec::len).max().unwrap_or(0);
    ensure!(
        longest > lag,
        "msm: lag {lag} is not shorter than any trajectory (the longest has {longest} frames): no transitions to count"
    );
    Ok(())
}

/// Sliding-window transition counts at `lag`: `C[i][j]` is the number of times `t` (over all
/// trajectories) with `x_t = i` and `x_{t+lag} = j`. Trajectories not longer than `lag` add
/// nothing. This is deeptime's `TransitionCountEstimator(lag, "sliding", n_states)`.
///
/// # Panics
/// If a state is `>= n_states` (the message names the trajectory and the frame);
/// [`Msm::estimate`] checks this first and returns an error instead.
pub fn count_matrix(dtrajs: &[Vec<u32>], lag: usize, n_states: usize) -> DMatrix<f64> {
    if let Some((ti, frame, s)) = first_out_of_range(dtrajs, n_states) {
        panic!("count_matrix: trajectory {ti}, frame {frame}: state {s} is out of range (n_states = {n_states})");
    }
    // Integer counts per trajectory, summed in trajectory order: exact, so the result does not
    // depend on how rayon splits the work.
    let per_traj: Vec<Vec<u64>> = dtrajs
        .par_iter()
        .map(|traj| {
            let mut c = vec![0u64; n_states * n_states];
            if traj.len() > lag {
                for (a, b) in traj.iter().zip(&traj[lag..]) {
                    c[*a as usize * n_states + *b as usize] += 1;
                }
            }
            c
        })
        .collect();
    let mut total = vec![0u64; n_states * n_states];
    for c in &per_traj {
        for (t, v) in total.iter_mut().zip(c) {
            *t += v;
        }
    }
    DMatrix::from_fn(n_states, n_states, |i, j| total[i * n_states + j] as f64)
}

/// Strongly connected components of the directed graph with an edge `i -> j` wherever
/// `counts[(i, j)] > 0`, each sorted by state index, largest first.
///
/// Components of equal size come in deeptime's order: the labels of scipy's
/// `connected_components(directed=True, connection="strong")` (an iterative Pearce algorithm,
/// ported here step for step, since its labelling decides the ties), then a stable sort by size.
pub fn connected_sets(counts: &DMatrix<f64>) -> Vec<Vec<usize>> {
    let n = counts.nrows();
    assert_eq!(
        n,
        counts.ncols(),
        "connected_sets: the count matrix must be square"
    );
    // CSR adjacency with ascending column indices, as scipy builds it from a dense matrix.
    let adj: Vec<Vec<usize>> = (0..n)
        .map(|i| (0..n).filter(|&j| counts[(i, j)] > 0.0).collect())
        .collect();
    let labels = scc_labels_pearce(&adj);
    let n_comp = labels.iter().map(|&l| l + 1).max().unwrap_or(0);
    let mut sets: Vec<Vec<usize>> = vec![Vec::new(); n_comp];
    for (s, &l) in labels.iter().enumerate() {
        sets[l].push(s);
    }
    // `sort_by_key` is stable: equal sizes keep the label order, as Python's `sorted` does.
    sets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    sets
}

/// scipy's `_connected_components_directed` (scipy/sparse/csgraph/_traversal.pyx): Pearce's
/// iterative variant of Tarjan's algorithm with a doubly linked DFS stack. Returns the component
/// label of each node, labels 0.. in scipy's order.
fn scc_labels_pearce(adj: &[Vec<usize>]) -> Vec<usize> {
    const VOID: i64 = -1;
    const END: i64 = -2;
    let n = adj.len();
    let mut lowlinks = vec![VOID; n]; // later reused as labels, as in scipy
    let mut ss = vec![VOID; n]; // the backtracked-nodes stack, linked through `ss`
    let mut ss_head = END;
    let mut stack_f = vec![VOID; n];
    let mut stack_b = vec![VOID; n];
    let mut index: i64 = 0;
    // Labels count down from n - 1 so that they never clash with lowlink values.
    let mut label: i64 = n as i64 - 1;
    for v0 in 0..n {
        if lowlinks[v0] != VOID {
            continue;
        }
        let mut stack_head = v0 as i64;
        stack_f[v0] = END;
        stack_b[v0] = END;
        while stack_head != END {
            let v = stack_head as usize;
            if lowlinks[v] == VOID {
                lowlinks[v] = index;
                index += 1;
                for &w in &adj[v] {
                    if lowlinks[w] == VOID {
                        if stack_f[w] != VOID {
                            // w is already on the DFS stack: excise it, it moves to the top.
                            let f = stack_f[w];
                            let b = stack_b[w];
                            if b != END {
                                stack_f[b as usize] = f;
                            }
                            if f != END {
                                stack_b[f as usize] = b;
                            }
                        }
                        stack_f[w] = stack_head;
                        stack_b[w] = END;
                        stack_b[stack_head as usize] = w as i64;
                        stack_head = w as i64;
                    }
                }
            } else {
                stack_head = stack_f[v];
                if stack_head >= 0 {
                    stack_b[stack_head as usize] = END;
                }
                stack_f[v] = VOID;
                stack_b[v] = VOID;
                let mut root = true;
                let mut low_v = lowlinks[v];
                for &w in &adj[v] {
                    let low_w = lowlinks[w];
                    if low_w < low_v {
                        low_v = low_w;
                        root = false;
                    }
                }
                lowlinks[v] = low_v;
                if root {
                    index -= 1;
                    while ss_head != END && lowlinks[v] <= lowlinks[ss_head as usize] {
                        let w = ss_head as usize;
                        ss_head = ss[w];
                        ss[w] = VOID;
                        lowlinks[w] = label;
                        index -= 1;
                    }
                    lowlinks[v] = label;
                    label -= 1;
                } else {
                    ss[v] = ss_head;
                    ss_head = v as i64;
                }
            }
        }
    }
    lowlinks
        .iter()
        .map(|&l| (n as i64 - 1 - l) as usize)
        .collect()
}

/// The largest strongly connected set of the count graph (original state indices, ascending):
/// deeptime's `connected_sets(directed=True)[0]`, ties included. Empty for a 0 x 0 matrix.
pub fn largest_connected_set(counts: &DMatrix<f64>) -> Vec<usize> {
    connected_sets(counts)
        .into_iter()
        .next()
        .unwrap_or_default()
}

/// Serialises a matrix as a list of rows, the shape JSON readers (and numpy) expect, instead of
/// nalgebra's column-major layout.
fn rows_serde<S: Serializer>(m: &DMatrix<f64>, s: S) -> std::result::Result<S::Ok, S::Error> {
    let rows: Vec<Vec<f64>> = (0..m.nrows())
        .map(|i| m.row(i).iter().copied().collect())
        .collect();
    rows.serialize(s)
}

/// A Markov state model estimated at one lag time, on the largest strongly connected set of the
/// observed states.
#[derive(Clone, Debug, Serialize)]
pub struct Msm {
    /// Lag time in frames.
    pub lag: usize,
    /// The active set: original state indices (ascending) of the MSM's states. Matrix and vector
    /// index `a` of this model refers to state `states[a]`.
    pub states: Vec<usize>,
    /// Row-stochastic transition matrix over the active set (serialised as a list of rows).
    #[serde(serialize_with = "rows_serde")]
    pub transition_matrix: DMatrix<f64>,
    /// Stationary distribution over the active set (sums to 1).
    pub stationary: Vec<f64>,
    /// Sliding-window counts restricted to the active set (serialised as a list of rows).
    #[serde(serialize_with = "rows_serde")]
    pub counts: DMatrix<f64>,
    /// Whether the transition matrix was estimated reversible (detailed balance).
    pub reversible: bool,
}

impl Msm {
    /// Estimates an MSM from discrete trajectories at `lag` frames: sliding-window counts, the
    /// largest strongly connected set (the first, in [`connected_sets`] order, with any counts),
    /// then
    /// - `reversible = true`: deeptime's reversible maximum-likelihood estimator (the same
    ///   fixed-point iteration on the stationary vector, up to [`REVERSIBLE_MAXITER`] iterations
    ///   until the largest relative change is at most [`REVERSIBLE_MAXERR`]). As in deeptime, an
    ///   estimate that has not converged by then is returned anyway. `stationary` is the exact
    ///   stationary vector of the returned matrix (normalised row sums of the symmetric
    ///   flux matrix), so detailed balance holds to rounding; deeptime reports the last iterate,
    ///   which differs from it by about the tolerance.
    /// - `reversible = false`: row-normalised counts; `stationary` solves `pi T = pi`.
    ///
    /// Errors: no trajectories, a state `>= n_states` (naming trajectory and frame), `lag` 0 or
    /// not shorter than any trajectory, no counts in any connected set, or counts that the
    /// reversible estimator cannot fit.
    pub fn estimate(
        dtrajs: &[Vec<u32>],
        lag: usize,
        n_states: usize,
        reversible: bool,
    ) -> Result<Msm> {
        validate_dtrajs(dtrajs, n_states)?;
        validate_lag(dtrajs, lag)?;
        let full = count_matrix(dtrajs, lag, n_states);
        // The largest set with any counts: deeptime fits every connected set, skips those it
        // cannot fit (a lone state without counts) and selects the first that remains. Only
        // singletons can lack counts, so this is the largest set unless all sets are singletons.
        let restrict = |states: &[usize]| {
            DMatrix::from_fn(states.len(), states.len(), |a, b| {
                full[(states[a], states[b])]
            })
        };
        let (states, counts) = connected_sets(&full)
            .into_iter()
            .map(|s| {
                let c = restrict(&s);
                (s, c)
            })
            .find(|(_, c)| c.sum() > 0.0)
            .with_context(|| {
                format!("msm: at lag {lag} no state has a transition to itself or is connected to another")
            })?;
        let (transition_matrix, stationary) = if reversible {
            mle_reversible(&counts, REVERSIBLE_MAXERR, REVERSIBLE_MAXITER)
                .with_context(|| format!("msm: reversible estimate at lag {lag}"))?
        } else {
            let t = row_normalise(&counts);
            let pi = stationary_distribution(&t)
                .with_context(|| format!("msm: stationary distribution at lag {lag}"))?;
            (t, pi)
        };
        Ok(Msm {
            lag,
            states,
            transition_matrix,
            stationary,
            counts,
            reversible,
        })
    }

    /// Number of states in the active set.
    pub fn n_states(&self) -> usize {
        self.states.len()
    }

    /// All eigenvalues as (real, imaginary) pairs, sorted by decreasing magnitude (deeptime's
    /// order). Reversible: real, from the symmetric matrix `D^{1/2} T D^{-1/2}` with
    /// `D = diag(stationary)`, which is better conditioned than a general eigensolver. Otherwise
    /// from nalgebra's real Schur form.
    fn eigenvalues_complex(&self) -> Vec<(f64, f64)> {
        let n = self.n_states();
        let mut ev: Vec<(f64, f64)> = if self.reversible {
            let sq: Vec<f64> = self.stationary.iter().map(|p| p.sqrt()).collect();
            let s = DMatrix::from_fn(n, n, |i, j| {
                let a = sq[i] / sq[j] * self.transition_matrix[(i, j)];
                let b = sq[j] / sq[i] * self.transition_matrix[(j, i)];
                // Symmetric in exact arithmetic; averaging removes the rounding asymmetry.
                0.5 * (a + b)
            });
            SymmetricEigen::new(s)
                .eigenvalues
                .iter()
                .map(|&x| (x, 0.0))
                .collect()
        } else {
            self.transition_matrix
                .complex_eigenvalues()
                .iter()
                .map(|c| (c.re, c.im))
                .collect()
        };
        ev.sort_by(|a, b| {
            let ma = a.0.hypot(a.1);
            let mb = b.0.hypot(b.1);
            mb.total_cmp(&ma)
                .then(b.0.total_cmp(&a.0))
                .then(b.1.total_cmp(&a.1))
        });
        ev
    }

    /// The `k` eigenvalues of largest magnitude (the first is the stationary eigenvalue 1),
    /// sorted by decreasing magnitude; real parts (exactly real for a reversible model). At most
    /// the number of states are returned.
    pub fn eigenvalues(&self, k: usize) -> Vec<f64> {
        self.eigenvalues_complex()
            .into_iter()
            .take(k)
            .map(|(re, _)| re)
            .collect()
    }

    /// Implied timescales `-lag / ln|lambda_i|` of eigenvalues `i = 1..=k` (the stationary
    /// process excluded), in frames: multiply by the frame interval for physical time. At most
    /// `n_states - 1` are returned. As in deeptime, `|lambda| = 1` (within 1e-14) gives infinity
    /// and `lambda = 0` gives 0.
    pub fn timescales(&self, k: usize) -> Vec<f64> {
        self.eigenvalues_complex()
            .into_iter()
            .skip(1)
            .take(k)
            .map(|(re, im)| {
                let m = re.hypot(im);
                if (m - 1.0).abs() <= 1e-14 {
                    f64::INFINITY
                } else {
                    -(self.lag as f64) / m.ln()
                }
            })
            .collect()
    }

    /// Mean first passage times to the set `to` from every active state, in frames (zero on
    /// `to`): the solution of `m_x = lag + sum_z T_xz m_z` off the target.
    fn mfpt_to(&self, to: &[usize]) -> DVector<f64> {
        let n = self.n_states();
        let mut a = DMatrix::<f64>::identity(n, n) - &self.transition_matrix;
        let mut b = DVector::<f64>::from_element(n, 1.0);
        for &t in to {
            a.row_mut(t).fill(0.0);
            a[(t, t)] = 1.0;
            b[t] = 0.0;
        }
        let m = a
            .lu()
            .solve(&b)
            .expect("mfpt: singular system (is the target reachable from every state?)");
        m * self.lag as f64
    }

    fn check_set(&self, what: &str, set: &[usize]) {
        assert!(!set.is_empty(), "mfpt: the {what} set is empty");
        let n = self.n_states();
        if let Some(&s) = set.iter().find(|&&s| s >= n) {
            panic!("mfpt: {what} state {s} is not in the active set (indices 0..{n})");
        }
    }

    /// Mean first passage time from set `from` to set `to`, in frames: the passage times from
    /// each state of `from`, averaged with the stationary weights restricted to `from`. This is
    /// deeptime's `msm.mfpt(from, to)` (its value is already in frames, `lag` included).
    /// Indices are into the active set ([`Msm::states`]).
    ///
    /// # Panics
    /// If a set is empty or holds an index outside the active set.
    pub fn mfpt(&self, from: &[usize], to: &[usize]) -> f64 {
        self.check_set("from", from);
        self.check_set("to", to);
        let m = self.mfpt_to(to);
        let w: f64 = from.iter().map(|&a| self.stationary[a]).sum();
        from.iter().map(|&a| self.stationary[a] / w * m[a]).sum()
    }

    /// State-to-state mean first passage times in frames: `M[(i, j)] = mfpt(&[i], &[j])`, zero on
    /// the diagonal (the state is its own target, as in deeptime; the mean *return* time would
    /// be `lag / stationary[i]`).
    pub fn mfpt_matrix(&self) -> DMatrix<f64> {
        let n = self.n_states();
        let cols: Vec<DVector<f64>> = (0..n).into_par_iter().map(|j| self.mfpt_to(&[j])).collect();
        DMatrix::from_fn(n, n, |i, j| cols[j][i])
    }

    /// [`Msm::mfpt_matrix`] that returns an error instead of panicking when a passage-time
    /// system is singular (a target unreachable, or a transition matrix degenerate to rounding).
    pub fn try_mfpt_matrix(&self) -> Result<DMatrix<f64>> {
        let n = self.n_states();
        let cols: Vec<DVector<f64>> = (0..n)
            .into_par_iter()
            .map(|j| {
                let mut a = DMatrix::<f64>::identity(n, n) - &self.transition_matrix;
                let mut b = DVector::<f64>::from_element(n, 1.0);
                a.row_mut(j).fill(0.0);
                a[(j, j)] = 1.0;
                b[j] = 0.0;
                let m = a.lu().solve(&b).with_context(|| {
                    format!("mfpt: singular system for target state {j} (is it reachable from every state?)")
                })?;
                ensure!(
                    m.iter().all(|v| v.is_finite()),
                    "mfpt: non-finite passage times to state {j}"
                );
                Ok(m * self.lag as f64)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(DMatrix::from_fn(n, n, |i, j| cols[j][i]))
    }

    /// Propagates a distribution over the active set `steps` lag times: `p0^T T^steps`,
    /// normalised to sum 1 (so `p0` may be any non-negative weights), as deeptime's
    /// `msm.propagate(p0, steps)`.
    ///
    /// # Panics
    /// If `p0` does not have one entry per active state.
    pub fn propagate(&self, p0: &[f64], steps: usize) -> Vec<f64> {
        let n = self.n_states();
        assert_eq!(
            p0.len(),
            n,
            "propagate: p0 has {} entries for {n} active states",
            p0.len()
        );
        let mut p = DVector::from_column_slice(p0).transpose();
        for _ in 0..steps {
            p = &p * &self.transition_matrix;
        }
        let s = p.sum();
        p.iter().map(|x| x / s).collect()
    }
}

/// Row-normalised counts (the non-reversible maximum-likelihood estimate). Rows without counts
/// (impossible on a strongly connected set of two or more states) become the identity row.
fn row_normalise(c: &DMatrix<f64>) -> DMatrix<f64> {
    let mut t = c.clone();
    for i in 0..t.nrows() {
        let s: f64 = t.row(i).sum();
        if s > 0.0 {
            t.row_mut(i).scale_mut(1.0 / s);
        } else {
            t[(i, i)] = 1.0;
        }
    }
    t
}

/// The stationary distribution of an ergodic transition matrix: solves `(T^T - I) pi = 0` with
/// the last equation replaced by `sum pi = 1`.
fn stationary_distribution(t: &DMatrix<f64>) -> Result<Vec<f64>> {
    let n = t.nrows();
    let mut a = t.transpose() - DMatrix::<f64>::identity(n, n);
    a.row_mut(n - 1).fill(1.0);
    let mut b = DVector::<f64>::zeros(n);
    b[n - 1] = 1.0;
    let pi = a
        .lu()
        .solve(&b)
        .context("singular system: the chain is not ergodic")?;
    let s = pi.sum();
    Ok(pi.iter().map(|x| x / s).collect())
}

/// deeptime's dense reversible maximum-likelihood estimator (`mle_trev_dense`, ported loop for
/// loop so that the iterates agree to rounding): a fixed-point iteration on the stationary
/// vector `x` with `x_i <- sum_j (C_ij + C_ji) / (c_i / x_i + c_j / x_j)` (`c` the row sums),
/// normalised each time, until the largest relative change is at most `maxerr`; then
/// `X_ij = (C_ij + C_ji) / (c_i / x_i + c_j / x_j)` and `T_ij = X_ij / sum_j X_ij`. Returns `T`
/// and its stationary vector (normalised row sums of the symmetric `X`).
fn mle_reversible(
    c: &DMatrix<f64>,
    maxerr: f64,
    maxiter: usize,
) -> Result<(DMatrix<f64>, Vec<f64>)> {
    let n = c.nrows();
    let sum_c: Vec<f64> = (0..n).map(|i| c.row(i).sum()).collect();
    if let Some(i) = sum_c.iter().position(|&s| s == 0.0) {
        bail!("state {i} of the active set has no outgoing counts");
    }
    let cct = c + c.transpose();
    // Row-major copy: the inner loops run over j.
    let cct: Vec<f64> = (0..n)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .map(|(i, j)| cct[(i, j)])
        .collect();
    let mut x_new: Vec<f64> = (0..n)
        .map(|i| cct[i * n..(i + 1) * n].iter().sum())
        .collect();
    let norm: f64 = x_new.iter().sum();
    x_new.iter_mut().for_each(|v| *v /= norm);
    let mut x = vec![0.0; n];
    let mut iteration = 0usize;
    loop {
        std::mem::swap(&mut x, &mut x_new);
        let mut x_norm = 0.0;
        for i in 0..n {
            let mut s = 0.0;
            let row = &cct[i * n..(i + 1) * n];
            for j in 0..n {
                s += row[j] / (sum_c[i] / x[i] + sum_c[j] / x[j]);
            }
            ensure!(
                s != 0.0 && !s.is_nan(),
                "the stationary iterate of state {i} became zero or NaN"
            );
            x_new[i] = s;
            x_norm += s;
        }
        for (i, v) in x_new.iter_mut().enumerate() {
            *v /= x_norm;
            ensure!(
                *v > REVERSIBLE_EPS_MU,
                "the stationary iterate of state {i} fell below {REVERSIBLE_EPS_MU}"
            );
        }
        iteration += 1;
        let mut rel_err: f64 = 0.0;
        for (a, b) in x.iter().zip(&x_new) {
            let mean = 0.5 * (a + b);
            if mean > 0.0 {
                rel_err = rel_err.max(((a - b) / mean).abs());
            }
        }
        if !(rel_err > maxerr && iteration < maxiter) {
            break;
        }
    }
    let mut t = DMatrix::<f64>::zeros(n, n);
    let mut rows = vec![0.0; n];
    for i in 0..n {
        let mut s = 0.0;
        for j in 0..n {
            let v = cct[i * n + j] / (sum_c[i] / x_new[i] + sum_c[j] / x_new[j]);
            t[(i, j)] = v;
            s += v;
        }
        rows[i] = s;
        for j in 0..n {
            t[(i, j)] /= s;
        }
    }
    let total: f64 = rows.iter().sum();
    Ok((t, rows.iter().map(|r| r / total).collect()))
}

/// Implied timescales over several lag times (see [`implied_timescales`]).
#[derive(Clone, Debug, Serialize)]
pub struct ItsResult {
    /// The lag times, in frames, in the order given.
    pub lags: Vec<usize>,
    /// `timescales[l][i]`: the `(i+1)`-th implied timescale at `lags[l]`, in frames; NaN where
    /// the active set at that lag has too few states to define it (serialised as `null`).
    pub timescales: Vec<Vec<f64>>,
}

/// Implied timescales of MSMs estimated at each of `lags` (in parallel over lags), `k` per lag,
/// padded with NaN where the active set has at most `i + 1` states. Errors as
/// [`Msm::estimate`], naming the lag.
pub fn implied_timescales(
    dtrajs: &[Vec<u32>],
    lags: &[usize],
    n_states: usize,
    k: usize,
    reversible: bool,
) -> Result<ItsResult> {
    validate_dtrajs(dtrajs, n_states)?;
    let timescales = lags
        .par_iter()
        .map(|&lag| {
            let msm = Msm::estimate(dtrajs, lag, n_states, reversible)
                .with_context(|| format!("implied timescales at lag {lag}"))?;
            let mut ts = msm.timescales(k);
            ts.resize(k, f64::NAN);
            Ok(ts)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ItsResult {
        lags: lags.to_vec(),
        timescales,
    })
}

/// [`implied_timescales`] that never fails for one lag: where no MSM can be estimated at a lag
/// (or the trajectories are invalid) that lag's timescales are NaN. For scans over degenerate
/// partitions, whose long lags may have no counts.
pub fn implied_timescales_lenient(
    dtrajs: &[Vec<u32>],
    lags: &[usize],
    n_states: usize,
    k: usize,
) -> ItsResult {
    let ok = validate_dtrajs(dtrajs, n_states).is_ok();
    let timescales = lags
        .par_iter()
        .map(|&lag| {
            let mut ts = if ok {
                Msm::estimate(dtrajs, lag, n_states, true)
                    .map(|m| m.timescales(k))
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            ts.resize(k, f64::NAN);
            ts
        })
        .collect();
    ItsResult {
        lags: lags.to_vec(),
        timescales,
    }
}

/// A Chapman-Kolmogorov test of an MSM on its own states (see [`ck_test`]).
#[derive(Clone, Debug, Serialize)]
pub struct CkTest {
    /// The reference lag time, in frames.
    pub lag: usize,
    /// Multiples of `lag`: `0, 1, ..., mlags` (time `steps[s] * lag` frames).
    pub steps: Vec<usize>,
    /// The reference MSM's active set (original state indices): row and column `i` of every
    /// matrix below is state `states[i]`.
    pub states: Vec<usize>,
    /// `predictions[s][i][j]`: the reference model's probability to be in `j` after
    /// `steps[s]` lags when starting in `i`, i.e. `(T(lag)^steps[s])_ij` (identity at step 0).
    pub predictions: Vec<Vec<Vec<f64>>>,
    /// `estimates[s][i][j]`: the same probability from the MSM estimated directly at lag
    /// `steps[s] * lag` (identity at step 0). When that model's active set lacks `j` the entry is
    /// 0; when it lacks `i` the row is NaN (no start distribution; serialised as `null`), as in
    /// deeptime.
    pub estimates: Vec<Vec<Vec<f64>>>,
}

/// The Chapman-Kolmogorov test with one-hot memberships over the reference MSM's active states:
/// deeptime's `ck_test(models, MembershipsObservable(msm, identity), test_model=msm)` with
/// `models` the MSMs at `n * lag`, `n = 1..=mlags`, lag 0 included. Predictions are
/// `T(lag)^n`, estimates the transition matrices estimated at `n * lag`, mapped onto the
/// reference states.
///
/// (deeptime maps states that are active at `n * lag` but not at `lag` onto reference state 0,
/// a quirk not copied here: such states start with zero probability.)
pub fn ck_test(
    dtrajs: &[Vec<u32>],
    lag: usize,
    n_states: usize,
    mlags: usize,
    reversible: bool,
) -> Result<CkTest> {
    validate_dtrajs(dtrajs, n_states)?;
    ensure!(mlags >= 1, "ck_test: mlags must be at least 1");
    let models = (1..=mlags)
        .into_par_iter()
        .map(|m| {
            let l = m.checked_mul(lag).context("ck_test: lag overflow")?;
            Msm::estimate(dtrajs, l, n_states, reversible)
                .with_context(|| format!("ck_test: MSM at {m} x lag {lag} = {l} frames"))
        })
        .collect::<Result<Vec<_>>>()?;
    let reference = &models[0];
    let n = reference.n_states();
    let to_rows = |m: &DMatrix<f64>| -> Vec<Vec<f64>> {
        (0..m.nrows())
            .map(|i| m.row(i).iter().copied().collect())
            .collect()
    };
    let eye = DMatrix::<f64>::identity(n, n);
    let mut predictions = vec![to_rows(&eye)];
    let mut estimates = vec![to_rows(&eye)];
    let mut power = eye.clone();
    for model in &models {
        power = &power * &reference.transition_matrix;
        // deeptime normalises each propagated row to sum 1.
        let mut p = power.clone();
        for i in 0..n {
            let s = p.row(i).sum();
            p.row_mut(i).scale_mut(1.0 / s);
        }
        predictions.push(to_rows(&p));
        let pos: Vec<Option<usize>> = reference
            .states
            .iter()
            .map(|s| model.states.iter().position(|t| t == s))
            .collect();
        let est = (0..n)
            .map(|i| match pos[i] {
                None => vec![f64::NAN; n],
                Some(a) => {
                    let row = model.transition_matrix.row(a);
                    let s = row.sum();
                    pos.iter()
                        .map(|pj| pj.map_or(0.0, |b| row[b] / s))
                        .collect()
                }
            })
            .collect();
        estimates.push(est);
    }
    Ok(CkTest {
        lag,
        steps: (0..=mlags).collect(),
        states: reference.states.clone(),
        predictions,
        estimates,
    })
}
