"""Hostile input to the command line and the run layer: every case ends with one line
`randygpt: error: ...` and exit 2 (bad input) or 1 (the work failed), never a traceback, a
hang or a lost run. One test per class of input; new cases of a class join its test.

The kernel API's own hostile cases are in test_hostile_kernels.py, files' (data, checkpoints,
run directories) in test_hostile_files.py.
"""
import csv
import io
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import word_text
from randygpt import checkpoint, cli, train
from randygpt.rundir import RunDirError
from randygpt.train import RunOptions, Trainer

TINY_FLAGS = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "8",
              "--batch-size", "4", "--eval-iters", "1", "--threads", "1", "--no-sample"]
TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 8, "batch_size": 4}


pytestmark = pytest.mark.usefixtures("run_sandbox")


def one_line(capsys, code, expected_code=2):
    captured = capsys.readouterr()
    assert code == expected_code, f"exit {code}, stderr {captured.err!r}"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("randygpt: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def run_module(args, cwd, env_extra=None, timeout=60):
    env = dict(os.environ, RANDYGPT_CACHE_DIR=str(cwd / "cache"))
    for name in ("RANDYGPT_NUM_THREADS", "OMP_NUM_THREADS", "RANDYGPT_ISA", "RANDYGPT_BF16_ISA",
                 "RANDYGPT_DEBUG"):
        env.pop(name, None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "randygpt", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# --- environment variables ------------------------------------------------------------------

@pytest.mark.parametrize("name, value, words", [
    ("RANDYGPT_NUM_THREADS", "abc", "RANDYGPT_NUM_THREADS"),
    ("RANDYGPT_NUM_THREADS", "0", "RANDYGPT_NUM_THREADS"),
    ("OMP_NUM_THREADS", "zero", "OMP_NUM_THREADS"),
    ("RANDYGPT_ISA", "foo", "RANDYGPT_ISA"),
    ("RANDYGPT_BF16_ISA", "fp16", "RANDYGPT_BF16_ISA"),
])
def test_bad_environment_is_one_line_and_exit_2(tmp_path, text_path, name, value, words):
    p = run_module(["2", *TINY_FLAGS[:-3], "--data", str(text_path), "--out", "r"], tmp_path,
                   {name: value})
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    if name == "OMP_NUM_THREADS":
        # The OpenMP runtime itself warns about the variable when it loads, before randygpt
        # runs a line; what follows is randygpt's one line.
        lines = [line for line in lines if not line.startswith("libgomp: ")]
    assert len(lines) == 1 and lines[0].startswith("randygpt: error: ") and words in lines[0], p.stderr


def test_openmp_nested_thread_list_is_read_as_openmp_reads_it(tmp_path, text_path):
    # OMP_NUM_THREADS=4,2 means 4 threads at the outer level: not an error.
    p = run_module(["2", *TINY_FLAGS[:-3], "--data", str(text_path), "--out", "r", "--no-sample"],
                   tmp_path, {"OMP_NUM_THREADS": "4,2"})
    assert p.returncode == 0, p.stderr


# --- values out of range ----------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["3", "--seed", str(2**64)], "seed must be an int in [0, 2**64)"),
    (["3", "--seed", "-1"], "seed"),
    (["sample", "--checkpoint", "x.npz", "--seed", str(2**64)], "--seed"),
    (["3", "--lr", "nan"], "--lr must be a finite number"),
    (["3", "--eval-iters", "0"], "--eval-iters must be a positive integer"),
])
def test_out_of_range_values(capsys, text_path, argv, words):
    assert words in one_line(capsys, cli.main(argv + ["--data", str(text_path)]
                                              if argv[0] != "sample" else argv))


def test_more_threads_than_cpus_is_said(capsys, tmp_path, text_path):
    assert cli.main(["2", *TINY_FLAGS[:-3], "--threads", "1000", "--no-sample",
                     "--data", str(text_path), "--out", "r"]) == 0
    out = capsys.readouterr().out
    assert "note: 1000 threads asked for" in out


def test_run_shorter_than_the_warmup_is_said(capsys, text_path):
    assert cli.main(["3", *TINY_FLAGS, "--data", str(text_path), "--out", "r"]) == 0
    out = capsys.readouterr().out
    assert "shorter than the warmup (100)" in out and "never reaches its peak" in out


# --- the output directory ---------------------------------------------------------------------

def test_unwritable_output_directory_at_start(capsys, text_path):
    # /proc is not writable, even for root.
    line = one_line(capsys, cli.main(["3", *TINY_FLAGS, "--data", str(text_path),
                                      "--out", "/proc/randygpt-run"]))
    assert "/proc/randygpt-run" in line


