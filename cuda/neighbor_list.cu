// Atom-stage radius graph (neighbor list): all pairs (i, j), i != j, of one frame closer than the
// cutoff, optionally under periodic boundaries (minimum image), as a CSR over destination atoms
// with the mirror index of every edge. Host side, CPU twin and the reference:
// src/ops/neighbor_list.rs, which launches the passes below in this order:
//
//   1. neighbor_frame_bounds  (no box only) per frame: bounding box of the real atoms -> cell grid
//   2. neighbor_cell_assign   per atom: cell index (fractional coordinates with a box), the integer
//                             wrap of the atom into the box, a cell histogram (integer atomics),
//                             and the first bad atom of each frame (integer atomicMin)
//   3. scan                   cell counts -> cell start
//   4. neighbor_cell_scatter  counting sort of the atoms by cell (integer atomics: the slot order
//                             inside a cell depends on scheduling, so...)
//   5. neighbor_cell_sort     ...each cell's atoms are sorted by index, and their positions copied
//                             in that order: everything after this point is deterministic
//   6. neighbor_count         per destination atom: its neighbours among the 27 cells around it
//   7. scan                   counts -> row_ptr, and the total edge count for the host
//   8. neighbor_fill          per destination atom: the same walk writes its columns and shifts,
//                             then sorts its row by column
//   9. neighbor_reverse       per edge: the mirror edge by binary search in the source's row
//
// The count-then-fill design sizes the edge arrays exactly, so no pair is ever dropped and there
// is no capacity to overflow. No float atomics anywhere; integer atomics only build histograms,
// claim slots that are sorted afterwards, and take minima, all of which have one result whatever
// the order. The pair test is evaluated in double with explicitly rounded operations (no FMA
// contraction), in the same order as the CPU twin, so every device finds bit for bit the same set
// of pairs; the cell grid only decides which candidates are tested, never the outcome.
#include "common/hiermd.cuh"

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Exclusive scans work on tiles of kThreads * kScanItems counts.
constexpr int kScanItems = 8;
constexpr int kScanTile = kThreads * kScanItems;
// Per-frame status: the smallest key atom * 4 + reason over the frame's bad atoms.
constexpr int kBadNonFinite = 1;
constexpr int kBadFarOutside = 2;
// A fractional coordinate at or beyond this magnitude (an atom more than 2^20 box lengths away) is
// an error: its rounding error, times the cells per axis, must stay far below the cells' margin
// (see MAX_FRACTIONAL in the Rust module).
constexpr double kMaxFractional = 1048576.0;
// Rows this short are sorted by insertion; longer ones by heapsort.
constexpr int kInsertionSortMax = 32;

// Double arithmetic exactly as written: on the GPU the _rn intrinsics are never contracted into
// FMA, so the pair test rounds the way the CPU twin's does. The host compiler builds the emu in
// ISO C++ mode, where it does not contract either.
#ifdef HIERMD_EMU
__device__ __forceinline__ double exact_add(double a, double b) { return a + b; }
__device__ __forceinline__ double exact_mul(double a, double b) { return a * b; }
#else
__device__ __forceinline__ double exact_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double exact_mul(double a, double b) { return __dmul_rn(a, b); }
#endif

__device__ __forceinline__ bool is_finite(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }

/// The lattice vector m_a a + m_b b + m_c c, rows of `box` being a, b, c (the CPU twin's
/// `lattice_shift`, same order of operations).
__device__ __forceinline__ void lattice_shift(const int m[3], const double* box, double out[3]) {
#pragma unroll
    for (int k = 0; k < 3; ++k)
        out[k] = exact_add(exact_add(exact_mul((double)m[0], box[k]), exact_mul((double)m[1], box[3 + k])), exact_mul((double)m[2], box[6 + k]));
}

