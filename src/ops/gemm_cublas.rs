//! The cuda device's optional cuBLAS path for the products of [`super::gemm`], loaded at run time.
//!
//! # Selection
//!
//! [`GemmBackend`] chooses who multiplies on a cuda device: [`GemmBackend::Ours`] (the kernels of
//! `cuda/gemm.cu`), [`GemmBackend::Cublas`] (f32 through `cublasSgemm` /
//! `cublasSgemmStridedBatched`, bf16/f16 through `cublasGemmEx` / `cublasGemmStridedBatchedEx`
//! with f32 accumulation) or [`GemmBackend::Auto`]. It is read once from the environment variable
//! `HIERMD_GEMM=ours|cublas|auto`, and programs may override it with [`set_backend`]. The cpu and
//! emu devices ignore it: they have no cuBLAS.
//!
//! **The default is `ours`**, because no GPU measurement of the two exists yet (benches/gemm.rs
//! prints both side by side on a GPU, with their ratio). Once benches/RESULTS.md holds GPU
//! numbers, `auto` is meant to pick per shape class from that measured table; until then `auto`
//! means cuBLAS for f32 products when it is available and our kernels for everything else.
//!
//! # Fallback
//!
//! libcublas is opened with `dlopen` on first use (cudarc's dynamic loading): the crate builds and
//! runs where none is installed. When cuBLAS is selected but cannot be used (no libcublas, a
//! library lacking a function we call, a handle that cannot be created), the product runs on our
//! kernels and one note per distinct reason goes to stderr ([`notes`] lists them); nothing
//! panics. A product cuBLAS rejects as unsupported falls back the same way. Other cuBLAS errors
//! are returned as errors.
//!
//! Products that stay on our kernels even when cuBLAS is selected: a Linear forward with a bias
//! (cuBLAS GEMM has no bias epilogue; ours adds it in the epilogue), and `alpha = 0` or `k = 0`
//! (BLAS says `alpha = 0` reads neither A nor B, which cuBLAS does not document; ours guarantees
//! it).
//!
//! # Layout
//!
//! hiermd's matrices are row-major and cuBLAS's are column-major. A row-major `[r, c]` matrix is,
//! read column-major with the same leading dimension, its transpose `[c, r]`. So instead of
//! `C = op(A) op(B)` we ask cuBLAS for `C^T = op(B)^T op(A)^T`: B is passed first and A second,
//! each with its own transpose flag unchanged (a row-major B read column-major already *is* B^T),
//! the dimensions m and n swap, and the leading dimensions are the stored row lengths. Batches
//! keep their strides (cuBLAS accepts stride 0 for a shared A or B).
//!
//! # BLAS semantics
//!
//! `beta = 0` assigns C without reading it (cuBLAS: "if beta == 0, C does not have to be a valid
//! input"), so a NaN-poisoned C is fine, as on our kernels. `alpha` and the transposes are passed
//! through.
//!
//! # Accuracy and determinism
//!
//! Our kernels are deterministic by construction: each output is one fixed-order sum (no
//! atomics, no split-k), on every GPU. cuBLAS promises less: bitwise the same results from run to
//! run for one cuBLAS version on GPUs of the same architecture and SM count, whatever algorithm
//! it picks (split-k included). Its documentation warns that concurrent streams sharing a handle
//! can break this (workspace selection) and lists one handle per stream as a remedy: that is the
//! layout here, one handle per [`CudaDevice`] bound to that device's one stream, so
//! `CUBLAS_WORKSPACE_CONFIG` is not needed (setting it, e.g. `:4096:8`, does no harm). Atomics
//! stay disallowed (`cublasSetAtomicsMode`, cuBLAS's default, set explicitly). Results are not
//! reproducible across cuBLAS versions or GPU models, and differ from ours in the last bits
//! (another summation order). The math mode is `CUBLAS_DEFAULT_MATH`: f32 products are computed
//! in f32, never TF32, so they meet the same error bound as ours.

use super::gemm::{Batch, HalfFloat};
use crate::device::{CudaDevice, Device};
use crate::tensor::{DType, Tensor};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublas::sys as cb;
use std::ffi::{c_int, c_longlong, c_void};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

