"""The cores' peak float32 FMA rate, measured now: the yardstick for randygpt's GEMM.

    fma_peak_gflops(isa, n_threads=1, seconds=0.2) -> GFLOP/s
    available_isas() -> ["avx512", "avx2", "sse2"] (those this CPU runs, fastest first)
    available_bf16_isas() -> ["amx", "avx512bf16"] where the CPU has AMX-BF16 (and Linux grants
                             the tile state) and AVX512_BF16: the tdpbf16ps and vdpbf16ps
                             peaks, the bf16 GEMM paths' yardsticks (fma_peak_gflops takes
                             their names too)

The probe is C (_fma_peak.c), compiled on first use with the C compiler setuptools would build
an extension with ($CC, else the one Python was built with), with OpenMP, and cached under the
checkout's build/fma_peak/ (git-ignored) by a hash of the source, compiler and flags; ctypes
calls it. It lives here, not in the package: it measures the machine, not the model.
"""
import ctypes
import functools
import hashlib
import os
import shlex
import subprocess
import sysconfig
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().with_name("_fma_peak.c")
BUILD_DIR = SOURCE.parents[1] / "build" / "fma_peak"
# The flags the package's kernels are built with (setup.py), as a shared library.
FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")
OPENMP = ("-fopenmp",)


def _compiler():
    """The C compiler as setuptools picks it: $CC, else sysconfig's CC, split into words."""
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def _compile(cc, flags, target):
    """Builds SOURCE into the shared library `target`, atomically (another process may be
    building the same one); RuntimeError with the compiler's complaint when it fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    cmd = [*cc, *flags, str(SOURCE), "-o", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except OSError as e:
        raise RuntimeError(f"cannot run the C compiler {cc[0]!r}: {e}") from None
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd)} failed: {lines[-1]}")
    os.replace(tmp, target)


@functools.lru_cache(maxsize=None)
def _library():
    """The compiled probe (with OpenMP if the compiler has it, else one thread only)."""
    cc, source = _compiler(), SOURCE.read_bytes()
    suffix = sysconfig.get_config_var("SHLIB_SUFFIX") or ".so"
    errors = []
    for flags in (FLAGS + OPENMP, FLAGS):
        key = hashlib.sha256(source + repr((cc, flags)).encode()).hexdigest()[:16]
        target = BUILD_DIR / f"_fma_peak-{key}{suffix}"
        if not target.exists():
            try:
                _compile(cc, flags, target)
            except RuntimeError as e:
                errors.append(str(e))
                continue
        lib = ctypes.CDLL(str(target))
        lib.fma_peak_path_name.restype = ctypes.c_char_p
        lib.fma_peak_round_flops.restype = ctypes.c_double
        lib.fma_peak_run.restype = ctypes.c_float
        lib.fma_peak_run.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_int)
        return lib
    raise RuntimeError("cannot build the FMA-peak probe: " + "; ".join(errors))


def _paths():
    lib = _library()
    return [lib.fma_peak_path_name(i).decode() for i in range(lib.fma_peak_path_count())]


def _supported(bf16):
    lib = _library()
    return [name for i, name in enumerate(_paths())
            if (lib.fma_peak_path_macs(i) > 1) == bf16 and lib.fma_peak_path_supported(i)]


def available_isas():
    """Names of the FMA paths this CPU runs, fastest first: the GEMM's
    (matmul.available_isas())."""
    return _supported(False)


def available_bf16_isas():
    """Names of the bf16 dot-product paths this CPU runs, fastest first: "amx" (tdpbf16ps,
    32 bf16 multiply-adds per fp32 lane of a tile) where it has AMX-BF16 and Linux grants
    the tile state, "avx512bf16" (vdpbf16ps, two per lane) where it has AVX512_BF16."""
    return _supported(True)


def _rounds(index, iters, n_threads):
    """Seconds for n_threads threads to run `iters` FMA rounds each, at the same time."""
    start = time.perf_counter()
    sink = _library().fma_peak_run(index, iters, n_threads)
    elapsed = time.perf_counter() - start
    if sink != sink:  # never true; keeps the result alive
        raise FloatingPointError("fma_peak_gflops: NaN")
    return elapsed


def fma_peak_gflops(isa, n_threads=1, seconds=0.2):
    """The peak float32 FMA rate of n_threads threads, in GFLOP/s, with the vector width and
    accumulator count of GEMM path `isa` (one of available_isas()), on registers alone.

    No GEMM on that path can run faster. Takes about `seconds`; the best of three timings
    is returned (a lost time slice only slows a timing down).
    """
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
        raise ValueError(f"fma_peak_gflops: n_threads must be an int >= 1, got {n_threads!r}")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
            or not 0.001 <= seconds <= 60:
        raise ValueError(f"fma_peak_gflops: seconds must be a number in [0.001, 60], "
                         f"got {seconds!r}")
    choices = available_isas() + available_bf16_isas()
    if isa not in choices:
        raise ValueError(f"fma_peak_gflops: isa must be one of {choices} on this CPU, "
                         f"got {isa!r}")
    if n_threads > 1 and not _library().fma_peak_openmp():
        raise RuntimeError("fma_peak_gflops: the probe was built without OpenMP (one thread)")
    index = _paths().index(isa)
    iters = 1000
    while True:  # calibrate on one thread: a few percent of the budget per try
        elapsed = _rounds(index, iters, 1)
        if elapsed >= seconds / 30 or iters >= (1 << 40):
            break
        iters *= 4
    iters = max(int(iters * (seconds / 3) / max(elapsed, 1e-9)), 1)
    best = min(_rounds(index, iters, n_threads) for _ in range(3))
    return n_threads * iters * _library().fma_peak_round_flops(index) / best / 1e9
