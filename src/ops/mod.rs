//! Operations. Each op has a CPU twin in Rust (generic over [`Real`], so the same code is the
//! cpu device's f32 implementation and the tests' f64 reference), a CUDA kernel of the same name
//! in `cuda/`, and a backward; tests in `tests/` of the same name run it on every device.

/// Defines `$name(args)`, which runs `body` (the block given, as an `#[inline(always)]`
/// function of the same arguments) compiled for the widest vector extension this CPU has
/// ([`simd_level`]), and `$at(level, args)`, which runs it at `level` or the CPU's, whichever
/// is lower (tests compare the builds). Each build is a `#[target_feature]` copy of the same
/// body, so they give the same bits.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident / $at:ident <$R:ident: $bound:path>
        ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        #[inline]
        $vis fn $name<$R: $bound>($($arg: $ty),*) $(-> $ret)? {
            $at($crate::ops::simd_level(), $($arg),*)
        }

        /// As the function without `_at`, at vector level `level` (0 baseline, 1 AVX2,
        /// 2 AVX-512) or this CPU's, whichever is lower.
        #[allow(dead_code, clippy::too_many_arguments)]
        $vis fn $at<$R: $bound>(level: u8, $($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<$R: $bound>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<$R: $bound>($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx512f,avx512vl,avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512<$R: $bound>($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match level.min($crate::ops::simd_level()) {
                    // SAFETY: the CPU has the features (asked at run time, just above).
                    2 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    1 => return unsafe { avx2($($arg),*) },
                    _ => {}
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = level;
            body($($arg),*)
        }
    };
}

pub mod dropout;
pub mod elementwise;
pub mod eqsdpa;
pub mod equivariant;
pub mod gemm;
pub mod gemm_cublas;
pub mod graph_conv;
pub mod neighbor_list;
pub mod painn;
pub mod reduce;
pub mod scatter;
pub mod softmax;
pub mod tokens;
pub mod torchmd_et;

use crate::device::Device;
use crate::tensor::{Element, Tensor};
use anyhow::{bail, Result};

/// The widest vector build of the CPU twins' hot loops this CPU runs, asked once: 0 the
/// target's baseline, 1 AVX2, 2 AVX-512 (F and VL). Loops compiled for each level
/// (`#[target_feature]` copies of one `#[inline(always)]` body) give the same bits: they use no
/// fused multiply-adds, which LLVM never forms from `a * b + c` on its own.
pub(crate) fn simd_level() -> u8 {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                2
            } else {
                u8::from(is_x86_feature_detected!("avx2"))
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            0
        }
    })
}

/// The float types the CPU twins are written for.
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::iter::Sum
{
    /// Conversion from f64.
    fn of(v: f64) -> Self;
    /// e^self.
    fn exp(self) -> Self;
}
impl Real for f32 {
    fn of(v: f64) -> Self {
        v as f32
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
}
impl Real for f64 {
    fn of(v: f64) -> Self {
        v
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

/// Elements per rayon task in the CPU twins: large enough that scheduling is noise.
pub(crate) const CPU_CHUNK: usize = 1 << 14;

/// Checks that every tensor of an op lives on one device and has the length the op expects;
/// returns that device.
pub(crate) fn same_device<'a>(
    op: &str,
    first: &'a Device,
    others: &[&Device],
) -> Result<&'a Device> {
    for d in others {
        if !first.same(d) {
            bail!(
                "{op}: operands on different devices ({} and {})",
                first.name(),
                d.name()
            );
        }
    }
    Ok(first)
}

/// Checks a tensor's length.
pub(crate) fn expect_len<T: Element>(
    op: &str,
    name: &str,
    t: &Tensor<T>,
    len: usize,
) -> Result<()> {
    if t.len() != len {
        bail!(
            "{op}: {name} has shape {:?} ({} elements), expected {len} elements",
            t.shape(),
            t.len()
        );
    }
    Ok(())
}
