//! CHARMM/NAMD/X-PLOR DCD reader (also what OpenMM, LAMMPS and MDAnalysis write).
//!
//! A DCD is a sequence of Fortran unformatted records, each framed by its byte length before and
//! after, in either byte order (detected from the first marker, which must be 84):
//!
//! 1. an 84-byte header: `"CORD"` and twenty integers ICNTRL (0-based below): NSET (frames, often
//!    wrong), ISTART, NSAVC, ..., NAMNF = ICNTRL\[8\] (fixed atoms), DELTA at ICNTRL\[9\] (f32 in
//!    CHARMM files, f64 spanning ICNTRL\[9..11\] in X-PLOR files), unit-cell flag ICNTRL\[10\], 4D
//!    flag ICNTRL\[11\]; ICNTRL\[19\] != 0 (the CHARMM version) marks a CHARMM-style file, and only
//!    those may carry unit cells and a fourth dimension;
//! 2. a title record: NTITLE and NTITLE lines of 80 characters;
//! 3. the atom count;
//! 4. with fixed atoms, the 1-based indices of the free atoms;
//! 5. per frame: the unit cell record (6 f64) if flagged, then X, Y and Z records of f32 (with
//!    fixed atoms only the first frame has all atoms, later ones only the free ones), then the
//!    fourth-dimension record if flagged (skipped).
//!
//! Frames are counted from the file size, like MDAnalysis, because writers that crash or append
//! leave NSET wrong (adk_dims.dcd says 500 and holds 98). Unlike MDAnalysis, a trailing partial
//! frame is not dropped silently: reading reaches it and fails with an error naming it.
//! Unit cells and times are interpreted exactly as MDAnalysis 2.x `DCDReader` does (see
//! [`unit_cell_from_charmm`] and [`DcdReader::read_frame`]), except that a time step that is not
//! [plausible](super::plausible_time_step) (DELTA x NSAVC of 0, negative, not finite, or the
//! 2.5e-322 ps that a CHARMM header without its version flag gives when DELTA is read as
//! X-PLOR's f64) gives no times and a warning ([`TrajectoryReader::take_warnings`]) instead of
//! wrong ones.

use super::bytes::{check_finite, check_natoms, decode_f32_strided, frame_error, Endian, Source};
use super::{Frame, TrajectoryReader, UnitCell};
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};

/// One AKMA time unit in picoseconds, computed as MDAnalysis does (ratio of its unit factors) so
/// that times agree to the last bit.
const AKMA_PS: f64 = 1.0 / (1.0 / 4.888821e-2);

/// Size of the unit-cell record: two markers and six f64.
const CELL_RECORD: u64 = 4 + 48 + 4;

/// The header fields of a DCD file, as stored.
#[derive(Clone, Debug)]
pub struct DcdHeader {
    /// Byte order of the file.
    pub endian: Endian,
    /// Frame count claimed by the header (NSET); often wrong, not used.
    pub nset: i32,
    /// MD step of the first frame (ISTART).
    pub istart: i32,
    /// MD steps between frames (NSAVC).
    pub nsavc: i32,
    /// Integration time step in AKMA units (DELTA).
    pub delta_akma: f64,
    /// CHARMM version (ICNTRL\[19\]); 0 for an X-PLOR-style file.
    pub charmm_version: i32,
    /// Whether each frame has a unit-cell record.
    pub has_unit_cell: bool,
    /// Whether each frame has a fourth-dimension record (skipped).
    pub four_dims: bool,
    /// Number of fixed atoms (NAMNF).
    pub nfixed: usize,
    /// Title lines, joined by newlines, trailing blanks removed.
    pub title: String,
}

/// Streaming DCD reader: one frame read per call, memory O(one frame).
pub struct DcdReader {
    path: PathBuf,
    src: Source,
    header: DcdHeader,
    natoms: usize,
    /// 0-based indices of the free atoms when there are fixed atoms.
    free: Vec<u32>,
    /// Coordinates of the first frame, the source of the fixed atoms' positions.
    fixed: Vec<f32>,
    first_frame_size: u64,
    frame_size: u64,
    /// Complete frames in the file.
    nframes: usize,
    /// Bytes of a trailing incomplete frame (0 if none).
    partial_bytes: u64,
    next: usize,
    buf: Vec<u8>,
    /// Whether frames get times: the header's time step is plausible.
    timed: bool,
    /// Warnings not yet taken.
    warnings: Vec<String>,
}

