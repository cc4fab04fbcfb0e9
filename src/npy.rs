//! NumPy `.npy` files (format version 1.0): little-endian `f32`, `f64`, `i32` and `u8` arrays in
//! C order, the one array format every analysis tool reads (`numpy.load`, MDAnalysis, PyEMMA,
//! deeptime), so tensors, projections and trajectories leave hiermd without a converter.
//!
//! Files are written whole and atomically ([`write_f32`] and friends: a temporary file, fsynced,
//! renamed over the target), or streamed: [`header`] gives the bytes to write before data that
//! arrive piece by piece (`hiermd export` writes frames one at a time), and [`NpyWriter`] does the
//! same with a check that exactly the announced number of elements went out.
//!
//! Every header is padded with spaces so the data start at a multiple of [`ALIGN`] (64) bytes, as
//! NumPy itself does, so a reader can memory-map the data with any SIMD alignment. The readers
//! ([`read_f32`] and friends) accept versions 1.0, 2.0 and 3.0 and reject, with an error naming
//! the file, a dtype other than the one asked for, Fortran order, and files whose data are shorter
//! or longer than the shape says.

use anyhow::{anyhow, bail, ensure, Context, Result};
use std::io::{Read, Write};
use std::path::Path;

/// The magic string every `.npy` file starts with.
pub const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Alignment of the data in the files we write: the header is padded up to a multiple of this.
pub const ALIGN: usize = 64;

/// The element types we read and write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// Little-endian IEEE-754 single precision, NumPy `'<f4'`.
    F32,
    /// Little-endian IEEE-754 double precision, NumPy `'<f8'`.
    F64,
    /// Little-endian signed 32-bit integer, NumPy `'<i4'`.
    I32,
    /// Unsigned byte, NumPy `'|u1'` (byte order does not apply).
    U8,
}

impl Dtype {
    /// The NumPy type string (`descr`) NumPy itself writes for this type.
    pub fn descr(self) -> &'static str {
        match self {
            Dtype::F32 => "<f4",
            Dtype::F64 => "<f8",
            Dtype::I32 => "<i4",
            Dtype::U8 => "|u1",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 => 8,
            Dtype::U8 => 1,
        }
    }

    /// The type a `descr` string names, if it is one of ours. Accepts the spellings NumPy may
    /// write for the same type: `'<u1'`/`'u1'` as well as `'|u1'`, and `'='` (native order) only
    /// on little-endian hosts, where it means little-endian.
    pub fn from_descr(descr: &str) -> Option<Self> {
        let native_le = cfg!(target_endian = "little");
        match descr {
            "<f4" => Some(Dtype::F32),
            "<f8" => Some(Dtype::F64),
            "<i4" => Some(Dtype::I32),
            "=f4" if native_le => Some(Dtype::F32),
            "=f8" if native_le => Some(Dtype::F64),
            "=i4" if native_le => Some(Dtype::I32),
            "|u1" | "<u1" | ">u1" | "=u1" | "u1" => Some(Dtype::U8),
            _ => None,
        }
    }
}

/// Element types of `.npy` arrays: `f32`, `f64`, `i32` and `u8`. Sealed: the four types of
/// [`Dtype`] only.
pub trait NpyElement: Copy + sealed::Sealed {
    /// The dtype of this element type.
    const DTYPE: Dtype;
    /// Appends the little-endian bytes of `data` to `out`.
    fn extend_le(data: &[Self], out: &mut Vec<u8>);
    /// Decodes little-endian bytes (`bytes.len()` a multiple of the element size).
    fn from_le(bytes: &[u8]) -> Vec<Self>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
    impl Sealed for i32 {}
    impl Sealed for u8 {}
}

