"""The training loop on tiny configs: the log format and run directory, learning, thread-count
reproducibility, exact resume (scheduled stop and Ctrl-C/SIGTERM), and the data fallbacks."""
import csv
import io
import json
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_bitwise_equal, interrupt_when
from randygpt import checkpoint, cli, runlog, train
from randygpt.metrics import METRICS_HEADER
from randygpt.rundir import RunDirError
from randygpt.train import RunOptions, TrainError

NO_NETWORK_URL = "http://randygpt-test.invalid/input.txt"
TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 8, "batch_size": 4}
TINY_FLAGS = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "8",
              "--batch-size", "4"]
# Val and Best appear only on the lines of an evaluation.
LOG_LINE = re.compile(r"^Iter \d+/\d+ \| Loss \d+\.\d{3}( \| Val \d+\.\d{3} \(\d+\.\d{3} bpc\))? \| LR \d\.\de[-+]\d\d"
                      r"( \| Best \d+\.\d{3})? \| [\d,]+ tok/s \| ETA (\d+s|\d+m\d\ds|\d+h\d\dm)$")


pytestmark = pytest.mark.usefixtures("run_sandbox")


def _run(out_dir, iters, text_path, stdout=None, **kw):
    overrides = dict(TINY, **kw.pop("overrides", {}))
    # One thread unless a test asks: on a busy machine a 2-thread team on a tiny model spends
    # its time waiting at barriers.
    kw.setdefault("n_threads", 1)
    opts = RunOptions(iters=iters, data_path=str(text_path), out_dir=str(out_dir), eval_iters=2,
                      sample=False, overrides=overrides, **kw)
    return train.run(None, opts, stdout=stdout or io.StringIO(), stderr=io.StringIO())


def _params(ckpt_path):
    return checkpoint.load(ckpt_path).params


