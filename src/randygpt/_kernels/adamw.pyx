# Optimizer kernels on the flat parameter buffers: the global gradient norm (for clipping)
# and one fused AdamW step.
#
# Dimensions: P = number of parameters (all tensors in one flat float32 array).
#
# Both run in parallel over fixed chunks of the flat arrays. grad_norm's chunk count depends
# on P only and the chunk sums are added serially in chunk order, so the norm is the same for
# any thread count. adamw_step is elementwise, so its chunking cannot change any result; it is
# one memory-bound pass (read params, grads, m, v; write params, m, v). Weight decay applies
# to a whole call or not at all: the optimizer calls it once per run of parameters that share
# the rule, which costs no memory (a per-parameter mask would be a byte per parameter).
import numpy as np

from cython.parallel cimport prange
from libc.math cimport pow, sqrt, sqrtf

from randygpt._kernels._checks cimport (check_array, check_disjoint, check_input, check_int,
                                       check_n_threads, check_real, check_writeable)

# Sum of squares in double on eight fixed lanes: vectorizable, and a function of the data alone.
from randygpt._kernels._rowops cimport row_sumsq

__all__ = ["grad_norm", "adamw_step"]

cdef enum:
    # At most this many partial sums for grad_norm; small arrays get fewer chunks of at least
    # MIN_CHUNK elements, so that tiny calls do not pay for 64 nearly empty tasks.
    MAX_CHUNKS = 64
    MIN_CHUNK = 4096
    # Elements per adamw_step task: large enough to amortize scheduling, small enough to balance.
    STEP_CHUNK = 16384


cdef Py_ssize_t norm_chunks(Py_ssize_t P) noexcept nogil:
    cdef Py_ssize_t k = (P + MIN_CHUNK - 1) // MIN_CHUNK
    if k > MAX_CHUNKS:
        return MAX_CHUNKS
    return k if k > 0 else 1


cdef double grad_norm_chunks(const float* g, Py_ssize_t P, int n_threads) noexcept nogil:
    cdef double partial[MAX_CHUNKS]
    cdef Py_ssize_t n_chunks = norm_chunks(P)
    cdef Py_ssize_t size = (P + n_chunks - 1) // n_chunks
    cdef Py_ssize_t k, lo, hi
    cdef double total = 0.0
    for k in prange(n_chunks, schedule="static", num_threads=n_threads):
        lo = k * size
        hi = min(lo + size, P)
        partial[k] = row_sumsq(g + lo, hi - lo) if hi > lo else 0.0
    # Serial, in chunk order: the total must not depend on which thread summed which chunk.
    for k in range(n_chunks):
        total += partial[k]
    return sqrt(total)


