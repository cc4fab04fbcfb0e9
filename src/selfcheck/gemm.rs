//! Device checks: `gemm` (cuda/gemm.cu and its cuBLAS alternative, src/ops/gemm_cublas.rs).
//!
//! Every product kernel (f32 and the bf16 / f16 tensor-core ones, each in the four transposes
//! nn, nt, tn, tt) single and batched (packed, padded, an operand shared by stride 0),
//! `column_sum`, `matmul_backward` and the Linear layer's forward and backward, against f64
//! references. Where cuBLAS runs (a cuda device with libcublas) the same products go through it
//! too, and must match the reference and our kernels.
//!
//! Tolerances are those of tests/gemm.rs and tests/gemm_cublas.rs: a k-term product may be off
//! the f64 product by `(k + 4) eps (|alpha| |op(A)| |op(B)| + |beta| |C|)` plus the smallest
//! normal f32, element by element (eps = 2^-23, a rigorous bound for any summation order in
//! f32); the bf16 / f16 products are compared with the f64 product of the rounded operands under
//! the same bound, since they accumulate in f32 too. cuBLAS against ours: twice the bound (both
//! lie within it of the exact value). `column_sum` of r rows: `(r + 2) eps sum |x|`. The Linear
//! layer: 1e-4 absolute + relative against its f64 twin (tests/gemm.rs), and on cuBLAS the loose
//! GEMM bound of tests/gemm_cublas.rs.

use super::{Ctx, Outcome, Tol};
use crate::ops::gemm::{self as g, Batch, HalfFloat};
use crate::ops::gemm_cublas::{self as cublas, GemmBackend};
use crate::tensor::Element;
use crate::{Device, Tensor};
use anyhow::Result;
use half::{bf16, f16};

/// `gemm`: our kernels (cuBLAS deselected whatever `HIERMD_GEMM` says, so that they run), then
/// the cuBLAS path.
pub(super) fn gemm(ctx: &mut Ctx) -> Result<()> {
    let _restore = Backend::select(GemmBackend::Ours);
    all_products(ctx, false)?;
    column_sum(ctx)?;
    determinism(ctx)?;
    cublas_path(ctx)
}

/// Selects a GEMM backend; dropping it hands the choice back to `HIERMD_GEMM`.
struct Backend;

impl Backend {
    fn select(b: GemmBackend) -> Self {
        cublas::set_backend(b);
        Self
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        cublas::clear_backend();
    }
}

const TRANSPOSES: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

/// (alpha, beta): assignment into a NaN-poisoned C, scaled assignment, accumulation.
const SCALARS: [(f32, f32); 4] = [(1.0, 0.0), (-0.75, 0.0), (1.0, 1.0), (0.5, -1.5)];

/// The kernels' suffix for a transpose pair.
fn tt((ta, tb): (bool, bool)) -> &'static str {
    ["nn", "nt", "tn", "tt"][ta as usize * 2 + tb as usize]
}

/// (m, n, k) of the single products. Quick: one element, odd sizes, one tile plus one in m and
/// n. Otherwise those of tests/gemm.rs: also an exact tile, k = 1, a wide thin product and
/// several tiles in every direction.
fn shapes(quick: bool) -> &'static [(usize, usize, usize)] {
    if quick {
        &[(1, 1, 1), (17, 31, 13), (129, 65, 17)]
    } else {
        &[
            (1, 1, 1),
            (17, 31, 13),
            (65, 129, 33),
            (128, 64, 32),
            (129, 65, 17),
            (40, 50, 1),
            (3, 200, 70),
            (256, 384, 200),
        ]
    }
}

/// f32 values widened to f64 (exact): the inputs of the f64 references.
pub(super) fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Results of several outputs gathered into one check: each element's value, reference and
/// bound, and the output each came from (named when it fails). Shared with the eqsdpa family.
#[derive(Default)]
pub(super) struct Gather {
    got: Vec<f32>,
    want: Vec<f64>,
    bound: Vec<f64>,
    /// (first element, what) per output.
    parts: Vec<(usize, String)>,
    seconds: f64,
}

impl Gather {
    /// Adds one output: `got` against `want`, element i within `bound[i]`.
    pub(super) fn add(
        &mut self,
        what: impl Into<String>,
        got: &[f32],
        want: &[f64],
        bound: &[f64],
        seconds: f64,
    ) {
        assert!(got.len() == want.len() && want.len() == bound.len());
        self.parts.push((self.got.len(), what.into()));
        self.got.extend_from_slice(got);
        self.want.extend_from_slice(want);
        self.bound.extend_from_slice(bound);
        self.seconds += seconds;
    }

