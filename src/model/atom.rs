//! The atom stage as one model (SPEC steps 2 and 3a): the equivariant backbone over the atoms of
//! each frame, then the atom-to-token merge, giving per-frame residue tokens.
//!
//! ```text
//! frames [F, A, 3] (Angstrom; unit cells optional)
//!   -> radius graph (neighbor_cutoff, default the backbone's cutoff)
//!   -> backbone (PaiNN or another kind of [`BackboneConfig`]): s [F, A, H], v [F, A, 3, H]
//!   -> token merge (mean or sum over each token's atoms): s [F, R, H], v [F, R, 3, H]
//!   + C-alpha positions [F, R, 3] (each token's CA atom, or its heavy-atom centroid)
//! ```
//!
//! The backbone's denoising head ([`AtomModel::denoise`]) is part of the model so that a
//! pretrained checkpoint carries it; featurisation does not use it.
//!
//! A saved model is one safetensors file: the parameters under their names without any store
//! prefix, and the configuration as JSON in the metadata key [`CONFIG_METADATA_KEY`], so the
//! file alone rebuilds the model ([`AtomModel::load`]).

use crate::device::Device;
use crate::nn::atoms;
use crate::nn::painn::{Backbone, BackboneConfig, ELEMENTS};
use crate::ops::neighbor_list::NeighborList;
use crate::ops::scatter::{
    DeviceEmbeddingIndex, DeviceTokenMap, EmbeddingIndex, Reduce, TokenMap, EXCLUDED,
};
use crate::store::Dataset;
use crate::tape::{ParamId, ParamStore, Tape, Var};
use crate::tensor::Tensor;
use crate::traj::UnitCell;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// The safetensors metadata key that holds a saved model's configuration (JSON).
pub const CONFIG_METADATA_KEY: &str = "hiermd.atom_model";

/// How the atom-to-token merge combines a token's atoms, as written in TOML.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenReduce {
    /// The mean of the token's atoms (the default: tokens of different sizes stay comparable).
    #[default]
    Mean,
    /// The sum of the token's atoms.
    Sum,
}

impl TokenReduce {
    /// The merge op's reduction.
    pub fn reduce(self) -> Reduce {
        match self {
            Self::Mean => Reduce::Mean,
            Self::Sum => Reduce::Sum,
        }
    }
}

/// The atom model's configuration, read from TOML (unknown keys are errors; every field has a
/// default):
///
/// ```toml
/// reduce = "mean"          # or "sum"
/// neighbor_cutoff = 5.0    # optional; default: the backbone's cutoff
/// [backbone]
/// kind = "painn"           # or "et"
/// hidden = 64
/// layers = 3
/// rbf = 32
/// rbf_kind = "expnormal"
/// cutoff = 5.0
/// seed = 0
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AtomModelConfig {
    /// The backbone (the `[backbone]` table); its `seed` seeds the initialisation.
    pub backbone: BackboneConfig,
    /// Atom-to-token merge: "mean" (default) or "sum".
    pub reduce: TokenReduce,
    /// Cutoff of the neighbor list in Angstrom, at least the backbone's; `None`: the backbone's.
    pub neighbor_cutoff: Option<f32>,
}

impl Default for AtomModelConfig {
    fn default() -> Self {
        Self {
            backbone: BackboneConfig::default(),
            reduce: TokenReduce::Mean,
            neighbor_cutoff: None,
        }
    }
}

impl AtomModelConfig {
    /// Parses TOML text (unknown keys are errors) and checks it.
    pub fn from_toml(text: &str) -> Result<Self> {
        let c: Self = toml::from_str(text).context("atom model configuration")?;
        c.validate()?;
        Ok(c)
    }

    /// Reads a TOML file; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("in {}", path.display()))
    }

    /// Checks the backbone's sizes and the neighbor cutoff; the error names the field.
    pub fn validate(&self) -> Result<()> {
        self.backbone.validate().context("[backbone]")?;
        if let Some(c) = self.neighbor_cutoff {
            ensure!(
                c.is_finite() && c >= self.backbone.cutoff,
                "neighbor_cutoff = {c} must be at least the backbone cutoff {} A",
                self.backbone.cutoff
            );
        }
        Ok(())
    }

    /// The neighbor list's cutoff in Angstrom.
    pub fn cutoff(&self) -> f32 {
        self.neighbor_cutoff.unwrap_or(self.backbone.cutoff)
    }

    /// The configuration as TOML text (what `hiermd init-model` would read back).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).context("serialising the atom model configuration")
    }
}

