//! Fused equivariant attention (src/ops/eqsdpa.rs, cuda/eqsdpa.cu) on every device.
//!
//! Accuracy follows FlashAttention-2's rule: against the materialised f64 reference, the fused
//! f32 result's error (max abs) may be at most twice that of a materialised f32 attention (f32
//! scores, f32 softmax, f32 products, as EqAttention computes it) plus a tiny floor; forward and
//! backward. Also: masks (masked keys' contents change nothing, bit for bit; fully masked frames
//! give 0, never NaN), finite differences on the f64 CPU twin, bitwise determinism, bad shapes.
//!
//! The materialised f32 attention is what `EqAttention` runs on the cpu device (the f32 GEMM and
//! the crate's softmax). One addition for the backward, which FlashAttention-2 defines as a
//! function of the saved forward outputs: storing `out` and `lse` in f32 alone moves the exact
//! gradients by about as much as a materialised f32 backward errs (lse's rounding scales every
//! recomputed P of a row alike; `D = rowsum(dout out)` carries out's rounding, where the
//! materialised backward sums its own P dP), an error no backward arithmetic can remove. It is
//! measured as the error of the f64 backward evaluated on the fused f32 `out` and `lse`, and
//! allowed on top: the kernels' own arithmetic may cost at most twice what a materialised f32
//! backward's does.

use anyhow::{ensure, Result};
use hiermd::ops::eqsdpa::{
    eqsdpa_backward, eqsdpa_backward_half, eqsdpa_backward_host, eqsdpa_forward,
    eqsdpa_forward_half, eqsdpa_forward_host, eqsdpa_reference_host, set_max_blocks,
    EqsdpaBackwardMode, EqsdpaDims,
};
use hiermd::ops::gemm::{gemm_host, Batch, HalfFloat};
use hiermd::ops::softmax::{softmax_backward_host, softmax_forward_host};
use hiermd::testing::{assert_close, check_gradient, Rng};
use hiermd::{device_test, kernel_test, Device, Tensor};

/// Added to twice the materialised f32 error: both can be exactly 0 (T = 1).
const FLOOR: f64 = 1e-6;

/// The floor of the 16-bit backward's gradients. Where a query has one key (T = 1) its exact dS
/// is 0 and the materialised backward gets exactly 0 (its D is summed from its own dP); the fused
/// one forms dP - D from the tensor cores' dP (rounded to f32 after every 16-wide step) and D
/// (rounded once), which cancel only to a few f32 ulps of |dP| (~1e-6 here). 1e-5 is still 100
/// to 1000 times below the 16-bit errors the rule compares (1e-3 to 2e-2).
const HALF_FLOOR: f64 = 1e-5;

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// One attention problem with its inputs (f32, as the device sees them).
struct Case {
    d: EqsdpaDims,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Option<Vec<u8>>,
    dout: Vec<f32>,
}

impl Case {
    /// Random inputs; with `masked`, about a fifth of the keys are padding, one frame (of two or
    /// more) is fully masked, and the last frame's trailing tokens are padding.
    fn new(rng: &mut Rng, frames: usize, heads: usize, t: usize, dh: usize, masked: bool) -> Self {
        let d = EqsdpaDims {
            bh: frames * heads,
            t,
            dh,
            heads,
        };
        let n = d.bh * t;
        let mask = masked.then(|| {
            let mut m: Vec<u8> = (0..frames * t)
                .map(|_| (rng.uniform() > 0.2) as u8)
                .collect();
            if frames >= 2 {
                m[..t].fill(0);
            }
            let last = &mut m[(frames - 1) * t..];
            let pad = t / 4;
            last[t - pad..].fill(0);
            m
        });
        Self {
            d,
            // Queries a little larger than keys: peakier softmax rows than unit scores.
            q: rng.normal_vec(n * dh, 1.5),
            k: rng.normal_vec(n * dh, 1.0),
            v: rng.normal_vec(n * 4 * dh, 1.0),
            mask,
            dout: rng.normal_vec(n * 4 * dh, 1.0),
        }
    }

    fn scale(&self) -> f32 {
        1.0 / (self.d.dh as f32).sqrt()
    }

    fn name(&self) -> String {
        format!(
            "bh {} (heads {}) T {} dh {}{}",
            self.d.bh,
            self.d.heads,
            self.d.t,
            self.d.dh,
            if self.mask.is_some() { " masked" } else { "" }
        )
    }
}

