//! Whole training steps and the atom-stage forward, the way `hiermd train` runs them: the token
//! model's VAMP step (forward of the x_t and x_t+tau frames, softmax, VAMP-2 loss in f64,
//! backward through the tape, AdamW) and the atom stage (neighbor list, backbone, merge into
//! residue tokens) on generated protein-like structures ([`super::systems`]).

use super::dump::{write_safetensors, Io};
use super::systems::ProteinLike;
use super::{measure, provenance};
use crate::model::{AtomInputs, AtomModel, AtomModelConfig, TokenBatch, TokenModel};
use crate::model::{Pooling, TokenModelConfig};
use crate::nn::layers::{AttentionKind, GraphConvKind};
use crate::nn::painn::BackboneKind;
use crate::objectives::vamp::{vamp_loss, VampOptions};
use crate::optim::{OptimConfig, Optimizer};
use crate::tape::Tape;
use crate::testing::Rng;
use crate::{Device, Tensor};
use anyhow::{Context, Result};
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// `hiermd bench token`'s arguments (defaults: the ADK-sized target).
#[derive(clap::Args, Debug, Clone)]
pub struct TokenArgs {
    /// Residues per frame (tokens before merging).
    #[arg(long, default_value_t = 214)]
    pub residues: usize,
    /// Residues per token (w).
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Channels H (inputs and model).
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4)]
    pub blocks: usize,
    /// Time-lagged pairs per step (2x as many frames go through the model).
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Residue graph convolution: cheap or gated (none by default).
    #[arg(long)]
    pub graph_conv: Option<String>,
    /// fused or materialised.
    #[arg(long, default_value = "fused")]
    pub attention: String,
    /// Outputs (VAMP states).
    #[arg(long, default_value_t = 4)]
    pub output: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also write the model (config.json, params.safetensors) here, for the peer to load.
    #[arg(long)]
    pub save_model: Option<PathBuf>,
}

impl TokenArgs {
    /// The model configuration these arguments describe.
    pub fn config(&self) -> Result<TokenModelConfig> {
        let c = TokenModelConfig {
            input_channels: self.hidden,
            hidden: self.hidden,
            heads: self.heads,
            blocks: self.blocks,
            window: self.window,
            graph_conv: self
                .graph_conv
                .as_deref()
                .map(|g| super::dump::parse_enum::<GraphConvKind>("--graph-conv", g))
                .transpose()?,
            attention: super::dump::parse_enum::<AttentionKind>("--attention", &self.attention)?,
            pooling: Pooling::Mean,
            dropout: 0.0,
            output: self.output,
            seed: 11,
            ..Default::default()
        };
        c.validate()?;
        Ok(c)
    }
}

/// Random residue-token inputs of `frames` frames, with C-alpha positions of a protein-like
/// chain (used by the graph convolution).
fn token_batch(
    dev: &Device,
    frames: usize,
    chain: &ProteinLike,
    h: usize,
    rng: &mut Rng,
) -> Result<TokenBatch> {
    let r = chain.residues();
    Ok(TokenBatch {
        s: Arc::new(Tensor::from_slice(
            dev,
            &[frames, r, h],
            &rng.normal_vec(frames * r * h, 1.0),
        )?),
        v: Arc::new(Tensor::from_slice(
            dev,
            &[frames, r, 3, h],
            &rng.normal_vec(frames * r * 3 * h, 1.0),
        )?),
        ca: Some(ProteinLike::frames(&chain.ca, frames, 0.5, rng)),
        mask: None,
    })
}

