# cython: language_level=3
"""Linear layers without bias and a general GEMM, on our own blocked kernel (no BLAS).

    matmul_forward         out (N, OC) = x (N, IC) . w (OC, IC)^T          (NT)
    matmul_backward        dx (N, IC) += dout . w                           (NN)
                           dw (OC, IC) += dout^T . x                        (TN)
    matmul_sqrelu_forward  pre = x . w^T, out = relu(pre)^2 in the write-back
    matmul_sqrelu_backward gradients of out = relu(pre)^2 . w^T from pre alone:
                           dw += dout^T . relu(pre)^2 (squared while packing), and
                           dpre = (dout . w) * 2 relu(pre) (in the write-back)
    gemm                   c (M, N) (+)= op(a) . op(b)

Dimension letters: N = B*T rows, IC/OC input/output channels; M, N, K for gemm.

Structure (GotoBLAS/BLIS): op(a) is packed into MR-tall strips and op(b) into NR-wide
strips (k-major, zero-padded at the edges), one K block at a time, and the
register-tile microkernel runs over the tiles. Packing absorbs every transpose, so NT, NN
and TN share one microkernel (gemm_kernels.h, compiled per ISA and chosen at run time).
The tiles are handed out as work items: near-equal ranges of strips along whichever of M
or N has more tiles (rows for the forward and the input grads, N = 2048; columns for
weight grads with few output channels, M = 256 or 67), a few per thread, taken
dynamically so that a thread which loses its core on a shared machine leaves its
remaining items to the others. The operand that is not split is packed once per K block
by all threads together; each item packs its own strips of the other one.

K is never split between threads, and the microkernel sums each output element as one
FMA chain in k order, continued across K blocks; so every element is computed the same
way whatever the thread count or which thread ran it: results are bit-identical for any
n_threads (and identical between the avx2 and avx512 paths; sse2 has no FMA).
"""
import numpy as np

from cython.parallel cimport parallel, prange
from libc.stdlib cimport free, malloc

from randygpt._kernels._checks cimport (check_array, check_disjoint, check_input,
                                       check_n_threads, check_output, memory_error)
from randygpt._kernels._omp cimport omp_get_thread_num


__all__ = ["matmul_forward", "matmul_backward", "gemm", "matmul_sqrelu_forward",
           "matmul_sqrelu_backward", "available_isas", "get_isa", "set_isa",
           "PRECISIONS", "available_bf16_isas", "get_bf16_isa", "set_bf16_isa", "bf16_native"]


cdef extern from "gemm_kernels.h" nogil:
    ctypedef void (*rg_kernel_fn)(Py_ssize_t kc, const float *ap, const float *bp,
                                  const float *init, Py_ssize_t ld_init,
                                  float *dst, Py_ssize_t ld_dst, int add_dst, float *c2,
                                  const float *gate, int mr, int nr) noexcept nogil
    ctypedef void (*rg_pack_fn)(float *dst, const float *src, Py_ssize_t rs, Py_ssize_t cs,
                                Py_ssize_t rows, Py_ssize_t cols) noexcept nogil
    ctypedef void (*rg_inplace_fn)(float *p, Py_ssize_t n) noexcept nogil
    ctypedef void (*rg_thread_fn)() noexcept nogil
    ctypedef struct rg_isa_t:
        const char *name
        int mr
        int nr
        int mc
        rg_kernel_fn kernel
        rg_kernel_fn kernel_narrow
        rg_pack_fn pack_a
        rg_pack_fn pack_b
        rg_inplace_fn sqrelu_inplace
        rg_pack_fn pack_b_sqrelu
        rg_pack_fn pack_a_sqrelu
        int kc_max
        rg_thread_fn begin
        rg_thread_fn end
    int RG_KC
    int rg_isa_count()
    const rg_isa_t *rg_isa_at(int i)
    int rg_isa_supported(int i)
    void rg_barrier()
    int rg_bf16_isa_count()
    const rg_isa_t *rg_bf16_isa_at(int i)
    int rg_bf16_isa_supported(int i)
    int rg_bf16_tile_mismatch()


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
    """Use the GEMM path `name` (one of available_isas()) from now on, and the bf16 path that
    goes with it: under "avx512", AMX tiles where the CPU and OS allow them, else vdpbf16ps
    where the CPU has AVX512_BF16; elsewhere the emulation on the same tile."""
    global _isa
    choices = available_isas()
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"set_isa: isa must be one of {choices} on this CPU, got {name!r}")
    for i in range(rg_isa_count()):
        if rg_isa_at(i).name.decode() == name:
            _isa = rg_isa_at(i)
    bf16 = available_bf16_isas()
    native = [n for n in ("amx", "avx512bf16") if n in bf16]
    set_bf16_isa(native[0] if name == "avx512" and native else name)


