/* bf16 paths of randygpt's GEMM: operands rounded to bf16 (nearest even) while they are
 * packed, products summed in fp32. Included at the end of gemm_kernels.h, whose fp32
 * kernels do the bf16 tiles' write-back; the driver (matmul.pyx) is the fp32 one, handed
 * one of these tables' entries instead of an fp32 one.
 *
 *   avx512bf16  12 x 32 tile on vdpbf16ps (AVX512_BF16: Cooper Lake, Sapphire Rapids and
 *               later, Zen 4 and later): 32 multiply-adds per instruction, twice an FMA's
 *   avx512, avx2, sse2 (generic off x86)
 *               the same tiles as the fp32 paths, emulating vdpbf16ps with fp32
 *               multiply-adds: every product of two bf16 values is exact in fp32, so
 *               adding them one at a time in the instruction's order gives its bits
 *               (no speed-up: two multiply-adds per pair, as fp32 does)
 *
 * What vdpbf16ps computes, checked on an Intel Xeon (Sapphire Rapids class) against the
 * emulation below over 2e7 random operands, denormal-heavy: per fp32 lane, acc +=
 * odd product, then acc += even product, each an fp32 FMA rounded to nearest even with
 * denormal inputs read as zero and denormal results flushed to (signed) zero (DAZ and FTZ,
 * whatever MXCSR says). The emulation runs its FMAs with MXCSR's FTZ and DAZ set (and
 * restored) around the k loop, which gave the same bits on every operand; off x86 it
 * flushes each sum itself. NaN payloads are not compared (a NaN stays a NaN). sse2 has no
 * FMA: its multiply-then-add rounds the same except where a product under- or overflows
 * fp32 (magnitudes below 2^-126 or above 2^128, far outside a model's values).
 *
 * Rounding: rg_bf16_bits is vcvtne2ps2bf16's conversion (checked equal on all 2^32 fp32
 * inputs on that CPU): nearest even, overflow to infinity, NaN quieted, denormal inputs to
 * a signed zero (also on an AMD EPYC, Zen 5: all 2^32 inputs equal). So packed operands
 * never hold a denormal, and every path's packers write the same words: the portable
 * routine in gemm_bf16_kernel.h, and on the native and AMX paths the vectorised ones of
 * gemm_bf16_pack.h.
 */
#ifndef RANDYGPT_GEMM_BF16_H
#define RANDYGPT_GEMM_BF16_H

#include <stdint.h>
#ifdef RG_X86
#include <immintrin.h>
#endif

/* A packer's two rg_pack_fn entry points, name (the operand as it is) and sq_name
 * (relu(operand)^2, squared before it is rounded), from its impl(dst, src, rs, cs, rows,
 * cols, sq), for every bf16 path. */
#define RG_BF16_PACK_ENTRIES(target, name, sq_name, impl)                               \
    static target void name(float *restrict dst, const float *restrict src,             \
                            Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t rows,              \
                            Py_ssize_t cols)                                            \
    {                                                                                   \
        impl(dst, src, rs, cs, rows, cols, 0);                                          \
    }                                                                                   \
    static target void sq_name(float *restrict dst, const float *restrict src,          \
                               Py_ssize_t rs, Py_ssize_t cs, Py_ssize_t rows,           \
                               Py_ssize_t cols)                                         \
    {                                                                                   \
        impl(dst, src, rs, cs, rows, cols, 1);                                          \
    }

