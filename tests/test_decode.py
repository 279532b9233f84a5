"""decode.pyx (the one-token step's products and attention) against the NumPy references on
every SIMD path this CPU runs, bit-identity across thread counts and across how the work is
cut (rows of x, output channels, new rows), and argument checks. Inference-only kernels:
there is no backward, so no gradient checks."""
import numpy as np
import pytest
from conftest import assert_bitwise_equal, assert_close, each_path, thread_counts

from randygpt._kernels import decode
from randygpt._kernels.reference import (decode_attention_forward_ref,
                                         decode_matmul_forward_ref,
                                         decode_matmul_sqrelu_forward_ref)

# (n, IC, OC): one row as in a decode step, a few rows as in a prompt; IC not a multiple of
# any vector width (the scalar tail) or of two vectors, OC not a multiple of the 4- and
# 8-row groups or of the 16-row chunks; one real size per product shape of the default model.
MATMUL_SHAPES = [(1, 12, 36), (3, 37, 19), (5, 7, 3), (2, 33, 17), (1, 1, 1), (4, 64, 67),
                 (1, 256, 768), (2, 1024, 256)]
# (Tc, t0, n, C, NH): one new row at the end, in the middle and first; several rows; the whole
# cache at once; a head size that is not a multiple of any vector width.
ATTENTION_SHAPES = [(8, 7, 1, 12, 3), (8, 3, 1, 12, 3), (8, 0, 1, 12, 3), (9, 4, 5, 15, 5),
                    (16, 0, 16, 12, 3), (10, 2, 3, 6, 2), (64, 48, 1, 256, 8)]


isa = each_path(decode.available_isas, decode.get_isa, decode.set_isa)


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _tol(IC):
    # A dot product of IC unit-size terms carries rounding errors of the terms' size, not the
    # result's: a result that cancels to near 0 needs an absolute bound that grows with IC
    # (test_matmul.py's bound for the same reason).
    return dict(rtol=1e-5, atol=5e-7 * max(IC, 1))


# ------------------------------------------------------------------------ against the references

@pytest.mark.parametrize("shape", MATMUL_SHAPES)
def test_matmul_matches_reference(rng, isa, shape):
    n, IC, OC = shape
    x, w, out0 = _f32(rng, n, IC), _f32(rng, OC, IC), _f32(rng, n, OC)
    for accumulate in (False, True):
        out, ref = out0.copy(), out0.copy()
        decode.decode_matmul_forward(out, x, w, 2, accumulate=accumulate)
        decode_matmul_forward_ref(ref, x, w, accumulate=accumulate)
        assert_close(out, ref, **_tol(IC), name=f"out (accumulate={accumulate}, {isa})")


@pytest.mark.parametrize("shape", MATMUL_SHAPES)
def test_matmul_sqrelu_matches_reference(rng, isa, shape):
    n, IC, OC = shape
    x, w = _f32(rng, n, IC), _f32(rng, OC, IC)
    out, ref = np.full((n, OC), np.nan, np.float32), np.empty((n, OC), np.float32)
    decode.decode_matmul_sqrelu_forward(out, x, w, 2)
    decode_matmul_sqrelu_forward_ref(ref, x, w)
    # Compared as relu(dot) = sqrt(out): the product's own tolerance, not twice its error
    # times a large relu(dot).
    assert_close(np.sqrt(out), np.sqrt(ref), **_tol(IC), name=f"sqrt(out) ({isa})")
    assert (out[ref == 0] == 0).all()  # the negative products are exactly 0


def test_matmul_sqrelu_propagates_nan(isa):
    x = np.array([[1.0, np.nan]], np.float32)
    w = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
    out = np.zeros((1, 2), np.float32)
    decode.decode_matmul_sqrelu_forward(out, x, w, 1)
    assert np.isnan(out).all()  # relu(NaN) stays NaN instead of hiding as 0


