"""Deterministic evaluation: the mean loss of a model over a whole token sequence, and of a
checkpoint over a split of its text (what ``randygpt eval`` reports, with perplexity).

The sequence is cut into non-overlapping windows of ``block_size`` inputs, in order, each
predicting the next ``block_size`` tokens; a last, shorter window covers the tail, so every
token after the first is predicted exactly once. No RNG and no dropout are involved: the same
checkpoint and text always give the same number, whatever the batch size (up to float
rounding) and thread count.
"""
import dataclasses
import math
from pathlib import Path

import numpy as np

from .checkpoint import load_model
from .config import PRECISIONS
from .data import BUILTIN_TEXT, DataError, Dataset, TextTooShort, load_text

__all__ = ["evaluate", "evaluate_checkpoint", "EvalReport", "EvalError", "BUILTIN"]

# Stands for the trainer's built-in sample text in place of a path.
BUILTIN = "<built-in sample>"


class EvalError(ValueError):
    """A checkpoint cannot be evaluated as asked (no text to score, a split too short); one line."""


@dataclasses.dataclass
class EvalReport:
    """What evaluate_checkpoint measured."""

    loss: float             # mean cross-entropy, nats per predicted token
    split: str              # "val" or "train"
    n_tokens: int           # predicted tokens
    n_windows: int          # windows of at most block_size
    block_size: int
    step: int               # the checkpoint's training iterations
    data: str               # the text's path (or BUILTIN)
    bits_per_char: float = None  # the loss in bits per character of the split (compares tokenizers)
    precision: str = "fp32"      # the model's GEMMs while evaluating (Config.precision)

    @property
    def perplexity(self):
        return math.exp(self.loss)


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

    # Sum of per-token losses in float64: a mean of batch means weighted by their token counts,
    # so the result does not depend on how the windows were grouped into batches.
    total = 0.0
    with model.evaluating():
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


def evaluate_checkpoint(path, data=None, split="val", batch_size=None, n_threads=None,
                        precision=None):
    """The loss of the checkpoint at ``path`` over a whole split of a text, as an EvalReport.

    data       : text file to score; None: the one the checkpoint records it was trained on
    split      : "val" or "train", split as in training (the checkpoint's val fraction)
    batch_size : windows per forward pass (None: the checkpoint's); the result does not depend on it
    precision  : "fp32" or "bf16" (None: the checkpoint's own); a checkpoint's weights are fp32,
                 so one trained in either precision evaluates in either
    Raises CheckpointError, DataError or EvalError, each one line for the user.
    """
    if split not in ("val", "train"):
        raise EvalError(f"split must be 'val' or 'train', got {split!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise EvalError(f"batch size must be a positive integer, got {batch_size!r}")
    if precision is not None and precision not in PRECISIONS:
        raise EvalError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model, tokenizer, ckpt = load_model(path, n_threads=n_threads, precision=precision)
    if data is None:
        data, recorded = _recorded_data(ckpt.extra)
        if data is None:
            said = f" (it records {recorded!r})" if recorded else ""
            raise EvalError(f"the checkpoint does not name a readable training file{said}; "
                            "pass --data PATH")
    val_fraction = ckpt.extra.get("val_fraction", 0.1)
    text = BUILTIN_TEXT if data is BUILTIN else load_text(data)
    try:
        dataset = Dataset(text, tokenizer, ckpt.config.block_size, val_fraction=val_fraction)
    except TextTooShort as e:
        # The block size is the checkpoint's: only a longer text helps.
        raise TextTooShort(f"{e}; the checkpoint's block_size is {ckpt.config.block_size}, so "
                           "evaluate a longer text") from None
    except DataError:
        raise
    except ValueError as e:
        raise EvalError(f"cannot split {data!r}: {e}") from None
    tokens = dataset.split(split)
    T = ckpt.config.block_size
    loss = evaluate(model, tokens, T, batch_size or ckpt.config.batch_size)
    return EvalReport(loss=loss, split=split, n_tokens=int(tokens.size - 1),
                      n_windows=math.ceil((tokens.size - 1) / T), block_size=T, step=ckpt.step,
                      data=str(data), bits_per_char=dataset.bits_per_char(loss, split),
                      precision=model.config.precision)
