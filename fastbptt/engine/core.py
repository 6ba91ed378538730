"""The shared machinery around the kernels: work arrays, truncation windows, threaded GEMMs.

Everything that is not sequential runs here, shared by every backend, as one
large BLAS call each; the two sequential loops are the backend's (see the
kernel contract in :mod:`fastbptt.backends.reference`).
"""

import math
import threading
from functools import partial

import numpy as np

from . import blas as _blas
from .._threads import parts, run, team_size
from ..backends.reference import ACT_RELU, ACT_TANH

ACT_CODES = {"tanh": ACT_TANH, "relu": ACT_RELU}

# Work arrays (A, G, dZ, Hs) are reused from call to call, per thread: a fresh
# (T, B, H) array each call costs its page faults again (glibc returns freed
# blocks of this size to the OS), measured at ~600-800 faults and half of a
# 3.4 ms step at T=100, B=32, H=64. Arrays larger than this are allocated
# per call: there the faults are small beside the O(H) work per element.
_SCRATCH_MAX_BYTES = 32 << 20
_scratch_local = threading.local()


def scratch(name, shape, dtype):
    """A reusable C-contiguous work array of ``shape``; its contents are undefined.

    Valid until the next call that asks for the same ``name`` on this thread.
    """
    local = _scratch_local.__dict__
    views = local.setdefault("views", {})
    key = (name, shape, dtype)
    view = views.get(key)
    if view is not None:                    # the common case: the same shape as last time
        return view
    size = math.prod(shape)
    dtype_ = np.dtype(dtype)
    if size * dtype_.itemsize > _SCRATCH_MAX_BYTES:
        return np.empty(shape, dtype=dtype_)
    cache = local.setdefault("arrays", {})
    buf = cache.get(name)
    if buf is None or buf.dtype != dtype_ or buf.size < size:
        buf = cache[name] = np.empty(size, dtype=dtype_)
        for k in [k for k in views if k[0] == name]:      # views of the old buffer
            del views[k]
    if len(views) > 64:
        views.clear()
    view = views[key] = buf[:size].reshape(shape)
    return view


def is_artbp(truncation):
    """Whether ``truncation`` (validated) is ARTBP's ``("artbp", c, seed)``."""
    return isinstance(truncation, tuple) and truncation[0] == "artbp"


def windows(T, truncation):
    """The backprop windows of a truncation mode, as the kernels take them.

    Parameters
    ----------
    T : int
        Sequence length.
    truncation : None, int k, (k1, k2) or ("artbp", c, seed)
        Already validated.

    Returns
    -------
    ends, bp_starts : int64 ndarrays of shape (n,)
        Window i backpropagates the losses of 0-based steps
        ``[ends[i-1], ends[i])`` through steps ``[bp_starts[i], ends[i])``.
    compensation : float, only for ARTBP
        ``("artbp", c, seed)`` (Tallec & Ollivier 2017) cuts the gradient at each
        step boundary with probability c, drawn from ``default_rng(seed)``, and
        multiplies the gradient that crosses a boundary uncut by ``1 / (1 - c)``:
        the expected gradient is full BPTT's.
    """
    if truncation is None:
        return np.array([T], dtype=np.int64), np.array([0], dtype=np.int64)
    if isinstance(truncation, int):
        k = min(truncation, T)                  # any k >= T is one window
        ends = np.append(np.arange(k, T, k, dtype=np.int64), T)
        starts = np.concatenate(([0], ends[:-1])).astype(np.int64)
        return ends, starts
    if truncation[0] == "artbp":
        _, c, seed = truncation
        cuts = np.flatnonzero(np.random.default_rng(seed).random(T - 1) < c).astype(np.int64) + 1
        return np.append(cuts, T).astype(np.int64), np.concatenate(([0], cuts)).astype(np.int64), 1.0 / (1.0 - c)
    k1, k2 = (min(k, T) for k in truncation)
    ends = np.append(np.arange(k1, T, k1, dtype=np.int64), T)
    return ends, np.maximum(ends - k2, 0).astype(np.int64)


def matmul(A, B, trans_a=False, trans_b=False, out=None):
    """``op(A) @ op(B)`` for 2-D arrays, on NumPy's BLAS (into ``out`` if given).

    NumPy's OpenBLAS, for every backend: its sgemm ran these shapes 10-25%
    faster than SciPy's (e.g. (128, 32000)·(32000, 128): 78 vs 61 GFLOP/s on
    one core). Inside a call both run on one thread (``_threads``), so the
    kernels' per-step products on SciPy's BLAS and these never leave two
    pools of spinning threads side by side.
    """
    return np.matmul(A.T if trans_a else A, B.T if trans_b else B, out=out)