/// Measures the token model's VAMP training step; returns the JSON row.
pub fn token_step(a: &TokenArgs, dev: &Device) -> Result<serde_json::Value> {
    let config = a.config()?;
    let (model, ps) = TokenModel::create(config.clone(), dev)?;
    if let Some(dir) = &a.save_model {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let j = serde_json::to_string_pretty(&config)?;
        ps.save(
            dir.join("params.safetensors"),
            &HashMap::from([("hiermd.token_config".to_string(), j.clone())]),
        )?;
        std::fs::write(dir.join("config.json"), j)?;
    }
    let chain = ProteinLike::new(a.residues, 3);
    if let Some(dir) = &a.save_model {
        // The peer jitters the same chain for its frames' C-alpha positions.
        let r = chain.residues();
        write_safetensors(
            &dir.join("system.safetensors"),
            &[("ca".to_string(), Io::F32(vec![r, 3], chain.ca.clone()))],
        )?;
    }
    let mut tape = Tape::new(ps, 5);
    tape.set_training(true);
    let mut rng = Rng::new(17);
    let xt = token_batch(dev, a.batch, &chain, a.hidden, &mut rng)?;
    let xl = token_batch(dev, a.batch, &chain, a.hidden, &mut rng)?;
    let mut opt = {
        let (names, values, _) = tape.params_mut().trainable();
        let values: Vec<&Tensor<f32>> = values.into_iter().map(|v| &*v).collect();
        Optimizer::named(OptimConfig::adamw(5e-4, 1e-2), &names, &values)?
    };
    let vamp = VampOptions::default();
    let mut last_score = f64::NAN;
    let m = measure(dev, a.warmup, a.repeats, || {
        tape.reset();
        tape.params_mut().zero_grads()?;
        let chi_t = model.forward(&mut tape, &xt)?.out;
        let chi_t = crate::nn::softmax(&mut tape, chi_t, 1.0, None, 1)?;
        let chi_l = model.forward(&mut tape, &xl)?.out;
        let chi_l = crate::nn::softmax(&mut tape, chi_l, 1.0, None, 1)?;
        let (loss, res) = vamp_loss(&mut tape, chi_t, chi_l, None, &vamp)?;
        last_score = res.score;
        if std::env::var_os("HIERMD_BENCH_MEMORY_REPORT").is_some() {
            for (op, bytes) in tape.bytes_by_op() {
                eprintln!("{op:>28}: {:>9.1} MB", bytes as f64 / 1e6);
            }
        }
        let one = Tensor::from_slice(tape.device(), tape.shape(loss), &[1.0f32])?;
        tape.backward(loss, one)?;
        let (_, mut values, grads) = tape.params_mut().trainable();
        opt.step(&mut values, &grads)?;
        Ok(())
    })?;
    let mut row = provenance(dev);
    row.insert("what".into(), json!("token_step"));
    row.insert("residues".into(), json!(a.residues));
    row.insert("tokens".into(), json!(model.tokens(a.residues)));
    row.insert("window".into(), json!(a.window));
    row.insert("hidden".into(), json!(a.hidden));
    row.insert("heads".into(), json!(a.heads));
    row.insert("blocks".into(), json!(a.blocks));
    row.insert("batch_pairs".into(), json!(a.batch));
    row.insert("graph_conv".into(), json!(a.graph_conv));
    row.insert("attention".into(), json!(a.attention));
    row.insert("params".into(), json!(tape.params().numel()));
    row.insert("pairs_per_s".into(), json!(a.batch as f64 / m.median()));
    row.insert("pool_mb".into(), json!(tape.pool_bytes() as f64 / 1e6));
    row.insert("vamp2".into(), json!(last_score));
    row.extend(m.json());
    Ok(serde_json::Value::Object(row))
}

/// `hiermd bench token`.
pub fn run_token(a: &TokenArgs, dev: &Device) -> Result<()> {
    println!("{}", token_step(a, dev)?);
    Ok(())
}

/// `hiermd bench atoms`'s arguments (defaults: adenylate kinase's size).
#[derive(clap::Args, Debug, Clone)]
pub struct AtomArgs {
    /// Residues of the generated structure (~7.7 heavy atoms each: 214 -> ~1,650 atoms).
    #[arg(long, default_value_t = 214)]
    pub residues: usize,
    /// Frames per batch.
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    /// painn or et.
    #[arg(long, default_value = "painn")]
    pub kind: String,
    /// Channels H.
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Layers.
    #[arg(long, default_value_t = 3)]
    pub layers: usize,
    /// Heads (ET only).
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Also the backward pass (gradients of every parameter and of the positions).
    #[arg(long)]
    pub backward: bool,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Also write the model (config.json, params.safetensors) here, for the peer to load.
    #[arg(long)]
    pub save_model: Option<PathBuf>,
}

