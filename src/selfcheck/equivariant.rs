//! Device checks: equivariant (`cuda/equivariant.cu`). The equivariant layer norm (forward,
//! backward and its parameter reduction, accumulation, reproducibility, caller scratch), the
//! vector gate (C = 1 and 3, each gradient alone), norm, dot and its split form, the scalar
//! combine and the column concat/split, forward and backward, against the f64 twins of
//! `src/ops/equivariant.rs` with the tolerances of `tests/equivariant.rs`.

use super::{Ctx, Tol};
use crate::ops::equivariant as eq;
use crate::{Device, Tensor};
use anyhow::Result;

/// The layer norm's eps in the tests.
const EPS: f32 = 1e-5;

/// Widens f32 values for the f64 twins.
fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// An f32 tensor holding `data`.
fn input(dev: &Device, shape: &[usize], data: &[f32]) -> Result<Tensor<f32>> {
    Tensor::from_slice(dev, shape, data)
}

/// An output tensor filled with NaN, so that an element the device never writes fails.
fn output(dev: &Device, shape: &[usize]) -> Result<Tensor<f32>> {
    let mut t = Tensor::zeros(dev, shape)?;
    t.poison()?;
    Ok(t)
}

/// The bit patterns of several outputs, for bit-identity checks (NaN compares equal to itself).
fn bits(vs: &[Vec<f32>]) -> Vec<u32> {
    vs.iter().flatten().map(|x| x.to_bits()).collect()
}

/// `equivariant`: every op of the module at the tests' shapes, from one row and one channel
/// (the layer norm's zero-variance case) to many blocks of rows with a ragged channel count (the
/// fixed tolerances of the elementwise ops are the tests', for as many elements as the tests
/// draw); then the layer norm at widths that need more than 48 KiB of shared memory.
pub(super) fn equivariant(ctx: &mut Ctx) -> Result<()> {
    // (N, H): 1100 and 2000 rows make 18 and 32 blocks of layer-norm partials, more than the 16
    // row groups of eq_layernorm_param_reduce; 33 channels are a ragged multiple of a warp.
    let shapes: &[(usize, usize)] = if ctx.quick {
        &[(1, 1), (5, 8), (300, 33), (1100, 4)]
    } else {
        &[(1, 1), (5, 8), (300, 33), (2000, 64)]
    };
    for &(n, h) in shapes {
        layernorm(ctx, n, h)?;
        gate(ctx, n, h)?;
        norm(ctx, n, h)?;
        dot(ctx, n, h)?;
        combine(ctx, n, h)?;
        concat(ctx, n, h)?;
    }
    // The layer-norm backward keeps 3H floats per warp in shared memory: at H = 520 that is
    // 49,920 B, above the 48 KiB a kernel gets without opting in; at EQ_LAYERNORM_MAX_H it is
    // 192 KiB. Few rows at the widest H: the CPU path sums a row sequentially in f32, so the
    // error of its mean grows with H, and the tests' tolerances are set for H <= 64.
    layernorm(ctx, if ctx.quick { 40 } else { 512 }, 520)?;
    layernorm(ctx, 8, eq::EQ_LAYERNORM_MAX_H)?;
    Ok(())
}

/// The layer norm's device inputs.
struct LnTensors {
    s: Tensor<f32>,
    v: Tensor<f32>,
    gs: Tensor<f32>,
    gv: Tensor<f32>,
    st: Tensor<f32>,
    dso: Tensor<f32>,
    dvo: Tensor<f32>,
}

/// ds, dv, dgamma_s, dbeta_s, dgamma_v of the layer-norm backward, and the seconds it took.
type LnGrads = ([Vec<f32>; 5], f64);

