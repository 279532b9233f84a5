"""Checkpoints: one ``.npz`` file holding the flat parameter buffer, the AdamW moments and a JSON
header, written atomically and read back without pickle.

Layout of the file (a plain zip of ``.npy`` members, readable with ``np.load(allow_pickle=False)``):

  header  : (H,) uint8  UTF-8 JSON: format_version, config, tokenizer, step, adam_t, rng_state,
                        table (parameter names and shapes, in buffer order), extra
  params  : (P,) float32  the model's flat parameter buffer
  adam_m  : (P,) float32  AdamW first moment   (absent when saved without an optimizer)
  adam_v  : (P,) float32  AdamW second moment  (absent when saved without an optimizer)

Storing the header as bytes inside the zip keeps the checkpoint one file, and JSON (unlike a
pickled object) cannot run code when loaded. The zip format stores a CRC-32 for every member,
so a flipped byte or a truncated file is caught when the member is read.

Saving never leaves a broken file under the target name: the bytes go to a temporary file in
the same directory, which is flushed and fsync'ed, then renamed over the target with
``os.replace`` (atomic on POSIX and Windows), and the directory is fsync'ed so the rename
itself survives a power cut. If anything fails before the rename, the old checkpoint is
untouched and the temporary file is removed.
"""
import dataclasses
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["FORMAT_VERSION", "CheckpointError", "Checkpoint", "save", "load", "load_model",
           "atomic_write"]

# Bump when the layout above changes; load() refuses any other version instead of guessing.
FORMAT_VERSION = 1

_HEADER_KEYS = {"format_version", "config", "tokenizer", "step", "adam_t", "rng_state", "table",
                "extra"}


class CheckpointError(ValueError):
    """A checkpoint cannot be written, or is missing, corrupt, of another format version, or does
    not match its own config; the message is one line that names the file."""


@dataclasses.dataclass
class Checkpoint:
    """What load() returns. ``adam_m``/``adam_v`` are None when saved without an optimizer."""

    config: object          # randygpt.config.Config
    tokenizer: object       # randygpt.tokenizer.CharTokenizer
    params: np.ndarray      # (P,) float32
    adam_m: np.ndarray      # (P,) float32 or None
    adam_v: np.ndarray      # (P,) float32 or None
    step: int               # training iterations completed
    rng_state: dict         # np.random.Generator.bit_generator.state of the batch sampler, or None
    extra: dict             # free-form JSON data from the trainer (data source, best val loss ...)
    adam_t: int = 0         # AdamW steps taken (bias correction), 0 without an optimizer
    path: str = ""

    def optimizer_state(self):
        """The dict AdamW.load_state_dict expects, or None when no optimizer state was saved."""
        if self.adam_m is None:
            return None
        return {"m": self.adam_m, "v": self.adam_v, "t": self.adam_t}


def _table_of(config):
    """(names, shapes) of the parameter table the model builds for ``config``."""
    from .model import ParamTable
    table = ParamTable(config)
    return list(table.names), [tuple(int(d) for d in s) for s in table.shapes]


def _json_default(obj):
    # Generator states and trainer extras may hold NumPy scalars or arrays.
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _fsync_dir(directory):
    # Makes the rename durable; directories cannot be opened for fsync on Windows, where
    # os.replace is already durable enough for our purpose.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _new_file_mode():
    # mkstemp creates files readable by the owner only; give the result the mode a plain
    # open() would have. Reading the umask means setting it, so put it straight back.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, write):
    """Create or replace ``path`` so that it holds either its old content or the complete new
    content, never a mix, whatever fails midway (crash, full disk, exception in ``write``).

    ``write(f)`` writes the new content to a binary file object. The bytes go to a temporary
    file in the same directory (a rename is atomic only within one file system), which is
    flushed and fsync'ed, renamed over ``path`` with os.replace, and the directory is fsync'ed.
    On failure the temporary file is removed and the exception propagates.
    """
    path = Path(path)
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _fsync_dir(directory)


