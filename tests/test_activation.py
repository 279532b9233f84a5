"""activation.pyx (squared ReLU, counter-hash dropout) against the NumPy references, the
references against finite differences, the dropout hash bit for bit, its keep rate and
independence, thread-count bit-identity, accumulation, and argument checks."""
import math

import numpy as np
import pytest
from conftest import (assert_bitwise_equal, assert_close, assert_grad_close, each_path,
                      numerical_grad, thread_counts)

from randygpt._kernels import activation as act
from randygpt._kernels._ref_activation import (dropout_add_forward_ref,
                                               dropout_add_to_forward_ref, dropout_backward_ref,
                                               dropout_forward_ref, dropout_key_ref,
                                               dropout_mask_ref,
                                               squared_relu_backward_inplace_ref,
                                               squared_relu_backward_ref,
                                               squared_relu_forward_ref)

# Tiny and odd, one row, one column, a 3-D array (the kernels are elementwise), one real size.
SHAPES = [(10, 12), (1, 12), (10, 1), (2, 5, 7), (2048, 1024)]
DROPOUT_SHAPES = [(10, 12), (1, 1), (3, 5, 7), (2048, 256)]
# Sizes whose flat length does not split evenly between 2 or 3 threads.
THREAD_SHAPES = [(5, 7), (37, 129)]
COUNTERS = dict(seed=1234, step=7, layer=3, site=1)


isa = each_path(act.available_isas, act.get_isa, act.set_isa)


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _mask(shape, p, seed, step, layer, site, n_threads=1):
    mask = np.empty(shape, np.float32)
    act.dropout_mask(mask, p, seed, step, layer, site, n_threads)
    return mask


# ------------------------------------------------------------------------------- squared ReLU

@pytest.mark.parametrize("shape", SHAPES)
def test_squared_relu_forward_matches_reference(rng, shape):
    x = _f32(rng, *shape)
    out = np.empty_like(x)
    act.squared_relu_forward(out, x, 2)
    out_ref = np.empty_like(x)
    squared_relu_forward_ref(out_ref, x)
    assert_close(out, out_ref, name="out")


@pytest.mark.parametrize("shape", SHAPES)
def test_squared_relu_backward_matches_reference(rng, shape):
    x, dout, dx0 = _f32(rng, *shape), _f32(rng, *shape), _f32(rng, *shape)
    dx = dx0.copy()
    act.squared_relu_backward(dx, dout, x, 2)
    dx_ref = dx0.copy()
    squared_relu_backward_ref(dx_ref, dout, x)
    assert_close(dx, dx_ref, name="dx")


def test_squared_relu_propagates_nan():
    x = np.array([[np.nan, -1.0, 2.0]], np.float32)
    out = np.empty_like(x)
    act.squared_relu_forward(out, x, 1)
    assert np.isnan(out[0, 0]) and out[0, 1] == 0 and out[0, 2] == 4


def test_squared_relu_backward_ref_matches_finite_differences(rng):
    # Away from 0, where relu(x)**2 has no kink within eps.
    x = rng.uniform(0.1, 2.0, (4, 5)) * rng.choice([-1.0, 1.0], (4, 5))
    g = rng.standard_normal((4, 5))

    def loss():
        out = np.empty_like(x)
        squared_relu_forward_ref(out, x)
        return float(np.sum(out * g))

    dx = np.zeros_like(x)
    squared_relu_backward_ref(dx, g, x)
    assert_grad_close(dx, numerical_grad(loss, x), name="squared relu dx")


@pytest.mark.parametrize("shape", THREAD_SHAPES)
def test_squared_relu_bit_identical_across_threads(rng, shape):
    x, dout = _f32(rng, *shape), _f32(rng, *shape)

    def run(nt):
        out, dx = np.empty_like(x), np.zeros_like(x)
        act.squared_relu_forward(out, x, nt)
        act.squared_relu_backward(dx, dout, x, nt)
        return out, dx

    out1, dx1 = run(1)
    for nt in thread_counts()[1:]:
        out, dx = run(nt)
        assert_bitwise_equal(out, out1, name=f"out, {nt} threads")
        assert_bitwise_equal(dx, dx1, name=f"dx, {nt} threads")


def test_squared_relu_backward_twice_is_exactly_double(rng):
    x, dout = _f32(rng, 9, 13), _f32(rng, 9, 13)
    dx = np.zeros_like(x)
    act.squared_relu_backward(dx, dout, x, 2)
    once = dx.copy()
    act.squared_relu_backward(dx, dout, x, 2)
    assert_bitwise_equal(dx, 2 * once, name="dx after two calls")


