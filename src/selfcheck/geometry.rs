//! Device checks: graph_conv (`cuda/graph_conv.cu`: the radial edge basis and the residue-graph
//! aggregation, forward and backward, cheap and gated, scalars and vectors) against the f64 twins
//! of `src/ops/graph_conv.rs` with the tolerances of `tests/graph_conv.rs`; and neighbor_list
//! (`cuda/neighbor_list.cu`: every pass of the build, open, orthorhombic and triclinic boxes,
//! batches of frames, padding) compared exactly with the CPU twin and the brute-force reference
//! of `src/ops/neighbor_list.rs`, as `tests/neighbor_list.rs` does.

use super::{compare, Ctx, Tol};
use crate::ops::graph_conv::{self as gc, DeviceGraph, ResidueGraph};
use crate::ops::neighbor_list::{
    neighbor_list_host, neighbor_pairs_reference, HostNeighborList, NeighborList,
};
use crate::testing::Rng;
use crate::traj::UnitCell;
use crate::{Device, Tensor};
use anyhow::Result;

/// Widens f32 values for the f64 twins.
fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// |v| widened: the twins run on these to bound rounding errors.
fn abs64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| (x as f64).abs()).collect()
}

/// An output tensor filled with NaN, so that an element the device never writes fails.
fn output(dev: &Device, shape: &[usize]) -> Result<Tensor<f32>> {
    let mut t = Tensor::zeros(dev, shape)?;
    t.poison()?;
    Ok(t)
}

// ------------------------------------------------------------------------------ graph_conv --

/// The residue graph's radius, as in the tests (and the token model's default).
const GRAPH_CUTOFF: f32 = 8.0;

/// Random C-alpha positions `[frames, tokens, 3]` in a box sized for about 20 neighbours per
/// residue, each frame at a random offset, with about 10% padding whose coordinates are NaN (the
/// build never reads them): the tests' `random_positions` and `random_mask`.
fn residue_graph(rng: &mut Rng, frames: usize, tokens: usize) -> Result<ResidueGraph> {
    let ball = 4.0 / 3.0 * std::f64::consts::PI * (GRAPH_CUTOFF as f64).powi(3);
    let side = (tokens as f64 * ball / 20.0).cbrt();
    let mut ca = Vec::with_capacity(frames * tokens * 3);
    for _ in 0..frames {
        let offset = [0, 1, 2].map(|_| rng.range(-500.0, 500.0));
        for _ in 0..tokens {
            ca.extend(offset.map(|o| (o + rng.range(0.0, side)) as f32));
        }
    }
    let mask: Vec<u8> = (0..frames * tokens)
        .map(|g| {
            let pad = rng.uniform() < 0.1;
            if pad {
                ca[3 * g..3 * g + 3].fill(f32::NAN);
            }
            u8::from(!pad)
        })
        .collect();
    ResidueGraph::build(&ca, frames, tokens, Some(&mask), GRAPH_CUTOFF)
}

/// Absolute tolerance of an f32 sum of `terms` products against f64 (the tests'
/// `sum_tolerance`): `terms` roundings of at most eps times the sum of |products| each, plus the
/// FMA / no-FMA difference, from the largest such sum.
fn sum_tolerance(terms: usize, abs_sums: &[f64]) -> Tol {
    let worst = abs_sums.iter().copied().fold(0.0, f64::max);
    Tol::abs(2.0 * (terms as f64 + 2.0) * f32::EPSILON as f64 * worst + 1e-30)
}

/// `graph_conv`: for residue graphs from one residue to batches of protein-sized frames with
/// padding, the radial basis of the edge lengths, and the aggregation of scalars and vectors,
/// cheap (no gate) and gated, forward and backward (both gradients and each alone, as the tape
/// op asks for them).
pub(super) fn graph_conv(ctx: &mut Ctx) -> Result<()> {
    // (frames, tokens, hidden): one residue, a small ragged batch, protein-sized frames.
    let cases: &[(usize, usize, usize)] = if ctx.quick {
        &[(1, 1, 3), (2, 5, 7), (2, 214, 1), (2, 214, 33)]
    } else {
        &[(1, 1, 3), (2, 5, 7), (2, 214, 1), (4, 300, 128)]
    };
    for &(frames, tokens, hidden) in cases {
        let g = residue_graph(&mut ctx.rng, frames, tokens)?;
        let dg = g.to_device(&ctx.dev)?;
        edge_rbf(ctx, &g)?;
        for channels in [1, 3] {
            for gated in [false, true] {
                aggregate(ctx, &g, &dg, channels, hidden, gated)?;
            }
        }
    }
    Ok(())
}

