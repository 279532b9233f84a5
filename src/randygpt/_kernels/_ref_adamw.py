"""NumPy reference for the optimizer kernels: global gradient norm and one AdamW step.

All arrays are flat (P,); params, grads, m, v share one float dtype (float32 or float64).
decay says whether weight decay applies to them all. Used only by tests and benchmarks.
"""
import math

import numpy as np

__all__ = ["grad_norm_ref", "adamw_step_ref"]


def grad_norm_ref(g):
    """L2 norm of g, summed in float64."""
    g64 = np.asarray(g, dtype=np.float64)
    return float(math.sqrt(np.dot(g64, g64)))


def adamw_step_ref(params, grads, m, v, decay, lr, beta1, beta2, eps, weight_decay, step,
                   grad_scale):
    """One AdamW step in place on params, m and v (grads is read).

    Same arithmetic as PyTorch's AdamW: decoupled decay first, then the bias-corrected step
    params -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps).
    """
    dt = params.dtype.type
    g = grads * dt(grad_scale)
    m[...] = dt(beta1) * m + dt(1.0 - beta1) * g
    v[...] = dt(beta2) * v + dt(1.0 - beta2) * (g * g)
    step_size = dt(lr / (1.0 - beta1 ** step))
    bias2_sqrt = dt(math.sqrt(1.0 - beta2 ** step))
    if decay:
        params *= dt(1.0 - lr * weight_decay)
    params -= step_size * m / (np.sqrt(v) / bias2_sqrt + dt(eps))
