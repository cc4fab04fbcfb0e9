//! Writers of small DCD, TRR, XTC and PDB files with known contents, and temp-file helpers, shared
//! by the trajectory reader tests (`traj_readers.rs`) and fuzz tests (`traj_fuzz.rs`). The writers
//! are written from the format descriptions, independently of the readers, so a round trip checks
//! the readers against the formats rather than against themselves.

#![allow(dead_code)]

use hiermd::traj::{open_trajectory, Frame};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A file in the temp folder, removed when dropped.
pub struct TempFile(PathBuf);

impl TempFile {
    /// Writes `bytes` to a fresh file whose name ends with `suffix` (e.g. `"x.dcd"`).
    pub fn new(suffix: &str, bytes: &[u8]) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("hiermd-traj-{}-{n}-{suffix}", std::process::id()));
        std::fs::write(&path, bytes).expect("write temp file");
        Self(path)
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads every frame of a trajectory (at most `max_frames`, a guard against a reader that never
/// ends).
pub fn read_all_limited(path: &Path, max_frames: usize) -> anyhow::Result<Vec<Frame>> {
    let mut r = open_trajectory(path)?;
    let mut frames = Vec::new();
    loop {
        let mut f = Frame::default();
        if !r.read_frame(&mut f)? {
            return Ok(frames);
        }
        assert_eq!(
            f.coords.len(),
            3 * r.natoms(),
            "frame size differs from natoms"
        );
        assert_eq!(r.position(), frames.len() + 1, "position() out of step");
        frames.push(f);
        assert!(frames.len() <= max_frames, "reader does not stop");
    }
}

/// Reads every frame of a trajectory.
pub fn read_all(path: &Path) -> anyhow::Result<Vec<Frame>> {
    read_all_limited(path, 1_000_000)
}

/// Deterministic pseudo-random values in `[lo, hi)` (a tiny LCG: tests need no rand crate).
pub fn pseudo_random(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            lo + (hi - lo) * u
        })
        .collect()
}

/// Byte sink for binary formats in a chosen byte order.
struct W {
    buf: Vec<u8>,
    big: bool,
}

impl W {
    fn new(big: bool) -> Self {
        Self {
            buf: Vec::new(),
            big,
        }
    }
    fn i32(&mut self, v: i32) {
        let b = if self.big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.buf.extend_from_slice(&b);
    }
    fn f32(&mut self, v: f32) {
        self.i32(v.to_bits() as i32);
    }
    fn f64(&mut self, v: f64) {
        let b = if self.big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        };
        self.buf.extend_from_slice(&b);
    }
    fn real(&mut self, v: f64, double: bool) {
        if double {
            self.f64(v)
        } else {
            self.f32(v as f32)
        }
    }
    /// A Fortran unformatted record: byte length, payload, byte length.
    fn record(&mut self, payload: impl FnOnce(&mut W)) {
        let mut inner = W::new(self.big);
        payload(&mut inner);
        let n = inner.buf.len() as i32;
        self.i32(n);
        self.buf.extend_from_slice(&inner.buf);
        self.i32(n);
    }
}

/// Layout choices of a crafted DCD file.
#[derive(Clone, Debug)]
pub struct DcdSpec {
    /// Big-endian file (else little-endian).
    pub big_endian: bool,
    /// CHARMM-style header (version 24, f32 DELTA) rather than X-PLOR (f64 DELTA).
    pub charmm: bool,
    /// Unit-cell record per frame (CHARMM only).
    pub with_cell: bool,
    /// Fourth-dimension record per frame (CHARMM only).
    pub four_dims: bool,
    /// ISTART.
    pub istart: i32,
    /// NSAVC.
    pub nsavc: i32,
    /// DELTA in AKMA units.
    pub delta: f64,
    /// NSET as written (may be wrong on purpose).
    pub nset: i32,
    /// 1-based indices of the free atoms of a fixed-atom file.
    pub free: Option<Vec<i32>>,
    /// Number of 80-character title lines.
    pub title_lines: usize,
}

impl Default for DcdSpec {
    fn default() -> Self {
        Self {
            big_endian: false,
            charmm: true,
            with_cell: false,
            four_dims: false,
            istart: 0,
            nsavc: 1,
            delta: 1.0,
            nset: 0,
            free: None,
            title_lines: 2,
        }
    }
}

/// One frame of a crafted DCD: coordinates (Angstrom, interleaved) and the raw CHARMM unit-cell
/// record `[A, gamma, B, beta, alpha, C]`.
#[derive(Clone, Debug)]
pub struct DcdFrame {
    /// Interleaved coordinates.
    pub coords: Vec<f32>,
    /// Raw unit-cell record.
    pub cell: [f64; 6],
}

