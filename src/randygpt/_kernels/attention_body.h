/* One copy of the per-(batch, head) attention bodies for one vector width.
 *
 * Included only by attention_impl.h, once per instruction set, with these defined:
 *   ATTN_VW        floats per vector (8 for AVX2, 4 for SSE2/NEON, 1 for plain C)
 *   ATTN_FN(name)  gives the copy's own name for name
 *   ATTN_TARGET    the copy's target attribute (or nothing)
 * No include guard on purpose. Included with ATTN_FN undefined, it defines nothing:
 * attention.pyx names it in a cdef extern block only so that the build notices when it
 * changes.
 *
 * Both products of the head's rows are written so that no horizontal sums are needed:
 *   - scores s_j = x . y_j for a block of keys j come from the keys stored transposed
 *     (HS, Tp) in scratch, one vector of keys per accumulator;
 *   - weighted row sums y = sum_r w_r X_r run over r with the head's columns in vectors.
 * Either way each output element is a sum over its index in plain order, the same for
 * any thread count.
 */

#ifdef ATTN_FN

#define ATTN_VEC ATTN_FN(vec)
#define ATTN_IVEC ATTN_FN(ivec)
#define ATTN_HVEC ATTN_FN(hvec)
#define ATTN_DVEC ATTN_FN(dvec)
#define ATTN_LOAD ATTN_FN(load)
#define ATTN_STORE ATTN_FN(store)

#if ATTN_VW > 1
typedef float ATTN_VEC __attribute__((vector_size(ATTN_VW * 4)));
#else
typedef float ATTN_VEC;
#endif

/* Unaligned load and store (numpy gives no alignment beyond the element's). */
ATTN_TARGET static inline ATTN_VEC ATTN_LOAD(const float *p)
{
    ATTN_VEC v;
    memcpy(&v, p, sizeof v);
    return v;
}

ATTN_TARGET static inline void ATTN_STORE(float *p, ATTN_VEC v)
{
    memcpy(p, &v, sizeof v);
}

/* y[0..n) = 0, without a call to memset for a row of a few vectors. */
ATTN_TARGET static inline void ATTN_FN(zero)(float *y, ptrdiff_t n)
{
    const ATTN_VEC zero = {0};
    ptrdiff_t d = 0;
    for (; d + ATTN_VW <= n; d += ATTN_VW)
        ATTN_STORE(y + d, zero);
    for (; d < n; ++d)
        y[d] = 0.0f;
}

/* y[d] += x[d] * factor for d in [0, n), or y[d] = x[d] * factor when !accumulate: a
 * finished gradient row stored in its output once (so repeated calls accumulate exact
 * multiples, and the written form equals the accumulated one onto zeros). */
ATTN_TARGET static inline void ATTN_FN(add_scaled)(float *restrict y, const float *restrict x,
                                                   float factor, ptrdiff_t n, int accumulate)
{
    ptrdiff_t d = 0;
    if (!accumulate) {
        for (; d + ATTN_VW <= n; d += ATTN_VW)
            ATTN_STORE(y + d, ATTN_LOAD(x + d) * factor);
        for (; d < n; ++d)
            y[d] = x[d] * factor;
        return;
    }
    for (; d + ATTN_VW <= n; d += ATTN_VW)
        ATTN_STORE(y + d, ATTN_LOAD(y + d) + ATTN_LOAD(x + d) * factor);
    for (; d < n; ++d)
        y[d] += x[d] * factor;
}

/* Copies HS columns of T rows (row stride ld) into dst, rows HS apart: the head's
 * rows become one contiguous block that stays in L1 (rows 3C floats apart all fall
 * into a few cache sets). */
ATTN_TARGET static inline void ATTN_FN(pack)(float *restrict dst, const float *restrict src,
                                             ptrdiff_t ld, ptrdiff_t T, ptrdiff_t HS)
{
    for (ptrdiff_t t = 0; t < T; ++t) {
        const float *row = src + t * ld;
        float *out = dst + t * HS;
        ptrdiff_t d = 0;
        for (; d + ATTN_VW <= HS; d += ATTN_VW)
            ATTN_STORE(out + d, ATTN_LOAD(row + d));
        for (; d < HS; ++d)
            out[d] = row[d];
    }
}

