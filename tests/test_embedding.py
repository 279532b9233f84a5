"""Token + position embedding kernels against the NumPy reference, the reference against
finite differences, thread-count independence and bad input."""
import numpy as np
import pytest

from conftest import (assert_bitwise_equal, assert_close, assert_grad_close, numerical_grad,
                      thread_counts)
from randygpt._kernels import embedding
from randygpt._kernels.reference import embedding_backward_ref, embedding_forward_ref

# (B, T, C, V, extra wpe rows): odd sizes, a C that is not a multiple of the column block,
# a vocabulary smaller than B*T so that tokens repeat, and single-row cases.
SHAPES = [(2, 5, 12, 11, 0), (2, 5, 12, 3, 4), (1, 1, 12, 11, 0), (3, 7, 100, 5, 2), (1, 4, 1, 2, 0)]


def make_case(rng, B, T, C, V, extra, dtype=np.float32):
    idx = rng.integers(0, V, size=(B, T)).astype(np.int32)
    wte = rng.standard_normal((V, C)).astype(dtype)
    wpe = rng.standard_normal((T + extra, C)).astype(dtype)
    return idx, wte, wpe


@pytest.mark.parametrize("B,T,C,V,extra", SHAPES)
def test_forward_matches_reference(rng, B, T, C, V, extra):
    idx, wte, wpe = make_case(rng, B, T, C, V, extra)
    out = np.full((B, T, C), np.nan, dtype=np.float32)  # written, so NaN must not survive
    expected = np.empty_like(out)
    embedding.embedding_forward(out, idx, wte, wpe, 2)
    embedding_forward_ref(expected, idx, wte, wpe)
    # One float32 addition per element, the same one NumPy does: exact, not just close.
    assert_bitwise_equal(out, expected, name="out")


@pytest.mark.parametrize("B,T,C,V,extra", SHAPES)
def test_backward_matches_reference(rng, B, T, C, V, extra):
    idx, wte, wpe = make_case(rng, B, T, C, V, extra)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    dwte0 = rng.standard_normal(wte.shape).astype(np.float32)
    dwpe0 = rng.standard_normal(wpe.shape).astype(np.float32)
    dwte, dwpe = dwte0.copy(), dwpe0.copy()
    ewte, ewpe = dwte0.copy(), dwpe0.copy()
    embedding.embedding_backward(dwte, dwpe, dout, idx, 2)
    embedding_backward_ref(ewte, ewpe, dout, idx)
    assert_close(dwte, ewte, name="dwte")
    assert_close(dwpe, ewpe, name="dwpe")
    # Rows of wpe past T get no gradient: they must be left exactly as they were.
    assert_bitwise_equal(dwpe[T:], dwpe0[T:], name="dwpe rows past T")
    unused = np.setdiff1d(np.arange(V), idx)
    assert_bitwise_equal(dwte[unused], dwte0[unused], name="dwte rows of unused tokens")


@pytest.mark.slow
def test_real_shape(rng):
    B, T, C, V = 32, 64, 256, 67
    idx, wte, wpe = make_case(rng, B, T, C, V, 0)
    out, expected = np.empty((B, T, C), np.float32), np.empty((B, T, C), np.float32)
    embedding.embedding_forward(out, idx, wte, wpe, 2)
    embedding_forward_ref(expected, idx, wte, wpe)
    assert_bitwise_equal(out, expected, name="out")
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    ewte, ewpe = np.zeros_like(wte), np.zeros_like(wpe)
    embedding.embedding_backward(dwte, dwpe, dout, idx, 2)
    embedding_backward_ref(ewte, ewpe, dout, idx)
    # Sums of ~30 (dwte) or 32 (dwpe) terms in a different grouping than NumPy's.
    assert_close(dwte, ewte, rtol=1e-5, atol=1e-5, name="dwte")
    assert_close(dwpe, ewpe, rtol=1e-5, atol=1e-5, name="dwpe")


def test_reference_backward_vs_finite_differences(rng):
    # V = 3 for 10 positions: every token repeats, which is what a plain dwte[idx] += would get wrong.
    B, T, C, V = 2, 5, 4, 3
    idx, wte, wpe = make_case(rng, B, T, C, V, 2, dtype=np.float64)
    assert len(np.unique(idx)) < idx.size
    weights = rng.standard_normal((B, T, C))
    out = np.empty((B, T, C))

    def f():
        embedding_forward_ref(out, idx, wte, wpe)
        return float(np.sum(out * weights))

    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    embedding_backward_ref(dwte, dwpe, weights, idx)
    assert_grad_close(dwte, numerical_grad(f, wte), name="dwte")
    assert_grad_close(dwpe, numerical_grad(f, wpe), name="dwpe")


def test_deterministic_across_threads(rng):
    B, T, C, V = 3, 7, 100, 5
    idx, wte, wpe = make_case(rng, B, T, C, V, 0)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    runs = []
    for n in thread_counts():
        out = np.empty((B, T, C), np.float32)
        embedding.embedding_forward(out, idx, wte, wpe, n)
        dwte, dwpe = np.ones_like(wte), np.ones_like(wpe)
        embedding.embedding_backward(dwte, dwpe, dout, idx, n)
        runs.append((out, dwte, dwpe))
    for out, dwte, dwpe in runs[1:]:
        assert_bitwise_equal(out, runs[0][0], name="out")
        assert_bitwise_equal(dwte, runs[0][1], name="dwte")
        assert_bitwise_equal(dwpe, runs[0][2], name="dwpe")


