//! The feature store: the atom stage's per-frame residue tokens, written once and read through
//! memory maps by the token stage.
//!
//! ```text
//! FEATURES/manifest.toml    what the store holds (TOML, see [`FeatureManifest`])
//! FEATURES/feat-0000.hmdf   one file per trajectory of the dataset: a 4 KiB header, then
//!                           [frames][tokens][4][H] in f32 or f16 (row 0 = the scalars s,
//!                           rows 1-3 = the x, y, z components of the vectors v), then
//!                           optionally f32 C-alpha positions [frames][tokens][3] in Angstrom
//! ```
//! All numbers are little-endian. Frames are those of the dataset, index for index, so the
//! dataset's [`LaggedPairs`](super::LaggedPairs) address the features directly.
//!
//! As with `hiermd import`, the folder is built under a temporary name beside the target and
//! renamed into place by [`FeatureWriter::finish`], each file's `complete` flag being the last
//! thing written to it: a failed, dropped or killed writer leaves no store behind (a killed one
//! leaves its temporary folder, which the next writer for the same target removes).

use super::{source_file, Dataset, SourceFile};
use crate::output::{AtomicFile, DirOutput, OutputKind};
use crate::progress::Progress;
use anyhow::{bail, ensure, Context, Result};
use half::f16;
use half::slice::HalfFloatSliceExt;
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Magic bytes at the start of every feature file.
pub const FEATURE_MAGIC: [u8; 8] = *b"HIERMDFT";
/// Version of the feature file layout and its manifest.
pub const FEATURE_VERSION: u32 = 1;
/// Bytes reserved for a feature file's header; the data start here (page-aligned, so the memory
/// map hands out aligned f32 and f16 slices).
pub const FEATURE_HEADER_BYTES: u64 = 4096;

/// Rows per token in the data: s, then v's x, y and z.
const ROWS: usize = 4;
const FLAG_HAS_CA: u32 = 1;
const FLAG_COMPLETE: u32 = 2;
/// Bytes of converted rows a writer buffers before writing them out.
const CHUNK_BYTES: usize = 1 << 20;

/// Fault injection for the crash-safety tests: the process aborts (as a kill would: no
/// destructors, no cleanup) when a writer has appended this many frames in all. Never set it
/// outside tests. Distinct from import's `HIERMD_FAULT_ABORT_AFTER_FRAMES`, so that a test can
/// import a dataset and then kill only the feature writer.
pub const FAULT_ABORT_ENV: &str = "HIERMD_FAULT_ABORT_FEATURES_AFTER_FRAMES";

/// Element type of the stored features.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureDtype {
    /// IEEE-754 single precision.
    F32,
    /// IEEE-754 half precision: half the disk and page-cache footprint, about three significant
    /// digits (relative rounding error at most 2^-11 for normal values).
    F16,
}

impl FeatureDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }

    /// The name used in the manifest and on the command line: "f32" or "f16".
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }

    /// The NumPy type string of the element: `'<f4'` or `'<f2'`.
    pub fn npy_descr(self) -> &'static str {
        match self {
            Self::F32 => "<f4",
            Self::F16 => "<f2",
        }
    }

    fn code(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(Self::F32),
            1 => Some(Self::F16),
            _ => None,
        }
    }
}

impl FromStr for FeatureDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "half" => Ok(Self::F16),
            _ => bail!("unknown feature dtype {s:?}: expected f32 or f16"),
        }
    }
}

impl std::fmt::Display for FeatureDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The manifest of a feature store (`manifest.toml`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FeatureManifest {
    /// Always "hiermd-features".
    pub format: String,
    /// [`FEATURE_VERSION`] of the writer.
    pub version: u32,
    /// Version of hiermd that wrote it.
    pub written_by: String,
    /// The dataset folder the features were computed from (absolute).
    pub dataset: String,
    /// The dataset's `manifest.toml` with its size and XXH3: a re-imported dataset no longer
    /// matches (see [`FeatureStore::check_dataset`]).
    pub dataset_manifest: SourceFile,
    /// The atom-stage (backbone) checkpoint the features came from, with its XXH3, if given.
    pub backbone: Option<SourceFile>,
    /// Tokens (residues) per frame, R.
    pub tokens: usize,
    /// Channels per row, H.
    pub channels: usize,
    /// Element type of the features.
    pub dtype: FeatureDtype,
    /// Whether every file carries f32 C-alpha positions `[frames][tokens][3]` after the features
    /// (each token's CA atom, or its heavy-atom centroid where it has no CA).
    pub ca_positions: bool,
    /// Total frames over all trajectories.
    pub total_frames: usize,
    /// One entry per dataset trajectory, in dataset order.
    pub trajectories: Vec<FeatureTrajectory>,
}

/// One trajectory of a feature store.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FeatureTrajectory {
    /// The feature file (relative to the store folder).
    pub file: String,
    /// Frames (those of the dataset trajectory).
    pub frames: usize,
    /// XXH3-64 (hex) of the file's payload: every byte after its 4 KiB header (the header is
    /// checked field by field against the manifest). Absent in stores written before checksums
    /// were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_xxh3: Option<String>,
}

