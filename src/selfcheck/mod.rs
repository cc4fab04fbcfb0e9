//! `hiermd selfcheck`: the device check. Every kernel family, forward and backward and every
//! path (dtypes, head widths, masks, boxes), runs on the chosen device and is compared with the
//! f64 CPU twin under the tolerances the tests use; then a short end-to-end check trains the token
//! model and an atom + token model for ten steps on the device and on cpu from the same seed.
//!
//! Each family runs in its own child process (`hiermd selfcheck --family NAME --child`), so a
//! CUDA fault, which poisons the context for good, is reported under that family with the
//! kernel's name and the other families still run. Each check prints one line (name, max error,
//! tolerance, time); all of them land in a JSON report with the kernels each family launched, and
//! the report lists every exported kernel that no check launched. The exit status is non-zero
//! when any check fails or any kernel was left out.
//!
//! On `cpu` the same checks compare the f32 CPU path with the f64 twins; on `emu` they run the
//! CUDA source on the host, which is how CI keeps this honest.

mod atoms;
mod attention;
mod elementwise;
mod equivariant;
mod gather;
mod gemm;
mod geometry;
mod training;

use crate::testing::Rng;
use crate::{Device, DeviceSpec};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A family of checks: usually one `cuda/*.cu` module, forward and backward.
pub struct Family {
    /// Its name (the module's file stem where it is one).
    pub name: &'static str,
    /// The PTX modules whose kernels it is expected to launch.
    pub modules: &'static [&'static str],
    /// Runs its checks.
    pub run: fn(&mut Ctx) -> Result<()>,
}

/// Every family, cheapest first so that a short lease still gets the broad picture.
pub const FAMILIES: &[Family] = &[
    Family {
        name: "elementwise",
        modules: &["elementwise"],
        run: elementwise::elementwise,
    },
    Family {
        name: "reduce",
        modules: &["reduce"],
        run: elementwise::reduce,
    },
    Family {
        name: "softmax",
        modules: &["softmax"],
        run: elementwise::softmax,
    },
    Family {
        name: "dropout",
        modules: &["dropout"],
        run: elementwise::dropout,
    },
    Family {
        name: "optim",
        modules: &["optim"],
        run: elementwise::optim,
    },
    Family {
        name: "scatter",
        modules: &["scatter"],
        run: gather::scatter,
    },
    Family {
        name: "tokens",
        modules: &["tokens"],
        run: gather::tokens,
    },
    Family {
        name: "equivariant",
        modules: &["equivariant"],
        run: equivariant::equivariant,
    },
    Family {
        name: "graph_conv",
        modules: &["graph_conv"],
        run: geometry::graph_conv,
    },
    Family {
        name: "neighbor_list",
        modules: &["neighbor_list"],
        run: geometry::neighbor_list,
    },
    Family {
        name: "gemm",
        modules: &["gemm"],
        run: gemm::gemm,
    },
    Family {
        name: "eqsdpa",
        modules: &["eqsdpa"],
        run: attention::eqsdpa,
    },
    Family {
        name: "painn",
        modules: &["painn"],
        run: atoms::painn,
    },
    Family {
        name: "torchmd_et",
        modules: &["torchmd_et"],
        run: atoms::torchmd_et,
    },
    Family {
        name: "training",
        modules: &[],
        run: training::training,
    },
];

/// Absolute and relative tolerance: a value passes when |got - want| <= abs + rel |want|.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Tol {
    /// Absolute part.
    pub abs: f64,
    /// Relative part.
    pub rel: f64,
}

impl Tol {
    /// Absolute only.
    pub fn abs(abs: f64) -> Self {
        Self { abs, rel: 0.0 }
    }
    /// Absolute and relative.
    pub fn new(abs: f64, rel: f64) -> Self {
        Self { abs, rel }
    }
}

