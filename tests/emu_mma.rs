//! Tests of the tensor-core intrinsics of cuda/common/mma.cuh (mma.sync, ldmatrix, the 16-bit
//! and tf32 conversions) through the kernels of cuda/mma_check.cu.
//!
//! The fragment layouts are written out below from the PTX ISA (9.0) text, independently of the
//! shim, and every register the kernels produce is checked against them: on emu this checks the
//! shim, on a GPU it checks the description (and so the shim) against the hardware. Products are
//! compared with an f64 matrix product of the operands as the tensor cores see them.

use anyhow::{ensure, Context, Result};
use half::{bf16, f16};
use hiermd::kernels::mma_check as k;
use hiermd::launch::{launch, Kernel, KernelArgs, LaunchConfig};
use hiermd::testing::Rng;
use hiermd::{kernel_test, Device, Tensor};

// ---------------------------------------------------------------------------------------------
// The PTX ISA fragment layouts, as the document states them (groupID = %laneid >> 2,
// threadID_in_group = %laneid % 4). Each returns (row, col) of element i of a lane's fragment.

fn group_and_thread(lane: usize) -> (usize, usize) {
    (lane >> 2, lane % 4)
}

/// 9.7.14.5.8, multiplicand A (.f16/.bf16), elements a0..a7.
fn a_m16n8k16(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = group_and_thread(lane);
    let row = if i < 2 || (4..6).contains(&i) {
        group
    } else {
        group + 8
    };
    let col = if i < 4 {
        tig * 2 + (i & 1)
    } else {
        tig * 2 + (i & 1) + 8
    };
    (row, col)
}

/// 9.7.14.5.8, multiplicand B (.f16/.bf16), elements b0..b3.
fn b_m16n8k16(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = group_and_thread(lane);
    let row = if i < 2 {
        tig * 2 + (i & 1)
    } else {
        tig * 2 + (i & 1) + 8
    };
    (row, group)
}

/// 9.7.14.5.7 and 9.7.14.5.8, accumulators C and D (.f32), elements c0..c3.
fn cd_m16n8(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = group_and_thread(lane);
    let row = if i < 2 { group } else { group + 8 };
    (row, tig * 2 + (i & 1))
}

/// 9.7.14.5.7, multiplicand A (.tf32), elements a0..a3.
fn a_m16n8k8_tf32(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = group_and_thread(lane);
    let row = if i == 0 || i == 2 { group } else { group + 8 };
    let col = if i < 2 { tig } else { tig + 4 };
    (row, col)
}

/// 9.7.14.5.7, multiplicand B (.tf32), elements b0, b1.
fn b_m16n8k8_tf32(lane: usize, i: usize) -> (usize, usize) {
    let (group, tig) = group_and_thread(lane);
    (if i == 0 { tig } else { tig + 4 }, group)
}

/// 9.7.14.5.15, ldmatrix .m8n8 .b16: what register `m` of `lane` holds, given the 16-bit words
/// of shared memory and the element offset of the row each lane pointed at. Without .trans the
/// lane gets row lane/4, columns 2(lane%4) and +1 of matrix m (rows from lanes 8m..8m+7); with
/// .trans the matrix is read column-major, so element (r, c) delivered is the stored (c, r).
fn ldmatrix_register(smem: &[u16], row_offset: &[i32], m: usize, trans: bool, lane: usize) -> u32 {
    let stored = |row: usize, col: usize| smem[row_offset[8 * m + row] as usize + col] as u32;
    let (r, c) = (lane / 4, 2 * (lane % 4));
    let (lo, hi) = if trans {
        (stored(c, r), stored(c + 1, r))
    } else {
        (stored(r, c), stored(r, c + 1))
    };
    lo | (hi << 16)
}

// ---------------------------------------------------------------------------------------------
// Operands and references.

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    F16,
    Bf16,
    Tf32,
}

impl Kind {
    /// (M, N, K) of the instruction.
    fn shape(self) -> (usize, usize, usize) {
        match self {
            Kind::Tf32 => (16, 8, 8),
            _ => (16, 8, 16),
        }
    }
    /// The `kind` argument of the mma_fragments kernel.
    fn code(self) -> i32 {
        self as i32
    }
    /// The value nearest to `x` in this format (tf32 by cvt.rna), as f32.
    fn round(self, x: f32) -> f32 {
        match self {
            Kind::F16 => f16::from_f32(x).to_f32(),
            Kind::Bf16 => bf16::from_f32(x).to_f32(),
            Kind::Tf32 => f32::from_bits(tf32_rna_reference(x)),
        }
    }
    /// The 16-bit pattern of a value exactly representable in the format.
    fn bits16(self, x: f32) -> u32 {
        match self {
            Kind::F16 => f16::from_f32(x).to_bits() as u32,
            Kind::Bf16 => bf16::from_f32(x).to_bits() as u32,
            Kind::Tf32 => unreachable!("tf32 operands are whole f32 registers"),
        }
    }
}