/// |x_j + shift - x_i|^2 in double (the CPU twin's `pair_dist2`, same order of operations).
__device__ __forceinline__ double pair_dist2(const float xi[3], const float xj[3], const double shift[3]) {
    double d[3];
#pragma unroll
    for (int k = 0; k < 3; ++k) d[k] = exact_add(exact_add((double)xj[k], -(double)xi[k]), shift[k]);
    return exact_add(exact_add(exact_mul(d[0], d[0]), exact_mul(d[1], d[1])), exact_mul(d[2], d[2]));
}

/// Cells per axis for a frame without a box: cells of side `width` over the extent, widened
/// until there are at most `cap` (the CPU twin's `open_grid`).
__device__ void open_grid(const double ext[3], double width, long long cap, int n[3], double* inv_width) {
    double w = width;
    for (;;) {
        double nd[3];
#pragma unroll
        for (int k = 0; k < 3; ++k) nd[k] = floor(ext[k] / w) + 1.0;
        const double cells = nd[0] * nd[1] * nd[2];
        if (cells <= (double)cap) {
#pragma unroll
            for (int k = 0; k < 3; ++k) n[k] = (int)nd[k];
            break;
        }
        w *= fmax(1.25, cbrt(cells / (double)cap));
    }
    *inv_width = 1.0 / w;
}

/// Pass 1, frames without a box: one block per frame reduces the bounding box of its real,
/// finite atoms (min/max: exact in any order) and picks the frame's cell grid.
/// grid_dims [F, 3] (cells per axis), grid_origin [F, 4] (lower corner xyz, 1 / cell width).
extern "C" __global__ void __launch_bounds__(kThreads)
neighbor_frame_bounds(const float* __restrict__ pos, const unsigned char* __restrict__ mask, int frames, int atoms,
                      double cell_width, long long cell_cap, int* __restrict__ grid_dims,
                      double* __restrict__ grid_origin) {
    __shared__ float lo_part[3][kWarps], hi_part[3][kWarps];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int f = blockIdx.x; f < frames; f += gridDim.x) {
        float lo[3] = {INFINITY, INFINITY, INFINITY}, hi[3] = {-INFINITY, -INFINITY, -INFINITY};
        for (int a = threadIdx.x; a < atoms; a += blockDim.x) {
            const long long g = (long long)f * atoms + a;
            if (mask != nullptr && mask[g] == 0) continue;
            const float x[3] = {pos[3 * g], pos[3 * g + 1], pos[3 * g + 2]};
            if (!(is_finite(x[0]) && is_finite(x[1]) && is_finite(x[2]))) continue;
#pragma unroll
            for (int k = 0; k < 3; ++k) {
                lo[k] = fminf(lo[k], x[k]);
                hi[k] = fmaxf(hi[k], x[k]);
            }
        }
#pragma unroll
        for (int k = 0; k < 3; ++k) {
            for (int o = 16; o > 0; o >>= 1) {
                lo[k] = fminf(lo[k], __shfl_xor_sync(HIERMD_FULL_MASK, lo[k], o));
                hi[k] = fmaxf(hi[k], __shfl_xor_sync(HIERMD_FULL_MASK, hi[k], o));
            }
            if (lane == 0) {
                lo_part[k][warp] = lo[k];
                hi_part[k][warp] = hi[k];
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            double ext[3], origin[3];
#pragma unroll
            for (int k = 0; k < 3; ++k) {
                float l = lo_part[k][0], h = hi_part[k][0];
                for (int w = 1; w < kWarps; ++w) {
                    l = fminf(l, lo_part[k][w]);
                    h = fmaxf(h, hi_part[k][w]);
                }
                // A frame without real atoms gets one cell at the origin.
                const bool empty = !(l <= h);
                origin[k] = empty ? 0.0 : (double)l;
                ext[k] = empty ? 0.0 : (double)h - (double)l;
            }
            int n[3];
            double inv_width;
            open_grid(ext, cell_width, cell_cap, n, &inv_width);
#pragma unroll
            for (int k = 0; k < 3; ++k) {
                grid_dims[3 * f + k] = n[k];
                grid_origin[4 * f + k] = origin[k];
            }
            grid_origin[4 * f + 3] = inv_width;
        }
        // The partials are reused by the next frame.
        __syncthreads();
    }
}
HIERMD_EXPORT_KERNEL(neighbor_frame_bounds)

