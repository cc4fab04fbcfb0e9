//! The cuda device: the driver API through cudarc, loaded at run time.
//!
//! We use cudarc's thin `result` layer rather than its safe wrappers: kernels take raw device
//! addresses in the CUDA driver's argument layout, which is also what the emu launchers take, so
//! both devices share one launch path (see [`crate::launch`]).

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{result, sys};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Mutex, OnceLock};

/// What `hiermd devices` reports about a GPU.
#[derive(Clone, Debug)]
pub struct CudaInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name.
    pub name: String,
    /// Total device memory in bytes.
    pub total_memory: usize,
    /// (major, minor).
    pub compute_capability: (i32, i32),
    /// Driver's CUDA version, e.g. "13.0".
    pub driver_version: String,
}

/// Loads the driver once. cudarc panics when libcuda is missing, so we ask first whether the
/// library can be loaded at all; every entry point into the driver goes through here.
fn driver() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        // SAFETY: only tries to dlopen the driver library.
        if !unsafe { sys::is_culib_present() } {
            return Err("no CUDA driver (libcuda.so not found)".into());
        }
        result::init().map_err(|e| format!("the CUDA driver failed to initialise: {e}"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn driver_version() -> String {
    let mut v = 0i32;
    // SAFETY: the driver is loaded (callers go through `driver()` first).
    match unsafe { sys::cuDriverGetVersion(&mut v) }.result() {
        Ok(()) => format!("{}.{}", v / 1000, (v % 1000) / 10),
        Err(_) => "unknown".into(),
    }
}

fn info(ordinal: usize) -> Result<(sys::CUdevice, CudaInfo)> {
    let dev = result::device::get(ordinal as i32)
        .with_context(|| format!("CUDA device {ordinal} not found"))?;
    let attr = |a| unsafe { result::device::get_attribute(dev, a) };
    let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    Ok((
        dev,
        CudaInfo {
            ordinal,
            name: result::device::get_name(dev)?,
            // SAFETY: `dev` came from `device::get`.
            total_memory: unsafe { result::device::total_mem(dev)? },
            compute_capability: (major, minor),
            driver_version: driver_version(),
        },
    ))
}

/// Every CUDA device the driver reports; an error says why there is none (no driver, ...).
pub fn cuda_devices() -> Result<Vec<CudaInfo>> {
    driver()?;
    let n = result::device::get_count()?;
    (0..n as usize).map(|i| info(i).map(|(_, i)| i)).collect()
}

/// An open GPU: its primary context, one stream all our work is queued on, and the modules loaded
/// so far (lazily, on first launch of one of their kernels).
pub struct CudaDevice {
    info: CudaInfo,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    functions: Mutex<HashMap<(&'static str, &'static str), usize>>,
    modules: Mutex<HashMap<&'static str, usize>>,
    /// This device's cuBLAS handle (or why there is none), made on first use by
    /// [`crate::ops::gemm_cublas`] and bound to `stream`. It lives here, not in a global map,
    /// because cuBLAS requires a handle to be destroyed before the context it was created in:
    /// Drop destroys it before releasing the context.
    pub(crate) cublas: crate::ops::gemm_cublas::HandleSlot,
}

// SAFETY: driver handles may be used from any thread once the context is made current, which
// every method does first; the caches are behind mutexes.
unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

impl CudaDevice {
    /// Opens device `ordinal` (retains its primary context and creates a stream).
    pub fn open(ordinal: usize) -> Result<std::sync::Arc<Self>> {
        driver()?;
        let count = result::device::get_count()? as usize;
        if count == 0 {
            bail!("no CUDA device found");
        }
        if ordinal >= count {
            bail!("cuda:{ordinal} requested but only {count} CUDA device(s) exist");
        }
        let (dev, info) = info(ordinal)?;
        if info.compute_capability.0 < 8 {
            bail!(
                "cuda:{ordinal} ({}) has compute capability {}.{}; hiermd's PTX needs 8.0 or newer",
                info.name,
                info.compute_capability.0,
                info.compute_capability.1
            );
        }
        // SAFETY: `dev` is valid; the context is released in Drop.
        let ctx = unsafe { result::primary_ctx::retain(dev)? };
        unsafe { result::ctx::set_current(ctx)? };
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)?;
        Ok(std::sync::Arc::new(Self {
            info,
            ctx,
            stream,
            functions: Mutex::new(HashMap::new()),
            modules: Mutex::new(HashMap::new()),
            cublas: OnceLock::new(),
        }))
    }

    /// Name, memory and compute capability.
    pub fn info(&self) -> &CudaInfo {
        &self.info
    }

    /// The stream every launch and copy of this device is queued on.
    pub fn stream(&self) -> sys::CUstream {
        self.stream
    }

    pub(crate) fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained for the lifetime of self.
        unsafe { result::ctx::set_current(self.ctx) }.context("cuCtxSetCurrent")
    }

    /// Waits until all queued work is done, and reports a kernel fault if one happened.
    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: the stream belongs to this device.
        unsafe { result::stream::synchronize(self.stream) }.with_context(|| self.fault_context())
    }

    /// What an asynchronous failure is blamed on: the last kernel launched before it was seen
    /// (exactly the faulty one under `CUDA_LAUNCH_BLOCKING=1`).
    fn fault_context(&self) -> String {
        match crate::launch::last_launched() {
            Some(k) => format!(
                "{}: a kernel or copy failed (last kernel launched: {k}; rerun with CUDA_LAUNCH_BLOCKING=1 to name the faulty one for certain)",
                self.info.name
            ),
            None => format!("{}: a copy failed", self.info.name),
        }
    }

    pub(crate) fn alloc(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        // SAFETY: plain device allocation, freed by `free`.
        unsafe { result::malloc_sync(bytes.max(1)) }
            .with_context(|| format!("cuda:{}: cannot allocate {bytes} bytes", self.info.ordinal))
    }

    pub(crate) fn free(&self, ptr: u64) {
        if self.bind().is_ok() {
            // SAFETY: `ptr` came from `alloc`; the stream is synchronised first so no queued
            // kernel still uses it.
            unsafe {
                let _ = result::stream::synchronize(self.stream);
                let _ = result::free_sync(ptr);
            }
        }
    }

    /// Copies `src` to `dst` on this device's stream, after the work queued before it and before
    /// any queued after it. A synchronous `cuMemcpyHtoD` would run on the legacy default stream,
    /// which does not order against our non-blocking stream, and from pageable memory it returns
    /// once the bytes are staged, not when they have arrived: a kernel queued next could read
    /// the buffer while the DMA is still in flight. The wait at the end also lets the caller
    /// reuse `src` at once.
    pub(crate) fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: `dst` holds at least src.len() bytes (checked by the tensor layer); `src`
        // outlives the copy because we wait for the stream before returning.
        unsafe {
            result::memcpy_htod_async(dst, src, self.stream).with_context(|| {
                format!("cuda:{}: upload of {} bytes", self.info.ordinal, src.len())
            })?;
            result::stream::synchronize(self.stream).with_context(|| self.fault_context())?;
        }
        Ok(())
    }

    /// Sets `bytes` bytes at `dst` to `byte`, queued on the device stream (no host buffer).
    pub(crate) fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: `dst` holds at least `bytes` bytes (checked by the tensor layer) and was
        // allocated in this context; the stream is this device's.
        unsafe { result::memset_d8_async(dst, byte, bytes, self.stream) }
            .with_context(|| format!("cuda:{}: memset of {bytes} bytes", self.info.ordinal))
    }

    pub(crate) fn download(&self, dst: &mut [u8], src: u64) -> Result<()> {
        self.bind()?;
        // SAFETY: `src` holds at least dst.len() bytes (checked by the tensor layer).
        unsafe {
            result::stream::synchronize(self.stream).with_context(|| self.fault_context())?;
            result::memcpy_dtoh_sync(dst, src)?;
        }
        Ok(())
    }

    pub(crate) fn function(&self, k: &crate::launch::Kernel) -> Result<sys::CUfunction> {
        self.bind()?;
        let mut fns = self.functions.lock().unwrap();
        if let Some(&f) = fns.get(&(k.module.name, k.name)) {
            return Ok(f as sys::CUfunction);
        }
        let mut mods = self.modules.lock().unwrap();
        let module = match mods.get(k.module.name) {
            Some(&m) => m as sys::CUmodule,
            None => {
                let image = CString::new(k.module.ptx(self.info.compute_capability.0)?)?;
                let m = load_module(&image).map_err(|(err, log)| {
                    anyhow!(module_load_error(
                        k.module.name,
                        &self.info,
                        &err.to_string(),
                        &log
                    ))
                })?;
                mods.insert(k.module.name, m as usize);
                m
            }
        };
        let name = CString::new(k.name)?;
        // SAFETY: `module` is loaded and never unloaded while self lives.
        let f = unsafe { result::module::get_function(module, name) }
            .with_context(|| format!("kernel {} not in PTX module {}", k.name, k.module.name))?;
        fns.insert((k.module.name, k.name), f as usize);
        Ok(f)
    }
}

