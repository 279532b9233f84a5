"""randygpt: train a small character-level GPT from scratch on the CPU.

Hot loops run in Cython kernels with OpenMP (``randygpt._kernels``); Python only
orchestrates. The thread count is decided in one place: :func:`set_num_threads`,
or the environment variable ``RANDYGPT_NUM_THREADS``.
"""
from ._kernels import effective_n_threads, get_num_threads, openmp_enabled, set_num_threads

__version__ = "0.1.0"

__all__ = ["set_num_threads", "get_num_threads", "effective_n_threads", "openmp_enabled",
           "Config", "GPT", "__version__"]


def __getattr__(name):
    # The model pulls in every kernel module; import it only when asked for.
    if name in ("Config", "GPT"):
        from . import config, model
        return {"Config": config.Config, "GPT": model.GPT}[name]
    raise AttributeError(f"module 'randygpt' has no attribute {name!r}")
