//! Seeded, counter-based dropout that keeps equivariance. Kernel: `cuda/dropout.cu`.
//!
//! The keep mask is never stored: element keys hash with the seed to a uniform number, so the
//! backward recomputes the forward's mask from `(p, seed, layout)` alone. Tensors are
//! `[outer, comps, inner]` ([`DropLayout`]) and element `(o, c, i)` uses key `o * inner + i`: the
//! xyz components of a vector channel (`[tokens, 3, H]`, comps = 3) are dropped together, so
//! dropout commutes with rotations; scalars use comps = 1. The hash is 64-bit integer math and the
//! comparison exact, so the cpu twin in f32 and the kernel produce bit-identical outputs.
//! The backward assigns `dx`.

use super::{expect_len, same_device, Real, CPU_CHUNK};
use crate::device::Device;
use crate::kernels::dropout as k;
use crate::launch::{launch, KernelArgs, LaunchConfig};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use rayon::prelude::*;

const THREADS: u32 = 256;

/// How a tensor splits into dropout keys: `[outer, comps, inner]`, element `(o, c, i)` at
/// `(o * comps + c) * inner + i` with key `o * inner + i` (shared by the `comps` components).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropLayout {
    /// Leading extent (tokens, rows).
    pub outer: usize,
    /// Components dropped together: 3 for vector features, 1 for scalars.
    pub comps: usize,
    /// Trailing extent (channels).
    pub inner: usize,
}

impl DropLayout {
    /// A layout for scalar features of `n` elements (one key per element).
    pub fn scalar(n: usize) -> Self {
        Self {
            outer: 1,
            comps: 1,
            inner: n,
        }
    }
    /// Elements covered.
    pub fn len(&self) -> usize {
        self.outer * self.comps * self.inner
    }
    /// Whether it covers no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Distinct keys (`outer * inner`).
    pub fn keys(&self) -> usize {
        self.outer * self.inner
    }
}

/// SplitMix64 of `seed ^ (key * golden ratio)`; `cuda/dropout.cu` computes the same.
fn hash(seed: u64, key: u64) -> u64 {
    let mut z = seed ^ key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether key `key` is kept: `(top 24 bits of hash(seed, key)) / 2^24 >= p`. The uniform is
/// exact in f32, so the comparison is the kernel's bit for bit.
pub fn dropout_keep(p: f32, seed: u64, key: u64) -> bool {
    let u = (hash(seed, key) >> 40) as f32 * (1.0 / 16_777_216.0);
    u >= p
}

/// The scale of kept elements, 1 / (1 - p), computed in f32 as the kernel receives it.
fn keep_scale(p: f32) -> f32 {
    1.0 / (1.0 - p)
}

fn check_p(op: &str, p: f32) -> Result<()> {
    ensure!(
        (0.0..1.0).contains(&p),
        "{op}: dropout probability p = {p} is not in [0, 1)"
    );
    Ok(())
}

/// The keep mask of every element (`layout.len()` entries, in element order): what
/// [`dropout_forward`] keeps for `(p, seed, layout)`. For tests.
pub fn dropout_mask_host(p: f32, seed: u64, layout: DropLayout) -> Vec<bool> {
    let DropLayout {
        outer,
        comps,
        inner,
    } = layout;
    let mut mask = vec![false; layout.len()];
    for o in 0..outer {
        for c in 0..comps {
            for i in 0..inner {
                mask[(o * comps + c) * inner + i] = dropout_keep(p, seed, (o * inner + i) as u64);
            }
        }
    }
    mask
}

/// CPU twin of `dropout_forward`: `y = x * keep / (1 - p)` with the f32 scale, and exactly 0 where
/// dropped (a select, so a dropped inf or NaN does not leak). In f32 it is the kernel bit for bit.
pub fn dropout_forward_host<R: Real>(x: &[R], y: &mut [R], p: f32, seed: u64, layout: DropLayout) {
    let scale = R::of(keep_scale(p) as f64);
    let (comps, inner) = (layout.comps, layout.inner);
    let per_outer = (comps * inner).max(1);
    // Chunks of elements, not of `outer`, so that a layout with outer = 1 still spreads over the
    // pool; the hash is recomputed per component, which is cheap on the host.
    y.par_chunks_mut(CPU_CHUNK)
        .zip(x.par_chunks(CPU_CHUNK))
        .enumerate()
        .for_each(|(chunk, (y, x))| {
            for (j, (y, &x)) in y.iter_mut().zip(x).enumerate() {
                let e = chunk * CPU_CHUNK + j;
                let key = (e / per_outer) * inner + e % inner;
                *y = if dropout_keep(p, seed, key as u64) {
                    x * scale
                } else {
                    R::of(0.0)
                };
            }
        });
}

/// CPU twin of `dropout_backward`: `dx = dy * keep / (1 - p)`, the forward's own mask.
pub fn dropout_backward_host<R: Real>(
    dy: &[R],
    dx: &mut [R],
    p: f32,
    seed: u64,
    layout: DropLayout,
) {
    dropout_forward_host(dy, dx, p, seed, layout)
}

/// Shared by forward and backward: the op is a fixed diagonal scaling, so its backward is itself.
fn apply(
    op: &str,
    x: &Tensor<f32>,
    y: &mut Tensor<f32>,
    p: f32,
    seed: u64,
    layout: DropLayout,
) -> Result<()> {
    let dev = same_device(op, x.device(), &[y.device()])?;
    check_p(op, p)?;
    ensure!(
        x.len() == layout.len(),
        "{op}: input has shape {:?} ({} elements) but the layout {layout:?} covers {}",
        x.shape(),
        x.len(),
        layout.len()
    );
    expect_len(op, "output", y, x.len())?;
    if layout.is_empty() {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            dropout_forward_host(x.host().unwrap(), y.host_mut().unwrap(), p, seed, layout);
            Ok(())
        }
        _ => launch(
            dev,
            &k::DROPOUT_FORWARD,
            LaunchConfig::for_elements(layout.keys(), THREADS),
            KernelArgs::new()
                .input(x)
                .output(y)
                .i64(layout.outer as i64)
                .i64(layout.comps as i64)
                .i64(layout.inner as i64)
                .f32(p)
                .f32(keep_scale(p))
                // The kernel's parameter is unsigned long long: the slot carries the same bits.
                .i64(seed as i64),
        ),
    }
}

/// `y = x * keep / (1 - p)` with keep drawn per key from `(seed, key)` (see [`DropLayout`] and
/// [`dropout_keep`]); dropped elements are exactly 0. `p` must be in [0, 1); p = 0 copies.
pub fn dropout_forward(
    x: &Tensor<f32>,
    y: &mut Tensor<f32>,
    p: f32,
    seed: u64,
    layout: DropLayout,
) -> Result<()> {
    apply("dropout_forward", x, y, p, seed, layout)
}

/// Backward of [`dropout_forward`] with the same `(p, seed, layout)`: `dx = dy * keep / (1 - p)`,
/// the mask recomputed, not stored. Assigns `dx`.
pub fn dropout_backward(
    dy: &Tensor<f32>,
    dx: &mut Tensor<f32>,
    p: f32,
    seed: u64,
    layout: DropLayout,
) -> Result<()> {
    apply("dropout_backward", dy, dx, p, seed, layout)
}
