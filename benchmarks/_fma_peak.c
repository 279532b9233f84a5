/* The cores' peak float32 FMA rate: the yardstick the benchmarks hold randygpt's GEMM
 * against (no GEMM on a SIMD path can run faster than this). Not part of the package:
 * _fma_peak.py compiles this file on first use and calls it through ctypes.
 *
 * Each path keeps the register tile of the GEMM path of the same name
 * (src/randygpt/_kernels/gemm_kernels.h): MR rows of NV vectors of VW floats, that is
 * MR * NV independent FMA chains, enough to cover the FMA latency on every x86 core we
 * know. A round is one FMA (multiply-add on the sse2 path, which has no FMA) on each
 * accumulator, 2 * MR * NV * VW flops, on registers alone (no memory traffic).
 *
 * avx512bf16 is the bf16 GEMM's path (gemm_bf16.h): a round is one vdpbf16ps on each of its
 * 12 x 2 accumulators, two bf16 multiply-adds per fp32 lane, so 4 * MR * NR flops.
 * amx is the bf16 GEMM's AMX path (gemm_bf16_amx.h): a round is one tdpbf16ps on each of
 * its 2 x 2 accumulator tiles of 16 x 16 fp32 lanes, 32 bf16 multiply-adds per lane, so
 * 64 * MR * NR flops for its 32 x 32 tile, on tile registers alone.
 */
#include <stddef.h>
#include <string.h>

#if !defined(__GNUC__)
#error "the FMA-peak probe needs GCC or clang (vector extensions and target attributes)"
#endif

typedef float (*peak_fn)(long long iters);

/* iters rounds on MR x NV accumulators of VW floats; the returned sum only keeps the
 * compiler from dropping the loop. acc * mul + add is contracted to one FMA where the
 * target has it (GCC and clang contract across statements by default in C). */
#define FMA_PEAK(NAME, TARGET, VW, MR, NV)                                                  \
    TARGET static float NAME(long long iters)                                               \
    {                                                                                       \
        typedef float vec __attribute__((vector_size(4 * (VW))));                           \
        vec acc[MR][NV];                                                                    \
        const vec zero = {0};                                                               \
        const vec mul = zero + 0.999999f, add = zero + 1e-6f;                               \
        _Pragma("GCC unroll 16")                                                            \
        for (int i = 0; i < (MR); i++)                                                      \
            _Pragma("GCC unroll 4")                                                         \
            for (int j = 0; j < (NV); j++)                                                  \
                acc[i][j] = zero + (float)(i * (NV) + j);                                   \
        for (long long it = 0; it < iters; it++) {                                          \
            _Pragma("GCC unroll 16")                                                        \
            for (int i = 0; i < (MR); i++)                                                  \
                _Pragma("GCC unroll 4")                                                     \
                for (int j = 0; j < (NV); j++)                                              \
                    acc[i][j] = acc[i][j] * mul + add;                                      \
        }                                                                                   \
        vec total = zero;                                                                   \
        for (int i = 0; i < (MR); i++)                                                      \
            for (int j = 0; j < (NV); j++)                                                  \
                total += acc[i][j];                                                         \
        float sum = 0.0f;                                                                   \
        for (int l = 0; l < (VW); l++)                                                      \
            sum += total[l];                                                                \
        return sum;                                                                         \
    }

typedef struct {
    const char *name;
    int mr, nr; /* the GEMM tile: nr = NV * VW floats */
    int macs;   /* multiply-adds per lane and instruction: 1 (FMA), 2 (vdpbf16ps), 32
                   (tdpbf16ps) */
    peak_fn fn;
} peak_path;

