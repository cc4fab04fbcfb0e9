// Fused equivariant scaled dot-product attention (EqSDPA), FlashAttention-2 style: forward and
// backward, never materialising the tokens x tokens matrix. CPU twins and launches:
// src/ops/eqsdpa.rs.
//
// Layout, per (frame b, head h) pair bh = b * heads + h, all row-major:
//   q, k    [BH, T, dh]
//   values  [BH, T, 4 dh]   dh scalar values, then the x, y, z components of dh vector channels:
//                           one softmax weighs all 4 dh columns (that is what keeps it equivariant)
//   mask    [B, T] u8       optional; 0 = padding key (probability exactly 0); frame = bh / heads
//   out     [BH, T, 4 dh]   softmax(scale q k^T, masked) values
//   lse     [BH, T]         natural log of the row's sum of exp(scale q k^T) over unmasked keys;
//                           +inf for a query whose keys are all masked (its out row is 0), so that
//                           the backward's P = exp(s - lse) is exactly 0 there (never NaN)
//
// f32 kernels (CUDA cores, f32 math, no TF32), templated on dh in {8, 16, 32, 64}:
//   eqsdpa_forward_f32_dh*    one block per (bh, query tile), streaming key/value tiles through
//                             shared memory with the online softmax (running max m and sum l per
//                             query row, rescaling the output accumulator by exp(m_old - m_new)).
//   eqsdpa_backward_dkdv_f32_dh*
//                             one block per (bh, key tile), looping over every query tile:
//                             recompute P = exp(scale q k^T - lse), dvalues += P^T dout,
//                             dS = P (dP - D) with dP - D = dout (values - out)^T (see the
//                             backward section), dk += scale dS^T q.
//   eqsdpa_backward_dq_f32_dh*
//                             one block per (bh, query tile), looping over every key tile,
//                             recomputing P and dS the same way: dq += scale dS k.
// Every output element is one thread's fixed-order sum (no atomics), so results are bitwise
// reproducible for a given shape, on the GPU and on emu under every thread order. The price of
// determinism is that P and dS are computed twice in the backward (once per kernel). The
// alternative is eqsdpa_backward_atomic_f32_dh*: the dk/dv kernel also adds scale dS k into dq
// (zeroed by the caller) with float atomics, one per (query, column) and key tile, and the dq
// kernel is not run; dk and dvalues are unchanged, dq is not reproducible bit for bit (the order
// of the adds varies). Opt-in (EqsdpaBackwardMode::AtomicDq), not timed on a GPU.
//
// Tiles (queries x keys per step; shared memory is static, at most ~44 KB per block so that it
// fits the 48 KB every GPU allows without opting in):
//   dh   forward           dk/dv kernel                      dq kernel
//   8    64 x 64, 128 thr  64 keys, 32-query steps, 128 thr  64 queries, 32-key steps, 128 thr
//   16   64 x 64, 128 thr  32 keys, 32-query steps, 128 thr  32 queries, 32-key steps, 128 thr
//   32   64 x 32, 128 thr  32 keys, 16-query steps, 128 thr  16 queries, 32-key steps, 128 thr
//   64   64 x 16, 256 thr  16 keys, 8-query steps, 128 thr   8 queries, 16-key steps, 128 thr
// The value tile is the wide one (4 dh = 256 floats per key at dh = 64), which is what bounds the
// key tile. At dh = 8 a key or query row is small (8 + 32 floats), so the backward's resident
// tile (keys of the dk/dv kernel, queries of the dq kernel) doubles to 64: each block then
// streams the other side's rows through shared memory half as often (and the atomic variant
// issues half as many dq atomics); the forward keeps dh = 16's 64 x 64 (a 128-key tile would
// need 58 KB, its 64 x 128 score tile being the larger part). Shared rows are padded by one
// float: every access pattern below then reads distinct banks (or broadcasts), row strides being
// odd.
//
// Ragged T: rows of a tile past T load as zeros (keys are also flagged as masked, queries get
// lse = +inf, so they contribute exactly nothing) and are never stored. Masked keys are
// excluded by a select, not by adding -inf to the score, so no finite content of a masked key,
// however large, can reach the result (its P is exactly 0, and 0 times a finite value adds
// nothing). Grids are 1-D with a grid-stride loop over (bh, tile) pairs, so any BH fits (no
// gridDim.y limit).
//
// Nothing here has been timed on a GPU (none was available when it was written): the tiles are
// chosen for correctness, 48 KB of shared memory and 0 spills (ptx/RESOURCES.md), not tuned.
//
// The bf16 / f16 forward (eqsdpa_forward_{bf16,f16}_dh*) and backward are described further down;
// they take dh = 16, 32 or 64 only (the tensor cores' k step is 16), dh = 8 is f32 only.
//
// Helper names carry an eqsdpa_ prefix: on emu every .cu file is linked into one library, where
// two inline functions or types of the same name would silently be merged.
#include "common/hiermd.cuh"
#include "common/mma.cuh"

// ---------------------------------------------------------------------------------------------
// Launch contract: the Rust side sizes blocks from constants that must match the ones here.

__device__ __forceinline__ void eqsdpa_require_threads(unsigned threads, const char* kernel) {
    if (blockDim.x * blockDim.y * blockDim.z != threads) {
#ifdef HIERMD_EMU
        char msg[160];
        std::snprintf(msg, sizeof msg, "%s: launched with %u threads, needs %u", kernel,
                      blockDim.x * blockDim.y * blockDim.z, threads);
        ::emu::detail::fail(msg);
#else
        __trap();
#endif
    }
}

/// Whether key `key` of the frame whose mask row is `mask_row` (null: no mask) takes part.
__device__ __forceinline__ bool eqsdpa_key_ok(const unsigned char* __restrict__ mask_row, int key, int t) {
    return key < t && (mask_row == nullptr || mask_row[key] != 0);
}

/// Elements per partial sum of the dot products below.
constexpr int kEqsdpaDotBlock = 8;

/// out[i][j] = dot(a row (ri + i * kRi), b row (rj + j * kRj)) over kN elements, for the padded
/// shared tiles a (row length lda) and b (ldb). Summed in blocks of eight fmaf products, each block
/// then added to the total: the rounding error grows with 8 + n / 8 terms instead of n, which
/// keeps the scores, dP = dout . values and D on a par with (or better than) a materialised
/// attention's plain sums. Every dot of this file uses this one order.
template <int kN, int kRi, int kRj, int kSi, int kSj>
__device__ __forceinline__ void eqsdpa_tile_dots(float (&out)[kRi][kRj], const float* a, int lda, const float* b,
                                                 int ldb, int ri, int rj) {
    static_assert(kN % kEqsdpaDotBlock == 0, "dot length");
#pragma unroll
    for (int i = 0; i < kRi; ++i)
#pragma unroll
        for (int j = 0; j < kRj; ++j) out[i][j] = 0.0f;
#pragma unroll 2
    for (int c0 = 0; c0 < kN; c0 += kEqsdpaDotBlock) {
        float part[kRi][kRj];
#pragma unroll
        for (int i = 0; i < kRi; ++i)
#pragma unroll
            for (int j = 0; j < kRj; ++j) part[i][j] = 0.0f;
#pragma unroll
        for (int c = c0; c < c0 + kEqsdpaDotBlock; ++c) {
            float x[kRi], y[kRj];
#pragma unroll
            for (int i = 0; i < kRi; ++i) x[i] = a[(ri + i * kSi) * lda + c];
#pragma unroll
            for (int j = 0; j < kRj; ++j) y[j] = b[(rj + j * kSj) * ldb + c];
#pragma unroll
            for (int i = 0; i < kRi; ++i)
#pragma unroll
                for (int j = 0; j < kRj; ++j) part[i][j] = fmaf(x[i], y[j], part[i][j]);
        }
#pragma unroll
        for (int i = 0; i < kRi; ++i)
#pragma unroll
            for (int j = 0; j < kRj; ++j) out[i][j] += part[i][j];
    }
}

// ---------------------------------------------------------------------------------------------
// Forward, f32.
//
// Per key tile a block goes through three phases separated by barriers:
//   scores   thread (sx, sy) = (tid % 16, tid / 16) computes S[sy + i*kSy][sx + j*kSx] over dh
//            (consecutive sx read consecutive padded K rows: distinct banks) and writes the
//            scaled score, or -inf for a masked key, to sS;
//   softmax  kG consecutive lanes per query row (kG = threads / kBq, inside one warp) take the
//            tile's row maximum and sum with xor shuffles, which leave bit-identical results in
//            every lane of the group; they overwrite sS with P = exp(S - m_new) and publish the
//            rescale factor alpha = exp(m_old - m_new) in sAlpha;
//   PV       thread (ox, oy) = (tid % 32, tid / 32) owns output rows oy + i*kOy and columns
//            ox + 32 j: acc = alpha acc + P V (one P read is a warp broadcast, V reads are
//            consecutive).
// When a row has seen only masked keys m is -inf; exp(S - m) is then taken against 0 instead, so
// P = 0 and alpha = 0 (never -inf - -inf = NaN).

template <int kDh_, int kBq_, int kBk_, int kThreads_>
struct EqsdpaFwdCfg {
    static constexpr int kDh = kDh_, kDv = 4 * kDh_, kBq = kBq_, kBk = kBk_, kThreads = kThreads_;
    static constexpr int kLdQ = kDh + 1, kLdK = kDh + 1, kLdV = kDv + 1, kLdS = kBk + 1;
    static constexpr int kSx = 16, kSy = kThreads / kSx, kSr = kBq / kSy, kSc = kBk / kSx;
    static constexpr int kG = kThreads / kBq;
    static constexpr int kOx = 32, kOy = kThreads / kOx, kOr = kBq / kOy, kOc = kDv / kOx;
    // sQ, sK, sV, sS, sAlpha, sL, sKeep
    static constexpr int kSmemFloats = kBq * kLdQ + kBk * kLdK + kBk * kLdV + kBq * kLdS + 2 * kBq + kBk;
    static_assert(kThreads % 32 == 0 && kBk % kSx == 0 && kBq % kSy == 0, "score tiling");
    static_assert(kThreads % kBq == 0 && kG >= 1 && kG <= 32 && (kG & (kG - 1)) == 0, "softmax row groups");
    static_assert(kBq % kOy == 0 && kDv % kOx == 0, "output tiling");
    static_assert(kSmemFloats * 4 <= 48 * 1024, "static shared memory above 48 KB");
};

using EqsdpaFwd8 = EqsdpaFwdCfg<8, 64, 64, 128>;
using EqsdpaFwd16 = EqsdpaFwdCfg<16, 64, 64, 128>;
using EqsdpaFwd32 = EqsdpaFwdCfg<32, 64, 32, 128>;
using EqsdpaFwd64 = EqsdpaFwdCfg<64, 64, 16, 256>;

