//! Everything hiermd writes goes through this module, so that its promises about the user's data
//! hold in one place:
//!
//! - **Files are written atomically** ([`write_atomic`], [`AtomicFile`]): a temporary file beside
//!   the target, fsynced, renamed over it, the folder fsynced. A reader sees the old file or the
//!   complete new one; a memory-mapped file being read is never truncated under its reader.
//! - **Folders are built under a temporary name and swapped in when complete** ([`DirOutput`]).
//!   An existing folder is replaced only with `--force`, only when it is a hiermd folder of the
//!   kind the command writes ([`recognise`]) holding nothing hiermd did not write, and a failed
//!   replacement keeps the old folder: the old one is moved aside, the new one renamed in, and
//!   only then is the old one removed.
//! - **Outputs never overlap inputs** ([`refuse_overlap`]): an output that is, contains or lies
//!   inside one of the command's inputs is refused, with paths compared after resolving symbolic
//!   links.
//! - **No leftovers** ([`clean_stale`]): every temporary carries the PID of the process that made
//!   it (`.NAME.TAG-PID`, see [`TEMP_TAGS`]), so the next command writing in the same folder
//!   removes the temporaries of processes that are gone, and puts back an old folder whose
//!   replacement was killed between its two renames.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The tags of hiermd's temporary names: `.{target}.{tag}-{pid}` for a folder being built (the
/// tag of its [`OutputKind`], or `ckpt` for a checkpoint), `.{target}.{tag}-{pid}.old` for an old
/// folder moved aside during its replacement, `.{target}.hiermd-{pid}-{n}` for a file being
/// written. Only names of this shape are ever removed as stale.
pub const TEMP_TAGS: &[&str] = &[
    "import", "features", "npy", "train", "pretrain", "ckpt", "hiermd",
];

/// The tag of temporary files ([`AtomicFile`]).
const FILE_TAG: &str = "hiermd";

/// Bytes of a manifest or configuration read to recognise a folder: far more than any real one,
/// so that a huge or special file named like one cannot make recognition read without bound.
const MAX_MARKER_BYTES: u64 = 64 << 20;

// ------------------------------------------------------------------------------ files, syncs --

/// Makes the entries of `dir` durable (new files, renames). Filesystems that cannot sync a folder
/// (`EINVAL`, `ENOTSUP`) are accepted: there the rename is as durable as the filesystem allows.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let f =
            File::open(dir).with_context(|| format!("{}: cannot open to sync", dir.display()))?;
        match f.sync_all() {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP)) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("syncing folder {}", dir.display())),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// The folder `path` is in (`.` for a bare name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The last component of `path` as text, for temporary names beside it.
fn file_name_of(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .with_context(|| format!("{}: the output needs a file or folder name", path.display()))
}

/// A file written atomically: the bytes go to a temporary file beside `path`
/// (`.NAME.hiermd-PID-N`), and [`commit`](Self::commit) syncs it and renames it over `path`.
/// Dropped without a commit, it removes the temporary file and leaves `path` as it was.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    w: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Starts writing `path` (its folder must exist).
    pub fn create(path: &Path) -> Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = file_name_of(path)?;
        let tmp = parent_of(path).join(format!(
            ".{name}.{FILE_TAG}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        // create_new: a name taken by anything else is an error, never truncated.
        let f = File::options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            tmp,
            w: Some(BufWriter::with_capacity(1 << 20, f)),
        })
    }

    /// Syncs the file, renames it over the target and syncs the folder.
    pub fn commit(mut self) -> Result<()> {
        let w = self.w.take().expect("an AtomicFile is committed once");
        let f = w
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", self.tmp.display()))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.path).with_context(|| {
            format!("renaming {} to {}", self.tmp.display(), self.path.display())
        })?;
        // Renamed: nothing left to remove on drop.
        self.tmp = PathBuf::new();
        sync_dir(&parent_of(&self.path))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.w.as_mut().expect("not committed").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.w.as_mut().expect("not committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            self.w = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` atomically (see [`AtomicFile`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", f.tmp.display()))?;
    f.commit()
}

// --------------------------------------------------------------------------- temporary names --

/// A parsed temporary name (see [`TEMP_TAGS`]).
#[derive(Clone, Debug, PartialEq, Eq)]
struct TempName {
    /// The name of what it stands in for, in the same folder.
    target: String,
    /// The process that made it.
    pid: u32,
    /// An old folder moved aside by a replacement (`.old`).
    aside: bool,
}

