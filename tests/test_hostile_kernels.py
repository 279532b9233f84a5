"""Hostile input for every public kernel: wrong dtypes, shapes and layouts, read-only, mapped
and aliased outputs, bad and huge thread counts, empty, large and huge shapes, odd scalars.
Each call must end in TypeError, ValueError or MemoryError (or, where the input is legal,
succeed): never a crash, an abort or a hang.

The kernels are found from the ``__all__`` of every compiled module in randygpt._kernels, so
a new kernel is covered as soon as it has a recipe in RECIPES, and test_every_kernel_has_a_recipe
fails until it does (test_garbage_arguments covers it meanwhile). A recipe makes one valid call
at tiny shapes from named dimensions and names the arrays the call writes; every hostile
variant is derived from it (see CASES). To cover a new kernel, add its recipe; to cover a new
kind of hostile input, add a case maker to CASES.

Every call runs in one worker process (started per test module, restarted after a crash), so a
segfault or abort fails the test that caused it instead of ending pytest; a case that does not
answer within CASE_TIMEOUT_S fails as a hang. test_failed_allocation_is_one_memory_error runs
the kernels that allocate scratch in a process whose address space is capped, so that the
allocation itself fails.
"""
import importlib
import inspect
import json
import os
import pkgutil
import select
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest

import randygpt._kernels as kernels_pkg
from randygpt._kernels._checks import MAX_TEAM, MAX_THREADS

CASE_TIMEOUT_S = 120
# Entry points of the kernel modules that are not kernels: they get only the garbage test.
NOT_KERNELS = {"available_isas", "get_isa", "set_isa", "dropout_key", "dropout_threshold",
               "scratch_bytes", "available_bf16_isas", "get_bf16_isa", "set_bf16_isa",
               "bf16_native"}
TINY = 2    # every dimension's default is at least this: a strided view is then non-contiguous
LARGE = 100_000    # one dimension this long (real memory, a few MB): T^2 scratch and the like
HUGE = 2 ** 40     # one dimension this long while the others are 0 (zero-size arrays)
# The outcomes that are not a crash.
CLEAN = frozenset({"ok", "TypeError", "ValueError", "MemoryError"})
TYPE_ERROR, VALUE_ERROR, OK = frozenset({"TypeError"}), frozenset({"ValueError"}), frozenset({"ok"})


# --- recipes: one valid call per kernel -------------------------------------------------------

class Maker:
    """Arrays for recipes: random where they have elements, free where they have none."""

    def __init__(self, rng):
        self.rng = rng

    def f32(self, *shape):
        if 0 in shape:
            return np.empty(shape, np.float32)
        return self.rng.standard_normal(shape).astype(np.float32)

    def pos32(self, *shape):
        return np.abs(self.f32(*shape)) + np.float32(0.5)

    def i32(self, *shape, hi):
        """int32 indices in [0, hi)."""
        if 0 in shape:
            return np.empty(shape, np.int32)
        return self.rng.integers(0, max(1, min(hi, 2 ** 31 - 1)), shape, dtype=np.int32)


@dataclass
class Recipe:
    dims: dict                      # dimension name -> its tiny value
    make: Callable                  # (dims namespace, Maker) -> {parameter: value}, n_threads included
    outputs: tuple                  # parameters the kernel writes or accumulates into
    free_shape: tuple = ()          # arrays whose number of axes is the caller's choice
    indices: dict = field(default_factory=dict)  # int32 index array -> the dimension bounding it


def _linear(d):
    return dict(N=3, IC=5, OC=4) if d is None else d


_DROP = dict(p=0.25, seed=7, step=3, layer=1, site=2, n_threads=1, offset=5)

