//! The feature store of the atom stage: f32 and f16 round trips, the token stage's batch gather,
//! crash safety (dropped and killed writers), corrupt files, `.npy` output and the manifest, on a
//! small dataset imported from generated PDB files.

use hiermd::npy;
use hiermd::store::{
    self, Dataset, FeatureData, FeatureDtype, FeatureManifest, FeatureSettings, FeatureStore,
    FeatureWriter, ImportOptions, FAULT_ABORT_ENV,
};
use hiermd::testing::Rng;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Residues of the test protein (GLY has no CB): 4 tokens.
const RESIDUES: [(&str, &[&str]); 4] = [
    ("ALA", &["N", "CA", "C", "O", "CB"]),
    ("GLY", &["N", "CA", "C", "O"]),
    ("SER", &["N", "CA", "C", "O", "CB", "OG"]),
    ("ALA", &["N", "CA", "C", "O", "CB"]),
];
const TOKENS: usize = RESIDUES.len();

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hiermd-features-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn pdb_atoms(rng: &mut Rng, out: &mut String) {
    let mut serial = 1;
    for (k, (res, names)) in RESIDUES.iter().enumerate() {
        for name in names.iter() {
            let (x, y, z) = (
                rng.range(-20.0, 20.0),
                rng.range(-20.0, 20.0),
                rng.range(-20.0, 20.0),
            );
            out.push_str(&format!(
                "ATOM  {serial:>5} {:<4} {res:<3} A{:>4}    {x:8.3}{y:8.3}{z:8.3}  1.00  0.00          {:>2}\n",
                format!(" {name}"),
                k + 1,
                &name[..1],
            ));
            serial += 1;
        }
    }
}

