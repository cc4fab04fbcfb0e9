//! The PaiNN backbone of the atom stage (SPEC step 2; Schütt, Unke, Gastegger 2021): tape ops
//! over [`crate::ops::painn`], its interaction and update layers, the [`Backbone`] model and the
//! denoising head used to pretrain it.
//!
//! ```text
//! Z (atomic numbers, < 100) -> embedding -> s [F, A, H];  v = 0 [F, A, 3, H]
//!   L x [ interaction: phi = Linear(H->H) -> SiLU -> Linear(H->3H) of s
//!                      (ds, dv) = fused message over the radius graph (ops::painn)
//!                      s += ds;  v += dv
//!         update:      U v, V v (bias-free, per xyz);  a = Linear(2H->H) -> SiLU -> Linear(H->3H)
//!                      of [s, |V v|], split into (a_vv, a_sv, a_ss)
//!                      v += a_vv * U v;  s += a_sv * <U v, V v> + a_ss ]
//!   -> per-atom (s, v);  denoising head: v_out = sum_h W_h v_h (H -> 1 per xyz) times a scalar
//!      gate MLP(s) -> [F A, 3]
//! ```
//!
//! Every vector feature is only scaled by invariants or mixed across channels (never across xyz),
//! so s is rotation invariant and v, the head's output too, rotates with the positions.
//! Configured from TOML ([`BackboneConfig`]); initialised from a seed.
//!
//! With `kind = "et"` the same [`Backbone`] stacks TorchMD-ET attention layers instead
//! ([`super::torchmd_et`]): embedding -> L x [`EtLayer`] -> a final layer norm on s, and the same
//! denoising head. TorchMD-ET's neighbour embedding is not included (the embedding is the
//! atomic-number table alone, as for PaiNN).

use super::atoms;
use super::equivariant as eqn;
use super::layers::Linear;
use super::torchmd_et::{EtLayer, EtLayerNorm};
use crate::device::Device;
use crate::ops::elementwise as ew;
use crate::ops::equivariant::VECTOR_NORM_EPS;
use crate::ops::neighbor_list::NeighborList;
use crate::ops::painn::{self as pn, RadialBasis, RbfKind, MAX_HIDDEN, MAX_RBF};
use crate::ops::scatter::DeviceEmbeddingIndex;
use crate::tape::{Init, ParamId, ParamStore, Tape, Var};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// Rows of the atomic-number embedding table: atomic numbers 0 to 99.
pub const ELEMENTS: usize = 100;

/// Shape of `x` with its last dimension replaced.
fn with_last(shape: &[usize], last: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    if let Some(l) = s.last_mut() {
        *l = last;
    }
    s
}

// ---------------------------------------------------------------------------------- tape ops --

