//! Topology readers (PDB, GRO, PSF) on the ADK files of MDAnalysisTests and on small synthetic
//! files, plus a fuzz test that every reader answers Ok or Err, never panics.
//!
//! Reference numbers were printed by MDAnalysis 2.11.0 (`mda.Universe(file)`: `n_atoms`,
//! `residues.n_residues`, names, resnames, resids, segids, `types` / `elements`, `masses`,
//! `dimensions`, `positions`). Where this crate deliberately differs from MDAnalysis the test says
//! so.

mod common;

use hiermd::topology::{element, read_gro, read_pdb, read_psf, read_topology, Topology};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A temporary file holding `text`, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &[u8]) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("hiermd-topology-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}-{name}", N.fetch_add(1, Ordering::Relaxed)));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// 6msm is bzip2-compressed, which the readers do not read: decompress it with `bzip2 -dc`.
fn bunzip(path: &Path) -> TempFile {
    let out = std::process::Command::new("bzip2")
        .arg("-dc")
        .arg(path)
        .output()
        .expect("run bzip2 -dc (needed to decompress 6msm.pdb.bz2)");
    assert!(out.status.success(), "bzip2 -dc {} failed", path.display());
    TempFile::new("6msm.pdb", &out.stdout)
}

fn n_residues(top: &Topology) -> usize {
    top.residue_indices().last().map_or(0, |&r| r as usize + 1)
}

fn element_counts(top: &Topology) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for a in &top.atoms {
        *m.entry(a.element.clone()).or_default() += 1;
    }
    m
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|&(k, v)| (k.to_string(), v)).collect()
}

fn total_mass(top: &Topology) -> f64 {
    top.atoms.iter().map(|a| a.mass as f64).sum()
}

/// (name, resname, resid, segid) of atom `i`.
fn ident(top: &Topology, i: usize) -> (&str, &str, i32, &str) {
    let a = &top.atoms[i];
    (&a.name, &a.resname, a.resid, &a.segid)
}

fn assert_close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol, "{what}: {a} vs {b}");
}

fn assert_dims(top: &Topology, want: [f64; 6]) {
    let got = top.unit_cell.expect("a unit cell").lengths_angles();
    for k in 0..6 {
        assert_close(got[k], want[k], 2e-3, &format!("dimension {k}"));
    }
}

fn assert_xyz(got: [f32; 3], want: [f64; 3]) {
    for k in 0..3 {
        assert_close(got[k] as f64, want[k], 1e-4, "coordinate");
    }
}

/// The 3341-atom ADK protein as CHARMM names it; the same in adk.psf, adk_open.pdb and
/// adk_closed.pdb. MDAnalysis: 3341 atoms, 214 residues, types C 1040, H 1685, N 289, O 320,
/// S 7, total mass 23582.0430 (MDAnalysis sums f64 masses; ours are f32).
fn check_charmm_adk(top: &Topology) {
    assert_eq!(top.len(), 3341);
    assert_eq!(n_residues(top), 214);
    assert_eq!(ident(top, 0), ("N", "MET", 1, "4AKE"));
    assert_eq!(ident(top, 1), ("HT1", "MET", 1, "4AKE"));
    assert_eq!(ident(top, 2), ("HT2", "MET", 1, "4AKE"));
    assert_eq!(ident(top, 3340), ("OT2", "GLY", 214, "4AKE"));
    assert_eq!(top.atoms[0].chain, "4AKE");
    assert_eq!(
        element_counts(top),
        counts(&[("C", 1040), ("H", 1685), ("N", 289), ("O", 320), ("S", 7)])
    );
    assert_close(total_mass(top), 23582.0430, 0.01, "total mass");
    assert_eq!(top.atoms[0].mass, 14.007);
    assert_eq!(top.atoms[1].mass, 1.008);
    assert_eq!(top.atoms[3340].mass, 15.999);
    assert_eq!(top.atoms[0].atomic_number, 7);
}

#[test]
fn adk_psf() {
    let top = read_psf(&common::adk_data().join("adk.psf")).unwrap();
    check_charmm_adk(&top);
    // Charges from the file (MDAnalysis: -0.3, 0.33, 0.33, ..., -0.67).
    assert_eq!(top.atoms[0].charge, -0.3);
    assert_eq!(top.atoms[1].charge, 0.33);
    assert_eq!(top.atoms[3340].charge, -0.67);
    let q: f64 = top.atoms.iter().map(|a| a.charge as f64).sum();
    assert_close(q, -4.0, 1e-3, "net charge");
    assert!(top.coords.is_none() && top.unit_cell.is_none());
}

#[test]
fn adk_open_and_closed_pdb() {
    let dir = common::adk_data();
    let open = read_pdb(&dir.join("adk_open.pdb")).unwrap();
    check_charmm_adk(&open);
    // MDAnalysis: dimensions [80.017 80.017 80.017 60 60 90]; positions[0], positions[-1].
    assert_dims(&open, [80.017, 80.017, 80.017, 60.0, 60.0, 90.0]);
    let c = open.coords.as_ref().unwrap();
    assert_xyz(c[0], [-11.921, 26.307, 10.410]);
    assert_xyz(c[3340], [-12.417, 26.877, 21.494]);

    let closed = read_pdb(&dir.join("adk_closed.pdb")).unwrap();
    check_charmm_adk(&closed);
    // No CRYST1: MDAnalysis reports dimensions None.
    assert!(closed.unit_cell.is_none());
    let c = closed.coords.as_ref().unwrap();
    assert_xyz(c[0], [-11.053, 26.680, 12.742]);
    assert_xyz(c[3340], [-12.836, 22.125, 24.355]);
    // The same atoms in the same order as the PSF.
    let psf = read_psf(&dir.join("adk.psf")).unwrap();
    assert_eq!(psf.atoms.len(), open.atoms.len());
    for (a, b) in psf.atoms.iter().zip(&open.atoms) {
        assert_eq!(
            (&a.name, &a.resname, a.resid, &a.element),
            (&b.name, &b.resname, b.resid, &b.element)
        );
    }
}

