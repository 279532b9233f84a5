"""Incremental decoding: the products and the attention of a step that adds a few tokens to
a sequence whose keys and values are already computed (GPT.decode). Inference only: there
is no backward, and nothing is saved for one.

    decode_matmul_forward         out (n, OC) (+)= x (n, IC) . w (OC, IC)^T
    decode_matmul_sqrelu_forward  out (n, OC)    = relu(x . w^T)^2
    decode_attention_forward      out (n, C) = causal attention of the n newest rows of qkv
                                  over all of its rows up to them

Dimension letters: n new rows (tokens), IC/OC input/output channels, C channels, NH heads,
HS = C / NH, Tc rows of a cache, t0 the position of the first new row.

Why not matmul.pyx: a step has one row (n = 1; n > 1 only when a prompt or a window restart
is decoded at once), and the GEMM packs the whole weight matrix into panels on every call,
which for one row costs as much as the product. Here every output is one dot product of a
row of x with a weight row, read where it lies (w's rows are contiguous), a group of 4 or 8
weight rows at a time against every row of x. A one-row step is bound by reading the
weights: on the default model (4.5M weights, 18 MB, from L3) one thread streamed them at
~28 GB/s, as fast as NumPy's gemv and a plain dot over the same bytes (Xeon, AVX-512).
Several rows (a prompt, a window restart) are slower than the GEMM from ~16 rows on, the
horizontal sum of every dot product no longer hidden behind memory; they are rare enough
(one restart per half window) that decode keeps one path.

Parallel axis: output channels, in chunks of DEC_CHUNK rows of w, a static prange over the
chunks; attention over the (new row, head) pairs. The chunk bounds depend on OC alone, each
output is computed by one thread in an order set by the shapes, and each dot product's value
depends on its two rows only (decode_body.h), so results are bit-identical for any thread
count. The loops are compiled for AVX-512, AVX2 + FMA and the baseline ISA (SSE2; "generic"
off x86) and the fastest one this CPU runs is chosen at import (available_isas / set_isa let
tests run each; the FMA paths round differently from the baseline one).
"""
from cython.parallel cimport parallel, prange
from libc.stdlib cimport free

import numpy as np

from randygpt._kernels._checks cimport (check_array, check_disjoint, check_int,
                                       check_n_threads, check_output, checked_malloc)
from randygpt._kernels._omp cimport omp_get_thread_num

