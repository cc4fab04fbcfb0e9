//! The optional cuBLAS path of the cuda GEMM (src/ops/gemm_cublas.rs).
//!
//! Everywhere: the selection logic (`HIERMD_GEMM` values, `set_backend`), that selecting cuBLAS
//! changes nothing on the cpu and emu devices, and that a missing libcublas is reported plainly
//! and never panics. On a GPU with libcublas: every transpose pair, ragged sizes, batches
//! (packed, padded, stride 0), `beta = 0` into a NaN-poisoned C, bf16/f16 through GemmEx, the
//! Linear layer, against the f64 reference under the error bound of tests/gemm.rs, and cuBLAS
//! against our kernels. Where there is no GPU or no libcublas, the GPU tests say so in one line
//! and pass, unless `HIERMD_TEST_DEVICES` names cuda (then the GPU must be there) or
//! `HIERMD_REQUIRE_CUBLAS=1` (then cuBLAS must load: scripts/gpu-check sets it when it finds the
//! nvidia-cublas wheel).
//!
//! The backend is process-wide state, so every test here holds one lock while it runs.

use anyhow::{bail, ensure, Result};
use half::{bf16, f16};
use hiermd::ops::gemm::{
    gemm, gemm_batched, gemm_half, gemm_half_batched, gemm_reference, linear_backward,
    linear_backward_host, linear_forward, linear_forward_host, Batch, HalfFloat,
};
use hiermd::ops::gemm_cublas::{
    backend, calls, clear_backend, library, notes, parse_env_value, set_backend,
    simulate_missing_library, status, GemmBackend, ENV_VAR,
};
use hiermd::testing::{test_devices, test_seed, Availability, Rng};
use hiermd::{Device, Tensor};
use std::io::Write;
use std::sync::{Mutex, MutexGuard};

// ---------------------------------------------------------------------------------------------
// Process-wide state.

static LOCK: Mutex<()> = Mutex::new(());

