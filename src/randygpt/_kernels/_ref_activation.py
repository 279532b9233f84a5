"""NumPy references for activation.pyx: squared ReLU and counter-based dropout.

Same argument order as the kernels, minus n_threads; they write into the given arrays and work
in any float dtype. The dropout hash is the one documented in activation.pyx's header, computed
on uint64 arrays (NumPy wraps uint64 array arithmetic modulo 2**64, as C does), so a float32
mask matches the kernel's bit for bit.
"""
import math

import numpy as np

__all__ = ["squared_relu_forward_ref", "squared_relu_backward_ref",
           "squared_relu_backward_inplace_ref", "dropout_key_ref", "dropout_mask_ref",
           "dropout_forward_ref", "dropout_backward_ref", "dropout_add_forward_ref",
           "dropout_add_to_forward_ref"]

_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_U64 = (1 << 64) - 1


def squared_relu_forward_ref(out, x):
    """out written = relu(x)**2."""
    out[...] = np.square(np.maximum(x, 0))


def squared_relu_backward_ref(dx, dout, x):
    """dx accumulated += 2 * relu(x) * dout."""
    dx += 2 * np.maximum(x, 0) * dout


def squared_relu_backward_inplace_ref(d, x):
    """d written = 2 * relu(x) * d (d holds the gradient of out on entry)."""
    d[...] = 2 * np.maximum(x, 0) * d


def _mix64_int(z):
    # Python ints, masked to 64 bits: scalar NumPy uint64 arithmetic warns on wrap-around.
    z = ((z ^ (z >> 30)) * _MIX1) & _U64
    z = ((z ^ (z >> 27)) * _MIX2) & _U64
    return z ^ (z >> 31)


def _mix64_array(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


def dropout_key_ref(seed, step, layer, site):
    """key = G; for v in (seed, step, layer, site): key = mix64((key ^ v) + G)."""
    key = _GOLDEN
    for v in (seed, step, layer, site):
        key = _mix64_int(((key ^ int(v)) + _GOLDEN) & _U64)
    return key


def dropout_mask_ref(mask, p, seed, step, layer, site, offset=0):
    """mask written with 0 or 1/(1-p): element i (flat, C order) is kept when the top 24 bits of
    mix64(key + (offset + i + 1) * G) are >= floor(p * 2**24 + 0.5)."""
    key = np.uint64(dropout_key_ref(seed, step, layer, site))
    i = np.arange(offset + 1, offset + mask.size + 1, dtype=np.uint64)
    bits = _mix64_array(key + i * np.uint64(_GOLDEN))
    threshold = np.uint64(math.floor(p * 16777216.0 + 0.5))
    keep = (bits >> np.uint64(40)) >= threshold
    scale = mask.dtype.type(1.0 / (1.0 - p))
    mask[...] = np.where(keep, scale, mask.dtype.type(0)).reshape(mask.shape)


def _mask_like(a, p, seed, step, layer, site, offset):
    mask = np.empty_like(a)
    dropout_mask_ref(mask, p, seed, step, layer, site, offset)
    return mask


def dropout_forward_ref(out, x, p, seed, step, layer, site, offset=0):
    """out written = x * mask."""
    out[...] = x * _mask_like(x, p, seed, step, layer, site, offset)


def dropout_backward_ref(dx, dout, p, seed, step, layer, site, offset=0):
    """dx accumulated += dout * mask."""
    dx += dout * _mask_like(dout, p, seed, step, layer, site, offset)


def dropout_add_forward_ref(resid, x, p, seed, step, layer, site, offset=0):
    """resid updated += x * mask."""
    resid += x * _mask_like(x, p, seed, step, layer, site, offset)


def dropout_add_to_forward_ref(out, resid, x, p, seed, step, layer, site, offset=0):
    """out written = resid + x * mask."""
    out[...] = resid + x * _mask_like(x, p, seed, step, layer, site, offset)