/// The fused op's outputs, read back.
struct Fused {
    out: Vec<f32>,
    lse: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// Forward and backward (deterministic mode) on `dev`, outputs poisoned first.
fn run_fused(dev: &Device, c: &Case, backward: bool) -> Result<Fused> {
    run_fused_mode(dev, c, backward, EqsdpaBackwardMode::Deterministic)
}

/// [`run_fused`] with the backward in `mode`.
fn run_fused_mode(
    dev: &Device,
    c: &Case,
    backward: bool,
    mode: EqsdpaBackwardMode,
) -> Result<Fused> {
    let d = c.d;
    let qs = [d.bh, d.t, d.dh];
    let vs = [d.bh, d.t, 4 * d.dh];
    let q = Tensor::from_slice(dev, &qs, &c.q)?;
    let k = Tensor::from_slice(dev, &qs, &c.k)?;
    let v = Tensor::from_slice(dev, &vs, &c.v)?;
    let mask = match &c.mask {
        Some(m) => Some(Tensor::from_slice(dev, &[d.frames(), d.t], m)?),
        None => None,
    };
    let mut out = Tensor::zeros(dev, &vs)?;
    let mut lse = Tensor::zeros(dev, &[d.bh, d.t])?;
    out.poison()?;
    lse.poison()?;
    eqsdpa_forward(
        &q,
        &k,
        &v,
        mask.as_ref(),
        d.heads,
        c.scale(),
        &mut out,
        &mut lse,
    )?;
    let mut f = Fused {
        out: out.to_vec()?,
        lse: lse.to_vec()?,
        dq: vec![],
        dk: vec![],
        dv: vec![],
    };
    if backward {
        let dout = Tensor::from_slice(dev, &vs, &c.dout)?;
        let mut dq = Tensor::zeros(dev, &qs)?;
        let mut dk = Tensor::zeros(dev, &qs)?;
        let mut dv = Tensor::zeros(dev, &vs)?;
        dq.poison()?;
        dk.poison()?;
        dv.poison()?;
        eqsdpa_backward(
            &q,
            &k,
            &v,
            &out,
            &lse,
            &dout,
            mask.as_ref(),
            d.heads,
            c.scale(),
            &mut dq,
            &mut dk,
            &mut dv,
            mode,
        )?;
        f.dq = dq.to_vec()?;
        f.dk = dk.to_vec()?;
        f.dv = dv.to_vec()?;
    }
    Ok(f)
}

/// Materialised attention in f32, as `EqAttention` computes it on the cpu device: the f32 GEMM
/// (`gemm_host`) for scores, `P values` and every backward product, the T x T matrices stored,
/// the crate's f32 softmax (`softmax_forward_host`, `softmax_backward_host`) between them.
/// Returns (out, lse, dq, dk, dvalues).
#[allow(clippy::type_complexity)]
fn materialised_f32(c: &Case) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    materialised(c, |p| p, true)
}

/// [`materialised_f32`] with P and dS passed through `round_p` before they multiply (the 16-bit
/// paths round them to their type); the backward only when asked.
#[allow(clippy::type_complexity)]
fn materialised(
    c: &Case,
    round_p: impl Fn(f32) -> f32,
    backward: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = c.d;
    let (t, dh, dv) = (d.t, d.dh, d.dv());
    let scale = c.scale();
    let mut out = vec![0.0f32; d.bh * t * dv];
    let mut lse = vec![0.0f32; d.bh * t];
    let mut dq = vec![0.0f32; d.bh * t * dh];
    let mut dk = vec![0.0f32; d.bh * t * dh];
    let mut dvv = vec![0.0f32; d.bh * t * dv];
    let one = Batch::single();
    for bh in 0..d.bh {
        let q = &c.q[bh * t * dh..][..t * dh];
        let k = &c.k[bh * t * dh..][..t * dh];
        let v = &c.v[bh * t * dv..][..t * dv];
        let g = &c.dout[bh * t * dv..][..t * dv];
        let mrow = c.mask.as_ref().map(|m| &m[(bh / d.heads) * t..][..t]);
        let ok = |j: usize| mrow.is_none_or(|m| m[j] != 0);
        let mut s = vec![0.0f32; t * t];
        gemm_host(false, true, t, t, dh, 1.0, q, k, 0.0, &mut s, one);
        let mut p = vec![0.0f32; t * t];
        softmax_forward_host(&s, &mut p, t, scale, mrow, t);
        p.iter_mut().for_each(|x| *x = round_p(*x));
        gemm_host(
            false,
            false,
            t,
            dv,
            t,
            1.0,
            &p,
            v,
            0.0,
            &mut out[bh * t * dv..][..t * dv],
            one,
        );
        for (i, lse) in lse[bh * t..][..t].iter_mut().enumerate() {
            let row = (0..t).filter(|&j| ok(j)).map(|j| scale * s[i * t + j]);
            let m = row.clone().fold(f32::NEG_INFINITY, f32::max);
            *lse = if m == f32::NEG_INFINITY {
                f32::INFINITY
            } else {
                m + row.map(|x| (x - m).exp()).sum::<f32>().ln()
            };
        }
        if !backward {
            continue;
        }
        // dP = dout values^T; dS (of the unscaled scores) = scale P (dP - rowsum(P dP)).
        let mut dp = vec![0.0f32; t * t];
        gemm_host(false, true, t, t, dv, 1.0, g, v, 0.0, &mut dp, one);
        let mut ds = vec![0.0f32; t * t];
        softmax_backward_host(&p, &dp, &mut ds, t, scale);
        // The 16-bit paths also round dS before it multiplies k and q (identity for f32).
        ds.iter_mut().for_each(|x| *x = round_p(*x));
        gemm_host(
            false,
            false,
            t,
            dh,
            t,
            1.0,
            &ds,
            k,
            0.0,
            &mut dq[bh * t * dh..][..t * dh],
            one,
        );
        gemm_host(
            true,
            false,
            t,
            dh,
            t,
            1.0,
            &ds,
            q,
            0.0,
            &mut dk[bh * t * dh..][..t * dh],
            one,
        );
        gemm_host(
            true,
            false,
            t,
            dv,
            t,
            1.0,
            &p,
            g,
            0.0,
            &mut dvv[bh * t * dv..][..t * dv],
            one,
        );
    }
    (out, lse, dq, dk, dvv)
}

