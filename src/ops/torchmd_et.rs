//! TorchMD-ET equivariant attention over the atom-stage neighbor list (SPEC step 2; Thölke & De
//! Fabritiis 2022), forward and backward, with the radial basis, the distance filters and the edge
//! geometry computed inside the kernels: no per-edge tensor (`[E, K]` basis values, `[E, 4H]`
//! filters, attention weights or messages) is ever stored, so memory grows with atoms, not edges.
//! Kernels: `cuda/torchmd_et.cu`. The node-wise parts of the layer (layer norm, projections,
//! output mixing) are tape ops in [`crate::nn::torchmd_et`]; this module holds the per-edge part
//! and the scalar layer norm.
//!
//! Layouts (row-major, N = frames x atoms rows of the [`NeighborList`], H channels in `heads`
//! heads of `hd = H / heads`, K basis functions): positions `[N, 3]`, queries `q [N, H]`, keys
//! `key [N, H]`, values `val [N, 3H]`, vectors `vec [N, 3, H]`, distance filters `w_dk [H, K]`,
//! `b_dk [H]`, `w_dv [3H, K]`, `b_dv [3H]` (two `Linear(K -> .)`). For the edge `e = (j -> i)` of
//! row i:
//!
//! ```text
//! vec_e = (x_j + shift_e) - x_i,  r = |vec_e|,  u = vec_e / r  (u = 0 at r = 0)
//! f     = rbf(r) fcut(r)                         (K values, never stored)
//! dk    = silu(w_dk f + b_dk)                    (H)
//! dv    = silu(w_dv f + b_dv) = (dv0, dv1, dv2)  (three blocks of H)
//! attn_a = silu(sum_{h in head a} q_i[h] key_j[h] dk[h]) fcut(r)
//! xagg_i[h]    = sum_e attn_{a(h)} val_j[h] dv0[h]
//! vagg_i[d, h] = sum_e fcut(r) (vec_j[d, h] val_j[H + h] dv1[h] + val_j[2H + h] dv2[h] u[d])
//! ```
//!
//! The basis times the cutoff is TorchMD-Net's edge feature (its `ExpNormalSmearing` multiplies
//! by the cosine cutoff; here both kinds do). The vector message carries the cutoff as well,
//! which TorchMD-ET's does not: every message then fades to zero at the cutoff, the layer is
//! smooth in the positions and its output does not depend on how far past the cutoff the neighbor
//! list reaches.
//!
//! Gradients: [`et_message_backward`] ASSIGNS `dq` (a gather over each destination's edges),
//! `dkey`, `dval`, `dvec` and the per-edge position gradient `dedge [E, 3]` (a gather over the
//! transposed CSR: row j's edges name their mirrors), each only when asked;
//! [`et_filter_backward`] ACCUMULATES (`+=`) the four filter gradients by per-block partial sums
//! over fixed edge ranges added in block order; [`crate::ops::painn::painn_position_backward`]
//! turns `dedge` into the positions' gradient. No float atomics anywhere: results are bitwise
//! reproducible for a given shape on a given device.

use super::neighbor_list::NeighborList;
use super::painn::{cosine_cutoff_host, GraphView, PainnReal, RadialBasis, RbfKind, MAX_RBF};
use super::{expect_len, same_device, CPU_CHUNK};
use crate::device::Device;
use crate::kernels::torchmd_et as k;
use crate::launch::{launch, Kernel, KernelArgs, LaunchConfig};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Largest channel count H of the message kernels (8 chunks of 32 lanes).
pub const MAX_HIDDEN: usize = 256;

/// Warps per block of the row kernels (`kEtWarps`).
const ROW_WARPS: usize = 4;
/// Threads per block of the row kernels (`kEtRowThreads`).
const ROW_THREADS: u32 = 32 * ROW_WARPS as u32;
/// Edges a warp takes at once (`kEtGroup`).
const GROUP: usize = 2;
/// Blocks of the row kernels at most: they stride over rows, and fewer blocks load the filters
/// into shared memory fewer times.
const ROW_MAX_BLOCKS: usize = 1024;
/// `et_filter_backward`: threads and edges per shared-memory step (`kEtFilterThreads`,
/// `kEtFilterEdges`).
const FILTER_THREADS: u32 = 256;
const FILTER_EDGES: usize = 8;
/// Edges per block of `et_filter_backward` at least, and its blocks (partial sums) at most.
const FILTER_EDGES_PER_BLOCK: usize = 64;
const FILTER_MAX_BLOCKS: usize = 128;
/// Threads per block of the elementwise kernels and of the layer norm (`kEtLnThreads`).
const THREADS: u32 = 256;
/// Rows per block of the layer norm's parameter partial sums, and its blocks at most.
const LN_ROWS_PER_BLOCK: usize = 64;
const LN_MAX_BLOCKS: usize = 256;
/// Dynamic shared memory an sm_80 / sm_90 block may opt in to.
const MAX_SHARED_BYTES: usize = 227 * 1024;
/// Edges per partial sum of the CPU filter backward at least, and its partial sums at most.
const HOST_FILTER_EDGES: usize = 256;
const HOST_FILTER_MAX_CHUNKS: usize = 64;

fn kind_code(kind: RbfKind) -> i32 {
    match kind {
        RbfKind::Gaussian => 0,
        RbfKind::ExpNormal => 1,
    }
}

// ---------------------------------------------------------------------------------- operands --

/// The inputs of the message ops on a device (every tensor on the list's device).
#[derive(Clone, Copy)]
pub struct EtTensors<'a> {
    /// `[N, 3]` Angstrom.
    pub positions: &'a Tensor<f32>,
    /// Queries `[N, H]`.
    pub q: &'a Tensor<f32>,
    /// Keys `[N, H]`.
    pub key: &'a Tensor<f32>,
    /// Values `[N, 3H]`.
    pub val: &'a Tensor<f32>,
    /// Vector features `[N, 3, H]`.
    pub vec: &'a Tensor<f32>,
    /// Key filter weight `[H, K]`.
    pub w_dk: &'a Tensor<f32>,
    /// Key filter bias `[H]`.
    pub b_dk: &'a Tensor<f32>,
    /// Value filter weight `[3H, K]`.
    pub w_dv: &'a Tensor<f32>,
    /// Value filter bias `[3H]`.
    pub b_dv: &'a Tensor<f32>,
}

/// The inputs of the CPU twins (the layouts of [`EtTensors`]).
#[derive(Clone, Copy)]
pub struct EtSlices<'a, R> {
    /// `[N, 3]`.
    pub positions: &'a [R],
    /// `[N, H]`.
    pub q: &'a [R],
    /// `[N, H]`.
    pub key: &'a [R],
    /// `[N, 3H]`.
    pub val: &'a [R],
    /// `[N, 3, H]`.
    pub vec: &'a [R],
    /// `[H, K]`.
    pub w_dk: &'a [R],
    /// `[H]`.
    pub b_dk: &'a [R],
    /// `[3H, K]`.
    pub w_dv: &'a [R],
    /// `[3H]`.
    pub b_dv: &'a [R],
}

/// The activation gradients [`et_message_backward`] may write (each ASSIGNED when given).
#[derive(Default)]
pub struct EtGrads<'a> {
    /// `[N, H]`.
    pub dq: Option<&'a mut Tensor<f32>>,
    /// `[N, H]`.
    pub dkey: Option<&'a mut Tensor<f32>>,
    /// `[N, 3H]`.
    pub dval: Option<&'a mut Tensor<f32>>,
    /// `[N, 3, H]`.
    pub dvec: Option<&'a mut Tensor<f32>>,
    /// `[E, 3]`: dL / d vec_e, the input of [`crate::ops::painn::painn_position_backward`].
    pub dedge: Option<&'a mut Tensor<f32>>,
}

