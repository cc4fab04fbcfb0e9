//! The network a run trains: frames in (frozen residue-token features, or coordinates through the
//! atom stage), the token model, and for SPIB its encoder/decoder head. All parameters live in
//! one store, named `atom.*`, `token.*` and `spib.*`.

use super::config::{ObjectiveKind, RunConfig};
use crate::model::atom::{AtomInputs, AtomModel, AtomModelConfig};
use crate::model::{TokenModel, TokenOutput};
use crate::objectives::spib::SpibHead;
use crate::store::{Dataset, FeatureStore};
use crate::tape::{ParamStore, Tape};
use crate::Device;
use anyhow::{ensure, Context, Result};
use std::sync::Arc;

/// Where a frame's residue tokens come from.
pub enum Source {
    /// A feature store written by `hiermd featurize` (the atom stage frozen).
    Features(FeatureStore),
    /// Coordinates through the atom stage, trained end to end.
    Coordinates {
        /// The atom stage.
        atom: AtomModel,
        /// Its per-dataset inputs (atomic numbers, token map).
        inputs: AtomInputs,
        /// The dataset atoms it sees (`data.selection`), or None for all.
        atoms: Option<Vec<usize>>,
    },
}

/// A run's network.
pub struct Network {
    /// The dataset whose frames it reads.
    pub ds: Arc<Dataset>,
    /// Token source.
    pub source: Source,
    /// The token stage.
    pub token: TokenModel,
    /// SPIB's head (SPIB runs only).
    pub spib: Option<SpibHead>,
    /// The objective.
    pub objective: ObjectiveKind,
}

impl Network {
    /// Builds the network of `cfg` with freshly initialised parameters (an end-to-end run with
    /// `data.atom_model` loads the atom stage from it).
    pub fn build(cfg: &RunConfig, device: &Device) -> Result<(Self, ParamStore)> {
        let ds = Arc::new(Dataset::open(&cfg.data.dataset).context("data.dataset")?);
        let mut ps = ParamStore::new(device, cfg.train.seed);
        let (source, channels) = match &cfg.data.features {
            Some(dir) => {
                let store = FeatureStore::open(dir).context("data.features")?;
                store
                    .check_dataset(&ds)
                    .with_context(|| format!("data.features {}", dir.display()))?;
                let h = store.channels();
                (Source::Features(store), h)
            }
            None => {
                let config = match (&cfg.data.atom_model, &cfg.atom) {
                    (Some(path), _) => AtomModel::read_config(path)
                        .with_context(|| format!("data.atom_model {}", path.display()))?,
                    (None, Some(table)) => {
                        AtomModelConfig::from_toml(&toml::to_string(table)?).context("[atom]")?
                    }
                    (None, None) => AtomModelConfig::default(),
                };
                ps.set_prefix("atom.");
                let atom = AtomModel::new(config, &mut ps)?;
                if let Some(path) = &cfg.data.atom_model {
                    AtomModel::load_into(path, &mut ps, "atom.")
                        .with_context(|| format!("data.atom_model {}", path.display()))?;
                }
                let (inputs, atoms) = match &cfg.data.selection {
                    None => (AtomInputs::new(&ds, device)?, None),
                    Some(expr) => {
                        let (inputs, atoms) = selected_inputs(&ds, expr, device)
                            .with_context(|| format!("data.selection {expr:?}"))?;
                        (inputs, Some(atoms))
                    }
                };
                let h = atom.hidden();
                (
                    Source::Coordinates {
                        atom,
                        inputs,
                        atoms,
                    },
                    h,
                )
            }
        };
        ps.set_prefix("token.");
        let token = TokenModel::new(cfg.token_model(channels)?, &mut ps)?;
        let spib = match cfg.objective.kind {
            ObjectiveKind::Spib => {
                ps.set_prefix("spib.");
                Some(SpibHead::new(
                    &mut ps,
                    "head",
                    cfg.objective.outputs,
                    &cfg.objective.spib,
                )?)
            }
            ObjectiveKind::Vamp => None,
        };
        ps.set_prefix("");
        Ok((
            Self {
                ds,
                source,
                token,
                spib,
                objective: cfg.objective.kind,
            },
            ps,
        ))
    }

    /// Whether the atom stage is part of the network.
    pub fn end_to_end(&self) -> bool {
        matches!(self.source, Source::Coordinates { .. })
    }

    /// Residues (tokens before merging) per frame.
    pub fn residues(&self) -> usize {
        match &self.source {
            Source::Features(f) => f.tokens(),
            Source::Coordinates { inputs, .. } => inputs.tokens(),
        }
    }

