//! The tape: reverse-mode differentiation without a framework.
//!
//! Forward ops ([`crate::nn`]) run their kernel at once and record a backward closure that names
//! the values it needs by [`Var`] (activations on the tape) and [`ParamId`] (weights in the
//! [`ParamStore`]). [`Tape::backward`] replays the records in reverse. As in llm.c, parameter
//! gradients accumulate (`+=`, so several micro-batches may add into them before a step) and
//! activation gradients are assigned by the first contribution and accumulated by later ones
//! (a value read by two ops, like a residual stream, gets the sum).
//!
//! Memory: every tensor the tape hands out comes from a pool keyed by length. After the first
//! step the pool holds exactly what a step needs, so later steps allocate nothing (what matters
//! on a GPU, where an allocation synchronises); [`Tape::pool_bytes`] is the step's peak activation
//! memory. Ops save what their backward needs and recompute the rest where that is cheaper than
//! keeping it (dropout masks are regenerated from their seed; layer norms keep three statistics
//! per row, not their normalised output). Gradients are released as soon as their producer's
//! backward has run.
//!
//! Segments recorded with [`Tape::checkpoint`] keep only their inputs and outputs: the backward
//! pass runs the segment's forward again on a nested tape (same parameters, same pool, same
//! dropout seeds) and back-propagates through that, so a transformer block's activations live
//! one block at a time instead of all blocks at once.
//!
//! A value gets a gradient only if it depends on a trainable parameter or on an input marked
//! with [`Tape::input_with_grad`]; frozen parameters ([`ParamStore::freeze`]) get none.

use crate::device::Device;
use crate::ops::elementwise;
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// A value recorded on a tape (index into it; valid until [`Tape::reset`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Var(pub(crate) usize);

/// A parameter in a [`ParamStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ParamId(pub(crate) usize);

/// How a parameter is first filled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Every element this value (0 for biases and shifts, 1 for norm scales).
    Constant(f32),
    /// Uniform in [-bound, bound] (PyTorch's Linear default is bound = 1/sqrt(fan_in)).
    Uniform(f32),
    /// Normal with this standard deviation.
    Normal(f32),
}

/// Named f32 parameters with their gradients, on one device, in a fixed order (the order of
/// creation: the optimiser and checkpoints rely on it).
pub struct ParamStore {
    device: Device,
    names: Vec<String>,
    values: Vec<Tensor<f32>>,
    grads: Vec<Tensor<f32>>,
    frozen: Vec<bool>,
    rng: crate::testing::Rng,
    /// Prepended to every name given to [`ParamStore::add`], so that two models can share one
    /// store (e.g. `atom.` and `token.` in end-to-end training) without renaming their layers.
    prefix: String,
}

impl ParamStore {
    /// An empty store whose initialisations draw from `seed`: the same seed and the same sequence
    /// of [`ParamStore::add`] calls give bit-identical parameters on every device.
    pub fn new(device: &Device, seed: u64) -> Self {
        Self {
            device: device.clone(),
            names: Vec::new(),
            values: Vec::new(),
            grads: Vec::new(),
            frozen: Vec::new(),
            rng: crate::testing::Rng::new(seed),
            prefix: String::new(),
        }
    }

    /// Sets the prefix that later [`ParamStore::add`] calls put before their names ("" for none).
    pub fn set_prefix(&mut self, prefix: &str) {
        self.prefix = prefix.to_string();
    }

    /// The device the parameters live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Adds a parameter (unique name) with a zeroed gradient.
    pub fn add(&mut self, name: &str, shape: &[usize], init: Init) -> Result<ParamId> {
        let name = &format!("{}{name}", self.prefix);
        ensure!(
            !self.names.iter().any(|n| n == name),
            "parameter {name:?} declared twice"
        );
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match init {
            Init::Constant(c) => vec![c; n],
            Init::Uniform(b) => (0..n)
                .map(|_| self.rng.range(-b as f64, b as f64) as f32)
                .collect(),
            Init::Normal(sd) => (0..n)
                .map(|_| (self.rng.normal() * sd as f64) as f32)
                .collect(),
        };
        self.values.push(
            Tensor::from_slice(&self.device, shape, &data)
                .with_context(|| format!("parameter {name:?}"))?,
        );
        self.grads.push(Tensor::zeros(&self.device, shape)?);
        self.names.push(name.to_string());
        self.frozen.push(false);
        Ok(ParamId(self.values.len() - 1))
    }

    /// Number of parameter tensors.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Number of scalar parameters.
    pub fn numel(&self) -> usize {
        self.values.iter().map(Tensor::len).sum()
    }

    /// Bytes of values and gradients.
    pub fn bytes(&self) -> usize {
        self.values.iter().map(Tensor::bytes).sum::<usize>() * 2
    }

    /// Names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The id of a named parameter.
    pub fn id(&self, name: &str) -> Option<ParamId> {
        self.names.iter().position(|n| n == name).map(ParamId)
    }

