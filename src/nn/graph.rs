//! Tape op of the residue graph convolution ([`crate::ops::graph_conv`]): the neighbour sum over
//! a C-alpha radius graph, optionally gated per edge and channel.

use crate::ops::graph_conv::{self as gc, DeviceGraph};
use crate::tape::{Tape, Var};
use anyhow::Result;
use std::sync::Arc;

/// `out[i] = sum over neighbours j of gate[e(i, j)] * x[j]`, for `x [N, H]` or `[N, 3, H]`
/// (one gate per edge and channel `[E, H]`, the same for all xyz components; 1 without a gate).
pub fn graph_aggregate(
    tape: &mut Tape,
    graph: Arc<DeviceGraph>,
    x: Var,
    gate: Option<Var>,
) -> Result<Var> {
    let mut y = tape.alloc_like(x)?;
    gc::graph_aggregate_forward(&graph, tape.value(x), gate.map(|g| tape.value(g)), &mut y)?;
    let inputs: Vec<Var> = std::iter::once(x).chain(gate).collect();
    let needs = tape.any_needs(&inputs, &[]);
    tape.record1("graph_aggregate", y, needs, move |ctx, dy| {
        let vals = ctx.vals;
        let gv = gate.map(|g| &vals[g.0]);
        ctx.add_grad(x, |dx| {
            gc::graph_aggregate_backward(&graph, &vals[x.0], gv, dy, Some(dx), None)
        })?;
        if let Some(g) = gate {
            ctx.add_grad(g, |dg| {
                gc::graph_aggregate_backward(&graph, &vals[x.0], gv, dy, None, Some(dg))
            })?;
        }
        Ok(())
    })
}