    /// Adds one output held to a single bound everywhere.
    pub(super) fn add_within(
        &mut self,
        what: impl Into<String>,
        got: &[f32],
        want: &[f64],
        bound: f64,
        seconds: f64,
    ) {
        self.add(what, got, want, &vec![bound; want.len()], seconds);
    }

    /// Records one outcome: element i passes when it equals its reference (infinities
    /// included) or |got - want| <= bound[i]; a bound of 0 asks for the exact value, and NaN (in
    /// a value or a bound) never passes.
    pub(super) fn record(self, ctx: &mut Ctx, name: impl Into<String>) -> bool {
        let mut o = Outcome {
            name: name.into(),
            max_err: 0.0,
            tol: 0.0,
            worst_ratio: 0.0,
            ok: true,
            seconds: self.seconds,
            detail: String::new(),
        };
        let mut worst = None;
        let all = self.got.iter().zip(&self.want).zip(&self.bound);
        for (i, ((&got, &want), &bound)) in all.enumerate() {
            let (err, ratio) = if got as f64 == want {
                (0.0, 0.0)
            } else {
                let err = (got as f64 - want).abs();
                let ratio = err / bound;
                (err, if ratio.is_nan() { f64::INFINITY } else { ratio })
            };
            if err > o.max_err || err.is_nan() {
                o.max_err = if err.is_nan() { f64::NAN } else { err };
            }
            if ratio > o.worst_ratio {
                (o.worst_ratio, o.tol, worst) = (ratio, bound, Some(i));
            }
        }
        o.ok = o.worst_ratio <= 1.0;
        if let (false, Some(i)) = (o.ok, worst) {
            let (first, what) = &self.parts[self.parts.partition_point(|p| p.0 <= i) - 1];
            o.detail = format!(
                "{what}, element {}: got {:.7e}, want {:.7e}",
                i - first,
                self.got[i],
                self.want[i]
            );
        }
        ctx.push(o)
    }
}

/// The f64 product `alpha op(A) op(B) + beta C` (beta = 0 assigns) and each element's bound
/// `(k + 4) eps (|alpha| |op(A)| |op(B)| + |beta| |C|) + f32::MIN_POSITIVE` (tests/gemm.rs).
fn expected(
    (ta, tb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    (alpha, beta): (f32, f32),
    a: &[f64],
    b: &[f64],
    c: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let (alpha, beta) = (alpha as f64, beta as f64);
    let mut want = c.to_vec();
    g::gemm_reference(ta, tb, m, n, k, alpha, a, b, beta, &mut want);
    let abs = |v: &[f64]| v.iter().map(|x| x.abs()).collect::<Vec<f64>>();
    let mut bound = abs(c);
    g::gemm_reference(
        ta,
        tb,
        m,
        n,
        k,
        alpha.abs(),
        &abs(a),
        &abs(b),
        beta.abs(),
        &mut bound,
    );
    let eps = (k as f64 + 4.0) * f32::EPSILON as f64;
    let bound = bound
        .iter()
        .map(|v| eps * v + f32::MIN_POSITIVE as f64)
        .collect();
    (want, bound)
}

/// The operand type of a product: f32, or a 16-bit type (the tensor-core kernels).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    F32,
    Bf16,
    F16,
}

const KINDS: [Kind; 3] = [Kind::F32, Kind::Bf16, Kind::F16];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::F32 => "f32",
            Kind::Bf16 => "bf16",
            Kind::F16 => "f16",
        }
    }

    /// Values rounded to this type (then exact in it), as f32.
    fn round(self, v: Vec<f32>) -> Vec<f32> {
        match self {
            Kind::F32 => v,
            Kind::Bf16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
            Kind::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        }
    }

    /// What computes the products: our kernels' common prefix, or the cuBLAS call.
    fn family(self, cublas: bool) -> String {
        match (self, cublas) {
            (Kind::F32, true) => "cublas sgemm".into(),
            (_, true) => format!("cublas GemmEx {}", self.name()),
            (_, false) => format!("gemm_{}", self.name()),
        }
    }

    /// What computes one transpose pair: our kernel's name, or the cuBLAS call.
    fn label(self, trans: (bool, bool), cublas: bool) -> String {
        let sep = if cublas { " " } else { "_" };
        format!("{}{sep}{}", self.family(cublas), tt(trans))
    }
}

/// A and B on the device, in their operand type.
enum Operands {
    F32(Tensor<f32>, Tensor<f32>),
    Bf16(Tensor<bf16>, Tensor<bf16>),
    F16(Tensor<f16>, Tensor<f16>),
}