/// Writes a DCD file.
pub fn dcd_bytes(spec: &DcdSpec, natoms: usize, frames: &[DcdFrame]) -> Vec<u8> {
    let mut w = W::new(spec.big_endian);
    let nfixed = spec.free.as_ref().map_or(0, |f| natoms - f.len());
    w.record(|w| {
        w.buf.extend_from_slice(b"CORD");
        let mut icntrl = [0i32; 20];
        icntrl[0] = spec.nset;
        icntrl[1] = spec.istart;
        icntrl[2] = spec.nsavc;
        icntrl[8] = nfixed as i32;
        if spec.charmm {
            icntrl[9] = (spec.delta as f32).to_bits() as i32;
            icntrl[10] = spec.with_cell as i32;
            icntrl[11] = spec.four_dims as i32;
            icntrl[19] = 24;
        }
        for (k, v) in icntrl.iter().enumerate() {
            if !spec.charmm && k == 9 {
                w.f64(spec.delta);
            } else if !spec.charmm && k == 10 {
                // Second half of the f64 DELTA.
            } else {
                w.i32(*v);
            }
        }
    });
    w.record(|w| {
        w.i32(spec.title_lines as i32);
        for k in 0..spec.title_lines {
            let line = format!("{:<80}", format!("* crafted test DCD, line {k}"));
            w.buf.extend_from_slice(line.as_bytes());
        }
    });
    w.record(|w| w.i32(natoms as i32));
    if let Some(free) = &spec.free {
        w.record(|w| free.iter().for_each(|&i| w.i32(i)));
    }
    for (fi, fr) in frames.iter().enumerate() {
        if spec.with_cell {
            w.record(|w| fr.cell.iter().for_each(|&c| w.f64(c)));
        }
        let atoms: Vec<usize> = match &spec.free {
            Some(free) if fi > 0 => free.iter().map(|&i| i as usize - 1).collect(),
            _ => (0..natoms).collect(),
        };
        for axis in 0..3 {
            w.record(|w| atoms.iter().for_each(|&a| w.f32(fr.coords[3 * a + axis])));
        }
        if spec.four_dims {
            w.record(|w| atoms.iter().for_each(|_| w.f32(7.0)));
        }
    }
    w.buf
}

/// One frame of a crafted TRR file (values in GROMACS units: nm, ps).
#[derive(Clone, Debug, Default)]
pub struct TrrFrame {
    /// MD step.
    pub step: i32,
    /// Time (ps).
    pub time: f64,
    /// Atoms.
    pub natoms: usize,
    /// Box rows (nm), if stored.
    pub box_nm: Option<[f64; 9]>,
    /// Whether a virial block is stored.
    pub vir: bool,
    /// Whether a pressure block is stored.
    pub pres: bool,
    /// Positions (nm), if stored.
    pub x: Option<Vec<f64>>,
    /// Velocities, if stored.
    pub v: Option<Vec<f64>>,
    /// Forces, if stored.
    pub f: Option<Vec<f64>>,
}

/// Writes a TRR file in single or double precision.
pub fn trr_bytes(frames: &[TrrFrame], double: bool) -> Vec<u8> {
    let mut w = W::new(true);
    let real = if double { 8 } else { 4 };
    for fr in frames {
        let vec_size = |v: &Option<Vec<f64>>| v.as_ref().map_or(0, |_| 3 * fr.natoms * real);
        w.i32(1993);
        w.i32(13);
        w.i32(12);
        w.buf.extend_from_slice(b"GMX_trn_file");
        w.i32(0); // ir_size
        w.i32(0); // e_size
        w.i32(if fr.box_nm.is_some() {
            9 * real as i32
        } else {
            0
        });
        w.i32(if fr.vir { 9 * real as i32 } else { 0 });
        w.i32(if fr.pres { 9 * real as i32 } else { 0 });
        w.i32(0); // top_size
        w.i32(0); // sym_size
        w.i32(vec_size(&fr.x) as i32);
        w.i32(vec_size(&fr.v) as i32);
        w.i32(vec_size(&fr.f) as i32);
        w.i32(fr.natoms as i32);
        w.i32(fr.step);
        w.i32(0); // nre
        w.real(fr.time, double);
        w.real(0.5, double); // lambda
        if let Some(b) = fr.box_nm {
            b.iter().for_each(|&v| w.real(v, double));
        }
        for present in [fr.vir, fr.pres] {
            if present {
                (0..9).for_each(|k| w.real(k as f64, double));
            }
        }
        for block in [&fr.x, &fr.v, &fr.f].into_iter().flatten() {
            block.iter().for_each(|&v| w.real(v, double));
        }
    }
    w.buf
}