fn max_abs_err(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .filter(|(_, w)| w.is_finite())
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max)
}

/// FlashAttention-2's rule for one output: fused error <= 2 x materialised f32 error + floor,
/// element by element (NaN fails).
fn check_rule(what: &str, fused: &[f32], mat: &[f32], want: &[f64]) -> Result<()> {
    check_rule_with(what, fused, mat, 0.0, want)
}

/// As [`check_rule`], with `storage` allowed on top: what the f32 storage of the forward's
/// outputs alone costs the backward (see the module docs).
fn check_rule_with(
    what: &str,
    fused: &[f32],
    mat: &[f32],
    storage: f64,
    want: &[f64],
) -> Result<()> {
    let bound = 2.0 * max_abs_err(mat, want) + storage + FLOOR;
    assert_close(what, fused, want, bound, 0.0)?;
    Ok(())
}

/// lse: +inf exactly where every key is masked, the rule elsewhere.
fn check_lse(what: &str, fused: &[f32], mat: &[f32], want: &[f64]) -> Result<()> {
    let finite: Vec<usize> = (0..want.len()).filter(|&i| want[i].is_finite()).collect();
    for (i, (&g, &w)) in fused.iter().zip(want).enumerate() {
        if !w.is_finite() {
            ensure!(
                g == f32::INFINITY,
                "{what}: lse[{i}] is {g} for a query with every key masked, expected +inf"
            );
        }
    }
    let pick = |v: &[f32]| finite.iter().map(|&i| v[i]).collect::<Vec<f32>>();
    let w: Vec<f64> = finite.iter().map(|&i| want[i]).collect();
    check_rule(what, &pick(fused), &pick(mat), &w)
}

/// The whole comparison for one case.
fn check_case(dev: &Device, c: &Case, backward: bool) -> Result<()> {
    check_case_mode(dev, c, backward, EqsdpaBackwardMode::Deterministic)
}

/// [`check_case`] with the backward in `mode`.
fn check_case_mode(dev: &Device, c: &Case, backward: bool, mode: EqsdpaBackwardMode) -> Result<()> {
    let f = run_fused_mode(dev, c, backward, mode)?;
    let r = eqsdpa_reference_host(
        &to64(&c.q),
        &to64(&c.k),
        &to64(&c.v),
        c.mask.as_deref(),
        c.d,
        c.scale() as f64,
        backward.then(|| to64(&c.dout)).as_deref(),
    );
    let (mo, ml, mdq, mdk, mdv) = materialised_f32(c);
    let name = c.name();
    let report = |what: &str, fused: &[f32], mat: &[f32], want: &[f64]| {
        println!(
            "{dev:?} {name} {what}: fused err {:.3e}, materialised f32 err {:.3e}",
            max_abs_err(fused, want),
            max_abs_err(mat, want)
        )
    };
    report("out", &f.out, &mo, &r.out);
    check_rule(&format!("out, {name}"), &f.out, &mo, &r.out)?;
    check_lse(&format!("lse, {name}"), &f.lse, &ml, &r.lse)?;
    if backward {
        // The exact (f64) backward of the fused f32 out and lse: its error is what their f32
        // storage alone costs.
        let mut st = (
            vec![0.0; c.q.len()],
            vec![0.0; c.k.len()],
            vec![0.0; c.v.len()],
        );
        eqsdpa_backward_host(
            &to64(&c.q),
            &to64(&c.k),
            &to64(&c.v),
            &to64(&f.out),
            &to64(&f.lse),
            &to64(&c.dout),
            c.mask.as_deref(),
            c.d,
            c.scale() as f64,
            &mut st.0,
            &mut st.1,
            &mut st.2,
        );
        let err = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max)
        };
        let (sq, sk, sv) = (err(&st.0, &r.dq), err(&st.1, &r.dk), err(&st.2, &r.dvalues));
        report("dq", &f.dq, &mdq, &r.dq);
        report("dk", &f.dk, &mdk, &r.dk);
        report("dvalues", &f.dv, &mdv, &r.dvalues);
        check_rule_with(&format!("dq, {name}"), &f.dq, &mdq, sq, &r.dq)?;
        check_rule_with(&format!("dk, {name}"), &f.dk, &mdk, sk, &r.dk)?;
        check_rule_with(&format!("dvalues, {name}"), &f.dv, &mdv, sv, &r.dvalues)?;
    }
    Ok(())
}

/// (frames, heads, T) of the accuracy tests per dh; larger T on cpu only (emu runs every GPU
/// thread as a fiber).
fn shapes(dev: &Device) -> Vec<(usize, usize, usize)> {
    let mut s = vec![(2, 1, 1), (1, 3, 7), (2, 1, 64), (1, 3, 200)];
    if matches!(dev, Device::Cpu) {
        s.push((1, 3, 1000));
    }
    s
}

