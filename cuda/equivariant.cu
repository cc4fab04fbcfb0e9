// Rotation-equivariant building blocks on separate scalar and vector features, forward and
// backward. CPU twins: src/ops/equivariant.rs.
//
// Layouts (row-major, N rows = batch * tokens):
//   scalars s [N, H]; vectors v [N, 3, H]: v[n, c, h] at (n * 3 + c) * H + h, c = x, y, z.
// Vector channels are only ever scaled by invariants (norms, gates, layer-norm factors), never
// mixed across xyz, so every vector output rotates with its vector inputs.
//
// Determinism: no atomics. The row kernels give each row to one warp, which reduces it with
// shuffles in an order fixed by H. The layer norm's parameter gradients are summed over rows in
// two fixed-order stages (per block into a partials buffer, then over blocks), so they are
// bitwise reproducible for a given (N, H).
#include "common/hiermd.cuh"

/// Threads per block of the row kernels (one row per warp). Must match EQ_THREADS in
/// src/ops/equivariant.rs, which also sizes the backward's shared memory from it.
constexpr int kEqThreads = 256;
constexpr int kEqWarps = kEqThreads / 32;

/// Block of eq_layernorm_param_reduce: 32 columns x 16 row groups. Must match REDUCE_BLOCK in
/// src/ops/equivariant.rs.
constexpr int kReduceCols = 32;
constexpr int kReduceGroups = 16;

// ---------------------------------------------------------------------------------------------
// Equivariant layer norm.

/// a * b rounded, never fused into an fma with a later add. The backward subtracts the row mean
/// of gamma_s * ds_out from each product; if nvcc fused one product into that subtraction it
/// would no longer cancel exactly against the rounded products in the mean (with H = 1, ds would
/// be rstd_s ~ 1/sqrt(eps) times a rounding error instead of 0). The host compiler does not fuse
/// (-std=c++20 turns fp contraction off).
__device__ __forceinline__ float eq_mul_rn(float a, float b) {
#ifdef HIERMD_EMU
    return a * b;
#else
    return __fmul_rn(a, b);
#endif
}

/// Per row n (one warp):
///   s_out = gamma_s * (s - mean) * rstd_s + beta_s,  rstd_s = 1 / sqrt(var(s) + eps)  (biased var)
///   v_out[c, h] = gamma_v[h] * v[c, h] * rstd_v,     rstd_v = 1 / sqrt(mean_h |v_h|^2 + eps)
/// rstd_v is one factor per row (the mean over channels of the squared vector norms), so v_out
/// rotates with v. stats[n] = (mean, rstd_s, rstd_v) for the backward.
extern "C" __global__ void __launch_bounds__(kEqThreads)
    eq_layernorm_forward(const float* __restrict__ s, const float* __restrict__ v,
                         const float* __restrict__ gamma_s, const float* __restrict__ beta_s,
                         const float* __restrict__ gamma_v, float eps, float* __restrict__ s_out,
                         float* __restrict__ v_out, float* __restrict__ stats, int n, int h) {
    const int lane = threadIdx.x % 32;
    const long long warps_total = (long long)gridDim.x * kEqWarps;
    const float inv_h = 1.0f / (float)h;
    // The row index is the same for all lanes of a warp, so the shuffles see full warps.
    for (long long r = (long long)blockIdx.x * kEqWarps + threadIdx.x / 32; r < n; r += warps_total) {
        const float* sr = s + r * h;
        const float* vr = v + r * 3 * h;
        float sum = 0.0f;
        for (int j = lane; j < h; j += 32) sum += sr[j];
        const float mean = warp_sum(sum) * inv_h;
        // Two-pass variance: no cancellation when |mean| >> std.
        float sq = 0.0f, vsq = 0.0f;
        for (int j = lane; j < h; j += 32) {
            const float d = sr[j] - mean;
            const float x = vr[j], y = vr[h + j], z = vr[2 * h + j];
            sq += d * d;
            vsq += x * x + y * y + z * z;
        }
        const float rstd = rsqrtf(warp_sum(sq) * inv_h + eps);
        const float rstd_v = rsqrtf(warp_sum(vsq) * inv_h + eps);
        float* so = s_out + r * h;
        float* vo = v_out + r * 3 * h;
        for (int j = lane; j < h; j += 32) {
            so[j] = gamma_s[j] * ((sr[j] - mean) * rstd) + beta_s[j];
            const float f = gamma_v[j] * rstd_v;
            vo[j] = f * vr[j];
            vo[h + j] = f * vr[h + j];
            vo[2 * h + j] = f * vr[2 * h + j];
        }
        if (lane == 0) {
            stats[3 * r] = mean;
            stats[3 * r + 1] = rstd;
            stats[3 * r + 2] = rstd_v;
        }
    }
}
HIERMD_EXPORT_KERNEL(eq_layernorm_forward)