/// The CPU twins' counterpart of [`EtGrads`].
#[derive(Default)]
pub struct EtGradSlices<'a, R> {
    /// `[N, H]`.
    pub dq: Option<&'a mut [R]>,
    /// `[N, H]`.
    pub dkey: Option<&'a mut [R]>,
    /// `[N, 3H]`.
    pub dval: Option<&'a mut [R]>,
    /// `[N, 3, H]`.
    pub dvec: Option<&'a mut [R]>,
    /// `[E, 3]`.
    pub dedge: Option<&'a mut [R]>,
}

// ------------------------------------------------------------------------------ CPU twins --

fn sigmoid<R: PainnReal>(x: R) -> R {
    R::of(1.0) / (R::of(1.0) + (-x).exp())
}

fn silu<R: PainnReal>(x: R) -> R {
    x * sigmoid(x)
}

/// silu with [`PainnReal::exp_fast`]: the forward's per-edge filter activations, in loops that
/// vectorise.
#[inline(always)]
fn silu_fast<R: PainnReal>(x: R) -> R {
    x * (R::of(1.0) / (R::of(1.0) + (-x).exp_fast()))
}

/// silu'(x) = sigmoid(x) (1 + x (1 - sigmoid(x))).
fn dsilu<R: PainnReal>(x: R) -> R {
    let s = sigmoid(x);
    s * (R::of(1.0) + x * (R::of(1.0) - s))
}

/// `out = bias + sum_k f[k] wt[k, :]` (0 without a bias) for the filters transposed to
/// `[K, 4H]`: 64 columns at a time, their sums held in registers across k (each column's
/// terms are added in the same order as one k at a time over the whole row, so the bits do
/// not depend on the blocking).
#[inline(always)]
fn filter_preact<R: PainnReal>(bias: Option<&[R]>, wt: &[R], f: &[R], out: &mut [R]) {
    const COLS: usize = 64;
    let h4 = out.len();
    let zero = R::of(0.0);
    let full = h4 / COLS * COLS;
    for c0 in (0..full).step_by(COLS) {
        let mut acc = [zero; COLS];
        if let Some(b) = bias {
            acc.copy_from_slice(&b[c0..c0 + COLS]);
        }
        for (kk, &fk) in f.iter().enumerate() {
            let w: &[R; COLS] = wt[kk * h4 + c0..][..COLS].try_into().expect("64 columns");
            for c in 0..COLS {
                acc[c] = acc[c] + fk * w[c];
            }
        }
        out[c0..c0 + COLS].copy_from_slice(&acc);
    }
    // Columns past the last multiple of 64, one k at a time.
    let tail = &mut out[full..];
    match bias {
        Some(b) => tail.copy_from_slice(&b[full..]),
        None => tail.fill(zero),
    }
    for (kk, &fk) in f.iter().enumerate() {
        for (a, &wv) in tail.iter_mut().zip(&wt[kk * h4 + full..(kk + 1) * h4]) {
            *a = *a + fk * wv;
        }
    }
}

/// What the twins share: the operands, the filters transposed to `[K, 4H]` (columns dk, dv0, dv1,
/// dv2) with their biases `[4H]`, the sizes and, for the backward, the upstream gradients.
struct Twin<'a, R> {
    g: GraphView<'a>,
    s: EtSlices<'a, R>,
    basis: RadialBasis,
    h: usize,
    heads: usize,
    wt: Vec<R>,
    bias: Vec<R>,
    gx: &'a [R],
    gv: &'a [R],
}

/// One edge's geometry and everything the backward needs of it (the twins' scratch).
struct Edge<R> {
    r: R,
    u: [R; 3],
    fc: R,
    dfc: R,
    /// f = rbf fc and df / dr `[K]`.
    f: Vec<R>,
    df: Vec<R>,
    /// Pre-activations of the four filters `[4H]`, and their derivatives in r (w f').
    pre: Vec<R>,
    dpre: Vec<R>,
    /// Per head: silu(z) and the gradient of z.
    sz: Vec<R>,
    gz: Vec<R>,
    /// The gradients of the pre-activations `[4H]`.
    gpre: Vec<R>,
}

impl<R: PainnReal> Edge<R> {
    fn new(k: usize, h: usize, heads: usize) -> Self {
        let z = R::of(0.0);
        Self {
            r: z,
            u: [z; 3],
            fc: z,
            dfc: z,
            f: vec![z; k],
            df: vec![z; k],
            pre: vec![z; 4 * h],
            dpre: vec![z; 4 * h],
            sz: vec![z; heads],
            gz: vec![z; heads],
            gpre: vec![z; 4 * h],
        }
    }
}

impl<'a, R: PainnReal> Twin<'a, R> {
    #[allow(clippy::too_many_arguments)] // the graph, the operands, the sizes, two upstream
    fn new(
        g: GraphView<'a>,
        s: EtSlices<'a, R>,
        basis: RadialBasis,
        h: usize,
        heads: usize,
        gx: &'a [R],
        gv: &'a [R],
    ) -> Self {
        let size = basis.size;
        let h4 = 4 * h;
        let mut wt = vec![R::of(0.0); size * h4];
        for c in 0..h4 {
            let row = if c < h {
                &s.w_dk[c * size..(c + 1) * size]
            } else {
                &s.w_dv[(c - h) * size..(c - h + 1) * size]
            };
            for (kk, &w) in row.iter().enumerate() {
                wt[kk * h4 + c] = w;
            }
        }
        let bias = s.b_dk.iter().chain(s.b_dv).copied().collect();
        Self {
            g,
            s,
            basis,
            h,
            heads,
            wt,
            bias,
            gx,
            gv,
        }
    }

    fn row(&self, i: usize) -> std::ops::Range<usize> {
        self.g.row_ptr[i] as usize..self.g.row_ptr[i + 1] as usize
    }

    /// The geometry, basis and pre-activations of edge e = (j -> i) (and their r-derivatives
    /// with `deriv`); with `grads`, the head terms and pre-activation gradients too.
    #[inline(always)]
    fn eval(&self, x: &mut Edge<R>, i: usize, j: usize, e: usize, deriv: bool, grads: bool) {
        let pos = self.s.positions;
        let vec: [R; 3] = std::array::from_fn(|d| {
            let mut p = pos[3 * j + d];
            if let Some(s) = self.g.shift {
                p = p + R::of(s[3 * e + d] as f64);
            }
            p - pos[3 * i + d]
        });
        let zero = R::of(0.0);
        let d2 = vec[0] * vec[0] + vec[1] * vec[1] + vec[2] * vec[2];
        x.r = d2.sqrt();
        let inv = if d2 > zero { R::of(1.0) / x.r } else { zero };
        x.u = vec.map(|v| v * inv);
        (x.fc, x.dfc) = cosine_cutoff_host(x.r, R::of(self.basis.cutoff as f64));
        self.basis.eval_host(x.r, &mut x.f, Some(&mut x.df));
        for (f, df) in x.f.iter_mut().zip(x.df.iter_mut()) {
            *df = *df * x.fc + *f * x.dfc;
            *f = *f * x.fc;
        }
        filter_preact(Some(&self.bias), &self.wt, &x.f, &mut x.pre);
        if deriv {
            filter_preact(None, &self.wt, &x.df, &mut x.dpre);
        }
        if !grads {
            return;
        }
        let (h, hd) = (self.h, self.h / self.heads);
        let (q, key, val, vecf) = (self.s.q, self.s.key, self.s.val, self.s.vec);
        let (qi, kj) = (&q[i * h..(i + 1) * h], &key[j * h..(j + 1) * h]);
        let vj = &val[j * 3 * h..(j + 1) * 3 * h];
        let cj = &vecf[j * 3 * h..(j + 1) * 3 * h];
        let gxi = &self.gx[i * h..(i + 1) * h];
        let gvi = &self.gv[i * 3 * h..(i + 1) * 3 * h];
        for a in 0..self.heads {
            let (mut z, mut ga) = (zero, zero);
            for c in a * hd..(a + 1) * hd {
                z = z + qi[c] * kj[c] * silu(x.pre[c]);
                ga = ga + gxi[c] * (vj[c] * silu(x.pre[h + c]));
            }
            x.sz[a] = silu(z);
            x.gz[a] = ga * x.fc * dsilu(z);
        }
        for c in 0..h {
            let a = c / hd;
            let sv = (0..3).map(|d| gvi[d * h + c] * cj[d * h + c]).sum::<R>();
            let su = (0..3).map(|d| gvi[d * h + c] * x.u[d]).sum::<R>();
            x.gpre[c] = x.gz[a] * qi[c] * kj[c] * dsilu(x.pre[c]);
            x.gpre[h + c] = gxi[c] * (x.sz[a] * x.fc) * vj[c] * dsilu(x.pre[h + c]);
            x.gpre[2 * h + c] = x.fc * sv * vj[h + c] * dsilu(x.pre[2 * h + c]);
            x.gpre[3 * h + c] = x.fc * su * vj[2 * h + c] * dsilu(x.pre[3 * h + c]);
        }
    }

