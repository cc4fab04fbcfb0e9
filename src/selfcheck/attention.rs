//! Device checks: `eqsdpa` (cuda/eqsdpa.cu), the fused equivariant attention, and the
//! materialised attention that `EqAttention` runs with `attention = "materialised"`.
//!
//! Every kernel: the f32 forward and backward at dh 8, 16, 32 and 64, the bf16 and f16 ones
//! (prep, dk/dvalues, dq, atomic) at dh 16, 32 and 64; each case with and without a key mask
//! (padding, a fully masked frame), several heads per frame, and both backward modes: the
//! deterministic two passes and the float-atomic dq ([`Mode`]). For each masked case, a rerun
//! with two blocks looping over every tile ([`e::set_max_blocks`]) and one with new contents in
//! the masked keys must give the same bits.
//!
//! Tolerances are those of tests/eqsdpa.rs, FlashAttention-2's rule: against the materialised f64
//! reference ([`e::eqsdpa_reference_host`]), each output's error may be at most twice the largest
//! error of a materialised attention at the same precision on the host (f32 GEMM and softmax;
//! for bf16 / f16, products of the rounded values summed in f32 with P and dS rounded to the
//! type) plus a floor of 1e-6 (1e-5 for the 16-bit gradients); the backward also gets what the
//! f32 storage of the forward's out and lse alone costs (the f64 backward evaluated on them).
//! Exactly 0: masked keys' dk and dvalues, a fully masked frame's out and dq; its lse +inf. The
//! atomic mode: dk and dvalues exactly the deterministic ones, dq within 1e-5 max |dq| + 1e-7 of
//! them.
//!
//! The device's materialised path (batched GEMM, masked softmax, batched GEMM, as the tape records
//! them) is held to the error its ops' tests allow them, carried through the chain
//! ([`materialised_bounds`]), not to the rule: it is itself a materialised f32 attention, whose
//! error next to the host's depends on the device's arithmetic rather than on the algorithm.

use super::gemm::{widen, Gather};
use super::Ctx;
use crate::nn;
use crate::ops::eqsdpa::{self as e, EqsdpaBackwardMode as Mode, EqsdpaDims, EqsdpaInput};
use crate::ops::gemm::{gemm_host, Batch};
use crate::ops::softmax::{softmax_backward_host, softmax_forward_host};
use crate::tape::{ParamStore, Tape};
use crate::{DType, Device, Tensor};
use anyhow::{Context, Result};
use half::{bf16, f16};
use std::sync::Arc;

/// Added to twice the materialised error: both can be exactly 0 (T = 1).
const FLOOR: f64 = 1e-6;

/// The floor of the 16-bit backward's gradients (tests/eqsdpa.rs `HALF_FLOOR`: the tensor cores'
/// dP and the rounded D cancel only to a few f32 ulps where the exact dS is 0).
const HALF_FLOOR: f64 = 1e-5;

/// `eqsdpa`.
pub(super) fn eqsdpa(ctx: &mut Ctx) -> Result<()> {
    // Put the grid cap back however the family ends.
    struct Uncap;
    impl Drop for Uncap {
        fn drop(&mut self) {
            e::set_max_blocks(0);
        }
    }
    let _uncap = Uncap;
    for dh in [8, 16, 32, 64] {
        for &(frames, heads, t, masked) in f32_shapes(ctx.quick) {
            let c = Case::new(ctx, frames, heads, t, dh, masked, |x| x);
            fused::<f32>(ctx, &c)?;
            materialised_path(ctx, &c)?;
        }
    }
    for dh in [16, 32, 64] {
        for &(frames, heads, t, masked) in half_shapes(ctx.quick) {
            let c = Case::new(ctx, frames, heads, t, dh, masked, round_bf16);
            fused::<bf16>(ctx, &c)?;
            let c = Case::new(ctx, frames, heads, t, dh, masked, round_f16);
            fused::<f16>(ctx, &c)?;
        }
    }
    Ok(())
}