/// Holds the lock; puts the backend and the test hook back when the test ends, pass or fail.
struct Exclusive(#[allow(dead_code)] MutexGuard<'static, ()>);

impl Drop for Exclusive {
    fn drop(&mut self) {
        clear_backend();
        simulate_missing_library(false);
    }
}

fn exclusive() -> Exclusive {
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    clear_backend();
    simulate_missing_library(false);
    Exclusive(guard)
}

/// One line on stderr that the harness does not capture (as `testing::run_on_devices` does).
fn say(line: &str) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

// ---------------------------------------------------------------------------------------------
// Reference and bounds, as in tests/gemm.rs: |got - exact| <= (k + 4) eps (|alpha| |op(A)|
// |op(B)| + |beta| |C|) element by element.

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[allow(clippy::too_many_arguments)]
fn expected(
    (ta, tb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: &[f64],
    b: &[f64],
    beta: f32,
    c: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let mut want = c.to_vec();
    gemm_reference(ta, tb, m, n, k, alpha as f64, a, b, beta as f64, &mut want);
    let abs = |v: &[f64]| v.iter().map(|x| x.abs()).collect::<Vec<f64>>();
    let mut bound = abs(c);
    gemm_reference(
        ta,
        tb,
        m,
        n,
        k,
        (alpha as f64).abs(),
        &abs(a),
        &abs(b),
        (beta as f64).abs(),
        &mut bound,
    );
    let eps = (k as f64 + 4.0) * f32::EPSILON as f64;
    let bound = bound
        .iter()
        .map(|v| eps * v + f32::MIN_POSITIVE as f64)
        .collect();
    (want, bound)
}

/// Every element within its bound (NaN never is); the message names the worst.
fn check_bounded(what: &str, got: &[f32], want: &[f64], bound: &[f64]) -> Result<()> {
    ensure!(got.len() == want.len(), "{what}: length");
    let mut worst: Option<(usize, f64)> = None;
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let ratio = (g as f64 - w).abs() / b;
        let ratio = if ratio.is_nan() { f64::INFINITY } else { ratio };
        if ratio > 1.0 && worst.is_none_or(|(_, r)| ratio > r) {
            worst = Some((i, ratio));
        }
    }
    if let Some((i, ratio)) = worst {
        bail!(
            "{what}: element {i} is {} but the reference is {} ({ratio:.2} times the bound {:.3e})",
            got[i],
            want[i],
            bound[i]
        );
    }
    Ok(())
}

/// (m, n, k): one element, odd and prime sizes, one of our tiles exactly, tiles plus one, k = 1,
/// a wide thin product, and several tiles in every direction.
const SHAPES: [(usize, usize, usize); 8] = [
    (1, 1, 1),
    (17, 31, 13),
    (65, 129, 33),
    (128, 64, 32),
    (129, 65, 17),
    (40, 50, 1),
    (3, 200, 70),
    (256, 384, 200),
];

/// (alpha, beta): assignment into a NaN-poisoned C, scaled assignment, accumulation.
const SCALARS: [(f32, f32); 4] = [(1.0, 0.0), (-0.75, 0.0), (1.0, 1.0), (0.5, -1.5)];

const TRANSPOSES: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

/// A C tensor: NaN-poisoned when beta = 0 (the product must not read it), else random.
fn c_input(dev: &Device, rng: &mut Rng, len: usize, beta: f32) -> Result<(Tensor<f32>, Vec<f64>)> {
    if beta == 0.0 {
        let mut c = Tensor::zeros(dev, &[len])?;
        c.poison()?;
        Ok((c, vec![0.0; len]))
    } else {
        let v = rng.normal_vec(len, 1.0);
        Ok((Tensor::from_slice(dev, &[len], &v)?, widen(&v)))
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

// ---------------------------------------------------------------------------------------------
// Selection: no device needed.

#[test]
fn hiermd_gemm_values_parse() {
    let _x = exclusive();
    assert_eq!(parse_env_value(None).unwrap(), GemmBackend::Ours);
    assert_eq!(parse_env_value(Some("")).unwrap(), GemmBackend::Ours);
    assert_eq!(parse_env_value(Some("  ")).unwrap(), GemmBackend::Ours);
    for (text, want) in [
        ("ours", GemmBackend::Ours),
        ("cublas", GemmBackend::Cublas),
        ("auto", GemmBackend::Auto),
        (" CUBLAS ", GemmBackend::Cublas),
        ("Auto", GemmBackend::Auto),
    ] {
        assert_eq!(parse_env_value(Some(text)).unwrap(), want, "{text:?}");
        assert_eq!(text.parse::<GemmBackend>().unwrap(), want, "{text:?}");
        // Display gives the canonical spelling back.
        assert_eq!(want.to_string().parse::<GemmBackend>().unwrap(), want);
    }
    for bad in ["cuda", "ours,cublas", "1"] {
        let e = format!("{:#}", parse_env_value(Some(bad)).unwrap_err());
        assert!(
            e.contains(ENV_VAR) && e.contains("expected ours, cublas or auto"),
            "{bad:?}: {e}"
        );
    }
    // Which products each backend hands to cuBLAS: (f32, bf16/f16).
    let table = [
        (GemmBackend::Ours, false, false),
        (GemmBackend::Cublas, true, true),
        (GemmBackend::Auto, true, false),
    ];
    for (b, f32_, half) in table {
        assert_eq!(b.wants_cublas(false), f32_, "{b} f32");
        assert_eq!(b.wants_cublas(true), half, "{b} half");
    }
}

#[test]
fn set_backend_overrides_the_environment() {
    let _x = exclusive();
    // What HIERMD_GEMM says in this process (a bad value reads as ours, with a note).
    let from_env =
        parse_env_value(std::env::var(ENV_VAR).ok().as_deref()).unwrap_or(GemmBackend::Ours);
    assert_eq!(backend(), from_env);
    for b in [GemmBackend::Cublas, GemmBackend::Auto, GemmBackend::Ours] {
        set_backend(b);
        assert_eq!(backend(), b);
    }
    clear_backend();
    assert_eq!(backend(), from_env);
    if std::env::var_os(ENV_VAR).is_none() {
        assert_eq!(backend(), GemmBackend::Ours, "the default must stay ours");
    }
}

// libcublas absent (this machine) or present (a GPU machine): either way library() answers
// without panicking, and an absent one is named plainly. The test hook reads as absent.
#[test]
fn missing_library_is_reported_plainly() {
    let _x = exclusive();
    match library() {
        Ok(v) => say(&format!(
            "[missing_library_is_reported_plainly] {v} loads here"
        )),
        Err(e) => {
            let e = format!("{e:#}");
            say(&format!(
                "[missing_library_is_reported_plainly] cuBLAS unavailable here: {e}"
            ));
            assert!(e.contains("libcublas"), "unclear reason: {e}");
        }
    }
    simulate_missing_library(true);
    let e = format!("{:#}", library().unwrap_err());
    assert!(e.contains("libcublas") && e.contains("missing"), "{e}");
    simulate_missing_library(false);
}

// cpu and emu have no cuBLAS: selecting it must leave every product bit for bit as it was, call
// cuBLAS never, and print no note.
#[test]
fn cublas_selected_changes_nothing_on_host_devices() {
    let _x = exclusive();
    let mut rng = Rng::for_test("cublas_selected_changes_nothing_on_host_devices");
    let (m, n, k) = (33, 17, 9);
    let a = rng.normal_vec(m * k, 1.0);
    let b = rng.normal_vec(k * n, 1.0);
    let bias = rng.normal_vec(n, 1.0);
    let count = 3;
    let ab = rng.normal_vec(count * m * k, 1.0);
    let bh: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
    let abh: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
    for dev in [Device::Cpu, Device::emu()] {
        let run = || -> Result<Vec<Vec<f32>>> {
            let at = Tensor::from_slice(&dev, &[m, k], &a)?;
            let bt = Tensor::from_slice(&dev, &[k, n], &b)?;
            let mut c = Tensor::zeros(&dev, &[m, n])?;
            gemm(false, false, m, n, k, 1.0, &at, &bt, 0.0, &mut c)?;
            // A batch sharing B (stride 0).
            let abt = Tensor::from_slice(&dev, &[count * m * k], &ab)?;
            let mut cb = Tensor::zeros(&dev, &[count * m * n])?;
            let batch = Batch {
                count,
                stride_a: m * k,
                stride_b: 0,
                stride_c: m * n,
            };
            gemm_batched(false, false, m, n, k, 1.0, &abt, &bt, 0.0, &mut cb, batch)?;
            let aht = Tensor::from_slice(&dev, &[m, k], &abh)?;
            let bht = Tensor::from_slice(&dev, &[k, n], &bh)?;
            let mut ch = Tensor::zeros(&dev, &[m, n])?;
            gemm_half(false, false, m, n, k, 1.0, &aht, &bht, 0.0, &mut ch)?;
            // Linear: x [m, k], w [n, k].
            let w = Tensor::from_slice(&dev, &[n, k], &b)?;
            let bias_t = Tensor::from_slice(&dev, &[n], &bias)?;
            let mut y = Tensor::zeros(&dev, &[m, n])?;
            linear_forward(&at, &w, Some(&bias_t), &mut y)?;
            Ok(vec![c.to_vec()?, cb.to_vec()?, ch.to_vec()?, y.to_vec()?])
        };
        set_backend(GemmBackend::Ours);
        let ours = run().unwrap();
        let (calls0, notes0) = (calls(), notes());
        for b in [GemmBackend::Cublas, GemmBackend::Auto] {
            set_backend(b);
            let got = run().unwrap();
            for (i, (g, o)) in got.iter().zip(&ours).enumerate() {
                assert_eq!(bits(g), bits(o), "{} {b}: product {i} changed", dev.name());
            }
        }
        assert_eq!(calls(), calls0, "{}: cuBLAS was called", dev.name());
        assert_eq!(notes(), notes0, "{}: a note was printed", dev.name());
        let e = format!("{:#}", status(&dev).unwrap_err());
        assert!(e.contains("only on cuda"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// On a GPU.

/// Runs `body` on the cuda device with cuBLAS loaded; where there is none, says why in one line
/// (and fails only where `HIERMD_TEST_DEVICES` names cuda, or `HIERMD_REQUIRE_CUBLAS=1` while
/// cuBLAS does not load).
fn on_cuda_with_cublas(test: &str, body: impl Fn(&Device) -> Result<()>) {
    let _x = exclusive();
    let require_cublas = std::env::var("HIERMD_REQUIRE_CUBLAS").is_ok_and(|v| v == "1");
    let Some((_, required, avail)) = test_devices().into_iter().find(|(n, ..)| n == "cuda") else {
        say(&format!(
            "[{test}] the cuBLAS test could not run: HIERMD_TEST_DEVICES does not list cuda"
        ));
        return;
    };
    let dev = match avail {
        Availability::Ready(dev) => dev,
        Availability::Missing(why) => {
            assert!(
                !required,
                "[{test}] cuda required by HIERMD_TEST_DEVICES but {why}"
            );
            say(&format!(
                "[{test}] the cuBLAS test could not run here: no cuda device ({why})"
            ));
            return;
        }
    };
    match status(&dev) {
        Ok(line) => {
            if let Err(e) = body(&dev).and_then(|()| dev.synchronize()) {
                panic!("[{test}] seed {} on {line}: {e:#}", test_seed());
            }
            say(&format!("[{test}] seed {}: ran on {line}", test_seed()));
        }
        Err(why) => {
            assert!(
                !require_cublas,
                "[{test}] HIERMD_REQUIRE_CUBLAS=1 but cuBLAS does not load: {why:#}"
            );
            say(&format!(
                "[{test}] the cuBLAS test could not run on {}: cuBLAS unavailable ({why:#})",
                dev.name()
            ));
        }
    }
}

/// Runs `f` with cuBLAS selected and checks that it made exactly `products` cuBLAS calls.
fn with_cublas<T>(products: u64, f: impl FnOnce() -> Result<T>) -> Result<T> {
    set_backend(GemmBackend::Cublas);
    let before = calls();
    let out = f();
    set_backend(GemmBackend::Ours);
    let made = calls() - before;
    ensure!(
        made == products,
        "expected {products} cuBLAS call(s), cuBLAS made {made}"
    );
    out
}

#[test]
fn cublas_f32_matches_reference_and_ours() {
    on_cuda_with_cublas("cublas_f32_matches_reference_and_ours", |dev| {
        let mut rng = Rng::for_test("cublas_f32_matches_reference_and_ours");
        for shape in SHAPES {
            let (m, n, k) = shape;
            let (la, lb, lc) = (m * k, k * n, m * n);
            for trans in TRANSPOSES {
                for (alpha, beta) in SCALARS {
                    let a = rng.normal_vec(la, 1.0);
                    let b = rng.normal_vec(lb, 1.0);
                    let at = Tensor::from_slice(dev, &[la], &a)?;
                    let bt = Tensor::from_slice(dev, &[lb], &b)?;
                    let (mut c, c64) = c_input(dev, &mut rng, lc, beta)?;
                    let c_start = c.to_vec()?;
                    with_cublas(1, || {
                        gemm(trans.0, trans.1, m, n, k, alpha, &at, &bt, beta, &mut c)
                    })?;
                    let what =
                        format!("cuBLAS {m}x{n}x{k} trans {trans:?} alpha {alpha} beta {beta}");
                    let (want, bound) =
                        expected(trans, shape, alpha, &widen(&a), &widen(&b), beta, &c64);
                    let got = c.to_vec()?;
                    check_bounded(&what, &got, &want, &bound)?;
                    // Ours on the same inputs: both within the bound of the exact value, so
                    // within twice the bound of each other.
                    let mut co = Tensor::from_slice(dev, &[lc], &c_start)?;
                    gemm(trans.0, trans.1, m, n, k, alpha, &at, &bt, beta, &mut co)?;
                    let ours = co.to_vec()?;
                    let twice: Vec<f64> = bound.iter().map(|b| 2.0 * b).collect();
                    check_bounded(&format!("{what} against ours"), &got, &widen(&ours), &twice)?;
                }
            }
        }
        Ok(())
    });
}

/// Rounds to the 16-bit type and back, for the reference.
fn round_to<T: HalfFloat>(v: &[f32], from: fn(f32) -> T) -> (Vec<T>, Vec<f64>) {
    let h: Vec<T> = v.iter().map(|&x| from(x)).collect();
    let r = h.iter().map(|&x| x.to_f32() as f64).collect();
    (h, r)
}

fn half_matches_reference<T: HalfFloat>(
    dev: &Device,
    rng: &mut Rng,
    from: fn(f32) -> T,
    name: &str,
) -> Result<()> {
    for shape in SHAPES {
        let (m, n, k) = shape;
        for trans in TRANSPOSES {
            for (alpha, beta) in SCALARS {
                let (a, a64) = round_to(&rng.normal_vec(m * k, 1.0), from);
                let (b, b64) = round_to(&rng.normal_vec(k * n, 1.0), from);
                let (mut c, c64) = c_input(dev, rng, m * n, beta)?;
                let at = Tensor::from_slice(dev, &[m * k], &a)?;
                let bt = Tensor::from_slice(dev, &[k * n], &b)?;
                with_cublas(1, || {
                    gemm_half(trans.0, trans.1, m, n, k, alpha, &at, &bt, beta, &mut c)
                })?;
                let (want, bound) = expected(trans, shape, alpha, &a64, &b64, beta, &c64);
                check_bounded(
                    &format!("cuBLAS GemmEx {name} {m}x{n}x{k} trans {trans:?} alpha {alpha} beta {beta}"),
                    &c.to_vec()?,
                    &want,
                    &bound,
                )?;
            }
        }
    }
    Ok(())
}

#[test]
fn cublas_half_matches_reference() {
    on_cuda_with_cublas("cublas_half_matches_reference", |dev| {
        let mut rng = Rng::for_test("cublas_half_matches_reference");
        half_matches_reference(dev, &mut rng, bf16::from_f32, "bf16")?;
        half_matches_reference(dev, &mut rng, f16::from_f32, "f16")
    });
}

/// Sentinel in the gaps between C's matrices: a batched product must leave it alone.
const GAP: f32 = 12345.0;

// Packed, padded, A shared (stride 0) and B shared, each with another transpose pair and scalar
// pair, in f32 (strided sgemm) and bf16 (strided GemmEx).
#[test]
fn cublas_batched_matches_reference() {
    on_cuda_with_cublas("cublas_batched_matches_reference", |dev| {
        let mut rng = Rng::for_test("cublas_batched_matches_reference");
        let (m, n, k, count) = (37, 45, 29, 5);
        let (la, lb, lc) = (m * k, k * n, m * n);
        let layouts = [
            Batch::packed(count, m, n, k),
            Batch {
                count,
                stride_a: la + 5,
                stride_b: lb + 3,
                stride_c: lc + 7,
            },
            Batch {
                count,
                stride_a: 0,
                stride_b: lb,
                stride_c: lc,
            },
            Batch {
                count,
                stride_a: la,
                stride_b: 0,
                stride_c: lc + 1,
            },
        ];
        for (case, batch) in layouts.into_iter().enumerate() {
            for (trans, (alpha, beta)) in [
                (TRANSPOSES[case % 4], SCALARS[case % 4]),
                (TRANSPOSES[(case + 1) % 4], (1.0, 0.0)),
            ] {
                let span = |one: usize, stride: usize| (count - 1) * stride + one;
                let a = rng.normal_vec(span(la, batch.stride_a), 1.0);
                let b = rng.normal_vec(span(lb, batch.stride_b), 1.0);
                let (a16, a64) = round_to(&a, bf16::from_f32);
                let (b16, b64) = round_to(&b, bf16::from_f32);
                let c0: Vec<f32> = (0..span(lc, batch.stride_c))
                    .map(|i| match (i % batch.stride_c.max(1) < lc, beta == 0.0) {
                        (true, true) => f32::NAN,
                        (true, false) => rng.normal() as f32,
                        (false, _) => GAP,
                    })
                    .collect();
                for half in [false, true] {
                    let mut c = Tensor::from_slice(dev, &[c0.len()], &c0)?;
                    let (a_ref, b_ref) = if half {
                        let at = Tensor::from_slice(dev, &[a16.len()], &a16)?;
                        let bt = Tensor::from_slice(dev, &[b16.len()], &b16)?;
                        with_cublas(1, || {
                            gemm_half_batched(
                                trans.0, trans.1, m, n, k, alpha, &at, &bt, beta, &mut c, batch,
                            )
                        })?;
                        (a64.clone(), b64.clone())
                    } else {
                        let at = Tensor::from_slice(dev, &[a.len()], &a)?;
                        let bt = Tensor::from_slice(dev, &[b.len()], &b)?;
                        with_cublas(1, || {
                            gemm_batched(
                                trans.0, trans.1, m, n, k, alpha, &at, &bt, beta, &mut c, batch,
                            )
                        })?;
                        (widen(&a), widen(&b))
                    };
                    let got = c.to_vec()?;
                    for i in 0..count {
                        let (oa, ob, oc) =
                            (i * batch.stride_a, i * batch.stride_b, i * batch.stride_c);
                        let c_in: Vec<f64> = c0[oc..oc + lc]
                            .iter()
                            .map(|&v| if beta == 0.0 { 0.0 } else { v as f64 })
                            .collect();
                        let (want, bound) = expected(
                            trans,
                            (m, n, k),
                            alpha,
                            &a_ref[oa..oa + la],
                            &b_ref[ob..ob + lb],
                            beta,
                            &c_in,
                        );
                        check_bounded(
                            &format!("cuBLAS batched (half {half}) {batch:?} trans {trans:?} product {i}"),
                            &got[oc..oc + lc],
                            &want,
                            &bound,
                        )?;
                    }
                    for (i, &v) in got.iter().enumerate() {
                        ensure!(
                            i % batch.stride_c.max(1) < lc || v == GAP,
                            "cuBLAS batched (half {half}) {batch:?}: element {i} between C's matrices was overwritten ({v})"
                        );
                    }
                }
            }
        }
        Ok(())
    });
}

// The Linear layer: forward without bias and the backward's two products go to cuBLAS; forward
// with a bias stays on our kernel (no cuBLAS call). Against the f64 host twins.
#[test]
fn cublas_linear_matches_host() {
    on_cuda_with_cublas("cublas_linear_matches_host", |dev| {
        let mut rng = Rng::for_test("cublas_linear_matches_host");
        let (rows, in_f, out_f) = (301, 67, 45);
        let x = rng.normal_vec(rows * in_f, 1.0);
        let w = rng.normal_vec(out_f * in_f, 1.0);
        let bias = rng.normal_vec(out_f, 1.0);
        let dy = rng.normal_vec(rows * out_f, 1.0);
        let dw0 = rng.normal_vec(out_f * in_f, 1.0);
        let xt = Tensor::from_slice(dev, &[rows, in_f], &x)?;
        let wt = Tensor::from_slice(dev, &[out_f, in_f], &w)?;
        let bt = Tensor::from_slice(dev, &[out_f], &bias)?;
        let dyt = Tensor::from_slice(dev, &[rows, out_f], &dy)?;
        let (x64, w64, b64, dy64) = (widen(&x), widen(&w), widen(&bias), widen(&dy));
        let close = |what: &str, got: &[f32], want: &[f64], k: usize| -> Result<()> {
            // A loose form of the GEMM bound: the inputs are O(1) normals.
            let scale = want.iter().fold(1.0f64, |s, v| s.max(v.abs()));
            let bound = vec![(k as f64 + 4.0) * f32::EPSILON as f64 * scale * 4.0; want.len()];
            check_bounded(what, got, want, &bound)
        };
        for with_bias in [false, true] {
            let mut y = Tensor::zeros(dev, &[rows, out_f])?;
            y.poison()?;
            let b = with_bias.then_some(&bt);
            with_cublas(if with_bias { 0 } else { 1 }, || {
                linear_forward(&xt, &wt, b, &mut y)
            })?;
            let mut want = vec![0.0; rows * out_f];
            linear_forward_host(
                &x64,
                &w64,
                with_bias.then_some(&b64[..]),
                &mut want,
                in_f,
                out_f,
            );
            close(
                &format!("linear_forward bias {with_bias}"),
                &y.to_vec()?,
                &want,
                in_f,
            )?;
        }
        let mut dx = Tensor::zeros(dev, &[rows, in_f])?;
        dx.poison()?;
        let mut dw = Tensor::from_slice(dev, &[out_f, in_f], &dw0)?;
        with_cublas(2, || {
            linear_backward(&xt, &wt, &dyt, Some(&mut dx), 0.0, &mut dw, None)
        })?;
        let mut dx_want = vec![0.0; rows * in_f];
        let mut dw_want = widen(&dw0);
        linear_backward_host(
            &x64,
            &w64,
            &dy64,
            Some(&mut dx_want),
            0.0,
            &mut dw_want,
            None,
            in_f,
        );
        close("linear_backward dx", &dx.to_vec()?, &dx_want, out_f)?;
        close("linear_backward dw", &dw.to_vec()?, &dw_want, rows)?;
        Ok(())
    });
}

// The same product twice on cuBLAS gives the same bits (one handle, one stream); `auto` sends
// f32 to cuBLAS and bf16 to our kernels; alpha = 0 and k = 0 stay on our kernels.
#[test]
fn cublas_repeats_bits_and_auto_routes() {
    on_cuda_with_cublas("cublas_repeats_bits_and_auto_routes", |dev| {
        let mut rng = Rng::for_test("cublas_repeats_bits_and_auto_routes");
        let (m, n, k) = (300, 170, 530);
        let a = rng.normal_vec(m * k, 1.0);
        let b = rng.normal_vec(k * n, 1.0);
        let at = Tensor::from_slice(dev, &[m, k], &a)?;
        let bt = Tensor::from_slice(dev, &[n, k], &b)?;
        let mut runs = Vec::new();
        for _ in 0..2 {
            let mut c = Tensor::zeros(dev, &[m, n])?;
            with_cublas(1, || gemm(false, true, m, n, k, 1.0, &at, &bt, 0.0, &mut c))?;
            runs.push(bits(&c.to_vec()?));
        }
        ensure!(runs[0] == runs[1], "cuBLAS f32 gemm differs between runs");

        set_backend(GemmBackend::Auto);
        let before = calls();
        let mut c = Tensor::zeros(dev, &[m, n])?;
        gemm(false, true, m, n, k, 1.0, &at, &bt, 0.0, &mut c)?;
        ensure!(calls() == before + 1, "auto must send f32 to cuBLAS");
        let h: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
        let hb: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
        let ah = Tensor::from_slice(dev, &[m, k], &h)?;
        let bh = Tensor::from_slice(dev, &[n, k], &hb)?;
        gemm_half(false, true, m, n, k, 1.0, &ah, &bh, 0.0, &mut c)?;
        ensure!(calls() == before + 1, "auto must keep bf16 on our kernels");

        // alpha = 0 reads neither A nor B: an inf in A must not turn C into NaN.
        set_backend(GemmBackend::Cublas);
        let mut a_inf = a.clone();
        a_inf[3] = f32::INFINITY;
        let ai = Tensor::from_slice(dev, &[m, k], &a_inf)?;
        let c0: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
        let mut c = Tensor::from_slice(dev, &[m, n], &c0)?;
        let before = calls();
        gemm(false, true, m, n, k, 0.0, &ai, &bt, 0.5, &mut c)?;
        ensure!(calls() == before, "alpha = 0 must stay on our kernel");
        let want: Vec<f32> = c0.iter().map(|v| 0.5 * v).collect();
        ensure!(c.to_vec()? == want, "alpha = 0 must give C = beta C");
        Ok(())
    });
}

// With the library treated as missing, cuBLAS selected falls back to our kernels: a correct
// result, no cuBLAS call, and a note that says why.
#[test]
fn cublas_missing_falls_back_with_a_note() {
    on_cuda_with_cublas("cublas_missing_falls_back_with_a_note", |dev| {
        let mut rng = Rng::for_test("cublas_missing_falls_back_with_a_note");
        let (m, n, k) = (65, 33, 17);
        let a = rng.normal_vec(m * k, 1.0);
        let b = rng.normal_vec(k * n, 1.0);
        let at = Tensor::from_slice(dev, &[m, k], &a)?;
        let bt = Tensor::from_slice(dev, &[k, n], &b)?;
        let mut c = Tensor::zeros(dev, &[m, n])?;
        c.poison()?;
        simulate_missing_library(true);
        let result = with_cublas(0, || {
            gemm(false, false, m, n, k, 1.0, &at, &bt, 0.0, &mut c)
        });
        simulate_missing_library(false);
        result?;
        let (want, bound) = expected(
            (false, false),
            (m, n, k),
            1.0,
            &widen(&a),
            &widen(&b),
            0.0,
            &vec![0.0; m * n],
        );
        check_bounded("fallback gemm", &c.to_vec()?, &want, &bound)?;
        let notes = notes();
        ensure!(
            notes
                .iter()
                .any(|n| n.contains("unavailable") && n.contains("using our GEMM kernels")),
            "no fallback note among {notes:?}"
        );
        Ok(())
    });
}