cdef extern from *:
    """
    #include <math.h>
    #include <stddef.h>
    #include <stdint.h>
    #include <string.h>
    #include "fastexp.h"

    #if !defined(__GNUC__)
    #error "randygpt's decode kernels need GCC or clang (vector extensions and target attributes)"
    #endif

    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    #define DEC_X86 1
    #endif

    /* Rows of w per work chunk: OC = 256 still splits into 16 chunks, OC = 67 (lm_head) into
       5. A multiple of the 4- and 8-row groups. */
    #define DEC_CHUNK 16

    /* How a dot product is stored: 0 written, 1 added onto out (the residual add),
       2 relu(dot)^2 written (NaN passes through: NaN <= 0 is false). */
    static inline float dec_finish(float old, float s, int mode)
    {
        if (mode == 1)
            return old + s;
        if (mode == 2) {
            const float r = s <= 0.0f ? 0.0f : s;
            return r * r;
        }
        return s;
    }

    #define DEC_FN(name) dec_base_##name
    #define DEC_TARGET
    #define DEC_VW 4
    #define DEC_NC 4
    #include "decode_body.h"
    #undef DEC_FN
    #undef DEC_TARGET
    #undef DEC_VW
    #undef DEC_NC

    #ifdef DEC_X86
    /* "avx2" alone would not allow FMA; name both. */
    #define DEC_FN(name) dec_avx2_##name
    #define DEC_TARGET __attribute__((target("avx2,fma")))
    #define DEC_VW 8
    #define DEC_NC 4
    #include "decode_body.h"
    #undef DEC_FN
    #undef DEC_TARGET
    #undef DEC_VW
    #undef DEC_NC

    #define DEC_FN(name) dec_avx512_##name
    #define DEC_TARGET __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq")))
    #define DEC_VW 16
    #define DEC_NC 8
    #include "decode_body.h"
    #undef DEC_FN
    #undef DEC_TARGET
    #undef DEC_VW
    #undef DEC_NC
    #endif

    typedef void (*dec_matmul_fn)(float *, const float *, const float *, ptrdiff_t, ptrdiff_t,
                                  ptrdiff_t, ptrdiff_t, ptrdiff_t, int);
    typedef void (*dec_attention_fn)(float *, const float *, float *, ptrdiff_t, ptrdiff_t,
                                     ptrdiff_t, ptrdiff_t);

    /* Paths, fastest first: 0 avx512, 1 avx2, 2 the baseline, named "sse2" on x86-64 as in
       the other families and "generic" elsewhere (matmul's names). */
    static const char *dec_isa_name(int isa)
    {
    #ifdef DEC_X86
        static const char *names[3] = {"avx512", "avx2", "sse2"};
    #else
        static const char *names[3] = {"avx512", "avx2", "generic"};
    #endif
        return names[isa];
    }

    static int dec_isa_supported(int isa)
    {
    #ifdef DEC_X86
        /* libgcc's checks include the OS having enabled the wider registers (XCR0). */
        __builtin_cpu_init();
        if (isa == 0)
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
        if (isa == 1)
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    #endif
        return isa == 2;
    }

    static dec_matmul_fn dec_matmul_impl = dec_base_matmul_chunk;
    static dec_attention_fn dec_attention_impl = dec_base_attention_task;

    /* Set once at import (and by tests), while no kernel runs. */
    static void dec_set_isa(int isa)
    {
    #ifdef DEC_X86
        if (isa == 0) {
            dec_matmul_impl = dec_avx512_matmul_chunk;
            dec_attention_impl = dec_avx512_attention_task;
            return;
        }
        if (isa == 1) {
            dec_matmul_impl = dec_avx2_matmul_chunk;
            dec_attention_impl = dec_avx2_attention_task;
            return;
        }
    #endif
        dec_matmul_impl = dec_base_matmul_chunk;
        dec_attention_impl = dec_base_attention_task;
    }

    /* Chunk c of decode_matmul: output channels [c * DEC_CHUNK, min((c + 1) * DEC_CHUNK, OC)). */
    static inline void decode_matmul_chunk(float *out, const float *x, const float *w,
                                           ptrdiff_t n, ptrdiff_t IC, ptrdiff_t OC,
                                           ptrdiff_t c, int mode)
    {
        const ptrdiff_t lo = c * DEC_CHUNK, hi = lo + DEC_CHUNK < OC ? lo + DEC_CHUNK : OC;
        dec_matmul_impl(out, x, w, n, IC, OC, lo, hi, mode);
    }

    /* Attention of new row task / NH, head task % NH: out (n, C) row task / NH written at
       columns h*HS..; qkv (>= t0 + n, 3C) read; p: t0 + n floats of scratch. */
    static inline void decode_attention_task(float *out, const float *qkv, float *p,
                                             ptrdiff_t t0, ptrdiff_t C, ptrdiff_t NH,
                                             ptrdiff_t task)
    {
        dec_attention_impl(out, qkv, p, t0, C, NH, task);
    }
    """
    const int DEC_CHUNK
    const char* _isa_name "dec_isa_name"(int isa) noexcept
    bint _isa_supported "dec_isa_supported"(int isa) noexcept
    void _set_isa_code "dec_set_isa"(int isa) noexcept
    void decode_matmul_chunk(float* out, const float* x, const float* w, Py_ssize_t n,
                             Py_ssize_t IC, Py_ssize_t OC, Py_ssize_t c, int mode) noexcept nogil
    void decode_attention_task(float* out, const float* qkv, float* p, Py_ssize_t t0,
                               Py_ssize_t C, Py_ssize_t NH, Py_ssize_t task) noexcept nogil

# The included files: naming them here makes cythonize rebuild the extension when they change
# (included on their own they define nothing that clashes).
cdef extern from "decode_body.h":
    pass

cdef extern from "fastexp.h":
    pass

__all__ = ["decode_matmul_forward", "decode_matmul_sqrelu_forward", "decode_attention_forward",
           "available_isas", "get_isa", "set_isa"]

