//! The atom-stage radius graph (SPEC step 2): every pair of atoms of one frame closer than the
//! cutoff, optionally under periodic boundaries, as a CSR over destination atoms with the index
//! of each edge's mirror, so that message passing and its backward pass are both gathers.
//! Kernels: `cuda/neighbor_list.cu`.
//!
//! Positions are `[F, A, 3]` f32 Angstrom: F frames of A atoms, each frame its own graph. Row
//! `f * A + i` lists the edges `j -> i` into atom i of frame f, columns `f * A + j` ascending.
//!
//! - **Pairs**: `i != j`, same frame, both real (mask), distance strictly below the cutoff.
//!   Coincident atoms (distance 0) are kept as edges: downstream geometry must handle r = 0
//!   without producing NaN (a radial basis of r is fine; a unit vector r / |r| needs a guard).
//! - **Periodic boxes** (one [`UnitCell`] per frame, orthorhombic or triclinic): the minimum image
//!   convention, which needs `cutoff < w / 2` for the smallest perpendicular width w of the box
//!   (checked, with a relative margin of 1e-6; an error names the frame otherwise). Below that
//!   bound each pair has at most one image within the cutoff, so a row never lists a column
//!   twice. Atoms anywhere (far outside the box too) are wrapped through their fractional
//!   coordinates, up to 2^20 box lengths away (an error beyond). The edge's `shift` is the
//!   lattice vector to add to `x_j`: `vec_ij = x_j + shift_e - x_i`.
//! - **Exactness**: whether a pair is an edge is decided in f64 from the f32 inputs by one
//!   formula with a fixed order of operations ([`pair_dist2`], [`lattice_shift`]) on every device
//!   (the kernels use explicitly rounded operations, never FMA), so cpu, emu and cuda build the
//!   identical CSR, bit for bit, and so does the brute-force [`neighbor_pairs_reference`].
//! - **No truncation**: a count pass, a scan and a fill pass size the edge arrays exactly; there
//!   is no capacity to overflow and no pair is ever dropped. More than 2^31 - 1 edges is an error.
//! - **Determinism**: no float atomics; the integer atomics build histograms and claim slots that
//!   are sorted afterwards, so the result never depends on scheduling.
//!
//! The algorithm (kernels and CPU twin alike): a cell list per frame (cells of side at least the
//! cutoff, in fractional coordinates with a box), atoms counting-sorted by cell, then for each
//! destination atom the 27 cells around its own are searched, neighbours counted (pass 1), the
//! counts scanned into `row_ptr` (pass 2), the columns written and each row sorted (pass 3), and
//! `reverse` found by binary search in the source's row. Without a box the grid covers the
//! frame's bounding box; the number of cells per frame is capped at `max(2 A, 64)` (cells grow
//! beyond the cutoff when the atoms are spread thin), so memory stays O(atoms) for any input;
//! the price is time when a frame is a few dense clusters far apart: coarse cells, still exact,
//! with a cost that tends towards O(A^2) per frame. Each build allocates its arrays (one wait on
//! cuda, for the edge count); there is no reusable workspace yet.
//!
//! There is no backward: the graph is discrete. Gradients reach the positions through the edge
//! vectors the caller computes from `positions`, `col` and `shift`.

use super::same_device;
use crate::device::Device;
use crate::kernels::neighbor_list as k;
use crate::launch::{launch, KernelArgs, LaunchConfig};
use crate::tensor::Tensor;
use crate::traj::UnitCell;
use anyhow::{anyhow, bail, ensure, Result};
use rayon::prelude::*;

/// Threads per block of every kernel; the scan and bounds kernels' `__launch_bounds__`.
const THREADS: u32 = 256;

/// Counts per scan tile: `kScanTile` in the kernel file.
const SCAN_TILE: usize = 256 * 8;

/// Cells are this much (relative) wider than the cutoff, so that rounding in the cell index can
/// never put two atoms closer than the cutoff more than one cell apart.
const CELL_MARGIN: f64 = 1e-5;

/// The cutoff must be below `(1 - HALF_BOX_MARGIN) * w / 2`: strictly below half the width, with
/// room for rounding, so that two images of one atom can never both test as neighbours.
const HALF_BOX_MARGIN: f64 = 1e-6;

/// Fractional coordinates must be smaller than this in magnitude (`kMaxFractional` in the kernel
/// file): the wrap counts stay small integers, and the rounding error of a fractional coordinate,
/// times the cells per axis, stays far below [`CELL_MARGIN`].
const MAX_FRACTIONAL: f64 = 1048576.0;

/// Destination rows per rayon task of the CPU build.
const ROW_CHUNK: usize = 256;

/// Reasons in the per-frame status key `atom * 4 + reason` (as in the kernel file).
const BAD_NON_FINITE: i32 = 1;
const BAD_FAR_OUTSIDE: i32 = 2;

// -------------------------------------------------------------------------------- geometry --

/// The lattice vector `m_a a + m_b b + m_c c` of a box whose rows (row-major `[3, 3]`) are a, b,
/// c, in f64 with a fixed order of operations (the kernels' `lattice_shift`).
pub fn lattice_shift(m: [i32; 3], box_rows: &[f64; 9]) -> [f64; 3] {
    std::array::from_fn(|k| {
        (m[0] as f64 * box_rows[k] + m[1] as f64 * box_rows[3 + k]) + m[2] as f64 * box_rows[6 + k]
    })
}

/// `|x_j + shift - x_i|^2` in f64 from f32 positions, with a fixed order of operations (the
/// kernels' `pair_dist2`): the one test every device and the reference use, so all agree on the
/// borderline pairs. Symmetric: swapping i and j and negating the shift negates the difference
/// exactly.
pub fn pair_dist2(xi: [f32; 3], xj: [f32; 3], shift: [f64; 3]) -> f64 {
    let d: [f64; 3] = std::array::from_fn(|k| (xj[k] as f64 - xi[k] as f64) + shift[k]);
    (d[0] * d[0] + d[1] * d[1]) + d[2] * d[2]
}

/// Cells per frame: enough that a protein-like frame gets cells of about the cutoff, and few
/// enough that memory stays O(atoms) however the atoms are spread.
fn cell_capacity(atoms: usize) -> usize {
    (2 * atoms).max(64)
}

/// Cells per axis of a frame without a box: cubes of side `width` over the extent, widened until
/// there are at most `cap` (the kernels' `open_grid`); returns the counts and 1 / the side.
fn open_grid(ext: [f64; 3], width: f64, cap: usize) -> ([i32; 3], f64) {
    let mut w = width;
    loop {
        let nd = ext.map(|e| (e / w).floor() + 1.0);
        let cells = nd[0] * nd[1] * nd[2];
        if cells <= cap as f64 {
            return (nd.map(|n| n as i32), 1.0 / w);
        }
        w *= 1.25f64.max((cells / cap as f64).cbrt());
    }
}

