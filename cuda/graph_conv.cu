// Residue graph convolution pieces: radial edge features and the neighbour aggregation over a
// CSR residue graph, forward and backward. CPU twins and the graph build: src/ops/graph_conv.rs.
//
// The aggregation is a gather: one thread per (row, feature h) walks its CSR row in order and
// keeps the 1 or 3 vector components in registers, so there are no atomics and the order of
// additions is fixed by the graph alone (deterministic for any launch shape). Threads of a warp
// take consecutive h of the same row, so every read of x, dout and gate is coalesced and the
// row_ptr/col reads are warp broadcasts. The transposed gather of the backward pass walks the
// same rows and finds the gate of the mirror edge through `reverse` (the graph is symmetric).
// Grid-stride loops: any grid covers any size.
#include "common/hiermd.cuh"

/// Largest number of vector components per feature: 1 for scalars s [N, H], 3 for vectors
/// v [N, 3, H].
constexpr int kMaxChannels = 3;

/// out[e, k] = exp(-gamma (d_e - k spacing)^2) * 0.5 (cos(pi d_e / cutoff) + 1), zero from the
/// cutoff on. No backward: distances are data, not parameters.
extern "C" __global__ void edge_rbf_forward(const float* __restrict__ dist, float* __restrict__ out, long long edges,
                                            int centres, float cutoff, float spacing, float gamma) {
    const long long n = edges * centres;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const long long e = i / centres;
        const int k = (int)(i - e * centres);
        const float d = dist[e];
        const float envelope = d < cutoff ? 0.5f * (cosf(3.14159265358979f * (d / cutoff)) + 1.0f) : 0.0f;
        const float r = d - (float)k * spacing;
        out[i] = expf(-gamma * r * r) * envelope;
    }
}
HIERMD_EXPORT_KERNEL(edge_rbf_forward)

/// out[i, c, h] = sum over the edges e of row i, in order, of gate[e, h] * x[col[e], c, h]
/// (gate = 1 when the pointer is null). Rows without edges get 0. The same gate multiplies every
/// component c, so for 3 components the map is rotation equivariant.
extern "C" __global__ void graph_aggregate_forward(const int* __restrict__ row_ptr, const int* __restrict__ col,
                                                   const float* __restrict__ x, const float* __restrict__ gate,
                                                   float* __restrict__ out, int rows, int channels, int hidden) {
    const long long n = (long long)rows * hidden;
    const long long row_stride = (long long)channels * hidden;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const int i = (int)(idx / hidden);
        const int h = (int)(idx - (long long)i * hidden);
        float acc[kMaxChannels] = {0.0f, 0.0f, 0.0f};
        const int end = row_ptr[i + 1];
        for (int e = row_ptr[i]; e < end; ++e) {
            const float g = gate != nullptr ? gate[(long long)e * hidden + h] : 1.0f;
            const float* xj = x + (long long)col[e] * row_stride + h;
#pragma unroll
            for (int c = 0; c < kMaxChannels; ++c)
                if (c < channels) acc[c] += g * xj[(long long)c * hidden];
        }
        float* o = out + (long long)i * row_stride + h;
#pragma unroll
        for (int c = 0; c < kMaxChannels; ++c)
            if (c < channels) o[(long long)c * hidden] = acc[c];
    }
}
HIERMD_EXPORT_KERNEL(graph_aggregate_forward)

/// Backward of graph_aggregate_forward, both outputs optional (null pointers are skipped):
///   dx[j, c, h]  = sum over the edges e of row j of gate[reverse[e], h] * dout[col[e], c, h]
///   dgate[e, h]  = sum_c dout[i, c, h] * x[col[e], c, h]   for the edges e of row i
/// One thread per (row, h) serves both, since both walk the same row. Assigns dx and dgate
/// (activation gradients).
extern "C" __global__ void graph_aggregate_backward(const int* __restrict__ row_ptr, const int* __restrict__ col,
                                                    const int* __restrict__ reverse, const float* __restrict__ x,
                                                    const float* __restrict__ gate, const float* __restrict__ dout,
                                                    float* __restrict__ dx, float* __restrict__ dgate, int rows,
                                                    int channels, int hidden) {
    const long long n = (long long)rows * hidden;
    const long long row_stride = (long long)channels * hidden;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const int j = (int)(idx / hidden);
        const int h = (int)(idx - (long long)j * hidden);
        // This row's own upstream gradient, for dgate.
        float dj[kMaxChannels] = {0.0f, 0.0f, 0.0f};
        if (dgate != nullptr) {
            const float* d = dout + (long long)j * row_stride + h;
#pragma unroll
            for (int c = 0; c < kMaxChannels; ++c)
                if (c < channels) dj[c] = d[(long long)c * hidden];
        }
        float acc[kMaxChannels] = {0.0f, 0.0f, 0.0f};
        const int end = row_ptr[j + 1];
        for (int e = row_ptr[j]; e < end; ++e) {
            const long long k = col[e];
            if (dx != nullptr) {
                const float g = gate != nullptr ? gate[(long long)reverse[e] * hidden + h] : 1.0f;
                const float* dk = dout + k * row_stride + h;
#pragma unroll
                for (int c = 0; c < kMaxChannels; ++c)
                    if (c < channels) acc[c] += g * dk[(long long)c * hidden];
            }
            if (dgate != nullptr) {
                const float* xk = x + k * row_stride + h;
                float s = 0.0f;
#pragma unroll
                for (int c = 0; c < kMaxChannels; ++c)
                    if (c < channels) s += dj[c] * xk[(long long)c * hidden];
                dgate[(long long)e * hidden + h] = s;
            }
        }
        if (dx != nullptr) {
            float* o = dx + (long long)j * row_stride + h;
#pragma unroll
            for (int c = 0; c < kMaxChannels; ++c)
                if (c < channels) o[(long long)c * hidden] = acc[c];
        }
    }
}
HIERMD_EXPORT_KERNEL(graph_aggregate_backward)
