"""A private wrapper of ``scipy.linalg.cython_blas`` for row-major (C-order) arrays.

One fused ``floating`` source serves float32 (``sgemm``) and float64
(``dgemm``). The row-major trick is done here, once: a C-order ``m x n``
matrix is, read by Fortran, its ``n x m`` transpose, so ``C = op(A)·op(B)``
in C order is ``Cᵀ = op(B)ᵀ·op(A)ᵀ`` in Fortran order -- swap the operands,
their transpose flags and ``m``/``n``. (Modelled on scikit-learn's
``sklearn/utils/_cython_blas.pyx``.)

The BLAS behind ``_gemm`` is scipy's bundled one (its own OpenBLAS with its
own thread pool, separate from numpy's). ``pgemm``, the big GEMMs of
``fastbptt._core`` split between OpenMP threads, runs on NumPy's BLAS when
``use_cblas`` was given its entry points (``fastbptt._blas`` does that).
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t, intptr_t
from scipy.linalg.cython_blas cimport dgemm, sgemm

import numpy as np


cdef void _gemm(BLAS_Trans ta, BLAS_Trans tb, int m, int n, int k,
                floating alpha, const floating *A, int lda,
                const floating *B, int ldb,
                floating beta, floating *C, int ldc) noexcept nogil:
    """``C := alpha·op(A)·op(B) + beta·C`` on row-major arrays.

    ``C`` is ``m x n`` with row stride ``ldc``; ``op(A)`` is ``m x k`` and
    ``op(B)`` is ``k x n``; ``lda``/``ldb`` are the row strides (in elements)
    of ``A``/``B`` as stored. BLAS does not write ``A`` or ``B``; the casts
    only drop ``const`` from its Fortran-style prototypes.
    """
    cdef char ta_ = ta
    cdef char tb_ = tb
    # row-major C = op(A)·op(B)  <=>  column-major Cᵀ = op(B)ᵀ·op(A)ᵀ
    if floating is float:
        sgemm(&tb_, &ta_, &n, &m, &k, &alpha, <float *> B, &ldb,
              <float *> A, &lda, &beta, C, &ldc)
    else:
        dgemm(&tb_, &ta_, &n, &m, &k, &alpha, <double *> B, &ldb,
              <double *> A, &lda, &beta, C, &ldc)


def gemm(bint trans_a, bint trans_b, double alpha, const floating[:, ::1] A,
         const floating[:, ::1] B, double beta, floating[:, ::1] C):
    """``C := alpha·op(A)·op(B) + beta·C`` in place; the test entry point of ``_gemm``.

    Parameters
    ----------
    trans_a, trans_b : bool
        Whether ``op`` transposes ``A`` / ``B``.
    alpha, beta : float
        Cast to the arrays' dtype.
    A : C-contiguous ndarray of shape (m, k), or (k, m) if ``trans_a``
    B : C-contiguous ndarray of shape (k, n), or (n, k) if ``trans_b``
    C : C-contiguous ndarray of shape (m, n), same dtype; overwritten.
    """
    cdef int m = A.shape[1] if trans_a else A.shape[0]
    cdef int k = A.shape[0] if trans_a else A.shape[1]
    cdef int kb = B.shape[1] if trans_b else B.shape[0]
    cdef int n = B.shape[0] if trans_b else B.shape[1]
    if kb != k or C.shape[0] != m or C.shape[1] != n:
        raise ValueError(
            f"gemm: op(A) is ({m}, {k}) and op(B) is ({kb}, {n}), expected op(B) of shape "
            f"({k}, {n}) and C of shape ({m}, {n}), got C of shape ({C.shape[0]}, {C.shape[1]})")
    if m == 0 or n == 0:
        return
    if k == 0:  # BLAS then only scales C; keep it simple and identical here
        for i in range(m):
            for j in range(n):
                C[i, j] = <floating> beta * C[i, j] if beta != 0 else 0
        return
    cdef BLAS_Trans ta = Trans if trans_a else NoTrans
    cdef BLAS_Trans tb = Trans if trans_b else NoTrans
    with nogil:
        _gemm(ta, tb, m, n, k, <floating> alpha, &A[0, 0], A.shape[1], &B[0, 0], B.shape[1],
              <floating> beta, &C[0, 0], C.shape[1])


# ---------------------------------------------------------------------------------------------
# pgemm: one GEMM split between OpenMP threads, on NumPy's BLAS where it was found
# ---------------------------------------------------------------------------------------------

# NumPy's ILP64 cblas gemm (see fastbptt._blas): order and transposes are C enums (int), sizes int64
ctypedef void (*_cblas_sgemm_t)(int, int, int, int64_t, int64_t, int64_t, float, const float *,
                                int64_t, const float *, int64_t, float, float *, int64_t) noexcept nogil
ctypedef void (*_cblas_dgemm_t)(int, int, int, int64_t, int64_t, int64_t, double, const double *,
                                int64_t, const double *, int64_t, double, double *, int64_t) noexcept nogil
cdef _cblas_sgemm_t _np_sgemm = NULL
cdef _cblas_dgemm_t _np_dgemm = NULL
cdef int _ROW_MAJOR = 101, _NO_TRANS = 111, _TRANS = 112


cdef extern from *:
    """
    #ifdef _OPENMP
    #define FASTBPTT_BLAS_OPENMP 1
    #else
    #define FASTBPTT_BLAS_OPENMP 0
    #endif
    """
    int FASTBPTT_BLAS_OPENMP

#: whether the build has OpenMP (without it ``pgemm`` runs its parts one after another)
OPENMP = bool(FASTBPTT_BLAS_OPENMP)


def use_cblas(intptr_t sgemm_address, intptr_t dgemm_address):
    """Run :func:`pgemm` on the cblas ``?gemm`` at these addresses (NumPy's ILP64 ones; 0: SciPy's BLAS)."""
    global _np_sgemm, _np_dgemm
    _np_sgemm = <_cblas_sgemm_t> sgemm_address
    _np_dgemm = <_cblas_dgemm_t> dgemm_address


def using_cblas():
    """Whether :func:`pgemm` runs on the cblas given to :func:`use_cblas` (else SciPy's BLAS)."""
    return _np_sgemm != NULL and _np_dgemm != NULL


cdef void _any_gemm(bint ta, bint tb, int64_t m, int64_t n, int64_t k, const floating *A, int64_t lda,
                    const floating *B, int64_t ldb, floating *C, int64_t ldc) noexcept nogil:
    """Row-major ``C = op(A)·op(B)`` on NumPy's cblas if set, else through ``_gemm`` (SciPy's)."""
    if floating is float:
        if _np_sgemm != NULL:
            _np_sgemm(_ROW_MAJOR, _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS,
                      m, n, k, 1.0, A, lda, B, ldb, 0.0, C, ldc)
            return
    else:
        if _np_dgemm != NULL:
            _np_dgemm(_ROW_MAJOR, _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS,
                      m, n, k, 1.0, A, lda, B, ldb, 0.0, C, ldc)
            return
    _gemm(Trans if ta else NoTrans, Trans if tb else NoTrans, <int> m, <int> n, <int> k,
          <floating> 1.0, A, <int> lda, B, <int> ldb, <floating> 0.0, C, <int> ldc)


cdef inline int64_t _start(int64_t p, int64_t n, int64_t size) noexcept nogil:
    """First index of part ``p`` of ``n`` near-equal parts of ``size`` (as ``fastbptt._threads.parts``)."""
    return p * (size // n) + (p if p < size % n else size % n)


def pgemm(bint trans_a, bint trans_b, const floating[:, ::1] A, const floating[:, ::1] B,
          floating[:, ::1] C, int threads):
    """``C = op(A)·op(B)``, split between ``threads`` OpenMP threads, each on single-threaded BLAS.

    The rows of ``C`` are split; with ``trans_a`` (and not ``trans_b``) the
    rows of ``A`` are the contraction, so that split goes by the contraction
    instead: each thread sums its share into a work array and the sums are
    added into ``C``. With both transposes it is one call.

    Parameters
    ----------
    trans_a, trans_b : bool
    A : C-contiguous (m, k), or (k, m) if ``trans_a``
    B : C-contiguous (k, n), or (n, k) if ``trans_b``
    C : C-contiguous (m, n), same dtype; overwritten
    threads : int >= 1
    """
    cdef int64_t m = A.shape[1] if trans_a else A.shape[0]
    cdef int64_t k = A.shape[0] if trans_a else A.shape[1]
    cdef int64_t kb = B.shape[1] if trans_b else B.shape[0]
    cdef int64_t n = B.shape[0] if trans_b else B.shape[1]
    if kb != k or C.shape[0] != m or C.shape[1] != n:
        raise ValueError(
            f"pgemm: op(A) is ({m}, {k}) and op(B) is ({kb}, {n}), expected op(B) of shape "
            f"({k}, {n}) and C of shape ({m}, {n}), got C of shape ({C.shape[0]}, {C.shape[1]})")
    if threads < 1:
        raise ValueError(f"threads: expected an int >= 1, got {threads}")
    if m == 0 or n == 0:
        return
    if k == 0:
        C[:, :] = 0
        return
    cdef int64_t lda = A.shape[1], ldb = B.shape[1], parts, p, lo, hi, i, j, q
    cdef floating[:, :, ::1] sums
    cdef floating *dst
    if trans_a and not trans_b:
        parts = min(<int64_t> threads, k)
        if parts == 1:
            with nogil:
                _any_gemm(True, False, m, n, k, &A[0, 0], lda, &B[0, 0], ldb, &C[0, 0], n)
            return
        sums = np.empty((parts - 1, m, n), dtype=np.float32 if floating is float else np.float64)
        for p in prange(parts, nogil=True, num_threads=parts, schedule="static", chunksize=1):
            lo = _start(p, parts, k)
            hi = _start(p + 1, parts, k)
            dst = &C[0, 0] if p == 0 else &sums[p - 1, 0, 0]
            _any_gemm(True, False, m, n, hi - lo, &A[lo, 0], lda, &B[lo, 0], ldb, dst, n)
        with nogil:
            for q in range(parts - 1):
                for i in range(m):
                    for j in range(n):
                        C[i, j] += sums[q, i, j]
        return
    parts = 1 if trans_a else min(<int64_t> threads, m)
    if parts == 1:
        with nogil:
            _any_gemm(trans_a, trans_b, m, n, k, &A[0, 0], lda, &B[0, 0], ldb, &C[0, 0], n)
        return
    for p in prange(parts, nogil=True, num_threads=parts, schedule="static", chunksize=1):
        lo = _start(p, parts, m)
        hi = _start(p + 1, parts, m)
        _any_gemm(False, trans_b, hi - lo, n, k, &A[lo, 0], lda, &B[0, 0], ldb, &C[lo, 0], n)