/// cvt.rna.tf32.f32, computed arithmetically: to the nearest multiple of the tf32 ulp (2^(e-10)
/// for a normal of exponent e, 2^-136 among subnormals), ties away from zero.
fn tf32_rna_reference(x: f32) -> u32 {
    if !x.is_finite() {
        return x.to_bits();
    }
    let biased = ((x.to_bits() >> 23) & 0xff) as i32;
    let ulp = 2f64.powi(biased.max(1) - 127 - 10);
    let q = (x as f64).abs() / ulp;
    let mut units = q.floor();
    if q - units >= 0.5 {
        units += 1.0;
    }
    // `as f32` takes values past the largest finite f32 to infinity, as the instruction does.
    ((units * ulp).copysign(x as f64) as f32).to_bits()
}

/// Operands of one tile: row-major A (m x k), B (k x n), C (m x n).
struct Tile {
    kind: Kind,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    /// Every product and sum is exact in f32, so any accumulation order gives the same D.
    exact: bool,
}

impl Tile {
    /// Small dyadic values: A and B multiples of 2^-6 in [-1, 1] (7 significant bits, exact in all
    /// three formats), C multiples of 2^-12 in [-4, 4]. Every partial sum is then a multiple of
    /// 2^-12 below 2^6 (for K <= 32): at most 18 significant bits, exact in f32 whatever the
    /// hardware's accumulation order and alignment.
    fn exact(kind: Kind, rng: &mut Rng, m: usize, n: usize, kk: usize) -> Self {
        let mut grid = |len: usize, half_range: usize, scale: f32| -> Vec<f32> {
            (0..len)
                .map(|_| (rng.below(2 * half_range + 1) as f32 - half_range as f32) * scale)
                .collect()
        };
        Self {
            kind,
            a: grid(m * kk, 64, 1.0 / 64.0),
            b: grid(kk * n, 64, 1.0 / 64.0),
            c: grid(m * n, 4 << 12, 1.0 / 4096.0),
            exact: true,
        }
    }

    /// Normal values rounded to the format, kept away from its subnormals (whose handling the
    /// PTX ISA leaves unspecified); C is any f32.
    fn random(kind: Kind, rng: &mut Rng, m: usize, n: usize, kk: usize) -> Self {
        let mut operand = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    let x = (rng.normal() * 1.5) as f32;
                    let x = if x.abs() < 1.0 / 256.0 {
                        (1.0f32 / 256.0).copysign(x)
                    } else {
                        x
                    };
                    kind.round(x)
                })
                .collect()
        };
        let a = operand(m * kk);
        let b = operand(kk * n);
        Self {
            kind,
            a,
            b,
            c: rng.normal_vec(m * n, 4.0),
            exact: false,
        }
    }

    fn shape(&self) -> (usize, usize, usize) {
        let kk = self.a.len() / 16;
        (16, self.c.len() / 16, kk)
    }
}

/// D = A B + C over (m, n, k) as references.
struct Reference {
    /// In f64.
    d: Vec<f64>,
    /// |C| + sum |A B|, the scale of each element's rounding error.
    mag: Vec<f64>,
    /// As the emu computes it: one mma instruction covers `step` values of k, summed in f64 from
    /// the f32 accumulator in k order and rounded to f32 once, which the next one starts from.
    emu: Vec<f32>,
}

fn matmul_reference(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    n: usize,
    kk: usize,
    step: usize,
) -> Reference {
    let m = c.len() / n;
    let mut r = Reference {
        d: vec![0.0; m * n],
        mag: vec![0.0; m * n],
        emu: vec![0.0; m * n],
    };
    for i in 0..m {
        for j in 0..n {
            let prod = |p: usize| a[i * kk + p] as f64 * b[p * n + j] as f64;
            let c = c[i * n + j];
            r.d[i * n + j] = c as f64 + (0..kk).map(prod).sum::<f64>();
            r.mag[i * n + j] = c.abs() as f64 + (0..kk).map(|p| prod(p).abs()).sum::<f64>();
            let mut acc = c;
            for k0 in (0..kk).step_by(step) {
                acc = (k0..k0 + step).fold(acc as f64, |s, p| s + prod(p)) as f32;
            }
            r.emu[i * n + j] = acc;
        }
    }
    r
}

/// Relative to |C| + sum |A B|, what the hardware's f32 accumulation may lose: it truncates while
/// aligning partial sums, a few ulps over K terms (~2e-6 at K = 32). A layout error is O(1).
const MMA_RTOL: f64 = 1e-5;

/// Checks D. Exact tiles must match to the bit everywhere. Otherwise the emu must give what
/// cuda/common/mma.cuh documents (Reference::emu), and a GPU must come within MMA_RTOL.
fn check_product(
    what: &str,
    dev: &Device,
    got: &[f32],
    tile: &Tile,
    a: &[f32],
    b: &[f32],
) -> Result<()> {
    let (_, n, kk) = tile.shape();
    let want = matmul_reference(a, b, &tile.c, n, kk, tile.kind.shape().2);
    let emu = matches!(dev, Device::Emu(_));
    for (idx, &g) in got.iter().enumerate() {
        let (row, col, w, size) = (idx / n, idx % n, want.d[idx], want.mag[idx]);
        ensure!(
            g.is_finite(),
            "{what}: D[{row}][{col}] is {g} (reference {w}): never written?"
        );
        if tile.exact || emu {
            let exact = if tile.exact { w as f32 } else { want.emu[idx] };
            ensure!(
                g.to_bits() == exact.to_bits(),
                "{what}: D[{row}][{col}] = {g:e}, want exactly {exact:e} ({} inputs)",
                if tile.exact { "exact" } else { "random" }
            );
        } else {
            ensure!(
                (g as f64 - w).abs() <= MMA_RTOL * size,
                "{what}: D[{row}][{col}] = {g:e}, reference {w:e}, |diff| {:.3e} > {MMA_RTOL:.0e} * {size:.3e}",
                (g as f64 - w).abs()
            );
        }
    }
    Ok(())
}

