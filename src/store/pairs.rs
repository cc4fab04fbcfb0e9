//! Time-lagged pairs (x_t, x_{t+tau}) across the trajectories of a dataset, split into training
//! and validation sets, shuffled by seed, and gathered into batches straight from the memory maps
//! by a background thread.

use super::Dataset;
use crate::testing::Rng;
use anyhow::{bail, ensure, Result};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The lag time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Lag {
    /// In saved frames.
    Frames(usize),
    /// In picoseconds; converted per trajectory with its time step.
    Time(f64),
}

/// How pairs are split between training and validation.
#[derive(Clone, Debug, PartialEq)]
pub enum Split {
    /// The first `train_fraction` of every trajectory trains, the rest validates; a pair never
    /// straddles the boundary.
    ByTime {
        /// Fraction of each trajectory used for training (0.8 by default).
        train_fraction: f64,
    },
    /// Whole trajectories: these indices validate, the others train.
    ByTrajectory {
        /// Trajectories held out for validation.
        validation: Vec<usize>,
    },
}

impl Default for Split {
    fn default() -> Self {
        Self::ByTime {
            train_fraction: 0.8,
        }
    }
}

/// A pair: frames `t` and `t + lag` of trajectory `traj`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairIndex {
    /// Trajectory index.
    pub traj: u32,
    /// First frame.
    pub t: u32,
    /// Lag in frames.
    pub lag: u32,
}

/// The pairs of a dataset at one lag time.
#[derive(Clone, Debug)]
pub struct LaggedPairs {
    /// Training pairs.
    pub train: Vec<PairIndex>,
    /// Validation pairs.
    pub validation: Vec<PairIndex>,
    /// Lag in frames for each trajectory.
    pub lag_frames: Vec<usize>,
}

impl LaggedPairs {
    /// All pairs at `lag`, split by `split`. Fails, naming the trajectory, when the lag does not
    /// fit in a trajectory (or in its training or validation part).
    pub fn new(ds: &Dataset, lag: Lag, split: &Split) -> Result<Self> {
        let mut out = Self {
            train: Vec::new(),
            validation: Vec::new(),
            lag_frames: Vec::new(),
        };
        for (i, (entry, t)) in ds
            .manifest
            .trajectories
            .iter()
            .zip(&ds.trajectories)
            .enumerate()
        {
            let lag = match lag {
                Lag::Frames(n) => n,
                Lag::Time(ps) => {
                    let Some(dt) = entry.time_step_ps.filter(|d| *d > 0.0) else {
                        bail!(
                            "trajectory {i} ({}) has no time step: give the lag in frames, or import with --dt",
                            entry.source.path
                        );
                    };
                    let frames = ps / dt;
                    ensure!(
                        (frames - frames.round()).abs() < 1e-6 * frames.max(1.0) && frames.round() >= 1.0,
                        "lag {ps} ps is not a whole number of frames of {dt} ps in trajectory {i} ({})",
                        entry.source.path
                    );
                    frames.round() as usize
                }
            };
            ensure!(lag >= 1, "the lag must be at least one frame");
            let n = t.frames();
            let pairs = |from: usize, to: usize| -> Vec<PairIndex> {
                (from..to.saturating_sub(lag).max(from))
                    .map(|s| PairIndex {
                        traj: i as u32,
                        t: s as u32,
                        lag: lag as u32,
                    })
                    .collect()
            };
            match split {
                Split::ByTime { train_fraction } => {
                    ensure!(
                        (0.0..=1.0).contains(train_fraction),
                        "train fraction {train_fraction} is not between 0 and 1"
                    );
                    let cut = ((n as f64) * train_fraction).round() as usize;
                    for (part, from, to) in [("training", 0, cut), ("validation", cut, n)] {
                        let len = to - from;
                        if len > 0 && lag >= len && (*train_fraction > 0.0 && *train_fraction < 1.0)
                        {
                            bail!(
                                "lag of {lag} frames is longer than the {part} part ({len} frames) of trajectory {i} ({})",
                                entry.source.path
                            );
                        }
                    }
                    out.train.extend(pairs(0, cut));
                    out.validation.extend(pairs(cut, n));
                }
                Split::ByTrajectory { validation } => {
                    ensure!(
                        lag < n,
                        "lag of {lag} frames is longer than trajectory {i} ({}, {n} frames)",
                        entry.source.path
                    );
                    if validation.contains(&i) {
                        out.validation.extend(pairs(0, n));
                    } else {
                        out.train.extend(pairs(0, n));
                    }
                }
            }
            out.lag_frames.push(lag);
        }
        if let Split::ByTrajectory { validation } = split {
            for &v in validation {
                ensure!(
                    v < ds.trajectories.len(),
                    "validation trajectory {v} does not exist"
                );
            }
        }
        ensure!(!out.train.is_empty(), "no training pairs at this lag");
        Ok(out)
    }
}