# The SIMD paths, fastest first; the index is the code dec_set_isa takes.
_ISA_NAMES = tuple(_isa_name(code).decode() for code in range(3))
_isa = _ISA_NAMES[2]


def available_isas():
    """Names of the decode paths this CPU runs, fastest first, e.g. ["avx512", "avx2", "sse2"]."""
    return [name for code, name in enumerate(_ISA_NAMES) if _isa_supported(code)]


def get_isa():
    """Name of the decode path in use."""
    return _isa


def set_isa(name):
    """Use the decode path `name` (one of available_isas()) from now on.

    Process-wide and not thread-safe: call it only while no decode kernel runs. The FMA paths
    round differently from the baseline one, so one generation keeps one path.
    """
    global _isa
    choices = available_isas()
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"set_isa: isa must be one of {choices} on this CPU, got {name!r}")
    _set_isa_code(_ISA_NAMES.index(name))
    _isa = name


set_isa(available_isas()[0])


# ---------------------------------------------------------------------------------------------
# nogil bodies

cdef enum Finish:
    WRITE = 0        # out = dot
    ACCUMULATE = 1   # out += dot
    SQRELU = 2       # out = relu(dot)^2


cdef void _matmul(float* out,          # OUT (n, OC)
                  const float* x,      # IN  (n, IC)
                  const float* w,      # IN  (OC, IC)
                  Py_ssize_t n, Py_ssize_t IC, Py_ssize_t OC, Finish mode,
                  int n_threads) noexcept nogil:
    cdef Py_ssize_t c
    cdef Py_ssize_t n_chunks = (OC + DEC_CHUNK - 1) // DEC_CHUNK
    if n_threads == 1:  # no parallel region at all: a one-row product takes microseconds
        for c in range(n_chunks):
            decode_matmul_chunk(out, x, w, n, IC, OC, c, mode)
        return
    for c in prange(n_chunks, schedule="static", num_threads=n_threads):
        decode_matmul_chunk(out, x, w, n, IC, OC, c, mode)


cdef void _attention(float* out,          # OUT (n, C)
                     const float* qkv,    # IN  (t0 + n, 3C)
                     float* scratch,      # thread t's t0 + n scores at scratch + t * stride
                     Py_ssize_t stride,
                     Py_ssize_t t0, Py_ssize_t n, Py_ssize_t C, Py_ssize_t NH,
                     int n_threads) noexcept nogil:
    cdef Py_ssize_t task
    cdef float* mine = NULL
    if n_threads == 1:
        for task in range(n * NH):
            decode_attention_task(out, qkv, scratch, t0, C, NH, task)
        return
    with parallel(num_threads=n_threads):
        mine = scratch + omp_get_thread_num() * stride
        for task in prange(n * NH, schedule="static"):
            decode_attention_task(out, qkv, mine, t0, C, NH, task)


# ---------------------------------------------------------------------------------------------
# Python wrappers: every check happens here, once per call, before the GIL is released.

cdef object F32 = np.dtype(np.float32)


cdef tuple _check_matmul(object out, object x, object w):
    """Validates a product's arrays; returns (n, IC, OC)."""
    check_array("x", x, F32, 2)
    check_array("w", w, F32, 2)
    n, IC = x.shape
    OC = w.shape[0]
    if w.shape[1] != IC:
        raise ValueError(f"w has shape {w.shape}, expected ({OC}, {IC}): its rows must have "
                         f"x's {IC} columns (x is {x.shape})")
    # (constant reasons: formatting the shapes on every call would cost more than the check)
    check_output("out", out, F32, (n, OC), "x's rows by w's rows")
    check_disjoint((("out", out),), (("x", x), ("w", w)))
    return n, IC, OC


