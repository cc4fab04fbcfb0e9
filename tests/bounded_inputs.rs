//! Bounded inputs and interop, through the `hiermd` binary as a user meets them (issue 16): a
//! device, FIFO or directory given as a file is refused at once; a gzip bomb is refused without
//! inflating it; deeply nested selections and impossible sizes are clean errors, not aborts;
//! implausible headers (XTC precision, time steps from a file or `--dt`, DCD without the CHARMM
//! flag, PSF masses) are refused or warned about, naming the file and frame; virtual sites and
//! coarse-grained beads import as element X, and the atom stage refuses them by name.

mod traj_write;

use hiermd::model::atom::AtomInputs;
use hiermd::ops::scatter::EXCLUDED;
use hiermd::store::Dataset;
use hiermd::workflow::config::RunConfig;
use hiermd::Device;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use traj_write::*;

/// A fresh folder for one test, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("hiermd-bounded-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a run of the binary gave.
struct Run {
    /// Exit code (None: killed by a signal, as an abort or a stack overflow would be).
    code: Option<i32>,
    stderr: String,
    stdout: String,
    /// Wall time.
    seconds: f64,
    /// Peak resident memory of the process, bytes.
    max_rss: u64,
}

/// Runs `hiermd ARGS` with relative paths taken in `dir` (made absolute here: without a
/// working-folder change the process is spawned, not forked, so its peak memory is its own),
/// killing it after `limit`; measures its time and peak memory.
fn hiermd(dir: &Path, args: &[&str], limit: Duration) -> Run {
    let t = Instant::now();
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            let p = dir.join(a);
            // Arguments naming something in `dir`, or an output there, become absolute.
            if !a.starts_with('-')
                && !a.contains(' ')
                && a.len() < 200
                && (p.exists() || is_output(a))
            {
                p.to_string_lossy().into_owned()
            } else {
                a.to_string()
            }
        })
        .collect();
    // Reaped by the wait4 below (for its peak memory), not by Child::wait.
    #[allow(clippy::zombie_processes)]
    let child = Command::new(env!("CARGO_BIN_EXE_hiermd"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hiermd");
    let pid = child.id() as libc::pid_t;
    // A watchdog: a reader that blocks or streams forever must fail the test, not hang it.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while !flag.load(std::sync::atomic::Ordering::SeqCst) {
            if start.elapsed() > limit {
                // SAFETY: signals the child we started (not yet reaped: `done` is unset).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let mut out = child.stdout.expect("stdout");
    let mut err = child.stderr.expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).ok();
        s
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut err, &mut stderr).ok();
    let stdout = reader.join().unwrap();
    // wait4 rather than Child::wait: it gives this child's own peak memory.
    let mut status = 0;
    // SAFETY: plain FFI call with valid out-pointers; rusage is plain old data.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    watchdog.join().unwrap();
    assert_eq!(r, pid, "wait4");
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    Run {
        code,
        stderr,
        stdout,
        seconds: t.elapsed().as_secs_f64(),
        max_rss: usage.ru_maxrss as u64 * 1024,
    }
}

/// Output names the tests use (made absolute like existing files).
fn is_output(a: &str) -> bool {
    a.starts_with("ds") || a.starts_with("cg") || a == "run"
}

/// Asserts a clean refusal: exit code 1 (not a signal) and `needles` in the error.
fn refused(r: &Run, needles: &[&str]) {
    assert_eq!(
        r.code,
        Some(1),
        "expected a clean error (exit 1), got {:?}\nstderr: {}",
        r.code,
        tail(&r.stderr)
    );
    for n in needles {
        assert!(
            r.stderr.contains(n),
            "stderr lacks {n:?}:\n{}",
            tail(&r.stderr)
        );
    }
    assert!(!r.stderr.contains("panicked"), "{}", tail(&r.stderr));
}

/// The end of a long message (selections repeat the expression).
fn tail(s: &str) -> &str {
    let mut i = s.len().saturating_sub(2000);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// A PDB of `n` atoms in `models` models (a topology and a trajectory at once).
fn pdb(n: usize, models: usize) -> String {
    let frames: Vec<Vec<f32>> = (0..models)
        .map(|k| pseudo_random(3 * n, 7 + k as u64, 0.0, 20.0))
        .collect();
    pdb_models(&frames, None)
}

/// `data` gzipped (one member).
fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// `n` newlines gzipped as tightly as deflate allows (about 1000:1), written in blocks so that
/// the test itself never holds them.
fn newlines_gz(n: usize) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let block = vec![b'\n'; 1 << 20];
    for _ in 0..n / block.len() {
        e.write_all(&block).unwrap();
    }
    e.finish().unwrap()
}

