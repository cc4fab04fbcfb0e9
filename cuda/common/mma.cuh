// Tensor-core and inline-PTX intrinsics for the GEMM and attention kernels: mma.sync, ldmatrix,
// cvt.rna.tf32.f32, and the 16-bit float types with their conversions.
//
// On nvcc every wrapper is one PTX instruction in inline asm. On emu (HIERMD_EMU) each warp-wide
// instruction is an emu::warp_collective whose combine step rebuilds the whole matrices from the
// 32 lanes' registers by the PTX ISA fragment layouts and hands each lane its registers back, so a
// kernel that fills a fragment in the wrong order computes a wrong product on emu exactly as on the
// GPU. tests/emu_mma.rs checks these layouts against a description written separately in Rust;
// on a GPU the same tests check them against the hardware.
//
// Layouts, from the PTX ISA (9.0), chapter 9.7.14.5 "Matrix multiply-accumulate operation using
// mma instruction". With groupID g = %laneid >> 2 and threadID_in_group t = %laneid % 4:
//   9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type", .f16/.bf16:
//     A (16x16, .row), 4 .b32 = a0..a7, low half first:
//       a0,a1 (row g,   cols 2t, 2t+1)      a2,a3 (row g+8, cols 2t, 2t+1)
//       a4,a5 (row g,   cols 2t+8, 2t+9)    a6,a7 (row g+8, cols 2t+8, 2t+9)
//     B (16x8, .col), 2 .b32 = b0..b3: b0,b1 (rows 2t, 2t+1, col g)  b2,b3 (rows 2t+8, 2t+9, col g)
//     C/D (16x8), 4 .f32: c0,c1 (row g, cols 2t, 2t+1)  c2,c3 (row g+8, cols 2t, 2t+1)
//   9.7.14.5.7 "Matrix Fragments for mma.m16n8k8", .tf32:
//     A (16x8), 4 .b32: a0 (g, t)  a1 (g+8, t)  a2 (g, t+4)  a3 (g+8, t+4)
//     B (8x8), 2 .b32: b0 (row t, col g)  b1 (row t+4, col g)
//     C/D: as for m16n8k16.
//   9.7.14.5.15 "Warp-level matrix load instruction: ldmatrix", .m8n8 .b16: lanes 8i..8i+7 give
//     the addresses of rows 0..7 of matrix i; of each matrix, lane l receives in register i the
//     elements (row l/4, cols 2(l%4) and 2(l%4)+1), low half first; with .trans, the same
//     positions of the transposed matrix.
#pragma once

#ifdef HIERMD_EMU
#include <cstdint>
#include <cstring>
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#endif

// ---------------------------------------------------------------------------------------------
// 16-bit float types. nvcc has its own; the emu gets bit-pattern structs and conversions that
// reproduce the GPU's results bit for bit (round to nearest even, subnormals kept, overflow to
// infinity, NaN to the canonical 0x7fff that cvt.rn.f16.f32 and cvt.rn.bf16.f32 produce).

#ifdef HIERMD_EMU

struct __half {
    uint16_t __x;
};
struct __nv_bfloat16 {
    uint16_t __x;
};

__device__ __forceinline__ unsigned short __half_as_ushort(__half h) { return h.__x; }
__device__ __forceinline__ __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
__device__ __forceinline__ unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
__device__ __forceinline__ __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) {
    return __nv_bfloat16{bits};
}

