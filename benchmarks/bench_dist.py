"""Time randygpt's gradient averaging over MPI ranks against MPI's own Allreduce.

Usage:
    python benchmarks/bench_dist.py [--ranks 2[,3...]] [--repeat R] [--floats N] [--step]
                                    [--json] [--quick] [--mpiexec PATH] [--no-bind]

    --ranks LIST  rank counts to launch, one job each (default 2)
    --repeat R    timed samples of each operation; medians are reported (default 20)
    --floats N    gradient length (default: the default Config's parameter count, 4,769,280)
    --step        also time one forward + backward of each rank's share of the default batch
                  (B=32 / K rows, T=64, dropout on) at default_threads() per rank, so the
                  table shows the share of a step the reduction takes; --ranks 1,2 compares
                  1 rank x all cores with K ranks x cores/K (no optimizer update: the same
                  in both)
    --json        print one JSON document instead of the tables
    --quick       8,192 floats, 3 samples: a smoke test, not a measurement
    --mpiexec P   the launcher (default: the one next to this Python, else on PATH)
    --no-bind     do not pass MPICH's "-bind-to core" to jobs of 2+ ranks (needed for
                  another MPI's mpiexec; unbound ranks' threads collide)

Run plainly, the script launches `mpiexec -n K python bench_dist.py --worker ...` for every K
and reads rank 0's JSON. Under a launcher of your own (`mpiexec -n 4 -hosts a,b python
benchmarks/bench_dist.py`), it is the worker itself and prints one job's table.

Each sample is the slowest rank's time for one call, after a barrier (a collective is done
when its last rank is); the operations are sampled round-robin, so load from other jobs on
the machine hits them alike. Before timing, average_grads is checked against a float32
rank-order mean of every rank's gradient (every rank regenerates all inputs from their seeds),
and the table says how many elements Allreduce's sum differs from it in.

Bandwidth: "algbw" is the gradient's bytes over the time; "busbw" scales it by 2(K-1)/K, the
share of the buffer each rank must send and receive at least once in any allreduce, so it
is comparable across rank counts and with a link's nominal rate.
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from randygpt import distributed
from randygpt.config import Config
from randygpt.model import GPT, ParamTable

from _common import dump_json, fmt, format_machine, format_table, machine_info

QUICK_FLOATS = 8192
STEP_BATCH = 32   # the default Config's global batch


def default_floats():
    return ParamTable(Config()).total


def rank_gradient(rank, n):
    return np.random.default_rng(1000 + rank).standard_normal(n).astype(np.float32)


def check_against_reference(comm, n):
    """Average once, compare with the rank-order mean; the result, for Allreduce's."""
    acc = rank_gradient(0, n)
    for r in range(1, comm.size):
        acc += rank_gradient(r, n)
    expected = acc / np.float32(comm.size)
    got = rank_gradient(comm.rank, n)
    comm.average_grads(got)
    if got.tobytes() != expected.tobytes():
        raise AssertionError(f"average_grads differs from the rank-order mean in "
                             f"{int(np.sum(got != expected))} of {n} elements")
    return expected


def timed(world, fn, prepare):
    """The slowest rank's seconds for one fn() after prepare(), both after a barrier."""
    prepare()
    world.Barrier()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(world.allgather(dt))


def step_fn(comm):
    """(model, run): run() is one forward + backward of this rank's share of the batch."""
    cfg = Config()
    model = GPT(cfg, n_threads=distributed.default_threads(comm))
    rows = comm.batch_slice(STEP_BATCH)
    tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, (STEP_BATCH, cfg.block_size + 1))
    x = np.ascontiguousarray(tokens[rows, :-1], dtype=np.int32)
    y = np.ascontiguousarray(tokens[rows, 1:], dtype=np.int32)

    def run():
        model.forward(x, y, step=1)
        model.backward()

    return model, run


def worker(args):
    """One job: rank 0 returns the measurements (other ranks None)."""
    # Imported here: the driver process (which only launches jobs) must not start MPI.
    from mpi4py import MPI

    comm = distributed.init(force=True)
    world = MPI.COMM_WORLD
    with distributed.abort_on_error(comm):
        n = args.floats
        expected = check_against_reference(comm, n)
        mine = rank_gradient(comm.rank, n)
        buf = np.empty_like(mine)
        allreduced = mine.copy()
        world.Allreduce(MPI.IN_PLACE, allreduced, op=MPI.SUM)
        np.divide(allreduced, comm.size, out=allreduced)
        differ = int(np.sum(allreduced != expected))

        def refill():
            np.copyto(buf, mine)

        def allreduce():
            world.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            np.divide(buf, comm.size, out=buf)

        ops = {"average_grads": lambda: comm.average_grads(buf),
               "Allreduce + divide": allreduce,
               "any (stop flag)": lambda: comm.any(False),
               "check_identical": lambda: comm.check_identical(expected)}
        prepares = {name: refill for name in ops}
        threads = None
        if args.step:
            model, run = step_fn(comm)
            ops["forward + backward"], prepares["forward + backward"] = run, lambda: None
            threads = model.n_threads
        for name in ops:  # warm-up: first calls allocate plans and fault pages in
            timed(world, ops[name], prepares[name])
        samples = {name: [] for name in ops}
        for _ in range(args.repeat):
            for name in ops:
                samples[name].append(timed(world, ops[name], prepares[name]))
    if not comm.is_root:
        return None
    return {"ranks": comm.size, "hosts": comm.hosts,
            "mpi": MPI.Get_library_version().strip().splitlines()[0], "floats": n, "repeat": args.repeat,
            "threads_per_rank": threads, "allreduce_elements_differing": differ,
            "ops": {name: {"median_s": statistics.median(s), "min_s": min(s)}
                    for name, s in samples.items()}}


