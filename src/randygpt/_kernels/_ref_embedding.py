"""NumPy reference for the token + position embedding, forward and backward.

Shapes: idx (B, T) integer in [0, V), wte (V, C), wpe (>= T, C), out (B, T, C). Works in the
dtype of the tables (float32 or float64); used only by tests and benchmarks.
"""
import numpy as np

__all__ = ["embedding_forward_ref", "embedding_backward_ref"]


def embedding_forward_ref(out, idx, wte, wpe):
    """out (B, T, C) written = wte[idx] + wpe[:T]."""
    T = idx.shape[1]
    out[...] = wte[idx] + wpe[:T]


def embedding_backward_ref(dwte, dwpe, dout, idx):
    """dwte (V, C) and dwpe (>= T, C) accumulated; repeated tokens add up."""
    B, T = idx.shape
    C = dout.shape[-1]
    # np.add.at, unlike dwte[idx] += ..., adds every occurrence of a repeated token.
    np.add.at(dwte, idx.reshape(-1), dout.reshape(B * T, C))
    dwpe[:T] += dout.sum(axis=0)
