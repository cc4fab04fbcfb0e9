//! Rotation-equivariant ops on separate scalar and vector token features, forward and backward.
//! Kernels: `cuda/equivariant.cu`.
//!
//! Layouts (row-major; N rows = batch * tokens): scalars `s [N, H]`, vectors `v [N, 3, H]` with
//! `v[n, c, h]` at `(n * 3 + c) * H + h` (c = x, y, z). Vector channels are only scaled by
//! invariants (norms, gates, the layer norm's per-row factor), never mixed across xyz, so every
//! vector output rotates with the vector inputs and every scalar output is invariant.
//!
//! Gradients: backward ops ASSIGN activation gradients (`dx = ...`) and ACCUMULATE parameter
//! gradients (`dgamma += ...`; only [`eq_layernorm_backward`] has parameters). Each doc comment
//! says which. Every reduction runs in a fixed order (no atomics), so results are bitwise
//! reproducible for a given shape on a given device.
//!
//! Shapes are checked by element count and by the last dimension (the channel count H), so a
//! caller may pass `[B, T, H]` as well as `[N, H]`, but a `[N, H, 3]` vector tensor is rejected.

use super::{expect_len, same_device, Real, CPU_CHUNK};
use crate::device::Device;
use crate::kernels::equivariant as k;
use crate::launch::{launch, KernelArgs, LaunchConfig};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

/// Threads per block of the elementwise kernels.
const THREADS: u32 = 256;
/// Threads per block of the layer-norm row kernels (one row per warp): `kEqThreads`.
const EQ_THREADS: u32 = 256;
/// Warps per block of the layer-norm row kernels: `kEqWarps`.
const EQ_WARPS: usize = EQ_THREADS as usize / 32;
/// Block of `eq_layernorm_param_reduce`: `kReduceCols` x `kReduceGroups`.
const REDUCE_BLOCK: [u32; 3] = [32, 16, 1];
/// Rows per block of `eq_layernorm_backward` (each block writes one row of parameter partials):
/// enough rows that the partials are small, few enough that N = 100k rows still fills a GPU.
const LN_ROWS_PER_BLOCK: usize = 64;
/// CUDA's limit on gridDim.x of the layer-norm backward (it does not grid-stride).
const GRID_MAX: usize = 65_535;
/// Largest H of the layer norm: its backward keeps 3 H floats per warp in shared memory, and
/// 8 warps x 3 x 2048 x 4 B = 192 KiB fits the 227 KiB an sm_80/sm_90 block may opt in to.
pub const EQ_LAYERNORM_MAX_H: usize = 2048;
/// The `eps` callers pass to [`vector_norm_forward`]: small enough not to bias norms of unit-scale
/// vectors (sqrt(1e-8) = 1e-4), large enough that the gradient v / |v| stays finite at v = 0.
pub const VECTOR_NORM_EPS: f32 = 1e-8;