fn one_warp(shared_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid: [1, 1, 1],
        block: [32, 1, 1],
        shared_bytes,
    }
}

fn poisoned<T: hiermd::Element>(dev: &Device, len: usize) -> Result<Tensor<T>> {
    let mut t = Tensor::<T>::zeros(dev, &[len])?;
    t.poison()?;
    Ok(t)
}

fn f16_tensor(dev: &Device, values: &[f32]) -> Result<Tensor<f16>> {
    let v: Vec<f16> = values.iter().map(|&x| f16::from_f32(x)).collect();
    Tensor::from_slice(dev, &[v.len()], &v)
}

fn bf16_tensor(dev: &Device, values: &[f32]) -> Result<Tensor<bf16>> {
    let v: Vec<bf16> = values.iter().map(|&x| bf16::from_f32(x)).collect();
    Tensor::from_slice(dev, &[v.len()], &v)
}

fn f32_tensor(dev: &Device, values: &[f32]) -> Result<Tensor<f32>> {
    Tensor::from_slice(dev, &[values.len()], values)
}

/// Launches a kernel taking (a, b, c, d) with 16-bit a and b.
fn run_b16(dev: &Device, kernel: &Kernel, cfg: LaunchConfig, tile: &Tile) -> Result<Vec<f32>> {
    match tile.kind {
        Kind::F16 => run_ab(
            dev,
            kernel,
            cfg,
            tile,
            f16_tensor(dev, &tile.a)?,
            f16_tensor(dev, &tile.b)?,
        ),
        Kind::Bf16 => run_ab(
            dev,
            kernel,
            cfg,
            tile,
            bf16_tensor(dev, &tile.a)?,
            bf16_tensor(dev, &tile.b)?,
        ),
        Kind::Tf32 => unreachable!("tf32 tiles have their own kernel"),
    }
}

fn run_ab<T: hiermd::Element>(
    dev: &Device,
    kernel: &Kernel,
    cfg: LaunchConfig,
    tile: &Tile,
    a: Tensor<T>,
    b: Tensor<T>,
) -> Result<Vec<f32>> {
    let c = f32_tensor(dev, &tile.c)?;
    let mut d = poisoned::<f32>(dev, tile.c.len())?;
    launch(
        dev,
        kernel,
        cfg,
        KernelArgs::new()
            .input(&a)
            .input(&b)
            .input(&c)
            .output(&mut d),
    )?;
    d.to_vec()
}

/// Trials per test: one exact tile, then random ones.
const TRIALS: usize = 6;

