"""Our GPT against the same architecture written in PyTorch (randygpt.torch_ref): loss, every
gradient, and a few AdamW steps with global-norm clipping. Dropout 0: torch's masks differ."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import randygpt._kernels as kernels  # noqa: E402
from conftest import assert_close  # noqa: E402
from randygpt.config import Config  # noqa: E402
from randygpt.model import GPT  # noqa: E402
from randygpt.optim import AdamW, clip_scale  # noqa: E402
from randygpt.torch_ref import (build_torch_gpt, export_grads, load_params, our_name,  # noqa: E402
                                torch_name)

NORMS = ["rmsnorm", "layernorm"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    # Tiny shapes: a thread team costs more than the work, and on a busy machine a descheduled
    # team member stalls every kernel call (seconds per test). The thread-count test in
    # test_model.py proves multithreaded results bit-identical to these.
    monkeypatch.setattr(kernels, "_requested_threads", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(norm, **kw):
    return Config(vocab_size=11, n_embd=12, n_head=3, n_layer=2, block_size=8, norm=norm,
                  dropout=0.0, **kw)


def make_pair(config, rng, std=0.2):
    """Our model with random parameters (big enough for non-trivial attention) and a torch
    twin holding the same values."""
    model = GPT(config)
    model.flat_params[...] = std * rng.standard_normal(model.num_params)
    for name in model.table.names:
        if name.endswith(".weight"):
            model.params[name][...] += 1.0
    tmodel = build_torch_gpt(config)
    load_params(tmodel, model.params)
    return model, tmodel


def test_names_map_both_ways():
    config = small_config("layernorm")
    tmodel = build_torch_gpt(config)
    ours = GPT(config).table.names
    assert sorted(our_name(t) for t, _ in tmodel.named_parameters()) == sorted(ours)
    assert all(our_name(torch_name(n)) == n for n in ours)


@pytest.mark.parametrize("norm", NORMS)
def test_loss_and_gradients_match_torch(rng, norm):
    torch.manual_seed(0)
    config = small_config(norm)
    model, tmodel = make_pair(config, rng)
    idx = rng.integers(0, config.vocab_size, size=(3, 7))
    targets = rng.integers(0, config.vocab_size, size=(3, 7))
    loss = model.forward(idx, targets)
    model.backward()
    tloss = tmodel(torch.from_numpy(idx), torch.from_numpy(targets))
    tloss.backward()
    # Both in float32 with different summation orders: agreement to ~1e-6 relative is
    # expected, 1e-4 leaves room; atol scales with each tensor's largest entry (see
    # test_model.py).
    assert loss == pytest.approx(tloss.item(), rel=1e-5)
    tgrads = export_grads(tmodel)
    for name in model.table.names:
        e = tgrads[name]
        assert np.abs(e).max() > 1e-3, name
        assert_close(model.grads[name], e, rtol=1e-4, atol=1e-5 * np.abs(e).max(), name=name)
    # Logits (inference path) too.
    logits = model.eval().forward(idx)
    with torch.no_grad():
        tlogits = tmodel(torch.from_numpy(idx)).numpy()
    assert_close(logits, tlogits, rtol=1e-4, atol=1e-5, name="logits")


@pytest.mark.parametrize("norm", NORMS)
def test_training_steps_match_torch(rng, norm):
    config = small_config(norm, lr=1e-2, weight_decay=0.1, grad_clip=0.3)
    model, tmodel = make_pair(config, rng, std=0.1)
    opt = AdamW(model, config)
    named = dict(tmodel.named_parameters())
    decay = [named[torch_name(n)] for n, s in zip(model.table.names, model.table.shapes)
             if len(s) == 2]
    no_decay = [named[torch_name(n)] for n, s in zip(model.table.names, model.table.shapes)
                if len(s) != 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    topt = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                             eps=config.adam_eps)
    idx = rng.integers(0, config.vocab_size, size=(4, 8))
    targets = rng.integers(0, config.vocab_size, size=(4, 8))
    ti, tt = torch.from_numpy(idx), torch.from_numpy(targets)
    ours, theirs, scales = [], [], []
    for step in range(5):
        ours.append(model.forward(idx, targets, step=step))
        model.backward()
        scale = clip_scale(opt.grad_norm(), config.grad_clip)
        scales.append(scale)
        opt.step(config.lr, grad_scale=scale)

        topt.zero_grad()
        loss = tmodel(ti, tt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), config.grad_clip)
        topt.step()
        theirs.append(loss.item())
    assert min(scales) < 1.0 == max(scales)  # steps with and without clipping
    assert ours[-1] < ours[0] - 0.1  # and the model really learned
    # Both in float32; the losses agree to ~1e-7 in practice. Adam divides by sqrt(v), which
    # magnifies round-off in the tiniest gradient entries, hence the margin.
    np.testing.assert_allclose(ours, theirs, rtol=2e-5)
    tparams = {n: named[torch_name(n)].detach().numpy() for n in model.table.names}
    for name in model.table.names:
        # Each step moves a parameter by at most ~lr = 1e-2; 1e-4 of it is still far above
        # float32 round-off and far below a wrong update.
        assert_close(model.params[name], tparams[name], rtol=0, atol=1e-4,
                     name=name)


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORMS)
def test_default_size_gradients_match_torch(rng, norm):
    # The real shapes (C=256, H=1024, T=64, 6 layers, default init) exercise the kernels'
    # blocked and vectorised paths that the tiny configs leave out.
    config = Config(dropout=0.0, norm=norm)
    model = GPT(config, seed=1)
    tmodel = build_torch_gpt(config)
    load_params(tmodel, model.params)
    idx = rng.integers(0, config.vocab_size, size=(2, config.block_size))
    targets = rng.integers(0, config.vocab_size, size=(2, config.block_size))
    loss = model.forward(idx, targets)
    model.backward()
    tloss = tmodel(torch.from_numpy(idx), torch.from_numpy(targets))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-5)
    tgrads = export_grads(tmodel)
    # Measured: every gradient within 3e-6 of its tensor's largest entry; 5e-5 leaves room for
    # other ISAs' summation orders.
    for name in model.table.names:
        e = tgrads[name]
        assert_close(model.grads[name], e, rtol=1e-3, atol=5e-5 * np.abs(e).max(), name=name)