def test_backward_twice_is_exactly_twice(rng):
    B, T, C, V = 2, 5, 12, 3
    idx, wte, wpe = make_case(rng, B, T, C, V, 1)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    once_te, once_pe = np.zeros_like(wte), np.zeros_like(wpe)
    embedding.embedding_backward(once_te, once_pe, dout, idx, 2)
    twice_te, twice_pe = np.zeros_like(wte), np.zeros_like(wpe)
    for _ in range(2):
        embedding.embedding_backward(twice_te, twice_pe, dout, idx, 2)
    assert_bitwise_equal(twice_te, 2 * once_te, name="dwte")
    assert_bitwise_equal(twice_pe, 2 * once_pe, name="dwpe")


@pytest.mark.parametrize("bad", [-1, 11, 2**31 - 1])
def test_index_out_of_range(rng, bad):
    idx, wte, wpe = make_case(rng, 2, 5, 12, 11, 0)
    idx[1, 3] = bad
    out = np.empty((2, 5, 12), np.float32)
    with pytest.raises(ValueError, match=rf"idx\[1, 3\] = {bad} is out of range \[0, 11\)"):
        embedding.embedding_forward(out, idx, wte, wpe, 1)
    with pytest.raises(ValueError, match=r"idx\[1, 3\]"):
        embedding.embedding_backward(np.zeros_like(wte), np.zeros_like(wpe), out, idx, 1)


def test_bad_dtype_and_shape(rng):
    idx, wte, wpe = make_case(rng, 2, 5, 12, 11, 0)
    out = np.empty((2, 5, 12), np.float32)
    fwd = embedding.embedding_forward
    with pytest.raises(TypeError, match="idx must be int32"):
        fwd(out, idx.astype(np.int64), wte, wpe, 1)
    with pytest.raises(TypeError, match="wte must be float32"):
        fwd(out, idx, wte.astype(np.float64), wpe, 1)
    with pytest.raises(TypeError, match="out must be float32"):
        fwd(out.astype(np.float64), idx, wte, wpe, 1)
    with pytest.raises(ValueError, match=r"wpe has 4 rows \(shape \(4, 12\)\) but idx has T = 5"):
        fwd(out, idx, wte, wpe[:4].copy(), 1)
    with pytest.raises(ValueError, match=r"wpe shape \(5, 13\) does not match wte shape \(11, 12\)"):
        fwd(out, idx, wte, np.zeros((5, 13), np.float32), 1)
    with pytest.raises(ValueError, match=r"out has shape \(2, 5, 11\), expected \(2, 5, 12\)"):
        fwd(np.empty((2, 5, 11), np.float32), idx, wte, wpe, 1)
    with pytest.raises(ValueError, match="idx must be C-contiguous"):
        fwd(out, np.asfortranarray(idx), wte, wpe, 1)
    with pytest.raises(ValueError, match="idx must be 2-D"):
        fwd(out, idx.reshape(-1), wte, wpe, 1)
    bwd = embedding.embedding_backward
    with pytest.raises(ValueError, match=r"dout has shape \(2, 5, 11\), expected \(2, 5, 12\)"):
        bwd(np.zeros_like(wte), np.zeros_like(wpe), np.zeros((2, 5, 11), np.float32), idx, 1)
    with pytest.raises(ValueError, match=r"dwpe has 4 rows \(shape \(4, 12\)\) but idx has T = 5"):
        bwd(np.zeros_like(wte), np.zeros((4, 12), np.float32), out, idx, 1)
    with pytest.raises(ValueError, match=r"n_threads must be in \[1, \d+\], got 0"):
        bwd(np.zeros_like(wte), np.zeros_like(wpe), out, idx, 0)
    with pytest.raises(TypeError, match="n_threads must be an int"):
        fwd(out, idx, wte, wpe, 2.0)


def test_aliasing_rejected(rng):
    idx, wte, wpe = make_case(rng, 2, 5, 12, 11, 0)
    # out overlapping the token table it reads from.
    big = np.zeros(2 * 5 * 12 + 11 * 12, np.float32)
    out = big[: 2 * 5 * 12].reshape(2, 5, 12)
    wte_alias = big[2 * 5 * 12 - 12:][: 11 * 12].reshape(11, 12)
    with pytest.raises(ValueError, match="out .* must not share memory with wte"):
        embedding.embedding_forward(out, idx, wte_alias, wpe, 1)
    dout = rng.standard_normal((2, 5, 12)).astype(np.float32)
    table = np.zeros((16, 12), np.float32)
    with pytest.raises(ValueError, match="dwte .* must not share memory with dwpe"):
        embedding.embedding_backward(table[:11], table[5:], dout, idx, 1)
    with pytest.raises(ValueError, match="dwpe .* must not share memory with dout"):
        embedding.embedding_backward(np.zeros_like(wte), dout[0], dout, idx, 1)


def test_read_only_output_rejected(rng):
    idx, wte, wpe = make_case(rng, 2, 5, 12, 11, 0)
    out = np.empty((2, 5, 12), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        embedding.embedding_forward(out, idx, wte, wpe, 1)
