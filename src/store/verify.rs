//! Integrity of what hiermd stores, and `hiermd verify`.
//!
//! Every file hiermd writes for later use carries an XXH3-64 checksum in a manifest:
//!
//! - a dataset's `manifest.toml` records the XXH3 of its atom table and of each trajectory's
//!   payload (the bytes after the 4 KiB header; the header is checked field by field against
//!   the manifest entry);
//! - a feature store's `manifest.toml` records the XXH3 of each feature file's payload;
//! - each checkpoint folder has a `manifest.toml` with the size and XXH3 of each of its files
//!   (see [`crate::workflow::checkpoint`]);
//! - a model file (`init-model`, `pretrain`, `train`: safetensors) records its own XXH3 in its
//!   metadata under [`SEAL_KEY`]: a safetensors header is the file's manifest, and a loose model
//!   file must stay checkable wherever it is copied. The value is the XXH3 of the whole file
//!   with the 16 hex digits of the value itself written as `0`s, so every bit of the file,
//!   header included, is covered.
//!
//! Opening a dataset, feature store or model checks what is cheap (sizes, headers against the
//! manifest, token indices, paths confined to the folder; a model file's checksum, since it is
//! read whole anyway); [`verify`] checks everything, and files written before checksums were
//! recorded are reported as "no checksum recorded", not as errors.

use super::dataset::{check_atoms, confined, first_implausible, open_entry, read_manifest};
use super::features::FeatureStore;
use super::{Dataset, HEADER_BYTES};
use crate::tape::{ParamId, ParamStore};
use anyhow::{bail, ensure, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// Largest coordinate magnitude in Angstrom that a stored frame may hold: beyond it (or NaN,
/// or infinite) a value is taken for corruption, not for a molecule.
pub const MAX_ABS_COORDINATE: f32 = 1e6;

/// The safetensors metadata key under which a model file records its own XXH3-64.
pub const SEAL_KEY: &str = "hiermd.xxh3";

/// The placeholder the seal is computed over: 16 ASCII zeros in place of the hex digits.
const SEAL_ZEROS: &[u8; 16] = b"0000000000000000";

/// An XXH3-64 as written in manifests: 16 lowercase hex digits.
pub fn xxh3_hex(h: u64) -> String {
    format!("{h:016x}")
}

/// Whether `s` is a checksum as [`xxh3_hex`] writes it.
fn is_hex16(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

// ------------------------------------------------------------------------ safetensors seal --

/// Splits a safetensors buffer into (header length, header JSON bytes).
fn st_header(bytes: &[u8]) -> Result<(usize, &[u8])> {
    ensure!(
        bytes.len() >= 8,
        "{} bytes: too short for safetensors",
        bytes.len()
    );
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let end = usize::try_from(n)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&e| e <= bytes.len())
        .with_context(|| {
            format!(
                "header length {n} runs past the end of the file ({} bytes)",
                bytes.len()
            )
        })?;
    Ok((end - 8, &bytes[8..end]))
}

/// Adds the seal ([`SEAL_KEY`]) to a serialised safetensors file. The header is rewritten in a
/// canonical form (metadata keys sorted, tensors in data order) so that equal contents give
/// equal bytes in every process (safetensors writes its metadata in hash-map order); the data
/// are unchanged.
pub fn seal_safetensors(bytes: &[u8]) -> Result<Vec<u8>> {
    let (n, header) = st_header(bytes)?;
    let data = &bytes[8 + n..];
    let value: serde_json::Value =
        serde_json::from_slice(header).context("safetensors header is not JSON")?;
    let obj = value
        .as_object()
        .context("safetensors header is not a JSON object")?;
    let mut meta: BTreeMap<String, String> = BTreeMap::new();
    if let Some(m) = obj.get("__metadata__") {
        for (k, v) in m.as_object().context("__metadata__ is not an object")? {
            let v = v
                .as_str()
                .with_context(|| format!("metadata {k:?} is not a string"))?;
            meta.insert(k.clone(), v.to_string());
        }
    }
    meta.insert(
        SEAL_KEY.to_string(),
        String::from_utf8(SEAL_ZEROS.to_vec()).expect("ASCII"),
    );
    let mut tensors: Vec<(&String, &serde_json::Value)> =
        obj.iter().filter(|(k, _)| *k != "__metadata__").collect();
    tensors.sort_by_key(|(name, info)| {
        (
            info.get("data_offsets")
                .and_then(|o| o.get(0))
                .and_then(|o| o.as_u64())
                .unwrap_or(0),
            name.to_string(),
        )
    });
    let mut text = String::from("{\"__metadata__\":");
    text.push_str(&serde_json::to_string(&meta)?);
    for (name, info) in tensors {
        text.push(',');
        text.push_str(&serde_json::to_string(name)?);
        text.push(':');
        text.push_str(&serde_json::to_string(info)?);
    }
    text.push('}');
    // Safetensors pads the header with spaces to a multiple of 8 bytes (data alignment).
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + data.len());
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    let pattern = format!(
        "\"{SEAL_KEY}\":\"{}\"",
        std::str::from_utf8(SEAL_ZEROS).expect("ASCII")
    );
    let at = find(&out[8..8 + text.len()], pattern.as_bytes())
        .context("the sealed header lost its seal key")?
        + 8
        + pattern.len()
        - 17;
    let h = xxh3_hex(xxh3_64(&out));
    out[at..at + 16].copy_from_slice(h.as_bytes());
    Ok(out)
}

