"""The byte-level BPE tokenizer (--tokenizer bpe): round trips on any Unicode, whole characters
when streaming, identical ids after a save and load, the encoding cache, bits per character,
exact resume of a BPE run, and the one-line errors for sizes the text cannot support."""
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_bitwise_equal, word_text
from randygpt import checkpoint, cli, train
from randygpt.data import Dataset, encode_cached, split_text
from randygpt.evaluate import evaluate_checkpoint
from randygpt.metrics import METRICS_HEADER, MetricsFile, read_metrics
from randygpt.sample import generate
from randygpt.tokenizer import (BPE_MIN_VOCAB, BPETokenizer, CharTokenizer, tokenizer_from_dict)
from randygpt.train import RunOptions

tokenizers = pytest.importorskip("tokenizers")

TINY = {"n_layer": 1, "n_embd": 16, "n_head": 2, "block_size": 8, "batch_size": 4}
TINY_FLAGS = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--block-size", "8",
              "--batch-size", "4", "--threads", "1"]
# Words with accents, CJK and an emoji: characters of 1 to 4 UTF-8 bytes.
MIXED = "café naïve 漢字 テスト 🙂 ok, the cat sat on the mat.\nΣοφία said: «ναι».\n"


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(word_text(3000) + MIXED * 20, 300)


def random_unicode(rng, n):
    """n random code points from every plane in use, surrogates excluded (they are no text)."""
    cps = np.concatenate([rng.integers(0, 0x80, n), rng.integers(0x80, 0x800, n),
                          rng.integers(0x800, 0xD800, n), rng.integers(0xE000, 0x110000, n)])
    return "".join(chr(c) for c in rng.permutation(cps))


def test_round_trip_on_random_unicode_empty_and_one_byte(bpe, rng):
    for text in [random_unicode(rng, 300), MIXED, "", "a", "\x00", "\n", " ", "\xff", "🙂"]:
        ids = bpe.encode(text)
        assert ids.dtype == np.int32 and (ids >= 2).all() and (ids < bpe.vocab_size).all()
        assert bpe.decode(ids) == text, repr(text)
    assert bpe.encode("").size == 0 and bpe.decode([]) == ""
    assert list(bpe.encode("", bos=True, eos=True)) == [bpe.BOS, bpe.EOS]
    # Merges were learned: common words are one token, so a text needs fewer ids than bytes.
    words = word_text(200)
    assert bpe.encode(words).size < 0.6 * len(words.encode())


def test_invalid_utf8_is_replaced_when_decoding_and_refused_when_encoding(bpe):
    # The ids of single bytes: "é" is c3 a9; a lone continuation byte or a cut character is
    # not UTF-8 and decodes to U+FFFD (documented), so any sample is valid text.
    lead, cont = (int(bpe.encode(chr(b))[0]) for b in (0x61, 0x62))  # sanity: ASCII bytes
    assert bpe.decode([lead, cont]) == "ab"
    e_acute = bpe.encode("é")
    byte_ids = {b: i for i in range(2, bpe.vocab_size)
                for b in [bpe.token_bytes(i)] if len(b) == 1}
    assert bpe.decode([byte_ids[b"\xa9"]]) == "\ufffd"
    assert bpe.decode([byte_ids[b"\xc3"], lead]) == "\ufffda"
    assert bpe.decode(e_acute) == "é"
    with pytest.raises(ValueError, match="lone surrogate"):
        bpe.encode("ok \ud800 no")
    assert bpe.unknown_chars("ok \udfff") == ["\udfff"] and bpe.unknown_chars(MIXED) == []
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.decode([bpe.vocab_size])


def test_stream_decoder_gives_whole_characters_only(bpe):
    byte_ids = {bpe.token_bytes(i): i for i in range(2, bpe.vocab_size)
                if len(bpe.token_bytes(i)) == 1}
    # "🙂" byte by byte: nothing until its fourth byte, then the whole character.
    d = bpe.stream_decoder()
    assert [d.feed(byte_ids[bytes([b])]) for b in "🙂".encode()] == ["", "", "", "🙂"]
    assert d.flush() == ""
    d = bpe.stream_decoder()
    assert d.feed(byte_ids[b"\xe6"]) == "" and d.flush() == "\ufffd"
    d = bpe.stream_decoder()
    ids = bpe.encode(MIXED)
    assert "".join(d.feed(i) for i in ids) + d.flush() == MIXED


