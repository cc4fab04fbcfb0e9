//! Fused equivariant scaled dot-product attention (EqSDPA), FlashAttention-2 style: the core of
//! [`crate::nn::layers::EqAttention`] without the tokens x tokens matrix. Kernels:
//! `cuda/eqsdpa.cu`.
//!
//! Layout, per (frame b, head h) pair `bh = b * heads + h` (what `EqAttention` produces):
//! - `q`, `k`: `[BH, T, dh]` (any shape ending in `[T, dh]`), dh in {8, 16, 32, 64} (the f32
//!   ops; the bf16 / f16 ones take {16, 32, 64}, their tensor-core steps being 16 wide);
//! - `values`: `[BH, T, 4 dh]`: dh scalar values then the x, y, z components of dh vector
//!   channels; one softmax weighs all 4 dh columns;
//! - `mask`: optional `[B, T]` u8, 0 = padding key (its probability is exactly 0); the frame of
//!   row bh is `bh / heads`;
//! - `out`: `[BH, T, 4 dh]` = softmax(scale q k^T, masked) values;
//! - `lse`: `[BH, T]`, the natural log of each row's sum of exp(scale q k^T) over unmasked keys.
//!
//! A query whose keys are all masked gets `out = 0` and `lse = +inf`: the backward recomputes
//! `P = exp(scale q k - lse)`, which is then exactly 0, so its gradients are 0 (never NaN).
//!
//! The forward streams key/value tiles past a tile of queries with the online softmax (running
//! maximum and sum per query, the accumulator rescaled when the maximum grows) and saves lse; the
//! backward follows FlashAttention-2: one pass parallel over key tiles for dk and dvalues and one
//! parallel over query tiles for dq, both recomputing P from lse. FlashAttention-2's
//! `dS = P (dP - D)`, `D = rowsum(dout * out)`, is computed as `P (dout . (values - out))`: the
//! same quantity as one dot product, which does not cancel where attention is sharp.
//! Memory is linear in T. The cpu device runs the same tiled algorithm in Rust
//! ([`eqsdpa_forward_host`], [`eqsdpa_backward_host`]), each tile's products by the `gemm`
//! crate's SIMD kernels; [`eqsdpa_reference_host`] is the plain materialised f64 attention the
//! tests compare with. [`eqsdpa_forward_half`] and [`eqsdpa_backward_half`] are the bf16 / f16
//! forward and backward on the tensor cores (16-bit operands, f32 accumulation, f32 `out`, `lse`
//! and gradients).
//!
//! Gradients of the backward are activation gradients: assigned (`dq = ...`), never accumulated.
//! Results are deterministic on every device (no float atomics) in the default
//! [`EqsdpaBackwardMode::Deterministic`]; [`EqsdpaBackwardMode::AtomicDq`] trades that for one
//! pass over the key tiles on emu and cuda (FlashAttention-2's float-atomic dq).

use super::gemm::{GemmReal, HalfFloat};
use super::softmax::Ln;
use super::{same_device, Real};
use crate::device::Device;
use crate::kernels::eqsdpa as k;
use crate::launch::{launch, Kernel, KernelArgs, LaunchConfig};
use crate::tensor::{DType, Element, Tensor};
use anyhow::{ensure, Context, Result};
use rayon::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How the backward forms dq. dk and dvalues are the same in both modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EqsdpaBackwardMode {
    /// Two passes: dk and dvalues parallel over key tiles, dq parallel over query tiles, each
    /// recomputing P and dS; no float atomics, bitwise reproducible for a given shape.
    #[default]
    Deterministic,
    /// One pass over key tiles that also adds `scale dS k` into dq with float atomics (dq is
    /// zeroed first), so P and dS are computed once. NOT deterministic on emu and cuda: the order
    /// of the atomic adds varies, and dq differs from run to run (and from the deterministic
    /// mode) by f32 rounding. Whether it is faster depends on the GPU (one atomic per query,
    /// column and key tile); it has not been timed on one. The cpu device runs the
    /// deterministic algorithm for both modes.
    AtomicDq,
}

/// Sizes of one attention call, read from the tensors by the device entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EqsdpaDims {
    /// (frame, head) pairs: frames x heads.
    pub bh: usize,
    /// Tokens per frame (queries = keys).
    pub t: usize,
    /// Head width of q and k; values are 4 dh wide.
    pub dh: usize,
    /// Heads per frame (the mask has one row per frame, bh / heads of them).
    pub heads: usize,
}

impl EqsdpaDims {
    /// Width of a value row: 4 dh.
    pub fn dv(&self) -> usize {
        4 * self.dh
    }
    /// Frames: bh / heads.
    pub fn frames(&self) -> usize {
        self.bh / self.heads.max(1)
    }
}

// ---------------------------------------------------------------------------------------------
// Launch constants; each must match the kernel's configuration in cuda/eqsdpa.cu (the kernels
// check their block size).

/// Head widths of the f32 kernels, in the order of the `*_F32` tables ([`f32_index`]).
const F32_WIDTHS: [usize; 4] = [8, 16, 32, 64];
/// Head widths of the bf16 / f16 tensor-core kernels, in the order of the `*_MMA` and
/// bf16 / f16 tables ([`mma_index`]): multiples of the mma's k step of 16.
const MMA_WIDTHS: [usize; 3] = [16, 32, 64];
/// (queries per block, threads) of `eqsdpa_forward_f32_dh{8,16,32,64}` (`EqsdpaFwd*`).
const FWD_F32: [(usize, u32); 4] = [(64, 128), (64, 128), (64, 128), (64, 256)];
/// (keys per block, threads) of `eqsdpa_backward_{dkdv,atomic}_f32_dh*` (`EqsdpaDkv*`).
const DKDV_F32: [(usize, u32); 4] = [(64, 128), (32, 128), (32, 128), (16, 128)];
/// (queries per block, threads) of `eqsdpa_backward_dq_f32_dh*` (`EqsdpaDq*`).
const DQ_F32: [(usize, u32); 4] = [(64, 128), (32, 128), (16, 128), (8, 128)];
/// (queries per block, threads) of the tensor-core forward `eqsdpa_forward_{bf16,f16}_dh*`
/// (`EqsdpaMma*`): four warps of 16 queries.
const FWD_MMA: (usize, u32) = (64, 128);
/// (keys per block, threads) of the tensor-core `eqsdpa_backward_{dkdv,atomic}_{bf16,f16}_dh*`
/// (`EqsdpaMmaDkv*`): 16 keys per warp.
const DKDV_MMA: [(usize, u32); 3] = [(64, 128), (64, 128), (32, 64)];
/// (queries per block, threads) of `eqsdpa_backward_dq_{bf16,f16}_dh*` (`EqsdpaMmaDq*`).
const DQ_MMA: [(usize, u32); 3] = [(64, 128), (64, 128), (32, 64)];
/// (rows per block, threads) of `eqsdpa_backward_prep_{bf16,f16}`: a warp per row.
const PREP_MMA: (usize, u32) = (4, 128);
/// The grids are 1-D with a grid-stride loop over (bh, tile) pairs; more blocks than this add
/// nothing but scheduling.
const GRID_MAX: usize = 1 << 20;

/// Index of dh in the f32 tables ([`F32_WIDTHS`]); dh was checked by [`dims_of`].
fn f32_index(dh: usize) -> usize {
    F32_WIDTHS
        .iter()
        .position(|&w| w == dh)
        .expect("eqsdpa: f32 head width checked by dims_of")
}

/// Index of dh in the tensor-core tables ([`MMA_WIDTHS`]); dh was checked by [`dims_of`].
fn mma_index(dh: usize) -> usize {
    MMA_WIDTHS
        .iter()
        .position(|&w| w == dh)
        .expect("eqsdpa: tensor-core head width checked by dims_of")
}

static FWD_F32_KERNELS: [&Kernel; 4] = [
    &k::EQSDPA_FORWARD_F32_DH8,
    &k::EQSDPA_FORWARD_F32_DH16,
    &k::EQSDPA_FORWARD_F32_DH32,
    &k::EQSDPA_FORWARD_F32_DH64,
];
static FWD_BF16_KERNELS: [&Kernel; 3] = [
    &k::EQSDPA_FORWARD_BF16_DH16,
    &k::EQSDPA_FORWARD_BF16_DH32,
    &k::EQSDPA_FORWARD_BF16_DH64,
];
static FWD_F16_KERNELS: [&Kernel; 3] = [
    &k::EQSDPA_FORWARD_F16_DH16,
    &k::EQSDPA_FORWARD_F16_DH32,
    &k::EQSDPA_FORWARD_F16_DH64,
];
static DKDV_F32_KERNELS: [&Kernel; 4] = [
    &k::EQSDPA_BACKWARD_DKDV_F32_DH8,
    &k::EQSDPA_BACKWARD_DKDV_F32_DH16,
    &k::EQSDPA_BACKWARD_DKDV_F32_DH32,
    &k::EQSDPA_BACKWARD_DKDV_F32_DH64,
];
static ATOMIC_F32_KERNELS: [&Kernel; 4] = [
    &k::EQSDPA_BACKWARD_ATOMIC_F32_DH8,
    &k::EQSDPA_BACKWARD_ATOMIC_F32_DH16,
    &k::EQSDPA_BACKWARD_ATOMIC_F32_DH32,
    &k::EQSDPA_BACKWARD_ATOMIC_F32_DH64,
];

