//! The tape (src/tape.rs) and the token model (src/model/token.rs) on every device: gradients
//! against finite differences through the whole model, rotation equivariance, bit-identical
//! training with one seed, agreement between devices, and the tape's bookkeeping.

use anyhow::{ensure, Context, Result};
use hiermd::model::{TokenBatch, TokenModel, TokenModelConfig};
use hiermd::nn::layers::{GraphConvKind, Linear};
use hiermd::optim::{OptimConfig, Optimizer};
use hiermd::tape::{Init, ParamStore, Tape, Var};
use hiermd::testing::{assert_close, central_difference, Rng};
use hiermd::{device_test, Device, Tensor};

/// Which attention the small models use: the fused kernel needs head width 8, 16, 32 or 64, so its
/// models are wider.
#[derive(Clone, Copy, Debug)]
enum Attn {
    Fused,
    Materialised,
}

/// A small model with every optional part switched on (fused attention).
fn small_config(graph: Option<GraphConvKind>, window: usize, dropout: f32) -> TokenModelConfig {
    config_with(graph, window, dropout, Attn::Fused)
}

fn config_with(
    graph: Option<GraphConvKind>,
    window: usize,
    dropout: f32,
    attn: Attn,
) -> TokenModelConfig {
    let (hidden, attention) = match attn {
        Attn::Fused => (32, "fused"),
        Attn::Materialised => (8, "materialised"),
    };
    TokenModelConfig::from_toml(&format!(
        r#"
        input_channels = 6
        hidden = {hidden}
        heads = 2
        attention = "{attention}"
        blocks = 2
        window = {window}
        {}
        pooling = "mean"
        dropout = {dropout}
        output = 3
        seed = 7
        "#,
        match graph {
            Some(GraphConvKind::Cheap) => "graph_conv = \"cheap\"",
            Some(GraphConvKind::Gated) => "graph_conv = \"gated\"\ngraph_rbf = 5",
            None => "",
        }
    ))
    .unwrap()
}

/// Random residue tokens for `b` frames of `r` residues: C-alpha atoms 3.8 A apart along a
/// random walk (so each has a few neighbours within 8 A), optionally with padding at the end of
/// the second frame.
struct Inputs {
    s: Vec<f32>,
    v: Vec<f32>,
    ca: Vec<f32>,
    mask: Option<Vec<u8>>,
    b: usize,
    r: usize,
    h: usize,
}

impl Inputs {
    fn random(rng: &mut Rng, b: usize, r: usize, h: usize, padded: bool) -> Self {
        let mut ca = Vec::with_capacity(b * r * 3);
        for _ in 0..b {
            let mut p = [0.0f64; 3];
            for _ in 0..r {
                let d: Vec<f64> = (0..3).map(|_| rng.normal()).collect();
                let n = (d.iter().map(|x| x * x).sum::<f64>()).sqrt().max(1e-9);
                for k in 0..3 {
                    p[k] += 3.8 * d[k] / n;
                    ca.push(p[k] as f32);
                }
            }
        }
        let mask = padded.then(|| {
            let mut m = vec![1u8; b * r];
            for t in r - r / 3..r {
                m[r + t] = 0; // frame 1 is shorter
            }
            m
        });
        Self {
            s: rng.normal_vec(b * r * h, 1.0),
            v: rng.normal_vec(b * r * 3 * h, 1.0),
            ca,
            mask,
            b,
            r,
            h,
        }
    }

    fn batch(&self, dev: &Device) -> Result<TokenBatch> {
        Ok(TokenBatch {
            s: Tensor::from_slice(dev, &[self.b, self.r, self.h], &self.s)?.into(),
            v: Tensor::from_slice(dev, &[self.b, self.r, 3, self.h], &self.v)?.into(),
            ca: Some(self.ca.clone()),
            mask: self.mask.clone(),
        })
    }

    /// The same frames rotated by `rot` (vectors and C-alpha positions).
    fn rotated(&self, rot: &[[f64; 3]; 3]) -> Self {
        let mut v = self.v.clone();
        let h = self.h;
        for n in 0..self.b * self.r {
            for c in 0..h {
                let x: Vec<f64> = (0..3).map(|k| self.v[(n * 3 + k) * h + c] as f64).collect();
                for i in 0..3 {
                    v[(n * 3 + i) * h + c] = (0..3).map(|k| rot[i][k] * x[k]).sum::<f64>() as f32;
                }
            }
        }
        let ca = self
            .ca
            .chunks(3)
            .flat_map(|p| {
                (0..3).map(move |i| (0..3).map(|k| rot[i][k] * p[k] as f64).sum::<f64>() as f32)
            })
            .collect();
        Self {
            s: self.s.clone(),
            v,
            ca,
            mask: self.mask.clone(),
            ..*self
        }
    }
}

/// Runs the model once and returns (output, final token scalars, final token vectors).
fn run(
    model: &TokenModel,
    tape: &mut Tape,
    inputs: &Inputs,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    tape.reset();
    let out = model.forward(tape, &inputs.batch(tape.device())?)?;
    Ok((
        tape.value(out.out).to_vec()?,
        tape.value(out.s).to_vec()?,
        tape.value(out.v).to_vec()?,
    ))
}

