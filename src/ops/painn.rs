//! PaiNN message passing over the atom-stage neighbor list (SPEC step 2; Schütt et al. 2021),
//! forward and backward, with the radial basis and the edge geometry computed inside the kernels:
//! no per-edge feature (`[E, K]` basis values, `[E, 3H]` filters or messages) is ever stored, so
//! memory grows with atoms, not edges. Kernels: `cuda/painn.cu`.
//!
//! Layouts (row-major, N = frames x atoms rows of the [`NeighborList`], H channels, K basis
//! functions): positions `[N, 3]`, `phi [N, 3H]`, scalars `s [N, H]`, vectors `v [N, 3, H]`
//! (`v[n, d, h]` at `(3 n + d) H + h`), filter weight `w [3H, K]` and bias `b [3H]` (a
//! `Linear(K -> 3H)`). For the edge `e = (j -> i)` of row i:
//!
//! ```text
//! vec = (x_j + shift_e) - x_i,  r = |vec|,  u = vec / r   (u = 0 at r = 0)
//! W_e = (rbf(r) w^T + b) * fcut(r)                         (3H values, never stored)
//! (x_s, x_vv, x_vs) = phi_j * W_e                          (three blocks of H)
//! ds_i = sum_e x_s,   dv_i[d] = sum_e x_vv * v_j[d] + x_vs * u_e[d]
//! ```
//!
//! The basis is raw inside the filter (the cutoff multiplies the whole filter, bias included, so
//! messages fade to zero as a neighbour leaves the radius); [`radial_basis_forward`] returns the
//! basis times the cutoff, the smooth edge features of the graph convolution's convention.
//!
//! Coincident atoms (r = 0, which the neighbor list keeps) give u = 0, and every derivative
//! through u and r is taken as 0 there: results and gradients stay finite.
//!
//! Gradients: [`painn_message_backward`] ASSIGNS `d_phi`, `d_v` and the per-edge position
//! gradient `dvec [E, 3]` (a gather over the transposed CSR: row j's edges name their mirrors);
//! [`painn_filter_backward`] ACCUMULATES (`+=`) `d_w` and `d_b` by per-block partial sums over
//! fixed edge ranges added in block order; [`painn_position_backward`] ASSIGNS `d_positions`
//! from `dvec`. No float atomics anywhere: results are bitwise reproducible for a given shape on
//! a given device.

use super::equivariant::EqReal;
use super::neighbor_list::{HostNeighborList, NeighborList};
use super::{expect_len, same_device, CPU_CHUNK};
use crate::device::Device;
use crate::kernels::painn as k;
use crate::launch::{launch, Kernel, KernelArgs, LaunchConfig};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Largest channel count H of the message kernels (8 chunks of 32 lanes).
pub const MAX_HIDDEN: usize = 256;
/// Largest number of radial basis functions K.
pub const MAX_RBF: usize = 64;

/// Warps per block of the row kernels (`kPainnWarps`).
const ROW_WARPS: usize = 4;
/// Threads per block of the row kernels (`kPainnRowThreads`).
const ROW_THREADS: u32 = 32 * ROW_WARPS as u32;
/// Edges a warp takes at once (`kPainnGroup`).
const GROUP: usize = 4;
/// Blocks of the row kernels at most: they stride over rows, and fewer blocks load the filter
/// into shared memory fewer times.
const ROW_MAX_BLOCKS: usize = 1024;
/// `painn_filter_backward`: threads, edges per shared-memory step, entries per thread
/// (`kPainnFilterThreads`, `kPainnFilterEdges`, `kPainnFilterEntries`).
const FILTER_THREADS: u32 = 256;
const FILTER_EDGES: usize = 8;
const FILTER_ENTRIES: usize = 8;
/// Edges per block of `painn_filter_backward` at least, and its blocks (partial sums) at most.
const FILTER_EDGES_PER_BLOCK: usize = 64;
const FILTER_MAX_BLOCKS: usize = 128;
/// Threads per block of the elementwise kernels.
const THREADS: u32 = 256;
/// Dynamic shared memory an sm_80 / sm_90 block may opt in to.
const MAX_SHARED_BYTES: usize = 227 * 1024;
/// Edges per partial sum of the CPU filter backward at least, and its partial sums at most.
const HOST_FILTER_EDGES: usize = 256;
const HOST_FILTER_MAX_CHUNKS: usize = 64;

/// The float types of the CPU twins: [`EqReal`] plus the trigonometry of the cosine cutoff.
pub trait PainnReal: EqReal {
    /// cos(self).
    fn cos(self) -> Self;
    /// sin(self).
    fn sin(self) -> Self;
    /// e^self by an inlined polynomial where it can be (f32: [`crate::ops::eqsdpa::exp_f32`],
    /// one or two ulp, saturating above 88 and 0 below -87; f64: libm), so loops over it
    /// vectorise.
    fn exp_fast(self) -> Self;
}
impl PainnReal for f32 {
    fn cos(self) -> Self {
        f32::cos(self)
    }
    fn sin(self) -> Self {
        f32::sin(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        crate::ops::eqsdpa::exp_f32(self)
    }
}
impl PainnReal for f64 {
    fn cos(self) -> Self {
        f64::cos(self)
    }
    fn sin(self) -> Self {
        f64::sin(self)
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        f64::exp(self)
    }
}

// ----------------------------------------------------------------------------- radial basis --

/// The family of radial basis functions (TOML: `"gaussian"`, `"expnormal"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RbfKind {
    /// `exp(-(r - mu_k)^2 / (2 spacing^2))`, centres `mu_k = k spacing` evenly spaced on
    /// `[0, cutoff]` (TorchMD-Net's `GaussianSmearing`).
    Gaussian,
    /// `exp(-beta (exp(-alpha r) - mu_k)^2)` with `alpha = 5 / cutoff`, means evenly spaced on
    /// `[exp(-cutoff), 1]` and `beta = (2 (1 - exp(-cutoff)) / K)^-2`, as TorchMD-Net's
    /// `ExpNormalSmearing` initialises them (fixed here, not trained).
    #[default]
    ExpNormal,
}

impl RbfKind {
    /// The kernels' code for the kind.
    fn code(self) -> i32 {
        match self {
            Self::Gaussian => 0,
            Self::ExpNormal => 1,
        }
    }
}

/// A radial basis: K functions of one kind on `[0, cutoff]` (Angstrom).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RadialBasis {
    /// The family.
    pub kind: RbfKind,
    /// Functions K (1 to [`MAX_RBF`]).
    pub size: usize,
    /// The cutoff c in Angstrom: the cosine cutoff is 0 from c on.
    pub cutoff: f32,
}

