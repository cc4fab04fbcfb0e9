//! `hiermd demo`: the whole workflow on the bundled alanine-dipeptide trajectories
//! (`datasets/alanine/demo`: 4 x 7 ns at 450 K, 1 ps frames, 10 heavy atoms in 3 residues), on
//! the CPU of a laptop in minutes: import, atom-stage features, a VAMPnet, SPIB started from the
//! VAMPnet's k-means states, the analysis of both, and the reference every peptide study starts
//! from, an MSM on the backbone dihedrals (phi, psi), to compare timescales with.

use super::analyze::{analyze, AnalysisSummary, AnalyzeOptions};
use super::config::RunConfig;
use super::train::{train, TrainOptions};
use crate::analysis::dihedral::{grid_state, BackboneDihedrals};
use crate::analysis::msm::implied_timescales;
use crate::store::{self, Dataset, ImportOptions};
use crate::Device;
use anyhow::{ensure, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `hiermd demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// The run folder to write (replaced if it exists).
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// The demo trajectories (default: the bundled `datasets/alanine/demo`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// A much shorter run (a few epochs on a subsample), for tests.
    #[arg(long)]
    pub quick: bool,
    /// Use only the first N frames of each trajectory (the GPU kit's dry run on emu).
    #[arg(long)]
    pub frames: Option<usize>,
}

/// What the demo measured (`demo.json`).
#[derive(Clone, Debug, Serialize)]
pub struct DemoSummary {
    /// The run folder.
    pub out: PathBuf,
    /// Lag time in ps.
    pub lag_ps: f64,
    /// The VAMPnet's validation VAMP-2 at the lag.
    pub vamp_validation_vamp2: f64,
    /// Slowest implied timescales (ps) of the MSM on the VAMPnet's states.
    pub vamp_timescales_ps: Vec<f64>,
    /// Slowest implied timescale (ps) from the VAMPnet's singular values.
    pub vamp_singular_timescale_ps: f64,
    /// How the VAMPnet's frames got their states ("argmax" or "kmeans", see `analyze`).
    pub vamp_state_assignment: String,
    /// The VAMPnet analysis' failed consistency checks (`WARNING: ...` lines; empty when all
    /// passed).
    pub vamp_warnings: Vec<String>,
    /// Slowest implied timescales (ps) of the MSM on SPIB's states.
    pub spib_timescales_ps: Vec<f64>,
    /// SPIB's states with frames.
    pub spib_states: usize,
    /// Slowest implied timescale (ps) from the singular values of SPIB's latent z.
    pub spib_singular_timescale_ps: f64,
    /// The SPIB analysis' failed consistency checks.
    pub spib_warnings: Vec<String>,
    /// Slowest implied timescales (ps) of the reference MSM on a 12 x 12 (phi, psi) grid.
    pub reference_timescales_ps: Vec<f64>,
    /// VAMPnet slowest timescale / reference slowest timescale.
    pub vamp_over_reference: f64,
    /// Seconds per stage.
    pub seconds: Vec<(String, f64)>,
}

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/alanine/demo")
}

/// The reference: a reversible MSM on a `grid` x `grid` partition of (phi, psi).
pub fn dihedral_msm_timescales(ds: &Dataset, lag: usize, grid: usize) -> Result<Vec<f64>> {
    let bd = BackboneDihedrals::find(ds)?;
    let angles = bd.compute(ds);
    let dtrajs: Vec<Vec<u32>> = angles
        .iter()
        .map(|t| {
            t.iter()
                .map(|f| grid_state(f[0][0], f[0][1], grid))
                .collect()
        })
        .collect();
    let its = implied_timescales(&dtrajs, &[lag], grid * grid, 3, true)?;
    Ok(its.timescales[0].clone())
}

/// The atom stage: a small PaiNN (H = 32, 2 layers, 5 A cutoff), seeded, pretrained by denoising
/// on the demo's own frames (sigma 0.2 A, AdamW), then its features of every frame (f32, with
/// C-alpha positions) from the pretrained weights.
fn demo_features(
    data: &Path,
    out: &Path,
    features: &Path,
    epochs: u64,
    device: &Device,
) -> Result<PathBuf> {
    use super::atoms::{featurize, pretrain, FeatureFormat, FeaturizeArgs, PretrainArgs};
    let config = out.join("atom.toml");
    std::fs::write(
        &config,
        "[backbone]\nhidden = 32\nlayers = 2\nrbf = 16\ncutoff = 5.0\nseed = 1\n",
    )?;
    let run = out.join("pretrain");
    pretrain(
        &PretrainArgs {
            data: data.to_path_buf(),
            out: run.clone(),
            model: None,
            config: Some(config),
            epochs,
            batch: Some(256),
            stride: None,
            max_frames: None,
            max_steps: None,
            lr: Some(1e-3),
            weight_decay: None,
            sigma: Some(0.2),
            clip_norm: None,
            seed: Some(1),
            val_fraction: None,
            keep: 1,
            resume: false,
        },
        device,
    )?;
    let model = run.join("model.safetensors");
    featurize(
        &FeaturizeArgs {
            data: data.to_path_buf(),
            model: Some(model.clone()),
            config: None,
            seed: None,
            out: features.to_path_buf(),
            format: FeatureFormat::Store,
            dtype: crate::store::FeatureDtype::F32,
            batch: None,
            force: true,
        },
        device,
    )?;
    Ok(model)
}

/// Runs the demo.
pub fn run(args: &DemoArgs, device: &Device) -> Result<()> {
    let s = run_demo(args, device)?;
    println!();
    println!("hiermd demo: alanine dipeptide, lag {} ps", s.lag_ps);
    println!(
        "  VAMPnet  validation VAMP-2 {:.4}; slowest implied timescales {} ps (MSM on its states, by {}) vs {:.1} ps (singular values){}",
        s.vamp_validation_vamp2,
        fmt_list(&s.vamp_timescales_ps),
        s.vamp_state_assignment,
        s.vamp_singular_timescale_ps,
        if s.vamp_warnings.is_empty() { "; checks passed" } else { "" }
    );
    for w in &s.vamp_warnings {
        println!("    {w}");
    }
    println!(
        "  SPIB     {} states; slowest implied timescales {} ps (MSM) vs {:.1} ps (singular values of z){}",
        s.spib_states,
        fmt_list(&s.spib_timescales_ps),
        s.spib_singular_timescale_ps,
        if s.spib_warnings.is_empty() { "; checks passed" } else { "" }
    );
    for w in &s.spib_warnings {
        println!("    {w}");
    }
    println!(
        "  reference MSM on a 12x12 (phi, psi) grid: {} ps; VAMPnet / reference = {:.3}",
        fmt_list(&s.reference_timescales_ps),
        s.vamp_over_reference
    );
    for (stage, secs) in &s.seconds {
        println!("  {stage:<10} {secs:7.1} s");
    }
    println!(
        "  plots: {}/vamp/analysis and {}/spib/analysis; numbers in {}/demo.json",
        s.out.display(),
        s.out.display(),
        s.out.display()
    );
    Ok(())
}

fn fmt_list(x: &[f64]) -> String {
    let s = x
        .iter()
        .filter(|v| v.is_finite())
        .take(3)
        .map(|v| format!("{v:.1}"))
        .collect::<Vec<_>>()
        .join(", ");
    if s.is_empty() {
        "n/a".into()
    } else {
        s
    }
}

/// Runs the demo and returns its numbers.
pub fn run_demo(args: &DemoArgs, device: &Device) -> Result<DemoSummary> {
    let src = args.data.clone().unwrap_or_else(bundled);
    ensure!(
        src.join("ala2.pdb").exists(),
        "the demo data {} is missing (ala2.pdb and ala2-r*.xtc; see datasets/alanine/README.md)",
        src.display()
    );
    let out = &args.out;
    // The demo rewrites its own folder (a previous demo's, even one cut short) and nothing
    // else: a folder holding anything the demo did not write is refused, as is one that
    // overlaps the demo's data.
    crate::output::check_in_place(out, crate::output::OutputKind::Demo, &[("demo data", &src)])?;
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("replacing {}", out.display()))?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    crate::output::write_atomic(
        &out.join(crate::output::DEMO_MARKER),
        b"# Written by `hiermd demo`: this folder is the demo's, and the next demo replaces it.\n",
    )?;
    let mut seconds = Vec::new();
    let mut clock = Instant::now();
    let mut lap = |name: &str, seconds: &mut Vec<(String, f64)>| {
        seconds.push((name.to_string(), clock.elapsed().as_secs_f64()));
        clock = Instant::now();
    };

    // 1. Import.
    let mut trajs: Vec<PathBuf> = std::fs::read_dir(&src)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "xtc"))
        .collect();
    trajs.sort();
    ensure!(!trajs.is_empty(), "{}: no .xtc trajectories", src.display());
    let data = out.join("data");
    eprintln!("[1/5] importing {} trajectories (heavy atoms)", trajs.len());
    store::import(&ImportOptions {
        topology: src.join("ala2.pdb"),
        trajectories: trajs,
        out: data.clone(),
        selection: "heavy".into(),
        token_map: None,
        time_step_ps: None,
        max_frames: args.frames,
        force: true,
        progress: true,
    })?;
    let ds = Dataset::open(&data)?;
    let dt = ds.manifest.time_step_ps.unwrap_or(1.0);
    lap("import", &mut seconds);

    // 2. Atom-stage features.
    eprintln!("[2/5] atom stage: denoising pretraining of PaiNN, then features of every frame");
    let features = out.join("features");
    demo_features(
        &data,
        out,
        &features,
        if args.quick { 1 } else { 4 },
        device,
    )?;
    lap("atom stage", &mut seconds);

    // 3. VAMPnet.
    let lag_ps = 20.0;
    let quick = args.quick;
    let vamp_dir = out.join("vamp");
    let common = format!(
        r#"
[data]
dataset = {ds:?}
features = {feat:?}
lag_ps = {lag_ps:?}
stride = {stride}

[model]
hidden = 32
heads = 2
blocks = 1
window = 1
dropout = 0.0

[optimizer]
lr = 2e-3
weight_decay = 1e-4

[train]
batch = 1024
eval_batch = 4096
patience = 4
seed = 7
"#,
        ds = data.display().to_string(),
        feat = features.display().to_string(),
        stride = if quick { 8 } else { 1 },
    );
    let vamp_cfg = RunConfig::from_toml_with(
        &format!("{common}\n[objective]\nkind = \"vamp\"\noutputs = 4\n"),
        &[(
            "train.epochs".into(),
            if quick { "2".into() } else { "12".into() },
        )],
    )?;
    eprintln!("[3/5] VAMPnet (4 states, lag {lag_ps} ps)");
    let opts = TrainOptions {
        progress: true,
        force: true,
        ..Default::default()
    };
    train(&vamp_cfg, &vamp_dir, device, &opts)?;
    lap("vampnet", &mut seconds);

    // 4. SPIB from the VAMPnet's states.
    let spib_dir = out.join("spib");
    let spib_cfg = RunConfig::from_toml_with(
        &format!(
            "{common}\n[objective]\nkind = \"spib\"\noutputs = 16\ninit_labels_from = {:?}\n\n[objective.spib]\nstates = 4\n",
            vamp_dir.display().to_string()
        ),
        &[(
            "train.epochs".into(),
            if quick { "2".into() } else { "12".into() },
        )],
    )?;
    eprintln!("[4/5] SPIB (z in 2-D, states from k-means on the VAMPnet outputs)");
    train(&spib_cfg, &spib_dir, device, &opts)?;
    lap("spib", &mut seconds);

    // 5. Analysis and the reference.
    eprintln!("[5/5] analysis");
    let aopts = AnalyzeOptions {
        attention_frames: 64,
        ..Default::default()
    };
    let va: AnalysisSummary = analyze(&vamp_dir, device, &aopts)?;
    let sa: AnalysisSummary = analyze(&spib_dir, device, &aopts)?;
    let lag = (lag_ps / dt).round() as usize;
    let reference: Vec<f64> = dihedral_msm_timescales(&ds, lag, 12)?
        .into_iter()
        .map(|t| t * dt)
        .collect();
    // The learned states on the Ramachandran plane: the picture that says whether they are the
    // known basins.
    let bd = BackboneDihedrals::find(&ds)?;
    let angles: Vec<[f64; 2]> = bd
        .compute(&ds)
        .into_iter()
        .flatten()
        .map(|f| f[0])
        .collect();
    let phi: Vec<f64> = angles.iter().map(|a| a[0]).collect();
    let psi: Vec<f64> = angles.iter().map(|a| a[1]).collect();
    for (name, dir) in [("VAMPnet", &vamp_dir), ("SPIB", &spib_dir)] {
        let (_, states) = crate::npy::read_i32(dir.join("analysis/states.npy"))?;
        let labels: Vec<usize> = states.iter().map(|&s| s as usize).collect();
        let k = labels.iter().max().map_or(1, |m| m + 1);
        crate::plot::ScatterPlot::new(&phi, &psi)
            .title(format!("{name} states on the Ramachandran plane"))
            .x_label("phi (degrees)")
            .y_label("psi (degrees)")
            .categories(&labels)
            .category_names((0..k).map(|s| format!("S{s}")).collect())
            .save_svg(dir.join("analysis/ramachandran_states.svg"))?;
        super::analyze::write_index(&dir.join("analysis"))?;
    }
    lap("analysis", &mut seconds);

    let at = |a: &AnalysisSummary| -> Vec<f64> {
        a.lags
            .iter()
            .position(|&l| l == a.lag_frames)
            .map(|i| a.msm_timescales[i].iter().map(|t| t * dt).collect())
            .unwrap_or_default()
    };
    let vi = va.lags.iter().position(|&l| l == va.lag_frames);
    let vamp_ts = at(&va);
    let summary = DemoSummary {
        out: out.clone(),
        lag_ps,
        vamp_validation_vamp2: vi.map_or(f64::NAN, |i| va.validation_vamp2[i]),
        vamp_singular_timescale_ps: va.singular_value_timescale,
        vamp_state_assignment: va.state_assignment.clone(),
        vamp_warnings: va.warnings.clone(),
        spib_singular_timescale_ps: sa.singular_value_timescale,
        spib_warnings: sa.warnings.clone(),
        vamp_over_reference: vamp_ts.first().copied().unwrap_or(f64::NAN)
            / reference.first().copied().unwrap_or(f64::NAN),
        vamp_timescales_ps: vamp_ts,
        spib_timescales_ps: at(&sa),
        spib_states: sa.state_counts.iter().filter(|&&c| c > 0).count(),
        reference_timescales_ps: reference,
        seconds,
    };
    crate::optim::write_atomic(
        &out.join("demo.json"),
        &serde_json::to_vec_pretty(&summary)?,
    )?;
    Ok(summary)
}
