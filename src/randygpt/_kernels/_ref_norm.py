"""NumPy references for norm.pyx: RMSNorm (no gain) and LayerNorm (gain and bias).

Same argument order as the kernels, minus n_threads; they write into the given arrays and
work in any float dtype. Row sums are taken in float64 and the statistics stored in the
arrays' dtype, then used from there, as the kernels do, so float32 results agree closely.
"""
import numpy as np

__all__ = ["rmsnorm_forward_ref", "rmsnorm_backward_ref",
           "layernorm_forward_ref", "layernorm_backward_ref"]


def rmsnorm_forward_ref(out, rstd, x, eps):
    """out (N, C) written = x * rstd; rstd (N,) written = 1 / sqrt(mean(x**2) + eps)."""
    ms = np.mean(np.square(x.astype(np.float64)), axis=-1)
    rstd[...] = 1.0 / np.sqrt(ms + eps)
    out[...] = x * rstd[:, None]


def rmsnorm_backward_ref(dx, dout, x, rstd):
    """dx (N, C) accumulated += rstd*dout - (rstd**3 / C) * x * sum(x*dout)."""
    C = x.shape[-1]
    s = np.sum(x.astype(np.float64) * dout, axis=-1)
    coef = (rstd.astype(np.float64) ** 3 * s / C).astype(x.dtype)
    dx += rstd[:, None] * dout - coef[:, None] * x


def layernorm_forward_ref(out, mean, rstd, x, weight, bias, eps):
    """out (N, C) written = (x - mean) * rstd * weight + bias; mean, rstd (N,) written."""
    x64 = x.astype(np.float64)
    mu = np.mean(x64, axis=-1)
    var = np.mean(np.square(x64 - mu[:, None]), axis=-1)
    mean[...] = mu
    rstd[...] = 1.0 / np.sqrt(var + eps)
    out[...] = (x - mean[:, None]) * rstd[:, None] * weight + bias


def layernorm_backward_ref(dx, dweight, dbias, dout, x, mean, rstd, weight):
    """dx (N, C), dweight (C,), dbias (C,) all accumulated."""
    C = x.shape[-1]
    xhat = (x - mean[:, None]) * rstd[:, None]
    dxhat = dout * weight
    m1 = (np.sum(dxhat.astype(np.float64), axis=-1) / C).astype(x.dtype)
    m2 = (np.sum(dxhat.astype(np.float64) * xhat, axis=-1) / C).astype(x.dtype)
    dx += rstd[:, None] * ((dxhat - m1[:, None]) - xhat * m2[:, None])
    dweight += np.sum(dout.astype(np.float64) * xhat, axis=0).astype(dweight.dtype)
    dbias += np.sum(dout.astype(np.float64), axis=0).astype(dbias.dtype)