/// The 16-bit backward's kernels of one type: prep, then per dh: dk/dv, atomic, dq.
struct HalfBackwardKernels {
    prep: &'static Kernel,
    dkdv: [&'static Kernel; 3],
    atomic: [&'static Kernel; 3],
    dq: [&'static Kernel; 3],
}

static BWD_BF16: HalfBackwardKernels = HalfBackwardKernels {
    prep: &k::EQSDPA_BACKWARD_PREP_BF16,
    dkdv: [
        &k::EQSDPA_BACKWARD_DKDV_BF16_DH16,
        &k::EQSDPA_BACKWARD_DKDV_BF16_DH32,
        &k::EQSDPA_BACKWARD_DKDV_BF16_DH64,
    ],
    atomic: [
        &k::EQSDPA_BACKWARD_ATOMIC_BF16_DH16,
        &k::EQSDPA_BACKWARD_ATOMIC_BF16_DH32,
        &k::EQSDPA_BACKWARD_ATOMIC_BF16_DH64,
    ],
    dq: [
        &k::EQSDPA_BACKWARD_DQ_BF16_DH16,
        &k::EQSDPA_BACKWARD_DQ_BF16_DH32,
        &k::EQSDPA_BACKWARD_DQ_BF16_DH64,
    ],
};

static BWD_F16: HalfBackwardKernels = HalfBackwardKernels {
    prep: &k::EQSDPA_BACKWARD_PREP_F16,
    dkdv: [
        &k::EQSDPA_BACKWARD_DKDV_F16_DH16,
        &k::EQSDPA_BACKWARD_DKDV_F16_DH32,
        &k::EQSDPA_BACKWARD_DKDV_F16_DH64,
    ],
    atomic: [
        &k::EQSDPA_BACKWARD_ATOMIC_F16_DH16,
        &k::EQSDPA_BACKWARD_ATOMIC_F16_DH32,
        &k::EQSDPA_BACKWARD_ATOMIC_F16_DH64,
    ],
    dq: [
        &k::EQSDPA_BACKWARD_DQ_F16_DH16,
        &k::EQSDPA_BACKWARD_DQ_F16_DH32,
        &k::EQSDPA_BACKWARD_DQ_F16_DH64,
    ],
};

static DQ_F32_KERNELS: [&Kernel; 4] = [
    &k::EQSDPA_BACKWARD_DQ_F32_DH8,
    &k::EQSDPA_BACKWARD_DQ_F32_DH16,
    &k::EQSDPA_BACKWARD_DQ_F32_DH32,
    &k::EQSDPA_BACKWARD_DQ_F32_DH64,
];

// ---------------------------------------------------------------------------------------------
// CPU twins: the same tiled algorithm, rayon over (bh, tile), each tile's products by the `gemm`
// crate's SIMD kernels (single-threaded inside a rayon task).

/// Queries per tile (a rayon task of the forward; a step of the backward).
const CPU_QUERY_TILE: usize = 64;
/// Keys per tile (a step of the forward, and of a key group of the backward). A tile of k and
/// values (256 x 5 dh floats, 320 KB at dh = 64) stays in L2 while a query tile passes over it;
/// the ADK-sized token model (214 tokens) takes all its keys in one tile, so the forward's
/// online softmax never rescales there.
const CPU_KEY_TILE: usize = 256;

/// Dot product with eight interleaved partial sums, added in a fixed tree at the end: the
/// compiler turns the lanes into SIMD, the order is fixed (deterministic), and the error grows
/// with n / 8 rather than n.
#[inline]
fn dot<R: Real>(a: &[R], b: &[R]) -> R {
    let zero = R::of(0.0);
    let mut l = [zero; 8];
    let n8 = a.len() / 8 * 8;
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for i in 0..8 {
            l[i] = l[i] + ca[i] * cb[i];
        }
    }
    let mut s = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
    for (&x, &y) in a[n8..].iter().zip(&b[n8..]) {
        s = s + x * y;
    }
    s
}

/// `c (m x n, row length ldc) = a b`, or `c += a b` with `add`, on one thread: a is m x k and b
/// is k x n, each given with its (row, column) element strides, so a transpose is a stride swap.
/// The sum over k is formed apart and then added to c, so accumulating tile after tile is a
/// blocked summation.
#[allow(clippy::too_many_arguments)] // a GEMM's operands
fn tile_gemm<T: GemmReal>(
    (m, n, k): (usize, usize, usize),
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
    c: &mut [T],
    ldc: usize,
    add: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    // The last element each operand's strides reach must lie inside its slice.
    assert!(k > 0 && (m - 1) * a_rs + (k - 1) * a_cs < a.len());
    assert!((k - 1) * b_rs + (n - 1) * b_cs < b.len());
    assert!(ldc >= n && (m - 1) * ldc + n <= c.len());
    // SAFETY: the asserts above keep every access inside the slices; c is borrowed mutably, so
    // it aliases neither a nor b. The crate computes dst = alpha dst + beta lhs rhs, reading dst
    // only when `add`.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            add,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::of(1.0),
            T::of(1.0),
            false,
            false,
            false,
            ::gemm::Parallelism::None,
        );
    }
}

/// The float types of the CPU twins (f32, f64), with the steps the kernels take without an
/// intermediate rounding.
pub trait EqsdpaReal: Ln + GemmReal {
    /// `exp(a - b)` without rounding `a - b` (the kernels' `eqsdpa_exp_diff`): the backward's
    /// `P = exp(s - lse)`, where a rounded difference would add a few ulps to every P. `b = +inf`
    /// gives 0.
    fn exp_diff(a: Self, b: Self) -> Self;
    /// `exp(x)` for the forward's online softmax (`x <= 0`, or -inf for a masked key, which
    /// gives exactly 0).
    fn exp_fast(x: Self) -> Self;
    /// `m + ln(l)` rounded once, as the kernels compute lse (in double).
    fn log_add(m: Self, l: Self) -> Self;
    /// The value in f64 (exact).
    fn to_f64(self) -> f64;
}

