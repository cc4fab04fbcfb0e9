//! Typed, shaped storage on a device, and copies between host and device.
//!
//! A [`Tensor`] is a view of a region of an allocation: either its own allocation, or a region of
//! an [`crate::Arena`]. Host devices (cpu, emu) keep tensors in host memory, so their data can be
//! read as slices; cuda tensors are reached through copies.

use crate::device::{CudaDevice, Device};
use anyhow::{bail, ensure, Result};
use std::alloc::Layout;
use std::marker::PhantomData;
use std::sync::Arc;

/// Element types of tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 32-bit signed integer.
    I32,
    /// 32-bit unsigned integer.
    U32,
    /// Byte.
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 => 8,
            Self::F32 | Self::I32 | Self::U32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::U8 => 1,
        }
    }
}

/// A type a tensor can hold.
pub trait Element: bytemuck::Pod + Send + Sync + std::fmt::Debug + 'static {
    /// Its [`DType`].
    const DTYPE: DType;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for u32 {
    const DTYPE: DType = DType::U32;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}

/// Alignment of every allocation and arena region: enough for 128-bit vector loads, and a whole
/// cache line on the host.
pub(crate) const ALIGN: usize = 256;

/// One block of device or host memory.
pub(crate) struct Allocation {
    device: Device,
    bytes: usize,
    ptr: u64,
}

// SAFETY: the allocation is plain memory; access is coordinated by the tensors viewing disjoint
// regions of it.
unsafe impl Send for Allocation {}
unsafe impl Sync for Allocation {}

impl Allocation {
    pub(crate) fn new(device: &Device, bytes: usize) -> Result<Arc<Self>> {
        let ptr = match device {
            Device::Cuda(c) => c.alloc(bytes)?,
            _ => {
                let layout = Layout::from_size_align(bytes.max(1), ALIGN)?;
                // SAFETY: non-zero size.
                let p = unsafe { std::alloc::alloc_zeroed(layout) };
                if p.is_null() {
                    bail!("out of host memory allocating {bytes} bytes");
                }
                p as u64
            }
        };
        Ok(Arc::new(Self {
            device: device.clone(),
            bytes,
            ptr,
        }))
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        match &self.device {
            Device::Cuda(c) => c.free(self.ptr),
            _ => {
                let layout = Layout::from_size_align(self.bytes.max(1), ALIGN).unwrap();
                // SAFETY: allocated in `new` with this layout.
                unsafe { std::alloc::dealloc(self.ptr as *mut u8, layout) }
            }
        }
    }
}

/// A typed, shaped tensor on a device.
pub struct Tensor<T: Element> {
    mem: Arc<Allocation>,
    offset: usize,
    shape: Vec<usize>,
    _t: PhantomData<T>,
}

impl<T: Element> Tensor<T> {
    /// A zero-filled tensor.
    pub fn zeros(device: &Device, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        let mem = Allocation::new(device, n * size_of::<T>())?;
        let mut t = Self::view(mem, 0, shape.to_vec());
        if let Device::Cuda(_) = device {
            t.fill_bytes(0)?;
        }
        Ok(t)
    }

    /// A tensor holding `data`.
    pub fn from_slice(device: &Device, shape: &[usize], data: &[T]) -> Result<Self> {
        let n: usize = shape.iter().product();
        ensure!(
            n == data.len(),
            "shape {shape:?} holds {n} elements but {} were given",
            data.len()
        );
        let mem = Allocation::new(device, n * size_of::<T>())?;
        let mut t = Self::view(mem, 0, shape.to_vec());
        t.copy_from_slice(data)?;
        Ok(t)
    }

    pub(crate) fn view(mem: Arc<Allocation>, offset: usize, shape: Vec<usize>) -> Self {
        debug_assert!(offset + shape.iter().product::<usize>() * size_of::<T>() <= mem.bytes());
        Self {
            mem,
            offset,
            shape,
            _t: PhantomData,
        }
    }

    /// A second handle on the same memory, for readers only. Crate-internal: the tape records
    /// caller-owned inputs ([`crate::tape::Tape::input_shared`], behind an `Arc` the caller
    /// cannot write through while the tape holds it) and a checkpointed segment's inputs this
    /// way, and never writes into recorded values; the pool drops, never recycles, a tensor
    /// whose memory is still shared ([`Tensor::is_shared`]).
    pub(crate) fn alias(&self) -> Self {
        Self::view(self.mem.clone(), self.offset, self.shape.clone())
    }

