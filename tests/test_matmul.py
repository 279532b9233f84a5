"""Tests for the matmul family: linear forward/backward, general GEMM, fused squared ReLU,
and the run-time choice of SIMD path. Every kernel test runs on each path the CPU has."""
import numpy as np
import pytest

import randygpt._kernels as kernels
from randygpt._kernels import matmul as mm
from randygpt._kernels._ref_matmul import (
    gemm_ref,
    matmul_backward_ref,
    matmul_forward_ref,
    matmul_sqrelu_backward_ref,
    matmul_sqrelu_forward_ref,
)
from randygpt._kernels import activation

from conftest import (assert_bitwise_equal, assert_close, assert_grad_close, each_path,
                      numerical_grad, thread_counts)

KC = 256  # the GEMM's K block: K > KC exercises the running sums carried across blocks

# The comparisons with the references run on one thread: the thread tests below check
# that 2 and 3 threads give the very same bits, for every entry point.

# (N, IC, OC) for the linear layer: 1 row, K = 1, sizes that are multiples of no tile
# (6, 8, 12, 16, 32), N = 67 like the vocab, and K above one and two K blocks.
LINEAR_SHAPES = [(1, 1, 1), (1, 5, 3), (7, 13, 5), (5, 1, 9), (13, 37, 67), (30, KC + 44, 20),
                 (25, 2 * KC + 18, 41)]

# (M, K, N) for gemm, including small M with large N (the threads then split N).
GEMM_SHAPES = [(1, 1, 1), (7, 13, 5), (3, 40, 70), (67, 20, 9), (19, KC + 34, 33), (24, 40, 40), (12, 30, 48)]


def _tol(k):
    # Our kernel sums the K products of an element as one sequential float32 chain, NumPy's
    # BLAS in another order. With unit-normal inputs the partial sums grow like sqrt(K) and
    # each of the K roundings adds ~eps32 * sqrt(K), so the difference is a random walk of
    # size ~eps32 * K (6e-8 * K); 5e-7 * K leaves room for the worst of a few 100k elements,
    # and is still 1000x smaller than any indexing or packing mistake would produce.
    return dict(rtol=1e-5, atol=5e-7 * max(k, 1))


isa = each_path(mm.available_isas, mm.get_isa, mm.set_isa)


def _randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Against the references

@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_forward_matches_reference(isa, rng, shape, accumulate):
    N, IC, OC = shape
    x, w = _randn(rng, N, IC), _randn(rng, OC, IC)
    start = _randn(rng, N, OC) if accumulate else np.full((N, OC), np.nan, np.float32)
    out, expected = start.copy(), start.copy()
    mm.matmul_forward(out, x, w, 1, accumulate=accumulate)
    matmul_forward_ref(expected, x, w, accumulate=accumulate)
    assert not np.isnan(out).any(), "overwrite mode read the NaN-filled output"
    assert_close(out, expected, name=f"out[{isa}]", **_tol(IC))


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("which", ["both", "dx", "dw"])
def test_backward_matches_reference(isa, rng, shape, which):
    N, IC, OC = shape
    x, w, dout = _randn(rng, N, IC), _randn(rng, OC, IC), _randn(rng, N, OC)
    dx0, dw0 = _randn(rng, N, IC), _randn(rng, OC, IC)
    dx = dx0.copy() if which in ("both", "dx") else None
    dw = dw0.copy() if which in ("both", "dw") else None
    rdx = dx0.copy() if dx is not None else None
    rdw = dw0.copy() if dw is not None else None
    mm.matmul_backward(dx, dw, dout, x, w, 1)
    matmul_backward_ref(rdx, rdw, dout, x, w)
    if dx is not None:
        assert_close(dx, rdx, name=f"dx[{isa}]", **_tol(OC))
    if dw is not None:
        assert_close(dw, rdw, name=f"dw[{isa}]", **_tol(N))