/// adk_oplsaa: ADK in TIP4P water with 4 Na+, as GROMACS writes it. MDAnalysis: 47681 atoms,
/// 11302 residues, types C 1040, DUMMY 11084 (the TIP4P virtual site MW, here element X),
/// H 23853, N 289, NA 4, O 11404, S 7; total mass 223352.2621 (MDAnalysis's Na is 22.98977,
/// ours 22.990).
fn check_oplsaa(top: &Topology) {
    assert_eq!(top.len(), 47681);
    assert_eq!(n_residues(top), 11302);
    // Neither file has a segment (nor the PDB a chain): MDAnalysis's segid SYSTEM.
    assert_eq!(ident(top, 0), ("N", "MET", 1, "SYSTEM"));
    assert_eq!(ident(top, 1), ("H1", "MET", 1, "SYSTEM"));
    assert_eq!(ident(top, 2), ("H2", "MET", 1, "SYSTEM"));
    assert_eq!(ident(top, 47680), ("NA", "NA+", 11302, "SYSTEM"));
    assert!(top.atoms.iter().all(|a| a.chain.is_empty()));
    assert_eq!(top.atoms[47680].element, "Na");
    assert_eq!(
        element_counts(top),
        counts(&[
            ("C", 1040),
            ("H", 23853),
            ("N", 289),
            ("Na", 4),
            ("O", 11404),
            ("S", 7),
            ("X", 11084)
        ])
    );
    assert!(top
        .atoms
        .iter()
        .filter(|a| a.element == "X")
        .all(|a| a.name == "MW" && a.atomic_number == 0 && a.mass == 0.0));
    assert_close(total_mass(top), 223352.2621, 0.05, "total mass");
}

#[test]
fn adk_oplsaa_gro() {
    let top = read_gro(&common::adk_data().join("adk_oplsaa.gro")).unwrap();
    check_oplsaa(&top);
    // MDAnalysis: dimensions [80.017006 80.017006 80.01703 60.00001 60.00001 90.].
    assert_dims(
        &top,
        [80.017006, 80.017006, 80.01703, 60.00001, 60.00001, 90.0],
    );
    let cell = top.unit_cell.unwrap();
    assert_eq!(cell.vectors[0], [80.017, 0.0, 0.0]);
    assert_eq!(cell.vectors[1], [0.0, 80.017, 0.0]);
    assert_eq!(cell.vectors[2], [40.0085, 40.0085, 56.5806]);
    let c = top.coords.as_ref().unwrap();
    // MDAnalysis: positions[0] = [52.02, 43.56, 31.55] (f32), positions[-1] = [62.96, 47.24, 3.75].
    assert_eq!(c[0], [52.02, 43.56, 31.55]);
    assert_eq!(c[47680], [62.96, 47.24, 3.75]);
}

#[test]
fn adk_oplsaa_pdb() {
    let top = read_pdb(&common::adk_data().join("adk_oplsaa.pdb")).unwrap();
    // Names such as `1HD1` (389 of them) start with a digit; the element is still hydrogen, as
    // MDAnalysis's types say.
    check_oplsaa(&top);
    assert_eq!(
        top.atoms
            .iter()
            .filter(|a| a.name.starts_with(|c: char| c.is_ascii_digit()))
            .count(),
        389
    );
    assert_dims(&top, [80.017, 80.017, 80.017, 60.0, 60.0, 90.0]);
    let c = top.coords.as_ref().unwrap();
    assert_xyz(c[0], [52.017, 43.560, 31.555]);
    assert_xyz(c[47680], [62.961, 47.239, 3.753]);
}

#[test]
fn pdb_3kpr_gzipped() {
    // Gzipped, 10 chains, element column, serials that run into `HETATM13329`.
    let top = read_topology(&common::adk_data().join("3KPR.pdb.gz")).unwrap();
    // MDAnalysis: 13434 atoms, 1768 residues, elements C 8356, N 2320, O 2714, S 44; total mass
    // 177692.0820; dimensions [223.117 53.217 143.202 90 102.39 90].
    assert_eq!(top.len(), 13434);
    assert_eq!(n_residues(&top), 1768);
    assert_eq!(
        element_counts(&top),
        counts(&[("C", 8356), ("N", 2320), ("O", 2714), ("S", 44)])
    );
    assert_close(total_mass(&top), 177692.0820, 0.05, "total mass");
    assert_dims(&top, [223.117, 53.217, 143.202, 90.0, 102.39, 90.0]);
    // No segID column: the segids are the chain IDs, as MDAnalysis has them.
    assert_eq!(ident(&top, 0), ("N", "GLY", 1, "A"));
    assert_eq!(ident(&top, 1), ("CA", "GLY", 1, "A"));
    assert_eq!(ident(&top, 13433), ("O", "HOH", 255, "J"));
    assert_eq!(top.atoms[0].chain, "A");
    assert_eq!(top.atoms[13433].chain, "J");
    let chains: std::collections::BTreeSet<&str> =
        top.atoms.iter().map(|a| a.chain.as_str()).collect();
    assert_eq!(chains.into_iter().collect::<String>(), "ABCDEFGHIJ");
    let c = top.coords.as_ref().unwrap();
    assert_xyz(c[0], [49.491, -15.695, 13.345]);
    assert_xyz(c[13433], [18.024, 4.967, 52.662]);
}