/// (frames, heads, T, masked) of the f32 cases. Quick: a short unmasked one and a masked one of
/// two tiles at every dh (3 frames, the first fully masked). Otherwise those of tests/eqsdpa.rs:
/// T = 1, T = 200, and masked ones at 64 (one tile) and 200.
fn f32_shapes(quick: bool) -> &'static [(usize, usize, usize, bool)] {
    if quick {
        &[(1, 3, 7, false), (3, 2, 70, true)]
    } else {
        &[
            (2, 1, 1, false),
            (1, 3, 200, false),
            (2, 3, 64, true),
            (2, 1, 200, true),
        ]
    }
}

/// (frames, heads, T, masked) of the bf16 / f16 cases: those of tests/eqsdpa.rs's 16-bit
/// backward (quick: two of them).
fn half_shapes(quick: bool) -> &'static [(usize, usize, usize, bool)] {
    if quick {
        &[(1, 3, 7, false), (3, 1, 40, true)]
    } else {
        &[
            (2, 1, 1, false),
            (1, 3, 7, false),
            (3, 1, 40, true),
            (1, 2, 100, false),
        ]
    }
}

/// `x` rounded through bf16 (exact in it afterwards).
fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// `x` rounded through f16 (exact in it afterwards).
fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// One attention problem, its inputs as the device sees them (rounded to the input type).
#[derive(Clone)]
struct Case {
    d: EqsdpaDims,
    scale: f32,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    mask: Option<Vec<u8>>,
    dout: Vec<f32>,
    /// The input type's rounding (identity for f32).
    round: fn(f32) -> f32,
}

impl Case {
    /// Random inputs as tests/eqsdpa.rs draws them (queries a little larger than keys: peakier
    /// rows than unit scores), rounded by `round`. Masked: about a fifth of the keys are padding,
    /// frame 0 (of two or more) is fully masked, and the last frame's trailing T/4 tokens are
    /// padding. Unmasked cases take a scale other than 1/sqrt(dh), which the op accepts too.
    fn new(
        ctx: &mut Ctx,
        frames: usize,
        heads: usize,
        t: usize,
        dh: usize,
        masked: bool,
        round: fn(f32) -> f32,
    ) -> Self {
        let d = EqsdpaDims {
            bh: frames * heads,
            t,
            dh,
            heads,
        };
        let n = d.bh * t;
        let mask = masked.then(|| {
            let mut m: Vec<u8> = (0..frames * t)
                .map(|_| (ctx.rng.uniform() > 0.2) as u8)
                .collect();
            if frames >= 2 {
                m[..t].fill(0);
            }
            m[frames * t - t / 4..].fill(0);
            m
        });
        let mut draw = |len: usize, s: f64| -> Vec<f32> {
            ctx.rng.normal_vec(len, s).into_iter().map(round).collect()
        };
        let scale = if masked { 1.0 } else { 1.25 } / (dh as f32).sqrt();
        Self {
            d,
            scale,
            q: draw(n * dh, 1.5),
            k: draw(n * dh, 1.0),
            v: draw(n * 4 * dh, 1.0),
            dout: draw(n * 4 * dh, 1.0),
            mask,
            round,
        }
    }

    fn name(&self) -> String {
        let d = self.d;
        format!(
            "bh {} (heads {}) T {}{}",
            d.bh,
            d.heads,
            d.t,
            if self.mask.is_some() { " masked" } else { "" }
        )
    }

    /// Whether key `j` of (frame, head) `bh` is padding.
    fn masked(&self, bh: usize, j: usize) -> bool {
        let frame = bh / self.d.heads;
        self.mask
            .as_ref()
            .is_some_and(|m| m[frame * self.d.t + j] == 0)
    }

