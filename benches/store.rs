//! Trajectory store benchmarks: import throughput against plainly reading the same files, and
//! lagged-batch sampling throughput for ADK heavy atoms at batch 1,000.
//! Run: `cargo bench --bench store` (fetches the ADK files with datasets/adk/fetch if needed).

use anyhow::{Context, Result};
use hiermd::store::{self, BatchLoader, ImportOptions, Lag, LaggedPairs, Split};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

fn adk_data() -> Result<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join("datasets/adk/fetch")).output()?;
    anyhow::ensure!(out.status.success(), "datasets/adk/fetch failed");
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// Seconds to read every file once in 1 MiB chunks (the floor any importer pays).
fn plain_read(files: &[PathBuf]) -> Result<(f64, u64)> {
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    for f in files {
        let mut r = std::fs::File::open(f)?;
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok((t.elapsed().as_secs_f64(), total))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn bench_import(
    label: &str,
    top: &Path,
    files: Vec<PathBuf>,
    selection: &str,
    tmp: &Path,
) -> Result<()> {
    let (mut tr, mut ti) = (Vec::new(), Vec::new());
    let mut bytes = 0;
    plain_read(&files)?; // warm the page cache for both
    for rep in 0..5 {
        let (s, b) = plain_read(&files)?;
        tr.push(s);
        bytes = b;
        let out = tmp.join(format!("import-{rep}"));
        let t = Instant::now();
        store::import(&ImportOptions {
            topology: top.to_path_buf(),
            trajectories: files.clone(),
            out: out.clone(),
            selection: selection.into(),
            token_map: None,
            time_step_ps: None,
            max_frames: None,
            force: true,
            progress: false,
        })?;
        ti.push(t.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&out)?;
    }
    let (r, i) = (median(tr), median(ti));
    let mb = bytes as f64 / 1e6;
    println!(
        "| import {label} | {mb:.1} | {:.0} | {:.0} | {:.2} |",
        mb / r,
        mb / i,
        r / i
    );
    Ok(())
}

fn main() -> Result<()> {
    let data = adk_data()?;
    let tmp = std::env::temp_dir().join(format!("hiermd-bench-store-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    println!("| benchmark | source MB | plain read MB/s | import MB/s | import / read |");
    println!("|---|--:|--:|--:|--:|");
    let dcds: Vec<PathBuf> = (0..10)
        .flat_map(|_| [data.join("adk_dims.dcd"), data.join("adk_dims2.dcd")])
        .collect();
    bench_import(
        "ADK DCD x20 (psf, heavy)",
        &data.join("adk.psf"),
        dcds,
        "heavy",
        &tmp,
    )?;
    let xtcs: Vec<PathBuf> = (0..5).map(|_| data.join("adk_oplsaa.xtc")).collect();
    bench_import(
        "ADK XTC x5 (gro, heavy incl. water O)",
        &data.join("adk_oplsaa.gro"),
        xtcs,
        "heavy",
        &tmp,
    )?;
    let trrs: Vec<PathBuf> = (0..3).map(|_| data.join("adk_oplsaa.trr")).collect();
    bench_import(
        "ADK TRR x3 (gro, protein and heavy)",
        &data.join("adk_oplsaa.gro"),
        trrs,
        "protein and heavy",
        &tmp,
    )?;

    // Lagged batches: ADK heavy atoms (1,656), batch 1,000, lag 1, over many epochs.
    let out = tmp.join("pairs");
    let files: Vec<PathBuf> = (0..10)
        .flat_map(|_| [data.join("adk_dims.dcd"), data.join("adk_dims2.dcd")])
        .collect();
    let (ds, _) = store::import(&ImportOptions {
        topology: data.join("adk.psf"),
        trajectories: files,
        out: out.clone(),
        selection: "heavy".into(),
        token_map: None,
        time_step_ps: Some(1.0),
        max_frames: None,
        force: true,
        progress: false,
    })
    .context("import for the sampling benchmark")?;
    let pairs = LaggedPairs::new(&ds, Lag::Frames(1), &Split::default())?;
    let natoms = ds.natoms();
    let ds = Arc::new(ds);
    let batch = 1000;
    let mut rates = Vec::new();
    for rep in 0..5 {
        let t = Instant::now();
        let mut n = 0usize;
        for b in BatchLoader::new(
            ds.clone(),
            pairs.train.clone(),
            batch,
            42,
            rep * 100..rep * 100 + 20,
            true,
            4,
        ) {
            n += b.pairs.len();
            std::hint::black_box(&b);
        }
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    let r = median(rates);
    let mb = r * (2 * natoms * 3 * 4) as f64 / 1e6;
    println!();
    println!("| lagged batches, ADK heavy atoms ({natoms}), batch {batch}, shuffled | {r:.0} pairs/s | {mb:.0} MB/s gathered |");
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}