    fn scratch(&self) -> Edge<R> {
        Edge::new(self.basis.size, self.h, self.heads)
    }

    /// The destination row of every edge.
    fn edge_rows(&self) -> Vec<u32> {
        let mut out = vec![0u32; self.g.edges()];
        for i in 0..self.g.rows() {
            out[self.row(i)].fill(i as u32);
        }
        out
    }
}

/// Checks H, heads and K of the twins' inputs (the device ops check shapes with errors).
fn twin_sizes(hidden: usize, heads: usize) -> bool {
    hidden > 0 && heads > 0 && hidden.is_multiple_of(heads)
}

/// CPU twin of [`et_message_forward`]: assigns `xagg [N, H]` and `vagg [N, 3, H]`.
#[allow(clippy::too_many_arguments)] // graph, operands, basis, heads, H, two outputs
pub fn et_message_forward_host<R: PainnReal>(
    graph: GraphView<'_>,
    s: EtSlices<'_, R>,
    basis: RadialBasis,
    heads: usize,
    hidden: usize,
    xagg: &mut [R],
    vagg: &mut [R],
) {
    if !twin_sizes(hidden, heads) {
        return;
    }
    let t = Twin::new(graph, s, basis, hidden, heads, &[], &[]);
    let zero = R::of(0.0);
    xagg.par_chunks_mut(hidden)
        .zip(vagg.par_chunks_mut(3 * hidden))
        .enumerate()
        .for_each_init(
            || (t.scratch(), vec![zero; heads], vec![zero; 4 * hidden]),
            |(x, attn, spre), (i, (xo, vo))| forward_row(&t, i, x, attn, spre, xo, vo),
        );
}

simd_dispatch! {
    /// One destination atom of [`et_message_forward_host`]: its messages summed over its
    /// edges. Each edge's four filter activations `silu(pre)` are taken in one loop
    /// ([`silu_fast`]), which vectorises; the whole row is compiled for each vector width.
    fn forward_row / forward_row_at<R: PainnReal>(
        t: &Twin<'_, R>,
        i: usize,
        x: &mut Edge<R>,
        attn: &mut [R],
        spre: &mut [R],
        xo: &mut [R],
        vo: &mut [R],
    ) {
        let (h, s, graph) = (t.h, &t.s, &t.g);
        let hd = h / t.heads;
        let zero = R::of(0.0);
        xo.fill(zero);
        vo.fill(zero);
        let qi = &s.q[i * h..(i + 1) * h];
        for e in t.row(i) {
            let j = graph.col[e] as usize;
            t.eval(x, i, j, e, false, false);
            for (o, &p) in spre.iter_mut().zip(&x.pre) {
                *o = silu_fast(p);
            }
            let kj = &s.key[j * h..(j + 1) * h];
            for (a, at) in attn.iter_mut().enumerate() {
                let z = (a * hd..(a + 1) * hd)
                    .map(|c| qi[c] * kj[c] * spre[c])
                    .sum::<R>();
                *at = silu(z) * x.fc;
            }
            let vj = &s.val[j * 3 * h..(j + 1) * 3 * h];
            let cj = &s.vec[j * 3 * h..(j + 1) * 3 * h];
            for c in 0..h {
                xo[c] = xo[c] + attn[c / hd] * (vj[c] * spre[h + c]);
                let x1 = x.fc * (vj[h + c] * spre[2 * h + c]);
                let x2 = x.fc * (vj[2 * h + c] * spre[3 * h + c]);
                for d in 0..3 {
                    vo[d * h + c] = vo[d * h + c] + (cj[d * h + c] * x1 + x2 * x.u[d]);
                }
            }
        }
    }
}

