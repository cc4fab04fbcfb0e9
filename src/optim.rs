//! Optimisers: Adam, AdamW and Adam-atan2 with fused update kernels, gradient clipping by global
//! norm, learning-rate schedules, and checkpoints of the optimiser state. Kernels:
//! `cuda/optim.cu`.
//!
//! An [`Optimizer`] holds the first and second moments (m, v) of every parameter tensor in one
//! arena on the parameters' device. Each [`Optimizer::step`]:
//! 1. computes the global gradient norm: one kernel per gradient writes per-block partial sums of
//!    squares (f64) to a scratch buffer; the host adds them in index order. No float atomics, so
//!    the norm is bit-identical run to run;
//! 2. turns the norm into a clip factor (PyTorch's `clip_grad_norm_` rule) that the update kernels
//!    apply to the gradient as they read it (`grad_scale`), so clipping costs no extra pass over
//!    the gradients beyond the norm itself;
//! 3. runs one fused update kernel per parameter tensor (read p, g, m, v; write p, m, v).
//!
//! The update formulas follow PyTorch: `torch.optim.Adam` (coupled L2 weight decay),
//! `torch.optim.AdamW` (decoupled), and `adam_atan2_pytorch.AdamAtan2` (the package geom2vec
//! uses; see [`OptimKind::AdamAtan2`]).

use crate::arena::{Arena, ArenaLayout};
use crate::device::Device;
use crate::kernels::optim as k;
use crate::launch::{launch, KernelArgs, LaunchConfig};
use crate::ops::{expect_len, same_device, Real, CPU_CHUNK};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Threads per block of the update kernels.
const UPDATE_THREADS: u32 = 256;
/// Threads per block of `sum_squares_partials`; must match its `kNormThreads`.
const NORM_THREADS: u32 = 256;
/// Most blocks (so most partial sums) per gradient tensor: enough blocks to fill a large GPU,
/// few enough that the partials are a few KiB to download.
const MAX_NORM_BLOCKS: usize = 1024;

/// The float types of the optimiser twins: f32 (the cpu device) and f64 (the tests' reference).
pub trait OptimReal: Real {
    /// Square root.
    fn sqrt(self) -> Self;
    /// Four-quadrant arctangent of `self / x`.
    fn atan2(self, x: Self) -> Self;
    /// Widening to f64.
    fn to_f64(self) -> f64;
}
impl OptimReal for f32 {
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn atan2(self, x: Self) -> Self {
        f32::atan2(self, x)
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}
impl OptimReal for f64 {
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn atan2(self, x: Self) -> Self {
        f64::atan2(self, x)
    }
    fn to_f64(self) -> f64 {
        self
    }
}

// ------------------------------------------------------------------------------------------------
// Configuration

/// Which update rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OptimKind {
    /// `torch.optim.Adam`: bias-corrected moments, `eps` added to `sqrt(v_hat)`; weight decay is
    /// coupled L2 (`g += wd * p` before the moments).
    #[serde(rename = "adam")]
    Adam,
    /// `torch.optim.AdamW`: Adam with decoupled weight decay (`p *= 1 - lr * wd` before the
    /// update).
    #[serde(rename = "adamw")]
    AdamW,
    /// Adam-atan2 (Everett et al. 2024, "Scaling Exponents Across Parameterizations and
    /// Optimizers", arXiv 2407.05872) as `adam_atan2_pytorch.AdamAtan2` (adam-atan2-pytorch 0.4)
    /// computes it: `p = p (1 - lr wd) - lr a atan2(m_hat, b sqrt(v_hat))`, no eps. Its
    /// `decoupled_wd`, `cautious_factor`, `cautious_wd` and `regen_reg_rate` options are not
    /// implemented (they default to off there too).
    #[serde(rename = "adam_atan2")]
    AdamAtan2,
}

/// How the learning rate decays after the warm-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Decay {
    /// The base learning rate throughout.
    #[default]
    Constant,
    /// `lr0 * gamma^floor(t / every_steps)`, `t` counted from the end of the warm-up: per step
    /// with `every_steps = 1`, per epoch with `every_steps` = steps per epoch (as PyTorch's
    /// `ExponentialLR` stepped once an epoch).
    Exponential {
        /// Factor per decay period, > 0.
        gamma: f64,
        /// Steps per decay period, >= 1.
        #[serde(default = "one")]
        every_steps: u64,
    },
}

fn one() -> u64 {
    1
}

/// Learning-rate schedule: an optional linear warm-up, then a [`Decay`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// Steps of linear warm-up: step `t < warmup_steps` (0-based) uses `lr0 (t + 1) / warmup_steps`.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Decay after the warm-up.
    #[serde(default)]
    pub decay: Decay,
}