/// First index of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What [`check_seal`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seal {
    /// The recorded XXH3 matches the contents (the checksum, hex).
    Intact(String),
    /// No checksum recorded (a file written before seals, or by another tool).
    Unsealed,
}

/// Checks a safetensors buffer's seal: its structure (header and data offsets cover the file
/// exactly) and, when it records one, its XXH3. Errors say what is wrong.
pub fn check_seal(bytes: &[u8]) -> Result<Seal> {
    let (n, header) = st_header(bytes)?;
    safetensors::SafeTensors::read_metadata(bytes).map_err(|e| {
        anyhow::anyhow!("not a readable safetensors file ({e}): truncated or corrupt")
    })?;
    let value: serde_json::Value =
        serde_json::from_slice(header).context("safetensors header is not JSON")?;
    let Some(recorded) = value
        .get("__metadata__")
        .and_then(|m| m.get(SEAL_KEY))
        .and_then(|v| v.as_str())
    else {
        return Ok(Seal::Unsealed);
    };
    ensure!(
        is_hex16(recorded),
        "the recorded checksum {recorded:?} is not 16 hex digits: corrupt"
    );
    let pattern = format!("\"{SEAL_KEY}\":\"{recorded}\"");
    let at = find(header, pattern.as_bytes())
        .context("the checksum is recorded in a form hiermd does not write: cannot check it")?
        + 8
        + pattern.len()
        - 17;
    let mut h = Xxh3::new();
    h.update(&bytes[..at]);
    h.update(SEAL_ZEROS);
    h.update(&bytes[at + 16..]);
    let actual = xxh3_hex(h.digest());
    ensure!(
        actual == recorded,
        "checksum mismatch: recorded XXH3 {recorded}, the contents give {actual}: the file is \
         corrupt"
    );
    debug_assert!(at < 8 + n);
    Ok(Seal::Intact(actual))
}

/// Reads a model file and checks its seal (see [`check_seal`]); errors name the file.
pub fn check_model_file(path: &Path) -> Result<Seal> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    check_seal(&bytes).with_context(|| format!("{}", path.display()))
}