impl LnTensors {
    /// Runs the backward `calls` times (the parameter gradients accumulate) from `init`, with
    /// the op's own scratch or, when `scratch` is given, that many floats of poisoned scratch.
    fn backward(
        &self,
        ctx: &Ctx,
        init: &[Vec<f32>; 3],
        calls: usize,
        scratch: Option<usize>,
    ) -> Result<LnGrads> {
        let (dev, n, h) = (&ctx.dev, self.dso.shape()[0], init[0].len());
        let (mut ds, mut dv) = (output(dev, &[n, h])?, output(dev, &[n, 3, h])?);
        let mut dgs = input(dev, &[h], &init[0])?;
        let mut dbs = input(dev, &[h], &init[1])?;
        let mut dgv = input(dev, &[h], &init[2])?;
        let (dgs, dbs, dgv) = (&mut dgs, &mut dbs, &mut dgv);
        let mut scratch = scratch.map(|len| output(dev, &[len])).transpose()?;
        let ((), secs) = ctx.timed(|_| {
            for _ in 0..calls {
                let (s, v, gs, gv, st) = (&self.s, &self.v, &self.gs, &self.gv, &self.st);
                let (dso, dvo, ds, dv) = (&self.dso, &self.dvo, &mut ds, &mut dv);
                match scratch.as_mut() {
                    Some(sc) => eq::eq_layernorm_backward_with_scratch(
                        s, v, gs, gv, st, dso, dvo, ds, dv, dgs, dbs, dgv, sc,
                    )?,
                    None => eq::eq_layernorm_backward(
                        s, v, gs, gv, st, dso, dvo, ds, dv, dgs, dbs, dgv,
                    )?,
                }
            }
            Ok(())
        })?;
        let grads = [
            ds.to_vec()?,
            dv.to_vec()?,
            dgs.to_vec()?,
            dbs.to_vec()?,
            dgv.to_vec()?,
        ];
        Ok((grads, secs))
    }
}

/// Per column j of a `[rows, h]` matrix, the sum over rows of |x|, maximised over the columns:
/// the scale of the f32 rounding error of a column sum (the tests' `max_column_abs_sum`).
fn max_column_abs_sum(x: &[f64], h: usize) -> f64 {
    let mut s = vec![0.0; h];
    for row in x.chunks(h) {
        for (s, v) in s.iter_mut().zip(row) {
            *s += v.abs();
        }
    }
    s.into_iter().fold(0.0, f64::max)
}

