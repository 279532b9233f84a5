# Softmax cross-entropy, mean over rows: forward, backward, and the fused forward+backward
# that training uses (one pass per row, no probability buffer).
#
# Dimensions: N rows (= B*T), V vocabulary (logits per row).
#
# Parallel over rows: each row's max, log-sum-exp, loss and gradient row depend on that row
# only, so threads write disjoint memory. The mean loss is summed afterwards, serially in row
# order, which makes it independent of the thread count.
import numpy as np

from cython.parallel cimport prange

from randygpt._kernels._checks cimport (check_array, check_disjoint, check_input,
                                       check_n_threads, check_output, check_real,
                                       out_of_range_error)
from randygpt._kernels._rowops cimport first_out_of_range

__all__ = ["cross_entropy_forward", "cross_entropy_backward", "cross_entropy_forward_backward"]


# Naming the shared exp header makes cythonize rebuild this module when it changes (the C
# code below includes it).
cdef extern from "fastexp.h":
    pass


cdef extern from *:
    """
    /* The row math is the whole cost of this file, so it is written in C:
       - exp() is our own, shared with attention (fastexp.h: libm's expf is an opaque call
         that gcc will not vectorize without -ffast-math, which we refuse);
       - on x86-64 Linux with gcc >= 12 each row function is also compiled for x86-64-v3 (AVX2 + FMA)
         and picked at load time, doubling the vector width on CPUs that have it while the
         module itself stays baseline x86-64.
       Row sums run on eight double accumulators: one running double sum is a chain of dependent
       adds that gcc will not reorder (and so not vectorize) without -ffast-math. The lanes are
       combined in a fixed tree, so a row's sum depends on the row alone, never on threads. */
    #include <math.h>
    #include "fastexp.h"
    /* Building with -DRANDYGPT_BASELINE_ONLY skips the clones (to test the baseline path on
       a CPU that has AVX2). */
    #if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) \
        && defined(__linux__) && !defined(RANDYGPT_BASELINE_ONLY)
    #define RANDYGPT_XENT_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
    #else
    #define RANDYGPT_XENT_CLONES
    #endif
    /* Helpers must be inlined into each clone to get that clone's instruction set. */
    #if defined(__GNUC__)
    #define RANDYGPT_XENT_INLINE static inline __attribute__((always_inline))
    #else
    #define RANDYGPT_XENT_INLINE static inline
    #endif

    RANDYGPT_XENT_INLINE double randygpt_lanes_total(const double *acc) {
        return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    }

    /* max_j z[j] over V >= 1 values, on eight lanes so that the compare chain vectorizes. */
    RANDYGPT_XENT_INLINE float randygpt_row_max(const float *z, Py_ssize_t V) {
        float acc[8], mx;
        Py_ssize_t j;
        int k;
        for (k = 0; k < 8; k++) acc[k] = z[0];
        for (j = 0; j + 8 <= V; j += 8)
            for (k = 0; k < 8; k++) acc[k] = z[j + k] > acc[k] ? z[j + k] : acc[k];
        for (; j < V; j++) acc[0] = z[j] > acc[0] ? z[j] : acc[0];
        mx = acc[0];
        for (k = 1; k < 8; k++) mx = acc[k] > mx ? acc[k] : mx;
        return mx;
    }

    /* acc[k] += x[i] (in double) for the i < n with i % 8 == k: the lane sum that both
       exponential sums below run, so that they add the same terms in the same order. */
    RANDYGPT_XENT_INLINE void randygpt_add_lanes(double *acc, const float *x, Py_ssize_t n) {
        Py_ssize_t i;
        int k;
        for (i = 0; i + 8 <= n; i += 8)
            for (k = 0; k < 8; k++) acc[k] += (double)x[i + k];
        for (k = 0; i < n; i++, k++) acc[k] += (double)x[i];
    }

    /* e[j] = exp(z[j] - mx) for j < V; returns their sum in double. */
    RANDYGPT_XENT_INLINE double randygpt_store_exp(float *e, const float *z, float mx, Py_ssize_t V) {
        double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        Py_ssize_t j;
        for (j = 0; j < V; j++) e[j] = randygpt_exp_nonpos(z[j] - mx);
        randygpt_add_lanes(acc, e, V);
        return randygpt_lanes_total(acc);
    }

    /* The same sum without an output row: the exponentials go through a stack block (gcc
       vectorizes a plain exp loop, not one fused with the float-to-double lane sums). Blocks
       are a multiple of 8 long, so each lane adds the same terms in the same order as above. */
    RANDYGPT_XENT_INLINE double randygpt_sum_exp(const float *z, float mx, Py_ssize_t V) {
        double acc[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        float blk[64];
        Py_ssize_t j0, n, i;
        for (j0 = 0; j0 < V; j0 += 64) {
            n = V - j0 < 64 ? V - j0 : 64;
            for (i = 0; i < n; i++) blk[i] = randygpt_exp_nonpos(z[j0 + i] - mx);
            randygpt_add_lanes(acc, blk, n);
        }
        return randygpt_lanes_total(acc);
    }

    /* Loss of one row, lse(z) - z[y]. With dz != NULL, also writes
       dz = (softmax(z) - onehot(y)) * inv_n, using dz to hold exp(z - max) in between.
       The max is subtracted before exp so that large logits cannot overflow, and the sum of
       exponentials is kept in double so that the log-sum-exp keeps float32 precision. */
    RANDYGPT_XENT_CLONES
    static float randygpt_xent_row(const float *z, int y, float *dz, double inv_n, Py_ssize_t V) {
        float mx = randygpt_row_max(z, V);
        double s;
        Py_ssize_t j;
        if (dz != NULL) {
            s = randygpt_store_exp(dz, z, mx, V);
            float scale = (float)(inv_n / s);
            for (j = 0; j < V; j++) dz[j] *= scale;
            dz[y] -= (float)inv_n;
        } else {
            s = randygpt_sum_exp(z, mx, V);
        }
        return (float)((double)mx + log(s) - (double)z[y]);
    }

    /* Rows up to this long keep their exponentials in a stack buffer during backward
       (16 KiB); longer rows compute each exponential twice rather than allocate. */
    #define RANDYGPT_XENT_ROW_BUFFER 4096

    /* Differentiates loss = mean_i (lse(z_i) - z_i[y_i]), with g = dloss / N:
       dz[j] += g * (exp(z[j] - lse) - [j == y]). */
    RANDYGPT_XENT_CLONES
    static void randygpt_xent_row_backward(float *dz, const float *z, int y, double g,
                                           Py_ssize_t V) {
        float e[RANDYGPT_XENT_ROW_BUFFER];
        float mx = randygpt_row_max(z, V), scale;
        Py_ssize_t j;
        if (V <= RANDYGPT_XENT_ROW_BUFFER) {
            scale = (float)(g / randygpt_store_exp(e, z, mx, V));
            for (j = 0; j < V; j++) dz[j] += e[j] * scale;
        } else {
            scale = (float)(g / randygpt_sum_exp(z, mx, V));
            for (j = 0; j < V; j++) dz[j] += randygpt_exp_nonpos(z[j] - mx) * scale;
        }
        dz[y] -= (float)g;
    }
    """
    float xent_row "randygpt_xent_row"(const float* z, int y, float* dz, double inv_n,
                                       Py_ssize_t V) noexcept nogil
    void xent_row_backward "randygpt_xent_row_backward"(float* dz, const float* z, int y,
                                                        double g, Py_ssize_t V) noexcept nogil