/// The environment variable that selects the cuda device's GEMM: `ours`, `cublas` or `auto`.
pub const ENV_VAR: &str = "HIERMD_GEMM";

/// Who computes the cuda device's GEMMs (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmBackend {
    /// hiermd's kernels (`cuda/gemm.cu`), deterministic by construction. The default.
    Ours,
    /// cuBLAS for every product it can take (f32, bf16 and f16), when libcublas loads.
    Cublas,
    /// Per shape class from a measured table, once GPU numbers exist; for now cuBLAS for f32
    /// products when it is available, our kernels for the rest.
    Auto,
}

impl GemmBackend {
    /// Whether this backend hands a product to cuBLAS (if cuBLAS can be used): `half` is true for
    /// bf16/f16 operands.
    pub fn wants_cublas(self, half: bool) -> bool {
        match self {
            Self::Ours => false,
            Self::Cublas => true,
            Self::Auto => !half,
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::Ours => 1,
            Self::Cublas => 2,
            Self::Auto => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(Self::Ours),
            2 => Some(Self::Cublas),
            3 => Some(Self::Auto),
            _ => None,
        }
    }
}

impl FromStr for GemmBackend {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ours" => Ok(Self::Ours),
            "cublas" => Ok(Self::Cublas),
            "auto" => Ok(Self::Auto),
            _ => bail!("unknown GEMM backend {s:?}: expected ours, cublas or auto"),
        }
    }
}

impl fmt::Display for GemmBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ours => "ours",
            Self::Cublas => "cublas",
            Self::Auto => "auto",
        })
    }
}

/// The backend a value of `HIERMD_GEMM` names: unset or blank is [`GemmBackend::Ours`]; anything
/// but `ours`, `cublas` or `auto` (any case) is an error.
pub fn parse_env_value(value: Option<&str>) -> Result<GemmBackend> {
    match value {
        None => Ok(GemmBackend::Ours),
        Some(v) if v.trim().is_empty() => Ok(GemmBackend::Ours),
        Some(v) => v.parse().with_context(|| format!("{ENV_VAR}={v:?}")),
    }
}

/// `HIERMD_GEMM`, read once per process. A value we cannot use gives a note and `ours`: a typo
/// must not stop a run, but must not pass unnoticed either.
fn env_backend() -> GemmBackend {
    static ENV: OnceLock<GemmBackend> = OnceLock::new();
    *ENV.get_or_init(|| {
        let parsed = match std::env::var(ENV_VAR) {
            Ok(v) => parse_env_value(Some(&v)),
            Err(std::env::VarError::NotPresent) => parse_env_value(None),
            Err(e) => Err(anyhow!("{ENV_VAR}: {e}")),
        };
        parsed.unwrap_or_else(|e| {
            note_once(format!("{e:#}; using our GEMM kernels"));
            GemmBackend::Ours
        })
    })
}

/// The program's choice from [`set_backend`] (a [`GemmBackend::code`]), 0 for none.
static OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// Selects the backend for every later product in this process, over `HIERMD_GEMM`. Products
/// already queued are not affected.
pub fn set_backend(backend: GemmBackend) {
    OVERRIDE.store(backend.code(), Ordering::Relaxed);
}

/// Forgets [`set_backend`]'s choice: `HIERMD_GEMM` (or the default, `ours`) decides again.
pub fn clear_backend() {
    OVERRIDE.store(0, Ordering::Relaxed);
}

/// The backend in force: [`set_backend`]'s choice, else `HIERMD_GEMM`, else `ours`.
pub fn backend() -> GemmBackend {
    GemmBackend::from_code(OVERRIDE.load(Ordering::Relaxed)).unwrap_or_else(env_backend)
}

// ---------------------------------------------------------------------------------------------
// Notes.

/// The fallback notes printed so far, one per distinct reason.
static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Prints `msg` to stderr the first time it comes up in this process.
fn note_once(msg: String) {
    let mut notes = NOTES.lock().unwrap_or_else(|e| e.into_inner());
    if !notes.contains(&msg) {
        eprintln!("hiermd: {msg}");
        notes.push(msg);
    }
}

