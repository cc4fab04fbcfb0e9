//! Optimisers (src/optim.rs, cuda/optim.cu): every update rule on every device against the f64
//! twins, hand-computed values, weight decay, clipping, determinism, cpu/emu parity, checkpoint
//! round trips and their failure modes, and a quadratic that each optimiser must descend.

use anyhow::{ensure, Context, Result};
use hiermd::optim::{
    adam_atan2_update_host, adam_update_host, clip_scale, global_grad_norm, norm_partials_len,
    Decay, OptimConfig, OptimKind, Optimizer, Schedule, StepReport, UpdateStep,
};
use hiermd::testing::{assert_close, assert_close_each, AdamRounding, Rng};
use hiermd::{device_test, Device, Tensor};
use std::path::PathBuf;

/// Parameter shapes: a scalar, a ragged vector, a matrix, more than one block, an odd size.
const SHAPES: [&[usize]; 5] = [&[1], &[7], &[3, 100], &[1000], &[4099]];

/// Initial parameters and the gradients of every step, drawn once so that every run of a test
/// (devices, repeats, the reference) sees the same inputs.
struct Problem {
    shapes: Vec<Vec<usize>>,
    params: Vec<Vec<f32>>,
    /// grads[step][tensor]
    grads: Vec<Vec<Vec<f32>>>,
}

impl Problem {
    fn new(rng: &mut Rng, shapes: &[&[usize]], steps: usize, grad_scale: f64) -> Self {
        let lens: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        Self {
            shapes: shapes.iter().map(|s| s.to_vec()).collect(),
            params: lens.iter().map(|&n| rng.normal_vec(n, 1.0)).collect(),
            grads: (0..steps)
                .map(|_| {
                    lens.iter()
                        .map(|&n| rng.normal_vec(n, grad_scale))
                        .collect()
                })
                .collect(),
        }
    }
}

