/* The AVX-512 copy of attention's per-(batch, head) tasks, for head sizes that are a
 * multiple of 16 (included by attention_impl.h after the AVX2 copy, whose packers it
 * calls; other head sizes run the AVX2 copy).
 *
 * It gives the AVX2 copy's bits: every product element is the same chain of FMAs in the
 * same order (a score s_ij over d = 0, 1, ..; an output or dq row over keys r = 0, 1, ..;
 * a dk or dv row over queries i = j, j + 1, ..), whatever the vector width, so only the
 * blocking changes; the softmax rows and their gradient keep the AVX2 copy's grouping of
 * their double sums (which depends on its vector width) on wider vectors. What the 32
 * registers buy is the blocking: scores for 4 query rows x 64 keys at once (16
 * accumulators, each key vector loaded once for 4 rows) and weighted row sums for 8 rows
 * (or 8 key columns) x 32 head columns, against 2 rows in the AVX2 copy, so each load and
 * loop step feeds 2-4 times as many FMAs; and four rows go through each softmax phase
 * together, so that their dependent chains overlap. On a Zen 5 core a default-size layer
 * runs 1.8x (forward) and 1.9x (backward) as fast as the AVX2 copy.
 */
#ifndef RANDYGPT_ATTENTION_AVX512_H
#define RANDYGPT_ATTENTION_AVX512_H

#include <immintrin.h>

#define ATTN512_TARGET __attribute__((target("avx512f,avx2,fma")))
#define ATTN512_INLINE ATTN512_TARGET static inline __attribute__((always_inline))

/* The body's vector helpers on 16 lanes (attn_w16_exp_nonpos, _max, _mask_tail, _hmax,
 * _load, _store): lane by lane the same operations as the AVX2 copy's 8. Only those are
 * used; the rest of this copy is never called. */
#define ATTN_FN(name) attn_w16_##name
#define ATTN_TARGET ATTN512_TARGET
#define ATTN_VW 16
#include "attention_body.h"
#undef ATTN_FN
#undef ATTN_TARGET
#undef ATTN_VW

/* s + k * lds gets, for query rows k < R (at x + k * ldx), the scores against the 16 * J
 * keys of Xt's columns [0, 16 J): s_k[j] = sum_d x_k[d] * Xt[d * ldt + j], d in order. */
ATTN512_INLINE void attn512_scores_block(float *restrict s, ptrdiff_t lds,
                                         const float *restrict x, ptrdiff_t ldx,
                                         const float *restrict Xt, ptrdiff_t ldt, ptrdiff_t HS,
                                         const int R, const int J)
{
    __m512 acc[4][4];
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k)
#pragma GCC unroll 4
        for (int v = 0; v < J; ++v)
            acc[k][v] = _mm512_setzero_ps();
    for (ptrdiff_t d = 0; d < HS; ++d, Xt += ldt) {
        __m512 kv[4];
#pragma GCC unroll 4
        for (int v = 0; v < J; ++v)
            kv[v] = _mm512_loadu_ps(Xt + 16 * v);
#pragma GCC unroll 4
        for (int k = 0; k < R; ++k) {
            const __m512 u = _mm512_set1_ps(x[k * ldx + d]);
#pragma GCC unroll 4
            for (int v = 0; v < J; ++v)
                acc[k][v] = _mm512_fmadd_ps(u, kv[v], acc[k][v]);
        }
    }
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k)
#pragma GCC unroll 4
        for (int v = 0; v < J; ++v)
            _mm512_storeu_ps(s + k * lds + 16 * v, acc[k][v]);
}

/* attn512_scores_block for keys [0, n) rounded up to whole vectors (Xt padded to them). */
ATTN512_INLINE void attn512_scores(float *restrict s, ptrdiff_t lds, const float *restrict x,
                                   ptrdiff_t ldx, const float *restrict Xt, ptrdiff_t ldt,
                                   ptrdiff_t n, ptrdiff_t HS, const int R)
{
    for (ptrdiff_t j = 0; j < n; j += 64) {
        const ptrdiff_t left = (n - j + 15) / 16;
        switch (left >= 4 ? 4 : left) {
        case 4: attn512_scores_block(s + j, lds, x, ldx, Xt + j, ldt, HS, R, 4); break;
        case 3: attn512_scores_block(s + j, lds, x, ldx, Xt + j, ldt, HS, R, 3); break;
        case 2: attn512_scores_block(s + j, lds, x, ldx, Xt + j, ldt, HS, R, 2); break;
        default: attn512_scores_block(s + j, lds, x, ldx, Xt + j, ldt, HS, R, 1); break;
        }
    }
}

