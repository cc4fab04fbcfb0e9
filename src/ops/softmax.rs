//! Row-wise softmax and log-softmax of a row-major `[rows, cols]` matrix (any leading shape: the
//! last dimension is the row), forward and backward. Kernels: `cuda/softmax.cu`.
//!
//! The softmax is the materialised attention's: rows are (batch, head, query), columns are keys,
//! and an optional per-frame key mask zeroes the probability of padded keys. The log-softmax is
//! SPIB's state classifier's. Backward passes assign the input gradient (`dx = ...`).

use super::{expect_len, same_device, Real, CPU_CHUNK};
use crate::device::Device;
use crate::kernels::softmax as k;
use crate::launch::{launch, KernelArgs, LaunchConfig};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

/// Largest block of the kernels; must match their `__launch_bounds__`.
const MAX_THREADS: usize = 256;

/// The natural logarithm, which [`Real`] lacks: a local trait so that `ops::Real` stays as is.
pub trait Ln: Real {
    /// ln(self).
    fn ln(self) -> Self;
}
impl Ln for f32 {
    fn ln(self) -> Self {
        f32::ln(self)
    }
}
impl Ln for f64 {
    fn ln(self) -> Self {
        f64::ln(self)
    }
}

fn neg_inf<R: Real>() -> R {
    R::of(f64::NEG_INFINITY)
}

/// Rows handed to one rayon task: about `CPU_CHUNK` elements.
fn rows_per_task(cols: usize) -> usize {
    (CPU_CHUNK / cols.max(1)).max(1)
}

/// Sum of `f(0..n)` in blocks of 256: the rounding error grows with 256 + n / 256 rather than n,
/// so the f32 twin stays as accurate as the kernels' tree sums on long rows.
fn blocked_sum<R: Real>(n: usize, f: impl Fn(usize) -> R) -> R {
    let mut total = R::of(0.0);
    for start in (0..n).step_by(256) {
        let mut part = R::of(0.0);
        for c in start..(start + 256).min(n) {
            part = part + f(c);
        }
        total = total + part;
    }
    total
}

/// Softmax of one row, with `keep(c)` false for masked columns.
fn softmax_row<R: Real>(x: &[R], y: &mut [R], scale: R, keep: impl Fn(usize) -> bool) {
    let mut m = neg_inf::<R>();
    for (c, &v) in x.iter().enumerate() {
        let v = scale * v;
        if keep(c) && v > m {
            m = v;
        }
    }
    if m == neg_inf() {
        // Every column masked (or -inf): all zeros rather than 0/0.
        y.iter_mut().for_each(|y| *y = R::of(0.0));
        return;
    }
    for (c, (y, &v)) in y.iter_mut().zip(x).enumerate() {
        *y = if keep(c) {
            (scale * v - m).exp()
        } else {
            R::of(0.0)
        };
    }
    let s = blocked_sum(y.len(), |c| y[c]);
    let inv = R::of(1.0) / s;
    y.iter_mut().for_each(|y| *y = *y * inv);
}

/// CPU twin of `softmax_forward` (see [`softmax_forward`]); `x` and `y` are `[rows, cols]`,
/// `key_mask` (if any) `[rows / rows_per_mask, cols]`.
pub fn softmax_forward_host<R: Real>(
    x: &[R],
    y: &mut [R],
    cols: usize,
    scale: R,
    key_mask: Option<&[u8]>,
    rows_per_mask: usize,
) {
    let cols = cols.max(1);
    y.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .enumerate()
        .with_min_len(rows_per_task(cols))
        .for_each(|(r, (y, x))| match key_mask {
            Some(mask) => {
                let m = &mask[(r / rows_per_mask) * cols..][..cols];
                softmax_row(x, y, scale, |c| m[c] != 0)
            }
            None => softmax_row(x, y, scale, |_| true),
        });
}

/// CPU twin of `softmax_backward`: `dx = scale * y * (dy - sum_c dy y)`.
pub fn softmax_backward_host<R: Real>(y: &[R], dy: &[R], dx: &mut [R], cols: usize, scale: R) {
    let cols = cols.max(1);
    dx.par_chunks_mut(cols)
        .zip(y.par_chunks(cols).zip(dy.par_chunks(cols)))
        .with_min_len(rows_per_task(cols))
        .for_each(|(dx, (y, dy))| {
            let dot = blocked_sum(y.len(), |c| y[c] * dy[c]);
            for ((dx, &y), &d) in dx.iter_mut().zip(y).zip(dy) {
                *dx = scale * y * (d - dot);
            }
        });
}