cdef _run_matmul(object out, object x, object w, Finish mode, object n_threads):
    cdef Py_ssize_t n, IC, OC
    n, IC, OC = _check_matmul(out, x, w)
    cdef int nt = check_n_threads(n_threads)
    if n == 0 or OC == 0:
        return
    if IC == 0:  # every dot product is 0 (no pointer into an empty x to take)
        if mode != ACCUMULATE:
            out[...] = 0.0
        return
    cdef float[:, ::1] out_v = out
    cdef const float[:, ::1] x_v = x
    cdef const float[:, ::1] w_v = w
    cdef int team = <int> min(<Py_ssize_t> nt, (OC + DEC_CHUNK - 1) // DEC_CHUNK)
    with nogil:
        _matmul(&out_v[0, 0], &x_v[0, 0], &w_v[0, 0], n, IC, OC, mode, team)


def decode_matmul_forward(out, x, w, n_threads, accumulate=False):
    """A linear layer without bias for a few rows: out = x . w^T, the weights read in place.

    out        : (n, OC)  float32  written; with accumulate, out += x . w^T (the residual
                                   add: out + dot, one rounding, as x + proj in forward)
    x          : (n, IC)  float32  read
    w          : (OC, IC) float32  read
    n_threads  : int >= 1
    """
    _run_matmul(out, x, w, ACCUMULATE if accumulate else WRITE, n_threads)


def decode_matmul_sqrelu_forward(out, x, w, n_threads):
    """A linear layer followed by squared ReLU in the write-back: out = relu(x . w^T)^2.
    Nothing is kept for a backward (there is none).

    out        : (n, OC)  float32  written
    x          : (n, IC)  float32  read
    w          : (OC, IC) float32  read
    n_threads  : int >= 1
    """
    _run_matmul(out, x, w, SQRELU, n_threads)


def decode_attention_forward(out, qkv, t0, n_head, n_threads):
    """Causal multi-head attention of the rows t0 .. t0 + n - 1 of qkv over its rows 0 ..
    t0 + n - 1: out[i] = softmax(q_{t0+i} k_j^T / sqrt(HS), j <= t0 + i) v per head.

    out       : (n, C)       float32  written, head h at columns h*HS .. (h+1)*HS
    qkv       : (Tc, 3C)     float32  read: a cache laid out like attention_forward's qkv
                                      (q | k | v per row, head h at columns h*HS of each
                                      third); rows t0 .. t0 + n - 1 give the queries, rows
                                      0 .. t0 + n - 1 the keys and values, later rows unread
    t0        : int, 0 <= t0 <= Tc - n, the position of out's first row
    n_head    : int, NH >= 1, dividing C
    n_threads : int >= 1
    """
    check_array("qkv", qkv, F32, 2)
    Tc, C3 = qkv.shape
    if C3 % 3 != 0 or C3 == 0:
        raise ValueError(f"qkv's last axis must be 3*C with C >= 1, got shape {qkv.shape}")
    C = C3 // 3
    NH = check_int("n_head", n_head, 1)
    if C % NH != 0:
        raise ValueError(f"C = {C} (qkv shape {qkv.shape}) is not divisible by n_head = {NH}")
    check_array("out", out, F32, 2)
    n = out.shape[0]
    check_output("out", out, F32, (n, C), "C from qkv's 3C columns")
    if n > Tc:
        raise ValueError(f"out has {n} rows but qkv only {Tc} (shape {qkv.shape})")
    cdef Py_ssize_t start = check_int("t0", t0, 0, Tc - n,
                                      "out's rows t0 .. t0 + n - 1 must be rows of qkv")
    check_disjoint((("out", out),), (("qkv", qkv),))
    cdef int nt = check_n_threads(n_threads)
    if n == 0:
        return
    cdef float[:, ::1] out_v = out
    cdef const float[:, ::1] qkv_v = qkv
    cdef Py_ssize_t rows = n, channels = C, heads = NH
    cdef int team = <int> min(<Py_ssize_t> nt, rows * heads)
    # Every thread's scores in one block, allocated here where a failure can be raised
    # (MemoryError), not inside the parallel region; a slice per 64-byte line.
    cdef Py_ssize_t stride = (start + rows + 15) // 16 * 16
    cdef void* block = checked_malloc("decode_attention_forward", team * stride * 4,
                                      f"scores: {team} thread(s) x {start + rows} positions")
    try:
        with nogil:
            _attention(&out_v[0, 0], &qkv_v[0, 0], <float*> block, stride, start, rows, channels,
                       heads, team)
    finally:
        free(block)
