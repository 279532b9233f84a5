"""The GPT on our kernels: parameter layout, init, exact gradients (against a float64 NumPy
reference model, itself checked by finite differences), dropout, thread-count independence,
learning, and input checks."""
import math

import numpy as np
import pytest

import ref_model
import randygpt
import randygpt._kernels as kernels
from conftest import (assert_bitwise_equal, assert_close, assert_grad_close, decay_mask,
                      numerical_grad)
from randygpt.config import Config
from randygpt.model import GPT, ParamTable
from randygpt._kernels.activation import dropout_mask

# Tiny and odd on purpose: head split 12 = 3 x 4, N = 10 rows, vocab 11.
TINY = dict(vocab_size=11, n_embd=12, n_head=3, n_layer=2, block_size=6)
NORMS = ["rmsnorm", "layernorm"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # Tiny shapes: a thread team costs more than the work, and on a busy machine a descheduled
    # team member stalls every kernel call (seconds per test). The thread-count test in
    # test_model.py proves multithreaded results bit-identical to these.
    monkeypatch.setattr(kernels, "_requested_threads", 1)


def tiny_config(**kw):
    return Config(**{**TINY, **kw})


def batch(rng, config, B, T):
    idx = rng.integers(0, config.vocab_size, size=(B, T))
    targets = rng.integers(0, config.vocab_size, size=(B, T))
    return idx, targets


def load_random(model, rng, std=0.2):
    """Random parameters big enough that attention is far from uniform and every gradient is
    well above float32 round-off. Returns them as a float64 dict for the reference."""
    p64 = ref_model.random_params(model.config, rng, std=std)
    model.load_flat_params(np.concatenate([p64[n].ravel() for n in model.table.names]))
    return {n: model.params[n].astype(np.float64) for n in model.table.names}


def kernel_masks(config, step, N):
    """The masks our kernels apply, as float64 arrays for the reference model."""
    masks = {}
    for layer in range(config.n_layer):
        for site in (0, 1):
            m = np.empty((N, config.n_embd), dtype=np.float32)
            dropout_mask(m, config.dropout, config.seed, step, layer, site, 1)
            masks[(layer, site)] = m.astype(np.float64)
    return masks


# ---------------------------------------------------------------------------------- layout

def test_default_parameter_count_and_order():
    config = Config()
    table = ParamTable(config)
    assert table.total == 4_769_280
    expected = ["wte", "wpe"]
    for i in range(6):
        expected += [f"h.{i}.{k}" for k in ("wq", "wk", "wv", "wo", "fc1", "fc2")]
    assert table.names == expected + ["lm_head"]
    assert table.offsets[0] == 0
    for k in range(1, len(table)):
        assert table.offsets[k] == table.offsets[k - 1] + table.sizes[k - 1]


@pytest.mark.parametrize("norm", NORMS)
def test_table_matches_reference_layout(norm):
    config = tiny_config(norm=norm)
    table = ParamTable(config)
    names_shapes = list(zip(table.names, table.shapes))
    assert names_shapes == ref_model.param_shapes(config)


@pytest.mark.parametrize("norm", NORMS)
def test_views_share_memory_with_flat_buffers(norm):
    model = GPT(tiny_config(norm=norm))
    for name in model.table.names:
        o, n = model.table.span(name)
        for views, flat in ((model.params, model.flat_params), (model.grads, model.flat_grads)):
            v = views[name]
            assert np.shares_memory(v, flat), name
            assert v.shape == model.table.shapes[model.table.names.index(name)]
            assert v.__array_interface__["data"][0] == flat[o:].__array_interface__["data"][0]
    # A write through the flat buffer shows up in the view, and the other way round.
    model.flat_params[:] = 0
    model.params["lm_head"][...] = 3.0
    o, n = model.table.span("lm_head")
    assert np.all(model.flat_params[o:o + n] == 3.0) and model.flat_params[:o].sum() == 0
    # wq, wk, wv are adjacent so one (3C, C) view feeds the qkv matmul.
    assert model.table.span("h.0.wk")[0] == sum(model.table.span("h.0.wq"))
    assert model.table.span("h.0.wv")[0] == sum(model.table.span("h.0.wk"))


def test_init_statistics():
    config = Config()
    model = GPT(config, seed=7)
    small = 0.02 / math.sqrt(2 * config.n_layer)
    for name in model.table.names:
        w = model.params[name].astype(np.float64)
        std = 0.01 if name == "wpe" else small if name.endswith((".wo", ".fc2")) else 0.02
        assert abs(w.mean()) < 4 * std / math.sqrt(w.size), name
        assert abs(w.std() / std - 1) < 0.05, (name, w.std(), std)
    # Same seed, same parameters; another seed, others.
    small = tiny_config()
    assert_bitwise_equal(GPT(small, seed=7).flat_params, GPT(small, seed=7).flat_params)
    assert not np.array_equal(GPT(small, seed=8).flat_params, GPT(small, seed=7).flat_params)


def test_layernorm_parameters_init_and_decay_mask():
    model = GPT(tiny_config(norm="layernorm"))
    for i in range(model.config.n_layer):
        for k in ("ln1", "ln2"):
            assert np.all(model.params[f"h.{i}.{k}.weight"] == 1)
            assert np.all(model.params[f"h.{i}.{k}.bias"] == 0)
    for name, shape in zip(model.table.names, model.table.shapes):
        o, n = model.table.span(name)
        assert np.all(decay_mask(model)[o:o + n] == (1 if len(shape) == 2 else 0)), name
    # The runs cover the buffer in order and neighbouring runs differ.
    spans = model.decay_spans
    assert spans[0][0] == 0 and spans[-1][1] == model.num_params
    assert all(a[1] == b[0] and a[2] != b[2] for a, b in zip(spans, spans[1:]))
    rms = GPT(tiny_config())
    assert rms.decay_spans == ((0, rms.num_params, True),)  # RMSNorm: matrices only


def test_initial_loss_is_near_log_vocab(rng):
    config = Config(dropout=0.0)
    model = GPT(config)
    idx, targets = batch(rng, config, 2, config.block_size)
    # At init the logits are ~1e-2, so the prediction is nearly uniform over the vocabulary.
    assert abs(model.forward(idx, targets) - math.log(config.vocab_size)) < 0.02


# ---------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_loss_and_every_gradient_match_reference(rng, norm, dropout):
    config = tiny_config(norm=norm, dropout=dropout)
    model = GPT(config)
    p64 = load_random(model, rng)
    B, T, step = 2, 5, 3
    idx, targets = batch(rng, config, B, T)
    loss = model.forward(idx, targets.astype(np.int32), step=step)
    model.backward()
    masks = kernel_masks(config, step, B * T) if dropout else None
    ref_loss, ref_grads = ref_model.loss_and_grads(p64, idx, targets, config, masks)
    # float32 kernels against float64: ~1e-7 relative per operation over a dozen layers of
    # operations, so 1e-4 leaves a wide margin while still catching any wrong term (those are
    # O(1) relative). atol is scaled by the tensor's largest entry because entries that cancel
    # to near zero carry absolute, not relative, round-off.
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    for name in model.table.names:
        e = ref_grads[name]
        assert np.abs(e).max() > 1e-3, f"{name}: reference gradient too small to be a test"
        assert_close(model.grads[name], e, rtol=1e-4, atol=1e-5 * np.abs(e).max(), name=name)


@pytest.mark.parametrize("norm", NORMS)
def test_logits_match_reference(rng, norm):
    config = tiny_config(norm=norm)
    model = GPT(config).eval()
    p64 = load_random(model, rng)
    idx, targets = batch(rng, config, 3, 4)
    logits = model.forward(idx)
    assert logits.shape == (3, 4, config.vocab_size) and logits.dtype == np.float32
    _, cache = ref_model.forward(p64, idx, targets, config)
    ref_logp = cache["logp"].reshape(3, 4, -1)
    got = logits.astype(np.float64)
    got_logp = got - got.max(-1, keepdims=True)
    got_logp -= np.log(np.exp(got_logp).sum(-1, keepdims=True))
    assert_close(got_logp, ref_logp, rtol=1e-4, atol=1e-5, name="log-probs")
    # The returned array is the caller's: a later forward must not change it.
    before = logits.copy()
    model.forward(idx[:, ::-1].copy())
    assert_bitwise_equal(logits, before)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_reference_gradients_match_finite_differences(rng, norm, dropout):
    config = Config(vocab_size=7, n_embd=8, n_head=2, n_layer=1, block_size=4, norm=norm,
                    dropout=dropout)
    params = ref_model.random_params(config, rng)
    idx, targets = batch(rng, config, 2, 4)
    masks = kernel_masks(config, 5, 8) if dropout else None
    if masks:
        assert any((m == 0).any() for m in masks.values())  # some units really are dropped
    _, grads = ref_model.loss_and_grads(params, idx, targets, config, masks)
    for name, p in params.items():
        numeric = numerical_grad(lambda: ref_model.forward(params, idx, targets, config, masks)[0],
                                 p, eps=1e-6)
        assert_grad_close(grads[name], numeric, rel=1e-6, name=name)


def test_recomputed_activation_is_bit_identical(rng):
    # Backward recomputes relu(fc1_pre)^2 with squared_relu_forward instead of storing what
    # the fused GEMM wrote in forward; the gradient is exact only if both agree to the bit.
    from randygpt._kernels import activation, matmul

    x = rng.standard_normal((37, 24)).astype(np.float32)
    w = rng.standard_normal((96, 24)).astype(np.float32)
    fused, pre, again = (np.empty((37, 96), dtype=np.float32) for _ in range(3))
    if not hasattr(matmul, "matmul_sqrelu_forward"):
        pytest.skip("no fused matmul + squared ReLU: forward uses squared_relu_forward itself")
    matmul.matmul_sqrelu_forward(fused, pre, x, w, 2)
    activation.squared_relu_forward(again, pre, 2)
    assert_bitwise_equal(again, fused, name="relu(pre)^2")


def test_backward_twice_gives_same_gradient(rng):
    model = GPT(tiny_config(dropout=0.1))
    load_random(model, rng)
    idx, targets = batch(rng, model.config, 2, 5)
    model.forward(idx, targets, step=1)
    model.backward()
    first = model.flat_grads.copy()
    model.backward()  # zeroes the gradient itself; nothing accumulates across calls
    assert_bitwise_equal(model.flat_grads, first)


def test_eval_backward_equals_train_backward_without_dropout(rng):
    # Eval computes the loss only, so backward derives dlogits itself; training gets them from
    # the fused loss kernel. Both must give the same gradient.
    model = GPT(tiny_config(dropout=0.0))
    load_random(model, rng)
    idx, targets = batch(rng, model.config, 2, 5)
    loss_train = model.train().forward(idx, targets)
    model.backward()
    g_train = model.flat_grads.copy()
    loss_eval = model.eval().forward(idx, targets)
    model.backward()
    assert loss_train == pytest.approx(loss_eval, rel=1e-6)
    assert_close(model.flat_grads, g_train, rtol=1e-5, atol=1e-7, name="flat_grads")


# ---------------------------------------------------------------------------------- dropout

def test_dropout_changes_training_loss_and_eval_is_deterministic(rng):
    model = GPT(tiny_config(dropout=0.2))
    load_random(model, rng)
    idx, targets = batch(rng, model.config, 2, 6)
    model.eval()
    e1, e2 = model.forward(idx, targets, step=1), model.forward(idx, targets, step=2)
    assert e1 == e2  # no dropout in eval, whatever the step
    model.train()
    t1 = model.forward(idx, targets, step=1)
    assert t1 != e1
    assert model.forward(idx, targets, step=1) == t1  # masks depend on the key only
    assert model.forward(idx, targets, step=2) != t1
    # The mask key includes config.seed.
    other = GPT(model.config.replace(seed=model.config.seed + 1))
    other.load_flat_params(model.flat_params)
    assert other.forward(idx, targets, step=1) != t1


# ---------------------------------------------------------------------------------- threads

@pytest.mark.parametrize("norm", NORMS)
def test_bit_identical_for_any_thread_count(rng, norm, monkeypatch):
    # The thread resolver caps requests at the usable CPUs; pretend there are 4 so that 3
    # threads really run (oversubscribed on a 2-core machine, which is the point).
    monkeypatch.setattr(kernels, "usable_cpus", lambda: 4)
    # Large enough that every kernel splits its work between threads, and N = 320 rows is more
    # than one of the GEMM's K blocks (256) in the weight gradients.
    config = Config(vocab_size=13, n_embd=32, n_head=4, n_layer=2, block_size=16, norm=norm,
                    dropout=0.1)
    idx, targets = batch(rng, config, 20, 16)
    results = []
    for n in (1, 2, 3):
        model = GPT(config, seed=3, n_threads=n)
        assert model.n_threads == (n if randygpt.openmp_enabled() else 1)
        loss = model.forward(idx, targets, step=4)
        model.backward()
        logits = model.eval().forward(idx)
        results.append((loss, model.flat_grads.copy(), logits))
    for loss, grads, logits in results[1:]:
        assert loss == results[0][0]
        assert_bitwise_equal(grads, results[0][1], name="flat_grads")
        assert_bitwise_equal(logits, results[0][2], name="logits")


# ---------------------------------------------------------------------------------- learning

def test_overfits_one_batch(rng):
    from randygpt.optim import AdamW

    config = tiny_config(n_embd=16, n_head=2, block_size=8, dropout=0.0, lr=1e-2)
    model = GPT(config, seed=0)
    opt = AdamW(model, config)
    idx, targets = batch(rng, config, 4, 8)
    first = model.forward(idx, targets)
    for step in range(50):
        loss = model.forward(idx, targets, step=step)
        model.backward()
        opt.step(config.lr)
    # From ln(11) = 2.40 a model that memorises the 32 (random) targets drops far below it;
    # one that learns nothing but the unigram frequencies stays near 2.
    assert first == pytest.approx(math.log(11), abs=0.02)
    assert loss < 0.5, loss


def test_training_step_allocates_nothing(rng):
    import tracemalloc

    model = GPT(Config(vocab_size=11, n_embd=32, n_head=4, n_layer=2, block_size=16))
    idx, targets = batch(rng, model.config, 4, 16)  # int64: converted into the arena's int32
    model.forward(idx, targets, step=0)
    model.backward()
    tracemalloc.start()  # NumPy reports its array buffers to tracemalloc
    try:
        model.forward(idx, targets, step=1)
        model.backward()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A few Python objects per call, but no activation-sized array (the smallest, one
    # (N, C) buffer, is 8 KB here; the arena is hundreds of KB).
    assert peak < 8192, peak


def test_arena_is_reallocated_only_when_shape_changes(rng):
    model = GPT(tiny_config())
    idx, targets = batch(rng, model.config, 2, 5)
    l1 = model.forward(idx, targets)
    arena = model._arena
    model.forward(idx, targets)
    assert model._arena is arena
    model.forward(idx[:1], targets[:1])
    assert model._arena is not arena
    assert model.forward(idx, targets) == l1


@pytest.mark.parametrize("norm", NORMS)
def test_arena_saves_only_what_backward_cannot_redo(norm):
    # Saved per layer: two residual streams, qkv and fc1's pre-activation (plus one stream for
    # lm_head and the norms' per-row statistics); everything else is one set of scratch
    # buffers shared by all layers: no per-layer attention probabilities or outputs.
    from randygpt.model import ActivationArena

    config = Config(norm=norm)
    B, T = config.batch_size, config.block_size
    L, C, H, V = config.n_layer, config.n_embd, config.mlp_hidden, config.vocab_size
    N = B * T
    stats = (4 if norm == "layernorm" else 2) * L * N
    saved = (2 * L + 1) * N * C + L * N * 3 * C + L * N * H + stats
    scratch = 3 * N * C + 2 * N * V + N + max(N * H, 4 * N * C)
    arena = ActivationArena(config, B, T)  # zero pages: nothing is touched here
    assert arena.total == saved + scratch
    assert arena.buffer.nbytes < 128 * 2**20  # the default step's arena (issue: 256 MB RSS)


# ---------------------------------------------------------------------------------- inputs

def test_bad_inputs_raise(rng):
    config = tiny_config()
    model = GPT(config)
    idx, targets = batch(rng, config, 2, 5)
    with pytest.raises(RuntimeError, match="forward"):
        model.backward()
    bad = idx.copy()
    bad[1, 2] = config.vocab_size
    with pytest.raises(ValueError, match="idx"):
        model.forward(bad, targets)
    with pytest.raises(ValueError, match="targets"):
        model.forward(idx, -1 - targets)
    long = rng.integers(0, config.vocab_size, size=(2, config.block_size + 1))
    with pytest.raises(ValueError, match="block_size"):
        model.forward(long, long)
    with pytest.raises(ValueError, match="2-D"):
        model.forward(idx[0], targets[0])
    with pytest.raises(ValueError, match="2-D"):
        model.forward(idx[None], targets[None])
    with pytest.raises(ValueError, match="shape"):
        model.forward(idx, targets[:, :4])
    with pytest.raises(TypeError, match="idx"):
        model.forward(idx.astype(np.float32), targets)
    with pytest.raises(ValueError, match="step"):
        model.forward(idx, targets, step=-1)
    with pytest.raises(ValueError, match="params"):
        model.load_flat_params(np.zeros(model.num_params + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="threads"):
        GPT(config, n_threads=0)
    with pytest.raises(TypeError, match="config"):
        GPT(config.to_dict())


# ---------------------------------------------------------------------------------- config

def test_config_round_trip_and_validation():
    config = Config(n_layer=2, norm="layernorm", lr=3e-4)
    assert Config.from_dict(config.to_dict()) == config
    assert config.replace(dropout=0.0).dropout == 0.0
    with pytest.raises(ValueError, match="unknown"):
        Config.from_dict({**config.to_dict(), "n_embed": 3})
    for kw, field in [({"n_embd": 30}, "n_embd"), ({"n_layer": 0}, "n_layer"),
                      ({"dropout": 1.0}, "dropout"), ({"dropout": -0.1}, "dropout"),
                      ({"norm": "batchnorm"}, "norm"), ({"lr": 0.0}, "lr"),
                      ({"vocab_size": 2.5}, "vocab_size"), ({"beta2": 1.0}, "beta2"),
                      ({"norm_eps": 0.0}, "norm_eps"), ({"warmup_start": 2.0}, "warmup_start")]:
        with pytest.raises(ValueError, match=field):
            Config(**kw)
    with pytest.raises(Exception):
        config.lr = 1.0  # frozen


def test_batch_offset_splits_a_batch_as_data_parallel_ranks_do(rng):
    # A batch cut into slices, each run with its batch_offset (as each rank runs its rows),
    # sees the dropout masks of the whole batch: the slices' mean loss and mean gradient equal
    # the whole batch's to float32 rounding. Without the offset every slice would reuse the
    # masks of the batch's first rows, which this check catches (asserted below).
    config = tiny_config(dropout=0.3)
    model = GPT(config, seed=2, n_threads=1)
    load_random(model, rng)
    idx, targets = batch(rng, config, 6, config.block_size)
    whole = model.forward(idx, targets, step=5)
    model.backward()
    g_whole = model.flat_grads.copy()

    def split(offsets):
        losses, grads = [], np.zeros_like(g_whole)
        for k, lo in enumerate((0, 2, 4)):
            losses.append(model.forward(idx[lo:lo + 2], targets[lo:lo + 2], step=5,
                                        batch_offset=offsets[k]))
            model.backward()
            grads += model.flat_grads
        return sum(losses) / 3, grads / 3

    loss, grads = split((0, 2, 4))
    assert loss == pytest.approx(whole, rel=1e-6)
    assert_close(grads, g_whole, rtol=1e-4, atol=1e-6 * np.abs(g_whole).max(), name="gradient")
    wrong_loss, _ = split((0, 0, 0))
    assert abs(wrong_loss - whole) > 1e-4 * abs(whole)
    with pytest.raises(ValueError, match="batch_offset"):
        model.forward(idx, targets, batch_offset=-1)
