//! Device checks: painn (`cuda/painn.cu`) and torchmd_et (`cuda/torchmd_et.cu`), the atom stage.
//!
//! Each family runs its module's ops on the ragged radius graphs of `tests/painn.rs` and
//! `tests/torchmd_et.rs` (built by `NeighborList::build` on the device: open, orthorhombic and
//! triclinic boxes, several frames, a coincident pair at r = 0, isolated atoms, channel counts
//! that leave lanes idle for each of the H 32/64/128/256 kernels, bases wider than a warp, and a
//! graph with more rows than the row kernels have warps), outputs poisoned, against the f64
//! twins with the tests' tolerances: `close(tol)` there is an absolute `tol` times the
//! reference's largest magnitude (at least 1) plus a relative `tol` (3e-5 for the messages and
//! the activation gradients, 1e-4 for the per-edge and position gradients and the filter
//! gradients accumulated onto random values, 2e-5 for the radial basis and the layer norm's
//! output). Outputs skipped one by one must give the same bits. Then the whole backbone: its
//! gradient (every parameter tensor and the positions) against directional finite differences
//! on the device with the tests' tolerance, two fresh runs bit-identical, and off cpu the
//! forward and every gradient against the cpu path.

use super::{Ctx, Tol};
use crate::nn::painn::{Backbone, BackboneConfig, ELEMENTS};
use crate::ops::neighbor_list::{HostNeighborList, NeighborList};
use crate::ops::painn::{self as pn, GraphView, RadialBasis, RbfKind};
use crate::ops::scatter::{DeviceEmbeddingIndex, EmbeddingIndex};
use crate::ops::torchmd_et::{self as et, EtFilterGradSlices, EtFilterGrads, EtGradSlices};
use crate::ops::torchmd_et::{EtGrads, EtSlices, EtTensors};
use crate::tape::Tape;
use crate::testing::Rng;
use crate::traj::UnitCell;
use crate::{Device, Tensor};
use anyhow::{anyhow, Result};
use std::sync::Arc;

// ---------------------------------------------------------------------------------- helpers --

/// Widens f32 values for the f64 twins.
fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// The tests' `close(tol)`: f32 sums of O(1) terms against f64, so an absolute `tol` times the
/// reference's largest magnitude (at least 1), plus a relative `tol`.
fn scaled(want: &[f64], tol: f64) -> Tol {
    let scale = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
    Tol::new(tol * scale, tol)
}

/// An f32 tensor holding `data`.
fn input(dev: &Device, shape: &[usize], data: &[f32]) -> Result<Tensor<f32>> {
    Tensor::from_slice(dev, shape, data)
}

/// An output tensor filled with NaN, so that an element the device never writes fails.
fn poisoned(dev: &Device, shape: &[usize]) -> Result<Tensor<f32>> {
    let mut t = Tensor::zeros(dev, shape)?;
    t.poison()?;
    Ok(t)
}

/// Bit patterns, for bit-identity checks (NaN equals itself).
fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// `init + add` in f64: the reference of a gradient accumulated onto `init`.
fn plus(init: &[f32], add: &[f64]) -> Vec<f64> {
    init.iter().zip(add).map(|(&a, &b)| a as f64 + b).collect()
}

/// Records each `(what, got, want, tol)` as `"{name}: {what}"` under the tests' `close(tol)`.
fn close(
    ctx: &mut Ctx,
    name: &str,
    secs: f64,
    checks: &[(&str, &Tensor<f32>, &[f64], f64)],
) -> Result<()> {
    for &(what, got, want, tol) in checks {
        ctx.compare(
            format!("{name}: {what}"),
            &got.to_vec()?,
            want,
            scaled(want, tol),
            secs,
        );
    }
    Ok(())
}

/// Records that two tensors hold the same bits (an output computed alone and with the others).
fn same_bits(ctx: &mut Ctx, name: String, got: &Tensor<f32>, want: &Tensor<f32>) -> Result<()> {
    ctx.exact(name, &bits(&got.to_vec()?), &bits(&want.to_vec()?), 0.0);
    Ok(())
}

// --------------------------------------------------------------------------------- fixtures --

/// `atoms` protein-like positions: most atoms bonded (1.3-1.6 A) to the previous one, the rest
/// anywhere in a ball of 0.03 atoms / A^3, shifted by `offset` (the tests' fixture).
fn protein_like(rng: &mut Rng, atoms: usize, offset: [f64; 3]) -> Vec<[f64; 3]> {
    let radius = (atoms as f64 / 0.03 * 3.0 / (4.0 * std::f64::consts::PI)).cbrt();
    let in_ball = |rng: &mut Rng| loop {
        let p = [0, 1, 2].map(|_| rng.range(-radius, radius));
        if p.iter().map(|x| x * x).sum::<f64>() <= radius * radius {
            return p;
        }
    };
    let mut out = Vec::with_capacity(atoms);
    let mut prev = in_ball(rng);
    for a in 0..atoms {
        let p = if a > 0 && rng.uniform() < 0.7 {
            let d = [rng.normal(), rng.normal(), rng.normal()];
            let len = (d.iter().map(|x| x * x).sum::<f64>()).sqrt().max(1e-9);
            let bond = rng.range(1.3, 1.6);
            [0, 1, 2].map(|k| prev[k] + d[k] / len * bond)
        } else {
            in_ball(rng)
        };
        prev = p;
        out.push([0, 1, 2].map(|k| p[k] + offset[k]));
    }
    out
}

/// Which box a case has.
#[derive(Clone, Copy, Debug)]
enum Cell {
    Open,
    Ortho,
    Triclinic,
}

impl Cell {
    fn cell(self) -> Option<UnitCell> {
        match self {
            Cell::Open => None,
            Cell::Ortho => Some(UnitCell::from_lengths_angles(
                11.0, 12.0, 13.0, 90.0, 90.0, 90.0,
            )),
            Cell::Triclinic => Some(UnitCell::from_lengths_angles(
                12.0, 12.5, 13.0, 80.0, 95.0, 100.0,
            )),
        }
    }
}

/// One test graph and the message sizes on it.
#[derive(Clone, Copy, Debug)]
struct Case {
    frames: usize,
    atoms: usize,
    hidden: usize,
    /// Attention heads (torchmd_et only).
    heads: usize,
    basis: RadialBasis,
    cell: Cell,
    /// Atom 1 of every frame sits exactly on atom 0 (r = 0 in both directions).
    coincident: bool,
    /// The last atom of every frame is far from the others (open boundaries only).
    isolated: bool,
}

