"""Shared fixtures: the backend fixture runs the functional suite once per backend.

A compiled backend that fails to load makes its tests fail (not skip): after
``pip install .`` every backend must be there.
"""

import pytest

from fastbptt.backends import _MODULES, resolve_backend

ALL_BACKENDS = list(_MODULES)                     # ["cython", "numba", "numpy"]


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    resolve_backend(request.param)                # raises (test fails) if it does not load
    return request.param