    /// The rows (`width` wide, `[BH, T, width]`) of `v` whose key is masked, and those whose
    /// query has every key masked: values that must be exactly 0.
    fn dead(&self, v: &[f32], width: usize, keys: bool) -> Vec<f32> {
        let d = self.d;
        let all_masked = |bh: usize| (0..d.t).all(|j| self.masked(bh, j));
        let mut z = Vec::new();
        for bh in 0..d.bh {
            for j in 0..d.t {
                if if keys {
                    self.masked(bh, j)
                } else {
                    all_masked(bh)
                } {
                    z.extend_from_slice(&v[(bh * d.t + j) * width..][..width]);
                }
            }
        }
        z
    }

    /// The f64 reference: forward and backward.
    fn reference(&self) -> e::EqsdpaReference {
        e::eqsdpa_reference_host(
            &widen(&self.q),
            &widen(&self.k),
            &widen(&self.v),
            self.mask.as_deref(),
            self.d,
            self.scale as f64,
            Some(&widen(&self.dout)),
        )
    }

    /// The largest errors of (dq, dk, dvalues) that the f32 storage of `out` and `lse` alone
    /// causes: the f64 backward evaluated on them, against the reference.
    fn storage_errors(&self, out: &[f32], lse: &[f32], r: &e::EqsdpaReference) -> [f64; 3] {
        let (mut dq, mut dk, mut dv) = (
            vec![0.0; self.q.len()],
            vec![0.0; self.k.len()],
            vec![0.0; self.v.len()],
        );
        e::eqsdpa_backward_host(
            &widen(&self.q),
            &widen(&self.k),
            &widen(&self.v),
            &widen(out),
            &widen(lse),
            &widen(&self.dout),
            self.mask.as_deref(),
            self.d,
            self.scale as f64,
            &mut dq,
            &mut dk,
            &mut dv,
        );
        let err = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max)
        };
        [err(&dq, &r.dq), err(&dk, &r.dk), err(&dv, &r.dvalues)]
    }
}

/// The host's materialised attention at the case's precision, as tests/eqsdpa.rs forms it: the
/// f32 GEMM for scores, `P values` and every backward product, the f32 softmax and its backward,
/// with P and dS passed through the input type's rounding before they multiply.
struct Materialised {
    out: Vec<f32>,
    lse: Vec<f32>,
    /// dq, dk, dvalues.
    grads: [Vec<f32>; 3],
}

impl Materialised {
    fn new(c: &Case) -> Self {
        let d = c.d;
        let (t, dh, dv) = (d.t, d.dh, d.dv());
        let mut m = Self {
            out: vec![0.0; d.bh * t * dv],
            lse: vec![0.0; d.bh * t],
            grads: [
                vec![0.0; d.bh * t * dh],
                vec![0.0; d.bh * t * dh],
                vec![0.0; d.bh * t * dv],
            ],
        };
        let one = Batch::single();
        let [dq, dk, dvv] = &mut m.grads;
        for bh in 0..d.bh {
            let q = &c.q[bh * t * dh..][..t * dh];
            let k = &c.k[bh * t * dh..][..t * dh];
            let v = &c.v[bh * t * dv..][..t * dv];
            let g = &c.dout[bh * t * dv..][..t * dv];
            let mrow = c.mask.as_ref().map(|m| &m[(bh / d.heads) * t..][..t]);
            let mut s = vec![0.0f32; t * t];
            gemm_host(false, true, t, t, dh, 1.0, q, k, 0.0, &mut s, one);
            let mut p = vec![0.0f32; t * t];
            softmax_forward_host(&s, &mut p, t, c.scale, mrow, t);
            p.iter_mut().for_each(|x| *x = (c.round)(*x));
            let out = &mut m.out[bh * t * dv..][..t * dv];
            gemm_host(false, false, t, dv, t, 1.0, &p, v, 0.0, out, one);
            for (i, lse) in m.lse[bh * t..][..t].iter_mut().enumerate() {
                let row = (0..t)
                    .filter(|&j| !c.masked(bh, j))
                    .map(|j| c.scale * s[i * t + j]);
                let mx = row.clone().fold(f32::NEG_INFINITY, f32::max);
                *lse = if mx == f32::NEG_INFINITY {
                    f32::INFINITY
                } else {
                    mx + row.map(|x| (x - mx).exp()).sum::<f32>().ln()
                };
            }
            // dP = dout values^T; dS (of the unscaled scores) = scale P (dP - rowsum(P dP)).
            let mut dp = vec![0.0f32; t * t];
            gemm_host(false, true, t, t, dv, 1.0, g, v, 0.0, &mut dp, one);
            let mut ds = vec![0.0f32; t * t];
            softmax_backward_host(&p, &dp, &mut ds, t, c.scale);
            ds.iter_mut().for_each(|x| *x = (c.round)(*x));
            let (dq, dk) = (
                &mut dq[bh * t * dh..][..t * dh],
                &mut dk[bh * t * dh..][..t * dh],
            );
            gemm_host(false, false, t, dh, t, 1.0, &ds, k, 0.0, dq, one);
            gemm_host(true, false, t, dh, t, 1.0, &ds, q, 0.0, dk, one);
            let dvv = &mut dvv[bh * t * dv..][..t * dv];
            gemm_host(true, false, t, dv, t, 1.0, &p, g, 0.0, dvv, one);
        }
        m
    }
}

