//! The training workflow end to end on a small synthetic two-state system: VAMPnet training
//! learns the slow process, a run killed mid-epoch resumes bit-identical to an uninterrupted one,
//! SPIB trains from the VAMPnet's k-means states, `analyze` and `transform` write what they
//! promise, and configuration errors name the field.

use hiermd::store::{self, FeatureDtype, FeatureSettings, FeatureWriter, ImportOptions};
use hiermd::testing::Rng;
use hiermd::workflow::analyze::{analyze, AnalyzeOptions};
use hiermd::workflow::config::RunConfig;
use hiermd::workflow::train::{train, TrainOptions};
use hiermd::workflow::transform::transform;
use hiermd::Device;
use std::path::{Path, PathBuf};
use std::process::Command;

const RESIDUES: [(&str, &[&str]); 4] = [
    ("ALA", &["N", "CA", "C", "O", "CB"]),
    ("GLY", &["N", "CA", "C", "O"]),
    ("SER", &["N", "CA", "C", "O", "CB", "OG"]),
    ("ALA", &["N", "CA", "C", "O", "CB"]),
];
const H: usize = 16;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hiermd-workflow-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A two-state Markov chain (stay probability 0.97) per trajectory.
fn chain(rng: &mut Rng, n: usize) -> Vec<u32> {
    let mut s = 0u32;
    (0..n)
        .map(|_| {
            if rng.uniform() > 0.97 {
                s = 1 - s;
            }
            s
        })
        .collect()
}

/// Coordinates whose last residue sits 4 A further out in state 1 (plus noise); the features
/// written for them carry the state in a few scalar channels, the rest noise.
fn make_data(dir: &Path, frames: &[usize], seed: u64) -> (PathBuf, PathBuf, Vec<Vec<u32>>) {
    let mut rng = Rng::new(seed);
    let atoms: Vec<(usize, &str, &str)> = RESIDUES
        .iter()
        .enumerate()
        .flat_map(|(k, (res, names))| names.iter().map(move |n| (k, *res, *n)))
        .collect();
    let base: Vec<[f64; 3]> = (0..atoms.len())
        .map(|i| [1.5 * i as f64, (i as f64).sin(), (i as f64 * 0.7).cos()])
        .collect();
    let pdb = |pos: &[[f64; 3]]| -> String {
        let mut out = String::new();
        for (serial, ((k, res, name), p)) in atoms.iter().zip(pos).enumerate() {
            out.push_str(&format!(
                "ATOM  {:>5} {:<4} {res:<3} A{:>4}    {:8.3}{:8.3}{:8.3}  1.00  0.00          {:>2}\n",
                serial + 1,
                format!(" {name}"),
                k + 1,
                p[0],
                p[1],
                p[2],
                &name[..1],
            ));
        }
        out
    };
    let top = dir.join("top.pdb");
    std::fs::write(&top, pdb(&base) + "END\n").unwrap();
    let mut states = Vec::new();
    let mut trajs = Vec::new();
    for (t, &n) in frames.iter().enumerate() {
        let st = chain(&mut rng, n);
        let mut text = String::new();
        for (m, &s) in st.iter().enumerate() {
            let pos: Vec<[f64; 3]> = base
                .iter()
                .zip(&atoms)
                .map(|(p, (k, _, _))| {
                    let shift = if *k == 3 && s == 1 { 4.0 } else { 0.0 };
                    [
                        p[0] + shift + 0.2 * rng.normal(),
                        p[1] + 0.2 * rng.normal(),
                        p[2] + 0.2 * rng.normal(),
                    ]
                })
                .collect();
            text.push_str(&format!("MODEL     {:>4}\n", m + 1));
            text.push_str(&pdb(&pos));
            text.push_str("ENDMDL\n");
        }
        let p = dir.join(format!("traj{t}.pdb"));
        std::fs::write(&p, text + "END\n").unwrap();
        trajs.push(p);
        states.push(st);
    }
    let data = dir.join("data");
    let (ds, _) = store::import(&ImportOptions {
        topology: top,
        trajectories: trajs,
        out: data.clone(),
        selection: "heavy".into(),
        token_map: None,
        time_step_ps: Some(1.0),
        max_frames: None,
        force: false,
        progress: false,
    })
    .unwrap();
    // Features: channel 0-3 of every token = state +- noise, the rest noise; vectors noise.
    let features = dir.join("features");
    let settings = FeatureSettings {
        channels: H,
        dtype: FeatureDtype::F32,
        ca_positions: true,
        ..Default::default()
    };
    let r = ds.manifest.tokens;
    let mut w = FeatureWriter::create(&ds, &features, &settings).unwrap();
    for (t, st) in states.iter().enumerate() {
        let n = st.len();
        let mut s = rng.normal_vec(n * r * H, 0.3);
        for (f, &x) in st.iter().enumerate() {
            for tok in 0..r {
                for c in 0..4 {
                    s[(f * r + tok) * H + c] += x as f32;
                }
            }
        }
        let v = rng.normal_vec(n * r * 3 * H, 0.3);
        let ca: Vec<f32> = (0..n * r * 3).map(|i| (i % (r * 3)) as f32 * 1.3).collect();
        w.append_frames(t, &s, &v, Some(&ca)).unwrap();
    }
    w.finish().unwrap();
    (data, features, states)
}

