//! The library API: hiermd embedded in another program.
//!
//! Two layers:
//! - [`Model`]: a trained run (`hiermd train`'s folder: `config.toml` + `model.safetensors`)
//!   loaded once and applied to frames given as coordinates, always going coordinates -> atom
//!   stage -> token stage -> outputs, whichever way the run was trained (end to end, or on
//!   frozen features, whose feature store's manifest names the atom model that made them). Its
//!   rows are what `hiermd transform` writes for the same frames: VAMP state probabilities, or
//!   SPIB's encoder mean followed by the most likely state.
//! - [`Featurizer`]: only the atom stage (an atom model from `hiermd init-model` or `hiermd
//!   pretrain`): frames -> residue tokens, what `hiermd featurize` stores.
//! - [`kernels`]: the individual GPU kernels (neighbor list, atom-to-token merge, EqSDPA forward
//!   and backward) behind small wrappers over [`Tensor`]s.
//!
//! The C ABI over caller-owned buffers ([`crate::capi`], `include/hiermd.h`) is built on this
//! module.
//!
//! ```no_run
//! use hiermd::api::{Device, Model};
//! # fn main() -> anyhow::Result<()> {
//! let mut model = Model::load("runs/vamp", &Device::Cpu)?;
//! let frames = 2;
//! let positions = vec![0f32; frames * model.atoms() * 3]; // [frames, atoms, 3] Angstrom
//! let mut out = vec![0f32; frames * model.width()];
//! model.evaluate(&positions, frames, None, &mut out)?;
//! println!("{:?}: {:?}", model.columns(), &out[..model.width()]);
//! # Ok(())
//! # }
//! ```
//!
//! # Threads
//! A [`Model`] is `Send`: it may move between threads, but [`Model::evaluate`] takes `&mut self`
//! (the model owns the tape whose memory pool every call reuses), so one model serves one thread
//! at a time. Several models, on one device or several, may be evaluated from different threads
//! at once; on a cuda device all of them queue their work on that device's single stream.

use crate::model::atom::{AtomInputs, AtomModel, AtomModelConfig};
use crate::model::TokenModel;
use crate::objectives::spib::SpibHead;
use crate::store::{Dataset, FeatureDtype, FeatureManifest};
use crate::tape::{ParamStore, Tape};
use crate::workflow::config::{ObjectiveKind, RunConfig};
use crate::workflow::run::files;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

pub use crate::tensor::Tensor;
pub use crate::traj::UnitCell;
pub use crate::{Device, DeviceSpec};

/// The atoms a model is applied to: what the atom stage needs besides coordinates.
///
/// [`Model::load`] takes it from the run's dataset ([`System::from_dataset`]); a program without
/// the dataset folder builds it from plain arrays and passes it to [`Model::load_with_system`]
/// or [`Model::with_system`]. The atoms must be those of the trained system in the same order
/// (the atom stage itself works for any system, but the token stage learned these tokens).
///
/// ```
/// use hiermd::api::System;
/// // Two residues of two heavy atoms each (an N and a CA); token 0's C-alpha position is its
/// // atom 1, token 1 has no atom named CA: its heavy-atom centroid stands in.
/// let sys = System {
///     atomic_numbers: vec![7, 6, 7, 6],
///     token_of_atom: vec![0, 0, 1, 1],
///     tokens: 2,
///     ca_atom: vec![Some(1), None],
/// };
/// assert_eq!(sys.atoms(), 4);
/// sys.validate().unwrap();
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct System {
    /// Atomic number of each atom, `[atoms]` (1..=99).
    pub atomic_numbers: Vec<u8>,
    /// Token (residue) of each atom, `[atoms]`, in `0..tokens`; `u32::MAX` leaves an atom out of
    /// the merge (it still takes part in message passing).
    pub token_of_atom: Vec<u32>,
    /// Tokens R.
    pub tokens: usize,
    /// Per token, the atom whose position is its C-alpha position, or `None` for the centroid
    /// of its heavy atoms (of all its atoms if it has none), `[tokens]`.
    pub ca_atom: Vec<Option<usize>>,
}

impl System {
    /// The atoms of an imported dataset: its atomic numbers and token map, and each token's atom
    /// named CA (as [`AtomInputs::new`] picks them).
    ///
    /// ```no_run
    /// use hiermd::api::System;
    /// let ds = hiermd::store::Dataset::open("data/ala2".as_ref()).unwrap();
    /// let sys = System::from_dataset(&ds);
    /// assert_eq!(sys.atoms(), ds.natoms());
    /// ```
    pub fn from_dataset(ds: &Dataset) -> Self {
        let tokens = ds.manifest.tokens;
        let mut ca_atom = vec![None; tokens];
        for (a, atom) in ds.atoms.iter().enumerate() {
            let t = atom.token as usize;
            if t < tokens && ca_atom[t].is_none() && atom.name.trim() == "CA" {
                ca_atom[t] = Some(a);
            }
        }
        Self {
            atomic_numbers: ds.atomic_numbers(),
            token_of_atom: ds.token_map(),
            tokens,
            ca_atom,
        }
    }

