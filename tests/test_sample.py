"""Sampling: cached logits (model.decode) against the full forward (inside and past the
context), the sliding window, texts pinned from before the cache moved into the model,
determinism, the sampling filters, argument checks and the CLI."""
import re

import numpy as np
import pytest

from conftest import assert_close
from randygpt import cli, sample
from randygpt._kernels import activation, attention, decode, matmul, select_isa
from randygpt.checkpoint import save
from randygpt.config import Config
from randygpt.model import GPT
from randygpt.sample import (ContextWindow, decode_threads, generate, sample_token,
                              window_keep)
from randygpt.tokenizer import CharTokenizer

TEXT = "ROMEO:\nTo be or not to be, that is the question.\n"


def tiny_model(norm="rmsnorm", block_size=8, seed=0, std=0.3):
    """A random model whose logits are far from uniform (std 0.3 rather than the 0.02 init),
    so an error anywhere in the cached pass shows in the logits.

    A random model would also sample EOS (which ends generation) now and then; to keep text
    lengths predictable, residual channel 0 is held at exactly 5 (wpe sets it, no layer writes
    it) and the EOS row of lm_head reads only that channel, with weight -20: logit -100."""
    tok = CharTokenizer.from_text(TEXT)
    config = Config(vocab_size=tok.vocab_size, n_embd=12, n_head=3, n_layer=2,
                    block_size=block_size, norm=norm, dropout=0.1)
    model = GPT(config, seed=seed)
    model.flat_params[:] = np.random.default_rng(seed).normal(0, std, model.num_params)
    if norm == "layernorm":
        for i in range(config.n_layer):
            for which in (1, 2):
                model.params[f"h.{i}.ln{which}.weight"][:] += 1.0
    p = model.params
    p["wte"][:, 0] = 0.0
    p["wpe"][:, 0] = 5.0
    for i in range(config.n_layer):
        p[f"h.{i}.wo"][0] = 0.0
        p[f"h.{i}.fc2"][0] = 0.0
    p["lm_head"][tok.EOS] = 0.0
    p["lm_head"][tok.EOS, 0] = -20.0
    return model, tok


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("prompt_len", [1, 5, 13])
def test_cached_logits_match_full_forward(norm, prompt_len, rng):
    model, tok = tiny_model(norm)
    model.eval()
    T = model.config.block_size
    ids = rng.integers(0, tok.vocab_size, prompt_len + 3 * T).tolist()
    window = ContextWindow(model, use_cache=True)
    logits = window.start(ids[:prompt_len])
    for step, token in enumerate(ids[prompt_len:]):
        assert 1 <= len(window.tokens) <= T
        expected = model.forward(np.array([window.tokens], dtype=np.int32))[0, -1]
        scale = float(np.abs(expected).max())
        assert_close(logits, expected, rtol=1e-5, atol=1e-5 * scale,
                     name=f"logits at step {step} (window {len(window.tokens)})")
        logits = window.push(token)
    assert window.rebuilds >= 3  # the comparison ran well past the context, across slides


@pytest.mark.slow
def test_cached_logits_match_at_default_size(rng):
    # The default model (C=256, 8 heads, 6 layers, T=64) across one slide of the window.
    model = GPT(Config(), seed=3)
    model.eval()
    window = ContextWindow(model)
    logits = window.start(rng.integers(2, 67, 60))
    for token in rng.integers(2, 67, 8):
        expected = model.forward(np.array([window.tokens], dtype=np.int32))[0, -1]
        assert_close(logits, expected, rtol=1e-5, atol=1e-5 * float(np.abs(expected).max()),
                     name=f"logits, window of {len(window.tokens)}")
        logits = window.push(token)
    assert window.rebuilds == 1


def test_window_rule(rng):
    model, tok = tiny_model(block_size=8)
    model.eval()
    T, keep = 8, window_keep(8)
    assert keep == 4
    window = ContextWindow(model, use_cache=True)
    stream = list(range(2, 32))
    window.start(stream[:11])  # a prompt longer than the context keeps its last T tokens
    assert window.tokens == stream[3:11]
    window.push(stream[11])    # full window: slide to the last `keep` tokens, new one included
    assert window.tokens == stream[8:12] and window.cache.length == keep
    for t in stream[12:16]:
        window.push(t)
    assert window.tokens == stream[8:16] and window.cache.length == T
    window.push(stream[16])
    assert window.tokens == stream[13:17] and window.rebuilds == 2


