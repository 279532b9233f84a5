# The only way into OpenMP for randygpt's kernels.
#
# When the compiler did not define _OPENMP (a serial build), the stand-ins below
# report one thread and thread id 0, so every kernel compiles and runs either way;
# Cython itself drops its prange pragmas in that case.

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define RANDYGPT_OPENMP_ENABLED 1
    #else
    #define RANDYGPT_OPENMP_ENABLED 0
    static inline int omp_get_thread_num(void) { return 0; }
    static inline int omp_get_num_procs(void) { return 1; }
    static inline int omp_get_num_places(void) { return 0; }
    static inline int omp_get_place_num_procs(int place) { return 0; }
    static inline void omp_get_place_proc_ids(int place, int *ids) { }
    #endif
    """
    bint OPENMP_ENABLED "RANDYGPT_OPENMP_ENABLED"
    int omp_get_thread_num() noexcept nogil
    int omp_get_num_procs() noexcept nogil
    int omp_get_num_places() noexcept nogil
    int omp_get_place_num_procs(int place) noexcept nogil
    void omp_get_place_proc_ids(int place, int *ids) noexcept nogil
