//! The trajectory store: import, info, export, crash safety, lagged pairs and bad input, on the
//! real ADK files of MDAnalysisTests (fetched by datasets/adk/fetch).

mod common;

use hiermd::store::{
    self, BatchLoader, Dataset, ExportFormat, ImportOptions, Lag, LaggedPairs, Split,
};
use hiermd::topology::read_topology;
use hiermd::traj::{open_trajectory, Frame};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hiermd-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn opts(top: &Path, traj: &[PathBuf], out: &Path) -> ImportOptions {
    ImportOptions {
        topology: top.to_path_buf(),
        trajectories: traj.to_vec(),
        out: out.to_path_buf(),
        selection: "heavy".into(),
        token_map: None,
        time_step_ps: None,
        max_frames: None,
        force: false,
        progress: false,
    }
}

fn hiermd_bin() -> String {
    std::env::var("HIERMD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hiermd").to_string())
}

/// Every frame of a source file, selected atoms only.
fn source_frames(path: &Path, selected: &[usize]) -> Vec<Vec<f32>> {
    let mut r = open_trajectory(path).unwrap();
    let mut f = Frame::default();
    let mut out = Vec::new();
    while r.read_frame(&mut f).unwrap() {
        out.push(
            selected
                .iter()
                .flat_map(|&i| f.coords[3 * i..3 * i + 3].to_vec())
                .collect(),
        );
    }
    out
}