impl Operands {
    /// Uploads `a` and `b`, already rounded to `kind` (so the conversion is exact).
    fn new(dev: &Device, kind: Kind, a: &[f32], b: &[f32]) -> Result<Self> {
        fn up<T: Element>(dev: &Device, v: &[f32], f: fn(f32) -> T) -> Result<Tensor<T>> {
            let h: Vec<T> = v.iter().map(|&x| f(x)).collect();
            Tensor::from_slice(dev, &[h.len()], &h)
        }
        Ok(match kind {
            Kind::F32 => Self::F32(up(dev, a, |x| x)?, up(dev, b, |x| x)?),
            Kind::Bf16 => Self::Bf16(up(dev, a, bf16::from_f32)?, up(dev, b, bf16::from_f32)?),
            Kind::F16 => Self::F16(up(dev, a, f16::from_f32)?, up(dev, b, f16::from_f32)?),
        })
    }

    /// C = alpha op(A) op(B) + beta C: one product, or a batch.
    fn gemm(
        &self,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (alpha, beta): (f32, f32),
        c: &mut Tensor<f32>,
        batch: Option<Batch>,
    ) -> Result<()> {
        fn half<T: HalfFloat>(
            (ta, tb): (bool, bool),
            (m, n, k): (usize, usize, usize),
            (alpha, beta): (f32, f32),
            (a, b): (&Tensor<T>, &Tensor<T>),
            c: &mut Tensor<f32>,
            batch: Option<Batch>,
        ) -> Result<()> {
            match batch {
                None => g::gemm_half(ta, tb, m, n, k, alpha, a, b, beta, c),
                Some(bt) => g::gemm_half_batched(ta, tb, m, n, k, alpha, a, b, beta, c, bt),
            }
        }
        let s = (alpha, beta);
        match (self, batch) {
            (Self::F32(a, b), None) => g::gemm(ta, tb, m, n, k, alpha, a, b, beta, c),
            (Self::F32(a, b), Some(bt)) => {
                g::gemm_batched(ta, tb, m, n, k, alpha, a, b, beta, c, bt)
            }
            (Self::Bf16(a, b), _) => half((ta, tb), (m, n, k), s, (a, b), c, batch),
            (Self::F16(a, b), _) => half((ta, tb), (m, n, k), s, (a, b), c, batch),
        }
    }
}

/// Starting values of an output: NaN where beta = 0 (it must not be read), else random.
fn start(ctx: &mut Ctx, len: usize, beta: f32) -> Vec<f32> {
    if beta == 0.0 {
        vec![f32::NAN; len]
    } else {
        ctx.rng.normal_vec(len, 1.0)
    }
}

/// The reference's view of a starting output: zeros where beta = 0 (assigned, never read).
fn start_ref(c: &[f32], beta: f32) -> Vec<f64> {
    if beta == 0.0 {
        vec![0.0; c.len()]
    } else {
        widen(c)
    }
}

/// A device tensor of `v`; poisoned (NaN) where beta = 0, as the tests do.
fn output(dev: &Device, v: &[f32], beta: f32) -> Result<Tensor<f32>> {
    let mut t = Tensor::from_slice(dev, &[v.len()], v)?;
    if beta == 0.0 {
        t.poison()?;
    }
    Ok(t)
}

/// Every check that runs a GEMM, on our kernels or (with `cublas`, cuBLAS selected) on cuBLAS;
/// returns how many cuBLAS calls they should make when it is selected.
fn all_products(ctx: &mut Ctx, cublas: bool) -> Result<u64> {
    let mut calls = 0;
    for kind in KINDS {
        calls += single(ctx, kind, cublas)?;
    }
    for kind in KINDS {
        calls += batched(ctx, kind, cublas)?;
    }
    calls += edges(ctx, cublas)?;
    calls += matmul_backward(ctx, cublas)?;
    calls += linear(ctx, cublas)?;
    Ok(calls)
}

