# cython: language_level=3
"""Linear layers without bias and a general GEMM, on our own blocked kernel (no BLAS).

    matmul_forward         out (N, OC) = x (N, IC) . w (OC, IC)^T          (NT)
    matmul_backward        dx (N, IC) += dout . w                           (NN)
                           dw (OC, IC) += dout^T . x                        (TN)
    matmul_sqrelu_forward  pre = x . w^T, out = relu(pre)^2 in the write-back
    gemm                   c (M, N) (+)= op(a) . op(b)

Dimension letters: N = B*T rows, IC/OC input/output channels; M, N, K for gemm.

Structure (GotoBLAS/BLIS): the output is split into parts along whichever of M or N has
more register tiles, one part per thread, in contiguous ranges of whole tiles (the weight
grads have M = 256 or 67 but N up to 1024). Each part is a plain serial GEMM: for each
K block of RG_KC, pack that block of op(B) into NR-wide strips; for each MC rows of op(A),
pack them into MR-tall strips, then run the microkernel over every (NR strip, MR strip).
Packing absorbs all transposes, so NT, NN and TN share one microkernel (gemm_kernels.h,
chosen per CPU at run time).

K is never split between threads, and the microkernel sums each output element as one
FMA chain in k order, continued across K blocks; so every element is computed the same
way whatever the thread count or part boundaries: results are bit-identical for any
n_threads (and identical between the avx2 and avx512 paths; sse2 has no FMA).
"""
import numpy as np

cimport cython
from cython.parallel cimport prange
from libc.stdlib cimport free


__all__ = ["matmul_forward", "matmul_backward", "gemm", "matmul_sqrelu_forward",
           "available_isas", "get_isa", "set_isa"]


cdef extern from "gemm_kernels.h" nogil:
    ctypedef void (*rg_kernel_fn)(Py_ssize_t kc, const float *ap, const float *bp,
                                  const float *init, Py_ssize_t ld_init,
                                  float *dst, Py_ssize_t ld_dst, int add_dst, float *c2,
                                  int mr, int nr) noexcept nogil
    ctypedef void (*rg_pack_fn)(float *dst, const float *src, Py_ssize_t rs, Py_ssize_t cs,
                                Py_ssize_t rows, Py_ssize_t cols) noexcept nogil
    ctypedef struct rg_isa_t:
        const char *name
        int mr
        int nr
        int mc
        rg_kernel_fn kernel
        rg_kernel_fn kernel_narrow
        rg_pack_fn pack_a
        rg_pack_fn pack_b
    int RG_KC
    int rg_isa_count()
    const rg_isa_t *rg_isa_at(int i)
    int rg_isa_supported(int i)
    float *rg_alloc_floats(size_t n, void **base)


# The microkernel set every GEMM uses; set_isa() is the only writer. Process-wide by nature
# (it names the CPU's instruction set), chosen once at import by randygpt._kernels.select_isa.
cdef const rg_isa_t *_isa = NULL


def available_isas():
    """Names of the GEMM paths this CPU runs, fastest first (e.g. ["avx512", "avx2", "sse2"])."""
    return [rg_isa_at(i).name.decode() for i in range(rg_isa_count()) if rg_isa_supported(i)]


def get_isa():
    """Name of the GEMM path in use."""
    return _isa.name.decode()


def set_isa(name):
    """Use the GEMM path `name` (one of available_isas()) from now on."""
    global _isa
    choices = available_isas()
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"set_isa: isa must be one of {choices} on this CPU, got {name!r}")
    for i in range(rg_isa_count()):
        if rg_isa_at(i).name.decode() == name:
            _isa = rg_isa_at(i)


set_isa(available_isas()[0])


# ---------------------------------------------------------------------------------------
# The nogil GEMM body.

cdef struct _Operand:
    # op(X)[i, j] is at ptr[i * rs + j * cs]
    const float *ptr
    Py_ssize_t rs
    Py_ssize_t cs