impl Schedule {
    /// The learning rate of step `t` (0-based: the number of steps already taken) for base
    /// learning rate `lr0`.
    pub fn lr(&self, lr0: f64, t: u64) -> f64 {
        if t < self.warmup_steps {
            return lr0 * (t + 1) as f64 / self.warmup_steps as f64;
        }
        match self.decay {
            Decay::Constant => lr0,
            Decay::Exponential { gamma, every_steps } => {
                let periods = (t - self.warmup_steps) / every_steps.max(1);
                lr0 * gamma.powf(periods as f64)
            }
        }
    }
}

/// Optimiser hyperparameters; serde-serialisable, so a TOML run config can hold it:
///
/// ```toml
/// [optim]
/// kind = "adam_atan2"
/// lr = 1e-4
/// betas = [0.9, 0.99]
/// weight_decay = 0.01
/// clip_norm = 1.0
/// schedule = { warmup_steps = 100, decay = { kind = "exponential", gamma = 0.99, every_steps = 500 } }
/// ```
///
/// Floats are f64 so that the f64 reference and the checkpoint hold exactly the configured
/// values; the kernels receive f32 constants derived from them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// Update rule.
    pub kind: OptimKind,
    /// Base learning rate (before the schedule), > 0.
    pub lr: f64,
    /// (beta1, beta2): decay rates of the first and second moments, each in [0, 1).
    pub betas: (f64, f64),
    /// Added to `sqrt(v_hat)` by Adam and AdamW; unused by AdamAtan2.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Weight decay, >= 0: L2 for Adam, decoupled for AdamW and AdamAtan2.
    #[serde(default)]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (PyTorch's `clip_grad_norm_`); `None`: no
    /// clipping.
    #[serde(default)]
    pub clip_norm: Option<f64>,
    /// Learning-rate schedule.
    #[serde(default)]
    pub schedule: Schedule,
    /// AdamAtan2's `a` (scale of the update); unused by the others.
    #[serde(default = "default_atan2_a")]
    pub atan2_a: f64,
    /// AdamAtan2's `b` (scale of `sqrt(v_hat)` inside atan2); unused by the others.
    #[serde(default = "default_atan2_b")]
    pub atan2_b: f64,
}

fn default_eps() -> f64 {
    1e-8
}
fn default_atan2_a() -> f64 {
    1.27
}
fn default_atan2_b() -> f64 {
    1.0
}

impl OptimConfig {
    /// Adam with PyTorch's defaults: betas (0.9, 0.999), eps 1e-8, no weight decay.
    pub fn adam(lr: f64) -> Self {
        Self {
            kind: OptimKind::Adam,
            lr,
            betas: (0.9, 0.999),
            eps: default_eps(),
            weight_decay: 0.0,
            clip_norm: None,
            schedule: Schedule::default(),
            atan2_a: default_atan2_a(),
            atan2_b: default_atan2_b(),
        }
    }

    /// AdamW with PyTorch's defaults (betas (0.9, 0.999), eps 1e-8) and this weight decay
    /// (PyTorch's default is 0.01).
    pub fn adamw(lr: f64, weight_decay: f64) -> Self {
        Self {
            kind: OptimKind::AdamW,
            weight_decay,
            ..Self::adam(lr)
        }
    }

    /// AdamAtan2 with the adam-atan2-pytorch defaults: betas (0.9, 0.99), a = 1.27, b = 1, no
    /// weight decay (its default lr is 1e-4).
    pub fn adam_atan2(lr: f64) -> Self {
        Self {
            kind: OptimKind::AdamAtan2,
            betas: (0.9, 0.99),
            ..Self::adam(lr)
        }
    }