device_test!(eqsdpa_matches_reference, |dev| {
    let mut rng = Rng::for_test("eqsdpa_matches_reference");
    for dh in [8, 16, 32, 64] {
        for (frames, heads, t) in shapes(dev) {
            let c = Case::new(&mut rng, frames, heads, t, dh, false);
            check_case(dev, &c, true)?;
        }
    }
    Ok(())
});

device_test!(eqsdpa_masked_matches_reference, |dev| {
    let mut rng = Rng::for_test("eqsdpa_masked_matches_reference");
    for dh in [8, 16, 32, 64] {
        for (frames, heads, t) in [(3, 1, 7), (2, 3, 64), (2, 1, 200)] {
            let c = Case::new(&mut rng, frames, heads, t, dh, true);
            check_case(dev, &c, true)?;
        }
    }
    Ok(())
});

/// One long ragged masked sequence, forward and backward: cpu only (the f64 reference is
/// quadratic, and emu runs every GPU thread as a fiber).
#[test]
fn eqsdpa_long_sequence_matches_reference_on_cpu() {
    let mut rng = Rng::for_test("eqsdpa_long_sequence_matches_reference_on_cpu");
    let c = Case::new(&mut rng, 1, 1, 4099, 16, true);
    check_case(&Device::Cpu, &c, true).unwrap();
}

device_test!(eqsdpa_masked_keys_change_nothing, |dev| {
    let mut rng = Rng::for_test("eqsdpa_masked_keys_change_nothing");
    for dh in [8, 16, 64] {
        let c = Case::new(&mut rng, 3, 2, 45, dh, true);
        let a = run_fused(dev, &c, true)?;
        // New contents, much larger, for every masked key's k and values.
        let mut c2 = Case {
            mask: c.mask.clone(),
            dout: c.dout.clone(),
            ..c
        };
        let (d, m) = (c2.d, c2.mask.clone().unwrap());
        for bh in 0..d.bh {
            for j in 0..d.t {
                if m[(bh / d.heads) * d.t + j] == 0 {
                    for x in &mut c2.k[(bh * d.t + j) * d.dh..][..d.dh] {
                        *x = 100.0 * rng.normal() as f32;
                    }
                    for x in &mut c2.v[(bh * d.t + j) * d.dv()..][..d.dv()] {
                        *x = 1e4 * rng.normal() as f32;
                    }
                }
            }
        }
        let b = run_fused(dev, &c2, true)?;
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        for (what, x, y) in [
            ("out", &a.out, &b.out),
            ("lse", &a.lse, &b.lse),
            ("dq", &a.dq, &b.dq),
            ("dk", &a.dk, &b.dk),
            ("dvalues", &a.dv, &b.dv),
        ] {
            ensure!(
                bits(x) == bits(y),
                "{what} (dh {dh}) changed when only masked keys' contents changed"
            );
        }
        // Masked keys get exactly zero gradients; fully masked frame (frame 0): zeros, lse +inf.
        for bh in 0..d.bh {
            let frame = bh / d.heads;
            for j in 0..d.t {
                let masked = m[frame * d.t + j] == 0;
                let row = bh * d.t + j;
                if masked {
                    ensure!(
                        a.dk[row * d.dh..][..d.dh].iter().all(|&x| x == 0.0)
                            && a.dv[row * d.dv()..][..d.dv()].iter().all(|&x| x == 0.0),
                        "dk/dvalues of masked key {j} of bh {bh} are not 0"
                    );
                }
                if frame == 0 {
                    ensure!(
                        a.lse[row] == f32::INFINITY
                            && a.out[row * d.dv()..][..d.dv()].iter().all(|&x| x == 0.0)
                            && a.dq[row * d.dh..][..d.dh].iter().all(|&x| x == 0.0),
                        "fully masked frame: query {j} of bh {bh} has lse {} and nonzero out or dq",
                        a.lse[row]
                    );
                }
            }
        }
        for (what, x) in [
            ("out", &a.out),
            ("dq", &a.dq),
            ("dk", &a.dk),
            ("dvalues", &a.dv),
        ] {
            ensure!(
                x.iter().all(|v| v.is_finite()),
                "{what} holds a non-finite value"
            );
        }
    }
    Ok(())
});

device_test!(eqsdpa_is_deterministic, |dev| {
    let mut rng = Rng::for_test("eqsdpa_is_deterministic");
    for dh in [8, 16, 32, 64] {
        let c = Case::new(&mut rng, 2, 3, 77, dh, true);
        let a = run_fused(dev, &c, true)?;
        let b = run_fused(dev, &c, true)?;
        for (what, x, y) in [
            ("out", &a.out, &b.out),
            ("lse", &a.lse, &b.lse),
            ("dq", &a.dq, &b.dq),
            ("dk", &a.dk, &b.dk),
            ("dvalues", &a.dv, &b.dv),
        ] {
            ensure!(
                x.iter()
                    .zip(y.iter())
                    .all(|(p, q)| p.to_bits() == q.to_bits()),
                "{what} (dh {dh}) differs between two runs"
            );
        }
    }
    Ok(())
});

