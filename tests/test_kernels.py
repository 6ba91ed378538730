"""The kernel contract, once per compiled backend, against the NumPy reference kernels.

The contract is the docstring of :mod:`fastbptt.backends.reference`:
``forward_recurrence(A, W_hhT, Hs, act, threads=1)`` and
``backward_accumulate(G, Hs, W_hh, ends, bp_starts, act, dZ, threads=1)``,
and a module flag ``TEAM`` the engine reads. Both compiled backends also take
``rows=(b0, b1)``, the part of the batch a call computes (what ``threads``
splits a call into; calls on disjoint rows may run at once): tested here too.
Every test takes the ``kernels`` fixture (the backend's module), so a new
backend is tested by adding it to the registry. A compiled backend that does
not load fails its tests (CI requires both): it is never skipped.

What one backend does that the other does not (forced product routes or
paths, tanh implementations, caches, argument checks) is tested in
``test_numba_backend.py`` and ``test_cython_backend.py``; the engine's split
of a call between threads in ``test_parallel.py``.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastbptt
from fastbptt.backends import _MODULES, reference as R, resolve_backend
from fastbptt.engine.core import windows
from helpers import RTOL, TRUNCATIONS, kernel_problem, make_problem, reference_kernels, rel_err

COMPILED = [name for name in _MODULES if name != "numpy"]       # ["cython", "numba"]


@pytest.fixture(params=COMPILED)
def kernels(request):
    """The backend's module; a compiled backend that does not load fails here, with its reason."""
    return resolve_backend(request.param)


DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]
ACTS = [pytest.param(R.ACT_TANH, id="tanh"), pytest.param(R.ACT_RELU, id="relu")]
TRUNC = [pytest.param(v, id=k) for k, v in TRUNCATIONS.items()]
# (T, B, H): T = 1, B = 1, H = 1, H not a multiple of 8, and both sides of each backend's switch
# of its per-step product (Cython: small loop up to B·H = 16; with AVX-512, the packed column
# split on one thread from H = 128 at 8 rows, and from H = 512 (``MIN_H_FOR_PACKED``); Numba:
# its loop at B = 1 up to H = 32 / 128 where NumPy's cblas is not found)
SHAPES = {
    "T1B1H1": (1, 1, 1),
    "T1B3H5": (1, 3, 5),
    "T9B1H1": (9, 1, 1),
    "T6B2H1": (6, 2, 1),
    "T9B1H7": (9, 1, 7),
    "T12B1H13": (12, 1, 13),
    "T11B4H13": (11, 4, 13),
    "T12B4H4": (12, 4, 4),
    "T17B1H16": (17, 1, 16),
    "T15B1H24": (15, 1, 24),
    "T10B1H32": (10, 1, 32),
    "T10B1H33": (10, 1, 33),
    "T8B3H40": (8, 3, 40),
    "T7B2H64": (7, 2, 64),
    "T5B1H129": (5, 1, 129),
    "T5B17H70": (5, 17, 70),
    "T4B9H130": (4, 9, 130),
    "T5B3H520": (5, 3, 520),
}


def _seed(T, B, H):
    return T * 10_000 + B * 100 + H