/// Every note this module has printed (to stderr, each once): why cuBLAS was selected but our
/// kernels ran, or why `HIERMD_GEMM` was not understood.
pub fn notes() -> Vec<String> {
    NOTES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

// ---------------------------------------------------------------------------------------------
// The library.

/// The cuBLAS functions this module calls. cudarc resolves each on its first call and panics if
/// the library lacks it, so they are all looked up once, before any is called.
const SYMBOLS: [&str; 10] = [
    "cublasGetProperty",
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSetMathMode",
    "cublasSetAtomicsMode",
    "cublasSgemm_v2",
    "cublasSgemmStridedBatched",
    "cublasGemmEx",
    "cublasGemmStridedBatchedEx",
];

/// Opens libcublas and checks it has what we call; returns its version.
fn load_library() -> std::result::Result<String, String> {
    // SAFETY: only tries to dlopen the library under the names cudarc knows.
    if !unsafe { cb::is_culib_present() } {
        if let Some(why) = load_failure() {
            return Err(format!("libcublas is there but does not load: {why}"));
        }
        return Err(
            "libcublas not found (looked for libcublas.so, libcublas.so.13, .12, .11 on \
             the library path; scripts/gpu-check adds the pip nvidia-cublas wheel's lib folder \
             to LD_LIBRARY_PATH when it is installed)"
                .into(),
        );
    }
    // SAFETY: the library is present, so `culib` loads it rather than panicking; looking up a
    // symbol calls nothing.
    let lib = unsafe { cb::culib() };
    for name in SYMBOLS {
        unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }
            .map_err(|e| format!("libcublas lacks {name}: {e}"))?;
    }
    let mut v = [0 as c_int; 3];
    let props = [
        cb::libraryPropertyType::MAJOR_VERSION,
        cb::libraryPropertyType::MINOR_VERSION,
        cb::libraryPropertyType::PATCH_LEVEL,
    ];
    for (v, prop) in v.iter_mut().zip(props) {
        // SAFETY: checked present above; writes one int.
        unsafe { cb::cublasGetProperty(prop, v) }
            .result()
            .map_err(|e| format!("cublasGetProperty failed: {e}"))?;
    }
    Ok(format!("cuBLAS {}.{}.{}", v[0], v[1], v[2]))
}

/// Why a libcublas that exists does not load (a dependency such as libcublasLt missing, a wrong
/// architecture), from dlopen's own message; None when none of the usual names exists at all.
/// cudarc only says whether one loaded, and "not found" would hide such a library.
#[cfg(unix)]
fn load_failure() -> Option<String> {
    use std::ffi::{CStr, CString};
    ["libcublas.so.13", "libcublas.so.12", "libcublas.so"]
        .into_iter()
        .find_map(|name| {
            let cname = CString::new(name).ok()?;
            // SAFETY: dlopen of a NUL-terminated name, closed again at once; dlerror's string is
            // copied before the next dl call.
            unsafe {
                let h = libc::dlopen(cname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
                if !h.is_null() {
                    libc::dlclose(h);
                    return None;
                }
                let e = libc::dlerror();
                let e = (!e.is_null()).then(|| CStr::from_ptr(e).to_string_lossy().into_owned())?;
                // "libcublas.so.13: cannot open shared object file" is plain absence.
                (!e.starts_with(&format!("{name}:"))).then_some(e)
            }
        })
}

#[cfg(not(unix))]
fn load_failure() -> Option<String> {
    None
}

/// libcublas, opened once per process: its version, or why it cannot be used.
fn library_state() -> &'static std::result::Result<String, String> {
    static LIB: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        // load_library avoids every panic cudarc has on this path; this only keeps a future
        // cudarc that panics elsewhere from taking the program down.
        std::panic::catch_unwind(load_library)
            .unwrap_or_else(|_| Err("opening libcublas panicked inside cudarc".into()))
    })
}

/// Set by [`simulate_missing_library`].
static SIMULATE_MISSING: AtomicBool = AtomicBool::new(false);

/// A test hook: while `missing` is true this module behaves as if libcublas were absent (cuBLAS
/// selected falls back to our kernels, with a note), so that the fallback can be tested on a
/// machine that has the library.
#[doc(hidden)]
pub fn simulate_missing_library(missing: bool) {
    SIMULATE_MISSING.store(missing, Ordering::Relaxed);
}

