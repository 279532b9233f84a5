/* One copy of the decode kernels' loops (decode.pyx) for one vector width.
 *
 * Included by decode.pyx once per instruction set, with these defined:
 *   DEC_VW        floats per vector (16 AVX-512, 8 AVX2, 4 SSE2 or generic)
 *   DEC_NC        weight rows per group sharing the loads of x: 8 for AVX-512 (its 32
 *                 registers hold the 16 accumulators), 4 otherwise
 *   DEC_FN(name)  the copy's own name for name
 *   DEC_TARGET    the copy's target attribute (or nothing)
 * No include guard on purpose. Included with DEC_FN undefined, it defines nothing:
 * decode.pyx names it in a cdef extern block only so that the build notices when it changes.
 *
 * Every dot product, whether it runs alone or beside DEC_NC - 1 others, performs the same
 * operations in the same order: two vector accumulators over alternate vectors of the row,
 * added, summed across lanes by a fixed halving tree, then the scalar tail in order. So a
 * product's value depends on its two rows alone, never on the chunking, the thread or the
 * neighbouring channels.
 */

#ifdef DEC_FN

#define DEC_VEC DEC_FN(vec)
#define DEC_LOAD DEC_FN(load)

typedef float DEC_VEC __attribute__((vector_size(DEC_VW * 4)));

