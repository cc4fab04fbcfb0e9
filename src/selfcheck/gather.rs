//! Device checks: scatter (the atomic-number embedding and the atom-to-token merge) and tokens
//! (the token model's layout ops), forward and backward, against the f64 CPU twins under the
//! tolerances of tests/scatter.rs and tests/tokens.rs.

use super::elementwise::{bits, compare_bounds, poisoned, to64};
use super::{Ctx, Tol};
use crate::ops::scatter::{self as sc, EmbeddingIndex, Reduce, TokenMap, EXCLUDED};
use crate::ops::tokens::{self as tk, Pool, TokenDims};
use crate::testing::Rng;
use crate::Tensor;
use anyhow::Result;

const EPS: f64 = f32::EPSILON as f64;

// ---------------------------------------------------------------------------------- scatter --

/// Rows of the embedding table: atomic numbers below 100.
const VOCAB: usize = 100;

/// A residue-like map (as tests/scatter.rs draws it): runs of 1 to 14 atoms per token, some token
/// ids skipped (tokens without atoms, at the end too), about 10% of the atoms left out, the atom
/// order shuffled. Returns the map and the token count.
fn random_map(rng: &mut Rng, atoms: usize) -> (Vec<u32>, usize) {
    let mut ids = Vec::with_capacity(atoms);
    let mut t = 0u32;
    while ids.len() < atoms {
        if rng.uniform() < 0.15 {
            t += 1;
        }
        let size = (1 + rng.below(14)).min(atoms - ids.len());
        ids.extend(std::iter::repeat_n(t, size));
        t += 1;
    }
    for id in &mut ids {
        if rng.uniform() < 0.1 {
            *id = EXCLUDED;
        }
    }
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    (ids, t as usize + rng.below(3))
}

/// Heavy-atom elements in protein-like proportions (C, N, O, S): carbon's row is long enough to
/// need several chunks of the embedding backward's first pass.
fn random_elements(rng: &mut Rng, atoms: usize) -> Vec<i32> {
    (0..atoms)
        .map(|_| match rng.uniform() {
            u if u < 0.6 => 6,
            u if u < 0.77 => 7,
            u if u < 0.97 => 8,
            _ => 16,
        })
        .collect()
}

/// Atom features `[F, A, C, H]` (or `[F, A, H]` for C = 1, `[A, H]` for one frame of scalars
/// when `squeeze`), with the token shape beside them.
fn merge_shapes(
    f: usize,
    a: usize,
    c: usize,
    h: usize,
    r: usize,
    squeeze: bool,
) -> [Vec<usize>; 2] {
    match (c, squeeze) {
        (1, true) => [vec![a, h], vec![r, h]],
        (1, false) => [vec![f, a, h], vec![f, r, h]],
        _ => [vec![f, a, c, h], vec![f, r, c, h]],
    }
}

