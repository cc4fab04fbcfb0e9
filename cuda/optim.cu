// Optimiser updates and the global gradient norm. CPU twins and the host side: src/optim.rs.
//
// Each update is one fused pass over a parameter tensor: it reads param, grad, m and v once and
// writes param, m and v once (7 x 4 bytes per element, the minimum for f32 state). Gradient
// clipping is folded in as `grad_scale`, so clipping costs one extra read of the gradients (the
// norm) and no extra write. Per-step scalars (bias corrections, the learning rate of this step)
// are computed once on the host in f64 and passed in, so every thread and every device starts
// from the same f32 constants.
//
// Grid-stride loops: any grid covers any n, so the launcher may cap the grid.
#include "common/hiermd.cuh"

constexpr int kNormThreads = 256;

/// Adam and AdamW, following torch.optim.Adam / torch.optim.AdamW (foreach=False):
///   p *= param_decay                     (AdamW: 1 - lr * wd; Adam: 1)
///   g  = grad_scale * grad + l2_decay * p (Adam: wd, coupled L2; AdamW: 0)
///   m  = m + (1 - beta1) (g - m)          (torch's lerp_)
///   v  = beta2 v + (1 - beta2) g^2
///   p -= step_size * m / (sqrt(v) / bias_correction2_sqrt + eps),  step_size = lr / bias_correction1
/// One kernel serves both: with param_decay = 1 and l2_decay = 0 the extra terms are exact no-ops.
extern "C" __global__ void adam_update(float* __restrict__ param, const float* __restrict__ grad,
                                       float* __restrict__ m, float* __restrict__ v, long long n,
                                       float grad_scale, float one_minus_beta1, float beta2,
                                       float one_minus_beta2, float step_size, float bias_correction2_sqrt,
                                       float eps, float l2_decay, float param_decay) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        // Decoupled decay reads the parameter before this step's update, as AdamW does; the L2
        // term reads it too (before the decoupled decay, which is 1 whenever L2 is on).
        const float p0 = param[i];
        const float g = grad_scale * grad[i] + l2_decay * p0;
        const float mi = m[i] + one_minus_beta1 * (g - m[i]);
        const float vi = beta2 * v[i] + one_minus_beta2 * (g * g);
        const float denom = sqrtf(vi) / bias_correction2_sqrt + eps;
        param[i] = p0 * param_decay - step_size * (mi / denom);
        m[i] = mi;
        v[i] = vi;
    }
}
HIERMD_EXPORT_KERNEL(adam_update)

/// Adam-atan2 (Everett et al. 2024, arXiv 2407.05872), as the adam-atan2-pytorch package
/// (`adam_atan2_pytorch.AdamAtan2`, the one geom2vec imports) computes it:
///   m   = m + (1 - beta1) (g - m),  v = v + (1 - beta2) (g^2 - v)   (both torch lerp_)
///   upd = atan2(m / bias_correction1, sqrt(v * b^2 / bias_correction2))
///   p   = p * (1 - lr * wd) - lr * a * upd
/// atan2 bounds every step by lr * a * pi / 2 and needs no eps. The host passes
/// inv_bias_correction1 = 1 / bc1, v_scale = b^2 / bc2, param_decay = 1 - lr * wd, lr_a = lr * a.
extern "C" __global__ void adam_atan2_update(float* __restrict__ param, const float* __restrict__ grad,
                                             float* __restrict__ m, float* __restrict__ v, long long n,
                                             float grad_scale, float one_minus_beta1, float one_minus_beta2,
                                             float inv_bias_correction1, float v_scale, float param_decay,
                                             float lr_a) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float g = grad_scale * grad[i];
        const float mi = m[i] + one_minus_beta1 * (g - m[i]);
        const float vi = v[i] + one_minus_beta2 * (g * g - v[i]);
        const float upd = atan2f(mi * inv_bias_correction1, sqrtf(vi * v_scale));
        param[i] = param[i] * param_decay - lr_a * upd;
        m[i] = mi;
        v[i] = vi;
    }
}
HIERMD_EXPORT_KERNEL(adam_atan2_update)

/// partials[offset + blockIdx.x] = sum of x[i]^2 over the elements this block visits, in f64.
///
/// The first pass of the global gradient norm. No float atomics: each block writes its own slot,
/// and the host adds the slots in index order, so the norm is bit-identical run to run for a given
/// launch shape. Squares accumulate in f64 (one conversion and one FMA per element, far below the
/// memory bound even at 1/64 FP64 rate), so the norm is exact to f64 rounding whatever n is.
extern "C" __global__ void __launch_bounds__(kNormThreads)
sum_squares_partials(const float* __restrict__ x, double* __restrict__ partials, long long n, int offset) {
    __shared__ double warp_partials[kNormThreads / 32];
    double acc = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const double xi = x[i];
        acc += xi * xi;
    }
    acc = warp_sum(acc);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (lane == 0) warp_partials[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        double total = lane < nwarps ? warp_partials[lane] : 0.0;
        total = warp_sum(total);
        if (lane == 0) partials[offset + blockIdx.x] = total;
    }
}
HIERMD_EXPORT_KERNEL(sum_squares_partials)