/// CPU twin of `log_softmax_forward`: `y = x - m - ln(sum_c exp(x - m))`, m the row maximum.
pub fn log_softmax_forward_host<R: Ln>(x: &[R], y: &mut [R], cols: usize) {
    let cols = cols.max(1);
    y.par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .with_min_len(rows_per_task(cols))
        .for_each(|(y, x)| {
            let m = x
                .iter()
                .fold(neg_inf::<R>(), |m, &v| if v > m { v } else { m });
            let s = blocked_sum(x.len(), |c| (x[c] - m).exp());
            let log_s = s.ln();
            for (y, &v) in y.iter_mut().zip(x) {
                *y = (v - m) - log_s;
            }
        });
}

/// CPU twin of `log_softmax_backward`: `dx = dy - exp(y) * sum_c dy`.
pub fn log_softmax_backward_host<R: Real>(y: &[R], dy: &[R], dx: &mut [R], cols: usize) {
    let cols = cols.max(1);
    dx.par_chunks_mut(cols)
        .zip(y.par_chunks(cols).zip(dy.par_chunks(cols)))
        .with_min_len(rows_per_task(cols))
        .for_each(|(dx, (y, dy))| {
            let total = blocked_sum(dy.len(), |c| dy[c]);
            for ((dx, &y), &d) in dx.iter_mut().zip(y).zip(dy) {
                *dx = d - y.exp() * total;
            }
        });
}

/// `(rows, cols)` of a tensor whose last dimension is the row.
fn row_dims(op: &str, what: &str, t: &Tensor<f32>) -> Result<(usize, usize)> {
    let Some(&cols) = t.shape().last() else {
        bail!("{op}: {what} is a scalar; expected [.., cols]");
    };
    ensure!(
        cols > 0 || t.is_empty(),
        "{op}: {what} has shape {:?}",
        t.shape()
    );
    let rows = t.len().checked_div(cols).unwrap_or(0);
    ensure!(
        rows <= i32::MAX as usize && cols <= i32::MAX as usize,
        "{op}: {what} of shape {:?} is too large ({rows} x {cols})",
        t.shape()
    );
    Ok((rows, cols))
}

/// One block per row, sized to the row: a multiple of 32 up to [`MAX_THREADS`], so that short
/// rows (few keys) do not leave most of a 256-thread block idle.
fn row_launch(rows: usize, cols: usize) -> LaunchConfig {
    LaunchConfig {
        grid: [rows.clamp(1, 65_535) as u32, 1, 1],
        block: [(cols.div_ceil(32) * 32).clamp(32, MAX_THREADS) as u32, 1, 1],
        shared_bytes: 0,
    }
}

/// Row-wise softmax of `x` (`[.., cols]`, the last dimension is the row) into `y` (same size):
/// `y[r, c] = exp(scale x[r, c] - m) / sum over unmasked c'`, m the row's maximum over unmasked
/// columns.
///
/// With `key_mask` (`[rows / rows_per_mask, cols]`, u8), column c of row r is masked where
/// `key_mask[r / rows_per_mask, c] == 0`: its probability is exactly 0, and a row with every
/// column masked is all zeros (never NaN). For attention scores `[batch, heads, queries, keys]`
/// with a per-frame key mask `[batch, keys]`, `rows_per_mask = heads * queries`. Without a mask
/// `rows_per_mask` is ignored.
pub fn softmax_forward(
    x: &Tensor<f32>,
    y: &mut Tensor<f32>,
    scale: f32,
    key_mask: Option<&Tensor<u8>>,
    rows_per_mask: usize,
) -> Result<()> {
    let op = "softmax_forward";
    let mut others = vec![y.device()];
    if let Some(m) = key_mask {
        others.push(m.device());
    }
    let dev = same_device(op, x.device(), &others)?;
    let (rows, cols) = row_dims(op, "x", x)?;
    expect_len(op, "y", y, x.len())?;
    if let Some(m) = key_mask {
        ensure!(
            rows_per_mask > 0 && rows % rows_per_mask == 0,
            "{op}: {rows} rows are not a whole number of mask rows of {rows_per_mask} (rows_per_mask)"
        );
        ensure!(
            rows_per_mask <= i32::MAX as usize,
            "{op}: rows_per_mask {rows_per_mask} too large"
        );
        expect_len(op, "key_mask", m, rows / rows_per_mask * cols)?;
    }
    if rows == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            softmax_forward_host(
                x.host().unwrap(),
                y.host_mut().unwrap(),
                cols,
                scale,
                key_mask.map(|m| m.host().unwrap()),
                rows_per_mask,
            );
            Ok(())
        }
        _ => {
            let args = KernelArgs::new().input(x).output(y);
            let args = match key_mask {
                Some(m) => args.input(m),
                // A null pointer: the kernel masks nothing.
                None => args.i64(0),
            };
            launch(
                dev,
                &k::SOFTMAX_FORWARD,
                row_launch(rows, cols),
                args.i32(rows as i32)
                    .i32(cols as i32)
                    .f32(scale)
                    .i32(rows_per_mask.clamp(1, i32::MAX as usize) as i32),
            )
        }
    }
}