    /// [`System::from_dataset`] of the dataset folder `dir`.
    ///
    /// ```no_run
    /// let sys = hiermd::api::System::open_dataset("data/ala2").unwrap();
    /// println!("{} atoms in {} tokens", sys.atoms(), sys.tokens);
    /// ```
    pub fn open_dataset(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let ds = Dataset::open(dir).with_context(|| format!("dataset {}", dir.display()))?;
        Ok(Self::from_dataset(&ds))
    }

    /// Atoms A.
    ///
    /// ```
    /// let sys = hiermd::api::System {
    ///     atomic_numbers: vec![6],
    ///     token_of_atom: vec![0],
    ///     tokens: 1,
    ///     ca_atom: vec![Some(0)],
    /// };
    /// assert_eq!(sys.atoms(), 1);
    /// ```
    pub fn atoms(&self) -> usize {
        self.atomic_numbers.len()
    }

    /// Checks the arrays' sizes and ranges (what [`Model::with_system`] checks too); the error
    /// names the atom or token.
    ///
    /// ```
    /// let bad = hiermd::api::System {
    ///     atomic_numbers: vec![6, 6],
    ///     token_of_atom: vec![0, 3],
    ///     tokens: 1,
    ///     ca_atom: vec![None],
    /// };
    /// assert!(bad.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<()> {
        self.inputs(&Device::Cpu).map(|_| ())
    }

    fn inputs(&self, device: &Device) -> Result<AtomInputs> {
        AtomInputs::from_parts(
            &self.atomic_numbers,
            &self.token_of_atom,
            self.tokens,
            &self.ca_atom,
            device,
        )
    }
}

/// A trained run, ready to evaluate frames: atom stage, token stage and (SPIB) head with the
/// trained weights on one device.
///
/// ```no_run
/// use hiermd::api::{Device, Model};
/// let mut m = Model::load("runs/vamp", &Device::Cpu).unwrap();
/// let rows = m.evaluate_vec(&vec![0.0; 3 * m.atoms() * 3], 3, None).unwrap();
/// assert_eq!(rows.len(), 3 * m.width());
/// ```
pub struct Model {
    dir: PathBuf,
    device: Device,
    config: RunConfig,
    atom: AtomModel,
    inputs: AtomInputs,
    system: System,
    token: TokenModel,
    spib: Option<SpibHead>,
    objective: ObjectiveKind,
    /// Whether the token stage reads C-alpha positions (a features run whose store has none
    /// was trained without them).
    ca: bool,
    frozen: Option<PathBuf>,
    tape: Tape,
}

// SAFETY: the only part of a model the compiler does not see as `Send` is its tape's record of
// backward closures (boxed `dyn FnOnce` without a `Send` bound). Those closures capture tensors,
// `Arc`s and plain values of this crate, which has no `Rc`, `RefCell` or thread-local state, and
// they exist only while `evaluate` runs on one thread: every call resets the tape before it
// returns, so a model between calls holds no closure at all.
unsafe impl Send for Model {}

/// The run folder and weights file a path names: a run folder, or a weights file in one.
fn resolve(path: &Path) -> Result<(PathBuf, PathBuf)> {
    if path.is_dir() {
        return Ok((path.to_path_buf(), path.join(files::MODEL)));
    }
    ensure!(
        path.exists(),
        "{}: no such run folder or model file",
        path.display()
    );
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, path.to_path_buf()))
}

/// The atom model a feature store was made with (checked against the XXH3 its manifest
/// recorded), and whether the store carries C-alpha positions.
fn features_atom_model(features: &Path) -> Result<(PathBuf, FeatureManifest)> {
    let mpath = features.join("manifest.toml");
    let text = std::fs::read_to_string(&mpath).with_context(|| {
        format!(
            "{}: the run was trained on frozen features, and evaluating coordinates needs the \
             atom model recorded in their manifest, which cannot be read",
            mpath.display()
        )
    })?;
    let manifest: FeatureManifest =
        toml::from_str(&text).with_context(|| format!("{}: invalid manifest", mpath.display()))?;
    let Some(src) = &manifest.backbone else {
        bail!(
            "{}: the features were made by a freshly initialised atom model (no --model given to \
             `hiermd featurize`), which is not saved: make the features again with a saved model \
             (`hiermd init-model`) to evaluate coordinates",
            features.display()
        );
    };
    let path = PathBuf::from(&src.path);
    let now = crate::store::source_file(&path).with_context(|| {
        format!(
            "the atom model {} recorded in {}",
            path.display(),
            mpath.display()
        )
    })?;
    ensure!(
        now.xxh3 == src.xxh3 && now.bytes == src.bytes,
        "the atom model {} changed since {} was made from it (XXH3 {} then, {} now)",
        path.display(),
        features.display(),
        src.xxh3,
        now.xxh3
    );
    Ok((path, manifest))
}

