//! The PaiNN atom stage (src/ops/painn.rs, cuda/painn.cu, src/nn/painn.rs) on every device: the
//! radial basis, the fused message and its backward passes against the f64 CPU twins on ragged
//! radius graphs built by `NeighborList::build` (open, orthorhombic and triclinic boxes, several
//! frames, a coincident atom pair at r = 0, isolated atoms, channel counts that leave lanes idle
//! and basis sizes past one warp), outputs poisoned first; the twins' gradients against central
//! differences in f64; the whole backbone's gradient (every parameter tensor and the positions)
//! against directional finite differences; rotation + translation equivariance; bit-identical
//! repeat runs; the configuration and the errors.

use anyhow::{ensure, Result};
use hiermd::nn::painn::{Backbone, BackboneConfig, ELEMENTS};
use hiermd::ops::neighbor_list::{HostNeighborList, NeighborList};
use hiermd::ops::painn::{
    cosine_cutoff_host, painn_filter_backward, painn_filter_backward_host, painn_message_backward,
    painn_message_backward_host, painn_message_forward, painn_message_forward_host,
    painn_position_backward, painn_position_backward_host, painn_split3_backward,
    painn_split3_forward, radial_basis_forward, radial_basis_forward_host, GraphView, RadialBasis,
    RbfKind,
};
use hiermd::ops::scatter::{DeviceEmbeddingIndex, EmbeddingIndex};
use hiermd::tape::Tape;
use hiermd::testing::{assert_close, central_difference, check_gradient, Rng};
use hiermd::traj::UnitCell;
use hiermd::{device_test, Device, Tensor};
use std::sync::Arc;

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn is_emu(dev: &Device) -> bool {
    matches!(dev, Device::Emu(_))
}

/// Compares with an absolute tolerance relative to the reference's largest magnitude (f32
/// sums of O(1) terms against f64), plus a relative one.
fn close(what: &str, got: &[f32], want: &[f64], tol: f64) -> Result<()> {
    let scale = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
    assert_close(what, got, want, tol * scale, tol)?;
    Ok(())
}

// --------------------------------------------------------------------------------- fixtures --