/// Backward of [`softmax_forward`] from its output `y`: `dx = scale * y * (dy - sum_c dy y)`.
/// Masked entries (y = 0) get 0. Assigns `dx`.
pub fn softmax_backward(
    y: &Tensor<f32>,
    dy: &Tensor<f32>,
    dx: &mut Tensor<f32>,
    scale: f32,
) -> Result<()> {
    let op = "softmax_backward";
    let dev = same_device(op, y.device(), &[dy.device(), dx.device()])?;
    let (rows, cols) = row_dims(op, "y", y)?;
    expect_len(op, "dy", dy, y.len())?;
    expect_len(op, "dx", dx, y.len())?;
    if rows == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            softmax_backward_host(
                y.host().unwrap(),
                dy.host().unwrap(),
                dx.host_mut().unwrap(),
                cols,
                scale,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::SOFTMAX_BACKWARD,
            row_launch(rows, cols),
            KernelArgs::new()
                .input(y)
                .input(dy)
                .output(dx)
                .i32(rows as i32)
                .i32(cols as i32)
                .f32(scale),
        ),
    }
}

/// Row-wise log-softmax of `x` (`[.., cols]`) into `y`: `y = x - m - ln(sum_c exp(x - m))`.
pub fn log_softmax_forward(x: &Tensor<f32>, y: &mut Tensor<f32>) -> Result<()> {
    let op = "log_softmax_forward";
    let dev = same_device(op, x.device(), &[y.device()])?;
    let (rows, cols) = row_dims(op, "x", x)?;
    expect_len(op, "y", y, x.len())?;
    if rows == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            log_softmax_forward_host(x.host().unwrap(), y.host_mut().unwrap(), cols);
            Ok(())
        }
        _ => launch(
            dev,
            &k::LOG_SOFTMAX_FORWARD,
            row_launch(rows, cols),
            KernelArgs::new()
                .input(x)
                .output(y)
                .i32(rows as i32)
                .i32(cols as i32),
        ),
    }
}

/// Backward of [`log_softmax_forward`] from its output `y`: `dx = dy - exp(y) * sum_c dy`.
/// Assigns `dx`.
pub fn log_softmax_backward(y: &Tensor<f32>, dy: &Tensor<f32>, dx: &mut Tensor<f32>) -> Result<()> {
    let op = "log_softmax_backward";
    let dev = same_device(op, y.device(), &[dy.device(), dx.device()])?;
    let (rows, cols) = row_dims(op, "y", y)?;
    expect_len(op, "dy", dy, y.len())?;
    expect_len(op, "dx", dx, y.len())?;
    if rows == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            log_softmax_backward_host(
                y.host().unwrap(),
                dy.host().unwrap(),
                dx.host_mut().unwrap(),
                cols,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::LOG_SOFTMAX_BACKWARD,
            row_launch(rows, cols),
            KernelArgs::new()
                .input(y)
                .input(dy)
                .output(dx)
                .i32(rows as i32)
                .i32(cols as i32),
        ),
    }
}
