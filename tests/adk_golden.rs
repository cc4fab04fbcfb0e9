//! Acceptance test of the readers: coordinates, boxes and atom tables that hiermd reads from the
//! ADK files of MDAnalysisTests (DCD, XTC, TRR, GRO, PDB, PSF) equal MDAnalysis's; so do those of
//! the interop cases (issue 16): a GRO box line whose numbers run together (`huge_box.gro`),
//! CRYST1 records after or before each model, a Martini system, and the synthetic files of
//! `datasets/interop/` (keys `interop/...`: TIP4P/TIP5P virtual sites, coarse-grained beads with
//! element X, segment ids from chain IDs or `SYSTEM`, a `.pdb.gz` trajectory).
//!
//! The reference is `tests/golden/adk_mdanalysis.json`, written by `datasets/adk/make_golden`
//! with MDAnalysis (version recorded in the file). Coordinates and box lengths/angles must agree
//! to 1e-4 (Angstrom, degrees); names, residue names and numbers, segment ids, chains, insertion
//! codes and elements exactly; masses to 1e-3 Da; charges to 1e-4 e.
//!
//! Segment ids compare exactly (hiermd fills them as MDAnalysis does: PDB chain IDs when no atom
//! has a segID, `SYSTEM` when nothing is there). An empty MDAnalysis chainID matches an empty
//! chain or hiermd's fallback to the segment id. MDAnalysis's "DUMMY" element (massless TIP4P
//! site MW), its empty element (an element column such as `X` it does not accept) and guesses
//! that are no element (`G` for a Martini bead `GL1`) match hiermd's unknown element "X";
//! element symbols compare case-insensitively (MDAnalysis writes "NA" for sodium). Virtual-site
//! names that MDAnalysis guesses as phosphorus (`LP1`, `EP1`) are recorded in the golden file
//! with hiermd's convention (DUMMY, 0 Da) next to MDAnalysis's guess (`virtual_sites`).
//!
//! Every mismatch of a file is listed (the first 40 in full) before the test fails.

mod common;

use hiermd::topology::{read_topology, Atom, Topology};
use hiermd::traj::{open_trajectory, Frame, UnitCell};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Coordinates (Angstrom) and box lengths (Angstrom) and angles (degrees).
const TOL: f64 = 1e-4;
/// Masses (daltons).
const MASS_TOL: f64 = 1e-3;
/// Partial charges (e).
const CHARGE_TOL: f64 = 1e-4;
/// Times (ps): absolute plus relative (MDAnalysis converts DCD times from AKMA units).
const TIME_TOL_ABS: f64 = 1e-3;
const TIME_TOL_REL: f64 = 1e-6;
/// Mismatches printed in full per file.
const SHOW: usize = 40;

fn golden() -> &'static Value {
    static G: OnceLock<Value> = OnceLock::new();
    G.get_or_init(|| {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/adk_mdanalysis.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (datasets/adk/make_golden writes it)",
                path.display()
            )
        });
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

/// Where a golden key's file is: `interop/...` in `datasets/interop/` (committed), the others in
/// the MDAnalysisTests data folder (fetched).
fn data_path(file: &str) -> PathBuf {
    match file.strip_prefix("interop/") {
        Some(f) => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("datasets/interop")
            .join(f),
        None => common::adk_data().join(file),
    }
}

fn entry(section: &str, file: &str) -> &'static Value {
    let v = &golden()[section][file];
    assert!(v.is_object(), "golden file has no {section}.{file}");
    v
}

/// Collects every mismatch of one file and fails at the end with all of them.
struct Report {
    file: String,
    lines: Vec<String>,
    count: usize,
}

impl Report {
    fn new(file: &str) -> Self {
        Self {
            file: file.to_string(),
            lines: Vec::new(),
            count: 0,
        }
    }

    fn push(&mut self, msg: String) {
        self.count += 1;
        if self.lines.len() < SHOW {
            self.lines.push(msg);
        }
    }

    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.push(msg());
        }
    }

    fn close(&mut self, what: &str, got: f64, want: f64, tol: f64) {
        // NaN fails too.
        let ok = (got - want).abs() <= tol;
        if !ok {
            self.push(format!(
                "{what}: hiermd {got} vs MDAnalysis {want} (diff {:.3e}, tol {tol:e})",
                got - want
            ));
        }
    }

    fn finish(self) {
        if self.count > 0 {
            let more = if self.count > self.lines.len() {
                format!("\n  ... and {} more", self.count - self.lines.len())
            } else {
                String::new()
            };
            panic!(
                "{}: {} mismatch(es) with MDAnalysis:\n  {}{more}",
                self.file,
                self.count,
                self.lines.join("\n  ")
            );
        }
    }
}