def find_mpiexec(given):
    if given:
        return given
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.is_file() else shutil.which("mpiexec")


def launch(args, n_ranks):
    mpiexec = find_mpiexec(args.mpiexec)
    if mpiexec is None:
        sys.exit('error: no mpiexec found: pip install "randygpt[mpi]" or pass --mpiexec')
    bind = [] if args.no_bind or n_ranks == 1 else ["-bind-to", "core"]
    cmd = [mpiexec, "-n", str(n_ranks), *bind, sys.executable, __file__, "--worker",
           "--repeat", str(args.repeat), "--floats", str(args.floats)] + (["--step"] * args.step)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: the {n_ranks}-rank job failed (exit {proc.returncode}):\n"
                 f"{proc.stderr.strip()}")
    return json.loads(proc.stdout)


def reduction_rows(jobs):
    rows = []
    for job in (j for j in jobs if j["ranks"] > 1):  # one rank has nothing to reduce
        nbytes = 4 * job["floats"]
        K = job["ranks"]
        for name in ("average_grads", "Allreduce + divide"):
            op = job["ops"][name]
            algbw = nbytes / op["median_s"] / 1e9
            busbw = algbw * 2 * (K - 1) / K
            differ = "0" if name == "average_grads" else str(job["allreduce_elements_differing"])
            rows.append([str(K), name, f"{job['floats']:,}", f"{nbytes / 1e6:.1f}",
                         f"{op['median_s'] * 1e3:.2f}", f"{op['min_s'] * 1e3:.2f}",
                         f"{algbw:.2f}", f"{busbw:.2f}", differ])
        for name in ("any (stop flag)", "check_identical"):
            op = job["ops"][name]
            rows.append([str(K), name, "-", "-", f"{op['median_s'] * 1e3:.3f}",
                         f"{op['min_s'] * 1e3:.3f}", "-", "-", "-"])
    return rows


def step_rows(jobs):
    rows = []
    for job in jobs:
        compute = job["ops"]["forward + backward"]["median_s"]
        reduce = job["ops"]["average_grads"]["median_s"] if job["ranks"] > 1 else 0.0
        step = compute + reduce
        rows.append([str(job["ranks"]), str(job["threads_per_rank"]), f"{compute * 1e3:.1f}",
                     f"{reduce * 1e3:.1f}", f"{step * 1e3:.1f}", f"{100 * reduce / step:.1f}%",
                     fmt(STEP_BATCH * 64 / step / 1e3, ".1f") + "k"])
    return rows


def print_tables(jobs, info):
    print(format_machine(info))
    print(f"MPI      : {jobs[0]['mpi']}")
    for job in jobs:
        per_rank = job["threads_per_rank"]
        print(f"job      : {job['ranks']} rank(s) on {job['hosts']} host(s)"
              + (f", {per_rank} kernel thread(s) per rank" if per_rank else ""))
    print("\nGradient averaging: median of", jobs[0]["repeat"], "samples, slowest rank each\n")
    print(format_table(["ranks", "operation", "floats", "MB", "median ms", "min ms",
                        "algbw GB/s", "busbw GB/s", "differ from rank-order mean"],
                       reduction_rows(jobs)))
    if "forward + backward" in jobs[0]["ops"]:
        print("\nOne step without the optimizer: forward + backward of B/K rows "
              "(B=32, T=64), then average_grads\n")
        print(format_table(["ranks", "threads/rank", "fwd+bwd ms", "reduce ms", "step ms",
                            "reduce share", "tok/s"], step_rows(jobs)))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="2")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--floats", type=int, default=None)
    p.add_argument("--step", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--mpiexec", default=None)
    p.add_argument("--no-bind", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step and args.floats not in (None, default_floats()):
        p.error("--step times the default model, whose gradient has "
                f"{default_floats():,} floats: leave --floats out")
    if args.quick:
        args.repeat = min(args.repeat, 3)
        if not args.step:
            args.floats = args.floats or QUICK_FLOATS
    args.floats = args.floats or default_floats()
    try:
        args.ranks = [int(k) for k in args.ranks.split(",")]
    except ValueError:
        p.error(f"--ranks must be comma-separated integers, got {args.ranks!r}")
    if args.repeat < 1 or args.floats < 1 or any(k < 1 for k in args.ranks):
        p.error("--repeat, --floats and --ranks must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker or distributed.launched_by_mpi():
        job = worker(args)
        if job is None:      # not rank 0
            return
        jobs = [job]
    else:
        jobs = [launch(args, k) for k in args.ranks]
    if args.worker:
        print(json.dumps(jobs[0]))
        return
    # The header's thread count: the kernels' per rank (1 when no step ran them).
    info = machine_info(max(j["threads_per_rank"] or 1 for j in jobs))
    if args.json:
        print(dump_json({"machine": info, "jobs": jobs}))
    else:
        print_tables(jobs, info)


if __name__ == "__main__":
    main()