macro_rules! element {
    ($t:ty, $d:expr, $n:literal) => {
        impl NpyElement for $t {
            const DTYPE: Dtype = $d;
            fn extend_le(data: &[Self], out: &mut Vec<u8>) {
                out.reserve(data.len() * $n);
                // On little-endian hosts this is a plain copy; the per-element form keeps the
                // files little-endian on any host.
                for v in data {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            fn from_le(bytes: &[u8]) -> Vec<Self> {
                bytes
                    .chunks_exact($n)
                    .map(|c| <$t>::from_le_bytes(c.try_into().expect("chunk of element size")))
                    .collect()
            }
        }
    };
}
element!(f32, Dtype::F32, 4);
element!(f64, Dtype::F64, 8);
element!(i32, Dtype::I32, 4);
element!(u8, Dtype::U8, 1);

/// Python's spelling of a shape tuple: `()`, `(5,)`, `(2, 3)`.
fn shape_tuple(shape: &[usize]) -> String {
    match shape {
        [] => "()".into(),
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The complete header of a C-order array of `dtype` and `shape`: magic, version, header length
/// and the dictionary, padded with spaces and a final newline so that the data, written right
/// after these bytes, start at a multiple of [`ALIGN`]. Version 1.0 unless the dictionary is
/// longer than its 16-bit length field allows (thousands of dimensions), then 2.0.
pub fn header(dtype: Dtype, shape: &[usize]) -> Vec<u8> {
    let dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
        dtype.descr(),
        shape_tuple(shape)
    );
    // Prefix: magic (6), version (2), length (2 in version 1.0, 4 in 2.0).
    let (major, prefix) = if (10 + dict.len() + 1).next_multiple_of(ALIGN) - 10 <= u16::MAX as usize
    {
        (1u8, 10)
    } else {
        (2u8, 12)
    };
    let total = (prefix + dict.len() + 1).next_multiple_of(ALIGN);
    let hlen = total - prefix;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[major, 0]);
    if major == 1 {
        out.extend_from_slice(&(hlen as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(hlen as u32).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(total - 1, b' ');
    out.push(b'\n');
    out
}

/// Number of elements of `shape` (1 for a 0-d array), or an error on overflow.
fn element_count(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| anyhow!("shape {} overflows usize", shape_tuple(shape)))
}

/// The bytes of a whole `.npy` file holding `data` with `shape` (C order).
pub fn to_bytes<T: NpyElement>(shape: &[usize], data: &[T]) -> Result<Vec<u8>> {
    let n = element_count(shape)?;
    ensure!(
        n == data.len(),
        "shape {} holds {n} elements but {} were given",
        shape_tuple(shape),
        data.len()
    );
    let mut out = header(T::DTYPE, shape);
    T::extend_le(data, &mut out);
    Ok(out)
}

/// Writes `data` (C order, `shape`) to `path` as a `.npy` file, atomically: readers see the old
/// file or the complete new one, never a partial write.
pub fn write<T: NpyElement>(path: impl AsRef<Path>, shape: &[usize], data: &[T]) -> Result<()> {
    let path = path.as_ref();
    let bytes = to_bytes(shape, data).with_context(|| format!("{}: npy", path.display()))?;
    crate::optim::write_atomic(path, &bytes)
}

/// [`write()`] for `f32` (`'<f4'`).
pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<()> {
    write(path, shape, data)
}

/// [`write()`] for `f64` (`'<f8'`).
pub fn write_f64(path: impl AsRef<Path>, shape: &[usize], data: &[f64]) -> Result<()> {
    write(path, shape, data)
}

/// [`write()`] for `i32` (`'<i4'`), e.g. state labels.
pub fn write_i32(path: impl AsRef<Path>, shape: &[usize], data: &[i32]) -> Result<()> {
    write(path, shape, data)
}

/// [`write()`] for `u8` (`'|u1'`), e.g. masks or images.
pub fn write_u8(path: impl AsRef<Path>, shape: &[usize], data: &[u8]) -> Result<()> {
    write(path, shape, data)
}

/// A parsed `.npy` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpyHeader {
    /// Format version `(major, minor)`.
    pub version: (u8, u8),
    /// The `descr` string as written, e.g. `"<f4"`.
    pub descr: String,
    /// Whether the data are in Fortran (column-major) order; we only read C order.
    pub fortran_order: bool,
    /// The array's shape (empty for a 0-d array).
    pub shape: Vec<usize>,
    /// Offset of the first data byte from the start of the file.
    pub data_offset: usize,
}

impl NpyHeader {
    /// The element type, when it is one of ours.
    pub fn dtype(&self) -> Option<Dtype> {
        Dtype::from_descr(&self.descr)
    }

    /// Number of elements (1 for a 0-d array); an error if the shape overflows.
    pub fn len(&self) -> Result<usize> {
        element_count(&self.shape)
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.shape.contains(&0)
    }
}

/// Parses the header at the start of `bytes` (which may hold just the header or the whole file).
pub fn parse_header(bytes: &[u8]) -> Result<NpyHeader> {
    parse(bytes).map_err(|e| anyhow!(e))
}

/// Bytes needed to know the header length: magic, version and the length field.
fn prefix_len(bytes: &[u8]) -> std::result::Result<usize, String> {
    if bytes.len() < 8 || &bytes[..6] != MAGIC {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    match bytes[6] {
        1 => Ok(10),
        2 | 3 => Ok(12),
        v => Err(format!("unsupported .npy format version {v}.{}", bytes[7])),
    }
}

fn parse(bytes: &[u8]) -> std::result::Result<NpyHeader, String> {
    let prefix = prefix_len(bytes)?;
    if bytes.len() < prefix {
        return Err("truncated: the file ends inside the header".into());
    }
    let hlen = if prefix == 10 {
        u16::from_le_bytes([bytes[8], bytes[9]]) as usize
    } else {
        u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize
    };
    let end = prefix + hlen;
    if bytes.len() < end {
        return Err(format!(
            "truncated: the header says it is {hlen} bytes, the file ends {} bytes into it",
            bytes.len() - prefix
        ));
    }
    let text = if bytes[6] == 3 {
        std::str::from_utf8(&bytes[prefix..end])
            .map_err(|_| "header is not UTF-8".to_string())?
            .to_string()
    } else {
        // Versions 1 and 2 are latin-1; every byte maps to the code point of the same value.
        bytes[prefix..end].iter().map(|&b| b as char).collect()
    };
    let (descr, fortran_order, shape) = parse_dict(&text)?;
    Ok(NpyHeader {
        version: (bytes[6], bytes[7]),
        descr,
        fortran_order,
        shape,
        data_offset: end,
    })
}

/// A cursor over the header dictionary, a Python literal such as
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }`.
struct Lit<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lit<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!(
                "header: expected '{}' at byte {}",
                c as char, self.i
            ))
        }
    }

    fn string(&mut self) -> std::result::Result<String, String> {
        let q = self.peek().ok_or("header: unexpected end")?;
        if q != b'\'' && q != b'"' {
            return Err(format!("header: expected a string at byte {}", self.i));
        }
        self.i += 1;
        let start = self.i;
        while self.i < self.s.len() && self.s[self.i] != q {
            self.i += 1;
        }
        if self.i == self.s.len() {
            return Err("header: unterminated string".into());
        }
        let out = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
        self.i += 1;
        Ok(out)
    }

    fn word(&mut self) -> String {
        self.skip_ws();
        let start = self.i;
        while self.i < self.s.len() && (self.s[self.i].is_ascii_alphanumeric()) {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i]).into_owned()
    }

    fn shape(&mut self) -> std::result::Result<Vec<usize>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            if self.eat(b')') {
                return Ok(dims);
            }
            let w = self.word();
            // Python 2 wrote long integers with an `L` suffix.
            let digits = w.strip_suffix('L').unwrap_or(&w);
            let d = digits
                .parse::<usize>()
                .map_err(|_| format!("header: bad dimension {w:?} in shape"))?;
            dims.push(d);
            if !self.eat(b',') {
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

fn parse_dict(text: &str) -> std::result::Result<(String, bool, Vec<usize>), String> {
    let mut p = Lit {
        s: text.as_bytes(),
        i: 0,
    };
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.expect(b':')?;
        match key.as_str() {
            "descr" => descr = Some(p.string()?),
            "fortran_order" => {
                fortran = Some(match p.word().as_str() {
                    "True" => true,
                    "False" => false,
                    w => return Err(format!("header: fortran_order is {w:?}")),
                })
            }
            "shape" => shape = Some(p.shape()?),
            k => return Err(format!("header: unexpected key {k:?}")),
        }
        if !p.eat(b',') {
            p.expect(b'}')?;
            break;
        }
    }
    match (descr, fortran, shape) {
        (Some(d), Some(f), Some(s)) => Ok((d, f, s)),
        _ => Err("header: needs the keys 'descr', 'fortran_order' and 'shape'".into()),
    }
}

/// Reads just the header of the `.npy` file at `path`.
pub fn read_header(path: impl AsRef<Path>) -> Result<NpyHeader> {
    let path = path.as_ref();
    let mut f =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut buf = vec![0u8; 12];
    let got = read_up_to(&mut f, &mut buf).with_context(|| format!("{}", path.display()))?;
    buf.truncate(got);
    let prefix = prefix_len(&buf).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    ensure!(
        buf.len() >= prefix,
        "{}: truncated: the file ends inside the header",
        path.display()
    );
    let hlen = if prefix == 10 {
        u16::from_le_bytes([buf[8], buf[9]]) as usize
    } else {
        u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize
    };
    let total = prefix + hlen;
    if total > buf.len() {
        let old = buf.len();
        buf.resize(total, 0);
        let more =
            read_up_to(&mut f, &mut buf[old..]).with_context(|| format!("{}", path.display()))?;
        buf.truncate(old + more);
    }
    parse(&buf).map_err(|e| anyhow!("{}: {e}", path.display()))
}

/// Reads into `buf` until it is full or the file ends; returns the bytes read.
fn read_up_to(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Reads the `.npy` file at `path` holding a C-order array of `T`; returns its shape and data.
/// Errors (each naming the file) when the dtype is not `T`'s, the array is in Fortran order, or the
/// data are shorter or longer than the shape says.
pub fn read<T: NpyElement>(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<T>)> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let h = parse(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if h.dtype() != Some(T::DTYPE) {
        bail!(
            "{}: dtype {:?}, expected {:?} ({})",
            path.display(),
            h.descr,
            T::DTYPE.descr(),
            std::any::type_name::<T>()
        );
    }
    ensure!(
        !h.fortran_order,
        "{}: array is in Fortran order; only C order is supported (save with \
         numpy.ascontiguousarray)",
        path.display()
    );
    let n = h.len().with_context(|| format!("{}", path.display()))?;
    let want = n
        .checked_mul(T::DTYPE.size())
        .with_context(|| format!("{}: data size overflows", path.display()))?;
    let have = bytes.len() - h.data_offset;
    ensure!(
        have >= want,
        "{}: truncated: shape {} of {} needs {want} data bytes, the file has {have}",
        path.display(),
        shape_tuple(&h.shape),
        h.descr
    );
    ensure!(
        have == want,
        "{}: {} bytes after the data of shape {} of {}",
        path.display(),
        have - want,
        shape_tuple(&h.shape),
        h.descr
    );
    Ok((h.shape, T::from_le(&bytes[h.data_offset..])))
}

/// [`read()`] for `f32` (`'<f4'`).
pub fn read_f32(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<f32>)> {
    read(path)
}

/// [`read()`] for `f64` (`'<f8'`).
pub fn read_f64(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<f64>)> {
    read(path)
}

/// [`read()`] for `i32` (`'<i4'`).
pub fn read_i32(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<i32>)> {
    read(path)
}

/// [`read()`] for `u8` (`'|u1'`).
pub fn read_u8(path: impl AsRef<Path>) -> Result<(Vec<usize>, Vec<u8>)> {
    read(path)
}

/// Streams an array into any writer: the header on creation, then the data in pieces of any size
/// (frames, rows), with [`NpyWriter::finish`] checking that exactly the announced number of
/// elements was written. Atomicity is the caller's business (write to a temporary file and rename
/// it after `finish`).
pub struct NpyWriter<W: Write> {
    w: W,
    dtype: Dtype,
    expected: usize,
    written: usize,
    buf: Vec<u8>,
}

impl<W: Write> NpyWriter<W> {
    /// Writes the header for an array of `dtype` and `shape` to `w`.
    pub fn new(mut w: W, dtype: Dtype, shape: &[usize]) -> Result<Self> {
        let expected = element_count(shape)?;
        w.write_all(&header(dtype, shape))?;
        Ok(Self {
            w,
            dtype,
            expected,
            written: 0,
            buf: Vec::new(),
        })
    }

    /// Appends `data` (the next elements in C order).
    pub fn write<T: NpyElement>(&mut self, data: &[T]) -> Result<()> {
        ensure!(
            T::DTYPE == self.dtype,
            "npy writer: writing {} into an array of {}",
            T::DTYPE.descr(),
            self.dtype.descr()
        );
        ensure!(
            self.written + data.len() <= self.expected,
            "npy writer: {} elements written, more than the {} the shape holds",
            self.written + data.len(),
            self.expected
        );
        self.buf.clear();
        T::extend_le(data, &mut self.buf);
        self.w.write_all(&self.buf)?;
        self.written += data.len();
        Ok(())
    }

    /// Checks that the array is complete, flushes, and returns the writer.
    pub fn finish(mut self) -> Result<W> {
        ensure!(
            self.written == self.expected,
            "npy writer: {} of {} elements written",
            self.written,
            self.expected
        );
        self.w.flush()?;
        Ok(self.w)
    }
}
