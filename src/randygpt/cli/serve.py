"""``randygpt serve``: an HTTP server for a checkpoint, with OpenAI-style completions and a page
to try it (randygpt.serve describes what it answers)."""
import ipaddress
import sys
from pathlib import Path

from .. import usable_cpus
from ..checkpoint import load_model
from .args import ArgumentParser, UsageError, int_arg, threads_arg

__all__ = ["build_parser", "main"]


def build_parser():
    p = ArgumentParser(prog="randygpt serve",
                       description="Serve a checkpoint over HTTP: POST /v1/completions "
                                   "(OpenAI-style fields, JSON or Server-Sent Events), GET "
                                   "/health, GET /v1/models, and a page at / that streams text "
                                   "as it comes. Needs pip install 'randygpt[serve]'.",
                       epilog="Omitted request fields take randygpt sample's defaults, so the "
                              "same seed and settings give the same text. Stop with Ctrl-C.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint (.npz) or weights file (.safetensors)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int_arg("--port", lo=0, hi=65535), default=8000,
                   help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--workers", type=int_arg("--workers", lo=1, hi=1024), default=None,
                   metavar="N", help="generations decoded at once, one thread each (default: "
                                     "one per usable CPU)")
    p.add_argument("--queue", type=int_arg("--queue", lo=0, hi=100_000), default=16, metavar="N",
                   help="requests that may wait for a worker; one more is answered 503 with "
                        "Retry-After (default 16)")
    p.add_argument("--max-tokens-limit", type=int_arg("--max-tokens-limit", lo=0), default=2048,
                   metavar="N", help="the largest max_tokens a request may ask for (default 2048)")
    p.add_argument("--max-prompt-chars", type=int_arg("--max-prompt-chars", lo=0), default=4096,
                   metavar="N", help="the longest prompt accepted (default 4096; the model "
                                     "conditions on its last block_size characters)")
    p.add_argument("--threads", type=threads_arg, default=1, metavar="N",
                   help="kernel threads per generation (default 1: the workers already use the "
                        "cores). Results do not depend on it.")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="the model id in answers and /v1/models (default: the file's name)")
    return p


def _is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv):
    """Serves until interrupted; returns the exit code (bad input raises for the guard)."""
    args = build_parser().parse_args(argv)
    try:
        # Lazy: Starlette and uvicorn are the optional [serve] extra, needed by this command only.
        from .. import serve
    except ImportError as e:
        raise UsageError(f"randygpt serve needs the [serve] extra ({e}): pip install "
                         "'randygpt[serve]'") from None
    settings = serve.ServeSettings(
        workers=args.workers or usable_cpus(), queue_size=args.queue,
        max_tokens_limit=args.max_tokens_limit, max_prompt_chars=args.max_prompt_chars,
        model_name=args.model_name or Path(args.checkpoint).stem)
    model, tokenizer, ckpt = load_model(args.checkpoint, n_threads=args.threads)
    sock, host, port = serve.open_socket(args.host, args.port)
    shown = f"[{host}]" if ":" in host else host
    print(f"randygpt serve: http://{shown}:{port}/ | model {settings.model_name} "
          f"({model.num_params:,} parameters, step {ckpt.step}) | {settings.workers} workers x "
          f"{model.n_threads} threads, queue {settings.queue_size} | Ctrl-C stops", flush=True)
    if not _is_loopback(args.host):
        print(f"randygpt serve: note: listening on {args.host}, reachable from other machines; "
              "there is no authentication", file=sys.stderr, flush=True)
    engine = serve.Engine(model, tokenizer, settings)
    serve.run_server(serve.create_app(engine), sock, settings)
    return 0
