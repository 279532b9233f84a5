"""The GPT: one flat parameter buffer with named views, one activation arena, and a forward and
backward pass that are nothing but kernel calls and offsets.

Dimension letters: B batch, T time, C channels (n_embd), NH heads, HS = C/NH, H = 4C (MLP
hidden), V vocab, L layers, N = B*T rows, P parameters.

Forward, per layer l (pre-norm; RMSNorm without gain, or LayerNorm with gain and bias):
    resid[2l+1] = resid[2l]   + dropout(attn(norm(resid[2l])) wo^T)          site 0
    resid[2l+2] = resid[2l+1] + dropout(relu(norm(resid[2l+1]) fc1^T)^2 fc2^T)  site 1
with resid[0] = wte[idx] + wpe[:T] and logits = resid[2L] lm_head^T (no final norm).
Forward saves only what backward cannot cheaply redo: every residual stream (the norms' inputs
and lm_head's), the norms' rstd (and mean), and in fp32 qkv and fc1's pre-activation (bf16
redoes those too, below). Backward recomputes, with the same deterministic code (so
bit-identical to what forward used), the norm outputs (one elementwise pass each), relu(fc1)^2
inside fc2's GEMMs (squared as it is packed, in forward too, where it is never stored; with the
squared-ReLU backward in the input gradient's write-back) and, inside attention_backward, each
layer's attention probabilities and output (the scores and softmax again, 0.7 ms per layer at
the default size on AVX-512, 1.7 ms on AVX2, 1-3% of a step, checked bit for bit by the
attention tests): the probabilities were (L, B, NH, T, T) floats (24 MiB at B=32, T=64) and the
outputs (L, N, C) (12 MiB).
Scratch buffers whose lifetimes do not overlap share memory: one work region holds dqkv and
atty during attention, and in backward fc1's pre-activation gradient (dpre, N x H); the branch
gradient and then the norm-output gradient live in proj's buffer, datty in ln's. At B=32, T=64
the fp32 arena is 125 MiB (189 MiB with every activation saved and separate scratch), and a
training step peaks at about 240 MiB RSS with the parameters, gradients and AdamW moments (305
MiB before).
In bf16 (ActivationArena's recompute plan, the default there) qkv and fc1's pre-activation are
not saved per layer: one layer's live in one buffer, redo (with datty beside qkv in backward),
and backward redoes each layer's qkv and fc1 forward GEMM from the recomputed norm output and
the same weights, so with forward's bits; the last layer's fc1_pre is still in redo when
backward starts (11 GEMMs redone a step at L=6). On AMX those cost about 1 ms each at the
default size: the step measured 2.9% slower (174 against 169 ms at 1 thread), for an arena of
49 MiB and a peak of 161-168 MiB RSS (237-244 before). fp32 keeps saving them: its GEMMs are
3-5x dearer, and recomputing measured 10% slower (463 against 420 ms).
Every scratch gradient is written (GEMM with accumulate=False, dropout_forward for the masked
branch gradient, attention_backward(accumulate=False)), never zeroed and then accumulated into;
only the parameter gradients accumulate, into flat_grads zeroed once per step.
Backward reads the forward in reverse, one kernel per forward kernel; the residual stream's
gradient is accumulated into by both branches' norm backwards, so the fan-out needs no special case.

decode (inference only) runs the same layers on the few new tokens of a sequence whose earlier
tokens' q | k | v a DecodeCache holds: per layer the norm, the new rows' q | k | v written into
the cache, their attention over every cached row, wo with the residual add fused, the norm,
fc1 with its squared ReLU, fc2 with the residual add; then lm_head. Its products are the
decode kernels' (a few rows against weights read in place; the GEMM's packing would cost as
much as a one-row product), so its logits equal forward's to float32 rounding, not bit for bit.

config.precision "bf16" makes every GEMM of forward and backward take bf16-rounded operands
(rounded while the GEMM packs them) and sum in fp32; the parameters, gradients, the arena's
activations, the norms, attention (its softmax and its own products), dropout and the loss
stay fp32, and no activation is stored in bf16 (the packing rounds a fp32 buffer each time it
reads one). decode stays fp32 in either precision: it is for sampling, and its one-row
products read the weights in place without packing.
"""
import contextlib
import types

import numpy as np

from ._kernels import effective_n_threads
from ._kernels import activation, attention, decode, embedding, matmul, norm, xent
from .config import Config

__all__ = ["GPT", "ParamTable", "ActivationArena", "DecodeCache", "precision_note"]