/// A case: frames, atoms, H, heads, the basis, the box, coincident, isolated.
#[allow(clippy::too_many_arguments)] // the fields of a case, as the tests list them
fn case(
    frames: usize,
    atoms: usize,
    hidden: usize,
    heads: usize,
    (kind, size, cutoff): (RbfKind, usize, f32),
    cell: Cell,
    coincident: bool,
    isolated: bool,
) -> Result<Case> {
    Ok(Case {
        frames,
        atoms,
        hidden,
        heads,
        basis: RadialBasis::new(kind, size, cutoff)?,
        cell,
        coincident,
        isolated,
    })
}

impl Case {
    fn rows(&self) -> usize {
        self.frames * self.atoms
    }

    /// Positions `[F A, 3]` (f32 Angstrom).
    fn positions(&self, rng: &mut Rng) -> Vec<f32> {
        let mut out = Vec::with_capacity(3 * self.rows());
        for _ in 0..self.frames {
            let offset = [0, 1, 2].map(|_| rng.range(-8.0, 8.0));
            let mut p = protein_like(rng, self.atoms, offset);
            if self.coincident && self.atoms > 2 {
                p[1] = p[0];
            }
            if self.isolated && self.atoms > 1 && matches!(self.cell, Cell::Open) {
                // Far from everything (in a box the minimum image would bring it back).
                let last = self.atoms - 1;
                p[last] = [p[0][0] + 60.0, p[0][1], p[0][2]];
            }
            out.extend(p.iter().flat_map(|q| q.map(|x| x as f32)));
        }
        out
    }

    /// The check's name: sizes, basis, box and the special atoms.
    fn label(&self, edges: usize) -> String {
        let heads = if self.heads > 0 {
            format!("/{}", self.heads)
        } else {
            String::new()
        };
        format!(
            "H{}{heads} K{} {:?} {:?} {}x{}{}{} {edges}e",
            self.hidden,
            self.basis.size,
            self.basis.kind,
            self.cell,
            self.frames,
            self.atoms,
            if self.coincident { " r0" } else { "" },
            if self.isolated { " iso" } else { "" },
        )
    }

    /// The rows of the isolated atoms (which have no edges).
    fn isolated_rows(&self) -> Vec<usize> {
        if self.isolated && self.atoms > 1 && matches!(self.cell, Cell::Open) {
            (0..self.frames)
                .map(|f| f * self.atoms + self.atoms - 1)
                .collect()
        } else {
            Vec::new()
        }
    }
}

/// A case's graph: positions, the list built on the device and its host copy.
struct Graph {
    pos: Vec<f32>,
    nl: NeighborList,
    host: HostNeighborList,
}

impl Graph {
    fn new(dev: &Device, c: &Case, rng: &mut Rng) -> Result<Self> {
        let pos = c.positions(rng);
        let pt = Tensor::from_slice(dev, &[c.frames, c.atoms, 3], &pos)?;
        let cells = c.cell.cell().map(|cell| vec![cell]);
        let nl = NeighborList::build(&pt, c.basis.cutoff, cells.as_deref(), None)?;
        let host = nl.to_host()?;
        Ok(Self { pos, nl, host })
    }
}

/// Records that the isolated atoms' rows of `x [N, H]` are exactly zero.
fn isolated_zero(ctx: &mut Ctx, name: String, c: &Case, x: &Tensor<f32>) -> Result<()> {
    let rows = c.isolated_rows();
    if !rows.is_empty() {
        let x = x.to_vec()?;
        let h = c.hidden;
        let got: Vec<f32> = rows
            .iter()
            .flat_map(|&r| x[r * h..(r + 1) * h].iter().copied())
            .collect();
        ctx.exact(name, &got, &vec![0.0; got.len()], 0.0);
    }
    Ok(())
}

/// Atoms per frame of the case with more rows than the row kernels have warps (1024 blocks x 4:
/// they stride) and more edges than the filter backward's 128 blocks x 64: the tests' 3 x 1500;
/// 3 x 400 in quick runs (no striding, still many blocks).
fn big_atoms(ctx: &Ctx) -> usize {
    if ctx.quick {
        400
    } else {
        1500
    }
}

/// Without quick, also the default backbone's sizes (H = 64, K = 32) on two frames of 400 atoms.
fn realistic(ctx: &Ctx, heads: usize) -> Result<Option<Case>> {
    let basis = (RbfKind::ExpNormal, 32, 5.0);
    (!ctx.quick)
        .then(|| case(2, 400, 64, heads, basis, Cell::Open, false, false))
        .transpose()
}

// ------------------------------------------------------------------------------------ painn --

/// `painn`: the radial basis; the message forward and backward with each of the H 32, 64, 128
/// and 256 kernels, the filter backward and its reduction, the position backward; the split;
/// then the backbone.
pub(super) fn painn(ctx: &mut Ctx) -> Result<()> {
    radial_basis(ctx)?;
    use RbfKind::{ExpNormal as E, Gaussian as G};
    let cases = [
        // One atom: no edges at all.
        case(1, 1, 3, 0, (G, 4, 5.0), Cell::Open, false, false)?,
        // Two frames, a coincident pair and isolated atoms, idle lanes (H = 5).
        case(2, 17, 5, 0, (E, 8, 4.0), Cell::Open, true, true)?,
        // Two chunks of lanes with the second partly idle (H = 40), a basis wider than a warp.
        case(1, 23, 40, 0, (G, 33, 5.0), Cell::Ortho, true, false)?,
        // Triclinic box, two frames, a full warp of channels.
        case(2, 13, 32, 0, (E, 16, 4.5), Cell::Triclinic, false, false)?,
        // The 128-channel kernels, partly idle.
        case(1, 9, 100, 0, (G, 20, 5.0), Cell::Open, true, true)?,
        // The largest sizes: H = 256, K = 64 (207 KB of shared memory per block).
        case(1, 7, 256, 0, (E, 64, 5.0), Cell::Ortho, false, false)?,
        // Many rows and edges.
        case(3, big_atoms(ctx), 2, 0, (G, 3, 3.0), Cell::Open, true, true)?,
    ];
    for c in cases.iter().chain(&realistic(ctx, 0)?) {
        painn_messages(ctx, c)?;
    }
    split3(ctx)?;
    backbone(ctx, "painn")
}

