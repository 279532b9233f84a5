"""``randygpt ITERS [flags]``: train, or resume, a model (see randygpt.train.Trainer)."""
import argparse
import shlex

from .. import distributed
from ..config import NORMS, PRECISIONS, Config
from ..tokenizer import BPE_MAX_VOCAB, BPE_MIN_VOCAB, TOKENIZERS
from ..train import DEFAULT_BPE_VOCAB, RunFailed, RunOptions, Trainer, TrainError
from .args import (EXIT_FAILURE, EXIT_SIGINT, EXIT_SIGTERM, PROG, ArgumentParser, UsageError,
                   add_threads_flag, float_arg, int_arg, report_error)

__all__ = ["CONFIG_FLAGS", "RUN_FLAGS", "add_config_flags", "build_parser", "parse_train_args",
           "main", "continue_command"]

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
    ("precision", "--precision", str, "GEMM operands: fp32, or bf16 (rounded to bf16, summed in "
                                      "fp32; weights, gradients and optimizer stay fp32)"),
    ("seed", "--seed", int, "seed for initialisation, batches, dropout and samples"),
]

# The string fields' allowed values.
_CHOICES = {"norm": NORMS, "precision": PRECISIONS}

# RunOptions field -> the flag that sets it, for the flags a resumed run must be given again to
# behave as the interrupted one did (see continue_command).
RUN_FLAGS = {"eval_every": "--eval-every", "eval_iters": "--eval-iters", "log_every": "--log-every",
             "save_every": "--save-every", "n_threads": "--threads", "sample_tokens": "--sample-tokens",
             "data_path": "--data"}


def _epilog(subcommands):
    lines = ["other commands (each has its own --help):"]
    lines += [f"  {PROG} {name:<7} {what}" for name, what in subcommands.items()]
    lines += ["", "examples:", f"  {PROG} 5000", f"  {PROG} 200 --n-layer 2 --n-embd 64 --data my.txt",
              f"  {PROG} 8000 --resume runs/20250101-120000/ckpt.npz",
              f"  {PROG} sample --checkpoint runs/20250101-120000/ckpt.npz --prompt 'ROMEO:'"]
    return "\n".join(lines)


