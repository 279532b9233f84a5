"""Tokens per second of sampling, with and without the KV cache, on the default model size.

Usage:
    python benchmarks/bench_sample.py [--tokens N] [--repeat R] [--threads N] [--json] [--quick]

    --tokens N    new tokens per timed generation (default 200: past the 64-token context, so
                  the cache rebuilds after each slide are included, as in real use)
    --repeat R    timed generations per mode; the median is reported (default 3)
    --threads N   threads of model.forward in the no-cache mode (default 1, like for like
                  with the cached modes, which always run on one thread: see randygpt/sample.py)
    --json        print one JSON document instead of the table
    --quick       a tiny model and few tokens: a smoke test, not a measurement

The model is the default Config (L=6, C=256, 8 heads, T=64, vocab 67, 4.77M parameters) with
its random initialisation: speed does not depend on the weights. Each step draws the next
token at temperature 0.8, top-p 0.9, so the sampling itself is timed too. Modes:

  kv-cache           the default: incremental decoding, products through NumPy's BLAS on 1 thread
  kv-cache (kernel)  the same with randygpt's GEMM kernel at M = 1 row, n_threads = 1
  no cache           model.forward over the whole window for every new token

Before timing, each cached mode's logits are checked against model.forward on the same window
for 3 * block_size steps (rtol 1e-4); a mismatch prints FAIL and exits with status 1.
"""
import argparse
import sys

import numpy as np
from threadpoolctl import threadpool_limits

from _common import dump_json, fmt, format_machine, format_table, machine_info, time_interleaved
import randygpt  # noqa: E402  (after _common, which puts the checkout on sys.path)
from randygpt.config import Config  # noqa: E402
from randygpt.model import GPT  # noqa: E402
from randygpt.sample import ContextWindow, sample_token  # noqa: E402

PROMPT_IDS = [20, 41, 35, 29, 41, 12]  # any ids in the vocabulary will do
SEED = 1337

MODES = (
    # name, use_cache, use_kernel
    ("kv-cache", True, False),
    ("kv-cache (kernel)", True, True),
    ("no cache", False, False),
)


def generate_ids(model, n_tokens, use_cache, use_kernel, rng):
    """The inner loop of randygpt.sample.generate, without the text: n_tokens new ids."""
    window = ContextWindow(model, use_cache=use_cache, use_kernel=use_kernel)
    logits = window.start(PROMPT_IDS)
    out = []
    for _ in range(n_tokens):
        token = sample_token(logits, 0.8, 0.9, None, rng)
        out.append(token)
        logits = window.push(token)
    return out


def check(model, kernel_flags):
    """Worst error of cached logits vs model.forward on the same window, in units of the
    tolerance (rtol 1e-4 plus a small atol), for each use_kernel flag; <= 1 passes. The steps
    cross one slide of the window (block_size + block_size // 2 + 2 of them)."""
    windows = [ContextWindow(model, use_cache=True, use_kernel=k) for k in kernel_flags]
    logits = [w.start(PROMPT_IDS) for w in windows]
    rng = np.random.default_rng(0)
    worst = [0.0] * len(windows)
    T = model.config.block_size
    for _ in range(T + T // 2 + 2):
        expected = model.forward(np.array([windows[0].tokens], dtype=np.int32))[0, -1]
        tol = 1e-4 * np.abs(expected) + 1e-6 * np.abs(expected).max()
        token = int(rng.integers(2, model.config.vocab_size))
        for i, w in enumerate(windows):
            worst[i] = max(worst[i], float((np.abs(logits[i] - expected) / tol).max()))
            logits[i] = w.push(token)
    return worst


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeat < 1:
        parser.error("--tokens and --repeat must be positive")

    config = Config()
    if args.quick:
        config = config.replace(n_embd=32, n_head=4, n_layer=2, block_size=16)
        args.tokens, args.repeat = min(args.tokens, 40), 1
    n_threads = randygpt.effective_n_threads(args.threads)
    model = GPT(config, seed=SEED, n_threads=n_threads)
    model.eval()

    with threadpool_limits(1, user_api="blas"):
        cached = [(name, k) for name, c, k in MODES if c]
        checks = dict(zip([name for name, _ in cached], check(model, [k for _, k in cached])))
        bad = [name for name, worst in checks.items() if worst > 1.0]
        for name in bad:
            print(f"FAIL {name}: cached logits differ from model.forward "
                  f"({checks[name]:.2f}x the tolerance)", file=sys.stderr)
        if bad:
            return 1
        fns = [lambda c=c, k=k: generate_ids(model, args.tokens, c, k, np.random.default_rng(SEED))
               for _, c, k in MODES]
        seconds = time_interleaved(fns, args.repeat)
        machine = machine_info(n_threads)  # inside the limits: BLAS shows the 1 thread it ran on

    results = []
    base = seconds[[m[0] for m in MODES].index("no cache")]
    for (name, use_cache, use_kernel), s in zip(MODES, seconds):
        results.append({"mode": name, "threads": 1 if use_cache else n_threads,
                        "tokens": args.tokens, "seconds": s, "tokens_per_s": args.tokens / s,
                        "speedup_vs_no_cache": base / s,
                        "check_vs_forward": checks.get(name)})
    shape = {"n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
             "block_size": config.block_size, "vocab_size": config.vocab_size,
             "params": model.num_params, "prompt_tokens": len(PROMPT_IDS),
             "new_tokens": args.tokens, "repeat": args.repeat, "quick": args.quick}
    if args.json:
        print(dump_json({"machine": machine, "shape": shape, "results": results}))
        return 0
    print(format_machine(machine))
    print(f"model    : L={config.n_layer} C={config.n_embd} NH={config.n_head} "
          f"T={config.block_size} V={config.vocab_size} ({model.num_params:,} parameters); "
          f"{len(PROMPT_IDS)}-token prompt, {args.tokens} new tokens, median of {args.repeat}")
    rows = [[r["mode"], str(r["threads"]), fmt(r["seconds"], ".3f"), fmt(r["tokens_per_s"], ",.0f"),
             fmt(r["speedup_vs_no_cache"], ".1f") + "x"] for r in results]
    print(format_table(["mode", "threads", "seconds", "tok/s", "vs no cache"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
