//! Issue 16, items 1, 4 and 6: hiermd never destroys what it did not write. `--force` replaces
//! only a hiermd folder of the kind the command writes, and only once the new one is complete
//! (a failed or killed replacement keeps the old one); no output may be, contain or lie inside an
//! input; export and transform never replace a file without `--force`; temporaries of killed
//! processes are removed by the next command writing beside them; a run folder appears only once
//! its configuration and data are checked; flags override the configuration file, and negative
//! numbers reach the checks instead of being taken for flags. Most cases run the `hiermd`
//! binary, as a user would; each checks that what the user had is still there, byte for byte.

mod common;

use common::peptide::{make_data, tmpdir};
use hiermd::output::{clean_stale, DirOutput, OutputKind, ReplaceFault};
use hiermd::store::{Dataset, FeatureDtype, FeatureSettings, FeatureWriter};
use hiermd::testing::Rng;
use hiermd::workflow::config::RunConfig;
use hiermd::workflow::train::{train, TrainOptions};
use hiermd::Device;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn dir_for(name: &str) -> PathBuf {
    tmpdir("safety", name)
}

/// Runs `hiermd --device cpu ARGS`.
fn hiermd<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hiermd"))
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .expect("run hiermd")
}

/// Asserts the command failed and its error contains every needle; returns the error text.
fn fails(out: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected a failure, got success:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "error lacks {n:?}:\n{err}");
    }
    err
}

