"""Training text: where it comes from, the train/validation split, and random batches.

The text is, in order of preference: the file the user named, ``./train.txt``, the cached Tiny
Shakespeare corpus (downloaded once, checksum verified), and last a small built-in sample that
is only good enough to show the program runs. This module never prints: the caller reports the
source and any warning. It owns no RNG either: ``get_batch`` takes the caller's generator.
"""
import hashlib
import json
import math
import os
from collections import namedtuple
from pathlib import Path

import numpy as np

from .fileio import NotRegularFileError, atomic_write, open_regular

__all__ = ["DataError", "TextTooShort", "load_text", "text_fingerprint", "verify_text",
           "default_cache_dir", "download_shakespeare", "resolve_source", "TextSource", "Dataset",
           "SHAKESPEARE_URL", "SHAKESPEARE_SHA256", "BUILTIN_TEXT", "split_text", "encode_cached"]

SHAKESPEARE_URL = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                   "tinyshakespeare/input.txt")
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILENAME = "tinyshakespeare.txt"
# The corpus is about 1.1 MB; anything much larger is not the file we asked for.
_MAX_DOWNLOAD_BYTES = 4 * 1024 * 1024

# The last resort when there is no data and no network. It is tiny on purpose: training on it
# proves the program runs, not that the model learns English. It holds every character of the
# three sampling prompts so the end-of-run samples still work.
BUILTIN_TEXT = """\
ROMEO:
To be or not to be, that is what the small machine asked of its own weights.
Once upon a time a little model read the same few lines again and again,
and every time it read them it guessed the next letter a little better.

JULIET:
Once upon a time there was a garden, and in the garden grew a tree,
and under the tree sat a student counting the letters of every word.
To be or not to be, said the student, is a question of many letters.

ROMEO:
What light through yonder window breaks? It is the morning, and the lamp is out.
Come, let us read again, for the night is long and the text is short.
A few sentences are not a library, but they will do to show the wheels turn.

JULIET:
Give the model a real book and it will learn the shape of a real language.
Give it these lines and it will learn these lines, and little more.
Once upon a time, to be or not to be: the small machine keeps asking.
"""

TextSource = namedtuple("TextSource", ["text", "description", "warning", "path"])
TextSource.__doc__ = """The chosen training text, a one-line description of where it came from,
a warning for the user (None when there is nothing to warn about), and the absolute path of the
file it was read from (None for the built-in sample)."""


class DataError(ValueError):
    """The training text is missing, unreadable or unusable; the message is one clear line."""


class TextTooShort(DataError):
    """The text's splits are shorter than one window; the caller knows which remedy the user
    has (a smaller block size when training, only a longer text when evaluating)."""


def load_text(path):
    """Read a UTF-8 text file. Raises DataError for a missing file, anything that is not a
    regular file (a directory, a FIFO, a device such as /dev/zero, also behind a symbolic
    link: refused before it is opened, so nothing blocks or reads without end), an unreadable
    file, bytes that are not UTF-8, or a file with no characters."""
    p = Path(path)
    try:
        f, size = open_regular(p)
        with f:
            raw = f.read(size)
    except FileNotFoundError:
        raise DataError(f"data file {str(p)!r} does not exist") from None
    except NotRegularFileError as e:
        raise DataError(f"data path {str(p)!r} is {e.kind}, not a text file") from None
    except OSError as e:
        raise DataError(f"cannot read data file {str(p)!r}: {e.strerror or e}") from None
    except ValueError as e:  # a path with a NUL byte in it
        raise DataError(f"data path {str(p)!r} is not a usable path ({e})") from None
    except MemoryError:
        raise DataError(f"data file {str(p)!r} ({size:,} bytes) is too large to read into "
                        "memory") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {str(p)!r} is not UTF-8 text (invalid byte at offset {e.start})") from None
    # A UTF-8 byte-order mark is an encoding artefact, not a character to learn.
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text:
        raise DataError(f"data file {str(p)!r} is empty")
    return text


