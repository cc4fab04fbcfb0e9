//! The C ABI: `include/hiermd.h` (generated from this file by cbindgen; `tests/capi.rs` fails
//! when the committed header is stale), built into `libhiermd.so` and `libhiermd.a`.
//!
//! Handles are opaque: a [`HiermdContext`] per device (`"cpu"`, `"emu"`, `"cuda"`,
//! `"cuda:N"`), and [`HiermdModel`]s loaded in it from trained run folders. Every function
//! returns a [`HiermdStatus`] (0 = success) and, on failure, leaves a message for
//! [`hiermd_last_error`]. Every pointer is checked for null, every size against the model, and a
//! Rust panic is caught at the boundary and returned as `HIERMD_STATUS_PANIC`: no call unwinds
//! into C or aborts the host program.
//!
//! # Memory
//! The caller owns every buffer. [`hiermd_model_evaluate`] reads positions and writes outputs
//! through the caller's pointers, host or device (per `flags`), and stages what it must copy in a
//! caller-provided workspace of [`hiermd_model_workspace_size`] bytes of HOST memory.
//! What still allocates inside hiermd, honestly:
//! - the model's activations come from its tape's pool: the first evaluation with a given
//!   `n_frames` fills the pool, and later calls with the same `n_frames` reuse it, except for
//!   buffers sized by the number of neighbor-list edges (they are reused when the count recurs);
//! - the neighbor list, the positions' copy on the device and the C-alpha positions are fresh
//!   allocations every call (device memory on cuda, host memory on cpu/emu), as are a few small
//!   host vectors (the unit cells, the rows before they are written out).
//!
//! On cuda an allocation synchronises the device; the hot path is not allocation-free there.
//!
//! # Threads and streams
//! - Every function may be called from any thread. [`hiermd_last_error`] is per thread.
//! - A context may be shared by threads: models may be loaded, evaluated and destroyed in one
//!   context from several threads at once. A handle must not be destroyed while another thread
//!   uses it. Models keep their device alive: a context may be destroyed before its models.
//! - One model evaluated from several threads at once is safe but serialised (a lock inside the
//!   model); for parallel evaluation load one model per thread. The queries (width, atoms,
//!   workspace size, column names) do not take the lock.
//! - cpu and emu: the work runs on the host (the calling thread and hiermd's thread pool);
//!   `stream` must be null.
//! - cuda: `stream` is a `CUstream` of the device's primary context (the CUDA runtime's streams
//!   on that device are), or null for its legacy default stream. Device positions are copied to
//!   the workspace by a copy enqueued on `stream` (so work queued there before the call is
//!   complete when they are read), and device outputs are written by a copy enqueued on
//!   `stream`, which the call waits for. The kernels themselves run on the context's own
//!   internal stream, which is synchronised before the call returns. The call is therefore
//!   synchronous for the host: when it returns, the outputs are written and the workspace is
//!   free again. Models of one context share that internal stream.

use crate::api::{Model, System, UnitCell};
use crate::{Device, DeviceSpec};
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Mutex;

/// What a hiermd C function returns: 0 on success, else why it failed (the message is in
/// [`hiermd_last_error`]).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HiermdStatus {
    /// Success.
    Ok = 0,
    /// A required pointer was null.
    NullPointer = 1,
    /// An argument has a value the function does not accept: an unknown device name, zero
    /// frames, a non-null stream on a host device, a string that is not UTF-8, bad system
    /// arrays.
    InvalidArgument = 2,
    /// Sizes do not match the model (or overflow).
    WrongSize = 3,
    /// The workspace is smaller than [`hiermd_model_workspace_size`] says, or misaligned.
    WorkspaceTooSmall = 4,
    /// The model could not be loaded: not a hiermd run, unreadable or foreign weights, a
    /// missing dataset or atom model.
    LoadFailed = 5,
    /// The device could not be opened (no CUDA driver, no such GPU).
    DeviceUnavailable = 6,
    /// The evaluation failed: non-finite coordinates, a box too small for the cutoff, a kernel
    /// fault.
    EvaluationFailed = 7,
    /// A CUDA driver call of the ABI itself (a copy to or from the caller's pointers) failed.
    CudaError = 8,
    /// hiermd panicked (a bug); the panic was caught and the handle may be used again.
    Panic = 9,
}

