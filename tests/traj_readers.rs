//! Reader-level tests of the trajectory readers (`hiermd::traj`): the ADK files of MDAnalysisTests
//! against values MDAnalysis reads from them, round trips through small files written here in
//! every byte order and precision, every truncation point of those files, NaN injection and
//! corrupt headers.

mod common;
mod traj_write;

use hiermd::traj::{open_trajectory, DcdReader, Frame, TrajectoryReader, XtcReader};
use std::path::Path;
use traj_write::*;

/// Values MDAnalysis reads from one ADK file.
struct Reference {
    file: &'static str,
    natoms: usize,
    nframes: usize,
    frames: &'static [RefFrame],
}

/// Values MDAnalysis reads from one frame.
struct RefFrame {
    index: usize,
    /// `ts.time`.
    time_ps: Option<f64>,
    /// `ts.data["step"]` (XTC and TRR only: for DCD MDAnalysis stores a frame counter there).
    step: Option<i64>,
    /// `ts.dimensions`: a, b, c (Angstrom), alpha, beta, gamma (degrees).
    dims: Option<[f64; 6]>,
    /// Sum of all coordinates in f64: catches an error in any atom.
    coord_sum: f64,
    /// Positions of atoms 0, 1, n/2 and n-1.
    atoms: &'static [(usize, [f32; 3])],
}

/// Reference values printed by MDAnalysis 2.11.0 (numpy 2.4.6, Python 3.11) with its DCDReader,
/// XTCReader, TRRReader and PDBReader on the MDAnalysisTests 2.11.0 files. Our readers agree with
/// it bit for bit on every coordinate of every frame of these files (checked when they were
/// written); the tests keep a few values.
const REFERENCES: &[Reference] = &[
    Reference {
        file: "adk_dims.dcd",
        natoms: 3341,
        nframes: 98,
        frames: &[
            RefFrame {
                index: 0,
                time_ps: Some(0.9999999119200186),
                step: None,
                dims: None,
                coord_sum: -210.83578823902644,
                atoms: &[
                    (0, [11.736044, 8.500797, -10.445281]),
                    (1, [12.365119, 7.839936, -10.834842]),
                    (1670, [0.9588275, 7.5105734, 8.236181]),
                    (3340, [5.5854015, 17.589624, -6.9656615]),
                ],
            },
            RefFrame {
                index: 97,
                time_ps: Some(97.99999136816182),
                step: None,
                dims: None,
                coord_sum: -456.4076486763661,
                atoms: &[
                    (0, [15.876622, 6.8487034, -8.291452]),
                    (1, [16.574718, 6.384349, -7.6659393]),
                    (1670, [0.92217535, 7.253204, 6.2016554]),
                    (3340, [12.376507, 14.945225, -6.560634]),
                ],
            },
        ],
    },
    Reference {
        file: "adk_dims2.dcd",
        natoms: 3341,
        nframes: 102,
        frames: &[
            RefFrame {
                index: 0,
                time_ps: Some(0.0),
                step: None,
                dims: None,
                coord_sum: 314610.75595474243,
                atoms: &[
                    (0, [26.879398, 53.00945, 40.999794]),
                    (1, [26.804161, 52.05094, 41.55621]),
                    (1670, [14.778295, 40.07703, 28.612568]),
                    (3340, [15.054549, 55.95846, 38.1839]),
                ],
            },
            RefFrame {
                index: 101,
                time_ps: Some(100.9999938998707),
                step: None,
                dims: None,
                coord_sum: 308404.5075893402,
                atoms: &[
                    (0, [26.145397, 52.39151, 40.562202]),
                    (1, [27.093042, 52.80227, 40.7743]),
                    (1670, [15.767098, 41.265682, 27.123161]),
                    (3340, [17.350647, 54.890778, 40.302544]),
                ],
            },
        ],
    },
    Reference {
        file: "adk_oplsaa.xtc",
        natoms: 47681,
        nframes: 10,
        frames: &[
            RefFrame {
                index: 0,
                time_ps: Some(0.0),
                step: Some(0),
                dims: Some([
                    80.01700592041016,
                    80.01700592041016,
                    80.01700592041016,
                    60.0,
                    60.0,
                    90.0,
                ]),
                coord_sum: 6109178.9800080415,
                atoms: &[
                    (0, [52.02, 43.560005, 31.550003]),
                    (1, [51.190002, 44.11, 31.720001]),
                    (23840, [18.630001, 68.0, 3.56]),
                    (47680, [62.960007, 47.240005, 3.7500002]),
                ],
            },
            RefFrame {
                index: 9,
                time_ps: Some(900.0000610351562),
                step: Some(450000),
                dims: Some([
                    80.0852279663086,
                    80.0852279663086,
                    80.0852279663086,
                    60.0,
                    60.0,
                    90.0,
                ]),
                coord_sum: 6115803.3501518285,
                atoms: &[
                    (0, [52.760002, 36.81, 30.42]),
                    (1, [52.480003, 36.06, 29.800003]),
                    (23840, [6.9900007, 30.32, 7.2700005]),
                    (47680, [72.25, 34.570004, 51.08]),
                ],
            },
        ],
    },
    Reference {
        file: "adk_oplsaa.trr",
        natoms: 47681,
        nframes: 10,
        frames: &[
            RefFrame {
                index: 0,
                time_ps: Some(0.0),
                step: Some(0),
                dims: Some([
                    80.01700592041016,
                    80.01700592041016,
                    80.01700592041016,
                    60.0,
                    60.0,
                    90.0,
                ]),
                coord_sum: 6109176.937667718,
                atoms: &[
                    (0, [52.017067, 43.56005, 31.554958]),
                    (1, [51.18792, 44.112053, 31.722015]),
                    (23840, [18.62949, 68.000275, 3.5557654]),
                    (47680, [62.961002, 47.239, 3.7529998]),
                ],
            },
            RefFrame {
                index: 9,
                time_ps: Some(900.0000610351562),
                step: Some(450000),
                dims: Some([
                    80.0852279663086,
                    80.0852279663086,
                    80.0852279663086,
                    60.0,
                    60.0,
                    90.0,
                ]),
                coord_sum: 6115802.757466018,
                atoms: &[
                    (0, [52.75599, 36.812637, 30.419785]),
                    (1, [52.47992, 36.062862, 29.801918]),
                    (23840, [6.988315, 30.31686, 7.27391]),
                    (47680, [72.2523, 34.568832, 51.082417]),
                ],
            },
        ],
    },
    Reference {
        file: "adk_oplsaa.pdb",
        natoms: 47681,
        nframes: 1,
        frames: &[RefFrame {
            index: 0,
            time_ps: None,
            step: None,
            dims: Some([
                80.01699829101562,
                80.01699829101562,
                80.01699829101562,
                60.0,
                60.0,
                90.0,
            ]),
            coord_sum: 6109177.026995875,
            atoms: &[
                (0, [52.017, 43.56, 31.555]),
                (1, [51.188, 44.112, 31.722]),
                (23840, [18.629, 68.001, 3.555]),
                (47680, [62.961, 47.239, 3.753]),
            ],
        }],
    },
    Reference {
        file: "adk_open.pdb",
        natoms: 3341,
        nframes: 1,
        frames: &[RefFrame {
            index: 0,
            time_ps: None,
            step: None,
            dims: Some([
                80.01699829101562,
                80.01699829101562,
                80.01699829101562,
                60.0,
                60.0,
                90.0,
            ]),
            coord_sum: 67733.78189904918,
            atoms: &[
                (0, [-11.921, 26.307, 10.41]),
                (1, [-11.447, 26.741, 9.595]),
                (1670, [0.11, 14.091, 22.261]),
                (3340, [-12.417, 26.877, 21.494]),
            ],
        }],
    },
    Reference {
        file: "adk_closed.pdb",
        natoms: 3341,
        nframes: 1,
        frames: &[RefFrame {
            index: 0,
            time_ps: None,
            step: None,
            dims: None,
            coord_sum: 51152.025028811186,
            atoms: &[
                (0, [-11.053, 26.68, 12.742]),
                (1, [-10.557, 27.134, 11.954]),
                (1670, [0.979, 10.061, 19.807]),
                (3340, [-12.836, 22.125, 24.355]),
            ],
        }],
    },
];

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn adk_files_match_mdanalysis() {
    let dir = common::adk_data();
    for r in REFERENCES {
        let path = dir.join(r.file);
        let mut reader = open_trajectory(&path).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(reader.natoms(), r.natoms, "{}", r.file);
        if r.file.ends_with(".dcd") {
            assert_eq!(reader.nframes_hint(), Some(r.nframes), "{}", r.file);
        }
        let mut frame = Frame::default();
        let mut n = 0;
        while reader
            .read_frame(&mut frame)
            .unwrap_or_else(|e| panic!("{e:#}"))
        {
            if let Some(rf) = r.frames.iter().find(|f| f.index == n) {
                let what = format!("{} frame {n}", r.file);
                match (frame.time_ps, rf.time_ps) {
                    (Some(t), Some(want)) => assert!(
                        close(t, want, 1e-9 * want.abs().max(1.0)),
                        "{what}: time {t} vs {want}"
                    ),
                    (got, want) => assert_eq!(got, want, "{what}: time"),
                }
                if rf.step.is_some() {
                    assert_eq!(frame.step, rf.step, "{what}: step");
                }
                match (frame.unit_cell, rf.dims) {
                    (Some(cell), Some(want)) => {
                        let got = cell.lengths_angles();
                        for k in 0..6 {
                            assert!(
                                close(got[k], want[k], 1e-3),
                                "{what}: dims {got:?} vs {want:?}"
                            );
                        }
                    }
                    (None, None) => {}
                    (got, want) => panic!("{what}: unit cell {got:?} vs dimensions {want:?}"),
                }
                for &(atom, want) in rf.atoms {
                    let got = &frame.coords[3 * atom..3 * atom + 3];
                    for k in 0..3 {
                        assert!(
                            close(got[k] as f64, want[k] as f64, 1e-4),
                            "{what}: atom {atom}: {got:?} vs {want:?}"
                        );
                    }
                }
                let sum: f64 = frame.coords.iter().map(|&x| x as f64).sum();
                assert!(
                    close(sum, rf.coord_sum, 1e-3),
                    "{what}: coordinate sum {sum} vs {}",
                    rf.coord_sum
                );
            }
            n += 1;
        }
        assert_eq!(n, r.nframes, "{}: frame count", r.file);
        assert_eq!(reader.position(), r.nframes, "{}", r.file);
    }
}