    /// Checks every hyperparameter's range; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let finite_nonneg = |name: &str, v: f64| -> Result<()> {
            ensure!(
                v.is_finite() && v >= 0.0,
                "optimizer config: {name} = {v} must be finite and >= 0"
            );
            Ok(())
        };
        ensure!(
            self.lr.is_finite() && self.lr > 0.0,
            "optimizer config: lr = {} must be finite and > 0",
            self.lr
        );
        for (name, b) in [("betas[0]", self.betas.0), ("betas[1]", self.betas.1)] {
            // beta = 1 would make the bias correction 1 - beta^t zero.
            ensure!(
                (0.0..1.0).contains(&b),
                "optimizer config: {name} = {b} must lie in [0, 1)"
            );
        }
        finite_nonneg("eps", self.eps)?;
        finite_nonneg("weight_decay", self.weight_decay)?;
        finite_nonneg("atan2_b", self.atan2_b)?;
        ensure!(
            self.atan2_a.is_finite() && self.atan2_a > 0.0,
            "optimizer config: atan2_a = {} must be finite and > 0",
            self.atan2_a
        );
        if let Some(c) = self.clip_norm {
            ensure!(
                c.is_finite() && c > 0.0,
                "optimizer config: clip_norm = {c} must be finite and > 0"
            );
        }
        if let Decay::Exponential { gamma, every_steps } = self.schedule.decay {
            ensure!(
                gamma.is_finite() && gamma > 0.0,
                "optimizer config: schedule gamma = {gamma} must be finite and > 0"
            );
            ensure!(
                every_steps >= 1,
                "optimizer config: schedule every_steps must be >= 1"
            );
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Per-step scalars and the CPU twins

/// The scalars of one Adam or AdamW step, in f64; the kernel and the f32 twin get them rounded
/// to f32, the f64 reference uses them as they are.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// Factor applied to the gradient as it is read (the clip factor; 1 without clipping).
    pub grad_scale: f64,
    /// 1 - beta1.
    pub one_minus_beta1: f64,
    /// beta2.
    pub beta2: f64,
    /// 1 - beta2.
    pub one_minus_beta2: f64,
    /// lr / (1 - beta1^t).
    pub step_size: f64,
    /// sqrt(1 - beta2^t).
    pub bias_correction2_sqrt: f64,
    /// eps.
    pub eps: f64,
    /// Coupled L2 weight decay added to the gradient (Adam: wd; AdamW: 0).
    pub l2_decay: f64,
    /// Factor on the parameter before the update (AdamW: 1 - lr wd; Adam: 1).
    pub param_decay: f64,
}

/// The scalars of one AdamAtan2 step, in f64 (see [`AdamStep`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamAtan2Step {
    /// Factor applied to the gradient as it is read.
    pub grad_scale: f64,
    /// 1 - beta1.
    pub one_minus_beta1: f64,
    /// 1 - beta2.
    pub one_minus_beta2: f64,
    /// 1 / (1 - beta1^t).
    pub inv_bias_correction1: f64,
    /// b^2 / (1 - beta2^t): `sqrt(v * v_scale) = b sqrt(v_hat)`.
    pub v_scale: f64,
    /// 1 - lr wd.
    pub param_decay: f64,
    /// lr a.
    pub lr_a: f64,
}

/// The scalars of one step of either family.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UpdateStep {
    /// Adam or AdamW.
    Adam(AdamStep),
    /// AdamAtan2.
    AdamAtan2(AdamAtan2Step),
}

impl UpdateStep {
    /// The scalars of step `t` (1-based, as in the bias corrections) at learning rate `lr`, with
    /// the gradients scaled by `grad_scale`. Bias corrections are computed here in f64 rather
    /// than per thread in f32, where 1 - 0.999^t loses most of its digits to cancellation.
    pub fn new(config: &OptimConfig, lr: f64, t: u64, grad_scale: f64) -> Self {
        let (b1, b2) = config.betas;
        let t = t.max(1) as f64;
        let bc1 = 1.0 - b1.powf(t);
        let bc2 = 1.0 - b2.powf(t);
        let wd = config.weight_decay;
        match config.kind {
            OptimKind::Adam | OptimKind::AdamW => {
                let adamw = config.kind == OptimKind::AdamW;
                Self::Adam(AdamStep {
                    grad_scale,
                    one_minus_beta1: 1.0 - b1,
                    beta2: b2,
                    one_minus_beta2: 1.0 - b2,
                    step_size: lr / bc1,
                    bias_correction2_sqrt: bc2.sqrt(),
                    eps: config.eps,
                    l2_decay: if adamw { 0.0 } else { wd },
                    param_decay: if adamw { 1.0 - lr * wd } else { 1.0 },
                })
            }
            OptimKind::AdamAtan2 => Self::AdamAtan2(AdamAtan2Step {
                grad_scale,
                one_minus_beta1: 1.0 - b1,
                one_minus_beta2: 1.0 - b2,
                inv_bias_correction1: 1.0 / bc1,
                v_scale: config.atan2_b * config.atan2_b / bc2,
                param_decay: 1.0 - lr * wd,
                lr_a: lr * config.atan2_a,
            }),
        }
    }
}