/// `radial_basis_forward` of both kinds at K = 1, 7, 32 and 64 on 0, the cutoff, beyond it and
/// random distances inside, against the f64 twin (the tests' close(2e-5)); the features at and
/// beyond the cutoff must be exactly zero.
fn radial_basis(ctx: &mut Ctx) -> Result<()> {
    for kind in [RbfKind::Gaussian, RbfKind::ExpNormal] {
        let (mut got, mut want, mut zeros, mut secs) = (vec![], vec![], vec![], 0.0);
        for (size, cutoff) in [(1, 5.0f32), (7, 3.0), (32, 5.0), (64, 8.0)] {
            let mut dist = vec![0.0f32, cutoff, cutoff * 1.5];
            dist.extend((0..37).map(|_| ctx.rng.range(0.0, cutoff as f64 * 1.1) as f32));
            let mut w = vec![0.0; dist.len() * size];
            pn::radial_basis_forward_host(&to64(&dist), &mut w, kind, size, cutoff);
            let (out, s) = ctx.timed(|d| {
                let dt = input(d, &[dist.len()], &dist)?;
                let mut out = poisoned(d, &[dist.len(), size])?;
                pn::radial_basis_forward(&dt, &mut out, kind, size, cutoff)?;
                Ok(out)
            })?;
            let out = out.to_vec()?;
            zeros.extend_from_slice(&out[size..3 * size]);
            got.extend(out);
            want.extend(w);
            secs += s;
        }
        ctx.compare(
            format!("radial_basis {kind:?} K 1,7,32,64"),
            &got,
            &want,
            scaled(&want, 2e-5),
            secs,
        );
        let n = zeros.len();
        ctx.exact(
            format!("radial_basis {kind:?}: zero from the cutoff on"),
            &zeros,
            &vec![0.0; n],
            0.0,
        );
    }
    Ok(())
}

/// The message forward, its backward (activations, per-edge and position gradients), the filter
/// backward (accumulated, with caller scratch and with its own) on one case.
fn painn_messages(ctx: &mut Ctx, c: &Case) -> Result<()> {
    let dev = ctx.dev.clone();
    let g = Graph::new(&dev, c, &mut ctx.rng)?;
    let (n, h, k, e) = (c.rows(), c.hidden, c.basis.size, g.host.edges());
    let rng = &mut ctx.rng;
    let (phi, v) = (
        rng.normal_vec(3 * n * h, 1.0),
        rng.normal_vec(3 * n * h, 1.0),
    );
    let (w, b) = (rng.normal_vec(3 * h * k, 0.5), rng.normal_vec(3 * h, 0.5));
    let (dds, ddv) = (rng.normal_vec(n * h, 1.0), rng.normal_vec(3 * n * h, 1.0));
    let (w0, b0) = (rng.normal_vec(3 * h * k, 1.0), rng.normal_vec(3 * h, 1.0));

    // The f64 reference of every output.
    let gv = GraphView::from(&g.host);
    let (pos64, phi64, v64, w64, b64) = (to64(&g.pos), to64(&phi), to64(&v), to64(&w), to64(&b));
    let (dds64, ddv64) = (to64(&dds), to64(&ddv));
    let z = |len: usize| vec![0.0f64; len];
    let (mut ds_r, mut dv_r) = (z(n * h), z(3 * n * h));
    pn::painn_message_forward_host(
        gv, &pos64, &phi64, &v64, &w64, &b64, c.basis, &mut ds_r, &mut dv_r, h,
    );
    let (mut dphi_r, mut dvv_r, mut dvec_r, mut dpos_r) =
        (z(3 * n * h), z(3 * n * h), z(3 * e), z(3 * n));
    pn::painn_message_backward_host(
        gv,
        &pos64,
        &phi64,
        &v64,
        &w64,
        &b64,
        c.basis,
        &dds64,
        &ddv64,
        Some(&mut dphi_r),
        Some(&mut dvv_r),
        Some(&mut dvec_r),
        h,
    );
    pn::painn_position_backward_host(gv, &dvec_r, &mut dpos_r);
    let (mut dw_r, mut db_r) = (z(3 * h * k), z(3 * h));
    pn::painn_filter_backward_host(
        gv,
        &pos64,
        &phi64,
        &v64,
        c.basis,
        &dds64,
        &ddv64,
        Some(&mut dw_r),
        Some(&mut db_r),
        h,
    );

    let t = |shape: &[usize], x: &[f32]| input(&dev, shape, x);
    let (pos_t, phi_t, v_t) = (
        t(&[n, 3], &g.pos)?,
        t(&[n, 3 * h], &phi)?,
        t(&[n, 3, h], &v)?,
    );
    let (w_t, b_t) = (t(&[3 * h, k], &w)?, t(&[3 * h], &b)?);
    let (dds_t, ddv_t) = (t(&[n, h], &dds)?, t(&[n, 3, h], &ddv)?);
    let name = format!("painn {}", c.label(e));

    let ((ds, dv), secs) = ctx.timed(|d| {
        let (mut ds, mut dv) = (poisoned(d, &[n, h])?, poisoned(d, &[n, 3, h])?);
        pn::painn_message_forward(
            &g.nl, &pos_t, &phi_t, &v_t, &w_t, &b_t, c.basis, &mut ds, &mut dv,
        )?;
        Ok((ds, dv))
    })?;
    close(
        ctx,
        &name,
        secs,
        &[("ds", &ds, &ds_r, 3e-5), ("dv", &dv, &dv_r, 3e-5)],
    )?;
    isolated_zero(ctx, format!("{name}: isolated atoms' ds = 0"), c, &ds)?;

    let ((dphi, dvv, dvec), secs) = ctx.timed(|d| {
        let (mut dphi, mut dvv) = (poisoned(d, &[n, 3 * h])?, poisoned(d, &[n, 3, h])?);
        let mut dvec = poisoned(d, &[e, 3])?;
        pn::painn_message_backward(
            &g.nl,
            &pos_t,
            &phi_t,
            &v_t,
            &w_t,
            &b_t,
            c.basis,
            &dds_t,
            &ddv_t,
            Some(&mut dphi),
            Some(&mut dvv),
            Some(&mut dvec),
        )?;
        Ok((dphi, dvv, dvec))
    })?;
    close(
        ctx,
        &name,
        secs,
        &[
            ("backward dphi", &dphi, &dphi_r, 3e-5),
            ("backward dv", &dvv, &dvv_r, 3e-5),
            ("backward dvec", &dvec, &dvec_r, 1e-4),
        ],
    )?;
    let (dpos, secs) = ctx.timed(|d| {
        let mut dpos = poisoned(d, &[n, 3])?;
        pn::painn_position_backward(&g.nl, &dvec, &mut dpos)?;
        Ok(dpos)
    })?;
    close(
        ctx,
        &name,
        secs,
        &[("position backward", &dpos, &dpos_r, 1e-4)],
    )?;

    // The filter gradients accumulate onto what is there; poisoned caller scratch (its contents
    // are ignored).
    let ((dw, db), secs) = ctx.timed(|d| {
        let (mut dw, mut db) = (input(d, &[3 * h, k], &w0)?, input(d, &[3 * h], &b0)?);
        let mut scratch = poisoned(d, &[pn::painn_filter_backward_scratch_len(e, h, k)])?;
        pn::painn_filter_backward(
            &g.nl,
            &pos_t,
            &phi_t,
            &v_t,
            c.basis,
            &dds_t,
            &ddv_t,
            Some(&mut dw),
            Some(&mut db),
            Some(&mut scratch),
        )?;
        Ok((dw, db))
    })?;
    let (dw_want, db_want) = (plus(&w0, &dw_r), plus(&b0, &db_r));
    let checks = [
        ("filter dw", &dw, &dw_want[..], 1e-4),
        ("filter db", &db, &db_want, 1e-4),
    ];
    close(ctx, &name, secs, &checks)?;

    // Outputs skipped one by one give the same bits (the op's own scratch here).
    let mut db_only = t(&[3 * h], &b0)?;
    pn::painn_filter_backward(
        &g.nl,
        &pos_t,
        &phi_t,
        &v_t,
        c.basis,
        &dds_t,
        &ddv_t,
        None,
        Some(&mut db_only),
        None,
    )?;
    same_bits(ctx, format!("{name}: filter db alone"), &db_only, &db)?;
    let mut dphi_only = poisoned(&dev, &[n, 3 * h])?;
    pn::painn_message_backward(
        &g.nl,
        &pos_t,
        &phi_t,
        &v_t,
        &w_t,
        &b_t,
        c.basis,
        &dds_t,
        &ddv_t,
        Some(&mut dphi_only),
        None,
        None,
    )?;
    same_bits(
        ctx,
        format!("{name}: backward dphi alone"),
        &dphi_only,
        &dphi,
    )
}