/// Reads a hiermd temporary name; None for any other name.
fn parse_temp(name: &str) -> Option<TempName> {
    let s = name.strip_prefix('.')?;
    let (s, aside) = match s.strip_suffix(".old") {
        Some(s) => (s, true),
        None => (s, false),
    };
    // The rightmost `.TAG-` separates the target from the numbers.
    let (at, tag) = TEMP_TAGS
        .iter()
        .filter_map(|t| s.rfind(&format!(".{t}-")).map(|i| (i, *t)))
        .max_by_key(|(i, _)| *i)?;
    let target = &s[..at];
    let numbers = &s[at + tag.len() + 2..];
    let mut parts = numbers.split('-');
    let pid = parts.next()?;
    let counter = parts.next();
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    let shape_ok = match (tag == FILE_TAG, counter, aside) {
        (true, Some(n), false) => digits(n) && parts.next().is_none(),
        (false, None, _) => true,
        _ => false,
    };
    if target.is_empty() || !digits(pid) || !shape_ok {
        return None;
    }
    Some(TempName {
        target: target.to_string(),
        pid: pid.parse().ok()?,
        aside,
    })
}

/// Whether process `pid` may still be using its temporaries: this process, or one that exists.
/// Where that cannot be known (not unix), every process counts as alive and nothing is removed.
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        // Ours: another thread of this process may be writing it.
        return true;
    }
    #[cfg(unix)]
    {
        let Ok(p) = libc::pid_t::try_from(pid) else {
            return true;
        };
        if p <= 0 {
            return true;
        }
        // SAFETY: signal 0 sends nothing; it only asks whether the process exists.
        let r = unsafe { libc::kill(p, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// Removes a file, link or folder (a link itself, never what it points to).
fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// What [`clean_stale`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Temporaries of processes that are gone, removed.
    pub removed: Vec<PathBuf>,
    /// Old folders whose replacement was killed after moving them aside, put back in place.
    pub restored: Vec<PathBuf>,
}

/// Removes the temporaries (see [`TEMP_TAGS`]) that processes which no longer exist left in
/// `dir`, and puts back an old folder moved aside by a replacement that was killed before the new
/// folder was renamed in (its target is missing). Best effort: what cannot be read or removed is
/// left alone. Every command that writes calls it for the folders it writes in.
pub fn clean_stale(dir: &Path) -> Cleanup {
    let mut done = Cleanup::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return done;
    };
    let mut stale: Vec<(PathBuf, TempName)> = entries
        .flatten()
        .filter_map(|e| {
            let t = parse_temp(&e.file_name().to_string_lossy())?;
            (!process_alive(t.pid)).then(|| (e.path(), t))
        })
        .collect();
    // Asides first: a target is put back before anything else is decided about it.
    stale.sort_by_key(|(_, t)| !t.aside);
    for (path, t) in stale {
        let target = dir.join(&t.target);
        if t.aside && std::fs::symlink_metadata(&target).is_err() {
            if std::fs::rename(&path, &target).is_ok() {
                let _ = sync_dir(dir);
                // A library that rarely prints: this is the one thing a user must hear of.
                eprintln!(
                    "note: {} was being replaced by a process that was killed; the old copy is \
                     back in place",
                    target.display()
                );
                done.restored.push(target);
            }
        } else if remove_any(&path).is_ok() {
            done.removed.push(path);
        }
    }
    done
}

/// A temporary folder, removed when dropped unless it was renamed into place.
pub struct TempDir {
    path: Option<PathBuf>,
}

impl TempDir {
    /// Creates the folder `path` (a temporary name of this process, see [`TEMP_TAGS`]); a
    /// leftover of the same name is an earlier process's with this PID, and is removed first.
    pub fn create(path: PathBuf) -> Result<Self> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if let Some(t) = name.as_deref().and_then(parse_temp) {
            if t.pid == std::process::id() {
                remove_any(&path)
                    .with_context(|| format!("removing the leftover {}", path.display()))?;
            }
        }
        std::fs::create_dir(&path).with_context(|| format!("{}: cannot create", path.display()))?;
        Ok(Self { path: Some(path) })
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("a live temporary folder")
    }

    /// Renames the folder to `to`, where it stays (on error it is still removed when dropped).
    pub fn persist(mut self, to: &Path) -> std::io::Result<()> {
        std::fs::rename(self.path(), to)?;
        self.path = None;
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

// ----------------------------------------------------------------------------- recognition --

/// The folders hiermd writes, as [`recognise`] tells them apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// `hiermd import`: `manifest.toml` with `format = "hiermd-dataset"`.
    Dataset,
    /// `hiermd featurize`: `manifest.toml` with `format = "hiermd-features"`.
    FeatureStore,
    /// `hiermd featurize --format npy`: only `feat-NNNN.npy` and `ca-NNNN.npy` files.
    NpyFeatures,
    /// `hiermd train`: a `config.toml` that reads as a run configuration naming its dataset.
    Run,
    /// `hiermd pretrain`: a `model.toml` that reads as an atom-model configuration.
    PretrainRun,
    /// `hiermd demo`: the marker [`DEMO_MARKER`] (written first), and nothing but the entries
    /// the demo writes ([`DEMO_ENTRIES`]).
    Demo,
    /// `hiermd analyze`: an `analysis.json` with a `headline` and its `figures`; the folder holds
    /// those pictures (SVG and PNG), `index.html`, `states.npy` and `attention/`.
    Analysis,
}

/// The file `hiermd demo` writes first in its folder, so that a demo cut short is still known.
pub const DEMO_MARKER: &str = "hiermd-demo.toml";

/// What `hiermd demo` writes in its folder; a folder holding anything else is not a demo's.
pub const DEMO_ENTRIES: &[&str] = &[
    DEMO_MARKER,
    "data",
    "features",
    "pretrain",
    "atom.toml",
    "vamp",
    "spib",
    "demo.json",
];

impl OutputKind {
    /// What it is called in messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Dataset => "dataset",
            Self::FeatureStore => "feature store",
            Self::NpyFeatures => "folder of featurize .npy files",
            Self::Run => "training run",
            Self::PretrainRun => "pretraining run",
            Self::Demo => "demo folder",
            Self::Analysis => "analysis folder",
        }
    }

    /// The tag of its temporary folders.
    fn tag(self) -> &'static str {
        match self {
            Self::Dataset => "import",
            Self::FeatureStore => "features",
            Self::NpyFeatures => "npy",
            Self::Run => "train",
            Self::PretrainRun => "pretrain",
            Self::Demo => "demo",
            Self::Analysis => "analysis",
        }
    }
}

