"""Softmax cross-entropy kernels against the NumPy reference, the reference against finite
differences, thread-count independence, numerical stability and bad input."""
import numpy as np
import pytest

from conftest import (assert_bitwise_equal, assert_close, assert_grad_close, numerical_grad,
                      thread_counts)
from randygpt._kernels import xent
from randygpt._kernels.reference import (cross_entropy_backward_ref,
                                         cross_entropy_forward_backward_ref,
                                         cross_entropy_forward_ref)

SHAPES = [(7, 11), (1, 11), (3, 1), (13, 67)]


def make_case(rng, N, V, scale=3.0, dtype=np.float32):
    logits = (scale * rng.standard_normal((N, V))).astype(dtype)
    targets = rng.integers(0, V, size=N).astype(np.int32)
    return logits, targets


@pytest.mark.parametrize("N,V", SHAPES)
def test_forward_matches_reference(rng, N, V):
    logits, targets = make_case(rng, N, V)
    losses = np.full(N, np.nan, dtype=np.float32)  # written, so NaN must not survive
    expected = np.empty(N, dtype=np.float32)
    mean = xent.cross_entropy_forward(losses, logits, targets, 2)
    mean_ref = cross_entropy_forward_ref(expected, logits, targets)
    assert_close(losses, expected, name="losses")
    assert isinstance(mean, float)
    assert abs(mean - mean_ref) <= 1e-5 * abs(mean_ref) + 1e-6
    # The mean is of the float32 losses, summed in float64 in row order.
    assert mean == sum(float(x) for x in losses) / N


@pytest.mark.parametrize("N,V", SHAPES)
def test_backward_matches_reference(rng, N, V):
    logits, targets = make_case(rng, N, V)
    start = rng.standard_normal((N, V)).astype(np.float32)
    dlogits, expected = start.copy(), start.copy()
    xent.cross_entropy_backward(dlogits, logits, targets, 0.7, 2)
    cross_entropy_backward_ref(expected, logits, targets, 0.7)
    assert_close(dlogits, expected, name="dlogits")


@pytest.mark.parametrize("N,V", SHAPES)
def test_forward_backward_matches_reference(rng, N, V):
    logits, targets = make_case(rng, N, V)
    dlogits = np.full((N, V), np.nan, dtype=np.float32)  # written, not accumulated
    expected = np.empty_like(dlogits)
    mean = xent.cross_entropy_forward_backward(dlogits, logits, targets, 2)
    mean_ref = cross_entropy_forward_backward_ref(expected, logits, targets)
    assert_close(dlogits, expected, name="dlogits")
    assert abs(mean - mean_ref) <= 1e-5 * abs(mean_ref) + 1e-6
    # Same loss as the forward alone, to the bit.
    assert mean == xent.cross_entropy_forward(np.empty(N, np.float32), logits, targets, 2)
    # Same gradient as the accumulating backward with dloss = 1 on a zeroed buffer.
    acc = np.zeros_like(dlogits)
    xent.cross_entropy_backward(acc, logits, targets, 1.0, 2)
    assert_close(dlogits, acc, name="fused vs separate backward")


def test_backward_long_rows(rng):
    # Rows longer than the kernel's 4096-float stack buffer take the recompute path.
    logits, targets = make_case(rng, 3, 4099)
    start = rng.standard_normal(logits.shape).astype(np.float32)
    dlogits, expected = start.copy(), start.copy()
    xent.cross_entropy_backward(dlogits, logits, targets, 2.5, 2)
    cross_entropy_backward_ref(expected, logits, targets, 2.5)
    assert_close(dlogits, expected, name="dlogits")


@pytest.mark.slow
def test_real_shape(rng):
    N, V = 2048, 67
    logits, targets = make_case(rng, N, V)
    losses, expected = np.empty(N, np.float32), np.empty(N, np.float32)
    mean = xent.cross_entropy_forward(losses, logits, targets, 2)
    mean_ref = cross_entropy_forward_ref(expected, logits, targets)
    assert_close(losses, expected, name="losses")
    assert abs(mean - mean_ref) <= 1e-6 * abs(mean_ref)
    dlogits, dexp = np.empty_like(logits), np.empty_like(logits)
    xent.cross_entropy_forward_backward(dlogits, logits, targets, 2)
    cross_entropy_forward_backward_ref(dexp, logits, targets)
    # atol scaled to the gradient's size, 1/N: entries are (p - onehot)/N.
    assert_close(dlogits, dexp, atol=1e-6 / N, name="dlogits")