RECIPES = {
    # matmul
    "matmul_forward": Recipe(_linear(None), lambda d, m: dict(
        out=m.f32(d.N, d.OC), x=m.f32(d.N, d.IC), w=m.f32(d.OC, d.IC), n_threads=1,
        accumulate=True), ("out",)),
    "matmul_backward": Recipe(_linear(None), lambda d, m: dict(
        dx=m.f32(d.N, d.IC), dw=m.f32(d.OC, d.IC), dout=m.f32(d.N, d.OC), x=m.f32(d.N, d.IC),
        w=m.f32(d.OC, d.IC), n_threads=1), ("dx", "dw")),
    "gemm": Recipe(dict(M=3, K=5, N=4), lambda d, m: dict(
        c=m.f32(d.M, d.N), a=m.f32(d.K, d.M), b=m.f32(d.K, d.N), trans_a=True, trans_b=False,
        accumulate=False, n_threads=1), ("c",)),
    "matmul_sqrelu_forward": Recipe(_linear(None), lambda d, m: dict(
        out=m.f32(d.N, d.OC), pre=m.f32(d.N, d.OC), x=m.f32(d.N, d.IC), w=m.f32(d.OC, d.IC),
        n_threads=1), ("out", "pre")),
    "matmul_sqrelu_backward": Recipe(_linear(None), lambda d, m: dict(
        dpre=m.f32(d.N, d.IC), dw=m.f32(d.OC, d.IC), dout=m.f32(d.N, d.OC),
        pre=m.f32(d.N, d.IC), w=m.f32(d.OC, d.IC), n_threads=1), ("dpre", "dw")),
    # attention: C = NH * HS
    "attention_forward": Recipe(dict(B=2, T=3, NH=2, HS=2), lambda d, m: dict(
        out=m.f32(d.B, d.T, d.NH * d.HS), att=m.f32(d.B, d.NH, d.T, d.T),
        qkv=m.f32(d.B, d.T, 3 * d.NH * d.HS), n_head=d.NH, n_threads=1), ("out", "att")),
    "attention_forward[att=None]": Recipe(dict(B=2, T=3, NH=2, HS=2), lambda d, m: dict(
        out=m.f32(d.B, d.T, d.NH * d.HS), att=None, qkv=m.f32(d.B, d.T, 3 * d.NH * d.HS),
        n_head=d.NH, n_threads=1), ("out",)),
    "attention_backward": Recipe(dict(B=2, T=3, NH=2, HS=2), lambda d, m: dict(
        dqkv=m.f32(d.B, d.T, 3 * d.NH * d.HS), dout=m.f32(d.B, d.T, d.NH * d.HS),
        qkv=m.f32(d.B, d.T, 3 * d.NH * d.HS), att=np.abs(m.f32(d.B, d.NH, d.T, d.T)),
        n_head=d.NH, n_threads=1, accumulate=True), ("dqkv",)),
    "attention_backward[recompute]": Recipe(dict(B=2, T=3, NH=2, HS=2), lambda d, m: dict(
        dqkv=m.f32(d.B, d.T, 3 * d.NH * d.HS), dout=m.f32(d.B, d.T, d.NH * d.HS),
        qkv=m.f32(d.B, d.T, 3 * d.NH * d.HS), att=None, n_head=d.NH, n_threads=1,
        accumulate=False, out=m.f32(d.B, d.T, d.NH * d.HS)), ("dqkv", "out")),
    # norm
    "rmsnorm_forward": Recipe(dict(N=3, C=5), lambda d, m: dict(
        out=m.f32(d.N, d.C), rstd=m.f32(d.N), x=m.f32(d.N, d.C), eps=1e-5, n_threads=1),
        ("out", "rstd")),
    "rmsnorm_backward": Recipe(dict(N=3, C=5), lambda d, m: dict(
        dx=m.f32(d.N, d.C), dout=m.f32(d.N, d.C), x=m.f32(d.N, d.C), rstd=m.pos32(d.N),
        n_threads=1), ("dx",)),
    "layernorm_forward": Recipe(dict(N=3, C=5), lambda d, m: dict(
        out=m.f32(d.N, d.C), mean=m.f32(d.N), rstd=m.f32(d.N), x=m.f32(d.N, d.C),
        weight=m.f32(d.C), bias=m.f32(d.C), eps=1e-5, n_threads=1), ("out", "mean", "rstd")),
    "layernorm_backward": Recipe(dict(N=3, C=5), lambda d, m: dict(
        dx=m.f32(d.N, d.C), dweight=m.f32(d.C), dbias=m.f32(d.C), dout=m.f32(d.N, d.C),
        x=m.f32(d.N, d.C), mean=m.f32(d.N), rstd=m.pos32(d.N), weight=m.f32(d.C),
        n_threads=1), ("dx", "dweight", "dbias")),
    # activation: any shape, the same for every array of a call
    "squared_relu_forward": Recipe(dict(N=3, H=5), lambda d, m: dict(
        out=m.f32(d.N, d.H), x=m.f32(d.N, d.H), n_threads=1), ("out",)),
    "squared_relu_backward": Recipe(dict(N=3, H=5), lambda d, m: dict(
        dx=m.f32(d.N, d.H), dout=m.f32(d.N, d.H), x=m.f32(d.N, d.H), n_threads=1), ("dx",)),
    "squared_relu_backward_inplace": Recipe(dict(N=3, H=5), lambda d, m: dict(
        d=m.f32(d.N, d.H), x=m.f32(d.N, d.H), n_threads=1), ("d",)),
    "dropout_mask": Recipe(dict(N=3, C=5), lambda d, m: dict(mask=m.f32(d.N, d.C), **_DROP),
                           ("mask",), free_shape=("mask",)),
    "dropout_forward": Recipe(dict(N=3, C=5), lambda d, m: dict(
        out=m.f32(d.N, d.C), x=m.f32(d.N, d.C), **_DROP), ("out",)),
    "dropout_backward": Recipe(dict(N=3, C=5), lambda d, m: dict(
        dx=m.f32(d.N, d.C), dout=m.f32(d.N, d.C), **_DROP), ("dx",)),
    "dropout_add_forward": Recipe(dict(N=3, C=5), lambda d, m: dict(
        resid=m.f32(d.N, d.C), x=m.f32(d.N, d.C), **_DROP), ("resid",)),
    "dropout_add_to_forward": Recipe(dict(N=3, C=5), lambda d, m: dict(
        out=m.f32(d.N, d.C), resid=m.f32(d.N, d.C), x=m.f32(d.N, d.C), **_DROP), ("out",)),
    # xent
    "cross_entropy_forward": Recipe(dict(N=3, V=5), lambda d, m: dict(
        losses=m.f32(d.N), logits=m.f32(d.N, d.V), targets=m.i32(d.N, hi=d.V), n_threads=1),
        ("losses",), indices={"targets": "V"}),
    "cross_entropy_backward": Recipe(dict(N=3, V=5), lambda d, m: dict(
        dlogits=m.f32(d.N, d.V), logits=m.f32(d.N, d.V), targets=m.i32(d.N, hi=d.V), dloss=1.0,
        n_threads=1), ("dlogits",), indices={"targets": "V"}),
    "cross_entropy_forward_backward": Recipe(dict(N=3, V=5), lambda d, m: dict(
        dlogits=m.f32(d.N, d.V), logits=m.f32(d.N, d.V), targets=m.i32(d.N, hi=d.V),
        n_threads=1), ("dlogits",), indices={"targets": "V"}),
    # embedding
    "embedding_forward": Recipe(dict(B=2, T=3, V=5, C=4), lambda d, m: dict(
        out=m.f32(d.B, d.T, d.C), idx=m.i32(d.B, d.T, hi=d.V), wte=m.f32(d.V, d.C),
        wpe=m.f32(d.T, d.C), n_threads=1), ("out",), indices={"idx": "V"}),
    "embedding_backward": Recipe(dict(B=2, T=3, V=5, C=4), lambda d, m: dict(
        dwte=m.f32(d.V, d.C), dwpe=m.f32(d.T, d.C), dout=m.f32(d.B, d.T, d.C),
        idx=m.i32(d.B, d.T, hi=d.V), n_threads=1), ("dwte", "dwpe"), indices={"idx": "V"}),
    # decode: a few rows at a time, against a q|k|v cache of Tc rows
    "decode_matmul_forward": Recipe(dict(n=2, IC=5, OC=4), lambda d, m: dict(
        out=m.f32(d.n, d.OC), x=m.f32(d.n, d.IC), w=m.f32(d.OC, d.IC), n_threads=1,
        accumulate=True), ("out",)),
    "decode_matmul_sqrelu_forward": Recipe(dict(n=2, IC=5, OC=4), lambda d, m: dict(
        out=m.f32(d.n, d.OC), x=m.f32(d.n, d.IC), w=m.f32(d.OC, d.IC), n_threads=1), ("out",)),
    "decode_attention_forward": Recipe(dict(n=2, Tc=5, NH=2, HS=2), lambda d, m: dict(
        out=m.f32(d.n, d.NH * d.HS), qkv=m.f32(d.Tc, 3 * d.NH * d.HS), t0=d.Tc - d.n,
        n_head=d.NH, n_threads=1), ("out",)),
    # adamw
    "grad_norm": Recipe(dict(P=7), lambda d, m: dict(g=m.f32(d.P), n_threads=1), ()),
    "adamw_step": Recipe(dict(P=7), lambda d, m: dict(
        params=m.f32(d.P), grads=m.f32(d.P), m=m.f32(d.P), v=m.pos32(d.P), decay=True, lr=1e-3,
        beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3, grad_scale=0.5,
        n_threads=1), ("params", "m", "v")),
}


