"""What is specific to the Cython backend: its product paths, debug checks, BLAS wrapper and tanh.

The kernel contract itself (parity with the reference, windows, ``rows=``,
``threads=``, inputs left alone) is tested once per backend in
``test_kernels.py``, and the C team's row and column splits in
``test_parallel.py``. Here: each per-step product path forced (BLAS, the
small-shape loop portable and, where the CPU has it, AVX-512, and the
small-batch SIMD kernels at each of their levels: AVX-512, AVX2 and portable,
each where the CPU has its instructions) on
both sides of the crossover, the argument checks of the ``def`` entry points,
the BLAS wrapper, and each tanh implementation.
"""

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from fastbptt.backends import reference as R
from fastbptt.engine.core import windows
from helpers import RTOL, TRUNCATIONS, kernel_problem, reference_kernels, rel_err

import fastbptt.backends.cython.kernels as K  # noqa: E402  (must load: a missing build fails here)
import fastbptt.backends.cython.blas as CB  # noqa: E402

DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]
ACTS = [pytest.param(R.ACT_TANH, id="tanh"), pytest.param(R.ACT_RELU, id="relu")]
# the small-shape loop: the portable one (level 0) and, where the CPU has it, the AVX-512 one
_MV_START = K._set_matvec_level(2)
K._set_matvec_level(_MV_START)
_SIMD_START = K.SIMD_IMPL


def _cpu_has(level):
    """Whether this CPU runs the small-batch SIMD kernels at ``level``."""
    try:
        K._set_simd_level(level)
        return True
    except RuntimeError:
        return False
    finally:
        K._set_simd_level(_SIMD_START)


# the small-batch SIMD kernels (_path=2) at each level the CPU has (these machines have all three;
# a level whose instructions the CPU lacks cannot run here: skipped, saying so)
_LACKS = {level: pytest.mark.skipif(not _cpu_has(level), reason=f"this CPU lacks the {level} instructions")
          for level in ("avx512", "avx2")}
SIMD_PATHS = [pytest.param((2, level), id=f"simd-{level}", marks=_LACKS.get(level, ()))
              for level in ("avx512", "avx2", "portable")]
# forced paths ("auto", the per-shape choice, is the contract's: test_kernels.py)
PATHS = ([pytest.param(0, id="blas"), pytest.param((1, 0), id="small-portable")]
         + ([pytest.param((1, 2), id="small-avx512")] if _MV_START == 2 else []) + SIMD_PATHS)


@pytest.fixture(autouse=True)
def _restore_matvec_level():
    yield
    K._set_matvec_level(_MV_START)
    K._set_simd_level(_SIMD_START)


def _use_path(path):
    """``_path`` for the kernels, after setting the small loop's level when ``path`` is (1, level)
    or the SIMD kernels' level when it is (2, name)."""
    if isinstance(path, tuple):
        if path[0] == 2:
            assert K._set_simd_level(path[1]) == path[1]
        else:
            assert K._set_matvec_level(path[1]) == path[1]
        return path[0]
    return path


SHAPES = {  # T, B, H
    "T1": (1, 3, 5),
    "B1": (9, 1, 7),
    "H1": (6, 2, 1),
    "H13": (11, 4, 13),
    "small_B1H16": (17, 1, 16),     # B*H = 16: the small loop under "auto"
    "small_B4H4": (12, 4, 4),
    "blas_B1H24": (15, 1, 24),      # just above the crossover: BLAS under "auto"
    "blas_B3H40": (8, 3, 40),
    "odd_H70B17": (5, 17, 70),     # forced SIMD kernels: rows in groups of 4, then 1
    "simd_B2H100": (6, 2, 100),    # whole vectors and a partial last one at every width
    "simd_B1H300": (5, 1, 300),    # several tiles of 8 vectors per row, then a partial one
    "simd_B1H100": (7, 1, 100),    # one row over all its vectors in one pass, the last partial
    "simd_B1H128": (4, 1, 128),    # one row over 8 whole vectors (float32 AVX-512) in one pass
}


def _forward(mod, A, W_hh, h0, act, **kw):
    T, B, H = A.shape
    Hs = np.empty((T + 1, B, H), dtype=A.dtype)
    Hs[0] = h0
    mod.forward_recurrence(A, np.ascontiguousarray(W_hh.T), Hs, act, **kw)
    return Hs