/// Splits four equal-length slices into matching rayon chunks.
fn for_each_chunk<R: OptimReal>(
    param: &mut [R],
    grad: &[R],
    m: &mut [R],
    v: &mut [R],
    f: impl Fn(&mut [R], &[R], &mut [R], &mut [R]) + Sync,
) {
    assert!(
        grad.len() == param.len() && m.len() == param.len() && v.len() == param.len(),
        "optimizer twin: param, grad, m and v must have one length"
    );
    param
        .par_chunks_mut(CPU_CHUNK)
        .zip(grad.par_chunks(CPU_CHUNK))
        .zip(m.par_chunks_mut(CPU_CHUNK))
        .zip(v.par_chunks_mut(CPU_CHUNK))
        .for_each(|(((p, g), m), v)| f(p, g, m, v));
}

/// CPU twin of `adam_update` (Adam and AdamW); all slices have one length.
pub fn adam_update_host<R: OptimReal>(
    param: &mut [R],
    grad: &[R],
    m: &mut [R],
    v: &mut [R],
    s: &AdamStep,
) {
    // R::of rounds to f32 on the cpu device, as the launcher does for the kernel.
    let c = R::of;
    let (gs, omb1, b2, omb2) = (
        c(s.grad_scale),
        c(s.one_minus_beta1),
        c(s.beta2),
        c(s.one_minus_beta2),
    );
    let (step_size, bc2s, eps, l2, pd) = (
        c(s.step_size),
        c(s.bias_correction2_sqrt),
        c(s.eps),
        c(s.l2_decay),
        c(s.param_decay),
    );
    for_each_chunk(param, grad, m, v, |p, g, m, v| {
        for i in 0..p.len() {
            let p0 = p[i];
            let gi = gs * g[i] + l2 * p0;
            let mi = m[i] + omb1 * (gi - m[i]);
            let vi = b2 * v[i] + omb2 * (gi * gi);
            let denom = vi.sqrt() / bc2s + eps;
            p[i] = p0 * pd - step_size * (mi / denom);
            m[i] = mi;
            v[i] = vi;
        }
    });
}

/// CPU twin of `adam_atan2_update`; all slices have one length.
pub fn adam_atan2_update_host<R: OptimReal>(
    param: &mut [R],
    grad: &[R],
    m: &mut [R],
    v: &mut [R],
    s: &AdamAtan2Step,
) {
    // R::of rounds to f32 on the cpu device, as the launcher does for the kernel.
    let c = R::of;
    let (gs, omb1, omb2) = (c(s.grad_scale), c(s.one_minus_beta1), c(s.one_minus_beta2));
    let (ibc1, vs, pd, lr_a) = (
        c(s.inv_bias_correction1),
        c(s.v_scale),
        c(s.param_decay),
        c(s.lr_a),
    );
    for_each_chunk(param, grad, m, v, |p, g, m, v| {
        for i in 0..p.len() {
            let gi = gs * g[i];
            let mi = m[i] + omb1 * (gi - m[i]);
            let vi = v[i] + omb2 * (gi * gi - v[i]);
            let upd = (mi * ibc1).atan2((vi * vs).sqrt());
            p[i] = p[i] * pd - lr_a * upd;
            m[i] = mi;
            v[i] = vi;
        }
    });
}

/// CPU twin of the gradient norm's first pass: the sum of squares of `x`, accumulated in f64 per
/// fixed chunk and the chunks added in order, so the result does not depend on the thread count.
pub fn sum_squares_host<R: OptimReal>(x: &[R]) -> f64 {
    let chunks: Vec<f64> = x
        .par_chunks(CPU_CHUNK)
        .map(|c| {
            c.iter()
                .map(|&v| {
                    let v = v.to_f64();
                    v * v
                })
                .sum()
        })
        .collect();
    chunks.iter().sum()
}

/// PyTorch's `clip_grad_norm_` factor: `min(1, max_norm / (norm + 1e-6))`.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    (max_norm / (norm + 1e-6)).min(1.0)
}

// ------------------------------------------------------------------------------------------------
// Ops: one tensor at a time, on any device

fn update_operands<'a>(
    op: &str,
    param: &'a Tensor<f32>,
    grad: &Tensor<f32>,
    m: &Tensor<f32>,
    v: &Tensor<f32>,
) -> Result<(&'a Device, usize)> {
    let dev = same_device(op, param.device(), &[grad.device(), m.device(), v.device()])?;
    let n = param.len();
    expect_len(op, "grad", grad, n)?;
    expect_len(op, "m", m, n)?;
    expect_len(op, "v", v, n)?;
    Ok((dev, n))
}

