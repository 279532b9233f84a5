"""Time one full training step of randygpt against the same model in PyTorch.

Usage:
    python benchmarks/bench_train.py [--threads 1,2,...] [--repeat R] [--json] [--profile]
                                     [--no-torch] [--quick] [--precision fp32|bf16]
                                     [--vocab-size V]

    --threads LIST  thread counts to sweep (default: one per physical core); randygpt,
                    PyTorch and NumPy's BLAS all get the same count
    --repeat R      timed steps per implementation; the median is reported (default 10)
    --json          print one JSON document instead of the tables
    --profile       also show where our step's time goes: each kernel, forward / backward /
                    optimizer, and what is left outside the kernels (Python, NumPy copies)
    --no-torch      skip PyTorch
    --quick         a tiny model and one step: a smoke test, not a measurement
    --precision P   our step in Config.precision P; with bf16, our fp32 step is timed too
                    ("ours fp32", for "speed vs fp32") and PyTorch runs its forward under
                    torch.autocast("cpu", dtype=torch.bfloat16)
    --vocab-size V  the model with V ids (default: the Config's 67, a character vocabulary):
                    2048 or 8192 time a --tokenizer bpe model, whose lm_head and embedding grow

A step is what the trainer does per iteration: forward with targets (B=32, T=64, the default
Config, dropout on), backward, global gradient norm and clip, one AdamW update. Each
implementation runs in its own worker process (this script re-invoked with --worker), so
PyTorch's OpenMP runtime and MKL never share a process with our kernels and the peak RSS of
each (getrusage ru_maxrss) is its own. Our worker runs under threadpool_limits(1, "blas"),
as the trainer does; the PyTorch worker sets torch.set_num_threads(n). The driver asks the
workers for one step at a time in turn (ours, PyTorch, NumPy, ours, ...), so load from other
jobs on the machine hits them alike; each worker times its own steps.

"% of NumPy @" is NumPy's time for the step's GEMMs (every forward NT, input-gradient NN
and weight-gradient TN product, measured in the same run at the same thread count) divided
by our whole step's time: the share of the machine's BLAS matmul rate the full step reaches.
"""
import argparse
import importlib
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from _common import (SPIN_SETTLE_S, dump_json, fmt, fmt_ratio, format_machine,
                     format_table, machine_info, parse_threads)
from _fma_peak import (available_bf16_isas as fma_peak_bf16_isas, available_isas as fma_peak_isas,
                       fma_peak_gflops)

KERNEL_FAMILIES = ("matmul", "attention", "norm", "activation", "xent", "embedding", "adamw")
# Module-level helpers of the kernel families that are not kernels.
NOT_KERNELS = {"available_isas", "get_isa", "set_isa", "effective_n_threads",
               "available_bf16_isas", "get_bf16_isa", "set_bf16_isa", "bf16_native"}

WARMUP_STEPS = 2
QUICK_CONFIG = {"n_embd": 32, "n_head": 2, "n_layer": 1, "block_size": 16, "batch_size": 4}


def make_config(quick):
    from randygpt.config import Config

    return Config(**QUICK_CONFIG) if quick else Config()


# --- the step's GEMMs -----------------------------------------------------------------------

def step_gemms(cfg):
    """(label, M, K, N, layout, count) of every GEMM in one training step.

    Each linear layer y = x W^T (NT) has an input-gradient product dx = dy W (NN) and a
    weight-gradient product dW = dy^T x (TN); wq, wk and wv run as one (3C, C) matrix.
    """
    N = cfg.batch_size * cfg.block_size
    C, H, V, L = cfg.n_embd, 4 * cfg.n_embd, cfg.vocab_size, cfg.n_layer
    layers = [("qkv", C, 3 * C, L), ("wo", C, C, L), ("fc1", C, H, L), ("fc2", H, C, L),
              ("lm_head", C, V, 1)]
    gemms = []
    for name, IC, OC, count in layers:
        gemms += [(f"{name} fwd", N, IC, OC, "NT", count),
                  (f"{name} dX", N, OC, IC, "NN", count),
                  (f"{name} dW", OC, N, IC, "TN", count)]
    return gemms