/// Where a token's C-alpha position comes from.
#[derive(Clone, Debug, PartialEq)]
enum CaRule {
    /// The token's atom named CA.
    Atom(usize),
    /// The centroid of these atoms (the token's heavy atoms; all its atoms if it has none).
    Centroid(Vec<usize>),
}

/// What the atom model needs of a dataset, built once: the atomic-number index, the
/// atom-to-token map (on the device) and the rule for each token's C-alpha position.
pub struct AtomInputs {
    z: Arc<DeviceEmbeddingIndex>,
    map: Arc<DeviceTokenMap>,
    ca: Vec<CaRule>,
    heavy: Vec<bool>,
    atoms: usize,
    tokens: usize,
}

/// Fails, naming the first atoms, if an atom of unknown element (Z = 0: a virtual site such as
/// TIP4P's `MW`, a coarse-grained bead) would be merged into a token: the backbone embeds atoms
/// by element, and an element-0 row would stand for every such thing at once. Atoms whose token
/// is [`EXCLUDED`] (dropped by the token map) may have Z = 0. `name(a)` describes atom `a`;
/// `fix` says how to leave such atoms out.
fn refuse_unknown_elements(
    atomic_numbers: &[u8],
    token_of_atom: &[u32],
    what: &str,
    name: impl Fn(usize) -> String,
    fix: &str,
) -> Result<()> {
    let bad: Vec<usize> = atomic_numbers
        .iter()
        .zip(token_of_atom)
        .enumerate()
        .filter(|(_, (&z, &t))| z == 0 && t != EXCLUDED)
        .map(|(a, _)| a)
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    const SHOWN: usize = 3;
    let listed: Vec<String> = bad.iter().take(SHOWN).map(|&a| name(a)).collect();
    let more = if bad.len() > SHOWN {
        format!(" and {} more", bad.len() - SHOWN)
    } else {
        String::new()
    };
    bail!(
        "{what}: {}{more} {} atomic number 0 (no element: a virtual site or a coarse-grained \
         bead); the atom stage embeds atoms by element and refuses them: {fix}",
        listed.join(", "),
        if bad.len() == 1 { "has" } else { "have" }
    )
}

