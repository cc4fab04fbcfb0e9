//! One TOML file describes a training run: data, model, objective, lag, optimiser, seed. Every
//! field can also be set from the command line (`--set section.field=value`, and named flags for
//! the common ones), and every error names the field and what it accepts.

use crate::objectives::spib::SpibConfig;
use crate::objectives::vamp::VampOptions;
use crate::optim::{OptimConfig, OptimKind};
use crate::store::{Lag, Split};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How pairs are split between training and validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitKind {
    /// The first `train_fraction` of each trajectory trains, the rest validates.
    Time,
    /// Whole trajectories (`validation_trajectories`) validate.
    Trajectory,
}

/// `[data]`: where frames come from and how they are paired.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// The imported dataset (`hiermd import`): frame counts, time steps, coordinates.
    pub dataset: PathBuf,
    /// A feature store (`hiermd featurize`) of that dataset: train the token stage on these
    /// frozen features. Without it the run trains end to end from coordinates.
    pub features: Option<PathBuf>,
    /// End to end only: the atoms the atom stage sees, as an MDAnalysis-style selection over the
    /// dataset's atoms (e.g. "protein and not name H*", "resid 10-200"); tokens left without
    /// atoms are dropped. Default: every stored atom.
    pub selection: Option<String>,
    /// End to end only: the atom-stage model to start from (`hiermd init-model` or
    /// `hiermd pretrain`); without it, one is initialised from `[atom]`.
    pub atom_model: Option<PathBuf>,
    /// Lag time in saved frames (give this or `lag_ps`).
    pub lag: Option<usize>,
    /// Lag time in picoseconds.
    pub lag_ps: Option<f64>,
    /// "time" (default) or "trajectory".
    pub split: SplitKind,
    /// Fraction of each trajectory that trains, with `split = "time"`.
    pub train_fraction: f64,
    /// Trajectories that validate, with `split = "trajectory"`.
    pub validation_trajectories: Vec<usize>,
    /// Use every `stride`-th pair (1: all).
    pub stride: usize,
    /// Frame weights for biased simulations: a .npy of one weight per frame, the trajectories
    /// one after another; a pair gets the weight of its first frame.
    pub weights: Option<PathBuf>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: PathBuf::new(),
            features: None,
            selection: None,
            atom_model: None,
            lag: None,
            lag_ps: None,
            split: SplitKind::Time,
            train_fraction: 0.8,
            validation_trajectories: Vec::new(),
            stride: 1,
            weights: None,
        }
    }
}

impl DataConfig {
    /// The lag as the pair builder takes it.
    pub fn lag(&self) -> Result<Lag> {
        match (self.lag, self.lag_ps) {
            (Some(n), None) => {
                ensure!(n >= 1, "data.lag = {n}: the lag must be at least 1 frame");
                Ok(Lag::Frames(n))
            }
            (None, Some(ps)) => {
                ensure!(
                    ps.is_finite() && ps > 0.0,
                    "data.lag_ps = {ps}: the lag must be a positive time in ps"
                );
                Ok(Lag::Time(ps))
            }
            (None, None) => bail!("data.lag (frames) or data.lag_ps (picoseconds) is required"),
            (Some(_), Some(_)) => bail!("give data.lag or data.lag_ps, not both"),
        }
    }

    /// The split as the pair builder takes it.
    pub fn split(&self) -> Split {
        match self.split {
            SplitKind::Time => Split::ByTime {
                train_fraction: self.train_fraction,
            },
            SplitKind::Trajectory => Split::ByTrajectory {
                validation: self.validation_trajectories.clone(),
            },
        }
    }
}

/// Which objective trains the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveKind {
    /// VAMPnets: softmax outputs, loss = -VAMP score.
    Vamp,
    /// State predictive information bottleneck.
    Spib,
}

/// `[objective]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveConfig {
    /// "vamp" or "spib".
    pub kind: ObjectiveKind,
    /// Width of the network's output: VAMP states (softmax), or SPIB encoder features.
    pub outputs: usize,
    /// `[objective.vamp]`: score, epsilon, mode.
    pub vamp: VampOptions,
    /// `[objective.spib]`.
    pub spib: SpibConfig,
    /// SPIB: the VAMP run whose outputs k-means clusters into the initial labels.
    pub init_labels_from: Option<PathBuf>,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            kind: ObjectiveKind::Vamp,
            outputs: 4,
            vamp: VampOptions::default(),
            spib: SpibConfig::default(),
            init_labels_from: None,
        }
    }
}

