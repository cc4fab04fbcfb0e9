//! Generated protein-like systems for benchmarks and the peer cross-check: residues along a chain
//! at the density of folded proteins, with heavy atoms at their real density, so neighbor counts,
//! C-alpha graphs and token counts are those of real structures of the same size.
//!
//! The chain is a serpentine through a cube: consecutive C-alpha atoms 3.8 A apart along rows,
//! rows 5.96 A apart, which gives one residue per 135 A^3 (a folded protein: 1.35 g/cm^3 at
//! ~110 Da per residue) and about 16 C-alpha neighbours within 8 A. Each residue carries 7 or 8
//! heavy atoms (ADK: 1,656 heavy atoms for 214 residues = 7.74) on a jittered 2 A cube around
//! its C-alpha, i.e. ~0.057 heavy atoms per A^3 and 20-30 neighbours within 5 A.

use crate::testing::Rng;

/// Spacing of consecutive C-alpha atoms along the chain (A).
pub const CA_STEP: f64 = 3.8;
/// Volume per residue in a folded protein (A^3).
pub const RESIDUE_VOLUME: f64 = 135.0;
/// Edge of the cube around each C-alpha whose corners hold the residue's other heavy atoms (A).
/// With the jitters (0.15 A on C-alpha coordinates, 0.2 A on the others) no two atoms of
/// neighbouring residues come closer than 3.8 - 2 - 2 (0.15 + 0.2) = 1.1 A.
const CUBE: f64 = 2.0;

/// A generated protein-like structure.
#[derive(Clone, Debug)]
pub struct ProteinLike {
    /// C-alpha positions `[R, 3]` (A).
    pub ca: Vec<f32>,
    /// Heavy-atom positions `[A, 3]` (A); the first atom of every residue is its C-alpha.
    pub atoms: Vec<f32>,
    /// Atomic number of each atom.
    pub z: Vec<u8>,
    /// Residue (token) of each atom.
    pub residue: Vec<u32>,
    /// Index of each residue's C-alpha atom.
    pub ca_atom: Vec<usize>,
}

impl ProteinLike {
    /// A chain of `residues` residues, seeded.
    pub fn new(residues: usize, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let ca = serpentine(residues, &mut rng);
        // Elements of the heavy atoms after the C-alpha: backbone N, C, O, then side-chain C, C,
        // O/N, and every other residue an eighth atom (S every 16th residue, else C).
        const SIDE: [u8; 6] = [7, 6, 8, 6, 6, 8];
        let corners: [[f64; 3]; 7] = [
            [1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0],
            [1.0, 1.0, 0.0],
            [1.0, 0.0, 1.0],
            [0.0, 1.0, 1.0],
            [1.0, 1.0, 1.0],
        ];
        let (mut atoms, mut z, mut residue, mut ca_atom) = (vec![], vec![], vec![], vec![]);
        for r in 0..residues {
            let c = [ca[3 * r] as f64, ca[3 * r + 1] as f64, ca[3 * r + 2] as f64];
            ca_atom.push(z.len());
            atoms.extend(c.map(|x| x as f32));
            z.push(6);
            residue.push(r as u32);
            let n = if r % 2 == 0 { 7 } else { 6 };
            for (k, corner) in corners.iter().take(n).enumerate() {
                for d in 0..3 {
                    let jitter = 0.2 * (2.0 * rng.uniform() - 1.0);
                    atoms.push((c[d] + CUBE * (corner[d] - 0.5) + jitter) as f32);
                }
                z.push(match k {
                    6 if r % 16 == 1 => 16,
                    6 => 6,
                    k => SIDE[k],
                });
                residue.push(r as u32);
            }
        }
        Self {
            ca,
            atoms,
            z,
            residue,
            ca_atom,
        }
    }

    /// Residues R.
    pub fn residues(&self) -> usize {
        self.ca.len() / 3
    }

