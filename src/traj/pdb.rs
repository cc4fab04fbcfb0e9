//! Multi-model PDB files (plain or gzipped) read as trajectories, streamed line by line.
//!
//! Frames:
//! - with MODEL records, each `MODEL` ... `ENDMDL` block is a frame (a `MODEL` without `ENDMDL`
//!   ends at the next `MODEL`, `END` or the end of the file); an ATOM record outside a model is an
//!   error;
//! - without MODEL records, the file is one frame, or several separated by `END` records (the
//!   concatenated multi-frame PDB that VMD writes).
//!
//! Coordinates are the ATOM/HETATM columns 31-38, 39-46, 47-54 (Angstrom). The unit cell comes
//! from the latest CRYST1 record (before or inside a model). It carries over to later models, so
//! one CRYST1 before all the models boxes them all, where MDAnalysis 2.11 gives such frames no
//! box (its frames start after each MODEL record unless there is a CRYST1 per model). Files
//! whose CRYST1 records follow their models (`MODEL`, atoms, `ENDMDL`, `CRYST1`, as some tools
//! write NPT runs: no CRYST1 before the first MODEL) give each model the CRYST1 after its
//! ENDMDL, as MDAnalysis does. As in MDAnalysis, the 1 Angstrom cubic placeholder of cryo-EM and
//! NMR entries, an unparsable CRYST1 or zero lengths mean no unit cell. Every model must have as
//! many atoms as the first.
//!
//! A gzipped file (recognised by its magic bytes) is inflated as it is read, bounded by
//! [`super::input::gzip_limit`] so that a decompression bomb is refused.

use super::bytes::{check_finite, frame_error, MAX_ATOMS};
use super::{Frame, TrajectoryReader, UnitCell};
use anyhow::{anyhow, bail, Result};
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

/// Longest line accepted: PDB lines are 80 columns; a longer "line" means a binary or corrupt
/// file, and the cap keeps such a file from being read into memory whole.
const MAX_LINE: u64 = 64 << 10;

/// How frames are delimited, known from the first MODEL or ATOM record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Nothing seen yet.
    Unknown,
    /// MODEL / ENDMDL blocks.
    Models,
    /// No MODEL records: frames end at END records or the end of the file.
    EndDelimited,
}

/// Streaming multi-model PDB reader: one frame read per call, memory O(one frame).
pub struct PdbTrajectoryReader {
    path: PathBuf,
    /// The text (inflated when the file is gzipped); reopened to rewind.
    reader: Box<dyn BufRead + Send>,
    natoms: usize,
    next: usize,
    line: Vec<u8>,
    line_no: u64,
    /// `line` holds a line read ahead that the next [`Self::next_line`] returns again.
    pushed_back: bool,
    mode: Mode,
    /// A MODEL record ended the previous frame and opens the next one.
    pending_model: Option<String>,
    /// Unit cell of the latest CRYST1 record.
    cell: Option<UnitCell>,
    /// Whether a CRYST1 record came before the first MODEL record (`None` until that MODEL):
    /// if not, CRYST1 records follow their models.
    cryst_before_models: Option<bool>,
    /// Whether any CRYST1 record was read so far.
    seen_cryst: bool,
}

impl PdbTrajectoryReader {
    /// Opens a PDB file; the first frame is scanned for the atom count.
    pub fn open(path: &Path) -> Result<Self> {
        let mut r = Self {
            path: path.to_path_buf(),
            reader: super::input::open_text_stream(path, 1 << 20)?,
            natoms: 0,
            next: 0,
            line: Vec::with_capacity(128),
            line_no: 0,
            pushed_back: false,
            mode: Mode::Unknown,
            pending_model: None,
            cell: None,
            cryst_before_models: None,
            seen_cryst: false,
        };
        let mut coords = Vec::new();
        let natoms = match r.read_block(&mut coords) {
            Ok(Some(_)) if coords.is_empty() => Err(anyhow!("the first model has no atoms")),
            Ok(Some(_)) => Ok(coords.len() / 3),
            Ok(None) => Err(anyhow!("no ATOM or HETATM records")),
            Err(e) => Err(e),
        }
        .map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        r.rewind()?;
        r.natoms = natoms;
        Ok(r)
    }

    fn rewind(&mut self) -> Result<()> {
        // Reopened rather than seeked: a gzip stream cannot seek.
        self.reader = super::input::open_text_stream(&self.path, 1 << 20)?;
        self.line_no = 0;
        self.pushed_back = false;
        self.mode = Mode::Unknown;
        self.pending_model = None;
        self.cell = None;
        self.cryst_before_models = None;
        self.seen_cryst = false;
        Ok(())
    }

    /// Reads the next line into `self.line` without its line ending; `false` at the end.
    fn next_line(&mut self) -> Result<bool> {
        if self.pushed_back {
            self.pushed_back = false;
            return Ok(true);
        }
        self.line.clear();
        let n = (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut self.line)
            .map_err(|e| anyhow!("read error after line {}: {e}", self.line_no))?;
        if n == 0 {
            return Ok(false);
        }
        self.line_no += 1;
        if self.line.last() == Some(&b'\n') {
            self.line.pop();
        } else if n as u64 == MAX_LINE {
            bail!(
                "line {} is longer than {MAX_LINE} bytes: not a PDB file",
                self.line_no
            );
        }
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        Ok(true)
    }