#[test]
fn pdb_6msm_cryoem() {
    let f = bunzip(&common::adk_data().join("6msm.pdb.bz2"));
    let top = read_pdb(&f.0).unwrap();
    // MDAnalysis: 9703 atoms, 1208 residues, elements C 6343, Mg 2, N 1596, O 1709, P 6, S 47;
    // total mass 127624.5100; dimensions None (CRYST1 1.000 1.000 1.000 is the cryo-EM
    // placeholder).
    assert_eq!(top.len(), 9703);
    assert_eq!(n_residues(&top), 1208);
    assert_eq!(
        element_counts(&top),
        counts(&[
            ("C", 6343),
            ("Mg", 2),
            ("N", 1596),
            ("O", 1709),
            ("P", 6),
            ("S", 47)
        ])
    );
    assert_close(total_mass(&top), 127624.5100, 0.05, "total mass");
    assert!(top.unit_cell.is_none());
    assert_eq!(ident(&top, 0), ("N", "MET", 1, "A"));
    assert_eq!(ident(&top, 9702), ("O1", "CLR", 1510, "A"));
    let mg: Vec<_> = top.atoms.iter().filter(|a| a.name == "MG").collect();
    assert_eq!(mg.len(), 2);
    assert!(mg.iter().all(|a| a.atomic_number == 12 && a.mass == 24.305));
    let c = top.coords.as_ref().unwrap();
    assert_xyz(c[0], [133.081, 176.038, 136.993]);
    assert_xyz(c[9702], [169.080, 164.903, 189.311]);
}

#[test]
fn rna_1k5i_pdb_and_ext_psf() {
    let dir = common::adk_data();
    // MDAnalysis (both files): 17927 atoms, 5767 residues; types C 218, H 11696, K 22, N 88,
    // O 5881, P 22.
    let want = counts(&[
        ("C", 218),
        ("H", 11696),
        ("K", 22),
        ("N", 88),
        ("O", 5881),
        ("P", 22),
    ]);
    let pdb = read_topology(&dir.join("1k5i_c36.pdb.gz")).unwrap();
    assert_eq!(pdb.len(), 17927);
    assert_eq!(n_residues(&pdb), 5767);
    assert_eq!(element_counts(&pdb), want);
    assert_eq!(ident(&pdb, 0), ("H5T", "GUA", 1, "SYSTEM"));
    assert_eq!(ident(&pdb, 1), ("O5'", "GUA", 1, "SYSTEM"));
    assert_eq!(ident(&pdb, 17926), ("POT", "POT", 5767, "SYSTEM"));
    assert_dims(&pdb, [56.16, 56.16, 56.16, 90.0, 90.0, 90.0]);
    // MDAnalysis's K is 39.102 where ours is 39.098: 111272.3730 - 22 x 0.004.
    assert_close(
        total_mass(&pdb),
        111272.3730 - 22.0 * 0.004,
        0.02,
        "total mass",
    );

    // PSF EXT CMAP CHEQ XPLOR: three segments, residue numbers restarting in each.
    let psf = read_topology(&dir.join("1k5i_c36.psf.gz")).unwrap();
    assert_eq!(psf.len(), 17927);
    assert_eq!(n_residues(&psf), 5767);
    assert_eq!(element_counts(&psf), want);
    assert_eq!(ident(&psf, 0), ("H5T", "GUA", 1, "RNAA"));
    assert_eq!(ident(&psf, 1), ("O5'", "GUA", 1, "RNAA"));
    assert_eq!(ident(&psf, 17926), ("POT", "POT", 22, "POT"));
    // Masses from the file: MDAnalysis 1.008, 15.9994, ..., 39.0983; total 111274.6440.
    assert_eq!(psf.atoms[1].mass, 15.9994);
    assert_eq!(psf.atoms[17926].mass, 39.0983);
    assert_close(total_mass(&psf), 111274.6440, 0.02, "total mass");
    assert_eq!(psf.atoms[0].charge, 0.43);
    // Same atoms as the PDB, apart from segments.
    for (a, b) in psf.atoms.iter().zip(&pdb.atoms) {
        assert_eq!(
            (&a.name, &a.resname, a.atomic_number),
            (&b.name, &b.resname, b.atomic_number)
        );
    }
}

