"""Config.precision = "bf16": the model's GEMMs on bf16 operands with fp32 master weights;
the flag, the checkpoints and the start-up report that go with it."""
import io
import json

import numpy as np
import pytest

from randygpt import checkpoint, cli
from randygpt._kernels import matmul
from randygpt.config import Config
from randygpt.model import GPT
from randygpt.optim import AdamW
from randygpt.tokenizer import CharTokenizer
from randygpt.train import RunOptions, Trainer

from conftest import assert_bitwise_equal, thread_counts

TINY = dict(vocab_size=11, n_embd=16, n_head=2, n_layer=2, block_size=8, batch_size=4)
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def _grads(config, rng_seed=5, n_threads=1, dropout_step=3):
    model = GPT(config, seed=0, n_threads=n_threads)
    rng = np.random.default_rng(rng_seed)
    idx = rng.integers(0, config.vocab_size, (4, 8))
    targets = rng.integers(0, config.vocab_size, (4, 8))
    loss = model.forward(idx, targets, step=dropout_step)
    model.backward()
    return loss, model.flat_grads.copy(), model


def test_default_is_fp32_and_bad_values_are_refused():
    assert Config().precision == "fp32"
    for bad in ("fp16", "BF16", "", None, 16):
        with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16'\)"):
            Config(precision=bad)
    # A config dict from before the field (an old checkpoint's, config.json) means fp32.
    old = Config().to_dict()
    del old["precision"]
    assert Config.from_dict(old).precision == "fp32"


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_bf16_gradient_is_close_to_fp32(norm):
    # Each GEMM operand is rounded with a relative error of at most 2^-9 (2e-3); through the
    # two layers' chains of GEMMs the gradients move by a few times that (0.2-0.5% measured
    # at this size), so 2% per tensor, and a direction within 0.9995 of fp32's, leave room
    # while any mistake (a wrong operand, a missing term) moves them by far more.
    cfg = Config(**TINY, dropout=0.1, norm=norm)
    loss32, g32, model = _grads(cfg)
    loss16, g16, _ = _grads(cfg.replace(precision="bf16"))
    assert loss16 == pytest.approx(loss32, rel=1e-3)
    assert not np.array_equal(g16, g32)  # the operands really are rounded
    for name in model.table.names:
        o, n = model.table.span(name)
        a, b = g32[o:o + n], g16[o:o + n]
        rel = np.linalg.norm(b - a) / np.linalg.norm(a)
        assert rel < 2e-2, (name, rel)
    cosine = g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32))
    assert cosine > 0.9995, cosine


def test_fp32_is_unchanged_by_the_field():
    # precision="fp32" is the model as it was: the same bits as a config that never named it.
    _, g_default, _ = _grads(Config(**TINY))
    _, g_fp32, _ = _grads(Config(**TINY, precision="fp32"))
    assert_bitwise_equal(g_fp32, g_default, name="fp32 gradient")


def test_bf16_step_is_the_same_for_any_thread_count_and_path():
    cfg = Config(**TINY, precision="bf16")
    loss1, g1, _ = _grads(cfg, n_threads=1)
    for n in thread_counts()[1:]:
        loss, g, _ = _grads(cfg, n_threads=n)
        assert loss == loss1
        assert_bitwise_equal(g, g1, name=f"bf16 gradient at {n} threads")
    # Every path that sums in vdpbf16ps's order gives the same step; AMX sums its own way
    # (gemm_bf16_amx.h), so it is compared with itself across threads only (above, when it
    # is the default; the GEMM tests hold it to the float64 reference).
    old = matmul.get_bf16_isa()
    try:
        ref = None
        for isa in matmul.available_bf16_isas():
            if isa in ("sse2", "amx"):
                continue  # sse2 has no FMA: may differ where a product underflows (untested)
            matmul.set_bf16_isa(isa)
            loss, g, _ = _grads(cfg)
            if ref is None:
                ref = (isa, loss, g)
            assert loss == ref[1]
            assert_bitwise_equal(g, ref[2], name=f"bf16 gradient on {isa} vs {ref[0]}")
    finally:
        matmul.set_bf16_isa(old)


def test_bf16_model_learns():
    # As test_model's fp32 twin: from ln(11) = 2.40, memorising 32 random targets.
    cfg = Config(**{**TINY, "n_layer": 1}, dropout=0.0, lr=1e-2, precision="bf16")
    model = GPT(cfg, seed=0)
    opt = AdamW(model, cfg)
    rng = np.random.default_rng(1)
    idx, targets = rng.integers(0, 11, (4, 8)), rng.integers(0, 11, (4, 8))
    for step in range(50):
        loss = model.forward(idx, targets, step=step)
        model.backward()
        opt.step(cfg.lr)
    assert loss < 0.5, loss


def _save(path, config):
    model = GPT(config, seed=0)
    opt = AdamW(model, config)
    tok = CharTokenizer.from_text("abcdefghi")
    checkpoint.save(path, model=model, optimizer=opt, tokenizer=tok, step=1,
                    rng_state=np.random.default_rng(0).bit_generator.state)
    return model


def test_checkpoints_keep_the_precision_and_old_ones_load_as_fp32(tmp_path):
    cfg = Config(**TINY, precision="bf16")
    path = tmp_path / "bf16.npz"
    model = _save(path, cfg)
    ck = checkpoint.load(path)
    assert ck.config.precision == "bf16"
    # A bf16-trained checkpoint evaluates in either precision: the weights are fp32.
    idx = np.random.default_rng(2).integers(0, 11, (2, 8))
    losses = {}
    for precision in ("bf16", "fp32"):
        m = GPT(ck.config.replace(precision=precision), seed=1)
        m.load_flat_params(ck.params)
        m.eval()
        losses[precision] = m.forward(idx, idx)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)
    assert np.array_equal(ck.params, model.flat_params)
    # A checkpoint written before the field existed: its header's config has no precision.
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays["header"].tobytes())
    del header["config"]["precision"]
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    old = tmp_path / "old.npz"
    with open(old, "wb") as f:
        np.savez(f, **arrays)
    assert checkpoint.load(old).config.precision == "fp32"


def test_flag_and_bad_value(capsys):
    from randygpt.cli.train import parse_train_args

    overrides, _ = parse_train_args(["10", "--precision", "bf16"])
    assert overrides["precision"] == "bf16"
    assert cli.main(["10", "--precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("randygpt: error: ")
    assert "--precision" in err[0] and "invalid choice: 'fp16'" in err[0]


def test_start_up_says_how_bf16_runs(tmp_path):
    out = io.StringIO()
    opts = RunOptions(iters=1, out_dir=str(tmp_path / "run"), eval_every=0, sample=False,
                      overrides={**{k: v for k, v in TINY.items() if k != "vocab_size"},
                                 "precision": "bf16"})
    with Trainer(None, opts, text=TEXT, stdout=out, stderr=io.StringIO()) as trainer:
        trainer.fit()
    log = out.getvalue()
    assert "precision=bf16" in log
    how = {"amx": "on AMX tiles", "avx512bf16": "on vdpbf16ps"}.get(
        matmul.get_bf16_isa(), "emulated with fp32 multiply-adds")
    assert how in log
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["config"]["precision"] == "bf16"
