"""NumPy references for decode.pyx, the incremental-decoding kernels (inference only: there
is no backward to mirror).

Same argument order as the kernels, minus n_threads; they write into the given arrays and
work in any float dtype. Never used in training or decoding.

Dimensions: n new rows, IC/OC input/output channels, C channels, NH heads, HS = C // NH,
t0 the position of the first new row. qkv rows pack q | k | v, head h at columns h*HS ..
(h+1)*HS of each third, as for attention_forward.
"""
import numpy as np

__all__ = ["decode_matmul_forward_ref", "decode_matmul_sqrelu_forward_ref",
           "decode_attention_forward_ref"]


def decode_matmul_forward_ref(out, x, w, accumulate=False):
    """out (n, OC) written (or accumulated) = x (n, IC) @ w (OC, IC).T"""
    if accumulate:
        out += x @ w.T
    else:
        out[...] = x @ w.T


def decode_matmul_sqrelu_forward_ref(out, x, w):
    """out (n, OC) written = relu(x (n, IC) @ w (OC, IC).T)**2"""
    out[...] = np.square(np.maximum(x @ w.T, 0))


def decode_attention_forward_ref(out, qkv, t0, n_head):
    """Causal attention of qkv's rows t0 .. t0+n-1 over its rows 0 .. t0+n-1, per head.

    out : (n, C)    written, head h at columns h*HS .. (h+1)*HS
    qkv : (Tc, 3C)  read: rows t0 .. t0+n-1 the queries, rows 0 .. t0+n-1 keys and values
    """
    n, C = out.shape
    HS = C // n_head
    t1 = t0 + n
    # The kernel multiplies by the float32 value of 1/sqrt(HS); so does this in float32.
    scale = np.asarray(1.0 / np.sqrt(HS), dtype=qkv.dtype)
    # Query i sits at position t0 + i and sees keys j <= t0 + i.
    causal = np.arange(t1)[None, :] <= (t0 + np.arange(n))[:, None]       # (n, t1)
    for h in range(n_head):
        cols = slice(h * HS, (h + 1) * HS)
        q = qkv[t0:t1, :C][:, cols]                                        # (n, HS)
        k = qkv[:t1, C:2 * C][:, cols]                                     # (t1, HS)
        v = qkv[:t1, 2 * C:][:, cols]                                      # (t1, HS)
        scores = np.where(causal, (q @ k.T) * scale, -np.inf)
        # Max subtraction keeps exp() in range; the softmax sum in float64, as the kernel's.
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        p = (e / e.sum(axis=-1, keepdims=True, dtype=np.float64)).astype(qkv.dtype)
        out[:, cols] = p @ v