template <class C>
__device__ __forceinline__ void eqsdpa_forward_f32(const float* __restrict__ q, const float* __restrict__ k,
                                                   const float* __restrict__ v, const unsigned char* __restrict__ mask,
                                                   float* __restrict__ out, float* __restrict__ lse, int bh_count,
                                                   int t, int heads, float scale) {
    constexpr int kDh = C::kDh, kDv = C::kDv, kBq = C::kBq, kBk = C::kBk, kThreads = C::kThreads;
    eqsdpa_require_threads(kThreads, "eqsdpa_forward_f32");
    __shared__ float smem[C::kSmemFloats];
    float* sQ = smem;
    float* sK = sQ + kBq * C::kLdQ;
    float* sV = sK + kBk * C::kLdK;
    float* sS = sV + kBk * C::kLdV;
    float* sAlpha = sS + kBq * C::kLdS;
    float* sL = sAlpha + kBq;
    float* sKeep = sL + kBq;

    const int tid = threadIdx.x;
    const int sx = tid % C::kSx, sy = tid / C::kSx;
    const int row = tid / C::kG, sub = tid % C::kG;
    const int ox = tid % C::kOx, oy = tid / C::kOx;
    const int nqt = (t + kBq - 1) / kBq;
    const long long tiles = static_cast<long long>(nqt) * bh_count;

    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const long long bh = tile / nqt;
        const int q0 = static_cast<int>(tile % nqt) * kBq;
        const float* qb = q + bh * t * kDh;
        const float* kb = k + bh * t * kDh;
        const float* vb = v + bh * t * kDv;
        const unsigned char* mrow = mask == nullptr ? nullptr : mask + (bh / heads) * t;

        // The previous tile's last reads of sQ were in its final scores phase, behind barriers.
        for (int i = tid; i < kBq * kDh; i += kThreads) {
            const int r = i / kDh, d = i % kDh;
            sQ[r * C::kLdQ + d] = q0 + r < t ? qb[static_cast<long long>(q0 + r) * kDh + d] : 0.0f;
        }
        float acc[C::kOr][C::kOc];
#pragma unroll
        for (int i = 0; i < C::kOr; ++i)
#pragma unroll
            for (int j = 0; j < C::kOc; ++j) acc[i][j] = 0.0f;
        float m_run = -INFINITY, l_run = 0.0f;

        for (int k0 = 0; k0 < t; k0 += kBk) {
            // Everyone is done reading sK, sV, sS and sAlpha of the previous key tile.
            __syncthreads();
            for (int i = tid; i < kBk * kDh; i += kThreads) {
                const int r = i / kDh, d = i % kDh;
                sK[r * C::kLdK + d] = k0 + r < t ? kb[static_cast<long long>(k0 + r) * kDh + d] : 0.0f;
            }
            for (int i = tid; i < kBk * kDv; i += kThreads) {
                const int r = i / kDv, c = i % kDv;
                sV[r * C::kLdV + c] = k0 + r < t ? vb[static_cast<long long>(k0 + r) * kDv + c] : 0.0f;
            }
            for (int i = tid; i < kBk; i += kThreads) sKeep[i] = eqsdpa_key_ok(mrow, k0 + i, t) ? 1.0f : 0.0f;
            __syncthreads();

            // Scores.
            {
                float s[C::kSr][C::kSc];
                eqsdpa_tile_dots<kDh, C::kSr, C::kSc, C::kSy, C::kSx>(s, sQ, C::kLdQ, sK, C::kLdK, sy, sx);
#pragma unroll
                for (int i = 0; i < C::kSr; ++i)
#pragma unroll
                    for (int j = 0; j < C::kSc; ++j) {
                        const int c = sx + j * C::kSx;
                        sS[(sy + i * C::kSy) * C::kLdS + c] = sKeep[c] != 0.0f ? s[i][j] * scale : -INFINITY;
                    }
            }
            __syncthreads();

            // Online softmax, kG lanes per row.
            {
                float* srow = sS + row * C::kLdS;
                float tmax = -INFINITY;
                for (int c = sub; c < kBk; c += C::kG) tmax = fmaxf(tmax, srow[c]);
#pragma unroll
                for (int o = 1; o < C::kG; o <<= 1) tmax = fmaxf(tmax, __shfl_xor_sync(HIERMD_FULL_MASK, tmax, o));
                const float m_new = fmaxf(m_run, tmax);
                const float m_use = m_new == -INFINITY ? 0.0f : m_new;
                const float alpha = expf(m_run - m_use);
                float tsum = 0.0f;
                for (int c = sub; c < kBk; c += C::kG) {
                    const float p = expf(srow[c] - m_use);
                    srow[c] = p;
                    tsum += p;
                }
#pragma unroll
                for (int o = 1; o < C::kG; o <<= 1) tsum += __shfl_xor_sync(HIERMD_FULL_MASK, tsum, o);
                l_run = l_run * alpha + tsum;
                m_run = m_new;
                if (sub == 0) sAlpha[row] = alpha;
            }
            __syncthreads();

            // acc = alpha acc + P V.
#pragma unroll
            for (int i = 0; i < C::kOr; ++i) {
                const float alpha = sAlpha[oy + i * C::kOy];
#pragma unroll
                for (int j = 0; j < C::kOc; ++j) acc[i][j] *= alpha;
            }
#pragma unroll 4
            for (int kk = 0; kk < kBk; ++kk) {
                float p[C::kOr], vv[C::kOc];
#pragma unroll
                for (int i = 0; i < C::kOr; ++i) p[i] = sS[(oy + i * C::kOy) * C::kLdS + kk];
#pragma unroll
                for (int j = 0; j < C::kOc; ++j) vv[j] = sV[kk * C::kLdV + ox + j * C::kOx];
#pragma unroll
                for (int i = 0; i < C::kOr; ++i)
#pragma unroll
                    for (int j = 0; j < C::kOc; ++j) acc[i][j] = fmaf(p[i], vv[j], acc[i][j]);
            }
        }

        // Row statistics to the output owners; lse (+inf where every key is masked).
        if (sub == 0) {
            sL[row] = l_run;
            // m + ln l in double, rounded once: the backward's P = exp(s - lse) inherits this
            // rounding coherently along the whole row, so it is kept to half an ulp.
            if (q0 + row < t)
                lse[bh * t + q0 + row] =
                    l_run > 0.0f ? static_cast<float>(static_cast<double>(m_run) + log(static_cast<double>(l_run)))
                                 : INFINITY;
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < C::kOr; ++i) {
            const int r = oy + i * C::kOy;
            if (q0 + r >= t) continue;
            const float l = sL[r];
            float* orow = out + (bh * t + q0 + r) * kDv;
            // A division per element rather than a product with a rounded 1 / l, whose error
            // would be shared by the whole row.
#pragma unroll
            for (int j = 0; j < C::kOc; ++j) orow[ox + j * C::kOx] = l > 0.0f ? acc[i][j] / l : 0.0f;
        }
    }
}

#define HIERMD_EQSDPA_FORWARD_F32(dh)                                                                              \
    extern "C" __global__ void __launch_bounds__(EqsdpaFwd##dh::kThreads)                                          \
        eqsdpa_forward_f32_dh##dh(const float* __restrict__ q, const float* __restrict__ k,                        \
                                  const float* __restrict__ v, const unsigned char* __restrict__ mask,             \
                                  float* __restrict__ out, float* __restrict__ lse, int bh_count, int t, int heads, \
                                  float scale) {                                                                   \
        eqsdpa_forward_f32<EqsdpaFwd##dh>(q, k, v, mask, out, lse, bh_count, t, heads, scale);                     \
    }

/// out = softmax(scale q k^T, masked) values and lse, dh = 8.
HIERMD_EQSDPA_FORWARD_F32(8)
HIERMD_EXPORT_KERNEL(eqsdpa_forward_f32_dh8)
/// As eqsdpa_forward_f32_dh8, dh = 16.
HIERMD_EQSDPA_FORWARD_F32(16)
HIERMD_EXPORT_KERNEL(eqsdpa_forward_f32_dh16)
/// As eqsdpa_forward_f32_dh8, dh = 32.
HIERMD_EQSDPA_FORWARD_F32(32)
HIERMD_EXPORT_KERNEL(eqsdpa_forward_f32_dh32)
/// As eqsdpa_forward_f32_dh8, dh = 64.
HIERMD_EQSDPA_FORWARD_F32(64)
HIERMD_EXPORT_KERNEL(eqsdpa_forward_f32_dh64)

// ---------------------------------------------------------------------------------------------
// Backward, f32.
//
// FlashAttention-2 writes dS = P (dP - D) with D_i = rowsum(dout_i * out_i) = sum_j P_ij dP_ij.
// Computing dP_ij = dout_i . values_j and D_i as two separate dot products and subtracting loses
// the difference to cancellation exactly where attention is sharp (a query whose P is nearly one-hot
// on key j has out_i ~ values_j, so dP_ij ~ D_i): both dots carry rounding errors of the size of
// their ~sqrt(4 dh) magnitude, and their difference keeps them. A materialised backward is spared
// this because its D is summed from its own dP. Here instead
//     dP_ij - D_i = dout_i . (values_j - out_i)
// is one dot product: values_j - out_i is exact or nearly so when the two are close, so the
// difference is as accurate as its (small) size allows, with no D pass at all. The cost is one
// subtraction per term and an out tile in shared memory beside the dout tile.

/// out[i][j] = dot(x row (ri + i kSi), y row (rj + j kSj) - z row (ri + i kSi)) over kN elements,
/// in eqsdpa_tile_dots' blocked order (x: dout, y: values, z: out; all row length ld).
template <int kN, int kRi, int kRj, int kSi, int kSj>
__device__ __forceinline__ void eqsdpa_tile_dots_diff(float (&out)[kRi][kRj], const float* x, const float* z,
                                                      const float* y, int ld, int ri, int rj) {
    static_assert(kN % kEqsdpaDotBlock == 0, "dot length");
#pragma unroll
    for (int i = 0; i < kRi; ++i)
#pragma unroll
        for (int j = 0; j < kRj; ++j) out[i][j] = 0.0f;
#pragma unroll 2
    for (int c0 = 0; c0 < kN; c0 += kEqsdpaDotBlock) {
        float part[kRi][kRj];
#pragma unroll
        for (int i = 0; i < kRi; ++i)
#pragma unroll
            for (int j = 0; j < kRj; ++j) part[i][j] = 0.0f;
#pragma unroll
        for (int c = c0; c < c0 + kEqsdpaDotBlock; ++c) {
            float a[kRi], o[kRi], b[kRj];
#pragma unroll
            for (int i = 0; i < kRi; ++i) {
                a[i] = x[(ri + i * kSi) * ld + c];
                o[i] = z[(ri + i * kSi) * ld + c];
            }
#pragma unroll
            for (int j = 0; j < kRj; ++j) b[j] = y[(rj + j * kSj) * ld + c];
#pragma unroll
            for (int i = 0; i < kRi; ++i)
#pragma unroll
                for (int j = 0; j < kRj; ++j) part[i][j] = fmaf(a[i], b[j] - o[i], part[i][j]);
        }
#pragma unroll
        for (int i = 0; i < kRi; ++i)
#pragma unroll
            for (int j = 0; j < kRj; ++j) out[i][j] += part[i][j];
    }
}

/// exp(a - b) without rounding a - b: P = exp(s - lse) in the backward, where |s - lse| is a few
/// units (lse is at least the row's largest score), so rounding the difference would add up to
/// 2-4 ulps of relative error to every P. TwoSum splits a - b = hi + lo exactly;
/// exp(hi + lo) = exp(hi) (1 + lo) to far below an ulp (|lo| <= half an ulp of hi). The score a is
/// the forward's rounded scale * (q . k), the same float the forward exponentiated, so the
/// rounding of the row maximum cancels between the two passes. b = +inf (a query with every key
/// masked) gives 0; b is never -inf.
__device__ __forceinline__ float eqsdpa_exp_diff(float a, float b) {
    const float hi = a - b;
    const float bb = hi - a;
    const float lo = (a - (hi - bb)) + (-b - bb);
    const float e = expf(hi);
    return hi == -INFINITY ? 0.0f : fmaf(e, lo, e);
}