/// The equivariant layer norm: forward against the twin; backward (from the device's own stats,
/// as in training) against the twin, adding to nonzero parameter gradients; then the
/// properties the tests check bit for bit: a rerun gives the same bits, two calls from zero give
/// exactly twice the parameter gradients of one and the same activation gradients, and caller
/// scratch (oversized, poisoned) gives the same bits while too little is an error.
fn layernorm(ctx: &mut Ctx, n: usize, h: usize) -> Result<()> {
    let tag = |t: &str| format!("eq_layernorm {t} n={n} h={h}");
    let r = &mut ctx.rng;
    // Scalars around a nonzero mean (the variance is taken around it), parameters near 1 / 0.
    let offset = r.range(-3.0, 3.0);
    let s: Vec<f32> = (0..n * h)
        .map(|_| (offset + 2.0 * r.normal()) as f32)
        .collect();
    let v = r.normal_vec(n * 3 * h, 1.5);
    let near_one = |r: &mut crate::testing::Rng| -> Vec<f32> {
        (0..h).map(|_| (1.0 + 0.3 * r.normal()) as f32).collect()
    };
    let (gs, bs, gv) = (near_one(r), r.normal_vec(h, 0.3), near_one(r));
    let dso = r.normal_vec(n * h, 1.0);
    let dvo = r.normal_vec(n * 3 * h, 1.0);
    let init = [
        r.normal_vec(h, 1.0),
        r.normal_vec(h, 1.0),
        r.normal_vec(h, 1.0),
    ];

    let dev = ctx.dev.clone();
    let (s_t, v_t) = (input(&dev, &[n, h], &s)?, input(&dev, &[n, 3, h], &v)?);
    let (gs_t, bs_t, gv_t) = (
        input(&dev, &[h], &gs)?,
        input(&dev, &[h], &bs)?,
        input(&dev, &[h], &gv)?,
    );
    let (mut so, mut vo, mut st) = (
        output(&dev, &[n, h])?,
        output(&dev, &[n, 3, h])?,
        output(&dev, &[n, 3])?,
    );
    let ((), secs) = ctx.timed(|_| {
        eq::eq_layernorm_forward(
            &s_t, &v_t, &gs_t, &bs_t, &gv_t, EPS, &mut so, &mut vo, &mut st,
        )
    })?;
    let (s64, v64) = (to64(&s), to64(&v));
    let (mut so64, mut vo64, mut st64) = (vec![0.0; n * h], vec![0.0; n * 3 * h], vec![0.0; n * 3]);
    eq::eq_layernorm_forward_host(
        &s64,
        &v64,
        &to64(&gs),
        &to64(&bs),
        &to64(&gv),
        EPS as f64,
        &mut so64,
        &mut vo64,
        &mut st64,
    );
    // rstd_s of a one-channel row is 1/sqrt(eps) ~ 316: the relative part covers it.
    let tol = Tol::new(1e-5, 1e-5);
    ctx.compare(tag("forward s_out"), &so.to_vec()?, &so64, tol, secs);
    ctx.compare(tag("forward v_out"), &vo.to_vec()?, &vo64, tol, secs);
    let st_dev = st.to_vec()?;
    ctx.compare(tag("forward stats"), &st_dev, &st64, tol, secs);

    let t = LnTensors {
        s: s_t,
        v: v_t,
        gs: gs_t,
        gv: gv_t,
        st,
        dso: input(&dev, &[n, h], &dso)?,
        dvo: input(&dev, &[n, 3, h], &dvo)?,
    };
    let (got, secs) = t.backward(ctx, &init, 1, None)?;
    // The reference runs from the device's stats, as the device backward does.
    let (mut ds64, mut dv64) = (vec![0.0; n * h], vec![0.0; n * 3 * h]);
    let [mut dgs64, mut dbs64, mut dgv64] = init.clone().map(|g| to64(&g));
    let (dso64, dvo64, st64) = (to64(&dso), to64(&dvo), to64(&st_dev));
    eq::eq_layernorm_backward_host(
        &s64,
        &v64,
        &to64(&gs),
        &to64(&gv),
        &st64,
        &dso64,
        &dvo64,
        &mut ds64,
        &mut dv64,
        &mut dgs64,
        &mut dbs64,
        &mut dgv64,
    );
    let tol = Tol::new(2e-5, 2e-5);
    ctx.compare(tag("backward ds"), &got[0], &ds64, tol, secs);
    ctx.compare(tag("backward dv"), &got[1], &dv64, tol, secs);
    // Column sums over n rows: the f32 error grows with the column sum of |terms|.
    let xhat_dy: Vec<f64> = (0..n * h)
        .map(|i| (s64[i] - st64[3 * (i / h)]) * st64[3 * (i / h) + 1] * dso64[i])
        .collect();
    let vhat_dy: Vec<f64> = (0..n * h)
        .map(|i| {
            let (r, j) = (i / h, i % h);
            (0..3)
                .map(|c| {
                    (v64[(r * 3 + c) * h + j] * st64[3 * r + 2] * dvo64[(r * 3 + c) * h + j]).abs()
                })
                .sum()
        })
        .collect();
    let tol = |terms: &[f64]| Tol::new(1e-6 + 1e-5 * max_column_abs_sum(terms, h), 1e-5);
    ctx.compare(
        tag("backward dgamma_s (+=)"),
        &got[2],
        &dgs64,
        tol(&xhat_dy),
        secs,
    );
    ctx.compare(
        tag("backward dbeta_s (+=)"),
        &got[3],
        &dbs64,
        tol(&dso64),
        secs,
    );
    ctx.compare(
        tag("backward dgamma_v (+=)"),
        &got[4],
        &dgv64,
        tol(&vhat_dy),
        secs,
    );

    let zero = [vec![0.0; h], vec![0.0; h], vec![0.0; h]];
    let (once, secs) = t.backward(ctx, &zero, 1, None)?;
    let (again, _) = t.backward(ctx, &zero, 1, None)?;
    ctx.exact(
        tag("backward rerun bit-identical"),
        &bits(&again),
        &bits(&once),
        secs,
    );
    // x + x = 2x exactly: two calls double the parameter gradients bit for bit and assign (not
    // accumulate) ds, dv.
    let (twice, secs) = t.backward(ctx, &zero, 2, None)?;
    let mut want = once.clone();
    for g in &mut want[2..] {
        g.iter_mut().for_each(|x| *x *= 2.0);
    }
    ctx.exact(
        tag("backward twice = 2 x once"),
        &bits(&twice),
        &bits(&want),
        secs,
    );
    if !matches!(ctx.dev, Device::Cpu) {
        let need = eq::eq_layernorm_backward_scratch_len(n, h);
        let (with, secs) = t.backward(ctx, &zero, 1, Some(need + 7))?;
        ctx.exact(
            tag("backward with_scratch = backward"),
            &bits(&with),
            &bits(&once),
            secs,
        );
        let short = t.backward(ctx, &zero, 1, Some(need - 1));
        let ok = short
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("scratch"));
        ctx.truth(
            tag("backward short scratch is an error"),
            ok,
            format!(
                "{} floats of scratch, {need} needed: {:?}",
                need - 1,
                short.err()
            ),
        );
    }
    Ok(())
}

