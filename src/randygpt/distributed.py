"""Data-parallel training over MPI (through mpi4py): which rank this process is, and the
collectives one training step needs, with results that do not depend on the MPI library.

A plain process gets a :class:`LocalCommunicator` (one rank; every collective is the
identity) and never imports mpi4py, whose start-up costs 0.3-1.2 s. A process started by an
MPI launcher (mpiexec, mpirun, srun; recognised by the variables it sets) gets an
:class:`MPICommunicator`. Started as several ranks without a working mpi4py, :func:`init`
raises :class:`DistributedError` on every rank, so that the job stops instead of running K
independent copies that write the same files.

Determinism: :meth:`Communicator.average_grads` never calls ``Allreduce``, whose summation
order depends on the library, its algorithm choice and the rank count. It reduce-scatters by
hand: an ``Alltoallv`` hands each rank every rank's copy of one contiguous shard of the flat
buffer, the rank adds those copies in rank order and divides by K, and an
``Allgatherv`` returns every averaged shard to every rank. Each element's result is then a
fixed function of the K inputs, so a run repeats bit for bit for a given K, with any MPI
library, and every rank ends up with the same bytes.

Every method of a communicator is collective (all ranks must call it, in the same order)
unless its docstring says otherwise.
"""
import contextlib
import hashlib
import os
import sys
import traceback

import numpy as np

from ._kernels import physical_cores

__all__ = ["DistributedError", "Communicator", "LocalCommunicator", "MPICommunicator",
           "launched_by_mpi", "launcher_size", "init", "abort_on_error", "default_threads",
           "INSTALL_HINT"]

INSTALL_HINT = 'pip install "randygpt[mpi]"'

# Variables that MPI launchers put in each rank's environment and that give the number of
# ranks: MPICH's and Intel MPI's Hydra (and srun --mpi=pmi2) set PMI_SIZE, Open MPI sets
# OMPI_COMM_WORLD_SIZE, MVAPICH MV2_COMM_WORLD_SIZE, and srun SLURM_STEP_NUM_TASKS inside a
# job step only (a batch script has SLURM_NTASKS and SLURM_PROCID, but is not a step, so those
# two do not count). Checked in this order.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
# Variables that mark a launched rank without giving the world's size: PMIx (Open MPI 5,
# srun --mpi=pmix), Hydra's node-local counts, HPE/Cray PALS.
_MARKER_VARS = ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "MPI_LOCALNRANKS",
                "MPI_LOCALRANKID", "PALS_RANKID")


class DistributedError(ValueError):
    """The ranks cannot work together as asked (no MPI, a batch that K does not divide, ranks
    whose parameters diverged); the message is one line for the user."""


# --- detecting the launcher -----------------------------------------------------------------

def launched_by_mpi(environ=None):
    """True when this process was started by an MPI launcher (its variables are set).

    environ: the environment to look at (default: os.environ); not collective.
    """
    env = os.environ if environ is None else environ
    return any(name in env for name in _SIZE_VARS + _MARKER_VARS)


def launcher_size(environ=None):
    """The number of ranks the launcher says it started, or None when it does not say (not
    launched, or a launcher that sets no size variable); not collective."""
    env = os.environ if environ is None else environ
    for name in _SIZE_VARS:
        raw = env.get(name, "").strip()
        if raw.isdigit() and int(raw) >= 1:
            return int(raw)
    return None


def _import_mpi():
    """The mpi4py.MPI module, initialising MPI; DistributedError (one line) when that fails.

    mpi4py is imported here, not at the top of the module: only launched (or --distributed)
    runs may pay for it, and a plain run must work without it installed.
    """
    expected = launcher_size()
    how = ("asked to run distributed" if not launched_by_mpi()
           else "started by an MPI launcher" + (f" as {expected} processes" if expected else ""))
    try:
        import mpi4py
    except ImportError:
        raise DistributedError(f"{how}, but mpi4py is not installed: {INSTALL_HINT}") from None
    # The kernels' OpenMP threads never call MPI: "funneled" spares the library the locking
    # that the default "multiple" costs on every call.
    mpi4py.rc.thread_level = "funneled"
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as e:  # mpi4py without libmpi raises RuntimeError
        # Its message lists every library name tried, one a line; the last names a file.
        lines = str(e).strip().splitlines() or [type(e).__name__]
        raise DistributedError(f"{how}, but mpi4py cannot load an MPI library ({lines[-1]}): "
                               f"{INSTALL_HINT} (or point mpi4py at the cluster's MPI)") from None
    return MPI