/* s0[j] = sum_d x0[d] * Xt[d * ldt + j] and the same for s1 with x1, for j in [0, n)
 * rounded up to whole vectors: the entries past n come from Xt's padding or from keys
 * the caller ignores. Two query rows share every load of Xt; up to eight independent
 * accumulators hide the latency of the d chain. */
ATTN_TARGET static inline void ATTN_FN(row_scores2)(float *restrict s0, float *restrict s1,
                                                    const float *restrict x0,
                                                    const float *restrict x1,
                                                    const float *restrict Xt, ptrdiff_t ldt,
                                                    ptrdiff_t n, ptrdiff_t HS)
{
    const ptrdiff_t VW = ATTN_VW;
    ptrdiff_t j = 0;
    /* Three vectors left also take the four-vector block: its eight chains finish no
     * later than a two-vector block followed by a latency-bound single one. */
    for (; n - j > 2 * VW; j += 4 * VW) {
        ATTN_VEC a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        ATTN_VEC b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
        const float *xt = Xt + j;
        for (ptrdiff_t d = 0; d < HS; ++d, xt += ldt) {
            const ATTN_VEC k0 = ATTN_LOAD(xt), k1 = ATTN_LOAD(xt + VW);
            const ATTN_VEC k2 = ATTN_LOAD(xt + 2 * VW), k3 = ATTN_LOAD(xt + 3 * VW);
            const float u = x0[d], w = x1[d];
            a0 += u * k0;
            a1 += u * k1;
            a2 += u * k2;
            a3 += u * k3;
            b0 += w * k0;
            b1 += w * k1;
            b2 += w * k2;
            b3 += w * k3;
        }
        ATTN_STORE(s0 + j, a0);
        ATTN_STORE(s0 + j + VW, a1);
        ATTN_STORE(s0 + j + 2 * VW, a2);
        ATTN_STORE(s0 + j + 3 * VW, a3);
        ATTN_STORE(s1 + j, b0);
        ATTN_STORE(s1 + j + VW, b1);
        ATTN_STORE(s1 + j + 2 * VW, b2);
        ATTN_STORE(s1 + j + 3 * VW, b3);
    }
    for (; n - j > VW; j += 2 * VW) {
        ATTN_VEC a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};
        const float *xt = Xt + j;
        for (ptrdiff_t d = 0; d < HS; ++d, xt += ldt) {
            const ATTN_VEC k0 = ATTN_LOAD(xt), k1 = ATTN_LOAD(xt + VW);
            const float u = x0[d], w = x1[d];
            a0 += u * k0;
            a1 += u * k1;
            b0 += w * k0;
            b1 += w * k1;
        }
        ATTN_STORE(s0 + j, a0);
        ATTN_STORE(s0 + j + VW, a1);
        ATTN_STORE(s1 + j, b0);
        ATTN_STORE(s1 + j + VW, b1);
    }
    for (; j < n; j += VW) {
        ATTN_VEC a0 = {0}, b0 = {0};
        const float *xt = Xt + j;
        for (ptrdiff_t d = 0; d < HS; ++d, xt += ldt) {
            const ATTN_VEC k0 = ATTN_LOAD(xt);
            a0 += x0[d] * k0;
            b0 += x1[d] * k0;
        }
        ATTN_STORE(s0 + j, a0);
        ATTN_STORE(s1 + j, b0);
    }
}

/* row_scores2 for a single query row (the last row when T is odd). */
ATTN_TARGET static inline void ATTN_FN(row_scores)(float *restrict s, const float *restrict x,
                                                   const float *restrict Xt, ptrdiff_t ldt,
                                                   ptrdiff_t n, ptrdiff_t HS)
{
    const ptrdiff_t VW = ATTN_VW;
    ptrdiff_t j = 0;
    for (; n - j > 2 * VW; j += 4 * VW) {
        ATTN_VEC a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        const float *xt = Xt + j;
        for (ptrdiff_t d = 0; d < HS; ++d, xt += ldt) {
            const float u = x[d];
            a0 += u * ATTN_LOAD(xt);
            a1 += u * ATTN_LOAD(xt + VW);
            a2 += u * ATTN_LOAD(xt + 2 * VW);
            a3 += u * ATTN_LOAD(xt + 3 * VW);
        }
        ATTN_STORE(s + j, a0);
        ATTN_STORE(s + j + VW, a1);
        ATTN_STORE(s + j + 2 * VW, a2);
        ATTN_STORE(s + j + 3 * VW, a3);
    }
    for (; j < n; j += VW) {
        ATTN_VEC a0 = {0};
        const float *xt = Xt + j;
        for (ptrdiff_t d = 0; d < HS; ++d, xt += ldt)
            a0 += x[d] * ATTN_LOAD(xt);
        ATTN_STORE(s + j, a0);
    }
}

