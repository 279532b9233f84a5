"""norm.pyx (RMSNorm, LayerNorm) against the NumPy references, the references against finite
differences, thread-count bit-identity, accumulation, and argument checks."""
import numpy as np
import pytest
from conftest import (assert_bitwise_equal, assert_close, assert_grad_close, numerical_grad,
                      thread_counts)

from randygpt._kernels import norm
from randygpt._kernels._ref_norm import (layernorm_backward_ref, layernorm_forward_ref,
                                         rmsnorm_backward_ref, rmsnorm_forward_ref)

EPS = 1e-5
# Tiny and odd (C not a multiple of the 8 summation lanes), one row, one column, and one real size.
SHAPES = [(10, 12), (1, 12), (10, 1), (7, 33), (2048, 256)]
# N = 37 and 100 are not multiples of LayerNorm's 32 row chunks; N = 5 has fewer rows than chunks.
THREAD_SHAPES = [(5, 12), (37, 20), (100, 33)]


def _f32(rng, *shape, scale=1.0, shift=0.0):
    return (rng.standard_normal(shape) * scale + shift).astype(np.float32)


def _ln_params(rng, C, dtype=np.float32):
    weight = (1.0 + 0.5 * rng.standard_normal(C)).astype(dtype)
    bias = (0.5 * rng.standard_normal(C)).astype(dtype)
    return weight, bias


def _rms_forward(x, n_threads=1):
    N, C = x.shape
    out = np.empty((N, C), np.float32)
    rstd = np.empty(N, np.float32)
    norm.rmsnorm_forward(out, rstd, x, EPS, n_threads)
    return out, rstd


def _ln_forward(x, weight, bias, n_threads=1):
    N, C = x.shape
    out = np.empty((N, C), np.float32)
    mean = np.empty(N, np.float32)
    rstd = np.empty(N, np.float32)
    norm.layernorm_forward(out, mean, rstd, x, weight, bias, EPS, n_threads)
    return out, mean, rstd


# ------------------------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_forward_matches_reference(rng, shape):
    x = _f32(rng, *shape, scale=2.0, shift=0.3)
    out, rstd = _rms_forward(x, n_threads=2)
    out_ref = np.empty_like(x)
    rstd_ref = np.empty(shape[0], np.float32)
    rmsnorm_forward_ref(out_ref, rstd_ref, x, EPS)
    assert_close(rstd, rstd_ref, name="rstd")
    assert_close(out, out_ref, name="out")


@pytest.mark.parametrize("shape", SHAPES)
def test_rmsnorm_backward_matches_reference(rng, shape):
    x = _f32(rng, *shape, shift=0.3)
    dout = _f32(rng, *shape)
    _, rstd = _rms_forward(x)
    dx0 = _f32(rng, *shape)  # non-zero start: the gradient must be added, not written
    dx = dx0.copy()
    norm.rmsnorm_backward(dx, dout, x, rstd, 2)
    dx_ref = dx0.copy()
    rmsnorm_backward_ref(dx_ref, dout, x, rstd)
    assert_close(dx, dx_ref, name="dx")


def test_rmsnorm_backward_ref_matches_finite_differences(rng):
    N, C = 3, 7
    x = rng.standard_normal((N, C)) + 0.2
    g = rng.standard_normal((N, C))

    def loss():
        out = np.empty((N, C))
        rstd = np.empty(N)
        rmsnorm_forward_ref(out, rstd, x, EPS)
        return float(np.sum(out * g))

    out = np.empty((N, C))
    rstd = np.empty(N)
    rmsnorm_forward_ref(out, rstd, x, EPS)
    dx = np.zeros((N, C))
    rmsnorm_backward_ref(dx, g, x, rstd)
    assert_grad_close(dx, numerical_grad(loss, x), name="rmsnorm dx")


