/* One ISA's GEMM register-tile microkernel and its two packers.
 *
 * Included several times by gemm_kernels.h, each time with these macros defined:
 *   RG_NAME(x)  prefixes every symbol with the ISA name (rg_avx2_kernel, ...)
 *   RG_TARGET   __attribute__((target(...))), or nothing for the baseline build
 *   RG_VW       floats per SIMD vector (16, 8 or 4)
 *   RG_MR       rows of the register tile
 *   RG_NV       vectors per tile row, so the tile is RG_MR x (RG_NV * RG_VW)
 * The vector type's width must match the target ISA: a 32-byte vector compiled for
 * plain SSE2 is split through memory by the compiler and runs several times slower.
 *
 * Packed layouts (in buffers of our own, 64-byte aligned):
 *   A strip: RG_MR rows of op(A), stored k-major (RG_MR floats per k), rows past the
 *            edge zero-filled, so the kernel never needs a row count inside its loop;
 *   B strip: NR columns of op(B), stored k-major (NR floats per k), likewise zero-padded.
 */

#define RG_NR (RG_NV * RG_VW)

typedef float RG_NAME(vec) __attribute__((vector_size(RG_VW * 4)));
typedef int32_t RG_NAME(ivec) __attribute__((vector_size(RG_VW * 4)));

static inline RG_TARGET RG_NAME(vec) RG_NAME(loadu)(const float *p)
{
    /* numpy rows are only 4-byte aligned; memcpy compiles to one unaligned load. */
    RG_NAME(vec) v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline RG_TARGET void RG_NAME(storeu)(float *p, RG_NAME(vec) v)
{
    __builtin_memcpy(p, &v, sizeof v);
}

/* Squared ReLU written as "v < 0 ? 0 : v*v" so NaN propagates like max(v, 0)**2. */
static inline RG_TARGET RG_NAME(vec) RG_NAME(sqrelu)(RG_NAME(vec) v)
{
    const RG_NAME(vec) zero = {0};
    const RG_NAME(ivec) negative = v < zero; /* all-ones lanes where v < 0 */
    return (RG_NAME(vec))(~negative & (RG_NAME(ivec))(v * v));
}

/* 2 relu(g), relu written "g <= 0 ? 0 : g" like activation.pyx's, so NaN passes through. */
static inline RG_TARGET RG_NAME(vec) RG_NAME(relu2x)(RG_NAME(vec) g)
{
    const RG_NAME(vec) zero = {0};
    const RG_NAME(ivec) nonpos = g <= zero;
    const RG_NAME(vec) r = (RG_NAME(vec))(~nonpos & (RG_NAME(ivec))g);
    return r + r;
}

/* A tile's start, shared with the bf16 kernels (gemm_bf16_kernel.h): the prefetches, and
 * acc = init (or 0), an edge tile's valid corner through the stack tile. */
static inline __attribute__((always_inline)) RG_TARGET void RG_NAME(tile_start)(
    RG_NAME(vec) acc[RG_MR][RG_NV], float *tile, const int nv, const float *init,
    Py_ssize_t ld_init, float *dst, Py_ssize_t ld_dst, int add_dst, const float *gate,
    int mr, int nr)
{
    const int full = (mr == RG_MR && nr == nv * RG_VW);

    /* dst (when added to) and the gate are read only after the k loop: ask for their rows
     * now, so that they arrive while the FMAs run instead of stalling the write-back. */
    if (gate != NULL)
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j += 16)
                __builtin_prefetch(gate + i * ld_dst + j);
    if (add_dst)
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j += 16)
                __builtin_prefetch(dst + i * ld_dst + j, 1);

    if (init == NULL) {
#pragma GCC unroll 16
        for (int i = 0; i < RG_MR; i++)
#pragma GCC unroll 4
            for (int j = 0; j < nv; j++)
                acc[i][j] = (RG_NAME(vec)){0};
    } else if (full) {
#pragma GCC unroll 16
        for (int i = 0; i < RG_MR; i++)
#pragma GCC unroll 4
            for (int j = 0; j < nv; j++)
                acc[i][j] = RG_NAME(loadu)(init + i * ld_init + j * RG_VW);
    } else {
        for (int i = 0; i < RG_MR * RG_NR; i++)
            tile[i] = 0.0f;
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++)
                tile[i * RG_NR + j] = init[i * ld_init + j];
