"""Training as a library: a ``Trainer`` that prepares a run (fresh or resumed), takes one step
at a time, evaluates, saves, and runs the whole loop with logging, metrics and checkpoints.

    trainer = Trainer(Config(n_layer=2, n_embd=64, n_head=4), RunOptions(iters=300), text=text)
    with trainer:
        result = trainer.fit()          # or: loss = trainer.step(), trainer.evaluate(), trainer.save()

This module does not parse arguments (cli does); with cli it is the only one that prints (its
log lines through randygpt.runlog's Logger).
Randomness comes from three generators derived from ``config.seed``, each with one job, so none
perturbs another: batch positions (saved in checkpoints for exact resume), evaluation batches,
and sampling. Model init and dropout take the seed directly.
"""
import dataclasses
import math
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from . import checkpoint as ckpt_mod
from ._kernels import effective_n_threads, openmp_enabled, physical_cores, usable_cpus
from .config import Config
from .distributed import LocalCommunicator, default_threads
from .data import (BUILTIN_TEXT, SHAKESPEARE_URL, DataError, Dataset, TextSource, TextTooShort,
                   default_cache_dir, load_text, resolve_source, split_text, text_fingerprint,
                   verify_text)
from .metrics import MetricsFile
from .model import GPT, precision_note
from .optim import AdamW, clip_scale, lr_at
from .rundir import RUN_ID_KEY, RunDir
from .runlog import SILENT, Logger, Meter, progress_line
from .tokenizer import BPE_MAX_VOCAB, BPE_MIN_VOCAB, TOKENIZERS, BPETokenizer, CharTokenizer

__all__ = ["Trainer", "RunOptions", "RunResult", "Progress", "TrainError", "RunFailed", "Diverged",
           "run", "estimate_loss", "SAMPLE_PROMPTS", "BATCH_STREAM", "EVAL_STREAM",
           "SAMPLE_STREAM", "build_config", "default_out_dir", "write_plot"]

SAMPLE_PROMPTS = ("ROMEO:", "To be or not to be", "Once upon a time")
# --tokenizer bpe without --vocab-size: the best of 512, 2048 and 8192 at equal compute on Tiny
# Shakespeare (README, "Characters or BPE": 2.234 bits per character, 2.241, 2.330).
DEFAULT_BPE_VOCAB = 512

# Stream tags mixed with config.seed: np.random.default_rng([seed, tag]) gives independent
# generators, so evaluating or sampling never shifts the batch positions training sees.
BATCH_STREAM = 1
EVAL_STREAM = 2
SAMPLE_STREAM = 3

# The Config fields the start-up report lists as the model's (the rest are the recipe's).
_MODEL_KEYS = ("vocab_size", "n_embd", "n_head", "n_layer", "block_size", "dropout", "norm",
               "norm_eps")


class TrainError(ValueError):
    """Bad user input found while setting a run up (config, resume file, output directory):
    the message is one line meant for the user."""


class RunFailed(RuntimeError):
    """The run could not go on for a reason outside its input (a full disk, a file that can no
    longer be written); the message is one line and names the last good checkpoint."""


class Diverged(ArithmeticError):
    """The loss of an iteration was not finite; raised by Trainer.step before the update, so
    the weights stay finite and the last checkpoint stays the one to go back to."""

    def __init__(self, iteration, loss):
        super().__init__(f"the loss of iteration {iteration} is {loss}")
        self.iteration = iteration
        self.loss = loss