fn vamp_config(data: &Path, features: &Path, epochs: u64, dropout: f32) -> RunConfig {
    let text = format!(
        r#"
[data]
dataset = {data:?}
features = {features:?}
lag = 5

[model]
hidden = 16
heads = 1
blocks = 1
dropout = {dropout:?}

[objective]
kind = "vamp"
outputs = 3

[optimizer]
lr = 3e-3

[train]
epochs = {epochs}
batch = 128
patience = 0
seed = 3
"#,
        data = data.display().to_string(),
        features = features.display().to_string(),
    );
    RunConfig::from_toml_with(&text, &[]).unwrap()
}

fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Every tensor of a safetensors file, by name, as raw bytes.
fn tensors(p: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = file_bytes(p);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.data().to_vec()))
        .collect();
    out.sort();
    out
}

/// Metrics without the timing fields (which differ from run to run).
fn metrics_without_timing(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("samples_per_s");
            o.remove("seconds");
            v
        })
        .collect()
}

#[test]
fn vampnet_learns_the_slow_process_and_resumes_bit_identical() {
    let dir = tmpdir("vamp");
    let (data, features, _) = make_data(&dir, &[700, 500], 11);
    let dev = Device::Cpu;
    let cfg = vamp_config(&data, &features, 4, 0.1);
    let a = dir.join("run-a");
    let s = train(&cfg, &a, &dev, &TrainOptions::default()).unwrap();
    assert_eq!(s.epochs, 4);
    // Two states with stay probability 0.97: the slow eigenvalue at lag 5 is 0.94^5 ~ 0.73, so
    // VAMP-2 ~ 1 + 0.54; a network that missed the process scores ~1.
    assert!(
        s.best_validation_score > 1.35,
        "validation VAMP-2 {} does not show the slow process",
        s.best_validation_score
    );
    // Interrupted in the middle of epoch 3 (after 2 full epochs of 7 batches plus 3), resumed.
    let b = dir.join("run-b");
    let steps_per_epoch = (s.pairs.0 / 128) as u64;
    let err = train(
        &cfg,
        &b,
        &dev,
        &TrainOptions {
            abort_after_steps: Some(2 * steps_per_epoch + 3),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("aborted"), "{err:#}");
    assert!(!b.join("model.safetensors").exists());
    train(
        &RunConfig::default(),
        &b,
        &dev,
        &TrainOptions {
            resume: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(
        tensors(&a.join("model.safetensors")) == tensors(&b.join("model.safetensors")),
        "resumed run's weights differ from the uninterrupted run's"
    );
    // The files too: one metadata entry, so equal weights are equal bytes.
    assert!(file_bytes(&a.join("model.safetensors")) == file_bytes(&b.join("model.safetensors")));
    assert_eq!(metrics_without_timing(&a), metrics_without_timing(&b));

    // A killed process (abort, no unwinding) resumes the same way through the CLI.
    let c = dir.join("run-c");
    let cfg_path = dir.join("vamp.toml");
    std::fs::write(&cfg_path, cfg.to_toml().unwrap()).unwrap();
    let bin = env!("CARGO_BIN_EXE_hiermd");
    let out = Command::new(bin)
        .args(["--device", "cpu", "train", "--config"])
        .arg(&cfg_path)
        .arg("--run")
        .arg(&c)
        .env(
            "HIERMD_FAULT_ABORT_TRAIN_AFTER_STEPS",
            (steps_per_epoch + 2).to_string(),
        )
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "the abort hook did not stop training"
    );
    let out = Command::new(bin)
        .args(["--device", "cpu", "train", "--resume", "--run"])
        .arg(&c)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "resume failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        tensors(&a.join("model.safetensors")) == tensors(&c.join("model.safetensors")),
        "CLI-resumed run's weights differ"
    );

    // Transform: one row per frame, probabilities summing to 1, equal to the training run's.
    let npy = dir.join("chi.npy");
    let r = transform(&a, None, None, &npy, &dev, false).unwrap();
    assert_eq!(r.offsets, vec![0, 700, 1200]);
    let (shape, chi) = hiermd::npy::read_f32(&npy).unwrap();
    assert_eq!(shape, vec![1200, 3]);
    for row in chi.chunks_exact(3) {
        let sum: f32 = row.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "row sums to {sum}");
    }
    assert!(npy.with_extension("json").exists());

    // Analysis: the numbers and every picture.
    let an = analyze(
        &a,
        &dev,
        &AnalyzeOptions {
            lags: vec![1, 2, 5, 10],
            attention_frames: 8,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(an.lag_frames, 5);
    assert!(an.validation_vamp2[2] > 1.3, "{:?}", an.validation_vamp2);
    // The two-state chain's timescale: -1/ln(0.94) ~ 16 frames; an MSM on the learned states
    // sees it within a factor of 2 (the states are noisy).
    let t = an.msm_timescales[2][0];
    assert!(
        (8.0..40.0).contains(&t),
        "slowest timescale {t} frames; states {:?}, MSM {:?}",
        an.state_counts,
        an.msm_timescales
    );
    for f in &an.figures {
        assert!(f.exists(), "{} missing", f.display());
    }
    for name in [
        "vamp2_vs_lag.svg",
        "implied_timescales.svg",
        "singular_values.svg",
        "msm_transition_matrix.svg",
        "msm_mfpt.svg",
        "msm_stationary.svg",
        "ck_test.svg",
        "state_populations.svg",
        "state_map.svg",
        "analysis.json",
        "states.npy",
    ] {
        assert!(a.join("analysis").join(name).exists(), "{name} missing");
    }
    assert!(a.join("analysis/attention").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn spib_trains_from_vampnet_states() {
    let dir = tmpdir("spib");
    let (data, features, truth) = make_data(&dir, &[600, 600], 5);
    let dev = Device::Cpu;
    let vamp = dir.join("vamp");
    train(
        &vamp_config(&data, &features, 3, 0.0),
        &vamp,
        &dev,
        &TrainOptions::default(),
    )
    .unwrap();
    let text = format!(
        r#"
[data]
dataset = {data:?}
features = {features:?}
lag = 5

[model]
hidden = 16
heads = 1
blocks = 1

[objective]
kind = "spib"
outputs = 8
init_labels_from = {vamp:?}

[objective.spib]
states = 2
patience = 1

[optimizer]
lr = 3e-3

[train]
epochs = 4
batch = 128
patience = 0
seed = 1
"#,
        data = data.display().to_string(),
        features = features.display().to_string(),
        vamp = vamp.display().to_string(),
    );
    let cfg = RunConfig::from_toml_with(&text, &[]).unwrap();
    let run = dir.join("spib");
    train(&cfg, &run, &dev, &TrainOptions::default()).unwrap();
    let npy = dir.join("spib.npy");
    transform(&run, None, None, &npy, &dev, false).unwrap();
    let (shape, rows) = hiermd::npy::read_f32(&npy).unwrap();
    assert_eq!(shape, vec![1200, 3]);
    // The decoder's states agree with the hidden two-state chain (up to relabelling) on most
    // frames.
    let truth: Vec<u32> = truth.into_iter().flatten().collect();
    let states: Vec<u32> = rows.chunks_exact(3).map(|r| r[2] as u32).collect();
    let agree = truth.iter().zip(&states).filter(|(a, b)| a == b).count();
    let frac = agree.max(truth.len() - agree) as f64 / truth.len() as f64;
    assert!(
        frac > 0.9,
        "SPIB states agree with the truth on {frac:.3} of frames"
    );
    let an = analyze(
        &run,
        &dev,
        &AnalyzeOptions {
            lags: vec![1, 5],
            attention_frames: 4,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(run.join("analysis/state_map.svg").exists());
    assert!(an.msm.states.len() >= 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn configuration_errors_name_the_field() {
    let err = |text: &str| format!("{:#}", RunConfig::from_toml_with(text, &[]).unwrap_err());
    let base = "[data]\ndataset = \"x\"\nlag = 5\n";
    assert!(err("[data]\nlag = 5\n").contains("data.dataset"));
    assert!(err("[data]\ndataset = \"x\"\n").contains("data.lag"));
    let e = err(&format!("{base}[train]\nepoch = 3\n"));
    assert!(e.contains("epoch") && e.contains("epochs"), "{e}");
    let e = err(&format!("{base}[objective]\nkind = \"vampire\"\n"));
    assert!(e.contains("vampire") && e.contains("vamp"), "{e}");
    assert!(err(&format!("{base}[model]\noutput = 3\n")).contains("model.output"));
    assert!(err(&format!("{base}[objective]\noutputs = 1\n")).contains("objective.outputs"));
    assert!(err(&format!("{base}[optimizer]\nlr = -1.0\n")).contains("lr"));
    // Flags (--set) reach every field, and are checked the same way.
    let c = RunConfig::from_toml_with(base, &[("train.epochs".into(), "7".into())]).unwrap();
    assert_eq!(c.train.epochs, 7);
    let e = format!(
        "{:#}",
        RunConfig::from_toml_with(base, &[("train.batch".into(), "\"many\"".into())]).unwrap_err()
    );
    assert!(e.contains("batch"), "{e}");
    // A dataset that does not exist is named when training starts.
    let dir = tmpdir("errors");
    let c =
        RunConfig::from_toml_with("[data]\ndataset = \"/nonexistent/ds\"\nlag = 5\n", &[]).unwrap();
    let e = format!(
        "{:#}",
        train(&c, &dir.join("run"), &Device::Cpu, &TrainOptions::default()).unwrap_err()
    );
    assert!(
        e.contains("data.dataset") && e.contains("/nonexistent/ds"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// End to end from coordinates: gradients reach the atom stage (its weights move), the model
/// learns the process, and the atom stage's kind (PaiNN or TorchMD-ET) is a configuration field.
#[test]
fn end_to_end_training_updates_the_atom_stage() {
    let dir = tmpdir("e2e");
    let (data, _, _) = make_data(&dir, &[300, 200], 21);
    let dev = Device::Cpu;
    for kind in ["painn", "et"] {
        let text = format!(
            r#"
[data]
dataset = {data:?}
lag = 5

[atom]
[atom.backbone]
kind = "{kind}"
hidden = 16
layers = 1
rbf = 8
cutoff = 5.0

[model]
hidden = 16
heads = 1
blocks = 1

[objective]
kind = "vamp"
outputs = 2

[optimizer]
lr = 3e-3

[train]
epochs = 3
batch = 64
patience = 0
seed = 2
"#,
            data = data.display().to_string(),
        );
        let cfg = RunConfig::from_toml_with(&text, &[]).unwrap();
        let run = dir.join(format!("run-{kind}"));
        let s = train(&cfg, &run, &dev, &TrainOptions::default()).unwrap();
        assert!(
            s.best_validation_score > 1.2,
            "{kind}: validation VAMP-2 {}",
            s.best_validation_score
        );
        // The atom stage's weights moved away from their initial values.
        let (_, ps0) = hiermd::workflow::network::Network::build(&cfg, &dev).unwrap();
        let trained = tensors(&run.join("model.safetensors"));
        let mut moved = 0;
        let mut atom = 0;
        for (name, bytes) in &trained {
            if let Some(id) = name.strip_prefix("atom.").and_then(|_| ps0.id(name)) {
                atom += 1;
                let init: Vec<u8> = bytemuck::cast_slice(&ps0.value(id).to_vec().unwrap()).to_vec();
                if &init != bytes {
                    moved += 1;
                }
            }
        }
        assert!(atom > 0, "{kind}: no atom-stage parameters in the model");
        assert!(
            moved * 2 > atom,
            "{kind}: only {moved} of {atom} atom-stage tensors changed in training"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `data.selection`: the atom stage sees only the selected atoms, tokens without them vanish, and
/// a selection of nothing (or one given with frozen features) is an error naming the field.
#[test]
fn end_to_end_selection_subsets_atoms_and_tokens() {
    let dir = tmpdir("select");
    let (data, features, _) = make_data(&dir, &[120, 80], 4);
    let dev = Device::Cpu;
    let cfg = |sel: &str| {
        let text = format!(
            r#"
[data]
dataset = {data:?}
lag = 2
selection = "{sel}"

[atom]
[atom.backbone]
hidden = 16
layers = 1
rbf = 8

[model]
hidden = 16
heads = 1
blocks = 1

[objective]
outputs = 2

[train]
epochs = 1
batch = 64
"#,
            data = data.display().to_string(),
        );
        RunConfig::from_toml_with(&text, &[]).unwrap()
    };
    let (net, _) = hiermd::workflow::network::Network::build(&cfg("not resid 2"), &dev).unwrap();
    assert_eq!(net.residues(), 3, "resid 2's token should be gone");
    let run = dir.join("run");
    train(&cfg("not resid 2"), &run, &dev, &TrainOptions::default()).unwrap();
    analyze(
        &run,
        &dev,
        &AnalyzeOptions {
            lags: vec![1, 2],
            attention_frames: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let e = match hiermd::workflow::network::Network::build(&cfg("resname XYZ"), &dev) {
        Ok(_) => panic!("an empty selection was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("data.selection") && e.contains("XYZ"), "{e}");
    let text = format!(
        "[data]\ndataset = {:?}\nfeatures = {:?}\nlag = 2\nselection = \"name CA\"\n",
        data.display().to_string(),
        features.display().to_string()
    );
    let e = format!("{:#}", RunConfig::from_toml_with(&text, &[]).unwrap_err());
    assert!(e.contains("data.selection"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