def kernel_name(recipe_name):
    """'attention_forward[att=None]' -> 'attention_forward'."""
    return recipe_name.split("[")[0]


def families():
    """The compiled kernel modules of randygpt._kernels (private helpers excluded)."""
    return [m.name for m in pkgutil.iter_modules(kernels_pkg.__path__)
            if not m.name.startswith("_") and m.name != "reference"]


def public_callables():
    """{name: (family, function)} of every callable in every family's __all__."""
    found = {}
    for family in families():
        mod = importlib.import_module(f"randygpt._kernels.{family}")
        for name in mod.__all__:
            if callable(getattr(mod, name)):
                found[name] = (family, getattr(mod, name))
    return found


# --- the hostile variants of a recipe ---------------------------------------------------------
# Each maker takes the recipe and the valid call's arguments and yields Cases. A case's call is
# the recipe built afresh at its dims (the recipe's own, overridden by `dims`), then passed
# through `mutate` (arguments, dims namespace) -> arguments. Expected outcomes are exception
# class names, or "ok"; a case whose id ends in "same bits" must also give one thread's result.

@dataclass
class Case:
    id: str
    expected: frozenset
    mutate: Callable = None
    dims: dict = field(default_factory=dict)


def _arrays(args):
    return [k for k, v in args.items() if isinstance(v, np.ndarray)]


