//! Dense matrix products and the Linear layer (src/ops/gemm.rs, cuda/gemm.cu) on every device
//! against an f64 triple-loop reference, and the Linear backward against central differences.
//!
//! Tolerances are forward error bounds of a k-term dot product in f32: |got - exact| <=
//! (k + 4) eps (|alpha| |op(A)| |op(B)| + |beta| |C|), element by element (eps = 2^-23, twice the
//! unit roundoff: a rigorous bound for any summation order). The bf16/f16 products are compared
//! with the f64 product of the rounded operands under the same bound, since they accumulate in
//! f32 too.

use anyhow::{bail, ensure, Result};
use half::{bf16, f16};
use hiermd::ops::gemm::{
    column_sum, gemm, gemm_batched, gemm_half, gemm_half_batched, gemm_reference, linear_backward,
    linear_backward_host, linear_forward, linear_forward_host, matmul_backward, Batch, HalfFloat,
};
use hiermd::testing::{check_gradient, Rng};
use hiermd::{device_test, Device, Tensor};

/// (m, n, k): one element, odd and prime sizes, one tile exactly, tiles plus one, k = 1, and a
/// product of several tiles in every direction.
const SHAPES: [(usize, usize, usize); 8] = [
    (1, 1, 1),
    (17, 31, 13),
    (65, 129, 33),
    (128, 64, 32),
    (129, 65, 17),
    (40, 50, 1),
    (3, 200, 70),
    (256, 384, 200),
];

/// (alpha, beta): plain assignment into a NaN-poisoned C, scaled assignment, accumulation.
const SCALARS: [(f32, f32); 4] = [(1.0, 0.0), (-0.75, 0.0), (1.0, 1.0), (0.5, -1.5)];

const TRANSPOSES: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Reference values and per-element error bounds of one product.
#[allow(clippy::too_many_arguments)]
fn expected(
    (ta, tb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: &[f64],
    b: &[f64],
    beta: f32,
    c: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let mut want = c.to_vec();
    gemm_reference(ta, tb, m, n, k, alpha as f64, a, b, beta as f64, &mut want);
    let abs = |v: &[f64]| v.iter().map(|x| x.abs()).collect::<Vec<f64>>();
    let mut bound = abs(c);
    let beta_abs = (beta as f64).abs();
    gemm_reference(
        ta,
        tb,
        m,
        n,
        k,
        (alpha as f64).abs(),
        &abs(a),
        &abs(b),
        beta_abs,
        &mut bound,
    );
    let eps = (k as f64 + 4.0) * f32::EPSILON as f64;
    // The smallest normal f32 covers products that underflow.
    let bound = bound
        .iter()
        .map(|v| eps * v + f32::MIN_POSITIVE as f64)
        .collect();
    (want, bound)
}

/// Every element within its bound (NaN never is); the message names the worst.
fn check_bounded(what: &str, got: &[f32], want: &[f64], bound: &[f64]) -> Result<()> {
    ensure!(
        got.len() == want.len(),
        "{what}: {} values, reference has {}",
        got.len(),
        want.len()
    );
    let mut worst: Option<(usize, f64)> = None;
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        // NaN (never written, or overflow) is the worst of all.
        let ratio = (g as f64 - w).abs() / b;
        let ratio = if ratio.is_nan() { f64::INFINITY } else { ratio };
        if ratio > 1.0 && worst.is_none_or(|(_, r)| ratio > r) {
            worst = Some((i, ratio));
        }
    }
    if let Some((i, ratio)) = worst {
        bail!(
            "{what}: element {i} is {} but the reference is {} (|diff| {:.3e} is {ratio:.2} times the bound {:.3e})",
            got[i],
            want[i],
            (got[i] as f64 - want[i]).abs(),
            bound[i]
        );
    }
    Ok(())
}

/// The stored sizes of A and B.
fn sizes((m, n, k): (usize, usize, usize)) -> (usize, usize, usize) {
    (m * k, k * n, m * n)
}

