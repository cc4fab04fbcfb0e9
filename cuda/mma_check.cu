// Test kernels for cuda/common/mma.cuh, driven by tests/emu_mma.rs. On emu they check the shim's
// fragment layouts and conversions against a description of the PTX ISA written separately in
// Rust; on a GPU the same tests check that description (and so the shim) against the hardware.
//
// The fragment loads below spell out the layouts register by register, deliberately in another
// form than the shim's loops, so that one mistaken formula cannot hide in both.
#include "common/hiermd.cuh"
#include "common/mma.cuh"

__device__ __forceinline__ void mma_k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                        const float (&c)[4], __half) {
    mma_m16n8k16_f16(d, a, b, c);
}
__device__ __forceinline__ void mma_k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                        const float (&c)[4], __nv_bfloat16) {
    mma_m16n8k16_bf16(d, a, b, c);
}

/// One warp: d = a b + c for one m16n8k16 tile, with a (16x16), b (16x8, [k][n]), c and d (16x8)
/// row-major in global memory, each lane gathering its fragments itself (PTX ISA 9.7.14.5.8).
template <class T>
__device__ __forceinline__ void mma_k16_tile(const T* a, const T* b, const float* c, float* d) {
    const int lane = threadIdx.x % 32, g = lane / 4, t2 = 2 * (lane % 4);
    const T* a_top = a + g * 16 + t2;  // row g, columns 2t and 2t+1
    const T* a_bot = a_top + 8 * 16;   // row g+8
    const uint32_t fa[4] = {pack_b16x2(a_top[0], a_top[1]), pack_b16x2(a_bot[0], a_bot[1]),
                            pack_b16x2(a_top[8], a_top[9]), pack_b16x2(a_bot[8], a_bot[9])};
    const T* b_col = b + t2 * 8 + g;  // rows (k) 2t, 2t+1 of column g
    const uint32_t fb[2] = {pack_b16x2(b_col[0], b_col[8]), pack_b16x2(b_col[8 * 8], b_col[9 * 8])};
    const float* c_top = c + g * 8 + t2;
    const float fc[4] = {c_top[0], c_top[1], c_top[64], c_top[65]};
    float fd[4];
    mma_k16(fd, fa, fb, fc, T{});
    float* d_top = d + g * 8 + t2;
    d_top[0] = fd[0];
    d_top[1] = fd[1];
    d_top[64] = fd[2];
    d_top[65] = fd[3];
}

extern "C" __global__ void mma_f16_tile(const __half* a, const __half* b, const float* c, float* d) {
    mma_k16_tile(a, b, c, d);
}
HIERMD_EXPORT_KERNEL(mma_f16_tile)

extern "C" __global__ void mma_bf16_tile(const __nv_bfloat16* a, const __nv_bfloat16* b, const float* c, float* d) {
    mma_k16_tile(a, b, c, d);
}
HIERMD_EXPORT_KERNEL(mma_bf16_tile)

/// One warp: d = a b + c for one m16n8k8 tf32 tile, a (16x8), b (8x8, [k][n]), c, d (16x8)
/// row-major f32 (PTX ISA 9.7.14.5.7). With round_operands != 0 the operands go through cvt.rna.tf32.f32
/// first, as a real kernel does; with 0 their raw f32 bits go in, to observe what the
/// tensor cores do with the 13 low mantissa bits.
extern "C" __global__ void mma_tf32_tile(const float* a, const float* b, const float* c, float* d, int round_operands) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    auto operand = [round_operands](float x) { return round_operands ? f32_to_tf32_rna(x) : __float_as_uint(x); };
    const uint32_t fa[4] = {operand(a[g * 8 + t]), operand(a[(g + 8) * 8 + t]), operand(a[g * 8 + t + 4]),
                            operand(a[(g + 8) * 8 + t + 4])};
    const uint32_t fb[2] = {operand(b[t * 8 + g]), operand(b[(t + 4) * 8 + g])};
    const float fc[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
    float fd[4];
    mma_m16n8k8_tf32(fd, fa, fb, fc);
    d[g * 8 + 2 * t] = fd[0];
    d[g * 8 + 2 * t + 1] = fd[1];
    d[(g + 8) * 8 + 2 * t] = fd[2];
    d[(g + 8) * 8 + 2 * t + 1] = fd[3];
}
HIERMD_EXPORT_KERNEL(mma_tf32_tile)

/// One warp runs one mma on registers packed by the test: a[lane][4], b[lane][2], c[lane][4] in,
/// d[lane][4] out. kind 0: m16n8k16 f16, 1: m16n8k16 bf16, 2: m16n8k8 tf32. No layout code at all
/// on this side, so the test's own layout description meets the shim's (or the GPU's) directly.
extern "C" __global__ void mma_fragments(const uint32_t* a, const uint32_t* b, const float* c, float* d, int kind) {
    const int lane = threadIdx.x % 32;
    const uint32_t fa[4] = {a[lane * 4], a[lane * 4 + 1], a[lane * 4 + 2], a[lane * 4 + 3]};
    const uint32_t fb[2] = {b[lane * 2], b[lane * 2 + 1]};
    const float fc[4] = {c[lane * 4], c[lane * 4 + 1], c[lane * 4 + 2], c[lane * 4 + 3]};
    float fd[4];
    if (kind == 0) {
        mma_m16n8k16_f16(fd, fa, fb, fc);
    } else if (kind == 1) {
        mma_m16n8k16_bf16(fd, fa, fb, fc);
    } else {
        mma_m16n8k8_tf32(fd, fa, fb, fc);
    }
    for (int i = 0; i < 4; ++i) d[lane * 4 + i] = fd[i];
}
HIERMD_EXPORT_KERNEL(mma_fragments)

