"""A trained model outside randygpt: its weights as a ``.safetensors`` file, and that file loaded
back into randygpt or into the PyTorch twin of the model (``randygpt.torch_ref``).

The file holds one float32 tensor per parameter, under randygpt's names and shapes (``wte``
(V, C), ``wpe`` (block_size, C), ``h.{i}.wq`` ... ``h.{i}.fc2`` in PyTorch's (out_features,
in_features) layout, the LayerNorm gains and biases ``h.{i}.ln{1,2}.{weight,bias}`` when
present, ``lm_head`` (V, C)), and string metadata:

  format          "randygpt-weights"
  format_version  "1"
  config          the Config as JSON (model and recipe)
  tokenizer       the vocabulary as JSON ({"type": "char", "chars": ...})
  step            the training iterations behind the weights
  extra           the checkpoint's free-form JSON (data source, best loss ...), for ``eval``

Weights only: no optimizer state, no batch-sampler state, so a run cannot resume from it.

Reading trusts nothing in the file: it must be a regular file in the safetensors format (the
library checks the header and that every tensor lies inside the file), with all six metadata
entries, a config that validates, a vocabulary whose size matches the embedding's rows, and
exactly the tensors (names, shapes, float32, finite values) that config's model has.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np

from .config import Config
from .fileio import atomic_write, open_failure, open_regular
from .model import ParamTable
from .tokenizer import CharTokenizer, tokenizer_from_dict
from .torch_ref import build_torch_gpt, load_params

__all__ = ["FORMAT", "FORMAT_VERSION", "SUFFIX", "WeightsFileError", "Weights", "is_weights_path",
           "save_weights", "load_weights", "load_torch"]

FORMAT = "randygpt-weights"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
_METADATA_KEYS = ("format", "format_version", "config", "tokenizer", "step", "extra")
_INSTALL_HINT = "pip install 'randygpt[export]'"


class WeightsFileError(ValueError):
    """A weights file cannot be written, or is missing, not safetensors, or does not describe a
    randygpt model; the message is one line that names the file."""


@dataclasses.dataclass
class Weights:
    """What load_weights returns."""

    config: Config
    tokenizer: CharTokenizer
    params: np.ndarray      # (P,) float32, the flat buffer in ParamTable order
    step: int
    extra: dict
    path: str = ""

    def named(self):
        """{name: view of params with the parameter's shape}."""
        return ParamTable(self.config).views(self.params)


def is_weights_path(path):
    """True when ``path`` names a weights file by its suffix (``.safetensors``)."""
    return Path(path).suffix.lower() == SUFFIX


def _safetensors():
    # Imported when a file is read or written: safetensors is an optional extra ([export]),
    # and randygpt's training and sampling from .npz checkpoints never need it.
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise WeightsFileError(f".safetensors files need the safetensors package: "
                               f"{_INSTALL_HINT}") from None
    return safetensors


def save_weights(path, model, tokenizer, step=0, extra=None):
    """Write ``model``'s parameters with its config and ``tokenizer`` to ``path`` (see the module
    docstring), atomically: a failure leaves any file already at ``path`` as it was.

    model     : GPT
    tokenizer : the CharTokenizer it was trained with (vocab_size = model.config.vocab_size)
    step      : int >= 0, the training iterations behind the weights
    extra     : JSON-serialisable dict or None (a checkpoint's extra)
    Raises WeightsFileError when the file cannot be written, ValueError/TypeError for bad
    arguments.
    """
    st = _safetensors()
    path = Path(path)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "config": json.dumps(model.config.to_dict()),
                "tokenizer": json.dumps(tokenizer.to_dict()),
                "step": str(int(step)), "extra": json.dumps(extra or {}, default=str)}
    # The views share the flat buffer; safetensors copies each into its output bytes.
    tensors = {name: np.ascontiguousarray(view, dtype=np.float32)
               for name, view in model.params.items()}
    blob = st.numpy.save(tensors, metadata=metadata)
    try:
        atomic_write(path, lambda f: f.write(blob))
    except OSError as e:
        raise WeightsFileError(f"cannot write {str(path)!r}: {e.strerror or e}") from None


def _fail(path, why):
    raise WeightsFileError(f"weights file {str(path)!r}: {why}")


def _check_regular(path):
    """Refuse a missing path or one that is not a regular file before the library maps it."""
    try:
        f, _ = open_regular(path)
    except (OSError, ValueError) as e:
        _fail(path, open_failure(e, "a weights file"))
    f.close()


def _json_field(meta, key, path):
    try:
        return json.loads(meta[key])
    except (ValueError, RecursionError) as e:
        _fail(path, f"metadata {key!r} is not valid JSON ({e})")