/// L = sum(w * out) for fixed weights w, and its gradient by the tape.
fn loss_and_grads(
    model: &TokenModel,
    tape: &mut Tape,
    inputs: &Inputs,
    w: &[f32],
) -> Result<(f64, Vec<Vec<f32>>)> {
    tape.reset();
    tape.params_mut().zero_grads()?;
    let out = model.forward(tape, &inputs.batch(tape.device())?)?;
    let y = tape.value(out.out).to_vec()?;
    let loss = y.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum();
    let seed = Tensor::from_slice(tape.device(), tape.shape(out.out), w)?;
    tape.backward(out.out, seed)?;
    let ps = tape.params();
    let grads = (0..ps.len())
        .map(|i| ps.grad(ps.id(&ps.names()[i]).unwrap()).to_vec())
        .collect::<Result<_>>()?;
    Ok((loss, grads))
}

/// The loss after moving every parameter by `eps * dir`.
fn loss_at(
    model: &TokenModel,
    tape: &mut Tape,
    inputs: &Inputs,
    w: &[f32],
    base: &[Vec<f32>],
    dir: &[Vec<f32>],
    eps: f64,
) -> Result<f64> {
    let names = tape.params().names().to_vec();
    for (i, n) in names.iter().enumerate() {
        let id = tape.params().id(n).unwrap();
        let moved: Vec<f32> = base[i]
            .iter()
            .zip(&dir[i])
            .map(|(&p, &d)| (p as f64 + eps * d as f64) as f32)
            .collect();
        tape.params_mut().value_mut(id).copy_from_slice(&moved)?;
    }
    tape.reset();
    let out = model.forward(tape, &inputs.batch(tape.device())?)?;
    let y = tape.value(out.out).to_vec()?;
    Ok(y.iter().zip(w).map(|(&a, &b)| a as f64 * b as f64).sum())
}

fn model_on(dev: &Device, config: TokenModelConfig) -> Result<(TokenModel, Tape)> {
    let (model, ps) = TokenModel::create(config, dev)?;
    let mut tape = Tape::new(ps, 11);
    tape.set_poison(true);
    Ok((model, tape))
}

/// Directional finite differences of the whole model: for each parameter tensor, a random
/// direction confined to it, and one direction over all of them. In f32 a per-coordinate check
/// drowns in rounding; a directional derivative sums many coordinates' contributions, so a
/// wrong gradient in any one tensor still shows.
fn check_model_gradient(dev: &Device, config: TokenModelConfig, test: &str) -> Result<()> {
    let mut rng = Rng::for_test(test);
    let inputs = Inputs::random(&mut rng, 2, 11, config.input_channels, true);
    let (model, mut tape) = model_on(dev, config)?;
    // Dropout masks depend on the step: keep them fixed by evaluating every loss at one step.
    tape.set_training(false);
    let w = rng.normal_vec(2 * model.config().output, 1.0);
    let (_, grads) = loss_and_grads(&model, &mut tape, &inputs, &w)?;
    let names = tape.params().names().to_vec();
    let base: Vec<Vec<f32>> = names
        .iter()
        .map(|n| tape.params().value(tape.params().id(n).unwrap()).to_vec())
        .collect::<Result<_>>()?;
    let eps = 2e-3;
    let mut directions: Vec<(String, Vec<Vec<f32>>)> = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let dir = base
            .iter()
            .enumerate()
            .map(|(j, b)| {
                if j == i {
                    rng.normal_vec(b.len(), 1.0)
                } else {
                    vec![0.0; b.len()]
                }
            })
            .collect();
        directions.push((n.clone(), dir));
    }
    directions.push((
        "all parameters".into(),
        base.iter().map(|b| rng.normal_vec(b.len(), 1.0)).collect(),
    ));
    for (what, dir) in &directions {
        let analytic: f64 = grads
            .iter()
            .zip(dir)
            .map(|(g, d)| {
                g.iter()
                    .zip(d)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
            })
            .sum();
        let (fd, fd_err) = central_difference(
            |e| loss_at(&model, &mut tape, &inputs, &w, &base, dir, e),
            eps,
        )?;
        let scale: f64 = dir
            .iter()
            .zip(&grads)
            .map(|(d, g)| {
                d.iter()
                    .zip(g)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum::<f64>()
            })
            .sum::<f64>()
            .max(1e-2);
        ensure!(
            (fd - analytic).abs() <= 2e-2 * scale + fd_err,
            "{what}: directional derivative by the tape {analytic:.6e}, by finite differences {fd:.6e} (scale {scale:.3e}, the difference's own error {fd_err:.1e})"
        );
    }
    Ok(())
}

device_test!(whole_model_gradient_matches_finite_differences, |dev| {
    check_model_gradient(
        dev,
        small_config(Some(GraphConvKind::Gated), 2, 0.1),
        "whole_model_gradient_gated",
    )?;
    check_model_gradient(
        dev,
        small_config(Some(GraphConvKind::Cheap), 3, 0.0),
        "whole_model_gradient_cheap",
    )?;
    check_model_gradient(
        dev,
        small_config(None, 1, 0.0),
        "whole_model_gradient_plain",
    )?;
    check_model_gradient(
        dev,
        config_with(Some(GraphConvKind::Gated), 2, 0.1, Attn::Materialised),
        "whole_model_gradient_materialised",
    )
});

