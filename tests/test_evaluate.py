"""Evaluation: every target predicted exactly once, in order, in eval mode; independent of the
batch size; and the eval command's output and errors."""
import math
import re

import numpy as np
import pytest

from conftest import assert_close
from randygpt import cli
from randygpt.checkpoint import save
from randygpt.config import Config
from randygpt.data import Dataset
from randygpt.evaluate import EvalError, evaluate, evaluate_checkpoint
from randygpt.model import GPT
from randygpt.tokenizer import CharTokenizer

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        * 6)


def tiny_model(block_size=8, dropout=0.2):
    tok = CharTokenizer.from_text(TEXT)
    config = Config(vocab_size=tok.vocab_size, n_embd=12, n_head=3, n_layer=2,
                    block_size=block_size, batch_size=4, dropout=dropout)
    model = GPT(config, seed=0)
    model.flat_params[:] = np.random.default_rng(0).normal(0, 0.2, model.num_params)
    return model, tok


def reference_loss(model, tokens, T):
    """Cross-entropy from the full forward's logits, window by window, in float64."""
    model.eval()
    total, count = 0.0, 0
    for s in range(0, len(tokens) - 1, T):
        x = tokens[s:s + T]
        y = tokens[s + 1:s + 1 + T]
        x = x[:len(y)]
        logits = model.forward(x[None].astype(np.int32))[0].astype(np.float64)
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        total -= logp[np.arange(len(y)), y].sum()
        count += len(y)
    assert count == len(tokens) - 1  # every target exactly once
    return total / count


@pytest.mark.parametrize("n", [2, 9, 17, 40, 45])
def test_matches_reference_including_the_tail(n):
    model, tok = tiny_model()
    tokens = tok.encode(TEXT)[:n]
    got = evaluate(model, tokens, 8, 3)
    assert_close(got, reference_loss(model, tokens, 8), rtol=1e-5, name=f"loss n={n}")


def test_independent_of_batch_size_and_deterministic():
    model, tok = tiny_model()
    tokens = tok.encode(TEXT)[:203]  # 25 whole windows and a tail of 2
    losses = [evaluate(model, tokens, 8, b) for b in (1, 3, 7, 25, 100)]
    assert_close(np.array(losses), np.full(5, losses[0]), rtol=1e-6, atol=0)
    assert evaluate(model, tokens, 8, 3) == evaluate(model, tokens, 8, 3)
    # A shorter block_size is allowed (windows of 5) and gives a different, still valid mean.
    assert_close(evaluate(model, tokens, 5, 4), reference_loss(model, tokens, 5), rtol=1e-5)


def test_eval_mode_and_mode_restored():
    model, tok = tiny_model(dropout=0.5)
    tokens = tok.encode(TEXT)[:60]
    model.eval()
    in_eval = evaluate(model, tokens, 8, 4)
    model.train()
    assert evaluate(model, tokens, 8, 4) == in_eval  # no dropout during evaluation
    assert model.training


@pytest.mark.parametrize("tokens, T, B, match", [
    (np.array([3]), 8, 2, "at least 2 ids"),
    (np.array([[3, 4]]), 8, 2, "1-D integer"),
    (np.array([0.5, 1.5]), 8, 2, "1-D integer"),
    (np.array([3, 99]), 8, 2, r"must be in \[0, "),
    (np.array([3, 4, 5]), 9, 2, "block_size must be <= the model's block_size 8"),
    (np.array([3, 4, 5]), 0, 2, "block_size must be a positive int"),
    (np.array([3, 4, 5]), 8, 0, "batch_size must be a positive int"),
])
def test_bad_arguments(tokens, T, B, match):
    model, _ = tiny_model()
    with pytest.raises(ValueError, match=match):
        evaluate(model, tokens, T, B)


# --- command line ------------------------------------------------------------------------------

@pytest.fixture
def run(tmp_path):
    model, tok = tiny_model()
    data = tmp_path / "train.txt"
    data.write_text(TEXT)

    def make(extra):
        path = tmp_path / "ckpt.npz"
        save(path, model=model, optimizer=None, tokenizer=tok, step=7, rng_state=None, extra=extra)
        return path

    return model, tok, data, make