/// `edge_rbf_forward` of the graph's edge lengths plus the ends of the range (zero, a hair
/// inside, on and beyond the cutoff), for one centre, the model's 16, and a ragged 33.
fn edge_rbf(ctx: &mut Ctx, g: &ResidueGraph) -> Result<()> {
    let c = GRAPH_CUTOFF;
    let mut dist = g.dist.clone();
    dist.extend([0.0, c - 1e-4, c, c + 1.0]);
    let e = dist.len();
    let d = Tensor::from_slice(&ctx.dev, &[e], &dist)?;
    for k in [1, 16, 33] {
        let mut out = output(&ctx.dev, &[e, k])?;
        let ((), secs) = ctx.timed(|_| gc::edge_rbf_forward(&d, &mut out, c, k))?;
        let mut want = vec![0.0; e * k];
        gc::edge_rbf_forward_host(&to64(&dist), &mut want, c as f64, k);
        let name = format!("edge_rbf_forward E={e} K={k}");
        ctx.compare(name, &out.to_vec()?, &want, Tol::new(2e-6, 1e-4), secs);
    }
    Ok(())
}

/// The aggregation over one graph: the forward twice (the second must repeat the first bit for
/// bit: no atomics), then the backward asked for both gradients, for dx alone (the cheap
/// convolution and the gated one's x) and for dgate alone (the gated one's filter); a gradient
/// not asked for must stay unwritten.
fn aggregate(
    ctx: &mut Ctx,
    g: &ResidueGraph,
    dg: &DeviceGraph,
    channels: usize,
    hidden: usize,
    gated: bool,
) -> Result<()> {
    let (n, e, dev) = (g.rows(), g.edges(), ctx.dev.clone());
    let max_degree = g.row_ptr.windows(2).map(|w| (w[1] - w[0]) as usize).max();
    let max_degree = max_degree.unwrap_or(0);
    // The token model's [B, T, (3,) H] layout; [N, (3,) H] for a single frame.
    let mut shape = if g.frames > 1 {
        vec![g.frames, g.tokens]
    } else {
        vec![n]
    };
    shape.extend(if channels == 3 {
        vec![3, hidden]
    } else {
        vec![hidden]
    });
    let tag = |t: &str| {
        format!(
            "graph_aggregate {t} B={} T={} C={channels} H={hidden} {}",
            g.frames,
            g.tokens,
            if gated { "gated" } else { "cheap" }
        )
    };
    let x = ctx.rng.normal_vec(n * channels * hidden, 1.0);
    let dout = ctx.rng.normal_vec(x.len(), 1.0);
    let gate = gated.then(|| ctx.rng.normal_vec(e * hidden, 1.0));
    let xt = Tensor::from_slice(&dev, &shape, &x)?;
    let dt = Tensor::from_slice(&dev, &shape, &dout)?;
    let gt = match &gate {
        Some(gv) => Some(Tensor::from_slice(&dev, &[e, hidden], gv)?),
        None => None,
    };
    let (gate64, gate_abs) = (gate.as_deref().map(to64), gate.as_deref().map(abs64));
    let csr = g.csr();

    // Forward.
    let mut want = vec![0.0; x.len()];
    gc::graph_aggregate_forward_host(
        csr,
        &to64(&x),
        gate64.as_deref(),
        &mut want,
        channels,
        hidden,
    );
    let mut abs_sums = vec![0.0; x.len()];
    gc::graph_aggregate_forward_host(
        csr,
        &abs64(&x),
        gate_abs.as_deref(),
        &mut abs_sums,
        channels,
        hidden,
    );
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut out = output(&dev, &shape)?;
        let ((), secs) =
            ctx.timed(|_| gc::graph_aggregate_forward(dg, &xt, gt.as_ref(), &mut out))?;
        runs.push((out.to_vec()?, secs));
    }
    let tol = sum_tolerance(max_degree, &abs_sums);
    ctx.compare(tag("forward"), &runs[0].0, &want, tol, runs[0].1);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    ctx.exact(
        tag("forward rerun bit-identical"),
        &bits(&runs[1].0),
        &bits(&runs[0].0),
        runs[1].1,
    );

    // Backward: the references, and their sums of |terms| for the tolerances.
    let (mut want_dx, mut want_dg) = (vec![0.0; x.len()], vec![0.0; e * hidden]);
    gc::graph_aggregate_backward_host(
        csr,
        &to64(&x),
        gate64.as_deref(),
        &to64(&dout),
        Some(&mut want_dx),
        Some(&mut want_dg),
        channels,
        hidden,
    );
    let (mut abs_dx, mut abs_dg) = (vec![0.0; x.len()], vec![0.0; e * hidden]);
    gc::graph_aggregate_backward_host(
        csr,
        &abs64(&x),
        gate_abs.as_deref(),
        &abs64(&dout),
        Some(&mut abs_dx),
        Some(&mut abs_dg),
        channels,
        hidden,
    );
    let (tol_dx, tol_dg) = (
        sum_tolerance(max_degree, &abs_dx),
        sum_tolerance(channels, &abs_dg),
    );
    for (want_x, want_g) in [(true, true), (true, false), (false, true)] {
        let mut dx = output(&dev, &shape)?;
        let mut dgate = output(&dev, &[e, hidden])?;
        let ((), secs) = ctx.timed(|_| {
            gc::graph_aggregate_backward(
                dg,
                &xt,
                gt.as_ref(),
                &dt,
                want_x.then_some(&mut dx),
                want_g.then_some(&mut dgate),
            )
        })?;
        let (dx, dgate) = (dx.to_vec()?, dgate.to_vec()?);
        let unwritten = |v: &[f32]| v.iter().all(|x| x.is_nan());
        let alone = if want_x && want_g { "" } else { " alone" };
        if want_x {
            let mut o = compare(tag(&format!("dx{alone}")), &to64(&dx), &want_dx, tol_dx);
            untouched(&mut o, want_g || unwritten(&dgate), "dgate");
            o.seconds = secs;
            ctx.push(o);
        }
        if want_g {
            let mut o = compare(
                tag(&format!("dgate{alone}")),
                &to64(&dgate),
                &want_dg,
                tol_dg,
            );
            untouched(&mut o, want_x || unwritten(&dx), "dx");
            o.seconds = secs;
            ctx.push(o);
        }
    }
    Ok(())
}

