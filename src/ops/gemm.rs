//! Dense matrix products, and the Linear layer built on them. Kernels: `cuda/gemm.cu`.
//!
//! Every matrix is row-major. [`gemm()`] computes `C = alpha op(A) op(B) + beta C` with
//! `op(X) = X` or `X^T`: `A` is stored `[m, k]` (or `[k, m]` when `transa`), `B` is stored
//! `[k, n]` (or `[n, k]` when `transb`), `C` is `[m, n]`. [`gemm_batched`] runs `count` such
//! products whose operands lie `stride` elements apart (attention heads), and [`gemm_half`] takes
//! bf16 or f16 operands into an f32 `C` with f32 accumulation (the tensor-core path).
//!
//! As in BLAS, `beta = 0` assigns `C` without reading it (it may hold NaN), and `alpha = 0` reads
//! neither `A` nor `B`. Results are deterministic on every device: each output is one fixed-order
//! sum (no atomics, no split-k). That holds for our kernels, the default; on cuda, `HIERMD_GEMM`
//! can hand products to cuBLAS instead, whose weaker guarantee [`super::gemm_cublas`] states.
//!
//! Backward passes follow llm.c: activation gradients are assigned or accumulated as the caller
//! asks (`beta`), parameter gradients are accumulated (`+=`).
//!
//! The cpu device runs the `gemm` crate (packed, cache-blocked, SIMD microkernels, rayon), which
//! measured as fast as `matrixmultiply` on square products here and faster on the token model's
//! tall-skinny shapes, and shares the crate's rayon pool instead of starting its own threads.
//! [`gemm_reference`] is a plain f64 triple loop for the tests.

use super::{same_device, Real};
use crate::device::Device;
use crate::kernels::gemm as k;
use crate::launch::{launch, Kernel, KernelArgs, LaunchConfig};
use crate::tensor::{Element, Tensor};
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;

/// Threads per block of `gemm_f32_*` (`kF32Threads` in `cuda/gemm.cu`).
const F32_THREADS: u32 = 128;
/// Block tile of `gemm_f32_*`: rows of C, columns of C (`kF32BlockM`, `kF32BlockN`).
const F32_TILE: (usize, usize) = (128, 64);
/// Dynamic shared memory of `gemm_f32_*` (`kF32SharedBytes`; the kernel checks it).
const F32_SHARED_BYTES: u32 = 25_600;
/// Threads per block of `gemm_bf16_*` / `gemm_f16_*` (`kMmaThreads`).
const MMA_THREADS: u32 = 128;
/// Block tile of the tensor-core kernels (`kMmaBlockM`, `kMmaBlockN`).
const MMA_TILE: (usize, usize) = (128, 64);
/// Dynamic shared memory of the tensor-core kernels (`kMmaSharedBytes`; the kernel checks it).
const MMA_SHARED_BYTES: u32 = 30_720;
/// Block of `column_sum`: 32 columns x 8 row groups (`kColSumCols`, `kColSumGroups`).
const COLSUM_BLOCK: [u32; 3] = [32, 8, 1];
/// CUDA's limit on gridDim.y and gridDim.z.
const GRID_YZ_MAX: usize = 65_535;

/// Below this many multiply-adds a product runs on one thread: rayon's hand-off costs more than
/// it saves.
const CPU_PARALLEL_MIN_MACS: usize = 1 << 17;

/// How the matrices of a batched product lie in their tensors: matrix `i` of A starts at element
/// `i * stride_a`, and so on. A stride of 0 reuses one matrix for every product (a weight shared
/// by all heads); C's matrices must not overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Number of products.
    pub count: usize,
    /// Elements between consecutive matrices of A.
    pub stride_a: usize,
    /// Elements between consecutive matrices of B.
    pub stride_b: usize,
    /// Elements between consecutive matrices of C (at least m n when count > 1).
    pub stride_c: usize,
}