@pytest.mark.parametrize("shape", THREAD_SHAPES)
def test_rmsnorm_bit_identical_across_threads(rng, shape):
    x = _f32(rng, *shape)
    dout = _f32(rng, *shape)
    out1, rstd1 = _rms_forward(x, 1)
    dx1 = np.zeros(shape, np.float32)
    norm.rmsnorm_backward(dx1, dout, x, rstd1, 1)
    for nt in thread_counts()[1:]:
        out, rstd = _rms_forward(x, nt)
        dx = np.zeros(shape, np.float32)
        norm.rmsnorm_backward(dx, dout, x, rstd, nt)
        assert_bitwise_equal(out, out1, name=f"out, {nt} threads")
        assert_bitwise_equal(rstd, rstd1, name=f"rstd, {nt} threads")
        assert_bitwise_equal(dx, dx1, name=f"dx, {nt} threads")


def test_rmsnorm_backward_twice_is_exactly_double(rng):
    x = _f32(rng, 9, 13)
    dout = _f32(rng, 9, 13)
    _, rstd = _rms_forward(x)
    dx = np.zeros_like(x)
    norm.rmsnorm_backward(dx, dout, x, rstd, 2)
    once = dx.copy()
    norm.rmsnorm_backward(dx, dout, x, rstd, 2)
    assert_bitwise_equal(dx, 2 * once, name="dx after two calls")


def test_rmsnorm_zero_row_gives_finite_output():
    # eps keeps rstd finite for an all-zero row.
    x = np.zeros((2, 8), np.float32)
    out, rstd = _rms_forward(x)
    assert np.all(out == 0)
    assert_close(rstd, np.full(2, 1 / np.sqrt(EPS), np.float32), name="rstd")


# ------------------------------------------------------------------------------- LayerNorm

@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm_forward_matches_reference(rng, shape):
    # A large shift against a small spread: the two-pass variance must not cancel.
    x = _f32(rng, *shape, scale=0.5, shift=20.0)
    weight, bias = _ln_params(rng, shape[1])
    out, mean, rstd = _ln_forward(x, weight, bias, n_threads=2)
    out_ref = np.empty_like(x)
    mean_ref = np.empty(shape[0], np.float32)
    rstd_ref = np.empty(shape[0], np.float32)
    layernorm_forward_ref(out_ref, mean_ref, rstd_ref, x, weight, bias, EPS)
    assert_close(mean, mean_ref, name="mean")
    assert_close(rstd, rstd_ref, name="rstd")
    # out = (x - mean) * rstd: mean is float32, so x - mean carries the rounding of a value near 20
    # (an absolute 1e-6) amplified by rstd (about 2); atol covers that, rtol stays 1e-5.
    assert_close(out, out_ref, atol=1e-5, name="out")


@pytest.mark.parametrize("shape", SHAPES)
def test_layernorm_backward_matches_reference(rng, shape):
    N, C = shape
    x = _f32(rng, N, C, shift=0.3)
    dout = _f32(rng, N, C)
    weight, bias = _ln_params(rng, C)
    _, mean, rstd = _ln_forward(x, weight, bias)
    dx0, dw0, db0 = _f32(rng, N, C), _f32(rng, C), _f32(rng, C)
    dx, dw, db = dx0.copy(), dw0.copy(), db0.copy()
    norm.layernorm_backward(dx, dw, db, dout, x, mean, rstd, weight, 2)
    dx_ref, dw_ref, db_ref = dx0.copy(), dw0.copy(), db0.copy()
    layernorm_backward_ref(dx_ref, dw_ref, db_ref, dout, x, mean, rstd, weight)
    assert_close(dx, dx_ref, name="dx")
    # dweight/dbias are sums of N terms in a different order (chunked vs NumPy's); both are
    # accumulated in double, so float32 storage rounding dominates.
    assert_close(dw, dw_ref, name="dweight")
    assert_close(db, db_ref, name="dbias")


def test_layernorm_backward_ref_matches_finite_differences(rng):
    N, C = 3, 7
    x = rng.standard_normal((N, C)) + 0.2
    weight, bias = _ln_params(rng, C, np.float64)
    g = rng.standard_normal((N, C))

    def loss():
        out = np.empty((N, C))
        layernorm_forward_ref(out, np.empty(N), np.empty(N), x, weight, bias, EPS)
        return float(np.sum(out * g))

    out, mean, rstd = np.empty((N, C)), np.empty(N), np.empty(N)
    layernorm_forward_ref(out, mean, rstd, x, weight, bias, EPS)
    dx, dw, db = np.zeros((N, C)), np.zeros(C), np.zeros(C)
    layernorm_backward_ref(dx, dw, db, g, x, mean, rstd, weight)
    assert_grad_close(dx, numerical_grad(loss, x), name="layernorm dx")
    assert_grad_close(dw, numerical_grad(loss, weight), name="layernorm dweight")
    assert_grad_close(db, numerical_grad(loss, bias), name="layernorm dbias")