device_test!(fused_and_materialised_attention_agree, |dev| {
    // The same parameters through both attention paths: outputs and gradients agree.
    let mut rng = Rng::for_test("fused_and_materialised_attention_agree");
    let fused = small_config(Some(GraphConvKind::Cheap), 2, 0.0);
    let mut mat = fused.clone();
    mat.attention = hiermd::nn::layers::AttentionKind::Materialised;
    let inputs = Inputs::random(&mut rng, 2, 17, fused.input_channels, true);
    let w = rng.normal_vec(2 * fused.output, 1.0);
    let (mf, mut tf) = model_on(dev, fused)?;
    let (mm, mut tm) = model_on(dev, mat)?;
    let (of, sf, vf) = run(&mf, &mut tf, &inputs)?;
    let (om, sm, vm) = run(&mm, &mut tm, &inputs)?;
    let to64 = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<_>>();
    assert_close("output", &of, &to64(&om), 1e-5, 1e-4)?;
    assert_close("token scalars", &sf, &to64(&sm), 1e-5, 1e-4)?;
    assert_close("token vectors", &vf, &to64(&vm), 1e-5, 1e-4)?;
    let (_, gf) = loss_and_grads(&mf, &mut tf, &inputs, &w)?;
    let (_, gm) = loss_and_grads(&mm, &mut tm, &inputs, &w)?;
    for (i, (a, b)) in gf.iter().zip(&gm).enumerate() {
        let name = &tf.params().names()[i];
        assert_close(&format!("gradient of {name}"), a, &to64(b), 1e-5, 1e-3)?;
    }
    Ok(())
});

device_test!(model_is_rotation_equivariant, |dev| {
    let mut rng = Rng::for_test("model_is_rotation_equivariant");
    for (graph, window) in [
        (Some(GraphConvKind::Gated), 2),
        (Some(GraphConvKind::Cheap), 1),
        (None, 4),
    ] {
        let config = small_config(graph, window, 0.2);
        let inputs = Inputs::random(&mut rng, 2, 13, config.input_channels, true);
        let rot = rng.rotation();
        let (model, mut tape) = model_on(dev, config)?;
        // Same tape seed and step for both runs: the same dropout masks, so training mode is
        // tested too.
        let (out, s, v) = run(&model, &mut tape, &inputs)?;
        let (model2, mut tape2) = model_on(dev, model.config().clone())?;
        let (out_r, s_r, v_r) = run(&model2, &mut tape2, &inputs.rotated(&rot))?;
        let what = format!("graph {graph:?} window {window}");
        let to64 = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<_>>();
        assert_close(&format!("{what}: output"), &out_r, &to64(&out), 1e-4, 1e-3)?;
        assert_close(
            &format!("{what}: token scalars"),
            &s_r,
            &to64(&s),
            1e-4,
            1e-3,
        )?;
        // Final vectors must be the rotated originals.
        let h = model.config().hidden;
        let mut want = vec![0.0f64; v.len()];
        for n in 0..v.len() / (3 * h) {
            for c in 0..h {
                for i in 0..3 {
                    want[(n * 3 + i) * h + c] = (0..3)
                        .map(|k| rot[i][k] * v[(n * 3 + k) * h + c] as f64)
                        .sum();
                }
            }
        }
        assert_close(&format!("{what}: token vectors"), &v_r, &want, 1e-4, 1e-3)?;
    }
    Ok(())
});

/// Ten AdamW steps with dropout from a seed; returns every parameter.
fn train_ten_steps(dev: &Device, inputs: &Inputs) -> Result<Vec<Vec<f32>>> {
    let config = small_config(Some(GraphConvKind::Gated), 2, 0.1);
    let (model, mut tape) = model_on(dev, config)?;
    let mut opt = {
        let ps = tape.params_mut();
        let (names, values, _) = ps.trainable();
        let values: Vec<&Tensor<f32>> = values.into_iter().map(|v| &*v).collect();
        let mut c = OptimConfig::adamw(1e-2, 1e-2);
        c.clip_norm = Some(1.0);
        Optimizer::named(c, &names, &values)?
    };
    let w: Vec<f32> = (0..inputs.b * model.config().output)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    for _ in 0..10 {
        tape.reset();
        tape.params_mut().zero_grads()?;
        let out = model.forward(&mut tape, &inputs.batch(dev)?)?;
        let seed = Tensor::from_slice(dev, tape.shape(out.out), &w)?;
        tape.backward(out.out, seed)?;
        let (_, mut values, grads) = tape.params_mut().trainable();
        opt.step(&mut values, &grads)?;
    }
    let ps = tape.params();
    ps.names()
        .iter()
        .map(|n| ps.value(ps.id(n).unwrap()).to_vec())
        .collect()
}

device_test!(training_is_bit_identical_with_one_seed, |dev| {
    let mut rng = Rng::for_test("training_is_bit_identical_with_one_seed");
    let inputs = Inputs::random(&mut rng, 2, 9, 6, true);
    let a = train_ten_steps(dev, &inputs)?;
    let b = train_ten_steps(dev, &inputs)?;
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        ensure!(
            same,
            "parameter tensor {i} differs between two runs with the same seed"
        );
    }
    // And training moved them.
    let (_, ps) = TokenModel::create(small_config(Some(GraphConvKind::Gated), 2, 0.1), dev)?;
    let init = ps.value(ps.id("embed.s.weight").unwrap()).to_vec()?;
    ensure!(
        init != a[0],
        "ten optimiser steps left the parameters unchanged"
    );
    Ok(())
});

