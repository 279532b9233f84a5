"""randygpt serve: request validation, one shared model under concurrent generations, and a real
server in a subprocess on a free loopback port, talked to over HTTP (httpx): JSON and streamed
answers equal to ``randygpt sample``, 8 concurrent streams, bad requests, a disconnect, the
503 path, Ctrl-C, and the page in headless Chromium when it is installed."""
import contextlib
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import word_text
from randygpt import cli
from randygpt.checkpoint import load_model, save
from randygpt.config import Config
from randygpt.model import GPT
from randygpt.sample import generate
from randygpt.tokenizer import CharTokenizer

httpx = pytest.importorskip("httpx")
serve = pytest.importorskip("randygpt.serve")  # the [serve] extra

TEXT = word_text(300)
WORKERS, QUEUE = 2, 6           # capacity 8: the 8 concurrent streams fit, a 9th gets 503
LONG = 200_000                  # a generation that runs until it is cancelled
SETTINGS = serve.ServeSettings(workers=WORKERS, queue_size=QUEUE, max_tokens_limit=LONG,
                               max_prompt_chars=200)


def no_eos_model(seed=0):
    """A random model (std 0.3) that never samples EOS, so every generation runs its full
    length: residual channel 0 holds 5 at every position (wpe writes it and no layer does) and
    EOS's row of lm_head reads only that channel, with weight -20 (a logit of -100)."""
    tok = CharTokenizer.from_text(TEXT)
    config = Config(vocab_size=tok.vocab_size, n_embd=16, n_head=2, n_layer=1, block_size=16)
    model = GPT(config, seed=seed)
    model.flat_params[:] = np.random.default_rng(seed).normal(0, 0.3, model.num_params)
    p = model.params
    p["wte"][:, 0] = 0.0
    p["wpe"][:, 0] = 5.0
    p["h.0.wo"][0] = 0.0
    p["h.0.fc2"][0] = 0.0
    p["lm_head"][tok.EOS] = 0.0
    p["lm_head"][tok.EOS, 0] = -20.0
    return model.eval(), tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model, tok = no_eos_model()
    path = tmp_path_factory.mktemp("serve") / "tiny.npz"
    save(path, model=model, optimizer=None, tokenizer=tok, step=0, rng_state=None)
    return path


@pytest.fixture(scope="module")
def local(ckpt):
    """The same model in this process, for the texts the server must give."""
    model, tok, _ = load_model(ckpt, n_threads=1)
    return model, tok


def expected(local, prompt, max_tokens, temperature=0.8, top_p=0.9, top_k=None, seed=None):
    model, tok = local
    return generate(model, tok, prompt, max_tokens, temperature=temperature, top_p=top_p,
                    top_k=top_k, rng=np.random.default_rng(seed))


# --- request validation, no server ----------------------------------------------------------------

def test_omitted_fields_take_sample_defaults():
    tok = CharTokenizer.from_text(TEXT)
    nulls = json.dumps({name: None for name in ("prompt", "max_tokens", "temperature", "top_p",
                                                 "top_k", "seed", "stream", "stream_options")})
    for body in (b"{}", nulls.encode()):
        c = serve.parse_completion(body, tok, SETTINGS)
        assert (c.prompt, c.max_tokens, c.temperature, c.top_p, c.top_k, c.seed, c.stream) == \
            ("", 500, 0.8, 0.9, None, None, False)
    c = serve.parse_completion(json.dumps({"prompt": "the", "n": 1, "echo": False,
                                           "presence_penalty": 0, "model": "m", "stream": True,
                                           "stream_options": {"include_usage": True}}).encode(),
                               tok, SETTINGS)
    assert c.prompt == "the" and c.stream and c.include_usage


def test_one_shared_model_is_safe_from_several_threads(local):
    """What the server relies on: concurrent generations on one model give the text each gives
    alone (each decodes into its own cache; the kernels keep no per-model scratch)."""
    alone = [expected(local, "the ", 300, seed=s) for s in range(8)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda s: expected(local, "the ", 300, seed=s), range(8)))
    assert together == alone


# --- a real server ------------------------------------------------------------------------------

