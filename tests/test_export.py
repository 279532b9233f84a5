"""Weights files (randygpt.interop, ``randygpt export``): the round trip, the file as other tools
read it, every command that takes --checkpoint taking one, PyTorch's logits on it, resume
refused, and bad files reported as one line with exit 2."""
import json
import re

import numpy as np
import pytest

from conftest import assert_bitwise_equal, assert_close, word_text
from randygpt import cli
from randygpt.checkpoint import CheckpointError, load, load_model, save
from randygpt.config import Config
from randygpt.interop import WeightsFileError, load_weights, save_weights
from randygpt.model import GPT
from randygpt.tokenizer import CharTokenizer

safetensors = pytest.importorskip("safetensors")
import safetensors.numpy  # noqa: E402  (after the skip: the [export] extra may be absent)

TEXT = word_text(300)


def tiny(norm="rmsnorm", seed=0):
    tok = CharTokenizer.from_text(TEXT)
    config = Config(vocab_size=tok.vocab_size, n_embd=12, n_head=3, n_layer=2, block_size=10,
                    norm=norm)
    model = GPT(config, seed=seed)
    model.flat_params[:] = np.random.default_rng(seed).normal(0, 0.3, model.num_params)
    return model, tok


@pytest.fixture
def ckpt(tmp_path):
    model, tok = tiny()
    path = tmp_path / "ckpt.npz"
    save(path, model=model, optimizer=None, tokenizer=tok, step=7, rng_state=None,
         extra={"val_fraction": 0.1, "note": "x"})
    return path


