"""The public functional API: ``forward`` and ``loss_and_grad``.

Everything that is not sequential lives here, shared by every backend, as one
large BLAS call each: the input projection for all steps, the output layer,
the loss, and the weight-gradient sums. The two sequential loops are the
backend's (see the kernel contract in :mod:`fastbptt.backends.reference`).
"""

import math
import threading
from functools import partial

import numpy as np

from .. import _validation as V
from . import blas as _blas
from .threads import call_scope, parts, run, team_size
from ..backends import resolve_backend
from .losses import LOSS_FUNCS, LOSSES
from ..params import RNNParams
from ..backends.reference import ACT_RELU, ACT_TANH

_ACT_CODES = {"tanh": ACT_TANH, "relu": ACT_RELU}

# Work arrays (A, G, dZ, Hs) are reused from call to call, per thread: a fresh
# (T, B, H) array each call costs its page faults again (glibc returns freed
# blocks of this size to the OS), measured at ~600-800 faults and half of a
# 3.4 ms step at T=100, B=32, H=64. Arrays larger than this are allocated
# per call: there the faults are small beside the O(H) work per element.
_SCRATCH_MAX_BYTES = 32 << 20
_scratch_local = threading.local()


def _scratch(name, shape, dtype):
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


def windows(T, truncation):
    """The backprop windows of a truncation mode, as the kernels take them.

    Parameters
    ----------
    T : int
        Sequence length.
    truncation : None, int k or (k1, k2)
        Already validated (see DESIGN.md, "Truncation").

    Returns
    -------
    ends, bp_starts : int64 ndarrays of shape (n,)
        Window i backpropagates the losses of 0-based steps
        ``[ends[i-1], ends[i])`` through steps ``[bp_starts[i], ends[i])``.
    """
    if truncation is None:
        return np.array([T], dtype=np.int64), np.array([0], dtype=np.int64)
    if isinstance(truncation, int):
        ends = np.append(np.arange(truncation, T, truncation, dtype=np.int64), T)
        starts = np.concatenate(([0], ends[:-1])).astype(np.int64)
        return ends, starts
    k1, k2 = truncation
    ends = np.append(np.arange(k1, T, k1, dtype=np.int64), T)
    return ends, np.maximum(ends - k2, 0).astype(np.int64)


def _prepare(params, X, h0):
    V.check_params(params)
    X3, single = V.check_X(X, params)
    h0_ = V.check_h0(h0, params, X3.shape[1], single)
    return X3, h0_, single


def _matmul(A, B, trans_a=False, trans_b=False, out=None):
    """``op(A) @ op(B)`` for 2-D arrays, on NumPy's BLAS (into ``out`` if given).

    NumPy's OpenBLAS, for every backend: its sgemm ran these shapes 10-25%
    faster than SciPy's (e.g. (128, 32000)·(32000, 128): 78 vs 61 GFLOP/s on
    one core). Inside a call both run on one thread (``_threads``), so the
    kernels' per-step products on SciPy's BLAS and these never leave two
    pools of spinning threads side by side.
    """
    return np.matmul(A.T if trans_a else A, B.T if trans_b else B, out=out)


def _pmatmul(A, B, trans_a=False, trans_b=False, out=None, kernels=None):
    """:func:`_matmul` split between the call's threads when it is big enough (see ``_threads``).

    ``op(A)·op(B)`` is split by the rows of ``op(A)`` (and of ``out``); with
    ``trans_a`` those are the columns of ``A`` and its rows are the
    contraction, so that split goes by the contraction instead: each thread
    sums its share of it and the partial products are added.

    For a backend whose kernels split on fastbptt's C thread team
    (``kernels.TEAM``: the Cython backend) the split runs on that team too
    (``_blas.pgemm``: a hand-off there costs ~1 µs against ~20-100 µs on a
    pool of Python threads); otherwise on :func:`fastbptt.engine.threads.run`, so
    that a call never has the team's spinning threads beside its own pool
    (they slowed the Numba backend by 1.5x).
    """
    m, k = (A.shape[1], A.shape[0]) if trans_a else A.shape
    n = B.shape[0] if trans_b else B.shape[1]
    c_team = getattr(kernels, "TEAM", False) and _blas.pgemm is not None
    team = team_size(2 * m * n * k, c_team=c_team)
    if team == 1 or (trans_a and trans_b):
        return _matmul(A, B, trans_a, trans_b, out)
    if out is None:
        out = np.empty((m, n), dtype=A.dtype)
    if (c_team and A.dtype == B.dtype == out.dtype and A.dtype.kind == "f"
            and A.flags.c_contiguous and B.flags.c_contiguous and out.flags.c_contiguous):
        _blas.pgemm(trans_a, trans_b, A, B, out, team)
        return out
    if not trans_a:
        run([partial(_matmul, A[r0:r1], B, False, trans_b, out[r0:r1])
             for r0, r1 in parts(m, team)])
        return out
    ranges = parts(k, team)
    sums = [out] + [np.empty_like(out) for _ in ranges[1:]]
    run([partial(_matmul, A[k0:k1], B[k0:k1], True, False, s)
         for (k0, k1), s in zip(ranges, sums)])
    for s in sums[1:]:
        out += s
    return out


