"""Text loading, the corpus download/cache fallback chain (never touching the network),
the train/val split and batch sampling."""
import hashlib

import numpy as np
import pytest

from randygpt import data
from randygpt.data import BUILTIN_TEXT, DataError, Dataset, load_text, resolve_source
from randygpt.tokenizer import CharTokenizer

# An address that cannot resolve: a test that reaches for the network fails fast and offline.
NO_NETWORK_URL = "http://randygpt-test.invalid/input.txt"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RANDYGPT_CACHE_DIR", str(tmp_path / "cache"))


def test_load_text_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_text(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="directory"):
        load_text(tmp_path)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"abc\xff\xfedef")
    with pytest.raises(DataError, match="not UTF-8.*offset 3"):
        load_text(tmp_path / "bin.txt")
    assert issubclass(DataError, ValueError)


def test_load_text_strips_bom(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffhello".encode("utf-8"))
    assert load_text(tmp_path / "bom.txt") == "hello"


def test_cache_dir_precedence(tmp_path):
    env = {"RANDYGPT_CACHE_DIR": "/a", "XDG_CACHE_HOME": "/b"}
    assert str(data.default_cache_dir(env)) == "/a"
    assert str(data.default_cache_dir({"XDG_CACHE_HOME": "/b"})) == "/b/randygpt"
    assert str(data.default_cache_dir({})).endswith(".cache/randygpt")


def test_resolve_prefers_data_then_train_txt(tmp_path):
    (tmp_path / "train.txt").write_text("local text " * 20)
    (tmp_path / "mine.txt").write_text("my own text " * 20)
    src = resolve_source(tmp_path / "mine.txt", cwd=tmp_path, url=NO_NETWORK_URL)
    assert src.text.startswith("my own") and src.warning is None
    src = resolve_source(None, cwd=tmp_path, url=NO_NETWORK_URL)
    assert src.text.startswith("local") and "train.txt" in src.description
    # An explicit path that is bad is an error, not a silent fallback.
    with pytest.raises(DataError):
        resolve_source(tmp_path / "missing.txt", cwd=tmp_path, url=NO_NETWORK_URL)


def test_offline_falls_back_to_builtin_with_warning(tmp_path):
    src = resolve_source(None, cwd=tmp_path, url=NO_NETWORK_URL, timeout=2)
    assert src.text == BUILTIN_TEXT
    assert "built-in" in src.description
    assert "--data" in src.warning and "poor" in src.warning
    assert not (tmp_path / "cache" / data.SHAKESPEARE_FILENAME).exists()


def test_builtin_text_has_the_prompt_characters():
    tok = CharTokenizer.from_text(BUILTIN_TEXT)
    for prompt in ("ROMEO:", "To be or not to be", "Once upon a time"):
        assert tok.unknown_chars(prompt) == []
    Dataset(BUILTIN_TEXT, tok, 64)  # the default block size fits both splits


def test_download_checks_sha_and_caches(tmp_path, shakespeare_path):
    cache = tmp_path / "c1"
    # A file:// URL stands in for the server: same bytes, no network.
    path = data.download_shakespeare(cache, url=shakespeare_path.as_uri())
    assert path == cache / data.SHAKESPEARE_FILENAME
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.SHAKESPEARE_SHA256
    assert not list(cache.glob("*.tmp"))
    # Cached: a second call must not need the URL at all.
    assert data.download_shakespeare(cache, url=NO_NETWORK_URL) == path
    src = resolve_source(None, cache, cwd=tmp_path, url=NO_NETWORK_URL)
    assert src.warning is None and "Tiny Shakespeare" in src.description and len(src.text) == 1115394


def test_download_rejects_wrong_checksum_and_bad_cache(tmp_path):
    bogus = tmp_path / "bogus.txt"
    bogus.write_text("not the corpus")
    cache = tmp_path / "c2"
    with pytest.raises(DataError, match="sha256"):
        data.download_shakespeare(cache, url=bogus.as_uri())
    assert not (cache / data.SHAKESPEARE_FILENAME).exists()
    # A corrupted cache file is not trusted: it is fetched again (and here that fails).
    cache.mkdir(parents=True, exist_ok=True)
    (cache / data.SHAKESPEARE_FILENAME).write_text("truncated")
    src = resolve_source(None, cache, cwd=tmp_path, url=bogus.as_uri())
    assert src.text == BUILTIN_TEXT and "sha256" in src.warning


def _tiny_dataset(block_size=8, n=200):
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(n))
    tok = CharTokenizer.from_text(text)
    return text, tok, Dataset(text, tok, block_size)


def test_split_sizes_and_contents():
    text, tok, ds = _tiny_dataset(n=200)
    assert len(ds.train) == 180 and len(ds.val) == 20
    # 26 letters and the special ids fit a byte: the splits are stored as uint8.
    assert ds.train.dtype == np.uint8 and ds.val.dtype == np.uint8
    assert tok.decode(ds.train) + tok.decode(ds.val) == text
    x, y = ds.get_batch("val", 3, np.random.default_rng(0))
    assert x.dtype == np.int32 and y.dtype == np.int32 and x.flags.c_contiguous