def test_activation_codes_are_the_references():
    assert (K.ACT_TANH, K.ACT_RELU) == (R.ACT_TANH, R.ACT_RELU)


@_LACKS["avx512"]
def test_simd_rule_sides():
    """Where "auto" sends a part of the batch to the SIMD kernels (at the AVX-512 level)."""
    K._set_simd_level("avx512")
    for B, H in ((1, 32), (1, 100), (1, 7), (4, 256), (3, 64), (2, 48), (4, 4), (3, 8)):  # online, chunk
        assert K.uses_simd(B, H, np.float32), (B, H)
    for B, H in ((5, 32), (8, 64), (32, 64), (8, 128), (16, 100)):     # small, longseq: rows a thread
        assert K.uses_simd(B, H, np.float32), (B, H)
    for B, H in ((5, 129), (17, 128), (64, 128), (2, 64)):
        assert not K.uses_simd(B, H, np.float32), (B, H)
    assert not K.uses_simd(5, 32, np.float64)
    assert K.uses_simd(4, 256, np.float64) and K.uses_simd(3, 128, np.float64)
    assert not K.uses_simd(2, 32, np.float64) and not K.uses_simd(3, 8, np.float64)


@_LACKS["avx512"]
def test_packed_rule_sides():
    """Where "auto" takes the packed column split on a team of 2 (float32, the AVX-512 loop)."""
    for rows, H in ((64, 256), (32, 256), (16, 384), (20, 800), (128, 1024)):     # medium, wide, large
        assert K._use_packed(2, rows, H, False), (rows, H)
    for rows, H in ((16, 256), (128, 256), (64, 128), (8, 384)):
        assert not K._use_packed(2, rows, H, False), (rows, H)
    assert not K._use_packed(2, 64, 256, True)


def test_crossover_rule_sides():
    for key in ("small_B1H16", "small_B4H4"):
        _, B, H = SHAPES[key]
        assert K.uses_small_loop(B, H), key
    for key in ("blas_B1H24", "blas_B3H40", "odd_H70B17"):
        _, B, H = SHAPES[key]
        assert not K.uses_small_loop(B, H), key


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("truncation", list(TRUNCATIONS.values()), ids=list(TRUNCATIONS))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_path_matches_reference(dtype, act, truncation, shape, path):
    T, B, H = shape
    A, W_hh, h0, G = kernel_problem(T, B, H, dtype, seed=T * 1000 + B * 100 + H)
    ends, bp_starts = windows(T, truncation)
    Hs_ref, dZ_ref = reference_kernels(A, W_hh, h0, G, act, ends, bp_starts)
    _path = _use_path(path)
    assert rel_err(_forward(K, A, W_hh, h0, act, _path=_path), Hs_ref) <= RTOL[dtype]
    dZ = np.full_like(G, np.nan)            # the kernel must overwrite, not add to, dZ
    K.backward_accumulate(G, Hs_ref, W_hh, ends, bp_starts, act, dZ, _path=_path)
    assert np.all(np.isfinite(dZ))
    assert rel_err(dZ, dZ_ref) <= RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_windows_each_path_and_split(dtype, fused_dz):
    """Windows the public truncations never make (see test_kernels.py), on every path and split."""
    A, W_hh, h0, G = kernel_problem(12, 2, 6, dtype, seed=3)
    for ends, bp_starts in (([5, 6, 12], [3, 0, 9]), ([4, 9], [2, 7])):
        ends, bp_starts = np.array(ends, dtype=np.int64), np.array(bp_starts, dtype=np.int64)
        Hs, ref = reference_kernels(A, W_hh, h0, G, R.ACT_TANH, ends, bp_starts)
        for path in (0, (1, 0)) + (((1, 2),) if _MV_START == 2 else ()) + tuple(p.values[0] for p in SIMD_PATHS):
            for threads, split in ((1, 0), (2, 0), (2, 1), (1, 2), (2, 2), (2, 3)):
                got = np.full_like(G, np.nan)
                K.backward_accumulate(G, Hs, W_hh, ends, bp_starts, R.ACT_TANH, got,
                                      _path=_use_path(path), threads=threads, _split=split)
                assert rel_err(got, ref) <= RTOL[dtype]


