"""Command-line parsing, subcommand dispatch and bad input: every mistake ends with exactly one
line `randygpt: error: ...` on stderr and exit code 2, never a traceback."""
import os
import subprocess
import sys
import types

import pytest

from randygpt import cli
from randygpt.cli import train as train_cli



pytestmark = pytest.mark.usefixtures("run_sandbox")


def _one_error_line(capsys, code):
    captured = capsys.readouterr()
    assert code == 2, f"exit code {code}, stderr: {captured.err!r}"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {captured.err!r}"
    assert lines[0].startswith("randygpt: error: ")
    assert "Traceback" not in captured.err
    return lines[0]


def test_parse_defaults_and_overrides():
    overrides, opts = train_cli.parse_train_args(["5000"])
    assert overrides == {}
    assert opts["iters"] == 5000 and opts["eval_every"] == 250 and opts["log_every"] == 10
    assert opts["save_every"] == 1000 and opts["sample"] is True and opts["plot"] is False
    assert opts["resume"] is None and opts["out_dir"] is None and opts["n_threads"] is None
    overrides, opts = train_cli.parse_train_args(
        ["300", "--lr", "2e-3", "--batch-size", "4", "--block-size", "8", "--n-layer", "1",
         "--n-embd", "16", "--n-head", "2", "--dropout", "0", "--norm", "layernorm", "--seed", "7",
         "--threads", "2", "--data", "x.txt", "--eval-every", "0", "--log-every", "5",
         "--eval-iters", "3", "--save-every", "0", "--resume", "c.npz", "--out", "o",
         "--plot", "--no-sample", "--weight-decay", "0.1", "--grad-clip", "0.5"])
    assert overrides == {"lr": 2e-3, "batch_size": 4, "block_size": 8, "n_layer": 1, "n_embd": 16,
                         "n_head": 2, "dropout": 0.0, "norm": "layernorm", "seed": 7,
                         "weight_decay": 0.1, "grad_clip": 0.5}
    assert opts["n_threads"] == 2 and opts["data_path"] == "x.txt" and opts["eval_every"] == 0
    assert opts["log_every"] == 5 and opts["eval_iters"] == 3 and opts["save_every"] == 0
    assert opts["resume"] == "c.npz" and opts["out_dir"] == "o" and opts["plot"] is True
    assert opts["sample"] is False


def test_every_config_field_has_a_flag():
    from randygpt.config import Config
    fields = set(Config().to_dict()) - {"vocab_size"}  # vocab comes from the data
    assert fields == {f for f, *_ in train_cli.CONFIG_FLAGS}


def test_help_lists_flags_and_subcommands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for word in ("ITERS", "--lr", "--batch-size", "--block-size", "--n-layer", "--n-embd",
                 "--n-head", "--dropout", "--norm", "--seed", "--threads", "--data",
                 "--eval-every", "--log-every", "--eval-iters", "--save-every", "--resume",
                 "--out", "--plot", "--no-sample", "sample", "eval", "plot"):
        assert word in out, word
    assert "randygpt sample" in out and "randygpt eval" in out and "randygpt plot" in out


def test_no_arguments_shows_the_usage_and_the_commands(capsys):
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: randygpt ITERS" in captured.err
    for name in cli.SUBCOMMANDS:
        assert f"randygpt {name} ..." in captured.err


def test_version(capsys):
    import randygpt
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"randygpt {randygpt.__version__}"


@pytest.mark.parametrize("argv, needle", [
    (["abc"], "ITERS must be a positive integer"),
    (["0"], "ITERS must be a positive integer"),
    (["-5"], "ITERS must be a positive integer"),
    (["2.5"], "ITERS must be a positive integer"),
    (["10", "--bogus"], "unrecognized arguments: --bogus"),
    (["10", "20"], "unrecognized arguments"),
    (["10", "--lr", "fast"], "--lr must be a number"),
    (["10", "--batch-size", "x"], "--batch-size must be an integer"),
    (["10", "--norm", "batchnorm"], "invalid choice"),
    (["10", "--threads", "0"], "--threads must not be 0"),
    (["10", "--log-every", "0"], "--log-every must be a positive integer"),
    (["10", "--save-every", "-1"], "--save-every must be a non-negative integer"),
])
def test_bad_arguments(capsys, argv, needle):
    line = _one_error_line(capsys, cli.main(argv))
    assert needle in line


@pytest.mark.parametrize("argv, needle", [
    (["10", "--n-embd", "30", "--n-head", "4"], "n_embd (30) must be divisible by n_head (4)"),
    (["10", "--lr", "-1"], "lr"),
    (["10", "--dropout", "1.0"], "dropout"),
    (["10", "--batch-size", "0"], "batch_size"),
])
def test_inconsistent_config(capsys, argv, needle):
    line = _one_error_line(capsys, cli.main(argv))
    assert "invalid configuration" in line and needle in line


def test_bad_data_files(capsys, tmp_path):
    assert "does not exist" in _one_error_line(capsys, cli.main(["10", "--data", "missing.txt"]))
    (tmp_path / "empty.txt").write_bytes(b"")
    assert "empty" in _one_error_line(capsys, cli.main(["10", "--data", "empty.txt"]))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    assert "not UTF-8" in _one_error_line(capsys, cli.main(["10", "--data", "latin1.txt"]))
    assert "directory" in _one_error_line(capsys, cli.main(["10", "--data", str(tmp_path)]))
    # 100 characters: the validation split (10) is shorter than one window of 9.
    (tmp_path / "short.txt").write_text("abcdefghij" * 10)
    line = _one_error_line(capsys, cli.main(["10", "--data", "short.txt", "--block-size", "16"]))
    assert "too short" in line and "--block-size" in line
    # A bad ./train.txt is reported, not silently replaced by another text.
    (tmp_path / "train.txt").write_bytes(b"\xff\xfe")
    assert "train.txt" in _one_error_line(capsys, cli.main(["10"]))


def test_missing_resume_checkpoint(capsys):
    line = _one_error_line(capsys, cli.main(["10", "--resume", "nope.npz"]))
    assert "nope.npz" in line and "does not exist" in line


def test_subcommands_dispatch(monkeypatch, capsys):
    seen = {}

    def fake_main(argv):
        seen["argv"] = argv
        return 3

    for name, (module, _) in cli.SUBCOMMANDS.items():
        monkeypatch.setitem(sys.modules, module, types.SimpleNamespace(main=fake_main))
        assert cli.main([name, "a", "--b"]) == 3
        assert seen.pop("argv") == ["a", "--b"]


def _run_module(args, cwd, env_extra=None):
    env = dict(os.environ, RANDYGPT_CACHE_DIR=str(cwd / "cache"))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "randygpt", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [["many"], ["10", "--data", "missing.txt"], ["10", "--unknown"]])
def test_module_entry_point_errors(tmp_path, args):
    p = _run_module(args, tmp_path)
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("randygpt: error: "), p.stderr
    assert p.stdout == ""
