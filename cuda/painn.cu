// PaiNN message passing over the atom-stage neighbor list (SPEC step 2), forward and backward,
// with the radial basis and the edge geometry computed on the fly: no per-edge feature is ever
// written to memory. CPU twins, shape checks and launches: src/ops/painn.rs.
//
// Layouts (row-major; N = frames x atoms rows, H channels, K basis functions):
//   pos [N, 3]        phi [N, 3H]       v, dv [N, 3, H]      ds [N, H]
//   w_filter [3H, K]  b_filter [3H]     neighbor list: CSR by destination (row_ptr [N + 1],
//   col [E] = source j, reverse [E] = the mirror edge, shift [E, 3] or null).
// For the edge e = (j -> i) of row i: vec = (x_j + shift_e) - x_i, r = |vec|, u = vec / r (u = 0
// at r = 0, where every derivative below is taken as 0 so nothing is ever NaN),
//   W_e = (rbf(r) w_filter^T + b_filter) * fcut(r)       (3H values)
//   x = phi_j * W_e = (x_s, x_vv, x_vs)                    (three blocks of H)
//   ds_i = sum_e x_s,   dv_i[d] = sum_e x_vv * v_j[d] + x_vs * u_e[d].
//
// Kernels (every reduction is one thread's or one warp's fixed-order sum, no float atomics, so
// results are bitwise reproducible for a given shape on the GPU and on emu):
//   radial_basis_forward              out[e, k] = rbf_k(dist_e) fcut(dist_e) (tests, features).
//   painn_message_forward_h{32..256}  a warp per destination row, lanes over channels; edges in
//                                     groups of kPainnGroup: the group's K basis values are
//                                     computed once per edge (lanes over k) into the warp's shared
//                                     buffer, and each w_filter value read from shared memory
//                                     serves the whole group.
//   painn_message_backward_h{32..256} a warp per SOURCE row j, gathering over the transposed CSR
//                                     (row j's edge e' names e = reverse[e'] = (j -> i)): assigns
//                                     d_phi_j and d_v_j, and (when asked) writes the per-edge
//                                     position gradient dvec_e = dL/d vec_e [E, 3].
//   painn_filter_backward             per block a fixed range of edges x a slice of the
//                                     [3H, K + 1] entries of (d_w_filter | d_b_filter): partial
//                                     sums per block, which painn_filter_reduce adds in block
//                                     order into the parameter gradients (+=).
//   painn_position_backward           d_pos_a = sum over row a of dvec[reverse[e]] - dvec[e].
//   painn_split3_forward / _backward  a [N, 3H] -> three [N, H] column split and its inverse.
//
// Helper names carry a painn_ prefix: on emu every .cu file is linked into one library.
#include "common/hiermd.cuh"

/// Radial basis kinds (RbfKind in src/ops/painn.rs): 0 Gaussian, 1 ExpNormal.
constexpr int kPainnGaussian = 0;

/// Warps per block of the row kernels (`ROW_WARPS` in src/ops/painn.rs).
constexpr int kPainnWarps = 4;
constexpr int kPainnRowThreads = kPainnWarps * 32;
/// Edges a warp handles at once (`GROUP`): each w_filter value read from shared memory is used
/// for this many edges.
constexpr int kPainnGroup = 4;
/// Threads, edges per step and entries per thread of painn_filter_backward (`FILTER_*`).
constexpr int kPainnFilterThreads = 256;
constexpr int kPainnFilterEdges = 8;
constexpr int kPainnFilterEntries = 8;

constexpr float kPainnPi = 3.14159265358979f;

/// The radial basis of one launch: its kind, size and the constants derived from the cutoff (as
/// TorchMD-Net initialises them; fixed, not trained).
struct PainnBasis {
    int kind;
    int size;
    float cutoff;
    float a;      // Gaussian: coefficient -1 / (2 spacing^2); ExpNormal: alpha = 5 / cutoff
    float b;      // Gaussian: centre spacing;                 ExpNormal: beta
    float start;  // ExpNormal: first mean exp(-cutoff)
    float step;   // ExpNormal: mean spacing (1 - start) / (K - 1)
};

__device__ __forceinline__ PainnBasis painn_basis(int kind, int size, float cutoff) {
    PainnBasis p;
    p.kind = kind;
    p.size = size;
    p.cutoff = cutoff;
    if (kind == kPainnGaussian) {
        const float spacing = size > 1 ? cutoff / (float)(size - 1) : cutoff;
        p.a = -0.5f / (spacing * spacing);
        p.b = spacing;
        p.start = 0.0f;
        p.step = 0.0f;
    } else {
        const float start = expf(-cutoff);
        const float width = 2.0f / (float)size * (1.0f - start);
        p.a = 5.0f / cutoff;
        p.b = 1.0f / (width * width);
        p.start = start;
        p.step = size > 1 ? (1.0f - start) / (float)(size - 1) : 0.0f;
    }
    return p;
}

