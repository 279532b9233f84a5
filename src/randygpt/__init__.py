"""randygpt: train a small character-level GPT from scratch on the CPU.

Hot loops run in Cython kernels with OpenMP (``randygpt._kernels``); Python only
orchestrates. The thread count is decided in one place: :func:`set_num_threads`,
or the environment variable ``RANDYGPT_NUM_THREADS``.

The public names below are imported on first use: ``import randygpt`` (and so the command
line's start) loads no kernel until one is needed, and a kernel that fails to load is then
reported by whoever asked for it.
"""
import importlib
import importlib.util

__version__ = "0.1.0"

# name -> module that defines it
_PUBLIC = {
    "set_num_threads": "._kernels", "get_num_threads": "._kernels",
    "effective_n_threads": "._kernels", "openmp_enabled": "._kernels",
    "usable_cpus": "._kernels", "physical_cores": "._kernels",
    "Config": ".config", "GPT": ".model", "Trainer": ".train", "RunOptions": ".train",
    "generate": ".sample", "load_model": ".checkpoint", "evaluate_checkpoint": ".evaluate",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name], __name__), name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # `randygpt.model` and the like after a bare `import randygpt`, as with eager imports.
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'randygpt' has no attribute {name!r}")


def __dir__():
    return __all__