/// Fails `o` when a gradient that was not asked for was written.
fn untouched(o: &mut super::Outcome, ok: bool, what: &str) {
    if !ok {
        o.ok = false;
        o.worst_ratio = f64::INFINITY;
        o.detail = format!("{what} was not asked for but was written");
    }
}

// --------------------------------------------------------------------------- neighbor_list --

/// `atoms` protein-like positions at `density` atoms / A^3 in a ball around `offset`: most atoms
/// bonded (1.2-1.6 A) to the previous one, the rest anywhere in the ball (the tests'
/// `protein_like`).
fn protein_like(rng: &mut Rng, atoms: usize, density: f64, offset: [f64; 3]) -> Vec<f32> {
    let radius = (atoms as f64 / density * 3.0 / (4.0 * std::f64::consts::PI)).cbrt();
    let inside = |p: &[f64; 3]| p.iter().map(|x| x * x).sum::<f64>() <= radius * radius;
    let in_ball = |rng: &mut Rng| loop {
        let p = [0, 1, 2].map(|_| rng.range(-radius, radius));
        if inside(&p) {
            return p;
        }
    };
    let mut out = Vec::with_capacity(3 * atoms);
    let mut prev = in_ball(rng);
    for a in 0..atoms {
        let p = if a > 0 && rng.uniform() < 0.7 {
            let mut tries = 0;
            loop {
                let d = [0, 1, 2].map(|_| rng.normal());
                let len = d.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-9);
                let bond = rng.range(1.2, 1.6);
                let q = [0, 1, 2].map(|k| prev[k] + d[k] / len * bond);
                tries += 1;
                if inside(&q) || tries > 20 {
                    break q;
                }
            }
        } else {
            in_ball(rng)
        };
        prev = p;
        out.extend((0..3).map(|k| (p[k] + offset[k]) as f32));
    }
    out
}

