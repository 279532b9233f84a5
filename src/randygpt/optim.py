"""AdamW on the flat parameter buffer, the learning-rate schedule and global-norm clipping.

The optimizer never sees named views: params, grads and both moments are flat (P,) arrays with
one layout, and weight decay is given as runs of that layout, so a step is one fused kernel call
per run (one in all for the default model, whose parameters are all matrices).
"""
import math

import numpy as np

from ._kernels import adamw as _adamw
from ._kernels import effective_n_threads

__all__ = ["AdamW", "lr_at", "clip_scale", "decay_runs"]


def decay_runs(flags):
    """[(start, end, decay)] for the maximal runs of equal values in a 1-D bool sequence."""
    flags = np.asarray(flags, dtype=bool)
    if flags.ndim != 1:
        raise ValueError(f"decay flags must be 1-D, got shape {flags.shape}")
    if flags.size == 0:
        return []
    edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    starts = [0] + edges.tolist()
    ends = edges.tolist() + [flags.size]
    return [(s, e, bool(flags[s])) for s, e in zip(starts, ends)]


class AdamW:
    """Decoupled-weight-decay Adam (PyTorch's arithmetic) on flat float32 buffers.

    model_or_flat_buffers: a GPT (its flat_params, flat_grads and decay_spans are used) or a
    tuple (params, grads, decay_mask) of (P,) arrays (float32, float32, uint8: nonzero where
    weight decay applies); the mask is read once, into runs, and not kept.
    """

    def __init__(self, model_or_flat_buffers, config, n_threads=None):
        if isinstance(model_or_flat_buffers, tuple):
            params, grads, decay_mask = model_or_flat_buffers
            arrays = (("params", params, np.float32), ("grads", grads, np.float32),
                      ("decay_mask", decay_mask, np.uint8))
        else:
            m = model_or_flat_buffers
            params, grads, decay_mask = m.flat_params, m.flat_grads, None
            arrays = (("params", params, np.float32), ("grads", grads, np.float32))
        for name, arr, dtype in arrays:
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype or arr.ndim != 1:
                raise TypeError(f"{name} must be a 1-D {np.dtype(dtype).name} array")
            if arr.shape != params.shape:
                raise ValueError(f"{name} shape {arr.shape} != params shape {params.shape}")
        self.params, self.grads = params, grads
        # [(start, end, decay)] covering the buffer in order, neighbours differing in decay.
        self.decay_spans = (decay_runs(decay_mask != 0) if decay_mask is not None
                            else list(model_or_flat_buffers.decay_spans))
        self.config = config
        # Resolved once (None: randygpt's default now); every step uses this int.
        self.n_threads = effective_n_threads(n_threads)
        self.m = np.zeros_like(params)
        self.v = np.zeros_like(params)
        self.t = 0

    def grad_norm(self):
        """Global L2 norm of the gradient buffer (thread-count independent)."""
        return float(_adamw.grad_norm(self.grads, self.n_threads))

    def step(self, lr, grad_scale=1.0):
        """One update with learning rate lr; the gradient is multiplied by grad_scale first
        (clip_scale's result)."""
        c = self.config
        self.t += 1
        nt = self.n_threads
        for lo, hi, decay in self.decay_spans:
            _adamw.adamw_step(self.params[lo:hi], self.grads[lo:hi], self.m[lo:hi],
                              self.v[lo:hi], decay, float(lr), c.beta1, c.beta2, c.adam_eps,
                              c.weight_decay, self.t, float(grad_scale), nt)

    def state_dict(self):
        return {"m": self.m, "v": self.v, "t": self.t}

    def load_state_dict(self, d):
        for key in ("m", "v"):
            arr = np.asarray(d[key])
            if arr.shape != self.params.shape:
                raise ValueError(f"optimizer state {key!r} has shape {arr.shape}, "
                                 f"expected {self.params.shape}")
            np.copyto(getattr(self, key), arr, casting="same_kind")
        t = d["t"]
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
            raise ValueError(f"optimizer state 't' must be a non-negative int, got {t!r}")
        self.t = int(t)


def lr_at(it, total_iters, config):
    """Learning rate at iteration it (0-based) of a total_iters run.

    Linear warmup over config.warmup_iters from warmup_start*lr to lr, constant until
    decay_start*total_iters, then a cosine down to min_lr_ratio*lr reached at the last
    iteration (total_iters - 1), whatever the run's length. Warmup wins if a short run makes
    the two overlap.
    """
    if total_iters < 1:
        raise ValueError(f"total_iters must be >= 1, got {total_iters}")
    if not 0 <= it < total_iters:
        raise ValueError(f"it must be in [0, {total_iters}), got {it}")
    peak = config.lr
    if it < config.warmup_iters:
        frac = it / config.warmup_iters
        return peak * (config.warmup_start + (1.0 - config.warmup_start) * frac)
    decay_from = config.decay_start * total_iters
    last = total_iters - 1
    if it < decay_from and it < last:
        return peak
    frac = 1.0 if last <= decay_from else (it - decay_from) / (last - decay_from)
    min_lr = config.min_lr_ratio * peak
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * frac))


def clip_scale(grad_norm, max_norm):
    """Factor that brings the global gradient norm down to max_norm (1 when already below,
    and when max_norm is 0, which turns clipping off)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (grad_norm + 1e-6))
