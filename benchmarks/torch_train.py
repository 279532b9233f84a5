"""Train the PyTorch twin of randygpt's GPT (randygpt/torch_ref.py) with exactly randygpt's recipe,
so the two can be compared at the same seed and learning rate.

    python benchmarks/torch_train.py 5000 --lr 1e-3 --data PATH --threads 2 --out DIR
    python -m randygpt plot DIR          # the same plot as for a randygpt run

Flags are randygpt's training flags (every Config flag: --n-layer, --n-embd, --n-head,
--block-size, --batch-size, --dropout, --lr, --seed, ...) plus --threads, --data, --out,
--eval-every, --eval-iters, --log-every and --plot, with the same defaults. There is no
checkpoint, resume or sampling: the point is the loss curve.

What is the same as `python -m randygpt ITERS` with the same flags:
  - the initial weights: randygpt.GPT(config, seed=config.seed) draws them and
    torch_ref.load_params copies them, so both runs start from identical values;
  - the data: the same text resolution (--data, ./train.txt, the cached corpus, the built-in
    sample), tokenizer, 90/10 split, and batch positions from the same generator stream;
  - the recipe: lr_at's schedule, global-norm clipping at config.grad_clip
    (torch.nn.utils.clip_grad_norm_ scales by max_norm / (norm + 1e-6) when that is below 1,
    as optim.clip_scale does), torch.optim.AdamW with Config's betas, eps and weight decay,
    decay on matrices only;
  - the evaluation: train.estimate_loss itself, on the same evaluation stream and batch count, in
    eval mode, before the first step, every --eval-every iterations and after the last;
  - the output: the same log lines, metrics.csv with train.METRICS_HEADER, and config.json.

What differs:
  - dropout: torch's nn.Dropout draws its masks from torch's generator (torch.manual_seed(seed)),
    ours hash (seed, step, layer, site, element). With dropout > 0 the runs see different noise,
    so their curves agree statistically, not step by step;
  - arithmetic: both are float32, but the kernels add in different orders, so even with
    dropout 0 the losses agree to rounding (about 1e-7 relative over the first dozen steps of
    a tiny model, tests/test_torch_train.py), not bit for bit, and over a long run the
    rounding differences grow until the two curves agree only statistically;
  - speed: tok/s is torch's, in a process that also loaded our kernels' module (to build the
    initial weights; none of them is called), so use benchmarks/bench_train.py for timings.

Exit codes: 0 done; 1 the loss became non-finite; 2 bad input or no PyTorch; 130 Ctrl-C.
"""
import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from randygpt import cli, train
from randygpt.data import DataError, Dataset, resolve_source
from randygpt.optim import lr_at
from randygpt.tokenizer import CharTokenizer
from randygpt.train import METRICS_HEADER, RunOptions, RunResult, TrainError

PROG = "torch_train"
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130

__all__ = ["run", "main", "build_parser"]


class _EvalAdapter:
    """The interface train.estimate_loss uses (training, eval(), train(), forward(x, y) -> float)
    over the torch module, so the twin is evaluated by our estimate_loss itself."""

    def __init__(self, module, torch):
        self.module = module
        self._torch = torch

    @property
    def training(self):
        return self.module.training

    def eval(self):
        self.module.eval()

    def train(self):
        self.module.train()

    def forward(self, x, y):
        torch = self._torch
        with torch.no_grad():
            return float(self.module(torch.from_numpy(x).long(), torch.from_numpy(y).long()))


def _resolve_threads(requested):
    """Threads for torch, resolved as randygpt resolves its own (argument, RANDYGPT_NUM_THREADS,
    OMP_NUM_THREADS, physical cores; negative counts back from the CPUs), except that a randygpt
    built without OpenMP does not force torch down to one thread."""
    from randygpt._kernels import effective_n_threads, openmp_enabled, physical_cores, usable_cpus

    if openmp_enabled():
        return effective_n_threads(requested)
    cpus = usable_cpus()
    if requested is None:
        return physical_cores()
    n = cpus + 1 + requested if requested < 0 else requested
    return max(1, min(n, cpus))


