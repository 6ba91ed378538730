"""The split paths: batch parts of the recurrence kernels and split GEMMs, against one thread.

At test sizes no phase reaches ``MIN_SPLIT_FLOPS``, so these tests lower it to 0
and fix the team size: every GEMM and (for the compiled backends) every
kernel call is then split, 2 or 3 ways, B not a multiple of the team included.
"""

import numpy as np
import pytest

import fastbptt
from fastbptt import _threads
from fastbptt.engine import core as _core
from fastbptt.backends import resolve_backend
from helpers import RTOL, make_problem, rel_err


@pytest.fixture
def split_everything(monkeypatch):
    monkeypatch.setattr(_threads, "MIN_SPLIT_FLOPS", 0)
    monkeypatch.setattr(_threads, "MIN_SPLIT_FLOPS_C_TEAM", 0)
    monkeypatch.setattr(_threads, "_cpu_count", lambda: 8)      # a team of 3 even on 2 cores (no cap)

    def use(n):
        fastbptt.set_num_threads(n)

    yield use
    fastbptt.set_num_threads(None)


def _one_thread(params, X, Y, **kw):
    fastbptt.set_num_threads(1)
    try:
        return fastbptt.loss_and_grad(params, X, Y, backend="numpy", **kw)
    finally:
        fastbptt.set_num_threads(None)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("truncation", [None, 3, (2, 5)], ids=str)
@pytest.mark.parametrize("loss,output", [("mse", "sequence"), ("ce", "sequence"), ("bce", "last")])
@pytest.mark.parametrize("B", [1, 2, 5])
def test_split_call_matches_one_thread(backend, split_everything, B, loss, output, truncation, threads, dtype):
    params, X, Y = make_problem(9, B, 4, 13, 3, loss=loss, output=output, dtype=dtype, seed=B)
    h0 = np.random.default_rng(4).uniform(-0.5, 0.5, size=(B, 13))
    ref = _one_thread(params, X, Y, h0=h0, loss=loss, output=output, truncation=truncation)
    split_everything(threads)
    kernels = resolve_backend(backend)
    seen = []
    with _threads.call_scope():
        _core.recurrence(kernels, 9, B, 13, lambda **kw: seen.append(kw["threads"]))
    assert seen == [threads]                        # every backend is given the team and splits itself
    got = fastbptt.loss_and_grad(params, X, Y, h0=h0, loss=loss, output=output, truncation=truncation,
                                 backend=backend)
    rtol = RTOL[dtype]
    assert got[0] == pytest.approx(ref[0], rel=rtol, abs=rtol)
    for name, g_ref in ref[1].items():
        assert rel_err(getattr(got[1], name), g_ref) <= rtol, name
    assert rel_err(got[2], ref[2]) <= rtol


def test_numba_kernels_split_the_batch_on_the_python_pool(split_everything, monkeypatch):
    import fastbptt.backends.numba as NK
    calls = []
    monkeypatch.setattr(NK, "run", lambda tasks: calls.append([t.args[-2:] for t in tasks]) or [t() for t in tasks])
    T, B, H = 4, 6, 8
    A, Hs = np.zeros((T, B, H)), np.zeros((T + 1, B, H))
    NK.forward_recurrence(A, np.eye(H), Hs, 0, threads=2)
    NK.forward_recurrence(A, np.eye(H), Hs, 0, threads=2, rows=(1, 6))
    assert calls == [[(0, 3), (3, 6)], [(1, 4), (4, 6)]]
    assert resolve_backend("cython").TEAM and not resolve_backend("numba").TEAM and not resolve_backend("numpy").TEAM


@pytest.fixture(params=[0, 1], ids=["blas", "tn_kernel"])
def tn_mode(request):
    """The C team's Aᵀ·B parts on BLAS, or on the kernel of tn_kernel.h wherever it runs."""
    from fastbptt.backends.cython import blas as _cython_blas
    start = _cython_blas._set_tn(request.param)
    yield request.param
    _cython_blas._set_tn(start)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("via", ["python-threads", "c-team"])
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("m,k,n", [(7, 5, 3), (1, 9, 4), (6, 1, 2), (2, 2, 5)])
def test_split_gemm(split_everything, tn_mode, trans_a, trans_b, m, k, n, via, dtype):
    kernels = resolve_backend("cython") if via == "c-team" else None
    assert via != "c-team" or (kernels.TEAM and fastbptt.engine.blas.pgemm is not None)
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    A = rng.normal(size=(k, m) if trans_a else (m, k)).astype(dtype)
    B = rng.normal(size=(n, k) if trans_b else (k, n)).astype(dtype)
    want = (A.T if trans_a else A).astype(np.float64) @ (B.T if trans_b else B).astype(np.float64)
    split_everything(3)
    with _threads.call_scope():
        got = _core.pmatmul(A, B, trans_a, trans_b, kernels=kernels)
        out = np.full((m, n), np.nan, dtype=dtype)
        assert _core.pmatmul(A, B, trans_a, trans_b, out=out, kernels=kernels) is out
    tol = 1e-14 if dtype == np.float64 else 1e-6
    assert got.dtype == dtype and rel_err(got, want) <= tol and rel_err(out, want) <= tol