fn usize_of(v: &Value) -> usize {
    v.as_u64().expect("golden: expected an unsigned integer") as usize
}

fn f64_of(v: &Value) -> f64 {
    v.as_f64().expect("golden: expected a number")
}

fn str_of(v: &Value) -> &str {
    v.as_str().expect("golden: expected a string")
}

fn list<'a>(v: &'a Value, key: &str) -> &'a Vec<Value> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("golden: expected a list under {key:?}"))
}

fn indices(v: &Value) -> Vec<usize> {
    list(v, "indices").iter().map(usize_of).collect()
}

/// Element symbol as compared: MDAnalysis's guesses are upper case ("NA"), hiermd capitalises
/// ("Na"); MDAnalysis's "DUMMY" (massless site), "" (no element) and guesses that are no element
/// ("G", "R" for Martini beads) are hiermd's unknown "X".
fn norm_element(e: &str) -> String {
    let u = e.trim().to_ascii_uppercase();
    let known = hiermd::topology::element::from_symbol(&u).is_some() && u != "D" && u != "T";
    if known {
        u
    } else {
        "X".to_string()
    }
}

/// Compares a unit cell with MDAnalysis's `dimensions` (null: no box).
fn check_box(r: &mut Report, what: &str, got: Option<&UnitCell>, want: &Value) {
    match (got, want.as_array()) {
        (None, None) => {}
        (Some(uc), None) => r.push(format!(
            "{what}: hiermd has a box {:?} (vectors {:?}), MDAnalysis none",
            uc.lengths_angles(),
            uc.vectors
        )),
        (None, Some(w)) => r.push(format!(
            "{what}: hiermd has no box, MDAnalysis {:?}",
            w.iter().map(f64_of).collect::<Vec<_>>()
        )),
        (Some(uc), Some(w)) => {
            let got = uc.lengths_angles();
            const LABEL: [&str; 6] = ["a", "b", "c", "alpha", "beta", "gamma"];
            for ((label, g), w) in LABEL.iter().zip(got).zip(w) {
                r.close(&format!("{what} box {label}"), g, f64_of(w), TOL);
            }
        }
    }
}

/// Compares the golden positions (flat xyz of the atoms `idx`) with `coord(i)`.
fn check_positions(
    r: &mut Report,
    what: &str,
    idx: &[usize],
    want: &[Value],
    natoms: usize,
    coord: impl Fn(usize) -> [f32; 3],
) {
    assert_eq!(
        want.len(),
        3 * idx.len(),
        "golden: positions do not match indices"
    );
    for (k, &i) in idx.iter().enumerate() {
        if i >= natoms {
            r.push(format!(
                "{what}: atom {i} missing (hiermd has {natoms} atoms)"
            ));
            continue;
        }
        let c = coord(i);
        for (d, axis) in ["x", "y", "z"].iter().enumerate() {
            r.close(
                &format!("{what} atom {i} {axis}"),
                c[d] as f64,
                f64_of(&want[3 * k + d]),
                TOL,
            );
        }
    }
}

