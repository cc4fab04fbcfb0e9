//! Layers: parameters in a [`ParamStore`] plus a `forward` that records tape ops.
//!
//! The equivariant ones take and return scalar features `s [B, T, H]` and vector features
//! `v [B, T, 3, H]` (see the module docs of [`crate::nn`]).

use super::{equivariant as eqn, graph, tokens};
use crate::ops::graph_conv::DeviceGraph;
use crate::tape::{Init, ParamId, ParamStore, Tape, Var};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use std::sync::Arc;

/// y = x W^T + b, initialised as PyTorch does (uniform in ±1/sqrt(fan_in)).
#[derive(Clone, Debug)]
pub struct Linear {
    /// Weight `[out, in]`.
    pub w: ParamId,
    /// Bias `[out]`, if any.
    pub b: Option<ParamId>,
    /// Input width.
    pub in_f: usize,
    /// Output width.
    pub out_f: usize,
}

impl Linear {
    /// A Linear layer named `name` (parameters `name.weight`, `name.bias`).
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        in_f: usize,
        out_f: usize,
        bias: bool,
    ) -> Result<Self> {
        ensure!(in_f > 0 && out_f > 0, "{name}: Linear({in_f} -> {out_f})");
        let bound = 1.0 / (in_f as f32).sqrt();
        let w = ps.add(
            &format!("{name}.weight"),
            &[out_f, in_f],
            Init::Uniform(bound),
        )?;
        let b = if bias {
            Some(ps.add(&format!("{name}.bias"), &[out_f], Init::Uniform(bound))?)
        } else {
            None
        };
        Ok(Self { w, b, in_f, out_f })
    }

    /// Applies the layer over the last dimension of `x`.
    pub fn forward(&self, tape: &mut Tape, x: Var) -> Result<Var> {
        super::linear(tape, x, self.w, self.b)
    }
}

/// EquiLinear: a Linear with bias on the scalars and one bias-free Linear shared by the three
/// xyz components of the vectors (a bias on vectors would break equivariance).
#[derive(Clone, Debug)]
pub struct EquiLinear {
    /// The scalar map.
    pub s: Linear,
    /// The vector map (no bias).
    pub v: Linear,
}

impl EquiLinear {
    /// `in_f` to `out_f` channels.
    pub fn new(ps: &mut ParamStore, name: &str, in_f: usize, out_f: usize) -> Result<Self> {
        Ok(Self {
            s: Linear::new(ps, &format!("{name}.s"), in_f, out_f, true)?,
            v: Linear::new(ps, &format!("{name}.v"), in_f, out_f, false)?,
        })
    }

    /// (s, v) -> (s W_s^T + b, v W_v^T per xyz).
    pub fn forward(&self, tape: &mut Tape, s: Var, v: Var) -> Result<(Var, Var)> {
        Ok((self.s.forward(tape, s)?, self.v.forward(tape, v)?))
    }
}

/// EqLN: learned scale and shift on normalised scalars; vectors divided by the root mean square
/// of their channel norms, with a learned per-channel scale.
#[derive(Clone, Debug)]
pub struct EqLayerNorm {
    /// Scalar scale `[H]`.
    pub gamma_s: ParamId,
    /// Scalar shift `[H]`.
    pub beta_s: ParamId,
    /// Vector scale `[H]`.
    pub gamma_v: ParamId,
    /// Added to variances.
    pub eps: f32,
}

impl EqLayerNorm {
    /// An EqLN over `h` channels, scales at 1 and shift at 0.
    pub fn new(ps: &mut ParamStore, name: &str, h: usize, eps: f32) -> Result<Self> {
        Ok(Self {
            gamma_s: ps.add(&format!("{name}.gamma_s"), &[h], Init::Constant(1.0))?,
            beta_s: ps.add(&format!("{name}.beta_s"), &[h], Init::Constant(0.0))?,
            gamma_v: ps.add(&format!("{name}.gamma_v"), &[h], Init::Constant(1.0))?,
            eps,
        })
    }

    /// Normalises (s, v).
    pub fn forward(&self, tape: &mut Tape, s: Var, v: Var) -> Result<(Var, Var)> {
        eqn::eq_layernorm(
            tape,
            s,
            v,
            self.gamma_s,
            self.beta_s,
            self.gamma_v,
            self.eps,
        )
    }
}

/// EqFFN: `[g, h] = Linear(s)`; `v' = sigmoid(g) * W_v v`; `s' = SiLU(h)`; then output Linears
/// (bias-free on vectors).
#[derive(Clone, Debug)]
pub struct EqFfn {
    gate: Linear,
    hidden: Linear,
    v_in: Linear,
    s_out: Linear,
    v_out: Linear,
    dropout: f32,
}

