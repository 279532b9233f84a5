"""Command line: `python -m randygpt ITERS [flags]` trains; `python -m randygpt sample|eval|plot ...`
hand their arguments to randygpt.sample / randygpt.evaluate / randygpt.plot.

Bad input ends with one line on stderr, ``randygpt: error: ...``, and exit code 2; Ctrl-C or
SIGTERM during training ends with a short summary and exit code 130 (143 for SIGTERM).
"""
import argparse
import shlex
import sys

__all__ = ["main", "build_parser", "parse_train_args", "UsageError", "SUBCOMMANDS"]

PROG = "randygpt"
SUBCOMMANDS = {
    "sample": ("randygpt.sample", "generate text from a checkpoint"),
    "eval": ("randygpt.evaluate", "measure a checkpoint's loss on a text"),
    "plot": ("randygpt.plot", "plot a run's metrics.csv"),
}
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

# Config field -> (flag, type, help). Defaults are read from Config when the help is shown, so
# they are written down in one place only.
CONFIG_FLAGS = [
    ("n_layer", "--n-layer", int, "transformer blocks"),
    ("n_embd", "--n-embd", int, "residual stream width (must be divisible by --n-head)"),
    ("n_head", "--n-head", int, "attention heads"),
    ("block_size", "--block-size", int, "context length in characters"),
    ("dropout", "--dropout", float, "dropout probability after attention and MLP (0 <= p < 1)"),
    ("norm", "--norm", str, "normalisation: rmsnorm or layernorm"),
    ("norm_eps", "--norm-eps", float, "epsilon inside the norm's square root"),
    ("batch_size", "--batch-size", int, "windows per training step"),
    ("lr", "--lr", float, "peak learning rate"),
    ("warmup_iters", "--warmup-iters", int, "linear warmup length in iterations"),
    ("warmup_start", "--warmup-start", float, "learning rate at iteration 0, as a fraction of --lr"),
    ("decay_start", "--decay-start", float, "fraction of the run after which the cosine decay starts"),
    ("min_lr_ratio", "--min-lr-ratio", float, "final learning rate as a fraction of --lr"),
    ("beta1", "--beta1", float, "AdamW first-moment decay"),
    ("beta2", "--beta2", float, "AdamW second-moment decay"),
    ("adam_eps", "--adam-eps", float, "AdamW epsilon"),
    ("weight_decay", "--weight-decay", float, "decoupled weight decay on matrices"),
    ("grad_clip", "--grad-clip", float, "clip the global gradient norm to this (0: no clipping)"),
    ("seed", "--seed", int, "seed for initialisation, batches, dropout and samples"),
]


