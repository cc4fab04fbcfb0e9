//! Tape ops on scalar + vector features ([`crate::ops::equivariant`]): the equivariant layer norm,
//! vector gating by scalars, vector norms and dot products, and the scalar head of equivariant
//! attention.

use crate::ops::equivariant as eq;
use crate::tape::{ParamId, Tape, Var};
use anyhow::{ensure, Result};

/// Rows and channels of scalars `s [.., H]` with vectors `v [.., 3, H]` beside them.
fn rows_channels(tape: &Tape, s: Var, v: Option<Var>) -> Result<(usize, usize)> {
    let ss = tape.shape(s);
    let h = *ss.last().unwrap_or(&0);
    let rows = tape.value(s).len() / h.max(1);
    if let Some(v) = v {
        ensure!(
            tape.value(v).len() == rows * 3 * h,
            "vector features {:?} do not match scalars {:?} (expected [.., 3, {h}])",
            tape.shape(v),
            ss
        );
    }
    Ok((rows, h))
}

/// EqLN: s normalised over channels with a learned scale and shift; v divided by the root mean
/// square of its channels' norms (one factor per token, so directions are untouched) and scaled
/// per channel. Returns (s', v').
pub fn eq_layernorm(
    tape: &mut Tape,
    s: Var,
    v: Var,
    gamma_s: ParamId,
    beta_s: ParamId,
    gamma_v: ParamId,
    eps: f32,
) -> Result<(Var, Var)> {
    let (rows, _) = rows_channels(tape, s, Some(v))?;
    let mut s_out = tape.alloc_like(s)?;
    let mut v_out = tape.alloc_like(v)?;
    let mut stats = tape.alloc(&[rows, 3])?;
    {
        let p = tape.params();
        eq::eq_layernorm_forward(
            tape.value(s),
            tape.value(v),
            p.value(gamma_s),
            p.value(beta_s),
            p.value(gamma_v),
            eps,
            &mut s_out,
            &mut v_out,
            &mut stats,
        )?;
    }
    // The statistics ride on the tape as a value without gradient.
    let stats = tape.input(stats)?;
    let needs = tape.any_needs(&[s, v], &[gamma_s, beta_s, gamma_v]);
    let out = tape.record(
        "eq_layernorm",
        vec![s_out, v_out],
        needs,
        move |ctx, dys| {
            let (vals, ps) = (ctx.vals, ctx.params);
            let mut ds = ctx.scratch(vals[s.0].shape())?;
            let mut dv = ctx.scratch(vals[v.0].shape())?;
            let h = ps[gamma_s.0].len();
            let rows = vals[s.0].len() / h.max(1);
            let mut partials = ctx.scratch(&[eq::eq_layernorm_backward_scratch_len(rows, h)])?;
            {
                let [dgs, dbs, dgv] = ctx.param_grads([gamma_s, beta_s, gamma_v])?;
                eq::eq_layernorm_backward_with_scratch(
                    &vals[s.0],
                    &vals[v.0],
                    &ps[gamma_s.0],
                    &ps[gamma_v.0],
                    &vals[stats.0],
                    dys[0],
                    dys[1],
                    &mut ds,
                    &mut dv,
                    dgs,
                    dbs,
                    dgv,
                    &mut partials,
                )?;
            }
            ctx.recycle(partials);
            ctx.give_grad(s, ds)?;
            ctx.give_grad(v, dv)
        },
    )?;
    Ok((out[0], out[1]))
}

/// y[.., c, h] = g[.., h] * u[.., c, h]: scalars gate vector channels (all xyz alike).
pub fn vector_gate(tape: &mut Tape, g: Var, u: Var) -> Result<Var> {
    let mut y = tape.alloc_like(u)?;
    eq::vector_gate_forward(tape.value(g), tape.value(u), &mut y)?;
    let needs = tape.any_needs(&[g, u], &[]);
    tape.record1("vector_gate", y, needs, move |ctx, dy| {
        let vals = ctx.vals;
        let (gv, uv) = (&vals[g.0], &vals[u.0]);
        if ctx.needs(g) {
            ctx.add_grad(g, |dg| eq::vector_gate_backward(gv, uv, dy, Some(dg), None))?;
        }
        ctx.add_grad(u, |du| eq::vector_gate_backward(gv, uv, dy, None, Some(du)))
    })
}

/// |v| per channel: sqrt(sum_xyz v^2 + eps), `[.., 3, H] -> [.., H]`.
pub fn vector_norm(tape: &mut Tape, v: Var, eps: f32) -> Result<Var> {
    let vs = tape.shape(v).to_vec();
    ensure!(
        vs.len() >= 2 && vs[vs.len() - 2] == 3,
        "vector_norm: {vs:?} is not [.., 3, H]"
    );
    let mut shape = vs[..vs.len() - 2].to_vec();
    shape.push(vs[vs.len() - 1]);
    let mut y = tape.alloc(&shape)?;
    eq::vector_norm_forward(tape.value(v), &mut y, eps)?;
    let needs = tape.needs_grad(v);
    let yv = tape.next_var();
    tape.record1("vector_norm", y, needs, move |ctx, dy| {
        let vals = ctx.vals;
        ctx.add_grad(v, |dv| {
            eq::vector_norm_backward(&vals[v.0], &vals[yv.0], dy, dv)
        })
    })
}

