"""The loss plot of a run: ``RUN_DIR/metrics.csv`` -> ``RUN_DIR/loss.png`` (train and validation
loss against iterations, learning rate on a second axis).

matplotlib is an optional extra (``pip install randygpt[plot]``); without it, plotting fails
with one clear line and nothing else in randygpt is affected. The figure is drawn with the Agg
canvas directly (no pyplot, no GUI backend), so it works headless and leaves matplotlib's
global state alone.
"""
from pathlib import Path

import numpy as np

from .fileio import atomic_write
from .metrics import MetricsError, read_metrics

__all__ = ["PlotError", "make_figure", "plot_run", "import_matplotlib"]

MISSING_MATPLOTLIB = "plotting needs matplotlib, which is not installed: pip install 'randygpt[plot]'"


class PlotError(ValueError):
    """The run cannot be plotted (missing or malformed metrics.csv, no matplotlib); one line."""


def import_matplotlib():
    # Import the top-level package first: it is what is missing when the extra is not installed.
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(MISSING_MATPLOTLIB) from None
    return Figure, FigureCanvasAgg


def make_figure(metrics, title):
    """The loss figure of read_metrics()'s columns (a matplotlib Figure on an Agg canvas):
    train loss on every row that has one, val loss on the rows with an evaluation, learning
    rate on a second y axis."""
    Figure, FigureCanvasAgg = import_matplotlib()

    it, train, val, lr = metrics["iter"], metrics["train_loss"], metrics["val_loss"], metrics["lr"]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    lines = []
    has_train = np.isfinite(train)
    if has_train.any():
        lines += ax.plot(it[has_train], train[has_train], color="tab:blue", lw=1.2, label="train loss")
    has_val = np.isfinite(val)
    if has_val.any():
        lines += ax.plot(it[has_val], val[has_val], color="tab:orange", lw=1.5, marker="o",
                         markersize=3, label="val loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(True, alpha=0.3)
    has_lr = np.isfinite(lr)
    if has_lr.any():
        ax_lr = ax.twinx()
        lines += ax_lr.plot(it[has_lr], lr[has_lr], color="tab:gray", lw=1.0, ls="--",
                            label="learning rate")
        ax_lr.set_ylabel("learning rate")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if lines:
        # Below the axes, outside them: inside, wherever it went it covered some curve (the
        # learning rate runs along the top until its decay at the end of the run).
        fig.legend(lines, [ln.get_label() for ln in lines], loc="lower center",
                   ncol=len(lines), frameon=False)
    if has_val.any():
        best = int(np.nanargmin(val))
        title += f"  (best val {val[best]:.4f} at iter {int(it[best])})"
    ax.set_title(title)
    # Room under the axes for the legend.
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot_run(run_dir, out=None):
    """Draw RUN_DIR/metrics.csv into RUN_DIR/loss.png (or ``out``) and return that path.

    ``run_dir`` may also be the metrics.csv file itself. The PNG is written to a temporary file
    and renamed into place, so a viewer (or a plot redrawn during training) never sees half an
    image. Raises PlotError.
    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        metrics_path, run_dir = run_dir, run_dir.parent
    elif run_dir.is_dir():
        metrics_path = run_dir / "metrics.csv"
    else:
        raise PlotError(f"run directory {str(run_dir)!r} does not exist")
    out = run_dir / "loss.png" if out is None else Path(out)
    if not out.parent.is_dir():
        raise PlotError(f"cannot write {str(out)!r}: directory {str(out.parent)!r} does not exist")
    try:
        metrics = read_metrics(metrics_path)
    except MetricsError as e:
        raise PlotError(str(e)) from None
    fig = make_figure(metrics, run_dir.resolve().name)
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    return out
