//! The committed demo dataset (datasets/alanine/demo: alanine dipeptide, 4 x 7 ns at 450 K, made
//! by datasets/alanine/simulate) imports whole, and the phi transitions counted from the stored
//! coordinates equal what the recipe's own Python analysis counted from the XTC files
//! (analysis.json): an end-to-end check of our XTC decoder and store against an independent one.

use hiermd::store::{self, ImportOptions};
use std::path::PathBuf;

fn dihedral(p: [[f64; 3]; 4]) -> f64 {
    let sub = |a: [f64; 3], b: [f64; 3]| [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
    let cross = |a: [f64; 3], b: [f64; 3]| {
        [
            a[1] * b[2] - a[2] * b[1],
            a[2] * b[0] - a[0] * b[2],
            a[0] * b[1] - a[1] * b[0],
        ]
    };
    let dot = |a: [f64; 3], b: [f64; 3]| a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
    let (b0, b1, b2) = (sub(p[0], p[1]), sub(p[2], p[1]), sub(p[3], p[2]));
    let n = dot(b1, b1).sqrt();
    let b1n = [b1[0] / n, b1[1] / n, b1[2] / n];
    let v = sub(b0, b1n.map(|x| x * dot(b0, b1n)));
    let w = sub(b2, b1n.map(|x| x * dot(b2, b1n)));
    dot(cross(b1n, v), w).atan2(dot(v, w)).to_degrees()
}

#[test]
fn alanine_demo_imports_and_its_phi_transitions_match_the_recipe() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/alanine/demo");
    let trajs: Vec<PathBuf> = (0..4)
        .map(|r| root.join(format!("ala2-r{r:02}.xtc")))
        .collect();
    let out = std::env::temp_dir().join(format!("hiermd-ala2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let (ds, _) = store::import(&ImportOptions {
        topology: root.join("ala2.pdb"),
        trajectories: trajs,
        out: out.clone(),
        selection: "heavy".into(),
        token_map: None,
        time_step_ps: None,
        max_frames: None,
        force: false,
        progress: false,
    })
    .unwrap();
    let truth: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("analysis.json")).unwrap())
            .unwrap();
    assert_eq!(ds.natoms(), 10);
    assert_eq!(ds.manifest.residues, 3);
    assert_eq!(
        ds.manifest.total_frames as u64,
        truth["total_frames"].as_u64().unwrap()
    );
    assert_eq!(ds.manifest.time_step_ps, truth["dt_ps"].as_f64());

    // phi = C(ACE)-N-CA-C(ALA).
    let find = |res: &str, name: &str| {
        ds.atoms
            .iter()
            .position(|a| a.resname == res && a.name == name)
            .unwrap()
    };
    let idx = [
        find("ACE", "C"),
        find("ALA", "N"),
        find("ALA", "CA"),
        find("ALA", "C"),
    ];
    // Core-to-core milestoning as in datasets/alanine/analyze.py: phi>0 core 0 < phi < 120,
    // phi<0 core phi < -30 or phi > 150; a transition is entering the other core.
    let (mut into, mut out_of) = (0u64, 0u64);
    for t in &ds.trajectories {
        let mut state: Option<bool> = None;
        for f in 0..t.frames() {
            let c = t.frame(f);
            let phi =
                dihedral(idx.map(|i| [c[3 * i] as f64, c[3 * i + 1] as f64, c[3 * i + 2] as f64]));
            let core = if phi > 0.0 && phi < 120.0 {
                Some(true)
            } else if !(-30.0..=150.0).contains(&phi) {
                Some(false)
            } else {
                None
            };
            if let Some(pos) = core {
                match (state, pos) {
                    (Some(false), true) => into += 1,
                    (Some(true), false) => out_of += 1,
                    _ => {}
                }
                state = Some(pos);
            }
        }
    }
    assert_eq!(
        into,
        truth["transitions_into_phi_pos"].as_u64().unwrap(),
        "transitions into phi>0"
    );
    assert_eq!(
        out_of,
        truth["transitions_out_of_phi_pos"].as_u64().unwrap(),
        "transitions out of phi>0"
    );
    let _ = std::fs::remove_dir_all(out);
}