/// The header fields of a feature file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    frames: u64,
    tokens: u64,
    channels: u64,
    dtype: FeatureDtype,
    has_ca: bool,
    complete: bool,
}

impl Header {
    /// Byte offsets of the C-alpha block and of the end of the file; None if the header's
    /// numbers overflow (a corrupt header).
    fn layout(&self) -> Option<(u64, u64)> {
        let data = self
            .frames
            .checked_mul(self.tokens)?
            .checked_mul(ROWS as u64 * self.channels)?
            .checked_mul(self.dtype.size() as u64)?;
        let ca_off = FEATURE_HEADER_BYTES.checked_add(data)?;
        let ca = if self.has_ca {
            self.frames.checked_mul(self.tokens)?.checked_mul(12)?
        } else {
            0
        };
        Some((ca_off, ca_off.checked_add(ca)?))
    }

    fn flags(&self) -> u32 {
        (if self.has_ca { FLAG_HAS_CA } else { 0 }) | if self.complete { FLAG_COMPLETE } else { 0 }
    }

    fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; FEATURE_HEADER_BYTES as usize];
        h[0..8].copy_from_slice(&FEATURE_MAGIC);
        h[8..12].copy_from_slice(&FEATURE_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.flags().to_le_bytes());
        h[16..24].copy_from_slice(&self.frames.to_le_bytes());
        h[24..32].copy_from_slice(&self.tokens.to_le_bytes());
        h[32..40].copy_from_slice(&self.channels.to_le_bytes());
        h[40..44].copy_from_slice(&self.dtype.code().to_le_bytes());
        h
    }

    fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        ensure!(
            bytes.len() >= FEATURE_HEADER_BYTES as usize,
            "{}: {} bytes, too short for a hiermd feature file header ({FEATURE_HEADER_BYTES})",
            path.display(),
            bytes.len()
        );
        ensure!(
            bytes[0..8] == FEATURE_MAGIC,
            "{}: not a hiermd feature file (bad magic)",
            path.display()
        );
        let u32at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let u64at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
        let version = u32at(8);
        ensure!(
            version == FEATURE_VERSION,
            "{}: feature file version {version}, this hiermd reads version {FEATURE_VERSION}",
            path.display()
        );
        let flags = u32at(12);
        let code = u32at(40);
        let dtype = FeatureDtype::from_code(code).with_context(|| {
            format!(
                "{}: unknown dtype code {code} in the header: corrupt",
                path.display()
            )
        })?;
        Ok(Self {
            frames: u64at(16),
            tokens: u64at(24),
            channels: u64at(32),
            dtype,
            has_ca: flags & FLAG_HAS_CA != 0,
            complete: flags & FLAG_COMPLETE != 0,
        })
    }
}

/// How a [`FeatureWriter`] stores the features.
#[derive(Clone, Debug)]
pub struct FeatureSettings {
    /// Channels per row (the atom stage's H).
    pub channels: usize,
    /// Element type on disk.
    pub dtype: FeatureDtype,
    /// Whether C-alpha positions are stored (then every [`FeatureWriter::append_frames`] call
    /// must pass them).
    pub ca_positions: bool,
    /// The atom-stage checkpoint the features come from, recorded with its XXH3 in the manifest.
    pub backbone: Option<PathBuf>,
    /// Replace an existing store at the target.
    pub force: bool,
    /// Print progress on stderr.
    pub progress: bool,
}

impl Default for FeatureSettings {
    fn default() -> Self {
        Self {
            channels: 64,
            dtype: FeatureDtype::F32,
            ca_positions: true,
            backbone: None,
            force: false,
            progress: false,
        }
    }
}

/// One trajectory being written.
struct Pending {
    file: String,
    expected: usize,
    written: usize,
    /// Open while the trajectory is being appended to; closed once it has all its frames, so
    /// that a writer going through trajectories in order holds one descriptor at a time.
    handle: Option<File>,
    /// XXH3 of the payload, set by `finish`.
    payload_xxh3: Option<String>,
}

