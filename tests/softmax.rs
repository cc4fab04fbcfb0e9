//! Softmax and log-softmax (src/ops/softmax.rs, cuda/softmax.cu) on every device against the f64
//! reference, masked rows, and the backward passes against central differences.

use anyhow::{ensure, Result};
use hiermd::ops::softmax::{
    log_softmax_backward, log_softmax_backward_host, log_softmax_forward, log_softmax_forward_host,
    softmax_backward, softmax_backward_host, softmax_forward, softmax_forward_host,
};
use hiermd::testing::{assert_close, check_gradient, Rng};
use hiermd::{device_test, Device, Tensor};

/// (rows, cols): one column, ragged widths, a row wider than a block, a long row, and more rows
/// than the capped grid (so the row loop wraps).
const SHAPES: [(usize, usize); 7] = [
    (1, 1),
    (3, 31),
    (17, 256),
    (5, 1000),
    (300, 77),
    (4, 20_000),
    (65_537, 2),
];

/// The shapes a device runs: on emu, where each block costs tens of microseconds, not the one with
/// more rows than the grid (about 15 s there); cpu and cuda cover it.
fn shapes(dev: &Device) -> impl Iterator<Item = (usize, usize)> {
    let emu = matches!(dev, Device::Emu(_));
    SHAPES
        .into_iter()
        .filter(move |&(rows, _)| !emu || rows <= 65_535)
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn run_forward(
    dev: &Device,
    x: &[f32],
    shape: &[usize],
    scale: f32,
    mask: Option<(&[u8], &[usize])>,
    rows_per_mask: usize,
) -> Result<Vec<f32>> {
    let xt = Tensor::from_slice(dev, shape, x)?;
    let mt = match mask {
        Some((m, ms)) => Some(Tensor::from_slice(dev, ms, m)?),
        None => None,
    };
    let mut y = Tensor::zeros(dev, shape)?;
    y.poison()?;
    softmax_forward(&xt, &mut y, scale, mt.as_ref(), rows_per_mask)?;
    y.to_vec()
}

fn run_backward(
    dev: &Device,
    op: impl Fn(&Tensor<f32>, &Tensor<f32>, &mut Tensor<f32>) -> Result<()>,
    y: &[f32],
    dy: &[f32],
    shape: &[usize],
) -> Result<Vec<f32>> {
    let yt = Tensor::from_slice(dev, shape, y)?;
    let dyt = Tensor::from_slice(dev, shape, dy)?;
    let mut dx = Tensor::zeros(dev, shape)?;
    dx.poison()?;
    op(&yt, &dyt, &mut dx)?;
    dx.to_vec()
}

/// Per-shape absolute tolerance of a row sum in f32: a few ulps of the largest row's sum of
/// magnitudes.
fn sum_atol(v: &[f64], cols: usize) -> f64 {
    let worst = v
        .chunks(cols)
        .map(|r| r.iter().map(|v| v.abs()).sum::<f64>())
        .fold(0.0, f64::max);
    16.0 * f32::EPSILON as f64 * worst
}

device_test!(softmax_forward_and_backward_match_reference, |dev| {
    let mut rng = Rng::for_test("softmax_forward_and_backward_match_reference");
    for (rows, cols) in shapes(dev) {
        for scale in [1.0f32, 0.37] {
            let x = rng.normal_vec(rows * cols, 3.0);
            let mut want = vec![0.0; rows * cols];
            softmax_forward_host(&to64(&x), &mut want, cols, scale as f64, None, 1);
            let y = run_forward(dev, &x, &[rows, cols], scale, None, 1)?;
            assert_close(
                &format!("softmax_forward {rows}x{cols} scale {scale}"),
                &y,
                &want,
                1e-7,
                2e-5,
            )?;

            // The backward from the device's own forward output.
            let dy = rng.normal_vec(rows * cols, 1.0);
            let mut want = vec![0.0; rows * cols];
            softmax_backward_host(&to64(&y), &to64(&dy), &mut want, cols, scale as f64);
            let got = run_backward(
                dev,
                |y, dy, dx| softmax_backward(y, dy, dx, scale),
                &y,
                &dy,
                &[rows, cols],
            )?;
            assert_close(
                &format!("softmax_backward {rows}x{cols} scale {scale}"),
                &got,
                &want,
                2e-6,
                2e-5,
            )?;
        }
    }
    Ok(())
});

device_test!(softmax_key_mask_zeroes_keys_and_empty_rows, |dev| {
    let mut rng = Rng::for_test("softmax_key_mask_zeroes_keys_and_empty_rows");
    // Attention scores [batch, heads, queries, keys] with a per-frame key mask [batch, keys].
    for (batch, heads, queries, keys) in [(3, 2, 5, 7), (4, 3, 2, 300), (2, 1, 1, 1)] {
        let rows = batch * heads * queries;
        let rows_per_mask = heads * queries;
        let x = rng.normal_vec(rows * keys, 2.0);
        // Frame 1 fully masked; the others keep each key with probability 0.7.
        let mask: Vec<u8> = (0..batch * keys)
            .map(|i| u8::from(i / keys != 1 && rng.uniform() < 0.7))
            .collect();
        let scale = 0.5f32;
        let shape = [batch, heads, queries, keys];
        let y = run_forward(
            dev,
            &x,
            &shape,
            scale,
            Some((&mask, &[batch, keys])),
            rows_per_mask,
        )?;
        let mut want = vec![0.0; rows * keys];
        softmax_forward_host(
            &to64(&x),
            &mut want,
            keys,
            scale as f64,
            Some(&mask),
            rows_per_mask,
        );
        let what = format!("masked softmax {shape:?}");
        assert_close(&what, &y, &want, 1e-7, 2e-5)?;
        for (e, &v) in y.iter().enumerate() {
            let (r, c) = (e / keys, e % keys);
            if mask[(r / rows_per_mask) * keys + c] == 0 {
                ensure!(v == 0.0, "{what}: masked element {e} is {v}, not 0");
            }
        }
        for (r, row) in y.chunks(keys).enumerate() {
            let s: f64 = row.iter().map(|&v| v as f64).sum();
            let any = mask[(r / rows_per_mask) * keys..][..keys]
                .iter()
                .any(|&m| m != 0);
            let expect = if any { 1.0 } else { 0.0 };
            ensure!(
                (s - expect).abs() < 1e-5,
                "{what}: row {r} sums to {s}, expected {expect}"
            );
        }

        let dy = rng.normal_vec(rows * keys, 1.0);
        let mut want = vec![0.0; rows * keys];
        softmax_backward_host(&to64(&y), &to64(&dy), &mut want, keys, scale as f64);
        let dx = run_backward(
            dev,
            |y, dy, dx| softmax_backward(y, dy, dx, scale),
            &y,
            &dy,
            &shape,
        )?;
        assert_close(&format!("{what} backward"), &dx, &want, 2e-6, 2e-5)?;
        for (e, (&g, &v)) in dx.iter().zip(&y).enumerate() {
            ensure!(
                v != 0.0 || g == 0.0,
                "{what}: masked element {e} has gradient {g}"
            );
        }
    }
    Ok(())
});

device_test!(log_softmax_forward_and_backward_match_reference, |dev| {
    let mut rng = Rng::for_test("log_softmax_forward_and_backward_match_reference");
    for (rows, cols) in shapes(dev) {
        let x = rng.normal_vec(rows * cols, 3.0);
        let mut want = vec![0.0; rows * cols];
        log_softmax_forward_host(&to64(&x), &mut want, cols);
        let xt = Tensor::from_slice(dev, &[rows, cols], &x)?;
        let mut yt = Tensor::zeros(dev, &[rows, cols])?;
        yt.poison()?;
        log_softmax_forward(&xt, &mut yt)?;
        let y = yt.to_vec()?;
        // Values are O(10): a few ulps of the largest |x - m| and of ln(cols).
        assert_close(
            &format!("log_softmax_forward {rows}x{cols}"),
            &y,
            &want,
            1e-5,
            2e-6,
        )?;

        let dy = rng.normal_vec(rows * cols, 1.0);
        let dy64 = to64(&dy);
        let mut want = vec![0.0; rows * cols];
        log_softmax_backward_host(&to64(&y), &dy64, &mut want, cols);
        let got = run_backward(dev, log_softmax_backward, &y, &dy, &[rows, cols])?;
        assert_close(
            &format!("log_softmax_backward {rows}x{cols}"),
            &got,
            &want,
            sum_atol(&dy64, cols).max(1e-6),
            2e-5,
        )?;
    }
    Ok(())
});

device_test!(softmax_rejects_bad_shapes, |dev| {
    let x = Tensor::<f32>::zeros(dev, &[6, 5])?;
    let mut y = Tensor::<f32>::zeros(dev, &[6, 4])?;
    let err = softmax_forward(&x, &mut y, 1.0, None, 1).expect_err("y too small");
    ensure!(
        format!("{err:#}").contains("softmax_forward: y has shape [6, 4]"),
        "{err:#}"
    );
    let mut y = Tensor::<f32>::zeros(dev, &[6, 5])?;
    let mask = Tensor::<u8>::zeros(dev, &[3, 5])?;
    let err = softmax_forward(&x, &mut y, 1.0, Some(&mask), 4).expect_err("6 rows, 4 per mask");
    ensure!(
        format!("{err:#}").contains("not a whole number of mask rows"),
        "{err:#}"
    );
    let err = softmax_forward(&x, &mut y, 1.0, Some(&mask), 3).expect_err("mask [2, 5] expected");
    ensure!(
        format!("{err:#}").contains("softmax_forward: key_mask has shape [3, 5]"),
        "{err:#}"
    );
    let dy = Tensor::<f32>::zeros(dev, &[5, 6])?;
    let mut dx = Tensor::<f32>::zeros(dev, &[6, 5])?;
    // Same length, different rows: only the lengths are checked, so this is accepted.
    softmax_backward(&y, &dy, &mut dx, 1.0)?;
    let dy = Tensor::<f32>::zeros(dev, &[7])?;
    let err = log_softmax_backward(&y, &dy, &mut dx).expect_err("dy too small");
    ensure!(
        format!("{err:#}").contains("log_softmax_backward: dy has shape [7]"),
        "{err:#}"
    );
    Ok(())
});

/// The backward formulas against central differences of L(x) = sum w * f(x), in f64, with a mask
/// that leaves one row empty and a scale != 1.
#[test]
fn softmax_gradients_match_finite_differences() {
    let mut rng = Rng::for_test("softmax_gradients_match_finite_differences");
    let (rows, cols, rows_per_mask) = (6, 9, 2);
    let x: Vec<f64> = (0..rows * cols).map(|_| rng.normal() * 2.0).collect();
    let w: Vec<f64> = (0..rows * cols).map(|_| rng.normal()).collect();
    let mut mask: Vec<u8> = (0..rows / rows_per_mask * cols)
        .map(|_| u8::from(rng.uniform() < 0.6))
        .collect();
    mask[cols..2 * cols].fill(0);
    mask[0] = 1;
    let dot = |y: &[f64]| y.iter().zip(&w).map(|(y, w)| y * w).sum::<f64>();

    for (scale, m) in [(1.0, None), (0.7, Some(&mask[..])), (-1.3, Some(&mask[..]))] {
        let loss = |x: &[f64]| {
            let mut y = vec![0.0; x.len()];
            softmax_forward_host(x, &mut y, cols, scale, m, rows_per_mask);
            dot(&y)
        };
        let mut y = vec![0.0; x.len()];
        softmax_forward_host(&x, &mut y, cols, scale, m, rows_per_mask);
        let mut g = vec![0.0; x.len()];
        softmax_backward_host(&y, &w, &mut g, cols, scale);
        let what = format!("softmax scale {scale} masked {}", m.is_some());
        check_gradient(&what, loss, &x, &g, 1e-6, 1e-7).unwrap();
        // A wrong gradient must fail (guards the checker).
        let wrong: Vec<f64> = g.iter().map(|g| g * 1.01).collect();
        assert!(check_gradient(&what, loss, &x, &wrong, 1e-6, 1e-7).is_err());
    }

    let loss = |x: &[f64]| {
        let mut y = vec![0.0; x.len()];
        log_softmax_forward_host(x, &mut y, cols);
        dot(&y)
    };
    let mut y = vec![0.0; x.len()];
    log_softmax_forward_host(&x, &mut y, cols);
    let mut g = vec![0.0; x.len()];
    log_softmax_backward_host(&y, &w, &mut g, cols);
    check_gradient("log_softmax", loss, &x, &g, 1e-6, 1e-7).unwrap();
}