@pytest.mark.parametrize("shape", GEMM_SHAPES)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_matches_reference(isa, rng, shape, trans_a, trans_b, accumulate):
    M, K, N = shape
    a = _randn(rng, *((K, M) if trans_a else (M, K)))
    b = _randn(rng, *((N, K) if trans_b else (K, N)))
    start = _randn(rng, M, N) if accumulate else np.full((M, N), np.nan, np.float32)
    c, expected = start.copy(), start.copy()
    mm.gemm(c, a, b, trans_a, trans_b, accumulate, 1)
    gemm_ref(expected, a, b, trans_a, trans_b, accumulate)
    assert not np.isnan(c).any(), "overwrite mode read the NaN-filled output"
    assert_close(c, expected, name=f"c[{isa}]", **_tol(K))


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_sqrelu_forward_matches_reference(isa, rng, shape):
    N, IC, OC = shape
    x, w = _randn(rng, N, IC), _randn(rng, OC, IC)
    out, pre = np.full((N, OC), np.nan, np.float32), np.full((N, OC), np.nan, np.float32)
    rout, rpre = np.empty_like(out), np.empty_like(pre)
    mm.matmul_sqrelu_forward(out, pre, x, w, 1)
    matmul_sqrelu_forward_ref(rout, rpre, x, w)
    assert_close(pre, rpre, name=f"pre[{isa}]", **_tol(IC))
    # The fused write-back must equal squaring our own pre exactly: one rounding either way.
    assert_bitwise_equal(out, np.square(np.maximum(pre, 0)), name=f"out[{isa}]")
    # And pre is exactly what the plain forward computes.
    plain = np.empty_like(pre)
    mm.matmul_forward(plain, x, w, 1)
    assert_bitwise_equal(pre, plain, name=f"pre vs matmul_forward [{isa}]")


@pytest.mark.parametrize("shape", LINEAR_SHAPES + [(200, 40, 9)])
@pytest.mark.parametrize("accumulate", [False, True])
def test_forward_of_a_squared_relu_input_equals_the_unfused_steps(isa, rng, shape, accumulate):
    # x_sqrelu squares x while packing it: the same operand values as relu(x)^2 stored
    # first, so the same bits, at any thread count; (200, 40, 9) splits columns, not rows.
    N, IC, OC = shape
    x, w = _randn(rng, N, IC), _randn(rng, OC, IC)
    start = _randn(rng, N, OC) if accumulate else np.full((N, OC), np.nan, np.float32)
    act = np.empty_like(x)
    activation.squared_relu_forward(act, x, 1)
    unfused = start.copy()
    mm.matmul_forward(unfused, act, w, 1, accumulate=accumulate)
    for n in thread_counts():
        fused = start.copy()
        mm.matmul_forward(fused, x, w, n, accumulate=accumulate, x_sqrelu=True)
        assert_bitwise_equal(fused, unfused, name=f"out[{isa}] {n} thread(s)")


def _sqrelu_backward_unfused(dpre, dw, dout, pre, w, n_threads):
    """The steps matmul_sqrelu_backward fuses, each by its own kernel."""
    act = np.empty_like(pre)
    activation.squared_relu_forward(act, pre, n_threads)
    if dw is not None:
        mm.matmul_backward(None, dw, dout, act, w, n_threads)
    if dpre is not None:
        mm.gemm(dpre, dout, w, False, False, False, n_threads)
        activation.squared_relu_backward_inplace(dpre, pre, n_threads)


# (N, IC, OC): besides the linear shapes, OC over one K block, for dpre's write-back
# (2 relu(pre) applied only once the sums are complete), and OC = 0 (an empty product).
SQRELU_BACKWARD_SHAPES = LINEAR_SHAPES + [(9, 20, KC + 44), (4, 3, 0)]


@pytest.mark.parametrize("shape", SQRELU_BACKWARD_SHAPES)
@pytest.mark.parametrize("which", ["both", "dpre", "dw"])
def test_sqrelu_backward_matches_reference_and_unfused(isa, rng, shape, which):
    N, IC, OC = shape
    pre, w, dout = _randn(rng, N, IC), _randn(rng, OC, IC), _randn(rng, N, OC)
    pre[0, 0] = 0.0  # relu's kink: both the forward and the gradient are 0 there
    dw0 = _randn(rng, OC, IC)
    outs = {}
    for name, fn in (("fused", mm.matmul_sqrelu_backward), ("unfused", _sqrelu_backward_unfused),
                     ("ref", None)):
        dpre = np.full((N, IC), np.nan, np.float32) if which in ("both", "dpre") else None
        dw = dw0.copy() if which in ("both", "dw") else None
        if fn is None:
            matmul_sqrelu_backward_ref(dpre, dw, dout, pre, w)
        else:
            fn(dpre, dw, dout, pre, w, 1)
        outs[name] = (dpre, dw)
    for i, label, k in ((0, "dpre", OC), (1, "dw", N)):
        got = outs["fused"][i]
        if got is None:
            continue
        assert not np.isnan(got).any(), f"{label}: the write-back read the NaN-filled output"
        assert_close(got, outs["ref"][i], name=f"{label}[{isa}]", **_tol(k))
        # Bit for bit what the separate kernels give: the model's results do not change.
        assert_bitwise_equal(got, outs["unfused"][i], name=f"{label} vs unfused [{isa}]")


