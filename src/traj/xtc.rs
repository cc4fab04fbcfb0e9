//! GROMACS XTC reader with its own decoder of the `xdr3dfcoord` compression.
//!
//! Our own decoder rather than the `molly` crate: molly asserts on corrupt headers, indexes its
//! tables with unchecked file values and allocates whatever byte count a header claims, so corrupt
//! input could panic or abort; here every value from the file is checked, allocation is bounded
//! by the file size, and the output matches `xdrfile` (hence MDAnalysis) bit for bit.
//!
//! Layout of a frame (XDR, big-endian, 4-byte aligned):
//! - header: magic (1995, or 2023 for files with more than 298 261 617 atoms, whose compressed
//!   byte count is 64-bit), natoms, step, time (f32, ps), box (9 f32, rows a, b, c, nm), natoms
//!   again;
//! - natoms <= 9: 3 * natoms raw f32;
//! - otherwise: precision (f32), minint\[3\], maxint\[3\], smallidx, byte count, then that many
//!   bytes of bit stream (padded to 4).
//!
//! The bit stream, most significant bit first, codes each atom's integer coordinates
//! (`round(x * precision)`): a first atom relative to `minint`, either as three separate fields of
//! `bitlen(maxint - minint + 1)` bits or, when each range fits in 24 bits, as one mixed-radix
//! integer of `bitlen(product of ranges)` bits; then a flag bit and, if set, a 5-bit run code
//! (`run + is_smaller + 1`, run a multiple of 3); the run is a sequence of `run / 3` atoms each
//! coded relative to the previous one as one mixed-radix integer of `smallidx` bits with radix
//! `MAGICINTS[smallidx]` (offset by half of it), the first two atoms swapped (water O and H
//! compress better that way). `is_smaller` moves `smallidx` by -1, 0 or +1 after each group, and
//! a run length persists across groups until a flag bit replaces it.

use super::bytes::{check_finite, check_natoms, frame_error, scale_in_place, Endian, Source};
use super::{Frame, TrajectoryReader, UnitCell};
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};

/// Radices of the small-integer code, indexed by `smallidx` (each about 2^(idx/3)).
#[rustfmt::skip]
const MAGICINTS: [u32; 73] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 10, 12, 16, 20, 25, 32, 40, 50, 64,
    80, 101, 128, 161, 203, 256, 322, 406, 512, 645, 812, 1024, 1290,
    1625, 2048, 2580, 3250, 4096, 5060, 6501, 8192, 10321, 13003,
    16384, 20642, 26007, 32768, 41285, 52015, 65536, 82570, 104031,
    131072, 165140, 208063, 262144, 330280, 416127, 524287, 660561,
    832255, 1048576, 1321122, 1664510, 2097152, 2642245, 3329021,
    4194304, 5284491, 6658042, 8388607, 10568983, 13316085, 16777216,
];

/// Smallest valid `smallidx` (the entries below are 0).
const FIRSTIDX: usize = 9;

/// Magic of the classic format (32-bit compressed byte count).
const MAGIC_1995: i32 = 1995;
/// Magic of GROMACS 2023+ files with huge atom counts (64-bit compressed byte count).
const MAGIC_2023: i32 = 2023;

/// Bytes of a frame header: magic, natoms, step, time, box, natoms again.
const HEADER_BYTES: usize = 4 * (4 + 9 + 1);

/// nm -> Angstrom.
const NM: f32 = 10.0;

/// Smallest compression precision (integer steps per nm) taken as real: 1 (a 1 nm grid) is
/// already far coarser than any file written; GROMACS writes 1000 by default.
pub const MIN_PRECISION: f32 = 1.0;

/// Largest compression precision taken as real: 1e7 steps per nm still spans +-214 nm with 32-bit
/// integers; beyond it the integers cannot hold a simulation box, and a precision of 1e30 (a
/// corrupt header) would make every coordinate 0.
pub const MAX_PRECISION: f32 = 1e7;