/* y0[d] (+)= sum_{r = r0}^{r1 - 1} w0[r * ws] * X[r * HS + d] and the same for y1 with
 * w1, for d in [0, HS): each element is summed in r order onto 0 (from_zero) or onto
 * its value in y. Two outputs share every load of X; blocks of columns keep the sums
 * in registers. */
ATTN_TARGET static inline void ATTN_FN(rows_acc2)(float *restrict y0, float *restrict y1,
                                                  const float *restrict w0,
                                                  const float *restrict w1, ptrdiff_t ws,
                                                  const float *restrict X, ptrdiff_t r0,
                                                  ptrdiff_t r1, ptrdiff_t HS, int from_zero)
{
    if (from_zero) {
        ATTN_FN(zero)(y0, HS);
        ATTN_FN(zero)(y1, HS);
    }
    const ptrdiff_t VW = ATTN_VW;
    ptrdiff_t d = 0;
    for (; d + 4 * VW <= HS; d += 4 * VW) {
        ATTN_VEC a0 = ATTN_LOAD(y0 + d), a1 = ATTN_LOAD(y0 + d + VW);
        ATTN_VEC a2 = ATTN_LOAD(y0 + d + 2 * VW), a3 = ATTN_LOAD(y0 + d + 3 * VW);
        ATTN_VEC b0 = ATTN_LOAD(y1 + d), b1 = ATTN_LOAD(y1 + d + VW);
        ATTN_VEC b2 = ATTN_LOAD(y1 + d + 2 * VW), b3 = ATTN_LOAD(y1 + d + 3 * VW);
        for (ptrdiff_t r = r0; r < r1; ++r) {
            const float *xr = X + r * HS + d;
            const ATTN_VEC x0 = ATTN_LOAD(xr), x1 = ATTN_LOAD(xr + VW);
            const ATTN_VEC x2 = ATTN_LOAD(xr + 2 * VW), x3 = ATTN_LOAD(xr + 3 * VW);
            const float u = w0[r * ws], w = w1[r * ws];
            a0 += u * x0;
            a1 += u * x1;
            a2 += u * x2;
            a3 += u * x3;
            b0 += w * x0;
            b1 += w * x1;
            b2 += w * x2;
            b3 += w * x3;
        }
        ATTN_STORE(y0 + d, a0);
        ATTN_STORE(y0 + d + VW, a1);
        ATTN_STORE(y0 + d + 2 * VW, a2);
        ATTN_STORE(y0 + d + 3 * VW, a3);
        ATTN_STORE(y1 + d, b0);
        ATTN_STORE(y1 + d + VW, b1);
        ATTN_STORE(y1 + d + 2 * VW, b2);
        ATTN_STORE(y1 + d + 3 * VW, b3);
    }
    for (; d + 2 * VW <= HS; d += 2 * VW) {
        ATTN_VEC a0 = ATTN_LOAD(y0 + d), a1 = ATTN_LOAD(y0 + d + VW);
        ATTN_VEC b0 = ATTN_LOAD(y1 + d), b1 = ATTN_LOAD(y1 + d + VW);
        for (ptrdiff_t r = r0; r < r1; ++r) {
            const float *xr = X + r * HS + d;
            const ATTN_VEC x0 = ATTN_LOAD(xr), x1 = ATTN_LOAD(xr + VW);
            const float u = w0[r * ws], w = w1[r * ws];
            a0 += u * x0;
            a1 += u * x1;
            b0 += w * x0;
            b1 += w * x1;
        }
        ATTN_STORE(y0 + d, a0);
        ATTN_STORE(y0 + d + VW, a1);
        ATTN_STORE(y1 + d, b0);
        ATTN_STORE(y1 + d + VW, b1);
    }
    for (; d + VW <= HS; d += VW) {
        ATTN_VEC a0 = ATTN_LOAD(y0 + d), b0 = ATTN_LOAD(y1 + d);
        for (ptrdiff_t r = r0; r < r1; ++r) {
            const ATTN_VEC x0 = ATTN_LOAD(X + r * HS + d);
            a0 += w0[r * ws] * x0;
            b0 += w1[r * ws] * x0;
        }
        ATTN_STORE(y0 + d, a0);
        ATTN_STORE(y1 + d, b0);
    }
    for (; d < HS; ++d) {
        float a0 = y0[d], b0 = y1[d];
        for (ptrdiff_t r = r0; r < r1; ++r) {
            a0 += w0[r * ws] * X[r * HS + d];
            b0 += w1[r * ws] * X[r * HS + d];
        }
        y0[d] = a0;
        y1[d] = b0;
    }
}