def run(options, *, stdout=None, stderr=None):
    """Train the torch twin as train.run would train randygpt's GPT; returns a train.RunResult
    (checkpoint None: none is written).

    options: a train.RunOptions. Its Config fields come from ``options.overrides``; save_every,
    sample and sample_tokens do not apply; resume and stop_at are refused (TrainError).
    Raises TrainError or DataError (one-line messages) for bad input found before the first
    step; KeyboardInterrupt propagates with metrics.csv flushed up to the last row.
    """
    import torch

    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    log = train.Logger(out)
    opts = options
    if opts.resume is not None or opts.stop_at is not None:
        raise TrainError("the torch twin writes no checkpoints: resume and stop_at are not supported")

    config = train.build_config(opts.overrides)
    source = resolve_source(opts.data_path, opts.cache_dir, url=opts.data_url)
    tokenizer = CharTokenizer.from_text(source.text)
    config = train.build_config({}, vocab_size=tokenizer.vocab_size, base=config)
    dataset = Dataset(source.text, tokenizer, config.block_size)

    from randygpt.model import GPT
    from randygpt.torch_ref import build_torch_gpt, load_params

    n_threads = _resolve_threads(opts.n_threads)
    torch.set_num_threads(n_threads)
    # Seeds torch's dropout masks; the weights themselves are ours, loaded below.
    torch.manual_seed(config.seed)
    model = build_torch_gpt(config)
    load_params(model, GPT(config, seed=config.seed, n_threads=1).params)
    params = list(model.parameters())
    # Our decay rule: every matrix decays, vectors (LayerNorm gains and biases) do not.
    groups = [{"params": [p for p in params if p.dim() == 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() != 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2),
                                  eps=config.adam_eps)
    # train.py's generators, as train.run derives them (it has no helper to call for this).
    batch_rng = np.random.default_rng([config.seed, train.BATCH_STREAM])
    eval_rng_seed = [config.seed, train.EVAL_STREAM]

    out_dir = Path(opts.out_dir) if opts.out_dir is not None else \
        Path("runs") / ("torch-" + train.default_out_dir().name)
    out_dir = train.prepare_out_dir(out_dir)
    if (out_dir / "ckpt.npz").exists():
        raise TrainError(f"{str(out_dir)!r} holds a randygpt run (ckpt.npz); its metrics.csv "
                         "would be overwritten: choose another --out")

    if source.warning:
        print(f"{PROG}: warning: {source.warning}", file=err, flush=True)
    log.line(f"{PROG}: the PyTorch {torch.__version__} twin, trained with randygpt's recipe")
    log.line("Config: " + " ".join(f"{k}={v}" for k, v in config.to_dict().items()))
    log.line(f"Parameters: {sum(p.numel() for p in params):,}")
    log.line(f"Data: {source.description}; train {len(dataset.train):,} / val {len(dataset.val):,} "
             f"tokens; vocab {tokenizer.vocab_size}")
    log.line(f"torch threads={torch.get_num_threads()}")
    log.line(f"Iterations: 0 -> {opts.iters}; output: {out_dir}")
    run_info = {"impl": "torch", "torch": torch.__version__, "config": config.to_dict(),
                "tokenizer": tokenizer.to_dict(), "data": source.description,
                "iters": opts.iters, "n_threads": n_threads,
                "options": {k: v for k, v in dataclasses.asdict(opts).items()
                            if k in ("eval_every", "log_every", "eval_iters", "data_path")}}
    with open(out_dir / "config.json", "w") as f:
        json.dump(run_info, f, indent=2, default=str)
        f.write("\n")

    B, T = config.batch_size, config.block_size
    evaluable = _EvalAdapter(model, torch)

    def evaluate():
        # A fresh generator each time, as train.run does: every estimate scores the same batches.
        return train.estimate_loss(evaluable, dataset, B, opts.eval_iters,
                                   np.random.default_rng(eval_rng_seed))

    losses = []
    final_estimate = None
    diverged = None
    step = 0
    metrics_file, metrics = train.open_metrics(out_dir / "metrics.csv", None)
    try:
        model.train()
        first_estimate = evaluate()
        last_val = best_val = first_estimate["val"]
        log.line(f"Initial loss estimate: train {first_estimate['train']:.4f} | "
                 f"val {first_estimate['val']:.4f}")
        metrics.writerow(train.metrics_row(0, first_estimate["train"], first_estimate["val"],
                                          lr_at(0, opts.iters, config), None, 0.0))
        metrics_file.flush()
        t_start = time.perf_counter()
        t_mark, it_mark, loss_sum, train_time = t_start, 0, 0.0, 0.0
        for it in range(opts.iters):
            t0 = time.perf_counter()
            lr = lr_at(it, opts.iters, config)
            for g in optimizer.param_groups:
                g["lr"] = lr
            x, y = dataset.get_batch("train", B, batch_rng)
            loss_t = model(torch.from_numpy(x).long(), torch.from_numpy(y).long())
            loss = loss_t.item()
            if not math.isfinite(loss):
                diverged = it + 1
                log.line(f"Iter {it + 1}: the loss is {loss}; stopping (try a lower --lr)")
                break
            optimizer.zero_grad(set_to_none=True)
            loss_t.backward()
            # clip_grad_norm_ with max_norm 0 would zero the gradient; our 0 means "no clipping".
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            step = it + 1
            train_time += time.perf_counter() - t0
            losses.append(loss)
            loss_sum += loss

            evaluated = step == opts.iters or (opts.eval_every > 0 and step % opts.eval_every == 0)
            if evaluated:
                estimate = evaluate()
                last_val = estimate["val"]
                best_val = min(best_val, last_val)
                if step == opts.iters:
                    final_estimate = estimate
            if step % opts.log_every == 0 or evaluated:
                n = step - it_mark
                tok_s = n * B * T / train_time if train_time > 0 else math.inf
                now = time.perf_counter()
                eta = (now - t_mark) / n * (opts.iters - step)
                mean_loss = loss_sum / n
                log.progress(train.progress_line(step, opts.iters, mean_loss, last_val, lr,
                                                 best_val, tok_s, eta), keep=evaluated)
                metrics.writerow(train.metrics_row(step, mean_loss,
                                                   last_val if evaluated else None, lr, tok_s,
                                                   now - t_start))
                metrics_file.flush()
                t_mark, it_mark, loss_sum, train_time = now, step, 0.0, 0.0
        log.end_progress()
    finally:
        metrics_file.close()

    if final_estimate is not None:
        log.line(f"Final loss estimate: train {final_estimate['train']:.4f} | "
                 f"val {final_estimate['val']:.4f} (started at {first_estimate['val']:.4f})")
    log.line(f"Metrics: {out_dir / 'metrics.csv'}")
    if opts.plot and diverged is None:
        train.write_plot(out_dir, log)
    return RunResult(out_dir=out_dir, checkpoint=None, step=step, iters=opts.iters, losses=losses,
                     first_estimate=first_estimate, final_estimate=final_estimate,
                     best_val=best_val, diverged=diverged)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise cli.UsageError(message)


def build_parser():
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("iters", metavar="ITERS", type=cli._positive_int("ITERS"),
                   help="training iterations (also the learning-rate schedule's length)")
    m = p.add_argument_group("model and optimisation (defaults from randygpt.config.Config)")
    for field, flag, kind, help_text in cli.CONFIG_FLAGS:
        kw = {"choices": ["rmsnorm", "layernorm"]} if field == "norm" else {"type": cli._typed(flag, kind)}
        m.add_argument(flag, dest=field, default=None, help=help_text,
                       metavar=flag.lstrip("-").upper().replace("-", "_"), **kw)
    r = p.add_argument_group("run")
    r.add_argument("--threads", type=cli._thread_count, default=None,
                   help="torch threads (default: as randygpt resolves its own)")
    r.add_argument("--data", metavar="PATH", default=None,
                   help="UTF-8 text file (default: ./train.txt, else Tiny Shakespeare)")
    r.add_argument("--out", metavar="DIR", default=None,
                   help="run directory for config.json and metrics.csv (default: runs/torch-<UTC time>)")
    r.add_argument("--eval-every", type=cli._non_negative_int("--eval-every"), default=250, metavar="N")
    r.add_argument("--eval-iters", type=cli._positive_int("--eval-iters"), default=20, metavar="N")
    r.add_argument("--log-every", type=cli._positive_int("--log-every"), default=10, metavar="N")
    r.add_argument("--plot", action="store_true", help="write loss.png from metrics.csv at the end")
    return p


def _error(message):
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def main(argv=None):
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = build_parser().parse_args(argv)
        overrides = {field: getattr(ns, field) for field, *_ in cli.CONFIG_FLAGS
                     if getattr(ns, field) is not None}
        cli._check_config(overrides)
        options = RunOptions(iters=ns.iters, data_path=ns.data, out_dir=ns.out,
                             eval_every=ns.eval_every, log_every=ns.log_every,
                             eval_iters=ns.eval_iters, n_threads=ns.threads, sample=False,
                             plot=ns.plot, overrides=overrides)
    except (cli.UsageError, TrainError) as e:
        return _error(e)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    try:
        import torch  # noqa: F401
    except ImportError:
        return _error("PyTorch is not installed (pip install torch, the CPU build)")
    try:
        result = run(options)
    except (TrainError, DataError) as e:
        return _error(e)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr, flush=True)
        return EXIT_SIGINT
    if result.diverged:
        _error(f"the loss became non-finite at iteration {result.diverged} (try a lower --lr)")
        return EXIT_DIVERGED
    return 0


if __name__ == "__main__":
    sys.exit(main())
