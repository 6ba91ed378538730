# Declarations of the private BLAS wrapper (see _cython_blas.pyx).
# Other Cython modules of fastbptt cimport ``_gemm`` from here and never call
# scipy.linalg.cython_blas directly.

from cython cimport floating
from libc.stdint cimport int64_t


# The transpose flags, as the characters BLAS takes ('n' and 't').
cpdef enum BLAS_Trans:
    NoTrans = 110
    Trans = 116


cdef void _gemm(BLAS_Trans ta, BLAS_Trans tb, int m, int n, int k,
                floating alpha, const floating *A, int lda,
                const floating *B, int ldb,
                floating beta, floating *C, int ldc) noexcept nogil


# ``C := op(A)·op(B) + beta·C`` on NumPy's BLAS when ``use_cblas`` gave it, else on ``_gemm``.
cdef void _cgemm(bint ta, bint tb, int64_t m, int64_t n, int64_t k, const floating *A, int64_t lda,
                 const floating *B, int64_t ldb, floating beta, floating *C, int64_t ldc) noexcept nogil
