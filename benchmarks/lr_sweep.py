"""Learning-rate sweep on Tiny Shakespeare: train the default model at several peak learning
rates and report the validation loss, to choose Config.lr by measurement.

    python benchmarks/lr_sweep.py --iters 2000 --lrs 3e-4,1e-3,2e-3 [--jobs 2 --threads 1]
    python benchmarks/lr_sweep.py --iters 500 --data ../shared/data/tinyshakespeare.txt

Each learning rate is one ordinary training run (`python -m randygpt ITERS --lr LR`) in its
own process and run directory, so the numbers are exactly what a user gets. Two numbers per
run: the trainer's final estimate (the mean over --eval-iters random validation batches of 32
windows) and `randygpt eval` over the whole validation split (every position predicted once).
With --jobs 2 --threads 1 two runs share a 2-core machine; results do not depend on threads.
"""
import argparse
import concurrent.futures as cf
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def _run_one(lr, args, out_root):
    out = out_root / f"lr_{lr:g}"
    cmd = [sys.executable, "-m", "randygpt", str(args.iters), "--lr", repr(lr), "--out", str(out),
           "--data", str(args.data), "--no-sample", "--eval-every", str(args.eval_every),
           "--log-every", "50", "--threads", str(args.threads), "--save-every", "0"]
    if args.extra:
        cmd += args.extra.split()
    t0 = time.perf_counter()
    log = out_root / f"lr_{lr:g}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=out_root).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        return {"lr": lr, "error": f"training exited {rc}; see {log}"}
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["val_loss"]]
    ev = subprocess.run([sys.executable, "-m", "randygpt", "eval", "--checkpoint",
                         str(out / "ckpt.npz"), "--data", str(args.data)],
                        capture_output=True, text=True, cwd=out_root)
    m = re.search(r"val loss ([0-9.]+)", ev.stdout)
    return {"lr": lr, "iters": args.iters, "val_estimate": float(rows[-1]["val_loss"]),
            "train_estimate": float(rows[-1]["train_loss"]) if rows[-1]["train_loss"] else None,
            "val_full_split": float(m.group(1)) if m else None, "seconds": round(seconds, 1),
            "curve": [(int(r["iter"]), float(r["val_loss"])) for r in rows]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--lrs", default="3e-4,1e-3,2e-3", help="comma-separated peak learning rates")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--jobs", type=int, default=1, help="runs at the same time")
    p.add_argument("--threads", type=int, default=-1, help="kernel threads per run")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--out", type=Path, default=Path("runs") / "lr_sweep")
    p.add_argument("--extra", default="", help="more training flags, e.g. '--n-layer 2'")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not args.data.is_file():
        p.error(f"no such data file: {args.data}")
    lrs = [float(s) for s in args.lrs.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    env_note = f"threads/run={args.threads} jobs={args.jobs}"
    with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda lr: _run_one(lr, args, args.out.resolve()), lrs))
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"LR sweep: {args.iters} iterations, data {args.data.name}, {env_note}")
    print(f"{'peak LR':>8} | {'val (estimate)':>14} | {'val (full split)':>16} | {'time':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['lr']:>8g} | {r['error']}")
            continue
        print(f"{r['lr']:>8g} | {r['val_estimate']:>14.4f} | {r['val_full_split']:>16.4f} | "
              f"{r['seconds']:>6.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