/// Single products of one operand type: every transpose pair at every shape, the (alpha, beta)
/// pair cycling so that each pair meets assignment into NaN and accumulation; one check per
/// transpose pair. On cuBLAS, also against our kernels on the same inputs (twice the bound).
fn single(ctx: &mut Ctx, kind: Kind, cublas: bool) -> Result<u64> {
    let shapes = shapes(ctx.quick);
    for (ti, trans) in TRANSPOSES.into_iter().enumerate() {
        let (mut exact, mut ours) = (Gather::default(), Gather::default());
        for (si, &(m, n, k)) in shapes.iter().enumerate() {
            let s = SCALARS[(ti + si) % SCALARS.len()];
            let a = kind.round(ctx.rng.normal_vec(m * k, 1.0));
            let b = kind.round(ctx.rng.normal_vec(k * n, 1.0));
            let c0 = start(ctx, m * n, s.1);
            let ops = Operands::new(&ctx.dev, kind, &a, &b)?;
            let mut c = output(&ctx.dev, &c0, s.1)?;
            let ((), secs) = ctx.timed(|_| ops.gemm(trans, (m, n, k), s, &mut c, None))?;
            let got = c.to_vec()?;
            let c64 = start_ref(&c0, s.1);
            let (want, bound) = expected(trans, (m, n, k), s, &widen(&a), &widen(&b), &c64);
            let what = format!("{m}x{n}x{k} alpha {} beta {}", s.0, s.1);
            exact.add(what.clone(), &got, &want, &bound, secs);
            if cublas {
                cublas::set_backend(GemmBackend::Ours);
                let mut c = output(&ctx.dev, &c0, s.1)?;
                ops.gemm(trans, (m, n, k), s, &mut c, None)?;
                cublas::set_backend(GemmBackend::Cublas);
                let twice: Vec<f64> = bound.iter().map(|b| 2.0 * b).collect();
                ours.add(what, &got, &widen(&c.to_vec()?), &twice, 0.0);
            }
        }
        let (last, label) = (shapes[shapes.len() - 1], kind.label(trans, cublas));
        let name = format!("{label}: {} shapes to {last:?}", shapes.len());
        exact.record(ctx, name.clone());
        if cublas {
            ours.record(ctx, format!("{name} vs ours"));
        }
    }
    Ok((TRANSPOSES.len() * shapes.len()) as u64)
}

/// Sentinel between C's matrices in a batch: a product must leave it alone.
const GAP: f32 = 12345.0;

/// Batched products of one operand type, with packed strides, padded strides (the gaps checked
/// untouched: bound 0), A shared by every product and B shared (stride 0), each layout with
/// another transpose pair and (alpha, beta).
fn batched(ctx: &mut Ctx, kind: Kind, cublas: bool) -> Result<u64> {
    let (m, n, k, count) = (37, 45, 29, if ctx.quick { 3 } else { 5 });
    let (la, lb, lc) = (m * k, k * n, m * n);
    let layouts = [
        ("packed", Batch::packed(count, m, n, k)),
        (
            "padded",
            Batch {
                count,
                stride_a: la + 5,
                stride_b: lb + 3,
                stride_c: lc + 7,
            },
        ),
        (
            "A shared",
            Batch {
                count,
                stride_a: 0,
                stride_b: lb,
                stride_c: lc,
            },
        ),
        (
            "B shared",
            Batch {
                count,
                stride_a: la,
                stride_b: 0,
                stride_c: lc + 1,
            },
        ),
    ];
    let mut all = Gather::default();
    for (case, (layout, batch)) in layouts.into_iter().enumerate() {
        let (trans, s) = (TRANSPOSES[case], SCALARS[case]);
        let span = |one: usize, stride: usize| (count - 1) * stride + one;
        let a = kind.round(ctx.rng.normal_vec(span(la, batch.stride_a), 1.0));
        let b = kind.round(ctx.rng.normal_vec(span(lb, batch.stride_b), 1.0));
        let inside = |i: usize| i % batch.stride_c < lc;
        let c0: Vec<f32> = (0..span(lc, batch.stride_c))
            .map(|i| match (inside(i), s.1 == 0.0) {
                (true, true) => f32::NAN,
                (true, false) => ctx.rng.normal() as f32,
                (false, _) => GAP,
            })
            .collect();
        let ops = Operands::new(&ctx.dev, kind, &a, &b)?;
        let mut c = Tensor::from_slice(&ctx.dev, &[c0.len()], &c0)?;
        let ((), secs) = ctx.timed(|_| ops.gemm(trans, (m, n, k), s, &mut c, Some(batch)))?;
        let got = c.to_vec()?;
        // The gaps keep GAP exactly; each product is held to its bound.
        let (mut want, mut bound) = (widen(&c0), vec![0.0; c0.len()]);
        let (a64, b64) = (widen(&a), widen(&b));
        for i in 0..count {
            let (oa, ob, oc) = (i * batch.stride_a, i * batch.stride_b, i * batch.stride_c);
            let c64 = start_ref(&c0[oc..oc + lc], s.1);
            let (w, bd) = expected(
                trans,
                (m, n, k),
                s,
                &a64[oa..oa + la],
                &b64[ob..ob + lb],
                &c64,
            );
            want[oc..oc + lc].copy_from_slice(&w);
            bound[oc..oc + lc].copy_from_slice(&bd);
        }
        all.add(format!("{layout} {}", tt(trans)), &got, &want, &bound, secs);
    }
    let label = kind.family(cublas);
    all.record(
        ctx,
        format!("{label} batched x{count}: packed, padded, A shared, B shared; gaps kept"),
    );
    Ok(layouts.len() as u64)
}