/* Scores for rows i .. i + R - 1 (R <= 4) against keys [0, i + R): R chosen by a switch
 * so that every block size is a constant. */
ATTN512_INLINE void attn512_scores_rows(float *restrict s, ptrdiff_t lds,
                                        const float *restrict x, ptrdiff_t ldx,
                                        const float *restrict Xt, ptrdiff_t ldt, ptrdiff_t n,
                                        ptrdiff_t HS, ptrdiff_t R)
{
    switch (R) {
    case 4: attn512_scores(s, lds, x, ldx, Xt, ldt, n, HS, 4); break;
    case 3: attn512_scores(s, lds, x, ldx, Xt, ldt, n, HS, 3); break;
    case 2: attn512_scores(s, lds, x, ldx, Xt, ldt, n, HS, 2); break;
    default: attn512_scores(s, lds, x, ldx, Xt, ldt, n, HS, 1); break;
    }
}

/* A finished row block's write-back: y = acc * f, or y += acc * f in one rounding (the
 * AVX2 copy's add_scaled on the same sums, which the compiler contracts to an FMA). */
ATTN512_INLINE void attn512_put(float *y, __m512 acc, float f, int accumulate)
{
    const __m512 fv = _mm512_set1_ps(f);
    _mm512_storeu_ps(y, accumulate ? _mm512_fmadd_ps(acc, fv, _mm512_loadu_ps(y))
                                   : _mm512_mul_ps(acc, fv));
}

/* One step of a weighted sum: acc[k] += w[k * ws] * (the 16 * DV floats at xr), for the
 * accumulators k in [k0, k1), each an FMA chain continued in order. */
ATTN512_INLINE void attn512_step(__m512 acc[8][2], const float *restrict xr,
                                 const float *restrict w, ptrdiff_t ws, int k0, int k1,
                                 const int DV)
{
    __m512 xv[2];
#pragma GCC unroll 2
    for (int v = 0; v < DV; ++v)
        xv[v] = _mm512_loadu_ps(xr + 16 * v);
#pragma GCC unroll 8
    for (int k = k0; k < k1; ++k) {
        const __m512 u = _mm512_set1_ps(w[k * ws]);
#pragma GCC unroll 2
        for (int v = 0; v < DV; ++v)
            acc[k][v] = _mm512_fmadd_ps(u, xv[v], acc[k][v]);
    }
}

/* The accumulators of R rows x DV vectors, zeroed. */
ATTN512_INLINE void attn512_zero(__m512 acc[8][2], const int R, const int DV)
{
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k)
#pragma GCC unroll 2
        for (int v = 0; v < DV; ++v)
            acc[k][v] = _mm512_setzero_ps();
}

/* R finished sums written back: row k of y (at y + k * ldy) from acc[k], by attn512_put. */
ATTN512_INLINE void attn512_put_rows(float *y, ptrdiff_t ldy, __m512 acc[8][2], float f,
                                     int accumulate, const int R, const int DV)
{
#pragma GCC unroll 8
    for (int k = 0; k < R; ++k)
#pragma GCC unroll 2
        for (int v = 0; v < DV; ++v)
            attn512_put(y + k * ldy + 16 * v, acc[k][v], f, accumulate);
}

/* Causal weighted row sums for the R rows i .. i + R - 1 on 16 * DV head columns: row
 * i + k (at y + k * ldy) gets f * sum_{r=0}^{i+k} w_k[r] X[r * HS + d] (w_k at
 * w + k * ldw), summed in r order: first the keys every row has, then the triangle. */
ATTN512_INLINE void attn512_rows_block(float *restrict y, ptrdiff_t ldy,
                                       const float *restrict w, ptrdiff_t ldw,
                                       const float *restrict X, ptrdiff_t HS, ptrdiff_t i,
                                       float f, int accumulate, const int R, const int DV)
{
    __m512 acc[8][2];
    attn512_zero(acc, R, DV);
    for (ptrdiff_t r = 0; r <= i; ++r)
        attn512_step(acc, X + r * HS, w + r, ldw, 0, R, DV);
#pragma GCC unroll 8
    for (int t = 1; t < R; ++t)
        attn512_step(acc, X + (i + t) * HS, w + i + t, ldw, t, R, DV);
    attn512_put_rows(y, ldy, acc, f, accumulate, R, DV);
}