# ---------------------------------------------------------------------------------------
# bf16 paths (gemm_bf16.h): operands rounded to bf16 as they are packed, fp32 sums. Chosen
# with the fp32 path (set_isa); set_bf16_isa alone picks the emulation where the native
# path runs, to compare the two.

PRECISIONS = ("fp32", "bf16")

cdef const rg_isa_t *_isa_bf16 = NULL


def available_bf16_isas():
    """Names of the bf16 GEMM paths this CPU runs, fastest first: "amx" (tdpbf16ps tiles)
    where it has AMX-BF16 and Linux grants the tile state, "avx512bf16" (vdpbf16ps) where it
    has AVX512_BF16, then the emulations on the fp32 paths' tiles."""
    return [rg_bf16_isa_at(i).name.decode() for i in range(rg_bf16_isa_count())
            if rg_bf16_isa_supported(i)]


def get_bf16_isa():
    """Name of the bf16 GEMM path in use."""
    return _isa_bf16.name.decode()


def set_bf16_isa(name):
    """Use the bf16 GEMM path `name` (one of available_bf16_isas()) from now on."""
    global _isa_bf16
    choices = available_bf16_isas()
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"set_bf16_isa: isa must be one of {choices} on this CPU, got "
                         f"{name!r}")
    for i in range(rg_bf16_isa_count()):
        if rg_bf16_isa_at(i).name.decode() == name:
            _isa_bf16 = rg_bf16_isa_at(i)


def bf16_native():
    """True when bf16 products run on bf16 hardware (AMX or vdpbf16ps); False when they are
    emulated with fp32 multiply-adds (vdpbf16ps's results, at fp32 speed)."""
    return get_bf16_isa() in ("amx", "avx512bf16")