def test_pgemm_runs_on_numpys_blas():
    from fastbptt.backends.cython import blas as _cython_blas
    assert fastbptt.engine.blas.numpy_cblas() is not None      # numpy's wheels ship their ILP64 cblas
    assert _cython_blas.using_cblas()


def test_pgemm_checks_its_arguments_and_handles_empty_products():
    from fastbptt.backends.cython.blas import pgemm
    A, B = np.ones((3, 4)), np.ones((4, 2))
    with pytest.raises(ValueError, match=r"pgemm: op\(A\) is \(3, 4\) and op\(B\) is \(4, 2\)"):
        pgemm(False, False, A, B, np.zeros((2, 2)), 2)
    with pytest.raises(ValueError, match="threads: expected an int >= 1, got 0"):
        pgemm(False, False, A, B, np.zeros((3, 2)), 0)
    C = np.full((3, 2), np.nan)
    pgemm(False, False, np.ones((3, 0)), np.ones((0, 2)), C, 2)
    assert (C == 0).all()


def test_cython_kernels_check_threads():
    kernels = resolve_backend("cython")
    A, W, Hs = np.zeros((2, 3, 4)), np.zeros((4, 4)), np.zeros((3, 3, 4))
    with pytest.raises(ValueError, match="threads: expected an int >= 1, got 0"):
        kernels.forward_recurrence(A, W, Hs, 0, threads=0)


