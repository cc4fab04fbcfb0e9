//! Token layout ops (src/ops/tokens.rs, cuda/tokens.cu) on every device against the f64 CPU twins;
//! every backward against central differences and as the exact adjoint of its forward
//! (`<dy, F x> == <F^T dy, x>`).

use anyhow::{ensure, Result};
use hiermd::ops::tokens::{self as tk, Pool, TokenDims};
use hiermd::testing::{assert_close, check_gradient, Rng};
use hiermd::{device_test, Device, Tensor};

const BS: [usize; 2] = [1, 3];
const TS: [usize; 3] = [1, 7, 214];
const CS: [usize; 2] = [1, 3];
const HS: [usize; 3] = [8, 33, 64];
const WS: [usize; 4] = [1, 2, 3, 8];
const HEADS: [usize; 3] = [1, 2, 4];

/// Every (B, T, C, H) of the test grid.
fn all_dims() -> impl Iterator<Item = TokenDims> {
    BS.into_iter().flat_map(|b| {
        TS.into_iter().flat_map(move |t| {
            CS.into_iter()
                .flat_map(move |c| HS.into_iter().map(move |h| TokenDims::new(b, t, c, h)))
        })
    })
}

/// The tensor shape of a token tensor: scalars are written `[B, T, H]` for odd T (as the model
/// stores them) and `[B, T, 1, H]` otherwise, so both spellings are exercised.
fn shape(d: TokenDims) -> Vec<usize> {
    if d.c == 1 && d.t % 2 == 1 {
        vec![d.b, d.t, d.h]
    } else {
        d.shape().to_vec()
    }
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn dot32(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

/// `<dy, F x>` against `<F^T dy, x>`: equal up to the rounding of two sums of the same products.
fn check_adjoint(what: &str, lhs: f64, rhs: f64, scale: f64) -> Result<()> {
    ensure!(
        (lhs - rhs).abs() <= 1e-12 * scale.max(1.0),
        "{what}: <dy, F x> = {lhs} but <F^T dy, x> = {rhs}"
    );
    Ok(())
}

/// A token mask `[B, T]` (nonzero = valid, with several nonzero values) that covers the cases
/// the ops distinguish: frame 0 has a valid prefix (trailing padding), frame 1 no valid token at
/// all, frame 2 random tokens with token 0 masked.
fn test_mask(rng: &mut Rng, b: usize, t: usize) -> Vec<u8> {
    let mut m = vec![0u8; b * t];
    for (f, frame) in m.chunks_mut(t).enumerate() {
        match f % 3 {
            0 => {
                let n = 1 + rng.below(t);
                frame[..n]
                    .iter_mut()
                    .for_each(|v| *v = 1 + rng.below(200) as u8);
            }
            1 => {}
            _ => {
                for v in frame.iter_mut() {
                    *v = if rng.uniform() < 0.5 { 0 } else { 7 };
                }
                frame[0] = 0;
            }
        }
    }
    m
}

// ------------------------------------------------------------------------------------------
// Window merger

fn gather_on(dev: &Device, x: &[f32], d: TokenDims, w: usize) -> Result<Vec<f32>> {
    let tw = tk::padded_tokens(d.t, w);
    let xt = Tensor::from_slice(dev, &shape(d), x)?;
    let mut out = Tensor::zeros(dev, &[d.b, tw, d.c, w * d.h])?;
    out.poison()?;
    tk::window_merge_gather(&xt, &mut out, w)?;
    out.to_vec()
}

fn scatter_on(dev: &Device, dout: &[f32], d: TokenDims, w: usize) -> Result<Vec<f32>> {
    let tw = tk::padded_tokens(d.t, w);
    let dt = Tensor::from_slice(dev, &[d.b, tw, d.c, w * d.h], dout)?;
    let mut dx = Tensor::zeros(dev, &shape(d))?;
    dx.poison()?;
    tk::window_merge_scatter(&dt, &mut dx, w)?;
    dx.to_vec()
}

device_test!(window_merge_gather_and_scatter_match_reference, |dev| {
    let mut rng = Rng::for_test("window_merge_gather_and_scatter_match_reference");
    for d in all_dims() {
        for w in WS {
            let tw = tk::padded_tokens(d.t, w);
            let n_out = d.b * tw * d.c * w * d.h;
            let what = format!("{d:?} w={w}");
            let x = rng.normal_vec(d.len(), 1.0);
            let dy = rng.normal_vec(n_out, 1.0);
            let mut want = vec![0.0; n_out];
            tk::window_merge_gather_host(&to64(&x), &mut want, d, w);
            let y = gather_on(dev, &x, d, w)?;
            // Pure data movement: exact.
            assert_close(&format!("window_merge_gather {what}"), &y, &want, 0.0, 0.0)?;
            let mut want_dx = vec![0.0; d.len()];
            tk::window_merge_scatter_host(&to64(&dy), &mut want_dx, d, w);
            let dx = scatter_on(dev, &dy, d, w)?;
            assert_close(
                &format!("window_merge_scatter {what}"),
                &dx,
                &want_dx,
                0.0,
                0.0,
            )?;
            check_adjoint(
                &format!("window merge {what}"),
                dot32(&dy, &y),
                dot32(&dx, &x),
                dot32(&dy, &dy).sqrt() * dot32(&x, &x).sqrt(),
            )?;
        }
    }
    Ok(())
});

#[test]
fn window_merge_layout_is_as_documented() {
    // x[b, t, c, h] = 1000 b + 100 t + 10 c + h: read the windows back from the values.
    let d = TokenDims::new(2, 7, 3, 4);
    let w = 3;
    let x: Vec<f64> = (0..d.len())
        .map(|i| {
            let (h, c, t, b) = (
                i % d.h,
                (i / d.h) % d.c,
                (i / (d.h * d.c)) % d.t,
                i / (d.h * d.c * d.t),
            );
            (1000 * b + 100 * t + 10 * c + h) as f64
        })
        .collect();
    let tw = tk::padded_tokens(d.t, w);
    assert_eq!(tw, 3);
    let mut out = vec![f64::NAN; d.b * tw * d.c * w * d.h];
    tk::window_merge_gather_host(&x, &mut out, d, w);
    for b in 0..d.b {
        for tp in 0..tw {
            for c in 0..d.c {
                for j in 0..w {
                    for h in 0..d.h {
                        let got = out[((b * tw + tp) * d.c + c) * w * d.h + j * d.h + h];
                        let t = tp * w + j;
                        let want = if t < d.t {
                            (1000 * b + 100 * t + 10 * c + h) as f64
                        } else {
                            0.0
                        };
                        assert_eq!(got, want, "b={b} t'={tp} c={c} j={j} h={h}");
                    }
                }
            }
        }
    }
}

#[test]
fn merged_token_mask_and_padded_tokens() {
    assert_eq!(tk::padded_tokens(1, 1), 1);
    assert_eq!(tk::padded_tokens(7, 2), 4);
    assert_eq!(tk::padded_tokens(214, 8), 27);
    assert_eq!(tk::padded_tokens(216, 8), 27);
    assert_eq!(tk::padded_tokens(1, 8), 1);
    // Two frames of 7 tokens, windows of 3: [0..3) [3..6) [6..7).
    let mask = [1, 0, 0, 0, 0, 0, 5, /* frame 1 */ 0, 0, 0, 0, 9, 0, 0];
    assert_eq!(tk::merged_token_mask(&mask, 7, 3), vec![1, 0, 1, 0, 1, 0]);
    assert_eq!(tk::merged_token_mask(&mask, 7, 1), {
        let m: Vec<u8> = mask.iter().map(|&m| (m != 0) as u8).collect();
        m
    });
    assert_eq!(tk::merged_token_mask(&mask, 7, 8), vec![1, 1]);
    assert!(tk::merged_token_mask(&[], 7, 3).is_empty());
    // Against a brute-force definition on random masks of every test shape.
    let mut rng = Rng::for_test("merged_token_mask_and_padded_tokens");
    for b in BS {
        for t in TS {
            for w in WS {
                let m = test_mask(&mut rng, b, t);
                let got = tk::merged_token_mask(&m, t, w);
                let tw = tk::padded_tokens(t, w);
                assert_eq!(got.len(), b * tw);
                for f in 0..b {
                    for i in 0..tw {
                        let any = (i * w..(i * w + w).min(t)).any(|t2| m[f * t + t2] != 0);
                        assert_eq!(got[f * tw + i], any as u8, "b={f} t'={i} T={t} w={w}");
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Heads

device_test!(split_and_merge_heads_match_reference, |dev| {
    let mut rng = Rng::for_test("split_and_merge_heads_match_reference");
    for d in all_dims().filter(|d| d.c == 1) {
        for heads in HEADS.into_iter().filter(|&nh| d.h % nh == 0) {
            // Scalars (C = 1, offset 0) and vectors (C = 3, offset dh) share one
            // [B, heads, T, 4 dh] value tensor, as in the attention.
            let s = d;
            let v = TokenDims { c: 3, ..d };
            let dh = d.h / heads;
            let width = 4 * dh;
            let n_out = d.b * heads * d.t * width;
            let what = format!("B={} T={} H={} heads={heads}", d.b, d.t, d.h);
            let xs = rng.normal_vec(s.len(), 1.0);
            let xv = rng.normal_vec(v.len(), 1.0);
            let xst = Tensor::from_slice(dev, &shape(s), &xs)?;
            let xvt = Tensor::from_slice(dev, &shape(v), &xv)?;
            let mut out = Tensor::zeros(dev, &[d.b, heads, d.t, width])?;
            out.poison()?;
            tk::split_heads(&xst, &mut out, heads, 0)?;
            tk::split_heads(&xvt, &mut out, heads, dh)?;
            let mut want = vec![f64::NAN; n_out];
            tk::split_heads_host(&to64(&xs), &mut want, s, heads, width, 0);
            tk::split_heads_host(&to64(&xv), &mut want, v, heads, width, dh);
            // Every column written by exactly one of the two calls (poison would show otherwise).
            let y = out.to_vec()?;
            assert_close(&format!("split_heads {what}"), &y, &want, 0.0, 0.0)?;

            // One split into a tensor with spare columns on both sides: those stay untouched.
            let (wide, off) = (3 * dh + 5, dh + 2);
            let fill = rng.normal_vec(d.b * heads * d.t * wide, 1.0);
            let mut out2 = Tensor::from_slice(dev, &[d.b, heads, d.t, wide], &fill)?;
            tk::split_heads(&xst, &mut out2, heads, off)?;
            let mut want2 = to64(&fill);
            tk::split_heads_host(&to64(&xs), &mut want2, s, heads, wide, off);
            assert_close(
                &format!("split_heads offset {off} width {wide} {what}"),
                &out2.to_vec()?,
                &want2,
                0.0,
                0.0,
            )?;

            // merge_heads reads each part back; it is the exact adjoint of split_heads.
            let dy = rng.normal_vec(n_out, 1.0);
            let dyt = Tensor::from_slice(dev, &[d.b, heads, d.t, width], &dy)?;
            for (part, off, x) in [(s, 0, &xs), (v, dh, &xv)] {
                let mut dx = Tensor::zeros(dev, &shape(part))?;
                dx.poison()?;
                tk::merge_heads(&dyt, &mut dx, heads, off)?;
                let dx = dx.to_vec()?;
                let mut want = vec![0.0; part.len()];
                tk::merge_heads_host(&to64(&dy), &mut want, part, heads, width, off);
                assert_close(
                    &format!("merge_heads C={} {what}", part.c),
                    &dx,
                    &want,
                    0.0,
                    0.0,
                )?;
                // <dy, split(x)> over the columns split writes (the others are zero in F x).
                let mut fx = vec![0.0f32; n_out];
                tk::split_heads_host(x, &mut fx, part, heads, width, off);
                check_adjoint(
                    &format!("heads C={} {what}", part.c),
                    dot32(&dy, &fx),
                    dot32(&dx, x),
                    dot32(&dy, &dy).sqrt() * dot32(x, x).sqrt(),
                )?;
            }
            // And merging what was split gives the tokens back.
            let mut back = Tensor::zeros(dev, &shape(v))?;
            tk::merge_heads(&out, &mut back, heads, dh)?;
            assert_close(
                &format!("merge(split(x)) {what}"),
                &back.to_vec()?,
                &to64(&xv),
                0.0,
                0.0,
            )?;
        }
    }
    Ok(())
});

// ------------------------------------------------------------------------------------------
// Position encoding

device_test!(position_encoding_add_matches_reference, |dev| {
    let mut rng = Rng::for_test("position_encoding_add_matches_reference");
    // T up to 20,000: sin and cos of f32 arguments up to 2e4 (the angle is the same f32 on every
    // device; see position_encoding_host).
    let mut cases: Vec<(usize, usize, usize)> = Vec::new();
    for b in BS {
        for t in TS {
            for h in HS {
                cases.push((b, t, h));
            }
        }
    }
    cases.push((1, 20_000, 64));
    cases.push((2, 19_999, 33));
    for (b, t, h) in cases {
        let x = rng.normal_vec(b * t * h, 1.0);
        let mut want = to64(&x);
        tk::position_encoding_add_host(&mut want, b, t, h);
        let shape = if t % 2 == 0 {
            vec![b, t, h]
        } else {
            vec![b, t, 1, h]
        };
        let mut xt = Tensor::from_slice(dev, &shape, &x)?;
        tk::position_encoding_add(&mut xt)?;
        // sinf/cosf of the shared argument: within 2 ulp on the GPU (about 1.2e-7 for values
        // near 1), then one rounding of the sum.
        assert_close(
            &format!("position_encoding_add B={b} T={t} H={h}"),
            &xt.to_vec()?,
            &want,
            2.5e-7,
            1.2e-7,
        )?;
    }
    Ok(())
});

#[test]
fn position_encoding_values() {
    // Token 0: sin 0 = 0, cos 0 = 1; odd H: the last channel is a sin term.
    for h in HS {
        let pe = tk::position_encoding_host::<f64>(3, h);
        for (k, &v) in pe[..h].iter().enumerate() {
            assert_eq!(v, if k % 2 == 0 { 0.0 } else { 1.0 }, "H={h} k={k}");
        }
        if h % 2 == 1 {
            let a = 2.0f64 * 10000f64.powf(-((h - 1) as f64) / h as f64);
            assert!((pe[2 * h + h - 1] - a.sin()).abs() < 1e-6, "odd H {h}");
        }
    }
    // Channel pair 0 has frequency 1, so its f32 angle t is exact: sin t and cos t to f64
    // precision, even at t = 20,000.
    let (t, h) = (20_001, 64);
    let pe = tk::position_encoding_host::<f64>(t, h);
    for tt in [1, 7, 214, 19_999, 20_000] {
        let x = tt as f64;
        assert!((pe[tt * h] - x.sin()).abs() < 1e-15, "t={tt}");
        assert!((pe[tt * h + 1] - x.cos()).abs() < 1e-15, "t={tt}");
    }
    // Elsewhere the encoding is that of the f32 angle: within |angle| 2^-23 (the rounding of the
    // frequency and of the product) of the exact encoding, and no closer in general — which is
    // why every device shares that f32 angle instead of each rounding its own.
    let mut worst: f64 = 0.0;
    for tt in 0..t {
        for k in 0..h {
            let i2 = (k & !1) as f64;
            let a = tt as f64 / 10000f64.powf(i2 / h as f64);
            let exact = if k % 2 == 0 { a.sin() } else { a.cos() };
            let d = (pe[tt * h + k] - exact).abs();
            assert!(
                d <= a * (2f64.powi(-23) + 1e-14) + 1e-15,
                "t={tt} k={k}: {d} from the exact encoding"
            );
            worst = worst.max(d);
        }
    }
    assert!(worst > 1e-5, "the f32 angle should be visible at t ~ 2e4");
}

#[test]
fn position_encoding_gradient_is_identity() {
    // y = x + pe: dL/dx = w for L = sum(w y).
    let mut rng = Rng::for_test("position_encoding_gradient_is_identity");
    let (b, t, h) = (2, 7, 33);
    let x: Vec<f64> = (0..b * t * h).map(|_| rng.normal()).collect();
    let w: Vec<f64> = (0..b * t * h).map(|_| rng.normal()).collect();
    let loss = |x: &[f64]| {
        let mut y = x.to_vec();
        tk::position_encoding_add_host(&mut y, b, t, h);
        dot64(&y, &w)
    };
    check_gradient("position_encoding_add", loss, &x, &w, 1e-6, 1e-8).unwrap();
}

// ------------------------------------------------------------------------------------------
// Pooling

device_test!(pool_forward_and_backward_match_reference, |dev| {
    let mut rng = Rng::for_test("pool_forward_and_backward_match_reference");
    for d in all_dims() {
        let m = test_mask(&mut rng, d.b, d.t);
        for masked in [false, true] {
            for kind in [Pool::Mean, Pool::First] {
                let what = format!("{d:?} {kind:?} mask={masked}");
                let mask = masked.then_some(m.as_slice());
                let mt = Tensor::from_slice(dev, &[d.b, d.t], &m)?;
                let mt = masked.then_some(&mt);
                let x = rng.normal_vec(d.len(), 1.0);
                let dy = rng.normal_vec(d.b * d.c * d.h, 1.0);
                let out_shape = if d.c == 1 && d.t % 2 == 1 {
                    vec![d.b, d.h]
                } else {
                    vec![d.b, d.c, d.h]
                };

                let xt = Tensor::from_slice(dev, &shape(d), &x)?;
                let mut out = Tensor::zeros(dev, &out_shape)?;
                out.poison()?;
                tk::pool_forward(&xt, mt, &mut out, kind)?;
                let mut want = vec![0.0; d.b * d.c * d.h];
                tk::pool_forward_host(&to64(&x), mask, &mut want, d, kind);
                // A sequential f32 sum of T terms: error below T u max|x|.
                let max_x = x.iter().fold(0.0f64, |a, &v| a.max(v.abs() as f64));
                let atol = d.t as f64 * f32::EPSILON as f64 * max_x + 1e-7;
                let y = out.to_vec()?;
                assert_close(&format!("pool_forward {what}"), &y, &want, atol, 1e-6)?;

                let dyt = Tensor::from_slice(dev, &out_shape, &dy)?;
                let mut dx = Tensor::zeros(dev, &shape(d))?;
                dx.poison()?;
                tk::pool_backward(&dyt, mt, &mut dx, kind)?;
                let mut want_dx = vec![0.0; d.len()];
                tk::pool_backward_host(&to64(&dy), mask, &mut want_dx, d, kind);
                let dx = dx.to_vec()?;
                assert_close(&format!("pool_backward {what}"), &dx, &want_dx, 1e-7, 2e-7)?;
                // Masked and unused tokens get exactly 0.
                for (i, &g) in dx.iter().enumerate() {
                    let (b, t) = (i / (d.t * d.c * d.h), (i / (d.c * d.h)) % d.t);
                    let used =
                        mask.is_none_or(|m| m[b * d.t + t] != 0) && (kind == Pool::Mean || t == 0);
                    ensure!(used || g == 0.0, "pool_backward {what}: dx[{i}] = {g}");
                }
                // Frames without a valid token pool to 0, not NaN.
                if masked && d.b > 1 {
                    ensure!(
                        y[d.c * d.h..2 * d.c * d.h].iter().all(|&v| v == 0.0),
                        "pool_forward {what}: the fully masked frame is not 0"
                    );
                }
            }
        }
    }
    Ok(())
});

// ------------------------------------------------------------------------------------------
// Token mask

device_test!(apply_token_mask_matches_reference, |dev| {
    let mut rng = Rng::for_test("apply_token_mask_matches_reference");
    for d in all_dims() {
        let m = test_mask(&mut rng, d.b, d.t);
        let mut x = rng.normal_vec(d.len(), 1.0);
        // Padded tokens hold NaN: the mask must assign 0, not multiply.
        let row = d.c * d.h;
        for (i, v) in x.iter_mut().enumerate() {
            if m[i / row] == 0 && i % 2 == 0 {
                *v = f32::NAN;
            }
        }
        let mut want = to64(&x);
        tk::apply_token_mask_host(&mut want, &m, row);
        let mut xt = Tensor::from_slice(dev, &shape(d), &x)?;
        let mt = Tensor::from_slice(dev, &[d.b, d.t], &m)?;
        tk::apply_token_mask(&mut xt, &mt)?;
        assert_close(
            &format!("apply_token_mask {d:?}"),
            &xt.to_vec()?,
            &want,
            0.0,
            0.0,
        )?;
    }
    Ok(())
});

// ------------------------------------------------------------------------------------------
// Gradients and adjoints of the f64 twins

/// Central differences of L(x) = <w, F(x)> against the backward applied to w, and the adjoint
/// identity <w, F x> == <F^T w, x> for a linear F.
fn check_linear(
    what: &str,
    n_in: usize,
    n_out: usize,
    forward: impl Fn(&[f64], &mut [f64]),
    backward: impl Fn(&[f64], &mut [f64]),
    rng: &mut Rng,
) {
    let x: Vec<f64> = (0..n_in).map(|_| rng.normal()).collect();
    let w: Vec<f64> = (0..n_out).map(|_| rng.normal()).collect();
    let loss = |x: &[f64]| {
        let mut y = vec![0.0; n_out];
        forward(x, &mut y);
        dot64(&y, &w)
    };
    let mut g = vec![f64::NAN; n_in];
    backward(&w, &mut g);
    check_gradient(what, loss, &x, &g, 1e-6, 1e-8).unwrap();
    let scale = dot64(&x, &x).sqrt() * dot64(&w, &w).sqrt();
    check_adjoint(what, loss(&x), dot64(&g, &x), scale).unwrap();
    // A wrong backward must fail (guards the check itself).
    if let Some(i) = g.iter().position(|&v| v != 0.0) {
        g[i] *= 1.01;
        assert!(check_gradient(what, loss, &x, &g, 1e-6, 1e-8).is_err());
    }
}

#[test]
fn token_op_gradients_match_finite_differences() {
    let mut rng = Rng::for_test("token_op_gradients_match_finite_differences");
    for d in [TokenDims::new(1, 7, 3, 8), TokenDims::new(3, 7, 1, 8)] {
        for w in WS {
            let n_out = d.b * tk::padded_tokens(d.t, w) * d.c * w * d.h;
            check_linear(
                &format!("window merge {d:?} w={w}"),
                d.len(),
                n_out,
                |x, y| tk::window_merge_gather_host(x, y, d, w),
                |g, dx| tk::window_merge_scatter_host(g, dx, d, w),
                &mut rng,
            );
        }
        for heads in HEADS {
            let dh = d.h / heads;
            for (width, off) in [(d.c * dh, 0), (4 * dh + 1, dh)] {
                let n_out = d.b * heads * d.t * width;
                check_linear(
                    &format!("split_heads {d:?} heads={heads} width={width} off={off}"),
                    d.len(),
                    n_out,
                    |x, y| {
                        // F x: the written columns, the others 0.
                        y.fill(0.0);
                        tk::split_heads_host(x, y, d, heads, width, off)
                    },
                    |g, dx| tk::merge_heads_host(g, dx, d, heads, width, off),
                    &mut rng,
                );
                // merge_heads as a forward (joining head outputs): its backward is the split.
                check_linear(
                    &format!("merge_heads {d:?} heads={heads} width={width} off={off}"),
                    n_out,
                    d.len(),
                    |x, y| tk::merge_heads_host(x, y, d, heads, width, off),
                    |g, dx| {
                        dx.fill(0.0);
                        tk::split_heads_host(g, dx, d, heads, width, off)
                    },
                    &mut rng,
                );
            }
        }
        let m = test_mask(&mut rng, d.b, d.t);
        for mask in [None, Some(m.as_slice())] {
            for kind in [Pool::Mean, Pool::First] {
                check_linear(
                    &format!("pool {d:?} {kind:?} mask={}", mask.is_some()),
                    d.len(),
                    d.b * d.c * d.h,
                    |x, y| tk::pool_forward_host(x, mask, y, d, kind),
                    |g, dx| tk::pool_backward_host(g, mask, dx, d, kind),
                    &mut rng,
                );
            }
        }
        // Masking is its own adjoint: backward = the same op on the gradient.
        let row = d.c * d.h;
        check_linear(
            &format!("apply_token_mask {d:?}"),
            d.len(),
            d.len(),
            |x, y| {
                y.copy_from_slice(x);
                tk::apply_token_mask_host(y, &m, row)
            },
            |g, dx| {
                dx.copy_from_slice(g);
                tk::apply_token_mask_host(dx, &m, row)
            },
            &mut rng,
        );
    }
}

// ------------------------------------------------------------------------------------------
// Errors

fn expect_err(r: Result<()>, needle: &str) -> Result<()> {
    let err = r
        .err()
        .ok_or_else(|| anyhow::anyhow!("expected an error with {needle:?}"))?;
    ensure!(format!("{err:#}").contains(needle), "{err:#}");
    Ok(())
}

device_test!(bad_shapes_are_errors_naming_op_and_operand, |dev| {
    let x = Tensor::<f32>::zeros(dev, &[2, 7, 3, 33])?;
    let mut heads_out = Tensor::<f32>::zeros(dev, &[2, 2, 7, 64])?;
    expect_err(
        tk::split_heads(&x, &mut heads_out, 2, 0),
        "split_heads: H = 33 is not divisible by heads = 2",
    )?;
    let mut dx = Tensor::<f32>::zeros(dev, &[2, 7, 3, 33])?;
    expect_err(
        tk::merge_heads(&heads_out, &mut dx, 2, 0),
        "merge_heads: H = 33 is not divisible by heads = 2",
    )?;
    let x8 = Tensor::<f32>::zeros(dev, &[2, 7, 3, 8])?;
    let mut narrow = Tensor::<f32>::zeros(dev, &[2, 2, 7, 13])?;
    expect_err(
        tk::split_heads(&x8, &mut narrow, 2, 2),
        "split_heads: columns col_offset + C*dh = 2 + 3*4 do not fit in out's width 13",
    )?;
    expect_err(
        tk::split_heads(&x8, &mut heads_out, 4, 0),
        "split_heads: out has shape [2, 2, 7, 64], expected [B, heads, T, width]",
    )?;

    let mut merged = Tensor::<f32>::zeros(dev, &[2, 3, 3, 24])?;
    expect_err(
        tk::window_merge_gather(&x8, &mut merged, 2),
        "window_merge_gather: out has shape [2, 3, 3, 24], expected [B, ceil(T/w), C, w*H] = [2, 4, 3, 16]",
    )?;
    expect_err(
        tk::window_merge_gather(&x8, &mut merged, 0),
        "window_merge_gather: window w must be at least 1",
    )?;
    let mut dx8 = Tensor::<f32>::zeros(dev, &[2, 7, 3, 8])?;
    expect_err(
        tk::window_merge_scatter(&merged, &mut dx8, 2),
        "window_merge_scatter: dout has shape [2, 3, 3, 24]",
    )?;
    let flat = Tensor::<f32>::zeros(dev, &[2, 7])?;
    expect_err(
        tk::window_merge_gather(&flat, &mut merged, 3),
        "window_merge_gather: x has shape [2, 7]; expected [B, T, C, H]",
    )?;

    let mask = Tensor::<u8>::zeros(dev, &[2, 6])?;
    let mut pooled = Tensor::<f32>::zeros(dev, &[2, 3, 8])?;
    expect_err(
        tk::pool_forward(&x8, Some(&mask), &mut pooled, Pool::Mean),
        "pool_forward: mask has shape [2, 6], expected [B, T] = [2, 7]",
    )?;
    let mut pooled_bad = Tensor::<f32>::zeros(dev, &[2, 8])?;
    expect_err(
        tk::pool_forward(&x8, None, &mut pooled_bad, Pool::First),
        "pool_forward: out has shape [2, 8], expected [B, C, H] = [2, 3, 8]",
    )?;
    expect_err(
        tk::pool_backward(&pooled_bad, None, &mut dx8, Pool::Mean),
        "pool_backward: dout has shape [2, 8]",
    )?;
    let mut xm = Tensor::<f32>::zeros(dev, &[2, 7, 3, 8])?;
    expect_err(
        tk::apply_token_mask(&mut xm, &mask),
        "apply_token_mask: mask has shape [2, 6]",
    )?;
    let mut vec_x = Tensor::<f32>::zeros(dev, &[2, 7, 3, 8])?;
    expect_err(
        tk::position_encoding_add(&mut vec_x),
        "position_encoding_add: x has shape [2, 7, 3, 8]",
    )?;
    Ok(())
});
