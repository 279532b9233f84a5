/* Per-(batch, head) bodies of randygpt's fused causal attention (see attention.pyx).
 *
 * Dimensions: T time, C channels, NH heads, HS head size = C / NH.
 * qkv is (B*T, 3C) row-major: q at columns [0, C), k at [C, 2C), v at [2C, 3C); head h
 * owns columns h*HS .. (h+1)*HS of each third. One task handles one (b, h) pair and
 * writes only that pair's slices, so the caller may run pairs on any threads.
 *
 * Every output element is a sum taken in a fixed order that depends on the shapes
 * alone, so results are bit-identical for any thread count. The vector loops live in
 * attention_body.h, compiled twice: with AVX2 + FMA (8 floats per vector) and for the
 * baseline (4 floats, SSE2 on x86-64). attention_select_isa picks one at import; the
 * two round differently (FMA), so a run keeps the one it started with.
 */
#ifndef RANDYGPT_ATTENTION_IMPL_H
#define RANDYGPT_ATTENTION_IMPL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* e^x for x <= 0 (scores minus their row max), shared with xent: randygpt_exp_nonpos and,
 * for attention_body.h's vector copies, the same steps on whole vectors. */
#include "fastexp.h"
#if defined(__GNUC__)
#include "transpose4.h"
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ATTN_HAVE_AVX2 1
#else
#define ATTN_HAVE_AVX2 0
#endif

/* Keys padded to a multiple of 32 columns: row_scores' widest block (4 vectors of 8)
 * then never runs past a row of transposed keys or of scores. */
static inline ptrdiff_t attn_tpad(ptrdiff_t T)
{
    return (T + 31) / 32 * 32;
}

/* 0, 1, 2, ...: the lane numbers of the widest vector, for masks built in registers. */
static const float attn_lane_index[16] = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f,
                                          8.0f, 9.0f, 10.0f, 11.0f, 12.0f, 13.0f, 14.0f, 15.0f};

/* Both scratch sizes are below 8 (T + 32) (T + 32 + HS) floats; past 2^60 floats they are
 * reported as SIZE_MAX (more than any machine can allocate) rather than computed, so that
 * no product below can overflow. */
static inline int attn_scratch_fits(ptrdiff_t T, ptrdiff_t HS)
{
    return 8.0 * (double)(T + 32) * (double)(T + 32 + HS) < 0x1p60;
}

/* A task's per-thread scratch, laid out once for every copy of the bodies. Row strides are
 * HS for packed rows and Tp for transposed ones, scores, dS and P. */
typedef struct {
    float *kt;  /* (HS, Tp): k transposed, zero padded */
    float *vp;  /* (T, HS): the pair's v rows */
    float *s;   /* (4, Tp): scores of up to four query rows */
    float *ps;  /* (T, Tp): P, when the caller does not store it */
} attn_fwd_scratch;

typedef struct {
    float *vt;  /* (HS, Tp): v transposed, zero padded */
    float *qp;  /* (T, HS): the pair's q, k and dy rows */
    float *kp;
    float *dyp;
    float *ds;  /* (T, Tp): dP, then dS; row i valid for j <= i */
    float *g0;  /* (HS,) x 2: finished gradient rows (the AVX2 and baseline copies) */
    float *g1;
    float *kt;  /* (HS, Tp), when P is recomputed */
    float *vp;  /* (T, HS), when the output is written */
    float *s;   /* (4, Tp): scores, when P is recomputed */
    float *ps;  /* (T, Tp): P, when the caller does not store it */
} attn_bwd_scratch;

/* Points sc's fields into the scratch at base and returns its size in floats; with sc NULL,
 * only the size (base unused). */
#define ATTN_PLACE(field, n)               \
    do {                                   \
        if (sc)                            \
            sc->field = base + at;         \
        at += (n);                         \
    } while (0)

static inline size_t attn_fwd_layout(attn_fwd_scratch *sc, float *base, ptrdiff_t T,
                                     ptrdiff_t HS)
{
    const ptrdiff_t Tp = attn_tpad(T);
    ptrdiff_t at = 0;
    ATTN_PLACE(kt, HS * Tp);
    ATTN_PLACE(vp, T * HS);
    ATTN_PLACE(s, 4 * Tp);
    ATTN_PLACE(ps, T * Tp);
    return (size_t)at;
}

