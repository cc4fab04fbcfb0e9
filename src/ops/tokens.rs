//! Token layout ops of the token model, forward and backward. Kernels: `cuda/tokens.cu`.
//!
//! Per-frame token features are row-major `x[B, T, C, H]`: `B` frames, `T` tokens per frame,
//! `C = 1` for scalar features or `C = 3` for vector features (the x, y, z components), `H`
//! channels. A scalar tensor may also be shaped `[B, T, H]` (read as `C = 1`). Every op here
//! moves or combines values only within one component `c`: mixing the components of a vector
//! would break rotation equivariance.
//!
//! - [`window_merge_gather`] / [`window_merge_scatter`]: the data movement of the token merger
//!   (windows of `w` consecutive tokens laid side by side for a `Linear(w*H -> H)`);
//! - [`split_heads`] / [`merge_heads`]: `[B, T, C, H]` to and from the per-head layout of the
//!   materialised attention;
//! - [`position_encoding_add`]: sinusoidal position encoding of the scalars;
//! - [`pool_forward`] / [`pool_backward`]: mean or first-token pooling under a token mask;
//! - [`apply_token_mask`]: zeroes padded tokens.
//!
//! Backward passes assign the input gradient (`dx = ...`); none of these ops has parameters.

use super::{same_device, Real, CPU_CHUNK};
use crate::device::Device;
use crate::kernels::tokens as k;
use crate::launch::{launch, KernelArgs, LaunchConfig};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

/// Threads per block of every kernel here; `pool_backward`'s `__launch_bounds__` and shared
/// partials are sized for it.
const THREADS: u32 = 256;

/// Extents of a token tensor `[B, T, C, H]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenDims {
    /// Frames.
    pub b: usize,
    /// Tokens per frame.
    pub t: usize,
    /// Components: 1 for scalars, 3 for vectors.
    pub c: usize,
    /// Channels.
    pub h: usize,
}

impl TokenDims {
    /// `[B, T, C, H]`.
    pub fn new(b: usize, t: usize, c: usize, h: usize) -> Self {
        Self { b, t, c, h }
    }
    /// Number of elements, `B*T*C*H`.
    pub fn len(&self) -> usize {
        self.b * self.t * self.c * self.h
    }
    /// Whether the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The shape `[B, T, C, H]`.
    pub fn shape(&self) -> [usize; 4] {
        [self.b, self.t, self.c, self.h]
    }
}

/// Number of merged tokens of a frame of `t` tokens in windows of `w`: `ceil(t / w)` (the last
/// window is zero-padded).
pub fn padded_tokens(t: usize, w: usize) -> usize {
    t.div_ceil(w)
}

/// Token mask of the merged tokens: `mask` is `[B, t]` (nonzero = valid), the result
/// `[B, ceil(t / w)]`; a merged token is valid (1) if any of the tokens of its window is, else 0.
///
/// # Panics
/// If `t` or `w` is 0 while `mask` is not empty, or `mask.len()` is not a multiple of `t`.
pub fn merged_token_mask(mask: &[u8], t: usize, w: usize) -> Vec<u8> {
    if mask.is_empty() {
        return Vec::new();
    }
    assert!(
        t > 0 && w > 0 && mask.len().is_multiple_of(t),
        "merged_token_mask: mask of {} entries is not [B, T] with T = {t}, or window w = {w} is 0",
        mask.len()
    );
    let tw = padded_tokens(t, w);
    mask.chunks(t)
        .flat_map(|frame| {
            (0..tw).map(move |i| frame[i * w..((i + 1) * w).min(t)].iter().any(|&m| m != 0) as u8)
        })
        .collect()
}