/// CPU twin of [`et_message_backward`] from the upstream gradients `gx [N, H]` and
/// `gv [N, 3, H]`: assigns each gradient of `out` that is given.
#[allow(clippy::too_many_arguments)] // graph, operands, basis, heads, H, two upstream, outputs
pub fn et_message_backward_host<R: PainnReal>(
    graph: GraphView<'_>,
    s: EtSlices<'_, R>,
    basis: RadialBasis,
    heads: usize,
    hidden: usize,
    gx: &[R],
    gv: &[R],
    out: EtGradSlices<'_, R>,
) {
    if !twin_sizes(hidden, heads) {
        return;
    }
    let (h, hd) = (hidden, hidden / heads);
    let t = Twin::new(graph, s, basis, h, heads, gx, gv);
    let zero = R::of(0.0);
    if let Some(dq) = out.dq {
        dq.par_chunks_mut(h).enumerate().for_each_init(
            || t.scratch(),
            |x, (i, o)| {
                o.fill(zero);
                for e in t.row(i) {
                    let j = graph.col[e] as usize;
                    t.eval(x, i, j, e, false, true);
                    let kj = &s.key[j * h..(j + 1) * h];
                    for c in 0..h {
                        o[c] = o[c] + x.gz[c / hd] * (kj[c] * silu(x.pre[c]));
                    }
                }
            },
        );
    }
    let (mut own_k, mut own_val, mut own_vec) = (Vec::new(), Vec::new(), Vec::new());
    let n = graph.rows();
    if out.dkey.is_some() || out.dval.is_some() || out.dvec.is_some() {
        // An output that is not wanted is computed into a throwaway buffer: the twin is the
        // reference, not the fast path.
        let dkey = out.dkey.unwrap_or_else(|| {
            own_k = vec![zero; n * h];
            &mut own_k
        });
        let dval = out.dval.unwrap_or_else(|| {
            own_val = vec![zero; 3 * n * h];
            &mut own_val
        });
        let dvec = out.dvec.unwrap_or_else(|| {
            own_vec = vec![zero; 3 * n * h];
            &mut own_vec
        });
        dkey.par_chunks_mut(h)
            .zip(dval.par_chunks_mut(3 * h).zip(dvec.par_chunks_mut(3 * h)))
            .enumerate()
            .for_each_init(
                || t.scratch(),
                |x, (j, (dk, (dvl, dvc)))| {
                    dk.fill(zero);
                    dvl.fill(zero);
                    dvc.fill(zero);
                    let vj = &s.val[j * 3 * h..(j + 1) * 3 * h];
                    let cj = &s.vec[j * 3 * h..(j + 1) * 3 * h];
                    for ep in t.row(j) {
                        let i = graph.col[ep] as usize;
                        let e = graph.reverse[ep] as usize;
                        t.eval(x, i, j, e, false, true);
                        let qi = &s.q[i * h..(i + 1) * h];
                        let gxi = &gx[i * h..(i + 1) * h];
                        let gvi = &gv[i * 3 * h..(i + 1) * 3 * h];
                        for c in 0..h {
                            let a = c / hd;
                            let sv = (0..3).map(|d| gvi[d * h + c] * cj[d * h + c]).sum::<R>();
                            let su = (0..3).map(|d| gvi[d * h + c] * x.u[d]).sum::<R>();
                            let d1 = silu(x.pre[2 * h + c]);
                            dk[c] = dk[c] + x.gz[a] * (qi[c] * silu(x.pre[c]));
                            dvl[c] = dvl[c] + gxi[c] * (x.sz[a] * x.fc) * silu(x.pre[h + c]);
                            dvl[h + c] = dvl[h + c] + x.fc * sv * d1;
                            dvl[2 * h + c] = dvl[2 * h + c] + x.fc * su * silu(x.pre[3 * h + c]);
                            let fx1 = x.fc * (vj[h + c] * d1);
                            for d in 0..3 {
                                dvc[d * h + c] = dvc[d * h + c] + gvi[d * h + c] * fx1;
                            }
                        }
                    }
                },
            );
    }
    if let Some(dedge) = out.dedge {
        let rows = t.edge_rows();
        dedge.par_chunks_mut(3).enumerate().for_each_init(
            || t.scratch(),
            |x, (e, o)| {
                let i = rows[e] as usize;
                let j = graph.col[e] as usize;
                t.eval(x, i, j, e, true, true);
                let vj = &s.val[j * 3 * h..(j + 1) * 3 * h];
                let cj = &s.vec[j * 3 * h..(j + 1) * 3 * h];
                let gxi = &gx[i * h..(i + 1) * h];
                let gvi = &gv[i * 3 * h..(i + 1) * 3 * h];
                // Through f (all four filters), then the cutoff's explicit factors.
                let mut dr = x
                    .gpre
                    .iter()
                    .zip(&x.dpre)
                    .fold(zero, |acc, (&g, &d)| acc + g * d);
                let mut du = [zero; 3];
                let mut dfc = zero;
                for c in 0..h {
                    let sv = (0..3).map(|d| gvi[d * h + c] * cj[d * h + c]).sum::<R>();
                    let su = (0..3).map(|d| gvi[d * h + c] * x.u[d]).sum::<R>();
                    let x1 = vj[h + c] * silu(x.pre[2 * h + c]);
                    let x2 = vj[2 * h + c] * silu(x.pre[3 * h + c]);
                    dfc = dfc
                        + gxi[c] * vj[c] * silu(x.pre[h + c]) * x.sz[c / hd]
                        + sv * x1
                        + su * x2;
                    for (d, du) in du.iter_mut().enumerate() {
                        *du = *du + gvi[d * h + c] * (x.fc * x2);
                    }
                }
                dr = dr + x.dfc * dfc;
                let inv = if x.r > zero { R::of(1.0) / x.r } else { zero };
                let duu = du[0] * x.u[0] + du[1] * x.u[1] + du[2] * x.u[2];
                for d in 0..3 {
                    o[d] = dr * x.u[d] + (du[d] - duu * x.u[d]) * inv;
                }
            },
        );
    }
}

/// The four filter gradients of the CPU twin (each ACCUMULATED when given).
#[derive(Default)]
pub struct EtFilterGradSlices<'a, R> {
    /// `[H, K]`.
    pub dw_dk: Option<&'a mut [R]>,
    /// `[H]`.
    pub db_dk: Option<&'a mut [R]>,
    /// `[3H, K]`.
    pub dw_dv: Option<&'a mut [R]>,
    /// `[3H]`.
    pub db_dv: Option<&'a mut [R]>,
}

/// CPU twin of [`et_filter_backward`]: `dw += sum_e g_pre f^T`, `db += sum_e g_pre` for the key
/// and value filters, over fixed chunks of edges whose partial sums are added in order (the
/// result does not depend on the thread count).
#[allow(clippy::too_many_arguments)] // graph, operands, basis, heads, H, two upstream, outputs
pub fn et_filter_backward_host<R: PainnReal>(
    graph: GraphView<'_>,
    s: EtSlices<'_, R>,
    basis: RadialBasis,
    heads: usize,
    hidden: usize,
    gx: &[R],
    gv: &[R],
    out: EtFilterGradSlices<'_, R>,
) {
    let edges = graph.edges();
    if !twin_sizes(hidden, heads) || edges == 0 {
        return;
    }
    let h = hidden;
    let t = Twin::new(graph, s, basis, h, heads, gx, gv);
    let (size, k1, h4) = (basis.size, basis.size + 1, 4 * h);
    let zero = R::of(0.0);
    let chunks = edges
        .div_ceil(HOST_FILTER_EDGES)
        .clamp(1, HOST_FILTER_MAX_CHUNKS);
    let per = edges.div_ceil(chunks);
    let rows = t.edge_rows();
    let partials: Vec<Vec<R>> = (0..chunks)
        .into_par_iter()
        .map(|chunk| {
            let mut acc = vec![zero; h4 * k1];
            let mut x = t.scratch();
            let range = chunk * per..((chunk + 1) * per).min(edges);
            for (e, (&i, &j)) in range
                .clone()
                .zip(rows[range.clone()].iter().zip(&graph.col[range]))
            {
                let (i, j) = (i as usize, j as usize);
                t.eval(&mut x, i, j, e, false, true);
                for (c, row) in acc.chunks_mut(k1).enumerate() {
                    let g = x.gpre[c];
                    for (a, &f) in row.iter_mut().zip(&x.f) {
                        *a = *a + g * f;
                    }
                    row[size] = row[size] + g;
                }
            }
            acc
        })
        .collect();
    let mut total = vec![zero; h4 * k1];
    for part in &partials {
        for (t, &x) in total.iter_mut().zip(part) {
            *t = *t + x;
        }
    }
    let add_w = |dst: Option<&mut [R]>, c0: usize, rows: usize| {
        if let Some(dst) = dst {
            for c in 0..rows {
                for kk in 0..size {
                    dst[c * size + kk] = dst[c * size + kk] + total[(c0 + c) * k1 + kk];
                }
            }
        }
    };
    add_w(out.dw_dk, 0, h);
    add_w(out.dw_dv, h, 3 * h);
    let add_b = |dst: Option<&mut [R]>, c0: usize, rows: usize| {
        if let Some(dst) = dst {
            for c in 0..rows {
                dst[c] = dst[c] + total[(c0 + c) * k1 + size];
            }
        }
    };
    add_b(out.db_dk, 0, h);
    add_b(out.db_dv, h, 3 * h);
}