/// Frames of protein-like atoms, each at a random offset (negative coordinates included).
fn open_frames(rng: &mut Rng, frames: usize, atoms: usize, density: f64) -> Vec<f32> {
    (0..frames)
        .flat_map(|_| {
            let offset = [0, 1, 2].map(|_| rng.range(-300.0, 300.0));
            protein_like(rng, atoms, density, offset)
        })
        .collect()
}

/// A box's rows in f64.
fn rows64(cell: &UnitCell) -> [[f64; 3]; 3] {
    cell.vectors.map(|r| r.map(|x| x as f64))
}

fn cross(p: [f64; 3], q: [f64; 3]) -> [f64; 3] {
    [
        p[1] * q[2] - p[2] * q[1],
        p[2] * q[0] - p[0] * q[2],
        p[0] * q[1] - p[1] * q[0],
    ]
}

fn dot3(p: [f64; 3], q: [f64; 3]) -> f64 {
    p[0] * q[0] + p[1] * q[1] + p[2] * q[2]
}

/// The volume and the perpendicular widths (distances between opposite faces) of a box.
fn volume_widths(cell: &UnitCell) -> (f64, [f64; 3]) {
    let [a, b, c] = rows64(cell);
    let det = dot3(a, cross(b, c)).abs();
    let widths = [cross(b, c), cross(c, a), cross(a, b)].map(|n| det / dot3(n, n).sqrt());
    (det, widths)
}

/// The inverse of a box (rows a, b, c): fractional coordinates s = x inv.
fn box_inverse(cell: &UnitCell) -> [[f64; 3]; 3] {
    let [a, b, c] = rows64(cell);
    let det = dot3(a, cross(b, c));
    // The columns of the inverse are the reciprocal vectors.
    let r = [cross(b, c), cross(c, a), cross(a, b)];
    std::array::from_fn(|m| std::array::from_fn(|k| r[k][m] / det))
}

/// A random orthorhombic or skewed triclinic box (angles far from 90 degrees) holding `atoms` at
/// about `density`, scaled up until its smallest width is at least `min_width` (the tests'
/// `make_box`).
fn make_box(
    rng: &mut Rng,
    triclinic: bool,
    atoms: usize,
    density: f64,
    min_width: f64,
) -> UnitCell {
    let (ratios, angles) = if triclinic {
        (
            [1.0, rng.range(0.9, 1.1), rng.range(0.9, 1.1)],
            [
                rng.range(60.0, 80.0),
                rng.range(100.0, 115.0),
                rng.range(60.0, 75.0),
            ],
        )
    } else {
        ([1.0, rng.range(0.8, 1.25), rng.range(0.8, 1.25)], [90.0; 3])
    };
    let scaled = |s: f64| {
        UnitCell::from_lengths_angles(
            ratios[0] * s,
            ratios[1] * s,
            ratios[2] * s,
            angles[0],
            angles[1],
            angles[2],
        )
    };
    let (volume, widths) = volume_widths(&scaled(1.0));
    let w_min = widths.iter().copied().fold(f64::INFINITY, f64::min);
    scaled(
        (atoms as f64 / density / volume)
            .cbrt()
            .max(min_width / w_min),
    )
}