/* rows_acc2 for one output: y[d] (+)= sum_{r = r0}^{r1 - 1} w[r * ws] * X[r * HS + d]. */
ATTN_TARGET static inline void ATTN_FN(rows_acc)(float *restrict y, const float *restrict w,
                                                 ptrdiff_t ws, const float *restrict X,
                                                 ptrdiff_t r0, ptrdiff_t r1, ptrdiff_t HS,
                                                 int from_zero)
{
    if (from_zero)
        ATTN_FN(zero)(y, HS);
    const ptrdiff_t VW = ATTN_VW;
    ptrdiff_t d = 0;
    for (; d + 4 * VW <= HS; d += 4 * VW) {
        ATTN_VEC a0 = ATTN_LOAD(y + d), a1 = ATTN_LOAD(y + d + VW);
        ATTN_VEC a2 = ATTN_LOAD(y + d + 2 * VW), a3 = ATTN_LOAD(y + d + 3 * VW);
        for (ptrdiff_t r = r0; r < r1; ++r) {
            const float *xr = X + r * HS + d;
            const float u = w[r * ws];
            a0 += u * ATTN_LOAD(xr);
            a1 += u * ATTN_LOAD(xr + VW);
            a2 += u * ATTN_LOAD(xr + 2 * VW);
            a3 += u * ATTN_LOAD(xr + 3 * VW);
        }
        ATTN_STORE(y + d, a0);
        ATTN_STORE(y + d + VW, a1);
        ATTN_STORE(y + d + 2 * VW, a2);
        ATTN_STORE(y + d + 3 * VW, a3);
    }
    for (; d + VW <= HS; d += VW) {
        ATTN_VEC a0 = ATTN_LOAD(y + d);
        for (ptrdiff_t r = r0; r < r1; ++r)
            a0 += w[r * ws] * ATTN_LOAD(X + r * HS + d);
        ATTN_STORE(y + d, a0);
    }
    for (; d < HS; ++d) {
        float a0 = y[d];
        for (ptrdiff_t r = r0; r < r1; ++r)
            a0 += w[r * ws] * X[r * HS + d];
        y[d] = a0;
    }
}

#if ATTN_VW > 1
typedef int32_t ATTN_IVEC __attribute__((vector_size(ATTN_VW * 4)));

/* mask ? a : b, lane by lane (a mask lane is all ones or all zeros). */
ATTN_TARGET static inline ATTN_VEC ATTN_FN(select)(ATTN_IVEC mask, ATTN_VEC a, ATTN_VEC b)
{
    return (ATTN_VEC)((mask & (ATTN_IVEC)a) | (~mask & (ATTN_IVEC)b));
}

/* randygpt_exp_nonpos on every lane (see fastexp.h for the method and its error). */
ATTN_TARGET static inline ATTN_VEC ATTN_FN(exp_nonpos)(ATTN_VEC x)
{
    const ATTN_VEC zero = {0};
    const ATTN_VEC lo = zero + RANDYGPT_FASTEXP_LO;
    const ATTN_VEC xc = ATTN_FN(select)(x >= lo, x, lo);
    ATTN_VEC n, r, p;
    RANDYGPT_FASTEXP_STEPS(xc, n, r, p);
    const ATTN_IVEC bits = (__builtin_convertvector(n, ATTN_IVEC) + 127) << 23;
    const ATTN_VEC e = p * (ATTN_VEC)bits;
    return ATTN_FN(select)(x >= lo, e, ATTN_FN(select)(x < lo, zero, x));
}

/* max(m, x) lane by lane, keeping m where x is NaN. */
ATTN_TARGET static inline ATTN_VEC ATTN_FN(max)(ATTN_VEC m, ATTN_VEC x)
{
    return ATTN_FN(select)(x > m, x, m);
}