/// CPU twin of [`et_layernorm_forward`]: assigns `y [N, H]` and `stats [N, 2]`.
pub fn et_layernorm_forward_host<R: PainnReal>(
    x: &[R],
    gamma: &[R],
    beta: &[R],
    eps: R,
    y: &mut [R],
    stats: &mut [R],
) {
    let h = gamma.len();
    if h == 0 {
        return;
    }
    let inv_h = R::of(1.0 / h as f64);
    y.par_chunks_mut(h)
        .zip(stats.par_chunks_mut(2))
        .zip(x.par_chunks(h))
        .with_min_len((CPU_CHUNK / h).max(1))
        .for_each(|((y, st), x)| {
            let mean = x.iter().copied().sum::<R>() * inv_h;
            let var = x.iter().map(|&v| (v - mean) * (v - mean)).sum::<R>() * inv_h;
            let rstd = R::of(1.0) / (var + eps).sqrt();
            for c in 0..h {
                y[c] = gamma[c] * ((x[c] - mean) * rstd) + beta[c];
            }
            st[0] = mean;
            st[1] = rstd;
        });
}

/// CPU twin of [`et_layernorm_backward`]: assigns `dx` and accumulates `dgamma`, `dbeta` (each
/// when given; the parameter sums over fixed chunks of rows added in order).
#[allow(clippy::too_many_arguments)] // the forward's inputs, the upstream gradient, three outputs
pub fn et_layernorm_backward_host<R: PainnReal>(
    x: &[R],
    gamma: &[R],
    stats: &[R],
    dy: &[R],
    dx: Option<&mut [R]>,
    dgamma: Option<&mut [R]>,
    dbeta: Option<&mut [R]>,
) {
    let h = gamma.len();
    if h == 0 {
        return;
    }
    let inv_h = R::of(1.0 / h as f64);
    let zero = R::of(0.0);
    if let Some(dx) = dx {
        dx.par_chunks_mut(h)
            .zip(x.par_chunks(h).zip(dy.par_chunks(h)))
            .zip(stats.par_chunks(2))
            .with_min_len((CPU_CHUNK / h).max(1))
            .for_each(|((dx, (x, dy)), st)| {
                let (mean, rstd) = (st[0], st[1]);
                let (mut m1, mut m2) = (zero, zero);
                for c in 0..h {
                    let g = dy[c] * gamma[c];
                    m1 = m1 + g;
                    m2 = m2 + g * ((x[c] - mean) * rstd);
                }
                let (m1, m2) = (m1 * inv_h, m2 * inv_h);
                for c in 0..h {
                    let g = dy[c] * gamma[c];
                    dx[c] = rstd * (g - m1 - ((x[c] - mean) * rstd) * m2);
                }
            });
    }
    if dgamma.is_none() && dbeta.is_none() {
        return;
    }
    let n = x.len() / h;
    let chunk_rows = (CPU_CHUNK / h).max(1);
    let partials: Vec<Vec<R>> = (0..n.div_ceil(chunk_rows))
        .into_par_iter()
        .map(|b| {
            let mut p = vec![zero; 2 * h];
            for r in b * chunk_rows..((b + 1) * chunk_rows).min(n) {
                let (mean, rstd) = (stats[2 * r], stats[2 * r + 1]);
                for c in 0..h {
                    let d = dy[r * h + c];
                    p[c] = p[c] + d * ((x[r * h + c] - mean) * rstd);
                    p[h + c] = p[h + c] + d;
                }
            }
            p
        })
        .collect();
    let mut total = vec![zero; 2 * h];
    for p in &partials {
        for (t, &v) in total.iter_mut().zip(p) {
            *t = *t + v;
        }
    }
    if let Some(dg) = dgamma {
        for c in 0..h {
            dg[c] = dg[c] + total[c];
        }
    }
    if let Some(db) = dbeta {
        for c in 0..h {
            db[c] = db[c] + total[h + c];
        }
    }
}

// ---------------------------------------------------------------------------- device ops --

/// Sizes of a message op: rows N, channels H, edges E.
struct Dims {
    n: usize,
    h: usize,
    e: usize,
}

/// The row kernels for H up to 32, 64, 128 and 256 channels (chunks of 32 lanes per warp).
fn row_kernel(h: usize, kernels: [&'static Kernel; 4]) -> &'static Kernel {
    match h {
        0..=32 => kernels[0],
        33..=64 => kernels[1],
        65..=128 => kernels[2],
        _ => kernels[3],
    }
}

/// Floats of shared memory of the filters in the row kernels (`et_filter_floats`).
fn filter_floats(h: usize, size: usize) -> usize {
    4 * h * (size + 1)
}

/// Floats of each warp's buffers in the row kernels (`et_warp_floats`).
fn warp_floats(h: usize, size: usize) -> usize {
    2 * size * GROUP + 6 * GROUP * h
}

/// Shared memory (bytes) of the row kernels, and of `et_filter_backward` (dynamic part).
fn row_shared_bytes(h: usize, size: usize) -> usize {
    (filter_floats(h, size) + ROW_WARPS * warp_floats(h, size)) * 4
}

fn filter_shared_bytes(h: usize, size: usize, heads: usize) -> usize {
    (4 * h * (size + 1) + FILTER_EDGES * (size + 1 + 4 * h + 2 * heads)) * 4
}

/// Whether the message kernels can run H channels with K basis functions (their shared memory
/// fits a block). The CPU twins have no such limit, but every device must run the same model.
pub fn supported(hidden: usize, size: usize, heads: usize) -> bool {
    (1..=MAX_HIDDEN).contains(&hidden)
        && (1..=MAX_RBF).contains(&size)
        && heads > 0
        && hidden.is_multiple_of(heads)
        && row_shared_bytes(hidden, size).max(filter_shared_bytes(hidden, size, heads))
            <= MAX_SHARED_BYTES
}

/// Checks the operands shared by the message ops; returns the sizes.
fn message_dims(
    op: &str,
    nl: &NeighborList,
    t: &EtTensors,
    basis: RadialBasis,
    heads: usize,
) -> Result<Dims> {
    ensure!(
        (1..=MAX_RBF).contains(&basis.size) && basis.cutoff.is_finite() && basis.cutoff > 0.0,
        "{op}: the radial basis has {} functions and cutoff {} (1 to {MAX_RBF} functions and a \
         positive cutoff are supported)",
        basis.size,
        basis.cutoff
    );
    let (h, size) = match *t.w_dk.shape() {
        [h, k] => (h, k),
        _ => anyhow::bail!(
            "{op}: the key filter weight has shape {:?}, expected [H, K]",
            t.w_dk.shape()
        ),
    };
    ensure!(
        (1..=MAX_HIDDEN).contains(&h),
        "{op}: {h} channels; 1 to {MAX_HIDDEN} are supported"
    );
    ensure!(
        size == basis.size,
        "{op}: the key filter weight has shape {:?}, expected [H, K] = [{h}, {}]",
        t.w_dk.shape(),
        basis.size
    );
    ensure!(
        heads > 0 && h % heads == 0,
        "{op}: {heads} heads do not divide {h} channels"
    );
    ensure!(
        supported(h, size, heads),
        "{op}: H = {h} with K = {size} needs {} B of shared memory, more than the \
         {MAX_SHARED_BYTES} B a block may have",
        row_shared_bytes(h, size).max(filter_shared_bytes(h, size, heads))
    );
    ensure!(
        t.w_dv.shape() == [3 * h, size],
        "{op}: the value filter weight has shape {:?}, expected [3H, K] = [{}, {size}]",
        t.w_dv.shape(),
        3 * h
    );
    ensure!(
        t.b_dk.shape() == [h],
        "{op}: the key filter bias has shape {:?}, expected [{h}]",
        t.b_dk.shape()
    );
    ensure!(
        t.b_dv.shape() == [3 * h],
        "{op}: the value filter bias has shape {:?}, expected [{}]",
        t.b_dv.shape(),
        3 * h
    );
    let n = nl.rows();
    expect_len(op, "positions", t.positions, 3 * n)?;
    expect_len(op, "q", t.q, n * h)?;
    expect_len(op, "key", t.key, n * h)?;
    expect_len(op, "val", t.val, 3 * n * h)?;
    expect_len(op, "vec", t.vec, 3 * n * h)?;
    for (name, x, last) in [("q", t.q, h), ("key", t.key, h), ("val", t.val, 3 * h)] {
        ensure!(
            x.shape().last() == Some(&last),
            "{op}: {name} has shape {:?}, expected [.., {last}]",
            x.shape()
        );
    }
    let vs = t.vec.shape();
    ensure!(
        vs.last() == Some(&h) && vs.len() >= 2 && vs[vs.len() - 2] == 3,
        "{op}: vec has shape {vs:?}, expected [.., 3, {h}]"
    );
    Ok(Dims {
        n,
        h,
        e: nl.edges(),
    })
}

fn devices_of<'a>(t: &EtTensors<'a>) -> Vec<&'a Device> {
    vec![
        t.positions.device(),
        t.q.device(),
        t.key.device(),
        t.val.device(),
        t.vec.device(),
        t.w_dk.device(),
        t.b_dk.device(),
        t.w_dv.device(),
        t.b_dv.device(),
    ]
}

