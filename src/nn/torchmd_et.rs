//! The TorchMD-ET layer of the atom stage (SPEC step 2; Thölke & De Fabritiis 2022, TorchMD-Net's
//! `EquivariantMultiHeadAttention`): tape ops over [`crate::ops::torchmd_et`] and the layer
//! [`EtLayer`]. The backbone that stacks them is [`crate::nn::painn::Backbone`] with
//! `kind = "et"`.
//!
//! ```text
//! x = LayerNorm(s);  q = Wq x,  key = Wk x,  val = Wv x (3H);  (vec1, vec2, vec3) = Wvec v
//! vec_dot = <vec1, vec2> (over xyz, per channel)
//! (xagg, vagg) = fused attention messages over the radius graph (ops::torchmd_et)
//! (o1, o2, o3) = Wo xagg;  s += vec_dot * o2 + o3;  v += vec3 * o1 + vagg
//! ```
//!
//! Vectors are only mixed across channels (bias-free, per xyz) or scaled by invariants, so s
//! stays invariant and v rotates with the positions.

use super::layers::Linear;
use super::painn::split3;
use super::{add, equivariant as eqn};
use crate::device::Device;
use crate::ops::neighbor_list::NeighborList;
use crate::ops::painn::{self as pn, RadialBasis};
use crate::ops::torchmd_et::{self as et, EtFilterGrads, EtGrads, EtTensors};
use crate::tape::{Init, ParamId, ParamStore, Tape, Var};
use anyhow::{ensure, Result};
use std::sync::Arc;

/// The layer norms' epsilon (PyTorch's `nn.LayerNorm` default).
pub const LAYERNORM_EPS: f32 = 1e-5;

/// The distance filters of the attention: `Linear(K -> H)` for the keys and `Linear(K -> 3H)`
/// for the values, applied (with SiLU) to the basis of every edge inside the kernels.
#[derive(Clone, Copy, Debug)]
pub struct EtFilters {
    /// `[H, K]`.
    pub w_dk: ParamId,
    /// `[H]`.
    pub b_dk: ParamId,
    /// `[3H, K]`.
    pub w_dv: ParamId,
    /// `[3H]`.
    pub b_dv: ParamId,
}