def run_main(capsys, *argv):
    code = cli.main(["eval", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prints_loss_and_perplexity(run, capsys):
    model, tok, data, make = run
    ckpt = make({"data_path": str(data)})
    code, out, err = run_main(capsys, "--checkpoint", ckpt)
    assert code == 0 and err == ""
    val = Dataset(TEXT, tok, 8).val
    expected = evaluate(model, val, 8, 4)
    m = re.match(r"val loss (\S+) \| perplexity (\S+) \| ", out)
    assert m, out
    assert float(m.group(1)) == pytest.approx(expected, abs=1e-4)
    assert float(m.group(2)) == pytest.approx(math.exp(expected), rel=1e-3)
    assert f"{len(val) - 1:,} predicted tokens" in out
    # --data overrides, --split train and --batch-size are honoured.
    code, out2, _ = run_main(capsys, "--checkpoint", ckpt, "--data", data, "--batch-size", 1)
    assert code == 0 and out2.split("|")[0] == out.split("|")[0]
    code, out3, _ = run_main(capsys, "--checkpoint", ckpt, "--split", "train")
    train = Dataset(TEXT, tok, 8).train
    assert float(out3.split()[2]) == pytest.approx(evaluate(model, train, 8, 4), abs=1e-4)


def test_cli_data_as_the_trainer_records_it(run, capsys):
    _, _, data, make = run
    recorded = {"data": {"path": str(data), "description": f"{data} (372 characters)"}}
    code, out, _ = run_main(capsys, "--checkpoint", make(recorded))
    assert code == 0 and out.rstrip().endswith(f"data {data}")
    assert run_main(capsys, "--checkpoint", make({"data": str(data)}))[0] == 0


def test_cli_builtin_sample(tmp_path, capsys):
    from randygpt.data import BUILTIN_TEXT

    tok = CharTokenizer.from_text(BUILTIN_TEXT)
    config = Config(vocab_size=tok.vocab_size, n_embd=12, n_head=3, n_layer=1, block_size=8)
    model = GPT(config, seed=0)
    path = tmp_path / "ckpt.npz"
    save(path, model=model, optimizer=None, tokenizer=tok, step=1, rng_state=None,
         extra={"data": {"path": None, "description": "built-in sample (1,234 characters)"}})
    code, out, err = run_main(capsys, "--checkpoint", path)
    assert code == 0, err
    val = Dataset(BUILTIN_TEXT, tok, 8).val
    assert float(out.split()[2]) == pytest.approx(evaluate(model, val, 8, config.batch_size), abs=1e-4)


def test_cli_needs_data_when_the_checkpoint_does_not_say(run, capsys):
    _, _, data, make = run
    for extra, said in (({}, ""), ({"data": "Tiny Shakespeare (1,115,394 characters)"}, "records")):
        code, out, err = run_main(capsys, "--checkpoint", make(extra))
        assert code == 2 and out == "" and err.count("\n") == 1
        assert err.startswith("randygpt: error: ") and "pass --data PATH" in err and said in err


@pytest.mark.parametrize("argv, match", [
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--threads", "0"], "--threads must not be 0"),
    (["--split", "test"], "invalid choice"),
    (["--precision", "fp16"], r"--precision: invalid choice: 'fp16' \(choose from 'fp32', 'bf16'\)"),
    (["--data", "{missing}"], "does not exist"),
    (["--data", "{foreign}"], "characters the tokenizer does not know: 'Z'"),
    (["--data", "{short}"], "too short.*evaluate a longer text"),
])
def test_cli_bad_input(run, capsys, tmp_path, argv, match):
    _, _, data, make = run
    ckpt = make({"data_path": str(data)})
    (tmp_path / "foreign.txt").write_text(TEXT + "Z")
    (tmp_path / "short.txt").write_text("Speak")
    names = {"missing": tmp_path / "nope.txt", "foreign": tmp_path / "foreign.txt",
             "short": tmp_path / "short.txt"}
    argv = [a.format(**names) for a in argv]
    code, out, err = run_main(capsys, "--checkpoint", ckpt, *argv)
    assert code == 2 and out == ""
    assert err.startswith("randygpt: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err


def test_cli_evaluates_either_precision_whatever_the_checkpoint_was_trained_in(tmp_path, capsys):
    model, tok = tiny_model()
    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    val = Dataset(TEXT, tok, 8).val
    expected = {}
    for precision in ("fp32", "bf16"):
        m = GPT(model.config.replace(precision=precision), seed=0)
        m.load_flat_params(model.flat_params)
        expected[precision] = f"val loss {evaluate(m, val, 8, 4):.4f} | "
    assert expected["fp32"] != expected["bf16"], "the test needs precisions that differ"
    for trained in ("fp32", "bf16"):
        m = GPT(model.config.replace(precision=trained), seed=0)
        m.load_flat_params(model.flat_params)
        ckpt = tmp_path / f"{trained}.npz"
        save(ckpt, model=m, optimizer=None, tokenizer=tok, step=7, rng_state=None,
             extra={"data_path": str(data)})
        for asked in (None, "fp32", "bf16"):
            code, out, err = run_main(capsys, "--checkpoint", ckpt,
                                      *(["--precision", asked] if asked else []))
            ran = asked or trained  # by default, the precision the checkpoint was trained in
            assert code == 0 and err == "", err
            assert out.startswith(expected[ran]) and f"| precision {ran} |" in out, out
    with pytest.raises(EvalError, match="precision must be one of"):
        evaluate_checkpoint(ckpt, precision="fp16")


def test_cli_bad_checkpoint(tmp_path, capsys):
    code, _, err = run_main(capsys, "--checkpoint", tmp_path / "none.npz")
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00" * 100)
    code, _, err = run_main(capsys, "--checkpoint", garbage)
    assert code == 2 and "not a valid checkpoint" in err
    assert garbage.read_bytes() == b"\x00" * 100
