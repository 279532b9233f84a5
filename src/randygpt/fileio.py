"""Files written whole or not at all, and files read only when they are what they claim to be.

``atomic_write`` is the one writer of every file a run or a tool produces (checkpoints, the
corpus cache, plots): the bytes go to a hidden temporary file beside the target, which is
renamed over it only once complete. A process killed mid-write leaves that temporary file
behind; ``stale_temp_files`` finds them by the writer's own name pattern so a run directory's
owner can remove them.

``open_regular`` opens a path for reading only if it names a regular file: a FIFO would block
the open, and a device such as /dev/zero would be read without end.

This module sits below every other one (it imports nothing from the package) and never prints.
"""
import os
import re
import secrets
import stat
from pathlib import Path

__all__ = ["NotRegularFileError", "atomic_write", "is_temp_name", "stale_temp_files",
           "open_regular", "open_failure", "file_kind"]

# The writer's temporary names: ".<target name>.<8 random characters>.tmp". Eight characters
# of [a-z0-9_] also match the names tempfile.mkstemp gave before this writer chose its own, so
# temporary files left by older versions are recognised too.
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")

# O_NONBLOCK makes opening a FIFO return at once instead of waiting for a writer, should one
# replace the file between the stat and the open; on a regular file it changes nothing.
_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
_WRITE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
                | getattr(os, "O_CLOEXEC", 0))


class NotRegularFileError(OSError):
    """A path names something other than a regular file (a directory, FIFO, device, socket).
    ``kind`` says what it is, e.g. "a named pipe (FIFO)"."""

    def __init__(self, path, kind):
        super().__init__(f"{str(path)!r} is {kind}, not a regular file")
        self.path = str(path)
        self.kind = kind


def file_kind(mode):
    """What an st_mode describes, as a phrase: "a regular file", "a directory", ..."""
    for test, kind in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path):
    """Open ``path`` (symbolic links followed) for binary reading, only if it is a regular file.

    Returns (file object, size in bytes at open time). Raises NotRegularFileError before
    opening anything that is not a regular file, and OSError (FileNotFoundError, ...) when the
    path cannot be opened. The kind is checked again on the open descriptor, so a file swapped
    for a FIFO or a device after the first check is refused too.
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFileError(path, file_kind(st.st_mode))
    fd = os.open(path, _READ_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(path, file_kind(st.st_mode))
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return f, st.st_size


def open_failure(error, expected):
    """Why open_regular refused a path, as the phrase that follows the path in a one-line error
    ("does not exist", "is a named pipe (FIFO), not a checkpoint file", "cannot be read
    (Permission denied)"). ``error``: the OSError or ValueError it raised; ``expected``: what
    the path should have named, e.g. "a checkpoint file"."""
    if isinstance(error, FileNotFoundError):
        return "does not exist"
    if isinstance(error, NotRegularFileError):
        return f"is {error.kind}, not {expected}"
    if isinstance(error, OSError):
        return f"cannot be read ({error.strerror or error})"
    return f"is not a usable path ({error})"  # ValueError: a NUL byte in the path


def _fsync_dir(directory):
    # Makes the rename durable; directories cannot be opened for fsync on Windows, where
    # os.replace is already durable enough for our purpose.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_temp(path):
    """A new temporary file beside ``path``: (fd, temp path). Created with mode 0o666 so the
    umask gives the result the permissions a plain open() would."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, _WRITE_FLAGS, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {str(path)!r}")


def atomic_write(path, write):
    """Create or replace ``path`` so that it holds either its old content or the complete new
    content, never a mix, whatever fails midway (crash, full disk, exception in ``write``).

    ``write(f)`` writes the new content to a binary file object. The bytes go to a temporary
    file in the same directory (a rename is atomic only within one file system), which is
    flushed and fsync'ed, renamed over ``path`` with os.replace, and the directory is fsync'ed.
    On failure the temporary file is removed and the exception propagates; only a process
    killed midway leaves it behind (see stale_temp_files).
    """
    path = Path(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _fsync_dir(path.parent)


def is_temp_name(name):
    """True when ``name`` (a file name, no directory) has the form atomic_write gives its
    temporary files."""
    return _TEMP_NAME.fullmatch(name) is not None


def stale_temp_files(directory):
    """The regular files directly in ``directory`` whose names are atomic_write's temporary
    names, as a sorted list of (path, size in bytes). Symbolic links and anything that is
    not a regular file are never listed, whatever their name.

    Every such file is either left by a writer that was killed or belongs to a write in
    progress: only a caller that knows no other process writes there (a run directory's lock
    holder) may delete them.
    """
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not is_temp_name(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((Path(entry.path), st.st_size))
    return sorted(found)