/// The result of one check.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outcome {
    /// What was compared, e.g. `silu_backward` or `eqsdpa bf16 dh 32 masked dq`.
    pub name: String,
    /// Largest |got - want| over the outputs.
    #[serde(deserialize_with = "null_is_infinite")]
    pub max_err: f64,
    /// The tolerance at the element where got - want came closest to its bound.
    #[serde(deserialize_with = "null_is_infinite")]
    pub tol: f64,
    /// max over elements of |got - want| / (abs + rel |want|): at most 1 passes.
    #[serde(deserialize_with = "null_is_infinite")]
    pub worst_ratio: f64,
    /// Passed.
    pub ok: bool,
    /// Seconds the device part took (including a synchronisation).
    pub seconds: f64,
    /// Anything else worth saying (the failing index, sizes, the error).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// JSON has no infinity or NaN (serde_json writes them as null): a null error reads back as an
/// infinite one, which fails like the NaN or infinity it was.
fn null_is_infinite<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
}

impl Outcome {
    fn line(&self) -> String {
        format!(
            "{} {:<58} max err {:>9.2e}  tol {:>9.2e}  {:>8.1} ms{}",
            if self.ok { "ok  " } else { "FAIL" },
            self.name,
            self.max_err,
            self.tol,
            self.seconds * 1e3,
            if self.detail.is_empty() {
                String::new()
            } else {
                format!("  ({})", self.detail)
            }
        )
    }
}

/// Compares `got` with `want` element by element.
pub fn compare(name: impl Into<String>, got: &[f64], want: &[f64], tol: Tol) -> Outcome {
    compare_each(name, got, want, tol, &[])
}

/// Compares `got` with `want` element by element, element `i` allowed `extra[i]` beyond `tol`
/// (a bound that follows the element's own numerics; `extra` empty: none).
pub fn compare_each(
    name: impl Into<String>,
    got: &[f64],
    want: &[f64],
    tol: Tol,
    extra: &[f64],
) -> Outcome {
    let mut o = Outcome {
        name: name.into(),
        max_err: 0.0,
        tol: tol.abs,
        worst_ratio: 0.0,
        ok: true,
        seconds: 0.0,
        detail: String::new(),
    };
    if got.len() != want.len() {
        o.ok = false;
        o.max_err = f64::INFINITY;
        o.worst_ratio = f64::INFINITY;
        o.detail = format!("{} values, the reference has {}", got.len(), want.len());
        return o;
    }
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let bound = tol.abs + tol.rel * w.abs() + extra.get(i).copied().unwrap_or(0.0);
        // NaN compares false everywhere: count it as a failure explicitly.
        let ratio = if err.is_nan() || !w.is_finite() && g != w {
            f64::INFINITY
        } else if bound > 0.0 {
            err / bound
        } else if err == 0.0 {
            0.0
        } else {
            f64::INFINITY
        };
        if err > o.max_err || err.is_nan() {
            o.max_err = if err.is_nan() { f64::NAN } else { err };
        }
        if ratio > o.worst_ratio || ratio.is_nan() {
            o.worst_ratio = ratio;
            o.tol = bound;
            if ratio > 1.0 {
                o.detail = format!("worst at index {i}: got {g:.7e}, want {w:.7e}");
            }
        }
    }
    o.ok = o.worst_ratio <= 1.0;
    if o.ok {
        o.detail.clear();
    }
    o
}

/// What a family's checks see: the device, a seeded generator, the size setting, and the outcomes
/// so far.
pub struct Ctx {
    /// The device under check.
    pub dev: Device,
    /// Fresh random inputs, from the run's seed and the family's name.
    pub rng: Rng,
    /// Smaller shapes (the emu dry run, CI).
    pub quick: bool,
    outcomes: Vec<Outcome>,
    echo: bool,
}

impl Ctx {
    /// A context for one family.
    pub fn new(dev: Device, seed: u64, family: &str, quick: bool) -> Self {
        Self {
            dev,
            rng: Rng::for_name(seed, family),
            quick,
            outcomes: Vec::new(),
            echo: true,
        }
    }