/// The part both backward kernels share: for the kSr x kSc (query, key) entries a thread owns
/// (queries sy + i*kSy, keys sx + j*kSx of the staged tiles) recompute
///   P  = exp(scale q.k - lse)          (0 for a masked key; lse = +inf gives 0 too)
///   dS = P (dout . (values - out))     (= P (dP - D), see above)
/// and store dS (and P, when sP is not null) in the padded [query][key] tiles. sQ, sK are
/// [..][dh + 1]; sO (dout), sY (out) and sV [..][4 dh + 1].
template <int kDh, int kSr, int kSc, int kSx, int kSy, int kLdP>
__device__ __forceinline__ void eqsdpa_entry_grads(const float* sQ, const float* sK, const float* sO, const float* sY,
                                                   const float* sV, const float* sLse, const float* sKeep, float* sP,
                                                   float* sdS, float scale, int sx, int sy) {
    constexpr int kDv = 4 * kDh, kLdQ = kDh + 1, kLdV = kDv + 1;
    float s[kSr][kSc], dpd[kSr][kSc];
    eqsdpa_tile_dots<kDh, kSr, kSc, kSy, kSx>(s, sQ, kLdQ, sK, kLdQ, sy, sx);
    eqsdpa_tile_dots_diff<kDv, kSr, kSc, kSy, kSx>(dpd, sO, sY, sV, kLdV, sy, sx);
#pragma unroll
    for (int i = 0; i < kSr; ++i) {
        const int r = sy + i * kSy;
        const float l = sLse[r];
#pragma unroll
        for (int j = 0; j < kSc; ++j) {
            const int c = sx + j * kSx;
            const float p = sKeep[c] != 0.0f ? eqsdpa_exp_diff(s[i][j] * scale, l) : 0.0f;
            if (sP != nullptr) sP[r * kLdP + c] = p;
            sdS[r * kLdP + c] = p * dpd[i][j];
        }
    }
}

/// Stages `rows` rows of a [T, width] matrix from row `row0` into a padded [rows][width + 1]
/// shared tile, zeros past T.
template <int kRows, int kWidth, int kThreads>
__device__ __forceinline__ void eqsdpa_stage(float* s, const float* __restrict__ g, int row0, int t) {
    for (int i = threadIdx.x; i < kRows * kWidth; i += kThreads) {
        const int r = i / kWidth, c = i % kWidth;
        s[r * (kWidth + 1) + c] = row0 + r < t ? g[static_cast<long long>(row0 + r) * kWidth + c] : 0.0f;
    }
}

/// Stages lse of `kRows` queries from `q0`, +inf past T (so their P is 0).
template <int kRows, int kThreads>
__device__ __forceinline__ void eqsdpa_stage_lse(float* sLse, const float* __restrict__ lse, int q0, int t) {
    for (int i = threadIdx.x; i < kRows; i += kThreads) sLse[i] = q0 + i < t ? lse[q0 + i] : INFINITY;
}

// dk / dvalues: one block per (bh, key tile of kBk keys), looping over all queries in steps of
// kBq. Phases per step: stage q, dout, out, lse | entries (P, dS) | dV += P^T dout,
// dK += dS^T q. dV thread (vx, vy) = (tid % 32, tid / 32) owns keys vy + i*kVy and columns
// vx + 32 j; dK thread (kx, ky) owns keys ky + i*kKy and columns kx + kKx j.
template <int kDh_, int kBk_, int kBq_, int kThreads_>
struct EqsdpaDkvCfg {
    static constexpr int kDh = kDh_, kDv = 4 * kDh_, kBk = kBk_, kBq = kBq_, kThreads = kThreads_;
    static constexpr int kLdQ = kDh + 1, kLdV = kDv + 1, kLdP = kBk + 1;
    static constexpr int kSx = 16, kSy = kThreads / kSx, kSr = kBq / kSy, kSc = kBk / kSx;
    static constexpr int kVx = 32, kVy = kThreads / kVx, kVr = kBk / kVy, kVc = kDv / kVx;
    static constexpr int kKx = kDh < 32 ? kDh : 32, kKy = kThreads / kKx, kKr = kBk / kKy, kKc = kDh / kKx;
    // sK, sV, sQ, sO (dout), sY (out), sP, sdS, sLse, sKeep
    static constexpr int kSmemFloats =
        kBk * kLdQ + kBk * kLdV + kBq * kLdQ + 2 * kBq * kLdV + 2 * kBq * kLdP + kBq + kBk;
    static_assert(kBk % kSx == 0 && kBq % kSy == 0 && kBk % kVy == 0 && kBk % kKy == 0, "tiling");
    static_assert(kSmemFloats * 4 <= 48 * 1024, "static shared memory above 48 KB");
};

using EqsdpaDkv8 = EqsdpaDkvCfg<8, 64, 32, 128>;
using EqsdpaDkv16 = EqsdpaDkvCfg<16, 32, 32, 128>;
using EqsdpaDkv32 = EqsdpaDkvCfg<32, 32, 16, 128>;
using EqsdpaDkv64 = EqsdpaDkvCfg<64, 16, 8, 128>;

template <class C, bool kAtomicDq>
__device__ __forceinline__ void eqsdpa_backward_dkdv_f32(const float* __restrict__ q, const float* __restrict__ k,
                                                         const float* __restrict__ v,
                                                         const unsigned char* __restrict__ mask,
                                                         const float* __restrict__ out, const float* __restrict__ lse,
                                                         const float* __restrict__ dout, float* __restrict__ dk,
                                                         float* __restrict__ dv, float* __restrict__ dq, int bh_count,
                                                         int t, int heads, float scale) {
    constexpr int kDh = C::kDh, kDv = C::kDv, kBk = C::kBk, kBq = C::kBq, kThreads = C::kThreads;
    eqsdpa_require_threads(kThreads, "eqsdpa_backward_dkdv_f32");
    __shared__ float smem[C::kSmemFloats];
    float* sK = smem;
    float* sV = sK + kBk * C::kLdQ;
    float* sQ = sV + kBk * C::kLdV;
    float* sO = sQ + kBq * C::kLdQ;
    float* sY = sO + kBq * C::kLdV;
    float* sP = sY + kBq * C::kLdV;
    float* sdS = sP + kBq * C::kLdP;
    float* sLse = sdS + kBq * C::kLdP;
    float* sKeep = sLse + kBq;

    const int tid = threadIdx.x;
    const int sx = tid % C::kSx, sy = tid / C::kSx;
    const int vx = tid % C::kVx, vy = tid / C::kVx;
    const int kx = tid % C::kKx, ky = tid / C::kKx;
    const int nkt = (t + kBk - 1) / kBk;
    const long long tiles = static_cast<long long>(nkt) * bh_count;

    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const long long bh = tile / nkt;
        const int k0 = static_cast<int>(tile % nkt) * kBk;
        const float* qb = q + bh * t * kDh;
        const float* ob = dout + bh * t * kDv;
        const float* yb = out + bh * t * kDv;
        const unsigned char* mrow = mask == nullptr ? nullptr : mask + (bh / heads) * t;

        // sK, sV and sKeep were last read in the previous tile's final entries phase, behind a
        // barrier; the products after it read only sQ, sO, sP and sdS.
        eqsdpa_stage<kBk, kDh, kThreads>(sK, k + bh * t * kDh, k0, t);
        eqsdpa_stage<kBk, kDv, kThreads>(sV, v + bh * t * kDv, k0, t);
        for (int i = tid; i < kBk; i += kThreads) sKeep[i] = eqsdpa_key_ok(mrow, k0 + i, t) ? 1.0f : 0.0f;

        float accv[C::kVr][C::kVc], acck[C::kKr][C::kKc];
#pragma unroll
        for (int i = 0; i < C::kVr; ++i)
#pragma unroll
            for (int j = 0; j < C::kVc; ++j) accv[i][j] = 0.0f;
#pragma unroll
        for (int i = 0; i < C::kKr; ++i)
#pragma unroll
            for (int j = 0; j < C::kKc; ++j) acck[i][j] = 0.0f;

        for (int q0 = 0; q0 < t; q0 += kBq) {
            // The previous step's products are done with sQ, sO, sP and sdS.
            __syncthreads();
            eqsdpa_stage<kBq, kDh, kThreads>(sQ, qb, q0, t);
            eqsdpa_stage<kBq, kDv, kThreads>(sO, ob, q0, t);
            eqsdpa_stage<kBq, kDv, kThreads>(sY, yb, q0, t);
            eqsdpa_stage_lse<kBq, kThreads>(sLse, lse + bh * t, q0, t);
            __syncthreads();
            eqsdpa_entry_grads<kDh, C::kSr, C::kSc, C::kSx, C::kSy, C::kLdP>(sQ, sK, sO, sY, sV, sLse, sKeep, sP, sdS,
                                                                               scale, sx, sy);
            __syncthreads();
#pragma unroll 4
            for (int qq = 0; qq < kBq; ++qq) {
                float p[C::kVr], o[C::kVc];
#pragma unroll
                for (int i = 0; i < C::kVr; ++i) p[i] = sP[qq * C::kLdP + vy + i * C::kVy];
#pragma unroll
                for (int j = 0; j < C::kVc; ++j) o[j] = sO[qq * C::kLdV + vx + j * C::kVx];
#pragma unroll
                for (int i = 0; i < C::kVr; ++i)
#pragma unroll
                    for (int j = 0; j < C::kVc; ++j) accv[i][j] = fmaf(p[i], o[j], accv[i][j]);
                float ds[C::kKr], a[C::kKc];
#pragma unroll
                for (int i = 0; i < C::kKr; ++i) ds[i] = sdS[qq * C::kLdP + ky + i * C::kKy];
#pragma unroll
                for (int j = 0; j < C::kKc; ++j) a[j] = sQ[qq * C::kLdQ + kx + j * C::kKx];
#pragma unroll
                for (int i = 0; i < C::kKr; ++i)
#pragma unroll
                    for (int j = 0; j < C::kKc; ++j) acck[i][j] = fmaf(ds[i], a[j], acck[i][j]);
            }
            if constexpr (kAtomicDq) {
                // dq (zeroed by the caller) += scale dS k over this block's keys: one float atomic
                // per (query, column) and key tile. A warp covers 32 / dh queries (4 at dh = 8, half
                // of one at dh = 64), reading each one's sdS by broadcast and consecutive columns of
                // sK. The next step's first barrier keeps sdS alive until everyone is done.
                for (int i = tid; i < kBq * kDh; i += kThreads) {
                    const int r = i / kDh, c = i % kDh;
                    if (q0 + r >= t) continue;
                    float a = 0.0f;
#pragma unroll 4
                    for (int kk = 0; kk < kBk; ++kk) a = fmaf(sdS[r * C::kLdP + kk], sK[kk * C::kLdQ + c], a);
                    atomicAdd(dq + (bh * t + q0 + r) * kDh + c, scale * a);
                }
            }
        }

#pragma unroll
        for (int i = 0; i < C::kVr; ++i) {
            const int r = vy + i * C::kVy;
            if (k0 + r >= t) continue;
            float* row = dv + (bh * t + k0 + r) * kDv;
#pragma unroll
            for (int j = 0; j < C::kVc; ++j) row[vx + j * C::kVx] = accv[i][j];
        }
#pragma unroll
        for (int i = 0; i < C::kKr; ++i) {
            const int r = ky + i * C::kKy;
            if (k0 + r >= t) continue;
            float* row = dk + (bh * t + k0 + r) * kDh;
#pragma unroll
            for (int j = 0; j < C::kKc; ++j) row[kx + j * C::kKx] = scale * acck[i][j];
        }
    }
}