/// `atoms` protein-like positions: most atoms bonded (1.3-1.6 A) to the previous one, the rest
/// anywhere in a ball of `density` atoms / A^3, shifted by `offset`.
fn protein_like(rng: &mut Rng, atoms: usize, density: f64, offset: [f64; 3]) -> Vec<[f64; 3]> {
    let radius = (atoms as f64 / density * 3.0 / (4.0 * std::f64::consts::PI)).cbrt();
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

/// One test graph.
#[derive(Clone, Copy, Debug)]
struct Case {
    frames: usize,
    atoms: usize,
    hidden: usize,
    basis: RadialBasis,
    /// None, an orthorhombic box or a triclinic one.
    cell: Option<UnitCell>,
    /// Atom 1 of every frame sits exactly on atom 0 (r = 0 in both directions).
    coincident: bool,
    /// The last atom of every frame is far from the others (a row without edges; open
    /// boundaries only).
    isolated: bool,
}

fn basis(kind: RbfKind, size: usize, cutoff: f32) -> RadialBasis {
    RadialBasis::new(kind, size, cutoff).unwrap()
}

/// Positions `[F A, 3]` for a case (f32 Angstrom).
fn positions(rng: &mut Rng, c: &Case) -> Vec<f32> {
    let mut out = Vec::with_capacity(3 * c.frames * c.atoms);
    for _ in 0..c.frames {
        let offset = [0, 1, 2].map(|_| rng.range(-8.0, 8.0));
        let mut p = protein_like(rng, c.atoms, 0.03, offset);
        if c.coincident && c.atoms > 2 {
            p[1] = p[0];
        }
        if c.isolated && c.atoms > 1 && c.cell.is_none() {
            // Far from everything (in a box the minimum image would bring it back).
            let last = c.atoms - 1;
            p[last] = [p[0][0] + 60.0, p[0][1], p[0][2]];
        }
        out.extend(p.iter().flat_map(|q| q.map(|x| x as f32)));
    }
    out
}

/// A test graph on a device: the list (built on that device), its host copy and the positions.
struct Graph {
    pos: Vec<f32>,
    nl: NeighborList,
    host: HostNeighborList,
}

fn graph(dev: &Device, c: &Case, pos: Vec<f32>) -> Result<Graph> {
    let pt = Tensor::from_slice(dev, &[c.frames, c.atoms, 3], &pos)?;
    let cells = c.cell.map(|cell| vec![cell]);
    let nl = NeighborList::build(&pt, c.basis.cutoff, cells.as_deref(), None)?;
    let host = nl.to_host()?;
    Ok(Graph { pos, nl, host })
}

fn cases() -> Vec<Case> {
    let ortho = UnitCell::from_lengths_angles(11.0, 12.0, 13.0, 90.0, 90.0, 90.0);
    let tric = UnitCell::from_lengths_angles(12.0, 12.5, 13.0, 80.0, 95.0, 100.0);
    vec![
        // One atom: no edges at all.
        Case {
            frames: 1,
            atoms: 1,
            hidden: 3,
            basis: basis(RbfKind::Gaussian, 4, 5.0),
            cell: None,
            coincident: false,
            isolated: false,
        },
        // Two frames, a coincident pair and isolated atoms, idle lanes (H = 5).
        Case {
            frames: 2,
            atoms: 17,
            hidden: 5,
            basis: basis(RbfKind::ExpNormal, 8, 4.0),
            cell: None,
            coincident: true,
            isolated: true,
        },
        // Orthorhombic box, two chunks of lanes with the second partly idle (H = 40), a basis
        // wider than a warp (K = 33).
        Case {
            frames: 1,
            atoms: 23,
            hidden: 40,
            basis: basis(RbfKind::Gaussian, 33, 5.0),
            cell: Some(ortho),
            coincident: true,
            isolated: false,
        },
        // Triclinic box, two frames, a full warp of channels.
        Case {
            frames: 2,
            atoms: 13,
            hidden: 32,
            basis: basis(RbfKind::ExpNormal, 16, 4.5),
            cell: Some(tric),
            coincident: false,
            isolated: false,
        },
        // The 128-channel kernels, partly idle.
        Case {
            frames: 1,
            atoms: 9,
            hidden: 100,
            basis: basis(RbfKind::Gaussian, 20, 5.0),
            cell: None,
            coincident: true,
            isolated: true,
        },
        // The largest sizes: H = 256, K = 64 (207 KB of shared memory per block).
        Case {
            frames: 1,
            atoms: 7,
            hidden: 256,
            basis: basis(RbfKind::ExpNormal, 64, 5.0),
            cell: Some(ortho),
            coincident: false,
            isolated: false,
        },
        // More rows than the row kernels have warps (they stride) and more edges than the filter
        // backward has blocks.
        Case {
            frames: 3,
            atoms: 1500,
            hidden: 2,
            basis: basis(RbfKind::Gaussian, 3, 3.0),
            cell: None,
            coincident: true,
            isolated: true,
        },
    ]
}

/// Random operands of a message: phi [N, 3H], v [N, 3, H], w [3H, K], b [3H], and upstream
/// gradients dds [N, H], ddv [N, 3, H].
struct Operands {
    phi: Vec<f32>,
    v: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    dds: Vec<f32>,
    ddv: Vec<f32>,
}

impl Operands {
    fn random(rng: &mut Rng, n: usize, h: usize, k: usize) -> Self {
        Self {
            phi: rng.normal_vec(3 * n * h, 1.0),
            v: rng.normal_vec(3 * n * h, 1.0),
            w: rng.normal_vec(3 * h * k, 0.5),
            b: rng.normal_vec(3 * h, 0.5),
            dds: rng.normal_vec(n * h, 1.0),
            ddv: rng.normal_vec(3 * n * h, 1.0),
        }
    }
}

/// The f64 reference of every output of the message ops.
struct Reference {
    ds: Vec<f64>,
    dv: Vec<f64>,
    dphi: Vec<f64>,
    dvv: Vec<f64>,
    dvec: Vec<f64>,
    dpos: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
}

fn reference(c: &Case, g: &Graph, o: &Operands) -> Reference {
    let gv = GraphView::from(&g.host);
    let (n, h, k, e) = (c.frames * c.atoms, c.hidden, c.basis.size, g.host.edges());
    let (pos, phi, v, w, b) = (
        to64(&g.pos),
        to64(&o.phi),
        to64(&o.v),
        to64(&o.w),
        to64(&o.b),
    );
    let (dds, ddv) = (to64(&o.dds), to64(&o.ddv));
    let mut r = Reference {
        ds: vec![0.0; n * h],
        dv: vec![0.0; 3 * n * h],
        dphi: vec![0.0; 3 * n * h],
        dvv: vec![0.0; 3 * n * h],
        dvec: vec![0.0; 3 * e],
        dpos: vec![0.0; 3 * n],
        dw: vec![0.0; 3 * h * k],
        db: vec![0.0; 3 * h],
    };
    painn_message_forward_host(gv, &pos, &phi, &v, &w, &b, c.basis, &mut r.ds, &mut r.dv, h);
    painn_message_backward_host(
        gv,
        &pos,
        &phi,
        &v,
        &w,
        &b,
        c.basis,
        &dds,
        &ddv,
        Some(&mut r.dphi),
        Some(&mut r.dvv),
        Some(&mut r.dvec),
        h,
    );
    painn_position_backward_host(gv, &r.dvec, &mut r.dpos);
    painn_filter_backward_host(
        gv,
        &pos,
        &phi,
        &v,
        c.basis,
        &dds,
        &ddv,
        Some(&mut r.dw),
        Some(&mut r.db),
        h,
    );
    r
}

// ----------------------------------------------------------------------------- radial basis --

device_test!(radial_basis_matches_reference, |dev| {
    let mut rng = Rng::for_test("radial_basis_matches_reference");
    for kind in [RbfKind::Gaussian, RbfKind::ExpNormal] {
        for (size, cutoff) in [(1, 5.0f32), (7, 3.0), (32, 5.0), (64, 8.0)] {
            // 0, the cutoff itself, beyond it, and random distances inside.
            let mut dist = vec![0.0f32, cutoff, cutoff * 1.5];
            dist.extend((0..37).map(|_| rng.range(0.0, cutoff as f64 * 1.1) as f32));
            let mut want = vec![0.0; dist.len() * size];
            radial_basis_forward_host(&to64(&dist), &mut want, kind, size, cutoff);
            let dt = Tensor::from_slice(dev, &[dist.len()], &dist)?;
            let mut out = Tensor::zeros(dev, &[dist.len(), size])?;
            out.poison()?;
            radial_basis_forward(&dt, &mut out, kind, size, cutoff)?;
            let got = out.to_vec()?;
            close(&format!("{kind:?} K={size}"), &got, &want, 2e-5)?;
            // Zero from the cutoff on; the cutoff is 1 at r = 0.
            ensure!(
                got[size..3 * size].iter().all(|&x| x == 0.0),
                "{kind:?}: features at or beyond the cutoff are not zero"
            );
        }
    }
    Ok(())
});

#[test]
fn radial_basis_derivatives_match_finite_differences() {
    let mut rng = Rng::for_test("radial_basis_derivatives_match_finite_differences");
    for kind in [RbfKind::Gaussian, RbfKind::ExpNormal] {
        for size in [1usize, 5, 32] {
            let b = RadialBasis::new(kind, size, 5.0).unwrap();
            for _ in 0..20 {
                let r = rng.range(0.01, 5.5);
                let mut val = vec![0.0; size];
                let mut der = vec![0.0; size];
                b.eval_host(r, &mut val, Some(&mut der));
                let step = 1e-6;
                let (mut p, mut m) = (vec![0.0; size], vec![0.0; size]);
                b.eval_host(r + step, &mut p, None);
                b.eval_host(r - step, &mut m, None);
                for k in 0..size {
                    let fd = (p[k] - m[k]) / (2.0 * step);
                    assert!(
                        (fd - der[k]).abs() <= 1e-6 * fd.abs().max(1.0),
                        "{kind:?} K={size} k={k} r={r}: derivative {} vs {fd}",
                        der[k]
                    );
                }
            }
        }
    }
    for _ in 0..20 {
        let r = rng.range(0.0, 6.0);
        let (_, d) = cosine_cutoff_host(r, 5.0);
        let fd = (cosine_cutoff_host(r + 1e-6, 5.0).0 - cosine_cutoff_host(r - 1e-6, 5.0).0) / 2e-6;
        assert!((fd - d).abs() <= 1e-6, "cutoff at {r}: {d} vs {fd}");
    }
}

#[test]
fn expnormal_matches_torchmd_net_initialisation() {
    // TorchMD-Net: alpha = 5 / cutoff, means = linspace(exp(-cutoff), 1, K), betas =
    // (2 / K (1 - exp(-cutoff)))^-2: at r with exp(-alpha r) = mean_k, function k is 1.
    let (cutoff, size) = (5.0f64, 32usize);
    let b = RadialBasis::new(RbfKind::ExpNormal, size, cutoff as f32).unwrap();
    let start = (-cutoff).exp();
    for k in [0usize, 7, 31] {
        let mean = start + k as f64 * (1.0 - start) / (size - 1) as f64;
        let r = -mean.ln() / (5.0 / cutoff);
        let mut val = vec![0.0; size];
        b.eval_host(r, &mut val, None);
        assert!((val[k] - 1.0).abs() < 1e-12, "k={k}: {}", val[k]);
        let beta = (2.0 / size as f64 * (1.0 - start)).powi(-2);
        let t = (-(5.0 / cutoff) * r).exp();
        let want = (-beta * (t - (start + (k + 1) as f64 * (1.0 - start) / 31.0)).powi(2)).exp();
        if k + 1 < size {
            assert!((val[k + 1] - want).abs() < 1e-12);
        }
    }
    // Gaussian: centres k c / (K - 1), width = spacing.
    let g = RadialBasis::new(RbfKind::Gaussian, 6, 5.0).unwrap();
    let mut val = vec![0.0; 6];
    g.eval_host(2.0, &mut val, None);
    assert!((val[2] - (-0.5f64 * (2.0f64 - 2.0).powi(2)).exp()).abs() < 1e-12);
    assert!((val[3] - (-0.5f64).exp()).abs() < 1e-12);
}

// --------------------------------------------------------------------------------- messages --

device_test!(message_forward_matches_reference, |dev| {
    let mut rng = Rng::for_test("message_forward_matches_reference");
    for c in cases() {
        let g = graph(dev, &c, positions(&mut rng, &c))?;
        let n = c.frames * c.atoms;
        let o = Operands::random(&mut rng, n, c.hidden, c.basis.size);
        let want = reference(&c, &g, &o);
        let h = c.hidden;
        let t = |shape: &[usize], x: &[f32]| Tensor::from_slice(dev, shape, x);
        let mut ds = Tensor::zeros(dev, &[n, h])?;
        let mut dv = Tensor::zeros(dev, &[n, 3, h])?;
        ds.poison()?;
        dv.poison()?;
        painn_message_forward(
            &g.nl,
            &t(&[n, 3], &g.pos)?,
            &t(&[n, 3 * h], &o.phi)?,
            &t(&[n, 3, h], &o.v)?,
            &t(&[3 * h, c.basis.size], &o.w)?,
            &t(&[3 * h], &o.b)?,
            c.basis,
            &mut ds,
            &mut dv,
        )?;
        let what = format!("{c:?} ({} edges)", g.host.edges());
        close(&format!("ds {what}"), &ds.to_vec()?, &want.ds, 3e-5)?;
        close(&format!("dv {what}"), &dv.to_vec()?, &want.dv, 3e-5)?;
        if c.isolated {
            // Isolated atoms get exactly zero.
            let dsv = ds.to_vec()?;
            for f in 0..c.frames {
                let row = f * c.atoms + c.atoms - 1;
                ensure!(dsv[row * h..(row + 1) * h].iter().all(|&x| x == 0.0));
            }
        }
    }
    Ok(())
});

device_test!(message_backward_matches_reference, |dev| {
    let mut rng = Rng::for_test("message_backward_matches_reference");
    for c in cases() {
        let g = graph(dev, &c, positions(&mut rng, &c))?;
        let (n, h, k, e) = (c.frames * c.atoms, c.hidden, c.basis.size, g.host.edges());
        let o = Operands::random(&mut rng, n, h, k);
        let want = reference(&c, &g, &o);
        let t = |shape: &[usize], x: &[f32]| Tensor::from_slice(dev, shape, x);
        let (pos, phi, v) = (
            t(&[n, 3], &g.pos)?,
            t(&[n, 3 * h], &o.phi)?,
            t(&[n, 3, h], &o.v)?,
        );
        let (w, b) = (t(&[3 * h, k], &o.w)?, t(&[3 * h], &o.b)?);
        let (dds, ddv) = (t(&[n, h], &o.dds)?, t(&[n, 3, h], &o.ddv)?);
        let mut dphi = Tensor::zeros(dev, &[n, 3 * h])?;
        let mut dvv = Tensor::zeros(dev, &[n, 3, h])?;
        let mut dvec = Tensor::zeros(dev, &[e, 3])?;
        dphi.poison()?;
        dvv.poison()?;
        dvec.poison()?;
        painn_message_backward(
            &g.nl,
            &pos,
            &phi,
            &v,
            &w,
            &b,
            c.basis,
            &dds,
            &ddv,
            Some(&mut dphi),
            Some(&mut dvv),
            Some(&mut dvec),
        )?;
        let what = format!("{c:?} ({e} edges)");
        close(&format!("dphi {what}"), &dphi.to_vec()?, &want.dphi, 3e-5)?;
        close(&format!("dv {what}"), &dvv.to_vec()?, &want.dvv, 3e-5)?;
        close(&format!("dvec {what}"), &dvec.to_vec()?, &want.dvec, 1e-4)?;
        let mut dpos = Tensor::zeros(dev, &[n, 3])?;
        dpos.poison()?;
        painn_position_backward(&g.nl, &dvec, &mut dpos)?;
        close(&format!("dpos {what}"), &dpos.to_vec()?, &want.dpos, 1e-4)?;
        // Parameter gradients accumulate onto what is there.
        let w0 = rng.normal_vec(3 * h * k, 1.0);
        let b0 = rng.normal_vec(3 * h, 1.0);
        let mut dw = t(&[3 * h, k], &w0)?;
        let mut db = t(&[3 * h], &b0)?;
        painn_filter_backward(
            &g.nl,
            &pos,
            &phi,
            &v,
            c.basis,
            &dds,
            &ddv,
            Some(&mut dw),
            Some(&mut db),
            None,
        )?;
        let plus = |init: &[f32], add: &[f64]| -> Vec<f64> {
            init.iter().zip(add).map(|(&a, &b)| a as f64 + b).collect()
        };
        close(
            &format!("dw {what}"),
            &dw.to_vec()?,
            &plus(&w0, &want.dw),
            1e-4,
        )?;
        close(
            &format!("db {what}"),
            &db.to_vec()?,
            &plus(&b0, &want.db),
            1e-4,
        )?;
        // Outputs may be skipped one by one.
        let mut db_only = t(&[3 * h], &b0)?;
        painn_filter_backward(
            &g.nl,
            &pos,
            &phi,
            &v,
            c.basis,
            &dds,
            &ddv,
            None,
            Some(&mut db_only),
            None,
        )?;
        ensure!(
            db_only.to_vec()? == db.to_vec()?,
            "{what}: the bias gradient alone differs from the one computed with the weight's"
        );
        let mut dphi_only = Tensor::zeros(dev, &[n, 3 * h])?;
        dphi_only.poison()?;
        painn_message_backward(
            &g.nl,
            &pos,
            &phi,
            &v,
            &w,
            &b,
            c.basis,
            &dds,
            &ddv,
            Some(&mut dphi_only),
            None,
            None,
        )?;
        ensure!(
            dphi_only.to_vec()? == dphi.to_vec()?,
            "{what}: d_phi alone differs from d_phi computed with the rest"
        );
    }
    Ok(())
});

/// The loss sum(wds * ds) + sum(wdv * dv) of the f64 twin, as a function of one operand.
#[derive(Clone)]
struct Twin<'a> {
    g: GraphView<'a>,
    basis: RadialBasis,
    h: usize,
    pos: Vec<f64>,
    phi: Vec<f64>,
    v: Vec<f64>,
    w: Vec<f64>,
    b: Vec<f64>,
    wds: Vec<f64>,
    wdv: Vec<f64>,
}