    /// Runs `f` on the device, waits for it, and returns its result and the seconds it took.
    pub fn timed<T>(&self, f: impl FnOnce(&Device) -> Result<T>) -> Result<(T, f64)> {
        let t = Instant::now();
        let v = f(&self.dev)?;
        self.dev.synchronize()?;
        Ok((v, t.elapsed().as_secs_f64()))
    }

    /// Compares device results (f32 or anything that widens to f64) with the f64 reference and
    /// records the outcome.
    pub fn compare<T: Copy + Into<f64>>(
        &mut self,
        name: impl Into<String>,
        got: &[T],
        want: &[f64],
        tol: Tol,
        seconds: f64,
    ) -> bool {
        let got: Vec<f64> = got.iter().map(|&v| v.into()).collect();
        let mut o = compare(name, &got, want, tol);
        o.seconds = seconds;
        self.push(o)
    }

    /// As [`compare`](Self::compare), element `i` allowed `extra[i]` beyond `tol`.
    pub fn compare_each<T: Copy + Into<f64>>(
        &mut self,
        name: impl Into<String>,
        got: &[T],
        want: &[f64],
        tol: Tol,
        extra: &[f64],
        seconds: f64,
    ) -> bool {
        let got: Vec<f64> = got.iter().map(|&v| v.into()).collect();
        let mut o = compare_each(name, &got, want, tol, extra);
        o.seconds = seconds;
        self.push(o)
    }

    /// Records an exact comparison (integer outputs, bit-identical reruns).
    pub fn exact<T: PartialEq + std::fmt::Debug>(
        &mut self,
        name: impl Into<String>,
        got: &[T],
        want: &[T],
        seconds: f64,
    ) -> bool {
        let bad = if got.len() != want.len() {
            Some(format!(
                "{} values, the reference has {}",
                got.len(),
                want.len()
            ))
        } else {
            got.iter()
                .zip(want)
                .position(|(g, w)| g != w)
                .map(|i| format!("first difference at {i}: {:?} vs {:?}", got[i], want[i]))
        };
        self.push(Outcome {
            name: name.into(),
            max_err: if bad.is_some() { f64::INFINITY } else { 0.0 },
            tol: 0.0,
            worst_ratio: if bad.is_some() { f64::INFINITY } else { 0.0 },
            ok: bad.is_none(),
            seconds,
            detail: bad.unwrap_or_default(),
        })
    }

    /// Records a yes/no check with a sentence saying what was seen.
    pub fn truth(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) -> bool {
        self.push(Outcome {
            name: name.into(),
            max_err: if ok { 0.0 } else { f64::INFINITY },
            tol: 0.0,
            worst_ratio: if ok { 0.0 } else { f64::INFINITY },
            ok,
            seconds: 0.0,
            detail: if ok { String::new() } else { detail.into() },
        })
    }

    /// Records an outcome made elsewhere; returns whether it passed.
    pub fn push(&mut self, o: Outcome) -> bool {
        if self.echo {
            eprintln!("  {}", o.line());
        }
        let ok = o.ok;
        self.outcomes.push(o);
        ok
    }
}

/// One family's report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FamilyReport {
    /// The family.
    pub family: String,
    /// Every check passed and the family finished.
    pub ok: bool,
    /// Seconds, start to end (a child's start-up included).
    pub seconds: f64,
    /// The checks.
    pub checks: Vec<Outcome>,
    /// `module/kernel` names launched (cuda and emu).
    pub kernels: Vec<String>,
    /// Why the family stopped early, if it did (an error, a fault, a time-out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The whole report, as written by `--json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The device checked.
    pub device: String,
    /// The seed of the inputs (`--seed` replays them).
    pub seed: u64,
    /// Quick shapes.
    pub quick: bool,
    /// Every family and every check passed, and no exported kernel was left out.
    pub ok: bool,
    /// Per family.
    pub families: Vec<FamilyReport>,
    /// Exported kernels (not test-only) that no family launched (empty on cpu, where no kernel
    /// runs: `kernels_not_applicable` says so).
    pub kernels_missing: Vec<String>,
    /// True on cpu: the CPU twins ran, no kernels.
    pub kernels_not_applicable: bool,
    /// How many exported kernels (not test-only) there are.
    pub kernels_total: usize,
    /// Seconds in all.
    pub seconds: f64,
}