/// Reads a small text file whole; None if it is missing, not a regular file, too large or not
/// UTF-8.
fn read_marker(path: &Path) -> Option<String> {
    let m = std::fs::metadata(path).ok()?;
    if !m.is_file() || m.len() > MAX_MARKER_BYTES {
        return None;
    }
    let mut text = String::new();
    File::open(path)
        .ok()?
        .take(MAX_MARKER_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// The names in `dir`, sorted (empty if it cannot be read).
fn entry_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// `PREFIX-NNNN.EXT` with at least one digit.
fn numbered(name: &str, prefix: &str, ext: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|s| s.strip_prefix('-'))
        .and_then(|s| s.strip_suffix(ext))
        .and_then(|s| s.strip_suffix('.'))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Which kind of hiermd folder `dir` is, if any. Recognition reads the folder's marker file (its
/// manifest or configuration) and nothing else; see [`OutputKind`] for the markers.
pub fn recognise(dir: &Path) -> Option<OutputKind> {
    if !std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        return None;
    }
    if let Some(text) = read_marker(&dir.join("manifest.toml")) {
        let table: toml::Table = toml::from_str(&text).ok()?;
        return match table.get("format").and_then(|f| f.as_str()) {
            Some("hiermd-dataset") => Some(OutputKind::Dataset),
            Some("hiermd-features") => Some(OutputKind::FeatureStore),
            _ => None,
        };
    }
    if let Some(text) = read_marker(&dir.join(crate::workflow::run::files::CONFIG)) {
        // The shape only: a run whose data moved since is still a run.
        let cfg: crate::workflow::config::RunConfig = toml::from_str(&text).ok()?;
        return (!cfg.data.dataset.as_os_str().is_empty()).then_some(OutputKind::Run);
    }
    if let Some(text) = read_marker(&dir.join("model.toml")) {
        return crate::model::atom::AtomModelConfig::from_toml(&text)
            .ok()
            .map(|_| OutputKind::PretrainRun);
    }
    let names: Vec<String> = entry_names(dir)
        .into_iter()
        .filter(|n| parse_temp(n).is_none())
        .collect();
    let npy = |n: &String| numbered(n, "feat", "npy") || numbered(n, "ca", "npy");
    if names.iter().any(|n| numbered(n, "feat", "npy")) && names.iter().all(npy) {
        return Some(OutputKind::NpyFeatures);
    }
    if analysis_figures(dir).is_some() {
        return Some(OutputKind::Analysis);
    }
    // A demo folder, also one whose run was cut short: its marker (written first).
    read_marker(&dir.join(DEMO_MARKER)).map(|_| OutputKind::Demo)
}

/// The top-level names of the pictures an analysis folder's `analysis.json` lists (SVGs, each
/// with its PNG twin), or None if `dir` has no `analysis.json` of `hiermd analyze`.
fn analysis_figures(dir: &Path) -> Option<Vec<String>> {
    let text = read_marker(&dir.join("analysis.json"))?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("headline")?.as_str()?;
    let figures = json.get("figures")?.as_array()?;
    let mut names = Vec::new();
    for f in figures {
        let name = Path::new(f.as_str()?)
            .file_name()?
            .to_string_lossy()
            .into_owned();
        if let Some(stem) = name.strip_suffix(".svg") {
            names.push(format!("{stem}.png"));
        }
        names.push(name);
    }
    Some(names)
}

/// The top-level names a manifest's `file` entries (and `atom_table`) point at.
fn manifest_files(dir: &Path) -> Vec<String> {
    let Some(table) = read_marker(&dir.join("manifest.toml"))
        .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
    else {
        return Vec::new();
    };
    let mut files: Vec<&str> = Vec::new();
    if let Some(t) = table.get("atom_table").and_then(|v| v.as_str()) {
        files.push(t);
    }
    if let Some(ts) = table.get("trajectories").and_then(|v| v.as_array()) {
        files.extend(ts.iter().filter_map(|t| t.get("file")?.as_str()));
    }
    files
        .into_iter()
        .filter_map(|f| match Path::new(f).components().next() {
            Some(Component::Normal(n)) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect()
}

/// The entries of a `kind` folder at `dir` that hiermd did not write there: what `--force` would
/// delete that is not hiermd's. Its own temporaries count as hiermd's.
pub fn foreign_entries(dir: &Path, kind: OutputKind) -> Vec<String> {
    use crate::workflow::run::files;
    let listed = match kind {
        OutputKind::Dataset | OutputKind::FeatureStore => manifest_files(dir),
        _ => Vec::new(),
    };
    let figures = match kind {
        OutputKind::Analysis => analysis_figures(dir).unwrap_or_default(),
        _ => Vec::new(),
    };
    let known = |n: &str| -> bool {
        match kind {
            OutputKind::Dataset | OutputKind::FeatureStore => {
                n == "manifest.toml" || listed.iter().any(|l| l == n)
            }
            OutputKind::NpyFeatures => numbered(n, "feat", "npy") || numbered(n, "ca", "npy"),
            OutputKind::Run => [
                files::CONFIG,
                files::MODEL,
                files::BEST,
                files::METRICS,
                files::SUMMARY,
                files::SPIB_STATE,
                "checkpoints",
                // `hiermd analyze RUN` writes here unless told otherwise.
                "analysis",
            ]
            .contains(&n),
            OutputKind::PretrainRun => [
                "model.toml",
                "model.safetensors",
                "metrics.jsonl",
                "checkpoints",
            ]
            .contains(&n),
            OutputKind::Demo => DEMO_ENTRIES.contains(&n),
            OutputKind::Analysis => {
                ["analysis.json", "index.html", "states.npy", "attention"].contains(&n)
                    || figures.iter().any(|f| f == n)
            }
        }
    };
    let mut foreign: Vec<String> = entry_names(dir)
        .into_iter()
        .filter(|n| !known(n) && parse_temp(n).is_none())
        .collect();
    if kind == OutputKind::Analysis {
        // The attention maps sit one level down; anything else there is not ours either.
        foreign.extend(
            entry_names(&dir.join("attention"))
                .into_iter()
                .filter(|n| !figures.iter().any(|f| f == n))
                .map(|n| format!("attention/{n}")),
        );
    }
    foreign
}

/// Up to five names, for messages.
fn some_names(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(String::as_str).collect();
    let more = names.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// Describes what sits at an existing folder, for messages.
fn what_is(dir: &Path) -> String {
    match recognise(dir) {
        Some(k) => format!("a hiermd {}", k.describe()),
        None => format!(
            "not a hiermd folder (it holds {})",
            some_names(&entry_names(dir))
        ),
    }
}

// ---------------------------------------------------------------------------------- overlap --

/// `path` made absolute with symbolic links resolved: the longest existing prefix is
/// canonicalised and the rest (which cannot hold links) appended, `.` and `..` applied.
fn resolve(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let comps: Vec<Component> = abs.components().collect();
    for keep in (1..=comps.len()).rev() {
        let head: PathBuf = comps[..keep].iter().collect();
        if let Ok(mut out) = std::fs::canonicalize(&head) {
            for c in &comps[keep..] {
                match c {
                    Component::ParentDir => {
                        out.pop();
                    }
                    Component::CurDir => {}
                    c => out.push(c),
                }
            }
            return out;
        }
    }
    abs
}

/// Whether two existing paths are the same file (hard links included).
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (a, b);
        false
    }
}

/// Refuses an output `out` that is, contains or lies inside one of `inputs` (`(what, path)`,
/// e.g. `("dataset", ds)`), comparing paths with symbolic links resolved (and, on unix, files by
/// identity, so a hard link is caught too). The error names both.
pub fn refuse_overlap(out: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let o = resolve(out);
    for &(what, input) in inputs {
        let i = resolve(input);
        let relation = if o == i || same_file(out, input) {
            "is"
        } else if i.starts_with(&o) {
            "contains"
        } else if o.starts_with(&i) {
            "lies inside"
        } else {
            continue;
        };
        bail!(
            "output {}: {relation} the input {what} {}; hiermd never writes over what it reads: \
             choose another output",
            out.display(),
            input.display()
        );
    }
    Ok(())
}

// ------------------------------------------------------------------------------ file outputs --

/// Checks a file output before anything is computed: it may not overlap `inputs` (see
/// [`refuse_overlap`]); an existing `out` is replaced only with `force`, and only when it is a
/// regular file (or a link, which the new file replaces, leaving what it points to alone). Also
/// removes stale temporaries beside it.
pub fn check_file_output(out: &Path, force: bool, inputs: &[(&str, &Path)]) -> Result<()> {
    file_name_of(out)?;
    refuse_overlap(out, inputs)?;
    clean_stale(&parent_of(out));
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("{}: cannot inspect", out.display())),
        Ok(m) if m.is_dir() => bail!(
            "{}: already exists and is a folder; the output is a file (choose a file name)",
            out.display()
        ),
        Ok(m) if !(m.is_file() || m.file_type().is_symlink()) => bail!(
            "{}: already exists and is not a regular file (a device, pipe or socket); hiermd \
             will not replace it",
            out.display()
        ),
        Ok(_) if !force => bail!(
            "{}: already exists (use --force to replace it)",
            out.display()
        ),
        Ok(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------- folder outputs --

/// What sits at a folder output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Existing {
    /// Nothing.
    Absent,
    /// An empty folder: nothing to lose.
    Empty,
    /// A hiermd folder of the output's kind, holding nothing else: replaced with `--force`.
    Old,
}

/// Decides whether the folder output `out` of kind `kind` may be written; errors say what is
/// there and why it stays.
fn inspect(out: &Path, kind: OutputKind, force: bool) -> Result<Existing> {
    let m = match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Absent),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot inspect", out.display())),
        Ok(m) => m,
    };
    let d = out.display();
    if m.file_type().is_symlink() {
        bail!(
            "{d}: already exists and is a symbolic link; hiermd does not replace links (nor what \
             they point to): choose another output"
        );
    }
    if !m.is_dir() {
        bail!(
            "{d}: already exists and is a file, not a {}; hiermd will not replace it",
            kind.describe()
        );
    }
    let names = entry_names(out);
    if names.is_empty() {
        return Ok(Existing::Empty);
    }
    let found = recognise(out);
    if found != Some(kind) {
        let what = what_is(out);
        if !force {
            bail!(
                "{d}: already exists, and is {what}: --force would not replace it either (it \
                 replaces only a hiermd {}); choose another output",
                kind.describe()
            );
        }
        bail!(
            "{d}: is {what}, not a hiermd {}: --force replaces only a hiermd {} and never \
             anything else; choose another output, or move it away yourself",
            kind.describe(),
            kind.describe()
        );
    }
    if !force {
        bail!(
            "{d}: already exists (a hiermd {}; use --force to replace it{})",
            kind.describe(),
            if kind == OutputKind::Run {
                ", or --resume to continue it"
            } else {
                ""
            }
        );
    }
    let foreign = foreign_entries(out, kind);
    if !foreign.is_empty() {
        bail!(
            "{d}: a hiermd {}, but it also holds {} that hiermd did not write there: --force will \
             not delete them; move them out first",
            kind.describe(),
            some_names(&foreign)
        );
    }
    Ok(Existing::Old)
}