cdef inline void adamw_span(float* params, const float* grads, float* m, float* v,
                            float b1, float one_minus_b1,
                            float b2, float one_minus_b2, float decay, float step_size,
                            float bias2_sqrt, float eps, float grad_scale,
                            Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef float g, mi, vi, p
    for i in range(n):
        g = grads[i] * grad_scale
        mi = b1 * m[i] + one_minus_b1 * g
        vi = b2 * v[i] + one_minus_b2 * (g * g)
        m[i] = mi
        v[i] = vi
        # Decoupled weight decay first, then the bias-corrected Adam step, as PyTorch orders it.
        # decay is 1 - lr * weight_decay, or exactly 1 for parameters that do not decay.
        p = params[i] * decay
        params[i] = p - step_size * mi / (sqrtf(vi) / bias2_sqrt + eps)


cdef void adamw_chunks(float* params, const float* grads, float* m, float* v,
                       float b1, float one_minus_b1,
                       float b2, float one_minus_b2, float decay, float step_size,
                       float bias2_sqrt, float eps, float grad_scale, Py_ssize_t P,
                       int n_threads) noexcept nogil:
    cdef Py_ssize_t n_chunks = (P + STEP_CHUNK - 1) // STEP_CHUNK
    cdef Py_ssize_t k, lo
    for k in prange(n_chunks, schedule="static", num_threads=n_threads):
        lo = k * STEP_CHUNK
        adamw_span(params + lo, grads + lo, m + lo, v + lo, b1, one_minus_b1,
                   b2, one_minus_b2, decay, step_size, bias2_sqrt, eps, grad_scale,
                   min(STEP_CHUNK, P - lo))


# Dtypes the checks compare against (see _checks.pyx), built once.
cdef object F32 = np.dtype(np.float32)
# The step count goes into the bias corrections as a double; a bound keeps that conversion
# from overflowing.
_STEP_MAX = (1 << 63) - 1


# ---- public kernels ---------------------------------------------------------------------------

def grad_norm(g, n_threads):
    """Global L2 norm of the flat gradient.

    g : (P,) float32  read
    Returns sqrt(sum(g**2)), summed in float64 over a number of chunks set by P alone and added
    in chunk order: the same value for every n_threads.
    """
    cdef int nt = check_n_threads(n_threads)
    check_array("g", g, F32, 1)
    if g.shape[0] == 0:
        return 0.0
    cdef const float[::1] gv = g
    cdef double norm
    with nogil:
        norm = grad_norm_chunks(&gv[0], gv.shape[0], nt)
    return norm


def adamw_step(params, grads, m, v, decay, lr, beta1, beta2, eps, weight_decay, step,
               grad_scale, n_threads):
    """One AdamW step, in place, on flat buffers (the whole parameter buffer or one span of it).

    params : (P,) float32  updated in place
    grads  : (P,) float32  read (multiplied by grad_scale, e.g. the clipping factor)
    m, v   : (P,) float32  updated in place (first and second moments)
    decay  : bool, apply weight decay to these parameters (d = 1) or not (d = 0)
    step   : int >= 1, the number of this step (for the bias corrections)

    g = grads * grad_scale; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
    params = params*(1 - lr*wd*d) - (lr/(1-b1^t)) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
    """
    cdef int nt = check_n_threads(n_threads)
    check_array("params", params, F32, 1)
    check_input("grads", grads, F32, params.shape, "same as params")
    check_input("m", m, F32, params.shape, "same as params")
    check_input("v", v, F32, params.shape, "same as params")
    if not isinstance(decay, (bool, np.bool_)):
        raise TypeError(f"decay must be a bool, got {type(decay).__name__}")
    lr = check_real("lr", lr, 0.0)
    beta1 = check_real("beta1", beta1, 0.0, 1.0)
    beta2 = check_real("beta2", beta2, 0.0, 1.0)
    eps = check_real("eps", eps, 0.0)
    weight_decay = check_real("weight_decay", weight_decay, 0.0)
    grad_scale = check_real("grad_scale", grad_scale)
    step = check_int("step", step, 1, _STEP_MAX, "the first step is 1; a 64-bit counter")
    check_disjoint((("params", params), ("m", m), ("v", v)),
                   (("grads", grads),))
    check_writeable("params", params)
    check_writeable("m", m)
    check_writeable("v", v)
    if params.shape[0] == 0:
        return
    # Bias corrections in double, once; the loop itself runs in float32 like PyTorch's.
    cdef double bias1 = 1.0 - pow(beta1, <double>step)
    cdef double bias2 = 1.0 - pow(beta2, <double>step)
    cdef float step_size = <float>(lr / bias1)
    cdef float bias2_sqrt = <float>sqrt(bias2)
    cdef float d = <float>(1.0 - lr * weight_decay) if decay else 1.0
    cdef float[::1] pv = params
    cdef const float[::1] gv = grads
    cdef float[::1] mv = m
    cdef float[::1] vv = v
    cdef float b1 = beta1, b2 = beta2
    cdef float c1 = 1.0 - beta1, c2 = 1.0 - beta2
    cdef float e = eps, s = grad_scale
    with nogil:
        adamw_chunks(&pv[0], &gv[0], &mv[0], &vv[0], b1, c1, b2, c2, d, step_size,
                     bias2_sqrt, e, s, pv.shape[0], nt)