def step_gemm_flops(cfg):
    return sum(2.0 * M * K * N * count for _, M, K, N, _, count in step_gemms(cfg))


def blas_session(cfg, n_threads):
    """(step, finish) where a step is NumPy @ on every GEMM of one training step, each as
    many times as the step has it."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)

    def randn(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    products = []
    for _, M, K, N, layout, count in step_gemms(cfg):
        # Operands stored as the model stores them, so NumPy sees the same transposes:
        # NT x (M, K) . W^T with W (N, K); NN dy (M, K) . W (K, N); TN dy^T with dy (K, M).
        if layout == "NT":
            a, b = randn(M, K), randn(N, K).T
        elif layout == "NN":
            a, b = randn(M, K), randn(K, N)
        else:
            a, b = randn(K, M).T, randn(K, N)
        products.append((a, b, np.empty((M, N), np.float32), count))
    limits = threadpool_limits(limits=n_threads, user_api="blas")

    def step():
        for a, b, c, count in products:
            for _ in range(count):
                np.matmul(a, b, out=c)

    def finish():
        limits.restore_original_limits()
        return {"impl": "numpy @", "threads": n_threads}

    return step, finish


# --- our step -------------------------------------------------------------------------------

class KernelProfiler:
    """Times every kernel call by wrapping the functions in randygpt._kernels.<family>.

    model.py and optim.py call kernels through their module (matmul.matmul_forward), so
    replacing the module attributes reaches every call without touching the model. A kernel
    called from inside another (e.g. a GEMM driver) is counted once, in the outermost call.
    """

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)
        self.phase = "other"
        self._depth = 0
        self._saved = []

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                key = (self.phase, name)
                self.seconds[key] += time.perf_counter() - t0
                self.calls[key] += 1
                self._depth -= 1
        return timed

    def install(self):
        wrappers = {}  # id(kernel) -> its timed wrapper
        for family in KERNEL_FAMILIES:
            module = importlib.import_module(f"randygpt._kernels.{family}")
            for name in dir(module):
                fn = getattr(module, name)
                if name.startswith("_") or name in NOT_KERNELS or isinstance(fn, type) \
                        or not callable(fn):
                    continue
                wrappers[id(fn)] = self._wrap(name, fn)
                self._replace(module, name, wrappers[id(fn)])
        # A module that bound a kernel by name at import (from .matmul import gemm) holds its
        # own reference: replace those too.
        for caller in ("randygpt.model", "randygpt.optim"):
            module = importlib.import_module(caller)
            for name, obj in list(vars(module).items()):
                if id(obj) in wrappers:
                    self._replace(module, name, wrappers[id(obj)])

    def _replace(self, module, name, new):
        self._saved.append((module, name, getattr(module, name)))
        setattr(module, name, new)

    def uninstall(self):
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()

    def in_phase(self, phase, fn):
        """fn, run with its kernel calls attributed to `phase`."""
        def run(*args, **kwargs):
            self.phase = phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = "other"
        return run

    def reset(self):
        self.seconds.clear()
        self.calls.clear()


def make_step(cfg, x, y, forward, backward, grad_norm, update):
    """The trainer's iteration (at the peak learning rate) from the given callables."""
    from randygpt.optim import clip_scale

    def step(it):
        loss = forward(x, y, step=it)
        backward()
        scale = clip_scale(grad_norm(), cfg.grad_clip) if cfg.grad_clip > 0 else 1.0
        update(cfg.lr, grad_scale=scale)
        return loss
    return step