def test_sqrelu_backward_passes_nan_through(isa, rng):
    # relu(NaN) is NaN on every path, so a NaN pre-activation shows up in both gradients.
    N, IC, OC = 13, 37, 20
    pre, w, dout = _randn(rng, N, IC), _randn(rng, OC, IC), _randn(rng, N, OC)
    pre[3, 5] = np.nan
    dpre, dw = np.zeros((N, IC), np.float32), np.zeros((OC, IC), np.float32)
    mm.matmul_sqrelu_backward(dpre, dw, dout, pre, w, 1)
    assert np.isnan(dpre[3, 5]) and np.isnan(dpre).sum() == 1
    assert np.isnan(dw[:, 5]).all() and np.isnan(dw).sum() == OC


def test_sqrelu_backward_rejects_bad_input(rng):
    N, IC, OC = 5, 4, 3
    pre, w, dout = _randn(rng, N, IC), _randn(rng, OC, IC), _randn(rng, N, OC)
    dpre, dw = np.zeros((N, IC), np.float32), np.zeros((OC, IC), np.float32)
    with pytest.raises(ValueError, match=r"^dpre \(shape \(5, 4\)\) must not share memory with "
                                         r"pre \(shape \(5, 4\)\)$"):
        mm.matmul_sqrelu_backward(pre, dw, dout, pre, w, 1)
    with pytest.raises(ValueError, match=r"dpre has shape \(4, 4\)"):
        mm.matmul_sqrelu_backward(dpre[:4].copy(), dw, dout, pre, w, 1)
    with pytest.raises(ValueError, match=r"dout has shape"):
        mm.matmul_sqrelu_backward(dpre, dw, dout[:, :2].copy(), pre, w, 1)
    with pytest.raises(TypeError, match="pre must be float32"):
        mm.matmul_sqrelu_backward(dpre, dw, dout, pre.astype(np.float64), w, 1)
    with pytest.raises(ValueError, match="n_threads"):
        mm.matmul_sqrelu_backward(dpre, dw, dout, pre, w, 0)


def test_model_shapes_match_reference(isa, rng):
    # The fc1 forward and the fc2 weight gradient at the real size (N = B*T = 2048).
    N, C, H = 2048, 256, 1024
    x, w = _randn(rng, N, C), _randn(rng, H, C)
    out = np.full((N, H), np.nan, np.float32)
    expected = np.empty_like(out)
    mm.matmul_forward(out, x, w, 2)
    matmul_forward_ref(expected, x, w)
    assert_close(out, expected, name=f"fc1 out[{isa}]", **_tol(C))
    h, dout, w2 = _randn(rng, N, H), _randn(rng, N, C), _randn(rng, C, H)
    dw, rdw = np.zeros((C, H), np.float32), np.zeros((C, H), np.float32)
    mm.matmul_backward(None, dw, dout, h, w2, 2)
    matmul_backward_ref(None, rdw, dout, h, w2)
    assert_close(dw, rdw, name=f"fc2 dw[{isa}]", **_tol(N))


def test_zero_rows(isa, rng):
    x, w = np.zeros((0, 5), np.float32), _randn(rng, 3, 5)
    out = np.zeros((0, 3), np.float32)
    mm.matmul_forward(out, x, w, 2)
    dw = np.ones((3, 5), np.float32)
    mm.matmul_backward(np.zeros((0, 5), np.float32), dw, out, x, w, 2)
    assert_bitwise_equal(dw, np.ones((3, 5), np.float32))


def test_zero_sized_inner_dimension(isa, rng):
    # K = 0: the product is all zeros; overwrite must write them, accumulate must add nothing.
    x, w = np.zeros((4, 0), np.float32), np.zeros((3, 0), np.float32)
    out = np.full((4, 3), np.nan, np.float32)
    mm.matmul_forward(out, x, w, 2)
    assert_bitwise_equal(out, np.zeros((4, 3), np.float32))
    start = _randn(rng, 4, 3)
    out = start.copy()
    mm.matmul_forward(out, x, w, 2, accumulate=True)
    assert_bitwise_equal(out, start)


# ---------------------------------------------------------------------------------------
# Determinism and accumulation