def test_module_follows_the_registry(kernels):
    assert kernels.__name__ == _MODULES[kernels.NAME][0]
    assert kernels.NAME in fastbptt.available_backends()
    assert callable(kernels.forward_recurrence) and callable(kernels.backward_accumulate)
    assert kernels.TEAM in (True, False)            # read by fastbptt.engine.core.recurrence


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("truncation", TRUNC)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_match_reference_and_leave_inputs_alone(kernels, dtype, act, truncation, shape):
    T, B, H = shape
    A, W_hh, h0, G = kernel_problem(T, B, H, dtype, seed=_seed(T, B, H))
    ends, bp_starts = windows(T, truncation)
    Hs_ref, dZ_ref = reference_kernels(A, W_hh, h0, G, act, ends, bp_starts)
    W_hhT = np.ascontiguousarray(W_hh.T)
    inputs = [A, W_hh, W_hhT, G, ends, bp_starts]
    before = [x.copy() for x in inputs]

    Hs = np.full((T + 1, B, H), np.nan, dtype=dtype)
    Hs[0] = h0
    kernels.forward_recurrence(A, W_hhT, Hs, act)
    np.testing.assert_array_equal(Hs[0], h0)            # h0 is read, not written
    assert rel_err(Hs, Hs_ref) <= RTOL[dtype]            # (a NaN left anywhere fails too)

    Hs_in = Hs_ref.copy()                                # the backward on the reference's states
    dZ = np.full_like(G, np.nan)                         # overwritten everywhere, gaps included
    kernels.backward_accumulate(G, Hs_in, W_hh, ends, bp_starts, act, dZ)
    assert np.all(np.isfinite(dZ))
    assert rel_err(dZ, dZ_ref) <= RTOL[dtype]

    assert Hs.dtype == dZ.dtype == dtype
    np.testing.assert_array_equal(Hs_in, Hs_ref)         # the backward reads Hs only
    for x, x0 in zip(inputs, before):
        np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_comparison_is_sharp(kernels, dtype):
    """RTOL does not hide a wrong result: W_hh off by 10·RTOL makes Hs and dZ differ by more."""
    T, B, H = 8, 3, 13
    A, W_hh, h0, G = kernel_problem(T, B, H, dtype, seed=1)
    ends, bp_starts = windows(T, (2, 5))
    Hs_ref, dZ_ref = reference_kernels(A, W_hh, h0, G, R.ACT_TANH, ends, bp_starts)
    W_off = (W_hh * (1 + 10 * RTOL[dtype])).astype(dtype)
    Hs = np.empty_like(Hs_ref)
    Hs[0] = h0
    kernels.forward_recurrence(A, np.ascontiguousarray(W_off.T), Hs, R.ACT_TANH)
    dZ = np.empty_like(G)
    kernels.backward_accumulate(G, Hs_ref, W_off, ends, bp_starts, R.ACT_TANH, dZ)
    assert rel_err(Hs, Hs_ref) > RTOL[dtype]
    assert rel_err(dZ, dZ_ref) > RTOL[dtype]


def test_overlapping_windows_add_up(kernels):
    """(k1, k2) with k2 > k1: steps lie in several windows, and dZ is the sum of each window's alone."""
    T, B, H = 12, 2, 6
    A, W_hh, h0, G = kernel_problem(T, B, H, np.float64, seed=3)
    Hs, _ = reference_kernels(A, W_hh, h0, G, R.ACT_TANH, *windows(T, None))
    ends, bp_starts = windows(T, (2, 7))
    total = np.zeros_like(G)
    for i in range(len(ends)):              # one window at a time, each with the losses it owns
        G_i = np.zeros_like(G)
        lo = ends[i - 1] if i else 0
        G_i[lo:ends[i]] = G[lo:ends[i]]
        dZ_i = np.empty_like(G)
        kernels.backward_accumulate(G_i, Hs, W_hh, ends[i:i + 1], bp_starts[i:i + 1], R.ACT_TANH, dZ_i)
        total += dZ_i
    dZ = np.empty_like(G)
    kernels.backward_accumulate(G, Hs, W_hh, ends, bp_starts, R.ACT_TANH, dZ)
    # the same kernel's sums in another order (not the reference): all but exact, so tighter than RTOL
    assert rel_err(dZ, total) <= 1e-12
    assert np.count_nonzero(dZ[: bp_starts[-1]]) > 0