    /// Reads the next frame's coordinates into `coords`; `Ok(None)` at the end of the file,
    /// otherwise the MODEL serial (if any) of the frame read.
    fn read_block(&mut self, coords: &mut Vec<f32>) -> Result<Option<Option<String>>> {
        coords.clear();
        // The topology keeps one conformer per residue (see AltLocFilter); frames must hold the
        // same atoms, so every model is filtered the same way.
        let mut altlocs = crate::topology::AltLocFilter::new();
        let mut model = self.pending_model.take();
        let mut in_model = model.is_some();
        while self.next_line()? {
            let rec = &self.line[..self.line.len().min(6)];
            if rec.starts_with(b"MODEL") {
                let serial = field(&self.line, 6, 14).unwrap_or("").to_string();
                if in_model || !coords.is_empty() {
                    // A MODEL without the previous ENDMDL: it opens the next frame.
                    self.pending_model = Some(serial);
                    return Ok(Some(model));
                }
                if self.cryst_before_models.is_none() {
                    self.cryst_before_models = Some(self.seen_cryst);
                }
                self.mode = Mode::Models;
                model = Some(serial);
                in_model = true;
            } else if rec == b"ENDMDL" {
                if in_model {
                    if self.cryst_before_models == Some(false) {
                        self.trailing_cryst()?;
                    }
                    return Ok(Some(model));
                }
            } else if rec == b"ATOM  " || rec == b"HETATM" {
                match self.mode {
                    Mode::Unknown => self.mode = Mode::EndDelimited,
                    Mode::Models if !in_model => bail!(
                        "line {}: ATOM/HETATM record outside a MODEL ... ENDMDL block",
                        self.line_no
                    ),
                    _ => {}
                }
                if !altlocs.keep(&self.line) {
                    continue;
                }
                if coords.len() >= 3 * MAX_ATOMS {
                    bail!("more than {MAX_ATOMS} atoms in one model");
                }
                for (lo, hi) in [(30, 38), (38, 46), (46, 54)] {
                    let v = field(&self.line, lo, hi)
                        .and_then(|s| s.parse::<f32>().ok())
                        .ok_or_else(|| {
                            anyhow!(
                                "line {}: cannot read a coordinate in columns {}-{}",
                                self.line_no,
                                lo + 1,
                                hi
                            )
                        })?;
                    coords.push(v);
                }
            } else if rec == b"CRYST1" {
                self.seen_cryst = true;
                self.cell = parse_cryst1(&self.line);
            } else if rec == b"END" || rec == b"END   " {
                let frame_open = in_model || !coords.is_empty();
                if frame_open {
                    return Ok(Some(model));
                }
            }
        }
        if in_model || !coords.is_empty() {
            return Ok(Some(model));
        }
        Ok(None)
    }

    /// After an ENDMDL in a file whose CRYST1 records follow their models: reads on to the next
    /// MODEL or atom record (left to be read again) and takes the CRYST1 records met on the way
    /// as the box of the model just closed, as MDAnalysis does.
    fn trailing_cryst(&mut self) -> Result<()> {
        while self.next_line()? {
            let rec = &self.line[..self.line.len().min(6)];
            if rec.starts_with(b"MODEL") || rec == b"ATOM  " || rec == b"HETATM" {
                self.pushed_back = true;
                break;
            }
            if rec == b"CRYST1" {
                self.seen_cryst = true;
                self.cell = parse_cryst1(&self.line);
            }
        }
        Ok(())
    }

    fn read_frame_inner(&mut self, frame: &mut Frame) -> Result<bool> {
        let Some(model) = self.read_block(&mut frame.coords)? else {
            return Ok(false);
        };
        let n = frame.coords.len() / 3;
        if n != self.natoms {
            let name = match model {
                Some(s) if !s.is_empty() => format!("MODEL {s}"),
                Some(_) => "this MODEL".to_string(),
                None => "this frame".to_string(),
            };
            bail!(
                "{name} (ending at line {}) has {n} atoms, but the first has {}",
                self.line_no,
                self.natoms
            );
        }
        check_finite(&frame.coords)?;
        frame.unit_cell = self.cell;
        frame.time_ps = None;
        frame.step = None;
        self.next += 1;
        Ok(true)
    }
}

/// Columns `lo..hi` (0-based, end exclusive) of a line as trimmed text, `None` when the line is
/// too short or the bytes are not UTF-8.
fn field(line: &[u8], lo: usize, hi: usize) -> Option<&str> {
    let b = line.get(lo..hi.min(line.len()))?;
    std::str::from_utf8(b).ok().map(str::trim)
}

/// The unit cell of a CRYST1 record, following MDAnalysis: lengths and angles read as f32; no
/// cell if unreadable, the 1 Angstrom placeholder, zero lengths or vectors that are not finite.
fn parse_cryst1(line: &[u8]) -> Option<UnitCell> {
    let cols = [(6, 15), (15, 24), (24, 33), (33, 40), (40, 47), (47, 54)];
    let mut v = [0f64; 6];
    for (d, (lo, hi)) in v.iter_mut().zip(cols) {
        *d = field(line, lo, hi)?.parse::<f32>().ok()? as f64;
    }
    // numpy.allclose(dims, [1, 1, 1, 90, 90, 90]) with its default tolerances.
    let unit = [1.0, 1.0, 1.0, 90.0, 90.0, 90.0];
    if v.iter()
        .zip(unit)
        .all(|(a, b)| (a - b).abs() <= 1e-8 + 1e-5 * b)
    {
        return None;
    }
    if v[..3].iter().all(|&x| x == 0.0) {
        return None;
    }
    let cell = UnitCell::from_lengths_angles(v[0], v[1], v[2], v[3], v[4], v[5]);
    cell.vectors
        .iter()
        .flatten()
        .all(|x| x.is_finite())
        .then_some(cell)
}

impl TrajectoryReader for PdbTrajectoryReader {
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
}