/// exp(-alpha r): the ExpNormal basis's argument, shared by its K functions.
__device__ __forceinline__ float painn_basis_arg(const PainnBasis& p, float r) {
    return p.kind == kPainnGaussian ? r : expf(-p.a * r);
}

/// Basis function k at r (t = painn_basis_arg(r)), without the cutoff; its derivative in r
/// goes to *deriv when deriv is not null.
__device__ __forceinline__ float painn_basis_value(const PainnBasis& p, int k, float r, float t, float* deriv) {
    if (p.kind == kPainnGaussian) {
        const float d = r - (float)k * p.b;
        const float val = expf(p.a * d * d);
        if (deriv != nullptr) *deriv = val * 2.0f * p.a * d;
        return val;
    }
    const float d = t - (p.start + (float)k * p.step);
    const float val = expf(-p.b * d * d);
    if (deriv != nullptr) *deriv = val * 2.0f * p.b * p.a * t * d;
    return val;
}

/// The cosine cutoff 0.5 (cos(pi r / c) + 1) below c (0 from c on) and its derivative.
__device__ __forceinline__ float painn_cutoff(float r, float c, float* deriv) {
    if (r < c) {
        const float x = kPainnPi * (r / c);
        *deriv = -0.5f * (kPainnPi / c) * sinf(x);
        return 0.5f * (cosf(x) + 1.0f);
    }
    *deriv = 0.0f;
    return 0.0f;
}

/// Geometry of edge e = (j -> i): r, u = vec / r (0 at r = 0), fcut and its derivative.
struct PainnEdge {
    float r, u0, u1, u2, f, df;
};

__device__ __forceinline__ PainnEdge painn_edge(const float* __restrict__ pos, const float* __restrict__ shift,
                                                int i, int j, long long e, float cutoff) {
    float x0 = pos[3LL * j], x1 = pos[3LL * j + 1], x2 = pos[3LL * j + 2];
    if (shift != nullptr) {
        x0 += shift[3 * e];
        x1 += shift[3 * e + 1];
        x2 += shift[3 * e + 2];
    }
    const float v0 = x0 - pos[3LL * i], v1 = x1 - pos[3LL * i + 1], v2 = x2 - pos[3LL * i + 2];
    PainnEdge g;
    const float d2 = v0 * v0 + v1 * v1 + v2 * v2;
    g.r = sqrtf(d2);
    const float inv = d2 > 0.0f ? 1.0f / g.r : 0.0f;
    g.u0 = v0 * inv;
    g.u1 = v1 * inv;
    g.u2 = v2 * inv;
    g.f = painn_cutoff(g.r, cutoff, &g.df);
    return g;
}

/// w_filter [3H, K] transposed into shared memory as [K, 3H] (lanes read consecutive channels:
/// no bank conflicts), then the bias. Every thread of the block takes part.
__device__ __forceinline__ void painn_load_filter(const float* __restrict__ w, const float* __restrict__ bias,
                                                  float* wt, float* bsh, int h3, int size) {
    const int tid = (int)threadIdx.x, nthreads = (int)blockDim.x;
    for (int idx = tid; idx < h3 * size; idx += nthreads) {
        const int c = idx / size, k = idx - c * size;
        wt[k * h3 + c] = w[idx];
    }
    for (int c = tid; c < h3; c += nthreads) bsh[c] = bias[c];
    __syncthreads();
}

/// Floats of shared memory before the per-warp buffers: wt [K, 3H] and the bias [3H], rounded up
/// to a multiple of 4 so that the buffers after it are 16-byte aligned (`filter_floats` in
/// src/ops/painn.rs).
__device__ __forceinline__ int painn_filter_floats(int hidden, int size) { return (3 * hidden * (size + 1) + 3) & ~3; }

/// The kPainnGroup basis values of one k, read from shared memory with one 16-byte load.
struct __align__(16) PainnQuad {
    float v[4];
};
static_assert(kPainnGroup == 4, "PainnQuad holds one value per edge of a group");

__device__ __forceinline__ PainnQuad painn_quad(const float* p, int k) {
    return reinterpret_cast<const PainnQuad*>(p)[k];
}

// ---------------------------------------------------------------------------------------------
// Radial basis features.