def ours_session(cfg, n_threads, profile_steps):
    """(step, finish) for our model: step() runs one training step; finish() returns the
    results, after profile_steps profiled steps when that is not 0."""
    from threadpoolctl import threadpool_limits

    import randygpt
    from randygpt._kernels import matmul
    from randygpt.model import GPT
    from randygpt.optim import AdamW

    randygpt.set_num_threads(n_threads)
    model = GPT(cfg, seed=cfg.seed)
    optimizer = AdamW(model, cfg)
    rng = np.random.default_rng(cfg.seed)
    shape = (cfg.batch_size, cfg.block_size)
    x = rng.integers(0, cfg.vocab_size, shape, dtype=np.int32)
    y = rng.integers(0, cfg.vocab_size, shape, dtype=np.int32)
    train_step = make_step(cfg, x, y, model.forward, model.backward, optimizer.grad_norm,
                           optimizer.step)
    # Our kernels never call BLAS; a stray NumPy matmul must not wake OpenBLAS's threads.
    limits = threadpool_limits(limits=1, user_api="blas")
    state = {"it": 0, "loss": None}

    def step():
        state["loss"] = train_step(state["it"])
        state["it"] += 1

    def finish():
        threads = randygpt.effective_n_threads()
        result = {"impl": "ours", "threads": threads,
                  "num_params": model.num_params, "loss": state["loss"],
                  "isa": matmul.get_isa(), "precision": cfg.precision,
                  "bf16_isa": matmul.get_bf16_isa(), **fma_peaks(threads),
                  **(bf16_peak(matmul.get_bf16_isa(), threads) if cfg.precision == "bf16"
                     else {})}
        if profile_steps:
            profiler = KernelProfiler()
            profiled = make_step(cfg, x, y,
                                 profiler.in_phase("forward", model.forward),
                                 profiler.in_phase("backward", model.backward),
                                 profiler.in_phase("optimizer", optimizer.grad_norm),
                                 profiler.in_phase("optimizer", optimizer.step))
            result["profile"] = run_profiled(profiler, profiled, state["it"], profile_steps)
        limits.restore_original_limits()
        return result

    return step, finish


def fma_peaks(n_threads):
    """The cores' peak FMA rate on every SIMD path, for the step's GEMM floor; the peak of
    the widest path is not always the highest (a core may clock down for 512-bit vectors),
    so the floor uses the best of them. Without a C compiler: the reason instead."""
    try:
        peaks = {isa: fma_peak_gflops(isa, n_threads) for isa in fma_peak_isas()}
    except RuntimeError as e:
        return {"fma_peak_error": str(e)}
    best_isa = max(peaks, key=peaks.get)
    return {"fma_peaks_gflops": peaks, "fma_peak_isa": best_isa,
            "fma_peak_gflops": peaks[best_isa]}


def bf16_peak(isa, n_threads):
    """The peak of the bf16 GEMM path in use (tdpbf16ps or vdpbf16ps), the bf16 step's own
    floor; nothing where the path is emulated (its yardstick is the FMA peak)."""
    if isa not in fma_peak_bf16_isas():
        return {}
    try:
        return {"bf16_peak_isa": isa, "bf16_peak_gflops": fma_peak_gflops(isa, n_threads)}
    except RuntimeError as e:
        return {"bf16_peak_error": str(e)}


def run_profiled(profiler, step, first_it, repeat):
    """Run `repeat` steps with every kernel call timed (after one untimed, to settle the
    wrappers in); mean milliseconds per step, per (phase, kernel)."""
    profiler.install()
    try:
        step(first_it)
        profiler.reset()
        t0 = time.perf_counter()
        for it in range(first_it + 1, first_it + 1 + repeat):
            step(it)
        seconds = time.perf_counter() - t0
    finally:
        profiler.uninstall()
    rows = [{"phase": phase, "kernel": name, "calls": profiler.calls[(phase, name)] / repeat,
             "ms": profiler.seconds[(phase, name)] / repeat * 1e3}
            for phase, name in sorted(profiler.seconds)]
    return {"step_ms": seconds / repeat * 1e3, "kernels": rows}


# --- the PyTorch step -----------------------------------------------------------------------