def init(force=False):
    """The communicator of this process.

    A plain process (no launcher variables, ``force`` false) gets a LocalCommunicator and
    imports no MPI. A launched process, or any with ``force`` true (``--distributed``), gets
    an MPICommunicator over all ranks; one launched as a single rank that cannot load mpi4py
    gets a LocalCommunicator, since it is the whole job anyway.
    Raises DistributedError (one line, on every rank) when several ranks were launched but
    MPI is unusable, or when MPI's world is not the size the launcher announced (mpi4py built
    for another MPI than the launcher's: each rank would be a world of one).
    """
    if not force and not launched_by_mpi():
        return LocalCommunicator()
    expected = launcher_size()
    try:
        comm = MPICommunicator()
    except DistributedError:
        if expected == 1 and not force:
            return LocalCommunicator()
        raise
    if expected is not None and comm.size != expected:
        raise DistributedError(
            f"the launcher started {expected} processes but MPI sees {comm.size}: mpi4py uses "
            "another MPI library than the mpiexec that started it; launch with that library's "
            "mpiexec (with the mpich wheel: the one in the virtual environment's bin/)")
    return comm


# --- the communicators ----------------------------------------------------------------------

def _check_flat(flat, name, writeable):
    if not isinstance(flat, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(flat).__name__}")
    if flat.dtype != np.float32 or flat.ndim != 1 or not flat.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous 1-D float32 array, got {flat.dtype} "
                         f"with shape {flat.shape}")
    if writeable and not flat.flags.writeable:
        raise ValueError(f"{name} must be writeable: it is averaged in place")