/// The periodic geometry of every frame: box rows, their inverse and the cell grid.
struct Boxes {
    rows: Vec<[f64; 9]>,
    inverse: Vec<[f64; 9]>,
    dims: Vec<[i32; 3]>,
}

fn cross(p: [f64; 3], q: [f64; 3]) -> [f64; 3] {
    [
        p[1] * q[2] - p[2] * q[1],
        p[2] * q[0] - p[0] * q[2],
        p[0] * q[1] - p[1] * q[0],
    ]
}

fn dot(p: [f64; 3], q: [f64; 3]) -> f64 {
    p[0] * q[0] + p[1] * q[1] + p[2] * q[2]
}

fn norm(p: [f64; 3]) -> f64 {
    dot(p, p).sqrt()
}

impl Boxes {
    /// Checks each frame's box (finite, not degenerate, wide enough for the cutoff) and derives
    /// its inverse and cell grid. `cells` holds one box per frame, or one for all frames.
    fn new(op: &str, cells: &[UnitCell], frames: usize, cutoff: f32, cap: usize) -> Result<Self> {
        ensure!(
            cells.len() == frames || cells.len() == 1,
            "{op}: {} unit cells for {frames} frames (give one per frame, or one for all)",
            cells.len()
        );
        let cutoff = cutoff as f64;
        let width = cutoff * (1.0 + CELL_MARGIN);
        let mut out = Self {
            rows: Vec::with_capacity(frames),
            inverse: Vec::with_capacity(frames),
            dims: Vec::with_capacity(frames),
        };
        for f in 0..frames {
            let cell = &cells[if cells.len() == 1 { 0 } else { f }];
            let v = cell.vectors.map(|r| r.map(|x| x as f64));
            ensure!(
                v.iter().flatten().all(|x| x.is_finite()),
                "{op}: frame {f}: the box vectors {:?} are not finite",
                cell.vectors
            );
            let (a, b, c) = (v[0], v[1], v[2]);
            let (bc, ca, ab) = (cross(b, c), cross(c, a), cross(a, b));
            let det = dot(a, bc);
            ensure!(
                det.abs() > 0.0 && det.is_finite(),
                "{op}: frame {f}: the box {:?} has no volume",
                cell.vectors
            );
            // Distance between opposite faces along each box vector: volume / face area.
            let widths = [bc, ca, ab].map(|n| det.abs() / norm(n));
            let w_min = widths.iter().copied().fold(f64::INFINITY, f64::min);
            ensure!(
                2.0 * cutoff < (1.0 - HALF_BOX_MARGIN) * w_min,
                "{op}: frame {f}: the cutoff {cutoff} A is not below half the smallest perpendicular \
                 width of the box ({w_min:.6} A / 2 = {:.6} A); the minimum image convention needs \
                 cutoff < width / 2 (use a smaller cutoff or a larger box)",
                w_min / 2.0
            );
            // s = x H^-1 with H's rows a, b, c: the columns of H^-1 are the reciprocal vectors
            // (b x c, c x a, a x b) / det.
            let mut inv = [0.0; 9];
            for m in 0..3 {
                for (k, r) in [bc, ca, ab].iter().enumerate() {
                    inv[3 * m + k] = r[m] / det;
                }
            }
            let mut w = width;
            let dims = loop {
                let n = widths.map(|x| ((x / w).floor() as i32).max(1));
                if n.iter().map(|&x| x as f64).product::<f64>() <= cap as f64 {
                    break n;
                }
                let cells = n.iter().map(|&x| x as f64).product::<f64>();
                w *= 1.25f64.max((cells / cap as f64).cbrt());
            };
            out.rows.push([a, b, c].concat().try_into().unwrap());
            out.inverse.push(inv);
            out.dims.push(dims);
        }
        Ok(out)
    }
}

/// Fractional coordinate k of x (`s = x H^-1`).
fn fractional(x: [f32; 3], inv: &[f64; 9], k: usize) -> f64 {
    x[0] as f64 * inv[k] + x[1] as f64 * inv[3 + k] + x[2] as f64 * inv[6 + k]
}

fn point(pos: &[f32], g: usize) -> [f32; 3] {
    [pos[3 * g], pos[3 * g + 1], pos[3 * g + 2]]
}

/// Checks the sizes shared by every entry point; returns the row count F * A.
fn check_sizes(
    op: &str,
    positions: usize,
    frames: usize,
    atoms: usize,
    cutoff: f32,
    mask: Option<usize>,
) -> Result<usize> {
    let limit = i32::MAX as usize;
    let n = frames
        .checked_mul(atoms)
        .filter(|&n| n < limit && atoms <= limit / 4)
        .filter(|_| {
            frames
                .checked_mul(cell_capacity(atoms))
                .is_some_and(|c| c < limit)
        })
        .ok_or_else(|| {
            anyhow!(
                "{op}: {frames} frames of {atoms} atoms exceed the neighbor list's 32-bit indices \
                 (split the batch)"
            )
        })?;
    ensure!(
        positions == 3 * n,
        "{op}: positions have {positions} values, expected frames * atoms * 3 = {frames} * {atoms} \
         * 3 = {}",
        3 * n
    );
    if let Some(m) = mask {
        ensure!(
            m == n,
            "{op}: the mask has {m} values, expected frames * atoms = {frames} * {atoms} = {n}"
        );
    }
    ensure!(
        cutoff.is_finite() && cutoff > 0.0,
        "{op}: the cutoff must be positive and finite, got {cutoff}"
    );
    Ok(n)
}

/// The error for the first bad atom of a frame (the same text on every device).
fn bad_atom(op: &str, frame: usize, atom: usize, reason: i32, p: [f32; 3]) -> anyhow::Error {
    if reason == BAD_NON_FINITE {
        anyhow!(
            "{op}: frame {frame}, atom {atom} has a non-finite coordinate ({}, {}, {})",
            p[0],
            p[1],
            p[2]
        )
    } else {
        anyhow!(
            "{op}: frame {frame}, atom {atom} at ({}, {}, {}) A lies more than 2^20 box lengths \
             outside the periodic box",
            p[0],
            p[1],
            p[2]
        )
    }
}

/// The first real atom (in frame, atom order) the build cannot place: a non-finite coordinate,
/// or, with a box, one too far outside it.
fn check_atoms(
    op: &str,
    pos: &[f32],
    atoms: usize,
    mask: Option<&[u8]>,
    boxes: Option<&Boxes>,
) -> Result<()> {
    let n = pos.len() / 3;
    let bad = (0..n).into_par_iter().find_map_first(|g| {
        if mask.is_some_and(|m| m[g] == 0) {
            return None;
        }
        let x = point(pos, g);
        if !x.iter().all(|v| v.is_finite()) {
            return Some((g, BAD_NON_FINITE));
        }
        let inv = &boxes?.inverse[g / atoms];
        (0..3)
            .any(|k| fractional(x, inv, k).abs() >= MAX_FRACTIONAL)
            .then_some((g, BAD_FAR_OUTSIDE))
    });
    match bad {
        Some((g, reason)) => Err(bad_atom(op, g / atoms, g % atoms, reason, point(pos, g))),
        None => Ok(()),
    }
}

