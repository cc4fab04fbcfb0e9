//! Dropout (src/ops/dropout.rs, cuda/dropout.cu): bit-identical masks on every device, the kept
//! fraction, equivariant (per-vector) dropping, seeds, the recomputed backward mask, and the
//! gradient against central differences.

use anyhow::{ensure, Result};
use hiermd::ops::dropout::{
    dropout_backward, dropout_backward_host, dropout_forward, dropout_forward_host,
    dropout_mask_host, DropLayout,
};
use hiermd::testing::{check_gradient, Rng};
use hiermd::{device_test, Device, Tensor};

fn layout(outer: usize, comps: usize, inner: usize) -> DropLayout {
    DropLayout {
        outer,
        comps,
        inner,
    }
}

/// Ragged layouts: one element, scalars, vector features, more elements than one cpu task, and
/// more keys than the capped grid has threads (so the grid-stride loop wraps).
const LAYOUTS: [(usize, usize, usize); 6] = [
    (1, 1, 1),
    (7, 1, 33),
    (37, 3, 17),
    (5, 3, 1000),
    (300, 3, 101),
    (1, 1, 65_535 * 256 + 999),
];

fn layouts(dev: &Device) -> impl Iterator<Item = DropLayout> {
    // The largest layout only tests the kernel's grid-stride loop, and its host reference costs
    // seconds: cuda only.
    let cuda = matches!(dev, Device::Cuda(_));
    LAYOUTS
        .into_iter()
        .map(|(o, c, i)| layout(o, c, i))
        .filter(move |l| cuda || l.len() < 1 << 20)
}

fn run(
    dev: &Device,
    backward: bool,
    x: &[f32],
    p: f32,
    seed: u64,
    l: DropLayout,
) -> Result<Vec<f32>> {
    let xt = Tensor::from_slice(dev, &[x.len()], x)?;
    let mut y = Tensor::zeros(dev, &[x.len()])?;
    y.poison()?;
    if backward {
        dropout_backward(&xt, &mut y, p, seed, l)?;
    } else {
        dropout_forward(&xt, &mut y, p, seed, l)?;
    }
    y.to_vec()
}

/// Exact equality, bit for bit (so +0 and -0 differ, and the NaN of a poisoned output fails).
fn ensure_bits(what: &str, got: &[f32], want: &[f32]) -> Result<()> {
    ensure!(got.len() == want.len(), "{what}: length {}", got.len());
    for (e, (g, w)) in got.iter().zip(want).enumerate() {
        ensure!(
            g.to_bits() == w.to_bits(),
            "{what}: element {e} is {g}, expected {w}"
        );
    }
    Ok(())
}

device_test!(dropout_matches_host_bit_for_bit, |dev| {
    let mut rng = Rng::for_test("dropout_matches_host_bit_for_bit");
    for l in layouts(dev) {
        // The largest layout (17M elements) once: the host reference costs seconds.
        let ps: &[f32] = if l.len() > 1 << 20 {
            &[0.5]
        } else {
            &[0.0, 0.1, 0.5, 0.9]
        };
        for &p in ps {
            let seed = rng.next_u64();
            let x = rng.normal_vec(l.len(), 2.0);
            let what = format!("dropout_forward {l:?} p {p}");
            let y = run(dev, false, &x, p, seed, l)?;
            let mut want = vec![0.0f32; l.len()];
            dropout_forward_host(&x, &mut want, p, seed, l);
            ensure_bits(&what, &y, &want)?;
            // Against the documented mask: kept values are x / (1 - p) exactly, dropped exactly 0.
            let scale = 1.0 / (1.0 - p);
            let mask = dropout_mask_host(p, seed, l);
            for (e, ((&y, &x), &keep)) in y.iter().zip(&x).zip(&mask).enumerate() {
                let want = if keep { x * scale } else { 0.0 };
                ensure!(
                    y.to_bits() == want.to_bits(),
                    "{what}: element {e} is {y}, mask says {want}"
                );
            }
            if p == 0.0 {
                ensure_bits(&format!("{what} (a copy)"), &y, &x)?;
            }

            // The backward recomputes the forward's mask from (p, seed, layout).
            let dy = rng.normal_vec(l.len(), 1.0);
            let dx = run(dev, true, &dy, p, seed, l)?;
            let mut want = vec![0.0f32; l.len()];
            dropout_backward_host(&dy, &mut want, p, seed, l);
            ensure_bits(&format!("dropout_backward {l:?} p {p}"), &dx, &want)?;
            for (e, (&g, &y)) in dx.iter().zip(&y).enumerate() {
                // x is normal, so y == 0 exactly where dropped.
                ensure!(
                    (g == 0.0) == (y == 0.0) || x[e] == 0.0 || dy[e] == 0.0,
                    "dropout_backward {l:?} p {p}: element {e} has dx {g} but y {y}"
                );
            }
        }
    }
    Ok(())
});