// dq: one block per (bh, query tile of kBq queries), looping over all keys in steps of kBk.
// Phases per step: stage k, values, key flags | entries (dS) | dQ += dS k. dQ thread (qx, qy)
// owns queries qy + i*kQy and columns qx + kQx j.
template <int kDh_, int kBq_, int kBk_, int kThreads_>
struct EqsdpaDqCfg {
    static constexpr int kDh = kDh_, kDv = 4 * kDh_, kBq = kBq_, kBk = kBk_, kThreads = kThreads_;
    static constexpr int kLdQ = kDh + 1, kLdV = kDv + 1, kLdP = kBk + 1;
    static constexpr int kSx = 16, kSy = kThreads / kSx, kSr = kBq / kSy, kSc = kBk / kSx;
    static constexpr int kQx = kDh < 32 ? kDh : 32, kQy = kThreads / kQx, kQr = kBq / kQy, kQc = kDh / kQx;
    // sQ, sO (dout), sY (out), sK, sV, sdS, sLse, sKeep
    static constexpr int kSmemFloats =
        kBq * kLdQ + 2 * kBq * kLdV + kBk * kLdQ + kBk * kLdV + kBq * kLdP + kBq + kBk;
    static_assert(kBk % kSx == 0 && kBq % kSy == 0 && kBq % kQy == 0, "tiling");
    static_assert(kSmemFloats * 4 <= 48 * 1024, "static shared memory above 48 KB");
};

using EqsdpaDq8 = EqsdpaDqCfg<8, 64, 32, 128>;
using EqsdpaDq16 = EqsdpaDqCfg<16, 32, 32, 128>;
using EqsdpaDq32 = EqsdpaDqCfg<32, 16, 32, 128>;
using EqsdpaDq64 = EqsdpaDqCfg<64, 8, 16, 128>;

template <class C>
__device__ __forceinline__ void eqsdpa_backward_dq_f32(const float* __restrict__ q, const float* __restrict__ k,
                                                       const float* __restrict__ v,
                                                       const unsigned char* __restrict__ mask,
                                                       const float* __restrict__ out, const float* __restrict__ lse,
                                                       const float* __restrict__ dout, float* __restrict__ dq,
                                                       int bh_count, int t, int heads, float scale) {
    constexpr int kDh = C::kDh, kDv = C::kDv, kBq = C::kBq, kBk = C::kBk, kThreads = C::kThreads;
    eqsdpa_require_threads(kThreads, "eqsdpa_backward_dq_f32");
    __shared__ float smem[C::kSmemFloats];
    float* sQ = smem;
    float* sO = sQ + kBq * C::kLdQ;
    float* sY = sO + kBq * C::kLdV;
    float* sK = sY + kBq * C::kLdV;
    float* sV = sK + kBk * C::kLdQ;
    float* sdS = sV + kBk * C::kLdV;
    float* sLse = sdS + kBq * C::kLdP;
    float* sKeep = sLse + kBq;

    const int tid = threadIdx.x;
    const int sx = tid % C::kSx, sy = tid / C::kSx;
    const int qx = tid % C::kQx, qy = tid / C::kQx;
    const int nqt = (t + kBq - 1) / kBq;
    const long long tiles = static_cast<long long>(nqt) * bh_count;

    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const long long bh = tile / nqt;
        const int q0 = static_cast<int>(tile % nqt) * kBq;
        const float* kb = k + bh * t * kDh;
        const float* vb = v + bh * t * kDv;
        const unsigned char* mrow = mask == nullptr ? nullptr : mask + (bh / heads) * t;

        // sQ, sO, sY and sLse were last read in the previous tile's final entries phase, behind a
        // barrier; the product after it reads only sdS and sK.
        eqsdpa_stage<kBq, kDh, kThreads>(sQ, q + bh * t * kDh, q0, t);
        eqsdpa_stage<kBq, kDv, kThreads>(sO, dout + bh * t * kDv, q0, t);
        eqsdpa_stage<kBq, kDv, kThreads>(sY, out + bh * t * kDv, q0, t);
        eqsdpa_stage_lse<kBq, kThreads>(sLse, lse + bh * t, q0, t);

        float acc[C::kQr][C::kQc];
#pragma unroll
        for (int i = 0; i < C::kQr; ++i)
#pragma unroll
            for (int j = 0; j < C::kQc; ++j) acc[i][j] = 0.0f;

        for (int k0 = 0; k0 < t; k0 += kBk) {
            // The previous step's product is done with sK and sdS.
            __syncthreads();
            eqsdpa_stage<kBk, kDh, kThreads>(sK, kb, k0, t);
            eqsdpa_stage<kBk, kDv, kThreads>(sV, vb, k0, t);
            for (int i = tid; i < kBk; i += kThreads) sKeep[i] = eqsdpa_key_ok(mrow, k0 + i, t) ? 1.0f : 0.0f;
            __syncthreads();
            eqsdpa_entry_grads<kDh, C::kSr, C::kSc, C::kSx, C::kSy, C::kLdP>(sQ, sK, sO, sY, sV, sLse, sKeep,
                                                                               nullptr, sdS, scale, sx, sy);
            __syncthreads();
#pragma unroll 4
            for (int kk = 0; kk < kBk; ++kk) {
                float ds[C::kQr], b[C::kQc];
#pragma unroll
                for (int i = 0; i < C::kQr; ++i) ds[i] = sdS[(qy + i * C::kQy) * C::kLdP + kk];
#pragma unroll
                for (int j = 0; j < C::kQc; ++j) b[j] = sK[kk * C::kLdQ + qx + j * C::kQx];
#pragma unroll
                for (int i = 0; i < C::kQr; ++i)
#pragma unroll
                    for (int j = 0; j < C::kQc; ++j) acc[i][j] = fmaf(ds[i], b[j], acc[i][j]);
            }
        }

#pragma unroll
        for (int i = 0; i < C::kQr; ++i) {
            const int r = qy + i * C::kQy;
            if (q0 + r >= t) continue;
            float* row = dq + (bh * t + q0 + r) * kDh;
#pragma unroll
            for (int j = 0; j < C::kQc; ++j) row[qx + j * C::kQx] = scale * acc[i][j];
        }
    }
}

#define HIERMD_EQSDPA_BACKWARD_F32(dh)                                                                             \
    extern "C" __global__ void __launch_bounds__(EqsdpaDkv##dh::kThreads) eqsdpa_backward_dkdv_f32_dh##dh(         \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,                     \
        const unsigned char* __restrict__ mask, const float* __restrict__ out, const float* __restrict__ lse,       \
        const float* __restrict__ dout, float* __restrict__ dk, float* __restrict__ dv, int bh_count, int t,        \
        int heads, float scale) {                                                                                  \
        eqsdpa_backward_dkdv_f32<EqsdpaDkv##dh, false>(q, k, v, mask, out, lse, dout, dk, dv, nullptr, bh_count, t,  \
                                                       heads, scale);                                              \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(EqsdpaDkv##dh::kThreads) eqsdpa_backward_atomic_f32_dh##dh(       \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,                     \
        const unsigned char* __restrict__ mask, const float* __restrict__ out, const float* __restrict__ lse,       \
        const float* __restrict__ dout, float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv,     \
        int bh_count, int t, int heads, float scale) {                                                             \
        eqsdpa_backward_dkdv_f32<EqsdpaDkv##dh, true>(q, k, v, mask, out, lse, dout, dk, dv, dq, bh_count, t, heads, \
                                                      scale);                                                      \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(EqsdpaDq##dh::kThreads) eqsdpa_backward_dq_f32_dh##dh(            \
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,                     \
        const unsigned char* __restrict__ mask, const float* __restrict__ out, const float* __restrict__ lse,       \
        const float* __restrict__ dout, float* __restrict__ dq, int bh_count, int t, int heads, float scale) {       \
        eqsdpa_backward_dq_f32<EqsdpaDq##dh>(q, k, v, mask, out, lse, dout, dq, bh_count, t, heads, scale);         \
    }

/// dk and dvalues (assigned), and dq (assigned), for dh = 8, 16, 32, 64; the atomic variant
/// (eqsdpa_backward_atomic_f32_dh*) assigns dk and dvalues and adds into dq, which the caller zeroes.
HIERMD_EQSDPA_BACKWARD_F32(8)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dkdv_f32_dh8)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dq_f32_dh8)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_atomic_f32_dh8)
HIERMD_EQSDPA_BACKWARD_F32(16)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dkdv_f32_dh16)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dq_f32_dh16)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_atomic_f32_dh16)
HIERMD_EQSDPA_BACKWARD_F32(32)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dkdv_f32_dh32)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dq_f32_dh32)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_atomic_f32_dh32)
HIERMD_EQSDPA_BACKWARD_F32(64)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dkdv_f32_dh64)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dq_f32_dh64)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_atomic_f32_dh64)

// ---------------------------------------------------------------------------------------------
// Forward, bf16 / f16 on the tensor cores (mma.sync.m16n8k16, f32 accumulation): q, k and values
// in 16-bit floats, out and lse in f32. The backward follows it.
//
// A block is 4 warps and 64 queries; each warp owns 16 query rows for the whole key loop, as in
// FlashAttention-2, so a row's softmax statistics never leave its warp:
//   - the warp's Q fragments (16 x dh) are loaded once with ldmatrix and kept in registers;
//   - per key tile, S (16 x kBk) = Q K^T accumulates in registers: K staged [key][d] in shared
//     memory is exactly the ".col" B operand, read with plain ldmatrix;
//   - in the accumulator layout a lane holds rows g and g + 8 (g = lane / 4), columns 2t and
//     2t + 1 (t = lane % 4) of each 8-key block, so a row's maximum and sum are a reduction over
//     the 4 lanes of a quad (xor shuffles 1 and 2, bit-identical in all four);
//   - P = exp(S - m) is rounded to bf16 / f16 and handed straight back to the tensor cores as the
//     A operand of O += P V: the accumulators of two adjacent 8-key blocks are, element for
//     element, the A fragment of one 16-key step (PTX ISA 9.7.14.5.8), so P never touches shared
//     memory; V staged [key][column] is read with ldmatrix .trans;
//   - the row sums l stay per lane (each lane's own columns, rescaled with the row) and meet over
//     the quad once at the end, in a fixed order. l sums P before rounding, as FlashAttention-2.
// O (16 x 4 dh per warp) lives in registers: 128 floats per thread at dh = 64, which is what
// bounds the design there (32-key tiles; ptxas reports 0 spills, see ptx/RESOURCES.md).
// Tiles: dh 16 and 32 take 64 keys per step, dh 64 takes 32 (the value tile 32 x 256 x 2 bytes is
// 16 KB); shared rows are padded by 8 elements (16 bytes), which keeps every ldmatrix row 16-byte
// aligned and the 8 rows of each 8x8 matrix in distinct banks.
//
// What a Hopper (sm_90a) version would change: K and V tiles would arrive by TMA
// (cp.async.bulk.tensor, the hardware zero-filling past T) into a ring of 2-3 shared-memory stages
// guarded by mbarriers, a producer warp keeping them coming while consumer warpgroups compute;
// S = Q K^T and O += P V would be wgmma.mma_async m64nNk16 issued per warpgroup (4 warps, 64
// query rows) with K and V read straight from shared memory (no ldmatrix), P fed from registers
// as wgmma's A operand; two consumer warpgroups would ping-pong so that one's softmax overlaps
// the other's matrix products (FlashAttention-3), and setmaxnreg would move registers from the
// producer to the consumers, which is what would let dh = 64 (O 64 x 256 per warpgroup) keep
// larger tiles. The fixed-order row reductions keep such a version deterministic too. None of
// it exists in sm_80 PTX or in the emu, hence mma.sync here.