class Server:
    """``randygpt serve`` in a subprocess on a free loopback port (--port 0: it prints the URL)."""

    def __init__(self, ckpt, *flags):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "randygpt", "serve", "--checkpoint", str(ckpt), "--port", "0",
             *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
        if not found:
            self.proc.kill()
            raise AssertionError(f"server did not start: {line!r} {self.proc.stderr.read()!r}")
        self.url = found.group(1)

    def client(self):
        return httpx.Client(base_url=self.url, timeout=30)

    def health(self):
        with self.client() as c:
            return c.get("/health").json()

    def wait_idle(self, within=10.0):
        """The /health answer once no request is admitted (fails after `within` seconds)."""
        deadline = time.monotonic() + within
        while True:
            h = self.health()
            if h["admitted"] == 0 or time.monotonic() > deadline:
                assert h["admitted"] == 0, h
                return h
            time.sleep(0.05)

    def stop(self):
        """SIGINT, as Ctrl-C; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("the server did not stop within 15 s of SIGINT")
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--workers", str(WORKERS), "--queue", str(QUEUE),
               "--max-tokens-limit", str(LONG), "--max-prompt-chars", "200")
    yield s
    s.stop()


def events(response):
    """The data payloads of an SSE response, in order ([DONE] included)."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def test_health_models_and_page(server):
    with server.client() as c:
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["model"] == "tiny" and h["workers"] == WORKERS
        assert h["max_tokens_limit"] == LONG and h["block_size"] == 16
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
        page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # The hooks the page's script and the browser test rely on.
    for hook in ('id="prompt"', 'id="temperature"', 'id="max-tokens"', 'id="generate"',
                 'id="completion"', 'id="rate"', 'data-state="idle"', '"/v1/completions"',
                 "getReader()", "tokens/s"):
        assert hook in page.text, hook


