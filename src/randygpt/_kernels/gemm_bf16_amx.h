/* The AMX path of randygpt's bf16 GEMM: tdpbf16ps on 16 x 16 fp32 tiles (AMX-BF16: Intel
 * Sapphire Rapids and later). Included by gemm_bf16.h after the native AVX512_BF16 path,
 * whose B strip layout (k pairs of 32 columns, pair-major: one AMX B tile row per pair)
 * and vdpbf16ps it shares, and after the fp32 kernels, whose write-back arithmetic it
 * repeats.
 *
 * Register tile: 32 x 32 outputs in four accumulator tiles (C00 C01 / C10 C11), two A
 * tiles (rows 0-15 and 16-31, 16 pairs each) and two B tiles (16 pairs of columns 0-15 and
 * 16-31): eight tdpbf16ps-ready tiles, all the architecture has. One step of 16 pairs is
 * four tdpbf16ps, 32 x 32 x 32 multiply-adds. Full tiles with nothing to add go from the
 * tile registers straight to dst; the rest through a stack tile and an AVX-512 write-back
 * equal to the fp32 kernels'.
 *
 * A strips hold pair words, bf16(x[r, 2p]) low and bf16(x[r, 2p + 1]) high as the other
 * paths pair them, for the P = ceil(kc / 2) pairs of 32 rows (rows past the edge zeros):
 * first each whole step of 16 pairs as one contiguous 2 KiB block, rows 0-31 of 16 words
 * each (the two A tiles, each loaded from one contiguous KiB, which the prefetchers follow
 * better than 16 rows a strip's length apart: fc1's forward 1.15 -> 1.06 ms, a qkv weight
 * gradient 1.11 -> 1.05 ms at one thread), then the last
 * P mod 16 pairs of every row, row after row (see rga_a_at). That is 32 P words, within the
 * 32 kc floats the driver gives a strip. Those last pairs (a K block that is not a
 * multiple of 32: K = 67, or a short last block) are added after the tiles, with
 * vdpbf16ps.
 *
 * Numerics: per output element the sums are fp32, products of bf16 values exact; how one
 * tdpbf16ps adds its 32 products into the accumulator is the hardware's own (measured on
 * a Sapphire Rapids-class Xeon: one pair alone gives acc + round(even + odd product); with
 * more pairs it matches neither a sequential fp32 chain nor a single rounding of the exact
 * sum, in 5-35% of the elements, by an ulp or so). So this path's bits are its own: not
 * the emulation's, but the same for any thread count and any K blocking whose blocks but
 * the last are multiples of 32 (RG_KC is, and _plan_k_blocks rounds longer ones to 32).
 *
 * Tile state: the process asks Linux for the tile data state once (arch_prctl
 * ARCH_REQ_XCOMP_PERM, in rg_amx_usable; without it the path is not offered). Each OpenMP
 * thread has its own tile state, and other code in the process may configure the tiles
 * differently between our calls, so the driver has every work item load the
 * configuration first and release the tiles after (rg_isa_t's begin and end):
 * loaded per kernel call, ldtilecfg took about half of the kernel's time here, so it is
 * loaded once per item.
 */
#ifndef RANDYGPT_GEMM_BF16_AMX_H
#define RANDYGPT_GEMM_BF16_AMX_H

#if defined(RG_X86) && defined(__linux__)
#define RG_HAVE_AMX 1
#include <unistd.h>
#include <sys/syscall.h>

#define RGA_TARGET \
    __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,amx-tile,amx-bf16")))
#define RGA_MR 32
#define RGA_NR 32

/* The 64-byte tile configuration (palette 1): every tile 16 rows of 64 bytes. */
typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) rga_tilecfg_t;

/* A work item's begin and end (rg_isa_t): its thread's tiles configured, and released
 * after, so the thread's AMX state is back to init for whatever runs next. */
static RGA_TARGET void rga_configure(void)
{
    /* Static and complete at compile time: the intrinsic's asm tells the compiler it reads
     * only the first 8 bytes, so stores to a stack copy could be dropped as dead. */
    static const rga_tilecfg_t cfg = {
        .palette = 1,
        .colsb = {64, 64, 64, 64, 64, 64, 64, 64},
        .rows = {16, 16, 16, 16, 16, 16, 16, 16},
    };
    _tile_loadconfig(&cfg);
}