/// Size of the JIT compiler's error log buffer.
const JIT_LOG_BYTES: usize = 16 * 1024;

/// Loads a PTX image, asking the JIT compiler for its error log: on failure, the driver's error
/// and the log (what ptxas said about which line).
fn load_module(
    image: &CString,
) -> std::result::Result<sys::CUmodule, (result::DriverError, String)> {
    let mut log = vec![0u8; JIT_LOG_BYTES];
    let mut options = [
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
    ];
    // Option values are passed as pointer-sized words: a pointer, then a byte count.
    let mut values = [
        log.as_mut_ptr() as *mut c_void,
        JIT_LOG_BYTES as *mut c_void,
    ];
    let mut module = std::ptr::null_mut();
    // SAFETY: a NUL-terminated PTX image; the log buffer outlives the call and its size is
    // stated in the options.
    let rc = unsafe {
        sys::cuModuleLoadDataEx(
            &mut module,
            image.as_ptr() as *const c_void,
            options.len() as u32,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    match rc.result() {
        Ok(()) => Ok(module),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err((e, String::from_utf8_lossy(&log[..end]).trim().to_string()))
        }
    }
}

/// The message for a module that failed to load: the module, the GPU, the driver's error and the
/// JIT compiler's log. The driver is blamed only when the error says the PTX is too new for it.
pub fn module_load_error(module: &str, gpu: &CudaInfo, error: &str, jit_log: &str) -> String {
    let mut msg = format!(
        "loading PTX module {module} on {} (compute capability {}.{}, driver CUDA {}): {error}",
        gpu.name, gpu.compute_capability.0, gpu.compute_capability.1, gpu.driver_version
    );
    if error.contains("UNSUPPORTED_PTX_VERSION") {
        msg.push_str("; the PTX (ISA 9.0) needs a driver for CUDA 13.0 or newer (580+)");
    }
    if jit_log.is_empty() {
        msg.push_str("; the JIT compiler left no log");
    } else {
        msg.push_str("; JIT compiler log:\n");
        msg.push_str(jit_log);
    }
    msg
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        if self.bind().is_ok() {
            // SAFETY: handles created in `open`; nothing uses them after drop.
            unsafe {
                let _ = result::stream::synchronize(self.stream);
                // The cuBLAS handle goes first: it must not outlive the stream or the context.
                drop(self.cublas.take());
                for (_, &m) in self.modules.lock().unwrap().iter() {
                    let _ = result::module::unload(m as sys::CUmodule);
                }
                let _ = result::stream::destroy(self.stream);
                if let Ok(dev) = result::device::get(self.info.ordinal as i32) {
                    let _ = result::primary_ctx::release(dev);
                }
            }
        }
    }
}