def test_saved_and_loaded_tokenizer_gives_identical_ids(bpe, rng):
    text = MIXED + random_unicode(rng, 100)
    again = tokenizer_from_dict(json.loads(json.dumps(bpe.to_dict())))
    assert again == bpe and again.vocab_size == bpe.vocab_size == 300
    assert_bitwise_equal(again.encode(text), bpe.encode(text), name="ids after a reload")
    # Training is deterministic: the same text gives the same merges.
    assert BPETokenizer.train(word_text(3000) + MIXED * 20, 300) == bpe
    assert tokenizer_from_dict(CharTokenizer.from_text("abc").to_dict()) == CharTokenizer.from_text("abc")
    for bad in ({"type": "bpe"}, {"type": "bpe", "tokenizers": {"model": {"type": "WordPiece"}}},
                {"type": "bpe", "tokenizers": bpe.to_dict()["tokenizers"], "extra": 1}):
        with pytest.raises((TypeError, ValueError)):
            tokenizer_from_dict(bad)


def test_pieces_encode_as_the_whole_text(shakespeare_path):
    # encode() hands the library pieces of a long text; the ids must be the one-shot ones.
    text = shakespeare_path.read_text()[:700_000]
    bpe = BPETokenizer.train(text, 600)
    whole = tokenizers.Tokenizer.from_str(json.dumps(bpe.to_dict()["tokenizers"]))
    one_shot = np.array(whole.encode(text, add_special_tokens=False).ids) + 2
    assert_bitwise_equal(bpe.encode(text), one_shot.astype(np.int32), name="pieces vs one shot")


def test_vocabulary_sizes_out_of_range_or_unsupported_are_refused():
    with pytest.raises(ValueError, match=r"\[258, 65536\]"):
        BPETokenizer.train("some text", 10)
    with pytest.raises(ValueError, match="at most 260 ids"):
        BPETokenizer.train("ab ab ab\n" * 50, 4000)
    assert BPETokenizer.train("ab ab ab\n" * 50, BPE_MIN_VOCAB).vocab_size == BPE_MIN_VOCAB


def test_encoding_cache_is_reused_memory_mapped_and_redone_when_damaged(bpe, tmp_path):
    text = word_text(2000)
    direct = bpe.encode(text)
    first = encode_cached(text, bpe, tmp_path)
    files = list((tmp_path / "tokens").glob("*.npy"))
    assert len(files) == 1 and isinstance(first, np.memmap) and first.dtype == np.uint16
    assert_bitwise_equal(np.asarray(first, dtype=np.int32), direct, name="cached ids")
    second = encode_cached(text, bpe, tmp_path)
    assert isinstance(second, np.memmap) and np.array_equal(second, first)
    files[0].write_bytes(b"not an npy file")
    third = encode_cached(text, bpe, tmp_path)
    assert np.array_equal(third, direct)
    # Another text or another tokenizer is another entry; characters are never cached.
    encode_cached(text + "x", bpe, tmp_path)
    encode_cached(text, CharTokenizer.from_text(text), tmp_path)
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 2


def test_bits_per_character_is_the_loss_per_character_for_both_tokenizers(bpe):
    text = word_text(3000)
    for tok in (CharTokenizer.from_text(text), bpe):
        ds = Dataset(text, tok, 8)
        train_text, val_text = split_text(text)
        assert ds.chars == {"train": len(train_text), "val": len(val_text)}
        assert ds.bits_per_char(1.5, "val") == pytest.approx(
            1.5 * len(ds.val) / len(val_text) / math.log(2), rel=1e-12)
        # Each split is encoded alone: no token straddles the boundary.
        assert tok.decode(ds.train) == train_text and tok.decode(ds.val) == val_text
    char_ds = Dataset(text, CharTokenizer.from_text(text), 8)
    assert char_ds.bits_per_char(2.0) == pytest.approx(2.0 / math.log(2), rel=1e-12)


def _run(out_dir, iters, data, **kw):
    kw.setdefault("n_threads", 1)
    opts = RunOptions(iters=iters, data_path=str(data), out_dir=str(out_dir), eval_iters=2,
                      sample=False, overrides=dict(TINY), tokenizer="bpe", vocab_size=280, **kw)
    return train.run(None, opts, stdout=io.StringIO(), stderr=io.StringIO())


@pytest.fixture
def mixed_path(tmp_path):
    p = tmp_path / "mixed.txt"
    p.write_text(word_text(1500) + MIXED * 10)
    return p