def _write_npz(f, arrays):
    """Write ``arrays`` ({name: array}) to the binary file ``f`` as an uncompressed .npz, the
    format np.load reads. Each array's bytes go straight from its own memory into the file:
    np.savez would copy them through 16 MiB buffers, which a training run would pay for in
    peak memory on every save."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            with zf.open(name + ".npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(
                    member, np.lib.format.header_data_from_array_1_0(arr))
                member.write(memoryview(arr.reshape(-1)).cast("B"))


def save(path, *, model, optimizer, tokenizer, step, rng_state, extra=None):
    """Write a checkpoint to ``path`` atomically (see the module docstring).

    model      : GPT (its flat_params, config and table are stored)
    optimizer  : AdamW or None (m, v and t are stored when given)
    tokenizer  : CharTokenizer whose vocab_size equals model.config.vocab_size
    step       : int >= 0, training iterations completed
    rng_state  : dict from np.random.Generator.bit_generator.state, or None
    extra      : JSON-serialisable dict, or None

    Raises CheckpointError if the directory does not exist or the write fails (disk full,
    permissions); the file previously at ``path``, if any, is then left as it was.
    """
    path = Path(path)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    if rng_state is not None and not isinstance(rng_state, dict):
        raise TypeError(f"rng_state must be a dict (bit_generator.state) or None, got {type(rng_state).__name__}")
    config = model.config
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{config.vocab_size}")
    params = model.flat_params
    arrays = {"params": params}
    adam_t = 0
    if optimizer is not None:
        state = optimizer.state_dict()
        for key in ("m", "v"):
            if state[key].shape != params.shape:
                raise ValueError(f"optimizer state {key!r} has shape {state[key].shape}, "
                                 f"parameters {params.shape}")
        arrays["adam_m"] = state["m"]
        arrays["adam_v"] = state["v"]
        adam_t = int(state["t"])
    header = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "tokenizer": tokenizer.to_dict(),
        "step": int(step),
        "adam_t": adam_t,
        "rng_state": rng_state,
        "table": {"names": list(model.table.names),
                  "shapes": [list(int(d) for d in s) for s in model.table.shapes]},
        "extra": extra if extra is not None else {},
    }
    try:
        blob = json.dumps(header, default=_json_default).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint header is not JSON-serialisable: {e}") from None
    arrays["header"] = np.frombuffer(blob, dtype=np.uint8)

    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise CheckpointError(f"cannot save checkpoint {str(path)!r}: directory {str(directory)!r} "
                              "does not exist")
    if path.is_dir():
        raise CheckpointError(f"cannot save checkpoint {str(path)!r}: it is a directory")
    try:
        atomic_write(path, lambda f: _write_npz(f, arrays))
    except OSError as e:
        raise CheckpointError(f"cannot save checkpoint {str(path)!r}: {e.strerror or e}") from None


def _fail(path, why):
    raise CheckpointError(f"checkpoint {str(path)!r}: {why}")


def _read_member(npz, name, path):
    try:
        return npz[name]
    except KeyError:
        _fail(path, f"has no {name!r} array (not a randygpt checkpoint?)")
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        # BadZipFile covers CRC mismatches: the bytes on disk are not the bytes saved.
        _fail(path, f"array {name!r} is corrupt or truncated ({e})")


def _check_array(arr, name, n, path):
    if arr.dtype != np.float32 or arr.shape != (n,):
        _fail(path, f"array {name!r} has dtype {arr.dtype} and shape {arr.shape}, expected "
                    f"float32 ({n},) for this config")
    # NaN or inf can only come from a run that diverged: neither sampling nor resuming from
    # it can give anything meaningful, so say so here rather than produce garbage later.
    if not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        _fail(path, f"array {name!r} holds {bad:,} non-finite values (NaN or inf): the run that "
                    "saved it had diverged")


def load(path):
    """Read and validate a checkpoint. Returns a Checkpoint.

    Raises CheckpointError (one line naming the file) when it is missing, not a zip/npz, corrupt
    or truncated, of another format version, or inconsistent: a config that does not validate,
    a vocabulary whose size differs from config.vocab_size, a parameter table (names, shapes)
    that differs from the one this version of randygpt builds for that config, or arrays of the
    wrong size or dtype, or holding NaN or inf.
    """
    from .config import Config
    from .tokenizer import CharTokenizer

    path = Path(path)
    if not path.exists():
        _fail(path, "does not exist")
    if path.is_dir():
        _fail(path, "is a directory, not a checkpoint file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        _fail(path, f"cannot be read ({e.strerror or e})")
    try:
        npz = np.load(io.BytesIO(raw), allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        _fail(path, f"is not a valid checkpoint file, corrupt or truncated ({e})")
    if not isinstance(npz, np.lib.npyio.NpzFile):
        _fail(path, "holds a single array, not a randygpt checkpoint")
    with npz:
        header_bytes = _read_member(npz, "header", path)
        if header_bytes.dtype != np.uint8 or header_bytes.ndim != 1:
            _fail(path, "header is not a byte array")
        try:
            header = json.loads(header_bytes.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            _fail(path, f"header is not valid JSON ({e})")
        if not isinstance(header, dict):
            _fail(path, "header is not a JSON object")
        version = header.get("format_version")
        if version != FORMAT_VERSION:
            _fail(path, f"has format version {version!r}; this randygpt reads version {FORMAT_VERSION}")
        missing = _HEADER_KEYS - header.keys()
        if missing:
            _fail(path, f"header lacks {sorted(missing)}")
        try:
            config = Config.from_dict(header["config"])
        except (TypeError, ValueError) as e:
            _fail(path, f"has an invalid config: {e}")
        try:
            tokenizer = CharTokenizer.from_dict(header["tokenizer"])
        except (TypeError, ValueError) as e:
            _fail(path, f"has an invalid vocabulary: {e}")
        if tokenizer.vocab_size != config.vocab_size:
            _fail(path, f"vocabulary has {tokenizer.vocab_size} ids but config.vocab_size is "
                        f"{config.vocab_size}")
        step, adam_t = header["step"], header["adam_t"]
        for key, value in (("step", step), ("adam_t", adam_t)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(path, f"header {key!r} must be a non-negative integer, got {value!r}")
        rng_state, extra = header["rng_state"], header["extra"]
        if rng_state is not None and not isinstance(rng_state, dict):
            _fail(path, "header 'rng_state' is not an object")
        if not isinstance(extra, dict):
            _fail(path, "header 'extra' is not an object")

        names, shapes = _table_of(config)
        table = header["table"]
        try:
            saved_names = list(table["names"])
            saved_shapes = [tuple(int(d) for d in s) for s in table["shapes"]]
        except (TypeError, KeyError, ValueError):
            _fail(path, "header 'table' is malformed")
        if saved_names != names or saved_shapes != shapes:
            diff = next((f"{a} {tuple(sa)} vs {b} {tuple(sb)}"
                         for a, sa, b, sb in zip(saved_names, saved_shapes, names, shapes)
                         if a != b or tuple(sa) != tuple(sb)),
                        f"{len(saved_names)} tensors vs {len(names)}")
            _fail(path, f"parameter table does not match the model this config builds "
                        f"(saved vs expected: {diff})")
        total = int(sum(int(np.prod(s)) for s in shapes))

        params = _read_member(npz, "params", path)
        _check_array(params, "params", total, path)
        has_m, has_v = "adam_m" in npz.files, "adam_v" in npz.files
        if has_m != has_v:
            _fail(path, "holds only one of the two AdamW moments")
        adam_m = adam_v = None
        if has_m:
            adam_m = _read_member(npz, "adam_m", path)
            adam_v = _read_member(npz, "adam_v", path)
            _check_array(adam_m, "adam_m", total, path)
            _check_array(adam_v, "adam_v", total, path)
    return Checkpoint(config=config, tokenizer=tokenizer, params=params, adam_m=adam_m,
                      adam_v=adam_v, step=step, rng_state=rng_state, extra=extra, adam_t=adam_t,
                      path=str(path))


def load_model(path, n_threads=None):
    """Load a checkpoint into a fresh GPT in eval mode. Returns (model, tokenizer, checkpoint)."""
    from .model import GPT

    ckpt = load(path)
    model = GPT(ckpt.config, n_threads=n_threads)
    model.load_flat_params(ckpt.params)
    model.eval()
    return model, ckpt.tokenizer, ckpt