static inline size_t attn_bwd_layout(attn_bwd_scratch *sc, float *base, ptrdiff_t T,
                                     ptrdiff_t HS)
{
    const ptrdiff_t Tp = attn_tpad(T);
    ptrdiff_t at = 0;
    ATTN_PLACE(vt, HS * Tp);
    ATTN_PLACE(qp, T * HS);
    ATTN_PLACE(kp, T * HS);
    ATTN_PLACE(dyp, T * HS);
    ATTN_PLACE(ds, T * Tp);
    ATTN_PLACE(g0, HS);
    ATTN_PLACE(g1, HS);
    ATTN_PLACE(kt, HS * Tp);
    ATTN_PLACE(vp, T * HS);
    ATTN_PLACE(s, 4 * Tp);
    ATTN_PLACE(ps, T * Tp);
    return (size_t)at;
}
#undef ATTN_PLACE

/* Floats of per-thread scratch each task needs. */
static inline size_t attention_forward_scratch(ptrdiff_t T, ptrdiff_t HS)
{
    if (!attn_scratch_fits(T, HS))
        return SIZE_MAX;
    return attn_fwd_layout(NULL, NULL, T, HS);
}

static inline size_t attention_backward_scratch(ptrdiff_t T, ptrdiff_t HS)
{
    if (!attn_scratch_fits(T, HS))
        return SIZE_MAX;
    return attn_bwd_layout(NULL, NULL, T, HS);
}

/* The float32 value of 1/sqrt(HS), the same number the NumPy reference uses. */
static inline float attn_scale(ptrdiff_t HS)
{
    return (float)(1.0 / sqrt((double)HS));
}

/* dst (HS, Tp) = the same rows transposed, columns T..Tp-1 zero: 4 x 4 blocks moved
 * through 16-byte vectors (a quarter of the scalar loads and stores), edges one by one. */
static inline void attn_pack_transposed(float *restrict dst, const float *restrict src,
                                        ptrdiff_t ld, ptrdiff_t T, ptrdiff_t HS, ptrdiff_t Tp)
{
    for (ptrdiff_t d = 0; d < HS; ++d)
        memset(dst + d * Tp + T, 0, (size_t)(Tp - T) * sizeof(float));
    ptrdiff_t t = 0;
#if defined(__GNUC__)
    for (; t + 4 <= T; t += 4) {
        ptrdiff_t d = 0;
        for (; d + 4 <= HS; d += 4)
            rg_transpose4(dst + d * Tp + t, Tp, src + t * ld + d, ld);
        for (; d < HS; ++d)
            for (ptrdiff_t r = t; r < t + 4; ++r)
                dst[d * Tp + r] = src[r * ld + d];
    }
#endif
    for (; t < T; ++t)
        for (ptrdiff_t d = 0; d < HS; ++d)
            dst[d * Tp + t] = src[t * ld + d];
}

/* sum_j a[j] * b[j] in double over 4 lanes added in a fixed order. */
static inline double attn_dot_double(const float *a, const float *b, ptrdiff_t n)
{
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    ptrdiff_t j = 0;
    for (; j + 4 <= n; j += 4)
        for (int l = 0; l < 4; ++l)
            acc[l] += (double)a[j + l] * (double)b[j + l];
    for (int l = 0; j < n; ++j, ++l)
        acc[l] += (double)a[j] * (double)b[j];
    return (acc[0] + acc[2]) + (acc[1] + acc[3]);
}

/* sum_j x[j] in double over 4 lanes added in a fixed order: the softmax normalizer,
 * exact to float precision for any T. */
static inline double attn_sum_double(const float *x, ptrdiff_t n)
{
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    ptrdiff_t j = 0;
    for (; j + 4 <= n; j += 4)
        for (int l = 0; l < 4; ++l)
            acc[l] += (double)x[j + l];
    for (int l = 0; j < n; ++j, ++l)
        acc[l] += (double)x[j];
    return (acc[0] + acc[2]) + (acc[1] + acc[3]);
}

/* Softmax backward on one row, in place: given dP in ds and P in p (n entries),
 * P = softmax(S)  =>  dS_j = P_j (dP_j - D), D = sum_l P_l dP_l (in double). */
static inline void attn_softmax_grad_row(float *restrict ds, const float *restrict p,
                                         ptrdiff_t n)
{
    const float D = (float)attn_dot_double(p, ds, n);
    for (ptrdiff_t j = 0; j < n; ++j)
        ds[j] = p[j] * (ds[j] - D);
}

/* Hints the cache lines of [p, p + bytes) into L1/L2. The tasks of one thread run in
 * order, so each task fetches the next task's rows while it computes its own: the
 * rows are 3C floats apart and a cold task otherwise waits on memory row by row. */
