"""The shared kernel argument checks (randygpt/_kernels/_checks.pyx), called from Python.

The kernels call the same functions from C (cimport); their own tests check that each kernel
wires them to the right arguments. Here: every rule, its message, and what passes."""
import os

import numpy as np
import pytest

from randygpt._kernels import _checks
from randygpt._kernels._checks import (MAX_TEAM, MAX_THREADS, check_array, check_disjoint,
                                       check_elementwise, check_input, check_int,
                                       check_n_threads, check_output, check_real,
                                       check_writeable, memory_error, out_of_range_error)

F32 = np.dtype(np.float32)
I32 = np.dtype(np.int32)


def test_check_array_accepts_a_good_array():
    assert check_array("x", np.zeros((2, 3), np.float32), F32, 2) is None
    assert check_array("i", np.zeros(4, np.int32), I32, 1) is None
    # A read-only input is fine: only outputs must be writeable.
    a = np.zeros(3, np.float32)
    a.flags.writeable = False
    check_array("x", a, F32, 1)


@pytest.mark.parametrize("a, error, match", [
    ([1.0, 2.0], TypeError, "x must be a numpy.ndarray, got list"),
    (np.zeros((2, 3)), TypeError, r"x must be float32, got float64 \(shape \(2, 3\)\)"),
    (np.zeros((2, 3), np.float16), TypeError, "x must be float32, got float16"),
    (np.zeros(6, np.float32), ValueError, r"x must be 2-D, got shape \(6,\)"),
    (np.zeros((3, 4), np.float32)[:, ::2], ValueError,
     r"x must be C-contiguous \(shape \(3, 2\), strides \(16, 8\)\)"),
    (np.asfortranarray(np.zeros((3, 4), np.float32)), ValueError, "x must be C-contiguous"),
])
def test_check_array_rejects(a, error, match):
    with pytest.raises(error, match=match):
        check_array("x", a, F32, 2)


def test_check_array_rejects_misaligned():
    # np.frombuffer at an odd offset gives float32 items off their 4-byte boundary.
    buf = bytearray(4 * 6 + 1)
    a = np.frombuffer(buf, np.float32, count=6, offset=1).reshape(2, 3)
    assert not a.flags.aligned and a.flags.c_contiguous
    with pytest.raises(ValueError, match=r"^x must be aligned to its 4-byte items "
                                         r"\(shape \(2, 3\), address 0x[0-9a-f]+\)$"):
        check_array("x", a, F32, 2)
    check_array("x", np.frombuffer(buf, np.float32, count=6, offset=0).reshape(2, 3), F32, 2)


def test_check_array_any_ndim():
    for shape in [(), (3,), (2, 3), (2, 1, 3)]:
        check_array("x", np.zeros(shape, np.float32), F32)
    with pytest.raises(ValueError, match="x must be C-contiguous"):
        check_array("x", np.zeros((2, 3, 4), np.float32)[:, :, ::2], F32)


def test_check_input_shape():
    check_input("w", np.zeros(5, np.float32), F32, (5,), "one per column of x")
    check_input("w", np.zeros(5, np.float32), F32, (5,))
    with pytest.raises(ValueError, match=r"^w has shape \(4,\), expected \(5,\) "
                                         r"\(one per column of x\)$"):
        check_input("w", np.zeros(4, np.float32), F32, (5,), "one per column of x")
    with pytest.raises(ValueError, match=r"^w has shape \(4,\), expected \(5,\)$"):
        check_input("w", np.zeros(4, np.float32), F32, (5,))
    # The number of axes comes from the expected shape, before the shape itself.
    with pytest.raises(ValueError, match=r"w must be 1-D, got shape \(1, 5\)"):
        check_input("w", np.zeros((1, 5), np.float32), F32, (5,))
    # Zero-size arrays are legal when that is the expected shape.
    check_input("w", np.zeros((0, 3), np.float32), F32, (0, 3))