/// A C tensor: poisoned with NaN when beta = 0 (the product must not read it), else random.
fn c_input(dev: &Device, rng: &mut Rng, len: usize, beta: f32) -> Result<(Tensor<f32>, Vec<f64>)> {
    if beta == 0.0 {
        let mut c = Tensor::zeros(dev, &[len])?;
        c.poison()?;
        Ok((c, vec![0.0; len]))
    } else {
        let v = rng.normal_vec(len, 1.0);
        Ok((Tensor::from_slice(dev, &[len], &v)?, widen(&v)))
    }
}

device_test!(gemm_f32_matches_reference, |dev| {
    let mut rng = Rng::for_test("gemm_f32_matches_reference");
    for shape in SHAPES {
        let (m, n, k) = shape;
        let (la, lb, lc) = sizes(shape);
        for (trans, (alpha, beta)) in TRANSPOSES
            .into_iter()
            .flat_map(|t| SCALARS.into_iter().map(move |s| (t, s)))
        {
            let a = rng.normal_vec(la, 1.0);
            let b = rng.normal_vec(lb, 1.0);
            let (mut c, c64) = c_input(dev, &mut rng, lc, beta)?;
            let at = Tensor::from_slice(dev, &[la], &a)?;
            let bt = Tensor::from_slice(dev, &[lb], &b)?;
            gemm(trans.0, trans.1, m, n, k, alpha, &at, &bt, beta, &mut c)?;
            let (want, bound) = expected(trans, shape, alpha, &widen(&a), &widen(&b), beta, &c64);
            check_bounded(
                &format!("gemm {m}x{n}x{k} trans {trans:?} alpha {alpha} beta {beta}"),
                &c.to_vec()?,
                &want,
                &bound,
            )?;
        }
    }
    Ok(())
});

/// Rounds to the 16-bit type and back, for the reference.
fn round_to<T: HalfFloat>(v: &[f32], from: fn(f32) -> T) -> (Vec<T>, Vec<f64>) {
    let h: Vec<T> = v.iter().map(|&x| from(x)).collect();
    let r = h.iter().map(|&x| x.to_f32() as f64).collect();
    (h, r)
}

fn half_matches_reference<T: HalfFloat>(
    dev: &Device,
    rng: &mut Rng,
    from: fn(f32) -> T,
    name: &str,
) -> Result<()> {
    for shape in SHAPES {
        let (m, n, k) = shape;
        let (la, lb, lc) = sizes(shape);
        for (trans, (alpha, beta)) in TRANSPOSES
            .into_iter()
            .flat_map(|t| SCALARS.into_iter().map(move |s| (t, s)))
        {
            let (a, a64) = round_to(&rng.normal_vec(la, 1.0), from);
            let (b, b64) = round_to(&rng.normal_vec(lb, 1.0), from);
            let (mut c, c64) = c_input(dev, rng, lc, beta)?;
            let at = Tensor::from_slice(dev, &[la], &a)?;
            let bt = Tensor::from_slice(dev, &[lb], &b)?;
            gemm_half(trans.0, trans.1, m, n, k, alpha, &at, &bt, beta, &mut c)?;
            let (want, bound) = expected(trans, shape, alpha, &a64, &b64, beta, &c64);
            check_bounded(
                &format!("gemm_half {name} {m}x{n}x{k} trans {trans:?} alpha {alpha} beta {beta}"),
                &c.to_vec()?,
                &want,
                &bound,
            )?;
        }
    }
    Ok(())
}

device_test!(gemm_bf16_matches_reference, |dev| {
    let mut rng = Rng::for_test("gemm_bf16_matches_reference");
    half_matches_reference(dev, &mut rng, bf16::from_f32, "bf16")
});

device_test!(gemm_f16_matches_reference, |dev| {
    let mut rng = Rng::for_test("gemm_f16_matches_reference");
    half_matches_reference(dev, &mut rng, f16::from_f32, "f16")
});