fn check_atom_table(r: &mut Report, file: &str, g: &Value, atoms: &[Atom]) {
    let t = &g["table"];
    let idx = indices(t);
    let names = list(t, "names");
    let resnames = list(t, "resnames");
    let resids = list(t, "resids");
    let segids = list(t, "segids");
    let masses = list(t, "masses");
    let elements = list(t, "elements");
    let chains = t.get("chainIDs").and_then(Value::as_array);
    let icodes = t.get("icodes").and_then(Value::as_array);
    let charges = t.get("charges").and_then(Value::as_array);
    for (k, &i) in idx.iter().enumerate() {
        let Some(a) = atoms.get(i) else {
            r.push(format!(
                "{file} atom {i}: missing (hiermd has {} atoms)",
                atoms.len()
            ));
            continue;
        };
        let at = |field: &str, got: &dyn std::fmt::Debug, want: &dyn std::fmt::Debug| {
            format!("{file} atom {i} {field}: hiermd {got:?} vs MDAnalysis {want:?}")
        };
        let name = str_of(&names[k]);
        r.check(a.name == name, || at("name", &a.name, &name));
        let resname = str_of(&resnames[k]);
        r.check(a.resname == resname, || at("resname", &a.resname, &resname));
        let resid = resids[k].as_i64().expect("golden: resid");
        r.check(a.resid as i64 == resid, || at("resid", &a.resid, &resid));
        let segid = str_of(&segids[k]);
        r.check(a.segid == segid, || at("segid", &a.segid, &segid));
        match chains.map(|c| str_of(&c[k])) {
            Some(c) if !c.is_empty() => r.check(a.chain == c, || at("chain", &a.chain, &c)),
            // No chain in the file: hiermd's chain is empty or falls back to the segment id.
            _ => r.check(a.chain.is_empty() || a.chain == a.segid, || {
                at(
                    "chain (file has none; expected empty or the segid)",
                    &a.chain,
                    &a.segid,
                )
            }),
        }
        if let Some(ic) = icodes {
            let want = str_of(&ic[k]);
            let want_c = want.chars().next().unwrap_or(' ');
            r.check(a.icode == want_c, || at("icode", &a.icode, &want));
        }
        r.close(
            &format!("{file} atom {i} ({name}) mass"),
            a.mass as f64,
            f64_of(&masses[k]),
            MASS_TOL,
        );
        let el = str_of(&elements[k]);
        r.check(norm_element(&a.element) == norm_element(el), || {
            at("element", &a.element, &el)
        });
        if let Some(q) = charges {
            r.close(
                &format!("{file} atom {i} ({name}) charge"),
                a.charge as f64,
                f64_of(&q[k]),
                CHARGE_TOL,
            );
        }
    }
}

/// Counts over all atoms: residues, segments, elements, heavy atoms, masses.
fn check_counts(r: &mut Report, file: &str, g: &Value, top: &Topology) {
    let atoms = &top.atoms;
    let n_res = top.residue_indices().last().map_or(0, |&x| x as usize + 1);
    let want_res = usize_of(&g["n_residues"]);
    r.check(n_res == want_res, || {
        format!("{file} residues: hiermd {n_res} vs MDAnalysis {want_res}")
    });
    let mut n_seg = 0usize;
    let mut prev: Option<&str> = None;
    for a in atoms {
        if prev != Some(a.segid.as_str()) {
            n_seg += 1;
            prev = Some(a.segid.as_str());
        }
    }
    let want_seg = usize_of(&g["n_segments"]);
    r.check(n_seg == want_seg, || {
        format!("{file} segments (runs of equal segid): hiermd {n_seg} vs MDAnalysis {want_seg}")
    });

    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for a in atoms {
        *counts.entry(norm_element(&a.element)).or_default() += 1;
    }
    let mut want_counts: BTreeMap<String, usize> = BTreeMap::new();
    for (e, n) in g["element_counts"]
        .as_object()
        .expect("golden: element_counts")
    {
        *want_counts.entry(norm_element(e)).or_default() += usize_of(n);
    }
    r.check(counts == want_counts, || {
        format!(
            "{file} element counts ({}): hiermd {counts:?} vs MDAnalysis {want_counts:?}",
            str_of(&g["element_source"])
        )
    });

    let not_h = atoms.iter().filter(|a| !a.name.starts_with('H')).count();
    let want_not_h = usize_of(&g["n_not_name_H"]);
    r.check(not_h == want_not_h, || {
        format!("{file} atoms not named H*: hiermd {not_h} vs MDAnalysis {want_not_h}")
    });
    let heavy = atoms
        .iter()
        .filter(|a| !matches!(norm_element(&a.element).as_str(), "H" | "X"))
        .count();
    let want_heavy = usize_of(&g["n_heavy_by_element"]);
    r.check(heavy == want_heavy, || {
        format!("{file} heavy atoms by element: hiermd {heavy} vs MDAnalysis {want_heavy}")
    });

    // Guessed masses: one per element, checked on every atom.
    if let Some(by_el) = g["mass_by_element"].as_object() {
        let by_el: BTreeMap<String, f64> = by_el
            .iter()
            .map(|(e, m)| (norm_element(e), f64_of(m)))
            .collect();
        for (i, a) in atoms.iter().enumerate() {
            if let Some(&m) = by_el.get(&norm_element(&a.element)) {
                r.close(
                    &format!("{file} atom {i} ({}, element {}) mass", a.name, a.element),
                    a.mass as f64,
                    m,
                    MASS_TOL,
                );
            }
        }
    }
    let total: f64 = atoms.iter().map(|a| a.mass as f64).sum();
    r.close(
        &format!("{file} total mass"),
        total,
        f64_of(&g["total_mass"]),
        MASS_TOL * atoms.len() as f64,
    );
}