/// `[B, T, C, H]` of a token tensor: rank 4, or rank 3 `[B, T, H]` read as `C = 1`.
fn token_dims<E: crate::tensor::Element>(op: &str, name: &str, t: &Tensor<E>) -> Result<TokenDims> {
    match *t.shape() {
        [b, tt, h] => Ok(TokenDims::new(b, tt, 1, h)),
        [b, tt, c, h] => Ok(TokenDims::new(b, tt, c, h)),
        _ => bail!(
            "{op}: {name} has shape {:?}; expected [B, T, C, H] (or [B, T, H] for scalars)",
            t.shape()
        ),
    }
}

/// Checks that `t` has shape `want`; when `want[c_axis]` is 1 the shape without that axis is
/// accepted too (a scalar tensor written without its `C = 1` axis).
fn expect_shape<E: crate::tensor::Element>(
    op: &str,
    name: &str,
    t: &Tensor<E>,
    want: &[usize],
    c_axis: usize,
    pattern: &str,
) -> Result<()> {
    let shape = t.shape();
    let squeezed = want[c_axis] == 1 && {
        let mut w = want.to_vec();
        w.remove(c_axis);
        shape == w.as_slice()
    };
    ensure!(
        shape == want || squeezed,
        "{op}: {name} has shape {shape:?}, expected {pattern} = {want:?}"
    );
    Ok(())
}

/// Kernel arguments are `int`: every extent must fit.
fn fits_i32(op: &str, what: &[(&str, usize)]) -> Result<()> {
    for &(name, v) in what {
        ensure!(
            v <= i32::MAX as usize,
            "{op}: {name} = {v} is too large for the kernels (at most {})",
            i32::MAX
        );
    }
    Ok(())
}