/// Sentinel in the gaps between C's matrices: a batched product must leave it alone.
const GAP: f32 = 12345.0;

// A batch with packed strides, with padded strides (gaps checked untouched), and with A or B
// shared by every product (stride 0), in f32 and bf16.
device_test!(gemm_batched_matches_reference, |dev| {
    let mut rng = Rng::for_test("gemm_batched_matches_reference");
    let (m, n, k, count) = (37, 45, 29, 3);
    let (la, lb, lc) = sizes((m, n, k));
    let layouts = [
        Batch::packed(count, m, n, k),
        Batch {
            count,
            stride_a: la + 5,
            stride_b: lb + 3,
            stride_c: lc + 7,
        },
        Batch {
            count,
            stride_a: 0,
            stride_b: lb,
            stride_c: lc,
        },
        Batch {
            count,
            stride_a: la,
            stride_b: 0,
            stride_c: lc + 1,
        },
    ];
    for (case, batch) in layouts.into_iter().enumerate() {
        let trans = TRANSPOSES[case % 4];
        let (alpha, beta) = SCALARS[case % SCALARS.len()];
        let span = |one: usize, stride: usize| (count - 1) * stride + one;
        let a = rng.normal_vec(span(la, batch.stride_a), 1.0);
        let b = rng.normal_vec(span(lb, batch.stride_b), 1.0);
        let (a16, a64) = round_to(&a, bf16::from_f32);
        let (b16, b64) = round_to(&b, bf16::from_f32);
        let c0: Vec<f32> = (0..span(lc, batch.stride_c))
            .map(|i| {
                if i % batch.stride_c.max(1) < lc {
                    if beta == 0.0 {
                        f32::NAN
                    } else {
                        rng.normal() as f32
                    }
                } else {
                    GAP
                }
            })
            .collect();
        for half in [false, true] {
            let mut c = Tensor::from_slice(dev, &[c0.len()], &c0)?;
            let (a_ref, b_ref) = if half {
                let at = Tensor::from_slice(dev, &[a16.len()], &a16)?;
                let bt = Tensor::from_slice(dev, &[b16.len()], &b16)?;
                gemm_half_batched(
                    trans.0, trans.1, m, n, k, alpha, &at, &bt, beta, &mut c, batch,
                )?;
                (a64.clone(), b64.clone())
            } else {
                let at = Tensor::from_slice(dev, &[a.len()], &a)?;
                let bt = Tensor::from_slice(dev, &[b.len()], &b)?;
                gemm_batched(
                    trans.0, trans.1, m, n, k, alpha, &at, &bt, beta, &mut c, batch,
                )?;
                (widen(&a), widen(&b))
            };
            let got = c.to_vec()?;
            for i in 0..count {
                let (oa, ob, oc) = (i * batch.stride_a, i * batch.stride_b, i * batch.stride_c);
                let c_in: Vec<f64> = c0[oc..oc + lc]
                    .iter()
                    .map(|&v| if beta == 0.0 { 0.0 } else { v as f64 })
                    .collect();
                let (want, bound) = expected(
                    trans,
                    (m, n, k),
                    alpha,
                    &a_ref[oa..oa + la],
                    &b_ref[ob..ob + lb],
                    beta,
                    &c_in,
                );
                check_bounded(
                    &format!("batched (half {half}) {batch:?} product {i}"),
                    &got[oc..oc + lc],
                    &want,
                    &bound,
                )?;
            }
            for (i, &v) in got.iter().enumerate() {
                if i % batch.stride_c.max(1) >= lc {
                    ensure!(
                        v == GAP,
                        "batched (half {half}) {batch:?}: element {i} between C's matrices was overwritten ({v})"
                    );
                }
            }
        }
    }
    Ok(())
});

