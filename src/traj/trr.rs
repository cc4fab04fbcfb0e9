//! GROMACS TRR reader (full-precision trajectory, XDR big-endian).
//!
//! Each frame is a header followed by the blocks its sizes announce:
//! - header: magic 1993, the version string `"GMX_trn_file"` (as an int 13, then an XDR string:
//!   length 12 and 12 bytes), thirteen ints ir_size, e_size, box_size, vir_size, pres_size,
//!   top_size, sym_size, x_size, v_size, f_size, natoms, step, nre, then t and lambda as reals;
//! - blocks, each present when its size is non-zero: box (3x3), virial (3x3), pressure (3x3),
//!   x, v, f (natoms x 3). ir/e/top/sym sizes are ignored as GROMACS and xdrfile do (always 0).
//!
//! Reals are f32 or f64: the precision is the size of one real, from box_size / 9, else from the
//! first non-zero of x/v/f_size / (3 * natoms) (as xdrfile's `nFloatSize`); it may differ per
//! frame. Double-precision coordinates are rounded to f32, then converted nm -> Angstrom in f32,
//! as MDAnalysis does.
//!
//! Frames without coordinates (x_size = 0: GROMACS writes them when velocities or forces are saved
//! more often than positions) are skipped: a [`Frame`] is a set of coordinates, and MDAnalysis
//! yields such frames only with positions missing. So [`TrajectoryReader::position`] counts frames
//! with coordinates, while error messages give the frame's index in the file (counting every
//! frame, as `gmx check` and MDAnalysis number them).

use super::bytes::{
    check_finite, check_natoms, decode_f32_strided, decode_f64_as_f32, frame_error, scale_in_place,
    Endian, Source,
};
use super::{Frame, TrajectoryReader, UnitCell};
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};

/// Magic number opening every frame.
const MAGIC: i32 = 1993;
/// Version string following it.
const VERSION: &[u8; 12] = b"GMX_trn_file";
/// Header bytes up to and including `nre` (the reals t and lambda follow).
const HEADER_INTS_BYTES: usize = 3 * 4 + 12 + 13 * 4;

/// nm -> Angstrom.
const NM: f32 = 10.0;

/// One parsed frame header.
#[derive(Clone, Debug)]
struct Header {
    box_size: u64,
    vir_size: u64,
    pres_size: u64,
    x_size: u64,
    v_size: u64,
    f_size: u64,
    natoms: usize,
    step: i32,
    /// Bytes per real: 4 or 8.
    real: usize,
    time: f64,
}

/// Streaming TRR reader: one frame read per call, memory O(one frame).
pub struct TrrReader {
    path: PathBuf,
    src: Source,
    natoms: usize,
    /// Frames with coordinates returned so far.
    next: usize,
    /// Frames of the file consumed so far, with or without coordinates.
    file_index: usize,
    buf: Vec<u8>,
    /// Warnings not yet taken.
    warnings: Vec<String>,
    /// Whether a frame without a finite time was met.
    bad_time: bool,
}

impl TrrReader {
    /// Opens a TRR file; the atom count is taken from the first frame header.
    pub fn open(path: &Path) -> Result<Self> {
        let mut src = Source::open(path)?;
        let header = match read_header(&mut src) {
            Ok(Some(h)) => Ok(h),
            Ok(None) => Err(anyhow!("empty TRR file (no frames, so no atom count)")),
            Err(e) => Err(e),
        }
        .and_then(|h| match h.natoms {
            0 => Err(anyhow!("the first frame has 0 atoms")),
            _ => Ok(h),
        })
        .map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        src.seek_to(0)?;
        Ok(Self {
            path: path.to_path_buf(),
            src,
            natoms: header.natoms,
            next: 0,
            file_index: 0,
            buf: Vec::new(),
            warnings: Vec::new(),
            bad_time: false,
        })
    }

    /// Reads the frame at the current offset; `Ok(None)` at the end of the file, `Ok(Some(false))`
    /// for a frame without coordinates (skipped).
    fn read_one(&mut self, frame: &mut Frame) -> Result<Option<bool>> {
        let Some(h) = read_header(&mut self.src)? else {
            return Ok(None);
        };
        if h.natoms != self.natoms {
            bail!(
                "{} atoms, but the first frame has {}",
                h.natoms,
                self.natoms
            );
        }
        let total = h.box_size + h.vir_size + h.pres_size + h.x_size + h.v_size + h.f_size;
        self.src.require(total)?;
        if h.x_size == 0 {
            self.src.skip(total)?;
            return Ok(Some(false));
        }
        let e = Endian::Big;

        frame.unit_cell = None;
        if h.box_size > 0 {
            let mut b = [0u8; 72];
            let b = &mut b[..h.box_size as usize];
            self.src.read_exact(b)?;
            let mut flat = [0f32; 9];
            if h.real == 8 {
                decode_f64_as_f32(b, e, &mut flat);
            } else {
                decode_f32_strided(b, e, &mut flat, 1);
            }
            scale_in_place(&mut flat, NM);
            if flat.iter().any(|x| !x.is_finite()) {
                bail!("non-finite box {flat:?}");
            }
            // An all-zero box means none (MDAnalysis reports no dimensions).
            if flat.iter().any(|&x| x != 0.0) {
                let mut v = [[0f32; 3]; 3];
                for (d, s) in v.iter_mut().flatten().zip(flat) {
                    *d = s;
                }
                frame.unit_cell = Some(UnitCell { vectors: v });
            }
        }
        self.src.skip(h.vir_size + h.pres_size)?;

        // Sizes were checked against natoms and the file length by `read_header` and `require`.
        self.buf.resize(h.x_size as usize, 0);
        self.src.read_exact(&mut self.buf)?;
        frame.coords.resize(3 * self.natoms, 0.0);
        if h.real == 8 {
            decode_f64_as_f32(&self.buf, e, &mut frame.coords);
        } else {
            decode_f32_strided(&self.buf, e, &mut frame.coords, 1);
        }
        scale_in_place(&mut frame.coords, NM);
        self.src.skip(h.v_size + h.f_size)?;
        check_finite(&frame.coords)?;

        frame.time_ps = Some(h.time);
        if !h.time.is_finite() {
            frame.time_ps = None;
            if !self.bad_time {
                self.bad_time = true;
                self.warnings.push(format!(
                    "{}: frame {}: time {} ps is not finite; the file's times are dropped \
                     (give --dt)",
                    self.path.display(),
                    self.file_index,
                    h.time
                ));
            }
        }
        frame.step = Some(h.step as i64);
        Ok(Some(true))
    }
}