/// Asserts the command succeeded.
fn succeeds(out: &Output) {
    assert!(
        out.status.success(),
        "failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every file under `root` (relative path -> bytes), to show that nothing changed.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The id of a process that has ended (and was reaped): its temporaries are stale.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().expect("spawn true");
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// `import` arguments for the generated inputs in `dir`.
fn import_args(dir: &Path, traj: &str, out: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "import".into(),
        "--top".into(),
        dir.join("top.pdb").into(),
        "--traj".into(),
        dir.join(traj).into(),
        "--out".into(),
        out.into(),
        "--dt".into(),
        "1".into(),
    ]
}

// ------------------------------------------------------------------ 1. replace only our own --

#[test]
fn import_force_never_deletes_its_inputs() {
    let dir = dir_for("import-inputs");
    make_data(&dir, &[12], 1);
    // The user's folder: the inputs and a notes file.
    let inputs = dir.join("inputs");
    std::fs::create_dir(&inputs).unwrap();
    for f in ["top.pdb", "traj0.pdb"] {
        std::fs::copy(dir.join(f), inputs.join(f)).unwrap();
    }
    std::fs::write(inputs.join("notes.txt"), "three years of work").unwrap();
    let before = snapshot(&inputs);
    let mut args = import_args(&inputs, "traj0.pdb", &inputs);
    args.push("--force".into());
    fails(&hiermd(&args), &["contains the input", "top.pdb"]);
    assert_eq!(
        snapshot(&inputs),
        before,
        "the inputs and the notes are intact"
    );
    // The output may not be an input file either.
    let args = import_args(&inputs, "traj0.pdb", &inputs.join("traj0.pdb"));
    fails(&hiermd(&args), &["is the input trajectory"]);
    assert_eq!(snapshot(&inputs), before);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn force_never_replaces_a_foreign_folder_or_file() {
    let dir = dir_for("foreign");
    make_data(&dir, &[12], 2);
    let thesis = dir.join("thesis");
    std::fs::create_dir(&thesis).unwrap();
    std::fs::write(thesis.join("thesis.tex"), "\\chapter{Results}").unwrap();
    std::fs::write(thesis.join("config.toml"), "title = \"mine\"").unwrap();
    let notes = dir.join("notes.txt");
    std::fs::write(&notes, "keep me").unwrap();
    let before = (snapshot(&thesis), std::fs::read(&notes).unwrap());
    let check = || {
        assert_eq!(
            (snapshot(&thesis), std::fs::read(&notes).unwrap()),
            before,
            "the user's files are intact"
        );
    };

    // import: without --force it says what is there; with it, still refused.
    let args = import_args(&dir, "traj0.pdb", &thesis);
    fails(&hiermd(&args), &["already exists", "not a hiermd folder"]);
    let mut args = import_args(&dir, "traj0.pdb", &thesis);
    args.push("--force".into());
    fails(
        &hiermd(&args),
        &["not a hiermd folder", "thesis.tex", "never anything else"],
    );
    let mut args = import_args(&dir, "traj0.pdb", &notes);
    args.push("--force".into());
    fails(&hiermd(&args), &["is a file"]);
    check();

    // train, featurize and pretrain: the same folder is refused.
    let data = dir.join("data");
    let out = hiermd(&[
        "train".as_ref(),
        "--run".as_ref(),
        thesis.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--lag".as_ref(),
        "1".as_ref(),
        "--force".as_ref(),
    ]);
    fails(&out, &["not a hiermd folder", "training run"]);
    let out = hiermd(&[
        "featurize".as_ref(),
        "--data".as_ref(),
        data.as_os_str(),
        "--out".as_ref(),
        thesis.as_os_str(),
        "--force".as_ref(),
    ]);
    fails(&out, &["not a hiermd folder", "feature store"]);
    let out = hiermd(&[
        "pretrain".as_ref(),
        "--data".as_ref(),
        data.as_os_str(),
        "--out".as_ref(),
        thesis.as_os_str(),
        "--epochs".as_ref(),
        "1".as_ref(),
    ]);
    fails(&out, &["not a hiermd pretraining run"]);
    check();

    // A hiermd dataset with the user's file inside: --force will not delete the file.
    std::fs::write(data.join("my-notes.txt"), "mine").unwrap();
    let ds_before = snapshot(&data);
    let mut args = import_args(&dir, "traj0.pdb", &data);
    args.push("--force".into());
    fails(&hiermd(&args), &["my-notes.txt", "did not write"]);
    assert_eq!(snapshot(&data), ds_before);
    // A dataset is not a training run: --force does not turn one into the other.
    std::fs::remove_file(data.join("my-notes.txt")).unwrap();
    let other = dir.join("other");
    succeeds(&hiermd(&import_args(&dir, "traj0.pdb", &other)));
    let other_before = snapshot(&other);
    let out = hiermd(&[
        "train".as_ref(),
        "--run".as_ref(),
        other.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--lag".as_ref(),
        "1".as_ref(),
        "--force".as_ref(),
    ]);
    fails(&out, &["is a hiermd dataset, not a hiermd training run"]);
    assert_eq!(snapshot(&other), other_before);
    Dataset::open(&other).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn import_force_replaces_a_dataset_only_once_the_new_one_is_whole() {
    let dir = dir_for("import-replace");
    make_data(&dir, &[12, 9], 3);
    let ds = dir.join("ds");
    succeeds(&hiermd(&import_args(&dir, "traj0.pdb", &ds)));
    let first = snapshot(&ds);
    // Without --force: refused, and says what it is.
    fails(
        &hiermd(&import_args(&dir, "traj1.pdb", &ds)),
        &["already exists", "hiermd dataset", "--force"],
    );
    // A replacement that fails halfway (a trajectory that is not one) keeps the old dataset.
    std::fs::write(dir.join("broken.pdb"), "MODEL 1\nATOM garbage\n").unwrap();
    let mut args = import_args(&dir, "traj1.pdb", &ds);
    args.extend([
        "--traj".into(),
        dir.join("broken.pdb").into(),
        "--force".into(),
    ]);
    fails(&hiermd(&args), &["broken.pdb"]);
    assert_eq!(
        snapshot(&ds),
        first,
        "a failed replacement keeps the old dataset"
    );
    Dataset::open(&ds).unwrap();
    // A good replacement goes through, and leaves nothing beside it.
    let names_before = names(&dir);
    let mut args = import_args(&dir, "traj1.pdb", &ds);
    args.push("--force".into());
    succeeds(&hiermd(&args));
    let now = Dataset::open(&ds).unwrap();
    assert_eq!(now.trajectories[0].frames(), 9);
    assert_eq!(names(&dir), names_before, "no temporary or old folder left");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn featurize_and_train_refuse_their_own_dataset_as_output() {
    let dir = dir_for("own-dataset");
    let data = make_data(&dir, &[12], 4);
    let before = snapshot(&data);
    for out in [data.clone(), data.join("features")] {
        let o = hiermd(&[
            "featurize".as_ref(),
            "--data".as_ref(),
            data.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
            "--force".as_ref(),
        ]);
        fails(&o, &["the input dataset"]);
    }
    let o = hiermd(&[
        "train".as_ref(),
        "--run".as_ref(),
        data.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--lag".as_ref(),
        "1".as_ref(),
        "--force".as_ref(),
    ]);
    fails(&o, &["is the input data.dataset"]);
    assert_eq!(snapshot(&data), before, "the dataset is intact");
    Dataset::open(&data).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

// ------------------------------------------------------------------------------- file outputs --

#[test]
fn export_never_writes_into_the_dataset() {
    let dir = dir_for("export-into");
    let data = make_data(&dir, &[12], 5);
    let before = snapshot(&data);
    for (format, file) in [
        ("npy", "traj-0000.hmdt"),
        ("xyz", "manifest.toml"),
        ("pdb", "atoms.tsv"),
        ("xyz", "new.xyz"),
    ] {
        for force in [false, true] {
            let out = data.join(file);
            let mut args: Vec<&std::ffi::OsStr> = vec![
                "export".as_ref(),
                data.as_os_str(),
                "--format".as_ref(),
                format.as_ref(),
                "--out".as_ref(),
                out.as_os_str(),
            ];
            if force {
                args.push("--force".as_ref());
            }
            fails(&hiermd(&args), &["the input dataset"]);
        }
    }
    assert_eq!(snapshot(&data), before, "the stored files are intact");
    Dataset::open(&data).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn export_replaces_a_file_only_with_force_and_atomically() {
    let dir = dir_for("export-force");
    let data = make_data(&dir, &[12], 6);
    let out = dir.join("frames.xyz");
    std::fs::write(&out, "precious").unwrap();
    let args = |force: bool| {
        let mut a: Vec<std::ffi::OsString> = vec![
            "export".into(),
            data.clone().into(),
            "--format".into(),
            "xyz".into(),
            "--out".into(),
            out.clone().into(),
        ];
        if force {
            a.push("--force".into());
        }
        a
    };
    fails(&hiermd(&args(false)), &["already exists", "--force"]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "precious");
    let before = names(&dir);
    succeeds(&hiermd(&args(true)));
    assert!(std::fs::read_to_string(&out).unwrap().contains("frame 11"));
    assert_eq!(names(&dir), before, "no temporary file left beside it");
    // A folder at --out is never replaced by a file.
    let folder = dir.join("folder.npy");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("inside"), "x").unwrap();
    let o = hiermd(&[
        "export".as_ref(),
        data.as_os_str(),
        "--format".as_ref(),
        "npy".as_ref(),
        "--out".as_ref(),
        folder.as_os_str(),
        "--force".as_ref(),
    ]);
    fails(&o, &["is a folder"]);
    assert_eq!(std::fs::read_to_string(folder.join("inside")).unwrap(), "x");
    let _ = std::fs::remove_dir_all(dir);
}

// ------------------------------------------------------------------------------- runs --

const H: usize = 8;

/// A dataset with random features (enough for a VAMPnet to train on) and a run configuration.
fn run_fixture(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let data = make_data(dir, &[90, 70], 7);
    let ds = Dataset::open(&data).unwrap();
    let features = dir.join("features");
    let settings = FeatureSettings {
        channels: H,
        dtype: FeatureDtype::F32,
        ca_positions: true,
        ..Default::default()
    };
    let mut rng = Rng::new(7);
    let r = ds.manifest.tokens;
    let mut w = FeatureWriter::create(&ds, &features, &settings).unwrap();
    for (t, traj) in ds.trajectories.iter().enumerate() {
        let n = traj.frames();
        let s = rng.normal_vec(n * r * H, 1.0);
        let v = rng.normal_vec(n * r * 3 * H, 1.0);
        let ca: Vec<f32> = (0..n * r * 3).map(|i| (i % (r * 3)) as f32).collect();
        w.append_frames(t, &s, &v, Some(&ca)).unwrap();
    }
    w.finish().unwrap();
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[data]\ndataset = {:?}\nfeatures = {:?}\nlag = 2\n\n[model]\nhidden = {H}\nheads = \
             1\nblocks = 1\n\n[objective]\nkind = \"vamp\"\noutputs = 2\n\n[train]\nepochs = \
             1\nbatch = 32\npatience = 0\n",
            data.display().to_string(),
            features.display().to_string()
        ),
    )
    .unwrap();
    (data, features, config)
}

fn train_cli(config: &Path, run: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "train".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
        "--run".as_ref(),
        run.as_os_str(),
    ];
    args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
    hiermd(&args)
}

#[test]
fn runs_are_replaced_only_whole_and_transform_never_overwrites() {
    let dir = dir_for("runs");
    let (_, _, config) = run_fixture(&dir);
    let run = dir.join("run");

    // Item 4: a configuration or data mistake leaves no run folder behind.
    fails(&train_cli(&config, &run, &["--lag", "100000"]), &["lag"]);
    assert!(
        !run.exists(),
        "no run folder after a rejected configuration"
    );
    fails(&train_cli(&config, &run, &["--lr", "-1"]), &["lr"]);
    assert!(!run.exists());
    assert_eq!(
        names(&dir),
        [
            "data",
            "features",
            "run.toml",
            "top.pdb",
            "traj0.pdb",
            "traj1.pdb"
        ]
    );

    succeeds(&train_cli(&config, &run, &[]));
    let first = snapshot(&run);
    fails(
        &train_cli(&config, &run, &[]),
        &["already exists", "--force", "--resume"],
    );
    // A replacement that fails (the lag is too long for the data) keeps the old run whole.
    fails(
        &train_cli(&config, &run, &["--lag", "100000", "--force"]),
        &["lag"],
    );
    assert_eq!(
        snapshot(&run),
        first,
        "a failed replacement keeps the old run"
    );
    // The configuration file inside the run is an input of the new run.
    fails(
        &hiermd(&[
            "train".as_ref(),
            "--config".as_ref(),
            run.join("config.toml").as_os_str(),
            "--run".as_ref(),
            run.as_os_str(),
            "--force".as_ref(),
        ]),
        &["contains the input configuration"],
    );
    assert_eq!(snapshot(&run), first);
    // A user's file in the run folder stops --force.
    std::fs::write(run.join("notes.md"), "mine").unwrap();
    fails(
        &train_cli(&config, &run, &["--force", "--seed", "5"]),
        &["notes.md"],
    );
    std::fs::remove_file(run.join("notes.md")).unwrap();
    // A successful replacement: a new model in place, nothing left beside it.
    let before = names(&dir);
    succeeds(&train_cli(&config, &run, &["--force", "--seed", "5"]));
    assert_eq!(names(&dir), before, "no temporary or old run left");
    assert_ne!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        first[Path::new("model.safetensors")],
        "the run was replaced (another seed)"
    );

    // transform: never over the run's model or configuration, with or without --force.
    let model = std::fs::read(run.join("model.safetensors")).unwrap();
    for (target, force) in [
        ("model.safetensors", false),
        ("model.safetensors", true),
        ("config.toml", true),
    ] {
        let out = run.join(target);
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "transform".as_ref(),
            run.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ];
        if force {
            args.push("--force".as_ref());
        }
        fails(&hiermd(&args), &["is the input"]);
    }
    assert_eq!(std::fs::read(run.join("model.safetensors")).unwrap(), model);
    run_opens(&run);
    // ... and over an existing file only with --force.
    let npy = dir.join("chi.npy");
    let t = |force: bool| {
        let mut a: Vec<&std::ffi::OsStr> = vec![
            "transform".as_ref(),
            run.as_os_str(),
            "--out".as_ref(),
            npy.as_os_str(),
        ];
        if force {
            a.push("--force".as_ref());
        }
        hiermd(&a)
    };
    succeeds(&t(false));
    let first_npy = std::fs::read(&npy).unwrap();
    std::fs::write(&npy, "precious").unwrap();
    fails(&t(false), &["already exists", "--force"]);
    assert_eq!(std::fs::read(&npy).unwrap(), b"precious");
    succeeds(&t(true));
    assert_eq!(std::fs::read(&npy).unwrap(), first_npy);

    // Item 4: `--resume` removes what killed processes left in the run and its checkpoints.
    let dead = dead_pid();
    let stale = [
        run.join(format!(".metrics.jsonl.hiermd-{dead}-0")),
        run.join("checkpoints")
            .join(format!(".epoch-000002.ckpt-{dead}")),
    ];
    std::fs::write(&stale[0], "partial").unwrap();
    std::fs::create_dir(&stale[1]).unwrap();
    succeeds(&hiermd(&[
        "train".as_ref(),
        "--resume".as_ref(),
        "--run".as_ref(),
        run.as_os_str(),
    ]));
    for p in &stale {
        assert!(!p.exists(), "{} was left", p.display());
    }

    // analyze: writes only a new folder or its own earlier analysis, never over the run.
    let analyze = |out: Option<&Path>| {
        let mut a: Vec<&std::ffi::OsStr> = vec![
            "analyze".as_ref(),
            run.as_os_str(),
            "--attention-frames".as_ref(),
            "4".as_ref(),
            // The fixture's trajectories are short: lags that fit their validation parts.
            "--lags".as_ref(),
            "1,2".as_ref(),
        ];
        if let Some(o) = out {
            a.extend(["--out".as_ref(), o.as_os_str()]);
        }
        hiermd(&a)
    };
    let before = snapshot(&run);
    fails(&analyze(Some(&run)), &["contains the input"]);
    fails(&analyze(Some(&dir.join("data"))), &["dataset"]);
    assert_eq!(snapshot(&run), before);
    let mine = dir.join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("thesis.tex"), "years of work").unwrap();
    fails(
        &analyze(Some(&mine)),
        &["thesis.tex", "not a hiermd analysis folder"],
    );
    assert_eq!(names(&mine), ["thesis.tex"]);
    succeeds(&analyze(None));
    let a = run.join("analysis");
    assert!(a.join("analysis.json").is_file() && a.join("index.html").is_file());
    let json = std::fs::read_to_string(a.join("analysis.json")).unwrap();
    assert!(
        !json.contains(".analysis-"),
        "figures are named where they end up"
    );
    // Again: the earlier analysis is replaced whole; a user's file in it stops the replacement.
    succeeds(&analyze(None));
    std::fs::write(a.join("notes.md"), "mine").unwrap();
    let kept = snapshot(&a);
    fails(&analyze(None), &["notes.md"]);
    assert_eq!(snapshot(&a), kept);
    assert!(
        names(&run).iter().all(|n| !n.starts_with('.')),
        "{:?}",
        names(&run)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn init_model_and_feature_exports_never_overwrite_their_inputs() {
    let dir = dir_for("model-npy");
    let (_, features, _) = run_fixture(&dir);
    let before = snapshot(&features);
    let e = hiermd::store::write_npy(&features, 0, &features.join("feat-0000.hmdf")).unwrap_err();
    assert!(
        format!("{e:#}").contains("lies inside the input feature store"),
        "{e:#}"
    );
    assert_eq!(snapshot(&features), before);
    hiermd::store::FeatureStore::open(&features).unwrap();
    // Outside the store it writes, atomically (nothing left beside the file).
    let listing = names(&dir);
    hiermd::store::write_npy(&features, 1, &dir.join("f1.npy")).unwrap();
    let mut expect = listing.clone();
    expect.push("f1.npy".into());
    expect.sort();
    assert_eq!(names(&dir), expect);

    let config = dir.join("atom.toml");
    std::fs::write(&config, "[backbone]\nhidden = 8\nlayers = 1\n").unwrap();
    let init = |out: &Path, force: bool| {
        let mut a: Vec<&std::ffi::OsStr> = vec![
            "init-model".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ];
        if force {
            a.push("--force".as_ref());
        }
        hiermd(&a)
    };
    fails(&init(&config, true), &["is the input configuration"]);
    fails(&init(&features, true), &["is a folder"]);
    assert_eq!(snapshot(&features), before);
    let model = dir.join("m.safetensors");
    std::fs::write(&model, "precious").unwrap();
    fails(&init(&model, false), &["already exists", "--force"]);
    assert_eq!(std::fs::read(&model).unwrap(), b"precious");
    succeeds(&init(&model, true));
    assert_ne!(std::fs::read(&model).unwrap(), b"precious");
    let _ = std::fs::remove_dir_all(dir);
}

/// Opening a run is what analyze and transform do: the run must still open after refusals.
fn run_opens(dir: &Path) {
    hiermd::workflow::run::Run::open(dir, &Device::Cpu).expect("the run still opens");
}

#[test]
fn a_failing_training_replacement_keeps_the_old_run_through_the_library() {
    let dir = dir_for("train-lib");
    let (_, _, config) = run_fixture(&dir);
    let cfg = RunConfig::load(Some(&config), &[]).unwrap();
    let run = dir.join("run");
    train(&cfg, &run, &Device::Cpu, &TrainOptions::default()).unwrap();
    let first = snapshot(&run);
    // The new run fails in its first epoch (the test hook): the old one is untouched, and the
    // temporary folder of the new one is gone.
    let before = names(&dir);
    let e = train(
        &cfg,
        &run,
        &Device::Cpu,
        &TrainOptions {
            force: true,
            abort_after_steps: Some(1),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(format!("{e:#}").contains("aborted"), "{e:#}");
    assert_eq!(snapshot(&run), first);
    assert_eq!(names(&dir), before);
    let _ = std::fs::remove_dir_all(dir);
}

// ------------------------------------------------------------------ interrupted replacements --

/// Replaces the dataset `target` with a copy of `source` through [`DirOutput`], failing as
/// `fault` says.
fn replace_with_copy(
    source: &Path,
    target: &Path,
    fault: Option<ReplaceFault>,
) -> anyhow::Result<()> {
    let mut out = DirOutput::check(target, OutputKind::Dataset, true, &[("source", source)])?;
    assert!(out.replaces());
    let tmp = out.begin()?.to_path_buf();
    for e in std::fs::read_dir(source)?.flatten() {
        std::fs::copy(e.path(), tmp.join(e.file_name()))?;
    }
    out.commit_with(fault)
}

#[test]
fn an_interrupted_replacement_keeps_the_old_copy() {
    let dir = dir_for("interrupted");
    let data = make_data(&dir, &[12], 8);
    let other = dir.join("other");
    succeeds(&hiermd(&import_args(&dir, "traj0.pdb", &other)));
    let before = snapshot(&data);
    let listing = names(&dir);
    let e =
        replace_with_copy(&other, &data, Some(ReplaceFault::ErrorAfterOldMovedAside)).unwrap_err();
    assert!(format!("{e:#}").contains("the old one is kept"), "{e:#}");
    assert_eq!(snapshot(&data), before, "the old dataset is back, whole");
    assert_eq!(names(&dir), listing, "no temporary or old folder left");
    Dataset::open(&data).unwrap();
    // Without a fault the same replacement goes through.
    replace_with_copy(&other, &data, None).unwrap();
    assert_eq!(snapshot(&data), snapshot(&other));
    assert_eq!(names(&dir), listing);
    let _ = std::fs::remove_dir_all(dir);
}

const CHILD_ENV: &str = "HIERMD_DATA_SAFETY_TEST_CHILD";

/// Runs only as the child of `a_killed_replacement_is_put_back_by_the_next_command`: replaces a
/// dataset and dies (abort, as a kill) between moving the old one aside and renaming the new in.
#[test]
fn child_replacement_killed_midway() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (source, target) = spec.split_once('\n').unwrap();
    let _ = replace_with_copy(
        Path::new(source),
        Path::new(target),
        Some(ReplaceFault::AbortAfterOldMovedAside),
    );
    panic!("the replacement was not aborted");
}

#[test]
fn a_killed_replacement_is_put_back_by_the_next_command() {
    let dir = dir_for("killed");
    let data = make_data(&dir, &[12], 9);
    let other = dir.join("other");
    succeeds(&hiermd(&import_args(&dir, "traj0.pdb", &other)));
    let before = snapshot(&data);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_replacement_killed_midway",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(
            CHILD_ENV,
            format!("{}\n{}", other.display(), data.display()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let status = child.wait().unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(6), "killed by abort(): {status:?}");
    }
    #[cfg(not(unix))]
    assert!(!status.success());
    // Killed between the renames: the old dataset sits aside, the new one in its temporary.
    assert!(!data.exists());
    let aside = dir.join(format!(".data.import-{pid}.old"));
    assert_eq!(snapshot(&aside), before);
    assert!(dir.join(format!(".data.import-{pid}")).exists());
    // The next command writing in this folder puts the old dataset back and clears the rest.
    let listing_after = {
        succeeds(&hiermd(&import_args(&dir, "traj0.pdb", &dir.join("third"))));
        names(&dir)
    };
    assert_eq!(snapshot(&data), before, "the old dataset is back, whole");
    Dataset::open(&data).unwrap();
    assert!(
        listing_after.iter().all(|n| !n.starts_with('.')),
        "no temporaries left: {listing_after:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------- 4. no leftovers --

#[test]
fn stale_temporaries_of_dead_processes_are_removed() {
    let dir = dir_for("stale");
    make_data(&dir, &[12], 10);
    let dead = dead_pid();
    let alive = std::process::id(); // this test process: alive, and not the command's own
    let stale_import = dir.join(format!(".ds.import-{dead}"));
    std::fs::create_dir(&stale_import).unwrap();
    std::fs::write(stale_import.join("traj-0000.hmdt"), vec![0u8; 1 << 16]).unwrap();
    let stale_file = dir.join(format!(".x.npy.hiermd-{dead}-3"));
    std::fs::write(&stale_file, "partial").unwrap();
    // An old copy whose replacement finished (its target exists) is litter too.
    let stale_old = dir.join(format!(".data.features-{dead}.old"));
    std::fs::create_dir(&stale_old).unwrap();
    let kept = [
        format!(".ds.import-{alive}"),
        ".notes.import-abc".to_string(),
        "notes.import-1".to_string(),
        format!(".x.other-{dead}"),
    ];
    for k in &kept {
        std::fs::create_dir(dir.join(k)).unwrap();
    }
    succeeds(&hiermd(&import_args(&dir, "traj0.pdb", &dir.join("new"))));
    assert!(!stale_import.exists() && !stale_file.exists() && !stale_old.exists());
    for k in &kept {
        assert!(
            dir.join(k).exists(),
            "{k} must stay (not a temporary of a dead process)"
        );
    }
    // A command writing a file cleans its folder too.
    std::fs::create_dir(&stale_import).unwrap();
    let o = hiermd(&[
        "export".as_ref(),
        dir.join("data").as_os_str(),
        "--format".as_ref(),
        "xyz".as_ref(),
        "--out".as_ref(),
        dir.join("f.xyz").as_os_str(),
    ]);
    succeeds(&o);
    assert!(!stale_import.exists());
    // And the library call says what it did.
    std::fs::create_dir(&stale_import).unwrap();
    let c = clean_stale(&dir);
    assert_eq!(c.removed, vec![stale_import.clone()]);
    assert!(c.restored.is_empty());
    let _ = std::fs::remove_dir_all(dir);
}

// ------------------------------------------------------------ 6. flags override the file --

#[test]
fn flags_override_the_file() {
    let dir = dir_for("flags");
    let file = dir.join("run.toml");
    std::fs::write(
        &file,
        "[data]\ndataset = \"ds\"\nlag = 20\nfeatures = \"f\"\n",
    )
    .unwrap();
    let ov = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let c = RunConfig::load(Some(&file), &ov("data.lag_ps", "20.0")).unwrap();
    assert_eq!((c.data.lag, c.data.lag_ps), (None, Some(20.0)));
    let c = RunConfig::load(Some(&file), &ov("data.lag", "3")).unwrap();
    assert_eq!((c.data.lag, c.data.lag_ps), (Some(3), None));
    let c = RunConfig::load(Some(&file), &ov("data.atom_model", "\"m.safetensors\"")).unwrap();
    assert_eq!(c.data.features, None);
    assert_eq!(
        c.data.atom_model.as_deref(),
        Some(Path::new("m.safetensors"))
    );
    // Two flags that exclude each other are still an error.
    let both = vec![
        ("data.lag".to_string(), "3".to_string()),
        ("data.lag_ps".to_string(), "2.0".to_string()),
    ];
    let e = format!("{:#}", RunConfig::load(Some(&file), &both).unwrap_err());
    assert!(e.contains("not both"), "{e}");

    // Through the command line: `--lag-ps 20` over `lag = 20` gets as far as the dataset.
    let o = hiermd(&[
        "train".as_ref(),
        "--config".as_ref(),
        file.as_os_str(),
        "--lag-ps".as_ref(),
        "20".as_ref(),
        "--run".as_ref(),
        dir.join("run").as_os_str(),
    ]);
    let err = fails(&o, &["data.dataset"]);
    assert!(!err.contains("not both"), "{err}");
    assert!(!dir.join("run").exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn negative_numbers_reach_the_checks() {
    let dir = dir_for("negative");
    make_data(&dir, &[12], 11);
    let out = dir.join("ds");
    for dt in ["-1", "0", "nan", "inf"] {
        let mut args = import_args(&dir, "traj0.pdb", &out);
        let n = args.len();
        args[n - 1] = dt.into();
        let err = fails(&hiermd(&args), &["--dt", "positive"]);
        assert!(!err.contains("unexpected argument"), "{err}");
    }
    assert!(!out.exists());
    let run = dir.join("run");
    let data = dir.join("data");
    let o = hiermd(&[
        "train".as_ref(),
        "--data".as_ref(),
        data.as_os_str(),
        "--lag-ps".as_ref(),
        "-5".as_ref(),
        "--run".as_ref(),
        run.as_os_str(),
    ]);
    fails(&o, &["data.lag_ps = -5"]);
    let o = hiermd(&[
        "pretrain".as_ref(),
        "--data".as_ref(),
        data.as_os_str(),
        "--sigma".as_ref(),
        "-1".as_ref(),
        "--out".as_ref(),
        run.as_os_str(),
    ]);
    fails(&o, &["--sigma -1"]);
    // Unsigned flags: the parser's own message, naming the flag and the value.
    let o = hiermd(&[
        "train".as_ref(),
        "--data".as_ref(),
        data.as_os_str(),
        "--lag".as_ref(),
        "-1".as_ref(),
        "--run".as_ref(),
        run.as_os_str(),
    ]);
    fails(&o, &["'-1'", "--lag"]);
    assert!(!run.exists());
    let _ = std::fs::remove_dir_all(dir);
}

/// `hiermd demo --out X` rewrites a previous demo's folder only: a folder of the user's (even
/// one holding only a `data` folder, a name the demo also uses) is refused and left as it was.
#[test]
fn demo_never_replaces_a_foreign_folder() {
    let dir = dir_for("demo-foreign");
    let mine = dir.join("analysis");
    std::fs::create_dir_all(mine.join("data")).unwrap();
    std::fs::write(mine.join("data/run1.dcd"), "my trajectory").unwrap();
    std::fs::write(mine.join("notes.txt"), "keep me").unwrap();
    let demo = || {
        hiermd(&[
            "demo".as_ref(),
            "--quick".as_ref(),
            "--out".as_ref(),
            mine.as_os_str(),
        ])
    };
    let before = snapshot(&mine);
    fails(&demo(), &["not a hiermd demo folder"]);
    assert_eq!(snapshot(&mine), before, "the user's folder is intact");
    std::fs::remove_file(mine.join("notes.txt")).unwrap();
    let before = snapshot(&mine);
    fails(&demo(), &["not a hiermd demo folder"]);
    assert_eq!(
        snapshot(&mine),
        before,
        "a lone data folder is not the demo's"
    );
    let _ = std::fs::remove_dir_all(dir);
}