/// Backward of eq_layernorm_forward. Per row (one warp), with xhat = (s - mean) rstd_s,
/// vhat = v rstd_v, gs = gamma_s ds_out, gv = gamma_v dv_out:
///   ds = rstd_s (gs - mean_h(gs) - xhat mean_h(gs xhat))                 (assigned)
///   dv = rstd_v (gv - vhat (1/H) sum_{c,h} gv vhat)                      (assigned)
/// Block b owns rows [b rows_per_block, (b+1) rows_per_block) and writes its column sums of
///   ds_out xhat, ds_out, sum_c dv_out vhat
/// to partials[b, 0:3H] (dgamma_s, dbeta_s, dgamma_v pieces): each warp accumulates its rows into
/// its own slice of shared memory (H columns x 3, lanes own disjoint columns), then the slices are
/// added in warp order. eq_layernorm_param_reduce adds the partials over blocks.
/// Dynamic shared memory: kEqWarps * 3 * h floats. The grid is exactly ceil(n / rows_per_block).
extern "C" __global__ void __launch_bounds__(kEqThreads)
    eq_layernorm_backward(const float* __restrict__ s, const float* __restrict__ v,
                          const float* __restrict__ gamma_s, const float* __restrict__ gamma_v,
                          const float* __restrict__ stats, const float* __restrict__ ds_out,
                          const float* __restrict__ dv_out, float* __restrict__ ds, float* __restrict__ dv,
                          float* __restrict__ partials, int n, int h, int rows_per_block) {
    HIERMD_DYNAMIC_SHARED(float, acc);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float* mine = acc + (long long)warp * 3 * h;
    for (int j = lane; j < h; j += 32) mine[j] = mine[h + j] = mine[2 * h + j] = 0.0f;
    const float inv_h = 1.0f / (float)h;
    const long long r0 = (long long)blockIdx.x * rows_per_block;
    const long long r1 = min(r0 + rows_per_block, (long long)n);
    for (long long r = r0 + warp; r < r1; r += kEqWarps) {
        const float mean = stats[3 * r], rstd = stats[3 * r + 1], rstd_v = stats[3 * r + 2];
        const float* sr = s + r * h;
        const float* vr = v + r * 3 * h;
        const float* dsr = ds_out + r * h;
        const float* dvr = dv_out + r * 3 * h;
        float sum_g = 0.0f, sum_gx = 0.0f, sum_vv = 0.0f;
        for (int j = lane; j < h; j += 32) {
            const float xhat = (sr[j] - mean) * rstd;
            const float dy = dsr[j];
            const float g = eq_mul_rn(dy, gamma_s[j]);
            sum_g += g;
            sum_gx += g * xhat;
            mine[j] += dy * xhat;
            mine[h + j] += dy;
            float pv = 0.0f;
#pragma unroll
            for (int c = 0; c < 3; ++c) pv += dvr[c * h + j] * (vr[c * h + j] * rstd_v);
            sum_vv += gamma_v[j] * pv;
            mine[2 * h + j] += pv;
        }
        const float mean_g = warp_sum(sum_g) * inv_h;
        const float mean_gx = warp_sum(sum_gx) * inv_h;
        const float mean_vv = warp_sum(sum_vv) * inv_h;
        float* dsw = ds + r * h;
        float* dvw = dv + r * 3 * h;
        for (int j = lane; j < h; j += 32) {
            const float xhat = (sr[j] - mean) * rstd;
            dsw[j] = rstd * (eq_mul_rn(dsr[j], gamma_s[j]) - mean_g - xhat * mean_gx);
            const float gam = gamma_v[j];
#pragma unroll
            for (int c = 0; c < 3; ++c) {
                const float vhat = vr[c * h + j] * rstd_v;
                dvw[c * h + j] = rstd_v * (gam * dvr[c * h + j] - vhat * mean_vv);
            }
        }
    }
    // Every warp's slice is complete before any thread adds across warps.
    __syncthreads();
    float* out = partials + (long long)blockIdx.x * 3 * h;
    for (int j = threadIdx.x; j < 3 * h; j += blockDim.x) {
        float t = 0.0f;
#pragma unroll
        for (int w = 0; w < kEqWarps; ++w) t += acc[w * 3 * h + j];
        out[j] = t;
    }
}
HIERMD_EXPORT_KERNEL(eq_layernorm_backward)