/// `scatter`: the token merge (sum and mean) forward and backward over residue-like maps (left-out
/// atoms, tokens without atoms, shuffled atoms) and one token holding every atom, scalars and
/// vectors, one or four frames, `[A, H]` single-frame features; the embedding forward and its
/// two-pass backward (per-chunk partials, then rows) over protein elements in a 100-row table and
/// a one-row table (long chunk lists); repeat runs bit-identical. Tolerances of tests/scatter.rs:
/// gathered sums within eps (terms + 1) sum|terms| per element (eps (terms + 2) (|dtable| +
/// sum|terms|) for the accumulating embedding backward), the merge backward one rounding (rel
/// eps), the embedding forward (a copy) exact.
pub(super) fn scatter(ctx: &mut Ctx) -> Result<()> {
    let big = if ctx.quick { 300 } else { 1656 };
    // (atoms, one token for all, frames, C, H, [A, H] spelling)
    let merges = [
        (1, false, 1, 1, 8, true),
        (17, false, 4, 1, 1, false),
        (17, true, 1, 3, 64, false),
        (big, false, 4, 3, 33, false),
        (big, false, 1, 1, 64, true),
        (big, true, 4, 1, 8, false),
    ];
    for (atoms, one, frames, c, h, squeeze) in merges {
        let (ids, tokens) = if one {
            (vec![0; atoms], 1)
        } else {
            random_map(&mut ctx.rng, atoms)
        };
        let map = TokenMap::new(&ids, tokens)?;
        let dmap = map.to_device(&ctx.dev)?;
        let inner = c * h;
        let [xs, ts] = merge_shapes(frames, atoms, c, h, tokens, squeeze);
        let x = ctx.rng.normal_vec(frames * atoms * inner, 1.0);
        let dy = ctx.rng.normal_vec(frames * tokens * inner, 1.0);
        let xt = Tensor::from_slice(&ctx.dev, &xs, &x)?;
        let dyt = Tensor::from_slice(&ctx.dev, &ts, &dy)?;
        // Sum of |terms| per token: the bound's scale.
        let abs: Vec<f64> = x.iter().map(|v| v.abs() as f64).collect();
        let mut abs_sum = vec![0.0; dy.len()];
        sc::token_merge_forward_host(map.view(), &abs, &mut abs_sum, frames, inner, Reduce::Sum);
        for reduce in [Reduce::Sum, Reduce::Mean] {
            let what = format!("A={atoms} R={tokens} {xs:?} {reduce:?}");
            let mut out = poisoned(&ctx.dev, &ts)?;
            let ((), s) = ctx.timed(|_| sc::token_merge_forward(&dmap, &xt, &mut out, reduce))?;
            let mut want = vec![0.0; dy.len()];
            sc::token_merge_forward_host(map.view(), &to64(&x), &mut want, frames, inner, reduce);
            let bound: Vec<f64> = abs_sum
                .iter()
                .enumerate()
                .map(|(i, &a)| {
                    let n = map.count((i / inner) % tokens) as f64;
                    let mean = if reduce == Reduce::Mean {
                        n.max(1.0)
                    } else {
                        1.0
                    };
                    EPS * (n + 1.0) * a / mean
                })
                .collect();
            let name = format!("token_merge_forward {what}");
            compare_bounds(ctx, name, &out.to_vec()?, &want, &bound, s);

            let mut dx = poisoned(&ctx.dev, &xs)?;
            let ((), s) = ctx.timed(|_| sc::token_merge_backward(&dmap, &dyt, &mut dx, reduce))?;
            let mut want = vec![0.0; x.len()];
            sc::token_merge_backward_host(map.view(), &to64(&dy), &mut want, frames, inner, reduce);
            let name = format!("token_merge_backward {what}");
            ctx.compare(name, &dx.to_vec()?, &want, Tol::new(0.0, EPS), s);
        }
    }

    // (atoms, one-row table, frames, H)
    let embeddings = [
        (1, false, 1, 1),
        (17, false, 4, 33),
        (17, true, 1, 8),
        (big, false, 1, 64),
        (big, false, 4, 8),
        (big, true, 4, 33),
    ];
    for (atoms, one_row, frames, h) in embeddings {
        let (z, vocab) = if one_row {
            (vec![0; atoms], 1)
        } else {
            (random_elements(&mut ctx.rng, atoms), VOCAB)
        };
        let idx = EmbeddingIndex::new(&z, vocab)?;
        let didx = idx.to_device(&ctx.dev)?;
        // One frame may drop its leading dimension: [N, H].
        let shape = if frames == 1 {
            vec![atoms, h]
        } else {
            vec![frames, atoms, h]
        };
        let what = format!("V={vocab} {shape:?} ({} chunks)", idx.chunks());
        let table = ctx.rng.normal_vec(vocab * h, 1.0);
        let tt = Tensor::from_slice(&ctx.dev, &[vocab, h], &table)?;
        let mut out = poisoned(&ctx.dev, &shape)?;
        let ((), s) = ctx.timed(|_| sc::embedding_forward(&tt, &didx, &mut out))?;
        let mut want = vec![0.0; frames * atoms * h];
        sc::embedding_forward_host(&to64(&table), &z, &mut want, h);
        // A copy: exact.
        let name = format!("embedding_forward {what}");
        ctx.compare(name, &out.to_vec()?, &want, Tol::abs(0.0), s);

        // The backward accumulates onto what dtable held.
        let d = ctx.rng.normal_vec(frames * atoms * h, 1.0);
        let dt = Tensor::from_slice(&ctx.dev, &shape, &d)?;
        let init = ctx.rng.normal_vec(vocab * h, 1.0);
        let mut dtable = Tensor::from_slice(&ctx.dev, &[vocab, h], &init)?;
        let ((), s) = ctx.timed(|_| sc::embedding_backward(&didx, &dt, &mut dtable))?;
        let got = dtable.to_vec()?;
        let mut want = to64(&init);
        sc::embedding_backward_host(idx.view(), &to64(&d), &mut want, frames, h);
        // The same sum over magnitudes, times (terms + 2): the rounding of every addition.
        let mut bound: Vec<f64> = init.iter().map(|v| v.abs() as f64).collect();
        let abs: Vec<f64> = d.iter().map(|v| v.abs() as f64).collect();
        sc::embedding_backward_host(idx.view(), &abs, &mut bound, frames, h);
        let rp = idx.row_ptr();
        for (i, b) in bound.iter_mut().enumerate() {
            let terms = frames * (rp[i / h + 1] - rp[i / h]) as usize;
            *b *= EPS * (terms + 2) as f64;
        }
        compare_bounds(
            ctx,
            format!("embedding_backward {what}"),
            &got,
            &want,
            &bound,
            s,
        );

        // Caller scratch, poisoned (the first pass must overwrite every partial it reads back),
        // from the same start: the same bits, whatever order emu runs the threads in.
        let mut again = Tensor::from_slice(&ctx.dev, &[vocab, h], &init)?;
        let mut scratch = poisoned(&ctx.dev, &[didx.scratch_len(h) + 7])?;
        let ((), s) = ctx
            .timed(|_| sc::embedding_backward_with_scratch(&didx, &dt, &mut again, &mut scratch))?;
        let name = format!("embedding_backward_with_scratch {what} = embedding_backward");
        ctx.exact(name, &bits(&again.to_vec()?), &bits(&got), s);
    }

    // Repeat runs of the merge give the same bits (on emu each launch orders threads anew).
    let (ids, tokens) = random_map(&mut ctx.rng, big);
    let dmap = TokenMap::new(&ids, tokens)?.to_device(&ctx.dev)?;
    let [xs, ts] = merge_shapes(4, big, 3, 64, tokens, false);
    let x = Tensor::from_slice(&ctx.dev, &xs, &ctx.rng.normal_vec(4 * big * 3 * 64, 1.0))?;
    let mut runs = Vec::new();
    let mut secs = 0.0;
    for _ in 0..2 {
        let mut out = poisoned(&ctx.dev, &ts)?;
        secs += ctx
            .timed(|_| sc::token_merge_forward(&dmap, &x, &mut out, Reduce::Mean))?
            .1;
        runs.push(bits(&out.to_vec()?));
    }
    let name = format!("token_merge_forward A={big} {ts:?} Mean: rerun bit-identical");
    ctx.exact(name, &runs[1], &runs[0], secs);
    Ok(())
}