fn tiles(
    kind: Kind,
    rng: &mut Rng,
    m: usize,
    n: usize,
    kk: usize,
) -> impl Iterator<Item = Tile> + '_ {
    (0..TRIALS).map(move |t| {
        if t == 0 {
            Tile::exact(kind, rng, m, n, kk)
        } else {
            Tile::random(kind, rng, m, n, kk)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// mma.sync

kernel_test!(mma_m16n8k16_f16_tile_matches_f64_matmul, |dev| {
    let mut rng = Rng::for_test("mma_m16n8k16_f16_tile_matches_f64_matmul");
    for (t, tile) in tiles(Kind::F16, &mut rng, 16, 8, 16).enumerate() {
        let got = run_b16(dev, &k::MMA_F16_TILE, one_warp(0), &tile)?;
        check_product(
            &format!("f16 tile, trial {t}"),
            dev,
            &got,
            &tile,
            &tile.a,
            &tile.b,
        )?;
    }
    Ok(())
});

kernel_test!(mma_m16n8k16_bf16_tile_matches_f64_matmul, |dev| {
    let mut rng = Rng::for_test("mma_m16n8k16_bf16_tile_matches_f64_matmul");
    for (t, tile) in tiles(Kind::Bf16, &mut rng, 16, 8, 16).enumerate() {
        let got = run_b16(dev, &k::MMA_BF16_TILE, one_warp(0), &tile)?;
        check_product(
            &format!("bf16 tile, trial {t}"),
            dev,
            &got,
            &tile,
            &tile.a,
            &tile.b,
        )?;
    }
    Ok(())
});

fn run_tf32(dev: &Device, a: &[f32], b: &[f32], c: &[f32], round: bool) -> Result<Vec<f32>> {
    let (ta, tb, tc) = (
        f32_tensor(dev, a)?,
        f32_tensor(dev, b)?,
        f32_tensor(dev, c)?,
    );
    let mut d = poisoned::<f32>(dev, c.len())?;
    launch(
        dev,
        &k::MMA_TF32_TILE,
        one_warp(0),
        KernelArgs::new()
            .input(&ta)
            .input(&tb)
            .input(&tc)
            .output(&mut d)
            .i32(round as i32),
    )?;
    d.to_vec()
}

kernel_test!(mma_m16n8k8_tf32_tile_matches_f64_matmul, |dev| {
    let mut rng = Rng::for_test("mma_m16n8k8_tf32_tile_matches_f64_matmul");
    for t in 0..TRIALS {
        // Raw f32 operands: the kernel rounds them with cvt.rna.tf32.f32, the reference with
        // tf32_rna_reference.
        let tile = if t == 0 {
            Tile::exact(Kind::Tf32, &mut rng, 16, 8, 8)
        } else {
            Tile {
                kind: Kind::Tf32,
                a: rng.normal_vec(16 * 8, 1.5),
                b: rng.normal_vec(8 * 8, 1.5),
                c: rng.normal_vec(16 * 8, 4.0),
                exact: false,
            }
        };
        let got = run_tf32(dev, &tile.a, &tile.b, &tile.c, true)?;
        let a: Vec<f32> = tile.a.iter().map(|&x| Kind::Tf32.round(x)).collect();
        let b: Vec<f32> = tile.b.iter().map(|&x| Kind::Tf32.round(x)).collect();
        check_product(&format!("tf32 tile, trial {t}"), dev, &got, &tile, &a, &b)?;
    }
    Ok(())
});

kernel_test!(mma_m16n8k8_tf32_ignores_low_13_mantissa_bits, |dev| {
    let mut rng = Rng::for_test("mma_m16n8k8_tf32_ignores_low_13_mantissa_bits");
    // Positive operands in [1, 2) whose 13 low bits lie in [0x1000, 0x1fff]: truncating them and
    // rounding them differ by one tf32 ulp each, all in the same direction, so the two readings
    // give products ~1e-3 apart, far beyond the tolerance.
    let mut operand = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| {
                let tf32 = 0x3f80_0000 | ((rng.below(1 << 10) as u32) << 13);
                f32::from_bits(tf32 | 0x1000 | rng.below(0x1000) as u32)
            })
            .collect()
    };
    let (a, b) = (operand(16 * 8), operand(8 * 8));
    let tile = Tile {
        kind: Kind::Tf32,
        a,
        b,
        c: rng.normal_vec(16 * 8, 4.0),
        exact: false,
    };
    let got = run_tf32(dev, &tile.a, &tile.b, &tile.c, false)?;
    let truncate = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .map(|x| f32::from_bits(x.to_bits() & !0x1fff))
            .collect()
    };
    let (a_trunc, b_trunc) = (truncate(&tile.a), truncate(&tile.b));
    check_product(
        "raw f32 into tf32 mma",
        dev,
        &got,
        &tile,
        &a_trunc,
        &b_trunc,
    )?;
    // The test means something only if rounding would have failed it.
    let rounded = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| Kind::Tf32.round(x)).collect() };
    let want_rounded = matmul_reference(&rounded(&tile.a), &rounded(&tile.b), &tile.c, 8, 8, 8);
    let worst = got
        .iter()
        .zip(want_rounded.d.iter().zip(&want_rounded.mag))
        .map(|(&g, (&w, &s))| (g as f64 - w).abs() / s)
        .fold(0.0, f64::max);
    ensure!(
        worst > 10.0 * MMA_RTOL,
        "rounded operands fit too (worst relative gap {worst:.1e}): the inputs do not tell truncation from rounding"
    );
    Ok(())
});

/// Packs a tile into per-lane registers by the layouts above, runs mma_fragments, and unpacks D.
fn run_fragments(dev: &Device, tile: &Tile) -> Result<Vec<f32>> {
    let (m, n, kk) = tile.shape();
    let mut a_regs = vec![0u32; 32 * 4];
    let mut b_regs = vec![0u32; 32 * 2];
    let mut c_regs = vec![0f32; 32 * 4];
    for lane in 0..32 {
        if tile.kind == Kind::Tf32 {
            for i in 0..4 {
                let (r, c) = a_m16n8k8_tf32(lane, i);
                a_regs[lane * 4 + i] = tile.a[r * kk + c].to_bits();
            }
            for i in 0..2 {
                let (r, c) = b_m16n8k8_tf32(lane, i);
                b_regs[lane * 2 + i] = tile.b[r * n + c].to_bits();
            }
        } else {
            // Elements low to high: element 2j in bits 0..15 of register j, 2j+1 in bits 16..31.
            for i in 0..8 {
                let (r, c) = a_m16n8k16(lane, i);
                a_regs[lane * 4 + i / 2] |= tile.kind.bits16(tile.a[r * kk + c]) << (16 * (i % 2));
            }
            for i in 0..4 {
                let (r, c) = b_m16n8k16(lane, i);
                b_regs[lane * 2 + i / 2] |= tile.kind.bits16(tile.b[r * n + c]) << (16 * (i % 2));
            }
        }
        for i in 0..4 {
            let (r, c) = cd_m16n8(lane, i);
            c_regs[lane * 4 + i] = tile.c[r * n + c];
        }
    }
    let ta = Tensor::from_slice(dev, &[a_regs.len()], &a_regs)?;
    let tb = Tensor::from_slice(dev, &[b_regs.len()], &b_regs)?;
    let tc = Tensor::from_slice(dev, &[c_regs.len()], &c_regs)?;
    let mut td = poisoned::<f32>(dev, 32 * 4)?;
    launch(
        dev,
        &k::MMA_FRAGMENTS,
        one_warp(0),
        KernelArgs::new()
            .input(&ta)
            .input(&tb)
            .input(&tc)
            .output(&mut td)
            .i32(tile.kind.code()),
    )?;
    let d_regs = td.to_vec()?;
    let mut d = vec![f32::NAN; m * n];
    for lane in 0..32 {
        for i in 0..4 {
            let (r, c) = cd_m16n8(lane, i);
            d[r * n + c] = d_regs[lane * 4 + i];
        }
    }
    Ok(d)
}