def test_matmul_without_input_channels():
    x, w = np.zeros((2, 0), np.float32), np.zeros((3, 0), np.float32)
    out = np.ones((2, 3), np.float32)
    decode.decode_matmul_forward(out, x, w, 1, accumulate=True)
    assert (out == 1).all()
    decode.decode_matmul_forward(out, x, w, 1)
    assert (out == 0).all()


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_matches_reference(rng, isa, shape):
    Tc, t0, n, C, NH = shape
    qkv = _f32(rng, Tc, 3 * C)
    out, ref = np.full((n, C), np.nan, np.float32), np.empty((n, C), np.float32)
    decode.decode_attention_forward(out, qkv, t0, NH, 2)
    decode_attention_forward_ref(ref, qkv, t0, NH)
    assert_close(out, ref, name=f"out ({isa})")


def test_attention_reads_no_row_past_the_new_ones(rng, isa):
    Tc, t0, n, C, NH = 10, 3, 2, 12, 3
    qkv = _f32(rng, Tc, 3 * C)
    out, again = np.empty((n, C), np.float32), np.empty((n, C), np.float32)
    decode.decode_attention_forward(out, qkv, t0, NH, 1)
    qkv[t0 + n:] = np.nan
    decode.decode_attention_forward(again, qkv, t0, NH, 1)
    assert_bitwise_equal(again, out, name="out")


def test_attention_reference_is_the_training_attention(rng):
    # All rows new (t0 = 0, n = T): the decode reference is the training one's output.
    from randygpt._kernels.reference import attention_forward_ref
    T, C, NH = 7, 12, 3
    qkv = rng.standard_normal((T, 3 * C))
    out, ref = np.empty((T, C)), np.empty((1, T, C))
    decode_attention_forward_ref(out, qkv, 0, NH)
    attention_forward_ref(ref, None, qkv[None], NH)
    assert_close(out, ref[0], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------- bit-identity: threads and work splits

@pytest.mark.parametrize("mode", ["write", "accumulate", "sqrelu"])
def test_matmul_bit_identical_across_threads(rng, isa, mode):
    n, IC, OC = 3, 45, 101  # 7 chunks of 16 channels: unequal shares for 2 and 3 threads
    x, w, out0 = _f32(rng, n, IC), _f32(rng, OC, IC), _f32(rng, n, OC)
    outs = []
    for nt in thread_counts():
        out = out0.copy()
        if mode == "sqrelu":
            decode.decode_matmul_sqrelu_forward(out, x, w, nt)
        else:
            decode.decode_matmul_forward(out, x, w, nt, accumulate=mode == "accumulate")
        outs.append(out)
    for nt, out in zip(thread_counts()[1:], outs[1:]):
        assert_bitwise_equal(out, outs[0], name=f"out, {nt} threads vs 1 ({isa})")


def test_attention_bit_identical_across_threads(rng, isa):
    Tc, t0, n, C, NH = 12, 5, 3, 15, 5
    qkv = _f32(rng, Tc, 3 * C)
    outs = []
    for nt in thread_counts():
        out = np.empty((n, C), np.float32)
        decode.decode_attention_forward(out, qkv, t0, NH, nt)
        outs.append(out)
    for nt, out in zip(thread_counts()[1:], outs[1:]):
        assert_bitwise_equal(out, outs[0], name=f"out, {nt} threads vs 1 ({isa})")


def test_matmul_element_depends_on_its_two_rows_only(rng, isa):
    # One row alone, or a few output channels alone, give the same bits as inside the whole
    # product: a decode step of one token equals that token decoded among others.
    n, IC, OC = 5, 70, 37
    x, w = _f32(rng, n, IC), _f32(rng, OC, IC)
    whole = np.empty((n, OC), np.float32)
    decode.decode_matmul_forward(whole, x, w, 2)
    for i in range(n):
        row = np.empty((1, OC), np.float32)
        decode.decode_matmul_forward(row, x[i:i + 1], w, 1)
        assert_bitwise_equal(row[0], whole[i], name=f"row {i}")
    for lo, hi in ((0, 1), (3, 9), (30, 37)):
        part = np.empty((n, hi - lo), np.float32)
        decode.decode_matmul_forward(part, x, np.ascontiguousarray(w[lo:hi]), 1)
        assert_bitwise_equal(part, whole[:, lo:hi], name=f"channels {lo}..{hi}")


def test_attention_row_depends_on_its_position_only(rng, isa):
    # Decoding the rows one call at a time gives the bits of decoding them in one call.
    Tc, C, NH = 9, 12, 3
    qkv = _f32(rng, Tc, 3 * C)
    whole = np.empty((Tc, C), np.float32)
    decode.decode_attention_forward(whole, qkv, 0, NH, 2)
    for t in range(Tc):
        row = np.empty((1, C), np.float32)
        decode.decode_attention_forward(row, qkv[:t + 1], t, NH, 1)
        assert_bitwise_equal(row[0], whole[t], name=f"row {t}")


# --------------------------------------------------------------------------------- ISA choice

def test_isa_names():
    names = decode.available_isas()
    assert names and decode.get_isa() in names
    assert names[-1] in ("sse2", "generic")  # the baseline is always there
    with pytest.raises(ValueError, match="set_isa: isa must be one of"):
        decode.set_isa("avx1024")


# -------------------------------------------------------------------------------- bad input

def _matmul_args():
    return np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32)