// beta = 0 never reads C (poisoned with NaN), alpha = 0 never reads A or B (inf there would make
// 0 * inf = NaN), and k = 0 leaves C = beta C.
device_test!(gemm_scalar_edge_cases, |dev| {
    let (m, n, k) = (70, 66, 20);
    let mut a = vec![1.0f32; m * k];
    a[5] = f32::INFINITY;
    let at = Tensor::from_slice(dev, &[m, k], &a)?;
    let bt = Tensor::from_slice(dev, &[k, n], &vec![2.0f32; k * n])?;
    let c0: Vec<f32> = (0..m * n).map(|i| i as f32).collect();

    let mut c = Tensor::from_slice(dev, &[m, n], &c0)?;
    gemm(false, false, m, n, k, 0.0, &at, &bt, 0.5, &mut c)?;
    let want: Vec<f32> = c0.iter().map(|v| 0.5 * v).collect();
    ensure!(
        c.to_vec()? == want,
        "alpha = 0 must give C = beta C exactly"
    );

    let at = Tensor::from_slice(dev, &[m, k], &vec![1.0f32; m * k])?;
    let mut c = Tensor::zeros(dev, &[m, n])?;
    c.poison()?;
    gemm(false, false, m, n, k, 1.0, &at, &bt, 0.0, &mut c)?;
    ensure!(
        c.to_vec()?.iter().all(|&v| v == 2.0 * k as f32),
        "beta = 0 must not read a NaN-poisoned C"
    );

    let a0 = Tensor::<f32>::zeros(dev, &[m, 0])?;
    let b0 = Tensor::<f32>::zeros(dev, &[0, n])?;
    let mut c = Tensor::from_slice(dev, &[m, n], &c0)?;
    gemm(false, false, m, n, 0, 1.0, &a0, &b0, 2.0, &mut c)?;
    let want: Vec<f32> = c0.iter().map(|v| 2.0 * v).collect();
    ensure!(c.to_vec()? == want, "k = 0 must give C = beta C");
    let mut c = Tensor::zeros(dev, &[m, n])?;
    c.poison()?;
    gemm(false, false, m, n, 0, 1.0, &a0, &b0, 0.0, &mut c)?;
    ensure!(
        c.to_vec()?.iter().all(|&v| v == 0.0),
        "k = 0, beta = 0 must give zeros"
    );
    Ok(())
});

// The same product twice gives the same bits (on emu, under two different thread orders).
device_test!(gemm_is_deterministic, |dev| {
    let mut rng = Rng::for_test("gemm_is_deterministic");
    let (m, n, k) = (150, 70, 90);
    let a = rng.normal_vec(m * k, 1.0);
    let b = rng.normal_vec(k * n, 1.0);
    let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
    let at = Tensor::from_slice(dev, &[m, k], &a)?;
    // B stored [n, k], used transposed.
    let bt = Tensor::from_slice(dev, &[n, k], &b)?;
    let ah = Tensor::from_slice(dev, &[m, k], &to_bf16(&a))?;
    let bh = Tensor::from_slice(dev, &[k, n], &to_bf16(&b))?;
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut c = Tensor::zeros(dev, &[m, n])?;
        gemm(false, true, m, n, k, 1.0, &at, &bt, 0.0, &mut c)?;
        let mut ch = Tensor::zeros(dev, &[m, n])?;
        gemm_half(false, false, m, n, k, 1.0, &ah, &bh, 0.0, &mut ch)?;
        runs.push((c.to_vec()?, ch.to_vec()?));
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    ensure!(
        bits(&runs[0].0) == bits(&runs[1].0),
        "f32 gemm differs between runs"
    );
    ensure!(
        bits(&runs[0].1) == bits(&runs[1].1),
        "bf16 gemm differs between runs"
    );
    Ok(())
});