/// The float types of the CPU twins: [`Real`] plus a square root.
pub trait EqReal: Real {
    /// Square root.
    fn sqrt(self) -> Self;
}
impl EqReal for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}
impl EqReal for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// Rows per rayon task for rows of `width` elements.
fn rows_per_task(width: usize) -> usize {
    (CPU_CHUNK / width.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------------
// CPU twins.

/// CPU twin of [`eq_layernorm_forward`]. H = `gamma_s.len()`, N = `s.len() / H`.
#[allow(clippy::too_many_arguments)] // inputs, three parameters, eps, three outputs
pub fn eq_layernorm_forward_host<R: EqReal>(
    s: &[R],
    v: &[R],
    gamma_s: &[R],
    beta_s: &[R],
    gamma_v: &[R],
    eps: R,
    s_out: &mut [R],
    v_out: &mut [R],
    stats: &mut [R],
) {
    let h = gamma_s.len();
    if h == 0 {
        return;
    }
    let inv_h = R::of(1.0 / h as f64);
    s_out
        .par_chunks_mut(h)
        .zip(v_out.par_chunks_mut(3 * h))
        .zip(stats.par_chunks_mut(3))
        .zip(s.par_chunks(h).zip(v.par_chunks(3 * h)))
        .with_min_len(rows_per_task(4 * h))
        .for_each(|(((so, vo), st), (sr, vr))| {
            let mean = sr.iter().copied().sum::<R>() * inv_h;
            let var = sr.iter().map(|&x| (x - mean) * (x - mean)).sum::<R>() * inv_h;
            let msv = vr.iter().map(|&x| x * x).sum::<R>() * inv_h;
            let rstd = R::of(1.0) / (var + eps).sqrt();
            let rstd_v = R::of(1.0) / (msv + eps).sqrt();
            for j in 0..h {
                so[j] = gamma_s[j] * ((sr[j] - mean) * rstd) + beta_s[j];
                let f = gamma_v[j] * rstd_v;
                for c in 0..3 {
                    vo[c * h + j] = f * vr[c * h + j];
                }
            }
            st.copy_from_slice(&[mean, rstd, rstd_v]);
        });
}

/// CPU twin of [`eq_layernorm_backward`]: assigns `ds`, `dv`; accumulates (+=) `dgamma_s`,
/// `dbeta_s`, `dgamma_v`. The parameter sums run over fixed chunks of rows whose partial sums are
/// added in order, so they do not depend on the thread count.
#[allow(clippy::too_many_arguments)] // the forward's inputs, two output gradients, five gradients
pub fn eq_layernorm_backward_host<R: EqReal>(
    s: &[R],
    v: &[R],
    gamma_s: &[R],
    gamma_v: &[R],
    stats: &[R],
    ds_out: &[R],
    dv_out: &[R],
    ds: &mut [R],
    dv: &mut [R],
    dgamma_s: &mut [R],
    dbeta_s: &mut [R],
    dgamma_v: &mut [R],
) {
    let h = gamma_s.len();
    if h == 0 {
        return;
    }
    let inv_h = R::of(1.0 / h as f64);
    let zero = R::of(0.0);
    let rows = rows_per_task(8 * h);
    let partials: Vec<Vec<R>> = ds
        .par_chunks_mut(rows * h)
        .zip(dv.par_chunks_mut(rows * 3 * h))
        .zip(s.par_chunks(rows * h).zip(v.par_chunks(rows * 3 * h)))
        .zip(
            ds_out
                .par_chunks(rows * h)
                .zip(dv_out.par_chunks(rows * 3 * h)),
        )
        .zip(stats.par_chunks(rows * 3))
        .map(|((((ds, dv), (s, v)), (dso, dvo)), stats)| {
            let mut p = vec![zero; 3 * h];
            for (i, st) in stats.chunks_exact(3).enumerate() {
                let (mean, rstd, rstd_v) = (st[0], st[1], st[2]);
                let sr = &s[i * h..(i + 1) * h];
                let vr = &v[i * 3 * h..(i + 1) * 3 * h];
                let dsr = &dso[i * h..(i + 1) * h];
                let dvr = &dvo[i * 3 * h..(i + 1) * 3 * h];
                let (mut sum_g, mut sum_gx, mut sum_vv) = (zero, zero, zero);
                for j in 0..h {
                    let xhat = (sr[j] - mean) * rstd;
                    let g = dsr[j] * gamma_s[j];
                    sum_g = sum_g + g;
                    sum_gx = sum_gx + g * xhat;
                    p[j] = p[j] + dsr[j] * xhat;
                    p[h + j] = p[h + j] + dsr[j];
                    let mut pv = zero;
                    for c in 0..3 {
                        pv = pv + dvr[c * h + j] * (vr[c * h + j] * rstd_v);
                    }
                    sum_vv = sum_vv + gamma_v[j] * pv;
                    p[2 * h + j] = p[2 * h + j] + pv;
                }
                let (mean_g, mean_gx, mean_vv) = (sum_g * inv_h, sum_gx * inv_h, sum_vv * inv_h);
                let dsw = &mut ds[i * h..(i + 1) * h];
                let dvw = &mut dv[i * 3 * h..(i + 1) * 3 * h];
                for j in 0..h {
                    let xhat = (sr[j] - mean) * rstd;
                    dsw[j] = rstd * (dsr[j] * gamma_s[j] - mean_g - xhat * mean_gx);
                    for c in 0..3 {
                        let vhat = vr[c * h + j] * rstd_v;
                        dvw[c * h + j] = rstd_v * (gamma_v[j] * dvr[c * h + j] - vhat * mean_vv);
                    }
                }
            }
            p
        })
        .collect();
    for j in 0..h {
        let col = |k: usize| partials.iter().fold(zero, |a, p| a + p[k]);
        dgamma_s[j] = dgamma_s[j] + col(j);
        dbeta_s[j] = dbeta_s[j] + col(h + j);
        dgamma_v[j] = dgamma_v[j] + col(2 * h + j);
    }
}

/// CPU twin of [`vector_gate_forward`]: `y[n, c, h] = g[n, h] u[n, c, h]`, C = `u.len() / g.len()`.
pub fn vector_gate_forward_host<R: Real>(g: &[R], u: &[R], y: &mut [R], h: usize) {
    if g.is_empty() || h == 0 {
        return;
    }
    let nc = u.len() / g.len();
    let rows = rows_per_task(nc * h);
    y.par_chunks_mut(rows * nc * h)
        .zip(u.par_chunks(rows * nc * h).zip(g.par_chunks(rows * h)))
        .for_each(|(y, (u, g))| {
            for ((y, u), g) in y
                .chunks_exact_mut(nc * h)
                .zip(u.chunks_exact(nc * h))
                .zip(g.chunks_exact(h))
            {
                // The nc components of the row, each scaled by the same gates.
                for (y, u) in y.chunks_exact_mut(h).zip(u.chunks_exact(h)) {
                    for ((y, &u), &g) in y.iter_mut().zip(u).zip(g) {
                        *y = g * u;
                    }
                }
            }
        });
}

/// CPU twin of [`vector_gate_backward`]: `dg[n, h] = sum_c u dy`, `du = g dy` (assigned; either
/// may be skipped).
pub fn vector_gate_backward_host<R: Real>(
    g: &[R],
    u: &[R],
    dy: &[R],
    dg: Option<&mut [R]>,
    du: Option<&mut [R]>,
    h: usize,
) {
    if g.is_empty() || h == 0 {
        return;
    }
    let nc = u.len() / g.len();
    let w = nc * h;
    let rows = rows_per_task(2 * w);
    if let Some(dg) = dg {
        dg.par_chunks_mut(rows * h)
            .zip(u.par_chunks(rows * w).zip(dy.par_chunks(rows * w)))
            .for_each(|(dg, (u, dy))| {
                for ((dg, u), dy) in dg
                    .chunks_exact_mut(h)
                    .zip(u.chunks_exact(w))
                    .zip(dy.chunks_exact(w))
                {
                    for (j, d) in dg.iter_mut().enumerate() {
                        *d = (0..nc).fold(R::of(0.0), |a, c| a + u[c * h + j] * dy[c * h + j]);
                    }
                }
            });
    }
    if let Some(du) = du {
        vector_gate_forward_host(g, dy, du, h);
    }
}

/// CPU twin of [`vector_norm_forward`]: `out[n, h] = sqrt(|v[n, :, h]|^2 + eps)`.
pub fn vector_norm_forward_host<R: EqReal>(v: &[R], out: &mut [R], eps: R, h: usize) {
    if h == 0 {
        return;
    }
    let rows = rows_per_task(4 * h);
    out.par_chunks_mut(rows * h)
        .zip(v.par_chunks(rows * 3 * h))
        .for_each(|(out, v)| {
            for (o, v) in out.chunks_exact_mut(h).zip(v.chunks_exact(3 * h)) {
                for (j, o) in o.iter_mut().enumerate() {
                    let (x, y, z) = (v[j], v[h + j], v[2 * h + j]);
                    *o = (x * x + y * y + z * z + eps).sqrt();
                }
            }
        });
}

/// CPU twin of [`vector_norm_backward`]: `dv = dout v / out` (assigned).
pub fn vector_norm_backward_host<R: Real>(v: &[R], out: &[R], dout: &[R], dv: &mut [R], h: usize) {
    if h == 0 {
        return;
    }
    let rows = rows_per_task(8 * h);
    dv.par_chunks_mut(rows * 3 * h)
        .zip(v.par_chunks(rows * 3 * h))
        .zip(out.par_chunks(rows * h).zip(dout.par_chunks(rows * h)))
        .for_each(|((dv, v), (out, dout))| {
            for (((dv, v), out), dout) in dv
                .chunks_exact_mut(3 * h)
                .zip(v.chunks_exact(3 * h))
                .zip(out.chunks_exact(h))
                .zip(dout.chunks_exact(h))
            {
                for j in 0..h {
                    let f = dout[j] / out[j];
                    for c in 0..3 {
                        dv[c * h + j] = f * v[c * h + j];
                    }
                }
            }
        });
}

/// The layout of a dot product's operands within their row: each operand is `[3, stride]` per
/// row with `h` used columns starting at `a_off` / `b_off`.
#[derive(Clone, Copy)]
struct DotLayout {
    h: usize,
    stride: usize,
    a_off: usize,
    b_off: usize,
}

fn dot_forward_rows<R: Real>(a: &[R], b: &[R], out: &mut [R], l: DotLayout) {
    let (h, w) = (l.h, 3 * l.stride);
    let rows = rows_per_task(4 * w);
    out.par_chunks_mut(rows * h)
        .zip(a.par_chunks(rows * w).zip(b.par_chunks(rows * w)))
        .for_each(|(out, (a, b))| {
            for ((o, a), b) in out
                .chunks_exact_mut(h)
                .zip(a.chunks_exact(w))
                .zip(b.chunks_exact(w))
            {
                for (j, o) in o.iter_mut().enumerate() {
                    *o = (0..3).fold(R::of(0.0), |acc, c| {
                        acc + a[l.a_off + c * l.stride + j] * b[l.b_off + c * l.stride + j]
                    });
                }
            }
        });
}

/// CPU twin of [`vector_dot_forward`]: `out[n, h] = sum_c a[n, c, h] b[n, c, h]`.
pub fn vector_dot_forward_host<R: Real>(a: &[R], b: &[R], out: &mut [R], h: usize) {
    if h == 0 {
        return;
    }
    let l = DotLayout {
        h,
        stride: h,
        a_off: 0,
        b_off: 0,
    };
    dot_forward_rows(a, b, out, l);
}

/// CPU twin of [`vector_dot_backward`]: `da = dout b`, `db = dout a` (assigned).
pub fn vector_dot_backward_host<R: Real>(
    a: &[R],
    b: &[R],
    dout: &[R],
    da: &mut [R],
    db: &mut [R],
    h: usize,
) {
    if h == 0 {
        return;
    }
    vector_gate_forward_host(dout, b, da, h);
    vector_gate_forward_host(dout, a, db, h);
}

/// CPU twin of [`vector_dot_split_forward`]: `out[n, h] = sum_c ab[n, c, h] ab[n, c, H + h]`.
pub fn vector_dot_split_forward_host<R: Real>(ab: &[R], out: &mut [R], h: usize) {
    if h == 0 {
        return;
    }
    let l = DotLayout {
        h,
        stride: 2 * h,
        a_off: 0,
        b_off: h,
    };
    dot_forward_rows(ab, ab, out, l);
}

/// CPU twin of [`vector_dot_split_backward`]: `dab[.., :H] = dout ab[.., H:]`,
/// `dab[.., H:] = dout ab[.., :H]` (assigned).
pub fn vector_dot_split_backward_host<R: Real>(ab: &[R], dout: &[R], dab: &mut [R], h: usize) {
    if h == 0 {
        return;
    }
    let w = 6 * h;
    let rows = rows_per_task(3 * w);
    dab.par_chunks_mut(rows * w)
        .zip(ab.par_chunks(rows * w).zip(dout.par_chunks(rows * h)))
        .for_each(|(dab, (ab, dout))| {
            for ((dab, ab), dout) in dab
                .chunks_exact_mut(w)
                .zip(ab.chunks_exact(w))
                .zip(dout.chunks_exact(h))
            {
                for c in 0..3 {
                    let (a, b) = ab[2 * c * h..2 * (c + 1) * h].split_at(h);
                    let (da, db) = dab[2 * c * h..2 * (c + 1) * h].split_at_mut(h);
                    for j in 0..h {
                        da[j] = dout[j] * b[j];
                        db[j] = dout[j] * a[j];
                    }
                }
            }
        });
}

/// CPU twin of [`eq_scalar_combine_forward`]:
/// `out = vdot o[:, :H] + vnorm o[:, H:2H] + o[:, 2H:]`.
pub fn eq_scalar_combine_forward_host<R: Real>(
    vdot: &[R],
    vnorm: &[R],
    o: &[R],
    out: &mut [R],
    h: usize,
) {
    if h == 0 {
        return;
    }
    let rows = rows_per_task(6 * h);
    out.par_chunks_mut(rows * h)
        .zip(vdot.par_chunks(rows * h).zip(vnorm.par_chunks(rows * h)))
        .zip(o.par_chunks(rows * 3 * h))
        .for_each(|((out, (vd, vn)), o)| {
            for (((out, vd), vn), o) in out
                .chunks_exact_mut(h)
                .zip(vd.chunks_exact(h))
                .zip(vn.chunks_exact(h))
                .zip(o.chunks_exact(3 * h))
            {
                for j in 0..h {
                    out[j] = vd[j] * o[j] + vn[j] * o[h + j] + o[2 * h + j];
                }
            }
        });
}

/// CPU twin of [`eq_scalar_combine_backward`] (all three gradients assigned).
#[allow(clippy::too_many_arguments)] // three inputs, the output gradient, three gradients, H
pub fn eq_scalar_combine_backward_host<R: Real>(
    vdot: &[R],
    vnorm: &[R],
    o: &[R],
    dout: &[R],
    dvdot: &mut [R],
    dvnorm: &mut [R],
    do_: &mut [R],
    h: usize,
) {
    if h == 0 {
        return;
    }
    let rows = rows_per_task(10 * h);
    dvdot
        .par_chunks_mut(rows * h)
        .zip(dvnorm.par_chunks_mut(rows * h))
        .zip(do_.par_chunks_mut(rows * 3 * h))
        .zip(vdot.par_chunks(rows * h).zip(vnorm.par_chunks(rows * h)))
        .zip(o.par_chunks(rows * 3 * h).zip(dout.par_chunks(rows * h)))
        .for_each(|((((dvd, dvn), dob), (vd, vn)), (o, d))| {
            for n in 0..d.len() / h {
                let (r, r3) = (n * h, n * 3 * h);
                for j in 0..h {
                    let g = d[r + j];
                    dvd[r + j] = g * o[r3 + j];
                    dvn[r + j] = g * o[r3 + h + j];
                    dob[r3 + j] = g * vd[r + j];
                    dob[r3 + h + j] = g * vn[r + j];
                    dob[r3 + 2 * h + j] = g;
                }
            }
        });
}

/// CPU twin of [`concat_columns`]: `out[n] = (a[n], b[n])` for `a [N, ha]`, `b [N, hb]`.
pub fn concat_columns_host<R: Real>(a: &[R], b: &[R], out: &mut [R], ha: usize, hb: usize) {
    let w = ha + hb;
    if w == 0 {
        return;
    }
    let rows = rows_per_task(2 * w);
    out.par_chunks_mut(rows * w).enumerate().for_each(|(t, o)| {
        for (i, o) in o.chunks_exact_mut(w).enumerate() {
            let n = t * rows + i;
            o[..ha].copy_from_slice(&a[n * ha..(n + 1) * ha]);
            o[ha..].copy_from_slice(&b[n * hb..(n + 1) * hb]);
        }
    });
}

/// CPU twin of [`split_columns`]: `da = dout[:, :ha]`, `db = dout[:, ha:]` (assigned).
pub fn split_columns_host<R: Real>(dout: &[R], da: &mut [R], db: &mut [R], ha: usize, hb: usize) {
    let w = ha + hb;
    if w == 0 {
        return;
    }
    for (n, d) in dout.chunks_exact(w).enumerate() {
        da[n * ha..(n + 1) * ha].copy_from_slice(&d[..ha]);
        db[n * hb..(n + 1) * hb].copy_from_slice(&d[ha..]);
    }
}

// ---------------------------------------------------------------------------------------------
// Shape checks.

/// The channel count (last dimension) of a tensor.
fn last_dim(op: &str, name: &str, t: &Tensor<f32>) -> Result<usize> {
    match t.shape().last() {
        Some(&h) => Ok(h),
        None => bail!("{op}: {name} is a scalar (shape []), expected channels last"),
    }
}

/// Checks that `t` holds `len` elements and that its last dimension is `h` (channels last).
fn expect_channels(op: &str, name: &str, t: &Tensor<f32>, len: usize, h: usize) -> Result<()> {
    expect_len(op, name, t, len)?;
    let last = last_dim(op, name, t)?;
    if last != h {
        bail!(
            "{op}: {name} has shape {:?}, expected {h} channels in the last dimension",
            t.shape()
        );
    }
    Ok(())
}

/// Rows of a `[N, H]` tensor with H = its last dimension, checked to fit the kernels' `int H`.
fn rows_of(op: &str, name: &str, t: &Tensor<f32>) -> Result<(usize, usize)> {
    let h = last_dim(op, name, t)?;
    ensure!(
        h <= i32::MAX as usize / 6,
        "{op}: {name} has {h} channels: too many"
    );
    Ok((t.len().checked_div(h).unwrap_or(0), h))
}

fn elementwise_config(n: usize) -> LaunchConfig {
    LaunchConfig::for_elements(n, THREADS)
}

// ---------------------------------------------------------------------------------------------
// Equivariant layer norm.

/// Equivariant layer norm, per row n of `s [N, H]`, `v [N, 3, H]`:
/// `s_out = gamma_s (s - mean) / sqrt(var + eps) + beta_s` (biased variance over H) and
/// `v_out[n, c, h] = gamma_v[h] v[n, c, h] / sqrt(mean_h |v[n, :, h]|^2 + eps)`: one factor per
/// row, the same for every xyz component, so `v_out` rotates with `v`. Writes `stats [N, 3]` =
/// (mean, 1/sqrt(var + eps), 1/sqrt(mean |v|^2 + eps)) per row for the backward. H = `gamma_s.len()`
/// (at most [`EQ_LAYERNORM_MAX_H`]).
#[allow(clippy::too_many_arguments)] // inputs, three parameters, eps, three outputs
pub fn eq_layernorm_forward(
    s: &Tensor<f32>,
    v: &Tensor<f32>,
    gamma_s: &Tensor<f32>,
    beta_s: &Tensor<f32>,
    gamma_v: &Tensor<f32>,
    eps: f32,
    s_out: &mut Tensor<f32>,
    v_out: &mut Tensor<f32>,
    stats: &mut Tensor<f32>,
) -> Result<()> {
    let op = "eq_layernorm_forward";
    let dev = same_device(
        op,
        s.device(),
        &[
            v.device(),
            gamma_s.device(),
            beta_s.device(),
            gamma_v.device(),
            s_out.device(),
            v_out.device(),
            stats.device(),
        ],
    )?;
    let (n, h) = layernorm_dims(op, s, v, gamma_s, gamma_v)?;
    expect_len(op, "beta_s", beta_s, h)?;
    expect_channels(op, "s_out", s_out, n * h, h)?;
    expect_channels(op, "v_out", v_out, n * 3 * h, h)?;
    expect_len(op, "stats", stats, n * 3)?;
    ensure!(eps > 0.0, "{op}: eps must be positive, got {eps}");
    if n == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            eq_layernorm_forward_host(
                s.host().unwrap(),
                v.host().unwrap(),
                gamma_s.host().unwrap(),
                beta_s.host().unwrap(),
                gamma_v.host().unwrap(),
                eps,
                s_out.host_mut().unwrap(),
                v_out.host_mut().unwrap(),
                stats.host_mut().unwrap(),
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::EQ_LAYERNORM_FORWARD,
            LaunchConfig {
                grid: [n.div_ceil(EQ_WARPS).clamp(1, GRID_MAX) as u32, 1, 1],
                block: [EQ_THREADS, 1, 1],
                shared_bytes: 0,
            },
            KernelArgs::new()
                .input(s)
                .input(v)
                .input(gamma_s)
                .input(beta_s)
                .input(gamma_v)
                .f32(eps)
                .output(s_out)
                .output(v_out)
                .output(stats)
                .i32(n as i32)
                .i32(h as i32),
        ),
    }
}

/// (N, H) of the layer norm from `gamma_s` (H) and `s` (N H), with the other inputs checked.
fn layernorm_dims(
    op: &str,
    s: &Tensor<f32>,
    v: &Tensor<f32>,
    gamma_s: &Tensor<f32>,
    gamma_v: &Tensor<f32>,
) -> Result<(usize, usize)> {
    let h = gamma_s.len();
    ensure!(
        (1..=EQ_LAYERNORM_MAX_H).contains(&h),
        "{op}: gamma_s has {h} channels, expected 1 to {EQ_LAYERNORM_MAX_H}"
    );
    if !s.len().is_multiple_of(h) {
        bail!(
            "{op}: s has shape {:?}, not a whole number of rows of {h} channels (gamma_s)",
            s.shape()
        );
    }
    let n = s.len() / h;
    ensure!(n <= i32::MAX as usize / 3, "{op}: {n} rows: too many");
    expect_channels(op, "s", s, n * h, h)?;
    expect_channels(op, "v", v, n * 3 * h, h)?;
    expect_len(op, "gamma_v", gamma_v, h)?;
    Ok((n, h))
}

/// Rows per block of the layer-norm backward for N rows: [`LN_ROWS_PER_BLOCK`], grown where
/// needed to keep the grid within CUDA's limit. A function of N only, so the order of the
/// parameter-gradient sums is too.
fn ln_rows_per_block(n: usize) -> usize {
    LN_ROWS_PER_BLOCK.max(n.div_ceil(GRID_MAX))
}

/// Floats of scratch (the per-block parameter partials) that [`eq_layernorm_backward_with_scratch`]
/// needs for N rows of H channels.
pub fn eq_layernorm_backward_scratch_len(n: usize, h: usize) -> usize {
    n.div_ceil(ln_rows_per_block(n)) * 3 * h
}

/// Backward of [`eq_layernorm_forward`], from its saved `stats`. ASSIGNS the activation
/// gradients `ds [N, H]`, `dv [N, 3, H]`; ACCUMULATES (+=) the parameter gradients `dgamma_s`,
/// `dbeta_s`, `dgamma_v` (`[H]` each). The parameter sums over rows run in a fixed order (per
/// block of rows into partials, then over blocks), so they are bitwise reproducible. On cuda and
/// emu this allocates its scratch (`[blocks, 3H]` floats) with `Tensor::zeros` on every call; see
/// [`eq_layernorm_backward_with_scratch`] to supply it.
#[allow(clippy::too_many_arguments)] // the forward's inputs, two output gradients, five gradients
pub fn eq_layernorm_backward(
    s: &Tensor<f32>,
    v: &Tensor<f32>,
    gamma_s: &Tensor<f32>,
    gamma_v: &Tensor<f32>,
    stats: &Tensor<f32>,
    ds_out: &Tensor<f32>,
    dv_out: &Tensor<f32>,
    ds: &mut Tensor<f32>,
    dv: &mut Tensor<f32>,
    dgamma_s: &mut Tensor<f32>,
    dbeta_s: &mut Tensor<f32>,
    dgamma_v: &mut Tensor<f32>,
) -> Result<()> {
    let mut scratch = match s.device() {
        Device::Cpu => None,
        dev => {
            let h = gamma_s.len();
            let n = s.len().checked_div(h).unwrap_or(0);
            Some(Tensor::zeros(
                dev,
                &[eq_layernorm_backward_scratch_len(n, h).max(1)],
            )?)
        }
    };
    ln_backward(
        s,
        v,
        gamma_s,
        gamma_v,
        stats,
        ds_out,
        dv_out,
        ds,
        dv,
        dgamma_s,
        dbeta_s,
        dgamma_v,
        scratch.as_mut(),
    )
}

/// [`eq_layernorm_backward`] with caller-provided scratch on the same device, at least
/// [`eq_layernorm_backward_scratch_len`] floats (contents ignored and overwritten; unused on
/// the cpu device). For training loops that keep their buffers in an arena.
#[allow(clippy::too_many_arguments)] // as eq_layernorm_backward, plus the scratch
pub fn eq_layernorm_backward_with_scratch(
    s: &Tensor<f32>,
    v: &Tensor<f32>,
    gamma_s: &Tensor<f32>,
    gamma_v: &Tensor<f32>,
    stats: &Tensor<f32>,
    ds_out: &Tensor<f32>,
    dv_out: &Tensor<f32>,
    ds: &mut Tensor<f32>,
    dv: &mut Tensor<f32>,
    dgamma_s: &mut Tensor<f32>,
    dbeta_s: &mut Tensor<f32>,
    dgamma_v: &mut Tensor<f32>,
    scratch: &mut Tensor<f32>,
) -> Result<()> {
    ln_backward(
        s,
        v,
        gamma_s,
        gamma_v,
        stats,
        ds_out,
        dv_out,
        ds,
        dv,
        dgamma_s,
        dbeta_s,
        dgamma_v,
        Some(scratch),
    )
}

#[allow(clippy::too_many_arguments)]
fn ln_backward(
    s: &Tensor<f32>,
    v: &Tensor<f32>,
    gamma_s: &Tensor<f32>,
    gamma_v: &Tensor<f32>,
    stats: &Tensor<f32>,
    ds_out: &Tensor<f32>,
    dv_out: &Tensor<f32>,
    ds: &mut Tensor<f32>,
    dv: &mut Tensor<f32>,
    dgamma_s: &mut Tensor<f32>,
    dbeta_s: &mut Tensor<f32>,
    dgamma_v: &mut Tensor<f32>,
    scratch: Option<&mut Tensor<f32>>,
) -> Result<()> {
    let op = "eq_layernorm_backward";
    let mut devices = vec![
        v.device(),
        gamma_s.device(),
        gamma_v.device(),
        stats.device(),
        ds_out.device(),
        dv_out.device(),
        ds.device(),
        dv.device(),
        dgamma_s.device(),
        dbeta_s.device(),
        dgamma_v.device(),
    ];
    if let Some(t) = &scratch {
        devices.push(t.device());
    }
    let dev = same_device(op, s.device(), &devices)?;
    let (n, h) = layernorm_dims(op, s, v, gamma_s, gamma_v)?;
    expect_len(op, "stats", stats, n * 3)?;
    expect_channels(op, "ds_out", ds_out, n * h, h)?;
    expect_channels(op, "dv_out", dv_out, n * 3 * h, h)?;
    expect_channels(op, "ds", ds, n * h, h)?;
    expect_channels(op, "dv", dv, n * 3 * h, h)?;
    expect_len(op, "dgamma_s", dgamma_s, h)?;
    expect_len(op, "dbeta_s", dbeta_s, h)?;
    expect_len(op, "dgamma_v", dgamma_v, h)?;
    if n == 0 {
        return Ok(());
    }
    if let Device::Cpu = dev {
        eq_layernorm_backward_host(
            s.host().unwrap(),
            v.host().unwrap(),
            gamma_s.host().unwrap(),
            gamma_v.host().unwrap(),
            stats.host().unwrap(),
            ds_out.host().unwrap(),
            dv_out.host().unwrap(),
            ds.host_mut().unwrap(),
            dv.host_mut().unwrap(),
            dgamma_s.host_mut().unwrap(),
            dbeta_s.host_mut().unwrap(),
            dgamma_v.host_mut().unwrap(),
        );
        return Ok(());
    }
    let Some(scratch) = scratch else {
        bail!("{op}: no scratch on {}", dev.name());
    };
    let need = eq_layernorm_backward_scratch_len(n, h);
    ensure!(
        scratch.len() >= need,
        "{op}: scratch has {} floats, {need} needed for {n} rows of {h} channels",
        scratch.len()
    );
    let rpb = ln_rows_per_block(n);
    let blocks = n.div_ceil(rpb);
    launch(
        dev,
        &k::EQ_LAYERNORM_BACKWARD,
        LaunchConfig {
            grid: [blocks as u32, 1, 1],
            block: [EQ_THREADS, 1, 1],
            shared_bytes: (EQ_WARPS * 3 * h * 4) as u32,
        },
        KernelArgs::new()
            .input(s)
            .input(v)
            .input(gamma_s)
            .input(gamma_v)
            .input(stats)
            .input(ds_out)
            .input(dv_out)
            .output(ds)
            .output(dv)
            .output(scratch)
            .i32(n as i32)
            .i32(h as i32)
            .i32(rpb as i32),
    )?;
    launch(
        dev,
        &k::EQ_LAYERNORM_PARAM_REDUCE,
        LaunchConfig {
            grid: [(3 * h).div_ceil(REDUCE_BLOCK[0] as usize) as u32, 1, 1],
            block: REDUCE_BLOCK,
            shared_bytes: 0,
        },
        KernelArgs::new()
            .input(scratch)
            .i32(blocks as i32)
            .i32(h as i32)
            .output(dgamma_s)
            .output(dbeta_s)
            .output(dgamma_v),
    )
}

// ---------------------------------------------------------------------------------------------
// Gates, norms, dot products.

/// `y[n, c, h] = g[n, h] u[n, c, h]`: `g [N, H]`, `u` and `y` `[N, C, H]` with C = 3 (gating a
/// vector feature by an invariant: equivariant) or C = 1 (an elementwise product of two `[N, H]`
/// tensors). C is read from the sizes.
pub fn vector_gate_forward(g: &Tensor<f32>, u: &Tensor<f32>, y: &mut Tensor<f32>) -> Result<()> {
    let op = "vector_gate_forward";
    let dev = same_device(op, g.device(), &[u.device(), y.device()])?;
    let (n, h, nc) = gate_dims(op, g, u)?;
    expect_channels(op, "y", y, n * nc * h, h)?;
    if n * h == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            vector_gate_forward_host(
                g.host().unwrap(),
                u.host().unwrap(),
                y.host_mut().unwrap(),
                h,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::VECTOR_GATE_FORWARD,
            elementwise_config(n * nc * h),
            KernelArgs::new()
                .input(g)
                .input(u)
                .output(y)
                .i64(n as i64)
                .i32(nc as i32)
                .i32(h as i32),
        ),
    }
}

