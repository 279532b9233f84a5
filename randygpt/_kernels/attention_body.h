/* One copy of the per-(batch, head) attention bodies for one vector width.
 *
 * Included only by attention_impl.h, once per instruction set, with these defined:
 *   ATTN_VW        floats per vector (8 for AVX2, 4 for SSE2/NEON, 1 for plain C)
 *   ATTN_FN(name)  gives the copy's own name for name
 *   ATTN_TARGET    the copy's target attribute (or nothing)
 * No include guard on purpose.
 *
 * Both products of the head's rows are written so that no horizontal sums are needed:
 *   - scores s_j = x . y_j for a block of keys j come from the keys stored transposed
 *     (HS, Tp) in scratch, one vector of keys per accumulator;
 *   - weighted row sums y = sum_r w_r X_r run over r with the head's columns in vectors.
 * Either way each output element is a sum over its index in plain order, the same for
 * any thread count.
 */

#define ATTN_VEC ATTN_FN(vec)
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

/* s[j] = sum_d x[d] * Xt[d * ldt + j] for j in [0, n) rounded up to whole vectors:
 * the entries past n are computed from Xt's padding and ignored by the callers. */
ATTN_TARGET static inline void ATTN_FN(row_scores)(float *restrict s, const float *restrict x,
                                                   const float *restrict Xt, ptrdiff_t ldt,
                                                   ptrdiff_t n, ptrdiff_t HS)
{
    const ptrdiff_t VW = ATTN_VW;
    ptrdiff_t j = 0;
    /* Four or two independent accumulators hide the add latency of the d chain. */
    for (; n - j > 2 * VW; j += 4 * VW) {
        ATTN_VEC a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        const float *xt = Xt + j;
        for (ptrdiff_t d = 0; d < HS; ++d, xt += ldt) {
            const float xd = x[d];
            a0 += xd * ATTN_LOAD(xt);
            a1 += xd * ATTN_LOAD(xt + VW);
            a2 += xd * ATTN_LOAD(xt + 2 * VW);
            a3 += xd * ATTN_LOAD(xt + 3 * VW);
        }
        ATTN_STORE(s + j, a0);
        ATTN_STORE(s + j + VW, a1);
        ATTN_STORE(s + j + 2 * VW, a2);
        ATTN_STORE(s + j + 3 * VW, a3);
    }
    for (; n - j > VW; j += 2 * VW) {
        ATTN_VEC a0 = {0}, a1 = {0};
        const float *xt = Xt + j;
        for (ptrdiff_t d = 0; d < HS; ++d, xt += ldt) {
            const float xd = x[d];
            a0 += xd * ATTN_LOAD(xt);
            a1 += xd * ATTN_LOAD(xt + VW);
        }
        ATTN_STORE(s + j, a0);
        ATTN_STORE(s + j + VW, a1);
    }
    for (; j < n; j += VW) {
        ATTN_VEC a0 = {0};
        const float *xt = Xt + j;
        for (ptrdiff_t d = 0; d < HS; ++d, xt += ldt)
            a0 += x[d] * ATTN_LOAD(xt);
        ATTN_STORE(s + j, a0);
    }
}

/* y[d] = sum_{r = r0}^{r1 - 1} w[r * ws] * X[r * HS + d] for d in [0, HS), each
 * summed in r order; blocks of four vectors of columns keep the sums in registers. */
ATTN_TARGET static inline void ATTN_FN(weighted_rows)(float *restrict y, const float *restrict w,
                                                      ptrdiff_t ws, const float *restrict X,
                                                      ptrdiff_t r0, ptrdiff_t r1, ptrdiff_t HS)
{
    const ptrdiff_t VW = ATTN_VW;
    ptrdiff_t d = 0;
    for (; d + 4 * VW <= HS; d += 4 * VW) {
        ATTN_VEC a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (ptrdiff_t r = r0; r < r1; ++r) {
            const float wr = w[r * ws];
            const float *xr = X + r * HS + d;
            a0 += wr * ATTN_LOAD(xr);
            a1 += wr * ATTN_LOAD(xr + VW);
            a2 += wr * ATTN_LOAD(xr + 2 * VW);
            a3 += wr * ATTN_LOAD(xr + 3 * VW);
        }
        ATTN_STORE(y + d, a0);
        ATTN_STORE(y + d + VW, a1);
        ATTN_STORE(y + d + 2 * VW, a2);
        ATTN_STORE(y + d + 3 * VW, a3);
    }
    for (; d + VW <= HS; d += VW) {
        ATTN_VEC a0 = {0};
        for (ptrdiff_t r = r0; r < r1; ++r)
            a0 += w[r * ws] * ATTN_LOAD(X + r * HS + d);
        ATTN_STORE(y + d, a0);
    }
    for (; d < HS; ++d) {
        float a0 = 0.0f;
        for (ptrdiff_t r = r0; r < r1; ++r)
            a0 += w[r * ws] * X[r * HS + d];
        y[d] = a0;
    }
}