@pytest.mark.parametrize("shape", [(50, 2 * KC + 18, 20), (9, KC + 44, 200)])
def test_bitwise_identical_across_thread_counts(isa, rng, shape):
    # (50, 530, 20) splits the rows between threads, (9, 300, 200) the columns; both
    # have K over two K blocks. The work items (4 per thread, as many as there are strips
    # at most) are cut differently at each thread count, which must not matter either.
    N, IC, OC = shape
    x, w, dout = _randn(rng, N, IC), _randn(rng, OC, IC), _randn(rng, N, OC)
    base = _randn(rng, N, OC)
    results = []
    for n in sorted(set(thread_counts()) | {5, 8}):
        out = np.full((N, OC), np.nan, np.float32)
        acc = base.copy()
        pre, act = np.empty((N, OC), np.float32), np.empty((N, OC), np.float32)
        dx, dw = np.ones((N, IC), np.float32), np.ones((OC, IC), np.float32)
        dpre, dw2 = np.empty((N, IC), np.float32), np.ones((OC, IC), np.float32)
        mm.matmul_forward(out, x, w, n)
        mm.matmul_forward(acc, x, w, n, accumulate=True)
        mm.matmul_sqrelu_forward(act, pre, x, w, n)
        mm.matmul_backward(dx, dw, dout, x, w, n)
        mm.matmul_sqrelu_backward(dpre, dw2, dout, x, w, n)  # x as the pre-activation
        results.append((f"{n} threads", [out, acc, act, pre, dx, dw, dpre, dw2]))
    names = ["out", "out (accumulate)", "sqrelu out", "pre", "dx", "dw", "sqrelu dpre", "sqrelu dw"]
    for label, arrays in results[1:]:
        for name, a, b in zip(names, results[0][1], arrays):
            assert_bitwise_equal(b, a, name=f"{name} [{isa}] {label} vs 1 thread")


def test_backward_twice_gives_exactly_twice(isa, rng):
    N, IC, OC = KC + 44, 40, KC + 14  # K = N for dw and K = OC for dx: both over one K block
    x, w, dout = _randn(rng, N, IC), _randn(rng, OC, IC), _randn(rng, N, OC)
    dx, dw = np.zeros((N, IC), np.float32), np.zeros((OC, IC), np.float32)
    mm.matmul_backward(dx, dw, dout, x, w, 2)
    once_dx, once_dw = dx.copy(), dw.copy()
    mm.matmul_backward(dx, dw, dout, x, w, 2)
    assert_bitwise_equal(dx, 2 * once_dx, name=f"dx [{isa}]")
    assert_bitwise_equal(dw, 2 * once_dw, name=f"dw [{isa}]")


def test_fma_paths_agree_bitwise(rng):
    # avx2 and avx512 both sum each element as one FMA chain in k order, so they agree
    # to the bit; a path that lost its FMAs (or reordered the sum) would not.
    fma_paths = [name for name in mm.available_isas() if name in ("avx2", "avx512")]
    if len(fma_paths) < 2:
        pytest.skip("needs both the avx2 and the avx512 path")
    x, w = _randn(rng, 29, 300), _randn(rng, 45, 300)
    old = mm.get_isa()
    outs = []
    try:
        for name in fma_paths:
            mm.set_isa(name)
            out = np.empty((29, 45), np.float32)
            mm.matmul_forward(out, x, w, 1)
            outs.append(out)
    finally:
        mm.set_isa(old)
    assert_bitwise_equal(outs[1], outs[0], name="avx512 vs avx2")


# ---------------------------------------------------------------------------------------
# The reference's gradient

def test_backward_ref_matches_finite_differences():
    rng = np.random.default_rng(7)
    N, IC, OC = 3, 4, 5
    x, w = rng.standard_normal((N, IC)), rng.standard_normal((OC, IC))
    g = rng.standard_normal((N, OC))  # loss = sum(g * out), so dloss/dout = g

    def loss():
        out = np.empty((N, OC))
        matmul_forward_ref(out, x, w)
        return float(np.sum(g * out))

    dx, dw = np.zeros_like(x), np.zeros_like(w)
    matmul_backward_ref(dx, dw, g, x, w)
    assert_grad_close(dx, numerical_grad(loss, x), name="dx")
    assert_grad_close(dw, numerical_grad(loss, w), name="dw")


