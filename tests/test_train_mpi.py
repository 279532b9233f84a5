"""Data-parallel training over MPI, end to end: `mpiexec -n K python -m randygpt ...` against
one process. K ranks see the batches of one process, average their gradients in rank order,
and so follow the one-process run to float32 rounding; repeat runs are bit-identical; only
rank 0 writes; checkpoints do not depend on K; a failing rank ends the job.

Skipped without mpiexec and mpi4py (pip install "randygpt[mpi]"). Tiny model, few steps:
3 ranks on 2 cores is slow but fine for correctness.
"""
import csv
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from conftest import interrupt_when, mpi_env, need_mpi
from randygpt import checkpoint

TIMEOUT_S = 120
# batch 6: divisible by 1, 2 and 3 ranks.
FLAGS = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "8",
         "--batch-size", "6", "--eval-iters", "3", "--eval-every", "5", "--log-every", "1",
         "--lr", "1e-2", "--warmup-iters", "2", "--threads", "1", "--no-sample"]

pytestmark = pytest.mark.usefixtures("run_sandbox")


def train(tmp_path, n_ranks, out, *extra):
    """Run the command line with n_ranks (0: a plain process, no launcher)."""
    cmd = [sys.executable, "-m", "randygpt", *FLAGS, *extra, "--data", str(tmp_path / "text.txt"),
           "--out", str(tmp_path / out)]
    if n_ranks:
        cmd = [need_mpi(), "-n", str(n_ranks), *cmd]
    proc = subprocess.run(cmd, cwd=tmp_path, env=mpi_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    return proc


def losses(tmp_path, out):
    with open(tmp_path / out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return np.array([float(r["train_loss"]) for r in rows]), [r["val_loss"] for r in rows]


def params_sha(tmp_path, out):
    return hashlib.sha256(checkpoint.load(tmp_path / out / "ckpt.npz").params.tobytes()).hexdigest()


# With dropout, the ranks' masks are those of one process's batch (Trainer passes each rank's
# batch offset), so the runs agree as closely as without.
@pytest.mark.parametrize("n_ranks, dropout", [(2, "0"), (3, "0"), (2, "0.1")])
def test_k_ranks_follow_one_process(tmp_path, text_path, n_ranks, dropout):
    need_mpi()
    one = train(tmp_path, 0, "one", "20", "--dropout", dropout)
    many = train(tmp_path, n_ranks, "many", "20", "--dropout", dropout)
    assert one.returncode == 0, one.stderr
    assert many.returncode == 0, many.stderr
    a, val_a = losses(tmp_path, "one")
    b, val_b = losses(tmp_path, "many")
    assert a.shape == b.shape == (21,)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=0)
    assert a[-1] < a[0] - 0.3, "the test config should learn"
    # The split evaluation gives one process's estimate (before any step: bit for bit).
    assert val_a[0] == val_b[0]
    np.testing.assert_allclose([float(v) for v in val_b if v], [float(v) for v in val_a if v],
                               rtol=1e-4)
    # Rank 0 alone printed, and wrote only the run's files.
    assert many.stdout.count("Initial loss estimate") == 1
    assert f"{n_ranks} ranks on 1 host" in many.stdout
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())


GRADS = textwrap.dedent(
    """
    import sys
    import numpy as np
    from randygpt import distributed
    from randygpt.train import RunOptions, Trainer
    comm = distributed.init()
    tiny = dict(n_layer=1, n_embd=16, n_head=2, block_size=8, batch_size=6, dropout=0.0)
    opts = RunOptions(iters=3, data_path=sys.argv[1], out_dir=sys.argv[2], n_threads=1,
                      sample=False, overrides=tiny)
    with Trainer(None, opts, comm=comm) as trainer:
        trainer.step()                      # the gradient buffer keeps the averaged gradient
        if comm.is_root:
            np.save(sys.argv[3], trainer.model.flat_grads)
    """
)


