"""Causal multi-head self-attention, forward and backward, fused per (batch, head).

Contains attention_forward and attention_backward (NumPy twins: _ref_attention.py).

Dimensions: B batch, T time, C channels, NH heads, HS head size = C // NH.
qkv (B, T, 3C) packs q, k, v on its last axis: columns [0, C) are q, [C, 2C) k and
[2C, 3C) v; head h owns columns h*HS .. (h+1)*HS of each third, and writes its output
at columns h*HS .. of out (B, T, C). Heads are read by stride in place: no transposes.

Parallel axis: the B*NH (batch, head) pairs, in a static prange. A pair's work is
independent of every other pair's and writes disjoint slices of out, att and dqkv,
so there are no atomics and no shared reductions: every element is computed by one
thread in an order set by the shapes alone, and results are bit-identical for any
thread count. Each thread has its own slice of one scratch block, allocated by the
wrapper per call (MemoryError, before any thread starts, when it does not fit): the
pair's rows of q, k, v, dy packed contiguously (keys or values also transposed, so
scores need no horizontal sums), plus dS in the backward, and P when the caller does
not store it (att=None: the backward then recomputes P with the forward's own code, bit
for bit). P makes the scratch grow with T^2 per thread.
The loops live in attention_impl.h and attention_body.h, compiled for AVX2 + FMA and
for the baseline ISA, and attention_avx512.h (AVX-512, the AVX2 copy's bits); the fastest
one this CPU runs is chosen at import
(available_isas / set_isa let tests run each).
"""
from cython.parallel cimport parallel, prange
from libc.stdlib cimport free

import numpy as np

from randygpt._kernels._checks cimport (check_array, check_disjoint, check_input,
                                       check_int, check_n_threads, check_output,
                                       checked_malloc)
from randygpt._kernels._omp cimport omp_get_thread_num

cdef extern from "attention_impl.h" nogil:
    size_t attention_forward_scratch(Py_ssize_t T, Py_ssize_t HS) noexcept
    size_t attention_backward_scratch(Py_ssize_t T, Py_ssize_t HS) noexcept
    void attention_forward_task(float* out, float* att, const float* qkv, float* scratch,
                                Py_ssize_t task, Py_ssize_t n_tasks, Py_ssize_t T,
                                Py_ssize_t C, Py_ssize_t NH) noexcept
    void attention_backward_task(float* dqkv, float* out, const float* dout, const float* qkv,
                                 const float* att, float* scratch, Py_ssize_t task,
                                 Py_ssize_t n_tasks, Py_ssize_t T, Py_ssize_t C,
                                 Py_ssize_t NH, int accumulate) noexcept
    int attention_cpu_level() noexcept
    int attention_select_isa(int level) noexcept
    int attention_get_isa() noexcept

# attention_impl.h includes this file once per instruction set, and fastexp.h (the exp
# shared with xent); naming them here makes cythonize rebuild the extension when they change
# (included on its own, attention_body.h is empty).
cdef extern from "attention_body.h":
    pass

cdef extern from "attention_avx512.h":
    pass

cdef extern from "fastexp.h":
    pass

__all__ = ["attention_forward", "attention_backward", "scratch_bytes", "available_isas", "get_isa",
           "set_isa"]

# Names of the vector paths, best first, at the level attention_select_isa numbers them:
# the AVX-512 copy (its products blocked for 32 registers, the AVX2 copy's bits; head sizes
# that are no multiple of 16 run the AVX2 copy), the AVX2 + FMA copy and the baseline copy
# (SSE2 on x86-64; generic 4-float vectors elsewhere, where only "sse2" is available).
_ISAS = ("avx512", "avx2", "sse2")


def available_isas():
    """Names of the attention paths this CPU runs, fastest first (e.g. ["avx2", "sse2"])."""
    return list(_ISAS[len(_ISAS) - 1 - attention_cpu_level():])


def get_isa():
    """Name of the attention path in use."""
    return _ISAS[len(_ISAS) - 1 - attention_get_isa()]


def set_isa(name):
    """Use the attention path `name` (one of available_isas()) from now on.

    Process-wide and not thread-safe: call it only while no attention kernel runs. The
    sse2 path rounds differently from the others (no FMA), so one training run keeps one
    path; avx512 and avx2 give the same bits.
    """
    choices = available_isas()
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"set_isa: isa must be one of {choices} on this CPU, got {name!r}")
    attention_select_isa(len(_ISAS) - 1 - _ISAS.index(name))


set_isa(available_isas()[0])


