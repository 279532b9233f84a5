"""``randygpt sample``: generate text from a checkpoint, printing it as it comes."""
import os
import sys

import numpy as np

from ..checkpoint import load_model
from ..sample import check_sampling_args, generate
from .args import ArgumentParser, UsageError, add_threads_flag, float_arg, int_arg

__all__ = ["build_parser", "main"]

_SAMPLING_ARGS = ("max_new_tokens", "temperature", "top_p", "top_k")


def build_parser():
    p = ArgumentParser(prog="randygpt sample",
                       description="Generate text from a checkpoint, printing it as it comes.",
                       epilog="The model sees at most block_size characters. A longer prompt keeps "
                              "its last block_size; once the window is full, the next character "
                              "restarts it from the last block_size/2 (the KV cache is rebuilt "
                              "then, since positions are absolute).")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint file (.npz)")
    p.add_argument("--prompt", default="", help="text to continue (default: start from BOS)")
    p.add_argument("--max-new-tokens", type=int_arg("--max-new-tokens", lo=0), default=500,
                   metavar="N", help="characters to generate after the prompt (default 500)")
    p.add_argument("--temperature", type=float_arg("--temperature"), default=0.8, metavar="T",
                   help="0 = greedy, as is anything below 1e-6 (default 0.8)")
    p.add_argument("--top-p", type=float_arg("--top-p"), default=0.9, metavar="P",
                   help="nucleus sampling, in (0, 1]; 1 turns it off (default 0.9)")
    p.add_argument("--top-k", type=int_arg("--top-k", lo=1), default=None, metavar="K",
                   help="keep only the K most likely tokens (default: all)")
    p.add_argument("--seed", type=int_arg("--seed", lo=0, hi=2**64 - 1), default=None,
                   help="random seed (default: fresh)")
    add_threads_flag(p)
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole window for every token (slow; for checking)")
    return p


def _check_sampling(args):
    try:
        check_sampling_args(args.max_new_tokens, args.temperature, args.top_p, args.top_k)
    except (TypeError, ValueError) as e:
        # Name the flag the user typed, not the Python argument.
        message = str(e)
        for name in _SAMPLING_ARGS:
            if message.startswith(name):
                message = "--" + name.replace("_", "-") + message[len(name):]
        raise UsageError(message) from None


def main(argv):
    """Returns the exit code; bad input raises for the command line's guard to report."""
    args = build_parser().parse_args(argv)
    _check_sampling(args)
    model, tokenizer, _ = load_model(args.checkpoint, n_threads=args.threads)
    missing = tokenizer.unknown_chars(args.prompt)
    if missing:
        raise UsageError("--prompt has characters not in the model's vocabulary: "
                         + ", ".join(repr(c) for c in missing))
    out = sys.stdout

    def emit(piece):
        out.write(piece)
        out.flush()

    try:
        emit(args.prompt)
        generate(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                 top_p=args.top_p, top_k=args.top_k, rng=np.random.default_rng(args.seed),
                 use_cache=not args.no_cache, stream=emit)
        emit("\n")
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and point stdout at /dev/null so
        # the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    return 0