static inline void attn_prefetch(const void *p, size_t bytes)
{
#if defined(__GNUC__)
    const char *c = (const char *)p;
    const char *end = c + bytes;
    for (; c < end; c += 64)
        __builtin_prefetch(c);
    __builtin_prefetch(end - 1);
#else
    (void)p;
    (void)bytes;
#endif
}

#define ATTN_FN(name) attn_base_##name
#define ATTN_TARGET
#if defined(__GNUC__)
#define ATTN_VW 4
#else
#define ATTN_VW 1
#endif
#include "attention_body.h"
#undef ATTN_FN
#undef ATTN_TARGET
#undef ATTN_VW

#if ATTN_HAVE_AVX2
#define ATTN_FN(name) attn_avx2_##name
#define ATTN_TARGET __attribute__((target("avx2,fma")))
#define ATTN_VW 8
#include "attention_body.h"
#undef ATTN_FN
#undef ATTN_TARGET
#undef ATTN_VW
#include "attention_avx512.h"
#endif

/* 2: the AVX-512 copy (the AVX2 one where HS is no multiple of 16), 1: the AVX2 + FMA
 * copy, 0: the baseline copy. Set once at import, before any task. */
static int attn_isa = 0;

/* The best copy this CPU runs: 2, 1 or 0 as above. */
static inline int attention_cpu_level(void)
{
#if ATTN_HAVE_AVX2
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma"))
        return 0;
    return __builtin_cpu_supports("avx512f") ? 2 : 1;
#else
    return 0;
#endif
}

/* Chooses the copy (2, 1 or 0 as above); returns 0 on success, -1 if this CPU cannot run
 * the one asked for. */
static inline int attention_select_isa(int level)
{
    if (level < 0 || level > attention_cpu_level())
        return -1;
    attn_isa = level;
    return 0;
}

static inline int attention_get_isa(void)
{
    return attn_isa;
}

/* Forward for pair task = b * NH + h of n_tasks = B * NH (tasks run in order on a
 * thread, so each prefetches the next one's rows).
 * out (B*T, C) written at columns h*HS..; att (B, NH, T, T) written (zeros above the
 * diagonal), or NULL to keep P in scratch only; qkv (B*T, 3C) read; scratch:
 * attention_forward_scratch(T, HS) floats. */
static inline void attention_forward_task(float *out, float *att, const float *qkv,
                                          float *scratch, ptrdiff_t task, ptrdiff_t n_tasks,
                                          ptrdiff_t T, ptrdiff_t C, ptrdiff_t NH)
{
#if ATTN_HAVE_AVX2
    if (attn_isa == 2 && (C / NH) % 16 == 0) {
        attn_avx512_forward_task(out, att, qkv, scratch, task, n_tasks, T, C, NH);
        return;
    }
    if (attn_isa) {
        attn_avx2_forward_task(out, att, qkv, scratch, task, n_tasks, T, C, NH);
        return;
    }
#endif
    attn_base_forward_task(out, att, qkv, scratch, task, n_tasks, T, C, NH);
}

/* Backward for pair task = b * NH + h of n_tasks, accumulating into dqkv (B*T, 3C)
 * (accumulate = 1) or writing the pair's slices of it (accumulate = 0).
 * dout (B*T, C) read; att (B, NH, T, T) as saved by the forward, entries above the
 * diagonal never read, or NULL: P is then recomputed from q and k by the forward's own
 * code, bit for bit. out (B*T, C), when not NULL, is written with the forward's output
 * (bit for bit). scratch: attention_backward_scratch(T, HS) floats. Each
 * gradient element is finished in scratch and added to (or stored in) dqkv once, so
 * two calls add exactly twice the gradient, and writing equals adding onto zeros. */
static inline void attention_backward_task(float *dqkv, float *out, const float *dout,
                                           const float *qkv, const float *att, float *scratch,
                                           ptrdiff_t task, ptrdiff_t n_tasks, ptrdiff_t T,
                                           ptrdiff_t C, ptrdiff_t NH, int accumulate)
{
#if ATTN_HAVE_AVX2
    if (attn_isa == 2 && (C / NH) % 16 == 0) {
        attn_avx512_backward_task(dqkv, out, dout, qkv, att, scratch, task, n_tasks, T, C, NH,
                                  accumulate);
        return;
    }
    if (attn_isa) {
        attn_avx2_backward_task(dqkv, out, dout, qkv, att, scratch, task, n_tasks, T, C, NH,
                                accumulate);
        return;
    }
#endif
    attn_base_backward_task(dqkv, out, dout, qkv, att, scratch, task, n_tasks, T, C, NH,
                            accumulate);
}

#endif /* RANDYGPT_ATTENTION_IMPL_H */