impl Twin<'_> {
    fn loss(&self) -> f64 {
        let n = self.g.rows();
        let mut ds = vec![0.0; n * self.h];
        let mut dv = vec![0.0; 3 * n * self.h];
        painn_message_forward_host(
            self.g, &self.pos, &self.phi, &self.v, &self.w, &self.b, self.basis, &mut ds, &mut dv,
            self.h,
        );
        ds.iter().zip(&self.wds).map(|(a, b)| a * b).sum::<f64>()
            + dv.iter().zip(&self.wdv).map(|(a, b)| a * b).sum::<f64>()
    }
}

#[test]
fn message_gradients_match_finite_differences() {
    let mut rng = Rng::for_test("message_gradients_match_finite_differences");
    let dev = Device::Cpu;
    let ortho = UnitCell::from_lengths_angles(10.5, 11.0, 12.0, 90.0, 90.0, 90.0);
    for (kind, cell, hidden, size) in [
        (RbfKind::Gaussian, None, 3, 6),
        (RbfKind::ExpNormal, Some(ortho), 2, 5),
        (RbfKind::ExpNormal, None, 4, 33),
    ] {
        // No coincident pair: the gradient through u = vec / r does not exist at r = 0.
        let c = Case {
            frames: 2,
            atoms: 9,
            hidden,
            basis: basis(kind, size, 4.0),
            cell,
            coincident: false,
            isolated: cell.is_none(),
        };
        let g = graph(&dev, &c, positions(&mut rng, &c)).unwrap();
        let gv = GraphView::from(&g.host);
        let (n, h, k, e) = (c.frames * c.atoms, hidden, size, g.host.edges());
        assert!(e > 0, "{c:?}: the test graph has no edges");
        let o = Operands::random(&mut rng, n, h, k);
        let twin = Twin {
            g: gv,
            basis: c.basis,
            h,
            pos: to64(&g.pos),
            phi: to64(&o.phi),
            v: to64(&o.v),
            w: to64(&o.w),
            b: to64(&o.b),
            wds: to64(&o.dds),
            wdv: to64(&o.ddv),
        };
        let r = reference(&c, &g, &o);
        let what = format!("{kind:?} box {}", cell.is_some());
        let (step, tol) = (1e-6, 1e-6);
        let with = |set: fn(&mut Twin, &[f64])| {
            let twin = &twin;
            move |x: &[f64]| {
                let mut t = twin.clone();
                set(&mut t, x);
                t.loss()
            }
        };
        check_gradient(
            &format!("{what}: phi"),
            with(|t, x| t.phi = x.to_vec()),
            &twin.phi,
            &r.dphi,
            step,
            tol,
        )
        .unwrap();
        check_gradient(
            &format!("{what}: v"),
            with(|t, x| t.v = x.to_vec()),
            &twin.v,
            &r.dvv,
            step,
            tol,
        )
        .unwrap();
        check_gradient(
            &format!("{what}: w_filter"),
            with(|t, x| t.w = x.to_vec()),
            &twin.w,
            &r.dw,
            step,
            tol,
        )
        .unwrap();
        check_gradient(
            &format!("{what}: b_filter"),
            with(|t, x| t.b = x.to_vec()),
            &twin.b,
            &r.db,
            step,
            tol,
        )
        .unwrap();
        check_gradient(
            &format!("{what}: positions"),
            with(|t, x| t.pos = x.to_vec()),
            &twin.pos,
            &r.dpos,
            step,
            tol,
        )
        .unwrap();
        // The checker itself must catch a wrong gradient.
        let wrong: Vec<f64> = r.dpos.iter().map(|g| g * 1.01 + 1e-3).collect();
        assert!(check_gradient(
            "wrong",
            with(|t, x| t.pos = x.to_vec()),
            &twin.pos,
            &wrong,
            step,
            tol
        )
        .is_err());
    }
}