@pytest.mark.parametrize("dloss", [1.0, 0.37])
def test_reference_backward_vs_finite_differences(rng, dloss):
    N, V = 5, 7
    logits, targets = make_case(rng, N, V, scale=1.0, dtype=np.float64)
    losses = np.empty(N)
    numeric = dloss * numerical_grad(lambda: cross_entropy_forward_ref(losses, logits, targets),
                                     logits)
    analytic = np.zeros_like(logits)
    cross_entropy_backward_ref(analytic, logits, targets, dloss)
    assert_grad_close(analytic, numeric, name="dlogits")
    fused = np.empty_like(logits)
    cross_entropy_forward_backward_ref(fused, logits, targets)
    assert_grad_close(dloss * fused, numeric, name="fused dlogits")


def test_large_logits_stay_finite(rng):
    N, V = 6, 11
    logits = (1e4 * rng.standard_normal((N, V))).astype(np.float32)
    logits[0] = 1e4  # a tie at a huge value
    logits[1, 3] = -np.inf  # an impossible class that is not the target
    targets = rng.integers(0, V, size=N).astype(np.int32)
    targets[1] = 0
    losses = np.empty(N, np.float32)
    mean = xent.cross_entropy_forward(losses, logits, targets, 2)
    dlogits = np.empty_like(logits)
    mean_fb = xent.cross_entropy_forward_backward(dlogits, logits, targets, 2)
    assert np.isfinite(mean) and mean == mean_fb
    assert np.all(np.isfinite(losses)) and np.all(np.isfinite(dlogits))
    expected = np.empty(N)
    cross_entropy_forward_ref(expected, logits.astype(np.float64), targets)
    # The loss of a row is lse - z[y] with terms of size 1e4: float32 logits carry ~1e-3 of
    # absolute rounding at that size, so compare with a relative tolerance on the logits' scale.
    assert_close(losses, expected, rtol=0, atol=1e4 * 2e-7, name="losses")
    assert losses[0] == pytest.approx(np.log(V), rel=1e-6)
    assert dlogits[1, 3] == 0.0
    np.testing.assert_allclose(dlogits.sum(axis=1), 0.0, atol=1e-6)


def test_softmax_accurate_over_the_whole_exponent_range():
    # The kernel's own exp() is used for z - max anywhere in [-80, 0]; every probability, not
    # just the large ones, must keep float32 relative accuracy (atol 0 on purpose).
    V = 1001
    logits = np.linspace(-80.0, 0.0, V, dtype=np.float32)[None, :]
    targets = np.array([V - 1], np.int32)
    dlogits = np.empty_like(logits)
    xent.cross_entropy_forward_backward(dlogits, logits, targets, 1)
    z = logits.astype(np.float64)
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert_close(dlogits[0, :-1], p[0, :-1], rtol=2e-6, atol=0, name="softmax")
    assert_close(dlogits[0, -1], p[0, -1] - 1, rtol=1e-5, atol=1e-7, name="target entry")
    assert np.all(dlogits[0, :-1] > 0)


def test_deterministic_across_threads(rng):
    N, V = 37, 67
    logits, targets = make_case(rng, N, V)
    runs = []
    for n in thread_counts():
        losses = np.empty(N, np.float32)
        mean = xent.cross_entropy_forward(losses, logits, targets, n)
        dl = np.ones_like(logits)
        xent.cross_entropy_backward(dl, logits, targets, 0.5, n)
        dfb = np.empty_like(logits)
        mean_fb = xent.cross_entropy_forward_backward(dfb, logits, targets, n)
        runs.append((mean, losses, dl, mean_fb, dfb))
    for mean, losses, dl, mean_fb, dfb in runs[1:]:
        assert mean == runs[0][0] and mean_fb == runs[0][3]
        assert_bitwise_equal(losses, runs[0][1], name="losses")
        assert_bitwise_equal(dl, runs[0][2], name="dlogits (backward)")
        assert_bitwise_equal(dfb, runs[0][4], name="dlogits (forward_backward)")


