"""What is specific to the Numba backend (:mod:`fastbptt.backends.numba`).

The kernel contract itself (parity with the reference, windows, ``threads=``, ``rows=``,
inputs left alone) is tested once per backend in ``test_kernels.py``. Here:
the three routes of the per-step product (hand-written loop, np.dot, NumPy's
cblas gemm), each forced, at shapes on both sides of the loop/gemm crossover;
the vectorised tanh; the on-disk cache with its fallback where nothing is
writable, and cached kernels loading where NumPy's cblas is not found.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastbptt
from fastbptt.backends import numba as NK
from fastbptt.backends import reference as REF
from fastbptt.engine.core import windows
from helpers import RTOL, TRUNCATIONS, kernel_problem, reference_kernels, rel_err

DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]
ACTS = [pytest.param(REF.ACT_TANH, id="tanh"), pytest.param(REF.ACT_RELU, id="relu")]
# (T, B, H): degenerate sizes, odd H, and B·H² on both sides of the loop/gemm crossover
SHAPES = {
    "T1B1H1": (1, 1, 1),
    "T1B3H5": (1, 3, 5),
    "T9B1H1": (9, 1, 1),
    "T12B1H13": (12, 1, 13),
    "T11B4H13": (11, 4, 13),
    "T10B1H32": (10, 1, 32),
    "T10B1H33": (10, 1, 33),
    "T5B1H129": (5, 1, 129),
    "T8B5H40": (8, 5, 40),
    "T7B2H64": (7, 2, 64),
}
ROUTES = {"loop": NK._GEMM_LOOP, "numba_dot": NK._GEMM_NUMBA_DOT, "numpy_cblas": NK._GEMM_NUMPY_CBLAS}


def test_shapes_cover_both_sides_of_the_crossover():
    for itemsize in (4, 8):
        chosen = {NK._gemm_route(B, H, itemsize, have_numpy_cblas=False) == NK._GEMM_LOOP
                  for (_, B, H) in SHAPES.values()}
        assert chosen == {False, True}


def test_numpy_cblas_is_found_with_numpy_wheels():
    """NumPy's wheels bundle scipy-openblas (ILP64): there the kernels use it."""
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    if blas.get("name") != "scipy-openblas" or "64" not in blas.get("openblas configuration", ""):
        pytest.skip(f"NumPy is built against {blas.get('name')}, not a wheel's scipy-openblas64")
    assert NK.HAVE_NUMPY_CBLAS
    assert NK._gemm_route(1, 16, 8) == NK._gemm_route(8, 64, 4) == NK._GEMM_NUMPY_CBLAS


@pytest.mark.parametrize("route", list(ROUTES.values()), ids=list(ROUTES))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("truncation", list(TRUNCATIONS.values()), ids=list(TRUNCATIONS))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_route_matches_reference(dtype, act, truncation, shape, route):
    """The jitted kernels with the per-step product forced (the entry points pick one per shape)."""
    if route == NK._GEMM_NUMPY_CBLAS and not NK.HAVE_NUMPY_CBLAS:
        pytest.skip("NumPy's cblas gemm was not found here (np.dot is used instead)")
    T, B, H = shape
    A, W_hh, h0, G = kernel_problem(T, B, H, dtype, seed=T * 1000 + B * 100 + H)
    ends, bp_starts = windows(T, truncation)
    Hs_ref, dZ_ref = reference_kernels(A, W_hh, h0, G, act, ends, bp_starts)

    Hs = np.full((T + 1, B, H), np.nan, dtype=dtype)
    Hs[0] = h0
    NK._forward(A, np.ascontiguousarray(W_hh.T), Hs, act, route, 0, B, NK._ALL_ROWS)
    assert rel_err(Hs, Hs_ref) <= RTOL[dtype]

    dZ = np.full_like(G, np.nan)            # every entry must be written, gaps included
    NK._backward(G, Hs_ref, W_hh, ends, bp_starts, act, dZ, route, 0, B, NK._ALL_ROWS)
    assert np.all(np.isfinite(dZ))
    assert rel_err(dZ, dZ_ref) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_vectorised_tanh_is_within_a_few_ulp_of_numpy(dtype):
    rng = np.random.default_rng(11)
    z = np.concatenate([
        rng.normal(scale=3.0, size=200_000), np.linspace(-12, 12, 100_001),
        rng.uniform(-1e-3, 1e-3, 10_000), np.geomspace(1e-300, 1e-30, 50), -np.geomspace(1e-30, 1e3, 50),
        [0.0, 0.17328679513998632, 0.3465735902799726, 8.9, 9.1, 10.0, 19.9, 20.1, 50.0, 1e30, -1e30],
    ]).astype(dtype).reshape(1, -1)
    h = np.zeros_like(z)
    NK._activate_step(h, z, REF.ACT_TANH)
    ref = np.tanh(z.astype(np.float64))
    ulps = np.abs(h.astype(np.float64) - ref) / np.spacing(np.abs(ref).astype(dtype)).astype(np.float64)
    assert ulps.max() <= 4
    assert np.all(np.abs(h) <= 1)
    np.testing.assert_array_equal(np.sign(h), np.sign(z))