/// `flags` bit of [`hiermd_model_evaluate`]: `positions` is a device pointer (cuda; on cpu and
/// emu device memory is host memory and the bit changes nothing).
pub const HIERMD_POSITIONS_ON_DEVICE: u32 = 1;
/// `flags` bit of [`hiermd_model_evaluate`]: `out` is a device pointer (as above).
pub const HIERMD_OUT_ON_DEVICE: u32 = 2;

/// A device opened for hiermd (opaque).
pub struct HiermdContext {
    device: Device,
}

/// A trained model loaded in a context (opaque).
pub struct HiermdModel {
    model: Mutex<Model>,
    device: Device,
    atoms: usize,
    width: usize,
    tokens: usize,
    columns: Vec<CString>,
}

/// An error on its way to C.
struct CError {
    status: HiermdStatus,
    msg: String,
}

type CResult<T> = Result<T, CError>;

fn err<T>(status: HiermdStatus, msg: impl Into<String>) -> CResult<T> {
    Err(CError {
        status,
        msg: msg.into(),
    })
}

trait WithStatus<T> {
    fn status(self, s: HiermdStatus) -> CResult<T>;
}

impl<T> WithStatus<T> for anyhow::Result<T> {
    fn status(self, status: HiermdStatus) -> CResult<T> {
        self.map_err(|e| CError {
            status,
            msg: format!("{e:#}"),
        })
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = c);
}

/// Runs `f` with panics caught; failures become a status and the thread's last error.
fn guard(name: &str, f: impl FnOnce() -> CResult<()>) -> HiermdStatus {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => HiermdStatus::Ok,
        Ok(Err(e)) => {
            set_last_error(&format!("{name}: {}", e.msg));
            e.status
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("{name}: hiermd panicked (a bug): {what}"));
            HiermdStatus::Panic
        }
    }
}

fn non_null<T>(p: *const T, what: &str) -> CResult<()> {
    if p.is_null() {
        return err(HiermdStatus::NullPointer, format!("{what} is null"));
    }
    Ok(())
}

/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn string<'a>(p: *const c_char, what: &str) -> CResult<&'a str> {
    non_null(p, what)?;
    // SAFETY: non-null and NUL-terminated per the contract.
    unsafe { CStr::from_ptr(p) }.to_str().or_else(|_| {
        err(
            HiermdStatus::InvalidArgument,
            format!("{what} is not UTF-8"),
        )
    })
}

/// # Safety
/// `p` is null or points to a live context.
unsafe fn context<'a>(p: *const HiermdContext) -> CResult<&'a HiermdContext> {
    non_null(p, "ctx")?;
    // SAFETY: non-null and live per the contract.
    Ok(unsafe { &*p })
}

/// # Safety
/// `p` is null or points to a live model.
unsafe fn model<'a>(p: *const HiermdModel) -> CResult<&'a HiermdModel> {
    non_null(p, "model")?;
    // SAFETY: non-null and live per the contract.
    Ok(unsafe { &*p })
}

/// # Safety
/// `p` is null or valid for a write of `T`.
unsafe fn write_out<T>(p: *mut T, what: &str, value: T) -> CResult<()> {
    non_null(p, what)?;
    // SAFETY: non-null and writable per the contract.
    unsafe { p.write(value) };
    Ok(())
}

/// The version of the library, e.g. `"0.1.0"` (a static string).
#[no_mangle]
pub extern "C" fn hiermd_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the last failed hiermd call on the calling thread ("" if none failed). The
/// string belongs to hiermd and stays valid until the next failing call on this thread;
/// successful calls leave it unchanged.
#[no_mangle]
pub extern "C" fn hiermd_last_error() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