cdef void _gemm_part(const rg_isa_t *isa, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                     _Operand a, _Operand b, float *c, Py_ssize_t ldc, float *c2,
                     bint accumulate, float *partial, Py_ssize_t ld_partial,
                     float *abuf, float *bbuf) noexcept nogil:
    """Serial c (M, N) (+)= op(a) (M, K) . op(b) (K, N); c2 = relu(c)^2 when given.

    With accumulate and K > RG_KC, the running sums of the earlier K blocks go to
    `partial` (M x N, leading dimension ld_partial) instead of c, and the last block adds
    the finished product to c in one rounding: accumulating the same product twice then
    gives exactly twice it. In overwrite mode the running sums live in c itself, which is
    therefore never read before it has been written.
    """
    cdef int mr = isa.mr, nr = isa.nr, mc_max = isa.mc
    cdef Py_ssize_t pc, kc, ic, mc, jr, ir, i
    cdef bint first, last
    cdef const float *init
    cdef float *dst
    cdef float *c2_tile
    cdef Py_ssize_t ld_init, ld_dst
    cdef int add_dst, tile_n
    cdef rg_kernel_fn kernel
    cdef Py_ssize_t kb, mb, jt, it
    for kb in range((K + RG_KC - 1) // RG_KC):
        pc = kb * RG_KC
        kc = min(<Py_ssize_t>RG_KC, K - pc)
        first = pc == 0
        last = pc + kc >= K
        isa.pack_b(bbuf, b.ptr + pc * b.rs, b.rs, b.cs, kc, N)
        for mb in range((M + mc_max - 1) // mc_max):
            ic = mb * mc_max
            mc = min(<Py_ssize_t>mc_max, M - ic)
            isa.pack_a(abuf, a.ptr + ic * a.rs + pc * a.cs, a.rs, a.cs, mc, kc)
            for jt in range((N + nr - 1) // nr):
                jr = jt * nr
                for it in range((mc + mr - 1) // mr):
                    ir = it * mr
                    i = ic + ir
                    add_dst = 0
                    c2_tile = NULL
                    if accumulate and not last:
                        dst = partial + i * ld_partial + jr
                        ld_dst = ld_partial
                        init = NULL if first else dst
                        ld_init = ld_partial
                    else:
                        dst = c + i * ldc + jr
                        ld_dst = ldc
                        if accumulate:
                            add_dst = 1
                            init = NULL if first else partial + i * ld_partial + jr
                            ld_init = ld_partial
                        else:
                            init = NULL if first else dst
                            ld_init = ldc
                        if c2 != NULL:
                            c2_tile = c2 + i * ldc + jr
                    tile_n = <int>min(<Py_ssize_t>nr, N - jr)
                    kernel = isa.kernel_narrow if 2 * tile_n <= nr else isa.kernel
                    kernel(kc, abuf + ir * kc, bbuf + jr * kc, init, ld_init,
                           dst, ld_dst, add_dst, c2_tile,
                           <int>min(<Py_ssize_t>mr, mc - ir), tile_n)


cdef int _gemm(const rg_isa_t *isa, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
               _Operand a, _Operand b, float *c, Py_ssize_t ldc, float *c2,
               bint accumulate, int n_threads) noexcept nogil:
    """c (M, N) (+)= op(a) . op(b) on up to n_threads threads. Returns -1 if out of memory."""
    cdef Py_ssize_t i, j, p, lo, hi
    cdef Py_ssize_t m_tiles, n_tiles, tiles, nparts, part_tiles, a_stride, b_stride
    cdef bint split_m
    cdef void *base = NULL
    cdef void *partial_base = NULL
    cdef float *work
    cdef float *partial = NULL
    cdef _Operand ap, bp
    if M == 0 or N == 0:
        return 0
    if K == 0:
        if not accumulate:
            for i in range(M):
                for j in range(N):
                    c[i * ldc + j] = 0.0
                    if c2 != NULL:
                        c2[i * ldc + j] = 0.0
        return 0
    m_tiles = (M + isa.mr - 1) // isa.mr
    n_tiles = (N + isa.nr - 1) // isa.nr
    split_m = m_tiles >= n_tiles
    tiles = m_tiles if split_m else n_tiles
    nparts = min(<Py_ssize_t>n_threads, tiles)
    part_tiles = (tiles + nparts - 1) // nparts
    # Per-part packing buffers, each a multiple of 16 floats so every slice stays 64-byte aligned.
    a_stride = (<Py_ssize_t>isa.mc * RG_KC + 15) // 16 * 16
    if split_m:
        b_stride = n_tiles * isa.nr * RG_KC
    else:
        b_stride = part_tiles * isa.nr * RG_KC
    b_stride = (b_stride + 15) // 16 * 16
    work = rg_alloc_floats(<size_t>(nparts * (a_stride + b_stride)), &base)
    if work == NULL:
        return -1
    if accumulate and K > RG_KC:
        partial = rg_alloc_floats(<size_t>(M * N), &partial_base)
        if partial == NULL:
            free(base)
            return -1
    if nparts == 1:
        _gemm_part(isa, M, N, K, a, b, c, ldc, c2, accumulate, partial, N,
                   work, work + a_stride)
    else:
        for p in prange(nparts, schedule="static", chunksize=1, num_threads=n_threads):
            lo = p * tiles // nparts
            hi = (p + 1) * tiles // nparts
            ap = a
            bp = b
            if split_m:
                lo = lo * isa.mr
                hi = min(hi * isa.mr, M)
                ap.ptr = a.ptr + lo * a.rs
                _gemm_part(isa, hi - lo, N, K, ap, bp, c + lo * ldc, ldc,
                           NULL if c2 == NULL else c2 + lo * ldc, accumulate,
                           NULL if partial == NULL else partial + lo * N, N,
                           work + p * (a_stride + b_stride),
                           work + p * (a_stride + b_stride) + a_stride)
            else:
                lo = lo * isa.nr
                hi = min(hi * isa.nr, N)
                bp.ptr = b.ptr + lo * b.cs
                _gemm_part(isa, M, hi - lo, K, ap, bp, c + lo, ldc,
                           NULL if c2 == NULL else c2 + lo, accumulate,
                           NULL if partial == NULL else partial + lo, N,
                           work + p * (a_stride + b_stride),
                           work + p * (a_stride + b_stride) + a_stride)
    free(partial_base)
    free(base)
    return 0


# ---------------------------------------------------------------------------------------
# Python wrappers: every check happens here, before the GIL is released.

cdef _check_matrix(str func, str name, arr):
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{func}: {name} must be a numpy.ndarray, got {type(arr).__name__}")
    if arr.dtype != np.float32:
        raise TypeError(f"{func}: {name} must be float32, got {arr.dtype} with shape {arr.shape}")
    if arr.ndim != 2:
        raise ValueError(f"{func}: {name} must be 2-D, got shape {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{func}: {name} must be C-contiguous (shape {arr.shape})")


cdef _check_output(str func, str name, arr):
    _check_matrix(func, name, arr)
    if not arr.flags.writeable:
        raise ValueError(f"{func}: {name} must be writeable (shape {arr.shape})")


cdef _check_shape(str func, str name, arr, tuple expected, str shapes):
    if arr.shape != expected:
        raise ValueError(f"{func}: {name} has shape {arr.shape}, expected {expected} ({shapes})")


cdef _check_no_alias(str func, dict outputs, dict inputs):
    names = list(outputs)
    for i, oname in enumerate(names):
        for other in names[i + 1:]:
            if np.shares_memory(outputs[oname], outputs[other]):
                raise ValueError(f"{func}: outputs {oname} and {other} share memory")
        for iname, arr in inputs.items():
            if np.shares_memory(outputs[oname], arr):
                raise ValueError(f"{func}: output {oname} {outputs[oname].shape} shares memory "
                                 f"with input {iname} {arr.shape}")


cdef int _check_threads(str func, n_threads) except -1:
    if isinstance(n_threads, bool) or not isinstance(n_threads, (int, np.integer)):
        raise TypeError(f"{func}: n_threads must be an int, got {type(n_threads).__name__}")
    if n_threads < 1:
        raise ValueError(f"{func}: n_threads must be >= 1, got {n_threads}")
    # Without OpenMP prange runs serially anyway; cap so a huge request cannot overflow int.
    return <int>min(int(n_threads), 1 << 16)


cdef inline _Operand _operand(const float[:, ::1] arr, bint transposed):
    """op(arr) as (pointer, row stride, column stride)."""
    cdef _Operand op
    op.ptr = &arr[0, 0] if arr.shape[0] > 0 and arr.shape[1] > 0 else NULL
    if transposed:
        op.rs = 1
        op.cs = arr.shape[1]
    else:
        op.rs = arr.shape[1]
        op.cs = 1
    return op


cdef _run_gemm(str func, float[:, ::1] c, float[:, ::1] c2, _Operand a, _Operand b,
               Py_ssize_t K, bint accumulate, int n_threads):
    cdef Py_ssize_t M = c.shape[0], N = c.shape[1]
    cdef float *cp = &c[0, 0] if M > 0 and N > 0 else NULL
    cdef float *c2p = NULL
    cdef int rc
    if c2 is not None and M > 0 and N > 0:
        c2p = &c2[0, 0]
    with nogil:
        rc = _gemm(_isa, M, N, K, a, b, cp, N, c2p, accumulate, n_threads)
    if rc != 0:
        raise MemoryError(f"{func}: could not allocate GEMM packing buffers for {M}x{K}x{N}")


def matmul_forward(out, x, w, n_threads, accumulate=False):
    """Linear layer without bias: out = x . w^T.
    out : (N, OC)  float32  written (accumulated when accumulate=True)
    x   : (N, IC)  float32  read
    w   : (OC, IC) float32  read
    """
    func = "matmul_forward"
    for name, arr in (("out", out), ("x", x), ("w", w)):
        _check_matrix(func, name, arr)
    _check_output(func, "out", out)
    shapes = f"out {out.shape}, x {x.shape}, w {w.shape}"
    N, IC = x.shape
    OC = w.shape[0]
    _check_shape(func, "w", w, (OC, IC), shapes)
    _check_shape(func, "out", out, (N, OC), shapes)
    _check_no_alias(func, {"out": out}, {"x": x, "w": w})
    nt = _check_threads(func, n_threads)
    _run_gemm(func, out, None, _operand(x, False), _operand(w, True), IC, bool(accumulate), nt)


def matmul_backward(dx, dw, dout, x, w, n_threads):
    """Gradients of out = x . w^T, accumulated; pass None to skip one.
    dx   : (N, IC)  float32  accumulated += dout . w
    dw   : (OC, IC) float32  accumulated += dout^T . x
    dout : (N, OC)  float32  read
    x    : (N, IC)  float32  read
    w    : (OC, IC) float32  read
    """
    func = "matmul_backward"
    for name, arr in (("dout", dout), ("x", x), ("w", w)):
        _check_matrix(func, name, arr)
    outputs = {}
    if dx is not None:
        _check_output(func, "dx", dx)
        outputs["dx"] = dx
    if dw is not None:
        _check_output(func, "dw", dw)
        outputs["dw"] = dw
    shapes = (f"dx {None if dx is None else dx.shape}, dw {None if dw is None else dw.shape}, "
              f"dout {dout.shape}, x {x.shape}, w {w.shape}")
    N, IC = x.shape
    OC = w.shape[0]
    _check_shape(func, "w", w, (OC, IC), shapes)
    _check_shape(func, "dout", dout, (N, OC), shapes)
    if dx is not None:
        _check_shape(func, "dx", dx, (N, IC), shapes)
    if dw is not None:
        _check_shape(func, "dw", dw, (OC, IC), shapes)
    _check_no_alias(func, outputs, {"dout": dout, "x": x, "w": w})
    nt = _check_threads(func, n_threads)
    # d(x . w^T)/dx: dx = dout (N, OC) . w (OC, IC)
    if dx is not None:
        _run_gemm(func, dx, None, _operand(dout, False), _operand(w, False), OC, True, nt)
    # d(x . w^T)/dw: dw = dout^T (OC, N) . x (N, IC)
    if dw is not None:
        _run_gemm(func, dw, None, _operand(dout, True), _operand(x, False), N, True, nt)


def gemm(c, a, b, trans_a, trans_b, accumulate, n_threads):
    """General matrix product c (+)= op(a) . op(b), op(X) = X^T when its flag is set.
    c : (M, N) float32  written (accumulated when accumulate)
    a : (M, K), or (K, M) with trans_a   float32  read
    b : (K, N), or (N, K) with trans_b   float32  read
    """
    func = "gemm"
    for name, arr in (("c", c), ("a", a), ("b", b)):
        _check_matrix(func, name, arr)
    _check_output(func, "c", c)
    ta, tb = bool(trans_a), bool(trans_b)
    M, K = (a.shape[1], a.shape[0]) if ta else a.shape
    Kb, N = (b.shape[1], b.shape[0]) if tb else b.shape
    shapes = f"c {c.shape}, a {a.shape} trans_a={ta}, b {b.shape} trans_b={tb}"
    if Kb != K:
        raise ValueError(f"gemm: inner dimensions differ: op(a) is {M}x{K}, op(b) is {Kb}x{N} ({shapes})")
    _check_shape(func, "c", c, (M, N), shapes)
    _check_no_alias(func, {"c": c}, {"a": a, "b": b})
    nt = _check_threads(func, n_threads)
    _run_gemm(func, c, None, _operand(a, ta), _operand(b, tb), K, bool(accumulate), nt)


def matmul_sqrelu_forward(out, pre, x, w, n_threads):
    """Linear layer followed by squared ReLU, fused in the GEMM's write-back.
    out : (N, OC)  float32  written = relu(pre)^2
    pre : (N, OC)  float32  written = x . w^T, saved for the squared-ReLU backward
    x   : (N, IC)  float32  read
    w   : (OC, IC) float32  read
    """
    func = "matmul_sqrelu_forward"
    for name, arr in (("out", out), ("pre", pre), ("x", x), ("w", w)):
        _check_matrix(func, name, arr)
    _check_output(func, "out", out)
    _check_output(func, "pre", pre)
    shapes = f"out {out.shape}, pre {pre.shape}, x {x.shape}, w {w.shape}"
    N, IC = x.shape
    OC = w.shape[0]
    _check_shape(func, "w", w, (OC, IC), shapes)
    _check_shape(func, "pre", pre, (N, OC), shapes)
    _check_shape(func, "out", out, (N, OC), shapes)
    _check_no_alias(func, {"out": out, "pre": pre}, {"x": x, "w": w})
    nt = _check_threads(func, n_threads)
    _run_gemm(func, pre, out, _operand(x, False), _operand(w, True), IC, False, nt)
