"""Optimizer kernels: grad_norm and adamw_step against the NumPy reference, the reference
against a step worked out by hand and (when installed) against torch.optim.AdamW,
thread-count independence and bad input."""
import math

import numpy as np
import pytest

from conftest import assert_bitwise_equal, assert_close, thread_counts
from randygpt._kernels import adamw
from randygpt._kernels.reference import adamw_step_ref, grad_norm_ref

HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
REAL_P = 4_769_280


def make_state(rng, P, dtype=np.float32, warm=True):
    params = rng.standard_normal(P, dtype=dtype)
    grads = rng.standard_normal(P, dtype=dtype)
    m = dtype(0.1) * rng.standard_normal(P, dtype=dtype) if warm else np.zeros(P, dtype)
    v = dtype(0.01) * rng.random(P, dtype=dtype) if warm else np.zeros(P, dtype)
    return params, grads, m, v


def step_both(rng, P, step, grad_scale=1.0, n_threads=2, decay=True):
    params, grads, m, v = make_state(rng, P)
    ours = [params.copy(), grads, m.copy(), v.copy(), decay]
    ref = [params.copy(), grads, m.copy(), v.copy(), decay]
    adamw.adamw_step(*ours, **HYPER, step=step, grad_scale=grad_scale, n_threads=n_threads)
    adamw_step_ref(*ref, **HYPER, step=step, grad_scale=grad_scale)
    return ours, ref


# ---- grad_norm --------------------------------------------------------------------------------

@pytest.mark.parametrize("P", [1, 7, 1001, 4096 * 3 + 5, 300_007])
def test_grad_norm_matches_reference(rng, P):
    g = rng.standard_normal(P).astype(np.float32)
    norm = adamw.grad_norm(g, 2)
    assert isinstance(norm, float)
    # Both sum float32 squares in float64; only the summation order differs.
    assert norm == pytest.approx(grad_norm_ref(g), rel=1e-12)
    if P <= 2000:  # an exactly rounded sum as a second, independent reference
        assert norm == pytest.approx(math.sqrt(math.fsum(float(x) ** 2 for x in g)), rel=1e-14)


def test_grad_norm_empty_and_zero():
    assert adamw.grad_norm(np.zeros(0, np.float32), 1) == 0.0
    assert adamw.grad_norm(np.zeros(5, np.float32), 1) == 0.0


@pytest.mark.parametrize("P", [4096 * 3 + 5, 300_007])
def test_grad_norm_deterministic_across_threads(rng, P):
    g = rng.standard_normal(P).astype(np.float32)
    norms = [adamw.grad_norm(g, n) for n in thread_counts()]
    assert norms[1:] == norms[:-1], norms


def test_grad_norm_bad_input(rng):
    with pytest.raises(TypeError, match="g must be float32"):
        adamw.grad_norm(np.ones(4), 1)
    with pytest.raises(ValueError, match="g must be 1-D"):
        adamw.grad_norm(np.ones((2, 2), np.float32), 1)
    with pytest.raises(ValueError, match="g must be C-contiguous"):
        adamw.grad_norm(np.ones(8, np.float32)[::2], 1)
    with pytest.raises(ValueError, match=r"n_threads must be in \[1, \d+\], got 0"):
        adamw.grad_norm(np.ones(4, np.float32), 0)


# ---- adamw_step -------------------------------------------------------------------------------

@pytest.mark.parametrize("P", [1, 7, 1001, 16384 * 2 + 3])
@pytest.mark.parametrize("step", [1, 2, 1000])
@pytest.mark.parametrize("decay", [True, False])
def test_adamw_matches_reference(rng, P, step, decay):
    ours, ref = step_both(rng, P, step, grad_scale=0.37, decay=decay)
    for name, i in (("params", 0), ("m", 2), ("v", 3)):
        assert_close(ours[i], ref[i], rtol=1e-5, atol=1e-7, name=name)


@pytest.mark.slow
def test_adamw_real_size(rng):
    ours, ref = step_both(rng, REAL_P, 5)
    for name, i in (("params", 0), ("m", 2), ("v", 3)):
        assert_close(ours[i], ref[i], rtol=1e-5, atol=1e-7, name=name)
    g = ours[1]
    assert adamw.grad_norm(g, 2) == pytest.approx(grad_norm_ref(g), rel=1e-12)


