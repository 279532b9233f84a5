"""Elementwise kernels: squared ReLU, and dropout driven by a counter-based hash.

Dimensions: the arrays are treated as flat; for the model they are (N, C) or (N, H) with
N = B*T rows, C channels, H MLP hidden. Any shape is accepted, all arrays of one call must have
the same shape, float32, C-contiguous. Element i is the i-th element in C order.

Parallel axis: the flat array, cut into one contiguous span per thread. Each output element
depends on its own inputs only (and, for dropout, on its flat index), so the result is the same
for any thread count.

Dropout's random bits (all arithmetic on unsigned 64-bit integers, modulo 2**64):

    G = 0x9E3779B97F4A7C15
    mix64(z):  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
               z = (z ^ (z >> 27)) * 0x94D049BB133111EB
               return z ^ (z >> 31)
    key = G
    for v in (seed, step, layer, site):  key = mix64((key ^ v) + G)
    bits(i) = mix64(key + (offset + i + 1) * G)
    threshold = floor(p * 2**24 + 0.5)          (p * 2**24 is exact in double)
    mask(i) = float32(1 / (1 - p))  if (bits(i) >> 40) >= threshold  else 0

mix64 is the splitmix64 finalizer, so bits(0), bits(1), ... is the splitmix64 stream seeded
with key: a decision is a pure function of (seed, step, layer, site, i), computed again in
backward instead of stored, identical for any thread count or schedule. ``offset`` (default 0)
says that a call's element i is element offset + i of a larger tensor: a process holding rows
[r, r + n) of an (N, C) activation passes offset = r * C and draws exactly the masks of those
rows in a call over all N (data-parallel ranks rely on it). Since
key + (offset + i + 1) * G = (key + offset * G) + (i + 1) * G, the offset only moves the key. The top 24 bits are
compared so that p is resolved to 2**-24. p == 0 gives threshold 0 and scale 1: the identity.
_ref_activation.py computes the same bits with NumPy uint64 arrays.

The dropout loops exist in three builds (SSE2, AVX2, AVX-512; see available_isas/set_isa),
the fastest one this CPU runs chosen at import. They give bit-identical results.
"""
import numpy as np

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint32_t, uint64_t

from randygpt._kernels._checks cimport check_elementwise, check_int, check_n_threads, check_real