/// (N, H, C) of a gate: H from `g`'s last dimension, C = 1 or 3 from `u`'s size.
fn gate_dims(op: &str, g: &Tensor<f32>, u: &Tensor<f32>) -> Result<(usize, usize, usize)> {
    let (n, h) = rows_of(op, "g", g)?;
    let nc = match u.len() {
        l if l == n * h => 1,
        l if l == 3 * n * h => 3,
        _ => bail!(
            "{op}: u has shape {:?}, expected [{n}, 3, {h}] or [{n}, {h}] to match g {:?}",
            u.shape(),
            g.shape()
        ),
    };
    expect_channels(op, "u", u, n * nc * h, h)?;
    Ok((n, h, nc))
}

/// Backward of [`vector_gate_forward`]: `dg[n, h] = sum_c u[n, c, h] dy[n, c, h]` and
/// `du = g dy`, both ASSIGNED; pass `None` for a gradient that is not wanted (a fixed gate).
pub fn vector_gate_backward(
    g: &Tensor<f32>,
    u: &Tensor<f32>,
    dy: &Tensor<f32>,
    dg: Option<&mut Tensor<f32>>,
    du: Option<&mut Tensor<f32>>,
) -> Result<()> {
    let op = "vector_gate_backward";
    let mut devices = vec![u.device(), dy.device()];
    devices.extend(dg.as_deref().map(|t| t.device()));
    devices.extend(du.as_deref().map(|t| t.device()));
    let dev = same_device(op, g.device(), &devices)?;
    let (n, h, nc) = gate_dims(op, g, u)?;
    expect_channels(op, "dy", dy, n * nc * h, h)?;
    if let Some(t) = dg.as_deref() {
        expect_channels(op, "dg", t, n * h, h)?;
    }
    if let Some(t) = du.as_deref() {
        expect_channels(op, "du", t, n * nc * h, h)?;
    }
    if n * h == 0 || (dg.is_none() && du.is_none()) {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            vector_gate_backward_host(
                g.host().unwrap(),
                u.host().unwrap(),
                dy.host().unwrap(),
                dg.map(|t| t.host_mut().unwrap()),
                du.map(|t| t.host_mut().unwrap()),
                h,
            );
            Ok(())
        }
        _ => {
            let mut args = KernelArgs::new().input(g).input(u).input(dy);
            // A gradient that is not wanted goes in as a null pointer, which the kernel skips.
            args = match dg {
                Some(t) => args.output(t),
                None => args.i64(0),
            };
            args = match du {
                Some(t) => args.output(t),
                None => args.i64(0),
            };
            launch(
                dev,
                &k::VECTOR_GATE_BACKWARD,
                elementwise_config(n * h),
                args.i64(n as i64).i32(nc as i32).i32(h as i32),
            )
        }
    }
}

