//! Residue graph convolution (SPEC, token merging step b): the C-alpha radius graph and the
//! neighbour aggregation of `s' = W_root s + sum_j W_rel s_j` (and the same, bias-free, for each
//! xyz component of `v`). Kernels: `cuda/graph_conv.cu`.
//!
//! The dense Linears are the caller's ([`crate::ops::gemm::linear_forward`]); this module builds
//! the graph on the host ([`ResidueGraph::build`]), uploads it ([`ResidueGraph::to_device`]), and
//! provides the sparse part: [`graph_aggregate_forward`] / [`graph_aggregate_backward`], and the
//! radial edge features [`edge_rbf_forward`] of the geometry-gated variant (the caller turns them
//! into a per-edge, per-channel gate `[E, H] = rbf @ W_gate^T` with the GEMM).
//!
//! Token features are `s [N, H]` and `v [N, 3, H]` with `N = B * T` (B frames of T residue
//! tokens), row `b * T + t`. The graph is a CSR over destination rows: the edges of row `i` are
//! its neighbours `j` (same frame, `j != i`, `|r_i - r_j| < cutoff`), columns ascending. It is
//! symmetric, and `reverse[e]` is the index of the mirror edge, which lets the backward pass be a
//! gather too: no atomics anywhere, results deterministic.

use super::{expect_len, same_device, Real};
use crate::device::Device;
use crate::kernels::graph_conv as k;
use crate::launch::{launch, KernelArgs, LaunchConfig};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

const THREADS: u32 = 256;

/// Tokens per rayon task of the graph build: enough work per task to hide scheduling.
const BUILD_CHUNK: usize = 256;

/// Components per feature of vector features `v [N, 3, H]` (scalars `s [N, H]` have one).
pub const MAX_CHANNELS: usize = 3;

/// [`Real`] with the cosine the radial basis needs.
pub trait GraphReal: Real {
    /// cos(self).
    fn cos(self) -> Self;
}
impl GraphReal for f32 {
    fn cos(self) -> Self {
        f32::cos(self)
    }
}
impl GraphReal for f64 {
    fn cos(self) -> Self {
        f64::cos(self)
    }
}

// ---------------------------------------------------------------------------------- graph --

/// The residue radius graph of a batch of frames, on the host: a CSR over destination rows `i`
/// (global numbering `b * T + t`).
///
/// Invariants (checked by [`ResidueGraph::validate`], relied on by the kernels): `row_ptr` has
/// `N + 1` entries from 0 to `E`, non-decreasing; within a row the columns are ascending and
/// never the row itself; `col[reverse[e]]` is the row of `e` and `reverse[reverse[e]] == e`.
#[derive(Clone, Debug, PartialEq)]
pub struct ResidueGraph {
    /// Frames B.
    pub frames: usize,
    /// Residue tokens per frame T.
    pub tokens: usize,
    /// The radius the graph was built with, in Angstrom (the radial basis uses the same).
    pub cutoff: f32,
    /// `[N + 1]`: the edges of row `i` are `row_ptr[i]..row_ptr[i + 1]`.
    pub row_ptr: Vec<i32>,
    /// `[E]`: the source token `j` of each edge, in global numbering.
    pub col: Vec<i32>,
    /// `[E]`: the index of the mirror edge `(j -> i)` in row `j`'s list.
    pub reverse: Vec<i32>,
    /// `[E]`: `|r_i - r_j|` in Angstrom.
    pub dist: Vec<f32>,
}

/// The index arrays of a CSR residue graph as host slices: what the CPU twins take.
#[derive(Clone, Copy, Debug)]
pub struct Csr<'a> {
    /// `[N + 1]` row offsets.
    pub row_ptr: &'a [i32],
    /// `[E]` source token of each edge.
    pub col: &'a [i32],
    /// `[E]` index of each edge's mirror.
    pub reverse: &'a [i32],
}

impl Csr<'_> {
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
}

/// Squared distance of two points, in f64 from the f32 coordinates. Both the cell-list build and
/// the brute-force reference use this one function, and it is symmetric in (p, q) bit for bit,
/// so the graphs agree exactly and the graph is exactly symmetric.
fn dist2(p: [f32; 3], q: [f32; 3]) -> f64 {
    let d = [
        p[0] as f64 - q[0] as f64,
        p[1] as f64 - q[1] as f64,
        p[2] as f64 - q[2] as f64,
    ];
    d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
}