// ---------------------------------------------------------------------------------------------
// ldmatrix: the test fills a shared-memory tile with random 16-bit patterns and chooses, per lane,
// which row that lane's address points at; each lane writes out the registers it received.

constexpr int kLdmatrixTileElems = 1024;

/// Copies src[0..elems) to `tile`, then lane l loads from tile + row_offset[l] (elements, a
/// multiple of 8) with the variant (num = 1, 2, 4; trans) and writes registers to out[l][0..num).
__device__ __forceinline__ void ldmatrix_tile(unsigned short* tile, const unsigned short* src, const int* row_offset,
                                              uint32_t* out, int num, int trans, int elems) {
    for (int i = threadIdx.x; i < elems; i += blockDim.x) tile[i] = src[i];
    __syncthreads();
    const int lane = threadIdx.x % 32;
    const unsigned short* row = tile + row_offset[lane];
    uint32_t r[4] = {0, 0, 0, 0};
    // All lanes take the same branch: the variant is a kernel argument.
    if (num == 1) {
        uint32_t r1[1];
        if (trans) ldmatrix_x1_trans(r1, row);
        else ldmatrix_x1(r1, row);
        r[0] = r1[0];
    } else if (num == 2) {
        uint32_t r2[2];
        if (trans) ldmatrix_x2_trans(r2, row);
        else ldmatrix_x2(r2, row);
        r[0] = r2[0];
        r[1] = r2[1];
    } else {
        if (trans) ldmatrix_x4_trans(r, row);
        else ldmatrix_x4(r, row);
    }
    for (int m = 0; m < num; ++m) out[lane * 4 + m] = r[m];
}

/// ldmatrix from dynamic shared memory (launch with elems * 2 bytes of it).
extern "C" __global__ void ldmatrix_dynamic_smem(const unsigned short* src, const int* row_offset, uint32_t* out,
                                                 int num, int trans, int elems) {
    HIERMD_DYNAMIC_SHARED(unsigned short, tile);
    ldmatrix_tile(tile, src, row_offset, out, num, trans, elems);
}
HIERMD_EXPORT_KERNEL(ldmatrix_dynamic_smem)

/// ldmatrix from a static __shared__ array (elems <= kLdmatrixTileElems).
extern "C" __global__ void ldmatrix_static_smem(const unsigned short* src, const int* row_offset, uint32_t* out,
                                                int num, int trans, int elems) {
    __shared__ __align__(16) unsigned short tile[kLdmatrixTileElems];
    ldmatrix_tile(tile, src, row_offset, out, num, trans, elems < kLdmatrixTileElems ? elems : kLdmatrixTileElems);
}
HIERMD_EXPORT_KERNEL(ldmatrix_static_smem)

/// Broken on purpose, for an emu-only test: the warp stages a 16x16 tile (row stride 16) and
/// loads it with ldmatrix.x4 with no __syncwarp in between, so each lane may read rows that other
/// lanes have not written yet. The emu must catch it (on a GPU it is a race that usually passes).
extern "C" __global__ void ldmatrix_x4_without_barrier(const unsigned short* src, uint32_t* out) {
    HIERMD_DYNAMIC_SHARED(unsigned short, tile);
    const int lane = threadIdx.x % 32;
    for (int i = lane; i < 256; i += 32) tile[i] = src[i];
    uint32_t r[4];
    ldmatrix_x4(r, tile + (lane % 16) * 16 + (lane / 16) * 8);
    for (int m = 0; m < 4; ++m) out[lane * 4 + m] = r[m];
}
HIERMD_EXPORT_KERNEL(ldmatrix_x4_without_barrier)

// ---------------------------------------------------------------------------------------------
// ldmatrix feeding mma as a GEMM or attention kernel does: D (16x16) = A (16x32) B (32x16) + C,
// two warps, each owning one n8 column tile and walking K in two k16 steps. A is staged row-major
// (the Q or X operand); B is staged [k][n] with n contiguous (the V operand of attention, or a
// row-major weight), which is why it is loaded with .trans. All 64 threads stage both tiles, so
// every ldmatrix reads rows written by other threads across the __syncthreads.

constexpr int kGemmM = 16, kGemmN = 16, kGemmK = 32;
// Row strides padded by 16 bytes: rows stay 16-byte aligned for ldmatrix, and the 8 rows of one
// 8x8 matrix start in different banks, so the load is conflict-free on the GPU.
constexpr int kGemmAStride = kGemmK + 8, kGemmBStride = kGemmN + 8;
static_assert(kGemmM * kGemmAStride * 2 % 16 == 0, "B's tile must start 16-byte aligned after A's");