def test_sqrelu_backward_ref_matches_finite_differences():
    rng = np.random.default_rng(8)
    N, IC, OC = 3, 4, 5
    # Away from relu's kink, where the finite difference would straddle it.
    pre = rng.standard_normal((N, IC))
    pre[np.abs(pre) < 0.1] = 0.5
    w = rng.standard_normal((OC, IC))
    g = rng.standard_normal((N, OC))  # loss = sum(g * relu(pre)^2 @ w.T)

    def loss():
        return float(np.sum(g * (np.square(np.maximum(pre, 0)) @ w.T)))

    dpre, dw = np.zeros_like(pre), np.zeros_like(w)
    matmul_sqrelu_backward_ref(dpre, dw, g, pre, w)
    assert_grad_close(dpre, numerical_grad(loss, pre), name="dpre")
    assert_grad_close(dw, numerical_grad(loss, w), name="dw")


# ---------------------------------------------------------------------------------------
# ISA selection

def test_isa_selection(monkeypatch):
    names = mm.available_isas()
    assert names and set(names) <= {"avx512", "avx2", "sse2", "generic"}
    assert names[-1] in ("sse2", "generic"), "the baseline path must always be available"
    old = mm.get_isa()
    try:
        assert kernels.select_isa(names[-1]) == names[-1] and mm.get_isa() == names[-1]
        monkeypatch.setenv("RANDYGPT_ISA", names[-1])
        assert kernels.select_isa() == names[-1]
        monkeypatch.delenv("RANDYGPT_ISA")
        assert kernels.select_isa() == names[0], "default must be the fastest path"
        with pytest.raises(ValueError, match="avx2|sse2|generic"):
            kernels.select_isa("neon")
        with pytest.raises(ValueError, match="isa"):
            mm.set_isa("avx1024")
        monkeypatch.setenv("RANDYGPT_ISA", "avx1024")
        with pytest.raises(ValueError, match="RANDYGPT_ISA"):
            kernels.select_isa()
        assert mm.get_isa() == names[0], "a failed selection must not change the path"
    finally:
        mm.set_isa(old)


# ---------------------------------------------------------------------------------------
# Bad input

def _fwd_args(rng):
    return np.empty((4, 3), np.float32), _randn(rng, 4, 5), _randn(rng, 3, 5)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda o, x, w: (o, x.astype(np.float64), w), TypeError, "x must be float32"),
        (lambda o, x, w: (o, x, w.tolist()), TypeError, "w must be a numpy.ndarray"),
        (lambda o, x, w: (o, x, np.asfortranarray(w)), ValueError, "w must be C-contiguous"),
        (lambda o, x, w: (o, x[:, :, None], w), ValueError, "x must be 2-D"),
        (lambda o, x, w: (o, x, w[:, :4].copy()), ValueError, r"w has shape \(3, 4\)"),
        (lambda o, x, w: (o[:3].copy(), x, w), ValueError, r"out has shape \(3, 3\)"),
        (lambda o, x, w: (x[:, :3], x, w), ValueError, "out must be C-contiguous"),
    ],
)
def test_forward_rejects_bad_input(rng, mutate, exc, match):
    out, x, w = mutate(*_fwd_args(rng))
    with pytest.raises(exc, match=match):
        mm.matmul_forward(out, x, w, 1)


def test_rejects_aliasing_and_bad_thread_counts(rng):
    out, x, w = _fwd_args(rng)
    square = _randn(rng, 4, 4)
    with pytest.raises(ValueError, match="c .* must not share memory with a"):
        mm.gemm(square, square, np.eye(4, dtype=np.float32), False, False, False, 1)
    with pytest.raises(ValueError, match="out .* must not share memory with pre"):
        mm.matmul_sqrelu_forward(out, out, x, w, 1)
    dx = x.copy()
    with pytest.raises(ValueError, match="dx .* must not share memory with x"):
        mm.matmul_backward(dx, None, out, dx, w, 1)
    with pytest.raises(ValueError, match="n_threads"):
        mm.matmul_forward(out, x, w, 0)
    for bad in (1.5, True, "2", None):
        with pytest.raises(TypeError, match="n_threads"):
            mm.matmul_forward(out, x, w, bad)
    with pytest.raises(ValueError, match="inner dimensions"):
        mm.gemm(out, x, w, False, False, False, 1)
    with pytest.raises(ValueError, match=r"dw has shape"):
        mm.matmul_backward(None, np.zeros((5, 3), np.float32), out, x, w, 1)
    ro = out.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        mm.matmul_forward(ro, x, w, 1)
