/* Vectorised packers of randygpt's bf16 GEMM (AVX512_BF16): vcvtne2ps2bf16 rounds 32 fp32
 * values to bf16 in one instruction, exactly as rg_bf16_bits does (gemm_bf16.h: nearest even,
 * denormals to a signed zero, NaN quieted), so these write the portable packers' words, 16
 * or 32 at a time instead of one. Used by the native path (vdpbf16ps, its 12 x 32 tile) and
 * by the AMX path, which shares the native B strip layout (gemm_bf16_amx.h).
 *
 * Measured on an AMD EPYC (Zen 5, one thread), a 2048 x 1024 op(A) against one 32-column B
 * strip, where packing op(A) is most of the time: 0.85 -> 0.48 ms with op(A) row-major,
 * 1.16 -> 0.44 ms with op(A) transposed; the step's bf16 GEMMs in a row 32.7 -> 25.8 ms.
 */
#ifndef RANDYGPT_GEMM_BF16_PACK_H
#define RANDYGPT_GEMM_BF16_PACK_H

#define RGV_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16")))
#define RGV_NR 32 /* columns of a B strip (the native and AMX tiles' width) */
#define RGV_MR 12 /* rows of a native A strip */

/* Up to 16 floats from x, zeros past n (n <= 0: all zeros). */
static inline __attribute__((always_inline)) RGV_TARGET __m512 rgv_load(const float *x,
                                                                        Py_ssize_t n)
{
    if (n >= 16)
        return _mm512_loadu_ps(x);
    return n > 0 ? _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), x) : _mm512_setzero_ps();
}

static inline __attribute__((always_inline)) __mmask16 rgv_mask(Py_ssize_t n)
{
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
}

/* Pair words of lines 0-15: bf16(even[l]) low, bf16(odd[l]) high. vcvtne2ps2bf16 rounds as
 * rg_bf16_bits does (gemm_bf16.h), so these equal the portable packers' words. */
static inline __attribute__((always_inline)) RGV_TARGET __m512i rgv_pairs(__m512 even,
                                                                          __m512 odd)
{
    const __m512i interleave = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
}