/// Token `g`'s position.
fn point(ca: &[f32], g: usize) -> [f32; 3] {
    [ca[3 * g], ca[3 * g + 1], ca[3 * g + 2]]
}

/// Edges of a run of destination rows: per-row counts, then the columns and distances.
#[derive(Default)]
struct RowsEdges {
    counts: Vec<usize>,
    col: Vec<i32>,
    dist: Vec<f32>,
}

impl ResidueGraph {
    /// Builds the radius graph: all pairs `(i, j)`, `i != j`, of the same frame with
    /// `|r_i - r_j| < cutoff`, both directions.
    ///
    /// `ca` is `[B, T, 3]` C-alpha positions in Angstrom; `mask` (`[B, T]`, optional) marks
    /// padding tokens with 0: they get no edges and their coordinates are not read (padding may
    /// hold NaN). A non-finite coordinate of a real token is an error naming the frame and token.
    ///
    /// A cell list per frame (tokens sorted by cell, neighbours found among the 27 adjacent
    /// cells), frames and runs of tokens in parallel: the cost grows with T times the number of
    /// neighbours, not T^2.
    pub fn build(
        ca: &[f32],
        frames: usize,
        tokens: usize,
        mask: Option<&[u8]>,
        cutoff: f32,
    ) -> Result<Self> {
        let op = "ResidueGraph::build";
        check_build_inputs(op, ca, frames, tokens, mask, cutoff)?;
        let c2 = cutoff as f64 * cutoff as f64;
        let parts: Vec<Vec<RowsEdges>> = (0..frames)
            .into_par_iter()
            .map(|b| frame_edges(ca, mask, b, tokens, cutoff, c2))
            .collect();
        Self::assemble(op, frames, tokens, cutoff, parts.into_iter().flatten())
    }

    /// Reference build by testing every pair of every frame (O(B T^2)); for tests.
    pub fn build_brute_force(
        ca: &[f32],
        frames: usize,
        tokens: usize,
        mask: Option<&[u8]>,
        cutoff: f32,
    ) -> Result<Self> {
        let op = "ResidueGraph::build_brute_force";
        check_build_inputs(op, ca, frames, tokens, mask, cutoff)?;
        let c2 = cutoff as f64 * cutoff as f64;
        let valid = |g: usize| mask.is_none_or(|m| m[g] != 0);
        let n = frames * tokens;
        let mut row_ptr = vec![0i32; n + 1];
        let (mut col, mut dist) = (Vec::new(), Vec::new());
        for i in 0..n {
            if valid(i) {
                let b = i / tokens;
                for j in b * tokens..(b + 1) * tokens {
                    if j != i && valid(j) {
                        let d2 = dist2(point(ca, i), point(ca, j));
                        if d2 < c2 {
                            col.push(j as i32);
                            dist.push(d2.sqrt() as f32);
                        }
                    }
                }
            }
            ensure!(
                col.len() <= i32::MAX as usize,
                "{op}: more than 2^31 - 1 edges"
            );
            row_ptr[i + 1] = col.len() as i32;
        }
        // The mirror edge by linear search: independent of the cursor walk in `build`.
        let mut reverse = vec![-1i32; col.len()];
        for i in 0..n {
            for e in row_ptr[i] as usize..row_ptr[i + 1] as usize {
                let j = col[e] as usize;
                if let Some(p) = (row_ptr[j]..row_ptr[j + 1]).find(|&f| col[f as usize] == i as i32)
                {
                    reverse[e] = p;
                }
            }
        }
        let g = Self {
            frames,
            tokens,
            cutoff,
            row_ptr,
            col,
            reverse,
            dist,
        };
        g.validate()?;
        Ok(g)
    }