@dataclasses.dataclass
class RunOptions:
    """How to run, as opposed to what to train (that is the Config)."""

    iters: int                      # target iteration count (also the LR schedule's length)
    data_path: str = None           # text file; None: ./train.txt, the corpus, or the built-in sample
    out_dir: str = None             # run directory; None: runs/<UTC timestamp> (or the resumed one)
    eval_every: int = 250           # iterations between loss estimates (0: only before and after)
    log_every: int = 10             # iterations between log lines and metrics rows
    eval_iters: int = 20            # batches per split in each loss estimate
    save_every: int = 1000          # iterations between checkpoints (0: only at the end)
    resume: str = None              # checkpoint to continue from
    n_threads: int = None           # kernel threads (None: randygpt's default resolution)
    sample: bool = True             # print samples for SAMPLE_PROMPTS at the end
    sample_tokens: int = 200        # new tokens per sample
    plot: bool = False              # write a loss plot of metrics.csv at the end
    stop_at: int = None             # stop after this iteration as if interrupted (schedule unchanged)
    cache_dir: str = None           # corpus cache (None: data.default_cache_dir())
    data_url: str = SHAKESPEARE_URL  # where the corpus is downloaded from
    tokenizer: str = None           # "char" or "bpe" (None: char, or the resumed checkpoint's)
    vocab_size: int = None          # BPE vocabulary size (None: DEFAULT_BPE_VOCAB)
    overrides: dict = dataclasses.field(default_factory=dict)  # Config fields set by the user

    def __post_init__(self):
        _check_int("iters", self.iters, lo=1)
        _check_int("eval_every", self.eval_every, lo=0)
        _check_int("log_every", self.log_every, lo=1)
        _check_int("eval_iters", self.eval_iters, lo=1)
        _check_int("save_every", self.save_every, lo=0)
        _check_int("sample_tokens", self.sample_tokens, lo=0)
        if self.stop_at is not None:
            _check_int("stop_at", self.stop_at, lo=1)
        if self.tokenizer is not None and self.tokenizer not in TOKENIZERS:
            raise TrainError(f"tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if self.vocab_size is not None:
            _check_int("vocab_size", self.vocab_size)
            if not BPE_MIN_VOCAB <= self.vocab_size <= BPE_MAX_VOCAB:
                raise TrainError(f"vocab_size must be in [{BPE_MIN_VOCAB}, {BPE_MAX_VOCAB}] (2 "
                                 f"special ids + 256 bytes + merges), got {self.vocab_size}")
            if self.tokenizer != "bpe":
                raise TrainError("--vocab-size needs --tokenizer bpe (a character vocabulary is "
                                 "the text's own characters)")
        if self.n_threads is not None:
            _check_int("threads", self.n_threads)
            if self.n_threads == 0:
                raise TrainError("threads must not be 0 (use a positive count, or negative to "
                                 "count back from the usable CPUs)")


@dataclasses.dataclass
class RunResult:
    out_dir: Path
    checkpoint: Path                # last checkpoint written (None if none was)
    step: int                       # iterations completed in total (resumed ones included)
    iters: int                      # the target
    losses: list                    # training loss of every iteration run in this session
    first_estimate: dict            # {"train", "val"} before this session's first step
    final_estimate: dict            # {"train", "val"} after the last step (None if interrupted)
    best_val: float
    interrupted: str = None         # None, "SIGINT" or "SIGTERM"
    samples: dict = None            # prompt -> generated text
    diverged: int = None            # iteration whose loss was not finite (training stopped there)

    @property
    def last_loss(self):
        return self.losses[-1] if self.losses else None


@dataclasses.dataclass
class Progress:
    """What a callback of Trainer.fit receives at every log interval (and every evaluation)."""

    step: int                       # iterations completed
    iters: int                      # the target
    loss: float                     # mean training loss over the interval
    lr: float                       # learning rate of the interval's last step
    tok_per_s: float                # training throughput over the interval (evaluation excluded)
    elapsed_s: float                # seconds since this session's first step
    eta_s: float                    # estimated seconds to the end of the run
    val_loss: float = None          # the estimate made at this step, None if none was
    best_val: float = math.inf      # best validation estimate so far


def _check_int(name, value, lo=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TrainError(f"{name} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise TrainError(f"{name} must be >= {lo}, got {value}")


def estimate_loss(model, dataset, batch_size, eval_iters, rng, stop=None, comm=None):
    """Mean loss over ``eval_iters`` random batches of each split, in eval mode (no dropout).

    Uses the training batch shape so the model's activation arena is not re-allocated. The
    model's train/eval mode is restored afterwards. Returns {"train": float, "val": float}, or
    None when ``stop`` (an object whose truth means "stop now", such as the trainer's signal
    flag) turns true between two batches: Ctrl-C must not wait for a whole estimate.

    With a communicator of several ranks each rank scores its share of the batches (all draw
    every batch, so the generator moves as in one process); the losses are gathered in batch
    order and summed in that order: the same estimate as one process, bit for bit.
    """
    mine = range(eval_iters) if comm is None else comm.share(eval_iters)
    out = {}
    with model.evaluating():
        for split in ("train", "val"):
            losses = []
            for i in range(eval_iters):
                if (stop if comm is None else comm.any(stop)):
                    return None
                x, y = dataset.get_batch(split, batch_size, rng)
                if i in mine:
                    losses.append(float(model.forward(x, y)))
            if comm is not None:
                losses = comm.gather_floats(losses)
            out[split] = _ordered_mean(losses)  # eval_iters losses, in batch order
    return out


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between iterations, so a checkpoint is
    always written from a consistent state (never between a batch draw and the update). A
    second signal raises KeyboardInterrupt at once for users who really want out."""

    def __init__(self):
        self.signal_name = None
        self._old = {}

    def _handler(self, signum, frame):
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self):
        # Handlers can only be installed from the main thread; elsewhere Ctrl-C behaves as usual.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        return False

    def __bool__(self):
        return self.signal_name is not None


def default_out_dir():
    """runs/<UTC date-time>, with -2, -3, ... appended when that directory exists."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / stamp
    path, n = base, 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    return path


def build_config(overrides, vocab_size=None, base=None):
    """Config(**overrides), or base with overrides applied; vocab_size, when given, replaces
    the config's. A bad value is a TrainError with a one-line message."""
    try:
        cfg = Config(**overrides) if base is None else base.replace(**overrides)
        if vocab_size is not None:
            cfg = cfg.replace(vocab_size=vocab_size)
        return cfg
    except (TypeError, ValueError) as e:
        raise TrainError(f"invalid configuration: {e}") from None


def write_plot(out_dir, log):
    """Draw the run's loss curves into out_dir and log where; a failure is a note, not an error."""
    # Imported here: the plot module is only needed at the end of a run that asks for it.
    from .plot import PlotError, plot_run
    try:
        log.line(f"Plot: {plot_run(out_dir)}")
    except (PlotError, OSError) as e:
        # The run itself succeeded; a missing matplotlib must not turn it into a failure.
        log.line(f"note: no plot written: {e}")


def _gib(n_bytes):
    return f"{n_bytes / 2**30:,.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:,.0f} MiB"


def _available_memory():
    """Bytes this process may still allocate: the system's available memory, lowered to what
    its cgroup (a container's memory limit) has left; None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            current = int(f.read().strip())
        if limit != "max":
            found.append(int(limit) - current)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _text_source(text):
    """A TextSource for text handed over by a caller (no file behind it)."""
    if not isinstance(text, str):
        raise TrainError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise DataError("the text is empty")
    return TextSource(text=text, description=f"text given by the caller ({len(text):,} characters)",
                      warning=None, path=None)


def _ordered_mean(values):
    """The mean of floats summed one by one in their order (sum() may compensate, which
    would make the result depend on the Python version)."""
    total = 0.0
    for v in values:
        total += v
    return total / len(values)


class Trainer:
    """One training run: construction prepares everything, ``step`` takes one iteration,
    ``evaluate``/``save`` do what they say, and ``fit`` runs the loop to the end.

    config    : a Config for a fresh run (its vocab_size is replaced by the data's), or None to
                build one from ``options.overrides`` (on resume: the checkpoint's, unchanged)
    options   : RunOptions (the iteration target, data, output directory, intervals, resume)
    text      : train on this string instead of a file (options.data_path must then be None)
    stdout, stderr : where log lines and warnings go (default: the process's own)
    callbacks : callables receiving a Progress at every log interval of ``fit``
    comm      : a randygpt.distributed communicator for data-parallel training (default: one
                process). Every rank draws the same global batch and takes its slice; the
                gradients are averaged in rank order; only rank 0 prints and writes files.

    Construction raises TrainError, DataError or CheckpointError (all ValueError, one-line
    messages) for bad input, before any output file exists; then it creates the run directory,
    writes config.json, opens metrics.csv and takes the run directory's lock. Close the trainer,
    or use it as a context manager, to close metrics.csv and release the lock.
    """

    def __init__(self, config=None, options=None, *, text=None, stdout=None, stderr=None,
                 callbacks=(), comm=None):
        if not isinstance(options, RunOptions):
            raise TrainError("options must be a RunOptions (at least the iteration target)")
        if text is not None and options.data_path is not None:
            raise TrainError("pass either text or options.data_path, not both")
        self.options = options
        self.comm = LocalCommunicator() if comm is None else comm
        # Rank 0 alone speaks: the others' lines would repeat (and interleave with) its own.
        self.log = Logger(SILENT if not self.comm.is_root else sys.stdout if stdout is None
                          else stdout)
        self._err = SILENT if not self.comm.is_root else sys.stderr if stderr is None else stderr
        self.callbacks = list(callbacks)
        self._stop = None                 # fit's Ctrl-C / SIGTERM flag while it runs
        resumed = self._read_resume(config)
        self.source = self._open_source(text, resumed)
        # The text's identity, recorded in every checkpoint so a resume can check it.
        self._fingerprint = text_fingerprint(self.source.text)
        if self.tokenizer is None:
            self.tokenizer = self._build_tokenizer()
            self.config = build_config({}, vocab_size=self.tokenizer.vocab_size, base=self.config)
        self.dataset = self._open_dataset(resumed)
        self.comm.batch_slice(self.config.batch_size)  # the ranks must divide the batch
        # Ranks that share a node share its cores (default_threads is collective: every rank
        # comes here).
        self.n_threads = effective_n_threads(
            options.n_threads if options.n_threads is not None or self.comm.size == 1
            else default_threads(self.comm))
        self._check_memory()
        self.model, self.optimizer = self.build_model()
        self.batch_rng = np.random.default_rng([self.config.seed, BATCH_STREAM])
        self.best_val = math.inf
        if resumed is not None:
            self._restore(resumed)
        self.step_count = self.start      # iterations completed, resumed ones included
        self.losses = []                  # this session's training losses
        self.lr = lr_at(self.start, options.iters, self.config)
        self.saved = None                 # the last checkpoint written
        self.end = options.iters if options.stop_at is None else min(options.iters, options.stop_at)
        self.rundir = self.metrics = None
        # Rank 0 owns the run directory; the others learn where it is, or why it failed.
        failure, where = self.comm.bcast_object(self._open_output(resumed) if self.comm.is_root
                                                else None)
        if failure is not None:
            raise TrainError(failure) if not self.comm.is_root else self._open_error
        self.out_dir, self.checkpoint_path = where

    def _open_output(self, resumed):
        """Rank 0: lock the run directory (an OS lock, this run's alone until close()), report
        the start, write config.json and open metrics.csv. Returns (None, (directory,
        checkpoint path)), or (the error's message, None) with the error kept to raise."""
        try:
            self.rundir = self._open_rundir(resumed)
        except ValueError as e:
            self._open_error = e
            return str(e), None
        try:
            self.out_dir = self.rundir.path
            self._report(resumed)
            self.rundir.write_config(self.run_info())
            self.metrics = MetricsFile(self.rundir.metrics_path,
                                       keep_until=self.start if resumed is not None else None)
        except (OSError, ValueError) as e:
            self.rundir.close()
            self._open_error = e if isinstance(e, ValueError) else TrainError(
                f"cannot write to the output directory {str(self.rundir.path)!r}: "
                f"{e.strerror or e}")
            return str(self._open_error), None
        except BaseException:
            self.rundir.close()
            raise
        return None, (self.rundir.path, self.rundir.checkpoint_path)

    # ---------------------------------------------------------------- set-up

    def _read_resume(self, config):
        """Sets config, tokenizer and start; returns the checkpoint to resume from, or None."""
        opts = self.options
        if opts.resume is None:
            self.config = build_config(opts.overrides, base=config)
            self.tokenizer, self.start = None, 0
            self._check_stop_at()
            return None
        resumed = ckpt_mod.load(opts.resume)
        if resumed.adam_m is None or resumed.rng_state is None:
            raise TrainError(f"checkpoint {opts.resume!r} has no optimizer or batch-RNG state: "
                             "it cannot be resumed exactly")
        if config is not None:
            raise TrainError("pass either a config or a checkpoint to resume, not both")
        conflicts = {k: v for k, v in opts.overrides.items() if getattr(resumed.config, k) != v}
        if conflicts:
            names = ", ".join(f"{k}={v!r} (checkpoint has {getattr(resumed.config, k)!r})"
                              for k, v in sorted(conflicts.items()))
            raise TrainError(f"cannot change settings when resuming, for an exact continuation: {names}")
        self.config, self.tokenizer, self.start = resumed.config, resumed.tokenizer, resumed.step
        self._check_resumed_tokenizer()
        if self.start >= opts.iters:
            raise TrainError(f"checkpoint is already at iteration {self.start}; ask for more than "
                             f"{self.start} iterations to continue")
        self._check_stop_at()
        return resumed

    def _build_tokenizer(self):
        """A fresh run's tokenizer: the text's characters, or a BPE learned from its training
        split alone (the validation text stays unseen)."""
        opts = self.options
        if opts.tokenizer != "bpe":
            return CharTokenizer.from_text(self.source.text)
        size = DEFAULT_BPE_VOCAB if opts.vocab_size is None else opts.vocab_size
        try:
            return BPETokenizer.train(split_text(self.source.text)[0], size)
        except ValueError as e:
            raise TrainError(f"cannot build the BPE tokenizer: {e}") from None

    def _check_resumed_tokenizer(self):
        opts, tok = self.options, self.tokenizer
        if opts.tokenizer not in (None, tok.kind) or opts.vocab_size not in (None, tok.vocab_size):
            raise TrainError(f"cannot change the tokenizer when resuming: the checkpoint's is "
                             f"{tok.kind} with {tok.vocab_size} ids")

    def _check_stop_at(self):
        stop_at = self.options.stop_at
        if stop_at is not None and stop_at <= self.start:
            raise TrainError(f"stop_at ({stop_at}) must be after the starting iteration ({self.start})")

    def _open_dataset(self, resumed):
        try:
            cache = self.options.cache_dir
            return Dataset(self.source.text, self.tokenizer, self.config.block_size,
                           cache_dir=default_cache_dir() if cache is None else cache)
        except TextTooShort as e:
            raise TextTooShort(f"{e}; use a longer text or a smaller --block-size") from None
        except DataError as e:
            trained_on = resumed.extra.get("data") if resumed is not None else None
            if not isinstance(trained_on, dict) or not trained_on.get("description"):
                raise
            raise DataError(f"{e} (the checkpoint was trained on {trained_on['description']}; "
                            "pass that text with --data)") from None

    def _check_memory(self):
        """Refuse, with the figures, a configuration whose training step cannot fit in the
        memory this process may use: better than an allocation failing midway."""
        B = self.config.batch_size // self.comm.size
        need = GPT.training_memory(self.config, B, self.config.block_size, self.n_threads)
        have = _available_memory()
        if have is not None and sum(need.values()) > have:
            parts = ", ".join(f"{k} {_gib(v)}" for k, v in need.items())
            raise TrainError(f"this configuration needs about {_gib(sum(need.values()))} to train "
                             f"({parts}; batch {B} x block {self.config.block_size}) but about "
                             f"{_gib(have)} of memory is available; choose a smaller "
                             "--batch-size, --block-size, --n-embd or --n-layer")

    def build_model(self):
        """The model and its optimizer (a subclass may train another implementation: the model
        needs forward(x, y, step=), backward(), evaluating(), train(), num_params and
        release_buffers(); the optimizer grad_norm() and step(lr, grad_scale=))."""
        try:
            model = GPT(self.config, seed=self.config.seed, n_threads=self.n_threads)
            return model, AdamW(model, self.config, n_threads=self.n_threads)
        except MemoryError:
            raise TrainError("not enough memory for this model and batch size; choose smaller "
                             "--n-embd, --n-layer or --batch-size") from None

    def _restore(self, resumed):
        self.model.load_flat_params(resumed.params)
        self.optimizer.load_state_dict(resumed.optimizer_state())
        # Copied into the model and optimizer: the checkpoint's own arrays would otherwise stay
        # alive for the whole run, 55 MiB at the default size.
        resumed.params = resumed.adam_m = resumed.adam_v = None
        try:
            self.batch_rng.bit_generator.state = resumed.rng_state
        except (TypeError, ValueError, KeyError) as e:
            raise TrainError(f"checkpoint {self.options.resume!r} has an unusable RNG state: "
                             f"{e}") from None
        self.best_val = float(resumed.extra.get("best_val", math.inf) or math.inf)

    def _open_source(self, text, resumed):
        """The training text: the caller's (text= or --data), else for a resumed run the text
        its checkpoint records (checked against its recorded size and sha256), else the
        default sources of data.resolve_source."""
        opts = self.options
        if text is not None:
            return _text_source(text)
        if resumed is None or opts.data_path is not None:
            return resolve_source(opts.data_path, opts.cache_dir, url=opts.data_url)
        record = resumed.extra.get("data")
        if not isinstance(record, dict):
            raise TrainError(f"checkpoint {opts.resume!r} does not record the text it was trained "
                             "on; pass it with --data")
        path, description = record.get("path"), str(record.get("description") or "")
        if path:
            try:
                found = load_text(path)
            except DataError as e:
                raise DataError(f"the checkpoint was trained on {description or path}, which "
                                f"cannot be read now ({e}); restore it, or pass --data to "
                                "continue on another text deliberately") from None
        elif description.startswith("built-in sample"):
            found = BUILTIN_TEXT
        else:
            raise TrainError(f"the checkpoint was trained on {description or 'an unnamed text'}, "
                             "which it cannot reopen; pass that text again with --data")
        if "sha256" in record:
            verify_text(found, record, path or description)
        return TextSource(text=found, description=description or str(path), warning=None,
                          path=path)

    def _open_rundir(self, resumed):
        """Lock the run directory: a fresh run's must hold no run; a resumed run's must hold
        no other run's files (RunDirError otherwise)."""
        opts = self.options
        if resumed is None:
            return RunDir.open_fresh(Path(opts.out_dir) if opts.out_dir is not None
                                     else default_out_dir())
        out_dir = Path(opts.out_dir) if opts.out_dir is not None else Path(opts.resume).resolve().parent
        return RunDir.open_resume(out_dir, resumed.extra.get(RUN_ID_KEY), opts.resume)

    def _report(self, resumed):
        opts, log = self.options, self.log
        if self.source.warning:
            print(f"randygpt: warning: {self.source.warning}", file=self._err, flush=True)
        log.line("randygpt " + (f"resuming {opts.resume} at iteration {self.start}"
                                if resumed is not None else "training from scratch"))
        fields = self.config.to_dict()
        log.line("Model: " + " ".join(f"{k}={fields[k]}" for k in _MODEL_KEYS if k in fields))
        log.line("Training: " + " ".join(f"{k}={v}" for k, v in fields.items()
                                         if k not in _MODEL_KEYS))
        log.line(f"Parameters: {self.model.num_params:,}")
        ds = self.dataset
        log.line(f"Data: {self.source.description}; train {len(ds.train):,} / val "
                 f"{len(ds.val):,} tokens; vocab {self.tokenizer.vocab_size} "
                 f"({self.tokenizer.kind}, {ds.chars['train'] / len(ds.train):.2f} characters "
                 "per token)")
        log.line(self.threads_description())
        log.line(f"Iterations: {self.start} -> {opts.iters}"
                 + (f" (stopping at {opts.stop_at})" if opts.stop_at is not None else "")
                 + f"; output: {self.out_dir}")
        for note in [*self.rundir.notes, *self._notes()]:
            log.line(f"note: {note}")
        if resumed is not None and resumed.extra.get("iters") not in (None, opts.iters):
            log.line(f"note: the checkpoint was trained for a {resumed.extra['iters']}-iteration "
                     f"schedule; the learning rate now follows a {opts.iters}-iteration one")

    def _notes(self):
        """Settings that do not do what they seem to: said once at start."""
        opts, cfg = self.options, self.config
        if opts.n_threads is not None and opts.n_threads > self.n_threads:
            yield (f"{opts.n_threads} threads asked for, but this process may use "
                   f"{usable_cpus()} logical CPUs: running {self.n_threads}")
        if opts.iters < cfg.warmup_iters:
            yield (f"the run ({opts.iters} iterations) is shorter than the warmup "
                   f"({cfg.warmup_iters}): the learning rate never reaches its peak {cfg.lr:g} "
                   f"(it ends at {lr_at(opts.iters - 1, opts.iters, cfg):.1e})")
        note = self.precision_description()
        if note:
            yield note

    def precision_description(self):
        """The start-up note on what config.precision does here (None: nothing to say)."""
        return precision_note(self.config)

    def threads_description(self):
        """The start-up line about threads (OpenMP on or off, how many, out of how many cores)."""
        line = (f"openmp={'yes' if openmp_enabled() else 'no'} threads={self.n_threads} "
                f"(this process may use {physical_cores()} cores, {usable_cpus()} logical CPUs)")
        comm = self.comm
        if comm.size > 1:
            line += (f"; {comm.size} ranks on {comm.hosts} host{'s' if comm.hosts > 1 else ''}, "
                     f"{self.n_threads} threads per rank, batch {self.config.batch_size // comm.size}"
                     " per rank")
        return line

    def run_info(self):
        """What config.json records about the run."""
        opts = self.options
        return {"config": self.config.to_dict(), "tokenizer": self.tokenizer.to_dict(),
                "data": self.source.description, "iters": opts.iters, "n_threads": self.n_threads,
                "resumed_from": str(opts.resume) if opts.resume else None,
                "options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "overrides"}}

    # ---------------------------------------------------------------- the run's verbs

    def step(self):
        """One iteration: learning rate, batch, forward, backward, clip, update. Returns the
        training loss; raises Diverged (before the update) when it is not finite."""
        it, comm = self.step_count, self.comm
        self.lr = lr_at(it, self.options.iters, self.config)
        x, y = self.dataset.get_batch("train", self.config.batch_size, self.batch_rng)
        if comm.size == 1:
            loss = self.model.forward(x, y, step=it)
        else:
            # The same global batch on every rank; this rank's rows of it. batch_offset keys
            # the dropout masks by global row, so K ranks draw the masks one process would.
            rows = comm.batch_slice(self.config.batch_size)
            loss = self.model.forward(x[rows], y[rows], step=it, batch_offset=rows.start)
            loss = _ordered_mean(comm.gather_floats([loss]))
        if not math.isfinite(loss):
            raise Diverged(it + 1, loss)
        self.model.backward()
        if comm.size > 1:
            comm.average_grads(self.model.flat_grads)
        scale = clip_scale(self.optimizer.grad_norm(), self.config.grad_clip)
        self.optimizer.step(self.lr, grad_scale=scale)
        self.step_count = it + 1
        self.losses.append(loss)
        return loss

    def evaluate(self):
        """Mean loss over eval_iters batches of each split: {"train": float, "val": float}
        (None when fit's Ctrl-C / SIGTERM flag is raised meanwhile). A fresh generator each
        time: every evaluation scores the same batches, so changes between evaluations come
        from the model, and resuming reproduces them."""
        rng = np.random.default_rng([self.config.seed, EVAL_STREAM])
        estimate = estimate_loss(self.model, self.dataset, self.config.batch_size,
                                 self.options.eval_iters, rng, stop=self._stop, comm=self.comm)
        if estimate is not None:
            self.best_val = min(self.best_val, estimate["val"])
        return estimate

    def save(self):
        """Write the checkpoint (weights, AdamW state, batch RNG, step) atomically; returns its path."""
        if not self.comm.is_root:
            # The ranks hold identical states (checked at every evaluation): rank 0 saves.
            self.saved = self.checkpoint_path
            return self.saved
        best = self.best_val if math.isfinite(self.best_val) else None
        # "data" tells `randygpt eval` which text to score by default.
        extra = {"iters": self.options.iters, "best_val": best, RUN_ID_KEY: self.rundir.run_id,
                 "data": {"path": self.source.path, "description": self.source.description,
                          **self._fingerprint},
                 "last_loss": self.losses[-1] if self.losses else None}
        ckpt_mod.save(self.checkpoint_path, model=self.model, optimizer=self.optimizer,
                      tokenizer=self.tokenizer, step=self.step_count,
                      rng_state=self.batch_rng.bit_generator.state, extra=extra)
        self.saved = self.checkpoint_path
        # A save that completed leaves no use for what killed saves left behind.
        self.rundir.remove_stale_temps()
        return self.saved

    def close(self):
        """Close metrics.csv and release the run directory's lock (twice is harmless)."""
        if self.metrics is not None and not self.metrics.closed:
            self.metrics.close()
        if self.rundir is not None:
            self.rundir.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ---------------------------------------------------------------- the loop

    def fit(self):
        """Train from the current step to the target (or options.stop_at), evaluating, logging
        and saving on the options' intervals. Ctrl-C / SIGTERM stop cleanly, even during an
        evaluation: after the current step, with a checkpoint if a step was taken. Returns a
        RunResult; the trainer stays open (evaluate, save, step) until closed. A failed write
        (a full disk) raises RunFailed, with the last good checkpoint left as it was."""
        first = final = diverged = None
        try:
            with _StopFlag() as stop, threadpool_limits(1, "blas"):
                self._stop = stop
                self.model.train()
                first = self._first_estimate()
                if first is not None:
                    final, diverged = self._loop(stop, first["val"])
                self.log.end_progress()
                if diverged is None and self.losses:
                    self._save_or_fail()
        except KeyboardInterrupt:
            # A second Ctrl-C inside a step: the state may be half-updated, so nothing is saved.
            self.log.end_progress()
            self.log.line(f"Interrupted again at iteration {self.step_count}; not saving. Last "
                          f"checkpoint: {self.saved if self.saved else 'none'}")
            raise
        finally:
            self._stop = None
        resumed = Path(self.options.resume) if self.options.resume else None
        result = RunResult(out_dir=self.out_dir, checkpoint=self.saved or resumed,
                           step=self.step_count, iters=self.options.iters, losses=self.losses,
                           first_estimate=first, final_estimate=final, best_val=self.best_val,
                           interrupted=stop.signal_name, diverged=diverged)
        if not (result.interrupted or diverged):
            self._finish(result)
        return result

    def _failed(self, why):
        """RunFailed for a write that failed mid-run, naming the checkpoint to go back to."""
        return RunFailed(f"{why}; the last good checkpoint is "
                         f"{self.saved or self.options.resume or 'none'}")

    def _save_or_fail(self):
        try:
            return self.save()
        except (ckpt_mod.CheckpointError, OSError) as e:
            raise self._failed(e) from None

    def _timed_evaluate(self, meter):
        t0 = time.perf_counter()
        estimate = self.evaluate()
        if estimate is not None:
            meter.eval_done(time.perf_counter() - t0)
        return estimate

    def _first_estimate(self):
        before = self.metrics.last_elapsed if self.metrics is not None else 0.0
        self._meter = Meter(self.step_count, time.perf_counter(), before)
        first = self._timed_evaluate(self._meter)
        if first is None:
            return None
        self.log.line(f"Initial loss estimate: train {first['train']:.4f} | val {first['val']:.4f}"
                      f" ({self._bpc(first['val']):.4f} bits per character)")
        if self.start == 0:
            # The curve starts at the untrained model (a resumed run already has this row).
            self._write_metrics(0, first["train"], first["val"], self.lr, None, 0.0,
                                self._bpc(first["val"]))
        return first

    def _loop(self, stop, last_val):
        """The iterations; returns (final estimate or None, diverged iteration or None).
        last_val is the latest validation estimate (the best-so-far line needs it)."""
        opts, meter = self.options, self._meter
        meter.start(time.perf_counter())
        final = None
        while self.step_count < self.end and not self.comm.any(stop):
            t0 = time.perf_counter()
            try:
                loss = self.step()
            except Diverged as e:
                self.log.line(f"Iter {e.iteration}: the loss is {e.loss}; stopping without saving "
                              "(try a lower --lr)")
                return final, e.iteration
            meter.step_done(loss, time.perf_counter() - t0)
            step = self.step_count
            # The last iteration is always evaluated: that is the final loss estimate.
            estimate = None
            if step == self.end or (opts.eval_every > 0 and step % opts.eval_every == 0):
                estimate = self._timed_evaluate(meter)
                if estimate is None:
                    break  # interrupted during the evaluation
                if self.comm.size > 1:
                    # Divergence between ranks is an error, never a silent drift.
                    self.comm.check_identical(self.model.flat_params)
                final = estimate if step == self.end else None
            if step % opts.log_every == 0 or estimate is not None:
                self._log_interval(None if estimate is None else estimate["val"])
            if opts.save_every > 0 and step % opts.save_every == 0 and step < self.end:
                self._save_or_fail()
        return final, None

    def _evals_left(self):
        """Evaluations still to come after the current step (the last step's included)."""
        step, end, every = self.step_count, self.end, self.options.eval_every
        if step >= end:
            return 0
        if every == 0:
            return 1
        return end // every - step // every + (1 if end % every else 0)

    def _log_interval(self, val_loss):
        meter, step = self._meter, self.step_count
        B, T = self.config.batch_size, self.config.block_size
        n = step - meter.mark_step
        tok_s = n * B * T / meter.interval_time if meter.interval_time > 0 else math.inf
        eta = meter.eta(self.end - step, self._evals_left())
        mean_loss = meter.interval_loss / n
        elapsed = meter.elapsed(time.perf_counter())
        bpc = self._bpc(val_loss)
        self.log.progress(progress_line(step, self.options.iters, mean_loss, val_loss, self.lr,
                                        self.best_val, tok_s, eta, bpc), keep=val_loss is not None)
        self._write_metrics(step, mean_loss, val_loss, self.lr, tok_s, elapsed, bpc)
        meter.new_interval(step)
        record = Progress(step=step, iters=self.options.iters, loss=mean_loss, lr=self.lr,
                          tok_per_s=tok_s, elapsed_s=elapsed, eta_s=eta,
                          val_loss=val_loss, best_val=self.best_val)
        for callback in self.callbacks:
            callback(record)

    def _bpc(self, val_loss):
        """A validation loss (nats per token) in bits per character; None stays None."""
        return None if val_loss is None else self.dataset.bits_per_char(val_loss, "val")

    def _write_metrics(self, *row):
        if self.metrics is None:  # not rank 0
            return
        try:
            self.metrics.write(*row)
        except OSError as e:
            raise self._failed(f"cannot write {str(self.metrics.path)!r}: {e.strerror or e}") \
                from None

    def _finish(self, result):
        """The end of a completed run: the final estimate, samples, plot."""
        opts, log = self.options, self.log
        if result.final_estimate is not None:
            # Only the end of the schedule is final; a --stop-at run is to be continued.
            what = ("Final loss estimate" if self.step_count == opts.iters
                    else f"Loss estimate at iteration {self.step_count}")
            log.line(f"{what}: train {result.final_estimate['train']:.4f} | "
                     f"val {result.final_estimate['val']:.4f} "
                     f"({self._bpc(result.final_estimate['val']):.4f} bits per character; "
                     f"started at {result.first_estimate['val']:.4f})")
        if self.saved is not None:
            log.line(f"Checkpoint: {self.saved}")
        if not self.comm.is_root:
            return
        if opts.sample and opts.sample_tokens > 0 and self.step_count == opts.iters:
            # Training is over: its activations and AdamW moments would only add to the run's
            # peak memory while the samples are drawn.
            self.model.release_buffers()
            self.optimizer = None
            result.samples = self._print_samples()
        if opts.plot:
            write_plot(self.out_dir, log)

    def _print_samples(self):
        # Imported here: sampling pulls in the decoding machinery only a finished run needs.
        from .sample import generate
        rng = np.random.default_rng([self.config.seed, SAMPLE_STREAM])
        samples = {}
        for prompt in SAMPLE_PROMPTS:
            missing = self.tokenizer.unknown_chars(prompt)
            if missing:
                self.log.line(f"\n--- {prompt!r}: skipped, the vocabulary lacks "
                              f"{', '.join(repr(c) for c in missing)}")
                continue
            text = generate(self.model, self.tokenizer, prompt, self.options.sample_tokens,
                            temperature=0.8, top_p=0.9, top_k=None, rng=rng)
            samples[prompt] = prompt + text
            self.log.line(f"\n--- {prompt!r} (temperature 0.8, top-p 0.9)\n{prompt}{text}")
        return samples


def run(config=None, options=None, *, text=None, stdout=None, stderr=None):
    """Train (or resume) and return a RunResult: ``Trainer(...).fit()`` in one call.

    See Trainer for the arguments and the errors raised for bad input.
    """
    with Trainer(config, options, text=text, stdout=stdout, stderr=stderr) as trainer:
        return trainer.fit()
