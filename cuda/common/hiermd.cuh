// Portable pieces every kernel file includes: the same source compiles with nvcc to PTX (cuda)
// and with the host compiler against cuda/emu/emu.h (emu).
#pragma once

#ifdef HIERMD_EMU
// One C launcher per kernel: the Rust side calls it with the CUDA driver's argument layout
// (args[i] points at argument i), exactly as it calls cuLaunchKernel on a GPU.
#define HIERMD_EXPORT_KERNEL(name)                                                                 \
    extern "C" int hiermd_emu_launch_##name(const unsigned* grid, const unsigned* block,          \
                                            unsigned shared_bytes, void** args,                   \
                                            unsigned long long seed) {                            \
        return ::emu::launch(name, grid, block, shared_bytes, args, seed);                        \
    }
/// Dynamic shared memory of the running block, sized at launch. The emu poisons it before each
/// block.
template <class T>
__device__ __forceinline__ T* dynamic_shared() {
    return reinterpret_cast<T*>(::emu::dynamic_shared());
}
#else
#define HIERMD_EXPORT_KERNEL(name)
// Declared once at namespace scope: nvcc rejects a block-scope extern __shared__ array declared
// both in an extern "C" kernel and in a template of the same file.
extern __shared__ __align__(16) unsigned char hiermd_dynamic_shared_[];
/// Dynamic shared memory of the running block, sized at launch.
template <class T>
__device__ __forceinline__ T* dynamic_shared() {
    return reinterpret_cast<T*>(hiermd_dynamic_shared_);
}
#endif

/// `T* name` pointing at the block's dynamic shared memory.
#define HIERMD_DYNAMIC_SHARED(T, name) T* name = dynamic_shared<T>()

/// Full-warp mask for the *_sync intrinsics.
#define HIERMD_FULL_MASK 0xffffffffu

/// Sum over the 32 lanes of a full warp; every lane gets the result.
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(HIERMD_FULL_MASK, v, offset);
    return v;
}
