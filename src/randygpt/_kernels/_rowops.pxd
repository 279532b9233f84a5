# Scans of one contiguous row, shared by randygpt's kernels: reductions of float32 values
# (norms, gradient norm) and the range check of int32 indices (cross-entropy targets, tokens).
#
# Every sum is accumulated in double: a row of C = 256 float32 squares summed in float32 loses
# about 8 bits to rounding, and the norms divide by these sums.
#
# Why eight partial sums: one running double sum is a serial chain of dependent adds, and gcc
# will not reorder float adds to vectorize it without -ffast-math (which we refuse, see
# KERNELS.md). Eight independent lanes, combined at the end in a fixed tree, break the chain,
# let gcc keep the lanes in SSE2 registers, and make the result a function of the row alone:
# the same for any thread count, call order or schedule.

# Two sums of one row, returned by value: a helper called inside a prange body cannot write
# through pointers to the body's locals (Cython would not make those locals thread-private).
cdef struct DoublePair:
    double a
    double b


cdef enum:
    ROW_LANES = 8   # written as the literal 8 in range() steps, where Cython needs a literal


cdef inline double lanes_total(const double* acc) noexcept nogil:
    # Fixed combination order, so the rounding never depends on anything but the data.
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


cdef inline double row_sum(const float* x, Py_ssize_t n) noexcept nogil:
    """sum(x[0:n]) in double."""
    cdef double acc[8]
    cdef Py_ssize_t i, j
    cdef Py_ssize_t nv = n - n % ROW_LANES
    for j in range(ROW_LANES):
        acc[j] = 0.0
    for i in range(0, nv, 8):
        for j in range(ROW_LANES):
            acc[j] += <double>x[i + j]
    for i in range(nv, n):
        acc[i - nv] += <double>x[i]
    return lanes_total(acc)




cdef inline double row_sumsq_centered(const float* x, double mean, Py_ssize_t n) noexcept nogil:
    """sum((x[0:n] - mean)**2) in double: the two-pass variance, immune to the cancellation
    that mean(x**2) - mean(x)**2 suffers when |mean| is large against the spread."""
    cdef double acc[8]
    cdef double v
    cdef Py_ssize_t i, j
    cdef Py_ssize_t nv = n - n % ROW_LANES
    for j in range(ROW_LANES):
        acc[j] = 0.0
    for i in range(0, nv, 8):
        for j in range(ROW_LANES):
            v = <double>x[i + j] - mean
            acc[j] += v * v
    for i in range(nv, n):
        v = <double>x[i] - mean
        acc[i - nv] += v * v
    return lanes_total(acc)


cdef inline double row_dot(const float* x, const float* y, Py_ssize_t n) noexcept nogil:
    """sum(x[0:n] * y[0:n]) in double (products formed in double, so they are exact)."""
    cdef double acc[8]
    cdef Py_ssize_t i, j
    cdef Py_ssize_t nv = n - n % ROW_LANES
    for j in range(ROW_LANES):
        acc[j] = 0.0
    for i in range(0, nv, 8):
        for j in range(ROW_LANES):
            acc[j] += <double>x[i + j] * <double>y[i + j]
    for i in range(nv, n):
        acc[i - nv] += <double>x[i] * <double>y[i]
    return lanes_total(acc)


cdef inline double row_sumsq(const float* x, Py_ssize_t n) noexcept nogil:
    """sum(x[0:n]**2) in double (each square formed in double, so it is exact)."""
    return row_dot(x, x, n)


cdef inline Py_ssize_t first_out_of_range(const int* idx, Py_ssize_t n,
                                          Py_ssize_t hi) noexcept nogil:
    """The position of the first idx[i] (i < n) outside [0, hi), or -1 if there is none. Kernels
    use these values as row numbers of a table, so every one is checked before any is used."""
    cdef Py_ssize_t i
    for i in range(n):
        if idx[i] < 0 or idx[i] >= hi:
            return i
    return -1
