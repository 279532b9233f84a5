"""Argument checks shared by the kernel wrappers.

Each kernel's ``def`` wrapper calls these once per call, before it takes typed memoryviews and
enters nogil code, so that bad input gets a one-line TypeError (wrong kind of object) or
ValueError (wrong shape, layout or value) naming the argument, never a crash or a stray write;
scratch memory that cannot be had is a one-line MemoryError saying how much (checked_malloc,
memory_error), and the team asked of OpenMP never exceeds what it can start (MAX_TEAM).
Kernel modules ``cimport`` them (see _checks.pxd); Python code and tests may import them.

The messages follow one pattern, so a user sees the same wording from every kernel:
  ``x must be float32, got float64 (shape (4, 6))``
  ``out has shape (4, 7), expected (4, 6) (same as x)``
  ``out (shape (4, 6)) must not share memory with x (shape (4, 6))``
  ``n_threads must be in [1, 65536], got 0``
  ``attention_forward: cannot allocate 37.3 GiB (40,001,600,064 bytes) for scratch: ...``
"""
import math

import numpy as np

from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdlib cimport malloc

from randygpt._kernels._omp cimport omp_get_num_procs

__all__ = ["MAX_THREADS", "MAX_TEAM", "check_array", "check_input", "check_output",
           "check_writeable", "check_elementwise", "check_disjoint", "check_int",
           "check_n_threads", "check_real", "out_of_range_error", "memory_error"]

# The largest n_threads a kernel accepts: a request, not the team it gets (see MAX_TEAM).
cdef enum:
    _MAX_THREADS = 1 << 16
MAX_THREADS = _MAX_THREADS

# The largest team a kernel asks OpenMP for: n_threads above it run as MAX_TEAM threads. Every
# kernel gives bit-identical results for any thread count, so the cap never changes a number;
# more threads than CPUs only exist to test exactly that.
#
# Why a cap: libgomp starts a team by alloca-ing about 120 bytes per new thread on the caller's
# stack, then creating the threads, and it ends the process when either fails. Measured here
# (gcc 12 libgomp, Linux, pid_max 32768; squared_relu_forward on 100,000 floats):
#   - main thread (8 MiB stack): 16384 threads work; 32768 exit(1) ("libgomp: Thread creation
#     failed: Resource temporarily unavailable", out of pids); 65536 overflow the stack (SIGSEGV;
#     with a 64 MiB stack they get to thread creation and fail there instead);
#   - Python threads (threading.stack_size), largest team that works / smallest that crashes:
#     1 MiB 4096 / 8192; 256 KiB 1024 / 2048; 64 KiB 256 / 512; 32 KiB (Python's smallest)
#     192 / 256.
# 128 therefore works from any Python thread and far below every system's thread limits, and
# is 64 times this 2-CPU machine's cores. Machines with more CPUs than that get their CPU count
# (OpenMP's own default team size, which their runtime must be able to start).
cdef int _MAX_TEAM = max(128, omp_get_num_procs())
MAX_TEAM = _MAX_TEAM

cdef tuple _REAL_TYPES = (int, float, np.integer, np.floating)
cdef tuple _INT_TYPES = (int, np.integer)