device_test!(gemm_rejects_bad_shapes, |dev| {
    let a = Tensor::<f32>::zeros(dev, &[4, 5])?;
    let b = Tensor::<f32>::zeros(dev, &[5, 6])?;
    let mut c = Tensor::<f32>::zeros(dev, &[4, 6])?;
    let msg = |r: Result<()>| r.map_or_else(|e| format!("{e:#}"), |_| "accepted".to_string());

    let e = msg(gemm(false, false, 4, 6, 3, 1.0, &a, &b, 0.0, &mut c));
    ensure!(
        e.contains("gemm: A has shape [4, 5], expected [4, 3]"),
        "{e}"
    );
    let e = msg(gemm(false, true, 4, 6, 5, 1.0, &a, &b, 0.0, &mut c));
    ensure!(
        e.contains("gemm: B (stored [n, k]) has shape [5, 6], expected [6, 5]"),
        "{e}"
    );
    // Other ranks are held to their element count.
    let flat = Tensor::<f32>::zeros(dev, &[19])?;
    let e = msg(gemm(false, false, 4, 6, 5, 1.0, &flat, &b, 0.0, &mut c));
    ensure!(
        e.contains("A has shape [19] (19 elements), expected a 4 x 5 matrix (20 elements)"),
        "{e}"
    );
    let mut c_small = Tensor::<f32>::zeros(dev, &[4, 5])?;
    let e = msg(gemm(false, false, 4, 6, 5, 1.0, &a, &b, 0.0, &mut c_small));
    ensure!(e.contains("C has shape [4, 5], expected [4, 6]"), "{e}");
    let batch = Batch {
        count: 2,
        stride_a: 20,
        stride_b: 30,
        stride_c: 10,
    };
    let a2 = Tensor::<f32>::zeros(dev, &[2, 4, 5])?;
    let b2 = Tensor::<f32>::zeros(dev, &[2, 5, 6])?;
    let mut c2 = Tensor::<f32>::zeros(dev, &[2, 4, 6])?;
    let e = msg(gemm_batched(
        false, false, 4, 6, 5, 1.0, &a2, &b2, 0.0, &mut c2, batch,
    ));
    ensure!(e.contains("C's stride 10"), "{e}");
    let e = msg(gemm_batched(
        false,
        false,
        4,
        6,
        5,
        1.0,
        &a2,
        &b2,
        0.0,
        &mut c2,
        Batch::packed(3, 4, 6, 5),
    ));
    ensure!(
        e.contains("A has shape [2, 4, 5]") && e.contains("3 matrices of 4 x 5"),
        "{e}"
    );

    let x = Tensor::<f32>::zeros(dev, &[7, 5])?;
    let w = Tensor::<f32>::zeros(dev, &[3, 4])?;
    let mut y = Tensor::<f32>::zeros(dev, &[7, 3])?;
    let e = msg(linear_forward(&x, &w, None, &mut y));
    ensure!(e.contains("x has shape [7, 5], expected [..., 4]"), "{e}");
    let w = Tensor::<f32>::zeros(dev, &[3, 5])?;
    let bias = Tensor::<f32>::zeros(dev, &[4])?;
    let e = msg(linear_forward(&x, &w, Some(&bias), &mut y));
    ensure!(e.contains("bias has shape [4]"), "{e}");
    Ok(())
});

device_test!(column_sum_matches_reference, |dev| {
    let mut rng = Rng::for_test("column_sum_matches_reference");
    for (rows, cols) in [(1, 1), (300, 37), (9, 100)] {
        for beta in [0.0f32, 1.0] {
            let x = rng.normal_vec(rows * cols, 1.0);
            let o = rng.normal_vec(cols, 1.0);
            let mut out = Tensor::from_slice(dev, &[cols], &o)?;
            if beta == 0.0 {
                out.poison()?;
            }
            column_sum(
                &Tensor::from_slice(dev, &[rows, cols], &x)?,
                &mut out,
                cols,
                beta,
            )?;
            let got = out.to_vec()?;
            for j in 0..cols {
                let col = (0..rows).map(|i| x[i * cols + j] as f64);
                let want = col.clone().sum::<f64>() + beta as f64 * o[j] as f64;
                let bound = (rows as f64 + 2.0)
                    * f32::EPSILON as f64
                    * (col.map(f64::abs).sum::<f64>() + (beta * o[j]).abs() as f64);
                ensure!(
                    (got[j] as f64 - want).abs() <= bound + 1e-30,
                    "column_sum {rows}x{cols} beta {beta}: column {j} is {} but the reference is {want}",
                    got[j]
                );
            }
        }
    }
    Ok(())
});