class UsageError(Exception):
    """Raised instead of argparse's print-usage-and-exit, so main() can write one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text!r}")
        return value
    parse.__name__ = name
    return parse


def _non_negative_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a non-negative integer, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be a non-negative integer, got {text!r}")
        return value
    parse.__name__ = name
    return parse


def _typed(name, kind):
    def parse(text):
        try:
            return kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {text!r}") from None
    parse.__name__ = name
    return parse


def _thread_count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--threads must be an integer, got {text!r}") from None
    if value == 0:
        raise argparse.ArgumentTypeError("--threads must not be 0 (negative counts back from all CPUs)")
    return value


def _config_defaults():
    try:
        from .config import Config
    except ImportError:
        return {}
    return Config().to_dict()


def build_parser():
    defaults = _config_defaults()
    epilog_lines = ["other commands (each has its own --help):"]
    epilog_lines += [f"  {PROG} {name:<7} {what}" for name, (_, what) in SUBCOMMANDS.items()]
    epilog_lines += ["", "examples:", f"  {PROG} 5000", f"  {PROG} 200 --n-layer 2 --n-embd 64 --data my.txt",
                     f"  {PROG} 8000 --resume runs/20250101-120000/ckpt.npz",
                     f"  {PROG} sample --checkpoint runs/20250101-120000/ckpt.npz --prompt 'ROMEO:'"]
    p = _Parser(
        prog=PROG,
        description="Train a small character-level GPT from scratch on the CPU.\n"
                    "The text comes from --data, else ./train.txt, else Tiny Shakespeare\n"
                    "(downloaded once into the cache), else a tiny built-in sample.",
        epilog="\n".join(epilog_lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("iters", metavar="ITERS", type=_positive_int("ITERS"),
                   help="target number of training iterations (also sets the learning-rate "
                        "schedule; with --resume, the total to reach)")
    m = p.add_argument_group("model and optimisation (defaults from randygpt.config.Config)")
    for field, flag, kind, help_text in CONFIG_FLAGS:
        shown = f" (default: {defaults[field]})" if field in defaults else ""
        kw = {"choices": ["rmsnorm", "layernorm"]} if field == "norm" else {"type": _typed(flag, kind)}
        m.add_argument(flag, dest=field, default=None, metavar=flag.lstrip("-").upper().replace("-", "_"),
                       help=help_text + shown, **kw)
    r = p.add_argument_group("run")
    r.add_argument("--threads", type=_thread_count, default=None,
                   help="kernel threads (default: RANDYGPT_NUM_THREADS, OMP_NUM_THREADS, or one "
                        "per physical core; negative counts back from all logical CPUs). Results "
                        "do not depend on it.")
    r.add_argument("--data", metavar="PATH", default=None,
                   help="UTF-8 text file to train on (default: ./train.txt, else Tiny Shakespeare)")
    r.add_argument("--eval-every", type=_non_negative_int("--eval-every"), default=250, metavar="N",
                   help="estimate the validation loss every N iterations (0: only at start and "
                        "end; default: 250)")
    r.add_argument("--eval-iters", type=_positive_int("--eval-iters"), default=20, metavar="N",
                   help="batches per split in each loss estimate (default: 20)")
    r.add_argument("--log-every", type=_positive_int("--log-every"), default=10, metavar="N",
                   help="print a log line and a metrics.csv row every N iterations; the loss "
                        "shown is the mean over those N (default: 10)")
    r.add_argument("--save-every", type=_non_negative_int("--save-every"), default=1000, metavar="N",
                   help="save a checkpoint every N iterations (0: only at the end; a checkpoint is "
                        "also saved on Ctrl-C; default: 1000)")
    r.add_argument("--resume", metavar="CKPT", default=None,
                   help="continue exactly from a checkpoint (weights, optimizer, step, batch "
                        "order); ITERS is the total to reach")
    r.add_argument("--stop-at", type=_positive_int("--stop-at"), default=None, metavar="N",
                   help="stop and save after iteration N while keeping the ITERS schedule "
                        "(continue later with --resume)")
    r.add_argument("--out", metavar="DIR", default=None,
                   help="run directory for config.json, metrics.csv and ckpt.npz (default: "
                        "runs/<UTC time>, or the resumed checkpoint's directory)")
    r.add_argument("--plot", action="store_true", help="write loss.png from metrics.csv at the end")
    r.add_argument("--no-sample", dest="sample", action="store_false",
                   help="skip the samples printed after training")
    r.add_argument("--sample-tokens", type=_non_negative_int("--sample-tokens"), default=200,
                   metavar="N", help="characters to generate per sample (default: 200)")
    return p


def parse_train_args(argv):
    """argv (without the program name) -> (overrides dict for Config, RunOptions kwargs)."""
    ns = build_parser().parse_args(argv)
    overrides = {field: getattr(ns, field) for field, *_ in CONFIG_FLAGS if getattr(ns, field) is not None}
    options = dict(iters=ns.iters, data_path=ns.data, out_dir=ns.out, eval_every=ns.eval_every,
                   log_every=ns.log_every, eval_iters=ns.eval_iters, save_every=ns.save_every,
                   resume=ns.resume, n_threads=ns.threads, sample=ns.sample,
                   sample_tokens=ns.sample_tokens, plot=ns.plot, stop_at=ns.stop_at,
                   overrides=overrides)
    return overrides, options


def _check_config(overrides):
    """Validate the user's config flags before any data is read, for a fast, clear error."""
    from .config import Config
    try:
        Config(**overrides)
    except (TypeError, ValueError) as e:
        raise UsageError(f"invalid configuration: {e}") from None


def _error(message):
    # One line, whatever the message held.
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _dispatch(name, argv):
    import importlib
    module_name = SUBCOMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        return _error(f"the {name!r} command is not available in this installation")
    code = module.main(argv)
    return 0 if code is None else int(code)


def _train(argv):
    from . import train
    from .data import DataError

    try:
        overrides, kwargs = parse_train_args(argv)
        _check_config(overrides)
        options = train.RunOptions(**kwargs)
    except (UsageError, train.TrainError) as e:
        return _error(e)

    from .checkpoint import CheckpointError
    try:
        result = train.run(None, options)
    except (train.TrainError, DataError, CheckpointError) as e:
        return _error(e)
    except KeyboardInterrupt:
        return EXIT_SIGINT
    if result.diverged:
        # Not a usage mistake (exit 2) but a failed run.
        _error(f"the loss became non-finite at iteration {result.diverged}; "
               f"last checkpoint: {result.checkpoint or 'none'} (try a lower --lr)")
        return 1
    if result.interrupted:
        last = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
        print(f"\nInterrupted ({result.interrupted}) after iteration {result.step}/{result.iters}: "
              f"{len(result.losses)} iterations this session, last loss {last}. "
              f"Checkpoint: {result.checkpoint}", flush=True)
    if result.step < result.iters:
        again = [PROG, str(result.iters), "--resume", str(result.checkpoint)]
        if options.data_path is not None:
            again += ["--data", options.data_path]
        print(f"Continue with: {shlex.join(again)}", flush=True)
    if result.interrupted:
        return EXIT_SIGTERM if result.interrupted == "SIGTERM" else EXIT_SIGINT
    return 0


def main(argv=None):
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            return _dispatch(argv[0], argv[1:])
        return _train(argv)
    except SystemExit as e:  # --help / --version from argparse
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    except BrokenPipeError:
        # `randygpt ... | head`: the reader went away; nothing useful left to report.
        return 0
