//! Issue 16, item 2: checksums on everything hiermd stores. Datasets, feature stores, model
//! files and checkpoints record XXH3-64 checksums; `hiermd verify` checks them and every stored
//! value, and says what is wrong; opening a dataset checks what is cheap (headers against the
//! manifest, frame counts, token indices, paths confined to the folder); `featurize` and `export`
//! refuse implausible coordinates as they read them; `train --resume` loads only an intact
//! checkpoint, falling back to the newest intact one (also when `latest` is missing).

mod common;

use common::peptide::make_peptide;
use hiermd::store::{self, Dataset, FeatureDtype, FeatureSettings, FeatureWriter};
use hiermd::testing::Rng;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const RESIDUES: [(&str, &[&str]); 4] = [
    ("ALA", &["N", "CA", "C", "O", "CB"]),
    ("GLY", &["N", "CA", "C", "O"]),
    ("SER", &["N", "CA", "C", "O", "CB", "OG"]),
    ("ALA", &["N", "CA", "C", "O", "CB"]),
];
/// Atoms per frame of the test system.
const ATOMS: usize = 20;
/// Bytes of a stored trajectory's header.
const HEADER: usize = store::HEADER_BYTES as usize;

fn tmpdir(name: &str) -> PathBuf {
    common::peptide::tmpdir("safety-store", name)
}

/// Runs the hiermd binary on the cpu device.
fn hiermd<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hiermd"))
        .args(["--device", "cpu"])
        .args(args)
        .output()
        .expect("run hiermd")
}

/// Stdout and stderr of a finished command.
fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts that the command succeeded; returns its output text.
fn ok(o: Output) -> String {
    let t = text(&o);
    assert!(
        o.status.success(),
        "expected success, got {:?}:\n{t}",
        o.status
    );
    t
}

/// Asserts that the command failed with status 1 and its output names every one of `want`.
fn fails(o: Output, want: &[&str]) -> String {
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "expected exit status 1:\n{t}");
    for w in want {
        assert!(t.contains(w), "output lacks {w:?}:\n{t}");
    }
    t
}

/// A dataset of four residues (20 heavy atoms) with one trajectory per entry of `frames`, and
/// the two-state chain each trajectory follows (the last residue moves 4 A in state 1).
fn make_dataset(dir: &Path, frames: &[usize], seed: u64) -> (PathBuf, Vec<Vec<u32>>) {
    let made = make_peptide(dir, &RESIDUES, frames, seed);
    assert_eq!(Dataset::open(&made.0).unwrap().natoms(), ATOMS);
    made
}

/// A recursive copy of a folder.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// Byte offset of one coordinate (frame, atom, axis) in a stored trajectory.
fn coord_offset(frame: usize, atom: usize, axis: usize) -> usize {
    HEADER + ((frame * ATOMS + atom) * 3 + axis) * 4
}

fn read_f32(path: &Path, at: usize) -> f32 {
    let b = std::fs::read(path).unwrap();
    f32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn write_f32(path: &Path, at: usize, v: f32) {
    let mut b = std::fs::read(path).unwrap();
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    std::fs::write(path, b).unwrap();
}

fn flip_bit(path: &Path, at: usize, bit: u8) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 1 << bit;
    std::fs::write(path, b).unwrap();
}

/// Replaces `from` by `to` in a text file (exactly once).
fn edit(path: &Path, from: &str, to: &str) {
    let t = std::fs::read_to_string(path).unwrap();
    assert_eq!(
        t.matches(from).count(),
        1,
        "{from:?} in {}:\n{t}",
        path.display()
    );
    std::fs::write(path, t.replace(from, to)).unwrap();
}