    /// Runs the network on frames `(trajectory, frame)`; the output is `[n, outputs]`.
    pub fn encode(&self, tape: &mut Tape, frames: &[(usize, usize)]) -> Result<TokenOutput> {
        ensure!(!frames.is_empty(), "encode: no frames");
        let n = frames.len();
        match &self.source {
            Source::Features(store) => {
                let (r, h) = (store.tokens(), store.channels());
                let mut s = vec![0f32; n * r * h];
                let mut v = vec![0f32; n * r * 3 * h];
                let mut ca = store.has_ca().then(|| vec![0f32; n * r * 3]);
                store.gather_batch(frames, &mut s, &mut v, ca.as_deref_mut())?;
                // Straight into tape memory (recycled step after step), no second copy.
                let mut st = tape.alloc(&[n, r, h])?;
                st.copy_from_slice(&s)?;
                let mut vt = tape.alloc(&[n, r, 3, h])?;
                vt.copy_from_slice(&v)?;
                let (s, v) = (tape.input(st)?, tape.input(vt)?);
                self.token.forward_vars(tape, s, v, ca.as_deref(), None)
            }
            Source::Coordinates {
                atom,
                inputs,
                atoms,
            } => {
                let a = inputs.atoms();
                let mut pos = Vec::with_capacity(n * a * 3);
                let mut cells = Vec::new();
                for &(t, i) in frames {
                    // Checked (range, finite, plausible): a corrupt stored frame is an error
                    // naming the file, frame and atom rather than a NaN in training.
                    let x = self
                        .ds
                        .checked_frame(t, i)
                        .with_context(|| format!("encode: frame {i} of trajectory {t}"))?;
                    let traj = &self.ds.trajectories[t];
                    match atoms {
                        None => pos.extend_from_slice(x),
                        Some(sel) => {
                            for &j in sel {
                                pos.extend_from_slice(&x[3 * j..3 * j + 3]);
                            }
                        }
                    }
                    if let Some(c) = traj.unit_cell(i) {
                        cells.push(c);
                    }
                }
                let cells = (cells.len() == n).then_some(cells);
                let toks = atom.tokens(tape, inputs, &pos, n, cells.as_deref())?;
                self.token
                    .forward_vars(tape, toks.s, toks.v, Some(&toks.ca), None)
            }
        }
    }
}

/// The atom-stage inputs of the atoms an MDAnalysis-style selection picks from the dataset: their
/// atomic numbers, their tokens renumbered densely (tokens without a selected atom dropped), and
/// each token's CA atom among them. Returns the inputs and the dataset indices of the atoms.
pub fn selected_inputs(
    ds: &Dataset,
    expr: &str,
    device: &Device,
) -> Result<(AtomInputs, Vec<usize>)> {
    use crate::topology::{Atom, Topology};
    let top = Topology {
        source: ds.dir().join("atoms.tsv"),
        atoms: ds
            .atoms
            .iter()
            .map(|a| Atom {
                name: a.name.clone(),
                resname: a.resname.clone(),
                resid: a.resid,
                icode: ' ',
                chain: a.chain.clone(),
                segid: String::new(),
                element: a.element.clone(),
                atomic_number: a.atomic_number,
                mass: a.mass,
                charge: 0.0,
            })
            .collect(),
        coords: None,
        unit_cell: None,
    };
    let picked = crate::select::select(&top, expr)?;
    ensure!(
        !picked.is_empty(),
        "selects no atom of the {} in {}",
        ds.natoms(),
        ds.dir().display()
    );
    let token_of = ds.token_map();
    let mut renumber = std::collections::BTreeMap::new();
    for &a in &picked {
        let t = token_of[a];
        if t != crate::ops::scatter::EXCLUDED {
            let next = renumber.len() as u32;
            renumber.entry(t).or_insert(next);
        }
    }
    ensure!(
        !renumber.is_empty(),
        "selects no atom that belongs to a token"
    );
    let z: Vec<u8> = picked.iter().map(|&a| ds.atoms[a].atomic_number).collect();
    let tokens: Vec<u32> = picked
        .iter()
        .map(|&a| {
            renumber
                .get(&token_of[a])
                .copied()
                .unwrap_or(crate::ops::scatter::EXCLUDED)
        })
        .collect();
    let mut ca = vec![None; renumber.len()];
    for (i, &a) in picked.iter().enumerate() {
        if tokens[i] != crate::ops::scatter::EXCLUDED && ds.atoms[a].name.trim() == "CA" {
            ca[tokens[i] as usize].get_or_insert(i);
        }
    }
    let inputs = AtomInputs::from_parts(&z, &tokens, renumber.len(), &ca, device)?;
    Ok((inputs, picked))
}