impl Model {
    /// Loads a trained run from its folder (or its `model.safetensors`, or another weights file
    /// of the run such as `best.safetensors`) onto `device`, with the system of the run's
    /// dataset. A run trained on frozen features also loads the atom model recorded in the
    /// feature store's manifest (which must still be there, unchanged), so that frames go in
    /// as coordinates either way.
    ///
    /// Errors: no `config.toml` (not a run), weights that are not the run's, a dataset that is
    /// gone (then [`Model::load_with_system`] works without it).
    ///
    /// ```no_run
    /// let m = hiermd::api::Model::load("runs/vamp", &hiermd::Device::Cpu).unwrap();
    /// println!("{} atoms -> {:?}", m.atoms(), m.columns());
    /// ```
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::load_impl(path.as_ref(), device, None)
    }

    /// As [`Model::load`] with the atoms given instead of read from the run's dataset (which
    /// need not exist).
    ///
    /// ```no_run
    /// use hiermd::api::{Device, Model, System};
    /// let sys = System::open_dataset("data/ala2").unwrap();
    /// let m = Model::load_with_system("runs/vamp", &Device::Cpu, &sys).unwrap();
    /// assert_eq!(m.atoms(), sys.atoms());
    /// ```
    pub fn load_with_system(
        path: impl AsRef<Path>,
        device: &Device,
        system: &System,
    ) -> Result<Self> {
        Self::load_impl(path.as_ref(), device, Some(system))
    }

    fn load_impl(path: &Path, device: &Device, system: Option<&System>) -> Result<Self> {
        let (dir, weights) = resolve(path)?;
        let cpath = dir.join(files::CONFIG);
        let text = std::fs::read_to_string(&cpath).with_context(|| {
            format!(
                "{}: not a hiermd run (no readable {} beside it)",
                path.display(),
                files::CONFIG
            )
        })?;
        let config = RunConfig::from_toml_with(&text, &[])
            .with_context(|| format!("in {}", cpath.display()))?;
        ensure!(
            weights.exists(),
            "{}: the run has no {} (still training? `hiermd train --resume` finishes it)",
            dir.display(),
            files::MODEL
        );
        let system = match system {
            Some(s) => s.clone(),
            None => System::open_dataset(&config.data.dataset).with_context(|| {
                format!(
                    "the system of run {} comes from its dataset (give it with \
                     Model::load_with_system where the dataset is gone)",
                    dir.display()
                )
            })?,
        };
        let inputs = system.inputs(device).context("the system")?;
        let mut ps = ParamStore::new(device, config.train.seed);
        // The atom stage, under "atom." as in an end-to-end run's store.
        let (atom, ca, frozen) = match &config.data.features {
            Some(features) => {
                let (path, manifest) = features_atom_model(features)?;
                let c = AtomModel::read_config(&path)?;
                ps.set_prefix("atom.");
                let atom = AtomModel::new(c, &mut ps)?;
                AtomModel::load_into(&path, &mut ps, "atom.")?;
                ensure!(
                    manifest.channels == atom.hidden(),
                    "{}: {} channels, its atom model {} makes {}",
                    features.display(),
                    manifest.channels,
                    path.display(),
                    atom.hidden()
                );
                ensure!(
                    manifest.tokens == inputs.tokens(),
                    "{}: {} tokens per frame, the system has {}",
                    features.display(),
                    manifest.tokens,
                    inputs.tokens()
                );
                (atom, manifest.ca_positions, Some(path))
            }
            None => {
                let c = match (&config.data.atom_model, &config.atom) {
                    (Some(p), _) => AtomModel::read_config(p)
                        .with_context(|| format!("data.atom_model {}", p.display()))?,
                    (None, Some(table)) => {
                        AtomModelConfig::from_toml(&toml::to_string(table)?).context("[atom]")?
                    }
                    (None, None) => AtomModelConfig::default(),
                };
                ps.set_prefix("atom.");
                (AtomModel::new(c, &mut ps)?, true, None)
            }
        };
        ps.set_prefix("token.");
        let token = TokenModel::new(config.token_model(atom.hidden())?, &mut ps)?;
        let spib = match config.objective.kind {
            ObjectiveKind::Spib => {
                ps.set_prefix("spib.");
                Some(SpibHead::new(
                    &mut ps,
                    "head",
                    config.objective.outputs,
                    &config.objective.spib,
                )?)
            }
            ObjectiveKind::Vamp => None,
        };
        ps.set_prefix("");
        if frozen.is_some() {
            // The run's file holds the token stage and the head; the atom stage came above.
            ps.load_mapped(&weights, "token.", "token.")?;
            if spib.is_some() {
                ps.load_mapped(&weights, "spib.", "spib.")?;
            }
        } else {
            ps.load(&weights)?;
        }
        let mut tape = Tape::new(ps, config.train.seed);
        tape.set_training(false);
        Ok(Self {
            dir,
            device: device.clone(),
            objective: config.objective.kind,
            config,
            atom,
            inputs,
            system,
            token,
            spib,
            ca,
            frozen,
            tape,
        })
    }

    /// The same model applied to other atoms (checked as [`System::validate`] does).
    ///
    /// ```no_run
    /// use hiermd::api::{Device, Model, System};
    /// let m = Model::load("runs/vamp", &Device::Cpu).unwrap();
    /// let sys = m.system().clone();
    /// let m = m.with_system(&sys).unwrap();
    /// ```
    pub fn with_system(mut self, system: &System) -> Result<Self> {
        self.inputs = system.inputs(&self.device).context("the system")?;
        self.system = system.clone();
        Ok(self)
    }

    /// Width of an output row: VAMP outputs, or SPIB's latent dimension plus one (the state).
    ///
    /// ```no_run
    /// let m = hiermd::api::Model::load("runs/vamp", &hiermd::Device::Cpu).unwrap();
    /// assert_eq!(m.width(), m.columns().len());
    /// ```
    pub fn width(&self) -> usize {
        match self.objective {
            ObjectiveKind::Vamp => self.config.objective.outputs,
            ObjectiveKind::Spib => self.config.objective.spib.z_dim + 1,
        }
    }

    /// Names of the output columns, as `hiermd transform` writes them: `p0, p1, ...` (VAMP) or
    /// `z1, z2, ..., state` (SPIB).
    ///
    /// ```no_run
    /// let m = hiermd::api::Model::load("runs/vamp", &hiermd::Device::Cpu).unwrap();
    /// assert_eq!(m.columns()[0], "p0");
    /// ```
    pub fn columns(&self) -> Vec<String> {
        let w = self.width();
        match self.objective {
            ObjectiveKind::Vamp => (0..w).map(|i| format!("p{i}")).collect(),
            ObjectiveKind::Spib => (1..w)
                .map(|i| format!("z{i}"))
                .chain(["state".to_string()])
                .collect(),
        }
    }

    /// Atoms A per frame.
    ///
    /// ```no_run
    /// let m = hiermd::api::Model::load("runs/vamp", &hiermd::Device::Cpu).unwrap();
    /// let frame = vec![0f32; m.atoms() * 3];
    /// ```
    pub fn atoms(&self) -> usize {
        self.inputs.atoms()
    }

    /// Tokens (residues) R per frame.
    ///
    /// ```no_run
    /// let m = hiermd::api::Model::load("runs/vamp", &hiermd::Device::Cpu).unwrap();
    /// assert_eq!(m.tokens(), m.system().tokens);
    /// ```
    pub fn tokens(&self) -> usize {
        self.inputs.tokens()
    }

    /// The atoms the model evaluates.
    ///
    /// ```no_run
    /// let m = hiermd::api::Model::load("runs/vamp", &hiermd::Device::Cpu).unwrap();
    /// println!("{:?}", m.system().atomic_numbers);
    /// ```
    pub fn system(&self) -> &System {
        &self.system
    }

    /// The device it runs on.
    ///
    /// ```no_run
    /// let m = hiermd::api::Model::load("runs/vamp", &hiermd::Device::Cpu).unwrap();
    /// assert_eq!(m.device().name(), "cpu");
    /// ```
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The run folder.
    ///
    /// ```no_run
    /// let m = hiermd::api::Model::load("runs/vamp/model.safetensors", &hiermd::Device::Cpu).unwrap();
    /// assert!(m.run_dir().ends_with("vamp"));
    /// ```
    pub fn run_dir(&self) -> &Path {
        &self.dir
    }

    /// For a run trained on frozen features, the atom model file it loaded from the feature
    /// store's manifest; `None` for an end-to-end run (its atom stage is in the run's weights).
    ///
    /// ```no_run
    /// let m = hiermd::api::Model::load("runs/vamp", &hiermd::Device::Cpu).unwrap();
    /// if let Some(p) = m.frozen_atom_model() {
    ///     println!("atom stage from {}", p.display());
    /// }
    /// ```
    pub fn frozen_atom_model(&self) -> Option<&Path> {
        self.frozen.as_deref()
    }

    /// Whether the run's feature store holds f16 features: then the token stage was trained
    /// (and `hiermd transform` evaluates) on rounded tokens, and [`Model::evaluate`], which
    /// hands it the atom stage's f32 tokens, differs from `transform` by that rounding.
    ///
    /// ```no_run
    /// let m = hiermd::api::Model::load("runs/vamp", &hiermd::Device::Cpu).unwrap();
    /// assert!(!m.f16_features().unwrap());
    /// ```
    pub fn f16_features(&self) -> Result<bool> {
        match &self.config.data.features {
            Some(f) => Ok(features_atom_model(f)?.1.dtype == FeatureDtype::F16),
            None => Ok(false),
        }
    }

    /// Bytes the model's tape holds for activations (its pool): after the first
    /// [`Model::evaluate`] of `n` frames, later calls with `n` frames take every activation from
    /// it.
    ///
    /// ```no_run
    /// let m = hiermd::api::Model::load("runs/vamp", &hiermd::Device::Cpu).unwrap();
    /// println!("{} bytes of activations", m.pool_bytes());
    /// ```
    pub fn pool_bytes(&self) -> usize {
        self.tape.pool_bytes()
    }

    /// Evaluates `n_frames` frames: `positions` `[n_frames, atoms, 3]` in Angstrom (host
    /// memory), `cells` none (open boundaries), one for every frame or one per frame; writes
    /// `[n_frames, width]` rows into `out` (row-major). The frames are one batch: memory grows
    /// with `n_frames`; split long trajectories into batches of a few hundred frames.
    ///
    /// Errors name what is wrong: sizes, non-finite coordinates, boxes too small for the
    /// cutoff. Each frame's row does not depend on the other frames of the batch.
    ///
    /// ```no_run
    /// use hiermd::api::{Device, Model};
    /// let mut m = Model::load("runs/vamp", &Device::Cpu).unwrap();
    /// let ds = hiermd::store::Dataset::open("data/ala2".as_ref()).unwrap();
    /// let traj = &ds.trajectories[0];
    /// let n = traj.frames().min(100);
    /// let mut out = vec![0f32; n * m.width()];
    /// m.evaluate(&traj.coords()[..n * m.atoms() * 3], n, None, &mut out).unwrap();
    /// ```
    pub fn evaluate(
        &mut self,
        positions: &[f32],
        n_frames: usize,
        cells: Option<&[UnitCell]>,
        out: &mut [f32],
    ) -> Result<()> {
        self.check(positions.len(), n_frames, cells, out.len())?;
        let result = self.forward(positions, n_frames, cells, out);
        self.tape.reset();
        result
    }

    /// As [`Model::evaluate`], returning the rows.
    ///
    /// ```no_run
    /// let mut m = hiermd::api::Model::load("runs/vamp", &hiermd::Device::Cpu).unwrap();
    /// let rows = m.evaluate_vec(&vec![0.0; m.atoms() * 3], 1, None).unwrap();
    /// ```
    pub fn evaluate_vec(
        &mut self,
        positions: &[f32],
        n_frames: usize,
        cells: Option<&[UnitCell]>,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n_frames * self.width()];
        self.evaluate(positions, n_frames, cells, &mut out)?;
        Ok(out)
    }

    /// As [`Model::evaluate`] with tensors on the model's device: `positions`
    /// `[n_frames, atoms, 3]`, `out` `[n_frames, width]`. The atom stage reads coordinates on
    /// the host (C-alpha positions, the neighbor list's cell assignment), so on cuda the
    /// positions are downloaded first and the rows uploaded at the end.
    ///
    /// ```no_run
    /// use hiermd::api::{Device, Model, Tensor};
    /// let dev = Device::Cpu;
    /// let mut m = Model::load("runs/vamp", &dev).unwrap();
    /// let pos = Tensor::<f32>::zeros(&dev, &[4, m.atoms(), 3]).unwrap();
    /// let mut out = Tensor::<f32>::zeros(&dev, &[4, m.width()]).unwrap();
    /// m.evaluate_tensor(&pos, None, &mut out).unwrap();
    /// ```
    pub fn evaluate_tensor(
        &mut self,
        positions: &Tensor<f32>,
        cells: Option<&[UnitCell]>,
        out: &mut Tensor<f32>,
    ) -> Result<()> {
        let (a, w) = (self.atoms(), self.width());
        let n = match *positions.shape() {
            [n, aa, 3] if aa == a => n,
            _ => bail!(
                "evaluate: positions have shape {:?}, expected [frames, {a}, 3]",
                positions.shape()
            ),
        };
        ensure!(
            out.shape() == [n, w],
            "evaluate: out has shape {:?}, expected [{n}, {w}]",
            out.shape()
        );
        ensure!(
            positions.device().same(&self.device) && out.device().same(&self.device),
            "evaluate: the tensors are on {} and {}, the model on {}",
            positions.device().name(),
            out.device().name(),
            self.device.name()
        );
        let rows = match (positions.host(), out.host_mut()) {
            (Some(p), Some(o)) => return self.evaluate(p, n, cells, o),
            _ => self.evaluate_vec(&positions.to_vec()?, n, cells)?,
        };
        out.copy_from_slice(&rows)
    }

    /// Checks the sizes of an evaluation.
    pub(crate) fn check(
        &self,
        positions: usize,
        n_frames: usize,
        cells: Option<&[UnitCell]>,
        out: usize,
    ) -> Result<()> {
        let (a, w) = (self.atoms(), self.width());
        ensure!(n_frames > 0, "evaluate: no frames (n_frames = 0)");
        let want = n_frames
            .checked_mul(a * 3)
            .context("evaluate: n_frames too large")?;
        ensure!(
            positions == want,
            "evaluate: {positions} coordinates for {n_frames} frames of {a} atoms (expected {want})"
        );
        ensure!(
            out == n_frames * w,
            "evaluate: room for {out} outputs, {n_frames} frames of {w} columns need {}",
            n_frames * w
        );
        if let Some(c) = cells {
            ensure!(
                c.len() == 1 || c.len() == n_frames,
                "evaluate: {} unit cells for {n_frames} frames (expected 1 or {n_frames})",
                c.len()
            );
        }
        Ok(())
    }

    fn forward(
        &mut self,
        positions: &[f32],
        n: usize,
        cells: Option<&[UnitCell]>,
        out: &mut [f32],
    ) -> Result<()> {
        let tape = &mut self.tape;
        tape.reset();
        let toks = self.atom.tokens(tape, &self.inputs, positions, n, cells)?;
        let ca = self.ca.then_some(toks.ca.as_slice());
        let enc = self.token.forward_vars(tape, toks.s, toks.v, ca, None)?;
        // As `workflow::run::predict_batch`, so that the rows equal `hiermd transform`'s.
        match (&self.spib, self.objective) {
            (Some(head), ObjectiveKind::Spib) => {
                let (mu, _logvar, logp) = head.predict(tape, enc.out)?;
                let mu = tape.value(mu).to_vec()?;
                let lp = tape.value(logp).to_vec()?;
                let (d, k) = (mu.len() / n, lp.len() / n);
                for (i, row) in out.chunks_exact_mut(d + 1).enumerate() {
                    row[..d].copy_from_slice(&mu[i * d..(i + 1) * d]);
                    row[d] = crate::workflow::run::argmax(&lp[i * k..(i + 1) * k]) as f32;
                }
            }
            _ => {
                let chi = crate::nn::softmax(tape, enc.out, 1.0, None, 1)?;
                let v = tape.value(chi);
                match v.host() {
                    Some(h) => out.copy_from_slice(h),
                    None => out.copy_from_slice(&v.to_vec()?),
                }
            }
        }
        Ok(())
    }
}