/// Pass 2, per atom: its cell (global index f * cell_cap + local; -1 for padding and bad atoms),
/// its wrap into the box (atom_image [N, 3]: floor of the fractional coordinates; 0 without a
/// box), the cell histogram, and the first bad atom of each frame into status[f].
/// With a box (box_inv [F, 9] non-null) cells split the fractional coordinates evenly; without,
/// they are cubes from the frame's lower corner (grid_origin).
extern "C" __global__ void neighbor_cell_assign(const float* __restrict__ pos, const unsigned char* __restrict__ mask,
                                                long long n_atoms, int atoms, const double* __restrict__ box_inv,
                                                const int* __restrict__ grid_dims,
                                                const double* __restrict__ grid_origin, long long cell_cap,
                                                int* __restrict__ atom_cell, int* __restrict__ atom_image,
                                                int* __restrict__ cell_count, int* __restrict__ status) {
    for (long long g = blockIdx.x * (long long)blockDim.x + threadIdx.x; g < n_atoms;
         g += (long long)gridDim.x * blockDim.x) {
        const int f = (int)(g / atoms), a = (int)(g - (long long)f * atoms);
        int cell = -1, wrap[3] = {0, 0, 0};
        if (mask == nullptr || mask[g] != 0) {
            const float x[3] = {pos[3 * g], pos[3 * g + 1], pos[3 * g + 2]};
            const int* n = grid_dims + 3 * f;
            int c[3] = {0, 0, 0};
            bool ok = is_finite(x[0]) && is_finite(x[1]) && is_finite(x[2]);
            if (!ok) {
                atomicMin(&status[f], a * 4 + kBadNonFinite);
            } else if (box_inv != nullptr) {
                const double* m = box_inv + 9 * f;
#pragma unroll
                for (int k = 0; k < 3; ++k) {
                    const double s = (double)x[0] * m[k] + (double)x[1] * m[3 + k] + (double)x[2] * m[6 + k];
                    if (!(fabs(s) < kMaxFractional)) {
                        ok = false;
                    } else {
                        const double fl = floor(s);
                        wrap[k] = (int)fl;
                        // s - floor(s) can round up to 1: the last cell, which wraps onto the first.
                        c[k] = min((int)((s - fl) * n[k]), n[k] - 1);
                    }
                }
                if (!ok) {
                    atomicMin(&status[f], a * 4 + kBadFarOutside);
                    wrap[0] = wrap[1] = wrap[2] = 0;
                }
            } else {
                const double* o = grid_origin + 4 * f;
#pragma unroll
                for (int k = 0; k < 3; ++k) {
                    const double t = floor(((double)x[k] - o[k]) * o[3]);
                    c[k] = (int)fmin(fmax(t, 0.0), (double)(n[k] - 1));
                }
            }
            if (ok) {
                cell = (int)(f * cell_cap) + (c[0] * n[1] + c[1]) * n[2] + c[2];
                atomicAdd(&cell_count[cell], 1);
            }
        }
        atom_cell[g] = cell;
#pragma unroll
        for (int k = 0; k < 3; ++k) atom_image[3 * g + k] = wrap[k];
    }
}
HIERMD_EXPORT_KERNEL(neighbor_cell_assign)

// ------------------------------------------------------------------------------------ scan --
// Exclusive scan of n int counts into out[0..n] (out[n] = the total), reduce-then-scan in three
// launches: tile sums, one block scanning the tile sums into tile offsets, then each tile's local
// scan plus its offset. Sums are 64-bit, so a total past 2^31 - 1 is reported (total_out), not
// wrapped. The order of additions is fixed by the tile shape: deterministic.

