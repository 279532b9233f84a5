"""Deterministic evaluation: the mean loss of a model over a whole token sequence, and the
``python -m randygpt eval`` command that reports it (with perplexity) for a checkpoint.

The sequence is cut into non-overlapping windows of ``block_size`` inputs, in order, each
predicting the next ``block_size`` tokens; a last, shorter window covers the tail, so every
token after the first is predicted exactly once. No RNG and no dropout are involved: the same
checkpoint and text always give the same number, whatever the batch size (up to float
rounding) and thread count.
"""
import math
import sys
from pathlib import Path

import numpy as np

__all__ = ["evaluate", "main"]

# Stands for the trainer's built-in sample text in place of a path.
BUILTIN = "<built-in sample>"


def evaluate(model, tokens, block_size, batch_size):
    """Mean cross-entropy (nats per token) of ``model`` predicting ``tokens[1:]`` from the tokens
    before them, in windows of at most ``block_size`` (see the module docstring).

    model      : GPT; evaluated in eval mode, its previous mode restored afterwards
    tokens     : (n,) integer ids in [0, vocab_size), n >= 2
    block_size : window length, 1 <= block_size <= model.config.block_size
    batch_size : windows per forward pass, >= 1
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} {tokens.shape}")
    if tokens.size < 2:
        raise ValueError(f"tokens must hold at least 2 ids to predict one, got {tokens.size}")
    V = model.config.vocab_size
    if tokens.min() < 0 or tokens.max() >= V:
        raise ValueError(f"tokens must be in [0, {V}), got values in "
                         f"[{tokens.min()}, {tokens.max()}]")
    for name, value, hi in (("block_size", block_size, model.config.block_size),
                            ("batch_size", batch_size, None)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
        if hi is not None and value > hi:
            raise ValueError(f"{name} must be <= the model's block_size {hi}, got {value}")
    tokens = tokens.astype(np.int32, copy=False)
    T = int(block_size)
    n_targets = tokens.size - 1
    n_full = n_targets // T
    offsets = np.arange(T, dtype=np.int64)

    was_training = model.training
    model.eval()
    # Sum of per-token losses in float64: a mean of batch means weighted by their token counts,
    # so the result does not depend on how the windows were grouped into batches.
    total = 0.0
    try:
        for b0 in range(0, n_full, batch_size):
            starts = np.arange(b0, min(b0 + batch_size, n_full), dtype=np.int64) * T
            x = tokens[starts[:, None] + offsets]
            y = tokens[starts[:, None] + offsets + 1]
            total += float(model.forward(x, y)) * x.size
        tail = n_targets - n_full * T
        if tail:
            s = n_full * T
            x = tokens[None, s:s + tail]
            y = tokens[None, s + 1:s + 1 + tail]
            total += float(model.forward(np.ascontiguousarray(x), np.ascontiguousarray(y))) * tail
    finally:
        if was_training:
            model.train()
    return total / n_targets


def _recorded_data(extra):
    """Where the checkpoint's training text is, from what the trainer put in ``extra``.

    Returns (path, None), (BUILTIN, None) for the built-in sample, or (None, what the
    checkpoint records) when that is no readable file: a description alone is not enough.
    """
    path = extra.get("data_path")
    if isinstance(path, str) and path:
        return path, None
    data = extra.get("data")
    if isinstance(data, dict):
        path = data.get("path")
        if isinstance(path, str) and path:
            return path, None
        data = data.get("description")
    if isinstance(data, str) and data:
        if data.startswith("built-in sample"):
            return BUILTIN, None
        if Path(data).is_file():
            return data, None
        return None, data
    return None, None


def _build_parser():
    from .sample import ArgumentParser, _int_arg

    p = ArgumentParser(prog="randygpt eval",
                       description="Loss and perplexity of a checkpoint over a whole data split.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint file (.npz)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="text file (default: the one the checkpoint was trained on)")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="which split of the text to evaluate (default: val)")
    p.add_argument("--batch-size", type=_int_arg, default=None, metavar="B",
                   help="windows per forward pass (default: the checkpoint's batch_size)")
    p.add_argument("--threads", type=_int_arg, default=None, metavar="N",
                   help="kernel threads (default: RANDYGPT_NUM_THREADS or all usable CPUs)")
    return p


def main(argv=None):
    """``python -m randygpt eval ...``: prints loss and perplexity; returns the exit code."""
    from .checkpoint import CheckpointError, load_model
    from .data import BUILTIN_TEXT, DataError, Dataset, load_text
    from .sample import parse_args, report_error

    args, code = parse_args(_build_parser(), argv)
    if args is None:
        return code
    if args.batch_size is not None and args.batch_size < 1:
        return report_error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads == 0:
        return report_error("--threads must not be 0")
    try:
        model, tokenizer, ckpt = load_model(args.checkpoint, n_threads=args.threads)
    except CheckpointError as e:
        return report_error(e)
    data_path = args.data
    if data_path is None:
        data_path, recorded = _recorded_data(ckpt.extra)
        if data_path is None:
            said = f" (it records {recorded!r})" if recorded else ""
            return report_error(f"the checkpoint does not name a readable training file{said}; "
                                "pass --data PATH")
    val_fraction = ckpt.extra.get("val_fraction", 0.1)
    try:
        text = BUILTIN_TEXT if data_path is BUILTIN else load_text(data_path)
        dataset = Dataset(text, tokenizer, ckpt.config.block_size, val_fraction=val_fraction)
    except DataError as e:
        return report_error(e)
    except ValueError as e:
        return report_error(f"cannot split {data_path!r}: {e}")
    tokens = dataset.split(args.split)
    T = ckpt.config.block_size
    batch_size = args.batch_size or ckpt.config.batch_size
    loss = evaluate(model, tokens, T, batch_size)
    n_windows = math.ceil((tokens.size - 1) / T)
    print(f"{args.split} loss {loss:.4f} | perplexity {math.exp(loss):.3f} | "
          f"{tokens.size - 1:,} predicted tokens in {n_windows:,} windows of <= {T} "
          f"| checkpoint step {ckpt.step} | data {data_path}")
    sys.stdout.flush()
    return 0
