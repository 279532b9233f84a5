"""Train the PyTorch twin of randygpt's GPT (src/randygpt/torch_ref.py) with exactly randygpt's recipe,
so the two can be compared at the same seed and learning rate.

    python benchmarks/torch_train.py 5000 --lr 1e-3 --data PATH --threads 2 --out DIR
    python benchmarks/torch_train.py 5000 --lr 1e-3 --data PATH --precision bf16 --out DIR2
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
  - the loop itself: the twin is a randygpt.train.Trainer whose model and step are torch's, so
    evaluation (the same stream and batch count, eval mode, before the first step, every
    --eval-every iterations and after the last), log lines, metrics.csv and config.json are
    randygpt's own code.

What differs:
  - dropout: torch's nn.Dropout draws its masks from torch's generator (torch.manual_seed(seed)),
    ours hash (seed, step, layer, site, element). With dropout > 0 the runs see different noise,
    so their curves agree statistically, not step by step;
  - arithmetic: both are float32, but the kernels add in different orders, so even with
    dropout 0 the losses agree to rounding (about 1e-7 relative over the first dozen steps of
    a tiny model, tests/test_torch_train.py), not bit for bit, and over a long run the
    rounding differences grow until the two curves agree only statistically;
  - --precision bf16 is PyTorch's mixed precision as its users turn it on: the forward and the
    loss under torch.autocast("cpu", dtype=torch.bfloat16) (torch_ref.autocast, which
    bench_train.py times too), backward outside it, fp32 weights, gradients and AdamW. Autocast
    runs every matmul, attention included, in bf16 and keeps their outputs in bf16 up to the
    residual add (the logits too; the loss is fp32), where our bf16 rounds only the GEMM
    operands, so the two bf16 runs differ by more than rounding.
    config.json records config.precision and "autocast": "bfloat16" (null in fp32);
  - speed: tok/s is torch's, in a process that also loaded our kernels' module (to build the
    initial weights; none of them is called), so use benchmarks/bench_train.py for timings.

Exit codes: 0 done; 1 the loss became non-finite; 2 bad input or no PyTorch; 130 Ctrl-C.
"""
import contextlib
import dataclasses
import sys

from randygpt import effective_n_threads, openmp_enabled, physical_cores, usable_cpus
from randygpt.cli.args import ArgumentParser, UsageError, int_arg, threads_arg
from randygpt.cli.train import CONFIG_FLAGS, add_config_flags
from randygpt.config import Config
from randygpt.data import DataError
from randygpt.model import GPT
from randygpt.torch_ref import autocast, build_torch_gpt, load_params
from randygpt.train import RunOptions, Trainer, TrainError, default_out_dir

PROG = "torch_train"
EXIT_DIVERGED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130

__all__ = ["TorchTwinTrainer", "run", "main", "build_parser"]


class _TorchModel:
    """The torch module behind the interface the Trainer uses (forward(x, y, step) -> float,
    backward(), evaluating(), train(), num_params, release_buffers())."""

    def __init__(self, module, config, torch):
        self.module = module
        self._config = config
        self._torch = torch
        self.num_params = sum(p.numel() for p in module.parameters())
        self._loss = None

    @property
    def training(self):
        return self.module.training

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    @contextlib.contextmanager
    def evaluating(self):
        """The same mode switch as GPT.evaluating, with torch's autograd off inside."""
        was = self.module.training
        self.module.eval()
        try:
            with self._torch.no_grad():
                yield self
        finally:
            self.module.train(was)

    def forward(self, x, y, step=0):
        torch = self._torch
        with autocast(self._config):
            loss = self.module(torch.from_numpy(x).long(), torch.from_numpy(y).long())
        self._loss = loss if loss.requires_grad else None
        return loss.item()

    def backward(self):
        self.module.zero_grad(set_to_none=True)
        self._loss.backward()
        self._loss = None

    def release_buffers(self):
        pass


class _TorchAdamW:
    """torch.optim.AdamW with randygpt's decay rule (matrices decay, vectors do not) behind the
    optimizer interface the Trainer uses (grad_norm(), step(lr, grad_scale))."""

    def __init__(self, module, config, torch):
        self._torch = torch
        self.params = list(module.parameters())
        groups = [{"params": [p for p in self.params if p.dim() == 2],
                   "weight_decay": config.weight_decay},
                  {"params": [p for p in self.params if p.dim() != 2], "weight_decay": 0.0}]
        self.optim = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr,
                                       betas=(config.beta1, config.beta2), eps=config.adam_eps)

    def grad_norm(self):
        return float(self._torch.linalg.vector_norm(
            self._torch.stack([self._torch.linalg.vector_norm(p.grad) for p in self.params])))

    def step(self, lr, grad_scale=1.0):
        # Clipping as clip_scale decides it (torch's clip_grad_norm_ computes the same
        # max_norm / (norm + 1e-6) factor); the factor multiplies the gradients in place.
        if grad_scale != 1.0:
            for p in self.params:
                p.grad.mul_(grad_scale)
        for g in self.optim.param_groups:
            g["lr"] = lr
        self.optim.step()


