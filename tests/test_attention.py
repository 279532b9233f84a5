"""Causal attention kernels against the NumPy reference (on every vector path this CPU
runs), the reference against finite differences, causality, thread-count independence,
exact accumulation and bad input."""
import numpy as np
import pytest

from conftest import (assert_bitwise_equal, assert_close, assert_grad_close, each_path,
                      numerical_grad, thread_counts)
from randygpt._kernels import attention
from randygpt._kernels._ref_attention import attention_backward_ref, attention_forward_ref

# (B, T, C, NH): odd sizes, T = 1, B = 1, NH = 1, head sizes that are not a multiple of
# the vector width (HS = 4, 10, 36, 13) or take each block width (HS = 24), T past one
# block of 32 keys (T = 33, 70); and head sizes the AVX-512 copy takes (multiples of 16:
# one and two vectors, odd and even counts of 32-column blocks, T past 64 keys and not a
# multiple of its 8-row blocks).
SHAPES = [(2, 5, 12, 3), (1, 1, 4, 1), (3, 1, 12, 3), (1, 7, 10, 1), (2, 33, 72, 2),
          (1, 17, 39, 3), (2, 9, 48, 2), (1, 70, 16, 2),
          (2, 13, 32, 2), (1, 70, 96, 2), (2, 67, 48, 1), (1, 1, 16, 1)]
REAL = (32, 64, 256, 8)


isa = each_path(attention.available_isas, attention.get_isa, attention.set_isa)


def make_qkv(rng, B, T, C, scale=1.0, dtype=np.float32):
    return (scale * rng.standard_normal((B, T, 3 * C))).astype(dtype)


