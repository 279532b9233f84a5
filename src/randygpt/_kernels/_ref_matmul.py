"""NumPy references for the matmul family (linear layers without bias, general GEMM).

Dtype-agnostic (float32 for kernel comparisons, float64 for finite differences); each writes
into the arrays it is given, with the kernels' argument order minus ``n_threads``.
Weights are stored (out, in), so a linear layer is ``x @ w.T``.
"""
import numpy as np

__all__ = ["matmul_forward_ref", "matmul_backward_ref", "gemm_ref", "matmul_sqrelu_forward_ref",
           "matmul_sqrelu_backward_ref", "bf16_round_ref", "gemm_bf16_ref"]


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


def bf16_round_ref(x):
    """float32 x rounded to bf16 (returned as float32, the low 16 bits zero), as the bf16
    GEMMs pack it (vcvtne2ps2bf16's rule): nearest even, overflow to infinity, NaN quieted,
    zeros and denormals to a zero of the same sign."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    mag = u & 0x7FFFFFFF
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    rounded = np.where(mag < 0x00800000, u & 0x80000000, rounded)
    rounded = np.where(mag > 0x7F800000, (u | 0x00400000) & 0xFFFF0000, rounded)
    return rounded.astype(np.uint32).view(np.float32).reshape(np.shape(x))


def gemm_bf16_ref(c, a, b, trans_a, trans_b, accumulate, ordered=False):
    """gemm_ref on bf16-rounded operands (precision="bf16").

    ordered=False sums in float64 (the kernel's fp32 sums then differ by their roundings);
    ordered=True sums in float32 in the kernel's order, element by element: for each k pair
    (2p, 2p + 1), the odd product, then the even one, each added with one rounding (the
    products of bf16 values are exact in float32). It does not flush denormal sums as the
    kernel does, so it matches bit for bit where no sum falls below 2^-126.
    """
    a = bf16_round_ref(a.T if trans_a else a)
    b = bf16_round_ref(b.T if trans_b else b)
    if not ordered:
        product = a.astype(np.float64) @ b.astype(np.float64)
    else:
        K = a.shape[1]
        product = np.zeros((a.shape[0], b.shape[1]), np.float32)
        for p in range(0, K, 2):
            for k in (p + 1, p):
                if k < K:
                    product += np.outer(a[:, k], b[k])
    if accumulate:
        c += product
    else:
        c[...] = product
