//! GEMM throughput: the cpu device's f32 GEMM (the `gemm` crate) on square products and on the
//! token model's shapes, against this CPU's measured FMA peak; the emu kernels on one small
//! product, only to record what the emulator costs; cuda when a GPU is present, where every shape
//! runs on our kernels and, when libcublas loads, on cuBLAS too (src/ops/gemm_cublas.rs), with
//! the ratio of the two times. Prints a markdown table and writes target/bench/gemm.json. Run:
//! `cargo bench --bench gemm`.

use anyhow::Result;
use half::bf16;
use hiermd::ops::gemm::{gemm, gemm_half};
use hiermd::ops::gemm_cublas::{self, GemmBackend};
use hiermd::testing::{test_devices, Availability, Rng};
use hiermd::{Device, Tensor};
use std::time::Instant;

/// Median seconds of `reps` runs after 1 warm-up run(s) (see `testing::median_seconds`).
fn median(dev: &Device, reps: usize, f: impl FnMut() -> Result<()>) -> Result<f64> {
    hiermd::testing::median_seconds(dev, 1, reps, f)
}

// ---------------------------------------------------------------------------------------------
// The CPU's practical f32 peak: independent FMA chains in registers, no memory traffic. Twelve
// accumulators cover the FMA latency (4 cycles) times the FMA ports (2) with room to spare;
// 8-wide AVX2 FMAs. (The gemm crate runs its AVX-512 kernels where the CPU has them, the
// `x86-v4` feature: on Zen 4 those do no more FMAs per cycle, but fewer instructions.)

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    const CHAINS: usize = 12;

    /// f32 FLOPs done by `iters` rounds of 12 8-wide FMAs: 2 * 8 * 12 per round.
    pub fn flops_avx2(iters: u64) -> f64 {
        (2 * 8 * CHAINS) as f64 * iters as f64
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_avx2(iters: u64) -> f32 {
        let mut acc = [_mm256_set1_ps(0.0); CHAINS];
        let (x, y) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, x, y);
            }
        }
        let mut s = _mm256_setzero_ps();
        for a in acc {
            s = _mm256_add_ps(s, a);
        }
        let mut out = [0.0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out.iter().sum()
    }
}

/// The FMA loop's f32 GFLOP/s: (one thread, every rayon thread at once), each the best of 5
/// runs; None where this CPU has no AVX2 FMA. (An AVX-512 loop gains nothing on Zen 4, whose
/// 512-bit FMAs are two 256-bit halves: 117.1 against 117.0 GFLOP/s per core measured here.) On a machine shared with other jobs the
/// all-thread figure drops first: one thread gets a core to itself more often than all do.
#[cfg(target_arch = "x86_64")]
fn cpu_peak() -> Option<Peak> {
    let iters = 20_000_000u64;
    if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
        return None;
    }
    // SAFETY: AVX2 and FMA were detected above.
    let kernel = || unsafe { peak::fma_avx2(iters) };
    let per_thread = peak::flops_avx2(iters);
    let (mut one, mut all) = (0.0f64, 0.0f64);
    for _ in 0..5 {
        let s = Instant::now();
        std::hint::black_box(kernel());
        one = one.max(per_thread / s.elapsed().as_secs_f64() / 1e9);
        let s = Instant::now();
        std::hint::black_box(rayon::broadcast(|_| kernel()));
        let secs = s.elapsed().as_secs_f64();
        all = all.max(per_thread * rayon::current_num_threads() as f64 / secs / 1e9);
    }
    Some(Peak {
        one,
        all,
        isa: "AVX2 FMA",
    })
}

/// The CPU's measured f32 FMA throughput.
struct Peak {
    /// GFLOP/s of one thread.
    one: f64,
    /// GFLOP/s of all rayon threads at once.
    all: f64,
    /// The instructions that reached it.
    isa: &'static str,
}