/// Largest |got - want| over the finite references.
fn max_err(got: &[f32], want: &[f64]) -> f64 {
    got.iter()
        .zip(want)
        .filter(|(_, w)| w.is_finite())
        .map(|(&g, &w)| (g as f64 - w).abs())
        .fold(0.0, f64::max)
}

/// Adds one output under FlashAttention-2's rule: within twice the materialised attention's
/// largest error plus `extra` of the reference, element by element (lse's +inf must match).
fn rule(g: &mut Gather, what: &str, got: &[f32], mat: &[f32], extra: f64, want: &[f64], s: f64) {
    g.add_within(what, got, want, 2.0 * max_err(mat, want) + extra, s);
}

/// A tensor of NaN: an element the device never writes fails.
fn poisoned(dev: &Device, shape: &[usize]) -> Result<Tensor<f32>> {
    let mut t = Tensor::zeros(dev, shape)?;
    t.poison()?;
    Ok(t)
}

/// The fused op's results on the device: the forward, then the backward in both modes.
struct Fused {
    out: Vec<f32>,
    lse: Vec<f32>,
    /// dq, dk, dvalues of the deterministic backward.
    det: [Vec<f32>; 3],
    /// dq, dk, dvalues of the atomic-dq backward.
    atomic: [Vec<f32>; 3],
    /// Seconds: forward, deterministic backward, atomic backward.
    secs: [f64; 3],
}

impl Fused {
    /// Runs the case on the device, every output poisoned first; `from` converts the (already
    /// rounded) inputs to the input type exactly.
    fn run<T: EqsdpaInput>(ctx: &Ctx, c: &Case) -> Result<Self> {
        let (dev, d) = (&ctx.dev, c.d);
        let (qs, vs) = ([d.bh, d.t, d.dh], [d.bh, d.t, d.dv()]);
        let up = |v: &[f32], s: &[usize]| {
            Tensor::from_slice(
                dev,
                s,
                &v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>(),
            )
        };
        let (q, k, v) = (up(&c.q, &qs)?, up(&c.k, &qs)?, up(&c.v, &vs)?);
        let dout = Tensor::from_slice(dev, &vs, &c.dout)?;
        let mask = match &c.mask {
            Some(m) => Some(Tensor::from_slice(dev, &[d.frames(), d.t], m)?),
            None => None,
        };
        let (mut out, mut lse) = (poisoned(dev, &vs)?, poisoned(dev, &[d.bh, d.t])?);
        let (h, s) = (d.heads, c.scale);
        let ((), t_fwd) =
            ctx.timed(|_| T::forward(&q, &k, &v, mask.as_ref(), h, s, &mut out, &mut lse))?;
        let grads = |mode| -> Result<([Vec<f32>; 3], f64)> {
            let (mut dq, mut dk, mut dv) = (
                poisoned(dev, &qs)?,
                poisoned(dev, &qs)?,
                poisoned(dev, &vs)?,
            );
            let ((), secs) = ctx.timed(|_| {
                let saved = (&out, &lse, &dout);
                let grads = (&mut dq, &mut dk, &mut dv);
                T::backward(&q, &k, &v, saved, mask.as_ref(), h, s, grads, mode)
            })?;
            Ok(([dq.to_vec()?, dk.to_vec()?, dv.to_vec()?], secs))
        };
        let (det, t_det) = grads(Mode::Deterministic)?;
        let (atomic, t_atomic) = grads(Mode::AtomicDq)?;
        Ok(Self {
            out: out.to_vec()?,
            lse: lse.to_vec()?,
            det,
            atomic,
            secs: [t_fwd, t_det, t_atomic],
        })
    }