/// Adds the per-block partials [nparts, 3h] of eq_layernorm_backward over blocks and accumulates
/// them into the parameter gradients (+=): columns [0, h) -> dgamma_s, [h, 2h) -> dbeta_s,
/// [2h, 3h) -> dgamma_v. Block: kReduceCols columns x kReduceGroups groups; group y adds parts
/// y, y + kReduceGroups, ... and the groups are added in order, so the sum is fixed by nparts.
extern "C" __global__ void __launch_bounds__(kReduceCols * kReduceGroups)
    eq_layernorm_param_reduce(const float* __restrict__ partials, int nparts, int h, float* __restrict__ dgamma_s,
                              float* __restrict__ dbeta_s, float* __restrict__ dgamma_v) {
    __shared__ float tile[kReduceGroups][kReduceCols];
    const int cols = 3 * h;
    const int j = blockIdx.x * kReduceCols + threadIdx.x;
    float t = 0.0f;
    if (j < cols)
        for (int b = threadIdx.y; b < nparts; b += kReduceGroups) t += partials[(long long)b * cols + j];
    tile[threadIdx.y][threadIdx.x] = t;
    __syncthreads();
    if (threadIdx.y == 0 && j < cols) {
        float total = 0.0f;
#pragma unroll
        for (int g = 0; g < kReduceGroups; ++g) total += tile[g][threadIdx.x];
        if (j < h)
            dgamma_s[j] += total;
        else if (j < 2 * h)
            dbeta_s[j - h] += total;
        else
            dgamma_v[j - 2 * h] += total;
    }
}
HIERMD_EXPORT_KERNEL(eq_layernorm_param_reduce)

// ---------------------------------------------------------------------------------------------
// Elementwise equivariant ops. Grid-stride loops: any grid covers any size.

#define EQ_GRID_STRIDE(i, count)                                                                    \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (count);               \
         i += (long long)gridDim.x * blockDim.x)

/// y[n, c, h] = g[n, h] * u[n, c, h] for c < nc (nc = 3: a gated vector; nc = 1: an elementwise
/// product of two [N, H] tensors).
extern "C" __global__ void vector_gate_forward(const float* __restrict__ g, const float* __restrict__ u,
                                               float* __restrict__ y, long long rows, int nc, int h) {
    const long long per_row = (long long)nc * h;
    EQ_GRID_STRIDE(i, rows * per_row) {
        const long long n = i / per_row;
        y[i] = g[n * h + i % h] * u[i];
    }
}
HIERMD_EXPORT_KERNEL(vector_gate_forward)

/// dg[n, h] = sum_c u[n, c, h] dy[n, c, h] and du = g dy, both assigned; either may be null
/// (not wanted). One thread per (n, h).
extern "C" __global__ void vector_gate_backward(const float* __restrict__ g, const float* __restrict__ u,
                                                const float* __restrict__ dy, float* __restrict__ dg,
                                                float* __restrict__ du, long long rows, int nc, int h) {
    EQ_GRID_STRIDE(i, rows * h) {
        const long long n = i / h, base = n * nc * h + i % h;
        const float gi = g[i];
        float acc = 0.0f;
        for (int c = 0; c < nc; ++c) {
            const float d = dy[base + (long long)c * h];
            acc += u[base + (long long)c * h] * d;
            if (du) du[base + (long long)c * h] = gi * d;
        }
        if (dg) dg[i] = acc;
    }
}
HIERMD_EXPORT_KERNEL(vector_gate_backward)

/// out[n, h] = sqrt(|v[n, :, h]|^2 + eps): eps keeps the gradient finite at v = 0.
extern "C" __global__ void vector_norm_forward(const float* __restrict__ v, float* __restrict__ out, float eps,
                                               long long rows, int h) {
    EQ_GRID_STRIDE(i, rows * h) {
        const float* p = v + (i / h) * 3 * h + i % h;
        const float x = p[0], y = p[h], z = p[2 * h];
        out[i] = sqrtf(x * x + y * y + z * z + eps);
    }
}
HIERMD_EXPORT_KERNEL(vector_norm_forward)

/// dv[n, c, h] = dout[n, h] v[n, c, h] / out[n, h], from the forward output. Assigns dv.
extern "C" __global__ void vector_norm_backward(const float* __restrict__ v, const float* __restrict__ out,
                                                const float* __restrict__ dout, float* __restrict__ dv,
                                                long long rows, int h) {
    EQ_GRID_STRIDE(i, rows * h) {
        const long long base = (i / h) * 3 * h + i % h;
        const float f = dout[i] / out[i];
#pragma unroll
        for (int c = 0; c < 3; ++c) dv[base + c * h] = f * v[base + c * h];
    }
}
HIERMD_EXPORT_KERNEL(vector_norm_backward)