impl DcdReader {
    /// Opens a DCD file and reads its header.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_inner(path).map_err(|e| anyhow!("{}: {e:#}", path.display()))
    }

    fn open_inner(path: &Path) -> Result<Self> {
        let mut src = Source::open(path)?;
        let first = src
            .read_array::<4>()
            .map_err(|_| anyhow!("not a DCD file: too short"))?;
        let endian = if i32::from_le_bytes(first) == 84 {
            Endian::Little
        } else if i32::from_be_bytes(first) == 84 {
            Endian::Big
        } else {
            bail!(
                "not a DCD file: the first record marker is {} (expected 84)",
                i32::from_le_bytes(first)
            );
        };
        let rd_i32 = |src: &mut Source| -> Result<i32> { Ok(endian.i32(src.read_array()?)) };

        let hdr = src.read_array::<84>()?;
        match &hdr[0..4] {
            b"CORD" => {}
            b"VELD" => bail!("this DCD holds velocities (VELD), not coordinates"),
            other => bail!(
                "not a coordinate DCD: header id {:?} (expected \"CORD\")",
                String::from_utf8_lossy(other)
            ),
        }
        let icntrl = |i: usize| endian.i32_at(&hdr, 4 + 4 * i).unwrap_or(0);
        let charmm_version = icntrl(19);
        let charmm = charmm_version != 0;
        let delta_akma = if charmm {
            endian.f32_at(&hdr, 40).unwrap_or(0.0) as f64
        } else {
            endian.f64_at(&hdr, 40).unwrap_or(0.0)
        };
        let has_unit_cell = charmm && icntrl(10) != 0;
        let four_dims = charmm && icntrl(11) == 1;
        let nfixed = icntrl(8);
        let end = rd_i32(&mut src)?;
        if end != 84 {
            bail!("corrupt header: closing record marker {end} (expected 84)");
        }

        // Title record: NTITLE then NTITLE lines of 80 bytes.
        let tlen = rd_i32(&mut src)?;
        if tlen < 4 || (tlen - 4) % 80 != 0 {
            bail!("corrupt title record: length {tlen} is not 4 + 80 * NTITLE");
        }
        src.require(tlen as u64 + 4)?;
        let mut tbuf = vec![0u8; tlen as usize];
        src.read_exact(&mut tbuf)?;
        let title = tbuf[4..]
            .chunks(80)
            .map(|l| String::from_utf8_lossy(l).trim_end().to_string())
            .collect::<Vec<_>>()
            .join("\n");
        let tend = rd_i32(&mut src)?;
        if tend != tlen {
            bail!("corrupt title record: closing marker {tend} differs from opening {tlen}");
        }

        // Atom count record.
        let (a, n, b) = (rd_i32(&mut src)?, rd_i32(&mut src)?, rd_i32(&mut src)?);
        if a != 4 || b != 4 {
            bail!("corrupt atom-count record: markers {a} and {b} (expected 4)");
        }
        let natoms = check_natoms(n as i64)?;
        if natoms == 0 {
            bail!("the header declares 0 atoms");
        }
        if nfixed < 0 || nfixed as usize >= natoms {
            bail!("invalid fixed-atom count NAMNF = {nfixed} for {natoms} atoms");
        }
        let nfixed = nfixed as usize;
        let nfree = natoms - nfixed;

        // Free-atom index record (fixed-atom files only).
        let mut free = Vec::new();
        if nfixed > 0 {
            let m = rd_i32(&mut src)?;
            if m as i64 != 4 * nfree as i64 {
                bail!(
                    "corrupt free-atom record: length {m} (expected {})",
                    4 * nfree
                );
            }
            src.require(4 * nfree as u64 + 4)?;
            let mut ibuf = vec![0u8; 4 * nfree];
            src.read_exact(&mut ibuf)?;
            free.reserve_exact(nfree);
            for c in ibuf.chunks_exact(4) {
                let idx = endian.i32([c[0], c[1], c[2], c[3]]);
                if idx < 1 || idx as usize > natoms {
                    bail!("corrupt free-atom record: atom index {idx} outside 1..={natoms}");
                }
                free.push(idx as u32 - 1);
            }
            let m2 = rd_i32(&mut src)?;
            if m2 != m {
                bail!("corrupt free-atom record: closing marker {m2} differs from {m}");
            }
        }

        let ndims = if four_dims { 4 } else { 3 };
        let cell = if has_unit_cell { CELL_RECORD } else { 0 };
        let first_frame_size = cell + ndims * (4 * natoms as u64 + 8);
        let frame_size = cell + ndims * (4 * nfree as u64 + 8);
        let header_size = src.offset();
        let body = src.len().saturating_sub(header_size);
        let (nframes, partial_bytes) = if body < first_frame_size {
            (0, body)
        } else {
            let rest = body - first_frame_size;
            (1 + rest / frame_size, rest % frame_size)
        };
        let nframes = usize::try_from(nframes).map_err(|_| anyhow!("too many frames"))?;

        let nsavc = icntrl(2);
        let dt = delta_akma * AKMA_PS * nsavc as f64;
        let mut warnings = Vec::new();
        let timed = super::plausible_time_step(dt);
        if !timed {
            // Read as CHARMM's f32, the same bytes may make sense: say so, for --dt.
            let as_f32 = endian.f32_at(&hdr, 40).unwrap_or(0.0) as f64 * AKMA_PS * nsavc as f64;
            let hint = if !charmm && super::plausible_time_step(as_f32) {
                format!(
                    "; the header has no CHARMM version flag, so DELTA was read as X-PLOR's f64 \
                     (read as CHARMM's f32 it would give {as_f32} ps)"
                )
            } else {
                String::new()
            };
            warnings.push(format!(
                "{}: frame 0: the header's time step DELTA x NSAVC = {delta_akma:e} AKMA x \
                 {nsavc} = {dt:e} ps is not plausible{hint}; frames get no times (give --dt)",
                path.display()
            ));
        }

        Ok(Self {
            path: path.to_path_buf(),
            src,
            header: DcdHeader {
                endian,
                nset: icntrl(0),
                istart: icntrl(1),
                nsavc: icntrl(2),
                delta_akma,
                charmm_version,
                has_unit_cell,
                four_dims,
                nfixed,
                title,
            },
            natoms,
            free,
            fixed: Vec::new(),
            first_frame_size,
            frame_size,
            nframes,
            partial_bytes,
            next: 0,
            buf: Vec::new(),
            timed,
            warnings,
        })
    }

    /// The header as read.
    pub fn header(&self) -> &DcdHeader {
        &self.header
    }

    /// Whether the file ends with an incomplete frame (reading it fails).
    pub fn is_truncated(&self) -> bool {
        self.partial_bytes > 0
    }

    /// Time of frame `index` in ps, as MDAnalysis computes it:
    /// `(index + ISTART / NSAVC) * DELTA * NSAVC` with DELTA converted from AKMA units.
    fn time_ps(&self, index: usize) -> Option<f64> {
        let h = &self.header;
        if h.nsavc == 0 || !self.timed {
            return None;
        }
        let dt = h.delta_akma * AKMA_PS * h.nsavc as f64;
        let t = (index as f64 + h.istart as f64 / h.nsavc as f64) * dt;
        t.is_finite().then_some(t)
    }

    fn read_frame_inner(&mut self, frame: &mut Frame) -> Result<bool> {
        let index = self.next;
        if index >= self.nframes {
            if self.partial_bytes > 0 {
                let size = if index == 0 {
                    self.first_frame_size
                } else {
                    self.frame_size
                };
                bail!(
                    "truncated: the file ends {} bytes into this frame of {size} bytes",
                    self.partial_bytes
                );
            }
            return Ok(false);
        }
        let full = index == 0 || self.header.nfixed == 0;
        let size = if index == 0 {
            self.first_frame_size
        } else {
            self.frame_size
        };
        // Frame sizes are bounded by the file size, checked at open.
        self.buf.resize(size as usize, 0);
        self.src.read_exact(&mut self.buf)?;
        let e = self.header.endian;
        let buf = &self.buf[..];
        let mut off = 0usize;
        // Reads one record's opening marker, checks it, returns the payload range and moves past
        // the closing marker.
        let mut record = |expect: usize, what: &str| -> Result<std::ops::Range<usize>> {
            let open = e.i32_at(buf, off).unwrap_or(-1);
            if open as i64 != expect as i64 {
                bail!("corrupt {what} record: length {open} (expected {expect})");
            }
            let range = off + 4..off + 4 + expect;
            let close = e.i32_at(buf, range.end).unwrap_or(-1);
            if close != open {
                bail!("corrupt {what} record: closing marker {close} differs from {open}");
            }
            off = range.end + 4;
            Ok(range)
        };

        frame.unit_cell = None;
        if self.header.has_unit_cell {
            let r = record(48, "unit-cell")?;
            let mut raw = [0f64; 6];
            for (k, v) in raw.iter_mut().enumerate() {
                *v = e.f64_at(buf, r.start + 8 * k).unwrap_or(0.0);
            }
            frame.unit_cell = unit_cell_from_charmm(raw)?;
        }

        let n = self.natoms;
        frame.coords.resize(3 * n, 0.0);
        if full {
            for (axis, name) in ["X", "Y", "Z"].into_iter().enumerate() {
                let r = record(4 * n, name)?;
                decode_f32_strided(&buf[r], e, &mut frame.coords[axis..], 3);
            }
            if self.header.nfixed > 0 && index == 0 {
                self.fixed.clear();
                self.fixed.extend_from_slice(&frame.coords);
            }
        } else {
            let nfree = self.free.len();
            frame.coords.copy_from_slice(&self.fixed);
            for (axis, name) in ["X", "Y", "Z"].into_iter().enumerate() {
                let r = record(4 * nfree, name)?;
                for (&i, c) in self.free.iter().zip(buf[r].chunks_exact(4)) {
                    frame.coords[3 * i as usize + axis] = e.f32([c[0], c[1], c[2], c[3]]);
                }
            }
        }
        if self.header.four_dims {
            let m = if full { n } else { self.free.len() };
            record(4 * m, "fourth-dimension")?;
        }
        check_finite(&frame.coords)?;

        frame.time_ps = self.time_ps(index);
        frame.step = Some(self.header.istart as i64 + index as i64 * self.header.nsavc as i64);
        self.next += 1;
        Ok(true)
    }
}