def _batch_parts(kernels, T, B, H):
    """How a pool of Python threads splits the batch for the recurrence kernels: ``[(b0, b1), ...]``.

    Each sequence of a batch is independent, so each thread can run a kernel
    on its own ``rows``. Only backends whose kernels release the GIL say they
    can (``SPLITS_BATCH``); the reference never does.
    """
    if not getattr(kernels, "SPLITS_BATCH", False):
        return [(0, B)]
    team = team_size(2 * T * B * H * H, c_team=getattr(kernels, "TEAM", False))
    return [(0, B)] if team == 1 else parts(B, team)


def _recurrence(kernels, T, B, H, kernel, *args):
    """``kernel(*args)`` on the call's threads.

    A backend with a C team (``kernels.TEAM``) splits the call itself
    (``threads=``: by batch rows, or by columns at large H, even at batch 1);
    otherwise one call per batch part (``rows=``) runs on :func:`_threads.run`.
    """
    if getattr(kernels, "TEAM", False):
        team = team_size(2 * T * B * H * H, c_team=True)
        if team > 1:
            kernel(*args, threads=team)
        else:
            kernel(*args)
        return
    ranges = _batch_parts(kernels, T, B, H)
    if len(ranges) == 1:
        kernel(*args)
    else:
        run([partial(kernel, *args, rows=r) for r in ranges])


def _with_ones(X3):
    """``[X | 1]``: the inputs as (T·B, D+1) rows with a column of ones (a work array).

    With it the bias rides in the GEMMs: ``A = [X | 1]·[W_xh | b_h]ᵀ`` and
    ``[dW_xh | db_h] = dZᵀ·[X | 1]``, which saves two passes over (T, B, H)
    arrays (``A += b_h`` and ``Σ_t dz_t``) for one over the (T, B, D) inputs.
    """
    T, B, D = X3.shape
    X1 = _scratch("X1", (T * B, D + 1), X3.dtype)
    X1[:, :D] = X3.reshape(T * B, D)
    X1[:, D] = 1
    return X1


def _run_forward(kernels, params, X3, h0, act, Hs=None, X1=None):
    """Shared forward: A = X·W_xhᵀ + b_h (one GEMM), then the kernel's recurrence.

    Returns ``Hs`` (T+1, B, H), a new array unless one is given. ``X1`` is
    ``_with_ones(X3)`` when the caller has it already.
    """
    T, B, D = X3.shape
    H = params.hidden_size
    if X1 is None:
        X1 = _with_ones(X3)
    W1 = np.empty((H, D + 1), dtype=params.dtype)          # [W_xh | b_h]
    W1[:, :D] = params.W_xh
    W1[:, D] = params.b_h
    A = _scratch("A", (T, B, H), params.dtype)
    _pmatmul(X1, W1, trans_b=True, out=A.reshape(T * B, H), kernels=kernels)
    if Hs is None:
        Hs = np.empty((T + 1, B, H), dtype=params.dtype)
    Hs[0] = h0
    W_hhT = np.ascontiguousarray(params.W_hh.T)
    _recurrence(kernels, T, B, H, kernels.forward_recurrence, A, W_hhT, Hs, act)
    return Hs


def _column_sums(M):
    """``M.sum(axis=0)`` as one GEMV (``ones @ M``): 2-5x faster than numpy's reduction here."""
    return _matmul(np.ones((1, M.shape[0]), dtype=M.dtype), M)[0]


def _logits(params, Hs, kernels=None):
    """o = W_hy h + b_y for every row of ``Hs`` (..., H) -> (..., O)."""
    rows = Hs.reshape(-1, Hs.shape[-1])
    O_rows = _pmatmul(rows, params.W_hy, trans_b=True, kernels=kernels)
    O_rows += params.b_y
    return O_rows.reshape(Hs.shape[:-1] + (params.output_size,))


def forward(params, X, h0=None, *, activation="tanh", backend="auto"):
    """Run the RNN forward over a batch of sequences.

    Parameters
    ----------
    params : RNNParams
    X : array_like of shape (T, B, D), or (T, D) for one sequence
    h0 : array_like of shape (B, H), or (H,) for one sequence; zeros if None
    activation : {"tanh", "relu"}
    backend : {"auto", "cython", "numba", "numpy"}

    Returns
    -------
    O_logits : ndarray of shape (T, B, O)  (or (T, O) for 2-D X)
    Hs : ndarray of shape (T+1, B, H)  (or (T+1, H)); ``Hs[0] = h0``
    """
    V.check_choice("activation", activation, V.ACTIVATIONS)
    X3, h0_, single = _prepare(params, X, h0)
    T, B, _ = X3.shape
    kernels = resolve_backend(backend, T=T, B=B, H=params.hidden_size, dtype=params.dtype)
    with call_scope():
        Hs = _run_forward(kernels, params, X3, h0_, _ACT_CODES[activation])
        O_logits = _logits(params, Hs[1:], kernels)
    if single:
        return O_logits[:, 0, :], Hs[:, 0, :]
    return O_logits, Hs