cpdef check_array(str name, object a, object dtype, int ndim=-1):
    """Check that ``a`` is a C-contiguous numpy.ndarray of ``dtype`` (an np.dtype) with
    ``ndim`` axes (-1: any number)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype != dtype:
        raise TypeError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype} (shape {a.shape})")
    if ndim >= 0 and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    flags = a.flags
    if not flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (shape {a.shape}, strides {a.strides})")
    if not flags.aligned:
        # C code may assume a float* is 4-byte aligned (a vectorised loop that peels to a
        # vector boundary then never reaches one); np.frombuffer with an offset makes such arrays.
        raise ValueError(f"{name} must be aligned to its {a.itemsize}-byte items (shape "
                         f"{a.shape}, address {a.ctypes.data:#x})")


cpdef check_input(str name, object a, object dtype, tuple shape, str why=None):
    """check_array, and ``a`` must have exactly ``shape``. ``why`` says where that shape
    comes from (for example "same as x"), for the message."""
    check_array(name, a, dtype, len(shape))
    if a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape}"
                         + (f" ({why})" if why else ""))


cpdef check_output(str name, object a, object dtype, tuple shape, str why=None):
    """check_input, and ``a`` must be writeable: the kernel writes or accumulates into it."""
    check_input(name, a, dtype, shape, why)
    check_writeable(name, a)


cpdef check_writeable(str name, object a):
    if not a.flags.writeable:
        raise ValueError(f"{name} must be writeable, got a read-only array (shape {a.shape})")


cpdef check_elementwise(tuple outputs, tuple inputs, object dtype):
    """For kernels that map arrays to arrays of the same shape: every array C-contiguous of
    ``dtype`` with the shape of the first output, outputs writeable, and check_disjoint.

    outputs, inputs : tuples of (name, array) pairs, at least one output
    """
    name0, a0 = outputs[0]
    check_array(name0, a0, dtype)
    shape0 = a0.shape
    for name, a in outputs[1:] + inputs:
        check_array(name, a, dtype)
        if a.shape != shape0:
            raise ValueError(f"{name} has shape {a.shape}, expected {shape0} (same as {name0})")
    for name, a in outputs:
        check_writeable(name, a)
    check_disjoint(outputs, inputs)


cpdef check_disjoint(tuple outputs, tuple inputs=()):
    """No output may share memory with another output or with any input.

    outputs, inputs : tuples of (name, array) pairs
    A kernel's threads read inputs while others write outputs, so any overlap would let a
    thread read a value that has already been overwritten. Inputs may share memory with each
    other: they are only read.
    """
    cdef Py_ssize_t i
    for i in range(len(outputs)):
        oname, o = outputs[i]
        for aname, a in outputs[i + 1:] + inputs:
            if np.shares_memory(o, a):
                raise ValueError(f"{oname} (shape {o.shape}) must not share memory with "
                                 f"{aname} (shape {a.shape})")


cpdef check_int(str name, object x, Py_ssize_t lo, object hi=None, str why=None):
    """Check that ``x`` is an integer (not a bool) in [lo, hi] (hi None: no upper bound);
    return it as an int. ``why`` explains the bound, for the message."""
    if isinstance(x, bool) or not isinstance(x, _INT_TYPES):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if x < lo or (hi is not None and x > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {bound}" + (f" ({why})" if why else "") + f", got {x}")
    return int(x)


cpdef int check_n_threads(object n_threads) except -1:
    """Check a kernel's n_threads (an int in [1, MAX_THREADS]) and return the team size to ask
    OpenMP for: n_threads, capped at MAX_TEAM."""
    cdef int n = check_int("n_threads", n_threads, 1, _MAX_THREADS)
    return n if n <= _MAX_TEAM else _MAX_TEAM


cpdef double check_real(str name, object x, object lo=None, object hi=None) except? -1.0:
    """Check that ``x`` is a finite real number (not a bool) with lo <= x < hi; return it.

    lo, hi : the bounds, None for none on that side. hi is excluded: the one two-sided range
             the kernels need is [0, 1) (Adam's betas, dropout's p).
    """
    if isinstance(x, bool) or not isinstance(x, _REAL_TYPES):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    cdef double v
    try:
        v = float(x)
    except OverflowError:  # an int beyond the double range
        v = math.inf if x > 0 else -math.inf
    if not (math.isfinite(v) and (lo is None or v >= lo) and (hi is None or v < hi)):
        # One message for every violation, stating the whole valid range.
        if lo is not None and hi is not None:
            bound = f" and in [{lo:g}, {hi:g})"
        elif lo is not None:
            bound = f" and >= {lo:g}"
        elif hi is not None:
            bound = f" and < {hi:g}"
        else:
            bound = ""
        raise ValueError(f"{name} must be finite{bound}, got {v!r}")
    return v


cpdef out_of_range_error(str name, object a, Py_ssize_t flat, Py_ssize_t n, str why):
    """The ValueError for an index array ``a`` whose element at flat position ``flat`` is not in
    [0, n); the kernels find that position with _rowops.first_out_of_range, without the GIL."""
    where = np.unravel_index(flat, a.shape)
    pos = ", ".join([str(int(i)) for i in where])
    return ValueError(f"{name}[{pos}] = {a[where]} is out of range [0, {n}) ({why})")


cpdef memory_error(str func, object nbytes, str what):
    """The MemoryError of kernel ``func`` for ``nbytes`` bytes (a Python int: sizes are
    computed in Python integers, so they cannot overflow) of ``what`` that it could not get."""
    return MemoryError(f"{func}: cannot allocate {_byte_count(nbytes)} for {what}")


cdef str _byte_count(object nbytes):
    """'100 bytes', or '37.3 GiB (40,001,600,064 bytes)'."""
    if nbytes < 1024:
        return f"{nbytes} bytes"
    cdef double v = float(nbytes)
    cdef str unit = "bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        v /= 1024.0
        if v < 1024.0:
            break
    return f"{v:.1f} {unit} ({nbytes:,} bytes)"


cdef void *checked_malloc(str func, object nbytes, str what) except NULL:
    """malloc(nbytes), or memory_error(func, nbytes, what) when it fails; a size beyond
    PY_SSIZE_T_MAX is refused without asking. The caller frees."""
    cdef void *p = NULL
    if 0 <= nbytes <= <object>PY_SSIZE_T_MAX:
        p = malloc(<size_t>nbytes if nbytes > 0 else 1)
    if p == NULL:
        raise memory_error(func, nbytes, what)
    return p