/// The constants of a basis in the twins' precision (the kernels' `PainnBasis`).
struct BasisParams<R> {
    kind: RbfKind,
    size: usize,
    cutoff: R,
    a: R,
    b: R,
    start: R,
    step: R,
}

impl<R: PainnReal> BasisParams<R> {
    /// exp(-alpha r) for ExpNormal (shared by its K functions), r for Gaussian.
    fn arg(&self, r: R) -> R {
        match self.kind {
            RbfKind::Gaussian => r,
            RbfKind::ExpNormal => (-(self.a * r)).exp(),
        }
    }

    /// Function k at r (t = `arg(r)`) and its derivative in r.
    fn value(&self, k: usize, r: R, t: R) -> (R, R) {
        let two = R::of(2.0);
        match self.kind {
            RbfKind::Gaussian => {
                let d = r - R::of(k as f64) * self.b;
                let val = (self.a * d * d).exp();
                (val, val * two * self.a * d)
            }
            RbfKind::ExpNormal => {
                let d = t - (self.start + R::of(k as f64) * self.step);
                let val = (-(self.b * d * d)).exp();
                (val, val * two * self.b * self.a * t * d)
            }
        }
    }

    /// The K values at r into `out`, and their derivatives into `deriv` when given.
    fn values(&self, r: R, out: &mut [R], deriv: Option<&mut [R]>) {
        let t = self.arg(r);
        match deriv {
            Some(d) => {
                for (k, (o, d)) in out.iter_mut().zip(d.iter_mut()).enumerate() {
                    (*o, *d) = self.value(k, r, t);
                }
            }
            None => {
                for (k, o) in out.iter_mut().enumerate() {
                    *o = self.value(k, r, t).0;
                }
            }
        }
    }
}

impl RadialBasis {
    /// A checked basis: `size` in `1..=MAX_RBF`, `cutoff` positive and finite.
    pub fn new(kind: RbfKind, size: usize, cutoff: f32) -> Result<Self> {
        let b = Self { kind, size, cutoff };
        b.check("RadialBasis")?;
        Ok(b)
    }

    fn check(&self, op: &str) -> Result<()> {
        ensure!(
            (1..=MAX_RBF).contains(&self.size),
            "{op}: {} radial basis functions; 1 to {MAX_RBF} are supported",
            self.size
        );
        ensure!(
            self.cutoff.is_finite() && self.cutoff > 0.0,
            "{op}: the radial basis cutoff must be positive and finite, got {}",
            self.cutoff
        );
        Ok(())
    }

    fn params<R: PainnReal>(&self) -> BasisParams<R> {
        let c = R::of(self.cutoff as f64);
        let one = R::of(1.0);
        let k = self.size;
        match self.kind {
            RbfKind::Gaussian => {
                let spacing = if k > 1 { c / R::of((k - 1) as f64) } else { c };
                BasisParams {
                    kind: self.kind,
                    size: k,
                    cutoff: c,
                    a: R::of(-0.5) / (spacing * spacing),
                    b: spacing,
                    start: R::of(0.0),
                    step: R::of(0.0),
                }
            }
            RbfKind::ExpNormal => {
                let start = (-c).exp();
                let width = R::of(2.0) / R::of(k as f64) * (one - start);
                BasisParams {
                    kind: self.kind,
                    size: k,
                    cutoff: c,
                    a: R::of(5.0) / c,
                    b: one / (width * width),
                    start,
                    step: if k > 1 {
                        (one - start) / R::of((k - 1) as f64)
                    } else {
                        R::of(0.0)
                    },
                }
            }
        }
    }

    /// The K basis values at distance `r` (without the cutoff) into `out [K]`, and their
    /// derivatives in r into `deriv [K]` when given: the CPU twin of the kernels' basis.
    pub fn eval_host<R: PainnReal>(&self, r: R, out: &mut [R], deriv: Option<&mut [R]>) {
        let p = self.params::<R>();
        debug_assert!(out.len() == p.size);
        p.values(r, out, deriv);
    }
}

/// The cosine cutoff `0.5 (cos(pi r / c) + 1)` below c (0 from c on) and its derivative in r.
pub fn cosine_cutoff_host<R: PainnReal>(r: R, cutoff: R) -> (R, R) {
    if r < cutoff {
        let pi = R::of(std::f64::consts::PI);
        let x = pi * (r / cutoff);
        (
            R::of(0.5) * (x.cos() + R::of(1.0)),
            R::of(-0.5) * (pi / cutoff) * x.sin(),
        )
    } else {
        (R::of(0.0), R::of(0.0))
    }
}

/// CPU twin of [`radial_basis_forward`]: `out[e, k] = rbf_k(dist[e]) fcut(dist[e])`.
pub fn radial_basis_forward_host<R: PainnReal>(
    dist: &[R],
    out: &mut [R],
    kind: RbfKind,
    size: usize,
    cutoff: f32,
) {
    if size == 0 {
        return;
    }
    let p = RadialBasis { kind, size, cutoff }.params::<R>();
    out.par_chunks_mut(size)
        .zip(dist.par_iter())
        .with_min_len((CPU_CHUNK / size).max(1))
        .for_each(|(o, &r)| {
            let (f, _) = cosine_cutoff_host(r, p.cutoff);
            p.values(r, o, None);
            for o in o.iter_mut() {
                *o = *o * f;
            }
        });
}

/// Radial edge features `out [E, K]` of distances `dist [E]` (Angstrom): the K basis functions of
/// `kind` times the cosine cutoff (zero from the cutoff on). Assigns `out`. The message kernels
/// compute the same basis on the fly; this op is for tests and for callers that want the
/// features themselves.
pub fn radial_basis_forward(
    dist: &Tensor<f32>,
    out: &mut Tensor<f32>,
    kind: RbfKind,
    size: usize,
    cutoff: f32,
) -> Result<()> {
    let op = "radial_basis_forward";
    let dev = same_device(op, dist.device(), &[out.device()])?;
    let basis = RadialBasis { kind, size, cutoff };
    basis.check(op)?;
    let edges = dist.len();
    expect_len(op, "out", out, edges * size)?;
    if edges == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            radial_basis_forward_host(
                dist.host().unwrap(),
                out.host_mut().unwrap(),
                kind,
                size,
                cutoff,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::RADIAL_BASIS_FORWARD,
            LaunchConfig::for_elements(edges * size, THREADS),
            KernelArgs::new()
                .input(dist)
                .output(out)
                .i64(edges as i64)
                .i32(kind.code())
                .i32(size as i32)
                .f32(cutoff),
        ),
    }
}