/// `<a, b>` over xyz per channel: `[.., 3, H] x [.., 3, H] -> [.., H]` (a rotation invariant).
pub fn vector_dot(tape: &mut Tape, a: Var, b: Var) -> Result<Var> {
    let s = tape.shape(a).to_vec();
    ensure!(
        s.len() >= 2 && s[s.len() - 2] == 3 && tape.shape(b) == s.as_slice(),
        "vector_dot: {s:?} and {:?} are not two [.., 3, H]",
        tape.shape(b)
    );
    let mut shape = s[..s.len() - 2].to_vec();
    shape.push(s[s.len() - 1]);
    let mut y = tape.alloc(&shape)?;
    eq::vector_dot_forward(tape.value(a), tape.value(b), &mut y)?;
    let needs = tape.any_needs(&[a, b], &[]);
    tape.record1("vector_dot", y, needs, move |ctx, dy| {
        let vals = ctx.vals;
        let mut da = ctx.scratch(vals[a.0].shape())?;
        let mut db = ctx.scratch(vals[b.0].shape())?;
        eq::vector_dot_backward(&vals[a.0], &vals[b.0], dy, &mut da, &mut db)?;
        ctx.give_grad(a, da)?;
        ctx.give_grad(b, db)
    })
}

/// sum_xyz a * b of the two halves of `ab [.., 3, 2H]` (one projection W = [W1; W2] applied per
/// xyz row): `[.., H]`.
pub fn vector_dot_split(tape: &mut Tape, ab: Var) -> Result<Var> {
    let abs = tape.shape(ab).to_vec();
    ensure!(
        abs.len() >= 2 && abs[abs.len() - 2] == 3 && abs[abs.len() - 1].is_multiple_of(2),
        "vector_dot_split: {abs:?} is not [.., 3, 2H]"
    );
    let mut shape = abs[..abs.len() - 2].to_vec();
    shape.push(abs[abs.len() - 1] / 2);
    let mut y = tape.alloc(&shape)?;
    eq::vector_dot_split_forward(tape.value(ab), &mut y)?;
    let needs = tape.needs_grad(ab);
    tape.record1("vector_dot_split", y, needs, move |ctx, dy| {
        let vals = ctx.vals;
        ctx.add_grad(ab, |dab| {
            eq::vector_dot_split_backward(&vals[ab.0], dy, dab)
        })
    })
}

/// out = vdot * o1 + vnorm * o2 + o3 with `[o1, o2, o3] = o [.., 3H]`: the scalar output of
/// equivariant attention.
pub fn eq_scalar_combine(tape: &mut Tape, vdot: Var, vnorm: Var, o: Var) -> Result<Var> {
    let mut y = tape.alloc_like(vdot)?;
    eq::eq_scalar_combine_forward(tape.value(vdot), tape.value(vnorm), tape.value(o), &mut y)?;
    let needs = tape.any_needs(&[vdot, vnorm, o], &[]);
    tape.record1("eq_scalar_combine", y, needs, move |ctx, dy| {
        let vals = ctx.vals;
        let mut dd = ctx.scratch(vals[vdot.0].shape())?;
        let mut dn = ctx.scratch(vals[vnorm.0].shape())?;
        let mut dout = ctx.scratch(vals[o.0].shape())?;
        eq::eq_scalar_combine_backward(
            &vals[vdot.0],
            &vals[vnorm.0],
            &vals[o.0],
            dy,
            &mut dd,
            &mut dn,
            &mut dout,
        )?;
        ctx.give_grad(vdot, dd)?;
        ctx.give_grad(vnorm, dn)?;
        ctx.give_grad(o, dout)
    })
}

/// `[a, b]` along the last dimension: `[rows, Ha] ++ [rows, Hb] -> [rows, Ha + Hb]`.
pub fn concat_columns(tape: &mut Tape, a: Var, b: Var) -> Result<Var> {
    let ha = *tape.shape(a).last().unwrap_or(&0);
    let hb = *tape.shape(b).last().unwrap_or(&0);
    let shape = {
        let mut s = tape.shape(a).to_vec();
        if let Some(l) = s.last_mut() {
            *l = ha + hb;
        }
        s
    };
    let mut y = tape.alloc(&shape)?;
    eq::concat_columns(tape.value(a), tape.value(b), &mut y)?;
    let needs = tape.any_needs(&[a, b], &[]);
    tape.record1("concat_columns", y, needs, move |ctx, dy| {
        let vals = ctx.vals;
        let mut da = ctx.scratch(vals[a.0].shape())?;
        let mut db = ctx.scratch(vals[b.0].shape())?;
        eq::split_columns(dy, &mut da, &mut db)?;
        ctx.give_grad(a, da)?;
        ctx.give_grad(b, db)
    })
}