def loss_and_grad(params, X, Y, *, h0=None, loss="mse", output="sequence", activation="tanh",
                  truncation=None, backend="auto"):
    """Loss and gradient of all parameters by (truncated) backpropagation through time.

    Parameters
    ----------
    params : RNNParams
    X : array_like of shape (T, B, D), or (T, D) for one sequence
    Y : array_like
        Targets. ``output="sequence"``: (T, B, O) floats for mse/bce, (T, B)
        int class ids for ce. ``output="last"``: (B, O), or (B,) for ce.
        With 2-D X the B axis is dropped.
    h0 : array_like of shape (B, H) (or (H,)), optional; zeros if None
    loss : {"mse", "bce", "ce"}
    output : {"sequence", "last"}
    activation : {"tanh", "relu"}
    truncation : None, int k >= 1, or (k1, k2) with 1 <= k1 <= k2
        See DESIGN.md, "Truncation"; the gradient is summed over update points.
    backend : {"auto", "cython", "numba", "numpy"}

    Returns
    -------
    loss : float
        The whole-sequence loss, whatever the truncation.
    grads : RNNParams
        Gradients, field for field.
    h_last : ndarray of shape (B, H) (or (H,))
    """
    V.check_choice("loss", loss, LOSSES)
    V.check_choice("output", output, V.OUTPUTS)
    V.check_choice("activation", activation, V.ACTIVATIONS)
    truncation = V.check_truncation(truncation)
    X3, h0_, single = _prepare(params, X, h0)
    T, B, _ = X3.shape
    Y_ = V.check_Y(Y, params, T, B, single, loss, output)
    kernels = resolve_backend(backend, T=T, B=B, H=params.hidden_size, dtype=params.dtype)
    with call_scope():
        value, grads, Hs = _loss_and_grad(kernels, params, X3, Y_, h0_, loss, output,
                                          _ACT_CODES[activation], windows(T, truncation))
    h_last = Hs[T, 0].copy() if single else Hs[T].copy()
    return value, grads, h_last


def _loss_and_grad(kernels, params, X3, Y, h0, loss, output, act, wins, loss_from=0):
    """Validated core shared by the functional API and the trainer.

    ``X3`` (T, B, D) and ``Y`` are checked, C-contiguous and typed; ``wins`` is
    ``(ends, bp_starts)``. With ``output="sequence"``, ``loss_from`` > 0 puts
    the loss on steps ``[loss_from, T)`` only (the trainer's (k1, k2) updates:
    forward through k2 steps, loss on the last k1), and ``Y`` then covers only
    those steps: (T - loss_from, B, ...). Returns ``(loss, grads, Hs)``;
    ``Hs`` is a work array, valid until the next call on this thread.
    """
    T, B, D = X3.shape
    H, O = params.hidden_size, params.output_size
    X1 = _with_ones(X3)
    Hs = _run_forward(kernels, params, X3, h0, act, Hs=_scratch("Hs", (T + 1, B, H), params.dtype), X1=X1)

    # output layer and loss: one GEMM over all loss steps (or the last one)
    Tl = T - loss_from
    H_out = Hs[1 + loss_from:].reshape(Tl * B, H) if output == "sequence" else Hs[T]
    O_logits = _logits(params, H_out, kernels)
    value, dO = LOSS_FUNCS[loss](O_logits.reshape(Y.shape + (O,)) if loss == "ce" else
                                 O_logits.reshape(Y.shape), Y)
    dO = dO.reshape(-1, O)
    dW_hy = _pmatmul(dO, H_out, trans_a=True, kernels=kernels)
    db_y = _column_sums(dO)

    # G[t] = ∂L/∂h_t, the direct term from the output layer (zero where no loss)
    G = _scratch("G", (T, B, H), params.dtype)
    if output == "sequence":
        G[:loss_from] = 0
        _pmatmul(dO, params.W_hy, out=G[loss_from:].reshape(Tl * B, H), kernels=kernels)
    else:
        G[:T - 1] = 0
        _matmul(dO, params.W_hy, out=G[T - 1])

    dZ = _scratch("dZ", (T, B, H), params.dtype)
    ends, bp_starts = wins
    _recurrence(kernels, T, B, H, kernels.backward_accumulate, G, Hs,
                np.ascontiguousarray(params.W_hh), ends, bp_starts, act, dZ)

    # weight gradients: [Σ_t dz_t x_tᵀ | Σ_t dz_t] and Σ_t dz_t h_{t-1}ᵀ -- one GEMM each
    dZ2 = dZ.reshape(T * B, H)
    dW1 = _pmatmul(dZ2, X1, trans_a=True, kernels=kernels)
    dW_xh, db_h = np.ascontiguousarray(dW1[:, :D]), dW1[:, D].copy()
    dW_hh = _pmatmul(dZ2, Hs[:-1].reshape(T * B, H), trans_a=True, kernels=kernels)
    grads = RNNParams._trusted(dW_xh, dW_hh, db_h, dW_hy, db_y)
    return value, grads, Hs