impl Peak {
    /// One core's peak times the threads: what an idle machine would give.
    fn nominal(&self) -> f64 {
        self.one * rayon::current_num_threads() as f64
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_peak() -> Option<Peak> {
    None
}

struct Row {
    what: String,
    device: String,
    /// Who multiplied: "gemm crate" (cpu), "ours" (our kernels), or the cuBLAS version.
    backend: String,
    seconds: f64,
    gflops: f64,
    /// On cuBLAS rows: our kernels' time over cuBLAS's for the same shape (> 1: cuBLAS faster).
    ours_over_this: Option<f64>,
}

/// Times C = A op(B) (f32, or bf16 operands) of the given shape on `dev` with our kernels (the
/// gemm crate on cpu), and on cuda with cuBLAS too when `cublas` names its version.
#[allow(clippy::too_many_arguments)]
fn time_gemm(
    dev: &Device,
    label: &str,
    shape: (usize, usize, usize),
    trans: (bool, bool),
    half: bool,
    reps: usize,
    rng: &mut Rng,
    rows: &mut Vec<Row>,
    cublas: Option<&str>,
) -> Result<()> {
    gemm_cublas::set_backend(GemmBackend::Ours);
    let ours = time_one(dev, label, shape, trans, half, reps, rng)?;
    let ours_s = ours.seconds;
    rows.push(Row {
        backend: if matches!(dev, Device::Cpu) {
            "gemm crate".into()
        } else {
            "ours".into()
        },
        ..ours
    });
    if let Some(version) = cublas {
        gemm_cublas::set_backend(GemmBackend::Cublas);
        let before = gemm_cublas::calls();
        let row = time_one(dev, label, shape, trans, half, reps, rng);
        gemm_cublas::set_backend(GemmBackend::Ours);
        let row = row?;
        anyhow::ensure!(
            gemm_cublas::calls() > before,
            "{}: cuBLAS was selected but did not run",
            row.what
        );
        rows.push(Row {
            backend: version.into(),
            ours_over_this: Some(ours_s / row.seconds),
            ..row
        });
    }
    Ok(())
}

/// One timing with the backend in force.
fn time_one(
    dev: &Device,
    label: &str,
    (m, n, k): (usize, usize, usize),
    (ta, tb): (bool, bool),
    half: bool,
    reps: usize,
    rng: &mut Rng,
) -> Result<Row> {
    let a = rng.normal_vec(m * k, 1.0);
    let b = rng.normal_vec(k * n, 1.0);
    let mut c = Tensor::<f32>::zeros(dev, &[m * n])?;
    let s = if half {
        let to = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
        let at = Tensor::from_slice(dev, &[m * k], &to(&a))?;
        let bt = Tensor::from_slice(dev, &[k * n], &to(&b))?;
        median(dev, reps, || {
            gemm_half(ta, tb, m, n, k, 1.0, &at, &bt, 0.0, &mut c)
        })?
    } else {
        let at = Tensor::from_slice(dev, &[m * k], &a)?;
        let bt = Tensor::from_slice(dev, &[k * n], &b)?;
        median(dev, reps, || {
            gemm(ta, tb, m, n, k, 1.0, &at, &bt, 0.0, &mut c)
        })?
    };
    let t = |x: bool| if x { "T" } else { "N" };
    Ok(Row {
        what: format!(
            "{label} {m}x{n}x{k} {}{} {}",
            t(ta),
            t(tb),
            if half { "bf16" } else { "f32" }
        ),
        device: dev.name(),
        backend: String::new(),
        seconds: s,
        gflops: 2.0 * (m * n * k) as f64 / s / 1e9,
        ours_over_this: None,
    })
}

fn main() -> Result<()> {
    let mut rng = Rng::new(7);
    let mut rows = Vec::new();
    // The token model: 214 residues x 256 frames per batch, width 64, projections to 3 x 64.
    let tokens = 214 * 256;
    let token_shapes = [
        (
            "token qkv fwd [t,64]x[192,64]^T",
            (tokens, 192, 64),
            (false, true),
        ),
        (
            "token qkv dX  [t,192]x[192,64]",
            (tokens, 64, 192),
            (false, false),
        ),
        (
            "token qkv dW  [t,192]^T x [t,64]",
            (192, 64, tokens),
            (true, false),
        ),
        (
            "token mlp fwd [t,64]x[64,64]^T",
            (tokens, 64, 64),
            (false, true),
        ),
    ];

    let peak = cpu_peak();
    for (name, _, avail) in test_devices() {
        let Availability::Ready(dev) = avail else {
            println!("({name} not available: skipped)");
            continue;
        };
        match &dev {
            Device::Cpu => {
                for s in [256usize, 512, 1024, 2048] {
                    let reps = if s >= 1024 { 5 } else { 15 };
                    time_gemm(
                        &dev,
                        "square",
                        (s, s, s),
                        (false, false),
                        false,
                        reps,
                        &mut rng,
                        &mut rows,
                        None,
                    )?;
                }
                for (label, shape, trans) in token_shapes {
                    time_gemm(
                        &dev, label, shape, trans, false, 7, &mut rng, &mut rows, None,
                    )?;
                }
            }
            Device::Emu(_) => {
                let shape = (128, 128, 128);
                time_gemm(
                    &dev,
                    "small",
                    shape,
                    (false, false),
                    false,
                    3,
                    &mut rng,
                    &mut rows,
                    None,
                )?;
                time_gemm(
                    &dev,
                    "small",
                    shape,
                    (false, false),
                    true,
                    3,
                    &mut rng,
                    &mut rows,
                    None,
                )?;
            }
            Device::Cuda(_) => {
                // cuBLAS beside ours when libcublas loads; else say why once and time ours only.
                let cublas = match gemm_cublas::status(&dev) {
                    Ok(line) => {
                        println!("cuBLAS rows: {line}");
                        gemm_cublas::library().ok()
                    }
                    Err(e) => {
                        println!("cuBLAS rows: none ({e:#})");
                        None
                    }
                };
                let cublas = cublas.as_deref();
                for s in [256usize, 512, 1024, 2048, 4096] {
                    for half in [false, true] {
                        time_gemm(
                            &dev,
                            "square",
                            (s, s, s),
                            (false, false),
                            half,
                            21,
                            &mut rng,
                            &mut rows,
                            cublas,
                        )?;
                    }
                }
                for (label, shape, trans) in token_shapes {
                    for half in [false, true] {
                        time_gemm(
                            &dev, label, shape, trans, half, 21, &mut rng, &mut rows, cublas,
                        )?;
                    }
                }
            }
        }
    }

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let threads = rayon::current_num_threads();
    match &peak {
        Some(p) => println!(
            "CPU f32 peak (measured, {}): {:.1} GFLOP/s on one thread, so {:.1} nominal on {threads}; \
             {:.1} measured on all {threads} at once. Load average at the end: {}",
            p.isa,
            p.one,
            p.nominal(),
            p.all,
            load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
        ),
        None => println!("CPU peak: not measured (no x86-64 FMA on this CPU)"),
    }
    println!();
    println!(
        "| benchmark | device | backend | median ms | GFLOP/s | % of nominal CPU peak | ours ms / this ms |"
    );
    println!("|---|---|---|--:|--:|--:|--:|");
    for r in &rows {
        let pct = match (&peak, r.device.as_str()) {
            (Some(p), "cpu") => format!("{:.0}%", 100.0 * r.gflops / p.nominal()),
            _ => "".into(),
        };
        let ratio = r
            .ours_over_this
            .map_or_else(String::new, |x| format!("{x:.2}"));
        println!(
            "| {} | {} | {} | {:.3} | {:.2} | {pct} | {ratio} |",
            r.what,
            r.device,
            r.backend,
            r.seconds * 1e3,
            r.gflops
        );
    }
    let json: Vec<String> = rows
        .iter()
        .map(|r| {
            let ratio = r
                .ours_over_this
                .map_or_else(|| "null".to_string(), |x| x.to_string());
            format!(
                "{{\"benchmark\":{:?},\"device\":{:?},\"backend\":{:?},\"median_s\":{},\"gflops\":{},\"ours_over_this\":{ratio}}}",
                r.what, r.device, r.backend, r.seconds, r.gflops
            )
        })
        .collect();
    std::fs::create_dir_all("target/bench")?;
    std::fs::write(
        "target/bench/gemm.json",
        format!("[{}]\n", json.join(",\n")),
    )?;
    println!("wrote target/bench/gemm.json");
    Ok(())
}
