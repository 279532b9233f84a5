"""How this build of the kernels was compiled: with or without OpenMP."""
from libc.stdlib cimport free

from randygpt._kernels._checks cimport checked_malloc
from randygpt._kernels._omp cimport (OPENMP_ENABLED, omp_get_num_places, omp_get_place_num_procs,
                                     omp_get_place_proc_ids)


def openmp_enabled():
    """True when the kernels were compiled with OpenMP (multi-threaded)."""
    return bool(OPENMP_ENABLED)


def omp_place_cpus():
    """The CPU ids of all of OpenMP's places (empty when OMP_PLACES / OMP_PROC_BIND set none).

    When binding is on, the OpenMP runtime pins the initial thread to its first place as it
    loads, so the process's affinity mask then shows one place; the places still span every
    CPU the process was given.
    """
    cdef int place, k, n
    cdef int *ids
    cpus = set()
    for place in range(omp_get_num_places()):
        n = omp_get_place_num_procs(place)
        if n <= 0:
            continue
        ids = <int *>checked_malloc("omp_place_cpus", n * sizeof(int),
                                    f"the CPU ids of OpenMP place {place}")
        try:
            omp_get_place_proc_ids(place, ids)
            for k in range(n):
                cpus.add(ids[k])
        finally:
            free(ids)
    return cpus