def test_adamw_deterministic_across_threads(rng):
    P = 16384 * 3 + 11  # several adamw chunks, the last one partial
    runs = [step_both(np.random.default_rng(7), P, 3, n_threads=n)[0] for n in thread_counts()]
    for run in runs[1:]:
        for name, i in (("params", 0), ("m", 2), ("v", 3)):
            assert_bitwise_equal(run[i], runs[0][i], name=name)


def test_reference_against_hand_computed_steps():
    # Two steps on three parameters in plain Python floats, straight from the AdamW formula.
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.99, 1e-8, 0.5
    p0 = [1.0, -2.0, 0.5]
    g1 = [0.5, 0.25, -1.0]
    g2 = [-0.5, 0.75, 2.0]
    mask = [1, 0, 1]
    scale = 0.5
    p, m, v = list(p0), [0.0] * 3, [0.0] * 3
    for t, g in ((1, g1), (2, g2)):
        for i in range(3):
            gi = g[i] * scale
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            mhat = m[i] / (1 - b1 ** t)
            vhat = v[i] / (1 - b2 ** t)
            p[i] = p[i] * (1 - lr * wd * mask[i]) - lr * mhat / (math.sqrt(vhat) + eps)
    # After step 1 with zero moments, the Adam part is lr * sign(g): check the hand values too.
    P = np.array(p0)
    M, Vv = np.zeros(3), np.zeros(3)

    def ref_step(g, t):  # one call per parameter, with its own decay flag
        for i in range(3):
            adamw_step_ref(P[i:i + 1], np.array(g[i:i + 1]), M[i:i + 1], Vv[i:i + 1],
                           bool(mask[i]), lr, b1, b2, eps, wd, t, scale)

    ref_step(g1, 1)
    expected1 = [p0[i] * (1 - lr * wd * mask[i]) - lr * math.copysign(1, g1[i]) for i in range(3)]
    np.testing.assert_allclose(P, expected1, rtol=1e-7)
    ref_step(g2, 2)
    np.testing.assert_allclose(P, p, rtol=1e-12)
    np.testing.assert_allclose(M, m, rtol=1e-12)
    np.testing.assert_allclose(Vv, v, rtol=1e-12)


