# Declarations of fastbptt's C thread team (see _cython_pool.pyx).

ctypedef void (*part_fn)(void *arg, Py_ssize_t part, Py_ssize_t parts) noexcept nogil

cdef void run_parts(part_fn fn, void *arg, Py_ssize_t parts) noexcept nogil