__all__ = ["squared_relu_forward", "squared_relu_backward", "squared_relu_backward_inplace",
           "dropout_mask", "dropout_forward", "dropout_backward", "dropout_add_forward",
           "dropout_add_to_forward", "dropout_key", "dropout_threshold", "available_isas",
           "get_isa", "set_isa"]

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* The dropout loops are written in C because the hash is their whole cost (scalar code
       spends ~6 cycles per element on it) and it vectorizes well once the CPU can multiply
       64-bit lanes: the same body is compiled three times, for baseline SSE2, AVX2 (64-bit
       multiplies emulated) and AVX-512 (native vpmullq), and one is picked at import
       (available_isas / set_isa let tests run each path). The module stays baseline x86-64.
       fp-contract is off so that no path fuses a += b * mask into an FMA: every path then
       rounds like the NumPy reference, and dropout_add equals resid + dropout_forward bit for
       bit, on any CPU. */
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    #define RANDYGPT_DROPOUT_X86 1
    #pragma GCC push_options
    #pragma GCC optimize("fp-contract=off")
    #endif

    #define RANDYGPT_DROPOUT_GOLDEN 0x9E3779B97F4A7C15ULL

    static inline uint64_t randygpt_mix64(uint64_t z) {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }

    /* The mask value of element i: scale's bits AND-ed with all ones (kept) or all zeros
       (dropped). A ternary would become a branch, mispredicted on about every dropped element. */
    static inline float randygpt_dropout_at(uint64_t key, int64_t i, uint32_t threshold,
                                            uint32_t scale_bits) {
        uint64_t bits = randygpt_mix64(key + (uint64_t)(i + 1) * RANDYGPT_DROPOUT_GOLDEN);
        uint32_t top = (uint32_t)(bits >> 40);
        uint32_t u = scale_bits & (0u - (uint32_t)(top >= threshold));
        float m;
        memcpy(&m, &u, sizeof m);
        return m;
    }

    /* op 0: a = mask; op 1: a = b * mask; op 2: a += b * mask; op 3: a = c + b * mask, for
       i in [lo, hi). a overlaps neither b nor c (the wrappers check), hence restrict. */
    static inline __attribute__((always_inline)) void randygpt_dropout_body(
            int op, float *restrict a, const float *restrict b, const float *restrict c,
            int64_t lo, int64_t hi, uint64_t key, uint32_t threshold, float scale) {
        uint32_t sb;
        memcpy(&sb, &scale, sizeof sb);
        if (threshold == 0) {  /* nothing is dropped (p == 0, or p < 2**-25): skip the hash */
            if (op == 0)      for (int64_t i = lo; i < hi; i++) a[i] = scale;
            else if (op == 1) for (int64_t i = lo; i < hi; i++) a[i] = b[i] * scale;
            else if (op == 2) for (int64_t i = lo; i < hi; i++) a[i] += b[i] * scale;
            else              for (int64_t i = lo; i < hi; i++) a[i] = c[i] + b[i] * scale;
            return;
        }
        if (op == 0)
            for (int64_t i = lo; i < hi; i++) a[i] = randygpt_dropout_at(key, i, threshold, sb);
        else if (op == 1)
            for (int64_t i = lo; i < hi; i++) a[i] = b[i] * randygpt_dropout_at(key, i, threshold, sb);
        else if (op == 2)
            for (int64_t i = lo; i < hi; i++) a[i] += b[i] * randygpt_dropout_at(key, i, threshold, sb);
        else
            for (int64_t i = lo; i < hi; i++)
                a[i] = c[i] + b[i] * randygpt_dropout_at(key, i, threshold, sb);
    }

    typedef void (*randygpt_dropout_fn)(int, float *, const float *, const float *, int64_t,
                                        int64_t, uint64_t, uint32_t, float);

    static void randygpt_dropout_sse2(int op, float *a, const float *b, const float *c,
                                      int64_t lo, int64_t hi, uint64_t key, uint32_t threshold,
                                      float scale) {
        randygpt_dropout_body(op, a, b, c, lo, hi, key, threshold, scale);
    }

    #ifdef RANDYGPT_DROPOUT_X86
    __attribute__((target("avx2")))
    static void randygpt_dropout_avx2(int op, float *a, const float *b, const float *c,
                                      int64_t lo, int64_t hi, uint64_t key, uint32_t threshold,
                                      float scale) {
        randygpt_dropout_body(op, a, b, c, lo, hi, key, threshold, scale);
    }

    __attribute__((target("avx2,avx512f,avx512dq,avx512vl,avx512bw")))
    static void randygpt_dropout_avx512(int op, float *a, const float *b, const float *c,
                                        int64_t lo, int64_t hi, uint64_t key,
                                        uint32_t threshold, float scale) {
        randygpt_dropout_body(op, a, b, c, lo, hi, key, threshold, scale);
    }
    #pragma GCC pop_options
    #endif

    /* Paths, fastest first: 0 avx512, 1 avx2, 2 sse2. */
    static int randygpt_dropout_isa_supported(int isa) {
    #ifdef RANDYGPT_DROPOUT_X86
        __builtin_cpu_init();
        if (isa == 0)
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
        if (isa == 1)
            return __builtin_cpu_supports("avx2");
    #endif
        return isa == 2;
    }

    static randygpt_dropout_fn randygpt_dropout_impl = randygpt_dropout_sse2;

    static void randygpt_dropout_set_isa(int isa) {
    #ifdef RANDYGPT_DROPOUT_X86
        if (isa == 0) { randygpt_dropout_impl = randygpt_dropout_avx512; return; }
        if (isa == 1) { randygpt_dropout_impl = randygpt_dropout_avx2; return; }
    #endif
        randygpt_dropout_impl = randygpt_dropout_sse2;
    }

    static void randygpt_dropout_span(int op, float *a, const float *b, const float *c,
                                      int64_t lo, int64_t hi, uint64_t key, uint32_t threshold,
                                      float scale) {
        randygpt_dropout_impl(op, a, b, c, lo, hi, key, threshold, scale);
    }
    """
    const uint64_t GOLDEN "RANDYGPT_DROPOUT_GOLDEN"
    uint64_t _mix64 "randygpt_mix64"(uint64_t z) noexcept nogil
    void _dropout_span "randygpt_dropout_span"(int op, float* a, const float* b,
                                               const float* c, int64_t lo, int64_t hi,
                                               uint64_t key, uint32_t threshold,
                                               float scale) noexcept nogil
    bint _isa_supported "randygpt_dropout_isa_supported"(int isa) noexcept
    void _set_isa_code "randygpt_dropout_set_isa"(int isa) noexcept

# Dropout's SIMD paths, fastest first; the index is the code the C dispatcher uses.
_ISA_NAMES = ("avx512", "avx2", "sse2")
_isa = "sse2"


def available_isas():
    """Names of the dropout paths this CPU runs, fastest first, e.g. ["avx512", "avx2", "sse2"]."""
    return [name for code, name in enumerate(_ISA_NAMES) if _isa_supported(code)]


def get_isa():
    """Name of the dropout path in use."""
    return _isa


def set_isa(name):
    """Use the dropout path `name` (one of available_isas()) from now on. All paths give
    bit-identical results; this exists so tests can run each one."""
    global _isa
    choices = available_isas()
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"set_isa: isa must be one of {choices} on this CPU, got {name!r}")
    _set_isa_code(_ISA_NAMES.index(name))
    _isa = name


set_isa(available_isas()[0])


# Dropout's counters are hashed as unsigned 64-bit integers, so each must fit in one.
_U64_MAX = (1 << 64) - 1

# The arguments are checked once per call, before any nogil code, by the shared checks
# (_checks.pyx): every array float32 and C-contiguous, outputs writeable and disjoint.
cdef object F32 = np.dtype(np.float32)


cdef inline Py_ssize_t _span_lo(Py_ssize_t k, Py_ssize_t n, Py_ssize_t n_spans) noexcept nogil:
    return k * n // n_spans


# ---------------------------------------------------------------------------------------------
# Squared ReLU: out = relu(x)**2

cdef inline float _relu(float v) noexcept nogil:
    # NaN <= 0 is false, so a NaN passes through (and shows up in loss checks) instead of
    # silently becoming 0.
    return 0.0 if v <= 0.0 else v


cdef void _squared_relu_forward(float* out, const float* x, Py_ssize_t n,
                                int n_spans) noexcept nogil:
    cdef Py_ssize_t k, i, lo, hi
    cdef float r
    for k in prange(n_spans, schedule="static", num_threads=n_spans):
        lo = _span_lo(k, n, n_spans)
        hi = _span_lo(k + 1, n, n_spans)
        for i in range(lo, hi):
            r = _relu(x[i])
            out[i] = r * r


cdef void _squared_relu_backward(float* dx, const float* dout, const float* x, Py_ssize_t n,
                                 int n_spans) noexcept nogil:
    cdef Py_ssize_t k, i, lo, hi
    cdef float r
    for k in prange(n_spans, schedule="static", num_threads=n_spans):
        lo = _span_lo(k, n, n_spans)
        hi = _span_lo(k + 1, n, n_spans)
        for i in range(lo, hi):
            # d/dx relu(x)**2 = 2 * relu(x); r + r keeps the arithmetic in float32
            r = _relu(x[i])
            dx[i] += (r + r) * dout[i]


cdef void _squared_relu_backward_inplace(float* d, const float* x, Py_ssize_t n,
                                         int n_spans) noexcept nogil:
    cdef Py_ssize_t k, i, lo, hi
    cdef float r
    for k in prange(n_spans, schedule="static", num_threads=n_spans):
        lo = _span_lo(k, n, n_spans)
        hi = _span_lo(k + 1, n, n_spans)
        for i in range(lo, hi):
            r = _relu(x[i])
            d[i] = (r + r) * d[i]


cdef inline int _n_spans(Py_ssize_t n, int n_threads) noexcept:
    # One contiguous span per thread; never more spans than elements.
    return <int>min(<Py_ssize_t>n_threads, n)


def squared_relu_forward(out, x, n_threads):
    """out = relu(x)**2, elementwise.

    out : (N, H) float32  written (any shape equal to x's)
    x   : (N, H) float32  read
    """
    check_elementwise((("out", out),), (("x", x),), F32)
    cdef int nt = check_n_threads(n_threads)
    cdef Py_ssize_t n = x.size
    if n == 0:
        return
    cdef float[::1] out_v = out.reshape(-1)
    cdef const float[::1] x_v = x.reshape(-1)
    cdef int ns = _n_spans(n, nt)
    with nogil:
        _squared_relu_forward(&out_v[0], &x_v[0], n, ns)


def squared_relu_backward(dx, dout, x, n_threads):
    """Gradient of squared_relu_forward.

    dx   : (N, H) float32  accumulated += 2 * relu(x) * dout
    dout : (N, H) float32  read
    x    : (N, H) float32  read (the forward input)
    """
    check_elementwise((("dx", dx),), (("dout", dout), ("x", x)), F32)
    cdef int nt = check_n_threads(n_threads)
    cdef Py_ssize_t n = x.size
    if n == 0:
        return
    cdef float[::1] dx_v = dx.reshape(-1)
    cdef const float[::1] dout_v = dout.reshape(-1)
    cdef const float[::1] x_v = x.reshape(-1)
    cdef int ns = _n_spans(n, nt)
    with nogil:
        _squared_relu_backward(&dx_v[0], &dout_v[0], &x_v[0], n, ns)


def squared_relu_backward_inplace(d, x, n_threads):
    """Gradient of squared_relu_forward written over the incoming gradient: d = 2 * relu(x) * d.
    Saves the separate (N, H) gradient buffer and its zeroing; the values equal
    squared_relu_backward's into a zeroed dx.

    d : (N, H) float32  read as the gradient of out, then written with the gradient of x
    x : (N, H) float32  read (the forward input; must not share memory with d)
    """
    check_elementwise((("d", d),), (("x", x),), F32)
    cdef int nt = check_n_threads(n_threads)
    cdef Py_ssize_t n = x.size
    if n == 0:
        return
    cdef float[::1] d_v = d.reshape(-1)
    cdef const float[::1] x_v = x.reshape(-1)
    cdef int ns = _n_spans(n, nt)
    with nogil:
        _squared_relu_backward_inplace(&d_v[0], &x_v[0], n, ns)


# ---------------------------------------------------------------------------------------------
# Dropout

def dropout_key(seed, step, layer, site):
    """The 64-bit key of one dropout call (see the module header); for tests and the reference."""
    cdef uint64_t key = GOLDEN
    cdef uint64_t u
    for name, v in (("seed", seed), ("step", step), ("layer", layer), ("site", site)):
        u = check_int(name, v, 0, _U64_MAX, "a 64-bit counter: below 2**64")
        key = _mix64((key ^ u) + GOLDEN)
    return int(key)


def dropout_threshold(p):
    """Smallest kept value of the top 24 hash bits: floor(p * 2**24 + 0.5)."""
    return int(np.floor(check_real("p", p, 0.0, 1.0) * 16777216.0 + 0.5))


# Which elementwise operation _dropout applies (the op argument of randygpt_dropout_span).
cdef enum DropoutOp:
    DROP_MASK = 0         # a = mask
    DROP_FORWARD = 1      # a = b * mask
    DROP_ACCUMULATE = 2   # a += b * mask (backward into dx, or the residual update)
    DROP_ADD_TO = 3       # a = c + b * mask (the residual update into a new stream)


cdef void _dropout(DropoutOp op, float* a, const float* b, const float* c, Py_ssize_t n,
                   uint64_t key, uint32_t threshold, float scale, int n_spans) noexcept nogil:
    cdef Py_ssize_t k
    for k in prange(n_spans, schedule="static", num_threads=n_spans):
        _dropout_span(op, a, b, c, _span_lo(k, n, n_spans), _span_lo(k + 1, n, n_spans),
                      key, threshold, scale)


cdef _run_dropout(DropoutOp op, a, b, p, seed, step, layer, site, n_threads, c=None, offset=0):
    cdef double q = check_real("p", p, 0.0, 1.0)
    cdef uint64_t key = <uint64_t>dropout_key(seed, step, layer, site)
    cdef uint64_t first = check_int("offset", offset, 0, _U64_MAX, "an element counter: below 2**64")
    key = key + first * GOLDEN  # modulo 2**64: element i's counter is offset + i
    cdef int nt = check_n_threads(n_threads)
    cdef uint32_t threshold = <uint32_t>dropout_threshold(q)  # <= 2**24
    cdef float scale = <float>(1.0 / (1.0 - q))
    cdef Py_ssize_t n = a.size
    if n == 0:
        return
    cdef float[::1] a_v = a.reshape(-1)
    cdef const float[::1] b_v
    cdef const float* b_ptr = NULL
    if b is not None:
        b_v = b.reshape(-1)
        b_ptr = &b_v[0]
    cdef const float[::1] c_v
    cdef const float* c_ptr = NULL
    if c is not None:
        c_v = c.reshape(-1)
        c_ptr = &c_v[0]
    cdef int ns = _n_spans(n, nt)
    with nogil:
        _dropout(op, &a_v[0], b_ptr, c_ptr, n, key, threshold, scale, ns)


def dropout_mask(mask, p, seed, step, layer, site, n_threads, offset=0):
    """The dropout mask itself, for tests and the reference (training never stores it).

    mask   : (N, C) float32  written with 0 or 1/(1-p) (any shape; element i = flat index i)
    p      : float in [0, 1); seed, step, layer, site: ints in [0, 2**64)
    offset : int in [0, 2**64), the counter of element 0 (see the module header); every
             dropout function takes it
    """
    check_elementwise((("mask", mask),), (), F32)
    _run_dropout(DROP_MASK, mask, None, p, seed, step, layer, site, n_threads, None, offset)


def dropout_forward(out, x, p, seed, step, layer, site, n_threads, offset=0):
    """out = x * mask, mask as in dropout_mask.

    out : (N, C) float32  written
    x   : (N, C) float32  read
    """
    check_elementwise((("out", out),), (("x", x),), F32)
    _run_dropout(DROP_FORWARD, out, x, p, seed, step, layer, site, n_threads, None, offset)


def dropout_backward(dx, dout, p, seed, step, layer, site, n_threads, offset=0):
    """Gradient of dropout_forward (and of dropout_add_forward for its x): the mask is recomputed.

    dx   : (N, C) float32  accumulated += dout * mask
    dout : (N, C) float32  read
    """
    check_elementwise((("dx", dx),), (("dout", dout),), F32)
    _run_dropout(DROP_ACCUMULATE, dx, dout, p, seed, step, layer, site, n_threads, None, offset)


def dropout_add_forward(resid, x, p, seed, step, layer, site, n_threads, offset=0):
    """The residual update resid = resid + dropout(x), in one pass.

    resid : (N, C) float32  updated in place += x * mask (its gradient passes through unchanged)
    x     : (N, C) float32  read (must not share memory with resid)
    """
    check_elementwise((("resid", resid),), (("x", x),), F32)
    _run_dropout(DROP_ACCUMULATE, resid, x, p, seed, step, layer, site, n_threads, None,
                 offset)


def dropout_add_to_forward(out, resid, x, p, seed, step, layer, site, n_threads, offset=0):
    """The residual update into a new stream, out = resid + dropout(x), in one pass (one read of
    each input, one write; no copy of resid first).

    out   : (N, C) float32  written = resid + x * mask, bit-identical to
                            copying resid into out, then dropout_add_forward(out, x, ...)
    resid : (N, C) float32  read (its gradient is out's, unchanged)
    x     : (N, C) float32  read (resid and x may share memory with each other, not with out)
    """
    check_elementwise((("out", out),), (("resid", resid), ("x", x)), F32)
    _run_dropout(DROP_ADD_TO, out, x, p, seed, step, layer, site, n_threads, resid,
                 offset)