    fn assemble(
        op: &str,
        frames: usize,
        tokens: usize,
        cutoff: f32,
        parts: impl Iterator<Item = RowsEdges>,
    ) -> Result<Self> {
        let n = frames * tokens;
        let mut row_ptr = Vec::with_capacity(n + 1);
        row_ptr.push(0i32);
        let (mut col, mut dist) = (Vec::new(), Vec::new());
        let mut total = 0usize;
        for p in parts {
            for c in &p.counts {
                total += c;
                ensure!(
                    total <= i32::MAX as usize,
                    "{op}: more than 2^31 - 1 edges (lower the cutoff or split the batch)"
                );
                row_ptr.push(total as i32);
            }
            col.extend_from_slice(&p.col);
            dist.extend_from_slice(&p.dist);
        }
        debug_assert_eq!(row_ptr.len(), n + 1);
        // Mirror edges, frame by frame in parallel.
        let mut reverse = vec![-1i32; col.len()];
        let mut parts = Vec::with_capacity(frames);
        let mut rest = reverse.as_mut_slice();
        for b in 0..frames {
            let len = (row_ptr[(b + 1) * tokens] - row_ptr[b * tokens]) as usize;
            let (part, r) = rest.split_at_mut(len);
            parts.push((b * tokens..(b + 1) * tokens, part));
            rest = r;
        }
        parts
            .into_par_iter()
            .for_each(|(rows, part)| mirror_edges(&row_ptr, &col, rows, part));
        let g = Self {
            frames,
            tokens,
            cutoff,
            row_ptr,
            col,
            reverse,
            dist,
        };
        g.validate()?;
        Ok(g)
    }

    /// Rows N = B * T.
    pub fn rows(&self) -> usize {
        self.row_ptr.len().saturating_sub(1)
    }

    /// Edges E (each neighbour pair counts twice, once per direction).
    pub fn edges(&self) -> usize {
        self.col.len()
    }

    /// The index arrays as slices, for the CPU twins.
    pub fn csr(&self) -> Csr<'_> {
        Csr {
            row_ptr: &self.row_ptr,
            col: &self.col,
            reverse: &self.reverse,
        }
    }

    /// Checks the CSR invariants the kernels rely on (indices in range, sorted rows, a mirror for
    /// every edge). O(N + E); [`ResidueGraph::to_device`] runs it, since the fields are public
    /// and a kernel would read out of bounds on a broken graph.
    pub fn validate(&self) -> Result<()> {
        let op = "ResidueGraph";
        let n = self.frames * self.tokens;
        let e_count = self.col.len();
        ensure!(
            self.row_ptr.len() == n + 1,
            "{op}: row_ptr has {} entries, expected frames * tokens + 1 = {}",
            self.row_ptr.len(),
            n + 1
        );
        ensure!(
            self.reverse.len() == e_count && self.dist.len() == e_count,
            "{op}: col, reverse and dist have {}, {} and {} entries",
            e_count,
            self.reverse.len(),
            self.dist.len()
        );
        ensure!(
            n <= i32::MAX as usize && e_count <= i32::MAX as usize,
            "{op}: {n} rows and {e_count} edges do not fit 32-bit indices"
        );
        ensure!(
            self.row_ptr[0] == 0 && self.row_ptr[n] as usize == e_count,
            "{op}: row_ptr runs from {} to {}, expected 0 to {e_count}",
            self.row_ptr[0],
            self.row_ptr[n]
        );
        let csr = self.csr();
        for i in 0..n {
            let (a, b) = (self.row_ptr[i], self.row_ptr[i + 1]);
            ensure!(a <= b, "{op}: row_ptr decreases at row {i}");
            let frame = i / self.tokens.max(1);
            let frame_rows = (frame * self.tokens) as i32..((frame + 1) * self.tokens) as i32;
            let mut prev = -1i32;
            for e in a as usize..b as usize {
                let j = self.col[e];
                ensure!(
                    frame_rows.contains(&j) && j != i as i32 && j > prev,
                    "{op}: edge {e} of row {i} has column {j} (columns must be ascending, of the \
                     same frame, and not the row itself)"
                );
                prev = j;
                let r = self.reverse[e];
                ensure!(
                    (0..e_count as i32).contains(&r)
                        && csr.row(j as usize).contains(&(r as usize))
                        && self.col[r as usize] == i as i32
                        && self.reverse[r as usize] == e as i32,
                    "{op}: edge {e} ({j} -> {i}) has reverse {r}, which is not its mirror edge"
                );
            }
        }
        Ok(())
    }

    /// Uploads the graph (after [`ResidueGraph::validate`]).
    pub fn to_device(&self, dev: &Device) -> Result<DeviceGraph> {
        self.validate()?;
        let e = self.edges();
        Ok(DeviceGraph {
            rows: self.rows(),
            edges: e,
            cutoff: self.cutoff,
            row_ptr: Tensor::from_slice(dev, &[self.row_ptr.len()], &self.row_ptr)?,
            col: Tensor::from_slice(dev, &[e], &self.col)?,
            reverse: Tensor::from_slice(dev, &[e], &self.reverse)?,
            dist: Tensor::from_slice(dev, &[e], &self.dist)?,
        })
    }
}