def test_end_to_end_cli_run_writes_log_metrics_and_checkpoint(tmp_path, text_path, capsys):
    code = cli.main(["25", *TINY_FLAGS, "--threads", "1", "--data", str(text_path), "--out", "run", "--eval-every",
                     "10", "--log-every", "5", "--eval-iters", "2", "--sample-tokens", "12"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Parameters: " in out and "openmp=" in out and "threads=" in out
    assert "text.txt" in out  # the data source
    assert re.search(r"Initial loss estimate: train \d\.\d{4} \| val \d\.\d{4}", out)
    assert re.search(r"Final loss estimate: train \d\.\d{4} \| val \d\.\d{4}", out)
    logs = [line for line in out.splitlines() if line.startswith("Iter ")]
    assert [line.split("/")[0] for line in logs] == [f"Iter {i}" for i in (5, 10, 15, 20, 25)]
    for line in logs:
        assert LOG_LINE.match(line), line
    # A validation loss is shown only where it was measured (every 10, and the last line).
    assert ["| Val " in line for line in logs] == [False, True, False, True, True]
    # Samples: the prompt in the vocabulary is continued, the others are skipped with a note.
    assert "--- 'ROMEO:' (temperature 0.8, top-p 0.9)\nROMEO:" in out
    assert "--- 'To be or not to be': skipped, the vocabulary lacks" in out

    run = tmp_path / "run"
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == METRICS_HEADER
    assert [int(r[0]) for r in rows[1:]] == [0, 5, 10, 15, 20, 25]
    # The validation loss appears where it was measured: at the start, every 10, and the end.
    assert [r[2] != "" for r in rows[1:]] == [True, False, True, False, True, True]
    assert rows[1][4] == ""  # no throughput before the first step
    for r in rows[2:]:
        assert float(r[1]) > 0 and float(r[3]) > 0 and float(r[4]) > 0
    assert float(rows[1][2]) == pytest.approx(float(re.search(r"Initial.*val (\d\.\d{4})", out)[1]),
                                              abs=1e-4)
    assert float(rows[-1][2]) == pytest.approx(float(re.search(r"Final.*val (\d\.\d{4})", out)[1]),
                                               abs=1e-4)
    elapsed = [float(r[5]) for r in rows[1:]]
    assert elapsed == sorted(elapsed)
    info = json.loads((run / "config.json").read_text())
    assert info["config"]["n_embd"] == 16 and info["iters"] == 25
    ck = checkpoint.load(run / "ckpt.npz")
    assert ck.step == 25 and ck.adam_t == 25 and ck.config.n_embd == 16
    assert ck.tokenizer.vocab_size == ck.config.vocab_size
    assert ck.rng_state is not None and ck.extra["iters"] == 25


def test_run_feeds_the_plot_eval_and_sample_commands(tmp_path, text_path, capsys):
    code = cli.main(["6", *TINY_FLAGS, "--threads", "1", "--data", str(text_path), "--out", "run",
                     "--eval-iters", "1", "--no-sample", "--plot"])
    out = capsys.readouterr().out
    assert code == 0
    try:
        import matplotlib  # noqa: F401
        has_matplotlib = True
    except ImportError:
        has_matplotlib = False
    if has_matplotlib:
        assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    else:
        assert "no plot written" in out
    ckpt = str(tmp_path / "run" / "ckpt.npz")
    # eval finds the training text through the checkpoint's record of it.
    assert cli.main(["eval", "--checkpoint", ckpt, "--threads", "1"]) == 0
    assert cli.main(["sample", "--checkpoint", ckpt, "--prompt", "the", "--max-new-tokens", "5",
                     "--seed", "1"]) == 0
    assert cli.main(["plot", str(tmp_path / "run")]) == (0 if has_matplotlib else 2)
    capsys.readouterr()


def test_stop_at_prints_how_to_continue(tmp_path, text_path, capsys):
    argv = ["9", *TINY_FLAGS, "--threads", "1", "--data", str(text_path), "--out", "run",
            "--eval-iters", "1", "--stop-at", "4"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    # Every run option that differs from its default comes back, so the resumed run behaves
    # as the interrupted one would have.
    assert (f"Continue with: randygpt 9 --resume {Path('run') / 'ckpt.npz'} --eval-iters 1 "
            f"--threads 1 --data {text_path}\n") in out
    assert checkpoint.load(tmp_path / "run" / "ckpt.npz").step == 4
    assert cli.main(["9", "--threads", "1", "--resume", "run/ckpt.npz", "--data", str(text_path),
                     "--eval-iters", "1", "--no-sample"]) == 0
    assert "Continue with" not in capsys.readouterr().out
    assert checkpoint.load(tmp_path / "run" / "ckpt.npz").step == 9


def test_fresh_run_refuses_to_overwrite_a_run(tmp_path, text_path):
    _run(tmp_path / "r", 3, text_path, eval_every=0)
    before = (tmp_path / "r" / "ckpt.npz").read_bytes()
    with pytest.raises(RunDirError, match="already holds another run.*--resume"):
        _run(tmp_path / "r", 3, text_path, eval_every=0)
    assert (tmp_path / "r" / "ckpt.npz").read_bytes() == before


def test_loss_decreases_on_repetitive_text(tmp_path):
    p = tmp_path / "rep.txt"
    p.write_text("hello world, hello moon. " * 80)
    res = _run(tmp_path / "r", 120, p, eval_every=0,
               overrides={"lr": 1e-2, "warmup_iters": 10, "dropout": 0.0})
    assert res.final_estimate["val"] < 0.5 * res.first_estimate["val"], (res.first_estimate,
                                                                         res.final_estimate)
    assert np.mean(res.losses[-10:]) < 0.5 * np.mean(res.losses[:10])


def test_same_seed_same_run_for_any_thread_count(tmp_path, text_path):
    a = _run(tmp_path / "t1", 20, text_path, n_threads=1, eval_every=0)
    b = _run(tmp_path / "t2", 20, text_path, n_threads=2, eval_every=0)
    assert a.losses == b.losses
    assert_bitwise_equal(_params(a.checkpoint), _params(b.checkpoint), name="params 1 vs 2 threads")
    c = _run(tmp_path / "s", 20, text_path, n_threads=1, eval_every=0, overrides={"seed": 5})
    assert c.losses != a.losses


def test_evaluation_does_not_perturb_training(tmp_path, text_path):
    a = _run(tmp_path / "a", 20, text_path, eval_every=0)
    b = _run(tmp_path / "b", 20, text_path, eval_every=3)
    assert a.losses == b.losses


def test_resume_after_stop_is_exact(tmp_path, text_path):
    full = _run(tmp_path / "full", 30, text_path, eval_every=7, save_every=0)
    part = _run(tmp_path / "part", 30, text_path, eval_every=7, save_every=0, stop_at=12)
    assert part.step == 12 and len(part.losses) == 12 and part.interrupted is None
    assert checkpoint.load(part.checkpoint).step == 12
    rest = train.run(None, RunOptions(iters=30, data_path=str(text_path), resume=str(part.checkpoint),
                                      n_threads=1, eval_iters=2, eval_every=7, save_every=0, sample=False),
                     stdout=io.StringIO())
    assert rest.out_dir.resolve() == (tmp_path / "part").resolve()
    assert rest.step == 30
    assert part.losses + rest.losses == full.losses
    assert_bitwise_equal(_params(rest.checkpoint), _params(full.checkpoint), name="resumed params")
    full_ck, rest_ck = checkpoint.load(full.checkpoint), checkpoint.load(rest.checkpoint)
    assert_bitwise_equal(rest_ck.adam_m, full_ck.adam_m, name="adam_m")
    assert_bitwise_equal(rest_ck.adam_v, full_ck.adam_v, name="adam_v")
    assert rest_ck.rng_state == full_ck.rng_state
    # The resumed run's metrics continue the first part's, in order, without duplicates.
    with open(tmp_path / "part" / "metrics.csv", newline="") as f:
        iters = [int(r[0]) for r in list(csv.reader(f))[1:]]
    assert iters == sorted(set(iters)) and iters[-1] == 30


def test_resume_rejects_changed_settings_and_finished_runs(tmp_path, text_path):
    part = _run(tmp_path / "p", 10, text_path, eval_every=0, stop_at=4)
    with pytest.raises(TrainError, match="n_embd=32"):
        train.run(None, RunOptions(iters=10, data_path=str(text_path), resume=str(part.checkpoint),
                                   overrides={"n_embd": 32}), stdout=io.StringIO())
    with pytest.raises(TrainError, match="already at iteration 4"):
        train.run(None, RunOptions(iters=4, data_path=str(text_path), resume=str(part.checkpoint)),
                  stdout=io.StringIO())
    # Unchanged values are fine to repeat.
    train.run(None, RunOptions(iters=6, data_path=str(text_path), resume=str(part.checkpoint),
                               overrides={"n_embd": 16}, eval_iters=1, sample=False,
                               n_threads=1),
              stdout=io.StringIO())
    # Text with characters the checkpoint's vocabulary lacks is refused with a clear message.
    other = tmp_path / "other.txt"
    other.write_text("XYZ!" * 300)
    with pytest.raises(ValueError, match="does not know"):
        train.run(None, RunOptions(iters=10, data_path=str(other), resume=str(part.checkpoint)),
                  stdout=io.StringIO())


@pytest.mark.parametrize("signum, name", [(signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")])
def test_signal_saves_a_consistent_checkpoint_and_resumes_exactly(tmp_path, text_path, monkeypatch,
                                                                  signum, name):
    full = _run(tmp_path / "full", 20, text_path, eval_every=0, save_every=0)
    real_lr_at = train.lr_at

    def lr_at_with_signal(it, total, config):
        # The signal lands inside iteration 7, after its batch is drawn: the loop must finish
        # the iteration and stop before the next one.
        if it == 7:
            signal.raise_signal(signum)
        return real_lr_at(it, total, config)

    monkeypatch.setattr(train, "lr_at", lr_at_with_signal)
    out = io.StringIO()
    cut = _run(tmp_path / "cut", 20, text_path, eval_every=0, save_every=0, stdout=out)
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    assert cut.interrupted == name and cut.step == 8 and cut.final_estimate is None
    assert checkpoint.load(cut.checkpoint).step == 8
    assert "Final loss" not in out.getvalue()
    rest = train.run(None, RunOptions(iters=20, data_path=str(text_path), resume=str(cut.checkpoint),
                                      n_threads=1, eval_iters=2, eval_every=0, save_every=0, sample=False),
                     stdout=io.StringIO())
    assert cut.losses + rest.losses == full.losses
    assert_bitwise_equal(_params(rest.checkpoint), _params(full.checkpoint), name="params")
    # The handlers are put back once the run ends.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_periodic_checkpoints(tmp_path, text_path, monkeypatch):
    saved = []
    real_save = checkpoint.save

    def spy(path, **kw):
        saved.append(kw["step"])
        real_save(path, **kw)

    monkeypatch.setattr(checkpoint, "save", spy)
    _run(tmp_path / "p", 25, text_path, eval_every=0, save_every=10)
    assert saved == [10, 20, 25]


def test_divergence_stops_before_the_update(tmp_path, text_path, capsys):
    res = _run(tmp_path / "d", 10, text_path, eval_every=0, save_every=0,
               overrides={"lr": 1e30, "warmup_iters": 0})
    assert res.diverged is not None and res.step == res.diverged - 1
    assert len(res.losses) == res.step and res.checkpoint is None
    code = cli.main(["10", *TINY_FLAGS, "--data", str(text_path), "--lr", "1e30",
                     "--warmup-iters", "0", "--out", "d2", "--eval-iters", "1", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "non-finite" in err and "Traceback" not in err


def test_progress_line_redrawn_on_a_terminal(tmp_path, text_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    _run(tmp_path / "tty", 12, text_path, stdout=out, eval_every=6, log_every=2)
    text = out.getvalue()
    assert "\rIter 2/12 |" in text and "\rIter 4/12 |" in text
    # Lines at an evaluation are kept; the ones between are overwritten.
    kept = [line for line in text.split("\n") if "Iter " in line]
    assert [seg.rsplit("\r", 1)[-1].split(" |")[0] for seg in kept] == ["Iter 6/12", "Iter 12/12"]


def test_builtin_fallback_warns(tmp_path):
    err = io.StringIO()
    opts = RunOptions(iters=2, out_dir=str(tmp_path / "b"), eval_iters=1, sample=False, n_threads=1,
                      data_url=NO_NETWORK_URL, overrides=dict(TINY))
    out = io.StringIO()
    train.run(None, opts, stdout=out, stderr=err)
    assert "randygpt: warning:" in err.getvalue() and "--data" in err.getvalue()
    assert "built-in sample" in out.getvalue()


def test_ctrl_c_in_subprocess_exits_130_with_summary(tmp_path, text_path):
    env = dict(os.environ, RANDYGPT_CACHE_DIR=str(tmp_path / "cache"))
    proc, rest, err = interrupt_when(
        [sys.executable, "-u", "-m", "randygpt", "1000000", *TINY_FLAGS, "--data", str(text_path),
         "--out", "sig", "--eval-iters", "1", "--log-every", "1", "--threads", "1"],
        "Iter ", lambda p: p.send_signal(signal.SIGINT), cwd=tmp_path, env=env)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    m = re.search(r"Interrupted \(SIGINT\) after iteration (\d+)/1000000: .*last loss \d\.\d{4}\. "
                  r"Checkpoint: (\S+)", rest)
    assert m, rest
    assert checkpoint.load(tmp_path / m.group(2)).step == int(m.group(1))
    assert "--resume" in rest


def test_format_duration():
    assert runlog.format_duration(0) == "0s"
    assert runlog.format_duration(59.4) == "59s"
    assert runlog.format_duration(250) == "4m10s"
    assert runlog.format_duration(3725) == "1h02m"
    assert runlog.format_duration(float("inf")) == "?"