/// `vector_gate` with C = 3 (a gated vector) and C = 1 (a product of two `[N, H]` tensors):
/// forward, both gradients, and each gradient alone (the other pointer null).
fn gate(ctx: &mut Ctx, n: usize, h: usize) -> Result<()> {
    let dev = ctx.dev.clone();
    for nc in [1, 3] {
        let tag = |t: &str| format!("vector_gate {t} n={n} c={nc} h={h}");
        let g = ctx.rng.normal_vec(n * h, 1.0);
        let u = ctx.rng.normal_vec(n * nc * h, 1.0);
        let dy = ctx.rng.normal_vec(n * nc * h, 1.0);
        let (gt, ut, dyt) = (
            input(&dev, &[n, h], &g)?,
            input(&dev, &[n, nc, h], &u)?,
            input(&dev, &[n, nc, h], &dy)?,
        );
        let mut y = output(&dev, &[n, nc, h])?;
        let ((), secs) = ctx.timed(|_| eq::vector_gate_forward(&gt, &ut, &mut y))?;
        let mut want = vec![0.0; n * nc * h];
        eq::vector_gate_forward_host(&to64(&g), &to64(&u), &mut want, h);
        ctx.compare(
            tag("forward"),
            &y.to_vec()?,
            &want,
            Tol::new(1e-7, 1e-6),
            secs,
        );

        let (mut dg64, mut du64) = (vec![0.0; n * h], vec![0.0; n * nc * h]);
        let (g64, u64_, dy64) = (to64(&g), to64(&u), to64(&dy));
        eq::vector_gate_backward_host(&g64, &u64_, &dy64, Some(&mut dg64), Some(&mut du64), h);
        let (tol_dg, tol_du) = (Tol::new(1e-6, 1e-5), Tol::new(1e-7, 1e-6));
        for (want_g, want_u, how) in [
            (true, true, ""),
            (true, false, " alone"),
            (false, true, " alone"),
        ] {
            let (mut dg, mut du) = (output(&dev, &[n, h])?, output(&dev, &[n, nc, h])?);
            let ((), secs) = ctx.timed(|_| {
                eq::vector_gate_backward(
                    &gt,
                    &ut,
                    &dyt,
                    want_g.then_some(&mut dg),
                    want_u.then_some(&mut du),
                )
            })?;
            if want_g {
                ctx.compare(tag(&format!("dg{how}")), &dg.to_vec()?, &dg64, tol_dg, secs);
            }
            if want_u {
                ctx.compare(tag(&format!("du{how}")), &du.to_vec()?, &du64, tol_du, secs);
            }
        }
    }
    Ok(())
}

/// `vector_norm` forward and backward (from the device's own output), with one zero vector:
/// its norm is sqrt(eps) and its gradient 0, not NaN.
fn norm(ctx: &mut Ctx, n: usize, h: usize) -> Result<()> {
    let tag = |t: &str| format!("vector_norm {t} n={n} h={h}");
    let dev = ctx.dev.clone();
    let eps = eq::VECTOR_NORM_EPS;
    let mut v = ctx.rng.normal_vec(n * 3 * h, 1.0);
    for c in 0..3 {
        v[c * h] = 0.0;
    }
    let dout = ctx.rng.normal_vec(n * h, 1.0);
    let (vt, dt) = (input(&dev, &[n, 3, h], &v)?, input(&dev, &[n, h], &dout)?);
    let mut out = output(&dev, &[n, h])?;
    let ((), secs) = ctx.timed(|_| eq::vector_norm_forward(&vt, &mut out, eps))?;
    let mut want = vec![0.0; n * h];
    eq::vector_norm_forward_host(&to64(&v), &mut want, eps as f64, h);
    let out_v = out.to_vec()?;
    ctx.compare(tag("forward"), &out_v, &want, Tol::new(1e-7, 1e-6), secs);
    let mut dv = output(&dev, &[n, 3, h])?;
    let ((), secs) = ctx.timed(|_| eq::vector_norm_backward(&vt, &out, &dt, &mut dv))?;
    let mut dv64 = vec![0.0; n * 3 * h];
    eq::vector_norm_backward_host(&to64(&v), &to64(&out_v), &to64(&dout), &mut dv64, h);
    ctx.compare(tag("dv"), &dv.to_vec()?, &dv64, Tol::new(1e-6, 1e-5), secs);
    Ok(())
}