namespace hiermd_emu_fp {

inline uint32_t f32_bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}
inline float f32_from_bits(uint32_t u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

/// Rounds `v >> shift` to nearest, ties to even, from the bits shifted out.
inline uint32_t shift_right_rne(uint32_t v, unsigned shift) {
    const uint32_t kept = v >> shift;
    const uint32_t rest = v & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    return kept + ((rest > half || (rest == half && (kept & 1u))) ? 1u : 0u);
}

inline uint16_t f32_to_f16_bits(float x) {
    const uint32_t u = f32_bits(x);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) return 0x7fffu;
    // 0x477ff000 is 65520, halfway between the largest half 65504 (odd mantissa) and 2^16: ties
    // to even go up, so it and everything above become infinity.
    if (mag >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);
    if (mag >= 0x38800000u) {
        // A normal half: rebias the exponent (127 -> 15) and round away 13 mantissa bits. A carry
        // out of the mantissa correctly bumps the exponent.
        return static_cast<uint16_t>(sign | shift_right_rne(mag - 0x38000000u, 13));
    }
    // 2^-25 is half the smallest subnormal; the tie goes to the even result, zero.
    if (mag <= 0x33000000u) return static_cast<uint16_t>(sign);
    // Subnormal half: count in units of 2^-24. The f32 here is normal (exponent 102..112), so its
    // value is (1.mantissa) 2^(e-127) = significand * 2^(e-150) = (significand >> (126-e)) 2^-24.
    const uint32_t e = mag >> 23;
    const uint32_t significand = (mag & 0x7fffffu) | 0x800000u;
    return static_cast<uint16_t>(sign | shift_right_rne(significand, 126u - e));
}

inline float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu;
    const uint32_t m = h & 0x3ffu;
    if (e == 0x1fu) return f32_from_bits(m ? 0x7fffffffu : (sign | 0x7f800000u));
    if (e == 0) {
        // Subnormal or zero: m * 2^-24, exact in f32.
        const float v = static_cast<float>(m) * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
}

inline uint16_t f32_to_bf16_bits(float x) {
    const uint32_t u = f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    // Round the low 16 bits away, ties to even; carries ripple into the exponent, so the largest
    // values round to infinity as they should.
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

}  // namespace hiermd_emu_fp

__device__ __forceinline__ __half __float2half_rn(float x) {
    return __half{hiermd_emu_fp::f32_to_f16_bits(x)};
}
__device__ __forceinline__ __half __float2half(float x) { return __float2half_rn(x); }
__device__ __forceinline__ float __half2float(__half h) { return hiermd_emu_fp::f16_bits_to_f32(h.__x); }
__device__ __forceinline__ __nv_bfloat16 __float2bfloat16_rn(float x) {
    return __nv_bfloat16{hiermd_emu_fp::f32_to_bf16_bits(x)};
}
__device__ __forceinline__ __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ float __bfloat162float(__nv_bfloat16 h) {
    return hiermd_emu_fp::bf16_bits_to_f32(h.__x);
}

#endif  // HIERMD_EMU