device_test!(dropout_keeps_one_minus_p_and_vectors_whole, |dev| {
    let mut rng = Rng::for_test("dropout_keeps_one_minus_p_and_vectors_whole");
    // 1e5 keys of 3 components each.
    let l = layout(400, 3, 250);
    let n_keys = l.keys() as f64;
    let ones = vec![1.0f32; l.len()];
    for p in [0.1f32, 0.5, 0.8] {
        let seed = rng.next_u64();
        let y = run(dev, false, &ones, p, seed, l)?;
        let mut kept = 0usize;
        for o in 0..l.outer {
            for i in 0..l.inner {
                let at = |c: usize| y[(o * l.comps + c) * l.inner + i];
                let keep = at(0) != 0.0;
                for c in 1..l.comps {
                    ensure!(
                        (at(c) != 0.0) == keep,
                        "p {p}: vector (o {o}, i {i}) kept in component 0: {keep} but not in {c}"
                    );
                }
                kept += usize::from(keep);
            }
        }
        // 6 standard deviations of a binomial fraction.
        let frac = kept as f64 / n_keys;
        let q = 1.0 - p as f64;
        let bound = 6.0 * (q * (1.0 - q) / n_keys).sqrt();
        ensure!(
            (frac - q).abs() <= bound,
            "p {p}: kept fraction {frac}, expected {q} +- {bound}"
        );
        // Same seed, same mask; another seed, a different one (each key differs with probability
        // 2 p (1 - p), so about 2e4 of 1e5 at p = 0.1).
        ensure_bits(
            &format!("p {p} rerun"),
            &run(dev, false, &ones, p, seed, l)?,
            &y,
        )?;
        let other = run(dev, false, &ones, p, seed ^ 1, l)?;
        let differ = other
            .iter()
            .zip(&y)
            .filter(|(a, b)| (**a == 0.0) != (**b == 0.0))
            .count()
            / l.comps;
        let expect = 2.0 * p as f64 * (1.0 - p as f64) * n_keys;
        ensure!(
            (differ as f64) > expect / 2.0,
            "p {p}: seeds {seed} and {} differ at {differ} keys, expected about {expect}",
            seed ^ 1
        );
    }
    Ok(())
});

device_test!(dropout_rejects_bad_p_and_shapes, |dev| {
    let x = Tensor::<f32>::zeros(dev, &[12])?;
    let mut y = Tensor::<f32>::zeros(dev, &[12])?;
    let l = layout(2, 3, 2);
    for p in [1.0f32, -0.1, f32::NAN, 2.0] {
        let err = dropout_forward(&x, &mut y, p, 7, l).expect_err("p outside [0, 1)");
        ensure!(
            format!("{err:#}").contains("dropout_forward: dropout probability p")
                && format!("{err:#}").contains("is not in [0, 1)"),
            "{err:#}"
        );
        ensure!(dropout_backward(&x, &mut y, p, 7, l).is_err());
    }
    let err = dropout_forward(&x, &mut y, 0.5, 7, layout(2, 3, 3)).expect_err("18 != 12");
    ensure!(format!("{err:#}").contains("covers 18"), "{err:#}");
    let mut y = Tensor::<f32>::zeros(dev, &[11])?;
    let err = dropout_backward(&x, &mut y, 0.5, 7, l).expect_err("output too small");
    ensure!(
        format!("{err:#}").contains("dropout_backward: output has shape [11]"),
        "{err:#}"
    );
    Ok(())
});

/// The backward against central differences of L(x) = sum w * dropout(x), in f64.
#[test]
fn dropout_gradient_matches_finite_differences() {
    let mut rng = Rng::for_test("dropout_gradient_matches_finite_differences");
    let l = layout(4, 3, 5);
    let (p, seed) = (0.4, rng.next_u64());
    let x: Vec<f64> = (0..l.len()).map(|_| rng.normal()).collect();
    let w: Vec<f64> = (0..l.len()).map(|_| rng.normal()).collect();
    let loss = |x: &[f64]| {
        let mut y = vec![0.0; x.len()];
        dropout_forward_host(x, &mut y, p, seed, l);
        y.iter().zip(&w).map(|(y, w)| y * w).sum::<f64>()
    };
    let mut g = vec![0.0; l.len()];
    dropout_backward_host(&w, &mut g, p, seed, l);
    check_gradient("dropout", loss, &x, &g, 1e-6, 1e-7).unwrap();
    // Another seed's mask is a wrong gradient.
    let mut wrong = vec![0.0; l.len()];
    dropout_backward_host(&w, &mut wrong, p, seed ^ 0xdead, l);
    assert!(check_gradient("dropout (wrong seed)", loss, &x, &wrong, 1e-6, 1e-7).is_err());
}