impl Batch {
    /// One product.
    pub fn single() -> Self {
        Self {
            count: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }

    /// `count` products whose matrices are stored back to back (`[count, ...]` tensors).
    pub fn packed(count: usize, m: usize, n: usize, k: usize) -> Self {
        Self {
            count,
            stride_a: m * k,
            stride_b: k * n,
            stride_c: m * n,
        }
    }
}

/// The shape of one (batched) product, checked once and shared by every device's path.
#[derive(Clone, Copy, Debug)]
struct Problem {
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    batch: Batch,
}

impl Problem {
    /// Row length of A as stored.
    fn lda(&self) -> usize {
        if self.transa {
            self.m
        } else {
            self.k
        }
    }
    /// Row length of B as stored.
    fn ldb(&self) -> usize {
        if self.transb {
            self.k
        } else {
            self.n
        }
    }
    /// A's stored shape, for messages.
    fn a_dims(&self) -> [usize; 2] {
        if self.transa {
            [self.k, self.m]
        } else {
            [self.m, self.k]
        }
    }
    /// B's stored shape, for messages.
    fn b_dims(&self) -> [usize; 2] {
        if self.transb {
            [self.n, self.k]
        } else {
            [self.k, self.n]
        }
    }
    /// Nothing to compute or write.
    fn is_empty(&self) -> bool {
        self.m == 0 || self.n == 0 || self.batch.count == 0
    }
}

/// Elements a batch of `count` matrices of `dims` spaced `stride` apart spans.
fn extent(op: &str, name: &str, dims: [usize; 2], count: usize, stride: usize) -> Result<usize> {
    let one = dims[0].checked_mul(dims[1]);
    let all = one.and_then(|one| {
        count
            .saturating_sub(1)
            .checked_mul(stride)
            .and_then(|s| s.checked_add(one))
    });
    all.with_context(|| format!("{op}: {name} of {count} x {dims:?} overflows the address space"))
}

/// Checks one operand's size: exactly one matrix for a single product (and its shape, when the
/// tensor is 2-D), at least the span of the batch for a batched one.
fn check_operand<T: Element>(
    op: &str,
    name: &str,
    t: &Tensor<T>,
    dims: [usize; 2],
    count: usize,
    stride: usize,
    batched: bool,
) -> Result<()> {
    let need = extent(op, name, dims, count, stride)?;
    // A 2-D tensor states its matrix shape: hold it to it, so that a transposed operand passed
    // with the wrong flag is caught even though its element count fits.
    if !batched && t.shape().len() == 2 && t.shape() != dims {
        bail!(
            "{op}: {name} has shape {:?}, expected [{}, {}]",
            t.shape(),
            dims[0],
            dims[1]
        );
    }
    if !batched && t.len() != need {
        bail!(
            "{op}: {name} has shape {:?} ({} elements), expected a {} x {} matrix ({need} elements)",
            t.shape(),
            t.len(),
            dims[0],
            dims[1]
        );
    }
    if batched && t.len() < need {
        bail!(
            "{op}: {name} has shape {:?} ({} elements), but {count} matrices of {} x {} spaced {stride} elements apart need {need}",
            t.shape(),
            t.len(),
            dims[0],
            dims[1]
        );
    }
    Ok(())
}

/// Checks every operand of a product and the kernels' integer limits.
#[allow(clippy::too_many_arguments)] // the BLAS argument list, which readers know
fn check_problem<A: Element>(
    op: &str,
    p: &Problem,
    a: &Tensor<A>,
    b: &Tensor<A>,
    c: &Tensor<f32>,
    bias: Option<&Tensor<f32>>,
    batched: bool,
) -> Result<()> {
    let Batch {
        count,
        stride_a,
        stride_b,
        stride_c,
    } = p.batch;
    let lim = i32::MAX as usize;
    ensure!(
        p.m <= lim && p.n <= lim && p.k <= lim,
        "{op}: m x n x k = {} x {} x {} exceeds the kernels' 32-bit dimensions",
        p.m,
        p.n,
        p.k
    );
    let a_dims = p.a_dims();
    let b_dims = p.b_dims();
    let what_a = if p.transa { "A (stored [k, m])" } else { "A" };
    let what_b = if p.transb { "B (stored [n, k])" } else { "B" };
    check_operand(op, what_a, a, a_dims, count, stride_a, batched)?;
    check_operand(op, what_b, b, b_dims, count, stride_b, batched)?;
    check_operand(op, "C", c, [p.m, p.n], count, stride_c, batched)?;
    if count > 1 && p.m * p.n > 0 {
        ensure!(
            stride_c >= p.m * p.n,
            "{op}: C's stride {stride_c} is less than one {} x {} matrix ({} elements): the products would overwrite each other",
            p.m,
            p.n,
            p.m * p.n
        );
    }
    if let Some(bias) = bias {
        ensure!(
            bias.len() == p.n,
            "{op}: bias has shape {:?} ({} elements), expected one value per column of C ({})",
            bias.shape(),
            bias.len(),
            p.n
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CPU twins.

/// The float types the CPU GEMM handles (f32, f64): those the `gemm` crate has kernels for.
pub trait GemmReal: Real + 'static + sealed::Sealed {}
impl GemmReal for f32 {}
impl GemmReal for f64 {}

mod sealed {
    /// Keeps [`super::GemmReal`] to the types the `gemm` crate dispatches on (it panics on others).
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}

/// One product on the CPU, through the `gemm` crate, with its strides spelling out the
/// transposes. C = alpha op(A) op(B) + beta C.
#[allow(clippy::too_many_arguments)] // the BLAS argument list, which readers know
fn gemm_one<R: GemmReal>(
    p: &Problem,
    alpha: R,
    a: &[R],
    b: &[R],
    beta: R,
    c: &mut [R],
    parallel: bool,
) {
    let (m, n, k) = (p.m, p.n, p.k);
    let c = &mut c[..m * n];
    if k == 0 || alpha == R::of(0.0) {
        // alpha = 0 reads neither A nor B (BLAS), so an inf there cannot make 0 * inf = NaN.
        scale_host(c, beta);
        return;
    }
    // Element (i, l) of op(A) sits at i * rs + l * cs in A's storage.
    let (a_rs, a_cs) = if p.transa { (1, m) } else { (k, 1) };
    let (b_rs, b_cs) = if p.transb { (1, k) } else { (n, 1) };
    let par = if parallel && m * n * k >= CPU_PARALLEL_MIN_MACS {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    let read_c = beta != R::of(0.0);
    // SAFETY: the slices hold every element the strides reach: A spans m k, B k n, C m n
    // elements (checked by the callers), and C does not alias A or B (a &mut borrow).
    unsafe {
        // The crate computes dst = alpha dst + beta lhs rhs: its alpha and beta are BLAS's beta
        // and alpha. With read_dst false it assigns without reading C.
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            read_c,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// c = beta c, and exactly zero when beta = 0 (whatever c held, NaN included).
fn scale_host<R: Real>(c: &mut [R], beta: R) {
    if beta == R::of(0.0) {
        c.iter_mut().for_each(|v| *v = R::of(0.0));
    } else if beta != R::of(1.0) {
        c.iter_mut().for_each(|v| *v = beta * *v);
    }
}

/// Adds `bias[j]` to column j of the row-major `[rows, n]` matrix c.
fn add_bias_host<R: Real>(c: &mut [R], bias: &[R]) {
    let n = bias.len().max(1);
    c.par_chunks_mut(n).for_each(|row| {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v = *v + b;
        }
    });
}

/// CPU twin of the batched kernels: `count` products C_i = alpha op(A_i) op(B_i) + beta C_i, the
/// matrices of each operand `stride` elements apart (see [`Batch`]). The slices must hold
/// the whole batch (the device entry points check this).
#[allow(clippy::too_many_arguments)] // the BLAS argument list, which readers know
pub fn gemm_host<R: GemmReal>(
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: R,
    a: &[R],
    b: &[R],
    beta: R,
    c: &mut [R],
    batch: Batch,
) {
    let p = Problem {
        transa,
        transb,
        m,
        n,
        k,
        batch,
    };
    if p.is_empty() {
        return;
    }
    let (sa, sb, sc) = (batch.stride_a, batch.stride_b, batch.stride_c.max(m * n));
    let a_len = m * k;
    let b_len = k * n;
    if batch.count == 1 {
        gemm_one(&p, alpha, &a[..a_len], &b[..b_len], beta, c, true);
        return;
    }
    // Many small products: one per rayon task. Few large ones: one after another, each spread
    // over the pool by the crate.
    let small = m * n * k < CPU_PARALLEL_MIN_MACS;
    let c = &mut c[..(batch.count - 1) * sc + m * n];
    if small {
        c.par_chunks_mut(sc).enumerate().for_each(|(i, ci)| {
            let ai = &a[i * sa..i * sa + a_len];
            let bi = &b[i * sb..i * sb + b_len];
            gemm_one(&p, alpha, ai, bi, beta, ci, false);
        });
    } else {
        for (i, ci) in c.chunks_mut(sc).enumerate() {
            let ai = &a[i * sa..i * sa + a_len];
            let bi = &b[i * sb..i * sb + b_len];
            gemm_one(&p, alpha, ai, bi, beta, ci, true);
        }
    }
}

/// The tests' reference: C = alpha op(A) op(B) + beta C by a plain triple loop in f64 (beta = 0
/// assigns). One product; for a batch, call it per matrix.
#[allow(clippy::too_many_arguments)] // the BLAS argument list, which readers know
pub fn gemm_reference(
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f64,
    a: &[f64],
    b: &[f64],
    beta: f64,
    c: &mut [f64],
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0;
            for l in 0..k {
                let av = if transa { a[l * m + i] } else { a[i * k + l] };
                let bv = if transb { b[j * k + l] } else { b[l * n + j] };
                acc += av * bv;
            }
            let old = if beta == 0.0 {
                0.0
            } else {
                beta * c[i * n + j]
            };
            c[i * n + j] = alpha * acc + old;
        }
    }
}

/// CPU twin of `column_sum`: `out[j] = beta out[j] + sum_i x[i, j]` for a row-major `[rows, cols]` x
/// (beta = 0 assigns). Rows are summed in fixed chunks and the partial sums added in order, so the
/// result does not depend on the thread count.
pub fn column_sum_host<R: Real>(x: &[R], out: &mut [R], cols: usize, beta: R) {
    const ROWS_PER_TASK: usize = 256;
    if cols == 0 {
        return;
    }
    let partials: Vec<Vec<R>> = x
        .par_chunks(ROWS_PER_TASK * cols)
        .map(|block| {
            let mut s = vec![R::of(0.0); cols];
            for row in block.chunks_exact(cols) {
                for (s, &v) in s.iter_mut().zip(row) {
                    *s = *s + v;
                }
            }
            s
        })
        .collect();
    for (j, o) in out.iter_mut().enumerate() {
        let total = partials.iter().fold(R::of(0.0), |acc, p| acc + p[j]);
        *o = if beta == R::of(0.0) {
            total
        } else {
            beta * *o + total
        };
    }
}

/// CPU twin of [`linear_forward`]: y = x w^T + bias, x [rows, in], w [out, in], y [rows, out].
pub fn linear_forward_host<R: GemmReal>(
    x: &[R],
    w: &[R],
    bias: Option<&[R]>,
    y: &mut [R],
    in_features: usize,
    out_features: usize,
) {
    let rows = y.len() / out_features.max(1);
    let one = R::of(1.0);
    gemm_host(
        false,
        true,
        rows,
        out_features,
        in_features,
        one,
        x,
        w,
        R::of(0.0),
        y,
        Batch::single(),
    );
    if let Some(bias) = bias {
        add_bias_host(y, bias);
    }
}

/// CPU twin of [`linear_backward`]: dx = dy w + dx_beta dx (when dx is given), dw += dy^T x,
/// dbias += column sums of dy.
#[allow(clippy::too_many_arguments)] // x, w, dy and the three gradients
pub fn linear_backward_host<R: GemmReal>(
    x: &[R],
    w: &[R],
    dy: &[R],
    dx: Option<&mut [R]>,
    dx_beta: R,
    dw: &mut [R],
    dbias: Option<&mut [R]>,
    in_features: usize,
) {
    let out_features = dw.len() / in_features.max(1);
    let rows = dy.len() / out_features.max(1);
    let one = R::of(1.0);
    if let Some(dx) = dx {
        gemm_host(
            false,
            false,
            rows,
            in_features,
            out_features,
            one,
            dy,
            w,
            dx_beta,
            dx,
            Batch::single(),
        );
    }
    gemm_host(
        true,
        false,
        out_features,
        in_features,
        rows,
        one,
        dy,
        x,
        one,
        dw,
        Batch::single(),
    );
    if let Some(db) = dbias {
        column_sum_host(dy, db, out_features, one);
    }
}

// ---------------------------------------------------------------------------------------------
// Device entry points.

fn host<'a, T: Element>(op: &str, t: &'a Tensor<T>) -> Result<&'a [T]> {
    t.host().with_context(|| {
        format!(
            "{op}: tensor on {} is not in host memory",
            t.device().name()
        )
    })
}

fn host_mut<'a, T: Element>(op: &str, t: &'a mut Tensor<T>) -> Result<&'a mut [T]> {
    let name = t.device().name();
    t.host_mut()
        .with_context(|| format!("{op}: tensor on {name} is not in host memory"))
}