/// A batch of pairs: coordinates `[batch, atoms, 3]` of x_t and of x_{t+tau}. When a batch from
/// a [`BatchLoader`] is dropped, its buffers go back to the loader for the next batch: fresh
/// multi-megabyte buffers per batch would cost more in page faults than the copying itself.
#[derive(Debug)]
pub struct Batch {
    /// The epoch this batch belongs to.
    pub epoch: u64,
    /// Whether it is the last batch of its epoch.
    pub last_in_epoch: bool,
    /// The pairs in this batch.
    pub pairs: Vec<PairIndex>,
    /// Coordinates at t.
    pub x_t: Vec<f32>,
    /// Coordinates at t + lag.
    pub x_lag: Vec<f32>,
    recycle: Option<SyncSender<(Vec<f32>, Vec<f32>)>>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(tx) = self.recycle.take() {
            let _ = tx.try_send((
                std::mem::take(&mut self.x_t),
                std::mem::take(&mut self.x_lag),
            ));
        }
    }
}

/// Gathers batches in a background thread, `prefetch` ahead of the consumer, for a range of
/// epochs. Each epoch visits every pair once in an order drawn from `seed` and the epoch number,
/// so runs are reproducible and a resumed run can restart at any epoch.
pub struct BatchLoader {
    rx: Receiver<Batch>,
    worker: Option<JoinHandle<()>>,
}

impl BatchLoader {
    /// Starts the loader over `pairs` for the given epochs.
    pub fn new(
        ds: Arc<Dataset>,
        pairs: Vec<PairIndex>,
        batch_size: usize,
        seed: u64,
        epochs: std::ops::Range<u64>,
        shuffle: bool,
        prefetch: usize,
    ) -> Self {
        let (tx, rx) = sync_channel(prefetch.max(1));
        // Buffers of dropped batches come back here; at most prefetch + 2 batches are alive.
        let (recycle_tx, recycle_rx) = sync_channel::<(Vec<f32>, Vec<f32>)>(prefetch.max(1) + 2);
        let worker = std::thread::spawn(move || {
            let stride = ds.natoms() * 3;
            let batch_size = batch_size.max(1);
            for epoch in epochs {
                let mut order = pairs.clone();
                if shuffle {
                    let mut rng = Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                    for i in (1..order.len()).rev() {
                        order.swap(i, rng.below(i + 1));
                    }
                }
                let nbatches = order.len().div_ceil(batch_size);
                for (k, chunk) in order.chunks(batch_size).enumerate() {
                    let (mut x_t, mut x_lag) = recycle_rx.try_recv().unwrap_or_else(|_| {
                        (
                            Vec::with_capacity(batch_size * stride),
                            Vec::with_capacity(batch_size * stride),
                        )
                    });
                    x_t.clear();
                    x_lag.clear();
                    let mut b = Batch {
                        epoch,
                        last_in_epoch: k + 1 == nbatches,
                        pairs: chunk.to_vec(),
                        x_t,
                        x_lag,
                        recycle: Some(recycle_tx.clone()),
                    };
                    for p in chunk {
                        let t = &ds.trajectories[p.traj as usize];
                        b.x_t.extend_from_slice(t.frame(p.t as usize));
                        b.x_lag.extend_from_slice(t.frame((p.t + p.lag) as usize));
                    }
                    if tx.send(b).is_err() {
                        return; // the consumer stopped early
                    }
                }
            }
        });
        Self {
            rx,
            worker: Some(worker),
        }
    }
}

impl Iterator for BatchLoader {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        self.rx.recv().ok()
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        // Closing the channel stops the worker at its next send.
        let (_, rx) = sync_channel(1);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
