// Dense matrix products, row-major: C = alpha op(A) op(B) + beta C (+ bias[col]), batched over
// blockIdx.z with element strides. CPU twin and launches: src/ops/gemm.rs.
//
// Two families of kernels, four transpose variants each (suffix _nn, _nt, _tn, _tt: the first
// letter says whether A is stored transposed ([k, m] instead of [m, k]), the second B ([n, k]
// instead of [k, n])):
//   gemm_f32_*   f32 in, f32 out, on the CUDA cores (FFMA). 128 x 64 block tile, 128 threads,
//                8 x 8 outputs per thread.
//   gemm_bf16_*, gemm_f16_*
//                bf16 / f16 in, f32 out and f32 accumulation, on the tensor cores
//                (mma.sync.m16n8k16 fed by ldmatrix). 128 x 64 block tile, 4 warps of 64 x 32.
// and column_sum, the bias gradient of a Linear layer.
//
// Every output element is computed by one thread, which adds its k products in a fixed order: no
// atomics, no split-k, so results are bitwise reproducible for a given shape (and identical on
// emu under every thread order).
//
// Edges: any m, n, k. Tiles that reach past the matrix are filled with zeros in shared memory (a
// zero adds nothing to the dot products) and stores are guarded. beta == 0 never reads C, so C
// may hold NaN; alpha == 0 skips the products (as BLAS does: A and B are not read, and inf or NaN
// in them cannot leak into C through 0 * inf).
//
// What a Hopper (sm_90a) version would change: the operand tiles would arrive by TMA
// (cp.async.bulk.tensor with a tensor map describing the matrix, its strides and its bounds, so
// edge tiles are zero-filled by the hardware and no thread computes an address), into a ring of
// 3-4 shared-memory stages guarded by mbarriers instead of __syncthreads; a warpgroup (4 warps)
// would issue wgmma.mma_async m64nNk16 reading both operands straight from shared memory (no
// ldmatrix, no fragment registers for B) with the accumulators in registers, and a producer warp
// would keep the TMA loads running while consumer warpgroups compute (warp specialisation, with
// setmaxnreg moving registers to the consumers). Tiles would grow to 128 x 128 or 128 x 256 per
// block, and thread-block clusters could multicast the shared operand tile to neighbouring
// blocks. The same fixed-order accumulation per output keeps that design deterministic too. None
// of this is in sm_80 PTX or in the emu, which is why the kernels here use mma.sync.
#include "common/hiermd.cuh"
#include "common/mma.cuh"

// ---------------------------------------------------------------------------------------------
// Launch contract checks. The Rust side computes the block size and dynamic shared memory from
// constants that must match the ones below; a mismatch would make a kernel write past its shared
// memory, so every block checks the launch it got instead of trusting it.

__device__ __forceinline__ unsigned gemm_dynamic_smem_bytes() {
#ifdef HIERMD_EMU
    return static_cast<unsigned>(::emu::detail::tl_block->dyn_shared_bytes);
#else
    unsigned r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
#endif
}

__device__ __forceinline__ void gemm_require_launch(unsigned threads, unsigned smem_bytes, const char* kernel) {
    if (blockDim.x * blockDim.y * blockDim.z != threads || gemm_dynamic_smem_bytes() < smem_bytes) {
#ifdef HIERMD_EMU
        char msg[200];
        std::snprintf(msg, sizeof msg, "%s: launched with %u threads and %u B of dynamic shared memory, needs %u and %u",
                      kernel, blockDim.x * blockDim.y * blockDim.z, gemm_dynamic_smem_bytes(), threads, smem_bytes);
        ::emu::detail::fail(msg);
#else
        __trap();
#endif
    }
}

/// The epilogue shared by both families: one output element, C = alpha acc + beta C + bias.
__device__ __forceinline__ void gemm_store(float* c, float acc, float alpha, float beta, const float* bias, int col) {
    float v = alpha * acc;
    // beta == 0 must not read C: it may hold NaN (a fresh buffer), and 0 * NaN is NaN.
    if (beta != 0.0f) v += beta * *c;
    if (bias != nullptr) v += bias[col];
    *c = v;
}