/// One Adam or AdamW step on one parameter tensor, in place: reads `param`, `grad`, `m`, `v`
/// once and writes `param`, `m`, `v` once.
pub fn adam_update(
    param: &mut Tensor<f32>,
    grad: &Tensor<f32>,
    m: &mut Tensor<f32>,
    v: &mut Tensor<f32>,
    s: &AdamStep,
) -> Result<()> {
    let (dev, n) = update_operands("adam_update", param, grad, m, v)?;
    match dev {
        Device::Cpu => {
            adam_update_host(
                param.host_mut().unwrap(),
                grad.host().unwrap(),
                m.host_mut().unwrap(),
                v.host_mut().unwrap(),
                s,
            );
            Ok(())
        }
        _ => {
            let dev = dev.clone();
            launch(
                &dev,
                &k::ADAM_UPDATE,
                LaunchConfig::for_elements(n, UPDATE_THREADS),
                KernelArgs::new()
                    .output(param)
                    .input(grad)
                    .output(m)
                    .output(v)
                    .i64(n as i64)
                    .f32(s.grad_scale as f32)
                    .f32(s.one_minus_beta1 as f32)
                    .f32(s.beta2 as f32)
                    .f32(s.one_minus_beta2 as f32)
                    .f32(s.step_size as f32)
                    .f32(s.bias_correction2_sqrt as f32)
                    .f32(s.eps as f32)
                    .f32(s.l2_decay as f32)
                    .f32(s.param_decay as f32),
            )
        }
    }
}

/// One AdamAtan2 step on one parameter tensor, in place (one fused pass, as [`adam_update`]).
pub fn adam_atan2_update(
    param: &mut Tensor<f32>,
    grad: &Tensor<f32>,
    m: &mut Tensor<f32>,
    v: &mut Tensor<f32>,
    s: &AdamAtan2Step,
) -> Result<()> {
    let (dev, n) = update_operands("adam_atan2_update", param, grad, m, v)?;
    match dev {
        Device::Cpu => {
            adam_atan2_update_host(
                param.host_mut().unwrap(),
                grad.host().unwrap(),
                m.host_mut().unwrap(),
                v.host_mut().unwrap(),
                s,
            );
            Ok(())
        }
        _ => {
            let dev = dev.clone();
            launch(
                &dev,
                &k::ADAM_ATAN2_UPDATE,
                LaunchConfig::for_elements(n, UPDATE_THREADS),
                KernelArgs::new()
                    .output(param)
                    .input(grad)
                    .output(m)
                    .output(v)
                    .i64(n as i64)
                    .f32(s.grad_scale as f32)
                    .f32(s.one_minus_beta1 as f32)
                    .f32(s.one_minus_beta2 as f32)
                    .f32(s.inv_bias_correction1 as f32)
                    .f32(s.v_scale as f32)
                    .f32(s.param_decay as f32)
                    .f32(s.lr_a as f32),
            )
        }
    }
}

/// One step of either family on one parameter tensor.
pub fn apply_update(
    param: &mut Tensor<f32>,
    grad: &Tensor<f32>,
    m: &mut Tensor<f32>,
    v: &mut Tensor<f32>,
    s: &UpdateStep,
) -> Result<()> {
    match s {
        UpdateStep::Adam(s) => adam_update(param, grad, m, v, s),
        UpdateStep::AdamAtan2(s) => adam_atan2_update(param, grad, m, v, s),
    }
}

/// Blocks of `sum_squares_partials` for a tensor of `n` elements: its number of partial sums.
fn norm_blocks(n: usize) -> usize {
    n.div_ceil(NORM_THREADS as usize).clamp(1, MAX_NORM_BLOCKS)
}

/// Length of the f64 scratch buffer [`global_grad_norm`] needs for tensors of these lengths.
pub fn norm_partials_len(lens: impl IntoIterator<Item = usize>) -> usize {
    lens.into_iter().map(norm_blocks).sum()
}

/// The 2-norm of all `grads` taken together, in f64. On cuda and emu each tensor's kernel writes
/// its per-block sums of squares into `partials` (at least [`norm_partials_len`] long, on the
/// same device; every slot used is written, so it needs no clearing), and the host adds them in
/// index order: the result is bit-identical run to run. On cpu, [`sum_squares_host`].
pub fn global_grad_norm(grads: &[&Tensor<f32>], partials: &mut Tensor<f64>) -> Result<f64> {
    let op = "global_grad_norm";
    let Some(first) = grads.first() else {
        return Ok(0.0);
    };
    let devices: Vec<&Device> = grads.iter().map(|g| g.device()).collect();
    let dev = same_device(op, first.device(), &devices)?;
    let dev = same_device(op, dev, &[partials.device()])?.clone();
    if let Device::Cpu = dev {
        let sum: f64 = grads
            .iter()
            .map(|g| sum_squares_host(g.host().unwrap()))
            .sum();
        return Ok(sum.sqrt());
    }
    let needed = norm_partials_len(grads.iter().map(|g| g.len()));
    ensure!(
        partials.len() >= needed,
        "{op}: the partials buffer holds {} values, {needed} are needed",
        partials.len()
    );
    ensure!(
        needed <= i32::MAX as usize,
        "{op}: {} gradient tensors need too many partial sums",
        grads.len()
    );
    let mut offset = 0usize;
    for g in grads {
        let blocks = norm_blocks(g.len());
        launch(
            &dev,
            &k::SUM_SQUARES_PARTIALS,
            LaunchConfig {
                grid: [blocks as u32, 1, 1],
                block: [NORM_THREADS, 1, 1],
                shared_bytes: 0,
            },
            KernelArgs::new()
                .input(*g)
                .output(partials)
                .i64(g.len() as i64)
                .i32(offset as i32),
        )?;
        offset += blocks;
    }
    let host = partials.to_vec()?;
    let sum: f64 = host[..needed].iter().sum();
    Ok(sum.sqrt())
}