def text_fingerprint(text):
    """The identity of a training text, for a checkpoint to record: {"bytes": size of its
    UTF-8 encoding, "sha256": hex digest of it}. For a file without a byte-order mark these
    are the file's own size and sha256 (``sha256sum`` shows the same)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    raw = text.encode("utf-8")
    return {"bytes": len(raw), "sha256": _sha256(raw)}


def verify_text(text, recorded, source):
    """Check that ``text`` is the text whose text_fingerprint() is ``recorded`` (a dict; keys
    other than "bytes" and "sha256" are ignored). ``source`` names the text in the message (a
    path or a description). Raises DataError saying what changed, or that the record is
    unusable."""
    try:
        want_bytes, want_sha = int(recorded["bytes"]), str(recorded["sha256"])
    except (TypeError, KeyError, ValueError):
        raise DataError(f"the checkpoint's record of its training text {source} is malformed; "
                        "pass the text with --data") from None
    got = text_fingerprint(text)
    if got["bytes"] == want_bytes and got["sha256"] == want_sha:
        return
    raise DataError(f"the checkpoint was trained on {source} ({want_bytes:,} bytes, sha256 "
                    f"{want_sha[:8]}...); that file now has {got['bytes']:,} bytes, sha256 "
                    f"{got['sha256'][:8]}...: restore it, or pass --data to continue on "
                    "another text deliberately")


def default_cache_dir(env=None):
    """Per-user cache: $RANDYGPT_CACHE_DIR, else $XDG_CACHE_HOME/randygpt, else ~/.cache/randygpt."""
    env = os.environ if env is None else env
    if env.get("RANDYGPT_CACHE_DIR"):
        return Path(env["RANDYGPT_CACHE_DIR"])
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "randygpt"
    return Path.home() / ".cache" / "randygpt"


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def download_shakespeare(cache_dir=None, url=SHAKESPEARE_URL, timeout=10.0,
                         sha256=SHAKESPEARE_SHA256):
    """Return the path of the cached Tiny Shakespeare corpus, downloading it first if needed.

    A cached file is trusted only if its checksum matches; otherwise it is fetched again.
    Raises DataError (one line, with the reason) if the download fails or does not match.
    """
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    path = cache_dir / SHAKESPEARE_FILENAME
    try:
        f, _ = open_regular(path)
        with f:
            if _sha256(f.read(_MAX_DOWNLOAD_BYTES + 1)) == sha256:
                return path
    except OSError:  # absent, not a regular file, unreadable: fetch it again
        pass
    # Imported here: urllib.request brings in ssl and http, 7 MiB of a run's memory that a run
    # whose text is already on disk does not need.
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = resp.read(_MAX_DOWNLOAD_BYTES + 1)
    except Exception as e:  # URLError, timeouts, HTTP errors, bad URLs: all mean "no corpus"
        reason = getattr(e, "reason", None) or e
        raise DataError(f"could not download Tiny Shakespeare from {url}: {reason}") from None
    if len(data) > _MAX_DOWNLOAD_BYTES:
        raise DataError(f"download from {url} is larger than expected; not using it")
    got = _sha256(data)
    if got != sha256:
        raise DataError(f"download from {url} has sha256 {got[:12]}..., expected {sha256[:12]}...")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        raise DataError(f"cannot write the corpus cache {str(path)!r}: {e.strerror or e}") from None
    return path


def resolve_source(data_path=None, cache_dir=None, *, cwd=None, url=SHAKESPEARE_URL, timeout=10.0):
    """Choose the training text. Returns TextSource(text, description, warning, path).

    An explicit ``data_path`` or an existing ``./train.txt`` must be valid (DataError otherwise):
    the user asked for it, so silently training on something else would be wrong. Only the
    download may fail, and then the built-in sample is used with a warning.
    """
    if data_path is not None:
        text = load_text(data_path)
        return TextSource(text, f"{data_path} ({len(text):,} characters)", None,
                          str(Path(data_path).resolve()))
    local = Path.cwd() / "train.txt" if cwd is None else Path(cwd) / "train.txt"
    if local.exists():
        text = load_text(local)
        return TextSource(text, f"./train.txt ({len(text):,} characters)", None, str(local.resolve()))
    try:
        path = download_shakespeare(cache_dir, url=url, timeout=timeout)
        text = load_text(path)
        return TextSource(text, f"Tiny Shakespeare, cached at {path} ({len(text):,} characters)",
                          None, str(Path(path).resolve()))
    except DataError as e:
        warning = (f"{e}. Falling back to a tiny built-in sample ({len(BUILTIN_TEXT):,} characters): "
                   "the model will only memorise it and results will be poor. "
                   "Pass your own text with --data PATH (or put it in ./train.txt).")
        return TextSource(BUILTIN_TEXT, f"built-in sample ({len(BUILTIN_TEXT):,} characters)",
                          warning, None)


def _id_dtype(vocab_size):
    """The narrowest unsigned integer type holding ids 0 .. vocab_size - 1."""
    for dtype in (np.uint8, np.uint16):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return dtype
    return np.int32


def _as_ids(windows):
    """Token windows as the model takes them: a C-contiguous int32 array."""
    return np.ascontiguousarray(windows, dtype=np.int32)


def split_text(text, val_fraction=0.1):
    """(training text, validation text): the first and last characters of ``text``, the
    validation part ``val_fraction`` of them. A tokenizer that learns from its text (BPE) is
    trained on the first part only."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n_train = int(len(text) * (1.0 - val_fraction))
    return text[:n_train], text[n_train:]