# ------------------------------------------------------------------------------- dropout hash

@pytest.mark.parametrize("counters", [
    (0, 0, 0, 0), (1234, 7, 3, 1), (2**63, 5000, 11, 2), (2**64 - 1, 2**40, 2**32, 2**64 - 1),
])
def test_dropout_key_matches_reference(counters):
    assert act.dropout_key(*counters) == dropout_key_ref(*counters)


@pytest.mark.parametrize("p, threshold", [(0.0, 0), (0.1, 1677722), (0.5, 8388608),
                                          (2.0**-25, 1), (2.0**-26, 0)])
def test_dropout_threshold_rounds_half_up(p, threshold):
    assert act.dropout_threshold(p) == threshold


@pytest.mark.parametrize("shape", DROPOUT_SHAPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.999])
def test_dropout_mask_matches_reference_bit_for_bit(isa, shape, p):
    mask = _mask(shape, p, 2**63 + 5, 4242, 5, 1, n_threads=2)
    mask_ref = np.empty(shape, np.float32)
    dropout_mask_ref(mask_ref, p, 2**63 + 5, 4242, 5, 1)
    assert_bitwise_equal(mask, mask_ref, name="mask")
    scale = np.float32(1.0 / (1.0 - p))
    assert np.all((mask == 0) | (mask == scale))