def test_check_output_needs_writeable():
    out = np.zeros((2, 3), np.float32)
    check_output("out", out, F32, (2, 3), "same as x")
    out.flags.writeable = False
    with pytest.raises(ValueError, match=r"out must be writeable, got a read-only array "
                                         r"\(shape \(2, 3\)\)"):
        check_output("out", out, F32, (2, 3), "same as x")
    with pytest.raises(ValueError, match="out must be writeable"):
        check_writeable("out", out)
    # Shape problems are reported before the read-only flag.
    with pytest.raises(ValueError, match=r"out has shape \(2, 3\), expected \(3, 2\)"):
        check_output("out", out, F32, (3, 2))


def test_check_disjoint():
    buf = np.zeros(20, np.float32)
    a, b, c = buf[:8], buf[8:16], buf[16:]
    check_disjoint((("a", a), ("b", b)), (("c", c),))
    check_disjoint((("a", a),))
    # Inputs may overlap each other: they are only read.
    check_disjoint((("a", a),), (("b", b), ("b2", buf[8:12])))
    with pytest.raises(ValueError, match=r"^a \(shape \(8,\)\) must not share memory with "
                                         r"b \(shape \(4,\)\)$"):
        check_disjoint((("a", a),), (("b", buf[7:11]),))
    # Output against output, and an output against the same array.
    with pytest.raises(ValueError, match="a .* must not share memory with a2"):
        check_disjoint((("a", a), ("a2", a)), (("c", c),))
    with pytest.raises(ValueError, match="b .* must not share memory with c"):
        check_disjoint((("a", a), ("b", buf[12:20])), (("c", c),))
    # Views of one buffer with interleaved elements do not share memory.
    check_disjoint((("even", buf[::2]),), (("odd", buf[1::2]),))