device_test!(eqsdpa_rejects_bad_shapes, |dev| {
    let z = |s: &[usize]| Tensor::<f32>::zeros(dev, s);
    // dh = 12 is not supported.
    let (mut out, mut lse) = (z(&[2, 5, 48])?, z(&[2, 5])?);
    let q = z(&[2, 5, 12])?;
    let err = eqsdpa_forward(&q, &q, &z(&[2, 5, 48])?, None, 1, 1.0, &mut out, &mut lse)
        .expect_err("dh = 12");
    ensure!(format!("{err:#}").contains("dh = 12"), "{err:#}");
    // dh = 8 is f32 only: the 16-bit (tensor-core) ops reject it and point to the f32 ones.
    let (mut out, mut lse) = (z(&[2, 5, 32])?, z(&[2, 5])?);
    let qh = Tensor::<half::bf16>::zeros(dev, &[2, 5, 8])?;
    let vh = Tensor::<half::bf16>::zeros(dev, &[2, 5, 32])?;
    let err = eqsdpa_forward_half(&qh, &qh, &vh, None, 1, 1.0, &mut out, &mut lse)
        .expect_err("bf16 dh = 8");
    let msg = format!("{err:#}");
    ensure!(
        msg.contains("eqsdpa_forward_half") && msg.contains("dh = 8") && msg.contains("f32"),
        "{msg}"
    );
    let (mut dq, mut dk, mut dv) = (z(&[2, 5, 8])?, z(&[2, 5, 8])?, z(&[2, 5, 32])?);
    let qh = Tensor::<half::f16>::zeros(dev, &[2, 5, 8])?;
    let vh = Tensor::<half::f16>::zeros(dev, &[2, 5, 32])?;
    let err = eqsdpa_backward_half(
        &qh,
        &qh,
        &vh,
        &out,
        &lse,
        &out,
        None,
        1,
        1.0,
        &mut dq,
        &mut dk,
        &mut dv,
        EqsdpaBackwardMode::Deterministic,
    )
    .expect_err("f16 dh = 8");
    let msg = format!("{err:#}");
    ensure!(
        msg.contains("eqsdpa_backward_half") && msg.contains("dh = 8") && msg.contains("f32"),
        "{msg}"
    );
    // k of another shape.
    let q = z(&[2, 5, 16])?;
    let (mut out, mut lse) = (z(&[2, 5, 64])?, z(&[2, 5])?);
    let err = eqsdpa_forward(
        &q,
        &z(&[2, 6, 16])?,
        &z(&[2, 5, 64])?,
        None,
        1,
        1.0,
        &mut out,
        &mut lse,
    )
    .expect_err("k shape");
    ensure!(format!("{err:#}").contains("k has shape"), "{err:#}");
    // values not 4 dh wide.
    let err = eqsdpa_forward(&q, &q, &z(&[2, 5, 48])?, None, 1, 1.0, &mut out, &mut lse)
        .expect_err("values shape");
    ensure!(format!("{err:#}").contains("values has shape"), "{err:#}");
    // heads not dividing BH, and a mask of the wrong size.
    let v = z(&[2, 5, 64])?;
    let err = eqsdpa_forward(&q, &q, &v, None, 3, 1.0, &mut out, &mut lse).expect_err("heads");
    ensure!(format!("{err:#}").contains("heads"), "{err:#}");
    let m = Tensor::<u8>::zeros(dev, &[2, 4])?;
    let err = eqsdpa_forward(&q, &q, &v, Some(&m), 1, 1.0, &mut out, &mut lse).expect_err("mask");
    ensure!(format!("{err:#}").contains("mask has shape"), "{err:#}");
    let mut small = z(&[2, 4])?;
    let err = eqsdpa_forward(&q, &q, &v, None, 1, 1.0, &mut out, &mut small).expect_err("lse");
    ensure!(format!("{err:#}").contains("lse has shape"), "{err:#}");
    Ok(())
});

/// Central differences of L = sum(w * out) on the f64 CPU twin (and on the f64 reference)
/// against their backward passes, for q, k and values, with a padded key; dh = 8 and 16.
#[test]
fn eqsdpa_gradients_match_finite_differences() {
    let mut rng = Rng::for_test("eqsdpa_gradients_match_finite_differences");
    for dh in [8, 16] {
        let d = EqsdpaDims {
            bh: 4,
            t: 5,
            dh,
            heads: 2,
        };
        let (n, nv) = (d.bh * d.t * d.dh, d.bh * d.t * d.dv());
        let gen = |rng: &mut Rng, n: usize| (0..n).map(|_| rng.normal()).collect::<Vec<f64>>();
        let (q, k, v, w) = (
            gen(&mut rng, n),
            gen(&mut rng, n),
            gen(&mut rng, nv),
            gen(&mut rng, nv),
        );
        // Frame 0: key 3 padded; frame 1: keys 0 and 4 padded.
        let mask = vec![1, 1, 1, 0, 1, 0, 1, 1, 1, 0];
        let scale = 1.0 / (dh as f64).sqrt();
        let twin_out = |q: &[f64], k: &[f64], v: &[f64]| {
            let mut out = vec![0.0; nv];
            let mut lse = vec![0.0; d.bh * d.t];
            eqsdpa_forward_host(q, k, v, Some(&mask), d, scale, &mut out, &mut lse);
            (out, lse)
        };
        let loss = |out: &[f64]| out.iter().zip(&w).map(|(o, w)| o * w).sum::<f64>();
        let (out, lse) = twin_out(&q, &k, &v);
        let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; nv]);
        eqsdpa_backward_host(
            &q,
            &k,
            &v,
            &out,
            &lse,
            &w,
            Some(&mask),
            d,
            scale,
            &mut dq,
            &mut dk,
            &mut dv,
        );
        let r = eqsdpa_reference_host(&q, &k, &v, Some(&mask), d, scale, Some(&w));
        check_gradient(
            &format!("dq, dh {dh}"),
            |x| loss(&twin_out(x, &k, &v).0),
            &q,
            &dq,
            1e-6,
            1e-7,
        )
        .unwrap();
        check_gradient(
            &format!("dk, dh {dh}"),
            |x| loss(&twin_out(&q, x, &v).0),
            &k,
            &dk,
            1e-6,
            1e-7,
        )
        .unwrap();
        check_gradient(
            &format!("dvalues, dh {dh}"),
            |x| loss(&twin_out(&q, &k, x).0),
            &v,
            &dv,
            1e-6,
            1e-7,
        )
        .unwrap();
        // The reference's textbook backward agrees with the twin's FlashAttention-2 one.
        for (what, a, b) in [
            ("out", &out, &r.out),
            ("lse", &lse, &r.lse),
            ("dq", &dq, &r.dq),
            ("dk", &dk, &r.dk),
            ("dvalues", &dv, &r.dvalues),
        ] {
            let worst = a
                .iter()
                .zip(b.iter())
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            assert!(
                worst < 1e-12,
                "{what} (dh {dh}): twin and reference differ by {worst}"
            );
        }
    }
}

