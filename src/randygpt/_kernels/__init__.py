"""randygpt's compute kernels (Cython + OpenMP) and the one place that decides thread counts.

Every kernel takes ``n_threads`` as its last argument; callers get it from
:func:`effective_n_threads`, never from OpenMP's own defaults.
"""
import functools
import importlib.util
import os
import re

from ._openmp import omp_place_cpus, openmp_enabled

__all__ = ["openmp_enabled", "effective_n_threads", "set_num_threads", "get_num_threads",
           "usable_cpus", "physical_cores", "select_isa"]

# The value given to set_num_threads(); None means "decide from the environment".
_requested_threads = None

# With OMP_PROC_BIND / OMP_PLACES set, the OpenMP runtime pinned this thread to its first place
# when it loaded, which narrows the affinity mask to one core; its places hold the rest. They
# are fixed once the runtime has started.
_OMP_PLACE_CPUS = frozenset(omp_place_cpus())


def _usable_cpu_ids():
    """Logical CPU ids this process may run on, or None where the OS cannot say."""
    try:
        ids = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None
    return ids | _OMP_PLACE_CPUS


def usable_cpus():
    """Logical CPUs this process may run on (honours affinity masks such as taskset's)."""
    ids = _usable_cpu_ids()
    return len(ids) if ids else (os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def _core_of(cpu):
    """An identifier of the physical core that logical CPU `cpu` belongs to (Linux sysfs; read
    once per CPU, since every kernel call asks for the thread count)."""
    for name in ("core_cpus_list", "thread_siblings_list"):
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/{name}") as f:
                return f.read().strip()
        except OSError:
            continue
    return f"cpu{cpu}"  # topology unknown: count it as a core of its own


def physical_cores():
    """Physical cores among the usable CPUs, where the hyperthreads (SMT siblings) of a core
    count once: the default thread count. The kernels are limited by each core's FMA units,
    which its hyperthreads share, so a second thread per core adds little but contention;
    asking for more threads explicitly still gets them."""
    ids = _usable_cpu_ids()
    if not ids:
        return usable_cpus()
    return len({_core_of(cpu) for cpu in ids})


# What each variable accepts, for its error message.
_ENV_SYNTAX = {
    "RANDYGPT_NUM_THREADS": "a nonzero integer (n > 0: n threads; -k: all usable CPUs but k - 1)",
    "OMP_NUM_THREADS": "a positive integer, or OpenMP's comma-separated list of them (e.g. 4,2)",
}
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")


def _parse_env_threads(name):
    """The thread count the environment variable ``name`` asks for; None when it is unset or
    empty. OMP_NUM_THREADS takes OpenMP's syntax, a team size per level of nested parallel
    regions ("4,2"): the kernels open one level, so its first entry applies, as in OpenMP."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    fields = raw.split(",") if name == "OMP_NUM_THREADS" else [raw]
    counts = [int(f) for f in fields if _INTEGER.fullmatch(f)]
    if len(counts) < len(fields) or counts[0] == 0 or \
            (name == "OMP_NUM_THREADS" and min(counts) < 1):
        raise ValueError(f"{name} must be {_ENV_SYNTAX[name]}, got {raw!r}")
    return counts[0]


def _check_request(n, source):
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{source}: number of threads must be an int, got {type(n).__name__}")
    if n == 0:
        syntax = _ENV_SYNTAX["RANDYGPT_NUM_THREADS"]
        raise ValueError(f"{source}: number of threads must be {syntax}, got 0")
    return n


def set_num_threads(n):
    """Set the thread count every kernel uses from now on.

    ``n`` > 0 asks for n threads (capped at the usable logical CPUs); ``n`` < 0 counts back
    from the usable logical CPUs (-1 = all of them, hyperthreads included); ``None`` returns
    to the default (``RANDYGPT_NUM_THREADS``, then ``OMP_NUM_THREADS``, then one thread per
    physical core).
    """
    global _requested_threads
    if n is not None:
        _check_request(n, "set_num_threads")
    _requested_threads = n


def effective_n_threads(requested=None):
    """Turn a request into the number of threads a kernel call will use.

    Order: ``requested`` argument, then :func:`set_num_threads`, then the
    environment variables ``RANDYGPT_NUM_THREADS`` and ``OMP_NUM_THREADS``, then one
    thread per usable physical core (:func:`physical_cores`). Negative values count back
    from the usable logical CPUs; the result is clamped to [1, usable logical CPUs], and is
    always 1 in a build without OpenMP.
    """
    if requested is not None:
        n = _check_request(requested, "effective_n_threads")
    elif _requested_threads is not None:
        n = _requested_threads
    else:
        n = None
        for var in ("RANDYGPT_NUM_THREADS", "OMP_NUM_THREADS"):
            n = _parse_env_threads(var)
            if n is not None:
                break
    if not openmp_enabled():
        return 1
    if n is None:
        return physical_cores()
    cpus = usable_cpus()
    if n < 0:
        return max(1, cpus + 1 + n)
    return min(n, cpus)


def get_num_threads():
    """The thread count kernels use right now (same as ``effective_n_threads()``)."""
    return effective_n_threads()


# SIMD paths from widest to narrowest; "generic" is the portable path of non-x86 builds.
ISA_ORDER = ("avx512", "avx2", "sse2", "generic")
# Kernel families with several SIMD paths chosen at run time (set_isa / available_isas).
_DISPATCHED = ("matmul", "attention", "activation", "decode")


def select_isa(name=None):
    """Choose the SIMD path of every dispatched kernel family and return its name.

    Order: ``name``, then the environment variable ``RANDYGPT_ISA``, then the fastest
    path this CPU runs (``randygpt._kernels.matmul.available_isas()``). An unknown name,
    or one this CPU cannot run, raises ValueError listing the choices. A family without
    that exact path (attention has no AVX-512 one) takes its widest path not wider than
    it, so forcing "sse2" really runs every kernel on baseline x86-64.
    """
    modules = [importlib.import_module(f"{__name__}.{f}") for f in _DISPATCHED
               if importlib.util.find_spec(f"{__name__}.{f}") is not None]
    choices = modules[0].available_isas() if modules else []
    source = "select_isa"
    if name is None:
        name = os.environ.get("RANDYGPT_ISA", "").strip() or None
        source = "RANDYGPT_ISA"
    if name is None:
        name = choices[0]
    if name not in choices:
        raise ValueError(f"{source} must be one of {', '.join(choices)} (the SIMD paths this CPU "
                         f"runs), got {name!r}")
    rank = ISA_ORDER.index(name) if name in ISA_ORDER else len(ISA_ORDER)
    for mod in modules:
        own = [isa for isa in mod.available_isas()
               if isa in ISA_ORDER and ISA_ORDER.index(isa) >= rank] or mod.available_isas()[-1:]
        mod.set_isa(name if name in mod.available_isas() else own[0])
    _select_bf16_isa(modules)
    return name


def _select_bf16_isa(modules):
    """RANDYGPT_BF16_ISA, if set, picks the bf16 GEMM path over the one set_isa chose: e.g.
    "avx512bf16" on an AMX machine gives the bits of a CPU with AVX512_BF16 and no AMX (AMX
    sums its products its own way), "avx512" the emulation's (the same bits, at fp32 speed)."""
    name = os.environ.get("RANDYGPT_BF16_ISA", "").strip()
    matmul_mod = next((m for m in modules if m.__name__.endswith(".matmul")), None)
    if not name or matmul_mod is None:
        return
    choices = matmul_mod.available_bf16_isas()
    if name not in choices:
        raise ValueError(f"RANDYGPT_BF16_ISA must be one of {', '.join(choices)} (the bf16 GEMM "
                         f"paths this CPU runs), got {name!r}")
    matmul_mod.set_bf16_isa(name)


# Chosen once at import so RANDYGPT_ISA applies to every kernel, and a bad value fails here,
# loudly. Skipped only while the matmul extension has not been compiled at all (a partial
# development build); a compiled one that fails to import still raises.
if importlib.util.find_spec(f"{__name__}.matmul") is not None:
    select_isa()
