"""The whole model on validated arrays: the stack, the head and the loss, forward and backward.

Shared by the functional API and the trainer. Everything here takes checked,
C-contiguous arrays of the parameters' dtype and a resolved backend module.
"""

import numpy as np

from . import checkpoint as _checkpoint
from . import fused as _fused
from .core import column_sums, matmul, pmatmul, scratch, windows
from .losses import LOSS_FUNCS
from .stack import head_logits, pack_grads, stack_backward, stack_forward


def loss_and_grad(kernels, params, X3, Y, h0s, loss, output, act, wins, loss_from=0, pack=None,
                  last_rows=None):
    """Loss and gradients of every parameter; returns ``(loss, grads, fwd)``.

    ``X3`` (T, B, D), ``h0s`` (L·dirs, B, H) and ``Y`` are checked and typed;
    ``wins`` is ``(ends, bp_starts)``. With ``output="sequence"``, ``loss_from``
    > 0 puts the loss on steps ``[loss_from, T)`` only (the trainer's (k1, k2)
    updates: forward through k2 steps, loss on the last k1), and ``Y`` then
    covers only those steps. With ``pack`` (rows sorted by length, see
    :mod:`fastbptt.engine.lengths`) the loss is the mean over valid positions
    and ``Y`` holds the valid rows only: for ``"sequence"`` (n, O) / (n,), the
    valid positions at steps >= ``loss_from`` in ``pack.idx`` order; (B, O) / (B,)
    sorted for ``"last"``. ``last_rows`` (``"last"`` only): the rows that have a
    loss (the trainer's update points hold some rows' last steps only); ``Y``
    then has those rows only. ``fwd`` is the
    :class:`~fastbptt.engine.stack.StackForward`, in work arrays valid until the
    next call on this thread.
    """
    T, B, _ = X3.shape
    O = params.output_size
    if pack is None and not loss_from and last_rows is None and _fused.applies(kernels, params, T, B, wins):
        return _fused.loss_and_grad(kernels, params, X3, Y, h0s, loss, output, act, wins)
    if (not params.bidirectional and not loss_from and last_rows is None and len(wins) == 2
            and wins[0].shape[0] == 1 and wins[1][0] == 0):
        # full BPTT in the fixed time blocks that checkpointed BPTT sums in too (bit for bit)
        return _checkpoint.loss_and_grad(kernels, params, X3, Y, h0s, loss, output, act, pack=pack)
    fwd = stack_forward(kernels, params, X3, h0s, act, pack=pack)
    HD = params.num_directions * params.hidden_size

    if params.bidirectional and pack is None and output == "sequence":
        return _bidirectional_sequence_loss(kernels, params, fwd, Y, loss, wins)

    # output layer and loss: one GEMM over all loss steps (or the last one)
    Tl = T - loss_from
    loss_pos = None if pack is None or not loss_from else pack.idx[pack.idx >= loss_from * B]
    if output == "last":
        H_out = fwd.last_output() if last_rows is None else fwd.last_output()[last_rows]
    elif pack is None:
        H_out = fwd.out[1 + loss_from:].reshape(Tl * B, HD)
    else:
        H_out = fwd.output_rows()
        if loss_pos is not None:
            H_out = H_out[pack.idx >= loss_from * B]
    O_logits = head_logits(params, H_out, kernels)
    value, dO = LOSS_FUNCS[loss](O_logits.reshape(Y.shape + (O,)) if loss == "ce" else
                                 O_logits.reshape(Y.shape), Y)
    dO = dO.reshape(-1, O)
    dW_hy = pmatmul(dO, H_out, trans_a=True, kernels=kernels)
    db_y = column_sums(dO)

    # dOut[t] = ∂L/∂output_t, the direct term from the head (zero where no loss)
    if params.bidirectional and pack is None and last_rows is None:
        dOut = _bidirectional_head_grads(params, dO, output, T, B, kernels)
        layer_grads, _, _ = stack_backward(fwd, dOut, wins=wins)
        return value, pack_grads(params, layer_grads, (dW_hy, db_y)), fwd
    dOut = scratch("dOut", (T, B, HD), params.dtype)
    if output == "sequence" and pack is None:
        dOut[:loss_from] = 0
        pmatmul(dO, params.W_hy, out=dOut[loss_from:].reshape(Tl * B, HD), kernels=kernels)
    elif output == "sequence":
        dOut[:loss_from] = 0
        dOut.reshape(T * B, HD)[pack.idx if loss_pos is None else loss_pos] = pmatmul(dO, params.W_hy,
                                                                                     kernels=kernels)
    elif not params.bidirectional and pack is None and last_rows is None:
        dOut[:T - 1] = 0
        matmul(dO, params.W_hy, out=dOut[T - 1])
    else:   # each row's last step: [h_T^fwd ; h_1^bwd] are output[len-1, :H] and output[0, H:]
        dOut[:] = 0
        dlast = matmul(dO, params.W_hy)
        H = params.hidden_size
        rows = np.arange(B) if last_rows is None else last_rows
        last = (T - 1) * B + rows if pack is None else pack.last[rows]
        dOut.reshape(T * B, HD)[last, :H] = dlast[:, :H]
        if params.bidirectional:
            dOut[0, rows, H:] = dlast[:, H:]

    layer_grads, _, _ = stack_backward(fwd, dOut, wins=wins)
    return value, pack_grads(params, layer_grads, (dW_hy, db_y)), fwd