kernel_test!(mma_fragment_layouts_match_ptx_isa, |dev| {
    let mut rng = Rng::for_test("mma_fragment_layouts_match_ptx_isa");
    for kind in [Kind::F16, Kind::Bf16, Kind::Tf32] {
        let (m, n, kk) = kind.shape();
        for (t, tile) in tiles(kind, &mut rng, m, n, kk).enumerate() {
            let got = run_fragments(dev, &tile)?;
            check_product(
                &format!("{kind:?} fragments, trial {t}"),
                dev,
                &got,
                &tile,
                &tile.a,
                &tile.b,
            )?;
        }
    }
    Ok(())
});

// ---------------------------------------------------------------------------------------------
// ldmatrix

/// 16-bit words of the shared-memory tile the ldmatrix kernels stage (kLdmatrixTileElems).
const LDMATRIX_TILE: usize = 1024;

/// Random 16-bit words, and for each lane a distinct random 16-byte row of the tile.
fn ldmatrix_inputs(rng: &mut Rng) -> (Vec<u16>, Vec<i32>) {
    let words: Vec<u16> = (0..LDMATRIX_TILE).map(|_| rng.next_u64() as u16).collect();
    let mut rows: Vec<i32> = (0..(LDMATRIX_TILE / 8) as i32).collect();
    for i in (1..rows.len()).rev() {
        rows.swap(i, rng.below(i + 1));
    }
    let offsets = rows[..32].iter().map(|r| r * 8).collect();
    (words, offsets)
}

/// Runs an ldmatrix kernel; returns out[lane][4] (registers past `num` stay poisoned).
fn run_ldmatrix(
    dev: &Device,
    kernel: &Kernel,
    words: &[u16],
    offsets: &[i32],
    num: usize,
    trans: bool,
    elems: usize,
) -> Result<Vec<u32>> {
    let w: Vec<f16> = words.iter().map(|&b| f16::from_bits(b)).collect();
    let src = Tensor::from_slice(dev, &[w.len()], &w)?;
    let rows = Tensor::from_slice(dev, &[32], offsets)?;
    let mut out = poisoned::<u32>(dev, 32 * 4)?;
    let shared = if std::ptr::eq(kernel, &k::LDMATRIX_DYNAMIC_SMEM) {
        (elems * 2) as u32
    } else {
        0
    };
    launch(
        dev,
        kernel,
        one_warp(shared),
        KernelArgs::new()
            .input(&src)
            .input(&rows)
            .output(&mut out)
            .i32(num as i32)
            .i32(trans as i32)
            .i32(elems as i32),
    )?;
    out.to_vec()
}

kernel_test!(ldmatrix_layouts_match_ptx_isa, |dev| {
    let mut rng = Rng::for_test("ldmatrix_layouts_match_ptx_isa");
    for (kernel, smem) in [
        (&k::LDMATRIX_DYNAMIC_SMEM, "dynamic"),
        (&k::LDMATRIX_STATIC_SMEM, "static"),
    ] {
        for num in [1usize, 2, 4] {
            for trans in [false, true] {
                let (words, offsets) = ldmatrix_inputs(&mut rng);
                let got = run_ldmatrix(dev, kernel, &words, &offsets, num, trans, LDMATRIX_TILE)?;
                let variant = format!(
                    "ldmatrix.x{num}{} from {smem} shared memory",
                    if trans { ".trans" } else { "" }
                );
                for lane in 0..32 {
                    for m in 0..4 {
                        let g = got[lane * 4 + m];
                        if m >= num {
                            ensure!(
                                g == u32::MAX,
                                "{variant}: lane {lane} wrote register {m} it does not have"
                            );
                            continue;
                        }
                        let want = ldmatrix_register(&words, &offsets, m, trans, lane);
                        ensure!(
                            g == want,
                            "{variant}: lane {lane} register {m} is {g:#010x}, want {want:#010x} (row offsets {offsets:?})"
                        );
                    }
                }
            }
        }
    }
    Ok(())
});