/// Streaming XTC reader: one frame read per call, memory O(one frame).
pub struct XtcReader {
    path: PathBuf,
    src: Source,
    natoms: usize,
    next: usize,
    /// Compressed bytes of the current frame, plus zero padding for the bit reader.
    scratch: Vec<u8>,
    /// Precision (1/nm) of the last compressed frame read.
    precision: Option<f32>,
    /// Warnings not yet taken.
    warnings: Vec<String>,
    /// Whether a frame without a finite time was met (times of the whole file are then useless).
    bad_time: bool,
}

impl XtcReader {
    /// Opens an XTC file; the atom count is taken from the first frame header.
    pub fn open(path: &Path) -> Result<Self> {
        let mut src = Source::open(path)?;
        let mut head = [0u8; HEADER_BYTES];
        let got = src.read_up_to(&mut head)?;
        let header = if got == 0 {
            Err(anyhow!("empty XTC file (no frames, so no atom count)"))
        } else if got < HEADER_BYTES {
            Err(anyhow!(
                "truncated: the file ends inside the first frame header"
            ))
        } else {
            parse_header(&head).and_then(|h| match h.natoms {
                0 => Err(anyhow!("the first frame has 0 atoms")),
                _ => Ok(h),
            })
        }
        .map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        src.seek_to(0)?;
        Ok(Self {
            path: path.to_path_buf(),
            src,
            natoms: header.natoms,
            next: 0,
            scratch: Vec::new(),
            precision: None,
            warnings: Vec::new(),
            bad_time: false,
        })
    }

    /// Precision (integer steps per nm) of the last compressed frame read; `None` before the first
    /// frame or when frames are stored uncompressed (9 atoms or fewer).
    pub fn precision(&self) -> Option<f32> {
        self.precision
    }

    fn read_frame_inner(&mut self, frame: &mut Frame) -> Result<bool> {
        let mut head = [0u8; HEADER_BYTES];
        let got = self.src.read_up_to(&mut head)?;
        if got == 0 {
            return Ok(false);
        }
        if got < HEADER_BYTES {
            bail!(
                "truncated: the file ends inside the frame header ({got} of {HEADER_BYTES} bytes)"
            );
        }
        let h = parse_header(&head)?;
        if h.natoms != self.natoms {
            bail!(
                "{} atoms, but the first frame has {}",
                h.natoms,
                self.natoms
            );
        }
        let n = self.natoms;
        if n <= 9 {
            frame.coords.resize(3 * n, 0.0);
            // Tiny systems are stored uncompressed.
            let mut raw = [0u8; 4 * 27];
            let raw = &mut raw[..12 * n];
            self.src.read_exact(raw)?;
            for (d, c) in frame.coords.iter_mut().zip(raw.chunks_exact(4)) {
                *d = f32::from_be_bytes([c[0], c[1], c[2], c[3]]);
            }
            self.precision = None;
        } else {
            self.read_compressed(h.magic, n, &mut frame.coords)?;
        }
        scale_in_place(&mut frame.coords, NM);
        check_finite(&frame.coords)?;

        frame.unit_cell = h.unit_cell;
        frame.time_ps = Some(h.time as f64);
        if !h.time.is_finite() {
            frame.time_ps = None;
            if !self.bad_time {
                self.bad_time = true;
                self.warnings.push(format!(
                    "{}: frame {}: time {} ps is not finite; the file's times are dropped \
                     (give --dt)",
                    self.path.display(),
                    self.next,
                    h.time
                ));
            }
        }
        frame.step = Some(h.step as i64);
        self.next += 1;
        Ok(true)
    }

