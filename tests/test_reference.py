"""Every kernel has a NumPy twin: each public <op>_forward / <op>_backward (and the other
compute entry points) of every kernel module has a same-named *_ref in reference.py."""
import importlib

import pytest

from randygpt._kernels import reference

FAMILIES = ["matmul", "attention", "norm", "activation", "xent", "embedding", "adamw"]
# Entry points that are not compute kernels (dispatch control, introspection, the integer
# keep-threshold that dropout derives from p, attention's scratch size).
NOT_KERNELS = {"available_isas", "get_isa", "set_isa", "dropout_threshold", "scratch_bytes",
               "available_bf16_isas", "get_bf16_isa", "set_bf16_isa", "bf16_native"}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_kernel_has_a_reference(family):
    mod = importlib.import_module(f"randygpt._kernels.{family}")
    kernels = [n for n in dir(mod)
               if not n.startswith("_") and callable(getattr(mod, n)) and n not in NOT_KERNELS
               and getattr(getattr(mod, n), "__module__", mod.__name__) in (mod.__name__, None)
               and not isinstance(getattr(mod, n), type)]
    assert kernels, f"{family} exposes no kernels"
    missing = [n for n in kernels if not hasattr(reference, n + "_ref")]
    assert not missing, f"{family}: no NumPy reference for {missing}"