/// Radices of the XTC small-integer code (the `magicints` table of xdrfile).
const MAGICINTS: [u32; 73] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 10, 12, 16, 20, 25, 32, 40, 50, 64, 80, 101, 128, 161, 203, 256,
    322, 406, 512, 645, 812, 1024, 1290, 1625, 2048, 2580, 3250, 4096, 5060, 6501, 8192, 10321,
    13003, 16384, 20642, 26007, 32768, 41285, 52015, 65536, 82570, 104031, 131072, 165140, 208063,
    262144, 330280, 416127, 524287, 660561, 832255, 1048576, 1321122, 1664510, 2097152, 2642245,
    3329021, 4194304, 5284491, 6658042, 8388607, 10568983, 13316085, 16777216,
];

/// `smallidx` used by the test encoder: radix 64, so pairs of atoms closer than 32 steps on each
/// axis are coded as runs.
const SMALLIDX: usize = 18;

/// One frame of a crafted XTC file (nm, ps).
#[derive(Clone, Debug)]
pub struct XtcFrame {
    /// MD step.
    pub step: i32,
    /// Time (ps).
    pub time: f32,
    /// Box rows (nm).
    pub box_nm: [f32; 9],
    /// Interleaved coordinates (nm).
    pub coords_nm: Vec<f32>,
}

/// xdrfile's rounding of a coordinate to an integer: in f32, half away from zero.
fn quantize(x: f32, precision: f32) -> i32 {
    let lf = x * precision;
    let lf = if lf >= 0.0 { lf + 0.5 } else { lf - 0.5 };
    lf as i32
}

/// What an XTC reader must return for `coords_nm` at `precision`: Angstrom, after xdrfile's
/// quantization (uncompressed when there are 9 atoms or fewer).
pub fn xtc_expected(coords_nm: &[f32], precision: f32) -> Vec<f32> {
    if coords_nm.len() <= 27 {
        return coords_nm.iter().map(|&x| x * 10.0).collect();
    }
    let inv = (1.0f64 / precision as f64) as f32;
    coords_nm
        .iter()
        .map(|&x| (quantize(x, precision) as f32 * inv) * 10.0)
        .collect()
}

/// Most-significant-bit-first bit sink.
#[derive(Default)]
struct Bits {
    bytes: Vec<u8>,
    nbits: usize,
}

impl Bits {
    fn put(&mut self, nbits: u32, value: u64) {
        for k in (0..nbits).rev() {
            if self.nbits.is_multiple_of(8) {
                self.bytes.push(0);
            }
            let bit = ((value >> k) & 1) as u8;
            let last = self.bytes.len() - 1;
            self.bytes[last] |= bit << (7 - self.nbits % 8);
            self.nbits += 1;
        }
    }
    /// An integer of `nbits` bits written byte by byte, least significant byte first (the layout
    /// of xdrfile's `encodeints`).
    fn put_le_bytes(&mut self, nbits: u32, v: u128) {
        let full = nbits / 8;
        for j in 0..full {
            self.put(8, ((v >> (8 * j)) & 0xff) as u64);
        }
        let rem = nbits % 8;
        if rem > 0 {
            self.put(rem, ((v >> (8 * full)) & ((1 << rem) - 1)) as u64);
        }
    }
}

fn bitlen(v: u128) -> u32 {
    128 - v.leading_zeros()
}

