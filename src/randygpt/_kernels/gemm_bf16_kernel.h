/* One ISA's bf16 GEMM pieces: the register-tile microkernel and the packers that round
 * fp32 operands to bf16 (nearest even) as they pack them.
 *
 * Included several times by gemm_bf16.h, each time with these macros defined:
 *   RGB_NAME(x)   prefixes every symbol (rgb_avx512_kernel, ...)
 *   RGB_TARGET    __attribute__((target(...))), or nothing
 *   RGB_VW        floats per SIMD vector (16, 8 or 4)
 *   RGB_MR        rows of the register tile
 *   RGB_NV        vectors per tile row: the tile is RGB_MR x (RGB_NV * RGB_VW)
 *   RGB_FP32(x)   the fp32 path of the same tile shape (rg_avx512_##x, ...): its
 *                 tile_start and tile_finish load and write back every tile's sums
 *   RGB_NATIVE    1: vdpbf16ps; 0: the emulation with fp32 multiply-adds
 *   RGB_FTZ       how the emulation flushes denormal sums (see gemm_bf16.h), with
 *                 RGB_FTZ_BEGIN, RGB_FTZ_SETTLE and RGB_FTZ_END around its k loop
 *
 * Packed layout: K comes in pairs, as vdpbf16ps reads it. A strip holds, for each pair
 * p = 0 .. ceil(kc/2) - 1 and each of its lines l (RGB_MR rows of op(A), or NR columns of
 * op(B)), one 32-bit word: bf16(x[l, 2p]) in the low half and bf16(x[l, 2p + 1]) in the high
 * half; lines past the edge and the second half of a last odd pair are zeros. That is half
 * the bytes of the fp32 strip, so it fits the slot the driver (matmul.pyx) gives every
 * strip, which it counts in floats as for fp32.
 *
 * Both paths sum each output element in the same order: for each pair, the odd element's
 * product, then the even one's, into the accumulator (vdpbf16ps's order on the CPUs
 * checked, see gemm_bf16.h), continued across K blocks from the stored partial sums.
 */

#define RGB_NR (RGB_NV * RGB_VW)

typedef float RGB_NAME(vec) __attribute__((vector_size(RGB_VW * 4)));
typedef uint32_t RGB_NAME(uvec) __attribute__((vector_size(RGB_VW * 4)));

/* dst[p * width + l] = pair of x[l, 2p], x[l, 2p + 1] for the `lines` lines of one strip,
 * where x[l, k] = src[l * s_line + k * s_k]; zeros for lines lines .. width - 1. The two
 * layouts that occur in the step get loops the compiler vectorizes: lines contiguous
 * (s_line == 1: op(A) transposed, op(B) row-major) and k contiguous (s_k == 1: rows of X or
 * dY in op(A), W^T in op(B)), the latter through a small transposed chunk. */