/// Inclusive scan over the block of one 64-bit value per thread; every thread gets its prefix,
/// and *block_total the sum. `part` holds kWarps values.
__device__ __forceinline__ long long block_inclusive_scan(long long v, long long* part, long long* block_total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    for (int o = 1; o < 32; o <<= 1) {
        const long long u = __shfl_up_sync(HIERMD_FULL_MASK, v, o);
        if (lane >= o) v += u;
    }
    if (lane == 31) part[warp] = v;
    __syncthreads();
    long long before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
        if (w < warp) before += part[w];
        total += part[w];
    }
    // `part` is reused by the caller's next call.
    __syncthreads();
    *block_total = total;
    return before + v;
}

/// Scan step 1: tile_sums[t] = sum of tile t's counts.
extern "C" __global__ void __launch_bounds__(kThreads)
neighbor_scan_tiles(const int* __restrict__ in, long long n, long long* __restrict__ tile_sums) {
    __shared__ long long part[kWarps];
    const long long tiles = (n + kScanTile - 1) / kScanTile;
    for (long long t = blockIdx.x; t < tiles; t += gridDim.x) {
        const long long base = t * kScanTile + (long long)threadIdx.x * kScanItems;
        long long s = 0;
#pragma unroll
        for (int k = 0; k < kScanItems; ++k)
            if (base + k < n) s += in[base + k];
        long long total;
        block_inclusive_scan(s, part, &total);
        if (threadIdx.x == 0) tile_sums[t] = total;
    }
}
HIERMD_EXPORT_KERNEL(neighbor_scan_tiles)

/// Scan step 2, one block: tile_sums become exclusive tile offsets; out[n] = the total (when it
/// fits an int), and total_out (if non-null) = the 64-bit total as two ints, low word first.
extern "C" __global__ void __launch_bounds__(kThreads)
neighbor_scan_offsets(long long* __restrict__ tile_sums, long long tiles, long long n, int* __restrict__ out,
                      int* __restrict__ total_out) {
    __shared__ long long part[kWarps];
    long long carry = 0;
    for (long long base = 0; base < tiles; base += blockDim.x) {
        const long long t = base + threadIdx.x;
        const long long v = t < tiles ? tile_sums[t] : 0;
        long long chunk;
        const long long incl = block_inclusive_scan(v, part, &chunk);
        if (t < tiles) tile_sums[t] = carry + incl - v;
        carry += chunk;
    }
    if (threadIdx.x == 0) {
        out[n] = carry <= 0x7fffffffLL ? (int)carry : -1;
        if (total_out != nullptr) {
            total_out[0] = (int)(unsigned)(carry & 0xffffffffLL);
            total_out[1] = (int)(carry >> 32);
        }
    }
}
HIERMD_EXPORT_KERNEL(neighbor_scan_offsets)

/// Scan step 3: out[k] = tile offset + the counts before k in its tile.
extern "C" __global__ void __launch_bounds__(kThreads)
neighbor_scan_apply(const int* __restrict__ in, long long n, const long long* __restrict__ tile_offsets,
                    int* __restrict__ out) {
    __shared__ long long part[kWarps];
    const long long tiles = (n + kScanTile - 1) / kScanTile;
    for (long long t = blockIdx.x; t < tiles; t += gridDim.x) {
        const long long base = t * kScanTile + (long long)threadIdx.x * kScanItems;
        int v[kScanItems];
        long long s = 0;
#pragma unroll
        for (int k = 0; k < kScanItems; ++k) {
            v[k] = base + k < n ? in[base + k] : 0;
            s += v[k];
        }
        long long total;
        long long run = tile_offsets[t] + block_inclusive_scan(s, part, &total) - s;
#pragma unroll
        for (int k = 0; k < kScanItems; ++k) {
            // Past 2^31 - 1 the values are meaningless; the host sees the total and stops.
            if (base + k < n) out[base + k] = (int)run;
            run += v[k];
        }
    }
}
HIERMD_EXPORT_KERNEL(neighbor_scan_apply)

// -------------------------------------------------------------------------------- sorting --