/* x with lanes k >= keep set to -inf (the masked keys of a row's last vector). */
ATTN_TARGET static inline ATTN_VEC ATTN_FN(mask_tail)(ATTN_VEC x, ptrdiff_t keep)
{
    const ATTN_VEC zero = {0};
    const ATTN_VEC lane = ATTN_LOAD(attn_lane_index);
    return ATTN_FN(select)(lane < (float)keep, x, zero - INFINITY);
}

/* The largest lane of m (lanes read in place, not through memory). */
ATTN_TARGET static inline float ATTN_FN(hmax)(ATTN_VEC m)
{
    float r = m[0];
    for (int l = 1; l < ATTN_VW; ++l)
        r = m[l] > r ? m[l] : r;
    return r;
}
#else
ATTN_TARGET static inline ATTN_VEC ATTN_FN(mask_tail)(ATTN_VEC x, ptrdiff_t keep)
{
    return keep > 0 ? x : -INFINITY;
}

ATTN_TARGET static inline float ATTN_FN(hmax)(ATTN_VEC m)
{
    return m;
}

ATTN_TARGET static inline ATTN_VEC ATTN_FN(exp_nonpos)(ATTN_VEC x)
{
    return randygpt_exp_nonpos(x);
}

ATTN_TARGET static inline ATTN_VEC ATTN_FN(max)(ATTN_VEC m, ATTN_VEC x)
{
    return x > m ? x : m;
}
#endif

#if ATTN_VW > 1
/* Half a vector of floats, and as many doubles in a full vector's bytes. */
typedef float ATTN_HVEC __attribute__((vector_size(ATTN_VW * 2)));
typedef double ATTN_DVEC __attribute__((vector_size(ATTN_VW * 4)));

/* sum_j s[j] for j in [0, nf), nf a multiple of the vector width, in double: two
 * accumulators of VW / 2 lanes, the lanes then added in a fixed order. */
ATTN_TARGET static inline double ATTN_FN(sum_double)(const float *s, ptrdiff_t nf)
{
    ATTN_DVEC a0 = {0}, a1 = {0};
    for (ptrdiff_t j = 0; j < nf; j += ATTN_VW) {
        ATTN_HVEC lo, hi;
        memcpy(&lo, s + j, sizeof lo);
        memcpy(&hi, s + j + ATTN_VW / 2, sizeof hi);
        a0 += __builtin_convertvector(lo, ATTN_DVEC);
        a1 += __builtin_convertvector(hi, ATTN_DVEC);
    }
    a0 += a1;
    double sum = a0[0];
    for (int l = 1; l < ATTN_VW / 2; ++l)
        sum += a0[l];
    return sum;
}
#else
ATTN_TARGET static inline double ATTN_FN(sum_double)(const float *s, ptrdiff_t nf)
{
    return attn_sum_double(s, nf);
}
#endif

/* One row of the causal softmax: p[j] = softmax(scale * s[0..n))_j for j < n and
 * p[j] = 0 for n <= j < T (the masked keys). s (padded to whole vectors) is
 * clobbered. The loops run over whole vectors: the masked keys inside the last vector
 * become -inf and come out of the exponential as exactly 0. */
ATTN_TARGET static inline void ATTN_FN(softmax_row)(float *restrict p, float *restrict s,
                                                    ptrdiff_t n, ptrdiff_t T, float scale)
{
    const ptrdiff_t VW = ATTN_VW, nf = (n + VW - 1) / VW * VW;
    const ATTN_VEC zero = {0};
    ATTN_VEC m = zero - INFINITY;
    for (ptrdiff_t j = 0; j < nf; j += VW) {
        ATTN_VEC x = ATTN_LOAD(s + j) * scale;
        /* Masked in a register, not by scalar stores that the vector loads of the
         * same bytes would then wait on. */
        if (j + VW > n)
            x = ATTN_FN(mask_tail)(x, n - j);
        ATTN_STORE(s + j, x);
        m = ATTN_FN(max)(m, x);
    }
    /* Max subtraction keeps every exponent <= 0. A NaN may be skipped by the max, but
     * it still reaches the whole row through the sum. */
    const float mx = ATTN_FN(hmax)(m);
    for (ptrdiff_t j = 0; j < nf; j += VW)
        ATTN_STORE(s + j, ATTN_FN(exp_nonpos)(ATTN_LOAD(s + j) - mx));
    const float inv = (float)(1.0 / ATTN_FN(sum_double)(s, nf));
    ptrdiff_t j = 0;
    if (nf <= T) {
        for (; j < nf; j += VW)
            ATTN_STORE(p + j, ATTN_LOAD(s + j) * inv);
    } else {
        for (; j < n; ++j)
            p[j] = s[j] * inv;
    }
    ATTN_FN(zero)(p + j, T - j);
}