def test_backward_twice_is_exactly_twice(rng):
    logits, targets = make_case(rng, 7, 11)
    once = np.zeros_like(logits)
    xent.cross_entropy_backward(once, logits, targets, 1.0, 2)
    twice = np.zeros_like(logits)
    xent.cross_entropy_backward(twice, logits, targets, 1.0, 2)
    xent.cross_entropy_backward(twice, logits, targets, 1.0, 2)
    assert_bitwise_equal(twice, 2 * once, name="dlogits")


@pytest.mark.parametrize("bad", [-1, 11, 2**31 - 1])
def test_target_out_of_range(rng, bad):
    logits, targets = make_case(rng, 7, 11)
    targets[4] = bad
    with pytest.raises(ValueError, match=rf"targets\[4\] = {bad} is out of range \[0, 11\)"):
        xent.cross_entropy_forward(np.empty(7, np.float32), logits, targets, 1)
    with pytest.raises(ValueError, match=r"targets\[4\]"):
        xent.cross_entropy_backward(np.zeros_like(logits), logits, targets, 1.0, 1)
    with pytest.raises(ValueError, match=r"targets\[4\]"):
        xent.cross_entropy_forward_backward(np.zeros_like(logits), logits, targets, 1)


def test_bad_dtype_shape_contiguity(rng):
    logits, targets = make_case(rng, 7, 11)
    losses = np.empty(7, np.float32)
    with pytest.raises(TypeError, match="logits must be float32"):
        xent.cross_entropy_forward(losses, logits.astype(np.float64), targets, 1)
    with pytest.raises(TypeError, match="targets must be int32"):
        xent.cross_entropy_forward(losses, logits, targets.astype(np.int64), 1)
    with pytest.raises(TypeError, match="losses must be float32"):
        xent.cross_entropy_forward(losses.astype(np.float64), logits, targets, 1)
    with pytest.raises(TypeError, match="logits must be a numpy.ndarray"):
        xent.cross_entropy_forward(losses, logits.tolist(), targets, 1)
    with pytest.raises(ValueError, match=r"targets has shape \(6,\), expected \(7,\) \(one per row of logits\)"):
        xent.cross_entropy_forward(losses, logits, targets[:6].copy(), 1)
    with pytest.raises(ValueError, match=r"losses has shape \(8,\), expected \(7,\)"):
        xent.cross_entropy_forward(np.empty(8, np.float32), logits, targets, 1)
    with pytest.raises(ValueError, match=r"dlogits has shape \(7, 10\), expected \(7, 11\) \(same as logits\)"):
        xent.cross_entropy_backward(np.zeros((7, 10), np.float32), logits, targets, 1.0, 1)
    with pytest.raises(ValueError, match="logits must be C-contiguous"):
        xent.cross_entropy_forward(losses, np.asfortranarray(logits), targets, 1)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        xent.cross_entropy_forward(losses, logits.reshape(7, 11, 1), targets, 1)
    with pytest.raises(ValueError, match="dloss must be finite"):
        xent.cross_entropy_backward(np.zeros_like(logits), logits, targets, np.nan, 1)
    with pytest.raises(TypeError, match="dloss must be a real number"):
        xent.cross_entropy_backward(np.zeros_like(logits), logits, targets, "1.0", 1)


def test_aliasing_rejected(rng):
    logits, targets = make_case(rng, 7, 11)
    with pytest.raises(ValueError, match="dlogits .* must not share memory with logits"):
        xent.cross_entropy_backward(logits, logits, targets, 1.0, 1)
    with pytest.raises(ValueError, match="dlogits .* must not share memory with logits"):
        xent.cross_entropy_forward_backward(logits, logits, targets, 1)
    with pytest.raises(ValueError, match="losses .* must not share memory with logits"):
        xent.cross_entropy_forward(logits.reshape(-1)[:7], logits, targets, 1)


@pytest.mark.parametrize("n_threads,exc", [(0, ValueError), (-2, ValueError), (2**40, ValueError), (1.5, TypeError),
                                           (True, TypeError), (None, TypeError)])
def test_bad_n_threads(rng, n_threads, exc):
    logits, targets = make_case(rng, 7, 11)
    with pytest.raises(exc, match="n_threads"):
        xent.cross_entropy_forward(np.empty(7, np.float32), logits, targets, n_threads)


def test_read_only_output_rejected(rng):
    logits, targets = make_case(rng, 7, 11)
    losses = np.empty(7, np.float32)
    losses.flags.writeable = False
    with pytest.raises(ValueError, match="losses must be writeable"):
        xent.cross_entropy_forward(losses, logits, targets, 1)