    /// A parameter's value.
    pub fn value(&self, id: ParamId) -> &Tensor<f32> {
        &self.values[id.0]
    }

    /// A parameter's value, to overwrite.
    pub fn value_mut(&mut self, id: ParamId) -> &mut Tensor<f32> {
        &mut self.values[id.0]
    }

    /// A parameter's accumulated gradient.
    pub fn grad(&self, id: ParamId) -> &Tensor<f32> {
        &self.grads[id.0]
    }

    /// Excludes a parameter from training: no gradient is computed for it, and
    /// [`ParamStore::trainable`] leaves it out.
    pub fn freeze(&mut self, id: ParamId) {
        self.frozen[id.0] = true;
    }

    /// Whether a parameter gets gradients.
    pub fn is_trainable(&self, id: ParamId) -> bool {
        !self.frozen[id.0]
    }

    /// Sets every gradient to zero (before accumulating a new step's).
    pub fn zero_grads(&mut self) -> Result<()> {
        for g in &mut self.grads {
            g.fill_bytes(0)?;
        }
        Ok(())
    }

    /// The trainable parameters as the optimiser takes them: names, values (mutable) and
    /// gradients, in store order.
    pub fn trainable(&mut self) -> (Vec<&str>, Vec<&mut Tensor<f32>>, Vec<&Tensor<f32>>) {
        let mut names = Vec::new();
        let mut values = Vec::new();
        let mut grads = Vec::new();
        for (((n, v), g), &f) in self
            .names
            .iter()
            .zip(self.values.iter_mut())
            .zip(&self.grads)
            .zip(&self.frozen)
        {
            if !f {
                names.push(n.as_str());
                values.push(v);
                grads.push(g);
            }
        }
        (names, values, grads)
    }

    /// Writes every value to a safetensors file (f32, by name), atomically: a temporary file is
    /// written, fsynced and renamed over `path`.
    pub fn save(&self, path: impl AsRef<Path>, metadata: &HashMap<String, String>) -> Result<()> {
        let path = path.as_ref();
        let host: Vec<Vec<f32>> = self
            .values
            .iter()
            .map(Tensor::to_vec)
            .collect::<Result<_>>()?;
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = self
            .names
            .iter()
            .zip(&self.values)
            .zip(&host)
            .map(|((n, t), h)| {
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    t.shape().to_vec(),
                    bytemuck::cast_slice(h),
                )
                .map(|v| (n.clone(), v))
                .map_err(anyhow::Error::from)
            })
            .collect::<Result<_>>()?;
        let bytes = safetensors::serialize(views, Some(metadata.clone()))
            .with_context(|| format!("serialising parameters for {}", path.display()))?;
        crate::optim::write_atomic(path, &bytes)
    }

    /// Reads values written by [`ParamStore::save`]: every parameter of the store must be in
    /// the file with its shape. Returns the file's metadata.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<HashMap<String, String>> {
        self.load_mapped(path, "", "").map(|(meta, _)| meta)
    }

    /// Reads the parameters whose names start with `store_prefix` from a file where they are
    /// named with `file_prefix` instead (e.g. a stand-alone atom model, saved without prefix,
    /// into the `atom.` part of an end-to-end store). Each of them must be in the file with its
    /// shape; parameters without the prefix are left alone, and nothing changes unless every
    /// one checks out. Returns the file's metadata and the number of tensors read.
    pub fn load_mapped(
        &mut self,
        path: impl AsRef<Path>,
        store_prefix: &str,
        file_prefix: &str,
    ) -> Result<(HashMap<String, String>, usize)> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{}: not a safetensors file", path.display()))?;
        let mut staged = Vec::new();
        for (i, (name, value)) in self.names.iter().zip(&self.values).enumerate() {
            let Some(rest) = name.strip_prefix(store_prefix) else {
                continue;
            };
            let file_name = format!("{file_prefix}{rest}");
            let t = st.tensor(&file_name).with_context(|| {
                format!("{}: parameter {file_name:?} is missing", path.display())
            })?;
            ensure!(
                t.dtype() == safetensors::Dtype::F32 && t.shape() == value.shape(),
                "{}: parameter {file_name:?} is {:?} {:?}, the model expects F32 {:?}",
                path.display(),
                t.dtype(),
                t.shape(),
                value.shape()
            );
            let data: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            staged.push((i, data));
        }
        let n = staged.len();
        for (i, data) in staged {
            self.values[i].copy_from_slice(&data)?;
        }
        Ok((meta.metadata().clone().unwrap_or_default(), n))
    }
}

/// Recycled f32 tensors, keyed by length.
#[derive(Default)]
struct Pool {
    free: HashMap<usize, Vec<Tensor<f32>>>,
    /// Bytes of every tensor the pool has ever made (held by the tape or free).
    bytes: usize,
    /// Fill handed-out tensors with NaN (tests): a read before a write shows.
    poison: bool,
}