cdef void xent_rows(float* losses, float* dlogits, const float* logits, const int* targets,
                    bint write_grad, Py_ssize_t N, Py_ssize_t V, int n_threads) noexcept nogil:
    cdef Py_ssize_t i
    cdef float* dz
    cdef double inv_n = 1.0 / <double>N
    for i in prange(N, schedule="static", num_threads=n_threads):
        dz = dlogits + i * V if write_grad else NULL
        losses[i] = xent_row(logits + i * V, targets[i], dz, inv_n, V)


cdef void xent_backward_rows(float* dlogits, const float* logits, const int* targets,
                             double dloss, Py_ssize_t N, Py_ssize_t V,
                             int n_threads) noexcept nogil:
    cdef Py_ssize_t i
    cdef double g = dloss / <double>N
    for i in prange(N, schedule="static", num_threads=n_threads):
        xent_row_backward(dlogits + i * V, logits + i * V, targets[i], g, V)


cdef double mean_in_row_order(const float* losses, Py_ssize_t N) noexcept nogil:
    # Serial and in row order on purpose: the mean must not depend on the thread count.
    cdef double total = 0.0
    cdef Py_ssize_t i
    for i in range(N):
        total += <double>losses[i]
    return total / <double>N


# ---- checks done once per call, before any kernel runs (shared ones in _checks.pyx) ----------