// ------------------------------------------------------------------------------- host list --

/// A neighbor list in host memory: what [`neighbor_list_host`] builds and
/// [`NeighborList::to_host`] downloads. Row `f * A + i` holds the edges `j -> i`.
///
/// Invariants (checked by [`HostNeighborList::validate`]): `row_ptr` runs from 0 to E,
/// non-decreasing; a row's columns are ascending, of the same frame, never the row itself;
/// `col[reverse[e]]` is the row of e and `reverse[reverse[e]] == e`; with a box, `shift` has 3 E
/// entries and the mirror edge's shift is the exact negative.
#[derive(Clone, Debug, PartialEq)]
pub struct HostNeighborList {
    /// Frames F.
    pub frames: usize,
    /// Atoms per frame A.
    pub atoms: usize,
    /// The cutoff in Angstrom.
    pub cutoff: f32,
    /// `[F A + 1]`: the edges of row r are `row_ptr[r]..row_ptr[r + 1]`.
    pub row_ptr: Vec<i32>,
    /// `[E]`: the source atom j of each edge, global index `f * A + j`.
    pub col: Vec<i32>,
    /// `[E]`: the index of the mirror edge (i -> j) in row j.
    pub reverse: Vec<i32>,
    /// `[E, 3]` with a box: the lattice vector to add to `x_j` (`vec_ij = x_j + shift - x_i`).
    pub shift: Option<Vec<f32>>,
}

impl HostNeighborList {
    /// Rows F A.
    pub fn rows(&self) -> usize {
        self.row_ptr.len().saturating_sub(1)
    }

    /// Edges E (each neighbour pair counts twice, once per direction).
    pub fn edges(&self) -> usize {
        self.col.len()
    }

    /// The edges as sorted `(frame, i, j)` triples (destination i, source j, indices within the
    /// frame): the form [`neighbor_pairs_reference`] returns.
    pub fn pairs(&self) -> Vec<(usize, usize, usize)> {
        let a = self.atoms.max(1);
        let mut out = Vec::with_capacity(self.edges());
        for r in 0..self.rows() {
            for e in self.row_ptr[r] as usize..self.row_ptr[r + 1] as usize {
                out.push((r / a, r % a, self.col[e] as usize % a));
            }
        }
        out
    }

    /// Checks the invariants listed on the type; O(rows + edges).
    pub fn validate(&self) -> Result<()> {
        let op = "HostNeighborList";
        let n = self.frames * self.atoms;
        let e_count = self.col.len();
        ensure!(
            self.row_ptr.len() == n + 1,
            "{op}: row_ptr has {} entries, expected frames * atoms + 1 = {}",
            self.row_ptr.len(),
            n + 1
        );
        ensure!(
            self.reverse.len() == e_count,
            "{op}: col has {e_count} entries but reverse has {}",
            self.reverse.len()
        );
        if let Some(s) = &self.shift {
            ensure!(
                s.len() == 3 * e_count,
                "{op}: shift has {} entries, expected 3 * edges = {}",
                s.len(),
                3 * e_count
            );
        }
        ensure!(
            e_count <= i32::MAX as usize,
            "{op}: {e_count} edges do not fit 32-bit indices"
        );
        ensure!(
            self.row_ptr[0] == 0 && self.row_ptr[n] as usize == e_count,
            "{op}: row_ptr runs from {} to {}, expected 0 to {e_count}",
            self.row_ptr[0],
            self.row_ptr[n]
        );
        for i in 0..n {
            let (a, b) = (self.row_ptr[i], self.row_ptr[i + 1]);
            ensure!(a <= b, "{op}: row_ptr decreases at row {i}");
            let f = i / self.atoms;
            let frame = (f * self.atoms) as i32..((f + 1) * self.atoms) as i32;
            let mut prev = -1i32;
            for e in a as usize..b as usize {
                let j = self.col[e];
                ensure!(
                    frame.contains(&j) && j != i as i32 && j > prev,
                    "{op}: edge {e} of row {i} has column {j} (columns must be ascending, of the \
                     same frame, and not the row itself)"
                );
                prev = j;
                let r = self.reverse[e];
                let row_j =
                    (j >= 0).then(|| self.row_ptr[j as usize]..self.row_ptr[j as usize + 1]);
                ensure!(
                    row_j.is_some_and(|rj| rj.contains(&r))
                        && self.col[r as usize] == i as i32
                        && self.reverse[r as usize] == e as i32,
                    "{op}: edge {e} ({j} -> {i}) has reverse {r}, which is not its mirror edge"
                );
                if let Some(s) = &self.shift {
                    let r = r as usize;
                    ensure!(
                        (0..3).all(|k| s[3 * r + k] == -s[3 * e + k]),
                        "{op}: edge {e} has shift {:?} but its mirror {r} has {:?}",
                        &s[3 * e..3 * e + 3],
                        &s[3 * r..3 * r + 3]
                    );
                }
            }
        }
        Ok(())
    }

    /// Uploads the list to a device (after [`HostNeighborList::validate`]).
    pub fn to_device(&self, dev: &Device) -> Result<NeighborList> {
        self.validate()?;
        let e = self.edges();
        Ok(NeighborList {
            frames: self.frames,
            atoms: self.atoms,
            cutoff: self.cutoff,
            row_ptr: Tensor::from_slice(dev, &[self.row_ptr.len()], &self.row_ptr)?,
            col: Tensor::from_slice(dev, &[e], &self.col)?,
            reverse: Tensor::from_slice(dev, &[e], &self.reverse)?,
            shift: match &self.shift {
                Some(s) => Some(Tensor::from_slice(dev, &[e, 3], s)?),
                None => None,
            },
        })
    }
}

/// One frame's cell list on the host: atoms counting-sorted by cell, ascending within a cell.
struct FrameCells {
    dims: [i32; 3],
    /// `[cells + 1]` first slot of each cell.
    start: Vec<u32>,
    /// Per slot: the atom (index within the frame), its position and its wrap into the box.
    atom: Vec<u32>,
    xyz: Vec<[f32; 3]>,
    wrap: Vec<[i32; 3]>,
    /// Per atom: its cell (-1 for padding) and its slot.
    cell_of: Vec<i32>,
    slot_of: Vec<u32>,
}