fn check_topology(file: &str) {
    let g = entry("topologies", file);
    let path = data_path(file);
    let top = read_topology(&path).unwrap_or_else(|e| panic!("read_topology({file}): {e:#}"));
    let mut r = Report::new(file);
    let n = usize_of(&g["n_atoms"]);
    r.check(top.atoms.len() == n, || {
        format!("{file} atoms: hiermd {} vs MDAnalysis {n}", top.atoms.len())
    });
    check_atom_table(&mut r, file, g, &top.atoms);
    check_counts(&mut r, file, g, &top);
    match (&top.coords, g["coordinates"].is_object()) {
        (_, false) => r.check(top.coords.is_none(), || {
            format!("{file}: hiermd has coordinates, MDAnalysis none")
        }),
        (None, true) => r.push(format!("{file}: hiermd read no coordinates")),
        (Some(c), true) => {
            let gc = &g["coordinates"];
            r.check(c.len() == top.atoms.len(), || {
                format!(
                    "{file}: {} coordinates for {} atoms",
                    c.len(),
                    top.atoms.len()
                )
            });
            check_positions(
                &mut r,
                &format!("{file} coordinates"),
                &indices(gc),
                list(gc, "positions"),
                c.len(),
                |i| c[i],
            );
            check_box(&mut r, file, top.unit_cell.as_ref(), &gc["dimensions"]);
        }
    }
    r.finish();
}

fn check_trajectory(file: &str) {
    let g = entry("trajectories", file);
    let path = data_path(file);
    let mut reader =
        open_trajectory(&path).unwrap_or_else(|e| panic!("open_trajectory({file}): {e:#}"));
    let mut r = Report::new(file);
    let n = usize_of(&g["n_atoms"]);
    let nf = usize_of(&g["n_frames"]);
    r.check(reader.natoms() == n, || {
        format!(
            "{file} natoms(): hiermd {} vs MDAnalysis {n}",
            reader.natoms()
        )
    });
    if let Some(h) = reader.nframes_hint() {
        r.check(h == nf, || {
            format!("{file} nframes_hint(): hiermd {h} vs MDAnalysis {nf}")
        });
    }
    let idx = indices(g);
    let frames = list(g, "frames");
    let is_xdr = file.ends_with(".xtc") || file.ends_with(".trr");
    let is_pdb = file.ends_with(".pdb") || file.ends_with(".pdb.gz");
    let mut frame = Frame::default();
    let mut count = 0usize;
    let mut next = 0usize; // next golden frame to compare
    loop {
        let pos = reader.position();
        r.check(pos == count, || {
            format!("{file}: position() {pos} before reading frame {count}")
        });
        match reader.read_frame(&mut frame) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                r.push(format!("{file} frame {count}: read error {e:#}"));
                break;
            }
        }
        let f = count;
        count += 1;
        r.check(frame.coords.len() == 3 * n, || {
            format!(
                "{file} frame {f}: {} coordinates for {n} atoms",
                frame.coords.len()
            )
        });
        let Some(gf) = frames.get(next) else { continue };
        if usize_of(&gf["frame"]) != f {
            continue;
        }
        next += 1;
        let what = format!("{file} frame {f}");
        match gf["positions"].as_array() {
            Some(p) => {
                let natoms = frame.coords.len() / 3;
                let c = &frame.coords;
                check_positions(&mut r, &what, &idx, p, natoms, |i| {
                    [c[3 * i], c[3 * i + 1], c[3 * i + 2]]
                });
            }
            None => r.push(format!(
                "{what}: MDAnalysis has no positions (golden; see has_positions)"
            )),
        }
        check_box(&mut r, &what, frame.unit_cell.as_ref(), &gf["dimensions"]);
        // MDAnalysis gives every PDB frame time 0 (the format has none): nothing to compare.
        if !is_pdb {
            let want_t = f64_of(&gf["time"]);
            match frame.time_ps {
                Some(t) => r.close(
                    &format!("{what} time (ps)"),
                    t,
                    want_t,
                    TIME_TOL_ABS + TIME_TOL_REL * want_t.abs(),
                ),
                None => r.check(!is_xdr, || {
                    format!("{what}: hiermd has no time, MDAnalysis {want_t}")
                }),
            }
        }
        if let Some(want_step) = gf.get("step").and_then(Value::as_i64) {
            r.check(frame.step == Some(want_step), || {
                format!(
                    "{what} step: hiermd {:?} vs MDAnalysis {want_step}",
                    frame.step
                )
            });
        }
    }
    r.check(count == nf, || {
        format!("{file} frames: hiermd {count} vs MDAnalysis {nf}")
    });
    r.check(next == frames.len(), || {
        format!(
            "{file}: golden frames {:?} not all reached ({} compared)",
            frames
                .iter()
                .map(|f| usize_of(&f["frame"]))
                .collect::<Vec<_>>(),
            next
        )
    });
    r.finish();
}

