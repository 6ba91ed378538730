"""A private wrapper of ``scipy.linalg.cython_blas`` for row-major (C-order) arrays.

One fused ``floating`` source serves float32 (``sgemm``) and float64
(``dgemm``). The row-major trick is done here, once: a C-order ``m x n``
matrix is, read by Fortran, its ``n x m`` transpose, so ``C = op(A)·op(B)``
in C order is ``Cᵀ = op(B)ᵀ·op(A)ᵀ`` in Fortran order -- swap the operands,
their transpose flags and ``m``/``n``. (Modelled on scikit-learn's
``sklearn/utils/_cython_blas.pyx``.)

The BLAS behind it is scipy's bundled one (its own OpenBLAS with its own
thread pool, separate from numpy's).
"""

from scipy.linalg.cython_blas cimport dgemm, sgemm


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
