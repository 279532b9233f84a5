"""CharTokenizer: id layout, round trips, errors, serialisation."""
import numpy as np
import pytest

from randygpt.tokenizer import BOS, EOS, CharTokenizer


def test_layout_sorted_chars_after_specials():
    tok = CharTokenizer.from_text("banana!")
    assert tok.chars == ["!", "a", "b", "n"]
    assert tok.vocab_size == 6
    assert (BOS, EOS) == (0, 1)
    assert tok.encode("!ab n".replace(" ", "")).tolist() == [2, 3, 4, 5]


def test_round_trip(shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 67  # SPEC: 65 distinct characters + BOS + EOS
    piece = text[:5000]
    ids = tok.encode(piece)
    assert ids.dtype == np.int32 and ids.shape == (5000,)
    assert ids.min() >= 2
    assert tok.decode(ids) == piece


def test_round_trip_unicode():
    text = "héllo wörld ✓\n\ttab"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text


def test_bos_eos_are_added_and_skipped():
    tok = CharTokenizer.from_text("abc")
    ids = tok.encode("cab", bos=True, eos=True)
    assert ids.tolist() == [BOS, 4, 2, 3, EOS]
    assert tok.decode(ids) == "cab"
    assert tok.decode([BOS, EOS, BOS]) == ""


def test_unknown_chars_error_names_them():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError) as e:
        tok.encode("abzxz")
    msg = str(e.value)
    assert "'x'" in msg and "'z'" in msg and "'a'" not in msg
    assert tok.unknown_chars("abzxz") == ["x", "z"]


def test_decode_rejects_out_of_range_and_bad_types():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([2, 5])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(TypeError):
        tok.decode(np.array([2.0]))
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 2), dtype=np.int32))
    with pytest.raises(TypeError):
        tok.encode(b"abc")


def test_empty_text_rejected():
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.from_text("")


def test_dict_round_trip_and_validation():
    tok = CharTokenizer.from_text("hello, world\n")
    d = tok.to_dict()
    import json
    back = CharTokenizer.from_dict(json.loads(json.dumps(d)))
    assert back == tok and back.vocab_size == tok.vocab_size
    assert back.encode("hello").tolist() == tok.encode("hello").tolist()
    with pytest.raises(ValueError, match="unknown keys"):
        CharTokenizer.from_dict({**d, "extra": 1})
    with pytest.raises(ValueError, match="sorted"):
        CharTokenizer.from_dict({"type": "char", "chars": "ba"})
    with pytest.raises(ValueError, match="distinct"):
        CharTokenizer.from_dict({"type": "char", "chars": "aa"})
    with pytest.raises(ValueError, match="type"):
        CharTokenizer.from_dict({"type": "bpe", "chars": "ab"})
