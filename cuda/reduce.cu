// Row reductions over a row-major [rows, cols] matrix, forward and backward. CPU twins:
// src/ops/reduce.rs.
//
// One block per row (grid-stride over rows). Each thread sums a strided slice of the row, warps
// reduce with shuffles, and warp leaders meet in shared memory. The order of additions is fixed
// by (blockDim, cols), so results are deterministic for a given launch shape.
#include "common/hiermd.cuh"

constexpr int kReduceThreads = 256;

__device__ __forceinline__ float block_sum(float v, float* warp_partials) {
    v = warp_sum(v);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (lane == 0) warp_partials[warp] = v;
    __syncthreads();
    float total = 0.0f;
    if (warp == 0) {
        total = lane < nwarps ? warp_partials[lane] : 0.0f;
        total = warp_sum(total);
    }
    // The partials are reused by the next row: nobody may overwrite them before warp 0 has read.
    __syncthreads();
    return total;
}

/// out[r] = scale * sum_c x[r, c]  (scale = 1 for a sum, 1/cols for a mean)
extern "C" __global__ void __launch_bounds__(kReduceThreads)
row_sum_forward(const float* __restrict__ x, float* __restrict__ out, int rows, int cols, float scale) {
    __shared__ float partials[kReduceThreads / 32];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* row = x + (long long)r * cols;
        float acc = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) acc += row[c];
        float total = block_sum(acc, partials);
        if (threadIdx.x == 0) out[r] = scale * total;
    }
}
HIERMD_EXPORT_KERNEL(row_sum_forward)

/// dx[r, c] = scale * dout[r]: the sum's gradient broadcasts along the row. Assigns dx.
extern "C" __global__ void row_sum_backward(const float* __restrict__ dout, float* __restrict__ dx, int rows, int cols,
                                            float scale) {
    const long long n = (long long)rows * cols;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dx[i] = scale * dout[i / cols];
}
HIERMD_EXPORT_KERNEL(row_sum_backward)