/// A static name for a status, e.g. `"HIERMD_STATUS_WRONG_SIZE"` (`"unknown status"` for other
/// values).
#[no_mangle]
pub extern "C" fn hiermd_status_name(status: i32) -> *const c_char {
    let s: &'static str = match status {
        0 => "HIERMD_STATUS_OK\0",
        1 => "HIERMD_STATUS_NULL_POINTER\0",
        2 => "HIERMD_STATUS_INVALID_ARGUMENT\0",
        3 => "HIERMD_STATUS_WRONG_SIZE\0",
        4 => "HIERMD_STATUS_WORKSPACE_TOO_SMALL\0",
        5 => "HIERMD_STATUS_LOAD_FAILED\0",
        6 => "HIERMD_STATUS_DEVICE_UNAVAILABLE\0",
        7 => "HIERMD_STATUS_EVALUATION_FAILED\0",
        8 => "HIERMD_STATUS_CUDA_ERROR\0",
        9 => "HIERMD_STATUS_PANIC\0",
        _ => "unknown status\0",
    };
    s.as_ptr().cast()
}

/// Opens a device: `device` is `"cpu"`, `"emu"`, `"cuda"`, `"cuda:N"` or `"auto"` (cuda:0 if
/// a GPU is found, else cpu). On success `*out` holds the new context (free it with
/// [`hiermd_context_destroy`]); on failure `*out` is set to null.
///
/// # Safety
/// `device` is null or a NUL-terminated string; `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn hiermd_context_create(
    device: *const c_char,
    out: *mut *mut HiermdContext,
) -> HiermdStatus {
    guard("hiermd_context_create", || {
        non_null(out, "out")?;
        // SAFETY: checked non-null; writable per the contract.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: per the contract.
        let name = unsafe { string(device, "device") }?;
        let spec: DeviceSpec = name.parse().status(HiermdStatus::InvalidArgument)?;
        let device = Device::open(spec).status(HiermdStatus::DeviceUnavailable)?;
        let ctx = Box::into_raw(Box::new(HiermdContext { device }));
        // SAFETY: as above.
        unsafe { out.write(ctx) };
        Ok(())
    })
}

/// Whether the context's device memory is host memory (cpu, emu: 1) or a GPU's (cuda: 0).
///
/// # Safety
/// `ctx` is null or a live context; `out` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn hiermd_context_is_host(
    ctx: *const HiermdContext,
    out: *mut i32,
) -> HiermdStatus {
    guard("hiermd_context_is_host", || {
        // SAFETY: per the contract.
        let c = unsafe { context(ctx) }?;
        // SAFETY: per the contract.
        unsafe { write_out(out, "out", c.device.is_host() as i32) }
    })
}

/// Frees a context (null: nothing happens). Models loaded in it stay usable.
///
/// # Safety
/// `ctx` is null or a context from [`hiermd_context_create`] not destroyed yet, used by no other
/// thread.
#[no_mangle]
pub unsafe extern "C" fn hiermd_context_destroy(ctx: *mut HiermdContext) {
    if !ctx.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: from Box::into_raw in hiermd_context_create, per the contract.
            drop(unsafe { Box::from_raw(ctx) })
        }));
    }
}

fn wrap(model: Model) -> *mut HiermdModel {
    let columns = model
        .columns()
        .into_iter()
        .map(|c| CString::new(c).unwrap_or_default())
        .collect();
    Box::into_raw(Box::new(HiermdModel {
        device: model.device().clone(),
        atoms: model.atoms(),
        width: model.width(),
        tokens: model.tokens(),
        columns,
        model: Mutex::new(model),
    }))
}

/// Loads a trained run (its folder, or a weights file in it) with the atoms of the run's
/// dataset, which must exist (else see [`hiermd_model_load_with_system`]). A run trained on
/// frozen features also loads the atom model its feature store recorded. On success `*out`
/// holds the model (free it with [`hiermd_model_destroy`]); on failure null.
///
/// # Safety
/// `ctx` is null or live; `path` null or NUL-terminated; `out` null or writable.
#[no_mangle]
pub unsafe extern "C" fn hiermd_model_load(
    ctx: *const HiermdContext,
    path: *const c_char,
    out: *mut *mut HiermdModel,
) -> HiermdStatus {
    guard("hiermd_model_load", || {
        non_null(out, "out")?;
        // SAFETY: checked non-null; writable per the contract.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: per the contract.
        let c = unsafe { context(ctx) }?;
        // SAFETY: per the contract.
        let path = unsafe { string(path, "path") }?;
        let m = Model::load(Path::new(path), &c.device).status(HiermdStatus::LoadFailed)?;
        // SAFETY: as above.
        unsafe { out.write(wrap(m)) };
        Ok(())
    })
}