template <int kDh_, int kBk_>
struct EqsdpaMmaCfg {
    static constexpr int kDh = kDh_, kDv = 4 * kDh_, kBq = 64, kBk = kBk_, kThreads = 128;
    static constexpr int kPad = 8;
    static constexpr int kLdQ = kDh + kPad, kLdV = kDv + kPad;  // K rows use kLdQ
    static constexpr int kSmemElems = kBq * kLdQ + kBk * kLdQ + kBk * kLdV;
    static constexpr int kNt = kBk / 8;   // 8-key blocks of S per warp
    static constexpr int kOt = kDv / 8;   // 8-column blocks of O per warp
    static constexpr int kKs = kDh / 16;  // 16-wide steps of Q K^T
    static_assert(kBk % 16 == 0 && kDh % 16 == 0, "mma tiling");
    static_assert(kSmemElems % 8 == 0 && (kBq * kLdQ) % 8 == 0 && (kBk * kLdQ) % 8 == 0, "16-byte regions");
    static_assert(kSmemElems * 2 + kBk * 4 <= 48 * 1024, "static shared memory above 48 KB");
};

using EqsdpaMma16 = EqsdpaMmaCfg<16, 64>;
using EqsdpaMma32 = EqsdpaMmaCfg<32, 64>;
using EqsdpaMma64 = EqsdpaMmaCfg<64, 32>;

/// Eight 16-bit elements: one 128-bit load or store.
struct __align__(16) EqsdpaChunk {
    uint32_t w[4];
};

/// Stages rows [row0, row0 + kRows) of a [T, kWidth] 16-bit matrix into a shared tile of row
/// length kWidth + 8, zeros past T; 16-byte loads when `vec` (the base is 16-byte aligned, and
/// rows of 16, 32, 64, ... elements keep every row so).
template <int kRows, int kWidth, int kThreads>
__device__ __forceinline__ void eqsdpa_stage_b16(uint16_t* s, const uint16_t* __restrict__ g, int row0, int t,
                                                 bool vec) {
    constexpr int kChunks = kWidth / 8;
    for (int i = threadIdx.x; i < kRows * kChunks; i += kThreads) {
        const int r = i / kChunks, c = (i % kChunks) * 8;
        EqsdpaChunk x{{0u, 0u, 0u, 0u}};
        if (row0 + r < t) {
            const uint16_t* p = g + static_cast<long long>(row0 + r) * kWidth + c;
            if (vec) {
                x = *reinterpret_cast<const EqsdpaChunk*>(p);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) x.w[e / 2] |= static_cast<uint32_t>(p[e]) << (16 * (e % 2));
            }
        }
        *reinterpret_cast<EqsdpaChunk*>(s + r * (kWidth + 8) + c) = x;
    }
}

__device__ __forceinline__ void eqsdpa_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __half) {
    mma_m16n8k16_f16(d, a, b, d);
}
__device__ __forceinline__ void eqsdpa_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                           __nv_bfloat16) {
    mma_m16n8k16_bf16(d, a, b, d);
}
__device__ __forceinline__ uint32_t eqsdpa_pack(float lo, float hi, __half) { return pack_f32_to_f16x2_rn(lo, hi); }
__device__ __forceinline__ uint32_t eqsdpa_pack(float lo, float hi, __nv_bfloat16) {
    return pack_f32_to_bf16x2_rn(lo, hi);
}

template <class T, class C>
__device__ __forceinline__ void eqsdpa_forward_mma(const T* q_in, const T* k_in, const T* v_in,
                                                   const unsigned char* __restrict__ mask, float* __restrict__ out,
                                                   float* __restrict__ lse, int bh_count, int t, int heads,
                                                   float scale) {
    constexpr int kDh = C::kDh, kDv = C::kDv, kBq = C::kBq, kBk = C::kBk, kThreads = C::kThreads;
    constexpr int kLdQ = C::kLdQ, kLdV = C::kLdV;
    eqsdpa_require_threads(kThreads, "eqsdpa_forward_mma");
    __shared__ __align__(16) uint16_t smem[C::kSmemElems];
    __shared__ float sKeep[kBk];
    uint16_t* sQ = smem;
    uint16_t* sK = sQ + kBq * kLdQ;
    uint16_t* sV = sK + kBk * kLdQ;
    // Staging moves bit patterns; only the mma instructions interpret them.
    const uint16_t* q = reinterpret_cast<const uint16_t*>(q_in);
    const uint16_t* k = reinterpret_cast<const uint16_t*>(k_in);
    const uint16_t* v = reinterpret_cast<const uint16_t*>(v_in);
    const bool vec = (reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(k) |
                      reinterpret_cast<uintptr_t>(v)) %
                         16 ==
                     0;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, tq = lane % 4;
    // ldmatrix: lane l supplies row l % 8 of matrix l / 8.
    const int mat = lane / 8, mr = lane % 8;
    const int nqt = (t + kBq - 1) / kBq;
    const long long tiles = static_cast<long long>(nqt) * bh_count;

    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const long long bh = tile / nqt;
        const int q0 = static_cast<int>(tile % nqt) * kBq;
        const uint16_t* kb = k + bh * t * kDh;
        const uint16_t* vb = v + bh * t * kDv;
        const unsigned char* mrow = mask == nullptr ? nullptr : mask + (bh / heads) * t;

        // The previous tile read sQ only for its Q fragments, before many barriers.
        eqsdpa_stage_b16<kBq, kDh, kThreads>(sQ, q + bh * t * kDh, q0, t, vec);
        __syncthreads();
        uint32_t qf[C::kKs][4];
#pragma unroll
        for (int ks = 0; ks < C::kKs; ++ks)
            ldmatrix_x4(qf[ks], sQ + (warp * 16 + (mat & 1) * 8 + mr) * kLdQ + ks * 16 + (mat >> 1) * 8);

        float o[C::kOt][4];
#pragma unroll
        for (int j = 0; j < C::kOt; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[j][e] = 0.0f;
        float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.0f, 0.0f};

        for (int k0 = 0; k0 < t; k0 += kBk) {
            // Everyone is done with sK, sV and sKeep of the previous step (and with sQ).
            __syncthreads();
            eqsdpa_stage_b16<kBk, kDh, kThreads>(sK, kb, k0, t, vec);
            eqsdpa_stage_b16<kBk, kDv, kThreads>(sV, vb, k0, t, vec);
            for (int i = tid; i < kBk; i += kThreads) sKeep[i] = eqsdpa_key_ok(mrow, k0 + i, t) ? 1.0f : 0.0f;
            __syncthreads();

            // S = Q K^T: per 16-wide step of dh, one ldmatrix.x4 gives two 8-key B fragments.
            float s[C::kNt][4];
#pragma unroll
            for (int j = 0; j < C::kNt; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < C::kKs; ++ks) {
#pragma unroll
                for (int j = 0; j < C::kNt; j += 2) {
                    uint32_t kf[4];
                    ldmatrix_x4(kf, sK + (j * 8 + (mat >> 1) * 8 + mr) * kLdQ + ks * 16 + (mat & 1) * 8);
                    const uint32_t b0[2] = {kf[0], kf[1]}, b1[2] = {kf[2], kf[3]};
                    eqsdpa_mma(s[j], qf[ks], b0, T{});
                    eqsdpa_mma(s[j + 1], qf[ks], b1, T{});
                }
            }

            // Scale, mask (by a select), row maxima over the quad; e >> 1 picks row g or g + 8.
            float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int j = 0; j < C::kNt; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float x = sKeep[j * 8 + 2 * tq + (e & 1)] != 0.0f ? s[j][e] * scale : -INFINITY;
                    s[j][e] = x;
                    tmax[e >> 1] = fmaxf(tmax[e >> 1], x);
                }
            float alpha[2], m_use[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                tmax[h] = fmaxf(tmax[h], __shfl_xor_sync(HIERMD_FULL_MASK, tmax[h], 1));
                tmax[h] = fmaxf(tmax[h], __shfl_xor_sync(HIERMD_FULL_MASK, tmax[h], 2));
                const float m_new = fmaxf(m_run[h], tmax[h]);
                m_use[h] = m_new == -INFINITY ? 0.0f : m_new;
                alpha[h] = expf(m_run[h] - m_use[h]);
                m_run[h] = m_new;
            }
            float psum[2] = {0.0f, 0.0f};
#pragma unroll
            for (int j = 0; j < C::kNt; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = expf(s[j][e] - m_use[e >> 1]);
                    s[j][e] = p;
                    psum[e >> 1] += p;
                }
#pragma unroll
            for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + psum[h];
#pragma unroll
            for (int j = 0; j < C::kOt; ++j) {
                o[j][0] *= alpha[0];
                o[j][1] *= alpha[0];
                o[j][2] *= alpha[1];
                o[j][3] *= alpha[1];
            }

            // O += P V, 16 keys per step: P's A fragment from two 8-key accumulator blocks.
#pragma unroll
            for (int kc = 0; kc < kBk / 16; ++kc) {
                const uint32_t pa[4] = {eqsdpa_pack(s[2 * kc][0], s[2 * kc][1], T{}),
                                        eqsdpa_pack(s[2 * kc][2], s[2 * kc][3], T{}),
                                        eqsdpa_pack(s[2 * kc + 1][0], s[2 * kc + 1][1], T{}),
                                        eqsdpa_pack(s[2 * kc + 1][2], s[2 * kc + 1][3], T{})};
#pragma unroll
                for (int j = 0; j < C::kOt; j += 2) {
                    uint32_t vf[4];
                    ldmatrix_x4_trans(vf, sV + (kc * 16 + (mat & 1) * 8 + mr) * kLdV + j * 8 + (mat >> 1) * 8);
                    const uint32_t b0[2] = {vf[0], vf[1]}, b1[2] = {vf[2], vf[3]};
                    eqsdpa_mma(o[j], pa, b0, T{});
                    eqsdpa_mma(o[j + 1], pa, b1, T{});
                }
            }
        }

        // Row sums over the quad (a fixed butterfly: the same float in all four lanes), then
        // out = O / l and lse, as in the f32 kernel.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float l = l_run[h];
            l += __shfl_xor_sync(HIERMD_FULL_MASK, l, 1);
            l += __shfl_xor_sync(HIERMD_FULL_MASK, l, 2);
            const int row = q0 + warp * 16 + g + 8 * h;
            if (row >= t) continue;
            if (tq == 0)
                lse[bh * t + row] =
                    l > 0.0f ? static_cast<float>(static_cast<double>(m_run[h]) + log(static_cast<double>(l)))
                             : INFINITY;
            float* orow = out + (bh * t + row) * kDv;
#pragma unroll
            for (int j = 0; j < C::kOt; ++j) {
                orow[j * 8 + 2 * tq] = l > 0.0f ? o[j][2 * h] / l : 0.0f;
                orow[j * 8 + 2 * tq + 1] = l > 0.0f ? o[j][2 * h + 1] / l : 0.0f;
            }
        }
    }
}

