//! Arenas: one allocation per kind of memory, sized up front and cut into named tensors, as
//! llm.c does. A model owns four ([`ModelMemory`]): parameters, gradients (the same layout as the
//! parameters), activations and scratch. Nothing is allocated on the hot path, and the peak
//! memory of a model is known before the first step.

use crate::device::Device;
use crate::tensor::{Allocation, DType, Element, Tensor, ALIGN};
use anyhow::{bail, Context, Result};
use std::sync::Arc;

#[derive(Clone, Debug)]
struct Region {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    offset: usize,
}

/// The named, typed regions of an arena, each aligned to 256 bytes.
#[derive(Clone, Debug, Default)]
pub struct ArenaLayout {
    regions: Vec<Region>,
    bytes: usize,
}

impl ArenaLayout {
    /// An empty layout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a region; names are unique within a layout.
    pub fn add<T: Element>(&mut self, name: &str, shape: &[usize]) -> Result<&mut Self> {
        if self.regions.iter().any(|r| r.name == name) {
            bail!("arena region {name:?} declared twice");
        }
        let offset = self.bytes.next_multiple_of(ALIGN);
        let len: usize = shape.iter().product();
        self.bytes = offset + len * size_of::<T>();
        self.regions.push(Region {
            name: name.to_string(),
            dtype: T::DTYPE,
            shape: shape.to_vec(),
            offset,
        });
        Ok(self)
    }

    /// Total bytes, padding included.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of regions.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether it has no region.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }
}

/// One allocation cut into the regions of a layout. Each region is handed out once, as a tensor,
/// so no two tensors alias.
pub struct Arena {
    mem: Arc<Allocation>,
    layout: ArenaLayout,
    taken: Vec<bool>,
}

impl Arena {
    /// Allocates the whole layout on `device` (zero-filled).
    pub fn new(device: &Device, layout: ArenaLayout) -> Result<Self> {
        let mem = Allocation::new(device, layout.bytes)
            .with_context(|| format!("allocating an arena of {} bytes", layout.bytes))?;
        let arena = Self {
            mem,
            taken: vec![false; layout.regions.len()],
            layout,
        };
        if !device.is_host() {
            // Device memory comes uninitialised; host memory is allocated zeroed.
            let mut whole: Tensor<u8> =
                Tensor::view(arena.mem.clone(), 0, vec![arena.layout.bytes]);
            whole.fill_bytes(0)?;
        }
        Ok(arena)
    }

    /// The tensor of region `name`; fails if it was already taken or has another type.
    pub fn take<T: Element>(&mut self, name: &str) -> Result<Tensor<T>> {
        let Some(i) = self.layout.regions.iter().position(|r| r.name == name) else {
            bail!("arena has no region {name:?}");
        };
        let r = &self.layout.regions[i];
        if r.dtype != T::DTYPE {
            bail!(
                "arena region {name:?} holds {:?}, not {:?}",
                r.dtype,
                T::DTYPE
            );
        }
        if self.taken[i] {
            bail!("arena region {name:?} was already taken");
        }
        self.taken[i] = true;
        Ok(Tensor::view(self.mem.clone(), r.offset, r.shape.clone()))
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> usize {
        self.layout.bytes
    }

    /// The layout.
    pub fn layout(&self) -> &ArenaLayout {
        &self.layout
    }
}

/// The memory of a model: four arenas sized up front.
pub struct ModelMemory {
    /// Trainable parameters.
    pub parameters: Arena,
    /// Their gradients, same layout (accumulated with `+=`).
    pub gradients: Arena,
    /// Activations saved by the forward pass for the backward pass.
    pub activations: Arena,
    /// Temporary buffers reused within a pass.
    pub scratch: Arena,
}

impl ModelMemory {
    /// Allocates the four arenas; gradients take the parameters' layout.
    pub fn new(
        device: &Device,
        parameters: ArenaLayout,
        activations: ArenaLayout,
        scratch: ArenaLayout,
    ) -> Result<Self> {
        Ok(Self {
            gradients: Arena::new(device, parameters.clone()).context("gradient arena")?,
            parameters: Arena::new(device, parameters).context("parameter arena")?,
            activations: Arena::new(device, activations).context("activation arena")?,
            scratch: Arena::new(device, scratch).context("scratch arena")?,
        })
    }

    /// Total bytes of the four arenas.
    pub fn bytes(&self) -> usize {
        self.parameters.bytes()
            + self.gradients.bytes()
            + self.activations.bytes()
            + self.scratch.bytes()
    }

    /// One line per arena, for logs.
    pub fn report(&self) -> String {
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        format!(
            "parameters {:.2} MiB, gradients {:.2} MiB, activations {:.2} MiB, scratch {:.2} MiB, total {:.2} MiB",
            mib(self.parameters.bytes()),
            mib(self.gradients.bytes()),
            mib(self.activations.bytes()),
            mib(self.scratch.bytes()),
            mib(self.bytes())
        )
    }
}