/// `hiermd selfcheck`'s options.
#[derive(Clone, Debug)]
pub struct Options {
    /// The device to check.
    pub device: DeviceSpec,
    /// Families to run (all when empty).
    pub families: Vec<String>,
    /// Smaller shapes.
    pub quick: bool,
    /// Input seed (a clock seed when None; printed).
    pub seed: Option<u64>,
    /// Write the report here.
    pub json: Option<PathBuf>,
    /// Run the families in this process instead of one child each (faster; a fault then ends
    /// the run).
    pub in_process: bool,
    /// A child's time limit in seconds.
    pub family_timeout_s: u64,
}

/// Runs one family in this process and returns its report.
pub fn run_family(family: &Family, dev: &Device, seed: u64, quick: bool) -> FamilyReport {
    let start = Instant::now();
    crate::launch::record_launches(true);
    let mut ctx = Ctx::new(dev.clone(), seed, family.name, quick);
    let result = (family.run)(&mut ctx).and_then(|()| dev.synchronize());
    let kernels = crate::launch::launched()
        .into_iter()
        .map(|(m, k)| format!("{m}/{k}"))
        .collect();
    crate::launch::record_launches(false);
    let error = result.err().map(|e| {
        let mut s = format!("{e:#}");
        if let Some(k) = crate::launch::last_launched() {
            if !s.contains(k) {
                s.push_str(&format!(" (last kernel launched: {k})"));
            }
        }
        s
    });
    if let Some(e) = &error {
        eprintln!("  FAIL {}: {e}", family.name);
    }
    let checks = ctx.outcomes;
    FamilyReport {
        family: family.name.into(),
        ok: error.is_none() && !checks.is_empty() && checks.iter().all(|c| c.ok),
        seconds: start.elapsed().as_secs_f64(),
        checks,
        kernels,
        error,
    }
}

/// The marker before the child's one JSON line on stdout.
const CHILD_MARK: &str = "HIERMD-SELFCHECK-FAMILY ";

/// The child's side: runs one family and prints its report as one marked JSON line.
pub fn child(opts: &Options) -> Result<()> {
    let [name] = opts.families.as_slice() else {
        bail!("selfcheck --child runs exactly one --family");
    };
    let family = find(name)?;
    let seed = opts.seed.context("selfcheck --child needs --seed")?;
    let report = match Device::open(opts.device) {
        Ok(dev) => run_family(family, &dev, seed, opts.quick),
        Err(e) => FamilyReport {
            family: family.name.into(),
            ok: false,
            seconds: 0.0,
            checks: Vec::new(),
            kernels: Vec::new(),
            error: Some(format!("opening the device: {e:#}")),
        },
    };
    println!("{CHILD_MARK}{}", serde_json::to_string(&report)?);
    Ok(())
}

