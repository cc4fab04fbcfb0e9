//! Device selection and the CLI on a machine that may have no CUDA driver: nothing may panic.

use hiermd::{Device, DeviceSpec};
use std::process::Command;

#[test]
fn device_specs_parse() {
    assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
    assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
    assert_eq!("emu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Emu);
    assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
    assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
    let e = "cuda:x".parse::<DeviceSpec>().unwrap_err();
    assert!(format!("{e:#}").contains("ordinal"), "{e:#}");
    let e = "tpu".parse::<DeviceSpec>().unwrap_err();
    assert!(
        format!("{e:#}").contains("expected auto, cpu, emu, cuda or cuda:N"),
        "{e:#}"
    );
}

#[test]
fn auto_never_fails_and_cuda_fails_cleanly() {
    let auto = Device::open(DeviceSpec::Auto).expect("auto falls back to cpu");
    match hiermd::device::cuda_devices() {
        Ok(list) if !list.is_empty() => assert!(matches!(auto, Device::Cuda(_))),
        Ok(_) | Err(_) => {
            assert!(matches!(auto, Device::Cpu));
            let e = Device::open(DeviceSpec::Cuda(0)).expect_err("no GPU here");
            println!("cuda:0 without a GPU: {e:#}");
        }
    }
    let e = Device::open(DeviceSpec::Cuda(999)).expect_err("no 1000th GPU");
    assert!(!format!("{e:#}").is_empty());
}

fn hiermd(args: &[&str]) -> (bool, String, String) {
    // HIERMD_BIN: where scripts/gpu-check runs prebuilt test binaries, the path cargo baked in
    // does not exist.
    let bin =
        std::env::var("HIERMD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hiermd").to_string());
    let out = Command::new(bin)
        .args(args)
        .output()
        .expect("run the hiermd binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_devices_lists_cpu_emu_and_cuda_status() {
    let (ok, stdout, stderr) = hiermd(&["devices"]);
    assert!(ok, "hiermd devices failed: {stderr}");
    assert!(
        stdout.contains("cpu") && stdout.contains("emu") && stdout.contains("cuda"),
        "{stdout}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    println!("{stdout}");
}

#[test]
fn cli_device_auto_runs_selfcheck_without_panic() {
    let (ok, stdout, stderr) = hiermd(&[
        "--device",
        "auto",
        "selfcheck",
        "--quick",
        "--family",
        "elementwise,reduce",
    ]);
    assert!(ok, "hiermd --device auto selfcheck failed: {stderr}");
    assert!(
        stderr.contains("device auto ->"),
        "auto logs its choice: {stderr}"
    );
    assert!(
        stdout.contains("| elementwise |") && stdout.contains("| reduce |"),
        "one row per family: {stdout}"
    );
    assert!(stdout.contains(": PASS"), "{stdout}");
}

#[test]
fn cli_bad_device_is_a_clear_error() {
    let (ok, _, stderr) = hiermd(&["--device", "cuda:x", "devices"]);
    assert!(!ok);
    assert!(
        stderr.contains("ordinal") && !stderr.contains("panicked"),
        "{stderr}"
    );
    if hiermd::device::cuda_devices()
        .map(|l| l.is_empty())
        .unwrap_or(true)
    {
        let (ok, _, stderr) = hiermd(&["--device", "cuda", "selfcheck", "--quick"]);
        assert!(!ok, "cuda selfcheck cannot succeed without a GPU");
        assert!(
            stderr.starts_with("error: ") && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}