    /// Reads the compression parameters and the bit stream of one frame and decodes its `natoms`
    /// atoms into `coords` (nm).
    fn read_compressed(&mut self, magic: i32, natoms: usize, coords: &mut Vec<f32>) -> Result<()> {
        let be = Endian::Big;
        let p = self.src.read_array::<32>()?;
        let at = |k: usize| be.i32_at(&p, 4 * k).unwrap_or(0);
        let precision = be.f32_at(&p, 0).unwrap_or(0.0);
        let minint = [at(1), at(2), at(3)];
        let maxint = [at(4), at(5), at(6)];
        let smallidx = at(7);
        let nbytes: u64 = if magic == MAGIC_2023 {
            u64::from_be_bytes(self.src.read_array::<8>()?)
        } else {
            u32::from_be_bytes(self.src.read_array::<4>()?) as u64
        };
        if !(MIN_PRECISION..=MAX_PRECISION).contains(&precision) {
            bail!(
                "implausible compression precision {precision:e} (integer steps per nm; GROMACS \
                 writes 1000, hiermd accepts {MIN_PRECISION} to {MAX_PRECISION:e}): a corrupt \
                 frame header"
            );
        }
        if !(FIRSTIDX as i32..MAGICINTS.len() as i32).contains(&smallidx) {
            bail!("corrupt compressed coordinates: smallidx {smallidx}");
        }
        // Checked before anything is allocated: the byte count against the file, and the atom
        // count against the byte count (every atom takes at least 2 bits: a 1-bit integer triple
        // and its run flag), so a corrupt header cannot make us allocate more than ~50x the file.
        self.src.require(nbytes)?;
        if natoms as u64 > 4 * nbytes {
            bail!("corrupt compressed coordinates: {nbytes} bytes cannot hold {natoms} atoms");
        }
        let padded = nbytes.div_ceil(4) * 4;
        self.src.require(padded)?;
        coords.resize(3 * natoms, 0.0);
        // Bounded by the file size just checked; 8 zero bytes let the bit reader load whole words.
        let len = nbytes as usize;
        self.scratch.clear();
        self.scratch.resize(padded as usize + 8, 0);
        self.src.read_exact(&mut self.scratch[..padded as usize])?;
        let params = Params {
            precision,
            minint,
            maxint,
            smallidx: smallidx as usize,
        };
        decode(&self.scratch, len, &params, coords)?;
        self.precision = Some(precision);
        Ok(())
    }
}

/// The fields of a frame header we use.
struct Header {
    magic: i32,
    natoms: usize,
    step: i32,
    time: f32,
    unit_cell: Option<UnitCell>,
}

fn parse_header(b: &[u8; HEADER_BYTES]) -> Result<Header> {
    let be = Endian::Big;
    let int = |k: usize| be.i32_at(b, 4 * k).unwrap_or(0);
    let magic = int(0);
    if magic != MAGIC_1995 && magic != MAGIC_2023 {
        bail!("not an XTC frame: magic {magic} (expected {MAGIC_1995} or {MAGIC_2023})");
    }
    let natoms = check_natoms(int(1) as i64)?;
    let natoms2 = int(13);
    if natoms2 as i64 != natoms as i64 {
        bail!("corrupt header: atom counts {natoms} and {natoms2} differ");
    }
    let mut v = [[0f32; 3]; 3];
    for (k, x) in v.iter_mut().flatten().enumerate() {
        *x = be.f32_at(b, 16 + 4 * k).unwrap_or(0.0) * NM;
    }
    // GROMACS writes an all-zero box when there is none; MDAnalysis then reports no dimensions.
    let unit_cell = if v.iter().flatten().all(|&x| x == 0.0) {
        None
    } else if v.iter().flatten().all(|x| x.is_finite()) {
        Some(UnitCell { vectors: v })
    } else {
        bail!("corrupt header: non-finite box {v:?}");
    };
    Ok(Header {
        magic,
        natoms,
        step: int(2),
        time: be.f32_at(b, 12).unwrap_or(0.0),
        unit_cell,
    })
}

/// Compression parameters of one frame.
struct Params {
    precision: f32,
    minint: [i32; 3],
    maxint: [i32; 3],
    smallidx: usize,
}

/// Most-significant-bit-first reader over the compressed bytes. Reads past `limit` bits return
/// zeros and set `overrun`, so the hot path has one compare and no `Result`; callers check
/// `overrun` once per atom group.
struct BitReader<'a> {
    /// The stream followed by at least 8 zero bytes.
    data: &'a [u8],
    pos: usize,
    limit: usize,
    overrun: bool,
}

