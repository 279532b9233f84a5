"""AdamW on the flat buffers, the learning-rate schedule and the clipping factor."""
import math

import numpy as np
import pytest

import randygpt._kernels as kernels
from conftest import assert_close, decay_mask
from randygpt.config import Config
from randygpt.model import GPT
from randygpt.optim import AdamW, clip_scale, decay_runs, lr_at

CONFIG = Config(lr=1e-3, warmup_iters=100, warmup_start=0.1, decay_start=0.8, min_lr_ratio=0.1)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # Tiny shapes: a thread team costs more than the work, and on a busy machine a descheduled
    # team member stalls every kernel call (seconds per test). The thread-count test in
    # test_model.py proves multithreaded results bit-identical to these.
    monkeypatch.setattr(kernels, "_requested_threads", 1)


def test_lr_warmup_plateau_and_cosine_to_min():
    total = 1000
    lrs = [lr_at(it, total, CONFIG) for it in range(total)]
    assert lrs[0] == pytest.approx(1e-4)          # warmup starts at 10% of the peak
    assert lrs[50] == pytest.approx(5.5e-4)       # halfway through the linear warmup
    assert lrs[100] == pytest.approx(1e-3)        # peak once warmup is done
    assert all(lr == 1e-3 for lr in lrs[100:800])  # constant until 80% of the run
    assert lrs[-1] == pytest.approx(1e-4)         # ends exactly at min_lr_ratio * peak
    assert all(a >= b for a, b in zip(lrs[800:], lrs[801:]))  # the decay never goes back up
    assert all(a < b for a, b in zip(lrs[:99], lrs[1:100]))   # the warmup always climbs
    # Halfway through the cosine (800 -> 999) the rate is halfway between peak and floor.
    mid = lr_at(900, 1001, CONFIG)  # decay from 800.8 to 1000: 900.4 is the midpoint
    assert 5.5e-4 < mid < 5.6e-4


def test_lr_short_run_and_bad_iteration():
    config = CONFIG.replace(warmup_iters=0)
    assert lr_at(0, 1, config) == pytest.approx(config.lr * config.min_lr_ratio)
    assert lr_at(0, 10, config) == config.lr
    assert lr_at(1, 2, config) == pytest.approx(config.lr * config.min_lr_ratio)
    for it, total in [(-1, 10), (10, 10), (0, 0)]:
        with pytest.raises(ValueError):
            lr_at(it, total, CONFIG)


def test_clip_scale():
    assert clip_scale(0.5, 1.0) == 1.0
    assert clip_scale(4.0, 1.0) == pytest.approx(0.25, rel=1e-6)
    assert clip_scale(4.0, 2.0) * 4.0 == pytest.approx(2.0, rel=1e-6)
    assert clip_scale(0.0, 1.0) == 1.0
    assert clip_scale(1e9, 0.0) == 1.0  # max_norm 0 turns clipping off


def numpy_adamw(p, g, m, v, mask, lr, c, t, scale):
    """Textbook AdamW with decoupled weight decay, in float64."""
    g = g * scale
    m = c.beta1 * m + (1 - c.beta1) * g
    v = c.beta2 * v + (1 - c.beta2) * g * g
    mhat = m / (1 - c.beta1 ** t)
    vhat = v / (1 - c.beta2 ** t)
    p = p - lr * c.weight_decay * p * mask
    p = p - lr * mhat / (np.sqrt(vhat) + c.adam_eps)
    return p, m, v


def test_adamw_matches_numpy(rng):
    P = 5000
    c = CONFIG.replace(weight_decay=0.1)
    params = rng.standard_normal(P).astype(np.float32)
    grads = np.zeros(P, dtype=np.float32)
    mask = (rng.random(P) < 0.7).astype(np.uint8)
    opt = AdamW((params, grads, mask), c)
    p64, m64, v64 = params.astype(np.float64), np.zeros(P), np.zeros(P)
    for t, (lr, scale) in enumerate([(1e-3, 1.0), (5e-4, 0.3), (2e-3, 1.0)], start=1):
        grads[...] = rng.standard_normal(P)
        opt.step(lr, grad_scale=scale)
        p64, m64, v64 = numpy_adamw(p64, grads.astype(np.float64), m64, v64, mask, lr, c, t,
                                    scale)
    assert opt.t == 3
    # float32 state against float64: each step moves a parameter by ~lr, so an absolute error
    # far below lr * 1e-3 shows the same arithmetic.
    assert_close(opt.m, m64, rtol=1e-5, atol=1e-7, name="m")
    assert_close(opt.v, v64, rtol=1e-5, atol=1e-8, name="v")
    assert_close(params, p64, rtol=1e-6, atol=1e-6, name="params")
    assert opt.grad_norm() == pytest.approx(np.linalg.norm(grads.astype(np.float64)), rel=1e-6)


