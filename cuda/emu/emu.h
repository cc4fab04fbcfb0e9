// hiermd emu: runs CUDA kernels on the CPU, so that every kernel and every launch is exercised in
// CI without a GPU.
//
// Model: the blocks of a grid run one after another on the calling OS thread; the threads of a
// block run as fibers (one stack each) that the scheduler resumes in a seeded random order between
// barriers. A fiber runs until it reaches a barrier, a warp collective or the end of the kernel, so
// code that relies on an order between threads that CUDA does not promise (a missing
// __syncthreads, a read of shared memory another thread has not written yet) reads the wrong value
// in some orders, and the tests that compare with a CPU reference fail.
//
// Errors that CUDA leaves undefined or that hang a GPU (a barrier some threads never reach, a
// full-mask shuffle in a partial warp, lanes of one warp in different collectives) end the launch
// with a message instead, which the Rust side reads with hiermd_emu_last_error().
//
// This header is included before each cuda/*.cu file when the kernels are compiled for the host
// (build.rs passes -include cuda/emu/emu.h -DHIERMD_EMU); on nvcc it is never seen.
#pragma once

#ifndef HIERMD_EMU
#error "cuda/emu/emu.h is only for host (emu) builds of the kernels"
#endif

#include <algorithm>
#include <cmath>
#include <math.h>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------------------------
// CUDA keywords and built-in types.

#define __global__
// Device functions live in shared headers included by several .cu files; on the host they would
// be duplicate symbols unless inline.
#define __device__ inline
#define __host__
#define __forceinline__
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Static shared memory: one copy per OS thread, reused by every block that thread runs.
#define __shared__ static thread_local
#define __constant__ inline

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct uint3 {
    unsigned x, y, z;
};