_LAYER_MATRICES = ("wq", "wk", "wv", "wo", "fc1", "fc2")
_LAYER_NORM_PARAMS = ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias")


class ParamTable:
    """Names, shapes and offsets of every parameter in the flat buffer, in SPEC order:
    wte, wpe, then per layer wq, wk, wv, wo, fc1, fc2 (and the LayerNorm gains and biases),
    then lm_head. wq, wk and wv are adjacent, so one (3C, C) view covers all three."""

    def __init__(self, config):
        C, V, H = config.n_embd, config.vocab_size, config.mlp_hidden
        entries = [("wte", (V, C)), ("wpe", (config.block_size, C))]
        for i in range(config.n_layer):
            shapes = {"wq": (C, C), "wk": (C, C), "wv": (C, C), "wo": (C, C),
                      "fc1": (H, C), "fc2": (C, H)}
            entries += [(f"h.{i}.{k}", shapes[k]) for k in _LAYER_MATRICES]
            if config.norm == "layernorm":
                entries += [(f"h.{i}.{k}", (C,)) for k in _LAYER_NORM_PARAMS]
        entries.append(("lm_head", (V, C)))
        self.names = [name for name, _ in entries]
        self.shapes = [shape for _, shape in entries]
        self.sizes = [int(np.prod(shape)) for shape in self.shapes]
        self.offsets = [int(o) for o in np.cumsum([0] + self.sizes[:-1])]
        self.total = int(sum(self.sizes))
        self._index = {name: k for k, name in enumerate(self.names)}

    def __len__(self):
        return len(self.names)

    def span(self, name):
        """(offset, size) of one parameter in the flat buffer."""
        k = self._index[name]
        return self.offsets[k], self.sizes[k]

    def views(self, flat):
        """{name: view of flat with the parameter's shape}; views share flat's memory."""
        return {name: flat[o:o + n].reshape(shape)
                for name, shape, o, n in zip(self.names, self.shapes, self.offsets, self.sizes)}


def init_std(name, config):
    """The init policy in one place: normal(0, 0.02) for every matrix, smaller for the
    residual output projections (wo, fc2) so the residual stream's variance does not grow
    with depth, 0.01 for the positions; None for LayerNorm gains and biases (1 and 0)."""
    if name.endswith(".weight") or name.endswith(".bias"):
        return None
    if name == "wpe":
        return 0.01
    if name.endswith(".wo") or name.endswith(".fc2"):
        return 0.02 / np.sqrt(2 * config.n_layer)
    return 0.02