/// Converts a CHARMM unit-cell record `[A, gamma, B, beta, alpha, C]` to a [`UnitCell`] following
/// MDAnalysis's `DCDReader._frame_to_ts` exactly:
/// - if all three angle fields lie in \[-1, 1\] they are cosines (CHARMM, NAMD > 2.5), and the
///   angle is `90 - asin(x)` degrees (exact 90 for an orthorhombic box, unlike `acos`);
/// - else, if any field is negative or an angle exceeds 180, the record is the symmetric box
///   matrix `[h11, h21, h22, h31, h32, h33]` of new CHARMM versions;
/// - else the angles are in degrees (NAMD 2.5).
///
/// A box with zero lengths (what writers store when there is no box) or one MDAnalysis deems
/// invalid gives `None`; a box whose vectors would be non-finite is an error.
pub fn unit_cell_from_charmm(raw: [f64; 6]) -> Result<Option<UnitCell>> {
    let [a, gamma, b, beta, alpha, c] = raw;
    let mut uc = [a, b, c, alpha, beta, gamma];
    if uc[3..].iter().all(|x| (-1.0..=1.0).contains(x)) {
        for x in &mut uc[3..] {
            *x = 90.0 - x.asin() * 90.0 / std::f64::consts::FRAC_PI_2;
        }
    } else if uc.iter().any(|&x| x < 0.0) || uc[3..].iter().any(|&x| x > 180.0) {
        let e1 = [raw[0], raw[1], raw[3]];
        let e2 = [raw[1], raw[2], raw[4]];
        let e3 = [raw[3], raw[4], raw[5]];
        match triclinic_box(e1, e2, e3) {
            Some(dims) => uc = dims,
            None => return Ok(None),
        }
    }
    // MDAnalysis stores dimensions as f32 and reports no box when all lengths are zero.
    let uc = uc.map(|x| x as f32 as f64);
    if uc[..3].iter().all(|&x| x == 0.0) {
        return Ok(None);
    }
    let cell = UnitCell::from_lengths_angles(uc[0], uc[1], uc[2], uc[3], uc[4], uc[5]);
    if cell.vectors.iter().flatten().any(|v| !v.is_finite()) {
        bail!("invalid unit cell {uc:?} (lengths, angles)");
    }
    Ok(Some(cell))
}

