"""An HTTP server for one model: OpenAI-style completions (JSON or Server-Sent Events, one event
per token), ``/health``, ``/v1/models`` and a page at ``/`` to try the model from a browser.
``randygpt serve`` is its command line (randygpt.cli.serve); Starlette and uvicorn come with the
``[serve]`` extra.

Concurrency. The event loop only parses requests and moves text: every generation runs
``randygpt.sample.generate`` on one of ``workers`` threads, and its pieces come back to the loop
with ``call_soon_threadsafe``. All workers share the one model: generation reads its weights
and never writes them, each call decodes into a cache of its own (``model.new_cache``), the
decode kernels allocate their scratch per call and release the GIL, and the model stays in eval
mode (``generate``'s ``evaluating()`` finds it there and leaves it there). The tests check that
concurrent generations give the text each gives alone. At most ``workers + queue_size``
requests are admitted at once (running or waiting for a worker); one more is answered 503 with
``Retry-After``. A client that disconnects sets its generation's cancel flag, which the next
token's callback turns into a stop, waiting in the queue included.

Requests follow OpenAI's ``/v1/completions`` fields: ``prompt``, ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``seed``, ``stream`` (and ``stream_options``'s
``include_usage``); omitted ones take ``randygpt sample``'s defaults, so the same seed and
settings give the same text as that command. ``model`` and ``user`` are accepted and not used;
OpenAI's other fields are accepted only at their neutral value (``n`` 1, ``echo`` false, no
``stop``, ...), and any other field is refused: nothing is silently ignored. A bad body is a
400, a bad field a 422 whose ``error.param`` names it.
"""
import asyncio
import contextlib
import dataclasses
import json
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from .sample import check_sampling_args, generate

__all__ = ["ServeError", "RequestError", "ServeSettings", "Completion", "parse_completion",
           "Engine", "create_app", "open_socket", "run_server", "SAMPLE_DEFAULTS"]

# randygpt sample's defaults (cli/sample.py), so that the same request gives the same text.
SAMPLE_DEFAULTS = {"max_tokens": 500, "temperature": 0.8, "top_p": 0.9, "top_k": None,
                   "seed": None}
# OpenAI fields taken only at the value that changes nothing.
_NEUTRAL = {"n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (None,), "stop": (None,),
            "suffix": (None,), "presence_penalty": (0, None), "frequency_penalty": (0, None),
            "logit_bias": (None,)}
_SAMPLING_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature",
                   "top_p": "top_p", "top_k": "top_k"}
# A stream quiet for this long (a request waiting for a worker) gets an SSE comment, so that a
# client that has gone away is noticed even before its first token.
KEEPALIVE_S = 1.0