/// Checks a folder that a command fills in place over time (`hiermd pretrain`: checkpoints
/// every epoch, resumable): it may not overlap `inputs`, and must be missing, empty, or a hiermd
/// `kind` folder holding nothing else. Removes stale temporaries beside it, in it and in its
/// `checkpoints` folder.
pub fn check_in_place(dir: &Path, kind: OutputKind, inputs: &[(&str, &Path)]) -> Result<()> {
    file_name_of(dir)?;
    refuse_overlap(dir, inputs)?;
    for d in [parent_of(dir), dir.to_path_buf(), dir.join("checkpoints")] {
        clean_stale(&d);
    }
    let d = dir.display();
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("{d}: cannot inspect")),
        Ok(m) if !m.is_dir() => bail!("{d}: already exists and is not a folder"),
        Ok(_) => {}
    }
    if entry_names(dir).is_empty() {
        return Ok(());
    }
    if recognise(dir) != Some(kind) {
        bail!(
            "{d}: is {}, not a hiermd {}: hiermd writes only into a new or empty folder or its              own {}; choose another output",
            what_is(dir),
            kind.describe(),
            kind.describe()
        );
    }
    let foreign = foreign_entries(dir, kind);
    if !foreign.is_empty() {
        bail!(
            "{d}: a hiermd {}, but it also holds {} that hiermd did not write there; choose              another output or move them out",
            kind.describe(),
            some_names(&foreign)
        );
    }
    Ok(())
}

