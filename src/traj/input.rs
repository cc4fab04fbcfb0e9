//! Opening the files a user names, with bounds: only regular files are read, and compressed text
//! may not inflate without limit.
//!
//! - A character device (`/dev/zero`), a FIFO, a socket, a block device or a directory is refused
//!   by its type before anything is read (through symlinks too, naming the target), so a wrong
//!   path fails at once instead of blocking on a pipe or filling memory from an endless device.
//!   Files are opened non-blocking, so a path that turns into a FIFO between the check and the
//!   open cannot hang either, and the opened file is checked again.
//! - Gzip input (recognised by its magic bytes) may inflate to at most [`GZIP_MAX_RATIO`] times
//!   its compressed size (at least [`GZIP_MIN_LIMIT`] bytes): real topologies and PDB
//!   trajectories compress 3-15x, a "gzip bomb" 1000x. The size recorded in the gzip trailer is
//!   checked first, so an honest bomb is refused before a byte is inflated; a lying trailer is
//!   caught while inflating, after at most the limit.
//! - Text read whole (topologies) is capped at [`MAX_TEXT_BYTES`].
//! - bzip2 input is recognised and refused with a clear message (no bzip2 decoder is built in).

use anyhow::{anyhow, bail, Result};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

/// Largest text file read whole into memory (a topology): 4 GiB, about 50 million PDB atom lines,
/// far beyond any topology in use; anything larger is a wrong file rather than a system to load.
pub const MAX_TEXT_BYTES: u64 = 4 << 30;

/// Most bytes a gzip file may inflate to per compressed byte. Real topologies and PDB
/// trajectories compress 3-15x (PSF files with long bond sections the most); 50x leaves room for
/// unusually regular files and refuses a bomb, which inflates 1000x.
pub const GZIP_MAX_RATIO: u64 = 50;

/// A gzip file may always inflate to this many bytes (64 MiB), whatever its compressed size, so
/// that small, very regular files are never refused.
pub const GZIP_MIN_LIMIT: u64 = 64 << 20;

/// Gzip magic bytes.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// bzip2 magic bytes (`BZh` and a block-size digit).
const BZIP2_MAGIC: &[u8; 3] = b"BZh";

/// What a path is when it is not a regular file, for messages.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// The error for a path that is not a regular file: names the path, the symlink's target when
/// it is one, and what is there.
fn not_regular(path: &Path, meta: &std::fs::Metadata) -> anyhow::Error {
    let link = std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_symlink())
        .and_then(|_| std::fs::canonicalize(path).ok())
        .map(|t| format!(" (a link to {})", t.display()))
        .unwrap_or_default();
    anyhow!(
        "{}{link} is {}, not a regular file: hiermd reads only regular files",
        path.display(),
        kind_of(meta)
    )
}