#[test]
fn adk_dims_dcd_header_details() {
    let path = common::adk_data().join("adk_dims.dcd");
    let mut r = DcdReader::open(&path).unwrap();
    let h = r.header().clone();
    // The header claims 500 frames; the file holds 98 (what MDAnalysis reports too).
    assert_eq!(h.nset, 500);
    assert_eq!(r.nframes_hint(), Some(98));
    assert!(!r.is_truncated());
    assert_eq!((h.istart, h.nsavc, h.charmm_version), (1000, 1000, 35));
    assert!(!h.has_unit_cell && !h.four_dims && h.nfixed == 0);
    assert!(h.title.contains("DIMS ADK SEQUENCE"), "{}", h.title);
    let mut f = Frame::default();
    assert!(r.read_frame(&mut f).unwrap());
    // Our step is the MD step, ISTART + i * NSAVC.
    assert_eq!(f.step, Some(1000));
    let path2 = common::adk_data().join("adk_dims2.dcd");
    let r2 = DcdReader::open(&path2).unwrap();
    // Unit-cell records present but all zero: no box (MDAnalysis: dimensions None).
    assert!(r2.header().has_unit_cell);
}

#[test]
fn adk_xtc_trr_pdb_agree() {
    let dir = common::adk_data();
    let first = |f: &str| {
        let mut r = open_trajectory(&dir.join(f)).unwrap();
        let mut fr = Frame::default();
        assert!(r.read_frame(&mut fr).unwrap());
        fr
    };
    let (xtc, trr, pdb) = (
        first("adk_oplsaa.xtc"),
        first("adk_oplsaa.trr"),
        first("adk_oplsaa.pdb"),
    );
    let mut xr = XtcReader::open(&dir.join("adk_oplsaa.xtc")).unwrap();
    assert_eq!(xr.precision(), None);
    xr.read_frame(&mut Frame::default()).unwrap();
    assert_eq!(xr.precision(), Some(1000.0));
    // XTC rounds to 1e-3 nm (0.005 Angstrom at most); the PDB, with 1e-3 Angstrom columns, was
    // not written from this TRR frame exactly (up to 0.0012 Angstrom apart).
    let max_diff = |a: &Frame, b: &Frame| {
        a.coords
            .iter()
            .zip(&b.coords)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(max_diff(&xtc, &trr) <= 0.0051, "{}", max_diff(&xtc, &trr));
    assert!(max_diff(&pdb, &trr) <= 0.002, "{}", max_diff(&pdb, &trr));
}

/// Prints read speeds of the ADK XTC and DCD (meaningful with `cargo test --release -- --nocapture`).
#[test]
fn adk_read_speed() {
    let dir = common::adk_data();
    for f in [
        "adk_oplsaa.xtc",
        "adk_dims.dcd",
        "adk_oplsaa.trr",
        "adk_oplsaa.pdb",
    ] {
        let path = dir.join(f);
        let bytes = std::fs::metadata(&path).unwrap().len() as f64;
        let mut best = f64::MAX;
        let mut frame = Frame::default();
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let mut r = open_trajectory(&path).unwrap();
            while r.read_frame(&mut frame).unwrap() {}
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "read speed {f}: {:.0} MB/s ({:.2} ms)",
            bytes / 1e6 / best,
            best * 1e3
        );
    }
}

