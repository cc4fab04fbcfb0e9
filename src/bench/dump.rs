//! Fixtures of the numerical cross-check with the PyTorch peer (`benches/peer`): a model's
//! configuration and weights, random inputs, and what hiermd computes from them (outputs, input
//! and parameter gradients of L = sum(w * outputs) for random w), in safetensors files the peer
//! reads. Parameters are perturbed away from their initial values (layer-norm scales of exactly
//! 1 and shifts of 0 would hide a mix-up of the two).
//!
//! Layout of a dump folder (see benches/peer/README.md):
//! - `config.json`: the model configuration (serde names of [`TokenModelConfig`] or
//!   [`AtomModelConfig`]);
//! - `params.safetensors`: every parameter under its store name, f32;
//! - `io.safetensors`: inputs, loss weights and results.

use super::systems::ProteinLike;
use crate::model::{AtomInputs, AtomModel, AtomModelConfig, TokenModel, TokenModelConfig};
use crate::nn::atoms::token_merge;
use crate::nn::layers::{AttentionKind, GraphConvKind};
use crate::nn::painn::BackboneKind;
use crate::tape::{ParamStore, Tape, Var};
use crate::testing::Rng;
use crate::{Device, Tensor};
use anyhow::{ensure, Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// One tensor of `io.safetensors`.
pub enum Io {
    /// f32 values and shape.
    F32(Vec<usize>, Vec<f32>),
    /// i32 values and shape.
    I32(Vec<usize>, Vec<i32>),
    /// u8 values and shape.
    U8(Vec<usize>, Vec<u8>),
}

/// Writes named tensors to a safetensors file (atomically).
pub fn write_safetensors(path: &Path, tensors: &[(String, Io)]) -> Result<()> {
    let bytes: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| match t {
            Io::F32(s, d) => (
                n.clone(),
                safetensors::Dtype::F32,
                s.clone(),
                bytemuck::cast_slice(d).to_vec(),
            ),
            Io::I32(s, d) => (
                n.clone(),
                safetensors::Dtype::I32,
                s.clone(),
                bytemuck::cast_slice(d).to_vec(),
            ),
            Io::U8(s, d) => (n.clone(), safetensors::Dtype::U8, s.clone(), d.clone()),
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, dt, s, b)| {
            safetensors::tensor::TensorView::new(*dt, s.clone(), b)
                .map(|v| (n.as_str(), v))
                .with_context(|| format!("{}: tensor {n}", path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, None)
        .with_context(|| format!("serialising {}", path.display()))?;
    crate::optim::write_atomic(path, &data).with_context(|| format!("writing {}", path.display()))
}

/// Adds normal(0, `scale`) noise to every parameter.
fn perturb(ps: &mut ParamStore, rng: &mut Rng, scale: f64) -> Result<()> {
    let (_, values, _) = ps.trainable();
    for v in values {
        let mut x = v.to_vec()?;
        let noise = rng.normal_vec(x.len(), scale);
        for (x, d) in x.iter_mut().zip(noise) {
            *x += d;
        }
        *v = Tensor::from_slice(v.device(), v.shape(), &x)?;
    }
    Ok(())
}

/// Every parameter's gradient as `grad.<name>`.
fn param_grads(ps: &ParamStore) -> Result<Vec<(String, Io)>> {
    ps.names()
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let g = ps.grad(crate::tape::ParamId(i));
            Ok((
                format!("grad.{n}"),
                Io::F32(g.shape().to_vec(), g.to_vec()?),
            ))
        })
        .collect()
}

/// What the token-model dump varies.
#[derive(Clone, Debug)]
pub struct TokenDump {
    /// The model (dropout must be 0).
    pub config: TokenModelConfig,
    /// Frames B.
    pub frames: usize,
    /// Residues R per frame.
    pub residues: usize,
    /// Pad the last residues of some frames.
    pub mask: bool,
    /// Seed of weights perturbation, inputs and loss weights.
    pub seed: u64,
}

/// Writes a token-model cross-check fixture to `dir` on `dev`.
pub fn dump_token(d: &TokenDump, dir: &Path, dev: &Device) -> Result<()> {
    ensure!(
        d.config.dropout == 0.0,
        "bench dump: dropout must be 0 for a deterministic cross-check"
    );
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let (b, r, hin) = (d.frames, d.residues, d.config.input_channels);
    let mut rng = Rng::new(d.seed);
    let (model, mut ps) = TokenModel::create(d.config.clone(), dev)?;
    perturb(&mut ps, &mut rng, 0.1)?;
    let json = serde_json::to_string_pretty(&d.config)?;
    ps.save(
        dir.join("params.safetensors"),
        &HashMap::from([("hiermd.token_config".to_string(), json.clone())]),
    )?;
    std::fs::write(dir.join("config.json"), &json)?;

    let s = rng.normal_vec(b * r * hin, 1.0);
    let v = rng.normal_vec(b * r * 3 * hin, 1.0);
    let chain = ProteinLike::new(r, d.seed ^ 0x5eed);
    let ca = ProteinLike::frames(&chain.ca, b, 0.5, &mut rng);
    // Frame 1 loses its last 3 residues, frame 2 its last one (ragged windows at every w).
    let mask: Option<Vec<u8>> = d.mask.then(|| {
        (0..b)
            .flat_map(|f| {
                let valid = match f {
                    1 => r.saturating_sub(3).max(1),
                    2 => r.saturating_sub(1).max(1),
                    _ => r,
                };
                (0..r).map(move |i| u8::from(i < valid))
            })
            .collect()
    });
    let mut tape = Tape::new(ps, d.seed);
    // Training mode (dropout is 0): the checkpointed blocks' recomputation is what gets checked.
    tape.set_training(true);
    let sv = tape.input_with_grad(Tensor::from_slice(dev, &[b, r, hin], &s)?)?;
    let vv = tape.input_with_grad(Tensor::from_slice(dev, &[b, r, 3, hin], &v)?)?;
    let out = model.forward_vars(&mut tape, sv, vv, Some(&ca), mask.as_deref())?;
    let shape = tape.shape(out.out).to_vec();
    let out_v = tape.value(out.out).to_vec()?;
    let w = rng.normal_vec(out_v.len(), 1.0);
    tape.backward(out.out, Tensor::from_slice(dev, &shape, &w)?)?;
    let grad = |x: Var| -> Result<Vec<f32>> {
        tape.grad(x)
            .context("bench dump: an input got no gradient")?
            .to_vec()
    };
    let mut io = vec![
        ("s".to_string(), Io::F32(vec![b, r, hin], s)),
        ("v".to_string(), Io::F32(vec![b, r, 3, hin], v)),
        ("ca".to_string(), Io::F32(vec![b, r, 3], ca)),
        ("loss_w".to_string(), Io::F32(shape.clone(), w)),
        ("out".to_string(), Io::F32(shape, out_v)),
        ("grad.s".to_string(), Io::F32(vec![b, r, hin], grad(sv)?)),
        ("grad.v".to_string(), Io::F32(vec![b, r, 3, hin], grad(vv)?)),
    ];
    if let Some(m) = mask {
        io.push(("mask".to_string(), Io::U8(vec![b, r], m)));
    }
    io.extend(param_grads(tape.params())?);
    write_safetensors(&dir.join("io.safetensors"), &io)
}

/// What the atom-stage dump varies.
#[derive(Clone, Debug)]
pub struct AtomDump {
    /// The model.
    pub config: AtomModelConfig,
    /// Frames F.
    pub frames: usize,
    /// Residues of the generated structure (about 7.7 heavy atoms each).
    pub residues: usize,
    /// Seed of weights perturbation, positions and loss weights.
    pub seed: u64,
}

/// Writes an atom-stage cross-check fixture to `dir` on `dev`.
pub fn dump_atoms(d: &AtomDump, dir: &Path, dev: &Device) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut rng = Rng::new(d.seed);
    let (model, mut ps) = AtomModel::create(d.config.clone(), dev)?;
    perturb(&mut ps, &mut rng, 0.1)?;
    model.save(&ps, &dir.join("params.safetensors"))?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&d.config)?,
    )?;
    let sys = ProteinLike::new(d.residues, d.seed ^ 0xa70);
    let (f, a, r, h) = (
        d.frames,
        sys.atom_count(),
        sys.residues(),
        d.config.backbone.hidden,
    );
    let pos = ProteinLike::frames(&sys.atoms, f, 0.3, &mut rng);
    let ca: Vec<Option<usize>> = sys.ca_atom.iter().map(|&i| Some(i)).collect();
    let inputs = AtomInputs::from_parts(&sys.z, &sys.residue, r, &ca, dev)?;
    let mut tape = Tape::new(ps, d.seed);
    tape.set_training(false);
    let (pv, nl) = model.graph(&mut tape, &inputs, &pos, f, None, true)?;
    let (s, v) = model.atoms(&mut tape, &inputs, pv, &nl)?;
    let reduce = d.config.reduce.reduce();
    let ts = token_merge(&mut tape, inputs.token_map().clone(), s, reduce)?;
    let tv = token_merge(&mut tape, inputs.token_map().clone(), v, reduce)?;
    let (s_val, v_val) = (tape.value(s).to_vec()?, tape.value(v).to_vec()?);
    let (ts_val, tv_val) = (tape.value(ts).to_vec()?, tape.value(tv).to_vec()?);
    let ws = rng.normal_vec(s_val.len(), 1.0);
    let wv = rng.normal_vec(v_val.len(), 1.0);
    // L = sum(ws s) + sum(wv v): one tape op packs s and v into one output, so one backward
    // pass seeds both.
    let packed: Vec<f32> = s_val.iter().chain(&v_val).copied().collect();
    let (ns, nv) = (s_val.len(), v_val.len());
    let pack = tape.record1(
        "bench_pack",
        Tensor::from_slice(dev, &[ns + nv], &packed)?,
        true,
        move |ctx, dy| {
            let g = dy.to_vec()?;
            let dev = dy.device().clone();
            ctx.give_grad(s, Tensor::from_slice(&dev, &[f, a, h], &g[..ns])?)?;
            ctx.give_grad(v, Tensor::from_slice(&dev, &[f, a, 3, h], &g[ns..])?)
        },
    )?;
    let seed: Vec<f32> = ws.iter().chain(&wv).copied().collect();
    tape.backward(pack, Tensor::from_slice(dev, &[ns + nv], &seed)?)?;
    let gpos = tape
        .grad(pv)
        .context("bench dump: the positions got no gradient")?
        .to_vec()?;
    let mut io = vec![
        ("positions".to_string(), Io::F32(vec![f, a, 3], pos)),
        (
            "z".to_string(),
            Io::I32(vec![a], sys.z.iter().map(|&z| z as i32).collect()),
        ),
        (
            "token_of_atom".to_string(),
            Io::I32(vec![a], sys.residue.iter().map(|&t| t as i32).collect()),
        ),
        ("loss_ws".to_string(), Io::F32(vec![f, a, h], ws)),
        ("loss_wv".to_string(), Io::F32(vec![f, a, 3, h], wv)),
        ("s".to_string(), Io::F32(vec![f, a, h], s_val)),
        ("v".to_string(), Io::F32(vec![f, a, 3, h], v_val)),
        ("tokens_s".to_string(), Io::F32(vec![f, r, h], ts_val)),
        ("tokens_v".to_string(), Io::F32(vec![f, r, 3, h], tv_val)),
        ("grad.positions".to_string(), Io::F32(vec![f, a, 3], gpos)),
    ];
    io.extend(param_grads(tape.params())?);
    write_safetensors(&dir.join("io.safetensors"), &io)
}