/// The fused PaiNN message ([`crate::ops::painn`]): for `phi [.., 3H]` and `v [.., 3, H]` (N
/// atoms in the list's row order) and the filter `Linear(K -> 3H)` (`w`, `b`), returns
/// `(ds [.., H], dv [.., 3, H])`. Gradients reach `phi`, `v`, the filter (accumulated) and
/// `positions [N, 3]` (when it was recorded with [`Tape::input_with_grad`] or depends on a
/// parameter); no per-edge tensor is stored, the backward recomputes the basis and filters.
#[allow(clippy::too_many_arguments)] // the graph, three values, two parameters, the basis
pub fn painn_message(
    tape: &mut Tape,
    nl: &Arc<NeighborList>,
    positions: Var,
    phi: Var,
    v: Var,
    w: ParamId,
    b: ParamId,
    basis: RadialBasis,
) -> Result<(Var, Var)> {
    let ws = tape.params().value(w).shape().to_vec();
    let &[rows, _] = ws.as_slice() else {
        bail!("painn_message: the filter weight has shape {ws:?}, expected [3H, K]");
    };
    let h = rows / 3;
    let mut ds = tape.alloc(&with_last(tape.shape(phi), h))?;
    let mut dv = tape.alloc_like(v)?;
    {
        let p = tape.params();
        pn::painn_message_forward(
            nl,
            tape.value(positions),
            tape.value(phi),
            tape.value(v),
            p.value(w),
            p.value(b),
            basis,
            &mut ds,
            &mut dv,
        )?;
    }
    let needs = tape.any_needs(&[positions, phi, v], &[w, b]);
    let nl = nl.clone();
    let out = tape.record("painn_message", vec![ds, dv], needs, move |ctx, dys| {
        let (vals, ps) = (ctx.vals, ctx.params);
        let (dds, ddv) = (dys[0], dys[1]);
        let (pos_v, phi_v, v_v) = (&vals[positions.0], &vals[phi.0], &vals[v.0]);
        let e = nl.edges();
        let mut dphi = match ctx.needs(phi) {
            true => Some(ctx.scratch(phi_v.shape())?),
            false => None,
        };
        let mut dvv = match ctx.needs(v) {
            true => Some(ctx.scratch(v_v.shape())?),
            false => None,
        };
        let mut dvec = match ctx.needs(positions) && e > 0 {
            true => Some(ctx.scratch(&[e, 3])?),
            false => None,
        };
        pn::painn_message_backward(
            &nl,
            pos_v,
            phi_v,
            v_v,
            &ps[w.0],
            &ps[b.0],
            basis,
            dds,
            ddv,
            dphi.as_mut(),
            dvv.as_mut(),
            dvec.as_mut(),
        )?;
        let (need_w, need_b) = (ctx.needs_param(w), ctx.needs_param(b));
        if need_w || need_b {
            // The per-block partial sums come from the tape's pool: no allocation after step one.
            let mut scratch = match dds.device() {
                Device::Cpu => None,
                _ => {
                    let len = pn::painn_filter_backward_scratch_len(e, h, basis.size);
                    Some(ctx.scratch(&[len.max(1)])?)
                }
            };
            {
                let [gw, gb] = ctx.param_grads([w, b])?;
                pn::painn_filter_backward(
                    &nl,
                    pos_v,
                    phi_v,
                    v_v,
                    basis,
                    dds,
                    ddv,
                    need_w.then_some(gw),
                    need_b.then_some(gb),
                    scratch.as_mut(),
                )?;
            }
            if let Some(s) = scratch {
                ctx.recycle(s);
            }
        }
        if ctx.needs(positions) {
            match dvec {
                Some(dvec) => {
                    ctx.add_grad(positions, |dp| pn::painn_position_backward(&nl, &dvec, dp))?;
                    ctx.recycle(dvec);
                }
                // No edges: the message does not depend on the positions.
                None => ctx.add_grad(positions, |dp| dp.fill_bytes(0))?,
            }
        }
        if let Some(t) = dphi {
            ctx.give_grad(phi, t)?;
        }
        if let Some(t) = dvv {
            ctx.give_grad(v, t)?;
        }
        Ok(())
    })?;
    Ok((out[0], out[1]))
}

/// The three column blocks of `x [.., 3H]`, each `[.., H]`.
pub fn split3(tape: &mut Tape, x: Var) -> Result<(Var, Var, Var)> {
    let xs = tape.shape(x).to_vec();
    let last = *xs.last().unwrap_or(&0);
    ensure!(
        last > 0 && last.is_multiple_of(3),
        "split3: {xs:?} does not split into three column blocks"
    );
    let shape = with_last(&xs, last / 3);
    let mut a = tape.alloc(&shape)?;
    let mut b = tape.alloc(&shape)?;
    let mut c = tape.alloc(&shape)?;
    pn::painn_split3_forward(tape.value(x), &mut a, &mut b, &mut c)?;
    let needs = tape.needs_grad(x);
    let out = tape.record("split3", vec![a, b, c], needs, move |ctx, dys| {
        ctx.add_grad(x, |dx| {
            pn::painn_split3_backward(dys[0], dys[1], dys[2], dx)
        })
    })?;
    Ok((out[0], out[1], out[2]))
}

/// A copy of `x` under another shape with as many elements (a reshape whose producer's backward
/// still sees its own shape).
fn reshape_copy(tape: &mut Tape, x: Var, shape: &[usize]) -> Result<Var> {
    let mut y = tape.alloc(shape)?;
    ew::scale(1.0, tape.value(x), &mut y)?;
    let needs = tape.needs_grad(x);
    tape.record1("reshape_copy", y, needs, move |ctx, dy| {
        ctx.add_grad(x, |dx| ew::scale(1.0, dy, dx))
    })
}

// ------------------------------------------------------------------------------------ layers --

/// PaiNN interaction: `phi = Linear(H->H) -> SiLU -> Linear(H->3H)` of s, the filter
/// `Linear(K -> 3H)` of the radial basis, and the fused message; residual on s and v.
#[derive(Clone, Debug)]
pub struct PainnInteraction {
    phi1: Linear,
    phi2: Linear,
    filter: Linear,
    basis: RadialBasis,
}

