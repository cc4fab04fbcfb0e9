// Kernels that test the emu shim itself (tests/emu_shim.rs). They also build to PTX, so on a GPU
// machine the same tests check that the shim and the hardware agree.
#include "common/hiermd.cuh"

/// Each thread publishes its value in shared memory and, after the barrier, reads its right
/// neighbour's (cyclically over the block): correct only if the barrier orders all writes before
/// all reads.
extern "C" __global__ void shim_barrier_neighbour(const float* in, float* out) {
    HIERMD_DYNAMIC_SHARED(float, tile);
    const int t = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
    tile[t] = in[base + t];
    __syncthreads();
    out[base + t] = tile[(t + 1) % n];
}
HIERMD_EXPORT_KERNEL(shim_barrier_neighbour)

/// The same with the barrier deliberately left out (tests expect emu to catch it).
extern "C" __global__ void shim_barrier_neighbour_broken(const float* in, float* out) {
    HIERMD_DYNAMIC_SHARED(float, tile);
    const int t = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
    tile[t] = in[base + t];
    out[base + t] = tile[(t + 1) % n];
}
HIERMD_EXPORT_KERNEL(shim_barrier_neighbour_broken)

/// Several rounds of barriers: a prefix sum over the block by doubling (Hillis-Steele), which
/// needs two barriers per round; any missed or reordered barrier changes the result.
extern "C" __global__ void shim_block_scan(const int* in, int* out) {
    HIERMD_DYNAMIC_SHARED(int, buf);
    const int t = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
    buf[t] = in[base + t];
    __syncthreads();
    for (int d = 1; d < n; d <<= 1) {
        int add = t >= d ? buf[t - d] : 0;
        __syncthreads();
        buf[t] += add;
        __syncthreads();
    }
    out[base + t] = buf[t];
}
HIERMD_EXPORT_KERNEL(shim_block_scan)

/// Every shuffle flavour, full warp and width-8 segments. out has 8 values per thread.
extern "C" __global__ void shim_shuffles(const int* in, int* out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
    const int v = in[i];
    int* o = out + 8 * i;
    o[0] = __shfl_sync(HIERMD_FULL_MASK, v, (lane * 7 + 3) % 32);
    o[1] = __shfl_up_sync(HIERMD_FULL_MASK, v, 3);
    o[2] = __shfl_down_sync(HIERMD_FULL_MASK, v, 5);
    o[3] = __shfl_xor_sync(HIERMD_FULL_MASK, v, 9);
    o[4] = __shfl_sync(HIERMD_FULL_MASK, v, lane + 3, 8);
    o[5] = __shfl_up_sync(HIERMD_FULL_MASK, v, 2, 8);
    o[6] = __shfl_down_sync(HIERMD_FULL_MASK, v, 3, 8);
    o[7] = __shfl_xor_sync(HIERMD_FULL_MASK, v, 5, 8);
}
HIERMD_EXPORT_KERNEL(shim_shuffles)

/// Votes and a float warp sum. out has 4 values per thread.
extern "C" __global__ void shim_votes(const float* in, float* out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = in[i];
    const unsigned ballot = __ballot_sync(HIERMD_FULL_MASK, v > 0.0f);
    float* o = out + 4 * i;
    o[0] = (float)(ballot & 0xffffu);  // two halves: a float holds 24 exact bits
    o[1] = (float)(ballot >> 16);
    o[2] = (float)(__all_sync(HIERMD_FULL_MASK, v > -10.0f) * 2 + __any_sync(HIERMD_FULL_MASK, v > 2.5f));
    o[3] = warp_sum(v);
}
HIERMD_EXPORT_KERNEL(shim_votes)

/// Atomics across all blocks: a histogram (atomicAdd on int), a float total, a max and a count of
/// CAS-claimed slots (each slot claimed by exactly one thread).
extern "C" __global__ void shim_atomics(const int* bins_of, int n, int* hist, float* total, int* max_bin,
                                        int* claims, int nslots, int* claimed_by_count) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int b = bins_of[i];
    atomicAdd(&hist[b], 1);
    atomicAdd(total, 0.5f);
    atomicMax(max_bin, b);
    if (atomicCAS(&claims[i % nslots], -1, i) == -1) atomicAdd(claimed_by_count, 1);
}
HIERMD_EXPORT_KERNEL(shim_atomics)