def test_kernel_bad_input():
    A, W_hh, h0, G = kernel_problem(4, 2, 3, np.float64, seed=0)
    Hs = _forward(R, A, W_hh, h0, R.ACT_TANH)
    ends, bp_starts = windows(4, None)
    dZ = np.empty_like(G)
    with pytest.raises(ValueError, match="Hs"):
        K.forward_recurrence(A, W_hh, np.empty((4, 2, 3)), R.ACT_TANH)
    with pytest.raises(ValueError, match="W_hhT"):
        K.forward_recurrence(A, np.empty((3, 4)), Hs.copy(), R.ACT_TANH)
    with pytest.raises(ValueError, match="act"):
        K.forward_recurrence(A, W_hh, Hs.copy(), 2)
    with pytest.raises(ValueError, match="_path"):
        K.forward_recurrence(A, W_hh, Hs.copy(), R.ACT_TANH, _path=5)
    K._set_simd_level("off")
    with pytest.raises(ValueError, match="_path=2: the small-batch SIMD kernels are off"):
        K.forward_recurrence(A, W_hh, Hs.copy(), R.ACT_TANH, _path=2)
    with pytest.raises((TypeError, ValueError)):          # mixed dtypes: no fused signature
        K.forward_recurrence(A.astype(np.float32), W_hh, Hs.copy(), R.ACT_TANH)
    with pytest.raises(ValueError):                       # not C-contiguous
        K.forward_recurrence(np.asfortranarray(A), W_hh, Hs.copy(), R.ACT_TANH)
    with pytest.raises(ValueError, match="dZ"):
        K.backward_accumulate(G, Hs, W_hh, ends, bp_starts, R.ACT_TANH, np.empty((4, 2, 2)))
    with pytest.raises(ValueError, match="ends"):
        K.backward_accumulate(G, Hs, W_hh, np.array([5], np.int64), bp_starts, R.ACT_TANH, dZ)
    with pytest.raises(ValueError, match="bp_starts"):
        K.backward_accumulate(G, Hs, W_hh, ends, np.array([4], np.int64), R.ACT_TANH, dZ)
    with pytest.raises(ValueError, match="ends"):
        K.backward_accumulate(G, Hs, W_hh, np.array([3, 2, 4], np.int64),
                              np.array([0, 0, 0], np.int64), R.ACT_TANH, dZ)
    with pytest.raises(ValueError, match="bp_starts"):
        K.backward_accumulate(G, Hs, W_hh, ends, np.array([0, 0], np.int64), R.ACT_TANH, dZ)


# --- the BLAS wrapper -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("trans_a", [False, True], ids=["A", "At"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["B", "Bt"])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (1.0, 1.0), (-0.5, 2.0)])
def test_gemm_vs_numpy(dtype, trans_a, trans_b, alpha, beta):
    rng = np.random.default_rng(5)
    m, n, k = 3, 5, 7                                    # all distinct: a swapped m/n/k fails
    A = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
    B = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
    C = rng.normal(size=(m, n)).astype(dtype)
    expected = alpha * (A.T if trans_a else A) @ (B.T if trans_b else B) + beta * C
    CB.gemm(trans_a, trans_b, alpha, A, B, beta, C)
    assert C.dtype == dtype
    assert rel_err(C, expected) <= RTOL[dtype]


def test_gemm_bad_shapes():
    A = np.ones((3, 4))
    with pytest.raises(ValueError, match="gemm"):
        CB.gemm(False, False, 1.0, A, np.ones((5, 2)), 0.0, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="C of shape"):
        CB.gemm(False, False, 1.0, A, np.ones((4, 2)), 0.0, np.zeros((2, 3)))


# the weight gradients' own Aᵀ·B kernel (tn_kernel.h): each tile height (12, 8, 4, 2, 1 rows) and
# column tail (none, one vector and a part, a part of one), both orientations ((K, M, N) =
# (150, 32, 13) runs as (150, 13, 32); float32 (40, 31, 9) too), a short tail run apart ((300, 128,
# 33): 32 columns in place, the last as a row of 128; float32 (200, 40, 20): 4 apart; float64
# (150, 20, 18): 2), K across the 128-step chunks
TN_SHAPES = [(1, 1, 1), (5, 12, 32), (129, 13, 33), (300, 128, 33), (257, 33, 128), (130, 25, 47),
             (128, 8, 16), (700, 3, 70), (40, 31, 9), (200, 40, 20), (150, 20, 18), (260, 9, 34),
             (150, 32, 13)]