/// BLAS's edge cases, exactly: `alpha = 0` reads neither A nor B (an inf in A must not make
/// NaN) and gives `C = beta C`; `k = 0` gives `C = beta C`, zeros for beta = 0 into NaN. Our
/// kernels take these even when cuBLAS is selected (no cuBLAS call).
fn edges(ctx: &mut Ctx, cublas: bool) -> Result<u64> {
    let (m, n, k) = (70, 66, 20);
    let c0: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
    for kind in KINDS {
        let mut a = vec![1.0f32; m * k];
        // An inf is exact in every type.
        a[5] = f32::INFINITY;
        let ops = Operands::new(&ctx.dev, kind, &a, &vec![2.0; k * n])?;
        let empty = Operands::new(&ctx.dev, kind, &[], &[])?;
        let mut c = Tensor::from_slice(&ctx.dev, &[m * n], &c0)?;
        let mut c2 = Tensor::from_slice(&ctx.dev, &[m * n], &c0)?;
        let mut c3 = Tensor::zeros(&ctx.dev, &[m * n])?;
        c3.poison()?;
        let ((), secs) = ctx.timed(|_| {
            ops.gemm((false, false), (m, n, k), (0.0, 0.5), &mut c, None)?;
            empty.gemm((false, true), (m, n, 0), (1.0, 2.0), &mut c2, None)?;
            empty.gemm((true, false), (m, n, 0), (1.0, 0.0), &mut c3, None)
        })?;
        let mut got = c.to_vec()?;
        got.extend(c2.to_vec()?);
        got.extend(c3.to_vec()?);
        let mut want: Vec<f32> = c0.iter().map(|v| 0.5 * v).collect();
        want.extend(c0.iter().map(|v| 2.0 * v));
        want.extend(vec![0.0; m * n]);
        let label = kind.family(cublas);
        ctx.exact(
            format!("{label}: alpha 0 (inf in A) and k 0 give beta C exactly"),
            &got,
            &want,
            secs,
        );
    }
    Ok(0)
}

/// `want[at(r, c)] = alpha sum_j term(r, c, j) + beta old[at(r, c)]` over r < rows, c < cols,
/// j < inner (beta = 0 assigns), with the bound `(inner + 4) eps (|alpha| sum_j |term| + |beta
/// old|)` of tests/gemm.rs: a gradient from its definition.
fn contraction(
    (rows, cols, inner): (usize, usize, usize),
    (alpha, beta): (f32, f32),
    old: &[f32],
    term: impl Fn(usize, usize, usize) -> f64,
    at: impl Fn(usize, usize) -> usize,
) -> (Vec<f64>, Vec<f64>) {
    let (mut want, mut bound) = (vec![0.0; old.len()], vec![0.0; old.len()]);
    let eps = (inner as f64 + 4.0) * f32::EPSILON as f64;
    for r in 0..rows {
        for c in 0..cols {
            let (s, s_abs) = (0..inner).fold((0.0, 0.0), |(s, t), j| {
                let p = term(r, c, j);
                (s + p, t + p.abs())
            });
            let i = at(r, c);
            let old = if beta == 0.0 {
                0.0
            } else {
                beta as f64 * old[i] as f64
            };
            want[i] = alpha as f64 * s + old;
            bound[i] = eps * ((alpha as f64).abs() * s_abs + old.abs()) + 1e-30;
        }
    }
    (want, bound)
}