// -------------------------------------------------------------------------------- geometry --

/// A neighbor list's CSR as host slices: what the CPU twins read.
#[derive(Clone, Copy, Debug)]
pub struct GraphView<'a> {
    /// `[N + 1]` row offsets (rows are destination atoms).
    pub row_ptr: &'a [i32],
    /// `[E]` source atom of each edge.
    pub col: &'a [i32],
    /// `[E]` index of each edge's mirror.
    pub reverse: &'a [i32],
    /// `[E, 3]` periodic image offsets to add to the source's position, if any.
    pub shift: Option<&'a [f32]>,
}

impl<'a> From<&'a HostNeighborList> for GraphView<'a> {
    fn from(nl: &'a HostNeighborList) -> Self {
        Self {
            row_ptr: &nl.row_ptr,
            col: &nl.col,
            reverse: &nl.reverse,
            shift: nl.shift.as_deref(),
        }
    }
}

impl<'a> GraphView<'a> {
    /// The view of a list on a host device (cpu or emu); `None` on cuda.
    pub fn of(nl: &'a NeighborList) -> Option<Self> {
        Some(Self {
            row_ptr: nl.row_ptr().host()?,
            col: nl.col().host()?,
            reverse: nl.reverse().host()?,
            shift: match nl.shift() {
                Some(s) => Some(s.host()?),
                None => None,
            },
        })
    }

    /// Rows N.
    pub fn rows(&self) -> usize {
        self.row_ptr.len().saturating_sub(1)
    }

    /// Edges E.
    pub fn edges(&self) -> usize {
        self.col.len()
    }

    fn row(&self, i: usize) -> std::ops::Range<usize> {
        self.row_ptr[i] as usize..self.row_ptr[i + 1] as usize
    }

    /// The destination row of every edge.
    fn edge_rows(&self) -> Vec<u32> {
        let mut out = vec![0u32; self.edges()];
        for i in 0..self.rows() {
            out[self.row(i)].fill(i as u32);
        }
        out
    }
}

/// The geometry of one edge: distance, unit vector (0 at r = 0), cutoff and its derivative.
#[derive(Clone, Copy)]
struct Geometry<R> {
    r: R,
    u: [R; 3],
    f: R,
    df: R,
}

/// Edge e = (j -> i): `vec = (x_j + shift_e) - x_i` (the kernels' `painn_edge`).
fn edge_geometry<R: PainnReal>(
    pos: &[R],
    shift: Option<&[f32]>,
    i: usize,
    j: usize,
    e: usize,
    cutoff: R,
) -> Geometry<R> {
    let vec: [R; 3] = std::array::from_fn(|d| {
        let mut x = pos[3 * j + d];
        if let Some(s) = shift {
            x = x + R::of(s[3 * e + d] as f64);
        }
        x - pos[3 * i + d]
    });
    let d2 = vec[0] * vec[0] + vec[1] * vec[1] + vec[2] * vec[2];
    let zero = R::of(0.0);
    let r = d2.sqrt();
    let inv = if d2 > zero { R::of(1.0) / r } else { zero };
    let (f, df) = cosine_cutoff_host(r, cutoff);
    Geometry {
        r,
        u: vec.map(|x| x * inv),
        f,
        df,
    }
}

/// `w [3H, K]` as `[K, 3H]`, so that a filter is a sum of K rows (vectorised over channels).
fn transpose<R: Copy>(w: &[R], h3: usize, size: usize) -> Vec<R> {
    let mut t = Vec::with_capacity(w.len());
    for k in 0..size {
        t.extend((0..h3).map(|c| w[c * size + k]));
    }
    t
}

/// `out[c] = sum_k coeff[k] wt[k, col0 + c]` (+ `bias[col0 + c]`) for the `out.len()` columns
/// from `col0` of `wt [K, width]`. Four k at a time, so that `out` is read and written once per
/// four rows of `wt` (the loop over c vectorises).
fn project<R: PainnReal>(
    wt: &[R],
    width: usize,
    col0: usize,
    coeff: &[R],
    bias: Option<&[R]>,
    out: &mut [R],
) {
    let cols = out.len();
    let row = |k: usize| &wt[k * width + col0..k * width + col0 + cols];
    match bias {
        Some(b) => out.copy_from_slice(&b[col0..col0 + cols]),
        None => out.fill(R::of(0.0)),
    }
    let mut k = 0;
    while k + 4 <= coeff.len() {
        let (a0, a1, a2, a3) = (coeff[k], coeff[k + 1], coeff[k + 2], coeff[k + 3]);
        let (w0, w1, w2, w3) = (row(k), row(k + 1), row(k + 2), row(k + 3));
        for c in 0..cols {
            out[c] = out[c] + ((a0 * w0[c] + a1 * w1[c]) + (a2 * w2[c] + a3 * w3[c]));
        }
        k += 4;
    }
    for (k, &a) in coeff.iter().enumerate().skip(k) {
        for (o, &w) in out.iter_mut().zip(row(k)) {
            *o = *o + a * w;
        }
    }
}

// ------------------------------------------------------------------------------ CPU twins --

/// CPU twin of [`painn_message_forward`]: assigns `ds [N, H]` and `dv [N, 3, H]`.
#[allow(clippy::too_many_arguments)] // graph, five inputs, the basis, two outputs, H
pub fn painn_message_forward_host<R: PainnReal>(
    graph: GraphView<'_>,
    pos: &[R],
    phi: &[R],
    v: &[R],
    w: &[R],
    b: &[R],
    basis: RadialBasis,
    ds: &mut [R],
    dv: &mut [R],
    hidden: usize,
) {
    let (h, h3) = (hidden, 3 * hidden);
    if h == 0 {
        return;
    }
    let p = basis.params::<R>();
    let wt = transpose(w, h3, p.size);
    let zero = R::of(0.0);
    ds.par_chunks_mut(h)
        .zip(dv.par_chunks_mut(h3))
        .enumerate()
        .for_each_init(
            || (vec![zero; p.size], vec![zero; h3]),
            |(rbf, wf), (i, (dsi, dvi))| {
                dsi.fill(zero);
                dvi.fill(zero);
                for e in graph.row(i) {
                    let j = graph.col[e] as usize;
                    let g = edge_geometry(pos, graph.shift, i, j, e, p.cutoff);
                    p.values(g.r, rbf, None);
                    project(&wt, h3, 0, rbf, Some(b), wf);
                    let ph = &phi[j * h3..(j + 1) * h3];
                    let vj = &v[j * h3..(j + 1) * h3];
                    for c in 0..h {
                        dsi[c] = dsi[c] + ph[c] * (wf[c] * g.f);
                        let xvv = ph[h + c] * (wf[h + c] * g.f);
                        let xvs = ph[2 * h + c] * (wf[2 * h + c] * g.f);
                        for d in 0..3 {
                            dvi[d * h + c] = dvi[d * h + c] + (xvv * vj[d * h + c] + xvs * g.u[d]);
                        }
                    }
                }
            },
        );
}