def test_a_full_disk_during_a_save_fails_the_run_and_keeps_the_last_checkpoint(
        capsys, tmp_path, text_path, monkeypatch):
    real_save = checkpoint.save
    calls = []

    def save_that_fills_the_disk(path, **kw):
        calls.append(kw["step"])
        if len(calls) > 1:
            raise checkpoint.CheckpointError(f"cannot save checkpoint {str(path)!r}: No space "
                                             "left on device")
        real_save(path, **kw)

    monkeypatch.setattr(checkpoint, "save", save_that_fills_the_disk)
    line = one_line(capsys, cli.main(["9", *TINY_FLAGS, "--data", str(text_path), "--out", "r",
                                      "--save-every", "3"]), expected_code=1)
    assert "No space left on device" in line and "last good checkpoint" in line
    assert checkpoint.load(tmp_path / "r" / "ckpt.npz").step == 3


# --- signals ----------------------------------------------------------------------------------

def test_ctrl_c_during_the_first_estimate_stops_at_once_and_saves_nothing(tmp_path, text_path,
                                                                          monkeypatch):
    real = train.Dataset.get_batch
    calls = []

    def get_batch(self, split, batch_size, rng):
        calls.append(split)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return real(self, split, batch_size, rng)

    monkeypatch.setattr(train.Dataset, "get_batch", get_batch)
    opts = RunOptions(iters=5, data_path=str(text_path), out_dir=str(tmp_path / "r"),
                      eval_iters=500, sample=False, n_threads=1, overrides=TINY)
    with Trainer(None, opts, stdout=io.StringIO(), stderr=io.StringIO()) as trainer:
        result = trainer.fit()
    assert result.interrupted == "SIGINT" and result.step == 0 and result.checkpoint is None
    assert len(calls) == 3  # the estimate stopped at the next batch, not after 1000
    assert not (tmp_path / "r" / "ckpt.npz").exists()


def test_ctrl_c_before_the_first_step_on_the_command_line(capsys, text_path, monkeypatch):
    real = train.Dataset.get_batch

    def get_batch(self, split, batch_size, rng):
        signal.raise_signal(signal.SIGINT)
        return real(self, split, batch_size, rng)

    monkeypatch.setattr(train.Dataset, "get_batch", get_batch)
    assert cli.main(["5", *TINY_FLAGS, "--data", str(text_path), "--out", "r"]) == 130
    out = capsys.readouterr().out
    assert "before the first step: nothing to save" in out and "Continue with" not in out


# --- unexpected errors ------------------------------------------------------------------------

def test_an_unexpected_error_is_one_line_asking_for_a_report(capsys, text_path, monkeypatch):
    def broken(self):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(Trainer, "fit", broken)
    line = one_line(capsys, cli.main(["3", *TINY_FLAGS, "--data", str(text_path), "--out", "r"]),
                    expected_code=1)
    assert "something nobody expected" in line and "please report" in line
    monkeypatch.setenv("RANDYGPT_DEBUG", "1")
    assert cli.main(["3", *TINY_FLAGS, "--data", str(text_path), "--out", "r2"]) == 1
    assert "Traceback" in capsys.readouterr().err


# --- resumed runs -----------------------------------------------------------------------------