class TorchTwinTrainer(Trainer):
    """randygpt's Trainer with the PyTorch twin as its model: everything but the arithmetic
    of the step is randygpt's code. No checkpoints, so no resume or stop_at."""

    def __init__(self, options, **kwargs):
        import torch
        self._torch = torch
        if options.resume is not None or options.stop_at is not None:
            raise TrainError("the torch twin writes no checkpoints: resume and stop_at are not supported")
        if options.out_dir is None:
            ours = default_out_dir()
            # runs/torch-<time>, runs/torch-bf16-<time>: compare_runs labels a run by its directory.
            precision = options.overrides.get("precision", "fp32")
            prefix = "torch-" if precision == "fp32" else f"torch-{precision}-"
            options = dataclasses.replace(options, out_dir=str(ours.with_name(prefix + ours.name)))
        super().__init__(None, dataclasses.replace(options, sample=False), **kwargs)

    def build_model(self):
        torch = self._torch
        torch.set_num_threads(_resolve_threads(self.options.n_threads))
        # Seeds torch's dropout masks; the weights themselves are ours, loaded below.
        torch.manual_seed(self.config.seed)
        module = build_torch_gpt(self.config)
        load_params(module, GPT(self.config, seed=self.config.seed, n_threads=1).params)
        return _TorchModel(module, self.config, torch), _TorchAdamW(module, self.config, torch)

    def threads_description(self):
        return f"the PyTorch {self._torch.__version__} twin: torch threads={self._torch.get_num_threads()}"

    def precision_description(self):
        if self.config.precision == "fp32":
            return None
        return ("precision=bf16: the forward and the loss run under torch.autocast(\"cpu\", "
                "dtype=torch.bfloat16), backward outside it; weights, gradients and AdamW fp32")

    def run_info(self):
        # config.json's config.precision says bf16 either way; "autocast" says how torch did it.
        autocast_dtype = "bfloat16" if self.config.precision == "bf16" else None
        return dict(super().run_info(), impl="torch", torch=self._torch.__version__,
                    autocast=autocast_dtype)

    def save(self):
        return None


def _resolve_threads(requested):
    """Threads for torch, resolved as randygpt resolves its own (argument, RANDYGPT_NUM_THREADS,
    OMP_NUM_THREADS, physical cores; negative counts back from the CPUs), except that a randygpt
    built without OpenMP does not force torch down to one thread."""
    if openmp_enabled():
        return effective_n_threads(requested)
    cpus = usable_cpus()
    if requested is None:
        return physical_cores()
    n = cpus + 1 + requested if requested < 0 else requested
    return max(1, min(n, cpus))


def run(options, *, stdout=None, stderr=None):
    """Train the torch twin as randygpt's Trainer trains the GPT; returns a train.RunResult
    (checkpoint None: none is written). Raises TrainError or DataError (one-line messages) for
    bad input found before the first step."""
    with TorchTwinTrainer(options, stdout=stdout, stderr=stderr) as trainer:
        return trainer.fit()


def build_parser():
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("iters", metavar="ITERS", type=int_arg("ITERS", lo=1),
                   help="training iterations (also the learning-rate schedule's length)")
    add_config_flags(p.add_argument_group("model and optimisation (defaults from "
                                          "randygpt.config.Config)"), Config().to_dict())
    r = p.add_argument_group("run")
    r.add_argument("--threads", type=threads_arg, default=None,
                   help="torch threads (default: as randygpt resolves its own)")
    r.add_argument("--data", metavar="PATH", default=None,
                   help="UTF-8 text file (default: ./train.txt, else Tiny Shakespeare)")
    r.add_argument("--out", metavar="DIR", default=None,
                   help="run directory for config.json and metrics.csv (default: runs/torch-<UTC time>)")
    r.add_argument("--eval-every", type=int_arg("--eval-every", lo=0), default=250, metavar="N")
    r.add_argument("--eval-iters", type=int_arg("--eval-iters", lo=1), default=20, metavar="N")
    r.add_argument("--log-every", type=int_arg("--log-every", lo=1), default=10, metavar="N")
    r.add_argument("--plot", action="store_true", help="write loss.png from metrics.csv at the end")
    return p


def _error(message):
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _options(argv):
    ns = build_parser().parse_args(argv)
    overrides = {field: getattr(ns, field) for field, *_ in CONFIG_FLAGS
                 if getattr(ns, field) is not None}
    try:
        Config(**overrides)
    except (TypeError, ValueError) as e:
        raise UsageError(f"invalid configuration: {e}") from None
    return RunOptions(iters=ns.iters, data_path=ns.data, out_dir=ns.out, eval_every=ns.eval_every,
                      log_every=ns.log_every, eval_iters=ns.eval_iters, n_threads=ns.threads,
                      sample=False, plot=ns.plot, overrides=overrides)


def main(argv=None):
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        options = _options(argv)
    except (UsageError, TrainError) as e:
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