impl EqFfn {
    /// `h` channels in and out, `hidden` inside.
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        h: usize,
        hidden: usize,
        dropout: f32,
    ) -> Result<Self> {
        // [g, h] = Linear(s) is kept as two Linears of the same total size: the same function
        // and initial distribution, without a column split.
        Ok(Self {
            gate: Linear::new(ps, &format!("{name}.gate"), h, hidden, true)?,
            hidden: Linear::new(ps, &format!("{name}.hidden"), h, hidden, true)?,
            v_in: Linear::new(ps, &format!("{name}.v_in"), h, hidden, false)?,
            s_out: Linear::new(ps, &format!("{name}.s_out"), hidden, h, true)?,
            v_out: Linear::new(ps, &format!("{name}.v_out"), hidden, h, false)?,
            dropout,
        })
    }

    /// (s, v) -> (s', v').
    pub fn forward(&self, tape: &mut Tape, s: Var, v: Var) -> Result<(Var, Var)> {
        let g = self.gate.forward(tape, s)?;
        let g = super::sigmoid(tape, g)?;
        let u = self.v_in.forward(tape, v)?;
        let vh = eqn::vector_gate(tape, g, u)?;
        let h = self.hidden.forward(tape, s)?;
        let sh = super::silu(tape, h)?;
        let sh = super::dropout(tape, sh, self.dropout, 1)?;
        let vh = super::dropout(tape, vh, self.dropout, 3)?;
        Ok((self.s_out.forward(tape, sh)?, self.v_out.forward(tape, vh)?))
    }
}

/// How attention weights are computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKind {
    /// The fused FlashAttention-style kernel: memory linear in tokens.
    #[default]
    Fused,
    /// Scores, softmax and product as three ops, the tokens x tokens matrix stored (quadratic
    /// memory): the reference the fused kernel is checked against.
    Materialised,
}

/// Equivariant scaled dot-product attention: q, k and scalar values from s; one softmax weighs scalar values and raw vectors alike;
/// `s_out = vdot * o1 + |v_attn| * o2 + o3` with `[o1, o2, o3] = o_proj(attn_s)` and
/// `vdot = sum_xyz (W1 v_attn)(W2 v_attn)`; `v_out = sigmoid(gate([vdot, |v_attn|])) * v_attn + v`.
#[derive(Clone, Debug)]
pub struct EqAttention {
    q: Linear,
    k: Linear,
    vs: Linear,
    vec_proj: Linear,
    o_proj: Linear,
    gate: Linear,
    heads: usize,
    h: usize,
    kind: AttentionKind,
}

/// Keeps |v| differentiable at v = 0.
const NORM_EPS: f32 = 1e-8;

impl EqAttention {
    /// `h` channels in `heads` heads.
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        h: usize,
        heads: usize,
        kind: AttentionKind,
    ) -> Result<Self> {
        ensure!(
            heads > 0 && h.is_multiple_of(heads),
            "{name}: {h} channels do not split into {heads} heads"
        );
        Ok(Self {
            q: Linear::new(ps, &format!("{name}.q"), h, h, true)?,
            k: Linear::new(ps, &format!("{name}.k"), h, h, true)?,
            vs: Linear::new(ps, &format!("{name}.v"), h, h, true)?,
            vec_proj: Linear::new(ps, &format!("{name}.vec_proj"), h, 2 * h, false)?,
            o_proj: Linear::new(ps, &format!("{name}.o_proj"), h, 3 * h, true)?,
            gate: Linear::new(ps, &format!("{name}.gate"), 2 * h, h, true)?,
            heads,
            h,
            kind,
        })
    }

    /// Attends over the tokens of each frame; `mask [B, T]` (0 = padding) hides keys.
    pub fn forward(
        &self,
        tape: &mut Tape,
        s: Var,
        v: Var,
        mask: Option<Arc<Tensor<u8>>>,
    ) -> Result<(Var, Var)> {
        Ok(self.forward_recorded(tape, s, v, mask)?.0)
    }

    /// As [`EqAttention::forward`], also returning the per-head queries and keys
    /// (`[B, heads, T, dh]`), from which attention maps are recomputed.
    pub fn forward_recorded(
        &self,
        tape: &mut Tape,
        s: Var,
        v: Var,
        mask: Option<Arc<Tensor<u8>>>,
    ) -> Result<((Var, Var), AttentionRecord)> {
        let (b, t, _, h) = tokens::dims(tape, s)?;
        let (nh, dh) = (self.heads, self.h / self.heads);
        let q = self.q.forward(tape, s)?;
        let q = tokens::split_heads(tape, q, nh)?;
        let k = self.k.forward(tape, s)?;
        let k = tokens::split_heads(tape, k, nh)?;
        let vs = self.vs.forward(tape, s)?;
        let values = tokens::head_values(tape, vs, v, nh)?;
        let o = match self.kind {
            AttentionKind::Fused => super::eqsdpa(tape, q, k, values, mask, nh)?,
            AttentionKind::Materialised => {
                let scores = super::matmul(tape, q, k, false, true, (b * nh, t, t, dh), 1.0)?;
                let p = super::softmax(tape, scores, 1.0 / (dh as f32).sqrt(), mask, nh * t)?;
                let o = super::matmul(tape, p, values, false, false, (b * nh, t, 4 * dh, t), 1.0)?;
                tape.reshape(o, &[b, nh, t, 4 * dh])?;
                o
            }
        };
        let attn_s = tokens::merge_heads(tape, o, 1, h, 0)?;
        let v_attn = tokens::merge_heads(tape, o, 3, h, dh)?;
        let out = self.head(tape, attn_s, v_attn, v)?;
        Ok((out, AttentionRecord { q, k, heads: nh }))
    }

    /// Everything after the attention weights: the invariants of the attended vectors, the scalar
    /// output and the gated vector output with its residual.
    pub fn head(&self, tape: &mut Tape, attn_s: Var, v_attn: Var, v: Var) -> Result<(Var, Var)> {
        let ab = self.vec_proj.forward(tape, v_attn)?;
        let vdot = eqn::vector_dot_split(tape, ab)?;
        let vnorm = eqn::vector_norm(tape, v_attn, NORM_EPS)?;
        let o = self.o_proj.forward(tape, attn_s)?;
        let s_out = eqn::eq_scalar_combine(tape, vdot, vnorm, o)?;
        let inv = eqn::concat_columns(tape, vdot, vnorm)?;
        let g = self.gate.forward(tape, inv)?;
        let g = super::sigmoid(tape, g)?;
        let gated = eqn::vector_gate(tape, g, v_attn)?;
        let v_out = super::add(tape, gated, v)?;
        Ok((s_out, v_out))
    }
}

