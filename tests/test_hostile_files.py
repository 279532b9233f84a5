"""Hostile input, one class per test: files that are not what they claim (FIFOs, devices,
sockets, random bytes), checkpoints built to exhaust memory or confuse the reader (headers
claiming billions of elements, compressed or duplicate members, JSON nested without end), and
run directories shared by two runs or left with a killed save's debris.

Every case must end in one clear line from the module's own error class, promptly, with no
more memory than the file's size. A case that could hang or read without end when the
protection is missing runs where that cannot take the test session down: FIFOs under a
watchdog that opens the write end, devices in a subprocess under a memory limit and a timeout.
Grow this module with every new class found.
"""
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest

from randygpt import fileio
from randygpt.checkpoint import MAX_HEADER_BYTES, CheckpointError, load, save
from randygpt.config import Config
from randygpt.data import DataError, load_text
from randygpt.model import GPT
from randygpt.optim import AdamW
from randygpt.rundir import LOCK_NAME, RUN_ID_KEY, RunDir, RunDirError
from randygpt.tokenizer import CharTokenizer

TEXT = "hostile files, tiny model.\n"
posix_only = pytest.mark.skipif(os.name != "posix", reason="needs POSIX FIFOs, devices and signals")


def one_line(excinfo, *fragments):
    """The message of a caught error, after checking it is one line holding each fragment."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- helpers: FIFOs that cannot hang a test, devices in a subprocess --------------------------

@contextlib.contextmanager
def fifo_watchdog(path, after=2.0):
    """Guard a test that hands the FIFO ``path`` to code that must not open it. If the code
    opens it anyway (the bug), that open waits for a writer forever; after ``after`` seconds
    this opens and closes the write end, so the test fails late instead of hanging."""
    stop = threading.Event()

    def unblock():
        if stop.wait(after):
            return
        while not stop.is_set():
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # no reader is waiting (yet)
                pass
            stop.wait(0.05)

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    start = time.monotonic()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    assert time.monotonic() - start < after, "the FIFO was opened (the watchdog had to unblock it)"


@pytest.fixture
def fifo(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


# Reads each path with load_text and load in a fresh interpreter whose address space is
# capped: a reader that does not refuse a device reads /dev/zero until MemoryError instead of
# filling the machine, and the timeout ends one that blocks.
DEVICE_SCRIPT = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from randygpt.checkpoint import load
from randygpt.data import load_text
out = {}
for path in sys.argv[1:]:
    for what, read in (("data", load_text), ("checkpoint", load)):
        try:
            read(path)
            out[f"{what} {path}"] = ["no error", ""]
        except BaseException as e:
            out[f"{what} {path}"] = [type(e).__name__, str(e)]
print(json.dumps(out))
"""


def read_in_subprocess(paths, timeout=60):
    proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, *map(str, paths)],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


# --- data files and checkpoints that are not regular files --------------------------------

@posix_only
@pytest.mark.parametrize("read, error, what", [(load_text, DataError, "not a text file"),
                                               (load, CheckpointError, "not a checkpoint file")])
def test_fifo_is_refused_without_opening_it(fifo, tmp_path, read, error, what):
    link = tmp_path / "link-to-pipe"
    link.symlink_to(fifo)
    for path in (fifo, link):
        with fifo_watchdog(fifo), pytest.raises(error) as info:
            read(path)
        one_line(info, "named pipe (FIFO)", what)


@posix_only
@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_devices_are_refused_before_reading(tmp_path):
    link = tmp_path / "zero-link"
    link.symlink_to("/dev/zero")
    paths = ["/dev/zero", link, "/dev/urandom", "/dev/null"]
    results = read_in_subprocess(paths)
    for path in paths:
        for what, error in (("data", "DataError"), ("checkpoint", "CheckpointError")):
            kind, message = results[f"{what} {path}"]
            assert kind == error and "character device" in message and "\n" not in message, \
                (what, path, kind, message)


@posix_only
def test_socket_is_refused(tmp_path):
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.bind(str(path))
        except OSError as e:
            pytest.skip(f"cannot bind a unix socket here: {e}")
        with pytest.raises(DataError) as info:
            load_text(path)
        one_line(info, "is a socket")
        with pytest.raises(CheckpointError) as info:
            load(path)
        one_line(info, "is a socket")