def _six_sigma(p, n):
    return 6.0 * math.sqrt(p * (1.0 - p) / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate_is_one_minus_p(p):
    # 2**19 decisions: 6 standard deviations of the kept fraction is under 0.5 %, so a correct
    # hash fails this with probability ~1e-9, a biased one (off by 1 %) always does.
    shape = (2048, 256)
    mask = _mask(shape, p, **COUNTERS)
    kept = mask != 0
    n = kept.size
    assert abs(kept.mean() - (1.0 - p)) < _six_sigma(p, n), kept.mean()
    # Neighbouring decisions are independent: both kept with probability (1-p)**2.
    both = (kept[:, 1:] & kept[:, :-1]).mean()
    q = (1.0 - p) ** 2
    assert abs(both - q) < _six_sigma(q, n - shape[0]), both
    # No column or row pattern: the kept fraction is the same in each half of either axis.
    for half in (kept[:, :128], kept[:, 128:], kept[:1024], kept[1024:]):
        assert abs(half.mean() - (1.0 - p)) < _six_sigma(p, half.size)


@pytest.mark.parametrize("which", ["seed", "step", "layer", "site"])
def test_dropout_masks_are_independent_across_counters(which):
    # Changing any one counter must give a fresh mask: two independent masks agree on an element
    # with probability (1-p)**2 + p**2 (0.82 for p = 0.1), an identical or shifted one far more.
    p = 0.1
    shape = (1024, 256)
    base = _mask(shape, p, **COUNTERS) != 0
    for delta in (1, 2, 1000):
        counters = dict(COUNTERS)
        counters[which] += delta
        other = _mask(shape, p, **counters) != 0
        agree = (base == other).mean()
        q = (1.0 - p) ** 2 + p ** 2
        assert abs(agree - q) < _six_sigma(q, base.size), (which, delta, agree)


def test_dropout_mask_is_a_function_of_the_flat_index():
    # The same counters give the same decisions for element i whatever the array's shape.
    a = _mask((6, 10), 0.3, **COUNTERS)
    b = _mask((60,), 0.3, **COUNTERS)
    c = _mask((4, 15), 0.3, **COUNTERS)
    assert_bitwise_equal(a.reshape(-1), b, name="(6,10) vs (60,)")
    assert_bitwise_equal(c.reshape(-1), b, name="(4,15) vs (60,)")


def test_dropout_offset_gives_a_slice_the_masks_of_the_whole(isa, rng):
    # Rows [r, r + n) of an (N, C) tensor, processed alone with offset r * C (as a
    # data-parallel rank does), get exactly the decisions a call over all N rows gives them.
    N, C, r, n = 12, 10, 5, 4
    whole = _mask((N, C), 0.3, **COUNTERS)
    part = np.empty((n, C), dtype=np.float32)
    act.dropout_mask(part, 0.3, **COUNTERS, n_threads=2, offset=r * C)
    assert_bitwise_equal(part, whole[r:r + n], name="mask rows [5, 9)")
    ref = np.empty_like(part)
    dropout_mask_ref(ref, 0.3, *COUNTERS.values(), offset=r * C)
    assert_bitwise_equal(part, ref, name="mask vs reference")
    x, resid = _f32(rng, n, C), _f32(rng, n, C)
    for kernel, reference, args in (
            (act.dropout_forward, dropout_forward_ref, (np.empty_like(x), x)),
            (act.dropout_backward, dropout_backward_ref, (resid.copy(), x)),
            (act.dropout_add_forward, dropout_add_forward_ref, (resid.copy(), x)),
            (act.dropout_add_to_forward, dropout_add_to_forward_ref, (np.empty_like(x), resid, x))):
        ours = [a.copy() for a in args]
        kernel(*ours, 0.3, **COUNTERS, n_threads=2, offset=r * C)
        theirs = [a.copy() for a in args]
        reference(*theirs, 0.3, *COUNTERS.values(), offset=r * C)
        assert_bitwise_equal(ours[0], theirs[0], name=kernel.__name__)
    with pytest.raises(ValueError, match="offset"):
        act.dropout_mask(part, 0.3, **COUNTERS, n_threads=1, offset=-1)
    with pytest.raises(TypeError, match="offset"):
        act.dropout_mask(part, 0.3, **COUNTERS, n_threads=1, offset=1.5)


def test_dropout_p_zero_is_identity(isa, rng):
    x, r0 = _f32(rng, 7, 9), _f32(rng, 7, 9)
    assert np.all(_mask((7, 9), 0.0, **COUNTERS) == 1)
    out = np.empty_like(x)
    act.dropout_forward(out, x, 0.0, **COUNTERS, n_threads=2)
    assert_bitwise_equal(out, x, name="dropout(x, p=0)")
    resid = r0.copy()
    act.dropout_add_forward(resid, x, 0.0, **COUNTERS, n_threads=2)
    assert_bitwise_equal(resid, r0 + x, name="resid + dropout(x, p=0)")
    dx = r0.copy()
    act.dropout_backward(dx, x, 0.0, **COUNTERS, n_threads=2)
    assert_bitwise_equal(dx, r0 + x, name="dx + dout (p=0)")


# ------------------------------------------------------------------------------- dropout kernels

@pytest.mark.parametrize("shape", DROPOUT_SHAPES)
def test_dropout_forward_matches_reference(isa, rng, shape):
    x = _f32(rng, *shape)
    out = np.empty_like(x)
    act.dropout_forward(out, x, 0.2, **COUNTERS, n_threads=2)
    out_ref = np.empty_like(x)
    dropout_forward_ref(out_ref, x, 0.2, **COUNTERS)
    # One float32 product per element on both sides: identical, not just close.
    assert_bitwise_equal(out, out_ref, name="out")


@pytest.mark.parametrize("shape", DROPOUT_SHAPES)
def test_dropout_backward_and_add_match_reference(isa, rng, shape):
    # Bit for bit: the kernels never fuse a += b * mask into an FMA (fp-contract is off), so
    # they round exactly as NumPy does (a product, then a sum).
    dout, start = _f32(rng, *shape), _f32(rng, *shape)
    dx = start.copy()
    act.dropout_backward(dx, dout, 0.2, **COUNTERS, n_threads=2)
    dx_ref = start.copy()
    dropout_backward_ref(dx_ref, dout, 0.2, **COUNTERS)
    assert_bitwise_equal(dx, dx_ref, name="dx")
    resid = start.copy()
    act.dropout_add_forward(resid, dout, 0.2, **COUNTERS, n_threads=2)
    resid_ref = start.copy()
    dropout_add_forward_ref(resid_ref, dout, 0.2, **COUNTERS)
    assert_bitwise_equal(resid, resid_ref, name="resid")


def test_dropout_add_equals_resid_plus_dropout_forward(isa, rng):
    x, r0 = _f32(rng, 33, 17), _f32(rng, 33, 17)
    y = np.empty_like(x)
    act.dropout_forward(y, x, 0.25, **COUNTERS, n_threads=1)
    resid = r0.copy()
    act.dropout_add_forward(resid, x, 0.25, **COUNTERS, n_threads=1)
    assert_bitwise_equal(resid, r0 + y, name="resid")


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("shape", DROPOUT_SHAPES)
def test_dropout_add_to_matches_copy_then_add(isa, rng, shape, p):
    # The one-pass residual update equals the two-pass one it replaces, and the reference.
    x, r0 = _f32(rng, *shape), _f32(rng, *shape)
    out = np.full_like(x, np.nan)
    act.dropout_add_to_forward(out, r0, x, p, **COUNTERS, n_threads=2)
    two_pass = r0.copy()
    act.dropout_add_forward(two_pass, x, p, **COUNTERS, n_threads=2)
    assert_bitwise_equal(out, two_pass, name="out vs copy + dropout_add")
    expected = np.empty_like(x)
    dropout_add_to_forward_ref(expected, r0, x, p, **COUNTERS)
    assert_bitwise_equal(out, expected, name="out vs reference")


def test_dropout_add_to_accepts_resid_equal_to_x_and_rejects_out_aliases(rng):
    x = _f32(rng, 6, 5)
    out = np.empty_like(x)
    act.dropout_add_to_forward(out, x, x, 0.3, **COUNTERS, n_threads=2)
    expected = np.empty_like(x)
    dropout_add_to_forward_ref(expected, x, x, 0.3, **COUNTERS)
    assert_bitwise_equal(out, expected, name="out with resid is x")
    for resid, xin in ((out, x), (x, out)):
        with pytest.raises(ValueError, match="out .* must not share memory"):
            act.dropout_add_to_forward(out, resid, xin, 0.1, **COUNTERS, n_threads=1)
    with pytest.raises(ValueError, match="resid has shape"):
        act.dropout_add_to_forward(out, x[:3], x, 0.1, **COUNTERS, n_threads=1)


@pytest.mark.parametrize("shape", SHAPES)
def test_squared_relu_backward_inplace_equals_backward_into_zeros(rng, shape):
    x, dout = _f32(rng, *shape), _f32(rng, *shape)
    x.flat[::7] = 0.0  # the kink: gradient 0 there
    d = dout.copy()
    act.squared_relu_backward_inplace(d, x, 2)
    dx = np.zeros_like(x)
    act.squared_relu_backward(dx, dout, x, 2)
    # Equal up to the sign of zero (0 + (-0) is +0): compare as values, then bit for bit on the
    # nonzero entries.
    np.testing.assert_array_equal(d, dx)
    nz = dx != 0
    assert_bitwise_equal(d[nz], dx[nz], name="d (nonzero entries)")
    expected = dout.copy()
    squared_relu_backward_inplace_ref(expected, x)
    assert_close(d, expected, name="d vs reference")
    for nt in thread_counts()[1:]:
        again = dout.copy()
        act.squared_relu_backward_inplace(again, x, nt)
        assert_bitwise_equal(again, d, name=f"d, {nt} threads")


def test_squared_relu_backward_inplace_rejects_aliasing_and_shapes(rng):
    x = _f32(rng, 4, 6)
    with pytest.raises(ValueError, match="must not share memory"):
        act.squared_relu_backward_inplace(x, x, 1)
    with pytest.raises(ValueError, match="x has shape"):
        act.squared_relu_backward_inplace(x.copy(), x[:2], 1)
    with pytest.raises(TypeError, match="d must be float32"):
        act.squared_relu_backward_inplace(x.astype(np.float64), x, 1)


def test_dropout_isa_selection():
    isas = act.available_isas()
    assert isas[-1] == "sse2" and act.get_isa() in isas
    with pytest.raises(ValueError, match="set_isa: isa must be one of"):
        act.set_isa("avx9000")


def test_dropout_backward_ref_matches_finite_differences(rng):
    x = rng.standard_normal((4, 6))
    g = rng.standard_normal((4, 6))

    def loss():  # the mask is fixed by the counters, so dropout is linear in x
        out = np.empty_like(x)
        dropout_forward_ref(out, x, 0.3, **COUNTERS)
        return float(np.sum(out * g))

    dx = np.zeros_like(x)
    dropout_backward_ref(dx, g, 0.3, **COUNTERS)
    assert np.any(dx == 0) and np.any(dx != 0), "pick counters that drop some but not all"
    assert_grad_close(dx, numerical_grad(loss, x), name="dropout dx")


@pytest.mark.parametrize("shape", THREAD_SHAPES)
def test_dropout_bit_identical_across_threads(isa, rng, shape):
    x, start = _f32(rng, *shape), _f32(rng, *shape)

    def run(nt):
        mask = _mask(shape, 0.1, **COUNTERS, n_threads=nt)
        out = np.empty_like(x)
        act.dropout_forward(out, x, 0.1, **COUNTERS, n_threads=nt)
        dx = start.copy()
        act.dropout_backward(dx, x, 0.1, **COUNTERS, n_threads=nt)
        resid = start.copy()
        act.dropout_add_forward(resid, x, 0.1, **COUNTERS, n_threads=nt)
        return dict(mask=mask, out=out, dx=dx, resid=resid)

    base = run(1)
    for nt in thread_counts()[1:]:
        got = run(nt)
        for name in base:
            assert_bitwise_equal(got[name], base[name], name=f"{name}, {nt} threads")


def test_dropout_backward_twice_is_exactly_double(rng):
    dout = _f32(rng, 9, 13)
    dx = np.zeros_like(dout)
    act.dropout_backward(dx, dout, 0.3, **COUNTERS, n_threads=2)
    once = dx.copy()
    act.dropout_backward(dx, dout, 0.3, **COUNTERS, n_threads=2)
    assert_bitwise_equal(dx, 2 * once, name="dx after two calls")


def test_empty_arrays_are_accepted():
    x = np.empty((0, 5), np.float32)
    act.squared_relu_forward(np.empty_like(x), x, 2)
    act.squared_relu_backward(np.empty_like(x), x.copy(), x, 2)
    act.dropout_mask(np.empty_like(x), 0.1, **COUNTERS, n_threads=2)
    act.dropout_add_forward(np.empty_like(x), x, 0.1, **COUNTERS, n_threads=2)


# ------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("change, error, match", [
    (dict(p=1.0), ValueError, r"p must be finite and in \[0, 1\), got 1.0"),
    (dict(p=-0.1), ValueError, r"p must be finite and in \[0, 1\), got -0.1"),
    (dict(p=float("nan")), ValueError, r"p must be finite and in \[0, 1\), got nan"),
    (dict(p="0.1"), TypeError, "p must be a real number"),
    (dict(seed=-1), ValueError,
     rf"seed must be in \[0, {2**64 - 1}\] \(a 64-bit counter: below 2\*\*64\), got -1$"),
    (dict(seed=2**64), ValueError, rf"seed must be in \[0, {2**64 - 1}\] .*, got {2**64}$"),
    (dict(step=1.0), TypeError, "step must be an int"),
    (dict(layer=None), TypeError, "layer must be an int"),
    (dict(site=-3), ValueError, "site must be in"),
    (dict(n_threads=0), ValueError, r"n_threads must be in \[1, "),
    (dict(n_threads=1.0), TypeError, "n_threads must be an int"),
])
def test_dropout_rejects_bad_scalars(rng, change, error, match):
    args = dict(p=0.1, **COUNTERS, n_threads=1)
    args.update(change)
    x = _f32(rng, 3, 4)
    with pytest.raises(error, match=match):
        act.dropout_forward(np.empty_like(x), x, **args)