    /// The bits of everything that is reproducible: out, lse and the deterministic gradients.
    fn bits(&self) -> Vec<u32> {
        let [dq, dk, dv] = &self.det;
        [&self.out, &self.lse, dq, dk, dv]
            .iter()
            .flat_map(|v| v.iter().map(|x| x.to_bits()))
            .collect()
    }
}

/// One case on the fused op in the input type `T`: the forward, the deterministic backward and
/// the atomic one against the reference (three checks); for a masked case, also the reruns that
/// must repeat every bit.
fn fused<T: EqsdpaInput>(ctx: &mut Ctx, c: &Case) -> Result<()> {
    let f = Fused::run::<T>(ctx, c)?;
    let r = c.reference();
    let m = Materialised::new(c);
    let storage = c.storage_errors(&f.out, &f.lse, &r);
    let half = T::DTYPE != DType::F32;
    let (ty, dh, name) = (T::name(), c.d.dh, c.name());
    let (dhw, dvw) = (c.d.dh, c.d.dv());
    let zeros = |v: &[f32]| vec![0.0; v.len()];

    let mut fwd = Gather::default();
    rule(&mut fwd, "out", &f.out, &m.out, FLOOR, &r.out, f.secs[0]);
    rule(&mut fwd, "lse", &f.lse, &m.lse, FLOOR, &r.lse, 0.0);
    let dead = c.dead(&f.out, dvw, false);
    fwd.add_within(
        "out of queries with every key masked",
        &dead,
        &zeros(&dead),
        0.0,
        0.0,
    );
    fwd.record(ctx, format!("eqsdpa_forward_{ty}_dh{dh} {name}: out, lse"));

    let floor = if half { HALF_FLOOR } else { FLOOR };
    let want = [&r.dq, &r.dk, &r.dvalues];
    let mut bwd = Gather::default();
    for (i, what) in ["dq", "dk", "dvalues"].into_iter().enumerate() {
        let (got, mat, secs) = (&f.det[i], &m.grads[i], if i == 0 { f.secs[1] } else { 0.0 });
        rule(&mut bwd, what, got, mat, storage[i] + floor, want[i], secs);
    }
    for (what, v, width, keys) in [
        ("dk of masked keys", &f.det[1], dhw, true),
        ("dvalues of masked keys", &f.det[2], dvw, true),
        ("dq of queries with every key masked", &f.det[0], dhw, false),
    ] {
        let dead = c.dead(v, width, keys);
        bwd.add_within(what, &dead, &zeros(&dead), 0.0, 0.0);
    }
    let prep = if half { "prep, " } else { "" };
    let kernels = format!("eqsdpa_backward_{{{prep}dkdv, dq}}_{ty}_dh{dh}");
    bwd.record(ctx, format!("{kernels} {name}: dq, dk, dvalues"));

    // The atomic mode: dq by the rule and within f32 rounding of the deterministic dq (only the
    // order of its sums over key tiles differs); dk and dvalues the same arithmetic, exactly.
    let mut atomic = Gather::default();
    let det_dq = widen(&f.det[0]);
    let (got, secs) = (&f.atomic[0], f.secs[2]);
    rule(
        &mut atomic,
        "dq",
        got,
        &m.grads[0],
        storage[0] + floor,
        &r.dq,
        secs,
    );
    let reorder = 1e-5 * det_dq.iter().fold(0.0f64, |a, x| a.max(x.abs())) + 1e-7;
    atomic.add_within("dq vs deterministic", got, &det_dq, reorder, 0.0);
    for (i, what) in [(1, "dk as deterministic"), (2, "dvalues as deterministic")] {
        atomic.add_within(what, &f.atomic[i], &widen(&f.det[i]), 0.0, 0.0);
    }
    let kernels = format!("eqsdpa_backward_{{{prep}atomic}}_{ty}_dh{dh}");
    atomic.record(ctx, format!("{kernels} {name}: dq; dk, dvalues exact"));

    if c.mask.is_some() {
        reruns::<T>(ctx, c, &f)?;
    }
    Ok(())
}