/// Writes every parameter of `ps` to a sealed safetensors file (f32, by name, as
/// [`ParamStore::save`] does, plus [`SEAL_KEY`]), atomically.
pub fn save_params_sealed(
    ps: &ParamStore,
    path: &Path,
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let host: Vec<Vec<f32>> = (0..ps.len())
        .map(|i| ps.value(ParamId(i)).to_vec())
        .collect::<Result<_>>()?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = ps
        .names()
        .iter()
        .enumerate()
        .zip(&host)
        .map(|((i, n), h)| {
            safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                ps.value(ParamId(i)).shape().to_vec(),
                bytemuck::cast_slice(h),
            )
            .map(|v| (n.clone(), v))
            .map_err(anyhow::Error::from)
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, Some(metadata.clone()))
        .with_context(|| format!("serialising parameters for {}", path.display()))?;
    crate::output::write_atomic(path, &seal_safetensors(&bytes)?)
}

// ---------------------------------------------------------------------------------- verify --

/// What a [`Report`] line says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// A check that passed.
    Ok,
    /// Something worth knowing that is not damage (e.g. no checksum recorded).
    Note,
    /// Damage: the command exits with status 1.
    Fail,
}

/// What [`verify`] checked and found, one line per check.
#[derive(Clone, Debug)]
pub struct Report {
    /// The path verified.
    pub path: PathBuf,
    /// What it is: "dataset", "feature store", "training run", "pretraining run", "model file".
    pub kind: String,
    /// The checks, in order.
    pub lines: Vec<(Level, String)>,
}

impl Report {
    fn new(path: &Path, kind: &str) -> Self {
        Self {
            path: path.to_path_buf(),
            kind: kind.to_string(),
            lines: Vec::new(),
        }
    }

    fn ok(&mut self, s: impl Into<String>) {
        self.lines.push((Level::Ok, s.into()));
    }

    fn note(&mut self, s: impl Into<String>) {
        self.lines.push((Level::Note, s.into()));
    }

    fn fail(&mut self, s: impl Into<String>) {
        self.lines.push((Level::Fail, s.into()));
    }

    /// The problems found.
    pub fn problems(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|(l, _)| *l == Level::Fail)
            .map(|(_, s)| s.as_str())
            .collect()
    }

    /// Whether nothing is damaged.
    pub fn is_ok(&self) -> bool {
        self.lines.iter().all(|(l, _)| *l != Level::Fail)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "verify {} ({})", self.path.display(), self.kind)?;
        for (l, s) in &self.lines {
            let tag = match l {
                Level::Ok => "ok  ",
                Level::Note => "note",
                Level::Fail => "FAIL",
            };
            writeln!(f, "  {tag}  {s}")?;
        }
        let checks = self.lines.iter().filter(|(l, _)| *l == Level::Ok).count();
        let notes = self.lines.iter().filter(|(l, _)| *l == Level::Note).count();
        match self.problems().len() {
            0 => writeln!(
                f,
                "{}: intact ({checks} checks passed{})",
                self.path.display(),
                if notes > 0 {
                    format!(", {notes} note{}", if notes == 1 { "" } else { "s" })
                } else {
                    String::new()
                }
            ),
            n => writeln!(
                f,
                "{}: DAMAGED: {n} problem{} found ({checks} checks passed)",
                self.path.display(),
                if n == 1 { "" } else { "s" }
            ),
        }
    }
}