// ---------------------------------------------------------------------------------------------
// DCD

fn dcd_frames(natoms: usize, nframes: usize, seed: u64) -> Vec<DcdFrame> {
    (0..nframes)
        .map(|k| DcdFrame {
            coords: pseudo_random(3 * natoms, seed + k as u64, -50.0, 50.0),
            cell: [30.0 + k as f64, 0.0, 40.0, 0.0, 0.0, 50.0],
        })
        .collect()
}

fn assert_err_names(err: &anyhow::Error, path: &Path, needles: &[&str]) {
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name the file: {msg}"
    );
    for n in needles {
        assert!(msg.contains(n), "error lacks {n:?}: {msg}");
    }
}

#[test]
fn dcd_round_trip_both_endians_and_flavours() {
    let natoms = 7;
    let frames = dcd_frames(natoms, 4, 1);
    for big_endian in [false, true] {
        for (charmm, with_cell) in [(true, true), (true, false), (false, false)] {
            let spec = DcdSpec {
                big_endian,
                charmm,
                with_cell,
                istart: 10,
                nsavc: 5,
                delta: 0.5,
                nset: 99,
                ..Default::default()
            };
            let file = TempFile::new("rt.dcd", &dcd_bytes(&spec, natoms, &frames));
            let r = DcdReader::open(file.path()).unwrap();
            assert_eq!(r.natoms(), natoms);
            assert_eq!(r.nframes_hint(), Some(4), "NSET 99 must be ignored");
            assert_eq!(r.header().nset, 99);
            assert_eq!(r.header().title.lines().count(), 2);
            let got = read_all(file.path()).unwrap();
            assert_eq!(got.len(), 4);
            for (k, (g, w)) in got.iter().zip(&frames).enumerate() {
                assert_eq!(
                    g.coords, w.coords,
                    "endian {big_endian} charmm {charmm} frame {k}"
                );
                assert_eq!(g.step, Some(10 + 5 * k as i64));
                // (k + ISTART / NSAVC) * DELTA * NSAVC, DELTA in AKMA units of 48.88821 fs.
                let t = (k as f64 + 2.0) * 0.5 * 0.04888821 * 5.0;
                assert!(
                    close(g.time_ps.unwrap(), t, 1e-12),
                    "{:?} vs {t}",
                    g.time_ps
                );
                if with_cell {
                    let la = g.unit_cell.unwrap().lengths_angles();
                    let want = [30.0 + k as f64, 40.0, 50.0, 90.0, 90.0, 90.0];
                    for i in 0..6 {
                        assert!(close(la[i], want[i], 1e-4), "{la:?}");
                    }
                    assert!(g.unit_cell.unwrap().is_orthorhombic());
                } else {
                    assert!(g.unit_cell.is_none());
                }
            }
        }
    }
}