/// The manifest without the lines that record the stored files' checksums (a dataset or store
/// written before they were recorded).
fn strip_checksums(manifest: &Path) {
    let t = std::fs::read_to_string(manifest).unwrap();
    let kept: String = t
        .lines()
        .filter(|l| !l.starts_with("payload_xxh3") && !l.starts_with("atom_table_xxh3"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(
        kept.len(),
        t.len(),
        "no checksum lines in {}",
        manifest.display()
    );
    std::fs::write(manifest, kept).unwrap();
}

#[test]
fn verify_passes_intact_datasets_and_old_ones_without_checksums() {
    let dir = tmpdir("intact");
    let (data, _) = make_dataset(&dir, &[30, 20], 1);
    let manifest = std::fs::read_to_string(data.join("manifest.toml")).unwrap();
    assert!(manifest.contains("atom_table_xxh3 = "), "{manifest}");
    assert_eq!(manifest.matches("payload_xxh3 = ").count(), 2, "{manifest}");
    let out = ok(hiermd(&[OsStr::new("verify"), data.as_os_str()]));
    assert!(out.contains("traj-0000.hmdt: payload XXH3"), "{out}");
    assert!(out.contains("traj-0001.hmdt: payload XXH3"), "{out}");
    assert!(out.contains("atoms.tsv: XXH3"), "{out}");
    assert!(out.contains("coordinates finite"), "{out}");
    assert!(out.contains("intact"), "{out}");
    // Something that is none of hiermd's: a clear error.
    fails(
        hiermd(&[OsStr::new("verify"), dir.as_os_str()]),
        &["not a hiermd dataset, feature store, run folder or model file"],
    );

    // A dataset written before checksums: opens, and verify says what it could not check.
    let old = dir.join("old");
    copy_dir(&data, &old);
    strip_checksums(&old.join("manifest.toml"));
    ok(hiermd(&[OsStr::new("info"), old.as_os_str()]));
    let out = ok(hiermd(&[OsStr::new("verify"), old.as_os_str()]));
    assert_eq!(out.matches("no checksum recorded").count(), 3, "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn flipped_bits_in_a_payload_are_found_by_verify_featurize_and_export() {
    let dir = tmpdir("flip");
    let (data, _) = make_dataset(&dir, &[40], 2);
    let file = |ds: &Path| ds.join("traj-0000.hmdt");

    // A low mantissa bit: a plausible value, only the checksum sees it.
    let low = dir.join("low");
    copy_dir(&data, &low);
    flip_bit(&file(&low), coord_offset(5, 3, 0), 0);
    ok(hiermd(&[OsStr::new("info"), low.as_os_str()]));
    fails(
        hiermd(&[OsStr::new("verify"), low.as_os_str()]),
        &["traj-0000.hmdt", "payload checksum mismatch", "DAMAGED"],
    );

    // The top exponent bit of a coordinate below 2 A: the value becomes ~1e38 or more, which
    // featurize and export catch as they read the frame.
    let high = dir.join("high");
    copy_dir(&data, &high);
    let (frame, atom, axis) = (0..40)
        .flat_map(|f| (0..ATOMS).flat_map(move |a| (0..3).map(move |x| (f, a, x))))
        .find(|&(f, a, x)| {
            let v = read_f32(&file(&data), coord_offset(f, a, x)).abs();
            v > 1e-3 && v < 2.0
        })
        .expect("a coordinate below 2 A");
    flip_bit(&file(&high), coord_offset(frame, atom, axis) + 3, 6);
    let v = read_f32(&file(&high), coord_offset(frame, atom, axis));
    assert!(!v.is_finite() || v.abs() > 1e6, "the flip gave {v}");
    let at = format!("frame {frame}: atom {atom}");
    fails(
        hiermd(&[OsStr::new("verify"), high.as_os_str()]),
        &["traj-0000.hmdt", "payload checksum mismatch", &at],
    );
    let xyz = dir.join("out.xyz");
    fails(
        hiermd(&[
            OsStr::new("export"),
            high.as_os_str(),
            OsStr::new("--format"),
            OsStr::new("xyz"),
            OsStr::new("--out"),
            xyz.as_os_str(),
        ]),
        &["traj-0000.hmdt", &at],
    );
    assert!(!xyz.exists(), "a failed export left a file");
    let feats = dir.join("feats");
    fails(
        hiermd(&[
            OsStr::new("featurize"),
            OsStr::new("--data"),
            high.as_os_str(),
            OsStr::new("--out"),
            feats.as_os_str(),
        ]),
        &["traj-0000.hmdt", &at],
    );
    assert!(!feats.exists(), "featurize left an output");
    // The intact dataset featurizes (the check does not refuse good data).
    ok(hiermd(&[
        OsStr::new("featurize"),
        OsStr::new("--data"),
        data.as_os_str(),
        OsStr::new("--out"),
        feats.as_os_str(),
    ]));
    ok(hiermd(&[OsStr::new("verify"), feats.as_os_str()]));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn nan_and_1e30_in_a_payload_are_errors_naming_file_frame_and_atom() {
    let dir = tmpdir("nan");
    let (data, _) = make_dataset(&dir, &[20, 30], 3);
    for (value, what) in [(f32::NAN, "not finite"), (1e30, "beyond 1e6 A")] {
        let bad = dir.join(format!("bad-{what}"));
        copy_dir(&data, &bad);
        let file = bad.join("traj-0001.hmdt");
        write_f32(&file, coord_offset(7, 6, 1), value);
        // Opening stays cheap (no payload read); every reader of the frame refuses it.
        ok(hiermd(&[OsStr::new("info"), bad.as_os_str()]));
        let at = "frame 7: atom 6 (CA of residue GLY 2)";
        fails(
            hiermd(&[OsStr::new("verify"), bad.as_os_str()]),
            &["traj-0001.hmdt", "payload checksum mismatch", at, what],
        );
        let npy = dir.join("out.npy");
        fails(
            hiermd(&[
                OsStr::new("export"),
                bad.as_os_str(),
                OsStr::new("--traj"),
                OsStr::new("1"),
                OsStr::new("--format"),
                OsStr::new("npy"),
                OsStr::new("--out"),
                npy.as_os_str(),
            ]),
            &["traj-0001.hmdt", at, what],
        );
        assert!(!npy.exists(), "a failed export left a file");
        let feats = dir.join("feats");
        fails(
            hiermd(&[
                OsStr::new("featurize"),
                OsStr::new("--data"),
                bad.as_os_str(),
                OsStr::new("--out"),
                feats.as_os_str(),
            ]),
            &["traj-0001.hmdt", at, what],
        );
        assert!(!feats.exists());
        // The library call names the same place.
        let ds = Dataset::open(&bad).unwrap();
        assert!(ds.checked_frames(1, 0..7).is_ok() && ds.checked_frames(1, 8..30).is_ok());
        let e = format!("{:#}", ds.checked_frame(1, 7).unwrap_err());
        assert!(e.contains(at) && e.contains(what), "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn edited_frame_counts_in_the_manifest_are_refused() {
    let dir = tmpdir("frames");
    let (data, _) = make_dataset(&dir, &[40, 25], 4);
    // total_frames alone.
    let a = dir.join("a");
    copy_dir(&data, &a);
    edit(
        &a.join("manifest.toml"),
        "total_frames = 65",
        "total_frames = 64",
    );
    fails(
        hiermd(&[OsStr::new("info"), a.as_os_str()]),
        &["total_frames is 64", "65"],
    );
    fails(
        hiermd(&[OsStr::new("verify"), a.as_os_str()]),
        &["total_frames is 64", "DAMAGED"],
    );
    // One trajectory's frames, with the total made to agree: its header disagrees.
    let b = dir.join("b");
    copy_dir(&data, &b);
    edit(
        &b.join("manifest.toml"),
        "total_frames = 65",
        "total_frames = 64",
    );
    edit(&b.join("manifest.toml"), "frames = 40\n", "frames = 39\n");
    fails(
        hiermd(&[OsStr::new("info"), b.as_os_str()]),
        &["traj-0000.hmdt", "holds 40 frames", "manifest says 39"],
    );
    let out = fails(
        hiermd(&[OsStr::new("verify"), b.as_os_str()]),
        &["traj-0000.hmdt", "holds 40 frames"],
    );
    // The other trajectory is still checked in full.
    assert!(out.contains("traj-0001.hmdt: payload XXH3"), "{out}");
    // The box/time flags too.
    let c = dir.join("c");
    copy_dir(&data, &c);
    let m = std::fs::read_to_string(c.join("manifest.toml")).unwrap();
    std::fs::write(
        c.join("manifest.toml"),
        m.replacen("has_time = true", "has_time = false", 1),
    )
    .unwrap();
    fails(
        hiermd(&[OsStr::new("info"), c.as_os_str()]),
        &["traj-0000.hmdt", "times true", "times false"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn manifest_paths_outside_the_folder_are_refused() {
    let dir = tmpdir("paths");
    let (data, _) = make_dataset(&dir, &[20], 5);
    // root/a/b/ds names ../../other/traj-0000.hmdt = root/a/other/traj-0000.hmdt: a valid
    // trajectory of the same shape, which an unconfined reader would happily open.
    let ds = dir.join("a/b/ds");
    copy_dir(&data, &ds);
    let other = dir.join("a/other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(data.join("traj-0000.hmdt"), other.join("traj-0000.hmdt")).unwrap();
    std::fs::remove_file(ds.join("traj-0000.hmdt")).unwrap();
    edit(
        &ds.join("manifest.toml"),
        "file = \"traj-0000.hmdt\"",
        "file = \"../../other/traj-0000.hmdt\"",
    );
    let want = ["../../other/traj-0000.hmdt", "not a path inside the folder"];
    fails(hiermd(&[OsStr::new("info"), ds.as_os_str()]), &want);
    fails(hiermd(&[OsStr::new("verify"), ds.as_os_str()]), &want);
    let e = format!("{:#}", Dataset::open(&ds).err().expect("refused"));
    assert!(e.contains("not a path inside the folder"), "{e}");

    // An absolute path to the same valid file, and an atom table outside.
    let abs = dir.join("abs");
    copy_dir(&data, &abs);
    let target = other.join("traj-0000.hmdt");
    edit(
        &abs.join("manifest.toml"),
        "file = \"traj-0000.hmdt\"",
        &format!("file = {:?}", target.display().to_string()),
    );
    fails(
        hiermd(&[OsStr::new("info"), abs.as_os_str()]),
        &["not a path inside the folder"],
    );
    let table = dir.join("table");
    copy_dir(&data, &table);
    edit(
        &table.join("manifest.toml"),
        "atom_table = \"atoms.tsv\"",
        "atom_table = \"../data/atoms.tsv\"",
    );
    fails(
        hiermd(&[OsStr::new("info"), table.as_os_str()]),
        &[
            "atom_table = \"../data/atoms.tsv\"",
            "not a path inside the folder",
        ],
    );

    // A plain manifest entry that is a symbolic link leading out of the folder (to the same
    // valid file), or to a device: refused although the name itself is inside.
    #[cfg(unix)]
    {
        let linked = dir.join("linked");
        copy_dir(&data, &linked);
        std::fs::remove_file(linked.join("traj-0000.hmdt")).unwrap();
        std::os::unix::fs::symlink(&target, linked.join("traj-0000.hmdt")).unwrap();
        let want = ["traj-0000.hmdt", "outside the folder"];
        fails(hiermd(&[OsStr::new("info"), linked.as_os_str()]), &want);
        fails(hiermd(&[OsStr::new("verify"), linked.as_os_str()]), &want);
        let dev = dir.join("dev");
        copy_dir(&data, &dev);
        std::fs::remove_file(dev.join("atoms.tsv")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dev.join("atoms.tsv")).unwrap();
        fails(
            hiermd(&[OsStr::new("info"), dev.as_os_str()]),
            &["atoms.tsv", "refused"],
        );
        // A link that stays inside the folder is fine.
        let inner = dir.join("inner");
        copy_dir(&data, &inner);
        std::fs::rename(inner.join("traj-0000.hmdt"), inner.join("real.hmdt")).unwrap();
        std::os::unix::fs::symlink("real.hmdt", inner.join("traj-0000.hmdt")).unwrap();
        Dataset::open(&inner).expect("a link inside the folder is accepted");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn token_index_out_of_range_is_refused_on_open() {
    let dir = tmpdir("token");
    let (data, _) = make_dataset(&dir, &[20], 6);
    let bad = dir.join("bad");
    copy_dir(&data, &bad);
    // Atom 2 (line 4 of the table, after the header) gets token 99 of a 4-token dataset.
    let table = bad.join("atoms.tsv");
    let text = std::fs::read_to_string(&table).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut f: Vec<&str> = lines[3].split('\t').collect();
    assert_eq!(f[9], "0");
    f[9] = "99";
    lines[3] = f.join("\t");
    std::fs::write(&table, lines.join("\n") + "\n").unwrap();
    let want = ["atoms.tsv", "line 4", "token 99", "4 tokens"];
    fails(hiermd(&[OsStr::new("info"), bad.as_os_str()]), &want);
    let xyz = dir.join("out.xyz");
    fails(
        hiermd(&[
            OsStr::new("export"),
            bad.as_os_str(),
            OsStr::new("--format"),
            OsStr::new("xyz"),
            OsStr::new("--out"),
            xyz.as_os_str(),
        ]),
        &want,
    );
    fails(
        hiermd(&[
            OsStr::new("featurize"),
            OsStr::new("--data"),
            bad.as_os_str(),
            OsStr::new("--out"),
            dir.join("feats").as_os_str(),
        ]),
        &want,
    );
    let out = fails(hiermd(&[OsStr::new("verify"), bad.as_os_str()]), &want);
    assert!(
        out.contains("atoms.tsv") && out.contains("checksum mismatch"),
        "{out}"
    );
    let e = format!("{:#}", Dataset::open(&bad).err().expect("refused"));
    assert!(e.contains("token 99"), "{e}");

    // A residue index out of range, likewise.
    let res = dir.join("res");
    copy_dir(&data, &res);
    let table = res.join("atoms.tsv");
    let text = std::fs::read_to_string(&table).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let mut f: Vec<&str> = lines[2].split('\t').collect();
    f[4] = "7";
    lines[2] = f.join("\t");
    std::fs::write(&table, lines.join("\n") + "\n").unwrap();
    fails(
        hiermd(&[OsStr::new("info"), res.as_os_str()]),
        &["atoms.tsv", "line 3", "residue index 7", "4 residues"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_headers_and_times_are_named() {
    let dir = tmpdir("header");
    let (data, _) = make_dataset(&dir, &[20], 10);
    // Frame count overflowing the size computation: refused as corrupt, not wrapped around.
    let over = dir.join("over");
    copy_dir(&data, &over);
    let file = over.join("traj-0000.hmdt");
    let mut b = std::fs::read(&file).unwrap();
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&file, b).unwrap();
    fails(
        hiermd(&[OsStr::new("info"), over.as_os_str()]),
        &[
            "traj-0000.hmdt",
            "header claims 18446744073709551615 frames",
            "corrupt",
        ],
    );
    // A flipped bit in the header's unused bytes: harmless to readers, but verify reports the
    // damage (the disk is flipping bits).
    let pad = dir.join("pad");
    copy_dir(&data, &pad);
    flip_bit(&pad.join("traj-0000.hmdt"), 1000, 4);
    ok(hiermd(&[OsStr::new("info"), pad.as_os_str()]));
    fails(
        hiermd(&[OsStr::new("verify"), pad.as_os_str()]),
        &["traj-0000.hmdt", "header byte 1000", "corrupt"],
    );
    // A NaN time (the f64 block after the coordinates).
    let time = dir.join("time");
    copy_dir(&data, &time);
    let file = time.join("traj-0000.hmdt");
    let mut b = std::fs::read(&file).unwrap();
    let at = HEADER + 20 * ATOMS * 12 + 3 * 8;
    b[at..at + 8].copy_from_slice(&f64::NAN.to_le_bytes());
    std::fs::write(&file, b).unwrap();
    fails(
        hiermd(&[OsStr::new("verify"), time.as_os_str()]),
        &["traj-0000.hmdt", "frame 3: time is not finite"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes a feature store for `data` with features drawn from `seed`.
fn make_features(data: &Path, out: &Path, states: &[Vec<u32>], seed: u64) {
    let ds = Dataset::open(data).unwrap();
    let h = 16;
    let settings = FeatureSettings {
        channels: h,
        dtype: FeatureDtype::F32,
        ca_positions: true,
        ..Default::default()
    };
    let r = ds.manifest.tokens;
    let mut rng = Rng::new(seed);
    let mut w = FeatureWriter::create(&ds, out, &settings).unwrap();
    for (t, st) in states.iter().enumerate() {
        let n = st.len();
        let mut s = rng.normal_vec(n * r * h, 0.3);
        for (f, &x) in st.iter().enumerate() {
            for tok in 0..r {
                for c in 0..4 {
                    s[(f * r + tok) * h + c] += x as f32;
                }
            }
        }
        let v = rng.normal_vec(n * r * 3 * h, 0.3);
        let ca: Vec<f32> = (0..n * r * 3).map(|i| (i % (r * 3)) as f32 * 1.3).collect();
        w.append_frames(t, &s, &v, Some(&ca)).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn feature_stores_carry_checksums() {
    let dir = tmpdir("features");
    let (data, states) = make_dataset(&dir, &[30, 20], 7);
    let feats = dir.join("feats");
    make_features(&data, &feats, &states, 7);
    let m = std::fs::read_to_string(feats.join("manifest.toml")).unwrap();
    assert_eq!(m.matches("payload_xxh3 = ").count(), 2, "{m}");
    let out = ok(hiermd(&[OsStr::new("verify"), feats.as_os_str()]));
    assert!(out.contains("feat-0001.hmdf: payload XXH3"), "{out}");
    assert!(out.contains("computed from"), "{out}");

    let bad = dir.join("bad");
    copy_dir(&feats, &bad);
    flip_bit(&bad.join("feat-0001.hmdf"), 4096 + 1000, 2);
    // Opening stays cheap; verify finds it.
    store::FeatureStore::open(&bad).unwrap();
    fails(
        hiermd(&[OsStr::new("verify"), bad.as_os_str()]),
        &["feat-0001.hmdf", "payload checksum mismatch"],
    );
    // A NaN written into the features (checksum and value both named).
    let nan = dir.join("nan");
    copy_dir(&feats, &nan);
    write_f32(&nan.join("feat-0000.hmdf"), 4096 + 4 * 64 * 3, f32::NAN);
    fails(
        hiermd(&[OsStr::new("verify"), nan.as_os_str()]),
        &["feat-0000.hmdf", "payload checksum mismatch", "not finite"],
    );

    // A store written before checksums.
    let old = dir.join("old");
    copy_dir(&feats, &old);
    strip_checksums(&old.join("manifest.toml"));
    let out = ok(hiermd(&[OsStr::new("verify"), old.as_os_str()]));
    assert_eq!(out.matches("no checksum recorded").count(), 2, "{out}");

    // An implausible C-alpha position (the f32 block after the features of feat-0000).
    let ca = dir.join("ca");
    copy_dir(&feats, &ca);
    let tokens = Dataset::open(&data).unwrap().manifest.tokens;
    let ca_at = 4096 + 30 * tokens * 4 * 16 * 4;
    write_f32(
        &ca.join("feat-0000.hmdf"),
        ca_at + 12 * (2 * tokens + 1),
        1e30,
    );
    fails(
        hiermd(&[OsStr::new("verify"), ca.as_os_str()]),
        &[
            "feat-0000.hmdf",
            "frame 2: token 1: C-alpha coordinate",
            "implausible",
        ],
    );

    // A file path outside the store.
    let out_of = dir.join("outside");
    copy_dir(&feats, &out_of);
    edit(
        &out_of.join("manifest.toml"),
        "file = \"feat-0000.hmdf\"",
        "file = \"../feats/feat-0000.hmdf\"",
    );
    let e = format!(
        "{:#}",
        store::FeatureStore::open(&out_of).err().expect("refused")
    );
    assert!(e.contains("not a path inside the folder"), "{e}");

    // The dataset changed since the features were computed: verify says so.
    let m = std::fs::read_to_string(data.join("manifest.toml")).unwrap();
    std::fs::write(data.join("manifest.toml"), m + "# edited\n").unwrap();
    fails(
        hiermd(&[OsStr::new("verify"), feats.as_os_str()]),
        &["the dataset changed since"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn model_files_are_sealed_and_checked_before_use() {
    let dir = tmpdir("model");
    let (data, _) = make_dataset(&dir, &[10], 8);
    // Equal models are equal files, in every process (the sealed header is canonical).
    let paths: Vec<PathBuf> = (0..4)
        .map(|i| dir.join(format!("m{i}.safetensors")))
        .collect();
    for p in &paths {
        ok(hiermd(&[
            OsStr::new("init-model"),
            OsStr::new("--seed"),
            OsStr::new("5"),
            OsStr::new("--out"),
            p.as_os_str(),
        ]));
    }
    let first = std::fs::read(&paths[0]).unwrap();
    for p in &paths[1..] {
        assert!(
            std::fs::read(p).unwrap() == first,
            "{} differs",
            p.display()
        );
    }
    let out = ok(hiermd(&[OsStr::new("verify"), paths[0].as_os_str()]));
    assert!(out.contains("XXH3") && out.contains("matches"), "{out}");
    assert!(matches!(
        store::verify::check_model_file(&paths[0]).unwrap(),
        store::verify::Seal::Intact(_)
    ));

    // One flipped bit in the weights: verify and every loader refuse the file.
    let bad = dir.join("bad.safetensors");
    let mut b = first.clone();
    let at = b.len() - 100;
    b[at] ^= 0x10;
    std::fs::write(&bad, &b).unwrap();
    fails(
        hiermd(&[OsStr::new("verify"), bad.as_os_str()]),
        &["bad.safetensors", "checksum mismatch"],
    );
    fails(
        hiermd(&[
            OsStr::new("featurize"),
            OsStr::new("--data"),
            data.as_os_str(),
            OsStr::new("--model"),
            bad.as_os_str(),
            OsStr::new("--out"),
            dir.join("feats").as_os_str(),
        ]),
        &["bad.safetensors", "checksum mismatch"],
    );
    let e = hiermd::model::atom::AtomModel::load(&bad, &hiermd::Device::Cpu)
        .err()
        .expect("refused");
    assert!(format!("{e:#}").contains("checksum mismatch"), "{e:#}");
    // A flipped bit in the header's metadata is covered too.
    let bad_header = dir.join("bad-header.safetensors");
    let mut b = first.clone();
    let at = find(&b, b"\"hidden\\\":64").expect("the configuration in the header") + 11;
    b[at] ^= 0x01; // 64 -> 65
    std::fs::write(&bad_header, &b).unwrap();
    fails(
        hiermd(&[OsStr::new("verify"), bad_header.as_os_str()]),
        &["checksum mismatch"],
    );

    // A model without a seal (written before checksums): loads, verify says so.
    let st = safetensors::SafeTensors::deserialize(&first).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&first).unwrap();
    let mut meta = meta.metadata().clone().unwrap();
    assert!(meta.remove(store::verify::SEAL_KEY).is_some());
    let old = dir.join("old.safetensors");
    let tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = st.tensors();
    std::fs::write(&old, safetensors::serialize(tensors, Some(meta)).unwrap()).unwrap();
    let out = ok(hiermd(&[OsStr::new("verify"), old.as_os_str()]));
    assert!(out.contains("no checksum recorded"), "{out}");
    hiermd::model::atom::AtomModel::load(&old, &hiermd::Device::Cpu).unwrap();

    // Non-finite weights are named (a model file is checked for them whatever its seal says).
    let nan = dir.join("nan.safetensors");
    let w = [1.0f32, f32::NAN, 2.0];
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![3],
        bytemuck::cast_slice(&w),
    )
    .unwrap();
    std::fs::write(
        &nan,
        safetensors::serialize([("layer.w", view)], None).unwrap(),
    )
    .unwrap();
    fails(
        hiermd(&[OsStr::new("verify"), nan.as_os_str()]),
        &["non-finite values in layer.w[1]"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A small VAMP run configuration on frozen features: three epochs, every checkpoint kept.
fn run_config(data: &Path, features: &Path) -> String {
    format!(
        r#"
[data]
dataset = {data:?}
features = {features:?}
lag = 5

[model]
hidden = 16
heads = 1
blocks = 1
dropout = 0.0

[objective]
kind = "vamp"
outputs = 3

[optimizer]
lr = 3e-3

[train]
epochs = 3
batch = 128
patience = 0
seed = 3
keep_checkpoints = 3
"#,
        data = data.display().to_string(),
        features = features.display().to_string(),
    )
}

#[test]
fn resume_uses_the_newest_intact_checkpoint() {
    let dir = tmpdir("resume");
    let (data, states) = make_dataset(&dir, &[260, 200], 9);
    let feats = dir.join("feats");
    make_features(&data, &feats, &states, 9);
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, run_config(&data, &feats)).unwrap();
    let run = dir.join("run");
    ok(hiermd(&[
        OsStr::new("train"),
        OsStr::new("--config"),
        cfg.as_os_str(),
        OsStr::new("--run"),
        run.as_os_str(),
    ]));
    let model = std::fs::read(run.join("model.safetensors")).unwrap();
    let metrics = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let out = ok(hiermd(&[OsStr::new("verify"), run.as_os_str()]));
    for w in [
        "model.safetensors: XXH3",
        "best.safetensors: XXH3",
        "checkpoints/epoch-000001: 3 files, every XXH3 matches",
        "checkpoints/epoch-000003: 3 files, every XXH3 matches",
        "checkpoints/latest names epoch-000003",
    ] {
        assert!(out.contains(w), "lacks {w:?}:\n{out}");
    }
    let ckpt = |r: &Path, e: u64| r.join(format!("checkpoints/epoch-{e:06}"));
    let resume = |r: &Path| {
        hiermd(&[
            OsStr::new("train"),
            OsStr::new("--resume"),
            OsStr::new("--run"),
            r.as_os_str(),
        ])
    };

    // A flipped bit in the newest checkpoint: verify names it; --resume skips it, says so,
    // redoes epoch 3 from epoch 2 and ends with the same model (training is deterministic).
    let a = dir.join("a");
    copy_dir(&run, &a);
    let params = ckpt(&a, 3).join("params.safetensors");
    let len = std::fs::metadata(&params).unwrap().len() as usize;
    flip_bit(&params, len - 17, 3);
    fails(
        hiermd(&[OsStr::new("verify"), a.as_os_str()]),
        &["epoch-000003/params.safetensors", "checksum mismatch"],
    );
    let err = ok(resume(&a));
    assert!(
        err.contains("epoch-000003 is damaged and skipped")
            && err.contains("params.safetensors: checksum mismatch")
            && err.contains("resuming from")
            && err.contains("epoch-000002, the newest intact checkpoint"),
        "{err}"
    );
    assert!(std::fs::read(a.join("model.safetensors")).unwrap() == model);
    ok(hiermd(&[OsStr::new("verify"), a.as_os_str()]));

    // `latest` deleted: the newest intact checkpoint (epoch 3) is used, nothing is redone.
    let b = dir.join("b");
    copy_dir(&run, &b);
    std::fs::remove_file(b.join("checkpoints/latest")).unwrap();
    let out = ok(hiermd(&[OsStr::new("verify"), b.as_os_str()]));
    assert!(out.contains("checkpoints/latest is missing"), "{out}");
    let err = ok(resume(&b));
    assert!(
        err.contains("latest is missing") && err.contains("epoch-000003, the newest intact"),
        "{err}"
    );
    assert!(
        std::fs::read(b.join("metrics.jsonl")).unwrap() == metrics,
        "epochs were redone"
    );
    assert!(std::fs::read(b.join("model.safetensors")).unwrap() == model);

    // `latest` deleted and the newest checkpoint damaged: epoch 2.
    let c = dir.join("c");
    copy_dir(&run, &c);
    std::fs::remove_file(c.join("checkpoints/latest")).unwrap();
    flip_bit(&ckpt(&c, 3).join("optim.safetensors"), 200, 0);
    let err = ok(resume(&c));
    assert!(
        err.contains("epoch-000003 is damaged") && err.contains("epoch-000002, the newest intact"),
        "{err}"
    );
    assert!(std::fs::read(c.join("model.safetensors")).unwrap() == model);

    // `latest` naming a checkpoint that is not there: the newest intact one.
    let e = dir.join("e");
    copy_dir(&run, &e);
    std::fs::write(e.join("checkpoints/latest"), "epoch-000007").unwrap();
    let err = ok(resume(&e));
    assert!(
        err.contains("names epoch-000007, which is missing")
            && err.contains("epoch-000003, the newest intact"),
        "{err}"
    );

    // A checkpoint written before manifests: used after a structural check, and verify says
    // it has no checksum; a checkpoint whose state disagrees with its folder is reported.
    let f = dir.join("f");
    copy_dir(&run, &f);
    std::fs::remove_file(ckpt(&f, 3).join("manifest.toml")).unwrap();
    std::fs::rename(ckpt(&f, 1), ckpt(&f, 9)).unwrap();
    std::fs::write(f.join("summary.json"), "{\"epochs\": 3").unwrap();
    let out = fails(
        hiermd(&[OsStr::new("verify"), f.as_os_str()]),
        &[
            "checkpoints/epoch-000003: no checksum recorded",
            "says epoch 1, the folder is epoch 9",
            "summary.json",
        ],
    );
    assert_eq!(out.matches("FAIL").count(), 2, "{out}");
    let err = ok(resume(&f));
    assert!(!err.contains("damaged"), "{err}");
    assert!(std::fs::read(f.join("model.safetensors")).unwrap() == model);

    // A damaged model: the commands that load it refuse it.
    let g = dir.join("g");
    copy_dir(&run, &g);
    let len = model.len();
    flip_bit(&g.join("model.safetensors"), len - 9, 1);
    fails(
        hiermd(&[
            OsStr::new("transform"),
            g.as_os_str(),
            OsStr::new("--out"),
            dir.join("chi.npy").as_os_str(),
        ]),
        &["model.safetensors", "checksum mismatch"],
    );
    assert!(!dir.join("chi.npy").exists());
    // A damaged best.safetensors never becomes the model.
    let best = std::fs::read(g.join("best.safetensors")).unwrap();
    flip_bit(&g.join("best.safetensors"), best.len() - 9, 1);
    fails(resume(&g), &["best.safetensors", "checksum mismatch"]);

    // No intact checkpoint: a clear error, and the run folder is left as it was.
    let d = dir.join("d");
    copy_dir(&run, &d);
    for e in 1..=3 {
        flip_bit(&ckpt(&d, e).join("state.json"), 2, 0);
    }
    let before = std::fs::read(d.join("model.safetensors")).unwrap();
    fails(
        resume(&d),
        &[
            "no intact checkpoint",
            "epoch-000001",
            "epoch-000003",
            "checksum mismatch",
        ],
    );
    assert!(std::fs::read(d.join("model.safetensors")).unwrap() == before);
    let _ = std::fs::remove_dir_all(&dir);
}