/// Measures the atom stage; returns the JSON row.
pub fn atoms_forward(a: &AtomArgs, dev: &Device) -> Result<serde_json::Value> {
    let mut config = AtomModelConfig::default();
    config.backbone.kind = super::dump::parse_enum::<BackboneKind>("--kind", &a.kind)?;
    config.backbone.hidden = a.hidden;
    config.backbone.layers = a.layers;
    config.backbone.heads = a.heads;
    config.backbone.seed = 5;
    config.validate()?;
    let (model, ps) = AtomModel::create(config.clone(), dev)?;
    if let Some(dir) = &a.save_model {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        model.save(&ps, &dir.join("params.safetensors"))?;
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
    }
    let sys = ProteinLike::new(a.residues, 9);
    if let Some(dir) = &a.save_model {
        // The peer runs the same structure (its own thermal jitter of it).
        let (n, r) = (sys.atom_count(), sys.residues());
        write_safetensors(
            &dir.join("system.safetensors"),
            &[
                ("atoms".to_string(), Io::F32(vec![n, 3], sys.atoms.clone())),
                (
                    "z".to_string(),
                    Io::I32(vec![n], sys.z.iter().map(|&z| z as i32).collect()),
                ),
                (
                    "residue".to_string(),
                    Io::I32(vec![n], sys.residue.iter().map(|&t| t as i32).collect()),
                ),
                ("ca".to_string(), Io::F32(vec![r, 3], sys.ca.clone())),
            ],
        )?;
    }
    let ca: Vec<Option<usize>> = sys.ca_atom.iter().map(|&i| Some(i)).collect();
    let inputs = AtomInputs::from_parts(&sys.z, &sys.residue, sys.residues(), &ca, dev)?;
    let mut rng = Rng::new(4);
    let pos = ProteinLike::frames(&sys.atoms, a.frames, 0.3, &mut rng);
    let mut tape = Tape::new(ps, 1);
    tape.set_training(a.backward);
    let mut edges = 0usize;
    let m = measure(dev, a.warmup, a.repeats, || {
        tape.reset();
        let toks = if a.backward {
            tape.params_mut().zero_grads()?;
            model.tokens_with_position_grad(&mut tape, &inputs, &pos, a.frames, None)?
        } else {
            model.tokens(&mut tape, &inputs, &pos, a.frames, None)?
        };
        if a.backward {
            // L = sum(s): every parameter and position gets a gradient.
            let seed = Tensor::from_slice(
                tape.device(),
                tape.shape(toks.s),
                &vec![1.0f32; tape.value(toks.s).len()],
            )?;
            tape.backward(toks.s, seed)?;
        }
        Ok(())
    })?;
    {
        let t = Tensor::from_slice(dev, &[a.frames, sys.atom_count(), 3], &pos)?;
        let nl = crate::ops::neighbor_list::NeighborList::build(&t, config.cutoff(), None, None)?;
        edges = edges.max(nl.edges());
    }
    let mut row = provenance(dev);
    row.insert("what".into(), json!("atoms"));
    row.insert("kind".into(), json!(a.kind));
    row.insert("residues".into(), json!(sys.residues()));
    row.insert("atoms".into(), json!(sys.atom_count()));
    row.insert("frames".into(), json!(a.frames));
    row.insert("edges_per_frame".into(), json!(edges / a.frames.max(1)));
    row.insert("hidden".into(), json!(a.hidden));
    row.insert("layers".into(), json!(a.layers));
    row.insert("backward".into(), json!(a.backward));
    row.insert("frames_per_s".into(), json!(a.frames as f64 / m.median()));
    row.insert("pool_mb".into(), json!(tape.pool_bytes() as f64 / 1e6));
    row.extend(m.json());
    Ok(serde_json::Value::Object(row))
}

/// `hiermd bench atoms`.
pub fn run_atoms(a: &AtomArgs, dev: &Device) -> Result<()> {
    println!("{}", atoms_forward(a, dev)?);
    Ok(())
}