_TN_HERE = pytest.mark.skipif(not CB.tn_available(), reason="this CPU lacks AVX-512F")


@_TN_HERE
@pytest.mark.parametrize("beta", [0.0, 1.0, -0.5])
@pytest.mark.parametrize("K,M,N", TN_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tn_kernel_vs_numpy(dtype, K, M, N, beta):
    rng = np.random.default_rng(K * 7 + M * 3 + N)
    A, B = rng.normal(size=(K, M)).astype(dtype), rng.normal(size=(K, N)).astype(dtype)
    C0 = rng.normal(size=(M, N)).astype(dtype)
    C = np.full((M, N), np.nan, dtype) if beta == 0 else C0.copy()      # beta 0 never reads C
    assert CB._tn_product(A, B, C, beta)
    want = A.astype(np.float64).T @ B.astype(np.float64) + beta * C0.astype(np.float64) * (beta != 0)
    assert rel_err(C, want) <= RTOL[dtype]


def test_tn_mode_is_checked_and_restored():
    start = CB._set_tn(1)
    assert start == -1 or not CB.tn_available()         # by shape unless a test forgot to restore it
    assert CB._set_tn(0) == (1 if CB.tn_available() else -1)
    CB._set_tn(start)
    with pytest.raises(ValueError, match="mode: expected -1, 0 or 1, got 2"):
        CB._set_tn(2)
    with pytest.raises(ValueError, match=r"_tn_product: op\(A\) is \(2, 3\) and op\(B\) is \(4, 2\)"):
        CB._tn_product(np.ones((3, 2)), np.ones((4, 2)), np.ones((2, 2)), 0.0)


# --- tanh ---------------------------------------------------------------------------------------

def _tanh_levels():
    """The tanh implementations this build can take: libmvec SSE / AVX-512, or libm only."""
    start = K._set_tanh_level(-1)                 # -1 changes nothing: reads the level
    if start == 0:
        return [0]
    levels = [1] + ([2] if K._set_tanh_level(2) == 2 else [])
    K._set_tanh_level(start)
    return levels


@pytest.fixture(params=_tanh_levels(), ids=lambda lv: {0: "libm", 1: "sse", 2: "avx512"}[lv])
def tanh_level(request):
    start = K._set_tanh_level(-1)
    assert K._set_tanh_level(request.param) == request.param
    yield request.param
    K._set_tanh_level(start)


def test_tanh_impl_reported():
    assert K.TANH_IMPL in ("libmvec-avx512", "libmvec-sse", "libm")


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_against_numpy(tanh_level, dtype):
    """Every run length (vector body and masked/padded tail) and the awkward values."""
    rng = np.random.default_rng(9)
    special = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-8, -3e-5, 0.5, -0.549, 0.55, 1.0, 9.0, 9.1, -9.2,
                        17.0, -20.0, 44.0, 1e4, -1e30])
    # relative error against float64 tanh: libm/libmvec are within a few ulp
    tol = {np.float64: 5e-16, np.float32: 3e-7}[dtype]
    for n in list(range(0, 41)) + [257]:
        x = np.concatenate([special, rng.normal(scale=3, size=n)])[:n].astype(dtype)
        y = x.copy()
        K._tanh_inplace(y)
        exact = np.tanh(x.astype(np.float64))
        err = np.abs(y - exact) / np.maximum(np.abs(exact), np.finfo(dtype).tiny)
        assert np.all(err <= tol), (n, x[err > tol], y[err > tol])
        assert np.array_equal(np.signbit(y), np.signbit(x))       # tanh(-0.0) = -0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_against_numpy(tanh_level, dtype):
    """The ce head's exp (at the tanh's level): every run length, the softmax's range (x <= 0)."""
    rng = np.random.default_rng(10)
    special = np.array([0.0, -0.0, -1e-30, -1e-7, -0.5, -1.0, -10.0, -87.0, -87.5, -103.0, -110.0, -800.0])
    # relative error against float64 exp (measured: 2.6-3.0 ulp at most); underflow to 0 or a subnormal
    tol = {np.float64: 8e-16, np.float32: 4e-7}[dtype]
    for n in list(range(0, 41)) + [257]:
        x = np.concatenate([special, -np.abs(rng.normal(scale=20, size=n))])[:n].astype(dtype)
        y = x.copy()
        K._tanh_inplace(y, exp=True)
        exact = np.exp(x.astype(np.float64))
        normal = exact >= np.finfo(dtype).tiny
        err = np.abs(y[normal] - exact[normal]) / exact[normal]
        assert np.all(err <= tol), (n, x[normal][err > tol], y[normal][err > tol])
        assert np.all(np.abs(y[~normal] - exact[~normal]) <= np.finfo(dtype).tiny)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_parity_each_tanh(tanh_level, dtype, act):
    for shape in (SHAPES["B1"], SHAPES["H13"], SHAPES["odd_H70B17"]):
        A, W_hh, h0, _ = kernel_problem(*shape, dtype, seed=0)
        assert rel_err(_forward(K, A, W_hh, h0, act), _forward(R, A, W_hh, h0, act)) <= RTOL[dtype]