def _load_torch_ref():
    """randygpt/torch_ref.py loaded by path: importing the randygpt package would load our
    kernels' OpenMP runtime into PyTorch's process."""
    # find_spec of a top-level package locates it without running its __init__.
    path = Path(importlib.util.find_spec("randygpt").submodule_search_locations[0]) / "torch_ref.py"
    spec = importlib.util.spec_from_file_location("randygpt_torch_ref", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torch_session(cfg, n_threads):
    """(step, finish) for the PyTorch twin, with torch's own AdamW and clip_grad_norm_."""
    import torch

    torch.set_num_threads(n_threads)
    torch.manual_seed(cfg.seed)
    torch_ref = _load_torch_ref()
    model = torch_ref.build_torch_gpt(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)  # our init's scale (the exact values do not matter here)
    model.train()
    # Decay follows our rule: every matrix (2-D parameter), nothing else.
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() == 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() != 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.adam_eps)
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, cfg.block_size)
    x = torch.randint(0, cfg.vocab_size, shape, generator=gen)
    y = torch.randint(0, cfg.vocab_size, shape, generator=gen)
    state = {"loss": None}

    def step():
        optimizer.zero_grad(set_to_none=False)
        # bf16: the forward's matmuls on bf16 under autocast, as PyTorch users run it
        with torch_ref.autocast(cfg):
            loss = model(x, y)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        state["loss"] = float(loss)

    def finish():
        return {"impl": "torch", "threads": torch.get_num_threads(), "torch": torch.__version__,
                "autocast_bf16": cfg.precision == "bf16",
                "num_params": sum(p.numel() for p in params), "loss": state["loss"]}

    return step, finish


def peak_rss_mb():
    """This process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# Lines a worker sends the driver start with this, so stray prints cannot be mistaken for them.
REPLY = "@bench "


def reply(obj):
    print(REPLY + json.dumps(obj), flush=True)


def worker_main(args):
    """Body of a --worker process: set up, then answer the driver's commands on stdin:
    'step' runs one step and replies its seconds, 'finish' replies the results and exits."""
    settings = json.loads(args.config_json)
    n_threads = args.threads[0]
    if args.worker in ("ours", "ours_fp32"):
        from randygpt.config import Config
        cfg = Config.from_dict(settings)
        step, finish = ours_session(cfg if args.worker == "ours" else cfg.replace(precision="fp32"),
                                    n_threads, args.repeat if args.profile else 0)
    elif args.worker == "torch":
        step, finish = torch_session(SimpleNamespace(**settings), n_threads)
    else:
        step, finish = blas_session(SimpleNamespace(**settings), n_threads)
    reply({"ready": True})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            t0 = time.perf_counter()
            step()
            reply({"seconds": time.perf_counter() - t0})
        elif command == "finish":
            result = finish()
            result["peak_rss_mb"] = peak_rss_mb()
            reply(result)
            return 0
        else:
            raise ValueError(f"unknown worker command {command!r}")
    return 1  # the driver went away


# --- the driver -----------------------------------------------------------------------------

class WorkerError(RuntimeError):
    pass


class Worker:
    """One implementation in its own process (this script with --worker), driven over pipes."""

    def __init__(self, kind, cfg, n_threads, repeat, profile=False):
        self.kind = kind
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind,
               "--threads", str(n_threads), "--repeat", str(repeat),
               "--config-json", json.dumps(cfg.to_dict())] + (["--profile"] if profile else [])
        env = dict(os.environ)
        if kind == "torch":
            # torch.set_num_threads covers its intra-op pool; these cover MKL's and OpenMP's
            # defaults.
            env.update(OMP_NUM_THREADS=str(n_threads), MKL_NUM_THREADS=str(n_threads))
        # stderr goes to a file: a pipe nobody reads could fill up and stall the worker.
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, text=True, env=env)
        self.step_seconds = []
        try:
            self._read()  # "ready": the worker has built its model
        except WorkerError:
            self.close()
            raise

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        self.proc.wait()
        self._stderr.seek(0)
        tail = (self._stderr.read().strip().splitlines() or ["no output"])[-1]
        raise WorkerError(f"{self.kind} worker exited with status {self.proc.returncode}: "
                          f"{tail}")

    def ask(self, command):
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the worker died; _read reports why
        return self._read()

    def step(self, timed):
        seconds = self.ask("step")["seconds"]
        if timed:
            self.step_seconds.append(seconds)

    def finish(self):
        result = self.ask("finish")
        self.close()
        return result

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


def measure_threads(cfg, n_threads, repeat, profile, with_torch):
    """Ours, PyTorch and NumPy's GEMMs at one thread count, one step each in turn."""
    kinds = (["ours"] + (["ours_fp32"] if cfg.precision == "bf16" else [])
             + (["torch"] if with_torch else []) + ["blas"])
    workers, results = {}, {}
    for kind in kinds:
        try:
            workers[kind] = Worker(kind, cfg, n_threads, repeat, profile and kind == "ours")
        except WorkerError as e:
            results[kind] = {"error": str(e)}
    try:
        for round_ in range(WARMUP_STEPS + repeat):
            for kind, worker in list(workers.items()):
                time.sleep(SPIN_SETTLE_S)  # let the last worker's thread pool go idle
                try:
                    worker.step(timed=round_ >= WARMUP_STEPS)
                except WorkerError as e:
                    results[kind] = {"error": str(e)}
                    del workers[kind]
        for kind, worker in workers.items():
            try:
                results[kind] = worker.finish()
            except WorkerError as e:
                results[kind] = {"error": str(e)}
                continue
            times = worker.step_seconds
            results[kind].update(step_times_ms=[t * 1e3 for t in times],
                                 step_ms=float(np.median(times)) * 1e3)
    finally:
        for worker in workers.values():
            worker.close()
    return results