/* All rows of one pair's causal softmax P (row i at P + i * ldp, zeros from key i + 1 to
 * T), from its query rows q (row stride ldq) and its keys transposed kt (HS, Tp, zero
 * padded); s0, s1: Tp floats of scratch each. The forward and the backward's recompute
 * both run this one function, on the same numbers (the backward's q rows are a packed
 * copy), so the recomputed P equals the forward's bit for bit. Query rows go two at a
 * time (i, i + 1): both take scores for keys 0..i+1 (row i's extra score is dropped).
 * All rows of P come before any product with them: a row's softmax is a chain of
 * dependent steps (max, exponentials, sum, division), and with nothing between them the
 * core overlaps the chains of consecutive rows. pf, when not NULL, is the next task's q
 * (k at pf + C, v at pf + 2C, rows ldq apart), hinted into the cache row by row. */
ATTN_TARGET static inline void ATTN_FN(probs)(float *restrict P, ptrdiff_t ldp,
                                              const float *restrict q, ptrdiff_t ldq,
                                              const float *restrict kt, float *restrict s0,
                                              float *restrict s1, ptrdiff_t T, ptrdiff_t HS,
                                              ptrdiff_t Tp, float scale, const float *pf,
                                              ptrdiff_t C)
{
    for (ptrdiff_t i = 0; i < T; i += 2) {
        const ptrdiff_t rows = i + 1 < T ? 2 : 1;
        if (pf) {
            for (ptrdiff_t r = i; r < i + rows; ++r) {
                attn_prefetch(pf + r * ldq, (size_t)HS * sizeof(float));
                attn_prefetch(pf + r * ldq + C, (size_t)HS * sizeof(float));
                attn_prefetch(pf + r * ldq + 2 * C, (size_t)HS * sizeof(float));
            }
        }
        float *p0 = P + i * ldp;
        if (rows == 2) {
            ATTN_FN(row_scores2)(s0, s1, q + i * ldq, q + (i + 1) * ldq, kt, Tp, i + 2, HS);
            ATTN_FN(softmax_row)(p0, s0, i + 1, T, scale);
            ATTN_FN(softmax_row)(p0 + ldp, s1, i + 2, T, scale);
        } else {
            ATTN_FN(row_scores)(s0, q + i * ldq, kt, Tp, i + 1, HS);
            ATTN_FN(softmax_row)(p0, s0, i + 1, T, scale);
        }
    }
}

/* y_i = sum_{j <= i} P_ij v_j for every row i of one pair: y rows ldy apart, P rows ldp
 * apart, vp the pair's v rows packed (T, HS). Rows go two at a time and share their loads
 * of v. pf_y, when not NULL, is the next task's first output row, hinted row by row. */
ATTN_TARGET static inline void ATTN_FN(outputs)(float *restrict y, ptrdiff_t ldy,
                                                const float *restrict P, ptrdiff_t ldp,
                                                const float *restrict vp, ptrdiff_t T,
                                                ptrdiff_t HS, const float *pf_y)
{
    for (ptrdiff_t i = 0; i < T; i += 2) {
        const ptrdiff_t rows = i + 1 < T ? 2 : 1;
        if (pf_y) {
            for (ptrdiff_t r = i; r < i + rows; ++r)
                attn_prefetch(pf_y + r * ldy, (size_t)HS * sizeof(float));
        }
        const float *p0 = P + i * ldp;
        float *y0 = y + i * ldy;
        if (rows == 2) {
            /* row i + 1 has one more term than row i */
            ATTN_FN(rows_acc2)(y0, y0 + ldy, p0, p0 + ldp, 1, vp, 0, i + 1, HS, 1);
            ATTN_FN(rows_acc)(y0 + ldy, p0 + ldp, 1, vp, i + 1, i + 2, HS, 0);
        } else {
            ATTN_FN(rows_acc)(y0, p0, 1, vp, 0, i + 1, HS, 1);
        }
    }
}

