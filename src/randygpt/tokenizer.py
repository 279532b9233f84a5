"""Tokenizers: id 0 = BOS, id 1 = EOS in both, then

- ``CharTokenizer``: the corpus's distinct characters in sorted order;
- ``BPETokenizer``: a byte-level BPE (the 256 bytes, then the learned merges), trained with the
  optional ``tokenizers`` package (``pip install 'randygpt[bpe]'``).

The mapping is stored in every checkpoint (``to_dict``; ``tokenizer_from_dict`` reads either
kind back) so sampling decodes with exactly the vocabulary the model was trained on. A char
vocabulary never imports ``tokenizers``.
"""
import codecs
import json

import numpy as np

__all__ = ["CharTokenizer", "BPETokenizer", "BOS", "EOS", "tokenizer_from_dict", "TOKENIZERS",
           "BPE_MIN_VOCAB", "BPE_MAX_VOCAB"]

BOS = 0
EOS = 1
# Ids below this are special tokens; characters start here.
FIRST_CHAR_ID = 2


class CharTokenizer:
    """Maps characters to int32 ids and back.

    ``chars`` is the sorted list of distinct characters; ``vocab_size = len(chars) + 2``.
    """

    BOS = BOS
    EOS = EOS
    kind = "char"

    def __init__(self, chars):
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"chars: every entry must be a one-character string, got {c!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("chars: entries must be distinct")
        if chars != sorted(chars):
            raise ValueError("chars: entries must be in sorted order")
        self.chars = chars
        self.vocab_size = len(chars) + FIRST_CHAR_ID
        self._stoi = {c: i + FIRST_CHAR_ID for i, c in enumerate(chars)}
        # Lookup table for decode; special ids map to "" so they vanish from the text.
        self._itos = ["", ""] + chars
        # Code points in the same (sorted) order, for encoding with one binary search.
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text):
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("text is empty: a tokenizer needs at least one character")
        return cls(sorted(set(text)))

    def unknown_chars(self, text):
        """The sorted distinct characters of ``text`` that are not in the vocabulary."""
        return sorted(set(text) - self._stoi.keys())

    def encode(self, text, bos=False, eos=False, dtype=np.int32):
        """str -> array of ids (``dtype``, int32 by default). Raises ValueError naming
        characters not in the vocabulary."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        missing = self.unknown_chars(text)
        if missing:
            shown = ", ".join(repr(c) for c in missing[:10])
            more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
            raise ValueError(f"text contains characters not in the vocabulary: {shown}{more}")
        # Vectorised: a Python list of a megabyte of text's ids would cost 9 MB of memory.
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
        lead = 1 if bos else 0
        ids = np.empty(lead + len(codes) + (1 if eos else 0), dtype=dtype)
        ids[lead:lead + len(codes)] = np.searchsorted(self._codes, codes) + FIRST_CHAR_ID
        if bos:
            ids[0] = BOS
        if eos:
            ids[-1] = EOS
        return ids

    def decode(self, ids):
        """ids -> str; BOS and EOS are skipped. Raises ValueError for ids outside the vocabulary."""
        itos = self._itos
        return "".join(itos[i] for i in _checked_ids(ids, self.vocab_size))

    def stream_decoder(self):
        """A decoder fed one id at a time (see _CharStream); a character is always whole."""
        return _CharStream(self)

    def to_dict(self):
        return {"type": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d):
        _check_dict(d, "char", "chars")
        chars = d.get("chars")
        if not isinstance(chars, str):
            raise ValueError("tokenizer dict: 'chars' must be a string of the vocabulary's characters")
        return cls(list(chars))

    def __eq__(self, other):
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __hash__(self):
        return hash(tuple(self.chars))

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def _checked_ids(ids, vocab_size):
    """ids (1-D integers in [0, vocab_size)) as a list; TypeError/ValueError otherwise."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return []
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"ids: {bad} is outside the vocabulary [0, {vocab_size})")
    return arr.tolist()


def _check_dict(d, kind, field):
    """A to_dict() result of type ``kind`` (char, the default for a dict without a type, as
    older checkpoints wrote) with no key but "type" and ``field``."""
    if not isinstance(d, dict):
        raise TypeError(f"tokenizer dict must be a dict, got {type(d).__name__}")
    unknown = set(d) - {"type", field}
    if unknown:
        raise ValueError(f"tokenizer dict has unknown keys: {sorted(unknown)}")
    if d.get("type", "char") != kind:
        raise ValueError(f"tokenizer type must be {kind!r}, got {d.get('type')!r}")


class _CharStream:
    """feed(id) -> the text it adds; flush() -> what is left (always "" for characters)."""

    def __init__(self, tokenizer):
        self._decode = tokenizer.decode

    def feed(self, token):
        return self._decode([token])

    def flush(self):
        return ""


