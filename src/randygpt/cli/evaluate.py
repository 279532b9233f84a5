"""``randygpt eval``: a checkpoint's loss (per token and in bits per character) and perplexity over
a whole split of its text."""
from ..evaluate import evaluate_checkpoint
from .args import ArgumentParser, add_threads_flag, int_arg
from .train import add_config_flags

__all__ = ["build_parser", "main"]


def build_parser():
    p = ArgumentParser(prog="randygpt eval",
                       description="Loss and perplexity of a checkpoint over a whole data split.")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint file (.npz)")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="text file (default: the one the checkpoint was trained on)")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="which split of the text to evaluate (default: val)")
    p.add_argument("--batch-size", type=int_arg("--batch-size", lo=1), default=None, metavar="B",
                   help="windows per forward pass (default: the checkpoint's batch_size)")
    add_config_flags(p, {"precision": "the one the checkpoint was trained in"},
                     fields=("precision",))
    add_threads_flag(p)
    return p


def main(argv):
    """Prints loss and perplexity; returns the exit code (bad input raises for the guard)."""
    args = build_parser().parse_args(argv)
    r = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split,
                            batch_size=args.batch_size, n_threads=args.threads,
                            precision=args.precision)
    print(f"{r.split} loss {r.loss:.4f} | perplexity {r.perplexity:.3f} | "
          f"{r.bits_per_char:.4f} bits per character | "
          f"{r.n_tokens:,} predicted tokens in {r.n_windows:,} windows of <= {r.block_size} "
          f"| checkpoint step {r.step} | precision {r.precision} | data {r.data}", flush=True)
    return 0