device_test!(model_matches_the_cpu_on_every_device, |dev| {
    let mut rng = Rng::for_test("model_matches_the_cpu_on_every_device");
    let config = small_config(Some(GraphConvKind::Gated), 2, 0.0);
    let inputs = Inputs::random(&mut rng, 3, 15, config.input_channels, true);
    let w = rng.normal_vec(3 * config.output, 1.0);
    let (m_cpu, mut t_cpu) = model_on(&Device::Cpu, config.clone())?;
    let (m_dev, mut t_dev) = model_on(dev, config)?;
    let (out_c, s_c, v_c) = run(&m_cpu, &mut t_cpu, &inputs)?;
    let (out_d, s_d, v_d) = run(&m_dev, &mut t_dev, &inputs)?;
    let to64 = |x: &[f32]| x.iter().map(|&a| a as f64).collect::<Vec<_>>();
    assert_close("output", &out_d, &to64(&out_c), 1e-4, 1e-3)?;
    assert_close("token scalars", &s_d, &to64(&s_c), 1e-4, 1e-3)?;
    assert_close("token vectors", &v_d, &to64(&v_c), 1e-4, 1e-3)?;
    let (_, g_c) = loss_and_grads(&m_cpu, &mut t_cpu, &inputs, &w)?;
    let (_, g_d) = loss_and_grads(&m_dev, &mut t_dev, &inputs, &w)?;
    for (i, (a, b)) in g_d.iter().zip(&g_c).enumerate() {
        let name = &t_cpu.params().names()[i];
        assert_close(&format!("gradient of {name}"), a, &to64(b), 2e-4, 2e-3)?;
    }
    Ok(())
});

device_test!(tape_accumulates_fan_out_and_skips_frozen, |dev| {
    // y = W x used twice: L = sum(w1 * y) + sum(w2 * silu(y)); dL/dx must sum both paths.
    let mut rng = Rng::for_test("tape_accumulates_fan_out_and_skips_frozen");
    let mut ps = ParamStore::new(dev, 3);
    let lin = Linear::new(&mut ps, "lin", 5, 4, true)?;
    let frozen = Linear::new(&mut ps, "frozen", 4, 4, false)?;
    ps.freeze(frozen.w);
    let mut tape = Tape::new(ps, 1);
    tape.set_poison(true);
    let x0 = rng.normal_vec(3 * 5, 1.0);
    let x = tape.input_with_grad(Tensor::from_slice(dev, &[3, 5], &x0)?)?;
    let y = lin.forward(&mut tape, x)?;
    let z = frozen.forward(&mut tape, y)?;
    let a = hiermd::nn::silu(&mut tape, y)?;
    let out = hiermd::nn::add(&mut tape, z, a)?;
    let seed = Tensor::from_slice(dev, &[3, 4], &[1.0; 12])?;
    tape.backward(out, seed)?;
    let gx = tape.grad(x).expect("x asked for a gradient").to_vec()?;
    // Reference in f64 on the host.
    let wv = tape.params().value(lin.w).to_vec()?;
    let bv = tape.params().value(lin.b.unwrap()).to_vec()?;
    let fv = tape.params().value(frozen.w).to_vec()?;
    let mut want = vec![0.0f64; 15];
    for r in 0..3 {
        let yv: Vec<f64> = (0..4)
            .map(|o| {
                bv[o] as f64
                    + (0..5)
                        .map(|i| wv[o * 5 + i] as f64 * x0[r * 5 + i] as f64)
                        .sum::<f64>()
            })
            .collect();
        // dL/dy = sum_o' F[o', o] (through the frozen layer) + silu'(y).
        for o in 0..4 {
            let s = 1.0 / (1.0 + (-yv[o]).exp());
            let dy =
                (0..4).map(|p| fv[p * 4 + o] as f64).sum::<f64>() + s * (1.0 + yv[o] * (1.0 - s));
            for i in 0..5 {
                want[r * 5 + i] += dy * wv[o * 5 + i] as f64;
            }
        }
    }
    assert_close("dL/dx through two paths", &gx, &want, 1e-5, 1e-4)?;
    let gf = tape.params().grad(frozen.w).to_vec()?;
    ensure!(
        gf.iter().all(|&g| g == 0.0),
        "a frozen parameter got a gradient"
    );
    let gw = tape.params().grad(lin.w).to_vec()?;
    ensure!(
        gw.iter().any(|&g| g != 0.0),
        "the trainable weight got no gradient"
    );
    Ok(())
});