__device__ __forceinline__ void swap_entries(int* key, float* payload, int a, int b) {
    const int k = key[a];
    key[a] = key[b];
    key[b] = k;
    if (payload != nullptr) {
#pragma unroll
        for (int c = 0; c < 3; ++c) {
            const float p = payload[3 * a + c];
            payload[3 * a + c] = payload[3 * b + c];
            payload[3 * b + c] = p;
        }
    }
}

__device__ void sift_down(int* key, float* payload, int root, int end) {
    for (;;) {
        int child = 2 * root + 1;
        if (child >= end) return;
        if (child + 1 < end && key[child] < key[child + 1]) ++child;
        if (!(key[root] < key[child])) return;
        swap_entries(key, payload, root, child);
        root = child;
    }
}

/// Sorts key[0..len) ascending, moving payload (3 floats per key, or null) along. Keys are unique
/// (a row lists each neighbour once, a cell each atom once), so the result does not depend on
/// the algorithm: insertion sort for short runs, heapsort (O(len log len)) for long ones.
__device__ void sort_by_key(int* key, float* payload, int len) {
    if (len <= kInsertionSortMax) {
        for (int a = 1; a < len; ++a) {
            const int k = key[a];
            float p[3] = {0.0f, 0.0f, 0.0f};
            if (payload != nullptr)
                for (int c = 0; c < 3; ++c) p[c] = payload[3 * a + c];
            int b = a - 1;
            for (; b >= 0 && key[b] > k; --b) {
                key[b + 1] = key[b];
                if (payload != nullptr)
                    for (int c = 0; c < 3; ++c) payload[3 * (b + 1) + c] = payload[3 * b + c];
            }
            key[b + 1] = k;
            if (payload != nullptr)
                for (int c = 0; c < 3; ++c) payload[3 * (b + 1) + c] = p[c];
        }
        return;
    }
    for (int root = len / 2 - 1; root >= 0; --root) sift_down(key, payload, root, len);
    for (int end = len - 1; end > 0; --end) {
        swap_entries(key, payload, 0, end);
        sift_down(key, payload, 0, end);
    }
}

// ------------------------------------------------------------------------------ cell list --

/// Pass 4: counting sort by cell. Each atom claims a slot of its cell by decrementing the cell's
/// count (which ends at 0); the claim order is the scheduler's, and pass 5 sorts it away.
extern "C" __global__ void neighbor_cell_scatter(const int* __restrict__ atom_cell, long long n_atoms,
                                                 const int* __restrict__ cell_start, int* __restrict__ cell_count,
                                                 int* __restrict__ sorted_atom) {
    for (long long g = blockIdx.x * (long long)blockDim.x + threadIdx.x; g < n_atoms;
         g += (long long)gridDim.x * blockDim.x) {
        const int c = atom_cell[g];
        if (c >= 0) sorted_atom[cell_start[c] + atomicSub(&cell_count[c], 1) - 1] = (int)g;
    }
}
HIERMD_EXPORT_KERNEL(neighbor_cell_scatter)

/// Pass 5, per cell: sorts the cell's atoms by index and copies their positions and wraps into
/// slot order (sorted_xyz [V, 3], sorted_image [V, 3]), so the candidate scans read contiguously.
extern "C" __global__ void neighbor_cell_sort(const int* __restrict__ cell_start, long long cells,
                                              int* __restrict__ sorted_atom, const float* __restrict__ pos,
                                              const int* __restrict__ atom_image, float* __restrict__ sorted_xyz,
                                              int* __restrict__ sorted_image) {
    for (long long c = blockIdx.x * (long long)blockDim.x + threadIdx.x; c < cells;
         c += (long long)gridDim.x * blockDim.x) {
        const int begin = cell_start[c], end = cell_start[c + 1];
        sort_by_key(sorted_atom + begin, nullptr, end - begin);
        for (int s = begin; s < end; ++s) {
            const long long g = sorted_atom[s];
#pragma unroll
            for (int k = 0; k < 3; ++k) {
                sorted_xyz[3LL * s + k] = pos[3 * g + k];
                sorted_image[3LL * s + k] = atom_image[3 * g + k];
            }
        }
    }
}
HIERMD_EXPORT_KERNEL(neighbor_cell_sort)