/// The same bits again (out, lse, deterministic gradients) when two blocks loop over every
/// (bh, tile) pair (a tile's arithmetic does not depend on the block that runs it), and when the
/// masked keys' k and values change (their probabilities are exactly 0).
fn reruns<T: EqsdpaInput>(ctx: &mut Ctx, c: &Case, first: &Fused) -> Result<()> {
    let (ty, dh, name) = (T::name(), c.d.dh, c.name());
    e::set_max_blocks(2);
    let looped = Fused::run::<T>(ctx, c);
    e::set_max_blocks(0);
    let looped = looped?;
    let secs = looped.secs.iter().sum();
    let what = format!("eqsdpa {ty} dh{dh} {name}: 2 blocks looping over all tiles, same bits");
    ctx.exact(what, &looped.bits(), &first.bits(), secs);

    // Much larger contents (still finite in f16) for every masked key.
    let mut c2 = c.clone();
    let (d, big) = (c.d, if T::DTYPE == DType::F32 { 1e4 } else { 1e3 });
    for bh in 0..d.bh {
        for j in (0..d.t).filter(|&j| c.masked(bh, j)) {
            for x in &mut c2.k[(bh * d.t + j) * d.dh..][..d.dh] {
                *x = (c.round)(100.0 * ctx.rng.normal() as f32);
            }
            for x in &mut c2.v[(bh * d.t + j) * d.dv()..][..d.dv()] {
                *x = (c.round)(big * ctx.rng.normal() as f32);
            }
        }
    }
    let changed = Fused::run::<T>(ctx, &c2)?;
    let secs = changed.secs.iter().sum();
    let what = format!("eqsdpa {ty} dh{dh} {name}: masked keys' contents change no bit");
    ctx.exact(what, &changed.bits(), &first.bits(), secs);
    Ok(())
}