/* Forward for pair task = b * NH + h; see attention_forward_task in attention_impl.h. */
ATTN_TARGET static void ATTN_FN(forward_task)(float *restrict out, float *restrict att,
                                              const float *restrict qkv, float *restrict scratch,
                                              ptrdiff_t task, ptrdiff_t T, ptrdiff_t C,
                                              ptrdiff_t NH)
{
    const ptrdiff_t b = task / NH, h = task % NH;
    const ptrdiff_t HS = C / NH, ld = 3 * C, Tp = attn_tpad(T);
    const float scale = attn_scale(HS);
    const float *base = qkv + b * T * ld + h * HS; /* q of this pair's row 0 */
    float *kt = scratch;         /* (HS, Tp): k transposed, zero padded */
    float *vp = kt + HS * Tp;    /* (T, HS) */
    float *s = vp + T * HS;      /* (Tp,): one row of scores */
    attn_pack_transposed(kt, base + C, ld, T, HS, Tp);
    attn_pack(vp, base + 2 * C, ld, T, HS);
    float *A = att + task * T * T;
    for (ptrdiff_t i = 0; i < T; ++i) {
        /* Causal: only keys j <= i get a score; the rest of the row is exactly 0. */
        ATTN_FN(row_scores)(s, base + i * ld, kt, Tp, i + 1, HS);
        for (ptrdiff_t j = 0; j <= i; ++j)
            s[j] *= scale;
        /* Max subtraction keeps every exponent <= 0. */
        const float m = attn_max(s, i + 1);
        const float inv = (float)(1.0 / attn_exp_sum(s, i + 1, m));
        float *p = A + i * T;
        for (ptrdiff_t j = 0; j <= i; ++j)
            p[j] = s[j] * inv;
        for (ptrdiff_t j = i + 1; j < T; ++j)
            p[j] = 0.0f;
        /* y_i = sum_j P_ij v_j */
        ATTN_FN(weighted_rows)(out + (b * T + i) * C + h * HS, p, 1, vp, 0, i + 1, HS);
    }
}

/* Backward for pair task = b * NH + h; see attention_backward_task in attention_impl.h. */
ATTN_TARGET static void ATTN_FN(backward_task)(float *restrict dqkv, const float *restrict dout,
                                               const float *restrict qkv,
                                               const float *restrict att,
                                               float *restrict scratch, ptrdiff_t task,
                                               ptrdiff_t T, ptrdiff_t C, ptrdiff_t NH)
{
    const ptrdiff_t b = task / NH, h = task % NH;
    const ptrdiff_t HS = C / NH, ld = 3 * C, Tp = attn_tpad(T);
    const float scale = attn_scale(HS);
    const float *base = qkv + b * T * ld + h * HS;
    float *gbase = dqkv + b * T * ld + h * HS;
    float *vt = scratch;        /* (HS, Tp): v transposed, zero padded */
    float *qp = vt + HS * Tp;   /* (T, HS) */
    float *kp = qp + T * HS;    /* (T, HS) */
    float *dyp = kp + T * HS;   /* (T, HS) */
    float *ds = dyp + T * HS;   /* (T, Tp): dP, then dS; row i valid for j <= i */
    float *tmp = ds + T * Tp;   /* (HS,) */
    attn_pack_transposed(vt, base + 2 * C, ld, T, HS, Tp);
    attn_pack(qp, base, ld, T, HS);
    attn_pack(kp, base + C, ld, T, HS);
    attn_pack(dyp, dout + b * T * C + h * HS, C, T, HS);
    const float *A = att + task * T * T;
    for (ptrdiff_t i = 0; i < T; ++i) {
        const float *p = A + i * T;
        float *dsi = ds + i * Tp;
        /* y_i = sum_j P_ij v_j  =>  dP_ij = dy_i . v_j */
        ATTN_FN(row_scores)(dsi, dyp + i * HS, vt, Tp, i + 1, HS);
        /* P_i = softmax(S_i)  =>  dS_ij = P_ij (dP_ij - D_i), D_i = sum_j P_ij dP_ij */
        const float D = (float)attn_dot_double(p, dsi, i + 1);
        for (ptrdiff_t j = 0; j <= i; ++j)
            dsi[j] = p[j] * (dsi[j] - D);
        /* S_ij = scale * q_i . k_j  =>  dq_i = scale * sum_j dS_ij k_j */
        ATTN_FN(weighted_rows)(tmp, dsi, 1, kp, 0, i + 1, HS);
        float *dq = gbase + i * ld;
        for (ptrdiff_t d = 0; d < HS; ++d)
            dq[d] += tmp[d] * scale;
    }
    for (ptrdiff_t j = 0; j < T; ++j) {
        /* dk_j = scale * sum_{i >= j} dS_ij q_i */
        ATTN_FN(weighted_rows)(tmp, ds + j, Tp, qp, j, T, HS);
        float *dk = gbase + j * ld + C;
        for (ptrdiff_t d = 0; d < HS; ++d)
            dk[d] += tmp[d] * scale;
        /* dv_j = sum_{i >= j} P_ij dy_i */
        ATTN_FN(weighted_rows)(tmp, A + j, T, dyp, j, T, HS);
        float *dv = gbase + j * ld + 2 * C;
        for (ptrdiff_t d = 0; d < HS; ++d)
            dv[d] += tmp[d];
    }
}

#undef ATTN_VEC
#undef ATTN_LOAD
#undef ATTN_STORE