#[test]
fn golden_file_is_mdanalysis() {
    let g = golden();
    assert!(
        str_of(&g["mdanalysis_version"]).starts_with('2'),
        "MDAnalysis 2.x made the golden file"
    );
    assert_eq!(g["topologies"].as_object().map(|o| o.len()), Some(13));
    assert_eq!(g["trajectories"].as_object().map(|o| o.len()), Some(11));
}

#[test]
fn psf_atom_table() {
    check_topology("adk.psf");
}

#[test]
fn pdb_open_atom_table_coordinates_box() {
    check_topology("adk_open.pdb");
}

#[test]
fn pdb_closed_atom_table_coordinates_no_box() {
    check_topology("adk_closed.pdb");
}

#[test]
fn gro_atom_table_coordinates_box() {
    check_topology("adk_oplsaa.gro");
}

#[test]
fn pdb_solvated_atom_table_coordinates_box() {
    check_topology("adk_oplsaa.pdb");
}

#[test]
fn dcd_dims() {
    check_trajectory("adk_dims.dcd");
}

#[test]
fn dcd_dims2_zero_box_is_none() {
    check_trajectory("adk_dims2.dcd");
}

#[test]
fn xtc() {
    check_trajectory("adk_oplsaa.xtc");
}

#[test]
fn trr() {
    check_trajectory("adk_oplsaa.trr");
}

#[test]
fn pdb_model_trajectory_solvated() {
    check_trajectory("adk_oplsaa.pdb");
}

#[test]
fn pdb_trajectory_open() {
    check_trajectory("adk_open.pdb");
}

#[test]
fn pdb_trajectory_closed() {
    check_trajectory("adk_closed.pdb");
}

// Interop (issue 16): files MDAnalysis reads that hiermd once refused or read differently.

#[test]
fn gro_box_numbers_run_together() {
    check_topology("huge_box.gro");
}

#[test]
fn pdb_cryst1_after_each_model() {
    check_topology("model_then_cryst.pdb");
    check_trajectory("model_then_cryst.pdb");
}

#[test]
fn pdb_cryst1_before_each_model() {
    check_topology("cryst_then_model.pdb");
    check_trajectory("cryst_then_model.pdb");
}

#[test]
fn gro_martini_coarse_grained() {
    check_topology("martini_dppc_chol_bilayer.gro");
}

#[test]
fn pdb_tip4p_virtual_sites_and_segids_from_chains() {
    check_topology("interop/tip4p_water.pdb");
    check_trajectory("interop/tip4p_water.pdb");
}

#[test]
fn gro_tip5p_lone_pairs() {
    check_topology("interop/tip5p_water.gro");
}

#[test]
fn pdb_martini_element_x_and_gzipped_trajectory() {
    check_topology("interop/martini.pdb");
    check_trajectory("interop/martini.pdb.gz");
}

#[test]
fn pdb_without_chain_or_segid_is_system() {
    check_topology("interop/segid_nochain.pdb");
}
