"""A private wrapper of ``scipy.linalg.cython_blas`` for row-major (C-order) arrays.

One fused ``floating`` source serves float32 (``sgemm``) and float64
(``dgemm``). The row-major trick is done here, once: a C-order ``m x n``
matrix is, read by Fortran, its ``n x m`` transpose, so ``C = op(A)·op(B)``
in C order is ``Cᵀ = op(B)ᵀ·op(A)ᵀ`` in Fortran order -- swap the operands,
their transpose flags and ``m``/``n``. (Modelled on scikit-learn's
``sklearn/utils/_cython_blas.pyx``.)

The BLAS behind ``_gemm`` is scipy's bundled one (its own OpenBLAS with its
own thread pool, separate from numpy's). ``pgemm``, the big GEMMs of
``fastbptt.engine.core`` split between the threads of fastbptt's C team, runs on NumPy's BLAS when
``use_cblas`` was given its entry points (``fastbptt.engine.blas`` does that).
"""

from fastbptt.backends.cython.pool cimport part_start, run_parts
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


def _op_shapes(name, bint trans_a, bint trans_b, Py_ssize_t a0, Py_ssize_t a1, Py_ssize_t b0,
               Py_ssize_t b1, Py_ssize_t c0, Py_ssize_t c1):
    """``(m, k, n)`` of ``C (m, n) = op(A) (m, k) · op(B) (k, n)``; a ValueError if they do not fit."""
    m, k = (a1, a0) if trans_a else (a0, a1)
    kb, n = (b1, b0) if trans_b else (b0, b1)
    if kb != k or c0 != m or c1 != n:
        raise ValueError(
            f"{name}: op(A) is ({m}, {k}) and op(B) is ({kb}, {n}), expected op(B) of shape "
            f"({k}, {n}) and C of shape ({m}, {n}), got C of shape ({c0}, {c1})")
    return m, k, n


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
    cdef int m, k, n
    m, k, n = _op_shapes("gemm", trans_a, trans_b, A.shape[0], A.shape[1], B.shape[0], B.shape[1],
                         C.shape[0], C.shape[1])
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
# pgemm: one GEMM split between the threads of the C team, on NumPy's BLAS where it was found
# ---------------------------------------------------------------------------------------------

# NumPy's ILP64 cblas gemm (see fastbptt.engine.blas): order and transposes are C enums (int), sizes int64
ctypedef void (*_cblas_sgemm_t)(int, int, int, int64_t, int64_t, int64_t, float, const float *,
                                int64_t, const float *, int64_t, float, float *, int64_t) noexcept nogil
ctypedef void (*_cblas_dgemm_t)(int, int, int, int64_t, int64_t, int64_t, double, const double *,
                                int64_t, const double *, int64_t, double, double *, int64_t) noexcept nogil
cdef _cblas_sgemm_t _np_sgemm = NULL
cdef _cblas_dgemm_t _np_dgemm = NULL
cdef int _ROW_MAJOR = 101, _NO_TRANS = 111, _TRANS = 112


#: ``pgemm`` splits on fastbptt's C thread team (:mod:`fastbptt.backends.cython.pool`)
TEAM = True


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
    _cgemm(ta, tb, m, n, k, A, lda, B, ldb, 0, C, ldc)


cdef extern from "tn_kernel.h":
    int fb_tn_f32(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B,
                  int64_t ldb, float beta, float *C, int64_t ldc) noexcept nogil
    int fb_tn_f64(int64_t M, int64_t N, int64_t K, const double *A, int64_t lda, const double *B,
                  int64_t ldb, double beta, double *C, int64_t ldc) noexcept nogil
    int fb_tn_set_mode(int mode) noexcept nogil
    int fb_tn_available() noexcept nogil


def _set_tn(int mode):
    """Tests: the weight gradients' own ``Aᵀ·B`` kernel (``tn_kernel.h``) never (0), wherever it runs (1)
    or by shape (-1, the default); returns the previous mode."""
    if mode not in (-1, 0, 1):
        raise ValueError(f"mode: expected -1, 0 or 1, got {mode}")
    return fb_tn_set_mode(mode)


def _tn_product(const floating[:, ::1] A, const floating[:, ::1] B, floating[:, ::1] C, double beta):
    """Tests: ``C = beta·C + Aᵀ·B`` on the kernel of ``tn_kernel.h`` alone, whatever the mode; returns
    whether it ran (False: no AVX-512 here, and ``C`` is left alone)."""
    cdef int64_t m, k, n
    m, k, n = _op_shapes("_tn_product", True, False, A.shape[0], A.shape[1], B.shape[0], B.shape[1],
                         C.shape[0], C.shape[1])
    cdef int old = fb_tn_set_mode(1), status
    with nogil:
        if floating is float:
            status = fb_tn_f32(m, n, k, &A[0, 0], A.shape[1], &B[0, 0], B.shape[1], <float> beta, &C[0, 0], n)
        else:
            status = fb_tn_f64(m, n, k, &A[0, 0], A.shape[1], &B[0, 0], B.shape[1], beta, &C[0, 0], n)
    fb_tn_set_mode(old)
    return status == 0


def tn_available():
    """Whether the ``Aᵀ·B`` kernel runs on this CPU (x86-64 with AVX-512F, a GCC build)."""
    return bool(fb_tn_available())


