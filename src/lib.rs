//! hiermd: hierarchical geometric deep learning for molecular dynamics, in Rust with hand-written
//! CUDA kernels and no deep-learning framework.
//!
//! Every op runs on three devices from one kernel source:
//! - [`Device::Cpu`]: pure Rust, multi-threaded; the reference and the default without a GPU;
//! - [`Device::Emu`]: the `cuda/*.cu` kernels compiled for the host against our CPU shim of the
//!   CUDA execution model, so every kernel and every launch runs in CI without a GPU;
//! - [`Device::Cuda`]: the same kernels as PTX on an NVIDIA GPU through the driver API.
//!
//! The layout follows the pipeline: [`device`] and [`tensor`] hold memory, [`launch`] runs kernels,
//! [`ops`] are the operations (each with its CPU twin, CUDA kernel and backward), and [`testing`]
//! runs one test body on every device against an f64 reference.

pub mod analysis;
pub mod api;
pub mod arena;
pub mod bench;
pub mod capi;
pub mod device;
pub mod launch;
pub mod model;
pub mod nn;
pub mod npy;
pub mod objectives;
pub mod ops;
pub mod optim;
pub mod output;
pub mod plot;
pub mod progress;
pub mod select;
pub mod selfcheck;
pub mod store;
pub mod tape;
pub mod tensor;
pub mod testing;
pub mod topology;
pub mod traj;
pub mod workflow;

/// The generated kernel table: one module per `cuda/*.cu` file (see build.rs).
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

pub use arena::{Arena, ArenaLayout, ModelMemory};
pub use device::{Device, DeviceSpec};
pub use tensor::{DType, Element, Tensor};
