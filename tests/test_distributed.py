"""randygpt.distributed: launcher detection, the one-rank communicator, and the MPI
collectives checked under a real launcher.

The MPI tests start ``mpiexec -n K python tests/test_distributed.py <check>``: this file is
also the program every rank runs (see the bottom). They skip when there is no mpiexec or
no mpi4py. A rank reports a failed check by raising inside abort_on_error, which ends the job
with a non-zero status and the traceback on stderr.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import mpi_env, need_mpi
from randygpt import distributed
from randygpt._kernels import physical_cores

TIMEOUT_S = 60


# --- without MPI ----------------------------------------------------------------------------

@pytest.mark.parametrize("env, launched, size", [
    ({}, False, None),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, False, None),   # a batch script, not a step
    ({"PMI_SIZE": "3", "PMI_RANK": "1"}, True, 3),                # MPICH / Intel MPI Hydra
    ({"MPI_LOCALNRANKS": "2"}, True, None),
    ({"OMPI_COMM_WORLD_SIZE": "2", "PMIX_RANK": "0"}, True, 2),   # Open MPI
    ({"PMIX_RANK": "0"}, True, None),                             # srun --mpi=pmix
    ({"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3"}, True, 8),  # srun
])
def test_launcher_detection(env, launched, size):
    assert distributed.launched_by_mpi(env) is launched
    assert distributed.launcher_size(env) == size


def test_plain_process_never_imports_mpi4py():
    code = ("import sys, numpy as np, randygpt.distributed as d\n"
            "c = d.init()\n"
            "g = np.arange(5, dtype=np.float32); c.average_grads(g)\n"
            "assert type(c) is d.LocalCommunicator and c.size == 1 and c.is_root\n"
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=mpi_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def local_as(rank, size):
    """A LocalCommunicator posing as one rank of `size`, for the arithmetic shared by both."""
    comm = distributed.LocalCommunicator()
    comm.rank, comm.size = rank, size
    return comm


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_batch_slice_and_share_cover_exactly_once(size):
    batch = 30
    rows = [i for r in range(size) for i in range(batch)[local_as(r, size).batch_slice(batch)]]
    assert rows == list(range(batch))
    for n in (0, 2, 7):
        items = [i for r in range(size) for i in local_as(r, size).share(n)]
        assert items == list(range(n))


def test_batch_slice_refuses_a_batch_the_ranks_do_not_divide():
    with pytest.raises(distributed.DistributedError, match="not divisible by the 3 ranks"):
        local_as(0, 3).batch_slice(32)
    with pytest.raises(ValueError, match="positive int"):
        local_as(0, 1).batch_slice(0)


def test_local_communicator():
    comm = distributed.LocalCommunicator()
    g = np.linspace(-1, 1, 7, dtype=np.float32)
    before = g.copy()
    comm.average_grads(g)
    assert np.array_equal(g, before)
    assert comm.gather_floats(np.float32([0.5, 2.0])) == [0.5, 2.0]
    assert comm.any(True) is True and comm.any(0) is False
    comm.check_identical(g)
    assert comm.bcast_object({"a": 1}) == {"a": 1}
    assert (comm.hosts, comm.local_rank, comm.local_size) == (1, 0, 1)
    assert distributed.default_threads(comm) == max(1, physical_cores())
    with pytest.raises(ValueError, match="contiguous 1-D float32"):
        comm.average_grads(g.astype(np.float64))
    with pytest.raises(TypeError, match="numpy array"):
        comm.average_grads([1.0, 2.0])
    with pytest.raises(SystemExit):
        comm.abort(3)


def test_abort_on_error_lets_a_single_rank_raise():
    with pytest.raises(KeyError):
        with distributed.abort_on_error(distributed.LocalCommunicator()):
            raise KeyError("x")


# --- under mpiexec --------------------------------------------------------------------------

def launch(n_ranks, check, env=None, timeout=TIMEOUT_S):
    return subprocess.run([need_mpi(), "-n", str(n_ranks), sys.executable, __file__, check],
                          env=mpi_env() if env is None else env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("n_ranks", [2, 3])
def test_collectives(n_ranks):
    proc = launch(n_ranks, "collectives")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"collectives ok on {n_ranks} ranks", proc.stdout


def test_a_rank_that_raises_ends_the_job():
    t0 = time.perf_counter()
    proc = launch(3, "raise", timeout=30)
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    assert "RuntimeError: rank 1 fails" in proc.stderr, proc.stderr
    assert "rank 1 of 3: uncaught exception" in proc.stderr
    assert elapsed < 10, f"the job took {elapsed:.1f} s to end"


@pytest.mark.parametrize("mpi_module, says", [
    (None, "mpi4py is not installed"),
    ("raise RuntimeError('cannot load MPI library\\nlibmpi.so.12: cannot open shared object')",
     "mpi4py cannot load an MPI library (libmpi.so.12: cannot open shared object)"),
])
def test_launched_without_a_working_mpi4py(tmp_path, mpi_module, says):
    """Every rank says what to install and exits 2: none goes on as a run of its own."""
    fake = tmp_path / "mpi4py"
    fake.mkdir()
    if mpi_module is None:
        (fake / "__init__.py").write_text("raise ModuleNotFoundError('hidden', name='mpi4py')\n")
    else:
        (fake / "__init__.py").write_text("class rc:\n    pass\n")
        (fake / "MPI.py").write_text(mpi_module + "\n")
    proc = launch(2, "init", env=mpi_env(PYTHONPATH=str(tmp_path)))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    expected = (f"error: started by an MPI launcher as 2 processes, but {says}: "
                f"{distributed.INSTALL_HINT}")
    assert len(lines) == 2 and all(ln.startswith(expected) for ln in lines), proc.stderr
    assert "started" not in proc.stdout


def test_bench_dist_quick():
    """benchmarks/bench_dist.py launches its jobs, checks average_grads, and prints JSON."""
    need_mpi()
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_dist.py"
    proc = subprocess.run([sys.executable, str(bench), "--quick", "--json", "--ranks", "2"],
                          env=mpi_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    (job,) = json.loads(proc.stdout)["jobs"]
    assert job["ranks"] == 2 and job["floats"] == 8192
    assert job["ops"]["average_grads"]["median_s"] > 0


# --- the programs the ranks run -------------------------------------------------------------

def rank_gradients(rank, size, n):
    """Rank `rank`'s gradient of n floats; with 3+ ranks a few elements (at the start, middle
    and end of every rank's shard) hold 1e30, -1e30, 1 on ranks 0, 1, 2: their float32 sum is
    1 in rank order, but 0 in any order that adds rank 2's 1 to a huge partial sum."""
    g = np.random.default_rng(100 + rank).standard_normal(n).astype(np.float32)
    if size >= 3:
        bounds = [n * r // size for r in range(size + 1)]
        spots = [i for a, b in zip(bounds, bounds[1:]) if b > a for i in (a, (a + b) // 2, b - 1)]
        g[spots] = {0: 1e30, 1: -1e30, 2: 1.0}.get(rank, 0.0)
    return g


def in_order_mean(grads):
    acc = grads[0].copy()
    for g in grads[1:]:
        acc += g
    return acc / np.float32(len(grads))


def check_average_grads(comm, n):
    grads = [rank_gradients(r, comm.size, n) for r in range(comm.size)]
    expected = in_order_mean(grads)
    if comm.size >= 3:  # the check can tell rank order from another order
        assert not np.array_equal(expected, in_order_mean(grads[::-1]))
    first = grads[comm.rank].copy()
    comm.average_grads(first)
    assert first.tobytes() == expected.tobytes(), \
        f"n={n}: {np.sum(first != expected)} of {n} elements differ from the rank-order mean"
    again = grads[comm.rank].copy()
    comm.average_grads(again)
    assert again.tobytes() == first.tobytes(), f"n={n}: a repeat differs"


def check_collectives(comm):
    K, r = comm.size, comm.rank
    assert (comm.hosts, comm.local_size, comm.local_rank) == (1, K, r)
    assert distributed.default_threads(comm) >= 1
    for n in (1001, 2):  # uneven shards; fewer floats than ranks (an empty shard)
        check_average_grads(comm, n)

    values = comm.gather_floats([10.0 * r + i for i in range(r + 1)])
    assert values == [10.0 * q + i for q in range(K) for i in range(q + 1)], values
    assert comm.any(r == K - 1) is True and comm.any(False) is False
    assert comm.bcast_object({"from": r}, root=K - 1) == {"from": K - 1}

    rows = comm.gather_floats(range(6 * K)[comm.batch_slice(6 * K)])
    assert rows == list(range(6 * K)), rows
    assert comm.local_allgather(r) == list(range(K))

    params = np.random.default_rng(7).standard_normal(99).astype(np.float32)
    comm.check_identical(params)
    if r == 1:
        params[42] = np.nextafter(params[42], np.float32(np.inf))  # one bit apart
    try:
        comm.check_identical(params)
    except distributed.DistributedError as e:
        assert str(e).startswith("the parameters of rank(s) 1 differ from rank 0's"), str(e)
    else:
        raise AssertionError("check_identical missed a rank whose parameters differ")
    ok = comm.gather_floats([1.0])
    if comm.is_root:
        assert ok == [1.0] * K
        print(f"collectives ok on {K} ranks", flush=True)


def check_raise(comm):
    if comm.rank == 1:
        time.sleep(0.2)  # the others are waiting in the barrier by then
        raise RuntimeError("rank 1 fails")
    comm.barrier()


def check_init():
    """What the command line does: init, or print the one-line error and exit 2."""
    try:
        distributed.init()
    except distributed.DistributedError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    print("started", flush=True)


def rank_main(check):
    if check == "init":
        return check_init()
    comm = distributed.init()
    with distributed.abort_on_error(comm):
        {"collectives": check_collectives, "raise": check_raise}[check](comm)


if __name__ == "__main__":
    rank_main(sys.argv[1])
