# Token + position embedding: forward (gather and add) and backward (scatter-add).
#
# Dimensions: B batch, T time, C channels, V vocabulary, N = B*T token positions.
#
# Forward runs in parallel over the N token positions (each writes its own output row).
# Backward is a scatter: many positions hold the same token, so splitting tokens between
# threads would race on dwte rows. Instead:
#   - dwte runs in parallel over blocks of columns: each thread owns whole columns. The
#     positions are first grouped by token (a stable counting sort, done once per call), and
#     each dwte row's block is the sum of its token's positions in position order, so every
#     element is summed by one thread in one fixed order;
#   - dwpe runs in parallel over positions t (each owns row t) and sums over b in order.
# Both are therefore bit-identical for any thread count.
import numpy as np

from cython.parallel cimport prange

from randygpt._kernels._checks cimport (check_array, check_disjoint, check_input,
                                       check_n_threads, check_output, check_writeable,
                                       out_of_range_error)
from randygpt._kernels._rowops cimport first_out_of_range

__all__ = ["embedding_forward", "embedding_backward"]

# Columns per dwte task: 32 floats = two cache lines, so threads never share a line of dwte
# or dout, and C = 256 still splits into 8 tasks.
cdef enum:
    COL_BLOCK = 32


cdef inline void add_rows(float* out, const float* a, const float* b, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(C):
        out[c] = a[c] + b[c]


cdef void embedding_forward_rows(float* out, const int* idx, const float* wte, const float* wpe,
                                 Py_ssize_t N, Py_ssize_t T, Py_ssize_t C,
                                 int n_threads) noexcept nogil:
    cdef Py_ssize_t n
    for n in prange(N, schedule="static", num_threads=n_threads):
        add_rows(out + n * C, wte + <Py_ssize_t>idx[n] * C, wpe + (n % T) * C, C)


cdef inline void dwte_columns(float* dwte, const float* dout, const Py_ssize_t* start,
                              const Py_ssize_t* order, Py_ssize_t V, Py_ssize_t C,
                              Py_ssize_t c0, Py_ssize_t width) noexcept nogil:
    # Differentiates out[n] = wte[idx[n]] + ...: dwte[v] += sum of dout[n] over positions n with
    # idx[n] == v. The sum is formed first and added once, so that two backward calls give
    # exactly twice the gradient.
    cdef float acc[COL_BLOCK]
    cdef const float* src
    cdef float* dst
    cdef Py_ssize_t v, k, c
    for v in range(V):
        if start[v] == start[v + 1]:
            continue
        for c in range(width):
            acc[c] = 0.0
        for k in range(start[v], start[v + 1]):
            src = dout + order[k] * C + c0
            for c in range(width):
                acc[c] += src[c]
        dst = dwte + v * C + c0
        for c in range(width):
            dst[c] += acc[c]


cdef inline void dwpe_row(float* dwpe_t, const float* dout_t, Py_ssize_t B, Py_ssize_t T,
                          Py_ssize_t C) noexcept nogil:
    # Differentiates out[b, t] = ... + wpe[t]: dwpe[t] += sum over b of dout[b, t], summed in b
    # order in a block of columns at a time and added once.
    cdef float acc[COL_BLOCK]
    cdef Py_ssize_t b, c, c0, width, blk
    for blk in range((C + COL_BLOCK - 1) // COL_BLOCK):
        c0 = blk * COL_BLOCK
        width = min(COL_BLOCK, C - c0)
        for c in range(width):
            acc[c] = 0.0
        for b in range(B):
            for c in range(width):
                acc[c] += dout_t[b * T * C + c0 + c]
        for c in range(width):
            dwpe_t[c0 + c] += acc[c]


cdef void embedding_backward_blocks(float* dwte, float* dwpe, const float* dout,
                                    const Py_ssize_t* start, const Py_ssize_t* order,
                                    Py_ssize_t B, Py_ssize_t T, Py_ssize_t C, Py_ssize_t V,
                                    int n_threads) noexcept nogil:
    cdef Py_ssize_t blk, t, c0
    cdef Py_ssize_t n_blocks = (C + COL_BLOCK - 1) // COL_BLOCK
    for blk in prange(n_blocks, schedule="static", num_threads=n_threads):
        c0 = blk * COL_BLOCK
        dwte_columns(dwte, dout, start, order, V, C, c0, min(COL_BLOCK, C - c0))
    for t in prange(T, schedule="static", num_threads=n_threads):
        dwpe_row(dwpe + t * C, dout + t * C, B, T, C)


cdef void group_by_token(Py_ssize_t* start, Py_ssize_t* order, const int* idx, Py_ssize_t N,
                         Py_ssize_t V) noexcept nogil:
    # A stable counting sort: order[start[v]:start[v+1]] lists the positions holding token v,
    # in increasing position order. It lets each dwte task visit only the rows that exist.
    cdef Py_ssize_t v, n
    for v in range(V + 1):
        start[v] = 0
    for n in range(N):
        start[idx[n] + 1] += 1
    for v in range(V):
        start[v + 1] += start[v]
    for n in range(N):
        v = idx[n]
        order[start[v]] = n
        start[v] += 1
    # Each start[v] now holds the end of token v's group; shift back by one token.
    for v in range(V, 0, -1):
        start[v] = start[v - 1]
    start[0] = 0


# ---- checks done once per call, before any kernel runs (shared ones in _checks.pyx) ----------

cdef object F32 = np.dtype(np.float32)
cdef object I32 = np.dtype(np.int32)


def _check_tables(idx, tok_name, wte, pos_name, wpe):
    """idx and the two tables (or their gradients, which have the same shapes); returns
    B, T, V, C."""
    check_array(tok_name, wte, F32, 2)
    check_array(pos_name, wpe, F32, 2)
    check_array("idx", idx, I32, 2)
    B, T = idx.shape
    V, C = wte.shape
    if B < 1 or T < 1:
        raise ValueError(f"idx must have at least one row and one column, got shape {idx.shape}")
    if wpe.shape[1] != C:
        raise ValueError(f"{pos_name} shape {wpe.shape} does not match {tok_name} shape "
                         f"{wte.shape}: both need C = {C} columns")
    if wpe.shape[0] < T:
        raise ValueError(f"{pos_name} has {wpe.shape[0]} rows (shape {wpe.shape}) but idx has "
                         f"T = {T} positions (shape {idx.shape})")
    cdef const int[:, ::1] ix = idx
    cdef Py_ssize_t n_rows = V
    cdef Py_ssize_t bad
    with nogil:
        bad = first_out_of_range(&ix[0, 0], ix.shape[0] * ix.shape[1], n_rows)
    if bad >= 0:
        raise out_of_range_error("idx", idx, bad, n_rows, f"{tok_name} has {V} rows")
    return B, T, V, C


# ---- public kernels ---------------------------------------------------------------------------

def embedding_forward(out, idx, wte, wpe, n_threads):
    """Token plus position embedding.

    out : (B, T, C) float32  written, = wte[idx] + wpe[:T]
    idx : (B, T)    int32    read, each in [0, V)
    wte : (V, C)    float32  read
    wpe : (>= T, C) float32  read (rows past T are unused)
    """
    cdef int nt = check_n_threads(n_threads)
    B, T, V, C = _check_tables(idx, "wte", wte, "wpe", wpe)
    check_output("out", out, F32, (B, T, C), "(B, T, C) from idx and wte")
    check_disjoint((("out", out),), (("idx", idx), ("wte", wte), ("wpe", wpe)))
    if C == 0:
        return
    cdef float[:, :, ::1] o = out
    cdef const int[:, ::1] ix = idx
    cdef const float[:, ::1] te = wte
    cdef const float[:, ::1] pe = wpe
    with nogil:
        embedding_forward_rows(&o[0, 0, 0], &ix[0, 0], &te[0, 0], &pe[0, 0],
                               ix.shape[0] * ix.shape[1], ix.shape[1], te.shape[1], nt)


def embedding_backward(dwte, dwpe, dout, idx, n_threads):
    """Gradients of the token and position tables.

    dwte : (V, C)    float32  accumulated, += sum of dout[b, t] over (b, t) with idx[b, t] == v
    dwpe : (>= T, C) float32  accumulated in rows [0, T), += dout.sum(axis=0)
    dout : (B, T, C) float32  read
    idx  : (B, T)    int32    read, each in [0, V)
    Deterministic: bit-identical for every n_threads.
    """
    cdef int nt = check_n_threads(n_threads)
    B, T, V, C = _check_tables(idx, "dwte", dwte, "dwpe", dwpe)
    check_input("dout", dout, F32, (B, T, C), "(B, T, C) from idx and dwte")
    check_writeable("dwte", dwte)
    check_writeable("dwpe", dwpe)
    check_disjoint((("dwte", dwte), ("dwpe", dwpe)), (("dout", dout), ("idx", idx)))
    if C == 0:
        return  # nothing to add to; the grouping below would need O(V) memory for it
    # O(N + V) bookkeeping for the token grouping, allocated here rather than in the kernel.
    start = np.empty(V + 1, dtype=np.intp)
    order = np.empty(B * T, dtype=np.intp)
    cdef Py_ssize_t[::1] st = start
    cdef Py_ssize_t[::1] od = order
    cdef float[:, ::1] gte = dwte
    cdef float[:, ::1] gpe = dwpe
    cdef const float[:, :, ::1] go = dout
    cdef const int[:, ::1] ix = idx
    with nogil:
        group_by_token(&st[0], &od[0], &ix[0, 0], go.shape[0] * go.shape[1], gte.shape[0])
        embedding_backward_blocks(&gte[0, 0], &gpe[0, 0], &go[0, 0, 0], &st[0], &od[0],
                                  go.shape[0], go.shape[1], go.shape[2], gte.shape[0], nt)
