# Optimizer kernels on the flat parameter buffers: the global gradient norm (for clipping)
# and one fused AdamW step.
#
# Dimensions: P = number of parameters (all tensors in one flat float32 array).
#
# Both run in parallel over fixed chunks of the flat arrays. grad_norm's chunk count depends
# on P only and the chunk sums are added serially in chunk order, so the norm is the same for
# any thread count. adamw_step is elementwise, so its chunking cannot change any result; it is
# one memory-bound pass (read params, grads, m, v, mask; write params, m, v).
import math

import numpy as np

from cython.parallel cimport prange
from libc.math cimport pow, sqrt, sqrtf

# Sum of squares in double on eight fixed lanes: vectorizable, and a function of the data alone.
from randygpt._kernels._rowops cimport row_sumsq

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
                            const unsigned char* decay_mask, float b1, float one_minus_b1,
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
        p = params[i] * decay if decay_mask[i] != 0 else params[i]
        params[i] = p - step_size * mi / (sqrtf(vi) / bias2_sqrt + eps)


cdef void adamw_chunks(float* params, const float* grads, float* m, float* v,
                       const unsigned char* decay_mask, float b1, float one_minus_b1,
                       float b2, float one_minus_b2, float decay, float step_size,
                       float bias2_sqrt, float eps, float grad_scale, Py_ssize_t P,
                       int n_threads) noexcept nogil:
    cdef Py_ssize_t n_chunks = (P + STEP_CHUNK - 1) // STEP_CHUNK
    cdef Py_ssize_t k, lo
    for k in prange(n_chunks, schedule="static", num_threads=n_threads):
        lo = k * STEP_CHUNK
        adamw_span(params + lo, grads + lo, m + lo, v + lo, decay_mask + lo, b1, one_minus_b1,
                   b2, one_minus_b2, decay, step_size, bias2_sqrt, eps, grad_scale,
                   min(STEP_CHUNK, P - lo))


# ---- checks done once per call, before any kernel runs --------------------------------------

def _check_flat(name, a, dtype, P=None):
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype} (shape {a.shape})")
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (the flat buffer), got shape {a.shape}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (shape {a.shape}, strides {a.strides})")
    if P is not None and a.shape[0] != P:
        raise ValueError(f"{name} shape {a.shape} does not match params shape ({P},)")


def _check_threads(n_threads):
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)):
        raise TypeError(f"n_threads must be an int, got {type(n_threads).__name__}")
    if not 1 <= n_threads <= 1 << 16:
        raise ValueError(f"n_threads must be between 1 and 65536, got {n_threads}")
    return int(n_threads)


def _check_scalar(name, x, lo=None, hi=None, hi_open=False):
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if lo is not None and x < lo:
        raise ValueError(f"{name} must be >= {lo}, got {x}")
    if hi is not None and (x >= hi if hi_open else x > hi):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {x}")
    return x


# ---- public kernels ---------------------------------------------------------------------------

def grad_norm(g, n_threads):
    """Global L2 norm of the flat gradient.

    g : (P,) float32  read
    Returns sqrt(sum(g**2)), summed in float64 over a number of chunks set by P alone and added
    in chunk order: the same value for every n_threads.
    """
    cdef int nt = _check_threads(n_threads)
    _check_flat("g", g, np.float32)
    if g.shape[0] == 0:
        return 0.0
    cdef const float[::1] gv = g
    cdef double norm
    with nogil:
        norm = grad_norm_chunks(&gv[0], gv.shape[0], nt)
    return norm


def adamw_step(params, grads, m, v, decay_mask, lr, beta1, beta2, eps, weight_decay, step,
               grad_scale, n_threads):
    """One AdamW step, in place, on the flat buffers.

    params     : (P,) float32  updated in place
    grads      : (P,) float32  read (multiplied by grad_scale, e.g. the clipping factor)
    m, v       : (P,) float32  updated in place (first and second moments)
    decay_mask : (P,) uint8    read; nonzero = apply weight decay to this parameter
    step       : int >= 1, the number of this step (for the bias corrections)

    g = grads * grad_scale; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g*g;
    params = params*(1 - lr*wd*mask) - (lr/(1-b1^t)) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
    """
    cdef int nt = _check_threads(n_threads)
    _check_flat("params", params, np.float32)
    P = params.shape[0]
    _check_flat("grads", grads, np.float32, P)
    _check_flat("m", m, np.float32, P)
    _check_flat("v", v, np.float32, P)
    _check_flat("decay_mask", decay_mask, np.uint8, P)
    lr = _check_scalar("lr", lr, lo=0.0)
    beta1 = _check_scalar("beta1", beta1, lo=0.0, hi=1.0, hi_open=True)
    beta2 = _check_scalar("beta2", beta2, lo=0.0, hi=1.0, hi_open=True)
    eps = _check_scalar("eps", eps, lo=0.0)
    weight_decay = _check_scalar("weight_decay", weight_decay, lo=0.0)
    grad_scale = _check_scalar("grad_scale", grad_scale)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"step must be >= 1 (the first step is 1), got {step}")
    arrays = {"params": params, "grads": grads, "m": m, "v": v, "decay_mask": decay_mask}
    names = list(arrays)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if np.shares_memory(arrays[a], arrays[b]):
                raise ValueError(f"{a} and {b} must be distinct buffers (they share memory)")
    for name in ("params", "m", "v"):
        if not arrays[name].flags.writeable:
            raise ValueError(f"{name} must be writeable")
    if P == 0:
        return
    # Bias corrections in double, once; the loop itself runs in float32 like PyTorch's.
    cdef double bias1 = 1.0 - pow(beta1, <double>step)
    cdef double bias2 = 1.0 - pow(beta2, <double>step)
    cdef float step_size = <float>(lr / bias1)
    cdef float bias2_sqrt = <float>sqrt(bias2)
    cdef float decay = <float>(1.0 - lr * weight_decay)
    cdef float[::1] pv = params
    cdef const float[::1] gv = grads
    cdef float[::1] mv = m
    cdef float[::1] vv = v
    cdef const unsigned char[::1] dm = decay_mask
    cdef float b1 = beta1, b2 = beta2
    cdef float c1 = 1.0 - beta1, c2 = 1.0 - beta2
    cdef float e = eps, s = grad_scale
    with nogil:
        adamw_chunks(&pv[0], &gv[0], &mv[0], &vv[0], &dm[0], b1, c1, b2, c2, decay, step_size,
                     bias2_sqrt, e, s, pv.shape[0], nt)
