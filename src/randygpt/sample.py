"""Text generation: incremental decoding with a KV cache and temperature / top-k / top-p
sampling (``randygpt sample`` is its command line, in randygpt.cli.sample).

Decoding with the cache runs one position per step: the new token's query attends to the keys
and values every layer has cached for the earlier tokens of the window, so a step costs one
matrix-vector product per weight matrix instead of a forward pass over the whole window. The
weights are read in place from ``model.params`` (never copied); the step's products run through
NumPy's BLAS on one thread (``threadpool_limits``), as matrix-vector products for the one-row
steps. ``benchmarks/bench_sample.py`` measured that about 3.6x faster than our GEMM kernel at
M = 1 row (1,024 vs 284 tokens/s on the default model, one thread, 2-core EPYC under a load of
about 3; 128 tokens/s without the cache): the kernel is built for many rows and packs the whole
weight matrix into panels on every call, pure overhead for one row.

The context window (the same rule with and without the cache, so both give the same text):
the model has learned absolute positions for ``block_size`` slots, so it never sees more than
``block_size`` tokens. A prompt longer than that is cut to its last ``block_size`` tokens.
Tokens are appended to the window until it holds ``block_size`` tokens; the next token then
makes the window slide: it restarts from the last ``block_size // 2`` tokens (the new one
included), at positions 0, 1, ... . Because every cached key and value depends on its token's
absolute position, sliding invalidates the whole cache, which is rebuilt from those tokens in
one batched pass. Halving the window (rather than dropping one token per step) is what keeps
the rebuild cost to one pass every ``block_size - block_size // 2`` tokens; the price is that
right after a slide the model conditions on half a window of text.

Each step's logits equal those of ``model.forward`` on exactly the window's tokens (the tests
check this to rtol 1e-4), so the cache changes speed, not results.
"""
import math

import numpy as np
from threadpoolctl import threadpool_limits

__all__ = ["generate", "KVCache", "ContextWindow", "sample_token", "check_sampling_args",
           "window_keep"]