def test_thread_shapes_cover_uneven_chunks():
    chunks = norm.LN_ROW_CHUNKS
    assert any(N < chunks for N, _ in THREAD_SHAPES)
    assert any(N > chunks and N % chunks for N, _ in THREAD_SHAPES)


@pytest.mark.parametrize("shape", THREAD_SHAPES)
def test_layernorm_bit_identical_across_threads(rng, shape):
    N, C = shape
    x = _f32(rng, N, C)
    dout = _f32(rng, N, C)
    weight, bias = _ln_params(rng, C)

    def run(nt):
        out, mean, rstd = _ln_forward(x, weight, bias, nt)
        dx, dw, db = np.zeros((N, C), np.float32), np.zeros(C, np.float32), np.zeros(C, np.float32)
        norm.layernorm_backward(dx, dw, db, dout, x, mean, rstd, weight, nt)
        return dict(out=out, mean=mean, rstd=rstd, dx=dx, dweight=dw, dbias=db)

    base = run(1)
    for nt in thread_counts()[1:]:
        got = run(nt)
        for name in base:
            assert_bitwise_equal(got[name], base[name], name=f"{name}, {nt} threads")


def test_layernorm_backward_twice_is_exactly_double(rng):
    N, C = 40, 13
    x = _f32(rng, N, C)
    dout = _f32(rng, N, C)
    weight, bias = _ln_params(rng, C)
    _, mean, rstd = _ln_forward(x, weight, bias)
    grads = [np.zeros((N, C), np.float32), np.zeros(C, np.float32), np.zeros(C, np.float32)]
    norm.layernorm_backward(*grads, dout, x, mean, rstd, weight, 3)
    once = [g.copy() for g in grads]
    norm.layernorm_backward(*grads, dout, x, mean, rstd, weight, 3)
    for name, g, g1 in zip(("dx", "dweight", "dbias"), grads, once):
        assert_bitwise_equal(g, 2 * g1, name=f"{name} after two calls")


def test_empty_batch_is_accepted():
    x = np.empty((0, 6), np.float32)
    ones, zeros = np.ones(6, np.float32), np.zeros(6, np.float32)
    norm.rmsnorm_forward(np.empty_like(x), np.empty(0, np.float32), x, EPS, 2)
    norm.rmsnorm_backward(np.empty_like(x), x.copy(), x, np.empty(0, np.float32), 2)
    norm.layernorm_forward(np.empty_like(x), np.empty(0, np.float32), np.empty(0, np.float32), x,
                           ones, zeros, EPS, 2)
    dw, db = zeros.copy(), zeros.copy()
    norm.layernorm_backward(np.empty_like(x), dw, db, x.copy(), x, np.empty(0, np.float32),
                            np.empty(0, np.float32), ones, 2)
    assert np.all(dw == 0) and np.all(db == 0)


# ------------------------------------------------------------------------------- bad inputs

def _rms_args(rng, N=4, C=6):
    return dict(out=np.empty((N, C), np.float32), rstd=np.empty(N, np.float32),
                x=_f32(rng, N, C), eps=EPS, n_threads=1)


def _ln_bwd_args(rng, N=4, C=6):
    return dict(dx=np.zeros((N, C), np.float32), dweight=np.zeros(C, np.float32),
                dbias=np.zeros(C, np.float32), dout=_f32(rng, N, C), x=_f32(rng, N, C),
                mean=np.zeros(N, np.float32), rstd=np.ones(N, np.float32),
                weight=np.ones(C, np.float32), n_threads=1)


_RECIPES = {"f64", "strided", "short", "wide", "is_x", "is_dbias", "readonly", "list",
            "no_columns", "overlaps_dout"}