/// `out[n, h] = sqrt(|v[n, :, h]|^2 + eps)` for `v [N, 3, H]`, `out [N, H]`: a rotation
/// invariant. `eps > 0` keeps the backward finite at v = 0; callers use [`VECTOR_NORM_EPS`]
/// (1e-8, a floor of 1e-4 on the norm).
pub fn vector_norm_forward(v: &Tensor<f32>, out: &mut Tensor<f32>, eps: f32) -> Result<()> {
    let op = "vector_norm_forward";
    let dev = same_device(op, v.device(), &[out.device()])?;
    let (n, h) = rows_of(op, "out", out)?;
    expect_channels(op, "v", v, n * 3 * h, h)?;
    ensure!(eps > 0.0, "{op}: eps must be positive, got {eps}");
    if n * h == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            vector_norm_forward_host(v.host().unwrap(), out.host_mut().unwrap(), eps, h);
            Ok(())
        }
        _ => launch(
            dev,
            &k::VECTOR_NORM_FORWARD,
            elementwise_config(n * h),
            KernelArgs::new()
                .input(v)
                .output(out)
                .f32(eps)
                .i64(n as i64)
                .i32(h as i32),
        ),
    }
}

/// Backward of [`vector_norm_forward`], from its output: `dv = dout v / out` (ASSIGNED).
pub fn vector_norm_backward(
    v: &Tensor<f32>,
    out: &Tensor<f32>,
    dout: &Tensor<f32>,
    dv: &mut Tensor<f32>,
) -> Result<()> {
    let op = "vector_norm_backward";
    let dev = same_device(op, v.device(), &[out.device(), dout.device(), dv.device()])?;
    let (n, h) = rows_of(op, "out", out)?;
    expect_channels(op, "v", v, n * 3 * h, h)?;
    expect_channels(op, "dout", dout, n * h, h)?;
    expect_channels(op, "dv", dv, n * 3 * h, h)?;
    if n * h == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            vector_norm_backward_host(
                v.host().unwrap(),
                out.host().unwrap(),
                dout.host().unwrap(),
                dv.host_mut().unwrap(),
                h,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::VECTOR_NORM_BACKWARD,
            elementwise_config(n * h),
            KernelArgs::new()
                .input(v)
                .input(out)
                .input(dout)
                .output(dv)
                .i64(n as i64)
                .i32(h as i32),
        ),
    }
}

