//! Device checks: elementwise, reduce, softmax, dropout, optim. Each family runs every kernel of
//! its module, forward and backward, and compares the device's results with the f64 CPU twins
//! under the tolerances of the tests of the same name (tests/elementwise.rs, ...).

use super::{Ctx, Outcome, Tol};
use crate::ops::dropout::{self as dr, DropLayout};
use crate::ops::elementwise as ew;
use crate::ops::reduce::{self as rd, RowReduce};
use crate::ops::softmax as sm;
use crate::optim::{self as op, Decay, OptimConfig, Optimizer, Schedule, StepReport, UpdateStep};
use crate::testing::{AdamRounding, Rng};
use crate::{Device, Tensor};
use anyhow::Result;

/// More elements than the capped grid (65,535 blocks of 256 threads) has threads, so the
/// grid-stride loops wrap.
pub(super) const GRID_WRAP: usize = 65_535 * 256 + 999;

/// f32 values widened to f64: the inputs of the f64 twins.
pub(super) fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The bits of f32 values, for bit-for-bit comparisons (+0 and -0 differ, NaN fails).
pub(super) fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A tensor whose every element is NaN, so that an element the kernel never writes fails.
pub(super) fn poisoned(dev: &Device, shape: &[usize]) -> Result<Tensor<f32>> {
    let mut t = Tensor::zeros(dev, shape)?;
    t.poison()?;
    Ok(t)
}

/// `n` values uniform in [lo, hi): inputs for the largest sizes, where normals cost seconds.
pub(super) fn uniform_vec(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<f32> {
    (0..n).map(|_| rng.range(lo, hi) as f32).collect()
}

/// Records a check with a bound per element (the tests' `assert_within`): element i passes when
/// |got - want| <= bound[i]; NaN never passes.
pub(super) fn compare_bounds(
    ctx: &mut Ctx,
    name: impl Into<String>,
    got: &[f32],
    want: &[f64],
    bound: &[f64],
    seconds: f64,
) -> bool {
    let mut o = Outcome {
        name: name.into(),
        max_err: 0.0,
        tol: 0.0,
        worst_ratio: 0.0,
        ok: true,
        seconds,
        detail: String::new(),
    };
    if got.len() != want.len() || want.len() != bound.len() {
        o.max_err = f64::INFINITY;
        o.worst_ratio = f64::INFINITY;
        o.detail = format!("{} values, the reference has {}", got.len(), want.len());
    }
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let err = (g as f64 - w).abs();
        let ratio = if err.is_nan() {
            f64::INFINITY
        } else if err == 0.0 {
            0.0
        } else if b > 0.0 {
            err / b
        } else {
            f64::INFINITY
        };
        if err > o.max_err || err.is_nan() {
            o.max_err = err;
        }
        if ratio > o.worst_ratio {
            o.worst_ratio = ratio;
            o.tol = b;
            if ratio > 1.0 {
                o.detail = format!("worst at index {i}: got {g:.7e}, want {w:.7e}");
            }
        }
    }
    o.ok = o.worst_ratio <= 1.0;
    ctx.push(o)
}

/// The f64 twin of a one-input op.
fn twin1(f: fn(&[f64], &mut [f64]), x: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    f(x, &mut y);
    y
}

/// The f64 twin of a two-input op.
fn twin2(f: fn(&[f64], &[f64], &mut [f64]), a: &[f64], b: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; a.len()];
    f(a, b, &mut y);
    y
}

/// Runs `op(x) -> y` on the device into a poisoned output; returns y and the seconds.
fn run1(
    ctx: &Ctx,
    op: impl FnOnce(&Tensor<f32>, &mut Tensor<f32>) -> Result<()>,
    x: &[f32],
) -> Result<(Vec<f32>, f64)> {
    let xt = Tensor::from_slice(&ctx.dev, &[x.len()], x)?;
    let mut y = poisoned(&ctx.dev, &[x.len()])?;
    let ((), s) = ctx.timed(|_| op(&xt, &mut y))?;
    Ok((y.to_vec()?, s))
}

/// Runs `op(a, b) -> y` on the device into a poisoned output; returns y and the seconds.
fn run2(
    ctx: &Ctx,
    op: impl FnOnce(&Tensor<f32>, &Tensor<f32>, &mut Tensor<f32>) -> Result<()>,
    a: &[f32],
    b: &[f32],
) -> Result<(Vec<f32>, f64)> {
    let at = Tensor::from_slice(&ctx.dev, &[a.len()], a)?;
    let bt = Tensor::from_slice(&ctx.dev, &[b.len()], b)?;
    let mut y = poisoned(&ctx.dev, &[a.len()])?;
    let ((), s) = ctx.timed(|_| op(&at, &bt, &mut y))?;
    Ok((y.to_vec()?, s))
}

// ------------------------------------------------------------------------------ elementwise --