#pragma GCC unroll 16
        for (int i = 0; i < RG_MR; i++)
#pragma GCC unroll 4
            for (int j = 0; j < nv; j++)
                acc[i][j] = RG_NAME(loadu)(tile + i * RG_NR + j * RG_VW);
    }
}

/* A tile's end, shared likewise: the finished sums acc written back (see RG_NAME(tile) below). */
static inline __attribute__((always_inline)) RG_TARGET void RG_NAME(tile_finish)(
    RG_NAME(vec) acc[RG_MR][RG_NV], float *tile, const int nv, float *dst, Py_ssize_t ld_dst,
    int add_dst, float *c2, const float *gate, int mr, int nr)
{
    const int full = (mr == RG_MR && nr == nv * RG_VW);

    if (full) {
#pragma GCC unroll 16
        for (int i = 0; i < RG_MR; i++)
#pragma GCC unroll 4
            for (int j = 0; j < nv; j++) {
                float *d = dst + i * ld_dst + j * RG_VW;
                RG_NAME(vec) v = acc[i][j];
                if (add_dst)
                    v = RG_NAME(loadu)(d) + v;
                if (gate != NULL)
                    v = RG_NAME(relu2x)(RG_NAME(loadu)(gate + i * ld_dst + j * RG_VW)) * v;
                RG_NAME(storeu)(d, v);
                if (c2 != NULL)
                    RG_NAME(storeu)(c2 + i * ld_dst + j * RG_VW, RG_NAME(sqrelu)(v));
            }
    } else {
#pragma GCC unroll 16
        for (int i = 0; i < RG_MR; i++)
#pragma GCC unroll 4
            for (int j = 0; j < nv; j++)
                RG_NAME(storeu)(tile + i * RG_NR + j * RG_VW, acc[i][j]);
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++) {
                float v = tile[i * RG_NR + j];
                if (add_dst)
                    v = dst[i * ld_dst + j] + v;
                if (gate != NULL) {
                    const float g = gate[i * ld_dst + j];
                    const float r = g <= 0.0f ? 0.0f : g;
                    v = (r + r) * v;
                }
                dst[i * ld_dst + j] = v;
                if (c2 != NULL)
                    c2[i * ld_dst + j] = v < 0.0f ? 0.0f : v * v;
            }
    }
}

/* One MR x NR tile: acc = init (or 0); acc += sum_k a[:, k] b[k, :] as one FMA chain per
 * element in k order; then dst = acc (or dst + acc when add_dst), and c2 = relu(acc)^2
 * if c2 is given (same leading dimension as dst). With gate given (same leading
 * dimension, never together with add_dst or c2), dst = 2 relu(gate) * acc instead: the
 * squared-ReLU backward, rounded like activation.pyx's squared_relu_backward_inplace.
 *
 * Continuing the chain from a stored partial (init) makes the result independent of how
 * K is cut into blocks, and the final "+ dst" makes repeated accumulation exact: adding
 * the same product twice to zero gives exactly twice the product.
 * mr < RG_MR or nr < nv * RG_VW marks an edge tile: it goes through a stack tile so
 * nothing outside the valid mr x nr corner of dst/init/c2 is read or written. */
