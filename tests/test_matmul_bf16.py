"""The bf16 GEMMs (precision="bf16"): operands rounded to bf16 while packed, fp32 sums.
Every bf16 path this CPU runs is checked: AMX tiles where it has AMX-BF16, vdpbf16ps where
it has AVX512_BF16, and the emulations on each fp32 path's tile. All but AMX add the products
in one order, which the ordered reference repeats bit for bit; AMX adds each tdpbf16ps's 32
products its own way, so it is held to the float64 reference's tolerance instead."""
import numpy as np
import pytest

from randygpt._kernels import matmul as mm
from randygpt._kernels._ref_matmul import bf16_round_ref, gemm_bf16_ref

from conftest import assert_bitwise_equal, assert_close, each_path, thread_counts

KC = 256  # the GEMM's K block: K > KC carries the running sums across blocks

# (M, K, N): odd K (a last half pair), K over one and two K blocks, N = 67 (a narrow last
# strip), sizes that are multiples of no tile.
SHAPES = [(1, 1, 1), (7, 13, 5), (3, 40, 70), (67, 21, 9), (19, KC + 35, 33),
          (13, 2 * KC + 18, 67), (30, 64, 40)]


bf16_isa = each_path(mm.available_bf16_isas, mm.get_bf16_isa, mm.set_bf16_isa)


# The path whose sums follow no fp32 order we can write down (gemm_bf16_amx.h).
OWN_ORDER = {"amx"}


def _randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _operands(rng, M, K, N, trans_a, trans_b):
    return (_randn(rng, *((K, M) if trans_a else (M, K))),
            _randn(rng, *((N, K) if trans_b else (K, N))))


def test_paths_and_choice():
    isas = mm.available_bf16_isas()
    # The emulation runs on every fp32 path; the native ones only on CPUs that have them.
    assert set(mm.available_isas()) <= set(isas)
    assert set(isas) - set(mm.available_isas()) <= {"amx", "avx512bf16"}
    assert "amx" not in isas or "avx512bf16" in isas
    native = [n for n in isas if n in ("amx", "avx512bf16")]
    old = mm.get_isa()
    try:
        for isa in mm.available_isas():
            mm.set_isa(isa)  # the bf16 path follows the fp32 one, fastest first
            expect = native[0] if isa == "avx512" and native else isa
            assert mm.get_bf16_isa() == expect
            assert mm.bf16_native() == (expect in native)
    finally:
        mm.set_isa(old)


def test_rounding_special_values(bf16_isa):
    # c = a . [[1]] is bf16(a) exactly, specials included (one product per element).
    f = np.float32
    halfway = np.array([0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF, 0xBF808000,
                        0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x00800000, 0x00000001,
                        0x807FFFFF, 0x7F800000, 0xFF800000, 0x7FC00001, 0xFFA00000,
                        0x80000000], np.uint32).view(f)
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32).view(f)
    a = np.concatenate([halfway, bits]).reshape(-1, 1)
    c = np.empty_like(a)
    mm.gemm(c, a, np.ones((1, 1), f), False, False, False, 1, precision="bf16")
    # + 0: the sum starts at +0, and +0 + -0 is +0
    expected = bf16_round_ref(a) + np.float32(0)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(c), nan)
    assert_bitwise_equal(c[~nan], expected[~nan], name=f"bf16(a)[{bf16_isa}]")
    # the rule itself, on values whose rounding is known
    assert bf16_round_ref(np.array([1 + 2**-8], f))[0] == 1.0            # tie to even
    assert bf16_round_ref(np.array([1 + 3 * 2**-8], f))[0] == 1 + 2**-6  # tie to even, up
    assert bf16_round_ref(np.array([1e-40], f))[0] == 0.0                # denormal flushed
    assert np.isinf(bf16_round_ref(np.array([3.4e38], f))[0])            # overflow


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_gemm_matches_ordered_reference(bf16_isa, rng, shape, trans_a, trans_b, accumulate):
    M, K, N = shape
    a, b = _operands(rng, M, K, N, trans_a, trans_b)
    start = _randn(rng, M, N) if accumulate else np.full((M, N), np.nan, np.float32)
    c, ordered, wide = start.copy(), start.copy(), start.astype(np.float64)
    mm.gemm(c, a, b, trans_a, trans_b, accumulate, 1, precision="bf16")
    # The same sums in the same order: the same bits (no sum here comes near 2^-126).
    if bf16_isa not in OWN_ORDER:
        gemm_bf16_ref(ordered, a, b, trans_a, trans_b, accumulate, ordered=True)
        assert_bitwise_equal(c, ordered, name=f"c[{bf16_isa}]")
    # Against float64 sums of the rounded operands: fp32 accumulation error only, a random
    # walk of about eps32 * K for unit-normal operands (see test_matmul's _tol).
    gemm_bf16_ref(wide, a, b, trans_a, trans_b, accumulate)
    assert_close(c, wide, rtol=1e-5, atol=5e-7 * K, name=f"c vs float64 [{bf16_isa}]")