/// `elementwise`: SiLU, ReLU and sigmoid forward and backward, add / axpby / scale and axpby's
/// backward, and accumulate, from one element to more than the capped grid covers. Inputs as in
/// tests/elementwise.rs: activations of N(0, 9) with exact zeros (ReLU's kink), the linear ops on
/// N(0, 1); the largest size draws them uniform over +-3 standard deviations (normals would cost
/// seconds). Tolerance of that test: an f32 result of a few flops is within a few ulps of the f64
/// one (rel 4e-6) plus a floor near zero (1e-6); ReLU (a max and a select) is exact.
pub(super) fn elementwise(ctx: &mut Ctx) -> Result<()> {
    let tol = Tol::new(1e-6, 4e-6);
    let sizes: &[usize] = if ctx.quick {
        &[7, 65_537]
    } else {
        &[1, 1000, 65_537, GRID_WRAP]
    };
    for &n in sizes {
        let mut draw = |sd: f64| match n {
            GRID_WRAP => uniform_vec(&mut ctx.rng, n, -3.0 * sd, 3.0 * sd),
            _ => ctx.rng.normal_vec(n, sd),
        };
        let mut x = draw(3.0);
        let (a, b) = (draw(1.0), draw(1.0));
        // Exact zeros: ReLU's kink, where the gradient is 0 (as PyTorch).
        x.iter_mut().step_by(5).for_each(|v| *v = 0.0);
        let (x64, a64, b64) = (to64(&x), to64(&a), to64(&b));
        let (alpha, beta) = (
            ctx.rng.range(-2.0, 2.0) as f32,
            ctx.rng.range(-2.0, 2.0) as f32,
        );
        let check = |ctx: &mut Ctx, op: &str, (got, s): (Vec<f32>, f64), want: &[f64], tol| {
            ctx.compare(format!("{op} n={n}"), &got, want, tol, s);
            got
        };

        let want = twin1(ew::silu_forward_host, &x64);
        check(
            ctx,
            "silu_forward",
            run1(ctx, ew::silu_forward, &x)?,
            &want,
            tol,
        );
        let want = twin2(ew::silu_backward_host, &x64, &b64);
        let got = run2(ctx, ew::silu_backward, &x, &b)?;
        check(ctx, "silu_backward", got, &want, tol);

        let want = twin1(ew::relu_forward_host, &x64);
        let exact = Tol::abs(0.0);
        check(
            ctx,
            "relu_forward",
            run1(ctx, ew::relu_forward, &x)?,
            &want,
            exact,
        );
        let want = twin2(ew::relu_backward_host, &x64, &b64);
        let got = run2(ctx, ew::relu_backward, &x, &b)?;
        check(ctx, "relu_backward", got, &want, exact);

        let want = twin1(ew::sigmoid_forward_host, &x64);
        let y = run1(ctx, ew::sigmoid_forward, &x)?;
        let y = check(ctx, "sigmoid_forward", y, &want, tol);
        // The backward reads the saved output: the device's own forward result.
        let want = twin2(ew::sigmoid_backward_host, &to64(&y), &b64);
        let got = run2(ctx, ew::sigmoid_backward, &y, &b)?;
        check(ctx, "sigmoid_backward", got, &want, tol);

        let want: Vec<f64> = a64.iter().zip(&b64).map(|(a, b)| a + b).collect();
        check(
            ctx,
            "add (axpby 1, 1)",
            run2(ctx, ew::add, &a, &b)?,
            &want,
            tol,
        );
        let (alpha64, beta64) = (alpha as f64, beta as f64);
        let want: Vec<f64> = a64
            .iter()
            .zip(&b64)
            .map(|(a, b)| alpha64 * a + beta64 * b)
            .collect();
        let got = run2(ctx, |a, b, o| ew::axpby(alpha, a, beta, b, o), &a, &b)?;
        check(ctx, "axpby", got, &want, tol);
        let alpha_a: Vec<f64> = a64.iter().map(|a| alpha64 * a).collect();
        let got = run1(ctx, |x, y| ew::scale(alpha, x, y), &a)?;
        check(ctx, "scale", got, &alpha_a, tol);

        // axpby's backward: da = alpha dout, db = beta dout (two scale launches).
        let dt = Tensor::from_slice(&ctx.dev, &[n], &a)?;
        let (mut da, mut db) = (poisoned(&ctx.dev, &[n])?, poisoned(&ctx.dev, &[n])?);
        let ((), s) = ctx.timed(|_| ew::axpby_backward(alpha, beta, &dt, &mut da, &mut db))?;
        check(ctx, "axpby_backward da", (da.to_vec()?, s), &alpha_a, tol);
        let want: Vec<f64> = a64.iter().map(|a| beta64 * a).collect();
        check(ctx, "axpby_backward db", (db.to_vec()?, s), &want, tol);

        // accumulate: y += alpha x, onto what y held.
        let xt = Tensor::from_slice(&ctx.dev, &[n], &a)?;
        let mut yt = Tensor::from_slice(&ctx.dev, &[n], &b)?;
        let ((), s) = ctx.timed(|_| ew::accumulate(alpha, &xt, &mut yt))?;
        let mut want = b64;
        ew::accumulate_host(alpha64, &a64, &mut want);
        check(ctx, "accumulate", (yt.to_vec()?, s), &want, tol);
    }
    Ok(())
}