/// `reverse` for the edges of `rows` (one frame). Rows are visited in ascending order and every
/// row's columns are ascending, so the mirrors of the edges into row j are met in the order row j
/// lists them: a cursor per row finds each in O(1). An edge without a mirror keeps -1, which
/// [`ResidueGraph::validate`] reports.
fn mirror_edges(row_ptr: &[i32], col: &[i32], rows: std::ops::Range<usize>, reverse: &mut [i32]) {
    let offset = row_ptr[rows.start] as usize;
    let mut cursor: Vec<i32> = row_ptr[rows.clone()].to_vec();
    for i in rows.clone() {
        for e in row_ptr[i] as usize..row_ptr[i + 1] as usize {
            let j = col[e] as usize;
            if !rows.contains(&j) {
                continue;
            }
            let c = &mut cursor[j - rows.start];
            if *c < row_ptr[j + 1] && col[*c as usize] == i as i32 {
                reverse[e - offset] = *c;
                *c += 1;
            }
        }
    }
}

fn check_build_inputs(
    op: &str,
    ca: &[f32],
    frames: usize,
    tokens: usize,
    mask: Option<&[u8]>,
    cutoff: f32,
) -> Result<()> {
    let n = frames
        .checked_mul(tokens)
        .filter(|&n| n <= i32::MAX as usize)
        .ok_or_else(|| {
            anyhow::anyhow!("{op}: {frames} frames of {tokens} tokens do not fit 32-bit indices")
        })?;
    ensure!(
        ca.len() == n * 3,
        "{op}: ca has {} values, expected frames * tokens * 3 = {frames} * {tokens} * 3 = {}",
        ca.len(),
        n * 3
    );
    if let Some(m) = mask {
        ensure!(
            m.len() == n,
            "{op}: mask has {} values, expected frames * tokens = {frames} * {tokens} = {n}",
            m.len()
        );
    }
    ensure!(
        cutoff.is_finite() && cutoff > 0.0,
        "{op}: cutoff must be positive and finite, got {cutoff}"
    );
    // The first offending token in (frame, token) order, so the message is deterministic.
    let bad = (0..n).into_par_iter().find_first(|&g| {
        mask.is_none_or(|m| m[g] != 0) && !ca[3 * g..3 * g + 3].iter().all(|v| v.is_finite())
    });
    if let Some(g) = bad {
        let p = &ca[3 * g..3 * g + 3];
        bail!(
            "{op}: C-alpha coordinate of frame {}, token {} is not finite ({}, {}, {})",
            g / tokens,
            g % tokens,
            p[0],
            p[1],
            p[2]
        );
    }
    Ok(())
}

/// Cell coordinates are clamped to this range: far-out points share boundary cells, which costs
/// time but never an edge (every candidate pair is tested exactly).
const CELL_LIMIT: f64 = (1u64 << 40) as f64;

