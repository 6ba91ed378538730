# Declarations of fastbptt's C thread team (see _cython_pool.pyx).

ctypedef void (*part_fn)(void *arg, Py_ssize_t part, Py_ssize_t parts) noexcept nogil

cdef void run_parts(part_fn fn, void *arg, Py_ssize_t parts) noexcept nogil


cdef inline Py_ssize_t part_start(Py_ssize_t p, Py_ssize_t n, Py_ssize_t size) noexcept nogil:
    """First index of part ``p`` of ``n`` near-equal parts of ``size`` (as ``fastbptt._threads.parts``)."""
    return p * (size // n) + (p if p < size % n else size % n)