def run_forward(qkv, n_head, n_threads=2):
    B, T, C3 = qkv.shape
    # Filled with NaN: both outputs are written, so none may survive.
    out = np.full((B, T, C3 // 3), np.nan, dtype=np.float32)
    att = np.full((B, n_head, T, T), np.nan, dtype=np.float32)
    attention.attention_forward(out, att, qkv, n_head, n_threads)
    return out, att


def ref_forward(qkv, n_head):
    B, T, C3 = qkv.shape
    out = np.empty((B, T, C3 // 3), dtype=qkv.dtype)
    att = np.empty((B, n_head, T, T), dtype=qkv.dtype)
    attention_forward_ref(out, att, qkv, n_head)
    return out, att


def run_backward(dqkv, dout, qkv, att, n_head, n_threads=2):
    attention.attention_backward(dqkv, dout, qkv, att, n_head, n_threads)
    return dqkv


@pytest.mark.parametrize("B,T,C,NH", SHAPES)
def test_forward_matches_reference(rng, isa, B, T, C, NH):
    qkv = make_qkv(rng, B, T, C)
    out, att = run_forward(qkv, NH)
    out_ref, att_ref = ref_forward(qkv, NH)
    assert_close(att, att_ref, name="att")
    assert_close(out, out_ref, name="out")


@pytest.mark.parametrize("B,T,C,NH", SHAPES)
def test_backward_matches_reference(rng, isa, B, T, C, NH):
    qkv = make_qkv(rng, B, T, C)
    _, att = run_forward(qkv, NH)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    start = rng.standard_normal(qkv.shape).astype(np.float32)  # accumulated into
    dqkv = run_backward(start.copy(), dout, qkv, att, NH)
    expected = start.copy()
    attention_backward_ref(expected, dout, qkv, att, NH)
    # dS = P (dP - D) cancels, so small entries carry the rounding of O(1) terms:
    # the absolute tolerance is relative to the gradient's scale.
    assert_close(dqkv, expected, rtol=1e-5, atol=1e-5, name="dqkv")


@pytest.mark.slow
def test_real_size_forward_and_backward(rng, isa):
    B, T, C, NH = REAL
    qkv = make_qkv(rng, B, T, C)
    out, att = run_forward(qkv, NH)
    out_ref, att_ref = ref_forward(qkv, NH)
    assert_close(att, att_ref, name="att")
    assert_close(out, out_ref, name="out")
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    dqkv = run_backward(np.zeros_like(qkv), dout, qkv, att, NH)
    expected = np.zeros_like(qkv)
    attention_backward_ref(expected, dout, qkv, att, NH)
    assert_close(dqkv, expected, rtol=1e-5, atol=1e-5, name="dqkv")


@pytest.mark.parametrize("B,T,C,NH", [(2, 4, 6, 2), (1, 3, 5, 1)])
def test_reference_backward_matches_finite_differences(rng, B, T, C, NH):
    qkv = make_qkv(rng, B, T, C, dtype=np.float64)
    G = rng.standard_normal((B, T, C))
    out = np.empty((B, T, C))
    att = np.empty((B, NH, T, T))

    def loss():
        attention_forward_ref(out, att, qkv, NH)
        return float(np.sum(out * G))

    numeric = numerical_grad(loss, qkv, eps=1e-6)
    loss()  # att for the unperturbed qkv
    analytic = np.zeros_like(qkv)
    attention_backward_ref(analytic, G, qkv, att, NH)
    assert_grad_close(analytic, numeric, rel=1e-6, name="dqkv")


def test_probabilities_are_causal_and_normalized(rng, isa):
    B, T, C, NH = 2, 9, 12, 3
    _, att = run_forward(make_qkv(rng, B, T, C, scale=3.0), NH)
    upper = np.triu(np.ones((T, T), dtype=bool), k=1)
    assert np.all(att[:, :, upper] == 0.0), "entries j > i must be exactly 0"
    assert np.all(att[:, :, ~upper] > 0.0)
    assert_close(att.sum(axis=-1, dtype=np.float64), np.ones((B, NH, T)), rtol=0, atol=1e-6,
                 name="row sums")


def test_future_positions_do_not_change_the_past(rng, isa):
    B, T, C, NH, t0 = 2, 8, 12, 3, 5
    qkv = make_qkv(rng, B, T, C)
    out, att = run_forward(qkv, NH)
    changed = qkv.copy()
    changed[:, t0:] = make_qkv(rng, B, T - t0, C)
    out2, att2 = run_forward(changed, NH)
    assert_bitwise_equal(out2[:, :t0], out[:, :t0], name="out before t0")
    assert_bitwise_equal(att2[:, :, :t0], att[:, :, :t0], name="att rows before t0")
    assert not np.array_equal(out2[:, t0:], out[:, t0:])
    # And backward: a loss on positions < t0 gives no gradient to positions >= t0.
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    dout[:, t0:] = 0.0
    dqkv = run_backward(np.zeros_like(qkv), dout, qkv, att, NH)
    assert np.all(dqkv[:, t0:] == 0.0)
    assert np.any(dqkv[:, :t0] != 0.0)


def test_backward_ignores_att_above_the_diagonal(rng, isa):
    B, T, C, NH = 2, 7, 12, 3
    qkv = make_qkv(rng, B, T, C)
    _, att = run_forward(qkv, NH)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    expected = run_backward(np.zeros_like(qkv), dout, qkv, att, NH)
    poisoned = att.copy()
    poisoned[:, :, np.triu(np.ones((T, T), dtype=bool), k=1)] = np.nan
    dqkv = run_backward(np.zeros_like(qkv), dout, qkv, poisoned, NH)
    assert_bitwise_equal(dqkv, expected, name="dqkv with NaN above the diagonal of att")


def test_large_scores_stay_finite(rng, isa):
    # Scores of order 1e3: softmax without the max subtraction would overflow, and
    # many probabilities underflow to (nearly) 0.
    B, T, C, NH = 2, 6, 8, 2
    qkv = make_qkv(rng, B, T, C, scale=30.0)
    out, att = run_forward(qkv, NH)
    out_ref, att_ref = ref_forward(qkv, NH)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(att))
    assert_close(att, att_ref, atol=1e-6, name="att")
    assert_close(out, out_ref, rtol=1e-5, atol=1e-4, name="out")  # |v| ~ 30


def test_nan_in_a_query_stays_in_its_row(rng, isa):
    B, T, C, NH = 1, 5, 8, 2
    qkv = make_qkv(rng, B, T, C)
    qkv[0, 2, 0] = np.nan  # q of row 2, head 0
    out, att = run_forward(qkv, NH)
    assert np.all(np.isnan(att[0, 0, 2, :3])) and np.all(np.isnan(out[0, 2, :4]))
    mask = np.ones_like(out, dtype=bool)
    mask[0, 2, :4] = False
    assert np.all(np.isfinite(out[mask]))
    assert np.all(np.isfinite(att[0, 1])) and np.all(np.isfinite(np.delete(att[0, 0], 2, 0)))


@pytest.mark.parametrize("B,T,C,NH", [(3, 7, 12, 3), (4, 16, 32, 4)])
def test_bit_identical_across_thread_counts(rng, isa, B, T, C, NH):
    qkv = make_qkv(rng, B, T, C)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    out1, att1 = run_forward(qkv, NH, n_threads=1)
    dqkv1 = run_backward(np.zeros_like(qkv), dout, qkv, att1, NH, n_threads=1)
    for n in thread_counts():
        out, att = run_forward(qkv, NH, n_threads=n)
        dqkv = run_backward(np.zeros_like(qkv), dout, qkv, att, NH, n_threads=n)
        assert_bitwise_equal(out, out1, name=f"out, {n} threads")
        assert_bitwise_equal(att, att1, name=f"att, {n} threads")
        assert_bitwise_equal(dqkv, dqkv1, name=f"dqkv, {n} threads")


def test_backward_twice_is_exactly_twice(rng, isa):
    B, T, C, NH = 2, 6, 12, 3
    qkv = make_qkv(rng, B, T, C)
    _, att = run_forward(qkv, NH)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    once = run_backward(np.zeros_like(qkv), dout, qkv, att, NH)
    twice = run_backward(run_backward(np.zeros_like(qkv), dout, qkv, att, NH),
                         dout, qkv, att, NH)
    assert_bitwise_equal(twice, 2 * once, name="dqkv after two calls")


@pytest.mark.parametrize("B,T,C,NH", SHAPES)
def test_backward_written_equals_accumulated_onto_zeros(rng, isa, B, T, C, NH):
    # accumulate=False must write every element of dqkv (it starts as NaN) with the value
    # accumulating onto zeros gives, for any thread count.
    qkv = make_qkv(rng, B, T, C)
    _, att = run_forward(qkv, NH)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    expected = run_backward(np.zeros_like(qkv), dout, qkv, att, NH)
    for n in thread_counts():
        dqkv = np.full_like(qkv, np.nan)
        attention.attention_backward(dqkv, dout, qkv, att, NH, n, accumulate=False)
        # Equal as values (0 + -0 is +0, so compare signs of zero only where nonzero).
        np.testing.assert_array_equal(dqkv, expected)
        nonzero = expected != 0
        assert_bitwise_equal(dqkv[nonzero], expected[nonzero], name=f"dqkv, {n} threads")


@pytest.mark.parametrize("B,T,C,NH", SHAPES)
def test_unsaved_probabilities_give_the_same_results(rng, isa, B, T, C, NH):
    # att=None: the forward keeps P in scratch only and the backward recomputes it; both must
    # match the saved-P path bit for bit, and out= must return the forward's output.
    qkv = make_qkv(rng, B, T, C)
    out, att = run_forward(qkv, NH)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    start = rng.standard_normal(qkv.shape).astype(np.float32)
    expected = run_backward(start.copy(), dout, qkv, att, NH)
    for n in thread_counts():
        out2 = np.full_like(out, np.nan)
        attention.attention_forward(out2, None, qkv, NH, n)
        assert_bitwise_equal(out2, out, name=f"out without att, {n} threads")
        dqkv = start.copy()
        out3 = np.full_like(out, np.nan)
        attention.attention_backward(dqkv, dout, qkv, None, NH, n, out=out3)
        assert_bitwise_equal(dqkv, expected, name=f"dqkv with P recomputed, {n} threads")
        assert_bitwise_equal(out3, out, name=f"out from the backward, {n} threads")
        out4 = np.full_like(out, np.nan)
        attention.attention_backward(start.copy(), dout, qkv, att, NH, n, out=out4)
        assert_bitwise_equal(out4, out, name=f"out from the backward with att, {n} threads")


def test_reference_recomputes_like_it_saves(rng):
    B, T, C, NH = 2, 5, 12, 3
    qkv = make_qkv(rng, B, T, C, dtype=np.float64)
    out, att = ref_forward(qkv, NH)
    dout = rng.standard_normal((B, T, C))
    saved = np.ones_like(qkv)
    attention_backward_ref(saved, dout, qkv, att, NH)
    recomputed = np.full_like(qkv, np.nan)
    out2 = np.empty_like(out)
    attention_backward_ref(recomputed, dout, qkv, None, NH, accumulate=False, out=out2)
    assert_close(recomputed, saved - 1.0, rtol=1e-12, atol=1e-12, name="dqkv")
    assert_close(out2, out, rtol=1e-12, atol=1e-12, name="out")


@pytest.mark.parametrize("T", [1, 5, 8, 9])
def test_recomputed_probabilities_equal_the_forwards_to_the_bit(rng, isa, T):
    # With one-hot values (v_j = e_j, needs HS >= T) the forward's output row i is P's row i
    # exactly (every other term adds a zero); with a one-hot output gradient (dy_i0 = e_0)
    # the backward's dv_j[0] is P[i0, j] exactly. So the backward's recomputed P can be
    # compared with the forward's P bit for bit.
    B, NH, HS = 2, 2, 9
    C = NH * HS
    qkv = make_qkv(rng, B, T, C, scale=2.0)
    qkv[:, :, 2 * C:] = 0.0
    for h in range(NH):
        for t in range(T):
            qkv[:, t, 2 * C + h * HS + t] = 1.0
    out = np.empty((B, T, C), np.float32)
    attention.attention_forward(out, None, qkv, NH, 2)
    for i0 in range(T):
        dout = np.zeros((B, T, C), np.float32)
        dout[:, i0, ::HS] = 1.0
        dqkv = np.empty_like(qkv)
        attention.attention_backward(dqkv, dout, qkv, None, NH, 2, accumulate=False)
        for h in range(NH):
            p_forward = np.ascontiguousarray(out[:, i0, h * HS:h * HS + i0 + 1])
            p_backward = np.ascontiguousarray(dqkv[:, :i0 + 1, 2 * C + h * HS])
            assert_bitwise_equal(p_backward, p_forward, name=f"P row {i0}, head {h}")
            assert np.all(p_forward > 0)


@pytest.mark.skipif("avx512" not in attention.available_isas(),
                    reason="this CPU has no AVX-512")
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 9, 15, 16, 17, 31, 33, 64, 65, 100])
@pytest.mark.parametrize("HS,NH", [(16, 1), (32, 2), (48, 1), (64, 2), (96, 1), (24, 2)])
@pytest.mark.parametrize("saved", [True, False])
def test_avx512_gives_the_avx2_bits(rng, T, HS, NH, saved):
    # The two copies block the same chains of FMAs differently, so every output, written or
    # accumulated, must agree bit for bit (HS = 24 checks the AVX2 fallback of the avx512
    # path).
    B, C = 2, HS * NH
    qkv = make_qkv(rng, B, T, C, scale=3.0)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    start = rng.standard_normal(qkv.shape).astype(np.float32)
    before = attention.get_isa()
    results = {}
    try:
        for name, n_threads in (("avx2", 1), ("avx512", 2)):
            attention.set_isa(name)
            out = np.full((B, T, C), np.nan, np.float32)
            att = np.full((B, NH, T, T), np.nan, np.float32) if saved else None
            attention.attention_forward(out, att, qkv, NH, n_threads)
            added = start.copy()
            out2 = np.full_like(out, np.nan)
            attention.attention_backward(added, dout, qkv, att, NH, n_threads, out=out2)
            written = np.full_like(qkv, np.nan)
            attention.attention_backward(written, dout, qkv, att, NH, n_threads,
                                         accumulate=False)
            results[name] = [out, out2, added, written] + ([att] if saved else [])
    finally:
        attention.set_isa(before)
    for what, a, b in zip(["out", "out from backward", "dqkv added", "dqkv written", "att"],
                          results["avx2"], results["avx512"]):
        assert_bitwise_equal(b, a, name=what)


def test_empty_batch_is_a_no_op():
    qkv = np.zeros((0, 4, 12), dtype=np.float32)
    out = np.zeros((0, 4, 4), dtype=np.float32)
    att = np.zeros((0, 2, 4, 4), dtype=np.float32)
    attention.attention_forward(out, att, qkv, 2, 2)
    attention.attention_backward(np.zeros_like(qkv), out, qkv, att, 2, 2)


def _forward_args():
    B, T, C, NH = 2, 3, 8, 2
    return dict(out=np.zeros((B, T, C), np.float32), att=np.zeros((B, NH, T, T), np.float32),
                qkv=np.zeros((B, T, 3 * C), np.float32), n_head=NH, n_threads=1)


def _backward_args():
    B, T, C, NH = 2, 3, 8, 2
    return dict(dqkv=np.zeros((B, T, 3 * C), np.float32), dout=np.zeros((B, T, C), np.float32),
                qkv=np.zeros((B, T, 3 * C), np.float32),
                att=np.zeros((B, NH, T, T), np.float32), n_head=NH, n_threads=1)


def _aliased_out():
    buf = np.zeros(2 * 3 * 24, np.float32)
    return dict(qkv=buf.reshape(2, 3, 24), out=buf[:2 * 3 * 8].reshape(2, 3, 8))


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


FORWARD_BAD = [
    ({"qkv": np.zeros((2, 3, 24), np.float64)}, TypeError, "qkv"),
    ({"out": [[0.0]]}, TypeError, "out"),
    ({"qkv": np.zeros((2, 3, 48), np.float32)[:, :, ::2]}, ValueError, "qkv"),
    ({"qkv": np.zeros((2, 3, 23), np.float32)}, ValueError, "qkv"),
    ({"qkv": np.zeros((6, 24), np.float32)}, ValueError, "qkv"),
    ({"n_head": 3}, ValueError, "n_head"),
    ({"n_head": 0}, ValueError, "n_head"),
    ({"n_head": 2.0}, TypeError, "n_head"),
    ({"out": np.zeros((2, 3, 9), np.float32)}, ValueError, "out"),
    ({"att": np.zeros((2, 2, 3, 4), np.float32)}, ValueError, "att"),
    ({"att": np.zeros((2, 1, 3, 3), np.float32)}, ValueError, "att"),
    ({"out": _readonly(np.zeros((2, 3, 8), np.float32))}, ValueError, "out"),
    (_aliased_out(), ValueError, "out"),
    ({"n_threads": 0}, ValueError, "n_threads"),
    ({"n_threads": 1.5}, TypeError, "n_threads"),
    ({"n_threads": True}, TypeError, "n_threads"),
    ({"n_threads": None}, TypeError, "n_threads"),
]


@pytest.mark.parametrize("change,error,name", FORWARD_BAD)
def test_forward_rejects_bad_input(change, error, name):
    args = _forward_args()
    args.update(change)
    with pytest.raises(error, match=name):
        attention.attention_forward(**args)


BACKWARD_BAD = [
    ({"dqkv": np.zeros((2, 3, 24), np.float64)}, TypeError, "dqkv"),
    ({"dout": np.zeros((2, 3, 8), np.float16)}, TypeError, "dout"),
    ({"att": np.zeros((2, 2, 3, 3), np.float64)}, TypeError, "att"),
    ({"dqkv": np.zeros((2, 3, 21), np.float32)}, ValueError, "dqkv"),
    ({"dout": np.zeros((2, 4, 8), np.float32)}, ValueError, "dout"),
    ({"att": np.zeros((2, 2, 3, 3), np.float32).transpose(0, 1, 3, 2)}, ValueError, "att"),
    ({"att": np.zeros((2, 2, 4, 4), np.float32)}, ValueError, "att"),
    ({"dqkv": _readonly(np.zeros((2, 3, 24), np.float32))}, ValueError, "dqkv"),
    ({"n_head": 5}, ValueError, "n_head"),
    ({"n_threads": -1}, ValueError, "n_threads"),
]


@pytest.mark.parametrize("change,error,name", BACKWARD_BAD)
def test_backward_rejects_bad_input(change, error, name):
    args = _backward_args()
    args.update(change)
    with pytest.raises(error, match=name):
        attention.attention_backward(**args)


def test_backward_rejects_bad_out(rng):
    B, T, C, NH = 2, 3, 4, 2
    qkv = make_qkv(rng, B, T, C)
    dqkv = np.zeros_like(qkv)
    dout = np.zeros((B, T, C), np.float32)
    with pytest.raises(ValueError, match="out has shape"):
        attention.attention_backward(dqkv, dout, qkv, None, NH, 1,
                                     out=np.zeros((B, T, C + 1), np.float32))
    with pytest.raises(ValueError, match="out .*must not share memory with dout"):
        attention.attention_backward(dqkv, dout, qkv, None, NH, 1, out=dout)
    with pytest.raises(TypeError, match="out must be float32"):
        attention.attention_backward(dqkv, dout, qkv, None, NH, 1,
                                     out=np.zeros((B, T, C), np.float64))


@pytest.mark.parametrize("other", ["dout", "qkv", "att"])
def test_backward_rejects_aliased_gradient(other):
    args = _backward_args()
    flat = np.zeros(args["dqkv"].size + args[other].size, np.float32)
    # dqkv and the input overlap by half of dqkv: contiguous, so only an overlap check sees it.
    start = args["dqkv"].size // 2
    args["dqkv"] = flat[:args["dqkv"].size].reshape(args["dqkv"].shape)
    args[other] = flat[start:start + args[other].size].reshape(args[other].shape)
    with pytest.raises(ValueError, match="dqkv .*must not share memory with " + other):
        attention.attention_backward(**args)


def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="isa"):
        attention.set_isa("avx1024")
    assert attention.get_isa() in attention.available_isas()


