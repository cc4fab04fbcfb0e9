//! `hiermd bench kernels`: each kernel family at a realistic size (adenylate kinase: 214
//! residues, ~1,650 heavy atoms) and a full token-model training step, as a markdown table and
//! JSON rows. The same measurement as the single-purpose subcommands, in one process.

use super::attention::{attention, AttentionArgs};
use super::steps::{atoms_forward, token_step, AtomArgs, TokenArgs};
use super::systems::ProteinLike;
use super::{measure, provenance};
use crate::objectives::vamp::{vamp_score, VampOptions};
use crate::ops::gemm::{gemm_batched, Batch};
use crate::ops::neighbor_list::NeighborList;
use crate::ops::softmax::softmax_forward;
use crate::testing::Rng;
use crate::{Device, Tensor};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;

/// `hiermd bench kernels`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct KernelsArgs {
    /// Write the rows as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Smaller sizes and fewer repetitions (a smoke run, not a measurement).
    #[arg(long)]
    pub quick: bool,
    /// Timed repetitions per kernel.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
}

/// A row of the table: name, the JSON row, its throughput and unit.
struct Row {
    name: String,
    json: Value,
    rate: f64,
    unit: &'static str,
}

fn row(name: impl Into<String>, mut json: Value, rate: f64, unit: &'static str) -> Row {
    let name = name.into();
    if let Some(o) = json.as_object_mut() {
        o.insert("name".into(), json!(name));
        o.insert("rate".into(), json!(rate));
        o.insert("unit".into(), json!(unit));
    }
    Row {
        name,
        json,
        rate,
        unit,
    }
}

