"""A bounded load test of ``randygpt serve`` on loopback: streamed completions from 1, 4 and 16
concurrent clients, a fixed number of requests at each level.

Usage:
    python benchmarks/bench_serve.py [--checkpoint PATH] [--clients LIST] [--requests N]
                                     [--max-tokens N] [--workers N] [--threads N] [--json]
                                     [--quick]

    --checkpoint PATH  the model to serve (default: the default Config, 4.77M parameters, random
                       weights that never sample EOS; speed does not depend on the weights)
    --clients LIST     comma-separated concurrency levels (default 1,4,16)
    --requests N       requests per level (default: 2 per client, at least 8)
    --max-tokens N     tokens per request (default 200: past the 64-token window, so the cache
                       rebuilds after each slide are included)
    --workers N        the server's --workers (default: its own, one per usable CPU)
    --threads N        the server's --threads, kernel threads per generation (default 1)
    --json             print one JSON document instead of the table
    --quick            a tiny model, few requests: a smoke test, not a measurement

The server runs in a subprocess on a free loopback port (--port 0); the clients are asyncio
tasks on one httpx.AsyncClient in this process, each sending its next request as soon as the
last one ends, with stream=true and temperature 0.8, top-p 0.9. Per level it reports the total
tokens/s (tokens received / wall time of the level), the time to first token (request sent ->
first token received) and the per-token latency (the gap between consecutive tokens of one
stream) as percentiles, and the errors (non-200 answers, broken streams, time-outs), which must
be 0: the script exits 1 otherwise. The server's queue is sized to hold every client, so no
request should meet a 503.
"""
import argparse
import asyncio
import json
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import dump_json, fmt, format_machine, format_table, machine_info
import httpx  # noqa: E402  (the [test] extra)
from randygpt.checkpoint import save  # noqa: E402
from randygpt.config import Config  # noqa: E402
from randygpt.model import GPT  # noqa: E402
from randygpt.tokenizer import CharTokenizer  # noqa: E402

# 65 distinct characters: the default vocab_size of 67 with BOS and EOS.
CHARS = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
PROMPT = "ROMEO:"
REQUEST_TIMEOUT_S = 120


def write_model(path, quick):
    """A randomly initialised model that never samples EOS, so that every request runs its
    full max_tokens: residual channel 0 holds 1 at every position (wpe writes it, no layer
    does) and EOS's row of lm_head reads only that channel, with weight -100."""
    tok = CharTokenizer(sorted(CHARS))
    config = (Config(vocab_size=tok.vocab_size, n_embd=32, n_head=2, n_layer=1, block_size=32)
              if quick else Config(vocab_size=tok.vocab_size))
    model = GPT(config, seed=1337)
    p = model.params
    p["wte"][:, 0], p["wpe"][:, 0] = 0.0, 1.0
    for i in range(config.n_layer):
        p[f"h.{i}.wo"][0], p[f"h.{i}.fc2"][0] = 0.0, 0.0
    p["lm_head"][tok.EOS] = 0.0
    p["lm_head"][tok.EOS, 0] = -100.0
    save(path, model=model, optimizer=None, tokenizer=tok, step=0, rng_state=None)


def start_server(checkpoint, queue, workers, threads):
    cmd = [sys.executable, "-m", "randygpt", "serve", "--checkpoint", str(checkpoint), "--port",
           "0", "--queue", str(queue), "--threads", str(threads)]
    if workers:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    found = re.search(r"(http://\S+?)/ \| .*\| (\d+) workers x (\d+) threads", line)
    if not found:
        proc.kill()
        raise SystemExit(f"bench_serve: the server did not start ({line!r})")
    return proc, found.group(1), int(found.group(2))


async def one_request(client, max_tokens, seed):
    """(time to first token s, [gaps between tokens s], tokens, error or None)."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "seed": seed, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return None, [], 0, f"HTTP {r.status_code}"
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return None, [], len(stamps), chunk["error"]["message"]
                if chunk["choices"][0]["finish_reason"] is None:
                    stamps.append(time.perf_counter())
            if not done:
                return None, [], len(stamps), "stream ended without [DONE]"
    except (httpx.HTTPError, ValueError) as e:
        return None, [], len(stamps), f"{type(e).__name__}: {e}"
    ttft = stamps[0] - t0 if stamps else None
    return ttft, list(np.diff(stamps)), len(stamps), None


async def run_level(url, clients, requests, max_tokens):
    """Every request of one concurrency level; returns the level's summary."""
    pending = iter(range(requests))
    results = []

    async def client_loop(client):
        for seed in pending:  # shared: each client takes the next request number
            results.append(await one_request(client, max_tokens, seed))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT_S, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results if r[0] is not None]
    gaps = [g for r in results for g in r[1]]
    tokens = sum(r[2] for r in results)
    errors = [r[3] for r in results if r[3] is not None]
    return {"clients": clients, "requests": requests, "tokens": tokens, "wall_s": wall,
            "tok_per_s": tokens / wall, "ttft_ms": percentiles(ttfts),
            "token_latency_ms": percentiles(gaps), "errors": len(errors),
            "first_error": errors[0] if errors else None}


def percentiles(seconds):
    if not seconds:
        return {"p50": None, "p90": None, "p99": None}
    ms = np.asarray(seconds) * 1e3
    return {f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}


def table(levels):
    rows = []
    for lv in levels:
        t, g = lv["ttft_ms"], lv["token_latency_ms"]
        rows.append([str(lv["clients"]), str(lv["requests"]), f"{lv['tokens']:,}",
                     fmt(lv["tok_per_s"], ",.0f"),
                     " / ".join(fmt(t[k], ".0f") for k in ("p50", "p90", "p99")),
                     " / ".join(fmt(g[k], ".2f") for k in ("p50", "p90", "p99")),
                     str(lv["errors"])])
    return format_table(["clients", "requests", "tokens", "tok/s total",
                         "first token ms p50/p90/p99", "per-token ms p50/p90/p99", "errors"],
                        rows)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    try:
        args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        p.error(f"--clients must be comma-separated integers, got {args.clients!r}")
    if not args.clients or min(args.clients) < 1:
        p.error("--clients needs at least one level, each >= 1")
    if args.quick:
        args.max_tokens = min(args.max_tokens, 40)
    return args


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = Path(tmp) / "model.npz"
            write_model(checkpoint, args.quick)
        proc, url, workers = start_server(checkpoint, max(args.clients), args.workers,
                                          args.threads)
        try:
            levels = []
            for clients in args.clients:
                n = args.requests or (clients if args.quick else max(8, 2 * clients))
                levels.append(asyncio.run(run_level(url, clients, n, args.max_tokens)))
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    info = machine_info(args.threads)
    setup = {"checkpoint": str(args.checkpoint or "default Config, random weights"),
             "max_tokens": args.max_tokens, "workers": workers, "threads_per_generation":
             args.threads, "prompt": PROMPT}
    if args.json:
        print(dump_json({"machine": info, "setup": setup, "levels": levels}))
    else:
        print(format_machine(info))
        print(f"server   : {workers} workers x {args.threads} kernel thread(s), "
              f"{args.max_tokens} tokens per request, streamed, prompt {PROMPT!r}")
        print()
        print(table(levels))
    errors = sum(lv["errors"] for lv in levels)
    if errors:
        first = next(lv["first_error"] for lv in levels if lv["errors"])
        print(f"FAIL: {errors} request(s) failed; the first: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
