/* e^x for x <= 0, in steps a compiler can vectorize: the exponential of softmax (attention)
 * and of log-sum-exp (xent). libm's expf is an opaque scalar call that gcc does not vectorize
 * without -ffast-math, which the project refuses, and it was the largest cost of both kernels.
 *
 * Method: Cody-Waite reduction x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r
 * (relative error about 1e-7, within 2 ulp of the correctly rounded value), and 2^n built in
 * the exponent bits. Inputs below -87 give 0: the true value is under FLT_MIN, and next to the
 * row max's e^0 = 1 it is far below float resolution anyway. NaN stays NaN.
 *
 * RANDYGPT_FASTEXP_STEPS is written once for float and for GCC vector-of-float types alike
 * (their arithmetic takes scalar operands lane by lane), so the scalar function below and
 * attention's vector copies run the same operations; where the compiler contracts a * b + c
 * into an FMA (on an FMA target), it does so the same way in each.
 */
#ifndef RANDYGPT_FASTEXP_H
#define RANDYGPT_FASTEXP_H

#include <stdint.h>
#include <string.h>

/* Below this the result is 0; the clamp keeps n in the normal exponent range. */
#define RANDYGPT_FASTEXP_LO (-87.0f)

/* 1.5 * 2^23: a float of magnitude under 2^22 added to it is rounded to an integer, which
 * the sum's low mantissa bits then hold. */
#define RANDYGPT_FASTEXP_SHIFTER 12582912.0f
#define RANDYGPT_FASTEXP_SHIFTER_BITS 0x4B400000u

/* Given xc (x clamped to >= RANDYGPT_FASTEXP_LO), sets n to the integer nearest xc / ln2
 * (as a float) and p to e^(xc - n ln2); e^xc is then p * 2^n (a NaN xc gives NaN n and p).
 * The caller declares n, r, p of xc's type. Adding and subtracting the shifter rounds to the
 * nearest integer without a floor call (kept as two operations: the build never uses
 * -ffast-math). ln2 is split in two parts, the first exact in few bits, so that n * ln2
 * loses nothing. */
#define RANDYGPT_FASTEXP_STEPS(xc, n, r, p)                                   \
    do {                                                                      \
        (n) = ((xc) * 1.44269504088896341f + RANDYGPT_FASTEXP_SHIFTER)        \
              - RANDYGPT_FASTEXP_SHIFTER;                                     \
        (r) = (xc) - (n) * 0.693359375f;                                      \
        (r) = (r) - (n) * -2.12194440e-4f;                                    \
        (p) = 1.9875691500e-4f * (r) + 1.3981999507e-3f;                      \
        (p) = (p) * (r) + 8.3334519073e-3f;                                   \
        (p) = (p) * (r) + 4.1665795894e-2f;                                   \
        (p) = (p) * (r) + 1.6666665459e-1f;                                   \
        (p) = (p) * (r) + 5.0000001201e-1f;                                   \
        (p) = (p) * (r) * (r) + (r) + 1.0f;                                   \
    } while (0)

/* Always inlined, so that each caller's instruction set (a target clone, an AVX2 copy)
 * compiles it, and its loops vectorize. */
#if defined(__GNUC__)
#define RANDYGPT_FASTEXP_INLINE static inline __attribute__((always_inline))
#else
#define RANDYGPT_FASTEXP_INLINE static inline
#endif

/* e^x for one float x <= 0 (positive x are not supported: the result would overflow).
 * The range handling is the cheapest that vectorizes: one max for the clamp, one select at
 * the end (a NaN-proof clamp and a second select cost xent's rows about 15%). A NaN passes
 * the clamp and comes out NaN, since p is NaN. So that it never meets a float-to-int
 * conversion (undefined for NaN), 2^n is built from the bits of n + shifter, whose low
 * mantissa bits hold n, in unsigned arithmetic: the same bits as converting n. */
RANDYGPT_FASTEXP_INLINE float randygpt_exp_nonpos(float x)
{
    const float xc = x < RANDYGPT_FASTEXP_LO ? RANDYGPT_FASTEXP_LO : x;
    float n, r, p;
    RANDYGPT_FASTEXP_STEPS(xc, n, r, p);
    const float shifted = n + RANDYGPT_FASTEXP_SHIFTER;
    uint32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - RANDYGPT_FASTEXP_SHIFTER_BITS + 127u) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    const float e = p * two_n;
    return x < RANDYGPT_FASTEXP_LO ? 0.0f : e;
}

#endif /* RANDYGPT_FASTEXP_H */