/// The per-edge gradient of a message with respect to its filter input and geometry, shared by
/// the twins: `g_x` (the gradient of `x = phi_j * W_e`) for the edge (j -> i).
#[allow(clippy::too_many_arguments)] // two upstream gradients, v, the edge, channel
fn edge_gx<R: PainnReal>(
    dds: &[R],
    ddv: &[R],
    v: &[R],
    u: [R; 3],
    i: usize,
    j: usize,
    h: usize,
    c: usize,
) -> [R; 3] {
    let h3 = 3 * h;
    let gi = &ddv[i * h3..(i + 1) * h3];
    let vj = &v[j * h3..(j + 1) * h3];
    let gvv = gi[c] * vj[c] + gi[h + c] * vj[h + c] + gi[2 * h + c] * vj[2 * h + c];
    let gvs = gi[c] * u[0] + gi[h + c] * u[1] + gi[2 * h + c] * u[2];
    [dds[i * h + c], gvv, gvs]
}

/// CPU twin of [`painn_message_backward`]: assigns `dphi [N, 3H]`, `dv [N, 3, H]` and
/// `dvec [E, 3]` (dL/d vec_e), each when given.
#[allow(clippy::too_many_arguments)] // graph, five inputs, the basis, two upstream, three outputs
pub fn painn_message_backward_host<R: PainnReal>(
    graph: GraphView<'_>,
    pos: &[R],
    phi: &[R],
    v: &[R],
    w: &[R],
    b: &[R],
    basis: RadialBasis,
    dds: &[R],
    ddv: &[R],
    dphi: Option<&mut [R]>,
    dv: Option<&mut [R]>,
    dvec: Option<&mut [R]>,
    hidden: usize,
) {
    let (h, h3) = (hidden, 3 * hidden);
    if h == 0 {
        return;
    }
    let p = basis.params::<R>();
    let wt = transpose(w, h3, p.size);
    let zero = R::of(0.0);
    let n = graph.rows();
    if dphi.is_some() || dv.is_some() {
        // An output that is not wanted is computed into a throwaway buffer: the twin is the
        // reference, not the fast path.
        let (mut own_phi, mut own_v) = (Vec::new(), Vec::new());
        let dphi = dphi.unwrap_or_else(|| {
            own_phi = vec![zero; n * h3];
            &mut own_phi
        });
        let dv = dv.unwrap_or_else(|| {
            own_v = vec![zero; n * h3];
            &mut own_v
        });
        dphi.par_chunks_mut(h3)
            .zip(dv.par_chunks_mut(h3))
            .enumerate()
            .for_each_init(
                || (vec![zero; p.size], vec![zero; h3]),
                |(rbf, wf), (j, (dpj, dvj))| {
                    dpj.fill(zero);
                    dvj.fill(zero);
                    let ph = &phi[j * h3..(j + 1) * h3];
                    for ep in graph.row(j) {
                        let i = graph.col[ep] as usize;
                        let e = graph.reverse[ep] as usize;
                        let g = edge_geometry(pos, graph.shift, i, j, e, p.cutoff);
                        p.values(g.r, rbf, None);
                        project(&wt, h3, 0, rbf, Some(b), wf);
                        for c in 0..h {
                            let gx = edge_gx(dds, ddv, v, g.u, i, j, h, c);
                            let ws = wf[c] * g.f;
                            let wvv = wf[h + c] * g.f;
                            let wvs = wf[2 * h + c] * g.f;
                            dpj[c] = dpj[c] + gx[0] * ws;
                            dpj[h + c] = dpj[h + c] + gx[1] * wvv;
                            dpj[2 * h + c] = dpj[2 * h + c] + gx[2] * wvs;
                            let xvv = ph[h + c] * wvv;
                            for d in 0..3 {
                                dvj[d * h + c] = dvj[d * h + c] + ddv[i * h3 + d * h + c] * xvv;
                            }
                        }
                    }
                },
            );
    }
    if let Some(dvec) = dvec {
        // dr = sum_c g_W[c] dW[c]/dr with W = (rbf w^T + b) f is, with q = g_W w (K values),
        // f <rbf', q> + f' (<rbf, q> + <g_W, b>): one product with w instead of two.
        let rows = graph.edge_rows();
        let k = p.size;
        dvec.par_chunks_mut(3).enumerate().for_each_init(
            || {
                (
                    vec![zero; k],
                    vec![zero; k],
                    vec![zero; h3],
                    vec![zero; k],
                    vec![zero; h],
                )
            },
            |(rbf, drbf, gw, q, pvs), (e, out)| {
                let i = rows[e] as usize;
                let j = graph.col[e] as usize;
                let g = edge_geometry(pos, graph.shift, i, j, e, p.cutoff);
                p.values(g.r, rbf, Some(drbf));
                let ph = &phi[j * h3..(j + 1) * h3];
                for c in 0..h {
                    let gx = edge_gx(dds, ddv, v, g.u, i, j, h, c);
                    for (part, &gx) in gx.iter().enumerate() {
                        gw[part * h + c] = gx * ph[part * h + c];
                    }
                }
                // q = g_W w: the rows of w [3H, K] four at a time.
                q.fill(zero);
                for (c4, (g, w4)) in gw.chunks(4).zip(w.chunks(4 * k)).enumerate() {
                    if g.len() == 4 {
                        let (w0, w1, w2, w3) =
                            (&w4[..k], &w4[k..2 * k], &w4[2 * k..3 * k], &w4[3 * k..]);
                        for kk in 0..k {
                            q[kk] = q[kk]
                                + ((g[0] * w0[kk] + g[1] * w1[kk])
                                    + (g[2] * w2[kk] + g[3] * w3[kk]));
                        }
                    } else {
                        for (t, &a) in g.iter().enumerate() {
                            let c = 4 * c4 + t;
                            for (q, &w) in q.iter_mut().zip(&w[c * k..(c + 1) * k]) {
                                *q = *q + a * w;
                            }
                        }
                    }
                }
                let dotp = |x: &[R], y: &[R]| x.iter().zip(y).fold(zero, |s, (&a, &b)| s + a * b);
                let dr = g.f * dotp(drbf, q) + g.df * (dotp(rbf, q) + dotp(gw, b));
                // du[d] = sum_h ddv_i[d, h] x_vs[h], x_vs = phi_j[2H:] (P[2H:] + b[2H:]) f.
                project(&wt, h3, 2 * h, rbf, Some(b), pvs);
                let mut du = [zero; 3];
                for c in 0..h {
                    let xvs = ph[2 * h + c] * (pvs[c] * g.f);
                    for (d, du) in du.iter_mut().enumerate() {
                        *du = *du + ddv[i * h3 + d * h + c] * xvs;
                    }
                }
                let inv = if g.r > zero { R::of(1.0) / g.r } else { zero };
                let duu = du[0] * g.u[0] + du[1] * g.u[1] + du[2] * g.u[2];
                for d in 0..3 {
                    out[d] = dr * g.u[d] + (du[d] - duu * g.u[d]) * inv;
                }
            },
        );
    }
}

