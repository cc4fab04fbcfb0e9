//! State assignment that is checked, not assumed (issue 22), and a PNG beside every SVG:
//! - the consistency checks on a crafted degenerate output (the 7,997/3 argmax of issue 22: a
//!   VAMPnet whose softmax outputs separate two states but stay on one side of 0.5) warn with the
//!   numbers, and the state assignment falls back to k-means on the VAMP singular functions,
//!   which recovers the hidden states;
//! - a consistent partition passes; bad input makes the checks fail, never panic;
//! - the singular-value gap chooses the number of states;
//! - every picture of an analysis folder has its PNG (valid signature and size), and
//!   `index.html` shows each.

use hiermd::analysis::checks::{check_states, singular_value_timescale, CheckOptions};
use hiermd::analysis::msm::{implied_timescales_lenient, Msm};
use hiermd::analysis::states::{
    argmax_states, assign_checked_states, assign_vamp_states, fit_vamp, states_from_gap,
    StateOptions,
};
use hiermd::objectives::vamp::VampOptions;
use hiermd::plot::{self, LinePlot, ScatterPlot, Series};
use hiermd::testing::Rng;
use std::path::{Path, PathBuf};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hiermd-checks-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A two-state chain of `n` frames that switches with probability `p` per frame.
fn chain(rng: &mut Rng, n: usize, p: f64) -> Vec<u32> {
    let mut s = 0u32;
    (0..n)
        .map(|_| {
            if rng.uniform() < p {
                s = 1 - s;
            }
            s
        })
        .collect()
}

/// Issue 22's case: 8,000 frames, about 69 transitions; softmax outputs whose p0 averages 0.82
/// in state 0 ("open") and 0.94 in state 1 ("closed"), so that the argmax puts every frame in
/// output 0 except three. Returns the outputs `[frame * 2 + j]` and the hidden states.
fn degenerate_outputs(seed: u64) -> (Vec<f64>, Vec<u32>) {
    let mut rng = Rng::new(seed);
    let truth = chain(&mut rng, 8000, 69.0 / 8000.0);
    let mut out = Vec::with_capacity(16000);
    let mut flipped = 0;
    for (f, &s) in truth.iter().enumerate() {
        let mut p0 = if s == 0 { 0.82 } else { 0.94 } + 0.02 * rng.normal();
        // Three frames of the open state tip over 0.5.
        if s == 0 && flipped < 3 && f % 500 == 250 {
            p0 = 0.45;
            flipped += 1;
        }
        let p0 = p0.clamp(0.0, 0.999) as f32 as f64;
        out.push(p0);
        out.push(1.0 - p0);
    }
    assert_eq!(
        flipped, 3,
        "the chain should be open at three of the probes"
    );
    (out, truth)
}

/// Fraction of frames on which two 2-state labellings agree, up to swapping the labels.
fn agreement(a: &[u32], b: &[u32]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same.max(a.len() - same) as f64 / a.len() as f64
}