def test_check_elementwise():
    x = np.zeros((2, 3, 4), np.float32)
    out, dx = np.zeros_like(x), np.zeros_like(x)
    check_elementwise((("out", out), ("dx", dx)), (("x", x),), F32)
    check_elementwise((("out", out),), (), F32)
    with pytest.raises(ValueError, match=r"^x has shape \(2, 3\), expected \(2, 3, 4\) "
                                         r"\(same as out\)$"):
        check_elementwise((("out", out),), (("x", np.zeros((2, 3), np.float32)),), F32)
    with pytest.raises(TypeError, match="x must be float32, got float64"):
        check_elementwise((("out", out),), (("x", x.astype(np.float64)),), F32)
    with pytest.raises(ValueError, match="dx must be C-contiguous"):
        check_elementwise((("out", out), ("dx", np.zeros((2, 3, 8), np.float32)[:, :, ::2])),
                          (("x", x),), F32)
    with pytest.raises(ValueError, match="out .* must not share memory with x"):
        check_elementwise((("out", x),), (("x", x),), F32)
    # An input that only overlaps another input is fine; a read-only output is not.
    check_elementwise((("out", out),), (("x", x), ("y", x)), F32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        check_elementwise((("out", out),), (("x", x),), F32)


@pytest.mark.parametrize("n", [1, 2, 7, MAX_TEAM, np.int64(3), np.int32(1)])
def test_check_n_threads_accepts(n):
    got = check_n_threads(n)
    assert got == n and type(got) is int


@pytest.mark.parametrize("n", [MAX_TEAM + 1, 32768, MAX_THREADS, np.int64(MAX_THREADS)])
def test_check_n_threads_caps_the_team(n):
    # Accepted, but the team asked of OpenMP is capped (see _checks.pyx for why).
    assert check_n_threads(n) == MAX_TEAM


def test_max_team_is_at_least_the_cpus():
    assert 128 <= MAX_TEAM < MAX_THREADS
    assert MAX_TEAM >= len(getattr(os, "sched_getaffinity", lambda _: [])(0))


@pytest.mark.parametrize("n, error, match", [
    (0, ValueError, rf"n_threads must be in \[1, {MAX_THREADS}\], got 0"),
    (-1, ValueError, r"n_threads must be in \[1, \d+\], got -1"),
    (MAX_THREADS + 1, ValueError, rf"got {MAX_THREADS + 1}"),
    (2**40, ValueError, rf"got {2**40}"),
    (2**70, ValueError, rf"got {2**70}"),
    (True, TypeError, "n_threads must be an int, got bool"),
    (2.0, TypeError, "n_threads must be an int, got float"),
    (None, TypeError, "n_threads must be an int, got NoneType"),
    ("4", TypeError, "n_threads must be an int, got str"),
])
def test_check_n_threads_rejects(n, error, match):
    with pytest.raises(error, match=match):
        check_n_threads(n)


def test_check_int():
    assert check_int("step", 1, 1) == 1
    assert check_int("step", 2**70, 1) == 2**70  # no upper bound given
    assert type(check_int("step", np.int64(5), 1)) is int
    with pytest.raises(ValueError, match=r"^step must be >= 1 \(the first step is 1\), got 0$"):
        check_int("step", 0, 1, None, "the first step is 1")
    with pytest.raises(ValueError, match=r"^k must be in \[0, 3\], got 4$"):
        check_int("k", 4, 0, 3)
    with pytest.raises(TypeError, match="step must be an int, got bool"):
        check_int("step", False, 0)


def test_check_real_rejects_ints_beyond_double():
    with pytest.raises(ValueError, match=r"^eps must be finite and >= 0, got inf$"):
        check_real("eps", 10**400, 0.0)
    with pytest.raises(ValueError, match=r"^g must be finite, got -inf$"):
        check_real("g", -(10**400))


def test_memory_error_says_how_much():
    err = memory_error("attention_forward", 40_001_600_064, "scratch: 1 thread(s)")
    assert isinstance(err, MemoryError)
    assert str(err) == ("attention_forward: cannot allocate 37.3 GiB (40,001,600,064 bytes) "
                        "for scratch: 1 thread(s)")
    assert str(memory_error("f", 100, "x")) == "f: cannot allocate 100 bytes for x"
    assert "cannot allocate 1.0 KiB (1,024 bytes)" in str(memory_error("f", 1024, "x"))
    assert "cannot allocate 16384.0 TiB (18,014,398,509,481,984 bytes)" in str(
        memory_error("f", 2**54, "x"))


def test_check_real_accepts_and_converts():
    for x in (0, 1e-5, np.float32(0.5), np.int64(2), 3):
        got = check_real("eps", x, 0.0)
        assert got == float(x) and type(got) is float
    assert check_real("g", -1.0) == -1.0  # -1 is a legal value, not an error code
    assert check_real("beta", 0.0, 0.0, 1.0) == 0.0
    assert check_real("x", 1e300) == 1e300


@pytest.mark.parametrize("args, error, match", [
    (("eps", -1.0, 0.0), ValueError, r"^eps must be finite and >= 0, got -1.0$"),
    (("eps", float("inf"), 0.0), ValueError, r"^eps must be finite and >= 0, got inf$"),
    (("dloss", float("nan")), ValueError, r"^dloss must be finite, got nan$"),
    (("beta1", 1.0, 0.0, 1.0), ValueError, r"^beta1 must be finite and in \[0, 1\), got 1.0$"),
    (("beta1", -0.5, 0.0, 1.0), ValueError, r"beta1 must be finite and in \[0, 1\)"),
    (("p", 2.0, None, 1.0), ValueError, r"^p must be finite and < 1, got 2.0$"),
    (("eps", "1e-5", 0.0), TypeError, "eps must be a real number, got str"),
    (("eps", True, 0.0), TypeError, "eps must be a real number, got bool"),
    (("eps", None), TypeError, "eps must be a real number, got NoneType"),
    (("eps", 1j), TypeError, "eps must be a real number, got complex"),
])
def test_check_real_rejects(args, error, match):
    with pytest.raises(error, match=match):
        check_real(*args)


def test_out_of_range_error_names_the_position():
    idx = np.array([[0, 1, 2], [3, 11, 5]], np.int32)
    err = out_of_range_error("idx", idx, 4, 11, "wte has 11 rows")
    assert isinstance(err, ValueError)
    assert str(err) == "idx[1, 1] = 11 is out of range [0, 11) (wte has 11 rows)"
    err = out_of_range_error("targets", np.array([0, -2], np.int32), 1, 7, "logits shape (2, 7)")
    assert str(err) == "targets[1] = -2 is out of range [0, 7) (logits shape (2, 7))"


def test_public_names():
    for name in _checks.__all__:
        assert callable(getattr(_checks, name)) or name in ("MAX_THREADS", "MAX_TEAM")