// The general backward for every transpose pair, assigning dA and accumulating into dB, and a
// batched case: against products formed with the reference.
device_test!(matmul_backward_matches_reference, |dev| {
    let mut rng = Rng::for_test("matmul_backward_matches_reference");
    let (m, n, k) = (33, 20, 27);
    let (la, lb, lc) = sizes((m, n, k));
    for (case, trans) in TRANSPOSES.into_iter().enumerate() {
        let count = if case == 3 { 2 } else { 1 };
        let batch = Batch::packed(count, m, n, k);
        let alpha = 0.5;
        let a = rng.normal_vec(la * count, 1.0);
        let b = rng.normal_vec(lb * count, 1.0);
        let dy = rng.normal_vec(lc * count, 1.0);
        let db0 = rng.normal_vec(lb * count, 1.0);
        let (at, bt, dyt) = (
            Tensor::from_slice(dev, &[a.len()], &a)?,
            Tensor::from_slice(dev, &[b.len()], &b)?,
            Tensor::from_slice(dev, &[dy.len()], &dy)?,
        );
        let mut da = Tensor::zeros(dev, &[a.len()])?;
        da.poison()?;
        let mut db = Tensor::from_slice(dev, &[b.len()], &db0)?;
        matmul_backward(
            trans.0,
            trans.1,
            m,
            n,
            k,
            alpha,
            &at,
            &bt,
            &dyt,
            Some((&mut da, 0.0)),
            Some((&mut db, 1.0)),
            batch,
        )?;
        let (got_da, got_db) = (da.to_vec()?, db.to_vec()?);
        for i in 0..count {
            let (a64, b64, dy64) = (
                widen(&a[i * la..(i + 1) * la]),
                widen(&b[i * lb..(i + 1) * lb]),
                widen(&dy[i * lc..(i + 1) * lc]),
            );
            // The gradients element by element from their definitions: dA_il = alpha sum_j dY_ij
            // op(B)_lj, dB_lj = alpha sum_i op(A)_il dY_ij, stored like A and B.
            let op_a = |i: usize, l: usize| {
                if trans.0 {
                    a64[l * m + i]
                } else {
                    a64[i * k + l]
                }
            };
            let op_b = |l: usize, j: usize| {
                if trans.1 {
                    b64[j * k + l]
                } else {
                    b64[l * n + j]
                }
            };
            let (mut want_da, mut bound_da) = (vec![0.0; la], vec![0.0; la]);
            for r in 0..m {
                for l in 0..k {
                    let (s, s_abs) = (0..n).fold((0.0, 0.0), |(s, t), j| {
                        let p = dy64[r * n + j] * op_b(l, j);
                        (s + p, t + p.abs())
                    });
                    let at = if trans.0 { l * m + r } else { r * k + l };
                    want_da[at] = alpha as f64 * s;
                    bound_da[at] =
                        (n as f64 + 4.0) * f32::EPSILON as f64 * alpha as f64 * s_abs + 1e-30;
                }
            }
            let (mut want_db, mut bound_db) = (vec![0.0; lb], vec![0.0; lb]);
            for l in 0..k {
                for j in 0..n {
                    let (s, s_abs) = (0..m).fold((0.0, 0.0), |(s, t), r| {
                        let p = op_a(r, l) * dy64[r * n + j];
                        (s + p, t + p.abs())
                    });
                    let at = if trans.1 { j * k + l } else { l * n + j };
                    let old = db0[i * lb + at] as f64;
                    want_db[at] = old + alpha as f64 * s;
                    bound_db[at] =
                        (m as f64 + 4.0) * f32::EPSILON as f64 * (alpha as f64 * s_abs + old.abs())
                            + 1e-30;
                }
            }
            check_bounded(
                &format!("dA trans {trans:?} product {i}"),
                &got_da[i * la..(i + 1) * la],
                &want_da,
                &bound_da,
            )?;
            check_bounded(
                &format!("dB trans {trans:?} product {i}"),
                &got_db[i * lb..(i + 1) * lb],
                &want_db,
                &bound_db,
            )?;
        }
    }
    Ok(())
});