/// What the candidate walk reads.
struct CellList {
    const int* cell_start;
    const int* sorted_atom;
    const float* sorted_xyz;
    const int* sorted_image;
    const int* atom_cell;
    const int* grid_dims;
    const double* box;  // [F, 9], null without a box
    int atoms;
    long long cell_cap;
    double cutoff2;
};

/// Neighbour cell u of an axis with n cells: false if it lies outside an open grid; with a box,
/// the wrapped cell w and the lattice step l (-1, 0 or 1) of that image. With n = 1 or 2 the
/// three offsets reach the same cell through different images, so no image is visited twice.
__device__ __forceinline__ bool neighbor_cell(int u, int n, bool periodic, int* w, int* l) {
    if (u < 0) {
        *w = u + n;
        *l = -1;
        return periodic;
    }
    if (u >= n) {
        *w = u - n;
        *l = 1;
        return periodic;
    }
    *w = u;
    *l = 0;
    return true;
}

/// Calls visit(j, shift) for every neighbour j of the atom in slot t, in cell order: the 27 cells
/// around its own (fewer at the edges of an open grid), each cell's atoms by index.
/// shift = m_a a + m_b b + m_c c with m = l - wrap_j + wrap_i: the image of x_j within the
/// cutoff of x_i (zero without a box).
template <class Visit>
__device__ __forceinline__ void for_each_neighbor(const CellList& cl, long long t, Visit visit) {
    const int i = cl.sorted_atom[t];
    const int f = i / cl.atoms;
    const int* n = cl.grid_dims + 3 * f;
    const int frame_base = (int)(f * cl.cell_cap);
    const int local = cl.atom_cell[i] - frame_base;
    const int cz = local % n[2], cy = (local / n[2]) % n[1], cx = local / (n[2] * n[1]);
    const float xi[3] = {cl.sorted_xyz[3 * t], cl.sorted_xyz[3 * t + 1], cl.sorted_xyz[3 * t + 2]};
    const int wi[3] = {cl.sorted_image[3 * t], cl.sorted_image[3 * t + 1], cl.sorted_image[3 * t + 2]};
    const double* box = cl.box != nullptr ? cl.box + 9 * f : nullptr;
    const bool periodic = box != nullptr;
    for (int dx = -1; dx <= 1; ++dx) {
        int wx, lx;
        if (!neighbor_cell(cx + dx, n[0], periodic, &wx, &lx)) continue;
        for (int dy = -1; dy <= 1; ++dy) {
            int wy, ly;
            if (!neighbor_cell(cy + dy, n[1], periodic, &wy, &ly)) continue;
            for (int dz = -1; dz <= 1; ++dz) {
                int wz, lz;
                if (!neighbor_cell(cz + dz, n[2], periodic, &wz, &lz)) continue;
                const int cell = frame_base + (wx * n[1] + wy) * n[2] + wz;
                const int end = cl.cell_start[cell + 1];
                for (int s = cl.cell_start[cell]; s < end; ++s) {
                    const int j = cl.sorted_atom[s];
                    if (j == i) continue;
                    const float xj[3] = {cl.sorted_xyz[3LL * s], cl.sorted_xyz[3LL * s + 1],
                                         cl.sorted_xyz[3LL * s + 2]};
                    double shift[3] = {0.0, 0.0, 0.0};
                    if (periodic) {
                        const int m[3] = {lx - cl.sorted_image[3LL * s] + wi[0],
                                          ly - cl.sorted_image[3LL * s + 1] + wi[1],
                                          lz - cl.sorted_image[3LL * s + 2] + wi[2]};
                        lattice_shift(m, box, shift);
                    }
                    if (pair_dist2(xi, xj, shift) < cl.cutoff2) visit(j, shift);
                }
            }
        }
    }
}