# generate()'s texts as the NumPy KVCache of commit 742411a (sample.py) produced them, before
# decoding moved into the model (model.decode on the decode kernels): the same on the AVX-512
# and the baseline (RANDYGPT_ISA=sse2) kernels then, and required to stay so. Each runs 60
# tokens on a block_size of 8: many window slides.
PINNED_TEXTS = [
    ("rmsnorm", 0.1, {
        "greedy": "TTeTTTTeTTTTeTTTTeTTTTeTTTTeTTTTeTTTTeTTTTeTTTTeTTTTeTTTTeTT",
        "seed5": "oE sT..TeO\ns.rbEhM\nT sEe\n,s:ETuTMMsh,.eu.,ss,M.eTbTEhrMi\nsu\n",
        "seed7_topk": ". Mss T \n.see...\n .\neehTTh.\nM.heTTMesT se h .\nTh. s.TssT s\nh",
    }),
    ("layernorm", 0.1, {
        "greedy": "                                                            ",
        "seed5": "ssb:o:ioortb:.RsEEtoEoeote:qeouoEbbisi:uEs:isbE:oqohbabaE:ut",
        "seed7_topk": "bEb btonni: o:EbEn:no ioo:bn:Ei  oE:bonoon:nEE iiniboi:onitE",
    }),
    ("rmsnorm", 0.3, {
        "greedy": "\nMMMM:MMMM:MMMM:MMMM:MMMM:MMMM:MMMM:MMMM:MMMM:MMMM:MMMM:MMMM",
        "seed5": ":MMMMM:MM:o:M::t\n:MMM::MMo:::MM:MMMMMMMMMMMM:M:MM:MMM:Mo:MMM",
        "seed7_topk": ":s:MM\nM::o:MMMM:e\n:\n:MMMM:Mo:o:MMM::MM:M:s:\n:MMMMo:\nMMM:o: \n",
    }),
    ("layernorm", 0.3, {
        "greedy": "\n\n\n\n\n\n\n\n\nn\n\n\n\n\n\n\n\n\nn\n\n\n\n\n\n\n\n\nn\n\n\n\n\n\n\n\n\nn\n\n\n\n\n\n\n\n\nn\n\n\n\n\n\n\n\n\nn",
        "seed5": "r\nr\n\n\n\n\n\nin\ntnin\n\n\n\nn\ni\ntn\nin\nn\n\n\n\n\n\n\n\ntn\n\n\nt\n\n\n\nin\n\nt\nr\n\n\nt",
        "seed7_topk": "roo\n\nt\nri\n\n\n\nt\n\notne\n\n\n\n\n\nttnr\n\n\n\ni\nt\nnn\nnrinr\n\n\nt\nr\n\n\n\ni\non",
    }),
]


@pytest.fixture(params=["default", "sse2"])
def kernel_isa(request):
    """The fastest SIMD paths, then the baseline ones (x86-64 only), restored afterwards."""
    if request.param != "default" and request.param not in matmul.available_isas():
        pytest.skip(f"{request.param} kernels are not available on this CPU")
    families = [matmul, attention, activation, decode]
    before = [m.get_isa() for m in families]
    if request.param != "default":
        select_isa(request.param)
    yield request.param
    for m, isa in zip(families, before):
        m.set_isa(isa)


@pytest.mark.parametrize("norm, std, texts", PINNED_TEXTS,
                         ids=[f"{n}-{s}" for n, s, _ in PINNED_TEXTS])
@pytest.mark.parametrize("use_cache", [True, False])
def test_texts_pinned_before_decoding_moved_into_the_model(norm, std, texts, use_cache,
                                                           kernel_isa):
    model, tok = tiny_model(norm, std=std)
    got = {
        "greedy": generate(model, tok, "ROMEO:", 60, temperature=0, use_cache=use_cache),
        "seed5": generate(model, tok, "To be", 60, rng=5, use_cache=use_cache),
        "seed7_topk": generate(model, tok, "", 60, temperature=1.2, top_p=0.95, top_k=8, rng=7,
                               use_cache=use_cache),
    }
    assert got == texts