/// CPU twin of [`painn_filter_backward`]: `dw [3H, K] += sum_e g_W f rbf^T` and
/// `db [3H] += sum_e g_W f` (either may be skipped), summed over fixed chunks of edges whose
/// partial sums are added in order, so the result does not depend on the thread count.
#[allow(clippy::too_many_arguments)] // graph, four inputs, the basis, two upstream, two outputs
pub fn painn_filter_backward_host<R: PainnReal>(
    graph: GraphView<'_>,
    pos: &[R],
    phi: &[R],
    v: &[R],
    basis: RadialBasis,
    dds: &[R],
    ddv: &[R],
    dw: Option<&mut [R]>,
    db: Option<&mut [R]>,
    hidden: usize,
) {
    let (h, h3) = (hidden, 3 * hidden);
    let edges = graph.edges();
    if h == 0 || edges == 0 || (dw.is_none() && db.is_none()) {
        return;
    }
    let p = basis.params::<R>();
    let (size, k1) = (p.size, p.size + 1);
    let zero = R::of(0.0);
    let chunks = edges
        .div_ceil(HOST_FILTER_EDGES)
        .clamp(1, HOST_FILTER_MAX_CHUNKS);
    let per = edges.div_ceil(chunks);
    let rows = graph.edge_rows();
    let partials: Vec<Vec<R>> = (0..chunks)
        .into_par_iter()
        .map(|chunk| {
            // Four edges at a time: each row of the partial sums is read and written once per
            // four edges. Slots past the chunk's end hold zeros.
            let mut acc = vec![zero; h3 * k1];
            let mut rbx = vec![zero; 4 * k1];
            let mut gw = vec![zero; 4 * h3];
            let end = ((chunk + 1) * per).min(edges);
            for e0 in (chunk * per..end).step_by(4) {
                for t in 0..4 {
                    let (rb, gt) = (
                        &mut rbx[t * k1..(t + 1) * k1],
                        &mut gw[t * h3..(t + 1) * h3],
                    );
                    let e = e0 + t;
                    if e >= end {
                        rb.fill(zero);
                        gt.fill(zero);
                        continue;
                    }
                    let i = rows[e] as usize;
                    let j = graph.col[e] as usize;
                    let g = edge_geometry(pos, graph.shift, i, j, e, p.cutoff);
                    p.values(g.r, &mut rb[..size], None);
                    rb[size] = R::of(1.0);
                    let ph = &phi[j * h3..(j + 1) * h3];
                    for c in 0..h {
                        let gx = edge_gx(dds, ddv, v, g.u, i, j, h, c);
                        for (part, &gx) in gx.iter().enumerate() {
                            let cc = part * h + c;
                            gt[cc] = g.f * (gx * ph[cc]);
                        }
                    }
                }
                let (r0, r1, r2, r3) = (
                    &rbx[..k1],
                    &rbx[k1..2 * k1],
                    &rbx[2 * k1..3 * k1],
                    &rbx[3 * k1..],
                );
                for (cc, row) in acc.chunks_mut(k1).enumerate() {
                    let (g0, g1, g2, g3) = (gw[cc], gw[h3 + cc], gw[2 * h3 + cc], gw[3 * h3 + cc]);
                    for kk in 0..k1 {
                        row[kk] =
                            row[kk] + ((g0 * r0[kk] + g1 * r1[kk]) + (g2 * r2[kk] + g3 * r3[kk]));
                    }
                }
            }
            acc
        })
        .collect();
    let mut total = vec![zero; h3 * k1];
    for part in &partials {
        for (t, &x) in total.iter_mut().zip(part) {
            *t = *t + x;
        }
    }
    if let Some(dw) = dw {
        for c in 0..h3 {
            for k in 0..size {
                dw[c * size + k] = dw[c * size + k] + total[c * k1 + k];
            }
        }
    }
    if let Some(db) = db {
        for c in 0..h3 {
            db[c] = db[c] + total[c * k1 + size];
        }
    }
}

/// CPU twin of [`painn_position_backward`]: `dpos[a] = sum over row a of dvec[reverse[e]] -
/// dvec[e]` (assigned).
pub fn painn_position_backward_host<R: PainnReal>(
    graph: GraphView<'_>,
    dvec: &[R],
    dpos: &mut [R],
) {
    dpos.par_chunks_mut(3).enumerate().for_each(|(a, out)| {
        let mut acc = [R::of(0.0); 3];
        for e in graph.row(a) {
            let r = graph.reverse[e] as usize;
            for d in 0..3 {
                acc[d] = acc[d] + (dvec[3 * r + d] - dvec[3 * e + d]);
            }
        }
        out.copy_from_slice(&acc);
    });
}

/// CPU twin of [`painn_split3_forward`].
pub fn painn_split3_forward_host<R: PainnReal>(
    x: &[R],
    a: &mut [R],
    b: &mut [R],
    c: &mut [R],
    hidden: usize,
) {
    if hidden == 0 {
        return;
    }
    x.chunks(3 * hidden)
        .zip(a.chunks_mut(hidden))
        .zip(b.chunks_mut(hidden).zip(c.chunks_mut(hidden)))
        .for_each(|((x, a), (b, c))| {
            a.copy_from_slice(&x[..hidden]);
            b.copy_from_slice(&x[hidden..2 * hidden]);
            c.copy_from_slice(&x[2 * hidden..]);
        });
}

