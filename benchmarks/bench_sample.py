"""Tokens per second of sampling, with the decode cache and without it, on the default model size.

Usage:
    python benchmarks/bench_sample.py [--tokens N] [--repeat R] [--threads LIST] [--json] [--quick]

    --tokens N       new tokens per timed generation (default 200: past the 64-token context, so
                     the cache rebuilds after each slide are included, as in real use)
    --repeat R       timed samples per mode; the median is reported (default 3)
    --threads LIST   comma-separated thread counts, each timed for every mode (default 1,2)
    --json           print one JSON document instead of the tables
    --quick          a tiny model and few tokens: a smoke test, not a measurement

The model is the default Config (L=6, C=256, 8 heads, T=64, vocab 67, 4.77M parameters) with
its random initialisation: speed does not depend on the weights. Each step draws the next
token at temperature 0.8, top-p 0.9, so the sampling itself is timed too. Modes:

  kv-cache     incremental decoding (model.decode on a DecodeCache), as randygpt.sample does
  no cache     model.forward over the whole window for every new token

A second table times one decode step alone: one token appended to a cache holding
3/4 block_size tokens (the cache is cut back before each call), the number the decoding thread
count in randygpt.sample is chosen by.

Before timing, the cached logits are checked against model.forward on the same window for
block_size + block_size // 2 + 2 steps (across one slide), to rtol 1e-5 plus 1e-5 of the
largest logit; a mismatch prints FAIL and exits with status 1.
"""
import argparse
import sys

import numpy as np

from _common import (SPIN_SETTLE_S, dump_json, fmt, format_machine, format_table, machine_info,
                     parse_threads, time_interleaved)
import randygpt  # noqa: E402  (after _common, which puts the checkout on sys.path)
from randygpt.config import Config  # noqa: E402
from randygpt.model import GPT  # noqa: E402
from randygpt.sample import ContextWindow, sample_token  # noqa: E402

PROMPT_IDS = [20, 41, 35, 29, 41, 12]  # any ids in the vocabulary will do
SEED = 1337
MODES = (("kv-cache", True), ("no cache", False))
RTOL = 1e-5


def generate_ids(model, n_tokens, use_cache, n_threads, rng):
    """The inner loop of randygpt.sample.generate, without the text: n_tokens new ids."""
    window = ContextWindow(model, use_cache=use_cache, n_threads=n_threads)
    logits = window.start(PROMPT_IDS)
    out = []
    for _ in range(n_tokens):
        token = sample_token(logits, 0.8, 0.9, None, rng)
        out.append(token)
        logits = window.push(token)
    return out


def check(model):
    """Worst error of the cached logits vs model.forward on the same window, in units of the
    tolerance; <= 1 passes. The steps cross one slide of the window."""
    window = ContextWindow(model, use_cache=True, n_threads=1)
    logits = window.start(PROMPT_IDS)
    rng = np.random.default_rng(0)
    worst = 0.0
    T = model.config.block_size
    for _ in range(T + T // 2 + 2):
        expected = model.forward(np.array([window.tokens], dtype=np.int32))[0, -1]
        tol = RTOL * np.abs(expected) + RTOL * np.abs(expected).max()
        worst = max(worst, float((np.abs(logits - expected) / tol).max()))
        logits = window.push(int(rng.integers(2, model.config.vocab_size)))
    return worst


def step_fn(model, n_threads):
    """One decode step: a token appended at position 3/4 block_size of a filled cache."""
    T = model.config.block_size
    cache = model.new_cache(n_threads)
    model.decode(np.array(PROMPT_IDS * T, dtype=np.int32)[:3 * T // 4], cache)
    length = cache.length
    token = np.array([PROMPT_IDS[0]], dtype=np.int32)

    def step():
        cache.length = length  # drop the token of the previous call
        model.decode(token, cache)
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.tokens < 1 or args.repeat < 1:
        parser.error("--tokens and --repeat must be positive")
    try:
        requested = parse_threads(args.threads)
    except ValueError as e:
        parser.error(str(e))
    # Counts as they will run (capped at the usable CPUs), each once.
    threads = list(dict.fromkeys(randygpt.effective_n_threads(n) for n in requested))

    config = Config()
    if args.quick:
        config = config.replace(n_embd=32, n_head=4, n_layer=2, block_size=16)
        args.tokens, args.repeat = min(args.tokens, 40), 1
    model = GPT(config, seed=SEED, n_threads=max(threads))
    model.eval()

    worst = check(model)
    if worst > 1.0:
        print(f"FAIL kv-cache: cached logits differ from model.forward ({worst:.2f}x the "
              f"tolerance)", file=sys.stderr)
        return 1
    runs = [(name, c, nt) for nt in threads for name, c in MODES]

    def generation(c, nt):
        def run():
            model.n_threads = nt  # the no-cache mode's forward; the cache has its own count
            generate_ids(model, args.tokens, c, nt, np.random.default_rng(SEED))
        return run

    settle = SPIN_SETTLE_S if max(threads) > 1 and not args.quick else 0.0
    seconds = time_interleaved([generation(c, nt) for _, c, nt in runs], args.repeat, settle)
    step_seconds = time_interleaved([step_fn(model, nt) for nt in threads], args.repeat, settle)
    machine = machine_info(",".join(str(nt) for nt in threads))

    results = []
    for (name, _, nt), s in zip(runs, seconds):
        base = seconds[runs.index(("no cache", False, nt))]
        results.append({"mode": name, "threads": nt, "tokens": args.tokens, "seconds": s,
                        "tokens_per_s": args.tokens / s, "speedup_vs_no_cache": base / s,
                        "check_vs_forward": worst if name == "kv-cache" else None})
    steps = [{"threads": nt, "position": 3 * config.block_size // 4, "seconds": s,
              "steps_per_s": 1.0 / s} for nt, s in zip(threads, step_seconds)]
    shape = {"n_layer": config.n_layer, "n_embd": config.n_embd, "n_head": config.n_head,
             "block_size": config.block_size, "vocab_size": config.vocab_size,
             "params": model.num_params, "prompt_tokens": len(PROMPT_IDS),
             "new_tokens": args.tokens, "repeat": args.repeat, "quick": args.quick}
    if args.json:
        print(dump_json({"machine": machine, "shape": shape, "results": results,
                         "decode_step": steps}))
        return 0
    print(format_machine(machine))
    print(f"model    : L={config.n_layer} C={config.n_embd} NH={config.n_head} "
          f"T={config.block_size} V={config.vocab_size} ({model.num_params:,} parameters); "
          f"{len(PROMPT_IDS)}-token prompt, {args.tokens} new tokens, median of {args.repeat}")
    rows = [[r["mode"], str(r["threads"]), fmt(r["seconds"], ".3f"),
             fmt(r["tokens_per_s"], ",.0f"), fmt(r["speedup_vs_no_cache"], ".1f") + "x"]
            for r in results]
    print(format_table(["mode", "threads", "seconds", "tok/s", "vs no cache"], rows))
    print(f"\none decode step (1 token at position {steps[0]['position']}):")
    rows = [[str(s["threads"]), fmt(s["seconds"] * 1e6, ",.0f"), fmt(s["steps_per_s"], ",.0f")]
            for s in steps]
    print(format_table(["threads", "us", "steps/s"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