TOKENIZERS = ("char", "bpe")
# 2 special ids and the 256 bytes: a BPE of this size has no merge yet, but every text encodes.
BPE_MIN_VOCAB = FIRST_CHAR_ID + 256
# Ids stay uint16 on disk and in memory (data.py keeps the narrowest dtype).
BPE_MAX_VOCAB = 65536
# encode() hands the library pieces of about this many characters (cut where the split is
# exact, see _pieces): a whole 100 MB text at once would hold every token's offsets and string.
_PIECE_CHARS = 1 << 18
# Pieces per encode_batch call: the library encodes them in parallel.
_PIECES_PER_BATCH = 16


def _byte_symbols():
    """The printable stand-in character of each byte that byte-level BPE vocabularies (GPT-2's
    convention, which ``tokenizers``' ByteLevel follows) write tokens with: a byte that is a
    visible Latin-1 character stands for itself, the others (controls, space, soft hyphen) are
    given the code points from 256 up, in byte order."""
    visible = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, extra = [], 0
    for b in range(256):
        if b in visible:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


_SYMBOL_BYTE = {c: b for b, c in enumerate(_byte_symbols())}


def _require_tokenizers():
    # Imported only for a BPE vocabulary: char runs and checkpoints never need the extra.
    try:
        import tokenizers
    except ImportError:
        raise ValueError("a BPE tokenizer needs the 'tokenizers' package: pip install "
                         "'randygpt[bpe]'") from None
    return tokenizers


def _pieces(text, size=_PIECE_CHARS):
    """Cut text into pieces of about ``size`` characters, each ending on a visible ASCII
    character followed by a space or newline. ByteLevel's split never joins across such a
    place (its only lookahead is inside whitespace runs), so encoding the pieces one by one
    gives the ids of the whole text. A text with no such place within 4 * size characters is
    cut there anyway: still exact to decode, a token may then differ from a one-shot encoding."""
    start, n = 0, len(text)
    while n - start > size:
        cut = _find_cut(text, start + size, min(n, start + 4 * size))
        yield text[start:cut]
        start = cut
    if start < n:
        yield text[start:]


def _find_cut(text, lo, hi):
    for sep in (" ", "\n"):
        i = text.find(sep, lo, hi)
        while i != -1:
            if "!" <= text[i - 1] <= "~":
                return i
            i = text.find(sep, i + 1, hi)
    return lo