/// `[optimizer]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSection {
    /// "adam", "adamw" or "adam_atan2".
    pub kind: OptimKind,
    /// Learning rate.
    pub lr: f64,
    /// Weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this.
    pub clip_norm: Option<f64>,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        Self {
            kind: OptimKind::AdamW,
            lr: 5e-4,
            weight_decay: 1e-2,
            clip_norm: Some(10.0),
        }
    }
}

impl OptimizerSection {
    /// The optimiser configuration.
    pub fn config(&self) -> Result<OptimConfig> {
        let mut c = match self.kind {
            OptimKind::Adam => OptimConfig::adam(self.lr),
            OptimKind::AdamW => OptimConfig::adamw(self.lr, self.weight_decay),
            OptimKind::AdamAtan2 => OptimConfig::adam_atan2(self.lr),
        };
        c.weight_decay = self.weight_decay;
        c.clip_norm = self.clip_norm;
        c.validate().context("[optimizer]")?;
        Ok(c)
    }
}

/// `[train]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Maximum epochs.
    pub epochs: u64,
    /// Pairs per batch.
    pub batch: usize,
    /// Frames per evaluation batch (validation, transform).
    pub eval_batch: usize,
    /// Early stopping: epochs without a better validation score before stopping (0: never).
    pub patience: u64,
    /// Seed of the initialisation, shuffling, dropout and sampling.
    pub seed: u64,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// At most this many batches per epoch (None: all).
    pub max_batches: Option<usize>,
    /// Where to run: `auto`, `cpu`, `emu` or `cuda[:N]` (a `--device` flag other than auto
    /// takes precedence).
    pub device: Option<String>,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: 30,
            batch: 512,
            eval_batch: 2048,
            patience: 5,
            seed: 0,
            keep_checkpoints: 2,
            max_batches: None,
            device: None,
        }
    }
}

/// Most outputs of the network (`objective.outputs`, SPIB's `states`): the objectives keep
/// outputs x outputs f64 matrices (4096 outputs: 128 MiB each); VAMP and SPIB use tens.
pub const MAX_OUTPUTS: usize = 4096;

/// Most frames in a batch (`train.batch`, `train.eval_batch`): 2^20, where even one token of 64
/// channels per frame takes 1 GiB with its vectors.
pub const MAX_BATCH: usize = 1 << 20;

/// Widest layer a configuration may ask for (hidden channels, FFN and MLP widths, windows, basis
/// functions, heads): 16384, where one square weight matrix is 1 GiB.
pub const MAX_WIDTH: usize = 16384;

/// Most transformer blocks or backbone layers.
pub const MAX_LAYERS: usize = 1024;

/// Most memory a model's parameters may take with their gradients and two optimiser moments
/// (16 bytes per parameter): 64 GiB, beyond any one device.
pub const MAX_MODEL_BYTES: u64 = 64 << 30;

/// Bytes of an n x n f64 matrix.
fn square_bytes(n: usize) -> u64 {
    (n as u64).saturating_mul(n as u64).saturating_mul(8)
}

/// A byte count for messages: `80.0 GB`.
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} bytes")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Fails, naming `what`, when `params` parameters with their gradients and optimiser state
/// exceed [`MAX_MODEL_BYTES`].
fn check_params(what: &str, params: u64) -> Result<()> {
    let bytes = params.saturating_mul(16);
    ensure!(
        bytes <= MAX_MODEL_BYTES,
        "{what}: about {params} parameters, {} with their gradients and optimiser state; more \
         than the {} a model may take",
        human_bytes(bytes),
        human_bytes(MAX_MODEL_BYTES)
    );
    Ok(())
}