fn slices<'a>(t: &EtTensors<'a>) -> EtSlices<'a, f32> {
    EtSlices {
        positions: t.positions.host().unwrap(),
        q: t.q.host().unwrap(),
        key: t.key.host().unwrap(),
        val: t.val.host().unwrap(),
        vec: t.vec.host().unwrap(),
        w_dk: t.w_dk.host().unwrap(),
        b_dk: t.b_dk.host().unwrap(),
        w_dv: t.w_dv.host().unwrap(),
        b_dv: t.b_dv.host().unwrap(),
    }
}

/// A launch of the row kernels over `n` rows.
fn row_config(n: usize, h: usize, size: usize) -> LaunchConfig {
    LaunchConfig {
        grid: [n.div_ceil(ROW_WARPS).clamp(1, ROW_MAX_BLOCKS) as u32, 1, 1],
        block: [ROW_THREADS, 1, 1],
        shared_bytes: row_shared_bytes(h, size) as u32,
    }
}

/// The kernels' address of an optional tensor: a null pointer for `None`.
fn input_or_null(args: KernelArgs, t: Option<&Tensor<f32>>) -> KernelArgs {
    match t {
        Some(t) => args.input(t),
        None => args.i64(0),
    }
}

fn output_or_null(args: KernelArgs, t: Option<&mut Tensor<f32>>) -> KernelArgs {
    match t {
        Some(t) => args.output(t),
        None => args.i64(0),
    }
}

/// The filters' arguments in kernel order.
fn filter_args(args: KernelArgs, t: &EtTensors) -> KernelArgs {
    args.input(t.w_dk).input(t.b_dk).input(t.w_dv).input(t.b_dv)
}

fn tail_args(args: KernelArgs, d: &Dims, heads: usize, basis: RadialBasis) -> KernelArgs {
    args.i32(d.n as i32)
        .i32(d.h as i32)
        .i32(heads as i32)
        .i32(kind_code(basis.kind))
        .i32(basis.size as i32)
        .f32(basis.cutoff)
}

/// The attention messages of every atom (module docs): ASSIGNS `xagg [N, H]` and
/// `vagg [N, 3, H]` (0 for atoms without neighbours). Every tensor on the list's device; H at
/// most [`MAX_HIDDEN`], `heads` dividing H, and the filters' shared memory within a block (see
/// [`supported`]).
pub fn et_message_forward(
    nl: &NeighborList,
    t: &EtTensors,
    basis: RadialBasis,
    heads: usize,
    xagg: &mut Tensor<f32>,
    vagg: &mut Tensor<f32>,
) -> Result<()> {
    let op = "et_message_forward";
    let mut devices = devices_of(t);
    devices.push(xagg.device());
    devices.push(vagg.device());
    let dev = same_device(op, nl.device(), &devices)?;
    let d = message_dims(op, nl, t, basis, heads)?;
    expect_len(op, "xagg", xagg, d.n * d.h)?;
    expect_len(op, "vagg", vagg, 3 * d.n * d.h)?;
    if d.n == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            et_message_forward_host(
                GraphView::of(nl).unwrap(),
                slices(t),
                basis,
                heads,
                d.h,
                xagg.host_mut().unwrap(),
                vagg.host_mut().unwrap(),
            );
            Ok(())
        }
        _ => {
            let kernel = row_kernel(
                d.h,
                [
                    &k::ET_MESSAGE_FORWARD_H32,
                    &k::ET_MESSAGE_FORWARD_H64,
                    &k::ET_MESSAGE_FORWARD_H128,
                    &k::ET_MESSAGE_FORWARD_H256,
                ],
            );
            let args = KernelArgs::new().input(nl.row_ptr()).input(nl.col());
            let args = input_or_null(args, nl.shift())
                .input(t.positions)
                .input(t.q)
                .input(t.key)
                .input(t.val)
                .input(t.vec);
            let args = filter_args(args, t).output(xagg).output(vagg);
            launch(
                dev,
                kernel,
                row_config(d.n, d.h, basis.size),
                tail_args(args, &d, heads, basis),
            )
        }
    }
}

/// Backward of [`et_message_forward`] for the activations, from the upstream gradients
/// `gx [N, H]` (of `xagg`) and `gv [N, 3, H]` (of `vagg`): ASSIGNS each gradient of `out` that
/// is given (module docs). `dq` gathers over each destination's edges; the others over the
/// transposed CSR, recomputing the basis, the filters and the attention.
pub fn et_message_backward(
    nl: &NeighborList,
    t: &EtTensors,
    basis: RadialBasis,
    heads: usize,
    gx: &Tensor<f32>,
    gv: &Tensor<f32>,
    out: EtGrads<'_>,
) -> Result<()> {
    let op = "et_message_backward";
    let mut devices = devices_of(t);
    devices.push(gx.device());
    devices.push(gv.device());
    for g in [&out.dq, &out.dkey, &out.dval, &out.dvec, &out.dedge]
        .into_iter()
        .flatten()
    {
        devices.push(g.device());
    }
    let dev = same_device(op, nl.device(), &devices)?;
    let d = message_dims(op, nl, t, basis, heads)?;
    expect_len(op, "gx", gx, d.n * d.h)?;
    expect_len(op, "gv", gv, 3 * d.n * d.h)?;
    for (name, g, len) in [
        ("dq", &out.dq, d.n * d.h),
        ("dkey", &out.dkey, d.n * d.h),
        ("dval", &out.dval, 3 * d.n * d.h),
        ("dvec", &out.dvec, 3 * d.n * d.h),
        ("dedge", &out.dedge, 3 * d.e),
    ] {
        if let Some(g) = g {
            expect_len(op, name, g, len)?;
        }
    }
    if d.n == 0 {
        return Ok(());
    }
    let EtGrads {
        dq,
        dkey,
        dval,
        dvec,
        dedge,
    } = out;
    match dev {
        Device::Cpu => {
            et_message_backward_host(
                GraphView::of(nl).unwrap(),
                slices(t),
                basis,
                heads,
                d.h,
                gx.host().unwrap(),
                gv.host().unwrap(),
                EtGradSlices {
                    dq: dq.map(|t| t.host_mut().unwrap()),
                    dkey: dkey.map(|t| t.host_mut().unwrap()),
                    dval: dval.map(|t| t.host_mut().unwrap()),
                    dvec: dvec.map(|t| t.host_mut().unwrap()),
                    dedge: dedge.map(|t| t.host_mut().unwrap()),
                },
            );
            Ok(())
        }
        _ => {
            let cfg = row_config(d.n, d.h, basis.size);
            if let Some(dq) = dq {
                let kernel = row_kernel(
                    d.h,
                    [
                        &k::ET_BACKWARD_QUERY_H32,
                        &k::ET_BACKWARD_QUERY_H64,
                        &k::ET_BACKWARD_QUERY_H128,
                        &k::ET_BACKWARD_QUERY_H256,
                    ],
                );
                let args = KernelArgs::new().input(nl.row_ptr()).input(nl.col());
                let args = input_or_null(args, nl.shift())
                    .input(t.positions)
                    .input(t.q)
                    .input(t.key)
                    .input(t.val);
                let args = filter_args(args, t).input(gx).output(dq);
                launch(dev, kernel, cfg, tail_args(args, &d, heads, basis))?;
            }
            if dkey.is_none() && dval.is_none() && dvec.is_none() && dedge.is_none() {
                return Ok(());
            }
            let kernel = row_kernel(
                d.h,
                [
                    &k::ET_BACKWARD_SOURCE_H32,
                    &k::ET_BACKWARD_SOURCE_H64,
                    &k::ET_BACKWARD_SOURCE_H128,
                    &k::ET_BACKWARD_SOURCE_H256,
                ],
            );
            let args = KernelArgs::new()
                .input(nl.row_ptr())
                .input(nl.col())
                .input(nl.reverse());
            let args = input_or_null(args, nl.shift())
                .input(t.positions)
                .input(t.q)
                .input(t.key)
                .input(t.val)
                .input(t.vec);
            let args = filter_args(args, t).input(gx).input(gv);
            let args = output_or_null(args, dkey);
            let args = output_or_null(args, dval);
            let args = output_or_null(args, dvec);
            // A list without edges has an empty dedge: nothing is written, so no pointer needed.
            let args = match dedge {
                Some(t) if d.e > 0 => args.output(t),
                _ => args.i64(0),
            };
            launch(dev, kernel, cfg, tail_args(args, &d, heads, basis))
        }
    }
}