def _strided(a):
    """The same values in a non-contiguous view."""
    if a.ndim == 0:
        return a
    base = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    view = base[..., ::2]
    view[...] = a
    return view


def _misaligned(a):
    """The same values with items one byte off their natural alignment."""
    buf = bytearray(a.nbytes + 1)
    b = np.frombuffer(buf, a.dtype, count=a.size, offset=1).reshape(a.shape)
    b[...] = a
    return b


def _read_only_mapped(a):
    """The same values in a read-only memory map: writing to it would fault (SIGSEGV)."""
    fd, path = tempfile.mkstemp(suffix=".bin")
    os.write(fd, a.tobytes() or b"\0")
    os.close(fd)
    m = np.memmap(path, dtype=a.dtype, mode="r", shape=a.shape)
    os.unlink(path)
    return m


def _overlapping(a, b):
    """(a2, b2): copies of a and b in one buffer, sharing its middle element."""
    buf = np.zeros(a.size + b.size - 1, a.dtype)
    a2, b2 = buf[:a.size].reshape(a.shape), buf[a.size - 1:].reshape(b.shape)
    b2[...] = b
    a2[...] = a
    return a2, b2


def _other_dtype(a):
    return np.float64 if a.dtype == np.float32 else np.int64


def _set(name, value):
    def mutate(args, d):
        args[name] = value(args[name]) if callable(value) else value
        return args
    return mutate


def type_cases(r, args):
    for a in _arrays(args):
        yield Case(f"dtype {a}", TYPE_ERROR, _set(a, lambda v: v.astype(_other_dtype(v))))
        if args[a].dtype == np.int32:
            yield Case(f"float {a}", TYPE_ERROR, _set(a, lambda v: v.astype(np.float32)))
        yield Case(f"byte-swapped {a}", TYPE_ERROR,
                   _set(a, lambda v: v.astype(v.dtype.newbyteorder())))
        yield Case(f"list {a}", TYPE_ERROR, _set(a, lambda v: v.tolist()))
        yield Case(f"None {a}", CLEAN, _set(a, None))  # optional for some (att, dx, ...)