/// The materialised attention of `EqAttention` (`attention = "materialised"`) on the device, as
/// the token model records it on the tape: scores by a batched GEMM, the masked softmax, `P
/// values` by a batched GEMM, and their backward; against the reference within
/// [`materialised_bounds`].
fn materialised_path(ctx: &mut Ctx, c: &Case) -> Result<()> {
    let (dev, d) = (ctx.dev.clone(), c.d);
    let (qs, vs) = ([d.bh, d.t, d.dh], [d.bh, d.t, d.dv()]);
    let mut tape = Tape::new(ParamStore::new(&dev, 0), 0);
    tape.set_poison(true);
    let q = tape.input_with_grad(Tensor::from_slice(&dev, &qs, &c.q)?)?;
    let k = tape.input_with_grad(Tensor::from_slice(&dev, &qs, &c.k)?)?;
    let v = tape.input_with_grad(Tensor::from_slice(&dev, &vs, &c.v)?)?;
    let mask = match &c.mask {
        Some(m) => Some(Arc::new(Tensor::from_slice(&dev, &[d.frames(), d.t], m)?)),
        None => None,
    };
    let dout = Tensor::from_slice(&dev, &vs, &c.dout)?;
    let (o, t_fwd) = ctx.timed(|_| {
        let scores = nn::matmul(&mut tape, q, k, false, true, (d.bh, d.t, d.t, d.dh), 1.0)?;
        let p = nn::softmax(&mut tape, scores, c.scale, mask, d.heads * d.t)?;
        nn::matmul(&mut tape, p, v, false, false, (d.bh, d.t, d.dv(), d.t), 1.0)
    })?;
    let out = tape.value(o).to_vec()?;
    let ((), t_bwd) = ctx.timed(|_| tape.backward(o, dout))?;
    let grad = |x| -> Result<Vec<f32>> {
        let g = tape
            .grad(x)
            .context("the materialised attention left no gradient")?;
        g.to_vec()
    };
    let r = c.reference();
    let [b_out, b_dq, b_dk, b_dv] = materialised_bounds(c);
    let mut all = Gather::default();
    all.add("out", &out, &r.out, &b_out, t_fwd);
    all.add("dq", &grad(q)?, &r.dq, &b_dq, t_bwd);
    all.add("dk", &grad(k)?, &r.dk, &b_dk, 0.0);
    all.add("dvalues", &grad(v)?, &r.dvalues, &b_dv, 0.0);
    let name = format!(
        "attention materialised (matmul, softmax, matmul) dh{} {}",
        d.dh,
        c.name()
    );
    all.record(ctx, format!("{name}: out, dq, dk, dvalues"));
    Ok(())
}