static inline __attribute__((always_inline)) RGB_TARGET void RGB_NAME(pack_strip)(
    uint32_t *restrict dst, const int width, const float *restrict src, Py_ssize_t s_line,
    Py_ssize_t s_k, int lines, Py_ssize_t kc, const int sq)
{
    const Py_ssize_t pairs = kc / 2, all = (kc + 1) / 2;
    if (s_line == 1) {
        for (Py_ssize_t p = 0; p < pairs; p++) {
            const float *x0 = src + 2 * p * s_k, *x1 = x0 + s_k;
            uint32_t *d = dst + p * width;
            for (int l = 0; l < lines; l++)
                d[l] = rg_bf16_pair(rg_bf16_load(x0[l], sq), rg_bf16_load(x1[l], sq));
            for (int l = lines; l < width; l++)
                d[l] = 0;
        }
    } else if (s_k == 1) {
        /* CH pairs of every line into a line-major chunk (contiguous reads), then out
         * pair-major (the strip's order). */
        enum { CH = 16 };
        uint32_t chunk[RGB_NR > RGB_MR ? RGB_NR : RGB_MR][CH] __attribute__((aligned(64)));
        for (Py_ssize_t p0 = 0; p0 + CH <= pairs; p0 += CH) {
            for (int l = 0; l < lines; l++) {
                const float *x = src + l * s_line + 2 * p0;
                for (int q = 0; q < CH; q++)
                    chunk[l][q] = rg_bf16_pair(rg_bf16_load(x[2 * q], sq),
                                               rg_bf16_load(x[2 * q + 1], sq));
            }
            for (int q = 0; q < CH; q++) {
                uint32_t *d = dst + (p0 + q) * width;
                for (int l = 0; l < lines; l++)
                    d[l] = chunk[l][q];
                for (int l = lines; l < width; l++)
                    d[l] = 0;
            }
        }
        for (Py_ssize_t p = pairs / CH * CH; p < pairs; p++) {
            uint32_t *d = dst + p * width;
            for (int l = 0; l < lines; l++)
                d[l] = rg_bf16_pair(rg_bf16_load(src[l * s_line + 2 * p], sq),
                                    rg_bf16_load(src[l * s_line + 2 * p + 1], sq));
            for (int l = lines; l < width; l++)
                d[l] = 0;
        }
    } else {
        for (Py_ssize_t p = 0; p < pairs; p++) {
            uint32_t *d = dst + p * width;
            for (int l = 0; l < lines; l++)
                d[l] = rg_bf16_pair(rg_bf16_load(src[l * s_line + 2 * p * s_k], sq),
                                    rg_bf16_load(src[l * s_line + (2 * p + 1) * s_k], sq));
            for (int l = lines; l < width; l++)
                d[l] = 0;
        }
    }
    if (all > pairs) { /* odd kc: the last pair's high half is zero */
        uint32_t *d = dst + pairs * width;
        for (int l = 0; l < lines; l++)
            d[l] = rg_bf16_pair(rg_bf16_load(src[l * s_line + 2 * pairs * s_k], sq), 0.0f);
        for (int l = lines; l < width; l++)
            d[l] = 0;
    }
}

/* An mc x kc block of op(A) (element (i, k) at a[i*rs + k*cs]) into ceil(mc/MR) strips,
 * strip s at dst + s * MR * kc (float units, as the fp32 packer places them); sq:
 * relu(op(A))^2, squared before it is rounded. */
static inline __attribute__((always_inline)) RGB_TARGET void RGB_NAME(pack_a_impl)(
    float *restrict dst, const float *restrict a, Py_ssize_t rs, Py_ssize_t cs,
    Py_ssize_t mc, Py_ssize_t kc, const int sq)
{
    for (Py_ssize_t i0 = 0; i0 < mc; i0 += RGB_MR)
        RGB_NAME(pack_strip)((uint32_t *)(dst + i0 * kc), RGB_MR, a + i0 * rs, rs, cs,
                             (int)(mc - i0 < RGB_MR ? mc - i0 : RGB_MR), kc, sq);
}

RG_BF16_PACK_ENTRIES(RGB_TARGET, RGB_NAME(pack_a), RGB_NAME(pack_a_sqrelu),
                     RGB_NAME(pack_a_impl))

/* A kc x nc block of op(B) (element (k, j) at b[k*rs + j*cs]) into ceil(nc/NR) strips,
 * strip s at dst + s * NR * kc; sq: relu(op(B))^2, squared before it is rounded. */
static inline __attribute__((always_inline)) RGB_TARGET void RGB_NAME(pack_b_impl)(
    float *restrict dst, const float *restrict b, Py_ssize_t rs, Py_ssize_t cs,
    Py_ssize_t kc, Py_ssize_t nc, const int sq)
{
    for (Py_ssize_t j0 = 0; j0 < nc; j0 += RGB_NR)
        RGB_NAME(pack_strip)((uint32_t *)(dst + j0 * kc), RGB_NR, b + j0 * cs, cs, rs,
                             (int)(nc - j0 < RGB_NR ? nc - j0 : RGB_NR), kc, sq);
}

RG_BF16_PACK_ENTRIES(RGB_TARGET, RGB_NAME(pack_b), RGB_NAME(pack_b_sqrelu),
                     RGB_NAME(pack_b_impl))

/* One MR x NR tile (nv of its NV vectors per row): acc = init (or 0), then for every pair
 * acc += odd product, acc += even product; then the write-back (dst, add_dst, c2, gate: see
 * gemm_microkernel.h). The start and the write-back are the fp32 kernel's own, on the
 * sums in registers (through a stack tile only at an edge). */
