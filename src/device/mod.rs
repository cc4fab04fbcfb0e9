//! Devices: where tensors live and ops run. See the crate docs for the three kinds.

mod cuda;
mod emu;

pub use cuda::{cuda_devices, module_load_error, CudaDevice, CudaInfo};
pub use emu::Emu;

use anyhow::{bail, Context, Result};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// What the user asked for on the command line (`--device auto|cpu|emu|cuda[:N]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// CUDA device 0 when a driver and a GPU are found, else the CPU.
    Auto,
    /// Pure-Rust reference implementation.
    Cpu,
    /// The CUDA kernels run on the CPU by the shim.
    Emu,
    /// CUDA device with this ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Self::Auto,
            "cpu" => Self::Cpu,
            "emu" => Self::Emu,
            "cuda" | "gpu" => Self::Cuda(0),
            other => match other.strip_prefix("cuda:") {
                Some(n) => Self::Cuda(n.parse().with_context(|| {
                    format!("device {s:?}: the CUDA ordinal after 'cuda:' must be a number")
                })?),
                None => bail!("unknown device {s:?}: expected auto, cpu, emu, cuda or cuda:N"),
            },
        })
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Emu => write!(f, "emu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A device. Cloning is cheap (shared handle).
#[derive(Clone)]
pub enum Device {
    /// Pure Rust on the host, multi-threaded with rayon.
    Cpu,
    /// CUDA kernels on the host through the shim; memory is host memory.
    Emu(Arc<Emu>),
    /// An NVIDIA GPU.
    Cuda(Arc<CudaDevice>),
}

impl Device {
    /// Opens the device a spec names. `Auto` logs its choice on stderr.
    pub fn open(spec: DeviceSpec) -> Result<Self> {
        match spec {
            DeviceSpec::Cpu => Ok(Self::Cpu),
            DeviceSpec::Emu => Ok(Self::emu()),
            DeviceSpec::Cuda(n) => Ok(Self::Cuda(CudaDevice::open(n)?)),
            DeviceSpec::Auto => match CudaDevice::open(0) {
                Ok(d) => {
                    eprintln!("hiermd: device auto -> cuda:0 ({})", d.info().name);
                    Ok(Self::Cuda(d))
                }
                Err(e) => {
                    eprintln!("hiermd: device auto -> cpu ({e:#})");
                    Ok(Self::Cpu)
                }
            },
        }
    }

    /// An emu device whose thread-order seed comes from `HIERMD_EMU_SEED`, else from the clock.
    pub fn emu() -> Self {
        Self::Emu(Arc::new(Emu::from_env()))
    }

    /// Short name: `cpu`, `emu` or `cuda:N`.
    pub fn name(&self) -> String {
        match self {
            Self::Cpu => "cpu".into(),
            Self::Emu(_) => "emu".into(),
            Self::Cuda(d) => format!("cuda:{}", d.info().ordinal),
        }
    }

    /// Whether tensors of this device live in host memory (cpu and emu).
    pub fn is_host(&self) -> bool {
        !matches!(self, Self::Cuda(_))
    }

    /// Waits for all queued work (a no-op on the host devices).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Self::Cuda(d) => d.synchronize(),
            _ => Ok(()),
        }
    }

    /// Two handles name the same device.
    pub fn same(&self, other: &Device) -> bool {
        match (self, other) {
            (Self::Cpu, Self::Cpu) => true,
            (Self::Emu(a), Self::Emu(b)) => Arc::ptr_eq(a, b),
            (Self::Cuda(a), Self::Cuda(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.name())
    }
}

/// One line per device the machine offers, for `hiermd devices`.
pub fn describe_devices() -> Vec<String> {
    let mut out = vec![
        format!(
            "cpu      pure Rust reference, {} threads",
            rayon::current_num_threads()
        ),
        "emu      CUDA kernels on the CPU (fiber shim, seeded thread order)".to_string(),
    ];
    match cuda_devices() {
        Ok(list) if list.is_empty() => {
            out.push("cuda     unavailable: no CUDA device found".into())
        }
        Ok(list) => {
            for d in list {
                out.push(format!(
                    "cuda:{}   {}, {:.1} GiB, compute capability {}.{}, driver {}",
                    d.ordinal,
                    d.name,
                    d.total_memory as f64 / (1u64 << 30) as f64,
                    d.compute_capability.0,
                    d.compute_capability.1,
                    d.driver_version
                ));
            }
        }
        Err(e) => out.push(format!("cuda     unavailable: {e:#}")),
    }
    out
}