// ----------------------------------------------------------------------------------- reduce --

/// `reduce`: row sums and means of `[rows, cols]`, forward and backward, over one column, ragged
/// widths, rows wider than a block, a long row and (full size) more rows than the capped grid.
/// Tolerances of tests/reduce.rs: the forward within 16 ulps of the largest row's sum of
/// magnitudes (over cols for the mean) plus rel 1e-6; the backward (one product) 1e-7 + 1e-6 rel.
pub(super) fn reduce(ctx: &mut Ctx) -> Result<()> {
    let mut shapes = vec![
        (1, 1),
        (3, 31),
        (17, 256),
        (5, 1000),
        (300, 77),
        (2, 100_003),
    ];
    if !ctx.quick {
        shapes.push((70_000, 3));
    }
    let both = [RowReduce::Sum, RowReduce::Mean];
    for (rows, cols) in shapes {
        // The grid-wrapping shape takes half a minute per kind on emu; the kind is only a factor.
        let kinds = if rows > 65_535 { &both[..1] } else { &both[..] };
        for &kind in kinds {
            let what = format!("{rows}x{cols} {kind:?}");
            let x = ctx.rng.normal_vec(rows * cols, 1.0);
            let x64 = to64(&x);
            let mut want = vec![0.0; rows];
            rd::row_sum_forward_host(&x64, &mut want, cols, kind);
            let xt = Tensor::from_slice(&ctx.dev, &[rows, cols], &x)?;
            let mut y = poisoned(&ctx.dev, &[rows])?;
            let ((), s) = ctx.timed(|_| rd::row_sum_forward(&xt, &mut y, cols, kind))?;
            let scale = match kind {
                RowReduce::Sum => 1.0,
                RowReduce::Mean => 1.0 / cols as f64,
            };
            let worst = x64
                .chunks(cols)
                .map(|r| r.iter().map(|v| v.abs()).sum::<f64>())
                .fold(0.0, f64::max);
            let atol = 16.0 * f32::EPSILON as f64 * worst * scale;
            let tol = Tol::new(atol, 1e-6);
            ctx.compare(
                format!("row_sum_forward {what}"),
                &y.to_vec()?,
                &want,
                tol,
                s,
            );

            let dy = ctx.rng.normal_vec(rows, 1.0);
            let mut want = vec![0.0; rows * cols];
            rd::row_sum_backward_host(&to64(&dy), &mut want, cols, kind);
            let dyt = Tensor::from_slice(&ctx.dev, &[rows], &dy)?;
            let mut dx = poisoned(&ctx.dev, &[rows, cols])?;
            let ((), s) = ctx.timed(|_| rd::row_sum_backward(&dyt, &mut dx, cols, kind))?;
            let tol = Tol::new(1e-7, 1e-6);
            ctx.compare(
                format!("row_sum_backward {what}"),
                &dx.to_vec()?,
                &want,
                tol,
                s,
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- softmax --

/// Runs `softmax_forward` on the device into a poisoned output.
fn softmax_on(
    ctx: &Ctx,
    x: &[f32],
    shape: &[usize],
    scale: f32,
    mask: Option<(&[u8], [usize; 2])>,
    rows_per_mask: usize,
) -> Result<(Vec<f32>, f64)> {
    let xt = Tensor::from_slice(&ctx.dev, shape, x)?;
    let mt = match mask {
        Some((m, ms)) => Some(Tensor::from_slice(&ctx.dev, &ms, m)?),
        None => None,
    };
    let mut y = poisoned(&ctx.dev, shape)?;
    let ((), s) =
        ctx.timed(|_| sm::softmax_forward(&xt, &mut y, scale, mt.as_ref(), rows_per_mask))?;
    Ok((y.to_vec()?, s))
}

/// Runs a backward `op(y, dy) -> dx` of the softmax module on the device.
fn softmax_backward_on(
    ctx: &Ctx,
    op: impl FnOnce(&Tensor<f32>, &Tensor<f32>, &mut Tensor<f32>) -> Result<()>,
    y: &[f32],
    dy: &[f32],
    shape: &[usize],
) -> Result<(Vec<f32>, f64)> {
    let yt = Tensor::from_slice(&ctx.dev, shape, y)?;
    let dyt = Tensor::from_slice(&ctx.dev, shape, dy)?;
    let mut dx = poisoned(&ctx.dev, shape)?;
    let ((), s) = ctx.timed(|_| op(&yt, &dyt, &mut dx))?;
    Ok((dx.to_vec()?, s))
}

/// `softmax`: softmax (two scales) and log-softmax forward and backward over one column, ragged
/// widths, rows wider than a block, long rows and (full size) more rows than the capped grid;
/// then the attention's key-masked softmax with a fully masked frame. Tolerances of
/// tests/softmax.rs: softmax 1e-7 + 2e-5 rel forward, 2e-6 + 2e-5 rel backward (from the
/// device's own forward); log-softmax 1e-5 + 2e-6 rel forward, backward 16 ulps of the largest
/// row's sum of |dy| (at least 1e-6) + 2e-5 rel. Masked keys get exactly 0, and so do their
/// gradients.
pub(super) fn softmax(ctx: &mut Ctx) -> Result<()> {
    let mut shapes = vec![
        (1, 1),
        (3, 31),
        (17, 256),
        (5, 1000),
        (300, 77),
        (4, 20_000),
    ];
    if !ctx.quick {
        shapes.push((65_537, 2));
    }
    for (i, &(rows, cols)) in shapes.iter().enumerate() {
        // The scale is a multiplier of the same path: alternate it over the shapes.
        let scale = if i % 2 == 0 { 1.0f32 } else { 0.37 };
        let shape = [rows, cols];
        let what = format!("{rows}x{cols}");
        let x = ctx.rng.normal_vec(rows * cols, 3.0);
        let (y, s) = softmax_on(ctx, &x, &shape, scale, None, 1)?;
        let mut want = vec![0.0; x.len()];
        sm::softmax_forward_host(&to64(&x), &mut want, cols, scale as f64, None, 1);
        let tol = Tol::new(1e-7, 2e-5);
        ctx.compare(
            format!("softmax_forward {what} scale {scale}"),
            &y,
            &want,
            tol,
            s,
        );
        let dy = ctx.rng.normal_vec(rows * cols, 1.0);
        let op = |y: &Tensor<f32>, dy: &Tensor<f32>, dx: &mut Tensor<f32>| {
            sm::softmax_backward(y, dy, dx, scale)
        };
        let (dx, s) = softmax_backward_on(ctx, op, &y, &dy, &shape)?;
        let mut want = vec![0.0; x.len()];
        sm::softmax_backward_host(&to64(&y), &to64(&dy), &mut want, cols, scale as f64);
        let tol = Tol::new(2e-6, 2e-5);
        ctx.compare(
            format!("softmax_backward {what} scale {scale}"),
            &dx,
            &want,
            tol,
            s,
        );

        let x = ctx.rng.normal_vec(rows * cols, 3.0);
        let xt = Tensor::from_slice(&ctx.dev, &shape, &x)?;
        let mut yt = poisoned(&ctx.dev, &shape)?;
        let ((), s) = ctx.timed(|_| sm::log_softmax_forward(&xt, &mut yt))?;
        let y = yt.to_vec()?;
        let mut want = vec![0.0; x.len()];
        sm::log_softmax_forward_host(&to64(&x), &mut want, cols);
        // Values are O(10): a few ulps of the largest |x - m| and of ln(cols).
        let tol = Tol::new(1e-5, 2e-6);
        ctx.compare(format!("log_softmax_forward {what}"), &y, &want, tol, s);
        let dy = ctx.rng.normal_vec(rows * cols, 1.0);
        let (dx, s) = softmax_backward_on(ctx, sm::log_softmax_backward, &y, &dy, &shape)?;
        let dy64 = to64(&dy);
        let mut want = vec![0.0; x.len()];
        sm::log_softmax_backward_host(&to64(&y), &dy64, &mut want, cols);
        let worst_row = dy64
            .chunks(cols)
            .map(|r| r.iter().map(|v| v.abs()).sum::<f64>())
            .fold(0.0, f64::max);
        let tol = Tol::new((16.0 * f32::EPSILON as f64 * worst_row).max(1e-6), 2e-5);
        ctx.compare(format!("log_softmax_backward {what}"), &dx, &want, tol, s);
    }

    // Attention scores [batch, heads, queries, keys] with a per-frame key mask [batch, keys].
    for (batch, heads, queries, keys) in [(3, 2, 5, 7), (4, 3, 2, 300), (2, 1, 1, 1)] {
        let (rows, rows_per_mask) = (batch * heads * queries, heads * queries);
        let x = ctx.rng.normal_vec(rows * keys, 2.0);
        // Frame 1 fully masked; the others keep each key with probability 0.7.
        let mask: Vec<u8> = (0..batch * keys)
            .map(|i| u8::from(i / keys != 1 && ctx.rng.uniform() < 0.7))
            .collect();
        let keep = |e: usize| mask[(e / keys / rows_per_mask) * keys + e % keys] != 0;
        let scale = 0.5f32;
        let shape = [batch, heads, queries, keys];
        let what = format!("masked softmax {shape:?}");
        let m = Some((mask.as_slice(), [batch, keys]));
        let (y, s) = softmax_on(ctx, &x, &shape, scale, m, rows_per_mask)?;
        let mut want = vec![0.0; x.len()];
        let m64 = Some(mask.as_slice());
        sm::softmax_forward_host(&to64(&x), &mut want, keys, scale as f64, m64, rows_per_mask);
        ctx.compare(
            format!("{what} forward"),
            &y,
            &want,
            Tol::new(1e-7, 2e-5),
            s,
        );
        // Masked keys exactly 0; rows sum to 1, or to 0 where every key is masked.
        let zeros = (0..y.len()).all(|e| keep(e) || y[e] == 0.0);
        let sums_ok = y.chunks(keys).enumerate().all(|(r, row)| {
            let sum: f64 = row.iter().map(|&v| v as f64).sum();
            let any = (0..keys).any(|c| keep(r * keys + c));
            (sum - f64::from(u8::from(any))).abs() < 1e-5
        });
        let detail = format!("masked keys all 0: {zeros}; rows sum to 1 (0 if empty): {sums_ok}");
        ctx.truth(
            format!("{what}: masked keys 0, rows sum to 1"),
            zeros && sums_ok,
            detail,
        );

        let dy = ctx.rng.normal_vec(rows * keys, 1.0);
        let op = |y: &Tensor<f32>, dy: &Tensor<f32>, dx: &mut Tensor<f32>| {
            sm::softmax_backward(y, dy, dx, scale)
        };
        let (dx, s) = softmax_backward_on(ctx, op, &y, &dy, &shape)?;
        let mut want = vec![0.0; x.len()];
        sm::softmax_backward_host(&to64(&y), &to64(&dy), &mut want, keys, scale as f64);
        ctx.compare(
            format!("{what} backward"),
            &dx,
            &want,
            Tol::new(2e-6, 2e-5),
            s,
        );
        let bad = (0..dx.len()).find(|&e| !keep(e) && dx[e] != 0.0);
        let detail = format!("masked element {bad:?} has a nonzero gradient");
        ctx.truth(
            format!("{what}: masked keys get 0 gradient"),
            bad.is_none(),
            detail,
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------- dropout --

/// Runs `dropout_forward` (or `_backward`) on the device into a poisoned output.
fn dropout_on(
    ctx: &Ctx,
    backward: bool,
    x: &[f32],
    p: f32,
    seed: u64,
    l: DropLayout,
) -> Result<(Vec<f32>, f64)> {
    let xt = Tensor::from_slice(&ctx.dev, &[x.len()], x)?;
    let mut y = poisoned(&ctx.dev, &[x.len()])?;
    let ((), s) = ctx.timed(|_| {
        if backward {
            dr::dropout_backward(&xt, &mut y, p, seed, l)
        } else {
            dr::dropout_forward(&xt, &mut y, p, seed, l)
        }
    })?;
    Ok((y.to_vec()?, s))
}

/// `dropout`: forward and backward (the same kernel, the mask recomputed from the seed) over
/// scalar and vector layouts and (full size) more keys than the capped grid, at p = 0 (a copy),
/// 0.1, 0.5 and 0.9, bit for bit against the f32 CPU twin (the hash and the comparison are exact,
/// as tests/dropout.rs checks); then the kept fraction (within 6 binomial standard deviations),
/// whole vectors, and the seed's effect, as that test does.
pub(super) fn dropout(ctx: &mut Ctx) -> Result<()> {
    let mut layouts = vec![
        (1, 1, 1),
        (7, 1, 33),
        (37, 3, 17),
        (5, 3, 1000),
        (300, 3, 101),
    ];
    if !ctx.quick {
        layouts.push((1, 1, GRID_WRAP));
    }
    for (outer, comps, inner) in layouts {
        let l = DropLayout {
            outer,
            comps,
            inner,
        };
        let ps: &[f32] = if l.len() > 1 << 20 {
            &[0.5]
        } else {
            &[0.0, 0.1, 0.5, 0.9]
        };
        let what = format!("[{outer}, {comps}, {inner}] p {ps:?}");
        let (mut got, mut want, mut secs) = ([vec![], vec![]], [vec![], vec![]], [0.0, 0.0]);
        for &p in ps {
            let seed = ctx.rng.next_u64();
            let x = ctx.rng.normal_vec(l.len(), 2.0);
            for (k, backward) in [false, true].into_iter().enumerate() {
                let (y, s) = dropout_on(ctx, backward, &x, p, seed, l)?;
                let mut w = vec![0.0f32; l.len()];
                if backward {
                    dr::dropout_backward_host(&x, &mut w, p, seed, l);
                } else {
                    dr::dropout_forward_host(&x, &mut w, p, seed, l);
                }
                got[k].extend(bits(&y));
                want[k].extend(bits(&w));
                secs[k] += s;
            }
        }
        ctx.exact(
            format!("dropout_forward {what}"),
            &got[0],
            &want[0],
            secs[0],
        );
        ctx.exact(
            format!("dropout_backward {what}"),
            &got[1],
            &want[1],
            secs[1],
        );
    }

    // Statistics of the mask, on ones: 3-component keys.
    let (outer, inner) = if ctx.quick { (100, 100) } else { (400, 250) };
    let l = DropLayout {
        outer,
        comps: 3,
        inner,
    };
    let n_keys = l.keys() as f64;
    let ones = vec![1.0f32; l.len()];
    for p in [0.1f32, 0.5, 0.8] {
        let seed = ctx.rng.next_u64();
        let (y, s) = dropout_on(ctx, false, &ones, p, seed, l)?;
        // Key (o, i) kept in component 0 must be kept in every component.
        let kept = |y: &[f32], o: usize, i: usize, c: usize| y[(o * 3 + c) * inner + i] != 0.0;
        let keys = || (0..outer).flat_map(|o| (0..inner).map(move |i| (o, i)));
        let whole = keys().all(|(o, i)| (1..3).all(|c| kept(&y, o, i, c) == kept(&y, o, i, 0)));
        let frac = keys().filter(|&(o, i)| kept(&y, o, i, 0)).count() as f64 / n_keys;
        let q = 1.0 - p as f64;
        let bound = 6.0 * (q * (1.0 - q) / n_keys).sqrt();
        let detail = format!(
            "vectors dropped whole: {whole}; kept fraction {frac}, expected {q} +- {bound}"
        );
        let ok = whole && (frac - q).abs() <= bound;
        ctx.truth(
            format!("dropout p {p}: keeps 1 - p, whole vectors"),
            ok,
            detail,
        );
        // Same seed, same mask; another seed, another one (each key differs with probability
        // 2 p (1 - p)).
        let (again, s2) = dropout_on(ctx, false, &ones, p, seed, l)?;
        ctx.exact(
            format!("dropout p {p}: same seed, same mask"),
            &bits(&again),
            &bits(&y),
            s + s2,
        );
        let (other, _) = dropout_on(ctx, false, &ones, p, seed ^ 1, l)?;
        let differ = keys()
            .filter(|&(o, i)| kept(&other, o, i, 0) != kept(&y, o, i, 0))
            .count();
        let expect = 2.0 * p as f64 * (1.0 - p as f64) * n_keys;
        let detail = format!(
            "seeds {seed} and {} differ at {differ} keys, expected about {expect}",
            seed ^ 1
        );
        ctx.truth(
            format!("dropout p {p}: another seed, another mask"),
            differ as f64 > expect / 2.0,
            detail,
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------------ optim --

/// The configurations of tests/optim.rs: each rule, each kind of weight decay, clipping that
/// bites, and a schedule with warm-up and decay.
fn optim_configs() -> Vec<(&'static str, OptimConfig)> {
    let schedule = Schedule {
        warmup_steps: 2,
        decay: Decay::Exponential {
            gamma: 0.9,
            every_steps: 2,
        },
    };
    vec![
        ("adam", OptimConfig::adam(1e-2)),
        (
            "adam+l2+clip",
            OptimConfig {
                weight_decay: 0.1,
                clip_norm: Some(5.0),
                ..OptimConfig::adam(1e-2)
            },
        ),
        (
            "adamw+schedule",
            OptimConfig {
                schedule,
                ..OptimConfig::adamw(1e-2, 0.05)
            },
        ),
        ("adam_atan2", OptimConfig::adam_atan2(1e-2)),
        (
            "adam_atan2+wd+clip+schedule",
            OptimConfig {
                weight_decay: 0.1,
                clip_norm: Some(5.0),
                schedule,
                atan2_a: 1.1,
                atan2_b: 0.7,
                ..OptimConfig::adam_atan2(1e-2)
            },
        ),
    ]
}

/// One step of either rule through the f64 twins.
fn update64(p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64], s: &UpdateStep) {
    match s {
        UpdateStep::Adam(a) => op::adam_update_host(p, g, m, v, a),
        UpdateStep::AdamAtan2(a) => op::adam_atan2_update_host(p, g, m, v, a),
    }
}

/// Records the parameters and moments after `steps` steps against the f64 reference, with the
/// tolerances of tests/optim.rs: each step adds a few ulps of |p| and of the update (|update| <=
/// ~lr), so the parameters' grow with the steps (k 1e-7 + k 3e-7 rel); m and v 1e-7 + 2e-6 rel.
/// `rounding`: for Adam, twice the first-order bounds of [`AdamRounding`] on top (the
/// cancellation of coupled L2 decay; see there).
fn compare_state(
    ctx: &mut Ctx,
    what: &str,
    got: [Vec<f32>; 3],
    want: [Vec<f64>; 3],
    rounding: Option<&AdamRounding>,
    steps: usize,
    s: f64,
) {
    let k = steps as f64;
    let tols = [
        Tol::new(k * 1e-7, k * 3e-7),
        Tol::new(1e-7, 2e-6),
        Tol::new(1e-7, 2e-6),
    ];
    let twice = |b: &[f64]| b.iter().map(|x| 2.0 * x).collect::<Vec<f64>>();
    let extra: [Vec<f64>; 3] = match rounding {
        Some(r) => [twice(&r.p), twice(&r.m), twice(&r.v)],
        None => Default::default(),
    };
    for (i, part) in ["param", "m", "v"].into_iter().enumerate() {
        ctx.compare_each(
            format!("{what} {part}"),
            &got[i],
            &want[i],
            tols[i],
            &extra[i],
            s,
        );
    }
}

/// `optim`: six steps of Adam, Adam + L2 + clipping, AdamW + schedule, AdamAtan2 and AdamAtan2 +
/// weight decay + clipping + schedule through [`Optimizer`] (the norm's partial sums, then one
/// fused update per tensor) against the f64 twins, as tests/optim.rs; the global gradient norm
/// (exact to 1e-12 relative, bit-identical on a rerun) with more elements than the block cap
/// covers; and (full size) one update kernel of each rule over more elements than the grid.
pub(super) fn optim(ctx: &mut Ctx) -> Result<()> {
    let steps = 6;
    // The shapes of tests/optim.rs (a scalar, a ragged vector, a matrix, more than one block, an
    // odd size), for which its tolerances were set; larger tensors are checked below.
    let shapes: [&[usize]; 5] = [&[1], &[7], &[3, 100], &[1000], &[4099]];
    let lens: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
    for (name, config) in optim_configs() {
        let params: Vec<Vec<f32>> = lens.iter().map(|&n| ctx.rng.normal_vec(n, 1.0)).collect();
        let grads: Vec<Vec<Vec<f32>>> = (0..steps)
            .map(|_| lens.iter().map(|&n| ctx.rng.normal_vec(n, 1.0)).collect())
            .collect();

        let upload = |data: &[Vec<f32>]| -> Result<Vec<Tensor<f32>>> {
            shapes
                .iter()
                .zip(data)
                .map(|(s, d)| Tensor::from_slice(&ctx.dev, s, d))
                .collect()
        };
        let mut p_t = upload(&params)?;
        let mut g_t = upload(&grads[0])?;
        let refs: Vec<&Tensor<f32>> = p_t.iter().collect();
        let mut opt = Optimizer::new(config.clone(), &refs)?;
        let (mut reports, mut secs) = (Vec::<StepReport>::new(), 0.0);
        for step in &grads {
            for (t, g) in g_t.iter_mut().zip(step) {
                t.copy_from_slice(g)?;
            }
            let (r, s) = ctx.timed(|_| {
                let mut p: Vec<&mut Tensor<f32>> = p_t.iter_mut().collect();
                let g: Vec<&Tensor<f32>> = g_t.iter().collect();
                opt.step(&mut p, &g)
            })?;
            reports.push(r);
            secs += s;
        }
        let mut got = [vec![], vec![], vec![]];
        for (i, p) in p_t.iter().enumerate() {
            let (m, v) = opt.moments(i).expect("a moment per parameter");
            got[0].extend(p.to_vec()?);
            got[1].extend(m.to_vec()?);
            got[2].extend(v.to_vec()?);
        }

        // The f64 reference, with the norm and clip factor computed in f64 from the gradients.
        let mut p64: Vec<Vec<f64>> = params.iter().map(|p| to64(p)).collect();
        let mut m64: Vec<Vec<f64>> = lens.iter().map(|&n| vec![0.0; n]).collect();
        let mut v64 = m64.clone();
        let mut norms = Vec::new();
        let mut rounding: Vec<AdamRounding> = lens.iter().map(|&n| AdamRounding::new(n)).collect();
        let mut adam = false;
        for (t, step) in grads.iter().enumerate() {
            let g64: Vec<Vec<f64>> = step.iter().map(|g| to64(g)).collect();
            let norm = g64.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
            norms.push(norm);
            let scale = config.clip_norm.map_or(1.0, |c| op::clip_scale(norm, c));
            let lr = config.schedule.lr(config.lr, t as u64);
            let s = UpdateStep::new(&config, lr, t as u64 + 1, scale);
            for i in 0..lens.len() {
                if let UpdateStep::Adam(a) = &s {
                    adam = true;
                    rounding[i].step(&p64[i], &g64[i], &m64[i], &v64[i], a);
                }
                update64(&mut p64[i], &g64[i], &mut m64[i], &mut v64[i], &s);
            }
        }
        let want = [p64, m64, v64].map(|t| t.concat());
        let rounding = adam.then(|| AdamRounding {
            p: rounding.iter().flat_map(|r| r.p.iter().copied()).collect(),
            m: rounding.iter().flat_map(|r| r.m.iter().copied()).collect(),
            v: rounding.iter().flat_map(|r| r.v.iter().copied()).collect(),
        });
        let what = format!("optim {name} {steps} steps");
        compare_state(ctx, &what, got, want, rounding.as_ref(), steps, secs);
        let got_norms: Vec<f64> = reports.iter().map(|r| r.grad_norm).collect();
        ctx.compare(
            format!("{what} grad norms"),
            &got_norms,
            &norms,
            Tol::new(0.0, 1e-12),
            0.0,
        );
        let lrs_ok = reports
            .iter()
            .enumerate()
            .all(|(t, r)| r.lr == config.schedule.lr(config.lr, t as u64));
        ctx.truth(
            format!("{what} learning rates"),
            lrs_ok,
            "a step used another lr than its schedule's",
        );
    }

    // The global norm alone: 300,000 elements need more than the 1024-block cap, so threads
    // stride; poisoned partials, so an unwritten slot shows.
    let lens = [1usize, 33, 256, 257, 300_000];
    let data: Vec<Vec<f32>> = lens.iter().map(|&n| ctx.rng.normal_vec(n, 2.0)).collect();
    let grads: Vec<Tensor<f32>> = data
        .iter()
        .map(|d| Tensor::from_slice(&ctx.dev, &[d.len()], d))
        .collect::<Result<_>>()?;
    let refs: Vec<&Tensor<f32>> = grads.iter().collect();
    let mut partials = Tensor::<f64>::zeros(&ctx.dev, &[op::norm_partials_len(lens)])?;
    let norm_on = |partials: &mut Tensor<f64>| -> Result<(f64, f64)> {
        partials.poison()?;
        ctx.timed(|_| op::global_grad_norm(&refs, partials))
    };
    let (norm, s) = norm_on(&mut partials)?;
    let (again, s2) = norm_on(&mut partials)?;
    let want = data
        .iter()
        .flatten()
        .map(|&x| x as f64 * x as f64)
        .sum::<f64>()
        .sqrt();
    ctx.compare(
        "global_grad_norm",
        &[norm],
        &[want],
        Tol::new(0.0, 1e-12),
        s,
    );
    ctx.exact(
        "global_grad_norm rerun bit-identical",
        &[again.to_bits()],
        &[norm.to_bits()],
        s2,
    );

    if !ctx.quick {
        update_grid_wrap(ctx)?;
    }
    Ok(())
}

/// Two steps of each update kernel on one tensor of more elements than the capped grid covers,
/// from zero moments (so the state is that of a real run), against the f64 twins.
fn update_grid_wrap(ctx: &mut Ctx) -> Result<()> {
    let n = GRID_WRAP;
    let p0 = uniform_vec(&mut ctx.rng, n, -1.0, 1.0);
    let grads = [0, 1].map(|_| uniform_vec(&mut ctx.rng, n, -1.0, 1.0));
    let configs = [
        ("adamw", OptimConfig::adamw(1e-2, 0.05)),
        (
            "adam_atan2+wd",
            OptimConfig {
                weight_decay: 0.1,
                ..OptimConfig::adam_atan2(1e-2)
            },
        ),
    ];
    for (name, config) in configs {
        let mut p = Tensor::from_slice(&ctx.dev, &[n], &p0)?;
        let mut m = Tensor::zeros(&ctx.dev, &[n])?;
        let mut v = Tensor::zeros(&ctx.dev, &[n])?;
        let mut p64 = to64(&p0);
        let (mut m64, mut v64) = (vec![0.0; n], vec![0.0; n]);
        let mut secs = 0.0;
        let mut rounding = AdamRounding::new(n);
        let mut adam = false;
        for (t, g) in grads.iter().enumerate() {
            // A clip factor below 1, as `grad_scale` carries it.
            let s = UpdateStep::new(&config, config.lr, t as u64 + 1, 0.8);
            let gt = Tensor::from_slice(&ctx.dev, &[n], g)?;
            secs += ctx
                .timed(|_| op::apply_update(&mut p, &gt, &mut m, &mut v, &s))?
                .1;
            let g64 = to64(g);
            if let UpdateStep::Adam(a) = &s {
                adam = true;
                rounding.step(&p64, &g64, &m64, &v64, a);
            }
            update64(&mut p64, &g64, &mut m64, &mut v64, &s);
        }
        let got = [p.to_vec()?, m.to_vec()?, v.to_vec()?];
        compare_state(
            ctx,
            &format!("optim {name} n={n} 2 steps"),
            got,
            [p64, m64, v64],
            adam.then_some(&rounding),
            2,
            secs,
        );
    }
    Ok(())
}