/// Two 16-bit values in one .b32 register as mma and ldmatrix hold them: `lo` (the element with
/// the lower index) in bits 0..15, `hi` in bits 16..31.
__device__ __forceinline__ uint32_t pack_b16x2(__half lo, __half hi) {
    return static_cast<uint32_t>(__half_as_ushort(lo)) | (static_cast<uint32_t>(__half_as_ushort(hi)) << 16);
}
__device__ __forceinline__ uint32_t pack_b16x2(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return static_cast<uint32_t>(__bfloat16_as_ushort(lo)) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(hi)) << 16);
}
/// Rounds two floats to f16 (nearest even) and packs them as pack_b16x2 does.
__device__ __forceinline__ uint32_t pack_f32_to_f16x2_rn(float lo, float hi) {
    return pack_b16x2(__float2half_rn(lo), __float2half_rn(hi));
}
/// Rounds two floats to bf16 (nearest even) and packs them as pack_b16x2 does.
__device__ __forceinline__ uint32_t pack_f32_to_bf16x2_rn(float lo, float hi) {
    return pack_b16x2(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
}

// ---------------------------------------------------------------------------------------------
// Emulation of the warp-wide instructions.

#ifdef HIERMD_EMU
namespace hiermd_emu_mma {

struct MmaIn {
    uint32_t a[4];
    uint32_t b[2];
    float c[4];
};
struct MmaOut {
    float d[4];
};

enum class Operand { F16, BF16, TF32 };

inline double b16_value(Operand kind, uint32_t reg, unsigned which) {
    const uint16_t bits = static_cast<uint16_t>(reg >> (16 * which));
    return kind == Operand::F16 ? hiermd_emu_fp::f16_bits_to_f32(bits) : hiermd_emu_fp::bf16_bits_to_f32(bits);
}

/// The tensor cores read a .tf32 operand from an f32 container and ignore its 13 low mantissa bits
/// (sign, 8 exponent bits and 10 mantissa bits remain): the value is truncated, not rounded, which
/// is why kernels round with cvt.rna.tf32.f32 first.
inline double tf32_value(uint32_t reg) { return hiermd_emu_fp::f32_from_bits(reg & 0xffffe000u); }

/// D = A B + C for one m16n8k16 (f16/bf16) or m16n8k8 (tf32) tile of a warp.
///
/// Accumulation: every product of two f16, bf16 or tf32 values is exact in double (at most 22
/// significant bits), and so is their sum in nearly every case (operands would have to span more
/// than ~2^30 in magnitude to lose a bit). The sum starts from C, adds k = 0..K-1 in order, and is
/// rounded to f32 once. The PTX ISA leaves the order and rounding of the accumulation unspecified
/// and the hardware truncates while aligning partial sums, so no emulation can match it bit for
/// bit; this choice gives the correctly rounded result, independent of any order, which is the
/// tightest reference a test can compare the GPU's result with.
inline void mma_combine(Operand kind, const MmaIn* in, MmaOut* out) {
    const unsigned K = kind == Operand::TF32 ? 8 : 16;
    double A[16][16], B[16][8], C[16][8];
    for (unsigned lane = 0; lane < 32; ++lane) {
        const unsigned g = lane >> 2, t = lane & 3;
        if (kind == Operand::TF32) {
            // 9.7.14.5.7, .tf32: registers a0..a3 walk rows (g, g+8) first, then columns (t, t+4).
            for (unsigned r = 0; r < 4; ++r) A[g + 8 * (r & 1)][t + 4 * (r >> 1)] = tf32_value(in[lane].a[r]);
            for (unsigned r = 0; r < 2; ++r) B[t + 4 * r][g] = tf32_value(in[lane].b[r]);
        } else {
            // 9.7.14.5.8: register r holds a pair of adjacent columns; r & 1 picks row g or g+8,
            // r & 2 the column half (0..7 or 8..15).
            for (unsigned r = 0; r < 4; ++r)
                for (unsigned h = 0; h < 2; ++h)
                    A[g + 8 * (r & 1)][2 * t + h + 8 * (r >> 1)] = b16_value(kind, in[lane].a[r], h);
            // B is .col: register r holds the pair of adjacent rows (k) 2t, 2t+1 of k-half r.
            for (unsigned r = 0; r < 2; ++r)
                for (unsigned h = 0; h < 2; ++h) B[2 * t + h + 8 * r][g] = b16_value(kind, in[lane].b[r], h);
        }
        for (unsigned i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = in[lane].c[i];
    }
    for (unsigned lane = 0; lane < 32; ++lane) {
        const unsigned g = lane >> 2, t = lane & 3;
        for (unsigned i = 0; i < 4; ++i) {
            const unsigned m = g + 8 * (i >> 1), n = 2 * t + (i & 1);
            double acc = C[m][n];
            for (unsigned k = 0; k < K; ++k) acc += A[m][k] * B[k][n];
            out[lane].d[i] = static_cast<float>(acc);
        }
    }
}

inline void mma(const char* op, Operand kind, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                const float (&c)[4]) {
    MmaIn in;
    for (int i = 0; i < 4; ++i) in.a[i] = a[i];
    for (int i = 0; i < 2; ++i) in.b[i] = b[i];
    for (int i = 0; i < 4; ++i) in.c[i] = c[i];
    // mma.sync.aligned: the whole warp, converged, with the same instruction.
    const MmaOut r = ::emu::warp_collective<MmaIn, MmaOut>(
        0xffffffffu, op, in, [kind](const MmaIn* ins, MmaOut* outs) { mma_combine(kind, ins, outs); });
    // d may alias c (accumulating in place): it is written only now, after c was read.
    for (int i = 0; i < 4; ++i) d[i] = r.d[i];
}

/// The 16 bytes (8 .b16 elements) of one matrix row, read by the lane that supplies its address.
struct LdRow {
    uint32_t w[4];
};
struct LdOut {
    uint32_t r[4];
};

inline uint32_t row_element(const LdRow& row, unsigned j) { return (row.w[j >> 1] >> (16 * (j & 1))) & 0xffffu; }

template <int N, bool Trans>
inline void ldmatrix(const char* op, uint32_t (&r)[N], const void* row_ptr) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
    const unsigned lane = ::emu::lane_id();
    LdRow in{};
    // Only lanes 0..8N-1 supply addresses; the others' are ignored (sm_80 and newer), as they are
    // here, so they may hold anything.
    if (lane < 8u * N) {
        const auto addr = reinterpret_cast<uintptr_t>(row_ptr);
        char msg[160];
        if (addr % 16 != 0) {
            std::snprintf(msg, sizeof msg, "%s: lane %u's row address %p is not 16-byte aligned", op, lane, row_ptr);
            ::emu::detail::fail(msg);
        }
        const ::emu::Block& b = *::emu::detail::tl_block;
        const auto dyn = reinterpret_cast<uintptr_t>(b.dyn_shared);
        if (addr >= dyn && addr < dyn + b.dyn_shared_bytes + 16 && addr + 16 > dyn + b.dyn_shared_bytes) {
            std::snprintf(msg, sizeof msg, "%s: lane %u's row at byte %zu runs past the %zu bytes of dynamic shared memory",
                          op, lane, static_cast<size_t>(addr - dyn), b.dyn_shared_bytes);
            ::emu::detail::fail(msg);
        }
        // Read at the lane's own arrival, not when the last lane arrives: ldmatrix is a weak load,
        // so a row another thread writes without a barrier in between is read stale in some
        // thread orders, and the kernel's test fails as it might on the GPU.
        std::memcpy(&in, row_ptr, sizeof in);
    }
    const LdOut o = ::emu::warp_collective<LdRow, LdOut>(0xffffffffu, op, in, [](const LdRow* rows, LdOut* out) {
        for (unsigned l = 0; l < 32; ++l) {
            const unsigned g = l >> 2, t = l & 3;
            for (unsigned m = 0; m < static_cast<unsigned>(N); ++m) {
                const LdRow* mat = rows + 8 * m;
                uint32_t lo, hi;
                if constexpr (Trans) {
                    // Transposed: (row g, col 2t+h) of the transpose is (row 2t+h, col g) stored.
                    lo = row_element(mat[2 * t], g);
                    hi = row_element(mat[2 * t + 1], g);
                } else {
                    lo = row_element(mat[g], 2 * t);
                    hi = row_element(mat[g], 2 * t + 1);
                }
                out[l].r[m] = lo | (hi << 16);
            }
            for (unsigned m = N; m < 4; ++m) out[l].r[m] = 0;
        }
    });
    for (int m = 0; m < N; ++m) r[m] = o.r[m];
}

}  // namespace hiermd_emu_mma
#endif  // HIERMD_EMU

// ---------------------------------------------------------------------------------------------
// mma.sync. Whole-warp instructions: every lane of a converged warp must execute the same one.
// The fragments are laid out as in the table at the top of this file. d may be c (accumulate in
// place).

/// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32: D (16x8) = A (16x16) B (16x8) + C.
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
#ifdef HIERMD_EMU
    hiermd_emu_mma::mma("mma.sync.m16n8k16.f32.f16", hiermd_emu_mma::Operand::F16, d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

/// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: as mma_m16n8k16_f16 with bf16 A and B.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
#ifdef HIERMD_EMU
    hiermd_emu_mma::mma("mma.sync.m16n8k16.f32.bf16", hiermd_emu_mma::Operand::BF16, d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

/// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: D (16x8) = A (16x8) B (8x8) + C, with A
/// and B as tf32 in f32 containers. The hardware ignores the 13 low mantissa bits of A and B
/// (truncation): round them first with f32_to_tf32_rna unless truncation is what you want.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
#ifdef HIERMD_EMU
    hiermd_emu_mma::mma("mma.sync.m16n8k8.f32.tf32", hiermd_emu_mma::Operand::TF32, d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

/// cvt.rna.tf32.f32: rounds to the nearest tf32 (10 mantissa bits), ties away from zero, and
/// returns it in an f32 container with the 13 low bits zero. Large finite values may round to
/// infinity; NaN stays NaN (0x7fffffff on emu).
__device__ __forceinline__ uint32_t f32_to_tf32_rna(float x) {
#ifdef HIERMD_EMU
    const uint32_t u = hiermd_emu_fp::f32_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffffffu;
    // Adding half a tf32 ulp to the magnitude bits and truncating rounds ties away from zero; a
    // carry moves into the exponent (and from the largest values on to infinity) as it should.
    return (u + 0x1000u) & 0xffffe000u;
#else
    // Not volatile: a pure conversion the compiler may schedule or merge freely.
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
#endif
}

// ---------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16. Each lane passes the address of one
// row of 8 16-bit elements (16 bytes, 16-byte aligned) in shared memory: lanes 0-7 the rows of
// matrix 0, 8-15 of matrix 1, 16-23 of matrix 2, 24-31 of matrix 3; lanes beyond those the
// variant uses may pass anything. Register i of lane l receives, of matrix i, row l/4, columns
// 2(l%4) (low half) and 2(l%4)+1 (high half); with .trans, those of the transposed matrix.
//
// On nvcc the "memory" clobber keeps the compiler from moving shared-memory stores across the
// load, since it cannot see that the asm reads memory through the address.

#ifndef HIERMD_EMU
#define HIERMD_SMEM_ADDR(p) static_cast<unsigned>(__cvta_generic_to_shared(p))
#endif

/// ldmatrix.sync.aligned.m8n8.x1.shared.b16
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* smem_row) {
#ifdef HIERMD_EMU
    hiermd_emu_mma::ldmatrix<1, false>("ldmatrix.m8n8.x1.b16", r, smem_row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(HIERMD_SMEM_ADDR(smem_row))
                 : "memory");
#endif
}

/// ldmatrix.sync.aligned.m8n8.x2.shared.b16
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
#ifdef HIERMD_EMU
    hiermd_emu_mma::ldmatrix<2, false>("ldmatrix.m8n8.x2.b16", r, smem_row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(HIERMD_SMEM_ADDR(smem_row))
                 : "memory");
#endif
}

/// ldmatrix.sync.aligned.m8n8.x4.shared.b16
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
#ifdef HIERMD_EMU
    hiermd_emu_mma::ldmatrix<4, false>("ldmatrix.m8n8.x4.b16", r, smem_row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(HIERMD_SMEM_ADDR(smem_row))
                 : "memory");
#endif
}

/// ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], const void* smem_row) {
#ifdef HIERMD_EMU
    hiermd_emu_mma::ldmatrix<1, true>("ldmatrix.m8n8.x1.trans.b16", r, smem_row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(HIERMD_SMEM_ADDR(smem_row))
                 : "memory");
#endif
}

/// ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
#ifdef HIERMD_EMU
    hiermd_emu_mma::ldmatrix<2, true>("ldmatrix.m8n8.x2.trans.b16", r, smem_row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(HIERMD_SMEM_ADDR(smem_row))
                 : "memory");
#endif
}

/// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
#ifdef HIERMD_EMU
    hiermd_emu_mma::ldmatrix<4, true>("ldmatrix.m8n8.x4.trans.b16", r, smem_row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(HIERMD_SMEM_ADDR(smem_row))
                 : "memory");
#endif
}

#ifndef HIERMD_EMU
#undef HIERMD_SMEM_ADDR
#endif