/// The queries and keys of one attention layer, left on the tape for attention maps.
#[derive(Clone, Copy, Debug)]
pub struct AttentionRecord {
    /// Queries `[B, heads, T, dh]`.
    pub q: Var,
    /// Keys `[B, heads, T, dh]`.
    pub k: Var,
    /// Heads.
    pub heads: usize,
}

/// Which residue graph convolution TMM step b uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GraphConvKind {
    /// `s' = W_root s + W_rel sum_j s_j` (the sum is taken first: one GEMM per term).
    Cheap,
    /// `s' = W_root s + sum_j g(r_ij) * (W_rel s_j)` with a per-channel gate from a radial basis
    /// of the C-alpha distance times a cosine cutoff (smooth as residues enter the radius).
    Gated,
}

/// Residue graph convolution on C-alpha positions, the same weights per xyz component of the
/// vectors (bias-free there).
#[derive(Clone, Debug)]
pub struct ResidueGraphConv {
    kind: GraphConvKind,
    root: EquiLinear,
    rel_s: Linear,
    rel_v: Linear,
    filter: Option<Linear>,
}

impl ResidueGraphConv {
    /// Over `h` channels; the gated kind reads `rbf` radial basis functions per edge.
    pub fn new(
        ps: &mut ParamStore,
        name: &str,
        h: usize,
        kind: GraphConvKind,
        rbf: usize,
    ) -> Result<Self> {
        Ok(Self {
            kind,
            root: EquiLinear::new(ps, &format!("{name}.root"), h, h)?,
            rel_s: Linear::new(ps, &format!("{name}.rel_s"), h, h, false)?,
            rel_v: Linear::new(ps, &format!("{name}.rel_v"), h, h, false)?,
            filter: match kind {
                GraphConvKind::Cheap => None,
                GraphConvKind::Gated => {
                    Some(Linear::new(ps, &format!("{name}.filter"), rbf, h, false)?)
                }
            },
        })
    }

    /// One convolution over `graph`; `rbf [E, K]` holds the gated kind's edge features.
    pub fn forward(
        &self,
        tape: &mut Tape,
        s: Var,
        v: Var,
        graph: &Arc<DeviceGraph>,
        rbf: Option<Var>,
    ) -> Result<(Var, Var)> {
        let (rs, rv) = self.root.forward(tape, s, v)?;
        let (ms, mv) = match (&self.kind, &self.filter) {
            (GraphConvKind::Cheap, _) => {
                let a_s = graph::graph_aggregate(tape, graph.clone(), s, None)?;
                let a_v = graph::graph_aggregate(tape, graph.clone(), v, None)?;
                (
                    self.rel_s.forward(tape, a_s)?,
                    self.rel_v.forward(tape, a_v)?,
                )
            }
            (GraphConvKind::Gated, Some(filter)) => {
                let Some(rbf) = rbf else {
                    anyhow::bail!("gated residue graph convolution: no edge features given");
                };
                let gate = filter.forward(tape, rbf)?;
                let ps = self.rel_s.forward(tape, s)?;
                let pv = self.rel_v.forward(tape, v)?;
                (
                    graph::graph_aggregate(tape, graph.clone(), ps, Some(gate))?,
                    graph::graph_aggregate(tape, graph.clone(), pv, Some(gate))?,
                )
            }
            (GraphConvKind::Gated, None) => unreachable!("a gated convolution has a filter"),
        };
        Ok((super::add(tape, rs, ms)?, super::add(tape, rv, mv)?))
    }
}

