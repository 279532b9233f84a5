/* One 4 x 4 block of floats transposed through 16-byte vectors, for the packers that turn
 * rows into columns: the GEMM's (gemm_microkernel.h) and attention's (attention_impl.h).
 * No target attribute: it inlines into each path's code and takes that path's encoding. */
#ifndef RANDYGPT_TRANSPOSE4_H
#define RANDYGPT_TRANSPOSE4_H

#include <stddef.h>

#if !defined(__GNUC__)
#error "randygpt's kernels need GCC or clang (vector extensions)"
#endif

/* Two-source shuffle of 4-float vectors. */
#if defined(__clang__)
#define RG_SHUFFLE4(a, b, i0, i1, i2, i3) __builtin_shufflevector(a, b, i0, i1, i2, i3)
#else
#define RG_SHUFFLE4(a, b, i0, i1, i2, i3) \
    __builtin_shuffle(a, b, (__attribute__((vector_size(16))) int){i0, i1, i2, i3})
#endif

/* dst[c * ld_dst + r] = src[r * ld_src + c] for r, c in 0..3 (a quarter of the scalar
 * version's loads and stores). */
static inline __attribute__((always_inline)) void rg_transpose4(float *restrict dst,
                                                                ptrdiff_t ld_dst,
                                                                const float *restrict src,
                                                                ptrdiff_t ld_src)
{
    typedef float v4 __attribute__((vector_size(16)));
    v4 x0, x1, x2, x3;
    __builtin_memcpy(&x0, src, 16);
    __builtin_memcpy(&x1, src + ld_src, 16);
    __builtin_memcpy(&x2, src + 2 * ld_src, 16);
    __builtin_memcpy(&x3, src + 3 * ld_src, 16);
    const v4 t0 = RG_SHUFFLE4(x0, x1, 0, 4, 1, 5);
    const v4 t1 = RG_SHUFFLE4(x2, x3, 0, 4, 1, 5);
    const v4 t2 = RG_SHUFFLE4(x0, x1, 2, 6, 3, 7);
    const v4 t3 = RG_SHUFFLE4(x2, x3, 2, 6, 3, 7);
    const v4 c0 = RG_SHUFFLE4(t0, t1, 0, 1, 4, 5);
    const v4 c1 = RG_SHUFFLE4(t0, t1, 2, 3, 6, 7);
    const v4 c2 = RG_SHUFFLE4(t2, t3, 0, 1, 4, 5);
    const v4 c3 = RG_SHUFFLE4(t2, t3, 2, 3, 6, 7);
    __builtin_memcpy(dst, &c0, 16);
    __builtin_memcpy(dst + ld_dst, &c1, 16);
    __builtin_memcpy(dst + 2 * ld_dst, &c2, 16);
    __builtin_memcpy(dst + 3 * ld_dst, &c3, 16);
}

#endif /* RANDYGPT_TRANSPOSE4_H */