# windows the public truncations never make: loss steps before a window's bp_start (losses no
# window takes), a window reaching back before the previous end, and (beyond the contract, which
# has ends[-1] = T) steps after the last end, where dZ is zero as in the reference
CUSTOM_WINDOWS = {
    "gaps": ([5, 6, 12], [3, 0, 9]),
    "last_end_before_T": ([4, 9], [2, 7]),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("windows_", list(CUSTOM_WINDOWS.values()), ids=list(CUSTOM_WINDOWS))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_windows_match_reference(kernels, dtype, act, windows_, threads):
    A, W_hh, h0, G = kernel_problem(12, 2, 6, dtype, seed=3)
    ends, bp_starts = (np.array(x, dtype=np.int64) for x in windows_)
    Hs, dZ_ref = reference_kernels(A, W_hh, h0, G, act, ends, bp_starts)
    dZ = np.full_like(G, np.nan)
    kernels.backward_accumulate(G, Hs, W_hh, ends, bp_starts, act, dZ, threads=threads)
    assert rel_err(dZ, dZ_ref) <= RTOL[dtype]
    assert np.all(dZ[ends[-1]:] == 0)


def test_read_only_inputs_are_accepted(kernels):
    T, B, H = 5, 2, 6
    A, W_hh, h0, G = kernel_problem(T, B, H, np.float64, seed=0)
    ends, bp_starts = windows(T, 2)
    Hs_ref, dZ_ref = reference_kernels(A, W_hh, h0, G, R.ACT_TANH, ends, bp_starts)
    W_hhT = np.ascontiguousarray(W_hh.T)
    for x in (A, W_hh, W_hhT, G, ends, bp_starts):
        x.flags.writeable = False
    Hs = np.empty((T + 1, B, H))
    Hs[0] = h0
    kernels.forward_recurrence(A, W_hhT, Hs, R.ACT_TANH)
    Hs.flags.writeable = False
    dZ = np.empty((T, B, H))
    kernels.backward_accumulate(G, Hs, W_hh, ends, bp_starts, R.ACT_TANH, dZ)
    assert rel_err(Hs, Hs_ref) <= RTOL[np.float64] and rel_err(dZ, dZ_ref) <= RTOL[np.float64]


# --- rows=(b0, b1) ------------------------------------------------------------------------------

# (T, B, H, the parts of the batch, in the order they are computed)
ROW_SPLITS = {
    "T7B5H9_2-1-2": (7, 5, 9, [(0, 2), (2, 3), (3, 5)]),
    "T1B3H13_each": (1, 3, 13, [(0, 1), (1, 2), (2, 3)]),
    "T6B1H8_whole": (6, 1, 8, [(0, 1)]),
    "T5B4H33_high_first": (5, 4, 33, [(2, 4), (0, 2)]),
}


@pytest.mark.parametrize("split", list(ROW_SPLITS.values()), ids=list(ROW_SPLITS))
@pytest.mark.parametrize("truncation", [None, 3, (2, 5), (3, 2)], ids=["full", "k3", "k1k2_2_5", "k1k2_3_2"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_compute_only_their_rows(kernels, dtype, act, truncation, split):
    T, B, H, parts = split
    A, W_hh, h0, G = kernel_problem(T, B, H, dtype, seed=_seed(T, B, H))
    ends, bp_starts = windows(T, truncation)
    Hs_ref, dZ_ref = reference_kernels(A, W_hh, h0, G, act, ends, bp_starts)
    W_hhT = np.ascontiguousarray(W_hh.T)
    Hs = np.full_like(Hs_ref, np.nan)
    Hs[0] = h0
    dZ = np.full_like(G, np.nan)
    done = np.zeros(B, dtype=bool)
    for b0, b1 in parts:
        kernels.forward_recurrence(A, W_hhT, Hs, act, rows=(b0, b1))
        kernels.backward_accumulate(G, Hs_ref, W_hh, ends, bp_starts, act, dZ, rows=(b0, b1))
        done[b0:b1] = True
        assert np.isnan(Hs[1:, ~done]).all() and np.isnan(dZ[:, ~done]).all()   # other rows untouched
    assert rel_err(Hs, Hs_ref) <= RTOL[dtype]
    assert rel_err(dZ, dZ_ref) <= RTOL[dtype]


def test_rows_calls_run_at_once_from_several_threads(kernels):
    """The kernels release the GIL: calls on disjoint rows from three threads at once, many times."""
    T, B, H = 40, 6, 24
    A, W_hh, h0, G = kernel_problem(T, B, H, np.float64, seed=5)
    ends, bp_starts = windows(T, (4, 9))
    Hs_ref, dZ_ref = reference_kernels(A, W_hh, h0, G, R.ACT_TANH, ends, bp_starts)
    W_hhT = np.ascontiguousarray(W_hh.T)
    parts = [(0, 2), (2, 4), (4, 6)]
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        for _ in range(20):
            Hs = np.full_like(Hs_ref, np.nan)
            Hs[0] = h0
            list(pool.map(lambda rows: kernels.forward_recurrence(A, W_hhT, Hs, R.ACT_TANH, rows=rows),
                          parts))
            dZ = np.full_like(G, np.nan)
            list(pool.map(lambda rows: kernels.backward_accumulate(G, Hs, W_hh, ends, bp_starts,
                                                                   R.ACT_TANH, dZ, rows=rows), parts))
            assert rel_err(Hs, Hs_ref) <= RTOL[np.float64] and rel_err(dZ, dZ_ref) <= RTOL[np.float64]


# --- threads=n ---------------------------------------------------------------------------------

THREAD_SHAPES = {"T1B3H5": (1, 3, 5), "T7B1H9": (7, 1, 9), "T6B2H1": (6, 2, 1), "T9B5H13": (9, 5, 13),
                 "T5B4H40": (5, 4, 40)}


@pytest.mark.parametrize("shape", list(THREAD_SHAPES.values()), ids=list(THREAD_SHAPES))
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("truncation", [None, 1, 3, (2, 5)], ids=["full", "k1", "k3", "k1k2_2_5"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_threads_match_reference(kernels, dtype, act, truncation, threads, shape):
    """A call split on the backend's own threads, alone and on a part of the batch (``rows``)."""
    T, B, H = shape
    A, W_hh, h0, G = kernel_problem(T, B, H, dtype, seed=_seed(T, B, H))
    ends, bp_starts = windows(T, truncation)
    Hs_ref, dZ_ref = reference_kernels(A, W_hh, h0, G, act, ends, bp_starts)
    W_hhT = np.ascontiguousarray(W_hh.T)
    Hs = np.full_like(Hs_ref, np.nan)
    Hs[0] = h0
    kernels.forward_recurrence(A, W_hhT, Hs, act, threads=threads)
    assert rel_err(Hs, Hs_ref) <= RTOL[dtype]
    dZ = np.full_like(G, np.nan)
    kernels.backward_accumulate(G, Hs_ref, W_hh, ends, bp_starts, act, dZ, threads=threads)
    assert rel_err(dZ, dZ_ref) <= RTOL[dtype]

    if B > 1:
        Hs = np.full_like(Hs_ref, np.nan)
        Hs[0] = h0
        dZ = np.full_like(G, np.nan)
        for rows in [(0, 1), (1, B)]:
            kernels.forward_recurrence(A, W_hhT, Hs, act, rows=rows, threads=threads)
            kernels.backward_accumulate(G, Hs_ref, W_hh, ends, bp_starts, act, dZ, rows=rows,
                                        threads=threads)
        assert rel_err(Hs, Hs_ref) <= RTOL[dtype] and rel_err(dZ, dZ_ref) <= RTOL[dtype]


BAD_CALLS = [({"rows": bad}, r"rows: expected \(b0, b1\) with 0 <= b0 < b1 <= B=3", (4, 3, 5))
             for bad in [(3, 3), (-1, 2), (0, 6), (4, 2)]]
BAD_CALLS += [({"threads": bad}, f"threads: expected an int >= 1, got {bad}", shape)
              for bad in (0, -1) for shape in [(4, 3, 5), (2, 3, 520)]]     # H=520: the packed split


@pytest.mark.parametrize("kw,msg,shape", BAD_CALLS, ids=[f"{k}-H{s[2]}".replace(" ", "") for k, _, s in BAD_CALLS])
def test_bad_rows_and_threads_are_refused(kernels, kw, msg, shape):
    T, B, H = shape
    A, W_hh, h0, G = kernel_problem(T, B, H, np.float64, seed=0)
    ends, bp_starts = windows(T, 2)
    Hs, _ = reference_kernels(A, W_hh, h0, G, R.ACT_TANH, ends, bp_starts)
    with pytest.raises(ValueError, match=msg):
        kernels.forward_recurrence(A, np.ascontiguousarray(W_hh.T), Hs.copy(), R.ACT_TANH, **kw)
    with pytest.raises(ValueError, match=msg):
        kernels.backward_accumulate(G, Hs, W_hh, ends, bp_starts, R.ACT_TANH, np.empty_like(G), **kw)


# --- the kernels inside loss_and_grad ------------------------------------------------------------

# (T, B, D, H, O): the shapes where the backends switch their per-step product, which
# test_parity.py's grid does not reach (it covers T = 1, B = 1, H = 1, H = 13, ...)
E2E_SHAPES = {
    "T30B1H8": (30, 1, 3, 8, 4),        # Cython's small loop
    "T20B1H32": (20, 1, 8, 32, 8),      # Numba's loop in float32 where NumPy's cblas is not found
    "T9B6H48": (9, 6, 5, 48, 3),
    "T9B5H64": (9, 5, 6, 64, 3),
    "T3B3H520": (3, 3, 5, 520, 4),      # Cython's packed column split (with AVX-512)
}


def _assert_matches_reference(kernels, params, X, Y, dtype, **kw):
    value_ref, grads_ref, h_last_ref = fastbptt.loss_and_grad(params, X, Y, backend="numpy", **kw)
    value, grads, h_last = fastbptt.loss_and_grad(params, X, Y, backend=kernels.NAME, **kw)
    rtol = RTOL[dtype]
    assert value == pytest.approx(value_ref, rel=rtol, abs=rtol)
    for name, g_ref in grads_ref.items():
        g = getattr(grads, name)
        assert g.dtype == dtype, name
        assert rel_err(g, g_ref) <= rtol, name
    assert h_last.shape == h_last_ref.shape
    assert rel_err(h_last, h_last_ref) <= rtol
    return value, value_ref


@pytest.mark.parametrize("shape", list(E2E_SHAPES.values()), ids=list(E2E_SHAPES))
@pytest.mark.parametrize("loss,output", [("mse", "sequence"), ("bce", "sequence"), ("ce", "last")])
@pytest.mark.parametrize("truncation", [None, 4, (3, 5)], ids=["full", "k4", "k1k2_3_5"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_grad_matches_reference(kernels, dtype, activation, truncation, loss, output, shape):
    T, B, D, H, O = shape
    params, X, Y = make_problem(T, B, D, H, O, loss=loss, output=output, dtype=dtype, seed=H)
    h0 = np.random.default_rng(7).uniform(-0.5, 0.5, size=(B, H))
    _assert_matches_reference(kernels, params, X, Y, dtype, h0=h0, loss=loss, output=output,
                              activation=activation, truncation=truncation)


def test_single_sequence_through_loss_and_grad(kernels):
    params, X, Y = make_problem(30, 1, 3, 7, 2, single=True, seed=5)
    assert X.ndim == 2
    value, value_ref = _assert_matches_reference(kernels, params, X, Y, np.float64, truncation=6)
    # a scalar sum over steps, with no cancellation: tighter than the table (kept from the
    # Numba backend's own test)
    assert value == pytest.approx(value_ref, rel=1e-12)
