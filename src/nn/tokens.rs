//! Tape ops that move token features around ([`crate::ops::tokens`]): the window merger's
//! gather, attention heads, the position encoding, pooling and padding masks. Features are
//! `[B, T, C, H]` with C = 1 for scalars (stored `[B, T, H]`) and C = 3 for vectors.

use crate::ops::tokens as tk;
use crate::tape::{Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use std::sync::Arc;

pub use tk::Pool;

/// (B, T, C, H) of a feature value: `[B, T, H]` scalars or `[B, T, 3, H]` vectors.
pub fn dims(tape: &Tape, x: Var) -> Result<(usize, usize, usize, usize)> {
    match *tape.shape(x) {
        [b, t, h] => Ok((b, t, 1, h)),
        [b, t, c, h] => Ok((b, t, c, h)),
        ref s => anyhow::bail!("token features must be [B, T, H] or [B, T, C, H], got {s:?}"),
    }
}

fn feature_shape(b: usize, t: usize, c: usize, h: usize) -> Vec<usize> {
    if c == 1 {
        vec![b, t, h]
    } else {
        vec![b, t, c, h]
    }
}

/// Groups of `w` consecutive tokens side by side: `[B, T, C, H] -> [B, ceil(T/w), C, w H]`, the
/// last group zero-padded (TMM step c before its Linear).
pub fn window_merge_gather(tape: &mut Tape, x: Var, w: usize) -> Result<Var> {
    let (b, t, c, h) = dims(tape, x)?;
    let tw = tk::padded_tokens(t, w);
    let mut y = tape.alloc(&feature_shape(b, tw, c, w * h))?;
    tk::window_merge_gather(tape.value(x), &mut y, w)?;
    let needs = tape.needs_grad(x);
    tape.record1("window_merge_gather", y, needs, move |ctx, dy| {
        ctx.add_grad(x, |dx| tk::window_merge_scatter(dy, dx, w))
    })
}

/// Attention values of each head: scalars `vs [B, T, H]` and vectors `v [B, T, 3, H]` into
/// `[B, heads, T, 4 dh]` (dh scalar values, then the three components of dh vector channels).
pub fn head_values(tape: &mut Tape, vs: Var, v: Var, heads: usize) -> Result<Var> {
    let (b, t, _, h) = dims(tape, vs)?;
    ensure!(
        dims(tape, v)? == (b, t, 3, h),
        "head_values: vectors {:?} do not match scalars {:?}",
        tape.shape(v),
        tape.shape(vs)
    );
    ensure!(
        heads > 0 && h % heads == 0,
        "head_values: {h} channels do not split into {heads} heads"
    );
    let dh = h / heads;
    let mut y = tape.alloc(&[b, heads, t, 4 * dh])?;
    tk::split_heads(tape.value(vs), &mut y, heads, 0)?;
    tk::split_heads(tape.value(v), &mut y, heads, dh)?;
    let needs = tape.any_needs(&[vs, v], &[]);
    tape.record1("head_values", y, needs, move |ctx, dy| {
        ctx.add_grad(vs, |d| tk::merge_heads(dy, d, heads, 0))?;
        ctx.add_grad(v, |d| tk::merge_heads(dy, d, heads, dh))
    })
}

/// Queries or keys of each head: `[B, T, H] -> [B, heads, T, dh]`.
pub fn split_heads(tape: &mut Tape, x: Var, heads: usize) -> Result<Var> {
    let (b, t, c, h) = dims(tape, x)?;
    ensure!(c == 1, "split_heads: expects scalars [B, T, H]");
    ensure!(
        heads > 0 && h % heads == 0,
        "split_heads: {h} channels do not split into {heads} heads"
    );
    let mut y = tape.alloc(&[b, heads, t, h / heads])?;
    tk::split_heads(tape.value(x), &mut y, heads, 0)?;
    let needs = tape.needs_grad(x);
    tape.record1("split_heads", y, needs, move |ctx, dy| {
        ctx.add_grad(x, |dx| tk::merge_heads(dy, dx, heads, 0))
    })
}

/// Joins head outputs `[B, heads, T, width]` back into features `[B, T, C, H]`, taking columns
/// `col_offset .. col_offset + C dh` of each head.
pub fn merge_heads(tape: &mut Tape, o: Var, c: usize, h: usize, col_offset: usize) -> Result<Var> {
    let &[b, heads, t, _] = tape.shape(o) else {
        anyhow::bail!(
            "merge_heads: expects [B, heads, T, width], got {:?}",
            tape.shape(o)
        );
    };
    let mut y = tape.alloc(&feature_shape(b, t, c, h))?;
    tk::merge_heads(tape.value(o), &mut y, heads, col_offset)?;
    let needs = tape.needs_grad(o);
    tape.record1("merge_heads", y, needs, move |ctx, dy| {
        // The columns of other groups get no gradient from this op: zero them, then write ours.
        ctx.add_grad(o, |d| {
            d.fill_bytes(0)?;
            tk::split_heads(dy, d, heads, col_offset)
        })
    })
}

/// s + PE: the sinusoidal position encoding of each token's index, on scalars `[B, T, H]`.
/// Its gradient passes through unchanged.
pub fn position_encoding(tape: &mut Tape, s: Var) -> Result<Var> {
    let mut y = tape.alloc_like(s)?;
    crate::ops::elementwise::scale(1.0, tape.value(s), &mut y)?;
    tk::position_encoding_add(&mut y)?;
    let needs = tape.needs_grad(s);
    tape.record1("position_encoding", y, needs, move |ctx, dy| {
        ctx.add_grad(s, |dx| crate::ops::elementwise::scale(1.0, dy, dx))
    })
}

/// Pooling over tokens: `[B, T, C, H] -> [B, C, H]` (mean over valid tokens, or the first).
pub fn pool(tape: &mut Tape, x: Var, mask: Option<Arc<Tensor<u8>>>, kind: Pool) -> Result<Var> {
    let (b, _, c, h) = dims(tape, x)?;
    let shape = if c == 1 { vec![b, h] } else { vec![b, c, h] };
    let mut y = tape.alloc(&shape)?;
    tk::pool_forward(tape.value(x), mask.as_deref(), &mut y, kind)?;
    let needs = tape.needs_grad(x);
    tape.record1("pool", y, needs, move |ctx, dy| {
        ctx.add_grad(x, |dx| tk::pool_backward(dy, mask.as_deref(), dx, kind))
    })
}

/// Zeroes the features of padding tokens (mask `[B, T]`, 0 = padding).
pub fn token_mask(tape: &mut Tape, x: Var, mask: Arc<Tensor<u8>>) -> Result<Var> {
    let mut y = tape.alloc_like(x)?;
    crate::ops::elementwise::scale(1.0, tape.value(x), &mut y)?;
    tk::apply_token_mask(&mut y, &mask)?;
    let needs = tape.needs_grad(x);
    tape.record1("token_mask", y, needs, move |ctx, dy| {
        ctx.add_grad(x, |dx| {
            crate::ops::elementwise::scale(1.0, dy, dx)?;
            tk::apply_token_mask(dx, &mask)
        })
    })
}