/// Reads one frame header; `Ok(None)` when the file ends exactly before it.
fn read_header(src: &mut Source) -> Result<Option<Header>> {
    let mut b = [0u8; HEADER_INTS_BYTES];
    let got = src.read_up_to(&mut b)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_INTS_BYTES {
        bail!("truncated: the file ends inside the frame header");
    }
    let e = Endian::Big;
    let int = |k: usize| e.i32_at(&b, 4 * k).unwrap_or(0);
    let magic = int(0);
    if magic != MAGIC {
        bail!("not a TRR frame: magic {magic} (expected {MAGIC})");
    }
    if int(1) != 13 || int(2) != 12 || &b[12..24] != VERSION {
        bail!("not a TRR frame: version string missing (expected \"GMX_trn_file\")");
    }
    // ints after the string: ir, e, box, vir, pres, top, sym, x, v, f, natoms, step, nre.
    let at = |k: usize| e.i32_at(&b, 24 + 4 * k).unwrap_or(0);
    let natoms = check_natoms(at(10) as i64)?;
    let size = |k: usize, name: &str| -> Result<u64> {
        let s = at(k);
        if s < 0 {
            bail!("corrupt header: negative {name} {s}");
        }
        Ok(s as u64)
    };
    let box_size = size(2, "box_size")?;
    let vir_size = size(3, "vir_size")?;
    let pres_size = size(4, "pres_size")?;
    let x_size = size(7, "x_size")?;
    let v_size = size(8, "v_size")?;
    let f_size = size(9, "f_size")?;

    // Bytes per real, as xdrfile's nFloatSize decides it.
    let n3 = 3 * natoms as u64;
    let real = if box_size != 0 {
        box_size / 9
    } else if x_size != 0 && n3 > 0 {
        x_size / n3
    } else if v_size != 0 && n3 > 0 {
        v_size / n3
    } else if f_size != 0 && n3 > 0 {
        f_size / n3
    } else {
        0
    };
    if real != 4 && real != 8 {
        bail!(
            "corrupt header: cannot tell float from double (box_size {box_size}, x_size \
             {x_size}, v_size {v_size}, f_size {f_size}, natoms {natoms})"
        );
    }
    for (s, want, name) in [
        (box_size, 9 * real, "box_size"),
        (vir_size, 9 * real, "vir_size"),
        (pres_size, 9 * real, "pres_size"),
        (x_size, n3 * real, "x_size"),
        (v_size, n3 * real, "v_size"),
        (f_size, n3 * real, "f_size"),
    ] {
        if s != 0 && s != want {
            bail!("corrupt header: {name} {s} (expected 0 or {want} for {natoms} atoms)");
        }
    }
    let time = if real == 8 {
        let t = src.read_array::<16>()?;
        e.f64_at(&t, 0).unwrap_or(0.0)
    } else {
        let t = src.read_array::<8>()?;
        e.f32_at(&t, 0).unwrap_or(0.0) as f64
    };
    Ok(Some(Header {
        box_size,
        vir_size,
        pres_size,
        x_size,
        v_size,
        f_size,
        natoms,
        step: at(11),
        real: real as usize,
        time,
    }))
}

impl TrajectoryReader for TrrReader {
    fn natoms(&self) -> usize {
        self.natoms
    }
    fn nframes_hint(&self) -> Option<usize> {
        None
    }
    fn read_frame(&mut self, frame: &mut Frame) -> Result<bool> {
        loop {
            let index = self.file_index;
            match self.read_one(frame) {
                Ok(None) => return Ok(false),
                Ok(Some(has_x)) => {
                    self.file_index += 1;
                    if has_x {
                        self.next += 1;
                        return Ok(true);
                    }
                }
                Err(e) => return Err(frame_error(&self.path, index, e)),
            }
        }
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
        Some("TRR: each frame's stored time (ps)".into())
    }
}