/// `painn_split3_forward` and `_backward`: column blocks moved, so exactly the input's values.
fn split3(ctx: &mut Ctx) -> Result<()> {
    for (n, h) in [(1, 1), (7, 5), (300, 33)] {
        let x = ctx.rng.normal_vec(3 * n * h, 1.0);
        let (parts, secs) = ctx.timed(|d| {
            let xt = input(d, &[n, 3 * h], &x)?;
            let [mut a, mut b, mut c] = [
                poisoned(d, &[n, h])?,
                poisoned(d, &[n, h])?,
                poisoned(d, &[n, h])?,
            ];
            pn::painn_split3_forward(&xt, &mut a, &mut b, &mut c)?;
            Ok([a, b, c])
        })?;
        let mut got = Vec::with_capacity(x.len());
        for p in &parts {
            got.extend(p.to_vec()?);
        }
        let want: Vec<f32> = (0..3)
            .flat_map(|m| (0..n).flat_map(move |r| r * 3 * h + m * h..r * 3 * h + (m + 1) * h))
            .map(|i| x[i])
            .collect();
        ctx.exact(
            format!("painn_split3_forward {n}x3x{h}"),
            &bits(&got),
            &bits(&want),
            secs,
        );
        let (dx, secs) = ctx.timed(|d| {
            let mut dx = poisoned(d, &[n, 3 * h])?;
            pn::painn_split3_backward(&parts[0], &parts[1], &parts[2], &mut dx)?;
            Ok(dx)
        })?;
        ctx.exact(
            format!("painn_split3_backward {n}x3x{h}"),
            &bits(&dx.to_vec()?),
            &bits(&x),
            secs,
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------- torchmd_et --

/// `torchmd_et`: the attention messages and their backward (query and source kernels) with each
/// of the H 32, 64, 128 and 256 kernels, the filter backward and its reduction; the layer norm
/// and its parameter partials and reduction; then the backbone.
pub(super) fn torchmd_et(ctx: &mut Ctx) -> Result<()> {
    use RbfKind::{ExpNormal as E, Gaussian as G};
    let cases = [
        // One atom: no edges at all.
        case(1, 1, 4, 2, (G, 4, 5.0), Cell::Open, false, false)?,
        // Two frames, a coincident pair and isolated atoms, idle lanes (H = 6, 3 heads).
        case(2, 17, 6, 3, (E, 8, 4.0), Cell::Open, true, true)?,
        // Heads of 5 channels straddling lanes and chunks (H = 40), a basis wider than a warp.
        case(1, 23, 40, 8, (G, 33, 5.0), Cell::Ortho, true, false)?,
        // Triclinic box, two frames, a full warp of channels.
        case(2, 13, 32, 4, (E, 16, 4.5), Cell::Triclinic, false, false)?,
        // The 128-channel kernels, partly idle, one head of 100 channels.
        case(1, 9, 100, 1, (G, 20, 5.0), Cell::Open, true, true)?,
        // The 256-channel kernels.
        case(1, 6, 256, 8, (E, 32, 5.0), Cell::Ortho, false, false)?,
        // Many rows and edges.
        case(3, big_atoms(ctx), 2, 1, (G, 3, 3.0), Cell::Open, true, true)?,
    ];
    for c in cases.iter().chain(&realistic(ctx, 8)?) {
        et_messages(ctx, c)?;
    }
    layernorm(ctx)?;
    backbone(ctx, "et")
}

/// The operands of the attention messages in `EtTensors` order: positions `[N, 3]`, q, key
/// `[N, H]`, val `[N, 3H]`, vec `[N, 3, H]`, w_dk `[H, K]`, b_dk `[H]`, w_dv `[3H, K]`, b_dv
/// `[3H]`.
type EtOperands<T> = [T; 9];

fn et_shapes(n: usize, h: usize, k: usize) -> EtOperands<Vec<usize>> {
    [
        vec![n, 3],
        vec![n, h],
        vec![n, h],
        vec![n, 3 * h],
        vec![n, 3, h],
        vec![h, k],
        vec![h],
        vec![3 * h, k],
        vec![3 * h],
    ]
}

fn et_slices<R>(x: &EtOperands<Vec<R>>) -> EtSlices<'_, R> {
    let [positions, q, key, val, vec, w_dk, b_dk, w_dv, b_dv] = x.each_ref().map(|v| &v[..]);
    EtSlices {
        positions,
        q,
        key,
        val,
        vec,
        w_dk,
        b_dk,
        w_dv,
        b_dv,
    }
}

fn et_tensors(x: &EtOperands<Tensor<f32>>) -> EtTensors<'_> {
    let [positions, q, key, val, vec, w_dk, b_dk, w_dv, b_dv] = x.each_ref();
    EtTensors {
        positions,
        q,
        key,
        val,
        vec,
        w_dk,
        b_dk,
        w_dv,
        b_dv,
    }
}

/// The attention forward, its backward (all five gradients, then some alone), the position
/// backward and the filter backward (accumulated, with caller scratch and with its own) on one
/// case.
fn et_messages(ctx: &mut Ctx, c: &Case) -> Result<()> {
    let dev = ctx.dev.clone();
    let g = Graph::new(&dev, c, &mut ctx.rng)?;
    let (n, h, k, e, heads) = (c.rows(), c.hidden, c.basis.size, g.host.edges(), c.heads);
    let shapes = et_shapes(n, h, k);
    // The tests' scales: activations normal(1), filters normal(0.5).
    let mut host: EtOperands<Vec<f32>> = Default::default();
    host[0] = g.pos.clone();
    for (i, x) in host.iter_mut().enumerate().skip(1) {
        let len = shapes[i].iter().product();
        *x = ctx.rng.normal_vec(len, if i < 5 { 1.0 } else { 0.5 });
    }
    let (gx, gv) = (
        ctx.rng.normal_vec(n * h, 1.0),
        ctx.rng.normal_vec(3 * n * h, 1.0),
    );
    let init: Vec<Vec<f32>> = [5, 6, 7, 8]
        .iter()
        .map(|&i| ctx.rng.normal_vec(shapes[i].iter().product(), 1.0))
        .collect();

    // The f64 reference of every output.
    let gview = GraphView::from(&g.host);
    let host64 = host.each_ref().map(|x| to64(x));
    let (gx64, gv64) = (to64(&gx), to64(&gv));
    let s = et_slices(&host64);
    let z = |len: usize| vec![0.0f64; len];
    let (mut xagg_r, mut vagg_r) = (z(n * h), z(3 * n * h));
    et::et_message_forward_host(gview, s, c.basis, heads, h, &mut xagg_r, &mut vagg_r);
    let mut grads_r = [z(n * h), z(n * h), z(3 * n * h), z(3 * n * h), z(3 * e)];
    let [dq_r, dkey_r, dval_r, dvec_r, dedge_r] = &mut grads_r;
    et::et_message_backward_host(
        gview,
        s,
        c.basis,
        heads,
        h,
        &gx64,
        &gv64,
        EtGradSlices {
            dq: Some(dq_r),
            dkey: Some(dkey_r),
            dval: Some(dval_r),
            dvec: Some(dvec_r),
            dedge: Some(dedge_r),
        },
    );
    let mut dpos_r = z(3 * n);
    pn::painn_position_backward_host(gview, &grads_r[4], &mut dpos_r);
    let mut filt_r = [z(h * k), z(h), z(3 * h * k), z(3 * h)];
    let [dw_dk, db_dk, dw_dv, db_dv] = &mut filt_r;
    et::et_filter_backward_host(
        gview,
        s,
        c.basis,
        heads,
        h,
        &gx64,
        &gv64,
        EtFilterGradSlices {
            dw_dk: Some(dw_dk),
            db_dk: Some(db_dk),
            dw_dv: Some(dw_dv),
            db_dv: Some(db_dv),
        },
    );

    let ops = host
        .iter()
        .zip(&shapes)
        .map(|(x, shape)| input(&dev, shape, x));
    let ops: Vec<Tensor<f32>> = ops.collect::<Result<_>>()?;
    let ops: EtOperands<Tensor<f32>> = ops.try_into().map_err(|_| anyhow!("nine operands"))?;
    let t = et_tensors(&ops);
    let (gx_t, gv_t) = (input(&dev, &[n, h], &gx)?, input(&dev, &[n, 3, h], &gv)?);
    let name = format!("torchmd_et {}", c.label(e));

    let ((xagg, vagg), secs) = ctx.timed(|d| {
        let (mut xagg, mut vagg) = (poisoned(d, &[n, h])?, poisoned(d, &[n, 3, h])?);
        et::et_message_forward(&g.nl, &t, c.basis, heads, &mut xagg, &mut vagg)?;
        Ok((xagg, vagg))
    })?;
    close(
        ctx,
        &name,
        secs,
        &[
            ("xagg", &xagg, &xagg_r, 3e-5),
            ("vagg", &vagg, &vagg_r, 3e-5),
        ],
    )?;
    isolated_zero(ctx, format!("{name}: isolated atoms' xagg = 0"), c, &xagg)?;

    let (grads, secs) = ctx.timed(|d| {
        let mut o = [
            poisoned(d, &[n, h])?,
            poisoned(d, &[n, h])?,
            poisoned(d, &[n, 3 * h])?,
            poisoned(d, &[n, 3, h])?,
            poisoned(d, &[e, 3])?,
        ];
        let [dq, dkey, dval, dvec, dedge] = &mut o;
        let out = EtGrads {
            dq: Some(dq),
            dkey: Some(dkey),
            dval: Some(dval),
            dvec: Some(dvec),
            dedge: Some(dedge),
        };
        et::et_message_backward(&g.nl, &t, c.basis, heads, &gx_t, &gv_t, out)?;
        Ok(o)
    })?;
    let names = ["dq", "dkey", "dval", "dvec", "dedge"].map(|w| format!("backward {w}"));
    // The per-edge gradient is a difference of larger terms: the tests' 1e-4 there.
    let checks: Vec<_> = (0..5)
        .map(|i| {
            (
                &names[i][..],
                &grads[i],
                &grads_r[i][..],
                if i == 4 { 1e-4 } else { 3e-5 },
            )
        })
        .collect();
    close(ctx, &name, secs, &checks)?;
    let (dpos, secs) = ctx.timed(|d| {
        let mut dpos = poisoned(d, &[n, 3])?;
        pn::painn_position_backward(&g.nl, &grads[4], &mut dpos)?;
        Ok(dpos)
    })?;
    close(
        ctx,
        &name,
        secs,
        &[("position backward", &dpos, &dpos_r, 1e-4)],
    )?;

    // The filter gradients accumulate onto what is there; poisoned caller scratch.
    let (filt, secs) = ctx.timed(|d| {
        let mut o = [
            input(d, &shapes[5], &init[0])?,
            input(d, &shapes[6], &init[1])?,
            input(d, &shapes[7], &init[2])?,
            input(d, &shapes[8], &init[3])?,
        ];
        let mut scratch = poisoned(d, &[et::et_filter_backward_scratch_len(e, h, k)])?;
        let [dw_dk, db_dk, dw_dv, db_dv] = &mut o;
        let out = EtFilterGrads {
            dw_dk: Some(dw_dk),
            db_dk: Some(db_dk),
            dw_dv: Some(dw_dv),
            db_dv: Some(db_dv),
        };
        et::et_filter_backward(
            &g.nl,
            &t,
            c.basis,
            heads,
            &gx_t,
            &gv_t,
            out,
            Some(&mut scratch),
        )?;
        Ok(o)
    })?;
    let names = ["dw_dk", "db_dk", "dw_dv", "db_dv"].map(|w| format!("filter {w}"));
    let wants: Vec<_> = (0..4).map(|i| plus(&init[i], &filt_r[i])).collect();
    let checks: Vec<_> = (0..4)
        .map(|i| (&names[i][..], &filt[i], &wants[i][..], 1e-4))
        .collect();
    close(ctx, &name, secs, &checks)?;

    // Outputs asked for alone give the same bits: dq and dedge (the source kernel without
    // dkey, dval, dvec), and the value bias (the op's own scratch).
    let (mut dq, mut dedge) = (poisoned(&dev, &[n, h])?, poisoned(&dev, &[e, 3])?);
    let out = EtGrads {
        dq: Some(&mut dq),
        dedge: Some(&mut dedge),
        ..Default::default()
    };
    et::et_message_backward(&g.nl, &t, c.basis, heads, &gx_t, &gv_t, out)?;
    same_bits(ctx, format!("{name}: backward dq alone"), &dq, &grads[0])?;
    same_bits(
        ctx,
        format!("{name}: backward dedge alone"),
        &dedge,
        &grads[4],
    )?;
    let mut db_dv = input(&dev, &shapes[8], &init[3])?;
    let out = EtFilterGrads {
        db_dv: Some(&mut db_dv),
        ..Default::default()
    };
    et::et_filter_backward(&g.nl, &t, c.basis, heads, &gx_t, &gv_t, out, None)?;
    same_bits(ctx, format!("{name}: filter db_dv alone"), &db_dv, &filt[3])
}

/// The scalar layer norm forward (the tests' close(2e-5)) and backward (dx, and dgamma, dbeta
/// accumulated onto ones: close(1e-4)) at one row and one channel (zero variance), ragged
/// channel counts and several blocks of parameter partials; each gradient alone gives the same
/// bits.
fn layernorm(ctx: &mut Ctx) -> Result<()> {
    let eps = 1e-5f32;
    for (n, h) in [(1usize, 1usize), (7, 5), (300, 64), (70, 100)] {
        let rng = &mut ctx.rng;
        let (x, gamma, beta) = (
            rng.normal_vec(n * h, 2.0),
            rng.normal_vec(h, 1.0),
            rng.normal_vec(h, 1.0),
        );
        let dy = rng.normal_vec(n * h, 1.0);
        let (x64, g64, b64, dy64) = (to64(&x), to64(&gamma), to64(&beta), to64(&dy));
        let (mut y_r, mut st_r) = (vec![0.0; n * h], vec![0.0; 2 * n]);
        et::et_layernorm_forward_host(&x64, &g64, &b64, eps as f64, &mut y_r, &mut st_r);
        let (mut dx_r, mut dg_r, mut db_r) = (vec![0.0; n * h], vec![0.0; h], vec![0.0; h]);
        et::et_layernorm_backward_host(
            &x64,
            &g64,
            &st_r,
            &dy64,
            Some(&mut dx_r),
            Some(&mut dg_r),
            Some(&mut db_r),
        );
        let dev = ctx.dev.clone();
        let (xt, gt, bt) = (
            input(&dev, &[n, h], &x)?,
            input(&dev, &[h], &gamma)?,
            input(&dev, &[h], &beta)?,
        );
        let dyt = input(&dev, &[n, h], &dy)?;
        let name = format!("et_layernorm {n}x{h}");
        let ((y, st), secs) = ctx.timed(|d| {
            let (mut y, mut st) = (poisoned(d, &[n, h])?, poisoned(d, &[n, 2])?);
            et::et_layernorm_forward(&xt, &gt, &bt, eps, &mut y, &mut st)?;
            Ok((y, st))
        })?;
        close(ctx, &name, secs, &[("forward", &y, &y_r, 2e-5)])?;
        let ones = vec![1.0f32; h];
        let ((dx, dg, db), secs) = ctx.timed(|d| {
            let mut dx = poisoned(d, &[n, h])?;
            let (mut dg, mut db) = (input(d, &[h], &ones)?, input(d, &[h], &ones)?);
            let mut scratch = poisoned(d, &[et::et_layernorm_backward_scratch_len(n, h)])?;
            et::et_layernorm_backward(
                &xt,
                &gt,
                &st,
                &dyt,
                Some(&mut dx),
                Some(&mut dg),
                Some(&mut db),
                Some(&mut scratch),
            )?;
            Ok((dx, dg, db))
        })?;
        let plus1 = |v: &[f64]| v.iter().map(|x| x + 1.0).collect::<Vec<_>>();
        let (dg_want, db_want) = (plus1(&dg_r), plus1(&db_r));
        let checks = [
            ("backward dx", &dx, &dx_r[..], 1e-4),
            ("backward dgamma", &dg, &dg_want, 1e-4),
            ("backward dbeta", &db, &db_want, 1e-4),
        ];
        close(ctx, &name, secs, &checks)?;
        // dx alone (no parameter kernels), and dgamma alone with the op's own scratch.
        let mut dx_only = poisoned(&dev, &[n, h])?;
        et::et_layernorm_backward(&xt, &gt, &st, &dyt, Some(&mut dx_only), None, None, None)?;
        same_bits(ctx, format!("{name}: backward dx alone"), &dx_only, &dx)?;
        let mut dg_only = input(&dev, &[h], &ones)?;
        et::et_layernorm_backward(&xt, &gt, &st, &dyt, None, Some(&mut dg_only), None, None)?;
        same_bits(ctx, format!("{name}: backward dgamma alone"), &dg_only, &dg)?;
    }
    Ok(())
}

// --------------------------------------------------------------------------------- backbone --

/// The tests' small backbone: H = 8, two layers, six basis functions, cutoff 4.5 A (two heads
/// for TorchMD-ET).
fn backbone_config(kind: &str, rbf: &str) -> Result<BackboneConfig> {
    let et = if kind == "et" {
        "kind = \"et\"\nheads = 2\n"
    } else {
        ""
    };
    BackboneConfig::from_toml(&format!(
        "{et}hidden = 8\nlayers = 2\nrbf = 6\nrbf_kind = \"{rbf}\"\ncutoff = 4.5\nseed = 3\n"
    ))
}

/// Frames of atoms with atomic numbers (H, C, N, O, S), for the backbone.
struct Molecule {
    frames: usize,
    atoms: usize,
    pos: Vec<f32>,
    z: Vec<i32>,
    cell: Cell,
}

impl Molecule {
    fn random(rng: &mut Rng, frames: usize, atoms: usize, cell: Cell) -> Result<Self> {
        let open = matches!(cell, Cell::Open);
        let c = case(
            frames,
            atoms,
            1,
            0,
            (RbfKind::Gaussian, 1, 4.5),
            cell,
            false,
            open,
        )?;
        let z = (0..atoms).map(|_| [1, 6, 7, 8, 16][rng.below(5)]).collect();
        Ok(Self {
            frames,
            atoms,
            pos: c.positions(rng),
            z,
            cell,
        })
    }

    fn rows(&self) -> usize {
        self.frames * self.atoms
    }

    /// The atomic-number index and the list (cutoff 4.5 A, from `pos`) on `dev`.
    fn on(&self, dev: &Device) -> Result<(Arc<DeviceEmbeddingIndex>, Arc<NeighborList>)> {
        let z = EmbeddingIndex::new(&self.z, ELEMENTS)?.to_device(dev)?;
        let pt = Tensor::from_slice(dev, &[self.frames, self.atoms, 3], &self.pos)?;
        let cells = self.cell.cell().map(|c| vec![c]);
        let nl = NeighborList::build(&pt, 4.5, cells.as_deref(), None)?;
        Ok((Arc::new(z), Arc::new(nl)))
    }
}

/// One backbone run: the per-atom scalars and vectors, the denoising head's output and, after a
/// backward pass, the positions' gradient and every parameter's.
struct Run {
    s: Vec<f32>,
    v: Vec<f32>,
    head: Vec<f32>,
    dpos: Vec<f32>,
    grads: Vec<Vec<f32>>,
}

impl Run {
    fn bits(&self) -> Vec<u32> {
        let all = [&self.s, &self.v, &self.head, &self.dpos];
        all.into_iter()
            .chain(&self.grads)
            .flat_map(|x| bits(x))
            .collect()
    }
}

/// Runs the backbone and the denoising head at `pos` (the list fixed); with `seed` given,
/// backpropagates sum(seed * head), or sum(seed * s) when the seed has one value per scalar.
fn run_backbone(
    model: &Backbone,
    tape: &mut Tape,
    (z, nl): &(Arc<DeviceEmbeddingIndex>, Arc<NeighborList>),
    pos: &[f32],
    seed: Option<&[f32]>,
) -> Result<Run> {
    tape.reset();
    let dev = tape.device().clone();
    let n = pos.len() / 3;
    let pt = Tensor::from_slice(&dev, &[n, 3], pos)?;
    let p = if seed.is_some() {
        tape.input_with_grad(pt)?
    } else {
        tape.input(pt)?
    };
    let (s, v) = model.forward(tape, p, z, nl)?;
    let d = model.denoise_head(tape, s, v)?;
    let mut run = Run {
        s: tape.value(s).to_vec()?,
        v: tape.value(v).to_vec()?,
        head: tape.value(d).to_vec()?,
        dpos: Vec::new(),
        grads: Vec::new(),
    };
    if let Some(seed) = seed {
        tape.params_mut().zero_grads()?;
        let out = if seed.len() == 3 * n { d } else { s };
        let g = Tensor::from_slice(&dev, tape.shape(out), seed)?;
        tape.backward(out, g)?;
        run.dpos = tape
            .grad(p)
            .ok_or_else(|| anyhow!("the positions got no gradient"))?
            .to_vec()?;
        let ps = tape.params();
        run.grads = ps
            .names()
            .iter()
            .filter_map(|name| ps.id(name))
            .map(|id| ps.grad(id).to_vec())
            .collect::<Result<_>>()?;
    }
    Ok(run)
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// The backbone (`kind` painn or et) on the tests' two settings: its gradient against
/// directional finite differences on each, and on the first two fresh models run twice each
/// bit-identical and, off cpu, the device against the cpu path.
fn backbone(ctx: &mut Ctx, kind: &str) -> Result<()> {
    let emu = matches!(ctx.dev, Device::Emu(_));
    // (basis, box, loss on the scalars instead of the head): TorchMD-ET's attention parameters
    // reach the head only through a gate, so its test also takes a loss on s.
    let settings = [
        ("expnormal", Cell::Open, false),
        ("gaussian", Cell::Ortho, kind == "et"),
    ];
    for (i, (rbf, cell, on_s)) in settings.into_iter().enumerate() {
        let atoms = match (kind, emu) {
            ("et", true) => 8,
            (_, true) => 9,
            _ => 12,
        };
        let mol = Molecule::random(&mut ctx.rng, 2, atoms, cell)?;
        let module = if kind == "et" { "torchmd_et" } else { "painn" };
        let name = format!("{module} backbone {rbf} {cell:?} 2x{atoms}");
        finite_differences(ctx, &name, kind, rbf, &mol, on_s)?;
        if i == 0 {
            repeat_and_cpu(ctx, &name, kind, rbf, &mol)?;
        }
    }
    Ok(())
}

/// The tests' directional finite differences of the whole backbone: for each parameter tensor a
/// random direction confined to it, one for the positions and one for everything; the loss is
/// sum(w * head) (or sum(w * s)). Each |fd - tape| must be within 2e-2 of the direction's scale
/// sum |g_i d_i| (floored: 1e-2 for PaiNN; 2.5e-3 for TorchMD-ET, whose test takes the best of
/// three step sizes since f32 rounding grows as 1/eps and truncation as eps^2). Recorded as
/// (fd - tape) / scale over all directions.
fn finite_differences(
    ctx: &mut Ctx,
    name: &str,
    kind: &str,
    rbf: &str,
    mol: &Molecule,
    on_s: bool,
) -> Result<()> {
    let dev = ctx.dev.clone();
    let (model, ps) = Backbone::create(backbone_config(kind, rbf)?, &dev)?;
    let h = model.config().hidden;
    let mut tape = Tape::new(ps, 1);
    tape.set_poison(true);
    let graph = mol.on(&dev)?;
    let n = mol.rows();
    let w = ctx.rng.normal_vec(if on_s { n * h } else { 3 * n }, 1.0);
    let ids: Vec<_> = {
        let ps = tape.params();
        ps.names().iter().filter_map(|m| ps.id(m)).collect()
    };
    let base: Vec<Vec<f32>> = ids
        .iter()
        .map(|&i| tape.params().value(i).to_vec())
        .collect::<Result<_>>()?;
    let zeros: Vec<Vec<f32>> = base.iter().map(|b| vec![0.0; b.len()]).collect();
    let mut directions: Vec<(Vec<Vec<f32>>, Vec<f32>)> = Vec::new();
    for m in 0..base.len() {
        let mut d = zeros.clone();
        d[m] = ctx.rng.normal_vec(base[m].len(), 1.0);
        directions.push((d, vec![0.0; 3 * n]));
    }
    directions.push((zeros.clone(), ctx.rng.normal_vec(3 * n, 1.0)));
    let everything = base.iter().map(|b| ctx.rng.normal_vec(b.len(), 1.0));
    directions.push((everything.collect(), ctx.rng.normal_vec(3 * n, 1.0)));
    let (steps, floor): (&[f64], f64) = if kind == "et" {
        (&[4e-3, 8e-3, 2e-3], 2.5e-3)
    } else {
        (&[2e-3], 1e-2)
    };
    let (errs, secs) = ctx.timed(|_| {
        let r = run_backbone(&model, &mut tape, &graph, &mol.pos, Some(&w))?;
        let mut loss_at = |dir: &[Vec<f32>], dpos: &[f32], eps: f64| -> Result<f64> {
            let moved = |x: &[f32], d: &[f32]| -> Vec<f32> {
                x.iter()
                    .zip(d)
                    .map(|(&p, &d)| (p as f64 + eps * d as f64) as f32)
                    .collect()
            };
            for (m, &id) in ids.iter().enumerate() {
                let p = moved(&base[m], &dir[m]);
                tape.params_mut().value_mut(id).copy_from_slice(&p)?;
            }
            let run = run_backbone(&model, &mut tape, &graph, &moved(&mol.pos, dpos), None)?;
            Ok(dot(if on_s { &run.s } else { &run.head }, &w))
        };
        let mut errs = Vec::with_capacity(directions.len());
        for (dir, dpos) in &directions {
            let pairs = r.grads.iter().zip(dir).chain([(&r.dpos, dpos)]);
            let analytic: f64 = pairs.clone().map(|(g, d)| dot(g, d)).sum();
            let scale = pairs
                .flat_map(|(g, d)| g.iter().zip(d).map(|(&a, &b)| (a as f64 * b as f64).abs()))
                .sum::<f64>()
                .max(floor);
            let mut best = f64::INFINITY;
            for &eps in steps {
                let fd = (loss_at(dir, dpos, eps)? - loss_at(dir, dpos, -eps)?) / (2.0 * eps);
                if (fd - analytic).abs() < best.abs() {
                    best = fd - analytic;
                }
                if best.abs() <= 2e-2 * scale {
                    break;
                }
            }
            errs.push(best / scale);
        }
        Ok(errs)
    })?;
    let what = if on_s { "sum(w s)" } else { "sum(w head)" };
    ctx.compare(
        format!(
            "{name}: {} directional derivatives of {what} vs finite differences",
            errs.len()
        ),
        &errs,
        &vec![0.0; errs.len()],
        Tol::abs(2e-2),
        secs,
    );
    Ok(())
}

/// Two fresh models on the device, each run (forward and backward) twice, must give the same
/// bits (the tests' repeat-run check); off cpu, the device's run against the cpu path's within
/// the cross-device tolerances of tests/token_model.rs (`model_matches_the_cpu_on_every_device`:
/// outputs 1e-4 + 1e-3 |x|, gradients 2e-4 + 2e-3 |x|), the absolute part scaled by each
/// tensor's largest magnitude (at least 1) as the atom tests' `close` does.
fn repeat_and_cpu(ctx: &mut Ctx, name: &str, kind: &str, rbf: &str, mol: &Molecule) -> Result<()> {
    let seed = ctx.rng.normal_vec(3 * mol.rows(), 1.0);
    let run_on = |dev: &Device, times: usize| -> Result<Vec<Run>> {
        let (model, ps) = Backbone::create(backbone_config(kind, rbf)?, dev)?;
        let mut tape = Tape::new(ps, 1);
        tape.set_poison(true);
        let graph = mol.on(dev)?;
        (0..times)
            .map(|_| run_backbone(&model, &mut tape, &graph, &mol.pos, Some(&seed)))
            .collect()
    };
    let (runs, secs) = ctx.timed(|d| {
        let mut runs = run_on(d, 2)?;
        runs.extend(run_on(d, 2)?);
        Ok(runs)
    })?;
    let first = runs[0].bits();
    let want: Vec<u32> = (1..runs.len())
        .flat_map(|_| first.iter().copied())
        .collect();
    let got: Vec<u32> = runs[1..].iter().flat_map(Run::bits).collect();
    ctx.exact(
        format!("{name}: 2 models x 2 runs bit-identical"),
        &got,
        &want,
        secs,
    );
    if matches!(ctx.dev, Device::Cpu) {
        return Ok(());
    }
    let cpu = run_on(&Device::Cpu, 1)?.remove(0);
    let dev = &runs[0];
    let out = |x: &[f64]| scaled_tol(x, 1e-4, 1e-3);
    for (what, got, want) in [
        ("s", &dev.s, &cpu.s),
        ("v", &dev.v, &cpu.v),
        ("head", &dev.head, &cpu.head),
    ] {
        let want = to64(want);
        ctx.compare(
            format!("{name}: {what} vs cpu"),
            got,
            &want,
            out(&want),
            secs,
        );
    }
    let want = to64(&cpu.dpos);
    let tol = scaled_tol(&want, 2e-4, 2e-3);
    ctx.compare(
        format!("{name}: positions' gradient vs cpu"),
        &dev.dpos,
        &want,
        tol,
        secs,
    );
    // Every parameter's gradient, each tensor divided by its largest magnitude (at least 1), so
    // one tolerance fits all.
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for (g, c) in dev.grads.iter().zip(&cpu.grads) {
        let scale = c.iter().fold(1.0f64, |m, &x| m.max((x as f64).abs()));
        got.extend(g.iter().map(|&x| x as f64 / scale));
        want.extend(c.iter().map(|&x| x as f64 / scale));
    }
    ctx.compare(
        format!("{name}: {} parameter gradients vs cpu", dev.grads.len()),
        &got,
        &want,
        Tol::new(2e-4, 2e-3),
        secs,
    );
    Ok(())
}

/// Absolute `abs` times the reference's largest magnitude (at least 1), relative `rel`.
fn scaled_tol(want: &[f64], abs: f64, rel: f64) -> Tol {
    let scale = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
    Tol::new(abs * scale, rel)
}