#[test]
fn the_7997_to_3_argmax_warns_and_kmeans_on_the_singular_functions_recovers_the_states() {
    let (outputs, truth) = degenerate_outputs(22);
    let transitions = truth.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        (40..110).contains(&transitions),
        "{transitions} transitions"
    );
    let outputs = vec![outputs];
    let lag = 10;

    // The argmax: 7,997 frames and 3.
    let am = argmax_states(&outputs, 2);
    let ones = am[0].iter().filter(|&&s| s == 1).count();
    assert_eq!(ones, 3, "argmax puts {ones} frames in state 1");

    // Its checks fail and say why, with the numbers.
    let model = fit_vamp(&outputs, 2, lag, &VampOptions::default()).unwrap();
    let sigma = model.singular_values()[0];
    let t_sv = singular_value_timescale(sigma, lag);
    assert!(
        t_sv > 20.0,
        "singular-value timescale {t_sv} frames (sigma {sigma})"
    );
    let c = check_states(&am, 2, lag, t_sv, &CheckOptions::default());
    println!("{:#?}", c);
    assert!(!c.passed());
    let warnings = c.warnings();
    let pop = warnings
        .iter()
        .find(|w| w.starts_with("WARNING: state populations:"))
        .unwrap_or_else(|| panic!("no population warning in {warnings:?}"));
    assert!(
        pop.contains("S1 3 (0.04%)") && pop.contains("S0 7997"),
        "{pop}"
    );
    let ts = warnings
        .iter()
        .find(|w| w.starts_with("WARNING: timescales:"))
        .unwrap_or_else(|| panic!("no timescale warning in {warnings:?}"));
    assert!(ts.contains("singular values"), "{ts}");
    assert!(
        c.msm_timescale < t_sv / 2.0,
        "the degenerate MSM's timescale {} should be far below {t_sv}",
        c.msm_timescale
    );
    assert_eq!(c.state_counts, vec![7997, 3]);

    // The assignment rejects the argmax and clusters the kinetic map instead.
    let a = assign_vamp_states(&outputs, 2, lag, &model, &StateOptions::default()).unwrap();
    println!("{:#?}", a.consistency);
    assert_eq!(a.method, "kmeans");
    assert_eq!(a.gap_states, 2);
    assert_eq!(a.n_states, 2);
    assert_eq!(a.rejected.len(), 1);
    assert_eq!(a.rejected[0].method, "argmax");
    assert!(!a.rejected[0].consistency.passed());
    let agree = agreement(&a.states[0], &truth);
    assert!(
        agree > 0.9,
        "k-means states agree with the truth on {agree:.3}"
    );
    // Its populations are sane and its MSM timescale agrees with the singular values.
    let check = |name: &str| {
        a.consistency
            .checks
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .clone()
    };
    assert!(check("state populations").passed, "{:?}", a.consistency);
    assert!(check("timescales").passed, "{:?}", a.consistency);

    // Asked for three states, it gives three.
    let a3 = assign_vamp_states(
        &outputs,
        2,
        lag,
        &model,
        &StateOptions {
            states: Some(3),
            force_kmeans: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((a3.method.as_str(), a3.n_states), ("kmeans", 3));
    assert!(a3.rejected.is_empty());
}

#[test]
fn a_degenerate_spib_decoder_partition_falls_back_to_kmeans_on_z() {
    // SPIB's case: a 2-d latent z that separates the hidden states (its first coordinate), and
    // a decoder whose 6 states put all frames but 3 in one. The decoder's states are rejected
    // and k-means on the kinetic map of z recovers the hidden states.
    let mut rng = Rng::new(23);
    let truth = chain(&mut rng, 8000, 69.0 / 8000.0);
    let z: Vec<f64> = truth
        .iter()
        .flat_map(|&s| {
            let c = if s == 0 { -1.0 } else { 1.0 };
            [c + 0.4 * rng.normal(), 0.5 * rng.normal()]
        })
        .collect();
    let mut decoder: Vec<u32> = vec![4; truth.len()];
    for f in [100, 4000, 7000] {
        decoder[f] = 1;
    }
    let z = vec![z];
    let lag = 10;
    let model = fit_vamp(&z, 2, lag, &VampOptions::default()).unwrap();
    let a = assign_checked_states(
        Some((vec![decoder], 6)),
        &z,
        2,
        lag,
        &model,
        &StateOptions::default(),
    )
    .unwrap();
    assert_eq!(a.method, "kmeans");
    assert_eq!(a.rejected.len(), 1);
    assert!(!a.rejected[0].consistency.passed());
    assert_eq!(a.n_states, 2, "the singular-value gap: one slow process");
    let agree = agreement(&a.states[0], &truth);
    assert!(
        agree > 0.9,
        "k-means on z agrees with the truth on {agree:.3}"
    );
    assert!(a.consistency.passed(), "{:?}", a.consistency);
}

#[test]
fn a_consistent_partition_passes_every_check() {
    let mut rng = Rng::new(5);
    let p = 0.01;
    let truth: Vec<Vec<u32>> = (0..2).map(|_| chain(&mut rng, 6000, p)).collect();
    let lag = 5;
    // The chain's own relaxation: eigenvalue 1 - 2p per frame.
    let t_true = -1.0 / (1.0 - 2.0 * p).ln();
    let c = check_states(&truth, 2, lag, t_true, &CheckOptions::default());
    println!("{c:#?}");
    assert!(c.passed(), "{:?}", c.warnings());
    assert!(c.warnings().is_empty());
    assert!(
        (c.msm_timescale / t_true - 1.0).abs() < 0.25,
        "{} vs {t_true}",
        c.msm_timescale
    );
    assert!(c.ck_max_deviation < 0.1);
    // A singular-value timescale 3x longer fails the timescale check (factor 2).
    let c = check_states(&truth, 2, lag, 3.0 * t_true, &CheckOptions::default());
    assert!(!c.passed());
    let w = c.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("WARNING: timescales:") && w[0].contains("factor"));
    // The argmax of outputs that put the hidden state on the right side of 0.5 is kept.
    let outputs: Vec<Vec<f64>> = truth
        .iter()
        .map(|t| {
            t.iter()
                .flat_map(|&s| {
                    let p0 = if s == 0 { 0.8 } else { 0.2 } + 0.05 * rng.normal();
                    [p0, 1.0 - p0]
                })
                .collect()
        })
        .collect();
    let model = fit_vamp(&outputs, 2, lag, &VampOptions::default()).unwrap();
    let a = assign_vamp_states(&outputs, 2, lag, &model, &StateOptions::default()).unwrap();
    assert_eq!(a.method, "argmax", "{:?}", a.rejected);
    assert!(a.consistency.passed(), "{:?}", a.consistency.warnings());
}