#[test]
fn coincident_atoms_give_finite_values_and_gradients() {
    // Two atoms on top of each other and a third nearby: u = 0 for the pair, everything finite.
    let pos: Vec<f32> = vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 2.5, 2.0, 3.0];
    let pt = Tensor::from_slice(&Device::Cpu, &[3, 3], &pos).unwrap();
    let nl = NeighborList::build(&pt, 5.0, None, None).unwrap();
    let host = nl.to_host().unwrap();
    assert_eq!(host.edges(), 6);
    let mut rng = Rng::for_test("coincident_atoms_give_finite_values_and_gradients");
    let (h, k) = (4, 8);
    for kind in [RbfKind::Gaussian, RbfKind::ExpNormal] {
        let o = Operands::random(&mut rng, 3, h, k);
        let c = Case {
            frames: 1,
            atoms: 3,
            hidden: h,
            basis: basis(kind, k, 5.0),
            cell: None,
            coincident: true,
            isolated: false,
        };
        let g = Graph {
            pos: pos.clone(),
            nl: host.to_device(&Device::Cpu).unwrap(),
            host: host.clone(),
        };
        let r = reference(&c, &g, &o);
        for (name, x) in [
            ("ds", &r.ds),
            ("dv", &r.dv),
            ("dphi", &r.dphi),
            ("dvec", &r.dvec),
            ("dpos", &r.dpos),
            ("dw", &r.dw),
        ] {
            assert!(x.iter().all(|v| v.is_finite()), "{kind:?} {name}: {x:?}");
        }
        // The coincident pair's edges carry no direction: dvec is 0 for both.
        for e in 0..host.edges() {
            let (i, j) = (
                (0..3).find(|&i| host.row_ptr[i + 1] as usize > e).unwrap(),
                host.col[e] as usize,
            );
            if i < 2 && j < 2 {
                let dr = &r.dvec[3 * e..3 * e + 3];
                assert!(dr.iter().all(|&x| x == 0.0), "edge {e}: {dr:?}");
            }
        }
    }
}