// Linear forward (with and without bias) and backward (dx assigned and accumulated, dw and
// dbias accumulated) on every device against the f64 CPU twin.
device_test!(linear_matches_reference, |dev| {
    let mut rng = Rng::for_test("linear_matches_reference");
    let (rows, in_f, out_f) = (70, 24, 36);
    let x = rng.normal_vec(rows * in_f, 1.0);
    let w = rng.normal_vec(out_f * in_f, 0.5);
    let bias = rng.normal_vec(out_f, 1.0);
    let dy = rng.normal_vec(rows * out_f, 1.0);
    let dx0 = rng.normal_vec(rows * in_f, 1.0);
    let dw0 = rng.normal_vec(out_f * in_f, 1.0);
    let db0 = rng.normal_vec(out_f, 1.0);
    let (x64, w64, b64, dy64) = (widen(&x), widen(&w), widen(&bias), widen(&dy));
    // Loose relative to the bounds above but far below any layout mistake: the CPU twin in f64
    // is the reference, and every value here is an O(1)-sized sum of at most 70 terms.
    let tol = 1e-4;
    let xt = Tensor::from_slice(dev, &[rows, in_f], &x)?;
    let wt = Tensor::from_slice(dev, &[out_f, in_f], &w)?;
    let bt = Tensor::from_slice(dev, &[out_f], &bias)?;
    let dyt = Tensor::from_slice(dev, &[rows, out_f], &dy)?;
    for with_bias in [true, false] {
        let mut y = Tensor::zeros(dev, &[rows, out_f])?;
        y.poison()?;
        linear_forward(&xt, &wt, with_bias.then_some(&bt), &mut y)?;
        let mut want = vec![0.0; rows * out_f];
        linear_forward_host(
            &x64,
            &w64,
            with_bias.then_some(&b64[..]),
            &mut want,
            in_f,
            out_f,
        );
        hiermd::testing::assert_close(
            &format!("linear_forward bias {with_bias}"),
            &y.to_vec()?,
            &want,
            tol,
            tol,
        )?;
    }
    for dx_beta in [0.0f32, 1.0] {
        let mut dx = Tensor::from_slice(dev, &[rows, in_f], &dx0)?;
        if dx_beta == 0.0 {
            dx.poison()?;
        }
        let mut dw = Tensor::from_slice(dev, &[out_f, in_f], &dw0)?;
        let mut db = Tensor::from_slice(dev, &[out_f], &db0)?;
        linear_backward(
            &xt,
            &wt,
            &dyt,
            Some(&mut dx),
            dx_beta,
            &mut dw,
            Some(&mut db),
        )?;
        let mut want_dx = widen(&dx0);
        let mut want_dw = widen(&dw0);
        let mut want_db = widen(&db0);
        linear_backward_host(
            &x64,
            &w64,
            &dy64,
            Some(&mut want_dx),
            dx_beta as f64,
            &mut want_dw,
            Some(&mut want_db),
            in_f,
        );
        let assert_close = hiermd::testing::assert_close;
        assert_close(
            &format!("dx beta {dx_beta}"),
            &dx.to_vec()?,
            &want_dx,
            tol,
            tol,
        )?;
        assert_close(
            &format!("dw beta {dx_beta}"),
            &dw.to_vec()?,
            &want_dw,
            tol,
            tol,
        )?;
        assert_close(
            &format!("db beta {dx_beta}"),
            &db.to_vec()?,
            &want_db,
            tol,
            tol,
        )?;
    }
    // Without dx and dbias (the first layer, no bias): only dw changes.
    let mut dw = Tensor::from_slice(dev, &[out_f, in_f], &dw0)?;
    linear_backward(&xt, &wt, &dyt, None, 0.0, &mut dw, None)?;
    let mut want_dw = widen(&dw0);
    let mut scratch = vec![0.0; rows * in_f];
    linear_backward_host(
        &x64,
        &w64,
        &dy64,
        Some(&mut scratch),
        0.0,
        &mut want_dw,
        None,
        in_f,
    );
    hiermd::testing::assert_close("dw without dx", &dw.to_vec()?, &want_dw, tol, tol)?;
    Ok(())
});