/* Forward for pair task = b * NH + h; see attention_forward_task in attention_impl.h.
 * P goes to att when it is not NULL, else to scratch only. */
ATTN_TARGET static void ATTN_FN(forward_task)(float *restrict out, float *restrict att,
                                              const float *restrict qkv, float *restrict scratch,
                                              ptrdiff_t task, ptrdiff_t n_tasks, ptrdiff_t T,
                                              ptrdiff_t C, ptrdiff_t NH)
{
    const ptrdiff_t b = task / NH, h = task % NH;
    const ptrdiff_t HS = C / NH, ld = 3 * C, Tp = attn_tpad(T);
    const float scale = attn_scale(HS);
    const float *base = qkv + b * T * ld + h * HS; /* q of this pair's row 0 */
    attn_fwd_scratch sc;
    attn_fwd_layout(&sc, scratch, T, HS);
    /* The next task's rows (the last task skips the hints). */
    const int prefetch = task + 1 < n_tasks;
    const ptrdiff_t bn = (task + 1) / NH, hn = (task + 1) % NH;
    attn_pack_transposed(sc.kt, base + C, ld, T, HS, Tp);
    ATTN_FN(pack)(sc.vp, base + 2 * C, ld, T, HS);
    float *A = att ? att + task * T * T : sc.ps;
    const ptrdiff_t lda = att ? T : Tp;
    ATTN_FN(probs)(A, lda, base, ld, sc.kt, sc.s, sc.s + Tp, T, HS, Tp, scale,
                   prefetch ? qkv + bn * T * ld + hn * HS : NULL, C);
    ATTN_FN(outputs)(out + b * T * C + h * HS, C, A, lda, sc.vp, T, HS,
                     prefetch ? out + bn * T * C + hn * HS : NULL);
}

/* Backward for pair task = b * NH + h; see attention_backward_task in attention_impl.h.
 * Rows, and then key columns, go two at a time as in the forward. */