/// CPU twin of [`painn_split3_backward`].
pub fn painn_split3_backward_host<R: PainnReal>(
    da: &[R],
    db: &[R],
    dc: &[R],
    dx: &mut [R],
    hidden: usize,
) {
    if hidden == 0 {
        return;
    }
    dx.chunks_mut(3 * hidden)
        .zip(da.chunks(hidden))
        .zip(db.chunks(hidden).zip(dc.chunks(hidden)))
        .for_each(|((dx, a), (b, c))| {
            dx[..hidden].copy_from_slice(a);
            dx[hidden..2 * hidden].copy_from_slice(b);
            dx[2 * hidden..].copy_from_slice(c);
        });
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

/// Checks the operands shared by the message ops; returns the sizes.
#[allow(clippy::too_many_arguments)] // the op's operands
fn message_dims(
    op: &str,
    nl: &NeighborList,
    pos: &Tensor<f32>,
    phi: &Tensor<f32>,
    v: &Tensor<f32>,
    w: Option<&Tensor<f32>>,
    b: Option<&Tensor<f32>>,
    basis: RadialBasis,
    h: usize,
) -> Result<Dims> {
    basis.check(op)?;
    ensure!(
        (1..=MAX_HIDDEN).contains(&h),
        "{op}: {h} channels; 1 to {MAX_HIDDEN} are supported"
    );
    // The list keeps rows and edges below 2^31 (the kernels' int indices); offsets into the
    // feature tensors are 64-bit.
    let n = nl.rows();
    expect_len(op, "positions", pos, 3 * n)?;
    expect_len(op, "phi", phi, 3 * n * h)?;
    expect_len(op, "v", v, 3 * n * h)?;
    ensure!(
        phi.shape().last() == Some(&(3 * h)),
        "{op}: phi has shape {:?}, expected [.., {}] (3H)",
        phi.shape(),
        3 * h
    );
    ensure!(
        v.shape().last() == Some(&h) && v.shape().len() >= 2 && v.shape()[v.shape().len() - 2] == 3,
        "{op}: v has shape {:?}, expected [.., 3, {h}]",
        v.shape()
    );
    if let Some(w) = w {
        ensure!(
            w.shape() == [3 * h, basis.size],
            "{op}: the filter weight has shape {:?}, expected [3H, K] = [{}, {}]",
            w.shape(),
            3 * h,
            basis.size
        );
    }
    if let Some(b) = b {
        ensure!(
            b.shape() == [3 * h],
            "{op}: the filter bias has shape {:?}, expected [3H] = [{}]",
            b.shape(),
            3 * h
        );
    }
    Ok(Dims {
        n,
        h,
        e: nl.edges(),
    })
}

/// H from a filter weight `[3H, K]`.
fn hidden_of(op: &str, w: &Tensor<f32>) -> Result<usize> {
    match *w.shape() {
        [rows, _] if rows % 3 == 0 && rows > 0 => Ok(rows / 3),
        _ => bail!(
            "{op}: the filter weight has shape {:?}, expected [3H, K]",
            w.shape()
        ),
    }
}

/// A launch of the row kernels over `n` rows with `per_warp` floats of shared memory per warp
/// after the filter.
fn row_config(op: &str, n: usize, h: usize, size: usize, per_warp: usize) -> Result<LaunchConfig> {
    // The filter and bias, rounded up to 16-byte alignment (`painn_filter_floats`), then the
    // warps' basis buffers.
    let floats = (3 * h * (size + 1)).next_multiple_of(4) + ROW_WARPS * per_warp;
    let bytes = floats * 4;
    ensure!(
        bytes <= MAX_SHARED_BYTES,
        "{op}: H = {h} with K = {size} needs {bytes} B of shared memory, more than the \
         {MAX_SHARED_BYTES} B a block may have"
    );
    Ok(LaunchConfig {
        grid: [n.div_ceil(ROW_WARPS).clamp(1, ROW_MAX_BLOCKS) as u32, 1, 1],
        block: [ROW_THREADS, 1, 1],
        shared_bytes: bytes as u32,
    })
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

/// The PaiNN message of every atom (module docs): for each destination i, the sum over its
/// incoming edges e = (j -> i) of `phi_j * W_e`, split into `ds_i` (scalars) and
/// `dv_i = x_vv * v_j + x_vs * u_e` (vectors). `positions [N, 3]`, `phi [N, 3H]`, `v [N, 3, H]`,
/// `w [3H, K]`, `b [3H]`; ASSIGNS `ds [N, H]` and `dv [N, 3, H]` (0 for atoms without
/// neighbours). Every tensor on the list's device. H at most [`MAX_HIDDEN`].
#[allow(clippy::too_many_arguments)] // the list, five inputs, the basis, two outputs
pub fn painn_message_forward(
    nl: &NeighborList,
    positions: &Tensor<f32>,
    phi: &Tensor<f32>,
    v: &Tensor<f32>,
    w: &Tensor<f32>,
    b: &Tensor<f32>,
    basis: RadialBasis,
    ds: &mut Tensor<f32>,
    dv: &mut Tensor<f32>,
) -> Result<()> {
    let op = "painn_message_forward";
    let dev = same_device(
        op,
        nl.device(),
        &[
            positions.device(),
            phi.device(),
            v.device(),
            w.device(),
            b.device(),
            ds.device(),
            dv.device(),
        ],
    )?;
    let h = hidden_of(op, w)?;
    let d = message_dims(op, nl, positions, phi, v, Some(w), Some(b), basis, h)?;
    expect_len(op, "ds", ds, d.n * d.h)?;
    expect_len(op, "dv", dv, 3 * d.n * d.h)?;
    if d.n == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            painn_message_forward_host(
                GraphView::of(nl).unwrap(),
                positions.host().unwrap(),
                phi.host().unwrap(),
                v.host().unwrap(),
                w.host().unwrap(),
                b.host().unwrap(),
                basis,
                ds.host_mut().unwrap(),
                dv.host_mut().unwrap(),
                d.h,
            );
            Ok(())
        }
        _ => {
            let kernel = row_kernel(
                d.h,
                [
                    &k::PAINN_MESSAGE_FORWARD_H32,
                    &k::PAINN_MESSAGE_FORWARD_H64,
                    &k::PAINN_MESSAGE_FORWARD_H128,
                    &k::PAINN_MESSAGE_FORWARD_H256,
                ],
            );
            let cfg = row_config(op, d.n, d.h, basis.size, basis.size * GROUP)?;
            let args = KernelArgs::new().input(nl.row_ptr()).input(nl.col());
            let args = input_or_null(args, nl.shift())
                .input(positions)
                .input(phi)
                .input(v)
                .input(w)
                .input(b)
                .output(ds)
                .output(dv)
                .i32(d.n as i32)
                .i32(d.h as i32)
                .i32(basis.kind.code())
                .i32(basis.size as i32)
                .f32(basis.cutoff);
            launch(dev, kernel, cfg, args)
        }
    }
}

