/* SIMD pieces of randygpt's GEMM: one register-tile microkernel and two packers per ISA,
 * compiled side by side under function target attributes, chosen at run time.
 *
 * The blocking loops and the threading live in matmul.pyx; this header only holds what
 * needs SIMD types, which Cython lacks. The rest of the extension stays baseline code,
 * so one binary runs on any x86-64 and uses AVX2/AVX-512 where the CPU has them.
 *
 *   avx512  12 x 32 tile (24 zmm accumulators + 2 B vectors + 1 broadcast of 32 zmm)
 *   avx2     6 x 16 tile (12 ymm accumulators + 2 B vectors + 1 broadcast of 16 ymm)
 *   sse2     6 x  8 tile on 16-byte vectors (baseline x86-64, no FMA)
 *   generic  the same 6 x 8 tile with no target attribute, for machines that are not x86
 */
#ifndef RANDYGPT_GEMM_KERNELS_H
#define RANDYGPT_GEMM_KERNELS_H

#include <Python.h>
#include <string.h>

#if !defined(__GNUC__)
#error "randygpt's GEMM needs GCC or clang (vector extensions and target attributes)"
#endif

typedef void (*rg_kernel_fn)(Py_ssize_t kc, const float *ap, const float *bp,
                             const float *init, Py_ssize_t ld_init,
                             float *dst, Py_ssize_t ld_dst, int add_dst, float *c2,
                             const float *gate, int mr, int nr);
typedef void (*rg_inplace_fn)(float *p, Py_ssize_t n);
typedef void (*rg_thread_fn)(void);
typedef void (*rg_pack_fn)(float *dst, const float *src, Py_ssize_t rs, Py_ssize_t cs,
                           Py_ssize_t rows, Py_ssize_t cols);

typedef struct {
    const char *name;
    int mr, nr;          /* register tile */
    int mc;              /* rows of A packed per block (a multiple of mr) */
    rg_kernel_fn kernel;
    rg_kernel_fn kernel_narrow; /* left nr/2 columns only, for a last strip that narrow */
    rg_pack_fn pack_a;   /* (dst, a, rs, cs, mc, kc) */
    rg_pack_fn pack_b;   /* (dst, b, rs, cs, kc, nc) */
    rg_inplace_fn sqrelu_inplace; /* relu(x)^2 over a packed strip */
    rg_pack_fn pack_b_sqrelu; /* bf16 paths (gemm_bf16.h): pack_b of relu(b)^2, squared
                                 before rounding; NULL on the fp32 paths */
    rg_pack_fn pack_a_sqrelu; /* bf16 paths: pack_a of relu(a)^2 likewise; NULL on the fp32
                                 paths, which square the packed strips (sqrelu_inplace) */
    int kc_max;          /* longest K block when op(a)'s rows run along k (NT, NN) and rows
                            are split; 0 means RG_KC. Results do not depend on it. */
    rg_thread_fn begin;  /* called by the thread running a work item before its first
                            kernel call, and end after its last: AMX's tile configuration
                            (gemm_bf16_amx.h); NULL on the other paths */
    rg_thread_fn end;
} rg_isa_t;

/* K block: the same on every path, so a path's results never depend on it (the kernel
 * continues one FMA chain across blocks anyway) and a 16-32 KiB B strip sits in L1. */
#define RG_KC 256

/* The packers' 4 x 4 transposes. */
#include "transpose4.h"

/* RANDYGPT_GEMM_GENERIC builds the non-x86 layout on x86 too, to compile-check it there. */
#if (defined(__x86_64__) || defined(__i386__)) && !defined(RANDYGPT_GEMM_GENERIC)
#define RG_X86 1

#define RG_NAME(x) rg_avx512_##x
#define RG_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq")))
#define RG_VW 16
#define RG_MR 12
#define RG_NV 2
#include "gemm_microkernel.h"
#undef RG_NAME
#undef RG_TARGET
#undef RG_VW
#undef RG_MR
#undef RG_NV

/* "avx2" alone would not allow FMA; name both. */
#define RG_NAME(x) rg_avx2_##x
#define RG_TARGET __attribute__((target("avx2,fma")))
#define RG_VW 8
#define RG_MR 6
#define RG_NV 2
#include "gemm_microkernel.h"
#undef RG_NAME
#undef RG_TARGET
#undef RG_VW
#undef RG_MR
#undef RG_NV
#endif

#define RG_NAME(x) rg_base_##x
#define RG_TARGET
#define RG_VW 4
#define RG_MR 6
#define RG_NV 2
#include "gemm_microkernel.h"
#undef RG_NAME
#undef RG_TARGET
#undef RG_VW
#undef RG_MR
#undef RG_NV

/* Fastest first; rg_isa_supported() says which ones this CPU runs. */
static const rg_isa_t rg_isas[] = {
#ifdef RG_X86
    /* kc_max 1024: on a Xeon with 2 MiB L2 per core (AVX512_BF16), one K block for
     * K <= 1024 ran the NN/NT products with K = 768-1024 7-8% faster than RG_KC blocks. */
    {"avx512", 12, 32, 144, rg_avx512_kernel, rg_avx512_kernel_narrow, rg_avx512_pack_a, rg_avx512_pack_b,
     rg_avx512_sqrelu_inplace, .kc_max = 1024},
    {"avx2", 6, 16, 144, rg_avx2_kernel, rg_avx2_kernel_narrow, rg_avx2_pack_a, rg_avx2_pack_b,
     rg_avx2_sqrelu_inplace},
    {"sse2", 6, 8, 144, rg_base_kernel, rg_base_kernel_narrow, rg_base_pack_a, rg_base_pack_b,
     rg_base_sqrelu_inplace},
#else
    {"generic", 6, 8, 144, rg_base_kernel, rg_base_kernel_narrow, rg_base_pack_a, rg_base_pack_b,
     rg_base_sqrelu_inplace},
#endif
};

static int rg_isa_count(void) { return (int)(sizeof rg_isas / sizeof rg_isas[0]); }

static const rg_isa_t *rg_isa_at(int i) { return &rg_isas[i]; }

static int rg_isa_supported(int i)
{
#ifdef RG_X86
    /* libgcc's checks include the OS having enabled the wider registers (XCR0). */
    __builtin_cpu_init();
    const char *name = rg_isas[i].name;
    if (strcmp(name, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    if (strcmp(name, "avx2") == 0)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    (void)i;
    return 1;
}

/* Cython's prange inside a parallel block ends with "omp for nowait": the GEMM's
 * phases (pack a K block, then use it) need this explicit barrier between them. */
static inline void rg_barrier(void)
{
#ifdef _OPENMP
#pragma omp barrier
#endif
}

/* The bf16 paths, built on the fp32 kernels above. */
#include "gemm_bf16.h"

#endif /* RANDYGPT_GEMM_KERNELS_H */
