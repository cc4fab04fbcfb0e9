//! Per-epoch checkpoints of a run: parameters, optimiser state and the loop's own state (epoch,
//! best score, labels, ...), written so that a run killed at any instant resumes from the last
//! complete one.
//!
//! Layout: `RUN/checkpoints/epoch-000007/{params.safetensors, optim.safetensors, state.json}`
//! and `RUN/checkpoints/latest` naming the newest. A checkpoint is written into a hidden
//! temporary folder, every file fsynced, then renamed into place, and only then is `latest`
//! replaced (itself atomically); a crash leaves at worst a stale temporary folder
//! (`.epoch-NNNNNN.ckpt-PID`), which the next command writing in the run removes
//! ([`crate::output::clean_stale`]).
//!
//! Each checkpoint folder also holds a `manifest.toml` with the size and XXH3-64 of each of its
//! files, written before the folder is renamed into place. Resuming checks the checkpoint it
//! loads against it and falls back to the newest intact checkpoint (also when `latest` is
//! missing), saying so on stderr; checkpoints written before manifests existed are used after a
//! structural check.

use crate::optim::{write_atomic, Optimizer};
use crate::tape::ParamStore;
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The checkpoints of one run folder.
#[derive(Clone, Debug)]
pub struct Checkpoints {
    root: PathBuf,
    keep: usize,
}

const PARAMS: &str = "params.safetensors";
const OPTIM: &str = "optim.safetensors";
const STATE: &str = "state.json";
const LATEST: &str = "latest";
const MANIFEST: &str = "manifest.toml";

/// A checkpoint's `manifest.toml`: what it holds, with checksums.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct CheckpointManifest {
    /// Always "hiermd-checkpoint".
    format: String,
    /// The epoch the checkpoint was taken after.
    epoch: u64,
    /// Every file of the checkpoint.
    files: Vec<FileSum>,
}

/// One file of a checkpoint with its size and checksum.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct FileSum {
    /// File name inside the checkpoint folder.
    name: String,
    /// Size in bytes.
    bytes: u64,
    /// XXH3-64 of the contents, hex.
    xxh3: String,
}

/// What [`Checkpoints::resume_point`] found: the checkpoint to resume from (folder, epoch), if
/// the run has one, and the warnings to give (checkpoints skipped, `latest` missing).
pub type ResumePoint = (Option<(PathBuf, u64)>, Vec<String>);

/// What [`Checkpoints::check`] found in an undamaged checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointStatus {
    /// Every file listed in its manifest (this many) has its recorded size and XXH3.
    Checksummed(usize),
    /// A checkpoint written before manifests existed: its files parse, nothing more is known.
    NoChecksums,
}

/// Size and XXH3 of `dir/name`, streamed (optimiser states can be large).
fn file_sum(dir: &Path, name: &str) -> Result<FileSum> {
    let sum = crate::store::source_file(&dir.join(name))?;
    Ok(FileSum {
        name: name.to_string(),
        bytes: sum.bytes,
        xxh3: sum.xxh3,
    })
}

use crate::output::{sync_dir, TempDir};

impl Checkpoints {
    /// Checkpoints under `run_dir/checkpoints`, keeping the newest `keep` (at least 1).
    pub fn new(run_dir: &Path, keep: usize) -> Self {
        Self {
            root: run_dir.join("checkpoints"),
            keep: keep.max(1),
        }
    }