impl PainnInteraction {
    /// An interaction over `hidden` channels with `basis`.
    pub fn new(ps: &mut ParamStore, name: &str, hidden: usize, basis: RadialBasis) -> Result<Self> {
        Ok(Self {
            phi1: Linear::new(ps, &format!("{name}.phi1"), hidden, hidden, true)?,
            phi2: Linear::new(ps, &format!("{name}.phi2"), hidden, 3 * hidden, true)?,
            filter: Linear::new(ps, &format!("{name}.filter"), basis.size, 3 * hidden, true)?,
            basis,
        })
    }

    /// `(s + ds, v + dv)`.
    pub fn forward(
        &self,
        tape: &mut Tape,
        s: Var,
        v: Var,
        positions: Var,
        nl: &Arc<NeighborList>,
    ) -> Result<(Var, Var)> {
        let x = self.phi1.forward(tape, s)?;
        let x = super::silu(tape, x)?;
        let phi = self.phi2.forward(tape, x)?;
        let Some(b) = self.filter.b else {
            bail!("PaiNN interaction: the filter has no bias");
        };
        let (ds, dv) = painn_message(tape, nl, positions, phi, v, self.filter.w, b, self.basis)?;
        Ok((super::add(tape, s, ds)?, super::add(tape, v, dv)?))
    }
}

/// PaiNN update (per atom): `U v`, `V v` bias-free per xyz; `a = Linear(2H->H) -> SiLU ->
/// Linear(H->3H)` of `[s, |V v|]` split into `(a_vv, a_sv, a_ss)`; `v += a_vv * U v`,
/// `s += a_sv * <U v, V v> + a_ss`.
#[derive(Clone, Debug)]
pub struct PainnUpdate {
    u: Linear,
    v: Linear,
    a1: Linear,
    a2: Linear,
}

impl PainnUpdate {
    /// An update over `hidden` channels.
    pub fn new(ps: &mut ParamStore, name: &str, hidden: usize) -> Result<Self> {
        Ok(Self {
            u: Linear::new(ps, &format!("{name}.u"), hidden, hidden, false)?,
            v: Linear::new(ps, &format!("{name}.v"), hidden, hidden, false)?,
            a1: Linear::new(ps, &format!("{name}.a1"), 2 * hidden, hidden, true)?,
            a2: Linear::new(ps, &format!("{name}.a2"), hidden, 3 * hidden, true)?,
        })
    }

    /// `(s', v')`.
    pub fn forward(&self, tape: &mut Tape, s: Var, v: Var) -> Result<(Var, Var)> {
        let uv = self.u.forward(tape, v)?;
        let vv = self.v.forward(tape, v)?;
        let norm = eqn::vector_norm(tape, vv, VECTOR_NORM_EPS)?;
        let x = eqn::concat_columns(tape, s, norm)?;
        let x = self.a1.forward(tape, x)?;
        let x = super::silu(tape, x)?;
        let a = self.a2.forward(tape, x)?;
        let (a_vv, a_sv, a_ss) = split3(tape, a)?;
        let gated = eqn::vector_gate(tape, a_vv, uv)?;
        let v = super::add(tape, v, gated)?;
        let dot = eqn::vector_dot(tape, uv, vv)?;
        let t = eqn::vector_gate(tape, a_sv, dot)?;
        let s = super::add(tape, s, t)?;
        let s = super::add(tape, s, a_ss)?;
        Ok((s, v))
    }
}

/// The denoising head: one vector per atom, `sum_h W_h v[.., :, h]` (a bias-free `Linear(H -> 1)`
/// per xyz) times a scalar gate `Linear(H->H) -> SiLU -> Linear(H->1)` of s.
#[derive(Clone, Debug)]
pub struct DenoiseHead {
    gate1: Linear,
    gate2: Linear,
    proj: Linear,
}

impl DenoiseHead {
    /// A head over `hidden` channels.
    pub fn new(ps: &mut ParamStore, name: &str, hidden: usize) -> Result<Self> {
        Ok(Self {
            gate1: Linear::new(ps, &format!("{name}.gate1"), hidden, hidden, true)?,
            gate2: Linear::new(ps, &format!("{name}.gate2"), hidden, 1, true)?,
            proj: Linear::new(ps, &format!("{name}.proj"), hidden, 1, false)?,
        })
    }