device_test!(
    tape_reuses_memory_and_accumulates_parameter_gradients,
    |dev| {
        let mut rng = Rng::for_test("tape_reuses_memory");
        let config = small_config(Some(GraphConvKind::Cheap), 2, 0.1);
        let inputs = Inputs::random(&mut rng, 2, 10, config.input_channels, false);
        let (model, mut tape) = model_on(dev, config)?;
        let w = rng.normal_vec(2 * model.config().output, 1.0);
        let mut grads_once = Vec::new();
        let mut bytes = Vec::new();
        for step in 0..3 {
            tape.reset();
            if step < 2 {
                tape.params_mut().zero_grads()?;
            }
            tape.set_training(false);
            let out = model.forward(&mut tape, &inputs.batch(dev)?)?;
            let seed = Tensor::from_slice(dev, tape.shape(out.out), &w)?;
            tape.backward(out.out, seed)?;
            bytes.push(tape.pool_bytes());
            let id = tape.params().id("block0.attn.q.weight").unwrap();
            let g = tape.params().grad(id).to_vec()?;
            if step == 1 {
                grads_once = g;
            } else if step == 2 {
                // Not zeroed before step 2: the same gradient added twice.
                let want: Vec<f64> = grads_once.iter().map(|&x| 2.0 * x as f64).collect();
                assert_close(
                    "gradients accumulate across backward passes",
                    &g,
                    &want,
                    1e-6,
                    1e-5,
                )?;
            }
        }
        ensure!(
            bytes[1] == bytes[0] && bytes[2] == bytes[0],
            "the tape allocated again after its first step: {bytes:?} bytes"
        );
        Ok(())
    }
);

#[test]
fn config_errors_name_the_field() {
    let e = TokenModelConfig::from_toml("hidden = 10\nheads = 3\n").unwrap_err();
    assert!(
        format!("{e:#}").contains("heads = 3 must divide hidden = 10"),
        "{e:#}"
    );
    let e = TokenModelConfig::from_toml("hiden = 10\n").unwrap_err();
    assert!(format!("{e:#}").contains("hiden"), "{e:#}");
    let e = TokenModelConfig::from_toml("dropout = 1.5\n").unwrap_err();
    assert!(format!("{e:#}").contains("dropout"), "{e:#}");
    let c = TokenModelConfig::from_toml("graph_conv = \"gated\"\nwindow = 4\n").unwrap();
    assert_eq!(c.graph_conv, Some(GraphConvKind::Gated));
    assert_eq!(c.window, 4);
}

