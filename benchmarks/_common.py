"""Helpers shared by randygpt's benchmark scripts: timing, a description of the machine,
and printing results as an aligned table or as JSON.

Every number a benchmark prints is a median over interleaved samples, and comes with the
shape and thread count it was measured at (the header says which machine and libraries).
"""
import datetime
import json
import math
import os
import platform
import statistics
import time

import numpy as np

# The benchmarks measure the installed randygpt (`pip install .`, or `pip install -e .` for the
# tree they live in): the package sits in src/, so running from the checkout cannot shadow it.

# A sample shorter than this is dominated by timer and call overhead, so fast calls are
# repeated inside one sample until it lasts at least this long.
MIN_SAMPLE_S = 0.005
MAX_CALLS_PER_SAMPLE = 1000

# After its last call, a thread pool keeps its workers spinning for a while: measured here,
# libgomp burnt ~8 ms of CPU, and OpenBLAS kept a core busy for 100-200 ms (our 2-thread
# GEMM 2048x256x256 right after NumPy calls took 3.9 ms with no pause, 2.9 ms after 50 ms,
# 1.6 ms after 100 ms and 1.4 ms after 200 ms or more, its time alone). With more than one
# thread, the next implementation timed would share its cores with those spinners, so the
# samplers wait this long before each sample. The pause has its own cost: by its end this pool's threads are
# parked too, and the first call that wakes them was measured several times slower than
# the next (attention forward, 2 threads: 7.5 ms, then 1.85 ms). So after the pause one
# untimed call wakes them, and only the calls after it are timed.
SPIN_SETTLE_S = 0.25


def calls_per_sample(fn):
    """Run fn twice (warm-up, then a timed call) and return how many calls make one sample."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    return max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_S / max(once, 1e-9))))


def time_interleaved(fns, repeat, settle_s=0.0):
    """Median seconds per call of each function in fns.

    The functions are warmed up, then sampled round-robin (ours, reference, ours, ...)
    so that a burst of load on the machine hits all of them alike rather than one.
    settle_s: pause before each sample (SPIN_SETTLE_S when the pools have several threads),
    followed by one untimed call of the same function that wakes its parked threads; the
    sample is the back-to-back block of calls after it.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    numbers = [calls_per_sample(fn) for fn in fns]
    samples = [[] for _ in fns]
    for _ in range(repeat):
        for fn, k, out in zip(fns, numbers, samples):
            if settle_s:
                time.sleep(settle_s)
                fn()
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            out.append((time.perf_counter() - t0) / k)
    return [statistics.median(s) for s in samples]


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (or what the platform module knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def blas_info():
    """NumPy's BLAS libraries as threadpoolctl sees them (the ones loaded in this process)."""
    from threadpoolctl import threadpool_info

    libs = []
    for info in threadpool_info():
        if info.get("user_api") != "blas":
            continue
        libs.append({
            "internal_api": info.get("internal_api"),
            "version": info.get("version"),
            # OpenBLAS reports the core type whose kernels it runs (e.g. Haswell, Zen);
            # MKL reports its threading layer instead.
            "architecture": info.get("architecture") or info.get("threading_layer"),
            "num_threads": info.get("num_threads"),
        })
    return libs


def machine_info(n_threads):
    """A dict describing where and how the numbers were measured."""
    import randygpt

    try:
        from randygpt._kernels import matmul
        isa = matmul.get_isa()
    except ImportError:
        isa = "unknown (randygpt._kernels.matmul not built)"
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu_model(),
        "usable_cpus": randygpt._kernels.usable_cpus(),
        "physical_cores": randygpt._kernels.physical_cores(),
        "isa": isa,
        "openmp": bool(randygpt.openmp_enabled()),
        "threads": n_threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": blas_info(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "openblas_l2_size": os.environ.get("OPENBLAS_L2_SIZE"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": [round(x, 2) for x in load],
    }


def blas_warning(info):
    """A warning line when the environment overrides OpenBLAS's own choice of kernels for
    this CPU, or None. OPENBLAS_CORETYPE=Haswell (set on some machines) runs its AVX2 kernels
    on cores with AVX-512 too, and halves NumPy's @ there; OPENBLAS_L2_SIZE changes its
    blocking. Either makes "vs @" flatter randygpt."""
    forced = [f"{var}={info[key]}" for var, key in (("OPENBLAS_CORETYPE", "openblas_coretype"),
                                                   ("OPENBLAS_L2_SIZE", "openblas_l2_size"))
              if info.get(key)]
    if not forced:
        return None
    verb, them = ("overrides", "it") if len(forced) == 1 else ("override", "them")
    return (f"warning  : {' and '.join(forced)} {verb} OpenBLAS's choice of kernels for this "
            f"CPU (an older, slower kernel may run): unset {them} to compare with NumPy's @")


def format_machine(info):
    """The header lines for a machine_info() dict."""
    blas = "; ".join(
        f"{b['internal_api']} {b['version']} running its {b['architecture']} kernels "
        f"({b['num_threads']} threads)"
        for b in info["blas"]
    ) or "none loaded"
    load = ", ".join(f"{x:.2f}" for x in info["load_average"])
    lines = [
        f"CPU      : {info['cpu']} ({info['usable_cpus']} usable CPUs, "
        f"{info['physical_cores']} physical cores)",
        f"randygpt : SIMD {info['isa']}, OpenMP {'on' if info['openmp'] else 'OFF'}, "
        f"{info['threads']} thread(s)",
        f"NumPy    : {info['numpy']}, BLAS {blas}",
        f"OPENBLAS_CORETYPE={info['openblas_coretype'] or '(unset)'}",
        f"date     : {info['date']}, load average {load}",
    ]
    warning = blas_warning(info)
    if warning:
        lines.insert(4, warning)
    return "\n".join(lines)


def _is_number(cell):
    return cell[:1].isdigit() or (cell[:1] in "-+." and cell[1:2].isdigit())


def format_table(headers, rows):
    """Rows of strings as an aligned table; columns holding numbers are right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]
    numeric = [all(_is_number(row[i]) or row[i] == "-" for row in rows)
               for i in range(len(headers))]
    table = StreamTable(headers, widths, numeric)
    return "\n".join([table.header()] + [table.line(r) for r in rows])


class StreamTable:
    """A table printed a row at a time, as each is measured: the widths are fixed up front
    (text columns from the values they will hold, number columns from a bound)."""

    def __init__(self, headers, widths, numeric):
        self.headers = headers
        self.widths = [max(w, len(h)) for w, h in zip(widths, headers)]
        self.numeric = numeric

    def line(self, cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, self.widths, self.numeric)).rstrip()

    def header(self):
        return "\n".join([self.line(self.headers), self.line(["-" * w for w in self.widths])])


def fmt(value, spec, missing="-"):
    """format(value, spec), or `missing` for None and NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def fmt_ratio(value):
    """1.234 -> '1.23x'; None -> '-'."""
    return fmt(value, ".2f") + ("x" if value is not None else "")


def dump_json(doc):
    """JSON text of doc; NaN and infinity are written as null so any parser reads it."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(doc), indent=2, allow_nan=False)


def parse_threads(text):
    """'1,2' -> [1, 2]: a comma-separated list of positive thread counts."""
    try:
        counts = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--threads must be comma-separated integers, got {text!r}") from None
    if not counts or any(n < 1 for n in counts):
        raise ValueError(f"--threads must list positive integers, got {text!r}")
    return counts