def test_json_and_stream_give_the_text_of_randygpt_sample(server, ckpt, local, capsys):
    # 60 tokens with a 16-character window: the window slides several times on the way.
    settings = {"prompt": "the cat", "max_tokens": 60, "temperature": 0.9, "top_p": 0.95,
                "top_k": 8, "seed": 11}
    assert cli.main(["sample", "--checkpoint", str(ckpt), "--prompt", "the cat",
                     "--max-new-tokens", "60", "--temperature", "0.9", "--top-p", "0.95",
                     "--top-k", "8", "--seed", "11"]) == 0
    sampled = capsys.readouterr().out
    with server.client() as c:
        answer = c.post("/v1/completions", json=settings).json()
        with c.stream("POST", "/v1/completions",
                      json={**settings, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            data = events(r)
    text = answer["choices"][0]["text"]
    assert sampled == "the cat" + text + "\n" and len(text) == 60
    assert answer["choices"][0]["finish_reason"] == "length" and answer["model"] == "tiny"
    assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 60, "total_tokens": 67}
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    pieces = [ch["choices"][0]["text"] for ch in chunks[:-1]]
    assert len(pieces) == 60 and all(len(p) == 1 for p in pieces)  # one event per token
    assert "".join(pieces) == text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 60
    assert text == expected(local, "the cat", 60, 0.9, 0.95, 8, 11)


def test_eight_concurrent_streams_each_get_their_own_text(server, local):
    def stream(seed):
        with server.client() as c, c.stream("POST", "/v1/completions", json={
                "prompt": "a ", "max_tokens": 400, "seed": seed, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            data = events(r)
        assert data[-1] == "[DONE]"
        return "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1])

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(stream, range(8)))
    assert texts == [expected(local, "a ", 400, seed=s) for s in range(8)]
    assert len(set(texts)) == 8
    server.wait_idle()


def _bad_requests():
    ok = {"prompt": "the", "max_tokens": 5}

    def body(**changes):
        return json.dumps({**ok, **changes}).encode()
    return [
        (b"{bad", 400, None), (b"[1, 2]", 400, None), (b'"text"', 400, None),
        (b"\xff\xfe", 400, None), (b'{"temperature": NaN}', 400, None),
        (b"[" * 100_000, 400, None), (b'{"prompt": "the", "max_tokens": 5', 400, None),
        (body(prompt=5), 422, "prompt"), (body(prompt=["the"]), 422, "prompt"),
        (body(prompt="t" * 201), 422, "prompt"), (body(prompt="the Zebra €"), 422, "prompt"),
        (body(max_tokens=-1), 422, "max_tokens"), (body(max_tokens=1.5), 422, "max_tokens"),
        (body(max_tokens=True), 422, "max_tokens"), (body(max_tokens=LONG + 1), 422, "max_tokens"),
        (body(max_tokens="5"), 422, "max_tokens"), (body(temperature=-0.5), 422, "temperature"),
        (body(temperature="hot"), 422, "temperature"),
        (b'{"prompt": "the", "temperature": 1e400}', 422, "temperature"),
        (body(top_p=0), 422, "top_p"), (body(top_p=1.5), 422, "top_p"),
        (body(top_k=0), 422, "top_k"), (body(top_k=2.5), 422, "top_k"),
        (body(seed=-1), 422, "seed"), (body(seed=2**64), 422, "seed"),
        (body(seed="1"), 422, "seed"), (body(seed=True), 422, "seed"),
        (body(stream="yes"), 422, "stream"), (body(stream_options={"x": 1}), 422, "stream_options"),
        (body(n=2), 422, "n"), (body(n=True), 422, "n"), (body(echo=True), 422, "echo"),
        (body(stop=["\n"]), 422, "stop"), (body(logprobs=3), 422, "logprobs"),
        (body(model=5), 422, "model"), (body(frobnicate=1), 422, "frobnicate"),
        (b"{" + b" " * (1 << 20) + b"}", 413, None),
    ]


def test_bad_requests_name_the_field_and_the_server_stays_up(server):
    with server.client() as c:
        for raw, status, param in _bad_requests():
            r = c.post("/v1/completions", content=raw,
                       headers={"content-type": "application/json"})
            assert r.status_code == status, (raw[:60], r.status_code, r.text)
            error = r.json()["error"]
            assert error["param"] == param and error["message"], (raw[:60], error)
            if param is not None:
                assert param in error["message"], error
        for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/completions", 405),
                                     ("POST", "/health", 405)):
            r = c.request(method, path)
            assert r.status_code == status and "message" in r.json()["error"]
        assert c.post("/v1/completions", json={"prompt": "the", "max_tokens": 5}).status_code == 200
    server.wait_idle()


def test_a_client_that_disconnects_stops_its_generation(server):
    before = server.health()["tokens_generated"]
    with server.client() as c, c.stream("POST", "/v1/completions", json={
            "prompt": "the", "max_tokens": LONG, "stream": True}) as r:
        lines = r.iter_lines()
        got = 0
        while got < 5:
            got += next(lines).startswith("data: ")
    # The connection is closed: the generation must stop long before its LONG tokens.
    h = server.wait_idle(within=5)
    time.sleep(0.3)
    after = server.health()["tokens_generated"]
    assert after == h["tokens_generated"], "tokens are still being generated"
    assert 5 <= after - before < LONG // 2


def test_a_json_client_that_disconnects_stops_its_generation(server):
    before = server.health()["tokens_generated"]
    body = json.dumps({"prompt": "the", "max_tokens": LONG}).encode()
    host, port = server.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while server.health()["tokens_generated"] == before:
            assert time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.02)
    h = server.wait_idle(within=5)
    assert h["tokens_generated"] - before < LONG // 2


def test_a_full_server_answers_503_with_retry_after(server):
    with server.client() as c:
        with contextlib.ExitStack() as stack:
            # WORKERS running and QUEUE waiting: every admission slot is taken.
            for _ in range(WORKERS + QUEUE):
                r = stack.enter_context(c.stream("POST", "/v1/completions", json={
                    "prompt": "the", "max_tokens": LONG, "stream": True}))
                assert r.status_code == 200
            busy = c.post("/v1/completions", json={"prompt": "the", "max_tokens": 3})
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "server_busy"
            assert server.health()["admitted"] == WORKERS + QUEUE
        # Closed: waiting ones are dropped too (the keep-alive notices them), and work goes on.
        server.wait_idle()
        assert c.post("/v1/completions", json={"prompt": "the", "max_tokens": 3}).status_code == 200