/// Whether libcublas can be used in this process: its version ("cuBLAS 13.0.2"), or why not.
/// Opens the library on the first call. Needs no GPU.
pub fn library() -> Result<String> {
    if SIMULATE_MISSING.load(Ordering::Relaxed) {
        bail!("libcublas treated as missing (gemm_cublas::simulate_missing_library)");
    }
    library_state().clone().map_err(|e| anyhow!(e))
}

// ---------------------------------------------------------------------------------------------
// Handles.

/// Where a [`CudaDevice`] keeps its cuBLAS handle, or why it could not be made.
pub(crate) type HandleSlot = OnceLock<std::result::Result<CublasHandle, String>>;

/// A cuBLAS handle bound to one [`CudaDevice`]'s context and stream. Held by the device (see
/// `CudaDevice::cublas`), which destroys it before releasing its context.
pub(crate) struct CublasHandle {
    /// The handle. Only its fixed settings are shared: the mutex keeps one product's calls
    /// together (cuBLAS allows sharing a handle across threads, but advises against it).
    raw: Mutex<HandlePtr>,
}

struct HandlePtr(cb::cublasHandle_t);

// SAFETY: a cuBLAS handle may be used from any thread (cuBLAS is thread-safe); every use goes
// through the mutex, with the device's context made current first.
unsafe impl Send for HandlePtr {}

impl CublasHandle {
    /// Creates a handle in `dev`'s context, bound to its stream, with the settings the module
    /// docs promise.
    fn create(dev: &CudaDevice) -> std::result::Result<Self, String> {
        let ordinal = dev.info().ordinal;
        dev.bind()
            .map_err(|e| format!("cuda:{ordinal}: binding the context for cuBLAS: {e:#}"))?;
        let raw = cudarc::cublas::result::create_handle()
            .map_err(|e| format!("cuda:{ordinal}: cublasCreate failed: {e}"))?;
        let handle = Self {
            raw: Mutex::new(HandlePtr(raw)),
        };
        // SAFETY: `raw` is a live handle of this context; the stream is the device's, which
        // outlives the handle (the device drops the handle first).
        let setup = unsafe {
            cb::cublasSetStream_v2(raw, dev.stream() as cb::cudaStream_t)
                .result()
                .map_err(|e| format!("cublasSetStream: {e}"))
                .and_then(|()| {
                    cb::cublasSetMathMode(raw, cb::cublasMath_t::CUBLAS_DEFAULT_MATH)
                        .result()
                        .map_err(|e| format!("cublasSetMathMode: {e}"))
                })
                .and_then(|()| {
                    cb::cublasSetAtomicsMode(
                        raw,
                        cb::cublasAtomicsMode_t::CUBLAS_ATOMICS_NOT_ALLOWED,
                    )
                    .result()
                    .map_err(|e| format!("cublasSetAtomicsMode: {e}"))
                })
        };
        // On failure `handle` is dropped here, which destroys it.
        setup.map_err(|e| format!("cuda:{ordinal}: {e}"))?;
        Ok(handle)
    }
}

impl Drop for CublasHandle {
    fn drop(&mut self) {
        let raw = self.raw.get_mut().unwrap_or_else(|e| e.into_inner()).0;
        // SAFETY: created by `create`, destroyed once; the device calls this with its context
        // current and before releasing it.
        let _ = unsafe { cudarc::cublas::result::destroy_handle(raw) };
    }
}

