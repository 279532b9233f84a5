"""select_isa: one choice of SIMD path for every dispatched kernel family."""
import pytest

from randygpt import _kernels
from randygpt._kernels import activation, attention, matmul

FAMILIES = (matmul, attention, activation)


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
    with pytest.raises(ValueError, match="RANDYGPT_ISA.*'neon'"):
        _kernels.select_isa()
    with pytest.raises(ValueError, match="select_isa.*'avx1024'"):
        _kernels.select_isa("avx1024")
