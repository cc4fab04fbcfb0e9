// Row-wise softmax and log-softmax over a row-major [rows, cols] matrix, forward and backward. CPU
// twins: src/ops/softmax.rs.
//
// One block per row (grid-stride over rows); the launcher sizes the block to the row (32 to 256
// threads, a multiple of 32). Each thread walks a strided slice of the row keeping an online
// (max, sum of exp) pair, so the row is read twice (statistics, then output) and never staged in
// shared memory: any number of columns works. Warps combine pairs with shuffles, warp leaders
// meet in shared memory, and every thread then folds the per-warp partials in the same fixed
// order, so all threads hold bit-identical row statistics and results are deterministic for a
// given launch shape.
//
// Helper names carry a softmax_ prefix: on emu every .cu file is linked into one library, where
// two inline functions of the same name would silently be merged.
#include "common/hiermd.cuh"

constexpr int kSoftmaxThreads = 256;
constexpr int kSoftmaxWarps = kSoftmaxThreads / 32;

/// Running maximum m and sum s of exp(v - m) over the values seen so far. m = -inf, s = 0 is the
/// empty set.
struct SoftmaxStat {
    float m, s;
};

/// Adds the value v. A -inf value adds nothing (its exp is 0); NaN propagates into s.
__device__ __forceinline__ void softmax_stat_push(SoftmaxStat& st, float v) {
    if (v > st.m) {
        // st.s * exp(-inf) is 0 * 0 for the empty set.
        st.s = st.s * expf(st.m - v) + 1.0f;
        st.m = v;
    } else if (v != -INFINITY) {
        st.s += expf(v - st.m);
    }
}

/// Merges two statistics. Guards the empty case: exp(-inf - -inf) would be NaN.
__device__ __forceinline__ SoftmaxStat softmax_stat_merge(SoftmaxStat a, SoftmaxStat b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return SoftmaxStat{m, 0.0f};
    return SoftmaxStat{m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

/// Row statistics of the block, returned to every thread (bit-identical in all of them).
__device__ __forceinline__ SoftmaxStat softmax_block_stat(SoftmaxStat st, float* pm, float* ps) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        SoftmaxStat o;
        o.m = __shfl_xor_sync(HIERMD_FULL_MASK, st.m, offset);
        o.s = __shfl_xor_sync(HIERMD_FULL_MASK, st.s, offset);
        st = softmax_stat_merge(st, o);
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (lane == 0) {
        pm[warp] = st.m;
        ps[warp] = st.s;
    }
    __syncthreads();
    SoftmaxStat total{pm[0], ps[0]};
    for (int w = 1; w < nwarps; ++w) total = softmax_stat_merge(total, SoftmaxStat{pm[w], ps[w]});
    // The partials are reused by the next row: nobody may overwrite them before all have read.
    __syncthreads();
    return total;
}

/// Sum over the block, returned to every thread (bit-identical in all of them).
__device__ __forceinline__ float softmax_block_sum(float v, float* partials) {
    v = warp_sum(v);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (lane == 0) partials[warp] = v;
    __syncthreads();
    float total = partials[0];
    for (int w = 1; w < nwarps; ++w) total += partials[w];
    __syncthreads();
    return total;
}

/// y[r, c] = exp(scale x[r, c] - m) / sum over the unmasked columns, with m the row's maximum.
/// Column c of row r is masked where key_mask[(r / rows_per_mask) * cols + c] == 0 (key_mask may
/// be null: nothing masked); masked entries get exactly 0, and a row with nothing left gives all
/// zeros.
extern "C" __global__ void __launch_bounds__(kSoftmaxThreads)
softmax_forward(const float* __restrict__ x, float* __restrict__ y, const unsigned char* __restrict__ key_mask,
                int rows, int cols, float scale, int rows_per_mask) {
    __shared__ float pm[kSoftmaxWarps], ps[kSoftmaxWarps];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + (long long)r * cols;
        float* yr = y + (long long)r * cols;
        const unsigned char* mr = key_mask ? key_mask + (long long)(r / rows_per_mask) * cols : nullptr;
        SoftmaxStat st{-INFINITY, 0.0f};
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            if (!mr || mr[c]) softmax_stat_push(st, scale * xr[c]);
        const SoftmaxStat row = softmax_block_stat(st, pm, ps);
        // m = -inf: every column masked (or -inf); the row is all zeros rather than 0/0.
        const bool empty = row.m == -INFINITY;
        const float inv = empty ? 0.0f : 1.0f / row.s;
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            yr[c] = (empty || (mr && !mr[c])) ? 0.0f : expf(scale * xr[c] - row.m) * inv;
    }
}
HIERMD_EXPORT_KERNEL(softmax_forward)

/// dx = scale * y * (dy - sum_c dy y), from the forward output y. Masked entries have y = 0 and
/// get 0. Assigns dx (activation gradient).
extern "C" __global__ void __launch_bounds__(kSoftmaxThreads)
softmax_backward(const float* __restrict__ y, const float* __restrict__ dy, float* __restrict__ dx, int rows,
                 int cols, float scale) {
    __shared__ float partials[kSoftmaxWarps];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long o = (long long)r * cols;
        float acc = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) acc += dy[o + c] * y[o + c];
        const float dot = softmax_block_sum(acc, partials);
        for (int c = threadIdx.x; c < cols; c += blockDim.x) dx[o + c] = scale * y[o + c] * (dy[o + c] - dot);
    }
}
HIERMD_EXPORT_KERNEL(softmax_backward)

/// y[r, c] = x[r, c] - m - log(sum_c exp(x[r, c] - m)), m the row's maximum.
extern "C" __global__ void __launch_bounds__(kSoftmaxThreads)
log_softmax_forward(const float* __restrict__ x, float* __restrict__ y, int rows, int cols) {
    __shared__ float pm[kSoftmaxWarps], ps[kSoftmaxWarps];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long o = (long long)r * cols;
        SoftmaxStat st{-INFINITY, 0.0f};
        for (int c = threadIdx.x; c < cols; c += blockDim.x) softmax_stat_push(st, x[o + c]);
        const SoftmaxStat row = softmax_block_stat(st, pm, ps);
        const float log_s = logf(row.s);
        for (int c = threadIdx.x; c < cols; c += blockDim.x) y[o + c] = (x[o + c] - row.m) - log_s;
    }
}
HIERMD_EXPORT_KERNEL(log_softmax_forward)

/// dx = dy - exp(y) * sum_c dy, from the forward output y. Assigns dx (activation gradient).
extern "C" __global__ void __launch_bounds__(kSoftmaxThreads)
log_softmax_backward(const float* __restrict__ y, const float* __restrict__ dy, float* __restrict__ dx, int rows,
                     int cols) {
    __shared__ float partials[kSoftmaxWarps];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const long long o = (long long)r * cols;
        float acc = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) acc += dy[o + c];
        const float total = softmax_block_sum(acc, partials);
        for (int c = threadIdx.x; c < cols; c += blockDim.x) dx[o + c] = dy[o + c] - expf(y[o + c]) * total;
    }
}
HIERMD_EXPORT_KERNEL(log_softmax_backward)
