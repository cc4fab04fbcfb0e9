//! Byte-level helpers shared by the binary trajectory readers: endian-aware decoding of
//! fixed-size values and of whole arrays, a buffered file source that knows how many bytes are
//! left (so a corrupt length field can never make a reader allocate more than the file holds),
//! and the checks every reader applies to a decoded frame.

use anyhow::{anyhow, bail, Result};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// Largest atom count a reader accepts: anything above is taken as a corrupt header rather than
/// a reason to allocate gigabytes.
pub(crate) const MAX_ATOMS: usize = 100_000_000;

/// Read buffer of the file sources: large, so that a frame of a big system is read in a few
/// system calls.
const BUF_CAPACITY: usize = 4 << 20;

/// Byte order of a binary file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endian {
    /// Least significant byte first (x86 CHARMM/NAMD/OpenMM output).
    Little,
    /// Most significant byte first (XDR, i.e. every GROMACS file; old big-endian machines).
    Big,
}

impl Endian {
    /// Decodes a 32-bit signed integer.
    #[inline]
    pub fn i32(self, b: [u8; 4]) -> i32 {
        match self {
            Endian::Little => i32::from_le_bytes(b),
            Endian::Big => i32::from_be_bytes(b),
        }
    }

    /// Decodes a 32-bit float.
    #[inline]
    pub fn f32(self, b: [u8; 4]) -> f32 {
        f32::from_bits(self.i32(b) as u32)
    }

    /// Decodes a 64-bit float.
    #[inline]
    pub fn f64(self, b: [u8; 8]) -> f64 {
        match self {
            Endian::Little => f64::from_le_bytes(b),
            Endian::Big => f64::from_be_bytes(b),
        }
    }

    /// The 32-bit signed integer at byte `off` of `buf`, or `None` past its end.
    #[inline]
    pub fn i32_at(self, buf: &[u8], off: usize) -> Option<i32> {
        Some(self.i32(array_at(buf, off)?))
    }

    /// The 32-bit float at byte `off` of `buf`, or `None` past its end.
    #[inline]
    pub fn f32_at(self, buf: &[u8], off: usize) -> Option<f32> {
        Some(self.f32(array_at(buf, off)?))
    }

    /// The 64-bit float at byte `off` of `buf`, or `None` past its end.
    #[inline]
    pub fn f64_at(self, buf: &[u8], off: usize) -> Option<f64> {
        Some(self.f64(array_at(buf, off)?))
    }
}

/// The `N` bytes at `off`, or `None` when they run past the end of `buf`.
#[inline]
pub fn array_at<const N: usize>(buf: &[u8], off: usize) -> Option<[u8; N]> {
    buf.get(off..off.checked_add(N)?)?.try_into().ok()
}

