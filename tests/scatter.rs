//! Atom-stage scatters (src/ops/scatter.rs, cuda/scatter.cu, src/nn/atoms.rs): the atomic-number
//! embedding and the atom-to-token merge, forward and backward, on every device against the f64
//! host twins and a naive loop; finite differences and the adjoint identity; bitwise repeatable
//! results; rotation equivariance of merged vectors; gradients through the tape; the errors.

use anyhow::{ensure, Result};
use hiermd::nn::atoms::{embedding, token_merge, Reduce};
use hiermd::nn::silu;
use hiermd::ops::elementwise::{silu_backward_host, silu_forward_host};
use hiermd::ops::scatter::{
    embedding_backward, embedding_backward_host, embedding_backward_with_scratch,
    embedding_forward, embedding_forward_host, token_merge_backward, token_merge_backward_host,
    token_merge_forward, token_merge_forward_host, EmbeddingIndex, TokenMap, EMBEDDING_CHUNK,
    EXCLUDED,
};
use hiermd::tape::{Init, ParamStore, Tape};
use hiermd::testing::{assert_close, check_gradient, Rng};
use hiermd::{device_test, Device, Tensor};
use std::sync::Arc;

const EPS: f64 = f32::EPSILON as f64;
const HIDDEN: [usize; 4] = [1, 8, 33, 64];
const REDUCES: [Reduce; 2] = [Reduce::Sum, Reduce::Mean];
/// Rows of the embedding table: atomic numbers below 100 (SPEC).
const VOCAB: usize = 100;

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Atom counts: one atom, a ragged handful, and a protein-sized system (smaller on emu, which
/// runs every CUDA thread as a fiber).
fn atom_counts(dev: &Device) -> [usize; 3] {
    match dev {
        Device::Emu(_) => [1, 17, 300],
        _ => [1, 17, 1656],
    }
}

fn shuffle<T>(rng: &mut Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}

/// A residue-like map: runs of 1 to 14 atoms per token, some token ids skipped (tokens without
/// atoms, some at the end too), about 10% of the atoms left out, and the atom order shuffled.
/// Returns the map and the token count.
fn random_map(rng: &mut Rng, atoms: usize) -> (Vec<u32>, usize) {
    let mut ids = Vec::with_capacity(atoms);
    let mut t = 0u32;
    while ids.len() < atoms {
        if rng.uniform() < 0.15 {
            t += 1;
        }
        let size = (1 + rng.below(14)).min(atoms - ids.len());
        ids.extend(std::iter::repeat_n(t, size));
        t += 1;
    }
    for id in &mut ids {
        if rng.uniform() < 0.1 {
            *id = EXCLUDED;
        }
    }
    shuffle(rng, &mut ids);
    (ids, t as usize + rng.below(3))
}

/// The maps each test runs: a residue-like one, and one token holding every atom (a custom map:
/// one long gather).
fn maps(rng: &mut Rng, atoms: usize) -> Vec<(Vec<u32>, usize)> {
    vec![random_map(rng, atoms), (vec![0; atoms], 1)]
}

/// Heavy-atom elements in protein-like proportions (C, N, O, S).
fn random_elements(rng: &mut Rng, atoms: usize) -> Vec<i32> {
    (0..atoms)
        .map(|_| match rng.uniform() {
            u if u < 0.6 => 6,
            u if u < 0.77 => 7,
            u if u < 0.97 => 8,
            _ => 16,
        })
        .collect()
}

/// The merge by a plain loop over atoms, independent of the CSR: the reference values and, per
/// element, a bound on the error of any f32 evaluation ((terms + 1) * sum |terms|, over the
/// count for a mean).
fn naive_merge(
    ids: &[u32],
    tokens: usize,
    x: &[f64],
    frames: usize,
    inner: usize,
    reduce: Reduce,
) -> (Vec<f64>, Vec<f64>) {
    let atoms = ids.len();
    let mut count = vec![0usize; tokens];
    for &t in ids.iter().filter(|&&t| t != EXCLUDED) {
        count[t as usize] += 1;
    }
    let mut out = vec![0.0; frames * tokens * inner];
    let mut abs = vec![0.0; frames * tokens * inner];
    for f in 0..frames {
        for (a, &t) in ids.iter().enumerate() {
            if t == EXCLUDED {
                continue;
            }
            for k in 0..inner {
                let o = (f * tokens + t as usize) * inner + k;
                let v = x[(f * atoms + a) * inner + k];
                out[o] += v;
                abs[o] += v.abs();
            }
        }
    }
    for (i, (o, b)) in out.iter_mut().zip(&mut abs).enumerate() {
        let n = count[(i / inner) % tokens];
        *b *= (n + 1) as f64;
        if reduce == Reduce::Mean && n > 0 {
            *o /= n as f64;
            *b /= n as f64;
        }
    }
    (out, abs)
}

/// Checks `|got - want| <= eps * bound + 1e-30` element by element (NaN fails).
fn assert_within(what: &str, got: &[f32], want: &[f64], bound: &[f64]) -> Result<()> {
    ensure!(
        got.len() == want.len(),
        "{what}: {} values, reference has {}",
        got.len(),
        want.len()
    );
    for (i, ((&g, &w), &b)) in got.iter().zip(want).zip(bound).enumerate() {
        let d = (g as f64 - w).abs();
        ensure!(
            d <= EPS * b + 1e-30,
            "{what}: element {i} is {g} but the reference is {w} (|diff| {d:.3e} > bound {:.3e})",
            EPS * b
        );
    }
    Ok(())
}

/// Atom features `[F, A, H]` (c = 1) or `[F, A, 3, H]`, with the token shape beside them.
fn shapes(frames: usize, n: usize, c: usize, h: usize, tokens: usize) -> (Vec<usize>, Vec<usize>) {
    if c == 1 {
        (vec![frames, n, h], vec![frames, tokens, h])
    } else {
        (vec![frames, n, c, h], vec![frames, tokens, c, h])
    }
}

fn poisoned(dev: &Device, shape: &[usize]) -> Result<Tensor<f32>> {
    let mut t = Tensor::zeros(dev, shape)?;
    t.poison()?;
    Ok(t)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

// --------------------------------------------------------------------------------- maps --

/// The CSR of a token map and the chunks of an embedding index, against the maps they come from.
#[test]
fn token_map_csr_groups_atoms_ascending() -> Result<()> {
    let mut rng = Rng::for_test("token_map_csr_groups_atoms_ascending");
    for atoms in [0, 1, 17, 1656] {
        let (ids, tokens) = random_map(&mut rng, atoms);
        let map = TokenMap::new(&ids, tokens)?;
        ensure!(map.tokens() == tokens && map.atoms() == atoms);
        let rp = map.row_ptr();
        ensure!(rp.len() == tokens + 1 && rp[0] == 0);
        let included = ids.iter().filter(|&&t| t != EXCLUDED).count();
        ensure!(rp[tokens] as usize == included && map.atom_idx().len() == included);
        for r in 0..tokens {
            let members = &map.atom_idx()[rp[r] as usize..rp[r + 1] as usize];
            ensure!(
                members.windows(2).all(|w| w[0] < w[1]),
                "token {r} not ascending"
            );
            ensure!(members.iter().all(|&a| ids[a as usize] == r as u32));
            ensure!(map.count(r) == ids.iter().filter(|&&t| t == r as u32).count());
        }
        for (a, &t) in ids.iter().enumerate() {
            let want = if t == EXCLUDED { -1 } else { t as i32 };
            ensure!(map.token_of_atom()[a] == want, "atom {a}");
        }
        // The same map from signed ids, and with the token count taken from the ids.
        let signed: Vec<i32> = map.token_of_atom().to_vec();
        ensure!(TokenMap::from_i32(&signed, tokens)? == map);
        let spanning = TokenMap::from_map(&ids)?;
        let max = ids.iter().filter(|&&t| t != EXCLUDED).max();
        ensure!(spanning.tokens() == max.map_or(0, |&t| t as usize + 1));
    }
    // Chunks of the embedding index: a row of n atoms has ceil(n / EMBEDDING_CHUNK) of them.
    let z = random_elements(&mut rng, 1656);
    let idx = EmbeddingIndex::new(&z, VOCAB)?;
    let want: usize = (0..VOCAB)
        .map(|r| {
            z.iter()
                .filter(|&&v| v == r as i32)
                .count()
                .div_ceil(EMBEDDING_CHUNK)
        })
        .sum();
    ensure!(
        idx.chunks() == want,
        "{} chunks, expected {want}",
        idx.chunks()
    );
    Ok(())
}

// -------------------------------------------------------------------------- token merge --

device_test!(token_merge_matches_reference, |dev| {
    let mut rng = Rng::for_test("token_merge_matches_reference");
    for atoms in atom_counts(dev) {
        for (ids, tokens) in maps(&mut rng, atoms) {
            let map = TokenMap::new(&ids, tokens)?;
            let dmap = map.to_device(dev)?;
            for h in HIDDEN {
                for (frames, c) in [(1, 1), (4, 1), (1, 3), (4, 3)] {
                    let inner = c * h;
                    let (xs, ts) = shapes(frames, atoms, c, h, tokens);
                    let x = rng.normal_vec(frames * atoms * inner, 1.0);
                    let dy = rng.normal_vec(frames * tokens * inner, 1.0);
                    let xt = Tensor::from_slice(dev, &xs, &x)?;
                    let dyt = Tensor::from_slice(dev, &ts, &dy)?;
                    for reduce in REDUCES {
                        let what =
                            format!("A={atoms} R={tokens} F={frames} C={c} H={h} {reduce:?}");
                        let (naive, bound) =
                            naive_merge(&ids, tokens, &to64(&x), frames, inner, reduce);
                        let mut want = vec![f64::NAN; naive.len()];
                        token_merge_forward_host(
                            map.view(),
                            &to64(&x),
                            &mut want,
                            frames,
                            inner,
                            reduce,
                        );
                        for (w, n) in want.iter().zip(&naive) {
                            ensure!((w - n).abs() <= 1e-12 * (1.0 + n.abs()), "host twin {what}");
                        }
                        let mut out = poisoned(dev, &ts)?;
                        token_merge_forward(&dmap, &xt, &mut out, reduce)?;
                        assert_within(
                            &format!("token_merge_forward {what}"),
                            &out.to_vec()?,
                            &want,
                            &bound,
                        )?;

                        // Backward: every included atom gets its token's gradient (over the count
                        // for a mean), left-out atoms 0; one rounding at most.
                        let mut want_dx = vec![f64::NAN; x.len()];
                        token_merge_backward_host(
                            map.view(),
                            &to64(&dy),
                            &mut want_dx,
                            frames,
                            inner,
                            reduce,
                        );
                        for (i, &g) in want_dx.iter().enumerate() {
                            let t = ids[(i / inner) % atoms];
                            let naive = if t == EXCLUDED {
                                0.0
                            } else {
                                let f = i / inner / atoms;
                                let d = dy[(f * tokens + t as usize) * inner + i % inner] as f64;
                                match reduce {
                                    Reduce::Sum => d,
                                    Reduce::Mean => d / map.count(t as usize) as f64,
                                }
                            };
                            ensure!(g == naive, "host backward {what}: element {i}");
                        }
                        let mut dx = poisoned(dev, &xs)?;
                        token_merge_backward(&dmap, &dyt, &mut dx, reduce)?;
                        assert_close(
                            &format!("token_merge_backward {what}"),
                            &dx.to_vec()?,
                            &want_dx,
                            0.0,
                            EPS,
                        )?;
                    }
                }
            }
        }
    }
    Ok(())
});

device_test!(token_merge_accepts_single_frame_features, |dev| {
    let mut rng = Rng::for_test("token_merge_accepts_single_frame_features");
    let (ids, tokens) = random_map(&mut rng, 40);
    let map = TokenMap::new(&ids, tokens)?;
    let dmap = map.to_device(dev)?;
    let h = 5;
    let x = rng.normal_vec(40 * h, 1.0);
    let mut want = vec![0.0; tokens * h];
    token_merge_forward_host(map.view(), &to64(&x), &mut want, 1, h, Reduce::Mean);
    let mut out = poisoned(dev, &[tokens, h])?;
    token_merge_forward(
        &dmap,
        &Tensor::from_slice(dev, &[40, h], &x)?,
        &mut out,
        Reduce::Mean,
    )?;
    assert_close("[A, H] features", &out.to_vec()?, &want, 1e-6, 1e-6)?;
    Ok(())
});

/// The backward of each op against central differences of L = sum(w * y), on the f64 twins.
#[test]
fn backward_matches_finite_differences() {
    let mut rng = Rng::for_test("backward_matches_finite_differences");
    let (frames, atoms, inner) = (2, 23, 6);
    let (ids, tokens) = random_map(&mut rng, atoms);
    let map = TokenMap::new(&ids, tokens).unwrap();
    let x: Vec<f64> = (0..frames * atoms * inner).map(|_| rng.normal()).collect();
    let w: Vec<f64> = (0..frames * tokens * inner).map(|_| rng.normal()).collect();
    for reduce in REDUCES {
        let loss = |x: &[f64]| {
            let mut y = vec![0.0; w.len()];
            token_merge_forward_host(map.view(), x, &mut y, frames, inner, reduce);
            dot(&y, &w)
        };
        let mut g = vec![0.0; x.len()];
        token_merge_backward_host(map.view(), &w, &mut g, frames, inner, reduce);
        check_gradient(&format!("token_merge {reduce:?}"), loss, &x, &g, 1e-6, 1e-8).unwrap();
    }

    let (vocab, h) = (20, 3);
    let z: Vec<i32> = (0..atoms).map(|_| rng.below(vocab) as i32).collect();
    let idx = EmbeddingIndex::new(&z, vocab).unwrap();
    let table: Vec<f64> = (0..vocab * h).map(|_| rng.normal()).collect();
    let w: Vec<f64> = (0..frames * atoms * h).map(|_| rng.normal()).collect();
    let loss = |t: &[f64]| {
        let mut y = vec![0.0; w.len()];
        embedding_forward_host(t, &z, &mut y, h);
        dot(&y, &w)
    };
    let mut g = vec![0.0; table.len()];
    embedding_backward_host(idx.view(), &w, &mut g, frames, h);
    check_gradient("embedding", loss, &table, &g, 1e-6, 1e-8).unwrap();
}

device_test!(adjoint_identity_holds, |dev| {
    // <op(x), y> = <x, op^T(y)> with the device's own forward and backward.
    let mut rng = Rng::for_test("adjoint_identity_holds");
    let atoms = atom_counts(dev)[2];
    let (frames, c, h) = (4, 3, 33);
    let (ids, tokens) = random_map(&mut rng, atoms);
    let dmap = TokenMap::new(&ids, tokens)?.to_device(dev)?;
    let (xs, ts) = shapes(frames, atoms, c, h, tokens);
    let x = rng.normal_vec(frames * atoms * c * h, 1.0);
    let y = rng.normal_vec(frames * tokens * c * h, 1.0);
    for reduce in REDUCES {
        let mut fx = poisoned(dev, &ts)?;
        token_merge_forward(&dmap, &Tensor::from_slice(dev, &xs, &x)?, &mut fx, reduce)?;
        let mut ty = poisoned(dev, &xs)?;
        token_merge_backward(&dmap, &Tensor::from_slice(dev, &ts, &y)?, &mut ty, reduce)?;
        let (lhs, rhs) = (
            dot(&to64(&fx.to_vec()?), &to64(&y)),
            dot(&to64(&x), &to64(&ty.to_vec()?)),
        );
        ensure!(
            (lhs - rhs).abs() <= 1e-5 * (lhs.abs() + rhs.abs() + 1.0),
            "token_merge {reduce:?}: <Mx, y> = {lhs} but <x, M^T y> = {rhs}"
        );
    }

    let z = random_elements(&mut rng, atoms);
    let idx = EmbeddingIndex::new(&z, VOCAB)?.to_device(dev)?;
    let table = rng.normal_vec(VOCAB * h, 1.0);
    let d = rng.normal_vec(frames * atoms * h, 1.0);
    let mut e = poisoned(dev, &[frames, atoms, h])?;
    embedding_forward(&Tensor::from_slice(dev, &[VOCAB, h], &table)?, &idx, &mut e)?;
    let mut dt = Tensor::zeros(dev, &[VOCAB, h])?;
    embedding_backward(
        &idx,
        &Tensor::from_slice(dev, &[frames, atoms, h], &d)?,
        &mut dt,
    )?;
    let (lhs, rhs) = (
        dot(&to64(&e.to_vec()?), &to64(&d)),
        dot(&to64(&table), &to64(&dt.to_vec()?)),
    );
    ensure!(
        (lhs - rhs).abs() <= 1e-5 * (lhs.abs() + rhs.abs() + 1.0),
        "embedding: <Ex, d> = {lhs} but <x, E^T d> = {rhs}"
    );
    Ok(())
});

device_test!(merged_vectors_rotate_with_the_atoms, |dev| {
    let mut rng = Rng::for_test("merged_vectors_rotate_with_the_atoms");
    let atoms = atom_counts(dev)[2];
    let (frames, h) = (2, 8);
    let (ids, tokens) = random_map(&mut rng, atoms);
    let dmap = TokenMap::new(&ids, tokens)?.to_device(dev)?;
    // A random rotation from a unit quaternion.
    let q: Vec<f64> = (0..4).map(|_| rng.normal()).collect();
    let n = dot(&q, &q).sqrt();
    let (w, x, y, z) = (q[0] / n, q[1] / n, q[2] / n, q[3] / n);
    let rot = [
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
    // v [rows, 3, h] -> R v, per row and channel.
    let rotate = |v: &[f64]| -> Vec<f64> {
        let mut out = vec![0.0; v.len()];
        for (o, r) in out.chunks_mut(3 * h).zip(v.chunks(3 * h)) {
            for c in 0..h {
                for i in 0..3 {
                    o[i * h + c] = (0..3).map(|j| rot[i][j] * r[j * h + c]).sum();
                }
            }
        }
        out
    };
    let v = rng.normal_vec(frames * atoms * 3 * h, 1.0);
    let v_rot: Vec<f32> = rotate(&to64(&v)).iter().map(|&x| x as f32).collect();
    let (xs, ts) = shapes(frames, atoms, 3, h, tokens);
    for reduce in REDUCES {
        let merge = |v: &[f32]| -> Result<Vec<f32>> {
            let mut out = poisoned(dev, &ts)?;
            token_merge_forward(&dmap, &Tensor::from_slice(dev, &xs, v)?, &mut out, reduce)?;
            out.to_vec()
        };
        let merged = merge(&v)?;
        assert_close(
            &format!("merge(R v) vs R merge(v) {reduce:?}"),
            &merge(&v_rot)?,
            &rotate(&to64(&merged)),
            1e-5,
            1e-5,
        )?;
    }
    Ok(())
});

// ---------------------------------------------------------------------------- embedding --

device_test!(embedding_matches_reference, |dev| {
    let mut rng = Rng::for_test("embedding_matches_reference");
    for atoms in atom_counts(dev) {
        // Protein elements in a table of 100 rows (most rows unused), and a one-row table.
        let cases = [
            (random_elements(&mut rng, atoms), VOCAB),
            (vec![0; atoms], 1),
        ];
        for (z, vocab) in cases {
            let idx = EmbeddingIndex::new(&z, vocab)?;
            let didx = idx.to_device(dev)?;
            for h in HIDDEN {
                for frames in [1, 4] {
                    let what = format!("N={atoms} V={vocab} F={frames} H={h}");
                    let table = rng.normal_vec(vocab * h, 1.0);
                    let tt = Tensor::from_slice(dev, &[vocab, h], &table)?;
                    let shape = [frames, atoms, h];
                    let mut out = poisoned(dev, &shape)?;
                    embedding_forward(&tt, &didx, &mut out)?;
                    let mut want = vec![f64::NAN; frames * atoms * h];
                    embedding_forward_host(&to64(&table), &z, &mut want, h);
                    for (i, &w) in want.iter().enumerate() {
                        let (a, k) = ((i / h) % atoms, i % h);
                        ensure!(
                            w == table[z[a] as usize * h + k] as f64,
                            "host twin {what}: element {i}"
                        );
                    }
                    // A copy: exact.
                    assert_close(
                        &format!("embedding_forward {what}"),
                        &out.to_vec()?,
                        &want,
                        0.0,
                        0.0,
                    )?;

                    // Backward accumulates onto what dtable held.
                    let d = rng.normal_vec(frames * atoms * h, 1.0);
                    let dt = Tensor::from_slice(dev, &shape, &d)?;
                    let init = rng.normal_vec(vocab * h, 1.0);
                    let mut naive = to64(&init);
                    let mut bound: Vec<f64> = naive.iter().map(|v| v.abs()).collect();
                    let mut terms = vec![0usize; vocab];
                    for f in 0..frames {
                        for (a, &r) in z.iter().enumerate() {
                            terms[r as usize] += 1;
                            for k in 0..h {
                                let v = d[(f * atoms + a) * h + k] as f64;
                                naive[r as usize * h + k] += v;
                                bound[r as usize * h + k] += v.abs();
                            }
                        }
                    }
                    for (i, b) in bound.iter_mut().enumerate() {
                        *b *= (terms[i / h] + 2) as f64;
                    }
                    let mut want = to64(&init);
                    embedding_backward_host(idx.view(), &to64(&d), &mut want, frames, h);
                    for (w, n) in want.iter().zip(&naive) {
                        ensure!(
                            (w - n).abs() <= 1e-12 * (1.0 + n.abs()),
                            "host twin backward {what}"
                        );
                    }
                    let mut dtable = Tensor::from_slice(dev, &[vocab, h], &init)?;
                    embedding_backward(&didx, &dt, &mut dtable)?;
                    assert_within(
                        &format!("embedding_backward {what}"),
                        &dtable.to_vec()?,
                        &want,
                        &bound,
                    )?;
                }
            }
        }
    }
    Ok(())
});

device_test!(repeat_runs_are_bit_identical, |dev| {
    // On emu every launch runs the threads in another order; the results must not change.
    let mut rng = Rng::for_test("repeat_runs_are_bit_identical");
    let atoms = atom_counts(dev)[2];
    let (frames, c, h) = (4, 3, 64);
    let (ids, tokens) = random_map(&mut rng, atoms);
    let dmap = TokenMap::new(&ids, tokens)?.to_device(dev)?;
    let (xs, ts) = shapes(frames, atoms, c, h, tokens);
    let x = Tensor::from_slice(dev, &xs, &rng.normal_vec(frames * atoms * c * h, 1.0))?;
    let dy = Tensor::from_slice(dev, &ts, &rng.normal_vec(frames * tokens * c * h, 1.0))?;
    let z = random_elements(&mut rng, atoms);
    let idx = EmbeddingIndex::new(&z, VOCAB)?.to_device(dev)?;
    let table = Tensor::from_slice(dev, &[VOCAB, h], &rng.normal_vec(VOCAB * h, 1.0))?;
    let de = Tensor::from_slice(
        dev,
        &[frames, atoms, h],
        &rng.normal_vec(frames * atoms * h, 1.0),
    )?;
    let init = rng.normal_vec(VOCAB * h, 1.0);
    let run = || -> Result<Vec<Vec<u32>>> {
        let mut outs = Vec::new();
        for reduce in REDUCES {
            let mut out = poisoned(dev, &ts)?;
            token_merge_forward(&dmap, &x, &mut out, reduce)?;
            let mut dx = poisoned(dev, &xs)?;
            token_merge_backward(&dmap, &dy, &mut dx, reduce)?;
            outs.push(bits(&out.to_vec()?));
            outs.push(bits(&dx.to_vec()?));
        }
        let mut e = poisoned(dev, &[frames, atoms, h])?;
        embedding_forward(&table, &idx, &mut e)?;
        let mut dt = Tensor::from_slice(dev, &[VOCAB, h], &init)?;
        // Poisoned scratch: the first pass must overwrite every partial it reads back.
        let mut scratch = poisoned(dev, &[idx.scratch_len(h) + 7])?;
        embedding_backward_with_scratch(&idx, &de, &mut dt, &mut scratch)?;
        outs.push(bits(&e.to_vec()?));
        outs.push(bits(&dt.to_vec()?));
        Ok(outs)
    };
    let first = run()?;
    for _ in 0..2 {
        ensure!(run()? == first, "a repeat run gave different bits");
    }
    Ok(())
});

// --------------------------------------------------------------------------------- tape --

device_test!(
    tape_gradients_of_embedding_and_merge_match_reference,
    |dev| {
        let mut rng = Rng::for_test("tape_gradients_of_embedding_and_merge_match_reference");
        let atoms = atom_counts(dev)[2];
        let (frames, h) = (4, 33);
        let (ids, tokens) = random_map(&mut rng, atoms);
        let map = TokenMap::new(&ids, tokens)?;
        let dmap = Arc::new(map.to_device(dev)?);
        let z = random_elements(&mut rng, atoms);
        let idx = EmbeddingIndex::new(&z, VOCAB)?;
        let didx = Arc::new(idx.to_device(dev)?);

        let mut ps = ParamStore::new(dev, 3);
        let table = ps.add("embedding", &[VOCAB, h], Init::Normal(1.0))?;
        let mut tape = Tape::new(ps, 1);
        tape.set_poison(true);
        let w = rng.normal_vec(frames * tokens * h, 1.0);
        let v = rng.normal_vec(frames * atoms * 3 * h, 1.0);
        let wv = rng.normal_vec(frames * tokens * 3 * h, 1.0);

        // f64 reference: s = mean-merge(silu(embed(table))), vector tokens = sum-merge(v).
        let table64 = to64(&tape.params().value(table).to_vec()?);
        let mut e = vec![0.0; frames * atoms * h];
        embedding_forward_host(&table64, &z, &mut e, h);
        let mut a = vec![0.0; e.len()];
        silu_forward_host(&e, &mut a);
        let mut s = vec![0.0; w.len()];
        token_merge_forward_host(map.view(), &a, &mut s, frames, h, Reduce::Mean);
        let mut da = vec![0.0; a.len()];
        token_merge_backward_host(map.view(), &to64(&w), &mut da, frames, h, Reduce::Mean);
        let mut de = vec![0.0; e.len()];
        silu_backward_host(&e, &da, &mut de);
        let mut dtable = vec![0.0; table64.len()];
        embedding_backward_host(idx.view(), &de, &mut dtable, frames, h);
        let mut dv = vec![0.0; v.len()];
        token_merge_backward_host(map.view(), &to64(&wv), &mut dv, frames, 3 * h, Reduce::Sum);

        // Two steps without zeroing: the table's gradient accumulates.
        for step in 1..=2 {
            tape.reset();
            let ev = embedding(&mut tape, table, didx.clone(), frames)?;
            let av = silu(&mut tape, ev)?;
            let sv = token_merge(&mut tape, dmap.clone(), av, Reduce::Mean)?;
            ensure!(
                tape.shape(sv) == [frames, tokens, h],
                "{:?}",
                tape.shape(sv)
            );
            assert_close("tape forward", &tape.value(sv).to_vec()?, &s, 1e-5, 1e-5)?;
            tape.backward(sv, Tensor::from_slice(dev, &[frames, tokens, h], &w)?)?;
            let want: Vec<f64> = dtable.iter().map(|g| g * step as f64).collect();
            assert_close(
                &format!("table gradient after step {step}"),
                &tape.params().grad(table).to_vec()?,
                &want,
                1e-4,
                1e-4,
            )?;
        }

        // An input's gradient through the vector merge.
        tape.reset();
        let x = tape.input_with_grad(Tensor::from_slice(dev, &[frames, atoms, 3, h], &v)?)?;
        let t = token_merge(&mut tape, dmap.clone(), x, Reduce::Sum)?;
        tape.backward(t, Tensor::from_slice(dev, &[frames, tokens, 3, h], &wv)?)?;
        let g = tape.grad(x).expect("x needs a gradient").to_vec()?;
        assert_close("vector input gradient", &g, &dv, 0.0, 0.0)?;
        Ok(())
    }
);

// ------------------------------------------------------------------------------- errors --

device_test!(errors_name_the_atom_and_the_operand, |dev| {
    fn has(err: anyhow::Error, text: &str) -> Result<()> {
        let msg = format!("{err:#}");
        ensure!(msg.contains(text), "expected {text:?} in: {msg}");
        Ok(())
    }
    has(
        TokenMap::new(&[0, 5, 1], 3).unwrap_err(),
        "atom 1 maps to token 5, outside the 3 tokens",
    )?;
    has(
        TokenMap::from_i32(&[0, 1, -2], 3).unwrap_err(),
        "atom 2 maps to token -2",
    )?;
    has(
        EmbeddingIndex::new(&[6, 8, 120], VOCAB).unwrap_err(),
        "atom 2 has index 120",
    )?;
    has(
        EmbeddingIndex::new(&[-1], VOCAB).unwrap_err(),
        "atom 0 has index -1",
    )?;
    // Left-out atoms are fine; so are tokens without atoms.
    let map = TokenMap::new(&[2, EXCLUDED, 0, 2], 4)?;
    ensure!(map.count(1) == 0 && map.count(2) == 2);
    let dmap = map.to_device(dev)?;

    let x = Tensor::<f32>::zeros(dev, &[2, 5, 8])?;
    let mut out = Tensor::<f32>::zeros(dev, &[2, 4, 8])?;
    has(
        token_merge_forward(&dmap, &x, &mut out, Reduce::Sum).unwrap_err(),
        "token_merge_forward: x has shape [2, 5, 8]: 5 in its atom/token dimension, the map has 4",
    )?;
    let x = Tensor::<f32>::zeros(dev, &[2, 4, 3, 8])?;
    has(
        token_merge_forward(&dmap, &x, &mut out, Reduce::Sum).unwrap_err(),
        "token_merge_forward: out has shape [2, 4, 8], expected [2, 4, 3, 8]",
    )?;
    let mut dx = Tensor::<f32>::zeros(dev, &[2, 4, 3, 8])?;
    has(
        token_merge_backward(&dmap, &out, &mut dx, Reduce::Mean).unwrap_err(),
        "token_merge_backward: dout has shape [2, 4, 8]",
    )?;

    let idx = EmbeddingIndex::new(&[6, 6, 8], VOCAB)?.to_device(dev)?;
    let table = Tensor::<f32>::zeros(dev, &[50, 8])?;
    let mut e = Tensor::<f32>::zeros(dev, &[3, 8])?;
    has(
        embedding_forward(&table, &idx, &mut e).unwrap_err(),
        "embedding_forward: table has shape [50, 8] but the index is for a table of 100 rows",
    )?;
    let table = Tensor::<f32>::zeros(dev, &[VOCAB, 8])?;
    let mut e = Tensor::<f32>::zeros(dev, &[2, 4, 8])?;
    has(
        embedding_forward(&table, &idx, &mut e).unwrap_err(),
        "embedding_forward: out has shape [2, 4, 8], expected [.., 3, 8]",
    )?;
    if !matches!(dev, Device::Cpu) {
        let d = Tensor::<f32>::zeros(dev, &[3, 8])?;
        let mut dt = Tensor::<f32>::zeros(dev, &[VOCAB, 8])?;
        let mut scratch = Tensor::<f32>::zeros(dev, &[1])?;
        has(
            embedding_backward_with_scratch(&idx, &d, &mut dt, &mut scratch).unwrap_err(),
            "embedding_backward: scratch has 1 floats",
        )?;
    }
    let other = Device::Cpu;
    if !dev.same(&other) {
        let x = Tensor::<f32>::zeros(&other, &[2, 4, 8])?;
        let mut out = Tensor::<f32>::zeros(dev, &[2, 4, 8])?;
        has(
            token_merge_forward(&dmap, &x, &mut out, Reduce::Sum).unwrap_err(),
            "token_merge_forward: operands on different devices",
        )?;
    }
    Ok(())
});