// ------------------------------------------------------------------------------------------------
// The optimiser

/// What one [`Optimizer::step`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Global 2-norm of the gradients as given (before clipping), in f64.
    pub grad_norm: f64,
    /// Whether the gradients were scaled down (`grad_scale < 1`).
    pub clipped: bool,
    /// Factor applied to the gradients (1 without clipping).
    pub grad_scale: f64,
    /// Learning rate of this step, after the schedule.
    pub lr: f64,
}

/// Adam, AdamW or AdamAtan2 over a fixed list of parameter tensors, with its state (m, v per
/// parameter, f32) in one arena on the parameters' device.
pub struct Optimizer {
    config: OptimConfig,
    device: Device,
    steps: u64,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    m: Vec<Tensor<f32>>,
    v: Vec<Tensor<f32>>,
    /// Scratch of the gradient norm's per-block partial sums.
    norm_partials: Tensor<f64>,
}

/// The (m, v) of one parameter, read from a checkpoint.
type Moments = (Vec<f32>, Vec<f32>);

/// `format` metadata of an optimiser checkpoint.
const CHECKPOINT_FORMAT: &str = "hiermd.optimizer";
/// `version` metadata: bump when the layout changes.
const CHECKPOINT_VERSION: &str = "1";

impl Optimizer {
    /// An optimiser for `params` (all on one device), which it names by index ("0", "1", ...)
    /// in checkpoints. The moments start at zero.
    pub fn new(config: OptimConfig, params: &[&Tensor<f32>]) -> Result<Self> {
        let names: Vec<String> = (0..params.len()).map(|i| i.to_string()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        Self::named(config, &names, params)
    }

    /// As [`Optimizer::new`], naming the parameters (unique names; checkpoint tensors are
    /// `<name>.m` and `<name>.v`).
    pub fn named(config: OptimConfig, names: &[&str], params: &[&Tensor<f32>]) -> Result<Self> {
        config.validate()?;
        ensure!(
            names.len() == params.len(),
            "optimizer: {} names for {} parameters",
            names.len(),
            params.len()
        );
        let Some(first) = params.first() else {
            bail!("optimizer: no parameters");
        };
        let device = first.device().clone();
        let mut seen = HashSet::new();
        for (name, p) in names.iter().zip(params) {
            ensure!(!name.is_empty(), "optimizer: a parameter has an empty name");
            ensure!(
                seen.insert(*name),
                "optimizer: parameter name {name:?} is used twice"
            );
            ensure!(
                p.device().same(&device),
                "optimizer: parameter {name:?} is on {}, the first parameter on {}",
                p.device().name(),
                device.name()
            );
        }
        let mut layout = ArenaLayout::new();
        for (name, p) in names.iter().zip(params) {
            layout.add::<f32>(&format!("{name}.m"), p.shape())?;
            layout.add::<f32>(&format!("{name}.v"), p.shape())?;
        }
        let partials = norm_partials_len(params.iter().map(|p| p.len()));
        layout.add::<f64>("norm_partials", &[partials])?;
        // Zero-filled: the moments start at zero.
        let mut arena = Arena::new(&device, layout).context("optimizer state arena")?;
        let mut m = Vec::with_capacity(names.len());
        let mut v = Vec::with_capacity(names.len());
        for name in names {
            m.push(arena.take::<f32>(&format!("{name}.m"))?);
            v.push(arena.take::<f32>(&format!("{name}.v"))?);
        }
        Ok(Self {
            config,
            device,
            steps: 0,
            names: names.iter().map(|s| s.to_string()).collect(),
            shapes: params.iter().map(|p| p.shape().to_vec()).collect(),
            m,
            v,
            norm_partials: arena.take::<f64>("norm_partials")?,
        })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &OptimConfig {
        &self.config
    }

    /// Steps taken so far (restored by [`Optimizer::load`]).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The parameter names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The learning rate the next step will use.
    pub fn next_lr(&self) -> f64 {
        self.config.schedule.lr(self.config.lr, self.steps)
    }

    /// The moments (m, v) of parameter `i`.
    pub fn moments(&self, i: usize) -> Option<(&Tensor<f32>, &Tensor<f32>)> {
        Some((self.m.get(i)?, self.v.get(i)?))
    }

    fn check_operands(&self, params: &[&mut Tensor<f32>], grads: &[&Tensor<f32>]) -> Result<()> {
        let n = self.names.len();
        ensure!(
            params.len() == n && grads.len() == n,
            "optimizer step: {} parameters and {} gradients given, the optimizer has {n}",
            params.len(),
            grads.len()
        );
        for (i, name) in self.names.iter().enumerate() {
            for (what, t) in [("parameter", &*params[i]), ("gradient", grads[i])] {
                ensure!(
                    t.shape() == self.shapes[i].as_slice(),
                    "optimizer step: {what} {name:?} has shape {:?}, expected {:?}",
                    t.shape(),
                    self.shapes[i]
                );
                ensure!(
                    t.device().same(&self.device),
                    "optimizer step: {what} {name:?} is on {}, the optimizer state on {}",
                    t.device().name(),
                    self.device.name()
                );
            }
        }
        Ok(())
    }

    /// One optimisation step: the global gradient norm, the clip factor (when `clip_norm` is
    /// set), then one fused update per parameter tensor. `params[i]` and `grads[i]` are the
    /// tensors the optimiser was built for, in the same order.
    ///
    /// A non-finite gradient norm (a NaN or inf anywhere in the gradients) fails the step before
    /// anything is written: parameters, moments and the step count are left as they were.
    pub fn step(
        &mut self,
        params: &mut [&mut Tensor<f32>],
        grads: &[&Tensor<f32>],
    ) -> Result<StepReport> {
        self.check_operands(params, grads)?;
        let lr = self.next_lr();
        let grad_norm = global_grad_norm(grads, &mut self.norm_partials)?;
        ensure!(
            grad_norm.is_finite(),
            "optimizer step {}: the gradient norm is {grad_norm} (NaN or inf in the gradients); \
             the step was not taken and parameters and state are unchanged",
            self.steps + 1
        );
        let grad_scale = match self.config.clip_norm {
            Some(max_norm) => clip_scale(grad_norm, max_norm),
            None => 1.0,
        };
        let t = self.steps + 1;
        let s = UpdateStep::new(&self.config, lr, t, grad_scale);
        for (i, param) in params.iter_mut().enumerate() {
            apply_update(param, grads[i], &mut self.m[i], &mut self.v[i], &s)
                .with_context(|| format!("optimizer update of parameter {:?}", self.names[i]))?;
        }
        self.steps = t;
        Ok(StepReport {
            grad_norm,
            clipped: grad_scale < 1.0,
            grad_scale,
            lr,
        })
    }

    // --------------------------------------------------------------------------------------------
    // Checkpoints

    /// Writes the full state (step count, config, m and v of every parameter) to a safetensors
    /// file: tensors `<name>.m` and `<name>.v` (f32), metadata `format`, `version`, `step` and
    /// `config` (JSON). The write is atomic: a temporary file in the same folder is written and
    /// fsynced, then renamed over `path` (and the folder fsynced), so a run killed mid-save
    /// leaves the previous checkpoint intact.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut data: Vec<(String, Vec<u8>, &[usize])> = Vec::with_capacity(2 * self.m.len());
        for (i, name) in self.names.iter().enumerate() {
            for (suffix, t) in [("m", &self.m[i]), ("v", &self.v[i])] {
                // safetensors is little-endian whatever the host is.
                let bytes = t.to_vec()?.iter().flat_map(|x| x.to_le_bytes()).collect();
                data.push((format!("{name}.{suffix}"), bytes, &self.shapes[i]));
            }
        }
        let mut views = Vec::with_capacity(data.len());
        for (name, bytes, shape) in &data {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.to_vec(),
                bytes,
            )
            .with_context(|| format!("optimizer checkpoint: tensor {name}"))?;
            views.push((name.as_str(), view));
        }
        let metadata = HashMap::from([
            ("format".to_string(), CHECKPOINT_FORMAT.to_string()),
            ("version".to_string(), CHECKPOINT_VERSION.to_string()),
            ("step".to_string(), self.steps.to_string()),
            (
                "config".to_string(),
                serde_json::to_string(&self.config).context("serialising the optimizer config")?,
            ),
        ]);
        let bytes = safetensors::serialize(views, Some(metadata))
            .context("serialising the optimizer checkpoint")?;
        write_atomic(path, &bytes)
            .with_context(|| format!("writing optimizer checkpoint {}", path.display()))
    }