fn find(name: &str) -> Result<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name).ok_or_else(|| {
        anyhow!(
            "no selfcheck family {name:?}; the families are {}",
            FAMILIES
                .iter()
                .map(|f| f.name)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// Runs family `name` in a child process of this executable, with a time limit.
/// `device` is the opened device's name, so a parent run with `--device auto` gives its
/// children the device it chose rather than letting each choose again.
fn run_child(family: &Family, opts: &Options, device: &str, seed: u64) -> FamilyReport {
    let start = Instant::now();
    let fail = |error: String, checks: Vec<Outcome>| FamilyReport {
        family: family.name.into(),
        ok: false,
        seconds: start.elapsed().as_secs_f64(),
        checks,
        kernels: Vec::new(),
        error: Some(error),
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fail(format!("cannot find this executable: {e}"), Vec::new()),
    };
    let mut cmd = Command::new(exe);
    cmd.arg("--device")
        .arg(device)
        .args(["selfcheck", "--child", "--family", family.name])
        .arg("--seed")
        .arg(seed.to_string());
    if opts.quick {
        cmd.arg("--quick");
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot start the child process: {e}"), Vec::new()),
    };
    // Stream the child's lines (its checks) through our stderr as they come, and keep the
    // last ones for a crash report.
    let stderr = child.stderr.take().expect("piped");
    let echo = std::thread::spawn(move || {
        let mut tail: Vec<String> = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            eprintln!("{line}");
            tail.push(line);
            if tail.len() > 40 {
                tail.remove(0);
            }
        }
        tail
    });
    let mut stdout = child.stdout.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let limit = Duration::from_secs(opts.family_timeout_s);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "timed out after {} s (last kernel: see the lines above)",
                    opts.family_timeout_s
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(format!("waiting for the child: {e}")),
        }
    };
    let out = out.join().unwrap_or_default();
    let tail = echo.join().unwrap_or_default();
    let report = out
        .lines()
        .find_map(|l| l.strip_prefix(CHILD_MARK))
        .and_then(|j| serde_json::from_str::<FamilyReport>(j).ok());
    match (status, report) {
        (Ok(_), Some(mut r)) => {
            r.seconds = start.elapsed().as_secs_f64();
            r
        }
        (Ok(s), None) => fail(
            format!(
                "the child process ended ({s}) without a report; its last lines:\n{}",
                tail.join("\n")
            ),
            Vec::new(),
        ),
        (Err(e), _) => fail(
            format!("{e}; its last lines:\n{}", tail.join("\n")),
            Vec::new(),
        ),
    }
}

/// Every exported kernel that is not test-only, as `module/kernel`.
pub fn exported_kernels() -> Vec<String> {
    crate::kernels::ALL
        .iter()
        .filter(|(m, _)| !m.test_only)
        .flat_map(|(m, ks)| ks.iter().map(move |k| format!("{}/{}", m.name, k.name)))
        .collect()
}

/// `hiermd selfcheck`: runs the families (each in a child process unless `in_process`), prints a
/// line per check and a summary, writes the JSON report, and fails when anything failed.
pub fn run(opts: &Options) -> Result<Report> {
    let start = Instant::now();
    let seed = opts.seed.unwrap_or_else(crate::testing::clock_seed);
    let families: Vec<&Family> = if opts.families.is_empty() {
        FAMILIES.iter().collect()
    } else {
        opts.families
            .iter()
            .map(|n| find(n))
            .collect::<Result<_>>()?
    };
    // Open once here: a device that cannot be opened is one clear error, not one per family.
    // The children open their own; the parent keeps its handle only to run families in
    // process (a second CUDA context would hold GPU memory for nothing, and a GPU in
    // exclusive-process mode would refuse the children).
    let dev = Device::open(opts.device)?;
    let resolved = dev.name();
    // Kernel coverage is judged on the device actually opened (`auto` may mean cpu).
    let cpu = matches!(dev, Device::Cpu);
    let device = match &dev {
        Device::Cuda(d) => format!("{} ({})", dev.name(), d.info().name),
        _ => dev.name(),
    };
    let dev = opts.in_process.then_some(dev);
    eprintln!(
        "selfcheck on {device}: {} families, seed {seed} (--seed {seed} replays the inputs){}",
        families.len(),
        if opts.quick { ", quick shapes" } else { "" }
    );
    let mut reports = Vec::new();
    for f in &families {
        eprintln!("{}:", f.name);
        let r = if let Some(dev) = &dev {
            run_family(f, dev, seed, opts.quick)
        } else {
            run_child(f, opts, &resolved, seed)
        };
        if let Some(e) = &r.error {
            if !opts.in_process {
                eprintln!("  FAIL {}: {e}", f.name);
            }
        }
        reports.push(r);
    }
    let launched: std::collections::BTreeSet<&str> = reports
        .iter()
        .flat_map(|r| r.kernels.iter().map(String::as_str))
        .collect();
    let all = exported_kernels();
    let wanted: std::collections::BTreeSet<&str> = families
        .iter()
        .flat_map(|f| f.modules.iter().copied())
        .collect();
    let kernels_missing: Vec<String> = if cpu {
        Vec::new()
    } else {
        all.iter()
            .filter(|k| wanted.contains(k.split('/').next().unwrap_or("")))
            .filter(|k| !launched.contains(k.as_str()))
            .cloned()
            .collect()
    };
    let report = Report {
        device,
        seed,
        quick: opts.quick,
        ok: reports.iter().all(|r| r.ok) && kernels_missing.is_empty(),
        kernels_missing,
        kernels_not_applicable: cpu,
        kernels_total: all.len(),
        families: reports,
        seconds: start.elapsed().as_secs_f64(),
    };
    print_summary(&report);
    if let Some(p) = &opts.json {
        crate::optim::write_atomic(p, serde_json::to_string_pretty(&report)?.as_bytes())
            .with_context(|| format!("writing the report {}", p.display()))?;
    }
    Ok(report)
}