// ---------------------------------------------------------------------------------------------
// f32 on the CUDA cores.
//
// Block tile 128 (m) x 64 (n) x 16 (k), 128 threads. Thread (ty, tx) = (tid / 8, tid % 8) owns
// rows {ty*4 + i, 64 + ty*4 + i} and columns {tx*4 + j, 32 + tx*4 + j} (i, j < 4): 64
// accumulators, and per k step 8 + 8 shared-memory reads for 64 FMAs. Splitting each thread's
// rows and columns into two groups of four keeps every shared read a broadcast (A: 4 distinct
// addresses per warp) or one contiguous 128-byte line (B: 8 threads x 16 bytes), so there are no
// bank conflicts, and nvcc reads each group of four with one 128-bit load.
//
// Shared memory holds both tiles k-major (As[k][m], Bs[k][n]) whatever the operand's layout in
// global memory; the loads are mapped so that consecutive threads read consecutive addresses of
// the operand as stored (coalesced), and the transposition happens on the store to shared
// memory. Rows are padded by 4 floats, which keeps them 16-byte aligned for the vector reads and
// limits the transposing stores to 2-way bank conflicts.
//
// Pipelining: two shared buffers. While the block multiplies the tiles of step t, each thread
// already holds the global loads of step t+1 in registers (issued before the arithmetic, so their
// latency hides behind it), stores them into the other buffer, and one __syncthreads per k-tile
// separates the steps. (On sm_80 cp.async could skip the registers; the emu has no asynchronous
// copies, and the register staging costs 24 registers here.)

constexpr int kF32Threads = 128;
constexpr int kF32BlockM = 128, kF32BlockN = 64, kF32BlockK = 16;
constexpr int kF32Pad = 4;
constexpr int kF32LdA = kF32BlockM + kF32Pad;  // As[k][m] row length
constexpr int kF32LdB = kF32BlockN + kF32Pad;  // Bs[k][n] row length
constexpr int kF32StageFloats = kF32BlockK * kF32LdA + kF32BlockK * kF32LdB;
/// Dynamic shared memory of gemm_f32_*: two stages (must match F32_SHARED_BYTES in src/ops/gemm.rs).
constexpr int kF32SharedBytes = 2 * kF32StageFloats * 4;
constexpr int kF32LoadsA = kF32BlockM * kF32BlockK / kF32Threads;  // 16
constexpr int kF32LoadsB = kF32BlockN * kF32BlockK / kF32Threads;  // 8
static_assert(kF32SharedBytes == 25600, "src/ops/gemm.rs assumes 25600 bytes");

/// Loads this thread's share of one operand tile into registers. The tile has `kTileOuter`
/// entries along the dimension that is not k (m for A, n for B); `k_major` says the operand is
/// stored with that dimension contiguous ([k][outer], row length ld), else it is stored
/// [outer][k] with k contiguous. Out-of-range elements load as zero.
template <int kTileOuter, int kLoads, bool k_major>
__device__ __forceinline__ void f32_load_tile(float (&r)[kLoads], const float* __restrict__ g, int ld, int outer0,
                                              int outer_limit, int k0, int k_limit) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
        int outer, kk;
        if (k_major) {
            // Consecutive threads walk the contiguous outer dimension.
            constexpr int kRowsPerPass = kF32Threads / kTileOuter;
            outer = tid % kTileOuter;
            kk = tid / kTileOuter + i * kRowsPerPass;
        } else {
            // Consecutive threads walk k (16 floats = 64 contiguous bytes per row).
            constexpr int kOuterPerPass = kF32Threads / kF32BlockK;
            kk = tid % kF32BlockK;
            outer = tid / kF32BlockK + i * kOuterPerPass;
        }
        const int go = outer0 + outer, gk = k0 + kk;
        float v = 0.0f;
        if (go < outer_limit && gk < k_limit) {
            v = k_major ? g[static_cast<long long>(gk) * ld + go] : g[static_cast<long long>(go) * ld + gk];
        }
        r[i] = v;
    }
}