/// Imports a dataset of `frames.len()` trajectories with these frame counts into `dir/name`.
fn dataset(dir: &Path, name: &str, frames: &[usize], seed: u64) -> Dataset {
    let mut rng = Rng::new(seed);
    let mut top = String::new();
    pdb_atoms(&mut rng, &mut top);
    top.push_str("END\n");
    let top_path = dir.join(format!("{name}-top.pdb"));
    std::fs::write(&top_path, top).unwrap();
    let mut trajs = Vec::new();
    for (t, &n) in frames.iter().enumerate() {
        let mut text = String::new();
        for m in 0..n {
            text.push_str(&format!("MODEL     {:>4}\n", m + 1));
            pdb_atoms(&mut rng, &mut text);
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
    ds
}

/// What was written: per trajectory s [n,R,H], v [n,R,3,H], ca [n,R,3].
struct Written {
    s: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    ca: Vec<Vec<f32>>,
    h: usize,
}

impl Written {
    fn new(rng: &mut Rng, ds: &Dataset, h: usize) -> Self {
        let (mut s, mut v, mut ca) = (Vec::new(), Vec::new(), Vec::new());
        for t in &ds.trajectories {
            let n = t.frames();
            s.push(rng.normal_vec(n * TOKENS * h, 2.0));
            v.push(rng.normal_vec(n * TOKENS * 3 * h, 2.0));
            ca.push(rng.normal_vec(n * TOKENS * 3, 10.0));
        }
        Self { s, v, ca, h }
    }

    /// Row `row` (0 = s, 1-3 = v's x, y, z) of `token` in frame `i` of `traj`.
    fn value(&self, traj: usize, i: usize, token: usize, row: usize, c: usize) -> f32 {
        let h = self.h;
        let tok = i * TOKENS + token;
        if row == 0 {
            self.s[traj][tok * h + c]
        } else {
            self.v[traj][(tok * 3 + row - 1) * h + c]
        }
    }

    /// Appends everything in random chunks of 1-3 frames, trajectories interleaved at random.
    fn write(&self, rng: &mut Rng, w: &mut FeatureWriter, with_ca: bool) {
        let h = self.h;
        let mut done = vec![0usize; self.s.len()];
        let frames: Vec<usize> = self.s.iter().map(|s| s.len() / (TOKENS * h)).collect();
        loop {
            let open: Vec<usize> = (0..frames.len()).filter(|&t| done[t] < frames[t]).collect();
            let Some(&t) = open.get(rng.below(open.len().max(1))) else {
                break;
            };
            let m = (1 + rng.below(3)).min(frames[t] - done[t]);
            let (a, b) = (done[t], done[t] + m);
            let ca = &self.ca[t][a * TOKENS * 3..b * TOKENS * 3];
            w.append_frames(
                t,
                &self.s[t][a * TOKENS * h..b * TOKENS * h],
                &self.v[t][a * TOKENS * 3 * h..b * TOKENS * 3 * h],
                with_ca.then_some(ca),
            )
            .unwrap();
            done[t] = b;
            assert_eq!(w.frames_written(t), b);
        }
    }
}

fn settings(h: usize, dtype: FeatureDtype, ca: bool) -> FeatureSettings {
    FeatureSettings {
        channels: h,
        dtype,
        ca_positions: ca,
        ..Default::default()
    }
}

/// f16 rounding: the nearest f16 is within half an ulp (2^-11 relative for normal values,
/// 2^-25 absolute below the normal range).
fn assert_f16_close(got: f32, want: f32, what: &str) {
    assert_eq!(got, half::f16::from_f32(want).to_f32(), "{what}");
    assert!(
        (got - want).abs() <= want.abs() * 2f32.powi(-11) + 2f32.powi(-25),
        "{what}: {got} vs {want}"
    );
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn round_trip(name: &str, dtype: FeatureDtype, h: usize, with_ca: bool) {
    let dir = tmpdir(name);
    let ds = dataset(&dir, "ds", &[5, 7, 1], 1);
    let mut rng = Rng::for_test(name);
    let data = Written::new(&mut rng, &ds, h);
    let out = dir.join("FEATURES");
    let mut w = FeatureWriter::create(&ds, &out, &settings(h, dtype, with_ca)).unwrap();
    assert!(!out.exists(), "nothing at the target before finish");
    data.write(&mut rng, &mut w, with_ca);
    let st = w.finish().unwrap();
    st.check_dataset(&ds).unwrap();
    let reopened = FeatureStore::open(&out).unwrap();
    for st in [&st, &reopened] {
        assert_eq!(st.trajectories(), 3);
        assert_eq!((0..3).map(|t| st.frames(t)).collect::<Vec<_>>(), [5, 7, 1]);
        assert_eq!((st.tokens(), st.channels(), st.dtype()), (TOKENS, h, dtype));
        assert_eq!(st.has_ca(), with_ca);
        let mut rows = vec![f32::NAN; TOKENS * 4 * h];
        for t in 0..3 {
            for i in 0..st.frames(t) {
                let f = st.frame(t, i);
                assert_eq!((f.tokens(), f.channels()), (TOKENS, h));
                match (f.data(), dtype) {
                    (FeatureData::F32(d), FeatureDtype::F32) => assert_eq!(d.len(), rows.len()),
                    (FeatureData::F16(d), FeatureDtype::F16) => assert_eq!(d.len(), rows.len()),
                    _ => panic!("frame data of the wrong type"),
                }
                f.to_f32(&mut rows);
                for tok in 0..TOKENS {
                    for row in 0..4 {
                        for c in 0..h {
                            let want = data.value(t, i, tok, row, c);
                            let got = f.value(tok, row, c);
                            assert_eq!(rows[(tok * 4 + row) * h + c], got);
                            let what = format!("traj {t} frame {i} token {tok} row {row} ch {c}");
                            match dtype {
                                FeatureDtype::F32 => assert_eq!(got, want, "{what}"),
                                FeatureDtype::F16 => assert_f16_close(got, want, &what),
                            }
                        }
                    }
                }
                match f.ca() {
                    Some(ca) => {
                        assert!(with_ca);
                        assert_eq!(ca, &data.ca[t][i * TOKENS * 3..(i + 1) * TOKENS * 3]);
                    }
                    None => assert!(!with_ca),
                }
            }
        }
    }
    // Only the dataset, its sources and the store: no temporary folders.
    assert!(names_in(&dir).iter().all(|n| !n.starts_with('.')));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn round_trip_f32_with_ca() {
    round_trip("rt-f32", FeatureDtype::F32, 6, true);
}

#[test]
fn round_trip_f16_without_ca() {
    round_trip("rt-f16", FeatureDtype::F16, 3, false);
}

#[test]
fn round_trip_f16_with_ca() {
    round_trip("rt-f16-ca", FeatureDtype::F16, 5, true);
}

#[test]
fn gather_batch_matches_written_data() {
    let dir = tmpdir("gather");
    let ds = dataset(&dir, "ds", &[6, 9], 2);
    let mut rng = Rng::for_test("gather_batch_matches_written_data");
    for (dtype, h) in [(FeatureDtype::F32, 8), (FeatureDtype::F16, 5)] {
        let data = Written::new(&mut rng, &ds, h);
        let out = dir.join(format!("feat-{dtype}"));
        let mut w = FeatureWriter::create(&ds, &out, &settings(h, dtype, true)).unwrap();
        data.write(&mut rng, &mut w, true);
        let st = w.finish().unwrap();
        // Shuffled frames from both trajectories, with repeats.
        let batch: Vec<(usize, usize)> = (0..23)
            .map(|_| {
                let t = rng.below(2);
                (t, rng.below(st.frames(t)))
            })
            .collect();
        let b = batch.len();
        let mut s = vec![f32::NAN; b * TOKENS * h];
        let mut v = vec![f32::NAN; b * TOKENS * 3 * h];
        let mut ca = vec![f32::NAN; b * TOKENS * 3];
        st.gather_batch(&batch, &mut s, &mut v, Some(&mut ca))
            .unwrap();
        for (k, &(t, i)) in batch.iter().enumerate() {
            for tok in 0..TOKENS {
                for c in 0..h {
                    let got_s = s[(k * TOKENS + tok) * h + c];
                    let want_s = data.value(t, i, tok, 0, c);
                    let mut pairs = vec![(got_s, want_s, "s".to_string())];
                    for d in 0..3 {
                        pairs.push((
                            v[((k * TOKENS + tok) * 3 + d) * h + c],
                            data.value(t, i, tok, 1 + d, c),
                            format!("v[{d}]"),
                        ));
                    }
                    for (got, want, what) in pairs {
                        let what = format!(
                            "{dtype} batch {k} (traj {t} frame {i}) {what} token {tok} ch {c}"
                        );
                        match dtype {
                            FeatureDtype::F32 => assert_eq!(got, want, "{what}"),
                            FeatureDtype::F16 => assert_f16_close(got, want, &what),
                        }
                    }
                }
            }
            assert_eq!(
                &ca[k * TOKENS * 3..(k + 1) * TOKENS * 3],
                &data.ca[t][i * TOKENS * 3..(i + 1) * TOKENS * 3]
            );
        }
        // Without C-alpha output the features are the same.
        let (mut s2, mut v2) = (vec![f32::NAN; s.len()], vec![f32::NAN; v.len()]);
        st.gather_batch(&batch, &mut s2, &mut v2, None).unwrap();
        assert!(s2 == s && v2 == v);
        // An empty batch is fine.
        st.gather_batch(&[], &mut [], &mut [], None).unwrap();

        // Errors: buffer lengths, indices out of range.
        let e = st
            .gather_batch(&batch, &mut s[1..], &mut v, None)
            .unwrap_err();
        assert!(e.to_string().contains("s_out"), "{e}");
        let e = st
            .gather_batch(&batch, &mut s, &mut v[1..], None)
            .unwrap_err();
        assert!(e.to_string().contains("v_out"), "{e}");
        let e = st
            .gather_batch(&batch, &mut s, &mut v, Some(&mut ca[1..]))
            .unwrap_err();
        assert!(e.to_string().contains("ca_out"), "{e}");
        let bad = [(0, 0), (1, 9)];
        let (mut s1, mut v1) = (vec![0.0; 2 * TOKENS * h], vec![0.0; 2 * TOKENS * 3 * h]);
        let e = st.gather_batch(&bad, &mut s1, &mut v1, None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("frame 9 of trajectory 1") && msg.contains("feat-0001.hmdf"),
            "{msg}"
        );
        let e = st
            .gather_batch(
                &[(2, 0)],
                &mut s1[..TOKENS * h],
                &mut v1[..TOKENS * 3 * h],
                None,
            )
            .unwrap_err();
        assert!(e.to_string().contains("trajectory 2"), "{e}");
    }

    // A store without C-alpha positions refuses ca_out.
    let out = dir.join("no-ca");
    let data = Written::new(&mut rng, &ds, 2);
    let mut w = FeatureWriter::create(&ds, &out, &settings(2, FeatureDtype::F32, false)).unwrap();
    data.write(&mut rng, &mut w, false);
    let st = w.finish().unwrap();
    let (mut s, mut v, mut ca) = (
        vec![0.0; TOKENS * 2],
        vec![0.0; TOKENS * 6],
        vec![0.0; TOKENS * 3],
    );
    let e = st
        .gather_batch(&[(0, 0)], &mut s, &mut v, Some(&mut ca))
        .unwrap_err();
    assert!(e.to_string().contains("no C-alpha"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn manifest_contents_and_dataset_check() {
    let dir = tmpdir("manifest");
    let ds = dataset(&dir, "ds", &[3, 4], 3);
    let backbone = dir.join("atom.ckpt");
    std::fs::write(&backbone, b"pretend checkpoint bytes").unwrap();
    let mut rng = Rng::for_test("manifest_contents_and_dataset_check");
    let data = Written::new(&mut rng, &ds, 4);
    let out = dir.join("FEATURES");
    let mut w = FeatureWriter::create(
        &ds,
        &out,
        &FeatureSettings {
            backbone: Some(backbone.clone()),
            ..settings(4, FeatureDtype::F16, true)
        },
    )
    .unwrap();
    assert_eq!((w.tokens(), w.channels()), (TOKENS, 4));
    assert_eq!((w.frames_expected(0), w.frames_expected(1)), (3, 4));
    data.write(&mut rng, &mut w, true);
    let st = w.finish().unwrap();

    assert_eq!(
        names_in(&out),
        ["feat-0000.hmdf", "feat-0001.hmdf", "manifest.toml"]
    );
    let text = std::fs::read_to_string(out.join("manifest.toml")).unwrap();
    let m: toml::Value = toml::from_str(&text).unwrap();
    assert_eq!(m["format"].as_str(), Some("hiermd-features"));
    assert_eq!(m["version"].as_integer(), Some(1));
    assert!(m["written_by"].as_str().unwrap().starts_with("hiermd "));
    let ds_dir = std::fs::canonicalize(ds.dir()).unwrap();
    assert_eq!(m["dataset"].as_str(), Some(ds_dir.to_str().unwrap()));
    let ds_manifest = std::fs::read(ds.dir().join("manifest.toml")).unwrap();
    let dm = &m["dataset_manifest"];
    assert_eq!(
        dm["xxh3"].as_str().unwrap(),
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&ds_manifest))
    );
    assert_eq!(dm["bytes"].as_integer(), Some(ds_manifest.len() as i64));
    assert_eq!(
        dm["path"].as_str(),
        Some(ds_dir.join("manifest.toml").to_str().unwrap())
    );
    let bb = &m["backbone"];
    assert_eq!(
        bb["path"].as_str(),
        Some(std::fs::canonicalize(&backbone).unwrap().to_str().unwrap())
    );
    assert_eq!(
        bb["xxh3"].as_str().unwrap(),
        format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64(b"pretend checkpoint bytes")
        )
    );
    assert_eq!(m["tokens"].as_integer(), Some(TOKENS as i64));
    assert_eq!(m["channels"].as_integer(), Some(4));
    assert_eq!(m["dtype"].as_str(), Some("f16"));
    assert_eq!(m["ca_positions"].as_bool(), Some(true));
    assert_eq!(m["total_frames"].as_integer(), Some(7));
    let trajs = m["trajectories"].as_array().unwrap();
    assert_eq!(trajs.len(), 2);
    assert_eq!(trajs[1]["file"].as_str(), Some("feat-0001.hmdf"));
    assert_eq!(trajs[1]["frames"].as_integer(), Some(4));
    let parsed: FeatureManifest = toml::from_str(&text).unwrap();
    assert_eq!(parsed, st.manifest);

    // The file sizes: header + [frames][R][4][H] f16 + [frames][R][3] f32.
    let len = std::fs::metadata(st.path(1)).unwrap().len();
    assert_eq!(len, 4096 + 4 * (TOKENS * 4 * 4 * 2 + TOKENS * 12) as u64);

    // The dataset check: fine for its own dataset, an error for another one.
    st.check_dataset(&ds).unwrap();
    let other = dataset(&dir, "other", &[3, 4], 4);
    let e = st.check_dataset(&other).unwrap_err().to_string();
    assert!(e.contains("changed since"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn writer_errors_leave_nothing() {
    let dir = tmpdir("errors");
    let ds = dataset(&dir, "ds", &[2, 3], 5);
    let out = dir.join("F");
    let h = 3;
    let (s, v, ca) = (
        vec![0.5f32; 2 * TOKENS * h],
        vec![0.25f32; 2 * TOKENS * 3 * h],
        vec![1.0f32; 2 * TOKENS * 3],
    );
    {
        let mut w =
            FeatureWriter::create(&ds, &out, &settings(h, FeatureDtype::F16, true)).unwrap();
        let err = |r: anyhow::Result<()>| r.unwrap_err().to_string();
        let e = err(w.append_frames(2, &s, &v, Some(&ca)));
        assert!(e.contains("trajectory 2"), "{e}");
        let e = err(w.append_frames(0, &s[1..], &v, Some(&ca)));
        assert!(e.contains("s has"), "{e}");
        let e = err(w.append_frames(0, &s, &v[1..], Some(&ca)));
        assert!(e.contains("v has"), "{e}");
        let e = err(w.append_frames(0, &s, &v, None));
        assert!(e.contains("pass them"), "{e}");
        let e = err(w.append_frames(0, &s, &v, Some(&ca[1..])));
        assert!(e.contains("ca has"), "{e}");
        let mut nan = s.clone();
        nan[TOKENS * h + 1] = f32::NAN;
        let e = err(w.append_frames(1, &nan, &v, Some(&ca)));
        assert!(e.contains("frame 1") && e.contains("non-finite"), "{e}");
        let mut big = v.clone();
        big[5] = 1e6;
        let e = err(w.append_frames(1, &s, &big, Some(&ca)));
        assert!(e.contains("overflows f16"), "{e}");
        // Two frames fit trajectory 0, two more do not.
        w.append_frames(0, &s, &v, Some(&ca)).unwrap();
        let e = err(w.append_frames(
            0,
            &s[..TOKENS * h],
            &v[..TOKENS * 3 * h],
            Some(&ca[..TOKENS * 3]),
        ));
        assert!(e.contains("exceed its 2 frames"), "{e}");
        // Trajectory 1 is missing a frame at finish.
        w.append_frames(1, &s, &v, Some(&ca)).unwrap();
        let e = w.finish().map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("trajectory 1 has 2 of its 3 frames"), "{e}");
    }
    assert!(!out.exists());
    assert_eq!(
        names_in(&dir).iter().filter(|n| n.starts_with('.')).count(),
        0
    );

    // C-alpha positions for a store without them; and bad settings.
    let mut w = FeatureWriter::create(&ds, &out, &settings(h, FeatureDtype::F32, false)).unwrap();
    let e = w
        .append_frames(0, &s, &v, Some(&ca))
        .unwrap_err()
        .to_string();
    assert!(e.contains("without them"), "{e}");
    drop(w);
    let e = FeatureWriter::create(&ds, &out, &settings(0, FeatureDtype::F32, false))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("channels"), "{e}");
    let e = FeatureWriter::create(
        &ds,
        &out,
        &FeatureSettings {
            backbone: Some(dir.join("missing.ckpt")),
            ..settings(h, FeatureDtype::F32, false)
        },
    )
    .map(|_| ())
    .unwrap_err();
    assert!(format!("{e:#}").contains("missing.ckpt"), "{e:#}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn dropped_writer_leaves_nothing_and_force_replaces() {
    let dir = tmpdir("dropped");
    let ds = dataset(&dir, "ds", &[4, 2], 6);
    let mut rng = Rng::for_test("dropped_writer_leaves_nothing_and_force_replaces");
    let data = Written::new(&mut rng, &ds, 2);
    let out = dir.join("F");
    let before = names_in(&dir);
    {
        let mut w =
            FeatureWriter::create(&ds, &out, &settings(2, FeatureDtype::F32, true)).unwrap();
        let h = 2;
        w.append_frames(
            0,
            &data.s[0][..2 * TOKENS * h],
            &data.v[0][..2 * TOKENS * 3 * h],
            Some(&data.ca[0][..2 * TOKENS * 3]),
        )
        .unwrap();
        assert_eq!(names_in(&dir).len(), before.len() + 1, "a temporary folder");
    }
    assert_eq!(names_in(&dir), before, "the dropped writer left nothing");

    // A rerun succeeds.
    let mut w = FeatureWriter::create(&ds, &out, &settings(2, FeatureDtype::F32, true)).unwrap();
    data.write(&mut rng, &mut w, true);
    let st = w.finish().unwrap();
    assert_eq!(st.frame(0, 3).value(1, 2, 1), data.value(0, 3, 1, 2, 1));
    drop(st);

    // An existing store needs force, checked when the writer is created.
    let e = FeatureWriter::create(&ds, &out, &settings(2, FeatureDtype::F16, false))
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    let mut w = FeatureWriter::create(
        &ds,
        &out,
        &FeatureSettings {
            force: true,
            ..settings(2, FeatureDtype::F16, false)
        },
    )
    .unwrap();
    data.write(&mut rng, &mut w, false);
    let st = w.finish().unwrap();
    assert_eq!(st.dtype(), FeatureDtype::F16);
    assert!(!st.has_ca());
    let mut expect = before.clone();
    expect.push("F".into());
    expect.sort();
    assert_eq!(
        names_in(&dir),
        expect,
        "the old store and temporaries are gone"
    );
    let _ = std::fs::remove_dir_all(dir);
}

const CHILD_ENV: &str = "HIERMD_FEATURES_TEST_CHILD";

/// Runs only as the child of `killed_writer_leaves_no_store`: writes features until the abort
/// hook kills the process.
#[test]
fn child_writer_killed_by_abort_hook() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (ds_dir, out) = spec.split_once('\n').unwrap();
    let ds = Dataset::open(Path::new(ds_dir)).unwrap();
    let mut rng = Rng::new(7);
    let data = Written::new(&mut rng, &ds, 3);
    let mut w =
        FeatureWriter::create(&ds, Path::new(out), &settings(3, FeatureDtype::F32, true)).unwrap();
    data.write(&mut rng, &mut w, true);
    let _ = w.finish();
    panic!("the abort hook did not fire");
}

#[test]
fn killed_writer_leaves_no_store_and_rerun_succeeds() {
    let dir = tmpdir("killed");
    let ds = dataset(&dir, "ds", &[5, 6], 8);
    let out = dir.join("F");
    let before = names_in(&dir);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_writer_killed_by_abort_hook",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(
            CHILD_ENV,
            format!("{}\n{}", ds.dir().display(), out.display()),
        )
        .env(FAULT_ABORT_ENV, "7")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the fault-injected writer must die");
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(6),
            "killed by abort(), not a panic: {status:?}"
        );
    }
    assert!(!out.exists(), "a killed writer leaves no store");
    let temp = format!(".F.features-{pid}");
    let mut expect = before.clone();
    expect.push(temp.clone());
    expect.sort();
    assert_eq!(
        names_in(&dir),
        expect,
        "the killed writer's temporary folder"
    );
    // Its files are not marked complete, and there is no manifest.
    let tdir = dir.join(&temp);
    assert!(!tdir.join("manifest.toml").exists());
    for f in ["feat-0000.hmdf", "feat-0001.hmdf"] {
        let bytes = std::fs::read(tdir.join(f)).unwrap();
        assert_eq!(&bytes[..8], b"HIERMDFT");
        let flags = u32::from_le_bytes(bytes[12..16].try_into().unwrap());
        assert_eq!(flags & 2, 0, "{f} is not complete");
    }

    // A rerun (no hook) removes the stale folder and succeeds.
    let mut rng = Rng::for_test("killed_writer_leaves_no_store_and_rerun_succeeds");
    let data = Written::new(&mut rng, &ds, 3);
    let mut w = FeatureWriter::create(&ds, &out, &settings(3, FeatureDtype::F32, true)).unwrap();
    data.write(&mut rng, &mut w, true);
    let st = w.finish().unwrap();
    assert_eq!(st.frames(1), 6);
    let mut expect = before.clone();
    expect.push("F".into());
    expect.sort();
    assert_eq!(
        names_in(&dir),
        expect,
        "the stale temporary folder was removed"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, b).unwrap();
}

#[test]
fn corrupt_stores_give_errors_naming_the_file() {
    let dir = tmpdir("corrupt");
    let ds = dataset(&dir, "ds", &[3, 4], 9);
    let mut rng = Rng::for_test("corrupt_stores_give_errors_naming_the_file");
    let data = Written::new(&mut rng, &ds, 6);
    let good = dir.join("good");
    let mut w = FeatureWriter::create(&ds, &good, &settings(6, FeatureDtype::F32, true)).unwrap();
    data.write(&mut rng, &mut w, true);
    w.finish().unwrap();

    let case = |name: &str, damage: &dyn Fn(&Path), needles: &[&str]| {
        let d = dir.join(name);
        copy_dir(&good, &d);
        damage(&d);
        let e = match FeatureStore::open(&d) {
            Ok(_) => panic!("{name}: a damaged store opened"),
            Err(e) => format!("{e:#}"),
        };
        for n in needles {
            assert!(e.contains(n), "{name}: {e:?} lacks {n:?}");
        }
    };
    let file = "feat-0001.hmdf";
    let len = std::fs::metadata(good.join(file)).unwrap().len();
    case(
        "truncated",
        &|d| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(d.join(file))
                .unwrap();
            f.set_len(len - 7).unwrap();
        },
        &[file, "truncated"],
    );
    case(
        "longer",
        &|d| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(d.join(file))
                .unwrap();
            f.set_len(len + 4).unwrap();
        },
        &[file, "corrupt"],
    );
    case(
        "short-header",
        &|d| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(d.join(file))
                .unwrap();
            f.set_len(100).unwrap();
        },
        &[file, "too short"],
    );
    case(
        "magic",
        &|d| patch(&d.join(file), 0, b"HIERMDTJ"),
        &[file, "bad magic"],
    );
    case(
        "version",
        &|d| patch(&d.join(file), 8, &9u32.to_le_bytes()),
        &[file, "version 9"],
    );
    case(
        "incomplete",
        &|d| patch(&d.join(file), 12, &1u32.to_le_bytes()),
        &[file, "incomplete"],
    );
    case(
        "dtype",
        &|d| patch(&d.join(file), 40, &7u32.to_le_bytes()),
        &[file, "dtype code 7"],
    );
    case(
        "frames",
        &|d| patch(&d.join(file), 16, &u64::MAX.to_le_bytes()),
        &[file, "overflow"],
    );
    case(
        "missing",
        &|d| std::fs::remove_file(d.join(file)).unwrap(),
        &[file, "cannot open"],
    );
    case(
        "manifest-channels",
        &|d| {
            let p = d.join("manifest.toml");
            let t = std::fs::read_to_string(&p).unwrap();
            std::fs::write(&p, t.replace("channels = 6", "channels = 3")).unwrap();
        },
        &["feat-0000.hmdf", "manifest says"],
    );
    case(
        "manifest-format",
        &|d| {
            let p = d.join("manifest.toml");
            let t = std::fs::read_to_string(&p).unwrap();
            std::fs::write(&p, t.replace("hiermd-features", "hiermd-dataset")).unwrap();
        },
        &["manifest.toml", "not hiermd-features"],
    );
    case(
        "no-manifest",
        &|d| std::fs::remove_file(d.join("manifest.toml")).unwrap(),
        &["not a hiermd feature store"],
    );
    // A dataset is not a feature store.
    let e = FeatureStore::open(ds.dir()).map(|_| ()).unwrap_err();
    assert!(format!("{e:#}").contains("hiermd-features"), "{e:#}");
    FeatureStore::open(&good).unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn npy_output_f32_and_f16() {
    let dir = tmpdir("npy");
    let ds = dataset(&dir, "ds", &[3, 5], 10);
    let mut rng = Rng::for_test("npy_output_f32_and_f16");
    for (dtype, h) in [(FeatureDtype::F32, 6), (FeatureDtype::F16, 3)] {
        let data = Written::new(&mut rng, &ds, h);
        let out = dir.join(format!("F-{dtype}"));
        let mut w = FeatureWriter::create(&ds, &out, &settings(h, dtype, true)).unwrap();
        data.write(&mut rng, &mut w, true);
        let st = w.finish().unwrap();
        let path = dir.join(format!("traj1-{dtype}.npy"));
        let bytes = st.write_npy(1, &path).unwrap();
        assert_eq!(bytes, std::fs::metadata(&path).unwrap().len());
        let hd = npy::read_header(&path).unwrap();
        assert_eq!(hd.shape, [5, TOKENS, 4, h]);
        assert_eq!(hd.descr, dtype.npy_descr());
        assert!(!hd.fortran_order);
        assert_eq!(hd.data_offset % npy::ALIGN, 0);
        let mut want = Vec::new();
        let mut rows = vec![0.0; TOKENS * 4 * h];
        for i in 0..5 {
            st.frame(1, i).to_f32(&mut rows);
            want.extend_from_slice(&rows);
        }
        match dtype {
            FeatureDtype::F32 => {
                let (shape, got) = npy::read_f32(&path).unwrap();
                assert_eq!(shape, [5, TOKENS, 4, h]);
                assert_eq!(got, want);
            }
            FeatureDtype::F16 => {
                // npy.rs reads no f16: the header parses, and the data are the f16 bits.
                let raw = std::fs::read(&path).unwrap();
                let got: Vec<f32> = raw[hd.data_offset..]
                    .chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect();
                assert_eq!(got, want);
                let e = npy::read_f32(&path).unwrap_err().to_string();
                assert!(e.contains("<f2"), "{e}");
            }
        }
        // The free function opens the store itself; no temporary file is left.
        let path0 = dir.join(format!("traj0-{dtype}.npy"));
        store::write_npy(&out, 0, &path0).unwrap();
        assert_eq!(npy::read_header(&path0).unwrap().shape, [3, TOKENS, 4, h]);
        let e = st.write_npy(2, &path0).unwrap_err().to_string();
        assert!(e.contains("trajectory 2"), "{e}");
    }
    assert!(names_in(&dir).iter().all(|n| !n.starts_with('.')));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn dtype_names() {
    assert_eq!("f16".parse::<FeatureDtype>().unwrap(), FeatureDtype::F16);
    assert_eq!("F32".parse::<FeatureDtype>().unwrap(), FeatureDtype::F32);
    assert!("f64".parse::<FeatureDtype>().is_err());
    assert_eq!(FeatureDtype::F16.to_string(), "f16");
    assert_eq!((FeatureDtype::F16.size(), FeatureDtype::F32.size()), (2, 4));
}

/// Frames of 1 MiB (f32) or 512 KiB (f16) make the writer split one append into several
/// chunks (it converts about 1 MiB at a time): each chunk must land at its own frames.
#[test]
fn large_appends_are_split_in_place() {
    let dir = tmpdir("large");
    let ds = dataset(&dir, "ds", &[3, 2], 12);
    let mut rng = Rng::for_test("large_appends_are_split_in_place");
    let h = 16384;
    for dtype in [FeatureDtype::F32, FeatureDtype::F16] {
        let data = Written::new(&mut rng, &ds, h);
        let out = dir.join(format!("F-{dtype}"));
        let mut w = FeatureWriter::create(&ds, &out, &settings(h, dtype, true)).unwrap();
        // Trajectory 1 whole in one call, trajectory 0 as one frame then two in one call.
        w.append_frames(1, &data.s[1], &data.v[1], Some(&data.ca[1]))
            .unwrap();
        let (s0, v0, c0) = (TOKENS * h, TOKENS * 3 * h, TOKENS * 3);
        w.append_frames(
            0,
            &data.s[0][..s0],
            &data.v[0][..v0],
            Some(&data.ca[0][..c0]),
        )
        .unwrap();
        // A bad value in the last frame of a split append is reported at its frame.
        let mut bad = data.v[0][v0..].to_vec();
        bad[v0 + 3] = f32::INFINITY;
        let e = w
            .append_frames(0, &data.s[0][s0..], &bad, Some(&data.ca[0][c0..]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("frame 2"), "{e}");
        drop(w);
        let mut w = FeatureWriter::create(&ds, &out, &settings(h, dtype, true)).unwrap();
        w.append_frames(1, &data.s[1], &data.v[1], Some(&data.ca[1]))
            .unwrap();
        w.append_frames(
            0,
            &data.s[0][..s0],
            &data.v[0][..v0],
            Some(&data.ca[0][..c0]),
        )
        .unwrap();
        w.append_frames(
            0,
            &data.s[0][s0..],
            &data.v[0][v0..],
            Some(&data.ca[0][c0..]),
        )
        .unwrap();
        let st = w.finish().unwrap();
        let mut rows = vec![0.0; TOKENS * 4 * h];
        for (t, n) in [(0, 3), (1, 2)] {
            for i in 0..n {
                let f = st.frame(t, i);
                f.to_f32(&mut rows);
                for tok in 0..TOKENS {
                    for row in 0..4 {
                        for c in (0..h).step_by(97) {
                            let (got, want) =
                                (rows[(tok * 4 + row) * h + c], data.value(t, i, tok, row, c));
                            let what =
                                format!("{dtype} traj {t} frame {i} token {tok} row {row} ch {c}");
                            match dtype {
                                FeatureDtype::F32 => assert_eq!(got, want, "{what}"),
                                FeatureDtype::F16 => assert_f16_close(got, want, &what),
                            }
                        }
                    }
                }
                assert_eq!(
                    f.ca().unwrap(),
                    &data.ca[t][i * TOKENS * 3..(i + 1) * TOKENS * 3]
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}