def test_bf16_is_not_fp32(rng):
    # The rounding really happens: results differ from fp32's by about 2^-8 relative per
    # operand, far more than fp32's own rounding.
    a, b = _randn(rng, 40, 64), _randn(rng, 64, 30)
    c32, c16 = np.empty((40, 30), np.float32), np.empty((40, 30), np.float32)
    mm.gemm(c32, a, b, False, False, False, 1)
    mm.gemm(c16, a, b, False, False, False, 1, precision="bf16")
    rel = np.linalg.norm(c16 - c32) / np.linalg.norm(c32)
    assert 1e-4 < rel < 1e-2, rel


def _linear_calls(rng, N, IC, OC, precision, n_threads):
    """Every bf16 entry point once, on fixed operands: {name: result}."""
    r = np.random.default_rng(11)
    x, w, dout = _randn(r, N, IC), _randn(r, OC, IC), _randn(r, N, OC)
    pre = _randn(r, N, IC)
    out = {}
    y = np.empty((N, OC), np.float32)
    mm.matmul_forward(y, x, w, n_threads, precision=precision)
    out["forward"] = y
    dx, dw = np.zeros((N, IC), np.float32), np.zeros((OC, IC), np.float32)
    mm.matmul_backward(dx, dw, dout, x, w, n_threads, precision=precision)
    out["dx"], out["dw"] = dx, dw
    act, pre_out = np.empty((N, OC), np.float32), np.empty((N, OC), np.float32)
    mm.matmul_sqrelu_forward(act, pre_out, x, w, n_threads, precision=precision)
    out["sqrelu act"], out["sqrelu pre"] = act, pre_out
    dpre, dw2 = np.empty((N, IC), np.float32), np.zeros((OC, IC), np.float32)
    mm.matmul_sqrelu_backward(dpre, dw2, dout, pre, w, n_threads, precision=precision)
    out["sqrelu dpre"], out["sqrelu dw"] = dpre, dw2
    return out


def test_linear_entry_points_match_the_ordered_reference(bf16_isa, rng):
    N, IC, OC = 37, KC + 21, 67
    got = _linear_calls(rng, N, IC, OC, "bf16", 1)
    r = np.random.default_rng(11)
    x, w, dout = _randn(r, N, IC), _randn(r, OC, IC), _randn(r, N, OC)
    pre = _randn(r, N, IC)
    ref = {}
    for name, (a, b, ta, tb, shape) in {
            "forward": (x, w, False, True, (N, OC)), "dx": (dout, w, False, False, (N, IC)),
            "dw": (dout, x, True, False, (OC, IC)),
            "sqrelu dw": (dout, np.square(np.maximum(pre, 0)), True, False, (OC, IC)),
            "sqrelu dpre": (dout, w, False, False, (N, IC))}.items():
        ref[name] = np.zeros(shape, np.float64 if bf16_isa in OWN_ORDER else np.float32)
        gemm_bf16_ref(ref[name], a, b, ta, tb, True, ordered=bf16_isa not in OWN_ORDER)
    ref["sqrelu dpre"] = ref["sqrelu dpre"] * (2 * np.maximum(pre, 0))
    for name in ref:
        if bf16_isa in OWN_ORDER:
            assert_close(got[name], ref[name], rtol=1e-5, atol=5e-7 * max(IC, N),
                         name=f"{name}[{bf16_isa}]")
        else:
            assert_bitwise_equal(got[name], ref[name], name=f"{name}[{bf16_isa}]")
    # The fused squared ReLU is applied to the product in fp32, as in fp32 mode.
    assert_bitwise_equal(got["sqrelu pre"], got["forward"], name="sqrelu pre")
    assert_bitwise_equal(got["sqrelu act"], np.square(np.maximum(got["forward"], 0)),
                         name="sqrelu act")


@pytest.mark.parametrize("shape", SHAPES + [(200, 40, 9)])
def test_forward_of_a_squared_relu_input_equals_the_unfused_steps(bf16_isa, rng, shape):
    # x_sqrelu squares x before rounding it to bf16, as the packer of a stored relu(x)^2
    # rounds that: the same operands, so the same bits on every path, AMX included; x
    # transposed in memory is not an entry point, the row-major one is checked at edges
    # (odd K, K over one and two blocks, a narrow last strip, a column split).
    M, K, N = shape
    x, w = _randn(rng, M, K), _randn(rng, N, K)
    act = np.square(np.maximum(x, 0)).astype(np.float32)
    unfused = np.empty((M, N), np.float32)
    mm.matmul_forward(unfused, act, w, 1, precision="bf16")
    for n in thread_counts():
        fused = np.full((M, N), np.nan, np.float32)
        mm.matmul_forward(fused, x, w, n, precision="bf16", x_sqrelu=True)
        assert_bitwise_equal(fused, unfused, name=f"out[{bf16_isa}] {n} thread(s)")


