// Token layout ops of the token model, forward and backward. CPU twins: src/ops/tokens.rs.
//
// Token features are row-major x[B, T, C, H]: B frames, T tokens per frame, C = 1 (scalars) or
// 3 (the xyz components of vectors), H channels. Every op moves or combines values only within
// one component c, so vectors stay equivariant. Pure data movement is one thread per element of
// the tensor written (grid-stride, so any grid covers any size); the pooling kernels put frames
// on gridDim.y (grid-stride too) and sum tokens sequentially in one thread per output, which fixes
// the order of additions independently of the launch shape. No atomics: every output element has
// exactly one writer.
#include "common/hiermd.cuh"

constexpr int kTokenThreads = 256;

#define TOKENS_GRID_STRIDE(i, n)                                                                   \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n);                  \
         i += (long long)gridDim.x * blockDim.x)

/// out[b, t', c, j*H + h] = x[b, t'*w + j, c, h], or 0 where t'*w + j >= T (the padding of the
/// last window). out is [B, Tw, C, w*H] with Tw = ceil(T / w).
extern "C" __global__ void window_merge_gather(const float* __restrict__ x, float* __restrict__ out, int B, int T,
                                               int C, int H, int w, int Tw) {
    const long long n = (long long)B * Tw * C * w * H;
    TOKENS_GRID_STRIDE(i, n) {
        const int h = (int)(i % H);
        long long r = i / H;
        const int j = (int)(r % w);
        r /= w;
        const int c = (int)(r % C);
        r /= C;
        const int tw = (int)(r % Tw);
        const long long b = r / Tw;
        const int t = tw * w + j;
        out[i] = t < T ? x[((b * T + t) * C + c) * H + h] : 0.0f;
    }
}
HIERMD_EXPORT_KERNEL(window_merge_gather)

/// Backward of window_merge_gather: dx[b, t, c, h] = dout[b, t / w, c, (t % w)*H + h]. Assigns dx
/// (activation gradient); the gradients of the padding columns are dropped.
extern "C" __global__ void window_merge_scatter(const float* __restrict__ dout, float* __restrict__ dx, int B, int T,
                                                int C, int H, int w, int Tw) {
    const long long n = (long long)B * T * C * H;
    TOKENS_GRID_STRIDE(i, n) {
        const int h = (int)(i % H);
        long long r = i / H;
        const int c = (int)(r % C);
        r /= C;
        const int t = (int)(r % T);
        const long long b = r / T;
        dx[i] = dout[(((b * Tw + t / w) * C + c) * w + t % w) * H + h];
    }
}
HIERMD_EXPORT_KERNEL(window_merge_scatter)

/// out[b, hd, t, off + c*dh + d] = x[b, t, c, hd*dh + d] for out [B, nh, T, width]; the other
/// columns of out are not written.
extern "C" __global__ void split_heads(const float* __restrict__ x, float* __restrict__ out, int B, int T, int C,
                                       int H, int nh, int width, int off) {
    const int dh = H / nh;
    const long long n = (long long)B * T * C * H;
    TOKENS_GRID_STRIDE(i, n) {
        // Enumerated in out's order, so consecutive threads write consecutive columns.
        const int d = (int)(i % dh);
        long long r = i / dh;
        const int c = (int)(r % C);
        r /= C;
        const int t = (int)(r % T);
        r /= T;
        const int hd = (int)(r % nh);
        const long long b = r / nh;
        out[((b * nh + hd) * T + t) * width + off + c * dh + d] = x[((b * T + t) * C + c) * H + hd * dh + d];
    }
}
HIERMD_EXPORT_KERNEL(split_heads)

/// dx[b, t, c, hd*dh + d] = dout[b, hd, t, off + c*dh + d]: joins head outputs, and is the
/// backward of split_heads. Assigns dx.
extern "C" __global__ void merge_heads(const float* __restrict__ dout, float* __restrict__ dx, int B, int T, int C,
                                       int H, int nh, int width, int off) {
    const int dh = H / nh;
    const long long n = (long long)B * T * C * H;
    TOKENS_GRID_STRIDE(i, n) {
        const int k = (int)(i % H);
        long long r = i / H;
        const int c = (int)(r % C);
        r /= C;
        const int t = (int)(r % T);
        const long long b = r / T;
        const int hd = k / dh, d = k % dh;
        dx[i] = dout[((b * nh + hd) * T + t) * width + off + c * dh + d];
    }
}
HIERMD_EXPORT_KERNEL(merge_heads)