class ServeError(ValueError):
    """The server cannot start as asked (bad settings, an address it cannot listen on)."""


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, a one-line ``message``, and ``param``,
    the request field at fault (None when it is the body as a whole)."""

    def __init__(self, status, message, param=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """How the server runs: the bounds every request is held to."""

    workers: int = 1                 # generation threads (each decodes one request at a time)
    queue_size: int = 16             # admitted requests waiting for a worker, beyond `workers`
    max_tokens_limit: int = 2048     # the largest max_tokens a request may ask for
    max_prompt_chars: int = 4096     # the longest prompt (the model sees its last block_size)
    max_body_bytes: int = 1 << 20    # the largest request body
    model_name: str = "randygpt"     # the id /v1/models and every answer give

    def __post_init__(self):
        for name, lo in (("workers", 1), ("queue_size", 0), ("max_tokens_limit", 0),
                         ("max_prompt_chars", 0), ("max_body_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ServeError(f"{name} must be an integer >= {lo}, got {value!r}")
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ServeError(f"model_name must be a non-empty string, got {self.model_name!r}")

    @property
    def capacity(self):
        return self.workers + self.queue_size


@dataclasses.dataclass(frozen=True)
class Completion:
    """A validated completion request."""

    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: object          # int or None
    seed: object           # int or None (fresh entropy)
    stream: bool = False
    include_usage: bool = False


def _json_body(body):
    def refuse_constant(name):
        raise ValueError(f"{name} is not JSON")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=refuse_constant)
    except UnicodeDecodeError:
        raise RequestError(400, "the request body is not UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the request body must be a JSON object, got "
                                f"{type(data).__name__}")
    return data


def _other_fields(data):
    """stream_options' include_usage, once the fields beyond the sampling ones are checked:
    refuses those the server does not have, or has only at their neutral value."""
    known = set(SAMPLE_DEFAULTS) | {"prompt", "stream", "stream_options", "model", "user"}
    for name, value in data.items():
        if name in known:
            continue
        if name not in _NEUTRAL:
            raise RequestError(422, f"unknown field {name!r}", name)
        if value not in _NEUTRAL[name] or isinstance(value, bool) != isinstance(
                _NEUTRAL[name][0], bool):
            raise RequestError(422, f"{name}={json.dumps(value)} is not supported (only "
                                    f"{json.dumps(_NEUTRAL[name][0])})", name)
    for name in ("model", "user"):
        if name in data and not isinstance(data[name], str):
            raise RequestError(422, f"{name} must be a string", name)
    options = data.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"} \
            or not isinstance(options.get("include_usage", False), bool):
        raise RequestError(422, 'stream_options must be null or {"include_usage": true|false}',
                           "stream_options")
    return options.get("include_usage", False)


def _check_prompt(data, tokenizer, settings):
    prompt = "" if data.get("prompt") is None else data["prompt"]
    if not isinstance(prompt, str):
        raise RequestError(422, f"prompt must be a string, got {type(prompt).__name__}", "prompt")
    if len(prompt) > settings.max_prompt_chars:
        raise RequestError(422, f"prompt has {len(prompt):,} characters; the limit is "
                                f"{settings.max_prompt_chars:,}", "prompt")
    missing = tokenizer.unknown_chars(prompt)
    if missing:
        shown = ", ".join(repr(c) for c in missing[:10])
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise RequestError(422, f"prompt has characters not in the model's vocabulary: "
                                f"{shown}{more}", "prompt")
    return prompt


def _sampling_fields(data, settings):
    """(max_tokens, temperature, top_p, top_k, seed), checked by sample's own rules."""
    # null, as OpenAI's clients send for "not set", takes the default too.
    values = {name: default if data.get(name) is None else data[name]
              for name, default in SAMPLE_DEFAULTS.items()}
    try:
        check_sampling_args(values["max_tokens"], values["temperature"], values["top_p"],
                            values["top_k"])
    except (TypeError, ValueError) as e:
        message = str(e)
        name = next((n for n in _SAMPLING_NAMES if message.startswith(n)), None)
        param = _SAMPLING_NAMES.get(name)
        if name:
            message = param + message[len(name):]
        raise RequestError(422, message, param) from None
    if values["max_tokens"] > settings.max_tokens_limit:
        raise RequestError(422, f"max_tokens must be <= {settings.max_tokens_limit:,} on this "
                                f"server, got {values['max_tokens']:,}", "max_tokens")
    seed = values["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**64):
        raise RequestError(422, f"seed must be null or an integer in [0, 2**64), got "
                                f"{json.dumps(seed)}", "seed")
    return (int(values["max_tokens"]), float(values["temperature"]), float(values["top_p"]),
            values["top_k"], seed)


def parse_completion(body, tokenizer, settings):
    """A Completion from a request body (bytes), or RequestError: 400 when the body is not a
    UTF-8 JSON object, 422 naming the field when a field is wrong."""
    data = _json_body(body)
    include_usage = _other_fields(data)
    stream = False if data.get("stream") is None else data["stream"]
    if not isinstance(stream, bool):
        raise RequestError(422, "stream must be true or false", "stream")
    prompt = _check_prompt(data, tokenizer, settings)
    max_tokens, temperature, top_p, top_k, seed = _sampling_fields(data, settings)
    return Completion(prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                      top_p=top_p, top_k=top_k, seed=seed, stream=stream,
                      include_usage=include_usage)


class _Cancelled(Exception):
    """Raised from a generation's stream callback to stop it (its client went away)."""


class Job:
    """One admitted generation: its request, its cancel flag and the future of its text."""

    def __init__(self, completion, on_piece):
        self.completion = completion
        self.on_piece = on_piece      # called on the worker thread with each new piece, or None
        self.cancel = threading.Event()
        self.future = None
        self.tokens = 0


class Engine:
    """Runs generations on worker threads, at most ``settings.capacity`` admitted at once (see
    the module docstring for why one shared model is safe)."""

    def __init__(self, model, tokenizer, settings):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self._executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="randygpt-gen")
        self._lock = threading.Lock()
        self._jobs = set()
        self.running = 0
        self.tokens_generated = 0
        self.requests_done = 0

    def stats(self):
        with self._lock:
            return {"admitted": len(self._jobs), "running": self.running,
                    "waiting": len(self._jobs) - self.running,
                    "tokens_generated": self.tokens_generated,
                    "requests_done": self.requests_done}

    def submit(self, completion, on_piece=None):
        """A running Job, or None when ``capacity`` requests are already admitted."""
        job = Job(completion, on_piece)
        with self._lock:
            if len(self._jobs) >= self.settings.capacity:
                return None
            self._jobs.add(job)
        try:
            job.future = self._executor.submit(self._run, job)
        except RuntimeError:  # shut down
            with self._lock:
                self._jobs.discard(job)
            return None
        return job

    def _emit(self, job, piece):
        if job.cancel.is_set():
            raise _Cancelled
        job.tokens += 1
        with self._lock:
            self.tokens_generated += 1
        if job.on_piece is not None:
            job.on_piece(piece)

    def _run(self, job):
        """On a worker: (text, finish_reason), or None when cancelled."""
        c = job.completion
        try:
            if job.cancel.is_set():
                return None
            with self._lock:
                self.running += 1
            try:
                text = generate(self.model, self.tokenizer, c.prompt, c.max_tokens,
                                temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                                rng=np.random.default_rng(c.seed),
                                stream=lambda piece: self._emit(job, piece))
            except _Cancelled:
                return None
            finally:
                with self._lock:
                    self.running -= 1
            # Every sampled token is one character; fewer than asked means EOS ended it.
            return text, ("length" if len(text) >= c.max_tokens else "stop")
        finally:
            with self._lock:
                self._jobs.discard(job)
                self.requests_done += 1

    def close(self):
        """Stop every generation and the workers."""
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel.set()
        self._executor.shutdown(wait=True, cancel_futures=True)