// The dot product reads a at a_base + a_off and b at b_base + b_off, each [rows, 3, stride] with
// h used columns: separate tensors (stride = h, offsets 0) or the two column halves of one
// [rows, 3, 2h] projection (stride = 2h, b_off = h). a and b may then be one buffer: no
// __restrict__ on them (nor on da, db, which are then disjoint halves of one buffer).

/// out[n, h] = sum_c a[n, c, h] b[n, c, h].
extern "C" __global__ void vector_dot_forward(const float* a_base, const float* b_base, float* __restrict__ out,
                                              long long a_off, long long b_off, long long rows, int h, int stride) {
    const float* a = a_base + a_off;
    const float* b = b_base + b_off;
    EQ_GRID_STRIDE(i, rows * h) {
        const long long base = (i / h) * 3 * stride + i % h;
        out[i] = a[base] * b[base] + a[base + stride] * b[base + stride] +
                 a[base + 2 * stride] * b[base + 2 * stride];
    }
}
HIERMD_EXPORT_KERNEL(vector_dot_forward)

/// da = dout b, db = dout a (assigned), in the layout of vector_dot_forward.
extern "C" __global__ void vector_dot_backward(const float* a_base, const float* b_base,
                                               const float* __restrict__ dout, float* da_base, float* db_base,
                                               long long a_off, long long b_off, long long rows, int h, int stride) {
    const float* a = a_base + a_off;
    const float* b = b_base + b_off;
    float* da = da_base + a_off;
    float* db = db_base + b_off;
    EQ_GRID_STRIDE(i, rows * h) {
        const long long base = (i / h) * 3 * stride + i % h;
        const float d = dout[i];
#pragma unroll
        for (int c = 0; c < 3; ++c) {
            const long long k = base + (long long)c * stride;
            const float ak = a[k], bk = b[k];
            da[k] = d * bk;
            db[k] = d * ak;
        }
    }
}
HIERMD_EXPORT_KERNEL(vector_dot_backward)

/// out[n, h] = vdot[n, h] o[n, h] + vnorm[n, h] o[n, H + h] + o[n, 2H + h], o [N, 3H].
extern "C" __global__ void eq_scalar_combine_forward(const float* __restrict__ vdot, const float* __restrict__ vnorm,
                                                     const float* __restrict__ o, float* __restrict__ out,
                                                     long long rows, int h) {
    EQ_GRID_STRIDE(i, rows * h) {
        const float* op = o + (i / h) * 3 * h + i % h;
        out[i] = vdot[i] * op[0] + vnorm[i] * op[h] + op[2 * h];
    }
}
HIERMD_EXPORT_KERNEL(eq_scalar_combine_forward)

/// dvdot = dout o[:, :H], dvnorm = dout o[:, H:2H], do = (dout vdot, dout vnorm, dout), all
/// assigned.
extern "C" __global__ void eq_scalar_combine_backward(const float* __restrict__ vdot,
                                                      const float* __restrict__ vnorm, const float* __restrict__ o,
                                                      const float* __restrict__ dout, float* __restrict__ dvdot,
                                                      float* __restrict__ dvnorm, float* __restrict__ do_,
                                                      long long rows, int h) {
    EQ_GRID_STRIDE(i, rows * h) {
        const long long base = (i / h) * 3 * h + i % h;
        const float d = dout[i];
        dvdot[i] = d * o[base];
        dvnorm[i] = d * o[base + h];
        do_[base] = d * vdot[i];
        do_[base + h] = d * vnorm[i];
        do_[base + 2 * h] = d;
    }
}
HIERMD_EXPORT_KERNEL(eq_scalar_combine_backward)

/// out[n, :] = (a[n, :], b[n, :]): a [rows, ha], b [rows, hb], out [rows, ha + hb].
extern "C" __global__ void concat_columns(const float* __restrict__ a, const float* __restrict__ b,
                                          float* __restrict__ out, long long rows, int ha, int hb) {
    const int w = ha + hb;
    EQ_GRID_STRIDE(i, rows * w) {
        const long long n = i / w;
        const int j = (int)(i % w);
        out[i] = j < ha ? a[n * ha + j] : b[n * hb + (j - ha)];
    }
}
HIERMD_EXPORT_KERNEL(concat_columns)

/// The inverse of concat_columns (and its backward): da = dout[:, :ha], db = dout[:, ha:], assigned.
extern "C" __global__ void split_columns(const float* __restrict__ dout, float* __restrict__ da,
                                         float* __restrict__ db, long long rows, int ha, int hb) {
    const int w = ha + hb;
    EQ_GRID_STRIDE(i, rows * w) {
        const long long n = i / w;
        const int j = (int)(i % w);
        if (j < ha)
            da[n * ha + j] = dout[i];
        else
            db[n * hb + (j - ha)] = dout[i];
    }
}
HIERMD_EXPORT_KERNEL(split_columns)