def _break(args, change):
    """Apply one bad-input recipe per argument: {name: recipe}; anything that is not one of
    _RECIPES is the bad value itself."""
    for key, what in change.items():
        a = args[key]
        if not isinstance(what, str) or what not in _RECIPES:
            args[key] = what
        elif what == "f64":
            args[key] = a.astype(np.float64)
        elif what == "strided":
            args[key] = np.empty((a.shape[0], 2 * a.shape[1]), np.float32)[:, ::2]
        elif what == "short":
            args[key] = np.ones(a.shape[0] - 1, np.float32)
        elif what == "wide":
            args[key] = np.empty((a.shape[0], a.shape[1] + 1), np.float32)
        elif what in ("is_x", "is_dbias"):
            args[key] = args[what[3:]]
        elif what == "readonly":
            a.flags.writeable = False
        elif what == "list":
            args[key] = a.tolist()
        elif what == "no_columns":
            args[key] = np.empty((a.shape[0], 0), np.float32)
        elif what == "overlaps_dout":
            # dout starts one row into the same buffer.
            buf = np.zeros((a.shape[0] + 1) * a.shape[1], np.float32)
            args["dout"] = buf[a.shape[1]:].reshape(a.shape)
            args[key] = buf[:a.size].reshape(a.shape)
    return args


@pytest.mark.parametrize("change, error, match", [
    (dict(x="f64"), TypeError, "x must be float32"),
    (dict(x="strided"), ValueError, "x must be C-contiguous"),
    (dict(rstd="short"), ValueError, r"rstd has shape \(3,\), expected \(4,\)"),
    (dict(out="wide"), ValueError, r"out has shape \(4, 7\), expected \(4, 6\)"),
    (dict(out="is_x"), ValueError, "out .* must not share memory with x"),
    (dict(out="readonly"), ValueError, "out must be writeable, got a read-only array"),
    (dict(x="list"), TypeError, "x must be a numpy.ndarray"),
    (dict(x="no_columns", out="no_columns"), ValueError, "x must have at least one column"),
    (dict(eps=-1.0), ValueError, "eps must be finite and >= 0"),
    (dict(eps="1e-5"), TypeError, "eps must be a real number"),
    (dict(n_threads=0), ValueError, r"n_threads must be in \[1, "),
    (dict(n_threads=2.0), TypeError, "n_threads must be an int"),
])
def test_rmsnorm_forward_rejects_bad_input(rng, change, error, match):
    args = _break(_rms_args(rng), change)
    with pytest.raises(error, match=match):
        norm.rmsnorm_forward(**args)


def test_rmsnorm_backward_rejects_aliased_dx(rng):
    x = _f32(rng, 4, 6)
    with pytest.raises(ValueError, match="dx .* must not share memory with dout"):
        norm.rmsnorm_backward(x, x, _f32(rng, 4, 6), np.ones(4, np.float32), 1)


@pytest.mark.parametrize("change, error, match", [
    (dict(weight="f64"), TypeError, "weight must be float32"),
    (dict(weight="short"), ValueError, r"weight has shape \(5,\), expected \(6,\)"),
    (dict(mean="short"), ValueError, r"mean has shape \(3,\), expected \(4,\)"),
    (dict(dweight="is_dbias"), ValueError, "dweight .* must not share memory with dbias"),
    (dict(dx="overlaps_dout"), ValueError, "dx .* must not share memory with dout"),
    (dict(n_threads=-1), ValueError, r"n_threads must be in \[1, "),
    (dict(n_threads=True), TypeError, "n_threads must be an int"),
])
def test_layernorm_backward_rejects_bad_input(rng, change, error, match):
    args = _break(_ln_bwd_args(rng), change)
    with pytest.raises(error, match=match):
        norm.layernorm_backward(**args)


def test_layernorm_forward_rejects_bad_bias(rng):
    x = _f32(rng, 4, 6)
    with pytest.raises(TypeError, match="bias must be float32"):
        norm.layernorm_forward(np.empty_like(x), np.empty(4, np.float32), np.empty(4, np.float32),
                               x, np.ones(6, np.float32), np.zeros(6, np.int32), EPS, 1)
