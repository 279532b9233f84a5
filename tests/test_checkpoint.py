"""Checkpoints: bit-exact round trip, exact resume, atomic writes, and one-line errors for every
kind of bad file."""
import json
import os
import zipfile

import numpy as np
import pytest

from randygpt import checkpoint, fileio
from randygpt.checkpoint import CheckpointError, load, load_model, save
from randygpt.config import Config
from randygpt.model import GPT
from randygpt.optim import AdamW
from randygpt.tokenizer import CharTokenizer

TEXT = "hello world, the quick brown fox.\n"


def tiny_config(**kw):
    tok = CharTokenizer.from_text(TEXT)
    base = dict(vocab_size=tok.vocab_size, n_embd=12, n_head=3, n_layer=2, block_size=8,
                batch_size=3, dropout=0.1)
    base.update(kw)
    return Config(**base)


def trained(config, steps=2, seed=0):
    """A model and optimizer after a few real steps, so the moments are non-zero."""
    model = GPT(config, seed=seed)
    opt = AdamW(model, config)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        x = rng.integers(0, config.vocab_size, (config.batch_size, config.block_size)).astype(np.int32)
        y = rng.integers(0, config.vocab_size, x.shape).astype(np.int32)
        model.forward(x, y, step=step)
        model.backward()
        opt.step(1e-2)
    return model, opt


def save_tiny(path, config=None, **kw):
    config = config or tiny_config()
    model, opt = trained(config)
    tok = CharTokenizer.from_text(TEXT)
    rng = np.random.default_rng(7)
    rng.random(3)
    args = dict(model=model, optimizer=opt, tokenizer=tok, step=2,
                rng_state=rng.bit_generator.state, extra={"data": "x.txt", "best_val": 1.5})
    args.update(kw)
    save(path, **args)
    return model, opt, tok, rng


def test_round_trip_is_bit_exact(tmp_path):
    path = tmp_path / "ckpt.npz"
    model, opt, tok, rng = save_tiny(path)
    ck = load(path)
    assert ck.config == model.config
    assert ck.tokenizer == tok
    assert ck.step == 2 and ck.adam_t == opt.t == 2
    assert ck.extra == {"data": "x.txt", "best_val": 1.5}
    for saved, live in ((ck.params, model.flat_params), (ck.adam_m, opt.m), (ck.adam_v, opt.v)):
        assert saved.dtype == np.float32
        assert np.array_equal(saved.view(np.uint32), live.view(np.uint32))
    # The restored generator continues the same stream (its 128-bit state survives JSON).
    restored = np.random.default_rng()
    restored.bit_generator.state = ck.rng_state
    assert np.array_equal(restored.random(5), rng.random(5))
    # Plain NumPy reads it without pickle: no code can run at load.
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {"header", "params", "adam_m", "adam_v"}
        assert json.loads(z["header"].tobytes())["format_version"] == checkpoint.FORMAT_VERSION


def test_resume_continues_the_same_loss_curve(tmp_path):
    config = tiny_config()
    rng = np.random.default_rng(3)
    batches = [(rng.integers(0, config.vocab_size, (3, 8)).astype(np.int32),
                rng.integers(0, config.vocab_size, (3, 8)).astype(np.int32)) for _ in range(4)]

    def run(model, opt, steps):
        losses = []
        for step in steps:
            x, y = batches[step]
            losses.append(model.forward(x, y, step=step))
            model.backward()
            opt.step(1e-2)
        return losses

    model = GPT(config, seed=1)
    opt = AdamW(model, config)
    straight = run(model, opt, range(4))

    model = GPT(config, seed=1)
    opt = AdamW(model, config)
    run(model, opt, range(2))
    save(tmp_path / "c.npz", model=model, optimizer=opt, tokenizer=CharTokenizer.from_text(TEXT),
         step=2, rng_state=None)
    model2, _, ck = load_model(tmp_path / "c.npz")
    opt2 = AdamW(model2, ck.config)
    opt2.load_state_dict(ck.optimizer_state())
    model2.train()
    resumed = run(model2, opt2, range(2, 4))
    assert resumed == straight[2:]  # bit-exact floats, not just close