    /// `s [.., H]`, `v [.., 3, H]` -> `[N, 3]` (N = the atoms of every frame, in order).
    pub fn forward(&self, tape: &mut Tape, s: Var, v: Var) -> Result<Var> {
        let g = self.gate1.forward(tape, s)?;
        let g = super::silu(tape, g)?;
        let g = self.gate2.forward(tape, g)?;
        let p = self.proj.forward(tape, v)?;
        let y = eqn::vector_gate(tape, g, p)?;
        let n = tape.value(y).len() / 3;
        reshape_copy(tape, y, &[n, 3])
    }
}

// ---------------------------------------------------------------------------------- backbone --

/// The layers a backbone stacks (TOML: `"painn"`, `"et"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackboneKind {
    /// PaiNN interaction + update layers.
    #[default]
    Painn,
    /// TorchMD-ET equivariant attention layers ([`super::torchmd_et`]).
    Et,
}

/// The backbone's shape, read from TOML (unknown keys are errors; every field has a default).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackboneConfig {
    /// The layers: "painn" (default) or "et".
    pub kind: BackboneKind,
    /// Channels H of s and v (1 to [`MAX_HIDDEN`]).
    pub hidden: usize,
    /// Interaction + update layers L.
    pub layers: usize,
    /// Radial basis functions K (1 to [`MAX_RBF`]).
    pub rbf: usize,
    /// Their family: "gaussian" or "expnormal".
    pub rbf_kind: RbfKind,
    /// Cutoff of the basis in Angstrom (the neighbor list's must be at least this).
    pub cutoff: f32,
    /// Seed of the initialisation.
    pub seed: u64,
    /// Attention heads of the TorchMD-ET layers (must divide `hidden`; unused by PaiNN).
    pub heads: usize,
}

impl Default for BackboneConfig {
    fn default() -> Self {
        Self {
            kind: BackboneKind::Painn,
            hidden: 64,
            layers: 3,
            rbf: 32,
            rbf_kind: RbfKind::ExpNormal,
            cutoff: 5.0,
            seed: 0,
            heads: 8,
        }
    }
}

impl BackboneConfig {
    /// Parses TOML text (unknown keys are errors) and checks it.
    pub fn from_toml(text: &str) -> Result<Self> {
        let c: Self = toml::from_str(text).context("backbone configuration")?;
        c.validate()?;
        Ok(c)
    }

    /// Reads a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Checks the sizes; the error names the field.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=MAX_HIDDEN).contains(&self.hidden),
            "hidden = {} must be 1 to {MAX_HIDDEN}",
            self.hidden
        );
        ensure!(self.layers >= 1, "layers must be at least 1");
        ensure!(
            (1..=MAX_RBF).contains(&self.rbf),
            "rbf = {} must be 1 to {MAX_RBF}",
            self.rbf
        );
        ensure!(
            self.cutoff.is_finite() && self.cutoff > 0.0,
            "cutoff = {} must be a positive distance in Angstrom",
            self.cutoff
        );
        if self.kind == BackboneKind::Et {
            ensure!(
                self.heads >= 1 && self.hidden.is_multiple_of(self.heads),
                "heads = {} must be at least 1 and divide hidden = {}",
                self.heads,
                self.hidden
            );
            ensure!(
                crate::ops::torchmd_et::supported(self.hidden, self.rbf, self.heads),
                "hidden = {} with rbf = {} is too large for the TorchMD-ET kernels' shared memory",
                self.hidden,
                self.rbf
            );
        }
        Ok(())
    }

    /// The radial basis it describes.
    pub fn basis(&self) -> Result<RadialBasis> {
        RadialBasis::new(self.rbf_kind, self.rbf, self.cutoff)
    }
}

/// The layers of a backbone.
enum Layers {
    Painn(Vec<(PainnInteraction, PainnUpdate)>),
    Et {
        layers: Vec<EtLayer>,
        out_norm: EtLayerNorm,
    },
}

/// The PaiNN or TorchMD-ET backbone (its parameters live in the tape's [`ParamStore`]).
pub struct Backbone {
    config: BackboneConfig,
    embedding: ParamId,
    layers: Layers,
    head: DenoiseHead,
}

