"""``randygpt plot RUN_DIR``: draw a run's metrics.csv into loss.png (needs randygpt[plot])."""
from ..plot import PlotError, plot_run
from .args import ArgumentParser

__all__ = ["build_parser", "main"]


def build_parser():
    p = ArgumentParser(prog="randygpt plot",
                       description="Plot a run's loss curves (needs randygpt[plot]).")
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="run directory holding metrics.csv (or the metrics.csv file)")
    p.add_argument("--out", metavar="PNG", default=None,
                   help="image to write (default: loss.png beside metrics.csv)")
    return p


def main(argv):
    """Writes the plot; returns the exit code (bad input raises for the guard)."""
    args = build_parser().parse_args(argv)
    try:
        out = plot_run(args.run_dir, out=args.out)
    except OSError as e:
        raise PlotError(f"cannot write the plot in {args.run_dir!r}: {e.strerror or e}") from None
    print(f"wrote {out}")
    return 0