    /// Restores the full state written by [`Optimizer::save`]: step count, m, v and config (the
    /// checkpoint's config replaces this optimiser's, since the state was built with it; change
    /// it afterwards with [`Optimizer::set_config`] if that is meant). The file must hold exactly
    /// the tensors `<name>.m` and `<name>.v` of this optimiser's parameters, f32, of their
    /// shapes; the error names the first tensor that is missing, extra or wrong. Nothing is
    /// changed unless the whole file checks out.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let what = || format!("optimizer checkpoint {}", path.display());
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", what()))?;
        let (step, config, tensors) = self.parse_checkpoint(&bytes).with_context(what)?;
        for (i, (m, v)) in tensors.into_iter().enumerate() {
            self.m[i].copy_from_slice(&m)?;
            self.v[i].copy_from_slice(&v)?;
        }
        self.steps = step;
        if let Some(config) = config {
            self.config = config;
        }
        Ok(())
    }

    /// Replaces the hyperparameters (validated first), keeping the state.
    pub fn set_config(&mut self, config: OptimConfig) -> Result<()> {
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Checks a checkpoint against this optimiser and returns (step, config if it differs from
    /// ours, (m, v) per parameter).
    fn parse_checkpoint(&self, bytes: &[u8]) -> Result<(u64, Option<OptimConfig>, Vec<Moments>)> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .context("not a readable safetensors file (truncated or corrupt?)")?;
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
            .context("not a readable safetensors file (truncated or corrupt?)")?;
        let meta = header.metadata().as_ref();
        let get = |key: &str| -> Result<&String> {
            meta.and_then(|m| m.get(key))
                .with_context(|| format!("no {key:?} metadata: not a hiermd optimizer checkpoint"))
        };
        let format = get("format")?;
        ensure!(
            format == CHECKPOINT_FORMAT,
            "metadata format is {format:?}, not {CHECKPOINT_FORMAT:?}: not a hiermd optimizer checkpoint"
        );
        let version = get("version")?;
        ensure!(
            version == CHECKPOINT_VERSION,
            "checkpoint version {version:?}; this build reads version {CHECKPOINT_VERSION}"
        );
        let step: u64 = get("step")?
            .parse()
            .context("metadata step is not a non-negative integer")?;
        let config_json = get("config")?;
        // Our own config when the text is the same: serde_json's default float parsing is not
        // guaranteed exact for 17-digit values, and resuming must be bit-exact.
        let ours = serde_json::to_string(&self.config)?;
        let config = if *config_json == ours {
            None
        } else {
            let c: OptimConfig =
                serde_json::from_str(config_json).context("metadata config is not valid")?;
            c.validate().context("metadata config")?;
            Some(c)
        };

        let expected: HashSet<String> = self
            .names
            .iter()
            .flat_map(|n| [format!("{n}.m"), format!("{n}.v")])
            .collect();
        let mut found: Vec<&str> = st.names();
        found.sort_unstable();
        if let Some(extra) = found.iter().find(|n| !expected.contains(**n)) {
            bail!(
                "tensor {extra:?} is not a moment of this optimizer's parameters ({} parameters: {}); \
                 was the checkpoint written for another model?",
                self.names.len(),
                summarise(&self.names)
            );
        }
        let read = |name: &str, shape: &[usize], suffix: &str| -> Result<Vec<f32>> {
            let key = format!("{name}.{suffix}");
            let t = st.tensor(&key).map_err(|_| {
                anyhow::anyhow!(
                    "tensor {key:?} is missing: the checkpoint has no state for parameter {name:?}"
                )
            })?;
            ensure!(
                t.dtype() == safetensors::Dtype::F32,
                "tensor {key:?} is {:?}, expected F32",
                t.dtype()
            );
            ensure!(
                t.shape() == shape,
                "tensor {key:?} has shape {:?}, parameter {name:?} has shape {shape:?}",
                t.shape()
            );
            Ok(t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let mut tensors = Vec::with_capacity(self.names.len());
        for (name, shape) in self.names.iter().zip(&self.shapes) {
            tensors.push((read(name, shape, "m")?, read(name, shape, "v")?));
        }
        Ok((step, config, tensors))
    }
}

/// The first few names, for error messages.
fn summarise(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    if names.len() > shown.len() {
        format!("{}, ...", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// Atomic writes live in [`crate::output`]; kept here for the callers that name this path.
pub(crate) use crate::output::write_atomic;
