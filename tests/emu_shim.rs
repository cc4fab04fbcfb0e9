//! Tests of the emu shim (cuda/emu/emu.h) through the kernels of cuda/shim_check.cu. Kernel-level
//! tests run on emu and, where a GPU exists, on cuda (so the shim is checked against hardware).
//! Tests of the shim's failure detection run on emu only: on a GPU these defects are undefined
//! behaviour (a hang, or a wrong answer only sometimes).

use anyhow::{ensure, Result};
use hiermd::kernels::{reduce, shim_check as k};
use hiermd::launch::{launch, KernelArgs, LaunchConfig};
use hiermd::testing::{assert_close, Rng};
use hiermd::{kernel_test, Device, Tensor};

fn cfg(grid: u32, block: u32, shared_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid: [grid, 1, 1],
        block: [block, 1, 1],
        shared_bytes,
    }
}

fn neighbour_reference(input: &[f32], block: usize) -> Vec<f64> {
    input
        .chunks(block)
        .flat_map(|b| (0..block).map(move |t| b[(t + 1) % block] as f64))
        .collect()
}

fn run_neighbour(
    dev: &Device,
    kernel: &hiermd::launch::Kernel,
    input: &[f32],
    block: usize,
) -> Result<Vec<f32>> {
    let x = Tensor::from_slice(dev, &[input.len()], input)?;
    let mut y = Tensor::<f32>::zeros(dev, &[input.len()])?;
    y.poison()?;
    let grid = (input.len() / block) as u32;
    launch(
        dev,
        kernel,
        cfg(grid, block as u32, (block * 4) as u32),
        KernelArgs::new().input(&x).output(&mut y),
    )?;
    y.to_vec()
}

kernel_test!(barrier_orders_shared_memory, |dev| {
    let mut rng = Rng::for_test("barrier_orders_shared_memory");
    for block in [32usize, 96, 256, 1024] {
        let input = rng.normal_vec(block * 7, 1.0);
        let got = run_neighbour(dev, &k::SHIM_BARRIER_NEIGHBOUR, &input, block)?;
        assert_close(
            &format!("neighbour, block {block}"),
            &got,
            &neighbour_reference(&input, block),
            0.0,
            0.0,
        )?;
    }
    Ok(())
});

#[test]
fn missing_barrier_is_caught_on_emu() {
    let mut rng = Rng::for_test("missing_barrier_is_caught_on_emu");
    let block = 256;
    let input = rng.normal_vec(block * 4, 1.0);
    let want = neighbour_reference(&input, block);
    // Any one seed could in principle order every writer before its reader; over several seeds
    // the chance is nil (each of 1,024 reads must be lucky).
    for _ in 0..3 {
        let dev = Device::emu();
        let got = run_neighbour(&dev, &k::SHIM_BARRIER_NEIGHBOUR_BROKEN, &input, block).unwrap();
        let err = assert_close("neighbour without barrier", &got, &want, 0.0, 0.0);
        assert!(
            err.is_err(),
            "emu did not catch the missing barrier (seed {})",
            emu_seed(&dev)
        );
        println!("missing barrier caught: {:#}", err.unwrap_err());
    }
}

fn emu_seed(dev: &Device) -> u64 {
    match dev {
        Device::Emu(e) => e.seed(),
        _ => 0,
    }
}

kernel_test!(block_scan_many_barriers, |dev| {
    let mut rng = Rng::for_test("block_scan_many_barriers");
    for block in [64usize, 256, 512] {
        let n = block * 5;
        let input: Vec<i32> = (0..n).map(|_| rng.below(100) as i32 - 50).collect();
        let x = Tensor::from_slice(dev, &[n], &input)?;
        let mut y = Tensor::<i32>::zeros(dev, &[n])?;
        y.poison()?;
        launch(
            dev,
            &k::SHIM_BLOCK_SCAN,
            cfg(5, block as u32, (block * 4) as u32),
            KernelArgs::new().input(&x).output(&mut y),
        )?;
        let got = y.to_vec()?;
        for (b, chunk) in input.chunks(block).enumerate() {
            let mut acc = 0;
            for (t, v) in chunk.iter().enumerate() {
                acc += v;
                ensure!(
                    got[b * block + t] == acc,
                    "scan block {b} thread {t}: {} != {acc}",
                    got[b * block + t]
                );
            }
        }
    }
    Ok(())
});