def test_load_model_gives_eval_mode_and_same_logits(tmp_path):
    path = tmp_path / "ckpt.npz"
    model, *_ = save_tiny(path)
    model.eval()
    loaded, tok, ck = load_model(path)
    assert not loaded.training
    x = np.array([[2, 3, 4, 5]], dtype=np.int32)
    assert np.array_equal(loaded.forward(x), model.forward(x))


def test_save_without_optimizer(tmp_path):
    path = tmp_path / "w.npz"
    save_tiny(path, optimizer=None, rng_state=None, extra=None)
    ck = load(path)
    assert ck.adam_m is None and ck.adam_v is None and ck.optimizer_state() is None
    assert ck.rng_state is None and ck.extra == {}


def test_failed_write_leaves_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save_tiny(path)
    before = path.read_bytes()
    real_write = checkpoint._write_npz

    def savez_then_disk_full(f, arrays):
        real_write(f, arrays)  # half the story: bytes reached the temp file ...
        raise OSError(28, "No space left on device")  # ... then the disk filled up

    monkeypatch.setattr(checkpoint, "_write_npz", savez_then_disk_full)
    model, opt = trained(tiny_config(), seed=5)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        save(path, model=model, optimizer=opt, tokenizer=CharTokenizer.from_text(TEXT), step=9,
             rng_state=None)
    assert "\n" not in str(info.value)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]
    assert load(path).step == 2