#if defined(__x86_64__) || defined(__i386__)
#define PEAK_X86 1
#include <immintrin.h>
FMA_PEAK(peak_avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq"))), 16, 12, 2)
FMA_PEAK(peak_avx2, __attribute__((target("avx2,fma"))), 8, 6, 2)

/* iters rounds of vdpbf16ps on 12 x 2 accumulators (the bf16 GEMM's tile); the bf16
 * operands (about 1 and 1e-6) keep the sums finite. */
__attribute__((target("avx512f,avx512bw,avx512bf16"))) static float peak_avx512bf16(
    long long iters)
{
    __m512 acc[24];
    const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f7f3f7f);  /* 0.996, 0.996 */
    const __m512bh y = (__m512bh)_mm512_set1_epi32(0x358637bd);  /* 1e-6, ~1e-6 */
#pragma GCC unroll 24
    for (int i = 0; i < 24; i++)
        acc[i] = _mm512_set1_ps((float)i);
    for (long long it = 0; it < iters; it++) {
#pragma GCC unroll 24
        for (int i = 0; i < 24; i++)
            acc[i] = _mm512_dpbf16_ps(acc[i], x, y);
    }
    __m512 total = _mm512_setzero_ps();
    for (int i = 0; i < 24; i++)
        total = _mm512_add_ps(total, acc[i]);
    return _mm512_reduce_add_ps(total);
}

#if defined(__linux__) && defined(__x86_64__)
#define PEAK_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

/* Palette 1, every tile 16 rows of 64 bytes; static so the whole of it is in memory when
 * ldtilecfg reads it. */
static const struct {
    unsigned char palette, start_row, reserved[14];
    unsigned short colsb[16];
    unsigned char rows[16];
} __attribute__((packed, aligned(64))) amx_cfg = {
    .palette = 1, .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
    .rows = {16, 16, 16, 16, 16, 16, 16, 16}};

/* iters rounds of tdpbf16ps on four accumulator tiles from four operand tiles (zeros, as
 * ldtilecfg leaves them: the unit's speed does not depend on the values), as the GEMM's
 * 32 x 32 tile runs them. */
__attribute__((target("amx-tile,amx-bf16"))) static float peak_amx(long long iters)
{
    float out[16 * 16] __attribute__((aligned(64)));
    _tile_loadconfig(&amx_cfg); /* which also zeroes every tile */
    for (long long it = 0; it < iters; it++) {
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, out, 64);
    _tile_release();
    return out[0];
}
#endif
#endif
FMA_PEAK(peak_base, , 4, 6, 2)

/* Fastest first, named as the GEMM's paths are. */
static const peak_path paths[] = {
#ifdef PEAK_AMX
    {"amx", 32, 32, 32, peak_amx},
#endif
#ifdef PEAK_X86
    {"avx512bf16", 12, 32, 2, peak_avx512bf16},
    {"avx512", 12, 32, 1, peak_avx512},
    {"avx2", 6, 16, 1, peak_avx2},
    {"sse2", 6, 8, 1, peak_base},
#else
    {"generic", 6, 8, 1, peak_base},
#endif
};

int fma_peak_path_count(void) { return (int)(sizeof paths / sizeof paths[0]); }

const char *fma_peak_path_name(int i) { return paths[i].name; }

/* Multiply-adds per lane and instruction of path i: 1 (FMA paths), 2 (avx512bf16), 32
 * (amx). */
int fma_peak_path_macs(int i) { return paths[i].macs; }

/* Flops of one round of path i. */
double fma_peak_round_flops(int i) { return 2.0 * paths[i].macs * paths[i].mr * paths[i].nr; }

/* Whether this CPU (and its OS, which must save the wide registers) runs path i. */
int fma_peak_path_supported(int i)
{
#ifdef PEAK_X86
    __builtin_cpu_init();
#ifdef PEAK_AMX
    /* The tile data state must be granted by Linux (once per process) before use. */
    if (strcmp(paths[i].name, "amx") == 0)
        return __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
               syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                       18 /* XFEATURE_XTILEDATA */) == 0;
#endif
    if (strcmp(paths[i].name, "avx512bf16") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512bf16");
    if (strcmp(paths[i].name, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    if (strcmp(paths[i].name, "avx2") == 0)
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    (void)i;
    return 1;
}

/* 1 when built with OpenMP (more than one thread possible). */
int fma_peak_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* n_threads threads each run iters rounds of path i at the same time (the caller times
 * the call); returns their sums' total, to keep the work alive. */
float fma_peak_run(int i, long long iters, int n_threads)
{
    peak_fn fn = paths[i].fn;
    float sink = 0.0f;
    if (n_threads == 1)
        return fn(iters);
#pragma omp parallel for num_threads(n_threads) schedule(static, 1) reduction(+ : sink)
    for (int t = 0; t < n_threads; t++)
        sink += fn(iters);
    return sink;
}