kernel_test!(warp_shuffles, |dev| {
    let mut rng = Rng::for_test("warp_shuffles");
    let (blocks, block) = (3usize, 128usize);
    let n = blocks * block;
    let input: Vec<i32> = (0..n).map(|_| rng.next_u64() as i32).collect();
    let x = Tensor::from_slice(dev, &[n], &input)?;
    let mut y = Tensor::<i32>::zeros(dev, &[n * 8])?;
    y.poison()?;
    launch(
        dev,
        &k::SHIM_SHUFFLES,
        cfg(blocks as u32, block as u32, 0),
        KernelArgs::new().input(&x).output(&mut y),
    )?;
    let got = y.to_vec()?;
    for i in 0..n {
        let (warp0, lane) = (i - i % 32, i % 32);
        let at = |l: usize| input[warp0 + l];
        let seg = |w: usize| lane - lane % w;
        let want = [
            at((lane * 7 + 3) % 32),
            if lane >= 3 { at(lane - 3) } else { at(lane) },
            if lane + 5 < 32 {
                at(lane + 5)
            } else {
                at(lane)
            },
            at(lane ^ 9),
            at(seg(8) + (lane + 3) % 8),
            if lane - seg(8) >= 2 {
                at(lane - 2)
            } else {
                at(lane)
            },
            if lane + 3 < seg(8) + 8 {
                at(lane + 3)
            } else {
                at(lane)
            },
            at(lane ^ 5),
        ];
        for (j, w) in want.iter().enumerate() {
            ensure!(
                got[8 * i + j] == *w,
                "thread {i} shuffle {j}: got {} want {w}",
                got[8 * i + j]
            );
        }
    }
    Ok(())
});

kernel_test!(warp_votes_and_sum, |dev| {
    let mut rng = Rng::for_test("warp_votes_and_sum");
    let (blocks, block) = (2usize, 96usize);
    let n = blocks * block;
    let input = rng.normal_vec(n, 2.0);
    let x = Tensor::from_slice(dev, &[n], &input)?;
    let mut y = Tensor::<f32>::zeros(dev, &[n * 4])?;
    y.poison()?;
    launch(
        dev,
        &k::SHIM_VOTES,
        cfg(blocks as u32, block as u32, 0),
        KernelArgs::new().input(&x).output(&mut y),
    )?;
    let got = y.to_vec()?;
    let mut want = Vec::with_capacity(n * 4);
    for w in input.chunks(32) {
        let ballot: u32 = w
            .iter()
            .enumerate()
            .filter(|(_, v)| **v > 0.0)
            .map(|(l, _)| 1u32 << l)
            .sum();
        let all = w.iter().all(|v| *v > -10.0) as u32;
        let any = w.iter().any(|v| *v > 2.5) as u32;
        let sum: f64 = w.iter().map(|&v| v as f64).sum();
        for _ in w {
            want.extend([
                (ballot & 0xffff) as f64,
                (ballot >> 16) as f64,
                (all * 2 + any) as f64,
                sum,
            ]);
        }
    }
    // The butterfly sum rounds in f32: 32 terms of size ~2.
    assert_close("votes", &got, &want, 1e-5, 1e-6)?;
    Ok(())
});