def measure(cfg, threads, repeat, profile, with_torch):
    """One run per thread count; derived rates, ratios and scaling."""
    tokens = cfg.batch_size * cfg.block_size
    flops = step_gemm_flops(cfg)
    runs = []
    for n in threads:
        results = measure_threads(cfg, n, repeat, profile, with_torch)
        run = {"threads": n, "ours": results["ours"], "numpy_gemm": results["blas"]}
        if with_torch:
            run["torch"] = results["torch"]
        if "ours_fp32" in results:
            run["ours_fp32"] = results["ours_fp32"]
        gemm_ms = run["numpy_gemm"].get("step_ms")
        if gemm_ms:
            run["numpy_gemm"]["gemm_ms"] = gemm_ms
            run["numpy_gemm"]["gemm_gflops"] = flops / (gemm_ms / 1e3) / 1e9
        for impl in IMPLS:
            r = run.get(impl)
            if not r or "error" in r:
                continue
            r["tokens_per_s"] = tokens / (r["step_ms"] / 1e3)
            r["gemm_gflops"] = flops / (r["step_ms"] / 1e3) / 1e9
            r["share_of_numpy_gemm"] = gemm_ms / r["step_ms"] if gemm_ms else None
        peak = run["ours"].get("fma_peak_gflops")
        if peak:
            # The FMA peak bounds every implementation alike: no step's GEMMs run faster.
            run["fma_peak_gflops"] = peak
            run["gemm_floor_ms"] = flops / (peak * 1e9) * 1e3
            for impl in IMPLS + ("numpy_gemm",):
                r = run.get(impl)
                if r and "error" not in r:
                    r["share_of_fma_peak"] = r["gemm_gflops"] / peak
        if with_torch and "error" not in run["ours"] and "error" not in run["torch"]:
            run["speed_vs_torch"] = run["torch"]["step_ms"] / run["ours"]["step_ms"]
        fp32 = run.get("ours_fp32")
        if fp32 and "error" not in fp32 and "error" not in run["ours"]:
            run["speed_vs_fp32"] = fp32["step_ms"] / run["ours"]["step_ms"]
        runs.append(run)
    base = runs[0]
    for run in runs[1:]:
        for impl in IMPLS:
            r, b = run.get(impl), base.get(impl)
            if r and b and "error" not in r and "error" not in b:
                r["scaling"] = b["step_ms"] / r["step_ms"]
    return runs


# Our step (in the Config's precision), our fp32 step beside a bf16 one, and PyTorch's.
IMPLS = ("ours", "ours_fp32", "torch")