kernel_test!(eqsdpa_blocks_loop_over_many_tiles, |dev| {
    // Two blocks per launch: each walks half of the (bh, tile) pairs, reusing its shared memory
    // from tile to tile. The results must be those of one block per tile, bit for bit.
    let mut rng = Rng::for_test("eqsdpa_blocks_loop_over_many_tiles");
    for dh in [8, 16, 32, 64] {
        let c = Case::new(&mut rng, 2, 2, 70, dh, true);
        let a = run_fused(dev, &c, true)?;
        set_max_blocks(2);
        let b = run_fused(dev, &c, true);
        set_max_blocks(0);
        let b = b?;
        for (what, x, y) in [
            ("out", &a.out, &b.out),
            ("lse", &a.lse, &b.lse),
            ("dq", &a.dq, &b.dq),
            ("dk", &a.dk, &b.dk),
            ("dvalues", &a.dv, &b.dv),
        ] {
            ensure!(
                x.iter()
                    .zip(y.iter())
                    .all(|(p, q)| p.to_bits() == q.to_bits()),
                "{what} (dh {dh}) differs when blocks loop over several tiles"
            );
        }
    }
    Ok(())
});

/// The 16-bit forward on one device: against the f64 reference on the rounded inputs, within
/// twice the error of a materialised attention at the same precision (scores of the 16-bit values
/// summed in f32, as the tensor cores do; the f32 softmax; P rounded to the 16-bit type; P values
/// summed in f32) plus the floor; fully masked rows 0 with lse +inf.
fn half_forward_matches<T: HalfFloat>(
    dev: &Device,
    rng: &mut Rng,
    from: fn(f32) -> T,
    type_name: &str,
) -> Result<()> {
    let shapes = [
        (2, 1, 1, false),
        (1, 3, 7, false),
        (2, 1, 64, true),
        (1, 3, 200, false),
        (3, 1, 200, true),
    ];
    for dh in [16, 32, 64] {
        for (frames, heads, t, masked) in shapes {
            let c = Case::new(rng, frames, heads, t, dh, masked);
            let d = c.d;
            let round = |v: &[f32]| -> (Vec<T>, Vec<f32>) {
                let h: Vec<T> = v.iter().map(|&x| from(x)).collect();
                let w = h.iter().map(|x| x.to_f32()).collect();
                (h, w)
            };
            let (qh, qw) = round(&c.q);
            let (kh, kw) = round(&c.k);
            let (vh, vw) = round(&c.v);
            let qs = [d.bh, d.t, d.dh];
            let vs = [d.bh, d.t, d.dv()];
            let q = Tensor::from_slice(dev, &qs, &qh)?;
            let k = Tensor::from_slice(dev, &qs, &kh)?;
            let v = Tensor::from_slice(dev, &vs, &vh)?;
            let mask = match &c.mask {
                Some(m) => Some(Tensor::from_slice(dev, &[d.frames(), d.t], m)?),
                None => None,
            };
            let mut out = Tensor::zeros(dev, &vs)?;
            let mut lse = Tensor::zeros(dev, &[d.bh, d.t])?;
            out.poison()?;
            lse.poison()?;
            eqsdpa_forward_half(
                &q,
                &k,
                &v,
                mask.as_ref(),
                d.heads,
                c.scale(),
                &mut out,
                &mut lse,
            )?;
            let r = eqsdpa_reference_host(
                &to64(&qw),
                &to64(&kw),
                &to64(&vw),
                c.mask.as_deref(),
                d,
                c.scale() as f64,
                None,
            );
            let wide = Case {
                q: qw,
                k: kw,
                v: vw,
                ..c
            };
            let (mo, ml, ..) = materialised(&wide, |p| from(p).to_f32(), false);
            let name = format!("{type_name} {}", wide.name());
            check_rule(&format!("out, {name}"), &out.to_vec()?, &mo, &r.out)?;
            check_lse(&format!("lse, {name}"), &lse.to_vec()?, &ml, &r.lse)?;
        }
    }
    Ok(())
}