/// Lengths and angles of three box vectors, as MDAnalysis's `triclinic_box`: `None` (its all-zero
/// box) unless every length is positive and every angle lies in (0, 180).
fn triclinic_box(x: [f64; 3], y: [f64; 3], z: [f64; 3]) -> Option<[f64; 6]> {
    let dot = |p: [f64; 3], q: [f64; 3]| p[0] * q[0] + p[1] * q[1] + p[2] * q[2];
    let (lx, ly, lz) = (dot(x, x).sqrt(), dot(y, y).sqrt(), dot(z, z).sqrt());
    let alpha = (dot(y, z) / (ly * lz)).acos().to_degrees();
    let beta = (dot(x, z) / (lx * lz)).acos().to_degrees();
    let gamma = (dot(x, y) / (lx * ly)).acos().to_degrees();
    let dims = [lx, ly, lz, alpha, beta, gamma];
    // NaN fails every comparison, as in numpy.
    let ok = dims.iter().all(|&v| v as f32 > 0.0) && dims[3..].iter().all(|&v| v < 180.0);
    ok.then_some(dims)
}

impl TrajectoryReader for DcdReader {
    fn natoms(&self) -> usize {
        self.natoms
    }
    fn nframes_hint(&self) -> Option<usize> {
        Some(self.nframes)
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
        let h = &self.header;
        (self.timed && h.nsavc != 0).then(|| {
            format!(
                "DCD header: DELTA {} AKMA x NSAVC {} = {} ps per frame (1 AKMA = {AKMA_PS} ps, \
                 as MDAnalysis), first frame at step ISTART {}",
                h.delta_akma,
                h.nsavc,
                h.delta_akma * AKMA_PS * h.nsavc as f64,
                h.istart
            )
        })
    }
}