    /// The folder holding them.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn name(epoch: u64) -> String {
        format!("epoch-{epoch:06}")
    }

    /// Writes the checkpoint after `epoch` (1-based: the number of finished epochs) and makes it
    /// the latest. Returns its folder.
    pub fn save(
        &self,
        epoch: u64,
        ps: &ParamStore,
        opt: &Optimizer,
        state: &serde_json::Value,
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        let name = Self::name(epoch);
        // A temporary folder named with this process's PID (issue 16): removed if saving fails,
        // and by the next command writing here if the process is killed.
        let staging = TempDir::create(
            self.root
                .join(format!(".{name}.ckpt-{}", std::process::id())),
        )?;
        let tmp = staging.path().to_path_buf();
        let meta = HashMap::from([("epoch".to_string(), epoch.to_string())]);
        ps.save(tmp.join(PARAMS), &meta)?;
        opt.save(tmp.join(OPTIM))?;
        let text = serde_json::to_vec_pretty(state).context("serialising the run state")?;
        {
            let path = tmp.join(STATE);
            let mut f =
                File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            f.write_all(&text)
                .and_then(|_| f.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        // The manifest, with every file's checksum, is part of the folder before it is renamed
        // into place: a checkpoint is complete and checkable, or absent.
        {
            let manifest = CheckpointManifest {
                format: "hiermd-checkpoint".into(),
                epoch,
                files: [PARAMS, OPTIM, STATE]
                    .iter()
                    .map(|n| file_sum(&tmp, n))
                    .collect::<Result<_>>()?,
            };
            let path = tmp.join(MANIFEST);
            let text = toml::to_string_pretty(&manifest).context("serialising the manifest")?;
            let mut f =
                File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            f.write_all(text.as_bytes())
                .and_then(|_| f.sync_all())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        sync_dir(&tmp)?;
        let dir = self.root.join(&name);
        if dir.exists() {
            // The same epoch saved again (a resumed run re-doing it): the old one goes first.
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("replacing {}", dir.display()))?;
        }
        staging
            .persist(&dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        sync_dir(&self.root)?;
        write_atomic(&self.root.join(LATEST), name.as_bytes())?;
        self.prune()?;
        Ok(dir)
    }

    /// Epochs of the complete checkpoints present, ascending.
    pub fn epochs(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.root.display())),
        };
        for entry in rd {
            let entry = entry?;
            let name = entry.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_prefix("epoch-"))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            out.push(n);
        }
        out.sort_unstable();
        Ok(out)
    }

    fn prune(&self) -> Result<()> {
        let epochs = self.epochs()?;
        if epochs.len() > self.keep {
            for &e in &epochs[..epochs.len() - self.keep] {
                let dir = self.root.join(Self::name(e));
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing the old {}", dir.display()))?;
            }
        }
        Ok(())
    }

    /// The checkpoint to resume from and its epoch, if the run has any: the one `latest` names
    /// when it is intact (see [`Checkpoints::check`]), else the newest intact one, with a
    /// warning on stderr saying which was skipped and why (also when `latest` is missing). An
    /// error when checkpoints exist but none is intact.
    pub fn latest(&self) -> Result<Option<(PathBuf, u64)>> {
        let (found, notes) = self.resume_point()?;
        for n in notes {
            eprintln!("warning: {n}");
        }
        Ok(found)
    }

    /// [`Checkpoints::latest`] without printing: the checkpoint and the warnings to give.
    pub fn resume_point(&self) -> Result<ResumePoint> {
        let mut notes = Vec::new();
        let epochs = self.epochs()?;
        let named = match self.named_latest() {
            Ok(n) => n,
            Err(e) => {
                notes.push(format!("{e:#}"));
                None
            }
        };
        let named_epoch = named.as_deref().and_then(|n| {
            n.strip_prefix("epoch-")
                .and_then(|s| s.parse::<u64>().ok())
                .filter(|e| Self::name(*e) == n)
        });
        if named.is_some() && named_epoch.is_none() {
            notes.push(format!(
                "{} holds {:?}, not a checkpoint name",
                self.root.join(LATEST).display(),
                named.as_deref().unwrap_or_default()
            ));
        }
        if epochs.is_empty() {
            if let Some(n) = &named {
                notes.push(format!(
                    "{} names {n}, but {} holds no checkpoint",
                    self.root.join(LATEST).display(),
                    self.root.display()
                ));
            }
            return Ok((None, notes));
        }
        // `latest` first (the documented resume point), then the others newest first.
        let mut order: Vec<u64> = Vec::with_capacity(epochs.len());
        match named_epoch {
            Some(e) if epochs.contains(&e) => order.push(e),
            Some(e) => notes.push(format!(
                "{} names {}, which is missing",
                self.root.join(LATEST).display(),
                Self::name(e)
            )),
            None if named.is_none() => {
                notes.push(format!("{} is missing", self.root.join(LATEST).display()))
            }
            None => {}
        }
        let first = order.first().copied();
        order.extend(epochs.iter().rev().filter(|e| Some(**e) != first));
        let mut damaged = Vec::new();
        for e in order {
            let dir = self.root.join(Self::name(e));
            match Self::check(&dir) {
                Ok(status) => {
                    if !damaged.is_empty() || named_epoch != Some(e) {
                        notes.push(format!(
                            "resuming from {}, the newest intact checkpoint{}",
                            dir.display(),
                            if status == CheckpointStatus::NoChecksums {
                                " (no checksum recorded: its files parse)"
                            } else {
                                ""
                            }
                        ));
                    }
                    return Ok((Some((dir, e)), notes));
                }
                Err(err) => {
                    notes.push(format!("{} is damaged and skipped: {err:#}", dir.display()));
                    damaged.push(format!("{}: {err:#}", Self::name(e)));
                }
            }
        }
        bail!(
            "no intact checkpoint in {} to resume from ({}); start a new run with --force",
            self.root.display(),
            damaged.join("; ")
        )
    }

    /// The checkpoint name `latest` holds, if the file exists.
    pub fn named_latest(&self) -> Result<Option<String>> {
        let path = self.root.join(LATEST);
        match std::fs::read_to_string(&path) {
            Ok(name) => Ok(Some(name.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Checks a checkpoint folder: every file its manifest lists has its recorded size and XXH3
    /// (and the parameters, optimiser state and run state are among them); a checkpoint without
    /// a manifest (written before manifests existed) passes when its files parse. The error
    /// names the file and what is wrong.
    pub fn check(dir: &Path) -> Result<CheckpointStatus> {
        let mpath = dir.join(MANIFEST);
        let status = match std::fs::read_to_string(&mpath) {
            Ok(text) => {
                let m: CheckpointManifest = toml::from_str(&text)
                    .with_context(|| format!("{}: unreadable manifest", mpath.display()))?;
                ensure!(
                    m.format == "hiermd-checkpoint",
                    "{}: format {:?}, not hiermd-checkpoint",
                    mpath.display(),
                    m.format
                );
                for need in [PARAMS, OPTIM, STATE] {
                    ensure!(
                        m.files.iter().any(|f| f.name == need),
                        "{}: does not list {need}",
                        mpath.display()
                    );
                }
                for f in &m.files {
                    // Names are plain file names: nothing outside the folder is read.
                    ensure!(
                        !f.name.is_empty()
                            && Path::new(&f.name).file_name() == Some(f.name.as_ref()),
                        "{}: file {:?} is not a plain file name: refused",
                        mpath.display(),
                        f.name
                    );
                    let now = file_sum(dir, &f.name)?;
                    ensure!(
                        now.bytes == f.bytes,
                        "{}: {} bytes, the manifest records {}: truncated or corrupt",
                        dir.join(&f.name).display(),
                        now.bytes,
                        f.bytes
                    );
                    ensure!(
                        now.xxh3 == f.xxh3,
                        "{}: checksum mismatch: the manifest records XXH3 {}, the file gives {}: \
                         corrupt",
                        dir.join(&f.name).display(),
                        f.xxh3,
                        now.xxh3
                    );
                }
                CheckpointStatus::Checksummed(m.files.len())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                for name in [PARAMS, OPTIM] {
                    let path = dir.join(name);
                    let bytes = std::fs::read(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
                        anyhow::anyhow!("{}: not a readable safetensors file ({e})", path.display())
                    })?;
                }
                CheckpointStatus::NoChecksums
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", mpath.display())),
        };
        let state = Self::state(dir)?;
        let epoch = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("epoch-"))
            .and_then(|s| s.parse::<u64>().ok());
        if let (Some(e), Some(s)) = (epoch, state.get("epoch").and_then(|v| v.as_u64())) {
            ensure!(
                e == s,
                "{}: says epoch {s}, the folder is epoch {e}",
                dir.join(STATE).display()
            );
        }
        Ok(status)
    }

    /// Restores parameters and optimiser state from a checkpoint folder and returns the run
    /// state saved with them.
    /// The checkpoint is checked first ([`Checkpoints::check`]): nothing is loaded from a
    /// damaged one.
    pub fn load(dir: &Path, ps: &mut ParamStore, opt: &mut Optimizer) -> Result<serde_json::Value> {
        Self::check(dir)?;
        ps.load(dir.join(PARAMS))?;
        opt.load(dir.join(OPTIM))?;
        Self::state(dir)
    }

    /// Only the run state of a checkpoint folder.
    pub fn state(dir: &Path) -> Result<serde_json::Value> {
        let path = dir.join(STATE);
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("{}: not valid JSON", path.display()))
    }

    /// The parameters file of a checkpoint folder.
    pub fn params_path(dir: &Path) -> PathBuf {
        dir.join(PARAMS)
    }
}