/// Backward of [`painn_message_forward`] for the activations, from the upstream gradients
/// `dds [N, H]` and `ddv [N, 3, H]`: ASSIGNS `dphi [N, 3H]`, `dv [N, 3, H]` and the per-edge
/// position gradient `dvec [E, 3]` (`dL/d vec_e`, the input of [`painn_position_backward`]),
/// each only when given. A gather over the transposed CSR: each source atom sums over the mirrors
/// of its own row's edges, recomputing the basis and the filter.
#[allow(clippy::too_many_arguments)] // the list, five inputs, the basis, two upstream, three outputs
pub fn painn_message_backward(
    nl: &NeighborList,
    positions: &Tensor<f32>,
    phi: &Tensor<f32>,
    v: &Tensor<f32>,
    w: &Tensor<f32>,
    b: &Tensor<f32>,
    basis: RadialBasis,
    dds: &Tensor<f32>,
    ddv: &Tensor<f32>,
    dphi: Option<&mut Tensor<f32>>,
    dv: Option<&mut Tensor<f32>>,
    dvec: Option<&mut Tensor<f32>>,
) -> Result<()> {
    let op = "painn_message_backward";
    let mut devices = vec![
        positions.device(),
        phi.device(),
        v.device(),
        w.device(),
        b.device(),
        dds.device(),
        ddv.device(),
    ];
    devices.extend(dphi.as_deref().map(|t| t.device()));
    devices.extend(dv.as_deref().map(|t| t.device()));
    devices.extend(dvec.as_deref().map(|t| t.device()));
    let dev = same_device(op, nl.device(), &devices)?;
    let h = hidden_of(op, w)?;
    let d = message_dims(op, nl, positions, phi, v, Some(w), Some(b), basis, h)?;
    expect_len(op, "dds", dds, d.n * d.h)?;
    expect_len(op, "ddv", ddv, 3 * d.n * d.h)?;
    if let Some(t) = dphi.as_deref() {
        expect_len(op, "dphi", t, 3 * d.n * d.h)?;
    }
    if let Some(t) = dv.as_deref() {
        expect_len(op, "dv", t, 3 * d.n * d.h)?;
    }
    if let Some(t) = dvec.as_deref() {
        expect_len(op, "dvec", t, 3 * d.e)?;
    }
    if d.n == 0 || (dphi.is_none() && dv.is_none() && dvec.is_none()) {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            painn_message_backward_host(
                GraphView::of(nl).unwrap(),
                positions.host().unwrap(),
                phi.host().unwrap(),
                v.host().unwrap(),
                w.host().unwrap(),
                b.host().unwrap(),
                basis,
                dds.host().unwrap(),
                ddv.host().unwrap(),
                dphi.map(|t| t.host_mut().unwrap()),
                dv.map(|t| t.host_mut().unwrap()),
                dvec.map(|t| t.host_mut().unwrap()),
                d.h,
            );
            Ok(())
        }
        _ => {
            let kernel = row_kernel(
                d.h,
                [
                    &k::PAINN_MESSAGE_BACKWARD_H32,
                    &k::PAINN_MESSAGE_BACKWARD_H64,
                    &k::PAINN_MESSAGE_BACKWARD_H128,
                    &k::PAINN_MESSAGE_BACKWARD_H256,
                ],
            );
            let cfg = row_config(op, d.n, d.h, basis.size, 2 * basis.size * GROUP)?;
            let args = KernelArgs::new()
                .input(nl.row_ptr())
                .input(nl.col())
                .input(nl.reverse());
            let args = input_or_null(args, nl.shift())
                .input(positions)
                .input(phi)
                .input(v)
                .input(w)
                .input(b)
                .input(dds)
                .input(ddv);
            let args = output_or_null(args, dphi);
            let args = output_or_null(args, dv);
            // A list without edges has an empty dvec: nothing is written, so no pointer is needed.
            let args = match dvec {
                Some(t) if d.e > 0 => args.output(t),
                _ => args.i64(0),
            };
            let args = args
                .i32(d.n as i32)
                .i32(d.h as i32)
                .i32(basis.kind.code())
                .i32(basis.size as i32)
                .f32(basis.cutoff);
            launch(dev, kernel, cfg, args)
        }
    }
}

/// The launch shape of `painn_filter_backward` for E edges: (blocks over edges, edges per
/// block). A function of E only, so the order of the sums is too.
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

/// Floats of scratch (the per-block partial sums) [`painn_filter_backward`] needs for `edges`
/// edges, `hidden` channels and `size` basis functions.
pub fn painn_filter_backward_scratch_len(edges: usize, hidden: usize, size: usize) -> usize {
    filter_blocks(edges).0 * 3 * hidden * (size + 1)
}