/// XXH3-64 (hex) of a feature file's payload (the bytes after its header), streamed.
fn payload_xxh3(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    f.seek(SeekFrom::Start(FEATURE_HEADER_BYTES))
        .with_context(|| format!("{}: read error", path.display()))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("{}: read error", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(super::verify::xxh3_hex(h.digest()))
}

/// Writes a feature store for a dataset, streamed: frames arrive in any number of
/// [`append_frames`](Self::append_frames) calls per trajectory, trajectories in any order, and
/// nothing appears at the target until [`finish`](Self::finish) has checked that every
/// trajectory got all its frames, synced the files and renamed the folder into place. Dropping
/// an unfinished writer removes its temporary folder.
pub struct FeatureWriter {
    /// The output, checked at create and built in its temporary folder (issue 16).
    target: DirOutput,
    tokens: usize,
    channels: usize,
    dtype: FeatureDtype,
    has_ca: bool,
    dataset: String,
    dataset_manifest: SourceFile,
    backbone: Option<SourceFile>,
    trajs: Vec<Pending>,
    abort_after: Option<usize>,
    total_written: usize,
    progress: Progress,
    // Conversion buffers, reused across calls.
    rows32: Vec<f32>,
    rows16: Vec<f16>,
}

impl FeatureWriter {
    /// Starts a store at `out` for the trajectories of `ds` (R = its tokens), in a temporary
    /// folder beside `out`. Fails at once if `out` exists (unless `settings.force`), or the
    /// backbone checkpoint cannot be read.
    pub fn create(ds: &Dataset, out: &Path, settings: &FeatureSettings) -> Result<Self> {
        ensure!(
            settings.channels > 0,
            "feature store: channels must be positive"
        );
        let tokens = ds.manifest.tokens;
        ensure!(
            tokens > 0,
            "{}: the dataset has no tokens",
            ds.dir().display()
        );
        // Output safety (issue 16): never over an input; an existing store only with force.
        let mut inputs: Vec<(&str, &Path)> = vec![("dataset", ds.dir())];
        if let Some(b) = &settings.backbone {
            inputs.push(("backbone checkpoint", b));
        }
        let mut target = DirOutput::check(out, OutputKind::FeatureStore, settings.force, &inputs)?;
        let dataset_manifest = source_file(&ds.dir().join("manifest.toml"))?;
        let dataset = std::fs::canonicalize(ds.dir())
            .with_context(|| format!("{}: cannot open", ds.dir().display()))?
            .display()
            .to_string();
        let backbone = settings
            .backbone
            .as_deref()
            .map(|p| source_file(p).context("the backbone checkpoint"))
            .transpose()?;

        let tmp = target.begin()?.to_path_buf();

        let mut trajs = Vec::with_capacity(ds.manifest.trajectories.len());
        for (i, t) in ds.manifest.trajectories.iter().enumerate() {
            let file = format!("feat-{i:04}.hmdf");
            let header = Header {
                frames: t.frames as u64,
                tokens: tokens as u64,
                channels: settings.channels as u64,
                dtype: settings.dtype,
                has_ca: settings.ca_positions,
                complete: false,
            };
            let path = tmp.join(&file);
            // The header goes in first without its complete flag, so that a file cut short is
            // recognised even outside its temporary folder.
            let mut f = File::create(&path)
                .with_context(|| format!("{}: cannot create", path.display()))?;
            f.write_all(&header.encode())
                .with_context(|| format!("{}: write error", path.display()))?;
            trajs.push(Pending {
                file,
                expected: t.frames,
                written: 0,
                handle: None,
                payload_xxh3: None,
            });
        }
        let total: usize = trajs.iter().map(|t| t.expected).sum();
        let abort_after = std::env::var(FAULT_ABORT_ENV)
            .ok()
            .and_then(|v| v.parse().ok());
        Ok(Self {
            target,
            tokens,
            channels: settings.channels,
            dtype: settings.dtype,
            has_ca: settings.ca_positions,
            dataset,
            dataset_manifest,
            backbone,
            trajs,
            abort_after,
            total_written: 0,
            progress: Progress::new("features", Some(total), "frames", settings.progress),
            rows32: Vec::new(),
            rows16: Vec::new(),
        })
    }

    /// Tokens per frame (R).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Channels per row (H).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Frames appended so far to trajectory `traj`.
    pub fn frames_written(&self, traj: usize) -> usize {
        self.trajs.get(traj).map_or(0, |t| t.written)
    }

    /// Frames trajectory `traj` needs in all (the dataset's).
    pub fn frames_expected(&self, traj: usize) -> usize {
        self.trajs.get(traj).map_or(0, |t| t.expected)
    }

    /// Appends the next `n` frames of trajectory `traj`: scalars `s` `[n, R, H]`, vectors `v`
    /// `[n, R, 3, H]` and, when the store keeps them, C-alpha positions `ca` `[n, R, 3]` in
    /// Angstrom (each token's CA atom, or its heavy-atom centroid; stored as given). `n` may be
    /// anything from 1 to the frames the trajectory still lacks. Non-finite values, and values
    /// that overflow f16 in an f16 store, are errors naming the trajectory and frame.
    pub fn append_frames(
        &mut self,
        traj: usize,
        s: &[f32],
        v: &[f32],
        ca: Option<&[f32]>,
    ) -> Result<()> {
        let (r, h) = (self.tokens, self.channels);
        let ntraj = self.trajs.len();
        let t = self.trajs.get(traj).with_context(|| {
            format!("feature store: trajectory {traj}, the dataset has {ntraj}")
        })?;
        ensure!(
            !s.is_empty() && s.len().is_multiple_of(r * h),
            "feature store: trajectory {traj}: s has {} values, not a positive multiple of \
             tokens x channels = {r} x {h}",
            s.len()
        );
        let n = s.len() / (r * h);
        ensure!(
            v.len() == n * r * 3 * h,
            "feature store: trajectory {traj}: v has {} values, expected {n} frames x {r} tokens \
             x 3 x {h} channels = {}",
            v.len(),
            n * r * 3 * h
        );
        match (ca, self.has_ca) {
            (Some(c), true) => ensure!(
                c.len() == n * r * 3,
                "feature store: trajectory {traj}: ca has {} values, expected {n} frames x {r} \
                 tokens x 3 = {}",
                c.len(),
                n * r * 3
            ),
            (None, true) => bail!(
                "feature store: trajectory {traj}: this store keeps C-alpha positions; pass them"
            ),
            (Some(_), false) => bail!(
                "feature store: trajectory {traj}: C-alpha positions given, but the store was \
                 created without them"
            ),
            (None, false) => {}
        }
        ensure!(
            t.written + n <= t.expected,
            "feature store: trajectory {traj}: {} frames appended, {n} more would exceed its {} \
             frames",
            t.written,
            t.expected
        );
        if let Some(c) = ca {
            if let Some(k) = c.iter().position(|x| !x.is_finite()) {
                bail!(
                    "feature store: trajectory {traj}: frame {}: non-finite C-alpha position {}",
                    t.written + k / (r * 3),
                    c[k]
                );
            }
        }

        // Frames go out in chunks of about CHUNK_BYTES of converted rows, so the conversion
        // buffers stay small whatever the caller hands over.
        let frame_values = r * ROWS * h;
        let chunk = (CHUNK_BYTES / (frame_values * self.dtype.size())).clamp(1, n);
        let mut done = 0;
        while done < n {
            let mut m = chunk.min(n - done);
            if let Some(a) = self.abort_after {
                if self.total_written + m > a {
                    m = a.saturating_sub(self.total_written);
                }
            }
            if m > 0 {
                self.write_chunk(traj, done, m, s, v, ca)?;
                done += m;
                self.total_written += m;
            }
            if self.abort_after == Some(self.total_written) {
                std::process::abort();
            }
        }
        let t = &mut self.trajs[traj];
        if t.written == t.expected {
            t.handle = None;
        }
        let bytes = (self.total_written * frame_values * self.dtype.size()) as u64;
        self.progress.set(self.total_written, bytes);
        Ok(())
    }

    /// Converts frames `from..from + m` of the arguments into rows and writes them in place, as
    /// the trajectory's next `m` frames.
    fn write_chunk(
        &mut self,
        traj: usize,
        from: usize,
        m: usize,
        s: &[f32],
        v: &[f32],
        ca: Option<&[f32]>,
    ) -> Result<()> {
        let (r, h) = (self.tokens, self.channels);
        let rows = &mut self.rows32;
        rows.clear();
        rows.resize(m * r * ROWS * h, 0.0);
        // Interleave: each token's H scalars, then its three H-vectors of v's components.
        for (k, row) in rows.chunks_exact_mut(ROWS * h).enumerate() {
            let tok = from * r + k;
            row[..h].copy_from_slice(&s[tok * h..(tok + 1) * h]);
            row[h..].copy_from_slice(&v[tok * 3 * h..(tok + 1) * 3 * h]);
        }
        let t = &self.trajs[traj];
        if let Some(k) = rows.iter().position(|x| !x.is_finite()) {
            bail!(
                "feature store: trajectory {traj}: frame {}: non-finite feature value {}",
                t.written + k / (r * ROWS * h),
                rows[k]
            );
        }
        let bytes: &[u8] = match self.dtype {
            FeatureDtype::F32 => bytemuck::cast_slice(rows),
            FeatureDtype::F16 => {
                self.rows16.clear();
                self.rows16.resize(rows.len(), f16::ZERO);
                self.rows16.convert_from_f32_slice(rows);
                if let Some(k) = self.rows16.iter().position(|x| x.is_infinite()) {
                    bail!(
                        "feature store: trajectory {traj}: frame {}: feature value {} overflows \
                         f16 (largest {}); store f32",
                        t.written + k / (r * ROWS * h),
                        rows[k],
                        f16::MAX
                    );
                }
                bytemuck::cast_slice(&self.rows16)
            }
        };
        let frame_bytes = (r * ROWS * h * self.dtype.size()) as u64;
        // Earlier chunks of this call are counted already: frame `from` of the arguments is
        // the trajectory's frame `t.written`.
        let first = t.written as u64;
        let ca_off = FEATURE_HEADER_BYTES + t.expected as u64 * frame_bytes;
        let tmp = self.target.staging();
        let path = tmp.join(&t.file);
        let t = &mut self.trajs[traj];
        if t.handle.is_none() {
            t.handle = Some(
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("{}: cannot open", path.display()))?,
            );
        }
        let f = t.handle.as_mut().expect("opened above");
        let io = |e: std::io::Error| {
            anyhow::Error::new(e).context(format!("{}: write error", path.display()))
        };
        f.seek(SeekFrom::Start(FEATURE_HEADER_BYTES + first * frame_bytes))
            .map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        if let Some(c) = ca {
            f.seek(SeekFrom::Start(ca_off + first * (r as u64) * 12))
                .map_err(io)?;
            f.write_all(bytemuck::cast_slice(&c[from * r * 3..(from + m) * r * 3]))
                .map_err(io)?;
        }
        t.written += m;
        Ok(())
    }

    /// Checks that every trajectory has all its frames, completes and syncs the files, writes
    /// the manifest and renames the folder into place (replacing an old store if `force` was
    /// set); then opens the store. On any error nothing is left at the target.
    pub fn finish(mut self) -> Result<FeatureStore> {
        for (i, t) in self.trajs.iter().enumerate() {
            ensure!(
                t.written == t.expected,
                "feature store: trajectory {i} has {} of its {} frames",
                t.written,
                t.expected
            );
        }
        self.progress.finish();
        let tmp = self.target.staging().to_path_buf();
        for t in &mut self.trajs {
            t.handle = None;
            let path = tmp.join(&t.file);
            let header = Header {
                frames: t.expected as u64,
                tokens: self.tokens as u64,
                channels: self.channels as u64,
                dtype: self.dtype,
                has_ca: self.has_ca,
                complete: true,
            };
            let (_, len) = header.layout().context("feature store: sizes overflow")?;
            let mut f = OpenOptions::new()
                .write(true)
                .open(&path)
                .with_context(|| format!("{}: cannot open", path.display()))?;
            let io = |e: std::io::Error| {
                anyhow::Error::new(e).context(format!("{}: write error", path.display()))
            };
            // Every byte was written (frames are counted), so the length is right; set_len is
            // for the zero-frame case and costs nothing otherwise.
            f.set_len(len).map_err(io)?;
            // The data are durable before the header calls them complete.
            f.sync_data().map_err(io)?;
            // The payload's checksum for the manifest (issue 16): frames arrive in any order and
            // at two offsets each, so the finished file is read back (from the page cache).
            t.payload_xxh3 = Some(payload_xxh3(&path)?);
            f.seek(SeekFrom::Start(12)).map_err(io)?;
            f.write_all(&header.flags().to_le_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        let manifest = FeatureManifest {
            format: "hiermd-features".into(),
            version: FEATURE_VERSION,
            written_by: format!("hiermd {}", env!("CARGO_PKG_VERSION")),
            dataset: self.dataset.clone(),
            dataset_manifest: self.dataset_manifest.clone(),
            backbone: self.backbone.clone(),
            tokens: self.tokens,
            channels: self.channels,
            dtype: self.dtype,
            ca_positions: self.has_ca,
            total_frames: self.trajs.iter().map(|t| t.expected).sum(),
            trajectories: self
                .trajs
                .iter()
                .map(|t| FeatureTrajectory {
                    file: t.file.clone(),
                    frames: t.expected,
                    payload_xxh3: t.payload_xxh3.clone(),
                })
                .collect(),
        };
        let mpath = tmp.join("manifest.toml");
        let mut f =
            File::create(&mpath).with_context(|| format!("{}: cannot create", mpath.display()))?;
        f.write_all(toml::to_string_pretty(&manifest)?.as_bytes())
            .and_then(|_| f.sync_all())
            .with_context(|| format!("{}: write error", mpath.display()))?;
        drop(f);
        // Move into place: the store appears whole or not at all, and an old one (replaced
        // with force) stays until the new one is in.
        let out = self.target.out().to_path_buf();
        self.target.commit()?;
        FeatureStore::open(&out)
    }
}

/// One memory-mapped feature file.
struct FeatureFile {
    path: PathBuf,
    map: Mmap,
    header: Header,
    ca_off: usize,
}

/// The features of one frame, borrowed from the memory map.
#[derive(Clone, Copy, Debug)]
pub enum FeatureData<'a> {
    /// An f32 store's rows `[tokens][4][H]`.
    F32(&'a [f32]),
    /// An f16 store's rows `[tokens][4][H]`.
    F16(&'a [f16]),
}

/// A view of one frame of a [`FeatureStore`].
#[derive(Clone, Copy, Debug)]
pub struct FeatureFrame<'a> {
    data: FeatureData<'a>,
    ca: Option<&'a [f32]>,
    tokens: usize,
    channels: usize,
}

impl<'a> FeatureFrame<'a> {
    /// Tokens (R).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Channels (H).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The stored rows `[tokens][4][H]` (row 0 = s, rows 1-3 = v's x, y, z), in the store's type.
    pub fn data(&self) -> FeatureData<'a> {
        self.data
    }

    /// C-alpha positions `[tokens][3]` in Angstrom, if the store keeps them.
    pub fn ca(&self) -> Option<&'a [f32]> {
        self.ca
    }

    /// One value: `row` 0 is s, 1-3 are v's x, y, z. Panics when out of range.
    pub fn value(&self, token: usize, row: usize, channel: usize) -> f32 {
        assert!(
            token < self.tokens && row < ROWS && channel < self.channels,
            "feature ({token}, {row}, {channel}) out of range ({}, {ROWS}, {})",
            self.tokens,
            self.channels
        );
        let i = (token * ROWS + row) * self.channels + channel;
        match self.data {
            FeatureData::F32(d) => d[i],
            FeatureData::F16(d) => d[i].to_f32(),
        }
    }

    /// The rows `[tokens][4][H]` as f32 into `out`. Panics if `out` is not R x 4 x H long.
    pub fn to_f32(&self, out: &mut [f32]) {
        match self.data {
            FeatureData::F32(d) => out.copy_from_slice(d),
            FeatureData::F16(d) => d.convert_to_f32_slice(out),
        }
    }

    /// Splits the frame into the token model's inputs: `s_out` `[R, H]` and `v_out`
    /// `[R, 3, H]`, f16 widened to f32. Panics if the lengths are not R x H and R x 3 x H.
    pub fn split_into(&self, s_out: &mut [f32], v_out: &mut [f32]) {
        let h = self.channels;
        assert_eq!(s_out.len(), self.tokens * h, "s_out length");
        assert_eq!(v_out.len(), self.tokens * 3 * h, "v_out length");
        let rows = s_out.chunks_exact_mut(h).zip(v_out.chunks_exact_mut(3 * h));
        match self.data {
            FeatureData::F32(d) => {
                for ((s, v), src) in rows.zip(d.chunks_exact(ROWS * h)) {
                    s.copy_from_slice(&src[..h]);
                    v.copy_from_slice(&src[h..]);
                }
            }
            FeatureData::F16(d) => {
                for ((s, v), src) in rows.zip(d.chunks_exact(ROWS * h)) {
                    src[..h].convert_to_f32_slice(s);
                    src[h..].convert_to_f32_slice(v);
                }
            }
        }
    }
}