def encode_cached(text, tokenizer, cache_dir=None):
    """``tokenizer.encode(text)`` in the narrowest unsigned dtype for its vocabulary. With a
    cache directory, a BPE encoding is kept there as ``tokens/<sha256>.npy`` (keyed by the text
    and the tokenizer) and read back memory-mapped: a second run on the same text and
    tokenizer neither encodes again nor holds the ids in memory. A character encoding is
    faster to redo than to read, so it is never cached. An unreadable cache entry is redone."""
    dtype = _id_dtype(tokenizer.vocab_size)
    if cache_dir is None or tokenizer.kind != "bpe":
        return tokenizer.encode(text, dtype=dtype)
    key = hashlib.sha256(json.dumps(tokenizer.to_dict(), sort_keys=True).encode("utf-8"))
    key.update(b"\0")
    key.update(text.encode("utf-8"))
    path = Path(cache_dir) / "tokens" / f"{key.hexdigest()[:32]}.npy"
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
        if ids.dtype == dtype and ids.ndim == 1:
            return ids
    except (OSError, ValueError):  # absent or damaged: encode again
        pass
    ids = tokenizer.encode(text, dtype=dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.save(f, ids, allow_pickle=False))
    except OSError:  # a cache that cannot be written only costs the next run the encoding
        return ids
    return np.load(path, mmap_mode="r", allow_pickle=False)


class Dataset:
    """A text split into train (first 90% of its characters) and validation (the rest), each
    encoded on its own (see encode_cached for ``cache_dir``).

    ``block_size`` is T: a batch row is a window of T+1 consecutive ids, x its first T, y its
    last T (the targets are the inputs shifted by one). ``chars`` holds each split's length
    in characters, for bits_per_char.
    """

    def __init__(self, text, tokenizer, block_size, val_fraction=0.1, cache_dir=None):
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        missing = tokenizer.unknown_chars(text)
        if missing:
            shown = ", ".join(repr(c) for c in missing[:10])
            raise DataError(f"the text has characters the tokenizer does not know: {shown}")
        self.tokenizer = tokenizer
        self.block_size = int(block_size)
        # Held in the narrowest unsigned type that fits every id (one byte per character for
        # vocabularies up to 256): a megabyte of text stays a megabyte during training, not
        # four. Batches and windows come out as int32. Each split is encoded alone, so no
        # token straddles the boundary and a BPE never saw the validation text.
        train_text, val_text = split_text(text, val_fraction)
        self.chars = {"train": len(train_text), "val": len(val_text)}
        self.train = encode_cached(train_text, tokenizer, cache_dir)
        self.val = encode_cached(val_text, tokenizer, cache_dir)
        del train_text, val_text
        unit = "characters" if tokenizer.kind == "char" else "tokens"
        need = self.block_size + 1
        for name, split in (("training", self.train), ("validation", self.val)):
            if len(split) < need:
                raise TextTooShort(
                    f"the text is too short: its {name} split has {len(split)} {unit} but one "
                    f"window needs block_size+1 = {need} (the text has "
                    f"{len(self.train) + len(self.val)} {unit})")
        self._offsets = np.arange(self.block_size + 1, dtype=np.int64)

    def bits_per_char(self, loss, split="val"):
        """A mean loss in nats per token of ``split`` as bits per character of that split: the
        measure that compares tokenizers (a BPE token carries several characters)."""
        ids = self.split(split)
        return loss * len(ids) / (self.chars[split] * math.log(2))

    def split(self, split):
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def get_batch(self, split, batch_size, rng):
        """B windows of T+1 ids at positions drawn from ``rng``: x, y int32 (B, T), y = x shifted by one.

        One ``rng.integers`` call per batch, so the stream of positions depends only on the
        generator's state: restoring that state (resume) reproduces the same batches.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        data = self.split(split)
        T = self.block_size
        starts = rng.integers(0, len(data) - T, size=int(batch_size))
        windows = data[starts[:, None] + self._offsets]  # (B, T+1)
        return _as_ids(windows[:, :T]), _as_ids(windows[:, 1:])

