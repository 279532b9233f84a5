"""Text generation: incremental decoding with the model's KV cache and temperature / top-k /
top-p sampling (``randygpt sample`` is its command line, in randygpt.cli.sample).

Decoding with the cache runs one position per step: ``model.decode`` appends the new token to a
DecodeCache holding every layer's keys and values of the window's earlier tokens, and its query
attends to them, so a step costs one matrix-vector product per weight matrix instead of a
forward pass over the whole window. The products are the decode kernels' (weights read in
place, no packing), so a step is bound by reading the weights: 18 MB on the default model.
``benchmarks/bench_sample.py`` measured 944 tokens/s on one thread and 1,525 on two (208 and 322
without the cache), default model, 200 new tokens, Xeon (AVX-512), 2 cores; the NumPy-BLAS
KVCache this replaced ran 900-918 on one thread (interleaved with this path: 927-955).
decode_threads() chooses the thread count.

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
check this to rtol 1e-5), so the cache changes speed, not results.
"""
import math

import numpy as np

__all__ = ["generate", "ContextWindow", "sample_token", "check_sampling_args", "window_keep",
           "decode_threads", "GREEDY_BELOW"]


def window_keep(block_size):
    """How many tokens the window keeps when it slides (see the module docstring)."""
    return max(1, block_size // 2)


# Weights of one layer per decoding thread. A decode step is bound by reading the weights, and
# a second core reads its share with its own bandwidth, but every kernel call (7 per layer) then
# wakes a team. Measured (one token at position 48, 1 vs 2 threads, Xeon AVX-512, 2 cores): the
# default C = 256 (786K weights per layer) 844 -> 533 us per step; C = 128 (197K) 205 -> 152;
# C = 96 (111K) 213 -> 192; C = 64 (49K) 136 -> 168 us, slower. Counts above 2 threads are not
# measured (2 cores).
DECODE_WEIGHTS_PER_THREAD = 50_000


def decode_threads(model):
    """The thread count generate() decodes with: the model's n_threads, but one thread per
    DECODE_WEIGHTS_PER_THREAD weights of a layer at most (and at least one)."""
    per_layer = model.config.n_embd * (4 * model.config.n_embd + 2 * model.config.mlp_hidden)
    return max(1, min(model.n_threads, per_layer // DECODE_WEIGHTS_PER_THREAD))


class ContextWindow:
    """The tokens the model conditions on, with the sliding rule of the module docstring.

    ``start(ids)`` and ``push(token)`` return the logits (V,) that predict the next token.
    With ``use_cache`` they come from ``model.decode`` on a cache of the window's keys and
    values (``n_threads``: its thread count, None for the model's); without, from
    ``model.forward`` on the whole window (the reference, and the slow path the benchmark
    compares against). The model must be in eval mode.
    """

    def __init__(self, model, use_cache=True, n_threads=None):
        self.model = model
        self.block_size = model.config.block_size
        self.keep = window_keep(self.block_size)
        self.cache = model.new_cache(n_threads) if use_cache else None
        self.tokens = []
        self.rebuilds = 0

    def _logits_of_window(self):
        if self.cache is None:
            idx = np.asarray(self.tokens, dtype=np.int32)[None, :]
            return self.model.forward(idx)[0, -1]
        self.cache.reset()
        return self.model.decode(np.asarray(self.tokens, dtype=np.int32), self.cache)[-1]

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
            return self.model.decode(np.array([token], dtype=np.int32), self.cache)[0]
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


# Temperatures below this act as 0 (greedy): logits divided by them overflow float64 (1e-320
# turned every logit into inf and the distribution into NaN), and long before that the
# distribution is the argmax's alone (the next logit down is e^-(gap / T) as likely).
GREEDY_BELOW = 1e-6


def sample_token(logits, temperature, top_p, top_k, rng):
    """Draw one id from logits (V,). temperature 0 (or below GREEDY_BELOW) = argmax, no random
    number drawn.

    Otherwise: divide by the temperature, keep the top_k largest (ties at the k-th value kept),
    softmax, keep the smallest set of most probable ids whose probability reaches top_p, and
    draw from what is left, renormalised, with one ``rng.random()``.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if temperature < GREEDY_BELOW:
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
    tokenizer   : the tokenizer the model was trained with (CharTokenizer or BPETokenizer)
    prompt      : str; every character must be in the vocabulary (ValueError naming those that
                  are not). An empty prompt starts from the BOS token.
    temperature : >= 0; 0 picks the most likely token every step (greedy, deterministic), and
                  so does any temperature below GREEDY_BELOW
    top_p       : in (0, 1], nucleus sampling; 1 disables it
    top_k       : None or >= 1, keep only the k most likely tokens
    rng         : np.random.Generator, an int seed, or None (fresh entropy)
    use_cache   : model.decode on a KV cache (fast; on decode_threads(model) threads) or a full
                  forward over the window per token (the reference; model.n_threads)
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

    pieces = []
    # A byte-level token may hold part of a character: the decoder hands out whole ones only.
    decoder = tokenizer.stream_decoder()
    with model.evaluating():
        window = ContextWindow(model, use_cache=use_cache, n_threads=decode_threads(model))
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
            piece = decoder.feed(token)
            pieces.append(piece)
            if stream is not None and piece:
                stream(piece)
            if i + 1 < max_new_tokens:
                logits = window.push(token)
    rest = decoder.flush()
    if stream is not None and rest:
        stream(rest)
    return "".join(pieces) + rest
