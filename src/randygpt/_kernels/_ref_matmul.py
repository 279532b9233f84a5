"""NumPy references for the matmul family (linear layers without bias, general GEMM).

Dtype-agnostic (float32 for kernel comparisons, float64 for finite differences); each writes
into the arrays it is given, with the kernels' argument order minus ``n_threads``.
Weights are stored (out, in), so a linear layer is ``x @ w.T``.
"""
import numpy as np

__all__ = ["matmul_forward_ref", "matmul_backward_ref", "gemm_ref", "matmul_sqrelu_forward_ref",
           "matmul_sqrelu_backward_ref"]


def matmul_forward_ref(out, x, w, accumulate=False):
    """out (N, OC) written (or accumulated) = x (N, IC) @ w (OC, IC).T"""
    if accumulate:
        out += x @ w.T
    else:
        out[...] = x @ w.T


def matmul_backward_ref(dx, dw, dout, x, w):
    """Gradients of out = x @ w.T, accumulated; dx or dw may be None.
    dx   : (N, IC)  accumulated += dout @ w
    dw   : (OC, IC) accumulated += dout.T @ x
    dout : (N, OC)  read
    """
    if dx is not None:
        dx += dout @ w
    if dw is not None:
        dw += dout.T @ x


def gemm_ref(c, a, b, trans_a, trans_b, accumulate):
    """c (M, N) written (or accumulated) = op(a) @ op(b), op transposing when its flag is set."""
    product = (a.T if trans_a else a) @ (b.T if trans_b else b)
    if accumulate:
        c += product
    else:
        c[...] = product


def matmul_sqrelu_forward_ref(out, pre, x, w):
    """pre (N, OC) written = x @ w.T (saved for backward); out (N, OC) written = relu(pre)**2."""
    pre[...] = x @ w.T
    out[...] = np.square(np.maximum(pre, 0))


def matmul_sqrelu_backward_ref(dpre, dw, dout, pre, w):
    """Gradients of out = relu(pre)**2 @ w.T with respect to pre and w; dpre or dw may be None.
    dpre : (N, IC)  written = (dout @ w) * 2 relu(pre)
    dw   : (OC, IC) accumulated += dout.T @ relu(pre)**2
    """
    relu = np.maximum(pre, 0)
    if dw is not None:
        dw += dout.T @ np.square(relu)
    if dpre is not None:
        dpre[...] = (dout @ w) * (2 * relu)