/// `out[n, h] = sum_c a[n, c, h] b[n, c, h]` for `a`, `b` `[N, 3, H]`: a rotation invariant.
pub fn vector_dot_forward(a: &Tensor<f32>, b: &Tensor<f32>, out: &mut Tensor<f32>) -> Result<()> {
    let op = "vector_dot_forward";
    let dev = same_device(op, a.device(), &[b.device(), out.device()])?;
    let (n, h) = rows_of(op, "out", out)?;
    expect_channels(op, "a", a, n * 3 * h, h)?;
    expect_channels(op, "b", b, n * 3 * h, h)?;
    if n * h == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            vector_dot_forward_host(
                a.host().unwrap(),
                b.host().unwrap(),
                out.host_mut().unwrap(),
                h,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::VECTOR_DOT_FORWARD,
            elementwise_config(n * h),
            KernelArgs::new()
                .input(a)
                .input(b)
                .output(out)
                .i64(0)
                .i64(0)
                .i64(n as i64)
                .i32(h as i32)
                .i32(h as i32),
        ),
    }
}

/// Backward of [`vector_dot_forward`]: `da = dout b`, `db = dout a` (both ASSIGNED).
pub fn vector_dot_backward(
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    dout: &Tensor<f32>,
    da: &mut Tensor<f32>,
    db: &mut Tensor<f32>,
) -> Result<()> {
    let op = "vector_dot_backward";
    let dev = same_device(
        op,
        a.device(),
        &[b.device(), dout.device(), da.device(), db.device()],
    )?;
    let (n, h) = rows_of(op, "dout", dout)?;
    for (name, t) in [("a", a), ("b", b), ("da", &*da), ("db", &*db)] {
        expect_channels(op, name, t, n * 3 * h, h)?;
    }
    if n * h == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            vector_dot_backward_host(
                a.host().unwrap(),
                b.host().unwrap(),
                dout.host().unwrap(),
                da.host_mut().unwrap(),
                db.host_mut().unwrap(),
                h,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::VECTOR_DOT_BACKWARD,
            elementwise_config(n * h),
            KernelArgs::new()
                .input(a)
                .input(b)
                .input(dout)
                .output(da)
                .output(db)
                .i64(0)
                .i64(0)
                .i64(n as i64)
                .i32(h as i32)
                .i32(h as i32),
        ),
    }
}