impl AtomInputs {
    /// From a dataset's atom table: atomic numbers (below 100), the token of each atom, and the
    /// C-alpha rule per token (its atom named CA if it has one, else its heavy-atom centroid).
    /// Atoms of unknown element (Z = 0) are refused, naming them (see
    /// [`AtomInputs::from_parts`] for dropping them through the token map).
    pub fn new(ds: &Dataset, device: &Device) -> Result<Self> {
        let atoms = ds.natoms();
        let tokens = ds.manifest.tokens;
        ensure!(
            atoms > 0,
            "{}: the dataset has no atoms",
            ds.dir().display()
        );
        ensure!(
            tokens > 0,
            "{}: the dataset has no tokens",
            ds.dir().display()
        );
        let token_of = ds.token_map();
        refuse_unknown_elements(
            &ds.atomic_numbers(),
            &token_of,
            &ds.dir().display().to_string(),
            |a| {
                let x = &ds.atoms[a];
                format!("atom {a} ({} of residue {} {})", x.name, x.resname, x.resid)
            },
            "leave them out with data.selection = \"not element X\" (or re-import with \
             --select 'heavy' or 'not element X')",
        )?;
        let z: Vec<i32> = ds.atomic_numbers().iter().map(|&z| z as i32).collect();
        let z = EmbeddingIndex::new(&z, ELEMENTS)
            .with_context(|| format!("{}: atomic numbers", ds.dir().display()))?
            .to_device(device)?;
        let map = TokenMap::new(&token_of, tokens)
            .with_context(|| format!("{}: atom-to-token map", ds.dir().display()))?
            .to_device(device)?;
        let heavy: Vec<bool> = ds.atoms.iter().map(|a| a.atomic_number != 1).collect();
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); tokens];
        for (a, &t) in token_of.iter().enumerate() {
            if t != EXCLUDED {
                members[t as usize].push(a);
            }
        }
        let ca = members
            .into_iter()
            .map(|m| {
                if let Some(&a) = m.iter().find(|&&a| ds.atoms[a].name.trim() == "CA") {
                    return CaRule::Atom(a);
                }
                let h: Vec<usize> = m.iter().copied().filter(|&a| heavy[a]).collect();
                CaRule::Centroid(if h.is_empty() { m } else { h })
            })
            .collect();
        Ok(Self {
            z: Arc::new(z),
            map: Arc::new(map),
            ca,
            heavy,
            atoms,
            tokens,
        })
    }

    /// From plain arrays instead of a dataset (the library API and the C ABI, for callers that
    /// have no dataset folder): `atomic_numbers[a]` (1..=99; 100+ is an error, and so is 0, the
    /// unknown element of virtual sites and coarse-grained beads, unless the atom's token is
    /// [`EXCLUDED`]), `token_of_atom[a]` (in `0..tokens`, or [`EXCLUDED`] to leave the atom out:
    /// such an atom still takes part in the backbone's graph, but no token holds it) and, per
    /// token, `ca_atom[r]`: the atom whose position is the token's C-alpha position, or `None`
    /// for the centroid of the token's heavy atoms (of all its atoms if it has none). With the
    /// arrays of a dataset (`ca_atom` = each token's atom named CA) this equals
    /// [`AtomInputs::new`].
    /// Hydrogen (Z = 1) counts as light, every other element as heavy, and an atom of unknown
    /// element (Z = 0, dropped) as neither.
    pub fn from_parts(
        atomic_numbers: &[u8],
        token_of_atom: &[u32],
        tokens: usize,
        ca_atom: &[Option<usize>],
        device: &Device,
    ) -> Result<Self> {
        let atoms = atomic_numbers.len();
        ensure!(atoms > 0, "atom inputs: no atoms");
        ensure!(tokens > 0, "atom inputs: no tokens");
        ensure!(
            token_of_atom.len() == atoms,
            "atom inputs: {} token ids for {atoms} atoms",
            token_of_atom.len()
        );
        ensure!(
            ca_atom.len() == tokens,
            "atom inputs: {} C-alpha entries for {tokens} tokens",
            ca_atom.len()
        );
        if let Some(a) = atomic_numbers.iter().position(|&z| z as usize >= ELEMENTS) {
            bail!(
                "atom inputs: atom {a} has atomic number {}, expected 1..{}",
                atomic_numbers[a],
                ELEMENTS - 1
            );
        }
        refuse_unknown_elements(
            atomic_numbers,
            token_of_atom,
            "atom inputs",
            |a| format!("atom {a}"),
            "give them the token EXCLUDED (-1 in the C ABI) to drop them, or leave them out",
        )?;
        for (r, ca) in ca_atom.iter().enumerate() {
            if let Some(a) = *ca {
                ensure!(
                    a < atoms,
                    "atom inputs: token {r}'s C-alpha atom {a} is not below {atoms}"
                );
                ensure!(
                    token_of_atom[a] as usize == r,
                    "atom inputs: token {r}'s C-alpha atom {a} belongs to token {}",
                    token_of_atom[a] as i64
                );
            }
        }
        let z: Vec<i32> = atomic_numbers.iter().map(|&z| z as i32).collect();
        let z = EmbeddingIndex::new(&z, ELEMENTS)
            .context("atom inputs: atomic numbers")?
            .to_device(device)?;
        let map = TokenMap::new(token_of_atom, tokens)
            .context("atom inputs: atom-to-token map")?
            .to_device(device)?;
        let heavy: Vec<bool> = atomic_numbers.iter().map(|&z| z >= 2).collect();
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); tokens];
        for (a, &t) in token_of_atom.iter().enumerate() {
            if t != EXCLUDED {
                members[t as usize].push(a);
            }
        }
        let ca = members
            .into_iter()
            .zip(ca_atom)
            .map(|(m, ca)| match *ca {
                Some(a) => CaRule::Atom(a),
                None => {
                    let h: Vec<usize> = m.iter().copied().filter(|&a| heavy[a]).collect();
                    CaRule::Centroid(if h.is_empty() { m } else { h })
                }
            })
            .collect();
        Ok(Self {
            z: Arc::new(z),
            map: Arc::new(map),
            ca,
            heavy,
            atoms,
            tokens,
        })
    }

    /// Tokens R per frame.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Atoms A per frame.
    pub fn atoms(&self) -> usize {
        self.atoms
    }

    /// The atomic-number index (the embedding's rows).
    pub fn atomic_numbers(&self) -> &Arc<DeviceEmbeddingIndex> {
        &self.z
    }

    /// The atom-to-token map.
    pub fn token_map(&self) -> &Arc<DeviceTokenMap> {
        &self.map
    }

    /// Whether each atom is heavy (not hydrogen): denoising pretraining perturbs these.
    pub fn heavy(&self) -> &[bool] {
        &self.heavy
    }

    /// C-alpha positions `[F, R, 3]` of frames `[F, A, 3]`: each token's atom named CA if it has
    /// one, else the centroid of its heavy atoms (of all its atoms if it has no heavy atom; the
    /// origin for a token without atoms). Panics if `positions` does not hold `frames` frames.
    pub fn ca_positions(&self, positions: &[f32], frames: usize) -> Vec<f32> {
        let (a, r) = (self.atoms, self.tokens);
        assert_eq!(
            positions.len(),
            frames * a * 3,
            "ca_positions: {} values for {frames} frames of {a} atoms",
            positions.len()
        );
        let mut out = vec![0f32; frames * r * 3];
        for f in 0..frames {
            let x = &positions[f * a * 3..(f + 1) * a * 3];
            for (t, rule) in self.ca.iter().enumerate() {
                let o = &mut out[(f * r + t) * 3..(f * r + t + 1) * 3];
                match rule {
                    CaRule::Atom(i) => o.copy_from_slice(&x[i * 3..i * 3 + 3]),
                    CaRule::Centroid(m) if !m.is_empty() => {
                        // f64 sums in atom order: the same value whatever the batch.
                        let mut c = [0f64; 3];
                        for &i in m {
                            for k in 0..3 {
                                c[k] += x[i * 3 + k] as f64;
                            }
                        }
                        for k in 0..3 {
                            o[k] = (c[k] / m.len() as f64) as f32;
                        }
                    }
                    CaRule::Centroid(_) => {}
                }
            }
        }
        out
    }
}