/// The atom stage alone: an atom model (`hiermd init-model` / `hiermd pretrain`, a
/// `*.safetensors` with its configuration inside) turning frames into residue tokens, the rows
/// `hiermd featurize` stores: scalars `s [frames, tokens, H]`, vectors `v [frames, tokens, 3, H]`
/// and C-alpha positions `[frames, tokens, 3]`.
///
/// ```no_run
/// use hiermd::api::{Device, Featurizer, System};
/// # fn main() -> anyhow::Result<()> {
/// let system = System::open_dataset("data/ala2")?;
/// let mut f = Featurizer::load("atom.safetensors", &Device::Cpu, &system)?;
/// let frames = 4;
/// let positions = vec![0f32; frames * system.atoms() * 3];
/// let (r, h) = (f.tokens(), f.hidden());
/// let (mut s, mut v) = (vec![0f32; frames * r * h], vec![0f32; frames * r * 3 * h]);
/// f.featurize(&positions, frames, None, &mut s, &mut v, None)?;
/// # Ok(())
/// # }
/// ```
pub struct Featurizer {
    model: AtomModel,
    inputs: AtomInputs,
    tape: Tape,
    system: System,
}

// SAFETY: as for `Model`: the tape's recorded closures are the only non-`Send` parts, and every
// call resets the tape before returning, so no closure outlives a call.
unsafe impl Send for Featurizer {}

