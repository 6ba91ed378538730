"""The online TBPTT step: one mini-batch, an optimizer step at every update point.

One function shared by every trainer (the estimator, and any adapter that
trains with fastbptt's optimizers), so that they all take the same steps.
"""

import functools
import math

import numpy as np

from ..clip import clip_grad_norm
from .core import windows
from .model import loss_and_grad
from .stack import stack_forward


@functools.lru_cache(maxsize=64)
def update_points(T, truncation):
    """``((seg_start, loss_start, end), ...)``: forward/backprop over [seg_start, end), loss on
    [loss_start, end) (0-based steps); the windows of :func:`fastbptt.engine.core.windows`.
    Remembered per (T, truncation): a trainer asks for the same ones at every mini-batch."""
    ends, bp_starts = windows(T, truncation)
    loss_starts = [0, *ends[:-1]]
    return tuple((int(s), int(ls), int(t)) for s, ls, t in zip(bp_starts, loss_starts, ends))


def train_batch(kernels, params, optimizer, Xb, Yb, h0s, *, loss, output, act, truncation, clip_norm,
                epoch, counter, points=None, lr_at=None, after_step=None):
    """Train one time-major mini-batch in place; returns ``(h_T, loss_sum, weight)``.

    ``Xb`` (T, b, D), ``Yb`` time-major targets and ``h0s`` (L·dirs, b, H) are
    validated. With a truncation, each update point is its own step: the
    forward of a segment starts from the state carried from the previous one
    (computed with the parameters of that time; with ``(k1, k2)`` re-run
    through the last k2 steps from the stored state), its loss is the mean over
    the steps since the previous update point, and the gradient stays within
    the segment. With ``output="last"`` only the update point at T has a loss;
    the earlier ones carry the state without a step. ``counter[0]`` counts the
    steps of the epoch (for messages). ``h_T`` is (L·dirs, b, H), new.

    ``points`` are :func:`update_points` (computed here if None: a trainer
    passes them to check them before it changes anything, and to compute them
    once). ``lr_at(step_count)``, if given, is the learning rate to set before
    each optimizer step (a schedule); ``after_step(loss_sum, weight)`` is called
    after each step, once every array this function reads is saved (it may run
    other calls, e.g. a validation pass, on this thread's work arrays).

    Raises ``FloatingPointError`` naming ``epoch`` and the step when the loss, a
    gradient or an update is not finite; the parameters are then those of the
    last good step.

    Interrupts: each optimizer step is all or nothing (see
    :mod:`fastbptt.optim`), and nothing else here outlives the call, so an
    exception at any point leaves ``params`` and ``optimizer`` at the last
    completed update point.
    """
    T, b, _ = Xb.shape
    seq = output == "sequence"
    if points is None:
        points = update_points(T, truncation)
    one_window = (np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))
    if len(points) == 1:
        Hstore = None
    else:
        Hstore = np.empty((T + 1,) + h0s.shape, dtype=params.dtype)    # every layer's state at every step
        Hstore[0] = h0s
    loss_sum, weight, h_T = 0.0, 0, None
    for s, tp, t in points:
        if not seq and t < T:
            # no loss before T with output="last": carry the state, no step
            fwd = stack_forward(kernels, params, Xb[tp:t], Hstore[tp], act)
            _store(Hstore, tp, t, fwd, 0)
            continue
        h0 = h0s if Hstore is None else Hstore[s]
        one_window[0][0] = t - s
        value, grads, fwd = loss_and_grad(kernels, params, Xb[s:t], Yb[tp:t] if seq else Yb, h0, loss, output,
                                          act, one_window, loss_from=(tp - s) if seq else 0)
        counter[0] += 1
        where = f"epoch {epoch}, update step {counter[0]} of the epoch (steps {tp + 1}..{t} of a mini-batch)"
        if not math.isfinite(value):
            raise FloatingPointError(f"RNN.fit: the loss is {value} at {where}; training diverged. The "
                                     "parameters are those of the last good step. Try a lower lr or clip_norm=...")
        for name, g in grads.items():
            if not np.all(np.isfinite(g)):
                raise FloatingPointError(f"RNN.fit: non-finite gradient of {name} at {where}; training "
                                         "diverged. The parameters are those of the last good step. Try a "
                                         "lower lr or clip_norm=...")
        if clip_norm is not None:
            clip_grad_norm(grads, clip_norm)
        if lr_at is not None:
            optimizer.lr = lr_at(optimizer.step_count)
        try:
            optimizer.step(params, grads)
        except FloatingPointError as exc:
            raise FloatingPointError(f"RNN.fit: at {where}: {exc}") from None
        w = (t - tp) * b if seq else b
        loss_sum += value * w
        weight += w
        if Hstore is None:
            h_T = fwd.h_n
        else:
            _store(Hstore, tp, t, fwd, tp - s)
        if after_step is not None:
            after_step(loss_sum, weight)
    return (h_T if Hstore is None else Hstore[T].copy()), loss_sum, weight


def _store(Hstore, tp, t, fwd, offset):
    """``Hstore[tp+1 : t+1] = `` the states the forward reached (from its step ``offset + 1``)."""
    for i, Hs in enumerate(fwd.Hs):
        Hstore[tp + 1:t + 1, i] = Hs[offset + 1:]