device_test!(split3_round_trips, |dev| {
    let mut rng = Rng::for_test("split3_round_trips");
    for (n, h) in [(1, 1), (7, 5), (300, 33)] {
        let x = rng.normal_vec(3 * n * h, 1.0);
        let xt = Tensor::from_slice(dev, &[n, 3 * h], &x)?;
        let mut parts = [
            Tensor::zeros(dev, &[n, h])?,
            Tensor::zeros(dev, &[n, h])?,
            Tensor::zeros(dev, &[n, h])?,
        ];
        for p in &mut parts {
            p.poison()?;
        }
        let [a, b, c] = &mut parts;
        painn_split3_forward(&xt, a, b, c)?;
        for (m, p) in parts.iter().enumerate() {
            let want: Vec<f32> = (0..n)
                .flat_map(|r| x[r * 3 * h + m * h..r * 3 * h + (m + 1) * h].to_vec())
                .collect();
            ensure!(p.to_vec()? == want, "split3 {n}x{h} part {m}");
        }
        let mut dx = Tensor::zeros(dev, &[n, 3 * h])?;
        dx.poison()?;
        painn_split3_backward(&parts[0], &parts[1], &parts[2], &mut dx)?;
        ensure!(dx.to_vec()? == x, "split3 backward {n}x{h}");
    }
    Ok(())
});