static RGA_TARGET void rga_release(void) { _tile_release(); }

/* Whether the CPU has AMX-BF16 and Linux lets this process use the tile data (asked for
 * once; a kernel older than 5.16 or a seccomp filter says no). */
static int rg_amx_usable(void)
{
    static int usable = -1;
    if (usable < 0) {
        __builtin_cpu_init();
        usable = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                 __builtin_cpu_supports("avx512bf16") &&
                 syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                         18 /* XFEATURE_XTILEDATA */) == 0;
    }
    return usable;
}

/* Where pair p of row r sits in an A strip of `all` pairs (the layout above). */
static inline __attribute__((always_inline)) Py_ssize_t rga_a_at(int r, Py_ssize_t p,
                                                                 Py_ssize_t all)
{
    const Py_ssize_t full = all / 16 * 16;
    return p < full ? p / 16 * (RGA_MR * 16) + r * 16 + p % 16
                    : full * RGA_MR + r * (all - full) + (p - full);
}


/* Row r of a strip from a contiguous k run x[0 .. kc - 1]: bf16 of x in order is the
 * row's pair words, 16 at a time (sq: of relu(x)^2). */
static inline __attribute__((always_inline)) RGA_TARGET void rga_pack_row(
    uint32_t *restrict strip, int r, const float *restrict x, Py_ssize_t kc, const int sq)
{
    const Py_ssize_t all = (kc + 1) / 2;
    for (Py_ssize_t k = 0; k < kc; k += 32) {
        const __m512 lo = rgv_operand(x + k, kc - k, sq),
                     hi = rgv_operand(x + k + 16, kc - k - 16, sq);
        _mm512_mask_storeu_epi32(strip + rga_a_at(r, k / 2, all), rgv_mask((kc - k + 1) / 2),
                                 (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* Rows r0 .. r0 + lines - 1 (lines <= 16) of a strip from op(A) transposed (element
 * (i, k) at a[i + k * cs]): 16 pairs at a time, each pair's two source rows read
 * contiguously into a pair-major block that one transpose turns row-major. */
static inline __attribute__((always_inline)) RGA_TARGET void rga_pack_rows_t(
    uint32_t *restrict strip, int r0, Py_ssize_t all, const float *restrict a, Py_ssize_t cs,
    int lines, Py_ssize_t kc, const int sq)
{
    for (Py_ssize_t p0 = 0; p0 < all; p0 += 16) {
        __m512i w[16];
        const int np = (int)(all - p0 < 16 ? all - p0 : 16);
        for (int q = 0; q < 16; q++) {
            const Py_ssize_t k = 2 * (p0 + q);
            w[q] = q < np ? rgv_pairs(rgv_operand(a + k * cs, lines, sq),
                                      k + 1 < kc ? rgv_operand(a + (k + 1) * cs, lines, sq)
                                                 : _mm512_setzero_ps())
                          : _mm512_setzero_si512();
        }
        rgv_transpose16(w);
        for (int r = 0; r < lines; r++)
            _mm512_mask_storeu_epi32(strip + rga_a_at(r0 + r, p0, all), rgv_mask(np), w[r]);
    }
}

/* An mc x kc block of op(A) (element (i, k) at a[i*rs + k*cs]) into ceil(mc/32) strips,
 * strip s at dst + s * 32 * kc floats, each row-major as described above; sq:
 * relu(op(A))^2, squared before it is rounded. */
static inline __attribute__((always_inline)) RGA_TARGET void rga_pack_a_impl(
    float *restrict dst, const float *restrict a, Py_ssize_t rs, Py_ssize_t cs,
    Py_ssize_t mc, Py_ssize_t kc, const int sq)
{
    const Py_ssize_t all = (kc + 1) / 2;
    for (Py_ssize_t i0 = 0; i0 < mc; i0 += RGA_MR) {
        uint32_t *strip = (uint32_t *)(dst + i0 * kc);
        const int lines = (int)(mc - i0 < RGA_MR ? mc - i0 : RGA_MR);
        if (lines < RGA_MR) /* the rows past the edge: zeros */
            __builtin_memset(strip, 0, (size_t)(RGA_MR * all) * 4);
        if (cs == 1) {
            /* rows of X or dY: each row's k run is contiguous */
            for (int r = 0; r < lines; r++)
                rga_pack_row(strip, r, a + (i0 + r) * rs, kc, sq);
        } else if (rs == 1) {
            /* op(A) transposed (X^T, dY^T): the rows' values of one k are contiguous */
            for (int r0 = 0; r0 < lines; r0 += 16)
                rga_pack_rows_t(strip, r0, all, a + i0 + r0, cs,
                                lines - r0 < 16 ? lines - r0 : 16, kc, sq);
        } else {
            for (int r = 0; r < lines; r++)
                for (Py_ssize_t p = 0; p < all; p++) {
                    const float *x = a + (i0 + r) * rs + 2 * p * cs;
                    strip[rga_a_at(r, p, all)] =
                        rg_bf16_pair(rg_bf16_load(x[0], sq),
                                     2 * p + 1 < kc ? rg_bf16_load(x[cs], sq) : 0.0f);
                }
        }
    }
}

RG_BF16_PACK_ENTRIES(RGA_TARGET, rga_pack_a, rga_pack_a_sqrelu, rga_pack_a_impl)

/* The pairs p0 .. all - 1 of a strip added to the stored sums (32 rows of 32 floats) with
 * vdpbf16ps, nv of the two 16-column halves. */
static inline __attribute__((always_inline)) RGA_TARGET void rga_tail(
    float *tile, const uint32_t *a, const uint32_t *b, Py_ssize_t p0, Py_ssize_t all, int nv)
{
    for (int r = 0; r < RGA_MR; r++)
        for (int j = 0; j < nv; j++) {
            __m512 acc = _mm512_load_ps(tile + r * RGA_NR + 16 * j);
            for (Py_ssize_t p = p0; p < all; p++)
                acc = _mm512_dpbf16_ps(
                    acc, (__m512bh)_mm512_set1_epi32((int)a[rga_a_at(r, p, all)]),
                    (__m512bh)_mm512_loadu_si512(b + p * RGA_NR + 16 * j));
            _mm512_store_ps(tile + r * RGA_NR + 16 * j, acc);
        }
}

/* The finished sums (32 rows of 32 floats) into dst's valid mr x nr corner, with the fp32
 * kernels' write-back (gemm_microkernel.h) applied lane by lane, rounded as they round it:
 * dst + sum when add_dst, 2 relu(gate) * sum when gate is given, relu(.)^2 into c2. */
static inline __attribute__((always_inline)) RGA_TARGET void rga_write_back(
    const float *tile, const int nv, float *dst, Py_ssize_t ld_dst, int add_dst, float *c2,
    const float *gate, int mr, int nr)
{
    for (int j = 0; j < nv && 16 * j < nr; j++) {
        const __mmask16 m = nr - 16 * j >= 16 ? 0xffff : (__mmask16)((1u << (nr - 16 * j)) - 1);
        for (int i = 0; i < mr; i++) {
            const Py_ssize_t at = i * ld_dst + 16 * j;
            rg_avx512_vec v = (rg_avx512_vec)_mm512_load_ps(tile + i * RGA_NR + 16 * j);
            if (add_dst)
                v = (rg_avx512_vec)_mm512_maskz_loadu_ps(m, dst + at) + v;
            if (gate != NULL)
                v = rg_avx512_relu2x((rg_avx512_vec)_mm512_maskz_loadu_ps(m, gate + at)) * v;
            _mm512_mask_storeu_ps(dst + at, m, (__m512)v);
            if (c2 != NULL)
                _mm512_mask_storeu_ps(c2 + at, m, (__m512)rg_avx512_sqrelu(v));
        }
    }
}

/* One 32 x 32 tile (nv = 2) or its left 16 columns (nv = 1): sums = init (or 0) plus the
 * strips' products, then the avx512 fp32 kernel's write-back, 12 rows at a time. */
static inline __attribute__((always_inline)) RGA_TARGET void rga_tile(
    const int nv, Py_ssize_t kc, const float *restrict ap, const float *restrict bp,
    const float *init, Py_ssize_t ld_init,
    float *dst, Py_ssize_t ld_dst, int add_dst, float *c2, const float *gate, int mr, int nr)
{
    float tile[RGA_MR * RGA_NR] __attribute__((aligned(64)));
    const uint32_t *a = (const uint32_t *)ap, *b = (const uint32_t *)bp;
    const Py_ssize_t all = (kc + 1) / 2, full_pairs = all / 16 * 16;

    if (init == NULL) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
    } else {
        const float *src = init;
        Py_ssize_t ld = ld_init;
        if (mr < RGA_MR || nr < nv * 16) {
            /* An edge tile reads only the valid corner of init. */
            __builtin_memset(tile, 0, sizeof tile);
            for (int i = 0; i < mr; i++)
                __builtin_memcpy(tile + i * RGA_NR, init + i * ld_init, (size_t)nr * 4);
            src = tile;
            ld = RGA_NR;
        }
        _tile_loadd(0, src, ld * 4);
        _tile_loadd(2, src + 16 * ld, ld * 4);
        if (nv == 2) {
            _tile_loadd(1, src + 16, ld * 4);
            _tile_loadd(3, src + 16 * ld + 16, ld * 4);
        }
    }
    /* tiles 0 1 / 2 3: C00 C01 / C10 C11; 4, 5: A rows 0-15, 16-31; 6, 7: B columns 0-15,
     * 16-31 */
    for (Py_ssize_t p = 0; p < full_pairs; p += 16) {
        _tile_loadd(4, a + p * RGA_MR, 64);
        _tile_loadd(6, b + p * RGA_NR, RGA_NR * 4);
        _tile_loadd(5, a + p * RGA_MR + 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (nv == 2) {
            _tile_loadd(7, b + p * RGA_NR + 16, RGA_NR * 4);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    if (mr == RGA_MR && nr == nv * 16 && !add_dst && c2 == NULL && gate == NULL &&
        full_pairs == all) {
        /* Nothing to add or apply: the tiles go straight to dst. */
        _tile_stored(0, dst, ld_dst * 4);
        _tile_stored(2, dst + 16 * ld_dst, ld_dst * 4);
        if (nv == 2) {
            _tile_stored(1, dst + 16, ld_dst * 4);
            _tile_stored(3, dst + 16 * ld_dst + 16, ld_dst * 4);
        }
        return;
    }
    _tile_stored(0, tile, RGA_NR * 4);
    _tile_stored(2, tile + 16 * RGA_NR, RGA_NR * 4);
    if (nv == 2) {
        _tile_stored(1, tile + 16, RGA_NR * 4);
        _tile_stored(3, tile + 16 * RGA_NR + 16, RGA_NR * 4);
    }
    if (full_pairs < all)
        rga_tail(tile, a, b, full_pairs, all, nv);

    rga_write_back(tile, nv, dst, ld_dst, add_dst, c2, gate, mr, nr);
}

static RGA_TARGET void rga_kernel(
    Py_ssize_t kc, const float *restrict ap, const float *restrict bp,
    const float *init, Py_ssize_t ld_init,
    float *dst, Py_ssize_t ld_dst, int add_dst, float *c2, const float *gate, int mr, int nr)
{
    rga_tile(2, kc, ap, bp, init, ld_init, dst, ld_dst, add_dst, c2, gate, mr, nr);
}

static RGA_TARGET void rga_kernel_narrow(
    Py_ssize_t kc, const float *restrict ap, const float *restrict bp,
    const float *init, Py_ssize_t ld_init,
    float *dst, Py_ssize_t ld_dst, int add_dst, float *c2, const float *gate, int mr, int nr)
{
    rga_tile(1, kc, ap, bp, init, ld_init, dst, ld_dst, add_dst, c2, gate, mr, nr);
}

#undef RGA_TARGET
#endif /* RG_X86 && __linux__ */

#endif /* RANDYGPT_GEMM_BF16_AMX_H */
