//! The kernel table and the embedded PTX (src/launch.rs, build.rs): every module inflates to the
//! PTX its `ptx/` file holds, for both targets, with every exported kernel's entry; the launch
//! record the device check uses for coverage; and the message of a module that fails to load.

use hiermd::device::{module_load_error, CudaInfo};
use hiermd::launch::{launched, record_launches};
use hiermd::ops::elementwise::silu_forward;
use hiermd::{Device, Tensor};
use std::path::PathBuf;

#[test]
fn embedded_ptx_inflates_to_the_committed_files_for_both_targets() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut stored_once = 0;
    for (module, kernels) in hiermd::kernels::ALL {
        for (major, arch) in [(8, 80), (9, 90)] {
            let file = root.join(format!("ptx/{}.sm_{arch}.ptx", module.name));
            let want = std::fs::read_to_string(&file).unwrap();
            // The tests build with `test-kernels`, so the test-only modules are embedded too.
            let got = module
                .ptx(major)
                .unwrap_or_else(|e| panic!("{}: {e:#}", module.name));
            assert!(
                got == want,
                "{} sm_{arch}: the inflated PTX differs from {}",
                module.name,
                file.display()
            );
            for k in *kernels {
                assert!(
                    got.contains(&format!(".entry {}(", k.name)),
                    "{} sm_{arch}: no entry {}",
                    module.name,
                    k.name
                );
            }
        }
        stored_once += module.ptx_sm90.is_none() as usize;
    }
    // Most modules differ between the targets only in `.target`; they are stored once.
    assert!(
        stored_once * 2 > hiermd::kernels::ALL.len(),
        "only {stored_once} of {} modules stored once",
        hiermd::kernels::ALL.len()
    );
}

#[test]
fn only_the_shim_and_mma_checks_are_test_only() {
    let test_only: Vec<&str> = hiermd::kernels::ALL
        .iter()
        .filter(|(m, _)| m.test_only)
        .map(|(m, _)| m.name)
        .collect();
    assert_eq!(test_only, ["mma_check", "shim_check"]);
    let exported = hiermd::selfcheck::exported_kernels();
    assert!(exported.iter().all(|k| !k.starts_with("mma_check/")));
    assert!(exported.contains(&"eqsdpa/eqsdpa_forward_f32_dh8".to_string()));
}

#[test]
fn launches_are_recorded_for_the_device_check() {
    let dev = Device::emu();
    let x = Tensor::from_slice(&dev, &[4], &[0.5f32, -1.0, 2.0, 0.0]).unwrap();
    let mut y = Tensor::zeros(&dev, &[4]).unwrap();
    record_launches(true);
    silu_forward(&x, &mut y).unwrap();
    let seen = launched();
    record_launches(false);
    assert!(
        seen.contains(&("elementwise", "silu_forward")),
        "recorded: {seen:?}"
    );
    assert_eq!(
        hiermd::launch::last_launched(),
        Some("silu_forward"),
        "the last launch names the kernel a later fault is blamed on"
    );
}

#[test]
fn a_module_that_fails_to_load_names_itself_and_shows_the_jit_log() {
    let gpu = CudaInfo {
        ordinal: 0,
        name: "NVIDIA H100 80GB HBM3".into(),
        total_memory: 80 << 30,
        compute_capability: (9, 0),
        driver_version: "13.0".into(),
    };
    let log = "ptxas application ptx input, line 812; error   : Unknown symbol 'tile'";
    let m = module_load_error(
        "eqsdpa",
        &gpu,
        "DriverError(CUDA_ERROR_INVALID_PTX, \"a PTX JIT compilation failed\")",
        log,
    );
    assert!(m.contains("eqsdpa") && m.contains("H100") && m.contains("9.0"));
    assert!(m.contains(log), "{m}");
    assert!(
        !m.contains("needs a driver"),
        "a broken module is not blamed on the driver: {m}"
    );
    // Too new a PTX for the driver: that, and only that, is blamed on the driver.
    let m = module_load_error(
        "gemm",
        &gpu,
        "DriverError(CUDA_ERROR_UNSUPPORTED_PTX_VERSION, \"the provided PTX was compiled with an unsupported toolchain.\")",
        "",
    );
    assert!(m.contains("needs a driver") && m.contains("no log"), "{m}");
}
