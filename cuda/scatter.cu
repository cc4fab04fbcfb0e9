// Atom-stage scatters: the atomic-number embedding and the atom-to-token merge (TMM step a),
// forward and backward. CPU twins and the host-side index builds: src/ops/scatter.rs.
//
// Every sum is a gather over a CSR built once on the host (segment -> its atoms, ascending): one
// thread owns one output element and adds its members in list order, so there are no atomics and
// the result does not depend on the launch shape (bitwise reproducible). Threads of a warp take
// consecutive channels of the same segment, so feature reads are coalesced and index reads are
// warp broadcasts. Grid-stride loops: any grid covers any size.
#include "common/hiermd.cuh"

/// out[f, a, h] = table[index[a], h] for every frame f (the same atoms in every frame; out is
/// [frames, atoms, hidden]). The indices were checked on the host when the index was built; an
/// index outside the table (impossible through the Rust API) writes NaN instead of reading out of
/// bounds.
extern "C" __global__ void embedding_forward(const float* __restrict__ table, const int* __restrict__ index,
                                             float* __restrict__ out, long long total, int atoms, int hidden,
                                             int vocab) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / hidden;  // f * atoms + a
        const int h = (int)(i - row * hidden);
        const int z = index[row % atoms];
        out[i] = (z >= 0 && z < vocab) ? table[(long long)z * hidden + h] : __int_as_float(0x7fc00000);
    }
}
HIERMD_EXPORT_KERNEL(embedding_forward)

/// First pass of the embedding backward. A table row's atoms are cut into chunks of at most a
/// fixed number of consecutive list entries (chunk c holds atom_idx[chunk_begin[c] ..
/// chunk_begin[c + 1]]), so a common element (carbon) is summed by many threads:
///   partials[c, h] = sum over the atoms a of chunk c in list order, and for each over the
///                    frames f in order, of dout[f, a, h].
extern "C" __global__ void embedding_backward_partials(const int* __restrict__ chunk_begin,
                                                       const int* __restrict__ atom_idx,
                                                       const float* __restrict__ dout, float* __restrict__ partials,
                                                       int chunks, int atoms, int frames, int hidden) {
    const long long n = (long long)chunks * hidden;
    const long long frame_stride = (long long)atoms * hidden;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const int c = (int)(i / hidden);
        const int h = (int)(i - (long long)c * hidden);
        float acc = 0.0f;
        const int end = chunk_begin[c + 1];
        for (int m = chunk_begin[c]; m < end; ++m) {
            const float* d = dout + (long long)atom_idx[m] * hidden + h;
            for (int f = 0; f < frames; ++f) acc += d[f * frame_stride];
        }
        partials[i] = acc;
    }
}
HIERMD_EXPORT_KERNEL(embedding_backward_partials)

/// Second pass: dtable[r, h] += sum over the chunks of row r (chunk_ptr[r] .. chunk_ptr[r + 1])
/// in order of partials[c, h]. ACCUMULATES into dtable (a parameter gradient); rows without
/// atoms are left as they are.
extern "C" __global__ void embedding_backward_rows(const int* __restrict__ chunk_ptr,
                                                   const float* __restrict__ partials, float* __restrict__ dtable,
                                                   int vocab, int hidden) {
    const long long n = (long long)vocab * hidden;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const int r = (int)(i / hidden);
        const int h = (int)(i - (long long)r * hidden);
        const int end = chunk_ptr[r + 1];
        float acc = 0.0f;
        for (int c = chunk_ptr[r]; c < end; ++c) acc += partials[(long long)c * hidden + h];
        if (end > chunk_ptr[r]) dtable[i] += acc;
    }
}
HIERMD_EXPORT_KERNEL(embedding_backward_rows)

/// out[f, r, k] = sum over the atoms a of token r (atom_idx[row_ptr[r] .. row_ptr[r + 1]],
/// ascending) of x[f, a, k], divided by the token's atom count when `mean` is nonzero. k runs
/// over the inner elements (C * H: the xyz components of vectors are independent columns, so a
/// rotation of every atom's vectors rotates the token's). Tokens without atoms get 0. Assigns out.
extern "C" __global__ void token_merge_forward(const int* __restrict__ row_ptr, const int* __restrict__ atom_idx,
                                               const float* __restrict__ x, float* __restrict__ out,
                                               long long total, int tokens, int atoms, int inner, int mean) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long fr = i / inner;  // f * tokens + r
        const int k = (int)(i - fr * inner);
        const long long f = fr / tokens;
        const int r = (int)(fr - f * tokens);
        const float* xf = x + f * atoms * (long long)inner + k;
        const int begin = row_ptr[r], end = row_ptr[r + 1];
        float acc = 0.0f;
        for (int m = begin; m < end; ++m) acc += xf[(long long)atom_idx[m] * inner];
        if (mean != 0 && end > begin) acc /= (float)(end - begin);
        out[i] = acc;
    }
}
HIERMD_EXPORT_KERNEL(token_merge_forward)

/// dx[f, a, k] = dout[f, token_of_atom[a], k] (divided by the token's atom count when `mean` is
/// nonzero); 0 for atoms left out of the map (token -1). Each atom reads one token, so this is a
/// plain gather. ASSIGNS dx (an activation gradient).
extern "C" __global__ void token_merge_backward(const int* __restrict__ row_ptr,
                                                const int* __restrict__ token_of_atom,
                                                const float* __restrict__ dout, float* __restrict__ dx,
                                                long long total, int tokens, int atoms, int inner, int mean) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long fa = i / inner;  // f * atoms + a
        const int k = (int)(i - fa * inner);
        const long long f = fa / atoms;
        const int t = token_of_atom[fa - f * atoms];
        float g = 0.0f;
        if (t >= 0) {
            g = dout[(f * tokens + t) * inner + k];
            if (mean != 0) g /= (float)(row_ptr[t + 1] - row_ptr[t]);
        }
        dx[i] = g;
    }
}
HIERMD_EXPORT_KERNEL(token_merge_backward)