/// Central differences of L = sum(r * linear(x)) in f64 against linear_backward_host's dx, dw,
/// db (from zero), with dy = r.
#[test]
fn linear_gradient_matches_finite_differences() {
    let mut rng = Rng::for_test("linear_gradient_matches_finite_differences");
    let (rows, in_f, out_f) = (5, 4, 3);
    let draw = |rng: &mut Rng, n: usize| (0..n).map(|_| rng.normal()).collect::<Vec<f64>>();
    let x = draw(&mut rng, rows * in_f);
    let w = draw(&mut rng, out_f * in_f);
    let b = draw(&mut rng, out_f);
    let r = draw(&mut rng, rows * out_f);
    let loss = |x: &[f64], w: &[f64], b: &[f64]| {
        let mut y = vec![0.0; rows * out_f];
        linear_forward_host(x, w, Some(b), &mut y, in_f, out_f);
        y.iter().zip(&r).map(|(y, r)| y * r).sum::<f64>()
    };
    let mut dx = vec![0.0; rows * in_f];
    let mut dw = vec![0.0; out_f * in_f];
    let mut db = vec![0.0; out_f];
    linear_backward_host(&x, &w, &r, Some(&mut dx), 0.0, &mut dw, Some(&mut db), in_f);
    check_gradient("linear dx", |x| loss(x, &w, &b), &x, &dx, 1e-6, 1e-7).unwrap();
    check_gradient("linear dw", |w| loss(&x, w, &b), &w, &dw, 1e-6, 1e-7).unwrap();
    check_gradient("linear db", |b| loss(&x, &w, b), &b, &db, 1e-6, 1e-7).unwrap();
}

/// The kernels check the block size and shared memory they were launched with, so a drift
/// between the constants of src/ops/gemm.rs and cuda/gemm.cu fails loudly instead of writing past
/// shared memory. Emu only: on a GPU the check traps, which would end the CUDA context.
#[test]
fn gemm_kernels_reject_a_wrong_launch() {
    use hiermd::kernels::gemm as k;
    use hiermd::launch::{launch, KernelArgs, LaunchConfig};
    let dev = Device::emu();
    let run = || -> Result<()> {
        let a = Tensor::<f32>::zeros(&dev, &[16])?;
        let b = Tensor::<f32>::zeros(&dev, &[16])?;
        let mut c = Tensor::<f32>::zeros(&dev, &[16])?;
        for (kernel, shared) in [
            (&k::GEMM_F32_NN, 25_600 - 4),
            (&k::GEMM_BF16_NN, 30_720 - 16),
        ] {
            let args = KernelArgs::new()
                .i32(4)
                .i32(4)
                .i32(4)
                .f32(1.0)
                .input(&a)
                .i32(4)
                .i64(0)
                .input(&b)
                .i32(4)
                .i64(0)
                .f32(0.0)
                .output(&mut c)
                .i32(4)
                .i64(0)
                .i64(0);
            let cfg = LaunchConfig {
                grid: [1, 1, 1],
                block: [128, 1, 1],
                shared_bytes: shared,
            };
            let err = launch(&dev, kernel, cfg, args).expect_err("too little shared memory");
            let msg = format!("{err:#}");
            ensure!(msg.contains("needs 128 and"), "{}: {msg}", kernel.name);
        }
        Ok(())
    };
    run().unwrap();
}