def test_ids_are_stored_in_the_narrowest_type():
    from randygpt.data import _id_dtype
    assert _id_dtype(1) == np.uint8 and _id_dtype(256) == np.uint8
    assert _id_dtype(257) == np.uint16 and _id_dtype(65536) == np.uint16
    assert _id_dtype(65537) == np.int32
    # A vocabulary over 256 ids keeps every id exactly.
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 3
    tok = CharTokenizer.from_text(text)
    ds = Dataset(text, tok, 8)
    assert tok.vocab_size > 256 and ds.train.dtype == np.uint16
    assert tok.decode(ds.train) + tok.decode(ds.val) == text


def test_too_short_texts_are_rejected():
    tok = CharTokenizer.from_text("abcdefghij")
    # 100 chars -> val has 10 < block_size+1 = 11.
    with pytest.raises(DataError, match="validation split has 10 characters.*11"):
        Dataset("abcdefghij" * 10, tok, 10)
    with pytest.raises(DataError, match="training split"):
        Dataset("abcdefghij" * 10, tok, 95, val_fraction=0.05)
    Dataset("abcdefghij" * 11, tok, 10)  # 110 chars -> val 11: exactly one window
    with pytest.raises(DataError, match="does not know"):
        Dataset("xyz" * 100, tok, 4)
    with pytest.raises(ValueError, match="block_size"):
        Dataset("abcdefghij" * 10, tok, 0)


def test_batch_shapes_and_shifted_targets(rng):
    text, tok, ds = _tiny_dataset(block_size=8)
    x, y = ds.get_batch("train", 5, rng)
    assert x.shape == (5, 8) and y.shape == (5, 8)
    assert x.dtype == np.int32 and y.dtype == np.int32
    assert x.flags.c_contiguous and y.flags.c_contiguous
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    train_str = tok.decode(ds.train)
    for row_x, row_y in zip(x, y):
        s = tok.decode(row_x) + tok.decode(row_y[-1:])
        assert s in train_str
    xv, yv = ds.get_batch("val", 3, rng)
    val_str = tok.decode(ds.val)
    for row_x in xv:
        assert tok.decode(row_x) in val_str
    with pytest.raises(ValueError, match="split"):
        ds.get_batch("test", 2, rng)
    with pytest.raises(ValueError, match="batch_size"):
        ds.get_batch("train", 0, rng)


def test_batches_deterministic_from_rng_and_cover_the_ends():
    _, _, ds = _tiny_dataset(block_size=8)
    a = [ds.get_batch("train", 4, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(a[0][0], a[1][0])
    r = np.random.default_rng(7)
    first = ds.get_batch("train", 4, r)[0]
    second = ds.get_batch("train", 4, r)[0]
    assert not np.array_equal(first, second)
    # Restoring the generator state replays the stream exactly (what resume relies on).
    r = np.random.default_rng(3)
    ds.get_batch("train", 4, r)
    state = r.bit_generator.state
    after = ds.get_batch("train", 4, r)[0]
    r2 = np.random.default_rng(0)
    r2.bit_generator.state = state
    np.testing.assert_array_equal(ds.get_batch("train", 4, r2)[0], after)
    # Over many draws every window start, including the last one, is reachable.
    r = np.random.default_rng(0)
    last_start_first_id = ds.train[len(ds.train) - 9]
    seen_last = False
    for _ in range(400):
        x, y = ds.get_batch("train", 8, r)
        seen_last |= bool(((y[:, -1] == ds.train[-1]) & (x[:, 0] == last_start_first_id)).any())
    assert seen_last


def test_text_fingerprint_is_the_files_size_and_sha256(shakespeare_path):
    text = load_text(shakespeare_path)
    fp = data.text_fingerprint(text)
    raw = shakespeare_path.read_bytes()
    assert fp == {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    assert fp["sha256"] == data.SHAKESPEARE_SHA256
    # A byte-order mark is not part of the text, so not of its identity either.
    assert data.text_fingerprint("\u00e9t\u00e9") == {
        "bytes": 5, "sha256": hashlib.sha256("\u00e9t\u00e9".encode()).hexdigest()}


def test_verify_text_says_what_changed():
    text = "the text a run was trained on\n" * 3
    recorded = {**data.text_fingerprint(text), "path": "/data/a.txt"}
    data.verify_text(text, recorded, "/data/a.txt")  # the same text: nothing to say
    changed = text.replace("run", "RUN", 1)
    for now in (changed, text + "x"):
        with pytest.raises(DataError) as info:
            data.verify_text(now, recorded, "/data/a.txt")
        message = str(info.value)
        got = data.text_fingerprint(now)
        assert "\n" not in message
        assert (f"trained on /data/a.txt ({recorded['bytes']:,} bytes, sha256 "
                f"{recorded['sha256'][:8]}...)") in message
        assert f"now has {got['bytes']:,} bytes, sha256 {got['sha256'][:8]}..." in message
    for bad in (None, {}, {"bytes": "many", "sha256": "x"}, {"sha256": "x"}):
        with pytest.raises(DataError, match="malformed"):
            data.verify_text(text, bad, "a.txt")
