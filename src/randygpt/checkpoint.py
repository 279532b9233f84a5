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

Reading trusts nothing in the file: a path that is not a regular file is refused before it is
opened, the archive may hold only the four uncompressed members above, and each member's .npy
header (dtype, shape) is checked against the config before any memory is allocated for its
data, so no file can make the reader allocate more than the file's own size.
"""
import dataclasses
import json
import math
import zipfile
from pathlib import Path

import numpy as np

from .fileio import atomic_write, open_failure, open_regular

__all__ = ["FORMAT_VERSION", "MAX_HEADER_BYTES", "CheckpointError", "Checkpoint", "save", "load",
           "load_model", "read_header"]

# Bump when the layout above changes; load() refuses any other version instead of guessing.
FORMAT_VERSION = 1

_HEADER_KEYS = {"format_version", "config", "tokenizer", "step", "adam_t", "rng_state", "table",
                "extra"}
_MEMBERS = ("header", "params", "adam_m", "adam_v")
# A header is a few kilobytes (config, vocabulary, RNG state, parameter names, the trainer's
# extras); the bound keeps a hostile file from making the reader allocate gigabytes for it.
MAX_HEADER_BYTES = 16 * 1024 * 1024
# Members are read into their arrays in pieces of this size, never as one bytes copy.
_READ_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint cannot be written, or is missing, corrupt, of another format version, or does
    not match its own config; the message is one line that names the file."""


@dataclasses.dataclass
class Checkpoint:
    """What load() returns. ``adam_m``/``adam_v`` are None when saved without an optimizer."""

    config: object          # randygpt.config.Config
    tokenizer: object       # randygpt.tokenizer.CharTokenizer or BPETokenizer
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
    tokenizer  : CharTokenizer or BPETokenizer whose vocab_size equals model.config.vocab_size
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


def _open_file(path):
    """(binary file, size): the checkpoint opened for reading, refused before it is opened
    when it is not a regular file (a device behind a symbolic link would read without end)."""
    try:
        return open_regular(path)
    except (OSError, ValueError) as e:
        _fail(path, open_failure(e, "a checkpoint file"))


def _open_zip(f, path):
    if f.read(6) == b"\x93NUMPY":
        _fail(path, "holds a single array, not a randygpt checkpoint")
    try:
        f.seek(0)
        return zipfile.ZipFile(f)
    except Exception as e:  # any failure of the zip parser on these bytes: see _read_array
        # Said in our words: NumPy's own error for a file that is no archive suggests
        # allow_pickle=True, which would let such a file run code.
        _fail(path, f"is not a valid checkpoint file: not a zip archive of .npy arrays, or "
                    f"corrupt or truncated ({e})")


def _members(zf, path, file_size):
    """{array name: ZipInfo}, once the archive's directory has passed every check that needs
    no member read: no name twice, the header present, nothing but our own .npy members, each
    stored uncompressed and lying inside the file. A compressed member could expand a small
    file into gigabytes; a stored one can make the reader allocate no more than the file's
    own size."""
    infos = {}
    for info in zf.infolist():
        if info.filename in infos:
            _fail(path, f"holds the member {info.filename!r} twice")
        infos[info.filename] = info
    if "header.npy" not in infos:
        _fail(path, "has no 'header' array (not a randygpt checkpoint?)")
    arrays = {}
    for filename, info in infos.items():
        name = filename[:-4]
        if not filename.endswith(".npy") or name not in _MEMBERS:
            _fail(path, f"holds an unexpected member {filename!r} (not a randygpt checkpoint?)")
        if info.flag_bits & 0x1:
            _fail(path, f"member {filename!r} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            _fail(path, f"member {filename!r} is compressed; randygpt reads only the "
                        "uncompressed members it writes")
        if info.file_size != info.compress_size or info.header_offset + info.compress_size > file_size:
            _fail(path, f"member {filename!r} ({info.file_size:,} bytes at offset "
                        f"{info.header_offset:,}) reaches past the end of the {file_size:,}-byte "
                        "file (corrupt or truncated)")
        arrays[name] = info
    return arrays


