"""NumPy's own BLAS, found once, and the split GEMM built on it.

NumPy's wheels bundle an OpenBLAS of their own (SciPy's is another, older
one); its sgemm ran the shapes of a training step 10-25% faster here (e.g.
(128, 32000)·(32000, 128): 78 vs 61 GFLOP/s on one core). Its ILP64 cblas
entry points are found by symbol name in the loaded library: the Numba
kernels call them for the per-step product, and :func:`pgemm` (the Cython
extension's GEMM split on fastbptt's C thread team) for the big GEMMs of
:mod:`fastbptt.engine.core`.
"""

import ctypes
import os

import numpy as np

_CBLAS_SYMBOLS = {"s": ("scipy_cblas_sgemm64_", "cblas_sgemm64_"),
                  "d": ("scipy_cblas_dgemm64_", "cblas_dgemm64_")}
_found = False
_cblas = None


def numpy_cblas():
    """``{"s": address, "d": address}`` of NumPy's ILP64 cblas_sgemm / cblas_dgemm, or None."""
    global _found, _cblas
    if _found:
        return _cblas
    _found = True
    try:
        from threadpoolctl import ThreadpoolController
        numpy_dir = os.path.dirname(os.path.abspath(np.__file__))    # .../numpy; wheels: numpy.libs
        for lib in ThreadpoolController().lib_controllers:
            if lib.internal_api != "openblas" or not os.path.abspath(lib.filepath).startswith(numpy_dir):
                continue
            dll = ctypes.CDLL(lib.filepath)
            found = {}
            for kind, names in _CBLAS_SYMBOLS.items():
                for name in names:
                    if hasattr(dll, name):
                        found[kind] = ctypes.cast(getattr(dll, name), ctypes.c_void_p).value
                        break
            if len(found) == 2:
                _cblas = found
                break
    except Exception:   # no threadpoolctl, an unusual build: the callers have fallbacks
        pass
    return _cblas


def _load_pgemm():
    """The Cython extension's ``pgemm``, pointed at NumPy's cblas where found; None without the extension."""
    try:
        from ..backends.cython.blas import pgemm, use_cblas
    except ImportError:
        return None
    found = numpy_cblas()
    if found is not None:
        use_cblas(found["s"], found["d"])
    return pgemm


#: ``pgemm(trans_a, trans_b, A, B, C, threads)`` or None (see ``backends/cython/blas.pyx``)
pgemm = _load_pgemm()
