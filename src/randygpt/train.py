"""The training loop: data, model and optimizer set up (fresh or resumed), the step, periodic
evaluation, logging, metrics, checkpoints, and the end-of-run samples.

This module does not parse arguments (cli.py does); it and cli.py are the only modules that
print. Randomness comes from three generators derived from ``config.seed``, each with one job,
so none perturbs another: batch positions (saved in checkpoints for exact resume), evaluation
batches, and sampling. Model init and dropout take the seed directly.
"""
import csv
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .data import SHAKESPEARE_URL, DataError, Dataset, resolve_source
from .tokenizer import CharTokenizer

__all__ = ["RunOptions", "RunResult", "TrainError", "run", "estimate_loss", "SAMPLE_PROMPTS",
           "format_duration", "METRICS_HEADER",
           # run()'s building blocks, for a trainer that must reproduce its runs exactly (the
           # PyTorch twin, benchmarks/torch_train.py): the same random streams, output
           # directory, metrics file, log lines and plot.
           "BATCH_STREAM", "EVAL_STREAM", "SAMPLE_STREAM", "Logger", "build_config",
           "default_out_dir", "prepare_out_dir", "open_metrics", "format_rate", "write_plot",
           "progress_line", "metrics_row"]

SAMPLE_PROMPTS = ("ROMEO:", "To be or not to be", "Once upon a time")
METRICS_HEADER = ("iter", "train_loss", "val_loss", "lr", "tok_per_s", "elapsed_s")

# Stream tags mixed with config.seed: np.random.default_rng([seed, tag]) gives independent
# generators, so evaluating or sampling never shifts the batch positions training sees.
BATCH_STREAM = 1
EVAL_STREAM = 2
SAMPLE_STREAM = 3


class TrainError(ValueError):
    """Bad user input found while setting a run up (config, resume file, output directory):
    the message is one line meant for the user."""


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