static inline __attribute__((always_inline)) RGB_TARGET void RGB_NAME(tile)(
    const int nv, Py_ssize_t kc, const float *restrict ap, const float *restrict bp,
    const float *init, Py_ssize_t ld_init,
    float *dst, Py_ssize_t ld_dst, int add_dst, float *c2, const float *gate, int mr, int nr)
{
    RGB_NAME(vec) acc[RGB_MR][RGB_NV];
    float tile[RGB_MR * RGB_NR] __attribute__((aligned(64)));
    const uint32_t *a = (const uint32_t *)ap, *b = (const uint32_t *)bp;
    const Py_ssize_t pairs = (kc + 1) / 2;

    RGB_FP32(tile_start)(acc, tile, nv, init, ld_init, dst, ld_dst, add_dst, gate, mr, nr);
    RGB_FTZ_BEGIN
    for (Py_ssize_t p = 0; p < pairs; p++) {
        RGB_NAME(uvec) bw[RGB_NV];
#pragma GCC unroll 4
        for (int j = 0; j < nv; j++)
            bw[j] = *(const RGB_NAME(uvec) *)(b + p * RGB_NR + j * RGB_VW);
#if RGB_NATIVE
#pragma GCC unroll 16
        for (int i = 0; i < RGB_MR; i++) {
            const __m512bh aw = (__m512bh)_mm512_set1_epi32((int)a[p * RGB_MR + i]);
#pragma GCC unroll 4
            for (int j = 0; j < nv; j++)
                acc[i][j] = (RGB_NAME(vec))_mm512_dpbf16_ps((__m512)acc[i][j], aw,
                                                           (__m512bh)bw[j]);
        }
#else
        RGB_NAME(vec) bodd[RGB_NV], beven[RGB_NV];
#pragma GCC unroll 4
        for (int j = 0; j < nv; j++) {
            bodd[j] = (RGB_NAME(vec))(bw[j] & 0xffff0000u);
            beven[j] = (RGB_NAME(vec))(bw[j] << 16);
        }
#pragma GCC unroll 16
        for (int i = 0; i < RGB_MR; i++) {
            const uint32_t w = a[p * RGB_MR + i];
            const float aodd = rg_bf16_float(w & 0xffff0000u), aeven = rg_bf16_float(w << 16);
            /* Exact products (8-bit significands), each added with one rounding: an FMA,
             * or a multiply and an add where the target has none (sse2). */
#pragma GCC unroll 4
            for (int j = 0; j < nv; j++)
                acc[i][j] = RGB_FTZ(acc[i][j] + aodd * bodd[j]);
#pragma GCC unroll 4
            for (int j = 0; j < nv; j++)
                acc[i][j] = RGB_FTZ(acc[i][j] + aeven * beven[j]);
        }
#endif
    }
    RGB_FTZ_SETTLE(acc, nv)
    RGB_FTZ_END
    RGB_FP32(tile_finish)(acc, tile, nv, dst, ld_dst, add_dst, c2, gate, mr, nr);
}

static RGB_TARGET void RGB_NAME(kernel)(
    Py_ssize_t kc, const float *restrict ap, const float *restrict bp,
    const float *init, Py_ssize_t ld_init,
    float *dst, Py_ssize_t ld_dst, int add_dst, float *c2, const float *gate, int mr, int nr)
{
    RGB_NAME(tile)(RGB_NV, kc, ap, bp, init, ld_init, dst, ld_dst, add_dst, c2, gate, mr, nr);
}

/* The left NR/2 columns only (a last strip that narrow), summed in the same order. */
static RGB_TARGET void RGB_NAME(kernel_narrow)(
    Py_ssize_t kc, const float *restrict ap, const float *restrict bp,
    const float *init, Py_ssize_t ld_init,
    float *dst, Py_ssize_t ld_dst, int add_dst, float *c2, const float *gate, int mr, int nr)
{
    RGB_NAME(tile)(RGB_NV / 2, kc, ap, bp, init, ld_init, dst, ld_dst, add_dst, c2, gate,
                   mr, nr);
}

#undef RGB_NR