/// `hiermd bench dump`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct DumpArgs {
    /// token or atoms.
    pub model: DumpModel,
    /// The fixture folder to write.
    #[arg(long)]
    pub out: std::path::PathBuf,
    /// Seed of the perturbed weights, inputs and loss weights (default: from the clock, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Frames.
    #[arg(long, default_value_t = 3)]
    pub frames: usize,
    /// Residues per frame.
    #[arg(long, default_value_t = 13)]
    pub residues: usize,
    /// Token model: hidden channels H.
    #[arg(long, default_value_t = 32)]
    pub hidden: usize,
    /// Token model: input channels; atoms: backbone channels.
    #[arg(long, default_value_t = 16)]
    pub channels: usize,
    /// Attention heads (token model) or ET heads (atoms).
    #[arg(long, default_value_t = 2)]
    pub heads: usize,
    /// Token model: transformer blocks; atoms: backbone layers.
    #[arg(long, default_value_t = 2)]
    pub blocks: usize,
    /// Token model: residues per token (w).
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Token model: residue graph convolution (cheap or gated).
    #[arg(long)]
    pub graph_conv: Option<String>,
    /// Token model: pooling (mean or first).
    #[arg(long, default_value = "mean")]
    pub pooling: String,
    /// Token model: fused or materialised attention.
    #[arg(long, default_value = "fused")]
    pub attention: String,
    /// Token model: pad the last residues of frames 1 and 2.
    #[arg(long)]
    pub mask: bool,
    /// Atoms: painn or et.
    #[arg(long, default_value = "painn")]
    pub kind: String,
    /// Atoms: mean or sum over a residue's atoms.
    #[arg(long, default_value = "mean")]
    pub reduce: String,
}