def export(ckpt, out, capsys):
    code = cli.main(["export", str(ckpt), str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_line(capsys, code):
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("randygpt: error: "), err
    return lines[0]


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_round_trip_is_exact(tmp_path, norm):
    model, tok = tiny(norm)
    path = tmp_path / "w.safetensors"
    save_weights(path, model, tok, step=3, extra={"a": [1, 2]})
    w = load_weights(path)
    assert w.config == model.config and w.tokenizer == tok
    assert w.step == 3 and w.extra == {"a": [1, 2]}
    assert_bitwise_equal(w.params, model.flat_params, "params")
    # Nothing but the file itself is left in the directory (the writer's temporary is gone).
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_file_is_plain_safetensors_under_our_names(tmp_path):
    model, tok = tiny("layernorm")
    path = tmp_path / "w.safetensors"
    save_weights(path, model, tok)
    tensors = safetensors.numpy.load_file(str(path))
    assert set(tensors) == set(model.table.names)
    for name, view in model.params.items():
        assert tensors[name].dtype == np.float32 and tensors[name].shape == view.shape, name
        assert_bitwise_equal(tensors[name], view, name)
    with safetensors.safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "randygpt-weights" and meta["format_version"] == "1"
    assert Config.from_dict(json.loads(meta["config"])) == model.config
    assert CharTokenizer.from_dict(json.loads(meta["tokenizer"])) == tok


def test_cli_export_then_sample_and_eval_take_the_file(ckpt, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    code, stdout, _ = export(ckpt, out, capsys)
    assert code == 0 and str(out) in stdout and "step 7" in stdout
    a, tok_a, ck_a = load_model(ckpt)
    b, tok_b, ck_b = load_model(out)
    assert tok_a == tok_b and ck_b.step == 7 and ck_b.extra == ck_a.extra
    assert ck_b.adam_m is None and ck_b.rng_state is None and not b.training
    idx = tok_a.encode(TEXT[:10])[None, :]
    assert_bitwise_equal(b.forward(idx), a.forward(idx), "logits")

    texts = []
    for path in (ckpt, out):
        assert cli.main(["sample", "--checkpoint", str(path), "--prompt", "the ",
                         "--max-new-tokens", "30", "--seed", "5"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) > len("the \n")

    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    losses = []
    for path in (ckpt, out):
        assert cli.main(["eval", "--checkpoint", str(path), "--data", str(data)]) == 0
        losses.append(re.search(r"loss (\S+)", capsys.readouterr().out).group(1))
    assert losses[0] == losses[1]


def test_torch_logits_match(tmp_path):
    torch = pytest.importorskip("torch")
    from randygpt.interop import load_torch
    for norm in ("rmsnorm", "layernorm"):
        model, tok = tiny(norm, seed=1)
        model.eval()
        path = tmp_path / f"{norm}.safetensors"
        save_weights(path, model, tok)
        module, tok2, config = load_torch(path)
        assert tok2 == tok and config == model.config and not module.training
        idx = np.random.default_rng(2).integers(0, tok.vocab_size, (2, 10)).astype(np.int32)
        with torch.no_grad():
            theirs = module(torch.from_numpy(idx.astype(np.int64))).numpy()
        assert_close(theirs, model.forward(idx), rtol=1e-5, atol=1e-5, name=f"{norm} logits")


def test_resume_from_weights_is_refused(ckpt, tmp_path, capsys):
    out = tmp_path / "w.safetensors"
    assert export(ckpt, out, capsys)[0] == 0
    with pytest.raises(CheckpointError, match="weights only.*needs a full checkpoint"):
        load(out)
    line = error_line(capsys, cli.main(["20", "--resume", str(out), "--out",
                                        str(tmp_path / "run")]))
    assert "weights only" in line and "full checkpoint" in line


def test_export_refuses_an_out_without_the_suffix_and_a_missing_directory(ckpt, tmp_path, capsys):
    line = error_line(capsys, cli.main(["export", str(ckpt), str(tmp_path / "w.npz")]))
    assert ".safetensors" in line
    line = error_line(capsys, cli.main(["export", str(ckpt),
                                        str(tmp_path / "no" / "w.safetensors")]))
    assert "cannot write" in line and "No such file or directory" in line
    (tmp_path / "d.safetensors").mkdir()
    line = error_line(capsys, cli.main(["export", str(ckpt), str(tmp_path / "d.safetensors")]))
    assert "cannot write" in line and "Is a directory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz", "d.safetensors"]
    line = error_line(capsys, cli.main(["export", str(tmp_path / "none.npz"),
                                        str(tmp_path / "w.safetensors")]))
    assert "does not exist" in line


def test_missing_library_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "safetensors", None)
    line = error_line(capsys, cli.main(["export", str(ckpt), str(tmp_path / "w.safetensors")]))
    assert "pip install 'randygpt[export]'" in line


# --- bad files ---------------------------------------------------------------------------------

def _write(path, tensors, metadata):
    path.write_bytes(safetensors.numpy.save(tensors, metadata=metadata))


def _good(model, tok):
    tensors = {n: np.ascontiguousarray(v) for n, v in model.params.items()}
    meta = {"format": "randygpt-weights", "format_version": "1",
            "config": json.dumps(model.config.to_dict()), "tokenizer": json.dumps(tok.to_dict()),
            "step": "0", "extra": "{}"}
    return tensors, meta


def _damage(kind, model, tok):
    """(tensors, metadata) of a file damaged one way, and what the error must say."""
    tensors, meta = _good(model, tok)
    if kind == "no metadata":
        return tensors, None, "no metadata"
    if kind == "metadata lacks config":
        del meta["config"]
        return tensors, meta, r"lacks \['config'\]"
    if kind == "other format version":
        meta["format_version"] = "9"
        return tensors, meta, "format version '9'"
    if kind == "config not JSON":
        meta["config"] = "{"
        return tensors, meta, "'config' is not valid JSON"
    if kind == "invalid config":
        meta["config"] = json.dumps({**model.config.to_dict(), "n_head": 5})
        return tensors, meta, "invalid config"
    if kind == "vocabulary not matching the embedding":
        meta["tokenizer"] = json.dumps({"type": "char", "chars": "abc"})
        return tensors, meta, "vocabulary has 5 ids but the embedding 'wte' has"
    if kind == "wrong shape":
        tensors["h.0.fc1"] = tensors["h.0.fc1"][:, :-1].copy()
        return tensors, meta, r"'h.0.fc1' has shape \(48, 11\), expected \(48, 12\)"
    if kind == "missing tensor":
        del tensors["lm_head"]
        return tensors, meta, r"missing \['lm_head'\]"
    if kind == "unexpected tensor":
        tensors["h.9.wq"] = tensors["h.0.wq"]
        return tensors, meta, r"unexpected \['h.9.wq'\]"
    if kind == "float64":
        tensors["wpe"] = tensors["wpe"].astype(np.float64)
        return tensors, meta, "'wpe' is float64, expected float32"
    if kind == "NaN":
        tensors["wte"] = tensors["wte"].copy()
        tensors["wte"][1, 2] = np.nan
        return tensors, meta, "non-finite"
    if kind == "n_layer bomb":
        meta["config"] = json.dumps({**model.config.to_dict(), "n_layer": 10**9})
        return tensors, meta, "n_layer=1,000,000,000"
    raise AssertionError(kind)


DAMAGES = ["no metadata", "metadata lacks config", "other format version", "config not JSON",
           "invalid config", "vocabulary not matching the embedding", "wrong shape",
           "missing tensor", "unexpected tensor", "float64", "NaN", "n_layer bomb"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_bad_files_are_one_line_exit_2(tmp_path, capsys, kind):
    model, tok = tiny()
    tensors, meta, expected = _damage(kind, model, tok)
    path = tmp_path / "bad.safetensors"
    _write(path, tensors, meta)
    with pytest.raises(WeightsFileError, match=expected):
        load_weights(path)
    line = error_line(capsys, cli.main(["sample", "--checkpoint", str(path)]))
    assert "bad.safetensors" in line and re.search(expected, line)


@pytest.mark.parametrize("kind", ["random bytes", "a checkpoint renamed", "truncated", "empty",
                                  "directory", "missing"])
def test_files_that_are_not_safetensors(tmp_path, capsys, ckpt, kind):
    path = tmp_path / "bad.safetensors"
    if kind == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(300))
    elif kind == "a checkpoint renamed":
        path.write_bytes(ckpt.read_bytes())
    elif kind == "truncated":
        model, tok = tiny()
        save_weights(path, model, tok)
        path.write_bytes(path.read_bytes()[:-100])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "directory":
        path.mkdir()
    line = error_line(capsys, cli.main(["sample", "--checkpoint", str(path)]))
    assert "bad.safetensors" in line
    assert re.search("not a valid safetensors file|is a directory|does not exist", line), line