def test_disk_full_halfway_through_the_bytes(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save_tiny(path)
    before = path.read_bytes()
    real_write = checkpoint._write_npz

    def half_then_enospc(f, arrays):
        import io
        buf = io.BytesIO()
        real_write(buf, arrays)
        f.write(buf.getvalue()[:len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_npz", half_then_enospc)
    with pytest.raises(CheckpointError, match="No space left"):
        save_tiny(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_failed_rename_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save_tiny(path)
    before = path.read_bytes()

    def no_replace(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fileio.os, "replace", no_replace)
    with pytest.raises(CheckpointError):
        save_tiny(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_saved_file_is_not_owner_only(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_tiny(path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_to_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        save_tiny(tmp_path / "nope" / "ckpt.npz")


def test_save_rejects_mismatched_tokenizer(tmp_path):
    model, opt = trained(tiny_config())
    with pytest.raises(ValueError, match="vocab_size"):
        save(tmp_path / "c.npz", model=model, optimizer=opt, tokenizer=CharTokenizer.from_text("ab"),
             step=0, rng_state=None)
    assert not any(tmp_path.iterdir())


# --- loading bad files: CheckpointError, one line, naming the file ---------------------------

def assert_one_line_error(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_missing_and_directory(tmp_path):
    assert_one_line_error(tmp_path / "absent.npz", "does not exist")
    assert_one_line_error(tmp_path, "is a directory")


def test_truncated(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_tiny(path)
    raw = path.read_bytes()
    for keep in (0, 10, len(raw) // 2, len(raw) - 5):
        path.write_bytes(raw[:keep])
        assert_one_line_error(path, "corrupt or truncated|not a valid checkpoint")


def test_flipped_byte_in_parameters_is_detected(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_tiny(path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("params.npy")
    # Past the member's local header and the .npy header: inside the float data.
    raw[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert_one_line_error(path, "corrupt")


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("just text\n")
    assert_one_line_error(text, "not a valid checkpoint")
    single = tmp_path / "array.npy"
    np.save(single, np.zeros(3))
    assert_one_line_error(single, "single array")
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))
    assert_one_line_error(other, "no 'header'")


def rewrite(path, header_change=None, arrays_change=None):
    """Rewrite a valid checkpoint with a modified header or arrays."""
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(arrays["header"].tobytes())
    if header_change:
        header_change(header)
    if arrays_change:
        arrays_change(arrays)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_read_header_reads_no_arrays(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save_tiny(path, extra={"run_id": "abc", "best_val": 1.5})
    real_read, read = checkpoint._read_array, []

    def recording_read(zf, info, name, *args):
        read.append(name)
        return real_read(zf, info, name, *args)

    monkeypatch.setattr(checkpoint, "_read_array", recording_read)
    header = checkpoint.read_header(path)
    assert header["extra"] == {"run_id": "abc", "best_val": 1.5} and header["step"] == 2
    assert read == ["header"]
    rewrite(path, lambda h: h.update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99"):
        checkpoint.read_header(path)


def test_other_format_version(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_tiny(path)
    rewrite(path, lambda h: h.update(format_version=99))
    assert_one_line_error(path, "format version 99; this randygpt reads version 1")


def test_vocabulary_mismatch(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_tiny(path)
    rewrite(path, lambda h: h["tokenizer"].update(chars="abc"))
    assert_one_line_error(path, "vocabulary has 5 ids but config.vocab_size is")


def test_shape_mismatches(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_tiny(path)
    good = path.read_bytes()
    # A header config that builds a different table than the one saved.
    rewrite(path, lambda h: h["config"].update(n_embd=24))
    assert_one_line_error(path, "parameter table does not match")
    path.write_bytes(good)
    rewrite(path, lambda h: h["table"]["names"].reverse())
    assert_one_line_error(path, "parameter table does not match")
    path.write_bytes(good)
    rewrite(path, arrays_change=lambda a: a.update(params=a["params"][:-1]))
    assert_one_line_error(path, "array 'params' has dtype float32 and shape")
    path.write_bytes(good)
    rewrite(path, arrays_change=lambda a: a.update(adam_v=a["adam_v"].astype(np.float64)))
    assert_one_line_error(path, "array 'adam_v' has dtype float64")
    path.write_bytes(good)
    rewrite(path, arrays_change=lambda a: a.pop("adam_m"))
    assert_one_line_error(path, "only one of the two AdamW moments")


def test_non_finite_values(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_tiny(path)
    good = path.read_bytes()
    for name, value in (("params", np.nan), ("adam_v", np.inf)):
        path.write_bytes(good)

        def poison(a, name=name, value=value):
            a[name] = a[name].copy()
            a[name][[3, 17]] = value
        rewrite(path, arrays_change=poison)
        assert_one_line_error(path, f"array '{name}' holds 2 non-finite values")


def test_bad_header_fields(tmp_path):
    path = tmp_path / "ckpt.npz"
    save_tiny(path)
    good = path.read_bytes()
    cases = [
        (lambda h: h["config"].update(n_head=5), "invalid config"),
        (lambda h: h["config"].update(colour="red"), "invalid config"),
        (lambda h: h.update(step=-1), "'step' must be a non-negative integer"),
        (lambda h: h.pop("table"), "header lacks"),
        (lambda h: h.update(extra=[1]), "'extra' is not an object"),
    ]
    for change, match in cases:
        path.write_bytes(good)
        rewrite(path, change)
        assert_one_line_error(path, match)
    path.write_bytes(good)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["header"] = np.frombuffer(b"{not json", dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    assert_one_line_error(path, "header is not valid JSON")


def test_layernorm_checkpoint_round_trip(tmp_path):
    path = tmp_path / "ln.npz"
    config = tiny_config(norm="layernorm")
    model, *_ = save_tiny(path, config=config)
    ck = load(path)
    assert ck.config.norm == "layernorm"
    assert np.array_equal(ck.params, model.flat_params)


@pytest.mark.slow
def test_default_size_round_trip(tmp_path):
    # The real model (4.77M parameters, 57 MB with both moments): about a second.
    config = Config()
    model = GPT(config)
    opt = AdamW(model, config)
    opt.m[:] = 0.5
    tok = CharTokenizer([chr(c) for c in range(32, 32 + config.vocab_size - 2)])
    save(tmp_path / "big.npz", model=model, optimizer=opt, tokenizer=tok, step=123, rng_state=None)
    loaded, _, ck = load_model(tmp_path / "big.npz")
    assert ck.step == 123 and loaded.num_params == 4_769_280
    assert np.array_equal(loaded.flat_params, model.flat_params)
    assert np.array_equal(ck.adam_m, opt.m)


def test_written_npz_is_what_numpy_reads(tmp_path):
    # The checkpoint writer streams arrays itself; np.load must see exactly the arrays given.
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal(1001).astype(np.float32),
              "b": np.arange(12, dtype=np.int64).reshape(3, 4),
              "c": np.frombuffer(b'{"x": 1}', dtype=np.uint8),
              "d": rng.standard_normal((5, 3)).astype(np.float32).T}  # not C-contiguous
    path = tmp_path / "x.npz"
    with open(path, "wb") as f:
        checkpoint._write_npz(f, arrays)
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(arrays)
        for name, arr in arrays.items():
            assert npz[name].dtype == arr.dtype and npz[name].shape == arr.shape
            np.testing.assert_array_equal(npz[name], arr)