def _read_npy_header(fp, name, path):
    """(shape, dtype) from the .npy header at the start of member ``fp``."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        _fail(path, f"array {name!r} has .npy format version {version}, which randygpt does not read")
    return shape, dtype


def _read_array(zf, info, name, path, check):
    """The array in member ``info``. Its .npy header is read first and ``check(shape, dtype)``
    (None, or what is wrong) runs before any memory is allocated for the data, which is then
    read into the array piece by piece: no second copy of it, and a CRC check at its end."""
    try:
        with zf.open(info) as fp:
            shape, dtype = _read_npy_header(fp, name, path)
            complaint = check(shape, dtype)
            if complaint:
                _fail(path, complaint)
            nbytes = math.prod(shape) * dtype.itemsize
            if fp.tell() + nbytes != info.file_size:
                _fail(path, f"array {name!r} has {info.file_size - fp.tell():,} bytes of data "
                            f"but its header describes {nbytes:,} (corrupt?)")
            out = np.empty(shape, dtype=dtype)
            buf = memoryview(out.reshape(-1)).cast("B")
            pos = 0
            while pos < nbytes:
                chunk = fp.read(min(_READ_CHUNK, nbytes - pos))
                if not chunk:
                    _fail(path, f"array {name!r} is truncated")
                buf[pos:pos + len(chunk)] = chunk
                pos += len(chunk)
            fp.read(1)  # reaching the member's end is what checks its CRC
    except CheckpointError:
        raise
    except Exception as e:
        # zipfile and NumPy's header parser (a tokenizer and ast.literal_eval) fail on damaged
        # bytes with many exception types (BadZipFile for CRC mismatches, ValueError, EOFError,
        # NotImplementedError, tokenize.TokenError, SyntaxError ...); all mean the same here.
        _fail(path, f"array {name!r} is corrupt or truncated ({e})")
    return out


def _check_header_array(shape, dtype):
    if dtype != np.uint8 or len(shape) != 1:
        return "header is not a byte array"
    if shape[0] > MAX_HEADER_BYTES:
        return (f"header claims {shape[0]:,} bytes; a checkpoint header is at most "
                f"{MAX_HEADER_BYTES:,}")
    return None


def _read_header(zf, arrays, path):
    """The header as a dict, its format version checked."""
    raw = _read_array(zf, arrays["header"], "header", path, _check_header_array)
    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:
        # ValueError covers bad UTF-8, bad JSON and integers too long to convert;
        # RecursionError, arrays nested thousands deep.
        _fail(path, f"header is not valid JSON ({e})")
    if not isinstance(header, dict):
        _fail(path, "header is not a JSON object")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        _fail(path, f"has format version {version!r}; this randygpt reads version {FORMAT_VERSION}")
    return header


def read_header(path):
    """The header of the checkpoint at ``path`` as a dict (format_version, config, tokenizer,
    step, adam_t, rng_state, table, extra), without reading its arrays or validating its
    fields: cheap, for a caller that needs only, say, ``extra``. Raises CheckpointError like
    load() for a file that is not a readable checkpoint."""
    f, size = _open_file(path)
    with f, _open_zip(f, path) as zf:
        return _read_header(zf, _members(zf, path, size), path)


def _header_fields(header, path):
    """(config, tokenizer, step, adam_t, rng_state, extra) from a header, each validated."""
    from .config import Config
    from .tokenizer import tokenizer_from_dict

    missing = _HEADER_KEYS - header.keys()
    if missing:
        _fail(path, f"header lacks {sorted(missing)}")
    try:
        config = Config.from_dict(header["config"])
    except (TypeError, ValueError) as e:
        _fail(path, f"has an invalid config: {e}")
    try:
        tokenizer = tokenizer_from_dict(header["tokenizer"])
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
    return config, tokenizer, step, adam_t, rng_state, extra


def _parameter_count(config, header, params_info, path):
    """The parameter count of the model ``config`` builds, once the saved table matches it."""
    # Every layer holds parameters, and the stored params member is no larger than the file:
    # a config claiming more layers than that is refused before its table is built, which
    # would take time and memory in proportion to n_layer.
    if config.n_layer > params_info.file_size // 4:
        _fail(path, f"config has n_layer={config.n_layer:,}, more layers than the file has "
                    "parameters")
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
    # Python integers: a hostile config's dimensions cannot overflow the sum.
    return sum(math.prod(s) for s in shapes)


def _read_vector(zf, arrays, name, n, path):
    """Member ``name`` as a (n,) float32 array, its shape checked from its header before any
    allocation, its values checked finite."""
    def check(shape, dtype):
        if dtype != np.float32 or tuple(shape) != (n,):
            return (f"array {name!r} has dtype {dtype} and shape {tuple(shape)}, expected "
                    f"float32 ({n},) for this config")
        return None
    arr = _read_array(zf, arrays[name], name, path, check)
    # NaN or inf can only come from a run that diverged: neither sampling nor resuming from
    # it can give anything meaningful, so say so here rather than produce garbage later.
    if not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        _fail(path, f"array {name!r} holds {bad:,} non-finite values (NaN or inf): the run that "
                    "saved it had diverged")
    return arr


def load(path):
    """Read and validate a checkpoint. Returns a Checkpoint.

    Raises CheckpointError (one line naming the file) when it is missing, not a regular file
    (checked before it is opened), not a zip/npz, corrupt or truncated, of another format
    version, or inconsistent: members other than the four arrays (or one twice, or
    compressed), a header over MAX_HEADER_BYTES, a config that does not validate, a vocabulary
    whose size differs from config.vocab_size, a parameter table (names, shapes) that differs
    from the one this version of randygpt builds for that config, or arrays of the wrong size
    or dtype (refused from their .npy headers, before any allocation), or holding NaN or inf.
    """
    from .interop import is_weights_path  # lazy, as the model: it loads the kernels

    path = Path(path)
    if is_weights_path(path):
        _fail(path, "holds weights only (a .safetensors export: no optimizer or batch-sampler "
                    "state); resuming training needs a full checkpoint (.npz)")
    f, size = _open_file(path)
    with f, _open_zip(f, path) as zf:
        arrays = _members(zf, path, size)
        header = _read_header(zf, arrays, path)
        config, tokenizer, step, adam_t, rng_state, extra = _header_fields(header, path)
        if "params" not in arrays:
            _fail(path, "has no 'params' array (not a randygpt checkpoint?)")
        total = _parameter_count(config, header, arrays["params"], path)
        params = _read_vector(zf, arrays, "params", total, path)
        if ("adam_m" in arrays) != ("adam_v" in arrays):
            _fail(path, "holds only one of the two AdamW moments")
        adam_m = adam_v = None
        if "adam_m" in arrays:
            adam_m = _read_vector(zf, arrays, "adam_m", total, path)
            adam_v = _read_vector(zf, arrays, "adam_v", total, path)
    return Checkpoint(config=config, tokenizer=tokenizer, params=params, adam_m=adam_m,
                      adam_v=adam_v, step=step, rng_state=rng_state, extra=extra, adam_t=adam_t,
                      path=str(path))


def load_model(path, n_threads=None, precision=None):
    """Load a checkpoint, or a .safetensors weights file (randygpt.interop; the Checkpoint then
    has no optimizer or sampler state), into a fresh GPT in eval mode, computing in
    ``precision`` (None: the one it was trained in; the weights are fp32 either way). Returns
    (model, tokenizer, checkpoint); checkpoint.config is the file's."""
    from .interop import is_weights_path, load_weights
    from .model import GPT

    if is_weights_path(path):
        w = load_weights(path)
        ckpt = Checkpoint(config=w.config, tokenizer=w.tokenizer, params=w.params, adam_m=None,
                          adam_v=None, step=w.step, rng_state=None, extra=w.extra, path=w.path)
    else:
        ckpt = load(path)
    config = ckpt.config if precision is None else ckpt.config.replace(precision=precision)
    model = GPT(config, n_threads=n_threads)
    model.load_flat_params(ckpt.params)
    model.eval()
    return model, ckpt.tokenizer, ckpt