/// `smem` holds kGemmM * kGemmAStride + kGemmK * kGemmBStride elements (2816 bytes).
template <class T>
__device__ __forceinline__ void ldmatrix_mma_gemm(T* smem, const T* a, const T* b, const float* c, float* d) {
    T* sa = smem;
    T* sb = smem + kGemmM * kGemmAStride;
    for (int i = threadIdx.x; i < kGemmM * kGemmK; i += blockDim.x) sa[(i / kGemmK) * kGemmAStride + i % kGemmK] = a[i];
    for (int i = threadIdx.x; i < kGemmK * kGemmN; i += blockDim.x) sb[(i / kGemmN) * kGemmBStride + i % kGemmN] = b[i];
    __syncthreads();

    const int lane = threadIdx.x % 32, n0 = 8 * (threadIdx.x / 32), g = lane / 4, t2 = 2 * (lane % 4);
    float acc[4] = {c[g * kGemmN + n0 + t2], c[g * kGemmN + n0 + t2 + 1], c[(g + 8) * kGemmN + n0 + t2],
                    c[(g + 8) * kGemmN + n0 + t2 + 1]};
    for (int k0 = 0; k0 < kGemmK; k0 += 16) {
        // x4: lanes 0-15 point at rows 0-15 of columns k0..k0+7, lanes 16-31 at the same rows of
        // k0+8..k0+15, so matrices 0..3 are exactly the A fragment's registers a0a1..a6a7.
        uint32_t fa[4];
        ldmatrix_x4(fa, sa + (lane % 16) * kGemmAStride + k0 + (lane / 16) * 8);
        // x2.trans: lanes 0-15 point at rows k0..k0+15 (n0..n0+7); transposed, matrix 0 is b0b1
        // and matrix 1 is b2b3. Lanes 16-31 repeat the addresses, which x2 ignores.
        uint32_t fb[2];
        ldmatrix_x2_trans(fb, sb + (k0 + lane % 16) * kGemmBStride + n0);
        mma_k16(acc, fa, fb, acc, T{});
    }
    d[g * kGemmN + n0 + t2] = acc[0];
    d[g * kGemmN + n0 + t2 + 1] = acc[1];
    d[(g + 8) * kGemmN + n0 + t2] = acc[2];
    d[(g + 8) * kGemmN + n0 + t2 + 1] = acc[3];
}


/// Launch with 64 threads and 2816 bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(64)
    ldmatrix_mma_gemm_f16(const __half* a, const __half* b, const float* c, float* d) {
    HIERMD_DYNAMIC_SHARED(__half, smem);
    ldmatrix_mma_gemm(smem, a, b, c, d);
}
HIERMD_EXPORT_KERNEL(ldmatrix_mma_gemm_f16)

/// As ldmatrix_mma_gemm_f16, with bf16 operands.
extern "C" __global__ void __launch_bounds__(64)
    ldmatrix_mma_gemm_bf16(const __nv_bfloat16* a, const __nv_bfloat16* b, const float* c, float* d) {
    HIERMD_DYNAMIC_SHARED(__nv_bfloat16, smem);
    ldmatrix_mma_gemm(smem, a, b, c, d);
}
HIERMD_EXPORT_KERNEL(ldmatrix_mma_gemm_bf16)

// ---------------------------------------------------------------------------------------------
// Conversions.

/// f32 to f16, bf16 (both spellings) and tf32, and pairs of consecutive inputs packed into .b32
/// (n/2 pairs).
extern "C" __global__ void convert_narrow(const float* x, __half* h, __nv_bfloat16* bf, __nv_bfloat16* bf_plain,
                                          uint32_t* tf32, uint32_t* h2, uint32_t* bf2, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        h[i] = __float2half_rn(x[i]);
        bf[i] = __float2bfloat16_rn(x[i]);
        bf_plain[i] = __float2bfloat16(x[i]);
        tf32[i] = f32_to_tf32_rna(x[i]);
        if (i % 2 == 0 && i + 1 < n) {
            h2[i / 2] = pack_f32_to_f16x2_rn(x[i], x[i + 1]);
            bf2[i / 2] = pack_f32_to_bf16x2_rn(x[i], x[i + 1]);
        }
    }
}
HIERMD_EXPORT_KERNEL(convert_narrow)

/// f16 and bf16 to f32, and pairs of consecutive inputs packed into .b32 (n/2 pairs).
extern "C" __global__ void convert_widen(const __half* h, const __nv_bfloat16* bf, float* hf, float* bff, uint32_t* h2,
                                         uint32_t* bf2, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        hf[i] = __half2float(h[i]);
        bff[i] = __bfloat162float(bf[i]);
        if (i % 2 == 0 && i + 1 < n) {
            h2[i / 2] = pack_b16x2(h[i], h[i + 1]);
            bf2[i / 2] = pack_b16x2(bf[i], bf[i + 1]);
        }
    }
}
HIERMD_EXPORT_KERNEL(convert_widen)