/// Residue tokens of a batch of frames, on the tape.
pub struct AtomTokens {
    /// Scalars `[F, R, H]`.
    pub s: Var,
    /// Vectors `[F, R, 3, H]`.
    pub v: Var,
    /// C-alpha positions `[F, R, 3]` (host, Angstrom).
    pub ca: Vec<f32>,
    /// The positions `[F A, 3]` as recorded on the tape (with a gradient when asked for by
    /// [`AtomModel::tokens_with_position_grad`]).
    pub positions: Var,
}

/// The atom stage: backbone + token merge; its parameters live in a [`ParamStore`].
pub struct AtomModel {
    config: AtomModelConfig,
    backbone: Backbone,
    /// The store prefix its parameters were created under ("" for a stand-alone model).
    prefix: String,
    /// Their indices in the store.
    params: Range<usize>,
}

impl AtomModel {
    /// Creates the model, adding its parameters to `ps` under the store's current prefix (see
    /// [`ParamStore::set_prefix`]), in the backbone's fixed order.
    pub fn new(config: AtomModelConfig, ps: &mut ParamStore) -> Result<Self> {
        config.validate()?;
        let first = ps.len();
        let backbone = Backbone::new(config.backbone.clone(), ps)?;
        let params = first..ps.len();
        // The backbone's first parameter is `embedding.weight`: what precedes it is the prefix.
        let prefix = ps
            .names()
            .get(first)
            .and_then(|n| n.strip_suffix("embedding.weight"))
            .context("atom model: the backbone's first parameter is not embedding.weight")?
            .to_string();
        Ok(Self {
            config,
            backbone,
            prefix,
            params,
        })
    }

    /// A fresh parameter store on `device`, seeded by the backbone's seed, and the model.
    pub fn create(config: AtomModelConfig, device: &Device) -> Result<(Self, ParamStore)> {
        let mut ps = ParamStore::new(device, config.backbone.seed);
        let m = Self::new(config, &mut ps)?;
        Ok((m, ps))
    }