/// The launch shape of `et_filter_backward` for E edges: (blocks over edges, edges per block).
/// A function of E only, so the order of the sums is too.
fn filter_blocks(edges: usize) -> (usize, usize) {
    let blocks = edges
        .div_ceil(FILTER_EDGES_PER_BLOCK)
        .clamp(1, FILTER_MAX_BLOCKS);
    let per = edges
        .div_ceil(blocks)
        .next_multiple_of(FILTER_EDGES)
        .max(FILTER_EDGES);
    (edges.div_ceil(per).max(1), per)
}

/// Floats of scratch (the per-block partial sums) [`et_filter_backward`] needs for `edges`
/// edges, `hidden` channels and `size` basis functions.
pub fn et_filter_backward_scratch_len(edges: usize, hidden: usize, size: usize) -> usize {
    filter_blocks(edges).0 * 4 * hidden * (size + 1)
}

/// The four filter gradients of [`et_filter_backward`] (each ACCUMULATED when given).
#[derive(Default)]
pub struct EtFilterGrads<'a> {
    /// `[H, K]`.
    pub dw_dk: Option<&'a mut Tensor<f32>>,
    /// `[H]`.
    pub db_dk: Option<&'a mut Tensor<f32>>,
    /// `[3H, K]`.
    pub dw_dv: Option<&'a mut Tensor<f32>>,
    /// `[3H]`.
    pub db_dv: Option<&'a mut Tensor<f32>>,
}

/// Backward of [`et_message_forward`] for the distance filters: ACCUMULATES (`+=`)
/// `dw_dk [H, K] += sum_e g_k f^T`, `db_dk += sum_e g_k`, and the same for the value filter, where
/// `g` is the gradient of the filter's pre-activation on edge e and `f` its basis times cutoff.
/// Deterministic: partial sums per block of a fixed range of edges, added in block order.
/// `scratch` (at least [`et_filter_backward_scratch_len`] floats, same device, contents ignored)
/// holds the partial sums on cuda and emu; `None` allocates it.
#[allow(clippy::too_many_arguments)] // the list, operands, basis, heads, two upstream, outputs
pub fn et_filter_backward(
    nl: &NeighborList,
    t: &EtTensors,
    basis: RadialBasis,
    heads: usize,
    gx: &Tensor<f32>,
    gv: &Tensor<f32>,
    out: EtFilterGrads<'_>,
    scratch: Option<&mut Tensor<f32>>,
) -> Result<()> {
    let op = "et_filter_backward";
    let mut devices = devices_of(t);
    devices.push(gx.device());
    devices.push(gv.device());
    for g in [&out.dw_dk, &out.db_dk, &out.dw_dv, &out.db_dv]
        .into_iter()
        .flatten()
    {
        devices.push(g.device());
    }
    devices.extend(scratch.as_deref().map(|s| s.device()));
    let dev = same_device(op, nl.device(), &devices)?;
    let d = message_dims(op, nl, t, basis, heads)?;
    expect_len(op, "gx", gx, d.n * d.h)?;
    expect_len(op, "gv", gv, 3 * d.n * d.h)?;
    let size = basis.size;
    for (name, g, len) in [
        ("dw_dk", &out.dw_dk, d.h * size),
        ("db_dk", &out.db_dk, d.h),
        ("dw_dv", &out.dw_dv, 3 * d.h * size),
        ("db_dv", &out.db_dv, 3 * d.h),
    ] {
        if let Some(g) = g {
            expect_len(op, name, g, len)?;
        }
    }
    let any =
        out.dw_dk.is_some() || out.db_dk.is_some() || out.dw_dv.is_some() || out.db_dv.is_some();
    if d.e == 0 || !any {
        return Ok(());
    }
    let EtFilterGrads {
        dw_dk,
        db_dk,
        dw_dv,
        db_dv,
    } = out;
    match dev {
        Device::Cpu => {
            et_filter_backward_host(
                GraphView::of(nl).unwrap(),
                slices(t),
                basis,
                heads,
                d.h,
                gx.host().unwrap(),
                gv.host().unwrap(),
                EtFilterGradSlices {
                    dw_dk: dw_dk.map(|t| t.host_mut().unwrap()),
                    db_dk: db_dk.map(|t| t.host_mut().unwrap()),
                    dw_dv: dw_dv.map(|t| t.host_mut().unwrap()),
                    db_dv: db_dv.map(|t| t.host_mut().unwrap()),
                },
            );
            Ok(())
        }
        _ => {
            let (blocks, per_block) = filter_blocks(d.e);
            let entries = 4 * d.h * (size + 1);
            let need = blocks * entries;
            let mut own = None;
            let partial = match scratch {
                Some(s) => {
                    ensure!(
                        s.len() >= need,
                        "{op}: scratch has {} floats, {need} needed",
                        s.len()
                    );
                    s
                }
                None => own.insert(Tensor::zeros(dev, &[need])?),
            };
            let args = KernelArgs::new().input(nl.row_ptr()).input(nl.col());
            let args = input_or_null(args, nl.shift())
                .input(t.positions)
                .input(t.q)
                .input(t.key)
                .input(t.val)
                .input(t.vec);
            let args = filter_args(args, t)
                .input(gx)
                .input(gv)
                .output(partial)
                .i32(d.n as i32)
                .i32(d.e as i32)
                .i32(per_block as i32)
                .i32(d.h as i32)
                .i32(heads as i32)
                .i32(kind_code(basis.kind))
                .i32(size as i32)
                .f32(basis.cutoff);
            launch(
                dev,
                &k::ET_FILTER_BACKWARD,
                LaunchConfig {
                    grid: [blocks as u32, 1, 1],
                    block: [FILTER_THREADS, 1, 1],
                    shared_bytes: filter_shared_bytes(d.h, size, heads) as u32,
                },
                args,
            )?;
            let args = KernelArgs::new().input(partial);
            let args = output_or_null(args, dw_dk);
            let args = output_or_null(args, db_dk);
            let args = output_or_null(args, dw_dv);
            let args = output_or_null(args, db_dv)
                .i32(blocks as i32)
                .i32(d.h as i32)
                .i32(size as i32);
            launch(
                dev,
                &k::ET_FILTER_REDUCE,
                LaunchConfig::for_elements(entries, THREADS),
                args,
            )
        }
    }
}