def _bidirectional_sequence_loss(kernels, params, fwd, Y, loss, wins):
    """:func:`loss_and_grad`'s head and backward for a full-length bidirectional stack with a loss at
    every step, straight from each direction's states: o_t = W_hy[:, :H]·h_t^fwd + W_hy[:, H:]·h_t^rev
    + b_y, the reverse term reversed on the (T, B, O) logits, not on the (T, B, H) states."""
    H, O = params.hidden_size, params.output_size
    Hf, Hr = (Hs[1:].reshape(-1, H) for Hs in fwd.Hs[-2:])
    T, B = fwd.Hs[-1].shape[0] - 1, fwd.Hs[-1].shape[1]
    W_f, W_r = np.ascontiguousarray(params.W_hy[:, :H]), np.ascontiguousarray(params.W_hy[:, H:])
    O_logits = pmatmul(Hf, W_f, trans_b=True, kernels=kernels).reshape(T, B, O)
    O_logits += pmatmul(Hr, W_r, trans_b=True, kernels=kernels).reshape(T, B, O)[::-1]
    O_logits += params.b_y
    value, dO = LOSS_FUNCS[loss](O_logits if loss == "ce" else O_logits.reshape(Y.shape), Y)
    dO = dO.reshape(T * B, O)
    dO_rev = np.ascontiguousarray(dO.reshape(T, B, O)[::-1]).reshape(T * B, O)
    dW_hy = np.empty_like(params.W_hy)
    dW_hy[:, :H] = pmatmul(dO, Hf, trans_a=True, kernels=kernels)
    dW_hy[:, H:] = pmatmul(dO_rev, Hr, trans_a=True, kernels=kernels)
    db_y = column_sums(dO)
    G_f, G_r = scratch("dOut.f", (T, B, H), params.dtype), scratch("dOut.r", (T, B, H), params.dtype)
    pmatmul(dO, W_f, out=G_f.reshape(T * B, H), kernels=kernels)
    pmatmul(dO_rev, W_r, out=G_r.reshape(T * B, H), kernels=kernels)
    layer_grads, _, _ = stack_backward(fwd, (G_f, G_r), wins=wins)
    return value, pack_grads(params, layer_grads, (dW_hy, db_y)), fwd


def _bidirectional_head_grads(params, dO, output, T, B, kernels):
    """The head's gradient per direction of a full-length bidirectional stack, each in its step
    order (the reverse one's reversed): ``(G_fwd, G_rev)`` (T, B, H) work arrays."""
    H, O = params.hidden_size, params.output_size
    G_f, G_r = scratch("dOut.f", (T, B, H), params.dtype), scratch("dOut.r", (T, B, H), params.dtype)
    if output == "sequence":
        pmatmul(dO, params.W_hy[:, :H], out=G_f.reshape(T * B, H), kernels=kernels)
        dO_rev = np.ascontiguousarray(dO.reshape(T, B, O)[::-1]).reshape(T * B, O)
        pmatmul(dO_rev, params.W_hy[:, H:], out=G_r.reshape(T * B, H), kernels=kernels)
    else:               # [h_T^fwd ; h_1^bwd]: each direction's last step
        G_f[:T - 1] = 0
        G_r[:T - 1] = 0
        matmul(dO, params.W_hy[:, :H], out=G_f[T - 1])
        matmul(dO, params.W_hy[:, H:], out=G_r[T - 1])
    return G_f, G_r


def hidden_grad_norms(kernels, params, X3, Y, h0s, loss, output, act):
    """‖∂L/∂h_t‖ for t = 0..T under full BPTT, one unidirectional layer: (T+1,) float64.

    ``X3`` (T, B, D), ``Y`` checked time-major, ``h0s`` (1, B, H) or None. The
    backend's own backward loop (full BPTT) gives dz_t; the gradient reaching
    h_t is then δ_t = G[t] + W_hhᵀ dz_{t+1}, one GEMM for all t.
    """
    T, B, _ = X3.shape
    H = params.hidden_size
    if h0s is None:
        h0s = np.zeros((1, B, H), dtype=params.dtype)
    fwd = stack_forward(kernels, params, X3, h0s, act, fresh=True)
    Hs = fwd.out
    G = np.zeros((T, B, H), dtype=params.dtype)
    if output == "sequence":
        _, dO = LOSS_FUNCS[loss](head_logits(params, Hs[1:], kernels), Y)
        G[:] = (dO.reshape(T * B, -1) @ params.W_hy).reshape(T, B, H)
    else:
        _, dO = LOSS_FUNCS[loss](head_logits(params, Hs[T], kernels), Y)
        G[T - 1] = dO @ params.W_hy
    dZ = np.empty((T, B, H), dtype=params.dtype)
    ends, bp_starts = windows(T, None)
    kernels.backward_accumulate(G, Hs, np.ascontiguousarray(params.W_hh), ends, bp_starts, act, dZ)
    carried = (dZ.reshape(T * B, H) @ params.W_hh).reshape(T, B, H)   # W_hhᵀ dz_t = part of δ_{t-1}
    delta = G.astype(np.float64)                              # delta[t] = ∂L/∂h_{t+1} (0-based step t)
    delta[:-1] += carried[1:]
    norms = np.empty(T + 1, dtype=np.float64)
    norms[1:] = np.sqrt(np.einsum("tbh,tbh->t", delta, delta))
    norms[0] = np.linalg.norm(carried[0].astype(np.float64))  # ∂L/∂h_0
    return norms