#[test]
fn import_adk_dcd_heavy_atoms_round_trips() {
    let data = common::adk_data();
    let dir = tmpdir("adk-dcd");
    let out = dir.join("adk");
    let trajs = [data.join("adk_dims.dcd"), data.join("adk_dims2.dcd")];
    let (ds, report) = store::import(&opts(&data.join("adk.psf"), &trajs, &out)).unwrap();
    let top = read_topology(&data.join("adk.psf")).unwrap();
    let heavy: Vec<usize> = (0..top.len())
        .filter(|&i| top.atoms[i].atomic_number > 1)
        .collect();
    assert_eq!(ds.natoms(), heavy.len());
    assert_eq!(ds.manifest.residues, 214, "ADK has 214 residues");
    assert_eq!(ds.manifest.tokens, 214);
    assert_eq!(ds.manifest.selection, "heavy");
    assert_eq!(report.frames.len(), 2);
    for (k, path) in trajs.iter().enumerate() {
        let want = source_frames(path, &heavy);
        let t = &ds.trajectories[k];
        assert_eq!(t.frames(), want.len());
        for (i, w) in want.iter().enumerate() {
            assert_eq!(
                t.frame(i),
                &w[..],
                "trajectory {k} frame {i} differs from the source"
            );
        }
    }
    // Tokens are residues; the atom table names each atom.
    assert!(ds
        .atoms
        .iter()
        .all(|a| a.atomic_number > 1 && a.token == a.residue));
    assert_eq!(ds.atoms[0].name, top.atoms[heavy[0]].name);
    // Reopening gives the same dataset.
    let again = Dataset::open(&out).unwrap();
    assert_eq!(again.manifest, ds.manifest);
    assert!(store::describe(&again).contains("214 residues"));

    // Export to npy and back.
    let npy = dir.join("f.npy");
    let n = store::export(&ds, 1, "3:9", ExportFormat::Npy, &npy).unwrap();
    assert_eq!(n, 6);
    let bytes = std::fs::read(&npy).unwrap();
    assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(
        header.contains(&format!("'shape': (6, {}, 3)", ds.natoms())),
        "{header}"
    );
    assert_eq!((10 + hlen) % 64, 0, "data 64-byte aligned");
    let vals: &[f32] = bytemuck::cast_slice(&bytes[10 + hlen..]);
    assert_eq!(
        vals,
        &ds.trajectories[1].coords()[3 * ds.natoms() * 3..9 * ds.natoms() * 3]
    );

    // Export to PDB and read it back as a trajectory: coordinates to the PDB's 1e-3 precision.
    let pdb = dir.join("f.pdb");
    store::export(&ds, 0, "0:2", ExportFormat::Pdb, &pdb).unwrap();
    let back = source_frames(&pdb, &(0..ds.natoms()).collect::<Vec<_>>());
    assert_eq!(back.len(), 2);
    for (i, f) in back.iter().enumerate() {
        for (a, b) in f.iter().zip(ds.trajectories[0].frame(i)) {
            assert!((a - b).abs() <= 5.1e-4, "pdb export frame {i}: {a} vs {b}");
        }
    }
    let ptop = read_topology(&pdb).unwrap();
    assert_eq!(
        ptop.atoms
            .iter()
            .map(|a| a.name.clone())
            .collect::<Vec<_>>(),
        ds.atoms.iter().map(|a| a.name.clone()).collect::<Vec<_>>()
    );
    store::export(&ds, 0, ":1", ExportFormat::Xyz, &dir.join("f.xyz")).unwrap();
    let xyz = std::fs::read_to_string(dir.join("f.xyz")).unwrap();
    assert!(xyz.starts_with(&format!("{}\nframe 0", ds.natoms())));
    assert!(
        store::export(&ds, 5, ":", ExportFormat::Npy, &npy).is_err(),
        "no trajectory 5"
    );
    assert!(
        store::export(&ds, 0, "50:10", ExportFormat::Npy, &npy).is_err(),
        "empty range"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn import_adk_xtc_keeps_triclinic_boxes_and_times() {
    let data = common::adk_data();
    let dir = tmpdir("adk-xtc");
    let out = dir.join("adk");
    let mut o = opts(
        &data.join("adk_oplsaa.gro"),
        &[data.join("adk_oplsaa.xtc")],
        &out,
    );
    o.selection = "protein and heavy".into();
    let (ds, _) = store::import(&o).unwrap();
    assert_eq!(ds.manifest.residues, 214);
    let entry = &ds.manifest.trajectories[0];
    assert!(entry.has_box && entry.has_time);
    let mut r = open_trajectory(&data.join("adk_oplsaa.xtc")).unwrap();
    let mut f = Frame::default();
    r.read_frame(&mut f).unwrap();
    assert_eq!(ds.trajectories[0].unit_cell(0), f.unit_cell);
    assert_eq!(ds.trajectories[0].time_ps(0), f.time_ps);
    assert_eq!(ds.manifest.time_step_ps, entry.time_step_ps);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn failed_import_leaves_nothing_and_existing_datasets_are_kept() {
    let data = common::adk_data();
    let dir = tmpdir("atomic");
    let out = dir.join("ds");
    // The second trajectory has the wrong atom count: the whole import fails.
    let e = store::import(&opts(
        &data.join("adk.psf"),
        &[data.join("adk_dims.dcd"), data.join("adk_oplsaa.xtc")],
        &out,
    ))
    .err()
    .expect("atom count mismatch");
    let msg = format!("{e:#}");
    assert!(
        msg.contains("adk_oplsaa.xtc") && msg.contains("47681") && msg.contains("3341"),
        "{msg}"
    );
    assert!(!out.exists(), "no dataset after a failed import");
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        0,
        "no temporary folder left"
    );
    // An existing dataset is not overwritten without --force.
    store::import(&opts(
        &data.join("adk.psf"),
        &[data.join("adk_dims.dcd")],
        &out,
    ))
    .unwrap();
    let e = store::import(&opts(
        &data.join("adk.psf"),
        &[data.join("adk_dims.dcd")],
        &out,
    ))
    .err()
    .expect("exists");
    assert!(format!("{e:#}").contains("already exists"));
    let mut o = opts(&data.join("adk.psf"), &[data.join("adk_dims2.dcd")], &out);
    o.force = true;
    let (ds, _) = store::import(&o).unwrap();
    assert!(ds.manifest.trajectories[0]
        .source
        .path
        .ends_with("adk_dims2.dcd"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn import_killed_midway_leaves_no_dataset_and_rerun_succeeds() {
    let data = common::adk_data();
    let dir = tmpdir("killed");
    let out = dir.join("ds");
    let args = |cmd: &mut Command| {
        cmd.args(["import", "--top"])
            .arg(data.join("adk.psf"))
            .arg("--traj")
            .arg(data.join("adk_dims.dcd"))
            .arg(data.join("adk_dims2.dcd"))
            .arg("--out")
            .arg(&out);
    };
    let mut cmd = Command::new(hiermd_bin());
    args(&mut cmd);
    // Abort (like a kill: no destructors, no cleanup) in the middle of the second trajectory.
    let status = cmd
        .env("HIERMD_FAULT_ABORT_AFTER_FRAMES", "40")
        .output()
        .unwrap()
        .status;
    assert!(!status.success(), "the fault-injected import must die");
    assert!(!out.exists(), "a killed import leaves no dataset");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "the killed import's temporary folder is there: {leftovers:?}"
    );
    let mut cmd = Command::new(hiermd_bin());
    args(&mut cmd);
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "rerun failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let ds = Dataset::open(&out).unwrap();
    assert_eq!(ds.trajectories.len(), 2);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        names,
        vec![std::ffi::OsString::from("ds")],
        "the stale temporary folder was cleaned up"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn lagged_pairs_split_and_batches() {
    let data = common::adk_data();
    let dir = tmpdir("pairs");
    let out = dir.join("ds");
    let mut o = opts(
        &data.join("adk.psf"),
        &[data.join("adk_dims.dcd"), data.join("adk_dims2.dcd")],
        &out,
    );
    o.time_step_ps = Some(2.0);
    let (ds, _) = store::import(&o).unwrap();
    let n: Vec<usize> = ds.trajectories.iter().map(|t| t.frames()).collect();

    let p = LaggedPairs::new(&ds, Lag::Frames(5), &Split::default()).unwrap();
    let cut: Vec<usize> = n
        .iter()
        .map(|&f| (f as f64 * 0.8).round() as usize)
        .collect();
    assert_eq!(p.train.len(), cut.iter().map(|c| c - 5).sum::<usize>());
    assert_eq!(
        p.validation.len(),
        n.iter().zip(&cut).map(|(f, c)| f - c - 5).sum::<usize>()
    );
    for q in &p.train {
        assert!(
            ((q.t + q.lag) as usize) < cut[q.traj as usize],
            "training pair crosses into validation"
        );
    }
    for q in &p.validation {
        assert!(q.t as usize >= cut[q.traj as usize]);
    }
    // Lag in time: 10 ps at 2 ps per frame is 5 frames.
    let pt = LaggedPairs::new(&ds, Lag::Time(10.0), &Split::default()).unwrap();
    assert_eq!(pt.train, p.train);
    assert!(
        LaggedPairs::new(&ds, Lag::Time(3.0), &Split::default()).is_err(),
        "1.5 frames"
    );
    // By trajectory.
    let pb = LaggedPairs::new(
        &ds,
        Lag::Frames(3),
        &Split::ByTrajectory {
            validation: vec![1],
        },
    )
    .unwrap();
    assert_eq!(pb.train.len(), n[0] - 3);
    assert_eq!(pb.validation.len(), n[1] - 3);
    // A lag longer than a trajectory's part is an error naming it.
    let e = LaggedPairs::new(&ds, Lag::Frames(n[0]), &Split::default()).unwrap_err();
    assert!(format!("{e:#}").contains("adk_dims.dcd"), "{e:#}");

    // Batches: every pair once per epoch, in a seeded order; contents straight from the frames.
    let ds = Arc::new(ds);
    let epoch = |seed, epoch| -> Vec<store::Batch> {
        BatchLoader::new(
            ds.clone(),
            p.train.clone(),
            16,
            seed,
            epoch..epoch + 1,
            true,
            2,
        )
        .collect()
    };
    let b1 = epoch(7, 0);
    let b2 = epoch(7, 0);
    let b3 = epoch(7, 1);
    let order = |b: &[store::Batch]| b.iter().flat_map(|x| x.pairs.clone()).collect::<Vec<_>>();
    assert_eq!(order(&b1), order(&b2), "same seed and epoch, same order");
    assert_ne!(order(&b1), order(&b3), "another epoch, another order");
    let mut seen = order(&b1);
    seen.sort_by_key(|q| (q.traj, q.t));
    let mut all = p.train.clone();
    all.sort_by_key(|q| (q.traj, q.t));
    assert_eq!(seen, all, "each pair exactly once");
    let stride = ds.natoms() * 3;
    for b in &b1 {
        for (k, q) in b.pairs.iter().enumerate() {
            let t = &ds.trajectories[q.traj as usize];
            assert_eq!(&b.x_t[k * stride..(k + 1) * stride], t.frame(q.t as usize));
            assert_eq!(
                &b.x_lag[k * stride..(k + 1) * stride],
                t.frame((q.t + q.lag) as usize)
            );
        }
    }
    // One loader over several epochs gives the same batches as one loader per epoch, and marks
    // the epoch boundaries.
    let multi: Vec<store::Batch> =
        BatchLoader::new(ds.clone(), p.train.clone(), 16, 7, 0..2, true, 2).collect();
    assert_eq!(order(&multi), [order(&b1), order(&b3)].concat());
    assert_eq!(multi.iter().filter(|b| b.last_in_epoch).count(), 2);
    assert!(
        multi.iter().take(b1.len()).all(|b| b.epoch == 0)
            && multi.iter().skip(b1.len()).all(|b| b.epoch == 1)
    );
    // Dropping a loader early stops its thread.
    let mut l = BatchLoader::new(ds.clone(), p.train.clone(), 4, 1, 0..1, true, 1);
    assert!(l.next().is_some());
    drop(l);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn custom_token_map_and_bad_inputs() {
    let data = common::adk_data();
    let dir = tmpdir("tokens");
    // A token map grouping every two residues: given per topology atom.
    let top = read_topology(&data.join("adk.psf")).unwrap();
    let res = top.residue_indices();
    let map: String = res.iter().map(|r| format!("{}\n", r / 2)).collect();
    std::fs::write(dir.join("map.txt"), map).unwrap();
    let mut o = opts(
        &data.join("adk.psf"),
        &[data.join("adk_dims.dcd")],
        &dir.join("ds"),
    );
    o.token_map = Some(dir.join("map.txt"));
    let (ds, _) = store::import(&o).unwrap();
    assert_eq!(ds.manifest.tokens, 107);
    assert!(ds.atoms.iter().all(|a| a.token == a.residue / 2));
    assert!(ds.manifest.token_map.is_some());

    // A token map of the wrong length.
    std::fs::write(dir.join("bad.txt"), "0 1 2").unwrap();
    o.out = dir.join("ds2");
    o.token_map = Some(dir.join("bad.txt"));
    let e = store::import(&o).err().unwrap();
    assert!(format!("{e:#}").contains("3 entries"), "{e:#}");
    // An empty selection.
    o.token_map = None;
    o.selection = "resname XYZ".into();
    assert!(store::import(&o).is_err());
    assert!(!dir.join("ds2").exists());
    // An unknown element (issue 16, interop): stored as element X (Z = 0), with a warning that
    // names the atom; the atom stage refuses it later (tests/bounded_inputs.rs).
    let pdb = dir.join("odd.pdb");
    std::fs::write(
        &pdb,
        "ATOM      1  N   ALA A   1       0.000   0.000   0.000  1.00  0.00           N\n\
         ATOM      2  QQ  ALA A   1       1.000   0.000   0.000  1.00  0.00           Qq\nEND\n",
    )
    .unwrap();
    let (ds, report) = store::import(&ImportOptions {
        selection: "all".into(),
        ..opts(&pdb, std::slice::from_ref(&pdb), &dir.join("ds3"))
    })
    .unwrap();
    assert_eq!(
        (ds.atoms[1].element.as_str(), ds.atoms[1].atomic_number),
        ("X", 0)
    );
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("1 stored atoms have no element") && w.contains("QQ")),
        "{:?}",
        report.warnings
    );
    // Not a dataset.
    assert!(Dataset::open(&dir).is_err());
    let _ = std::fs::remove_dir_all(dir);
}