#[test]
fn dcd_unit_cell_conventions_follow_mdanalysis() {
    let natoms = 3;
    let (c70, c80, c100) = (
        70f64.to_radians().cos(),
        80f64.to_radians().cos(),
        100f64.to_radians().cos(),
    );
    // Box-matrix form (new CHARMM): [h11, h21, h22, h31, h32, h33], detected by a negative value.
    let (e1, e2, e3) = ([30.0, -5.0, 2.0], [-5.0, 40.0, 3.0], [2.0, 3.0, 50.0]);
    let len = |v: [f64; 3]| (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
    let ang = |p: [f64; 3], q: [f64; 3]| {
        ((p[0] * q[0] + p[1] * q[1] + p[2] * q[2]) / (len(p) * len(q)))
            .acos()
            .to_degrees()
    };
    let matrix_dims = [
        len(e1),
        len(e2),
        len(e3),
        ang(e2, e3),
        ang(e1, e3),
        ang(e1, e2),
    ];
    let cases: Vec<([f64; 6], Option<[f64; 6]>)> = vec![
        // Cosines: [A, cos gamma, B, cos beta, cos alpha, C].
        (
            [30.0, c100, 40.0, c80, c70, 50.0],
            Some([30.0, 40.0, 50.0, 70.0, 80.0, 100.0]),
        ),
        // Degrees (NAMD 2.5): [A, gamma, B, beta, alpha, C].
        (
            [30.0, 100.0, 40.0, 80.0, 70.0, 50.0],
            Some([30.0, 40.0, 50.0, 70.0, 80.0, 100.0]),
        ),
        ([30.0, -5.0, 40.0, 2.0, 3.0, 50.0], Some(matrix_dims)),
        // All zero: no box.
        ([0.0; 6], None),
    ];
    for (raw, want) in cases {
        let spec = DcdSpec {
            with_cell: true,
            ..Default::default()
        };
        let frames = vec![DcdFrame {
            coords: vec![1.0; 3 * natoms],
            cell: raw,
        }];
        let file = TempFile::new("cell.dcd", &dcd_bytes(&spec, natoms, &frames));
        let got = read_all(file.path()).unwrap();
        match (got[0].unit_cell, want) {
            (Some(c), Some(w)) => {
                let la = c.lengths_angles();
                for i in 0..6 {
                    assert!(close(la[i], w[i], 1e-3), "raw {raw:?}: {la:?} vs {w:?}");
                }
            }
            (None, None) => {}
            (g, w) => panic!("raw {raw:?}: {g:?} vs {w:?}"),
        }
    }
}

#[test]
fn dcd_fixed_atoms_and_four_dims() {
    let natoms = 6;
    let frames = dcd_frames(natoms, 3, 7);
    let free = vec![2, 5, 6];
    for big_endian in [false, true] {
        for four_dims in [false, true] {
            let spec = DcdSpec {
                big_endian,
                four_dims,
                free: Some(free.clone()),
                ..Default::default()
            };
            let file = TempFile::new("fixed.dcd", &dcd_bytes(&spec, natoms, &frames));
            let r = DcdReader::open(file.path()).unwrap();
            assert_eq!(r.header().nfixed, 3);
            assert_eq!(r.nframes_hint(), Some(3));
            let got = read_all(file.path()).unwrap();
            assert_eq!(got.len(), 3);
            for (k, g) in got.iter().enumerate() {
                for a in 0..natoms {
                    // Fixed atoms keep their first-frame position; free atoms move.
                    let src = if free.contains(&(a as i32 + 1)) { k } else { 0 };
                    assert_eq!(
                        &g.coords[3 * a..3 * a + 3],
                        &frames[src].coords[3 * a..3 * a + 3],
                        "frame {k} atom {a}"
                    );
                }
            }
        }
    }
}

#[test]
fn dcd_trailing_partial_frame_is_an_error() {
    let natoms = 5;
    let frames = dcd_frames(natoms, 3, 3);
    let bytes = dcd_bytes(&DcdSpec::default(), natoms, &frames);
    let frame_size = 3 * (4 * natoms + 8);
    let cut = &bytes[..bytes.len() - frame_size / 2];
    let file = TempFile::new("partial.dcd", cut);
    let mut r = DcdReader::open(file.path()).unwrap();
    assert_eq!(r.nframes_hint(), Some(2));
    assert!(r.is_truncated());
    let mut f = Frame::default();
    assert!(r.read_frame(&mut f).unwrap());
    assert!(r.read_frame(&mut f).unwrap());
    let err = r.read_frame(&mut f).unwrap_err();
    assert_err_names(&err, file.path(), &["frame 2", "truncated"]);
}

/// Every prefix of a file opens and reads to an error or to fewer frames, each equal to the
/// original one; nothing panics.
fn check_every_cut(suffix: &str, bytes: &[u8], full: &[Frame]) {
    for cut in 0..bytes.len() {
        let file = TempFile::new(suffix, &bytes[..cut]);
        let Ok(mut r) = open_trajectory(file.path()) else {
            continue;
        };
        let mut f = Frame::default();
        let mut k = 0;
        loop {
            match r.read_frame(&mut f) {
                Ok(true) => {
                    assert!(k < full.len(), "cut {cut}: more frames than written");
                    assert_eq!(f.coords, full[k].coords, "cut {cut}: frame {k} differs");
                    assert_eq!(f.unit_cell, full[k].unit_cell, "cut {cut}: frame {k}");
                    k += 1;
                }
                Ok(false) => {
                    assert!(
                        k < full.len(),
                        "cut {cut}: all frames read from a truncated file"
                    );
                    break;
                }
                Err(e) => {
                    assert_err_names(&e, file.path(), &[&format!("frame {k}")]);
                    break;
                }
            }
        }
    }
}

#[test]
fn dcd_every_truncation_point() {
    let natoms = 4;
    let frames = dcd_frames(natoms, 3, 11);
    for (big_endian, with_cell) in [(false, true), (true, false)] {
        let spec = DcdSpec {
            big_endian,
            with_cell,
            ..Default::default()
        };
        let bytes = dcd_bytes(&spec, natoms, &frames);
        let file = TempFile::new("full.dcd", &bytes);
        let full = read_all(file.path()).unwrap();
        assert_eq!(full.len(), 3);
        check_every_cut("cut.dcd", &bytes, &full);
    }
}

#[test]
fn dcd_nan_is_an_error_naming_frame_and_atom() {
    let natoms = 5;
    let mut frames = dcd_frames(natoms, 3, 5);
    frames[1].coords[3 * 2 + 1] = f32::NAN;
    for big_endian in [false, true] {
        let spec = DcdSpec {
            big_endian,
            ..Default::default()
        };
        let file = TempFile::new("nan.dcd", &dcd_bytes(&spec, natoms, &frames));
        let mut r = open_trajectory(file.path()).unwrap();
        let mut f = Frame::default();
        assert!(r.read_frame(&mut f).unwrap());
        let err = r.read_frame(&mut f).unwrap_err();
        assert_err_names(&err, file.path(), &["frame 1", "atom 2", "NaN"]);
    }
}

#[test]
fn dcd_corrupt_headers_are_errors() {
    let natoms = 3;
    let frames = dcd_frames(natoms, 2, 2);
    let good = dcd_bytes(&DcdSpec::default(), natoms, &frames);
    let mutate = |off: usize, v: i32| {
        let mut b = good.clone();
        b[off..off + 4].copy_from_slice(&v.to_le_bytes());
        b
    };
    // Offset of the atom count: 4 + 84 + 4, title record (4 + 4 + 160 + 4), marker.
    let natoms_off = 92 + 172 + 4;
    for (bytes, needle) in [
        (mutate(0, 85), "not a DCD"),
        (mutate(natoms_off, 200_000_000), "atom count"),
        (mutate(natoms_off, -3), "atom count"),
        (mutate(92, 81), "title"),
        (b"CORD".to_vec(), "DCD"),
        (Vec::new(), "DCD"),
    ] {
        let file = TempFile::new("bad.dcd", &bytes);
        let err = DcdReader::open(file.path())
            .err()
            .expect("corrupt header accepted");
        assert_err_names(&err, file.path(), &[needle]);
    }
    // A corrupt record marker inside a frame.
    let hdr = natoms_off + 8;
    let bytes = mutate(hdr + 3 * (4 * natoms + 8) + 4 * natoms + 4, 1234);
    let file = TempFile::new("badframe.dcd", &bytes);
    let mut r = open_trajectory(file.path()).unwrap();
    let mut f = Frame::default();
    assert!(r.read_frame(&mut f).unwrap());
    let err = r.read_frame(&mut f).unwrap_err();
    assert_err_names(&err, file.path(), &["frame 1", "record"]);
}

// ---------------------------------------------------------------------------------------------
// TRR

fn trr_frames(natoms: usize) -> Vec<TrrFrame> {
    let xyz = |seed| {
        Some(
            pseudo_random(3 * natoms, seed, 0.0, 5.0)
                .into_iter()
                .map(|v| v as f64)
                .collect(),
        )
    };
    let box_nm = |s: f64| Some([s, 0.0, 0.0, 0.0, s, 0.0, s / 2.0, s / 2.0, s * 0.7]);
    vec![
        TrrFrame {
            step: 0,
            time: 0.0,
            natoms,
            box_nm: box_nm(5.0),
            x: xyz(1),
            v: xyz(2),
            ..Default::default()
        },
        // Velocities and forces only: skipped.
        TrrFrame {
            step: 50,
            time: 0.1,
            natoms,
            box_nm: box_nm(5.1),
            v: xyz(3),
            f: xyz(4),
            ..Default::default()
        },
        TrrFrame {
            step: 100,
            time: 0.2,
            natoms,
            box_nm: box_nm(5.2),
            vir: true,
            pres: true,
            x: xyz(5),
            v: xyz(6),
            f: xyz(7),
        },
        // No box.
        TrrFrame {
            step: 150,
            time: 0.3,
            natoms,
            x: xyz(8),
            ..Default::default()
        },
    ]
}

#[test]
fn trr_round_trip_float_and_double() {
    let natoms = 11;
    let frames = trr_frames(natoms);
    let with_x: Vec<&TrrFrame> = frames.iter().filter(|f| f.x.is_some()).collect();
    for double in [false, true] {
        let file = TempFile::new("rt.trr", &trr_bytes(&frames, double));
        let got = read_all(file.path()).unwrap();
        assert_eq!(got.len(), 3, "the frame without coordinates is skipped");
        for (g, w) in got.iter().zip(&with_x) {
            let want: Vec<f32> =
                w.x.as_ref()
                    .unwrap()
                    .iter()
                    .map(|&v| v as f32 * 10.0)
                    .collect();
            assert_eq!(g.coords, want, "double {double}");
            assert_eq!(g.step, Some(w.step as i64));
            let t = if double { w.time } else { w.time as f32 as f64 };
            assert_eq!(g.time_ps, Some(t));
            match w.box_nm {
                Some(b) => {
                    let v = g.unit_cell.unwrap().vectors;
                    for k in 0..9 {
                        assert_eq!(v[k / 3][k % 3], b[k] as f32 * 10.0);
                    }
                }
                None => assert!(g.unit_cell.is_none()),
            }
        }
    }
}

#[test]
fn trr_every_truncation_point() {
    let natoms = 3;
    for double in [false, true] {
        let bytes = trr_bytes(&trr_frames(natoms), double);
        let file = TempFile::new("full.trr", &bytes);
        let full = read_all(file.path()).unwrap();
        check_every_cut_trr(&bytes, &full);
    }
}

/// Like [`check_every_cut`], for TRR files whose errors name the frame index in the file (which
/// counts skipped frames), so only the file name is required in the message.
fn check_every_cut_trr(bytes: &[u8], full: &[Frame]) {
    for cut in 0..bytes.len() {
        let file = TempFile::new("cut.trr", &bytes[..cut]);
        match read_all(file.path()) {
            Ok(frames) => {
                assert!(frames.len() < full.len(), "cut {cut}");
                for (g, w) in frames.iter().zip(full) {
                    assert_eq!(g.coords, w.coords, "cut {cut}");
                }
            }
            Err(e) => assert_err_names(&e, file.path(), &[]),
        }
    }
}

#[test]
fn trr_nan_and_inconsistent_frames_are_errors() {
    let natoms = 4;
    let mut frames = trr_frames(natoms);
    frames[2].x.as_mut().unwrap()[3 * 3 + 2] = f64::NAN;
    for double in [false, true] {
        let file = TempFile::new("nan.trr", &trr_bytes(&frames, double));
        let err = read_all(file.path()).unwrap_err();
        // File frame 2 (the skipped frame 1 counts).
        assert_err_names(&err, file.path(), &["frame 2", "atom 3", "NaN"]);
    }
    let mut frames = trr_frames(natoms);
    frames[3] = TrrFrame {
        natoms: natoms + 1,
        x: Some(vec![1.0; 3 * (natoms + 1)]),
        ..Default::default()
    };
    let file = TempFile::new("natoms.trr", &trr_bytes(&frames, false));
    let err = read_all(file.path()).unwrap_err();
    assert_err_names(&err, file.path(), &["frame 3", "atoms"]);
    // Absurd atom count and wrong magic.
    let mut bytes = trr_bytes(&trr_frames(natoms), false);
    bytes[64..68].copy_from_slice(&200_000_000i32.to_be_bytes());
    let file = TempFile::new("absurd.trr", &bytes);
    assert_err_names(
        &open_trajectory(file.path()).err().unwrap(),
        file.path(),
        &["atom count"],
    );
    let file = TempFile::new("magic.trr", &[0u8; 200]);
    assert_err_names(
        &open_trajectory(file.path()).err().unwrap(),
        file.path(),
        &["magic"],
    );
}

// ---------------------------------------------------------------------------------------------
// XTC

fn xtc_frames(natoms: usize, span_nm: f32) -> Vec<XtcFrame> {
    (0..3)
        .map(|k| {
            let mut coords = pseudo_random(3 * natoms, 100 + k, 0.0, span_nm);
            // Make every other pair close, as in water, so runs are exercised.
            for a in (0..natoms.saturating_sub(1)).step_by(4) {
                for d in 0..3 {
                    coords[3 * (a + 1) + d] = coords[3 * a + d] + 0.01 * (d as f32 - 1.0);
                }
            }
            XtcFrame {
                step: 1000 * k as i32,
                time: 2.5 * k as f32,
                box_nm: [span_nm, 0.0, 0.0, 0.0, span_nm, 0.0, 0.0, 0.0, span_nm],
                coords_nm: coords,
            }
        })
        .collect()
}

#[test]
fn xtc_round_trip() {
    // (atoms, span in nm, precision, 2023 magic): compressed with packed integers, compressed
    // with ranges over 24 bits (separate fields), the 2023 variant, uncompressed (<= 9 atoms).
    for (natoms, span, precision, magic_2023) in [
        (40, 8.0, 1000.0, false),
        (33, 3.0, 100.0, false),
        (25, 20.0, 1.0e6, false),
        (40, 8.0, 1000.0, true),
        (9, 8.0, 1000.0, false),
        (1, 8.0, 1000.0, false),
    ] {
        let frames = xtc_frames(natoms, span);
        let file = TempFile::new("rt.xtc", &xtc_bytes(&frames, precision, magic_2023));
        let got = read_all(file.path()).unwrap();
        assert_eq!(got.len(), frames.len());
        for (g, w) in got.iter().zip(&frames) {
            let want = xtc_expected(&w.coords_nm, precision);
            assert_eq!(g.coords, want, "natoms {natoms} precision {precision}");
            assert_eq!(g.step, Some(w.step as i64));
            assert_eq!(g.time_ps, Some(w.time as f64));
            let la = g.unit_cell.unwrap().lengths_angles();
            assert!(close(la[0], span as f64 * 10.0, 1e-3), "{la:?}");
        }
    }
}

#[test]
fn xtc_every_truncation_point() {
    for natoms in [12, 3] {
        let bytes = xtc_bytes(&xtc_frames(natoms, 4.0), 1000.0, false);
        let file = TempFile::new("full.xtc", &bytes);
        let full = read_all(file.path()).unwrap();
        check_every_cut("cut.xtc", &bytes, &full);
    }
}

#[test]
fn xtc_nan_and_corrupt_frames_are_errors() {
    // Uncompressed frames can hold NaN.
    let mut frames = xtc_frames(4, 3.0);
    frames[2].coords_nm[3 * 3] = f32::NAN;
    let file = TempFile::new("nan.xtc", &xtc_bytes(&frames, 1000.0, false));
    assert_err_names(
        &read_all(file.path()).unwrap_err(),
        file.path(),
        &["frame 2", "atom 3", "NaN"],
    );
    // A frame with another atom count.
    let mut frames = xtc_frames(12, 3.0);
    frames[1].coords_nm.truncate(3 * 11);
    let file = TempFile::new("natoms.xtc", &xtc_bytes(&frames, 1000.0, false));
    assert_err_names(
        &read_all(file.path()).unwrap_err(),
        file.path(),
        &["frame 1", "atoms"],
    );
    // Corrupt precision, smallidx and byte count of the first frame.
    let good = xtc_bytes(&xtc_frames(12, 3.0), 1000.0, false);
    for (off, v, needle) in [
        (56, f32::NAN.to_bits() as i32, "precision"),
        (84, 80, "smallidx"),
        (88, i32::MAX, "truncated"),
        (4, 200_000_000, "atom count"),
        (0, 1996, "magic"),
    ] {
        let mut b = good.clone();
        b[off..off + 4].copy_from_slice(&v.to_be_bytes());
        let file = TempFile::new("corrupt.xtc", &b);
        let err = read_all(file.path()).unwrap_err();
        assert_err_names(&err, file.path(), &[needle]);
    }
    let file = TempFile::new("empty.xtc", b"");
    assert_err_names(
        &open_trajectory(file.path()).err().unwrap(),
        file.path(),
        &["empty"],
    );
}

// ---------------------------------------------------------------------------------------------
// PDB

#[test]
fn pdb_models_are_frames() {
    let natoms = 5;
    let frames: Vec<Vec<f32>> = (0..3)
        .map(|k| pseudo_random(3 * natoms, 40 + k, -99.0, 99.0))
        .collect();
    let cells = [
        [50.0, 50.0, 50.0, 90.0, 90.0, 90.0],
        [51.0, 52.0, 53.0, 80.0, 85.0, 95.0],
        [1.0, 1.0, 1.0, 90.0, 90.0, 90.0],
    ];
    let text = pdb_models(&frames, Some(&cells));
    let file = TempFile::new("models.pdb", text.as_bytes());
    let got = read_all(file.path()).unwrap();
    assert_eq!(got.len(), 3);
    for (k, (g, w)) in got.iter().zip(&frames).enumerate() {
        for (a, b) in g.coords.iter().zip(w) {
            assert!((a - b).abs() <= 0.0005 + 1e-5, "model {k}: {a} vs {b}");
        }
        assert_eq!(g.time_ps, None);
        assert_eq!(g.step, None);
    }
    let la = got[1].unit_cell.unwrap().lengths_angles();
    let want = [51.0, 52.0, 53.0, 80.0, 85.0, 95.0];
    for i in 0..6 {
        assert!(close(la[i], want[i], 1e-3), "{la:?}");
    }
    // The 1 Angstrom cubic placeholder means no unit cell, as in MDAnalysis.
    assert!(got[2].unit_cell.is_none());

    // One CRYST1 before the models applies to all of them.
    let one_cell = format!(
        "{}{}",
        pdb_cryst1(60.0, 60.0, 60.0, 90.0, 90.0, 90.0),
        pdb_models(&frames, None)
    );
    let file = TempFile::new("onecell.pdb", one_cell.as_bytes());
    let got = read_all(file.path()).unwrap();
    assert!(got.iter().all(|f| f.unit_cell.is_some()));
}

#[test]
fn pdb_without_models_and_end_separated_frames() {
    let atoms = |k: usize| {
        (0..4)
            .map(|i| pdb_atom(i + 1, k as f32, i as f32, 1.5))
            .collect::<String>()
    };
    // No MODEL records: one frame, or frames separated by END records (VMD).
    let single = format!("HEADER test\n{}END\n", atoms(0));
    let file = TempFile::new("single.pdb", single.as_bytes());
    assert_eq!(read_all(file.path()).unwrap().len(), 1);
    let multi = format!("{}END\n{}END\n{}", atoms(0), atoms(1), atoms(2));
    let file = TempFile::new("ends.pdb", multi.as_bytes());
    let got = read_all(file.path()).unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[2].coords[0], 2.0);
    // CRLF line endings and HETATM records.
    let crlf = format!(
        "{}END\r\n",
        atoms(3).replace("ATOM  ", "HETATM").replace('\n', "\r\n")
    );
    let file = TempFile::new("crlf.pdb", crlf.as_bytes());
    let got = read_all(file.path()).unwrap();
    assert_eq!(got[0].coords[..3], [3.0, 0.0, 1.5]);
}