/// Backward of [`painn_message_forward`] for the filter parameters: ACCUMULATES (`+=`)
/// `dw [3H, K] += sum_e g_W,e f_e rbf(r_e)^T` and `db [3H] += sum_e g_W,e f_e`, where
/// `g_W,e = g_x,e * phi_j` is the gradient of the edge's filter (either output may be skipped).
/// Deterministic: partial sums per block of a fixed range of edges, added in block order.
/// `scratch` (at least [`painn_filter_backward_scratch_len`] floats, same device, contents
/// ignored) holds the partial sums on cuda and emu; `None` allocates it.
#[allow(clippy::too_many_arguments)] // the list, four inputs, the basis, two upstream, outputs
pub fn painn_filter_backward(
    nl: &NeighborList,
    positions: &Tensor<f32>,
    phi: &Tensor<f32>,
    v: &Tensor<f32>,
    basis: RadialBasis,
    dds: &Tensor<f32>,
    ddv: &Tensor<f32>,
    dw: Option<&mut Tensor<f32>>,
    db: Option<&mut Tensor<f32>>,
    scratch: Option<&mut Tensor<f32>>,
) -> Result<()> {
    let op = "painn_filter_backward";
    let mut devices = vec![positions.device(), phi.device(), v.device(), dds.device()];
    devices.push(ddv.device());
    devices.extend(dw.as_deref().map(|t| t.device()));
    devices.extend(db.as_deref().map(|t| t.device()));
    devices.extend(scratch.as_deref().map(|t| t.device()));
    let dev = same_device(op, nl.device(), &devices)?;
    let h = match (dw.as_deref(), db.as_deref()) {
        (Some(w), _) => hidden_of(op, w)?,
        (None, Some(b)) => b.len() / 3,
        (None, None) => return Ok(()),
    };
    let d = message_dims(
        op,
        nl,
        positions,
        phi,
        v,
        dw.as_deref(),
        db.as_deref(),
        basis,
        h,
    )?;
    expect_len(op, "dds", dds, d.n * d.h)?;
    expect_len(op, "ddv", ddv, 3 * d.n * d.h)?;
    if d.e == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            painn_filter_backward_host(
                GraphView::of(nl).unwrap(),
                positions.host().unwrap(),
                phi.host().unwrap(),
                v.host().unwrap(),
                basis,
                dds.host().unwrap(),
                ddv.host().unwrap(),
                dw.map(|t| t.host_mut().unwrap()),
                db.map(|t| t.host_mut().unwrap()),
                d.h,
            );
            Ok(())
        }
        _ => {
            let (blocks, per_block) = filter_blocks(d.e);
            let entries = 3 * d.h * (basis.size + 1);
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
            let slice = FILTER_THREADS as usize * FILTER_ENTRIES;
            let shared = FILTER_EDGES * (basis.size + 1 + 3 * d.h) * 4;
            launch(
                dev,
                &k::PAINN_FILTER_BACKWARD,
                LaunchConfig {
                    grid: [blocks as u32, entries.div_ceil(slice) as u32, 1],
                    block: [FILTER_THREADS, 1, 1],
                    shared_bytes: shared as u32,
                },
                input_or_null(
                    KernelArgs::new().input(nl.row_ptr()).input(nl.col()),
                    nl.shift(),
                )
                .input(positions)
                .input(phi)
                .input(v)
                .input(dds)
                .input(ddv)
                .output(partial)
                .i32(d.n as i32)
                .i32(d.e as i32)
                .i32(per_block as i32)
                .i32(d.h as i32)
                .i32(basis.kind.code())
                .i32(basis.size as i32)
                .f32(basis.cutoff),
            )?;
            let args = output_or_null(KernelArgs::new().input(partial), dw);
            let args = output_or_null(args, db)
                .i32(blocks as i32)
                .i32(d.h as i32)
                .i32(basis.size as i32);
            launch(
                dev,
                &k::PAINN_FILTER_REDUCE,
                LaunchConfig::for_elements(entries, THREADS),
                args,
            )
        }
    }
}

/// The positions' gradient from the per-edge gradients `dvec [E, 3]` of
/// [`painn_message_backward`]: each atom gets `+dvec` of the edges it is the source of (found
/// through `reverse`) and `-dvec` of those it is the destination of. ASSIGNS `dpos [N, 3]`.
pub fn painn_position_backward(
    nl: &NeighborList,
    dvec: &Tensor<f32>,
    dpos: &mut Tensor<f32>,
) -> Result<()> {
    let op = "painn_position_backward";
    let dev = same_device(op, nl.device(), &[dvec.device(), dpos.device()])?;
    let (n, e) = (nl.rows(), nl.edges());
    expect_len(op, "dvec", dvec, 3 * e)?;
    expect_len(op, "dpos", dpos, 3 * n)?;
    if n == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            painn_position_backward_host(
                GraphView::of(nl).unwrap(),
                dvec.host().unwrap(),
                dpos.host_mut().unwrap(),
            );
            Ok(())
        }
        _ => {
            let args = KernelArgs::new().input(nl.row_ptr()).input(nl.reverse());
            let args = if e > 0 { args.input(dvec) } else { args.i64(0) };
            launch(
                dev,
                &k::PAINN_POSITION_BACKWARD,
                LaunchConfig::for_elements(n, THREADS),
                args.output(dpos).i32(n as i32),
            )
        }
    }
}

/// Rows and H of a split: `x [N, 3H]` into three `[N, H]`.
fn split_dims(op: &str, x: &Tensor<f32>, parts: [&Tensor<f32>; 3]) -> Result<(usize, usize)> {
    let h = *parts[0].shape().last().unwrap_or(&0);
    ensure!(h > 0, "{op}: the parts have shape {:?}", parts[0].shape());
    ensure!(
        x.shape().last() == Some(&(3 * h)),
        "{op}: the whole has shape {:?}, expected [.., {}] for parts of {h} columns",
        x.shape(),
        3 * h
    );
    let n = x.len() / (3 * h);
    for (name, t) in ["first part", "second part", "third part"]
        .iter()
        .zip(parts)
    {
        expect_len(op, name, t, n * h)?;
    }
    ensure!(
        x.len() <= i64::MAX as usize && h <= i32::MAX as usize / 3,
        "{op}: too large"
    );
    Ok((n, h))
}

/// `a`, `b`, `c [N, H]` = the three column blocks of `x [N, 3H]` (assigned).
pub fn painn_split3_forward(
    x: &Tensor<f32>,
    a: &mut Tensor<f32>,
    b: &mut Tensor<f32>,
    c: &mut Tensor<f32>,
) -> Result<()> {
    let op = "painn_split3_forward";
    let dev = same_device(op, x.device(), &[a.device(), b.device(), c.device()])?;
    let (n, h) = split_dims(op, x, [a, b, c])?;
    if n == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            painn_split3_forward_host(
                x.host().unwrap(),
                a.host_mut().unwrap(),
                b.host_mut().unwrap(),
                c.host_mut().unwrap(),
                h,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::PAINN_SPLIT3_FORWARD,
            LaunchConfig::for_elements(3 * n * h, THREADS),
            KernelArgs::new()
                .input(x)
                .output(a)
                .output(b)
                .output(c)
                .i64(n as i64)
                .i32(h as i32),
        ),
    }
}

/// Backward of [`painn_split3_forward`]: `dx = (da | db | dc)` (assigned).
pub fn painn_split3_backward(
    da: &Tensor<f32>,
    db: &Tensor<f32>,
    dc: &Tensor<f32>,
    dx: &mut Tensor<f32>,
) -> Result<()> {
    let op = "painn_split3_backward";
    let dev = same_device(op, da.device(), &[db.device(), dc.device(), dx.device()])?;
    let (n, h) = split_dims(op, dx, [da, db, dc])?;
    if n == 0 {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            painn_split3_backward_host(
                da.host().unwrap(),
                db.host().unwrap(),
                dc.host().unwrap(),
                dx.host_mut().unwrap(),
                h,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::PAINN_SPLIT3_BACKWARD,
            LaunchConfig::for_elements(3 * n * h, THREADS),
            KernelArgs::new()
                .input(da)
                .input(db)
                .input(dc)
                .output(dx)
                .i64(n as i64)
                .i32(h as i32),
        ),
    }
}