device_test!(message_ops_reject_bad_shapes, |dev| {
    let pos = Tensor::from_slice(dev, &[3, 3], &[0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.5, 0.0])?;
    let nl = NeighborList::build(&pos, 3.0, None, None)?;
    let b4 = basis(RbfKind::Gaussian, 4, 3.0);
    let z = |shape: &[usize]| Tensor::<f32>::zeros(dev, shape);
    let (mut ds, mut dv) = (z(&[3, 2])?, z(&[3, 3, 2])?);
    // phi of the wrong width.
    let err = painn_message_forward(
        &nl,
        &pos,
        &z(&[3, 5])?,
        &z(&[3, 3, 2])?,
        &z(&[6, 4])?,
        &z(&[6])?,
        b4,
        &mut ds,
        &mut dv,
    )
    .expect_err("phi [3, 5] is not [N, 3H]");
    ensure!(
        format!("{err:#}").contains("painn_message_forward: phi"),
        "{err:#}"
    );
    // A filter for another basis size.
    let err = painn_message_forward(
        &nl,
        &pos,
        &z(&[3, 6])?,
        &z(&[3, 3, 2])?,
        &z(&[6, 5])?,
        &z(&[6])?,
        b4,
        &mut ds,
        &mut dv,
    )
    .expect_err("w [6, 5] with K = 4");
    ensure!(format!("{err:#}").contains("filter weight"), "{err:#}");
    ensure!(RadialBasis::new(RbfKind::Gaussian, 65, 5.0).is_err());
    ensure!(RadialBasis::new(RbfKind::Gaussian, 8, -1.0).is_err());
    Ok(())
});

// --------------------------------------------------------------------------------- backbone --

fn small_config(kind: &str, layers: usize) -> BackboneConfig {
    BackboneConfig::from_toml(&format!(
        "hidden = 8\nlayers = {layers}\nrbf = 6\nrbf_kind = \"{kind}\"\ncutoff = 4.5\nseed = 3\n"
    ))
    .unwrap()
}

/// Frames of atoms with atomic numbers, for the backbone.
struct Molecule {
    frames: usize,
    atoms: usize,
    pos: Vec<f32>,
    z: Vec<i32>,
    cell: Option<UnitCell>,
}

impl Molecule {
    fn random(rng: &mut Rng, frames: usize, atoms: usize, cell: Option<UnitCell>) -> Self {
        let c = Case {
            frames,
            atoms,
            hidden: 1,
            basis: basis(RbfKind::Gaussian, 1, 4.5),
            cell,
            coincident: false,
            isolated: cell.is_none(),
        };
        let z = (0..atoms).map(|_| [1, 6, 7, 8, 16][rng.below(5)]).collect();
        Self {
            frames,
            atoms,
            pos: positions(rng, &c),
            z,
            cell,
        }
    }

    fn index(&self, dev: &Device) -> Result<Arc<DeviceEmbeddingIndex>> {
        Ok(Arc::new(
            EmbeddingIndex::new(&self.z, ELEMENTS)?.to_device(dev)?,
        ))
    }

    fn list(&self, dev: &Device, pos: &[f32]) -> Result<Arc<NeighborList>> {
        let pt = Tensor::from_slice(dev, &[self.frames, self.atoms, 3], pos)?;
        let cells = self.cell.map(|c| vec![c]);
        Ok(Arc::new(NeighborList::build(
            &pt,
            4.5,
            cells.as_deref(),
            None,
        )?))
    }
}

/// What a backbone run returns: per-atom scalars and vectors, the denoising head's output and
/// (when backpropagated) the positions' gradient.
type Outputs = (Vec<f32>, Vec<f32>, Vec<f32>, Option<Vec<f32>>);