impl Pool {
    fn take(&mut self, device: &Device, shape: &[usize]) -> Result<Tensor<f32>> {
        let n: usize = shape.iter().product();
        let mut t = match self.free.get_mut(&n).and_then(Vec::pop) {
            Some(t) => t.reshape(shape)?,
            None => {
                self.bytes += n * 4;
                Tensor::zeros(device, shape)?
            }
        };
        if self.poison {
            t.poison()?;
        }
        Ok(t)
    }

    fn give(&mut self, t: Tensor<f32>) {
        // An alias (a shared input, a checkpointed segment's view of its inputs) is dropped:
        // recycling it would let an op write into memory someone else reads.
        if !t.is_shared() {
            self.free.entry(t.len()).or_default().push(t);
        }
    }
}

/// What a backward closure sees: the values on the tape and the parameters (read), the
/// gradients of its inputs and of the parameters (write).
pub struct Ctx<'a> {
    /// Values of the tape, by [`Var`].
    pub vals: &'a [Tensor<f32>],
    /// Parameter values, by [`ParamId`].
    pub params: &'a [Tensor<f32>],
    pgrads: &'a mut [Tensor<f32>],
    frozen: &'a [bool],
    grads: &'a mut [Option<Tensor<f32>>],
    needs: &'a [bool],
    pool: &'a mut Pool,
    device: &'a Device,
}

impl Ctx<'_> {
    /// Whether `v`'s gradient is wanted (skip work for values that do not need one).
    pub fn needs(&self, v: Var) -> bool {
        self.needs[v.0]
    }

    /// Whether a parameter's gradient is wanted.
    pub fn needs_param(&self, p: ParamId) -> bool {
        !self.frozen[p.0]
    }

    /// The gradient of a parameter, to accumulate into (`+=`).
    pub fn param_grad(&mut self, p: ParamId) -> &mut Tensor<f32> {
        &mut self.pgrads[p.0]
    }

    /// Gradients of several distinct parameters at once, to accumulate into.
    pub fn param_grads<const N: usize>(
        &mut self,
        ps: [ParamId; N],
    ) -> Result<[&mut Tensor<f32>; N]> {
        self.pgrads
            .get_disjoint_mut(ps.map(|p| p.0))
            .map_err(|e| anyhow::anyhow!("parameter gradients {ps:?}: {e}"))
    }

    /// Adds a computed gradient contribution to `v`'s gradient (moved in if it is the first;
    /// recycled if `v` needs none).
    pub fn give_grad(&mut self, v: Var, g: Tensor<f32>) -> Result<()> {
        if !self.needs[v.0] {
            self.pool.give(g);
            return Ok(());
        }
        match &mut self.grads[v.0] {
            Some(acc) => {
                elementwise::accumulate(1.0, &g, acc)?;
                self.pool.give(g);
            }
            None => self.grads[v.0] = Some(g),
        }
        Ok(())
    }

    /// A scratch tensor from the pool (contents undefined), to give back with [`Ctx::recycle`].
    pub fn scratch(&mut self, shape: &[usize]) -> Result<Tensor<f32>> {
        self.pool.take(self.device, shape)
    }

    /// Returns a scratch tensor to the pool.
    pub fn recycle(&mut self, t: Tensor<f32>) {
        self.pool.give(t)
    }

    /// Adds a contribution to `v`'s gradient with a kernel that takes `beta` (0: assign the
    /// first contribution, 1: accumulate later ones), like GEMM. Does nothing when `v` needs no
    /// gradient.
    pub fn add_grad_beta(
        &mut self,
        v: Var,
        f: impl FnOnce(&mut Tensor<f32>, f32) -> Result<()>,
    ) -> Result<()> {
        if !self.needs[v.0] {
            return Ok(());
        }
        match &mut self.grads[v.0] {
            Some(g) => f(g, 1.0),
            None => {
                let mut g = self.pool.take(self.device, self.vals[v.0].shape())?;
                f(&mut g, 0.0)?;
                self.grads[v.0] = Some(g);
                Ok(())
            }
        }
    }

    /// Adds a contribution to `v`'s gradient with a kernel that assigns its output: the first
    /// contribution is written in place, later ones go through a scratch tensor and are added.
    pub fn add_grad(
        &mut self,
        v: Var,
        f: impl FnOnce(&mut Tensor<f32>) -> Result<()>,
    ) -> Result<()> {
        if !self.needs[v.0] {
            return Ok(());
        }
        let mut g = self.pool.take(self.device, self.vals[v.0].shape())?;
        f(&mut g)?;
        match &mut self.grads[v.0] {
            Some(acc) => {
                elementwise::accumulate(1.0, &g, acc)?;
                self.pool.give(g);
            }
            None => self.grads[v.0] = Some(g),
        }
        Ok(())
    }
}