def layout_cases(r, args):
    for a in _arrays(args):
        axes = CLEAN if a in r.free_shape else VALUE_ERROR
        yield Case(f"extra axis {a}", axes, _set(a, lambda v: v[None]))
        yield Case(f"one axis less {a}", axes,
                   _set(a, lambda v: v.reshape(-1) if v.ndim > 1 else v.reshape(-1)[0, ...]))
        yield Case(f"strided {a}", VALUE_ERROR, _set(a, _strided))
        if args[a].ndim > 1:
            yield Case(f"Fortran {a}", VALUE_ERROR, _set(a, np.asfortranarray))
        yield Case(f"misaligned {a}", VALUE_ERROR, _set(a, _misaligned))


def output_cases(r, args):
    for o in r.outputs:
        yield Case(f"read-only {o}", VALUE_ERROR, _set(o, _freeze))
        yield Case(f"mapped read-only {o}", VALUE_ERROR, _set(o, _read_only_mapped))
        for other in _arrays(args):
            if other == o or args[other].dtype != args[o].dtype:
                continue
            if args[other].shape == args[o].shape:
                yield Case(f"{o} is {other}", VALUE_ERROR, _alias(o, other))
            yield Case(f"{o} overlaps {other}", VALUE_ERROR, _overlap(o, other))
    for a in _arrays(args):
        if a not in r.outputs:
            # Legal, and proof that the recipe names every output: a kernel refuses a
            # read-only array only where it writes.
            yield Case(f"read-only input {a}", OK, _set(a, _freeze))


def _freeze(v):
    v.flags.writeable = False
    return v


def _alias(o, other):
    def mutate(args, d):
        args[o] = args[other]
        return args
    return mutate


def _overlap(o, other):
    def mutate(args, d):
        args[o], args[other] = _overlapping(args[o], args[other])
        return args
    return mutate


BAD_THREADS = [(0, "ValueError"), (-1, "ValueError"), (MAX_THREADS + 1, "ValueError"),
               (2 ** 31, "ValueError"), (2 ** 63, "ValueError"), (-(2 ** 63), "ValueError"),
               (True, "TypeError"), (2.0, "TypeError"), ("2", "TypeError"),
               (None, "TypeError"), (np.float64(2), "TypeError")]
# Legal, however many: the result must equal one thread's to the bit (checked in run_case).
GOOD_THREADS = [2, 3, np.int64(5), MAX_TEAM, MAX_TEAM + 1, 32768, MAX_THREADS]


def thread_cases(r, args):
    for n, error in BAD_THREADS:
        yield Case(f"n_threads={n!r}", frozenset({error}), _set("n_threads", n))
    for n in GOOD_THREADS:
        yield Case(f"n_threads={n!r} same bits", OK, _set("n_threads", n))
    for k in r.dims:
        # Enough work items for a team of every thread allowed (libgomp then starts them all,
        # where a kernel asks for no more threads than it has items). Some of these calls are
        # not legal (more new rows than cached ones): the same error then, never a crash.
        yield Case(f"n_threads={MAX_THREADS} at {k}={LARGE} same bits", CLEAN,
                   _set("n_threads", MAX_THREADS), {k: LARGE})


def shape_cases(r, args):
    for k in r.dims:
        yield Case(f"{k}=0", CLEAN, dims={k: 0})
        yield Case(f"{k}={LARGE}", CLEAN, dims={k: LARGE})
        yield Case(f"{k}=2**40, others 0", CLEAN, dims={j: HUGE if j == k else 0 for j in r.dims})


BAD_SCALARS = {"None": None, "'1'": "1", "nan": float("nan"), "inf": float("inf"), "-1": -1,
               "1.5": 1.5, "True": True, "10**400": 10 ** 400, "-10**400": -(10 ** 400),
               "2**64": 2 ** 64, "array([1, 2])": np.array([1, 2])}


def scalar_cases(r, args):
    for s, v in args.items():
        if s == "n_threads" or isinstance(v, np.ndarray) or v is None:
            continue
        for label, bad in BAD_SCALARS.items():
            yield Case(f"{s}={label}", CLEAN, _set(s, bad))


def index_cases(r, args):
    for a, dim in r.indices.items():
        for bad in ("bound", -1, 2 ** 31 - 1, -(2 ** 31)):
            def mutate(args, d, a=a, dim=dim, bad=bad):
                args[a].flat[-1] = getattr(d, dim) if bad == "bound" else bad
                return args
            yield Case(f"{a}[-1]={bad}", VALUE_ERROR, mutate)


CASES = {"types": type_cases, "layout": layout_cases, "outputs": output_cases,
         "threads": thread_cases, "shapes": shape_cases, "scalars": scalar_cases,
         "indices": index_cases}