/* r[i][j] <- r[j][i] for 16 x 16 32-bit words. */
static inline __attribute__((always_inline)) RGV_TARGET void rgv_transpose16(__m512i r[16])
{
    __m512i t[16], u[16], v[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            v[8 * i + j] = _mm512_shuffle_i32x4(u[8 * i + j], u[8 * i + j + 4], 0x88);
            v[8 * i + j + 4] = _mm512_shuffle_i32x4(u[8 * i + j], u[8 * i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(v[j], v[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(v[j], v[j + 8], 0xdd);
    }
}

/* Up to 16 operand values from x (zeros past n), squared-ReLU'd first when sq, as
 * rg_bf16_load does. */
static inline __attribute__((always_inline)) RGV_TARGET __m512 rgv_operand(const float *x,
                                                                           Py_ssize_t n,
                                                                           const int sq)
{
    const __m512 v = rgv_load(x, n);
    return sq ? (__m512)rg_avx512_sqrelu((rg_avx512_vec)v) : v;
}

/* w[q] = the pair words of pairs p0 + q (q < 16, p0 = k / 2) of 16 lines whose k runs are
 * contiguous (line l at x + l * ld, lines past `lines` zeros): each line's 32 values
 * convert in order (the bf16 of a k run is its pair words), and one transpose makes the
 * block pair-major, lane l holding line l. */
static inline __attribute__((always_inline)) RGV_TARGET void rgv_lines_to_pairs(
    __m512i w[16], const float *restrict x, Py_ssize_t ld, Py_ssize_t lines, Py_ssize_t k,
    Py_ssize_t kc, const int sq)
{
    for (int l = 0; l < 16; l++) {
        const float *xl = x + l * ld + k;
        w[l] = l < lines ? (__m512i)_mm512_cvtne2ps_pbh(rgv_operand(xl + 16, kc - k - 16, sq),
                                                        rgv_operand(xl, kc - k, sq))
                         : _mm512_setzero_si512();
    }
    rgv_transpose16(w);
}

/* A kc x nc block of op(B) (element (k, j) at b[k*rs + j*cs]) into ceil(nc/32) strips,
 * strip s at dst + s * 32 * kc floats, pair-major as the native path lays them out (the
 * words equal rgb_native_pack_b's), with vcvtne2ps2bf16 doing the rounding. */
static inline __attribute__((always_inline)) RGV_TARGET void rgv_pack_b_impl(
    float *restrict dst, const float *restrict b, Py_ssize_t rs, Py_ssize_t cs,
    Py_ssize_t kc, Py_ssize_t nc, const int sq)
{
    const Py_ssize_t all = (kc + 1) / 2;
    for (Py_ssize_t j0 = 0; j0 < nc; j0 += RGV_NR) {
        uint32_t *strip = (uint32_t *)(dst + j0 * kc);
        const Py_ssize_t lines = nc - j0 < RGV_NR ? nc - j0 : RGV_NR;
        if (cs == 1) {
            /* op(B) row-major (W in dX = dY W, X or relu(pre)^2 in weight grads): each
             * pair's two rows are contiguous runs of the strip's columns */
            for (Py_ssize_t p = 0; p < all; p++) {
                const float *x0 = b + 2 * p * rs + j0, *x1 = x0 + rs;
                const int odd = 2 * p + 1 < kc;
                for (int h = 0; h < 2; h++) {
                    const Py_ssize_t n = lines - 16 * h;
                    _mm512_store_si512(
                        strip + p * RGV_NR + 16 * h,
                        rgv_pairs(rgv_operand(x0 + 16 * h, n, sq),
                                  odd ? rgv_operand(x1 + 16 * h, n, sq) : _mm512_setzero_ps()));
                }
            }
        } else if (rs == 1) {
            /* op(B) = W^T (the forward): each column's k run is contiguous; 16 pairs of
             * each half of the strip's columns at a time */
            for (Py_ssize_t p0 = 0; p0 < all; p0 += 16) {
                const int np = (int)(all - p0 < 16 ? all - p0 : 16);
                for (int h = 0; h < 2; h++) {
                    __m512i w[16];
                    rgv_lines_to_pairs(w, b + (j0 + 16 * h) * cs, cs, lines - 16 * h, 2 * p0,
                                       kc, sq);
                    for (int q = 0; q < np; q++)
                        _mm512_store_si512(strip + (p0 + q) * RGV_NR + 16 * h, w[q]);
                }
            }
        } else {
            /* any other strides: the portable packer */
            rgb_native_pack_b_impl(dst + j0 * kc, b + j0 * cs, rs, cs, kc, lines, sq);
        }
    }
}

RG_BF16_PACK_ENTRIES(RGV_TARGET, rgv_pack_b, rgv_pack_b_sqrelu, rgv_pack_b_impl)

/* An mc x kc block of op(A) (element (i, k) at a[i*rs + k*cs]) into ceil(mc/12) strips of
 * the native layout (gemm_bf16_kernel.h: for each pair, the 12 rows' words), strip s at
 * dst + s * 12 * kc floats; rows past the edge and the high half of a last odd pair zero;
 * sq: relu(op(A))^2, squared before it is rounded. */
static inline __attribute__((always_inline)) RGV_TARGET void rgv_pack_a_impl(
    float *restrict dst, const float *restrict a, Py_ssize_t rs, Py_ssize_t cs,
    Py_ssize_t mc, Py_ssize_t kc, const int sq)
{
    const Py_ssize_t all = (kc + 1) / 2;
    const __mmask16 row_words = (__mmask16)((1u << RGV_MR) - 1);
    if (rs == 1 && cs != 1) {
        /* op(A) transposed (dY^T in weight grads): a pair's two k rows are contiguous runs
         * of every strip's rows, read in order (strip by strip for each pair, which the
         * prefetchers follow: pair by pair for each strip, the product above took 1.00
         * ms instead of 0.44) */
        for (Py_ssize_t p = 0; p < all; p++) {
            const float *x = a + 2 * p * cs;
            const int odd = 2 * p + 1 < kc;
            for (Py_ssize_t i0 = 0; i0 < mc; i0 += RGV_MR) {
                const Py_ssize_t lines = mc - i0 < RGV_MR ? mc - i0 : RGV_MR;
                _mm512_mask_storeu_epi32(
                    (uint32_t *)(dst + i0 * kc) + p * RGV_MR, row_words,
                    rgv_pairs(rgv_operand(x + i0, lines, sq),
                              odd ? rgv_operand(x + cs + i0, lines, sq) : _mm512_setzero_ps()));
            }
        }
        return;
    }
    for (Py_ssize_t i0 = 0; i0 < mc; i0 += RGV_MR) {
        uint32_t *restrict strip = (uint32_t *)(dst + i0 * kc);
        const float *src = a + i0 * rs;
        const int lines = (int)(mc - i0 < RGV_MR ? mc - i0 : RGV_MR);
        if (cs == 1) {
            /* rows of X or dY: 16 pairs of the strip's rows at a time */
            for (Py_ssize_t p0 = 0; p0 < all; p0 += 16) {
                const int np = (int)(all - p0 < 16 ? all - p0 : 16);
                __m512i w[16];
                rgv_lines_to_pairs(w, src, rs, lines, 2 * p0, kc, sq);
                for (int q = 0; q < np; q++)
                    _mm512_mask_storeu_epi32(strip + (p0 + q) * RGV_MR, row_words, w[q]);
            }
        } else {
            /* any other strides (no entry point makes them): the portable packer */
            rgb_native_pack_a_impl(dst + i0 * kc, src, rs, cs, lines, kc, sq);
        }
    }
}

RG_BF16_PACK_ENTRIES(RGV_TARGET, rgv_pack_a, rgv_pack_a_sqrelu, rgv_pack_a_impl)

#endif /* RANDYGPT_GEMM_BF16_PACK_H */