impl Featurizer {
    /// Loads an atom model for the atoms of `system`.
    pub fn load(path: impl AsRef<Path>, device: &Device, system: &System) -> Result<Self> {
        let path = path.as_ref();
        system.validate()?;
        let (model, mut ps) = AtomModel::load(path, device)
            .with_context(|| format!("atom model {}", path.display()))?;
        for id in (0..ps.len()).map(crate::tape::ParamId) {
            ps.freeze(id);
        }
        let inputs = AtomInputs::from_parts(
            &system.atomic_numbers,
            &system.token_of_atom,
            system.tokens,
            &system.ca_atom,
            device,
        )?;
        let mut tape = Tape::new(ps, 0);
        tape.set_training(false);
        Ok(Self {
            model,
            inputs,
            tape,
            system: system.clone(),
        })
    }

    /// Channels H of the tokens.
    pub fn hidden(&self) -> usize {
        self.model.hidden()
    }

    /// Tokens R per frame.
    pub fn tokens(&self) -> usize {
        self.system.tokens
    }

    /// Atoms A per frame.
    pub fn atoms(&self) -> usize {
        self.system.atoms()
    }

    /// Residue tokens of `n_frames` frames (`positions [n_frames, atoms, 3]`, Angstrom; unit
    /// cells per frame or none): fills `s [n, R, H]`, `v [n, R, 3, H]` and, if given,
    /// `ca [n, R, 3]`. Wrong lengths are errors naming the buffer.
    pub fn featurize(
        &mut self,
        positions: &[f32],
        n_frames: usize,
        cells: Option<&[UnitCell]>,
        s: &mut [f32],
        v: &mut [f32],
        ca: Option<&mut [f32]>,
    ) -> Result<()> {
        let (a, r, h) = (self.atoms(), self.tokens(), self.hidden());
        ensure!(n_frames >= 1, "featurize: no frames");
        ensure!(
            positions.len() == n_frames * a * 3,
            "featurize: positions hold {} values, expected {n_frames} x {a} x 3",
            positions.len()
        );
        ensure!(
            s.len() == n_frames * r * h,
            "featurize: s holds {} values, expected {n_frames} x {r} x {h}",
            s.len()
        );
        ensure!(
            v.len() == n_frames * r * 3 * h,
            "featurize: v holds {} values, expected {n_frames} x {r} x 3 x {h}",
            v.len()
        );
        if let Some(ca) = &ca {
            ensure!(
                ca.len() == n_frames * r * 3,
                "featurize: ca holds {} values, expected {n_frames} x {r} x 3",
                ca.len()
            );
        }
        if let Some(c) = cells {
            ensure!(
                c.len() == n_frames,
                "featurize: {} unit cells for {n_frames} frames",
                c.len()
            );
        }
        self.tape.reset();
        let result = (|| {
            let t = self
                .model
                .tokens(&mut self.tape, &self.inputs, positions, n_frames, cells)?;
            s.copy_from_slice(&self.tape.value(t.s).to_vec()?);
            v.copy_from_slice(&self.tape.value(t.v).to_vec()?);
            if let Some(ca) = ca {
                ca.copy_from_slice(&t.ca);
            }
            Ok(())
        })();
        self.tape.reset();
        result
    }
}