namespace emu {

// ---------------------------------------------------------------------------------------------
// Fibers.

/// Stack size of one emulated thread. Kernels keep their register tiles on this stack.
inline constexpr size_t kStackBytes = 256 * 1024;
inline constexpr int kWarp = 32;
/// Bytes one lane may contribute to, or receive from, a warp collective.
inline constexpr size_t kSlotBytes = 256;

enum class State : uint8_t { Runnable, AtBarrier, AtWarp, Done };

struct Fiber {
    void* sp = nullptr;  // saved stack pointer (x86_64 switch)
#if !defined(__x86_64__)
    ucontext_t ctx;
#endif
    unsigned char* stack = nullptr;  // lowest usable address (a guard page lies below it)
    uint3 tid{0, 0, 0};
    unsigned linear = 0;  // linear thread index within the block
    State state = State::Runnable;
    // Warp collective bookkeeping.
    const char* warp_op = nullptr;
    unsigned warp_mask = 0;
};

struct WarpState {
    alignas(16) unsigned char in[kWarp][kSlotBytes];
    alignas(16) unsigned char out[kWarp][kSlotBytes];
};

struct Block;
using KernelBody = void (*)(void* closure);

struct Block {
    dim3 grid_dim, block_dim;
    uint3 block_idx{0, 0, 0};
    unsigned nthreads = 0;
    std::vector<Fiber> fibers;
    std::vector<WarpState> warps;
    unsigned char* dyn_shared = nullptr;
    size_t dyn_shared_bytes = 0;
    KernelBody body = nullptr;
    void* closure = nullptr;
    std::string error;  // set when the launch must stop
    uint64_t rng = 0;
};

namespace detail {

inline thread_local Block* tl_block = nullptr;
inline thread_local Fiber* tl_fiber = nullptr;
inline thread_local void* tl_sched_sp = nullptr;  // scheduler's saved stack pointer
#if !defined(__x86_64__)
inline thread_local ucontext_t tl_sched_ctx;
#endif
inline thread_local std::string tl_last_error;

// Stacks are kept per OS thread and reused across launches: mapping 256 fresh stacks per block
// would dominate the launch cost.
struct StackPool {
    std::vector<unsigned char*> stacks;
    ~StackPool() {
        long page = sysconf(_SC_PAGESIZE);
        for (unsigned char* s : stacks) munmap(s - page, kStackBytes + page);
    }
    unsigned char* get(size_t i) {
        long page = sysconf(_SC_PAGESIZE);
        while (stacks.size() <= i) {
            void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) {
                std::fprintf(stderr, "hiermd emu: cannot map a fiber stack\n");
                std::abort();
            }
            // Guard page: a kernel whose locals overflow the stack faults instead of silently
            // corrupting its neighbour's stack.
            mprotect(m, page, PROT_NONE);
            stacks.push_back(static_cast<unsigned char*>(m) + page);
        }
        return stacks[i];
    }
};
inline thread_local StackPool tl_stacks;

inline uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

[[noreturn]] inline void fiber_entry();

#if defined(__x86_64__)
// Saves the callee-saved registers of the System V ABI on the current stack, stores the stack
// pointer in *save, and resumes the context whose stack pointer is `next`. Written out because
// swapcontext makes a signal-mask system call on every switch, several times slower than a whole
// small kernel body. Defined weak in every translation unit that includes this header.
extern "C" void hiermd_emu_switch(void** save, void* next);
__asm__(
    ".text\n"
    ".weak hiermd_emu_switch\n"
    ".type hiermd_emu_switch,@function\n"
    "hiermd_emu_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $16, %rsp\n"
    "  stmxcsr 8(%rsp)\n"
    "  fnstcw (%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr 8(%rsp)\n"
    "  fldcw (%rsp)\n"
    "  addq $16, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size hiermd_emu_switch, .-hiermd_emu_switch\n");

inline void prepare(Fiber& f) {
    // Lay out the new stack as hiermd_emu_switch expects to find it: FPU control words, six
    // callee-saved registers, then the address it "returns" to. fiber_entry then starts with
    // rsp = 8 mod 16, as if it had been called.
    auto top = reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t(15);
    auto* slot = reinterpret_cast<uint64_t*>(top - 16);
    slot[0] = reinterpret_cast<uint64_t>(&fiber_entry);
    slot[1] = 0;
    uint64_t* regs = slot - 6;
    for (int i = 0; i < 6; ++i) regs[i] = 0;
    uint64_t* fpu = regs - 2;
    uint32_t mxcsr;
    uint16_t fcw;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
    __asm__ volatile("fnstcw %0" : "=m"(fcw));
    fpu[0] = fcw;
    fpu[1] = mxcsr;
    f.sp = fpu;
}
inline void to_fiber(Fiber& f) { hiermd_emu_switch(&tl_sched_sp, f.sp); }
inline void to_scheduler() { hiermd_emu_switch(&tl_fiber->sp, tl_sched_sp); }
#else
// Portable fallback: ucontext. Correct everywhere, slower per switch.
inline void ucontext_entry() { fiber_entry(); }
inline void prepare(Fiber& f) {
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, &ucontext_entry, 0);
}
inline void to_fiber(Fiber& f) { swapcontext(&tl_sched_ctx, &f.ctx); }
inline void to_scheduler() { swapcontext(&tl_fiber->ctx, &tl_sched_ctx); }
#endif

[[noreturn]] inline void fiber_entry() {
    Block* b = tl_block;
    b->body(b->closure);
    tl_fiber->state = State::Done;
    to_scheduler();
    std::abort();  // a finished fiber is never resumed
}

/// Stops the launch: records the first error and returns to the scheduler for good.
[[noreturn]] inline void fail(const std::string& msg) {
    Block* b = tl_block;
    if (b->error.empty()) {
        char where[96];
        std::snprintf(where, sizeof where, " (block %u,%u,%u thread %u,%u,%u)", b->block_idx.x,
                      b->block_idx.y, b->block_idx.z, tl_fiber->tid.x, tl_fiber->tid.y,
                      tl_fiber->tid.z);
        b->error = msg + where;
    }
    to_scheduler();
    std::abort();
}