/* Causal weighted column sums for the R key columns j .. j + R - 1 on 16 * DV head
 * columns: row j + c of g (at g + c * ldg) gets f * sum_{i=j+c}^{T-1} w[i * ldw + c] X[i *
 * HS + d] (w already offset to column j), summed in i order: the triangle, then the rows
 * every column has. */
ATTN512_INLINE void attn512_cols_block(float *restrict g, ptrdiff_t ldg,
                                       const float *restrict w, ptrdiff_t ldw,
                                       const float *restrict X, ptrdiff_t HS, ptrdiff_t j,
                                       ptrdiff_t T, float f, int accumulate, const int R,
                                       const int DV)
{
    __m512 acc[8][2];
    attn512_zero(acc, R, DV);
#pragma GCC unroll 8
    for (int t = 0; t + 1 < R; ++t)
        attn512_step(acc, X + (j + t) * HS, w + (j + t) * ldw, 1, 0, t + 1, DV);
    for (ptrdiff_t i = j + R - 1; i < T; ++i)
        attn512_step(acc, X + i * HS, w + i * ldw, 1, 0, R, DV);
    attn512_put_rows(g, ldg, acc, f, accumulate, R, DV);
}

/* Both block kinds over all T rows (rows = 1) or key columns (rows = 0), in blocks of 8
 * then 4, 2, 1, and over the head's columns 32 at a time (then 16). */
#define ATTN512_BLOCK(R, DV)                                                                \
    do {                                                                                    \
        if (rows)                                                                           \
            attn512_rows_block(y + i * ldy + d, ldy, w + i * ldw, ldw, X + d, HS, i, f,     \
                               accumulate, R, DV);                                          \
        else                                                                                \
            attn512_cols_block(y + i * ldy + d, ldy, w + i, ldw, X + d, HS, i, T, f,        \
                               accumulate, R, DV);                                          \
    } while (0)

ATTN512_TARGET static void attn512_sums(float *restrict y, ptrdiff_t ldy,
                                        const float *restrict w, ptrdiff_t ldw,
                                        const float *restrict X, ptrdiff_t T, ptrdiff_t HS,
                                        float f, int accumulate, int rows)
{
    for (ptrdiff_t d = 0; d < HS; d += 32) {
        const int wide = HS - d >= 32;
        ptrdiff_t i = 0;
        for (; i + 8 <= T; i += 8) {
            if (wide)
                ATTN512_BLOCK(8, 2);
            else
                ATTN512_BLOCK(8, 1);
        }
        for (; i < T;) {
            const ptrdiff_t R = T - i >= 4 ? 4 : T - i >= 2 ? 2 : 1;
            if (R == 4) {
                if (wide) ATTN512_BLOCK(4, 2); else ATTN512_BLOCK(4, 1);
            } else if (R == 2) {
                if (wide) ATTN512_BLOCK(2, 2); else ATTN512_BLOCK(2, 1);
            } else {
                if (wide) ATTN512_BLOCK(1, 2); else ATTN512_BLOCK(1, 1);
            }
            i += R;
        }
    }
}
#undef ATTN512_BLOCK

/* The AVX2 copy's softmax_row on 16 lanes, for the R rows i .. i + R - 1 of a block (row
 * i + k has n = i + k + 1 keys; its scores at s + k * lds, clobbered; its P row at p + k *
 * ldp), with that function's bits: the scaling, the max (a max is the same in any
 * grouping) and the exponentials are lane-wise; the normalizer is summed in double over
 * the AVX2 copy's two accumulators of 4 lanes, which are here the low and high halves of
 * one 8-lane accumulator fed one 8-float half at a time in order (the lanes past the row
 * add exact zeros); and p = e * (1 / sum) to n, zeros to T. The rows go through each
 * phase together, so that their chains (max, sum, division) overlap. */
