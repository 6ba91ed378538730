# Declarations of the private BLAS wrapper (see _cython_blas.pyx).
# Other Cython modules of fastbptt cimport ``_gemm`` from here and never call
# scipy.linalg.cython_blas directly.

from cython cimport floating


# The transpose flags, as the characters BLAS takes ('n' and 't').
cpdef enum BLAS_Trans:
    NoTrans = 110
    Trans = 116


cdef void _gemm(BLAS_Trans ta, BLAS_Trans tb, int m, int n, int k,
                floating alpha, const floating *A, int lda,
                const floating *B, int ldb,
                floating beta, floating *C, int ldc) noexcept nogil