/// Atoms uniform in the box, a third of them moved out by random lattice vectors (a few by
/// hundreds of box lengths), so that the build must wrap them (the tests' `periodic_frame`).
fn periodic_frame(rng: &mut Rng, cell: &UnitCell, atoms: usize) -> Vec<f32> {
    let v = rows64(cell);
    let mut out = Vec::with_capacity(3 * atoms);
    for _ in 0..atoms {
        let mut s = [0, 1, 2].map(|_| rng.uniform());
        if rng.uniform() < 0.33 {
            let reach = if rng.uniform() < 0.05 { 300 } else { 3 };
            for x in &mut s {
                *x += rng.below(2 * reach + 1) as f64 - reach as f64;
            }
        }
        out.extend((0..3).map(|k| (s[0] * v[0][k] + s[1] * v[1][k] + s[2] * v[2][k]) as f32));
    }
    out
}

/// Per-frame boxes of one shape, the smallest allowed (just over twice the cutoff) for small
/// frames, and atoms in them.
fn periodic_frames(
    rng: &mut Rng,
    triclinic: bool,
    frames: usize,
    atoms: usize,
    cutoff: f32,
) -> (Vec<f32>, Vec<UnitCell>) {
    let density = rng.range(0.05, 0.1);
    let cells: Vec<UnitCell> = (0..frames)
        .map(|_| make_box(rng, triclinic, atoms, density, 2.05 * cutoff as f64))
        .collect();
    let pos = cells
        .iter()
        .flat_map(|c| periodic_frame(rng, c, atoms))
        .collect();
    (pos, cells)
}

/// Dense clusters (about 1 atom / A^3) far apart, a tenth of the atoms exact copies of earlier
/// ones (zero-length edges).
fn clusters(rng: &mut Rng, frames: usize, atoms: usize) -> Vec<f32> {
    let mut pos = Vec::with_capacity(3 * frames * atoms);
    for _ in 0..frames {
        let centres: Vec<[f64; 3]> = (0..8)
            .map(|_| [0, 1, 2].map(|_| rng.range(-2000.0, 2000.0)))
            .collect();
        let start = pos.len();
        for a in 0..atoms {
            if a > 0 && rng.uniform() < 0.1 {
                let src = start + 3 * rng.below(a);
                pos.extend_from_within(src..src + 3);
            } else {
                let c = centres[rng.below(centres.len())];
                pos.extend((0..3).map(|k| (c[k] + rng.normal() * 4.0) as f32));
            }
        }
    }
    pos
}

/// One neighbour-list build to check.
struct NlCase<'a> {
    what: String,
    pos: &'a [f32],
    frames: usize,
    atoms: usize,
    cutoff: f32,
    cells: Option<&'a [UnitCell]>,
    mask: Option<&'a [u8]>,
}