def test_decode_threads_follow_the_layer_size():
    # One thread for small layers (the team's wake-ups cost more than a share of the weights
    # saves), the model's threads for the default size; never more than the model's.
    tiny, _ = tiny_model()
    tiny.n_threads = 2
    assert decode_threads(tiny) == 1
    model = GPT(Config(), n_threads=2)
    assert decode_threads(model) == model.n_threads  # 2, or 1 on a one-CPU machine
    model.n_threads = 1
    assert decode_threads(model) == 1


def test_same_seed_same_text_and_cache_does_not_change_it():
    model, tok = tiny_model(std=0.1)
    texts = [generate(model, tok, "To be", 40, rng=np.random.default_rng(5)) for _ in range(2)]
    assert texts[0] == texts[1] and len(texts[0]) == 40
    uncached = generate(model, tok, "To be", 40, rng=np.random.default_rng(5), use_cache=False)
    assert uncached == texts[0]
    others = {generate(model, tok, "To be", 40, rng=np.random.default_rng(s)) for s in range(6, 10)}
    assert len(others | {texts[0]}) > 1  # the seed matters
    assert generate(model, tok, "To be", 40, rng=5) == texts[0]  # an int seed works too


def test_greedy_is_deterministic_and_independent_of_rng():
    model, tok = tiny_model()
    a = generate(model, tok, "ROMEO:", 30, temperature=0, rng=np.random.default_rng(1))
    b = generate(model, tok, "ROMEO:", 30, temperature=0, rng=np.random.default_rng(2))
    c = generate(model, tok, "ROMEO:", 30, temperature=0, use_cache=False)
    assert a == b == c
    # Greedy text is the argmax chain of the full forward, window by window.
    window = ContextWindow(model, use_cache=False)
    model.eval()
    logits = window.start(tok.encode("ROMEO:"))
    expected = []
    for _ in range(30):
        token = int(np.argmax(logits))
        expected.append(token)
        logits = window.push(token)
    assert a == tok.decode(expected)


def test_stream_gets_every_piece_and_mode_is_restored():
    model, tok = tiny_model()
    model.train()
    pieces = []
    text = generate(model, tok, "To", 25, rng=np.random.default_rng(0), stream=pieces.append)
    assert "".join(pieces) == text and len(pieces) == 25
    assert model.training


def test_empty_prompt_starts_from_bos_and_zero_tokens():
    model, tok = tiny_model()
    assert len(generate(model, tok, "", 10, rng=np.random.default_rng(0))) == 10
    assert generate(model, tok, "To be", 0) == ""


def test_eos_stops_generation(monkeypatch):
    model, tok = tiny_model()
    picks = iter([2, 3, tok.EOS, 4])
    monkeypatch.setattr(sample, "sample_token", lambda *a: next(picks))
    assert generate(model, tok, "To", 10) == tok.decode([2, 3])


def test_broken_weights_are_reported_not_sampled():
    model, tok = tiny_model()
    model.params["lm_head"][5, 2] = np.nan
    with pytest.raises(ValueError, match="logits are not finite"):
        generate(model, tok, "To", 5)


def test_unknown_characters_are_named():
    model, tok = tiny_model()
    with pytest.raises(ValueError, match=r"not in the model's vocabulary: 'Z', 'é'"):
        generate(model, tok, "To bé Z", 5)