/// A whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// `[data]`.
    pub data: DataConfig,
    /// `[atom]`: the atom stage for end-to-end runs without `data.atom_model`
    /// (an [`crate::model::atom::AtomModelConfig`] table).
    pub atom: Option<toml::Table>,
    /// `[model]`: the token model ([`crate::model::TokenModelConfig`] without `input_channels`
    /// and `output`, which come from the data and the objective).
    pub model: toml::Table,
    /// `[objective]`.
    pub objective: ObjectiveConfig,
    /// `[optimizer]`.
    pub optimizer: OptimizerSection,
    /// `[train]`.
    pub train: TrainSection,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            data: DataConfig::default(),
            atom: None,
            model: toml::Table::new(),
            objective: ObjectiveConfig::default(),
            optimizer: OptimizerSection::default(),
            train: TrainSection::default(),
        }
    }
}

/// Sets `path` (dotted, e.g. `train.epochs`) in a TOML table to `value`, read as TOML (a number,
/// a boolean, an array, a quoted string) or else taken as a plain string.
pub fn set_toml_path(table: &mut toml::Table, path: &str, value: &str) -> Result<()> {
    let parsed: toml::Value = match toml::from_str::<toml::Table>(&format!("x = {value}")) {
        Ok(mut t) => t.remove("x").expect("the key just written"),
        Err(_) => toml::Value::String(value.to_string()),
    };
    let keys: Vec<&str> = path.split('.').collect();
    ensure!(
        keys.iter().all(|k| !k.is_empty()),
        "--set {path}={value}: the key must be dotted names like train.epochs"
    );
    let mut t = table;
    for k in &keys[..keys.len() - 1] {
        let entry = t
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = match entry {
            toml::Value::Table(inner) => inner,
            _ => bail!("--set {path}={value}: {k} is not a table"),
        };
    }
    t.insert(keys[keys.len() - 1].to_string(), parsed);
    Ok(())
}

/// Fields that exclude each other. Flags override the file (issue 16): an override of one
/// (a named flag or `--set`) removes the others from the file's table, so `--lag-ps 20` over a
/// file saying `lag = 20` means a lag of 20 ps. Two overrides that exclude each other stay an
/// error, found by [`RunConfig::validate`].
const EXCLUSIVE_FIELDS: &[&[&str]] = &[
    &["data.lag", "data.lag_ps"],
    &["data.features", "data.atom_model"],
];

/// Removes from `table` (the file) every field that an override's field excludes (see
/// [`EXCLUSIVE_FIELDS`]), unless it is overridden itself.
fn drop_excluded_by_overrides(table: &mut toml::Table, overrides: &[(String, String)]) {
    let overridden = |k: &str| overrides.iter().any(|(o, _)| o.trim() == k);
    for group in EXCLUSIVE_FIELDS {
        if !group.iter().any(|k| overridden(k)) {
            continue;
        }
        for k in group.iter().filter(|k| !overridden(k)) {
            let (section, field) = k.split_once('.').expect("dotted field names");
            if let Some(toml::Value::Table(t)) = table.get_mut(section) {
                t.remove(field);
            }
        }
    }
}