impl NlCase<'_> {
    /// Builds on the device and checks, as the tests' `Case::check`: the CSR (row offsets,
    /// columns, mirrors, shifts) identical to the CPU twin's, the pairs identical to the
    /// brute-force reference, and the invariants and geometry of every edge. Returns the list.
    fn check(&self, ctx: &mut Ctx) -> Result<HostNeighborList> {
        let (f, a) = (self.frames, self.atoms);
        let tag = |t: &str| format!("neighbor_list {} {t}", self.what);
        let positions = Tensor::from_slice(&ctx.dev, &[f, a, 3], self.pos)?;
        let mask = match self.mask {
            Some(m) => Some(Tensor::from_slice(&ctx.dev, &[f, a], m)?),
            None => None,
        };
        let (nl, secs) =
            ctx.timed(|_| NeighborList::build(&positions, self.cutoff, self.cells, mask.as_ref()))?;
        let got = nl.to_host()?;
        let twin = neighbor_list_host(self.pos, f, a, self.cutoff, self.cells, self.mask)?;
        let e = twin.edges();
        ctx.exact(
            tag(&format!("row_ptr = twin (E={e})")),
            &got.row_ptr,
            &twin.row_ptr,
            secs,
        );
        ctx.exact(tag("col = twin"), &got.col, &twin.col, secs);
        ctx.exact(tag("reverse = twin"), &got.reverse, &twin.reverse, secs);
        let shift_bits = |l: &HostNeighborList| {
            l.shift
                .as_ref()
                .map(|s| s.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
        };
        if self.cells.is_some() || got.shift.is_some() {
            ctx.exact(
                tag("shift = twin"),
                &[shift_bits(&got)],
                &[shift_bits(&twin)],
                secs,
            );
        }
        let want = neighbor_pairs_reference(self.pos, f, a, self.cutoff, self.cells, self.mask)?;
        ctx.exact(tag("pairs = brute force"), &got.pairs(), &want, secs);
        let bad = got
            .validate()
            .err()
            .map(|e| format!("{e:#}"))
            .or_else(|| self.bad_edge(&got));
        let ok = bad.is_none() && nl.edges() == got.edges() && nl.rows() == f * a;
        ctx.truth(
            tag("invariants and edge geometry"),
            ok,
            bad.unwrap_or_default(),
        );
        Ok(got)
    }

    /// The first edge that touches padding, is not shorter than the cutoff (f64, with room for
    /// the f32 rounding of the shift), or whose shift is not a lattice vector.
    fn bad_edge(&self, g: &HostNeighborList) -> Option<String> {
        let c = self.cutoff as f64;
        for i in 0..g.rows() {
            let inv = self
                .cells
                .map(|cs| box_inverse(&cs[if cs.len() == 1 { 0 } else { i / g.atoms }]));
            for e in g.row_ptr[i] as usize..g.row_ptr[i + 1] as usize {
                let j = g.col[e] as usize;
                if self.mask.is_some_and(|m| m[i] == 0 || m[j] == 0) {
                    return Some(format!("edge {e} ({j} -> {i}) touches padding"));
                }
                let s: [f64; 3] = match &g.shift {
                    Some(s) => [0, 1, 2].map(|k| s[3 * e + k] as f64),
                    None => [0.0; 3],
                };
                let d = [0, 1, 2]
                    .map(|k| self.pos[3 * j + k] as f64 + s[k] - self.pos[3 * i + k] as f64);
                let d = dot3(d, d).sqrt();
                let slack = 1e-6 * s.iter().map(|x| x.abs()).sum::<f64>();
                if d >= c + slack {
                    return Some(format!("edge {e} ({j} -> {i}) has length {d}, cutoff {c}"));
                }
                if let Some(inv) = inv {
                    // The shift's fractional coordinates must be integers.
                    let m = [0, 1, 2].map(|k| (0..3).map(|r| s[r] * inv[r][k]).sum::<f64>());
                    if m.iter()
                        .any(|m| (m - m.round()).abs() >= 1e-3 + 1e-6 * m.abs())
                    {
                        return Some(format!("edge {e}: shift {s:?} is not a lattice vector"));
                    }
                }
            }
        }
        None
    }
}