/// Pass 6: counts[i] = the number of neighbours of each real atom (slots 0..V, V = the number of
/// sorted atoms, read from cell_start[cells]). Padding rows keep the zero the host wrote.
extern "C" __global__ void neighbor_count(const int* __restrict__ cell_start, long long cells,
                                          const int* __restrict__ sorted_atom, const float* __restrict__ sorted_xyz,
                                          const int* __restrict__ sorted_image, const int* __restrict__ atom_cell,
                                          const int* __restrict__ grid_dims, const double* __restrict__ box,
                                          int atoms, long long cell_cap, double cutoff2, int* __restrict__ counts) {
    const CellList cl{cell_start, sorted_atom, sorted_xyz, sorted_image, atom_cell, grid_dims, box,
                      atoms,      cell_cap,    cutoff2};
    const long long slots = cell_start[cells];
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < slots;
         t += (long long)gridDim.x * blockDim.x) {
        int count = 0;
        for_each_neighbor(cl, t, [&](int, const double*) { ++count; });
        counts[sorted_atom[t]] = count;
    }
}
HIERMD_EXPORT_KERNEL(neighbor_count)

/// Pass 8: the same walk as neighbor_count writes row i's columns (and, with a box, the shifts
/// [E, 3] as f32), then sorts the row by column. The walk finds exactly the pairs it counted (the
/// same test on the same data), so the row is filled to its end; the bound check only keeps a
/// broken invariant from writing out of bounds.
extern "C" __global__ void neighbor_fill(const int* __restrict__ cell_start, long long cells,
                                         const int* __restrict__ sorted_atom, const float* __restrict__ sorted_xyz,
                                         const int* __restrict__ sorted_image, const int* __restrict__ atom_cell,
                                         const int* __restrict__ grid_dims, const double* __restrict__ box, int atoms,
                                         long long cell_cap, double cutoff2, const int* __restrict__ row_ptr,
                                         int* __restrict__ col, float* __restrict__ shift) {
    const CellList cl{cell_start, sorted_atom, sorted_xyz, sorted_image, atom_cell, grid_dims, box,
                      atoms,      cell_cap,    cutoff2};
    const long long slots = cell_start[cells];
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < slots;
         t += (long long)gridDim.x * blockDim.x) {
        const int i = sorted_atom[t];
        const int begin = row_ptr[i], end = row_ptr[i + 1];
        int e = begin;
        for_each_neighbor(cl, t, [&](int j, const double* sh) {
            if (e < end) {
                col[e] = j;
                if (shift != nullptr)
                    for (int k = 0; k < 3; ++k) shift[3LL * e + k] = (float)sh[k];
            }
            ++e;
        });
        sort_by_key(col + begin, shift != nullptr ? shift + 3LL * begin : nullptr, end - begin);
    }
}
HIERMD_EXPORT_KERNEL(neighbor_fill)

/// Pass 9, per row i: reverse[e] = the index of edge (i -> j) in row j, for each edge e = (j -> i)
/// of row i, by binary search (rows are sorted and list each neighbour once). The graph is
/// symmetric by construction (the pair test is exactly symmetric), so the mirror exists; -1 marks
/// a broken invariant, which HostNeighborList::validate (run by the tests) reports.
extern "C" __global__ void neighbor_reverse(const int* __restrict__ row_ptr, const int* __restrict__ col, long long rows,
                                            int* __restrict__ reverse) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < rows;
         i += (long long)gridDim.x * blockDim.x) {
        const int end = row_ptr[i + 1];
        for (int e = row_ptr[i]; e < end; ++e) {
            const int j = col[e];
            int lo = row_ptr[j], hi = row_ptr[j + 1];
            while (lo < hi) {
                const int mid = lo + (hi - lo) / 2;
                if (col[mid] < i)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            reverse[e] = lo < row_ptr[j + 1] && col[lo] == i ? lo : -1;
        }
    }
}
HIERMD_EXPORT_KERNEL(neighbor_reverse)