@pytest.mark.parametrize("fn", [decode.decode_matmul_forward, decode.decode_matmul_sqrelu_forward])
def test_matmul_rejects_bad_input(fn):
    out, x, w = _matmul_args()
    with pytest.raises(TypeError, match="x must be float32, got float64"):
        fn(out, x.astype(np.float64), w, 1)
    with pytest.raises(TypeError, match="w must be a numpy.ndarray"):
        fn(out, x, w.tolist(), 1)
    with pytest.raises(ValueError, match=r"w has shape \(3, 5\), expected \(3, 4\)"):
        fn(out, x, np.zeros((3, 5), np.float32), 1)
    with pytest.raises(ValueError, match=r"out has shape \(2, 4\), expected \(2, 3\)"):
        fn(np.zeros((2, 4), np.float32), x, w, 1)
    with pytest.raises(ValueError, match="x must be 2-D"):
        fn(out, x[0], w, 1)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        fn(out, np.zeros((4, 2), np.float32).T, w, 1)
    with pytest.raises(ValueError, match="out must be writeable"):
        ro = out.copy()
        ro.flags.writeable = False
        fn(ro, x, w, 1)
    shared = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="must not share memory with x"):
        fn(shared.reshape(-1)[:6].reshape(2, 3), shared, w, 1)
    square = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="out .* must not share memory with w"):
        fn(square[:2], np.zeros((2, 3), np.float32), square, 1)
    for bad, kind in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(kind, match="n_threads"):
            fn(out, x, w, bad)


def test_attention_rejects_bad_input():
    qkv = np.zeros((6, 36), np.float32)
    out = np.zeros((2, 12), np.float32)
    f = decode.decode_attention_forward
    with pytest.raises(TypeError, match="qkv must be float32"):
        f(out, qkv.astype(np.float16), 0, 3, 1)
    with pytest.raises(TypeError, match="out must be float32"):
        f(out.astype(np.float64), qkv, 0, 3, 1)
    with pytest.raises(ValueError, match="qkv's last axis must be 3"):
        f(out, np.zeros((6, 35), np.float32), 0, 3, 1)
    with pytest.raises(ValueError, match="not divisible by n_head = 5"):
        f(out, qkv, 0, 5, 1)
    with pytest.raises(ValueError, match=r"out has shape \(2, 11\), expected \(2, 12\)"):
        f(np.zeros((2, 11), np.float32), qkv, 0, 3, 1)
    with pytest.raises(ValueError, match="out has 7 rows but qkv only 6"):
        f(np.zeros((7, 12), np.float32), qkv, 0, 3, 1)
    with pytest.raises(ValueError, match=r"t0 must be in \[0, 4\]"):
        f(out, qkv, 5, 3, 1)
    with pytest.raises(ValueError, match=r"t0 must be in \[0, 4\]"):
        f(out, qkv, -1, 3, 1)
    with pytest.raises(TypeError, match="t0 must be an int"):
        f(out, qkv, 1.0, 3, 1)
    with pytest.raises(ValueError, match="n_head must be >= 1"):
        f(out, qkv, 0, 0, 1)
    with pytest.raises(ValueError, match="must not share memory with qkv"):
        f(qkv.reshape(-1)[:24].reshape(2, 12), qkv, 0, 3, 1)
    with pytest.raises(ValueError, match="n_threads must be in"):
        f(out, qkv, 0, 3, 0)
    # nothing written by any refused call
    assert not out.any()