impl BitReader<'_> {
    /// The next `n` bits (n <= 32) as an unsigned integer.
    #[inline(always)]
    fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        if self.pos + n as usize > self.limit {
            self.overrun = true;
            self.pos = self.limit;
            return 0;
        }
        let byte = self.pos >> 3;
        // In bounds: pos < limit <= 8 * (data.len() - 8), so byte + 8 <= data.len().
        let word = match self.data.get(byte..byte + 8) {
            Some(w) => u64::from_be_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]),
            None => {
                self.overrun = true;
                return 0;
            }
        };
        let v = (word << (self.pos & 7)) >> (64 - n);
        self.pos += n as usize;
        v as u32
    }

    /// `nbits` bits read as bytes, the first byte least significant (xdrfile's `decodeints`
    /// layout), as one integer of up to 128 bits.
    #[inline(always)]
    fn bytes_le(&mut self, nbits: u32) -> u128 {
        let mut v: u128 = 0;
        let mut shift = 0;
        let mut left = nbits;
        while left >= 8 {
            v |= (self.bits(8) as u128) << shift;
            shift += 8;
            left -= 8;
        }
        if left > 0 {
            v |= (self.bits(left) as u128) << shift;
        }
        v
    }

    /// Same as [`Self::bytes_le`] for at most 64 bits, without 128-bit arithmetic.
    #[inline(always)]
    fn bytes_le_u64(&mut self, nbits: u32) -> u64 {
        let mut v: u64 = 0;
        let mut shift = 0;
        let mut left = nbits;
        while left >= 8 {
            v |= (self.bits(8) as u64) << shift;
            shift += 8;
            left -= 8;
        }
        if left > 0 {
            v |= (self.bits(left) as u64) << shift;
        }
        v
    }
}

/// Decodes three integers packed as one mixed-radix number of `nbits` bits with radices `sizes`
/// (the first integer most significant). Sizes are non-zero (checked by the caller).
#[inline(always)]
fn decode_ints(r: &mut BitReader, nbits: u32, sizes: [u32; 3]) -> [i32; 3] {
    if nbits <= 32 {
        let v = r.bytes_le_u64(nbits) as u32;
        let q = v / sizes[2];
        let z = v - q * sizes[2];
        let x = q / sizes[1];
        let y = q - x * sizes[1];
        [x as i32, y as i32, z as i32]
    } else if nbits <= 64 {
        let v = r.bytes_le_u64(nbits);
        let (s1, s2) = (sizes[1] as u64, sizes[2] as u64);
        let q = v / s2;
        let z = v - q * s2;
        let x = q / s1;
        let y = q - x * s1;
        [x as u32 as i32, y as i32, z as i32]
    } else {
        let v = r.bytes_le(nbits);
        let (s1, s2) = (sizes[1] as u128, sizes[2] as u128);
        let q = v / s2;
        let z = v - q * s2;
        let x = q / s1;
        let y = q - x * s1;
        // xdrfile keeps the low 32 bits of the leading integer.
        [x as u32 as i32, y as i32, z as i32]
    }
}

/// Bits needed to represent `v` (0 for 0).
#[inline]
fn bitlen(v: u128) -> u32 {
    128 - v.leading_zeros()
}

