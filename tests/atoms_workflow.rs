//! The atom stage as a model and its commands: AtomModel save/load and prefixed loading,
//! rotation behaviour of the tokens, `hiermd featurize` (store and npy, f32 and f16, determinism,
//! agreement with a direct forward pass), `hiermd pretrain` (the loss falls; a stopped and
//! resumed run ends bit-identical to an uninterrupted one), `hiermd init-model`, and the command
//! line's errors. On the cpu device, with a tiny model and a small generated peptide.

use hiermd::model::atom::{AtomInputs, AtomModel, AtomModelConfig, TokenReduce};
use hiermd::nn::painn::BackboneConfig;
use hiermd::ops::painn::RbfKind;
use hiermd::store::{self, Dataset, FeatureDtype, FeatureStore, ImportOptions};
use hiermd::tape::{Init, ParamStore, Tape};
use hiermd::testing::Rng;
use hiermd::workflow::atoms::{
    featurize, pretrain, FeatureFormat, FeaturizeArgs, PretrainArgs, PRETRAIN_FAULT_ABORT_ENV,
};
use hiermd::Device;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Residues of the test peptide; LIG has no CA (its C-alpha position is its heavy-atom
/// centroid); the H atom is dropped by the heavy-atom selection.
const RESIDUES: [(&str, &[&str]); 4] = [
    ("ALA", &["N", "CA", "C", "O", "CB", "H"]),
    ("GLY", &["N", "CA", "C", "O"]),
    ("SER", &["N", "CA", "C", "O", "CB", "OG"]),
    ("LIG", &["C1", "O2", "N3"]),
];
const TOKENS: usize = RESIDUES.len();
const HEAVY: usize = 18;

/// Length and XXH3 of some bytes: compared in place of the bytes (a failure prints two numbers,
/// not two files).
fn digest(b: &[u8]) -> (usize, u64) {
    (b.len(), xxhash_rust::xxh3::xxh3_64(b))
}

fn file_digest(p: impl AsRef<Path>) -> (usize, u64) {
    digest(&std::fs::read(p).unwrap())
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hiermd-atoms-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hiermd"))
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{cmd:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A compact peptide: atoms on a random walk of 1.5 A steps (so neighbours fall within the
/// cutoff), the same for every frame up to thermal-like jitter of 0.3 A.
fn base_positions(rng: &mut Rng) -> Vec<[f64; 3]> {
    let n: usize = RESIDUES.iter().map(|r| r.1.len()).sum();
    let mut p = vec![[0.0; 3]];
    while p.len() < n {
        let last = *p.last().unwrap();
        let d = [rng.normal(), rng.normal(), rng.normal()];
        let len = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
        p.push([0, 1, 2].map(|k| last[k] + 1.5 * d[k] / len));
    }
    p
}

fn pdb_model(rng: &mut Rng, base: &[[f64; 3]], jitter: f64, out: &mut String) {
    let mut serial = 1;
    for (k, (res, names)) in RESIDUES.iter().enumerate() {
        for name in names.iter() {
            let b = base[serial - 1];
            let [x, y, z] = b.map(|c| c + jitter * rng.normal());
            let record = if *res == "LIG" { "HETATM" } else { "ATOM  " };
            out.push_str(&format!(
                "{record}{serial:>5} {:<4} {res:<3} A{:>4}    {x:8.3}{y:8.3}{z:8.3}  1.00  0.00          {:>2}\n",
                format!(" {name}"),
                k + 1,
                &name[..1],
            ));
            serial += 1;
        }
    }
}

/// Imports trajectories with these frame counts into `dir/name`.
fn dataset(dir: &Path, name: &str, frames: &[usize], seed: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let base = base_positions(&mut rng);
    let mut top = String::new();
    pdb_model(&mut rng, &base, 0.0, &mut top);
    top.push_str("END\n");
    let top_path = dir.join(format!("{name}-top.pdb"));
    std::fs::write(&top_path, top).unwrap();
    let mut trajs = Vec::new();
    for (t, &n) in frames.iter().enumerate() {
        let mut text = String::new();
        for m in 0..n {
            text.push_str(&format!("MODEL     {:>4}\n", m + 1));
            pdb_model(&mut rng, &base, 0.3, &mut text);
            text.push_str("ENDMDL\n");
        }
        text.push_str("END\n");
        let p = dir.join(format!("{name}-traj{t}.pdb"));
        std::fs::write(&p, text).unwrap();
        trajs.push(p);
    }
    let (ds, _) = store::import(&ImportOptions {
        topology: top_path,
        trajectories: trajs,
        out: dir.join(name),
        selection: "heavy".into(),
        token_map: None,
        time_step_ps: None,
        max_frames: None,
        force: false,
        progress: false,
    })
    .unwrap();
    assert_eq!(ds.manifest.tokens, TOKENS);
    assert_eq!(ds.natoms(), HEAVY);
    ds
}

fn tiny_config(seed: u64) -> AtomModelConfig {
    AtomModelConfig {
        backbone: BackboneConfig {
            hidden: 8,
            layers: 2,
            rbf: 8,
            rbf_kind: RbfKind::ExpNormal,
            cutoff: 4.0,
            seed,
            ..Default::default()
        },
        reduce: TokenReduce::Mean,
        neighbor_cutoff: Some(4.5),
    }
}

const TINY_TOML: &str = "reduce = \"mean\"\nneighbor_cutoff = 4.5\n[backbone]\nhidden = 8\n\
                         layers = 2\nrbf = 8\ncutoff = 4.0\nseed = 3\n";

/// All frames of trajectory `t` as one host array.
fn frames_of(ds: &Dataset, t: usize) -> (Vec<f32>, usize) {
    let tr = &ds.trajectories[t];
    (tr.coords().to_vec(), tr.frames())
}

/// (s, v, ca) of a direct forward pass.
fn direct_tokens(
    model: &AtomModel,
    ps: ParamStore,
    inputs: &AtomInputs,
    pos: &[f32],
    frames: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, ParamStore) {
    let mut tape = Tape::new(ps, 0);
    let tok = model.tokens(&mut tape, inputs, pos, frames, None).unwrap();
    let s = tape.value(tok.s).to_vec().unwrap();
    let v = tape.value(tok.v).to_vec().unwrap();
    assert_eq!(tape.shape(tok.s), &[frames, TOKENS, model.hidden()]);
    assert_eq!(tape.shape(tok.v), &[frames, TOKENS, 3, model.hidden()]);
    tape.reset();
    let ps = std::mem::replace(tape.params_mut(), ParamStore::new(&Device::Cpu, 0));
    (s, v, tok.ca, ps)
}

#[test]
fn save_load_round_trip_and_prefixed_loading() {
    let dir = tmpdir("roundtrip");
    let ds = dataset(&dir, "ds", &[5], 1);
    let dev = Device::Cpu;
    let inputs = AtomInputs::new(&ds, &dev).unwrap();
    assert_eq!((inputs.atoms(), inputs.tokens()), (HEAVY, TOKENS));
    let (pos, n) = frames_of(&ds, 0);

    let (model, ps) = AtomModel::create(tiny_config(7), &dev).unwrap();
    assert_eq!(model.hidden(), 8);
    let path = dir.join("m.safetensors");
    model.save(&ps, &path).unwrap();
    let (s0, v0, ca0, _) = direct_tokens(&model, ps, &inputs, &pos, n);
    assert!(s0.iter().chain(&v0).all(|x| x.is_finite()));
    assert!(v0.iter().any(|&x| x != 0.0), "vectors are all zero");

    assert_eq!(AtomModel::read_config(&path).unwrap(), tiny_config(7));
    let (loaded, ps2) = AtomModel::load(&path, &dev).unwrap();
    let (s1, v1, ca1, ps2) = direct_tokens(&loaded, ps2, &inputs, &pos, n);
    assert_eq!(s0, s1);
    assert_eq!(v0, v1);
    assert_eq!(ca0, ca1);
    // Saving again writes the same bytes.
    let path2 = dir.join("m2.safetensors");
    loaded.save(&ps2, &path2).unwrap();
    assert_eq!(file_digest(&path), file_digest(&path2));

    // Into an end-to-end store: under "atom.", beside another model's parameters.
    let mut ps = ParamStore::new(&dev, 99);
    ps.set_prefix("token.");
    let other = ps.add("w", &[3], Init::Constant(2.5)).unwrap();
    ps.set_prefix("atom.");
    let inner = AtomModel::new(tiny_config(123), &mut ps).unwrap();
    ps.set_prefix("");
    assert!(ps.names().iter().any(|n| n == "atom.embedding.weight"));
    AtomModel::load_into(&path, &mut ps, "atom.").unwrap();
    assert_eq!(ps.value(other).to_vec().unwrap(), vec![2.5; 3]);
    // Saved from the prefixed store, the model is a stand-alone one (names without "atom.").
    let path3 = dir.join("m3.safetensors");
    inner.save(&ps, &path3).unwrap();
    assert_eq!(AtomModel::read_config(&path3).unwrap(), tiny_config(123));
    let (m3, ps3) = AtomModel::load(&path3, &dev).unwrap();
    let (s3, v3, _, _) = direct_tokens(&m3, ps3, &inputs, &pos, n);
    assert!(s0 == s3 && v0 == v3);
    let (s2, v2, _, _) = direct_tokens(&inner, ps, &inputs, &pos, n);
    assert_eq!(s0, s2);
    assert_eq!(v0, v2);

    // A model of another shape does not load.
    let mut ps = ParamStore::new(&dev, 0);
    ps.set_prefix("atom.");
    let mut c = tiny_config(0);
    c.backbone.hidden = 16;
    AtomModel::new(c, &mut ps).unwrap();
    let e = AtomModel::load_into(&path, &mut ps, "atom.").unwrap_err();
    assert!(format!("{e:#}").contains("m.safetensors"), "{e:#}");
    // No parameters under the prefix.
    let e = AtomModel::load_into(&path, &mut ps, "nothing.").unwrap_err();
    assert!(format!("{e:#}").contains("nothing."), "{e:#}");
    // Not an atom model.
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"not a model").unwrap();
    let e = AtomModel::load(&junk, &dev).err().unwrap();
    assert!(format!("{e:#}").contains("junk.safetensors"), "{e:#}");
}

#[test]
fn config_toml_and_errors() {
    let c = AtomModelConfig::from_toml(TINY_TOML).unwrap();
    assert_eq!(c, tiny_config(3));
    assert_eq!(
        AtomModelConfig::from_toml("").unwrap(),
        AtomModelConfig::default()
    );
    assert_eq!(
        AtomModelConfig::from_toml(&c.to_toml().unwrap()).unwrap(),
        c
    );
    let e = AtomModelConfig::from_toml("reduce = \"max\"").unwrap_err();
    assert!(format!("{e:#}").contains("max"), "{e:#}");
    let e = AtomModelConfig::from_toml("neighbor_cutoff = 3.0").unwrap_err();
    assert!(format!("{e:#}").contains("neighbor_cutoff"), "{e:#}");
    let e = AtomModelConfig::from_toml("[backbone]\nhidden = 0").unwrap_err();
    assert!(format!("{e:#}").contains("hidden"), "{e:#}");
    let e = AtomModelConfig::from_toml("colour = 1").unwrap_err();
    assert!(format!("{e:#}").contains("colour"), "{e:#}");
    // The example config in the repository parses (and is the default).
    let ex = AtomModelConfig::from_file(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/configs/atom.toml"),
    )
    .unwrap();
    assert_eq!(ex, AtomModelConfig::default());
}

#[test]
fn tokens_are_invariant_and_equivariant_under_rotation() {
    let dir = tmpdir("rotation");
    let ds = dataset(&dir, "ds", &[4], 2);
    let dev = Device::Cpu;
    let inputs = AtomInputs::new(&ds, &dev).unwrap();
    let (pos, n) = frames_of(&ds, 0);
    let mut rng = Rng::for_test("atoms_rotation");
    let rot = rng.rotation();
    let shift = [3.0, -7.0, 11.0];
    let moved: Vec<f32> = pos
        .chunks(3)
        .flat_map(|p| {
            (0..3).map(move |i| {
                (0..3).map(|k| rot[i][k] * p[k] as f64).sum::<f64>() as f32 + shift[i] as f32
            })
        })
        .collect();
    let (model, ps) = AtomModel::create(tiny_config(5), &dev).unwrap();
    let (s0, v0, ca0, ps) = direct_tokens(&model, ps, &inputs, &pos, n);
    let (s1, v1, ca1, _) = direct_tokens(&model, ps, &inputs, &moved, n);
    let scale = |x: &[f32]| x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let (ss, vs) = (scale(&s0), scale(&v0));
    for (a, b) in s0.iter().zip(&s1) {
        assert!((a - b).abs() <= 1e-4 * ss, "s changed: {a} vs {b}");
    }
    let h = model.hidden();
    for tok in 0..n * TOKENS {
        for c in 0..h {
            let v = |x: &[f32], k: usize| x[(tok * 3 + k) * h + c] as f64;
            for (i, row) in rot.iter().enumerate() {
                let want: f64 = (0..3).map(|k| row[k] * v(&v0, k)).sum();
                let got = v(&v1, i);
                assert!(
                    (got - want).abs() <= 1e-4 * vs as f64,
                    "v does not rotate: token {tok} channel {c}: {got} vs {want}"
                );
            }
        }
        for i in 0..3 {
            let want: f64 = (0..3)
                .map(|k| rot[i][k] * ca0[tok * 3 + k] as f64)
                .sum::<f64>()
                + shift[i];
            assert!((ca1[tok * 3 + i] as f64 - want).abs() < 1e-3);
        }
    }
    // The C-alpha rule: the CA atom of residues 0-2, the heavy-atom centroid of LIG.
    let ca_atoms: Vec<usize> = ds
        .atoms
        .iter()
        .enumerate()
        .filter(|(_, a)| a.name == "CA")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(ca_atoms.len(), 3);
    for (t, &a) in ca_atoms.iter().enumerate() {
        assert_eq!(&ca0[t * 3..t * 3 + 3], &pos[a * 3..a * 3 + 3]);
    }
    let lig: Vec<usize> = (0..HEAVY)
        .filter(|&a| ds.atoms[a].resname == "LIG")
        .collect();
    assert_eq!(lig.len(), 3);
    for k in 0..3 {
        let c = lig.iter().map(|&a| pos[a * 3 + k] as f64).sum::<f64>() / 3.0;
        assert!((ca0[3 * 3 + k] as f64 - c).abs() < 1e-5);
    }
}

fn featurize_args(ds: &Path, model: Option<&Path>, out: &Path) -> FeaturizeArgs {
    FeaturizeArgs {
        data: ds.to_path_buf(),
        model: model.map(Path::to_path_buf),
        config: None,
        seed: None,
        out: out.to_path_buf(),
        format: FeatureFormat::Store,
        dtype: FeatureDtype::F32,
        batch: Some(3),
        force: false,
    }
}

#[test]
fn featurize_store_npy_f16_agree_with_direct_tokens() {
    let dir = tmpdir("featurize");
    let ds = dataset(&dir, "ds", &[7, 4], 3);
    let dev = Device::Cpu;
    let (model, ps) = AtomModel::create(tiny_config(11), &dev).unwrap();
    let mpath = dir.join("model.safetensors");
    model.save(&ps, &mpath).unwrap();
    let inputs = AtomInputs::new(&ds, &dev).unwrap();
    let h = model.hidden();

    // Store, f32, through the binary (batches of 3 frames).
    let store_dir = dir.join("feat");
    let out = run_ok(
        bin()
            .args(["--device", "cpu", "featurize", "--batch", "3", "--data"])
            .arg(ds.dir())
            .arg("--model")
            .arg(&mpath)
            .arg("--out")
            .arg(&store_dir),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("featurized 11 frames"), "{stdout}");
    let fs = FeatureStore::open(&store_dir).unwrap();
    fs.check_dataset(&ds).unwrap();
    assert_eq!(
        (fs.tokens(), fs.channels(), fs.dtype()),
        (TOKENS, h, FeatureDtype::F32)
    );
    assert!(fs.has_ca());
    let bb = fs
        .manifest
        .backbone
        .as_ref()
        .expect("the model is recorded");
    assert!(bb.path.ends_with("model.safetensors"), "{}", bb.path);

    // npy, f32 and f16 (library calls).
    let npy_dir = dir.join("npy");
    let mut a = featurize_args(ds.dir(), Some(&mpath), &npy_dir);
    a.format = FeatureFormat::Npy;
    featurize(&a, &dev).unwrap();
    let f16_dir = dir.join("feat16");
    let mut a = featurize_args(ds.dir(), Some(&mpath), &f16_dir);
    a.dtype = FeatureDtype::F16;
    featurize(&a, &dev).unwrap();
    let fs16 = FeatureStore::open(&f16_dir).unwrap();
    assert_eq!(fs16.dtype(), FeatureDtype::F16);

    let mut ps = ps;
    for t in 0..2 {
        let (pos, n) = frames_of(&ds, t);
        let (shape, npy) = hiermd::npy::read_f32(npy_dir.join(format!("feat-{t:04}.npy"))).unwrap();
        assert_eq!(shape, vec![n, TOKENS, 4, h]);
        let (cshape, npy_ca) =
            hiermd::npy::read_f32(npy_dir.join(format!("ca-{t:04}.npy"))).unwrap();
        assert_eq!(cshape, vec![n, TOKENS, 3]);
        // The direct pass in the same batches of 3 frames: bit-identical.
        let a = ds.natoms() * 3;
        let mut start = 0;
        while start < n {
            let end = (start + 3).min(n);
            let (s, v, ca, back) =
                direct_tokens(&model, ps, &inputs, &pos[start * a..end * a], end - start);
            ps = back;
            for f in start..end {
                let fr = fs.frame(t, f);
                let mut row = vec![0f32; TOKENS * 4 * h];
                fr.to_f32(&mut row);
                let fr16 = fs16.frame(t, f);
                let mut row16 = vec![0f32; TOKENS * 4 * h];
                fr16.to_f32(&mut row16);
                for r in 0..TOKENS {
                    let tok = (f - start) * TOKENS + r;
                    for c in 0..h {
                        let want = [
                            s[tok * h + c],
                            v[(tok * 3) * h + c],
                            v[(tok * 3 + 1) * h + c],
                            v[(tok * 3 + 2) * h + c],
                        ];
                        for (k, &w) in want.iter().enumerate() {
                            let i = (r * 4 + k) * h + c;
                            assert_eq!(row[i], w, "store traj {t} frame {f} token {r} row {k}");
                            assert_eq!(npy[f * TOKENS * 4 * h + i], w, "npy traj {t} frame {f}");
                            assert_eq!(row16[i], half::f16::from_f32(w).to_f32());
                        }
                    }
                }
                let want_ca = &ca[(f - start) * TOKENS * 3..(f - start + 1) * TOKENS * 3];
                assert_eq!(fr.ca().unwrap(), want_ca);
                assert_eq!(&npy_ca[f * TOKENS * 3..(f + 1) * TOKENS * 3], want_ca);
            }
            start = end;
        }
        // The store's own npy export agrees with ours byte for byte.
        let export = dir.join(format!("export-{t}.npy"));
        fs.write_npy(t, &export).unwrap();
        assert_eq!(
            file_digest(&export),
            file_digest(npy_dir.join(format!("feat-{t:04}.npy")))
        );
        let export16 = dir.join(format!("export16-{t}.npy"));
        fs16.write_npy(t, &export16).unwrap();
        let mut a = featurize_args(ds.dir(), Some(&mpath), &dir.join(format!("npy16-{t}")));
        a.format = FeatureFormat::Npy;
        a.dtype = FeatureDtype::F16;
        featurize(&a, &dev).unwrap();
        assert_eq!(
            file_digest(&export16),
            file_digest(dir.join(format!("npy16-{t}/feat-{t:04}.npy")))
        );
    }

    // Determinism: a second run writes the same bytes; an existing output needs --force.
    let again = dir.join("feat-again");
    featurize(&featurize_args(ds.dir(), Some(&mpath), &again), &dev).unwrap();
    for t in 0..2 {
        let f = format!("feat-{t:04}.hmdf");
        assert_eq!(file_digest(store_dir.join(&f)), file_digest(again.join(&f)));
    }
    let e = featurize(&featurize_args(ds.dir(), Some(&mpath), &again), &dev).unwrap_err();
    assert!(format!("{e:#}").contains("--force"), "{e:#}");
    let mut a = featurize_args(ds.dir(), Some(&mpath), &again);
    a.force = true;
    featurize(&a, &dev).unwrap();

    // Without --model: a fresh model from --config/--seed, said so; equal to init-model's.
    let fresh = dir.join("fresh");
    let cfg = dir.join("atom.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let out = run_ok(
        bin()
            .args([
                "--device",
                "cpu",
                "featurize",
                "--seed",
                "11",
                "--batch",
                "3",
                "--data",
            ])
            .arg(ds.dir())
            .arg("--config")
            .arg(&cfg)
            .arg("--out")
            .arg(&fresh),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("freshly initialised"), "{stderr}");
    assert!(FeatureStore::open(&fresh)
        .unwrap()
        .manifest
        .backbone
        .is_none());
    for t in 0..2 {
        let f = format!("feat-{t:04}.hmdf");
        assert_eq!(
            digest(&std::fs::read(store_dir.join(&f)).unwrap()[4096..]),
            digest(&std::fs::read(fresh.join(&f)).unwrap()[4096..]),
            "a fresh model of seed 11 is the saved model of seed 11"
        );
    }
}

fn pretrain_args(ds: &Path, out: &Path, epochs: u64) -> PretrainArgs {
    PretrainArgs {
        data: ds.to_path_buf(),
        out: out.to_path_buf(),
        model: None,
        config: None,
        epochs,
        batch: Some(4),
        stride: None,
        max_frames: None,
        max_steps: None,
        lr: Some(3e-3),
        weight_decay: None,
        sigma: None,
        clip_norm: Some(10.0),
        seed: Some(5),
        val_fraction: None,
        keep: 2,
        resume: false,
    }
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn pretrain_learns_and_resumes_bit_identically() {
    let dir = tmpdir("pretrain");
    let ds = dataset(&dir, "ds", &[10, 10], 4);
    let dev = Device::Cpu;
    let cfg = dir.join("atom.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();

    // Uninterrupted: 4 epochs.
    let full = dir.join("full");
    let mut a = pretrain_args(ds.dir(), &full, 4);
    a.config = Some(cfg.clone());
    pretrain(&a, &dev).unwrap();
    let m = metrics(&full);
    assert_eq!(m.len(), 4);
    let loss = |e: &serde_json::Value, k: &str| e[k].as_f64().unwrap();
    // The validation loss (the same noise every epoch) falls epoch by epoch; the training loss
    // (fresh noise each step) falls on average.
    for w in m.windows(2) {
        assert!(loss(&w[1], "val_loss") < loss(&w[0], "val_loss"), "{m:?}");
    }
    let first = loss(&m[0], "train_loss");
    let last = (loss(&m[2], "train_loss") + loss(&m[3], "train_loss")) / 2.0;
    assert!(last < first, "train loss did not fall: {first} -> {last}");
    assert!(m.iter().all(|e| e["frames_per_s"].as_f64().unwrap() > 0.0));
    let (model, _) = AtomModel::load(&full.join("model.safetensors"), &dev).unwrap();
    assert_eq!(
        model.config(),
        &tiny_config(5),
        "--seed seeds the fresh model"
    );

    // Stopped after epoch 1 (through the binary), then resumed to 4.
    let part = dir.join("part");
    run_ok(
        bin()
            .args([
                "--device", "cpu", "pretrain", "--epochs", "1", "--batch", "4", "--lr", "3e-3",
            ])
            .args(["--clip-norm", "10", "--seed", "5", "--keep", "2", "--data"])
            .arg(ds.dir())
            .arg("--config")
            .arg(&cfg)
            .arg("--out")
            .arg(&part),
    );
    assert_eq!(metrics(&part).len(), 1);
    // Without --resume an existing run is refused; with other settings a resume is refused.
    let e = pretrain(&pretrain_args(ds.dir(), &part, 4), &dev).unwrap_err();
    assert!(format!("{e:#}").contains("--resume"), "{e:#}");
    let mut a = pretrain_args(ds.dir(), &part, 4);
    a.resume = true;
    a.sigma = Some(0.5);
    let e = pretrain(&a, &dev).unwrap_err();
    assert!(format!("{e:#}").contains("--sigma"), "{e:#}");
    let mut a = pretrain_args(ds.dir(), &part, 4);
    a.resume = true;
    pretrain(&a, &dev).unwrap();
    assert_eq!(
        file_digest(full.join("model.safetensors")),
        file_digest(part.join("model.safetensors")),
        "a resumed run must end bit-identical to an uninterrupted one"
    );
    let mp = metrics(&part);
    assert_eq!(mp.len(), 4);
    for (x, y) in m.iter().zip(&mp) {
        assert_eq!(x["train_loss"], y["train_loss"]);
        assert_eq!(x["val_loss"], y["val_loss"]);
    }

    // Killed right after the checkpoint of epoch 2 (through the binary), then resumed to 4.
    let killed = dir.join("killed");
    let out = bin()
        .env(PRETRAIN_FAULT_ABORT_ENV, "2")
        .args([
            "--device", "cpu", "pretrain", "--epochs", "4", "--batch", "4", "--lr", "3e-3",
        ])
        .args(["--clip-norm", "10", "--seed", "5", "--keep", "2", "--data"])
        .arg(ds.dir())
        .arg("--config")
        .arg(&cfg)
        .arg("--out")
        .arg(&killed)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!killed.join("model.safetensors").exists());
    assert_eq!(metrics(&killed).len(), 2);
    run_ok(
        bin()
            .args([
                "--device", "cpu", "pretrain", "--epochs", "4", "--resume", "--out",
            ])
            .arg(&killed)
            .arg("--data")
            .arg(ds.dir()),
    );
    assert_eq!(
        file_digest(full.join("model.safetensors")),
        file_digest(killed.join("model.safetensors")),
        "a killed and resumed run must end bit-identical to an uninterrupted one"
    );
    assert_eq!(metrics(&killed).len(), 4);

    // Pretraining from a saved model: the first epoch starts from its weights.
    let from = dir.join("from");
    let mut a = pretrain_args(ds.dir(), &from, 1);
    a.model = Some(full.join("model.safetensors"));
    pretrain(&a, &dev).unwrap();
    let l = loss(&metrics(&from)[0], "train_loss");
    assert!(
        l < first,
        "starting from the pretrained model: {l} vs fresh {first}"
    );
}

#[test]
fn pretrain_stride_max_frames_max_steps_and_the_file_seed() {
    // Issue 22: a large dataset can be pretrained on a subset for a bounded number of steps;
    // the batch follows the atoms per frame; the configuration file's seed is kept unless
    // --seed is given.
    let dir = tmpdir("subset");
    let ds = dataset(&dir, "ds", &[30, 30], 6);
    let cfg = dir.join("atom.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let out = dir.join("run");
    let run = run_ok(
        bin()
            .args([
                "--device", "cpu", "pretrain", "--epochs", "5", "--stride", "2",
            ])
            .args([
                "--max-frames",
                "6",
                "--max-steps",
                "3",
                "--batch",
                "4",
                "--data",
            ])
            .arg(ds.dir())
            .arg("--config")
            .arg(&cfg)
            .arg("--out")
            .arg(&out),
    );
    let err = String::from_utf8_lossy(&run.stderr);
    // 2 x 15 strided frames, 12 of them training (val fraction 0.2): 6 kept, evenly spaced.
    assert!(
        err.contains("6 training and 2 validation frames (stride 2, at most 6 for training)"),
        "{err}"
    );
    assert!(
        err.contains("stopped after 3 steps (--max-steps), in epoch 2"),
        "{err}"
    );
    let m = metrics(&out);
    assert_eq!(m.len(), 2, "{m:?}");
    assert_eq!(m[1]["steps"].as_u64(), Some(3));
    let (model, _) = AtomModel::load(&out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(model.config(), &tiny_config(3), "the file's seed 3 is kept");
    // The default batch: small frames, 8 of them.
    let out2 = dir.join("run2");
    let run = run_ok(
        bin()
            .args([
                "--device",
                "cpu",
                "pretrain",
                "--epochs",
                "1",
                "--max-steps",
                "1",
            ])
            .arg("--data")
            .arg(ds.dir())
            .arg("--config")
            .arg(&cfg)
            .arg("--out")
            .arg(&out2),
    );
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("batch 8 frames") && err.contains("16384 atoms"),
        "{err}"
    );
    for bad in [
        ["--stride", "0"],
        ["--max-frames", "0"],
        ["--max-steps", "0"],
    ] {
        let o = bin()
            .args(["--device", "cpu", "pretrain", bad[0], bad[1], "--data"])
            .arg(ds.dir())
            .arg("--out")
            .arg(dir.join("bad"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(bad[0]), "{e}");
    }
}

#[test]
fn init_model_command() {
    let dir = tmpdir("init");
    let cfg = dir.join("atom.toml");
    std::fs::write(&cfg, TINY_TOML).unwrap();
    let path = dir.join("m.safetensors");
    let out = run_ok(
        bin()
            .args(["--device", "cpu", "init-model", "--seed", "9", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&path),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (model, ps) = AtomModel::load(&path, &Device::Cpu).unwrap();
    assert_eq!(model.config(), &tiny_config(9));
    assert!(
        stdout.contains(&format!("{} parameters", ps.numel())),
        "{stdout}"
    );
    // The same seed gives the same file; the file is not replaced without --force.
    let err = run_err(
        bin()
            .args(["--device", "cpu", "init-model", "--seed", "9", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&path),
    );
    assert!(err.contains("--force"), "{err}");
    let again = dir.join("m2.safetensors");
    run_ok(
        bin()
            .args(["--device", "cpu", "init-model", "--seed", "9", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&again),
    );
    assert_eq!(file_digest(&path), file_digest(&again));
    // Defaults without a config.
    let def = dir.join("default.safetensors");
    run_ok(
        bin()
            .args(["--device", "cpu", "init-model", "--out"])
            .arg(&def),
    );
    assert_eq!(
        AtomModel::read_config(&def).unwrap(),
        AtomModelConfig::default()
    );
    // A bad config names the file and the key.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[backbone]\nhiden = 8\n").unwrap();
    let err = run_err(
        bin()
            .args(["--device", "cpu", "init-model", "--config"])
            .arg(&bad)
            .arg("--out")
            .arg(dir.join("x.safetensors")),
    );
    assert!(err.contains("bad.toml") && err.contains("hiden"), "{err}");
}

#[test]
fn command_line_errors_name_the_flag_or_file() {
    let dir = tmpdir("errors");
    let ds = dataset(&dir, "ds", &[2], 5);
    let missing = dir.join("no-such-model.safetensors");
    let err = run_err(
        bin()
            .args(["--device", "cpu", "featurize", "--data"])
            .arg(ds.dir())
            .arg("--model")
            .arg(&missing)
            .arg("--out")
            .arg(dir.join("f")),
    );
    assert!(
        err.contains("--model") && err.contains("no-such-model.safetensors"),
        "{err}"
    );
    assert!(!dir.join("f").exists());
    let err = run_err(
        bin()
            .args(["--device", "cpu", "featurize", "--format", "hdf5", "--data"])
            .arg(ds.dir())
            .arg("--out")
            .arg(dir.join("f")),
    );
    assert!(err.contains("--format") && err.contains("hdf5"), "{err}");
    let err = run_err(
        bin()
            .args(["--device", "cpu", "featurize", "--dtype", "f64", "--data"])
            .arg(ds.dir())
            .arg("--out")
            .arg(dir.join("f")),
    );
    assert!(err.contains("--dtype"), "{err}");
    let err = run_err(
        bin()
            .args(["--device", "cpu", "featurize", "--data"])
            .arg(dir.join("nowhere"))
            .arg("--out")
            .arg(dir.join("f")),
    );
    assert!(err.contains("--data") && err.contains("nowhere"), "{err}");
    let err = run_err(
        bin()
            .args(["--device", "cpu", "pretrain", "--epochs", "1", "--data"])
            .arg(ds.dir())
            .arg("--model")
            .arg(&missing)
            .arg("--out")
            .arg(dir.join("run")),
    );
    assert!(
        err.contains("--model") && err.contains("no-such-model.safetensors"),
        "{err}"
    );
    let err = run_err(
        bin()
            .args(["--device", "cpu", "pretrain", "--sigma=-1", "--data"])
            .arg(ds.dir())
            .arg("--out")
            .arg(dir.join("run")),
    );
    assert!(err.contains("--sigma"), "{err}");

    // A dataset without frames: the imported one with its trajectories taken out of the manifest
    // (import itself refuses empty trajectories).
    let nofr = dir.join("nofr");
    std::fs::create_dir_all(&nofr).unwrap();
    std::fs::copy(ds.dir().join("atoms.tsv"), nofr.join("atoms.tsv")).unwrap();
    let manifest = std::fs::read_to_string(ds.dir().join("manifest.toml")).unwrap();
    let head = &manifest[..manifest.find("[[trajectories]]").unwrap()];
    let head = head.replace("total_frames = 2", "total_frames = 0\ntrajectories = []");
    std::fs::write(nofr.join("manifest.toml"), head).unwrap();
    assert_eq!(Dataset::open(&nofr).unwrap().trajectories.len(), 0);
    let err = run_err(
        bin()
            .args(["--device", "cpu", "featurize", "--data"])
            .arg(&nofr)
            .arg("--out")
            .arg(dir.join("f")),
    );
    assert!(err.contains("no frames") && err.contains("--data"), "{err}");
    let err = run_err(
        bin()
            .args(["--device", "cpu", "pretrain", "--data"])
            .arg(&nofr)
            .arg("--out")
            .arg(dir.join("run")),
    );
    assert!(err.contains("no frames") && err.contains("--data"), "{err}");
    assert!(!dir.join("f").exists() && !dir.join("run").exists());
}