/// The edges of one frame, as runs of [`BUILD_CHUNK`] rows.
///
/// Cell list: the frame's real tokens sorted by cell (x, then y, then z), so that the cells of
/// one (x, y) column with z in [z - 1, z + 1] are one contiguous run of the sorted tokens, and
/// the 27 neighbouring cells of a cell are 9 runs, found once per occupied cell by binary search.
fn frame_edges(
    ca: &[f32],
    mask: Option<&[u8]>,
    b: usize,
    tokens: usize,
    cutoff: f32,
    c2: f64,
) -> Vec<RowsEdges> {
    let base = b * tokens;
    let valid = |t: usize| mask.is_none_or(|m| m[base + t] != 0);
    let real: Vec<usize> = (0..tokens).filter(|&t| valid(t)).collect();
    let mut lo = [f64::INFINITY; 3];
    for &t in &real {
        for (l, v) in lo.iter_mut().zip(point(ca, base + t)) {
            *l = l.min(v as f64);
        }
    }
    // Cells a hair wider than the cutoff, so that rounding in the division can never put two
    // points closer than the cutoff more than one cell apart.
    let width = cutoff as f64 * (1.0 + 1e-6);
    let mut sorted: Vec<([i64; 3], u32)> = real
        .iter()
        .map(|&t| {
            let p = point(ca, base + t);
            let cell = std::array::from_fn(|a| {
                ((p[a] as f64 - lo[a]) / width)
                    .floor()
                    .clamp(0.0, CELL_LIMIT) as i64
            });
            (cell, t as u32)
        })
        .collect();
    sorted.sort_unstable();
    // Sorted positions and token ids, contiguous for the candidate scans.
    let pos: Vec<[f32; 3]> = sorted
        .iter()
        .map(|&(_, t)| point(ca, base + t as usize))
        .collect();
    let ids: Vec<u32> = sorted.iter().map(|s| s.1).collect();
    // Occupied cells, where each starts in the sorted order, and each token's cell.
    let mut cells: Vec<[i64; 3]> = Vec::new();
    let mut cell_start: Vec<usize> = Vec::new();
    let mut cell_of = vec![u32::MAX; tokens];
    for (k, &(c, t)) in sorted.iter().enumerate() {
        if cells.last() != Some(&c) {
            cells.push(c);
            cell_start.push(k);
        }
        cell_of[t as usize] = (cells.len() - 1) as u32;
    }
    cell_start.push(sorted.len());
    // The 9 runs of sorted tokens in the 27 cells around each occupied cell.
    let runs: Vec<[(usize, usize); 9]> = cells
        .par_iter()
        .map(|c| {
            std::array::from_fn(|r| {
                let (x, y) = (c[0] + r as i64 / 3 - 1, c[1] + r as i64 % 3 - 1);
                let first = cells.partition_point(|k| *k < [x, y, c[2] - 1]);
                let last = first + cells[first..].partition_point(|k| *k < [x, y, c[2] + 2]);
                (cell_start[first], cell_start[last])
            })
        })
        .collect();

    (0..tokens)
        .collect::<Vec<_>>()
        .par_chunks(BUILD_CHUNK)
        .map(|ts| {
            let mut out = RowsEdges::default();
            let mut row: Vec<(i32, f32)> = Vec::new();
            for &t in ts {
                row.clear();
                if valid(t) {
                    let p = point(ca, base + t);
                    for &(start, end) in &runs[cell_of[t] as usize] {
                        for (q, &s) in pos[start..end].iter().zip(&ids[start..end]) {
                            if s as usize != t {
                                let d2 = dist2(p, *q);
                                if d2 < c2 {
                                    row.push(((base + s as usize) as i32, d2.sqrt() as f32));
                                }
                            }
                        }
                    }
                    row.sort_unstable_by_key(|&(j, _)| j);
                }
                out.counts.push(row.len());
                out.col.extend(row.iter().map(|r| r.0));
                out.dist.extend(row.iter().map(|r| r.1));
            }
            out
        })
        .collect()
}

/// The residue graph on a device: what the aggregation kernels read. Made only by
/// [`ResidueGraph::to_device`], so its indices are known to be in range.
#[derive(Debug)]
pub struct DeviceGraph {
    rows: usize,
    edges: usize,
    cutoff: f32,
    row_ptr: Tensor<i32>,
    col: Tensor<i32>,
    reverse: Tensor<i32>,
    dist: Tensor<f32>,
}

impl DeviceGraph {
    /// Rows N.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Edges E.
    pub fn edges(&self) -> usize {
        self.edges
    }
    /// The radius it was built with, in Angstrom.
    pub fn cutoff(&self) -> f32 {
        self.cutoff
    }
    /// `[N + 1]` row offsets.
    pub fn row_ptr(&self) -> &Tensor<i32> {
        &self.row_ptr
    }
    /// `[E]` source token of each edge.
    pub fn col(&self) -> &Tensor<i32> {
        &self.col
    }
    /// `[E]` index of each edge's mirror.
    pub fn reverse(&self) -> &Tensor<i32> {
        &self.reverse
    }
    /// `[E]` edge lengths in Angstrom: the input of [`edge_rbf_forward`].
    pub fn dist(&self) -> &Tensor<f32> {
        &self.dist
    }
    /// The device it lives on.
    pub fn device(&self) -> &Device {
        self.row_ptr.device()
    }
    /// The index arrays as host slices (cpu and emu; `None` on cuda).
    pub fn host_csr(&self) -> Option<Csr<'_>> {
        Some(Csr {
            row_ptr: self.row_ptr.host()?,
            col: self.col.host()?,
            reverse: self.reverse.host()?,
        })
    }
}

// ----------------------------------------------------------------------------- edge RBF --

/// Centre spacing and gamma of a `centres`-term basis on `[0, cutoff]`: spacing = cutoff /
/// (K - 1) (the cutoff itself for K = 1), gamma = 1 / (2 spacing^2).
pub fn rbf_spacing_gamma(cutoff: f64, centres: usize) -> (f64, f64) {
    let spacing = if centres > 1 {
        cutoff / (centres - 1) as f64
    } else {
        cutoff
    };
    (spacing, 1.0 / (2.0 * spacing * spacing))
}