cdef object F32 = np.dtype(np.float32)
cdef object I32 = np.dtype(np.int32)


def _check_inputs(logits, targets):
    check_array("logits", logits, F32, 2)
    cdef Py_ssize_t N = logits.shape[0]
    cdef Py_ssize_t V = logits.shape[1]
    if N < 1 or V < 1:
        raise ValueError(f"logits must have at least one row and one column, got shape {logits.shape}")
    check_input("targets", targets, I32, (N,), "one per row of logits")
    cdef const int[::1] t = targets
    cdef Py_ssize_t bad
    with nogil:
        bad = first_out_of_range(&t[0], N, V)
    if bad >= 0:
        raise out_of_range_error("targets", targets, bad, V, f"logits shape {logits.shape}")
    return N, V


def _check_grad(dlogits, logits, targets):
    check_output("dlogits", dlogits, F32, logits.shape, "same as logits")
    check_disjoint((("dlogits", dlogits),), (("logits", logits), ("targets", targets)))


# ---- public kernels ---------------------------------------------------------------------------

def cross_entropy_forward(losses, logits, targets, n_threads):
    """Softmax cross-entropy per row and its mean.

    losses  : (N,)   float32  written, -log softmax(logits)[i, targets[i]]
    logits  : (N, V) float32  read
    targets : (N,)   int32    read, each in [0, V)
    Returns the mean of ``losses``, summed in float64 in row order.
    """
    cdef Py_ssize_t N, V
    cdef int nt = check_n_threads(n_threads)
    N, V = _check_inputs(logits, targets)
    check_output("losses", losses, F32, (N,), "one per row of logits")
    check_disjoint((("losses", losses),), (("logits", logits), ("targets", targets)))
    cdef float[::1] l = losses
    cdef const float[:, ::1] z = logits
    cdef const int[::1] t = targets
    cdef double mean
    with nogil:
        # dlogits is unused when write_grad is false.
        xent_rows(&l[0], NULL, &z[0, 0], &t[0], False, N, V, nt)
        mean = mean_in_row_order(&l[0], N)
    return mean


def cross_entropy_backward(dlogits, logits, targets, dloss, n_threads):
    """Gradient of the mean cross-entropy with respect to the logits.

    dlogits : (N, V) float32  accumulated, += dloss * (softmax(logits) - onehot(targets)) / N
    logits  : (N, V) float32  read
    targets : (N,)   int32    read, each in [0, V)
    dloss   : float, the upstream gradient of the mean loss (1.0 for the training loss)
    """
    cdef Py_ssize_t N, V
    cdef int nt = check_n_threads(n_threads)
    N, V = _check_inputs(logits, targets)
    _check_grad(dlogits, logits, targets)
    cdef double g = check_real("dloss", dloss)
    cdef float[:, ::1] dz = dlogits
    cdef const float[:, ::1] z = logits
    cdef const int[::1] t = targets
    with nogil:
        xent_backward_rows(&dz[0, 0], &z[0, 0], &t[0], g, N, V, nt)


def cross_entropy_forward_backward(dlogits, logits, targets, n_threads):
    """Mean cross-entropy and its gradient in one pass over each row.

    dlogits : (N, V) float32  written (not accumulated), = (softmax(logits) - onehot(targets)) / N
    logits  : (N, V) float32  read
    targets : (N,)   int32    read, each in [0, V)
    Returns the mean loss, bit-identical to what cross_entropy_forward returns.
    """
    cdef Py_ssize_t N, V
    cdef int nt = check_n_threads(n_threads)
    N, V = _check_inputs(logits, targets)
    _check_grad(dlogits, logits, targets)
    # Per-row losses are kept so that the mean is summed in row order, as in the forward.
    losses = np.empty(N, dtype=np.float32)
    cdef float[::1] l = losses
    cdef float[:, ::1] dz = dlogits
    cdef const float[:, ::1] z = logits
    cdef const int[::1] t = targets
    cdef double mean
    with nogil:
        xent_rows(&l[0], &dz[0, 0], &z[0, 0], &t[0], True, N, V, nt)
        mean = mean_in_row_order(&l[0], N)
    return mean