impl EqsdpaReal for f32 {
    #[inline(always)]
    fn exp_diff(a: f32, b: f32) -> f32 {
        // The kernels' TwoSum: hi = fl(a - b) and its exact rounding error lo, then
        // exp(hi) (1 + lo). Branch-free, so the element loops vectorise; b = +inf (a row whose
        // keys are all masked) gives hi = -inf and 0.
        let nb = -b;
        let hi = a + nb;
        let bb = hi - a;
        let lo = (a - (hi - bb)) + (nb - bb);
        let lo = if lo.is_finite() { lo } else { 0.0 };
        let e = exp_f32(hi);
        e + e * lo
    }
    #[inline(always)]
    fn exp_fast(x: f32) -> f32 {
        exp_f32(x)
    }
    fn log_add(m: f32, l: f32) -> f32 {
        (m as f64 + (l as f64).ln()) as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl EqsdpaReal for f64 {
    fn exp_diff(a: f64, b: f64) -> f64 {
        (a - b).exp()
    }
    fn exp_fast(x: f64) -> f64 {
        x.exp()
    }
    fn log_add(m: f64, l: f64) -> f64 {
        m + l.ln()
    }
    fn to_f64(self) -> f64 {
        self
    }
}

/// `exp(x)` in f32 without a call into libm, so that loops over a tile's scores vectorise (the
/// attention's exponentials were the CPU twin's largest single cost): Cody-Waite reduction
/// `x = n ln 2 + r`, |r| <= ln 2 / 2, Cephes' degree-6 polynomial for `exp(r)` (relative error
/// about 1e-7, one or two ulp), and `2^n` built in the exponent bits. Arguments below -87 give
/// 0 (exp would be below f32's normal range, where it cannot change a softmax sum of at least
/// 1), -inf included; arguments above 88 saturate at exp(88) (attention scores minus their row
/// maximum are never positive).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer (|x log2 e| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let rounded = xc * std::f32::consts::LOG2_E + ROUND;
    let n = rounded - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n is in [-126, 127]: 2^n is a normal f32. Its exponent field is built from the bits of
    // `rounded` = 1.5 * 2^23 + n, whose low mantissa bits hold n (the high bits of the sum
    // shift out): integer ops only, so the loops over a row vectorise (`n as i32` would not,
    // for its saturating NaN semantics).
    let two_n = f32::from_bits(rounded.to_bits().wrapping_add(127) << 23);
    if x < -87.0 {
        0.0
    } else {
        y * two_n
    }
}

fn inf<R: Real>() -> R {
    R::of(f64::INFINITY)
}

/// Whether key `j` takes part (mask row of the frame, if any).
#[inline]
fn keep(mask_row: Option<&[u8]>, j: usize) -> bool {
    mask_row.is_none_or(|m| m[j] != 0)
}

/// The forward of one tile of queries (`qs`: its rows of q; `out`, `lse`: its rows of the
/// outputs) against all keys of its (frame, head), streamed in tiles of [`CPU_KEY_TILE`]:
/// S = Q K^T by GEMM, the online softmax row by row ([`softmax_row`]), then
/// acc = alpha acc + P V by GEMM. `s` is scratch (the task's, reused tile after tile).
#[allow(clippy::too_many_arguments)] // the tile's operands
fn forward_tile<R: EqsdpaReal>(
    qs: &[R],
    kb: &[R],
    vb: &[R],
    mask_row: Option<&[u8]>,
    d: EqsdpaDims,
    scale: R,
    out: &mut [R],
    lse: &mut [R],
    s: &mut Vec<R>,
) {
    let (t, dh, dv) = (d.t, d.dh, d.dv());
    let rows = lse.len();
    let zero = R::of(0.0);
    // Running maximum and sum of each query of the tile.
    let mut m = [-inf::<R>(); CPU_QUERY_TILE];
    let mut l = [zero; CPU_QUERY_TILE];
    s.resize(rows * CPU_KEY_TILE.min(t), zero);
    out.iter_mut().for_each(|o| *o = zero);
    for k0 in (0..t).step_by(CPU_KEY_TILE) {
        let kn = CPU_KEY_TILE.min(t - k0);
        let s = &mut s[..rows * kn];
        // S = Q K^T: K's rows, read with swapped strides, are the columns of K^T.
        let kt = &kb[k0 * dh..][..kn * dh];
        tile_gemm((rows, kn, dh), qs, (dh, 1), kt, (1, dh), s, kn, false);
        let tile_mask = mask_row.map(|mr| &mr[k0..][..kn]);
        for r in 0..rows {
            let alpha = row_kernels::softmax_row(
                &mut s[r * kn..][..kn],
                tile_mask,
                scale,
                &mut m[r],
                &mut l[r],
            );
            if alpha != R::of(1.0) {
                out[r * dv..][..dv].iter_mut().for_each(|a| *a = *a * alpha);
            }
        }
        // acc += P V (the tile's products summed apart, then added).
        let vt = &vb[k0 * dv..][..kn * dv];
        tile_gemm((rows, dv, kn), s, (kn, 1), vt, (dv, 1), out, dv, true);
    }
    for r in 0..rows {
        let acc = &mut out[r * dv..][..dv];
        if l[r] > zero {
            // A division per element: a rounded 1 / l would share its error along the row.
            acc.iter_mut().for_each(|a| *a = *a / l[r]);
            lse[r] = R::log_add(m[r], l[r]);
        } else {
            acc.iter_mut().for_each(|a| *a = zero);
            lse[r] = inf();
        }
    }
}

/// The element loops of the CPU twin (one softmax row of the forward, one row of `P` and `dS`
/// of the backward), compiled three times: for the target's baseline and, on x86-64 CPUs that
/// have them, with AVX2 (8 floats a vector, where the baseline has 4) and with AVX-512 (16).
/// Every build computes the same values bit for bit (no fused multiply-adds: LLVM does not
/// contract `a * b + c`), so results do not depend on the machine's vector width. Sums and
/// maxima run in 8 interleaved lanes added in a fixed tree: vectorised, and deterministic.
mod row_kernels {
    use super::{inf, EqsdpaReal};

    #[cfg(test)]
    use crate::ops::simd_level as level;

    /// The maximum of `x` in eight lanes (`x > m` selects, so NaN never wins: as maxps).
    #[inline(always)]
    fn max8<R: EqsdpaReal>(x: &[R]) -> R {
        let mut l = [-inf::<R>(); 8];
        let n8 = x.len() / 8 * 8;
        for c in x[..n8].chunks_exact(8) {
            for i in 0..8 {
                l[i] = if c[i] > l[i] { c[i] } else { l[i] };
            }
        }
        let mut m = l[0];
        for &v in l[1..].iter().chain(&x[n8..]) {
            m = if v > m { v } else { m };
        }
        m
    }

    /// The sum of `x` in eight lanes, added in a fixed tree.
    #[inline(always)]
    fn sum8<R: EqsdpaReal>(x: &[R]) -> R {
        let zero = R::of(0.0);
        let mut l = [zero; 8];
        let n8 = x.len() / 8 * 8;
        for c in x[..n8].chunks_exact(8) {
            for i in 0..8 {
                l[i] = l[i] + c[i];
            }
        }
        let mut s = ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
        for &v in &x[n8..] {
            s = s + v;
        }
        s
    }

    simd_dispatch! {
        /// One row of the forward's online softmax over a key tile: scales the scores `s` in
        /// place (masked keys to -inf), updates the running maximum `m` and sum `l`, leaves
        /// `P = exp(scale s - m)` in `s`, and returns the factor `alpha` by which the row's
        /// accumulator must be rescaled.
        pub(super) fn softmax_row / softmax_row_at<R: EqsdpaReal>(
            s: &mut [R],
            mask: Option<&[u8]>,
            scale: R,
            m: &mut R,
            l: &mut R,
        ) -> R {
            let zero = R::of(0.0);
            match mask {
                // A masked key's score is -inf: its P is exactly 0.
                Some(mk) => s.iter_mut().zip(mk).for_each(|(x, &k)| {
                    *x = if k != 0 { scale * *x } else { -inf::<R>() };
                }),
                None => s.iter_mut().for_each(|x| *x = scale * *x),
            }
            let tmax = max8(s);
            let m_new = if tmax > *m { tmax } else { *m };
            // A row that has seen only masked keys keeps m = -inf: exponents are taken against 0
            // instead, which gives P = 0 and alpha = 0, never exp(-inf - -inf) = NaN.
            let m_use = if m_new == -inf::<R>() { zero } else { m_new };
            let alpha = R::exp_fast(*m - m_use);
            s.iter_mut().for_each(|x| *x = R::exp_fast(*x - m_use));
            *l = *l * alpha + sum8(s);
            *m = m_new;
            alpha
        }
    }