/// `vector_dot` forward and backward, and the split form on `[N, 3, 2H]` (the two column halves
/// of one projection, the same values as a and b), whose backward writes both halves of one
/// buffer.
fn dot(ctx: &mut Ctx, n: usize, h: usize) -> Result<()> {
    let tag = |t: &str| format!("vector_dot {t} n={n} h={h}");
    let dev = ctx.dev.clone();
    let a = ctx.rng.normal_vec(n * 3 * h, 1.0);
    let b = ctx.rng.normal_vec(n * 3 * h, 1.0);
    let dout = ctx.rng.normal_vec(n * h, 1.0);
    let (at, bt, dt) = (
        input(&dev, &[n, 3, h], &a)?,
        input(&dev, &[n, 3, h], &b)?,
        input(&dev, &[n, h], &dout)?,
    );
    let (a64, b64, d64) = (to64(&a), to64(&b), to64(&dout));
    let (fwd_tol, bwd_tol) = (Tol::new(1e-6, 1e-5), Tol::new(1e-7, 1e-6));
    let mut out = output(&dev, &[n, h])?;
    let ((), secs) = ctx.timed(|_| eq::vector_dot_forward(&at, &bt, &mut out))?;
    let mut want = vec![0.0; n * h];
    eq::vector_dot_forward_host(&a64, &b64, &mut want, h);
    ctx.compare(tag("forward"), &out.to_vec()?, &want, fwd_tol, secs);
    let (mut da, mut db) = (output(&dev, &[n, 3, h])?, output(&dev, &[n, 3, h])?);
    let ((), secs) = ctx.timed(|_| eq::vector_dot_backward(&at, &bt, &dt, &mut da, &mut db))?;
    let (mut da64, mut db64) = (vec![0.0; n * 3 * h], vec![0.0; n * 3 * h]);
    eq::vector_dot_backward_host(&a64, &b64, &d64, &mut da64, &mut db64, h);
    ctx.compare(tag("da"), &da.to_vec()?, &da64, bwd_tol, secs);
    ctx.compare(tag("db"), &db.to_vec()?, &db64, bwd_tol, secs);

    // ab[n, c, :H] = a[n, c], ab[n, c, H:] = b[n, c].
    let ab: Vec<f32> = a
        .chunks(h)
        .zip(b.chunks(h))
        .flat_map(|(a, b)| a.iter().chain(b).copied())
        .collect();
    let abt = input(&dev, &[n, 3, 2 * h], &ab)?;
    let mut out = output(&dev, &[n, h])?;
    let ((), secs) = ctx.timed(|_| eq::vector_dot_split_forward(&abt, &mut out))?;
    let mut want = vec![0.0; n * h];
    eq::vector_dot_split_forward_host(&to64(&ab), &mut want, h);
    ctx.compare(tag("split forward"), &out.to_vec()?, &want, fwd_tol, secs);
    let mut dab = output(&dev, &[n, 3, 2 * h])?;
    let ((), secs) = ctx.timed(|_| eq::vector_dot_split_backward(&abt, &dt, &mut dab))?;
    let mut dab64 = vec![0.0; n * 6 * h];
    eq::vector_dot_split_backward_host(&to64(&ab), &d64, &mut dab64, h);
    ctx.compare(tag("split dab"), &dab.to_vec()?, &dab64, bwd_tol, secs);
    Ok(())
}

