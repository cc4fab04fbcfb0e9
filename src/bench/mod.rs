//! `hiermd bench`: speed and memory of each kernel and of whole training steps, as a table and
//! as JSON, and the fixtures of the numerical cross-check with the PyTorch peer in
//! `benches/peer` (see benches/README.md for the side-by-side runs and the scaling curves).
//!
//! Times are medians of repeated runs after warm-up (the device synchronised around each).
//! Memory is the process's resident set: its high-water mark (`VmHWM`) is reset through
//! `/proc/self/clear_refs` after the setup (model, optimiser, input batch), so "step peak MB" is
//! what the measured work adds at its peak over the resident set before it, on the host; the
//! PyTorch peer measures itself the same way, so the two compare. On cuda the device memory the
//! tape holds is reported besides.

pub mod attention;
pub mod dump;
pub mod kernels;
pub mod scaling;
pub mod steps;
pub mod systems;

use crate::Device;
use anyhow::Result;
use serde_json::{json, Map, Value};
use std::time::Instant;

/// Resident set size and its high-water mark, in MB, from `/proc/self/status` (None elsewhere).
pub fn memory_mb() -> Option<(f64, f64)> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |k: &str| -> Option<f64> {
        let l = s.lines().find(|l| l.starts_with(k))?;
        let kb: f64 = l[k.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets the resident-set high-water mark to the current resident set (Linux 4.0+); false when
/// the kernel does not allow it (the peak then includes the setup, and the JSON says so).
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Timing and memory of one measured piece of work.
#[derive(Clone, Debug)]
pub struct Measured {
    /// Each timed repetition, in seconds.
    pub times: Vec<f64>,
    /// Resident set before the work (MB).
    pub rss_before_mb: f64,
    /// Peak resident set during warm-up and repetitions (MB).
    pub peak_rss_mb: f64,
    /// Whether the high-water mark could be reset after the setup.
    pub peak_reset: bool,
}

impl Measured {
    /// The median time in seconds.
    pub fn median(&self) -> f64 {
        median(&self.times)
    }

    /// What the work added to the resident set at its peak (MB).
    pub fn added_mb(&self) -> f64 {
        (self.peak_rss_mb - self.rss_before_mb).max(0.0)
    }

    /// The fields every JSON row carries.
    pub fn json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("median_s".into(), json!(self.median()));
        m.insert("times_s".into(), json!(self.times));
        m.insert("rss_before_mb".into(), json!(self.rss_before_mb));
        m.insert("peak_rss_mb".into(), json!(self.peak_rss_mb));
        m.insert("added_peak_mb".into(), json!(self.added_mb()));
        m.insert("peak_reset".into(), json!(self.peak_reset));
        m
    }
}

/// The median of `x` (the mean of the two middle values for an even count).
pub fn median(x: &[f64]) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    let mut v = x.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Runs `f` `warmup` times, then `repeats` timed times, synchronising `dev` around each; resets
/// the peak resident set first, so the peak covers exactly this work.
pub fn measure(
    dev: &Device,
    warmup: usize,
    repeats: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Measured> {
    dev.synchronize()?;
    let (rss_before_mb, _) = memory_mb().unwrap_or((0.0, 0.0));
    let peak_reset = reset_peak();
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut times = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    let (_, peak_rss_mb) = memory_mb().unwrap_or((0.0, 0.0));
    Ok(Measured {
        times,
        rss_before_mb,
        peak_rss_mb,
        peak_reset,
    })
}

/// The fields that say where a row was measured.
pub fn provenance(dev: &Device) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("impl".into(), json!("hiermd"));
    m.insert("device".into(), json!(dev.name()));
    m.insert("threads".into(), json!(rayon::current_num_threads()));
    m.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    m
}

/// `hiermd bench`'s arguments.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// What to measure.
    #[command(subcommand)]
    pub what: BenchCommand,
}

/// What `hiermd bench` measures.
#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Every kernel and a full training step: a table, and JSON with --json.
    Kernels(kernels::KernelsArgs),
    /// One token-model VAMP training step (forward of x_t and x_t+tau, VAMP-2 loss, backward,
    /// AdamW): pairs/s and peak memory. Prints one JSON line.
    Token(steps::TokenArgs),
    /// The atom stage (neighbor list, backbone, merge into residues): frames/s and peak memory
    /// of the forward (and of forward + backward with --backward). Prints one JSON line.
    Atoms(steps::AtomArgs),
    /// Fused or materialised equivariant attention, forward (and backward with --backward).
    /// Prints one JSON line.
    Attention(attention::AttentionArgs),
    /// The paper's scaling curves: training-step time and peak memory vs residues for windows
    /// w = 1, 2, 4, 8, with and without the residue graph convolution (one process per point).
    Scaling(scaling::ScalingArgs),
    /// Writes a cross-check fixture for the PyTorch peer (weights, inputs, hiermd's outputs and
    /// gradients).
    Dump(dump::DumpArgs),
}

/// Runs `hiermd bench`.
pub fn run(args: &BenchArgs, dev: &Device) -> Result<()> {
    match &args.what {
        BenchCommand::Kernels(a) => kernels::run(a, dev),
        BenchCommand::Token(a) => steps::run_token(a, dev),
        BenchCommand::Atoms(a) => steps::run_atoms(a, dev),
        BenchCommand::Attention(a) => attention::run(a, dev),
        BenchCommand::Scaling(a) => scaling::run(a, dev),
        BenchCommand::Dump(a) => dump::run(a, dev),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_memory() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        if let Some((rss, hwm)) = memory_mb() {
            assert!(rss > 0.0 && hwm >= rss * 0.5, "rss {rss} hwm {hwm}");
        }
        // The peak covers an allocation made inside the measured work.
        let m = measure(&Device::Cpu, 0, 1, || {
            let v = vec![1u8; 64 << 20];
            std::hint::black_box(&v);
            Ok(())
        })
        .unwrap();
        if m.peak_reset {
            assert!(m.added_mb() > 50.0, "added {} MB", m.added_mb());
        }
    }
}