    simd_dispatch! {
        /// One key's row of the backward over a tile of queries: `P = exp(scale s - lse)` into
        /// `p` and `dS = P (dP - D)` into `s` (all slices as long as the tile's queries; dP and
        /// D in f64, their difference rounded once).
        pub(super) fn p_ds_row / p_ds_row_at<R: EqsdpaReal>(
            s: &mut [R],
            p: &mut [R],
            dp: &[f64],
            lse: &[R],
            dsum: &[f64],
            scale: R,
        ) {
            let n = s.len();
            let (p, dp, lse, dsum) = (&mut p[..n], &dp[..n], &lse[..n], &dsum[..n]);
            for i in 0..n {
                let pi = R::exp_diff(scale * s[i], lse[i]);
                p[i] = pi;
                s[i] = pi * R::of(dp[i] - dsum[i]);
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::testing::Rng;

        /// Every build of the row kernels gives the same bits (the docs above promise it):
        /// fresh random rows of awkward lengths, masks, and extreme scores.
        #[test]
        fn row_kernel_builds_agree_bit_for_bit() {
            let mut rng = Rng::for_test("row_kernel_builds_agree_bit_for_bit");
            let lvl = level();
            println!("row kernels: this CPU runs build level {lvl} (0 base, 1 AVX2, 2 AVX-512)");
            for n in [1usize, 7, 8, 9, 31, 64, 213] {
                let mut s0: Vec<f32> = rng.normal_vec(n, 30.0);
                s0[0] = -1e30; // exp underflows to 0
                let mask: Vec<u8> = (0..n).map(|_| u8::from(rng.uniform() > 0.2)).collect();
                let lse: Vec<f32> = rng.normal_vec(n, 3.0);
                let dp: Vec<f64> = rng.normal_vec(n, 2.0).iter().map(|&x| x as f64).collect();
                let dsum: Vec<f64> = rng.normal_vec(n, 2.0).iter().map(|&x| x as f64).collect();
                for m in [None, Some(&mask[..])] {
                    let run = |which: u8| {
                        let (mut s, mut mm, mut l) = (s0.clone(), 0.5f32, 2.0f32);
                        let (mut s2, mut p) = (s0.clone(), vec![0.0f32; n]);
                        let alpha = softmax_row_at(which, &mut s, m, 0.3, &mut mm, &mut l);
                        p_ds_row_at(which, &mut s2, &mut p, &dp, &lse, &dsum, 0.3);
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        (
                            bits(&s),
                            bits(&s2),
                            bits(&p),
                            [alpha, mm, l].map(f32::to_bits),
                        )
                    };
                    let base = run(0);
                    assert!(base.0.iter().all(|&b| f32::from_bits(b).is_finite()));
                    for which in 1..=lvl {
                        assert!(
                            run(which) == base,
                            "build {which} differs from the baseline, n = {n}"
                        );
                    }
                }
            }
        }
    }
}

/// CPU twin of [`eqsdpa_forward`]: the tiled online-softmax forward, rayon over (bh, tile of
/// 64 queries). Slices as in the module docs; `mask` is `[frames, t]`.
#[allow(clippy::too_many_arguments)] // the op's operands
pub fn eqsdpa_forward_host<R: EqsdpaReal>(
    q: &[R],
    k: &[R],
    values: &[R],
    mask: Option<&[u8]>,
    dims: EqsdpaDims,
    scale: R,
    out: &mut [R],
    lse: &mut [R],
) {
    let (t, dh, dv) = (dims.t, dims.dh, dims.dv());
    if t == 0 || dims.bh == 0 {
        return;
    }
    out.par_chunks_mut(t * dv)
        .zip(lse.par_chunks_mut(t))
        .enumerate()
        .for_each(|(bh, (out, lse))| {
            let qb = &q[bh * t * dh..][..t * dh];
            let kb = &k[bh * t * dh..][..t * dh];
            let vb = &values[bh * t * dv..][..t * dv];
            let mask_row = mask.map(|m| &m[(bh / dims.heads) * t..][..t]);
            out.par_chunks_mut(CPU_QUERY_TILE * dv)
                .zip(lse.par_chunks_mut(CPU_QUERY_TILE))
                .enumerate()
                .for_each_init(Vec::new, |s, (tile, (out, lse))| {
                    let q0 = tile * CPU_QUERY_TILE;
                    let qs = &qb[q0 * dh..][..lse.len() * dh];
                    forward_tile(qs, kb, vb, mask_row, dims, scale, out, lse, s);
                });
        });
}

/// Key groups per (frame, head) in the CPU backward: each group of key tiles is one rayon task
/// that writes its keys' dk and dvalues and its own partial dq, and the partial dq are then
/// added in group order. Many pairs (training batches) give one group each: no partials at all.
/// Few pairs with long sequences are split so that the pool has work. A function of the shape
/// only, so results do not depend on the thread count.
fn backward_key_groups(bh: usize, key_tiles: usize) -> usize {
    (32 / bh.max(1)).clamp(1, key_tiles.max(1))
}

/// A rayon task's tiles of S^T / dS^T, P^T and dP^T in the backward, reused from task to task.
struct GroupScratch<R> {
    st: Vec<R>,
    pt: Vec<R>,
    dpt: Vec<f64>,
}

impl<R> Default for GroupScratch<R> {
    fn default() -> Self {
        Self {
            st: Vec::new(),
            pt: Vec::new(),
            dpt: Vec::new(),
        }
    }
}

/// A rayon task's f64 copies of one pair's values and dout and its `D`, reused pair after pair,
/// with the task's tiles.
struct PairScratch<R> {
    v64: Vec<f64>,
    dout64: Vec<f64>,
    out64: Vec<f64>,
    dsum: Vec<f64>,
    group: GroupScratch<R>,
}

impl<R> Default for PairScratch<R> {
    fn default() -> Self {
        Self {
            v64: Vec::new(),
            dout64: Vec::new(),
            out64: Vec::new(),
            dsum: Vec::new(),
            group: GroupScratch::default(),
        }
    }
}

/// One (frame, head) pair's operands in the backward: q, k, values and dout in the working
/// precision, values and dout also in f64 (for dP), the row log-sum-exps and `D` in f64.
struct PairOperands<'a, R> {
    q: &'a [R],
    k: &'a [R],
    dout: &'a [R],
    v64: &'a [f64],
    dout64: &'a [f64],
    lse: &'a [R],
    dsum: &'a [f64],
}

/// The backward of one group of key tiles (from key `k0`, as many as `dk` holds) against every
/// query tile of its pair, in one pass (FlashAttention-2's dk/dvalues loop, with dq accumulated
/// too): per (key tile, query tile), S^T = K Q^T and dP^T = V dout^T (f64) by GEMM,
/// `P = exp(scale S - lse)` and `dS = P (dP - D)` row by row, then dvalues += P^T dout,
/// dk += dS^T q and dq += dS K by GEMM. Assigns `dk`, `dvv` (the group's rows) and `dq` (the
/// group's partial, unscaled: the caller sums groups and scales).
#[allow(clippy::too_many_arguments)] // the pair's operands and the group's gradients
fn backward_group<R: EqsdpaReal>(
    op: &PairOperands<R>,
    mask_row: Option<&[u8]>,
    d: EqsdpaDims,
    scale: R,
    k0: usize,
    (dq, dk, dvv): (&mut [R], &mut [R], &mut [R]),
    scratch: &mut GroupScratch<R>,
) {
    let (t, dh, dv) = (d.t, d.dh, d.dv());
    let (qb, kb, ob) = (op.q, op.k, op.dout);
    let zero = R::of(0.0);
    let tile = CPU_KEY_TILE * CPU_QUERY_TILE.min(t);
    let GroupScratch { st, pt, dpt } = scratch;
    st.resize(tile, zero);
    pt.resize(tile, zero);
    dpt.resize(tile, 0.0);
    dq.iter_mut().for_each(|x| *x = zero);
    dk.iter_mut().for_each(|x| *x = zero);
    dvv.iter_mut().for_each(|x| *x = zero);
    let kn_all = dk.len() / dh;
    for kt0 in (0..kn_all).step_by(CPU_KEY_TILE) {
        let kn = CPU_KEY_TILE.min(kn_all - kt0);
        let kabs = k0 + kt0;
        let (kt, vt) = (&kb[kabs * dh..][..kn * dh], &op.v64[kabs * dv..][..kn * dv]);
        let dk = &mut dk[kt0 * dh..][..kn * dh];
        let dvv = &mut dvv[kt0 * dv..][..kn * dv];
        for q0 in (0..t).step_by(CPU_QUERY_TILE) {
            let rows = CPU_QUERY_TILE.min(t - q0);
            let (st, pt, dpt) = (
                &mut st[..kn * rows],
                &mut pt[..kn * rows],
                &mut dpt[..kn * rows],
            );
            let (qt, ot) = (&qb[q0 * dh..][..rows * dh], &ob[q0 * dv..][..rows * dv]);
            // S^T (keys x queries) = K Q^T; dP^T = V dout^T.
            tile_gemm((kn, rows, dh), kt, (dh, 1), qt, (1, dh), st, rows, false);
            let o64 = &op.dout64[q0 * dv..][..rows * dv];
            tile_gemm((kn, rows, dv), vt, (dv, 1), o64, (1, dv), dpt, rows, false);
            let (lq, dq_sum) = (&op.lse[q0..][..rows], &op.dsum[q0..][..rows]);
            for j in 0..kn {
                let (p_row, s_row) = (&mut pt[j * rows..][..rows], &mut st[j * rows..][..rows]);
                if !keep(mask_row, kabs + j) {
                    p_row.iter_mut().for_each(|p| *p = zero);
                    s_row.iter_mut().for_each(|x| *x = zero);
                    continue;
                }
                row_kernels::p_ds_row(s_row, p_row, &dpt[j * rows..][..rows], lq, dq_sum, scale);
            }
            // dvalues += P^T dout; dk += dS^T q; dq += dS K (dS^T read with swapped strides).
            tile_gemm((kn, dv, rows), pt, (rows, 1), ot, (dv, 1), dvv, dv, true);
            tile_gemm((kn, dh, rows), st, (rows, 1), qt, (dh, 1), dk, dh, true);
            let dqt = &mut dq[q0 * dh..][..rows * dh];
            tile_gemm((rows, dh, kn), st, (1, rows), kt, (dh, 1), dqt, dh, true);
        }
        dk.iter_mut().for_each(|x| *x = scale * *x);
    }
}

/// CPU twin of [`eqsdpa_backward`] (FlashAttention-2, one pass): per (frame, head), the keys
/// in groups (one group per pair when there are many pairs, more when there are few), each a
/// rayon task streaming every query tile past its key tiles: dk and dvalues are complete per
/// group, dq is the sum of the groups' partials, added in group order. `dP - D` (see `cuda/eqsdpa.cu`) is formed from
/// `dP = dout values^T` by an f64 GEMM and `D = rowsum(dout out)` in f64: their difference
/// loses nothing that matters to the f32 result even where attention is sharp (for one key,
/// `out = values` and dS is 0 to f64 rounding), at the cost of f64 copies of values and dout
/// (linear in T). Sums over queries (dk, dvalues) and keys (dq) are blocked per tile. Assigns
/// dq, dk, dvalues.
#[allow(clippy::too_many_arguments)] // the op's operands and gradients
pub fn eqsdpa_backward_host<R: EqsdpaReal>(
    q: &[R],
    k: &[R],
    values: &[R],
    out: &[R],
    lse: &[R],
    dout: &[R],
    mask: Option<&[u8]>,
    dims: EqsdpaDims,
    scale: R,
    dq: &mut [R],
    dk: &mut [R],
    dvalues: &mut [R],
) {
    let (t, dh, dv) = (dims.t, dims.dh, dims.dv());
    if t == 0 || dims.bh == 0 {
        return;
    }
    let key_tiles = t.div_ceil(CPU_KEY_TILE);
    let groups = backward_key_groups(dims.bh, key_tiles);
    // Keys per group: whole key tiles, the last group shorter.
    let group_keys = key_tiles.div_ceil(groups) * CPU_KEY_TILE;
    let groups = t.div_ceil(group_keys);
    dq.par_chunks_mut(t * dh)
        .zip(dk.par_chunks_mut(t * dh))
        .zip(dvalues.par_chunks_mut(t * dv))
        .enumerate()
        .for_each_init(PairScratch::default, |scr, (bh, ((dq, dk), dvv))| {
            let wide = |x: &[R], to: &mut Vec<f64>| {
                to.clear();
                to.extend(x.iter().map(|v| v.to_f64()));
            };
            let g = &dout[bh * t * dv..][..t * dv];
            wide(&values[bh * t * dv..][..t * dv], &mut scr.v64);
            wide(g, &mut scr.dout64);
            wide(&out[bh * t * dv..][..t * dv], &mut scr.out64);
            scr.dsum.clear();
            scr.dsum.extend(
                scr.dout64
                    .chunks(dv)
                    .zip(scr.out64.chunks(dv))
                    .map(|(g, o)| dot(g, o)),
            );
            let op = PairOperands {
                q: &q[bh * t * dh..][..t * dh],
                k: &k[bh * t * dh..][..t * dh],
                dout: g,
                v64: &scr.v64,
                dout64: &scr.dout64,
                lse: &lse[bh * t..][..t],
                dsum: &scr.dsum,
            };
            let mask_row = mask.map(|m| &m[(bh / dims.heads) * t..][..t]);
            if groups == 1 {
                let tiles = &mut scr.group;
                backward_group(&op, mask_row, dims, scale, 0, (dq, dk, dvv), tiles);
            } else {
                let mut parts = vec![R::of(0.0); groups * t * dh];
                parts
                    .par_chunks_mut(t * dh)
                    .zip(dk.par_chunks_mut(group_keys * dh))
                    .zip(dvv.par_chunks_mut(group_keys * dv))
                    .enumerate()
                    .for_each_init(GroupScratch::default, |tiles, (g, ((dqg, dk), dvv))| {
                        let k0 = g * group_keys;
                        backward_group(&op, mask_row, dims, scale, k0, (dqg, dk, dvv), tiles);
                    });
                dq.copy_from_slice(&parts[..t * dh]);
                for part in parts[t * dh..].chunks(t * dh) {
                    dq.iter_mut().zip(part).for_each(|(a, &b)| *a = *a + b);
                }
            }
            dq.iter_mut().for_each(|x| *x = scale * *x);
        });
}

/// Forward (and, with `dout`, backward) of the materialised attention in f64:
/// see [`eqsdpa_reference_host`].
#[derive(Clone, Debug, Default)]
pub struct EqsdpaReference {
    /// `[BH, T, 4 dh]`.
    pub out: Vec<f64>,
    /// `[BH, T]`; +inf where every key is masked.
    pub lse: Vec<f64>,
    /// `[BH, T, dh]` (empty without `dout`).
    pub dq: Vec<f64>,
    /// `[BH, T, dh]` (empty without `dout`).
    pub dk: Vec<f64>,
    /// `[BH, T, 4 dh]` (empty without `dout`).
    pub dvalues: Vec<f64>,
}

/// The tests' reference: plain materialised attention in f64, one (frame, head) at a time. The
/// scores `S = scale q k^T` and probabilities `P = softmax(S)` (masked keys 0, a fully masked row
/// all 0) are stored as T x T matrices; `out = P values`, `lse = ln sum exp S`. With `dout`, the
/// textbook backward: `dvalues = P^T dout`, `dP = dout values^T`,
/// `dS = P (dP - rowsum(P dP))`, `dq = scale dS k`, `dk = scale dS^T q`. Rows are spread over
/// rayon (it is quadratic in T, and the tests run it at T = 4099).
#[allow(clippy::too_many_arguments)] // the op's operands
pub fn eqsdpa_reference_host(
    q: &[f64],
    k: &[f64],
    values: &[f64],
    mask: Option<&[u8]>,
    dims: EqsdpaDims,
    scale: f64,
    dout: Option<&[f64]>,
) -> EqsdpaReference {
    let (bh_n, t, dh, dv) = (dims.bh, dims.t, dims.dh, dims.dv());
    let mut r = EqsdpaReference {
        out: vec![0.0; bh_n * t * dv],
        lse: vec![0.0; bh_n * t],
        ..Default::default()
    };
    if dout.is_some() {
        r.dq = vec![0.0; bh_n * t * dh];
        r.dk = vec![0.0; bh_n * t * dh];
        r.dvalues = vec![0.0; bh_n * t * dv];
    }
    let plain_dot = |a: &[f64], b: &[f64]| dot(a, b);
    // Row-major [n, n] to its transpose.
    let transpose = |m: &[f64], n: usize| {
        let mut tr = vec![0.0; n * n];
        tr.par_chunks_mut(n.max(1))
            .enumerate()
            .for_each(|(j, row)| {
                for (i, x) in row.iter_mut().enumerate() {
                    *x = m[i * n + j];
                }
            });
        tr
    };
    for bh in 0..bh_n {
        let qb = &q[bh * t * dh..][..t * dh];
        let kb = &k[bh * t * dh..][..t * dh];
        let vb = &values[bh * t * dv..][..t * dv];
        let ok = |j: usize| mask.is_none_or(|m| m[(bh / dims.heads) * t + j] != 0);
        let mut p = vec![0.0; t * t];
        p.par_chunks_mut(t)
            .zip(r.out[bh * t * dv..][..t * dv].par_chunks_mut(dv))
            .zip(r.lse[bh * t..][..t].par_iter_mut())
            .enumerate()
            .for_each(|(i, ((p, out), lse))| {
                let qi = &qb[i * dh..][..dh];
                let s: Vec<f64> = (0..t)
                    .map(|j| scale * plain_dot(qi, &kb[j * dh..][..dh]))
                    .collect();
                let m = (0..t)
                    .filter(|&j| ok(j))
                    .map(|j| s[j])
                    .fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    *lse = f64::INFINITY;
                    return;
                }
                let total: f64 = (0..t).filter(|&j| ok(j)).map(|j| (s[j] - m).exp()).sum();
                *lse = m + total.ln();
                for j in (0..t).filter(|&j| ok(j)) {
                    p[j] = (s[j] - m).exp() / total;
                }
                for (j, &pj) in p.iter().enumerate() {
                    for (o, &v) in out.iter_mut().zip(&vb[j * dv..][..dv]) {
                        *o += pj * v;
                    }
                }
            });
        let Some(dout) = dout else { continue };
        let ob = &dout[bh * t * dv..][..t * dv];
        let mut ds = vec![0.0; t * t];
        ds.par_chunks_mut(t).enumerate().for_each(|(i, ds)| {
            let oi = &ob[i * dv..][..dv];
            let pi = &p[i * t..][..t];
            let dp: Vec<f64> = (0..t).map(|j| plain_dot(oi, &vb[j * dv..][..dv])).collect();
            let rowdot = plain_dot(pi, &dp);
            for j in 0..t {
                ds[j] = pi[j] * (dp[j] - rowdot);
            }
        });
        r.dq[bh * t * dh..][..t * dh]
            .par_chunks_mut(dh)
            .enumerate()
            .for_each(|(i, dq)| {
                for j in 0..t {
                    for (x, &kv) in dq.iter_mut().zip(&kb[j * dh..][..dh]) {
                        *x += scale * ds[i * t + j] * kv;
                    }
                }
            });
        let (pt, dst) = (transpose(&p, t), transpose(&ds, t));
        r.dk[bh * t * dh..][..t * dh]
            .par_chunks_mut(dh)
            .zip(r.dvalues[bh * t * dv..][..t * dv].par_chunks_mut(dv))
            .enumerate()
            .for_each(|(j, (dk, dvv))| {
                for i in 0..t {
                    for (x, &qv) in dk.iter_mut().zip(&qb[i * dh..][..dh]) {
                        *x += scale * dst[j * t + i] * qv;
                    }
                    for (x, &g) in dvv.iter_mut().zip(&ob[i * dv..][..dv]) {
                        *x += pt[j * t + i] * g;
                    }
                }
            });
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Device entry points.

/// Reads and checks the sizes: q and k `[.., T, dh]` of one shape with dh in `widths` (the op's
/// kernels: [`F32_WIDTHS`] or [`MMA_WIDTHS`]; the latter's error points a width only the f32
/// kernels take to them), values `[.., T, 4 dh]` with as many rows, heads dividing BH, mask
/// `[BH / heads, T]`.
fn dims_of<T: Element>(
    op: &str,
    q: &Tensor<T>,
    k: &Tensor<T>,
    values: &Tensor<T>,
    mask: Option<&Tensor<u8>>,
    heads: usize,
    widths: &[usize],
) -> Result<EqsdpaDims> {
    let qs = q.shape();
    ensure!(
        qs.len() >= 2,
        "{op}: q has shape {qs:?}, expected [.., T, dh]"
    );
    let (t, dh) = (qs[qs.len() - 2], qs[qs.len() - 1]);
    let list = |w: &[usize]| {
        let s: Vec<String> = w.iter().map(|w| w.to_string()).collect();
        format!("{} or {}", s[..s.len() - 1].join(", "), s[s.len() - 1])
    };
    ensure!(
        widths.contains(&dh),
        "{op}: head width dh = {dh} (q has shape {qs:?}); its kernels support dh = {}{}",
        list(widths),
        if widths == MMA_WIDTHS && F32_WIDTHS.contains(&dh) {
            format!(
                " (bf16 / f16 tensor-core steps are 16 wide); for dh = {dh} use the f32 \
                 eqsdpa_forward / eqsdpa_backward"
            )
        } else {
            String::new()
        }
    );
    ensure!(
        k.shape() == qs,
        "{op}: k has shape {:?}, expected q's {qs:?}",
        k.shape()
    );
    let bh = if t == 0 { 0 } else { q.len() / (t * dh) };
    let vs = values.shape();
    ensure!(
        vs.last() == Some(&(4 * dh)) && values.len() == bh * t * 4 * dh,
        "{op}: values has shape {vs:?}, expected [.., {t}, {}] with {bh} x {t} rows to match q {qs:?}",
        4 * dh
    );
    ensure!(
        (1..=i32::MAX as usize).contains(&heads) && bh % heads == 0,
        "{op}: {bh} (frame, head) pairs do not split into frames of {heads} heads"
    );
    ensure!(
        t <= i32::MAX as usize && bh <= i32::MAX as usize,
        "{op}: {bh} x {t} tokens exceed the kernels' 32-bit sizes"
    );
    if let Some(m) = mask {
        ensure!(
            m.len() == bh / heads * t,
            "{op}: mask has shape {:?} ({} elements), expected [{}, {t}] (frames x tokens)",
            m.shape(),
            m.len(),
            bh / heads
        );
    }
    Ok(EqsdpaDims { bh, t, dh, heads })
}

fn expect_shape<T: Element>(
    op: &str,
    name: &str,
    t: &Tensor<T>,
    len: usize,
    want: &str,
) -> Result<()> {
    ensure!(
        t.len() == len,
        "{op}: {name} has shape {:?} ({} elements), expected {want} ({len} elements)",
        t.shape(),
        t.len()
    );
    Ok(())
}

fn host<'a, T: Element>(op: &str, t: &'a Tensor<T>) -> Result<&'a [T]> {
    t.host()
        .with_context(|| format!("{op}: tensor not in host memory"))
}

fn host_mut<'a, T: Element>(op: &str, t: &'a mut Tensor<T>) -> Result<&'a mut [T]> {
    t.host_mut()
        .with_context(|| format!("{op}: tensor not in host memory"))
}