/// `dev`'s cuBLAS handle, made on first use; or why cuBLAS cannot run there.
fn handle(dev: &CudaDevice) -> Result<&CublasHandle> {
    library()?;
    dev.cublas
        .get_or_init(|| CublasHandle::create(dev))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

/// Whether cuBLAS can run on `dev`: a line naming the library and the device, or why not (on cpu
/// and emu always not: they have no cuBLAS). On cuda this creates the device's handle.
pub fn status(dev: &Device) -> Result<String> {
    match dev {
        Device::Cuda(cuda) => {
            handle(cuda)?;
            Ok(format!(
                "{} on {} ({})",
                library()?,
                dev.name(),
                cuda.info().name
            ))
        }
        _ => bail!(
            "cuBLAS runs only on cuda devices; {} always uses hiermd's own GEMM",
            dev.name()
        ),
    }
}

/// Products cuBLAS has computed in this process (each batched call counts once): how a test or a
/// benchmark tells that cuBLAS really ran.
pub fn calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

static CALLS: AtomicU64 = AtomicU64::new(0);

// ---------------------------------------------------------------------------------------------
// The products.

/// The element types cuBLAS is given.
#[derive(Clone, Copy)]
enum Operands {
    /// f32 A and B: `cublasSgemm`.
    F32,
    /// 16-bit A and B of this type, f32 C and accumulation: `cublasGemmEx`.
    Half(cb::cudaDataType),
}

/// One product in cuBLAS's terms, before the row-major swap.
struct Call {
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: u64,
    b: u64,
    beta: f32,
    c: u64,
    batch: Batch,
    /// Bytes per element of A and B.
    esize: u64,
}

fn op(trans: bool) -> cb::cublasOperation_t {
    if trans {
        cb::cublasOperation_t::CUBLAS_OP_T
    } else {
        cb::cublasOperation_t::CUBLAS_OP_N
    }
}

/// Runs `call` on cuBLAS if the backend asks for it and cuBLAS works on `dev`. Ok(true): done
/// (queued on the device's stream); Ok(false): not taken, the caller runs our kernel.
fn try_run(dev: &CudaDevice, what: &str, operands: Operands, call: &Call) -> Result<bool> {
    let half = matches!(operands, Operands::Half(_));
    if !backend().wants_cublas(half) || call.alpha == 0.0 || call.k == 0 {
        return Ok(false);
    }
    let h = match handle(dev) {
        Ok(h) => h,
        Err(why) => {
            note_once(format!(
                "cuBLAS selected ({ENV_VAR} or set_backend) but unavailable on cuda:{}: {why:#}; \
                 using our GEMM kernels",
                dev.info().ordinal
            ));
            return Ok(false);
        }
    };
    dev.bind()?;
    let raw = h.raw.lock().unwrap_or_else(|e| e.into_inner());
    let Call {
        transa,
        transb,
        m,
        n,
        k,
        alpha,
        beta,
        batch,
        esize,
        ..
    } = *call;
    // C^T (n x m, column-major, leading dimension n) = op(B)^T op(A)^T: see the module docs.
    // Leading dimensions are the stored row lengths (at least 1: m, n, k > 0 here).
    let (lda, ldb) = (
        if transa { m } else { k } as c_int,
        if transb { k } else { n } as c_int,
    );
    let (cm, cn, ck, ldc) = (n as c_int, m as c_int, k as c_int, n as c_int);
    let (opb, opa) = (op(transb), op(transa));
    let alpha_ptr = &alpha as *const f32;
    let beta_ptr = &beta as *const f32;
    let mut first = 0usize;
    while first < batch.count {
        // cuBLAS counts a batch in an int.
        let chunk = (batch.count - first).min(c_int::MAX as usize);
        let off = first as u64;
        let a = call.a + off * batch.stride_a as u64 * esize;
        let b = call.b + off * batch.stride_b as u64 * esize;
        let c = call.c + off * batch.stride_c as u64 * 4;
        let (sa, sb, sc) = (
            batch.stride_a as c_longlong,
            batch.stride_b as c_longlong,
            batch.stride_c as c_longlong,
        );
        // SAFETY: the device pointers come from tensors of this device whose sizes the caller
        // checked for the whole batch (gemm.rs `check_problem`); the handle belongs to this
        // device's current context and queues on its stream; alpha and beta are host scalars
        // (the default pointer mode) that outlive the call, which reads them before returning.
        let status = unsafe {
            match (operands, chunk) {
                (Operands::F32, 1) => cb::cublasSgemm_v2(
                    raw.0,
                    opb,
                    opa,
                    cm,
                    cn,
                    ck,
                    alpha_ptr,
                    b as *const f32,
                    ldb,
                    a as *const f32,
                    lda,
                    beta_ptr,
                    c as *mut f32,
                    ldc,
                ),
                (Operands::F32, _) => cb::cublasSgemmStridedBatched(
                    raw.0,
                    opb,
                    opa,
                    cm,
                    cn,
                    ck,
                    alpha_ptr,
                    b as *const f32,
                    ldb,
                    sb,
                    a as *const f32,
                    lda,
                    sa,
                    beta_ptr,
                    c as *mut f32,
                    ldc,
                    sc,
                    chunk as c_int,
                ),
                (Operands::Half(t), 1) => cb::cublasGemmEx(
                    raw.0,
                    opb,
                    opa,
                    cm,
                    cn,
                    ck,
                    alpha_ptr as *const c_void,
                    b as *const c_void,
                    t,
                    ldb,
                    a as *const c_void,
                    t,
                    lda,
                    beta_ptr as *const c_void,
                    c as *mut c_void,
                    cb::cudaDataType::CUDA_R_32F,
                    ldc,
                    cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                ),
                (Operands::Half(t), _) => cb::cublasGemmStridedBatchedEx(
                    raw.0,
                    opb,
                    opa,
                    cm,
                    cn,
                    ck,
                    alpha_ptr as *const c_void,
                    b as *const c_void,
                    t,
                    ldb,
                    sb,
                    a as *const c_void,
                    t,
                    lda,
                    sa,
                    beta_ptr as *const c_void,
                    c as *mut c_void,
                    cb::cudaDataType::CUDA_R_32F,
                    ldc,
                    sc,
                    chunk as c_int,
                    cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                ),
            }
        };
        match status {
            cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS => {}
            // Refused before anything was written (cuBLAS checks before it launches): our kernel
            // can take the whole product.
            cb::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED
            | cb::cublasStatus_t::CUBLAS_STATUS_ARCH_MISMATCH
                if first == 0 =>
            {
                note_once(format!(
                    "cuBLAS does not support {what} {m}x{n}x{k} here ({status:?}); using our \
                     GEMM kernels for it"
                ));
                return Ok(false);
            }
            _ => bail!(
                "cuBLAS {what} (m x n x k = {m} x {n} x {k}, transposes {transa}/{transb}, batch \
                 {batch:?}) on cuda:{} failed: {status:?}",
                dev.info().ordinal
            ),
        }
        first += chunk;
    }
    CALLS.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}

/// The cuda f32 product `C = alpha op(A) op(B) + beta C` of [`super::gemm::gemm_batched`] on
/// cuBLAS, when the backend selects it and cuBLAS works here. Ok(false) means "not taken": the
/// caller runs our kernel. The caller has checked the operands for the whole batch.
#[allow(clippy::too_many_arguments)] // the BLAS argument list, which readers know
pub(crate) fn try_sgemm(
    dev: &CudaDevice,
    (transa, transb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    beta: f32,
    c: &mut Tensor<f32>,
    batch: Batch,
) -> Result<bool> {
    let call = Call {
        transa,
        transb,
        m,
        n,
        k,
        alpha,
        a: a.address(),
        b: b.address(),
        beta,
        c: c.address(),
        batch,
        esize: 4,
    };
    try_run(dev, "sgemm", Operands::F32, &call)
}

/// As [`try_sgemm`] for bf16/f16 A and B ([`super::gemm::gemm_half_batched`]): `cublasGemmEx`
/// with f32 C and f32 accumulation (`CUBLAS_COMPUTE_32F`).
#[allow(clippy::too_many_arguments)] // the BLAS argument list, which readers know
pub(crate) fn try_gemm_half<T: HalfFloat>(
    dev: &CudaDevice,
    (transa, transb): (bool, bool),
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: &Tensor<T>,
    b: &Tensor<T>,
    beta: f32,
    c: &mut Tensor<f32>,
    batch: Batch,
) -> Result<bool> {
    let t = match T::DTYPE {
        DType::BF16 => cb::cudaDataType::CUDA_R_16BF,
        DType::F16 => cb::cudaDataType::CUDA_R_16F,
        other => bail!("gemm_half: no cuBLAS type for {other:?}"),
    };
    let call = Call {
        transa,
        transb,
        m,
        n,
        k,
        alpha,
        a: a.address(),
        b: b.address(),
        beta,
        c: c.address(),
        batch,
        esize: size_of::<T>() as u64,
    };
    try_run(dev, "GemmEx", Operands::Half(t), &call)
}
