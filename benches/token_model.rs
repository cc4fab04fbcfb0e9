//! Token-model training step at adenylate kinase's size (214 residue tokens) for windows
//! w = 1, 2, 4, 8: samples/s of a full step (forward, backward through the tape, AdamW update)
//! and the step's peak memory (parameters + gradients + optimiser state + the tape's pool, which
//! after the first step holds every activation and gradient a step needs). The reference's
//! figures (SPEC.md: ADK 0.255 -> 0.165 s per iteration, 15,000 -> 4,000 MB for w = 1 -> 8) come
//! from a GPU and its batch size is not stated; compare shapes of curves here, absolute numbers
//! on a GPU machine. cpu always; cuda when a GPU is present (emu runs the same kernels one
//! thread at a time and is left out).
//!
//! Run: `cargo bench --bench token_model` (HIERMD_BENCH_BATCH sets frames per step, default 16).

use anyhow::Result;
use hiermd::model::{TokenBatch, TokenModel, TokenModelConfig};
use hiermd::nn::layers::AttentionKind;
use hiermd::optim::{OptimConfig, Optimizer};
use hiermd::tape::Tape;
use hiermd::testing::{median_seconds, test_devices, Availability, Rng};
use hiermd::{Device, Tensor};

const RESIDUES: usize = 214;
const CHANNELS: usize = 64;

struct Row {
    device: String,
    attention: AttentionKind,
    window: usize,
    tokens: usize,
    batch: usize,
    step_ms: f64,
    forward_ms: f64,
    samples_per_s: f64,
    peak_mb: f64,
    activations_mb: f64,
}

fn bench(dev: &Device, window: usize, batch: usize, attention: AttentionKind) -> Result<Row> {
    let config = TokenModelConfig {
        input_channels: CHANNELS,
        hidden: CHANNELS,
        heads: 4,
        blocks: 2,
        window,
        attention,
        dropout: 0.1,
        output: 4,
        seed: 1,
        ..Default::default()
    };
    let (model, ps) = TokenModel::create(config, dev)?;
    let mut tape = Tape::new(ps, 2);
    let mut rng = Rng::new(3);
    let b = TokenBatch {
        s: Tensor::from_slice(
            dev,
            &[batch, RESIDUES, CHANNELS],
            &rng.normal_vec(batch * RESIDUES * CHANNELS, 1.0),
        )?
        .into(),
        v: Tensor::from_slice(
            dev,
            &[batch, RESIDUES, 3, CHANNELS],
            &rng.normal_vec(batch * RESIDUES * 3 * CHANNELS, 1.0),
        )?
        .into(),
        ca: None,
        mask: None,
    };
    let mut opt = {
        let (names, values, _) = tape.params_mut().trainable();
        let values: Vec<&Tensor<f32>> = values.into_iter().map(|v| &*v).collect();
        Optimizer::named(OptimConfig::adamw(5e-4, 1e-2), &names, &values)?
    };
    let seed_grad: Vec<f32> = rng.normal_vec(batch * 4, 1.0);
    let mut step = || -> Result<()> {
        tape.reset();
        tape.params_mut().zero_grads()?;
        let out = model.forward(&mut tape, &b)?;
        let g = Tensor::from_slice(dev, tape.shape(out.out), &seed_grad)?;
        tape.backward(out.out, g)?;
        let (_, mut values, grads) = tape.params_mut().trainable();
        opt.step(&mut values, &grads)?;
        Ok(())
    };
    let step_s = median_seconds(dev, 2, 7, &mut step)?;
    let fwd_s = median_seconds(dev, 1, 7, || {
        tape.reset();
        model.forward(&mut tape, &b)?;
        Ok(())
    })?;
    let params = tape.params().bytes() + tape.params().numel() * 8; // + Adam m, v
    Ok(Row {
        device: dev.name(),
        attention,
        window,
        tokens: model.tokens(RESIDUES),
        batch,
        step_ms: step_s * 1e3,
        forward_ms: fwd_s * 1e3,
        samples_per_s: batch as f64 / step_s,
        peak_mb: (params + tape.pool_bytes()) as f64 / 1e6,
        activations_mb: tape.pool_bytes() as f64 / 1e6,
    })
}

fn main() -> Result<()> {
    let batch: usize = std::env::var("HIERMD_BENCH_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let mut devices = vec![Device::Cpu];
    for (name, _, a) in test_devices() {
        match a {
            Availability::Ready(d @ Device::Cuda(_)) => devices.push(d),
            Availability::Missing(why) if name == "cuda" => println!("cuda: not measured ({why})"),
            _ => {}
        }
    }
    let mut rows = Vec::new();
    for dev in &devices {
        let runs = [1, 2, 4, 8]
            .map(|w| (w, AttentionKind::Fused))
            .into_iter()
            .chain([1, 8].map(|w| (w, AttentionKind::Materialised)));
        for (w, kind) in runs {
            let r = bench(dev, w, batch, kind)?;
            eprintln!(
                "{} w={} step {:.1} ms ({:.1} samples/s), peak {:.1} MB",
                r.device, r.window, r.step_ms, r.samples_per_s, r.peak_mb
            );
            rows.push(r);
        }
    }
    println!("\nToken model (H = {CHANNELS}, 4 heads, 2 blocks, dropout 0.1), {RESIDUES} residues, AdamW step\n");
    println!("| device | attention | w | tokens | batch | forward ms | train step ms | samples/s | peak MB | of which activations MB |");
    println!("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|");
    for r in &rows {
        println!(
            "| {} | {:?} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.device,
            r.attention,
            r.window,
            r.tokens,
            r.batch,
            r.forward_ms,
            r.step_ms,
            r.samples_per_s,
            r.peak_mb,
            r.activations_mb
        );
    }
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "device": r.device, "attention": format!("{:?}", r.attention), "window": r.window, "tokens": r.tokens, "batch": r.batch,
                "forward_ms": r.forward_ms, "step_ms": r.step_ms,
                "samples_per_s": r.samples_per_s, "peak_mb": r.peak_mb, "activations_mb": r.activations_mb,
            })
        })
        .collect();
    std::fs::create_dir_all("target/bench")?;
    std::fs::write(
        "target/bench/token_model.json",
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}