/// The individual kernels behind small wrappers: each takes [`Tensor`]s (or host slices) on
/// one device and runs the op there (`cpu`: the Rust twin; `emu`, `cuda`: the CUDA kernel).
/// The full ops are re-exported for callers that manage their own output tensors.
///
/// ```
/// use hiermd::api::kernels::{eqsdpa, neighbor_list, token_merge, Reduce, TokenMap};
/// use hiermd::api::{Device, Tensor};
/// let dev = Device::Cpu;
/// // Three atoms on a line, 1 A apart; cutoff 1.5 A: pairs (0,1) and (1,2), both directions.
/// let nl = neighbor_list(&dev, &[0., 0., 0., 1., 0., 0., 2., 0., 0.], 1, 3, 1.5, None).unwrap();
/// assert_eq!(nl.edges(), 4);
/// // Mean of atoms 0 and 1 into token 0, atom 2 alone in token 1.
/// let map = TokenMap::new(&[0, 0, 1], 2).unwrap().to_device(&dev).unwrap();
/// let x = Tensor::from_slice(&dev, &[3, 1], &[1f32, 3., 5.]).unwrap();
/// assert_eq!(token_merge(&map, &x, Reduce::Mean).unwrap().to_vec().unwrap(), [2., 5.]);
/// // One frame, one head, two tokens of width 16: attention output and log-sum-exp.
/// let q = Tensor::<f32>::zeros(&dev, &[1, 2, 16]).unwrap();
/// let v = Tensor::from_slice(&dev, &[1, 2, 64], &[1f32; 128]).unwrap();
/// let (out, lse) = eqsdpa(&q, &q, &v, None, 1).unwrap();
/// assert_eq!(out.shape(), [1, 2, 64]);
/// assert!((lse.to_vec().unwrap()[0] - 2f32.ln()).abs() < 1e-6);
/// ```
pub mod kernels {
    use super::{Device, Tensor, UnitCell};
    use anyhow::{ensure, Result};