kernel_test!(atomics_across_blocks, |dev| {
    let mut rng = Rng::for_test("atomics_across_blocks");
    let (n, nbins, nslots) = (5000usize, 17usize, 300usize);
    let bins: Vec<i32> = (0..n).map(|_| rng.below(nbins) as i32).collect();
    let b = Tensor::from_slice(dev, &[n], &bins)?;
    let mut hist = Tensor::<i32>::zeros(dev, &[nbins])?;
    let mut total = Tensor::<f32>::zeros(dev, &[1])?;
    let mut maxb = Tensor::from_slice(dev, &[1], &[-1i32])?;
    let mut claims = Tensor::from_slice(dev, &[nslots], &vec![-1i32; nslots])?;
    let mut count = Tensor::<i32>::zeros(dev, &[1])?;
    launch(
        dev,
        &k::SHIM_ATOMICS,
        LaunchConfig::for_elements(n, 128),
        KernelArgs::new()
            .input(&b)
            .i32(n as i32)
            .output(&mut hist)
            .output(&mut total)
            .output(&mut maxb)
            .output(&mut claims)
            .i32(nslots as i32)
            .output(&mut count),
    )?;
    let mut want = vec![0i32; nbins];
    bins.iter().for_each(|&x| want[x as usize] += 1);
    ensure!(
        hist.to_vec()? == want,
        "histogram {:?} != {want:?}",
        hist.to_vec()?
    );
    ensure!(
        total.to_vec()?[0] == 0.5 * n as f32,
        "float atomicAdd total {}",
        total.to_vec()?[0]
    );
    ensure!(
        maxb.to_vec()?[0] == *bins.iter().max().unwrap(),
        "atomicMax"
    );
    ensure!(
        count.to_vec()?[0] == nslots as i32,
        "CAS claims {} != {nslots}",
        count.to_vec()?[0]
    );
    let claims = claims.to_vec()?;
    ensure!(
        claims
            .iter()
            .enumerate()
            .all(|(s, &i)| i >= 0 && i as usize % nslots == s),
        "each slot is claimed by one of its own threads"
    );
    Ok(())
});

kernel_test!(grid_and_block_indexing_3d, |dev| {
    let (grid, block) = ([3u32, 2, 2], [8u32, 4, 2]);
    let nb = (grid.iter().product::<u32>() * block.iter().product::<u32>()) as usize;
    let mut y = Tensor::<i32>::zeros(dev, &[nb * 6])?;
    y.poison()?;
    launch(
        dev,
        &k::SHIM_INDEXING,
        LaunchConfig {
            grid,
            block,
            shared_bytes: 0,
        },
        KernelArgs::new().output(&mut y),
    )?;
    let got = y.to_vec()?;
    let mut i = 0;
    for bz in 0..grid[2] {
        for by in 0..grid[1] {
            for bx in 0..grid[0] {
                for tz in 0..block[2] {
                    for ty in 0..block[1] {
                        for tx in 0..block[0] {
                            let want = [bx, by, bz, tx, ty, tz].map(|v| v as i32);
                            ensure!(
                                got[6 * i..6 * i + 6] == want,
                                "thread {i}: {:?} != {want:?}",
                                &got[6 * i..6 * i + 6]
                            );
                            i += 1;
                        }
                    }
                }
            }
        }
    }
    Ok(())
});

fn ticket_order(dev: &Device, block: usize) -> Vec<i32> {
    let mut ticket = Tensor::<i32>::zeros(dev, &[1]).unwrap();
    let mut order = Tensor::<i32>::zeros(dev, &[block]).unwrap();
    launch(
        dev,
        &k::SHIM_TICKET_ORDER,
        cfg(1, block as u32, 0),
        KernelArgs::new().output(&mut ticket).output(&mut order),
    )
    .unwrap();
    order.to_vec().unwrap()
}

#[test]
fn emu_thread_order_is_seeded_and_shuffled() {
    let block = 256;
    let a = ticket_order(
        &Device::Emu(std::sync::Arc::new(hiermd::device::Emu::new(7))),
        block,
    );
    let b = ticket_order(
        &Device::Emu(std::sync::Arc::new(hiermd::device::Emu::new(7))),
        block,
    );
    let c = ticket_order(
        &Device::Emu(std::sync::Arc::new(hiermd::device::Emu::new(8))),
        block,
    );
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (0..block as i32).collect::<Vec<_>>(),
        "tickets are a permutation"
    );
    assert_eq!(a, b, "same seed, same thread order");
    assert_ne!(a, c, "another seed, another order");
    let in_order = a
        .iter()
        .enumerate()
        .filter(|(i, &t)| *i as i32 == t)
        .count();
    assert!(
        in_order < block / 4,
        "threads mostly run in index order ({in_order} of {block}): no shuffle"
    );
}

#[test]
fn unwritten_dynamic_shared_memory_is_poisoned() {
    let dev = Device::emu();
    let mut y = Tensor::<f32>::zeros(&dev, &[64]).unwrap();
    launch(
        &dev,
        &k::SHIM_READ_UNWRITTEN_SHARED,
        cfg(2, 32, 128),
        KernelArgs::new().output(&mut y),
    )
    .unwrap();
    assert!(y.to_vec().unwrap().iter().all(|v| v.is_nan()));
}

