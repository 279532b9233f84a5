"""The paper model of data-parallel scaling in README's "More than one machine": the step
time over K ranks is the compute of one rank's share plus the gradient reduction,

    T(K) = C / K + 2 (K - 1) / K * S / bw + 2 (K - 1) * a

C the step's compute on one rank, S the gradient's bytes (4 per parameter), bw a link's
bandwidth and a its per-message latency (the reduce-scatter by hand sends K - 1 messages each
way, then the all-gather as many). Efficiency is C / (K T(K)). Nothing here is measured:
the inputs are stated, so the table can be redone for another machine.

    python benchmarks/scaling_model.py [--compute-s SECONDS] [--json]
"""
import argparse
import json

# (name, bandwidth in bytes/s, latency in s): effective figures, below the links' nominal rates.
LINKS = [("shared memory", 5.0e9, 2e-6), ("10 GbE", 1.1e9, 30e-6), ("100 Gb InfiniBand", 11e9, 3e-6)]
RANKS = [1, 2, 4, 8, 16, 32, 64]


def step_time(compute_s, n_bytes, ranks, bandwidth, latency):
    if ranks == 1:
        return compute_s
    return (compute_s / ranks + 2 * (ranks - 1) / ranks * n_bytes / bandwidth
            + 2 * (ranks - 1) * latency)


def table(compute_s, n_params):
    n_bytes = 4 * n_params
    rows = []
    for name, bw, lat in LINKS:
        for k in RANKS:
            t = step_time(compute_s, n_bytes, k, bw, lat)
            rows.append({"link": name, "ranks": k, "step_s": t, "speedup": compute_s / t,
                         "efficiency": compute_s / (k * t)})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compute-s", type=float, default=1.2,
                   help="one rank's step of the default model at --batch-size 128, in seconds "
                        "(default 1.2: 4x the ~0.3 s of a 32-window step on one 2-core rank here)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    # The default model (4,769,280 parameters) at --batch-size 128, and --n-embd 768
    # --n-layer 12 (85,086,720 parameters, about 17.8x the FLOPs per token) at the same batch.
    c = args.compute_s
    models = [("default, batch 128", c, 4_769_280),
              ("n_embd 768, n_layer 12, batch 128", c * 17.8, 85_086_720)]
    out = {name: table(c, n) for name, c, n in models}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for name, rows in out.items():
        print(f"\n{name}: speed-up over one rank (efficiency)")
        print("| link | " + " | ".join(f"K={k}" for k in RANKS) + " |")
        print("|---|" + "---|" * len(RANKS))
        for link, *_ in LINKS:
            cells = [f"{r['speedup']:.1f}x ({r['efficiency']:.0%})" for r in rows if r["link"] == link]
            print(f"| {link} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