    /// The configuration.
    pub fn config(&self) -> &AtomModelConfig {
        &self.config
    }

    /// Channels H of the tokens.
    pub fn hidden(&self) -> usize {
        self.config.backbone.hidden
    }

    /// The backbone.
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }

    /// Scalar parameters of the model.
    pub fn numel(&self, ps: &ParamStore) -> usize {
        self.params
            .clone()
            .filter(|&i| i < ps.len())
            .map(|i| ps.value(ParamId(i)).len())
            .sum()
    }

    /// Writes the model's parameters (named without the store prefix, so a model trained inside
    /// a larger store saves as a stand-alone one) and the configuration (JSON in the metadata
    /// key [`CONFIG_METADATA_KEY`]) to a safetensors file, atomically (temporary file, fsync,
    /// rename).
    pub fn save(&self, ps: &ParamStore, path: &Path) -> Result<()> {
        ensure!(
            ps.len() >= self.params.end,
            "atom model: the parameter store holds {} tensors, the model's end at {}",
            ps.len(),
            self.params.end
        );
        let mut tensors = Vec::with_capacity(self.params.len());
        for i in self.params.clone() {
            let name = &ps.names()[i];
            let id = ParamId(i);
            let stripped = name.strip_prefix(&self.prefix).with_context(|| {
                format!(
                    "atom model: parameter {name:?} lacks the prefix {:?}",
                    self.prefix
                )
            })?;
            let t = ps.value(id);
            let bytes: Vec<u8> = t.to_vec()?.iter().flat_map(|x| x.to_le_bytes()).collect();
            tensors.push((stripped.to_string(), t.shape().to_vec(), bytes));
        }
        let views = tensors
            .iter()
            .map(|(n, shape, bytes)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map(|v| (n.as_str(), v))
                    .with_context(|| format!("atom model: tensor {n}"))
            })
            .collect::<Result<Vec<_>>>()?;
        // One metadata key here: safetensors writes the metadata map in HashMap order; the seal
        // below rewrites the header canonically (sorted) and adds the file's XXH3 (issue 16).
        let metadata = HashMap::from([(
            CONFIG_METADATA_KEY.to_string(),
            serde_json::to_string(&self.config).context("serialising the configuration")?,
        )]);
        let bytes = safetensors::serialize(views, Some(metadata))
            .with_context(|| format!("serialising the atom model for {}", path.display()))?;
        let bytes = crate::store::verify::seal_safetensors(&bytes)
            .with_context(|| format!("sealing the atom model for {}", path.display()))?;
        crate::optim::write_atomic(path, &bytes)
            .with_context(|| format!("writing the atom model {}", path.display()))
    }

    /// The configuration of a model saved by [`AtomModel::save`] (to build it before loading).
    pub fn read_config(path: &Path) -> Result<AtomModelConfig> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        // The file's recorded XXH3 (issue 16): a damaged model is refused before it is used.
        crate::store::verify::check_seal(&bytes).with_context(|| format!("{}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let Some(json) = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(CONFIG_METADATA_KEY))
        else {
            bail!(
                "{}: not a hiermd atom model (no {CONFIG_METADATA_KEY:?} metadata)",
                path.display()
            );
        };
        let c: AtomModelConfig = serde_json::from_str(json)
            .with_context(|| format!("{}: the stored configuration", path.display()))?;
        c.validate()
            .with_context(|| format!("{}: the stored configuration", path.display()))?;
        Ok(c)
    }

    /// Rebuilds a saved model on `device`: its configuration, then its weights.
    pub fn load(path: &Path, device: &Device) -> Result<(Self, ParamStore)> {
        let config = Self::read_config(path)?;
        let (m, mut ps) = Self::create(config, device)?;
        ps.load(path)?;
        Ok((m, ps))
    }

    /// Reads a saved model's weights into the parameters of `ps` whose names start with
    /// `store_prefix` (end-to-end training builds the atom model under "atom."). Every such
    /// parameter must be in the file with its shape, and at least one must exist; other
    /// parameters are left alone, and nothing changes unless all check out.
    pub fn load_into(path: &Path, ps: &mut ParamStore, store_prefix: &str) -> Result<()> {
        // Fails early, naming the file, when it is not an atom model at all.
        Self::read_config(path)?;
        let (_, n) = ps.load_mapped(path, store_prefix, "")?;
        ensure!(
            n > 0,
            "{}: the parameter store has no parameters under the prefix {store_prefix:?}",
            path.display()
        );
        Ok(())
    }

    /// Residue tokens of `frames` frames (`positions` `[F, A, 3]` on the host, Angstrom; `cells`:
    /// none, one for all frames or one per frame, for periodic boxes). The positions are recorded
    /// without a gradient (see [`AtomModel::tokens_with_position_grad`]).
    pub fn tokens(
        &self,
        tape: &mut Tape,
        inputs: &AtomInputs,
        positions: &[f32],
        frames: usize,
        cells: Option<&[UnitCell]>,
    ) -> Result<AtomTokens> {
        self.tokens_impl(tape, inputs, positions, frames, cells, false)
    }

    /// As [`AtomModel::tokens`], with the positions recorded with a gradient (forces, or
    /// gradients of a loss with respect to the coordinates: read them with
    /// `tape.grad(tokens.positions)` after the backward pass).
    pub fn tokens_with_position_grad(
        &self,
        tape: &mut Tape,
        inputs: &AtomInputs,
        positions: &[f32],
        frames: usize,
        cells: Option<&[UnitCell]>,
    ) -> Result<AtomTokens> {
        self.tokens_impl(tape, inputs, positions, frames, cells, true)
    }

    fn tokens_impl(
        &self,
        tape: &mut Tape,
        inputs: &AtomInputs,
        positions: &[f32],
        frames: usize,
        cells: Option<&[UnitCell]>,
        positions_grad: bool,
    ) -> Result<AtomTokens> {
        let (pos, nl) = self.graph(tape, inputs, positions, frames, cells, positions_grad)?;
        let (s, v) = self.atoms(tape, inputs, pos, &nl)?;
        let reduce = self.config.reduce.reduce();
        let s = atoms::token_merge(tape, inputs.map.clone(), s, reduce)?;
        let v = atoms::token_merge(tape, inputs.map.clone(), v, reduce)?;
        Ok(AtomTokens {
            s,
            v,
            ca: inputs.ca_positions(positions, frames),
            positions: pos,
        })
    }

    /// Records `positions` (`[F, A, 3]` host) on the tape as `[F A, 3]` and builds their radius
    /// graph with the model's neighbor cutoff.
    pub fn graph(
        &self,
        tape: &mut Tape,
        inputs: &AtomInputs,
        positions: &[f32],
        frames: usize,
        cells: Option<&[UnitCell]>,
        positions_grad: bool,
    ) -> Result<(Var, Arc<NeighborList>)> {
        let a = inputs.atoms;
        ensure!(frames > 0, "atom model: no frames");
        ensure!(
            positions.len() == frames * a * 3,
            "atom model: {} coordinates for {frames} frames of {a} atoms (expected {})",
            positions.len(),
            frames * a * 3
        );
        let dev = tape.device().clone();
        let t = Tensor::from_slice(&dev, &[frames, a, 3], positions)?;
        let nl = NeighborList::build(&t, self.config.cutoff(), cells, None)?;
        let t = t.reshape(&[frames * a, 3])?;
        let pos = if positions_grad {
            tape.input_with_grad(t)?
        } else {
            tape.input(t)?
        };
        Ok((pos, Arc::new(nl)))
    }

    /// The backbone's per-atom output `(s [F, A, H], v [F, A, 3, H])` for `positions` `[F A, 3]`
    /// on the tape and their neighbor list (from [`AtomModel::graph`]).
    pub fn atoms(
        &self,
        tape: &mut Tape,
        inputs: &AtomInputs,
        positions: Var,
        nl: &Arc<NeighborList>,
    ) -> Result<(Var, Var)> {
        self.backbone.forward(tape, positions, &inputs.z, nl)
    }

    /// The denoising head on the per-atom output: one vector per atom, `[F A, 3]`.
    pub fn denoise(&self, tape: &mut Tape, s: Var, v: Var) -> Result<Var> {
        self.backbone.denoise_head(tape, s, v)
    }
}
