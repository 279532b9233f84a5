# Argument checks shared by the kernel wrappers (see _checks.pyx). Declared here so that a
# kernel module can `cimport` them and call them as C functions: a training step makes a few
# hundred kernel calls with several checks each, and calls into a plain Python module added
# measurably to the cost of the smallest kernels.
#
# Call them with positional arguments only: Cython turns a call with keyword arguments into a
# Python-level call, which fails for a cimported name.

cpdef check_array(str name, object a, object dtype, int ndim=*)
cpdef check_input(str name, object a, object dtype, tuple shape, str why=*)
cpdef check_output(str name, object a, object dtype, tuple shape, str why=*)
cpdef check_writeable(str name, object a)
cpdef check_elementwise(tuple outputs, tuple inputs, object dtype)
cpdef check_disjoint(tuple outputs, tuple inputs=*)
cpdef check_int(str name, object x, Py_ssize_t lo, object hi=*, str why=*)
cpdef int check_n_threads(object n_threads) except -1
cpdef double check_real(str name, object x, object lo=*, object hi=*) except? -1.0
cpdef out_of_range_error(str name, object a, Py_ssize_t flat, Py_ssize_t n, str why)
cpdef memory_error(str func, object nbytes, str what)
# malloc, or raise MemoryError saying how much was asked for; the caller frees.
cdef void *checked_malloc(str func, object nbytes, str what) except NULL