def _check_int(name, value, lo=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TrainError(f"{name} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise TrainError(f"{name} must be >= {lo}, got {value}")


def format_duration(seconds):
    """Seconds as '4m10s', '1h02m', '37s' (an ETA needs no more precision)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def progress_line(step, iters, mean_loss, last_val, lr, best_val, tok_per_s, eta_s):
    """The log line printed every log_every iterations."""
    return (f"Iter {step}/{iters} | Loss {mean_loss:.3f} | Val {last_val:.3f} | LR {lr:.1e} | "
            f"Best {best_val:.3f} | {format_rate(tok_per_s)} | ETA {format_duration(eta_s)}")


def metrics_row(step, train_loss, val_loss, lr, tok_per_s, elapsed_s):
    """One metrics.csv row (METRICS_HEADER's columns). val_loss is None on rows without an
    evaluation, tok_per_s None before the first step; their cells stay empty, so a plot
    shows only measured points."""
    return [step, f"{train_loss:.6f}", "" if val_loss is None else f"{val_loss:.6f}",
            f"{lr:.6e}", "" if tok_per_s is None else f"{tok_per_s:.1f}", f"{elapsed_s:.3f}"]


def format_rate(tok_per_s):
    """Tokens per second as the log line shows them: "12,345 tok/s"."""
    return f"{tok_per_s:,.0f} tok/s"


def estimate_loss(model, dataset, batch_size, eval_iters, rng):
    """Mean loss over ``eval_iters`` random batches of each split, in eval mode (no dropout).

    Uses the training batch shape so the model's activation arena is not re-allocated. The
    model's train/eval mode is restored afterwards. Returns {"train": float, "val": float}.
    """
    was_training = model.training
    model.eval()
    try:
        out = {}
        for split in ("train", "val"):
            total = 0.0
            for _ in range(eval_iters):
                x, y = dataset.get_batch(split, batch_size, rng)
                total += float(model.forward(x, y))
            out[split] = total / eval_iters
        return out
    finally:
        if was_training:
            model.train()


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


class Logger:
    """Log lines to a stream: plain lines when it is not a terminal; on a terminal the line is
    redrawn in place with \\r and kept (newline) at each evaluation."""

    def __init__(self, stream):
        self.stream = stream
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._open_line = False

    def line(self, text):
        self.end_progress()
        print(text, file=self.stream, flush=True)

    def progress(self, text, keep):
        if self.tty:
            # \033[K clears what a longer previous line left behind.
            self.stream.write("\r" + text + "\033[K")
            if keep:
                self.stream.write("\n")
            self._open_line = not keep
            self.stream.flush()
        else:
            print(text, file=self.stream, flush=True)

    def end_progress(self):
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


def default_out_dir():
    """runs/<UTC date-time>, with -2, -3, ... appended when that directory exists."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / stamp
    path, n = base, 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    return path


def prepare_out_dir(path):
    """Create the output directory (and its parents); TrainError when that is impossible."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TrainError(f"output path {str(path)!r} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainError(f"cannot create output directory {str(path)!r}: {e.strerror or e}") from None
    return path


def open_metrics(path, keep_until):
    """Open metrics.csv for appending. A resumed run keeps the rows up to its checkpoint's step and
    drops later ones (logged by a run that died before saving), so the file stays one curve."""
    rows = []
    if keep_until is not None and path.is_file():
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is not None and tuple(header) == METRICS_HEADER:
                for row in reader:
                    try:
                        if row and int(row[0]) <= keep_until:
                            rows.append(row)
                    except ValueError:
                        continue
    f = open(path, "w", newline="")
    writer = csv.writer(f)
    writer.writerow(METRICS_HEADER)
    writer.writerows(rows)
    f.flush()
    return f, writer


def build_config(overrides, vocab_size=None, base=None):
    """Config(**overrides), or base with overrides applied; vocab_size, when given, replaces
    the config's. A bad value is a TrainError with a one-line message."""
    from .config import Config
    try:
        if base is None:
            cfg = Config(**overrides)
        else:
            cfg = base.replace(**overrides)
        if vocab_size is not None:
            cfg = cfg.replace(vocab_size=vocab_size)
        return cfg
    except (TypeError, ValueError) as e:
        raise TrainError(f"invalid configuration: {e}") from None


def write_plot(out_dir, log):
    """Draw the run's loss curves into out_dir and log where; a failure is a note, not an error."""
    from .plot import PlotError, plot_run
    try:
        log.line(f"Plot: {plot_run(out_dir)}")
    except (PlotError, OSError) as e:
        # The run itself succeeded; a missing matplotlib must not turn it into a failure.
        log.line(f"note: no plot written: {e}")


def run(config=None, options=None, *, stdout=None, stderr=None):
    """Train (or resume) and return a RunResult.

    config  : a Config for a fresh run (its vocab_size is replaced by the data's), or None to
              build one from ``options.overrides`` (on resume: the checkpoint's, with overrides)
    options : RunOptions
    Raises TrainError, DataError or CheckpointError (all ValueError, one-line messages) for bad
    input found before the first step. Ctrl-C / SIGTERM end the loop cleanly: a checkpoint is
    saved and the result says ``interrupted``.
    """
    from threadpoolctl import threadpool_limits

    from . import checkpoint as ckpt_mod
    from ._kernels import effective_n_threads, openmp_enabled, physical_cores, usable_cpus

    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    log = Logger(out)
    opts = options
    if opts is None:
        raise TrainError("options are required")

    # ---- configuration, data, model: all input checks happen before any output file exists ----
    resumed = None
    if opts.resume is not None:
        resumed = ckpt_mod.load(opts.resume)
        if resumed.adam_m is None or resumed.rng_state is None:
            raise TrainError(f"checkpoint {opts.resume!r} has no optimizer or batch-RNG state: "
                             "it cannot be resumed exactly")
        if config is not None:
            raise TrainError("pass either a config or a checkpoint to resume, not both")
        conflicts = {k: v for k, v in opts.overrides.items()
                     if getattr(resumed.config, k) != v}
        if conflicts:
            names = ", ".join(f"{k}={v!r} (checkpoint has {getattr(resumed.config, k)!r})"
                              for k, v in sorted(conflicts.items()))
            raise TrainError(f"cannot change settings when resuming, for an exact continuation: {names}")
        config = resumed.config
        tokenizer = resumed.tokenizer
        start = resumed.step
        if start >= opts.iters:
            raise TrainError(f"checkpoint is already at iteration {start}; ask for more than "
                             f"{start} iterations to continue")
    else:
        config = build_config(opts.overrides, base=config)
        tokenizer = None
        start = 0
    if opts.stop_at is not None and opts.stop_at <= start:
        raise TrainError(f"stop_at ({opts.stop_at}) must be after the starting iteration ({start})")

    source = resolve_source(opts.data_path, opts.cache_dir, url=opts.data_url)
    if tokenizer is None:
        tokenizer = CharTokenizer.from_text(source.text)
        config = build_config({}, vocab_size=tokenizer.vocab_size, base=config)
    try:
        dataset = Dataset(source.text, tokenizer, config.block_size)
    except DataError as e:
        trained_on = resumed.extra.get("data") if resumed is not None else None
        if not isinstance(trained_on, dict) or not trained_on.get("description"):
            raise
        raise DataError(f"{e} (the checkpoint was trained on {trained_on['description']}; pass "
                        "that text with --data)") from None

    # Imported only now so that bad input is reported before the kernels load.
    from .model import GPT
    from .optim import AdamW, clip_scale, lr_at

    n_threads = effective_n_threads(opts.n_threads)
    try:
        model = GPT(config, seed=config.seed, n_threads=n_threads)
        optimizer = AdamW(model, config, n_threads=n_threads)
    except MemoryError:
        raise TrainError("not enough memory for this model and batch size; choose smaller "
                         "--n-embd, --n-layer or --batch-size") from None
    batch_rng = np.random.default_rng([config.seed, BATCH_STREAM])
    best_val = math.inf
    if resumed is not None:
        model.load_flat_params(resumed.params)
        optimizer.load_state_dict(resumed.optimizer_state())
        # Copied into the model and optimizer: the checkpoint's own arrays would otherwise stay
        # alive for the whole run, 55 MiB at the default size.
        resumed.params = resumed.adam_m = resumed.adam_v = None
        try:
            batch_rng.bit_generator.state = resumed.rng_state
        except (TypeError, ValueError, KeyError) as e:
            raise TrainError(f"checkpoint {opts.resume!r} has an unusable RNG state: {e}") from None
        best_val = float(resumed.extra.get("best_val", math.inf) or math.inf)

    if opts.out_dir is not None:
        out_dir = Path(opts.out_dir)
    elif resumed is not None:
        out_dir = Path(opts.resume).resolve().parent
    else:
        out_dir = default_out_dir()
    out_dir = prepare_out_dir(out_dir)
    ckpt_path = out_dir / "ckpt.npz"
    if resumed is None and ckpt_path.exists():
        # A fresh run would overwrite that run's weights and metrics.
        raise TrainError(f"{str(out_dir)!r} already holds a run (ckpt.npz); continue it with "
                         f"--resume {ckpt_path} or choose another --out")
    metrics_path = out_dir / "metrics.csv"

    # ---- start-up report ----
    if source.warning:
        print(f"randygpt: warning: {source.warning}", file=err, flush=True)
    log.line("randygpt " + ("resuming " + str(opts.resume) + f" at iteration {start}"
                            if resumed is not None else "training from scratch"))
    fields = config.to_dict()
    model_keys = ("vocab_size", "n_embd", "n_head", "n_layer", "block_size", "dropout", "norm",
                  "norm_eps")
    log.line("Model: " + " ".join(f"{k}={fields[k]}" for k in model_keys if k in fields))
    log.line("Training: " + " ".join(f"{k}={v}" for k, v in fields.items() if k not in model_keys))
    log.line(f"Parameters: {model.num_params:,}")
    log.line(f"Data: {source.description}; train {len(dataset.train):,} / val {len(dataset.val):,} "
             f"tokens; vocab {tokenizer.vocab_size}")
    log.line(f"openmp={'yes' if openmp_enabled() else 'no'} threads={n_threads} "
             f"(this process may use {physical_cores()} cores, {usable_cpus()} logical CPUs)")
    log.line(f"Iterations: {start} -> {opts.iters}"
             + (f" (stopping at {opts.stop_at})" if opts.stop_at is not None else "")
             + f"; output: {out_dir}")
    if resumed is not None and resumed.extra.get("iters") not in (None, opts.iters):
        log.line(f"note: the checkpoint was trained for a {resumed.extra['iters']}-iteration "
                 f"schedule; the learning rate now follows a {opts.iters}-iteration one")
    run_info = {"config": config.to_dict(), "tokenizer": tokenizer.to_dict(),
                "data": source.description, "iters": opts.iters, "n_threads": n_threads,
                "resumed_from": str(opts.resume) if opts.resume else None,
                "options": {k: v for k, v in dataclasses.asdict(opts).items()
                            if k not in ("overrides",)}}
    with open(out_dir / "config.json", "w") as f:
        json.dump(run_info, f, indent=2, default=str)
        f.write("\n")

    B, T = config.batch_size, config.block_size
    eval_rng_seed = [config.seed, EVAL_STREAM]
    end = opts.iters if opts.stop_at is None else min(opts.iters, opts.stop_at)
    losses = []
    saved = None
    last_val = math.nan
    final_estimate = None
    diverged = None  # the iteration whose loss was not finite

    def evaluate():
        # A fresh generator each time: every evaluation scores the same batches, so changes
        # between evaluations come from the model, and resuming reproduces them.
        return estimate_loss(model, dataset, B, opts.eval_iters, np.random.default_rng(eval_rng_seed))

    def save(step):
        nonlocal saved
        # "data" tells `randygpt eval` which text to score by default.
        extra = {"iters": opts.iters, "best_val": best_val if math.isfinite(best_val) else None,
                 "data": {"path": source.path, "description": source.description},
                 "last_loss": losses[-1] if losses else None}
        ckpt_mod.save(ckpt_path, model=model, optimizer=optimizer, tokenizer=tokenizer, step=step,
                      rng_state=batch_rng.bit_generator.state, extra=extra)
        saved = ckpt_path

    metrics_file, metrics = open_metrics(metrics_path, start if resumed is not None else None)
    step = start
    try:
        with _StopFlag() as stop, threadpool_limits(1, "blas"):
            model.train()
            first_estimate = evaluate()
            last_val = first_estimate["val"]
            best_val = min(best_val, last_val)
            log.line(f"Initial loss estimate: train {first_estimate['train']:.4f} | "
                     f"val {first_estimate['val']:.4f}")
            if start == 0:
                # The curve starts at the untrained model (a resumed run already has this row).
                metrics.writerow(metrics_row(0, first_estimate["train"], first_estimate["val"],
                                            lr_at(0, opts.iters, config), None, 0.0))
                metrics_file.flush()
            t_start = time.perf_counter()
            t_mark, it_mark, loss_sum = t_start, step, 0.0
            train_time = 0.0  # seconds spent in steps since t_mark (evaluation excluded)
            for it in range(start, end):
                if stop:
                    break
                t0 = time.perf_counter()
                lr = lr_at(it, opts.iters, config)
                x, y = dataset.get_batch("train", B, batch_rng)
                loss = model.forward(x, y, step=it)
                if not math.isfinite(loss):
                    # Stop before the update: the weights stay finite and the last checkpoint
                    # written stays the one to go back to.
                    diverged = it + 1
                    log.line(f"Iter {it + 1}: the loss is {loss}; stopping without saving "
                             "(try a lower --lr)")
                    break
                model.backward()
                norm = optimizer.grad_norm()
                scale = clip_scale(norm, config.grad_clip)
                optimizer.step(lr, grad_scale=scale)
                step = it + 1
                train_time += time.perf_counter() - t0
                losses.append(loss)
                loss_sum += loss

                # The last iteration is always evaluated: that is the final loss estimate.
                evaluated = step == end or (opts.eval_every > 0 and step % opts.eval_every == 0)
                if evaluated:
                    estimate = evaluate()
                    last_val = estimate["val"]
                    best_val = min(best_val, last_val)
                    if step == end:
                        final_estimate = estimate
                if step % opts.log_every == 0 or evaluated:
                    n = step - it_mark
                    tok_s = n * B * T / train_time if train_time > 0 else math.inf
                    now = time.perf_counter()
                    per_it = (now - t_mark) / n
                    eta = per_it * (end - step)
                    mean_loss = loss_sum / n
                    log.progress(progress_line(step, opts.iters, mean_loss, last_val, lr,
                                               best_val, tok_s, eta), keep=evaluated)
                    metrics.writerow(metrics_row(step, mean_loss, last_val if evaluated else None,
                                                 lr, tok_s, now - t_start))
                    metrics_file.flush()
                    t_mark, it_mark, loss_sum, train_time = now, step, 0.0, 0.0
                if opts.save_every > 0 and step % opts.save_every == 0 and step < end:
                    save(step)
            log.end_progress()
            interrupted = stop.signal_name
            if diverged is None:
                save(step)
    except KeyboardInterrupt:
        # A second Ctrl-C inside a step: the state may be half-updated, so nothing is saved.
        log.end_progress()
        metrics_file.close()
        log.line(f"Interrupted again at iteration {step}; not saving. Last checkpoint: "
                 f"{saved if saved else 'none'}")
        raise
    finally:
        if not metrics_file.closed:
            metrics_file.close()

    result = RunResult(out_dir=out_dir, checkpoint=saved, step=step, iters=opts.iters,
                       losses=losses, first_estimate=first_estimate, final_estimate=final_estimate,
                       best_val=best_val, interrupted=interrupted, diverged=diverged)
    if interrupted or diverged:
        return result
    if final_estimate is not None:
        log.line(f"Final loss estimate: train {final_estimate['train']:.4f} | "
                 f"val {final_estimate['val']:.4f} (started at {first_estimate['val']:.4f})")
    log.line(f"Checkpoint: {saved}")
    if opts.sample and opts.sample_tokens > 0 and step == opts.iters:
        # Training is over: its activations and AdamW moments would only add to the run's
        # peak memory while the samples are drawn.
        model.release_buffers()
        optimizer = None
        result.samples = _print_samples(model, tokenizer, config, opts, log)
    if opts.plot:
        write_plot(out_dir, log)
    return result


def _print_samples(model, tokenizer, config, opts, log):
    from .sample import generate
    rng = np.random.default_rng([config.seed, SAMPLE_STREAM])
    samples = {}
    for prompt in SAMPLE_PROMPTS:
        missing = tokenizer.unknown_chars(prompt)
        if missing:
            log.line(f"\n--- {prompt!r}: skipped, the vocabulary lacks "
                     f"{', '.join(repr(c) for c in missing)}")
            continue
        text = generate(model, tokenizer, prompt, opts.sample_tokens, temperature=0.8,
                        top_p=0.9, top_k=None, rng=rng)
        samples[prompt] = prompt + text
        log.line(f"\n--- {prompt!r} (temperature 0.8, top-p 0.9)\n{prompt}{text}")
    return samples
