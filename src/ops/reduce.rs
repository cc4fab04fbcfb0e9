//! Row reductions of a row-major `[rows, cols]` matrix, forward and backward. Kernels:
//! `cuda/reduce.cu`.

use super::{expect_len, same_device, Real};
use crate::device::Device;
use crate::kernels::reduce as k;
use crate::launch::{launch, KernelArgs, LaunchConfig};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Threads per block of `row_sum_forward` (one block per row); must match the kernel's
/// `__launch_bounds__`.
const THREADS: u32 = 256;

/// Whether the reduction sums or averages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowReduce {
    /// `out[r] = sum_c x[r, c]`
    Sum,
    /// `out[r] = mean_c x[r, c]`
    Mean,
}

impl RowReduce {
    fn scale(self, cols: usize) -> f64 {
        match self {
            Self::Sum => 1.0,
            Self::Mean => 1.0 / cols as f64,
        }
    }
}

/// Sum with eight interleaved accumulators: the compiler vectorises it, and the rounding error
/// grows with n/8 rather than n.
fn sum8<R: Real>(row: &[R]) -> R {
    let mut acc = [R::of(0.0); 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = *a + v;
        }
    }
    let tail: R = chunks.remainder().iter().copied().sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// CPU twin of `row_sum_forward`.
pub fn row_sum_forward_host<R: Real>(x: &[R], out: &mut [R], cols: usize, kind: RowReduce) {
    let s = R::of(kind.scale(cols));
    out.par_iter_mut()
        .zip(x.par_chunks(cols.max(1)))
        .for_each(|(o, row)| *o = s * sum8(row));
}

/// CPU twin of `row_sum_backward`: `dx[r, c] = scale * dout[r]`.
pub fn row_sum_backward_host<R: Real>(dout: &[R], dx: &mut [R], cols: usize, kind: RowReduce) {
    let s = R::of(kind.scale(cols));
    dx.par_chunks_mut(cols.max(1))
        .zip(dout.par_iter())
        .for_each(|(row, &d)| row.iter_mut().for_each(|v| *v = s * d));
}

fn dims(op: &str, x_len: usize, rows: usize, cols: usize) -> Result<()> {
    ensure!(
        rows * cols == x_len,
        "{op}: matrix of {x_len} elements is not {rows} x {cols}"
    );
    ensure!(
        rows <= i32::MAX as usize && cols <= i32::MAX as usize,
        "{op}: {rows} x {cols} too large"
    );
    Ok(())
}

/// `out[r]` = sum (or mean) over the columns of row `r` of `x` (`[rows, cols]`).
pub fn row_sum_forward(
    x: &Tensor<f32>,
    out: &mut Tensor<f32>,
    cols: usize,
    kind: RowReduce,
) -> Result<()> {
    let op = "row_sum_forward";
    let dev = same_device(op, x.device(), &[out.device()])?;
    let rows = out.len();
    dims(op, x.len(), rows, cols)?;
    match dev {
        Device::Cpu => {
            row_sum_forward_host(x.host().unwrap(), out.host_mut().unwrap(), cols, kind);
            Ok(())
        }
        _ => launch(
            dev,
            &k::ROW_SUM_FORWARD,
            LaunchConfig {
                grid: [rows.clamp(1, 65_535) as u32, 1, 1],
                block: [THREADS, 1, 1],
                shared_bytes: 0,
            },
            KernelArgs::new()
                .input(x)
                .output(out)
                .i32(rows as i32)
                .i32(cols as i32)
                .f32(kind.scale(cols) as f32),
        ),
    }
}

/// `dx[r, c] = dout[r]` (times `1/cols` for the mean). Assigns `dx`.
pub fn row_sum_backward(
    dout: &Tensor<f32>,
    dx: &mut Tensor<f32>,
    cols: usize,
    kind: RowReduce,
) -> Result<()> {
    let op = "row_sum_backward";
    let dev = same_device(op, dout.device(), &[dx.device()])?;
    let rows = dout.len();
    dims(op, dx.len(), rows, cols)?;
    expect_len(op, "dx", dx, rows * cols)?;
    match dev {
        Device::Cpu => {
            row_sum_backward_host(dout.host().unwrap(), dx.host_mut().unwrap(), cols, kind);
            Ok(())
        }
        _ => launch(
            dev,
            &k::ROW_SUM_BACKWARD,
            LaunchConfig::for_elements(rows * cols, 256),
            KernelArgs::new()
                .input(dout)
                .output(dx)
                .i32(rows as i32)
                .i32(cols as i32)
                .f32(kind.scale(cols) as f32),
        ),
    }
}