cdef void _cgemm(bint ta, bint tb, int64_t m, int64_t n, int64_t k, const floating *A, int64_t lda,
                 const floating *B, int64_t ldb, floating beta, floating *C, int64_t ldc) noexcept nogil:
    """Row-major ``C = op(A)·op(B) + beta·C`` on NumPy's cblas if set, else through ``_gemm``;
    ``Aᵀ·B`` on the kernel of ``tn_kernel.h`` where it runs."""
    if ta and not tb:
        if floating is float:
            if fb_tn_f32(m, n, k, A, lda, B, ldb, beta, C, ldc) == 0:
                return
        else:
            if fb_tn_f64(m, n, k, A, lda, B, ldb, beta, C, ldc) == 0:
                return
    if floating is float:
        if _np_sgemm != NULL:
            _np_sgemm(_ROW_MAJOR, _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS,
                      m, n, k, 1.0, A, lda, B, ldb, beta, C, ldc)
            return
    else:
        if _np_dgemm != NULL:
            _np_dgemm(_ROW_MAJOR, _TRANS if ta else _NO_TRANS, _TRANS if tb else _NO_TRANS,
                      m, n, k, 1.0, A, lda, B, ldb, beta, C, ldc)
            return
    _gemm(Trans if ta else NoTrans, Trans if tb else NoTrans, <int> m, <int> n, <int> k,
          <floating> 1.0, A, <int> lda, B, <int> ldb, beta, C, <int> ldc)


cdef struct _GemmJob:
    # one pgemm call: by rows of C (split_k false) or by the contraction (split_k true)
    bint trans_b, split_k, is_double
    int64_t m, n, k, lda, ldb
    const void *A
    const void *B
    void *C
    void *sums              # split_k: (parts - 1, m, n), the sums of parts 1, 2, ...


cdef void _gemm_part(void *arg, Py_ssize_t p, Py_ssize_t parts) noexcept nogil:
    cdef _GemmJob *j = <_GemmJob *> arg
    cdef int64_t lo, hi
    if j.split_k:
        lo = part_start(p, parts, j.k)
        hi = part_start(p + 1, parts, j.k)
        if j.is_double:
            _any_gemm(True, False, j.m, j.n, hi - lo, <const double *> j.A + lo * j.lda, j.lda,
                      <const double *> j.B + lo * j.ldb, j.ldb,
                      <double *> j.C if p == 0 else <double *> j.sums + (p - 1) * j.m * j.n, j.n)
        else:
            _any_gemm(True, False, j.m, j.n, hi - lo, <const float *> j.A + lo * j.lda, j.lda,
                      <const float *> j.B + lo * j.ldb, j.ldb,
                      <float *> j.C if p == 0 else <float *> j.sums + (p - 1) * j.m * j.n, j.n)
    else:
        lo = part_start(p, parts, j.m)
        hi = part_start(p + 1, parts, j.m)
        if j.is_double:
            _any_gemm(False, j.trans_b, hi - lo, j.n, j.k, <const double *> j.A + lo * j.lda, j.lda,
                      <const double *> j.B, j.ldb, <double *> j.C + lo * j.n, j.n)
        else:
            _any_gemm(False, j.trans_b, hi - lo, j.n, j.k, <const float *> j.A + lo * j.lda, j.lda,
                      <const float *> j.B, j.ldb, <float *> j.C + lo * j.n, j.n)


def pgemm(bint trans_a, bint trans_b, const floating[:, ::1] A, const floating[:, ::1] B,
          floating[:, ::1] C, int threads):
    """``C = op(A)·op(B)``, split between ``threads`` threads of the team, each on single-threaded BLAS.

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
    cdef int64_t m, k, n
    m, k, n = _op_shapes("pgemm", trans_a, trans_b, A.shape[0], A.shape[1], B.shape[0], B.shape[1],
                         C.shape[0], C.shape[1])
    if threads < 1:
        raise ValueError(f"threads: expected an int >= 1, got {threads}")
    if m == 0 or n == 0:
        return
    if k == 0:
        C[:, :] = 0
        return
    cdef int64_t parts, q, i, j
    cdef floating[:, :, ::1] sums
    cdef _GemmJob job
    job.trans_b = trans_b
    job.is_double = floating is double
    job.m = m
    job.n = n
    job.k = k
    job.lda = A.shape[1]
    job.ldb = B.shape[1]
    job.A = &A[0, 0]
    job.B = &B[0, 0]
    job.C = &C[0, 0]
    job.sums = NULL
    if trans_a and trans_b:
        with nogil:
            _any_gemm(True, True, m, n, k, &A[0, 0], job.lda, &B[0, 0], job.ldb, &C[0, 0], n)
        return
    job.split_k = trans_a
    parts = min(<int64_t> threads, k if trans_a else m)
    if trans_a and parts > 1:
        sums = np.empty((parts - 1, m, n), dtype=np.float32 if floating is float else np.float64)
        job.sums = &sums[0, 0, 0]
    with nogil:
        run_parts(_gemm_part, &job, parts)
        if job.sums != NULL:
            for q in range(parts - 1):
                for i in range(m):
                    for j in range(n):
                        C[i, j] += sums[q, i, j]
