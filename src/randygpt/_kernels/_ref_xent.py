"""NumPy reference for softmax cross-entropy (mean over rows), forward and backward.

Shapes: logits (N, V), targets (N,) integer in [0, V), losses (N,). Works in the dtype of
``logits`` (float32 or float64); used only by tests and benchmarks.
"""
import numpy as np

__all__ = ["cross_entropy_forward_ref", "cross_entropy_backward_ref",
           "cross_entropy_forward_backward_ref"]


def _log_softmax(logits):
    # Subtracting the row max keeps exp() from overflowing for large logits.
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def cross_entropy_forward_ref(losses, logits, targets):
    """losses (N,) written = -log softmax(logits)[i, targets[i]]; returns the mean (float)."""
    N = logits.shape[0]
    logp = _log_softmax(logits)
    losses[...] = -logp[np.arange(N), targets]
    return float(np.sum(losses, dtype=np.float64) / N)


def cross_entropy_backward_ref(dlogits, logits, targets, dloss):
    """dlogits (N, V) accumulated += dloss * (softmax(logits) - onehot(targets)) / N."""
    N = logits.shape[0]
    grad = np.exp(_log_softmax(logits))
    grad[np.arange(N), targets] -= 1
    dlogits += grad * (dloss / N)


def cross_entropy_forward_backward_ref(dlogits, logits, targets):
    """dlogits written = (softmax - onehot) / N; returns the mean loss (no per-row losses)."""
    N = logits.shape[0]
    losses = np.empty(N, dtype=logits.dtype)
    loss = cross_entropy_forward_ref(losses, logits, targets)
    dlogits[...] = 0
    cross_entropy_backward_ref(dlogits, logits, targets, 1.0)
    return loss
