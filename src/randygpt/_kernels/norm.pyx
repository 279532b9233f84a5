"""RMSNorm (no gain) and LayerNorm (gain and bias) over the last axis, forward and backward.

Dimensions: N rows (= B*T), C channels. Every array is float32 and C-contiguous.

Parallel axis: rows. Each row's statistics and its output row depend on that row alone, so
threads write disjoint memory and the result cannot depend on the thread count. Row sums are
accumulated in double (see _rowops.pxd) and stored as float32; the normalisation itself then
uses the stored float32 mean/rstd, so backward sees exactly what forward used.

LayerNorm's dweight/dbias are the one reduction across rows. The rows are cut into a number of
chunks set by N alone (LN_ROW_CHUNKS, fewer if N is smaller); each chunk sums into its own
double partial, and the partials are added serially in chunk order. Threads take whole chunks,
so dweight/dbias are bit-identical for any n_threads.
"""
import numpy as np

from cython.parallel cimport prange
from libc.math cimport sqrt
from libc.stdlib cimport free

from randygpt._kernels._checks cimport (check_array, check_disjoint, check_input,
                                       check_n_threads, check_output, check_real,
                                       checked_malloc)
from randygpt._kernels._rowops cimport (ROW_LANES, DoublePair, lanes_total, row_dot, row_sum,
                                        row_sumsq, row_sumsq_centered)

__all__ = ["rmsnorm_forward", "rmsnorm_backward", "layernorm_forward", "layernorm_backward",
           "LN_ROW_CHUNKS"]

# Number of row chunks for LayerNorm's dweight/dbias partials. A constant, not the thread count:
# 32 keeps up to ~8 threads busy while the partials (32 x 2C doubles) stay small.
cdef enum:
    _LN_ROW_CHUNKS = 32
LN_ROW_CHUNKS = _LN_ROW_CHUNKS


# ---------------------------------------------------------------------------------------------
# Argument checks (run once per call, before any nogil code; the shared ones are in _checks.py).

cdef object F32 = np.dtype(np.float32)


def _check_rows(x):
    check_array("x", x, F32, 2)
    N, C = x.shape
    if C < 1:
        raise ValueError(f"x must have at least one column, got shape {x.shape}")
    return N, C


# ---------------------------------------------------------------------------------------------
# RMSNorm: out = x * rstd, rstd = 1 / sqrt(mean(x**2) + eps)

cdef void _rmsnorm_forward(float* out, float* rstd, const float* x, Py_ssize_t N, Py_ssize_t C,
                           double eps, int n_threads) noexcept nogil:
    cdef Py_ssize_t r, c
    cdef const float* xr
    cdef float* outr
    cdef float rs
    for r in prange(N, schedule="static", num_threads=n_threads):
        xr = x + r * C
        outr = out + r * C
        rs = <float>(1.0 / sqrt(row_sumsq(xr, C) / C + eps))
        rstd[r] = rs
        for c in range(C):
            outr[c] = xr[c] * rs


cdef void _rmsnorm_backward(float* dx, const float* dout, const float* x, const float* rstd,
                            Py_ssize_t N, Py_ssize_t C, int n_threads) noexcept nogil:
    cdef Py_ssize_t r, c
    cdef const float* xr
    cdef const float* doutr
    cdef float* dxr
    cdef float rs, coef
    for r in prange(N, schedule="static", num_threads=n_threads):
        xr = x + r * C
        doutr = dout + r * C
        dxr = dx + r * C
        rs = rstd[r]
        # d/dx of out = x * (mean(x**2) + eps)**-0.5:
        #   dx += rstd * dout - (rstd**3 / C) * x * sum(x * dout)
        coef = <float>(<double>rs * rs * rs * row_dot(xr, doutr, C) / C)
        for c in range(C):
            dxr[c] += rs * doutr[c] - coef * xr[c]


def rmsnorm_forward(out, rstd, x, eps, n_threads):
    """RMSNorm over the last axis, no gain.

    out  : (N, C) float32  written
    rstd : (N,)   float32  written = 1 / sqrt(mean(x**2) + eps), saved for rmsnorm_backward
    x    : (N, C) float32  read
    eps  : float >= 0
    """
    cdef Py_ssize_t N, C
    N, C = _check_rows(x)
    check_output("out", out, F32, (N, C), "same as x")
    check_output("rstd", rstd, F32, (N,), "one per row of x")
    check_disjoint((("out", out), ("rstd", rstd)), (("x", x),))
    cdef double e = check_real("eps", eps, 0.0)
    cdef int nt = check_n_threads(n_threads)
    if N == 0:
        return
    cdef float[:, ::1] out_v = out
    cdef float[::1] rstd_v = rstd
    cdef const float[:, ::1] x_v = x
    with nogil:
        _rmsnorm_forward(&out_v[0, 0], &rstd_v[0], &x_v[0, 0], N, C, e, nt)