ATTN512_INLINE void attn512_softmax_rows(float *restrict p, ptrdiff_t ldp, float *restrict s,
                                         ptrdiff_t lds, ptrdiff_t i, ptrdiff_t T, float scale,
                                         const int R)
{
    typedef attn_w16_vec V;
    const V zero = {0};
    float mx[4];
    __m512d acc[4];
    float inv[4];
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k) {
        const ptrdiff_t n = i + k + 1, nf = (n + 15) / 16 * 16;
        float *sk = s + k * lds;
        V m = zero - INFINITY;
        for (ptrdiff_t j = 0; j < nf; j += 16) {
            V x = attn_w16_load(sk + j) * scale;
            if (j + 16 > n)
                x = attn_w16_mask_tail(x, n - j);
            attn_w16_store(sk + j, x);
            m = attn_w16_max(m, x);
        }
        mx[k] = attn_w16_hmax(m);
    }
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k) {
        const ptrdiff_t nf = (i + k + 16) / 16 * 16;
        float *sk = s + k * lds;
        __m512d a = _mm512_setzero_pd();
        for (ptrdiff_t j = 0; j < nf; j += 16) {
            const V e = attn_w16_exp_nonpos(attn_w16_load(sk + j) - mx[k]);
            attn_w16_store(sk + j, e);
            const __m512 ev = (__m512)e;
            a = _mm512_add_pd(a, _mm512_cvtps_pd(_mm512_castps512_ps256(ev)));
            a = _mm512_add_pd(a, _mm512_cvtps_pd(_mm256_castpd_ps(
                                     _mm512_extractf64x4_pd(_mm512_castps_pd(ev), 1))));
        }
        acc[k] = a;
    }
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k) {
        const __m256d half = _mm256_add_pd(_mm512_castpd512_pd256(acc[k]),
                                           _mm512_extractf64x4_pd(acc[k], 1));
        double sum = half[0];
        sum += half[1];
        sum += half[2];
        sum += half[3];
        inv[k] = (float)(1.0 / sum);
    }
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k) {
        const ptrdiff_t nf = (i + k + 16) / 16 * 16;
        const float *sk = s + k * lds;
        float *pk = p + k * ldp;
        const __m512 iv = _mm512_set1_ps(inv[k]);
        for (ptrdiff_t j = 0; j < T; j += 16) {
            const __m512 v = j < nf ? _mm512_mul_ps(_mm512_loadu_ps(sk + j), iv)
                                    : _mm512_setzero_ps();
            if (j + 16 <= T)
                _mm512_storeu_ps(pk + j, v);
            else
                _mm512_mask_storeu_ps(pk + j, (__mmask16)((1u << (T - j)) - 1u), v);
        }
    }
}

/* attn_softmax_grad_row with its bits, for the R rows i .. i + R - 1 (row i + k: n =
 * i + k + 1 entries, dP at ds + k * ldd, P at p + k * ldp): D = sum_j P_j dP_j in double
 * over 4 lanes (lane l takes j = l mod 4, in order; the products are exact in double, so
 * an FMA rounds as an add), the lanes added in its order; then dS_j = P_j (dP_j - D) on 16
 * lanes, to n only. The rows' dot products run side by side. */
ATTN512_INLINE void attn512_softmax_grad_rows(float *restrict ds, ptrdiff_t ldd,
                                              const float *restrict p, ptrdiff_t ldp,
                                              ptrdiff_t i, const int R)
{
    __m256d acc[4];
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k)
        acc[k] = _mm256_setzero_pd();
    for (ptrdiff_t j = 0; j < i + R; j += 4) {
#pragma GCC unroll 4
        for (int k = 0; k < R; ++k) {
            const ptrdiff_t n = i + k + 1;
            if (j >= n)
                continue;
            const __mmask16 keep = (__mmask16)(n - j >= 4 ? 0xF : (1u << (n - j)) - 1u);
            const __m256d a = _mm256_cvtps_pd(
                _mm512_castps512_ps128(_mm512_maskz_loadu_ps(keep, p + k * ldp + j)));
            const __m256d b = _mm256_cvtps_pd(
                _mm512_castps512_ps128(_mm512_maskz_loadu_ps(keep, ds + k * ldd + j)));
            acc[k] = _mm256_fmadd_pd(a, b, acc[k]);
        }
    }
