//! Atom-stage neighbor list (src/ops/neighbor_list.rs, cuda/neighbor_list.cu): on every device
//! the CSR equals the CPU twin's bit for bit and its pairs equal the brute-force f64 reference,
//! across cutoffs 3-10 A, 1-64 frames, open / orthorhombic / skewed triclinic boxes, 1 to a few
//! thousand atoms (50,000 on cpu and cuda), protein-like density, clusters, coincident atoms,
//! padding, atoms far outside the box, grids of one or two cells per axis; the CSR invariants
//! (sorted rows, reverse[reverse[e]] == e, antisymmetric shifts, edge counts); rotation and
//! translation invariance; and the errors.

use anyhow::{ensure, Context, Result};
use hiermd::ops::neighbor_list::{
    neighbor_list_host, neighbor_pairs_reference, HostNeighborList, NeighborList,
};
use hiermd::testing::Rng;
use hiermd::traj::UnitCell;
use hiermd::{device_test, Device, Tensor};

fn is_emu(dev: &Device) -> bool {
    matches!(dev, Device::Emu(_))
}

/// `atoms` protein-like positions at `density` atoms / A^3 in a ball: most atoms bonded (1.2-1.6
/// A) to the previous one, the rest anywhere in the ball; shifted by `offset`.
fn protein_like(rng: &mut Rng, atoms: usize, density: f64, offset: [f64; 3]) -> Vec<f32> {
    let radius = (atoms as f64 / density * 3.0 / (4.0 * std::f64::consts::PI)).cbrt();
    let in_ball = |rng: &mut Rng| loop {
        let p = [0, 1, 2].map(|_| rng.range(-radius, radius));
        if p.iter().map(|x| x * x).sum::<f64>() <= radius * radius {
            return p;
        }
    };
    let mut out: Vec<f32> = Vec::with_capacity(3 * atoms);
    let mut prev = in_ball(rng);
    for a in 0..atoms {
        let p = if a > 0 && rng.uniform() < 0.7 {
            let mut q;
            let mut tries = 0;
            loop {
                let d = [rng.normal(), rng.normal(), rng.normal()];
                let len = (d.iter().map(|x| x * x).sum::<f64>()).sqrt().max(1e-9);
                let bond = rng.range(1.2, 1.6);
                q = [0, 1, 2].map(|k| prev[k] + d[k] / len * bond);
                tries += 1;
                if q.iter().map(|x| x * x).sum::<f64>() <= radius * radius || tries > 20 {
                    break;
                }
            }
            q
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

/// Perpendicular widths of a box (distance between opposite faces).
fn widths(cell: &UnitCell) -> [f64; 3] {
    let v = cell.vectors.map(|r| r.map(|x| x as f64));
    let cross = |p: [f64; 3], q: [f64; 3]| {
        [
            p[1] * q[2] - p[2] * q[1],
            p[2] * q[0] - p[0] * q[2],
            p[0] * q[1] - p[1] * q[0],
        ]
    };
    let dot = |p: [f64; 3], q: [f64; 3]| p[0] * q[0] + p[1] * q[1] + p[2] * q[2];
    let det = dot(v[0], cross(v[1], v[2])).abs();
    [cross(v[1], v[2]), cross(v[2], v[0]), cross(v[0], v[1])].map(|n| det / dot(n, n).sqrt())
}

/// Box shapes: orthorhombic, or skewed triclinic (angles far from 90 degrees).
#[derive(Clone, Copy, Debug)]
enum Shape {
    Orthorhombic,
    Triclinic,
}

/// A box of the shape holding `atoms` at about `density`, scaled up if needed so that its
/// smallest width exceeds `min_width`.
fn make_box(rng: &mut Rng, shape: Shape, atoms: usize, density: f64, min_width: f64) -> UnitCell {
    let (ratios, angles) = match shape {
        Shape::Orthorhombic => (
            [1.0, rng.range(0.8, 1.25), rng.range(0.8, 1.25)],
            [90.0, 90.0, 90.0],
        ),
        // Skewed well past a reduced box, the truncated octahedron's angles nearby.
        Shape::Triclinic => (
            [1.0, rng.range(0.9, 1.1), rng.range(0.9, 1.1)],
            [
                rng.range(60.0, 80.0),
                rng.range(100.0, 115.0),
                rng.range(60.0, 75.0),
            ],
        ),
    };
    let unit = UnitCell::from_lengths_angles(
        ratios[0], ratios[1], ratios[2], angles[0], angles[1], angles[2],
    );
    // Volume of the unit-scale box: the determinant of its rows.
    let v = unit.vectors.map(|r| r.map(|x| x as f64));
    let det = (v[0][0] * (v[1][1] * v[2][2] - v[1][2] * v[2][1])
        - v[0][1] * (v[1][0] * v[2][2] - v[1][2] * v[2][0])
        + v[0][2] * (v[1][0] * v[2][1] - v[1][1] * v[2][0]))
        .abs();
    let mut scale = (atoms as f64 / density / det).cbrt();
    let w_min = widths(&unit).iter().copied().fold(f64::INFINITY, f64::min);
    scale = scale.max(min_width / w_min);
    UnitCell::from_lengths_angles(
        ratios[0] * scale,
        ratios[1] * scale,
        ratios[2] * scale,
        angles[0],
        angles[1],
        angles[2],
    )
}

/// Atoms uniform in the box, a third of them moved out by random lattice vectors (a few by
/// hundreds of box lengths), so that the build must wrap them.
fn periodic_frame(rng: &mut Rng, cell: &UnitCell, atoms: usize) -> Vec<f32> {
    let v = cell.vectors.map(|r| r.map(|x| x as f64));
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

/// A mask with about 10% padding atoms, whose coordinates become NaN (padding is never read).
fn random_mask(rng: &mut Rng, pos: &mut [f32]) -> Vec<u8> {
    (0..pos.len() / 3)
        .map(|g| {
            if rng.uniform() < 0.1 {
                pos[3 * g..3 * g + 3].fill(f32::NAN);
                0
            } else {
                1
            }
        })
        .collect()
}

/// Inverse of a box (rows a, b, c): s = x inv.
fn box_inverse(cell: &UnitCell) -> [[f64; 3]; 3] {
    let m = cell.vectors.map(|r| r.map(|x| x as f64));
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    let mut inv = [[0.0; 3]; 3];
    for (r, row) in inv.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            let (r1, r2) = ((c + 1) % 3, (c + 2) % 3);
            let (c1, c2) = ((r + 1) % 3, (r + 2) % 3);
            *v = (m[r1][c1] * m[r2][c2] - m[r1][c2] * m[r2][c1]) / det;
        }
    }
    inv
}

/// One build case.
struct Case<'a> {
    what: String,
    pos: &'a [f32],
    frames: usize,
    atoms: usize,
    cutoff: f32,
    cells: Option<&'a [UnitCell]>,
    mask: Option<&'a [u8]>,
}

impl Case<'_> {
    /// Builds on `dev` and checks: identical to the CPU twin (bit for bit), the invariants, the
    /// pairs equal to the brute-force reference when `reference`, every edge shorter than the
    /// cutoff with a lattice-vector shift. Returns the host copy.
    fn check(&self, dev: &Device, reference: bool) -> Result<HostNeighborList> {
        let what = &self.what;
        let (f, a) = (self.frames, self.atoms);
        let positions = Tensor::from_slice(dev, &[f, a, 3], self.pos)?;
        let mask = match self.mask {
            Some(m) => Some(Tensor::from_slice(dev, &[f, a], m)?),
            None => None,
        };
        let nl = NeighborList::build(&positions, self.cutoff, self.cells, mask.as_ref())
            .with_context(|| format!("{what}: build"))?;
        ensure!(
            nl.rows() == f * a && nl.frames() == f && nl.atoms_per_frame() == a,
            "{what}: sizes"
        );
        let got = nl.to_host()?;
        got.validate()
            .with_context(|| format!("{what}: invariants"))?;
        let twin = neighbor_list_host(self.pos, f, a, self.cutoff, self.cells, self.mask)?;
        ensure!(
            got == twin,
            "{what}: the {} CSR differs from the CPU twin's ({} vs {} edges)",
            dev.name(),
            got.edges(),
            twin.edges()
        );
        ensure!(
            got.edges() == nl.edges()
                && got.row_ptr[f * a] as usize == got.edges()
                && got.edges() % 2 == 0,
            "{what}: edge counts"
        );
        ensure!(
            got.shift.is_some() == self.cells.is_some()
                && nl.shift().is_some_and(|s| s.shape() == [got.edges(), 3])
                    == self.cells.is_some(),
            "{what}: shift presence"
        );
        if reference {
            let want =
                neighbor_pairs_reference(self.pos, f, a, self.cutoff, self.cells, self.mask)?;
            let have = got.pairs();
            if have != want {
                let missing = want.iter().find(|p| have.binary_search(p).is_err());
                let extra = have.iter().find(|p| want.binary_search(p).is_err());
                anyhow::bail!(
                    "{what}: {} pairs, the reference has {} (first missing {missing:?}, first \
                     extra {extra:?})",
                    have.len(),
                    want.len()
                );
            }
        }
        self.check_geometry(&got)?;
        Ok(got)
    }

    /// Every edge: padding never appears, |x_j + shift - x_i| < cutoff (f64, with room for the
    /// f32 rounding of the shift), and the shift is an integer combination of the box vectors.
    fn check_geometry(&self, g: &HostNeighborList) -> Result<()> {
        let what = &self.what;
        let c = self.cutoff as f64;
        for i in 0..g.rows() {
            let f = i / g.atoms;
            let inv = self
                .cells
                .map(|cs| box_inverse(&cs[if cs.len() == 1 { 0 } else { f }]));
            for e in g.row_ptr[i] as usize..g.row_ptr[i + 1] as usize {
                let j = g.col[e] as usize;
                ensure!(
                    self.mask.is_none_or(|m| m[i] != 0 && m[j] != 0),
                    "{what}: edge {e} ({j} -> {i}) touches padding"
                );
                let s: [f64; 3] = match &g.shift {
                    Some(s) => [0, 1, 2].map(|k| s[3 * e + k] as f64),
                    None => [0.0; 3],
                };
                let d: f64 = (0..3)
                    .map(|k| {
                        (self.pos[3 * j + k] as f64 + s[k] - self.pos[3 * i + k] as f64).powi(2)
                    })
                    .sum::<f64>()
                    .sqrt();
                let slack = 1e-6 * s.iter().map(|x| x.abs()).sum::<f64>();
                ensure!(
                    d < c + slack,
                    "{what}: edge {e} ({j} -> {i}) has length {d}, cutoff {c}"
                );
                if let Some(inv) = inv {
                    let fractional = (0..3).map(|k| (0..3).map(|r| s[r] * inv[r][k]).sum::<f64>());
                    for m in fractional {
                        ensure!(
                            (m - m.round()).abs() < 1e-3 + 1e-6 * m.abs(),
                            "{what}: edge {e} shift {s:?} is not a lattice vector ({m})"
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

device_test!(open_boundaries_match_reference, |dev| {
    let mut rng = Rng::for_test("open_boundaries_match_reference");
    let emu = is_emu(dev);
    // (frames, atoms): single atoms, ragged sizes, many small frames, a few thousand atoms.
    let sizes: &[(usize, usize)] = if emu {
        &[(1, 1), (1, 2), (3, 17), (64, 40), (16, 300), (1, 2500)]
    } else {
        &[
            (1, 1),
            (1, 2),
            (3, 17),
            (64, 40),
            (16, 300),
            (2, 2500),
            (1, 6000),
        ]
    };
    for &(frames, atoms) in sizes {
        for cutoff in [3.0f32, 5.0, 7.5, 10.0] {
            if emu && atoms >= 2500 && cutoff > 5.0 {
                continue;
            }
            let density = rng.range(0.05, 0.1);
            let pos = open_frames(&mut rng, frames, atoms, density);
            Case {
                what: format!("open F={frames} A={atoms} cutoff={cutoff} density={density:.3}"),
                pos: &pos,
                frames,
                atoms,
                cutoff,
                cells: None,
                mask: None,
            }
            .check(dev, true)?;
        }
    }
    Ok(())
});

device_test!(periodic_boxes_match_reference, |dev| {
    let mut rng = Rng::for_test("periodic_boxes_match_reference");
    let emu = is_emu(dev);
    let sizes: &[(usize, usize)] = if emu {
        &[(1, 1), (1, 5), (4, 60), (64, 30), (8, 700), (1, 2000)]
    } else {
        &[(1, 1), (1, 5), (4, 60), (64, 30), (8, 700), (2, 4000)]
    };
    for shape in [Shape::Orthorhombic, Shape::Triclinic] {
        for &(frames, atoms) in sizes {
            for cutoff in [3.0f32, 5.0, 10.0] {
                // Small boxes at 10 A hold a handful of cells: every atom a candidate.
                if atoms >= 2000 && cutoff > 5.0 {
                    continue;
                }
                let density = rng.range(0.05, 0.1);
                // Per-frame boxes; the smallest allowed: just over twice the cutoff.
                let cells: Vec<UnitCell> = (0..frames)
                    .map(|_| make_box(&mut rng, shape, atoms, density, 2.05 * cutoff as f64))
                    .collect();
                let pos: Vec<f32> = cells
                    .iter()
                    .flat_map(|c| periodic_frame(&mut rng, c, atoms))
                    .collect();
                Case {
                    what: format!("{shape:?} F={frames} A={atoms} cutoff={cutoff}"),
                    pos: &pos,
                    frames,
                    atoms,
                    cutoff,
                    cells: Some(&cells),
                    mask: None,
                }
                .check(dev, true)?;
            }
        }
    }
    Ok(())
});

device_test!(clusters_coincident_atoms_and_padding, |dev| {
    let mut rng = Rng::for_test("clusters_coincident_atoms_and_padding");
    let (frames, atoms) = (3, if is_emu(dev) { 900 } else { 2000 });
    for masked in [false, true] {
        for periodic in [false, true] {
            // Dense clusters (density ~1 /A^3) far apart, a tenth of the atoms duplicated exactly.
            let mut pos = Vec::new();
            let cells: Vec<UnitCell> = (0..frames)
                .map(|_| UnitCell::from_lengths_angles(900.0, 700.0, 800.0, 75.0, 100.0, 70.0))
                .collect();
            for _ in 0..frames {
                let centres: Vec<[f64; 3]> = (0..8)
                    .map(|_| [0, 1, 2].map(|_| rng.range(-2000.0, 2000.0)))
                    .collect();
                let mut frame: Vec<f32> = Vec::with_capacity(3 * atoms);
                for a in 0..atoms {
                    if a > 0 && rng.uniform() < 0.1 {
                        let src = rng.below(a);
                        let p: Vec<f32> = frame[3 * src..3 * src + 3].to_vec();
                        frame.extend(p);
                    } else {
                        let c = centres[rng.below(centres.len())];
                        frame.extend((0..3).map(|k| (c[k] + rng.normal() * 4.0) as f32));
                    }
                }
                pos.extend(frame);
            }
            let mask = masked.then(|| random_mask(&mut rng, &mut pos));
            let case = Case {
                what: format!("clusters masked={masked} periodic={periodic}"),
                pos: &pos,
                frames,
                atoms,
                cutoff: 5.0,
                cells: periodic.then_some(&cells[..]),
                mask: mask.as_deref(),
            };
            let g = case.check(dev, true)?;
            // Coincident atoms are edges (distance 0), in both directions.
            let zero = (0..g.rows()).any(|i| {
                (g.row_ptr[i] as usize..g.row_ptr[i + 1] as usize).any(|e| {
                    let j = g.col[e] as usize;
                    pos[3 * i..3 * i + 3] == pos[3 * j..3 * j + 3]
                        && g.shift
                            .as_ref()
                            .is_none_or(|s| s[3 * e..3 * e + 3] == [0.0; 3])
                })
            });
            ensure!(zero, "{}: no zero-length edge found", case.what);
        }
    }
    Ok(())
});

device_test!(one_and_two_cells_per_axis_and_the_cell_cap, |dev| {
    let mut rng = Rng::for_test("one_and_two_cells_per_axis_and_the_cell_cap");
    let cutoff = 5.0f32;
    // Widths just over 2, 3 and 4 cutoffs: 2, 3 or 4 cells per axis, every image reached through
    // wrapped neighbour cells; few atoms in a large box: the cell cap forces one cell per axis.
    let boxes = [
        (
            UnitCell::from_lengths_angles(10.2, 10.5, 15.5, 90.0, 90.0, 90.0),
            200,
        ),
        (
            UnitCell::from_lengths_angles(12.0, 12.0, 12.0, 70.0, 110.0, 80.0),
            150,
        ),
        (
            UnitCell::from_lengths_angles(60.0, 70.0, 80.0, 90.0, 90.0, 90.0),
            3,
        ),
        (
            UnitCell::from_lengths_angles(60.0, 70.0, 80.0, 65.0, 105.0, 70.0),
            12,
        ),
    ];
    for (cell, atoms) in boxes {
        let w = widths(&cell);
        let cell = if w.iter().any(|&x| x <= 2.0 * cutoff as f64 * 1.001) {
            // Grow a box that the angles shrank below the limit.
            let s = 2.0 * cutoff as f64 * 1.01 / w.iter().copied().fold(f64::INFINITY, f64::min);
            let la = cell.lengths_angles();
            UnitCell::from_lengths_angles(la[0] * s, la[1] * s, la[2] * s, la[3], la[4], la[5])
        } else {
            cell
        };
        let frames = 2;
        let pos: Vec<f32> = (0..frames)
            .flat_map(|_| periodic_frame(&mut rng, &cell, atoms))
            .collect();
        Case {
            what: format!("box {:?} A={atoms}", cell.lengths_angles()),
            pos: &pos,
            frames,
            atoms,
            cutoff,
            cells: Some(std::slice::from_ref(&cell)),
            mask: None,
        }
        .check(dev, true)?;
    }
    // Open boundaries, atoms spread over 10^4 A: the grid is capped, cells grow.
    let atoms = 400;
    let pos: Vec<f32> = (0..3 * atoms)
        .map(|_| rng.range(-5e3, 5e3) as f32)
        .collect();
    Case {
        what: "sparse open frame".into(),
        pos: &pos,
        frames: 1,
        atoms,
        cutoff: 10.0,
        cells: None,
        mask: None,
    }
    .check(dev, true)?;
    Ok(())
});

device_test!(strict_cutoff_and_tiny_inputs, |dev| {
    // Distance exactly the cutoff is not an edge; a hair below is.
    let below = 5.0f32 - 5.0f32 * f32::EPSILON;
    let pos = [0.0f32, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, below, 0.0];
    let nl = NeighborList::build(&Tensor::from_slice(dev, &[3, 3], &pos)?, 5.0, None, None)?;
    let g = nl.to_host()?;
    ensure!(
        g.pairs() == vec![(0, 0, 2), (0, 2, 0)],
        "strict cutoff: {:?}",
        g.pairs()
    );
    // Periodic: the image across the boundary, shift = -a for 0 <- 1.
    let cell = UnitCell::from_lengths_angles(20.0, 20.0, 20.0, 90.0, 90.0, 90.0);
    let pos = [0.5f32, 1.0, 1.0, 19.5, 1.0, 1.0];
    let nl = NeighborList::build(
        &Tensor::from_slice(dev, &[1, 2, 3], &pos)?,
        3.0,
        Some(&[cell]),
        None,
    )?;
    let g = nl.to_host()?;
    ensure!(
        g.col == [1, 0]
            && g.reverse == [1, 0]
            && g.shift == Some(vec![-20.0, 0.0, 0.0, 20.0, 0.0, 0.0]),
        "periodic pair: {g:?}"
    );
    // Empty batches, a single atom, every atom padding.
    for (frames, atoms) in [(0usize, 5usize), (4, 0), (1, 1)] {
        let nl = NeighborList::build(
            &Tensor::<f32>::zeros(dev, &[frames, atoms, 3])?,
            5.0,
            None,
            None,
        )?;
        ensure!(
            nl.edges() == 0 && nl.to_host()?.row_ptr == vec![0; frames * atoms + 1],
            "empty {frames}x{atoms}"
        );
    }
    let pos = vec![f32::NAN; 3 * 6];
    let mask = Tensor::from_slice(dev, &[2, 3], &[0u8; 6])?;
    let nl = NeighborList::build(
        &Tensor::from_slice(dev, &[2, 3, 3], &pos)?,
        5.0,
        None,
        Some(&mask),
    )?;
    ensure!(nl.edges() == 0, "all padding");
    Ok(())
});

device_test!(large_frames_match_the_twin, |dev| {
    // 50,000 protein-like atoms (emu: 4,000): the device CSR equals the twin's; the reference is
    // checked on a sample of rows (the full brute force is O(A^2)).
    let mut rng = Rng::for_test("large_frames_match_the_twin");
    let atoms = if is_emu(dev) { 4000 } else { 50_000 };
    for periodic in [false, true] {
        let density = 0.08;
        let cell = make_box(&mut rng, Shape::Orthorhombic, atoms, density, 20.0);
        let pos = if periodic {
            periodic_frame(&mut rng, &cell, atoms)
        } else {
            open_frames(&mut rng, 1, atoms, density)
        };
        let cells = [cell];
        let case = Case {
            what: format!("A={atoms} periodic={periodic}"),
            pos: &pos,
            frames: 1,
            atoms,
            cutoff: 5.0,
            cells: periodic.then_some(&cells[..]),
            mask: None,
        };
        let g = case.check(dev, false)?;
        let per_atom = g.edges() as f64 / atoms as f64;
        ensure!(
            (15.0..80.0).contains(&per_atom),
            "{}: {per_atom:.1} neighbours per atom at protein density",
            case.what
        );
        // Sampled rows against a brute-force scan of the whole frame.
        let inv = box_inverse(&cell);
        let v = cell.vectors.map(|r| r.map(|x| x as f64));
        for _ in 0..100 {
            let i = rng.below(atoms);
            let mut want = Vec::new();
            for j in (0..atoms).filter(|&j| j != i) {
                let mut d = [0, 1, 2].map(|k| pos[3 * j + k] as f64 - pos[3 * i + k] as f64);
                if periodic {
                    let s = [0, 1, 2].map(|k| (0..3).map(|r| d[r] * inv[r][k]).sum::<f64>());
                    let m = s.map(|x| -x.round());
                    for (k, dk) in d.iter_mut().enumerate() {
                        *dk += m[0] * v[0][k] + m[1] * v[1][k] + m[2] * v[2][k];
                    }
                }
                let r = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
                // Skip the borderline: this scan's rounding is not the build's.
                if (r - 5.0).abs() < 1e-4 {
                    want.clear();
                    break;
                }
                if r < 5.0 {
                    want.push(j as i32);
                }
            }
            if want.is_empty() {
                continue;
            }
            let row = &g.col[g.row_ptr[i] as usize..g.row_ptr[i + 1] as usize];
            ensure!(
                row == want,
                "{}: row {i} differs from the brute force",
                case.what
            );
        }
    }
    Ok(())
});

device_test!(rotation_and_translation_invariance, |dev| {
    let mut rng = Rng::for_test("rotation_and_translation_invariance");
    let (frames, atoms, cutoff) = (4, if is_emu(dev) { 500 } else { 2000 }, 5.0f32);
    let pos = open_frames(&mut rng, frames, atoms, 0.08);
    let base = NeighborList::build(
        &Tensor::from_slice(dev, &[frames, atoms, 3], &pos)?,
        cutoff,
        None,
        None,
    )?
    .to_host()?;
    for trial in 0..3 {
        // A random rotation (normalised quaternion) and translation.
        let q = [rng.normal(), rng.normal(), rng.normal(), rng.normal()];
        let n = q.iter().map(|x| x * x).sum::<f64>().sqrt();
        let [w, x, y, z] = q.map(|v| v / n);
        let r = [
            [
                1.0 - 2.0 * (y * y + z * z),
                2.0 * (x * y - w * z),
                2.0 * (x * z + w * y),
            ],
            [
                2.0 * (x * y + w * z),
                1.0 - 2.0 * (x * x + z * z),
                2.0 * (y * z - w * x),
            ],
            [
                2.0 * (x * z - w * y),
                2.0 * (y * z + w * x),
                1.0 - 2.0 * (x * x + y * y),
            ],
        ];
        let t = [0, 1, 2].map(|_| rng.range(-100.0, 100.0));
        let moved: Vec<f32> = pos
            .chunks(3)
            .flat_map(|p| {
                (0..3).map(move |k| {
                    ((0..3).map(|c| r[k][c] * p[c] as f64).sum::<f64>() + t[k]) as f32
                })
            })
            .collect();
        let got = NeighborList::build(
            &Tensor::from_slice(dev, &[frames, atoms, 3], &moved)?,
            cutoff,
            None,
            None,
        )?
        .to_host()?;
        // Equal pair sets, up to pairs within 1e-3 A of the cutoff (rounding of the moved f32
        // coordinates may flip those).
        let dist = |f: usize, i: usize, j: usize| -> f64 {
            let (a, b) = (f * atoms + i, f * atoms + j);
            (0..3)
                .map(|k| (pos[3 * a + k] as f64 - pos[3 * b + k] as f64).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        let clear = |p: &(usize, usize, usize)| (dist(p.0, p.1, p.2) - cutoff as f64).abs() > 1e-3;
        let a: Vec<_> = base.pairs().into_iter().filter(clear).collect();
        let b: Vec<_> = got.pairs().into_iter().filter(clear).collect();
        ensure!(
            a == b && !a.is_empty(),
            "trial {trial}: {} pairs before the move, {} after",
            a.len(),
            b.len()
        );
    }
    Ok(())
});

device_test!(errors_are_clear, |dev| {
    let expect_err = |r: Result<NeighborList>, needle: &str| -> Result<()> {
        match r {
            Ok(_) => anyhow::bail!("expected an error containing {needle:?}"),
            Err(e) => {
                let msg = format!("{e:#}");
                ensure!(msg.contains(needle), "error {msg:?} lacks {needle:?}");
                Ok(())
            }
        }
    };
    let t = |shape: &[usize], v: &[f32]| Tensor::from_slice(dev, shape, v);
    let mut pos = vec![0.0f32; 2 * 5 * 3];
    for (g, p) in pos.chunks_mut(3).enumerate() {
        p[0] = g as f32;
    }
    // Non-finite coordinates name frame and atom (the first in frame, atom order).
    let mut bad = pos.clone();
    bad[3 * (5 + 3) + 1] = f32::NAN;
    bad[3 * (5 + 4)] = f32::INFINITY;
    expect_err(
        NeighborList::build(&t(&[2, 5, 3], &bad)?, 2.0, None, None),
        "frame 1, atom 3 has a non-finite coordinate",
    )?;
    // ... unless that atom is padding.
    let mut mask = vec![1u8; 10];
    mask[8] = 0;
    mask[9] = 0;
    let m = Tensor::from_slice(dev, &[2, 5], &mask)?;
    NeighborList::build(&t(&[2, 5, 3], &bad)?, 2.0, None, Some(&m))?;
    // Periodic: the cutoff must be below half the smallest perpendicular width.
    let cell = UnitCell::from_lengths_angles(20.0, 20.0, 20.0, 60.0, 60.0, 60.0);
    let w = widths(&cell).iter().copied().fold(f64::INFINITY, f64::min);
    expect_err(
        NeighborList::build(&t(&[2, 5, 3], &pos)?, (w / 2.0) as f32, Some(&[cell]), None),
        "frame 0: the cutoff",
    )?;
    NeighborList::build(
        &t(&[2, 5, 3], &pos)?,
        (w / 2.0 * 0.999) as f32,
        Some(&[cell]),
        None,
    )?;
    let ok = UnitCell::from_lengths_angles(30.0, 30.0, 30.0, 90.0, 90.0, 90.0);
    let small = UnitCell::from_lengths_angles(30.0, 30.0, 9.0, 90.0, 90.0, 90.0);
    expect_err(
        NeighborList::build(&t(&[2, 5, 3], &pos)?, 5.0, Some(&[ok, small]), None),
        "frame 1: the cutoff 5 A is not below half the smallest perpendicular width",
    )?;
    let flat = UnitCell {
        vectors: [[10.0, 0.0, 0.0], [20.0, 0.0, 0.0], [0.0, 0.0, 10.0]],
    };
    expect_err(
        NeighborList::build(&t(&[2, 5, 3], &pos)?, 1.0, Some(&[ok, flat]), None),
        "frame 1: the box",
    )?;
    expect_err(
        NeighborList::build(&t(&[2, 5, 3], &pos)?, 1.0, Some(&[ok, ok, ok]), None),
        "3 unit cells for 2 frames",
    )?;
    // Far outside the box.
    let mut far = pos.clone();
    far[3 * 7 + 2] = 4e7;
    expect_err(
        NeighborList::build(&t(&[2, 5, 3], &far)?, 5.0, Some(&[ok]), None),
        "frame 1, atom 2 at (",
    )?;
    // Shapes, cutoff, mask.
    expect_err(
        NeighborList::build(&t(&[10, 3], &pos[..30])?, 0.0, None, None),
        "cutoff must be positive",
    )?;
    expect_err(
        NeighborList::build(&t(&[2, 15], &pos)?, 1.0, None, None),
        "expected [frames, atoms, 3]",
    )?;
    let m = Tensor::from_slice(dev, &[9], &[1u8; 9])?;
    expect_err(
        NeighborList::build(&t(&[2, 5, 3], &pos)?, 1.0, None, Some(&m)),
        "the mask has 9 values",
    )?;
    // The host twin and the reference report the same.
    let e = neighbor_list_host(&bad, 2, 5, 2.0, None, None).unwrap_err();
    ensure!(format!("{e}").contains("frame 1, atom 3"), "{e}");
    let e = neighbor_pairs_reference(&bad, 2, 5, 2.0, None, None).unwrap_err();
    ensure!(format!("{e}").contains("frame 1, atom 3"), "{e}");
    Ok(())
});

device_test!(
    host_list_round_trips_and_validate_catches_corruption,
    |dev| {
        let mut rng = Rng::for_test("host_list_round_trips_and_validate_catches_corruption");
        let cell = make_box(&mut rng, Shape::Triclinic, 300, 0.08, 12.0);
        let pos = periodic_frame(&mut rng, &cell, 300);
        let g = neighbor_list_host(&pos, 1, 300, 5.0, Some(&[cell]), None)?;
        ensure!(g.edges() > 0, "no edges");
        let back = g.to_device(dev)?.to_host()?;
        ensure!(back == g, "round trip");
        let mut broken = g.clone();
        broken.reverse[0] = broken.reverse[1];
        ensure!(
            broken.validate().is_err(),
            "a broken reverse passes validate"
        );
        let mut broken = g.clone();
        broken.shift.as_mut().unwrap()[0] += 1.0;
        ensure!(broken.validate().is_err(), "a broken shift passes validate");
        Ok(())
    }
);