class ActivationArena:
    """Every activation forward saves for backward, plus the scratch buffers of both passes, in
    one float32 allocation sized from (config, B, T, recompute). Made once per (B, T, plan);
    never resized.

    recompute (the plan; None: default_recompute(config)): False saves every layer's qkv and
    fc1 pre-activation; True keeps one layer's in a buffer named redo, and backward redoes the
    two GEMMs (see the module docstring). Either way qkv[l], qkv2[l] and fc1_pre[l] name layer
    l's buffers (with recompute, the same redo memory for every l).

    Scratch buffers whose lifetimes never overlap share memory (see the module docstring):
    views of the same bytes carry the names of what they hold at each point of the step."""

    @staticmethod
    def default_recompute(config):
        """The plan a model of config uses unless told: recompute where the GEMMs run in bf16
        (cheap on AMX: 3% of a step at the default size), save in fp32 (where it cost 10%)."""
        return config.precision == "bf16"

    @classmethod
    def layout(cls, config, B, T, recompute=None):
        """[(name, shape)] of the arena's float32 buffers, in order."""
        if recompute is None:
            recompute = cls.default_recompute(config)
        L, C, H, V = config.n_layer, config.n_embd, config.mlp_hidden, config.vocab_size
        N = B * T
        layernorm = config.norm == "layernorm"
        if recompute:
            # one layer's q | k | v (then datty beside it in backward), or its fc1 output
            per_layer = [("redo", (max(N * H, 4 * N * C),))]
        else:
            per_layer = [("qkv", (L, B, T, 3 * C)),   # q | k | v, the attention kernel's input
                         ("fc1_pre", (L, N, H))]      # fc1 output before relu^2, for its backward
        return [
            ("resid", (2 * L + 1, N, C)),   # residual stream before each norm, and lm_head's input
            ("ln1_rstd", (L, N)),           # 1/rms (or 1/std) per row, saved for norm backward
            ("ln2_rstd", (L, N)),
            ("ln1_mean", (L, N if layernorm else 0)),  # LayerNorm only
            ("ln2_mean", (L, N if layernorm else 0)),
            *per_layer,
            # scratch, reused by every layer
            ("ln", (N, C)),                 # a norm's output (recomputed in backward); also
                                            # datty in backward's attention part (saved plan)
            ("proj", (N, C)),               # wo / fc2 output before dropout; in backward the
                                            # branch gradient, then a norm output's gradient
            ("dresid", (B, T, C)),          # gradient of the residual stream
            ("logits", (N, V)),
            ("losses", (N,)),
            ("dlogits", (N, V)),
            # dqkv (B, T, 3C) and atty (B, T, C) during attention; dpre (N, H) in the MLP's
            # backward
            ("work", (max(N * H, 4 * N * C),)),
        ]

    @classmethod
    def nbytes_for(cls, config, B, T, recompute=None):
        """Bytes an arena for (config, B, T, recompute) holds, computed without allocating it."""
        floats = sum(int(np.prod(shape, dtype=np.int64))
                     for _, shape in cls.layout(config, B, T, recompute))
        return 4 * floats + 2 * 4 * B * T  # the float32 buffer, idx and targets (int32)

    def __init__(self, config, B, T, recompute=None):
        L, C, H = config.n_layer, config.n_embd, config.mlp_hidden
        N = B * T
        self.recompute = (self.default_recompute(config) if recompute is None
                          else bool(recompute))
        table = self.layout(config, B, T, self.recompute)
        sizes = [int(np.prod(shape)) for _, shape in table]
        self.B, self.T, self.N = B, T, N
        self.total = int(sum(sizes))
        self.buffer = np.zeros(self.total, dtype=np.float32)
        offset = 0
        for (name, shape), size in zip(table, sizes):
            setattr(self, name, self.buffer[offset:offset + size].reshape(shape))
            offset += size
        self.idx = np.zeros((B, T), dtype=np.int32)
        self.targets = np.zeros(N, dtype=np.int32)
        w = self.work
        self.dpre = w[:N * H].reshape(N, H)          # fc1_pre's gradient, in backward
        self.dqkv = w[:3 * N * C].reshape(B, T, 3 * C)
        self.atty = w[3 * N * C:4 * N * C].reshape(B, T, C)  # attention output, wo's input
        if self.recompute:
            r = self.redo
            self.qkv = (r[:3 * N * C].reshape(B, T, 3 * C),) * L
            self.fc1_pre = (r[:N * H].reshape(N, H),) * L
            self.datty = r[3 * N * C:4 * N * C].reshape(B, T, C)  # beside qkv, which it outlives
        else:
            self.datty = self.ln.reshape(B, T, C)
        # With recompute, the layer whose fc1_pre redo holds (None: another layer's q | k | v
        # or nothing): forward leaves the last layer's there for backward.
        self.fc1_pre_held = None
        # 2-D views of the (B, T, X) buffers for the row-wise kernels (matmul, norm, dropout).
        self.qkv2 = tuple(q.reshape(N, 3 * C) for q in self.qkv)
        self.atty2 = self.atty.reshape(N, C)
        self.dresid2 = self.dresid.reshape(N, C)
        self.dqkv2 = self.dqkv.reshape(N, 3 * C)
        self.resid3 = self.resid.reshape(2 * L + 1, B, T, C)

    @property
    def nbytes(self):
        return self.buffer.nbytes + self.idx.nbytes + self.targets.nbytes


class DecodeCache:
    """What GPT.decode keeps from one call to the next: every layer's q | k | v rows of the
    tokens decoded so far, at positions 0 .. length - 1, and the scratch rows of a call. Made
    by GPT.new_cache; every buffer has block_size rows, allocated once (a sequence never holds
    more tokens).

    qkv : (L, block_size, 3C) float32; row t of layer l is that layer's q | k | v of position
          t, laid out as attention_forward's qkv. The product writes the new rows here in
          place; the queries of earlier positions are never read again, but keeping them
          costs less than splitting every new row into three.
    """

    def __init__(self, config, n_threads):
        L, C, H, V, T = (config.n_layer, config.n_embd, config.mlp_hidden, config.vocab_size,
                         config.block_size)
        self.config = config
        self.n_threads = n_threads
        self.length = 0
        self.qkv = np.zeros((L, T, 3 * C), dtype=np.float32)
        # Scratch for up to T new rows: each call uses rows [0, n).
        self.idx = np.zeros(T, dtype=np.int32)
        self.resid = np.zeros((T, C), dtype=np.float32)  # the new rows' residual stream
        self.ln = np.zeros((T, C), dtype=np.float32)     # a norm's output
        self.mean = np.zeros(T, dtype=np.float32)        # the norm's statistics (no
        self.rstd = np.zeros(T, dtype=np.float32)        # backward reads them)
        self.atty = np.zeros((T, C), dtype=np.float32)   # attention output, wo's input
        self.act = np.zeros((T, H), dtype=np.float32)    # relu(fc1)^2, fc2's input
        self.logits = np.zeros((T, V), dtype=np.float32)

    def reset(self):
        """Forget the sequence (the buffers stay): the next decode starts at position 0."""
        self.length = 0

    @property
    def nbytes(self):
        return sum(a.nbytes for a in (self.qkv, self.idx, self.resid, self.ln, self.mean,
                                      self.rstd, self.atty, self.act, self.logits))