#define HIERMD_EQSDPA_FORWARD_MMA(type, name, dh)                                                                  \
    extern "C" __global__ void __launch_bounds__(EqsdpaMma##dh::kThreads, 1)                                       \
        eqsdpa_forward_##name##_dh##dh(const type* __restrict__ q, const type* __restrict__ k,                     \
                                       const type* __restrict__ v, const unsigned char* __restrict__ mask,         \
                                       float* __restrict__ out, float* __restrict__ lse, int bh_count, int t,      \
                                       int heads, float scale) {                                                   \
        eqsdpa_forward_mma<type, EqsdpaMma##dh>(q, k, v, mask, out, lse, bh_count, t, heads, scale);               \
    }

/// out and lse (f32) from bf16 q, k, values: dh = 16, 32, 64.
HIERMD_EQSDPA_FORWARD_MMA(__nv_bfloat16, bf16, 16)
HIERMD_EXPORT_KERNEL(eqsdpa_forward_bf16_dh16)
HIERMD_EQSDPA_FORWARD_MMA(__nv_bfloat16, bf16, 32)
HIERMD_EXPORT_KERNEL(eqsdpa_forward_bf16_dh32)
HIERMD_EQSDPA_FORWARD_MMA(__nv_bfloat16, bf16, 64)
HIERMD_EXPORT_KERNEL(eqsdpa_forward_bf16_dh64)
/// out and lse (f32) from f16 q, k, values: dh = 16, 32, 64.
HIERMD_EQSDPA_FORWARD_MMA(__half, f16, 16)
HIERMD_EXPORT_KERNEL(eqsdpa_forward_f16_dh16)
HIERMD_EQSDPA_FORWARD_MMA(__half, f16, 32)
HIERMD_EXPORT_KERNEL(eqsdpa_forward_f16_dh32)
HIERMD_EQSDPA_FORWARD_MMA(__half, f16, 64)
HIERMD_EXPORT_KERNEL(eqsdpa_forward_f16_dh64)

// ---------------------------------------------------------------------------------------------
// Backward, bf16 / f16 on the tensor cores (mma.sync.m16n8k16, f32 accumulation).
//
// Inputs: q, k, values in the 16-bit type; out and lse (f32) from the 16-bit forward; dout in
// f32. Gradients dq, dk, dvalues come out in f32 (the optimiser's master weights and the rest of
// the tape are f32; rounding them to 16 bits would add an error for nothing). Three kernels:
//   eqsdpa_backward_prep_{bf16,f16}
//       one warp per query row: dout rounded to the 16-bit type (the mma operand; written to a
//       scratch copy, which also halves what the next two kernels read) and
//       D = rowsum(rounded dout * out) in f32, FlashAttention-2's preprocessing step. With 16-bit
//       operands the cancellation in dP - D (see the f32 backward) is far below the rounding of
//       the operands themselves, so the f32 kernels' dout . (values - out) form is not needed.
//   eqsdpa_backward_dkdv_{bf16,f16}_dh*   (and eqsdpa_backward_atomic_{bf16,f16}_dh*)
//       one block per (bh, tile of 16 keys per warp), looping over query tiles of kBn. Each warp
//       computes, for its 16 keys, S^T = K Q^T and dP^T = V dO^T in registers (K and V are the
//       row-major A operands, read with ldmatrix from the key tile staged once; Q and dO staged
//       [query][column] are exactly the ".col" B operands), P^T = exp(scale S^T - lse) and
//       dS^T = P^T (dP^T - D), then dV += P^T dO and dK += dS^T Q with P^T and dS^T rounded to the
//       16-bit type and handed straight back as A fragments (the accumulator -> A identity of the
//       forward), Q and dO read with ldmatrix .trans. The atomic variant also writes dS (16-bit)
//       to shared memory and adds scale dS K to dq with float atomics (see below).
//   eqsdpa_backward_dq_{bf16,f16}_dh*
//       one block per (bh, tile of 16 queries per warp), looping over key tiles: S = Q K^T,
//       dP = dO V^T, P, dS as above, dQ += dS K (dS rounded, K read with ldmatrix .trans).
// P and dS are rounded to the 16-bit type before they multiply, as in FlashAttention-2; the
// tests hold the result to twice the error of a materialised attention that rounds the same way.
// Deterministic (the default): no atomics, every output a fixed-order sum, as the f32 kernels.
//
// Accumulators: a warp keeps dV (16 x 4 dh) and dK (16 x dh) in registers for the whole query
// loop: 160 floats per thread at dh = 64, which is why dh = 64 takes 16-query steps and two warps
// per block (the key tile of values, 32 x 264 x 2 bytes, then fits 48 KB beside the rest).
// Tiles (warps: rows of 16 per block; kBn: the streamed tile):
//   dh   dk/dv kernel              dq kernel
//   16   4 warps, 32-query steps   4 warps, 64-key steps
//   32   4 warps, 32-query steps   4 warps, 32-key steps
//   64   2 warps, 16-query steps   2 warps, 32-key steps
//
// Atomic dq (eqsdpa_backward_atomic_*): FlashAttention-2's one-pass variant. The key-tile kernel
// already has dS for (its keys) x (every query tile), so it can also add scale dS K to dq with
// float atomics, and the dq kernel (which recomputes S, P, dP and dS a second time) is not run.
// The order in which blocks' atomics land varies from run to run, so dq is not reproducible bit
// for bit (it differs from the deterministic mode by f32 rounding); dk and dvalues are the same
// as in the deterministic mode. Whether it is faster depends on the GPU (atomic traffic: one add
// per query, column and key tile) and has not been measured (no GPU when it was written).
//
// What a Hopper (sm_90a) version of the backward would change, beyond what the forward's note
// says: Q, dO, lse and D tiles would stream in by TMA into a multi-stage mbarrier ring, the five
// products (S^T, dP^T, dV, dK, and dQ) would be wgmma m64nNk16 per warpgroup with their B operands
// (and dO / Q for dV / dK) read from shared memory directly, and dQ's partial products would be
// written out by TMA reduce-add (cp.reduce.async.bulk .add.f32) instead of per-element atomics,
// which is what makes FlashAttention-3's single-kernel backward cheap. dV and dK at dh = 64
// (64 x 256 + 64 x 64 floats per warpgroup) would need setmaxnreg-enlarged consumer warpgroups.
// The deterministic variant would keep the separate dq pass, or a semaphore-ordered reduction.

template <int kDh_, int kWarps_, int kBn_>
struct EqsdpaMmaBwdCfg {
    static constexpr int kDh = kDh_, kDv = 4 * kDh_, kWarps = kWarps_, kThreads = 32 * kWarps_;
    static constexpr int kBm = 16 * kWarps_;  // rows the block owns: keys (dk/dv), queries (dq)
    static constexpr int kBn = kBn_;          // the streamed tile: queries (dk/dv), keys (dq)
    static constexpr int kPad = 8;
    static constexpr int kLdQ = kDh + kPad, kLdV = kDv + kPad, kLdS = kBm + kPad;
    static constexpr int kNb = kBn / 8;  // 8-wide column blocks of S, dP per warp
    // dk/dv kernel: sK, sV (kBm rows), sQ, sO (kBn rows), sdS [kBn][kLdS] (atomic variant).
    static constexpr int kDkvElems = kBm * (kLdQ + kLdV) + kBn * (kLdQ + kLdV) + kBn * kLdS;
    // dq kernel: sQ, sO (kBm rows), sK, sV (kBn rows).
    static constexpr int kDqElems = kBm * (kLdQ + kLdV) + kBn * (kLdQ + kLdV);
    static_assert(kBn % 16 == 0 && kDh % 16 == 0, "mma tiling");
    static_assert((kBm * kLdQ) % 8 == 0 && (kBm * kLdV) % 8 == 0 && (kBn * kLdQ) % 8 == 0 &&
                      (kBn * kLdV) % 8 == 0 && kLdS % 8 == 0,
                  "16-byte regions");
    // dk/dv kernel floats: sLse, sD (kBn), sKeep (kBm), the dK accumulator [kBm][kDh].
    static constexpr int kDkvFloats = 2 * kBn + kBm + kBm * kDh;
    // (Each kernel checks its own total against 48 KB.)
};

using EqsdpaMmaDkv16 = EqsdpaMmaBwdCfg<16, 4, 32>;
using EqsdpaMmaDkv32 = EqsdpaMmaBwdCfg<32, 4, 32>;
using EqsdpaMmaDkv64 = EqsdpaMmaBwdCfg<64, 2, 16>;
using EqsdpaMmaDq16 = EqsdpaMmaBwdCfg<16, 4, 64>;
using EqsdpaMmaDq32 = EqsdpaMmaBwdCfg<32, 4, 32>;
using EqsdpaMmaDq64 = EqsdpaMmaBwdCfg<64, 2, 32>;