def window_keep(block_size):
    """How many tokens the window keeps when it slides (see the module docstring)."""
    return max(1, block_size // 2)


class KVCache:
    """Per-layer keys and values of the tokens of the current window, and the incremental
    forward pass that fills them.

    k, v : (L, block_size, C) float32; rows [0, length) hold the window's tokens in order.
    Only eval-mode forward is possible (no dropout): this is for generation.
    """

    def __init__(self, model, use_kernel=False):
        cfg = model.config
        # use_kernel: run the products through our GEMM kernel instead of NumPy's BLAS; only
        # for the benchmark that justifies the default (see the module docstring).
        self.use_kernel = bool(use_kernel)
        if self.use_kernel:
            from ._kernels.matmul import matmul_forward
            self._matmul_forward = matmul_forward
        self.model = model
        self.config = cfg
        C, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size
        self.k = np.zeros((L, T, C), dtype=np.float32)
        self.v = np.zeros((L, T, C), dtype=np.float32)
        self.length = 0
        p = model.params
        self._wte, self._wpe, self._lm_head = p["wte"], p["wpe"], p["lm_head"]
        self._layers = []
        for i in range(L):
            self._layers.append({
                # q, k and v in one (3C, C) product when the three matrices are adjacent in the
                # flat buffer (they are in the standard table); a view, so still no copy.
                "wqkv": self._stacked_view(model, [f"h.{i}.wq", f"h.{i}.wk", f"h.{i}.wv"]),
                "wq": p[f"h.{i}.wq"], "wk": p[f"h.{i}.wk"], "wv": p[f"h.{i}.wv"],
                "wo": p[f"h.{i}.wo"], "fc1": p[f"h.{i}.fc1"], "fc2": p[f"h.{i}.fc2"],
                "norm1": self._norm_params(model, i, 1), "norm2": self._norm_params(model, i, 2),
            })
        self._scale = 1.0 / math.sqrt(cfg.head_size)

    @staticmethod
    def _stacked_view(model, names):
        """One (len(names) * OC, IC) view over matrices that follow each other in the flat
        buffer with the same shape, or None if they do not."""
        table = model.table
        start, size = table.span(names[0])
        shape = model.params[names[0]].shape
        for j, name in enumerate(names):
            if table.span(name) != (start + j * size, size) or model.params[name].shape != shape:
                return None
        return model.flat_params[start:start + len(names) * size].reshape(len(names) * shape[0],
                                                                          shape[1])

    @staticmethod
    def _norm_params(model, layer, which):
        """(weight, bias) views of LayerNorm ``which`` (1 before attention, 2 before the MLP),
        None for RMSNorm, which has no parameters."""
        if model.config.norm == "rmsnorm":
            return None
        p = model.params
        return p[f"h.{layer}.ln{which}.weight"], p[f"h.{layer}.ln{which}.bias"]

    def reset(self):
        self.length = 0

    def _linear(self, x, w):
        """x (n, IC) @ w (OC, IC)^T -> (n, OC) float32, reading w in place."""
        if not self.use_kernel:
            if x.shape[0] == 1:
                # One row: a matrix-vector product (BLAS gemv) ran about 2x faster than the
                # same product as a one-row gemm.
                return (w @ x[0])[None, :]
            return x @ w.T
        out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
        self._matmul_forward(out, np.ascontiguousarray(x), w, 1)
        return out

    def _norm(self, x, params):
        # Mean and variance in float64, as the kernels do; the result is stored as float32.
        # np.add.reduce rather than np.mean: the same sum without np.mean's Python wrapper,
        # which was a visible share of a one-token step.
        eps = self.config.norm_eps
        C = x.shape[-1]
        x64 = x.astype(np.float64)
        if params is None:
            rstd = 1.0 / np.sqrt(np.add.reduce(x64 * x64, axis=-1, keepdims=True) / C + eps)
            return x * rstd.astype(np.float32)
        mean = np.add.reduce(x64, axis=-1, keepdims=True) / C
        centred = x64 - mean
        rstd = 1.0 / np.sqrt(np.add.reduce(centred * centred, axis=-1, keepdims=True) / C + eps)
        weight, bias = params
        return (centred * rstd * weight + bias).astype(np.float32)

    def forward(self, idx):
        """Append the tokens ``idx`` (n,) to the window and return their logits (n, V) float32.

        The new tokens sit at positions length .. length+n-1; each attends causally to every
        cached token and to the new ones before it.
        """
        idx = np.asarray(idx)
        n = idx.shape[0]
        cfg = self.config
        C, NH, HS = cfg.n_embd, cfg.n_head, cfg.head_size
        t0 = self.length
        t1 = t0 + n
        if n < 1 or t1 > cfg.block_size:
            raise ValueError(f"idx: cannot add {n} tokens to a window of {t0} "
                             f"(block_size {cfg.block_size})")
        x = self._wte[idx] + self._wpe[t0:t1]                                 # (n, C)
        # Causal mask of the new queries against every key in the window: query i sits at t0+i.
        future = np.arange(t1)[None, :] > (t0 + np.arange(n))[:, None]       # (n, t1)
        for li, w in enumerate(self._layers):
            h = self._norm(x, w["norm1"])
            if w["wqkv"] is not None:
                qkv = self._linear(h, w["wqkv"])                              # (n, 3C)
                q, k, v = qkv[:, :C], qkv[:, C:2 * C], qkv[:, 2 * C:]
            else:
                q, k, v = (self._linear(h, w[name]) for name in ("wq", "wk", "wv"))
            self.k[li, t0:t1] = k
            self.v[li, t0:t1] = v
            qh = q.reshape(n, NH, HS).transpose(1, 0, 2)                      # (NH, n, HS)
            kh = self.k[li, :t1].reshape(t1, NH, HS).transpose(1, 2, 0)       # (NH, HS, t1)
            vh = self.v[li, :t1].reshape(t1, NH, HS).transpose(1, 0, 2)       # (NH, t1, HS)
            scores = (qh @ kh).astype(np.float64) * self._scale              # (NH, n, t1)
            scores[:, future] = -np.inf
            # Max subtraction keeps exp() finite; sums in float64 as the attention kernel does.
            scores -= scores.max(axis=-1, keepdims=True)
            att = np.exp(scores)
            att /= att.sum(axis=-1, keepdims=True)
            y = (att.astype(np.float32) @ vh).transpose(1, 0, 2).reshape(n, C)  # (n, C)
            x += self._linear(y, w["wo"])
            h = self._norm(x, w["norm2"])
            hidden = self._linear(h, w["fc1"])                                # (n, 4C)
            np.maximum(hidden, 0, out=hidden)
            hidden *= hidden
            x += self._linear(hidden, w["fc2"])
        self.length = t1
        return self._linear(x, self._lm_head)                                 # (n, V)


class ContextWindow:
    """The tokens the model conditions on, with the sliding rule of the module docstring.

    ``start(ids)`` and ``push(token)`` return the logits (V,) that predict the next token.
    With ``use_cache`` the logits come from a KVCache; without, from ``model.forward`` on the
    whole window (the reference, and the slow path the benchmark compares against).
    """

    def __init__(self, model, use_cache=True, use_kernel=False):
        self.model = model
        self.block_size = model.config.block_size
        self.keep = window_keep(self.block_size)
        self.cache = KVCache(model, use_kernel=use_kernel) if use_cache else None
        self.tokens = []
        self.rebuilds = 0

    def _logits_of_window(self):
        if self.cache is None:
            idx = np.asarray(self.tokens, dtype=np.int32)[None, :]
            return self.model.forward(idx)[0, -1]
        self.cache.reset()
        return self.cache.forward(np.asarray(self.tokens, dtype=np.int64))[-1]

    def start(self, ids):
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("ids: the context needs at least one token")
        self.tokens = ids[-self.block_size:]
        return self._logits_of_window()

    def push(self, token):
        token = int(token)
        if len(self.tokens) < self.block_size:
            self.tokens.append(token)
            if self.cache is None:
                return self._logits_of_window()
            return self.cache.forward(np.array([token]))[0]
        self.tokens = (self.tokens + [token])[-self.keep:]
        self.rebuilds += 1
        return self._logits_of_window()


def check_sampling_args(max_new_tokens, temperature, top_p, top_k):
    """Validate sampling settings; TypeError/ValueError naming the argument."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")


def sample_token(logits, temperature, top_p, top_k, rng):
    """Draw one id from logits (V,). temperature 0 = argmax (no random number drawn).

    Otherwise: divide by the temperature, keep the top_k largest (ties at the k-th value kept),
    softmax, keep the smallest set of most probable ids whose probability reaches top_p, and
    draw from what is left, renormalised, with one ``rng.random()``.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits / temperature
    if top_k is not None and top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    z -= z.max()
    probs = np.exp(z)
    probs /= probs.sum()
    # Stable sort: equal probabilities keep id order, so the draw is reproducible.
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    cum = np.cumsum(sorted_probs)
    if top_p < 1:
        # The first id whose running sum reaches top_p closes the nucleus (at least one id).
        n_keep = int(np.searchsorted(cum, top_p, side="left")) + 1
        n_keep = min(n_keep, probs.size)
    else:
        n_keep = int(np.count_nonzero(sorted_probs))
    cum = cum[:n_keep]
    u = rng.random() * cum[-1]
    j = min(int(np.searchsorted(cum, u, side="right")), n_keep - 1)
    return int(order[j])


def generate(model, tokenizer, prompt, max_new_tokens, temperature=0.8, top_p=0.9, top_k=None,
             rng=None, use_cache=True, stream=None):
    """Continue ``prompt`` by ``max_new_tokens`` tokens; returns the new text (without the prompt).

    model       : GPT; put in eval mode for the call (no dropout) and restored afterwards
    tokenizer   : the CharTokenizer the model was trained with
    prompt      : str; every character must be in the vocabulary (ValueError naming those that
                  are not). An empty prompt starts from the BOS token.
    temperature : >= 0; 0 picks the most likely token every step (greedy, deterministic)
    top_p       : in (0, 1], nucleus sampling; 1 disables it
    top_k       : None or >= 1, keep only the k most likely tokens
    rng         : np.random.Generator, an int seed, or None (fresh entropy)
    use_cache   : KV cache (fast) or a full forward over the window per token (reference)
    stream      : None or a callable receiving each new piece of text as soon as it is sampled

    BOS is never sampled; generation stops early if the model samples EOS. The context window
    rule is the module docstring's.
    """
    check_sampling_args(max_new_tokens, temperature, top_p, top_k)
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    missing = tokenizer.unknown_chars(prompt)
    if missing:
        shown = ", ".join(repr(c) for c in missing)
        raise ValueError(f"prompt has characters not in the model's vocabulary: {shown}")
    if stream is not None and not callable(stream):
        raise TypeError(f"stream must be callable or None, got {type(stream).__name__}")
    if rng is None or isinstance(rng, (int, np.integer)):
        rng = np.random.default_rng(rng)
    elif not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a np.random.Generator, an int seed or None, "
                        f"got {type(rng).__name__}")
    ids = tokenizer.encode(prompt).tolist() if prompt else [tokenizer.BOS]
    if max_new_tokens == 0:
        return ""

    was_training = model.training
    model.eval()
    pieces = []
    try:
        # One BLAS thread: the products are one row each, and BLAS threads would only compete
        # with each other (and with OpenMP) for the same cores.
        with threadpool_limits(1, user_api="blas"):
            window = ContextWindow(model, use_cache=use_cache)
            logits = window.start(ids)
            for i in range(max_new_tokens):
                if not np.isfinite(logits).all():
                    raise ValueError("the model's logits are not finite (NaN or inf): its "
                                     "weights are broken")
                # BOS marks a start, never a continuation: it is not a candidate.
                logits[tokenizer.BOS] = -np.inf
                token = sample_token(logits, temperature, top_p, top_k, rng)
                if token == tokenizer.EOS:
                    break
                piece = tokenizer.decode([token])
                pieces.append(piece)
                if stream is not None and piece:
                    stream(piece)
                if i + 1 < max_new_tokens:
                    logits = window.push(token)
    finally:
        if was_training:
            model.train()
    return "".join(pieces)