static inline __attribute__((always_inline)) RG_TARGET void RG_NAME(tile)(
    const int nv, /* vectors per row actually computed: RG_NV, or RG_NV / 2 (narrow) */
    Py_ssize_t kc, const float *restrict ap, const float *restrict bp,
    const float *init, Py_ssize_t ld_init,
    float *dst, Py_ssize_t ld_dst, int add_dst, float *c2, const float *gate,
    int mr, int nr)
{
    RG_NAME(vec) acc[RG_MR][RG_NV];
    float tile[RG_MR * RG_NR] __attribute__((aligned(64)));

    RG_NAME(tile_start)(acc, tile, nv, init, ld_init, dst, ld_dst, add_dst, gate, mr, nr);
    for (Py_ssize_t k = 0; k < kc; k++) {
        RG_NAME(vec) b[RG_NV];
#pragma GCC unroll 4
        for (int j = 0; j < nv; j++)
            b[j] = *(const RG_NAME(vec) *)(bp + k * RG_NR + j * RG_VW);
#pragma GCC unroll 16
        for (int i = 0; i < RG_MR; i++) {
            const float a = ap[k * RG_MR + i];
#pragma GCC unroll 4
            for (int j = 0; j < nv; j++)
                acc[i][j] += a * b[j]; /* contracted to one FMA where the target has it */
        }
    }
    RG_NAME(tile_finish)(acc, tile, nv, dst, ld_dst, add_dst, c2, gate, mr, nr);
}

static RG_TARGET void RG_NAME(kernel)(
    Py_ssize_t kc, const float *restrict ap, const float *restrict bp,
    const float *init, Py_ssize_t ld_init,
    float *dst, Py_ssize_t ld_dst, int add_dst, float *c2, const float *gate, int mr, int nr)
{
    RG_NAME(tile)(RG_NV, kc, ap, bp, init, ld_init, dst, ld_dst, add_dst, c2, gate, mr, nr);
}

/* The same tile with only the left half of the columns: for a last B strip of at most
 * NR/2 valid columns (N = 67 leaves 3 on a 32-wide strip), half the FMAs. It reads the
 * full-width packed B strip and sums each element in the same order, so the result is
 * bit-identical to the full kernel's. */
static RG_TARGET void RG_NAME(kernel_narrow)(
    Py_ssize_t kc, const float *restrict ap, const float *restrict bp,
    const float *init, Py_ssize_t ld_init,
    float *dst, Py_ssize_t ld_dst, int add_dst, float *c2, const float *gate, int mr, int nr)
{
    RG_NAME(tile)(RG_NV / 2, kc, ap, bp, init, ld_init, dst, ld_dst, add_dst, c2, gate, mr, nr);
}

/* dst[k * ld + r] = src[r * rs + k] for r < rows, k < kc: packing rows that are
 * contiguous along k (op(A) = X, or op(B) = W^T). Done on 4 x 4 blocks moved through
 * registers, a quarter of the scalar version's loads and stores; row streams one at a
 * time would also be fine for the cache but cost one scalar store per float. */
static inline __attribute__((always_inline)) RG_TARGET void RG_NAME(transpose_rows)(
    float *restrict dst, int ld, const float *restrict src, Py_ssize_t rs, int rows,
    Py_ssize_t kc)
{
    Py_ssize_t k = 0;
    for (; k + 4 <= kc; k += 4) {
        int r = 0;
#pragma GCC unroll 8
        for (; r + 4 <= rows; r += 4) {
            rg_transpose4(dst + k * ld + r, ld, src + r * rs + k, rs);
        }
        for (; r < rows; r++)
            for (int q = 0; q < 4; q++)
                dst[(k + q) * ld + r] = src[r * rs + k + q];
    }
    for (; k < kc; k++)
        for (int r = 0; r < rows; r++)
            dst[k * ld + r] = src[r * rs + k];
}

/* Pack an mc x kc block of op(A) (element (i, k) at a[i*rs + k*cs]) into ceil(mc/MR)
 * k-major strips of RG_MR rows, zero-filling rows past mc. */