/// x[b, t, k] += sin(t * f_i) for even k = 2i, cos(t * f_i) for odd k = 2i + 1, with
/// f_i = 10000^(-2i/H). f_i is computed in double and rounded to float, and the angle is the
/// float product (float)t * f_i, exactly as the CPU twin does, so both evaluate sin/cos at the
/// same float argument (at t ~ 2e4 an ulp of the angle is ~2e-3: a different rounding of it would
/// be an error of that size). One thread per (t, k); it adds to every frame.
extern "C" __global__ void position_encoding_add(float* __restrict__ x, int B, int T, int H) {
    const long long n = (long long)T * H;
    TOKENS_GRID_STRIDE(i, n) {
        const int k = (int)(i % H);
        const int t = (int)(i / H);
        const int two_i = k & ~1;
        const float f = (float)pow(10000.0, -(double)two_i / (double)H);
        const float angle = (float)t * f;
        const float pe = (k & 1) ? cosf(angle) : sinf(angle);
        for (int b = 0; b < B; ++b) x[((long long)b * T + t) * H + k] += pe;
    }
}
HIERMD_EXPORT_KERNEL(position_encoding_add)

/// Pooling kinds; must match `Pool` in src/ops/tokens.rs.
constexpr int kPoolMean = 0;
constexpr int kPoolFirst = 1;

/// out[b, c, h] = mean over the valid tokens t of x[b, t, c, h] (0 for a frame without one), or
/// x[b, 0, c, h] if token 0 is valid (else 0). mask [B, T] (nonzero = valid) may be null: all
/// tokens valid. Grid: x over C*H, y over frames. The sum runs over t in order in one thread.
extern "C" __global__ void pool_forward(const float* __restrict__ x, const unsigned char* __restrict__ mask,
                                        float* __restrict__ out, int B, int T, int C, int H, int kind) {
    const int CH = C * H;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        const unsigned char* m = mask ? mask + (long long)b * T : nullptr;
        const float* xb = x + (long long)b * T * CH;
        for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < CH; e += gridDim.x * blockDim.x) {
            float v = 0.0f;
            if (kind == kPoolFirst) {
                if (!m || m[0]) v = xb[e];
            } else {
                float acc = 0.0f;
                int count = 0;
                for (int t = 0; t < T; ++t) {
                    if (m && !m[t]) continue;
                    acc += xb[(long long)t * CH + e];
                    ++count;
                }
                if (count > 0) v = acc / (float)count;
            }
            out[(long long)b * CH + e] = v;
        }
    }
}
HIERMD_EXPORT_KERNEL(pool_forward)

/// Number of valid tokens of one frame, by the whole block (blockDim.x a multiple of 32). Integer
/// sums: exact in any order.
__device__ __forceinline__ int block_count_valid(const unsigned char* m, int T, int* warp_partials) {
    int v = 0;
    for (int t = threadIdx.x; t < T; t += blockDim.x) v += m[t] != 0;
    v = warp_sum(v);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (lane == 0) warp_partials[warp] = v;
    __syncthreads();
    int total = 0;
    for (int i = 0; i < nwarps; ++i) total += warp_partials[i];
    // The partials are reused for the next frame: nobody may overwrite them before all have read.
    __syncthreads();
    return total;
}

/// Backward of pool_forward. Mean: dx[b, t, c, h] = dout[b, c, h] / count(b) on valid tokens, 0
/// on masked ones; First: dout on token 0 (if valid), 0 elsewhere. Assigns dx. Grid: x over
/// T*C*H, y over frames.
extern "C" __global__ void __launch_bounds__(kTokenThreads)
pool_backward(const float* __restrict__ dout, const unsigned char* __restrict__ mask, float* __restrict__ dx, int B,
              int T, int C, int H, int kind) {
    __shared__ int partials[kTokenThreads / 32];
    const int CH = C * H;
    const long long n = (long long)T * CH;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        const unsigned char* m = mask ? mask + (long long)b * T : nullptr;
        // Uniform across the block (kind and mask are launch arguments), so every thread reaches
        // the barriers inside.
        const int count = (kind == kPoolMean && m) ? block_count_valid(m, T, partials) : T;
        const float* g = dout + (long long)b * CH;
        float* d = dx + (long long)b * n;
        TOKENS_GRID_STRIDE(i, n) {
            const int t = (int)(i / CH), e = (int)(i % CH);
            const bool valid = !m || m[t];
            float v = 0.0f;
            if (valid) {
                if (kind == kPoolFirst) {
                    if (t == 0) v = g[e];
                } else {
                    v = g[e] / (float)count;
                }
            }
            d[i] = v;
        }
    }
}
HIERMD_EXPORT_KERNEL(pool_backward)

/// x[b, t, :, :] = 0 where mask[b, t] == 0, in place; row = C*H. Assigned, not multiplied, so a
/// NaN in a padded token does not survive. Its own backward (applied to the gradient).
extern "C" __global__ void apply_token_mask(float* __restrict__ x, const unsigned char* __restrict__ mask,
                                            long long n, int row) {
    TOKENS_GRID_STRIDE(i, n) {
        if (!mask[i / row]) x[i] = 0.0f;
    }
}
HIERMD_EXPORT_KERNEL(apply_token_mask)
