"""A run directory (``--out``), owned by one run at a time.

A run holds its directory through an OS file lock on ``.randygpt.lock`` inside it, taken with
``flock`` without waiting: a second run on the same directory is refused at once, and the
kernel drops the lock however the holder ends (exit, exception, SIGKILL), so a dead run never
leaves it locked. Windows has no flock; there msvcrt's byte-range lock plays the same part.

A run is named by a ``run_id`` (uuid4 hex) that the trainer stores in config.json
(``write_config``) and in its checkpoints' ``extra`` (under RUN_ID_KEY). Opening a directory
checks its files against it: a fresh run takes only a directory without another run's
config.json, metrics.csv or ckpt.npz; a resumed run only one whose files name the same run.
So ``--resume A/ckpt.npz --out B`` cannot overwrite B's checkpoint or mix two runs' metrics.

The lock holder alone removes the atomic writer's temporary files that killed saves left in
the directory (``remove_stale_temps``): no other run can be writing there.

This module never prints; what the caller should tell the user is in ``RunDir.notes``.
"""
import json
import os
import stat
import uuid
from pathlib import Path

from .checkpoint import CheckpointError, read_header
from .fileio import atomic_write, open_regular, stale_temp_files

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

__all__ = ["RunDirError", "RunDir", "CONFIG_NAME", "METRICS_NAME", "CHECKPOINT_NAME",
           "LOCK_NAME", "RUN_ID_KEY", "RUN_FILES"]

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.csv"
CHECKPOINT_NAME = "ckpt.npz"
LOCK_NAME = ".randygpt.lock"
# The key under which config.json and a checkpoint's extra name their run.
RUN_ID_KEY = "run_id"
# The files that make a directory some run's: a fresh run refuses a directory holding any.
RUN_FILES = (CONFIG_NAME, METRICS_NAME, CHECKPOINT_NAME)
# config.json is a few kilobytes; a larger one is not ours, and is not read whole.
_MAX_CONFIG_BYTES = 1 << 20
# msvcrt locks a byte range; one byte past the pid keeps the pid readable by the refused run.
_WINDOWS_LOCK_OFFSET = 64
_LOCK_FLAGS = (os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
               | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))


class RunDirError(ValueError):
    """A run directory cannot be used: it cannot be created or written, another run holds it,
    or it holds another run's files. The message is one line naming the directory."""


def _fail(directory, why):
    raise RunDirError(f"output directory {str(directory)!r} {why}")


def _make_dir(path):
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            _fail(path, "exists and is not a directory")
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _fail(path, f"cannot be created: {e.strerror or e}")
    except RunDirError:
        raise
    except ValueError as e:  # a path with a NUL byte in it
        _fail(path, f"is not a usable path ({e})")
    return path