/// `out[n, h] = sum_c ab[n, c, h] ab[n, c, H + h]` for `ab [N, 3, 2H]`: the dot product of the
/// two column halves of one projection (`vdot = sum_xyz (W1 v)(W2 v)` with one Linear(H -> 2H)
/// applied per xyz row), without splitting it first.
pub fn vector_dot_split_forward(ab: &Tensor<f32>, out: &mut Tensor<f32>) -> Result<()> {
    let op = "vector_dot_split_forward";
    let dev = same_device(op, ab.device(), &[out.device()])?;
    let (n, h) = rows_of(op, "out", out)?;
    expect_channels(op, "ab", ab, n * 6 * h, 2 * h)?;
    if n * h == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            vector_dot_split_forward_host(ab.host().unwrap(), out.host_mut().unwrap(), h);
            Ok(())
        }
        _ => launch(
            dev,
            &k::VECTOR_DOT_FORWARD,
            elementwise_config(n * h),
            KernelArgs::new()
                .input(ab)
                .input(ab)
                .output(out)
                .i64(0)
                .i64(h as i64)
                .i64(n as i64)
                .i32(h as i32)
                .i32(2 * h as i32),
        ),
    }
}

/// Backward of [`vector_dot_split_forward`] into one gradient `dab [N, 3, 2H]` (ASSIGNED):
/// `dab[.., :H] = dout ab[.., H:]`, `dab[.., H:] = dout ab[.., :H]`.
pub fn vector_dot_split_backward(
    ab: &Tensor<f32>,
    dout: &Tensor<f32>,
    dab: &mut Tensor<f32>,
) -> Result<()> {
    let op = "vector_dot_split_backward";
    let dev = same_device(op, ab.device(), &[dout.device(), dab.device()])?;
    let (n, h) = rows_of(op, "dout", dout)?;
    expect_channels(op, "ab", ab, n * 6 * h, 2 * h)?;
    expect_channels(op, "dab", dab, n * 6 * h, 2 * h)?;
    if n * h == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            vector_dot_split_backward_host(
                ab.host().unwrap(),
                dout.host().unwrap(),
                dab.host_mut().unwrap(),
                h,
            );
            Ok(())
        }
        _ => {
            // da and db are the two halves of dab: the same buffer, disjoint elements.
            let args = KernelArgs::new()
                .input(ab)
                .input(ab)
                .input(dout)
                .output(dab);
            launch(
                dev,
                &k::VECTOR_DOT_BACKWARD,
                elementwise_config(n * h),
                args.output(dab)
                    .i64(0)
                    .i64(h as i64)
                    .i64(n as i64)
                    .i32(h as i32)
                    .i32(2 * h as i32),
            )
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar output of equivariant attention; column concatenation.

/// The scalar output of equivariant attention: `out = vdot o[:, :H] + vnorm o[:, H:2H] + o[:, 2H:]`
/// for `vdot`, `vnorm`, `out` `[N, H]` and `o [N, 3H]`.
pub fn eq_scalar_combine_forward(
    vdot: &Tensor<f32>,
    vnorm: &Tensor<f32>,
    o: &Tensor<f32>,
    out: &mut Tensor<f32>,
) -> Result<()> {
    let op = "eq_scalar_combine_forward";
    let dev = same_device(
        op,
        vdot.device(),
        &[vnorm.device(), o.device(), out.device()],
    )?;
    let (n, h) = rows_of(op, "out", out)?;
    expect_channels(op, "vdot", vdot, n * h, h)?;
    expect_channels(op, "vnorm", vnorm, n * h, h)?;
    expect_channels(op, "o", o, n * 3 * h, 3 * h)?;
    if n * h == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            eq_scalar_combine_forward_host(
                vdot.host().unwrap(),
                vnorm.host().unwrap(),
                o.host().unwrap(),
                out.host_mut().unwrap(),
                h,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::EQ_SCALAR_COMBINE_FORWARD,
            elementwise_config(n * h),
            KernelArgs::new()
                .input(vdot)
                .input(vnorm)
                .input(o)
                .output(out)
                .i64(n as i64)
                .i32(h as i32),
        ),
    }
}