# --- running one case (in the worker) ---------------------------------------------------------

def build(recipe, seed, **dims):
    d = SimpleNamespace(**{**recipe.dims, **dims})
    return recipe.make(d, Maker(np.random.default_rng(seed))), d


def _outcome(fn, args):
    try:
        value = fn(**args)
    except Exception as e:  # any class: those outside CLEAN fail the case
        return {"outcome": type(e).__name__, "message": str(e)}, None
    return {"outcome": "ok"}, value


def _same_bits(a, b):
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b or (a != a and b != b)


def run_case(recipe_name, category, case_id):
    """Builds the case's call, makes it, and returns what happened (a JSON-able dict)."""
    recipe = RECIPES[recipe_name]
    fn = public_callables()[kernel_name(recipe_name)][1]
    if category == "valid":
        return _outcome(fn, build(recipe, 0)[0])[0]
    case = next(c for c in CASES[category](recipe, build(recipe, 0)[0]) if c.id == case_id)
    try:
        args, d = build(recipe, 0, **case.dims)
    except (MemoryError, ValueError) as e:  # NumPy cannot make such arrays here
        return {"outcome": "n/a", "message": f"{type(e).__name__}: {e}"}
    if case.mutate is not None:
        args = case.mutate(args, d)
    before = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    result, value = _outcome(fn, args)
    if result["outcome"] != "ok":
        return result
    if case.id.startswith("read-only input"):
        name = case.id.split()[-1]
        if not _same_bits(args[name], before[name]):
            return {"outcome": "wrote", "message": f"{name} changed although read-only"}
    if case.id.endswith("same bits"):
        ref_args = build(recipe, 0, **case.dims)[0]
        ref = _outcome(fn, ref_args)[1]
        for name in recipe.outputs:
            if not _same_bits(args[name], ref_args[name]):
                return {"outcome": "differs", "message": f"{name} differs from 1 thread's"}
        if not _same_bits(value, ref):
            return {"outcome": "differs", "message": f"returned {value!r}, 1 thread {ref!r}"}
    return result


GARBAGE = {"None": None, "0": 0, "-1": -1, "str": "x", "empty array": np.empty(0, np.float32),
           "0-d array": np.float32(1.0), "object": object()}


def run_garbage(name, kind):
    """Calls public function `name` with every required parameter set to one garbage value."""
    fn = public_callables()[name][1]
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.default is inspect.Parameter.empty]
    return _outcome(fn, {p.name: GARBAGE[kind] for p in params})[0]


def _worker_main():
    """Serves cases read as JSON lines on stdin; one JSON line of outcome per case."""
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["category"] == "garbage":
                result = run_garbage(req["name"], req["case"])
            else:
                result = run_case(req["name"], req["category"], req["case"])
        except Exception:  # a broken recipe or case, not a kernel outcome
            result = {"outcome": "harness error", "message": traceback.format_exc()}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


# --- the worker, seen from pytest -------------------------------------------------------------

class Sandbox:
    """One worker process; a case that kills it fails alone, and the next case restarts it."""

    def __init__(self):
        self.proc = None
        self.log = None

    def _start(self):
        self.log = tempfile.TemporaryFile(mode="w+")
        here = str(Path(__file__).resolve().parent)
        code = (f"import sys; sys.path.insert(0, {here!r}); "
                "import test_hostile_kernels as h; h._worker_main()")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)

    def run(self, **request):
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], CASE_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        if ready:  # end of file: the worker is gone
            rc = self.proc.wait(timeout=60)
            how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        else:
            self.proc.kill()
            self.proc.wait()
            how = f"no answer within {CASE_TIMEOUT_S} s (hang)"
        self.log.seek(0)
        tail = self.log.read()[-800:]
        self.proc = None
        return {"outcome": "crash", "message": f"worker died: {how}; stderr: {tail!r}"}

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def sandbox():
    box = Sandbox()
    yield box
    box.close()


# --- the tests --------------------------------------------------------------------------------

def test_every_kernel_has_a_recipe():
    kernels = {n for n in public_callables() if n not in NOT_KERNELS}
    missing = sorted(kernels - {kernel_name(r) for r in RECIPES})
    assert not missing, f"no hostile-input recipe (RECIPES) for {missing}"