/// Writes an XTC file. Frames of more than 9 atoms are compressed: each atom as a full integer
/// triple (three separate fields when a range exceeds 24 bits), and consecutive pairs closer than
/// half the small radix as a run of length 3 (the two atoms stored swapped, as the format
/// prescribes). `magic_2023` writes the GROMACS 2023 variant with a 64-bit byte count.
pub fn xtc_bytes(frames: &[XtcFrame], precision: f32, magic_2023: bool) -> Vec<u8> {
    let mut w = W::new(true);
    for fr in frames {
        let n = fr.coords_nm.len() / 3;
        w.i32(if magic_2023 { 2023 } else { 1995 });
        w.i32(n as i32);
        w.i32(fr.step);
        w.f32(fr.time);
        fr.box_nm.iter().for_each(|&b| w.f32(b));
        w.i32(n as i32);
        if n <= 9 {
            fr.coords_nm.iter().for_each(|&x| w.f32(x));
            continue;
        }
        let q: Vec<[i32; 3]> = fr
            .coords_nm
            .chunks_exact(3)
            .map(|c| [0, 1, 2].map(|k| quantize(c[k], precision)))
            .collect();
        let mut minint = [i32::MAX; 3];
        let mut maxint = [i32::MIN; 3];
        for c in &q {
            for k in 0..3 {
                minint[k] = minint[k].min(c[k]);
                maxint[k] = maxint[k].max(c[k]);
            }
        }
        let sizeint: [u32; 3] = [0, 1, 2].map(|k| (maxint[k] - minint[k] + 1) as u32);
        let large = sizeint.iter().any(|&s| s > 0xff_ffff);
        let bitsize = bitlen(sizeint.iter().map(|&s| s as u128).product());
        let smallnum = MAGICINTS[SMALLIDX] as i32 / 2;
        let radix = MAGICINTS[SMALLIDX];

        let mut bits = Bits::default();
        let put_big = |bits: &mut Bits, c: [i32; 3]| {
            let d = [0, 1, 2].map(|k| (c[k] - minint[k]) as u32);
            if large {
                for k in 0..3 {
                    bits.put(bitlen(sizeint[k] as u128).min(32), d[k] as u64);
                }
            } else {
                let v = ((d[0] as u128) * sizeint[1] as u128 + d[1] as u128) * sizeint[2] as u128
                    + d[2] as u128;
                bits.put_le_bytes(bitsize, v);
            }
        };
        let mut i = 0;
        while i < n {
            let pair = (i + 1 < n).then(|| [0, 1, 2].map(|k| q[i][k] - q[i + 1][k] + smallnum));
            match pair {
                Some(d) if d.iter().all(|&v| (0..radix as i32).contains(&v)) => {
                    // Run of one small atom: the big one is the second of the pair.
                    put_big(&mut bits, q[i + 1]);
                    bits.put(1, 1);
                    bits.put(5, 3 + 1); // run 3, is_smaller 0
                    let v = (d[0] as u128 * radix as u128 + d[1] as u128) * radix as u128
                        + d[2] as u128;
                    bits.put_le_bytes(SMALLIDX as u32, v);
                    i += 2;
                }
                _ => {
                    put_big(&mut bits, q[i]);
                    bits.put(1, 1);
                    bits.put(5, 1); // run 0, is_smaller 0
                    i += 1;
                }
            }
        }
        w.f32(precision);
        minint.iter().for_each(|&v| w.i32(v));
        maxint.iter().for_each(|&v| w.i32(v));
        w.i32(SMALLIDX as i32);
        let nbytes = bits.bytes.len();
        if magic_2023 {
            w.buf.extend_from_slice(&(nbytes as u64).to_be_bytes());
        } else {
            w.i32(nbytes as i32);
        }
        w.buf.extend_from_slice(&bits.bytes);
        w.buf.resize(w.buf.len() + (4 - nbytes % 4) % 4, 0);
    }
    w.buf
}

/// One ATOM record with coordinates in columns 31-54.
pub fn pdb_atom(serial: usize, x: f32, y: f32, z: f32) -> String {
    format!(
        "ATOM  {:>5} {:<4} {:>3} {}{:>4}    {:>8.3}{:>8.3}{:>8.3}  1.00  0.00           C\n",
        serial % 100_000,
        "CA",
        "ALA",
        "A",
        serial % 10_000,
        x,
        y,
        z
    )
}

/// A CRYST1 record.
pub fn pdb_cryst1(a: f32, b: f32, c: f32, alpha: f32, beta: f32, gamma: f32) -> String {
    format!("CRYST1{a:>9.3}{b:>9.3}{c:>9.3}{alpha:>7.2}{beta:>7.2}{gamma:>7.2} P 1           1\n")
}

/// A multi-model PDB text: one MODEL ... ENDMDL block per frame of interleaved coordinates, with
/// a CRYST1 per model when `cells` is given.
pub fn pdb_models(frames: &[Vec<f32>], cells: Option<&[[f32; 6]]>) -> String {
    let mut s = String::from("REMARK crafted multi-model test file\n");
    for (k, coords) in frames.iter().enumerate() {
        if let Some(c) = cells.and_then(|c| c.get(k)) {
            s += &pdb_cryst1(c[0], c[1], c[2], c[3], c[4], c[5]);
        }
        s += &format!("MODEL     {:>4}\n", k + 1);
        for (i, a) in coords.chunks_exact(3).enumerate() {
            s += &pdb_atom(i + 1, a[0], a[1], a[2]);
        }
        s += "ENDMDL\n";
    }
    s += "END\n";
    s
}
