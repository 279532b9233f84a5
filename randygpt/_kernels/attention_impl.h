/* Per-(batch, head) bodies of randygpt's fused causal attention (see attention.pyx).
 *
 * Dimensions: T time, C channels, NH heads, HS head size = C / NH.
 * qkv is (B*T, 3C) row-major: q at columns [0, C), k at [C, 2C), v at [2C, 3C); head h
 * owns columns h*HS .. (h+1)*HS of each third. One call handles one (b, h) pair and
 * writes only that pair's slices, so the caller may run pairs on any threads.
 *
 * Every output element is a sum taken in a fixed order that depends on the shapes
 * alone, so results are bit-identical for any thread count. The loops are written
 * so that gcc -O3 vectorizes them without -ffast-math: dot products keep 8 partial
 * sums (lanes) added in a fixed tree, and weighted row sums run over j for each
 * output column, which is plain element-wise work across the head's columns.
 *
 * The task functions are cloned for x86-64-v3 (AVX2 + FMA) and baseline x86-64 and
 * the loader picks one per CPU. The two clones round differently (FMA), but a given
 * machine always runs the same one.
 */
#ifndef RANDYGPT_ATTENTION_IMPL_H
#define RANDYGPT_ATTENTION_IMPL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) \
    && defined(__linux__)
#define ATTN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ATTN_CLONES
#endif

#define ATTN_LANES 8

/* Floats of per-thread scratch each task function needs. */
static inline size_t attention_forward_scratch(ptrdiff_t T, ptrdiff_t HS)
{
    return (size_t)(2 * T * HS);
}

static inline size_t attention_backward_scratch(ptrdiff_t T, ptrdiff_t HS)
{
    return (size_t)(4 * T * HS + T * T + HS);
}