__device__ __forceinline__ uint16_t eqsdpa_round_bits(float x, __half) { return __half_as_ushort(__float2half_rn(x)); }
__device__ __forceinline__ uint16_t eqsdpa_round_bits(float x, __nv_bfloat16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
__device__ __forceinline__ float eqsdpa_bits_value(uint16_t b, __half) { return __half2float(__ushort_as_half(b)); }
__device__ __forceinline__ float eqsdpa_bits_value(uint16_t b, __nv_bfloat16) {
    return __bfloat162float(__ushort_as_bfloat16(b));
}

/// dout_h = dout rounded to T, D = rowsum(dout_h * out), one warp per row of `dv` columns. D is
/// summed in double (each lane's columns in turn, then the warp's butterfly: a fixed order) and
/// rounded once: dP - D cancels where a row's P is nearly one-hot (out ~ values_j, dP_j ~ D), and
/// dP comes from the tensor cores' f32 accumulation, so D should add no error of its own (an f32
/// sum of 4 dh products would, several ulps of it). The kernel is memory-bound; double costs
/// nothing that matters.
template <class T>
__device__ __forceinline__ void eqsdpa_backward_prep(const float* __restrict__ dout, const float* __restrict__ out,
                                                     T* dout_h_out, float* __restrict__ dsum, long long rows,
                                                     int dv) {
    uint16_t* dout_h = reinterpret_cast<uint16_t*>(dout_h_out);
    const int lane = threadIdx.x % 32;
    const int warps = blockDim.x / 32;
    for (long long row = static_cast<long long>(blockIdx.x) * warps + threadIdx.x / 32; row < rows;
         row += static_cast<long long>(gridDim.x) * warps) {
        double acc = 0.0;
        for (int c = lane; c < dv; c += 32) {
            const uint16_t b = eqsdpa_round_bits(dout[row * dv + c], T{});
            dout_h[row * dv + c] = b;
            // Exact: a 16-bit value times an f32 fits a double's mantissa.
            acc += static_cast<double>(eqsdpa_bits_value(b, T{})) * static_cast<double>(out[row * dv + c]);
        }
        acc = warp_sum(acc);
        if (lane == 0) dsum[row] = static_cast<float>(acc);
    }
}

template <class T, class C, bool kAtomicDq>
__device__ __forceinline__ void eqsdpa_backward_dkdv_mma(const T* q_in, const T* k_in, const T* v_in,
                                                         const T* do_in, const unsigned char* __restrict__ mask,
                                                         const float* __restrict__ lse,
                                                         const float* __restrict__ dsum, float* __restrict__ dq,
                                                         float* __restrict__ dk, float* __restrict__ dv, int bh_count,
                                                         int t, int heads, float scale) {
    constexpr int kDh = C::kDh, kDv = C::kDv, kBm = C::kBm, kBn = C::kBn, kThreads = C::kThreads;
    constexpr int kLdQ = C::kLdQ, kLdV = C::kLdV, kLdS = C::kLdS, kNb = C::kNb;
    static_assert(C::kDkvElems * 2 + C::kDkvFloats * 4 <= 48 * 1024, "static shared memory above 48 KB");
    eqsdpa_require_threads(kThreads, "eqsdpa_backward_dkdv_mma");
    __shared__ __align__(16) uint16_t smem[C::kDkvElems];
    __shared__ float sLse[kBn], sD[kBn], sKeep[kBm], sdK[kBm * kDh];
    uint16_t* sK = smem;
    uint16_t* sV = sK + kBm * kLdQ;
    uint16_t* sQ = sV + kBm * kLdV;
    uint16_t* sO = sQ + kBn * kLdQ;
    uint16_t* sdS = sO + kBn * kLdV;
    const uint16_t* q = reinterpret_cast<const uint16_t*>(q_in);
    const uint16_t* k = reinterpret_cast<const uint16_t*>(k_in);
    const uint16_t* v = reinterpret_cast<const uint16_t*>(v_in);
    const uint16_t* dob = reinterpret_cast<const uint16_t*>(do_in);
    const bool vec = (reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(k) |
                      reinterpret_cast<uintptr_t>(v) | reinterpret_cast<uintptr_t>(dob)) %
                         16 ==
                     0;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, tq = lane % 4;
    const int mat = lane / 8, mr = lane % 8;
    const int nkt = (t + kBm - 1) / kBm;
    const long long tiles = static_cast<long long>(nkt) * bh_count;

    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const long long bh = tile / nkt;
        const int k0 = static_cast<int>(tile % nkt) * kBm;
        const uint16_t* qb = q + bh * t * kDh;
        const uint16_t* ob = dob + bh * t * kDv;
        const unsigned char* mrow = mask == nullptr ? nullptr : mask + (bh / heads) * t;

        // Everyone is done with the previous tile's sK, sV and sKeep.
        __syncthreads();
        eqsdpa_stage_b16<kBm, kDh, kThreads>(sK, k + bh * t * kDh, k0, t, vec);
        eqsdpa_stage_b16<kBm, kDv, kThreads>(sV, v + bh * t * kDv, k0, t, vec);
        for (int i = tid; i < kBm; i += kThreads) sKeep[i] = eqsdpa_key_ok(mrow, k0 + i, t) ? 1.0f : 0.0f;

        // dV accumulates in registers; dK in shared memory (this lane's own elements of its warp's
        // rows, so no barrier), which keeps dh = 64 within 255 registers without spilling.
        float accv[kDv / 8][4];
#pragma unroll
        for (int j = 0; j < kDv / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) accv[j][e] = 0.0f;
        float* myK = sdK + (warp * 16 + g) * kDh + 2 * tq;  // rows g (+ 8 kDh: g + 8), column pairs
#pragma unroll
        for (int j = 0; j < kDh / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) myK[(e >> 1) * 8 * kDh + j * 8 + (e & 1)] = 0.0f;

        for (int q0 = 0; q0 < t; q0 += kBn) {
            // Everyone is done with the previous step's sQ, sO, sLse, sD and sdS.
            __syncthreads();
            eqsdpa_stage_b16<kBn, kDh, kThreads>(sQ, qb, q0, t, vec);
            eqsdpa_stage_b16<kBn, kDv, kThreads>(sO, ob, q0, t, vec);
            for (int i = tid; i < kBn; i += kThreads) {
                sLse[i] = q0 + i < t ? lse[bh * t + q0 + i] : INFINITY;
                sD[i] = q0 + i < t ? dsum[bh * t + q0 + i] : 0.0f;
            }
            __syncthreads();
            // This lane's key rows: g and g + 8 of the warp's 16.
            const bool keep[2] = {sKeep[warp * 16 + g] != 0.0f, sKeep[warp * 16 + g + 8] != 0.0f};

            // S^T = K Q^T and dP^T = V dO^T, 16 keys x kBn queries per warp.
            float s[kNb][4], dp[kNb][4];
#pragma unroll
            for (int j = 0; j < kNb; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < kDh / 16; ++ks) {
                uint32_t af[4];
                ldmatrix_x4(af, sK + (warp * 16 + (mat & 1) * 8 + mr) * kLdQ + ks * 16 + (mat >> 1) * 8);
#pragma unroll
                for (int j = 0; j < kNb; j += 2) {
                    uint32_t bf[4];
                    ldmatrix_x4(bf, sQ + (j * 8 + (mat >> 1) * 8 + mr) * kLdQ + ks * 16 + (mat & 1) * 8);
                    const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
                    eqsdpa_mma(s[j], af, b0, T{});
                    eqsdpa_mma(s[j + 1], af, b1, T{});
                }
            }
#pragma unroll 1
            for (int kc = 0; kc < kDv / 16; ++kc) {
                uint32_t af[4];
                ldmatrix_x4(af, sV + (warp * 16 + (mat & 1) * 8 + mr) * kLdV + kc * 16 + (mat >> 1) * 8);
#pragma unroll
                for (int j = 0; j < kNb; j += 2) {
                    uint32_t bf[4];
                    ldmatrix_x4(bf, sO + (j * 8 + (mat >> 1) * 8 + mr) * kLdV + kc * 16 + (mat & 1) * 8);
                    const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
                    eqsdpa_mma(dp[j], af, b0, T{});
                    eqsdpa_mma(dp[j + 1], af, b1, T{});
                }
            }

            // P^T (0 for a masked key or a query past T, whose lse is +inf) and dS^T, in place.
#pragma unroll
            for (int j = 0; j < kNb; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = j * 8 + 2 * tq + (e & 1);
                    const float p = keep[e >> 1] ? eqsdpa_exp_diff(s[j][e] * scale, sLse[col]) : 0.0f;
                    s[j][e] = p;
                    dp[j][e] = p * (dp[j][e] - sD[col]);
                }

            // dK += dS^T Q: per pair of 8-column blocks, this step's product over kBn queries is
            // formed in registers and then added to the shared accumulator (a fixed order).
            uint32_t da[kBn / 16][4];
#pragma unroll
            for (int kc = 0; kc < kBn / 16; ++kc) {
                da[kc][0] = eqsdpa_pack(dp[2 * kc][0], dp[2 * kc][1], T{});
                da[kc][1] = eqsdpa_pack(dp[2 * kc][2], dp[2 * kc][3], T{});
                da[kc][2] = eqsdpa_pack(dp[2 * kc + 1][0], dp[2 * kc + 1][1], T{});
                da[kc][3] = eqsdpa_pack(dp[2 * kc + 1][2], dp[2 * kc + 1][3], T{});
            }
#pragma unroll
            for (int j = 0; j < kDh / 8; j += 2) {
                float part[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
                for (int kc = 0; kc < kBn / 16; ++kc) {
                    uint32_t bf[4];
                    ldmatrix_x4_trans(bf, sQ + (kc * 16 + (mat & 1) * 8 + mr) * kLdQ + j * 8 + (mat >> 1) * 8);
                    const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
                    eqsdpa_mma(part[0], da[kc], b0, T{});
                    eqsdpa_mma(part[1], da[kc], b1, T{});
                }
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int e = 0; e < 4; ++e) myK[(e >> 1) * 8 * kDh + (j + h) * 8 + (e & 1)] += part[h][e];
            }

            // dV += P^T dO, 16 queries per step.
#pragma unroll
            for (int kc = 0; kc < kBn / 16; ++kc) {
                const uint32_t pa[4] = {eqsdpa_pack(s[2 * kc][0], s[2 * kc][1], T{}),
                                        eqsdpa_pack(s[2 * kc][2], s[2 * kc][3], T{}),
                                        eqsdpa_pack(s[2 * kc + 1][0], s[2 * kc + 1][1], T{}),
                                        eqsdpa_pack(s[2 * kc + 1][2], s[2 * kc + 1][3], T{})};
#pragma unroll
                for (int j = 0; j < kDv / 8; j += 2) {
                    uint32_t bf[4];
                    ldmatrix_x4_trans(bf, sO + (kc * 16 + (mat & 1) * 8 + mr) * kLdV + j * 8 + (mat >> 1) * 8);
                    const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
                    eqsdpa_mma(accv[j], pa, b0, T{});
                    eqsdpa_mma(accv[j + 1], pa, b1, T{});
                }
            }

            if constexpr (kAtomicDq) {
                // dS (queries x keys, 16-bit) to shared memory, then dq += scale dS K: units of 16
                // queries x 16 columns, spread over the warps; K [key][d] is the B operand by
                // ldmatrix .trans.
#pragma unroll
                for (int j = 0; j < kNb; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        sdS[(j * 8 + 2 * tq + (e & 1)) * kLdS + warp * 16 + g + 8 * (e >> 1)] =
                            eqsdpa_round_bits(dp[j][e], T{});
                __syncthreads();
                for (int u = warp; u < (kBn / 16) * (kDh / 16); u += C::kWarps) {
                    const int rb = u / (kDh / 16), cb = u % (kDh / 16);
                    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
                    for (int kc = 0; kc < kBm / 16; ++kc) {
                        uint32_t af[4], bf[4];
                        ldmatrix_x4(af, sdS + (rb * 16 + (mat & 1) * 8 + mr) * kLdS + kc * 16 + (mat >> 1) * 8);
                        ldmatrix_x4_trans(bf, sK + (kc * 16 + (mat & 1) * 8 + mr) * kLdQ + cb * 16 + (mat >> 1) * 8);
                        const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
                        eqsdpa_mma(acc[0], af, b0, T{});
                        eqsdpa_mma(acc[1], af, b1, T{});
                    }
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = q0 + rb * 16 + g + 8 * (e >> 1);
                        if (row >= t) continue;
                        float* d = dq + (bh * t + row) * kDh + cb * 16 + 2 * tq + (e & 1);
                        atomicAdd(d, scale * acc[0][e]);
                        atomicAdd(d + 8, scale * acc[1][e]);
                    }
                }
            }
        }

        // dV and dK rows of this warp's keys (rows past T are not stored).
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = k0 + warp * 16 + g + 8 * h;
            if (row >= t) continue;
            float* vrow = dv + (bh * t + row) * kDv;
#pragma unroll
            for (int j = 0; j < kDv / 8; ++j) {
                vrow[j * 8 + 2 * tq] = accv[j][2 * h];
                vrow[j * 8 + 2 * tq + 1] = accv[j][2 * h + 1];
            }
            float* krow = dk + (bh * t + row) * kDh;
#pragma unroll
            for (int j = 0; j < kDh / 8; ++j) {
                krow[j * 8 + 2 * tq] = scale * myK[h * 8 * kDh + j * 8];
                krow[j * 8 + 2 * tq + 1] = scale * myK[h * 8 * kDh + j * 8 + 1];
            }
        }
    }
}