/// Stores what f32_load_tile loaded into the k-major shared tile s[k][outer] (row length lds).
template <int kTileOuter, int kLoads, bool k_major>
__device__ __forceinline__ void f32_store_tile(float* s, int lds, const float (&r)[kLoads]) {
    const int tid = threadIdx.x;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
        int outer, kk;
        if (k_major) {
            constexpr int kRowsPerPass = kF32Threads / kTileOuter;
            outer = tid % kTileOuter;
            kk = tid / kTileOuter + i * kRowsPerPass;
        } else {
            constexpr int kOuterPerPass = kF32Threads / kF32BlockK;
            kk = tid % kF32BlockK;
            outer = tid / kF32BlockK + i * kOuterPerPass;
        }
        s[kk * lds + outer] = r[i];
    }
}

template <bool kTransA, bool kTransB>
__device__ __forceinline__ void gemm_f32(int m, int n, int k, float alpha, const float* __restrict__ a, int lda,
                                         long long stride_a, const float* __restrict__ b, int ldb, long long stride_b,
                                         float beta, float* __restrict__ c, int ldc, long long stride_c,
                                         const float* __restrict__ bias) {
    gemm_require_launch(kF32Threads, kF32SharedBytes, "gemm_f32");
    HIERMD_DYNAMIC_SHARED(float, smem);
    const long long batch = blockIdx.z;
    a += batch * stride_a;
    b += batch * stride_b;
    c += batch * stride_c;
    const int m0 = blockIdx.x * kF32BlockM, n0 = blockIdx.y * kF32BlockN;
    // A stored [k][m] (transposed) is m-contiguous: k-major, as the shared tile.
    constexpr bool kAKMajor = kTransA;
    // B stored [k][n] (not transposed) is n-contiguous: k-major.
    constexpr bool kBKMajor = !kTransB;

    const int tid = threadIdx.x, ty = tid / 8, tx = tid % 8;
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    const int ktiles = alpha == 0.0f ? 0 : (k + kF32BlockK - 1) / kF32BlockK;
    float ra[kF32LoadsA], rb[kF32LoadsB];
    if (ktiles > 0) {
        f32_load_tile<kF32BlockM, kF32LoadsA, kAKMajor>(ra, a, lda, m0, m, 0, k);
        f32_load_tile<kF32BlockN, kF32LoadsB, kBKMajor>(rb, b, ldb, n0, n, 0, k);
        f32_store_tile<kF32BlockM, kF32LoadsA, kAKMajor>(smem, kF32LdA, ra);
        f32_store_tile<kF32BlockN, kF32LoadsB, kBKMajor>(smem + kF32BlockK * kF32LdA, kF32LdB, rb);
        __syncthreads();
    }
    for (int t = 0; t < ktiles; ++t) {
        const float* as = smem + (t & 1) * kF32StageFloats;
        const float* bs = as + kF32BlockK * kF32LdA;
        const bool more = t + 1 < ktiles;
        if (more) {
            const int k0 = (t + 1) * kF32BlockK;
            f32_load_tile<kF32BlockM, kF32LoadsA, kAKMajor>(ra, a, lda, m0, m, k0, k);
            f32_load_tile<kF32BlockN, kF32LoadsB, kBKMajor>(rb, b, ldb, n0, n, k0, k);
        }
#pragma unroll
        for (int kk = 0; kk < kF32BlockK; ++kk) {
            float fa[8], fb[8];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                fa[i] = as[kk * kF32LdA + ty * 4 + i];
                fa[4 + i] = as[kk * kF32LdA + 64 + ty * 4 + i];
                fb[i] = bs[kk * kF32LdB + tx * 4 + i];
                fb[4 + i] = bs[kk * kF32LdB + 32 + tx * 4 + i];
            }
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(fa[i], fb[j], acc[i][j]);
        }
        if (more) {
            // The other buffer was last read in step t-1, which every thread finished before
            // passing the barrier that ended it.
            float* next = smem + ((t + 1) & 1) * kF32StageFloats;
            f32_store_tile<kF32BlockM, kF32LoadsA, kAKMajor>(next, kF32LdA, ra);
            f32_store_tile<kF32BlockN, kF32LoadsB, kBKMajor>(next + kF32BlockK * kF32LdA, kF32LdB, rb);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int row = m0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + (i - 4));
        if (row >= m) continue;
        float* crow = c + static_cast<long long>(row) * ldc;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int col = n0 + (j < 4 ? tx * 4 + j : 32 + tx * 4 + (j - 4));
            if (col < n) gemm_store(crow + col, acc[i][j], alpha, beta, bias, col);
        }
    }
}