@pytest.mark.parametrize("kw, match", [
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an int"),
    ({"temperature": -0.1}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be finite"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"rng": "seed"}, "rng must be"),
    ({"stream": 3}, "stream must be callable"),
])
def test_bad_arguments(kw, match):
    model, tok = tiny_model()
    args = dict(max_new_tokens=5)
    args.update(kw)
    with pytest.raises((TypeError, ValueError), match=match):
        generate(model, tok, "To", **args)


def test_sample_token_filters():
    logits = np.array([0.0, 3.0, 2.9, 1.0, -1.0])
    rng = np.random.default_rng(0)
    assert sample_token(logits, 0, 0.9, None, rng) == 1
    assert {sample_token(logits, 1.0, 1.0, 1, rng) for _ in range(50)} == {1}
    assert {sample_token(logits, 1.0, 1.0, 2, rng) for _ in range(200)} == {1, 2}
    # top_p just above p(1) keeps exactly ids 1 and 2 (the nucleus closes at the second).
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert {sample_token(logits, 1.0, float(p[1]) + 1e-3, None, rng) for _ in range(200)} == {1, 2}
    assert {sample_token(logits, 1.0, float(p[1]) - 1e-3, None, rng) for _ in range(50)} == {1}


def test_sample_token_follows_the_softmax():
    logits = np.array([1.0, 0.0, -1.0, 0.5])
    rng = np.random.default_rng(0)
    n = 20000
    counts = np.bincount([sample_token(logits, 2.0, 1.0, None, rng) for _ in range(n)], minlength=4)
    p = np.exp(logits / 2.0)
    p /= p.sum()
    # 5 standard deviations of a binomial count: fails by chance about once in 10^6 runs.
    assert np.all(np.abs(counts - n * p) < 5 * np.sqrt(n * p * (1 - p))), (counts, n * p)


# --- command line ------------------------------------------------------------------------------

@pytest.fixture
def ckpt_path(tmp_path):
    model, tok = tiny_model(std=0.1)
    path = tmp_path / "ckpt.npz"
    save(path, model=model, optimizer=None, tokenizer=tok, step=0, rng_state=None)
    return path


def run_main(capsys, *argv):
    code = cli.main(["sample", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_streams_prompt_and_text(ckpt_path, capsys):
    args = ["--checkpoint", ckpt_path, "--prompt", "ROMEO:", "--max-new-tokens", 30, "--seed", 1,
            "--temperature", 0.8, "--top-p", 0.9, "--top-k", 5]
    code, out, err = run_main(capsys, *args)
    assert code == 0 and err == ""
    assert out.startswith("ROMEO:") and out.endswith("\n") and len(out) == len("ROMEO:") + 31
    assert run_main(capsys, *args)[1] == out
    model, tok = tiny_model(std=0.1)
    expected = generate(model, tok, "ROMEO:", 30, temperature=0.8, top_p=0.9, top_k=5,
                        rng=np.random.default_rng(1))
    assert out == "ROMEO:" + expected + "\n"


@pytest.mark.parametrize("extra, match", [
    (["--max-new-tokens", "-5"], "--max-new-tokens must be a non-negative integer"),
    (["--max-new-tokens", "many"], "--max-new-tokens must be a non-negative integer"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--top-p", "1.01"], r"--top-p must be in \(0, 1\]"),
    (["--top-k", "0"], "--top-k must be a positive integer"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--seed", "-3"], r"--seed must be an integer in \[0, 18446744073709551615\]"),
    (["--seed", str(2**64)], r"--seed must be an integer in \[0, "),
    (["--threads", "0"], "--threads must not be 0"),
    (["--prompt", "JULIET€"], r"--prompt has characters not in the model's vocabulary: 'I', 'J', 'L', 'U', '€'"),
    (["--bogus"], "unrecognized arguments"),
])
def test_cli_bad_input(ckpt_path, capsys, extra, match):
    code, out, err = run_main(capsys, "--checkpoint", ckpt_path, *extra)
    assert code == 2 and out == ""
    assert err.startswith("randygpt: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err


def test_cli_bad_checkpoints(tmp_path, capsys):
    code, out, err = run_main(capsys, "--checkpoint", tmp_path / "missing.npz")
    assert code == 2 and "does not exist" in err and err.count("\n") == 1
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    code, out, err = run_main(capsys, "--checkpoint", bad)
    assert code == 2 and "corrupt or truncated" in err and err.count("\n") == 1
    assert bad.read_bytes() == b"PK\x03\x04 truncated"  # nothing overwritten
    code, out, err = run_main(capsys)
    assert code == 2 and "--checkpoint" in err and err.count("\n") == 1


def test_cli_help(capsys):
    code, out, _ = run_main(capsys, "--help")
    assert code == 0 and "--top-p" in out


def test_benchmark_smoke():
    # bench_sample.py checks the cached logits against model.forward before timing; --quick
    # runs that check and the timing loops on a tiny model, so the script cannot rot unseen.
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sample.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--json"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    threads = sorted({r["threads"] for r in doc["results"]})
    assert [(r["mode"], r["threads"]) for r in doc["results"]] == \
        [(mode, n) for n in threads for mode in ("kv-cache", "no cache")]
    assert all(r["tokens_per_s"] > 0 for r in doc["results"])
    assert all(r["check_vs_forward"] <= 1 for r in doc["results"] if r["mode"] == "kv-cache")
    assert [s["threads"] for s in doc["decode_step"]] == threads
    assert all(s["steps_per_s"] > 0 for s in doc["decode_step"])