# --------------------------------------------------------------------------------------------
# the on-disk cache: used where writable, cleanly skipped where not
# --------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import warnings, numpy as np
    warnings.simplefilter("error")            # any warning (e.g. from numba's cache) fails the child
    import fastbptt.backends.numba as K
    from fastbptt.backends import reference as R
    rng = np.random.default_rng(0)
    A = rng.normal(size=(5, 2, 3)); W = rng.normal(size=(3, 3)) / 3
    Hs = np.zeros((6, 2, 3)); Hs_ref = Hs.copy()
    K.forward_recurrence(A, np.ascontiguousarray(W.T), Hs, 0)
    R.forward_recurrence(A, np.ascontiguousarray(W.T), Hs_ref, 0)
    assert np.allclose(Hs, Hs_ref, rtol=1e-12, atol=0)
    print("CACHING", K.CACHING)
    print("CBLAS", K.HAVE_NUMPY_CBLAS)
    print("HITS", sum(K._forward.stats.cache_hits.values()))
    print("FILE", K.__file__)
""")


def _run_child(pkg_parent, cache_env, prelude=""):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(cache_env)
    env["PYTHONPATH"] = str(pkg_parent)
    proc = subprocess.run([sys.executable, "-c", prelude + _CHILD], env=env, cwd=str(pkg_parent),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr        # no warning spam
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert out["FILE"].startswith(str(pkg_parent))   # the copy, not the source tree
    return out


def _copy_package(tmp_path):
    """A private copy of the package (so this test neither reads nor writes the tree's caches)."""
    src = os.path.dirname(fastbptt.__file__)
    shutil.copytree(src, tmp_path / "fastbptt",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.c", "*.pyd"))
    return tmp_path


def test_kernels_fall_back_to_no_cache_where_nothing_is_writable(tmp_path):
    """Every cache location Numba tries is unusable: the kernels compile and run, silently."""
    parent = _copy_package(tmp_path)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a regular file: no directory can be created under it, even by root")
    (parent / "fastbptt" / "backends" / "__pycache__").write_text("blocks the in-tree cache")
    env = {"NUMBA_CACHE_DIR": str(blocker / "numba"), "XDG_CACHE_HOME": str(blocker / "xdg"),
           "HOME": str(blocker / "home"), "PYTHONDONTWRITEBYTECODE": "1"}
    out = _run_child(parent, env)
    assert out["CACHING"] == "False"


def test_kernels_are_cached_on_disk_where_writable(tmp_path):
    parent = _copy_package(tmp_path)
    cache = tmp_path / "numba_cache"
    env = {"NUMBA_CACHE_DIR": str(cache), "PYTHONDONTWRITEBYTECODE": "1"}
    first = _run_child(parent, env)
    assert first["CACHING"] == "True" and first["HITS"] == "0"
    assert any(name.endswith(".nbi") for _, _, files in os.walk(cache) for name in files)
    second = _run_child(parent, env)
    assert int(second["HITS"]) >= 1


def test_cached_kernels_load_where_numpy_cblas_is_not_found(tmp_path):
    """Kernels cached where NumPy's cblas was found still load and run (through np.dot) where it is not."""
    parent = _copy_package(tmp_path)
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba_cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    first = _run_child(parent, env)
    if first["CBLAS"] != "True":
        pytest.skip("NumPy's cblas gemm is not found here: nothing to fall back from")
    # without threadpoolctl the lookup fails: the symbol names get the placeholder
    second = _run_child(parent, env, prelude="import sys; sys.modules['threadpoolctl'] = None\n")
    assert second["CBLAS"] == "False"
    assert int(second["HITS"]) >= 1