    /// Heavy atoms A.
    pub fn atom_count(&self) -> usize {
        self.z.len()
    }

    /// `frames` thermal copies of `positions` (`[N, 3]`): each coordinate displaced by a
    /// normal(0, `sigma`) step, as frames of a trajectory would be. Returns `[F, N, 3]`.
    pub fn frames(positions: &[f32], frames: usize, sigma: f64, rng: &mut Rng) -> Vec<f32> {
        let mut out = Vec::with_capacity(frames * positions.len());
        for _ in 0..frames {
            let d = rng.normal_vec(positions.len(), sigma);
            out.extend(positions.iter().zip(d).map(|(x, d)| x + d));
        }
        out
    }
}

/// C-alpha positions of a serpentine chain filling a cube at [`RESIDUE_VOLUME`] per residue.
fn serpentine(residues: usize, rng: &mut Rng) -> Vec<f32> {
    let row = (RESIDUE_VOLUME / CA_STEP).sqrt(); // spacing of rows, so that density is right
    let side = (residues as f64 * RESIDUE_VOLUME).cbrt();
    let per_row = ((side / CA_STEP).round() as usize).max(1);
    let rows_per_layer = ((side / row).round() as usize).max(1);
    let mut ca = Vec::with_capacity(3 * residues);
    for i in 0..residues {
        let (rw, k) = (i / per_row, i % per_row);
        let (layer, in_layer) = (rw / rows_per_layer, rw % rows_per_layer);
        // Reverse every other row (and every other layer's row order) so that the chain turns
        // around instead of jumping back: consecutive residues stay ~3.8 A apart.
        let k = if rw % 2 == 1 { per_row - 1 - k } else { k };
        let in_layer = if layer % 2 == 1 {
            rows_per_layer - 1 - in_layer
        } else {
            in_layer
        };
        let p = [
            k as f64 * CA_STEP,
            in_layer as f64 * row,
            layer as f64 * row,
        ];
        for x in p {
            ca.push((x + 0.15 * (2.0 * rng.uniform() - 1.0)) as f32);
        }
    }
    ca
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dist(a: &[f32], i: usize, j: usize) -> f64 {
        (0..3)
            .map(|d| (a[3 * i + d] as f64 - a[3 * j + d] as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    }

    #[test]
    fn protein_like_density_and_chain() {
        let p = ProteinLike::new(214, 7);
        assert_eq!(p.residues(), 214);
        // ADK's ratio of heavy atoms to residues (7.74).
        let ratio = p.atom_count() as f64 / 214.0;
        assert!((7.3..8.2).contains(&ratio), "atoms per residue {ratio}");
        // Consecutive C-alpha atoms: the chain never jumps.
        for r in 1..214 {
            let d = dist(&p.ca, r - 1, r);
            assert!(
                (2.5..7.0).contains(&d),
                "CA {r} is {d} A from the previous one"
            );
        }
        // C-alpha neighbours within 8 A, and heavy-atom neighbours within 5 A, in the bulk.
        let mean_nb = |x: &[f32], n: usize, cut: f64| {
            let mut total = 0usize;
            for i in 0..n {
                total += (0..n).filter(|&j| j != i && dist(x, i, j) < cut).count();
            }
            total as f64 / n as f64
        };
        let nca = mean_nb(&p.ca, 214, 8.0);
        assert!((7.0..20.0).contains(&nca), "C-alpha neighbours {nca}");
        let nat = mean_nb(&p.atoms, p.atom_count(), 5.0);
        assert!((12.0..35.0).contains(&nat), "heavy-atom neighbours {nat}");
        // No two atoms on top of each other.
        let a = p.atom_count();
        let mut closest = f64::MAX;
        for i in 0..a {
            for j in 0..i {
                closest = closest.min(dist(&p.atoms, i, j));
            }
        }
        assert!(closest > 0.8, "two atoms {closest} A apart");
    }
}
