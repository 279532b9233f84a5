"""Compare the loss curves of two or more runs side by side (e.g. randygpt against its PyTorch twin
from benchmarks/torch_train.py at the same seed and learning rate).

Usage:
    python benchmarks/compare_runs.py RUN_DIR RUN_DIR [...] [--labels a,b,...] [--png PATH] [--json]

    RUN_DIR       a run's output directory (or its metrics.csv)
    --labels      names for the runs in the table and the legend (default: the directory names)
    --png PATH    also draw every run's train and validation loss into one PNG (needs matplotlib)
    --json        print one JSON document instead of the table

The table lists the validation loss at every iteration where all runs evaluated, then each run's
final and best validation loss and, for two or more runs, each run's difference to the first.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

from randygpt.fileio import atomic_write
from randygpt.metrics import MetricsError, read_metrics
from randygpt.plot import PlotError, import_matplotlib


def _metrics_path(run):
    path = Path(run)
    return path / "metrics.csv" if path.is_dir() else path


def load_runs(runs):
    """{column: array} for each run, in order; MetricsError names a run that cannot be read."""
    return [read_metrics(_metrics_path(run)) for run in runs]


def _val_points(metrics):
    """{iteration: validation loss} over the rows that have an evaluation."""
    has = np.isfinite(metrics["val_loss"])
    return {int(i): float(v) for i, v in zip(metrics["iter"][has], metrics["val_loss"][has])}


def compare(metrics_list, labels):
    """The comparison as a plain dict: shared evaluation points and each run's summary."""
    points = [_val_points(m) for m in metrics_list]
    shared = sorted(set.intersection(*(set(p) for p in points))) if points else []
    runs = []
    for label, m, p in zip(labels, metrics_list, points):
        if not p:
            raise PlotError(f"run {label!r} has no validation loss yet")
        last_iter = max(p)
        best_iter = min(p, key=lambda i: (p[i], i))
        runs.append({"label": label, "last_iter": last_iter, "final_val": p[last_iter],
                     "best_val": p[best_iter], "best_iter": best_iter})
    for r in runs[1:]:
        r["final_minus_first"] = r["final_val"] - runs[0]["final_val"]
        r["best_minus_first"] = r["best_val"] - runs[0]["best_val"]
    return {"iters": shared, "val_loss": {label: [p[i] for i in shared]
                                          for label, p in zip(labels, points)},
            "runs": runs}


def format_table(result):
    labels = [r["label"] for r in result["runs"]]
    width = max(12, *(len(label) for label in labels))
    lines = ["validation loss at the iterations where every run evaluated:",
             f"{'iter':>6}  " + "  ".join(f"{label:>{width}}" for label in labels)]
    for k, it in enumerate(result["iters"]):
        lines.append(f"{it:>6}  " + "  ".join(f"{result['val_loss'][label][k]:>{width}.4f}"
                                              for label in labels))
    lines.append("")
    lines.append(f"{'run':<{width}}  {'last iter':>9}  {'final val':>9}  {'best val':>9}  "
                 f"{'(at iter)':>9}  {'final - first':>13}  {'best - first':>12}")
    for r in result["runs"]:
        diff = lambda key: f"{r[key]:+.4f}" if key in r else "-"  # noqa: E731
        lines.append(f"{r['label']:<{width}}  {r['last_iter']:>9}  {r['final_val']:>9.4f}  "
                     f"{r['best_val']:>9.4f}  {r['best_iter']:>9}  {diff('final_minus_first'):>13}  "
                     f"{diff('best_minus_first'):>12}")
    return "\n".join(lines)


def draw(metrics_list, labels, out):
    """Every run's train loss (thin) and validation loss (markers) in one PNG, written atomically."""
    Figure, FigureCanvasAgg = import_matplotlib()
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for k, (label, m) in enumerate(zip(labels, metrics_list)):
        color = colors[k % len(colors)]
        has_train = np.isfinite(m["train_loss"])
        ax.plot(m["iter"][has_train], m["train_loss"][has_train], color=color, lw=0.8, alpha=0.6,
                label=f"{label} train")
        has_val = np.isfinite(m["val_loss"])
        ax.plot(m["iter"][has_val], m["val_loss"][has_val], color=color, lw=1.5, marker="o",
                markersize=3, label=f"{label} val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(True, alpha=0.3)
    finite = np.concatenate([m["val_loss"][np.isfinite(m["val_loss"])] for m in metrics_list]
                            + [m["train_loss"][np.isfinite(m["train_loss"])] for m in metrics_list])
    if finite.size:
        # The first evaluations (about ln V) squash the part of the curves worth looking at.
        lo = float(finite.min())
        ax.set_ylim(lo - 0.05, min(float(finite.max()), lo + 1.5) + 0.05)
    ax.legend(loc="upper right")
    ax.set_title("loss curves: " + " vs ".join(labels))
    fig.tight_layout()
    atomic_write(Path(out), lambda f: fig.savefig(f, format="png"))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Compare the loss curves of two or more runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories or metrics.csv files")
    parser.add_argument("--labels", help="comma-separated names for the runs")
    parser.add_argument("--png", help="write both runs' curves to this PNG (needs matplotlib)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [
        Path(run).resolve().name if Path(run).is_dir() else Path(run).resolve().parent.name
        for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels names {len(labels)} runs, but {len(args.runs)} were given")
    if len(set(labels)) != len(labels):
        parser.error(f"the runs need distinct labels, got {labels} (use --labels)")
    try:
        metrics_list = load_runs(args.runs)
        result = compare(metrics_list, labels)
        if args.png:
            draw(metrics_list, labels, args.png)
    except (MetricsError, PlotError, OSError) as e:
        print(f"compare_runs: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
        if args.png:
            print(f"\nwrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
