"""Build of the Cython extensions (everything else is in pyproject.toml).

Compiler directives are set once here. ``FASTBPTT_CYTHON_DEBUG=1`` turns the
bounds and wraparound checks back on for a debug build. On x86-64 Linux the
kernels' tanh uses glibc's vector math library (libmvec, see
``fastbptt/backends/cython/kernels.pyx``); ``FASTBPTT_NO_LIBMVEC=1`` builds with
libm's scalar tanh instead.
"""

import ctypes.util
import os
import platform
import sys
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTBPTT_CYTHON_DEBUG", "") not in ("", "0")
DIRECTIVES = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
}

LIBMVEC = (sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
           and os.environ.get("FASTBPTT_NO_LIBMVEC", "") in ("", "0")
           and ctypes.util.find_library("mvec") is not None)


# The optimizers' rules (update.pyx) are bit-identical to NumPy's: no contraction into FMAs; sqrt
# without errno, so that the loops vectorise.
EXTRA = {"update": ["-ffp-contract=off", "-fno-math-errno"]}


def _local_headers(pyx):
    """The C headers beside ``pyx`` if it includes one (they include each other): rebuild on change."""
    headers = sorted(pyx.parent.glob("*.h"))
    return [str(h) for h in headers] if any(f'"{h.name}"' in pyx.read_text() for h in headers) else []


extensions = [
    Extension(
        ".".join(pyx.with_suffix("").parts),
        [str(pyx)],
        depends=_local_headers(pyx),
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
        + ([("FASTBPTT_LIBMVEC", "1")] if LIBMVEC else []),
        libraries=["mvec"] if LIBMVEC else [],
        extra_compile_args=(["-O3", "-funroll-loops"] if not DEBUG else ["-O0", "-g"]) + EXTRA.get(pyx.stem, []),
    )
    for pyx in sorted(Path("fastbptt").rglob("*.pyx"))
]

setup(ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES))