/// A feature store opened for reading: every file memory-mapped and checked.
pub struct FeatureStore {
    dir: PathBuf,
    /// The manifest.
    pub manifest: FeatureManifest,
    files: Vec<FeatureFile>,
}

impl FeatureStore {
    /// Opens a store folder and checks it is whole: every file's header agrees with the manifest
    /// and with the file's size, and is marked complete. Errors name the file.
    pub fn open(dir: &Path) -> Result<Self> {
        let mpath = dir.join("manifest.toml");
        let text = std::fs::read_to_string(&mpath).with_context(|| {
            format!(
                "{}: not a hiermd feature store (no readable manifest.toml)",
                dir.display()
            )
        })?;
        let manifest: FeatureManifest = toml::from_str(&text)
            .with_context(|| format!("{}: invalid feature manifest", mpath.display()))?;
        ensure!(
            manifest.format == "hiermd-features",
            "{}: format is {:?}, not hiermd-features",
            mpath.display(),
            manifest.format
        );
        ensure!(
            manifest.version == FEATURE_VERSION,
            "{}: feature store version {}, this hiermd reads version {FEATURE_VERSION}",
            mpath.display(),
            manifest.version
        );
        ensure!(
            manifest.tokens > 0 && manifest.channels > 0,
            "{}: {} tokens of {} channels",
            mpath.display(),
            manifest.tokens,
            manifest.channels
        );
        let mut files = Vec::with_capacity(manifest.trajectories.len());
        for t in &manifest.trajectories {
            // Paths in the manifest stay inside the store (issue 16).
            let path = super::dataset::confined(dir, &t.file, "file")?;
            let file =
                File::open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
            // SAFETY: feature files are written once by a FeatureWriter and never modified
            // afterwards; a concurrent writer would be a user error outside what we can guard.
            let map = unsafe { Mmap::map(&file) }
                .with_context(|| format!("{}: cannot map", path.display()))?;
            let header = Header::decode(&map, &path)?;
            ensure!(
                header.complete,
                "{}: incomplete feature file (the writer was interrupted)",
                path.display()
            );
            let (ca_off, len) = header
                .layout()
                .with_context(|| format!("{}: header sizes overflow: corrupt", path.display()))?;
            ensure!(
                map.len() as u64 == len,
                "{}: file is {} bytes but its header describes {len} ({} frames of {} tokens x \
                 4 x {} {}{}): truncated or corrupt",
                path.display(),
                map.len(),
                header.frames,
                header.tokens,
                header.channels,
                header.dtype,
                if header.has_ca {
                    " + C-alpha positions"
                } else {
                    ""
                }
            );
            ensure!(
                header.frames == t.frames as u64
                    && header.tokens == manifest.tokens as u64
                    && header.channels == manifest.channels as u64
                    && header.dtype == manifest.dtype
                    && header.has_ca == manifest.ca_positions,
                "{}: holds {} frames of {} tokens x {} channels ({}, C-alpha {}), the manifest \
                 says {} of {} x {} ({}, C-alpha {})",
                path.display(),
                header.frames,
                header.tokens,
                header.channels,
                header.dtype,
                header.has_ca,
                t.frames,
                manifest.tokens,
                manifest.channels,
                manifest.dtype,
                manifest.ca_positions
            );
            #[cfg(unix)]
            {
                // The token stage reads frames in shuffled order.
                let _ = map.advise(memmap2::Advice::Random);
            }
            files.push(FeatureFile {
                path,
                map,
                header,
                ca_off: ca_off as usize,
            });
        }
        let total: usize = manifest.trajectories.iter().map(|t| t.frames).sum();
        ensure!(
            total == manifest.total_frames,
            "{}: total_frames is {}, the trajectories hold {total}",
            mpath.display(),
            manifest.total_frames
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            files,
        })
    }

    /// Checks that the store was computed from `ds` as it is now: same dataset manifest (by
    /// XXH3), same tokens, same trajectories and frames.
    pub fn check_dataset(&self, ds: &Dataset) -> Result<()> {
        let m = &self.manifest;
        let now = source_file(&ds.dir().join("manifest.toml"))?;
        ensure!(
            now.xxh3 == m.dataset_manifest.xxh3,
            "{}: computed from a dataset whose manifest had XXH3 {}, but {} has {}: the dataset \
             changed since (recompute the features)",
            self.dir.display(),
            m.dataset_manifest.xxh3,
            now.path,
            now.xxh3
        );
        ensure!(
            ds.manifest.tokens == m.tokens,
            "{}: {} tokens per frame, the dataset {} has {}",
            self.dir.display(),
            m.tokens,
            ds.dir().display(),
            ds.manifest.tokens
        );
        ensure!(
            ds.trajectories.len() == self.files.len(),
            "{}: {} trajectories, the dataset {} has {}",
            self.dir.display(),
            self.files.len(),
            ds.dir().display(),
            ds.trajectories.len()
        );
        for (i, (t, f)) in ds.trajectories.iter().zip(&self.files).enumerate() {
            ensure!(
                t.frames() as u64 == f.header.frames,
                "{}: {} frames, but trajectory {i} of the dataset has {}",
                f.path.display(),
                f.header.frames,
                t.frames()
            );
        }
        Ok(())
    }

    /// The store folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The whole mapped file of trajectory `traj`, header included (for `hiermd verify`);
    /// panics if out of range.
    pub(crate) fn raw(&self, traj: usize) -> &[u8] {
        &self.files[traj].map
    }

    /// Byte offset of trajectory `traj`'s C-alpha block (the end of its features).
    pub(crate) fn ca_offset(&self, traj: usize) -> usize {
        self.files[traj].ca_off
    }

    /// The file of trajectory `traj`; panics if out of range.
    pub fn path(&self, traj: usize) -> &Path {
        &self.files[traj].path
    }

    /// Trajectories.
    pub fn trajectories(&self) -> usize {
        self.files.len()
    }

    /// Frames of trajectory `traj`; panics if out of range.
    pub fn frames(&self, traj: usize) -> usize {
        self.files[traj].header.frames as usize
    }

    /// Tokens per frame (R).
    pub fn tokens(&self) -> usize {
        self.manifest.tokens
    }

    /// Channels per row (H).
    pub fn channels(&self) -> usize {
        self.manifest.channels
    }

    /// Element type on disk.
    pub fn dtype(&self) -> FeatureDtype {
        self.manifest.dtype
    }

    /// Whether C-alpha positions are stored.
    pub fn has_ca(&self) -> bool {
        self.manifest.ca_positions
    }

    /// Frame `i` of trajectory `traj`; panics if either is out of range.
    pub fn frame(&self, traj: usize, i: usize) -> FeatureFrame<'_> {
        let f = &self.files[traj];
        let n = f.header.frames as usize;
        assert!(i < n, "frame {i} of trajectory {traj}, which has {n}");
        let (r, h) = (self.tokens(), self.channels());
        let vals = r * ROWS * h;
        let size = self.dtype().size();
        let start = FEATURE_HEADER_BYTES as usize + i * vals * size;
        let bytes = &f.map[start..start + vals * size];
        let data = match self.dtype() {
            FeatureDtype::F32 => FeatureData::F32(bytemuck::cast_slice(bytes)),
            FeatureDtype::F16 => FeatureData::F16(bytemuck::cast_slice(bytes)),
        };
        let ca = f.header.has_ca.then(|| {
            let off = f.ca_off + i * r * 12;
            bytemuck::cast_slice(&f.map[off..off + r * 12])
        });
        FeatureFrame {
            data,
            ca,
            tokens: r,
            channels: h,
        }
    }

    /// Fills the token model's inputs for a batch of frames, `(trajectory, frame)` each:
    /// `s_out` `[B, R, H]`, `v_out` `[B, R, 3, H]` and, if given, `ca_out` `[B, R, 3]` (f16
    /// widened to f32). The token stage's hot path: frames are gathered in parallel straight from
    /// the memory maps, with no allocation. Errors on wrong buffer lengths, an index out of
    /// range, or `ca_out` from a store without C-alpha positions.
    pub fn gather_batch(
        &self,
        frames: &[(usize, usize)],
        s_out: &mut [f32],
        v_out: &mut [f32],
        ca_out: Option<&mut [f32]>,
    ) -> Result<()> {
        let (b, r, h) = (frames.len(), self.tokens(), self.channels());
        ensure!(
            s_out.len() == b * r * h,
            "gather_batch: s_out has {} values, expected {b} frames x {r} tokens x {h} channels",
            s_out.len()
        );
        ensure!(
            v_out.len() == b * r * 3 * h,
            "gather_batch: v_out has {} values, expected {b} frames x {r} tokens x 3 x {h} \
             channels",
            v_out.len()
        );
        for (k, &(t, i)) in frames.iter().enumerate() {
            ensure!(
                t < self.files.len(),
                "gather_batch: entry {k} asks for trajectory {t}, the store has {}",
                self.files.len()
            );
            let n = self.frames(t);
            ensure!(
                i < n,
                "gather_batch: entry {k} asks for frame {i} of trajectory {t} ({}), which has {n}",
                self.files[t].path.display()
            );
        }
        if let Some(ca) = &ca_out {
            ensure!(
                self.has_ca(),
                "gather_batch: {} keeps no C-alpha positions",
                self.dir.display()
            );
            ensure!(
                ca.len() == b * r * 3,
                "gather_batch: ca_out has {} values, expected {b} frames x {r} tokens x 3",
                ca.len()
            );
        }
        if b == 0 {
            return Ok(());
        }
        s_out
            .par_chunks_mut(r * h)
            .zip(v_out.par_chunks_mut(r * 3 * h))
            .zip(frames.par_iter())
            .for_each(|((s, v), &(t, i))| self.frame(t, i).split_into(s, v));
        if let Some(ca) = ca_out {
            ca.par_chunks_mut(r * 3)
                .zip(frames.par_iter())
                .for_each(|(c, &(t, i))| {
                    c.copy_from_slice(self.frame(t, i).ca.expect("store has C-alpha positions"))
                });
        }
        Ok(())
    }

    /// Writes trajectory `traj` as one NumPy array `[frames, tokens, 4, H]` (`'<f4'` or `'<f2'`,
    /// the store's type) to `path`, streamed frame by frame and atomically (a temporary file
    /// beside `path`, synced and renamed). Returns the bytes written.
    pub fn write_npy(&self, traj: usize, path: &Path) -> Result<u64> {
        let f = self.files.get(traj).with_context(|| {
            format!(
                "trajectory {traj}: the feature store has {} (0-based)",
                self.files.len()
            )
        })?;
        let shape = [
            f.header.frames as usize,
            self.tokens(),
            ROWS,
            self.channels(),
        ];
        // npy::header pads the dictionary to 64-byte-aligned data; '<f2' has the length of
        // '<f4', so swapping the type string keeps that padding (npy.rs has no f16 type).
        let mut header = crate::npy::header(crate::npy::Dtype::F32, &shape);
        if self.dtype() == FeatureDtype::F16 {
            let at = header
                .windows(5)
                .position(|w| w == b"'<f4'")
                .expect("the npy header names its dtype");
            header[at..at + 5].copy_from_slice(b"'<f2'");
        }
        // Never over the store's own files (issue 16); written atomically.
        crate::output::refuse_overlap(path, &[("feature store", &self.dir)])?;
        let mut w = AtomicFile::create(path)?;
        let io = |e: std::io::Error| {
            anyhow::Error::new(e).context(format!("{}: write error", path.display()))
        };
        w.write_all(&header).map_err(io)?;
        let data_end = f.ca_off;
        // The rows of all frames are contiguous in the file, already little-endian.
        let frame_bytes = self.tokens() * ROWS * self.channels() * self.dtype().size();
        for chunk in f.map[FEATURE_HEADER_BYTES as usize..data_end].chunks(frame_bytes.max(1 << 20))
        {
            w.write_all(chunk).map_err(io)?;
        }
        w.commit()?;
        Ok((header.len() + data_end - FEATURE_HEADER_BYTES as usize) as u64)
    }
}

/// Opens the feature store at `dir` and writes trajectory `traj` as one NumPy array
/// `[frames, tokens, 4, H]` to `path` (see [`FeatureStore::write_npy`]).
pub fn write_npy(dir: &Path, traj: usize, path: &Path) -> Result<u64> {
    FeatureStore::open(dir)?.write_npy(traj, path)
}