/// A test hook: where [`DirOutput::commit_with`] fails on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplaceFault {
    /// Return an error right after the old folder was moved aside (the error path must put it
    /// back).
    ErrorAfterOldMovedAside,
    /// Abort the process right after the old folder was moved aside, as a kill would (the next
    /// [`clean_stale`] must put it back).
    AbortAfterOldMovedAside,
}

/// A folder output (dataset, feature store, npy folder, run): checked before any work, built in a
/// temporary folder beside it (`.NAME.TAG-PID`), and swapped in by [`commit`](Self::commit)
/// once complete. Dropped without a commit, it removes its temporary folder and leaves the
/// output as it was.
pub struct DirOutput {
    out: PathBuf,
    kind: OutputKind,
    force: bool,
    existing: Existing,
    staging: PathBuf,
    tmp: Option<TempDir>,
}

impl DirOutput {
    /// Checks the output `out` of a command writing a `kind` folder from `inputs` (see
    /// [`refuse_overlap`]): it must be missing, an empty folder, or with `force` a hiermd folder
    /// of that kind holding nothing else. Removes stale temporaries beside it; creates nothing.
    pub fn check(
        out: &Path,
        kind: OutputKind,
        force: bool,
        inputs: &[(&str, &Path)],
    ) -> Result<Self> {
        let name = file_name_of(out)?;
        refuse_overlap(out, inputs)?;
        let parent = parent_of(out);
        clean_stale(&parent);
        let existing = inspect(out, kind, force)?;
        let staging = parent.join(format!(".{name}.{}-{}", kind.tag(), std::process::id()));
        Ok(Self {
            out: out.to_path_buf(),
            kind,
            force,
            existing,
            staging,
            tmp: None,
        })
    }