    /// A view of rows `f0..f1` of the first dimension (frames), sharing the memory: the
    /// crate's checkpointed segments read chunks of their inputs and write chunks of their
    /// outputs through these (see [`Tensor::alias`]).
    pub(crate) fn frames(&self, f0: usize, f1: usize) -> Self {
        let b = self.shape.first().copied().unwrap_or(1);
        assert!(
            f0 <= f1 && f1 <= b,
            "frames {f0}..{f1} of a tensor of shape {:?}",
            self.shape
        );
        let row = self.len().checked_div(b).unwrap_or(0);
        let mut shape = self.shape.clone();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] = f1 - f0;
        Self::view(
            self.mem.clone(),
            self.offset + f0 * row * size_of::<T>(),
            shape,
        )
    }

    /// Whether another tensor holds the same allocation (an alias, or another region of an
    /// arena).
    pub(crate) fn is_shared(&self) -> bool {
        Arc::strong_count(&self.mem) > 1
    }

    /// The same memory under another shape with as many elements (consumes the tensor, so no
    /// two live tensors alias).
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        self.set_shape(shape)?;
        Ok(self)
    }

    /// Gives the tensor another shape with as many elements.
    pub fn set_shape(&mut self, shape: &[usize]) -> Result<()> {
        let n: usize = shape.iter().product();
        ensure!(
            n == self.len(),
            "reshape of a tensor of shape {:?} ({} elements) to {shape:?} ({n} elements)",
            self.shape,
            self.len()
        );
        self.shape = shape.to_vec();
        Ok(())
    }

    /// The device it lives on.
    pub fn device(&self) -> &Device {
        &self.mem.device
    }
    /// Its shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.len() * size_of::<T>()
    }

    /// Address of the first element: a host pointer on cpu and emu, a device pointer on cuda.
    pub fn address(&self) -> u64 {
        self.mem.ptr + self.offset as u64
    }

    /// The data as a slice, on host devices.
    pub fn host(&self) -> Option<&[T]> {
        if !self.device().is_host() {
            return None;
        }
        // SAFETY: the region lies inside the allocation (checked at creation), is aligned for T
        // (allocation and arena regions are ALIGN-aligned) and no other tensor views it.
        Some(unsafe { std::slice::from_raw_parts(self.address() as *const T, self.len()) })
    }

    /// The data as a mutable slice, on host devices.
    pub fn host_mut(&mut self) -> Option<&mut [T]> {
        if !self.device().is_host() {
            return None;
        }
        // SAFETY: as in `host`, and `&mut self` makes the access unique.
        Some(unsafe { std::slice::from_raw_parts_mut(self.address() as *mut T, self.len()) })
    }

    /// Copies `data` (host) into the tensor.
    pub fn copy_from_slice(&mut self, data: &[T]) -> Result<()> {
        ensure!(
            data.len() == self.len(),
            "copy of {} elements into a tensor of shape {:?}",
            data.len(),
            self.shape
        );
        let mem = self.mem.clone();
        match &mem.device {
            Device::Cuda(c) => c.upload(self.address(), bytemuck::cast_slice(data)),
            _ => {
                self.host_mut().unwrap().copy_from_slice(data);
                Ok(())
            }
        }
    }

    /// Copies the tensor to a host vector (waits for queued work on cuda).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        match self.device() {
            Device::Cuda(c) => download(c, self.address(), self.len()),
            _ => Ok(self.host().unwrap().to_vec()),
        }
    }

    /// A copy on another device.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Tensor::from_slice(device, &self.shape, &self.to_vec()?)
    }

    /// Sets every byte to `byte`: 0 clears, 0xff poisons (NaN for floats, -1 for integers), so a
    /// test can tell which elements a kernel never wrote.
    pub fn fill_bytes(&mut self, byte: u8) -> Result<()> {
        let mem = self.mem.clone();
        match &mem.device {
            Device::Cuda(c) => c.memset(self.address(), byte, self.bytes()),
            _ => {
                bytemuck::cast_slice_mut::<T, u8>(self.host_mut().unwrap()).fill(byte);
                Ok(())
            }
        }
    }

    /// Fills with NaN bit patterns: see [`Tensor::fill_bytes`].
    pub fn poison(&mut self) -> Result<()> {
        self.fill_bytes(0xff)
    }
}

fn download<T: Element>(c: &CudaDevice, src: u64, n: usize) -> Result<Vec<T>> {
    let mut out = vec![T::zeroed(); n];
    c.download(bytemuck::cast_slice_mut(&mut out), src)?;
    Ok(out)
}

impl<T: Element> std::fmt::Debug for Tensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor<{:?}>{:?} on {}",
            T::DTYPE,
            self.shape,
            self.device().name()
        )
    }
}