/// `eq_scalar_combine`: `out = vdot o[:, :H] + vnorm o[:, H:2H] + o[:, 2H:]`, forward and its
/// three gradients.
fn combine(ctx: &mut Ctx, n: usize, h: usize) -> Result<()> {
    let tag = |t: &str| format!("eq_scalar_combine {t} n={n} h={h}");
    let dev = ctx.dev.clone();
    let vdot = ctx.rng.normal_vec(n * h, 1.0);
    let vnorm = ctx.rng.normal_vec(n * h, 1.0);
    let o = ctx.rng.normal_vec(n * 3 * h, 1.0);
    let dout = ctx.rng.normal_vec(n * h, 1.0);
    let (vdt, vnt, ot, dt) = (
        input(&dev, &[n, h], &vdot)?,
        input(&dev, &[n, h], &vnorm)?,
        input(&dev, &[n, 3 * h], &o)?,
        input(&dev, &[n, h], &dout)?,
    );
    let (vd64, vn64, o64) = (to64(&vdot), to64(&vnorm), to64(&o));
    let mut out = output(&dev, &[n, h])?;
    let ((), secs) = ctx.timed(|_| eq::eq_scalar_combine_forward(&vdt, &vnt, &ot, &mut out))?;
    let mut want = vec![0.0; n * h];
    eq::eq_scalar_combine_forward_host(&vd64, &vn64, &o64, &mut want, h);
    ctx.compare(
        tag("forward"),
        &out.to_vec()?,
        &want,
        Tol::new(1e-6, 1e-5),
        secs,
    );
    let (mut dvd, mut dvn, mut dob) = (
        output(&dev, &[n, h])?,
        output(&dev, &[n, h])?,
        output(&dev, &[n, 3 * h])?,
    );
    let ((), secs) = ctx.timed(|_| {
        eq::eq_scalar_combine_backward(&vdt, &vnt, &ot, &dt, &mut dvd, &mut dvn, &mut dob)
    })?;
    let (mut dvd64, mut dvn64, mut do64) =
        (vec![0.0; n * h], vec![0.0; n * h], vec![0.0; n * 3 * h]);
    eq::eq_scalar_combine_backward_host(
        &vd64,
        &vn64,
        &o64,
        &to64(&dout),
        &mut dvd64,
        &mut dvn64,
        &mut do64,
        h,
    );
    let tol = Tol::new(1e-7, 1e-6);
    ctx.compare(tag("dvdot"), &dvd.to_vec()?, &dvd64, tol, secs);
    ctx.compare(tag("dvnorm"), &dvn.to_vec()?, &dvn64, tol, secs);
    ctx.compare(tag("do"), &dob.to_vec()?, &do64, tol, secs);
    Ok(())
}

/// `concat_columns` and its backward `split_columns`: copies, so exact; the second part one
/// column wide and wider than the first.
fn concat(ctx: &mut Ctx, n: usize, ha: usize) -> Result<()> {
    let dev = ctx.dev.clone();
    for hb in [1, ha + 3] {
        let tag = |t: &str| format!("{t} n={n} ha={ha} hb={hb}");
        let w = ha + hb;
        let a = ctx.rng.normal_vec(n * ha, 1.0);
        let b = ctx.rng.normal_vec(n * hb, 1.0);
        let (at, bt) = (input(&dev, &[n, ha], &a)?, input(&dev, &[n, hb], &b)?);
        let mut out = output(&dev, &[n, w])?;
        let ((), secs) = ctx.timed(|_| eq::concat_columns(&at, &bt, &mut out))?;
        let mut want = vec![0.0; n * w];
        eq::concat_columns_host(&to64(&a), &to64(&b), &mut want, ha, hb);
        ctx.compare(
            tag("concat_columns"),
            &out.to_vec()?,
            &want,
            Tol::abs(0.0),
            secs,
        );
        // The backward splits an upstream gradient of the concatenation's shape.
        let dout = ctx.rng.normal_vec(n * w, 1.0);
        let dt = input(&dev, &[n, w], &dout)?;
        let (mut da, mut db) = (output(&dev, &[n, ha])?, output(&dev, &[n, hb])?);
        let ((), secs) = ctx.timed(|_| eq::split_columns(&dt, &mut da, &mut db))?;
        let (mut da64, mut db64) = (vec![0.0; n * ha], vec![0.0; n * hb]);
        eq::split_columns_host(&to64(&dout), &mut da64, &mut db64, ha, hb);
        let got: Vec<f32> = [da.to_vec()?, db.to_vec()?].concat();
        let want: Vec<f64> = [da64, db64].concat();
        ctx.compare(
            tag("split_columns (da, db)"),
            &got,
            &want,
            Tol::abs(0.0),
            secs,
        );
    }
    Ok(())
}
