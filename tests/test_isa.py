"""select_isa: one choice of SIMD path for every dispatched kernel family."""
import os
import subprocess
import sys

import pytest

from randygpt import _kernels
from randygpt._kernels import activation, attention, decode, matmul

FAMILIES = (matmul, attention, activation, decode)


def test_every_dispatched_family_is_covered():
    # A family added to select_isa's list must be added here, or forcing a path in one test
    # would leave it forced for the tests after.
    assert {m.__name__.rsplit(".", 1)[1] for m in FAMILIES} == set(_kernels._DISPATCHED)


@pytest.fixture(autouse=True)
def _restore():
    before = [m.get_isa() for m in FAMILIES]
    yield
    for m, isa in zip(FAMILIES, before):
        m.set_isa(isa)


@pytest.mark.parametrize("isa", matmul.available_isas())
def test_every_family_follows(isa):
    assert _kernels.select_isa(isa) == isa
    for m in FAMILIES:
        got = m.get_isa()
        assert got in m.available_isas()
        # the family's own widest path that is not wider than the request
        assert _kernels.ISA_ORDER.index(got) >= _kernels.ISA_ORDER.index(isa), (m.__name__, got)
        if isa in m.available_isas():
            assert got == isa


def test_default_is_fastest(monkeypatch):
    monkeypatch.delenv("RANDYGPT_ISA", raising=False)
    assert _kernels.select_isa() == matmul.available_isas()[0]


def test_env_and_bad_names(monkeypatch):
    monkeypatch.setenv("RANDYGPT_ISA", "sse2")
    assert _kernels.select_isa() == "sse2"
    assert all(m.get_isa() == "sse2" for m in FAMILIES)
    monkeypatch.setenv("RANDYGPT_ISA", "neon")
    with pytest.raises(ValueError) as err:
        _kernels.select_isa()
    choices = ", ".join(matmul.available_isas())
    assert str(err.value) == (f"RANDYGPT_ISA must be one of {choices} (the SIMD paths this "
                              "CPU runs), got 'neon'")
    with pytest.raises(ValueError, match="select_isa.*'avx1024'"):
        _kernels.select_isa("avx1024")


def test_bf16_env_picks_the_bf16_path(monkeypatch):
    monkeypatch.delenv("RANDYGPT_ISA", raising=False)
    default = (_kernels.select_isa(), matmul.get_bf16_isa())[1]
    try:
        for name in matmul.available_bf16_isas():
            monkeypatch.setenv("RANDYGPT_BF16_ISA", name)
            _kernels.select_isa()
            assert matmul.get_bf16_isa() == name
        monkeypatch.setenv("RANDYGPT_BF16_ISA", "fp16")
        with pytest.raises(ValueError) as err:
            _kernels.select_isa()
        assert str(err.value) == (
            f"RANDYGPT_BF16_ISA must be one of {', '.join(matmul.available_bf16_isas())} (the "
            "bf16 GEMM paths this CPU runs), got 'fp16'")
    finally:
        monkeypatch.delenv("RANDYGPT_BF16_ISA")
        _kernels.select_isa()
    assert matmul.get_bf16_isa() == default


def test_bad_env_fails_the_import_with_one_line():
    # select_isa runs at import, so RANDYGPT_ISA=foo stops `import randygpt._kernels` with the
    # ValueError above (the command line turns it into its error line), not a crash.
    env = dict(os.environ, RANDYGPT_ISA="foo")
    proc = subprocess.run([sys.executable, "-c", "import randygpt._kernels"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: RANDYGPT_ISA must be one of ") and "got 'foo'" in last