def test_dropout_add_rejects_resid_aliasing_x(rng):
    x = _f32(rng, 4, 6)
    with pytest.raises(ValueError, match="resid .* must not share memory with x"):
        act.dropout_add_forward(x, x, 0.1, **COUNTERS, n_threads=1)
    buf = _f32(rng, 5 * 6)
    with pytest.raises(ValueError, match="resid .* must not share memory with x"):
        act.dropout_add_forward(buf[:24].reshape(4, 6), buf[6:].reshape(4, 6), 0.1, **COUNTERS,
                                n_threads=1)


@pytest.mark.parametrize("call", [
    lambda out, x: act.squared_relu_forward(out, x, 1),
    lambda out, x: act.squared_relu_backward(out, x, x, 1),
    lambda out, x: act.dropout_forward(out, x, 0.1, **COUNTERS, n_threads=1),
    lambda out, x: act.dropout_backward(out, x, 0.1, **COUNTERS, n_threads=1),
    lambda out, x: act.dropout_add_forward(out, x, 0.1, **COUNTERS, n_threads=1),
])
def test_elementwise_kernels_reject_bad_arrays(rng, call):
    x = _f32(rng, 4, 6)
    out = np.empty_like(x)
    with pytest.raises(TypeError, match="must be float32, got float64"):
        call(out, x.astype(np.float64))
    with pytest.raises(TypeError, match="must be a numpy.ndarray"):
        call(out, x.tolist())
    with pytest.raises(ValueError, match=r"has shape \(4, 5\), expected \(4, 6\)"):
        call(out, x[:, :5].copy())
    with pytest.raises(ValueError, match="must be C-contiguous"):
        call(out, _f32(rng, 4, 12)[:, ::2])
    with pytest.raises(ValueError, match="must not share memory"):
        call(x, x)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="must be writeable, got a read-only array"):
        call(out, x)


def test_dropout_mask_rejects_bad_mask(rng):
    with pytest.raises(TypeError, match="mask must be float32"):
        act.dropout_mask(np.empty((3, 4)), 0.1, **COUNTERS, n_threads=1)
    with pytest.raises(ValueError, match="mask must be C-contiguous"):
        act.dropout_mask(np.empty((3, 8), np.float32)[:, ::2], 0.1, **COUNTERS, n_threads=1)