/// CPU twin of [`edge_rbf_forward`].
pub fn edge_rbf_forward_host<R: GraphReal>(dist: &[R], out: &mut [R], cutoff: f64, centres: usize) {
    if centres == 0 {
        return;
    }
    let (spacing, gamma) = rbf_spacing_gamma(cutoff, centres);
    let (c, spacing, gamma) = (R::of(cutoff), R::of(spacing), R::of(gamma));
    let pi = R::of(std::f64::consts::PI);
    out.par_chunks_mut(centres)
        .zip(dist.par_iter())
        .for_each(|(o, &d)| {
            let envelope = if d < c {
                R::of(0.5) * ((pi * (d / c)).cos() + R::of(1.0))
            } else {
                R::of(0.0)
            };
            for (k, o) in o.iter_mut().enumerate() {
                let r = d - R::of(k as f64) * spacing;
                *o = (-(gamma * r * r)).exp() * envelope;
            }
        });
}

/// Radial edge features `out [E, K]`: K Gaussians with centres `k * spacing`, evenly spaced on
/// `[0, cutoff]`, width = spacing (gamma = 1 / (2 spacing^2), see [`rbf_spacing_gamma`]), times
/// the cosine cutoff `0.5 (cos(pi d / cutoff) + 1)` (zero from the cutoff on), so features fade
/// to zero as a neighbour leaves the radius and the gated convolution stays continuous in the
/// positions.
///
/// There is no backward: distances come from the data (C-alpha positions), not from parameters,
/// so no gradient flows into them. The gate's gradient reaches `W_gate` through the GEMM.
pub fn edge_rbf_forward(
    dist: &Tensor<f32>,
    out: &mut Tensor<f32>,
    cutoff: f32,
    centres: usize,
) -> Result<()> {
    let op = "edge_rbf_forward";
    let dev = same_device(op, dist.device(), &[out.device()])?;
    ensure!(
        (1..=i32::MAX as usize).contains(&centres),
        "{op}: the number of centres must be at least 1, got {centres}"
    );
    ensure!(
        cutoff.is_finite() && cutoff > 0.0,
        "{op}: cutoff must be positive and finite, got {cutoff}"
    );
    let e = dist.len();
    expect_len(op, "out", out, e * centres)?;
    match dev {
        Device::Cpu => {
            edge_rbf_forward_host(
                dist.host().unwrap(),
                out.host_mut().unwrap(),
                cutoff as f64,
                centres,
            );
            Ok(())
        }
        _ => {
            let (spacing, gamma) = rbf_spacing_gamma(cutoff as f64, centres);
            launch(
                dev,
                &k::EDGE_RBF_FORWARD,
                LaunchConfig::for_elements(e * centres, THREADS),
                KernelArgs::new()
                    .input(dist)
                    .output(out)
                    .i64(e as i64)
                    .i32(centres as i32)
                    .f32(cutoff)
                    .f32(spacing as f32)
                    .f32(gamma as f32),
            )
        }
    }
}

// ---------------------------------------------------------------------------- aggregate --

/// CPU twin of [`graph_aggregate_forward`]: `x` and `out` are `[N, channels, hidden]`, `gate`
/// `[E, hidden]`.
pub fn graph_aggregate_forward_host<R: Real>(
    g: Csr<'_>,
    x: &[R],
    gate: Option<&[R]>,
    out: &mut [R],
    channels: usize,
    hidden: usize,
) {
    let stride = channels * hidden;
    if stride == 0 {
        return;
    }
    out.par_chunks_mut(stride).enumerate().for_each(|(i, o)| {
        o.fill(R::of(0.0));
        for e in g.row(i) {
            let xj = &x[g.col[e] as usize * stride..][..stride];
            match gate {
                Some(gate) => {
                    let ge = &gate[e * hidden..][..hidden];
                    for (oc, xc) in o.chunks_mut(hidden).zip(xj.chunks(hidden)) {
                        for ((o, &x), &w) in oc.iter_mut().zip(xc).zip(ge) {
                            *o = *o + w * x;
                        }
                    }
                }
                None => {
                    for (o, &x) in o.iter_mut().zip(xj) {
                        *o = *o + x;
                    }
                }
            }
        }
    });
}