/// Blocks per launch at most: [`GRID_MAX`] unless a test lowered it.
static MAX_BLOCKS: AtomicUsize = AtomicUsize::new(GRID_MAX);

/// Caps the blocks of every later launch of these kernels at `n` (0 restores the default), so
/// that a test can make each block loop over many (bh, tile) pairs. Results do not change: a
/// tile's arithmetic does not depend on the block that runs it.
#[doc(hidden)]
pub fn set_max_blocks(n: usize) {
    MAX_BLOCKS.store(
        if n == 0 { GRID_MAX } else { n.min(GRID_MAX) },
        Ordering::Relaxed,
    );
}

/// A 1-D grid-stride launch over `tiles` (bh, tile) pairs.
fn tile_launch(tiles: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid: [
            tiles.clamp(1, MAX_BLOCKS.load(Ordering::Relaxed)) as u32,
            1,
            1,
        ],
        block: [threads, 1, 1],
        shared_bytes: 0,
    }
}

/// Appends the mask pointer (null: no mask) to the argument list.
fn with_mask(args: KernelArgs, mask: Option<&Tensor<u8>>) -> KernelArgs {
    match mask {
        Some(m) => args.input(m),
        None => args.i64(0),
    }
}

/// Fused attention forward: `out = softmax(scale q k^T, masked) values` and `lse`, per (frame,
/// head), without storing the T x T matrix (layout in the module docs; `scale` is normally
/// 1/sqrt(dh)). `q`, `k`: `[BH, T, dh]` with dh in {8, 16, 32, 64}; `values`, `out`:
/// `[BH, T, 4 dh]`; `lse`: `[BH, T]`; `mask`: `[BH / heads, T]`, 0 = padding key. A query whose
/// keys are all masked gets out = 0 and lse = +inf. Assigns `out` and `lse`.
#[allow(clippy::too_many_arguments)] // the op's operands
pub fn eqsdpa_forward(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    values: &Tensor<f32>,
    mask: Option<&Tensor<u8>>,
    heads: usize,
    scale: f32,
    out: &mut Tensor<f32>,
    lse: &mut Tensor<f32>,
) -> Result<()> {
    let op = "eqsdpa_forward";
    let mut others = vec![k.device(), values.device(), out.device(), lse.device()];
    if let Some(m) = mask {
        others.push(m.device());
    }
    let dev = same_device(op, q.device(), &others)?.clone();
    let d = dims_of(op, q, k, values, mask, heads, &F32_WIDTHS)?;
    expect_shape(op, "out", out, values.len(), "values' shape")?;
    expect_shape(op, "lse", lse, d.bh * d.t, "[BH, T]")?;
    if d.bh * d.t == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            eqsdpa_forward_host(
                host(op, q)?,
                host(op, k)?,
                host(op, values)?,
                match mask {
                    Some(m) => Some(host(op, m)?),
                    None => None,
                },
                d,
                scale,
                host_mut(op, out)?,
                host_mut(op, lse)?,
            );
            Ok(())
        }
        _ => {
            let i = f32_index(d.dh);
            let (bq, threads) = FWD_F32[i];
            let args = with_mask(KernelArgs::new().input(q).input(k).input(values), mask)
                .output(out)
                .output(lse)
                .i32(d.bh as i32)
                .i32(d.t as i32)
                .i32(heads as i32)
                .f32(scale);
            launch(
                &dev,
                FWD_F32_KERNELS[i],
                tile_launch(d.bh * d.t.div_ceil(bq), threads),
                args,
            )
        }
    }
}

