"""NumPy reference for causal multi-head self-attention (forward and backward).

Written for clarity rather than speed and dtype-agnostic (float32 or float64), so the
tests can check the fused kernels in attention.pyx against it and check its own
backward against finite differences in float64. Never used in training.

Dimensions: B batch, T time, C channels, NH heads, HS head size = C // NH.
qkv packs q, k, v side by side on its last axis: columns [0, C) are q, [C, 2C) k,
[2C, 3C) v, and head h owns columns h*HS .. (h+1)*HS of each third.
"""
import numpy as np

__all__ = ["attention_forward_ref", "attention_backward_ref"]


def _split_heads(x, n_head):
    """(B, T, C) -> (B, NH, T, HS), a view."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def _merge_heads(x):
    """(B, NH, T, HS) -> (B, T, C), a copy."""
    B, NH, T, HS = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, NH * HS)


def _scale(head_size, dtype):
    # The kernel multiplies by the float32 value of 1/sqrt(HS); so does this in float32.
    return np.asarray(1.0 / np.sqrt(head_size), dtype=dtype)


def attention_forward_ref(out, att, qkv, n_head):
    """Causal softmax(q k^T / sqrt(HS)) v per head.

    out : (B, T, C)       written, head h at columns h*HS .. (h+1)*HS
    att : (B, NH, T, T)   written, the attention probabilities (entries j > i are 0),
                          saved for attention_backward_ref; or None (not stored)
    qkv : (B, T, 3C)      read
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    q = _split_heads(qkv[:, :, :C], n_head)
    k = _split_heads(qkv[:, :, C:2 * C], n_head)
    v = _split_heads(qkv[:, :, 2 * C:], n_head)
    scores = (q @ k.transpose(0, 1, 3, 2)) * _scale(C // n_head, qkv.dtype)  # (B, NH, T, T)
    causal = np.tril(np.ones((T, T), dtype=bool))
    scores = np.where(causal, scores, -np.inf)
    # Subtracting the row max keeps exp() in range; the diagonal is never masked, so
    # every row has a finite max and the masked entries become exp(-inf) = 0 exactly.
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)
    if att is not None:
        att[...] = p
    out[...] = _merge_heads(p @ v)


def attention_backward_ref(dqkv, dout, qkv, att, n_head, accumulate=True, out=None):
    """Gradient of attention_forward_ref with respect to qkv.

    dqkv : (B, T, 3C)      accumulated (+=), or written when accumulate is False
    dout : (B, T, C)       read, gradient of out
    qkv  : (B, T, 3C)      read, the forward input
    att  : (B, NH, T, T)   read, the probabilities saved by the forward; or None (recomputed)
    out  : (B, T, C)       optional, written with the forward's output
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    if att is None or out is not None:
        y = np.empty((B, T, C), dtype=qkv.dtype)
        p_new = np.empty((B, n_head, T, T), dtype=qkv.dtype)
        attention_forward_ref(y, p_new, qkv, n_head)
        att = p_new if att is None else att
        if out is not None:
            out[...] = _merge_heads(att @ _split_heads(qkv[:, :, 2 * C:], n_head))
    if not accumulate:
        dqkv[...] = 0
    scale = _scale(C // n_head, qkv.dtype)
    q = _split_heads(qkv[:, :, :C], n_head)
    k = _split_heads(qkv[:, :, C:2 * C], n_head)
    v = _split_heads(qkv[:, :, 2 * C:], n_head)
    dy = _split_heads(dout, n_head)
    p = att
    # y = P v
    dv = p.transpose(0, 1, 3, 2) @ dy
    dp = dy @ v.transpose(0, 1, 3, 2)
    # P = softmax(S) row-wise: dS_ij = P_ij (dP_ij - sum_l P_il dP_il)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))
    # S = q k^T * scale
    dq = (ds @ k) * scale
    dk = (ds.transpose(0, 1, 3, 2) @ q) * scale
    dqkv[:, :, :C] += _merge_heads(dq)
    dqkv[:, :, C:2 * C] += _merge_heads(dk)
    dqkv[:, :, 2 * C:] += _merge_heads(dv)
