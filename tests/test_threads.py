"""The one place that decides thread counts: randygpt.set_num_threads / effective_n_threads."""
import os
import subprocess
import sys

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
def test_default_is_one_thread_per_physical_core():
    assert randygpt.effective_n_threads() == _kernels.physical_cores()
    assert 1 <= _kernels.physical_cores() <= _kernels.usable_cpus()


@needs_openmp
def test_hyperthreads_count_once_by_default_but_can_be_asked_for(monkeypatch):
    # Four logical CPUs, two per core: two threads by default, four when asked for.
    monkeypatch.setattr(_kernels, "_usable_cpu_ids", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(_kernels, "_core_of", lambda cpu: cpu // 2)
    assert _kernels.usable_cpus() == 4
    assert _kernels.physical_cores() == 2
    assert randygpt.effective_n_threads() == 2
    assert randygpt.effective_n_threads(4) == 4
    assert randygpt.effective_n_threads(-1) == 4


def test_core_of_reads_the_cpu_topology():
    # Every usable CPU maps to a core; CPU 0 belongs to the same core as itself.
    assert _kernels._core_of(0) == _kernels._core_of(0)
    assert _kernels._core_of(10**6) == "cpu1000000"  # no such CPU: a core of its own


@needs_openmp
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this OS")
def test_openmp_binding_does_not_hide_cpus():
    # With OMP_PLACES set, the OpenMP runtime pins the initial thread to its first place as it
    # loads, so the affinity mask shows one core; usable_cpus must still count all of them.
    env = dict(os.environ, OMP_PROC_BIND="close", OMP_PLACES="cores")
    env.pop("RANDYGPT_NUM_THREADS", None)
    env.pop("OMP_NUM_THREADS", None)
    code = ("import os, randygpt._kernels as k; "
            "print(len(os.sched_getaffinity(0)), k.usable_cpus(), k.effective_n_threads())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert int(out[1]) == _kernels.usable_cpus()
    assert int(out[2]) == _kernels.physical_cores()


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


@pytest.mark.parametrize("value", ["many", "0", "-0", "2.5", "4,2", "1_0", " "])
def test_bad_randygpt_env(monkeypatch, value):
    monkeypatch.setenv("RANDYGPT_NUM_THREADS", value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if not value.strip():  # empty: unset, so OMP_NUM_THREADS decides
        assert randygpt.effective_n_threads() == 1
        return
    with pytest.raises(ValueError) as err:
        randygpt.effective_n_threads()
    assert str(err.value) == (
        "RANDYGPT_NUM_THREADS must be a nonzero integer (n > 0: n threads; -k: all usable CPUs "
        f"but k - 1), got {value!r}")


@pytest.mark.parametrize("value", ["abc", "0", "-2", "4,", "4,0", "4;2", "2.0"])
def test_bad_omp_env(monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    with pytest.raises(ValueError) as err:
        randygpt.effective_n_threads()
    assert str(err.value) == ("OMP_NUM_THREADS must be a positive integer, or OpenMP's "
                              f"comma-separated list of them (e.g. 4,2), got {value!r}")


@needs_openmp
@pytest.mark.parametrize("value, first", [("1,2", 1), (" 1 , 4 ", 1), ("2,1,1", 2), ("+1", 1)])
def test_omp_nested_list_reads_its_first_level(monkeypatch, value, first):
    # OpenMP's syntax gives one team size per nesting level; the kernels open one level.
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert randygpt.effective_n_threads() == min(first, _kernels.usable_cpus())


def test_zero_request_names_what_is_accepted():
    with pytest.raises(ValueError, match=r"^set_num_threads: number of threads must be a "
                                         r"nonzero integer \(n > 0: n threads; -k: .*\), got 0$"):
        randygpt.set_num_threads(0)


def test_bad_env_is_one_value_error_line():
    # A bad variable ends in one ValueError line (the command line turns it into its error).
    env = dict(os.environ, RANDYGPT_NUM_THREADS="abc")
    code = "import randygpt._kernels as k; k.effective_n_threads()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "ValueError: RANDYGPT_NUM_THREADS must be a nonzero integer (n > 0: n threads; "
        "-k: all usable CPUs but k - 1), got 'abc'")


def test_openmp_flag_is_bool():
    assert isinstance(randygpt.openmp_enabled(), bool)
    if not randygpt.openmp_enabled():
        assert randygpt.effective_n_threads(4) == 1
