// Seeded, counter-based dropout. CPU twin: src/ops/dropout.rs.
//
// The keep mask is a pure function of (seed, key), never stored: the backward recomputes it. A
// tensor is [outer, comps, inner] and element (o, c, i) uses key o * inner + i, so the components
// of one vector channel (comps = 3 for [tokens, 3, H] features) are dropped together and the
// dropout commutes with rotations. The hash is 64-bit integer math, bit-identical on the host.
#include "common/hiermd.cuh"

/// SplitMix64 of seed ^ (key * golden ratio): the counter-based stream (same as the Rust twin).
__device__ __forceinline__ unsigned long long dropout_hash(unsigned long long seed, unsigned long long key) {
    unsigned long long z = seed ^ (key * 0x9E3779B97F4A7C15ull);
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/// y = x * keep / (1 - p), keep = (top 24 bits of the hash) / 2^24 >= p; `scale` = 1 / (1 - p)
/// computed once in f32 by the caller. The backward is this same kernel applied to dy (the op is
/// a fixed diagonal scaling): dx = dy * keep / (1 - p), assigned.
///
/// Grid-stride over keys; each key's hash is computed once and applied to its comps elements.
extern "C" __global__ void dropout_forward(const float* __restrict__ x, float* __restrict__ y, long long outer,
                                           long long comps, long long inner, float p, float scale,
                                           unsigned long long seed) {
    const long long keys = outer * inner;
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < keys;
         k += (long long)gridDim.x * blockDim.x) {
        // The top 24 bits are exact in a float, so the comparison is the host's bit for bit.
        const float u = (float)(dropout_hash(seed, (unsigned long long)k) >> 40) * (1.0f / 16777216.0f);
        const float f = u >= p ? scale : 0.0f;
        const long long o = k / inner, i = k - o * inner;
        const long long base = o * comps * inner + i;
        for (long long c = 0; c < comps; ++c) {
            const long long e = base + c * inner;
            // A select, not x * 0: a dropped inf or NaN must not leak into y.
            y[e] = f != 0.0f ? x[e] * f : 0.0f;
        }
    }
}
HIERMD_EXPORT_KERNEL(dropout_forward)