impl FrameCells {
    /// The frame's cell list; its atoms were checked by [`check_atoms`].
    fn build(
        pos: &[f32],
        mask: Option<&[u8]>,
        f: usize,
        atoms: usize,
        cutoff: f32,
        boxes: Option<&Boxes>,
    ) -> Self {
        let base = f * atoms;
        let real = |a: usize| mask.is_none_or(|m| m[base + a] != 0);
        let cap = cell_capacity(atoms);
        // Per atom: cell and wrap, exactly as neighbor_cell_assign computes them.
        let mut wraps = vec![[0i32; 3]; atoms];
        let mut cell_of = vec![-1i32; atoms];
        let dims = match boxes {
            Some(b) => {
                let (inv, n) = (&b.inverse[f], b.dims[f]);
                for a in (0..atoms).filter(|&a| real(a)) {
                    let x = point(pos, base + a);
                    let mut c = [0i32; 3];
                    for k in 0..3 {
                        let s = fractional(x, inv, k);
                        let fl = s.floor();
                        wraps[a][k] = fl as i32;
                        c[k] = (((s - fl) * n[k] as f64) as i32).min(n[k] - 1);
                    }
                    cell_of[a] = (c[0] * n[1] + c[1]) * n[2] + c[2];
                }
                n
            }
            None => {
                let (mut lo, mut hi) = ([f32::INFINITY; 3], [f32::NEG_INFINITY; 3]);
                for a in (0..atoms).filter(|&a| real(a)) {
                    let x = point(pos, base + a);
                    for k in 0..3 {
                        lo[k] = lo[k].min(x[k]);
                        hi[k] = hi[k].max(x[k]);
                    }
                }
                // No real atom: lo stays +inf.
                let empty = lo[0] > hi[0];
                let origin = lo.map(|l| if empty { 0.0 } else { l as f64 });
                let ext: [f64; 3] = std::array::from_fn(|k| {
                    if empty {
                        0.0
                    } else {
                        hi[k] as f64 - lo[k] as f64
                    }
                });
                let (n, inv_w) = open_grid(ext, cutoff as f64 * (1.0 + CELL_MARGIN), cap);
                for a in (0..atoms).filter(|&a| real(a)) {
                    let x = point(pos, base + a);
                    let c: [i32; 3] = std::array::from_fn(|k| {
                        ((x[k] as f64 - origin[k]) * inv_w)
                            .floor()
                            .clamp(0.0, (n[k] - 1) as f64) as i32
                    });
                    cell_of[a] = (c[0] * n[1] + c[1]) * n[2] + c[2];
                }
                n
            }
        };
        let cells = dims.iter().map(|&d| d as usize).product::<usize>();
        let mut start = vec![0u32; cells + 1];
        for &c in cell_of.iter().filter(|&&c| c >= 0) {
            start[c as usize + 1] += 1;
        }
        for c in 0..cells {
            start[c + 1] += start[c];
        }
        let slots = start[cells] as usize;
        let mut fill = start.clone();
        let (mut atom, mut xyz, mut wrap) = (
            vec![0u32; slots],
            vec![[0f32; 3]; slots],
            vec![[0i32; 3]; slots],
        );
        let mut slot_of = vec![u32::MAX; atoms];
        for a in 0..atoms {
            if cell_of[a] >= 0 {
                let s = &mut fill[cell_of[a] as usize];
                atom[*s as usize] = a as u32;
                xyz[*s as usize] = point(pos, base + a);
                wrap[*s as usize] = wraps[a];
                slot_of[a] = *s;
                *s += 1;
            }
        }
        Self {
            dims,
            start,
            atom,
            xyz,
            wrap,
            cell_of,
            slot_of,
        }
    }

