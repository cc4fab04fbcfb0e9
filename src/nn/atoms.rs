//! Tape ops of the atom stage ([`crate::ops::scatter`]): the atomic-number embedding and the
//! atom-to-token merge (TMM step a). Atom features are `[F, A, H]` (scalars) or `[F, A, 3, H]`
//! (vectors), one map shared by every frame.

use crate::device::Device;
use crate::ops::scatter::{self as sc, DeviceEmbeddingIndex, DeviceTokenMap};
use crate::tape::{ParamId, Tape, Var};
use anyhow::{bail, Result};
use std::sync::Arc;

pub use sc::Reduce;

/// `out[f, a, :] = table[index[a], :]`: `[frames, A, H]` from the table `[V, H]`, the same atoms
/// in every frame. The table's gradient is ACCUMULATED (`+=`, deterministic: a gather per chunk
/// of each row's atoms, then per row) when the table is trainable.
pub fn embedding(
    tape: &mut Tape,
    table: ParamId,
    index: Arc<DeviceEmbeddingIndex>,
    frames: usize,
) -> Result<Var> {
    let &[_, h] = tape.params().value(table).shape() else {
        bail!(
            "embedding: the table has shape {:?}, expected [rows, channels]",
            tape.params().value(table).shape()
        );
    };
    let mut y = tape.alloc(&[frames, index.atoms(), h])?;
    sc::embedding_forward(tape.params().value(table), &index, &mut y)?;
    let needs = tape.any_needs(&[], &[table]);
    tape.record1("embedding", y, needs, move |ctx, dy| {
        if !ctx.needs_param(table) {
            return Ok(());
        }
        if let Device::Cpu = dy.device() {
            return sc::embedding_backward(&index, dy, ctx.param_grad(table));
        }
        // The per-chunk partial sums come from the tape's pool: no allocation after step one.
        let mut scratch = ctx.scratch(&[index.scratch_len(h).max(1)])?;
        let r =
            sc::embedding_backward_with_scratch(&index, dy, ctx.param_grad(table), &mut scratch);
        ctx.recycle(scratch);
        r
    })
}

/// TMM step a: each token gets the sum or mean of its atoms' features. `x` is `[F, A, H]` or
/// `[F, A, C, H]` (also `[A, H]`); the result has the map's R tokens in place of A. The input's
/// gradient is ASSIGNED by the backward gather (each atom its token's gradient, divided by the
/// token's atom count for a mean; 0 for atoms left out of the map).
pub fn token_merge(
    tape: &mut Tape,
    map: Arc<DeviceTokenMap>,
    x: Var,
    reduce: Reduce,
) -> Result<Var> {
    let shape = sc::token_merge_output_shape(&map, tape.shape(x))?;
    let mut y = tape.alloc(&shape)?;
    sc::token_merge_forward(&map, tape.value(x), &mut y, reduce)?;
    let needs = tape.needs_grad(x);
    tape.record1("token_merge", y, needs, move |ctx, dy| {
        ctx.add_grad(x, |dx| sc::token_merge_backward(&map, dy, dx, reduce))
    })
}