/// out[e, k] = rbf_k(dist[e]) * fcut(dist[e]) for e < edges, k < size.
extern "C" __global__ void radial_basis_forward(const float* __restrict__ dist, float* __restrict__ out,
                                                long long edges, int kind, int size, float cutoff) {
    const PainnBasis p = painn_basis(kind, size, cutoff);
    const long long n = edges * size;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long e = idx / size;
        const int k = (int)(idx - e * size);
        const float r = dist[e];
        float df;
        const float f = painn_cutoff(r, cutoff, &df);
        out[idx] = painn_basis_value(p, k, r, painn_basis_arg(p, r), nullptr) * f;
    }
}
HIERMD_EXPORT_KERNEL(radial_basis_forward)

// ---------------------------------------------------------------------------------------------
// Forward.

/// The message of every destination row, a warp per row, CH chunks of 32 channels per lane.
/// Assigns ds [N, H] and dv [N, 3, H] (rows without edges get 0).
template <int CH>
__device__ __forceinline__ void painn_message_forward_body(const int* __restrict__ row_ptr, const int* __restrict__ col,
                                                           const float* __restrict__ shift,
                                                           const float* __restrict__ pos,
                                                           const float* __restrict__ phi,
                                                           const float* __restrict__ v, const float* __restrict__ w,
                                                           const float* __restrict__ bias, float* __restrict__ ds,
                                                           float* __restrict__ dv, int rows, int hidden, int kind,
                                                           int size, float cutoff) {
    HIERMD_DYNAMIC_SHARED(float, smem);
    const int h3 = 3 * hidden;
    float* wt = smem;
    float* bsh = smem + h3 * size;
    const int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
    float* rb = smem + painn_filter_floats(hidden, size) + warp * size * kPainnGroup;  // [K][group]
    painn_load_filter(w, bias, wt, bsh, h3, size);
    const PainnBasis p = painn_basis(kind, size, cutoff);

    for (int i = blockIdx.x * kPainnWarps + warp; i < rows; i += gridDim.x * kPainnWarps) {
        float acc_s[CH], acc_v[3][CH];
#pragma unroll
        for (int ch = 0; ch < CH; ++ch) {
            acc_s[ch] = 0.0f;
            acc_v[0][ch] = acc_v[1][ch] = acc_v[2][ch] = 0.0f;
        }
        const int beg = row_ptr[i], end = row_ptr[i + 1];
        for (int e0 = beg; e0 < end; e0 += kPainnGroup) {
            const int gn = min(kPainnGroup, end - e0);
            int jg[kPainnGroup];
            PainnEdge eg[kPainnGroup];
            float tg[kPainnGroup];
#pragma unroll
            for (int g = 0; g < kPainnGroup; ++g) {
                // Every lane computes the group's geometry (broadcast loads): no shuffles needed.
                // Padding slots past the row's end repeat a valid edge and are never used.
                jg[g] = g < gn ? col[e0 + g] : i;
                eg[g] = painn_edge(pos, shift, i, jg[g], e0 + (g < gn ? g : 0), cutoff);
                tg[g] = painn_basis_arg(p, eg[g].r);
            }
            __syncwarp();  // the previous group's basis values have been read
            for (int k = lane; k < size; k += 32) {
#pragma unroll
                for (int g = 0; g < kPainnGroup; ++g)
                    rb[k * kPainnGroup + g] = painn_basis_value(p, k, eg[g].r, tg[g], nullptr);
            }
            __syncwarp();
#pragma unroll
            for (int ch = 0; ch < CH; ++ch) {
                const int h = lane + 32 * ch;
                const int hc = h < hidden ? h : hidden - 1;  // idle lanes read a valid address
                float pr[kPainnGroup][3];
#pragma unroll
                for (int g = 0; g < kPainnGroup; ++g) pr[g][0] = pr[g][1] = pr[g][2] = 0.0f;
                for (int k = 0; k < size; ++k) {
                    const float* wk = wt + k * h3 + hc;
                    const float w0 = wk[0], w1 = wk[hidden], w2 = wk[2 * hidden];
                    const PainnQuad q = painn_quad(rb, k);
#pragma unroll
                    for (int g = 0; g < kPainnGroup; ++g) {
                        const float b = q.v[g];
                        pr[g][0] += b * w0;
                        pr[g][1] += b * w1;
                        pr[g][2] += b * w2;
                    }
                }
                if (h < hidden) {
                    const float b0 = bsh[h], b1 = bsh[hidden + h], b2 = bsh[2 * hidden + h];
#pragma unroll
                    for (int g = 0; g < kPainnGroup; ++g) {
                        if (g < gn) {
                            const float* ph = phi + (long long)jg[g] * h3;
                            const float* vj = v + (long long)jg[g] * h3;
                            const float xs = ph[h] * ((pr[g][0] + b0) * eg[g].f);
                            const float xvv = ph[hidden + h] * ((pr[g][1] + b1) * eg[g].f);
                            const float xvs = ph[2 * hidden + h] * ((pr[g][2] + b2) * eg[g].f);
                            acc_s[ch] += xs;
                            acc_v[0][ch] += xvv * vj[h] + xvs * eg[g].u0;
                            acc_v[1][ch] += xvv * vj[hidden + h] + xvs * eg[g].u1;
                            acc_v[2][ch] += xvv * vj[2 * hidden + h] + xvs * eg[g].u2;
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int ch = 0; ch < CH; ++ch) {
            const int h = lane + 32 * ch;
            if (h < hidden) {
                ds[(long long)i * hidden + h] = acc_s[ch];
                float* o = dv + (long long)i * h3 + h;
                o[0] = acc_v[0][ch];
                o[hidden] = acc_v[1][ch];
                o[2 * hidden] = acc_v[2][ch];
            }
        }
    }
}

#define PAINN_MESSAGE_FORWARD(NAME, CH)                                                                             \
    extern "C" __global__ void __launch_bounds__(kPainnRowThreads)                                                  \
        NAME(const int* __restrict__ row_ptr, const int* __restrict__ col, const float* __restrict__ shift,        \
             const float* __restrict__ pos, const float* __restrict__ phi, const float* __restrict__ v,            \
             const float* __restrict__ w, const float* __restrict__ bias, float* __restrict__ ds,                  \
             float* __restrict__ dv, int rows, int hidden, int kind, int size, float cutoff) {                     \
        painn_message_forward_body<CH>(row_ptr, col, shift, pos, phi, v, w, bias, ds, dv, rows, hidden, kind,      \
                                       size, cutoff);                                                              \
    }

PAINN_MESSAGE_FORWARD(painn_message_forward_h32, 1)
HIERMD_EXPORT_KERNEL(painn_message_forward_h32)
PAINN_MESSAGE_FORWARD(painn_message_forward_h64, 2)
HIERMD_EXPORT_KERNEL(painn_message_forward_h64)
PAINN_MESSAGE_FORWARD(painn_message_forward_h128, 4)
HIERMD_EXPORT_KERNEL(painn_message_forward_h128)
PAINN_MESSAGE_FORWARD(painn_message_forward_h256, 8)
HIERMD_EXPORT_KERNEL(painn_message_forward_h256)

// ---------------------------------------------------------------------------------------------
// Backward: activation gradients and per-edge position gradients.

/// A warp per source row j: for each edge e' of row j, e = reverse[e'] is the edge (j -> i) of
/// row i = col[e'], whose message read phi_j and v_j. With g_x = (dds_i, sum_d ddv_i[d] v_j[d],
/// sum_d ddv_i[d] u_e[d]):
///   d_phi_j += g_x * W_e,   d_v_j[d] += ddv_i[d] * phi_j[H:2H] * W_e[H:2H]       (assigned)
/// and, when dvec is not null, with g_W = g_x * phi_j, P = rbf w^T + b, Q = rbf' w^T:
///   dr  = sum_c g_W[c] (Q[c] f + P[c] f'),   du[d] = sum_h ddv_i[d, h] x_vs[h]
///   dvec_e = dr u + (du - (du . u) u) / r   (0 at r = 0)
/// Null d_phi or d_v pointers skip those outputs.
template <int CH>
__device__ __forceinline__ void painn_message_backward_body(
    const int* __restrict__ row_ptr, const int* __restrict__ col, const int* __restrict__ reverse,
    const float* __restrict__ shift, const float* __restrict__ pos, const float* __restrict__ phi,
    const float* __restrict__ v, const float* __restrict__ w, const float* __restrict__ bias,
    const float* __restrict__ dds, const float* __restrict__ ddv, float* __restrict__ dphi,
    float* __restrict__ dvj_out, float* __restrict__ dvec, int rows, int hidden, int kind, int size, float cutoff) {
    HIERMD_DYNAMIC_SHARED(float, smem);
    const int h3 = 3 * hidden;
    float* wt = smem;
    float* bsh = smem + h3 * size;
    const int warp = (int)threadIdx.x / 32, lane = (int)threadIdx.x % 32;
    float* rb = smem + painn_filter_floats(hidden, size) + warp * 2 * size * kPainnGroup;  // [K][group]
    float* drb = rb + size * kPainnGroup;                                                   // [K][group]
    painn_load_filter(w, bias, wt, bsh, h3, size);
    const PainnBasis p = painn_basis(kind, size, cutoff);
    const bool want_pos = dvec != nullptr;

    for (int j = blockIdx.x * kPainnWarps + warp; j < rows; j += gridDim.x * kPainnWarps) {
        float acc_phi[3][CH], acc_v[3][CH];
#pragma unroll
        for (int ch = 0; ch < CH; ++ch) {
            acc_phi[0][ch] = acc_phi[1][ch] = acc_phi[2][ch] = 0.0f;
            acc_v[0][ch] = acc_v[1][ch] = acc_v[2][ch] = 0.0f;
        }
        const int beg = row_ptr[j], end = row_ptr[j + 1];
        for (int e0 = beg; e0 < end; e0 += kPainnGroup) {
            const int gn = min(kPainnGroup, end - e0);
            int ig[kPainnGroup], eg_idx[kPainnGroup];
            PainnEdge eg[kPainnGroup];
            float tg[kPainnGroup];
#pragma unroll
            for (int g = 0; g < kPainnGroup; ++g) {
                const int ep = e0 + (g < gn ? g : 0);
                ig[g] = col[ep];
                eg_idx[g] = reverse[ep];
                // The edge as its destination row saw it in the forward pass: the same arithmetic.
                eg[g] = painn_edge(pos, shift, ig[g], j, eg_idx[g], cutoff);
                tg[g] = painn_basis_arg(p, eg[g].r);
            }
            __syncwarp();
            for (int k = lane; k < size; k += 32) {
#pragma unroll
                for (int g = 0; g < kPainnGroup; ++g) {
                    float d = 0.0f;
                    rb[k * kPainnGroup + g] = painn_basis_value(p, k, eg[g].r, tg[g], want_pos ? &d : nullptr);
                    if (want_pos) drb[k * kPainnGroup + g] = d;
                }
            }
            __syncwarp();
            float dr_part[kPainnGroup], du_part[kPainnGroup][3];
#pragma unroll
            for (int g = 0; g < kPainnGroup; ++g) dr_part[g] = du_part[g][0] = du_part[g][1] = du_part[g][2] = 0.0f;
#pragma unroll
            for (int ch = 0; ch < CH; ++ch) {
                const int h = lane + 32 * ch;
                const int hc = h < hidden ? h : hidden - 1;
                float pr[kPainnGroup][3], qr[kPainnGroup][3];
#pragma unroll
                for (int g = 0; g < kPainnGroup; ++g) {
                    pr[g][0] = pr[g][1] = pr[g][2] = 0.0f;
                    qr[g][0] = qr[g][1] = qr[g][2] = 0.0f;
                }
                if (want_pos) {
                    for (int k = 0; k < size; ++k) {
                        const float* wk = wt + k * h3 + hc;
                        const float w0 = wk[0], w1 = wk[hidden], w2 = wk[2 * hidden];
                        const PainnQuad q = painn_quad(rb, k), dq = painn_quad(drb, k);
#pragma unroll
                        for (int g = 0; g < kPainnGroup; ++g) {
                            const float b = q.v[g], db = dq.v[g];
                            pr[g][0] += b * w0;
                            pr[g][1] += b * w1;
                            pr[g][2] += b * w2;
                            qr[g][0] += db * w0;
                            qr[g][1] += db * w1;
                            qr[g][2] += db * w2;
                        }
                    }
                } else {
                    for (int k = 0; k < size; ++k) {
                        const float* wk = wt + k * h3 + hc;
                        const float w0 = wk[0], w1 = wk[hidden], w2 = wk[2 * hidden];
                        const PainnQuad q = painn_quad(rb, k);
#pragma unroll
                        for (int g = 0; g < kPainnGroup; ++g) {
                            const float b = q.v[g];
                            pr[g][0] += b * w0;
                            pr[g][1] += b * w1;
                            pr[g][2] += b * w2;
                        }
                    }
                }
                if (h < hidden) {
                    const float b0 = bsh[h], b1 = bsh[hidden + h], b2 = bsh[2 * hidden + h];
                    const float* ph = phi + (long long)j * h3;
                    const float* vj = v + (long long)j * h3;
                    const float ph_s = ph[h], ph_vv = ph[hidden + h], ph_vs = ph[2 * hidden + h];
                    const float v0 = vj[h], v1 = vj[hidden + h], v2 = vj[2 * hidden + h];
#pragma unroll
                    for (int g = 0; g < kPainnGroup; ++g) {
                        if (g < gn) {
                            const float f = eg[g].f;
                            const float ps = pr[g][0] + b0, pvv = pr[g][1] + b1, pvs = pr[g][2] + b2;
                            const float ws = ps * f, wvv = pvv * f, wvs = pvs * f;
                            const float* gi = ddv + (long long)ig[g] * h3 + h;
                            const float d0 = gi[0], d1 = gi[hidden], d2 = gi[2 * hidden];
                            const float gs = dds[(long long)ig[g] * hidden + h];
                            const float gvv = d0 * v0 + d1 * v1 + d2 * v2;
                            const float gvs = d0 * eg[g].u0 + d1 * eg[g].u1 + d2 * eg[g].u2;
                            acc_phi[0][ch] += gs * ws;
                            acc_phi[1][ch] += gvv * wvv;
                            acc_phi[2][ch] += gvs * wvs;
                            const float xvv = ph_vv * wvv;
                            acc_v[0][ch] += d0 * xvv;
                            acc_v[1][ch] += d1 * xvv;
                            acc_v[2][ch] += d2 * xvv;
                            if (want_pos) {
                                const float df = eg[g].df;
                                dr_part[g] += gs * ph_s * (qr[g][0] * f + ps * df) +
                                              gvv * ph_vv * (qr[g][1] * f + pvv * df) +
                                              gvs * ph_vs * (qr[g][2] * f + pvs * df);
                                const float xvs = ph_vs * wvs;
                                du_part[g][0] += d0 * xvs;
                                du_part[g][1] += d1 * xvs;
                                du_part[g][2] += d2 * xvs;
                            }
                        }
                    }
                }
            }
            if (want_pos) {
#pragma unroll
                for (int g = 0; g < kPainnGroup; ++g) {
                    if (g < gn) {  // warp-uniform
                        const float dr = warp_sum(dr_part[g]);
                        const float du0 = warp_sum(du_part[g][0]);
                        const float du1 = warp_sum(du_part[g][1]);
                        const float du2 = warp_sum(du_part[g][2]);
                        if (lane == 0) {
                            const PainnEdge& q = eg[g];
                            const float inv = q.r > 0.0f ? 1.0f / q.r : 0.0f;
                            const float duu = du0 * q.u0 + du1 * q.u1 + du2 * q.u2;
                            float* o = dvec + 3LL * eg_idx[g];
                            o[0] = dr * q.u0 + (du0 - duu * q.u0) * inv;
                            o[1] = dr * q.u1 + (du1 - duu * q.u1) * inv;
                            o[2] = dr * q.u2 + (du2 - duu * q.u2) * inv;
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int ch = 0; ch < CH; ++ch) {
            const int h = lane + 32 * ch;
            if (h < hidden) {
                if (dphi != nullptr) {
                    float* o = dphi + (long long)j * h3 + h;
                    o[0] = acc_phi[0][ch];
                    o[hidden] = acc_phi[1][ch];
                    o[2 * hidden] = acc_phi[2][ch];
                }
                if (dvj_out != nullptr) {
                    float* o = dvj_out + (long long)j * h3 + h;
                    o[0] = acc_v[0][ch];
                    o[hidden] = acc_v[1][ch];
                    o[2 * hidden] = acc_v[2][ch];
                }
            }
        }
    }
}

#define PAINN_MESSAGE_BACKWARD(NAME, CH)                                                                            \
    extern "C" __global__ void __launch_bounds__(kPainnRowThreads)                                                  \
        NAME(const int* __restrict__ row_ptr, const int* __restrict__ col, const int* __restrict__ reverse,        \
             const float* __restrict__ shift, const float* __restrict__ pos, const float* __restrict__ phi,        \
             const float* __restrict__ v, const float* __restrict__ w, const float* __restrict__ bias,             \
             const float* __restrict__ dds, const float* __restrict__ ddv, float* __restrict__ dphi,               \
             float* __restrict__ dv, float* __restrict__ dvec, int rows, int hidden, int kind, int size,           \
             float cutoff) {                                                                                        \
        painn_message_backward_body<CH>(row_ptr, col, reverse, shift, pos, phi, v, w, bias, dds, ddv, dphi, dv,    \
                                        dvec, rows, hidden, kind, size, cutoff);                                   \
    }

PAINN_MESSAGE_BACKWARD(painn_message_backward_h32, 1)
HIERMD_EXPORT_KERNEL(painn_message_backward_h32)
PAINN_MESSAGE_BACKWARD(painn_message_backward_h64, 2)
HIERMD_EXPORT_KERNEL(painn_message_backward_h64)
PAINN_MESSAGE_BACKWARD(painn_message_backward_h128, 4)
HIERMD_EXPORT_KERNEL(painn_message_backward_h128)
PAINN_MESSAGE_BACKWARD(painn_message_backward_h256, 8)
HIERMD_EXPORT_KERNEL(painn_message_backward_h256)

// ---------------------------------------------------------------------------------------------
// Backward: filter parameters.

/// The destination row of edge e: the last row whose row_ptr is <= e (binary search).
__device__ __forceinline__ int painn_edge_row(const int* __restrict__ row_ptr, int rows, int e) {
    int lo = 0, hi = rows;  // row_ptr[lo] <= e < row_ptr[hi]
    while (hi - lo > 1) {
        const int mid = lo + (hi - lo) / 2;
        if (row_ptr[mid] <= e)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/// Partial sums of the filter gradients over the edges [bx * per_block, (bx + 1) * per_block):
/// entry (c, k) of the [3H, K + 1] matrix is sum_e g_W[c] f rbf_k (k < K) or sum_e g_W[c] f
/// (k = K, the bias), with g_W = g_x * phi_j as in the backward above. Block (bx, by) owns the
/// entries [by * S, (by + 1) * S), S = threads x kPainnFilterEntries, and writes them to
/// partial[bx, :]. Edges go kPainnFilterEdges at a time through shared memory: the basis values
/// (with a 1 for the bias) and g_W f of those edges, then each thread adds, edge by edge in order,
/// the products into its entries. Dynamic shared memory: kPainnFilterEdges x (K + 1 + 3H) floats.
extern "C" __global__ void __launch_bounds__(kPainnFilterThreads)
    painn_filter_backward(const int* __restrict__ row_ptr, const int* __restrict__ col,
                          const float* __restrict__ shift, const float* __restrict__ pos,
                          const float* __restrict__ phi, const float* __restrict__ v,
                          const float* __restrict__ dds, const float* __restrict__ ddv,
                          float* __restrict__ partial, int rows, int edges, int per_block, int hidden, int kind,
                          int size, float cutoff) {
    HIERMD_DYNAMIC_SHARED(float, smem);
    __shared__ int s_i[kPainnFilterEdges], s_j[kPainnFilterEdges];
    __shared__ float s_r[kPainnFilterEdges], s_f[kPainnFilterEdges], s_u[kPainnFilterEdges][3];
    const int h3 = 3 * hidden, k1 = size + 1;
    float* rbx = smem;                             // [edges][K + 1]
    float* gw = smem + kPainnFilterEdges * k1;     // [edges][3H]
    const int tid = (int)threadIdx.x;
    const long long entries = (long long)h3 * k1;
    const long long s0 = (long long)blockIdx.y * kPainnFilterThreads * kPainnFilterEntries;
    const long long s1 = min(entries, s0 + (long long)kPainnFilterThreads * kPainnFilterEntries);
    if (s0 >= entries) return;  // block-uniform
    const int c_lo = (int)(s0 / k1), c_hi = (int)((s1 - 1) / k1) + 1;
    const int e_beg = blockIdx.x * per_block;
    const int e_end = min(edges, e_beg + per_block);
    const PainnBasis p = painn_basis(kind, size, cutoff);
    float acc[kPainnFilterEntries];
#pragma unroll
    for (int m = 0; m < kPainnFilterEntries; ++m) acc[m] = 0.0f;

    for (int sb = e_beg; sb < e_end; sb += kPainnFilterEdges) {
        if (tid < kPainnFilterEdges) {
            const int e = sb + tid;
            if (e < e_end) {
                const int i = painn_edge_row(row_ptr, rows, e);
                const int j = col[e];
                const PainnEdge g = painn_edge(pos, shift, i, j, e, cutoff);
                s_i[tid] = i;
                s_j[tid] = j;
                s_r[tid] = g.r;
                s_f[tid] = g.f;
                s_u[tid][0] = g.u0;
                s_u[tid][1] = g.u1;
                s_u[tid][2] = g.u2;
            } else {
                s_j[tid] = -1;
            }
        }
        __syncthreads();
        for (int idx = tid; idx < kPainnFilterEdges * k1; idx += kPainnFilterThreads) {
            const int t = idx / k1, k = idx - t * k1;
            float val = 0.0f;
            if (s_j[t] >= 0) val = k < size ? painn_basis_value(p, k, s_r[t], painn_basis_arg(p, s_r[t]), nullptr) : 1.0f;
            rbx[idx] = val;
        }
        const int cw = c_hi - c_lo;
        for (int idx = tid; idx < kPainnFilterEdges * cw; idx += kPainnFilterThreads) {
            const int t = idx / cw, c = c_lo + (idx - t * cw);
            float val = 0.0f;
            const int j = s_j[t];
            if (j >= 0) {
                const int i = s_i[t];
                const int part = c / hidden, h = c - part * hidden;
                float gx;
                if (part == 0) {
                    gx = dds[(long long)i * hidden + h];
                } else {
                    const float* gi = ddv + (long long)i * h3 + h;
                    if (part == 1) {
                        const float* vj = v + (long long)j * h3 + h;
                        gx = gi[0] * vj[0] + gi[hidden] * vj[hidden] + gi[2 * hidden] * vj[2 * hidden];
                    } else {
                        gx = gi[0] * s_u[t][0] + gi[hidden] * s_u[t][1] + gi[2 * hidden] * s_u[t][2];
                    }
                }
                val = s_f[t] * (gx * phi[(long long)j * h3 + c]);
            }
            gw[t * h3 + c] = val;
        }
        __syncthreads();
#pragma unroll
        for (int m = 0; m < kPainnFilterEntries; ++m) {
            const long long idx = s0 + tid + (long long)m * kPainnFilterThreads;
            if (idx < s1) {
                const int c = (int)(idx / k1), k = (int)(idx - (long long)c * k1);
                float a = acc[m];
                for (int t = 0; t < kPainnFilterEdges; ++t) a += gw[t * h3 + c] * rbx[t * k1 + k];
                acc[m] = a;
            }
        }
        __syncthreads();  // the next step overwrites the shared tiles
    }
#pragma unroll
    for (int m = 0; m < kPainnFilterEntries; ++m) {
        const long long idx = s0 + tid + (long long)m * kPainnFilterThreads;
        if (idx < s1) partial[(long long)blockIdx.x * entries + idx] = acc[m];
    }
}
HIERMD_EXPORT_KERNEL(painn_filter_backward)

/// dw[c, k] += sum over blocks b (in order) of partial[b, c, k] for k < K; db[c] += the same
/// for k = K. Null dw or db pointers skip that gradient. Accumulates (parameter gradients).
extern "C" __global__ void painn_filter_reduce(const float* __restrict__ partial, float* __restrict__ dw,
                                               float* __restrict__ db, int blocks, int hidden, int size) {
    const int k1 = size + 1;
    const long long entries = 3LL * hidden * k1;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < entries;
         idx += (long long)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int b = 0; b < blocks; ++b) s += partial[(long long)b * entries + idx];
        const long long c = idx / k1;
        const int k = (int)(idx - c * k1);
        if (k < size) {
            if (dw != nullptr) dw[c * size + k] += s;
        } else if (db != nullptr) {
            db[c] += s;
        }
    }
}
HIERMD_EXPORT_KERNEL(painn_filter_reduce)

/// dpos[a] = sum over the edges e of row a of dvec[reverse[e]] - dvec[e]: atom a is the source
/// of the mirror edges (vec = x_a + ... - x_i) and the destination of its own (vec = ... - x_a).
/// Assigns dpos [N, 3].
extern "C" __global__ void painn_position_backward(const int* __restrict__ row_ptr, const int* __restrict__ reverse,
                                                   const float* __restrict__ dvec, float* __restrict__ dpos,
                                                   int rows) {
    for (long long a = blockIdx.x * (long long)blockDim.x + threadIdx.x; a < rows;
         a += (long long)gridDim.x * blockDim.x) {
        float g0 = 0.0f, g1 = 0.0f, g2 = 0.0f;
        const int end = row_ptr[a + 1];
        for (int e = row_ptr[a]; e < end; ++e) {
            const long long r = reverse[e];
            g0 += dvec[3 * r] - dvec[3LL * e];
            g1 += dvec[3 * r + 1] - dvec[3LL * e + 1];
            g2 += dvec[3 * r + 2] - dvec[3LL * e + 2];
        }
        dpos[3 * a] = g0;
        dpos[3 * a + 1] = g1;
        dpos[3 * a + 2] = g2;
    }
}
HIERMD_EXPORT_KERNEL(painn_position_backward)

// ---------------------------------------------------------------------------------------------
// Column split into three.

/// a, b, c [N, H] = the three column blocks of x [N, 3H].
extern "C" __global__ void painn_split3_forward(const float* __restrict__ x, float* __restrict__ a,
                                                float* __restrict__ b, float* __restrict__ c, long long rows,
                                                int hidden) {
    const long long n = rows * 3 * hidden;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long row = idx / (3 * hidden);
        const int col = (int)(idx - row * 3 * hidden);
        const int part = col / hidden, h = col - part * hidden;
        float* out = part == 0 ? a : (part == 1 ? b : c);
        out[row * hidden + h] = x[idx];
    }
}
HIERMD_EXPORT_KERNEL(painn_split3_forward)

/// dx [N, 3H] = (da | db | dc). Assigns dx.
extern "C" __global__ void painn_split3_backward(const float* __restrict__ da, const float* __restrict__ db,
                                                 const float* __restrict__ dc, float* __restrict__ dx,
                                                 long long rows, int hidden) {
    const long long n = rows * 3 * hidden;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < n;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long row = idx / (3 * hidden);
        const int col = (int)(idx - row * 3 * hidden);
        const int part = col / hidden, h = col - part * hidden;
        const float* in = part == 0 ? da : (part == 1 ? db : dc);
        dx[idx] = in[row * hidden + h];
    }
}
HIERMD_EXPORT_KERNEL(painn_split3_backward)