/// The kernel of a family for one pair of transposes.
fn pick(family: &[&'static Kernel; 4], transa: bool, transb: bool) -> &'static Kernel {
    family[(transa as usize) * 2 + transb as usize]
}

/// `gemm_f32_*` in the order nn, nt, tn, tt.
static F32_KERNELS: [&Kernel; 4] = [
    &k::GEMM_F32_NN,
    &k::GEMM_F32_NT,
    &k::GEMM_F32_TN,
    &k::GEMM_F32_TT,
];

/// Launches one family's kernel over the whole batch (several launches when the batch exceeds
/// CUDA's 65,535 blocks in z).
#[allow(clippy::too_many_arguments)] // the BLAS argument list, which readers know
fn launch_gemm<A: Element>(
    dev: &Device,
    kernel: &Kernel,
    (tile_m, tile_n): (usize, usize),
    threads: u32,
    shared_bytes: u32,
    p: &Problem,
    alpha: f32,
    a: &Tensor<A>,
    b: &Tensor<A>,
    beta: f32,
    c: &mut Tensor<f32>,
    bias: Option<&Tensor<f32>>,
) -> Result<()> {
    let blocks_n = p.n.div_ceil(tile_n);
    ensure!(
        blocks_n <= GRID_YZ_MAX,
        "{}: n = {} needs {blocks_n} column tiles, more than the grid's 65,535",
        kernel.name,
        p.n
    );
    let Batch {
        count,
        stride_a,
        stride_b,
        stride_c,
    } = p.batch;
    let esize = size_of::<A>() as u64;
    let mut first = 0;
    while first < count {
        let chunk = (count - first).min(GRID_YZ_MAX);
        // Later chunks start part-way into the tensors: their addresses go in as plain pointers.
        let off = first as u64;
        let args = KernelArgs::new()
            .i32(p.m as i32)
            .i32(p.n as i32)
            .i32(p.k as i32)
            .f32(alpha)
            .i64((a.address() + off * stride_a as u64 * esize) as i64)
            .i32(p.lda() as i32)
            .i64(stride_a as i64)
            .i64((b.address() + off * stride_b as u64 * esize) as i64)
            .i32(p.ldb() as i32)
            .i64(stride_b as i64)
            .f32(beta)
            .i64((c.address() + off * stride_c as u64 * 4) as i64)
            .i32(p.n as i32)
            .i64(stride_c as i64);
        // A null `const float*` when there is no bias.
        let args = match bias {
            Some(bias) => args.input(bias),
            None => args.i64(0),
        };
        launch(
            dev,
            kernel,
            LaunchConfig {
                grid: [p.m.div_ceil(tile_m) as u32, blocks_n as u32, chunk as u32],
                block: [threads, 1, 1],
                shared_bytes,
            },
            args,
        )?;
        first += chunk;
    }
    Ok(())
}

/// The f32 product on any device, with an optional bias added to every row of C.
#[allow(clippy::too_many_arguments)] // the BLAS argument list, which readers know
fn gemm_f32_any(
    op: &str,
    p: &Problem,
    alpha: f32,
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    beta: f32,
    c: &mut Tensor<f32>,
    bias: Option<&Tensor<f32>>,
    batched: bool,
) -> Result<()> {
    let mut others = vec![b.device(), c.device()];
    if let Some(bias) = bias {
        others.push(bias.device());
    }
    let dev = same_device(op, a.device(), &others)?.clone();
    check_problem(op, p, a, b, c, bias, batched)?;
    if p.is_empty() {
        return Ok(());
    }
    // On cuda, cuBLAS takes the product instead of our kernel when HIERMD_GEMM or
    // gemm_cublas::set_backend selects it and it loads (see gemm_cublas.rs); a bias epilogue
    // stays on our kernel, which adds it in the epilogue.
    if let (Device::Cuda(cuda), None) = (&dev, bias) {
        let (trans, dims) = ((p.transa, p.transb), (p.m, p.n, p.k));
        if super::gemm_cublas::try_sgemm(cuda, trans, dims, alpha, a, b, beta, c, p.batch)? {
            return Ok(());
        }
    }
    match dev {
        Device::Cpu => {
            let (a, b) = (host(op, a)?, host(op, b)?);
            let bias = bias.map(|t| host(op, t)).transpose()?;
            let c = host_mut(op, c)?;
            gemm_host(
                p.transa, p.transb, p.m, p.n, p.k, alpha, a, b, beta, c, p.batch,
            );
            if let Some(bias) = bias {
                let sc = p.batch.stride_c.max(p.m * p.n);
                for i in 0..p.batch.count {
                    add_bias_host(&mut c[i * sc..i * sc + p.m * p.n], bias);
                }
            }
            Ok(())
        }
        _ => launch_gemm(
            &dev,
            pick(&F32_KERNELS, p.transa, p.transb),
            F32_TILE,
            F32_THREADS,
            F32_SHARED_BYTES,
            p,
            alpha,
            a,
            b,
            beta,
            c,
            bias,
        ),
    }
}

/// C = alpha op(A) op(B) + beta C, all f32, row-major: A is `[m, k]` (`[k, m]` when `transa`), B
/// `[k, n]` (`[n, k]` when `transb`), C `[m, n]`. `beta = 0` assigns C without reading it.
///
/// The tensors must hold exactly those matrices (any shape with that many elements); errors
/// name the operand and the shapes.
#[allow(clippy::too_many_arguments)] // the BLAS argument list, which readers know
pub fn gemm(
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    beta: f32,
    c: &mut Tensor<f32>,
) -> Result<()> {
    let p = Problem {
        transa,
        transb,
        m,
        n,
        k,
        batch: Batch::single(),
    };
    gemm_f32_any("gemm", &p, alpha, a, b, beta, c, None, false)
}

/// `batch.count` products C_i = alpha op(A_i) op(B_i) + beta C_i as in [`gemm()`], matrix i of each
/// operand starting `i * stride` elements into its tensor (see [`Batch`]). The tensors must span
/// the whole batch.
#[allow(clippy::too_many_arguments)] // the BLAS argument list, which readers know
pub fn gemm_batched(
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    beta: f32,
    c: &mut Tensor<f32>,
    batch: Batch,
) -> Result<()> {
    let p = Problem {
        transa,
        transb,
        m,
        n,
        k,
        batch,
    };
    gemm_f32_any("gemm_batched", &p, alpha, a, b, beta, c, None, true)
}

/// 16-bit float operands of [`gemm_half`]: `half::bf16` and `half::f16`.
pub trait HalfFloat: Element + sealed_half::Sealed {
    /// Its value as f32 (exact).
    fn to_f32(self) -> f32;
    /// An f32 rounded to this type (to nearest even).
    fn from_f32(x: f32) -> Self;
    /// The kernels `gemm_<type>_{nn,nt,tn,tt}`.
    #[doc(hidden)]
    fn kernels() -> &'static [&'static Kernel; 4];
}

mod sealed_half {
    /// Keeps [`super::HalfFloat`] to the types the tensor-core kernels take.
    pub trait Sealed {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

static BF16_KERNELS: [&Kernel; 4] = [
    &k::GEMM_BF16_NN,
    &k::GEMM_BF16_NT,
    &k::GEMM_BF16_TN,
    &k::GEMM_BF16_TT,
];
static F16_KERNELS: [&Kernel; 4] = [
    &k::GEMM_F16_NN,
    &k::GEMM_F16_NT,
    &k::GEMM_F16_TN,
    &k::GEMM_F16_TT,
];

impl HalfFloat for half::bf16 {
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn kernels() -> &'static [&'static Kernel; 4] {
        &BF16_KERNELS
    }
}

impl HalfFloat for half::f16 {
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn kernels() -> &'static [&'static Kernel; 4] {
        &F16_KERNELS
    }
}

/// As [`gemm()`] with bf16 or f16 A and B: C (f32) = alpha op(A) op(B) + beta C, products of the
/// 16-bit values accumulated in f32 (tensor cores on cuda and emu; on cpu the operands are widened
/// to f32, exactly, and multiplied by the f32 GEMM).
#[allow(clippy::too_many_arguments)] // the BLAS argument list, which readers know
pub fn gemm_half<T: HalfFloat>(
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &Tensor<T>,
    b: &Tensor<T>,
    beta: f32,
    c: &mut Tensor<f32>,
) -> Result<()> {
    let p = Problem {
        transa,
        transb,
        m,
        n,
        k,
        batch: Batch::single(),
    };
    gemm_half_any("gemm_half", &p, alpha, a, b, beta, c, false)
}

/// The batched form of [`gemm_half`], with the strides of [`gemm_batched`].
#[allow(clippy::too_many_arguments)] // the BLAS argument list, which readers know
pub fn gemm_half_batched<T: HalfFloat>(
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &Tensor<T>,
    b: &Tensor<T>,
    beta: f32,
    c: &mut Tensor<f32>,
    batch: Batch,
) -> Result<()> {
    let p = Problem {
        transa,
        transb,
        m,
        n,
        k,
        batch,
    };
    gemm_half_any("gemm_half_batched", &p, alpha, a, b, beta, c, true)
}

#[allow(clippy::too_many_arguments)] // the BLAS argument list, which readers know
fn gemm_half_any<T: HalfFloat>(
    op: &str,
    p: &Problem,
    alpha: f32,
    a: &Tensor<T>,
    b: &Tensor<T>,
    beta: f32,
    c: &mut Tensor<f32>,
    batched: bool,
) -> Result<()> {
    let dev = same_device(op, a.device(), &[b.device(), c.device()])?.clone();
    check_problem(op, p, a, b, c, None, batched)?;
    if p.is_empty() {
        return Ok(());
    }
    // cuBLAS (cublasGemmEx, f32 accumulation) when selected and available, as in gemm_f32_any.
    if let Device::Cuda(cuda) = &dev {
        let (trans, dims) = ((p.transa, p.transb), (p.m, p.n, p.k));
        if super::gemm_cublas::try_gemm_half(cuda, trans, dims, alpha, a, b, beta, c, p.batch)? {
            return Ok(());
        }
    }
    match dev {
        Device::Cpu => {
            let widen = |t: &[T]| t.par_iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
            let (a, b) = (widen(host(op, a)?), widen(host(op, b)?));
            let c = host_mut(op, c)?;
            gemm_host(
                p.transa, p.transb, p.m, p.n, p.k, alpha, &a, &b, beta, c, p.batch,
            );
            Ok(())
        }
        _ => launch_gemm(
            &dev,
            pick(T::kernels(), p.transa, p.transb),
            MMA_TILE,
            MMA_THREADS,
            MMA_SHARED_BYTES,
            p,
            alpha,
            a,
            b,
            beta,
            c,
            None,
        ),
    }
}

/// `out[j] = beta out[j] + sum_i x[i, j]` for a row-major `[rows, cols]` x (`beta = 0` assigns):
/// the bias gradient of a Linear layer (beta = 1 accumulates it).
pub fn column_sum(x: &Tensor<f32>, out: &mut Tensor<f32>, cols: usize, beta: f32) -> Result<()> {
    let op = "column_sum";
    let dev = same_device(op, x.device(), &[out.device()])?.clone();
    ensure!(
        out.len() == cols,
        "{op}: out has shape {:?} ({} elements), expected one value per column ({cols})",
        out.shape(),
        out.len()
    );
    ensure!(
        cols > 0 || x.is_empty(),
        "{op}: x has {} elements but no columns",
        x.len()
    );
    if cols == 0 {
        return Ok(());
    }
    ensure!(
        x.len().is_multiple_of(cols),
        "{op}: x has shape {:?} ({} elements), not a whole number of rows of {cols}",
        x.shape(),
        x.len()
    );
    let rows = x.len() / cols;
    ensure!(
        rows <= i32::MAX as usize && cols <= i32::MAX as usize,
        "{op}: {rows} x {cols} too large"
    );
    match dev {
        Device::Cpu => {
            column_sum_host(host(op, x)?, host_mut(op, out)?, cols, beta);
            Ok(())
        }
        _ => launch(
            &dev,
            &k::COLUMN_SUM,
            LaunchConfig {
                grid: [cols.div_ceil(COLSUM_BLOCK[0] as usize) as u32, 1, 1],
                block: COLSUM_BLOCK,
                shared_bytes: 0,
            },
            KernelArgs::new()
                .input(x)
                .output(out)
                .i32(rows as i32)
                .i32(cols as i32)
                .f32(beta),
        ),
    }
}

/// Gradients of Y = alpha op(A) op(B) (see [`gemm()`]) from dY (`[m, n]`, spaced like C in a batch):
/// dA = alpha dY op(B)^T (stored like A) and dB = alpha op(A)^T dY (stored like B), each given as
/// `(tensor, beta)`: beta = 0 assigns, 1 accumulates. Either may be left out.
///
/// An operand shared by every product of a batch (stride 0) would need its gradient summed over
/// the batch; that is refused (fold the batch into m or n instead).
#[allow(clippy::too_many_arguments)] // the operands of the product and both gradients
pub fn matmul_backward(
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    dy: &Tensor<f32>,
    da: Option<(&mut Tensor<f32>, f32)>,
    db: Option<(&mut Tensor<f32>, f32)>,
    batch: Batch,
) -> Result<()> {
    let op = "matmul_backward";
    let batched = batch.count != 1;
    // Check the forward problem's operands once; each gradient then has the shape of its operand.
    let p = Problem {
        transa,
        transb,
        m,
        n,
        k,
        batch,
    };
    check_problem(op, &p, a, b, dy, None, batched)
        .context("matmul_backward: dy is checked as the product's C")?;
    let Batch {
        count,
        stride_a,
        stride_b,
        stride_c,
    } = batch;
    if let Some((da, beta)) = da {
        ensure!(
            count <= 1 || stride_a > 0,
            "{op}: A is shared by all {count} products (stride 0); its gradient would be a sum over the batch"
        );
        // dA has A's stored shape. Not transposed: dA [m, k] = dY op(B)^T; transposed:
        // dA [k, m] = op(B) dY^T. With B stored [k, n] op(B)^T = B^T; stored [n, k] it is B.
        let (q, x, y) = if transa {
            // dA^T = op(B) dY^T: B as stored (transposed when it is [n, k]) times dY^T.
            (
                Problem {
                    transa: transb,
                    transb: true,
                    m: k,
                    n: m,
                    k: n,
                    batch: Batch {
                        count,
                        stride_a: stride_b,
                        stride_b: stride_c,
                        stride_c: stride_a,
                    },
                },
                b,
                dy,
            )
        } else {
            (
                Problem {
                    transa: false,
                    transb: !transb,
                    m,
                    n: k,
                    k: n,
                    batch: Batch {
                        count,
                        stride_a: stride_c,
                        stride_b,
                        stride_c: stride_a,
                    },
                },
                dy,
                b,
            )
        };
        gemm_f32_any(op, &q, alpha, x, y, beta, da, None, batched).context("computing dA")?;
    }
    if let Some((db, beta)) = db {
        ensure!(
            count <= 1 || stride_b > 0,
            "{op}: B is shared by all {count} products (stride 0); its gradient would be a sum over the batch"
        );
        let (q, x, y) = if transb {
            // dB stored [n, k] = dY^T op(A): dY^T times A as stored (transposed when [k, m]).
            (
                Problem {
                    transa: true,
                    transb: transa,
                    m: n,
                    n: k,
                    k: m,
                    batch: Batch {
                        count,
                        stride_a: stride_c,
                        stride_b: stride_a,
                        stride_c: stride_b,
                    },
                },
                dy,
                a,
            )
        } else {
            // dB [k, n] = op(A)^T dY: op(A)^T is A^T for A [m, k], A itself for A stored [k, m].
            (
                Problem {
                    transa: !transa,
                    transb: false,
                    m: k,
                    n,
                    k: m,
                    batch: Batch {
                        count,
                        stride_a,
                        stride_b: stride_c,
                        stride_c: stride_b,
                    },
                },
                a,
                dy,
            )
        };
        gemm_f32_any(op, &q, alpha, x, y, beta, db, None, batched).context("computing dB")?;
    }
    Ok(())
}

/// Reads a Linear layer's sizes from its tensors: w `[out, in]`, x `[..., in]`, y `[..., out]`
/// with as many rows; returns (rows, in, out).
fn linear_dims(
    op: &str,
    x: &Tensor<f32>,
    w: &Tensor<f32>,
    y: &Tensor<f32>,
) -> Result<(usize, usize, usize)> {
    let &[out_f, in_f] = w.shape() else {
        bail!(
            "{op}: w has shape {:?}, expected [out_features, in_features]",
            w.shape()
        );
    };
    ensure!(
        x.shape().last() == Some(&in_f),
        "{op}: x has shape {:?}, expected [..., {in_f}] to match w {:?}",
        x.shape(),
        w.shape()
    );
    ensure!(
        y.shape().last() == Some(&out_f),
        "{op}: output has shape {:?}, expected [..., {out_f}] to match w {:?}",
        y.shape(),
        w.shape()
    );
    let rows = x.len().checked_div(in_f).unwrap_or(0);
    let rows_y = y.len().checked_div(out_f).unwrap_or(0);
    ensure!(
        rows == rows_y || in_f == 0 || out_f == 0,
        "{op}: x {:?} has {rows} rows but the output {:?} has {rows_y}",
        x.shape(),
        y.shape()
    );
    Ok((rows.max(rows_y), in_f, out_f))
}

/// A Linear layer: y = x w^T + bias, with x `[..., in]`, w `[out, in]` (PyTorch's layout),
/// bias `[out]`, y `[..., out]`. Assigns y. One GEMM, with the bias added in its epilogue.
pub fn linear_forward(
    x: &Tensor<f32>,
    w: &Tensor<f32>,
    bias: Option<&Tensor<f32>>,
    y: &mut Tensor<f32>,
) -> Result<()> {
    let op = "linear_forward";
    let (rows, in_f, out_f) = linear_dims(op, x, w, y)?;
    let p = Problem {
        transa: false,
        transb: true,
        m: rows,
        n: out_f,
        k: in_f,
        batch: Batch::single(),
    };
    // in = 0 is k = 0: y is the bias alone (or zero).
    gemm_f32_any(op, &p, 1.0, x, w, 0.0, y, bias, false)
}

/// Backward of [`linear_forward`] from dy (`[..., out]`):
/// - `dx = dy w + dx_beta dx` when `dx` is given (`dx_beta` 0 assigns; 1 accumulates, as on a
///   residual stream);
/// - `dw += dy^T x` (parameter gradients accumulate);
/// - `dbias += column sums of dy` when `dbias` is given.
#[allow(clippy::too_many_arguments)] // x, w, dy and the three gradients
pub fn linear_backward(
    x: &Tensor<f32>,
    w: &Tensor<f32>,
    dy: &Tensor<f32>,
    dx: Option<&mut Tensor<f32>>,
    dx_beta: f32,
    dw: &mut Tensor<f32>,
    dbias: Option<&mut Tensor<f32>>,
) -> Result<()> {
    let op = "linear_backward";
    let (rows, in_f, out_f) = linear_dims(op, x, w, dy)?;
    ensure!(
        dw.len() == w.len(),
        "{op}: dw has shape {:?}, expected w's {:?}",
        dw.shape(),
        w.shape()
    );
    if let Some(dx) = dx.as_deref() {
        ensure!(
            dx.len() == x.len(),
            "{op}: dx has shape {:?}, expected x's {:?}",
            dx.shape(),
            x.shape()
        );
    }
    matmul_backward(
        false,
        true,
        rows,
        out_f,
        in_f,
        1.0,
        x,
        w,
        dy,
        dx.map(|t| (t, dx_beta)),
        Some((dw, 1.0)),
        Batch::single(),
    )?;
    if let Some(db) = dbias {
        column_sum(dy, db, out_f, 1.0).context("linear_backward: dbias")?;
    }
    Ok(())
}