type BackwardFn = Box<dyn FnOnce(&mut Ctx<'_>, &[&Tensor<f32>]) -> Result<()>>;

/// The forward of a recomputed segment: inputs on a nested tape in, outputs out.
type SegmentFn = Box<dyn Fn(&mut Tape, &[Var], Range<usize>) -> Result<Vec<Var>>>;

/// How a node back-propagates.
enum Backward {
    /// A closure over the values it saved.
    Closure(BackwardFn),
    /// A checkpointed segment: recompute from its inputs, then back-propagate through it.
    Segment {
        inputs: Vec<Var>,
        forward: SegmentFn,
        /// The dropout stream position at the segment's start (the recomputation draws the
        /// same masks).
        step: u64,
        dropout_calls: u64,
        /// Frames per chunk ([`Tape::checkpoint_frames`]), or None: the whole inputs at once.
        chunk: Option<usize>,
    },
}

struct Node {
    op: &'static str,
    outputs: Vec<Var>,
    backward: Backward,
}

/// A tape of forward records, the values they produced, and the parameters they read.
pub struct Tape {
    device: Device,
    /// The model's parameters (the tape owns them so that forward and backward can read and
    /// write them without borrowing games; [`Tape::params_mut`] hands them to the optimiser).
    params: ParamStore,
    vals: Vec<Tensor<f32>>,
    needs: Vec<bool>,
    grads: Vec<Option<Tensor<f32>>>,
    nodes: Vec<Node>,
    pool: Pool,
    /// Caller-owned inputs recorded by [`Tape::input_shared`]: held until the next reset, so
    /// nobody can write into them while the tape reads them.
    held: Vec<Arc<Tensor<f32>>>,
    training: bool,
    seed: u64,
    step: u64,
    dropout_calls: u64,
}

impl Tape {
    /// A tape over `params`, in training mode (dropout on), drawing dropout masks from `seed`.
    pub fn new(params: ParamStore, seed: u64) -> Self {
        Self {
            device: params.device().clone(),
            params,
            vals: Vec::new(),
            needs: Vec::new(),
            grads: Vec::new(),
            nodes: Vec::new(),
            pool: Pool::default(),
            held: Vec::new(),
            training: true,
            seed,
            step: 0,
            dropout_calls: 0,
        }
    }

    /// The device everything lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The parameters.
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// The parameters, to change (optimiser steps, loading).
    pub fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }

    /// Training mode (dropout active) or evaluation.
    pub fn set_training(&mut self, on: bool) {
        self.training = on;
    }

    /// Sets the step counter that seeds dropout (a training loop sets it from the epoch and
    /// batch, so that a resumed run draws the same masks as an uninterrupted one).
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
        self.dropout_calls = 0;
    }

    /// Whether dropout is active.
    pub fn training(&self) -> bool {
        self.training
    }

    /// Fill every tensor the tape hands out with NaN first (tests: any read of a value an op did
    /// not write shows up).
    pub fn set_poison(&mut self, on: bool) {
        self.pool.poison = on;
    }

    /// Bytes of activation and gradient memory the tape has allocated: after one step, the
    /// step's peak.
    pub fn pool_bytes(&self) -> usize {
        self.pool.bytes
    }

    /// Forgets the records and values of the last step (their memory goes back to the pool) and
    /// advances the step counter that seeds dropout.
    pub fn reset(&mut self) {
        for t in self.vals.drain(..) {
            self.pool.give(t);
        }
        for t in self.grads.drain(..).flatten() {
            self.pool.give(t);
        }
        self.needs.clear();
        self.nodes.clear();
        self.held.clear();
        self.step += 1;
        self.dropout_calls = 0;
    }

    /// The next dropout seed: a function of the tape's seed, the step and the call's position in
    /// the step, so runs with the same seed draw the same masks on every device.
    pub fn next_dropout_seed(&mut self) -> u64 {
        self.dropout_calls += 1;
        crate::testing::splitmix64(
            self.seed
                ^ crate::testing::splitmix64(self.step.wrapping_mul(1 << 20) + self.dropout_calls),
        )
    }

    /// A new uninitialised tensor from the pool (for op outputs).
    pub fn alloc(&mut self, shape: &[usize]) -> Result<Tensor<f32>> {
        self.pool.take(&self.device, shape)
    }

    /// A new uninitialised tensor shaped like the value `v`.
    pub fn alloc_like(&mut self, v: Var) -> Result<Tensor<f32>> {
        let shape = self.vals[v.0].shape().to_vec();
        self.alloc(&shape)
    }

    /// Records a value with no gradient (data).
    pub fn input(&mut self, t: Tensor<f32>) -> Result<Var> {
        self.push(t, false)
    }

    /// Records a caller-owned value with no gradient without copying it (a batch of inputs that
    /// lives across steps): the tape reads it in place and holds the `Arc` until the next
    /// [`Tape::reset`], so the caller cannot change it meanwhile.
    pub fn input_shared(&mut self, t: &Arc<Tensor<f32>>) -> Result<Var> {
        let v = self.push(t.alias(), false)?;
        self.held.push(t.clone());
        Ok(v)
    }

    /// Records a value whose gradient [`Tape::backward`] computes (read it with [`Tape::grad`]).
    pub fn input_with_grad(&mut self, t: Tensor<f32>) -> Result<Var> {
        self.push(t, true)
    }

    fn push(&mut self, t: Tensor<f32>, needs: bool) -> Result<Var> {
        ensure!(
            t.device().same(&self.device),
            "tape on {}: a value on {} was recorded",
            self.device.name(),
            t.device().name()
        );
        self.vals.push(t);
        self.needs.push(needs);
        self.grads.push(None);
        Ok(Var(self.vals.len() - 1))
    }

    /// Number of values recorded since the last reset.
    pub fn len(&self) -> usize {
        self.vals.len()
    }

    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.vals.is_empty()
    }

    /// The [`Var`] the next recorded value will get: an op whose backward reads its own output
    /// names it before recording.
    pub fn next_var(&self) -> Var {
        Var(self.vals.len())
    }

    /// A value on the tape.
    pub fn value(&self, v: Var) -> &Tensor<f32> {
        &self.vals[v.0]
    }

    /// Gives a value another shape with as many elements (e.g. a batched product's
    /// `[count, m, n]` read as `[B, heads, T, n]`). Ops check lengths, so the value's backward
    /// is unaffected.
    pub fn reshape(&mut self, v: Var, shape: &[usize]) -> Result<()> {
        self.vals[v.0].set_shape(shape)
    }

    /// A value's shape.
    pub fn shape(&self, v: Var) -> &[usize] {
        self.vals[v.0].shape()
    }

    /// Whether `v` gets a gradient.
    pub fn needs_grad(&self, v: Var) -> bool {
        self.needs[v.0]
    }

    /// Whether any of `vars` or any trainable one of `params` asks for a gradient: then an op's
    /// output does.
    pub fn any_needs(&self, vars: &[Var], params: &[ParamId]) -> bool {
        vars.iter().any(|v| self.needs[v.0]) || params.iter().any(|p| !self.params.frozen[p.0])
    }

    /// Records an op's outputs and its backward. `needs` says whether the outputs get gradients
    /// (see [`Tape::any_needs`]); when they do not, the backward is dropped at once.
    pub fn record(
        &mut self,
        op: &'static str,
        outputs: Vec<Tensor<f32>>,
        needs: bool,
        backward: impl FnOnce(&mut Ctx<'_>, &[&Tensor<f32>]) -> Result<()> + 'static,
    ) -> Result<Vec<Var>> {
        let vars: Vec<Var> = outputs
            .into_iter()
            .map(|t| self.push(t, needs))
            .collect::<Result<_>>()?;
        if needs {
            self.nodes.push(Node {
                op,
                outputs: vars.clone(),
                backward: Backward::Closure(Box::new(backward)),
            });
        }
        Ok(vars)
    }

    /// Bytes of the values the tape holds, by the op that recorded them (inputs and values of
    /// ops that need no gradient under "(untracked)"), largest first: where a step's memory goes.
    pub fn bytes_by_op(&self) -> Vec<(&'static str, usize)> {
        let mut owner: Vec<&'static str> = vec!["(untracked)"; self.vals.len()];
        for n in &self.nodes {
            for v in &n.outputs {
                owner[v.0] = n.op;
            }
        }
        let mut by: std::collections::BTreeMap<&'static str, usize> = Default::default();
        for (v, op) in self.vals.iter().zip(owner) {
            *by.entry(op).or_default() += v.bytes();
        }
        let mut out: Vec<_> = by.into_iter().collect();
        out.sort_by_key(|b| std::cmp::Reverse(b.1));
        out
    }

    /// Records an op with one output.
    pub fn record1(
        &mut self,
        op: &'static str,
        output: Tensor<f32>,
        needs: bool,
        backward: impl FnOnce(&mut Ctx<'_>, &Tensor<f32>) -> Result<()> + 'static,
    ) -> Result<Var> {
        let v = self.record(op, vec![output], needs, move |ctx, dys| {
            backward(ctx, dys[0])
        })?;
        Ok(v[0])
    }

    /// Back-propagates from `output` with the gradient `seed` (dL/d output, its shape): every
    /// trainable parameter's gradient gets `+=` its share, and values recorded with
    /// [`Tape::input_with_grad`] get theirs. Consumes the records: call [`Tape::reset`] before
    /// the next forward.
    pub fn backward(&mut self, output: Var, seed: Tensor<f32>) -> Result<()> {
        ensure!(
            seed.shape() == self.vals[output.0].shape(),
            "backward: the seed gradient has shape {:?}, the output {:?}",
            seed.shape(),
            self.vals[output.0].shape()
        );
        if !self.needs[output.0] {
            bail!("backward: the output depends on no trainable parameter or gradient input");
        }
        self.grads[output.0] = Some(seed);
        self.run_backward()
    }

    /// Replays the records in reverse from the gradients already set.
    fn run_backward(&mut self) -> Result<()> {
        let nodes = std::mem::take(&mut self.nodes);
        for node in nodes.into_iter().rev() {
            if node.outputs.iter().all(|v| self.grads[v.0].is_none()) {
                continue; // no path from these outputs to the loss
            }
            // Outputs that did not reach the loss contribute zero.
            let mut dys = Vec::with_capacity(node.outputs.len());
            for v in &node.outputs {
                let g = match self.grads[v.0].take() {
                    Some(g) => g,
                    None => {
                        let mut z = self.pool.take(&self.device, self.vals[v.0].shape())?;
                        z.fill_bytes(0)?;
                        z
                    }
                };
                dys.push(g);
            }
            match node.backward {
                Backward::Closure(backward) => {
                    let refs: Vec<&Tensor<f32>> = dys.iter().collect();
                    let mut ctx = Ctx {
                        vals: &self.vals,
                        params: &self.params.values,
                        pgrads: &mut self.params.grads,
                        frozen: &self.params.frozen,
                        grads: &mut self.grads,
                        needs: &self.needs,
                        pool: &mut self.pool,
                        device: &self.device,
                    };
                    backward(&mut ctx, &refs)
                        .with_context(|| format!("backward of {}", node.op))?;
                    for g in dys {
                        self.pool.give(g);
                    }
                }
                Backward::Segment {
                    inputs,
                    forward,
                    step,
                    dropout_calls,
                    chunk,
                } => self
                    .segment_backward(&inputs, (&forward, step, dropout_calls, chunk), dys)
                    .with_context(|| format!("backward of checkpointed {}", node.op))?,
            }
        }
        Ok(())
    }

    /// A nested tape that borrows this one's parameters and pool (give them back with
    /// [`Tape::restore`]), positioned at the given dropout stream.
    fn nested(&mut self, step: u64, dropout_calls: u64) -> Tape {
        let empty = ParamStore::new(&self.device, 0);
        Tape {
            device: self.device.clone(),
            params: std::mem::replace(&mut self.params, empty),
            vals: Vec::new(),
            needs: Vec::new(),
            grads: Vec::new(),
            nodes: Vec::new(),
            pool: std::mem::take(&mut self.pool),
            held: Vec::new(),
            training: self.training,
            seed: self.seed,
            step,
            dropout_calls,
        }
    }

    /// Takes back the parameters (with any gradient the nested tape added) and the pool.
    fn restore(&mut self, mut nested: Tape) {
        for t in nested.vals.drain(..) {
            nested.pool.give(t);
        }
        for t in nested.grads.drain(..).flatten() {
            nested.pool.give(t);
        }
        nested.nodes.clear();
        self.params = nested.params;
        self.pool = nested.pool;
    }

    /// Aliases of the values `vars`, for a nested tape that reads them while this tape holds
    /// them (a checkpointed segment's inputs: no copy; the nested tape's pool drops them).
    fn alias_values(&self, vars: &[Var]) -> Vec<Tensor<f32>> {
        vars.iter().map(|v| self.vals[v.0].alias()).collect()
    }

    /// Pool copies (device to device) of the values `vars`.
    fn copy_values(&mut self, vars: &[Var]) -> Result<Vec<Tensor<f32>>> {
        vars.iter()
            .map(|v| {
                let src = &self.vals[v.0];
                let mut c = self.pool.take(&self.device, src.shape())?;
                elementwise::scale(1.0, src, &mut c)?;
                Ok(c)
            })
            .collect()
    }

    /// Records `forward` as one recomputed segment (activation checkpointing): it runs now on a
    /// nested tape, only its outputs are kept, and [`Tape::backward`] runs it again from views
    /// of `inputs` to back-propagate through it. `forward` must be a pure function of its
    /// inputs and the parameters (dropout is: the recomputation is put at the same position of
    /// the dropout stream, so it draws the same masks). Memory: the segment's intermediate
    /// values exist only while it runs, once in the forward pass and once in the backward.
    /// Without anything to differentiate (no trainable parameter, no input needing a gradient)
    /// `forward` simply runs on this tape.
    pub fn checkpoint(
        &mut self,
        op: &'static str,
        inputs: &[Var],
        forward: impl Fn(&mut Tape, &[Var]) -> Result<Vec<Var>> + 'static,
    ) -> Result<Vec<Var>> {
        self.segment(op, inputs, None, Box::new(move |t, x, _| forward(t, x)))
    }

    /// As [`Tape::checkpoint`] for a segment that treats frames (the first dimension of every
    /// input and output) independently: forward and recomputation run `frames` frames at a
    /// time, so the segment's intermediate values exist for one chunk at once, not the batch.
    /// `forward` gets the chunk's inputs and its frame range (to pick per-frame data such as a
    /// graph); it must not draw dropout when the batch takes more than one chunk (every chunk
    /// would start at the same point of the dropout stream: an error says so). Parameter
    /// gradients are summed chunk by chunk in frame order: deterministic, and equal to the
    /// unchunked ones to f32 rounding (bit for bit when one chunk holds the batch).
    pub fn checkpoint_frames(
        &mut self,
        op: &'static str,
        inputs: &[Var],
        frames: usize,
        forward: impl Fn(&mut Tape, &[Var], Range<usize>) -> Result<Vec<Var>> + 'static,
    ) -> Result<Vec<Var>> {
        ensure!(frames > 0, "checkpointed {op}: chunks of 0 frames");
        self.segment(op, inputs, Some(frames), Box::new(forward))
    }

    /// The frame ranges a segment runs in: the whole batch (`chunk` None: one run over the
    /// inputs as they are), else chunks of `chunk` frames of the inputs' first dimension.
    fn segment_chunks(
        &self,
        op: &str,
        inputs: &[Var],
        chunk: Option<usize>,
    ) -> Result<Vec<Range<usize>>> {
        let b = self.segment_frames(inputs);
        let Some(chunk) = chunk else {
            return Ok(std::iter::once(0..b).collect());
        };
        ensure!(
            !inputs.is_empty()
                && inputs
                    .iter()
                    .all(|v| self.shape(*v).first().copied().unwrap_or(1) == b),
            "checkpointed {op}: inputs {:?} do not share a first (frame) dimension",
            inputs
                .iter()
                .map(|v| self.shape(*v).to_vec())
                .collect::<Vec<_>>()
        );
        Ok((0..b)
            .step_by(chunk)
            .map(|f0| f0..(f0 + chunk).min(b))
            .collect())
    }

    /// Records a segment's input views on this (nested) tape, with gradients where `needs`
    /// says (none without it).
    fn record_views(
        &mut self,
        views: Vec<Tensor<f32>>,
        needs: Option<&[bool]>,
    ) -> Result<Vec<Var>> {
        views
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                if needs.is_some_and(|n| n[i]) {
                    self.input_with_grad(t)
                } else {
                    self.input(t)
                }
            })
            .collect()
    }

    /// Frames of a segment's inputs: the first dimension of the first one (1 without inputs).
    fn segment_frames(&self, inputs: &[Var]) -> usize {
        inputs
            .first()
            .map_or(1, |v| self.shape(*v).first().copied().unwrap_or(1))
    }

    /// Views of the values `vars` for a nested tape: whole, or frames `range` of each.
    fn segment_inputs(&self, vars: &[Var], range: Option<&Range<usize>>) -> Vec<Tensor<f32>> {
        match range {
            None => self.alias_values(vars),
            Some(r) => vars
                .iter()
                .map(|v| self.vals[v.0].frames(r.start, r.end))
                .collect(),
        }
    }

    fn segment(
        &mut self,
        op: &'static str,
        inputs: &[Var],
        chunk: Option<usize>,
        forward: SegmentFn,
    ) -> Result<Vec<Var>> {
        let needs = inputs.iter().any(|v| self.needs[v.0]) || self.params.frozen.iter().any(|f| !f);
        if !needs {
            let frames = self.segment_frames(inputs);
            return forward(self, inputs, 0..frames);
        }
        let chunks = self.segment_chunks(op, inputs, chunk)?;
        let sliced = chunk.is_some();
        let (step, dropout_calls) = (self.step, self.dropout_calls);
        let mut full: Vec<Tensor<f32>> = Vec::new();
        for range in &chunks {
            let views = self.segment_inputs(inputs, sliced.then_some(range));
            let mut sub = self.nested(step, dropout_calls);
            let result = (|| -> Result<()> {
                let xs = sub.record_views(views, None)?;
                let outs = forward(&mut sub, &xs, range.clone())?;
                ensure!(
                    chunks.len() == 1 || sub.dropout_calls == dropout_calls,
                    "a segment run in chunks of frames must not draw dropout"
                );
                if !sliced {
                    full = sub.copy_values(&outs)?;
                    return Ok(());
                }
                if full.is_empty() {
                    // The whole batch's outputs, filled chunk by chunk.
                    let b = chunks.last().map_or(0, |r| r.end);
                    for o in &outs {
                        let mut shape = sub.shape(*o).to_vec();
                        ensure!(
                            !shape.is_empty() && shape[0] == range.len(),
                            "output {shape:?} of a chunk of {} frames",
                            range.len()
                        );
                        shape[0] = b;
                        full.push(sub.alloc(&shape)?);
                    }
                }
                ensure!(
                    outs.len() == full.len(),
                    "chunks gave different output counts"
                );
                for (o, f) in outs.iter().zip(&full) {
                    let mut dst = f.frames(range.start, range.end);
                    let src = &sub.vals[o.0];
                    ensure!(
                        src.shape() == dst.shape(),
                        "chunk output {:?}, expected {:?}",
                        src.shape(),
                        dst.shape()
                    );
                    elementwise::scale(1.0, src, &mut dst)?;
                }
                Ok(())
            })();
            self.dropout_calls = sub.dropout_calls;
            self.restore(sub);
            result.with_context(|| format!("checkpointed {op} (frames {range:?})"))?;
        }
        let vars: Vec<Var> = full
            .into_iter()
            .map(|t| self.push(t, true))
            .collect::<Result<_>>()?;
        self.nodes.push(Node {
            op,
            outputs: vars.clone(),
            backward: Backward::Segment {
                inputs: inputs.to_vec(),
                forward,
                step,
                dropout_calls,
                chunk,
            },
        });
        Ok(vars)
    }

    /// The backward of a checkpointed segment: recompute it (chunk by chunk) on a nested tape
    /// from views of its inputs, back-propagate the output gradients `dys` through it, and hand
    /// the inputs' gradients to this tape (parameter gradients accumulate in the shared store).
    fn segment_backward(
        &mut self,
        inputs: &[Var],
        seg: (&SegmentFn, u64, u64, Option<usize>),
        dys: Vec<Tensor<f32>>,
    ) -> Result<()> {
        let mut dys: Vec<Option<Tensor<f32>>> = dys.into_iter().map(Some).collect();
        let (forward, step, dropout_calls, chunk) = seg;
        let chunks = self.segment_chunks("segment", inputs, chunk)?;
        let sliced = chunk.is_some();
        let needs: Vec<bool> = inputs.iter().map(|v| self.needs[v.0]).collect();
        // Input gradients of the whole batch (sliced), or as the one run hands them over.
        let mut dxs: Vec<Option<Tensor<f32>>> = inputs.iter().map(|_| None).collect();
        for range in &chunks {
            let views = self.segment_inputs(inputs, sliced.then_some(range));
            let mut sub = self.nested(step, dropout_calls);
            let result = (|| -> Result<()> {
                let xs = sub.record_views(views, Some(&needs))?;
                let outs = forward(&mut sub, &xs, range.clone())?;
                ensure!(
                    outs.len() == dys.len(),
                    "the recomputation gave {} outputs, the first run {}",
                    outs.len(),
                    dys.len()
                );
                let mut any = false;
                for (o, g) in outs.iter().zip(dys.iter_mut()) {
                    if !sub.needs[o.0] {
                        continue;
                    }
                    any = true;
                    let mine = if sliced {
                        // The chunk's rows of the output gradient, in the nested tape's memory.
                        let mut mine = sub.pool.take(&sub.device, sub.vals[o.0].shape())?;
                        let g = g.as_ref().context("output gradient already used")?;
                        let src = g.frames(range.start, range.end);
                        ensure!(
                            src.shape() == mine.shape(),
                            "output gradient {:?} for a recomputed output {:?}",
                            src.shape(),
                            mine.shape()
                        );
                        elementwise::scale(1.0, &src, &mut mine)?;
                        mine
                    } else {
                        g.take().context("output gradient already used")?
                    };
                    match &mut sub.grads[o.0] {
                        Some(acc) => {
                            elementwise::accumulate(1.0, &mine, acc)?;
                            sub.pool.give(mine);
                        }
                        None => sub.grads[o.0] = Some(mine),
                    }
                }
                if any {
                    sub.run_backward()?;
                }
                for (i, x) in xs.iter().enumerate() {
                    if !needs[i] {
                        continue;
                    }
                    let g = sub.grads[x.0].take();
                    if !sliced {
                        dxs[i] = g;
                        continue;
                    }
                    if dxs[i].is_none() {
                        let whole = self.vals[inputs[i].0].shape().to_vec();
                        dxs[i] = Some(sub.pool.take(&sub.device, &whole)?);
                    }
                    let full = dxs[i].as_ref().context("input gradient")?;
                    let mut dst = full.frames(range.start, range.end);
                    match g {
                        Some(g) => {
                            elementwise::scale(1.0, &g, &mut dst)?;
                            sub.pool.give(g);
                        }
                        None => dst.fill_bytes(0)?,
                    }
                }
                Ok(())
            })();
            self.restore(sub);
            result.with_context(|| format!("frames {range:?}"))?;
        }
        for g in dys.into_iter().flatten() {
            self.pool.give(g);
        }
        for (v, g) in inputs.iter().zip(dxs) {
            let Some(g) = g else { continue };
            if !self.needs[v.0] {
                self.pool.give(g);
                continue;
            }
            match &mut self.grads[v.0] {
                Some(acc) => {
                    elementwise::accumulate(1.0, &g, acc)?;
                    self.pool.give(g);
                }
                None => self.grads[v.0] = Some(g),
            }
        }
        Ok(())
    }

    /// The gradient of a value recorded with [`Tape::input_with_grad`], after
    /// [`Tape::backward`] (None if the loss does not depend on it).
    pub fn grad(&self, v: Var) -> Option<&Tensor<f32>> {
        self.grads[v.0].as_ref()
    }
}