/// Opens `path` for reading if it is a regular file (symlinks followed); anything else is
/// refused by its type before it is opened, so a device or a FIFO never blocks or streams
/// forever. Errors name the path.
pub fn open_regular(path: &Path) -> Result<File> {
    let meta =
        std::fs::metadata(path).map_err(|e| anyhow!("{}: cannot open: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        // Non-blocking: should the path have become a FIFO since the check, the open returns
        // instead of waiting for a writer. Reads of a regular file ignore the flag.
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts
        .open(path)
        .map_err(|e| anyhow!("{}: cannot open: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| anyhow!("{}: cannot stat: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(not_regular(path, &meta));
    }
    Ok(file)
}

/// Most bytes a gzip file of `compressed` bytes may inflate to, at most `max`.
pub fn gzip_limit(compressed: u64, max: u64) -> u64 {
    compressed
        .saturating_mul(GZIP_MAX_RATIO)
        .max(GZIP_MIN_LIMIT)
        .min(max)
}

/// Compression recognised from a file's first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Plain bytes.
    None,
    /// gzip (one or more members), read through a bounded decoder.
    Gzip,
}

/// Looks at the first bytes of `file` (then rewinds it): gzip, plain, or an error for bzip2,
/// which is recognised but not read.
fn sniff(path: &Path, file: &mut File) -> Result<Compression> {
    let mut magic = [0u8; 3];
    let mut got = 0;
    while got < magic.len() {
        match file.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => bail!("{}: read error: {e}", path.display()),
        }
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|e| anyhow!("{}: seek error: {e}", path.display()))?;
    if got >= 2 && magic[..2] == GZIP_MAGIC {
        return Ok(Compression::Gzip);
    }
    if got == 3 && &magic == BZIP2_MAGIC {
        bail!(
            "{}: bzip2-compressed; hiermd reads gzip (.gz) but not bzip2: decompress it first \
             (bunzip2 -k {})",
            path.display(),
            path.display()
        );
    }
    Ok(Compression::None)
}

/// The uncompressed size recorded in the trailer of a gzip file's last member (ISIZE, the size
/// modulo 2^32): a hint, exact for single-member files under 4 GiB.
fn gzip_trailer_size(file: &mut File, len: u64) -> Option<u64> {
    if len < 18 {
        return None;
    }
    let mut b = [0u8; 4];
    file.seek(SeekFrom::Start(len - 4)).ok()?;
    file.read_exact(&mut b).ok()?;
    file.seek(SeekFrom::Start(0)).ok()?;
    Some(u32::from_le_bytes(b) as u64)
}

/// The message for gzip input that inflates past its limit.
fn bomb_error(path: &Path, compressed: u64, limit: u64, claimed: Option<u64>) -> anyhow::Error {
    let claimed = claimed
        .map(|c| format!(" (its trailer says {c} bytes)"))
        .unwrap_or_default();
    anyhow!(
        "{}: gzip data inflates to more than {limit} bytes{claimed} from {compressed} compressed \
         bytes: refused as a decompression bomb (hiermd allows {GZIP_MAX_RATIO}x the compressed \
         size, at least {GZIP_MIN_LIMIT} bytes, at most {MAX_TEXT_BYTES} bytes read whole)",
        path.display()
    )
}

/// A reader that fails once more than `limit` bytes came through it.
pub struct Bounded<R> {
    inner: R,
    left: u64,
    limit: u64,
    exceeded: bool,
}

impl<R> Bounded<R> {
    /// Wraps `inner`, allowing `limit` bytes through.
    pub fn new(inner: R, limit: u64) -> Self {
        Self {
            inner,
            left: limit,
            limit,
            exceeded: false,
        }
    }

    /// Whether a read went past the limit.
    pub fn exceeded(&self) -> bool {
        self.exceeded
    }
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Reads one byte past the limit at most, to tell "exactly at the limit" from "beyond".
        let cap = (self.left.saturating_add(1)).min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..cap])?;
        if n as u64 > self.left {
            self.exceeded = true;
            return Err(io::Error::other(format!(
                "the data inflates to more than {} bytes",
                self.limit
            )));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Reads a whole file into memory, inflating gzip (by its magic bytes, whatever the name): at
/// most `max` bytes, and for gzip at most [`gzip_limit`] of its compressed size. Only regular
/// files ([`open_regular`]). Errors name the file.
pub fn read_whole(path: &Path, max: u64) -> Result<Vec<u8>> {
    let mut file = open_regular(path)?;
    let len = file
        .metadata()
        .map_err(|e| anyhow!("{}: cannot stat: {e}", path.display()))?
        .len();
    match sniff(path, &mut file)? {
        Compression::None => {
            if len > max {
                bail!(
                    "{}: {len} bytes, more than the {max} bytes hiermd reads whole: not a \
                     topology?",
                    path.display()
                );
            }
            let mut out = Vec::with_capacity(len as usize);
            // One byte past `max` is read at most, should the file have grown since the stat.
            file.take(max + 1)
                .read_to_end(&mut out)
                .map_err(|e| anyhow!("{}: read error: {e}", path.display()))?;
            if out.len() as u64 > max {
                bail!(
                    "{}: more than the {max} bytes hiermd reads whole",
                    path.display()
                );
            }
            Ok(out)
        }
        Compression::Gzip => {
            let limit = gzip_limit(len, max);
            let claimed = gzip_trailer_size(&mut file, len);
            if let Some(c) = claimed.filter(|&c| c > limit) {
                return Err(bomb_error(path, len, limit, Some(c)));
            }
            let mut out = Vec::with_capacity(claimed.unwrap_or(0).min(limit) as usize);
            let decoder = flate2::read::MultiGzDecoder::new(BufReader::new(file));
            let mut bounded = Bounded::new(decoder, limit);
            match bounded.read_to_end(&mut out) {
                Ok(_) => Ok(out),
                Err(_) if bounded.exceeded() => Err(bomb_error(path, len, limit, claimed)),
                Err(e) => bail!("{}: bad gzip data: {e}", path.display()),
            }
        }
    }
}

/// Opens a text file for streaming, inflating gzip (by its magic bytes): a buffered reader of
/// the text, bounded for gzip by [`gzip_limit`] (with no overall maximum: the file is streamed,
/// not held). Only regular files ([`open_regular`]). Errors name the file.
pub fn open_text_stream(path: &Path, capacity: usize) -> Result<Box<dyn BufRead + Send>> {
    let mut file = open_regular(path)?;
    let len = file
        .metadata()
        .map_err(|e| anyhow!("{}: cannot stat: {e}", path.display()))?
        .len();
    Ok(match sniff(path, &mut file)? {
        Compression::None => Box::new(BufReader::with_capacity(capacity, file)),
        Compression::Gzip => {
            let limit = gzip_limit(len, u64::MAX);
            let decoder = flate2::read::MultiGzDecoder::new(BufReader::new(file));
            Box::new(BufReader::with_capacity(
                capacity,
                Bounded::new(decoder, limit),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits() {
        assert_eq!(gzip_limit(0, u64::MAX), GZIP_MIN_LIMIT);
        assert_eq!(gzip_limit(10 << 20, u64::MAX), 500 << 20);
        assert_eq!(gzip_limit(1 << 40, MAX_TEXT_BYTES), MAX_TEXT_BYTES);
    }

    #[test]
    fn bounded_reader_stops_past_its_limit() {
        let data = [7u8; 100];
        let mut r = Bounded::new(&data[..], 100);
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_ok());
        assert!(!r.exceeded());
        assert_eq!(out.len(), 100);
        let mut r = Bounded::new(&data[..], 99);
        let mut out = Vec::new();
        assert!(r.read_to_end(&mut out).is_err());
        assert!(r.exceeded());
        assert!(out.len() <= 99);
    }
}