/// As [`hiermd_model_load`] with the atoms given as arrays instead of read from the run's
/// dataset: `atomic_numbers[n_atoms]` (1..99; 0 for an atom of unknown element such as a
/// virtual site, allowed only where its token is -1), `token_of_atom[n_atoms]` (0..n_tokens-1, or
/// -1 to leave an atom out of the merge) and `ca_atom[n_tokens]` (the atom whose position is the
/// token's C-alpha position, or -1 for the centroid of its heavy atoms). The atoms must be those
/// the run was trained on, in the same order.
///
/// # Safety
/// `ctx` null or live; `path` null or NUL-terminated; the arrays null or holding `n_atoms`
/// (`n_tokens` for `ca_atom`) elements; `out` null or writable.
#[no_mangle]
#[allow(clippy::too_many_arguments)] // the system's arrays
pub unsafe extern "C" fn hiermd_model_load_with_system(
    ctx: *const HiermdContext,
    path: *const c_char,
    n_atoms: usize,
    atomic_numbers: *const u8,
    token_of_atom: *const i32,
    n_tokens: usize,
    ca_atom: *const i32,
    out: *mut *mut HiermdModel,
) -> HiermdStatus {
    guard("hiermd_model_load_with_system", || {
        non_null(out, "out")?;
        // SAFETY: checked non-null; writable per the contract.
        unsafe { out.write(std::ptr::null_mut()) };
        // SAFETY: per the contract.
        let c = unsafe { context(ctx) }?;
        // SAFETY: per the contract.
        let path = unsafe { string(path, "path") }?;
        non_null(atomic_numbers, "atomic_numbers")?;
        non_null(token_of_atom, "token_of_atom")?;
        non_null(ca_atom, "ca_atom")?;
        if n_atoms == 0 || n_tokens == 0 {
            return err(
                HiermdStatus::WrongSize,
                format!("n_atoms = {n_atoms}, n_tokens = {n_tokens}: both must be positive"),
            );
        }
        // SAFETY: non-null and holding the given counts per the contract.
        let (z, tok, ca) = unsafe {
            (
                std::slice::from_raw_parts(atomic_numbers, n_atoms),
                std::slice::from_raw_parts(token_of_atom, n_atoms),
                std::slice::from_raw_parts(ca_atom, n_tokens),
            )
        };
        let mut token = Vec::with_capacity(n_atoms);
        for (a, &t) in tok.iter().enumerate() {
            token.push(match t {
                -1 => u32::MAX,
                t if t >= 0 && (t as usize) < n_tokens => t as u32,
                t => {
                    return err(
                        HiermdStatus::InvalidArgument,
                        format!("token_of_atom[{a}] = {t}: expected -1 or 0..{n_tokens}"),
                    )
                }
            });
        }
        let mut cas = Vec::with_capacity(n_tokens);
        for (r, &a) in ca.iter().enumerate() {
            cas.push(match a {
                -1 => None,
                a if a >= 0 && (a as usize) < n_atoms => Some(a as usize),
                a => {
                    return err(
                        HiermdStatus::InvalidArgument,
                        format!("ca_atom[{r}] = {a}: expected -1 or 0..{n_atoms}"),
                    )
                }
            });
        }
        let system = System {
            atomic_numbers: z.to_vec(),
            token_of_atom: token,
            tokens: n_tokens,
            ca_atom: cas,
        };
        system.validate().status(HiermdStatus::InvalidArgument)?;
        let m = Model::load_with_system(Path::new(path), &c.device, &system)
            .status(HiermdStatus::LoadFailed)?;
        // SAFETY: as above.
        unsafe { out.write(wrap(m)) };
        Ok(())
    })
}