/// Checks a dataset, feature store, run folder (training or pretraining) or model file in
/// full: every checksum, every header against the manifest, token indices, and every stored
/// coordinate finite and within [`MAX_ABS_COORDINATE`]. Errors only when `path` is none of
/// these; damage is in the report.
pub fn verify(path: &Path) -> Result<Report> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("{}: cannot open", path.display()))?;
    if meta.is_file() {
        let mut r = Report::new(path, "model file");
        verify_model_file(
            path,
            path.file_name()
                .map_or("".into(), |n| n.to_string_lossy().into_owned()),
            &mut r,
        );
        return Ok(r);
    }
    let manifest = path.join("manifest.toml");
    if manifest.is_file() {
        let format = std::fs::read_to_string(&manifest)
            .ok()
            .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
            .and_then(|t| t.get("format").and_then(|f| f.as_str()).map(str::to_string));
        match format.as_deref() {
            Some("hiermd-features") => {
                let mut r = Report::new(path, "feature store");
                verify_features(path, &mut r);
                return Ok(r);
            }
            Some("hiermd-dataset") | None => {
                // An unreadable manifest is reported as the dataset's damage.
                let mut r = Report::new(path, "dataset");
                verify_dataset(path, &mut r);
                return Ok(r);
            }
            Some(other) => bail!(
                "{}: format {other:?}: not something hiermd verify knows",
                manifest.display()
            ),
        }
    }
    let run = path.join(crate::workflow::run::files::CONFIG).is_file();
    let pretrain = path.join("model.toml").is_file();
    if run || pretrain || path.join("checkpoints").is_dir() {
        let mut r = Report::new(
            path,
            if run {
                "training run"
            } else {
                "pretraining run"
            },
        );
        verify_run(path, run, &mut r);
        return Ok(r);
    }
    bail!(
        "{}: not a hiermd dataset, feature store, run folder or model file (no manifest.toml, \
         config.toml or checkpoints/)",
        path.display()
    )
}

/// Runs `hiermd verify PATH`: prints the report on stdout; `Ok(false)` when something is
/// damaged (the command then exits with status 1).
pub fn verify_command(path: &Path) -> Result<bool> {
    let r = verify(path)?;
    print!("{r}");
    Ok(r.is_ok())
}