/// `matmul_backward` for every transpose pair (the last one a batch of two), dA and dB from
/// their definitions: even cases assign dA (into NaN) and accumulate dB, odd cases the reverse.
fn matmul_backward(ctx: &mut Ctx, cublas: bool) -> Result<u64> {
    let (m, n, k) = (33, 20, 27);
    let (la, lb, lc) = (m * k, k * n, m * n);
    let alpha = 0.5;
    let (mut gda, mut gdb) = (Gather::default(), Gather::default());
    for (case, trans) in TRANSPOSES.into_iter().enumerate() {
        let count = if case == 3 { 2 } else { 1 };
        let (beta_a, beta_b) = if case % 2 == 0 {
            (0.0, 1.0)
        } else {
            (1.0, 0.0)
        };
        let a = ctx.rng.normal_vec(la * count, 1.0);
        let b = ctx.rng.normal_vec(lb * count, 1.0);
        let dy = ctx.rng.normal_vec(lc * count, 1.0);
        let (da0, db0) = (
            start(ctx, la * count, beta_a),
            start(ctx, lb * count, beta_b),
        );
        let dev = &ctx.dev;
        let (at, bt) = (
            Tensor::from_slice(dev, &[a.len()], &a)?,
            Tensor::from_slice(dev, &[b.len()], &b)?,
        );
        let dyt = Tensor::from_slice(dev, &[dy.len()], &dy)?;
        let (mut da, mut db) = (output(dev, &da0, beta_a)?, output(dev, &db0, beta_b)?);
        let ((), secs) = ctx.timed(|_| {
            let batch = Batch::packed(count, m, n, k);
            let (da, db) = (Some((&mut da, beta_a)), Some((&mut db, beta_b)));
            g::matmul_backward(
                trans.0, trans.1, m, n, k, alpha, &at, &bt, &dyt, da, db, batch,
            )
        })?;
        let (got_da, got_db) = (da.to_vec()?, db.to_vec()?);
        for i in 0..count {
            let (a, b, dy) = (&a[i * la..][..la], &b[i * lb..][..lb], &dy[i * lc..][..lc]);
            let op_a = |r: usize, l: usize| a[if trans.0 { l * m + r } else { r * k + l }] as f64;
            let op_b = |l: usize, j: usize| b[if trans.1 { j * k + l } else { l * n + j }] as f64;
            let dy = |r: usize, j: usize| dy[r * n + j] as f64;
            // dA_rl = alpha sum_j dY_rj op(B)_lj, stored like A.
            let (want, bound) = contraction(
                (m, k, n),
                (alpha, beta_a),
                &da0[i * la..][..la],
                |r, l, j| dy(r, j) * op_b(l, j),
                |r, l| if trans.0 { l * m + r } else { r * k + l },
            );
            let what = format!("{} product {i} dA beta {beta_a}", tt(trans));
            gda.add(what, &got_da[i * la..][..la], &want, &bound, secs);
            // dB_lj = alpha sum_r op(A)_rl dY_rj, stored like B.
            let (want, bound) = contraction(
                (k, n, m),
                (alpha, beta_b),
                &db0[i * lb..][..lb],
                |l, j, r| op_a(r, l) * dy(r, j),
                |l, j| if trans.1 { j * k + l } else { l * n + j },
            );
            let what = format!("{} product {i} dB beta {beta_b}", tt(trans));
            gdb.add(what, &got_db[i * lb..][..lb], &want, &bound, 0.0);
        }
    }
    let via = if cublas { " on cublas" } else { "" };
    gda.record(
        ctx,
        format!("matmul_backward{via} dA: nn nt tn tt (x2), assign/accumulate"),
    );
    gdb.record(
        ctx,
        format!("matmul_backward{via} dB: nn nt tn tt (x2), accumulate/assign"),
    );
    // Two products (dA, dB) per case.
    Ok(2 * TRANSPOSES.len() as u64)
}