/// Columns of an output row (`*out`): VAMP outputs, or SPIB's latent dimension + 1.
///
/// # Safety
/// `model` null or live; `out` null or writable.
#[no_mangle]
pub unsafe extern "C" fn hiermd_model_width(
    model: *const HiermdModel,
    out: *mut usize,
) -> HiermdStatus {
    guard("hiermd_model_width", || {
        // SAFETY: per the contract.
        let m = unsafe { self::model(model) }?;
        // SAFETY: per the contract.
        unsafe { write_out(out, "out", m.width) }
    })
}

/// Atoms per frame (`*out`): positions are `[n_frames][atoms][3]`.
///
/// # Safety
/// `model` null or live; `out` null or writable.
#[no_mangle]
pub unsafe extern "C" fn hiermd_model_atoms(
    model: *const HiermdModel,
    out: *mut usize,
) -> HiermdStatus {
    guard("hiermd_model_atoms", || {
        // SAFETY: per the contract.
        let m = unsafe { self::model(model) }?;
        // SAFETY: per the contract.
        unsafe { write_out(out, "out", m.atoms) }
    })
}

/// Tokens (residues) per frame (`*out`).
///
/// # Safety
/// `model` null or live; `out` null or writable.
#[no_mangle]
pub unsafe extern "C" fn hiermd_model_tokens(
    model: *const HiermdModel,
    out: *mut usize,
) -> HiermdStatus {
    guard("hiermd_model_tokens", || {
        // SAFETY: per the contract.
        let m = unsafe { self::model(model) }?;
        // SAFETY: per the contract.
        unsafe { write_out(out, "out", m.tokens) }
    })
}

/// Name of output column `index` (`*out`: `p0`, `p1`, ... for VAMP; `z1`, ..., `state` for
/// SPIB), a string owned by the model.
///
/// # Safety
/// `model` null or live; `out` null or writable.
#[no_mangle]
pub unsafe extern "C" fn hiermd_model_column_name(
    model: *const HiermdModel,
    index: usize,
    out: *mut *const c_char,
) -> HiermdStatus {
    guard("hiermd_model_column_name", || {
        // SAFETY: per the contract.
        let m = unsafe { self::model(model) }?;
        let Some(c) = m.columns.get(index) else {
            return err(
                HiermdStatus::WrongSize,
                format!("column {index} of {}", m.columns.len()),
            );
        };
        // SAFETY: per the contract.
        unsafe { write_out(out, "out", c.as_ptr()) }
    })
}

const ALIGN: usize = 64;

/// (positions staging, output staging) bytes for `n` frames, each rounded up to 64 bytes.
fn workspace_layout(m: &HiermdModel, n: usize) -> CResult<(usize, usize)> {
    let round = |x: Option<usize>| {
        x.and_then(|b| b.checked_next_multiple_of(ALIGN))
            .ok_or(CError {
                status: HiermdStatus::WrongSize,
                msg: format!("n_frames = {n} overflows the workspace size"),
            })
    };
    let pos = round(n.checked_mul(m.atoms * 3).and_then(|x| x.checked_mul(4)))?;
    let out = round(n.checked_mul(m.width).and_then(|x| x.checked_mul(4)))?;
    pos.checked_add(out).ok_or(CError {
        status: HiermdStatus::WrongSize,
        msg: format!("n_frames = {n} overflows the workspace size"),
    })?;
    Ok((pos, out))
}

/// Bytes of HOST memory (`*out_bytes`) that [`hiermd_model_evaluate`] needs as its workspace
/// for `n_frames` frames: staging for positions copied from the device and for outputs
/// copied to it. Enough for any call with at most `n_frames` frames. Allocate it once (any
/// 4-byte alignment; pinned memory makes the cuda copies faster) and reuse it.
///
/// # Safety
/// `model` null or live; `out_bytes` null or writable.
#[no_mangle]
pub unsafe extern "C" fn hiermd_model_workspace_size(
    model: *const HiermdModel,
    n_frames: usize,
    out_bytes: *mut usize,
) -> HiermdStatus {
    guard("hiermd_model_workspace_size", || {
        // SAFETY: per the contract.
        let m = unsafe { self::model(model) }?;
        if n_frames == 0 {
            return err(HiermdStatus::InvalidArgument, "n_frames = 0");
        }
        let (p, o) = workspace_layout(m, n_frames)?;
        // SAFETY: per the contract.
        unsafe { write_out(out_bytes, "out_bytes", p + o) }
    })
}