def test_data_keeps_its_clear_errors(tmp_path):
    cases = {"missing.txt": (None, "does not exist"),
             "empty.txt": (b"", "is empty"),
             "bom-only.txt": ("\ufeff".encode(), "is empty"),
             "latin1.txt": ("caf\xe9".encode("latin-1"), "not UTF-8 text (invalid byte at offset 3)")}
    for name, (content, fragment) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError) as info:
            load_text(tmp_path / name)
        one_line(info, fragment, name)
    if hasattr(os, "symlink"):
        (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
        with pytest.raises(DataError) as info:
            load_text(tmp_path / "dangling")
        one_line(info, "does not exist")
    with pytest.raises(DataError) as info:
        load_text("bad\0path.txt")
    one_line(info, "not a usable path")


def test_data_too_large_for_memory_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "big.txt"
    path.write_text("abc")

    class HugeFile(io.BytesIO):
        def read(self, n=-1):
            raise MemoryError

    monkeypatch.setattr("randygpt.data.open_regular", lambda p: (HugeFile(), 10 ** 12))
    with pytest.raises(DataError) as info:
        load_text(path)
    one_line(info, "1,000,000,000,000 bytes", "too large")


# --- checkpoints: bytes that are no checkpoint ----------------------------------------------

def test_random_bytes_get_our_words_not_numpys_pickle_advice(tmp_path):
    rng = np.random.default_rng(0)
    for n in (1, 100, 5000):
        path = tmp_path / f"random{n}.npz"
        path.write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        with pytest.raises(CheckpointError) as info:
            load(path)
        message = one_line(info, "not a valid checkpoint file")
        assert "pickle" not in message, message


# --- checkpoints: what the archive holds ---------------------------------------------------

def tiny_checkpoint(path, extra=None):
    """A valid checkpoint of a one-layer model; returns its parameter count."""
    tok = CharTokenizer.from_text(TEXT)
    config = Config(vocab_size=tok.vocab_size, n_embd=8, n_head=2, n_layer=1, block_size=4)
    model = GPT(config, seed=0)
    save(path, model=model, optimizer=AdamW(model, config), tokenizer=tok, step=1,
         rng_state=None, extra=extra)
    return model.num_params


def members_of(path):
    """{name: bytes} of a checkpoint's members."""
    with zipfile.ZipFile(path) as z:
        return {name: z.read(name) for name in z.namelist()}


def write_zip(path, members, compression=zipfile.ZIP_STORED):
    """A zip of (name, bytes) pairs as given, duplicates included."""
    with zipfile.ZipFile(path, "w", compression=compression) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": in one test that is the point
        for name, data in members:
            z.writestr(name, data)


def npy_header(shape, descr="<f4"):
    """The bytes of a .npy header claiming ``shape`` of ``descr``, with no data after it."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def npy_bytes(arr):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()


def load_peak(path):
    """(the CheckpointError load raised, the peak bytes traced while loading)."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as info:
            load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return info, peak


def test_header_claiming_four_billion_elements_is_refused_before_allocation(tmp_path):
    path = tmp_path / "ckpt.npz"
    n = tiny_checkpoint(path)
    members = members_of(path)
    members["params.npy"] = npy_header((4_000_000_000,)) + b"\0" * 64
    write_zip(path, members.items())
    info, peak = load_peak(path)
    one_line(info, "array 'params' has dtype float32 and shape (4000000000,)",
             f"expected float32 ({n},)")
    assert peak < 16 << 20, f"load allocated {peak:,} bytes for a {path.stat().st_size:,}-byte file"


def test_header_json_is_bounded(tmp_path):
    path = tmp_path / "ckpt.npz"
    tiny_checkpoint(path)
    members = members_of(path)
    for claim in (MAX_HEADER_BYTES + 1, 1 << 40):
        members["header.npy"] = npy_header((claim,), descr="|u1") + b"{}"
        write_zip(path, members.items())
        info, peak = load_peak(path)
        one_line(info, f"header claims {claim:,} bytes", f"at most {MAX_HEADER_BYTES:,}")
        assert peak < 16 << 20, f"load allocated {peak:,} bytes"


def test_compressed_member_cannot_expand_a_small_file(tmp_path):
    # 64 MiB of spaces deflate to 64 KiB: read whole, as NumPy would, they cost 64 MiB.
    path = tmp_path / "bomb.npz"
    tiny_checkpoint(path)
    members = members_of(path)
    members["header.npy"] = npy_bytes(np.full(64 << 20, ord(" "), dtype=np.uint8))
    write_zip(path, members.items(), compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 1 << 20
    info, peak = load_peak(path)
    one_line(info, "is compressed")
    assert peak < 16 << 20, f"load allocated {peak:,} bytes for a {path.stat().st_size:,}-byte file"


def test_duplicate_members_are_refused(tmp_path):
    path = tmp_path / "ckpt.npz"
    n = tiny_checkpoint(path)
    members = list(members_of(path).items())
    members.append(("params.npy", npy_bytes(np.ones(n, dtype=np.float32))))
    write_zip(path, members)
    with pytest.raises(CheckpointError) as info:
        load(path)
    one_line(info, "holds the member 'params.npy' twice")


def test_members_that_are_not_ours_are_refused(tmp_path):
    path = tmp_path / "ckpt.npz"
    tiny_checkpoint(path)
    good = members_of(path)
    # A params member without the .npy suffix: NumPy hands it back as raw bytes.
    renamed = {("params" if k == "params.npy" else k): v for k, v in good.items()}
    for members, name in ((renamed, "params"), ({**good, "notes.txt": b"hi"}, "notes.txt"),
                          ({**good, "weights.npy": npy_bytes(np.zeros(3))}, "weights.npy"),
                          ({**good, "../escape.npy": b""}, "../escape.npy")):
        write_zip(path, members.items())
        with pytest.raises(CheckpointError) as info:
            load(path)
        one_line(info, f"unexpected member {name!r}")


def test_encrypted_member_is_refused(tmp_path):
    path = tmp_path / "ckpt.npz"
    tiny_checkpoint(path)
    write_zip(path, members_of(path).items())
    raw = bytearray(path.read_bytes())
    # Set the "encrypted" flag bit of every member, in local and central headers alike.
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (start := raw.find(signature, start)) >= 0:
            raw[start + flag_at] |= 0x01
            start += 4
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as info:
        load(path)
    one_line(info, "is encrypted")


def test_member_sizes_must_agree_with_their_headers(tmp_path):
    path = tmp_path / "ckpt.npz"
    n = tiny_checkpoint(path)
    members = members_of(path)
    # The right shape, but more data than it describes: the extra bytes would be ignored.
    members["adam_m.npy"] = npy_bytes(np.zeros(n, dtype=np.float32)) + b"\0" * 40
    write_zip(path, members.items())
    with pytest.raises(CheckpointError) as info:
        load(path)
    one_line(info, "array 'adam_m' has", "bytes of data but its header describes")


def test_member_reaching_past_the_end_of_the_file(tmp_path):
    path = tmp_path / "ckpt.npz"
    tiny_checkpoint(path)
    write_zip(path, members_of(path).items())
    raw = bytearray(path.read_bytes())
    # Raise the compressed and uncompressed sizes of the last member in its central entry.
    entry = raw.rfind(b"PK\x01\x02")
    for field in (20, 24):
        raw[entry + field:entry + field + 4] = (1 << 30).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as info:
        load(path)
    one_line(info, "reaches past the end of the", "corrupt or truncated")


def test_header_json_that_defeats_the_parser(tmp_path):
    path = tmp_path / "ckpt.npz"
    tiny_checkpoint(path)
    members = members_of(path)
    for blob, fragment in ((b"[" * 100_000 + b"]" * 100_000, "header is not valid JSON"),
                           (b'{"format_version": 1, "step": ' + b"9" * 5000 + b"}",
                            "header is not valid JSON"),
                           (b"\xff\xfe{}", "header is not valid JSON")):
        members["header.npy"] = npy_bytes(np.frombuffer(blob, dtype=np.uint8))
        write_zip(path, members.items())
        with pytest.raises(CheckpointError) as info:
            load(path)
        one_line(info, fragment)


def test_config_with_absurd_layer_count_is_refused_before_its_table_is_built(tmp_path):
    path = tmp_path / "ckpt.npz"
    tiny_checkpoint(path)
    members = members_of(path)
    header = json.loads(np.lib.format.read_array(io.BytesIO(members["header.npy"])).tobytes())
    header["config"]["n_layer"] = 300_000
    members["header.npy"] = npy_bytes(np.frombuffer(json.dumps(header).encode(), dtype=np.uint8))
    write_zip(path, members.items())
    start = time.monotonic()
    with pytest.raises(CheckpointError) as info:
        load(path)
    one_line(info, "n_layer=300,000", "more layers than the file has parameters")
    assert time.monotonic() - start < 0.5


def test_random_damage_only_ever_gives_checkpoint_errors(tmp_path):
    # Flipped, dropped and inserted bytes anywhere, the zip directories included: the load
    # either succeeds (damage in a byte nothing reads) or says so in one CheckpointError line.
    path = tmp_path / "ckpt.npz"
    tiny_checkpoint(path)
    good = path.read_bytes()
    rng = np.random.default_rng(12)
    for trial in range(300):
        raw = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(0, len(raw)))
            how = trial % 3
            if how == 0:
                raw[at] ^= int(rng.integers(1, 256))
            elif how == 1:
                del raw[at:at + int(rng.integers(1, 64))]
            else:
                raw[at:at] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
        path.write_bytes(bytes(raw))
        try:
            load(path)
        except CheckpointError as e:
            assert "\n" not in str(e), str(e)


# --- run directories -----------------------------------------------------------------------

def test_a_directory_is_locked_by_one_run(tmp_path):
    with RunDir.open_fresh(tmp_path / "run") as rd:
        assert rd.locked and len(rd.run_id) == 32 and int(rd.run_id, 16) >= 0
        with pytest.raises(RunDirError) as info:
            RunDir.open_fresh(tmp_path / "run")
        one_line(info, "is in use by another randygpt run", f"(pid {os.getpid()})")
        with pytest.raises(RunDirError):
            RunDir.open_resume(tmp_path / "run", rd.run_id)
    assert rd.closed
    RunDir.open_fresh(tmp_path / "run").close()  # released: the directory is free again


HOLDER_SCRIPT = r"""
import sys, time
from randygpt.rundir import RunDir
rd = RunDir.open_fresh(sys.argv[1])
print("holding", flush=True)
time.sleep(120)
"""


@posix_only
def test_the_lock_is_dropped_when_its_run_is_killed(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        stale = run / ".ckpt.npz.live1234.tmp"  # as if the live run were saving right now
        stale.write_bytes(b"in flight")
        with pytest.raises(RunDirError) as info:
            RunDir.open_fresh(run)
        one_line(info, f"in use by another randygpt run (pid {holder.pid})")
        assert stale.exists(), "a refused run removed the live run's temporary file"
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert holder.returncode == -signal.SIGKILL
    with RunDir.open_fresh(run) as rd:
        assert rd.locked and not stale.exists()


def test_fresh_run_refuses_another_runs_files(tmp_path):
    for name in ("config.json", "metrics.csv", "ckpt.npz"):
        run = tmp_path / name.replace(".", "_")
        run.mkdir()
        (run / name).write_text("x")
        (run / "notes.txt").write_text("the user's own file, no run's")
        with pytest.raises(RunDirError) as info:
            RunDir.open_fresh(run)
        one_line(info, "already holds another run", name)
        assert ("--resume" in str(info.value)) == (name == "ckpt.npz")
    # Anything else in the directory is not a run's, and the refused runs left it unlocked.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    RunDir.open_fresh(tmp_path / "other").close()


def make_run(directory, legacy=False):
    """A run directory as the trainer leaves it: config.json, metrics.csv and a checkpoint,
    named by a run id (or by none, as before run ids existed). Returns the run id."""
    with RunDir.open_fresh(directory) as rd:
        if legacy:
            rd.config_path.write_text(json.dumps({"iters": 10}))
        else:
            rd.write_config({"iters": 10})
        rd.metrics_path.write_text("iter,train_loss\n0,4.2\n")
        tiny_checkpoint(rd.checkpoint_path, extra=None if legacy else {RUN_ID_KEY: rd.run_id})
        return None if legacy else rd.run_id


def test_resume_takes_only_its_own_runs_directory(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    run_a, run_b = make_run(a), make_run(b)
    assert json.loads((a / "config.json").read_text())[RUN_ID_KEY] == run_a
    with RunDir.open_resume(a, run_a, a / "ckpt.npz") as rd:  # its own directory
        assert rd.run_id == run_a
    with RunDir.open_resume(tmp_path / "C", run_a, a / "ckpt.npz") as rd:  # a new directory
        assert rd.run_id == run_a
    # --resume A/ckpt.npz --out B: B's checkpoint and metrics are run B's.
    with pytest.raises(RunDirError) as info:
        RunDir.open_resume(b, run_a, a / "ckpt.npz")
    one_line(info, "holds another run's files", f"ckpt.npz of run {run_b[:8]}",
             f"config.json of run {run_b[:8]}", "choose another --out")
    # metrics.csv alone names no run, so it may be any run's.
    (tmp_path / "M").mkdir()
    (tmp_path / "M" / "metrics.csv").write_text("iter\n")
    with pytest.raises(RunDirError) as info:
        RunDir.open_resume(tmp_path / "M", run_a, a / "ckpt.npz")
    one_line(info, "metrics.csv of an unknown run")


def test_resume_of_a_run_saved_before_run_ids(tmp_path):
    old, other_old, new = tmp_path / "old", tmp_path / "old2", tmp_path / "new"
    make_run(old, legacy=True)
    make_run(other_old, legacy=True)
    run_new = make_run(new)
    with RunDir.open_resume(old, None, old / "ckpt.npz") as rd:  # its own checkpoint vouches
        assert len(rd.run_id) == 32
    for directory, fragment in ((other_old, "ckpt.npz of a run without an id"),
                                (new, f"ckpt.npz of run {run_new[:8]}")):
        with pytest.raises(RunDirError) as info:
            RunDir.open_resume(directory, None, old / "ckpt.npz")
        one_line(info, fragment)


def test_unreadable_identity_files_are_refused_not_trusted(tmp_path):
    a = tmp_path / "A"
    run_a = make_run(a)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ckpt.npz").write_bytes(b"not a checkpoint")
    with pytest.raises(RunDirError) as info:
        RunDir.open_resume(bad, run_a, a / "ckpt.npz")
    one_line(info, "holds a checkpoint that cannot be read")
    if hasattr(os, "mkfifo"):
        fifo_dir = tmp_path / "fifo"
        fifo_dir.mkdir()
        os.mkfifo(fifo_dir / "config.json")
        with fifo_watchdog(fifo_dir / "config.json"), pytest.raises(RunDirError) as info:
            RunDir.open_resume(fifo_dir, run_a, a / "ckpt.npz")
        one_line(info, "config.json that cannot be read", "named pipe")


KILLED_SAVE_SCRIPT = r"""
import os, signal, sys
from randygpt.fileio import atomic_write

def write_then_die(f):
    f.write(b"x" * 300_000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(os.path.join(sys.argv[1], "ckpt.npz"), write_then_die)
"""


@posix_only
def test_temporary_files_of_killed_saves_are_removed_by_the_next_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", KILLED_SAVE_SCRIPT, str(run)], timeout=60)
        assert proc.returncode == -signal.SIGKILL
    left = [p for p in run.iterdir()]
    assert len(left) == 2 and all(fileio.is_temp_name(p.name) for p in left), left
    # Names near the pattern, and things that are not regular files, are not the writer's.
    decoys = ["ckpt.npz.tmp", ".ckpt.npz.tmp", "notes.tmp", ".ckpt.npz.abc.tmp",
              ".ckpt.npz.ABCDEFGH.tmp", "x.ckpt.npz.abcd1234.tmp"]
    for name in decoys:
        (run / name).write_text("keep")
    (run / ".plot.png.dir12345.tmp").mkdir()
    if hasattr(os, "symlink"):
        (tmp_path / "target").write_text("keep")
        (run / ".link.npz.link1234.tmp").symlink_to(tmp_path / "target")
    with RunDir.open_fresh(run) as rd:
        assert any("removed 2 stale temporary files (0.6 MB)" in note for note in rd.notes), rd.notes
        remaining = sorted(p.name for p in run.iterdir())
        assert not any(fileio.is_temp_name(n) and (run / n).is_file() and not (run / n).is_symlink()
                       for n in remaining), remaining
        for name in decoys:
            assert (run / name).read_text() == "keep"
        assert (tmp_path / "target").read_text() == "keep"
        # After a save: a temp left meanwhile (a write whose clean-up failed) goes too.
        (run / ".ckpt.npz.a1b2c3d4.tmp").write_bytes(b"y" * 10)
        assert rd.remove_stale_temps() == (1, 10)
        assert rd.remove_stale_temps() == (0, 0)
    with pytest.raises(RunDirError):
        rd.remove_stale_temps()  # closed: no longer the lock holder


def test_unusable_output_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError) as info:
        RunDir.open_fresh(tmp_path / "file")
    one_line(info, "exists and is not a directory")
    with pytest.raises(RunDirError) as info:
        RunDir.open_fresh(tmp_path / "file" / "run")
    one_line(info, "cannot be created")
    with pytest.raises(RunDirError) as info:
        RunDir.open_fresh(tmp_path / "bad\0name")
    one_line(info, "not a usable path")
    if hasattr(os, "symlink"):
        (tmp_path / "trap").mkdir()
        (tmp_path / "trap" / LOCK_NAME).symlink_to("/dev/null")
        with pytest.raises(RunDirError) as info:
            RunDir.open_fresh(tmp_path / "trap")
        one_line(info, "cannot be written")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_directory(tmp_path):
    run = tmp_path / "ro"
    run.mkdir()
    run.chmod(0o555)
    try:
        with pytest.raises(RunDirError) as info:
            RunDir.open_fresh(run)
        one_line(info, "cannot be written", "Permission denied")
    finally:
        run.chmod(0o755)
