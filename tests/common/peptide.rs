//! A small generated peptide (four residues, one of them a ligand without a C-alpha atom) with
//! a two-state motion, imported as a dataset: the fixture of the API and C ABI tests.

use hiermd::store::{self, ImportOptions};
use hiermd::testing::Rng;
use std::path::{Path, PathBuf};

pub const RESIDUES: [(&str, &[&str]); 4] = [
    ("ALA", &["N", "CA", "C", "O", "CB"]),
    ("GLY", &["N", "CA", "C", "O"]),
    ("SER", &["N", "CA", "C", "O", "CB", "OG"]),
    ("LIG", &["C1", "O2", "N3"]),
];

pub fn tmpdir(prefix: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hiermd-{prefix}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A two-state system (as tests/workflow.rs): the last residue sits 4 A further out in state 1.
pub fn make_data(dir: &Path, frames: &[usize], seed: u64) -> PathBuf {
    make_peptide(dir, &RESIDUES, frames, seed).0
}

/// As [`make_data`] with other residues (the fourth one moves), and the state (0 or 1) of every
/// frame of every trajectory.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn make_peptide(
    dir: &Path,
    residues: &[(&str, &[&str])],
    frames: &[usize],
    seed: u64,
) -> (PathBuf, Vec<Vec<u32>>) {
    let mut rng = Rng::new(seed);
    let atoms: Vec<(usize, &str, &str)> = residues
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
    let mut trajs = Vec::new();
    let mut states = Vec::new();
    for (t, &n) in frames.iter().enumerate() {
        let mut s = 0;
        let mut text = String::new();
        let mut st = Vec::with_capacity(n);
        for m in 0..n {
            if rng.uniform() > 0.95 {
                s = 1 - s;
            }
            st.push(s);
            let pos: Vec<[f64; 3]> = base
                .iter()
                .zip(&atoms)
                .map(|(p, (k, _, _))| {
                    let shift = if *k == 3 && s == 1 { 4.0 } else { 0.0 };
                    [0, 1, 2].map(|c| p[c] + if c == 0 { shift } else { 0.0 } + 0.2 * rng.normal())
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
    store::import(&ImportOptions {
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
    (data, states)
}