#pragma GCC unroll 4
    for (int k = 0; k < R; ++k) {
        const ptrdiff_t n = i + k + 1;
        const __m512 dv = _mm512_set1_ps((float)((acc[k][0] + acc[k][2]) +
                                                 (acc[k][1] + acc[k][3])));
        float *dk = ds + k * ldd;
        const float *pk = p + k * ldp;
        for (ptrdiff_t j = 0; j < n; j += 16) {
            const __mmask16 keep = (__mmask16)(n - j >= 16 ? 0xFFFF : (1u << (n - j)) - 1u);
            const __m512 x = _mm512_maskz_loadu_ps(keep, dk + j);
            const __m512 y = _mm512_maskz_loadu_ps(keep, pk + j);
            _mm512_mask_storeu_ps(dk + j, keep, _mm512_mul_ps(y, _mm512_sub_ps(x, dv)));
        }
    }
}

/* The AVX2 copy's probs on these blocks: rows four at a time, scores for keys up to the
 * last row of the four, then the four rows' softmax together. */
ATTN512_TARGET static void attn512_probs(float *restrict P, ptrdiff_t ldp,
                                         const float *restrict q, ptrdiff_t ldq,
                                         const float *restrict kt, float *restrict s,
                                         ptrdiff_t T, ptrdiff_t HS, ptrdiff_t Tp, float scale,
                                         const float *pf, ptrdiff_t C)
{
    for (ptrdiff_t i = 0; i < T; i += 4) {
        const ptrdiff_t R = T - i >= 4 ? 4 : T - i;
        if (pf) {
            for (ptrdiff_t r = i; r < i + R; ++r) {
                attn_prefetch(pf + r * ldq, (size_t)HS * sizeof(float));
                attn_prefetch(pf + r * ldq + C, (size_t)HS * sizeof(float));
                attn_prefetch(pf + r * ldq + 2 * C, (size_t)HS * sizeof(float));
            }
        }
        attn512_scores_rows(s, Tp, q + i * ldq, ldq, kt, Tp, i + R, HS, R);
        if (R == 4)
            attn512_softmax_rows(P + i * ldp, ldp, s, Tp, i, T, scale, 4);
        else
            for (ptrdiff_t k = 0; k < R; ++k)
                attn512_softmax_rows(P + (i + k) * ldp, ldp, s + k * Tp, Tp, i + k, T, scale, 1);
    }
}

/* Forward for pair task = b * NH + h, HS a multiple of 16; see attention_forward_task. */
ATTN512_TARGET static void attn_avx512_forward_task(float *restrict out, float *restrict att,
                                                    const float *restrict qkv,
                                                    float *restrict scratch, ptrdiff_t task,
                                                    ptrdiff_t n_tasks, ptrdiff_t T, ptrdiff_t C,
                                                    ptrdiff_t NH)
{
    const ptrdiff_t b = task / NH, h = task % NH;
    const ptrdiff_t HS = C / NH, ld = 3 * C, Tp = attn_tpad(T);
    const float scale = attn_scale(HS);
    const float *base = qkv + b * T * ld + h * HS;
    attn_fwd_scratch sc;
    attn_fwd_layout(&sc, scratch, T, HS);
    const int prefetch = task + 1 < n_tasks;
    const ptrdiff_t bn = (task + 1) / NH, hn = (task + 1) % NH;
    attn_pack_transposed(sc.kt, base + C, ld, T, HS, Tp);
    attn_avx2_pack(sc.vp, base + 2 * C, ld, T, HS);
    float *A = att ? att + task * T * T : sc.ps;
    const ptrdiff_t lda = att ? T : Tp;
    attn512_probs(A, lda, base, ld, sc.kt, sc.s, T, HS, Tp, scale,
                  prefetch ? qkv + bn * T * ld + hn * HS : NULL, C);
    if (prefetch) {
        const float *pf_y = out + bn * T * C + hn * HS;
        for (ptrdiff_t r = 0; r < T; ++r)
            attn_prefetch(pf_y + r * C, (size_t)HS * sizeof(float));
    }
    attn512_sums(out + b * T * C + h * HS, C, A, lda, sc.vp, T, HS, 1.0f, 0, 1);
}