impl RunConfig {
    /// Parses TOML text with overrides applied first; unknown fields are errors naming them.
    pub fn from_toml_with(text: &str, overrides: &[(String, String)]) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text).context("run configuration")?;
        drop_excluded_by_overrides(&mut table, overrides);
        for (k, v) in overrides {
            set_toml_path(&mut table, k, v)?;
        }
        let c: Self = toml::Value::Table(table)
            .try_into()
            .context("run configuration")?;
        c.validate()?;
        Ok(c)
    }

    /// Reads a TOML file (or the defaults when `path` is None) with overrides.
    pub fn load(path: Option<&Path>, overrides: &[(String, String)]) -> Result<Self> {
        let text = match path {
            Some(p) => {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
            }
            None => String::new(),
        };
        let what = path.map_or("the defaults".to_string(), |p| p.display().to_string());
        Self::from_toml_with(&text, overrides).with_context(|| format!("in {what}"))
    }

    /// The configuration as TOML (written to the run folder).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).context("serialising the run configuration")
    }

    /// Checks what can be checked without the data; errors name the field.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.data.dataset.as_os_str().is_empty(),
            "data.dataset is required (the folder written by `hiermd import`)"
        );
        self.data.lag()?;
        ensure!(
            self.data.train_fraction > 0.0 && self.data.train_fraction < 1.0,
            "data.train_fraction = {} must be between 0 and 1",
            self.data.train_fraction
        );
        ensure!(self.data.stride >= 1, "data.stride must be at least 1");
        if self.data.split == SplitKind::Trajectory {
            ensure!(
                !self.data.validation_trajectories.is_empty(),
                "data.validation_trajectories must list at least one trajectory with split = \"trajectory\""
            );
        }
        ensure!(
            self.data.features.is_none() || self.data.atom_model.is_none(),
            "data.features and data.atom_model exclude each other: features are frozen, an atom \
             model is trained end to end"
        );
        ensure!(
            self.data.features.is_none() || self.data.selection.is_none(),
            "data.selection is for end-to-end runs; frozen features were selected when the \
             dataset was imported (hiermd import --select)"
        );
        ensure!(
            self.data.features.is_none() || self.atom.is_none(),
            "[atom] is for end-to-end runs; this run reads frozen data.features"
        );
        ensure!(
            self.objective.outputs >= 1,
            "objective.outputs must be at least 1"
        );
        if self.objective.kind == ObjectiveKind::Vamp {
            ensure!(
                self.objective.outputs >= 2,
                "objective.outputs = {}: a VAMPnet needs at least 2 states",
                self.objective.outputs
            );
        }
        self.objective.spib.validate().context("objective.spib")?;
        for key in ["input_channels", "output"] {
            ensure!(
                !self.model.contains_key(key),
                "model.{key} is not set by hand: it comes from the {}",
                if key == "output" {
                    "objective (objective.outputs)"
                } else {
                    "features or the atom model"
                }
            );
        }
        self.optimizer.config()?;
        ensure!(self.train.epochs >= 1, "train.epochs must be at least 1");
        ensure!(self.train.batch >= 2, "train.batch must be at least 2");
        ensure!(
            self.train.eval_batch >= 1,
            "train.eval_batch must be at least 1"
        );
        self.check_sizes()?;
        Ok(())
    }

    /// Refuses sizes whose memory cannot exist, before anything is allocated: each error names
    /// the field, its value, what it implies and the limit (see [`MAX_OUTPUTS`], [`MAX_BATCH`],
    /// [`MAX_MODEL_BYTES`]). The limits are far above any model that trains on one machine.
    pub fn check_sizes(&self) -> Result<()> {
        let o = self.objective.outputs;
        ensure!(
            o <= MAX_OUTPUTS,
            "objective.outputs = {o}: the objective's outputs x outputs matrices would take {} \
             each (f64); at most {MAX_OUTPUTS} outputs",
            human_bytes(square_bytes(o))
        );
        let spib = &self.objective.spib;
        if self.objective.kind == ObjectiveKind::Spib {
            ensure!(
                spib.states <= MAX_OUTPUTS,
                "objective.spib.states = {}: at most {MAX_OUTPUTS} states (the decoder's output \
                 and the label statistics grow with them)",
                spib.states
            );
            for (field, v) in [
                ("objective.spib.z_dim", spib.z_dim),
                ("objective.spib.decoder_hidden", spib.decoder_hidden),
            ] {
                ensure!(
                    v <= MAX_WIDTH,
                    "{field} = {v}: at most {MAX_WIDTH} (its weight matrices grow with its square)"
                );
            }
        }
        for (field, b) in [
            ("train.batch", self.train.batch),
            ("train.eval_batch", self.train.eval_batch),
        ] {
            ensure!(
                b <= MAX_BATCH,
                "{field} = {b}: a batch holds every frame's tokens at once (at least {} for one \
                 token of 64 channels); at most {MAX_BATCH} frames",
                human_bytes((b as u64).saturating_mul(64 * 16))
            );
        }
        self.check_token_model_size()?;
        self.check_atom_model_size()
    }

    /// The token model (`[model]`): its parameters with their gradients and optimiser state
    /// within [`MAX_MODEL_BYTES`], every width within [`MAX_WIDTH`]. Fields it cannot read are
    /// left to the model's own validation.
    fn check_token_model_size(&self) -> Result<()> {
        let d = crate::model::TokenModelConfig::default();
        let get = |key: &str, default: usize| -> usize {
            match self.model.get(key).and_then(toml::Value::as_integer) {
                Some(v) if v >= 0 => v as usize,
                _ => default,
            }
        };
        let h = get("hidden", d.hidden);
        let blocks = get("blocks", d.blocks);
        let window = get("window", d.window);
        let ffn = get("ffn_hidden", h);
        let mlp = get("mlp_hidden", h);
        let rbf = get("graph_rbf", d.graph_rbf);
        let heads = get("heads", d.heads);
        for (field, v) in [
            ("model.hidden", h),
            ("model.ffn_hidden", ffn),
            ("model.mlp_hidden", mlp),
            ("model.graph_rbf", rbf),
            ("model.heads", heads),
            ("model.window", window),
        ] {
            ensure!(
                v <= MAX_WIDTH,
                "{field} = {v}: at most {MAX_WIDTH} (the weights grow with it, most with its \
                 square)"
            );
        }
        ensure!(
            blocks <= MAX_LAYERS,
            "model.blocks = {blocks}: at most {MAX_LAYERS} transformer blocks"
        );
        // Weights per block: attention (queries, keys, values, output on scalars and vectors,
        // about 6 H^2) and the EqFFN (about 4 H F); the window merger (2 w H^2), the output MLP
        // and the input projections. An estimate from above, not an exact count.
        let (h, w, f, m) = (h as u64, window as u64, ffn as u64, mlp as u64);
        let sq = h.saturating_mul(h);
        let params = (blocks as u64)
            .saturating_mul(sq.saturating_mul(6).saturating_add(h.saturating_mul(f) * 4))
            .saturating_add(w.saturating_mul(sq).saturating_mul(2))
            .saturating_add(h.saturating_mul(m))
            .saturating_add(m.saturating_mul(self.objective.outputs as u64))
            .saturating_add(sq.saturating_mul(4))
            .saturating_add((rbf as u64).saturating_mul(h).saturating_mul(4));
        check_params(
            &format!(
                "[model] (hidden = {h}, blocks = {blocks}, window = {w}, ffn_hidden = {f}, \
                 mlp_hidden = {m})"
            ),
            params,
        )
    }

    /// The atom stage (`[atom]`, end-to-end runs): its layers within [`MAX_LAYERS`] and its
    /// parameters within [`MAX_MODEL_BYTES`] (its widths are bounded by the backbone itself).
    fn check_atom_model_size(&self) -> Result<()> {
        let Some(atom) = &self.atom else {
            return Ok(());
        };
        let d = crate::nn::painn::BackboneConfig::default();
        let backbone = atom.get("backbone").and_then(toml::Value::as_table);
        let get = |key: &str, default: usize| -> usize {
            match backbone
                .and_then(|b| b.get(key))
                .and_then(toml::Value::as_integer)
            {
                Some(v) if v >= 0 => v as usize,
                _ => default,
            }
        };
        let (h, layers, rbf) = (
            get("hidden", d.hidden),
            get("layers", d.layers),
            get("rbf", d.rbf),
        );
        ensure!(
            layers <= MAX_LAYERS,
            "atom.backbone.layers = {layers}: at most {MAX_LAYERS} layers"
        );
        let (h, rbf) = (h as u64, rbf as u64);
        // Per layer: message and update weights (about 6 H^2) and the radial filters (3 K H).
        let per_layer = h
            .saturating_mul(h)
            .saturating_mul(6)
            .saturating_add(rbf.saturating_mul(h).saturating_mul(3));
        check_params(
            &format!("[atom] (backbone hidden = {h}, layers = {layers}, rbf = {rbf})"),
            (layers as u64).saturating_mul(per_layer),
        )
    }

    /// The token model's configuration for `input_channels` coming in.
    pub fn token_model(&self, input_channels: usize) -> Result<crate::model::TokenModelConfig> {
        let mut t = self.model.clone();
        t.insert(
            "input_channels".into(),
            toml::Value::Integer(input_channels as i64),
        );
        t.insert(
            "output".into(),
            toml::Value::Integer(self.objective.outputs as i64),
        );
        if !t.contains_key("seed") {
            t.insert("seed".into(), toml::Value::Integer(self.train.seed as i64));
        }
        let text = toml::to_string(&t)?;
        crate::model::TokenModelConfig::from_toml(&text).context("[model]")
    }
}