def test_elapsed_time_is_cumulative_across_a_resume(tmp_path, text_path, monkeypatch):
    common = dict(data_path=str(text_path), out_dir=str(tmp_path / "r"), eval_iters=1,
                  log_every=2, sample=False, n_threads=1)
    real = train.Dataset.get_batch

    def slow_get_batch(self, *args):
        time.sleep(0.05)
        return real(self, *args)

    # A slow first session (>= 0.2 s by iteration 4) and a fast second one: a clock that
    # restarted at the resume would put iterations 6 and 8 below iteration 4.
    monkeypatch.setattr(train.Dataset, "get_batch", slow_get_batch)
    train.run(None, RunOptions(iters=8, stop_at=4, overrides=TINY, **common),
              stdout=io.StringIO())
    monkeypatch.setattr(train.Dataset, "get_batch", real)
    train.run(None, RunOptions(iters=8, resume=str(tmp_path / "r" / "ckpt.npz"), **common),
              stdout=io.StringIO())
    with open(tmp_path / "r" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iter"]) for r in rows] == [0, 2, 4, 6, 8]
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed[2] >= 0.2 and elapsed == sorted(elapsed), elapsed


def test_stop_at_is_not_called_final(capsys, text_path):
    assert cli.main(["9", *TINY_FLAGS, "--data", str(text_path), "--out", "r",
                     "--stop-at", "4"]) == 0
    out = capsys.readouterr().out
    assert "Final loss estimate" not in out and "Loss estimate at iteration 4:" in out


# --- no run is lost or silently changed ---------------------------------------------------------

def _stopped_run(tmp_path, text_path, name="r", **kw):
    opts = RunOptions(iters=8, stop_at=3, data_path=str(text_path), out_dir=str(tmp_path / name),
                      eval_iters=1, sample=False, n_threads=1, overrides=TINY, **kw)
    train.run(None, opts, stdout=io.StringIO())
    return tmp_path / name / "ckpt.npz"


def test_resume_without_data_uses_the_recorded_text_and_checks_it(capsys, tmp_path, text_path):
    ckpt = _stopped_run(tmp_path, text_path)
    (tmp_path / "train.txt").write_text("another default text " * 200)  # must not be picked up
    assert cli.main(["8", "--resume", str(ckpt), "--eval-iters", "1", "--threads", "1",
                     "--no-sample", "--stop-at", "4"]) == 0
    assert str(text_path) in capsys.readouterr().out
    text_path.write_text(text_path.read_text() + "changed\n")
    line = one_line(capsys, cli.main(["8", "--resume", str(ckpt), "--threads", "1"]))
    assert "was trained on" in line and "sha256" in line and "--data" in line
    text_path.unlink()
    line = one_line(capsys, cli.main(["8", "--resume", str(ckpt), "--threads", "1"]))
    assert "cannot be read now" in line
    # An explicit --data is the user's deliberate choice: no check.
    other = tmp_path / "other.txt"
    other.write_text(word_text(1300, seed=1))
    assert cli.main(["8", "--resume", str(ckpt), "--data", str(other), "--threads", "1",
                     "--eval-iters", "1", "--no-sample"]) == 0


def test_resume_into_another_runs_directory_is_refused(capsys, tmp_path, text_path):
    a = _stopped_run(tmp_path, text_path, "a")
    b = _stopped_run(tmp_path, text_path, "b")
    before = b.read_bytes(), (tmp_path / "b" / "metrics.csv").read_bytes()
    line = one_line(capsys, cli.main(["8", "--resume", str(a), "--out", str(tmp_path / "b"),
                                      "--threads", "1"]))
    assert "another run" in line
    assert (b.read_bytes(), (tmp_path / "b" / "metrics.csv").read_bytes()) == before


def test_two_runs_on_one_directory_cannot_both_run(tmp_path, text_path):
    opts = RunOptions(iters=4, data_path=str(text_path), out_dir=str(tmp_path / "r"),
                      eval_iters=1, sample=False, n_threads=1, overrides=TINY)
    with Trainer(None, opts, stdout=io.StringIO()):
        with pytest.raises(RunDirError, match="in use by another randygpt run"):
            Trainer(None, opts, stdout=io.StringIO())
    # Released at close: the directory now holds a run, which a fresh run must not overwrite.
    with pytest.raises(RunDirError, match="already holds another run"):
        Trainer(None, opts, stdout=io.StringIO())


def test_stale_temporary_files_of_killed_saves_are_removed(capsys, tmp_path, text_path):
    ckpt = _stopped_run(tmp_path, text_path)
    stale = tmp_path / "r" / ".ckpt.npz.0123abcd.tmp"
    stale.write_bytes(b"\0" * 4096)
    keep = tmp_path / "r" / "notes.tmp"
    keep.write_text("mine")
    assert cli.main(["8", "--resume", str(ckpt), "--threads", "1", "--eval-iters", "1",
                     "--no-sample"]) == 0
    assert "stale temporary file" in capsys.readouterr().out
    assert not stale.exists() and keep.read_text() == "mine"


# --- configurations too large for memory -----------------------------------------------------

@pytest.mark.parametrize("flags, part", [
    (["--block-size", "80000", "--n-embd", "4", "--n-head", "1", "--n-layer", "1",
      "--batch-size", "1"], "attention"),      # attention's scratch grows with T^2
    (["--batch-size", "100000"], "activations"),
])
def test_a_configuration_too_large_for_memory_is_refused_with_the_figure(capsys, tmp_path,
                                                                         flags, part):
    data = tmp_path / "big.txt"
    data.write_text(word_text(200000))  # a validation split longer than the 80000-character window
    line = one_line(capsys, cli.main(["3", *flags, "--threads", "1", "--data", str(data),
                                      "--out", "r"]))
    assert "GiB of memory is available" in line and part in line
    assert not (tmp_path / "r").exists()


def test_the_memory_estimate_is_what_the_model_allocates():
    from randygpt.config import Config
    from randygpt.model import GPT, ActivationArena
    for cfg, B, T in ((Config(vocab_size=13, n_embd=16, n_head=2, n_layer=2, block_size=8), 3, 8),
                      (Config(vocab_size=13, n_embd=24, n_head=3, n_layer=1, block_size=16,
                              norm="layernorm"), 2, 11)):
        est = GPT.training_memory(cfg, B, T, 2)
        assert est["activations"] == ActivationArena(cfg, B, T).nbytes
        assert est["parameters"] == 16 * GPT(cfg, n_threads=1).num_params


def test_a_tiny_temperature_samples_greedily(capsys, tmp_path, text_path):
    assert cli.main(["3", *TINY_FLAGS, "--data", str(text_path), "--out", "r"]) == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "r" / "ckpt.npz")
    outs = []
    for t in ("1e-320", "1e-7", "0"):
        assert cli.main(["sample", "--checkpoint", ckpt, "--prompt", "the",
                         "--max-new-tokens", "20", "--temperature", t, "--seed", "1"]) == 0
        captured = capsys.readouterr()
        assert captured.err == "", captured.err       # no NumPy warnings
        outs.append(captured.out)
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == len("the") + 21
