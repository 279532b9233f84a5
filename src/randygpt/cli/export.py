"""``randygpt export CKPT OUT.safetensors``: a checkpoint's weights, config and vocabulary as a
safetensors file, for other tools (randygpt.interop describes the file)."""
import os

from ..checkpoint import load_model
from ..interop import SUFFIX, is_weights_path, save_weights
from .args import ArgumentParser, UsageError

__all__ = ["build_parser", "main"]


def build_parser():
    p = ArgumentParser(prog="randygpt export",
                       description="Write a checkpoint's weights (float32, randygpt's parameter "
                                   "names) with its config and vocabulary in the metadata, as a "
                                   "safetensors file. Needs pip install 'randygpt[export]'.",
                       epilog="The file is weights only: sample, eval and serve take it as "
                              "--checkpoint; resuming training needs the full checkpoint.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file (.npz)")
    p.add_argument("out", metavar="OUT", help=f"the file to write (ending in {SUFFIX})")
    return p


def main(argv):
    """Returns the exit code; bad input raises for the command line's guard to report."""
    args = build_parser().parse_args(argv)
    if not is_weights_path(args.out):
        raise UsageError(f"OUT must end in {SUFFIX} (the suffix is how --checkpoint recognises "
                         f"the file), got {args.out!r}")
    model, tokenizer, ckpt = load_model(args.checkpoint, n_threads=1)
    save_weights(args.out, model, tokenizer, step=ckpt.step, extra=ckpt.extra)
    size = os.path.getsize(args.out)
    print(f"wrote {args.out}: {model.num_params:,} parameters in {len(model.table)} tensors, "
          f"{size / 2**20:.1f} MiB, step {ckpt.step}", flush=True)
    return 0