#[test]
fn parameters_round_trip_through_safetensors() -> Result<()> {
    let dev = Device::Cpu;
    let (_, ps) = TokenModel::create(small_config(Some(GraphConvKind::Gated), 2, 0.0), &dev)?;
    let dir = std::env::temp_dir().join(format!("hiermd-params-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("model.safetensors");
    ps.save(&path, &Default::default())?;
    let mut other = ParamStore::new(&dev, 99);
    let (_, mut fresh) = {
        let mut c = small_config(Some(GraphConvKind::Gated), 2, 0.0);
        c.seed = 1234;
        TokenModel::create(c, &dev)?
    };
    fresh.load(&path)?;
    for n in ps.names() {
        let a = ps.value(ps.id(n).unwrap()).to_vec()?;
        let b = fresh.value(fresh.id(n).unwrap()).to_vec()?;
        assert_eq!(a, b, "{n}");
    }
    // A store with a parameter the file lacks is refused, naming it.
    other.add("not_in_file", &[2], Init::Constant(0.0))?;
    let e = other.load(&path).unwrap_err();
    assert!(format!("{e:#}").contains("not_in_file"), "{e:#}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

device_test!(input_token_gradients_match_finite_differences, |dev| {
    // End-to-end training through the atom stage needs dL/d(token features): check it along
    // random directions of s and v.
    let mut rng = Rng::for_test("input_token_gradients");
    let config = small_config(Some(GraphConvKind::Gated), 2, 0.0);
    let inputs = Inputs::random(&mut rng, 2, 9, config.input_channels, true);
    let (model, mut tape) = model_on(dev, config)?;
    let w = rng.normal_vec(2 * model.config().output, 1.0);
    let (b, r, h) = (inputs.b, inputs.r, inputs.h);
    let loss =
        |tape: &mut Tape, s: &[f32], v: &[f32], grads: bool| -> Result<(f64, Vec<f32>, Vec<f32>)> {
            tape.reset();
            let sv = tape.input_with_grad(Tensor::from_slice(dev, &[b, r, h], s)?)?;
            let vv = tape.input_with_grad(Tensor::from_slice(dev, &[b, r, 3, h], v)?)?;
            let out = model.forward_vars(tape, sv, vv, Some(&inputs.ca), inputs.mask.as_deref())?;
            let y = tape.value(out.out).to_vec()?;
            let l = y.iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum();
            if !grads {
                return Ok((l, vec![], vec![]));
            }
            let seed = Tensor::from_slice(dev, tape.shape(out.out), &w)?;
            tape.backward(out.out, seed)?;
            Ok((
                l,
                tape.grad(sv).unwrap().to_vec()?,
                tape.grad(vv).unwrap().to_vec()?,
            ))
        };
    let (_, gs, gv) = loss(&mut tape, &inputs.s, &inputs.v, true)?;
    let eps = 2e-3;
    for _ in 0..3 {
        let ds = rng.normal_vec(gs.len(), 1.0);
        let dv = rng.normal_vec(gv.len(), 1.0);
        let analytic: f64 = gs
            .iter()
            .zip(&ds)
            .chain(gv.iter().zip(&dv))
            .map(|(&g, &d)| g as f64 * d as f64)
            .sum();
        let shift = |x: &[f32], d: &[f32], e: f64| -> Vec<f32> {
            x.iter()
                .zip(d)
                .map(|(&a, &b)| (a as f64 + e * b as f64) as f32)
                .collect()
        };
        let (fd, fd_err) = central_difference(
            |e| {
                let (l, _, _) = loss(
                    &mut tape,
                    &shift(&inputs.s, &ds, e),
                    &shift(&inputs.v, &dv, e),
                    false,
                )?;
                Ok(l)
            },
            eps,
        )?;
        ensure!(
            (fd - analytic).abs() <= 2e-2 * analytic.abs().max(0.1) + fd_err,
            "input directional derivative: tape {analytic:.6e}, finite differences {fd:.6e} (the difference's own error {fd_err:.1e})"
        );
    }
    Ok(())
});

device_test!(attention_maps_are_the_softmax_of_queries_and_keys, |dev| {
    let mut rng = Rng::for_test("attention_maps");
    let config = small_config(None, 2, 0.0);
    let inputs = Inputs::random(&mut rng, 2, 13, config.input_channels, true);
    let (model, mut tape) = model_on(dev, config)?;
    tape.set_training(false);
    let out = model.forward(&mut tape, &inputs.batch(dev)?)?;
    let maps = model.attention_maps(&tape, &out, Some(&[1]))?;
    ensure!(maps.len() == 2, "one map per block");
    let mask = out.mask.as_ref().expect("the batch is padded").to_vec()?;
    for (m, rec) in maps.iter().zip(&out.attention) {
        let &[_, nh, t, dh] = tape.shape(rec.q) else {
            unreachable!()
        };
        let q = tape.value(rec.q).to_vec()?;
        let k = tape.value(rec.k).to_vec()?;
        // f64 reference for frame 1.
        let mut want = vec![0.0f64; nh * t * t];
        for h in 0..nh {
            for i in 0..t {
                let base = ((nh + h) * t) * dh;
                let s: Vec<f64> = (0..t)
                    .map(|j| {
                        (0..dh)
                            .map(|d| q[base + i * dh + d] as f64 * k[base + j * dh + d] as f64)
                            .sum::<f64>()
                            / (dh as f64).sqrt()
                    })
                    .collect();
                let mx = (0..t)
                    .filter(|&j| mask[t + j] != 0)
                    .map(|j| s[j])
                    .fold(f64::MIN, f64::max);
                let z: f64 = (0..t)
                    .filter(|&j| mask[t + j] != 0)
                    .map(|j| (s[j] - mx).exp())
                    .sum();
                for j in 0..t {
                    if mask[t + j] != 0 {
                        want[(h * t + i) * t + j] = (s[j] - mx).exp() / z;
                    }
                }
            }
        }
        assert_close(
            &format!("block {} per-head map", m.block),
            &m.per_head,
            &want,
            1e-6,
            1e-4,
        )?;
        let mean: Vec<f64> = (0..t * t)
            .map(|i| (0..nh).map(|h| want[h * t * t + i]).sum::<f64>() / nh as f64)
            .collect();
        assert_close(
            &format!("block {} head mean", m.block),
            &m.mean,
            &mean,
            1e-6,
            1e-4,
        )?;
    }
    // Written out as arrays and pictures with residue numbers on the axes.
    let dir =
        std::env::temp_dir().join(format!("hiermd-attn-{}-{}", std::process::id(), dev.name()));
    let resids: Vec<i32> = (101..101 + inputs.r as i32).collect();
    let labels = hiermd::model::token_labels(&resids, 2);
    ensure!(
        labels[0] == "101-102" && labels.last().unwrap() == "113",
        "labels {labels:?}"
    );
    let files = maps[0].save(&dir, &labels)?;
    ensure!(
        files.len() == 2 + 1 + maps[0].heads,
        "files written: {files:?}"
    );
    let (shape, data) = hiermd::npy::read_f32(&files[0])?;
    ensure!(
        shape == [maps[0].heads, maps[0].tokens, maps[0].tokens],
        "npy shape {shape:?}"
    );
    ensure!(data == maps[0].per_head, "the npy holds the map");
    let svg = std::fs::read_to_string(&files[2])?;
    ensure!(
        svg.contains("<svg") && svg.contains("query (residue)"),
        "heat map SVG"
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
});

/// One forward and backward pass of `model` on `inputs` (token features recorded with
/// gradients), seeded with `w`: the outputs, every parameter's gradient then those of the
/// scalar and vector tokens, and how many attention records the pass kept.
fn forward_backward(
    dev: &Device,
    model: &TokenModel,
    tape: &mut Tape,
    inputs: &Inputs,
    w: &[f32],
) -> Result<(Vec<f32>, Vec<Vec<f32>>, usize)> {
    let b = inputs.batch(dev)?;
    let s = tape.input_with_grad(b.s.to_device(dev)?)?;
    let v = tape.input_with_grad(b.v.to_device(dev)?)?;
    let out = model.forward_vars(tape, s, v, b.ca.as_deref(), b.mask.as_deref())?;
    let y = tape.value(out.out).to_vec()?;
    tape.backward(out.out, Tensor::from_slice(dev, tape.shape(out.out), w)?)?;
    let ps = tape.params();
    let mut grads: Vec<Vec<f32>> = (0..ps.len())
        .map(|i| ps.grad(ps.id(&ps.names()[i]).unwrap()).to_vec())
        .collect::<Result<_>>()?;
    grads.push(tape.grad(s).context("no gradient for s")?.to_vec()?);
    grads.push(tape.grad(v).context("no gradient for v")?.to_vec()?);
    Ok((y, grads, out.attention.len()))
}

// Activation checkpointing (blocks recomputed in the backward pass) changes memory, nothing
// else: the same outputs, parameter gradients and input gradients, bit for bit, with dropout,
// masks, windows and the gated graph convolution on; and the tape's pool is smaller.
device_test!(checkpointed_blocks_give_identical_gradients, |dev| {
    let mut rng = Rng::for_test("checkpointed_blocks_give_identical_gradients");
    let mut config = small_config(Some(GraphConvKind::Gated), 2, 0.1);
    config.blocks = 3;
    let inputs = Inputs::random(&mut rng, 3, 11, config.input_channels, true);
    let w = rng.normal_vec(3 * config.output, 1.0);
    let mut results = Vec::new();
    for checkpoint in [false, true] {
        let mut c = config.clone();
        c.checkpoint = checkpoint;
        let (model, mut tape) = model_on(dev, c)?;
        tape.set_training(true);
        let mut last = None;
        // Two steps: the second reuses the pool and draws other dropout masks.
        for _ in 0..2 {
            tape.reset();
            tape.params_mut().zero_grads()?;
            let (y, grads, records) = forward_backward(dev, &model, &mut tape, &inputs, &w)?;
            ensure!(
                records == if checkpoint { 0 } else { 3 },
                "attention records: {records}"
            );
            last = Some((y, grads));
        }
        results.push((last.unwrap(), tape.pool_bytes()));
    }
    let ((y0, g0), pool0) = &results[0];
    let ((y1, g1), pool1) = &results[1];
    let bits = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    ensure!(bits(y0, y1), "outputs differ with checkpointing");
    for (i, (a, b)) in g0.iter().zip(g1).enumerate() {
        ensure!(
            a.iter().any(|&x| x != 0.0) || i < g0.len() - 2,
            "gradient {i} is all zero"
        );
        ensure!(bits(a, b), "gradient {i} differs with checkpointing");
    }
    ensure!(
        pool1 < pool0,
        "checkpointing should shrink the pool: {pool1} vs {pool0} bytes"
    );
    Ok(())
});

// A padded frame's output is that of its real residues alone: it does not change when the
// padding is longer or holds other values, at windows that mix real and padding residues
// (found by the PyTorch peer's cross-check: padding used to leak into merged windows).
device_test!(padding_does_not_leak_into_merged_windows, |dev| {
    let mut rng = Rng::for_test("padding_does_not_leak_into_merged_windows");
    for (w, graph) in [
        (2, None),
        (3, Some(GraphConvKind::Gated)),
        (4, Some(GraphConvKind::Cheap)),
    ] {
        let config = small_config(graph, w, 0.0);
        let h = config.input_channels;
        let (model, mut tape) = model_on(dev, config)?;
        tape.set_training(false);
        let real = 7;
        let base = Inputs::random(&mut rng, 1, real, h, false);
        let mut outs = Vec::new();
        for r in [9, 12] {
            // The real residues, then junk (random features, C-alpha atoms near the chain).
            let mut x = Inputs::random(&mut rng, 1, r, h, false);
            x.s[..real * h].copy_from_slice(&base.s);
            x.v[..real * 3 * h].copy_from_slice(&base.v);
            x.ca[..real * 3].copy_from_slice(&base.ca);
            x.mask = Some((0..r).map(|i| u8::from(i < real)).collect());
            let out = model.forward(&mut tape, &x.batch(dev)?)?;
            outs.push(tape.value(out.out).to_vec()?);
            tape.reset();
        }
        let want: Vec<f64> = outs[0].iter().map(|&x| x as f64).collect();
        assert_close(
            &format!("w = {w}: output, 12 vs 9 residues of padding"),
            &outs[1],
            &want,
            1e-5,
            1e-5,
        )?;
    }
    Ok(())
});

/// The output, dL/dx, dL/dW1 and dL/dW2 of [`chunked_segment_run`].
type SegmentRun = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

/// `L = sum(w * silu(W2 silu(W1 x + b1)))` over frames of `x [B, 2, 5]`, either plain or as a
/// segment checkpointed in chunks of `chunk` frames.
fn chunked_segment_run(
    dev: &Device,
    x0: &[f32],
    w: &[f32],
    chunk: Option<usize>,
) -> Result<SegmentRun> {
    let b = x0.len() / 10;
    let mut ps = ParamStore::new(dev, 7);
    let l1 = Linear::new(&mut ps, "l1", 5, 6, true)?;
    let l2 = Linear::new(&mut ps, "l2", 6, 3, false)?;
    let mut tape = Tape::new(ps, 1);
    tape.set_poison(true);
    let x = tape.input_with_grad(Tensor::from_slice(dev, &[b, 2, 5], x0)?)?;
    let (a, c) = (l1.clone(), l2.clone());
    let body =
        move |t: &mut Tape, xs: &[Var], frames: std::ops::Range<usize>| -> Result<Vec<Var>> {
            ensure!(
                t.shape(xs[0])[0] == frames.len(),
                "chunk shape and frame range disagree"
            );
            let h = a.forward(t, xs[0])?;
            let h = hiermd::nn::silu(t, h)?;
            let y = c.forward(t, h)?;
            Ok(vec![hiermd::nn::silu(t, y)?])
        };
    let y = match chunk {
        Some(n) => tape.checkpoint_frames("chunked", &[x], n, body)?[0],
        None => body(&mut tape, &[x], 0..b)?[0],
    };
    ensure!(
        tape.shape(y) == [b, 2, 3],
        "output shape {:?}",
        tape.shape(y)
    );
    let out = tape.value(y).to_vec()?;
    tape.backward(y, Tensor::from_slice(dev, &[b, 2, 3], w)?)?;
    let gx = tape.grad(x).context("no gradient for x")?.to_vec()?;
    let ps = tape.params();
    Ok((out, gx, ps.grad(l1.w).to_vec()?, ps.grad(l2.w).to_vec()?))
}

// A segment checkpointed in chunks of frames gives the plain run's outputs and gradients (input
// and parameter) to f32 rounding, whatever the chunk (1 frame, uneven, larger than the batch),
// and refuses a segment that draws dropout in more than one chunk.
device_test!(frame_chunked_checkpoint_matches_the_plain_run, |dev| {
    let mut rng = Rng::for_test("frame_chunked_checkpoint_matches_the_plain_run");
    let b = 7;
    let x0 = rng.normal_vec(b * 10, 1.0);
    let w = rng.normal_vec(b * 6, 1.0);
    let (y, gx, g1, g2) = chunked_segment_run(dev, &x0, &w, None)?;
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    for chunk in [1, 3, 7, 100] {
        let (yc, gxc, g1c, g2c) = chunked_segment_run(dev, &x0, &w, Some(chunk))?;
        assert_close(
            &format!("output, chunks of {chunk}"),
            &yc,
            &to64(&y),
            1e-6,
            1e-5,
        )?;
        assert_close(
            &format!("dL/dx, chunks of {chunk}"),
            &gxc,
            &to64(&gx),
            1e-6,
            1e-5,
        )?;
        assert_close(
            &format!("dL/dW1, chunks of {chunk}"),
            &g1c,
            &to64(&g1),
            1e-6,
            1e-5,
        )?;
        assert_close(
            &format!("dL/dW2, chunks of {chunk}"),
            &g2c,
            &to64(&g2),
            1e-6,
            1e-5,
        )?;
    }
    // Dropout in a segment run in several chunks would repeat its masks: an error.
    let mut tape = Tape::new(ParamStore::new(dev, 1), 1);
    let mut ps = ParamStore::new(dev, 7);
    let l1 = Linear::new(&mut ps, "l1", 5, 6, true)?;
    *tape.params_mut() = ps;
    tape.set_training(true);
    let x = tape.input(Tensor::from_slice(dev, &[b, 2, 5], &x0)?)?;
    let err = tape
        .checkpoint_frames("with dropout", &[x], 2, move |t, xs, _| {
            let h = l1.forward(t, xs[0])?;
            Ok(vec![hiermd::nn::dropout(t, h, 0.5, 1)?])
        })
        .err()
        .context("a multi-chunk segment drawing dropout was accepted")?;
    ensure!(
        format!("{err:#}").contains("must not draw dropout"),
        "unexpected error: {err:#}"
    );
    Ok(())
});

// The checkpointed stem runs in chunks of STEM_CHUNK frames: with more frames than that, the
// model's outputs and gradients (parameters and input tokens) equal the unchecked run's to f32
// rounding, with windows, padding masks and the gated graph convolution on.
device_test!(chunked_stem_matches_the_plain_stem, |dev| {
    let mut rng = Rng::for_test("chunked_stem_matches_the_plain_stem");
    let mut config = small_config(Some(GraphConvKind::Gated), 3, 0.0);
    config.blocks = 1;
    // Emu runs every GPU thread as a fiber: keep its batch just over one chunk.
    let frames = hiermd::model::token::STEM_CHUNK + 5;
    let inputs = Inputs::random(&mut rng, frames, 10, config.input_channels, true);
    let w = rng.normal_vec(frames * config.output, 1.0);
    let mut results = Vec::new();
    for checkpoint in [false, true] {
        let mut c = config.clone();
        c.checkpoint = checkpoint;
        let (model, mut tape) = model_on(dev, c)?;
        tape.set_training(true);
        let (y, grads, _) = forward_backward(dev, &model, &mut tape, &inputs, &w)?;
        results.push((y, grads));
    }
    let to64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let ((y0, g0), (y1, g1)) = (&results[0], &results[1]);
    assert_close("outputs, chunked stem", y1, &to64(y0), 1e-6, 1e-5)?;
    for (i, (a, b)) in g0.iter().zip(g1).enumerate() {
        let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
        assert_close(
            &format!("gradient {i}, chunked stem"),
            b,
            &to64(a),
            1e-5 * scale + 1e-7,
            1e-4,
        )?;
    }
    Ok(())
});