#[test]
fn pdb_errors_name_file_model_and_atom() {
    let natoms = 4;
    let frames: Vec<Vec<f32>> = (0..3)
        .map(|k| pseudo_random(3 * natoms, 70 + k, -9.0, 9.0))
        .collect();
    // A model with one atom less.
    let mut short = frames.clone();
    short[2].truncate(3 * (natoms - 1));
    let file = TempFile::new("short.pdb", pdb_models(&short, None).as_bytes());
    let err = read_all(file.path()).unwrap_err();
    assert_err_names(&err, file.path(), &["frame 2", "MODEL 3", "3 atoms"]);
    // NaN coordinate.
    let text = pdb_models(&frames, None);
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    let idx = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("ATOM"))
        .nth(natoms + 1)
        .unwrap()
        .0;
    lines[idx].replace_range(30..38, "     nan");
    let file = TempFile::new("nan.pdb", (lines.join("\n") + "\n").as_bytes());
    assert_err_names(
        &read_all(file.path()).unwrap_err(),
        file.path(),
        &["frame 1", "atom 1", "NaN"],
    );
    // Unparsable coordinate and atoms outside a model.
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[idx].replace_range(30..38, "  12.x45");
    let file = TempFile::new("garbage.pdb", (lines.join("\n") + "\n").as_bytes());
    assert_err_names(
        &read_all(file.path()).unwrap_err(),
        file.path(),
        &["frame 1", "columns 31-38"],
    );
    let outside = format!(
        "{}{}",
        pdb_models(&frames[..1], None).replace("END\n", ""),
        pdb_atom(1, 0.0, 0.0, 0.0)
    );
    let file = TempFile::new("outside.pdb", outside.as_bytes());
    assert_err_names(
        &read_all(file.path()).unwrap_err(),
        file.path(),
        &["frame 1", "outside"],
    );
    // No atoms at all.
    let file = TempFile::new("none.pdb", b"REMARK nothing\nEND\n");
    assert_err_names(
        &open_trajectory(file.path()).err().unwrap(),
        file.path(),
        &["no ATOM"],
    );
}