/// The window merger (TMM step c): `w` consecutive tokens, zero-padded, side by side, then
/// `Linear(w H -> H)` with bias on scalars and bias-free per xyz component on vectors.
#[derive(Clone, Debug)]
pub struct WindowMerger {
    /// Tokens per window.
    pub w: usize,
    s: Linear,
    v: Linear,
}

impl WindowMerger {
    /// Windows of `w` tokens of `h` channels.
    pub fn new(ps: &mut ParamStore, name: &str, h: usize, w: usize) -> Result<Self> {
        ensure!(w >= 1, "{name}: window must be at least 1");
        Ok(Self {
            w,
            s: Linear::new(ps, &format!("{name}.s"), w * h, h, true)?,
            v: Linear::new(ps, &format!("{name}.v"), w * h, h, false)?,
        })
    }

    /// `[B, T, ..] -> [B, ceil(T / w), ..]`.
    pub fn forward(&self, tape: &mut Tape, s: Var, v: Var) -> Result<(Var, Var)> {
        let gs = tokens::window_merge_gather(tape, s, self.w)?;
        let gv = tokens::window_merge_gather(tape, v, self.w)?;
        Ok((self.s.forward(tape, gs)?, self.v.forward(tape, gv)?))
    }
}

/// The sizes and options of an [`EqBlock`].
#[derive(Clone, Copy, Debug)]
pub struct BlockShape {
    /// Channels (H).
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Hidden width of the EqFFN.
    pub ffn_hidden: usize,
    /// Dropout on each branch.
    pub dropout: f32,
    /// Layer-norm epsilon.
    pub eps: f32,
    /// Fused or materialised attention.
    pub attention: AttentionKind,
}

/// One pre-norm block: `x += EqSDPA(EqLN(x)); x += EqFFN(EqLN(x))`, with dropout on each branch.
#[derive(Clone, Debug)]
pub struct EqBlock {
    ln1: EqLayerNorm,
    attn: EqAttention,
    ln2: EqLayerNorm,
    ffn: EqFfn,
    dropout: f32,
}

impl EqBlock {
    /// A block of the given shape.
    pub fn new(ps: &mut ParamStore, name: &str, shape: &BlockShape) -> Result<Self> {
        let h = shape.hidden;
        Ok(Self {
            ln1: EqLayerNorm::new(ps, &format!("{name}.ln1"), h, shape.eps)?,
            attn: EqAttention::new(ps, &format!("{name}.attn"), h, shape.heads, shape.attention)?,
            ln2: EqLayerNorm::new(ps, &format!("{name}.ln2"), h, shape.eps)?,
            ffn: EqFfn::new(
                ps,
                &format!("{name}.ffn"),
                h,
                shape.ffn_hidden,
                shape.dropout,
            )?,
            dropout: shape.dropout,
        })
    }

    /// Applies the block; padding tokens (mask 0) are zeroed on the way out. Also returns the
    /// attention layer's queries and keys.
    pub fn forward(
        &self,
        tape: &mut Tape,
        s: Var,
        v: Var,
        mask: Option<Arc<Tensor<u8>>>,
    ) -> Result<((Var, Var), AttentionRecord)> {
        let (sn, vn) = self.ln1.forward(tape, s, v)?;
        let ((sa, va), record) = self.attn.forward_recorded(tape, sn, vn, mask.clone())?;
        let sa = super::dropout(tape, sa, self.dropout, 1)?;
        let va = super::dropout(tape, va, self.dropout, 3)?;
        let s = super::add(tape, s, sa)?;
        let v = super::add(tape, v, va)?;
        let (sn, vn) = self.ln2.forward(tape, s, v)?;
        let (sf, vf) = self.ffn.forward(tape, sn, vn)?;
        let sf = super::dropout(tape, sf, self.dropout, 1)?;
        let vf = super::dropout(tape, vf, self.dropout, 3)?;
        let mut s = super::add(tape, s, sf)?;
        let mut v = super::add(tape, v, vf)?;
        if let Some(m) = mask {
            s = tokens::token_mask(tape, s, m.clone())?;
            v = tokens::token_mask(tape, v, m)?;
        }
        Ok(((s, v), record))
    }
}