/* Unaligned load (numpy gives no alignment beyond the element's). */
DEC_TARGET static inline DEC_VEC DEC_LOAD(const float *p)
{
    DEC_VEC v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* The sum of v's lanes by a fixed halving tree: lane l + w onto lane l for w = VW/2, VW/4,
 * ..., 1, so four lanes end as (l0 + l2) + (l1 + l3). With GCC in registers: each step adds v
 * to itself shuffled down by w lanes (the upper lanes' sums are never read); clang has no
 * __builtin_shuffle, and adds the same lanes in the same order through memory. */
DEC_TARGET static inline float DEC_FN(hsum)(DEC_VEC v)
{
#if defined(__clang__)
    float lane[DEC_VW];
    memcpy(lane, &v, sizeof lane);
    for (int w = DEC_VW / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; ++l)
            lane[l] += lane[l + w];
    return lane[0];
#else
    typedef int32_t ivec __attribute__((vector_size(DEC_VW * 4)));
    ivec down = {0};
    for (int w = DEC_VW / 2; w >= 1; w /= 2) {
        for (int l = 0; l < DEC_VW; ++l)
            down[l] = (l + w) & (DEC_VW - 1);
        v += __builtin_shuffle(v, down);
    }
    return v[0];
#endif
}

/* s[c] = sum_k x[k] * w[c * ldw + k] for c in [0, nc), nc = 1 or DEC_NC (a constant once
 * inlined): the weight rows of a group share every load of x. The loops over c unroll fully,
 * so the accumulators stay in registers (measured: spilled, they cost a third of a one-row
 * product hot in L2). */
DEC_TARGET static inline __attribute__((always_inline)) void DEC_FN(dots)(
        float *restrict s, const float *restrict x, const float *restrict w, ptrdiff_t ldw,
        ptrdiff_t K, int nc)
{
    const ptrdiff_t VW = DEC_VW;
    DEC_VEC a[DEC_NC], b[DEC_NC];
#pragma GCC unroll 8
    for (int c = 0; c < nc; ++c) {
        a[c] = (DEC_VEC){0};
        b[c] = (DEC_VEC){0};
    }
    ptrdiff_t k = 0;
    for (; k + 2 * VW <= K; k += 2 * VW) {
        const DEC_VEC xa = DEC_LOAD(x + k), xb = DEC_LOAD(x + k + VW);
#pragma GCC unroll 8
        for (int c = 0; c < nc; ++c) {
            a[c] += xa * DEC_LOAD(w + c * ldw + k);
            b[c] += xb * DEC_LOAD(w + c * ldw + k + VW);
        }
    }
    if (k + VW <= K) {
        const DEC_VEC xa = DEC_LOAD(x + k);
#pragma GCC unroll 8
        for (int c = 0; c < nc; ++c)
            a[c] += xa * DEC_LOAD(w + c * ldw + k);
        k += VW;
    }
#pragma GCC unroll 8
    for (int c = 0; c < nc; ++c)
        s[c] = DEC_FN(hsum)(a[c] + b[c]);
    if (k < K) {  /* fewer than VW left: in order, after the lanes */
#pragma GCC unroll 8
        for (int c = 0; c < nc; ++c) {
            float t = s[c];
            for (ptrdiff_t j = k; j < K; ++j)
                t += x[j] * w[c * ldw + j];
            s[c] = t;
        }
    }
}

/* out[i * OC + o] (mode) dot(x[i * IC ..], w[o * IC ..]) for i in [0, n), o in [o_lo, o_hi).
 * mode 0 writes, 1 adds onto out, 2 writes relu(dot)^2 (dec_finish). Weight rows go DEC_NC
 * at a time, each group against every row of x, so a group is read from memory once and
 * then from L1; a chunk's last rows that do not fill a group go one by one. */
DEC_TARGET static void DEC_FN(matmul_chunk)(float *restrict out, const float *restrict x,
                                            const float *restrict w, ptrdiff_t n, ptrdiff_t IC,
                                            ptrdiff_t OC, ptrdiff_t o_lo, ptrdiff_t o_hi,
                                            int mode)
{
    float s[DEC_NC];
    ptrdiff_t o = o_lo;
    while (o < o_hi) {
        const int nc = o + DEC_NC <= o_hi ? DEC_NC : 1;
        for (ptrdiff_t i = 0; i < n; ++i) {
            if (nc == DEC_NC)
                DEC_FN(dots)(s, x + i * IC, w + o * IC, IC, IC, DEC_NC);
            else
                DEC_FN(dots)(s, x + i * IC, w + o * IC, IC, IC, 1);
            float *dst = out + i * OC + o;
            for (int c = 0; c < nc; ++c)
                dst[c] = dec_finish(dst[c], s[c], mode);
        }
        o += nc;
    }
}

/* Attention of the new query row i = task / NH (position t = t0 + i) for head h = task % NH
 * over the keys and values of positions 0 .. t; see decode_attention_task in decode.pyx.
 * p: t0 + n floats of scratch. */
DEC_TARGET static void DEC_FN(attention_task)(float *restrict out, const float *restrict qkv,
                                              float *restrict p, ptrdiff_t t0, ptrdiff_t C,
                                              ptrdiff_t NH, ptrdiff_t task)
{
    const ptrdiff_t VW = DEC_VW;
    const ptrdiff_t i = task / NH, h = task % NH;
    const ptrdiff_t HS = C / NH, ld = 3 * C, nk = t0 + i + 1;
    const float scale = (float)(1.0 / sqrt((double)HS));
    const float *q = qkv + (t0 + i) * ld + h * HS;
    const float *k = qkv + C + h * HS;
    const float *v = qkv + 2 * C + h * HS;
    float mx = -INFINITY;
    for (ptrdiff_t j = 0; j < nk; ++j) {
        float sj;
        DEC_FN(dots)(&sj, q, k + j * ld, 0, HS, 1);
        sj *= scale;
        p[j] = sj;
        mx = sj > mx ? sj : mx;
    }
    /* Max subtraction keeps every exponent <= 0 (a NaN skipped by the max still reaches the
     * row through the sum); the sum in double, as the training kernel takes it. */
    for (ptrdiff_t j = 0; j < nk; ++j)
        p[j] = randygpt_exp_nonpos(p[j] - mx);
    double sum = 0.0;  /* in position order: at most block_size terms */
    for (ptrdiff_t j = 0; j < nk; ++j)
        sum += (double)p[j];
    const float inv = (float)(1.0 / sum);
    for (ptrdiff_t j = 0; j < nk; ++j)
        p[j] *= inv;
    /* y = sum_j p_j v_j, summed in j order onto 0 */
    float *y = out + i * C + h * HS;
    ptrdiff_t d = 0;
    for (; d + VW <= HS; d += VW) {
        DEC_VEC acc = {0};
        for (ptrdiff_t j = 0; j < nk; ++j)
            acc += p[j] * DEC_LOAD(v + j * ld + d);
        memcpy(y + d, &acc, sizeof acc);
    }
    for (; d < HS; ++d) {
        float acc = 0.0f;
        for (ptrdiff_t j = 0; j < nk; ++j)
            acc += p[j] * v[j * ld + d];
        y[d] = acc;
    }
}

#undef DEC_VEC
#undef DEC_LOAD

#endif /* DEC_FN */