/// Decodes the bit stream `data[..len]` (followed by >= 8 zero bytes) into `coords` (3 per atom,
/// nm), as xdrfile's `xdrfile_decompress_coord_float` does, with every index checked.
fn decode(data: &[u8], len: usize, p: &Params, coords: &mut [f32]) -> Result<()> {
    let natoms = coords.len() / 3;
    // Same rounding as xdrfile: 1/precision in double, stored as float.
    let inv = (1.0f64 / p.precision as f64) as f32;
    let sizeint: [u32; 3] = std::array::from_fn(|k| {
        (p.maxint[k] as u32)
            .wrapping_sub(p.minint[k] as u32)
            .wrapping_add(1)
    });
    // Ranges over 24 bits are coded as separate fields, smaller ones as one product.
    let large = (sizeint[0] | sizeint[1] | sizeint[2]) > 0xff_ffff;
    let bitsizeint = sizeint.map(|s| bitlen(s as u128).min(32));
    let bitsize = if large {
        0
    } else {
        if sizeint.contains(&0) {
            bail!(
                "corrupt compressed coordinates: maxint {:?} < minint {:?}",
                p.maxint,
                p.minint
            );
        }
        bitlen(sizeint.iter().map(|&s| s as u128).product())
    };

    let mut r = BitReader {
        data,
        pos: 0,
        limit: len.saturating_mul(8),
        overrun: false,
    };
    let mut smallidx = p.smallidx;
    let mut smaller = MAGICINTS[(smallidx - 1).max(FIRSTIDX)] as i32 / 2;
    let mut smallnum = MAGICINTS[smallidx] as i32 / 2;
    let mut sizesmall = [MAGICINTS[smallidx]; 3];
    let mut run: u32 = 0;
    let mut i = 0usize;
    let mut out = coords.chunks_exact_mut(3);
    let mut put = |c: [i32; 3], i: usize| -> Result<()> {
        match out.next() {
            Some(dst) => {
                dst[0] = c[0] as f32 * inv;
                dst[1] = c[1] as f32 * inv;
                dst[2] = c[2] as f32 * inv;
                Ok(())
            }
            None => bail!("corrupt compressed coordinates: a run goes past atom {i}"),
        }
    };

    while i < natoms {
        let mut this = if large {
            [
                r.bits(bitsizeint[0]) as i32,
                r.bits(bitsizeint[1]) as i32,
                r.bits(bitsizeint[2]) as i32,
            ]
        } else {
            decode_ints(&mut r, bitsize, sizeint)
        };
        i += 1;
        for (t, m) in this.iter_mut().zip(p.minint) {
            *t = t.wrapping_add(m);
        }
        let mut prev = this;

        let mut is_smaller: i32 = 0;
        if r.bits(1) == 1 {
            run = r.bits(5);
            is_smaller = (run % 3) as i32;
            run -= run % 3;
            is_smaller -= 1;
        }
        if run > 0 {
            for k in (0..run).step_by(3) {
                let d = decode_ints(&mut r, smallidx as u32, sizesmall);
                i += 1;
                for a in 0..3 {
                    this[a] = d[a].wrapping_add(prev[a]).wrapping_sub(smallnum);
                }
                if k == 0 {
                    // The first two atoms of a run are stored swapped.
                    std::mem::swap(&mut this, &mut prev);
                    put(prev, i)?;
                } else {
                    prev = this;
                }
                put(this, i)?;
            }
        } else {
            put(this, i)?;
        }
        if r.overrun {
            bail!("corrupt compressed coordinates: the bit stream ends before atom {i}");
        }

        let idx = smallidx as i64 + is_smaller as i64;
        if !(FIRSTIDX as i64..MAGICINTS.len() as i64).contains(&idx) {
            bail!("corrupt compressed coordinates: smallidx leaves the table at atom {i}");
        }
        smallidx = idx as usize;
        if is_smaller < 0 {
            smallnum = smaller;
            smaller = if smallidx > FIRSTIDX {
                MAGICINTS[smallidx - 1] as i32 / 2
            } else {
                0
            };
        } else if is_smaller > 0 {
            smaller = smallnum;
            smallnum = MAGICINTS[smallidx] as i32 / 2;
        }
        sizesmall = [MAGICINTS[smallidx]; 3];
    }
    Ok(())
}

impl TrajectoryReader for XtcReader {
    fn natoms(&self) -> usize {
        self.natoms
    }
    fn nframes_hint(&self) -> Option<usize> {
        None
    }
    fn read_frame(&mut self, frame: &mut Frame) -> Result<bool> {
        let index = self.next;
        self.read_frame_inner(frame)
            .map_err(|e| frame_error(&self.path, index, e))
    }
    fn position(&self) -> usize {
        self.next
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }
    fn time_source(&self) -> Option<String> {
        Some("XTC: each frame's stored time (ps)".into())
    }
}