# --- the small-batch SIMD kernels: their level, FASTBPTT_SIMD ----------------------------------

def test_simd_level_names_are_checked():
    assert K.SIMD_IMPL in K.SIMD_LEVELS
    with pytest.raises(ValueError, match="SIMD level: expected one of 'auto', 'avx512', 'avx2', "
                                         "'portable', 'off', got 'sse9'"):
        K._set_simd_level("sse9")
    assert K.SIMD_IMPL == _SIMD_START                   # a refused name changes nothing
    assert K._set_simd_level("off") == "off"
    assert not K.uses_simd(1, 32, np.float32)           # "off": auto never picks them
    assert K._set_simd_level("auto") == _SIMD_START     # the best the CPU has, as at import


def test_simd_level_the_cpu_lacks_is_refused():
    """On a CPU without AVX-512 (simulated): forcing it raises, naming what is missing; "auto"
    takes AVX2, and the level in force never changes to a missing one."""
    try:
        K._hide_simd_levels(["avx512"])
        with pytest.raises(RuntimeError, match="SIMD level 'avx512' needs AVX-512F and FMA, which this CPU "
                                               r"\(or this build\) lacks; available here: portable, avx2"):
            K._set_simd_level("avx512")
        assert K.SIMD_IMPL == _SIMD_START
        assert K._set_simd_level("auto") == "avx2"
        K._hide_simd_levels(["avx512", "avx2"])
        with pytest.raises(RuntimeError, match="available here: portable$"):
            K._set_simd_level("avx2")
        assert K._set_simd_level("auto") == "portable"
    finally:
        K._hide_simd_levels(())


def _import_kernels_with(value):
    env = dict(os.environ, FASTBPTT_SIMD=value)
    code = ("import fastbptt.backends.cython.kernels as K; print(K.SIMD_IMPL); "
            "print(K.uses_simd(1, 32, 'float32'))")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, cwd=tempfile.gettempdir())     # the installed package, not the source tree


@pytest.mark.parametrize("value,impl", [pytest.param("avx512", "avx512", marks=_LACKS["avx512"]),
                                        pytest.param("AVX2", "avx2", marks=_LACKS["avx2"]), ("portable", "portable"),
                                        ("off", "off"), ("auto", _SIMD_START), ("", _SIMD_START)])
def test_simd_environment_variable_sets_the_level(value, impl):
    proc = _import_kernels_with(value)
    assert proc.returncode == 0, proc.stderr
    got, picked = proc.stdout.split()
    assert got == impl
    if impl == "off":
        assert picked == "False"            # the online shape, which "auto" sends to them otherwise


