"""Shared fixtures: the backend fixture runs the functional suite once per backend.

A compiled backend that fails to load makes its tests fail (not skip): after
``pip install .`` every backend must be there.

The dispatcher's learning is off for the suite (``FASTBPTT_LEARN=0``: "auto" is
the shipped table's choice, fixed, so two calls give the same bits) and its
cache is a temporary directory, never the user's; the ``learn`` fixture turns
learning on where a test needs it. Set here, at import, so that the suite's
subprocesses inherit them.
"""

import atexit
import os
import shutil
import tempfile

import pytest

from fastbptt.backends import _MODULES, resolve_backend

ALL_BACKENDS = list(_MODULES)                     # ["cython", "numba", "numpy"]

os.environ["FASTBPTT_LEARN"] = "0"
os.environ["FASTBPTT_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="fastbptt-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    resolve_backend(request.param)                # raises (test fails) if it does not load
    return request.param


@pytest.fixture
def learn(monkeypatch, tmp_path):
    """Learning on, the cache in ``tmp_path``, nothing learned before or after the test;
    yields the cache file's path."""
    from fastbptt.backends import _wisdom as W
    monkeypatch.setenv("FASTBPTT_LEARN", "1")
    monkeypatch.setenv("FASTBPTT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTBPTT_BACKEND", raising=False)
    W.forget()
    yield tmp_path / W.FILE_NAME
    W.forget()