def _try_lock(fd):
    """True when this process now holds the lock on ``fd``, False when another one does.
    OSError when the file system offers no locks."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # msvcrt reports a lock held elsewhere as EACCES / EDEADLOCK
        return False
    return True


def _unlock(fd):
    # Closing the descriptor drops a flock; msvcrt asks for an explicit unlock first.
    if fcntl is None:
        try:
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        except OSError:
            pass
    os.close(fd)


def _holder_pid(fd):
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return str(int(os.read(fd, 32).split()[0]))
    except (OSError, ValueError, IndexError):  # written a moment later, or unreadable
        return "unknown"


def _acquire(directory):
    """(fd, note): the directory's lock, held until fd is closed. note is None, or says why
    the directory could not be locked, in which case the run goes on unlocked."""
    lock_path = directory / LOCK_NAME
    try:
        fd = os.open(lock_path, _LOCK_FLAGS, 0o666)
    except OSError as e:
        _fail(directory, f"cannot be written: {e.strerror or e}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            _fail(directory, f"holds a {LOCK_NAME} that is not a regular file")
        try:
            locked = _try_lock(fd)
        except OSError as e:  # some network and FUSE file systems have no locks
            return fd, (f"cannot lock {str(directory)!r} ({e.strerror or e}): make sure no "
                        "other run uses it")
        if not locked:
            _fail(directory, f"is in use by another randygpt run (pid {_holder_pid(fd)})")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:
        os.close(fd)
        _fail(directory, f"cannot be written: {e.strerror or e}")
    except BaseException:
        os.close(fd)
        raise
    return fd, None


def _config_owner(directory):
    """The run id config.json names, or None when it names none (written before run ids)."""
    path = directory / CONFIG_NAME
    try:
        f, _ = open_regular(path)
        with f:
            info = json.loads(f.read(_MAX_CONFIG_BYTES + 1).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        _fail(directory, f"holds a {CONFIG_NAME} that cannot be read ({e}), so which run the "
                         "directory belongs to is unknown: choose another --out")
    return info.get(RUN_ID_KEY) if isinstance(info, dict) else None


def _checkpoint_owner(directory):
    try:
        extra = read_header(directory / CHECKPOINT_NAME).get("extra")
    except CheckpointError as e:
        _fail(directory, f"holds a checkpoint that cannot be read, so which run the directory "
                         f"belongs to is unknown ({e}): choose another --out")
    return extra.get(RUN_ID_KEY) if isinstance(extra, dict) else None


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _describe(name, owner):
    if owner is None:
        return f"{name} of a run without an id"
    return f"{name} of run {str(owner)[:8]}"


def _foreign_files(directory, run_id, checkpoint):
    """Phrases naming the run files in ``directory`` that are not run ``run_id``'s; run_id
    None is a run from before run ids, recognised by its own checkpoint file alone."""
    present = {name for name in RUN_FILES if os.path.lexists(directory / name)}
    own_ckpt = (CHECKPOINT_NAME in present and checkpoint is not None
                and _same_file(directory / CHECKPOINT_NAME, checkpoint))
    foreign, vouched = [], own_ckpt
    if CHECKPOINT_NAME in present and not own_ckpt:
        owner = _checkpoint_owner(directory)
        if run_id is None or owner != run_id:
            foreign.append(_describe(CHECKPOINT_NAME, owner))
        else:
            vouched = True
    if CONFIG_NAME in present:
        owner = _config_owner(directory)
        if owner != run_id or (run_id is None and not own_ckpt):
            foreign.append(_describe(CONFIG_NAME, owner))
        else:
            vouched = True
    # metrics.csv names no run: it is this run's when config.json or the checkpoint is.
    if METRICS_NAME in present and not vouched:
        foreign.append(f"{METRICS_NAME} of an unknown run")
    return foreign


def _megabytes(n):
    return f"{n / 1e6:.1f} MB"


class RunDir:
    """A run directory held by this process. Open one with ``RunDir.open_fresh(path)`` or
    ``RunDir.open_resume(path, run_id, checkpoint)``; close it (or leave its ``with`` block)
    when the run ends. Closing releases the lock; the lock file stays (removing it would let
    a run that opened it a moment earlier lock a file no longer in the directory).

    path     : Path of the directory
    run_id   : str, the run's id (32 hex digits)
    locked   : True when the OS lock is held (False only where the file system has no locks)
    notes    : list of str, things the caller should tell the user (stale temporary files
               removed, a directory that could not be locked)
    """

    def __init__(self, path, run_id, lock_fd, lock_note):
        # Use open_fresh or open_resume: they take the lock before they look at the files.
        self.path = Path(path)
        self.run_id = run_id
        self._fd = lock_fd
        self.locked = lock_note is None
        self.notes = [] if lock_note is None else [lock_note]
        removed, freed = self.remove_stale_temps()
        if removed:
            self.notes.append(f"removed {removed} stale temporary file{'s' if removed > 1 else ''} "
                              f"({_megabytes(freed)}) left in {str(self.path)!r} by interrupted saves")

    @classmethod
    def open_fresh(cls, path):
        """Create (if needed) and lock ``path`` for a new run with a new run_id. Raises
        RunDirError when it cannot be created or written, another run holds it, or it already
        holds a config.json, metrics.csv or ckpt.npz (another run's: this one has none yet)."""
        directory = _make_dir(path)
        fd, note = _acquire(directory)
        try:
            found = [name for name in RUN_FILES if os.path.lexists(directory / name)]
            if found:
                hint = (f"continue it with --resume {directory / CHECKPOINT_NAME} or "
                        if CHECKPOINT_NAME in found else "")
                _fail(directory, f"already holds another run ({', '.join(found)}); {hint}choose "
                                 "another --out")
            return cls(directory, uuid.uuid4().hex, fd, note)
        except BaseException:
            _unlock(fd)
            raise

    @classmethod
    def open_resume(cls, path, run_id, checkpoint=None):
        """Create (if needed) and lock ``path`` to continue run ``run_id`` there.

        run_id     : the resumed checkpoint's extra[RUN_ID_KEY]; None for a checkpoint saved
                     before run ids existed, which is then given a new one (rd.run_id)
        checkpoint : path of the checkpoint being resumed. It is its own run's file, whatever
                     it holds; with run_id None it is the only proof of ownership.

        Raises RunDirError as open_fresh does, and when config.json or ckpt.npz names another
        run (or cannot be read), or metrics.csv is there without a file naming this run.
        """
        directory = _make_dir(path)
        fd, note = _acquire(directory)
        try:
            foreign = _foreign_files(directory, run_id, checkpoint)
            if foreign:
                who = f"run {run_id[:8]}" if run_id else "this run"
                _fail(directory, f"holds another run's files ({', '.join(foreign)}); resuming "
                                 f"{who} there would overwrite them: choose another --out")
            return cls(directory, run_id or uuid.uuid4().hex, fd, note)
        except BaseException:
            _unlock(fd)
            raise

    @property
    def config_path(self):
        return self.path / CONFIG_NAME

    @property
    def metrics_path(self):
        return self.path / METRICS_NAME

    @property
    def checkpoint_path(self):
        return self.path / CHECKPOINT_NAME

    @property
    def closed(self):
        return self._fd is None

    def write_config(self, info):
        """Write ``info`` (a JSON-able dict) as config.json, atomically, with this run's id
        added under RUN_ID_KEY. Raises OSError when the write fails (disk full ...)."""
        self._check_open()
        body = json.dumps({**info, RUN_ID_KEY: self.run_id}, indent=2, default=str) + "\n"
        atomic_write(self.config_path, lambda f: f.write(body.encode("utf-8")))

    def remove_stale_temps(self):
        """Delete the temporary files that interrupted atomic writes left directly in this
        directory (only names of atomic_write's pattern, only regular files). Returns
        (files removed, bytes freed). Call it after each successful save; opening does it
        once. Does nothing without the lock, which alone proves no other run writes here."""
        self._check_open()
        if not self.locked:
            return 0, 0
        removed = freed = 0
        for path, size in stale_temp_files(self.path):
            try:
                os.unlink(path)
            except OSError:  # gone already, or not ours to delete: leave it
                continue
            removed += 1
            freed += size
        return removed, freed

    def _check_open(self):
        if self._fd is None:
            raise RunDirError(f"output directory {str(self.path)!r} was closed by this run")

    def close(self):
        """Release the lock; closing twice is harmless."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _unlock(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self.closed else ("locked" if self.locked else "unlocked")
        return f"RunDir({str(self.path)!r}, run_id={self.run_id!r}, {state})"