/// Copies `dst.len()` floats from the device pointer `src`, enqueued on `stream`, and waits.
fn download(device: &Device, dst: &mut [f32], src: *const f32, stream: *mut c_void) -> CResult<()> {
    let Device::Cuda(d) = device else {
        unreachable!("download is for cuda only")
    };
    d.bind().status(HiermdStatus::CudaError)?;
    use cudarc::driver::{result, sys};
    let s = stream as sys::CUstream;
    // SAFETY: the caller promised `src` holds dst.len() floats on this device; the copy is
    // waited for before `dst` is read.
    unsafe {
        result::memcpy_dtoh_async(dst, src as sys::CUdeviceptr, s)
            .and_then(|_| result::stream::synchronize(s))
    }
    .map_err(|e| CError {
        status: HiermdStatus::CudaError,
        msg: format!("copying the positions from the device: {e:?}"),
    })
}

/// Copies `src` to the device pointer `dst`, enqueued on `stream`, and waits.
fn upload(device: &Device, dst: *mut f32, src: &[f32], stream: *mut c_void) -> CResult<()> {
    let Device::Cuda(d) = device else {
        unreachable!("upload is for cuda only")
    };
    d.bind().status(HiermdStatus::CudaError)?;
    use cudarc::driver::{result, sys};
    let s = stream as sys::CUstream;
    // SAFETY: the caller promised `dst` holds src.len() floats on this device; the copy is
    // waited for before `src` (the workspace) is handed back.
    unsafe {
        result::memcpy_htod_async(dst as sys::CUdeviceptr, src, s)
            .and_then(|_| result::stream::synchronize(s))
    }
    .map_err(|e| CError {
        status: HiermdStatus::CudaError,
        msg: format!("copying the outputs to the device: {e:?}"),
    })
}

