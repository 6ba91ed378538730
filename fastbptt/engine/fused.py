"""One unidirectional layer's whole loss and gradient in one compiled call.

A backend with ``layer_loss_and_grad`` (the Cython one) runs the input
projection, the recurrence, the head, the loss, the backward loop and the
weight gradients of one layer with its head in one call without the GIL.
It removes the dozen NumPy calls around the two kernels (at short chunks and
small batches they cost more than the arithmetic), and on a team of threads
it splits every GEMM phase by rows. Every path of the engine that
computes that model -- the plans of ``loss_and_grad`` and ``Step``, the
estimator's update points, checkpointed BPTT in one segment -- asks
:func:`applies` and takes it under the same rule, so that they stay
bit-identical to one another.
"""

import numpy as np

from .._threads import team_size
from .checkpoint import block_steps
from .core import scratch     # (core imports engine.blas: the compiled GEMMs run on NumPy's cblas)
from .losses import LOSS_CODES
from .stack import StackForward, pack_grads


def applies(kernels, params, T, B, wins):
    """Whether a call of this model and shape takes the fused call: one unidirectional layer with
    a head, windows without ARTBP's compensation, and full BPTT within one GEMM block."""
    if (getattr(kernels, "layer_loss_and_grad", None) is None or params.num_layers != 1
            or params.bidirectional or not params.has_head or len(wins) != 2):
        return False
    ends, bp_starts = wins
    # full BPTT over several blocks: engine.checkpoint's blocked GEMMs (bit for bit as checkpointed)
    return not (ends.shape[0] == 1 and bp_starts[0] == 0 and T > block_steps(B))


def threads(kernels, params, T, B):
    """``(kernels', GEMMs')`` team sizes of a call (as :func:`fastbptt.engine.core.recurrence` and
    :func:`~fastbptt.engine.core.pmatmul` decide them)."""
    D, H, O = params.input_size, params.hidden_size, params.output_size
    return (team_size(2 * T * B * H * H, c_team=kernels.TEAM),
            team_size(2 * T * B * H * (D + H + O), c_team=kernels.TEAM))


def work_arrays(T, B, H, O, output, dtype, new=False):
    """The call's work arrays (this thread's reusable ones, or new ones with ``new``)."""
    n_out = T * B if output == "sequence" else B
    shapes = (("A", (T, B, H)), ("W_hhT", (H, H)), ("Hs", (T + 1, B, H)), ("logits", (n_out, O)),
              ("dOut", (T, B, H)), ("dZ", (T, B, H)), ("carried", (B, H)), ("dz", (2 * B, H)),
              ("ones", (T * B,)))
    make = (lambda name, shape, dt: np.empty(shape, dt)) if new else (lambda name, shape, dt: scratch(
        "fused." + name, shape, dt))
    return tuple(make(name, shape, dtype) for name, shape in shapes)


def run(kernels, params, X3, Y, h0s, loss, output, act, wins, grads, work, teams):
    """The loss; ``grads`` (five arrays in ``params.names()`` order) are overwritten, and ``work[2]``
    (``Hs``, (T+1, B, H)) holds the states. ``X3``, ``Y`` (``ce``: any integer dtype), ``h0s`` as
    :func:`fastbptt.engine.model.loss_and_grad` takes them."""
    layer = params.layers[0]
    Y = np.ascontiguousarray(Y, np.int64 if loss == "ce" else None)
    weights = tuple(map(np.ascontiguousarray, (layer.W_xh, layer.W_hh, layer.b_h, params.W_hy, params.b_y)))
    X3, h0 = np.ascontiguousarray(X3), np.ascontiguousarray(h0s[0])
    return kernels.layer_loss_and_grad(X3, Y, h0, weights, grads, work, wins[0], wins[1], LOSS_CODES[loss],
                                       output == "sequence", act, *teams)


def loss_and_grad(kernels, params, X3, Y, h0s, loss, output, act, wins):
    """:func:`fastbptt.engine.model.loss_and_grad` where :func:`applies`: ``(loss, grads, fwd)``,
    ``grads`` new, ``fwd`` in this thread's work arrays."""
    T, B, _ = X3.shape
    work = work_arrays(T, B, params.hidden_size, params.output_size, output, params.dtype)
    grads = [np.empty(a.shape, a.dtype) for a in params.arrays()]
    value = run(kernels, params, X3, Y, h0s, loss, output, act, wins, grads, work,
                threads(kernels, params, T, B))
    fwd = StackForward(params, kernels, act)
    fwd.Hs = [work[2]]
    fwd._out = work[2]
    return value, pack_grads(params, [grads[:3]], grads[3:]), fwd