/// The Linear layer against its f64 twins: forward with and without bias (y poisoned), backward
/// with dx assigned (into NaN) and accumulated, dw and dbias accumulated, and without dx and
/// dbias (only dw changes).
fn linear(ctx: &mut Ctx, cublas: bool) -> Result<u64> {
    let (rows, in_f, out_f) = (70, 24, 36);
    let x = ctx.rng.normal_vec(rows * in_f, 1.0);
    let w = ctx.rng.normal_vec(out_f * in_f, 0.5);
    let bias = ctx.rng.normal_vec(out_f, 1.0);
    let dy = ctx.rng.normal_vec(rows * out_f, 1.0);
    let dx0 = ctx.rng.normal_vec(rows * in_f, 1.0);
    let dw0 = ctx.rng.normal_vec(out_f * in_f, 1.0);
    let db0 = ctx.rng.normal_vec(out_f, 1.0);
    let (x64, w64, b64, dy64) = (widen(&x), widen(&w), widen(&bias), widen(&dy));
    // tests/gemm.rs: 1e-4, far below any layout mistake for these O(1) sums of at most 70
    // terms; tests/gemm_cublas.rs: 4 (k + 4) eps max(1, max |want|).
    let tol = |k: usize, want: &[f64]| {
        if cublas {
            let scale = want.iter().fold(1.0f64, |s, v| s.max(v.abs()));
            Tol::abs((k as f64 + 4.0) * f32::EPSILON as f64 * scale * 4.0)
        } else {
            Tol::new(1e-4, 1e-4)
        }
    };
    let via = if cublas { " on cublas" } else { "" };
    let dev = ctx.dev.clone();
    let xt = Tensor::from_slice(&dev, &[rows, in_f], &x)?;
    let wt = Tensor::from_slice(&dev, &[out_f, in_f], &w)?;
    let bt = Tensor::from_slice(&dev, &[out_f], &bias)?;
    let dyt = Tensor::from_slice(&dev, &[rows, out_f], &dy)?;
    for with_bias in [true, false] {
        let mut y = Tensor::zeros(&dev, &[rows, out_f])?;
        y.poison()?;
        let ((), secs) =
            ctx.timed(|_| g::linear_forward(&xt, &wt, with_bias.then_some(&bt), &mut y))?;
        let mut want = vec![0.0; rows * out_f];
        let b = with_bias.then_some(&b64[..]);
        g::linear_forward_host(&x64, &w64, b, &mut want, in_f, out_f);
        let name = format!("linear_forward{via} bias {with_bias}");
        ctx.compare(name, &y.to_vec()?, &want, tol(in_f, &want), secs);
    }
    for dx_beta in [0.0f32, 1.0] {
        let mut dx = output(&dev, &dx0, dx_beta)?;
        let mut dw = Tensor::from_slice(&dev, &[out_f * in_f], &dw0)?;
        let mut db = Tensor::from_slice(&dev, &[out_f], &db0)?;
        let ((), secs) = ctx.timed(|_| {
            let (dx, db) = (Some(&mut dx), Some(&mut db));
            g::linear_backward(&xt, &wt, &dyt, dx, dx_beta, &mut dw, db)
        })?;
        let (mut want_dx, mut want_dw, mut want_db) = (widen(&dx0), widen(&dw0), widen(&db0));
        g::linear_backward_host(
            &x64,
            &w64,
            &dy64,
            Some(&mut want_dx),
            dx_beta as f64,
            &mut want_dw,
            Some(&mut want_db),
            in_f,
        );
        let name = |what: &str| format!("linear_backward{via} {what} (dx beta {dx_beta})");
        ctx.compare(
            name("dx"),
            &dx.to_vec()?,
            &want_dx,
            tol(out_f, &want_dx),
            secs,
        );
        ctx.compare(
            name("dw"),
            &dw.to_vec()?,
            &want_dw,
            tol(rows, &want_dw),
            0.0,
        );
        ctx.compare(
            name("dbias"),
            &db.to_vec()?,
            &want_db,
            tol(rows, &want_db),
            0.0,
        );
    }
    let mut dw = Tensor::from_slice(&dev, &[out_f * in_f], &dw0)?;
    let ((), secs) = ctx.timed(|_| g::linear_backward(&xt, &wt, &dyt, None, 0.0, &mut dw, None))?;
    let mut want_dw = widen(&dw0);
    let mut scratch = vec![0.0; rows * in_f];
    g::linear_backward_host(
        &x64,
        &w64,
        &dy64,
        Some(&mut scratch),
        0.0,
        &mut want_dw,
        None,
        in_f,
    );
    let name = format!("linear_backward{via} dw alone (no dx, no dbias)");
    ctx.compare(name, &dw.to_vec()?, &want_dw, tol(rows, &want_dw), secs);
    // cuBLAS takes the forward without bias (ours adds a bias in its epilogue), and the dx and
    // dw products of each backward.
    Ok(1 + 2 + 2 + 1)
}

/// `column_sum` with beta 0 (into NaN) and 1 at a few shapes, each column within
/// `(rows + 2) eps (sum |x| + |beta out|)` of its f64 sum (tests/gemm.rs).
fn column_sum(ctx: &mut Ctx) -> Result<()> {
    let mut all = Gather::default();
    let shapes: &[(usize, usize)] = if ctx.quick {
        &[(1, 1), (300, 37), (9, 100)]
    } else {
        &[(1, 1), (300, 37), (9, 100), (4000, 70)]
    };
    for &(rows, cols) in shapes {
        for beta in [0.0f32, 1.0] {
            let x = ctx.rng.normal_vec(rows * cols, 1.0);
            let o = start(ctx, cols, beta);
            let xt = Tensor::from_slice(&ctx.dev, &[rows, cols], &x)?;
            let mut out = output(&ctx.dev, &o, beta)?;
            let ((), secs) = ctx.timed(|_| g::column_sum(&xt, &mut out, cols, beta))?;
            let eps = (rows as f64 + 2.0) * f32::EPSILON as f64;
            let (want, bound): (Vec<f64>, Vec<f64>) = (0..cols)
                .map(|j| {
                    let col = (0..rows).map(|i| x[i * cols + j] as f64);
                    let old = if beta == 0.0 {
                        0.0
                    } else {
                        (beta * o[j]) as f64
                    };
                    let abs = col.clone().map(f64::abs).sum::<f64>() + old.abs();
                    (col.sum::<f64>() + old, eps * abs + 1e-30)
                })
                .unzip();
            all.add(
                format!("{rows}x{cols} beta {beta}"),
                &out.to_vec()?,
                &want,
                &bound,
                secs,
            );
        }
    }
    all.record(
        ctx,
        format!("column_sum: {} shapes, beta 0 and 1", shapes.len()),
    );
    Ok(())
}

