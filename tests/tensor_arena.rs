//! Tensors and arenas on every device: copies round-trip, regions are aligned, disjoint and typed.

use hiermd::testing::Rng;
use hiermd::{device_test, Arena, ArenaLayout, ModelMemory, Tensor};

device_test!(tensor_copies_round_trip_every_dtype, |dev| {
    let mut rng = Rng::for_test("tensor_copies_round_trip_every_dtype");
    let f: Vec<f32> = rng.normal_vec(1001, 1.0);
    anyhow::ensure!(Tensor::from_slice(dev, &[7, 143], &f)?.to_vec()? == f);
    let d: Vec<f64> = (0..333).map(|_| rng.normal()).collect();
    anyhow::ensure!(Tensor::from_slice(dev, &[333], &d)?.to_vec()? == d);
    let h: Vec<half::f16> = f.iter().map(|&v| half::f16::from_f32(v)).collect();
    anyhow::ensure!(Tensor::from_slice(dev, &[1001], &h)?.to_vec()? == h);
    let b: Vec<half::bf16> = f.iter().map(|&v| half::bf16::from_f32(v)).collect();
    anyhow::ensure!(Tensor::from_slice(dev, &[1001], &b)?.to_vec()? == b);
    let i: Vec<i32> = (0..99).map(|_| rng.next_u64() as i32).collect();
    anyhow::ensure!(Tensor::from_slice(dev, &[99], &i)?.to_vec()? == i);
    let u: Vec<u32> = i.iter().map(|&v| v as u32).collect();
    anyhow::ensure!(Tensor::from_slice(dev, &[99], &u)?.to_vec()? == u);
    // Copies between devices go through the host.
    let t = Tensor::from_slice(dev, &[1001], &f)?;
    anyhow::ensure!(t.to_device(&hiermd::Device::Cpu)?.to_vec()? == f);
    let mut z = Tensor::<f32>::zeros(dev, &[5])?;
    anyhow::ensure!(z.to_vec()? == vec![0.0; 5], "zeros");
    z.poison()?;
    anyhow::ensure!(z.to_vec()?.iter().all(|v| v.is_nan()), "poison is NaN");
    anyhow::ensure!(
        Tensor::from_slice(dev, &[2, 2], &[1.0f32; 5]).is_err(),
        "shape checks length"
    );
    Ok(())
});

device_test!(arena_regions_are_aligned_disjoint_and_typed, |dev| {
    let mut layout = ArenaLayout::new();
    layout
        .add::<f32>("w1", &[3, 5])?
        .add::<f64>("b1", &[7])?
        .add::<i32>("idx", &[1])?
        .add::<half::bf16>("h", &[9, 9])?;
    anyhow::ensure!(
        layout.add::<f32>("w1", &[1]).is_err(),
        "duplicate names are refused"
    );
    let mut arena = Arena::new(dev, layout)?;
    let mut w1 = arena.take::<f32>("w1")?;
    let mut b1 = arena.take::<f64>("b1")?;
    let mut idx = arena.take::<i32>("idx")?;
    let h = arena.take::<half::bf16>("h")?;
    for a in [w1.address(), b1.address(), idx.address(), h.address()] {
        anyhow::ensure!(a % 256 == 0, "region address {a:#x} not 256-byte aligned");
    }
    anyhow::ensure!(
        arena.take::<f32>("w1").is_err(),
        "a region is handed out once"
    );
    anyhow::ensure!(arena.take::<f32>("nope").is_err(), "unknown region");
    anyhow::ensure!(
        w1.to_vec()? == vec![0.0; 15] && h.to_vec()?.iter().all(|v| v.to_f32() == 0.0),
        "arenas start zeroed"
    );
    // Writing every region leaves the others intact.
    w1.copy_from_slice(&[1.5; 15])?;
    b1.copy_from_slice(&[-2.0; 7])?;
    idx.copy_from_slice(&[42])?;
    anyhow::ensure!(
        w1.to_vec()? == vec![1.5; 15] && b1.to_vec()? == vec![-2.0; 7] && idx.to_vec()? == vec![42]
    );
    Ok(())
});

#[test]
fn arena_type_mismatch_is_an_error() {
    let mut layout = ArenaLayout::new();
    layout.add::<f32>("w", &[4]).unwrap();
    let mut arena = Arena::new(&hiermd::Device::Cpu, layout).unwrap();
    let e = arena.take::<f64>("w").unwrap_err();
    assert!(format!("{e:#}").contains("holds F32, not F64"), "{e:#}");
}

#[test]
fn model_memory_mirrors_parameters_in_gradients() {
    let mut params = ArenaLayout::new();
    params
        .add::<f32>("w", &[64, 64])
        .unwrap()
        .add::<f32>("b", &[64])
        .unwrap();
    let mut acts = ArenaLayout::new();
    acts.add::<f32>("h", &[128, 64]).unwrap();
    let scratch = ArenaLayout::new();
    let mut mem = ModelMemory::new(&hiermd::Device::Cpu, params, acts, scratch).unwrap();
    assert_eq!(mem.parameters.bytes(), mem.gradients.bytes());
    let g = mem.gradients.take::<f32>("w").unwrap();
    assert_eq!(g.shape(), &[64, 64]);
    assert!(
        mem.report().contains("parameters 0.02 MiB"),
        "{}",
        mem.report()
    );
}