#[test]
fn pdb_every_truncation_point() {
    let frames: Vec<Vec<f32>> = (0..3)
        .map(|k| pseudo_random(6, 90 + k, -9.0, 9.0))
        .collect();
    let text = pdb_models(&frames, Some(&[[50.0, 50.0, 50.0, 90.0, 90.0, 90.0]; 3]));
    let bytes = text.as_bytes();
    let file = TempFile::new("full.pdb", bytes);
    let full = read_all(file.path()).unwrap();
    // A cut inside a number can leave a shorter valid number, so only require no panic and a
    // located error.
    for cut in 0..bytes.len() {
        let file = TempFile::new("cut.pdb", &bytes[..cut]);
        match read_all(file.path()) {
            Ok(frames) => assert!(frames.len() <= full.len()),
            Err(e) => assert_err_names(&e, file.path(), &[]),
        }
    }
}

#[test]
fn pdb_gzipped_and_cryst1_after_each_model() {
    let natoms = 4;
    let frames: Vec<Vec<f32>> = (0..3)
        .map(|k| pseudo_random(3 * natoms, 90 + k, -9.0, 9.0))
        .collect();
    // CRYST1 records after each ENDMDL (none before the first MODEL): each model gets the box
    // that follows it, as MDAnalysis reads MDAnalysisTests' model_then_cryst.pdb.
    let mut text = String::new();
    for (k, f) in frames.iter().enumerate() {
        text += &format!("MODEL     {:>4}\n", k + 1);
        for (i, a) in f.chunks_exact(3).enumerate() {
            text += &pdb_atom(i + 1, a[0], a[1], a[2]);
        }
        text += "ENDMDL\n";
        text += &pdb_cryst1(40.0 + k as f32, 50.0, 60.0, 90.0, 90.0, 90.0);
    }
    text += "END\n";
    let plain = TempFile::new("after.pdb", text.as_bytes());
    let got = read_all(plain.path()).unwrap();
    let a: Vec<f64> = got
        .iter()
        .map(|f| f.unit_cell.unwrap().lengths_angles()[0])
        .collect();
    assert_eq!(a, [40.0, 41.0, 42.0]);
    // The same file gzipped, as a .pdb.gz trajectory: the same frames.
    let gz = TempFile::new("after.pdb.gz", &gzip(text.as_bytes()));
    let got_gz = read_all(gz.path()).unwrap();
    assert_eq!(got_gz.len(), 3);
    for (p, g) in got.iter().zip(&got_gz) {
        assert_eq!(p.coords, g.coords);
        assert_eq!(p.unit_cell, g.unit_cell);
    }
    // Other compressed trajectories are refused with a clear message.
    let xtc = TempFile::new("x.xtc.gz", &gzip(b"not read"));
    assert_err_names(
        &open_trajectory(xtc.path()).err().unwrap(),
        xtc.path(),
        &["only PDB trajectories are read gzipped"],
    );
    let bz = TempFile::new("x.pdb.bz2", b"BZh9");
    assert_err_names(
        &open_trajectory(bz.path()).err().unwrap(),
        bz.path(),
        &["bzip2-compressed trajectories are not read"],
    );
}