/// Per-element error bounds of the materialised attention on a device (out, dq, dk, dvalues),
/// from the bounds its ops meet in their tests, carried through the chain to first order. GEMMs
/// of n terms: `(n + 4) eps |A| |B|` (tests/gemm.rs); the softmax: `1e-7 + 2e-5 |P|` forward and
/// `2e-6 + 2e-5 |dS|` backward (tests/softmax.rs), each against the exact function of the inputs
/// it was given. The scores' error `E_S` moves each probability of a row by a factor within
/// `exp(+-2 scale max_j E_S)`; P's error `E_P` and dP's `E_dP` reach `dS = scale P (dP - D)`,
/// `D = sum_j P dP`, as `scale (E_P |dP - D| + (P + E_P) (E_dP + E_D))`. Masked keys have P and
/// dS exactly 0 (the softmax's tests check it), so no error there. Why not FlashAttention-2's
/// rule: this path is itself a materialised f32 attention, whose error next to the host's depends
/// on the device's arithmetic (emu has no fused multiply-add, the host's GEMM has), not on the
/// algorithm.
fn materialised_bounds(c: &Case) -> [Vec<f64>; 4] {
    let d = c.d;
    let (t, dh, dv) = (d.t, d.dh, d.dv());
    let eps = f32::EPSILON as f64;
    let gamma = |n: usize| (n as f64 + 4.0) * eps;
    let scale = c.scale as f64;
    // C [m, n] = op(A) op(B) in f64.
    let mm = |tb: (bool, bool), (m, n, k): (usize, usize, usize), a: &[f64], b: &[f64]| {
        let mut out = vec![0.0; m * n];
        gemm_host(
            tb.0,
            tb.1,
            m,
            n,
            k,
            1.0,
            a,
            b,
            0.0,
            &mut out,
            Batch::single(),
        );
        out
    };
    let abs = |v: &[f64]| v.iter().map(|x| x.abs()).collect::<Vec<f64>>();
    let mut bounds = [
        Vec::with_capacity(c.v.len()),
        Vec::with_capacity(c.q.len()),
        Vec::with_capacity(c.k.len()),
        Vec::with_capacity(c.v.len()),
    ];
    for bh in 0..d.bh {
        let q = widen(&c.q[bh * t * dh..][..t * dh]);
        let k = widen(&c.k[bh * t * dh..][..t * dh]);
        let v = widen(&c.v[bh * t * dv..][..t * dv]);
        let g = widen(&c.dout[bh * t * dv..][..t * dv]);
        let (qa, ka, va, ga) = (abs(&q), abs(&k), abs(&v), abs(&g));
        let mrow = c.mask.as_ref().map(|m| &m[(bh / d.heads) * t..][..t]);
        let live = |j: usize| !c.masked(bh, j);
        // Forward: scores, probabilities, and their errors.
        let s = mm((false, true), (t, t, dh), &q, &k);
        let e_s: Vec<f64> = mm((false, true), (t, t, dh), &qa, &ka)
            .iter()
            .map(|x| gamma(dh) * x)
            .collect();
        let mut p = vec![0.0; t * t];
        softmax_forward_host(&s, &mut p, t, scale, mrow, t);
        let mut e_p = vec![0.0; t * t];
        for i in 0..t {
            let m = (0..t)
                .filter(|&j| live(j))
                .map(|j| scale * e_s[i * t + j])
                .fold(0.0, f64::max);
            let grow = (2.0 * m).exp_m1();
            for j in (0..t).filter(|&j| live(j)) {
                let pj = p[i * t + j];
                e_p[i * t + j] = pj * grow + 1e-7 + 2e-5 * pj * (1.0 + grow);
            }
        }
        // out = P values: gamma(T) |P^| |V| + E_P |V| with |P^| <= P + E_P.
        let a1: Vec<f64> = p
            .iter()
            .zip(&e_p)
            .map(|(&p, &e)| gamma(t) * p + (1.0 + gamma(t)) * e)
            .collect();
        bounds[0].extend(mm((false, false), (t, dv, t), &a1, &va));
        bounds[3].extend(mm((true, false), (t, dv, t), &a1, &ga));
        // Backward: dP = dout values^T, D, dS.
        let dp = mm((false, true), (t, t, dv), &g, &v);
        let e_dp = mm((false, true), (t, t, dv), &ga, &va);
        let mut ds = vec![0.0; t * t];
        softmax_backward_host(&p, &dp, &mut ds, t, scale);
        let mut b1 = vec![0.0; t * t];
        for i in 0..t {
            let row = i * t..(i + 1) * t;
            let e_dp_row: Vec<f64> = e_dp[row.clone()].iter().map(|x| gamma(dv) * x).collect();
            let dsum: f64 = (0..t).map(|j| p[i * t + j] * dp[i * t + j]).sum();
            let e_d: f64 = (0..t)
                .map(|j| {
                    let (pj, ej, dpj) = (p[i * t + j], e_p[i * t + j], dp[i * t + j]);
                    ej * (dpj.abs() + e_dp_row[j]) + pj * e_dp_row[j]
                })
                .sum();
            for j in (0..t).filter(|&j| live(j)) {
                let (pj, ej, x) = (p[i * t + j], e_p[i * t + j], i * t + j);
                let carried = scale * (ej * (dp[x] - dsum).abs() + (pj + ej) * (e_dp_row[j] + e_d));
                let e_ds = carried + 2e-6 + 2e-5 * (ds[x].abs() + carried);
                b1[x] = gamma(t) * ds[x].abs() + (1.0 + gamma(t)) * e_ds;
            }
        }
        bounds[1].extend(mm((false, false), (t, dh, t), &b1, &ka));
        bounds[2].extend(mm((true, false), (t, dh, t), &b1, &qa));
    }
    let tiny = f32::MIN_POSITIVE as f64;
    bounds.map(|b| b.into_iter().map(|x| x + tiny).collect())
}