/// Records the order in which the threads of each block pass a point, through an atomic ticket.
/// On emu the order is a seeded shuffle; on a GPU, whatever the hardware does.
extern "C" __global__ void shim_ticket_order(int* ticket, int* order) {
    const int t = threadIdx.x + blockIdx.x * blockDim.x;
    order[t] = atomicAdd(ticket, 1);
}
HIERMD_EXPORT_KERNEL(shim_ticket_order)

/// 3-D grid and block: each thread writes its coordinates at its own linear index.
extern "C" __global__ void shim_indexing(int* out) {
    const int bx = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const int nb = blockDim.x * blockDim.y * blockDim.z;
    const int tx = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    int* o = out + 6 * (bx * nb + tx);
    o[0] = blockIdx.x;
    o[1] = blockIdx.y;
    o[2] = blockIdx.z;
    o[3] = threadIdx.x;
    o[4] = threadIdx.y;
    o[5] = threadIdx.z;
}
HIERMD_EXPORT_KERNEL(shim_indexing)

/// Reads dynamic shared memory that nobody wrote: on emu it is poisoned (NaN).
extern "C" __global__ void shim_read_unwritten_shared(float* out) {
    HIERMD_DYNAMIC_SHARED(float, tile);
    out[blockIdx.x * blockDim.x + threadIdx.x] = tile[threadIdx.x];
}
HIERMD_EXPORT_KERNEL(shim_read_unwritten_shared)

/// A barrier inside a branch that only part of the block takes.
extern "C" __global__ void shim_divergent_barrier(int* out) {
    if (threadIdx.x < 16) __syncthreads();
    out[threadIdx.x] = 1;
}
HIERMD_EXPORT_KERNEL(shim_divergent_barrier)

/// A full-mask shuffle that half the warp never reaches.
extern "C" __global__ void shim_shuffle_deadlock(int* out) {
    if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_xor_sync(HIERMD_FULL_MASK, (int)threadIdx.x, 1);
}
HIERMD_EXPORT_KERNEL(shim_shuffle_deadlock)

// Deliberately broken variants of the row reduction of cuda/reduce.cu (tests expect emu to fail
// them). They repeat its block reduction with one defect each.
__device__ __forceinline__ float broken_block_sum(float v, float* partials, bool skip_barrier) {
    v = warp_sum(v);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
    if (lane == 0) partials[warp] = v;
    if (!skip_barrier) __syncthreads();
    float total = 0.0f;
    if (warp == 0) total = warp_sum(lane < nwarps ? partials[lane] : 0.0f);
    __syncthreads();
    return total;
}

/// row_sum_forward without the barrier between publishing and reading the warp partials.
extern "C" __global__ void row_sum_forward_missing_barrier(const float* x, float* out, int rows, int cols) {
    __shared__ float partials[32];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        float acc = 0.0f;
        for (int c = threadIdx.x; c < cols; c += blockDim.x) acc += x[(long long)r * cols + c];
        float total = broken_block_sum(acc, partials, true);
        if (threadIdx.x == 0) out[r] = total;
    }
}
HIERMD_EXPORT_KERNEL(row_sum_forward_missing_barrier)

/// row_sum_forward whose column loop stops one short.
extern "C" __global__ void row_sum_forward_off_by_one(const float* x, float* out, int rows, int cols) {
    __shared__ float partials[32];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        float acc = 0.0f;
        for (int c = threadIdx.x; c < cols - 1; c += blockDim.x) acc += x[(long long)r * cols + c];
        float total = broken_block_sum(acc, partials, false);
        if (threadIdx.x == 0) out[r] = total;
    }
}
HIERMD_EXPORT_KERNEL(row_sum_forward_off_by_one)