fn check_mask(op: &str, mask: &Tensor<u8>, d: TokenDims) -> Result<()> {
    ensure!(
        mask.shape() == [d.b, d.t],
        "{op}: mask has shape {:?}, expected [B, T] = [{}, {}]",
        mask.shape(),
        d.b,
        d.t
    );
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Window merger

/// CPU twin of [`window_merge_gather`]; `d` are the extents of `x`.
pub fn window_merge_gather_host<R: Real>(x: &[R], out: &mut [R], d: TokenDims, w: usize) {
    let tw = padded_tokens(d.t, w);
    assert_eq!(x.len(), d.len(), "window_merge_gather_host: x");
    assert_eq!(
        out.len(),
        d.b * tw * d.c * w * d.h,
        "window_merge_gather_host: out"
    );
    let wh = w * d.h;
    // One row of out per (b, t', c).
    out.par_chunks_mut(wh.max(1))
        .enumerate()
        .for_each(|(row, o)| {
            let c = row % d.c;
            let tp = (row / d.c) % tw;
            let b = row / (d.c * tw);
            for (j, oj) in o.chunks_mut(d.h.max(1)).enumerate() {
                let t = tp * w + j;
                if t < d.t {
                    let s = ((b * d.t + t) * d.c + c) * d.h;
                    oj.copy_from_slice(&x[s..s + d.h]);
                } else {
                    oj.fill(R::of(0.0));
                }
            }
        });
}

/// CPU twin of [`window_merge_scatter`]; `d` are the extents of `dx`.
pub fn window_merge_scatter_host<R: Real>(dout: &[R], dx: &mut [R], d: TokenDims, w: usize) {
    let tw = padded_tokens(d.t, w);
    assert_eq!(dx.len(), d.len(), "window_merge_scatter_host: dx");
    assert_eq!(
        dout.len(),
        d.b * tw * d.c * w * d.h,
        "window_merge_scatter_host: dout"
    );
    // One row of dx per (b, t, c).
    dx.par_chunks_mut(d.h.max(1))
        .enumerate()
        .for_each(|(row, g)| {
            let c = row % d.c;
            let t = (row / d.c) % d.t;
            let b = row / (d.c * d.t);
            let s = (((b * tw + t / w) * d.c + c) * w + t % w) * d.h;
            g.copy_from_slice(&dout[s..s + d.h]);
        });
}

fn window_dims(
    op: &str,
    tokens: TokenDims,
    merged: &Tensor<f32>,
    name: &str,
    w: usize,
) -> Result<i32> {
    ensure!(w >= 1, "{op}: window w must be at least 1");
    let tw = padded_tokens(tokens.t, w);
    expect_shape(
        op,
        name,
        merged,
        &[tokens.b, tw, tokens.c, w * tokens.h],
        2,
        "[B, ceil(T/w), C, w*H]",
    )?;
    let d = tokens;
    fits_i32(op, &[("B", d.b), ("T", d.t), ("C", d.c), ("w*H", w * d.h)])?;
    Ok(tw as i32)
}

/// Window merger gather (the data movement of the token merger): for `x [B, T, C, H]` and
/// windows of `w` tokens, `out[b, t', c, j*H + h] = x[b, t'*w + j, c, h]`, or 0 where
/// `t'*w + j >= T` (zero padding of the last window). `out` is `[B, Tw, C, w*H]` with
/// `Tw = ceil(T / w)` ([`padded_tokens`]); `[B, Tw, w*H]` also works for scalars.
///
/// A bias-free `Linear(w*H -> H)` over the rows `(b, t', c)` of `out` then gives the merged
/// tokens; for vectors (`C = 3`) the same weights apply to each xyz component separately. Pad
/// the mask with [`merged_token_mask`]. Backward: [`window_merge_scatter`].
pub fn window_merge_gather(x: &Tensor<f32>, out: &mut Tensor<f32>, w: usize) -> Result<()> {
    let op = "window_merge_gather";
    let dev = same_device(op, x.device(), &[out.device()])?;
    let d = token_dims(op, "x", x)?;
    let tw = window_dims(op, d, out, "out", w)?;
    match dev {
        Device::Cpu => {
            window_merge_gather_host(x.host().unwrap(), out.host_mut().unwrap(), d, w);
            Ok(())
        }
        _ => launch(
            dev,
            &k::WINDOW_MERGE_GATHER,
            LaunchConfig::for_elements(out.len(), THREADS),
            KernelArgs::new()
                .input(x)
                .output(out)
                .i32(d.b as i32)
                .i32(d.t as i32)
                .i32(d.c as i32)
                .i32(d.h as i32)
                .i32(w as i32)
                .i32(tw),
        ),
    }
}

/// Backward of [`window_merge_gather`]: `dx[b, t, c, h] = dout[b, t / w, c, (t % w)*H + h]` for
/// `dout [B, Tw, C, w*H]` and `dx [B, T, C, H]`. Assigns `dx` (activation gradient); the
/// gradients of the padding columns are dropped.
pub fn window_merge_scatter(dout: &Tensor<f32>, dx: &mut Tensor<f32>, w: usize) -> Result<()> {
    let op = "window_merge_scatter";
    let dev = same_device(op, dout.device(), &[dx.device()])?;
    let d = token_dims(op, "dx", dx)?;
    let tw = window_dims(op, d, dout, "dout", w)?;
    match dev {
        Device::Cpu => {
            window_merge_scatter_host(dout.host().unwrap(), dx.host_mut().unwrap(), d, w);
            Ok(())
        }
        _ => launch(
            dev,
            &k::WINDOW_MERGE_SCATTER,
            LaunchConfig::for_elements(dx.len(), THREADS),
            KernelArgs::new()
                .input(dout)
                .output(dx)
                .i32(d.b as i32)
                .i32(d.t as i32)
                .i32(d.c as i32)
                .i32(d.h as i32)
                .i32(w as i32)
                .i32(tw),
        ),
    }
}

// ------------------------------------------------------------------------------------------
// Attention heads

/// CPU twin of [`split_heads`]; `d` are the extents of `x`, `out` is `[B, heads, T, width]`.
pub fn split_heads_host<R: Real>(
    x: &[R],
    out: &mut [R],
    d: TokenDims,
    heads: usize,
    width: usize,
    col_offset: usize,
) {
    let dh = d.h / heads;
    assert!(
        d.h.is_multiple_of(heads) && col_offset + d.c * dh <= width,
        "split_heads_host: layout"
    );
    assert_eq!(x.len(), d.len(), "split_heads_host: x");
    assert_eq!(
        out.len(),
        d.b * heads * d.t * width,
        "split_heads_host: out"
    );
    // One row of out per (b, head, t).
    out.par_chunks_mut(width.max(1))
        .enumerate()
        .for_each(|(row, o)| {
            let t = row % d.t;
            let hd = (row / d.t) % heads;
            let b = row / (d.t * heads);
            for c in 0..d.c {
                let s = ((b * d.t + t) * d.c + c) * d.h + hd * dh;
                let o0 = col_offset + c * dh;
                o[o0..o0 + dh].copy_from_slice(&x[s..s + dh]);
            }
        });
}

/// CPU twin of [`merge_heads`]; `d` are the extents of `dx`, `dout` is `[B, heads, T, width]`.
pub fn merge_heads_host<R: Real>(
    dout: &[R],
    dx: &mut [R],
    d: TokenDims,
    heads: usize,
    width: usize,
    col_offset: usize,
) {
    let dh = d.h / heads;
    assert!(
        d.h.is_multiple_of(heads) && col_offset + d.c * dh <= width,
        "merge_heads_host: layout"
    );
    assert_eq!(dx.len(), d.len(), "merge_heads_host: dx");
    assert_eq!(
        dout.len(),
        d.b * heads * d.t * width,
        "merge_heads_host: dout"
    );
    // One row of dx per (b, t, c).
    dx.par_chunks_mut(d.h.max(1))
        .enumerate()
        .for_each(|(row, g)| {
            let c = row % d.c;
            let t = (row / d.c) % d.t;
            let b = row / (d.c * d.t);
            for (hd, gh) in g.chunks_mut(dh.max(1)).enumerate() {
                let s = ((b * heads + hd) * d.t + t) * width + col_offset + c * dh;
                gh.copy_from_slice(&dout[s..s + dh]);
            }
        });
}

/// Checks the per-head layout; returns the width of the per-head tensor.
fn heads_dims(
    op: &str,
    tokens: TokenDims,
    per_head: &Tensor<f32>,
    name: &str,
    heads: usize,
    col_offset: usize,
) -> Result<usize> {
    let d = tokens;
    ensure!(heads >= 1, "{op}: heads must be at least 1");
    ensure!(
        d.h.is_multiple_of(heads),
        "{op}: H = {} is not divisible by heads = {heads}",
        d.h
    );
    let dh = d.h / heads;
    let shape = per_head.shape();
    ensure!(
        shape.len() == 4 && shape[0] == d.b && shape[1] == heads && shape[2] == d.t,
        "{op}: {name} has shape {shape:?}, expected [B, heads, T, width] = [{}, {heads}, {}, width]",
        d.b,
        d.t
    );
    let width = shape[3];
    ensure!(
        col_offset + d.c * dh <= width,
        "{op}: columns col_offset + C*dh = {col_offset} + {}*{dh} do not fit in {name}'s width {width}",
        d.c
    );
    fits_i32(
        op,
        &[
            ("B", d.b),
            ("T", d.t),
            ("C", d.c),
            ("H", d.h),
            ("width", width),
        ],
    )?;
    Ok(width)
}

/// Head split for the materialised attention: with `dh = H / heads`,
/// `out[b, hd, t, col_offset + c*dh + d] = x[b, t, c, hd*dh + d]` for `x [B, T, C, H]` and
/// `out [B, heads, T, width]`. Columns of `out` outside `[col_offset, col_offset + C*dh)` are
/// left untouched, so scalars (`C = 1`, offset 0) and vectors (`C = 3`, offset `dh`) can share
/// one `[B, heads, T, 4*dh]` value tensor. Backward: [`merge_heads`].
pub fn split_heads(
    x: &Tensor<f32>,
    out: &mut Tensor<f32>,
    heads: usize,
    col_offset: usize,
) -> Result<()> {
    let op = "split_heads";
    let dev = same_device(op, x.device(), &[out.device()])?;
    let d = token_dims(op, "x", x)?;
    let width = heads_dims(op, d, out, "out", heads, col_offset)?;
    match dev {
        Device::Cpu => {
            split_heads_host(
                x.host().unwrap(),
                out.host_mut().unwrap(),
                d,
                heads,
                width,
                col_offset,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::SPLIT_HEADS,
            LaunchConfig::for_elements(x.len(), THREADS),
            KernelArgs::new()
                .input(x)
                .output(out)
                .i32(d.b as i32)
                .i32(d.t as i32)
                .i32(d.c as i32)
                .i32(d.h as i32)
                .i32(heads as i32)
                .i32(width as i32)
                .i32(col_offset as i32),
        ),
    }
}

/// Joins heads: `dx[b, t, c, hd*dh + d] = dout[b, hd, t, col_offset + c*dh + d]` for
/// `dout [B, heads, T, width]` and `dx [B, T, C, H]`. It is both the forward of joining the
/// attention's head outputs back into tokens and the backward of [`split_heads`] (whose
/// untouched columns get no gradient). Assigns `dx` (activation gradient).
pub fn merge_heads(
    dout: &Tensor<f32>,
    dx: &mut Tensor<f32>,
    heads: usize,
    col_offset: usize,
) -> Result<()> {
    let op = "merge_heads";
    let dev = same_device(op, dout.device(), &[dx.device()])?;
    let d = token_dims(op, "dx", dx)?;
    let width = heads_dims(op, d, dout, "dout", heads, col_offset)?;
    match dev {
        Device::Cpu => {
            merge_heads_host(
                dout.host().unwrap(),
                dx.host_mut().unwrap(),
                d,
                heads,
                width,
                col_offset,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::MERGE_HEADS,
            LaunchConfig::for_elements(dx.len(), THREADS),
            KernelArgs::new()
                .input(dout)
                .output(dx)
                .i32(d.b as i32)
                .i32(d.t as i32)
                .i32(d.c as i32)
                .i32(d.h as i32)
                .i32(heads as i32)
                .i32(width as i32)
                .i32(col_offset as i32),
        ),
    }
}

// ------------------------------------------------------------------------------------------
// Position encoding

/// The angle of channel pair `i` at token `t`, as every device computes it: the frequency
/// `10000^(-2i/H)` in f64 rounded to f32, times `t` in f32 (one rounding). Sharing this exact f32
/// argument is what lets the tests compare sin/cos tightly at `t` ~ 2e4, where an ulp of the
/// angle is ~2e-3.
fn pe_angle(t: usize, two_i: usize, h: usize) -> f32 {
    let f = 10000f64.powf(-(two_i as f64) / h as f64) as f32;
    t as f32 * f
}

/// The sinusoidal position encoding `[T, H]`: `pe[t, 2i] = sin(t / 10000^(2i/H))`,
/// `pe[t, 2i+1] = cos(t / 10000^(2i/H))` (for odd `H` the last channel gets the sin term). The
/// angle is rounded to f32 as on the devices (see `pe_angle`); sin/cos are then evaluated in f64
/// and rounded to `R`.
pub fn position_encoding_host<R: Real>(t: usize, h: usize) -> Vec<R> {
    let mut pe = vec![R::of(0.0); t * h];
    pe.par_chunks_mut(h.max(1))
        .enumerate()
        .for_each(|(t, row)| {
            for (k, v) in row.iter_mut().enumerate() {
                let a = pe_angle(t, k & !1, h) as f64;
                *v = R::of(if k % 2 == 0 { a.sin() } else { a.cos() });
            }
        });
    pe
}

/// CPU twin of [`position_encoding_add`]: `x [B, T, H] += pe [T, H]`.
pub fn position_encoding_add_host<R: Real>(x: &mut [R], b: usize, t: usize, h: usize) {
    assert_eq!(x.len(), b * t * h, "position_encoding_add_host: x");
    let pe = position_encoding_host::<R>(t, h);
    x.par_chunks_mut((t * h).max(1)).for_each(|frame| {
        for (v, &p) in frame.iter_mut().zip(&pe) {
            *v = *v + p;
        }
    });
}

/// Adds the sinusoidal position encoding ([`position_encoding_host`]) to the scalar tokens
/// `x [B, T, H]` (or `[B, T, 1, H]`) in place, token `t` of every frame getting row `t`.
///
/// Backward: the identity (`dx = dy`; the encoding is a constant), so no backward op exists.
pub fn position_encoding_add(x: &mut Tensor<f32>) -> Result<()> {
    let op = "position_encoding_add";
    let d = token_dims(op, "x", x)?;
    ensure!(
        d.c == 1,
        "{op}: x has shape {:?}; the position encoding is added to scalars [B, T, H]",
        x.shape()
    );
    fits_i32(op, &[("B", d.b), ("T", d.t), ("H", d.h)])?;
    let dev = x.device().clone();
    match dev {
        Device::Cpu => {
            position_encoding_add_host(x.host_mut().unwrap(), d.b, d.t, d.h);
            Ok(())
        }
        _ => launch(
            &dev,
            &k::POSITION_ENCODING_ADD,
            LaunchConfig::for_elements(d.t * d.h, THREADS),
            KernelArgs::new()
                .output(x)
                .i32(d.b as i32)
                .i32(d.t as i32)
                .i32(d.h as i32),
        ),
    }
}

// ------------------------------------------------------------------------------------------
// Pooling

/// How [`pool_forward`] pools the tokens of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// Average over the valid tokens (all tokens without a mask); 0 for a frame with none.
    Mean,
    /// Token 0 (0 if the mask marks it invalid).
    First,
}

impl Pool {
    /// The kernels' code (`kPoolMean`, `kPoolFirst` in `cuda/tokens.cu`).
    fn code(self) -> i32 {
        match self {
            Self::Mean => 0,
            Self::First => 1,
        }
    }
}

fn valid(mask: Option<&[u8]>, i: usize) -> bool {
    mask.is_none_or(|m| m[i] != 0)
}

/// CPU twin of [`pool_forward`]; `d` are the extents of `x`, `out` is `[B, C, H]`, `mask`
/// `[B, T]`. The mean sums tokens in order, as the kernel does.
pub fn pool_forward_host<R: Real>(
    x: &[R],
    mask: Option<&[u8]>,
    out: &mut [R],
    d: TokenDims,
    kind: Pool,
) {
    let ch = d.c * d.h;
    assert_eq!(x.len(), d.len(), "pool_forward_host: x");
    assert_eq!(out.len(), d.b * ch, "pool_forward_host: out");
    assert!(
        mask.is_none_or(|m| m.len() == d.b * d.t),
        "pool_forward_host: mask"
    );
    out.par_chunks_mut(ch.max(1))
        .enumerate()
        .for_each(|(b, o)| {
            let xb = &x[b * d.t * ch..(b + 1) * d.t * ch];
            let ok = |t: usize| valid(mask, b * d.t + t);
            match kind {
                Pool::First => {
                    if d.t > 0 && ok(0) {
                        o.copy_from_slice(&xb[..ch]);
                    } else {
                        o.fill(R::of(0.0));
                    }
                }
                Pool::Mean => {
                    o.fill(R::of(0.0));
                    let mut count = 0usize;
                    for t in (0..d.t).filter(|&t| ok(t)) {
                        for (v, &xv) in o.iter_mut().zip(&xb[t * ch..(t + 1) * ch]) {
                            *v = *v + xv;
                        }
                        count += 1;
                    }
                    if count > 0 {
                        let n = R::of(count as f64);
                        o.iter_mut().for_each(|v| *v = *v / n);
                    }
                }
            }
        });
}

/// CPU twin of [`pool_backward`]; `d` are the extents of `dx`.
pub fn pool_backward_host<R: Real>(
    dout: &[R],
    mask: Option<&[u8]>,
    dx: &mut [R],
    d: TokenDims,
    kind: Pool,
) {
    let ch = d.c * d.h;
    assert_eq!(dx.len(), d.len(), "pool_backward_host: dx");
    assert_eq!(dout.len(), d.b * ch, "pool_backward_host: dout");
    assert!(
        mask.is_none_or(|m| m.len() == d.b * d.t),
        "pool_backward_host: mask"
    );
    dx.par_chunks_mut((d.t * ch).max(1))
        .enumerate()
        .for_each(|(b, g)| {
            let ok = |t: usize| valid(mask, b * d.t + t);
            let count = (0..d.t).filter(|&t| ok(t)).count();
            let gb = &dout[b * ch..(b + 1) * ch];
            for (t, gt) in g.chunks_mut(ch.max(1)).enumerate() {
                let used = ok(t) && (kind == Pool::Mean || t == 0);
                if !used {
                    gt.fill(R::of(0.0));
                } else if kind == Pool::First {
                    gt.copy_from_slice(gb);
                } else {
                    let n = R::of(count as f64);
                    for (v, &g) in gt.iter_mut().zip(gb) {
                        *v = g / n;
                    }
                }
            }
        });
}

/// Shape checks of the pooling ops; returns the token extents.
fn pool_dims(
    op: &str,
    tokens: &Tensor<f32>,
    tokens_name: &str,
    pooled: &Tensor<f32>,
    pooled_name: &str,
    mask: Option<&Tensor<u8>>,
) -> Result<(TokenDims, i64)> {
    let mut devs = vec![pooled.device()];
    devs.extend(mask.map(|m| m.device()));
    same_device(op, tokens.device(), &devs)?;
    let d = token_dims(op, tokens_name, tokens)?;
    ensure!(d.t >= 1, "{op}: {tokens_name} has no tokens (T = 0)");
    expect_shape(op, pooled_name, pooled, &[d.b, d.c, d.h], 1, "[B, C, H]")?;
    fits_i32(op, &[("B", d.b), ("T", d.t), ("C*H", d.c * d.h)])?;
    let mask_addr = match mask {
        Some(m) => {
            check_mask(op, m, d)?;
            m.address() as i64
        }
        None => 0,
    };
    Ok((d, mask_addr))
}

/// Grid of the pooling kernels: x over `items` per frame, y over frames (both grid-stride).
fn pool_grid(items: usize, frames: usize) -> LaunchConfig {
    LaunchConfig {
        grid: [
            items.div_ceil(THREADS as usize).clamp(1, 65_535) as u32,
            frames.clamp(1, 65_535) as u32,
            1,
        ],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
    }
}

/// Pools the tokens of each frame: `x [B, T, C, H]` to `out [B, C, H]` (`[B, H]` also works for
/// scalars). `mask [B, T]` (nonzero = valid) restricts the tokens: [`Pool::Mean`] averages the
/// valid tokens (all without a mask; 0, not NaN, for a frame with none), [`Pool::First`] takes
/// token 0 (0 if it is masked). Backward: [`pool_backward`].
pub fn pool_forward(
    x: &Tensor<f32>,
    mask: Option<&Tensor<u8>>,
    out: &mut Tensor<f32>,
    kind: Pool,
) -> Result<()> {
    let op = "pool_forward";
    let (d, mask_addr) = pool_dims(op, x, "x", out, "out", mask)?;
    let dev = x.device();
    match dev {
        Device::Cpu => {
            pool_forward_host(
                x.host().unwrap(),
                mask.map(|m| m.host().unwrap()),
                out.host_mut().unwrap(),
                d,
                kind,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::POOL_FORWARD,
            pool_grid(d.c * d.h, d.b),
            KernelArgs::new()
                .input(x)
                // A null pointer when there is no mask.
                .i64(mask_addr)
                .output(out)
                .i32(d.b as i32)
                .i32(d.t as i32)
                .i32(d.c as i32)
                .i32(d.h as i32)
                .i32(kind.code()),
        ),
    }
}

/// Backward of [`pool_forward`]: for [`Pool::Mean`], `dx[b, t] = dout[b] / n_valid(b)` on valid
/// tokens; for [`Pool::First`], `dx[b, 0] = dout[b]` if token 0 is valid; 0 on every other
/// (masked or unused) token. Assigns `dx` (activation gradient).
pub fn pool_backward(
    dout: &Tensor<f32>,
    mask: Option<&Tensor<u8>>,
    dx: &mut Tensor<f32>,
    kind: Pool,
) -> Result<()> {
    let op = "pool_backward";
    let (d, mask_addr) = pool_dims(op, dx, "dx", dout, "dout", mask)?;
    let dev = dx.device().clone();
    match dev {
        Device::Cpu => {
            pool_backward_host(
                dout.host().unwrap(),
                mask.map(|m| m.host().unwrap()),
                dx.host_mut().unwrap(),
                d,
                kind,
            );
            Ok(())
        }
        _ => launch(
            &dev,
            &k::POOL_BACKWARD,
            pool_grid(d.t * d.c * d.h, d.b),
            KernelArgs::new()
                .input(dout)
                .i64(mask_addr)
                .output(dx)
                .i32(d.b as i32)
                .i32(d.t as i32)
                .i32(d.c as i32)
                .i32(d.h as i32)
                .i32(kind.code()),
        ),
    }
}

// ------------------------------------------------------------------------------------------
// Token mask

/// CPU twin of [`apply_token_mask`]: `row = C*H` elements per token.
pub fn apply_token_mask_host<R: Real>(x: &mut [R], mask: &[u8], row: usize) {
    assert_eq!(x.len(), mask.len() * row, "apply_token_mask_host: x");
    let tokens_per_chunk = (CPU_CHUNK / row.max(1)).max(1);
    x.par_chunks_mut((tokens_per_chunk * row).max(1))
        .zip(mask.par_chunks(tokens_per_chunk))
        .for_each(|(x, m)| {
            for (xt, &m) in x.chunks_mut(row.max(1)).zip(m) {
                if m == 0 {
                    xt.fill(R::of(0.0));
                }
            }
        });
}

/// Zeroes the padded tokens of `x [B, T, C, H]` (or `[B, T, H]`) in place: `x[b, t] = 0` where
/// `mask[b, t] == 0` (an assignment, so a NaN in a padded token does not survive). Used after a
/// residual block so padding stays zero.
///
/// Backward: the same op applied to the gradient in place (`dx = dy` on valid tokens, 0 on
/// padded ones); call `apply_token_mask(dy, mask)`.
pub fn apply_token_mask(x: &mut Tensor<f32>, mask: &Tensor<u8>) -> Result<()> {
    let op = "apply_token_mask";
    let dev = same_device(op, x.device(), &[mask.device()])?.clone();
    let d = token_dims(op, "x", x)?;
    check_mask(op, mask, d)?;
    fits_i32(op, &[("C*H", d.c * d.h)])?;
    match dev {
        Device::Cpu => {
            apply_token_mask_host(x.host_mut().unwrap(), mask.host().unwrap(), d.c * d.h);
            Ok(())
        }
        _ => {
            let n = x.len();
            launch(
                &dev,
                &k::APPLY_TOKEN_MASK,
                LaunchConfig::for_elements(n, THREADS),
                KernelArgs::new()
                    .output(x)
                    .input(mask)
                    .i64(n as i64)
                    .i32((d.c * d.h) as i32),
            )
        }
    }
}