/// Backward of [`eq_scalar_combine_forward`]: `dvdot = dout o[:, :H]`, `dvnorm = dout o[:, H:2H]`,
/// `do_ = (dout vdot, dout vnorm, dout)`, all three ASSIGNED.
pub fn eq_scalar_combine_backward(
    vdot: &Tensor<f32>,
    vnorm: &Tensor<f32>,
    o: &Tensor<f32>,
    dout: &Tensor<f32>,
    dvdot: &mut Tensor<f32>,
    dvnorm: &mut Tensor<f32>,
    do_: &mut Tensor<f32>,
) -> Result<()> {
    let op = "eq_scalar_combine_backward";
    let dev = same_device(
        op,
        vdot.device(),
        &[
            vnorm.device(),
            o.device(),
            dout.device(),
            dvdot.device(),
            dvnorm.device(),
            do_.device(),
        ],
    )?;
    let (n, h) = rows_of(op, "dout", dout)?;
    for (name, t) in [
        ("vdot", vdot),
        ("vnorm", vnorm),
        ("dvdot", &*dvdot),
        ("dvnorm", &*dvnorm),
    ] {
        expect_channels(op, name, t, n * h, h)?;
    }
    expect_channels(op, "o", o, n * 3 * h, 3 * h)?;
    expect_channels(op, "do_", do_, n * 3 * h, 3 * h)?;
    if n * h == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            eq_scalar_combine_backward_host(
                vdot.host().unwrap(),
                vnorm.host().unwrap(),
                o.host().unwrap(),
                dout.host().unwrap(),
                dvdot.host_mut().unwrap(),
                dvnorm.host_mut().unwrap(),
                do_.host_mut().unwrap(),
                h,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::EQ_SCALAR_COMBINE_BACKWARD,
            elementwise_config(n * h),
            KernelArgs::new()
                .input(vdot)
                .input(vnorm)
                .input(o)
                .input(dout)
                .output(dvdot)
                .output(dvnorm)
                .output(do_)
                .i64(n as i64)
                .i32(h as i32),
        ),
    }
}