/* sum_d a[d] * b[d] over 8 lanes, reduced in a fixed tree. */
static inline float attn_dot(const float *restrict a, const float *restrict b, ptrdiff_t n)
{
    float acc[ATTN_LANES] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    ptrdiff_t d = 0;
    for (; d + ATTN_LANES <= n; d += ATTN_LANES)
        for (int l = 0; l < ATTN_LANES; ++l)
            acc[l] += a[d + l] * b[d + l];
    for (int l = 0; d < n; ++d, ++l)
        acc[l] += a[d] * b[d];
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

/* max of x[0..n), n >= 1, over lanes. A NaN may be skipped here, but it still
 * reaches every probability of its row through x - max. */
static inline float attn_max(const float *x, ptrdiff_t n)
{
    float m[ATTN_LANES];
    for (int l = 0; l < ATTN_LANES; ++l)
        m[l] = x[0];
    ptrdiff_t j = 0;
    for (; j + ATTN_LANES <= n; j += ATTN_LANES)
        for (int l = 0; l < ATTN_LANES; ++l)
            m[l] = x[j + l] > m[l] ? x[j + l] : m[l];
    for (int l = 0; j < n; ++j, ++l)
        m[l] = x[j] > m[l] ? x[j] : m[l];
    float r = m[0];
    for (int l = 1; l < ATTN_LANES; ++l)
        r = m[l] > r ? m[l] : r;
    return r;
}

/* e^x for x <= 0 (scores minus their row max), as a loop gcc can vectorize: libm's
 * expf is a scalar call and was the largest cost of the forward. Cody-Waite
 * reduction x = n ln2 + r with |r| <= ln2/2, then a degree-6 polynomial for e^r
 * (relative error about 1e-7, within 2 ulp of the correctly rounded value) and
 * 2^n built from its exponent bits. Below -87 the true value is under FLT_MIN and
 * becomes 0: next to the row max's e^0 = 1 it is far below float resolution. NaN
 * stays NaN. */
static inline float attn_exp_nonpos(float x)
{
    const float lo = -87.0f;
    const float xc = x < lo ? lo : x;
    /* Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a
     * floor call (safe: -fno-fast-math keeps the two operations). */
    const float shifter = 12582912.0f;
    const float n = (xc * 1.44269504088896341f + shifter) - shifter;
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    const float e = p * two_n;
    return x < lo ? 0.0f : e;
}

/* x[j] = e^(x[j] - m) in place; returns the sum of the new values, taken in double
 * over lanes (a row of T terms in (0, 1]; double keeps the normalizer exact to float
 * precision for any T). */
static inline double attn_exp_sum(float *x, ptrdiff_t n, float m)
{
    for (ptrdiff_t j = 0; j < n; ++j)
        x[j] = attn_exp_nonpos(x[j] - m);
    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    ptrdiff_t j = 0;
    for (; j + 4 <= n; j += 4)
        for (int l = 0; l < 4; ++l)
            acc[l] += (double)x[j + l];
    for (int l = 0; j < n; ++j, ++l)
        acc[l] += (double)x[j];
    return (acc[0] + acc[2]) + (acc[1] + acc[3]);
}

/* y[d] = sum_{r = r0}^{r1 - 1} w[r * ws] * X[r * HS + d] for d in [0, HS), summed in r
 * order for every d. Blocks of 32 and 8 columns keep the partial sums in registers
 * across r; the blocking changes nothing in the arithmetic of an element. */
static inline void attn_weighted_rows(float *restrict y, const float *restrict w, ptrdiff_t ws,
                                      const float *restrict X, ptrdiff_t r0, ptrdiff_t r1,
                                      ptrdiff_t HS)
{
    ptrdiff_t d = 0;
    for (; d + 32 <= HS; d += 32) {
        float acc[32];
        for (int l = 0; l < 32; ++l)
            acc[l] = 0.0f;
        for (ptrdiff_t r = r0; r < r1; ++r) {
            const float wr = w[r * ws];
            const float *xr = X + r * HS + d;
            for (int l = 0; l < 32; ++l)
                acc[l] += wr * xr[l];
        }
        for (int l = 0; l < 32; ++l)
            y[d + l] = acc[l];
    }
    for (; d + 8 <= HS; d += 8) {
        float acc[8];
        for (int l = 0; l < 8; ++l)
            acc[l] = 0.0f;
        for (ptrdiff_t r = r0; r < r1; ++r) {
            const float wr = w[r * ws];
            const float *xr = X + r * HS + d;
            for (int l = 0; l < 8; ++l)
                acc[l] += wr * xr[l];
        }
        for (int l = 0; l < 8; ++l)
            y[d + l] = acc[l];
    }
    for (; d < HS; ++d) {
        float acc = 0.0f;
        for (ptrdiff_t r = r0; r < r1; ++r)
            acc += w[r * ws] * X[r * HS + d];
        y[d] = acc;
    }
}

/* Copies the HS columns at col of T rows (row stride ld) into dst, rows HS apart:
 * the head's rows of q, k, v or dy become one contiguous block that stays in L1
 * (rows 3C floats apart all fall into a few cache sets). */
static inline void attn_pack(float *restrict dst, const float *restrict src, ptrdiff_t ld,
                             ptrdiff_t T, ptrdiff_t HS)
{
    for (ptrdiff_t t = 0; t < T; ++t)
        memcpy(dst + t * HS, src + t * ld, (size_t)HS * sizeof(float));
}

/* The float32 value of 1/sqrt(HS), the same number the NumPy reference uses. */
static inline float attn_scale(ptrdiff_t HS)
{
    return (float)(1.0 / sqrt((double)HS));
}

/* Forward for pair task = b * NH + h.
 * out (B*T, C) written at columns h*HS..; att (B, NH, T, T) written;
 * scratch: attention_forward_scratch(T, HS) floats. */
ATTN_CLONES
static void attention_forward_task(float *restrict out, float *restrict att,
                                   const float *restrict qkv, float *restrict scratch,
                                   ptrdiff_t task, ptrdiff_t T, ptrdiff_t C, ptrdiff_t NH)
{
    const ptrdiff_t b = task / NH, h = task % NH;
    const ptrdiff_t HS = C / NH, ld = 3 * C;
    const float scale = attn_scale(HS);
    const float *base = qkv + b * T * ld + h * HS; /* q of row 0 of this pair */
    float *kp = scratch;
    float *vp = scratch + T * HS;
    attn_pack(kp, base + C, ld, T, HS);
    attn_pack(vp, base + 2 * C, ld, T, HS);
    float *A = att + task * T * T;
    for (ptrdiff_t i = 0; i < T; ++i) {
        const float *qi = base + i * ld;
        float *row = A + i * T;
        /* Causal: only keys j <= i get a score; the rest of the row is exactly 0. */
        for (ptrdiff_t j = 0; j <= i; ++j)
            row[j] = attn_dot(qi, kp + j * HS, HS) * scale;
        for (ptrdiff_t j = i + 1; j < T; ++j)
            row[j] = 0.0f;
        /* Max subtraction keeps every exponent <= 0. */
        const float m = attn_max(row, i + 1);
        const float inv = (float)(1.0 / attn_exp_sum(row, i + 1, m));
        for (ptrdiff_t j = 0; j <= i; ++j)
            row[j] *= inv;
        /* y_i = sum_j P_ij v_j */
        attn_weighted_rows(out + (b * T + i) * C + h * HS, row, 1, vp, 0, i + 1, HS);
    }
}

/* Backward for pair task = b * NH + h, accumulating into dqkv (B*T, 3C).
 * dout (B*T, C) and att (B, NH, T, T) as saved by the forward; att's entries above
 * the diagonal are never read. scratch: attention_backward_scratch(T, HS) floats.
 * Each gradient element is finished in scratch and added to dqkv once, so two
 * calls add exactly twice the gradient. */
ATTN_CLONES
static void attention_backward_task(float *restrict dqkv, const float *restrict dout,
                                    const float *restrict qkv, const float *restrict att,
                                    float *restrict scratch,
                                    ptrdiff_t task, ptrdiff_t T, ptrdiff_t C, ptrdiff_t NH)
{
    const ptrdiff_t b = task / NH, h = task % NH;
    const ptrdiff_t HS = C / NH, ld = 3 * C;
    const float scale = attn_scale(HS);
    const float *base = qkv + b * T * ld + h * HS;
    float *gbase = dqkv + b * T * ld + h * HS;
    float *qp = scratch;
    float *kp = qp + T * HS;
    float *vp = kp + T * HS;
    float *dyp = vp + T * HS;
    float *ds = dyp + T * HS;  /* (T, T), lower triangle used */
    float *tmp = ds + T * T;   /* (HS,) */
    attn_pack(qp, base, ld, T, HS);
    attn_pack(kp, base + C, ld, T, HS);
    attn_pack(vp, base + 2 * C, ld, T, HS);
    attn_pack(dyp, dout + b * T * C + h * HS, C, T, HS);
    const float *A = att + task * T * T;
    for (ptrdiff_t i = 0; i < T; ++i) {
        const float *p = A + i * T;
        float *dsi = ds + i * T;
        /* y_i = sum_j P_ij v_j  =>  dP_ij = dy_i . v_j */
        for (ptrdiff_t j = 0; j <= i; ++j)
            dsi[j] = attn_dot(dyp + i * HS, vp + j * HS, HS);
        /* P_i = softmax(S_i)  =>  dS_ij = P_ij (dP_ij - D_i), D_i = sum_j P_ij dP_ij;
         * D_i in double over lanes, like the softmax sum. */
        double acc[4] = {0.0, 0.0, 0.0, 0.0};
        ptrdiff_t j = 0;
        for (; j + 4 <= i + 1; j += 4)
            for (int l = 0; l < 4; ++l)
                acc[l] += (double)p[j + l] * (double)dsi[j + l];
        for (int l = 0; j <= i; ++j, ++l)
            acc[l] += (double)p[j] * (double)dsi[j];
        const float D = (float)((acc[0] + acc[2]) + (acc[1] + acc[3]));
        for (j = 0; j <= i; ++j)
            dsi[j] = p[j] * (dsi[j] - D);
        /* S_ij = q_i . k_j * scale  =>  dq_i = scale * sum_j dS_ij k_j */
        attn_weighted_rows(tmp, dsi, 1, kp, 0, i + 1, HS);
        float *dq = gbase + i * ld;
        for (ptrdiff_t d = 0; d < HS; ++d)
            dq[d] += tmp[d] * scale;
    }
    for (ptrdiff_t j = 0; j < T; ++j) {
        /* dk_j = scale * sum_{i >= j} dS_ij q_i */
        attn_weighted_rows(tmp, ds + j, T, qp, j, T, HS);
        float *dk = gbase + j * ld + C;
        for (ptrdiff_t d = 0; d < HS; ++d)
            dk[d] += tmp[d] * scale;
        /* dv_j = sum_{i >= j} P_ij dy_i */
        attn_weighted_rows(tmp, A + j, T, dyp, j, T, HS);
        float *dv = gbase + j * ld + 2 * C;
        for (ptrdiff_t d = 0; d < HS; ++d)
            dv[d] += tmp[d];
    }
}

#endif /* RANDYGPT_ATTENTION_IMPL_H */