device_test!(eqsdpa_bf16_forward_matches_reference, |dev| {
    let mut rng = Rng::for_test("eqsdpa_bf16_forward_matches_reference");
    half_forward_matches(dev, &mut rng, half::bf16::from_f32, "bf16")
});

device_test!(eqsdpa_f16_forward_matches_reference, |dev| {
    let mut rng = Rng::for_test("eqsdpa_f16_forward_matches_reference");
    half_forward_matches(dev, &mut rng, half::f16::from_f32, "f16")
});

/// Largest |x|, for a tolerance relative to an output's size.
fn max_abs(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64).abs()).fold(0.0, f64::max)
}

// The atomic-dq mode against the deterministic one: dk and dvalues bit for bit (the same
// arithmetic), dq within f32 rounding (only the order of its sums over key tiles differs); and
// against the reference by the accuracy rule. On cpu both modes run the deterministic twin.
device_test!(eqsdpa_atomic_dq_matches_deterministic, |dev| {
    let mut rng = Rng::for_test("eqsdpa_atomic_dq_matches_deterministic");
    let atomic = EqsdpaBackwardMode::AtomicDq;
    for dh in [8, 16, 32, 64] {
        for (frames, heads, t) in [(1, 1, 1), (2, 3, 77)] {
            let c = Case::new(&mut rng, frames, heads, t, dh, frames > 1);
            let a = run_fused(dev, &c, true)?;
            let b = run_fused_mode(dev, &c, true, atomic)?;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            ensure!(
                bits(&a.dk) == bits(&b.dk) && bits(&a.dv) == bits(&b.dv),
                "atomic mode: dk or dvalues differ from the deterministic mode ({})",
                c.name()
            );
            // Each dq element is a sum over the key tiles (16 to 64 keys, by dh) in both modes,
            // in another order: a few f32 ulps of the largest partial sums.
            let tol = 1e-5 * max_abs(&a.dq) + 1e-7;
            assert_close(
                &format!("atomic dq vs deterministic, {}", c.name()),
                &b.dq,
                &to64(&a.dq),
                tol,
                0.0,
            )?;
            check_case_mode(dev, &c, true, atomic)?;
        }
    }
    Ok(())
});

/// Rounds through a 16-bit type: (the 16-bit values, the same values in f32).
fn round_half<T: HalfFloat>(v: &[f32], from: fn(f32) -> T) -> (Vec<T>, Vec<f32>) {
    let h: Vec<T> = v.iter().map(|&x| from(x)).collect();
    let w = h.iter().map(|x| x.to_f32()).collect();
    (h, w)
}