/// Backward of [`eqsdpa_forward`] (FlashAttention-2) from `out`, `lse` and `dout`
/// (`[BH, T, 4 dh]`): recomputing `P = exp(scale q k^T - lse)`, `dvalues = P^T dout`,
/// `dS = P (dout values^T - D)` with `D = rowsum(dout * out)` (summed as
/// `dout_i . (values_j - out_i)`), `dk = scale dS^T q`, `dq = scale dS k`.
/// Assigns `dq`, `dk` (shaped as q) and `dvalues` (shaped as values): activation gradients.
///
/// `mode`: [`EqsdpaBackwardMode::Deterministic`] (the default: two passes, no float atomics,
/// bitwise reproducible) or [`EqsdpaBackwardMode::AtomicDq`] (one pass over key tiles adding dq
/// with float atomics: dq not reproducible bit for bit; the cpu device runs the deterministic
/// algorithm for both).
#[allow(clippy::too_many_arguments)] // the op's operands and gradients
pub fn eqsdpa_backward(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    values: &Tensor<f32>,
    out: &Tensor<f32>,
    lse: &Tensor<f32>,
    dout: &Tensor<f32>,
    mask: Option<&Tensor<u8>>,
    heads: usize,
    scale: f32,
    dq: &mut Tensor<f32>,
    dk: &mut Tensor<f32>,
    dvalues: &mut Tensor<f32>,
    mode: EqsdpaBackwardMode,
) -> Result<()> {
    let op = "eqsdpa_backward";
    let mut others = vec![
        k.device(),
        values.device(),
        out.device(),
        lse.device(),
        dout.device(),
        dq.device(),
        dk.device(),
        dvalues.device(),
    ];
    if let Some(m) = mask {
        others.push(m.device());
    }
    let dev = same_device(op, q.device(), &others)?.clone();
    let d = dims_of(op, q, k, values, mask, heads, &F32_WIDTHS)?;
    expect_shape(op, "out", out, values.len(), "values' shape")?;
    expect_shape(op, "dout", dout, values.len(), "values' shape")?;
    expect_shape(op, "lse", lse, d.bh * d.t, "[BH, T]")?;
    expect_shape(op, "dq", dq, q.len(), "q's shape")?;
    expect_shape(op, "dk", dk, q.len(), "k's shape")?;
    expect_shape(op, "dvalues", dvalues, values.len(), "values' shape")?;
    if d.bh * d.t == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            eqsdpa_backward_host(
                host(op, q)?,
                host(op, k)?,
                host(op, values)?,
                host(op, out)?,
                host(op, lse)?,
                host(op, dout)?,
                match mask {
                    Some(m) => Some(host(op, m)?),
                    None => None,
                },
                d,
                scale,
                host_mut(op, dq)?,
                host_mut(op, dk)?,
                host_mut(op, dvalues)?,
            );
            Ok(())
        }
        _ if mode == EqsdpaBackwardMode::AtomicDq => {
            let i = f32_index(d.dh);
            let (bk, threads) = DKDV_F32[i];
            dq.fill_bytes(0)?;
            let args = with_mask(KernelArgs::new().input(q).input(k).input(values), mask)
                .input(out)
                .input(lse)
                .input(dout)
                .output(dq)
                .output(dk)
                .output(dvalues)
                .i32(d.bh as i32)
                .i32(d.t as i32)
                .i32(heads as i32)
                .f32(scale);
            launch(
                &dev,
                ATOMIC_F32_KERNELS[i],
                tile_launch(d.bh * d.t.div_ceil(bk), threads),
                args,
            )
            .context("eqsdpa_backward: atomic dq, dk, dvalues")
        }
        _ => {
            let i = f32_index(d.dh);
            let (bk, threads) = DKDV_F32[i];
            let args = with_mask(KernelArgs::new().input(q).input(k).input(values), mask)
                .input(out)
                .input(lse)
                .input(dout)
                .output(dk)
                .output(dvalues)
                .i32(d.bh as i32)
                .i32(d.t as i32)
                .i32(heads as i32)
                .f32(scale);
            launch(
                &dev,
                DKDV_F32_KERNELS[i],
                tile_launch(d.bh * d.t.div_ceil(bk), threads),
                args,
            )
            .context("eqsdpa_backward: dk, dvalues")?;
            let (bq, threads) = DQ_F32[i];
            let args = with_mask(KernelArgs::new().input(q).input(k).input(values), mask)
                .input(out)
                .input(lse)
                .input(dout)
                .output(dq)
                .i32(d.bh as i32)
                .i32(d.t as i32)
                .i32(heads as i32)
                .f32(scale);
            launch(
                &dev,
                DQ_F32_KERNELS[i],
                tile_launch(d.bh * d.t.div_ceil(bq), threads),
                args,
            )
            .context("eqsdpa_backward: dq")
        }
    }
}

