"""The one place that decides thread counts: randygpt.set_num_threads / effective_n_threads."""
import pytest

import randygpt
from randygpt import _kernels


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("RANDYGPT_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    randygpt.set_num_threads(None)
    yield
    randygpt.set_num_threads(None)


needs_openmp = pytest.mark.skipif(not randygpt.openmp_enabled(), reason="serial build: always 1 thread")


@needs_openmp
def test_default_is_usable_cpus():
    assert randygpt.effective_n_threads() == _kernels.usable_cpus()


@needs_openmp
def test_env_order(monkeypatch):
    cpus = _kernels.usable_cpus()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert randygpt.effective_n_threads() == 1
    monkeypatch.setenv("RANDYGPT_NUM_THREADS", str(cpus))
    assert randygpt.effective_n_threads() == cpus  # RANDYGPT_NUM_THREADS wins over OMP_NUM_THREADS
    randygpt.set_num_threads(1)
    assert randygpt.effective_n_threads() == 1  # the setter wins over the environment
    assert randygpt.effective_n_threads(requested=cpus) == cpus  # an explicit request wins over all


@needs_openmp
def test_clamped_and_negative():
    cpus = _kernels.usable_cpus()
    assert randygpt.effective_n_threads(cpus + 100) == cpus
    assert randygpt.effective_n_threads(-1) == cpus
    assert randygpt.effective_n_threads(-cpus - 5) == 1


@pytest.mark.parametrize("bad", [0, 1.5, "2", True])
def test_bad_requests(bad):
    with pytest.raises((TypeError, ValueError), match="threads"):
        randygpt.set_num_threads(bad)


def test_bad_env(monkeypatch):
    monkeypatch.setenv("RANDYGPT_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="RANDYGPT_NUM_THREADS"):
        randygpt.effective_n_threads()


def test_openmp_flag_is_bool():
    assert isinstance(randygpt.openmp_enabled(), bool)
    if not randygpt.openmp_enabled():
        assert randygpt.effective_n_threads(4) == 1