/// The first line of an error chain plus its causes, on one line.
fn chain(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

fn verify_dataset(dir: &Path, r: &mut Report) {
    let manifest = match read_manifest(dir) {
        Ok(m) => m,
        Err(e) => {
            r.fail(chain(&e));
            return;
        }
    };
    r.ok(format!(
        "manifest.toml: {} trajectories, {} frames of {} atoms; file paths inside the folder; \
         total frames add up",
        manifest.trajectories.len(),
        manifest.total_frames,
        manifest.atoms
    ));

    // The atom table: checksum, then its contents against the manifest.
    let table = confined(dir, &manifest.atom_table, "atom_table");
    let atoms = table.and_then(|p| {
        let bytes = std::fs::read(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        Ok((p, bytes))
    });
    let mut atoms_ok = None;
    match atoms {
        Err(e) => r.fail(chain(&e)),
        Ok((p, bytes)) => {
            let actual = xxh3_hex(xxh3_64(&bytes));
            match &manifest.atom_table_xxh3 {
                Some(rec) if *rec == actual => {
                    r.ok(format!("{}: XXH3 {actual} matches", manifest.atom_table))
                }
                Some(rec) => r.fail(format!(
                    "{}: checksum mismatch: the manifest records XXH3 {rec}, the file gives \
                     {actual}: the atom table was edited or is corrupt",
                    p.display()
                )),
                None => r.note(format!(
                    "{}: no checksum recorded (dataset written before checksums)",
                    manifest.atom_table
                )),
            }
            match super::dataset::read_atom_table(&p)
                .and_then(|a| check_atoms(&manifest, &a, &p).map(|_| a))
            {
                Ok(a) => {
                    r.ok(format!(
                        "{}: {} atoms, token indices within 0..{} and residue indices within \
                         0..{}",
                        manifest.atom_table,
                        a.len(),
                        manifest.tokens,
                        manifest.residues
                    ));
                    atoms_ok = Some(a);
                }
                Err(e) => r.fail(chain(&e)),
            }
        }
    }

    for i in 0..manifest.trajectories.len() {
        let entry = &manifest.trajectories[i];
        let st = match open_entry(dir, &manifest, i) {
            Ok(st) => st,
            Err(e) => {
                r.fail(chain(&e));
                continue;
            }
        };
        let name = &entry.file;
        let raw = st.raw();
        let hdr = st.header();
        r.ok(format!(
            "{name}: header matches the manifest ({} frames of {} atoms, box {}, times {}) and \
             the file size",
            entry.frames, manifest.atoms, entry.has_box, entry.has_time
        ));
        // Bytes of the header that no field uses must be zero (as written).
        let flags = u32::from_le_bytes(raw[12..16].try_into().expect("4 bytes"));
        if let Some(k) = raw[32..HEADER_BYTES as usize].iter().position(|&b| b != 0) {
            r.fail(format!(
                "{}: header byte {} is {:#04x}, hiermd writes 0 there: the header is corrupt",
                st.path().display(),
                32 + k,
                raw[32 + k]
            ));
        } else if flags & !7 != 0 {
            r.fail(format!(
                "{}: header flags {flags:#x} has unknown bits set: the header is corrupt",
                st.path().display()
            ));
        }
        let payload = &raw[HEADER_BYTES as usize..];
        match &entry.payload_xxh3 {
            Some(rec) => {
                let actual = xxh3_hex(xxh3_64(payload));
                if *rec == actual {
                    r.ok(format!("{name}: payload XXH3 {actual} matches"));
                } else {
                    r.fail(format!(
                        "{}: payload checksum mismatch: the manifest records XXH3 {rec}, the \
                         file gives {actual}: the stored trajectory is corrupt",
                        st.path().display()
                    ));
                }
            }
            None => r.note(format!(
                "{name}: no checksum recorded (dataset written before checksums): only the \
                 values' plausibility is checked"
            )),
        }
        // Coordinates: every value finite and within range; the first bad one named, the rest
        // counted.
        let x = st.coords();
        let n = (st.atoms() * 3).max(1);
        match first_implausible(x) {
            None => r.ok(format!(
                "{name}: {} coordinates finite and within {MAX_ABS_COORDINATE:e} A",
                x.len()
            )),
            Some(k) => {
                let bad = x[k..]
                    .iter()
                    .filter(|&&v| !super::dataset::plausible(v))
                    .count();
                let atom = (k % n) / 3;
                let label = atoms_ok
                    .as_ref()
                    .and_then(|a| a.get(atom))
                    .map(|a| format!(" ({} of residue {} {})", a.name, a.resname, a.resid))
                    .unwrap_or_default();
                r.fail(format!(
                    "{}: frame {}: atom {atom}{label}: coordinate {} is {}{}",
                    st.path().display(),
                    k / n,
                    x[k],
                    if x[k].is_finite() {
                        "beyond 1e6 A"
                    } else {
                        "not finite"
                    },
                    if bad > 1 {
                        format!(" ({} implausible values in this file)", bad)
                    } else {
                        String::new()
                    }
                ));
            }
        }
        if hdr.has_box {
            let b: &[f32] = bytemuck::cast_slice(
                &raw[hdr.boxes_offset() as usize..hdr.times_offset() as usize],
            );
            match first_implausible(b) {
                None => r.ok(format!("{name}: unit cells finite")),
                Some(k) => r.fail(format!(
                    "{}: frame {}: unit cell value {} is implausible: the stored trajectory is \
                     corrupt",
                    st.path().display(),
                    k / 9,
                    b[k]
                )),
            }
        }
        if hdr.has_time {
            let t = &raw[hdr.times_offset() as usize..];
            let bad = t
                .chunks_exact(8)
                .position(|c| !f64::from_le_bytes(c.try_into().expect("8 bytes")).is_finite());
            match bad {
                None => r.ok(format!("{name}: times finite")),
                Some(k) => r.fail(format!(
                    "{}: frame {k}: time is not finite: the stored trajectory is corrupt",
                    st.path().display()
                )),
            }
        }
    }
}

fn verify_features(dir: &Path, r: &mut Report) {
    let store = match FeatureStore::open(dir) {
        Ok(s) => s,
        Err(e) => {
            r.fail(chain(&e));
            return;
        }
    };
    let m = &store.manifest;
    r.ok(format!(
        "manifest.toml and every file header agree: {} trajectories, {} frames of {} tokens x 4 \
         x {} {}",
        m.trajectories.len(),
        m.total_frames,
        m.tokens,
        m.channels,
        m.dtype
    ));
    for (i, t) in m.trajectories.iter().enumerate() {
        let raw = store.raw(i);
        let payload = &raw[super::FEATURE_HEADER_BYTES as usize..];
        match &t.payload_xxh3 {
            Some(rec) => {
                let actual = xxh3_hex(xxh3_64(payload));
                if *rec == actual {
                    r.ok(format!("{}: payload XXH3 {actual} matches", t.file));
                } else {
                    r.fail(format!(
                        "{}: payload checksum mismatch: the manifest records XXH3 {rec}, the \
                         file gives {actual}: the feature file is corrupt",
                        store.path(i).display()
                    ));
                }
            }
            None => r.note(format!(
                "{}: no checksum recorded (store written before checksums)",
                t.file
            )),
        }
        let data = &raw[super::FEATURE_HEADER_BYTES as usize..store.ca_offset(i)];
        let per_frame = (m.tokens * 4 * m.channels).max(1);
        let bad = match m.dtype {
            super::FeatureDtype::F32 => {
                let v: &[f32] = bytemuck::cast_slice(data);
                v.iter().position(|x| !x.is_finite())
            }
            super::FeatureDtype::F16 => {
                let v: &[half::f16] = bytemuck::cast_slice(data);
                v.iter().position(|x| !x.is_finite())
            }
        };
        match bad {
            None => r.ok(format!("{}: features finite", t.file)),
            Some(k) => r.fail(format!(
                "{}: frame {}: token {}: feature value is not finite: the feature file is corrupt",
                store.path(i).display(),
                k / per_frame,
                (k % per_frame) / (4 * m.channels).max(1)
            )),
        }
        if m.ca_positions {
            let ca: &[f32] = bytemuck::cast_slice(&raw[store.ca_offset(i)..]);
            match first_implausible(ca) {
                None => r.ok(format!(
                    "{}: C-alpha positions finite and within {MAX_ABS_COORDINATE:e} A",
                    t.file
                )),
                Some(k) => r.fail(format!(
                    "{}: frame {}: token {}: C-alpha coordinate {} is implausible: the feature \
                     file is corrupt",
                    store.path(i).display(),
                    k / (m.tokens * 3).max(1),
                    (k % (m.tokens * 3).max(1)) / 3,
                    ca[k]
                )),
            }
        }
    }
    // The dataset the features were computed from, if it is still there.
    let ds_dir = Path::new(&m.dataset);
    if ds_dir.join("manifest.toml").is_file() {
        match Dataset::open(ds_dir).and_then(|ds| store.check_dataset(&ds)) {
            Ok(()) => r.ok(format!(
                "computed from {} as it is now (its manifest's XXH3 matches)",
                m.dataset
            )),
            Err(e) => r.fail(chain(&e)),
        }
    } else {
        r.note(format!(
            "the dataset {} is not there: the store is not checked against it",
            m.dataset
        ));
    }
}

/// Checks a model file (safetensors) `path`, named `name` in the report: seal, structure, and
/// every f32 value finite.
fn verify_model_file(path: &Path, name: String, r: &mut Report) {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            r.fail(format!("{}: cannot read: {e}", path.display()));
            return;
        }
    };
    match check_seal(&bytes) {
        Ok(Seal::Intact(h)) => r.ok(format!("{name}: XXH3 {h} matches")),
        Ok(Seal::Unsealed) => r.note(format!(
            "{name}: no checksum recorded (written before checksums, or by another tool): only \
             its structure and values are checked"
        )),
        Err(e) => {
            r.fail(format!("{}: {e:#}", path.display()));
            return;
        }
    }
    let st = match safetensors::SafeTensors::deserialize(&bytes) {
        Ok(st) => st,
        Err(e) => {
            r.fail(format!(
                "{}: not a readable safetensors file: {e}",
                path.display()
            ));
            return;
        }
    };
    let mut bad = Vec::new();
    let mut tensors = st.tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (tname, t) in &tensors {
        if t.dtype() != safetensors::Dtype::F32 {
            continue;
        }
        if let Some(k) = t
            .data()
            .chunks_exact(4)
            .position(|c| !f32::from_le_bytes(c.try_into().expect("4 bytes")).is_finite())
        {
            bad.push(format!("{tname}[{k}]"));
        }
    }
    if bad.is_empty() {
        r.ok(format!(
            "{name}: {} tensors, every value finite",
            tensors.len()
        ));
    } else {
        r.fail(format!(
            "{}: non-finite values in {}",
            path.display(),
            bad.join(", ")
        ));
    }
}