ATTN_TARGET static void ATTN_FN(backward_task)(float *restrict dqkv, float *restrict out,
                                               const float *restrict dout,
                                               const float *restrict qkv,
                                               const float *restrict att,
                                               float *restrict scratch, ptrdiff_t task,
                                               ptrdiff_t n_tasks, ptrdiff_t T, ptrdiff_t C,
                                               ptrdiff_t NH, int accumulate)
{
    const ptrdiff_t b = task / NH, h = task % NH;
    const ptrdiff_t HS = C / NH, ld = 3 * C, Tp = attn_tpad(T);
    const float scale = attn_scale(HS);
    const float *base = qkv + b * T * ld + h * HS;
    const float *dy = dout + b * T * C + h * HS;
    float *gbase = dqkv + b * T * ld + h * HS;
    attn_bwd_scratch sc;
    attn_bwd_layout(&sc, scratch, T, HS);
    /* The next task's rows (the last task points at its own, and skips the hints). */
    const int prefetch = task + 1 < n_tasks;
    const ptrdiff_t next_task = prefetch ? task + 1 : task;
    const ptrdiff_t bn = next_task / NH, hn = next_task % NH;
    const float *next = qkv + bn * T * ld + hn * HS;
    const float *next_dy = dout + bn * T * C + hn * HS;
    const float *next_g = dqkv + bn * T * ld + hn * HS;
    attn_pack_transposed(sc.vt, base + 2 * C, ld, T, HS, Tp);
    ATTN_FN(pack)(sc.qp, base, ld, T, HS);
    ATTN_FN(pack)(sc.kp, base + C, ld, T, HS);
    ATTN_FN(pack)(sc.dyp, dy, C, T, HS);
    const float *A = att ? att + task * T * T : sc.ps;
    const ptrdiff_t lda = att ? T : Tp;
    if (!att) {
        /* The forward's P again: the same function on the same q and k values. */
        attn_pack_transposed(sc.kt, base + C, ld, T, HS, Tp);
        ATTN_FN(probs)(sc.ps, Tp, sc.qp, HS, sc.kt, sc.s, sc.s + Tp, T, HS, Tp, scale, NULL,
                       C);
    }
    if (out) {
        /* The forward's output again (the caller needs it for wo's weight gradient). */
        ATTN_FN(pack)(sc.vp, base + 2 * C, ld, T, HS);
        ATTN_FN(outputs)(out + b * T * C + h * HS, C, A, lda, sc.vp, T, HS, NULL);
    }
    const size_t row_bytes = (size_t)HS * sizeof(float);
    /* Rows of dS first, then dq from them (as in the forward, so that consecutive
     * rows' softmax-gradient chains overlap). */
    for (ptrdiff_t i = 0; i < T; i += 2) {
        const ptrdiff_t rows = i + 1 < T ? 2 : 1;
        if (prefetch) {
            for (ptrdiff_t r = i; r < i + rows; ++r) {
                attn_prefetch(next + r * ld, row_bytes);
                attn_prefetch(next + r * ld + C, row_bytes);
                attn_prefetch(next + r * ld + 2 * C, row_bytes);
                attn_prefetch(next_dy + r * C, row_bytes);
                if (att)
                    attn_prefetch(att + (next_task * T + r) * T, (size_t)T * sizeof(float));
            }
        }
        const float *p0 = A + i * lda;
        float *d0 = sc.ds + i * Tp;
        /* y_i = sum_j P_ij v_j  =>  dP_ij = dy_i . v_j; then dS from the softmax */
        if (rows == 2) {
            ATTN_FN(row_scores2)(d0, d0 + Tp, sc.dyp + i * HS, sc.dyp + (i + 1) * HS, sc.vt,
                                 Tp, i + 2, HS);
            attn_softmax_grad_row(d0, p0, i + 1);
            attn_softmax_grad_row(d0 + Tp, p0 + lda, i + 2);
        } else {
            ATTN_FN(row_scores)(d0, sc.dyp + i * HS, sc.vt, Tp, i + 1, HS);
            attn_softmax_grad_row(d0, p0, i + 1);
        }
    }
    for (ptrdiff_t i = 0; i < T; i += 2) {
        /* S_ij = scale * q_i . k_j  =>  dq_i = scale * sum_{j <= i} dS_ij k_j */
        const float *d0 = sc.ds + i * Tp;
        float *dq = gbase + i * ld;
        if (i + 1 < T) {
            ATTN_FN(rows_acc2)(sc.g0, sc.g1, d0, d0 + Tp, 1, sc.kp, 0, i + 1, HS, 1);
            ATTN_FN(rows_acc)(sc.g1, d0 + Tp, 1, sc.kp, i + 1, i + 2, HS, 0);
            ATTN_FN(add_scaled)(dq + ld, sc.g1, scale, HS, accumulate);
        } else {
            ATTN_FN(rows_acc)(sc.g0, d0, 1, sc.kp, 0, i + 1, HS, 1);
        }
        ATTN_FN(add_scaled)(dq, sc.g0, scale, HS, accumulate);
    }
    for (ptrdiff_t j = 0; j < T; j += 2) {
        const ptrdiff_t cols = j + 1 < T ? 2 : 1;
        if (prefetch) {
            for (ptrdiff_t r = j; r < j + cols; ++r) {
                attn_prefetch(next_g + r * ld, row_bytes);
                attn_prefetch(next_g + r * ld + C, row_bytes);
                attn_prefetch(next_g + r * ld + 2 * C, row_bytes);
            }
        }
        /* dk_j = scale * sum_{i >= j} dS_ij q_i, and dv_j = sum_{i >= j} P_ij dy_i;
         * column j + 1 starts one row later. */
        for (int which = 0; which < 2; ++which) {
            const float *w = which == 0 ? sc.ds + j : A + j;
            const ptrdiff_t ws = which == 0 ? Tp : lda;
            const float *X = which == 0 ? sc.qp : sc.dyp;
            const float factor = which == 0 ? scale : 1.0f;
            float *g = gbase + j * ld + (which == 0 ? C : 2 * C);
            ATTN_FN(rows_acc)(sc.g0, w, ws, X, j, j + 1, HS, 1);
            if (cols == 2) {
                ATTN_FN(zero)(sc.g1, HS);
                ATTN_FN(rows_acc2)(sc.g0, sc.g1, w, w + 1, ws, X, j + 1, T, HS, 0);
                ATTN_FN(add_scaled)(g + ld, sc.g1, factor, HS, accumulate);
            }
            ATTN_FN(add_scaled)(g, sc.g0, factor, HS, accumulate);
        }
    }
}

#undef ATTN_VEC
#undef ATTN_IVEC
#undef ATTN_HVEC
#undef ATTN_DVEC
#undef ATTN_LOAD
#undef ATTN_STORE

#endif /* ATTN_FN */
