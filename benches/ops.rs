//! Foundation benchmarks: the emu shim's cost per block launch, and the throughput of the first
//! ops on every available device. Median of repeated runs after a warm-up; results are printed as
//! a table and written as JSON to target/bench/ops.json. Run: `cargo bench --bench ops`.

use anyhow::Result;
use hiermd::kernels::shim_check;
use hiermd::launch::{launch, KernelArgs, LaunchConfig};
use hiermd::ops::elementwise as ew;
use hiermd::ops::reduce::{row_sum_forward, RowReduce};
use hiermd::testing::{test_devices, Availability, Rng};
use hiermd::{Device, Tensor};

/// Median seconds of `reps` runs after 2 warm-up run(s) (see `testing::median_seconds`).
fn median(dev: &Device, reps: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    hiermd::testing::median_seconds(dev, 2, reps, f)
}

struct Row {
    what: String,
    device: String,
    seconds: f64,
    unit: String,
    value: f64,
}

fn main() -> Result<()> {
    let mut rows = Vec::new();
    let emu = Device::emu();

    // Emu launch cost: a 256-thread block that only computes (silu over its 256 elements), and
    // one that passes 17 barriers (a block prefix sum).
    for blocks in [1usize, 64] {
        let n = blocks * 256;
        let x = Tensor::from_slice(&emu, &[n], &vec![0.5f32; n])?;
        let mut y = Tensor::<f32>::zeros(&emu, &[n])?;
        let s = median(&emu, 21, || ew::silu_forward(&x, &mut y))?;
        rows.push(Row {
            what: format!("emu block launch, 256 threads, no barrier ({blocks} blocks)"),
            device: "emu".into(),
            seconds: s,
            unit: "ms/block".into(),
            value: s * 1e3 / blocks as f64,
        });
        let xi = Tensor::from_slice(&emu, &[n], &vec![1i32; n])?;
        let mut yi = Tensor::<i32>::zeros(&emu, &[n])?;
        let s = median(&emu, 21, || {
            launch(
                &emu,
                &shim_check::SHIM_BLOCK_SCAN,
                LaunchConfig {
                    grid: [blocks as u32, 1, 1],
                    block: [256, 1, 1],
                    shared_bytes: 1024,
                },
                KernelArgs::new().input(&xi).output(&mut yi),
            )
        })?;
        rows.push(Row {
            what: format!("emu block launch, 256 threads, 17 barriers ({blocks} blocks)"),
            device: "emu".into(),
            seconds: s,
            unit: "ms/block".into(),
            value: s * 1e3 / blocks as f64,
        });
    }

    // Op throughput on every device (cuda when present).
    let n = 1 << 22;
    let mut rng = Rng::new(1);
    let xs = rng.normal_vec(n, 1.0);
    for (name, _, avail) in test_devices() {
        let Availability::Ready(dev) = avail else {
            println!("({name} not available: skipped)");
            continue;
        };
        let reps = if matches!(dev, Device::Emu(_)) { 5 } else { 21 };
        let x = Tensor::from_slice(&dev, &[n], &xs)?;
        let dy = Tensor::from_slice(&dev, &[n], &xs)?;
        let mut y = Tensor::<f32>::zeros(&dev, &[n])?;
        let s = median(&dev, reps, || ew::silu_forward(&x, &mut y))?;
        rows.push(Row {
            what: "silu_forward 4M f32".into(),
            device: dev.name(),
            seconds: s,
            unit: "GB/s".into(),
            value: 8.0 * n as f64 / s / 1e9,
        });
        let s = median(&dev, reps, || ew::silu_backward(&x, &dy, &mut y))?;
        rows.push(Row {
            what: "silu_backward 4M f32".into(),
            device: dev.name(),
            seconds: s,
            unit: "GB/s".into(),
            value: 12.0 * n as f64 / s / 1e9,
        });
        let cols = 1024;
        let mut out = Tensor::<f32>::zeros(&dev, &[n / cols])?;
        let s = median(&dev, reps, || {
            row_sum_forward(&x, &mut out, cols, RowReduce::Sum)
        })?;
        rows.push(Row {
            what: "row_sum_forward 4096x1024".into(),
            device: dev.name(),
            seconds: s,
            unit: "GB/s".into(),
            value: 4.0 * n as f64 / s / 1e9,
        });
    }

    println!(
        "{:<58} {:<7} {:>11} {:>10} unit",
        "benchmark", "device", "median ms", "value"
    );
    for r in &rows {
        println!(
            "{:<58} {:<7} {:>11.3} {:>10.3} {}",
            r.what,
            r.device,
            r.seconds * 1e3,
            r.value,
            r.unit
        );
    }
    let json: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"benchmark\":{:?},\"device\":{:?},\"median_s\":{},\"value\":{},\"unit\":{:?}}}",
                r.what, r.device, r.seconds, r.value, r.unit
            )
        })
        .collect();
    std::fs::create_dir_all("target/bench")?;
    std::fs::write("target/bench/ops.json", format!("[{}]\n", json.join(",\n")))?;
    println!("wrote target/bench/ops.json");
    Ok(())
}