template <class T, class C>
__device__ __forceinline__ void eqsdpa_backward_dq_mma(const T* q_in, const T* k_in, const T* v_in, const T* do_in,
                                                       const unsigned char* __restrict__ mask,
                                                       const float* __restrict__ lse, const float* __restrict__ dsum,
                                                       float* __restrict__ dq, int bh_count, int t, int heads,
                                                       float scale) {
    constexpr int kDh = C::kDh, kDv = C::kDv, kBm = C::kBm, kBn = C::kBn, kThreads = C::kThreads;
    constexpr int kLdQ = C::kLdQ, kLdV = C::kLdV, kNb = C::kNb;
    static_assert(C::kDqElems * 2 + kBn * 4 <= 48 * 1024, "static shared memory above 48 KB");
    eqsdpa_require_threads(kThreads, "eqsdpa_backward_dq_mma");
    __shared__ __align__(16) uint16_t smem[C::kDqElems];
    __shared__ float sKeep[kBn];
    uint16_t* sQ = smem;
    uint16_t* sO = sQ + kBm * kLdQ;
    uint16_t* sK = sO + kBm * kLdV;
    uint16_t* sV = sK + kBn * kLdQ;
    const uint16_t* q = reinterpret_cast<const uint16_t*>(q_in);
    const uint16_t* k = reinterpret_cast<const uint16_t*>(k_in);
    const uint16_t* v = reinterpret_cast<const uint16_t*>(v_in);
    const uint16_t* dob = reinterpret_cast<const uint16_t*>(do_in);
    const bool vec = (reinterpret_cast<uintptr_t>(q) | reinterpret_cast<uintptr_t>(k) |
                      reinterpret_cast<uintptr_t>(v) | reinterpret_cast<uintptr_t>(dob)) %
                         16 ==
                     0;

    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, tq = lane % 4;
    const int mat = lane / 8, mr = lane % 8;
    const int nqt = (t + kBm - 1) / kBm;
    const long long tiles = static_cast<long long>(nqt) * bh_count;

    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const long long bh = tile / nqt;
        const int q0 = static_cast<int>(tile % nqt) * kBm;
        const uint16_t* kb = k + bh * t * kDh;
        const uint16_t* vb = v + bh * t * kDv;
        const unsigned char* mrow = mask == nullptr ? nullptr : mask + (bh / heads) * t;

        // Everyone is done with the previous tile's sQ and sO.
        __syncthreads();
        eqsdpa_stage_b16<kBm, kDh, kThreads>(sQ, q + bh * t * kDh, q0, t, vec);
        eqsdpa_stage_b16<kBm, kDv, kThreads>(sO, dob + bh * t * kDv, q0, t, vec);
        // This lane's query rows g and g + 8: lse (+inf past T: P = 0) and D.
        float row_lse[2], row_d[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = q0 + warp * 16 + g + 8 * h;
            row_lse[h] = row < t ? lse[bh * t + row] : INFINITY;
            row_d[h] = row < t ? dsum[bh * t + row] : 0.0f;
        }
        __syncthreads();
        uint32_t qf[kDh / 16][4];
#pragma unroll
        for (int ks = 0; ks < kDh / 16; ++ks)
            ldmatrix_x4(qf[ks], sQ + (warp * 16 + (mat & 1) * 8 + mr) * kLdQ + ks * 16 + (mat >> 1) * 8);

        float acc[kDh / 8][4];
#pragma unroll
        for (int j = 0; j < kDh / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;

        for (int k0 = 0; k0 < t; k0 += kBn) {
            // Everyone is done with the previous step's sK, sV and sKeep.
            __syncthreads();
            eqsdpa_stage_b16<kBn, kDh, kThreads>(sK, kb, k0, t, vec);
            eqsdpa_stage_b16<kBn, kDv, kThreads>(sV, vb, k0, t, vec);
            for (int i = tid; i < kBn; i += kThreads) sKeep[i] = eqsdpa_key_ok(mrow, k0 + i, t) ? 1.0f : 0.0f;
            __syncthreads();

            // S = Q K^T and dP = dO V^T, 16 queries x kBn keys per warp.
            float s[kNb][4], dp[kNb][4];
#pragma unroll
            for (int j = 0; j < kNb; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.0f;
#pragma unroll
            for (int ks = 0; ks < kDh / 16; ++ks)
#pragma unroll
                for (int j = 0; j < kNb; j += 2) {
                    uint32_t bf[4];
                    ldmatrix_x4(bf, sK + (j * 8 + (mat >> 1) * 8 + mr) * kLdQ + ks * 16 + (mat & 1) * 8);
                    const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
                    eqsdpa_mma(s[j], qf[ks], b0, T{});
                    eqsdpa_mma(s[j + 1], qf[ks], b1, T{});
                }
#pragma unroll 2
            for (int kc = 0; kc < kDv / 16; ++kc) {
                uint32_t af[4];
                ldmatrix_x4(af, sO + (warp * 16 + (mat & 1) * 8 + mr) * kLdV + kc * 16 + (mat >> 1) * 8);
#pragma unroll
                for (int j = 0; j < kNb; j += 2) {
                    uint32_t bf[4];
                    ldmatrix_x4(bf, sV + (j * 8 + (mat >> 1) * 8 + mr) * kLdV + kc * 16 + (mat & 1) * 8);
                    const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
                    eqsdpa_mma(dp[j], af, b0, T{});
                    eqsdpa_mma(dp[j + 1], af, b1, T{});
                }
            }

            // dS = P (dP - D), P = 0 for a masked key (a select: its scores never enter).
#pragma unroll
            for (int j = 0; j < kNb; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = sKeep[j * 8 + 2 * tq + (e & 1)] != 0.0f
                                        ? eqsdpa_exp_diff(s[j][e] * scale, row_lse[e >> 1])
                                        : 0.0f;
                    dp[j][e] = p * (dp[j][e] - row_d[e >> 1]);
                }

            // dQ += dS K, 16 keys per step.
#pragma unroll
            for (int kc = 0; kc < kBn / 16; ++kc) {
                const uint32_t da[4] = {eqsdpa_pack(dp[2 * kc][0], dp[2 * kc][1], T{}),
                                        eqsdpa_pack(dp[2 * kc][2], dp[2 * kc][3], T{}),
                                        eqsdpa_pack(dp[2 * kc + 1][0], dp[2 * kc + 1][1], T{}),
                                        eqsdpa_pack(dp[2 * kc + 1][2], dp[2 * kc + 1][3], T{})};
#pragma unroll
                for (int j = 0; j < kDh / 8; j += 2) {
                    uint32_t bf[4];
                    ldmatrix_x4_trans(bf, sK + (kc * 16 + (mat & 1) * 8 + mr) * kLdQ + j * 8 + (mat >> 1) * 8);
                    const uint32_t b0[2] = {bf[0], bf[1]}, b1[2] = {bf[2], bf[3]};
                    eqsdpa_mma(acc[j], da, b0, T{});
                    eqsdpa_mma(acc[j + 1], da, b1, T{});
                }
            }
        }

#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = q0 + warp * 16 + g + 8 * h;
            if (row >= t) continue;
            float* qrow = dq + (bh * t + row) * kDh;
#pragma unroll
            for (int j = 0; j < kDh / 8; ++j) {
                qrow[j * 8 + 2 * tq] = scale * acc[j][2 * h];
                qrow[j * 8 + 2 * tq + 1] = scale * acc[j][2 * h + 1];
            }
        }
    }
}

#define HIERMD_EQSDPA_BACKWARD_PREP(type, name)                                                                    \
    extern "C" __global__ void __launch_bounds__(128)                                                              \
        eqsdpa_backward_prep_##name(const float* __restrict__ dout, const float* __restrict__ out,                 \
                                    type* __restrict__ dout_h, float* __restrict__ dsum, long long rows, int dv) { \
        eqsdpa_backward_prep<type>(dout, out, dout_h, dsum, rows, dv);                                             \
    }

#define HIERMD_EQSDPA_BACKWARD_MMA(type, name, dh)                                                                 \
    extern "C" __global__ void __launch_bounds__(EqsdpaMmaDkv##dh::kThreads, 1) eqsdpa_backward_dkdv_##name##_dh##dh( \
        const type* __restrict__ q, const type* __restrict__ k, const type* __restrict__ v,                        \
        const type* __restrict__ dout_h, const unsigned char* __restrict__ mask, const float* __restrict__ lse,     \
        const float* __restrict__ dsum, float* __restrict__ dk, float* __restrict__ dv, int bh_count, int t,        \
        int heads, float scale) {                                                                                  \
        eqsdpa_backward_dkdv_mma<type, EqsdpaMmaDkv##dh, false>(q, k, v, dout_h, mask, lse, dsum, nullptr, dk, dv,  \
                                                                bh_count, t, heads, scale);                        \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(EqsdpaMmaDkv##dh::kThreads, 1)                                    \
        eqsdpa_backward_atomic_##name##_dh##dh(                                                                    \
            const type* __restrict__ q, const type* __restrict__ k, const type* __restrict__ v,                    \
            const type* __restrict__ dout_h, const unsigned char* __restrict__ mask, const float* __restrict__ lse, \
            const float* __restrict__ dsum, float* __restrict__ dq, float* __restrict__ dk, float* __restrict__ dv, \
            int bh_count, int t, int heads, float scale) {                                                         \
        eqsdpa_backward_dkdv_mma<type, EqsdpaMmaDkv##dh, true>(q, k, v, dout_h, mask, lse, dsum, dq, dk, dv,        \
                                                               bh_count, t, heads, scale);                         \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(EqsdpaMmaDq##dh::kThreads, 1) eqsdpa_backward_dq_##name##_dh##dh(  \
        const type* __restrict__ q, const type* __restrict__ k, const type* __restrict__ v,                        \
        const type* __restrict__ dout_h, const unsigned char* __restrict__ mask, const float* __restrict__ lse,     \
        const float* __restrict__ dsum, float* __restrict__ dq, int bh_count, int t, int heads, float scale) {      \
        eqsdpa_backward_dq_mma<type, EqsdpaMmaDq##dh>(q, k, v, dout_h, mask, lse, dsum, dq, bh_count, t, heads,     \
                                                      scale);                                                      \
    }

/// dout rounded to bf16 / f16 and D = rowsum(rounded dout * out), the half backward's first step.
HIERMD_EQSDPA_BACKWARD_PREP(__nv_bfloat16, bf16)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_prep_bf16)
HIERMD_EQSDPA_BACKWARD_PREP(__half, f16)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_prep_f16)

/// bf16 backward: dk and dvalues (assigned; the atomic variant also adds into dq), dq (assigned).
HIERMD_EQSDPA_BACKWARD_MMA(__nv_bfloat16, bf16, 16)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dkdv_bf16_dh16)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_atomic_bf16_dh16)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dq_bf16_dh16)
HIERMD_EQSDPA_BACKWARD_MMA(__nv_bfloat16, bf16, 32)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dkdv_bf16_dh32)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_atomic_bf16_dh32)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dq_bf16_dh32)
HIERMD_EQSDPA_BACKWARD_MMA(__nv_bfloat16, bf16, 64)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dkdv_bf16_dh64)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_atomic_bf16_dh64)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dq_bf16_dh64)
/// f16 backward: as the bf16 one.
HIERMD_EQSDPA_BACKWARD_MMA(__half, f16, 16)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dkdv_f16_dh16)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_atomic_f16_dh16)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dq_f16_dh16)
HIERMD_EQSDPA_BACKWARD_MMA(__half, f16, 32)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dkdv_f16_dh32)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_atomic_f16_dh32)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dq_f16_dh32)
HIERMD_EQSDPA_BACKWARD_MMA(__half, f16, 64)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dkdv_f16_dh64)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_atomic_f16_dh64)
HIERMD_EXPORT_KERNEL(eqsdpa_backward_dq_f16_dh64)