cdef void _forward_body(float* out,             # OUT (B*T, C)
                        float* att,             # OUT (B, NH, T, T), or NULL
                        const float* qkv,       # IN  (B*T, 3C)
                        float* scratch,         # thread t's at scratch + t * stride
                        Py_ssize_t stride,
                        Py_ssize_t B, Py_ssize_t T, Py_ssize_t C, Py_ssize_t NH,
                        int n_threads) noexcept nogil:
    cdef Py_ssize_t task
    cdef float* mine = NULL
    with parallel(num_threads=n_threads):
        mine = scratch + omp_get_thread_num() * stride
        for task in prange(B * NH, schedule="static"):
            attention_forward_task(out, att, qkv, mine, task, B * NH, T, C, NH)


cdef void _backward_body(float* dqkv,           # INOUT (B*T, 3C), accumulated or written
                         float* out,            # OUT   (B*T, C), or NULL
                         const float* dout,     # IN    (B*T, C)
                         const float* qkv,      # IN    (B*T, 3C)
                         const float* att,      # IN    (B, NH, T, T), or NULL: recomputed
                         float* scratch,        # thread t's at scratch + t * stride
                         Py_ssize_t stride,
                         Py_ssize_t B, Py_ssize_t T, Py_ssize_t C, Py_ssize_t NH,
                         int accumulate, int n_threads) noexcept nogil:
    cdef Py_ssize_t task
    cdef float* mine = NULL
    with parallel(num_threads=n_threads):
        mine = scratch + omp_get_thread_num() * stride
        for task in prange(B * NH, schedule="static"):
            attention_backward_task(dqkv, out, dout, qkv, att, mine, task, B * NH, T,
                                    C, NH, accumulate)


cdef object _slice_floats(size_t per_thread):
    """Floats from one thread's scratch slice to the next: per_thread rounded up to 16, plus a
    64-byte gap, so that no two threads' slices share a cache line (a Python int: no overflow)."""
    return (<object>per_thread + 15) // 16 * 16 + 16


cdef float* _scratch(str func, size_t per_thread, int team, Py_ssize_t T, Py_ssize_t* stride,
                     void** base) except NULL:
    """One block holding `team` slices of `per_thread` floats, _slice_floats apart; *stride is
    that distance in floats and *base what to free(). MemoryError when it cannot be had.

    The block stays as malloc aligns it, as each thread's own malloc did before: aligning the
    slices to 64 bytes measured 3-4% slower in the forward at the model's shapes (where the
    scratch lands against qkv and out), while this layout measured as fast as before."""
    floats = _slice_floats(per_thread)
    base[0] = checked_malloc(func, team * floats * 4,
                             f"scratch: {team} thread(s) x {floats * 4:,} bytes at T = {T}")
    stride[0] = floats
    return <float*>base[0]


def scratch_bytes(T, head_size, n_threads):
    """Bytes of the scratch block attention_forward or attention_backward (the larger) allocates
    per call for sequences of T positions with heads of head_size on n_threads threads: it
    grows with T^2 per thread, so a caller can check a configuration fits before it runs."""
    # Bounds that keep the C size arithmetic (about T^2 + T * head_size) inside 64 bits.
    cdef Py_ssize_t t = check_int("T", T, 1, 1 << 30)
    cdef Py_ssize_t hs = check_int("head_size", head_size, 1, 1 << 20)
    cdef int team = check_n_threads(n_threads)
    return team * _slice_floats(max(attention_forward_scratch(t, hs),
                                    attention_backward_scratch(t, hs))) * 4


# The arguments are checked once per call, before any nogil code, by the shared checks
# (_checks.pyx); only qkv's packing is attention's own.
cdef object F32 = np.dtype(np.float32)


cdef tuple _check_qkv(object qkv, object n_head):
    """Validates qkv and n_head; returns (B, T, C, NH)."""
    check_array("qkv", qkv, F32, 3)
    NH = check_int("n_head", n_head, 1)
    B, T, C3 = qkv.shape
    if C3 % 3 != 0 or C3 == 0:
        raise ValueError(f"qkv's last axis must be 3*C with C >= 1, got shape {qkv.shape}")
    C = C3 // 3
    if C % NH != 0:
        raise ValueError(f"C = {C} (qkv shape {qkv.shape}) is not divisible by n_head = {NH}")
    return B, T, C, NH