#define HIERMD_GEMM_F32(suffix, ta, tb)                                                                             \
    extern "C" __global__ void __launch_bounds__(kF32Threads)                                                       \
        gemm_f32_##suffix(int m, int n, int k, float alpha, const float* __restrict__ a, int lda, long long stride_a, \
                          const float* __restrict__ b, int ldb, long long stride_b, float beta, float* __restrict__ c, \
                          int ldc, long long stride_c, const float* __restrict__ bias) {                            \
        gemm_f32<ta, tb>(m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc, stride_c, bias);         \
    }

/// C = alpha A B + beta C (+ bias): A [m, k], B [k, n].
HIERMD_GEMM_F32(nn, false, false)
HIERMD_EXPORT_KERNEL(gemm_f32_nn)
/// C = alpha A B^T + beta C (+ bias): A [m, k], B stored [n, k].
HIERMD_GEMM_F32(nt, false, true)
HIERMD_EXPORT_KERNEL(gemm_f32_nt)
/// C = alpha A^T B + beta C (+ bias): A stored [k, m], B [k, n].
HIERMD_GEMM_F32(tn, true, false)
HIERMD_EXPORT_KERNEL(gemm_f32_tn)
/// C = alpha A^T B^T + beta C (+ bias): A stored [k, m], B stored [n, k].
HIERMD_GEMM_F32(tt, true, true)
HIERMD_EXPORT_KERNEL(gemm_f32_tt)

// ---------------------------------------------------------------------------------------------
// bf16 / f16 on the tensor cores: mma.sync.aligned.m16n8k16, f32 accumulators.
//
// Block tile 128 (m) x 64 (n) x 32 (k), 4 warps in a 2 x 2 grid, each warp 64 x 32 = 4 m16 x 4 n8
// mma tiles (64 accumulators per thread). Per k16 step a warp loads its B fragments with two
// ldmatrix.x4 (two n8 tiles each) and, per m16 tile, its A fragment with one ldmatrix.x4, then
// issues 16 mma.
//
// Shared tiles keep the operand's own layout, so staging is a plain copy of 16-byte chunks (8
// elements) with no transposition, and ldmatrix's .trans does the transposing where needed:
//   A [m][k] (not transposed): As[m][k], ldmatrix.x4       A stored [k][m]: As[k][m], .x4.trans
//   B [k][n] (not transposed): Bs[k][n], ldmatrix.x4.trans B stored [n][k]: Bs[n][k], .x4
// Rows are padded by 8 elements (16 bytes): they stay 16-byte aligned for ldmatrix and the eight
// rows of each 8x8 matrix start in different banks (row lengths of 40, 72 and 136 elements are
// 20, 36 and 68 words: 8 rows cover all 32 banks once), so ldmatrix is conflict-free.
//
// Global loads are 16-byte vectors when the operand allows it (base 16-byte aligned, leading
// dimension and batch stride multiples of 8 elements) and the chunk lies inside the matrix;
// otherwise, and always at the edges, element by element with zero fill. As in the f32 kernel,
// the next k-tile is staged in registers while the current one is multiplied, with two shared
// buffers and one barrier per k-tile.