class BPETokenizer:
    """Byte-level BPE: BOS = 0, EOS = 1, then the ``tokenizers`` vocabulary shifted by 2 (its
    256 bytes and its merges). Any str that is valid Unicode encodes (no unknown characters);
    decoding joins the tokens' bytes and replaces a sequence that is not UTF-8 (a sample may
    stop inside a character) with U+FFFD, so every decoded text is valid.

    Build one with ``BPETokenizer.train(text, vocab_size)`` or ``from_dict``.
    """

    BOS = BOS
    EOS = EOS
    kind = "bpe"

    def __init__(self, spec):
        """spec: the library's JSON description (a dict) of a byte-level BPE."""
        lib = _require_tokenizers()
        if not isinstance(spec, dict):
            raise ValueError("the BPE spec must be a JSON object")
        model = spec.get("model")
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise ValueError("the BPE spec has no BPE model")
        pre = spec.get("pre_tokenizer")
        if not isinstance(pre, dict) or pre.get("type") != "ByteLevel":
            raise ValueError("the BPE spec is not byte-level (its pre_tokenizer is not ByteLevel)")
        if spec.get("added_tokens") or spec.get("normalizer") is not None:
            raise ValueError("the BPE spec has added tokens or a normalizer: not randygpt's")
        self._table = _byte_table(model.get("vocab"))
        self._json = json.dumps(spec, sort_keys=True, ensure_ascii=False)
        try:
            self._tok = lib.Tokenizer.from_str(self._json)
        except Exception as e:  # the library raises plain Exception for a malformed spec
            raise ValueError(f"the BPE spec does not load: {e}") from None
        if self._tok.get_vocab_size() != len(self._table):
            raise ValueError("the BPE spec's vocabulary and model disagree")
        self._spec = spec
        self.vocab_size = len(self._table) + FIRST_CHAR_ID
        self._byte_list = [b"", b""] + self._table

    @classmethod
    def train(cls, text, vocab_size):
        """Learn merges from ``text`` (the training split only) until the vocabulary has
        ``vocab_size`` ids. Raises ValueError for a size outside [BPE_MIN_VOCAB,
        BPE_MAX_VOCAB] or one the text cannot fill (every word already one token)."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
            raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
        if not BPE_MIN_VOCAB <= vocab_size <= BPE_MAX_VOCAB:
            raise ValueError(f"a BPE vocabulary size must be in [{BPE_MIN_VOCAB}, {BPE_MAX_VOCAB}] "
                             f"(2 special ids + 256 bytes + merges), got {vocab_size}")
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("text is empty: a tokenizer needs at least one character")
        lib = _require_tokenizers()
        tok = lib.Tokenizer(lib.models.BPE())
        tok.pre_tokenizer = lib.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = lib.decoders.ByteLevel()
        trainer = lib.trainers.BpeTrainer(
            vocab_size=int(vocab_size) - FIRST_CHAR_ID, min_frequency=0, show_progress=False,
            initial_alphabet=lib.pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
        tok.train_from_iterator(_pieces(_checked_utf8(text)), trainer=trainer)
        got = tok.get_vocab_size() + FIRST_CHAR_ID
        if got < vocab_size:
            raise ValueError(f"the training text supports a BPE vocabulary of at most {got} ids "
                             f"(every word is one token by then), not {vocab_size}: choose a "
                             "smaller --vocab-size or a longer text")
        return cls(json.loads(tok.to_str()))

    def unknown_chars(self, text):
        """Characters that cannot be encoded: only lone surrogates (not Unicode text)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return sorted({c for c in text if 0xD800 <= ord(c) <= 0xDFFF})
        return []

    def encode(self, text, bos=False, eos=False, dtype=np.int32):
        """str -> array of ids (``dtype``, int32 by default). Raises ValueError for a str that
        is not valid Unicode (lone surrogates)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        _checked_utf8(text)
        parts = [np.array([BOS], dtype=dtype)] if bos else []
        batch = []
        for piece in _pieces(text):
            batch.append(piece)
            if len(batch) == _PIECES_PER_BATCH:
                parts += self._encode_batch(batch, dtype)
                batch = []
        parts += self._encode_batch(batch, dtype)
        if eos:
            parts.append(np.array([EOS], dtype=dtype))
        return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)

    def _encode_batch(self, pieces, dtype):
        if not pieces:
            return []
        encodings = self._tok.encode_batch_fast(pieces, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64).astype(dtype) + FIRST_CHAR_ID for e in encodings]

    def token_bytes(self, token):
        """The bytes of one id (b"" for BOS and EOS)."""
        return self._byte_list[token]

    def decode(self, ids):
        """ids -> str; BOS and EOS are skipped, bytes that are not UTF-8 become U+FFFD. Raises
        ValueError for ids outside the vocabulary."""
        table = self._byte_list
        return b"".join(table[i] for i in _checked_ids(ids, self.vocab_size)).decode(
            "utf-8", errors="replace")

    def stream_decoder(self):
        """A decoder fed one id at a time that returns only whole characters: a character
        split over several byte tokens comes out with its last byte."""
        return _BytesStream(self)

    def to_dict(self):
        return {"type": "bpe", "tokenizers": self._spec}

    @classmethod
    def from_dict(cls, d):
        _check_dict(d, "bpe", "tokenizers")
        return cls(d.get("tokenizers"))

    def __eq__(self, other):
        return isinstance(other, BPETokenizer) and self._json == other._json

    def __hash__(self):
        return hash(self._json)

    def __repr__(self):
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def _checked_utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text is not valid Unicode: {text[e.start]!r} at index {e.start} "
                         "is a lone surrogate") from None
    return text


def _byte_table(vocab):
    """The library's vocabulary {token string: id} as a list of each id's bytes."""
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError("the BPE spec has no vocabulary")
    table = [None] * len(vocab)
    for token, i in vocab.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(vocab) or table[i]:
            raise ValueError(f"the BPE vocabulary's ids are not 0..{len(vocab) - 1}")
        try:
            table[i] = bytes(_SYMBOL_BYTE[c] for c in token)
        except (KeyError, TypeError):
            raise ValueError(f"the BPE vocabulary has a token that is not byte-level: {token!r}") from None
        if not table[i]:
            raise ValueError("the BPE vocabulary has an empty token")
    return table


class _BytesStream:
    """feed(id) -> the whole characters completed so far; flush() -> the rest (U+FFFD for an
    unfinished character)."""

    def __init__(self, tokenizer):
        self._bytes = tokenizer.token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token):
        return self._decoder.decode(self._bytes(token))

    def flush(self):
        return self._decoder.decode(b"", final=True)


def tokenizer_from_dict(d):
    """The tokenizer a checkpoint's ``to_dict`` describes: char (the default for a dict
    without a type, as older checkpoints wrote) or bpe. Raises TypeError/ValueError."""
    if isinstance(d, dict) and d.get("type") == "bpe":
        return BPETokenizer.from_dict(d)
    return CharTokenizer.from_dict(d)