cdef bint _bf16(str func, precision) except -1:
    """Whether precision (one of PRECISIONS) asks for bf16 operands."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"{func}: precision must be one of {PRECISIONS}, got {precision!r}")
    return precision == "bf16"


if rg_bf16_tile_mismatch() >= 0:
    # The bf16 kernels hand their sums to the fp32 kernel of the same tile for the write-back.
    raise ImportError(f"gemm_bf16.h: the {rg_bf16_isa_at(rg_bf16_tile_mismatch()).name.decode()} "
                      "bf16 tile differs from its fp32 path's in gemm_kernels.h; make them agree")
set_isa(available_isas()[0])


# ---------------------------------------------------------------------------------------
# The nogil GEMM body.

# Work items per thread in the tile phase. Items are near-equal contiguous ranges of
# strips taken dynamically: on an idle machine every thread gets the same share; on a
# shared one a thread that lost its core hands its remaining items to the others.
# Fewer, larger items re-read the shared operand less often (1 or 2 per thread measured
# slower than 4 at 8 and 16 threads). Results do not depend on it.
cdef enum:
    _ITEMS_PER_THREAD = 4


cdef struct _Operand:
    # op(X)[i, j] is at ptr[i * rs + j * cs]
    const float *ptr
    Py_ssize_t rs
    Py_ssize_t cs


cdef struct _Gemm:
    # One call's problem, its packing buffers and where each tile's sums go.
    const rg_isa_t *isa
    Py_ssize_t M, N, K
    _Operand a, b
    float *c            # (M, N), leading dimension ldc
    float *c2           # relu(c)^2 written in the last K block, or NULL
    const float *gate   # c = 2 relu(gate) * product in the last K block, or NULL
    Py_ssize_t ldc
    bint b_sqrelu       # op(b) is relu(b)^2, applied as its strips are packed
    bint a_sqrelu       # op(a) is relu(a)^2, likewise
    bint accumulate
    float *partial      # (M, N) running sums when accumulating over several K blocks
    Py_ssize_t m_tiles, n_tiles, n_items
    bint split_m        # items are ranges of MR strips (else of NR strips)
    # The operand that is not split is packed once per K block for every item ("shared":
    # op(b) when splitting rows, op(a) when splitting columns), into one of two buffers of
    # shared_size floats. Each item packs its own strips of the split operand into its
    # thread's private_size-float buffer, where they stay hot in that core's L2.
    float *shared
    Py_ssize_t shared_size
    float *private
    Py_ssize_t private_size
    Py_ssize_t kc, n_kblocks, shared_tiles  # K block length (see _plan_k_blocks), count
    Py_ssize_t chunk    # MR strips of op(a) per packed block when splitting rows
    Py_ssize_t buffer_size   # floats for shared (one or two blocks) and every private one
    Py_ssize_t partial_size  # floats for partial: M * N, or 0 when it is not needed


cdef inline float *_shared_block(const _Gemm *g, Py_ssize_t kb) noexcept nogil:
    # K blocks alternate between two buffers, so packing block kb + 1 needs no barrier
    # after the tiles of block kb: they read the other buffer.
    return g.shared + (kb % 2) * g.shared_size


cdef inline void _pack_a_strips(const _Gemm *g, float *dst, Py_ssize_t it_lo, Py_ssize_t it_hi,
                                Py_ssize_t pc, Py_ssize_t kc) noexcept nogil:
    """MR strips it_lo..it_hi of op(a)[:, pc:pc+kc], strip it at dst + (it - it_lo) * MR * kc."""
    cdef Py_ssize_t i = it_lo * g.isa.mr
    if g.a_sqrelu and g.isa.pack_a_sqrelu != NULL:
        # bf16: squared before it is rounded
        g.isa.pack_a_sqrelu(dst, g.a.ptr + i * g.a.rs + pc * g.a.cs, g.a.rs, g.a.cs,
                            min(it_hi * g.isa.mr, g.M) - i, kc)
        return
    g.isa.pack_a(dst, g.a.ptr + i * g.a.rs + pc * g.a.cs, g.a.rs, g.a.cs,
                 min(it_hi * g.isa.mr, g.M) - i, kc)
    if g.a_sqrelu:
        # The zero padding stays zero.
        g.isa.sqrelu_inplace(dst, (it_hi - it_lo) * g.isa.mr * kc)


cdef inline void _pack_b_strips(const _Gemm *g, float *dst, Py_ssize_t jt_lo, Py_ssize_t jt_hi,
                                Py_ssize_t pc, Py_ssize_t kc) noexcept nogil:
    """NR strips jt_lo..jt_hi of op(b)[pc:pc+kc, :], strip jt at dst + (jt - jt_lo) * NR * kc."""
    cdef Py_ssize_t j = jt_lo * g.isa.nr
    if g.b_sqrelu and g.isa.pack_b_sqrelu != NULL:
        # bf16: squared before it is rounded
        g.isa.pack_b_sqrelu(dst, g.b.ptr + pc * g.b.rs + j * g.b.cs, g.b.rs, g.b.cs,
                            kc, min(jt_hi * g.isa.nr, g.N) - j)
        return
    g.isa.pack_b(dst, g.b.ptr + pc * g.b.rs + j * g.b.cs, g.b.rs, g.b.cs,
                 kc, min(jt_hi * g.isa.nr, g.N) - j)
    if g.b_sqrelu:
        # The zero padding stays zero.
        g.isa.sqrelu_inplace(dst, (jt_hi - jt_lo) * g.isa.nr * kc)


cdef void _pack_shared(const _Gemm *g, Py_ssize_t s, Py_ssize_t kb) noexcept nogil:
    """Strip s of the shared operand for K block kb (edges zero-padded)."""
    cdef Py_ssize_t pc = kb * g.kc, kc = min(g.kc, g.K - pc)
    cdef float *block = _shared_block(g, kb)
    if g.split_m:
        _pack_b_strips(g, block + s * g.isa.nr * kc, s, s + 1, pc, kc)
    else:
        _pack_a_strips(g, block + s * g.isa.mr * kc, s, s + 1, pc, kc)


cdef void _run_item(const _Gemm *g, Py_ssize_t p, Py_ssize_t kb, float *private) noexcept nogil:
    """All tiles of item p for K block kb, using `private` as this thread's pack buffer.

    Rows are walked in chunks of g.chunk strips so that a chunk of packed A stays in L2 while
    every B strip of the item streams past it (BLIS's ic / jr / ir loop order).

    With accumulate and more than one K block, the running sums of the earlier blocks go
    to g.partial instead of c, and the last block adds the finished product to c in one
    rounding: accumulating the same product twice then gives exactly twice it. In
    overwrite mode the running sums live in c itself, which is therefore never read
    before it has been written.
    """
    cdef const rg_isa_t *isa = g.isa
    cdef Py_ssize_t pc = kb * g.kc, kc = min(g.kc, g.K - pc)
    cdef float *shared = _shared_block(g, kb)
    cdef Py_ssize_t tiles = g.m_tiles if g.split_m else g.n_tiles
    cdef Py_ssize_t lo = p * tiles // g.n_items, hi = (p + 1) * tiles // g.n_items
    cdef Py_ssize_t it_lo = 0, it_hi = g.m_tiles, jt_lo = 0, jt_hi = g.n_tiles
    cdef Py_ssize_t chunk = g.chunk
    cdef Py_ssize_t ic, ic_hi, it, jt, i, j, cb
    cdef bint first = pc == 0, last = pc + kc >= g.K
    cdef const float *ap
    cdef const float *bp
    cdef const float *init
    cdef float *dst
    cdef float *c2_tile
    cdef const float *gate_tile
    cdef Py_ssize_t ld_init, ld_dst
    cdef int add_dst, tile_n
    cdef rg_kernel_fn kernel
    if isa.begin != NULL:
        isa.begin()
    if g.split_m:
        it_lo, it_hi = lo, hi
    else:
        jt_lo, jt_hi = lo, hi
        _pack_b_strips(g, private, jt_lo, jt_hi, pc, kc)
    for cb in range((it_hi - it_lo + chunk - 1) // chunk):
        ic = it_lo + cb * chunk
        ic_hi = min(ic + chunk, it_hi)
        if g.split_m:
            _pack_a_strips(g, private, ic, ic_hi, pc, kc)
        for jt in range(jt_lo, jt_hi):
            j = jt * isa.nr
            tile_n = <int>min(<Py_ssize_t>isa.nr, g.N - j)
            kernel = isa.kernel_narrow if 2 * tile_n <= isa.nr else isa.kernel
            if g.split_m:
                bp = shared + j * kc
            else:
                bp = private + (jt - jt_lo) * isa.nr * kc
            for it in range(ic, ic_hi):
                i = it * isa.mr
                if g.split_m:
                    ap = private + (it - ic) * isa.mr * kc
                else:
                    ap = shared + i * kc
                add_dst = 0
                c2_tile = NULL
                gate_tile = NULL
                if g.accumulate and not last:
                    dst = g.partial + i * g.N + j
                    ld_dst = g.N
                    init = NULL if first else dst
                    ld_init = g.N
                else:
                    dst = g.c + i * g.ldc + j
                    ld_dst = g.ldc
                    if g.accumulate:
                        add_dst = 1
                        init = NULL if first else g.partial + i * g.N + j
                        ld_init = g.N
                    else:
                        init = NULL if first else dst
                        ld_init = g.ldc
                    if g.c2 != NULL:
                        c2_tile = g.c2 + i * g.ldc + j
                    if g.gate != NULL and last:
                        # Only once the sums are complete: earlier blocks' partial sums
                        # in c are read back as the next block's init.
                        gate_tile = g.gate + i * g.ldc + j
                kernel(kc, ap, bp, init, ld_init, dst, ld_dst, add_dst, c2_tile, gate_tile,
                       <int>min(<Py_ssize_t>isa.mr, g.M - i), tile_n)
    if isa.end != NULL:
        isa.end()


cdef void _gemm_zero_k(Py_ssize_t M, Py_ssize_t N, float *c, Py_ssize_t ldc, float *c2,
                       const float *gate, bint accumulate) noexcept nogil:
    """c (M, N) (+)= a product with K = 0, which is zero (see _gemm_setup for c2 and gate)."""
    cdef Py_ssize_t i, j
    cdef float r
    if accumulate:
        return
    for i in range(M):
        for j in range(N):
            c[i * ldc + j] = 0.0
            if c2 != NULL:
                c2[i * ldc + j] = 0.0
            if gate != NULL:
                # 2 relu(gate) * 0, as the kernel's write-back would round it
                r = 0.0 if gate[i * ldc + j] <= 0.0 else gate[i * ldc + j]
                c[i * ldc + j] = (r + r) * c[i * ldc + j]


cdef void _plan_k_blocks(_Gemm *g) noexcept nogil:
    """g.kc, g.n_kblocks and g.chunk (after g.split_m): K blocks of RG_KC, or on a path with
    kc_max, up to kc_max long when rows are split and op(a)'s rows run along k (NT, NN),
    as long as the shared block of op(b) stays within 1 MiB; A blocks keep mc x RG_KC floats.

    Longer blocks mean fewer passes of the sums through c and fewer packing calls: on the
    Xeon (2 MiB L2) one block for K = 768-1024 ran those products 7-8% faster, while the
    weight grads (op(a) transposed) ran 1-6% slower with blocks over RG_KC. The sums do not
    depend on the blocks (the kernel continues each FMA chain), so neither do the results.
    """
    cdef const rg_isa_t *isa = g.isa
    cdef Py_ssize_t kc_max = RG_KC, nb
    if isa.kc_max > RG_KC and g.split_m and g.a.cs == 1:
        kc_max = min(<Py_ssize_t>isa.kc_max, 262144 // (g.n_tiles * isa.nr) // 32 * 32)
        kc_max = max(kc_max, <Py_ssize_t>RG_KC)
    g.kc = RG_KC
    if kc_max > RG_KC and g.K > RG_KC:
        # Equal blocks, rounded up to 32 floats (still within kc_max, a multiple of 32):
        # AMX's sums depend on where 16-pair tile steps start (gemm_bf16_amx.h).
        nb = (g.K + kc_max - 1) // kc_max
        g.kc = ((g.K + nb - 1) // nb + 31) // 32 * 32
    g.n_kblocks = (g.K + g.kc - 1) // g.kc
    g.chunk = max(<Py_ssize_t>1, <Py_ssize_t>isa.mc * RG_KC // (g.kc * isa.mr))


cdef int _gemm_setup(_Gemm *g, const rg_isa_t *isa, Py_ssize_t M, Py_ssize_t N, Py_ssize_t K,
                     _Operand a, _Operand b, float *c, Py_ssize_t ldc, float *c2,
                     const float *gate, bint b_sqrelu, bint a_sqrelu, bint accumulate,
                     int n_threads) noexcept nogil:
    """Plans c (M, N) (+)= op(a) . op(b) (M, N, K >= 1) in g and returns the team size: at most
    n_threads, and no more threads than work items. The caller then allocates g.buffer_size
    floats (64-byte aligned) for the packing buffers and, when g.partial_size is not 0, that
    many for the running sums, and runs _gemm_run.

    c2 (relu(c)^2 beside c) and gate (c = 2 relu(gate) * product) share c's leading
    dimension and come only without accumulate; b_sqrelu uses relu(op(b))^2 for op(b),
    a_sqrelu relu(op(a))^2 for op(a).
    """
    cdef Py_ssize_t item_tiles
    g.isa = isa
    g.M, g.N, g.K = M, N, K
    g.a, g.b = a, b
    g.c, g.c2, g.ldc = c, c2, ldc
    g.gate, g.b_sqrelu, g.a_sqrelu = gate, b_sqrelu, a_sqrelu
    g.accumulate = accumulate
    g.m_tiles = (M + isa.mr - 1) // isa.mr
    g.n_tiles = (N + isa.nr - 1) // isa.nr
    # Split whichever dimension has more tiles: rows for the forward and input grads
    # (M = 2048), columns for weight grads with few output channels (M = 256 or 67).
    g.split_m = g.m_tiles >= g.n_tiles
    g.n_items = min(<Py_ssize_t>n_threads * _ITEMS_PER_THREAD,
                    g.m_tiles if g.split_m else g.n_tiles)
    # No more threads than items: a tiny product does not wake a team it cannot use.
    n_threads = <int>min(<Py_ssize_t>n_threads, g.n_items)
    if n_threads == 1:
        g.n_items = 1
    # Buffers rounded to 16 floats so each starts 64-byte aligned; a second shared block
    # only when there is a second K block.
    _plan_k_blocks(g)
    if g.split_m:
        g.shared_tiles = g.n_tiles
        g.shared_size = g.n_tiles * isa.nr * g.kc
        g.private_size = g.chunk * isa.mr * g.kc
    else:
        g.shared_tiles = g.m_tiles
        g.shared_size = g.m_tiles * isa.mr * g.kc
        item_tiles = (g.n_tiles + g.n_items - 1) // g.n_items
        g.private_size = item_tiles * isa.nr * g.kc
    g.shared_size = (g.shared_size + 15) // 16 * 16
    g.private_size = (g.private_size + 15) // 16 * 16
    g.buffer_size = min(g.n_kblocks, <Py_ssize_t>2) * g.shared_size + n_threads * g.private_size
    g.partial_size = M * N if accumulate and g.n_kblocks > 1 else 0
    g.shared = g.private = g.partial = NULL
    return n_threads


cdef void _gemm_run(_Gemm *g, float *buffer, float *partial, int n_threads) noexcept nogil:
    """Runs the product _gemm_setup planned in g (which returned n_threads), with buffer
    (g.buffer_size floats, 64-byte aligned) and partial (g.partial_size floats, or NULL).

    For each K block: pack the shared operand's strips (all threads together), then run
    the tiles in work items.
    """
    cdef Py_ssize_t s, p, kb
    g.shared = buffer
    g.private = buffer + min(g.n_kblocks, <Py_ssize_t>2) * g.shared_size
    g.partial = partial
    kb = 0  # (the parallel block copies it in before each thread sets it)
    if n_threads == 1:
        for kb in range(g.n_kblocks):
            for s in range(g.shared_tiles):
                _pack_shared(g, s, kb)
            _run_item(g, 0, kb, g.private)
    else:
        with parallel(num_threads=n_threads):
            for kb in range(g.n_kblocks):
                for s in prange(g.shared_tiles, schedule="dynamic", chunksize=2):
                    _pack_shared(g, s, kb)
                # One barrier per K block: block kb is fully packed before any of its tiles
                # runs, and (with the alternating buffers) every tile of block kb - 1 is done
                # before block kb's tiles, which continue their sums, start.
                rg_barrier()
                for p in prange(g.n_items, schedule="dynamic", chunksize=1):
                    _run_item(g, p, kb, g.private + omp_get_thread_num() * g.private_size)


# ---------------------------------------------------------------------------------------
# Python wrappers: every check happens here (the shared ones of _checks.pyx), before the
# GIL is released.

cdef object F32 = np.dtype(np.float32)


cdef tuple _linear_dims(str x_name, x, w):
    """(N, IC, OC) of a linear layer's input x (N, IC) and weight w (OC, IC), checked."""
    check_array(x_name, x, F32, 2)
    check_array("w", w, F32, 2)
    N, IC = x.shape
    OC = w.shape[0]
    if w.shape[1] != IC:
        raise ValueError(f"w has shape {w.shape}, expected {(OC, IC)} ({x_name} is {x.shape})")
    return N, IC, OC


cdef tuple _check_linear_grads(str dx_name, dx, dw, dout, str x_name, x, w, n_threads):
    """Checks the arguments of a linear layer's backward (dx (N, IC) and dw (OC, IC), either
    may be None; dout (N, OC), x (N, IC), w (OC, IC)); returns (N, IC, OC, team size)."""
    N, IC, OC = _linear_dims(x_name, x, w)
    shapes = f"{x_name} is {x.shape}, w is {w.shape}"
    check_input("dout", dout, F32, (N, OC), shapes)
    outputs = ()
    if dx is not None:
        check_output(dx_name, dx, F32, (N, IC), shapes)
        outputs += ((dx_name, dx),)
    if dw is not None:
        check_output("dw", dw, F32, (OC, IC), shapes)
        outputs += (("dw", dw),)
    check_disjoint(outputs, (("dout", dout), (x_name, x), ("w", w)))
    return N, IC, OC, check_n_threads(n_threads)


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


cdef inline float *_align64(void *p) noexcept nogil:
    return <float *>((<size_t>p + 63) // 64 * 64)


cdef _run_gemm(str func, float[:, ::1] c, float[:, ::1] c2, _Operand a, _Operand b,
               Py_ssize_t K, bint accumulate, int n_threads,
               const float[:, ::1] gate=None, bint b_sqrelu=False, bint bf16=False,
               bint a_sqrelu=False):
    """c (+)= op(a) . op(b) (see _gemm_setup for c2, gate, b_sqrelu and a_sqrelu), the GIL released
    once its buffers are allocated (MemoryError, saying how much, when they cannot be);
    bf16: on bf16-rounded operands (the bf16 path in use)."""
    cdef Py_ssize_t M = c.shape[0], N = c.shape[1]
    if M == 0 or N == 0:
        return
    cdef float *c2p = &c2[0, 0] if c2 is not None else NULL
    cdef const float *gatep = &gate[0, 0] if gate is not None else NULL
    if K == 0:
        with nogil:
            _gemm_zero_k(M, N, &c[0, 0], N, c2p, gatep, accumulate)
        return
    cdef _Gemm g
    n_threads = _gemm_setup(&g, _isa_bf16 if bf16 else _isa, M, N, K, a, b, &c[0, 0], N,
                            c2p, gatep, b_sqrelu, a_sqrelu,
                            accumulate, n_threads)
    cdef void *base = malloc(<size_t>g.buffer_size * sizeof(float) + 64)
    if base == NULL:
        raise memory_error(func, <object>g.buffer_size * 4 + 64,
                           f"GEMM packing buffers ({M}x{K}x{N}, {n_threads} thread(s))")
    cdef void *partial_base = NULL
    if g.partial_size:
        partial_base = malloc(<size_t>g.partial_size * sizeof(float) + 64)
        if partial_base == NULL:
            free(base)
            raise memory_error(func, <object>g.partial_size * 4 + 64,
                               f"the running sums of a {M}x{N} product summed over K = {K}")
    with nogil:
        _gemm_run(&g, _align64(base), _align64(partial_base) if partial_base else NULL,
                  n_threads)
    free(partial_base)
    free(base)


def matmul_forward(out, x, w, n_threads, accumulate=False, precision="fp32", x_sqrelu=False):
    """Linear layer without bias: out = x . w^T.
    out : (N, OC)  float32  written (accumulated when accumulate=True)
    x   : (N, IC)  float32  read
    w   : (OC, IC) float32  read
    precision : "fp32", or "bf16": the operands rounded to bf16 (nearest even), the products
                summed in fp32 (see available_bf16_isas)
    x_sqrelu  : out = relu(x)^2 . w^T instead, x squared as it is packed (before rounding in
                bf16): a linear layer on a squared ReLU's output, from its input alone. Bit
                for bit squared_relu_forward(act, x) then matmul_forward(out, act, w).
    """
    N, IC, OC = _linear_dims("x", x, w)
    check_output("out", out, F32, (N, OC), f"x is {x.shape}, w is {w.shape}")
    check_disjoint((("out", out),), (("x", x), ("w", w)))
    nt = check_n_threads(n_threads)
    bf16 = _bf16("matmul_forward", precision)
    _run_gemm("matmul_forward", out, None, _operand(x, False), _operand(w, True), IC,
              bool(accumulate), nt, None, False, bf16, bool(x_sqrelu))


def matmul_backward(dx, dw, dout, x, w, n_threads, precision="fp32"):
    """Gradients of out = x . w^T, accumulated; pass None to skip one.
    dx   : (N, IC)  float32  accumulated += dout . w
    dw   : (OC, IC) float32  accumulated += dout^T . x
    dout : (N, OC)  float32  read
    x    : (N, IC)  float32  read
    w    : (OC, IC) float32  read
    precision : "fp32", or "bf16": the operands rounded to bf16 (nearest even), the products
                summed in fp32 (see available_bf16_isas)
    """
    func = "matmul_backward"
    N, IC, OC, nt = _check_linear_grads("dx", dx, dw, dout, "x", x, w, n_threads)
    bf16 = _bf16(func, precision)
    # d(x . w^T)/dx: dx = dout (N, OC) . w (OC, IC)
    if dx is not None:
        _run_gemm(func, dx, None, _operand(dout, False), _operand(w, False), OC, True, nt,
                  None, False, bf16)
    # d(x . w^T)/dw: dw = dout^T (OC, N) . x (N, IC)
    if dw is not None:
        _run_gemm(func, dw, None, _operand(dout, True), _operand(x, False), N, True, nt,
                  None, False, bf16)


def gemm(c, a, b, trans_a, trans_b, accumulate, n_threads, precision="fp32"):
    """General matrix product c (+)= op(a) . op(b), op(X) = X^T when its flag is set.
    c : (M, N) float32  written (accumulated when accumulate)
    a : (M, K), or (K, M) with trans_a   float32  read
    b : (K, N), or (N, K) with trans_b   float32  read
    precision : "fp32", or "bf16": the operands rounded to bf16 (nearest even), the products
                summed in fp32 (see available_bf16_isas)
    """
    check_array("a", a, F32, 2)
    check_array("b", b, F32, 2)
    ta, tb = bool(trans_a), bool(trans_b)
    M, K = (a.shape[1], a.shape[0]) if ta else a.shape
    Kb, N = (b.shape[1], b.shape[0]) if tb else b.shape
    shapes = f"a is {a.shape} with trans_a={ta}, b is {b.shape} with trans_b={tb}"
    if Kb != K:
        raise ValueError(f"inner dimensions differ: op(a) is {M}x{K}, op(b) is {Kb}x{N} "
                         f"({shapes})")
    check_output("c", c, F32, (M, N), shapes)
    check_disjoint((("c", c),), (("a", a), ("b", b)))
    nt = check_n_threads(n_threads)
    bf16 = _bf16("gemm", precision)
    _run_gemm("gemm", c, None, _operand(a, ta), _operand(b, tb), K, bool(accumulate), nt,
              None, False, bf16)


def matmul_sqrelu_forward(out, pre, x, w, n_threads, precision="fp32"):
    """Linear layer followed by squared ReLU, fused in the GEMM's write-back.
    out : (N, OC)  float32  written = relu(pre)^2
    pre : (N, OC)  float32  written = x . w^T, saved for the squared-ReLU backward
    x   : (N, IC)  float32  read
    w   : (OC, IC) float32  read
    precision : "fp32", or "bf16": the operands rounded to bf16 (nearest even), the products
                summed in fp32 (see available_bf16_isas)
    """
    N, IC, OC = _linear_dims("x", x, w)
    shapes = f"x is {x.shape}, w is {w.shape}"
    check_output("out", out, F32, (N, OC), shapes)
    check_output("pre", pre, F32, (N, OC), shapes)
    check_disjoint((("out", out), ("pre", pre)), (("x", x), ("w", w)))
    nt = check_n_threads(n_threads)
    bf16 = _bf16("matmul_sqrelu_forward", precision)
    _run_gemm("matmul_sqrelu_forward", pre, out, _operand(x, False), _operand(w, True), IC,
              False, nt, None, False, bf16)


def matmul_sqrelu_backward(dpre, dw, dout, pre, w, n_threads, precision="fp32"):
    """Gradients of out = relu(pre)^2 . w^T (a linear layer on a squared ReLU's output), with
    the activation never stored: pass None to skip one.
    dpre : (N, IC)  float32  written = (dout . w) * 2 relu(pre)
    dw   : (OC, IC) float32  accumulated += dout^T . relu(pre)^2
    dout : (N, OC)  float32  read
    pre  : (N, IC)  float32  read, the squared ReLU's input
    w    : (OC, IC) float32  read
    precision : "fp32", or "bf16": the operands rounded to bf16 (nearest even), the products
                summed in fp32 (see available_bf16_isas)

    Bit for bit what the unfused steps give (with the same precision): squared_relu_forward(act, pre),
    matmul_backward(None, dw, dout, act, w), gemm(dpre, dout, w, False, False, False) and
    squared_relu_backward_inplace(dpre, pre); without the two passes over (N, IC) arrays.
    """
    func = "matmul_sqrelu_backward"
    N, IC, OC, nt = _check_linear_grads("dpre", dpre, dw, dout, "pre", pre, w, n_threads)
    bf16 = _bf16(func, precision)
    # dw = dout^T (OC, N) . relu(pre)^2 (N, IC)
    if dw is not None:
        _run_gemm(func, dw, None, _operand(dout, True), _operand(pre, False), N, True, nt,
                  None, True, bf16)
    # dpre = dout (N, OC) . w (OC, IC), times 2 relu(pre) in the write-back
    if dpre is not None:
        _run_gemm(func, dpre, None, _operand(dout, False), _operand(w, False), OC, False, nt,
                  pre, False, bf16)
