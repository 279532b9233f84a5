"""How this build of the kernels was compiled: with or without OpenMP."""
from randygpt._kernels._omp cimport OPENMP_ENABLED, omp_get_max_threads


def openmp_enabled():
    """True when the kernels were compiled with OpenMP (multi-threaded)."""
    return bool(OPENMP_ENABLED)


def omp_max_threads():
    """OpenMP's own default team size (1 in a serial build)."""
    return omp_get_max_threads()
