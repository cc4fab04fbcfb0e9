//! `hiermd demo` at the foundation stage: every op on the chosen device (and on emu, which runs
//! the CUDA source), checked against the f64 reference, with timings. Later stages replace this
//! with the end-to-end training demo.

use crate::ops::elementwise as ew;
use crate::ops::reduce::{self, RowReduce};
use crate::testing::{assert_close, Rng};
use crate::{Device, Tensor};
use anyhow::Result;
use std::time::Instant;

type OpRun = Box<dyn Fn(&Device, &[f32], &[f32]) -> Result<Vec<f32>>>;
type Reference = Box<dyn Fn(&[f64], &[f64]) -> Vec<f64>>;
type Tolerance = Box<dyn Fn(&[f64]) -> f64>;
use ew::{BinaryOp, UnaryOp};

struct DemoOp {
    name: &'static str,
    run: OpRun,
    reference: Reference,
    /// Absolute tolerance for inputs x: elementwise ops are within a few ulps; an f32 sum of n
    /// terms may be off by about n u sum|x| in the worst case, a few u sum|x| in practice.
    atol: Tolerance,
}

fn ops(cols: usize) -> Vec<DemoOp> {
    fn unary(f: UnaryOp) -> OpRun {
        Box::new(move |d, x, _| {
            let x = Tensor::from_slice(d, &[x.len()], x)?;
            let mut y = Tensor::zeros(d, &[x.len()])?;
            y.poison()?;
            f(&x, &mut y)?;
            y.to_vec()
        })
    }
    fn binary(f: BinaryOp) -> OpRun {
        Box::new(move |d, x, g| {
            let x = Tensor::from_slice(d, &[x.len()], x)?;
            let g = Tensor::from_slice(d, &[g.len()], g)?;
            let mut y = Tensor::zeros(d, &[x.len()])?;
            y.poison()?;
            f(&x, &g, &mut y)?;
            y.to_vec()
        })
    }
    let mut v = vec![
        DemoOp {
            name: "silu_forward",
            run: unary(ew::silu_forward),
            reference: Box::new(|x, _| {
                let mut y = vec![0.0; x.len()];
                ew::silu_forward_host(x, &mut y);
                y
            }),
            atol: Box::new(|_| 1e-5),
        },
        DemoOp {
            name: "silu_backward",
            run: binary(ew::silu_backward),
            reference: Box::new(|x, g| {
                let mut y = vec![0.0; x.len()];
                ew::silu_backward_host(x, g, &mut y);
                y
            }),
            atol: Box::new(|_| 1e-5),
        },
        DemoOp {
            name: "sigmoid_forward",
            run: unary(ew::sigmoid_forward),
            reference: Box::new(|x, _| {
                let mut y = vec![0.0; x.len()];
                ew::sigmoid_forward_host(x, &mut y);
                y
            }),
            atol: Box::new(|_| 1e-5),
        },
        DemoOp {
            name: "add",
            run: binary(ew::add),
            reference: Box::new(|a, b| a.iter().zip(b).map(|(a, b)| a + b).collect()),
            atol: Box::new(|_| 1e-5),
        },
    ];
    v.push(DemoOp {
        name: "row_sum_forward",
        run: Box::new(move |d, x, _| {
            let rows = x.len() / cols;
            let x = Tensor::from_slice(d, &[rows, cols], x)?;
            let mut y = Tensor::zeros(d, &[rows])?;
            y.poison()?;
            reduce::row_sum_forward(&x, &mut y, cols, RowReduce::Sum)?;
            y.to_vec()
        }),
        reference: Box::new(move |x, _| {
            let mut y = vec![0.0; x.len() / cols];
            reduce::row_sum_forward_host(x, &mut y, cols, RowReduce::Sum);
            y
        }),
        atol: Box::new(move |x| {
            let worst_row = x
                .chunks(cols)
                .map(|r| r.iter().map(|v| v.abs()).sum::<f64>())
                .fold(0.0, f64::max);
            8.0 * f32::EPSILON as f64 * worst_row
        }),
    });
    v
}

/// Runs the demo on `dev` with `size` elements per op.
pub fn run(dev: &Device, size: usize) -> Result<()> {
    let cols = 1000;
    let size = size.max(cols).next_multiple_of(cols);
    let mut rng = Rng::new(crate::testing::clock_seed());
    let x = rng.normal_vec(size, 2.0);
    let g = rng.normal_vec(size, 1.0);
    let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let g64: Vec<f64> = g.iter().map(|&v| v as f64).collect();
    let mut devices = vec![dev.clone()];
    if !matches!(dev, Device::Emu(_)) {
        devices.push(Device::emu());
    }
    println!("hiermd demo: {size} elements per op, f64 reference on the CPU");
    println!(
        "{:<18} {:<8} {:>12} {:>12} {:>10}",
        "op", "device", "max |err|", "rel l2 err", "ms"
    );
    for op in ops(cols) {
        let want = (op.reference)(&x64, &g64);
        for d in &devices {
            let t = Instant::now();
            let got = (op.run)(d, &x, &g)?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let c = assert_close(op.name, &got, &want, (op.atol)(&x64), 1e-5)?;
            println!(
                "{:<18} {:<8} {:>12.3e} {:>12.3e} {:>10.2}",
                op.name,
                d.name(),
                c.max_abs,
                c.rel_l2,
                ms
            );
        }
    }
    println!("all ops match the reference (timings include host<->device copies)");
    Ok(())
}