/// CPU twin of [`graph_aggregate_backward`].
#[allow(clippy::too_many_arguments)] // graph, x, gate, dout, two gradients and the two sizes
pub fn graph_aggregate_backward_host<R: Real>(
    g: Csr<'_>,
    x: &[R],
    gate: Option<&[R]>,
    dout: &[R],
    dx: Option<&mut [R]>,
    dgate: Option<&mut [R]>,
    channels: usize,
    hidden: usize,
) {
    let stride = channels * hidden;
    if stride == 0 {
        return;
    }
    if let Some(dx) = dx {
        dx.par_chunks_mut(stride).enumerate().for_each(|(j, o)| {
            o.fill(R::of(0.0));
            for e in g.row(j) {
                let dk = &dout[g.col[e] as usize * stride..][..stride];
                match gate {
                    Some(gate) => {
                        let ge = &gate[g.reverse[e] as usize * hidden..][..hidden];
                        for (oc, dc) in o.chunks_mut(hidden).zip(dk.chunks(hidden)) {
                            for ((o, &d), &w) in oc.iter_mut().zip(dc).zip(ge) {
                                *o = *o + w * d;
                            }
                        }
                    }
                    None => {
                        for (o, &d) in o.iter_mut().zip(dk) {
                            *o = *o + d;
                        }
                    }
                }
            }
        });
    }
    if let Some(dgate) = dgate {
        // Split dgate into the rows' runs of edges, so rows run in parallel.
        let mut parts = Vec::with_capacity(g.rows());
        let mut rest = dgate;
        for i in 0..g.rows() {
            let (a, b) = rest.split_at_mut(g.row(i).len() * hidden);
            parts.push((i, a));
            rest = b;
        }
        parts.into_par_iter().for_each(|(i, dg)| {
            let di = &dout[i * stride..][..stride];
            for (e, dge) in g.row(i).zip(dg.chunks_mut(hidden)) {
                let xk = &x[g.col[e] as usize * stride..][..stride];
                for (h, o) in dge.iter_mut().enumerate() {
                    let mut s = R::of(0.0);
                    for c in 0..channels {
                        s = s + di[c * hidden + h] * xk[c * hidden + h];
                    }
                    *o = s;
                }
            }
        });
    }
}

/// Shape checks shared by the aggregation ops: `(channels, hidden)` from `x`'s shape
/// (`[N, H]` is one channel, `[N, C, H]` C channels; the token model's `[B, T, H]` and
/// `[B, T, C, H]` are read with N = B T, told apart from `[N, C, H]` by the graph's row count).
fn aggregate_dims(op: &str, graph: &DeviceGraph, x: &Tensor<f32>) -> Result<(usize, usize)> {
    let (rows, channels, hidden) = match *x.shape() {
        [n, h] => (n, 1, h),
        [b, t, h] if b * t == graph.rows() && b != graph.rows() => (b * t, 1, h),
        [n, c, h] => (n, c, h),
        [b, t, c, h] => (b * t, c, h),
        _ => bail!(
            "{op}: x has shape {:?}, expected [N, H], [N, C, H] or [B, T, C, H]",
            x.shape()
        ),
    };
    ensure!(
        rows == graph.rows(),
        "{op}: x has shape {:?} but the graph has {} rows",
        x.shape(),
        graph.rows()
    );
    ensure!(
        channels == 1 || channels == MAX_CHANNELS,
        "{op}: x has shape {:?}: {channels} components per feature, expected 1 (scalars) or \
         {MAX_CHANNELS} (vectors)",
        x.shape()
    );
    ensure!(
        hidden <= i32::MAX as usize,
        "{op}: x has shape {:?}: feature dimension too large",
        x.shape()
    );
    Ok((channels, hidden))
}

/// The kernels' address of an optional tensor: a null pointer for `None`.
fn address_or_null<T: crate::tensor::Element>(t: Option<&Tensor<T>>) -> i64 {
    t.map_or(0, |t| t.address() as i64)
}