/* Backward for pair task = b * NH + h, HS a multiple of 16; see attention_backward_task. */
ATTN512_TARGET static void attn_avx512_backward_task(float *restrict dqkv, float *restrict out,
                                                     const float *restrict dout,
                                                     const float *restrict qkv,
                                                     const float *restrict att,
                                                     float *restrict scratch, ptrdiff_t task,
                                                     ptrdiff_t n_tasks, ptrdiff_t T,
                                                     ptrdiff_t C, ptrdiff_t NH, int accumulate)
{
    const ptrdiff_t b = task / NH, h = task % NH;
    const ptrdiff_t HS = C / NH, ld = 3 * C, Tp = attn_tpad(T);
    const float scale = attn_scale(HS);
    const float *base = qkv + b * T * ld + h * HS;
    const float *dy = dout + b * T * C + h * HS;
    float *gbase = dqkv + b * T * ld + h * HS;
    attn_bwd_scratch sc;
    attn_bwd_layout(&sc, scratch, T, HS);
    const int prefetch = task + 1 < n_tasks;
    const ptrdiff_t next_task = prefetch ? task + 1 : task;
    const ptrdiff_t bn = next_task / NH, hn = next_task % NH;
    const float *next = qkv + bn * T * ld + hn * HS;
    const float *next_dy = dout + bn * T * C + hn * HS;
    const float *next_g = dqkv + bn * T * ld + hn * HS;
    const size_t row_bytes = (size_t)HS * sizeof(float);
    attn_pack_transposed(sc.vt, base + 2 * C, ld, T, HS, Tp);
    attn_avx2_pack(sc.qp, base, ld, T, HS);
    attn_avx2_pack(sc.kp, base + C, ld, T, HS);
    attn_avx2_pack(sc.dyp, dy, C, T, HS);
    const float *A = att ? att + task * T * T : sc.ps;
    const ptrdiff_t lda = att ? T : Tp;
    if (!att) {
        attn_pack_transposed(sc.kt, base + C, ld, T, HS, Tp);
        attn512_probs(sc.ps, Tp, sc.qp, HS, sc.kt, sc.s, T, HS, Tp, scale, NULL, C);
    }
    if (out) {
        attn_avx2_pack(sc.vp, base + 2 * C, ld, T, HS);
        attn512_sums(out + b * T * C + h * HS, C, A, lda, sc.vp, T, HS, 1.0f, 0, 1);
    }
    /* dP_ij = dy_i . v_j, four rows at a time, then each row's dS */
    for (ptrdiff_t i = 0; i < T; i += 4) {
        const ptrdiff_t R = T - i >= 4 ? 4 : T - i;
        if (prefetch) {
            for (ptrdiff_t r = i; r < i + R; ++r) {
                attn_prefetch(next + r * ld, row_bytes);
                attn_prefetch(next + r * ld + C, row_bytes);
                attn_prefetch(next + r * ld + 2 * C, row_bytes);
                attn_prefetch(next_dy + r * C, row_bytes);
                if (att)
                    attn_prefetch(att + (next_task * T + r) * T, (size_t)T * sizeof(float));
            }
        }
        attn512_scores_rows(sc.ds + i * Tp, Tp, sc.dyp + i * HS, HS, sc.vt, Tp, i + R, HS, R);
        if (R == 4)
            attn512_softmax_grad_rows(sc.ds + i * Tp, Tp, A + i * lda, lda, i, 4);
        else
            for (ptrdiff_t k = 0; k < R; ++k)
                attn512_softmax_grad_rows(sc.ds + (i + k) * Tp, Tp, A + (i + k) * lda, lda,
                                          i + k, 1);
    }
    /* dq_i = scale * sum_{j <= i} dS_ij k_j */
    attn512_sums(gbase, ld, sc.ds, Tp, sc.kp, T, HS, scale, accumulate, 1);
    if (prefetch) {
        for (ptrdiff_t r = 0; r < T; ++r) {
            attn_prefetch(next_g + r * ld, row_bytes);
            attn_prefetch(next_g + r * ld + C, row_bytes);
            attn_prefetch(next_g + r * ld + 2 * C, row_bytes);
        }
    }
    /* dk_j = scale * sum_{i >= j} dS_ij q_i and dv_j = sum_{i >= j} P_ij dy_i */
    attn512_sums(gbase + C, ld, sc.ds, Tp, sc.qp, T, HS, scale, accumulate, 0);
    attn512_sums(gbase + 2 * C, ld, A, lda, sc.dyp, T, HS, 1.0f, accumulate, 0);
}

#endif /* RANDYGPT_ATTENTION_AVX512_H */