def build_parser(subcommands=None, version=None):
    """The training parser; ``subcommands`` ({name: what}) are listed in the help's epilog."""
    defaults = Config().to_dict()
    p = ArgumentParser(
        prog=PROG,
        description="Train a small character-level GPT from scratch on the CPU.\n"
                    "The text comes from --data, else ./train.txt, else Tiny Shakespeare\n"
                    "(downloaded once into the cache), else a tiny built-in sample.",
        epilog=_epilog(subcommands or {}),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if version is not None:
        p.add_argument("--version", action="version", version=f"{PROG} {version}")
    p.add_argument("iters", metavar="ITERS", type=int_arg("ITERS", lo=1),
                   help="target number of training iterations (also sets the learning-rate "
                        "schedule; with --resume, the total to reach)")
    add_config_flags(p.add_argument_group("model and optimisation (defaults from "
                                          "randygpt.config.Config)"), defaults)
    _add_run_flags(p.add_argument_group("run"))
    return p


def add_config_flags(group, defaults, fields=None):
    """Add CONFIG_FLAGS's flags (only those of ``fields``, if given) to an argparse group or
    parser, typed and checked as the training command does (an unset flag is None); each help
    ends with ``(default: defaults[field])``. Other commands that take a Config flag (eval's
    --precision, benchmarks/torch_train.py) use this, so the flag means one thing everywhere."""
    for field, flag, kind, help_text in CONFIG_FLAGS:
        if fields is not None and field not in fields:
            continue
        kw = ({"choices": list(_CHOICES[field])} if field in _CHOICES
              else {"type": int_arg(flag) if kind is int else float_arg(flag)})
        group.add_argument(flag, dest=field, default=None,
                           metavar=flag.lstrip("-").upper().replace("-", "_"),
                           help=f"{help_text} (default: {defaults[field]})", **kw)


def _add_run_flags(r):
    add_threads_flag(r)
    r.add_argument("--data", metavar="PATH", default=None,
                   help="UTF-8 text file to train on (default: ./train.txt, else Tiny Shakespeare)")
    r.add_argument("--tokenizer", choices=TOKENIZERS, default=None,
                   help="char: the text's characters (default); bpe: a byte-level BPE learned "
                        "from the training split (needs randygpt[bpe]); a resumed run keeps its own")
    r.add_argument("--vocab-size", type=int_arg("--vocab-size"), default=None, metavar="N",
                   help=f"BPE vocabulary size, {BPE_MIN_VOCAB}-{BPE_MAX_VOCAB} (default: "
                        f"{DEFAULT_BPE_VOCAB})")
    r.add_argument("--eval-every", type=int_arg("--eval-every", lo=0), default=250, metavar="N",
                   help="estimate the validation loss every N iterations (0: only at start and "
                        "end; default: 250)")
    r.add_argument("--eval-iters", type=int_arg("--eval-iters", lo=1), default=20, metavar="N",
                   help="batches per split in each loss estimate (default: 20)")
    r.add_argument("--log-every", type=int_arg("--log-every", lo=1), default=10, metavar="N",
                   help="print a log line and a metrics.csv row every N iterations; the loss "
                        "shown is the mean over those N (default: 10)")
    r.add_argument("--save-every", type=int_arg("--save-every", lo=0), default=1000, metavar="N",
                   help="save a checkpoint every N iterations (0: only at the end; a checkpoint is "
                        "also saved on Ctrl-C; default: 1000)")
    r.add_argument("--resume", metavar="CKPT", default=None,
                   help="continue exactly from a checkpoint (weights, optimizer, step, batch "
                        "order); ITERS is the total to reach")
    r.add_argument("--stop-at", type=int_arg("--stop-at", lo=1), default=None, metavar="N",
                   help="stop and save after iteration N while keeping the ITERS schedule "
                        "(continue later with --resume)")
    r.add_argument("--out", metavar="DIR", default=None,
                   help="run directory for config.json, metrics.csv and ckpt.npz (default: "
                        "runs/<UTC time>, or the resumed checkpoint's directory)")
    r.add_argument("--plot", action="store_true", help="write loss.png from metrics.csv at the end")
    r.add_argument("--no-sample", dest="sample", action="store_false",
                   help="skip the samples printed after training")
    r.add_argument("--sample-tokens", type=int_arg("--sample-tokens", lo=0), default=200,
                   metavar="N", help="characters to generate per sample (default: 200)")
    r.add_argument("--distributed", action="store_true",
                   help="train data-parallel over MPI even if no launcher is detected (started by "
                        "mpiexec or srun, randygpt does so by itself; needs randygpt[mpi])")


def parse_train_args(argv, parser=None):
    """argv (without the program name) -> (overrides dict for Config, RunOptions kwargs)."""
    ns = (parser or build_parser()).parse_args(argv)
    overrides = {field: getattr(ns, field) for field, *_ in CONFIG_FLAGS if getattr(ns, field) is not None}
    options = dict(iters=ns.iters, data_path=ns.data, out_dir=ns.out, eval_every=ns.eval_every,
                   log_every=ns.log_every, eval_iters=ns.eval_iters, save_every=ns.save_every,
                   resume=ns.resume, n_threads=ns.threads, sample=ns.sample,
                   sample_tokens=ns.sample_tokens, plot=ns.plot, stop_at=ns.stop_at,
                   overrides=overrides, distributed=ns.distributed, tokenizer=ns.tokenizer,
                   vocab_size=ns.vocab_size)
    return overrides, options


def continue_command(options, checkpoint):
    """The command that continues an unfinished run with every run option it had (the Config
    comes from the checkpoint), so the resumed run behaves as the interrupted one would have."""
    defaults = RunOptions(iters=1)
    again = [PROG, str(options.iters), "--resume", str(checkpoint)]
    for field, flag in RUN_FLAGS.items():
        value = getattr(options, field)
        if value != getattr(defaults, field):
            again += [flag, str(value)]
    if not options.sample:
        again.append("--no-sample")
    if options.plot:
        again.append("--plot")
    return shlex.join(again)


def _check_config(overrides):
    """Validate the user's config flags before any data is read, for a fast, clear error."""
    try:
        Config(**overrides)
    except (TypeError, ValueError) as e:
        raise UsageError(f"invalid configuration: {e}") from None


def main(argv, parser=None):
    """Train; returns the exit code. Bad input raises (UsageError, TrainError, DataError,
    CheckpointError): the command line's guard prints it as one line."""
    overrides, kwargs = parse_train_args(argv, parser)
    _check_config(overrides)
    force_mpi = kwargs.pop("distributed")
    try:
        options = RunOptions(**kwargs)
    except TrainError as e:
        raise UsageError(str(e)) from None
    # One communicator per process; mpi4py is imported only under a launcher or when asked.
    comm = distributed.init(force=force_mpi)
    # Set-up errors come from the input, the same on every rank (or are sent to every rank),
    # so each rank reports them itself; errors during training may hit one rank alone, which
    # must then end the whole job rather than leave the others waiting.
    with Trainer(None, options, comm=comm) as trainer, distributed.abort_on_error(comm):
        try:
            result = trainer.fit()
        except RunFailed as e:
            if comm.size == 1:
                raise
            report_error(f"rank {comm.rank}: {e}", code=EXIT_FAILURE)
            comm.abort(EXIT_FAILURE)
            raise
    if not comm.is_root:
        return _exit_code(result)
    if result.diverged:
        return report_error(f"the loss became non-finite at iteration {result.diverged}; "
                            f"last checkpoint: {result.checkpoint or 'none'} (try a lower --lr)",
                            code=_exit_code(result))
    if result.interrupted:
        if result.checkpoint is None:
            print(f"\nInterrupted ({result.interrupted}) before the first step: nothing to save.",
                  flush=True)
        else:
            last = f"{result.last_loss:.4f}" if result.last_loss is not None else "n/a"
            print(f"\nInterrupted ({result.interrupted}) after iteration {result.step}/"
                  f"{result.iters}: {len(result.losses)} iterations this session, last loss "
                  f"{last}. Checkpoint: {result.checkpoint}", flush=True)
    if result.step < result.iters and result.checkpoint is not None:
        print(f"Continue with: {continue_command(options, result.checkpoint)}", flush=True)
    return _exit_code(result)


def _exit_code(result):
    """A finished fit's exit code, the same on every rank: 1 for a diverged run (not a usage
    mistake, but a failed run), 143 / 130 after SIGTERM / SIGINT, else 0."""
    if result.diverged:
        return EXIT_FAILURE
    if result.interrupted:
        return EXIT_SIGTERM if result.interrupted == "SIGTERM" else EXIT_SIGINT
    return 0
