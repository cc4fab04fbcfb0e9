//! Row reductions (src/ops/reduce.rs, cuda/reduce.cu) on every device against the f64 reference,
//! and the backward against central differences.

use hiermd::ops::reduce::{
    row_sum_backward, row_sum_backward_host, row_sum_forward, row_sum_forward_host, RowReduce,
};
use hiermd::testing::{assert_close, check_gradient, Rng};
use hiermd::{device_test, Tensor};

/// (rows, cols): one column, ragged widths, a row wider than a block, many rows.
const SHAPES: [(usize, usize); 6] = [
    (1, 1),
    (3, 31),
    (17, 256),
    (5, 1000),
    (300, 77),
    (2, 100_003),
];

device_test!(row_sum_forward_matches_reference, |dev| {
    let mut rng = Rng::for_test("row_sum_forward_matches_reference");
    for (rows, cols) in SHAPES {
        for kind in [RowReduce::Sum, RowReduce::Mean] {
            let x = rng.normal_vec(rows * cols, 1.0);
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let mut want = vec![0.0; rows];
            row_sum_forward_host(&x64, &mut want, cols, kind);
            let xt = Tensor::from_slice(dev, &[rows, cols], &x)?;
            let mut y = Tensor::zeros(dev, &[rows])?;
            y.poison()?;
            row_sum_forward(&xt, &mut y, cols, kind)?;
            // f32 summation: error bounded by a small multiple of u * sum|x| (scaled for the mean).
            let scale = if kind == RowReduce::Mean {
                1.0 / cols as f64
            } else {
                1.0
            };
            let worst = x64
                .chunks(cols)
                .map(|r| r.iter().map(|v| v.abs()).sum::<f64>())
                .fold(0.0, f64::max);
            let atol = 16.0 * f32::EPSILON as f64 * worst * scale;
            assert_close(
                &format!("row_sum_forward {rows}x{cols} {kind:?}"),
                &y.to_vec()?,
                &want,
                atol,
                1e-6,
            )?;
        }
    }
    Ok(())
});

device_test!(row_sum_backward_matches_reference, |dev| {
    let mut rng = Rng::for_test("row_sum_backward_matches_reference");
    for (rows, cols) in SHAPES {
        for kind in [RowReduce::Sum, RowReduce::Mean] {
            let dy = rng.normal_vec(rows, 1.0);
            let dy64: Vec<f64> = dy.iter().map(|&v| v as f64).collect();
            let mut want = vec![0.0; rows * cols];
            row_sum_backward_host(&dy64, &mut want, cols, kind);
            let dyt = Tensor::from_slice(dev, &[rows], &dy)?;
            let mut dx = Tensor::zeros(dev, &[rows, cols])?;
            dx.poison()?;
            row_sum_backward(&dyt, &mut dx, cols, kind)?;
            assert_close(
                &format!("row_sum_backward {rows}x{cols} {kind:?}"),
                &dx.to_vec()?,
                &want,
                1e-7,
                1e-6,
            )?;
        }
    }
    Ok(())
});

device_test!(row_sum_rejects_bad_shapes, |dev| {
    let x = Tensor::<f32>::zeros(dev, &[4, 5])?;
    let mut y = Tensor::<f32>::zeros(dev, &[3])?;
    let err = row_sum_forward(&x, &mut y, 5, RowReduce::Sum).expect_err("3 rows of 5 is not 20");
    anyhow::ensure!(format!("{err:#}").contains("is not 3 x 5"), "{err:#}");
    Ok(())
});

#[test]
fn row_sum_gradient_matches_finite_differences() {
    let mut rng = Rng::for_test("row_sum_gradient_matches_finite_differences");
    let (rows, cols) = (4, 9);
    let x: Vec<f64> = (0..rows * cols).map(|_| rng.normal()).collect();
    let w: Vec<f64> = (0..rows).map(|_| rng.normal()).collect();
    for kind in [RowReduce::Sum, RowReduce::Mean] {
        let loss = |x: &[f64]| {
            let mut y = vec![0.0; rows];
            row_sum_forward_host(x, &mut y, cols, kind);
            y.iter().zip(&w).map(|(y, w)| y * w).sum::<f64>()
        };
        let mut g = vec![0.0; rows * cols];
        row_sum_backward_host(&w, &mut g, cols, kind);
        check_gradient(&format!("row_sum {kind:?}"), loss, &x, &g, 1e-6, 1e-8).unwrap();
    }
}