def print_report(doc):
    print(format_machine(doc["machine"]))
    cfg = doc["config"]
    print(f"step     : B={cfg['batch_size']} T={cfg['block_size']} C={cfg['n_embd']} "
          f"NH={cfg['n_head']} L={cfg['n_layer']} V={cfg['vocab_size']} norm={cfg['norm']} "
          f"dropout={cfg['dropout']}; {doc['num_params']:,} parameters; "
          f"{doc['gemm_gflop_per_step']:.1f} GFLOP of GEMMs per step; "
          f"median of {doc['repeat']} steps after {WARMUP_STEPS} warm-up")
    print()
    base = doc["runs"][0]["threads"]
    headers = ["threads", "impl", "ms/step", "tok/s", "speed vs torch", "speed vs fp32",
               "GEMM GFLOP/s",
               "% of NumPy @", "% of FMA peak", "peak RSS MB", f"scaling vs {base}T"]
    rows, errors = [], []
    for run in doc["runs"]:
        for impl in IMPLS:
            r = run.get(impl)
            if r is None:
                continue
            if "error" in r:
                errors.append(f"{impl} at {run['threads']} thread(s): {r['error']}")
                continue
            speed = run.get("speed_vs_torch") if impl == "ours" else None
            share = r.get("share_of_numpy_gemm")
            peak_share = r.get("share_of_fma_peak")
            label = {"ours": f"ours {r.get('precision', 'fp32')}", "ours_fp32": "ours fp32",
                     "torch": "torch autocast bf16" if r.get("autocast_bf16") else "torch"}[impl]
            rows.append([str(run["threads"]), label, f"{r['step_ms']:.1f}",
                         f"{r['tokens_per_s']:,.0f}", fmt_ratio(speed),
                         fmt_ratio(run.get("speed_vs_fp32") if impl == "ours" else None),
                         f"{r['gemm_gflops']:.1f}", fmt(share and 100 * share, ".0f"),
                         fmt(peak_share and 100 * peak_share, ".0f"),
                         f"{r['peak_rss_mb']:.0f}", fmt_ratio(r.get("scaling"))])
        g = run["numpy_gemm"]
        if "error" in g:
            errors.append(f"NumPy GEMMs at {run['threads']} thread(s): {g['error']}")
        else:
            peak_share = g.get("share_of_fma_peak")
            rows.append([str(run["threads"]), "NumPy @ (GEMMs only)", f"{g['gemm_ms']:.1f}",
                         "-", "-", "-", f"{g['gemm_gflops']:.1f}", "100",
                         fmt(peak_share and 100 * peak_share, ".0f"), "-", "-"])
    print(format_table(headers, rows))
    print("speed vs torch = torch ms / ours ms; % of NumPy @ = NumPy's time for the step's "
          "GEMMs / the whole step's time; % of FMA peak = the step's GEMM FLOPs per second "
          "against the cores' peak FMA rate")
    for run in doc["runs"]:
        if run.get("fma_peak_gflops"):
            print(f"FMA peak at {run['threads']} thread(s) ({run['ours']['fma_peak_isa']} "
                  f"vectors, measured in this run): {run['fma_peak_gflops']:.1f} GFLOP/s; "
                  f"at that rate the step's GEMMs alone take {run['gemm_floor_ms']:.1f} ms, "
                  "a floor for any implementation")
        elif run["ours"].get("fma_peak_error"):
            print(f"FMA peak: not measured ({run['ours']['fma_peak_error']})")
        ours = run["ours"]
        if ours.get("bf16_peak_gflops") and "gemm_gflops" in ours:
            floor = run["gemm_floor_ms"] * run["fma_peak_gflops"] / ours["bf16_peak_gflops"] \
                if run.get("fma_peak_gflops") else None
            print(f"bf16 peak at {run['threads']} thread(s) ({ours['bf16_peak_isa']}, measured "
                  f"in this run): {ours['bf16_peak_gflops']:.1f} GFLOP/s; our bf16 step's GEMM "
                  f"FLOPs run at {100 * ours['gemm_gflops'] / ours['bf16_peak_gflops']:.0f}% of "
                  "it" + (f"; the GEMMs alone would take {floor:.1f} ms at that rate" if floor
                          else ""))
    for line in errors:
        print(f"error: {line}")
    for run in doc["runs"]:
        profile = run["ours"].get("profile")
        if profile:
            print()
            print(f"where our step's time goes at {run['threads']} thread(s) "
                  f"(mean of {doc['repeat']} profiled steps):")
            print(format_profile(profile))