def _error(status, message, param=None, headers=None, kind="invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": None}}, status_code=status, headers=headers)


def _busy():
    return _error(503, "the server is busy (every worker and queue slot is taken); retry shortly",
                  headers={"Retry-After": "1"}, kind="server_busy")


def _page_html():
    return resources.files(__package__).joinpath("static", "index.html").read_text("utf-8")


_END = object()  # the last item of a stream's pipe: its generation has finished


class _TokenPipe:
    """Pieces from a worker thread to the event loop. The worker wakes the loop only when no
    wake-up is pending already, so a loop that falls behind (many streams) takes the pieces
    that piled up in one go instead of being woken once per token."""

    def __init__(self, loop):
        self._loop = loop
        self._lock = threading.Lock()
        self._items = []
        self._wake_pending = False
        self._ready = asyncio.Event()

    def put(self, item):
        """From any thread; False when the loop has closed."""
        with self._lock:
            self._items.append(item)
            if self._wake_pending:
                return True
            self._wake_pending = True
        return _post(self._loop, self._wake)

    def _wake(self):
        with self._lock:
            self._wake_pending = False
        self._ready.set()

    async def take(self, timeout):
        """Every item put since the last take (possibly none), once one is there; raises
        asyncio.TimeoutError after ``timeout`` seconds without one."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        self._ready.clear()
        with self._lock:
            items, self._items = self._items, []
        return items


def _post(loop, fn, *args):
    """fn(*args) on the event loop, from any thread; False when the loop has closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
        return True
    except RuntimeError:
        return False