def test_simd_environment_variable_bad_value_names_it():
    """A bad FASTBPTT_SIMD makes the backend fail to load, and the registry says why."""
    proc = _import_kernels_with("neon")
    assert proc.returncode != 0
    assert "ValueError: FASTBPTT_SIMD='neon': SIMD level: expected one of" in proc.stderr
    env = dict(os.environ, FASTBPTT_SIMD="neon")
    code = ("import fastbptt; from fastbptt.backends import resolve_backend\n"
            "assert 'cython' not in fastbptt.available_backends()\n"
            "resolve_backend('cython')")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tempfile.gettempdir())
    assert proc.returncode != 0 and "FASTBPTT_SIMD='neon'" in proc.stderr, proc.stderr


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", [p.values[0][1] for p in SIMD_PATHS])
def test_simd_kernels_tanh_against_numpy(level, dtype):
    """The SIMD kernels' own tanh (libmvec on the accumulator registers, or libm after the store):
    a forward step with W_hh = 0 is h = tanh(A), every width, tail and awkward value included."""
    assert K._set_simd_level(level) == level
    rng = np.random.default_rng(11)
    special = np.array([0.0, -0.0, 1e-30, -1e-30, 1e-8, -3e-5, 0.5, -0.549, 0.55, 1.0, 9.0, 9.1, -9.2,
                        17.0, -20.0, 44.0, 1e4, -1e30])
    tol = {np.float64: 1e-15, np.float32: 3e-7}[dtype]      # a few ulp, as libm's own tanh
    for H in (1, 3, 7, 8, 16, 18, 33, 64, 257):
        x = np.concatenate([special, rng.normal(scale=3, size=H)])[:H].astype(dtype)
        Hs = np.zeros((2, 1, H), dtype=dtype)
        K.forward_recurrence(x.reshape(1, 1, H).copy(), np.zeros((H, H), dtype=dtype), Hs, R.ACT_TANH, _path=2)
        exact = np.tanh(x.astype(np.float64) + 0.0)
        err = np.abs(Hs[1, 0] - exact) / np.maximum(np.abs(exact), np.finfo(dtype).tiny)
        assert np.all(err <= tol), (H, x[err > tol], Hs[1, 0][err > tol])


# --- the packed column split (wide.h): each of its loops forced ------------------------------------

_WIDE_START = K._set_wide_level(-1)             # -1 changes nothing: reads the level the CPU gave
_WIDE_NAMES = {0: "portable", 1: "avx2", 2: "avx512"}


@pytest.fixture(params=list(range(_WIDE_START + 1)), ids=lambda lv: _WIDE_NAMES[lv])
def wide_level(request):
    assert K._set_wide_level(request.param) == request.param
    yield request.param
    K._set_wide_level(_WIDE_START)


@pytest.fixture(params=[0, 1], ids=["dz_pass", "dz_fused"])
def fused_dz(request):
    """The packed backward's dz in a pass of its own, or made by its product (FBW_DZ_*)."""
    start = K._set_fused_dz(request.param)
    yield request.param
    K._set_fused_dz(start)


# beside SHAPES: several panels with a 1-column last one (H=33 in f32 on AVX-512), more batch rows
# than one register block of every loop (B=13, 25), and H above the "auto" threshold
PACKED_SHAPES = dict(SHAPES, H33B13=(4, 13, 33), H40B25=(3, 25, 40), H520B3=(5, 3, 520))