fn emu_seed(dev: &Device) -> u64 {
    match dev {
        Device::Emu(e) => e.seed(),
        _ => 0,
    }
}

/// On a GPU these are undefined behaviour (a fault or garbage), so only the emu is asked.
#[test]
fn ldmatrix_bad_row_addresses_are_caught_on_emu() {
    let mut rng = Rng::for_test("ldmatrix_bad_row_addresses_are_caught_on_emu");
    let dev = Device::emu();
    let (words, mut offsets) = ldmatrix_inputs(&mut rng);
    offsets[5] += 4;
    let err = run_ldmatrix(
        &dev,
        &k::LDMATRIX_DYNAMIC_SMEM,
        &words,
        &offsets,
        4,
        false,
        LDMATRIX_TILE,
    )
    .expect_err("a misaligned row address was accepted");
    println!("misaligned row caught: {err:#}");
    assert!(
        format!("{err:#}").contains("not 16-byte aligned"),
        "{err:#}"
    );

    // Only 64 words of dynamic shared memory: a row starting at word 64 lies past its end.
    let (words, mut offsets) = ldmatrix_inputs(&mut rng);
    offsets.iter_mut().for_each(|o| *o %= 64);
    offsets[2] = 64;
    let err = run_ldmatrix(
        &dev,
        &k::LDMATRIX_DYNAMIC_SMEM,
        &words[..64],
        &offsets,
        1,
        true,
        64,
    )
    .expect_err("a row past the end of dynamic shared memory was accepted");
    println!("out-of-bounds row caught: {err:#}");
    assert!(format!("{err:#}").contains("runs past"), "{err:#}");

    // Lanes past those an .x1 load uses may hold anything: an unaligned address there is fine.
    let (words, mut offsets) = ldmatrix_inputs(&mut rng);
    offsets[20] += 3;
    let got = run_ldmatrix(
        &dev,
        &k::LDMATRIX_DYNAMIC_SMEM,
        &words,
        &offsets,
        1,
        false,
        LDMATRIX_TILE,
    )
    .unwrap();
    for lane in 0..32 {
        assert_eq!(
            got[lane * 4],
            ldmatrix_register(&words, &offsets, 0, false, lane),
            "lane {lane}"
        );
    }
}

#[test]
fn ldmatrix_of_unsynchronised_rows_is_caught_on_emu() {
    let mut rng = Rng::for_test("ldmatrix_of_unsynchronised_rows_is_caught_on_emu");
    let words: Vec<u16> = (0..256).map(|_| rng.next_u64() as u16 & 0x7fff).collect();
    let offsets: Vec<i32> = (0..32).map(|l| (l % 16) * 16 + (l / 16) * 8).collect();
    let w: Vec<f16> = words.iter().map(|&b| f16::from_bits(b)).collect();
    // Each row is written by 16 lanes; a lane that reaches the load before all of them reads
    // some of the row still poisoned. Over three seeds every lane would have to be lucky.
    for _ in 0..3 {
        let dev = Device::emu();
        let src = Tensor::from_slice(&dev, &[256], &w).unwrap();
        let mut out = poisoned::<u32>(&dev, 32 * 4).unwrap();
        launch(
            &dev,
            &k::LDMATRIX_X4_WITHOUT_BARRIER,
            one_warp(512),
            KernelArgs::new().input(&src).output(&mut out),
        )
        .unwrap();
        let got = out.to_vec().unwrap();
        let stale = (0..32)
            .flat_map(|lane| (0..4).map(move |m| (lane, m)))
            .filter(|&(lane, m)| {
                got[lane * 4 + m] != ldmatrix_register(&words, &offsets, m, false, lane)
            })
            .count();
        assert!(
            stale > 0,
            "emu did not catch ldmatrix reading rows before other lanes wrote them (seed {})",
            emu_seed(&dev)
        );
        println!("unsynchronised ldmatrix caught: {stale} of 128 registers stale");
    }
}

// ---------------------------------------------------------------------------------------------
// ldmatrix feeding mma, as in a GEMM or attention kernel

/// Dynamic shared memory of the ldmatrix_mma_gemm kernels: A 16 x (32 + 8), B 32 x (16 + 8).
const GEMM_SMEM_BYTES: u32 = ((16 * 40 + 32 * 24) * 2) as u32;

kernel_test!(ldmatrix_then_mma_gemm_tile_matches_f64_matmul, |dev| {
    let mut rng = Rng::for_test("ldmatrix_then_mma_gemm_tile_matches_f64_matmul");
    let cfg = LaunchConfig {
        grid: [1, 1, 1],
        block: [64, 1, 1],
        shared_bytes: GEMM_SMEM_BYTES,
    };
    for (kind, kernel) in [
        (Kind::F16, &k::LDMATRIX_MMA_GEMM_F16),
        (Kind::Bf16, &k::LDMATRIX_MMA_GEMM_BF16),
    ] {
        for (t, tile) in tiles(kind, &mut rng, 16, 16, 32).enumerate() {
            let got = run_b16(dev, kernel, cfg, &tile)?;
            check_product(
                &format!("{kind:?} ldmatrix + mma, trial {t}"),
                dev,
                &got,
                &tile,
                &tile.a,
                &tile.b,
            )
            .with_context(|| format!("{kind:?} 16x32 @ 32x16 GEMM tile"))?;
        }
    }
    Ok(())
});