def _sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _read_body(request, limit):
    """The request body, refused (413) past ``limit`` bytes before it is all read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body is over {limit:,} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request body is over {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _Routes:
    """The HTTP handlers over one Engine."""

    def __init__(self, engine):
        self.engine = engine
        self.settings = engine.settings
        self.created = int(time.time())
        self.page = _page_html()

    def routes(self):
        return [Route("/", self.index, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/completions", self.completions, methods=["POST"])]

    async def index(self, request):
        return HTMLResponse(self.page)

    async def health(self, request):
        s, cfg = self.settings, self.engine.model.config
        return JSONResponse({"status": "ok", "model": s.model_name, **self.engine.stats(),
                             "workers": s.workers, "queue_size": s.queue_size,
                             "max_tokens_limit": s.max_tokens_limit,
                             "max_prompt_chars": s.max_prompt_chars,
                             "block_size": cfg.block_size, "defaults": SAMPLE_DEFAULTS})

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [
            {"id": self.settings.model_name, "object": "model", "created": self.created,
             "owned_by": "randygpt"}]})

    async def completions(self, request):
        try:
            body = await _read_body(request, self.settings.max_body_bytes)
            completion = parse_completion(body, self.engine.tokenizer, self.settings)
        except RequestError as e:
            return _error(e.status, e.message, e.param)
        if completion.stream:
            return self._stream(completion)
        return await self._complete(completion, request)

    def _head(self):
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                "created": int(time.time()), "model": self.settings.model_name}

    @staticmethod
    def _usage(completion, text):
        return {"prompt_tokens": len(completion.prompt), "completion_tokens": len(text),
                "total_tokens": len(completion.prompt) + len(text)}

    async def _complete(self, completion, request):
        job = self.engine.submit(completion)
        if job is None:
            return _busy()
        done = asyncio.wrap_future(job.future)
        try:
            while not done.done():
                await asyncio.wait({done}, timeout=0.25)
                if not done.done() and await request.is_disconnected():
                    job.cancel.set()
                    return JSONResponse(None, status_code=499)  # nobody is left to read it
            result = done.result()
        except Exception as e:
            return _error(500, f"generation failed: {e}", kind="server_error")
        finally:
            if not done.done():  # this handler was cancelled (the server is stopping)
                job.cancel.set()
        if result is None:
            return _error(503, "the server is shutting down", kind="server_busy")
        text, finish = result
        return JSONResponse({**self._head(), "choices": [
            {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "usage": self._usage(completion, text)})

    def _stream(self, completion):
        pipe = _TokenPipe(asyncio.get_running_loop())

        def on_piece(piece):  # on the worker thread
            if not pipe.put(piece):
                raise _Cancelled  # the event loop has closed
        job = self.engine.submit(completion, on_piece)
        if job is None:
            return _busy()
        job.future.add_done_callback(lambda _: pipe.put(_END))
        return StreamingResponse(self._events(job, pipe), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, job, pipe):
        """One SSE event per token, a last one with finish_reason, then [DONE]. Leaving early
        (the client disconnected, the response was cancelled) cancels the generation."""
        head, c = self._head(), job.completion
        try:
            finished = False
            while not finished:
                try:
                    pieces = await pipe.take(KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if pieces and pieces[-1] is _END:
                    pieces.pop()
                    finished = True
                if pieces:
                    # The tokens that arrived since the last write go out in one, still one
                    # event each: a write per token cost the loop more than decoding a token
                    # of a small model.
                    yield "".join(_sse({**head, "choices": [{"text": piece, "index": 0,
                                                             "logprobs": None,
                                                             "finish_reason": None}]})
                                  for piece in pieces)
            try:
                result = job.future.result()
            except Exception as e:
                yield _sse({"error": {"message": f"generation failed: {e}", "type": "server_error",
                                      "param": None, "code": None}})
            else:
                if result is None:
                    yield _sse({"error": {"message": "the server is shutting down",
                                          "type": "server_busy", "param": None, "code": None}})
                else:
                    text, finish = result
                    last = {**head, "choices": [{"text": "", "index": 0, "logprobs": None,
                                                 "finish_reason": finish}]}
                    if c.include_usage:
                        last["usage"] = self._usage(c, text)
                    yield _sse(last)
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()


async def _http_error(request, exc):
    return _error(exc.status_code, exc.detail, kind="invalid_request_error")


async def _server_error(request, exc):
    return _error(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")


def create_app(engine):
    """The Starlette application serving ``engine``'s model (see the module docstring). Its
    shutdown stops every generation and the workers."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            engine.close()

    return Starlette(routes=_Routes(engine).routes(), lifespan=lifespan,
                     exception_handlers={HTTPException: _http_error, Exception: _server_error})


def open_socket(host, port):
    """A listening TCP socket on (host, port) (port 0: a free one). Returns (socket, host,
    port actually bound); ServeError when the address cannot be used."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ServeError(f"cannot listen on {host}:{port}: {e}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound = sock.getsockname()
    return sock, bound[0], bound[1]


def run_server(app, sock, settings):
    """Serve ``app`` on the listening ``sock`` until SIGINT or SIGTERM (uvicorn's handlers:
    open streams get a few seconds to end, then are cancelled)."""
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=3,
                            # Connections beyond this get uvicorn's own 503: a flood of idle
                            # connections cannot exhaust the process.
                            limit_concurrency=max(64, 4 * settings.capacity))
    uvicorn.Server(config).run(sockets=[sock])
