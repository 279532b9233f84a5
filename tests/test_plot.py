"""The loss plot: metrics.csv parsing, what the figure draws, the PNG written in place, and the
one-line errors (including matplotlib missing)."""
import os
import re
import sys

import numpy as np
import pytest

from randygpt import cli, plot
from randygpt.metrics import MetricsError, read_metrics
from randygpt.plot import PlotError, plot_run

HEADER = "iter,train_loss,val_loss,lr,tok_per_s,elapsed_s\n"
ROWS = ("0,4.20,4.21,1e-4,0,0.0\n"
        "10,3.50,,5.5e-4,900,1.1\n"
        "20,3.00,3.10,1e-3,950,2.2\n"
        "30,2.70,,1e-3,990,3.3\n"
        "40,2.50,2.60,1e-4,1000,4.4\n")


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run-1"
    d.mkdir()
    (d / "metrics.csv").write_text(HEADER + ROWS)
    return d


def test_read_metrics_blank_val_is_nan(run_dir):
    m = read_metrics(run_dir / "metrics.csv")
    assert list(m["iter"]) == [0, 10, 20, 30, 40]
    assert np.array_equal(np.isnan(m["val_loss"]), [False, True, False, True, False])
    assert m["lr"][1] == 5.5e-4 and m["tok_per_s"][4] == 1000


@pytest.mark.parametrize("content, match", [
    ("", "is empty"),
    (HEADER, "has no rows yet"),
    ("iter,loss\n1,2\n", "lacks the column"),
    (HEADER + "0,4.2,,1e-3,1,1\n10,abc,,1e-3,1,1\n", "line 3: train_loss is not a number: 'abc'"),
    (HEADER + "0,4.2,,1e-3\n", "line 2: 4 fields, expected 6"),
])
def test_read_metrics_errors(tmp_path, content, match):
    path = tmp_path / "metrics.csv"
    path.write_text(content)
    with pytest.raises(MetricsError, match=match):
        read_metrics(path)


def test_read_metrics_missing_file(tmp_path):
    with pytest.raises(MetricsError, match="does not exist"):
        read_metrics(tmp_path / "metrics.csv")


def test_figure_draws_train_val_and_lr(run_dir):
    pytest.importorskip("matplotlib")
    fig = plot.make_figure(read_metrics(run_dir / "metrics.csv"), "run-1")
    ax, ax_lr = fig.axes
    train, val = ax.get_lines()
    assert np.array_equal(train.get_xdata(), [0, 10, 20, 30, 40])
    # Val only where there was an evaluation: the blank cells are skipped, not drawn as gaps.
    assert np.array_equal(val.get_xdata(), [0, 20, 40])
    assert np.array_equal(val.get_ydata(), [4.21, 3.10, 2.60])
    (lr,) = ax_lr.get_lines()
    assert np.array_equal(lr.get_ydata(), [1e-4, 5.5e-4, 1e-3, 1e-3, 1e-4])
    assert ax.get_xlabel() == "iteration" and ax_lr.get_ylabel() == "learning rate"
    assert "best val 2.6000 at iter 40" in ax.get_title()


def test_plot_run_writes_png_headless(run_dir):
    pytest.importorskip("matplotlib")
    had_pyplot = "matplotlib.pyplot" in sys.modules
    out = plot_run(run_dir)
    assert out == run_dir / "loss.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert sorted(os.listdir(run_dir)) == ["loss.png", "metrics.csv"]  # no temp file left
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules  # no GUI backend machinery pulled in


def test_main_with_run_dir_csv_path_and_out(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["plot", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {run_dir / 'loss.png'}"
    other = tmp_path / "elsewhere.png"
    assert cli.main(["plot", str(run_dir / "metrics.csv"), "--out", str(other)]) == 0
    assert other.read_bytes()[:4] == b"\x89PNG"


def test_val_column_all_blank(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.csv").write_text(HEADER + "0,4.2,,1e-3,1,1\n10,4.0,,1e-3,1,2\n")
    fig = plot.make_figure(read_metrics(tmp_path / "metrics.csv"), "t")
    assert len(fig.axes[0].get_lines()) == 1
    assert plot_run(tmp_path).is_file()


def test_missing_matplotlib_is_one_line_and_exit_2(run_dir, monkeypatch, capsys):
    # None in sys.modules makes `import matplotlib` raise ImportError, as if not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotError, match=r"pip install 'randygpt\[plot\]'"):
        plot_run(run_dir)
    assert cli.main(["plot", str(run_dir)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("randygpt: error: plotting needs matplotlib")
    assert not (run_dir / "loss.png").exists()


@pytest.mark.parametrize("argv, match", [
    (["{tmp}/absent"], "does not exist"),
    (["{tmp}/empty"], "metrics.csv' does not exist"),
    (["{tmp}/bad"], "line 2"),
    (["{tmp}/bad", "--out", "{tmp}/no/such/dir/x.png"], "directory .* does not exist"),
    ([], "the following arguments are required: RUN_DIR"),
])
def test_main_bad_input(tmp_path, capsys, argv, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.csv").write_text(HEADER + "x,1,,1,1,1\n")
    code = cli.main(["plot", *(a.format(tmp=tmp_path) for a in argv)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("randygpt: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err