def rmsnorm_backward(dx, dout, x, rstd, n_threads):
    """Gradient of rmsnorm_forward.

    dx   : (N, C) float32  accumulated: dx += rstd*dout - (rstd**3 / C) * x * sum(x*dout)
    dout : (N, C) float32  read
    x    : (N, C) float32  read (the forward input)
    rstd : (N,)   float32  read (saved by rmsnorm_forward)
    """
    cdef Py_ssize_t N, C
    N, C = _check_rows(x)
    check_output("dx", dx, F32, (N, C), "same as x")
    check_input("dout", dout, F32, (N, C), "same as x")
    check_input("rstd", rstd, F32, (N,), "one per row of x")
    check_disjoint((("dx", dx),), (("dout", dout), ("x", x), ("rstd", rstd)))
    cdef int nt = check_n_threads(n_threads)
    if N == 0:
        return
    cdef float[:, ::1] dx_v = dx
    cdef const float[:, ::1] dout_v = dout
    cdef const float[:, ::1] x_v = x
    cdef const float[::1] rstd_v = rstd
    with nogil:
        _rmsnorm_backward(&dx_v[0, 0], &dout_v[0, 0], &x_v[0, 0], &rstd_v[0], N, C, nt)


# ---------------------------------------------------------------------------------------------
# LayerNorm: out = (x - mean) * rstd * weight + bias, rstd = 1 / sqrt(var(x) + eps)

cdef void _layernorm_forward(float* out, float* mean, float* rstd, const float* x,
                             const float* weight, const float* bias, Py_ssize_t N, Py_ssize_t C,
                             double eps, int n_threads) noexcept nogil:
    cdef Py_ssize_t r, c
    cdef const float* xr
    cdef float* outr
    cdef double mu
    cdef float m, rs
    for r in prange(N, schedule="static", num_threads=n_threads):
        xr = x + r * C
        outr = out + r * C
        mu = row_sum(xr, C) / C
        m = <float>mu
        rs = <float>(1.0 / sqrt(row_sumsq_centered(xr, mu, C) / C + eps))
        mean[r] = m
        rstd[r] = rs
        for c in range(C):
            outr[c] = (xr[c] - m) * rs * weight[c] + bias[c]


cdef inline DoublePair _layernorm_backward_sums(const float* doutr, const float* xr,
                                                const float* weight, float m, float rs,
                                                Py_ssize_t C) noexcept nogil:
    # (sum(dxhat), sum(dxhat * xhat)) in double, with xhat = (x - mean) * rstd and
    # dxhat = dout * weight formed in float32 exactly as the dx loop forms them.
    cdef double a1[8]
    cdef double a2[8]
    cdef DoublePair sums
    cdef Py_ssize_t i, j
    cdef Py_ssize_t nv = C - C % ROW_LANES
    cdef float dxh
    for j in range(ROW_LANES):
        a1[j] = 0.0
        a2[j] = 0.0
    for i in range(0, nv, 8):
        for j in range(ROW_LANES):
            dxh = doutr[i + j] * weight[i + j]
            a1[j] += <double>dxh
            a2[j] += <double>dxh * <double>((xr[i + j] - m) * rs)
    for i in range(nv, C):
        dxh = doutr[i] * weight[i]
        a1[i - nv] += <double>dxh
        a2[i - nv] += <double>dxh * <double>((xr[i] - m) * rs)
    sums.a = lanes_total(a1)
    sums.b = lanes_total(a2)
    return sums


cdef inline void _layernorm_backward_row(float* dxr, double* pw, double* pb, const float* doutr,
                                         const float* xr, const float* weight, float m, float rs,
                                         Py_ssize_t C) noexcept nogil:
    # xhat = (x - mean) * rstd; dxhat = dout * weight
    # dx += rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    # dweight (chunk partial pw) += dout * xhat; dbias (partial pb) += dout
    # Three plain loops over the row (it stays in L1) rather than one fused loop: each is
    # simple enough for gcc to vectorize.
    cdef Py_ssize_t c
    cdef float xh, m1, m2
    cdef DoublePair sums = _layernorm_backward_sums(doutr, xr, weight, m, rs, C)
    m1 = <float>(sums.a / C)
    m2 = <float>(sums.b / C)
    for c in range(C):
        xh = (xr[c] - m) * rs
        dxr[c] += rs * ((doutr[c] * weight[c] - m1) - xh * m2)
    for c in range(C):
        pw[c] += <double>doutr[c] * <double>((xr[c] - m) * rs)
        pb[c] += <double>doutr[c]