/// Peak memory of a run of the binary that fails at once (its baseline: code, libraries).
fn baseline_rss() -> u64 {
    let d = Dir::new("baseline");
    let r = hiermd(
        &d.0,
        &[
            "import", "--top", "none.pdb", "--traj", "none.pdb", "--out", "ds",
        ],
        QUICK,
    );
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    r.max_rss
}

const QUICK: Duration = Duration::from_secs(20);

#[test]
fn special_files_are_refused_at_once() {
    let d = Dir::new("special");
    d.write("t.pdb", pdb(3, 2).as_bytes());
    std::os::unix::fs::symlink("/dev/zero", d.join("zero.pdb")).unwrap();
    // /dev/zero through a symlink as --top once grew to 18.5 GB: now refused by its type.
    let r = hiermd(
        &d.0,
        &[
            "import", "--top", "zero.pdb", "--traj", "t.pdb", "--out", "ds",
        ],
        QUICK,
    );
    refused(
        &r,
        &["zero.pdb (a link to /dev/zero) is a character device, not a regular file"],
    );
    assert!(r.seconds < 1.0, "took {:.3} s", r.seconds);
    assert!(
        r.max_rss < baseline_rss() + (16 << 20),
        "peak memory {} bytes",
        r.max_rss
    );
    // As a trajectory and as a token map too.
    let r = hiermd(
        &d.0,
        &[
            "import", "--top", "t.pdb", "--traj", "zero.pdb", "--out", "ds",
        ],
        QUICK,
    );
    refused(&r, &["is a character device"]);
    let r = hiermd(
        &d.0,
        &[
            "import",
            "--top",
            "t.pdb",
            "--traj",
            "t.pdb",
            "--out",
            "ds",
            "--select",
            "all",
            "--token-map",
            "zero.pdb",
        ],
        QUICK,
    );
    refused(&r, &["token map", "is a character device"]);
    // A FIFO would block an open() for reading until a writer came: refused without opening.
    let c = std::ffi::CString::new(d.join("pipe.psf").to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let r = hiermd(
        &d.0,
        &[
            "import", "--top", "pipe.psf", "--traj", "t.pdb", "--out", "ds",
        ],
        QUICK,
    );
    refused(&r, &["pipe.psf is a FIFO (named pipe), not a regular file"]);
    assert!(r.seconds < 1.0, "took {:.3} s", r.seconds);
    // A directory.
    std::fs::create_dir(d.join("dir.gro")).unwrap();
    let r = hiermd(
        &d.0,
        &[
            "import", "--top", "dir.gro", "--traj", "t.pdb", "--out", "ds",
        ],
        QUICK,
    );
    refused(&r, &["dir.gro is a directory"]);
    assert!(!d.join("ds").exists());
}

#[test]
fn gzip_bomb_is_refused_without_inflating_it() {
    let d = Dir::new("bomb");
    d.write("t.pdb", pdb(3, 1).as_bytes());
    let base = baseline_rss();
    // 1 GiB of text in about 1 MB: 64 gzip members of 16 MiB each. Each member's trailer is
    // honest about its own 16 MiB, so only the bounded inflation can catch it.
    let member = newlines_gz(16 << 20);
    let bomb: Vec<u8> = member.repeat(64);
    assert!(bomb.len() < 2 << 20, "{} bytes", bomb.len());
    d.write("bomb.pdb.gz", &bomb);
    let r = hiermd(
        &d.0,
        &[
            "import",
            "--top",
            "bomb.pdb.gz",
            "--traj",
            "t.pdb",
            "--out",
            "ds",
        ],
        QUICK,
    );
    refused(
        &r,
        &[
            "bomb.pdb.gz: gzip data inflates to more than 67108864 bytes",
            "decompression bomb",
        ],
    );
    // The limit (64 MiB for a file this small) bounds the memory, far below the 1 GiB.
    assert!(
        r.max_rss < base + (160 << 20),
        "peak memory {} bytes (baseline {base})",
        r.max_rss
    );
    // One member whose trailer says 256 MiB: refused before inflating anything.
    d.write("honest.pdb.gz", &newlines_gz(256 << 20));
    let r = hiermd(
        &d.0,
        &[
            "import",
            "--top",
            "honest.pdb.gz",
            "--traj",
            "t.pdb",
            "--out",
            "ds",
        ],
        QUICK,
    );
    refused(&r, &["its trailer says 268435456 bytes"]);
    assert!(
        r.max_rss < base + (16 << 20),
        "peak memory {} bytes (baseline {base})",
        r.max_rss
    );
    assert!(r.seconds < 1.0, "took {:.3} s", r.seconds);
    // The same bomb as a .pdb.gz trajectory: streamed, and stopped at the limit.
    let r = hiermd(
        &d.0,
        &[
            "import",
            "--top",
            "t.pdb",
            "--traj",
            "bomb.pdb.gz",
            "--out",
            "ds",
        ],
        QUICK,
    );
    refused(&r, &["inflates to more than 67108864 bytes"]);
    assert!(
        r.max_rss < base + (64 << 20),
        "peak memory {} bytes (baseline {base})",
        r.max_rss
    );
    // A real gzipped topology and trajectory still import.
    d.write("t.pdb.gz", &gzip(pdb(3, 2).as_bytes()));
    let r = hiermd(
        &d.0,
        &[
            "import", "--top", "t.pdb.gz", "--traj", "t.pdb.gz", "--out", "ds", "--select", "all",
        ],
        QUICK,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.contains("imported 2 frames of 3 atoms"),
        "{}",
        r.stdout
    );
}

#[test]
fn nested_selections_are_clean_errors() {
    let d = Dir::new("nested");
    d.write("t.pdb", pdb(3, 1).as_bytes());
    // 10,000 nested parentheses and 30,000 `not` once overflowed the stack (an abort).
    let parens = format!("{}all{}", "(".repeat(10_000), ")".repeat(10_000));
    let nots = format!("{}all", "not ".repeat(30_000));
    for sel in [&parens, &nots] {
        let r = hiermd(
            &d.0,
            &[
                "import", "--top", "t.pdb", "--traj", "t.pdb", "--out", "ds", "--select", sel,
            ],
            QUICK,
        );
        refused(&r, &["parentheses and `not` nested more than 256 deep"]);
    }
    // A long flat chain is fine.
    let chain = vec!["index 0"; 5_000].join(" or ");
    let r = hiermd(
        &d.0,
        &[
            "import", "--top", "t.pdb", "--traj", "t.pdb", "--out", "ds", "--select", &chain,
        ],
        QUICK,
    );
    assert_eq!(r.code, Some(0), "{}", tail(&r.stderr));
    assert!(r.stdout.contains("of 1 atoms"), "{}", r.stdout);
}

/// A run configuration with `overrides` (dotted keys), validated.
fn config(overrides: &[(&str, &str)]) -> anyhow::Result<RunConfig> {
    let mut o: Vec<(String, String)> = vec![
        ("data.dataset".into(), "\"ds\"".into()),
        ("data.lag".into(), "1".into()),
    ];
    o.extend(
        overrides
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    RunConfig::from_toml_with("", &o)
}

#[test]
fn impossible_sizes_are_clean_errors() {
    let d = Dir::new("sizes");
    // `--outputs 100000` once aborted with "memory allocation of 80000000000 bytes failed".
    let r = hiermd(
        &d.0,
        &[
            "--device",
            "cpu",
            "train",
            "--run",
            "run",
            "--data",
            "nodata",
            "--lag",
            "1",
            "--outputs",
            "100000",
        ],
        QUICK,
    );
    refused(
        &r,
        &[
            "objective.outputs = 100000",
            "80.0 GB",
            "at most 4096 outputs",
        ],
    );
    assert!(!r.stderr.contains("memory allocation"), "{}", r.stderr);
    let r = hiermd(
        &d.0,
        &[
            "--device",
            "cpu",
            "train",
            "--run",
            "run",
            "--data",
            "nodata",
            "--lag",
            "1",
            "--batch",
            "100000000",
        ],
        QUICK,
    );
    refused(&r, &["train.batch = 100000000", "at most 1048576"]);
    // Every size field, named in its error; the defaults and sane values pass.
    assert!(config(&[]).is_ok());
    assert!(config(&[("objective.outputs", "4096"), ("train.batch", "4096")]).is_ok());
    for (key, value, needle) in [
        ("objective.outputs", "100000", "objective.outputs = 100000"),
        (
            "train.eval_batch",
            "10000000",
            "train.eval_batch = 10000000",
        ),
        ("model.window", "100000", "model.window = 100000"),
        ("model.hidden", "65536", "model.hidden = 65536"),
        ("model.heads", "100000", "model.heads = 100000"),
        ("model.ffn_hidden", "1000000", "model.ffn_hidden = 1000000"),
        ("model.blocks", "100000", "model.blocks = 100000"),
        (
            "atom.backbone.layers",
            "1000000000",
            "atom.backbone.layers = 1000000000",
        ),
    ] {
        let e = format!("{:#}", config(&[(key, value)]).unwrap_err());
        assert!(e.contains(needle), "{key}: {e}");
    }
    // Sizes that pass one by one but not together: the parameter memory names them.
    let e = format!(
        "{:#}",
        config(&[("model.hidden", "8192"), ("model.blocks", "64")]).unwrap_err()
    );
    assert!(e.contains("[model] (hidden = 8192, blocks = 64"), "{e}");
    assert!(
        e.contains("with their gradients and optimiser state"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        config(&[
            ("objective.kind", "\"spib\""),
            ("objective.spib.states", "100000")
        ])
        .unwrap_err()
    );
    assert!(e.contains("objective.spib.states = 100000"), "{e}");
}

#[test]
fn implausible_headers_are_refused_or_warned() {
    let d = Dir::new("headers");
    let n = 12;
    d.write("top.pdb", pdb(n, 1).as_bytes());
    let frames: Vec<XtcFrame> = (0..3)
        .map(|k| XtcFrame {
            step: k,
            time: 0.0,
            box_nm: [3.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 3.0],
            coords_nm: pseudo_random(3 * n, 11 + k as u64, 0.0, 2.0),
        })
        .collect();
    // Every frame at t = 0: no time step (rather than 0 ps), with a warning naming the frame.
    d.write("zero.xtc", &xtc_bytes(&frames, 1000.0, false));
    let r = hiermd(
        &d.0,
        &[
            "import", "--top", "top.pdb", "--traj", "zero.xtc", "--out", "ds0", "--select", "all",
        ],
        QUICK,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("zero.xtc: frame 1: time 0 ps after frame 0 at 0 ps is a time step of 0 ps, which is not plausible"),
        "{}",
        r.stderr
    );
    let ds = Dataset::open(&d.join("ds0")).unwrap();
    assert_eq!(ds.manifest.time_step_ps, None);
    // Going back in time, likewise.
    let mut back = frames.clone();
    for (k, f) in back.iter_mut().enumerate() {
        f.time = -(k as f32);
    }
    d.write("back.xtc", &xtc_bytes(&back, 1000.0, false));
    let r = hiermd(
        &d.0,
        &[
            "import", "--top", "top.pdb", "--traj", "back.xtc", "--out", "ds1", "--select", "all",
        ],
        QUICK,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("time step of -1 ps, which is not plausible"),
        "{}",
        r.stderr
    );
    // --dt of 0, -1, NaN or inf: refused.
    for dt in ["--dt=0", "--dt=-1", "--dt=NaN", "--dt=inf"] {
        let r = hiermd(
            &d.0,
            &[
                "import", "--top", "top.pdb", "--traj", "zero.xtc", "--out", "ds2", dt,
            ],
            QUICK,
        );
        refused(&r, &["--dt"]);
        assert!(!d.join("ds2").exists(), "{dt}");
    }
    // XTC precision 1e30 (every coordinate 0.000): an error naming the file and the frame.
    let mut good: Vec<XtcFrame> = frames.clone();
    for (k, f) in good.iter_mut().enumerate() {
        f.time = k as f32;
    }
    let mut b = xtc_bytes(&good, 1000.0, false);
    b[56..60].copy_from_slice(&1e30f32.to_be_bytes());
    d.write("prec.xtc", &b);
    let r = hiermd(
        &d.0,
        &[
            "import", "--top", "top.pdb", "--traj", "prec.xtc", "--out", "ds3", "--select", "all",
        ],
        QUICK,
    );
    refused(
        &r,
        &["prec.xtc: frame 0: implausible compression precision 1e30"],
    );
    // A CHARMM DCD without its version flag: DELTA read as f64 gives ~1e-322 ps; a warning, no
    // times.
    let spec = DcdSpec::default();
    let dcd_frames: Vec<DcdFrame> = (0..3)
        .map(|k| DcdFrame {
            coords: pseudo_random(3 * n, 30 + k, 0.0, 20.0),
            cell: [0.0; 6],
        })
        .collect();
    let mut dcd = dcd_bytes(&spec, n, &dcd_frames);
    dcd[8 + 4 * 19..8 + 4 * 20].copy_from_slice(&0i32.to_le_bytes());
    d.write("xplor.dcd", &dcd);
    let r = hiermd(
        &d.0,
        &[
            "import",
            "--top",
            "top.pdb",
            "--traj",
            "xplor.dcd",
            "--out",
            "ds4",
            "--select",
            "all",
        ],
        QUICK,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("xplor.dcd: frame 0: the header's time step")
            && r.stderr
                .contains("is not plausible; the header has no CHARMM version flag"),
        "{}",
        r.stderr
    );
    let ds = Dataset::open(&d.join("ds4")).unwrap();
    assert_eq!(ds.manifest.time_step_ps, None);
    // Issue 22: a CHARMM DCD's DELTA is in AKMA units (1 AKMA = 0.04888821 ps, as MDAnalysis),
    // said so in `info`; ISTART 20 with NSAVC 10 puts frame 0 at frame offset 2. `--dt` sets
    // the step and keeps that offset: frame 0 at 2 dt, not at the file's own first time.
    let spec = DcdSpec {
        charmm: true,
        istart: 20,
        nsavc: 10,
        delta: 2.0,
        ..DcdSpec::default()
    };
    d.write("akma.dcd", &dcd_bytes(&spec, n, &dcd_frames));
    let import = |out: &str, extra: &[&str]| {
        let mut a = vec![
            "import", "--top", "top.pdb", "--traj", "akma.dcd", "--out", out, "--select", "all",
        ];
        a.extend_from_slice(extra);
        let r = hiermd(&d.0, &a, QUICK);
        assert_eq!(r.code, Some(0), "{}", r.stderr);
        Dataset::open(&d.join(out)).unwrap()
    };
    let akma_ps = 0.04888821;
    let ds = import("ds6", &[]);
    let t = &ds.manifest.trajectories[0];
    let step = 2.0 * 10.0 * akma_ps;
    assert!(
        (t.time_step_ps.unwrap() - step).abs() < 1e-6 * step,
        "{t:?}"
    );
    assert!(
        (t.first_time_ps.unwrap() - 2.0 * step).abs() < 1e-6 * step,
        "{t:?}"
    );
    let src = t.time_source.as_deref().unwrap_or_default();
    assert!(
        src.contains("DELTA 2 AKMA x NSAVC 10") && src.contains("ISTART 20"),
        "{src}"
    );
    let info = hiermd(&d.0, &["info", "ds6"], QUICK);
    assert!(info.stdout.contains("AKMA"), "{}", info.stdout);
    let ds = import("ds7", &["--dt", "5"]);
    let t = &ds.manifest.trajectories[0];
    assert_eq!(t.time_step_ps, Some(5.0));
    assert_eq!(
        t.first_time_ps,
        Some(10.0),
        "frame offset 2 at 5 ps a frame"
    );
    assert!(
        t.time_source
            .as_deref()
            .unwrap_or_default()
            .starts_with("--dt 5 ps (the file said"),
        "{t:?}"
    );
    // A PSF mass of "abc": an error naming the line, the atom and the field.
    d.write(
        "abc.psf",
        b"PSF\n\n 1 !NTITLE\n* t\n\n 2 !NATOM\n       1 A    1    ALA  N    NH1   -0.470000       14.0070           0\n       2 A    1    ALA  CA   CT1    0.070000           abc           0\n",
    );
    let r = hiermd(
        &d.0,
        &[
            "import",
            "--top",
            "abc.psf",
            "--traj",
            "xplor.dcd",
            "--out",
            "ds5",
        ],
        QUICK,
    );
    refused(
        &r,
        &["abc.psf:8: atom 2: mass \"abc\" is not a finite number"],
    );
}

/// A file of `datasets/interop/`.
fn interop(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("datasets/interop")
        .join(name)
}

#[test]
fn unknown_elements_import_and_the_atom_stage_refuses_them() {
    let d = Dir::new("interop");
    let tip4p = interop("tip4p_water.pdb");
    let tip4p = tip4p.to_str().unwrap();
    // TIP4P virtual sites once made `all`, `water` and `resname SOL` fail ("unknown element").
    for (sel, atoms) in [("all", 14), ("water", 8), ("resname SOL", 8), ("heavy", 7)] {
        let r = hiermd(
            &d.0,
            &[
                "import", "--top", tip4p, "--traj", tip4p, "--out", "ds", "--select", sel,
                "--force",
            ],
            QUICK,
        );
        assert_eq!(r.code, Some(0), "{sel}: {}", r.stderr);
        assert!(
            r.stdout
                .contains(&format!("imported 2 frames of {atoms} atoms")),
            "{sel}: {}",
            r.stdout
        );
        // Stored virtual sites are announced.
        assert_eq!(
            r.stderr.contains("2 stored atoms have no element"),
            sel != "heavy",
            "{sel}: {}",
            r.stderr
        );
    }
    // The box of each model follows its ENDMDL; segids come from the chains.
    let r = hiermd(
        &d.0,
        &[
            "import", "--top", tip4p, "--traj", tip4p, "--out", "dsall", "--select", "all",
        ],
        QUICK,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let ds = Dataset::open(&d.join("dsall")).unwrap();
    let mw: Vec<usize> = (0..ds.natoms())
        .filter(|&a| ds.atoms[a].atomic_number == 0)
        .collect();
    assert_eq!(mw, [9, 13]);
    assert!(mw.iter().all(|&a| ds.atoms[a].element == "X"));
    // The atom stage refuses them, naming them and the way out.
    let e = format!("{:#}", AtomInputs::new(&ds, &Device::Cpu).err().unwrap());
    assert!(
        e.contains(
            "atom 9 (MW of residue SOL 2), atom 13 (MW of residue SOL 3) have atomic number 0"
        ),
        "{e}"
    );
    assert!(e.contains("data.selection = \"not element X\""), "{e}");
    // Dropped through the token map, they pass; merged into a token, they do not.
    let z = [8u8, 1, 1, 0];
    let ok = AtomInputs::from_parts(&z, &[0, 0, 0, EXCLUDED], 1, &[None], &Device::Cpu);
    assert!(ok.is_ok(), "{:#}", ok.err().unwrap());
    let e = AtomInputs::from_parts(&z, &[0, 0, 0, 0], 1, &[None], &Device::Cpu)
        .err()
        .unwrap();
    assert!(
        format!("{e:#}").contains("atom 3 has atomic number 0"),
        "{e:#}"
    );

    // TIP5P lone pairs from a GRO file; GRO has no chain, and MDAnalysis's placeholder segid
    // SYSTEM does not become one.
    let tip5p = interop("tip5p_water.gro");
    d.write("t15.pdb", pdb(15, 1).as_bytes());
    let r = hiermd(
        &d.0,
        &[
            "import",
            "--top",
            tip5p.to_str().unwrap(),
            "--traj",
            "t15.pdb",
            "--out",
            "ds5p",
            "--select",
            "all",
        ],
        QUICK,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stderr.contains("6 stored atoms have no element"),
        "{}",
        r.stderr
    );
    let ds = Dataset::open(&d.join("ds5p")).unwrap();
    assert!(ds.atoms.iter().all(|a| a.chain.is_empty()));

    // Coarse-grained beads (element X) import with `all`, from a gzipped PDB trajectory;
    // `heavy` (the default) finds none and says why.
    let cg = interop("martini.pdb");
    let cg_gz = interop("martini.pdb.gz");
    let r = hiermd(
        &d.0,
        &[
            "import",
            "--top",
            cg.to_str().unwrap(),
            "--traj",
            cg_gz.to_str().unwrap(),
            "--out",
            "cg",
            "--select",
            "all",
        ],
        QUICK,
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(
        r.stdout.contains("imported 2 frames of 17 atoms"),
        "{}",
        r.stdout
    );
    let r = hiermd(
        &d.0,
        &[
            "import",
            "--top",
            cg.to_str().unwrap(),
            "--traj",
            cg_gz.to_str().unwrap(),
            "--out",
            "cg2",
        ],
        QUICK,
    );
    refused(
        &r,
        &[
            "selects no atom",
            "17 of them have no element",
            "`all` keeps",
        ],
    );
}