impl Backbone {
    /// Creates the layers, adding their parameters to `ps` in a fixed order: `embedding.weight`
    /// (`[100, H]`, normal(0, 1) like `torch.nn.Embedding`), then per layer l
    /// `layer{l}.interaction.*` and `layer{l}.update.*` (PaiNN) or `layer{l}.attention.*` and,
    /// after the last, `out_norm.*` (TorchMD-ET), then `denoise.*`.
    pub fn new(config: BackboneConfig, ps: &mut ParamStore) -> Result<Self> {
        config.validate()?;
        let h = config.hidden;
        let basis = config.basis()?;
        let embedding = ps.add("embedding.weight", &[ELEMENTS, h], Init::Normal(1.0))?;
        let layers = match config.kind {
            BackboneKind::Painn => Layers::Painn(
                (0..config.layers)
                    .map(|l| {
                        Ok((
                            PainnInteraction::new(ps, &format!("layer{l}.interaction"), h, basis)?,
                            PainnUpdate::new(ps, &format!("layer{l}.update"), h)?,
                        ))
                    })
                    .collect::<Result<_>>()?,
            ),
            BackboneKind::Et => Layers::Et {
                layers: (0..config.layers)
                    .map(|l| {
                        EtLayer::new(ps, &format!("layer{l}.attention"), h, config.heads, basis)
                    })
                    .collect::<Result<_>>()?,
                out_norm: EtLayerNorm::new(ps, "out_norm", h)?,
            },
        };
        let head = DenoiseHead::new(ps, "denoise", h)?;
        Ok(Self {
            config,
            embedding,
            layers,
            head,
        })
    }

    /// A fresh parameter store on `device` (seeded by the configuration) and the backbone.
    pub fn create(config: BackboneConfig, device: &Device) -> Result<(Self, ParamStore)> {
        let mut ps = ParamStore::new(device, config.seed);
        let m = Self::new(config, &mut ps)?;
        Ok((m, ps))
    }

    /// The configuration.
    pub fn config(&self) -> &BackboneConfig {
        &self.config
    }

    /// Per-atom features of every frame of the neighbor list: `positions` (`[F A, 3]` Angstrom,
    /// recorded with [`Tape::input_with_grad`] when forces or position gradients are wanted), `z`
    /// (the table row, i.e. atomic number, of each of the A atoms of a frame) and `nl` (built
    /// from the same positions with a cutoff of at least the configuration's). Returns
    /// `(s [F, A, H], v [F, A, 3, H])`.
    pub fn forward(
        &self,
        tape: &mut Tape,
        positions: Var,
        z: &Arc<DeviceEmbeddingIndex>,
        nl: &Arc<NeighborList>,
    ) -> Result<(Var, Var)> {
        let op = match self.config.kind {
            BackboneKind::Painn => "PaiNN backbone",
            BackboneKind::Et => "TorchMD-ET backbone",
        };
        let (f, a, h) = (nl.frames(), nl.atoms_per_frame(), self.config.hidden);
        ensure!(
            z.atoms() == a,
            "{op}: {} atomic numbers for frames of {a} atoms",
            z.atoms()
        );
        ensure!(
            z.vocab() == ELEMENTS,
            "{op}: the atomic-number index is for a table of {} rows, expected {ELEMENTS}",
            z.vocab()
        );
        ensure!(
            tape.value(positions).len() == 3 * f * a,
            "{op}: positions have shape {:?}, expected [{}, 3] for {f} frames of {a} atoms",
            tape.shape(positions),
            f * a
        );
        ensure!(
            nl.cutoff() >= self.config.cutoff,
            "{op}: the neighbor list's cutoff {} A is below the basis cutoff {} A (pairs in \
             between would be missing)",
            nl.cutoff(),
            self.config.cutoff
        );
        let mut s = atoms::embedding(tape, self.embedding, z.clone(), f)?;
        let mut v0 = tape.alloc(&[f, a, 3, h])?;
        v0.fill_bytes(0)?;
        let mut v = tape.input(v0)?;
        match &self.layers {
            Layers::Painn(layers) => {
                for (interaction, update) in layers {
                    (s, v) = interaction.forward(tape, s, v, positions, nl)?;
                    (s, v) = update.forward(tape, s, v)?;
                }
            }
            Layers::Et { layers, out_norm } => {
                for layer in layers {
                    (s, v) = layer.forward(tape, s, v, positions, nl)?;
                }
                s = out_norm.forward(tape, s)?;
            }
        }
        Ok((s, v))
    }

    /// The denoising head on the backbone's output: one vector per atom, `[F A, 3]` (pretraining
    /// predicts the normalised coordinate noise with it).
    pub fn denoise_head(&self, tape: &mut Tape, s: Var, v: Var) -> Result<Var> {
        self.head.forward(tape, s, v)
    }
}