constexpr int kMmaThreads = 128;
constexpr int kMmaBlockM = 128, kMmaBlockN = 64, kMmaBlockK = 32;
constexpr int kMmaWarpM = 64, kMmaWarpN = 32;
constexpr int kMmaPad = 8;
// Elements (16-bit) of each operand region of one stage, sized for the larger of its two layouts.
constexpr int kMmaAElems = kMmaBlockM * (kMmaBlockK + kMmaPad) > kMmaBlockK * (kMmaBlockM + kMmaPad)
                               ? kMmaBlockM * (kMmaBlockK + kMmaPad)
                               : kMmaBlockK * (kMmaBlockM + kMmaPad);
constexpr int kMmaBElems = kMmaBlockN * (kMmaBlockK + kMmaPad) > kMmaBlockK * (kMmaBlockN + kMmaPad)
                               ? kMmaBlockN * (kMmaBlockK + kMmaPad)
                               : kMmaBlockK * (kMmaBlockN + kMmaPad);
constexpr int kMmaStageElems = kMmaAElems + kMmaBElems;
/// Dynamic shared memory of gemm_bf16_* and gemm_f16_* (must match MMA_SHARED_BYTES in
/// src/ops/gemm.rs).
constexpr int kMmaSharedBytes = 2 * kMmaStageElems * 2;
static_assert(kMmaSharedBytes == 30720, "src/ops/gemm.rs assumes 30720 bytes");
static_assert(kMmaAElems % 8 == 0 && kMmaStageElems % 8 == 0, "regions must stay 16-byte aligned");
constexpr int kMmaChunksA = kMmaBlockM * kMmaBlockK / 8 / kMmaThreads;  // 4 per thread
constexpr int kMmaChunksB = kMmaBlockN * kMmaBlockK / 8 / kMmaThreads;  // 2 per thread

/// Eight 16-bit elements: the unit of staging, one 128-bit load and store.
struct __align__(16) Chunk16 {
    uint32_t w[4];
};

/// Loads this thread's chunks of one operand tile of `kRows` x `kCols` elements, stored row-major
/// with row length `ld` in global memory, starting at (row0, col0); elements outside
/// (row_limit, col_limit) load as zero.
template <int kRows, int kCols, int kChunks>
__device__ __forceinline__ void mma_load_tile(Chunk16 (&r)[kChunks], const uint16_t* __restrict__ g, int ld, int row0,
                                              int row_limit, int col0, int col_limit, bool vector_ok) {
    constexpr int kChunksPerRow = kCols / 8;
    static_assert(kRows * kChunksPerRow == kChunks * kMmaThreads, "tile and threads do not match");
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        const int chunk = threadIdx.x + i * kMmaThreads;
        const int row = row0 + chunk / kChunksPerRow, col = col0 + (chunk % kChunksPerRow) * 8;
        const uint16_t* p = g + static_cast<long long>(row) * ld + col;
        if (row < row_limit && vector_ok && col + 8 <= col_limit) {
            r[i] = *reinterpret_cast<const Chunk16*>(p);
        } else {
            uint32_t w[4] = {0, 0, 0, 0};
            if (row < row_limit) {
#pragma unroll
                for (int e = 0; e < 8; ++e)
                    if (col + e < col_limit) w[e / 2] |= static_cast<uint32_t>(p[e]) << (16 * (e % 2));
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) r[i].w[e] = w[e];
        }
    }
}

/// Stores what mma_load_tile loaded into the shared tile s (row length lds, a multiple of 8).
template <int kCols, int kChunks>
__device__ __forceinline__ void mma_store_tile(uint16_t* s, int lds, const Chunk16 (&r)[kChunks]) {
    constexpr int kChunksPerRow = kCols / 8;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
        const int chunk = threadIdx.x + i * kMmaThreads;
        *reinterpret_cast<Chunk16*>(s + (chunk / kChunksPerRow) * lds + (chunk % kChunksPerRow) * 8) = r[i];
    }
}

/// Whether 16-byte loads are safe for every block and batch of an operand.
__device__ __forceinline__ bool mma_vector_ok(const uint16_t* base, int ld, long long stride) {
    return (reinterpret_cast<uintptr_t>(base) % 16 == 0) && ld % 8 == 0 && stride % 8 == 0;
}