@pytest.mark.parametrize("scale", [1.0, 1e-19, 1e-20])
def test_native_and_emulated_paths_agree(scale):
    # Every bf16 path gives the first one's bits (vdpbf16ps where the CPU has it), with
    # operands so small at scales 1e-19 and 1e-20 that products and partial sums fall among
    # the denormals: vdpbf16ps flushes them to zero, the emulation too (MXCSR's FTZ/DAZ).
    # sse2 (no FMA) differs only when a product underflows, so it joins at scale 1 only.
    # AMX has its own order (see test_amx_flushes_and_stays_close).
    isas = [isa for isa in mm.available_bf16_isas() if isa not in OWN_ORDER]
    a = _randn(np.random.default_rng(3), 29, KC + 31) * np.float32(scale)
    b = _randn(np.random.default_rng(4), KC + 31, 70) * np.float32(scale)
    old = mm.get_bf16_isa()
    results = {}
    try:
        for isa in isas:
            if scale == 1.0 or isa != "sse2":
                mm.set_bf16_isa(isa)
                results[isa] = np.empty((29, 70), np.float32)
                mm.gemm(results[isa], a, b, False, False, False, 1, precision="bf16")
    finally:
        mm.set_bf16_isa(old)
    if scale != 1.0:
        # The flush is exercised: sums that do not flush hold denormals here, and differ.
        unflushed = np.empty((29, 70), np.float32)
        gemm_bf16_ref(unflushed, a, b, False, False, False, ordered=True)
        tiny = np.finfo(np.float32).tiny
        assert np.any((unflushed != 0) & (np.abs(unflushed) < tiny))
        assert not np.array_equal(results[isas[0]], unflushed)
        assert not np.any((results[isas[0]] != 0) & (np.abs(results[isas[0]]) < tiny))
    for isa, c in results.items():
        assert_bitwise_equal(c, results[isas[0]], name=f"{isa} vs {isas[0]} at scale {scale:g}")


@pytest.mark.skipif("amx" not in mm.available_bf16_isas(), reason="no AMX-BF16 on this CPU")
@pytest.mark.parametrize("scale", [1.0, 1e-19, 1e-20])
def test_amx_flushes_and_stays_close(scale):
    # AMX's sums stay within fp32 accumulation error of the float64 reference, and it too
    # flushes denormal sums: none in its results where unflushed sums hold them. K covers
    # whole tile steps, a tail of pairs on vdpbf16ps, a half pair and two K blocks.
    a = _randn(np.random.default_rng(3), 45, KC + 31) * np.float32(scale)
    b = _randn(np.random.default_rng(4), KC + 31, 70) * np.float32(scale)
    old = mm.get_bf16_isa()
    try:
        mm.set_bf16_isa("amx")
        c = np.empty((45, 70), np.float32)
        mm.gemm(c, a, b, False, False, False, 1, precision="bf16")
    finally:
        mm.set_bf16_isa(old)
    wide = np.empty((45, 70), np.float64)
    gemm_bf16_ref(wide, a, b, False, False, False)
    tiny = np.finfo(np.float32).tiny
    assert not np.any((c != 0) & (np.abs(c) < tiny))
    if scale == 1.0:
        assert_close(c, wide, rtol=1e-5, atol=5e-7 * (KC + 31), name="amx vs float64")
    else:
        assert np.any((wide != 0) & (np.abs(wide) < tiny))  # the flush is exercised


def test_thread_counts_give_the_same_bits(bf16_isa, rng):
    ref = _linear_calls(rng, 61, KC + 9, 70, "bf16", 1)
    for n in thread_counts()[1:]:
        got = _linear_calls(rng, 61, KC + 9, 70, "bf16", n)
        for name in ref:
            assert_bitwise_equal(got[name], ref[name], name=f"{name} at {n} threads [{bf16_isa}]")


def test_accumulating_twice_doubles(bf16_isa, rng):
    a, b = _randn(rng, 20, 2 * KC + 5), _randn(rng, 2 * KC + 5, 30)
    once, twice = np.zeros((20, 30), np.float32), np.zeros((20, 30), np.float32)
    mm.gemm(once, a, b, False, False, True, 1, precision="bf16")
    for _ in range(2):
        mm.gemm(twice, a, b, False, False, True, 1, precision="bf16")
    assert_bitwise_equal(twice, 2 * once, name=f"twice[{bf16_isa}]")


@pytest.mark.parametrize("bad", ["fp16", "BF16", "", None, 16, b"bf16"])
def test_bad_precision_is_a_value_error(bad):
    a = np.ones((2, 3), np.float32)
    c = np.empty((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"gemm: precision must be one of \('fp32', 'bf16'\)"):
        mm.gemm(c, a, a, False, True, False, 1, precision=bad)
    with pytest.raises(ValueError, match="matmul_backward: precision"):
        mm.matmul_backward(None, np.zeros((3, 3), np.float32), np.ones((2, 3), np.float32), a,
                           np.ones((3, 3), np.float32), 1, precision=bad)


def test_bad_isa_names():
    with pytest.raises(ValueError, match="set_bf16_isa: isa must be one of"):
        mm.set_bf16_isa("amx2")
    with pytest.raises(ValueError, match="set_bf16_isa"):
        mm.set_bf16_isa(None)