def precision_note(config):
    """What config.precision does on this CPU, for the start-up report; None for fp32."""
    if config.precision == "fp32":
        return None
    how = {"amx": "on AMX tiles (tdpbf16ps)",
           "avx512bf16": "on vdpbf16ps (AVX512_BF16)"}.get(
        matmul.get_bf16_isa(),
        "emulated with fp32 multiply-adds (this CPU or the SIMD path chosen has no "
        "AVX512_BF16): the same results as vdpbf16ps, and no speed-up")
    return (f"precision=bf16: the GEMMs round their operands to bf16 and sum in fp32 "
            f"(weights, gradients, optimizer, norms, softmax and loss stay fp32), {how}")


class GPT:
    """The character-level GPT of SPEC.md on our kernels. See the module docstring."""

    def __init__(self, config, seed=1337, n_threads=None, *, recompute=None):
        """recompute: the activation arena's plan (ActivationArena; None: bf16 recomputes, fp32
        saves). Either plan gives the same bits; it trades memory for two GEMMs a layer. A
        public attribute: the next forward allocates an arena for a new value."""
        if not isinstance(config, Config):
            raise TypeError(f"config must be a randygpt.Config, got {type(config).__name__}")
        self.config = config
        self.n_threads = n_threads
        self.table = ParamTable(config)
        self.num_params = self.table.total
        self.flat_params = np.zeros(self.table.total, dtype=np.float32)
        self.flat_grads = np.zeros(self.table.total, dtype=np.float32)
        self.params = self.table.views(self.flat_params)
        self.grads = self.table.views(self.flat_grads)
        # Weight decay follows one rule: matrices decay, vectors (LayerNorm gains, biases) don't.
        # As runs of the flat buffer: a per-parameter mask would cost a byte per parameter.
        spans = []
        for name, shape in zip(self.table.names, self.table.shapes):
            o, n = self.table.span(name)
            decay = len(shape) == 2
            if spans and spans[-1][2] == decay and spans[-1][1] == o:
                spans[-1] = (spans[-1][0], o + n, decay)
            else:
                spans.append((o, o + n, decay))
        self.decay_spans = tuple(spans)
        self._layers_p = self._layer_views(self.flat_params, self.params)
        self._layers_g = self._layer_views(self.flat_grads, self.grads)
        self.training = True
        self.recompute = (ActivationArena.default_recompute(config) if recompute is None
                          else bool(recompute))
        self._arena = None
        self._pending = None  # what backward needs from the last forward with targets
        self.init_params(np.random.default_rng(seed))

    def _layer_views(self, flat, views):
        """Per layer: the (3C, C) wq|wk|wv view and the other weights, for the kernels."""
        C = self.config.n_embd
        layers = []
        for i in range(self.config.n_layer):
            o, _ = self.table.span(f"h.{i}.wq")
            ns = types.SimpleNamespace(wqkv=flat[o:o + 3 * C * C].reshape(3 * C, C))
            for k in ("wo", "fc1", "fc2"):
                setattr(ns, k, views[f"h.{i}.{k}"])
            ns.ln1_w = ns.ln1_b = ns.ln2_w = ns.ln2_b = None  # RMSNorm has no parameters
            if self.config.norm == "layernorm":
                ns.ln1_w, ns.ln1_b = views[f"h.{i}.ln1.weight"], views[f"h.{i}.ln1.bias"]
                ns.ln2_w, ns.ln2_b = views[f"h.{i}.ln2.weight"], views[f"h.{i}.ln2.bias"]
            layers.append(ns)
        return layers

    def init_params(self, rng):
        """Draw every parameter in table order from rng (see init_std)."""
        for name, shape in zip(self.table.names, self.table.shapes):
            std = init_std(name, self.config)
            if std is None:
                self.params[name][...] = 1.0 if name.endswith(".weight") else 0.0
            else:
                self.params[name][...] = rng.normal(0.0, std, size=shape)

    def load_flat_params(self, array):
        """Copy a (P,) array of parameters into flat_params (the views stay valid)."""
        array = np.asarray(array)
        if array.shape != (self.table.total,):
            raise ValueError(f"params must have shape ({self.table.total},), got {array.shape}")
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"params must be a float array, got {array.dtype}")
        np.copyto(self.flat_params, array, casting="same_kind")

    @property
    def n_threads(self):
        """The kernel thread count (an int), resolved once when set: every forward, backward
        and decode step uses it as it is."""
        return self._n_threads

    @n_threads.setter
    def n_threads(self, value):
        # None takes randygpt's default now (set_num_threads, the environment, the cores).
        self._n_threads = effective_n_threads(value)

    def train(self):
        self.training = True
        return self

    def eval(self):
        self.training = False
        return self

    @contextlib.contextmanager
    def evaluating(self):
        """Eval mode (no dropout) for the ``with`` block, then the mode the model had before."""
        was_training = self.training
        self.eval()
        try:
            yield self
        finally:
            self.training = was_training

    # ------------------------------------------------------------------ input checks

    def _check_tokens(self, a, name):
        a = np.asarray(a)
        if a.ndim != 2:
            raise ValueError(f"{name} must be 2-D (B, T), got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name} must be an integer array, got {a.dtype}")
        B, T = a.shape
        if B == 0 or T == 0:
            raise ValueError(f"{name} must not be empty, got shape {a.shape}")
        if T > self.config.block_size:
            raise ValueError(f"{name} has T={T} > block_size={self.config.block_size}")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"{name} holds token ids in [{lo}, {hi}], outside "
                             f"[0, vocab_size={self.config.vocab_size})")
        return a

    @staticmethod
    def training_memory(config, B, T, n_threads, recompute=None):
        """Bytes a training step at batch (B, T) needs (with the arena plan recompute, None:
        the config's default, as GPT's), computed without allocating:
        {"parameters": params, gradients and both AdamW moments, "activations": the arena,
        "attention": its per-call scratch, which grows with T^2 per thread}. For refusing a
        configuration that cannot fit, with the figures, before anything is allocated."""
        P = ParamTable(config).total
        team = max(1, min(n_threads, B * config.n_head))
        return {"parameters": 4 * 4 * P,
                "activations": ActivationArena.nbytes_for(config, B, T, recompute),
                "attention": attention.scratch_bytes(T, config.head_size, team)}

    def release_buffers(self):
        """Free the activation arena (125 MiB at the default size, 49 MiB in bf16) until the
        next forward allocates it again: for when only sampling is left, whose KV cache has
        buffers of its own. A backward() needs a new forward first."""
        self._arena = None
        self._pending = None

    def _arena_for(self, B, T):
        a = self._arena
        if a is None or (a.B, a.T, a.recompute) != (B, T, self.recompute):
            self._arena = a = None  # free the old arena before allocating the new one
            self._arena = ActivationArena(self.config, B, T, self.recompute)
        return self._arena

    # ------------------------------------------------------------------ forward

    def _norm_forward(self, out, mean, rstd, x, w, b, nt):
        if self.config.norm == "rmsnorm":
            norm.rmsnorm_forward(out, rstd, x, self.config.norm_eps, nt)
        else:
            norm.layernorm_forward(out, mean, rstd, x, w, b, self.config.norm_eps, nt)

    def forward(self, idx, targets=None, *, step=0, batch_offset=0):
        """Mean cross-entropy (float) when targets are given, else logits (B, T, V) float32.

        step keys the dropout masks (with config.seed, layer and site); pass the iteration.
        batch_offset: idx's first row is row batch_offset of a larger batch (a data-parallel
        rank's slice): its dropout masks are those that row gets in a forward of the whole.
        """
        idx = self._check_tokens(idx, "idx")
        if targets is not None:
            targets = self._check_tokens(targets, "targets")
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {targets.shape} != idx shape {idx.shape}")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        if isinstance(batch_offset, bool) or not isinstance(batch_offset, (int, np.integer)) \
                or batch_offset < 0:
            raise ValueError(f"batch_offset must be a non-negative int, got {batch_offset!r}")
        cfg = self.config
        B, T = idx.shape
        # Element offset of this batch in the dropout masks' (rows x C) numbering.
        mask_offset = int(batch_offset) * T * cfg.n_embd
        a = self._arena_for(B, T)
        np.copyto(a.idx, idx, casting="unsafe")  # ids already range-checked
        nt = self.n_threads
        p = self.params
        L, NH, seed = cfg.n_layer, cfg.n_head, cfg.seed
        drop = cfg.dropout if self.training else 0.0  # p == 0 makes dropout the identity
        pr = cfg.precision  # the GEMMs' operands; everything else is fp32 either way
        self._pending = None

        embedding.embedding_forward(a.resid3[0], a.idx, p["wte"], p["wpe"], nt)
        for l in range(L):
            w = self._layers_p[l]
            x, x_mid, x_out = a.resid[2 * l], a.resid[2 * l + 1], a.resid[2 * l + 2]
            # x_mid = x + dropout(attn(norm(x)) wo^T)
            self._norm_forward(a.ln, a.ln1_mean[l], a.ln1_rstd[l], x, w.ln1_w, w.ln1_b, nt)
            matmul.matmul_forward(a.qkv2[l], a.ln, w.wqkv, nt, precision=pr)
            attention.attention_forward(a.atty, None, a.qkv[l], NH, nt)  # P is not kept
            matmul.matmul_forward(a.proj, a.atty2, w.wo, nt, precision=pr)
            activation.dropout_add_to_forward(x_mid, x, a.proj, drop, seed, step, l, 0, nt,
                                              offset=mask_offset)
            # x_out = x_mid + dropout(relu(norm(x_mid) fc1^T)^2 fc2^T)
            self._norm_forward(a.ln, a.ln2_mean[l], a.ln2_rstd[l], x_mid, w.ln2_w, w.ln2_b, nt)
            # fc1's output before the squared ReLU, kept for backward; fc2's GEMM squares it
            # as it packs it, so relu(fc1_pre)^2 is never stored
            matmul.matmul_forward(a.fc1_pre[l], a.ln, w.fc1, nt, precision=pr)
            a.fc1_pre_held = l
            matmul.matmul_forward(a.proj, a.fc1_pre[l], w.fc2, nt, precision=pr, x_sqrelu=True)
            activation.dropout_add_to_forward(x_out, x_mid, a.proj, drop, seed, step, l, 1, nt,
                                              offset=mask_offset)
        matmul.matmul_forward(a.logits, a.resid[2 * L], p["lm_head"], nt, precision=pr)

        if targets is None:
            return a.logits.reshape(B, T, cfg.vocab_size).copy()
        np.copyto(a.targets, targets.reshape(-1), casting="unsafe")
        if self.training:
            loss = xent.cross_entropy_forward_backward(a.dlogits, a.logits, a.targets, nt)
        else:
            loss = xent.cross_entropy_forward(a.losses, a.logits, a.targets, nt)
        self._pending = types.SimpleNamespace(arena=a, drop=drop, step=step,
                                              mask_offset=mask_offset, have_dlogits=self.training)
        return float(loss)

    __call__ = forward

    # ------------------------------------------------------------------ incremental decoding

    def new_cache(self, n_threads=None):
        """An empty DecodeCache for decode(). n_threads: the thread count of every decode call
        with it (None: the model's n_threads)."""
        nt = self.n_threads if n_threads is None else effective_n_threads(n_threads)
        return DecodeCache(self.config, nt)

    def _check_decode(self, idx, cache):
        """Validates decode()'s arguments; returns idx as an array."""
        if self.training:
            raise RuntimeError("decode() runs in eval mode only (no dropout): call model.eval()")
        if not isinstance(cache, DecodeCache):
            raise TypeError(f"cache must be a DecodeCache (model.new_cache()), got "
                            f"{type(cache).__name__}")
        if cache.config != self.config:
            raise ValueError("cache was made for a model with another config")
        idx = np.asarray(idx)
        if idx.ndim != 1:
            raise ValueError(f"idx must be 1-D (n,), got shape {idx.shape}")
        self._check_tokens(idx.reshape(1, -1), "idx")
        if cache.length + idx.shape[0] > self.config.block_size:
            raise ValueError(f"idx: cannot append {idx.shape[0]} tokens to the cache's "
                             f"{cache.length} (block_size {self.config.block_size}); "
                             f"cache.reset() starts a new sequence")
        return idx

    def decode(self, idx, cache):
        """Append the tokens idx (n,) to cache's sequence, at positions cache.length ..
        cache.length + n - 1, and return their logits (n, V) float32 (a new array).

        Each layer computes q, k and v of the new tokens only, appends them to the cache and
        attends over every cached position, so a token costs one matrix-vector product per
        weight matrix instead of a forward pass over the sequence. Row i equals forward's
        logits at position cache.length + i of the whole sequence, up to float32 rounding
        (the products sum in another order), and is bit-identical for any thread count.
        Eval mode only (no dropout).
        """
        idx = self._check_decode(idx, cache)
        cfg, c, p = self.config, cache, self.params
        n, t0, nt, C = idx.shape[0], cache.length, cache.n_threads, cfg.n_embd
        t1 = t0 + n
        ids = c.idx[:n]
        np.copyto(ids, idx, casting="unsafe")  # ids already range-checked
        x, ln, mean, rstd, atty, act = (c.resid[:n], c.ln[:n], c.mean[:n], c.rstd[:n],
                                        c.atty[:n], c.act[:n])

        # x = wte[idx] + wpe[t0:t1]: the new positions follow the cached ones
        embedding.embedding_forward(x.reshape(1, n, C), ids.reshape(1, n), p["wte"],
                                    p["wpe"][t0:], nt)
        for l in range(cfg.n_layer):
            w, qkv = self._layers_p[l], c.qkv[l]
            # x += attn(norm(x)) wo^T, the new rows' q | k | v written into the cache
            self._norm_forward(ln, mean, rstd, x, w.ln1_w, w.ln1_b, nt)
            decode.decode_matmul_forward(qkv[t0:t1], ln, w.wqkv, nt)
            decode.decode_attention_forward(atty, qkv[:t1], t0, cfg.n_head, nt)
            decode.decode_matmul_forward(x, atty, w.wo, nt, accumulate=True)
            # x += relu(norm(x) fc1^T)^2 fc2^T
            self._norm_forward(ln, mean, rstd, x, w.ln2_w, w.ln2_b, nt)
            decode.decode_matmul_sqrelu_forward(act, ln, w.fc1, nt)
            decode.decode_matmul_forward(x, act, w.fc2, nt, accumulate=True)
        logits = c.logits[:n]
        decode.decode_matmul_forward(logits, x, p["lm_head"], nt)
        cache.length = t1
        return logits.copy()

    # ------------------------------------------------------------------ backward

    def _norm_backward(self, dx, dout, x, mean, rstd, l, which, nt):
        """dx += d norm(x) given dout; LayerNorm also accumulates its gain and bias grads."""
        if self.config.norm == "rmsnorm":
            norm.rmsnorm_backward(dx, dout, x, rstd, nt)
        else:
            p, g = self._layers_p[l], self._layers_g[l]
            norm.layernorm_backward(dx, getattr(g, which + "_w"), getattr(g, which + "_b"),
                                    dout, x, mean, rstd, getattr(p, which + "_w"), nt)

    def backward(self):
        """Zero flat_grads, then fill it with the exact gradient of the last forward's mean
        loss (that forward must have had targets)."""
        if self._pending is None:
            raise RuntimeError("backward() needs a preceding forward(idx, targets)")
        st = self._pending
        a, drop, step = st.arena, st.drop, st.step
        cfg = self.config
        L, seed = cfg.n_layer, cfg.seed
        nt = self.n_threads
        pr = cfg.precision
        self.flat_grads.fill(0.0)
        g = self.grads
        if not st.have_dlogits:
            # An eval-mode forward only computed the loss: dlogits = (softmax - onehot) / N.
            a.dlogits.fill(0.0)
            xent.cross_entropy_backward(a.dlogits, a.logits, a.targets, 1.0, nt)
            st.have_dlogits = True
        dresid = a.dresid2
        # logits = resid[2L] lm_head^T (dresid written: nothing to zero first)
        matmul.matmul_backward(None, g["lm_head"], a.dlogits, a.resid[2 * L],
                               self.params["lm_head"], nt, precision=pr)
        matmul.gemm(dresid, a.dlogits, self.params["lm_head"], False, False, False, nt,
                    precision=pr)
        for l in reversed(range(L)):
            # x_out = x_mid + dropout(proj, site 1), proj = relu(fc1_pre)^2 fc2^T
            dproj = self._dropout_backward(a, dresid, drop, (seed, step, l, 1), st.mask_offset, nt)
            self._mlp_backward(a, dresid, dproj, l, nt)
            # x_mid = x + dropout(proj, site 0), proj = attn(qkv) wo^T, qkv = norm(x) wqkv^T
            dproj = self._dropout_backward(a, dresid, drop, (seed, step, l, 0), st.mask_offset, nt)
            self._attention_backward(a, dresid, dproj, l, nt)
        # resid[0] = wte[idx] + wpe[:T]
        embedding.embedding_backward(g["wte"], g["wpe"], a.dresid, a.idx, nt)

    def _mlp_backward(self, a, dresid, dproj, l, nt):
        """dresid += the MLP branch's gradient given dproj (its output's), and layer l's fc1
        and fc2 (and ln2) gradients."""
        w, gw, pr = self._layers_p[l], self._layers_g[l], self.config.precision
        self._norm_forward(a.ln, a.ln2_mean[l], a.ln2_rstd[l], a.resid[2 * l + 1], w.ln2_w,
                           w.ln2_b, nt)  # recompute fc1's input
        dpre = a.dpre
        if a.recompute and a.fc1_pre_held != l:
            # fc1_pre again (the first backward after a forward finds the last layer's): the
            # GEMM forward ran, on the same bits, so the bits forward saw
            matmul.matmul_forward(a.fc1_pre[l], a.ln, w.fc1, nt, precision=pr)
            a.fc1_pre_held = l
        # Both of fc2's gradients from fc1_pre alone: relu(fc1_pre)^2 is redone while the
        # GEMM packs it, and the squared-ReLU backward runs in the write-back.
        matmul.matmul_sqrelu_backward(dpre, gw.fc2, dproj, a.fc1_pre[l], w.fc2, nt,
                                      precision=pr)
        matmul.matmul_backward(None, gw.fc1, dpre, a.ln, w.fc1, nt, precision=pr)
        dln = a.proj  # the branch gradient (proj or dresid) has been used up
        matmul.gemm(dln, dpre, w.fc1, False, False, False, nt, precision=pr)
        self._norm_backward(dresid, dln, a.resid[2 * l + 1], a.ln2_mean[l], a.ln2_rstd[l],
                            l, "ln2", nt)

    def _attention_backward(self, a, dresid, dproj, l, nt):
        """dresid += the attention branch's gradient given dproj (its output's), and layer l's
        wq | wk | wv and wo (and ln1) gradients."""
        w, gw, pr = self._layers_p[l], self._layers_g[l], self.config.precision
        if a.recompute:
            # qkv's input, then qkv again by forward's own call (datty has memory of its own)
            self._norm_forward(a.ln, a.ln1_mean[l], a.ln1_rstd[l], a.resid[2 * l], w.ln1_w,
                               w.ln1_b, nt)
            matmul.matmul_forward(a.qkv2[l], a.ln, w.wqkv, nt, precision=pr)
            a.fc1_pre_held = None
        matmul.gemm(a.datty.reshape(dproj.shape), dproj, w.wo, False, False, False, nt,
                    precision=pr)
        # The probabilities are recomputed inside, bit-identical to the forward's, and
        # with them the attention output, wo's input, for its weight gradient.
        attention.attention_backward(a.dqkv, a.datty, a.qkv[l], None, self.config.n_head, nt,
                                     accumulate=False, out=a.atty)
        matmul.matmul_backward(None, gw.wo, dproj, a.atty2, w.wo, nt, precision=pr)
        if not a.recompute:
            self._norm_forward(a.ln, a.ln1_mean[l], a.ln1_rstd[l], a.resid[2 * l], w.ln1_w,
                               w.ln1_b, nt)  # recompute the qkv matmul's input (datty is dead)
        matmul.matmul_backward(None, gw.wqkv, a.dqkv2, a.ln, w.wqkv, nt, precision=pr)
        dln = a.proj
        matmul.gemm(dln, a.dqkv2, w.wqkv, False, False, False, nt, precision=pr)
        self._norm_backward(dresid, dln, a.resid[2 * l], a.ln1_mean[l], a.ln1_rstd[l],
                            l, "ln1", nt)

    @staticmethod
    def _dropout_backward(a, dresid, drop, counters, offset, nt):
        """Gradient of a branch's output: the residual gradient through the dropout mask
        (recomputed from its counters (seed, step, layer, site) and offset), or the residual
        gradient itself when dropout is off."""
        if drop == 0.0:
            return dresid
        # dropout_forward writes dresid * mask: dropout_backward's value onto zeros, no fill
        activation.dropout_forward(a.proj, dresid, drop, *counters, nt, offset=offset)
        return a.proj