/// Runs the backbone and the denoising head at `pos` (the list fixed); returns (s, v, head) and,
/// with `seed` given, backpropagates sum(seed * head) and returns the positions' gradient.
fn run_backbone(
    model: &Backbone,
    tape: &mut Tape,
    mol: &Molecule,
    z: &Arc<DeviceEmbeddingIndex>,
    nl: &Arc<NeighborList>,
    pos: &[f32],
    seed: Option<&[f32]>,
) -> Result<Outputs> {
    tape.reset();
    let dev = tape.device().clone();
    let n = mol.frames * mol.atoms;
    let pt = Tensor::from_slice(&dev, &[n, 3], pos)?;
    let p = if seed.is_some() {
        tape.input_with_grad(pt)?
    } else {
        tape.input(pt)?
    };
    let (s, v) = model.forward(tape, p, z, nl)?;
    let d = model.denoise_head(tape, s, v)?;
    let out = (
        tape.value(s).to_vec()?,
        tape.value(v).to_vec()?,
        tape.value(d).to_vec()?,
    );
    let mut dpos = None;
    if let Some(seed) = seed {
        tape.params_mut().zero_grads()?;
        let g = Tensor::from_slice(&dev, &[n, 3], seed)?;
        tape.backward(d, g)?;
        dpos = Some(tape.grad(p).expect("positions get a gradient").to_vec()?);
    }
    Ok((out.0, out.1, out.2, dpos))
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

device_test!(backbone_gradient_matches_finite_differences, |dev| {
    let mut rng = Rng::for_test("backbone_gradient_matches_finite_differences");
    let ortho = UnitCell::from_lengths_angles(10.0, 10.5, 11.0, 90.0, 90.0, 90.0);
    for (kind, cell) in [("expnormal", None), ("gaussian", Some(ortho))] {
        let mol = Molecule::random(&mut rng, 2, if is_emu(dev) { 9 } else { 12 }, cell);
        let (z, nl) = (mol.index(dev)?, mol.list(dev, &mol.pos)?);
        let (model, ps) = Backbone::create(small_config(kind, 2), dev)?;
        let mut tape = Tape::new(ps, 1);
        tape.set_poison(true);
        let n = mol.frames * mol.atoms;
        let w = rng.normal_vec(3 * n, 1.0);
        let (_, _, _, dpos) = run_backbone(&model, &mut tape, &mol, &z, &nl, &mol.pos, Some(&w))?;
        let dpos = dpos.unwrap();
        let names = tape.params().names().to_vec();
        let ids: Vec<_> = names.iter().map(|n| tape.params().id(n).unwrap()).collect();
        let base: Vec<Vec<f32>> = ids
            .iter()
            .map(|&i| tape.params().value(i).to_vec())
            .collect::<Result<_>>()?;
        let grads: Vec<Vec<f32>> = ids
            .iter()
            .map(|&i| tape.params().grad(i).to_vec())
            .collect::<Result<_>>()?;
        let loss_at = |tape: &mut Tape, dir: &[Vec<f32>], dpos_dir: &[f32], eps: f64| {
            for (m, &id) in ids.iter().enumerate() {
                let moved: Vec<f32> = base[m]
                    .iter()
                    .zip(&dir[m])
                    .map(|(&p, &d)| (p as f64 + eps * d as f64) as f32)
                    .collect();
                tape.params_mut().value_mut(id).copy_from_slice(&moved)?;
            }
            let pos: Vec<f32> = mol
                .pos
                .iter()
                .zip(dpos_dir)
                .map(|(&p, &d)| (p as f64 + eps * d as f64) as f32)
                .collect();
            let (_, _, head, _) = run_backbone(&model, tape, &mol, &z, &nl, &pos, None)?;
            Ok::<f64, anyhow::Error>(dot(&head, &w))
        };
        let zeros: Vec<Vec<f32>> = base.iter().map(|b| vec![0.0; b.len()]).collect();
        let no_pos = vec![0.0f32; 3 * n];
        let mut directions: Vec<(String, Vec<Vec<f32>>, Vec<f32>)> = Vec::new();
        for (m, name) in names.iter().enumerate() {
            let mut d = zeros.clone();
            d[m] = rng.normal_vec(base[m].len(), 1.0);
            directions.push((name.clone(), d, no_pos.clone()));
        }
        directions.push((
            "positions".into(),
            zeros.clone(),
            rng.normal_vec(3 * n, 1.0),
        ));
        directions.push((
            "everything".into(),
            base.iter().map(|b| rng.normal_vec(b.len(), 1.0)).collect(),
            rng.normal_vec(3 * n, 1.0),
        ));
        for (what, dir, dpos_dir) in &directions {
            let analytic: f64 =
                grads.iter().zip(dir).map(|(g, d)| dot(g, d)).sum::<f64>() + dot(&dpos, dpos_dir);
            let scale: f64 = grads
                .iter()
                .zip(dir)
                .flat_map(|(g, d)| g.iter().zip(d).map(|(&a, &b)| (a as f64 * b as f64).abs()))
                .chain(
                    dpos.iter()
                        .zip(dpos_dir)
                        .map(|(&a, &b)| (a as f64 * b as f64).abs()),
                )
                .sum::<f64>()
                .max(1e-2);
            let (fd, fd_err) = central_difference(|e| loss_at(&mut tape, dir, dpos_dir, e), 2e-3)?;
            ensure!(
                (fd - analytic).abs() <= 2e-2 * scale + fd_err,
                "{kind}: {what}: directional derivative by the tape {analytic:.6e}, by finite \
                 differences {fd:.6e} (scale {scale:.3e}, the difference's own error {fd_err:.1e})"
            );
        }
    }
    Ok(())
});

/// `x [rows, 3, h]` with every xyz triple rotated.
fn rotate_vectors(rot: &[[f64; 3]; 3], x: &[f32], h: usize) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for r in 0..x.len() / (3 * h) {
        for c in 0..h {
            for i in 0..3 {
                out[(3 * r + i) * h + c] = (0..3)
                    .map(|k| rot[i][k] * x[(3 * r + k) * h + c] as f64)
                    .sum();
            }
        }
    }
    out
}

/// max |got - want| / max |want| <= tol.
fn relative(what: &str, got: &[f32], want: &[f64], tol: f64) -> Result<()> {
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs())).max(1e-30);
    let err = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
    ensure!(
        err <= tol * scale && got.iter().all(|g| g.is_finite()),
        "{what}: max error {err:.3e} is more than {tol:.0e} of the largest value {scale:.3e}"
    );
    Ok(())
}

device_test!(backbone_is_rotation_and_translation_equivariant, |dev| {
    let mut rng = Rng::for_test("backbone_is_rotation_and_translation_equivariant");
    for kind in ["gaussian", "expnormal"] {
        let mol = Molecule::random(&mut rng, 2, if is_emu(dev) { 11 } else { 20 }, None);
        let z = mol.index(dev)?;
        let (model, ps) = Backbone::create(small_config(kind, 3), dev)?;
        let mut tape = Tape::new(ps, 1);
        let rot = rng.rotation();
        let shift = [0, 1, 2].map(|_| rng.range(-10.0, 10.0));
        let moved: Vec<f32> = mol
            .pos
            .chunks(3)
            .flat_map(|p| {
                (0..3).map(move |i| {
                    ((0..3).map(|k| rot[i][k] * p[k] as f64).sum::<f64>() + shift[i]) as f32
                })
            })
            .collect();
        let nl = mol.list(dev, &mol.pos)?;
        let nl_moved = mol.list(dev, &moved)?;
        let (s, v, head, _) = run_backbone(&model, &mut tape, &mol, &z, &nl, &mol.pos, None)?;
        let (s2, v2, head2, _) =
            run_backbone(&model, &mut tape, &mol, &z, &nl_moved, &moved, None)?;
        let h = model.config().hidden;
        relative(&format!("{kind}: s"), &s2, &to64(&s), 1e-4)?;
        relative(
            &format!("{kind}: v"),
            &v2,
            &rotate_vectors(&rot, &v, h),
            1e-4,
        )?;
        relative(
            &format!("{kind}: denoising head"),
            &head2,
            &rotate_vectors(&rot, &head, 1),
            1e-4,
        )?;
    }
    Ok(())
});