class Browser:
    """Headless Chromium driven over its DevTools protocol on a pipe (--remote-debugging-pipe:
    JSON messages ended by NUL, commands on its fd 3, answers on its fd 4), so the test waits
    for the page in real time rather than in Chromium's virtual time, which does not wait
    for a streaming response."""

    def __init__(self, exe, profile):
        # The shell puts our pipes on the descriptors Chromium reads and writes.
        self.proc = subprocess.Popen(
            ["sh", "-c", 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null', exe, "--headless",
             "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.ids, self.buffer, self.session = 0, b"", None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]

    def send(self, method, **params):
        self.ids += 1
        message = {"id": self.ids, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        self.proc.stdin.write(json.dumps(message).encode() + b"\0")
        self.proc.stdin.flush()
        deadline = time.monotonic() + 30
        while True:
            while b"\0" not in self.buffer:
                ready, _, _ = select.select([self.proc.stdout], [], [], 1)
                assert time.monotonic() < deadline, f"no answer to {method}"
                if ready:
                    chunk = os.read(self.proc.stdout.fileno(), 65536)
                    assert chunk, "chromium closed its pipe"
                    self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self.ids:  # anything else is an event
                assert "error" not in answer, answer
                return answer["result"]

    def js(self, expression):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def wait_for(self, expression, within=20.0):
        deadline = time.monotonic() + within
        while not self.js(expression):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.05)

    def close(self):
        self.proc.kill()
        self.proc.wait()


def test_page_streams_text_in_headless_chromium(server, local, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    browser = Browser(exe, tmp_path / "profile")
    try:
        browser.send("Page.navigate", url=server.url + "/")
        browser.wait_for("document.readyState === 'complete' && "
                         "document.getElementById('model').textContent.startsWith('tiny')")
        # As a person would: type the prompt and the settings, press Generate.
        browser.js("""(() => {
            const set = (id, v) => { document.getElementById(id).value = v; };
            set('prompt', 'the cat'); set('temperature', '0.8'); set('top-p', '0.9');
            set('max-tokens', '3000'); set('seed', '3');
            document.getElementById('generate').click(); })()""")
        seen = set()
        deadline = time.monotonic() + 30
        while browser.js("document.body.dataset.state") != "done":
            assert time.monotonic() < deadline and browser.js(
                "document.body.dataset.state") != "error", browser.js(
                "document.getElementById('error').textContent")
            seen.add(len(browser.js("document.getElementById('completion').textContent")))
            time.sleep(0.01)
        text = browser.js("document.getElementById('completion').textContent")
        rate = browser.js("document.getElementById('rate').textContent")
    finally:
        browser.close()
    assert text == expected(local, "the cat", 3000, seed=3)
    assert rate.startswith("3000 tokens · ") and "tokens/s" in rate, rate
    # The text grew while it streamed: the page showed it before the last token came.
    assert any(0 < n < 3000 for n in seen), sorted(seen)


# --- the command line -----------------------------------------------------------------------------

def test_cli_bad_input_is_one_line(ckpt, tmp_path, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        cases = [(["--port", str(taken.getsockname()[1])], "cannot listen on"),
                 (["--port", "65536"], "--port"), (["--workers", "0"], "--workers"),
                 (["--host", "no.such.host.invalid"], "cannot listen on")]
        for flags, match in cases:
            code = cli.main(["serve", "--checkpoint", str(ckpt), *flags])
            err = capsys.readouterr().err.strip().splitlines()
            assert code == 2 and len(err) == 1 and match in err[0], (flags, err)
    finally:
        taken.close()
    code = cli.main(["serve", "--checkpoint", str(tmp_path / "none.npz")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_ctrl_c_stops_a_server_with_open_streams(ckpt):
    s = Server(ckpt, "--workers", "1", "--queue", "1", "--max-tokens-limit", str(LONG))
    try:
        started = threading.Event()

        def hold():
            try:
                with s.client() as c, c.stream("POST", "/v1/completions", json={
                        "prompt": "the", "max_tokens": LONG, "stream": True}) as r:
                    for line in r.iter_lines():
                        started.set()
            except httpx.HTTPError:
                pass  # the server went away under it, as it should
        reader = threading.Thread(target=hold, daemon=True)
        reader.start()
        assert started.wait(20)
        t0 = time.monotonic()
        code = s.stop()
        assert time.monotonic() - t0 < 10
        assert code in (0, 130), s.proc.stderr.read()
        reader.join(10)
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_bench_serve_smoke():
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
    proc = subprocess.run([sys.executable, str(bench), "--quick", "--clients", "1,3", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    levels = json.loads(proc.stdout)["levels"]
    assert [lv["clients"] for lv in levels] == [1, 3]
    for lv in levels:
        assert lv["errors"] == 0 and lv["tokens"] == lv["requests"] * 40 and lv["tok_per_s"] > 0
        assert lv["ttft_ms"]["p50"] > 0