class Communicator:
    """What every communicator offers. Subclasses set ``rank``, ``size``, ``hosts``,
    ``local_rank`` and ``local_size`` and implement the collectives."""

    rank = 0
    size = 1
    hosts = 1        # distinct nodes the ranks run on
    local_rank = 0   # this rank's index among the ranks of its node
    local_size = 1   # ranks on this rank's node

    @property
    def is_root(self):
        """True on rank 0, the one that prints, writes metrics, checkpoints and samples."""
        return self.rank == 0

    def batch_slice(self, batch_size):
        """This rank's contiguous share of a global batch of ``batch_size`` rows (not
        collective): rank r takes rows [r*b, (r+1)*b) with b = batch_size / size, so the
        ranks together cover the batch exactly once, in order. DistributedError when the
        number of ranks does not divide the batch."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size < 1:
            raise ValueError(f"batch size must be a positive int, got {batch_size!r}")
        if batch_size % self.size:
            raise DistributedError(
                f"the batch size {batch_size} is not divisible by the {self.size} ranks: use a "
                f"multiple of {self.size} (each rank takes an equal share of the global batch)")
        share = int(batch_size) // self.size
        return slice(self.rank * share, (self.rank + 1) * share)

    def share(self, n_items):
        """This rank's contiguous share of ``n_items`` items (evaluation batches), as a range
        (not collective). The shares cover range(n_items) in rank order and differ in length
        by at most one; a rank's share may be empty when n_items < size."""
        if isinstance(n_items, bool) or not isinstance(n_items, (int, np.integer)) or n_items < 0:
            raise ValueError(f"number of items must be a non-negative int, got {n_items!r}")
        n = int(n_items)
        return range(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def abort(self, code=1):
        """End every rank of the job with exit status ``code`` (not collective)."""
        raise NotImplementedError


class LocalCommunicator(Communicator):
    """The communicator of a plain process: one rank, every collective the identity."""

    def average_grads(self, flat):
        """Nothing to average over one rank (see MPICommunicator.average_grads)."""
        _check_flat(flat, "flat gradient", writeable=True)

    def gather_floats(self, local_values):
        return [float(v) for v in local_values]

    def any(self, flag):
        return bool(flag)

    def check_identical(self, flat_params):
        _check_flat(flat_params, "flat parameters", writeable=False)

    def bcast_object(self, obj, root=0):
        return obj

    def barrier(self):
        pass

    def local_allgather(self, obj):
        return [obj]

    def abort(self, code=1):
        raise SystemExit(code)


class _ReducePlan:
    """The counts and scratch buffers to average the span [lo, hi) of a flat buffer over the
    ranks, made once per span so that a step allocates nothing.

    The span is cut into `size` contiguous shards whose bounds depend only on the span's length
    and the rank count; rank r reduces shard r. A rank sends nothing to itself: it reads its
    own copy of its shard in place, which spares a copy of 1/K of the buffer. A whole-buffer
    plan is what average_grads uses. Plans over sub-spans (one per layer) would give the same
    bits, since each element's sum is the same, and let a later change overlap each span's
    exchange with the backward of the layer below (Ialltoallv / Iallgatherv on these buffers).
    """

    def __init__(self, lo, hi, rank, size):
        n = hi - lo
        bounds = [n * r // size for r in range(size + 1)]
        self.rank = rank
        self.counts = [b - a for a, b in zip(bounds, bounds[1:])]
        self.displs = bounds[:-1]
        self.send_counts = [0 if j == rank else c for j, c in enumerate(self.counts)]
        self.mine = slice(lo + bounds[rank], lo + bounds[rank + 1])
        m = self.counts[rank]
        # Row i holds rank i's copy of my shard for i < rank, rank i+1's for i >= rank.
        self.recv = np.empty((size - 1, m), dtype=np.float32)
        self.recv_counts = [0 if j == rank else m for j in range(size)]
        self.recv_displs = [m * (j - (j > rank)) for j in range(size)]

    def reduce_mine(self, flat, size):
        """Average every rank's copy of this rank's shard into flat: a float32 sum in rank
        order, ((g0 + g1) + g2) + ..., divided by the number of ranks.

        float32, not float64: a sum of K terms rounds K-1 times (relative error ~K x 6e-8,
        far inside the 1e-5 a K-rank gradient must keep to the 1-process one), and NumPy's
        mixed-precision passes cost 3.9 ms per 2.4M-float shard against 1.35 ms (measured),
        a third of the whole exchange at 2 ranks."""
        out = flat[self.mine]   # holds this rank's own copy until it is added
        before, after = self.recv[:self.rank], self.recv[self.rank:]
        if self.rank:
            acc = before[0]
            for row in before[1:]:
                np.add(acc, row, out=acc)
            np.add(acc, out, out=out)   # float addition commutes: acc + g_r, bit for bit
        for row in after:
            np.add(out, row, out=out)
        np.divide(out, np.float32(size), out=out)


class MPICommunicator(Communicator):
    """All the ranks of an MPI job (a duplicate of COMM_WORLD unless ``comm`` is given)."""

    def __init__(self, comm=None):
        MPI = _import_mpi()
        self._MPI = MPI
        self._comm = (MPI.COMM_WORLD if comm is None else comm).Dup()
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        # The ranks that share this node's memory: the same in MPICH and Open MPI.
        self._node = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self._node.Get_rank()
        self.local_size = self._node.Get_size()
        self.hosts = self._sum_int(1 if self.local_rank == 0 else 0)
        self._plans = {}

    def _sum_int(self, value):
        # Integers add exactly in any order, so Allreduce is safe here.
        buf = np.array([value], dtype=np.int64)
        self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        return int(buf[0])

    def _plan(self, n):
        """The whole-buffer plan for n floats; the first call for a length also checks that
        every rank passes the same length (a mismatch would corrupt or hang the exchange)."""
        plan = self._plans.get(n)
        if plan is None:
            lengths = self._comm.allgather(n)
            if len(set(lengths)) != 1:
                raise DistributedError(f"the ranks' gradient buffers differ in length: {lengths}")
            plan = self._plans[n] = _ReducePlan(0, n, self.rank, self.size)
        return plan

    def average_grads(self, flat):
        """Replace ``flat`` (P,) float32, in place, by the mean over ranks of every rank's
        ``flat``: a float32 sum in rank order ((g0 + g1) + g2 ...), divided by the number of
        ranks. Identical bytes on every rank, and on repeat, for a given K."""
        _check_flat(flat, "flat gradient", writeable=True)
        if self.size == 1:
            return
        MPI, plan = self._MPI, self._plan(flat.size)
        self._comm.Alltoallv([flat, (plan.send_counts, plan.displs), MPI.FLOAT],
                             [plan.recv, (plan.recv_counts, plan.recv_displs), MPI.FLOAT])
        plan.reduce_mine(flat, self.size)
        self._comm.Allgatherv(MPI.IN_PLACE, [flat, (plan.counts, plan.displs), MPI.FLOAT])

    def gather_floats(self, local_values):
        """Every rank's values, concatenated in rank order, on every rank: rank 0's list,
        then rank 1's, and so on (lengths may differ). Summed in list order, a split
        evaluation then adds its batches in the order one process would."""
        mine = [float(v) for v in local_values]
        return [v for values in self._comm.allgather(mine) for v in values]

    def any(self, flag):
        """True on every rank when ``flag`` is true on at least one (a stop request)."""
        return self._sum_int(1 if flag else 0) > 0

    def check_identical(self, flat_params):
        """Raise DistributedError on every rank when the ranks' parameters differ, naming the
        ranks that differ from rank 0. Compares 64 bits of a SHA-1 digest of the bytes (so
        even a NaN compares): 9 ms for the default model's 19 MB (BLAKE2b took 19 ms, MD5 24),
        cheap enough for every evaluation."""
        _check_flat(flat_params, "flat parameters", writeable=False)
        digest = hashlib.sha1(flat_params).hexdigest()[:16]
        seen = self._comm.allgather((flat_params.size, digest))
        differ = [r for r, item in enumerate(seen) if item != seen[0]]
        if differ:
            ranks = ", ".join(str(r) for r in differ)
            raise DistributedError(f"the parameters of rank(s) {ranks} differ from rank 0's "
                                   f"({len(differ)} of {self.size} ranks): the ranks diverged")

    def bcast_object(self, obj, root=0):
        """Rank ``root``'s ``obj`` (any picklable object) on every rank."""
        return self._comm.bcast(obj, root=root)

    def barrier(self):
        self._comm.Barrier()

    def local_allgather(self, obj):
        """The ``obj`` of every rank on this node, in local-rank order (collective over all
        ranks: each node gathers its own)."""
        return self._node.allgather(obj)

    def abort(self, code=1):
        self._comm.Abort(code)


# --- failures and threads -------------------------------------------------------------------

def _exit_status(exc):
    """The exit status a process ending with exception ``exc`` would have."""
    if isinstance(exc, SystemExit):
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        return 1  # a message: Python prints it and exits 1
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 1


@contextlib.contextmanager
def abort_on_error(comm):
    """Run a block so that an exception escaping it on one rank ends the whole job.

    Left alone, a rank that dies of an exception leaves the others waiting in their next
    collective forever. Here such an exception (any but SystemExit with status 0) prints its
    traceback (a SystemExit its message) on this rank's stderr and calls ``comm.abort`` with
    the status the process would have exited with (1; 130 for KeyboardInterrupt; a
    SystemExit's code), as ``python -m mpi4py`` does: the launcher ends every rank within a
    fraction of a second and exits with that status. With one rank the exception propagates
    as usual.
    """
    try:
        yield comm
    except BaseException as exc:
        status = _exit_status(exc)
        if comm.size == 1 or status == 0:
            raise
        if isinstance(exc, SystemExit):
            if not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        elif not isinstance(exc, KeyboardInterrupt):
            print(f"rank {comm.rank} of {comm.size}: uncaught exception, aborting the job",
                  file=sys.stderr)
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        comm.abort(status)
        raise  # reached only if abort returned


def _affinity():
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return None


def default_threads(comm):
    """Kernel threads for this rank: the physical cores it may use, divided among the ranks
    of its node that may use the same cores, at least 1 (collective).

    A launcher that binds each rank to its own cores (``mpiexec -bind-to core``, srun's
    ``--cpu-bind``) gives disjoint affinity masks: each rank gets all the cores of its own
    mask. Unbound ranks share one mask and split its cores evenly; unbound ranks that each
    took every core were measured 2.2x slower per step than split ones.
    """
    mine = _affinity()
    masks = comm.local_allgather(mine)
    if mine is None or any(m is None for m in masks):
        sharing = comm.local_size
    else:
        sharing = sum(1 for m in masks if m & mine)
    return max(1, physical_cores() // sharing)