// ---------------------------------------------------------------------------------------------
// Conversions

/// Edge cases of f32 -> f16 / bf16 / tf32 rounding.
fn conversion_edge_cases() -> Vec<f32> {
    let p = |e: i32| 2f32.powi(e);
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,                     // largest f16
        65519.0,                     // rounds down to it
        f32::from_bits(0x477f_efff), // just below the tie with 65536
        65520.0,                     // tie: to even, infinity
        -65520.0,
        65536.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7f80_0001), // signalling NaN, payload only in low bits
        f32::from_bits(0xffc0_0000),
        f32::from_bits(0x7fff_ffff),
        f32::MAX,
        -f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1), // smallest f32 subnormal
        f32::from_bits(0x807f_ffff),
        p(-24), // smallest f16 subnormal
        p(-25), // tie with zero: to even, zero
        -p(-25),
        f32::from_bits(0x3300_0001), // just above: the smallest subnormal
        1.5 * p(-24),                // tie: to even, 2^-23
        2.5 * p(-24),                // tie: to even, 2^-23
        1023.0 * p(-24),             // largest f16 subnormal
        1023.5 * p(-24),             // tie with the smallest normal: to even, the normal
        p(-14),                      // smallest f16 normal
        1.0 + p(-11),                // f16 tie: to even, 1; tf32 tie: away, 1 + 2^-10
        -(1.0 + p(-11)),
        1.0 + 3.0 * p(-11),          // f16 tie: to even, 1 + 2^-9
        1.0 + p(-8),                 // bf16 tie: to even, 1
        1.0 + 3.0 * p(-8),           // bf16 tie: to even, 1 + 2^-6
        f32::from_bits(0x7f7f_0000), // largest bf16
        f32::from_bits(0x7f7f_7fff), // rounds down to it
        f32::from_bits(0x7f7f_8000), // bf16 tie: to even, infinity
        f32::from_bits(0x7f7f_f000), // tf32 tie at the top: away, infinity
        f32::from_bits(0x0000_1000), // tf32 tie among subnormals: away, 0x2000
        f32::from_bits(0x0000_0fff),
        f32::from_bits(0x8000_1000),
    ];
    // Every small f16 subnormal and its midpoints.
    v.extend((0..64).map(|i| i as f32 * 0.5 * p(-24)));
    v
}