@pytest.mark.usefixtures("run_sandbox")
def test_bpe_run_resumes_bit_exactly_and_its_checkpoint_serves_eval_and_sample(tmp_path, mixed_path):
    full = _run(tmp_path / "full", 16, mixed_path, eval_every=5, save_every=0)
    part = _run(tmp_path / "part", 16, mixed_path, eval_every=5, save_every=0, stop_at=7)
    rest = train.run(None, RunOptions(iters=16, resume=str(part.checkpoint), n_threads=1,
                                      eval_iters=2, eval_every=5, save_every=0, sample=False),
                     stdout=io.StringIO())
    assert part.losses + rest.losses == full.losses
    a, b = checkpoint.load(full.checkpoint), checkpoint.load(rest.checkpoint)
    assert_bitwise_equal(b.params, a.params, name="resumed params")
    assert isinstance(b.tokenizer, BPETokenizer) and b.tokenizer == a.tokenizer
    # The tokenizer was learned from the training split only, and is in config.json too.
    train_text = split_text(mixed_path.read_text())[0]
    assert a.tokenizer == BPETokenizer.train(train_text, 280)
    info = json.loads((tmp_path / "full" / "config.json").read_text())
    assert tokenizer_from_dict(info["tokenizer"]) == a.tokenizer
    # metrics.csv has the bits per character next to every validation loss.
    m = read_metrics(tmp_path / "full" / "metrics.csv")
    has = np.isfinite(m["val_loss"])
    assert np.array_equal(has, np.isfinite(m["val_bpc"])) and has.sum() >= 3
    report = evaluate_checkpoint(full.checkpoint, n_threads=1)
    ds = Dataset(mixed_path.read_text(), a.tokenizer, TINY["block_size"])
    assert report.bits_per_char == pytest.approx(ds.bits_per_char(report.loss), rel=1e-12)
    model, tok, _ = checkpoint.load_model(full.checkpoint, n_threads=1)
    pieces = []
    text = generate(model, tok, "the 漢", 40, rng=3, stream=pieces.append)
    assert "".join(pieces) == text and text.encode("utf-8").decode("utf-8") == text


@pytest.mark.usefixtures("run_sandbox")
@pytest.mark.parametrize("flags, message", [
    (["--tokenizer", "bpe", "--vocab-size", "10"], "vocab_size must be in [258, 65536]"),
    (["--tokenizer", "bpe", "--vocab-size", "5000"], "supports a BPE vocabulary of at most"),
    (["--vocab-size", "300"], "--vocab-size needs --tokenizer bpe"),
    (["--tokenizer", "words"], "invalid choice"),
])
def test_bad_vocabulary_settings_are_one_line_and_exit_2(capsys, mixed_path, flags, message):
    code = cli.main(["5", *TINY_FLAGS, "--data", str(mixed_path), "--out", "run", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.usefixtures("run_sandbox")
def test_resume_cannot_change_the_tokenizer(tmp_path, mixed_path, capsys):
    part = _run(tmp_path / "p", 6, mixed_path, eval_every=0, stop_at=3)
    code = cli.main(["6", "--resume", str(part.checkpoint), "--tokenizer", "char"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot change the tokenizer when resuming" in err


def test_metrics_written_before_val_bpc_still_resume_and_read(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("iter,train_loss,val_loss,lr,tok_per_s,elapsed_s\n"
                    "0,4.0,4.1,1e-4,,0.0\n10,3.0,,2e-4,100.0,1.5\n20,2.5,2.6,3e-4,100.0,3.0\n")
    old = read_metrics(path)
    assert "val_bpc" not in old and old["val_loss"][2] == 2.6
    f = MetricsFile(path, keep_until=10)
    f.write(20, 2.4, 2.5, 3e-4, 90.0, 3.1, 3.6)
    f.close()
    new = read_metrics(path)
    assert tuple(new) == METRICS_HEADER
    assert list(new["iter"]) == [0, 10, 20] and new["val_bpc"][2] == 3.6
    assert np.isnan(new["val_bpc"][:2]).all() and new["elapsed_s"][1] == 1.5


def test_a_char_checkpoint_loads_without_the_tokenizers_package(tmp_path):
    # A Python where `import tokenizers` fails: a char checkpoint samples, a BPE one says what
    # to install, in one line.
    text = word_text(400)
    code = f"""
import sys; sys.modules["tokenizers"] = None
import io
from randygpt import train, checkpoint, sample
from randygpt.train import RunOptions
for name, tok in (("char", None), ("bpe", "bpe")):
    opts = RunOptions(iters=2, out_dir={str(tmp_path)!r} + "/" + name, eval_iters=1,
                      sample=False, overrides={TINY!r}, n_threads=1, tokenizer=tok)
    try:
        r = train.run(None, opts, text={text!r}, stdout=io.StringIO())
    except ValueError as e:
        print("train", name, e)
        continue
    model, tk, _ = checkpoint.load_model(r.checkpoint, n_threads=1)
    print("sampled", type(tk).__name__, len(sample.generate(model, tk, "the", 5, rng=1)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "sampled CharTokenizer 5" in out.stdout
    assert "train bpe cannot build the BPE tokenizer: a BPE tokenizer needs the 'tokenizers' package" in out.stdout