static RG_TARGET void RG_NAME(pack_a)(
    float *restrict dst, const float *restrict a, Py_ssize_t rs, Py_ssize_t cs,
    Py_ssize_t mc, Py_ssize_t kc)
{
    Py_ssize_t i0 = 0;
    if (rs == 1 && cs != 1) {
        /* op(A) columns are contiguous (a transposed operand, dY^T in weight grads): MR
         * floats per k and strip, every strip's for one k before the next k, so the
         * source is read in order (strip by strip, a 2048 x 1024 op(A) against one
         * 32-column strip took 1.07-1.20 ms instead of 0.79 on a Zen 5 EPYC; the
         * step's weight grads, 144 rows per chunk, the same). The last, partial
         * strip goes to the loop below. */
        const Py_ssize_t full_mc = mc / RG_MR * RG_MR;
        for (Py_ssize_t k = 0; k < kc; k++)
            for (Py_ssize_t s0 = 0; s0 < full_mc; s0 += RG_MR)
                __builtin_memcpy(dst + s0 * kc + k * RG_MR, a + s0 + k * cs,
                                 RG_MR * sizeof(float));
        i0 = full_mc;
    }
    for (; i0 < mc; i0 += RG_MR) {
        float *restrict d = dst + i0 * kc;
        const Py_ssize_t mr = mc - i0 < RG_MR ? mc - i0 : RG_MR;
        if (mr == RG_MR && cs == 1) {
            /* Rows contiguous along k (X in the forward, dY in the input grad). */
            RG_NAME(transpose_rows)(d, RG_MR, a + i0 * rs, rs, RG_MR, kc);
        } else {
            for (Py_ssize_t k = 0; k < kc; k++) {
                for (Py_ssize_t r = 0; r < mr; r++)
                    d[k * RG_MR + r] = a[(i0 + r) * rs + k * cs];
                for (Py_ssize_t r = mr; r < RG_MR; r++)
                    d[k * RG_MR + r] = 0.0f;
            }
        }
    }
}

/* Pack a kc x nc block of op(B) (element (k, j) at b[k*rs + j*cs]) into ceil(nc/NR)
 * k-major strips of RG_NR columns, zero-filling columns past nc. */
static RG_TARGET void RG_NAME(pack_b)(
    float *restrict dst, const float *restrict b, Py_ssize_t rs, Py_ssize_t cs,
    Py_ssize_t kc, Py_ssize_t nc)
{
    for (Py_ssize_t j0 = 0; j0 < nc; j0 += RG_NR) {
        float *restrict d = dst + j0 * kc;
        const Py_ssize_t nr = nc - j0 < RG_NR ? nc - j0 : RG_NR;
        if (nr == RG_NR && cs == 1) {
            /* Rows of op(B) contiguous (NN, TN): one vector copy per k. */
            for (Py_ssize_t k = 0; k < kc; k++) {
                const float *s = b + k * rs + j0;
#pragma GCC unroll 4
                for (int j = 0; j < RG_NV; j++)
                    *(RG_NAME(vec) *)(d + k * RG_NR + j * RG_VW) = RG_NAME(loadu)(s + j * RG_VW);
            }
        } else if (nr == RG_NR && rs == 1) {
            /* op(B) = W^T with W stored (out, in): the NT forward. */
            RG_NAME(transpose_rows)(d, RG_NR, b + j0 * cs, cs, RG_NR, kc);
        } else {
            for (Py_ssize_t k = 0; k < kc; k++) {
                for (Py_ssize_t j = 0; j < nr; j++)
                    d[k * RG_NR + j] = b[k * rs + (j0 + j) * cs];
                for (Py_ssize_t j = nr; j < RG_NR; j++)
                    d[k * RG_NR + j] = 0.0f;
            }
        }
    }
}

/* p[i] = relu(p[i])^2 for i < n, in place: a packed strip of an operand that the
 * caller holds before its squared ReLU (fc2's input, recomputed while packing). */
static RG_TARGET void RG_NAME(sqrelu_inplace)(float *p, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + RG_VW <= n; i += RG_VW)
        RG_NAME(storeu)(p + i, RG_NAME(sqrelu)(RG_NAME(loadu)(p + i)));
    for (; i < n; i++)
        p[i] = p[i] < 0.0f ? 0.0f : p[i] * p[i];
}

#undef RG_NR
