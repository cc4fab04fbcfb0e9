//! `hiermd import`: topology + trajectories -> a dataset folder, streamed and atomic.

use super::dataset::{write_atom_row, Header, StoredAtom, ATOM_TABLE_HEADER};
use super::{source_file, Dataset, Manifest, TrajectoryEntry, FORMAT_VERSION, HEADER_BYTES};
use crate::output::{write_atomic, DirOutput, OutputKind};
use crate::progress::Progress;
use crate::topology::{read_topology, Topology};
use crate::traj::{open_trajectory, Frame};
use anyhow::{bail, ensure, Context, Result};
use std::collections::HashMap;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What to import.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// Topology file (PDB, GRO, PSF).
    pub topology: PathBuf,
    /// Trajectory files (DCD, XTC, TRR, multi-model PDB), each stored as one trajectory.
    pub trajectories: Vec<PathBuf>,
    /// The dataset folder to create.
    pub out: PathBuf,
    /// Atom selection (see [`crate::select`]); `heavy` by default.
    pub selection: String,
    /// Optional atom-to-token map: one integer per selected atom (or per topology atom),
    /// whitespace separated. Tokens are renumbered densely in order of first appearance.
    pub token_map: Option<PathBuf>,
    /// Time between frames in ps, for formats without times (or to override them).
    pub time_step_ps: Option<f64>,
    /// Keep only the first N frames of each trajectory (all when None).
    pub max_frames: Option<usize>,
    /// Replace an existing dataset at `out`.
    pub force: bool,
    /// Print progress on stderr.
    pub progress: bool,
}

/// What an import did.
#[derive(Clone, Debug)]
pub struct ImportReport {
    /// Frames per trajectory.
    pub frames: Vec<usize>,
    /// Atoms stored per frame.
    pub atoms: usize,
    /// Bytes of coordinates read from the sources (selected atoms only count once stored).
    pub bytes_written: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Warnings (non-uniform time steps, ...).
    pub warnings: Vec<String>,
}