/// The fused attention messages ([`crate::ops::torchmd_et`]) for `q`, `key [N, H]`,
/// `val [N, 3H]` and `vec [N, 3, H]` (N atoms in the list's row order): returns
/// `(xagg [.., H], vagg [.., 3, H])`. Gradients reach the four inputs, the filters (accumulated)
/// and `positions [N, 3]` (when it was recorded with [`Tape::input_with_grad`] or depends on a
/// parameter); no per-edge tensor is stored, the backward recomputes what it needs.
#[allow(clippy::too_many_arguments)] // the graph, five values, the filters, basis and heads
pub fn et_message(
    tape: &mut Tape,
    nl: &Arc<NeighborList>,
    positions: Var,
    q: Var,
    key: Var,
    val: Var,
    vec: Var,
    filters: EtFilters,
    basis: RadialBasis,
    heads: usize,
) -> Result<(Var, Var)> {
    let EtFilters {
        w_dk,
        b_dk,
        w_dv,
        b_dv,
    } = filters;
    let mut xagg = tape.alloc_like(q)?;
    let mut vagg = tape.alloc_like(vec)?;
    {
        let p = tape.params();
        let t = EtTensors {
            positions: tape.value(positions),
            q: tape.value(q),
            key: tape.value(key),
            val: tape.value(val),
            vec: tape.value(vec),
            w_dk: p.value(w_dk),
            b_dk: p.value(b_dk),
            w_dv: p.value(w_dv),
            b_dv: p.value(b_dv),
        };
        et::et_message_forward(nl, &t, basis, heads, &mut xagg, &mut vagg)?;
    }
    let params = [w_dk, b_dk, w_dv, b_dv];
    let needs = tape.any_needs(&[positions, q, key, val, vec], &params);
    let nl = nl.clone();
    let out = tape.record("et_message", vec![xagg, vagg], needs, move |ctx, dys| {
        let (gx, gv) = (dys[0], dys[1]);
        let e = nl.edges();
        let take = |ctx: &mut crate::tape::Ctx<'_>, v: Var| -> Result<Option<_>> {
            if ctx.needs(v) {
                let shape = ctx.vals[v.0].shape().to_vec();
                Ok(Some(ctx.scratch(&shape)?))
            } else {
                Ok(None)
            }
        };
        let mut dq = take(ctx, q)?;
        let mut dkey = take(ctx, key)?;
        let mut dval = take(ctx, val)?;
        let mut dvec = take(ctx, vec)?;
        let mut dedge = match ctx.needs(positions) && e > 0 {
            true => Some(ctx.scratch(&[e, 3])?),
            false => None,
        };
        let (vals, ps) = (ctx.vals, ctx.params);
        let t = EtTensors {
            positions: &vals[positions.0],
            q: &vals[q.0],
            key: &vals[key.0],
            val: &vals[val.0],
            vec: &vals[vec.0],
            w_dk: &ps[w_dk.0],
            b_dk: &ps[b_dk.0],
            w_dv: &ps[w_dv.0],
            b_dv: &ps[b_dv.0],
        };
        et::et_message_backward(
            &nl,
            &t,
            basis,
            heads,
            gx,
            gv,
            EtGrads {
                dq: dq.as_mut(),
                dkey: dkey.as_mut(),
                dval: dval.as_mut(),
                dvec: dvec.as_mut(),
                dedge: dedge.as_mut(),
            },
        )?;
        let wanted = params.map(|p| ctx.needs_param(p));
        if wanted.iter().any(|&w| w) {
            // The per-block partial sums come from the tape's pool: no allocation after step one.
            let h = vals[q.0].shape().last().copied().unwrap_or(0);
            let mut scratch = match gx.device() {
                Device::Cpu => None,
                _ => {
                    let len = et::et_filter_backward_scratch_len(e, h, basis.size);
                    Some(ctx.scratch(&[len.max(1)])?)
                }
            };
            {
                let [gwk, gbk, gwv, gbv] = ctx.param_grads(params)?;
                et::et_filter_backward(
                    &nl,
                    &t,
                    basis,
                    heads,
                    gx,
                    gv,
                    EtFilterGrads {
                        dw_dk: wanted[0].then_some(gwk),
                        db_dk: wanted[1].then_some(gbk),
                        dw_dv: wanted[2].then_some(gwv),
                        db_dv: wanted[3].then_some(gbv),
                    },
                    scratch.as_mut(),
                )?;
            }
            if let Some(s) = scratch {
                ctx.recycle(s);
            }
        }
        if ctx.needs(positions) {
            match dedge {
                Some(dedge) => {
                    ctx.add_grad(positions, |dp| pn::painn_position_backward(&nl, &dedge, dp))?;
                    ctx.recycle(dedge);
                }
                // No edges: the messages do not depend on the positions.
                None => ctx.add_grad(positions, |dp| dp.fill_bytes(0))?,
            }
        }
        for (v, g) in [(q, dq), (key, dkey), (val, dval), (vec, dvec)] {
            if let Some(g) = g {
                ctx.give_grad(v, g)?;
            }
        }
        Ok(())
    })?;
    Ok((out[0], out[1]))
}

/// Layer norm over the last dimension of `x` with scale `gamma [H]` and shift `beta [H]`.
pub fn et_layernorm(
    tape: &mut Tape,
    x: Var,
    gamma: ParamId,
    beta: ParamId,
    eps: f32,
) -> Result<Var> {
    let h = tape.params().value(gamma).len();
    ensure!(h > 0, "et_layernorm: empty scale");
    let rows = tape.value(x).len() / h;
    let mut y = tape.alloc_like(x)?;
    let mut stats = tape.alloc(&[rows, 2])?;
    {
        let p = tape.params();
        et::et_layernorm_forward(
            tape.value(x),
            p.value(gamma),
            p.value(beta),
            eps,
            &mut y,
            &mut stats,
        )?;
    }
    // The statistics ride on the tape as a value without gradient.
    let stats = tape.input(stats)?;
    let needs = tape.any_needs(&[x], &[gamma, beta]);
    tape.record1("et_layernorm", y, needs, move |ctx, dy| {
        let vals = ctx.vals;
        let mut dx = match ctx.needs(x) {
            true => Some(ctx.scratch(vals[x.0].shape())?),
            false => None,
        };
        let (wg, wb) = (ctx.needs_param(gamma), ctx.needs_param(beta));
        let mut scratch = match dy.device() {
            Device::Cpu => None,
            _ => Some(ctx.scratch(&[et::et_layernorm_backward_scratch_len(rows, h)])?),
        };
        {
            let ps = ctx.params;
            let [dg, db] = ctx.param_grads([gamma, beta])?;
            et::et_layernorm_backward(
                &vals[x.0],
                &ps[gamma.0],
                &vals[stats.0],
                dy,
                dx.as_mut(),
                wg.then_some(dg),
                wb.then_some(db),
                scratch.as_mut(),
            )?;
        }
        if let Some(s) = scratch {
            ctx.recycle(s);
        }
        match dx {
            Some(g) => ctx.give_grad(x, g),
            None => Ok(()),
        }
    })
}

