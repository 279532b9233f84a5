"""Character-level tokenizer: id 0 = BOS, id 1 = EOS, then the corpus's distinct characters
in sorted order. Its mapping is stored in every checkpoint so sampling decodes with exactly
the vocabulary the model was trained on."""
import numpy as np

__all__ = ["CharTokenizer", "BOS", "EOS"]

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

    def encode(self, text, bos=False, eos=False):
        """str -> int32 array of ids. Raises ValueError naming characters not in the vocabulary."""
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
        ids = np.empty(lead + len(codes) + (1 if eos else 0), dtype=np.int32)
        ids[lead:lead + len(codes)] = np.searchsorted(self._codes, codes) + FIRST_CHAR_ID
        if bos:
            ids[0] = BOS
        if eos:
            ids[-1] = EOS
        return ids

    def decode(self, ids):
        """ids -> str; BOS and EOS are skipped. Raises ValueError for ids outside the vocabulary."""
        arr = np.asarray(ids)
        if arr.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {arr.shape}")
        if arr.size == 0:
            return ""
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"ids must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"ids: {bad} is outside the vocabulary [0, {self.vocab_size})")
        itos = self._itos
        return "".join(itos[i] for i in arr.tolist())

    def to_dict(self):
        return {"type": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise TypeError(f"tokenizer dict must be a dict, got {type(d).__name__}")
        unknown = set(d) - {"type", "chars"}
        if unknown:
            raise ValueError(f"tokenizer dict has unknown keys: {sorted(unknown)}")
        if d.get("type", "char") != "char":
            raise ValueError(f"tokenizer type must be 'char', got {d.get('type')!r}")
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