/// Imports a topology and its trajectories into a dataset folder. Nothing appears at `out` until
/// every trajectory is written and synced; on any error (or a kill) no dataset is left.
pub fn import(opts: &ImportOptions) -> Result<(Dataset, ImportReport)> {
    let start = Instant::now();
    ensure!(
        !opts.trajectories.is_empty(),
        "import needs at least one trajectory file"
    );
    // ---- output safety (issue 16): checked before any work ----
    if let Some(dt) = opts.time_step_ps {
        ensure!(
            dt.is_finite() && dt > 0.0,
            "--dt {dt}: the time between frames must be a positive number of ps"
        );
    }
    let mut inputs: Vec<(&str, &Path)> = vec![("topology", &opts.topology)];
    inputs.extend(
        opts.trajectories
            .iter()
            .map(|t| ("trajectory", t.as_path())),
    );
    if let Some(m) = &opts.token_map {
        inputs.push(("token map", m));
    }
    // An existing dataset is replaced only with --force, and never anything else.
    let mut target = DirOutput::check(&opts.out, OutputKind::Dataset, opts.force, &inputs)?;
    // ---- end output safety ----
    let top = read_topology(&opts.topology)?;
    ensure!(
        !top.is_empty(),
        "{}: the topology has no atoms",
        opts.topology.display()
    );
    let selected = crate::select::select(&top, &opts.selection).with_context(|| {
        format!(
            "selection {:?} on {}",
            opts.selection,
            opts.topology.display()
        )
    })?;
    let atoms = stored_atoms(&top, &selected, opts)?;

    // Built in a temporary folder beside the output, swapped in when complete.
    let tmp = target.begin()?.to_path_buf();

    let mut table = String::from(ATOM_TABLE_HEADER);
    table.push('\n');
    atoms.iter().for_each(|a| write_atom_row(&mut table, a));
    // Checksum of the stored atom table (issue 16), recorded in the manifest.
    let atom_table_xxh3 = super::verify::xxh3_hex(xxhash_rust::xxh3::xxh3_64(table.as_bytes()));
    write_atomic(&tmp.join("atoms.tsv"), table.as_bytes())?;

    let mut report = ImportReport {
        frames: Vec::new(),
        atoms: atoms.len(),
        bytes_written: 0,
        seconds: 0.0,
        warnings: Vec::new(),
    };
    report
        .warnings
        .extend(unknown_element_warning(&opts.topology, &atoms));
    let mut entries = Vec::new();
    for (i, path) in opts.trajectories.iter().enumerate() {
        let file = format!("traj-{i:04}.hmdt");
        let entry = import_trajectory(
            path,
            &top,
            &selected,
            &atoms,
            &tmp.join(&file),
            opts,
            &mut report,
        )
        .with_context(|| format!("importing {}", path.display()))?;
        entries.push(TrajectoryEntry { file, ..entry });
    }

    let tokens = atoms
        .iter()
        .map(|a| a.token)
        .max()
        .map_or(0, |m| m as usize + 1);
    let residues = atoms
        .iter()
        .map(|a| a.residue)
        .max()
        .map_or(0, |m| m as usize + 1);
    let mut chains: Vec<&str> = atoms.iter().map(|a| a.chain.as_str()).collect();
    chains.dedup();
    chains.sort_unstable();
    chains.dedup();
    let time_step_ps = opts
        .time_step_ps
        .or_else(|| entries.iter().find_map(|e| e.time_step_ps));
    for e in &mut entries {
        if e.time_step_ps.is_none() {
            e.time_step_ps = time_step_ps;
        }
    }
    let manifest = Manifest {
        format: "hiermd-dataset".into(),
        version: FORMAT_VERSION,
        written_by: format!("hiermd {}", env!("CARGO_PKG_VERSION")),
        atoms: atoms.len(),
        residues,
        tokens,
        chains: chains.len(),
        selection: opts.selection.clone(),
        topology_atoms: top.len(),
        topology: source_file(&opts.topology)?,
        token_map: opts.token_map.as_deref().map(source_file).transpose()?,
        atom_table: "atoms.tsv".into(),
        atom_table_xxh3: Some(atom_table_xxh3),
        time_step_ps,
        total_frames: report.frames.iter().sum(),
        trajectories: entries,
    };
    write_atomic(
        &tmp.join("manifest.toml"),
        toml::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    // The dataset appears whole or not at all; an old one is kept until the new one is in.
    target.commit()?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok((Dataset::open(&opts.out)?, report))
}

/// A warning when stored atoms have no element (Z = 0: virtual sites, coarse-grained beads):
/// they are kept, but the atom stage refuses them unless a run leaves them out (issue 16).
fn unknown_element_warning(topology: &Path, atoms: &[StoredAtom]) -> Option<String> {
    let unknown: Vec<&StoredAtom> = atoms.iter().filter(|a| a.atomic_number == 0).collect();
    let first = unknown.first()?;
    let mut names: Vec<&str> = unknown.iter().map(|a| a.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    names.truncate(5);
    Some(format!(
        "{}: {} stored atoms have no element (X: virtual sites or coarse-grained beads, named \
         {}; the first is {} of residue {} {}); selections and export handle them, the atom \
         stage (featurize, end-to-end training) refuses them unless left out (data.selection = \
         \"not element X\")",
        topology.display(),
        unknown.len(),
        names.join(", "),
        first.name,
        first.resname,
        first.resid
    ))
}

fn stored_atoms(
    top: &Topology,
    selected: &[usize],
    opts: &ImportOptions,
) -> Result<Vec<StoredAtom>> {
    let residue_of = top.residue_indices();
    // Residue indices are renumbered densely among the selected atoms.
    let mut residue_ids: HashMap<u32, u32> = HashMap::new();
    let mut atoms = Vec::with_capacity(selected.len());
    for &i in selected {
        let a = &top.atoms[i];
        // Atoms of unknown element (Z = 0: virtual sites, coarse-grained beads) are stored as
        // element X (issue 16, interop); the atom stage refuses them unless they are dropped.
        let next = residue_ids.len() as u32;
        let residue = *residue_ids.entry(residue_of[i]).or_insert(next);
        atoms.push(StoredAtom {
            source_index: i,
            name: a.name.clone(),
            resname: a.resname.clone(),
            resid: a.resid,
            residue,
            // MDAnalysis's placeholder segid `SYSTEM` (GRO; PDB without chain or segID) says
            // there is no segment: it is no chain either (issue 16, interop).
            chain: if a.chain.is_empty() && a.segid != crate::topology::PLACEHOLDER_SEGID {
                a.segid.clone()
            } else {
                a.chain.clone()
            },
            element: a.element.clone(),
            atomic_number: a.atomic_number,
            mass: a.mass,
            token: residue,
        });
    }
    if let Some(path) = &opts.token_map {
        // Bounded like a topology (issue 16): a regular file, gzip within limits.
        let bytes = crate::traj::input::read_whole(path, crate::traj::input::MAX_TEXT_BYTES)
            .context("cannot read the token map")?;
        let text = String::from_utf8(bytes)
            .with_context(|| format!("{}: the token map is not text", path.display()))?;
        let values: Vec<i64> = text
            .split_whitespace()
            .enumerate()
            .map(|(k, s)| {
                s.parse().with_context(|| {
                    format!(
                        "{}: entry {} ({s:?}) is not an integer",
                        path.display(),
                        k + 1
                    )
                })
            })
            .collect::<Result<_>>()?;
        let per_selected: Vec<i64> = if values.len() == selected.len() {
            values
        } else if values.len() == top.len() {
            selected.iter().map(|&i| values[i]).collect()
        } else {
            bail!(
                "{}: {} entries, but there are {} selected atoms ({} in the topology)",
                path.display(),
                values.len(),
                selected.len(),
                top.len()
            );
        };
        let mut dense: HashMap<i64, u32> = HashMap::new();
        for (a, t) in atoms.iter_mut().zip(per_selected) {
            ensure!(
                t >= 0,
                "{}: negative token {t} for atom {}",
                path.display(),
                a.source_index + 1
            );
            let next = dense.len() as u32;
            a.token = *dense.entry(t).or_insert(next);
        }
    }
    Ok(atoms)
}

fn import_trajectory(
    path: &Path,
    top: &Topology,
    selected: &[usize],
    atoms: &[StoredAtom],
    out: &Path,
    opts: &ImportOptions,
    report: &mut ImportReport,
) -> Result<TrajectoryEntry> {
    let mut reader = open_trajectory(path)?;
    ensure!(
        reader.natoms() == top.len(),
        "{} has {} atoms per frame but the topology {} has {}",
        path.display(),
        reader.natoms(),
        opts.topology.display(),
        top.len()
    );
    let file =
        std::fs::File::create(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let mut w = BufWriter::with_capacity(1 << 22, file);
    w.write_all(&vec![0u8; HEADER_BYTES as usize])?;
    // XXH3 of the payload (every byte after the header), hashed as it is written (issue 16).
    let mut payload = xxhash_rust::xxh3::Xxh3::new();
    let mut frame = Frame::default();
    let mut picked = vec![0f32; selected.len() * 3];
    let (mut boxes, mut times): (Vec<f32>, Vec<f64>) = (Vec::new(), Vec::new());
    let (mut has_box, mut has_time) = (true, true);
    let mut progress = Progress::new(
        &format!(
            "import {}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ),
        reader.nframes_hint(),
        "frames",
        opts.progress,
    );
    let mut n = 0usize;
    // Fault injection for the crash-safety test: abort the whole process (as a kill would) after
    // this many frames. Never set outside tests.
    let abort_after: Option<usize> = std::env::var("HIERMD_FAULT_ABORT_AFTER_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok());
    while opts.max_frames.is_none_or(|m| n < m) && reader.read_frame(&mut frame)? {
        if abort_after == Some(n) {
            w.flush()?;
            std::process::abort();
        }
        for (k, &i) in selected.iter().enumerate() {
            let c = &frame.coords[3 * i..3 * i + 3];
            if !c.iter().all(|v| v.is_finite()) {
                bail!(
                    "{}: frame {n}: atom {} ({} of residue {} {}) has non-finite coordinates {c:?}",
                    path.display(),
                    i + 1,
                    atoms[k].name,
                    atoms[k].resname,
                    atoms[k].resid
                );
            }
            picked[3 * k..3 * k + 3].copy_from_slice(c);
        }
        w.write_all(bytemuck::cast_slice(&picked))?;
        payload.update(bytemuck::cast_slice(&picked));
        match frame.unit_cell {
            Some(uc) if has_box => boxes.extend(uc.vectors.iter().flatten()),
            Some(_) => {}
            None => {
                if n > 0 && has_box {
                    report.warnings.push(format!(
                        "{}: frame {n} has no box; boxes dropped",
                        path.display()
                    ));
                }
                has_box = false;
            }
        }
        match frame.time_ps {
            Some(t) if has_time => times.push(t),
            _ => has_time = false,
        }
        n += 1;
        progress.set(n, (n * picked.len() * 4) as u64);
    }
    progress.finish();
    ensure!(n > 0, "{}: no frames", path.display());
    // Values of the file that make no sense were dropped by the reader; say so (issue 16).
    report.warnings.extend(reader.take_warnings());
    if has_time && opts.time_step_ps.is_none() {
        if let Err(w) = crate::traj::check_frame_times(path, &times) {
            report.warnings.push(w);
            has_time = false;
            times.clear();
        }
    }
    let mut time_source = if has_time { reader.time_source() } else { None };
    if let Some(dt) = opts.time_step_ps {
        // An explicit time step wins, for the first frame's time too: a file that starts at
        // frame offset k (a DCD's ISTART / NSAVC, an XTC that starts at 1000 ps) starts at k dt,
        // so that the times stay the file's own frame counts in the new unit.
        let file_dt = (has_time && n > 1).then(|| times[1] - times[0]);
        let t0 = match file_dt {
            Some(fd) if crate::traj::plausible_time_step(fd) => {
                let k = times[0] / fd;
                if (k - k.round()).abs() < 1e-6 {
                    k.round() * dt
                } else {
                    k * dt
                }
            }
            _ => 0.0,
        };
        time_source = Some(match file_dt {
            Some(fd) => format!(
                "--dt {dt} ps (the file said {fd} ps per frame{})",
                time_source.map(|s| format!("; {s}")).unwrap_or_default()
            ),
            None => format!("--dt {dt} ps"),
        });
        times = (0..n).map(|k| t0 + dt * k as f64).collect();
        has_time = true;
    }
    if has_box {
        w.write_all(bytemuck::cast_slice(&boxes))?;
        payload.update(bytemuck::cast_slice(&boxes));
    }
    if has_time {
        for t in &times {
            w.write_all(&t.to_le_bytes())?;
            payload.update(&t.to_le_bytes());
        }
    }
    let header = Header {
        natoms: selected.len() as u64,
        nframes: n as u64,
        has_box,
        has_time,
        complete: true,
    };
    let mut file = w.into_inner().map_err(|e| e.into_error())?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&header.encode())?;
    file.sync_all()?;
    report.frames.push(n);
    report.bytes_written += header.file_len();

    let time_step_ps = if has_time && n > 1 {
        let dt = times[1] - times[0];
        let uneven = times
            .windows(2)
            .any(|w| ((w[1] - w[0]) - dt).abs() > 1e-3 * dt.abs().max(1e-9));
        if uneven {
            report.warnings.push(format!(
                "{}: frames are not evenly spaced in time",
                path.display()
            ));
        }
        Some(dt)
    } else {
        None
    };
    Ok(TrajectoryEntry {
        file: String::new(),
        source: source_file(path)?,
        frames: n,
        has_box,
        has_time,
        first_time_ps: times.first().copied(),
        time_step_ps,
        payload_xxh3: Some(super::verify::xxh3_hex(payload.digest())),
        time_source,
    })
}