@pytest.mark.parametrize("name", ["cython", "numba"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_kernel_rows_compute_only_their_rows(name, dtype):
    kernels = resolve_backend(name)
    rng = np.random.default_rng(0)
    T, B, H = 6, 5, 7
    A = rng.normal(size=(T, B, H)).astype(dtype)
    W = rng.normal(scale=0.4, size=(H, H)).astype(dtype)
    G = rng.normal(size=(T, B, H)).astype(dtype)
    ends, bps = _core.windows(T, (2, 3))
    Hs_ref = np.empty((T + 1, B, H), dtype)
    Hs_ref[0] = rng.normal(size=(B, H))
    kernels.forward_recurrence(A, np.ascontiguousarray(W.T), Hs_ref, 0)
    dZ_ref = np.empty_like(G)
    kernels.backward_accumulate(G, Hs_ref, W, ends, bps, 0, dZ_ref)

    Hs = np.full_like(Hs_ref, np.nan)
    Hs[0] = Hs_ref[0]
    dZ = np.full_like(G, np.nan)
    for rows in [(0, 2), (2, 3), (3, 5)]:
        kernels.forward_recurrence(A, np.ascontiguousarray(W.T), Hs, 0, rows=rows)
        assert np.isnan(Hs[1:, rows[1]:]).all()          # rows above the part untouched
        kernels.backward_accumulate(G, Hs_ref, W, ends, bps, 0, dZ, rows=rows)
        assert np.isnan(dZ[:, rows[1]:]).all()
    assert rel_err(Hs, Hs_ref) <= RTOL[dtype] and rel_err(dZ, dZ_ref) <= RTOL[dtype]

    for bad in [(3, 3), (-1, 2), (0, 6)]:
        with pytest.raises(ValueError, match=r"rows: expected \(b0, b1\) with 0 <= b0 < b1 <= B=5"):
            kernels.forward_recurrence(A, np.ascontiguousarray(W.T), Hs, 0, rows=bad)
        with pytest.raises(ValueError, match=r"rows: expected \(b0, b1\)"):
            kernels.backward_accumulate(G, Hs_ref, W, ends, bps, 0, dZ, rows=bad)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("split", [0, 1, 2], ids=["rows", "columns", "packed"])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("truncation", [None, 1, 3, (2, 5)], ids=str)
@pytest.mark.parametrize("T,B,H", [(1, 3, 5), (7, 1, 9), (6, 2, 1), (9, 5, 13), (5, 4, 40)])
def test_cython_kernels_split_rows_or_columns(T, B, H, truncation, threads, split, dtype):
    """The C team's splits against the reference kernels (columns, plain or packed: a barrier every step)."""
    from fastbptt.backends import reference as R
    K = resolve_backend("cython")
    rng = np.random.default_rng(T * 100 + B * 10 + H)
    A = rng.normal(size=(T, B, H)).astype(dtype)
    W = rng.normal(scale=1.0 / np.sqrt(H), size=(H, H)).astype(dtype)
    G = rng.normal(size=(T, B, H)).astype(dtype)
    ends, bps = _core.windows(T, truncation)
    for act in (R.ACT_TANH, R.ACT_RELU):
        Hs_ref = np.empty((T + 1, B, H), dtype)
        Hs_ref[0] = rng.normal(size=(B, H))
        Hs = Hs_ref.copy()
        R.forward_recurrence(A, np.ascontiguousarray(W.T), Hs_ref, act)
        K.forward_recurrence(A, np.ascontiguousarray(W.T), Hs, act, threads=threads, _split=split)
        assert rel_err(Hs, Hs_ref) <= RTOL[dtype]
        dZ_ref = np.empty_like(G)
        R.backward_accumulate(G, Hs_ref, W, ends, bps, act, dZ_ref)
        dZ = np.full_like(G, np.nan)
        K.backward_accumulate(G, Hs_ref, W, ends, bps, act, dZ, threads=threads, _split=split)
        assert rel_err(dZ, dZ_ref) <= RTOL[dtype]


def test_cython_split_rule_and_bad_split():
    K = resolve_backend("cython")
    start = K._set_wide_level(-1)
    try:
        for level in range(start + 1):
            assert K._set_wide_level(level) == level
            if level < 2:       # no AVX-512 loop for the packed split: the BLAS splits' rule
                assert K._split_mode(2, 128, 1024, -1) == 1 and K._split_mode(2, 8, 1024, -1) == 1
                assert K._split_mode(2, 64, 512, -1) == 1 and K._split_mode(2, 16, 512, -1) == 0
                assert K._split_mode(1, 128, 1024, -1) == 0 and K._split_mode(2, 64, 256, -1) == 0
                assert K._split_cols(2, 128, 1024, -1) and not K._split_cols(2, 64, 256, -1)
                continue
            assert K._split_mode(2, 20, 800, -1) == 2 and K._split_mode(2, 3, 512, -1) == 2
            assert K._split_mode(1, 128, 1024, -1) == 2 and K._split_mode(1, 8, 128, -1) == 2
            assert K._split_mode(1, 7, 256, -1) == 0 and K._split_mode(2, 16, 256, -1) == 0
            assert K._split_mode(2, 64, 256, -1) == 3 and K._split_mode(2, 64, 256, -1, True) == 0   # medium
            assert K._split_mode(2, 128, 1024, -1, True) == 1 and K._split_mode(2, 16, 1024, -1, True) == 2
            # packed by rows: 8 rows a thread with W_hh up to 1 MiB, 32 up to 4 MiB
            assert K._split_mode(2, 20, 512, -1) == 3 and K._split_mode(2, 16, 512, -1) == 3
            assert K._split_mode(2, 64, 800, -1) == 3 and K._split_mode(2, 62, 800, -1) == 2
            assert K._split_mode(2, 128, 1024, -1) == 3 and K._split_mode(2, 32, 1024, -1) == 2
            assert K._split_mode(3, 23, 512, -1) == 2 and K._split_mode(1, 64, 256, -1) == 2
            assert K._split_cols(2, 20, 800, -1) and not K._split_cols(2, 64, 256, -1)
            assert not K._split_cols(2, 16, 256, -1)
    finally:
        K._set_wide_level(start)
    assert K._split_mode(2, 128, 1024, 1) == 1 and K._split_mode(1, 1, 4, 2) == 2        # forced
    assert K._split_mode(1, 1, 4, 3) == 3
    A, W, Hs = np.zeros((2, 3, 4)), np.zeros((4, 4)), np.zeros((3, 3, 4))
    with pytest.raises(ValueError, match=r"_split: expected -1 \(auto\), 0 \(rows\), 1 \(columns\), 2 "
                                         r"\(packed columns\) or 3 \(packed rows\), got 7"):
        K.forward_recurrence(A, W, Hs, 0, threads=2, _split=7)


@pytest.mark.parametrize("split", [0, 1, 2], ids=["rows", "columns", "packed"])
def test_cython_split_repeated_calls_agree(split):
    """Many calls on the team, windows included: a race in the hand-offs or barriers would show."""
    K = resolve_backend("cython")
    rng = np.random.default_rng(11)
    T, B, H = 60, 6, 48
    A = rng.normal(size=(T, B, H))
    W = rng.normal(scale=1.0 / np.sqrt(H), size=(H, H))
    G = rng.normal(size=(T, B, H))
    ends, bps = _core.windows(T, (4, 9))
    Hs_one = np.zeros((T + 1, B, H))
    K.forward_recurrence(A, np.ascontiguousarray(W.T), Hs_one, 0)
    dZ_one = np.empty_like(G)
    K.backward_accumulate(G, Hs_one, W, ends, bps, 0, dZ_one)
    for _ in range(50):
        Hs = np.zeros_like(Hs_one)
        K.forward_recurrence(A, np.ascontiguousarray(W.T), Hs, 0, threads=2, _split=split)
        dZ = np.full_like(G, np.nan)
        K.backward_accumulate(G, Hs, W, ends, bps, 0, dZ, threads=2, _split=split)
        assert rel_err(Hs, Hs_one) <= 1e-12 and rel_err(dZ, dZ_one) <= 1e-12