// ----------------------------------------------------------------------------------- tokens --

/// The tensor shape of a token tensor: scalars written `[B, T, H]` for odd T (as the model stores
/// them) and `[B, T, 1, H]` otherwise, so both spellings run (as in tests/tokens.rs).
fn token_shape(d: TokenDims) -> Vec<usize> {
    if d.c == 1 && d.t % 2 == 1 {
        vec![d.b, d.t, d.h]
    } else {
        d.shape().to_vec()
    }
}

/// A token mask `[B, T]` (nonzero = valid, several nonzero values) with the cases the ops
/// distinguish (tests/tokens.rs): frame 0 a valid prefix, frame 1 no valid token, frame 2 random
/// tokens with token 0 masked, and so on cyclically.
fn token_mask(rng: &mut Rng, b: usize, t: usize) -> Vec<u8> {
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

/// `tokens`: every layout op of the token model, forward and backward. The window merger's
/// gather and scatter (ragged last windows, T < w, w = 1), the head split into a shared
/// `[B, heads, T, 4 dh]` value tensor (scalars at offset 0, vectors at dh) and into a wider one
/// whose spare columns must stay untouched, and merge_heads: all pure data movement, exact. The
/// position encoding up to T = 20,000 (2.5e-7 + 1.2e-7 rel: 2 ulp of sinf/cosf at the shared f32
/// angle plus the sum's rounding). Mean and first pooling with and without a mask (a frame with
/// no valid token pools to 0): forward within T eps max|x| + 1e-7 (a sequential sum) + 1e-6 rel,
/// backward 1e-7 + 2e-7 rel, masked and unused tokens exactly 0. The token mask, exact, over
/// NaN in padded tokens. Tolerances from tests/tokens.rs.
pub(super) fn tokens(ctx: &mut Ctx) -> Result<()> {
    window_merge(ctx)?;
    heads(ctx)?;
    position_encoding(ctx)?;
    pooling(ctx)?;
    token_mask_check(ctx)
}

/// The window merger's gather and scatter.
fn window_merge(ctx: &mut Ctx) -> Result<()> {
    let mut cases = vec![
        (TokenDims::new(3, 7, 3, 33), 3),
        (TokenDims::new(1, 214, 1, 64), 8),
        (TokenDims::new(3, 8, 1, 8), 3),
        (TokenDims::new(1, 1, 3, 33), 8),
        (TokenDims::new(2, 214, 3, 8), 1),
    ];
    if !ctx.quick {
        cases.push((TokenDims::new(16, 214, 3, 64), 2));
    }
    for (d, w) in cases {
        let tw = tk::padded_tokens(d.t, w);
        let merged = [d.b, tw, d.c, w * d.h];
        let what = format!("{:?} w={w}", token_shape(d));
        let x = ctx.rng.normal_vec(d.len(), 1.0);
        let xt = Tensor::from_slice(&ctx.dev, &token_shape(d), &x)?;
        let mut out = poisoned(&ctx.dev, &merged)?;
        let ((), s) = ctx.timed(|_| tk::window_merge_gather(&xt, &mut out, w))?;
        let mut want = vec![0.0; out.len()];
        tk::window_merge_gather_host(&to64(&x), &mut want, d, w);
        let name = format!("window_merge_gather {what}");
        ctx.compare(name, &out.to_vec()?, &want, Tol::abs(0.0), s);

        let dy = ctx.rng.normal_vec(out.len(), 1.0);
        let dyt = Tensor::from_slice(&ctx.dev, &merged, &dy)?;
        let mut dx = poisoned(&ctx.dev, &token_shape(d))?;
        let ((), s) = ctx.timed(|_| tk::window_merge_scatter(&dyt, &mut dx, w))?;
        let mut want = vec![0.0; d.len()];
        tk::window_merge_scatter_host(&to64(&dy), &mut want, d, w);
        let name = format!("window_merge_scatter {what}");
        ctx.compare(name, &dx.to_vec()?, &want, Tol::abs(0.0), s);
    }
    Ok(())
}

/// split_heads and merge_heads, as the attention uses them.
fn heads(ctx: &mut Ctx) -> Result<()> {
    let mut cases = vec![(3, 7, 33, 1), (1, 214, 64, 4), (3, 8, 8, 2)];
    if !ctx.quick {
        cases.push((16, 214, 128, 4));
    }
    for (b, t, h, heads) in cases {
        let s = TokenDims::new(b, t, 1, h);
        let v = TokenDims { c: 3, ..s };
        let dh = h / heads;
        let width = 4 * dh;
        let per_head = [b, heads, t, width];
        let what = format!("B={b} T={t} H={h} heads={heads}");
        let xs = ctx.rng.normal_vec(s.len(), 1.0);
        let xv = ctx.rng.normal_vec(v.len(), 1.0);
        let xst = Tensor::from_slice(&ctx.dev, &token_shape(s), &xs)?;
        let xvt = Tensor::from_slice(&ctx.dev, &token_shape(v), &xv)?;
        // Scalars and vectors fill one poisoned value tensor: every column written exactly once.
        let mut out = poisoned(&ctx.dev, &per_head)?;
        let ((), sec) = ctx.timed(|_| {
            tk::split_heads(&xst, &mut out, heads, 0)?;
            tk::split_heads(&xvt, &mut out, heads, dh)
        })?;
        let mut want = vec![f64::NAN; out.len()];
        tk::split_heads_host(&to64(&xs), &mut want, s, heads, width, 0);
        tk::split_heads_host(&to64(&xv), &mut want, v, heads, width, dh);
        let name = format!("split_heads scalars + vectors {what}");
        ctx.compare(name, &out.to_vec()?, &want, Tol::abs(0.0), sec);

        // Spare columns on both sides stay as they were.
        let (wide, off) = (3 * dh + 5, dh + 2);
        let fill = ctx.rng.normal_vec(b * heads * t * wide, 1.0);
        let mut out2 = Tensor::from_slice(&ctx.dev, &[b, heads, t, wide], &fill)?;
        let ((), sec) = ctx.timed(|_| tk::split_heads(&xst, &mut out2, heads, off))?;
        let mut want = to64(&fill);
        tk::split_heads_host(&to64(&xs), &mut want, s, heads, wide, off);
        let name = format!("split_heads offset {off} of width {wide} {what}");
        ctx.compare(name, &out2.to_vec()?, &want, Tol::abs(0.0), sec);

        // merge_heads reads each part back (the backward of split_heads, and the attention's
        // join of head outputs).
        let dy = ctx.rng.normal_vec(out.len(), 1.0);
        let dyt = Tensor::from_slice(&ctx.dev, &per_head, &dy)?;
        for (part, off) in [(s, 0), (v, dh)] {
            let mut dx = poisoned(&ctx.dev, &token_shape(part))?;
            let ((), sec) = ctx.timed(|_| tk::merge_heads(&dyt, &mut dx, heads, off))?;
            let mut want = vec![0.0; part.len()];
            tk::merge_heads_host(&to64(&dy), &mut want, part, heads, width, off);
            let name = format!("merge_heads C={} offset {off} {what}", part.c);
            ctx.compare(name, &dx.to_vec()?, &want, Tol::abs(0.0), sec);
        }
    }
    Ok(())
}

/// The sinusoidal position encoding, added in place.
fn position_encoding(ctx: &mut Ctx) -> Result<()> {
    let mut cases = vec![(3, 7, 33), (1, 214, 64), (2, 8, 8), (1, 20_000, 64)];
    if !ctx.quick {
        cases.push((2, 19_999, 33));
    }
    for (b, t, h) in cases {
        let shape = if t % 2 == 0 {
            vec![b, t, h]
        } else {
            vec![b, t, 1, h]
        };
        let x = ctx.rng.normal_vec(b * t * h, 1.0);
        let mut xt = Tensor::from_slice(&ctx.dev, &shape, &x)?;
        let ((), s) = ctx.timed(|_| tk::position_encoding_add(&mut xt))?;
        let mut want = to64(&x);
        tk::position_encoding_add_host(&mut want, b, t, h);
        let name = format!("position_encoding_add {shape:?}");
        ctx.compare(name, &xt.to_vec()?, &want, Tol::new(2.5e-7, 1.2e-7), s);
    }
    Ok(())
}

/// Mean and first pooling, forward and backward, with and without a mask.
fn pooling(ctx: &mut Ctx) -> Result<()> {
    let mut dims = vec![
        TokenDims::new(3, 7, 3, 33),
        TokenDims::new(3, 214, 1, 64),
        TokenDims::new(1, 1, 1, 8),
    ];
    if !ctx.quick {
        dims.push(TokenDims::new(32, 214, 3, 64));
    }
    for d in dims {
        let m = token_mask(&mut ctx.rng, d.b, d.t);
        let mt = Tensor::from_slice(&ctx.dev, &[d.b, d.t], &m)?;
        let out_shape = if d.c == 1 && d.t % 2 == 1 {
            vec![d.b, d.h]
        } else {
            vec![d.b, d.c, d.h]
        };
        let mut zeros_ok = true;
        for masked in [false, true] {
            let (mask, mt) = (masked.then_some(&m[..]), masked.then_some(&mt));
            for kind in [Pool::Mean, Pool::First] {
                let what = format!("{:?} {kind:?} mask={masked}", token_shape(d));
                let x = ctx.rng.normal_vec(d.len(), 1.0);
                let xt = Tensor::from_slice(&ctx.dev, &token_shape(d), &x)?;
                let mut out = poisoned(&ctx.dev, &out_shape)?;
                let ((), s) = ctx.timed(|_| tk::pool_forward(&xt, mt, &mut out, kind))?;
                let y = out.to_vec()?;
                let mut want = vec![0.0; y.len()];
                tk::pool_forward_host(&to64(&x), mask, &mut want, d, kind);
                // A sequential f32 sum of T terms: error below T eps max|x|.
                let max_x = x.iter().fold(0.0f64, |a, &v| a.max(v.abs() as f64));
                let tol = Tol::new(d.t as f64 * EPS * max_x + 1e-7, 1e-6);
                ctx.compare(format!("pool_forward {what}"), &y, &want, tol, s);

                let dy = ctx.rng.normal_vec(y.len(), 1.0);
                let dyt = Tensor::from_slice(&ctx.dev, &out_shape, &dy)?;
                let mut dx = poisoned(&ctx.dev, &token_shape(d))?;
                let ((), s) = ctx.timed(|_| tk::pool_backward(&dyt, mt, &mut dx, kind))?;
                let dx = dx.to_vec()?;
                let mut want = vec![0.0; d.len()];
                tk::pool_backward_host(&to64(&dy), mask, &mut want, d, kind);
                let tol = Tol::new(1e-7, 2e-7);
                ctx.compare(format!("pool_backward {what}"), &dx, &want, tol, s);

                // Masked and unused tokens get exactly 0; a frame without a valid token pools
                // to 0, not NaN.
                let ch = d.c * d.h;
                zeros_ok &= dx.iter().enumerate().all(|(i, &g)| {
                    let (b, t) = (i / (d.t * ch), (i / ch) % d.t);
                    let used =
                        mask.is_none_or(|m| m[b * d.t + t] != 0) && (kind == Pool::Mean || t == 0);
                    used || g == 0.0
                });
                if masked && d.b > 1 {
                    zeros_ok &= y[ch..2 * ch].iter().all(|&v| v == 0.0);
                }
            }
        }
        let name = format!(
            "pool {:?}: masked tokens get 0, an empty frame pools to 0",
            token_shape(d)
        );
        ctx.truth(name, zeros_ok, "a masked or unused token has a gradient, or frame 1 (no valid token) pooled to nonzero");
    }
    Ok(())
}

/// The token mask, in place, over NaN in padded tokens (it must assign 0, not multiply).
fn token_mask_check(ctx: &mut Ctx) -> Result<()> {
    let mut dims = vec![TokenDims::new(3, 7, 3, 33), TokenDims::new(4, 214, 1, 64)];
    if !ctx.quick {
        dims.push(TokenDims::new(32, 214, 3, 64));
    }
    for d in dims {
        let m = token_mask(&mut ctx.rng, d.b, d.t);
        let row = d.c * d.h;
        let mut x = ctx.rng.normal_vec(d.len(), 1.0);
        for (i, v) in x.iter_mut().enumerate() {
            if m[i / row] == 0 && i % 2 == 0 {
                *v = f32::NAN;
            }
        }
        let mut want = to64(&x);
        tk::apply_token_mask_host(&mut want, &m, row);
        let mut xt = Tensor::from_slice(&ctx.dev, &token_shape(d), &x)?;
        let mt = Tensor::from_slice(&ctx.dev, &[d.b, d.t], &m)?;
        let ((), s) = ctx.timed(|_| tk::apply_token_mask(&mut xt, &mt))?;
        let name = format!("apply_token_mask {:?}", token_shape(d));
        ctx.compare(name, &xt.to_vec()?, &want, Tol::abs(0.0), s);
    }
    Ok(())
}