/// As [`eqsdpa_forward`] with bf16 or f16 `q`, `k` and `values`, on the tensor cores: scores and
/// `P values` are products of 16-bit operands accumulated in f32, P is rounded to the input type
/// before it multiplies the values (as in FlashAttention-2), the softmax and its statistics are
/// f32, and `out` and `lse` are f32. On the cpu device the operands are widened to f32 (exactly)
/// and the f32 twin runs, so P is not rounded there. The backward is [`eqsdpa_backward_half`].
/// dh in {16, 32, 64} only, on every device (the mma steps are 16 wide): dh = 8 is an error that
/// points to [`eqsdpa_forward`]. Assigns `out` and `lse`.
#[allow(clippy::too_many_arguments)] // the op's operands
pub fn eqsdpa_forward_half<T: HalfFloat>(
    q: &Tensor<T>,
    k: &Tensor<T>,
    values: &Tensor<T>,
    mask: Option<&Tensor<u8>>,
    heads: usize,
    scale: f32,
    out: &mut Tensor<f32>,
    lse: &mut Tensor<f32>,
) -> Result<()> {
    let op = "eqsdpa_forward_half";
    let mut others = vec![k.device(), values.device(), out.device(), lse.device()];
    if let Some(m) = mask {
        others.push(m.device());
    }
    let dev = same_device(op, q.device(), &others)?.clone();
    let d = dims_of(op, q, k, values, mask, heads, &MMA_WIDTHS)?;
    expect_shape(op, "out", out, values.len(), "values' shape")?;
    expect_shape(op, "lse", lse, d.bh * d.t, "[BH, T]")?;
    if d.bh * d.t == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            let widen = |t: &Tensor<T>| -> Result<Vec<f32>> {
                Ok(host(op, t)?.par_iter().map(|v| v.to_f32()).collect())
            };
            let (qw, kw, vw) = (widen(q)?, widen(k)?, widen(values)?);
            eqsdpa_forward_host(
                &qw,
                &kw,
                &vw,
                match mask {
                    Some(m) => Some(host(op, m)?),
                    None => None,
                },
                d,
                scale,
                host_mut(op, out)?,
                host_mut(op, lse)?,
            );
            Ok(())
        }
        _ => {
            let kernels = match T::DTYPE {
                DType::BF16 => &FWD_BF16_KERNELS,
                _ => &FWD_F16_KERNELS,
            };
            let (bq, threads) = FWD_MMA;
            let args = with_mask(KernelArgs::new().input(q).input(k).input(values), mask)
                .output(out)
                .output(lse)
                .i32(d.bh as i32)
                .i32(d.t as i32)
                .i32(heads as i32)
                .f32(scale);
            launch(
                &dev,
                kernels[mma_index(d.dh)],
                tile_launch(d.bh * d.t.div_ceil(bq), threads),
                args,
            )
        }
    }
}