/// `neighbor_list`: builds on the device, each compared exactly with the CPU twin and the
/// brute-force reference: open frames (single atoms, ragged sizes, batches of many small frames,
/// protein-sized ones, cutoffs 3-10 A), orthorhombic and triclinic boxes per frame and one box
/// for all frames, boxes of two to four cells per axis and one capped to a cell per axis, a
/// sparse open frame whose grid is capped, dense clusters with coincident atoms and padding,
/// an all-padding batch; and the errors the device reports for a non-finite coordinate and an
/// atom too far outside its box.
pub(super) fn neighbor_list(ctx: &mut Ctx) -> Result<()> {
    let quick = ctx.quick;
    // Open boundaries: (frames, atoms, cutoff). More than 2048 cells or rows make several scan
    // tiles.
    let open: &[(usize, usize, f32)] = if quick {
        &[
            (1, 1, 5.0),
            (1, 2, 3.0),
            (3, 17, 7.5),
            (64, 40, 10.0),
            (16, 300, 5.0),
            (1, 2500, 3.0),
        ]
    } else {
        &[
            (1, 1, 5.0),
            (1, 2, 3.0),
            (3, 17, 7.5),
            (64, 40, 5.0),
            (16, 300, 10.0),
            (2, 2500, 5.0),
            (1, 10_000, 5.0),
        ]
    };
    for &(frames, atoms, cutoff) in open {
        let density = ctx.rng.range(0.05, 0.1);
        let pos = open_frames(&mut ctx.rng, frames, atoms, density);
        NlCase {
            what: format!("open F={frames} A={atoms} cutoff={cutoff}"),
            pos: &pos,
            frames,
            atoms,
            cutoff,
            cells: None,
            mask: None,
        }
        .check(ctx)?;
    }

    // Boxes, one per frame: (frames, atoms, cutoff), each shape.
    let boxed: &[(usize, usize, f32)] = if quick {
        &[(1, 1, 3.0), (4, 60, 5.0), (8, 200, 3.0)]
    } else {
        &[
            (1, 1, 3.0),
            (4, 60, 10.0),
            (64, 30, 5.0),
            (8, 700, 5.0),
            (2, 4000, 3.0),
            (1, 10_000, 5.0),
        ]
    };
    for triclinic in [false, true] {
        for &(frames, atoms, cutoff) in boxed {
            let (pos, cells) = periodic_frames(&mut ctx.rng, triclinic, frames, atoms, cutoff);
            let shape = if triclinic {
                "triclinic"
            } else {
                "orthorhombic"
            };
            NlCase {
                what: format!("{shape} F={frames} A={atoms} cutoff={cutoff}"),
                pos: &pos,
                frames,
                atoms,
                cutoff,
                cells: Some(&cells),
                mask: None,
            }
            .check(ctx)?;
        }
    }

    // One box for all frames: widths just over 2, 3 and 4 cutoffs (2-4 cells per axis, every
    // image reached through wrapped neighbour cells), and few atoms in a large box (the cell cap
    // leaves one cell per axis).
    let cutoff = 5.0f32;
    let boxes = [
        ([10.2, 10.5, 15.5, 90.0, 90.0, 90.0], 200),
        ([12.0, 12.0, 12.0, 70.0, 110.0, 80.0], 150),
        ([21.0, 16.0, 18.0, 80.0, 100.0, 75.0], 300),
        ([60.0, 70.0, 80.0, 65.0, 105.0, 70.0], 12),
    ];
    for (la, atoms) in boxes {
        let cell = UnitCell::from_lengths_angles(la[0], la[1], la[2], la[3], la[4], la[5]);
        // Grow a box that its angles shrank below the limit.
        let w_min = volume_widths(&cell)
            .1
            .into_iter()
            .fold(f64::INFINITY, f64::min);
        let s = (2.0 * cutoff as f64 * 1.01 / w_min).max(1.0);
        let cell =
            UnitCell::from_lengths_angles(la[0] * s, la[1] * s, la[2] * s, la[3], la[4], la[5]);
        let frames = 3;
        let pos: Vec<f32> = (0..frames)
            .flat_map(|_| periodic_frame(&mut ctx.rng, &cell, atoms))
            .collect();
        let [a, b, c, al, be, ga] = cell.lengths_angles();
        NlCase {
            what: format!(
                "shared box {a:.1}x{b:.1}x{c:.1} ({al:.0},{be:.0},{ga:.0}) F={frames} A={atoms}"
            ),
            pos: &pos,
            frames,
            atoms,
            cutoff,
            cells: Some(std::slice::from_ref(&cell)),
            mask: None,
        }
        .check(ctx)?;
    }

    // Atoms spread over 10^4 A without a box: the grid is capped and its cells grow. Every
    // fourth atom sits within a few A of an earlier one, so that there are edges to find.
    let atoms = 400;
    let mut pos: Vec<f32> = Vec::with_capacity(3 * atoms);
    for a in 0..atoms {
        if a % 4 == 3 {
            let src = 3 * ctx.rng.below(a);
            let near: Vec<f32> = (0..3)
                .map(|k| pos[src + k] + ctx.rng.range(-5.0, 5.0) as f32)
                .collect();
            pos.extend(near);
        } else {
            pos.extend((0..3).map(|_| ctx.rng.range(-5e3, 5e3) as f32));
        }
    }
    NlCase {
        what: format!("sparse open A={atoms} cutoff=10"),
        pos: &pos,
        frames: 1,
        atoms,
        cutoff: 10.0,
        cells: None,
        mask: None,
    }
    .check(ctx)?;

    // Clusters with coincident atoms, with and without padding and a box.
    let (frames, atoms) = (3, if quick { 400 } else { 2000 });
    let big = UnitCell::from_lengths_angles(900.0, 700.0, 800.0, 75.0, 100.0, 70.0);
    for masked in [false, true] {
        for periodic in [false, true] {
            let mut pos = clusters(&mut ctx.rng, frames, atoms);
            let mask = masked.then(|| {
                (0..frames * atoms)
                    .map(|g| {
                        let pad = ctx.rng.uniform() < 0.1;
                        if pad {
                            pos[3 * g..3 * g + 3].fill(f32::NAN);
                        }
                        u8::from(!pad)
                    })
                    .collect::<Vec<u8>>()
            });
            let case = NlCase {
                what: format!("clusters F={frames} A={atoms} masked={masked} periodic={periodic}"),
                pos: &pos,
                frames,
                atoms,
                cutoff: 5.0,
                cells: periodic.then_some(std::slice::from_ref(&big)),
                mask: mask.as_deref(),
            };
            let g = case.check(ctx)?;
            // Coincident atoms are edges (distance 0) with a zero shift.
            let zero = (0..g.rows()).any(|i| {
                (g.row_ptr[i] as usize..g.row_ptr[i + 1] as usize).any(|e| {
                    let j = g.col[e] as usize;
                    pos[3 * i..3 * i + 3] == pos[3 * j..3 * j + 3]
                        && g.shift
                            .as_ref()
                            .is_none_or(|s| s[3 * e..3 * e + 3] == [0.0; 3])
                })
            });
            let what = format!("neighbor_list {} zero-length edges kept", case.what);
            ctx.truth(what, zero, "no edge between coincident atoms");
        }
    }

    // Every atom padding (NaN coordinates, never read): no edges.
    let pos = vec![f32::NAN; 2 * 7 * 3];
    NlCase {
        what: "all padding F=2 A=7".into(),
        pos: &pos,
        frames: 2,
        atoms: 7,
        cutoff: 5.0,
        cells: None,
        mask: Some(&[0; 14]),
    }
    .check(ctx)?;

    errors(ctx)
}