def test_first_step_gradients_match_one_process(tmp_path, text_path):
    mpiexec = need_mpi()
    (tmp_path / "grads.py").write_text(GRADS)
    runs = {}
    for n, cmd in ((1, [sys.executable]), (2, [mpiexec, "-n", "2", sys.executable])):
        proc = subprocess.run([*cmd, "grads.py", str(text_path), f"out{n}", f"g{n}.npy"],
                              cwd=tmp_path, env=mpi_env(), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        assert proc.returncode == 0, proc.stderr
        runs[n] = np.load(tmp_path / f"g{n}.npy")
    scale = np.abs(runs[1]).max()
    assert np.abs(runs[2] - runs[1]).max() <= 1e-5 * scale


def test_repeat_runs_are_bit_identical_and_resume_with_another_rank_count(tmp_path, text_path):
    need_mpi()
    for out in ("a", "b"):
        assert train(tmp_path, 2, out, "12").returncode == 0
    assert params_sha(tmp_path, "a") == params_sha(tmp_path, "b")
    # Stopped with 2 ranks, resumed with 2: the uninterrupted 2-rank run, bit for bit.
    assert train(tmp_path, 2, "c", "12", "--stop-at", "6").returncode == 0
    proc = train(tmp_path, 2, "c", "12", "--resume", str(tmp_path / "c" / "ckpt.npz"))
    assert proc.returncode == 0, proc.stderr
    assert params_sha(tmp_path, "c") == params_sha(tmp_path, "a")
    # The checkpoint does not depend on K: 1 and 3 ranks continue it.
    for n_ranks, out in ((0, "d"), (3, "e")):
        assert train(tmp_path, 2, out, "12", "--stop-at", "6").returncode == 0
        proc = train(tmp_path, n_ranks, out, "12", "--resume", str(tmp_path / out / "ckpt.npz"))
        assert proc.returncode == 0, proc.stderr
        assert checkpoint.load(tmp_path / out / "ckpt.npz").step == 12
        np.testing.assert_allclose(losses(tmp_path, out)[0], losses(tmp_path, "a")[0], rtol=1e-4)


def test_a_batch_the_ranks_do_not_divide_is_refused_on_every_rank(tmp_path, text_path):
    need_mpi()
    proc = train(tmp_path, 2, "r", "4", "--batch-size", "5")
    assert proc.returncode == 2
    # Every rank says it (the launcher may join the ranks' lines: count the messages).
    assert proc.stderr.count("randygpt: error: ") == 2, proc.stderr
    assert proc.stderr.count("not divisible by the 2 ranks") == 2, proc.stderr
    assert not (tmp_path / "r").exists()


FAILING_RANK = textwrap.dedent(
    """
    import sys
    from randygpt import cli, train
    real = train.Trainer.step
    def step(self):
        if self.comm.rank == 1 and self.step_count == 3:
            raise RuntimeError("rank 1 breaks")
        return real(self)
    train.Trainer.step = step
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def test_a_rank_that_raises_ends_the_job_within_seconds(tmp_path, text_path):
    mpiexec = need_mpi()
    (tmp_path / "fail.py").write_text(FAILING_RANK)
    t0 = time.monotonic()
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "fail.py", "1000", *FLAGS,
                           "--data", str(text_path), "--out", "r"], cwd=tmp_path, env=mpi_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode != 0 and time.monotonic() - t0 < 30
    assert "rank 1 breaks" in proc.stderr


def test_launched_without_mpi4py_is_one_clear_line_on_every_rank(tmp_path, text_path):
    need_mpi()
    hidden = tmp_path / "hide" / "mpi4py"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ModuleNotFoundError('hidden', name='mpi4py')\n")
    proc = subprocess.run([need_mpi(), "-n", "2", sys.executable, "-m", "randygpt", "4", *FLAGS,
                           "--data", str(text_path), "--out", "r"], cwd=tmp_path,
                          env=mpi_env(PYTHONPATH=str(tmp_path / "hide")), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2
    assert proc.stderr.count("randygpt: error: ") == 2, proc.stderr
    assert proc.stderr.count("randygpt[mpi]") == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists()


def test_sigterm_to_the_launcher_stops_every_rank_at_one_iteration(tmp_path, text_path):
    proc, rest, err = interrupt_when(
        [need_mpi(), "-n", "2", sys.executable, "-u", "-m", "randygpt", "100000", *FLAGS,
         "--data", str(text_path), "--out", "r"],
        "Iter 3/", lambda p: p.send_signal(signal.SIGTERM), cwd=tmp_path, env=mpi_env())
    assert proc.returncode == 143, err
    step = checkpoint.load(tmp_path / "r" / "ckpt.npz").step
    assert f"Interrupted (SIGTERM) after iteration {step}/100000" in rest
    assert rest.count("Interrupted (SIGTERM)") == 1  # rank 0 alone reports


def test_a_rank_killed_with_sigkill_ends_the_job_and_the_checkpoint_resumes(tmp_path, text_path):
    def kill_one_rank(proc):
        # The ranks are python processes under the launcher's proxy: SIGKILL one of them.
        ranks = subprocess.run(["pgrep", "-f", f"{sys.executable} -u -m randygpt 100000"],
                               capture_output=True, text=True).stdout.split()
        ranks = [int(p) for p in ranks if int(p) != proc.pid]
        assert len(ranks) == 2, ranks
        os.kill(max(ranks), signal.SIGKILL)
        kill_one_rank.at = time.monotonic()

    proc, _, _ = interrupt_when(
        [need_mpi(), "-n", "2", sys.executable, "-u", "-m", "randygpt", "100000", *FLAGS,
         "--save-every", "2", "--data", str(text_path), "--out", "r"],
        "Iter 5/", kill_one_rank, timeout=30, cwd=tmp_path, env=mpi_env())
    assert time.monotonic() - kill_one_rank.at < 10
    assert proc.returncode != 0
    step = checkpoint.load(tmp_path / "r" / "ckpt.npz").step  # intact
    assert step >= 4 and step % 2 == 0
    resumed = train(tmp_path, 2, "r", str(step + 2), "--resume", str(tmp_path / "r" / "ckpt.npz"))
    assert resumed.returncode == 0, resumed.stderr