/// The 16-bit backward on one device, after the 16-bit forward on the same device: against the
/// f64 reference on the rounded inputs (dout rounded too, as the kernels round it), each
/// gradient within twice the error of a materialised attention at the same precision (f32 sums
/// of 16-bit products, P and dS rounded to the type before they multiply) plus what the f32
/// storage of the 16-bit forward's out and lse costs (the f64 backward evaluated on them; see
/// the module docs) plus the floor. Masked keys get exactly zero dk and dvalues, a fully masked
/// frame zero dq. The atomic mode must agree with the deterministic one to f32 rounding.
fn half_backward_matches<T: HalfFloat>(
    dev: &Device,
    rng: &mut Rng,
    from: fn(f32) -> T,
    type_name: &str,
) -> Result<()> {
    let shapes = [
        (2, 1, 1, false),
        (1, 3, 7, false),
        (3, 1, 40, true),
        (1, 2, 100, false),
    ];
    for dh in [16, 32, 64] {
        for (frames, heads, t, masked) in shapes {
            let c = Case::new(rng, frames, heads, t, dh, masked);
            let d = c.d;
            let (qh, qw) = round_half(&c.q, from);
            let (kh, kw) = round_half(&c.k, from);
            let (vh, vw) = round_half(&c.v, from);
            let (_, ow) = round_half(&c.dout, from);
            let qs = [d.bh, d.t, d.dh];
            let vs = [d.bh, d.t, d.dv()];
            let q = Tensor::from_slice(dev, &qs, &qh)?;
            let k = Tensor::from_slice(dev, &qs, &kh)?;
            let v = Tensor::from_slice(dev, &vs, &vh)?;
            let dout = Tensor::from_slice(dev, &vs, &ow)?;
            let mask = match &c.mask {
                Some(m) => Some(Tensor::from_slice(dev, &[d.frames(), d.t], m)?),
                None => None,
            };
            let mut out = Tensor::zeros(dev, &vs)?;
            let mut lse = Tensor::zeros(dev, &[d.bh, d.t])?;
            eqsdpa_forward_half(
                &q,
                &k,
                &v,
                mask.as_ref(),
                d.heads,
                c.scale(),
                &mut out,
                &mut lse,
            )?;
            let scale = c.scale();
            let run = |mode| -> Result<[Vec<f32>; 3]> {
                let mut dq = Tensor::zeros(dev, &qs)?;
                let mut dk = Tensor::zeros(dev, &qs)?;
                let mut dv = Tensor::zeros(dev, &vs)?;
                dq.poison()?;
                dk.poison()?;
                dv.poison()?;
                eqsdpa_backward_half(
                    &q,
                    &k,
                    &v,
                    &out,
                    &lse,
                    &dout,
                    mask.as_ref(),
                    d.heads,
                    scale,
                    &mut dq,
                    &mut dk,
                    &mut dv,
                    mode,
                )?;
                Ok([dq.to_vec()?, dk.to_vec()?, dv.to_vec()?])
            };
            let [fdq, fdk, fdv] = run(EqsdpaBackwardMode::Deterministic)?;
            let (fout, flse) = (out.to_vec()?, lse.to_vec()?);
            let r = eqsdpa_reference_host(
                &to64(&qw),
                &to64(&kw),
                &to64(&vw),
                c.mask.as_deref(),
                d,
                c.scale() as f64,
                Some(&to64(&ow)),
            );
            let mut st = (
                vec![0.0; qw.len()],
                vec![0.0; kw.len()],
                vec![0.0; vw.len()],
            );
            eqsdpa_backward_host(
                &to64(&qw),
                &to64(&kw),
                &to64(&vw),
                &to64(&fout),
                &to64(&flse),
                &to64(&ow),
                c.mask.as_deref(),
                d,
                c.scale() as f64,
                &mut st.0,
                &mut st.1,
                &mut st.2,
            );
            let err = |a: &[f64], b: &[f64]| {
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max)
            };
            let wide = Case {
                q: qw,
                k: kw,
                v: vw,
                dout: ow,
                ..c
            };
            let (_, _, mdq, mdk, mdv) = materialised(&wide, |p| from(p).to_f32(), true);
            let name = format!("{type_name} {}", wide.name());
            for (what, fused, mat, want, storage) in [
                ("dq", &fdq, &mdq, &r.dq, err(&st.0, &r.dq)),
                ("dk", &fdk, &mdk, &r.dk, err(&st.1, &r.dk)),
                ("dvalues", &fdv, &mdv, &r.dvalues, err(&st.2, &r.dvalues)),
            ] {
                println!(
                    "{name} {what}: fused err {:.3e}, materialised err {:.3e}, storage {:.3e}",
                    max_abs_err(fused, want),
                    max_abs_err(mat, want),
                    storage
                );
                check_rule_with(
                    &format!("{what}, {name}"),
                    fused,
                    mat,
                    storage + HALF_FLOOR,
                    want,
                )?;
            }
            if let Some(m) = &wide.mask {
                for bh in 0..d.bh {
                    let frame = bh / d.heads;
                    for j in 0..d.t {
                        let row = bh * d.t + j;
                        if m[frame * d.t + j] == 0 {
                            ensure!(
                                fdk[row * d.dh..][..d.dh].iter().all(|&x| x == 0.0)
                                    && fdv[row * d.dv()..][..d.dv()].iter().all(|&x| x == 0.0),
                                "{name}: dk/dvalues of masked key {j} of bh {bh} are not 0"
                            );
                        }
                        if frame == 0 {
                            ensure!(
                                fdq[row * d.dh..][..d.dh].iter().all(|&x| x == 0.0),
                                "{name}: fully masked frame, dq of query {j} of bh {bh} is not 0"
                            );
                        }
                    }
                }
            }
            let [adq, adk, adv] = run(EqsdpaBackwardMode::AtomicDq)?;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            ensure!(
                bits(&adk) == bits(&fdk) && bits(&adv) == bits(&fdv),
                "{name}: atomic mode's dk or dvalues differ from the deterministic mode"
            );
            assert_close(
                &format!("atomic dq vs deterministic, {name}"),
                &adq,
                &to64(&fdq),
                1e-5 * max_abs(&fdq) + 1e-7,
                0.0,
            )?;
        }
    }
    Ok(())
}

device_test!(eqsdpa_bf16_backward_matches_reference, |dev| {
    let mut rng = Rng::for_test("eqsdpa_bf16_backward_matches_reference");
    half_backward_matches(dev, &mut rng, half::bf16::from_f32, "bf16")
});

device_test!(eqsdpa_f16_backward_matches_reference, |dev| {
    let mut rng = Rng::for_test("eqsdpa_f16_backward_matches_reference");
    half_backward_matches(dev, &mut rng, half::f16::from_f32, "f16")
});

/// The CPU twin's vectorisable exp: within 2e-7 relative of exp in f64 over the range softmax
/// uses, exactly 0 at -inf and below -87, exactly 1 at 0.
#[test]
fn exp_f32_is_accurate() {
    use hiermd::ops::eqsdpa::exp_f32;
    let mut worst = 0.0f64;
    let mut x = -87.0f32;
    while x <= 10.0 {
        let want = (x as f64).exp();
        let got = exp_f32(x) as f64;
        worst = worst.max(((got - want) / want).abs());
        x += 0.000_731;
    }
    assert!(worst < 2e-7, "worst relative error {worst:e}");
    assert_eq!(exp_f32(0.0), 1.0);
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_f32(-100.0), 0.0);
}
