"""The activation arena's recompute plan (the bf16 default): one layer's qkv and fc1
pre-activation instead of every layer's, the two GEMMs redone in backward. It must give the
saved plan's bits (loss, gradients, weights after AdamW) and hold what it claims."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from randygpt.config import Config
from randygpt.model import GPT, ActivationArena
from randygpt.optim import AdamW

from conftest import assert_bitwise_equal

TINY = dict(vocab_size=11, n_embd=16, n_head=2, n_layer=3, block_size=8, batch_size=4,
            dropout=0.1)


def _run(config, recompute, n_threads, steps=3):
    """Losses, gradients (each step's) and the final weights of `steps` AdamW steps."""
    model = GPT(config, seed=0, n_threads=n_threads, recompute=recompute)
    opt = AdamW(model, config, n_threads=n_threads)
    rng = np.random.default_rng(7)
    losses, grads = [], []
    for it in range(steps):
        idx = rng.integers(0, config.vocab_size, (4, 8))
        targets = rng.integers(0, config.vocab_size, (4, 8))
        losses.append(model.forward(idx, targets, step=it))
        model.backward()
        grads.append(model.flat_grads.copy())
        opt.step(1e-2)
    assert model._arena.recompute is recompute
    return losses, grads, model.flat_params.copy()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_recompute_gives_the_saved_plans_bits(norm, precision):
    config = Config(**TINY, norm=norm, precision=precision)
    saved = _run(config, False, 1)
    for n_threads in (1, 2):
        losses, grads, params = _run(config, True, n_threads)
        assert losses == saved[0], n_threads
        for it, (g, g_saved) in enumerate(zip(grads, saved[1])):
            assert_bitwise_equal(g, g_saved, name=f"gradient of step {it} at {n_threads} threads")
        assert_bitwise_equal(params, saved[2], name=f"weights at {n_threads} threads")


@pytest.mark.parametrize("n_layer", [1, 3])
@pytest.mark.parametrize("recompute", [False, True])
def test_a_second_backward_gives_the_same_gradient(recompute, n_layer):
    # The recompute plan's backward starts from the last layer's fc1_pre, left in redo by
    # forward; a second backward finds a q | k | v there (with one layer, that of the very
    # layer whose fc1_pre it wants) and must redo it.
    config = Config(**{**TINY, "n_layer": n_layer}, precision="bf16")
    model = GPT(config, seed=0, n_threads=1, recompute=recompute)
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, 11, (2, 3, 8))
    model.forward(idx, targets, step=2)
    model.backward()
    first = model.flat_grads.copy()
    model.backward()
    assert_bitwise_equal(model.flat_grads, first, name="second backward")
    reference = GPT(config, seed=0, n_threads=1, recompute=not recompute)
    reference.forward(idx, targets, step=2)
    reference.backward()
    assert_bitwise_equal(reference.flat_grads, first, name="the other plan")


def test_bf16_recomputes_and_fp32_saves_by_default():
    assert GPT(Config(**TINY, precision="bf16")).recompute is True
    assert GPT(Config(**TINY)).recompute is False


def test_changing_the_plan_reallocates_the_arena():
    model = GPT(Config(**TINY, precision="bf16"), seed=0, n_threads=1)
    rng = np.random.default_rng(2)
    idx, targets = rng.integers(0, 11, (2, 4, 8))
    loss = model.forward(idx, targets)
    assert model._arena.recompute
    model.recompute = False
    assert model.forward(idx, targets) == loss
    assert not model._arena.recompute


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_the_recompute_arena_is_smaller_by_every_layer_but_one(norm):
    # Saved plan: L layers of qkv (N, 3C) and fc1_pre (N, H). Recompute plan: one buffer of
    # max(N H, 4 N C) floats for the layer in hand (H = 4C: N H), so (L - 1) N H + 3 L N C
    # fewer floats, 76 MiB at the default size.
    config = Config(norm=norm, precision="bf16")
    B, T = config.batch_size, config.block_size
    L, C, H = config.n_layer, config.n_embd, config.mlp_hidden
    N = B * T
    saved = ActivationArena(config, B, T, recompute=False)  # zero pages: nothing touched
    redo = ActivationArena(config, B, T)
    assert redo.recompute
    assert saved.total - redo.total == (L - 1) * N * H + 3 * L * N * C
    assert (saved.nbytes - redo.nbytes) / 2**20 == 76.0
    for arena in (saved, redo):
        assert ActivationArena.nbytes_for(config, B, T, arena.recompute) == arena.nbytes
        memory = GPT.training_memory(config, B, T, 1, recompute=arena.recompute)
        assert memory["activations"] == arena.nbytes
    assert GPT.training_memory(config, B, T, 1)["activations"] == redo.nbytes
    # Every layer's q | k | v and fc1_pre are views of the one buffer (so backward must redo
    # them), and datty lies beside q | k | v, clear of the buffers the attention backward
    # reads and writes.
    assert all(np.shares_memory(q, redo.redo) for q in redo.qkv + redo.fc1_pre)
    for other in (redo.qkv[0], redo.dqkv, redo.atty, redo.ln, redo.proj):
        assert not np.shares_memory(redo.datty, other)


@pytest.mark.slow
def test_a_default_bf16_training_step_peaks_under_200_mib():
    # The target, in a process of its own: parameters, gradients and both AdamW
    # moments (73 MiB), the arena (49 MiB) and the interpreter with NumPy and our kernels.
    # VmHWM, not ru_maxrss: the latter keeps the peak of the (v)forked pytest the child was
    # before its exec, hundreds of MiB late in the suite.
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux's /proc/self/status (VmHWM)")
    code = """
import json
import numpy as np
from randygpt.config import Config
from randygpt.model import GPT
from randygpt.optim import AdamW
cfg = Config(vocab_size=65, precision="bf16")
model = GPT(cfg, n_threads=1)
opt = AdamW(model, cfg, n_threads=1)
rng = np.random.default_rng(0)
for it in range(2):
    idx, targets = rng.integers(0, 65, (2, cfg.batch_size, cfg.block_size))
    model.forward(idx, targets, step=it)
    model.backward()
    opt.step(1e-3)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print(json.dumps({"peak_mib": int(hwm[0].split()[1]) / 1024,
                  "arena_mib": model._arena.nbytes / 2**20}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["arena_mib"] < 50, result
    assert result["peak_mib"] <= 200, result