fn verify_run(dir: &Path, training: bool, r: &mut Report) {
    use crate::workflow::checkpoint::{CheckpointStatus, Checkpoints};
    use crate::workflow::run::files;
    if training {
        let cpath = dir.join(files::CONFIG);
        match std::fs::read_to_string(&cpath)
            .with_context(|| format!("{}: cannot read", cpath.display()))
            .and_then(|t| {
                crate::workflow::config::RunConfig::from_toml_with(&t, &[])
                    .with_context(|| format!("{}", cpath.display()))
            }) {
            Ok(_) => r.ok(format!("{}: a valid run configuration", files::CONFIG)),
            Err(e) => r.fail(chain(&e)),
        }
    }
    for name in [files::MODEL, files::BEST] {
        let p = dir.join(name);
        if p.is_file() {
            verify_model_file(&p, name.to_string(), r);
        }
    }
    if !dir.join(files::MODEL).is_file() {
        r.note(format!(
            "no {} (the run has not finished: `--resume` continues it)",
            files::MODEL
        ));
    }
    for name in [files::SUMMARY, files::SPIB_STATE] {
        let p = dir.join(name);
        if p.is_file() {
            match std::fs::read(&p)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice::<serde_json::Value>(&b)?))
            {
                Ok(_) => r.ok(format!("{name}: valid JSON")),
                Err(e) => r.fail(format!("{}: {e:#}: corrupt", p.display())),
            }
        }
    }
    let ck = Checkpoints::new(dir, 1);
    let epochs = match ck.epochs() {
        Ok(e) => e,
        Err(e) => {
            r.fail(chain(&e));
            return;
        }
    };
    for e in &epochs {
        let cdir = ck.root().join(format!("epoch-{e:06}"));
        let rel = format!("checkpoints/epoch-{e:06}");
        match Checkpoints::check(&cdir) {
            Ok(CheckpointStatus::Checksummed(n)) => {
                r.ok(format!("{rel}: {n} files, every XXH3 matches"))
            }
            Ok(CheckpointStatus::NoChecksums) => r.note(format!(
                "{rel}: no checksum recorded (written before checksums): its files parse"
            )),
            // The error names the checkpoint's file and what is wrong with it.
            Err(e) => r.fail(format!("{e:#}")),
        }
    }
    match ck.named_latest() {
        Ok(Some(name)) if epochs.iter().any(|e| format!("epoch-{e:06}") == name) => {
            r.ok(format!("checkpoints/latest names {name}"))
        }
        Ok(Some(name)) => r.note(format!(
            "checkpoints/latest names {name}, which is not there: `--resume` uses the newest \
             intact checkpoint"
        )),
        Ok(None) if !epochs.is_empty() => r.note(
            "checkpoints/latest is missing: `--resume` uses the newest intact checkpoint"
                .to_string(),
        ),
        Ok(None) => {}
        Err(e) => r.note(format!(
            "{e:#}: `--resume` uses the newest intact checkpoint"
        )),
    }
}
