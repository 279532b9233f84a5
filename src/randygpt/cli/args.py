"""What every subcommand shares: the program name and exit codes, the one error line, one
UsageError, an argparse parser that raises it instead of printing a usage block and exiting,
the typed argument helpers with bounds, and the one --threads flag with its one help text."""
import argparse
import math
import sys

__all__ = ["PROG", "EXIT_USAGE", "EXIT_FAILURE", "EXIT_SIGINT", "EXIT_SIGTERM", "report_error",
           "UsageError", "ArgumentParser", "int_arg", "float_arg", "threads_arg",
           "add_threads_flag", "THREADS_HELP"]

PROG = "randygpt"
EXIT_FAILURE = 1    # the input was fine but the work failed (a full disk, a diverged run)
EXIT_USAGE = 2      # bad input: arguments, data, checkpoints, environment
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

THREADS_HELP = ("kernel threads (default: RANDYGPT_NUM_THREADS, OMP_NUM_THREADS, or one per "
                "physical core; negative counts back from all logical CPUs). Results do not "
                "depend on it.")


def report_error(message, code=EXIT_USAGE):
    """Print ``randygpt: error: MESSAGE`` as one line on stderr (whatever the message held:
    paths or reasons with newlines) and return the exit code."""
    # One write of the whole line: under an MPI launcher, which forwards every rank's stderr,
    # print's separate write of the newline let two ranks' lines run into one.
    sys.stderr.write(f"{PROG}: error: {' '.join(str(message).split())}\n")
    sys.stderr.flush()
    return code


class UsageError(Exception):
    """Bad command-line input; main() prints it as one line and exits 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing the usage block and exiting, so every
    command reports bad input as the single line "randygpt: error: ..."."""

    def error(self, message):
        raise UsageError(message)


def int_arg(name, lo=None, hi=None):
    """An argparse type: an integer in [lo, hi] (None: unbounded on that side), with a message
    naming the flag. Bounds phrase the rule as users read it ("a positive integer")."""
    if lo == 1 and hi is None:
        rule = "a positive integer"
    elif lo == 0 and hi is None:
        rule = "a non-negative integer"
    elif lo is None and hi is None:
        rule = "an integer"
    else:
        rule = f"an integer in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {rule}, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{name} must be {rule}, got {text!r}")
        return value
    parse.__name__ = name
    return parse


def float_arg(name, finite=True):
    """An argparse type: a (finite) number, with a message naming the flag; range checks that
    depend on other values belong to the library, which names the rule."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if finite and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {text!r}")
        return value
    parse.__name__ = name
    return parse


def threads_arg(text):
    """--threads: a non-zero integer (negative counts back from the logical CPUs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads must be an integer, got {text!r}") from None
    if value == 0:
        raise argparse.ArgumentTypeError("--threads must not be 0 (negative counts back from all CPUs)")
    return value


threads_arg.__name__ = "--threads"


def add_threads_flag(parser, help_text=THREADS_HELP):
    parser.add_argument("--threads", type=threads_arg, default=None, metavar="N", help=help_text)
