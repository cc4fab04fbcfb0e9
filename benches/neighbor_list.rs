//! Atom-stage neighbor list build (`NeighborList::build`): median wall time for 1k, 10k, 50k and
//! 100k atoms per frame at protein-like density (0.08 atoms / A^3, cutoff 5 A), open boundaries
//! (atoms in a ball) and an orthorhombic box, 1 and 16 frames; edges per second. Every build
//! starts from positions already on the device and ends with the list on the device (on cuda
//! that includes the allocations and the one wait for the edge count). cpu always, emu for 1k
//! atoms only (it runs every GPU thread as a fiber, for correctness not speed), cuda when a GPU
//! is present. Prints a markdown table and writes target/bench/neighbor_list.json.
//!
//! Run: `cargo bench --bench neighbor_list` (`HIERMD_BENCH_ATOMS=10000,50000` runs only those
//! sizes; `HIERMD_TEST_DEVICES` picks the devices, as for the tests).

use anyhow::Result;
use hiermd::ops::neighbor_list::NeighborList;
use hiermd::testing::{median_seconds, test_devices, Availability, Rng};
use hiermd::traj::UnitCell;
use hiermd::{Device, Tensor};

const DENSITY: f64 = 0.08;
const CUTOFF: f32 = 5.0;

struct Row {
    device: String,
    atoms: usize,
    frames: usize,
    boundary: &'static str,
    edges: usize,
    ms: f64,
}

/// `frames` frames of `atoms` atoms at DENSITY: uniform in a ball (open), or in the box.
fn positions(rng: &mut Rng, frames: usize, atoms: usize, cell: Option<&UnitCell>) -> Vec<f32> {
    let mut out = Vec::with_capacity(frames * atoms * 3);
    let radius = (atoms as f64 / DENSITY * 3.0 / (4.0 * std::f64::consts::PI)).cbrt();
    for _ in 0..frames * atoms {
        match cell {
            Some(c) => {
                for k in 0..3 {
                    out.push((rng.uniform() * c.vectors[k][k] as f64) as f32);
                }
            }
            None => loop {
                let p = [0, 1, 2].map(|_| rng.range(-radius, radius));
                if p.iter().map(|x| x * x).sum::<f64>() <= radius * radius {
                    out.extend(p.map(|x| x as f32));
                    break;
                }
            },
        }
    }
    out
}

fn main() -> Result<()> {
    let mut rows = Vec::new();
    let mut rng = Rng::new(7);
    let sizes: Vec<usize> = match std::env::var("HIERMD_BENCH_ATOMS") {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => vec![1_000, 10_000, 50_000, 100_000],
    };
    for (name, _, avail) in test_devices() {
        let Availability::Ready(dev) = avail else {
            println!("({name} not available: skipped)");
            continue;
        };
        let emu = matches!(dev, Device::Emu(_));
        for &atoms in &sizes {
            if emu && atoms > 1_000 {
                continue;
            }
            for frames in [1usize, 16] {
                for periodic in [false, true] {
                    let side = (atoms as f64 / DENSITY).cbrt();
                    let cell = periodic
                        .then(|| UnitCell::from_lengths_angles(side, side, side, 90.0, 90.0, 90.0));
                    let pos = positions(&mut rng, frames, atoms, cell.as_ref());
                    let x = Tensor::from_slice(&dev, &[frames, atoms, 3], &pos)?;
                    let cells = cell.map(|c| vec![c; frames]);
                    let mut edges = 0;
                    let work = frames * atoms;
                    // Fewer repeats for the big batches keep the whole run near 2 minutes.
                    let reps = match work {
                        _ if emu => 3,
                        w if w >= 1_000_000 => 1,
                        w if w >= 200_000 => 3,
                        _ => 7,
                    };
                    let s = median_seconds(&dev, 1, reps, || {
                        let nl = NeighborList::build(&x, CUTOFF, cells.as_deref(), None)?;
                        edges = nl.edges();
                        Ok(())
                    })?;
                    let row = Row {
                        device: dev.name(),
                        atoms,
                        frames,
                        boundary: if periodic { "orthorhombic" } else { "open" },
                        edges,
                        ms: s * 1e3,
                    };
                    eprintln!(
                        "{} {} atoms x {} frames {}: {:.2} ms",
                        row.device, atoms, frames, row.boundary, row.ms
                    );
                    rows.push(row);
                }
            }
        }
    }
    println!("\nNeighbor list build, cutoff {CUTOFF} A, {DENSITY} atoms/A^3 (median wall time)\n");
    println!(
        "| device | atoms/frame | frames | boundary | edges | build ms | Medges/s | Matoms/s |"
    );
    println!("|---|--:|--:|---|--:|--:|--:|--:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {:.2} | {:.1} | {:.2} |",
            r.device,
            r.atoms,
            r.frames,
            r.boundary,
            r.edges,
            r.ms,
            r.edges as f64 / r.ms / 1e3,
            (r.atoms * r.frames) as f64 / r.ms / 1e3
        );
    }
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "device": r.device, "atoms_per_frame": r.atoms, "frames": r.frames,
                "boundary": r.boundary, "cutoff_A": CUTOFF, "density_per_A3": DENSITY,
                "edges": r.edges, "median_ms": r.ms,
                "edges_per_s": r.edges as f64 / (r.ms / 1e3),
            })
        })
        .collect();
    std::fs::create_dir_all("target/bench")?;
    std::fs::write(
        "target/bench/neighbor_list.json",
        serde_json::to_string_pretty(&json)?,
    )?;
    println!("wrote target/bench/neighbor_list.json");
    Ok(())
}