/// Backward of [`eqsdpa_forward_half`] on the tensor cores: bf16 or f16 `q`, `k`, `values`; f32
/// `out` and `lse` (from the 16-bit forward) and `dout`; f32 gradients `dq`, `dk` (shaped as q)
/// and `dvalues` (shaped as values), assigned (activation gradients). f32 gradients because the
/// rest of the tape is f32 and 16-bit ones would only add a rounding.
///
/// As FlashAttention-2: `dout` is rounded to the 16-bit type (the operand of `dP = dout values^T`
/// and `dvalues = P^T dout`), `D = rowsum(dout * out)` in f32, `P = exp(scale q k^T - lse)` and
/// `dS = P (dP - D)` in f32, and P and dS are rounded to the 16-bit type before they multiply
/// `dout`, `q` and `k`; every product accumulates in f32. Two scratch buffers, linear in T: the
/// rounded dout and D. `mode` as in [`eqsdpa_backward`] (the atomic mode skips the dq kernel).
/// On the cpu device the operands (dout rounded to the 16-bit type first) are widened to f32
/// exactly and the f32 twin runs, in both modes; P and dS are not rounded there. dh in
/// {16, 32, 64} only, as [`eqsdpa_forward_half`].
#[allow(clippy::too_many_arguments)] // the op's operands and gradients
pub fn eqsdpa_backward_half<T: HalfFloat>(
    q: &Tensor<T>,
    k: &Tensor<T>,
    values: &Tensor<T>,
    out: &Tensor<f32>,
    lse: &Tensor<f32>,
    dout: &Tensor<f32>,
    mask: Option<&Tensor<u8>>,
    heads: usize,
    scale: f32,
    dq: &mut Tensor<f32>,
    dk: &mut Tensor<f32>,
    dvalues: &mut Tensor<f32>,
    mode: EqsdpaBackwardMode,
) -> Result<()> {
    let op = "eqsdpa_backward_half";
    let mut others = vec![
        k.device(),
        values.device(),
        out.device(),
        lse.device(),
        dout.device(),
        dq.device(),
        dk.device(),
        dvalues.device(),
    ];
    if let Some(m) = mask {
        others.push(m.device());
    }
    let dev = same_device(op, q.device(), &others)?.clone();
    let d = dims_of(op, q, k, values, mask, heads, &MMA_WIDTHS)?;
    expect_shape(op, "out", out, values.len(), "values' shape")?;
    expect_shape(op, "dout", dout, values.len(), "values' shape")?;
    expect_shape(op, "lse", lse, d.bh * d.t, "[BH, T]")?;
    expect_shape(op, "dq", dq, q.len(), "q's shape")?;
    expect_shape(op, "dk", dk, q.len(), "k's shape")?;
    expect_shape(op, "dvalues", dvalues, values.len(), "values' shape")?;
    if d.bh * d.t == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            let widen = |t: &Tensor<T>| -> Result<Vec<f32>> {
                Ok(host(op, t)?.par_iter().map(|v| v.to_f32()).collect())
            };
            let (qw, kw, vw) = (widen(q)?, widen(k)?, widen(values)?);
            let round: fn(f32) -> f32 = match T::DTYPE {
                DType::BF16 => |x| half::bf16::from_f32(x).to_f32(),
                _ => |x| half::f16::from_f32(x).to_f32(),
            };
            let ow: Vec<f32> = host(op, dout)?.par_iter().map(|&x| round(x)).collect();
            eqsdpa_backward_host(
                &qw,
                &kw,
                &vw,
                host(op, out)?,
                host(op, lse)?,
                &ow,
                match mask {
                    Some(m) => Some(host(op, m)?),
                    None => None,
                },
                d,
                scale,
                host_mut(op, dq)?,
                host_mut(op, dk)?,
                host_mut(op, dvalues)?,
            );
            Ok(())
        }
        _ => {
            let kernels = match T::DTYPE {
                DType::BF16 => &BWD_BF16,
                _ => &BWD_F16,
            };
            let i = mma_index(d.dh);
            // Scratch: dout rounded to T, and D = rowsum(rounded dout * out).
            let mut dout_h = Tensor::<T>::zeros(&dev, values.shape())?;
            let mut dsum = Tensor::<f32>::zeros(&dev, &[d.bh, d.t])?;
            let rows = d.bh * d.t;
            let (per_block, threads) = PREP_MMA;
            let args = KernelArgs::new()
                .input(dout)
                .input(out)
                .output(&mut dout_h)
                .output(&mut dsum)
                .i64(rows as i64)
                .i32(d.dv() as i32);
            launch(
                &dev,
                kernels.prep,
                tile_launch(rows.div_ceil(per_block), threads),
                args,
            )
            .context("eqsdpa_backward_half: dout, D")?;
            let (bk, threads) = DKDV_MMA[i];
            let base = || {
                with_mask(
                    KernelArgs::new()
                        .input(q)
                        .input(k)
                        .input(values)
                        .input(&dout_h),
                    mask,
                )
                .input(lse)
                .input(&dsum)
            };
            let tail = |a: KernelArgs| {
                a.i32(d.bh as i32)
                    .i32(d.t as i32)
                    .i32(heads as i32)
                    .f32(scale)
            };
            let key_grid = tile_launch(d.bh * d.t.div_ceil(bk), threads);
            if mode == EqsdpaBackwardMode::AtomicDq {
                dq.fill_bytes(0)?;
                let args = tail(base().output(dq).output(dk).output(dvalues));
                return launch(&dev, kernels.atomic[i], key_grid, args)
                    .context("eqsdpa_backward_half: atomic dq, dk, dvalues");
            }
            let args = tail(base().output(dk).output(dvalues));
            launch(&dev, kernels.dkdv[i], key_grid, args)
                .context("eqsdpa_backward_half: dk, dvalues")?;
            let (bq, threads) = DQ_MMA[i];
            let args = tail(base().output(dq));
            launch(
                &dev,
                kernels.dq[i],
                tile_launch(d.bh * d.t.div_ceil(bq), threads),
                args,
            )
            .context("eqsdpa_backward_half: dq")
        }
    }
}

/// An element type the fused kernels take for q, k and values: f32 ([`eqsdpa_forward`],
/// [`eqsdpa_backward`]) or bf16 / f16 on the tensor cores ([`eqsdpa_forward_half`],
/// [`eqsdpa_backward_half`]). Code that runs the same attention at every precision (the device
/// check, the benchmark) is generic over it instead of matching on the type.
pub trait EqsdpaInput: crate::tensor::Element {
    /// Its name in the kernels' names: `f32`, `bf16` or `f16`.
    fn name() -> &'static str {
        match Self::DTYPE {
            crate::DType::BF16 => "bf16",
            crate::DType::F16 => "f16",
            _ => "f32",
        }
    }

    /// Rounds an f32 to this type (to nearest).
    fn from_f32(x: f32) -> Self;

    /// The forward (see the ops).
    #[allow(clippy::too_many_arguments)] // the op's operands
    fn forward(
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        values: &Tensor<Self>,
        mask: Option<&Tensor<u8>>,
        heads: usize,
        scale: f32,
        out: &mut Tensor<f32>,
        lse: &mut Tensor<f32>,
    ) -> Result<()>;

    /// The backward (see the ops): `saved` is (out, lse, dout), `grads` (dq, dk, dvalues).
    #[allow(clippy::too_many_arguments)] // the op's operands and gradients
    fn backward(
        q: &Tensor<Self>,
        k: &Tensor<Self>,
        values: &Tensor<Self>,
        saved: (&Tensor<f32>, &Tensor<f32>, &Tensor<f32>),
        mask: Option<&Tensor<u8>>,
        heads: usize,
        scale: f32,
        grads: (&mut Tensor<f32>, &mut Tensor<f32>, &mut Tensor<f32>),
        mode: EqsdpaBackwardMode,
    ) -> Result<()>;
}

impl EqsdpaInput for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }

    fn forward(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        values: &Tensor<f32>,
        mask: Option<&Tensor<u8>>,
        heads: usize,
        scale: f32,
        out: &mut Tensor<f32>,
        lse: &mut Tensor<f32>,
    ) -> Result<()> {
        eqsdpa_forward(q, k, values, mask, heads, scale, out, lse)
    }

    fn backward(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        values: &Tensor<f32>,
        (out, lse, dout): (&Tensor<f32>, &Tensor<f32>, &Tensor<f32>),
        mask: Option<&Tensor<u8>>,
        heads: usize,
        scale: f32,
        (dq, dk, dv): (&mut Tensor<f32>, &mut Tensor<f32>, &mut Tensor<f32>),
        mode: EqsdpaBackwardMode,
    ) -> Result<()> {
        eqsdpa_backward(
            q, k, values, out, lse, dout, mask, heads, scale, dq, dk, dv, mode,
        )
    }
}

impl<T: HalfFloat> EqsdpaInput for T {
    fn from_f32(x: f32) -> Self {
        <T as HalfFloat>::from_f32(x)
    }

    fn forward(
        q: &Tensor<T>,
        k: &Tensor<T>,
        values: &Tensor<T>,
        mask: Option<&Tensor<u8>>,
        heads: usize,
        scale: f32,
        out: &mut Tensor<f32>,
        lse: &mut Tensor<f32>,
    ) -> Result<()> {
        eqsdpa_forward_half(q, k, values, mask, heads, scale, out, lse)
    }

    fn backward(
        q: &Tensor<T>,
        k: &Tensor<T>,
        values: &Tensor<T>,
        (out, lse, dout): (&Tensor<f32>, &Tensor<f32>, &Tensor<f32>),
        mask: Option<&Tensor<u8>>,
        heads: usize,
        scale: f32,
        (dq, dk, dv): (&mut Tensor<f32>, &mut Tensor<f32>, &mut Tensor<f32>),
        mode: EqsdpaBackwardMode,
    ) -> Result<()> {
        eqsdpa_backward_half(
            q, k, values, out, lse, dout, mask, heads, scale, dq, dk, dv, mode,
        )
    }
}