def _metadata(meta, path):
    """(config, tokenizer, step, extra) from the file's metadata, each validated."""
    if meta is None:
        _fail(path, "has no metadata: not a randygpt export (write one with `randygpt export`)")
    missing = [k for k in _METADATA_KEYS if k not in meta]
    if missing:
        _fail(path, f"metadata lacks {missing} (not a randygpt export?)")
    if meta["format"] != FORMAT:
        _fail(path, f"metadata format is {meta['format']!r}, expected {FORMAT!r}")
    if meta["format_version"] != str(FORMAT_VERSION):
        _fail(path, f"has format version {meta['format_version']!r}; this randygpt reads "
                    f"version {FORMAT_VERSION}")
    try:
        config = Config.from_dict(_json_field(meta, "config", path))
    except (TypeError, ValueError) as e:
        _fail(path, f"has an invalid config: {e}")
    try:
        tokenizer = tokenizer_from_dict(_json_field(meta, "tokenizer", path))
    except (TypeError, ValueError) as e:
        _fail(path, f"has an invalid vocabulary: {e}")
    step = meta["step"]
    if not (step.isascii() and step.isdigit()):
        _fail(path, f"metadata 'step' must be a non-negative integer, got {step!r}")
    extra = _json_field(meta, "extra", path)
    if not isinstance(extra, dict):
        _fail(path, "metadata 'extra' is not a JSON object")
    return config, tokenizer, int(step), extra


def _check_tensors(handle, config, tokenizer, path):
    """The model's ParamTable, once the file's tensor names and shapes match it."""
    keys = list(handle.keys())
    # Every layer holds tensors: a config claiming more layers than the file has tensors is
    # refused before its table is built (which costs time in proportion to n_layer).
    if config.n_layer > len(keys):
        _fail(path, f"config has n_layer={config.n_layer:,} but the file holds only "
                    f"{len(keys)} tensors")
    shapes = {k: tuple(int(d) for d in handle.get_slice(k).get_shape()) for k in keys}
    if "wte" in shapes and shapes["wte"] and shapes["wte"][0] != tokenizer.vocab_size:
        _fail(path, f"the vocabulary has {tokenizer.vocab_size} ids but the embedding 'wte' has "
                    f"{shapes['wte'][0]} rows")
    if tokenizer.vocab_size != config.vocab_size:
        _fail(path, f"the vocabulary has {tokenizer.vocab_size} ids but config.vocab_size is "
                    f"{config.vocab_size}")
    table = ParamTable(config)
    missing = [n for n in table.names if n not in shapes]
    unexpected = sorted(set(shapes) - set(table.names))
    if missing or unexpected:
        _fail(path, f"tensors do not match the model its config builds (missing {missing[:5]}"
                    f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                    f"{' ...' if len(unexpected) > 5 else ''})")
    for name, shape in zip(table.names, table.shapes):
        if shapes[name] != tuple(shape):
            _fail(path, f"tensor {name!r} has shape {shapes[name]}, expected {tuple(shape)} "
                        "for its config")
    return table


def _read_params(handle, table, path):
    """The flat (P,) float32 buffer, filled tensor by tensor in table order."""
    params = np.empty(table.total, dtype=np.float32)
    for name, o, n in zip(table.names, table.offsets, table.sizes):
        arr = handle.get_tensor(name)
        if arr.dtype != np.float32:
            _fail(path, f"tensor {name!r} is {arr.dtype}, expected float32")
        if not np.isfinite(arr).all():
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            _fail(path, f"tensor {name!r} holds {bad:,} non-finite values (NaN or inf)")
        params[o:o + n] = arr.reshape(-1)
    return params


def load_weights(path):
    """Read and validate a weights file (see the module docstring). Returns Weights.

    Raises WeightsFileError (one line naming the file) when it is missing or not a regular file,
    not in the safetensors format (or corrupt or truncated), lacks randygpt's metadata, holds
    an invalid config or vocabulary, a vocabulary whose size differs from the embedding's rows,
    tensors other than those the config's model has, or tensors of the wrong shape or dtype or
    with NaN or inf.
    """
    st = _safetensors()
    path = Path(path)
    _check_regular(path)
    try:
        with st.safe_open(str(path), framework="numpy") as handle:
            config, tokenizer, step, extra = _metadata(handle.metadata(), path)
            table = _check_tensors(handle, config, tokenizer, path)
            params = _read_params(handle, table, path)
    except WeightsFileError:
        raise
    except (st.SafetensorError, OSError, ValueError, TypeError) as e:
        _fail(path, f"is not a valid safetensors file, or is corrupt or truncated "
                    f"({' '.join(str(e).split())})")
    return Weights(config=config, tokenizer=tokenizer, params=params, step=step, extra=extra,
                   path=str(path))


def load_torch(path, dtype=None):
    """The weights file at ``path`` in the PyTorch twin of the model (``torch_ref``), in eval
    mode. Returns (module, tokenizer, config); ``module(idx)`` gives logits (B, T, V)."""
    weights = load_weights(path)
    module = build_torch_gpt(weights.config, dtype=dtype)
    load_params(module, weights.named())
    module.eval()
    return module, weights.tokenizer, weights.config