    pub use crate::ops::eqsdpa::{eqsdpa_backward, eqsdpa_forward, EqsdpaBackwardMode};
    pub use crate::ops::neighbor_list::{HostNeighborList, NeighborList};
    pub use crate::ops::scatter::{
        token_merge_backward, token_merge_forward, token_merge_output_shape, DeviceTokenMap,
        Reduce, TokenMap, EXCLUDED,
    };

    /// The radius graph of `frames` frames of `atoms` atoms (`positions` `[frames, atoms, 3]`,
    /// host, Angstrom), built on `device` and returned as host arrays (CSR by destination atom,
    /// with mirror edges and, with `cells`, periodic image shifts; see [`NeighborList::build`]).
    ///
    /// ```
    /// use hiermd::api::{kernels::neighbor_list, Device, UnitCell};
    /// // Two atoms 9 A apart in a 10 A box: 1 A apart through the boundary.
    /// let cell = UnitCell::from_lengths_angles(10., 10., 10., 90., 90., 90.);
    /// let nl = neighbor_list(&Device::Cpu, &[0.5, 5., 5., 9.5, 5., 5.], 1, 2, 2.0, Some(&[cell]))
    ///     .unwrap();
    /// assert_eq!(nl.pairs(), [(0, 0, 1), (0, 1, 0)]);
    /// ```
    pub fn neighbor_list(
        device: &Device,
        positions: &[f32],
        frames: usize,
        atoms: usize,
        cutoff: f32,
        cells: Option<&[UnitCell]>,
    ) -> Result<HostNeighborList> {
        let t = Tensor::from_slice(device, &[frames, atoms, 3], positions)?;
        NeighborList::build(&t, cutoff, cells, None)?.to_host()
    }

    /// Atom-to-token merge: `out[.., r, ..]` = sum or mean of `x` over token r's atoms; `x` is
    /// `[A, H]`, `[F, A, H]` or `[F, A, C, H]` (see [`token_merge_forward`]).
    ///
    /// ```
    /// use hiermd::api::kernels::{token_merge, Reduce, TokenMap};
    /// use hiermd::api::{Device, Tensor};
    /// let dev = Device::Cpu;
    /// let map = TokenMap::new(&[1, 0, 1], 2).unwrap().to_device(&dev).unwrap();
    /// let x = Tensor::from_slice(&dev, &[3, 1], &[1f32, 2., 3.]).unwrap();
    /// assert_eq!(token_merge(&map, &x, Reduce::Sum).unwrap().to_vec().unwrap(), [2., 4.]);
    /// ```
    pub fn token_merge(
        map: &DeviceTokenMap,
        x: &Tensor<f32>,
        reduce: Reduce,
    ) -> Result<Tensor<f32>> {
        let shape = token_merge_output_shape(map, x.shape())?;
        let mut out = Tensor::zeros(x.device(), &shape)?;
        token_merge_forward(map, x, &mut out, reduce)?;
        Ok(out)
    }