def test_every_recipe_names_a_public_kernel():
    assert not sorted({kernel_name(r) for r in RECIPES} - set(public_callables()))


def test_every_family_lists_its_kernels():
    for family in families():
        mod = importlib.import_module(f"randygpt._kernels.{family}")
        assert hasattr(mod, "__all__"), f"randygpt._kernels.{family} has no __all__"


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_is_a_valid_call(sandbox, recipe):
    got = sandbox.run(name=recipe, category="valid", case="")
    assert got["outcome"] == "ok", got


@pytest.mark.parametrize("category", list(CASES))
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_hostile_input(sandbox, recipe, category):
    r = RECIPES[recipe]
    args = build(r, 0)[0]
    failures = []
    for case in CASES[category](r, args):
        got = sandbox.run(name=recipe, category=category, case=case.id)
        if got["outcome"] not in case.expected | {"n/a"}:
            failures.append(f"{case.id}: expected {sorted(case.expected)}, got "
                            f"{got['outcome']}: {got.get('message', '')[:300]}")
        elif got["outcome"] not in ("ok", "n/a") and "\n" in got["message"]:
            failures.append(f"{case.id}: an error message of several lines")
    assert not failures, f"{recipe}, {category}:\n" + "\n".join(failures)


@pytest.mark.parametrize("name", sorted(public_callables()))
def test_garbage_arguments(sandbox, name):
    # Needs no recipe: every required parameter set to the same garbage value.
    failures = []
    for kind in GARBAGE:
        got = sandbox.run(name=name, category="garbage", case=kind)
        if got["outcome"] not in CLEAN:
            failures.append(f"{kind}: {got['outcome']}: {got.get('message', '')[:300]}")
    assert not failures, f"{name}:\n" + "\n".join(failures)


# --- allocation failures ----------------------------------------------------------------------
# Kernels that allocate scratch: each call runs in a fresh process whose address space is then
# capped a little above what it already uses, so that the kernel's own allocation fails.
# n_threads=1: libgomp starts no threads (whose stacks the cap would refuse too).

SCRATCH_CALLS = {
    "gemm, running sums over K blocks": (
        "from randygpt._kernels.matmul import gemm\n"
        "a, b = f32(2048, 2048), f32(2048, 2048)\n"
        "c = f32(2048, 2048)\n"
        "call = lambda: gemm(c, a, b, False, False, True, 1)"),
    "attention_forward, P kept in scratch": (
        "from randygpt._kernels.attention import attention_forward\n"
        "qkv, out = f32(1, 4096, 12), f32(1, 4096, 4)\n"
        "call = lambda: attention_forward(out, None, qkv, 1, 1)"),
    "attention_backward, P recomputed": (
        "from randygpt._kernels.attention import attention_backward\n"
        "qkv, dout = f32(1, 4096, 12), f32(1, 4096, 4)\n"
        "dqkv = f32(1, 4096, 12)\n"
        "call = lambda: attention_backward(dqkv, dout, qkv, None, 1, 1)"),
    "layernorm_backward, row-chunk partials": (
        "from randygpt._kernels.norm import layernorm_backward\n"
        "N, C = 64, 1 << 16\n"
        "x, dout, dx = f32(N, C), f32(N, C), f32(N, C)\n"
        "dw, db, w, mean, rstd = f32(C), f32(C), f32(C), f32(N), f32(N)\n"
        "call = lambda: layernorm_backward(dx, dw, db, dout, x, mean, rstd, w, 1)"),
}

# Every array of the call exists before the cap.
_CAPPED = """
import resource, numpy as np
f32 = lambda *shape: np.ones(shape, np.float32)
{setup}
with open("/proc/self/statm") as f:
    used = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (8 << 20), resource.RLIM_INFINITY))
try:
    call()
except MemoryError as e:
    print("MemoryError:", e)
else:
    print("no error")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc")
@pytest.mark.parametrize("what", list(SCRATCH_CALLS))
def test_failed_allocation_is_one_memory_error(what):
    code = _CAPPED.format(setup=SCRATCH_CALLS[what])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=CASE_TIMEOUT_S)
    assert proc.returncode == 0, f"{what}: exit status {proc.returncode}: {proc.stderr[-800:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("MemoryError: "), proc.stdout
    assert "cannot allocate" in lines[0] and "bytes" in lines[0], lines[0]