/// `hiermd bench kernels`.
pub fn run(a: &KernelsArgs, dev: &Device) -> Result<()> {
    let reps = if a.quick { 1 } else { a.repeats };
    // --quick is a smoke run (it must finish in seconds on emu), not a measurement.
    let residues = if a.quick { 12 } else { 214 };
    let mut rows = Vec::new();
    let mut rng = Rng::new(2);

    // Dense GEMM, the work horse of every Linear.
    let n = if a.quick { 96 } else { 1024 };
    let x = Tensor::from_slice(dev, &[n, n], &rng.normal_vec(n * n, 1.0))?;
    let mut c = Tensor::zeros(dev, &[n, n])?;
    let m = measure(dev, 1, reps, || {
        gemm_batched(
            false,
            false,
            n,
            n,
            n,
            1.0,
            &x,
            &x,
            0.0,
            &mut c,
            Batch::single(),
        )
    })?;
    let mut j = provenance(dev);
    j.extend(m.json());
    let flops = 2.0 * (n as f64).powi(3);
    rows.push(row(
        format!("gemm {n}^3 f32"),
        Value::Object(j),
        flops / m.median() / 1e9,
        "GFLOP/s",
    ));

    // Neighbor list of 8 frames of the generated ADK-sized structure.
    let sys = ProteinLike::new(residues, 9);
    let frames = if a.quick { 2 } else { 8 };
    let pos = ProteinLike::frames(&sys.atoms, frames, 0.3, &mut rng);
    let t = Tensor::from_slice(dev, &[frames, sys.atom_count(), 3], &pos)?;
    let mut edges = 0;
    let m = measure(dev, 1, reps, || {
        edges = NeighborList::build(&t, 5.0, None, None)?.edges();
        Ok(())
    })?;
    let mut j = provenance(dev);
    j.insert("edges".into(), json!(edges));
    j.extend(m.json());
    rows.push(row(
        format!(
            "neighbor list, {} atoms x {frames} frames, 5 A",
            sys.atom_count()
        ),
        Value::Object(j),
        edges as f64 / m.median() / 1e6,
        "M edges/s",
    ));

    // The atom stage: PaiNN and TorchMD-ET, forward and forward + backward.
    for (kind, backward) in [
        ("painn", false),
        ("painn", true),
        ("et", false),
        ("et", true),
    ] {
        let args = AtomArgs {
            residues,
            frames: if a.quick { 1 } else { 4 },
            kind: kind.into(),
            hidden: if a.quick { 32 } else { 64 },
            layers: if a.quick { 1 } else { 3 },
            heads: 8,
            backward,
            warmup: 1,
            repeats: reps.min(3),
            save_model: None,
        };
        let j = atoms_forward(&args, dev)?;
        let rate = j["frames_per_s"].as_f64().unwrap_or(f64::NAN);
        rows.push(row(
            format!(
                "atom stage {kind} H {} x {}, {} atoms, {}",
                args.hidden,
                args.layers,
                j["atoms"],
                if backward { "fwd+bwd" } else { "fwd" }
            ),
            j,
            rate,
            "frames/s",
        ));
    }

    // Equivariant attention, fused and materialised, forward and forward + backward.
    let tokens = if a.quick { 64 } else { 1024 };
    for (kind, backward) in [
        ("fused", false),
        ("fused", true),
        ("materialised", false),
        ("materialised", true),
    ] {
        let args = AttentionArgs {
            tokens,
            batch: 1,
            heads: 8,
            dh: 16,
            attention: kind.into(),
            backward,
            dtype: "f32".into(),
            warmup: 1,
            repeats: reps,
        };
        let j = attention(&args, dev)?;
        let rate = j["samples_per_s"].as_f64().unwrap_or(f64::NAN);
        rows.push(row(
            format!(
                "EqSDPA {kind} T {tokens}, 8 heads, dh 16, {}",
                if backward { "fwd+bwd" } else { "fwd" }
            ),
            j,
            rate,
            "frames/s",
        ));
    }

    // Row softmax (the materialised attention's middle op).
    let (rows_n, cols) = if a.quick { (64, 128) } else { (4096, 1024) };
    let s = Tensor::from_slice(dev, &[rows_n, cols], &rng.normal_vec(rows_n * cols, 1.0))?;
    let mut p = Tensor::zeros(dev, &[rows_n, cols])?;
    let m = measure(dev, 1, reps, || {
        softmax_forward(&s, &mut p, 1.0, None, cols)
    })?;
    let mut j = provenance(dev);
    j.extend(m.json());
    rows.push(row(
        format!("softmax {rows_n} x {cols}"),
        Value::Object(j),
        (rows_n * cols * 8) as f64 / m.median() / 1e9,
        "GB/s",
    ));

    // VAMP-2 score and gradient in f64 (host), 512 pairs x 8 outputs.
    let (np, k) = (512, 8);
    let chi_t: Vec<f64> = (0..np * k).map(|_| rng.uniform()).collect();
    let chi_l: Vec<f64> = (0..np * k).map(|_| rng.uniform()).collect();
    let opts = VampOptions::default();
    let m = measure(&Device::Cpu, 1, reps, || {
        vamp_score(&chi_t, &chi_l, np, k, None, &opts, true).map(|_| ())
    })?;
    let mut j = provenance(&Device::Cpu);
    j.extend(m.json());
    rows.push(row(
        format!("VAMP-2 score + gradient, {np} pairs x {k}"),
        Value::Object(j),
        np as f64 / m.median(),
        "pairs/s",
    ));

    // Whole token-model training steps (the ADK-sized model) at w = 1 and 8.
    for w in [1, 8] {
        let args = TokenArgs {
            residues,
            window: w,
            hidden: 64,
            heads: 8,
            blocks: if a.quick { 1 } else { 4 },
            batch: if a.quick { 2 } else { 32 },
            graph_conv: None,
            attention: "fused".into(),
            output: 4,
            warmup: 1,
            repeats: reps.min(3),
            save_model: None,
        };
        let j = token_step(&args, dev)?;
        let rate = j["pairs_per_s"].as_f64().unwrap_or(f64::NAN);
        rows.push(row(
            format!(
                "token model VAMP step, {residues} residues, w {w}, H 64, {} blocks, 8 heads, {} pairs",
                args.blocks,
                args.batch
            ),
            j,
            rate,
            "pairs/s",
        ));
    }

    println!("| benchmark | device | median ms | throughput | step peak MB |");
    println!("|---|---|--:|--:|--:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} | {:.1} {} | {:.1} |",
            r.name,
            r.json["device"].as_str().unwrap_or("?"),
            r.json["median_s"].as_f64().unwrap_or(f64::NAN) * 1e3,
            r.rate,
            r.unit,
            r.json["added_peak_mb"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(p) = &a.json {
        let all: Vec<&Value> = rows.iter().map(|r| &r.json).collect();
        std::fs::write(p, serde_json::to_string_pretty(&all)?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