template <bool kTransA, bool kTransB>
struct MmaOperands {
    // Shared layouts: row lengths (elements) and global tile shapes, rows x cols as stored.
    static constexpr int kLdA = kTransA ? kMmaBlockM + kMmaPad : kMmaBlockK + kMmaPad;
    static constexpr int kLdB = kTransB ? kMmaBlockK + kMmaPad : kMmaBlockN + kMmaPad;
    static constexpr int kRowsA = kTransA ? kMmaBlockK : kMmaBlockM, kColsA = kTransA ? kMmaBlockM : kMmaBlockK;
    static constexpr int kRowsB = kTransB ? kMmaBlockN : kMmaBlockK, kColsB = kTransB ? kMmaBlockK : kMmaBlockN;

    __device__ __forceinline__ static void load(Chunk16 (&ra)[kMmaChunksA], Chunk16 (&rb)[kMmaChunksB],
                                                const uint16_t* a, int lda, const uint16_t* b, int ldb, int m, int n,
                                                int k, int m0, int n0, int k0, bool vec_a, bool vec_b) {
        if (kTransA) mma_load_tile<kRowsA, kColsA, kMmaChunksA>(ra, a, lda, k0, k, m0, m, vec_a);
        else mma_load_tile<kRowsA, kColsA, kMmaChunksA>(ra, a, lda, m0, m, k0, k, vec_a);
        if (kTransB) mma_load_tile<kRowsB, kColsB, kMmaChunksB>(rb, b, ldb, n0, n, k0, k, vec_b);
        else mma_load_tile<kRowsB, kColsB, kMmaChunksB>(rb, b, ldb, k0, k, n0, n, vec_b);
    }

    __device__ __forceinline__ static void store(uint16_t* stage, const Chunk16 (&ra)[kMmaChunksA],
                                                 const Chunk16 (&rb)[kMmaChunksB]) {
        mma_store_tile<kColsA, kMmaChunksA>(stage, kLdA, ra);
        mma_store_tile<kColsB, kMmaChunksB>(stage + kMmaAElems, kLdB, rb);
    }

    /// A fragment of the m16 x k16 tile at (m, kk) of the stage (PTX ISA 9.7.14.5.8): the four
    /// 8x8 matrices of ldmatrix.x4 are (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
    /// (rows 8-15, k 8-15), i.e. registers a0a1, a2a3, a4a5, a6a7. Lane l supplies a row of
    /// matrix l / 8.
    __device__ __forceinline__ static void a_fragment(uint32_t (&fa)[4], const uint16_t* as, int m, int kk) {
        const int lane = threadIdx.x % 32, mat = lane / 8, r = lane % 8;
        if (kTransA) {
            // As[k][m]: matrix `mat` is stored as 8 rows of k, 8 m wide; .trans hands each lane
            // (m = g, k = 2t, 2t+1) as the fragment wants.
            ldmatrix_x4_trans(fa, as + (kk + (mat >> 1) * 8 + r) * kLdA + m + (mat & 1) * 8);
        } else {
            ldmatrix_x4(fa, as + (m + (mat & 1) * 8 + r) * kLdA + kk + (mat >> 1) * 8);
        }
    }

    /// B fragments of two n8 x k16 tiles at (n, kk) and (n + 8, kk): registers fb[0..2) for n,
    /// fb[2..4) for n + 8. The four matrices are (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
    /// (n 8-15, k 8-15); each gives a lane (k = 2t, 2t+1, n = g) as the .col fragment wants.
    __device__ __forceinline__ static void b_fragments(uint32_t (&fb)[4], const uint16_t* bs, int n, int kk) {
        const int lane = threadIdx.x % 32, mat = lane / 8, r = lane % 8;
        if (kTransB) {
            ldmatrix_x4(fb, bs + (n + (mat >> 1) * 8 + r) * kLdB + kk + (mat & 1) * 8);
        } else {
            // Bs[k][n]: .trans turns the stored (k rows, n columns) into (n = g, k = 2t, 2t+1).
            ldmatrix_x4_trans(fb, bs + (kk + (mat & 1) * 8 + r) * kLdB + n + (mat >> 1) * 8);
        }
    }
};

