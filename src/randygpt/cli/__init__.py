"""The command line, in one place: `randygpt ITERS [flags]` trains; `randygpt sample|eval|plot`
run the commands of the modules beside this one. Every parser, usage error, error line and exit
code lives in this package; the library modules it calls neither parse arguments nor exit.

Bad input ends with one line on stderr, ``randygpt: error: ...``, and exit code 2; a failure of
the work itself (a full disk, a diverged run) exits 1; Ctrl-C or SIGTERM during training ends
with a short summary and exit code 130 (143 for SIGTERM). Anything unexpected is reported as one
line asking for a bug report, with the traceback only under RANDYGPT_DEBUG=1.
"""
import contextlib
import importlib
import os
import sys
import traceback

from .. import __version__
from .args import EXIT_FAILURE, EXIT_SIGINT, EXIT_USAGE, PROG, UsageError, report_error

__all__ = ["main", "SUBCOMMANDS", "UsageError"]

# name -> (module, what it does). Each module has main(argv) -> exit code.
SUBCOMMANDS = {
    "sample": ("randygpt.cli.sample", "generate text from a checkpoint"),
    "eval": ("randygpt.cli.evaluate", "measure a checkpoint's loss on a text"),
    "plot": ("randygpt.cli.plot", "plot a run's metrics.csv"),
    "export": ("randygpt.cli.export", "write a checkpoint's weights as .safetensors"),
    "serve": ("randygpt.cli.serve", "serve a checkpoint over HTTP, with a page"),
}
_TRAIN = "randygpt.cli.train"


def _usage():
    lines = [f"usage: {PROG} ITERS [flags]      train (see {PROG} --help)"]
    lines += [f"       {PROG} {name} ...{' ' * (8 - len(name))}{what}"
              for name, (_, what) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def _expected_errors():
    """The library's error classes, each carrying a one-line message for the user: those for bad
    input (exit 2) and those for work that failed (exit 1). Looked up when needed, so that a
    failure to import the kernels is itself reported."""
    from ..checkpoint import CheckpointError
    from ..data import DataError
    from ..distributed import DistributedError
    from ..evaluate import EvalError
    from ..interop import WeightsFileError
    from ..plot import PlotError
    from ..rundir import RunDirError
    from ..train import RunFailed, TrainError
    bad_input = [UsageError, TrainError, DataError, CheckpointError, EvalError, PlotError,
                 RunDirError, DistributedError, WeightsFileError]
    with contextlib.suppress(ImportError):  # the server needs the optional [serve] extra
        from ..serve import ServeError
        bad_input.append(ServeError)
    return tuple(bad_input), (RunFailed,)


def _run(argv):
    if not argv:
        print(_usage(), file=sys.stderr, flush=True)
        return EXIT_USAGE
    if argv[0] in SUBCOMMANDS:
        # Only the chosen command's module (and what it needs) is imported.
        return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
    train = importlib.import_module(_TRAIN)
    parser = train.build_parser({name: what for name, (_, what) in SUBCOMMANDS.items()},
                                version=__version__)
    return train.main(argv, parser)


def main(argv=None):
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _run(argv)
        return 0 if code is None else int(code)
    except SystemExit as e:  # --help / --version from argparse
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    except BrokenPipeError:
        # `randygpt ... | head`: the reader went away; nothing useful left to report.
        return 0
    except Exception as e:  # the guard: no traceback reaches a user
        return _report_unexpected(e)


def _report_unexpected(e):
    try:
        bad_input, failed = _expected_errors()
    except Exception:  # the package itself does not import (a broken build, a bad environment)
        bad_input, failed = (UsageError,), ()
    if isinstance(e, bad_input):
        return report_error(e)
    if isinstance(e, failed):
        return report_error(e, code=EXIT_FAILURE)
    if isinstance(e, ValueError) and _from_environment(e):
        return report_error(e)
    if isinstance(e, MemoryError):
        return report_error(f"out of memory{': ' + str(e) if str(e) else ''}; choose a smaller "
                            "model or batch", code=EXIT_FAILURE)
    if isinstance(e, OSError):
        return report_error(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}",
                            code=EXIT_FAILURE)
    if os.environ.get("RANDYGPT_DEBUG") == "1":
        traceback.print_exc()
    return report_error(f"unexpected {type(e).__name__}: {e} (this is a bug in randygpt; please "
                        "report it with the command line, or rerun with RANDYGPT_DEBUG=1 for the "
                        "traceback)", code=EXIT_FAILURE)


def _from_environment(e):
    """A ValueError raised for a bad environment variable (RANDYGPT_NUM_THREADS, OMP_NUM_THREADS,
    RANDYGPT_ISA, RANDYGPT_BF16_ISA): its message names the variable, and it is the user's input like a flag."""
    text = str(e)
    return any(name in text for name in ("RANDYGPT_", "OMP_NUM_THREADS"))