/// A scalar layer norm's parameters (`name.weight` = 1, `name.bias` = 0).
#[derive(Clone, Debug)]
pub struct EtLayerNorm {
    /// Scale `[H]`.
    pub gamma: ParamId,
    /// Shift `[H]`.
    pub beta: ParamId,
}

impl EtLayerNorm {
    /// A layer norm over `hidden` channels.
    pub fn new(ps: &mut ParamStore, name: &str, hidden: usize) -> Result<Self> {
        Ok(Self {
            gamma: ps.add(&format!("{name}.weight"), &[hidden], Init::Constant(1.0))?,
            beta: ps.add(&format!("{name}.bias"), &[hidden], Init::Constant(0.0))?,
        })
    }

    /// Normalises `x [.., H]`.
    pub fn forward(&self, tape: &mut Tape, x: Var) -> Result<Var> {
        et_layernorm(tape, x, self.gamma, self.beta, LAYERNORM_EPS)
    }
}

/// One TorchMD-ET attention layer (module docs), residual on s and v. Parameters under `name`:
/// `layernorm.*`, `q_proj`, `k_proj`, `v_proj` (H -> 3H), `vec_proj` (H -> 3H, bias-free, per
/// xyz), `dk_proj` (K -> H), `dv_proj` (K -> 3H), `o_proj` (H -> 3H).
#[derive(Clone, Debug)]
pub struct EtLayer {
    norm: EtLayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    vec: Linear,
    dk: Linear,
    dv: Linear,
    o: Linear,
    basis: RadialBasis,
    heads: usize,
}

impl EtLayer {
    /// A layer over `hidden` channels in `heads` heads with `basis`.
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        hidden: usize,
        heads: usize,
        basis: RadialBasis,
    ) -> Result<Self> {
        ensure!(
            heads > 0 && hidden.is_multiple_of(heads),
            "{name}: heads = {heads} must divide hidden = {hidden}"
        );
        let h = hidden;
        Ok(Self {
            norm: EtLayerNorm::new(ps, &format!("{name}.layernorm"), h)?,
            q: Linear::new(ps, &format!("{name}.q_proj"), h, h, true)?,
            k: Linear::new(ps, &format!("{name}.k_proj"), h, h, true)?,
            v: Linear::new(ps, &format!("{name}.v_proj"), h, 3 * h, true)?,
            vec: Linear::new(ps, &format!("{name}.vec_proj"), h, 3 * h, false)?,
            dk: Linear::new(ps, &format!("{name}.dk_proj"), basis.size, h, true)?,
            dv: Linear::new(ps, &format!("{name}.dv_proj"), basis.size, 3 * h, true)?,
            o: Linear::new(ps, &format!("{name}.o_proj"), h, 3 * h, true)?,
            basis,
            heads,
        })
    }

    /// `(s + ds, v + dv)` for `s [.., H]`, `v [.., 3, H]` of the list's atoms.
    pub fn forward(
        &self,
        tape: &mut Tape,
        s: Var,
        v: Var,
        positions: Var,
        nl: &Arc<NeighborList>,
    ) -> Result<(Var, Var)> {
        let x = self.norm.forward(tape, s)?;
        let q = self.q.forward(tape, x)?;
        let key = self.k.forward(tape, x)?;
        let val = self.v.forward(tape, x)?;
        let vp = self.vec.forward(tape, v)?;
        let (vec1, vec2, vec3) = split3(tape, vp)?;
        let vec_dot = eqn::vector_dot(tape, vec1, vec2)?;
        let (Some(b_dk), Some(b_dv)) = (self.dk.b, self.dv.b) else {
            anyhow::bail!("TorchMD-ET layer: a distance filter has no bias");
        };
        let filters = EtFilters {
            w_dk: self.dk.w,
            b_dk,
            w_dv: self.dv.w,
            b_dv,
        };
        let (xagg, vagg) = et_message(
            tape, nl, positions, q, key, val, v, filters, self.basis, self.heads,
        )?;
        let o = self.o.forward(tape, xagg)?;
        let (o1, o2, o3) = split3(tape, o)?;
        let t = eqn::vector_gate(tape, o2, vec_dot)?;
        let ds = add(tape, t, o3)?;
        let t = eqn::vector_gate(tape, o1, vec3)?;
        let dv = add(tape, t, vagg)?;
        Ok((add(tape, s, ds)?, add(tape, v, dv)?))
    }
}
