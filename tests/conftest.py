"""Shared test helpers: seeded RNGs, close-comparisons that report where they fail,
central finite differences, and the path to the Tiny Shakespeare corpus."""
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import randygpt

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "ran", "far", "away", "ROMEO:"]


def word_text(n_words, seed=0):
    """n_words random words (a fixed seed gives a fixed text): varied enough that batches and
    the train/val splits differ, repetitive enough that a tiny model learns it quickly."""
    r = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in r.integers(0, len(WORDS), n_words)) + "\n"


@pytest.fixture
def run_sandbox(tmp_path, monkeypatch):
    """Runs in tmp_path: no ./train.txt from the developer's directory, no writes to the real
    corpus cache. Modules that train use it with pytestmark."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANDYGPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def text_path(tmp_path):
    """A few KB of word_text in tmp_path/text.txt."""
    p = tmp_path / "text.txt"
    p.write_text(word_text(1200))
    return p


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def shakespeare_path():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {SHAKESPEARE}")
    return SHAKESPEARE


def each_path(available, get, put):
    """A fixture that runs a test once per SIMD path ``available()`` lists on this CPU, set
    with ``put(name)``, and restores the path ``get()`` gave before. In a kernel's test module:
    ``isa = each_path(family.available_isas, family.get_isa, family.set_isa)``."""
    @pytest.fixture(params=available())
    def fixture(request):
        before = get()
        put(request.param)
        yield request.param
        put(before)
    return fixture


def decay_mask(model):
    """The model's decay_spans as a (P,) uint8 array, 1 where weight decay applies."""
    mask = np.zeros(model.num_params, dtype=np.uint8)
    for lo, hi, decay in model.decay_spans:
        mask[lo:hi] = decay
    return mask


def assert_close(actual, expected, rtol=1e-5, atol=1e-6, name="array"):
    """np.testing-style check that reports the worst element and its index."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    err = np.abs(a - e)
    tol = atol + rtol * np.abs(e)
    bad = ~(err <= tol)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err - tol, -np.inf)), err.shape)
        raise AssertionError(
            f"{name}: {bad.sum()} of {err.size} elements differ; max abs diff {err.max():.3e}; "
            f"worst at {i}: got {a[i]!r}, expected {e[i]!r} (rtol={rtol}, atol={atol})"
        )


def assert_bitwise_equal(actual, expected, name="array"):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if not np.array_equal(actual.view(np.uint8), expected.view(np.uint8)):
        diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
        i = np.unravel_index(np.nanargmax(diff), diff.shape)
        raise AssertionError(f"{name}: not bit-identical; max abs diff {np.nanmax(diff):.3e} at {i}")


def numerical_grad(f, x, eps=1e-6):
    """Central finite differences of the scalar function f() with respect to x (float64, in place)."""
    assert x.dtype == np.float64, "finite differences must run in float64"
    g = np.zeros_like(x)
    flat = x.reshape(-1)
    gflat = g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f()
        flat[i] = old - eps
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * eps)
    return g


def assert_grad_close(analytic, numeric, rel=1e-6, name="grad"):
    """Relative error |a - n| / max(|a| + |n|, tiny) below rel, elementwise scale-aware."""
    a = np.asarray(analytic, dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    scale = max(np.abs(a).max(), np.abs(n).max(), 1e-12)
    err = np.abs(a - n).max() / scale
    assert err < rel, f"{name}: relative error {err:.3e} >= {rel} (max |grad| {scale:.3e})"


def thread_counts():
    """1, 2 and 3 threads: bit-identity must hold for any of them (3 > cores on purpose)."""
    return [1, 2, 3]


@pytest.fixture(autouse=True, scope="session")
def _require_openmp():
    if os.environ.get("RANDYGPT_REQUIRE_OPENMP") == "1" and not randygpt.openmp_enabled():
        pytest.exit("RANDYGPT_REQUIRE_OPENMP=1 but randygpt was built without OpenMP", returncode=1)


def interrupt_when(cmd, prefix, act, timeout=60, **popen):
    """Start ``cmd`` (its stdout a text pipe), wait for a line starting with ``prefix``, call
    ``act(proc)`` (send a signal, kill a child...), and return (proc, stdout after the line,
    stderr). The process is killed if anything fails on the way."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)
    try:
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            if line.startswith(prefix) or time.monotonic() > deadline:
                break
        act(proc)
        rest, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc, rest, err


# --- MPI -----------------------------------------------------------------------------------------

# What MPI launchers put in a rank's environment (randygpt.distributed reads them): tests that
# start their own launcher or a plain process must not inherit them.
LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS",
                 "MPI_LOCALNRANKS", "MPI_LOCALRANKID", "PALS_RANKID")


def mpi_env(**extra):
    """This process's environment without MPI launcher variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(extra)
    return env


def find_mpiexec():
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.is_file() else shutil.which("mpiexec")


def need_mpi():
    """The mpiexec to launch with; skips the test when it or mpi4py is missing."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        pytest.skip("no mpiexec next to the interpreter or on PATH (pip install \"randygpt[mpi]\")")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install \"randygpt[mpi]\")")
    return mpiexec
