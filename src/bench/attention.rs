//! Equivariant attention alone: the fused kernel (`eqsdpa_forward` / `eqsdpa_backward`, memory
//! linear in tokens) or the materialised path that `EqAttention` records with
//! `attention = "materialised"` (scores, softmax and product as separate ops, T x T matrices
//! stored: quadratic). Values are 4 d_h wide per head, as in the model.

use super::{measure, provenance};
use crate::ops::eqsdpa::{EqsdpaBackwardMode, EqsdpaInput};
use crate::ops::gemm::{gemm_batched, Batch};
use crate::ops::softmax::{softmax_backward, softmax_forward};
use crate::testing::Rng;
use crate::{Device, Tensor};
use anyhow::{ensure, Result};
use serde_json::json;

/// `hiermd bench attention`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct AttentionArgs {
    /// Tokens T.
    #[arg(long, default_value_t = 3200)]
    pub tokens: usize,
    /// Frames in the batch.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Heads.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Head width d_h (values are 4 d_h wide).
    #[arg(long, default_value_t = 16)]
    pub dh: usize,
    /// fused or materialised.
    #[arg(long, default_value = "fused")]
    pub attention: String,
    /// Forward and backward (else the forward only).
    #[arg(long)]
    pub backward: bool,
    /// Type of q, k and values in the fused kernel: f32, bf16 or f16 (tensor cores; d_h 16, 32
    /// or 64). Outputs, log-sum-exp and gradients stay f32.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
}

/// Measures one attention configuration; returns the JSON row.
pub fn attention(a: &AttentionArgs, dev: &Device) -> Result<serde_json::Value> {
    let fused = match a.attention.as_str() {
        "fused" => true,
        "materialised" => false,
        o => anyhow::bail!("--attention: {o:?} is neither fused nor materialised"),
    };
    ensure!(
        a.tokens > 0 && a.batch > 0 && a.heads > 0,
        "bench attention: empty shape"
    );
    match (fused, a.dtype.as_str()) {
        (true, "f32") => fused_attention::<f32>(a, dev),
        (true, "bf16") => fused_attention::<half::bf16>(a, dev),
        (true, "f16") => fused_attention::<half::f16>(a, dev),
        (false, "f32") => materialised(a, dev),
        (false, "bf16" | "f16") => anyhow::bail!(
            "--dtype {}: only the fused kernel takes half-precision inputs",
            a.dtype
        ),
        (_, o) => anyhow::bail!("--dtype: {o:?} is not f32, bf16 or f16"),
    }
}

/// The fused kernel with q, k and values of type T (f32, or bf16 / f16 on the tensor cores).
fn fused_attention<T: EqsdpaInput>(a: &AttentionArgs, dev: &Device) -> Result<serde_json::Value> {
    let (t, bh, dh, dv) = (a.tokens, a.batch * a.heads, a.dh, 4 * a.dh);
    let scale = 1.0 / (dh as f32).sqrt();
    let mut rng = Rng::new(23);
    let mut input = |shape: &[usize]| -> Result<Tensor<T>> {
        let v: Vec<T> = rng
            .normal_vec(shape.iter().product(), 1.0)
            .into_iter()
            .map(T::from_f32)
            .collect();
        Tensor::from_slice(dev, shape, &v)
    };
    let q = input(&[bh, t, dh])?;
    let k = input(&[bh, t, dh])?;
    let v = input(&[bh, t, dv])?;
    let dout = Tensor::from_slice(dev, &[bh, t, dv], &rng.normal_vec(bh * t * dv, 1.0))?;
    let m = measure(dev, a.warmup, a.repeats, || {
        let mut out = Tensor::zeros(dev, &[bh, t, dv])?;
        let mut lse = Tensor::zeros(dev, &[bh, t])?;
        T::forward(&q, &k, &v, None, a.heads, scale, &mut out, &mut lse)?;
        if a.backward {
            let mut dq = Tensor::zeros(dev, &[bh, t, dh])?;
            let mut dk = Tensor::zeros(dev, &[bh, t, dh])?;
            let mut dvv = Tensor::zeros(dev, &[bh, t, dv])?;
            T::backward(
                &q,
                &k,
                &v,
                (&out, &lse, &dout),
                None,
                a.heads,
                scale,
                (&mut dq, &mut dk, &mut dvv),
                EqsdpaBackwardMode::Deterministic,
            )?;
        }
        Ok(())
    })?;
    Ok(row(a, dev, &m))
}