#[test]
fn the_checks_fail_on_bad_input_and_never_panic() {
    let opts = CheckOptions::default();
    let cases: Vec<(Vec<Vec<u32>>, usize, usize)> = vec![
        (vec![], 2, 1),                       // no trajectories
        (vec![vec![]], 2, 1),                 // no frames
        (vec![vec![0, 1, 5]], 2, 1),          // state out of range
        (vec![vec![0, 1, 0, 1]], 2, 0),       // lag 0
        (vec![vec![0, 1, 0, 1]], 2, 10),      // lag past the trajectory
        (vec![vec![0; 100]], 2, 1),           // one state
        (vec![vec![0, 0, 0, 1, 1, 1]], 2, 2), // no way back
        (vec![vec![0, 1, 0, 1]], 0, 1),       // no states
    ];
    for (dtrajs, n, lag) in cases {
        for t_sv in [f64::NAN, 5.0, f64::INFINITY] {
            let c = check_states(&dtrajs, n, lag, t_sv, &opts);
            assert!(!c.passed(), "{dtrajs:?} n {n} lag {lag}: {c:?}");
            assert!(!c.warnings().is_empty());
            assert!(c.warnings().iter().all(|w| w.starts_with("WARNING: ")));
        }
        // The lenient implied timescales give NaN instead of an error.
        let its = implied_timescales_lenient(&dtrajs, &[1, 2, 50], n.max(1), 1);
        assert_eq!(its.timescales.len(), 3);
    }
    // try_mfpt_matrix on a well-formed model agrees with the panicking one.
    let dtrajs = vec![vec![0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 1]];
    let m = Msm::estimate(&dtrajs, 1, 2, true).unwrap();
    assert_eq!(m.try_mfpt_matrix().unwrap(), m.mfpt_matrix());
}

#[test]
fn the_singular_value_gap_chooses_the_number_of_states() {
    assert_eq!(states_from_gap(&[], 10), 2);
    assert_eq!(states_from_gap(&[0.95, 0.2, 0.1], 10), 2);
    assert_eq!(states_from_gap(&[0.95, 0.9, 0.1], 10), 3);
    assert_eq!(states_from_gap(&[0.95, 0.9, 0.85, 0.1], 10), 4);
    assert_eq!(states_from_gap(&[0.95, 0.9, 0.85, 0.1], 3), 3);
    // Only a slow process above a fast rest: the drop to zero counts.
    assert_eq!(states_from_gap(&[0.3], 10), 2);
    assert_eq!(states_from_gap(&[f64::NAN, 0.5], 10), 3);
}