inline const char* state_name(State s) {
    switch (s) {
        case State::Runnable: return "running";
        case State::AtBarrier: return "at __syncthreads";
        case State::AtWarp: return "in a warp collective";
        case State::Done: return "exited";
    }
    return "?";
}

/// Lanes of warp `w` that exist in this block (a partial last warp has fewer than 32).
inline unsigned present_lanes(const Block& b, unsigned w) {
    unsigned first = w * kWarp;
    unsigned n = std::min<unsigned>(kWarp, b.nthreads - first);
    return n == 32 ? 0xffffffffu : ((1u << n) - 1u);
}

/// Runs one block to completion. Returns false (with b.error set) when the launch must stop.
inline bool run_block(Block& b) {
    std::vector<unsigned> order(b.nthreads);
    for (unsigned i = 0; i < b.nthreads; ++i) {
        Fiber& f = b.fibers[i];
        f.state = State::Runnable;
        f.warp_op = nullptr;
        prepare(f);
        order[i] = i;
    }
    for (;;) {
        // One round: resume every runnable fiber once, in a fresh random order. A fiber released
        // from a warp collective during the round is resumed in the next one.
        for (unsigned i = b.nthreads; i > 1; --i) {
            unsigned j = static_cast<unsigned>(splitmix(b.rng) % i);
            std::swap(order[i - 1], order[j]);
        }
        bool progressed = false;
        for (unsigned idx : order) {
            Fiber& f = b.fibers[idx];
            if (f.state != State::Runnable) continue;
            tl_fiber = &f;
            to_fiber(f);
            tl_fiber = nullptr;
            progressed = true;
            if (!b.error.empty()) return false;
        }
        if (progressed) continue;
        unsigned done = 0, barrier = 0, warp = 0;
        for (const Fiber& f : b.fibers) {
            done += f.state == State::Done;
            barrier += f.state == State::AtBarrier;
            warp += f.state == State::AtWarp;
        }
        if (done == b.nthreads) return true;
        if (warp == 0 && done == 0) {
            for (Fiber& f : b.fibers) f.state = State::Runnable;  // every thread reached the barrier
            continue;
        }
        char msg[256];
        if (warp == 0) {
            std::snprintf(msg, sizeof msg,
                          "__syncthreads not reached by every thread of the block: %u threads wait "
                          "at it, %u have exited (a barrier in divergent code)",
                          barrier, done);
        } else {
            std::snprintf(msg, sizeof msg,
                          "deadlock: %u threads wait in a warp collective whose other lanes never "
                          "arrive (%u at __syncthreads, %u exited)",
                          warp, barrier, done);
        }
        b.error = msg;
        for (const Fiber& f : b.fibers) {
            if (f.state == State::AtWarp) {
                std::snprintf(msg, sizeof msg, "; first waiting: thread %u in %s (mask 0x%08x)",
                              f.linear, f.warp_op, f.warp_mask);
                b.error += msg;
                break;
            }
        }
        return false;
    }
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Built-in variables and synchronisation, as the kernels see them.

inline const uint3& thread_idx() { return detail::tl_fiber->tid; }
inline const uint3& block_idx() { return detail::tl_block->block_idx; }
inline const dim3& block_dim() { return detail::tl_block->block_dim; }
inline const dim3& grid_dim() { return detail::tl_block->grid_dim; }
inline unsigned lane_id() { return detail::tl_fiber->linear % kWarp; }
inline unsigned warp_id() { return detail::tl_fiber->linear / kWarp; }

inline void syncthreads() {
    detail::tl_fiber->state = State::AtBarrier;
    detail::to_scheduler();
}

/// The building block of every warp-level operation (shuffles, votes, mma.sync, ldmatrix): the
/// calling lane deposits `in` and waits until every lane named in `mask` has called a collective
/// with the same `op` and mask. The last lane to arrive runs `combine(in[32], out[32])` once;
/// then each lane receives its own `out`. Slots of lanes outside `mask` are not read.
template <class In, class Out, class Combine>
Out warp_collective(unsigned mask, const char* op, const In& in, Combine combine) {
    static_assert(sizeof(In) <= kSlotBytes && sizeof(Out) <= kSlotBytes, "collective slot too small");
    static_assert(std::is_trivially_copyable_v<In> && std::is_trivially_copyable_v<Out>);
    using namespace detail;
    Block& b = *tl_block;
    Fiber& me = *tl_fiber;
    unsigned lane = me.linear % kWarp, w = me.linear / kWarp;
    unsigned present = present_lanes(b, w);
    char msg[200];
    if (!(mask & (1u << lane))) {
        std::snprintf(msg, sizeof msg, "%s called by lane %u with mask 0x%08x that excludes it", op,
                      lane, mask);
        fail(msg);
    }
    if (mask & ~present) {
        std::snprintf(msg, sizeof msg,
                      "%s with mask 0x%08x in a partial warp whose lanes are 0x%08x (block size %u "
                      "is not a multiple of 32)",
                      op, mask, present, b.nthreads);
        fail(msg);
    }
    WarpState& ws = b.warps[w];
    std::memcpy(ws.in[lane], &in, sizeof(In));
    me.warp_op = op;
    me.warp_mask = mask;
    me.state = State::AtWarp;
    bool all = true;
    for (unsigned l = 0; l < kWarp; ++l) {
        if (!(mask & (1u << l))) continue;
        Fiber& o = b.fibers[w * kWarp + l];
        if (o.state == State::AtWarp) {
            if (o.warp_op != op && std::strcmp(o.warp_op, op) != 0) {
                std::snprintf(msg, sizeof msg, "lanes of one warp in different collectives: %s and %s",
                              op, o.warp_op);
                fail(msg);
            }
            if (o.warp_mask != mask) {
                std::snprintf(msg, sizeof msg, "%s called with different masks in one warp: 0x%08x and 0x%08x",
                              op, mask, o.warp_mask);
                fail(msg);
            }
        } else if (o.state == State::Runnable) {
            all = false;
        } else {
            std::snprintf(msg, sizeof msg, "%s waits for lane %u, which is %s", op, l,
                          state_name(o.state));
            fail(msg);
        }
    }
    if (all) {
        In ins[kWarp];
        Out outs[kWarp];
        for (unsigned l = 0; l < kWarp; ++l) {
            if (mask & (1u << l)) std::memcpy(&ins[l], ws.in[l], sizeof(In));
            else std::memset(static_cast<void*>(&ins[l]), 0, sizeof(In));
        }
        combine(ins, outs);
        for (unsigned l = 0; l < kWarp; ++l) {
            if (!(mask & (1u << l))) continue;
            std::memcpy(ws.out[l], &outs[l], sizeof(Out));
            Fiber& o = b.fibers[w * kWarp + l];
            o.state = State::Runnable;
            o.warp_op = nullptr;
        }
    }
    // Even the last lane yields, so that the other lanes may run first.
    to_scheduler();
    Out result;
    std::memcpy(&result, ws.out[lane], sizeof(Out));
    return result;
}

/// Dynamic shared memory of the running block.
inline unsigned char* dynamic_shared() { return detail::tl_block->dyn_shared; }

// ---------------------------------------------------------------------------------------------
// Launch.

/// Status of the last launch on this OS thread: 0 ok, 1 the launch was stopped (see message).
inline int launch_impl(KernelBody body, void* closure, const unsigned grid[3], const unsigned block[3],
                       unsigned shared_bytes, unsigned long long seed) {
    using namespace detail;
    tl_last_error.clear();
    unsigned nthreads = block[0] * block[1] * block[2];
    if (nthreads == 0 || nthreads > 1024 || block[2] > 64 || grid[0] == 0 || grid[1] == 0 ||
        grid[2] == 0 || grid[1] > 65535 || grid[2] > 65535) {
        char msg[160];
        std::snprintf(msg, sizeof msg, "invalid launch configuration: grid (%u,%u,%u) block (%u,%u,%u)",
                      grid[0], grid[1], grid[2], block[0], block[1], block[2]);
        tl_last_error = msg;
        return 1;
    }
    if (shared_bytes > 227 * 1024) {
        tl_last_error = "dynamic shared memory above the 227 KiB a block can have";
        return 1;
    }
    if (tl_block != nullptr) {
        tl_last_error = "a kernel launched another kernel (dynamic parallelism is not supported)";
        return 1;
    }
    Block b;
    b.grid_dim = {grid[0], grid[1], grid[2]};
    b.block_dim = {block[0], block[1], block[2]};
    b.nthreads = nthreads;
    b.fibers.resize(nthreads);
    b.warps.resize((nthreads + kWarp - 1) / kWarp);
    b.body = body;
    b.closure = closure;
    b.rng = seed;
    std::vector<unsigned char> dyn(shared_bytes + 16);
    b.dyn_shared = dyn.data();
    b.dyn_shared_bytes = shared_bytes;
    for (unsigned i = 0; i < nthreads; ++i) {
        Fiber& f = b.fibers[i];
        f.stack = tl_stacks.get(i);
        f.linear = i;
        f.tid = {i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
    }
    tl_block = &b;
    bool ok = true;
    for (unsigned z = 0; z < grid[2] && ok; ++z)
        for (unsigned y = 0; y < grid[1] && ok; ++y)
            for (unsigned x = 0; x < grid[0] && ok; ++x) {
                b.block_idx = {x, y, z};
                // Poison dynamic shared memory: a kernel that reads it before writing sees NaNs.
                std::memset(b.dyn_shared, 0xff, shared_bytes);
                ok = run_block(b);
            }
    tl_block = nullptr;
    if (!ok) {
        tl_last_error = b.error;
        return 1;
    }
    return 0;
}

/// Unpacks the CUDA driver's argument array (args[i] points at the i-th argument's value) into a
/// call of the kernel, so that the Rust side has one launch path for cuda and emu.
template <class... Args, size_t... I>
void call_kernel(void (*k)(Args...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<Args>*>(args[I])...);
}

template <class... Args>
int launch(void (*k)(Args...), const unsigned grid[3], const unsigned block[3], unsigned shared_bytes,
           void** args, unsigned long long seed) {
    struct Closure {
        void (*k)(Args...);
        void** args;
    } c{k, args};
    KernelBody body = [](void* p) {
        auto* c = static_cast<Closure*>(p);
        call_kernel(c->k, c->args, std::index_sequence_for<Args...>{});
    };
    return launch_impl(body, &c, grid, block, shared_bytes, seed);
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())
#define warpSize 32

inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    struct None {};
    ::emu::warp_collective<None, None>(mask, "__syncwarp", None{}, [](const None*, None*) {});
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------------------------------------
// Warp shuffles and votes. Width is a power of two <= 32 that splits the warp into segments; a
// source lane outside the caller's segment reads the caller's own value, as on the GPU.

namespace emu::detail {
enum class Shfl { Idx, Up, Down, Xor };
template <class T>
T shfl(unsigned mask, const char* op, T v, Shfl mode, int arg, int width) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 64 bits");
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
        fail(std::string(op) + ": width must be a power of two no larger than 32");
    struct In {
        T v;
        int arg;
    };
    struct Out {
        T v;
    };
    Out r = warp_collective<In, Out>(mask, op, In{v, arg}, [&](const In* in, Out* out) {
        for (int l = 0; l < 32; ++l) {
            if (!(mask & (1u << l))) continue;
            int seg = l & ~(width - 1), a = in[l].arg, src = l;
            switch (mode) {
                case Shfl::Idx: src = seg + (a & (width - 1)); break;
                case Shfl::Up: src = l - a >= seg ? l - a : l; break;
                case Shfl::Down: src = l + a < seg + width ? l + a : l; break;
                case Shfl::Xor: src = (l ^ a) < seg + width ? (l ^ a) : l; break;
            }
            if (mask & (1u << src)) {
                out[l].v = in[src].v;
            } else {
                // Reading a lane that is not in the mask is undefined on the GPU: hand back
                // all-ones bits (NaN for floats) so that a kernel relying on it fails its test.
                std::memset(static_cast<void*>(&out[l].v), 0xff, sizeof(T));
            }
        }
    });
    return r.v;
}
}  // namespace emu::detail

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return ::emu::detail::shfl(mask, "__shfl_sync", v, ::emu::detail::Shfl::Idx, src, width);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return ::emu::detail::shfl(mask, "__shfl_up_sync", v, ::emu::detail::Shfl::Up, int(d), width);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return ::emu::detail::shfl(mask, "__shfl_down_sync", v, ::emu::detail::Shfl::Down, int(d), width);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
    return ::emu::detail::shfl(mask, "__shfl_xor_sync", v, ::emu::detail::Shfl::Xor, m, width);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
    return ::emu::warp_collective<int, unsigned>(mask, "__ballot_sync", pred, [&](const int* in, unsigned* out) {
        unsigned bits = 0;
        for (unsigned l = 0; l < 32; ++l)
            if ((mask & (1u << l)) && in[l]) bits |= 1u << l;
        for (unsigned l = 0; l < 32; ++l) out[l] = bits;
    });
}
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }

// ---------------------------------------------------------------------------------------------
// Atomics. Blocks run on one OS thread, but the builtins keep them correct should several host
// threads ever run blocks of one launch.

inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
// Read-modify-write by compare-and-swap, as CUDA itself does for the operations it lacks.
template <class F, class Op>
inline F emu_atomic_rmw(F* p, Op op) {
    F old;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    F want;
    do {
        want = op(old);
    } while (!__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
}
inline float atomicAdd(float* p, float v) { return emu_atomic_rmw(p, [v](float o) { return o + v; }); }
inline double atomicAdd(double* p, double v) { return emu_atomic_rmw(p, [v](double o) { return o + v; }); }
inline int atomicSub(int* p, int v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicSub(unsigned* p, unsigned v) { return __atomic_fetch_sub(p, v, __ATOMIC_RELAXED); }
inline int atomicMax(int* p, int v) { return emu_atomic_rmw(p, [v](int o) { return o > v ? o : v; }); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return emu_atomic_rmw(p, [v](unsigned o) { return o > v ? o : v; }); }
inline int atomicMin(int* p, int v) { return emu_atomic_rmw(p, [v](int o) { return o < v ? o : v; }); }
inline unsigned atomicMin(unsigned* p, unsigned v) { return emu_atomic_rmw(p, [v](unsigned o) { return o < v ? o : v; }); }
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
inline float atomicExch(float* p, float v) { return emu_atomic_rmw(p, [v](float) { return v; }); }
template <class T>
inline T emu_atomic_cas(T* p, T cmp, T v) {
    __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
    return cmp;
}
inline int atomicCAS(int* p, int cmp, int v) { return emu_atomic_cas(p, cmp, v); }
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) { return emu_atomic_cas(p, cmp, v); }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp, unsigned long long v) {
    return emu_atomic_cas(p, cmp, v);
}

// ---------------------------------------------------------------------------------------------
// Device math: the CUDA names, computed in the same precision on the host. The fast intrinsics
// (__expf, ...) are less accurate on the GPU than here; the tests' tolerances allow for that.

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float exp2f(float x) { return std::exp2(x); }
inline float __exp2f(float x) { return std::exp2(x); }
inline int __float2int_rn(float x) { return int(std::nearbyint(x)); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
// expf, logf, sqrtf, fmaxf, fmaf, tanhf, ... come from <math.h> in the global namespace, as on
// the GPU.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
template <class T>
inline T __ldg(const T* p) { return *p; }

/// The status and message of the last launch on the calling OS thread.
extern "C" __attribute__((weak)) const char* hiermd_emu_last_error() {
    return ::emu::detail::tl_last_error.c_str();
}