    /// Calls `visit(j, shift)` for every neighbour j of real atom `a`: the kernels'
    /// `for_each_neighbor`, same cells, same test.
    fn for_each_neighbor(
        &self,
        a: usize,
        box_rows: Option<&[f64; 9]>,
        cutoff2: f64,
        mut visit: impl FnMut(u32, [f64; 3]),
    ) {
        let [nx, ny, nz] = self.dims;
        let local = self.cell_of[a];
        let (cx, cy, cz) = (local / (ny * nz), (local / nz) % ny, local % nz);
        let slot = self.slot_of[a] as usize;
        let (xi, wi) = (self.xyz[slot], self.wrap[slot]);
        let periodic = box_rows.is_some();
        // Skipping j == a after the distance test: only a coincident self passes it.
        for dx in -1..=1 {
            let Some((wx, lx)) = neighbor_cell(cx + dx, nx, periodic) else {
                continue;
            };
            for dy in -1..=1 {
                let Some((wy, ly)) = neighbor_cell(cy + dy, ny, periodic) else {
                    continue;
                };
                for dz in -1..=1 {
                    let Some((wz, lz)) = neighbor_cell(cz + dz, nz, periodic) else {
                        continue;
                    };
                    let cell = ((wx * ny + wy) * nz + wz) as usize;
                    let run = self.start[cell] as usize..self.start[cell + 1] as usize;
                    match box_rows {
                        Some(h) => {
                            // m = l - wrap_j + wrap_i, the image's lattice step.
                            let l = [lx + wi[0], ly + wi[1], lz + wi[2]];
                            // Most atoms of a run share their wrap: the shift is recomputed
                            // only when m changes (the same value: a cache, not a shortcut).
                            let mut last = ([i32::MIN; 3], [0.0; 3]);
                            for (s, (q, wj)) in self.xyz[run.clone()]
                                .iter()
                                .zip(&self.wrap[run.clone()])
                                .enumerate()
                            {
                                let m = [l[0] - wj[0], l[1] - wj[1], l[2] - wj[2]];
                                if m != last.0 {
                                    last = (m, lattice_shift(m, h));
                                }
                                let shift = last.1;
                                if pair_dist2(xi, *q, shift) < cutoff2 {
                                    let j = self.atom[run.start + s];
                                    if j as usize != a {
                                        visit(j, shift);
                                    }
                                }
                            }
                        }
                        None => {
                            for (s, q) in self.xyz[run.clone()].iter().enumerate() {
                                if pair_dist2(xi, *q, [0.0; 3]) < cutoff2 {
                                    let j = self.atom[run.start + s];
                                    if j as usize != a {
                                        visit(j, [0.0; 3]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Neighbour cell `u` of an axis with `n` cells: `None` outside an open grid; else the wrapped
/// cell and the lattice step (-1, 0, 1) of that image. With n = 1 or 2 the three offsets reach
/// one cell through three (two) different images, so no image is visited twice.
fn neighbor_cell(u: i32, n: i32, periodic: bool) -> Option<(i32, i32)> {
    if u < 0 {
        periodic.then_some((u + n, -1))
    } else if u >= n {
        periodic.then_some((u - n, 1))
    } else {
        Some((u, 0))
    }
}

/// The edges of a run of destination atoms taken in cell order (one frame's slots).
#[derive(Default)]
struct RowsOut {
    /// Per atom of the run: its row, and where its edges start in `col` (and `shift / 3`).
    rows: Vec<(u32, u32)>,
    col: Vec<i32>,
    shift: Vec<f32>,
}

/// The CPU build before assembly: `row_ptr`, the edges of each run, and where each row's edges
/// are among the runs.
struct HostRows {
    row_ptr: Vec<i32>,
    parts: Vec<RowsOut>,
    /// Per row: (run, start in the run's `col`); rows without edges are never read.
    origin: Vec<(u32, u32)>,
    periodic: bool,
}

impl HostRows {
    fn edges(&self) -> usize {
        *self.row_ptr.last().unwrap() as usize
    }

    /// Gathers the runs' columns (and shifts) into the CSR arrays in row order, runs of
    /// [`ROW_CHUNK`] rows in parallel.
    fn write_edges(&self, col: &mut [i32], shift: Option<&mut [f32]>) {
        let n = self.row_ptr.len() - 1;
        let mut pieces = Vec::with_capacity(n.div_ceil(ROW_CHUNK));
        let (mut rest, mut rest_shift) = (col, shift);
        for r0 in (0..n).step_by(ROW_CHUNK) {
            let r1 = (r0 + ROW_CHUNK).min(n);
            let len = (self.row_ptr[r1] - self.row_ptr[r0]) as usize;
            let (c, tail) = rest.split_at_mut(len);
            rest = tail;
            let s = match rest_shift.take() {
                Some(s) => {
                    let (s, tail) = s.split_at_mut(3 * len);
                    rest_shift = Some(tail);
                    Some(s)
                }
                None => None,
            };
            pieces.push((r0..r1, c, s));
        }
        pieces.into_par_iter().for_each(|(rows, c, mut s)| {
            let base = self.row_ptr[rows.start] as usize;
            for r in rows {
                let (a, b) = (self.row_ptr[r] as usize, self.row_ptr[r + 1] as usize);
                if a == b {
                    continue;
                }
                let (part, start) = self.origin[r];
                let (part, start) = (&self.parts[part as usize], start as usize);
                c[a - base..b - base].copy_from_slice(&part.col[start..start + b - a]);
                if let Some(s) = s.as_deref_mut() {
                    s[3 * (a - base)..3 * (b - base)]
                        .copy_from_slice(&part.shift[3 * start..3 * (start + b - a)]);
                }
            }
        });
    }
}

/// CPU twin of the kernels: the same cell-list algorithm with rayon (cell lists per frame in
/// parallel, then runs of destination atoms in cell order in parallel), producing the identical
/// CSR.
///
/// `positions` is `[frames, atoms, 3]` f32 Angstrom; `cells` one box per frame (or one for all)
/// for periodic boundaries; `mask` (`[frames, atoms]`, optional) marks padding atoms with 0: they
/// get no edges and their coordinates are not read (they may hold NaN). Errors as
/// [`NeighborList::build`]. (Not generic over [`super::Real`] like the other twins: the input is
/// f32 and the pair test is always f64, so there is one graph, the same on every device.)
pub fn neighbor_list_host(
    positions: &[f32],
    frames: usize,
    atoms: usize,
    cutoff: f32,
    cells: Option<&[UnitCell]>,
    mask: Option<&[u8]>,
) -> Result<HostNeighborList> {
    let op = "neighbor_list_host";
    let rows = host_rows(op, positions, frames, atoms, cutoff, cells, mask)?;
    let e = rows.edges();
    let mut col = vec![0i32; e];
    let mut shift = rows.periodic.then(|| vec![0f32; 3 * e]);
    rows.write_edges(&mut col, shift.as_deref_mut());
    let mut reverse = vec![-1i32; e];
    ensure!(
        reverse_edges(&rows.row_ptr, &col, atoms, &mut reverse),
        "{op}: internal error: the neighbor list is not symmetric"
    );
    Ok(HostNeighborList {
        frames,
        atoms,
        cutoff,
        row_ptr: rows.row_ptr,
        col,
        reverse,
        shift,
    })
}

/// The cpu device's build: the twin written straight into the list's tensors.
fn build_cpu(
    op: &str,
    pos: &[f32],
    frames: usize,
    atoms: usize,
    cutoff: f32,
    cells: Option<&[UnitCell]>,
    mask: Option<&[u8]>,
) -> Result<NeighborList> {
    let dev = &Device::Cpu;
    let rows = host_rows(op, pos, frames, atoms, cutoff, cells, mask)?;
    let e = rows.edges();
    let mut col = Tensor::<i32>::zeros(dev, &[e])?;
    let mut shift = match rows.periodic {
        true => Some(Tensor::<f32>::zeros(dev, &[e, 3])?),
        false => None,
    };
    rows.write_edges(
        col.host_mut().unwrap(),
        shift.as_mut().map(|s| s.host_mut().unwrap()),
    );
    let mut reverse = Tensor::<i32>::zeros(dev, &[e])?;
    ensure!(
        reverse_edges(
            &rows.row_ptr,
            col.host().unwrap(),
            atoms,
            reverse.host_mut().unwrap(),
        ),
        "{op}: internal error: the neighbor list is not symmetric"
    );
    Ok(NeighborList {
        frames,
        atoms,
        cutoff,
        row_ptr: Tensor::from_slice(dev, &[rows.row_ptr.len()], &rows.row_ptr)?,
        col,
        reverse,
        shift,
    })
}

/// Checks, cell lists, and every row's sorted edges. Destination atoms are visited in cell order
/// (as the kernels do), so that neighbouring atoms' cells stay in cache whatever the atom order.
fn host_rows(
    op: &str,
    pos: &[f32],
    frames: usize,
    atoms: usize,
    cutoff: f32,
    cells: Option<&[UnitCell]>,
    mask: Option<&[u8]>,
) -> Result<HostRows> {
    let n = check_sizes(op, pos.len(), frames, atoms, cutoff, mask.map(<[u8]>::len))?;
    let boxes = match cells {
        Some(c) => Some(Boxes::new(op, c, frames, cutoff, cell_capacity(atoms))?),
        None => None,
    };
    check_atoms(op, pos, atoms, mask, boxes.as_ref())?;
    let lists: Vec<FrameCells> = (0..frames)
        .into_par_iter()
        .map(|f| FrameCells::build(pos, mask, f, atoms, cutoff, boxes.as_ref()))
        .collect();
    let cutoff2 = cutoff as f64 * cutoff as f64;
    // Runs of ROW_CHUNK slots of one frame.
    let runs: Vec<(usize, std::ops::Range<usize>)> = lists
        .iter()
        .enumerate()
        .flat_map(|(f, fc)| {
            let slots = fc.atom.len();
            (0..slots)
                .step_by(ROW_CHUNK)
                .map(move |s| (f, s..(s + ROW_CHUNK).min(slots)))
        })
        .collect();
    let parts: Vec<RowsOut> = runs
        .into_par_iter()
        .map(|(f, slots)| {
            let fc = &lists[f];
            let base = (f * atoms) as i32;
            let mut out = RowsOut::default();
            let mut open: Vec<u32> = Vec::new();
            let mut periodic: Vec<(u32, [f32; 3])> = Vec::new();
            for s in slots {
                let a = fc.atom[s] as usize;
                out.rows
                    .push((base as u32 + a as u32, out.col.len() as u32));
                // Columns are unique within a row (one image per pair): any sort agrees.
                if let Some(b) = &boxes {
                    periodic.clear();
                    fc.for_each_neighbor(a, Some(&b.rows[f]), cutoff2, |j, s| {
                        periodic.push((j, s.map(|x| x as f32)))
                    });
                    periodic.sort_unstable_by_key(|r| r.0);
                    out.col.extend(periodic.iter().map(|r| base + r.0 as i32));
                    out.shift.extend(periodic.iter().flat_map(|r| r.1));
                } else {
                    open.clear();
                    fc.for_each_neighbor(a, None, cutoff2, |j, _| open.push(j));
                    open.sort_unstable();
                    out.col.extend(open.iter().map(|&j| base + j as i32));
                }
            }
            out
        })
        .collect();
    // Row lengths and origins (padding rows keep 0 edges), then the offsets.
    let mut counts = vec![0usize; n];
    let mut origin = vec![(0u32, 0u32); n];
    for (p, part) in parts.iter().enumerate() {
        for (k, &(row, start)) in part.rows.iter().enumerate() {
            let end = part
                .rows
                .get(k + 1)
                .map_or(part.col.len(), |r| r.1 as usize);
            counts[row as usize] = end - start as usize;
            origin[row as usize] = (p as u32, start);
        }
    }
    let mut row_ptr = Vec::with_capacity(n + 1);
    row_ptr.push(0i32);
    let mut total = 0usize;
    for c in counts {
        total += c;
        ensure!(
            total <= i32::MAX as usize,
            "{op}: more than 2^31 - 1 edges (lower the cutoff or split the batch)"
        );
        row_ptr.push(total as i32);
    }
    Ok(HostRows {
        row_ptr,
        parts,
        origin,
        periodic: boxes.is_some(),
    })
}

/// `reverse[e]` for every edge, frames in parallel. Rows are visited in ascending order and every
/// row's columns are ascending, so the mirrors of the edges into row j are met in the order row j
/// lists them: a cursor per row hands out each in O(1), without the binary searches of the
/// kernels' `neighbor_reverse` (whose random reads cost the CPU more than the neighbour search).
/// The result is the same for a symmetric graph, which the build is by construction
/// ([`pair_dist2`] is exactly symmetric); returns false if the cursors do not end at their rows'
/// ends (an asymmetric graph).
fn reverse_edges(row_ptr: &[i32], col: &[i32], atoms: usize, reverse: &mut [i32]) -> bool {
    let n = row_ptr.len() - 1;
    if atoms == 0 {
        return true;
    }
    let mut parts = Vec::with_capacity(n / atoms);
    let mut rest = reverse;
    for r0 in (0..n).step_by(atoms) {
        let rows = r0..r0 + atoms;
        let (part, tail) = rest.split_at_mut((row_ptr[rows.end] - row_ptr[r0]) as usize);
        parts.push((rows, part));
        rest = tail;
    }
    parts.into_par_iter().all(|(rows, part)| {
        let offset = row_ptr[rows.start] as usize;
        let mut cursor: Vec<i32> = row_ptr[rows.clone()].to_vec();
        for i in rows.clone() {
            for e in row_ptr[i] as usize..row_ptr[i + 1] as usize {
                let c = &mut cursor[col[e] as usize - rows.start];
                part[e - offset] = *c;
                *c += 1;
            }
        }
        rows.zip(&cursor).all(|(j, &c)| c == row_ptr[j + 1])
    })
}

/// Brute-force reference for tests: every pair of every frame (O(F A^2)), in f64, with the
/// minimum image found independently of any cell list: below half the box width the only image
/// that can be within the cutoff is `m = -round(s_j - s_i)` (fractional coordinates), and the
/// test is [`pair_dist2`] with [`lattice_shift`]`(m)`. Returns the sorted `(frame, i, j)` triples
/// (destination i, source j, indices within the frame), both directions. Same checks and errors
/// as [`neighbor_list_host`].
pub fn neighbor_pairs_reference(
    positions: &[f32],
    frames: usize,
    atoms: usize,
    cutoff: f32,
    cells: Option<&[UnitCell]>,
    mask: Option<&[u8]>,
) -> Result<Vec<(usize, usize, usize)>> {
    let op = "neighbor_pairs_reference";
    check_sizes(
        op,
        positions.len(),
        frames,
        atoms,
        cutoff,
        mask.map(<[u8]>::len),
    )?;
    let boxes = match cells {
        Some(c) => Some(Boxes::new(op, c, frames, cutoff, cell_capacity(atoms))?),
        None => None,
    };
    check_atoms(op, positions, atoms, mask, boxes.as_ref())?;
    let cutoff2 = cutoff as f64 * cutoff as f64;
    let real = |g: usize| mask.is_none_or(|m| m[g] != 0);
    // Fractional coordinates of every real atom, once.
    let frac: Vec<[f64; 3]> = match &boxes {
        Some(b) => (0..frames * atoms)
            .into_par_iter()
            .map(|g| {
                let x = point(positions, g);
                match real(g) {
                    true => [0, 1, 2].map(|k| fractional(x, &b.inverse[g / atoms], k)),
                    false => [0.0; 3],
                }
            })
            .collect(),
        None => Vec::new(),
    };
    let rows: Vec<Vec<(usize, usize, usize)>> = (0..frames * atoms)
        .into_par_iter()
        .map(|g| {
            let (f, i) = (g / atoms, g % atoms);
            let mut out = Vec::new();
            if !real(g) {
                return out;
            }
            let xi = point(positions, g);
            for j in 0..atoms {
                let h = f * atoms + j;
                if j == i || !real(h) {
                    continue;
                }
                let shift = match &boxes {
                    Some(b) => {
                        let m = [0, 1, 2].map(|k| -(frac[h][k] - frac[g][k]).round() as i32);
                        lattice_shift(m, &b.rows[f])
                    }
                    None => [0.0; 3],
                };
                if pair_dist2(xi, point(positions, h), shift) < cutoff2 {
                    out.push((f, i, j));
                }
            }
            out
        })
        .collect();
    Ok(rows.into_iter().flatten().collect())
}

// ----------------------------------------------------------------------------- device list --

/// The neighbor list on a device: what the atom-stage message-passing kernels read.
///
/// Row `f * A + i` (a CSR by destination atom) lists the incoming edges `j -> i` of atom i of
/// frame f; `col` holds the global source index `f * A + j`, ascending within a row; `reverse[e]`
/// is the index of the mirror edge `i -> j` in row j, so the backward pass gathers over the
/// transposed graph without atomics; with a box, `shift [E, 3]` is the lattice vector to add to
/// `x_j` (`vec_ij = x_j + shift_e - x_i`). See the module documentation for the rules.
#[derive(Debug)]
pub struct NeighborList {
    frames: usize,
    atoms: usize,
    cutoff: f32,
    row_ptr: Tensor<i32>,
    col: Tensor<i32>,
    reverse: Tensor<i32>,
    shift: Option<Tensor<f32>>,
}

impl NeighborList {
    /// Builds the radius graph of `positions` (`[F, A, 3]`, or `[A, 3]` for one frame, f32
    /// Angstrom) on their device: every pair `i != j` of one frame with distance `< cutoff`, both
    /// directions.
    ///
    /// `cells`: `None` for open boundaries, or one [`UnitCell`] per frame (or one for all frames)
    /// for the minimum image convention; each box's smallest perpendicular width must exceed twice
    /// the cutoff. `mask` (`[F, A]`, same device, optional): 0 marks padding atoms, which get no
    /// edges and whose coordinates are never read.
    ///
    /// Errors (clear, naming the frame and atom where there is one): shapes, devices, a cutoff
    /// that is not positive and finite, a box too small for the cutoff or without volume, a
    /// non-finite coordinate of a real atom, an atom more than 2^20 box lengths outside its box,
    /// more than 2^31 - 1 edges. On cuda the build waits once for the device, to learn the edge
    /// count it allocates exactly.
    pub fn build(
        positions: &Tensor<f32>,
        cutoff: f32,
        cells: Option<&[UnitCell]>,
        mask: Option<&Tensor<u8>>,
    ) -> Result<Self> {
        let op = "NeighborList::build";
        let (frames, atoms) = match *positions.shape() {
            [f, a, 3] => (f, a),
            [a, 3] => (1, a),
            _ => bail!(
                "{op}: positions have shape {:?}, expected [frames, atoms, 3] or [atoms, 3]",
                positions.shape()
            ),
        };
        let mut others = Vec::new();
        others.extend(mask.map(|m| m.device()));
        let dev = same_device(op, positions.device(), &others)?;
        let n = check_sizes(
            op,
            positions.len(),
            frames,
            atoms,
            cutoff,
            mask.map(|m| m.len()),
        )?;
        match dev {
            Device::Cpu => build_cpu(
                op,
                positions.host().unwrap(),
                frames,
                atoms,
                cutoff,
                cells,
                mask.map(|m| m.host().unwrap()),
            ),
            _ => build_device(op, dev, positions, frames, atoms, n, cutoff, cells, mask),
        }
    }

    /// Rows F A.
    pub fn rows(&self) -> usize {
        self.frames * self.atoms
    }
    /// Edges E (each neighbour pair counts twice).
    pub fn edges(&self) -> usize {
        self.col.len()
    }
    /// Frames F.
    pub fn frames(&self) -> usize {
        self.frames
    }
    /// Atoms per frame A.
    pub fn atoms_per_frame(&self) -> usize {
        self.atoms
    }
    /// The cutoff in Angstrom.
    pub fn cutoff(&self) -> f32 {
        self.cutoff
    }
    /// `[F A + 1]` row offsets.
    pub fn row_ptr(&self) -> &Tensor<i32> {
        &self.row_ptr
    }
    /// `[E]` global source atom of each edge.
    pub fn col(&self) -> &Tensor<i32> {
        &self.col
    }
    /// `[E]` index of each edge's mirror.
    pub fn reverse(&self) -> &Tensor<i32> {
        &self.reverse
    }
    /// `[E, 3]` periodic image offsets to add to `x_j`; `None` without a box.
    pub fn shift(&self) -> Option<&Tensor<f32>> {
        self.shift.as_ref()
    }
    /// The device it lives on.
    pub fn device(&self) -> &Device {
        self.row_ptr.device()
    }
    /// Copies the list to host vectors (waits for the device on cuda).
    pub fn to_host(&self) -> Result<HostNeighborList> {
        Ok(HostNeighborList {
            frames: self.frames,
            atoms: self.atoms,
            cutoff: self.cutoff,
            row_ptr: self.row_ptr.to_vec()?,
            col: self.col.to_vec()?,
            reverse: self.reverse.to_vec()?,
            shift: match &self.shift {
                Some(s) => Some(s.to_vec()?),
                None => None,
            },
        })
    }
}

/// The kernels' address of an optional tensor: a null pointer for `None`.
fn address_or_null<T: crate::tensor::Element>(t: Option<&Tensor<T>>) -> i64 {
    t.map_or(0, |t| t.address() as i64)
}

/// A launch of `items` grid-stride work items.
fn per_item(items: usize) -> LaunchConfig {
    LaunchConfig::for_elements(items, THREADS)
}

/// Exclusive scan of `input` (`[n]`) into `out` (`[n + 1]`, `out[n]` = the total); `total_out`,
/// when not 0, is the address of two ints that receive the 64-bit total, low word first.
fn exclusive_scan(
    dev: &Device,
    input: &Tensor<i32>,
    out: &mut Tensor<i32>,
    total_out: i64,
) -> Result<()> {
    let n = input.len();
    let tiles = n.div_ceil(SCAN_TILE);
    // One 64-bit sum per tile, held as u32 pairs (tensors have no i64 type; allocations are
    // 256-byte aligned).
    let mut sums = Tensor::<u32>::zeros(dev, &[2 * tiles.max(1)])?;
    let grid = LaunchConfig {
        grid: [tiles.clamp(1, 65_535) as u32, 1, 1],
        block: [THREADS, 1, 1],
        shared_bytes: 0,
    };
    launch(
        dev,
        &k::NEIGHBOR_SCAN_TILES,
        grid,
        KernelArgs::new()
            .input(input)
            .i64(n as i64)
            .output(&mut sums),
    )?;
    launch(
        dev,
        &k::NEIGHBOR_SCAN_OFFSETS,
        LaunchConfig {
            grid: [1, 1, 1],
            ..grid
        },
        KernelArgs::new()
            .output(&mut sums)
            .i64(tiles as i64)
            .i64(n as i64)
            .output(out)
            .i64(total_out),
    )?;
    launch(
        dev,
        &k::NEIGHBOR_SCAN_APPLY,
        grid,
        KernelArgs::new()
            .input(input)
            .i64(n as i64)
            .input(&sums)
            .output(out),
    )
}

#[allow(clippy::too_many_arguments)] // the build's inputs and the sizes derived from them
fn build_device(
    op: &str,
    dev: &Device,
    positions: &Tensor<f32>,
    frames: usize,
    atoms: usize,
    n: usize,
    cutoff: f32,
    cells: Option<&[UnitCell]>,
    mask: Option<&Tensor<u8>>,
) -> Result<NeighborList> {
    let cap = cell_capacity(atoms);
    let boxes = match cells {
        Some(c) => Some(Boxes::new(op, c, frames, cutoff, cap)?),
        None => None,
    };
    if n == 0 {
        return HostNeighborList {
            frames,
            atoms,
            cutoff,
            row_ptr: vec![0],
            col: Vec::new(),
            reverse: Vec::new(),
            shift: boxes.as_ref().map(|_| Vec::new()),
        }
        .to_device(dev);
    }
    let total_cells = frames * cap;
    let width = cutoff as f64 * (1.0 + CELL_MARGIN);
    let mask_addr = address_or_null(mask);

    // Pass 1: the cell grid of every frame (from the host with a box, else the bounding box).
    let (grid_dims, grid_origin, box_rows, box_inv) = match &boxes {
        Some(b) => (
            Tensor::from_slice(dev, &[frames, 3], b.dims.concat().as_slice())?,
            None,
            Some(Tensor::from_slice(dev, &[frames, 9], &b.rows.concat())?),
            Some(Tensor::from_slice(dev, &[frames, 9], &b.inverse.concat())?),
        ),
        None => {
            let mut dims = Tensor::<i32>::zeros(dev, &[frames, 3])?;
            let mut origin = Tensor::<f64>::zeros(dev, &[frames, 4])?;
            launch(
                dev,
                &k::NEIGHBOR_FRAME_BOUNDS,
                LaunchConfig {
                    grid: [frames.min(65_535) as u32, 1, 1],
                    block: [THREADS, 1, 1],
                    shared_bytes: 0,
                },
                KernelArgs::new()
                    .input(positions)
                    .i64(mask_addr)
                    .i32(frames as i32)
                    .i32(atoms as i32)
                    .f64(width)
                    .i64(cap as i64)
                    .output(&mut dims)
                    .output(&mut origin),
            )?;
            (dims, Some(origin), None, None)
        }
    };

    // Pass 2: cells, wraps, the histogram, and the first bad atom of each frame. The status holds
    // one key per frame (i32::MAX: no bad atom), then the 64-bit edge total.
    let mut status_init = vec![i32::MAX; frames + 2];
    status_init[frames] = 0;
    status_init[frames + 1] = 0;
    let mut status = Tensor::from_slice(dev, &[frames + 2], &status_init)?;
    let mut atom_cell = Tensor::<i32>::zeros(dev, &[n])?;
    let mut atom_image = Tensor::<i32>::zeros(dev, &[n, 3])?;
    let mut cell_count = Tensor::<i32>::zeros(dev, &[total_cells])?;
    launch(
        dev,
        &k::NEIGHBOR_CELL_ASSIGN,
        per_item(n),
        KernelArgs::new()
            .input(positions)
            .i64(mask_addr)
            .i64(n as i64)
            .i32(atoms as i32)
            .i64(address_or_null(box_inv.as_ref()))
            .input(&grid_dims)
            .i64(address_or_null(grid_origin.as_ref()))
            .i64(cap as i64)
            .output(&mut atom_cell)
            .output(&mut atom_image)
            .output(&mut cell_count)
            .output(&mut status),
    )?;

    // Passes 3-5: counting sort by cell, each cell's atoms by index.
    let mut cell_start = Tensor::<i32>::zeros(dev, &[total_cells + 1])?;
    exclusive_scan(dev, &cell_count, &mut cell_start, 0)?;
    let mut sorted_atom = Tensor::<i32>::zeros(dev, &[n])?;
    launch(
        dev,
        &k::NEIGHBOR_CELL_SCATTER,
        per_item(n),
        KernelArgs::new()
            .input(&atom_cell)
            .i64(n as i64)
            .input(&cell_start)
            .output(&mut cell_count)
            .output(&mut sorted_atom),
    )?;
    let mut sorted_xyz = Tensor::<f32>::zeros(dev, &[n, 3])?;
    let mut sorted_image = Tensor::<i32>::zeros(dev, &[n, 3])?;
    launch(
        dev,
        &k::NEIGHBOR_CELL_SORT,
        per_item(total_cells),
        KernelArgs::new()
            .input(&cell_start)
            .i64(total_cells as i64)
            .output(&mut sorted_atom)
            .input(positions)
            .input(&atom_image)
            .output(&mut sorted_xyz)
            .output(&mut sorted_image),
    )?;

    // Passes 6-7: count, scan into row_ptr.
    let cutoff2 = cutoff as f64 * cutoff as f64;
    let walk = |args: KernelArgs| {
        args.input(&cell_start)
            .i64(total_cells as i64)
            .input(&sorted_atom)
            .input(&sorted_xyz)
            .input(&sorted_image)
            .input(&atom_cell)
            .input(&grid_dims)
            .i64(address_or_null(box_rows.as_ref()))
            .i32(atoms as i32)
            .i64(cap as i64)
            .f64(cutoff2)
    };
    let mut counts = Tensor::<i32>::zeros(dev, &[n])?;
    launch(
        dev,
        &k::NEIGHBOR_COUNT,
        per_item(n),
        walk(KernelArgs::new()).output(&mut counts),
    )?;
    let mut row_ptr = Tensor::<i32>::zeros(dev, &[n + 1])?;
    let total_addr = status.address() as i64 + 4 * frames as i64;
    exclusive_scan(dev, &counts, &mut row_ptr, total_addr)?;

    // The one wait: errors and the edge count.
    let st = status.to_vec()?;
    if let Some(f) = (0..frames).find(|&f| st[f] != i32::MAX) {
        let (a, reason) = ((st[f] / 4) as usize, st[f] % 4);
        let g = f * atoms + a;
        let p = positions.to_vec()?;
        return Err(bad_atom(op, f, a, reason, point(&p, g)));
    }
    let total = st[frames] as u32 as u64 | (st[frames + 1] as u32 as u64) << 32;
    ensure!(
        total <= i32::MAX as u64,
        "{op}: {total} edges, more than 2^31 - 1 (lower the cutoff or split the batch)"
    );
    let e = total as usize;

    // Passes 8-9: columns and shifts, sorted rows, mirrors.
    let mut col = Tensor::<i32>::zeros(dev, &[e])?;
    let shift = match &boxes {
        Some(_) => Some(Tensor::<f32>::zeros(dev, &[e, 3])?),
        None => None,
    };
    let shift_addr = address_or_null(shift.as_ref());
    launch(
        dev,
        &k::NEIGHBOR_FILL,
        per_item(n),
        walk(KernelArgs::new())
            .input(&row_ptr)
            .output(&mut col)
            .i64(shift_addr),
    )?;
    let mut reverse = Tensor::<i32>::zeros(dev, &[e])?;
    launch(
        dev,
        &k::NEIGHBOR_REVERSE,
        per_item(n),
        KernelArgs::new()
            .input(&row_ptr)
            .input(&col)
            .i64(n as i64)
            .output(&mut reverse),
    )?;
    Ok(NeighborList {
        frames,
        atoms,
        cutoff,
        row_ptr,
        col,
        reverse,
        shift,
    })
}