__device__ __forceinline__ void mma_k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __half) {
    mma_m16n8k16_f16(d, a, b, d);
}
__device__ __forceinline__ void mma_k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __nv_bfloat16) {
    mma_m16n8k16_bf16(d, a, b, d);
}

template <class T, bool kTransA, bool kTransB>
__device__ __forceinline__ void gemm_mma(int m, int n, int k, float alpha, const T* a_in, int lda, long long stride_a,
                                         const T* b_in, int ldb, long long stride_b, float beta, float* __restrict__ c,
                                         int ldc, long long stride_c, const float* __restrict__ bias) {
    using Ops = MmaOperands<kTransA, kTransB>;
    gemm_require_launch(kMmaThreads, kMmaSharedBytes, "gemm_mma");
    HIERMD_DYNAMIC_SHARED(uint16_t, smem);
    const long long batch = blockIdx.z;
    // Staging moves bit patterns; only the mma instruction interprets them.
    const uint16_t* a = reinterpret_cast<const uint16_t*>(a_in) + batch * stride_a;
    const uint16_t* b = reinterpret_cast<const uint16_t*>(b_in) + batch * stride_b;
    c += batch * stride_c;
    const bool vec_a = mma_vector_ok(reinterpret_cast<const uint16_t*>(a_in), lda, stride_a);
    const bool vec_b = mma_vector_ok(reinterpret_cast<const uint16_t*>(b_in), ldb, stride_b);
    const int m0 = blockIdx.x * kMmaBlockM, n0 = blockIdx.y * kMmaBlockN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = (warp / 2) * kMmaWarpM, wn = (warp % 2) * kMmaWarpN;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    const int ktiles = alpha == 0.0f ? 0 : (k + kMmaBlockK - 1) / kMmaBlockK;
    Chunk16 ra[kMmaChunksA], rb[kMmaChunksB];
    if (ktiles > 0) {
        Ops::load(ra, rb, a, lda, b, ldb, m, n, k, m0, n0, 0, vec_a, vec_b);
        Ops::store(smem, ra, rb);
        __syncthreads();
    }
    for (int t = 0; t < ktiles; ++t) {
        const uint16_t* as = smem + (t & 1) * kMmaStageElems;
        const uint16_t* bs = as + kMmaAElems;
        const bool more = t + 1 < ktiles;
        if (more) Ops::load(ra, rb, a, lda, b, ldb, m, n, k, m0, n0, (t + 1) * kMmaBlockK, vec_a, vec_b);
#pragma unroll
        for (int kk = 0; kk < kMmaBlockK; kk += 16) {
            uint32_t fb[4][2];
#pragma unroll
            for (int j = 0; j < 4; j += 2) {
                uint32_t pair[4];
                Ops::b_fragments(pair, bs, wn + j * 8, kk);
                fb[j][0] = pair[0];
                fb[j][1] = pair[1];
                fb[j + 1][0] = pair[2];
                fb[j + 1][1] = pair[3];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                uint32_t fa[4];
                Ops::a_fragment(fa, as, wm + i * 16, kk);
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_k16(acc[i][j], fa, fb[j], T{});
            }
        }
        if (more) Ops::store(smem + ((t + 1) & 1) * kMmaStageElems, ra, rb);
        __syncthreads();
    }

    // Accumulator layout (9.7.14.5.8): c0, c1 at (row g, cols 2t, 2t+1), c2, c3 at row g + 8.
    const int g = lane / 4, t2 = 2 * (lane % 4);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = m0 + wm + i * 16 + g + 8 * h;
            if (row >= m) continue;
            float* crow = c + static_cast<long long>(row) * ldc;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int col = n0 + wn + j * 8 + t2 + e;
                    if (col < n) gemm_store(crow + col, acc[i][j][2 * h + e], alpha, beta, bias, col);
                }
            }
        }
    }
}