/// Checks a PNG's signature and its IHDR size; returns (width, height).
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.len() > 33, "PNG of {} bytes", bytes.len());
    assert_eq!(bytes[..8], plot::PNG_SIGNATURE, "bad PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

/// The width and height attributes of an SVG file.
fn svg_size(svg: &str) -> (f64, f64) {
    let root = &svg[svg.find("<svg").unwrap()..];
    let attr = |n: &str| -> f64 {
        let k = root.find(&format!(" {n}=\"")).unwrap() + n.len() + 3;
        root[k..k + root[k..].find('"').unwrap()].parse().unwrap()
    };
    (attr("width"), attr("height"))
}

#[test]
fn every_svg_gets_a_png_with_the_picture() {
    let dir = tmpdir("png");
    let x: Vec<f64> = (0..50).map(|i| i as f64).collect();
    let y: Vec<f64> = x.iter().map(|v| (v / 5.0).sin()).collect();
    let svg_path = dir.join("line.svg");
    LinePlot::new()
        .title("A sine")
        .x_label("x")
        .y_label("sin(x / 5)")
        .series(Series::new("sin", &x, &y).color([200, 0, 0]))
        .series(Series::new("dashed", &x, &x).dashed())
        .hline(0.5, "half")
        .save_svg(&svg_path)
        .unwrap();
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let bytes = std::fs::read(dir.join("line.png")).unwrap();
    let (w, h) = png_size(&bytes);
    let (sw, sh) = svg_size(&svg);
    assert_eq!(
        (w as f64, h as f64),
        ((sw * plot::PNG_SCALE).ceil(), (sh * plot::PNG_SCALE).ceil())
    );
    let (dw, dh, rgb) = plot::decode_png(&bytes).unwrap();
    assert_eq!((dw as u32, dh as u32), (w, h));
    let px = |x: usize, y: usize| -> [u8; 3] {
        let i = 3 * (y * dw + x);
        [rgb[i], rgb[i + 1], rgb[i + 2]]
    };
    // The red series is drawn, and the title's text is dark pixels in the top band.
    let red = rgb
        .chunks_exact(3)
        .filter(|p| p[0] > 150 && p[1] < 80 && p[2] < 80)
        .count();
    assert!(red > 200, "{red} red pixels");
    let title_dark = (0..(40.0 * plot::PNG_SCALE) as usize)
        .flat_map(|y| (0..dw).map(move |x| (x, y)))
        .filter(|&(x, y)| px(x, y).iter().all(|&c| c < 100))
        .count();
    assert!(
        title_dark > 50,
        "{title_dark} dark pixels in the title band"
    );
    // The background is white.
    assert_eq!(px(1, 1), [255, 255, 255]);

    // A scatter plot with a colour bar (gradient) and a density image (embedded PNG).
    let n = 30_000;
    let xs: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
    let ys: Vec<f64> = (0..n).map(|i| (i as f64 * 0.11).cos()).collect();
    ScatterPlot::new(&xs, &ys)
        .title("density")
        .values(&xs, "x")
        .save_svg(dir.join("scatter.svg"))
        .unwrap();
    let (sw2, _) = svg_size(&std::fs::read_to_string(dir.join("scatter.svg")).unwrap());
    let b2 = std::fs::read(dir.join("scatter.png")).unwrap();
    assert_eq!(png_size(&b2).0 as f64, (sw2 * plot::PNG_SCALE).ceil());
    let (_, _, rgb2) = plot::decode_png(&b2).unwrap();
    let colourful = rgb2
        .chunks_exact(3)
        .filter(|p| p.iter().max().unwrap() - p.iter().min().unwrap() > 60)
        .count();
    assert!(colourful > 10_000, "{colourful} coloured pixels");
    // The SVG-to-PNG conversion refuses what is not an SVG.
    assert!(plot::svg_to_png("<html></html>").is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small two-state dataset: import of PDB frames, and features that carry the state.
fn make_data(dir: &Path) -> (PathBuf, PathBuf) {
    use hiermd::store::{self, FeatureDtype, FeatureSettings, FeatureWriter, ImportOptions};
    const H: usize = 8;
    let mut rng = Rng::new(9);
    let atoms: Vec<(usize, &str, &str)> = [("ALA", 0usize), ("GLY", 1), ("ALA", 2)]
        .iter()
        .flat_map(|&(res, k)| ["N", "CA", "C", "O"].map(|n| (k, res, n)))
        .collect();
    let pdb = |shift: f64, rng: &mut Rng| -> String {
        let mut out = String::new();
        for (serial, (k, res, name)) in atoms.iter().enumerate() {
            let s = if *k == 2 { shift } else { 0.0 };
            out.push_str(&format!(
                "ATOM  {:>5} {:<4} {res:<3} A{:>4}    {:8.3}{:8.3}{:8.3}  1.00  0.00          {:>2}\n",
                serial + 1,
                format!(" {name}"),
                k + 1,
                1.5 * serial as f64 + s + 0.1 * rng.normal(),
                (serial as f64).sin() + 0.1 * rng.normal(),
                (serial as f64 * 0.7).cos() + 0.1 * rng.normal(),
                &name[..1],
            ));
        }
        out
    };
    let top = dir.join("top.pdb");
    std::fs::write(&top, pdb(0.0, &mut rng) + "END\n").unwrap();
    let states = chain(&mut rng, 600, 0.03);
    let mut text = String::new();
    for (m, &s) in states.iter().enumerate() {
        text.push_str(&format!("MODEL     {:>4}\n", m + 1));
        text.push_str(&pdb(3.0 * s as f64, &mut rng));
        text.push_str("ENDMDL\n");
    }
    let traj = dir.join("traj.pdb");
    std::fs::write(&traj, text + "END\n").unwrap();
    let data = dir.join("data");
    let (ds, _) = store::import(&ImportOptions {
        topology: top,
        trajectories: vec![traj],
        out: data.clone(),
        selection: "heavy".into(),
        token_map: None,
        time_step_ps: Some(1.0),
        max_frames: None,
        force: false,
        progress: false,
    })
    .unwrap();
    let features = dir.join("features");
    let settings = FeatureSettings {
        channels: H,
        dtype: FeatureDtype::F32,
        ca_positions: true,
        ..Default::default()
    };
    let r = ds.manifest.tokens;
    let mut w = FeatureWriter::create(&ds, &features, &settings).unwrap();
    let n = states.len();
    let mut s = rng.normal_vec(n * r * H, 0.3);
    for (f, &x) in states.iter().enumerate() {
        for tok in 0..r {
            for c in 0..3 {
                s[(f * r + tok) * H + c] += x as f32;
            }
        }
    }
    let v = rng.normal_vec(n * r * 3 * H, 0.3);
    let ca: Vec<f32> = (0..n * r * 3).map(|i| (i % (r * 3)) as f32 * 1.3).collect();
    w.append_frames(0, &s, &v, Some(&ca)).unwrap();
    w.finish().unwrap();
    (data, features)
}

#[test]
fn an_analysis_folder_has_a_png_for_every_svg_and_an_index_showing_them() {
    use hiermd::workflow::analyze::{analyze, AnalyzeOptions};
    use hiermd::workflow::config::RunConfig;
    use hiermd::workflow::train::{train, TrainOptions};
    let dir = tmpdir("folder");
    let (data, features) = make_data(&dir);
    let cfg = RunConfig::from_toml_with(
        &format!(
            r#"
[data]
dataset = {data:?}
features = {features:?}
lag = 3

[model]
hidden = 8
heads = 1
blocks = 1

[objective]
kind = "vamp"
outputs = 2

[optimizer]
lr = 3e-3

[train]
epochs = 2
batch = 128
patience = 0
seed = 1
"#,
            data = data.display().to_string(),
            features = features.display().to_string(),
        ),
        &[],
    )
    .unwrap();
    let run = dir.join("run");
    let dev = hiermd::Device::Cpu;
    train(&cfg, &run, &dev, &TrainOptions::default()).unwrap();
    let s = analyze(
        &run,
        &dev,
        &AnalyzeOptions {
            lags: vec![1, 3, 6],
            attention_frames: 4,
            ..Default::default()
        },
    )
    .unwrap();
    // Both timescales in the headline, the checks and any warnings in analysis.json.
    assert!(s.headline.contains("MSM") && s.headline.contains("singular values"));
    assert_eq!(s.state_checks.checks.len(), 3);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("analysis/analysis.json")).unwrap())
            .unwrap();
    assert!(json["warnings"].is_array());
    assert!(json["state_checks"]["checks"].is_array());
    assert!(json["singular_value_timescale"].is_number());

    let folder = run.join("analysis");
    let index = std::fs::read_to_string(folder.join("index.html")).unwrap();
    let mut svgs = Vec::new();
    let mut stack = vec![folder.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "svg") {
                svgs.push(p);
            }
        }
    }
    assert!(svgs.len() >= 9, "{} SVGs", svgs.len());
    for svg in &svgs {
        let png = svg.with_extension("png");
        let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
        let (w, h) = png_size(&bytes);
        let (sw, sh) = svg_size(&std::fs::read_to_string(svg).unwrap());
        assert_eq!(
            (w as f64, h as f64),
            ((sw * plot::PNG_SCALE).ceil(), (sh * plot::PNG_SCALE).ceil()),
            "{}",
            png.display()
        );
        let rel = svg
            .strip_prefix(&folder)
            .unwrap()
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        let rel_png = rel.replace(".svg", ".png");
        assert!(
            index.contains(&format!("src=\"{rel_png}\"")),
            "index.html does not show {rel_png}"
        );
        assert!(
            index.contains(&format!("href=\"{rel}\"")),
            "no link to {rel}"
        );
    }
    assert!(index.contains("<figcaption>"));
    let _ = std::fs::remove_dir_all(&dir);
}
