//! The paper's scaling curves: time and peak memory of one token-model training iteration vs the
//! number of residues (generated protein-like chains at real density, so the C-alpha graph of
//! the residue convolution has real neighbour counts) for windows w = 1, 2, 4, 8, with and
//! without the residue graph convolution. Every point runs in a fresh process (this binary's
//! `bench token`), so each peak is that point's alone and a point that runs out of memory or
//! time is recorded as such instead of ending the sweep.

use crate::plot::{category_color, LinePlot, Series};
use crate::Device;
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `hiermd bench scaling`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct ScalingArgs {
    /// Residue counts.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "200,400,800,1600,3200,5000"
    )]
    pub residues: Vec<usize>,
    /// Windows w.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub windows: Vec<usize>,
    /// Graph convolutions to run: none, cheap, gated (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "none,cheap")]
    pub graph_conv: Vec<String>,
    /// Time-lagged pairs per iteration.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Channels H.
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Heads.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4)]
    pub blocks: usize,
    /// Timed iterations per point (after one warm-up).
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// Seconds a point may take before it is stopped and recorded as timed out.
    #[arg(long, default_value_t = 600)]
    pub point_timeout: u64,
    /// Output folder: scaling.json and the plots.
    #[arg(long, default_value = "target/bench/scaling")]
    pub out: PathBuf,
}

/// Runs one point in a child process; the row, or a row saying why there is none.
fn point(a: &ScalingArgs, dev: &Device, r: usize, w: usize, g: &str) -> Result<Value> {
    let exe = std::env::current_exe().context("bench scaling: this executable's path")?;
    let mut cmd = Command::new(exe);
    cmd.args(["--device", &dev.name(), "bench", "token"])
        .args(["--residues", &r.to_string(), "--window", &w.to_string()])
        .args([
            "--batch",
            &a.batch.to_string(),
            "--hidden",
            &a.hidden.to_string(),
        ])
        .args([
            "--heads",
            &a.heads.to_string(),
            "--blocks",
            &a.blocks.to_string(),
        ])
        .args(["--warmup", "1", "--repeats", &a.repeats.to_string()]);
    if g != "none" {
        cmd.args(["--graph-conv", g]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("bench scaling: starting a point")?;
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if t0.elapsed() > Duration::from_secs(a.point_timeout) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = child.wait_with_output()?;
    let base = json!({"residues": r, "window": w, "graph_conv": g, "batch_pairs": a.batch});
    let mut row = match status {
        None => json!({"error": format!("timed out after {} s", a.point_timeout)}),
        Some(s) if !s.success() => {
            let err = String::from_utf8_lossy(&out.stderr);
            json!({"error": format!("exit {s}: {}", err.trim().lines().last().unwrap_or(""))})
        }
        Some(_) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let line = text.lines().last().unwrap_or("");
            serde_json::from_str(line)
                .with_context(|| format!("bench scaling: a point printed {line:?}"))?
        }
    };
    if let (Some(o), Some(b)) = (row.as_object_mut(), base.as_object()) {
        for (k, v) in b {
            o.entry(k.clone()).or_insert(v.clone());
        }
    }
    Ok(row)
}

/// `hiermd bench scaling`.
pub fn run(a: &ScalingArgs, dev: &Device) -> Result<()> {
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create", a.out.display()))?;
    let mut rows = Vec::new();
    let total = a.residues.len() * a.windows.len() * a.graph_conv.len();
    for g in &a.graph_conv {
        for &w in &a.windows {
            for &r in &a.residues {
                let row = point(a, dev, r, w, g)?;
                eprintln!(
                    "[{}/{total}] residues {r:>5} w {w} graph_conv {g:<5}: {}",
                    rows.len() + 1,
                    match row.get("error") {
                        Some(e) => format!("no result ({e})"),
                        None => format!(
                            "{:.3} s/iteration, peak +{:.0} MB",
                            row["median_s"].as_f64().unwrap_or(f64::NAN),
                            row["added_peak_mb"].as_f64().unwrap_or(f64::NAN)
                        ),
                    }
                );
                rows.push(row);
                // Written after every point: a long sweep stopped halfway keeps what it has.
                std::fs::write(
                    a.out.join("scaling.json"),
                    serde_json::to_string_pretty(&rows)?,
                )?;
            }
        }
    }
    plot(&rows, a, dev)?;
    eprintln!(
        "bench scaling: {} points in {}",
        rows.len(),
        a.out.display()
    );
    Ok(())
}

/// Time and memory vs residues, one colour per window, dashed with the graph convolution.
fn plot(rows: &[Value], a: &ScalingArgs, dev: &Device) -> Result<()> {
    let what = [
        ("median_s", "seconds per training iteration", "time"),
        (
            "added_peak_mb",
            "peak memory of an iteration (MB)",
            "memory",
        ),
    ];
    for (key, label, file) in what {
        let mut p = LinePlot::new()
            .title(format!(
                "hiermd on {}: token model H = {}, {} blocks, {} heads, {} pairs per iteration",
                dev.name(),
                a.hidden,
                a.blocks,
                a.heads,
                a.batch
            ))
            .x_label("residues")
            .y_label(label)
            .log_x(true)
            .log_y(true);
        for (gi, g) in a.graph_conv.iter().enumerate() {
            for (wi, &w) in a.windows.iter().enumerate() {
                let pts: Vec<(f64, f64)> = rows
                    .iter()
                    .filter(|r| r["window"] == w && r["graph_conv"] == g.as_str())
                    .filter_map(|r| Some((r["residues"].as_f64()?, r[key].as_f64()?)))
                    .collect();
                if pts.is_empty() {
                    continue;
                }
                let (x, y): (Vec<f64>, Vec<f64>) = pts.into_iter().unzip();
                let name = if g == "none" {
                    format!("w = {w}")
                } else {
                    format!("w = {w}, graph conv {g}")
                };
                let mut s = Series::new(name, &x, &y).color(category_color(wi));
                if gi > 0 {
                    s = s.dashed();
                }
                p = p.series(s);
            }
        }
        p.save_svg(a.out.join(format!("scaling_{file}.svg")))?;
    }
    Ok(())
}