fn emu_error(kernel: &hiermd::launch::Kernel, block: u32) -> String {
    let dev = Device::emu();
    let mut y = Tensor::<i32>::zeros(&dev, &[1024]).unwrap();
    let err = launch(
        &dev,
        kernel,
        cfg(1, block, 0),
        KernelArgs::new().output(&mut y),
    )
    .expect_err("emu should refuse this kernel");
    format!("{err:#}")
}

#[test]
fn divergent_barrier_is_reported() {
    let msg = emu_error(&k::SHIM_DIVERGENT_BARRIER, 64);
    println!("{msg}");
    assert!(
        msg.contains("__syncthreads not reached by every thread"),
        "{msg}"
    );
    assert!(
        msg.contains("shim_divergent_barrier"),
        "names the kernel: {msg}"
    );
}

#[test]
fn shuffle_deadlock_is_reported() {
    let msg = emu_error(&k::SHIM_SHUFFLE_DEADLOCK, 32);
    println!("{msg}");
    assert!(
        msg.contains("__shfl_xor_sync waits for lane") && msg.contains("exited"),
        "{msg}"
    );
}

#[test]
fn partial_warp_full_mask_is_reported() {
    // row_sum_forward's warp sum uses full-mask shuffles: a 100-thread block leaves a 4-lane warp.
    let dev = Device::emu();
    let x = Tensor::<f32>::zeros(&dev, &[2, 10]).unwrap();
    let mut y = Tensor::<f32>::zeros(&dev, &[2]).unwrap();
    let err = launch(
        &dev,
        &reduce::ROW_SUM_FORWARD,
        cfg(2, 100, 0),
        KernelArgs::new()
            .input(&x)
            .output(&mut y)
            .i32(2)
            .i32(10)
            .f32(1.0),
    )
    .expect_err("partial warp");
    let msg = format!("{err:#}");
    println!("{msg}");
    assert!(
        msg.contains("partial warp") && msg.contains("0xffffffff"),
        "{msg}"
    );
}

#[test]
fn invalid_launch_configuration_is_reported() {
    let dev = Device::emu();
    let mut y = Tensor::<i32>::zeros(&dev, &[1]).unwrap();
    let err = launch(
        &dev,
        &k::SHIM_INDEXING,
        cfg(1, 2048, 0),
        KernelArgs::new().output(&mut y),
    )
    .expect_err("2048 threads");
    assert!(format!("{err:#}").contains("invalid launch configuration"));
}

/// Runs a broken row-sum variant on emu and returns the comparison with the f64 reference.
fn broken_row_sum(kernel: &hiermd::launch::Kernel, name: &str) -> Result<()> {
    let dev = Device::emu();
    let mut rng = Rng::for_test(name);
    let (rows, cols) = (64usize, 700usize);
    let input = rng.normal_vec(rows * cols, 1.0);
    let x = Tensor::from_slice(&dev, &[rows, cols], &input)?;
    let mut y = Tensor::<f32>::zeros(&dev, &[rows])?;
    y.poison()?;
    launch(
        &dev,
        kernel,
        cfg(rows as u32, 256, 0),
        KernelArgs::new()
            .input(&x)
            .output(&mut y)
            .i32(rows as i32)
            .i32(cols as i32),
    )?;
    let want: Vec<f64> = input
        .chunks(cols)
        .map(|r| r.iter().map(|&v| v as f64).sum())
        .collect();
    assert_close(name, &y.to_vec()?, &want, 1e-4, 1e-5).map(|_| ())
}

#[test]
fn broken_row_sum_variants_fail_on_emu() {
    for (kernel, name) in [
        (
            &k::ROW_SUM_FORWARD_MISSING_BARRIER,
            "row_sum_forward_missing_barrier",
        ),
        (&k::ROW_SUM_FORWARD_OFF_BY_ONE, "row_sum_forward_off_by_one"),
    ] {
        let err = broken_row_sum(kernel, name).expect_err(&format!("emu must catch {name}"));
        println!("{name} caught: {err:#}");
    }
}