    /// Gradient of [`token_merge`]: `dx` (shaped as the atoms' features `x_shape`) from `dout`.
    ///
    /// ```
    /// use hiermd::api::kernels::{token_merge_grad, Reduce, TokenMap};
    /// use hiermd::api::{Device, Tensor};
    /// let dev = Device::Cpu;
    /// let map = TokenMap::new(&[0, 0, 1], 2).unwrap().to_device(&dev).unwrap();
    /// let dout = Tensor::from_slice(&dev, &[2, 1], &[1f32, 1.]).unwrap();
    /// let dx = token_merge_grad(&map, &dout, &[3, 1], Reduce::Mean).unwrap();
    /// assert_eq!(dx.to_vec().unwrap(), [0.5, 0.5, 1.]);
    /// ```
    pub fn token_merge_grad(
        map: &DeviceTokenMap,
        dout: &Tensor<f32>,
        x_shape: &[usize],
        reduce: Reduce,
    ) -> Result<Tensor<f32>> {
        let mut dx = Tensor::zeros(dout.device(), x_shape)?;
        token_merge_backward(map, dout, &mut dx, reduce)?;
        Ok(dx)
    }

    /// Fused equivariant attention with the usual scale `1/sqrt(dh)`: `(out, lse)` for `q`, `k`
    /// `[BH, T, dh]` (dh 8, 16, 32 or 64), `values` `[BH, T, 4 dh]`, `mask` `[BH / heads, T]` (0 =
    /// padding key). See [`eqsdpa_forward`].
    ///
    /// ```
    /// use hiermd::api::{kernels::eqsdpa, Device, Tensor};
    /// let dev = Device::Cpu;
    /// let q = Tensor::<f32>::zeros(&dev, &[2, 3, 16]).unwrap();
    /// let v = Tensor::<f32>::zeros(&dev, &[2, 3, 64]).unwrap();
    /// let (out, lse) = eqsdpa(&q, &q, &v, None, 2).unwrap();
    /// assert_eq!((out.shape(), lse.shape()), (&[2, 3, 64][..], &[2, 3][..]));
    /// ```
    pub fn eqsdpa(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        values: &Tensor<f32>,
        mask: Option<&Tensor<u8>>,
        heads: usize,
    ) -> Result<(Tensor<f32>, Tensor<f32>)> {
        let dh = *q.shape().last().unwrap_or(&0);
        ensure!(q.shape().len() >= 2, "eqsdpa: q has shape {:?}", q.shape());
        let rows = q.shape()[..q.shape().len() - 1].to_vec();
        let dev = q.device();
        let mut out = Tensor::zeros(dev, values.shape())?;
        let mut lse = Tensor::zeros(dev, &rows)?;
        eqsdpa_forward(
            q,
            k,
            values,
            mask,
            heads,
            1.0 / (dh as f32).sqrt(),
            &mut out,
            &mut lse,
        )?;
        Ok((out, lse))
    }

    /// Gradients `(dq, dk, dvalues)` of [`eqsdpa`] from its inputs, its `(out, lse)` and `dout`
    /// (shaped as `out`), deterministic (no float atomics). See [`eqsdpa_backward`].
    ///
    /// ```
    /// use hiermd::api::kernels::{eqsdpa, eqsdpa_grad};
    /// use hiermd::api::{Device, Tensor};
    /// let dev = Device::Cpu;
    /// let q = Tensor::<f32>::zeros(&dev, &[1, 2, 16]).unwrap();
    /// let v = Tensor::<f32>::zeros(&dev, &[1, 2, 64]).unwrap();
    /// let (out, lse) = eqsdpa(&q, &q, &v, None, 1).unwrap();
    /// let dout = Tensor::from_slice(&dev, &[1, 2, 64], &[1f32; 128]).unwrap();
    /// let (dq, dk, dv) = eqsdpa_grad(&q, &q, &v, &out, &lse, &dout, None, 1).unwrap();
    /// // Uniform attention over two keys: each value row gets half of each query's gradient.
    /// assert!(dv.to_vec().unwrap().iter().all(|&g| (g - 1.0).abs() < 1e-6));
    /// assert_eq!((dq.shape(), dk.shape()), (&[1, 2, 16][..], &[1, 2, 16][..]));
    /// ```
    #[allow(clippy::too_many_arguments)] // the op's operands
    pub fn eqsdpa_grad(
        q: &Tensor<f32>,
        k: &Tensor<f32>,
        values: &Tensor<f32>,
        out: &Tensor<f32>,
        lse: &Tensor<f32>,
        dout: &Tensor<f32>,
        mask: Option<&Tensor<u8>>,
        heads: usize,
    ) -> Result<(Tensor<f32>, Tensor<f32>, Tensor<f32>)> {
        let dh = *q.shape().last().unwrap_or(&0);
        let dev = q.device();
        let mut dq = Tensor::zeros(dev, q.shape())?;
        let mut dk = Tensor::zeros(dev, k.shape())?;
        let mut dv = Tensor::zeros(dev, values.shape())?;
        eqsdpa_backward(
            q,
            k,
            values,
            out,
            lse,
            dout,
            mask,
            heads,
            1.0 / (dh as f32).sqrt(),
            &mut dq,
            &mut dk,
            &mut dv,
            EqsdpaBackwardMode::Deterministic,
        )?;
        Ok((dq, dk, dv))
    }
}