def test_read_only_inputs_are_accepted(rng):
    qkv = _readonly(make_qkv(rng, 1, 3, 8))
    out, att = run_forward(qkv, 2)
    run_backward(np.zeros(qkv.shape, np.float32), _readonly(out), qkv, _readonly(att), 2)


@pytest.mark.parametrize("fn", ["forward", "backward"])
def test_scratch_that_cannot_be_had_is_a_memory_error_of_scratch_bytes(fn):
    # P grows with T^2 per thread: 100000 positions need 37-75 GB, refused as one MemoryError
    # (it aborted the process before), whose byte count scratch_bytes reports beforehand.
    T, team = 100_000, 2
    qkv, out = np.zeros((2, T, 3), np.float32), np.zeros((2, T, 1), np.float32)
    with pytest.raises(MemoryError) as err:
        if fn == "forward":
            attention.attention_forward(out, None, qkv, 1, team)
        else:
            attention.attention_backward(np.zeros_like(qkv), out, qkv, None, 1, team)
    message = str(err.value)
    assert message.startswith(f"attention_{fn}: cannot allocate ") and "\n" not in message
    if fn == "backward":  # the larger of the two, which scratch_bytes gives
        assert f"({attention.scratch_bytes(T, 1, team):,} bytes)" in message


def test_scratch_bytes_bounds_its_arguments():
    assert attention.scratch_bytes(64, 32, 2) == 2 * attention.scratch_bytes(64, 32, 1)
    for bad, error in ((0, ValueError), (1 << 31, ValueError), (1.5, TypeError)):
        with pytest.raises(error, match="T"):
            attention.scratch_bytes(bad, 32, 1)