def test_weight_decay_only_on_matrices():
    c = Config(vocab_size=11, n_embd=12, n_head=3, n_layer=2, block_size=6, norm="layernorm",
               weight_decay=0.5)
    model = GPT(c)
    for i in range(c.n_layer):  # gains and biases away from their init, so decay would show
        model.params[f"h.{i}.ln1.bias"][...] = 0.5
        model.params[f"h.{i}.ln2.weight"][...] = 2.0
    before = model.flat_params.copy()
    opt = AdamW(model, c)
    opt.step(0.1)  # zero gradient: the only change is the decoupled decay
    for name, shape in zip(model.table.names, model.table.shapes):
        o, n = model.table.span(name)
        factor = (1 - 0.1 * 0.5) if len(shape) == 2 else 1.0
        assert_close(model.flat_params[o:o + n], before[o:o + n] * factor, rtol=1e-6,
                     atol=0, name=name)


def test_state_dict_round_trip_and_checks(rng):
    model = GPT(Config(vocab_size=11, n_embd=12, n_head=3, n_layer=1, block_size=6))
    opt = AdamW(model, model.config)
    model.flat_grads[...] = rng.standard_normal(model.num_params)
    opt.step(1e-3)
    opt.step(1e-3)
    state = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in opt.state_dict().items()}
    other = AdamW(model, model.config)
    other.load_state_dict(state)
    assert other.t == 2
    np.testing.assert_array_equal(other.m, opt.m)
    np.testing.assert_array_equal(other.v, opt.v)
    with pytest.raises(ValueError, match="'m'"):
        other.load_state_dict({**state, "m": state["m"][:-1]})
    with pytest.raises(ValueError, match="'t'"):
        other.load_state_dict({**state, "t": -1})
    with pytest.raises(TypeError, match="grads"):
        AdamW((model.flat_params, model.flat_grads.astype(np.float64), decay_mask(model)),
              model.config)


def test_decay_runs():
    assert decay_runs([]) == []
    assert decay_runs([True]) == [(0, 1, True)]
    assert decay_runs([1, 1, 0, 0, 0, 1]) == [(0, 2, True), (2, 5, False), (5, 6, True)]
    flags = np.random.default_rng(0).random(1000) < 0.5
    runs = decay_runs(flags)
    rebuilt = np.concatenate([np.full(hi - lo, d) for lo, hi, d in runs])
    np.testing.assert_array_equal(rebuilt, flags)
    assert all(a[2] != b[2] for a, b in zip(runs, runs[1:]))
    with pytest.raises(ValueError, match="1-D"):
        decay_runs(np.ones((2, 2), bool))


def test_model_runs_and_mask_give_the_same_step(rng):
    # The optimizer of a LayerNorm model (decayed matrices between undecayed gains and biases)
    # steps exactly as one given the same rule as a per-parameter mask.
    model = GPT(Config(vocab_size=11, n_embd=16, n_head=2, n_layer=2, block_size=8,
                       norm="layernorm", weight_decay=0.3), seed=5)
    assert len(model.decay_spans) > 1
    other = (model.flat_params.copy(), model.flat_grads, decay_mask(model))
    a, b = AdamW(model, model.config), AdamW(other, model.config)
    model.flat_grads[...] = rng.standard_normal(model.num_params)
    for _ in range(2):
        a.step(1e-2, grad_scale=0.5)
        b.step(1e-2, grad_scale=0.5)
    np.testing.assert_array_equal(model.flat_params, other[0])