// ------------------------------------------------------------------------------- layer norm --

/// (N, H) of a layer norm of `x [.., H]` with parameters `[H]`.
fn layernorm_dims(op: &str, x: &Tensor<f32>, gamma: &Tensor<f32>) -> Result<(usize, usize)> {
    let h = gamma.len();
    ensure!(
        h > 0 && gamma.shape() == [h] && x.shape().last() == Some(&h),
        "{op}: x has shape {:?} and gamma {:?}, expected [.., H] and [H]",
        x.shape(),
        gamma.shape()
    );
    ensure!(x.len() / h <= i32::MAX as usize, "{op}: too many rows");
    Ok((x.len() / h, h))
}

/// Layer norm over the last dimension (TorchMD-ET's `nn.LayerNorm` on the scalars): ASSIGNS
/// `y = gamma (x - mean) / sqrt(var + eps) + beta` (biased variance) and `stats [N, 2]` = (mean,
/// 1 / sqrt(var + eps)) per row for the backward.
pub fn et_layernorm_forward(
    x: &Tensor<f32>,
    gamma: &Tensor<f32>,
    beta: &Tensor<f32>,
    eps: f32,
    y: &mut Tensor<f32>,
    stats: &mut Tensor<f32>,
) -> Result<()> {
    let op = "et_layernorm_forward";
    let dev = same_device(
        op,
        x.device(),
        &[gamma.device(), beta.device(), y.device(), stats.device()],
    )?;
    let (n, h) = layernorm_dims(op, x, gamma)?;
    expect_len(op, "beta", beta, h)?;
    expect_len(op, "y", y, n * h)?;
    expect_len(op, "stats", stats, 2 * n)?;
    ensure!(eps > 0.0, "{op}: eps must be positive, got {eps}");
    if n == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            et_layernorm_forward_host(
                x.host().unwrap(),
                gamma.host().unwrap(),
                beta.host().unwrap(),
                eps,
                y.host_mut().unwrap(),
                stats.host_mut().unwrap(),
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::ET_LAYERNORM_FORWARD,
            LaunchConfig::for_elements(32 * n, THREADS),
            KernelArgs::new()
                .input(x)
                .input(gamma)
                .input(beta)
                .output(y)
                .output(stats)
                .i32(n as i32)
                .i32(h as i32)
                .f32(eps),
        ),
    }
}

/// The layer norm's row blocks for the parameter sums: (blocks, rows per block), a function of N.
fn ln_blocks(n: usize) -> (usize, usize) {
    let blocks = n.div_ceil(LN_ROWS_PER_BLOCK).clamp(1, LN_MAX_BLOCKS);
    let per = n.div_ceil(blocks).max(1);
    (n.div_ceil(per).max(1), per)
}

/// Floats of scratch [`et_layernorm_backward`] needs for N rows of H.
pub fn et_layernorm_backward_scratch_len(n: usize, h: usize) -> usize {
    ln_blocks(n).0 * 2 * h
}

/// Backward of [`et_layernorm_forward`] from its `stats`: ASSIGNS `dx` and ACCUMULATES
/// `dgamma`, `dbeta` (each when given; the parameter sums deterministic: per-block partials over
/// fixed rows added in block order). `scratch` as for [`et_filter_backward`].
#[allow(clippy::too_many_arguments)] // inputs, upstream, three outputs and the scratch
pub fn et_layernorm_backward(
    x: &Tensor<f32>,
    gamma: &Tensor<f32>,
    stats: &Tensor<f32>,
    dy: &Tensor<f32>,
    dx: Option<&mut Tensor<f32>>,
    dgamma: Option<&mut Tensor<f32>>,
    dbeta: Option<&mut Tensor<f32>>,
    scratch: Option<&mut Tensor<f32>>,
) -> Result<()> {
    let op = "et_layernorm_backward";
    let mut devices = vec![gamma.device(), stats.device(), dy.device()];
    devices.extend(dx.as_deref().map(|t| t.device()));
    devices.extend(dgamma.as_deref().map(|t| t.device()));
    devices.extend(dbeta.as_deref().map(|t| t.device()));
    devices.extend(scratch.as_deref().map(|t| t.device()));
    let dev = same_device(op, x.device(), &devices)?;
    let (n, h) = layernorm_dims(op, x, gamma)?;
    expect_len(op, "stats", stats, 2 * n)?;
    expect_len(op, "dy", dy, n * h)?;
    if let Some(t) = dx.as_deref() {
        expect_len(op, "dx", t, n * h)?;
    }
    if let Some(t) = dgamma.as_deref() {
        expect_len(op, "dgamma", t, h)?;
    }
    if let Some(t) = dbeta.as_deref() {
        expect_len(op, "dbeta", t, h)?;
    }
    if n == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            et_layernorm_backward_host(
                x.host().unwrap(),
                gamma.host().unwrap(),
                stats.host().unwrap(),
                dy.host().unwrap(),
                dx.map(|t| t.host_mut().unwrap()),
                dgamma.map(|t| t.host_mut().unwrap()),
                dbeta.map(|t| t.host_mut().unwrap()),
            );
            Ok(())
        }
        _ => {
            if let Some(dx) = dx {
                launch(
                    dev,
                    &k::ET_LAYERNORM_BACKWARD,
                    LaunchConfig::for_elements(32 * n, THREADS),
                    KernelArgs::new()
                        .input(x)
                        .input(gamma)
                        .input(stats)
                        .input(dy)
                        .output(dx)
                        .i32(n as i32)
                        .i32(h as i32),
                )?;
            }
            if dgamma.is_none() && dbeta.is_none() {
                return Ok(());
            }
            let (blocks, per) = ln_blocks(n);
            let need = blocks * 2 * h;
            let mut own = None;
            let partial = match scratch {
                Some(s) => {
                    ensure!(
                        s.len() >= need,
                        "{op}: scratch has {} floats, {need} needed",
                        s.len()
                    );
                    s
                }
                None => own.insert(Tensor::zeros(dev, &[need])?),
            };
            launch(
                dev,
                &k::ET_LAYERNORM_PARAM_PARTIAL,
                LaunchConfig {
                    grid: [blocks as u32, 1, 1],
                    block: [THREADS.min(h.next_multiple_of(32) as u32), 1, 1],
                    shared_bytes: 0,
                },
                KernelArgs::new()
                    .input(x)
                    .input(stats)
                    .input(dy)
                    .output(partial)
                    .i32(n as i32)
                    .i32(h as i32)
                    .i32(per as i32),
            )?;
            let args = KernelArgs::new().input(partial);
            let args = output_or_null(args, dgamma);
            let args = output_or_null(args, dbeta).i32(blocks as i32).i32(h as i32);
            launch(
                dev,
                &k::ET_REDUCE_PAIR,
                LaunchConfig::for_elements(2 * h, THREADS),
                args,
            )
        }
    }
}