#[test]
fn read_topology_dispatch() {
    let dir = common::adk_data();
    assert_eq!(read_topology(&dir.join("adk.psf")).unwrap().len(), 3341);
    assert_eq!(
        read_topology(&dir.join("adk_oplsaa.gro")).unwrap().len(),
        47681
    );
    let e = read_topology(&dir.join("adk_dims.dcd"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown topology format"), "{e}");
    let e = read_pdb(&dir.join("no-such-file.pdb")).unwrap_err();
    assert!(format!("{e:#}").contains("no-such-file.pdb"), "{e:#}");
}

// ---------------------------------------------------------------------------------------------
// Synthetic PDB

/// A PDB ATOM line with the standard columns.
#[allow(clippy::too_many_arguments)]
fn atom_line(
    serial: &str,
    name: &str,
    alt: char,
    resname: &str,
    chain: char,
    resseq: &str,
    x: f32,
    segid: &str,
    elem: &str,
) -> String {
    format!(
        "ATOM  {serial:>5} {name:<4}{alt}{resname:<4}{chain}{resseq:>4}    {x:8.3}{:8.3}{:8.3}{:6.2}{:6.2}      {segid:<4}{elem:>2}",
        0.0, 0.0, 1.0, 0.0
    )
}

fn pdb_of(lines: &[String]) -> TempFile {
    TempFile::new("t.pdb", (lines.join("\n") + "\n").as_bytes())
}

#[test]
fn pdb_altlocs_keep_first_location() {
    // MDAnalysis 2.11 keeps all 7 records (altLocs '', '', A, B, A, B, ''); we keep 5.
    let f = pdb_of(&[
        atom_line("1", " N", ' ', "SER", 'A', "1", 1.0, "", "N"),
        atom_line("2", " CA", ' ', "SER", 'A', "1", 2.0, "", "C"),
        atom_line("3", " CB", 'A', "SER", 'A', "1", 3.0, "", "C"),
        atom_line("4", " CB", 'B', "SER", 'A', "1", 3.1, "", "C"),
        atom_line("5", " OG", 'A', "SER", 'A', "1", 4.0, "", "O"),
        atom_line("6", " OG", 'B', "SER", 'A', "1", 4.1, "", "O"),
        atom_line("7", " C", ' ', "SER", 'A', "1", 5.0, "", "C"),
        // A residue whose only locations are B and C keeps B.
        atom_line("8", " N", 'B', "GLY", 'A', "2", 6.0, "", "N"),
        atom_line("9", " N", 'C', "GLY", 'A', "2", 6.1, "", "N"),
    ]);
    let top = read_pdb(&f.0).unwrap();
    let names: Vec<&str> = top.atoms.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["N", "CA", "CB", "OG", "C", "N"]);
    let x: Vec<f32> = top.coords.unwrap().iter().map(|c| c[0]).collect();
    assert_eq!(x, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
}

#[test]
fn pdb_first_model_only_and_short_lines() {
    let text = "\
REMARK  short lines, no element column, two models
CRYST1   30.000   40.000   50.000  90.00  90.00 120.00 P 1           1
MODEL        1
ATOM      1  N   ALA     1       1.000   2.000   3.000
ATOM      2  CA  ALA     1       2.000   2.000   3.000  1.00
ATOM      3  CA  CA      2       9.000   2.000   3.000
HETATM    4 NA   NA+     3       7.000   2.000   3.000  1.00  0.00      ION
ENDMDL
MODEL        2
ATOM      1  N   ALA     1       1.500   2.000   3.000
ATOM      2  CA  ALA     1       2.500   2.000   3.000
ATOM      3  CA  CA      2       9.500   2.000   3.000
HETATM    4 NA   NA+     3       7.500   2.000   3.000  1.00  0.00      ION
ENDMDL
END
";
    let f = TempFile::new("m.pdb", text.as_bytes());
    let top = read_pdb(&f.0).unwrap();
    assert_eq!(top.len(), 4);
    assert_eq!(top.coords.as_ref().unwrap()[0], [1.0, 2.0, 3.0]);
    // Calcium alpha vs calcium, sodium in an ion residue; chain falls back to the segid.
    let el: Vec<&str> = top.atoms.iter().map(|a| a.element.as_str()).collect();
    assert_eq!(el, ["N", "C", "Ca", "Na"]);
    assert_eq!(top.atoms[3].chain, "ION");
    assert_eq!(top.atoms[0].chain, "");
    assert_dims(&top, [30.0, 40.0, 50.0, 90.0, 90.0, 120.0]);
    assert_eq!(n_residues(&top), 3);
}

#[test]
fn pdb_residue_numbers_hybrid36_and_wrapped() {
    let f = pdb_of(&[
        atom_line("1", " OW", ' ', "SOL", 'W', "9998", 0.0, "", ""),
        atom_line("2", " OW", ' ', "SOL", 'W', "9999", 0.0, "", ""),
        atom_line("3", " OW", ' ', "SOL", 'W', "A000", 0.0, "", ""),
        atom_line("4", " OW", ' ', "SOL", 'W', "A001", 0.0, "", ""),
    ]);
    let top = read_pdb(&f.0).unwrap();
    let r: Vec<i32> = top.atoms.iter().map(|a| a.resid).collect();
    assert_eq!(r, [9998, 9999, 10000, 10001]);
    assert_eq!(top.atoms[0].element, "O");

    // Numbering wrapped at 10000 (VMD, GROMACS): unwrapped as MDAnalysis does (add 10000 while
    // the number drops by more than 5000 from the previous one), but within a chain only.
    let seq = ["9998", "9999", "0", "1", "5000", "9999", "0", "7"];
    let mut lines: Vec<String> = seq
        .iter()
        .map(|r| atom_line("1", " OW", ' ', "SOL", 'W', r, 0.0, "", ""))
        .collect();
    lines.push(atom_line("9", " N", ' ', "ALA", 'B', "1", 0.0, "", ""));
    let top = read_pdb(&pdb_of(&lines).0).unwrap();
    let r: Vec<i32> = top.atoms.iter().map(|a| a.resid).collect();
    assert_eq!(r, [9998, 9999, 10000, 10001, 15000, 19999, 20000, 20007, 1]);
    assert_eq!(n_residues(&top), 9);

    // Insertion codes separate residues.
    let mut l = atom_line("1", " N", ' ', "ALA", 'A', "52", 0.0, "", "N");
    let mut m = atom_line("2", " N", ' ', "GLY", 'A', "52", 0.0, "", "N");
    m.replace_range(26..27, "A");
    l.truncate(54);
    let top = read_pdb(&pdb_of(&[l, m]).0).unwrap();
    assert_eq!(top.atoms[1].icode, 'A');
    assert_eq!(top.residue_indices(), [0, 1]);
}

#[test]
fn pdb_errors_name_file_and_line() {
    let good = atom_line("1", " N", ' ', "ALA", 'A', "1", 1.0, "", "N");
    let mut bad_x = good.clone();
    bad_x.replace_range(30..38, "   1.0x0");
    let f = pdb_of(&["REMARK".into(), good.clone(), bad_x]);
    let e = format!("{:#}", read_pdb(&f.0).unwrap_err());
    assert!(
        e.contains(&format!("{}:3: atom 2: bad x coordinate", f.0.display())),
        "{e}"
    );

    let mut bad_res = good.clone();
    bad_res.replace_range(22..26, "12x4");
    let e = format!("{:#}", read_pdb(&pdb_of(&[bad_res]).0).unwrap_err());
    assert!(e.contains(":1: atom 1: bad residue number \"12x4\""), "{e}");

    let e = format!(
        "{:#}",
        read_pdb(&pdb_of(&[good[..40].to_string()]).0).unwrap_err()
    );
    assert!(e.contains("bad y coordinate"), "{e}");

    let e = format!(
        "{:#}",
        read_pdb(&pdb_of(&["REMARK nothing".into()]).0).unwrap_err()
    );
    assert!(e.contains("no ATOM or HETATM record"), "{e}");

    let e = format!(
        "{:#}",
        read_pdb(&pdb_of(&["CRYST1   abc".into(), good]).0).unwrap_err()
    );
    assert!(e.contains(":1: CRYST1: bad a"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Synthetic GRO

#[test]
fn gro_precision_velocities_and_wrapped_residues() {
    // High precision (%10.5f), velocities, residue numbers wrapping at 100000, rectangular box.
    let text = "\
water at high precision
    4
99999SOL     OW99997   1.00000   2.00000   3.00000  0.1000  0.2000  0.3000
99999SOL    HW199998   1.10000   2.00000   3.00000  0.1000  0.2000  0.3000
    0SOL     OW99999   4.00000   5.00000   6.00000  0.1000  0.2000  0.3000
    1NA      NA    0  -1.00000  -2.00000  -3.00000  0.1000  0.2000  0.3000
   5.00000   6.00000   7.00000
";
    let f = TempFile::new("w.gro", text.as_bytes());
    let top = read_gro(&f.0).unwrap();
    assert_eq!(top.len(), 4);
    assert_eq!(top.residue_indices(), [0, 0, 1, 2]);
    let c = top.coords.as_ref().unwrap();
    assert_eq!(c[0], [10.0, 20.0, 30.0]);
    assert_eq!(c[3], [-10.0, -20.0, -30.0]);
    let el: Vec<&str> = top.atoms.iter().map(|a| a.element.as_str()).collect();
    assert_eq!(el, ["O", "H", "O", "Na"]);
    assert_dims(&top, [50.0, 60.0, 70.0, 90.0, 90.0, 90.0]);
}

#[test]
fn gro_errors() {
    let p = |t: &str| {
        let f = TempFile::new("e.gro", t.as_bytes());
        let e = format!("{:#}", read_gro(&f.0).unwrap_err());
        (f, e)
    };
    let (f, e) = p("t\n3\n    1SOL     OW    1   1.000   2.000   3.000\n");
    assert!(
        e.contains(&format!(
            "{}: truncated: the file declares 3 atoms but ends after 1",
            f.0.display()
        )),
        "{e}"
    );
    let (_f, e) = p("t\nthree\n");
    assert!(e.contains(":2: bad atom count \"three\""), "{e}");
    let (_f, e) = p("t\n2\n    1SOL     OW    1   1.000   2.000   3.000\n    1SOL    HW1    2   1.000   2.0x0   3.000\n 1 1 1\n");
    assert!(e.contains(":4: atom 2: bad y coordinate \"2.0x0\""), "{e}");
    // One atom fewer declared than present: the extra atom line is no box.
    let (_f, e) = p("t\n1\n    1SOL     OW    1   1.000   2.000   3.000\n    1SOL    HW1    2   1.000   2.000   3.000\n 1 1 1\n");
    assert!(e.contains(":4: bad box line"), "{e}");
    let (_f, e) = p("t\n1\n    1SOL     OW    1   1.000   2.000   3.000\n");
    assert!(e.contains("no box line"), "{e}");
    let (_f, e) = p("t\n1\n    1SOL     OW    1   1.000   2.000   3.000\n 1 2 3 4\n");
    assert!(e.contains(":4: box line has 4 numbers"), "{e}");
    // An atom count beyond what any system holds is refused before anything is allocated.
    let (_f, e) = p("t\n999999999999\n");
    assert!(
        e.contains("999999999999 atoms, more than the 100000000"),
        "{e}"
    );
}

#[test]
fn gro_segid_system_and_box_numbers_run_together() {
    // GROMACS writes the box with %10.5f: a box of 400 um runs the numbers together, as in
    // MDAnalysisTests' huge_box.gro (MDAnalysis reads it as 400000 A).
    let f = TempFile::new(
        "huge.gro",
        b"huge cubic box\n    1\n    1SOL      H    1   0.000   0.000   0.000\n40000.0000040000.0000040000.00000\n",
    );
    let top = read_gro(&f.0).unwrap();
    assert_dims(&top, [400000.0, 400000.0, 400000.0, 90.0, 90.0, 90.0]);
    // No segment in a GRO file: MDAnalysis's SYSTEM; no chain.
    assert_eq!(top.atoms[0].segid, "SYSTEM");
    assert_eq!(top.atoms[0].chain, "");
}

#[test]
fn pdb_element_x_segids_and_cryst1_after_the_model() {
    // Element column X (coarse-grained beads): unknown element, not a guess from the name (BB
    // would be boron); a blank element column is still guessed. Segment ids: the segID column.
    let text = "\
MODEL        1
ATOM      1  BB  LYS     1       1.000   2.000   3.000  1.00  0.00      PROT X
ATOM      2  SC1 LYS     1       2.000   2.000   3.000  1.00  0.00      PROT X
ATOM      3  CA  ALA     2       3.000   2.000   3.000  1.00  0.00      PROT
ENDMDL
CRYST1   40.000   41.000   42.000  90.00  90.00  90.00 P 1           1
MODEL        2
ATOM      1  BB  LYS     1       1.500   2.000   3.000  1.00  0.00      PROT X
ATOM      2  SC1 LYS     1       2.500   2.000   3.000  1.00  0.00      PROT X
ATOM      3  CA  ALA     2       3.500   2.000   3.000  1.00  0.00      PROT
ENDMDL
CRYST1   50.000   41.000   42.000  90.00  90.00  90.00 P 1           1
END
";
    let f = TempFile::new("cg.pdb", text.as_bytes());
    let top = read_pdb(&f.0).unwrap();
    let el: Vec<(&str, u8, f32)> = top
        .atoms
        .iter()
        .map(|a| (a.element.as_str(), a.atomic_number, a.mass))
        .collect();
    assert_eq!(el, [("X", 0, 0.0), ("X", 0, 0.0), ("C", 6, 12.011)]);
    assert!(top
        .atoms
        .iter()
        .all(|a| a.segid == "PROT" && a.chain == "PROT"));
    // No CRYST1 before the first model: the one after its ENDMDL is its box (MDAnalysis).
    assert_dims(&top, [40.0, 41.0, 42.0, 90.0, 90.0, 90.0]);

    // Chain IDs without segIDs become the segids; a file with neither gets SYSTEM.
    let chains = [
        atom_line("1", " N", ' ', "ALA", 'A', "1", 1.0, "", ""),
        atom_line("2", " N", ' ', "ALA", 'B', "2", 2.0, "", ""),
    ];
    let f = pdb_of(&chains);
    let top = read_pdb(&f.0).unwrap();
    let seg: Vec<&str> = top.atoms.iter().map(|a| a.segid.as_str()).collect();
    assert_eq!(seg, ["A", "B"]);
    let bare = [atom_line("1", " N", ' ', "ALA", ' ', "1", 1.0, "", "")];
    let f = pdb_of(&bare);
    let top = read_pdb(&f.0).unwrap();
    assert_eq!(top.atoms[0].segid, "SYSTEM");
    assert_eq!(top.atoms[0].chain, "");
}

#[test]
fn special_files_and_compression_bombs_are_refused() {
    // /dev/zero through a symlink: refused by its type at once, naming the link's target.
    let dir = std::env::temp_dir().join(format!("hiermd-topology-special-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("zero.pdb");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    let t = std::time::Instant::now();
    let e = format!("{:#}", read_topology(&link).unwrap_err());
    assert!(t.elapsed().as_secs_f64() < 1.0);
    assert!(
        e.contains("(a link to /dev/zero) is a character device, not a regular file"),
        "{e}"
    );
    // A directory named like a topology.
    let d = dir.join("folder.psf");
    std::fs::create_dir_all(&d).unwrap();
    let e = format!("{:#}", read_topology(&d).unwrap_err());
    assert!(e.contains("is a directory, not a regular file"), "{e}");
    // A gzip file whose trailer says it inflates to 1 GiB from a few kB: refused before
    // inflating a byte.
    let mut gz = gzip(&vec![b'\n'; 1 << 20]);
    let n = gz.len();
    gz[n - 4..].copy_from_slice(&(1u32 << 30).to_le_bytes());
    let f = TempFile::new("bomb.pdb.gz", &gz);
    let e = format!("{:#}", read_topology(&f.0).unwrap_err());
    assert!(e.contains("refused as a decompression bomb"), "{e}");
    assert!(e.contains("its trailer says 1073741824 bytes"), "{e}");
    // bzip2 is recognised and refused with a clear message.
    let f = TempFile::new("x.pdb.bz2", b"BZh91AY&SY\x00\x00");
    let e = format!("{:#}", read_pdb(&f.0).unwrap_err());
    assert!(e.contains("bzip2-compressed"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `data` gzipped.
fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Synthetic PSF

#[test]
fn psf_standard_blank_segid_icode_and_hmr() {
    // Standard widths, a blank segid (fixed columns), an insertion code, hydrogen-mass
    // repartitioned masses, a sodium whose name is not its residue's, and a massless lone pair.
    let text = "\
PSF

       1 !NTITLE
* test

       6 !NATOM
       1      10   ALA  N    NH1   -0.470000       12.0000           0
       2      10   ALA  HN   H      0.310000       3.02400           0
       3      10A  GLY  CA   CT2   -0.020000       12.0110           0
       4 ION  1    SOD  NA   SOD    1.000000       22.9898           0
       5 LIG  1    LIG  CL1  CLGR1 -0.100000       35.4500           0
       6 LIG  1    LIG  LP1  LPH    0.050000       0.00000           0

       0 !NBOND: bonds
";
    let f = TempFile::new("s.psf", text.as_bytes());
    let top = read_psf(&f.0).unwrap();
    assert_eq!(top.len(), 6);
    let el: Vec<&str> = top.atoms.iter().map(|a| a.element.as_str()).collect();
    assert_eq!(el, ["N", "H", "C", "Na", "Cl", "X"]);
    assert_eq!(top.atoms[0].segid, "");
    assert_eq!((top.atoms[2].resid, top.atoms[2].icode), (10, 'A'));
    assert_eq!(top.atoms[0].mass, 12.0);
    assert_eq!(top.atoms[3].chain, "ION");
    assert_eq!(top.residue_indices(), [0, 0, 1, 2, 3, 3]);
}

#[test]
fn psf_namd_space_separated() {
    let text = "PSF NAMD\n\n1 !NTITLE\n* namd\n\n2 !NATOM\n1 PROTEIN_A 1 MET N NH3_LONG_TYPE -0.3 14.007 0\n2 PROTEIN_A 1 MET CA CT1 0.21 12.011 0\n";
    let f = TempFile::new("n.psf", text.as_bytes());
    let top = read_psf(&f.0).unwrap();
    assert_eq!(top.len(), 2);
    assert_eq!(top.atoms[0].segid, "PROTEIN_A");
    assert_eq!(top.atoms[1].element, "C");
}

#[test]
fn psf_errors() {
    let p = |t: &str| {
        let f = TempFile::new("e.psf", t.as_bytes());
        let e = format!("{:#}", read_psf(&f.0).unwrap_err());
        (f, e)
    };
    let (f, e) = p("PDB\n");
    assert!(
        e.contains(&format!("{}:1: not a PSF file", f.0.display())),
        "{e}"
    );
    let (_f, e) = p("PSF\n\n 1 !NTITLE\n* t\n\n 3 !NATOM\n       1 A    1    ALA  N    NH1   -0.470000       14.0070           0\n\n 0 !NBOND\n");
    assert!(
        e.contains(":9: the file declares 3 atoms but the !NATOM section ends after 1"),
        "{e}"
    );
    let (_f, e) = p("PSF\n\n 1 !NTITLE\n* t\n\n 2 !NATOM\n       1 A    1    ALA  N    NH1   -0.470000       14.0070           0\n       2 A    1    ALA  CA   CT1   -0.4x0000       12.0110           0\n");
    assert!(
        e.contains(":8: atom 2: charge \"-0.4x0000\" is not a finite number: cannot read"),
        "{e}"
    );
    // A mass that is no number, or negative, names the line, the atom and the field.
    let (_f, e) = p("PSF\n\n 1 !NTITLE\n* t\n\n 2 !NATOM\n       1 A    1    ALA  N    NH1   -0.470000       14.0070           0\n       2 A    1    ALA  CA   CT1    0.070000           abc           0\n");
    assert!(
        e.contains(":8: atom 2: mass \"abc\" is not a finite number"),
        "{e}"
    );
    let (_f, e) = p("PSF\n\n 1 !NTITLE\n* t\n\n 2 !NATOM\n       1 A    1    ALA  N    NH1   -0.470000       14.0070           0\n       2 A    1    ALA  CA   CT1    0.070000       -12.011           0\n");
    assert!(
        e.contains(":8: atom 2 (CA of residue ALA 1): mass -12.011 is negative"),
        "{e}"
    );
    let (_f, e) = p("PSF\n\n 1 !NTITLE\n* t\n\n 2 !NATOM\n       1 A    1    ALA  N    NH1   -0.470000       14.0070           0\n       2 A    1    ALA  CA   CT1    0.070000           nan           0\n");
    assert!(
        e.contains(":8: atom 2: mass \"nan\" is not a finite number"),
        "{e}"
    );
    // An atom count beyond what any system holds is refused before anything is read.
    let (_f, e) = p("PSF\n\n 1 !NTITLE\n* t\n\n 999999999999 !NATOM\n");
    assert!(
        e.contains("999999999999 atoms, more than the 100000000"),
        "{e}"
    );
    let (_f, e) = p("PSF\n\n 1 !NTITLE\n* t\n\n 5 !NATOM\n       1 A    1    ALA  N    NH1   -0.470000       14.0070           0\n");
    assert!(
        e.contains("truncated: the file declares 5 atoms but ends after 1"),
        "{e}"
    );
    let (_f, e) = p("PSF\n\n 2 !NTITLE\n* t\n");
    assert!(e.contains("truncated in the title"), "{e}");
    let (_f, e) = p("PSF\n\n x !NTITLE\n");
    assert!(e.contains(":3: bad title count"), "{e}");
}

#[test]
fn element_guessing_examples() {
    // MDAnalysis conventions, and where this crate differs (see topology::element docs).
    let g = |n: &str, r: &str| element::guess(n, r, None).map(element::symbol);
    assert_eq!(g("CA", "LYS"), Some("C"));
    assert_eq!(g("CA", "CA"), Some("Ca"));
    assert_eq!(g("NA", "HEM"), Some("N")); // MDAnalysis: Na
    assert_eq!(g("NA", "SOD"), Some("Na"));
    assert_eq!(g("SE", "MSE"), Some("Se")); // MDAnalysis: S
    assert_eq!(g("2HG1", "VAL"), Some("H"));
    assert_eq!(g("MW", "SOL"), None); // MDAnalysis: DUMMY
    assert_eq!(
        element::guess("CA", "ALA", Some(40.08)).map(element::symbol),
        Some("Ca")
    );
    assert_eq!(
        element::guess("NZ", "LYS", Some(12.0)).map(element::symbol),
        Some("N")
    );
}

// ---------------------------------------------------------------------------------------------
// Fuzz: random and mutated text, every reader answers Ok or Err without panicking.

const SEED_PDB: &str = "\
CRYST1   80.017   80.017   80.017  60.00  60.00  90.00 P 1           1
MODEL        1
ATOM      1 N    MET     1     -11.921  26.307  10.410  1.00 38.38      4AKE N
ATOM      2 HT1  MET     1     -11.447  26.741   9.595  1.00  0.00      4AKE
ATOM      3 CB  AMET A   1     -12.440  27.042  10.926  1.00  0.00      4AKE
ATOM      4 CB  BMET A   1     -12.632  25.619  10.046  1.00  0.00      4AKE
HETATM10000 NA   NA+ BA000     -10.929  25.652  11.311  1.00 26.14          NA
ENDMDL
";

const SEED_GRO: &str = "\
Adenylate Kinase
    3
    1MET      N    1   5.202   4.356   3.155  0.1000  0.2000  0.3000
    1MET     H1    2   5.119   4.411   3.172  0.1000  0.2000  0.3000
11302NA+     NA47681   6.296   4.724   0.375  0.1000  0.2000  0.3000
   8.00170   8.00170   5.65806   0.00000   0.00000   0.00000   0.00000   4.00085   4.00085
";

const SEED_PSF: &str = "\
PSF CMAP CHEQ

       1 !NTITLE
* ADK

       3 !NATOM
       1 4AKE 1    MET  N      56  -0.300000       14.0070           0   0.00000     -0.301140E-02
       2 4AKE 1A   MET  HT1     2   0.330000       1.00800           0   0.00000     -0.301140E-02
       3 4AKE 2    SOD  SOD     2   1.000000       22.9898           0   0.00000     -0.301140E-02

       0 !NBOND: bonds
";

/// Interesting bytes for mutations: digits, separators, signs, letters the formats use.
const ALPHABET: &[u8] = b"0123456789 .-+*:!\n\rAEHNOPSXaex\t\xff";

#[derive(Clone, Debug)]
enum Mutation {
    Replace(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    DuplicateLine(usize),
    DeleteLine(usize),
    /// A number-looking run: huge counts, negative numbers.
    Number(usize, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let byte = prop_oneof![
        3 => proptest::sample::select(ALPHABET),
        1 => any::<u8>(),
    ];
    prop_oneof![
        4 => (any::<usize>(), byte.clone()).prop_map(|(p, b)| Mutation::Replace(p, b)),
        2 => (any::<usize>(), byte).prop_map(|(p, b)| Mutation::Insert(p, b)),
        2 => any::<usize>().prop_map(Mutation::Delete),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => any::<usize>().prop_map(Mutation::DuplicateLine),
        1 => any::<usize>().prop_map(Mutation::DeleteLine),
        1 => (any::<usize>(), proptest::sample::select(vec![
            "99999999999999999999", "-1", "0", "4294967296", "1e40", "NaN", "inf", "-0", "100000",
        ])).prop_map(|(p, s)| Mutation::Number(p, s.to_string())),
    ]
}

fn apply(seed: &str, muts: &[Mutation]) -> Vec<u8> {
    let mut b = seed.as_bytes().to_vec();
    for m in muts {
        let n = b.len().max(1);
        match m {
            Mutation::Replace(p, x) => {
                if !b.is_empty() {
                    b[p % n] = *x;
                }
            }
            Mutation::Insert(p, x) => b.insert(p % (b.len() + 1), *x),
            Mutation::Delete(p) => {
                if !b.is_empty() {
                    b.remove(p % n);
                }
            }
            Mutation::Truncate(p) => b.truncate(p % (b.len() + 1)),
            Mutation::DuplicateLine(p) | Mutation::DeleteLine(p) => {
                let mut lines: Vec<Vec<u8>> =
                    b.split(|&c| c == b'\n').map(<[u8]>::to_vec).collect();
                let k = p % lines.len();
                if matches!(m, Mutation::DuplicateLine(_)) {
                    let l = lines[k].clone();
                    lines.insert(k, l);
                } else {
                    lines.remove(k);
                }
                b = lines.join(&b'\n');
            }
            Mutation::Number(p, s) => {
                let at = p % (b.len() + 1);
                let end = (at + s.len()).min(b.len());
                b.splice(at..end, s.bytes());
            }
        }
    }
    b
}

fn fuzz_config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs every reader on the bytes; each must return (Ok or Err), not panic.
fn run_all_readers(bytes: &[u8]) {
    let f = TempFile::new("fuzz", bytes);
    let _ = read_pdb(&f.0);
    let _ = read_gro(&f.0);
    let _ = read_psf(&f.0);
}

proptest! {
    #![proptest_config(fuzz_config())]

    #[test]
    fn fuzz_mutated_pdb(muts in proptest::collection::vec(mutation(), 1..12)) {
        run_all_readers(&apply(SEED_PDB, &muts));
    }

    #[test]
    fn fuzz_mutated_gro(muts in proptest::collection::vec(mutation(), 1..12)) {
        run_all_readers(&apply(SEED_GRO, &muts));
    }

    #[test]
    fn fuzz_mutated_psf(muts in proptest::collection::vec(mutation(), 1..12)) {
        run_all_readers(&apply(SEED_PSF, &muts));
    }

    #[test]
    fn fuzz_random_bytes(
        bytes in proptest::collection::vec(
            prop_oneof![3 => proptest::sample::select(ALPHABET), 1 => any::<u8>()],
            0..600,
        ),
        prefix in proptest::sample::select(vec![
            &b""[..],
            b"PSF EXT\n\n 1 !NTITLE\n*\n 2 !NATOM\n",
            b"t\n 2\n",
            b"ATOM  ",
            b"\x1f\x8b\x08\x00",
        ]),
    ) {
        let mut b = prefix.to_vec();
        b.extend_from_slice(&bytes);
        run_all_readers(&b);
    }
}

#[test]
fn seeds_are_valid() {
    // The fuzz seeds parse, so mutations explore the paths past the headers.
    let f = TempFile::new("seed.pdb", SEED_PDB.as_bytes());
    let top = read_pdb(&f.0).unwrap();
    assert_eq!(top.len(), 4);
    assert_eq!(top.atoms[3].resid, 10000);
    assert_eq!(top.atoms[3].element, "Na");
    let f = TempFile::new("seed.gro", SEED_GRO.as_bytes());
    assert_eq!(read_gro(&f.0).unwrap().len(), 3);
    let f = TempFile::new("seed.psf", SEED_PSF.as_bytes());
    let top = read_psf(&f.0).unwrap();
    assert_eq!(top.len(), 3);
    assert_eq!(top.atoms[2].element, "Na");
}