#[test]
fn pdb_gzip_bomb_is_refused_while_streaming() {
    // 200 MiB of REMARK lines in about 200 kB: past 64 MiB (and 50x the compressed size) the
    // stream stops with an error naming the file, without reading on.
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let block = "REMARK\n".repeat(1 << 17);
    let mut text = pdb_atom(1, 0.0, 0.0, 0.0);
    text += "END\n";
    {
        use std::io::Write;
        enc.write_all(text.as_bytes()).unwrap();
        for _ in 0..(200 << 20) / block.len() {
            enc.write_all(block.as_bytes()).unwrap();
        }
        enc.write_all(text.as_bytes()).unwrap();
    }
    let file = TempFile::new("bomb.pdb.gz", &enc.finish().unwrap());
    let err = read_all(file.path()).unwrap_err();
    assert_err_names(&err, file.path(), &["inflates to more than 67108864 bytes"]);
}

#[test]
fn special_files_are_refused_by_type() {
    let dir = std::env::temp_dir().join(format!("hiermd-traj-special-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for ext in ["dcd", "xtc", "trr", "pdb", "pdb.gz"] {
        let link = dir.join(format!("zero.{ext}"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let t = std::time::Instant::now();
        let e = format!("{:#}", open_trajectory(&link).err().unwrap());
        assert!(t.elapsed().as_secs_f64() < 1.0, "{ext}");
        assert!(
            e.contains("is a character device, not a regular file"),
            "{ext}: {e}"
        );
    }
    let fifo = dir.join("pipe.pdb");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = format!("{:#}", open_trajectory(&fifo).err().unwrap());
    assert!(e.contains("is a FIFO (named pipe)"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn implausible_times_and_precision() {
    // A CHARMM DCD whose version flag (ICNTRL[19]) is 0: DELTA is read as X-PLOR's f64 from the
    // f32 and the next word, 2.5e-322-like; the reader drops the times and says why.
    let spec = DcdSpec {
        charmm: true,
        ..DcdSpec::default()
    };
    let mut bytes = dcd_bytes(&spec, 3, &dcd_frames(3, 2, 5));
    bytes[8 + 4 * 19..8 + 4 * 20].copy_from_slice(&0i32.to_le_bytes());
    let file = TempFile::new("xplor.dcd", &bytes);
    let mut r = open_trajectory(file.path()).unwrap();
    let mut f = Frame::default();
    assert!(r.read_frame(&mut f).unwrap());
    assert_eq!(f.time_ps, None);
    let w = r.take_warnings().join("\n");
    assert!(w.contains("is not plausible"), "{w}");
    assert!(
        w.contains("read as CHARMM's f32 it would give 0.0488"),
        "{w}"
    );
    assert!(w.contains(&file.path().display().to_string()), "{w}");
    assert!(r.take_warnings().is_empty(), "taken once");
    // XTC precision 1e30 (every coordinate would be 0): an error naming the file and frame.
    let mut b = xtc_bytes(&xtc_frames(12, 3.0), 1000.0, false);
    b[56..60].copy_from_slice(&1e30f32.to_be_bytes());
    let file = TempFile::new("prec.xtc", &b);
    let err = read_all(file.path()).unwrap_err();
    assert_err_names(
        &err,
        file.path(),
        &["frame 0", "implausible compression precision 1e30"],
    );
    // A time that is not finite: times dropped with a warning naming the frame.
    let mut frames = xtc_frames(12, 3.0);
    frames[1].time = f32::NAN;
    let file = TempFile::new("nan-time.xtc", &xtc_bytes(&frames, 1000.0, false));
    let mut r = open_trajectory(file.path()).unwrap();
    let mut times = Vec::new();
    while r.read_frame(&mut f).unwrap() {
        times.push(f.time_ps);
    }
    assert_eq!(times, [Some(0.0), None, Some(5.0)]);
    let w = r.take_warnings().join("\n");
    assert!(w.contains("frame 1: time NaN ps is not finite"), "{w}");
}

/// `data` gzipped.
fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn unknown_extension_is_an_error() {
    let file = TempFile::new("x.nc", b"CDF");
    assert_err_names(
        &open_trajectory(file.path()).err().unwrap(),
        file.path(),
        &["unknown trajectory format"],
    );
}

/// A PDB with alternate locations: topology and every frame keep the same one conformer.
#[test]
fn pdb_trajectory_with_altlocs_matches_its_topology() {
    let dir = std::env::temp_dir().join(format!("hiermd-altloc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("alt.pdb");
    let model = |m: usize, dx: f32| {
        let mut s = format!("MODEL     {m:>4}\n");
        for (alt, name, x) in [
            (' ', "N  ", 0.0f32),
            (' ', "CA ", 1.0),
            ('A', "CB ", 2.0),
            ('B', "CB ", 2.5),
            (' ', "C  ", 3.0),
        ] {
            s += &format!("ATOM      1  {name}{alt}SER A   1    {:8.3}   0.000   0.000  1.00  0.00           C\n", x + dx);
        }
        s + "ENDMDL\n"
    };
    std::fs::write(&path, model(1, 0.0) + &model(2, 10.0) + "END\n").unwrap();
    let top = hiermd::topology::read_topology(&path).unwrap();
    assert_eq!(top.len(), 4, "one conformer: N CA CB(A) C");
    let mut r = hiermd::traj::open_trajectory(&path).unwrap();
    assert_eq!(r.natoms(), top.len());
    let mut f = hiermd::traj::Frame::default();
    let mut xs = Vec::new();
    while r.read_frame(&mut f).unwrap() {
        xs.push(f.coords.iter().step_by(3).copied().collect::<Vec<_>>());
    }
    assert_eq!(
        xs,
        vec![vec![0.0, 1.0, 2.0, 3.0], vec![10.0, 11.0, 12.0, 13.0]],
        "CB of location A in every model"
    );
    let _ = std::fs::remove_dir_all(dir);
}
