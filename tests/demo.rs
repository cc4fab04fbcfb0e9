//! `hiermd demo` end to end on the bundled alanine-dipeptide data (issue 7's acceptance): the
//! VAMPnet (4 outputs) finds the phi transition, its slowest implied timescale within 20% of a
//! reversible MSM on a 12 x 12 (phi, psi) grid of the same frames; that reference equals the
//! recipe's own independent Python analysis (datasets/alanine/demo/analysis.json); and every
//! picture is written.

use hiermd::store::Dataset;
use hiermd::workflow::demo::{dihedral_msm_timescales, run_demo, DemoArgs};
use hiermd::Device;
use std::path::PathBuf;

#[test]
fn demo_vampnet_matches_the_dihedral_msm_and_writes_its_plots() {
    let out = std::env::temp_dir().join(format!("hiermd-demo-{}", std::process::id()));
    let s = run_demo(
        &DemoArgs {
            out: out.clone(),
            data: None,
            quick: false,
            frames: None,
        },
        &Device::Cpu,
    )
    .unwrap();
    println!("{}", serde_json::to_string_pretty(&s).unwrap());

    // The reference MSM is the recipe's: numpy's analysis of the XTC files got 165.22 ps at lag
    // 20 ps on the same 12 x 12 grid (reversible MLE on the largest connected set).
    let recipe: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("datasets/alanine/demo/analysis.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let want = recipe["msm"]["grid_its_ps"]["20"]["its"][0]
        .as_f64()
        .unwrap();
    let got = s.reference_timescales_ps[0];
    assert!(
        ((got - want) / want).abs() < 1e-4,
        "dihedral MSM: {got} ps, the recipe's analysis {want} ps"
    );
    // Another lag too, straight from the library call.
    let ds = Dataset::open(&out.join("data")).unwrap();
    let t50 = dihedral_msm_timescales(&ds, 50, 12).unwrap()[0];
    let want50 = recipe["msm"]["grid_its_ps"]["50"]["its"][0]
        .as_f64()
        .unwrap();
    assert!(
        ((t50 - want50) / want50).abs() < 1e-4,
        "lag 50: {t50} vs {want50}"
    );

    // The VAMPnet's slowest timescale (MSM on its states) within 20% of the reference.
    assert!(
        (0.8..1.2).contains(&s.vamp_over_reference),
        "VAMPnet slowest implied timescale {:?} ps vs the dihedral MSM's {} ps",
        s.vamp_timescales_ps,
        got
    );
    assert!(
        s.vamp_validation_vamp2 > 1.5,
        "validation VAMP-2 {} (a model that misses the phi transition scores ~1)",
        s.vamp_validation_vamp2
    );
    assert!(s.spib_states >= 2, "SPIB kept {} states", s.spib_states);
    for run in ["vamp", "spib"] {
        for f in [
            "vamp2_vs_lag.svg",
            "implied_timescales.svg",
            "singular_values.svg",
            "msm_transition_matrix.svg",
            "ck_test.svg",
            "state_populations.svg",
            "state_map.svg",
            "ramachandran_states.svg",
            "analysis.json",
            "attention/attention_block0_mean.svg",
        ] {
            let p = out.join(run).join("analysis").join(f);
            assert!(p.exists(), "{} missing", p.display());
        }
    }
    assert!(out.join("demo.json").exists());
    let _ = std::fs::remove_dir_all(&out);
}