def pmatmul(A, B, trans_a=False, trans_b=False, out=None, kernels=None):
    """:func:`_matmul` split between the call's threads when it is big enough (see ``_threads``).

    ``op(A)·op(B)`` is split by the rows of ``op(A)`` (and of ``out``); with
    ``trans_a`` those are the columns of ``A`` and its rows are the
    contraction, so that split goes by the contraction instead: each thread
    sums its share of it and the partial products are added.

    For a backend whose kernels split on fastbptt's C thread team
    (``kernels.TEAM``: the Cython backend) the split runs on that team too
    (``_blas.pgemm``: a hand-off there costs ~1 µs against ~20-100 µs on a
    pool of Python threads); otherwise on :func:`fastbptt._threads.run`, so
    that a call never has the team's spinning threads beside its own pool
    (they slowed the Numba backend by 1.5x).
    """
    m, k = (A.shape[1], A.shape[0]) if trans_a else A.shape
    n = B.shape[0] if trans_b else B.shape[1]
    c_team = getattr(kernels, "TEAM", False) and _blas.pgemm is not None
    team = team_size(2 * m * n * k, c_team=c_team)
    if team == 1 or (trans_a and trans_b):
        return matmul(A, B, trans_a, trans_b, out)
    if out is None:
        out = np.empty((m, n), dtype=A.dtype)
    if (c_team and A.dtype == B.dtype == out.dtype and A.dtype.kind == "f"
            and A.flags.c_contiguous and B.flags.c_contiguous and out.flags.c_contiguous):
        _blas.pgemm(trans_a, trans_b, A, B, out, team)
        return out
    if not trans_a:
        run([partial(matmul, A[r0:r1], B, False, trans_b, out[r0:r1])
             for r0, r1 in parts(m, team)])
        return out
    ranges = parts(k, team)
    sums = [out] + [np.empty_like(out) for _ in ranges[1:]]
    run([partial(matmul, A[k0:k1], B[k0:k1], True, False, s)
         for (k0, k1), s in zip(ranges, sums)])
    for s in sums[1:]:
        out += s
    return out


def recurrence(kernels, T, B, H, kernel, *args, batch_sizes=None):
    """``kernel(*args, threads=n)`` with the threads this call gives a recurrence of this size.

    Every backend takes ``threads=`` and splits the call itself (by batch rows,
    or by columns at large H, even at batch 1); ``kernels.TEAM`` says it splits
    on a C team, whose cheaper hand-off pays from smaller calls. ``batch_sizes``
    (a variable-length batch) is passed on when given.
    """
    threads = team_size(2 * T * B * H * H, c_team=kernels.TEAM)
    if batch_sizes is None:
        kernel(*args, threads=threads)
    else:
        kernel(*args, threads=threads, batch_sizes=batch_sizes)


def with_ones(X3, reverse=False, name="X1"):
    """``[X | 1]``: the inputs as (T·B, D+1) rows with a column of ones.

    With it the bias rides in the GEMMs: ``A = [X | 1]·[W_xh | b_h]ᵀ`` and
    ``[dW_xh | db_h] = dZᵀ·[X | 1]``, which saves two passes over (T, B, H)
    arrays (``A += b_h`` and ``Σ_t dz_t``) for one over the (T, B, D) inputs.
    ``reverse`` takes the steps in reverse order (a reverse direction's
    input). A work array named ``name``, or a new array if ``name`` is None.
    """
    T, B, D = X3.shape
    X1 = np.empty((T * B, D + 1), X3.dtype) if name is None else scratch(name, (T * B, D + 1), X3.dtype)
    if reverse:
        X1.reshape(T, B, D + 1)[:, :, :D] = X3[::-1]
    else:                   # as two 2-D arrays: a faster copy than through the 3-D views
        X1[:, :D] = X3.reshape(T * B, D)
    X1[:, D] = 1
    return X1


def column_sums(M):
    """``M.sum(axis=0)`` as one GEMV (``ones @ M``): 2-5x faster than numpy's reduction here."""
    return matmul(np.ones((1, M.shape[0]), dtype=M.dtype), M)[0]