/// Which model `hiermd bench dump` writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum DumpModel {
    /// The token model.
    Token,
    /// The atom stage (backbone + atom-to-residue merge).
    Atoms,
}

/// Parses a snake_case enum value of the configuration the way TOML would.
pub fn parse_enum<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .with_context(|| format!("{what}: {s:?} is not a valid choice"))
}

/// `hiermd bench dump`.
pub fn run(args: &DumpArgs, dev: &Device) -> Result<()> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    match args.model {
        DumpModel::Token => {
            let config = TokenModelConfig {
                input_channels: args.channels,
                hidden: args.hidden,
                heads: args.heads,
                blocks: args.blocks,
                window: args.window,
                graph_conv: args
                    .graph_conv
                    .as_deref()
                    .map(|g| parse_enum::<GraphConvKind>("--graph-conv", g))
                    .transpose()?,
                pooling: parse_enum("--pooling", &args.pooling)?,
                attention: parse_enum::<AttentionKind>("--attention", &args.attention)?,
                dropout: 0.0,
                output: 4,
                seed,
                ..Default::default()
            };
            config.validate()?;
            dump_token(
                &TokenDump {
                    config,
                    frames: args.frames,
                    residues: args.residues,
                    mask: args.mask,
                    seed,
                },
                &args.out,
                dev,
            )?;
        }
        DumpModel::Atoms => {
            let mut config = AtomModelConfig::default();
            config.backbone.kind = parse_enum::<BackboneKind>("--kind", &args.kind)?;
            config.backbone.hidden = args.channels;
            config.backbone.layers = args.blocks;
            config.backbone.heads = args.heads;
            config.backbone.seed = seed;
            config.reduce = parse_enum("--reduce", &args.reduce)?;
            config.validate()?;
            dump_atoms(
                &AtomDump {
                    config,
                    frames: args.frames,
                    residues: args.residues,
                    seed,
                },
                &args.out,
                dev,
            )?;
        }
    }
    eprintln!(
        "bench dump: {:?} fixture (seed {seed}, device {}) written to {}",
        args.model,
        dev.name(),
        args.out.display()
    );
    Ok(())
}