/// The materialised path (f32): scores, softmax and product as separate ops.
fn materialised(a: &AttentionArgs, dev: &Device) -> Result<serde_json::Value> {
    let (t, bh, dh, dv) = (a.tokens, a.batch * a.heads, a.dh, 4 * a.dh);
    let scale = 1.0 / (dh as f32).sqrt();
    let mut rng = Rng::new(23);
    let mut input = |shape: &[usize]| {
        Tensor::from_slice(dev, shape, &rng.normal_vec(shape.iter().product(), 1.0))
    };
    let q = input(&[bh, t, dh])?;
    let k = input(&[bh, t, dh])?;
    let v = input(&[bh, t, dv])?;
    let dout = input(&[bh, t, dv])?;
    let m = measure(dev, a.warmup, a.repeats, || {
        let tt = Batch::packed(bh, t, t, dh);
        let mut s = Tensor::zeros(dev, &[bh, t, t])?;
        gemm_batched(false, true, t, t, dh, 1.0, &q, &k, 0.0, &mut s, tt)?;
        let mut p = Tensor::zeros(dev, &[bh, t, t])?;
        softmax_forward(&s, &mut p, scale, None, t)?;
        let mut out = Tensor::zeros(dev, &[bh, t, dv])?;
        gemm_batched(
            false,
            false,
            t,
            dv,
            t,
            1.0,
            &p,
            &v,
            0.0,
            &mut out,
            Batch::packed(bh, t, dv, t),
        )?;
        if a.backward {
            let mut dp = Tensor::zeros(dev, &[bh, t, t])?;
            gemm_batched(
                false,
                true,
                t,
                t,
                dv,
                1.0,
                &dout,
                &v,
                0.0,
                &mut dp,
                Batch::packed(bh, t, t, dv),
            )?;
            let mut ds = Tensor::zeros(dev, &[bh, t, t])?;
            softmax_backward(&p, &dp, &mut ds, scale)?;
            let mut dq = Tensor::zeros(dev, &[bh, t, dh])?;
            gemm_batched(
                false,
                false,
                t,
                dh,
                t,
                1.0,
                &ds,
                &k,
                0.0,
                &mut dq,
                Batch::packed(bh, t, dh, t),
            )?;
            let mut dk = Tensor::zeros(dev, &[bh, t, dh])?;
            gemm_batched(
                true,
                false,
                t,
                dh,
                t,
                1.0,
                &ds,
                &q,
                0.0,
                &mut dk,
                Batch::packed(bh, t, dh, t),
            )?;
            let mut dvv = Tensor::zeros(dev, &[bh, t, dv])?;
            gemm_batched(
                true,
                false,
                t,
                dv,
                t,
                1.0,
                &p,
                &dout,
                0.0,
                &mut dvv,
                Batch::packed(bh, t, dv, t),
            )?;
        }
        Ok(())
    })?;
    Ok(row(a, dev, &m))
}

/// The JSON row of a measured configuration.
fn row(a: &AttentionArgs, dev: &Device, m: &super::Measured) -> serde_json::Value {
    let t = a.tokens;
    let dh = a.dh;
    let mut row = provenance(dev);
    row.insert("what".into(), json!("attention"));
    row.insert("dtype".into(), json!(a.dtype));
    row.insert("attention".into(), json!(a.attention));
    row.insert("tokens".into(), json!(t));
    row.insert("batch".into(), json!(a.batch));
    row.insert("heads".into(), json!(a.heads));
    row.insert("dh".into(), json!(dh));
    row.insert("backward".into(), json!(a.backward));
    row.insert("samples_per_s".into(), json!(a.batch as f64 / m.median()));
    row.extend(m.json());
    serde_json::Value::Object(row)
}

/// `hiermd bench attention`.
pub fn run(a: &AttentionArgs, dev: &Device) -> Result<()> {
    println!("{}", attention(a, dev)?);
    Ok(())
}