PHASES = ("forward", "backward", "optimizer", "other")


def format_profile(profile):
    step_ms = profile["step_ms"]
    kernels = sorted(profile["kernels"], key=lambda r: (PHASES.index(r["phase"]), -r["ms"]))
    rows = [[r["phase"], r["kernel"], f"{r['calls']:.0f}", f"{r['ms']:.2f}",
             f"{100 * r['ms'] / step_ms:.1f}"] for r in kernels]
    in_kernels = sum(r["ms"] for r in kernels)
    for phase in PHASES:
        phase_ms = sum(r["ms"] for r in kernels if r["phase"] == phase)
        if phase_ms:
            rows.append([phase, "(all kernels)", "-", f"{phase_ms:.2f}",
                         f"{100 * phase_ms / step_ms:.1f}"])
    outside = step_ms - in_kernels
    rows += [["step", "kernels", "-", f"{in_kernels:.2f}", f"{100 * in_kernels / step_ms:.1f}"],
             ["step", "outside kernels (Python, NumPy copies)", "-", f"{outside:.2f}",
              f"{100 * outside / step_ms:.1f}"],
             ["step", "total", "-", f"{step_ms:.2f}", "100.0"]]
    return format_table(["phase", "kernel", "calls", "ms/step", "% of step"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default=None,
                        help="comma-separated thread counts to sweep (default: one per physical core)")
    parser.add_argument("--repeat", type=int, default=10, help="timed steps per implementation")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    parser.add_argument("--profile", action="store_true", help="time each kernel of our step")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--quick", action="store_true", help="tiny model, one step (smoke test)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="our step's Config.precision (bf16: also our fp32 step, and "
                             "PyTorch under autocast bf16)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="V, the model's vocabulary (e.g. 2048 or 8192 for a BPE model)")
    # Internal: this script re-invoked to measure one implementation in its own process.
    parser.add_argument("--worker", choices=("ours", "ours_fp32", "torch", "blas"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--config-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.worker:
        # No randygpt import here: the PyTorch worker must not load our OpenMP runtime.
        args.threads = parse_threads(args.threads)
        return worker_main(args)
    import randygpt

    usable = randygpt._kernels.usable_cpus()
    try:
        args.threads = (parse_threads(args.threads) if args.threads
                        else [randygpt._kernels.physical_cores()])
    except ValueError as e:
        parser.error(str(e))
    too_many = [n for n in args.threads if n > usable]
    if too_many:
        parser.error(f"--threads {too_many[0]} exceeds the {usable} usable CPUs")

    cfg = make_config(args.quick).replace(precision=args.precision)
    if args.vocab_size is not None:
        try:
            cfg = cfg.replace(vocab_size=args.vocab_size)
        except ValueError as e:
            parser.error(str(e))
    repeat = 1 if args.quick else args.repeat
    with_torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    runs = measure(cfg, args.threads, repeat, args.profile, with_torch)
    doc = {"machine": machine_info(",".join(map(str, args.threads))), "config": cfg.to_dict(),
           "num_params": runs[0]["ours"].get("num_params"), "repeat": repeat,
           "gemm_gflop_per_step": step_gemm_flops(cfg) / 1e9, "torch": with_torch,
           "runs": runs}
    if not with_torch and not args.no_torch:
        doc["torch_skipped"] = "PyTorch is not installed"
    if args.json:
        print(dump_json(doc))
    else:
        print_report(doc)
        if doc.get("torch_skipped"):
            print(f"torch: skipped ({doc['torch_skipped']})")
    return 1 if any("error" in run["ours"] for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