fn print_summary(r: &Report) {
    // Kernels first: the table and the verdict are the last lines, where a reader of a log's
    // tail looks.
    if r.kernels_not_applicable {
        println!("kernels: none on cpu (the f32 CPU path was checked against the f64 twins)");
    } else {
        let ran: std::collections::BTreeSet<&String> =
            r.families.iter().flat_map(|f| f.kernels.iter()).collect();
        println!(
            "kernels: {} of {} exported kernels launched",
            ran.len(),
            r.kernels_total
        );
        let mut by_module: Vec<(&str, Vec<&str>)> = Vec::new();
        for k in &r.kernels_missing {
            let (m, name) = k.split_once('/').unwrap_or(("?", k));
            match by_module.last_mut() {
                Some((lm, v)) if *lm == m => v.push(name),
                _ => by_module.push((m, vec![name])),
            }
        }
        for (m, names) in by_module {
            println!("  not launched by any check in {m}: {}", names.join(", "));
        }
    }
    println!(
        "| family | checks | failed | closest to its tolerance | max err | tol | kernels | s |"
    );
    println!("|---|--:|--:|---|--:|--:|--:|--:|");
    for f in &r.families {
        // The check whose error came nearest its bound (or the first failure).
        let worst = f.checks.iter().fold(None::<&Outcome>, |w, c| match w {
            Some(w) if !(c.worst_ratio > w.worst_ratio || c.worst_ratio.is_nan()) => Some(w),
            _ => Some(c),
        });
        let (name, err, tol) = match worst {
            Some(c) => (c.name.as_str(), c.max_err, c.tol),
            None => ("-", f64::NAN, f64::NAN),
        };
        println!(
            "| {}{} | {} | {} | {} | {:.2e} | {:.2e} | {} | {:.1} |",
            f.family,
            if f.error.is_some() { " (stopped)" } else { "" },
            f.checks.len(),
            f.checks.iter().filter(|c| !c.ok).count(),
            name,
            err,
            tol,
            f.kernels.len(),
            f.seconds
        );
    }
    let checks: usize = r.families.iter().map(|f| f.checks.len()).sum();
    let failed: usize = r
        .families
        .iter()
        .map(|f| f.checks.iter().filter(|c| !c.ok).count() + f.error.is_some() as usize)
        .sum();
    println!(
        "selfcheck on {}: {} checks, {} failed, {:.1} s: {}",
        r.device,
        checks,
        failed,
        r.seconds,
        if r.ok { "PASS" } else { "FAIL" }
    );
}
