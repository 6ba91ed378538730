"""The NumPy reference backend: the equations of the model and of BPTT, line for line.

This module is the oracle every other backend is tested against. It is
written to be read beside the equations, never tuned for speed::

    z_t      = W_xh x_t + W_hh h_{t-1} + b_h
    h_t      = f(z_t)                              f = tanh or relu
    dz_t     = δ_t ⊙ f'(z_t)                       tanh: 1 - h_t²,  relu: [h_t > 0]
    δ_{t-1} += W_hhᵀ dz_t

The kernel contract
-------------------
Every backend (this one, ``numba``, ``cython``) implements the same two
sequential loops; everything that is not sequential -- the input projection
``A = X·W_xhᵀ + b_h`` for all steps, the output layer and the weight-gradient
sums -- is shared code in :mod:`fastbptt.engine.core`, one big BLAS call each.

Rows are the batch axis (row-major), so for a batch of row vectors
``h_{t-1}`` (B, H) the product ``W_hh h_{t-1}`` is ``Hs[t] @ W_hhᵀ`` and
``W_hhᵀ dz_t`` is ``dz_t @ W_hh``.

``forward_recurrence(A, W_hhT, Hs, act, threads=1, batch_sizes=None)``
    A     : ndarray (T, B, H), C-contiguous, = X·W_xhᵀ + b_h.  Read only.
    W_hhT : ndarray (H, H), C-contiguous copy of W_hhᵀ.       Read only.
    Hs    : ndarray (T+1, B, H), C-contiguous; the caller sets ``Hs[0] = h0``,
            the kernel writes ``Hs[t+1] = f(A[t] + Hs[t] @ W_hhT)``.
    act   : int, ``ACT_TANH`` (0) or ``ACT_RELU`` (1).

``backward_accumulate(G, Hs, W_hh, ends, bp_starts, act, dZ, threads=1, batch_sizes=None)``
    G         : ndarray (T, B, H), C-contiguous, the direct gradient
                ∂L/∂h_t from the output layer (zero where no loss).  Read only.
    Hs        : ndarray (T+1, B, H) from the forward.                  Read only.
    W_hh      : ndarray (H, H), C-contiguous.                          Read only.
    ends      : int64 ndarray (n,), the update points, increasing, last = T.
    bp_starts : int64 ndarray (n,), bp_starts[i] <= ends[i]-1 is the first
                (0-based) step that window i backpropagates into.
    act       : int, as above.
    dZ        : ndarray (T, B, H), C-contiguous, output: the kernel overwrites
                it with ``dZ[t] = Σ_windows dz_t``.

    Window i backpropagates the losses of steps ``[ends[i-1], ends[i])``
    (``ends[-1]`` read as 0) through steps ``[bp_starts[i], ends[i])``: its δ
    chain starts at zero at step ``ends[i]-1``, takes ``G[t]`` only at its own
    loss steps, and stops at ``bp_starts[i]`` (the gradient does not cross it).

Variable-length sequences: both kernels take ``batch_sizes=None`` or an
int64 ndarray (T,) of non-increasing counts ``n_t <= B``: the rows are sorted
by length, longest first, and step t runs on rows ``0 .. n_t-1`` only (the
rows still active, as in torch's ``PackedSequence``). The kernels never read
the other rows of ``A``, ``G`` or ``Hs[t+1]`` and never write those of ``Hs``;
``dZ[t]`` there is undefined (the backward may zero it); a row's δ chain starts at zero at its own last
step ``t`` (``n_{t+1} <= b < n_t``) and takes ``G[t]`` there as at any loss step.

Both kernels take one more argument, ``threads`` (an int >= 1, default 1):
the threads the call may use. A backend splits the batch rows between them
(each sequence is independent) or, at large H, the columns of every step;
this reference runs on one thread whatever it is given. ``TEAM = True`` says
that the backend splits on a C thread team whose hand-off costs ~1 µs (the
Cython one), so that :mod:`fastbptt.engine.core` splits smaller calls for it
than for a pool of Python threads (~20-100 µs).

Full BPTT is ``ends = [T], bp_starts = [0]``; ``truncation=k`` gives disjoint
windows; ``(k1, k2)`` overlapping ones (see :func:`fastbptt.engine.core.windows`).
Kernels allocate nothing inside the time loop and never write their inputs.
"""

import numpy as np

ACT_TANH = 0
ACT_RELU = 1

NAME = "numpy"
TEAM = False


def _f(z, act):
    """h = f(z), the activation."""
    return np.tanh(z) if act == ACT_TANH else np.maximum(z, 0)


def _f_prime_from_h(h, act):
    """f'(z_t) written with h_t = f(z_t): tanh' = 1 - h², relu' = [h > 0]."""
    return 1 - h * h if act == ACT_TANH else (h > 0).astype(h.dtype)


def _active(batch_sizes, t, B):
    """n_t: the rows that step t runs on."""
    return B if batch_sizes is None else int(batch_sizes[t])


def forward_recurrence(A, W_hhT, Hs, act, threads=1, batch_sizes=None):
    """Fill ``Hs[1:]``: h_t = f(W_xh x_t + b_h + W_hh h_{t-1}); see the module docstring."""
    T, B = A.shape[0], A.shape[1]
    for t in range(T):
        n = _active(batch_sizes, t, B)          # the rows still active at step t
        z_t = A[t, :n] + Hs[t, :n] @ W_hhT      # z_t = (W_xh x_t + b_h) + W_hh h_{t-1}
        Hs[t + 1, :n] = _f(z_t, act)            # h_t = f(z_t)


def backward_accumulate(G, Hs, W_hh, ends, bp_starts, act, dZ, threads=1, batch_sizes=None):
    """Fill ``dZ`` with the pre-activation gradients of every window; see the module docstring."""
    T, B = G.shape[0], G.shape[1]
    dZ[...] = 0
    loss_start = 0
    for end, bp_start in zip(ends, bp_starts):
        delta = np.zeros_like(G[0])                       # δ carried back from step t+1 (0: none yet)
        for t in range(end - 1, bp_start - 1, -1):
            n = _active(batch_sizes, t, B)
            if t >= loss_start:
                delta[:n] += G[t, :n]                     # δ_t = ∂L/∂h_t (direct) + carried
            dz_t = delta[:n] * _f_prime_from_h(Hs[t + 1, :n], act)  # dz_t = δ_t ⊙ f'(z_t)
            dZ[t, :n] += dz_t                             # dW_* sum dz_t outside the loop
            delta[:n] = dz_t @ W_hh                       # δ_{t-1} = W_hhᵀ dz_t
        loss_start = end