    /// Whether an old folder is there, to be replaced by the commit.
    pub fn replaces(&self) -> bool {
        self.existing == Existing::Old
    }

    /// The output.
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// The temporary folder the output is built in (created by [`begin`](Self::begin)).
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// Creates the temporary folder (and the output's parent folders) and returns it.
    pub fn begin(&mut self) -> Result<&Path> {
        if self.tmp.is_none() {
            let parent = parent_of(&self.out);
            std::fs::create_dir_all(&parent)
                .with_context(|| format!("{}: cannot create", parent.display()))?;
            self.tmp = Some(TempDir::create(self.staging.clone())?);
        }
        Ok(&self.staging)
    }

    /// Moves the finished folder into place (see [`commit_with`](Self::commit_with)).
    pub fn commit(self) -> Result<()> {
        self.commit_with(None)
    }

    /// Moves the finished folder into place: renamed to the output when nothing is there;
    /// otherwise the old folder (checked again: still a hiermd folder of this kind holding
    /// nothing else) is moved aside, the new one renamed in, and the old one removed. If the new
    /// one cannot be renamed in, the old one is put back. `fault` makes it fail on purpose (for
    /// tests; None in every command).
    pub fn commit_with(mut self, fault: Option<ReplaceFault>) -> Result<()> {
        let tmp = self
            .tmp
            .take()
            .context("DirOutput::commit before begin: nothing was built")?;
        sync_dir(tmp.path())?;
        let parent = parent_of(&self.out);
        let d = self.out.display().to_string();
        // Looked at again: the folder may have changed during a long build.
        match inspect(&self.out, self.kind, self.force)? {
            Existing::Absent => {
                tmp.persist(&self.out).with_context(|| {
                    format!("moving the new {} into place at {d}", self.kind.describe())
                })?;
            }
            Existing::Empty => {
                // remove_dir removes only an empty folder: nothing can be lost in between.
                std::fs::remove_dir(&self.out).with_context(|| format!("{d}: cannot replace"))?;
                tmp.persist(&self.out).with_context(|| {
                    format!("moving the new {} into place at {d}", self.kind.describe())
                })?;
            }
            Existing::Old => {
                let aside = PathBuf::from(format!("{}.old", self.staging.display()));
                remove_any(&aside)
                    .with_context(|| format!("removing the leftover {}", aside.display()))?;
                std::fs::rename(&self.out, &aside)
                    .with_context(|| format!("{d}: cannot move the old one aside"))?;
                let put_back = |why: anyhow::Error| -> anyhow::Error {
                    match std::fs::rename(&aside, &self.out) {
                        Ok(()) => why.context(format!("{d}: the old one is kept")),
                        Err(e) => why.context(format!(
                            "{d}: the old one could not be put back ({e}); it is at {}",
                            aside.display()
                        )),
                    }
                };
                match fault {
                    Some(ReplaceFault::ErrorAfterOldMovedAside) => {
                        return Err(put_back(anyhow::anyhow!(
                            "injected failure while replacing {d}"
                        )));
                    }
                    Some(ReplaceFault::AbortAfterOldMovedAside) => std::process::abort(),
                    None => {}
                }
                if let Err(e) = tmp.persist(&self.out) {
                    return Err(put_back(anyhow::Error::new(e).context(format!(
                        "moving the new {} into place at {d}",
                        self.kind.describe()
                    ))));
                }
                sync_dir(&parent)?;
                // The new folder is in place; an old one that cannot be removed is only litter,
                // and the next command writing here removes it.
                let _ = std::fs::remove_dir_all(&aside);
            }
        }
        sync_dir(&parent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_parse() {
        let t = |s: &str| parse_temp(s);
        assert_eq!(
            t(".ds.import-123"),
            Some(TempName {
                target: "ds".into(),
                pid: 123,
                aside: false
            })
        );
        assert_eq!(
            t(".my.ds-2.features-7.old").map(|t| (t.target, t.aside)),
            Some(("my.ds-2".into(), true))
        );
        assert_eq!(t(".x.npy.hiermd-5-0").map(|t| t.pid), Some(5));
        for bad in [
            "ds.import-1",
            ".import-1",
            ".ds.import-",
            ".ds.import-1x",
            ".ds.import-1-2",
            ".x.hiermd-5",
            ".x.hiermd-5-1.old",
            ".ds.other-1",
            ".notes.import-abc",
        ] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    #[test]
    fn resolve_handles_missing_tails() {
        let base = std::env::temp_dir().join(format!("hiermd-output-unit-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let canon = std::fs::canonicalize(&base).unwrap();
        assert_eq!(resolve(&base.join("a/../b/./c")), canon.join("b/c"));
        assert_eq!(resolve(&base), canon);
        let _ = std::fs::remove_dir_all(base);
    }
}