/// Parameters, m and v after a run, as host vectors per tensor.
struct State<T> {
    p: Vec<Vec<T>>,
    m: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn tensors(dev: &Device, shapes: &[Vec<usize>], data: &[Vec<f32>]) -> Result<Vec<Tensor<f32>>> {
    shapes
        .iter()
        .zip(data)
        .map(|(s, d)| Tensor::from_slice(dev, s, d))
        .collect()
}

/// Steps `opt` over `grads[from..to]`, uploading each step's gradients.
fn run_steps(
    opt: &mut Optimizer,
    params: &mut [Tensor<f32>],
    grad_t: &mut [Tensor<f32>],
    grads: &[Vec<Vec<f32>>],
) -> Result<Vec<StepReport>> {
    let mut reports = Vec::new();
    for step in grads {
        for (t, g) in grad_t.iter_mut().zip(step) {
            t.copy_from_slice(g)?;
        }
        let mut p: Vec<&mut Tensor<f32>> = params.iter_mut().collect();
        let g: Vec<&Tensor<f32>> = grad_t.iter().collect();
        reports.push(opt.step(&mut p, &g)?);
    }
    Ok(reports)
}

fn state_of(opt: &Optimizer, params: &[Tensor<f32>]) -> Result<State<f32>> {
    let mut s = State {
        p: vec![],
        m: vec![],
        v: vec![],
    };
    for (i, p) in params.iter().enumerate() {
        let (m, v) = opt.moments(i).context("moments")?;
        s.p.push(p.to_vec()?);
        s.m.push(m.to_vec()?);
        s.v.push(v.to_vec()?);
    }
    Ok(s)
}

/// `steps` optimiser steps on `dev`; returns the final state and the reports.
fn run_device(
    dev: &Device,
    config: &OptimConfig,
    pb: &Problem,
    steps: usize,
) -> Result<(State<f32>, Vec<StepReport>)> {
    let mut params = tensors(dev, &pb.shapes, &pb.params)?;
    let mut grad_t = tensors(dev, &pb.shapes, &pb.grads[0])?;
    let refs: Vec<&Tensor<f32>> = params.iter().collect();
    let mut opt = Optimizer::new(config.clone(), &refs)?;
    let reports = run_steps(&mut opt, &mut params, &mut grad_t, &pb.grads[..steps])?;
    Ok((state_of(&opt, &params)?, reports))
}

/// The f64 reference: the same steps through the f64 twins, with the norm and clip factor
/// computed in f64 straight from the gradients.
///
/// Also returns, for Adam and AdamW, the first-order rounding bounds of an f32 run
/// ([`AdamRounding`]) per tensor; None for AdamAtan2 (bounded update, no cancellation).
fn run_reference(
    config: &OptimConfig,
    pb: &Problem,
    steps: usize,
) -> (State<f64>, Vec<f64>, Option<Vec<AdamRounding>>) {
    let mut s = State {
        p: pb.params.iter().map(|p| to64(p)).collect(),
        m: pb.params.iter().map(|p| vec![0.0; p.len()]).collect(),
        v: pb.params.iter().map(|p| vec![0.0; p.len()]).collect(),
    };
    let mut rounding: Vec<AdamRounding> = pb
        .params
        .iter()
        .map(|p| AdamRounding::new(p.len()))
        .collect();
    let mut adam = false;
    let mut norms = Vec::new();
    for (t, grads) in pb.grads[..steps].iter().enumerate() {
        let g64: Vec<Vec<f64>> = grads.iter().map(|g| to64(g)).collect();
        let norm = g64.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
        norms.push(norm);
        let scale = config.clip_norm.map_or(1.0, |c| clip_scale(norm, c));
        let lr = config.schedule.lr(config.lr, t as u64);
        let step = UpdateStep::new(config, lr, t as u64 + 1, scale);
        for (i, g) in g64.iter().enumerate() {
            match &step {
                UpdateStep::Adam(a) => {
                    adam = true;
                    rounding[i].step(&s.p[i], g, &s.m[i], &s.v[i], a);
                    adam_update_host(&mut s.p[i], g, &mut s.m[i], &mut s.v[i], a)
                }
                UpdateStep::AdamAtan2(a) => {
                    adam_atan2_update_host(&mut s.p[i], g, &mut s.m[i], &mut s.v[i], a)
                }
            }
        }
    }
    (s, norms, adam.then_some(rounding))
}

/// The configurations every test runs: each rule, each kind of weight decay, clipping that
/// bites, and a schedule with warm-up and decay.
fn configs() -> Vec<(&'static str, OptimConfig)> {
    let schedule = Schedule {
        warmup_steps: 2,
        decay: Decay::Exponential {
            gamma: 0.9,
            every_steps: 2,
        },
    };
    vec![
        ("adam", OptimConfig::adam(1e-2)),
        (
            "adam+l2+clip",
            OptimConfig {
                weight_decay: 0.1,
                clip_norm: Some(5.0),
                ..OptimConfig::adam(1e-2)
            },
        ),
        (
            "adamw+schedule",
            OptimConfig {
                schedule,
                ..OptimConfig::adamw(1e-2, 0.05)
            },
        ),
        ("adam_atan2", OptimConfig::adam_atan2(1e-2)),
        (
            "adam_atan2+wd+clip+schedule",
            OptimConfig {
                weight_decay: 0.1,
                clip_norm: Some(5.0),
                schedule,
                atan2_a: 1.1,
                atan2_b: 0.7,
                ..OptimConfig::adam_atan2(1e-2)
            },
        ),
    ]
}

/// f32 against the f64 reference after `steps` steps: each step adds a few ulps of |p| and a few
/// ulps of the update (|update| <= ~lr), so the error grows linearly with the steps; for Adam,
/// twice the element's own rounding bound on top (`rounding`: coupled L2 decay can cancel the
/// gradient read to almost nothing, which Adam's normalisation then magnifies).
fn check_state(
    what: &str,
    got: &State<f32>,
    want: &State<f64>,
    rounding: Option<&[AdamRounding]>,
    steps: usize,
) -> Result<()> {
    let k = steps as f64;
    let twice = |b: &[f64]| b.iter().map(|x| 2.0 * x).collect::<Vec<f64>>();
    for i in 0..got.p.len() {
        let [ep, em, ev] = match rounding {
            Some(r) => [twice(&r[i].p), twice(&r[i].m), twice(&r[i].v)],
            None => Default::default(),
        };
        let close = |part: &str, g: &[f32], w: &[f64], atol, rtol, extra: &[f64]| {
            assert_close_each(&format!("{what} {part} {i}"), g, w, atol, rtol, extra)
        };
        close("param", &got.p[i], &want.p[i], k * 1e-7, k * 3e-7, &ep)?;
        close("m", &got.m[i], &want.m[i], 1e-7, 2e-6, &em)?;
        close("v", &got.v[i], &want.v[i], 1e-7, 2e-6, &ev)?;
    }
    Ok(())
}

device_test!(updates_match_f64_reference, |dev| {
    let mut rng = Rng::for_test("updates_match_f64_reference");
    let steps = 6;
    for (name, config) in configs() {
        let pb = Problem::new(&mut rng, &SHAPES, steps, 1.0);
        let (got, reports) = run_device(dev, &config, &pb, steps)?;
        let (want, norms, rounding) = run_reference(&config, &pb, steps);
        check_state(name, &got, &want, rounding.as_deref(), steps)?;
        for (t, (r, norm)) in reports.iter().zip(&norms).enumerate() {
            ensure!(
                (r.grad_norm - norm).abs() <= 1e-12 * norm,
                "{name} step {t}: grad norm {} vs reference {norm}",
                r.grad_norm
            );
            ensure!(
                r.lr == config.schedule.lr(config.lr, t as u64),
                "{name}: lr"
            );
        }
    }
    Ok(())
});

device_test!(adam_atan2_matches_hand_computed_values, |dev| {
    // adam_atan2_pytorch.AdamAtan2, lr 0.01, betas (0.9, 0.99), wd 0.1, a 1.27, b 1:
    // step 1 with g = 0.3, p = 0.5: m = 0.03, v = 0.0009, m_hat = 0.3, v_hat = 0.09,
    //   p = 0.5 (1 - 0.001) - 0.01 * 1.27 * atan2(0.3, 0.3) = 0.4995 - 0.0127 pi/4.
    // g = 0 gives atan2(0, 0) = 0: decay only (no eps, no NaN); g < 0 mirrors g > 0.
    let config = OptimConfig {
        weight_decay: 0.1,
        ..OptimConfig::adam_atan2(0.01)
    };
    let p0 = [0.5f32, 0.5, -2.0];
    let g1 = [0.3f32, -0.3, 0.0];
    let mut p = Tensor::from_slice(dev, &[3], &p0)?;
    let mut g = Tensor::from_slice(dev, &[3], &g1)?;
    let mut opt = Optimizer::new(config.clone(), &[&p])?;
    opt.step(&mut [&mut p], &[&g])?;
    let quarter = 0.0127 * std::f64::consts::FRAC_PI_4;
    let want1 = [0.4995 - quarter, 0.4995 + quarter, -2.0 * 0.999];
    assert_close("adam_atan2 step 1", &p.to_vec()?, &want1, 1e-7, 1e-6)?;
    assert_close(
        "adam_atan2 step 1 m",
        &opt.moments(0).context("m")?.0.to_vec()?,
        &[0.03, -0.03, 0.0],
        1e-9,
        1e-6,
    )?;

    // Step 2 with g = -0.1 (each element), from the formula in plain f64.
    let g2 = [-0.1f32; 3];
    g.copy_from_slice(&g2)?;
    opt.step(&mut [&mut p], &[&g])?;
    let (b1, b2): (f64, f64) = (0.9, 0.99);
    let want2: Vec<f64> = (0..3)
        .map(|i| {
            let (g1, g2) = (g1[i] as f64, g2[i] as f64);
            let m = b1 * (1.0 - b1) * g1 + (1.0 - b1) * g2;
            let v = b2 * (1.0 - b2) * g1 * g1 + (1.0 - b2) * g2 * g2;
            let (m_hat, v_hat) = (m / (1.0 - b1 * b1), v / (1.0 - b2 * b2));
            want1[i] * (1.0 - 0.01 * 0.1) - 0.01 * 1.27 * m_hat.atan2(v_hat.sqrt())
        })
        .collect();
    assert_close("adam_atan2 step 2", &p.to_vec()?, &want2, 1e-7, 1e-6)?;
    Ok(())
});

device_test!(adam_first_step_is_lr_times_sign, |dev| {
    // Step 1: m_hat = g, v_hat = g^2, so p -= lr g / (|g| + eps).
    let g = [0.25f32, -4.0, 1e-3, 0.0];
    let mut p = Tensor::from_slice(dev, &[4], &[1.0f32; 4])?;
    let gt = Tensor::from_slice(dev, &[4], &g)?;
    let mut opt = Optimizer::new(OptimConfig::adam(0.1), &[&p])?;
    opt.step(&mut [&mut p], &[&gt])?;
    let want: Vec<f64> = g
        .iter()
        .map(|&g| 1.0 - 0.1 * g as f64 / ((g as f64).abs() + 1e-8))
        .collect();
    assert_close("adam step 1", &p.to_vec()?, &want, 1e-7, 1e-6)?;
    Ok(())
});

device_test!(
    weight_decay_is_coupled_for_adam_and_decoupled_otherwise,
    |dev| {
        // With zero gradients the decoupled rules only decay, p_k = p0 (1 - lr wd)^k, while Adam's
        // L2 term becomes the gradient (g = wd p), written out here in plain f64.
        let (lr, wd, steps) = (0.1, 0.5, 3);
        let p0 = [1.0f32, -2.0, 0.25];
        let zeros = Tensor::from_slice(dev, &[3], &[0.0f32; 3])?;
        for config in [
            OptimConfig::adamw(lr, wd),
            OptimConfig {
                weight_decay: wd,
                ..OptimConfig::adam_atan2(lr)
            },
            OptimConfig {
                weight_decay: wd,
                ..OptimConfig::adam(lr)
            },
        ] {
            let mut p = Tensor::from_slice(dev, &[3], &p0)?;
            let mut opt = Optimizer::new(config.clone(), &[&p])?;
            for _ in 0..steps {
                opt.step(&mut [&mut p], &[&zeros])?;
            }
            let (b1, b2) = config.betas;
            let want: Vec<f64> = p0
                .iter()
                .map(|&p| {
                    let mut p = p as f64;
                    if config.kind != OptimKind::Adam {
                        return p * (1.0 - lr * wd).powi(steps);
                    }
                    let (mut m, mut v) = (0.0, 0.0);
                    for t in 1..=steps {
                        let g = wd * p;
                        m = b1 * m + (1.0 - b1) * g;
                        v = b2 * v + (1.0 - b2) * g * g;
                        let m_hat = m / (1.0 - b1.powi(t));
                        let v_hat = v / (1.0 - b2.powi(t));
                        p -= lr * m_hat / (v_hat.sqrt() + 1e-8);
                    }
                    p
                })
                .collect();
            assert_close(
                &format!("{:?} weight decay", config.kind),
                &p.to_vec()?,
                &want,
                1e-6,
                1e-6,
            )?;
        }
        Ok(())
    }
);

device_test!(grad_norm_is_exact_and_deterministic, |dev| {
    let mut rng = Rng::for_test("grad_norm_is_exact_and_deterministic");
    // 300_000 elements need more than the 1024-block cap, so threads stride.
    let lens = [1usize, 33, 256, 257, 300_000];
    let data: Vec<Vec<f32>> = lens.iter().map(|&n| rng.normal_vec(n, 2.0)).collect();
    let grads: Vec<Tensor<f32>> = data
        .iter()
        .map(|d| Tensor::from_slice(dev, &[d.len()], d))
        .collect::<Result<_>>()?;
    let refs: Vec<&Tensor<f32>> = grads.iter().collect();
    let mut partials = Tensor::<f64>::zeros(dev, &[norm_partials_len(lens)])?;
    partials.poison()?;
    let norm = global_grad_norm(&refs, &mut partials)?;
    let want = data
        .iter()
        .flatten()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    ensure!(
        (norm - want).abs() <= 1e-12 * want,
        "norm {norm} vs f64 reference {want}"
    );
    partials.poison()?;
    let again = global_grad_norm(&refs, &mut partials)?;
    ensure!(
        again.to_bits() == norm.to_bits(),
        "norm not reproducible: {norm:e} then {again:e}"
    );
    Ok(())
});

device_test!(clipping_scales_the_gradients, |dev| {
    let mut rng = Rng::for_test("clipping_scales_the_gradients");
    let pb = Problem::new(&mut rng, &SHAPES, 1, 1.0);
    let norm = pb
        .grads
        .iter()
        .flatten()
        .flatten()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt();
    for (max_norm, clipped) in [(norm / 4.0, true), (norm * 2.0, false)] {
        let config = OptimConfig {
            clip_norm: Some(max_norm),
            ..OptimConfig::adam(1e-3)
        };
        let (state, reports) = run_device(dev, &config, &pb, 1)?;
        let r = reports[0];
        let scale = if clipped {
            max_norm / (norm + 1e-6)
        } else {
            1.0
        };
        ensure!(
            r.clipped == clipped && (r.grad_scale - scale).abs() <= 1e-12,
            "clip to {max_norm}: report {r:?}, expected scale {scale}"
        );
        // The first m is (1 - beta1) * scale * g: the scale the kernel applied.
        for (i, m) in state.m.iter().enumerate() {
            let want: Vec<f64> = pb.grads[0][i]
                .iter()
                .map(|&g| 0.1 * scale * g as f64)
                .collect();
            assert_close(&format!("clipped m {i}"), m, &want, 1e-8, 1e-6)?;
        }
    }
    Ok(())
});

fn same_bits(what: &str, a: &[Vec<f32>], b: &[Vec<f32>]) -> Result<()> {
    for (i, (a, b)) in a.iter().zip(b).enumerate() {
        if let Some(j) = (0..a.len()).find(|&j| a[j].to_bits() != b[j].to_bits()) {
            anyhow::bail!("{what}: tensor {i} element {j}: {} vs {}", a[j], b[j]);
        }
    }
    Ok(())
}

device_test!(ten_steps_are_bit_identical_run_to_run, |dev| {
    let mut rng = Rng::for_test("ten_steps_are_bit_identical_run_to_run");
    for (name, config) in configs() {
        let pb = Problem::new(&mut rng, &SHAPES, 10, 1.0);
        let (a, _) = run_device(dev, &config, &pb, 10)?;
        let (b, _) = run_device(dev, &config, &pb, 10)?;
        same_bits(&format!("{name} params"), &a.p, &b.p)?;
        same_bits(&format!("{name} m"), &a.m, &b.m)?;
        same_bits(&format!("{name} v"), &a.v, &b.v)?;
    }
    Ok(())
});

#[test]
fn cpu_and_emu_agree() -> Result<()> {
    let mut rng = Rng::for_test("cpu_and_emu_agree");
    let (cpu, emu) = (Device::Cpu, Device::emu());
    for (name, config) in configs() {
        let pb = Problem::new(&mut rng, &SHAPES, 10, 1.0);
        let (c, _) = run_device(&cpu, &config, &pb, 10)?;
        let (e, _) = run_device(&emu, &config, &pb, 10)?;
        for i in 0..c.p.len() {
            // Two f32 implementations: the f32-vs-f64 tolerance of each, twice.
            assert_close(
                &format!("{name} cpu/emu p {i}"),
                &e.p[i],
                &to64(&c.p[i]),
                2e-6,
                6e-6,
            )?;
            assert_close(
                &format!("{name} cpu/emu m {i}"),
                &e.m[i],
                &to64(&c.m[i]),
                2e-7,
                4e-6,
            )?;
            assert_close(
                &format!("{name} cpu/emu v {i}"),
                &e.v[i],
                &to64(&c.v[i]),
                2e-7,
                4e-6,
            )?;
        }
    }
    Ok(())
}

/// A fresh path in the system temp folder, removed (with its folder) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str, dev: &Device) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "hiermd-optim-{test}-{}-{}-{}",
            dev.name().replace(':', "_"),
            std::process::id(),
            Rng::for_test(test).next_u64()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

device_test!(checkpoint_round_trip_is_bit_exact, |dev| {
    let mut rng = Rng::for_test("checkpoint_round_trip_is_bit_exact");
    let dir = TempDir::new("round_trip", dev)?;
    for (name, config) in configs() {
        let pb = Problem::new(&mut rng, &SHAPES, 10, 1.0);
        let (whole, _) = run_device(dev, &config, &pb, 10)?;

        let mut params = tensors(dev, &pb.shapes, &pb.params)?;
        let mut grad_t = tensors(dev, &pb.shapes, &pb.grads[0])?;
        let refs: Vec<&Tensor<f32>> = params.iter().collect();
        let mut first = Optimizer::new(config.clone(), &refs)?;
        run_steps(&mut first, &mut params, &mut grad_t, &pb.grads[..5])?;
        let path = dir.file("optim.safetensors");
        first.save(&path)?;
        // Saving again over the file leaves only the file: no temporary is left behind.
        first.save(&path)?;
        let files: Vec<_> = std::fs::read_dir(&dir.0)?.collect::<std::io::Result<_>>()?;
        ensure!(
            files.len() == 1,
            "{name}: folder holds {} files",
            files.len()
        );
        drop(first);

        // A fresh optimiser with another config: load restores the checkpoint's.
        let refs: Vec<&Tensor<f32>> = params.iter().collect();
        let mut resumed = Optimizer::new(OptimConfig::adam(0.5), &refs)?;
        resumed.load(&path)?;
        ensure!(resumed.steps() == 5, "{name}: {} steps", resumed.steps());
        ensure!(resumed.config() == &config, "{name}: config not restored");
        run_steps(&mut resumed, &mut params, &mut grad_t, &pb.grads[5..10])?;
        let split = state_of(&resumed, &params)?;
        same_bits(&format!("{name} resumed params"), &split.p, &whole.p)?;
        same_bits(&format!("{name} resumed m"), &split.m, &whole.m)?;
        same_bits(&format!("{name} resumed v"), &split.v, &whole.v)?;
    }
    Ok(())
});

fn expect_error(what: &str, r: Result<()>, needle: &str) -> Result<()> {
    match r {
        Ok(()) => anyhow::bail!("{what}: loaded without error"),
        Err(e) => {
            let msg = format!("{e:#}");
            ensure!(
                msg.contains(needle),
                "{what}: error {msg:?} lacks {needle:?}"
            );
            Ok(())
        }
    }
}

device_test!(bad_checkpoints_fail_clearly, |dev| {
    let dir = TempDir::new("bad_checkpoints", dev)?;
    let a = Tensor::from_slice(dev, &[2, 3], &[1.0f32; 6])?;
    let b = Tensor::from_slice(dev, &[4], &[1.0f32; 4])?;
    let g = [
        Tensor::from_slice(dev, &[2, 3], &[0.5f32; 6])?,
        Tensor::from_slice(dev, &[4], &[0.5f32; 4])?,
    ];
    let mut opt = Optimizer::named(OptimConfig::adam(0.1), &["w", "b"], &[&a, &b])?;
    let (mut a2, mut b2) = (a.to_device(dev)?, b.to_device(dev)?);
    opt.step(&mut [&mut a2, &mut b2], &[&g[0], &g[1]])?;
    let good = dir.file("good.safetensors");
    opt.save(&good)?;
    let bytes = std::fs::read(&good)?;

    let fresh = || Optimizer::named(OptimConfig::adam(0.1), &["w", "b"], &[&a, &b]);
    expect_error(
        "missing file",
        fresh()?.load(dir.file("absent.safetensors")),
        "absent.safetensors",
    )?;
    let truncated = dir.file("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() - 7])?;
    expect_error(
        "truncated",
        fresh()?.load(&truncated),
        "truncated or corrupt",
    )?;
    let garbage = dir.file("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a checkpoint")?;
    expect_error("garbage", fresh()?.load(&garbage), "truncated or corrupt")?;

    // Another model: a parameter of another shape, an extra one, a missing one.
    let a_wide = Tensor::from_slice(dev, &[3, 2], &[1.0f32; 6])?;
    expect_error(
        "shape",
        Optimizer::named(OptimConfig::adam(0.1), &["w", "b"], &[&a_wide, &b])?.load(&good),
        "tensor \"w.m\" has shape [2, 3], parameter \"w\" has shape [3, 2]",
    )?;
    expect_error(
        "missing",
        Optimizer::named(OptimConfig::adam(0.1), &["w", "b", "c"], &[&a, &b, &b])?.load(&good),
        "tensor \"c.m\" is missing",
    )?;
    expect_error(
        "extra",
        Optimizer::named(OptimConfig::adam(0.1), &["w"], &[&a])?.load(&good),
        "tensor \"b.m\" is not a moment",
    )?;

    // Hand-written files: f64 moments; no hiermd metadata.
    let f64_bytes: Vec<u8> = [0.0f64; 6].iter().flat_map(|x| x.to_le_bytes()).collect();
    let f32_bytes: Vec<u8> = [0.0f32; 6].iter().flat_map(|x| x.to_le_bytes()).collect();
    let f32_4: Vec<u8> = [0.0f32; 4].iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = |dtype, shape: &[usize], data| {
        safetensors::tensor::TensorView::new(dtype, shape.to_vec(), data)
    };
    let header = safetensors::SafeTensors::read_metadata(&bytes)?.1;
    let meta = header.metadata().clone();
    let wrong_dtype = safetensors::serialize(
        [
            ("w.m", view(safetensors::Dtype::F64, &[2, 3], &f64_bytes)?),
            ("w.v", view(safetensors::Dtype::F32, &[2, 3], &f32_bytes)?),
            ("b.m", view(safetensors::Dtype::F32, &[4], &f32_4)?),
            ("b.v", view(safetensors::Dtype::F32, &[4], &f32_4)?),
        ],
        meta,
    )?;
    let path = dir.file("f64.safetensors");
    std::fs::write(&path, wrong_dtype)?;
    expect_error(
        "dtype",
        fresh()?.load(&path),
        "tensor \"w.m\" is F64, expected F32",
    )?;
    let no_meta = safetensors::serialize(
        [("w.m", view(safetensors::Dtype::F32, &[2, 3], &f32_bytes)?)],
        None,
    )?;
    std::fs::write(&path, no_meta)?;
    expect_error(
        "metadata",
        fresh()?.load(&path),
        "not a hiermd optimizer checkpoint",
    )?;

    // A failed load changes nothing.
    let mut o = fresh()?;
    let _ = o.load(&truncated);
    ensure!(
        o.steps() == 0,
        "failed load changed the step count to {}",
        o.steps()
    );
    Ok(())
});

device_test!(
    non_finite_gradients_fail_the_step_and_change_nothing,
    |dev| {
        let mut p = Tensor::from_slice(dev, &[3], &[1.0f32, 2.0, 3.0])?;
        let g = Tensor::from_slice(dev, &[3], &[0.1f32, f32::NAN, 0.2])?;
        let mut opt = Optimizer::new(OptimConfig::adam(0.1), &[&p])?;
        let err = opt
            .step(&mut [&mut p], &[&g])
            .expect_err("NaN gradient must fail");
        ensure!(
            format!("{err:#}").contains("gradient norm is NaN"),
            "{err:#}"
        );
        ensure!(opt.steps() == 0, "step count moved");
        ensure!(p.to_vec()? == vec![1.0, 2.0, 3.0], "parameters changed");
        Ok(())
    }
);

device_test!(quadratic_loss_falls_with_every_optimizer, |dev| {
    // loss = 1/2 sum c_i (x_i - t_i)^2, gradient c (x - t), computed on the host each step.
    let mut rng = Rng::for_test("quadratic_loss_falls_with_every_optimizer");
    let n = 64;
    let target: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let curv: Vec<f64> = (0..n).map(|_| rng.range(0.5, 2.0)).collect();
    let x0 = rng.normal_vec(n, 1.0);
    let loss = |x: &[f32]| -> f64 {
        (0..n)
            .map(|i| 0.5 * curv[i] * (x[i] as f64 - target[i]).powi(2))
            .sum()
    };
    for config in [
        OptimConfig::adam(0.05),
        OptimConfig::adamw(0.05, 0.01),
        OptimConfig::adam_atan2(0.05),
    ] {
        let mut x = Tensor::from_slice(dev, &[n], &x0)?;
        let mut g = Tensor::zeros(dev, &[n])?;
        let mut opt = Optimizer::new(config.clone(), &[&x])?;
        let start = loss(&x0);
        for _ in 0..150 {
            let xv = x.to_vec()?;
            let gv: Vec<f32> = (0..n)
                .map(|i| (curv[i] * (xv[i] as f64 - target[i])) as f32)
                .collect();
            g.copy_from_slice(&gv)?;
            opt.step(&mut [&mut x], &[&g])?;
        }
        let end = loss(&x.to_vec()?);
        ensure!(
            end < 0.02 * start,
            "{:?}: loss {start:.4} -> {end:.4}, expected a fall below 2%",
            config.kind
        );
    }
    Ok(())
});

#[test]
fn schedules_warm_up_and_decay() {
    let s = Schedule {
        warmup_steps: 4,
        decay: Decay::Exponential {
            gamma: 0.5,
            every_steps: 3,
        },
    };
    let lrs: Vec<f64> = (0..11).map(|t| s.lr(1.0, t)).collect();
    let want = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25];
    assert_eq!(lrs, want);
    assert_eq!(Schedule::default().lr(0.3, 1_000_000), 0.3);
    let per_step = Schedule {
        warmup_steps: 0,
        decay: Decay::Exponential {
            gamma: 0.9,
            every_steps: 1,
        },
    };
    assert!((per_step.lr(2.0, 3) - 2.0 * 0.9f64.powi(3)).abs() < 1e-15);
}

#[test]
fn config_reads_from_toml_and_rejects_bad_values() -> Result<()> {
    let text = r#"
        kind = "adam_atan2"
        lr = 1e-4
        betas = [0.9, 0.99]
        weight_decay = 0.01
        clip_norm = 1.0
        schedule = { warmup_steps = 100, decay = { kind = "exponential", gamma = 0.99, every_steps = 500 } }
    "#;
    let c: OptimConfig = toml::from_str(text)?;
    c.validate()?;
    ensure!(c.kind == OptimKind::AdamAtan2 && c.atan2_a == 1.27 && c.atan2_b == 1.0);
    ensure!(c.schedule.warmup_steps == 100 && c.clip_norm == Some(1.0));
    let back: OptimConfig = toml::from_str(&toml::to_string(&c)?)?;
    ensure!(back == c, "TOML round trip changed the config");
    let minimal: OptimConfig =
        toml::from_str("kind = \"adamw\"\nlr = 0.001\nbetas = [0.9, 0.999]")?;
    ensure!(minimal.eps == 1e-8 && minimal.schedule == Schedule::default());
    ensure!(toml::from_str::<OptimConfig>("kind = \"sgd\"\nlr = 1\nbetas = [0, 0]").is_err());
    ensure!(toml::from_str::<OptimConfig>(
        "kind = \"adam\"\nlr = 1\nbetas = [0, 0]\nlearning_rate = 2"
    )
    .is_err());

    for (bad, field) in [
        (OptimConfig::adam(-1.0), "lr"),
        (
            OptimConfig {
                betas: (0.9, 1.0),
                ..OptimConfig::adam(1e-3)
            },
            "betas[1]",
        ),
        (
            OptimConfig {
                clip_norm: Some(0.0),
                ..OptimConfig::adam(1e-3)
            },
            "clip_norm",
        ),
    ] {
        let e = bad.validate().expect_err("invalid config accepted");
        ensure!(
            format!("{e:#}").contains(field),
            "{e:#} does not name {field}"
        );
        let p = Tensor::from_slice(&Device::Cpu, &[1], &[0.0f32])?;
        ensure!(Optimizer::new(bad, &[&p]).is_err());
    }
    Ok(())
}