/* x rounded to bf16, as fp32 bits (the bf16 in the high half, the low half zero). */
static inline __attribute__((always_inline)) uint32_t rg_bf16_bits(float x)
{
    uint32_t u;
    __builtin_memcpy(&u, &x, sizeof u);
    const uint32_t mag = u & 0x7fffffffu;
    if (mag > 0x7f800000u) /* NaN: quiet it, keep the sign and the top of the payload */
        return (u | 0x00400000u) & 0xffff0000u;
    if (mag < 0x00800000u) /* zero or denormal */
        return u & 0x80000000u;
    /* Round half to even on the 16 dropped bits; a carry into the exponent is right,
     * up to infinity. */
    return (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
}

/* The packed word of a k pair: the even element's bf16 low, the odd one's high. */
static inline __attribute__((always_inline)) uint32_t rg_bf16_pair(float even, float odd)
{
    return (rg_bf16_bits(even) >> 16) | rg_bf16_bits(odd);
}

/* An operand value as packed: relu(x)^2 first when sq (fc2's input, recomputed from fc1's
 * pre-activation: "x < 0 ? 0 : x*x" as the fp32 paths write it, so NaN propagates). */
static inline __attribute__((always_inline)) float rg_bf16_load(float x, const int sq)
{
    return sq ? (x < 0.0f ? 0.0f : x * x) : x;
}

static inline __attribute__((always_inline)) float rg_bf16_float(uint32_t bits)
{
    float f;
    __builtin_memcpy(&f, &bits, sizeof f);
    return f;
}

#ifdef RG_X86
/* The native path: the instruction flushes by itself. */
#define RGB_FTZ_BEGIN
#define RGB_FTZ_SETTLE(acc, nv)
#define RGB_FTZ_END
#define RGB_FTZ(x) (x)
#define RGB_NAME(x) rgb_native_##x
#define RGB_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16")))
#define RGB_VW 16
#define RGB_MR 12
#define RGB_NV 2
#define RGB_FP32(x) rg_avx512_##x
#define RGB_NATIVE 1
#include "gemm_bf16_kernel.h"
#undef RGB_NAME
#undef RGB_TARGET
#undef RGB_VW
#undef RGB_MR
#undef RGB_NV
#undef RGB_FP32
#undef RGB_NATIVE
#undef RGB_FTZ_BEGIN
#undef RGB_FTZ_SETTLE
#undef RGB_FTZ_END

/* Its packers: the portable ones' words, written 16 at a time (and shared with AMX). */
#include "gemm_bf16_pack.h"

/* The emulation's k loop runs with MXCSR's FTZ (bit 15) and DAZ (bit 6) set, and MXCSR
 * restored after it. The asm statements clobber memory, so the loop's loads stay after
 * the first; the sums stay in registers, so RGB_FTZ_SETTLE hands each one to an empty asm
 * (volatile, clobbering memory, hence ordered before the restore) to keep every
 * multiply-add before it. */
#define RGB_FTZ_BEGIN                                                      \
    unsigned rgb_csr, rgb_ftz;                                             \
    __asm__ __volatile__("stmxcsr %0" : "=m"(rgb_csr) : : "memory");       \
    rgb_ftz = rgb_csr | 0x8040u;                                           \
    __asm__ __volatile__("ldmxcsr %0" : : "m"(rgb_ftz) : "memory");
#define RGB_FTZ_SETTLE(acc, nv)                                            \
    _Pragma("GCC unroll 16") for (int i_ = 0; i_ < RGB_MR; i_++)              \
        _Pragma("GCC unroll 4") for (int j_ = 0; j_ < (nv); j_++)             \
            __asm__ __volatile__("" : "+v"(acc[i_][j_]) : : "memory");
#define RGB_FTZ_END __asm__ __volatile__("ldmxcsr %0" : : "m"(rgb_csr) : "memory");
#define RGB_NATIVE 0

#define RGB_NAME(x) rgb_avx512_##x
#define RGB_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq")))
#define RGB_VW 16
#define RGB_MR 12
#define RGB_NV 2
#define RGB_FP32(x) rg_avx512_##x
#include "gemm_bf16_kernel.h"
#undef RGB_NAME
#undef RGB_TARGET
#undef RGB_VW
#undef RGB_MR
#undef RGB_NV
#undef RGB_FP32

#define RGB_NAME(x) rgb_avx2_##x
#define RGB_TARGET __attribute__((target("avx2,fma")))
#define RGB_VW 8
#define RGB_MR 6
#define RGB_NV 2
#define RGB_FP32(x) rg_avx2_##x
#include "gemm_bf16_kernel.h"
#undef RGB_NAME
#undef RGB_TARGET
#undef RGB_VW
#undef RGB_MR
#undef RGB_NV
#undef RGB_FP32

#else /* not x86: each sum flushed by hand (no MXCSR) */
#define RGB_NATIVE 0
#define RGB_FTZ_BEGIN
#define RGB_FTZ_SETTLE(acc, nv)
#define RGB_FTZ_END
#define RGB_FTZ(x) rgb_base_flush(x)
typedef float rgb_base_fvec __attribute__((vector_size(16)));
typedef int32_t rgb_base_ivec __attribute__((vector_size(16)));
/* |x| < 2^-126 (a denormal or zero) -> signed zero; NaN compares false and stays. */
static inline rgb_base_fvec rgb_base_flush(rgb_base_fvec x)
{
    const rgb_base_fvec tiny = {1.17549435e-38f, 1.17549435e-38f, 1.17549435e-38f,
                                1.17549435e-38f};
    const rgb_base_ivec mag = (rgb_base_ivec)x & 0x7fffffff;
    const rgb_base_ivec small = (rgb_base_fvec)mag < tiny;
    return (rgb_base_fvec)((rgb_base_ivec)x & ~(small & 0x7fffffff));
}
#endif

#define RGB_NAME(x) rgb_base_##x
#define RGB_TARGET
#define RGB_VW 4
#define RGB_MR 6
#define RGB_NV 2
#define RGB_FP32(x) rg_base_##x
#include "gemm_bf16_kernel.h"
#undef RGB_NAME
#undef RGB_TARGET
#undef RGB_VW
#undef RGB_MR
#undef RGB_NV
#undef RGB_FP32
#undef RGB_NATIVE
#undef RGB_FTZ_BEGIN
#undef RGB_FTZ_SETTLE
#undef RGB_FTZ_END
#undef RGB_FTZ

#include "gemm_bf16_amx.h"

#define RGB_ENTRY(name, mr, nr, pre) \
    {name, mr, nr, 144, pre##kernel, pre##kernel_narrow, pre##pack_a, pre##pack_b, NULL, \
     pre##pack_b_sqrelu, pre##pack_a_sqrelu}

/* Fastest first; each emulated entry carries the name of the fp32 path whose tile (and
 * write-back) it shares, the native one shares avx512's. */
static const rg_isa_t rg_bf16_isas[] = {
#ifdef RG_HAVE_AMX
    /* AMX: a 32 x 32 tile of its own (gemm_bf16_amx.h); B strips laid out as the native
     * path's. */
    {"amx", 32, 32, 128, rga_kernel, rga_kernel_narrow, rga_pack_a, rgv_pack_b, NULL,
     rgv_pack_b_sqrelu, rga_pack_a_sqrelu, .kc_max = 1024, .begin = rga_configure,
     .end = rga_release},
#endif
#ifdef RG_X86
    /* kc_max 1024: one K block for K = 768-1024 (the packed strips are half fp32's bytes)
     * ran the step 5% faster on a Zen 5 EPYC (244 -> 232 ms at one thread). */
    {"avx512bf16", 12, 32, 144, rgb_native_kernel, rgb_native_kernel_narrow, rgv_pack_a,
     rgv_pack_b, NULL, rgv_pack_b_sqrelu, rgv_pack_a_sqrelu, .kc_max = 1024},
    RGB_ENTRY("avx512", 12, 32, rgb_avx512_),
    RGB_ENTRY("avx2", 6, 16, rgb_avx2_),
    RGB_ENTRY("sse2", 6, 8, rgb_base_),
#else
    RGB_ENTRY("generic", 6, 8, rgb_base_),
#endif
};
#undef RGB_ENTRY

static int rg_bf16_isa_count(void) { return (int)(sizeof rg_bf16_isas / sizeof rg_bf16_isas[0]); }

static const rg_isa_t *rg_bf16_isa_at(int i) { return &rg_bf16_isas[i]; }

/* The fp32 path whose kernels bf16 path i calls for its write-back (and whose CPU
 * features it needs, plus AVX512_BF16 for the native one). */
static const char *rg_bf16_isa_base(int i)
{
    const char *name = rg_bf16_isas[i].name;
    return strcmp(name, "avx512bf16") == 0 || strcmp(name, "amx") == 0 ? "avx512" : name;
}

static int rg_bf16_isa_supported(int i)
{
    const char *base = rg_bf16_isa_base(i);
    for (int j = 0; j < rg_isa_count(); j++)
        if (strcmp(rg_isas[j].name, base) == 0) {
            if (!rg_isa_supported(j))
                return 0;
#ifdef RG_X86
            if (strcmp(rg_bf16_isas[i].name, "avx512bf16") == 0)
                return __builtin_cpu_supports("avx512bf16");
#endif
#ifdef RG_HAVE_AMX
            if (strcmp(rg_bf16_isas[i].name, "amx") == 0)
                return rg_amx_usable();
#endif
            return 1;
        }
    return 0;
}

/* The first bf16 path whose tile differs from its fp32 path's (whose kernel writes the
 * tile back, so the shapes must agree), or -1. AMX writes its taller tile back in pieces. */
static int rg_bf16_tile_mismatch(void)
{
    for (int i = 0; i < rg_bf16_isa_count(); i++) {
        if (strcmp(rg_bf16_isas[i].name, "amx") == 0)
            continue;
        for (int j = 0; j < rg_isa_count(); j++)
            if (strcmp(rg_isas[j].name, rg_bf16_isa_base(i)) == 0 &&
                (rg_isas[j].mr != rg_bf16_isas[i].mr || rg_isas[j].nr != rg_bf16_isas[i].nr))
                return i;
    }
    return -1;
}

#endif /* RANDYGPT_GEMM_BF16_H */