/// The errors the device build finds in its cell-assignment pass (the status it reads back):
/// the first non-finite coordinate of a real atom, and an atom more than 2^20 box lengths
/// outside its box, each naming the frame and atom as the CPU twin does.
fn errors(ctx: &mut Ctx) -> Result<()> {
    let mut pos: Vec<f32> = (0..2 * 5).flat_map(|g| [g as f32, 0.0, 0.0]).collect();
    let ok = UnitCell::from_lengths_angles(30.0, 30.0, 30.0, 90.0, 90.0, 90.0);
    let mut nan = pos.clone();
    nan[3 * (5 + 3) + 1] = f32::NAN;
    nan[3 * (5 + 4)] = f32::INFINITY;
    pos[3 * 7 + 2] = 4e7;
    let cases = [
        (
            "non-finite coordinate",
            nan,
            None,
            "frame 1, atom 3 has a non-finite coordinate",
        ),
        ("far outside the box", pos, Some(ok), "frame 1, atom 2 at ("),
    ];
    for (what, p, cell, needle) in cases {
        let cells = cell.as_ref().map(std::slice::from_ref);
        let t = Tensor::from_slice(&ctx.dev, &[2, 5, 3], &p)?;
        let (r, _) = ctx.timed(|_| Ok(NeighborList::build(&t, 2.0, cells, None).map(|_| ())))?;
        let twin = neighbor_list_host(&p, 2, 5, 2.0, cells, None).map(|_| ());
        let msg = |r: &Result<()>| {
            r.as_ref()
                .err()
                .map(|e| format!("{e:#}"))
                .unwrap_or_default()
        };
        let ok = msg(&r).contains(needle) && msg(&twin).contains(needle);
        let detail = format!(
            "device: {:?}, twin: {:?}, expected {needle:?}",
            msg(&r),
            msg(&twin)
        );
        ctx.truth(format!("neighbor_list error: {what}"), ok, detail);
    }
    Ok(())
}