@pytest.mark.parametrize("shape", list(PACKED_SHAPES.values()), ids=list(PACKED_SHAPES))
@pytest.mark.parametrize("truncation", [None, 1, 3, (2, 5)], ids=["full", "k1", "k3", "k1k2_2_5"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split", [2, 3], ids=["columns", "rows"])
def test_packed_split_each_loop_matches_reference(wide_level, fused_dz, split, dtype, truncation, shape):
    """``_split=2`` (3) on 1-3 threads, whole batch and parts of it (``rows``), both activations."""
    T, B, H = shape
    A, W_hh, h0, G = kernel_problem(T, B, H, dtype, seed=T * 1000 + B * 100 + H)
    ends, bp_starts = windows(T, truncation)
    W_hhT = np.ascontiguousarray(W_hh.T)
    assert K.WIDE_IMPL == _WIDE_NAMES[wide_level]
    for act in (R.ACT_TANH, R.ACT_RELU):
        Hs_ref, dZ_ref = reference_kernels(A, W_hh, h0, G, act, ends, bp_starts)
        for threads in (1, 2, 3):
            for parts in ([(0, B)], [(0, 1), (1, B)] if B > 1 else []):
                if not parts:
                    continue
                Hs = np.full_like(Hs_ref, np.nan)
                Hs[0] = h0
                dZ = np.full_like(G, np.nan)
                for rows in parts:
                    K.forward_recurrence(A, W_hhT, Hs, act, rows=rows, threads=threads, _split=split)
                    K.backward_accumulate(G, Hs_ref, W_hh, ends, bp_starts, act, dZ, rows=rows,
                                          threads=threads, _split=split)
                where = f"act {act}, threads {threads}, rows {parts}"
                assert rel_err(Hs, Hs_ref) <= RTOL[dtype], where
                assert rel_err(dZ, dZ_ref) <= RTOL[dtype], where


def test_packed_split_same_bits_on_any_thread_count(wide_level, fused_dz):
    """Each column is summed in the same order whatever thread owns its panel or its row."""
    A, W_hh, h0, G = kernel_problem(7, 9, 75, np.float32, seed=4)
    ends, bp_starts = windows(7, (2, 5))
    out = []
    for threads, split in ((1, 2), (2, 2), (3, 2), (2, 3), (3, 3)):
        Hs = np.empty((8, 9, 75), np.float32)
        Hs[0] = h0
        K.forward_recurrence(A, np.ascontiguousarray(W_hh.T), Hs, R.ACT_TANH, threads=threads, _split=split)
        dZ = np.empty_like(G)
        K.backward_accumulate(G, Hs, W_hh, ends, bp_starts, R.ACT_TANH, dZ, threads=threads, _split=split)
        out.append((Hs, dZ))
    for Hs, dZ in out[1:]:
        assert np.array_equal(Hs, out[0][0]) and np.array_equal(dZ, out[0][1])


# ----------------------------------------------------------- the whole layer in one call (engine.fused)
# head_chunks: 1170 rows, 3 head chunks; it and H1 split the weight gradients over the rows of dZ
# (T·B >= KSPLIT_ROWS·H), the others by their output rows
LAYER_SHAPES = {"T1_B1": (1, 1, 2, 3, 2), "B1_odd": (9, 1, 3, 13, 4), "B3": (7, 3, 5, 11, 3),
                "B5_H40": (6, 5, 4, 40, 2), "head_chunks": (130, 9, 3, 7, 3), "H1": (20, 1, 2, 1, 2)}


@pytest.mark.parametrize("teams", [(1, 1), (2, 2), (1, 3)], ids=["team1", "team2", "gemm3"])
@pytest.mark.parametrize("truncation", [None, 3, (2, 5)], ids=["full", "k3", "k1k2_2_5"])
@pytest.mark.parametrize("output", ["sequence", "last"])
@pytest.mark.parametrize("loss", ["mse", "bce", "ce"])
@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("shape", list(LAYER_SHAPES.values()), ids=list(LAYER_SHAPES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_loss_and_grad_matches_reference(dtype, shape, act, loss, output, truncation, teams):
    """``layer_loss_and_grad`` on every team split (more parts than rows too) against the reference's
    ``loss_and_grad``: the loss, the five gradients and the states."""
    import fastbptt
    from fastbptt.engine import fused
    from fastbptt.engine.core import ACT_CODES
    from helpers import assert_close, make_problem

    T, B, D, H, O = shape
    params, X, Y = make_problem(T, B, D, H, O, loss=loss, output=output, dtype=np.float64, seed=T + B + H)
    h0 = np.random.default_rng(1).normal(scale=0.5, size=(B, H))
    ref_loss, ref_grads, ref_h = fastbptt.loss_and_grad(params, X, Y, h0=h0, loss=loss, output=output,
                                                        activation=act, truncation=truncation, backend="numpy")
    p = params.astype(dtype)
    X3, h0s = X.astype(dtype), h0.astype(dtype)[None]
    Y_ = Y.reshape((-1,) if loss == "ce" else (-1, O)).astype(np.int64 if loss == "ce" else dtype)
    grads = [np.empty_like(a) for a in p.arrays()]
    work = fused.work_arrays(T, B, H, O, output, dtype, new=True)
    with fastbptt._threads.call_scope(threads=max(teams)):
        value = fused.run(K, p, X3, Y_, h0s, loss, output, ACT_CODES[act], windows(T, truncation), grads,
                          work, teams)
    assert value == pytest.approx(ref_loss, rel=RTOL[dtype], abs=RTOL[dtype])
    for name, g, r in zip(p.names(), grads, ref_grads.arrays()):
        assert_close(g, r, dtype, name)
    assert_close(work[2][T], ref_h, dtype, "h_last")


def test_layer_loss_and_grad_refuses_bad_arrays():
    """Clear errors naming the array, and a class id out of range, before any gradient is written."""
    from fastbptt.engine import fused
    T, B, D, H, O = 4, 2, 3, 5, 3
    rng = np.random.default_rng(0)
    X = rng.normal(size=(T, B, D))
    w = [rng.normal(size=s) for s in ((H, D), (H, H), (H,), (O, H), (O,))]
    grads = [np.zeros_like(a) for a in w]
    work = fused.work_arrays(T, B, H, O, "sequence", np.float64, new=True)
    ends, starts = windows(T, None)
    Y = rng.integers(0, O, size=T * B)

    def call(X=X, Y=Y, h0=np.zeros((B, H)), w=w, grads=grads, work=work, loss=2):
        return K.layer_loss_and_grad(X, Y, h0, tuple(w), grads, work, ends, starts, loss, True, 0)

    call()
    with pytest.raises(TypeError, match=r"X: expected dtype float64, got float32"):
        call(X=X.astype(np.float32))
    with pytest.raises(ValueError, match=r"h0: expected a C-contiguous array of 10 elements, got shape \(2, 4\)"):
        call(h0=np.zeros((B, 4)))
    with pytest.raises(TypeError, match=r"Y: expected dtype int64, got float64"):
        call(Y=Y.astype(np.float64))
    with pytest.raises(ValueError, match=r"grads\[1\]: expected a writeable array"):
        ro = np.zeros((H, H))
        ro.flags.writeable = False
        call(grads=[grads[0], ro] + grads[2:])
    with pytest.raises(ValueError, match=r"weights, grads, work: expected 5, 5 and 9 arrays, got 5, 5 and 8"):
        call(work=work[:8])
    bad = Y.copy()
    bad[5] = O
    before = [g.copy() for g in grads]
    with pytest.raises(ValueError, match=rf"Y: expected class ids in \[0, {O}\), got {O} at row 5"):
        call(Y=bad)
    assert all(np.array_equal(g, b) for g, b in zip(grads, before))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("loss", ["mse", "bce", "ce"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_head_loss_and_grad_matches_the_numpy_head(dtype, loss, threads):
    """The compiled head of a block of rows (engine.checkpoint's blocked full BPTT) against the
    NumPy code it replaces there: the loss sum, ∂L/∂h and the head's gradients (added to)."""
    import fastbptt
    from fastbptt.engine.losses import LOSS_CODES, LOSS_SUMS

    assert K.LOSS_CODES == LOSS_CODES
    m, H, O, n_out = 1300, 9, 4, 2000            # several chunks of HEAD_CHUNK rows; a part of a mean
    rng = np.random.default_rng(3)
    Hr = rng.normal(size=(m, H)).astype(dtype)
    W, b = rng.normal(size=(O, H)).astype(dtype), rng.normal(size=O).astype(dtype)
    Y = rng.integers(0, O, size=m) if loss == "ce" else (rng.random((m, O)) < 0.5).astype(dtype)
    dW0, db0 = rng.normal(size=(O, H)).astype(dtype), rng.normal(size=O).astype(dtype)
    n_total = n_out if loss == "ce" else n_out * O
    ref_sum, dO = LOSS_SUMS[loss]((Hr @ W.T + b).astype(dtype), Y, n_total)
    dW, db, G = dW0.copy(), db0.copy(), np.empty((m, H), dtype)
    with fastbptt._threads.call_scope(threads=threads):
        got = K.head_loss_and_grad(Hr, W, b, Y.astype(np.int64) if loss == "ce" else Y, LOSS_CODES[loss], n_out,
                                   dW, db, G, threads)
    assert got == pytest.approx(ref_sum, rel=RTOL[dtype])
    assert rel_err(G, dO @ W) <= RTOL[dtype]
    assert rel_err(dW, dW0 + dO.T @ Hr) <= RTOL[dtype] and rel_err(db, db0 + dO.sum(axis=0)) <= RTOL[dtype]