cdef void _layernorm_backward(float* dx, float* dweight, float* dbias, double* partials,
                              const float* dout, const float* x, const float* mean,
                              const float* rstd, const float* weight, Py_ssize_t N, Py_ssize_t C,
                              Py_ssize_t n_chunks, int n_threads) noexcept nogil:
    # partials: (n_chunks, 2, C) doubles, [k, 0] for dweight and [k, 1] for dbias of chunk k.
    cdef Py_ssize_t k, r, r0, r1, c
    cdef double* pw
    cdef double* pb
    for k in prange(n_chunks, schedule="static", num_threads=n_threads):
        pw = partials + k * 2 * C
        pb = pw + C
        for c in range(2 * C):
            pw[c] = 0.0
        r0 = k * N // n_chunks
        r1 = (k + 1) * N // n_chunks
        for r in range(r0, r1):
            _layernorm_backward_row(dx + r * C, pw, pb, dout + r * C, x + r * C, weight,
                                    mean[r], rstd[r], C)
    # Serial, in chunk order: this fixed order is what makes the sums thread-count independent.
    for k in range(1, n_chunks):
        pw = partials + k * 2 * C
        for c in range(2 * C):
            partials[c] += pw[c]
    # Each gradient gets one float32 increment, so calling backward twice gives exactly twice.
    for c in range(C):
        dweight[c] += <float>partials[c]
        dbias[c] += <float>partials[C + c]


def layernorm_forward(out, mean, rstd, x, weight, bias, eps, n_threads):
    """LayerNorm over the last axis, with gain and bias.

    out    : (N, C) float32  written = (x - mean) * rstd * weight + bias
    mean   : (N,)   float32  written, saved for layernorm_backward
    rstd   : (N,)   float32  written = 1 / sqrt(var(x) + eps) (biased variance), saved
    x      : (N, C) float32  read
    weight : (C,)   float32  read
    bias   : (C,)   float32  read
    eps    : float >= 0
    """
    cdef Py_ssize_t N, C
    N, C = _check_rows(x)
    check_output("out", out, F32, (N, C), "same as x")
    check_output("mean", mean, F32, (N,), "one per row of x")
    check_output("rstd", rstd, F32, (N,), "one per row of x")
    check_input("weight", weight, F32, (C,), "one per column of x")
    check_input("bias", bias, F32, (C,), "one per column of x")
    check_disjoint((("out", out), ("mean", mean), ("rstd", rstd)),
                   (("x", x), ("weight", weight), ("bias", bias)))
    cdef double e = check_real("eps", eps, 0.0)
    cdef int nt = check_n_threads(n_threads)
    if N == 0:
        return
    cdef float[:, ::1] out_v = out
    cdef float[::1] mean_v = mean
    cdef float[::1] rstd_v = rstd
    cdef const float[:, ::1] x_v = x
    cdef const float[::1] w_v = weight
    cdef const float[::1] b_v = bias
    with nogil:
        _layernorm_forward(&out_v[0, 0], &mean_v[0], &rstd_v[0], &x_v[0, 0], &w_v[0], &b_v[0],
                           N, C, e, nt)


def layernorm_backward(dx, dweight, dbias, dout, x, mean, rstd, weight, n_threads):
    """Gradient of layernorm_forward. All three gradients are accumulated.

    dx      : (N, C) float32  accumulated
    dweight : (C,)   float32  accumulated: sum over rows of dout * xhat
    dbias   : (C,)   float32  accumulated: sum over rows of dout
    dout    : (N, C) float32  read
    x       : (N, C) float32  read (the forward input)
    mean    : (N,)   float32  read (saved by layernorm_forward)
    rstd    : (N,)   float32  read (saved by layernorm_forward)
    weight  : (C,)   float32  read
    The row reduction for dweight/dbias uses min(N, LN_ROW_CHUNKS) chunks added in chunk
    order, so every output is bit-identical for any n_threads.
    """
    cdef Py_ssize_t N, C
    N, C = _check_rows(x)
    check_output("dx", dx, F32, (N, C), "same as x")
    check_output("dweight", dweight, F32, (C,), "one per column of x")
    check_output("dbias", dbias, F32, (C,), "one per column of x")
    check_input("dout", dout, F32, (N, C), "same as x")
    check_input("mean", mean, F32, (N,), "one per row of x")
    check_input("rstd", rstd, F32, (N,), "one per row of x")
    check_input("weight", weight, F32, (C,), "one per column of x")
    check_disjoint((("dx", dx), ("dweight", dweight), ("dbias", dbias)),
                   (("dout", dout), ("x", x), ("mean", mean), ("rstd", rstd), ("weight", weight)))
    cdef int nt = check_n_threads(n_threads)
    if N == 0:
        return
    cdef Py_ssize_t n_chunks = min(N, _LN_ROW_CHUNKS)
    cdef float[:, ::1] dx_v = dx
    cdef float[::1] dw_v = dweight
    cdef float[::1] db_v = dbias
    cdef const float[:, ::1] dout_v = dout
    cdef const float[:, ::1] x_v = x
    cdef const float[::1] mean_v = mean
    cdef const float[::1] rstd_v = rstd
    cdef const float[::1] w_v = weight
    cdef double* partials = <double*>checked_malloc(
        "layernorm_backward", n_chunks * 2 * C * 8, f"{n_chunks}x2x{C} partial sums (double)")
    try:
        with nogil:
            _layernorm_backward(&dx_v[0, 0], &dw_v[0], &db_v[0], partials, &dout_v[0, 0],
                                &x_v[0, 0], &mean_v[0], &rstd_v[0], &w_v[0], N, C, n_chunks, nt)
    finally:
        free(partials)