kernel_test!(f32_to_f16_bf16_tf32_rounding_matches_reference, |dev| {
    let mut rng = Rng::for_test("f32_to_f16_bf16_tf32_rounding_matches_reference");
    let mut x = conversion_edge_cases();
    // Every bit pattern is fair game, NaNs included.
    x.extend((0..20_000).map(|_| f32::from_bits(rng.next_u64() as u32)));
    // Across the f16 range, from deep subnormal to overflow.
    x.extend((0..20_000).map(|_| {
        let e = rng.range(-30.0, 18.0).floor() as i32;
        let s = if rng.below(2) == 0 { 1.0 } else { -1.0 };
        (s * 2f64.powi(e) * rng.range(1.0, 2.0)) as f32
    }));
    // Exact midpoints between neighbouring f16, bf16 and tf32 values (each is an f32).
    for _ in 0..5_000 {
        let sign = (rng.below(2) as u16) << 15;
        // Below the largest finite value, so that the next one up is finite too.
        let h = f16::from_bits(rng.below(0x7bff) as u16 | sign);
        let next = f16::from_bits(h.to_bits() + 1);
        x.push(((h.to_f64() + next.to_f64()) / 2.0) as f32);
        let b = bf16::from_bits(rng.below(0x7f7f) as u16 | sign);
        let next = bf16::from_bits(b.to_bits() + 1);
        x.push(((b.to_f64() + next.to_f64()) / 2.0) as f32);
        let t = (rng.next_u64() as u32 & 0xffff_e000) | 0x1000;
        if (t >> 23) & 0xff != 0xff {
            x.push(f32::from_bits(t));
        }
    }
    let n = x.len();
    let tx = f32_tensor(dev, &x)?;
    let mut th = poisoned::<f16>(dev, n)?;
    let mut tbf = poisoned::<bf16>(dev, n)?;
    let mut tbf_plain = poisoned::<bf16>(dev, n)?;
    let mut ttf32 = poisoned::<u32>(dev, n)?;
    let mut th2 = poisoned::<u32>(dev, n / 2)?;
    let mut tbf2 = poisoned::<u32>(dev, n / 2)?;
    launch(
        dev,
        &k::CONVERT_NARROW,
        LaunchConfig::for_elements(n, 256),
        KernelArgs::new()
            .input(&tx)
            .output(&mut th)
            .output(&mut tbf)
            .output(&mut tbf_plain)
            .output(&mut ttf32)
            .output(&mut th2)
            .output(&mut tbf2)
            .i64(n as i64),
    )?;
    let (h, bf, bf_plain, tf32) = (
        th.to_vec()?,
        tbf.to_vec()?,
        tbf_plain.to_vec()?,
        ttf32.to_vec()?,
    );
    let (h2, bf2) = (th2.to_vec()?, tbf2.to_vec()?);
    // The GPU's cvt.rn.f16.f32 and cvt.rn.bf16.f32 return the canonical NaN 0x7fff for every NaN;
    // the half crate keeps sign and payload, so NaN is the one place the two differ.
    let want_h: Vec<u16> = x
        .iter()
        .map(|&v| {
            if v.is_nan() {
                0x7fff
            } else {
                f16::from_f32(v).to_bits()
            }
        })
        .collect();
    let want_bf: Vec<u16> = x
        .iter()
        .map(|&v| {
            if v.is_nan() {
                0x7fff
            } else {
                bf16::from_f32(v).to_bits()
            }
        })
        .collect();
    for i in 0..n {
        let v = x[i];
        ensure!(
            h[i].to_bits() == want_h[i],
            "__float2half_rn({v:e} = {:#010x}) = {:#06x}, want {:#06x}",
            v.to_bits(),
            h[i].to_bits(),
            want_h[i]
        );
        for (name, got) in [
            ("__float2bfloat16_rn", bf[i]),
            ("__float2bfloat16", bf_plain[i]),
        ] {
            ensure!(
                got.to_bits() == want_bf[i],
                "{name}({v:e} = {:#010x}) = {:#06x}, want {:#06x}",
                v.to_bits(),
                got.to_bits(),
                want_bf[i]
            );
        }
        if v.is_nan() {
            ensure!(
                f32::from_bits(tf32[i]).is_nan(),
                "cvt.rna.tf32.f32 of NaN {:#010x} gave {:#010x}",
                v.to_bits(),
                tf32[i]
            );
        } else {
            let want = tf32_rna_reference(v);
            ensure!(
                tf32[i] == want,
                "cvt.rna.tf32.f32({v:e} = {:#010x}) = {:#010x}, want {want:#010x}",
                v.to_bits(),
                tf32[i]
            );
        }
    }
    for i in 0..n / 2 {
        let want = (want_h[2 * i] as u32) | (want_h[2 * i + 1] as u32) << 16;
        ensure!(
            h2[i] == want,
            "pack_f32_to_f16x2_rn pair {i}: {:#010x}, want {want:#010x}",
            h2[i]
        );
        let want = (want_bf[2 * i] as u32) | (want_bf[2 * i + 1] as u32) << 16;
        ensure!(
            bf2[i] == want,
            "pack_f32_to_bf16x2_rn pair {i}: {:#010x}, want {want:#010x}",
            bf2[i]
        );
    }
    Ok(())
});

kernel_test!(f16_bf16_to_f32_is_exact_for_every_bit_pattern, |dev| {
    let n = 1usize << 16;
    let h: Vec<f16> = (0..n).map(|b| f16::from_bits(b as u16)).collect();
    let bf: Vec<bf16> = (0..n).map(|b| bf16::from_bits(b as u16)).collect();
    let th = Tensor::from_slice(dev, &[n], &h)?;
    let tbf = Tensor::from_slice(dev, &[n], &bf)?;
    let mut thf = poisoned::<f32>(dev, n)?;
    let mut tbff = poisoned::<f32>(dev, n)?;
    let mut th2 = poisoned::<u32>(dev, n / 2)?;
    let mut tbf2 = poisoned::<u32>(dev, n / 2)?;
    launch(
        dev,
        &k::CONVERT_WIDEN,
        LaunchConfig::for_elements(n, 256),
        KernelArgs::new()
            .input(&th)
            .input(&tbf)
            .output(&mut thf)
            .output(&mut tbff)
            .output(&mut th2)
            .output(&mut tbf2)
            .i64(n as i64),
    )?;
    let (hf, bff, h2, bf2) = (thf.to_vec()?, tbff.to_vec()?, th2.to_vec()?, tbf2.to_vec()?);
    for b in 0..n {
        for (name, got, want) in [
            ("__half2float", hf[b], h[b].to_f32()),
            ("__bfloat162float", bff[b], bf[b].to_f32()),
        ] {
            // NaN payloads are not specified (the GPU canonicalises f16 NaNs); NaN must stay NaN.
            let ok = if want.is_nan() {
                got.is_nan()
            } else {
                got.to_bits() == want.to_bits()
            };
            ensure!(
                ok,
                "{name}({b:#06x}) = {got:e} ({:#010x}), want {want:e}",
                got.to_bits()
            );
        }
    }
    for i in 0..n / 2 {
        // Element 2i is the first of the pair: it goes in the low half.
        let want = (2 * i as u32) | (2 * i as u32 + 1) << 16;
        ensure!(
            h2[i] == want,
            "pack_b16x2(__half) pair {i}: {:#010x}, want {want:#010x}",
            h2[i]
        );
        ensure!(
            bf2[i] == want,
            "pack_b16x2(__nv_bfloat16) pair {i}: {:#010x}, want {want:#010x}",
            bf2[i]
        );
    }
    Ok(())
});