def test_reference_against_torch(rng):
    torch = pytest.importorskip("torch")
    P = 50
    params, _, _, _ = make_state(rng, P, dtype=np.float64, warm=False)
    mask = rng.random(P) < 0.7
    grads = [rng.standard_normal(P) for _ in range(3)]
    hp = dict(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.3)
    decay = torch.tensor(params[mask], requires_grad=True)
    no_decay = torch.tensor(params[~mask], requires_grad=True)
    opt = torch.optim.AdamW(
        [{"params": [decay], "weight_decay": hp["weight_decay"]},
         {"params": [no_decay], "weight_decay": 0.0}],
        lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"])
    # Our reference on each group as its own flat buffer, like the optimizer's runs.
    ref = {flag: [params[mask == flag].copy(), np.zeros((mask == flag).sum()),
                  np.zeros((mask == flag).sum())] for flag in (True, False)}
    for t, g in enumerate(grads, start=1):
        decay.grad = torch.tensor(g[mask])
        no_decay.grad = torch.tensor(g[~mask])
        opt.step()
        for flag, (p, m, v) in ref.items():
            adamw_step_ref(p, g[mask == flag], m, v, flag, **hp, step=t, grad_scale=1.0)
    with torch.no_grad():
        (pd, md, _), (pn, _, vn) = ref[True], ref[False]
        np.testing.assert_allclose(pd, decay.numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(pn, no_decay.numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(md, opt.state[decay]["exp_avg"].numpy(), rtol=1e-12)
        np.testing.assert_allclose(vn, opt.state[no_decay]["exp_avg_sq"].numpy(),
                                   rtol=1e-12)


def test_decay_and_grad_scale(rng):
    P = 1001
    params, grads, _, _ = make_state(rng, P)
    # Zero gradient and moments: the Adam part is exactly zero, only the decay moves params.
    for decay in (True, False):
        p = params.copy()
        adamw.adamw_step(p, np.zeros(P, np.float32), np.zeros(P, np.float32),
                         np.zeros(P, np.float32), decay, **HYPER, step=1, grad_scale=1.0,
                         n_threads=2)
        decayed = params * np.float32(1 - HYPER["lr"] * HYPER["weight_decay"])
        assert_bitwise_equal(p, decayed if decay else params, name=f"params (decay={decay})")
    # grad_scale multiplies the gradient: scaling by 0.5 here equals halving it beforehand.
    a = [params.copy(), grads, np.zeros(P, np.float32), np.zeros(P, np.float32)]
    b = [params.copy(), grads * np.float32(0.5), np.zeros(P, np.float32), np.zeros(P, np.float32)]
    adamw.adamw_step(*a, True, **HYPER, step=2, grad_scale=0.5, n_threads=2)
    adamw.adamw_step(*b, True, **HYPER, step=2, grad_scale=1.0, n_threads=2)
    for x, y, name in zip(a, b, ("params", "grads", "m", "v")):
        if name != "grads":
            assert_bitwise_equal(x, y, name=name)


def test_adamw_bad_input(rng):
    P = 9
    params, grads, m, v = make_state(rng, P)
    before = [params.copy(), m.copy(), v.copy()]

    def call(**over):
        args = dict(params=params, grads=grads, m=m, v=v, decay=True, **HYPER, step=1,
                    grad_scale=1.0, n_threads=1)
        args.update(over)
        adamw.adamw_step(**args)

    with pytest.raises(ValueError, match=r"step must be in \[1, 9223372036854775807\] "
                                         r"\(the first step is 1; a 64-bit counter\), got 0"):
        call(step=0)
    with pytest.raises(ValueError, match="step must be in"):
        call(step=2**64)  # would overflow the double of the bias corrections
    with pytest.raises(TypeError, match="step must be an int"):
        call(step=1.0)
    with pytest.raises(TypeError, match="decay must be a bool, got int"):
        call(decay=1)
    with pytest.raises(TypeError, match="decay must be a bool, got ndarray"):
        call(decay=np.ones(P, np.uint8))
    with pytest.raises(TypeError, match="grads must be float32"):
        call(grads=grads.astype(np.float64))
    with pytest.raises(ValueError, match=r"m has shape \(8,\), expected \(9,\) \(same as params\)"):
        call(m=m[:8].copy())
    with pytest.raises(ValueError, match="v must be C-contiguous"):
        call(v=np.zeros(2 * P, np.float32)[::2])
    with pytest.raises(ValueError, match="m .* must not share memory with v"):
        call(v=m)
    with pytest.raises(ValueError, match="params .* must not share memory with grads"):
        call(grads=params)
    big = np.zeros(2 * P, np.float32)
    with pytest.raises(ValueError, match="m .* must not share memory with grads"):
        call(grads=big[:P], m=big[P - 1: 2 * P - 1])
    with pytest.raises(ValueError, match="lr must be finite"):
        call(lr=float("nan"))
    with pytest.raises(ValueError, match="eps must be finite"):
        call(eps=float("inf"))
    with pytest.raises(ValueError, match=r"beta1 must be finite and in \[0, 1\), got 1.0"):
        call(beta1=1.0)
    with pytest.raises(ValueError, match=r"beta2 must be finite and in \[0, 1\), got -0.1"):
        call(beta2=-0.1)
    with pytest.raises(ValueError, match="grad_scale must be finite"):
        call(grad_scale=float("nan"))
    with pytest.raises(TypeError, match="lr must be a real number"):
        call(lr="0.1")
    with pytest.raises(ValueError, match=r"n_threads must be in \[1, \d+\], got 0"):
        call(n_threads=0)
    # Nothing was touched by the rejected calls.
    for got, want, name in zip((params, m, v), before, ("params", "m", "v")):
        assert_bitwise_equal(got, want, name=name)


def test_adamw_read_only_state_rejected(rng):
    params, grads, m, v = make_state(rng, 9)
    v.flags.writeable = False
    with pytest.raises(ValueError, match="v must be writeable"):
        adamw.adamw_step(params, grads, m, v, True, **HYPER, step=1, grad_scale=1.0, n_threads=1)