def attention_forward(out, att, qkv, n_head, n_threads):
    """Causal multi-head self-attention: out = softmax(q k^T / sqrt(HS), causal) v per head.

    out       : (B, T, C)       float32  written, head h at columns h*HS .. (h+1)*HS
    att       : (B, NH, T, T)   float32  written, the probabilities (entries j > i are
                                          exactly 0); or None: not stored (the backward
                                          can recompute them, bit for bit)
    qkv       : (B, T, 3C)      float32  read: q = [:, :, :C], k = [:, :, C:2C], v = [:, :, 2C:]
    n_head    : int, NH >= 1, dividing C
    n_threads : int >= 1
    """
    cdef Py_ssize_t B, T, C, NH
    B, T, C, NH = _check_qkv(qkv, n_head)
    cdef int threads = check_n_threads(n_threads)
    check_output("out", out, F32, (B, T, C), f"qkv is {qkv.shape}")
    if att is not None:
        check_output("att", att, F32, (B, NH, T, T), f"qkv is {qkv.shape}, n_head = {NH}")
        check_disjoint((("out", out), ("att", att)), (("qkv", qkv),))
    else:
        check_disjoint((("out", out),), (("qkv", qkv),))
    if B * T == 0:
        return
    cdef float[:, :, ::1] out_v = out
    cdef float[:, :, :, ::1] att_v
    cdef float* att_p = NULL
    if att is not None:
        att_v = att
        att_p = &att_v[0, 0, 0, 0]
    cdef const float[:, :, ::1] qkv_v = qkv
    cdef int team = <int> min(threads, B * NH)
    cdef Py_ssize_t stride
    cdef void* base
    cdef float* scratch = _scratch("attention_forward", attention_forward_scratch(T, C // NH),
                                   team, T, &stride, &base)
    with nogil:
        _forward_body(&out_v[0, 0, 0], att_p, &qkv_v[0, 0, 0], scratch, stride, B, T, C, NH,
                      team)
    free(base)


def attention_backward(dqkv, dout, qkv, att, n_head, n_threads, accumulate=True, out=None):
    """Gradient of attention_forward with respect to qkv.

    dqkv      : (B, T, 3C)      float32  accumulated (+=), laid out like qkv; written
                                          instead when accumulate is False (every element,
                                          equal to accumulating onto zeros: no fill first)
    dout      : (B, T, C)       float32  read, gradient of out
    qkv       : (B, T, 3C)      float32  read, the forward's input
    att       : (B, NH, T, T)   float32  read, as written by attention_forward (entries
                                          above the diagonal are not read); or None: the
                                          probabilities are recomputed from q and k by the
                                          forward's own code, equal to its to the bit
    n_head    : int, NH >= 1, dividing C
    n_threads : int >= 1
    out       : (B, T, C)       float32  optional, written with attention_forward's output
                                          (bit for bit), from the same probabilities: a
                                          caller that did not keep it gets it back cheaply
    """
    cdef Py_ssize_t B, T, C, NH
    B, T, C, NH = _check_qkv(qkv, n_head)
    cdef int threads = check_n_threads(n_threads)
    check_output("dqkv", dqkv, F32, qkv.shape, f"qkv is {qkv.shape}")
    check_input("dout", dout, F32, (B, T, C), f"qkv is {qkv.shape}")
    inputs = (("dout", dout), ("qkv", qkv))
    if att is not None:
        check_input("att", att, F32, (B, NH, T, T), f"qkv is {qkv.shape}, n_head = {NH}")
        inputs += (("att", att),)
    outputs = (("dqkv", dqkv),)
    if out is not None:
        check_output("out", out, F32, (B, T, C), f"qkv is {qkv.shape}")
        outputs += (("out", out),)
    check_disjoint(outputs, inputs)
    if B * T == 0:
        return
    cdef float[:, :, ::1] dqkv_v = dqkv
    cdef const float[:, :, ::1] dout_v = dout
    cdef const float[:, :, ::1] qkv_v = qkv
    cdef const float[:, :, :, ::1] att_v
    cdef const float* att_p = NULL
    if att is not None:
        att_v = att
        att_p = &att_v[0, 0, 0, 0]
    cdef float[:, :, ::1] out_v
    cdef float* out_p = NULL
    if out is not None:
        out_v = out
        out_p = &out_v[0, 0, 0]
    cdef int team = <int> min(threads, B * NH)
    cdef int acc = 1 if accumulate else 0
    cdef Py_ssize_t stride
    cdef void* base
    cdef float* scratch = _scratch("attention_backward",
                                   attention_backward_scratch(T, C // NH), team, T, &stride,
                                   &base)
    with nogil:
        _backward_body(&dqkv_v[0, 0, 0], out_p, &dout_v[0, 0, 0], &qkv_v[0, 0, 0],
                       att_p, scratch, stride, B, T, C, NH, acc, team)
    free(base)