/// (N, Ha, Hb) of a concatenation: Ha, Hb from the last dimensions of `a` and `b`, N from `out`.
fn concat_dims(
    op: &str,
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    out: &Tensor<f32>,
    names: [&str; 3],
) -> Result<(usize, usize, usize)> {
    let ha = last_dim(op, names[0], a)?;
    let hb = last_dim(op, names[1], b)?;
    ensure!(
        ha + hb <= i32::MAX as usize,
        "{op}: {ha} + {hb} columns: too many"
    );
    let (n, _) = rows_of(op, names[2], out)?;
    expect_channels(op, names[2], out, n * (ha + hb), ha + hb)?;
    expect_len(op, names[0], a, n * ha)?;
    expect_len(op, names[1], b, n * hb)?;
    Ok((n, ha, hb))
}

/// `out[n, :] = (a[n, :], b[n, :])` for `a [N, Ha]`, `b [N, Hb]`, `out [N, Ha + Hb]` (the input
/// of a gate MLP that reads scalars next to invariants).
pub fn concat_columns(a: &Tensor<f32>, b: &Tensor<f32>, out: &mut Tensor<f32>) -> Result<()> {
    let op = "concat_columns";
    let dev = same_device(op, a.device(), &[b.device(), out.device()])?;
    let (n, ha, hb) = concat_dims(op, a, b, out, ["a", "b", "out"])?;
    if n * (ha + hb) == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            concat_columns_host(
                a.host().unwrap(),
                b.host().unwrap(),
                out.host_mut().unwrap(),
                ha,
                hb,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::CONCAT_COLUMNS,
            elementwise_config(n * (ha + hb)),
            KernelArgs::new()
                .input(a)
                .input(b)
                .output(out)
                .i64(n as i64)
                .i32(ha as i32)
                .i32(hb as i32),
        ),
    }
}

/// Backward of [`concat_columns`]: `da = dout[:, :Ha]`, `db = dout[:, Ha:]` (both ASSIGNED).
pub fn split_columns(dout: &Tensor<f32>, da: &mut Tensor<f32>, db: &mut Tensor<f32>) -> Result<()> {
    let op = "split_columns";
    let dev = same_device(op, dout.device(), &[da.device(), db.device()])?;
    let (n, ha, hb) = concat_dims(op, da, db, dout, ["da", "db", "dout"])?;
    if n * (ha + hb) == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            split_columns_host(
                dout.host().unwrap(),
                da.host_mut().unwrap(),
                db.host_mut().unwrap(),
                ha,
                hb,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::SPLIT_COLUMNS,
            elementwise_config(n * (ha + hb)),
            KernelArgs::new()
                .input(dout)
                .output(da)
                .output(db)
                .i64(n as i64)
                .i32(ha as i32)
                .i32(hb as i32),
        ),
    }
}