device_test!(backbone_repeat_runs_are_bit_identical, |dev| {
    let mut rng = Rng::for_test("backbone_repeat_runs_are_bit_identical");
    let mol = Molecule::random(&mut rng, 2, if is_emu(dev) { 10 } else { 16 }, None);
    let (z, nl) = (mol.index(dev)?, mol.list(dev, &mol.pos)?);
    let seed = rng.normal_vec(3 * mol.frames * mol.atoms, 1.0);
    let mut runs = Vec::new();
    for _ in 0..2 {
        // A fresh model and tape each time: the same seed gives the same parameters too.
        let (model, ps) = Backbone::create(small_config("expnormal", 2), dev)?;
        let mut tape = Tape::new(ps, 1);
        let mut out = Vec::new();
        for _ in 0..2 {
            let (s, v, head, dpos) =
                run_backbone(&model, &mut tape, &mol, &z, &nl, &mol.pos, Some(&seed))?;
            let ps = tape.params();
            let grads: Vec<Vec<f32>> = ps
                .names()
                .iter()
                .map(|n| ps.grad(ps.id(n).unwrap()).to_vec())
                .collect::<Result<_>>()?;
            out.push((s, v, head, dpos, grads));
        }
        runs.push(out);
    }
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let first = &runs[0][0];
    for (r, run) in runs.iter().enumerate() {
        for (k, o) in run.iter().enumerate() {
            ensure!(
                bits(&o.0) == bits(&first.0)
                    && bits(&o.1) == bits(&first.1)
                    && bits(&o.2) == bits(&first.2)
                    && bits(o.3.as_ref().unwrap()) == bits(first.3.as_ref().unwrap()),
                "run {r} step {k}: outputs differ bitwise"
            );
            for (g, g0) in o.4.iter().zip(&first.4) {
                ensure!(bits(g) == bits(g0), "run {r} step {k}: gradients differ");
            }
        }
    }
    Ok(())
});

device_test!(
    backbone_trains_with_frozen_parts_and_plain_positions,
    |dev| {
        // Positions without a gradient and a frozen embedding: the backward skips both.
        let mut rng = Rng::for_test("backbone_trains_with_frozen_parts_and_plain_positions");
        let mol = Molecule::random(&mut rng, 1, 8, None);
        let (z, nl) = (mol.index(dev)?, mol.list(dev, &mol.pos)?);
        let (model, mut ps) = Backbone::create(small_config("gaussian", 1), dev)?;
        let emb = ps.id("embedding.weight").unwrap();
        ps.freeze(emb);
        let mut tape = Tape::new(ps, 1);
        tape.set_poison(true);
        let pt = Tensor::from_slice(dev, &[mol.atoms, 3], &mol.pos)?;
        let p = tape.input(pt)?;
        let (s, v) = model.forward(&mut tape, p, &z, &nl)?;
        let d = model.denoise_head(&mut tape, s, v)?;
        let seed = Tensor::from_slice(dev, &[mol.atoms, 3], &rng.normal_vec(3 * mol.atoms, 1.0))?;
        tape.backward(d, seed)?;
        ensure!(tape.grad(p).is_none());
        let ps = tape.params();
        ensure!(ps.grad(emb).to_vec()?.iter().all(|&g| g == 0.0));
        let f = ps.id("layer0.interaction.filter.weight").unwrap();
        let g = ps.grad(f).to_vec()?;
        ensure!(g.iter().all(|x| x.is_finite()) && g.iter().any(|&x| x != 0.0));
        Ok(())
    }
);

#[test]
fn backbone_config_reads_toml() {
    let c = BackboneConfig::from_toml("").unwrap();
    assert_eq!(c, BackboneConfig::default());
    assert_eq!(
        (c.hidden, c.layers, c.rbf, c.cutoff),
        (64, 3, 32, 5.0),
        "defaults"
    );
    let c = BackboneConfig::from_toml("hidden = 16\nrbf_kind = \"gaussian\"\nseed = 9").unwrap();
    assert_eq!(c.rbf_kind, RbfKind::Gaussian);
    assert_eq!((c.hidden, c.seed), (16, 9));
    let c = BackboneConfig::from_toml("rbf_kind = \"expnormal\"").unwrap();
    assert_eq!(c.rbf_kind, RbfKind::ExpNormal);
    for bad in [
        "hiden = 3",
        "rbf_kind = \"bessel\"",
        "hidden = 0",
        "hidden = 257",
        "rbf = 65",
        "cutoff = -1.0",
        "layers = 0",
    ] {
        assert!(BackboneConfig::from_toml(bad).is_err(), "{bad:?} accepted");
    }
    // The neighbor list must reach the basis cutoff.
    let dev = Device::Cpu;
    let (model, ps) = Backbone::create(small_config("gaussian", 1), &dev).unwrap();
    let mut tape = Tape::new(ps, 0);
    let pos = Tensor::from_slice(&dev, &[2, 3], &[0.0, 0.0, 0.0, 1.0, 0.0, 0.0]).unwrap();
    let nl = Arc::new(NeighborList::build(&pos, 3.0, None, None).unwrap());
    let z = Arc::new(
        EmbeddingIndex::new(&[6, 8], ELEMENTS)
            .unwrap()
            .to_device(&dev)
            .unwrap(),
    );
    let p = tape.input(pos).unwrap();
    let err = model
        .forward(&mut tape, p, &z, &nl)
        .expect_err("cutoff 3 < 4.5");
    assert!(
        format!("{err:#}").contains("below the basis cutoff"),
        "{err:#}"
    );
}