/// Decodes consecutive 32-bit floats of `src` into every `stride`-th element of `dst`, starting at
/// `dst[0]`: `stride = 3` scatters one Cartesian axis into interleaved `[x, y, z]` coordinates.
/// Stops at whichever runs out first; callers size both exactly.
#[inline]
pub fn decode_f32_strided(src: &[u8], endian: Endian, dst: &mut [f32], stride: usize) {
    let out = dst.iter_mut().step_by(stride.max(1));
    // Two monomorphic loops so that the byte swap is hoisted out of the loop and vectorised.
    match endian {
        Endian::Little => {
            for (d, c) in out.zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Endian::Big => {
            for (d, c) in out.zip(src.chunks_exact(4)) {
                *d = f32::from_be_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
}

/// Decodes consecutive 64-bit floats of `src` into `dst`, rounding each to f32 (double-precision
/// GROMACS files are read as single precision, as `xdrfile` and MDAnalysis do).
#[inline]
pub fn decode_f64_as_f32(src: &[u8], endian: Endian, dst: &mut [f32]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(8)) {
        let b = [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
        *d = endian.f64(b) as f32;
    }
}

/// Multiplies every value by `factor` in single precision: the nm -> Angstrom conversion is done
/// in f32, as MDAnalysis does, so that values agree to the last bit.
#[inline]
pub fn scale_in_place(values: &mut [f32], factor: f32) {
    for v in values {
        *v *= factor;
    }
}

/// Fails, naming the atom and axis, if any coordinate is NaN or infinite: a non-finite coordinate
/// is corrupt data that would otherwise poison every downstream average silently.
pub fn check_finite(coords: &[f32]) -> Result<()> {
    // The fast path is a branch-free scan; the position is looked up only on failure.
    if coords.iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    let i = coords.iter().position(|v| !v.is_finite()).unwrap_or(0);
    bail!(
        "atom {} has a non-finite coordinate ({} = {})",
        i / 3,
        ["x", "y", "z"][i % 3],
        coords[i]
    )
}

/// Checks an atom count read from a header against [`MAX_ATOMS`].
pub fn check_natoms(n: i64) -> Result<usize> {
    if n < 0 || n as u64 > MAX_ATOMS as u64 {
        bail!("absurd atom count {n} (corrupt header? the limit is {MAX_ATOMS})");
    }
    Ok(n as usize)
}

/// Formats an error of the frame `index` of `path` as one flat message (`path: frame i: cause:
/// cause...`), so that the location survives however the error is printed.
pub fn frame_error(path: &Path, index: usize, err: anyhow::Error) -> anyhow::Error {
    anyhow!("{}: frame {index}: {err:#}", path.display())
}

/// A buffered binary file that tracks its offset and length, so readers can refuse a length field
/// that points past the end of the file before allocating or reading anything.
pub struct Source {
    reader: BufReader<File>,
    len: u64,
    offset: u64,
}

impl Source {
    /// Opens `path` for reading; only a regular file ([`super::input::open_regular`]): a device
    /// would give an endless stream and a FIFO would block.
    pub fn open(path: &Path) -> Result<Self> {
        let file: File = super::input::open_regular(path)?;
        let len = file
            .metadata()
            .map_err(|e| anyhow!("{}: cannot stat: {e}", path.display()))?
            .len();
        // Small files get a small buffer: no point in 4 MiB for a 10 kB file.
        let capacity = len.clamp(8192, BUF_CAPACITY as u64) as usize;
        Ok(Self {
            reader: BufReader::with_capacity(capacity, file),
            len,
            offset: 0,
        })
    }

    /// File length in bytes (as of the last time it was looked at).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Current byte offset.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Bytes between the current offset and the end of the file.
    pub fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.offset)
    }

    /// Fails unless `n` more bytes exist. The length is looked up again before failing, so a
    /// trajectory that a running simulation is still appending to can be followed.
    pub fn require(&mut self, n: u64) -> Result<()> {
        if n <= self.remaining() {
            return Ok(());
        }
        if let Ok(meta) = self.reader.get_ref().metadata() {
            self.len = self.len.max(meta.len());
        }
        if n <= self.remaining() {
            return Ok(());
        }
        bail!(
            "truncated: {n} bytes needed at offset {} but the file has only {} left",
            self.offset,
            self.remaining()
        )
    }

    /// Reads as many bytes as are available, up to `buf.len()`; returns how many were read (fewer
    /// only at the end of the file).
    pub fn read_up_to(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.reader.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => bail!("read error at offset {}: {e}", self.offset + got as u64),
            }
        }
        self.offset += got as u64;
        Ok(got)
    }

    /// Reads exactly `buf.len()` bytes, failing with a "truncated" error at the end of the file.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        let at = self.offset;
        let got = self.read_up_to(buf)?;
        if got < buf.len() {
            bail!(
                "truncated: file ends at offset {} inside a {}-byte block starting at offset {at}",
                at + got as u64,
                buf.len()
            );
        }
        Ok(())
    }

    /// Reads `N` bytes into an array.
    pub fn read_array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.read_exact(&mut b)?;
        Ok(b)
    }

    /// Skips `n` bytes, failing if the file has fewer.
    pub fn skip(&mut self, n: u64) -> Result<()> {
        self.require(n)?;
        let delta = i64::try_from(n).map_err(|_| anyhow!("skip of {n} bytes is too large"))?;
        self.reader
            .seek_relative(delta)
            .map_err(|e| anyhow!("seek error at offset {}: {e}", self.offset))?;
        self.offset += n;
        Ok(())
    }

    /// Moves to absolute byte offset `pos`.
    pub fn seek_to(&mut self, pos: u64) -> Result<()> {
        self.reader
            .seek(SeekFrom::Start(pos))
            .map_err(|e| anyhow!("seek error to offset {pos}: {e}"))?;
        self.offset = pos;
        Ok(())
    }
}