/// The same product twice gives the same bits (f32 nt and bf16 nn; on emu, under two thread
/// orders): every output is one fixed-order sum.
fn determinism(ctx: &mut Ctx) -> Result<()> {
    let (m, n, k) = (150, 70, 90);
    for (kind, trans) in [(Kind::F32, (false, true)), (Kind::Bf16, (false, false))] {
        let a = kind.round(ctx.rng.normal_vec(m * k, 1.0));
        let b = kind.round(ctx.rng.normal_vec(k * n, 1.0));
        let ops = Operands::new(&ctx.dev, kind, &a, &b)?;
        let mut runs = Vec::new();
        let mut seconds = 0.0;
        for _ in 0..2 {
            let mut c = Tensor::zeros(&ctx.dev, &[m * n])?;
            c.poison()?;
            let ((), secs) = ctx.timed(|_| ops.gemm(trans, (m, n, k), (1.0, 0.0), &mut c, None))?;
            seconds += secs;
            runs.push(
                c.to_vec()?
                    .iter()
                    .map(|x| x.to_bits())
                    .collect::<Vec<u32>>(),
            );
        }
        let name = format!("{}: the same bits twice", kind.label(trans, false));
        ctx.exact(name, &runs[1], &runs[0], seconds);
    }
    Ok(())
}

/// The cuBLAS path. Where cuBLAS runs: every GEMM check again with cuBLAS selected, and cuBLAS
/// must have taken exactly the products it is meant to. Elsewhere: why not (on cpu and emu
/// always, and selecting it must change nothing there, bit for bit; on cuda a missing library
/// is a note, not a failure).
fn cublas_path(ctx: &mut Ctx) -> Result<()> {
    let is_cuda = matches!(ctx.dev, Device::Cuda(_));
    match cublas::status(&ctx.dev) {
        Ok(line) => {
            let _sel = Backend::select(GemmBackend::Cublas);
            let before = cublas::calls();
            let expected = all_products(ctx, true)?;
            let made = cublas::calls() - before;
            ctx.truth(
                format!("cublas ({line}): took the {expected} products meant for it"),
                made == expected,
                format!("cuBLAS made {made} calls, expected {expected}"),
            );
        }
        Err(why) if is_cuda => {
            let name = format!("cublas: not present ({why:#}); a note on cuda, not a failure");
            ctx.truth(name, true, "");
        }
        Err(why) => {
            ctx.truth(format!("cublas: not present ({why:#})"), true, "");
            // Selected anyway, it must leave our kernels' results bit for bit and never run.
            let (m, n, k) = (33, 17, 9);
            let (a, b) = (
                ctx.rng.normal_vec(m * k, 1.0),
                ctx.rng.normal_vec(k * n, 1.0),
            );
            let ops = Operands::new(&ctx.dev, Kind::F32, &a, &b)?;
            let before = cublas::calls();
            let mut runs = Vec::new();
            let mut seconds = 0.0;
            for backend in [GemmBackend::Ours, GemmBackend::Cublas, GemmBackend::Auto] {
                let _sel = Backend::select(backend);
                let mut c = Tensor::zeros(&ctx.dev, &[m * n])?;
                let ((), secs) =
                    ctx.timed(|_| ops.gemm((false, false), (m, n, k), (1.0, 0.0), &mut c, None))?;
                seconds += secs;
                runs.push(
                    c.to_vec()?
                        .iter()
                        .map(|x| x.to_bits())
                        .collect::<Vec<u32>>(),
                );
            }
            let name = "cublas or auto selected without cuBLAS: our kernels' bits";
            let got = [&runs[1][..], &runs[2][..]].concat();
            ctx.exact(name, &got, &[&runs[0][..], &runs[0][..]].concat(), seconds);
            let made = cublas::calls() - before;
            let name = "cublas or auto selected without cuBLAS: no cuBLAS call";
            ctx.truth(name, made == 0, format!("{made} cuBLAS calls"));
        }
    }
    Ok(())
}
