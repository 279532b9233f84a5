"""Every number of the model and the training recipe (SPEC.md), in one frozen dataclass.

A ``Config`` is validated when it is built, so the model, the optimizer and the trainer can
trust it. It round-trips through a JSON-able dict for checkpoints and run directories.
"""
import dataclasses
import math
from dataclasses import dataclass

__all__ = ["Config", "NORMS", "PRECISIONS"]

NORMS = ("rmsnorm", "layernorm")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Config:
    # --- model ---
    vocab_size: int = 67        # BOS, EOS + Tiny Shakespeare's 65 distinct characters
    n_embd: int = 256           # C, the residual stream width
    n_head: int = 8             # NH; head size HS = n_embd / n_head = 32
    n_layer: int = 6            # L, pre-norm transformer blocks
    block_size: int = 64        # longest context (T <= block_size); rows of wpe
    dropout: float = 0.1        # p on the outputs of wo and fc2, before the residual add
    norm: str = "rmsnorm"       # "rmsnorm" (no gain, as the seed) or "layernorm" (gain + bias)
    norm_eps: float = 1e-5      # added to the mean square (or variance) inside the sqrt
    # --- training ---
    batch_size: int = 32        # windows per step
    lr: float = 1e-3            # peak learning rate (the seed's 3e-5 learns far too slowly)
    warmup_iters: int = 100     # linear warmup length, in iterations
    warmup_start: float = 0.1   # learning rate at iteration 0, as a fraction of the peak
    decay_start: float = 0.8    # cosine decay begins at this fraction of the run
    min_lr_ratio: float = 0.1   # final learning rate, as a fraction of the peak
    beta1: float = 0.9          # AdamW first-moment decay
    beta2: float = 0.999        # AdamW second-moment decay
    adam_eps: float = 1e-8      # AdamW denominator epsilon
    weight_decay: float = 0.01  # decoupled decay, on matrices only
    grad_clip: float = 1.0      # global gradient-norm clip (0 turns clipping off)
    # GEMM operands: "fp32", or "bf16" (rounded to bf16 as the GEMMs pack them, summed in
    # fp32; weights, gradients, AdamW, loss, softmax and norms stay fp32)
    precision: str = "fp32"
    seed: int = 1337            # initialisation, batches and dropout masks

    def __post_init__(self):
        for name in ("vocab_size", "n_embd", "n_head", "n_layer", "block_size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if isinstance(self.warmup_iters, bool) or not isinstance(self.warmup_iters, int) \
                or self.warmup_iters < 0:
            raise ValueError(f"warmup_iters must be a non-negative int, got {self.warmup_iters!r}")
        # The dropout kernels key their masks with the seed as a 64-bit unsigned integer.
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {self.seed!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        self._check_float("dropout", lo=0.0, hi=1.0, hi_open=True)
        self._check_float("norm_eps", lo=0.0, lo_open=True)
        self._check_float("lr", lo=0.0, lo_open=True)
        self._check_float("warmup_start", lo=0.0, hi=1.0)
        self._check_float("decay_start", lo=0.0, hi=1.0)
        self._check_float("min_lr_ratio", lo=0.0, hi=1.0)
        self._check_float("beta1", lo=0.0, hi=1.0, hi_open=True)
        self._check_float("beta2", lo=0.0, hi=1.0, hi_open=True)
        self._check_float("adam_eps", lo=0.0, lo_open=True)
        self._check_float("weight_decay", lo=0.0)
        self._check_float("grad_clip", lo=0.0)

    def _check_float(self, name, lo=None, hi=None, lo_open=False, hi_open=False):
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        bad_lo = lo is not None and (value <= lo if lo_open else value < lo)
        bad_hi = hi is not None and (value >= hi if hi_open else value > hi)
        if bad_lo or bad_hi:
            if hi is None:
                rule = f"{'>' if lo_open else '>='} {lo}"
            else:
                rule = f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise ValueError(f"{name} must be {rule}, got {value}")

    @property
    def head_size(self):
        """HS = C / NH."""
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self):
        """H = 4C, the MLP's hidden width."""
        return 4 * self.n_embd

    def to_dict(self):
        """A JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Build a Config from ``to_dict()``'s output; unknown keys are an error, missing keys
        take their defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(map(str, unknown))}")
        return cls(**d)

    def replace(self, **kw):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **kw)
