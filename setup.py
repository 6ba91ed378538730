"""Build of the Cython extensions (everything else is in pyproject.toml).

Compiler directives are set once here. ``FASTBPTT_CYTHON_DEBUG=1`` turns the
bounds and wraparound checks back on for a debug build.
"""

import os
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

extensions = [
    Extension(
        f"fastbptt.{pyx.stem}",
        [str(pyx)],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=["-O3", "-funroll-loops"] if not DEBUG else ["-O0", "-g"],
    )
    for pyx in sorted(Path("fastbptt").glob("*.pyx"))
]

setup(ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES))