/// Evaluates `n_frames` frames: `positions` `[n_frames][atoms][3]` float, Angstrom; writes
/// `[n_frames][width]` floats to `out` (the rows `hiermd transform` writes for the same frames).
///
/// - `cells`: null (open boundaries) or `n_cells` (1 for all frames, or `n_frames`) boxes of
///   3 x 3 floats in host memory, rows = box vectors a, b, c in Angstrom (a along x, b in the xy
///   plane).
/// - `flags`: [`HIERMD_POSITIONS_ON_DEVICE`] | [`HIERMD_OUT_ON_DEVICE`] for device pointers
///   (cuda); 0 for host pointers.
/// - `workspace`: at least [`hiermd_model_workspace_size`]`(n_frames)` bytes of host memory,
///   4-byte aligned; its contents are undefined afterwards.
/// - `stream`: cuda: the `CUstream` the copies of device pointers are enqueued on (null: the
///   legacy default stream); cpu and emu: must be null.
///
/// Synchronous: returns when `out` is written (see the module documentation for streams).
/// The frames are one batch: activations grow with `n_frames`.
///
/// # Safety
/// `model` null or live; `positions`, `out` null or holding the given sizes in the memory
/// `flags` says; `cells` null or holding `n_cells * 9` floats; `workspace` null or holding
/// `workspace_bytes` bytes; `stream` null or a valid stream of the device's primary context.
#[no_mangle]
#[allow(clippy::too_many_arguments)] // the operands of one evaluation
pub unsafe extern "C" fn hiermd_model_evaluate(
    model: *const HiermdModel,
    positions: *const f32,
    n_frames: usize,
    cells: *const f32,
    n_cells: usize,
    out: *mut f32,
    flags: u32,
    workspace: *mut c_void,
    workspace_bytes: usize,
    stream: *mut c_void,
) -> HiermdStatus {
    guard("hiermd_model_evaluate", || {
        // SAFETY: per the contract.
        let m = unsafe { self::model(model) }?;
        non_null(positions, "positions")?;
        non_null(out, "out")?;
        non_null(workspace, "workspace")?;
        if n_frames == 0 {
            return err(HiermdStatus::InvalidArgument, "n_frames = 0");
        }
        if flags & !(HIERMD_POSITIONS_ON_DEVICE | HIERMD_OUT_ON_DEVICE) != 0 {
            return err(
                HiermdStatus::InvalidArgument,
                format!("flags = {flags:#x}: unknown bits"),
            );
        }
        let host = m.device.is_host();
        if host && !stream.is_null() {
            return err(
                HiermdStatus::InvalidArgument,
                format!(
                    "stream must be null on the {} device (its work runs on the host)",
                    m.device.name()
                ),
            );
        }
        let (pos_bytes, out_bytes) = workspace_layout(m, n_frames)?;
        if workspace_bytes < pos_bytes + out_bytes {
            return err(
                HiermdStatus::WorkspaceTooSmall,
                format!(
                    "{workspace_bytes} bytes of workspace; {n_frames} frames need {} \
                     (hiermd_model_workspace_size)",
                    pos_bytes + out_bytes
                ),
            );
        }
        if !(workspace as usize).is_multiple_of(4) {
            return err(
                HiermdStatus::WorkspaceTooSmall,
                "the workspace is not 4-byte aligned",
            );
        }
        let cells = if cells.is_null() {
            if n_cells != 0 {
                return err(
                    HiermdStatus::NullPointer,
                    format!("cells is null but n_cells = {n_cells}"),
                );
            }
            None
        } else {
            if n_cells != 1 && n_cells != n_frames {
                return err(
                    HiermdStatus::WrongSize,
                    format!("n_cells = {n_cells} for {n_frames} frames (expected 1 or {n_frames})"),
                );
            }
            // SAFETY: non-null, holding n_cells * 9 floats per the contract.
            let raw = unsafe { std::slice::from_raw_parts(cells, n_cells * 9) };
            Some(
                raw.chunks_exact(9)
                    .map(|c| UnitCell {
                        vectors: [[c[0], c[1], c[2]], [c[3], c[4], c[5]], [c[6], c[7], c[8]]],
                    })
                    .collect::<Vec<_>>(),
            )
        };
        let (np, no) = (n_frames * m.atoms * 3, n_frames * m.width);
        // SAFETY: non-null, 4-byte aligned and holding pos_bytes + out_bytes bytes (checked).
        let (ws_pos, ws_out) = unsafe {
            let base = workspace.cast::<f32>();
            (
                std::slice::from_raw_parts_mut(base, np),
                std::slice::from_raw_parts_mut(base.add(pos_bytes / 4), no),
            )
        };
        let pos: &[f32] = if !host && flags & HIERMD_POSITIONS_ON_DEVICE != 0 {
            download(&m.device, ws_pos, positions, stream)?;
            ws_pos
        } else {
            // SAFETY: host memory holding np floats per the contract (on cpu and emu device
            // pointers are host pointers).
            unsafe { std::slice::from_raw_parts(positions, np) }
        };
        let mut model = m.model.lock().unwrap_or_else(|p| p.into_inner());
        model
            .check(pos.len(), n_frames, cells.as_deref(), no)
            .status(HiermdStatus::WrongSize)?;
        if !host && flags & HIERMD_OUT_ON_DEVICE != 0 {
            model
                .evaluate(pos, n_frames, cells.as_deref(), ws_out)
                .status(HiermdStatus::EvaluationFailed)?;
            drop(model);
            upload(&m.device, out, ws_out, stream)
        } else {
            // SAFETY: host memory holding no floats per the contract.
            let out = unsafe { std::slice::from_raw_parts_mut(out, no) };
            model
                .evaluate(pos, n_frames, cells.as_deref(), out)
                .status(HiermdStatus::EvaluationFailed)
        }
    })
}

/// Frees a model (null: nothing happens).
///
/// # Safety
/// `model` is null or a model from `hiermd_model_load*` not destroyed yet, used by no other
/// thread.
#[no_mangle]
pub unsafe extern "C" fn hiermd_model_destroy(model: *mut HiermdModel) {
    if !model.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: from Box::into_raw in `wrap`, per the contract.
            drop(unsafe { Box::from_raw(model) })
        }));
    }
}