/// Neighbour aggregation: `out[i, c, h] = sum over the edges e of row i of gate[e, h] *
/// x[col[e], c, h]`, with gate = 1 when `None`. `x` and `out` are `[N, H]` (scalars) or
/// `[N, 3, H]` (vectors: the same gate scales all three components, so rotating `x` rotates
/// `out`); `gate` is `[E, H]`. Rows without edges (padding) get 0. Assigns `out`.
///
/// A gather: one thread per (row, feature) walks its row in order, no atomics, deterministic.
pub fn graph_aggregate_forward(
    graph: &DeviceGraph,
    x: &Tensor<f32>,
    gate: Option<&Tensor<f32>>,
    out: &mut Tensor<f32>,
) -> Result<()> {
    let op = "graph_aggregate_forward";
    let mut devices = vec![x.device(), out.device()];
    devices.extend(gate.map(|g| g.device()));
    let dev = same_device(op, graph.device(), &devices)?;
    let (channels, hidden) = aggregate_dims(op, graph, x)?;
    expect_len(op, "out", out, x.len())?;
    if let Some(g) = gate {
        expect_len(op, "gate", g, graph.edges() * hidden)?;
    }
    match dev {
        Device::Cpu => {
            graph_aggregate_forward_host(
                graph.host_csr().unwrap(),
                x.host().unwrap(),
                gate.map(|g| g.host().unwrap()),
                out.host_mut().unwrap(),
                channels,
                hidden,
            );
            Ok(())
        }
        _ => launch(
            dev,
            &k::GRAPH_AGGREGATE_FORWARD,
            LaunchConfig::for_elements(graph.rows() * hidden, THREADS),
            KernelArgs::new()
                .input(graph.row_ptr())
                .input(graph.col())
                .input(x)
                .i64(address_or_null(gate))
                .output(out)
                .i32(graph.rows() as i32)
                .i32(channels as i32)
                .i32(hidden as i32),
        ),
    }
}

/// Backward of [`graph_aggregate_forward`]; each gradient is computed only when asked for, and
/// both are ASSIGNED (activation gradients: the gate is itself computed from the edge features):
///
/// - `dx[j, c, h] = sum over the edges e of row j of gate[reverse[e], h] * dout[col[e], c, h]`:
///   the transposed gather (the mirror edge carries the gate of `j -> i`), no atomics.
/// - `dgate[e, h] = sum_c dout[i, c, h] * x[col[e], c, h]` for the edges e of row i (with
///   `gate = None` this is the gradient at gate = 1).
///
/// Shapes as in the forward; `dout` and `dx` like `x`, `dgate` `[E, H]`.
pub fn graph_aggregate_backward(
    graph: &DeviceGraph,
    x: &Tensor<f32>,
    gate: Option<&Tensor<f32>>,
    dout: &Tensor<f32>,
    mut dx: Option<&mut Tensor<f32>>,
    mut dgate: Option<&mut Tensor<f32>>,
) -> Result<()> {
    let op = "graph_aggregate_backward";
    let mut devices = vec![x.device(), dout.device()];
    devices.extend(gate.map(|g| g.device()));
    devices.extend(dx.as_deref().map(|t| t.device()));
    devices.extend(dgate.as_deref().map(|t| t.device()));
    let dev = same_device(op, graph.device(), &devices)?.clone();
    let (channels, hidden) = aggregate_dims(op, graph, x)?;
    expect_len(op, "dout", dout, x.len())?;
    if let Some(g) = gate {
        expect_len(op, "gate", g, graph.edges() * hidden)?;
    }
    if let Some(t) = dx.as_deref() {
        expect_len(op, "dx", t, x.len())?;
    }
    if let Some(t) = dgate.as_deref() {
        expect_len(op, "dgate", t, graph.edges() * hidden)?;
    }
    if dx.is_none() && dgate.is_none() {
        return Ok(());
    }
    match dev {
        Device::Cpu => {
            graph_aggregate_backward_host(
                graph.host_csr().unwrap(),
                x.host().unwrap(),
                gate.map(|g| g.host().unwrap()),
                dout.host().unwrap(),
                dx.as_deref_mut().map(|t| t.host_mut().unwrap()),
                dgate.as_deref_mut().map(|t| t.host_mut().unwrap()),
                channels,
                hidden,
            );
            Ok(())
        }
        _ => launch(
            &dev,
            &k::GRAPH_AGGREGATE_BACKWARD,
            LaunchConfig::for_elements(graph.rows() * hidden, THREADS),
            KernelArgs::new()
                .input(graph.row_ptr())
                .input(graph.col())
                .input(graph.reverse())
                .input(x)
                .i64(address_or_null(gate))
                .input(dout)
                .i64(address_or_null(dx.as_deref()))
                .i64(address_or_null(dgate.as_deref()))
                .i32(graph.rows() as i32)
                .i32(channels as i32)
                .i32(hidden as i32),
        ),
    }
}