#define HIERMD_GEMM_MMA(type, name, suffix, ta, tb)                                                                  \
    extern "C" __global__ void __launch_bounds__(kMmaThreads)                                                        \
        gemm_##name##_##suffix(int m, int n, int k, float alpha, const type* __restrict__ a, int lda,                \
                               long long stride_a, const type* __restrict__ b, int ldb, long long stride_b, float beta, \
                               float* __restrict__ c, int ldc, long long stride_c, const float* __restrict__ bias) {  \
        gemm_mma<type, ta, tb>(m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, ldc, stride_c, bias);    \
    }

/// bf16 operands, f32 C: as gemm_f32_nn.
HIERMD_GEMM_MMA(__nv_bfloat16, bf16, nn, false, false)
HIERMD_EXPORT_KERNEL(gemm_bf16_nn)
/// bf16 operands, f32 C: as gemm_f32_nt.
HIERMD_GEMM_MMA(__nv_bfloat16, bf16, nt, false, true)
HIERMD_EXPORT_KERNEL(gemm_bf16_nt)
/// bf16 operands, f32 C: as gemm_f32_tn.
HIERMD_GEMM_MMA(__nv_bfloat16, bf16, tn, true, false)
HIERMD_EXPORT_KERNEL(gemm_bf16_tn)
/// bf16 operands, f32 C: as gemm_f32_tt.
HIERMD_GEMM_MMA(__nv_bfloat16, bf16, tt, true, true)
HIERMD_EXPORT_KERNEL(gemm_bf16_tt)
/// f16 operands, f32 C: as gemm_f32_nn.
HIERMD_GEMM_MMA(__half, f16, nn, false, false)
HIERMD_EXPORT_KERNEL(gemm_f16_nn)
/// f16 operands, f32 C: as gemm_f32_nt.
HIERMD_GEMM_MMA(__half, f16, nt, false, true)
HIERMD_EXPORT_KERNEL(gemm_f16_nt)
/// f16 operands, f32 C: as gemm_f32_tn.
HIERMD_GEMM_MMA(__half, f16, tn, true, false)
HIERMD_EXPORT_KERNEL(gemm_f16_tn)
/// f16 operands, f32 C: as gemm_f32_tt.
HIERMD_GEMM_MMA(__half, f16, tt, true, true)
HIERMD_EXPORT_KERNEL(gemm_f16_tt)

// ---------------------------------------------------------------------------------------------
// Column sums, the bias gradient of a Linear layer: out[j] = beta out[j] + sum_i x[i, j] for a
// row-major [rows, cols] x.
//
// Block (32, 8): threadIdx.x picks one of 32 adjacent columns, so every warp reads 128
// contiguous bytes of one row; threadIdx.y picks one of 8 interleaved row groups. The 8 partial
// sums of a column meet in shared memory and are added in a fixed order: deterministic.
// (Parallelism is cols / 32 blocks; for few columns and very many rows a two-pass version with
// partial sums per row chunk would fill a large GPU better.)

constexpr int kColSumCols = 32, kColSumGroups = 8;

extern "C" __global__ void __launch_bounds__(kColSumCols * kColSumGroups)
    column_sum(const float* __restrict__ x, float* __restrict__ out, int rows, int cols, float beta) {
    __shared__ float partial[kColSumGroups][kColSumCols];
    const int col = blockIdx.x * kColSumCols + threadIdx.x;
    float acc = 0.0f;
    if (col < cols)
        for (int r = threadIdx.y; r < rows; r += kColSumGroups) acc += x[static_cast<long long>(r) * cols + col];
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        float total = 0.0f;
#pragma unroll
        for (int g = 0; g < kColSumGroups; ++g) total += partial[g][threadIdx.x];
        // As in gemm_store: beta == 0 assigns without reading out.
        out[col] = beta != 0.0f ? beta * out[col] + total : total;
    }
}
HIERMD_EXPORT_KERNEL(column_sum)
