"""The online TBPTT step: one mini-batch, an optimizer step at every update point.

One implementation shared by every trainer (the estimator, the Dask trainer,
and any adapter that trains with fastbptt's optimizers), so that they all take
the same steps. It is cut in two at every update point:

* :func:`point_grad` -- the gradient side: the forward from the stored state,
  :func:`fastbptt.engine.model.loss_and_grad`, and the states it reached stored
  for later windows (:class:`Carry`). It reads the parameters and changes
  nothing else: a data-parallel trainer runs it on each worker's rows.
* :func:`apply_step` -- the optimizer side: the finiteness checks, clipping,
  the learning rate of a schedule and the (atomic) optimizer step.

:func:`train_batch` is the two in turn on one machine.
"""

import functools
import math

import numpy as np

from .._threads import call_scope
from .._validation import _all_finite
from ..clip import clip_grad_norm, clip_grad_value
from ..optim import _GradientNotFinite, _compiled
from .core import is_artbp, windows
from .lengths import packing
from .model import loss_and_grad
from .stack import stack_forward


def batch_truncation(truncation, rng):
    """The truncation of one mini-batch: ARTBP's ``("artbp", c, None)`` gets a seed drawn from
    ``rng`` (the model's generator: a fit is reproducible from its seed and resumes exactly after
    save/load); any other truncation is returned as it is, and nothing is drawn."""
    if not is_artbp(truncation):
        return truncation
    return ("artbp", truncation[1], int(rng.integers(0, 2**63 - 1)))


def compensation(truncation):
    """ARTBP's factor 1/(1-c) on the gradient crossing an uncut step boundary; None otherwise."""
    return 1.0 / (1.0 - truncation[1]) if is_artbp(truncation) else None


def update_points(T, truncation):
    """``((seg_start, loss_start, end), ...)``: forward/backprop over [seg_start, end), loss on
    [loss_start, end) (0-based steps); the windows of :func:`fastbptt.engine.core.windows`.
    With ARTBP (a seeded ``("artbp", c, seed)``, see :func:`batch_truncation`) the update
    points are its random cuts: each window is its own step."""
    if is_artbp(truncation):
        return _points(*windows(T, truncation)[:2])
    return _fixed_update_points(T, truncation)


@functools.lru_cache(maxsize=64)
def _fixed_update_points(T, truncation):
    # remembered per (T, truncation): a trainer asks for the same ones at every mini-batch
    return _points(*windows(T, truncation))


def _points(ends, bp_starts):
    loss_starts = [0, *ends[:-1]]
    return tuple((int(s), int(ls), int(t)) for s, ls, t in zip(bp_starts, loss_starts, ends))


def has_step(point, T, output, lengths=None):
    """Whether the update point ``(s, tp, t)`` has a loss (and so an optimizer step): with
    ``output="last"`` only the one at T has (with ``lengths``: those holding a row's last step)."""
    if lengths is not None:
        return point_weight(point, len(lengths), output, lengths) > 0
    return output == "sequence" or point[2] == T


def point_weight(point, b, output, lengths=None):
    """The number of loss terms (steps x rows) of an update point over ``b`` rows: the weight of
    its mean loss in the epoch's running loss, and (by rows) of a part of a split batch.
    With ``lengths`` (b,): the valid steps since the previous point, or the rows ending there."""
    _, tp, t = point
    if lengths is None:
        return (t - tp) * b if output == "sequence" else b
    if output == "sequence":
        return int(np.sum(np.clip(np.minimum(lengths, t) - tp, 0, None)))
    return int(np.sum((lengths > tp) & (lengths <= t)))


class Carry:
    """The hidden states of one mini-batch's rows across its update points.

    ``h0s`` (L·dirs, b, H) is the state at step 0. With one update point
    nothing is stored; with several, every layer's state at every step
    (``(k1, k2)`` re-runs a window from the state stored at its start).
    """

    __slots__ = ("h0s", "store", "h_T", "lengths")

    def __init__(self, h0s, T, n_points, lengths=None):
        self.h0s, self.h_T, self.lengths = h0s, None, lengths
        if n_points == 1:
            self.store = None
        else:
            self.store = np.empty((T + 1,) + h0s.shape, dtype=h0s.dtype)
            self.store[0] = h0s

    def at(self, s, rows=None):
        """The state at step ``s`` (0 when there is one update point), of the first ``rows`` rows."""
        h = self.h0s if self.store is None else self.store[s]
        return h if rows is None else np.ascontiguousarray(h[:, :rows])

    def keep(self, tp, t, fwd, offset, rows=None):
        """Store the states the forward ``fwd`` reached at steps ``tp+1..t`` (its steps ``offset+1..``),
        of its first ``rows`` rows (all if None; padded steps take whatever the forward left there)."""
        if self.store is None:
            self.h_T = fwd.h_n
        else:
            for i, Hs in enumerate(fwd.Hs):
                self.store[tp + 1:t + 1, i, :rows] = Hs[offset + 1:]

    def final(self, T):
        """The state at step T (with ``lengths``: each row's at its own last step), (L·dirs, b, H), new."""
        if self.store is None:
            return self.h_T
        if self.lengths is None:
            return self.store[T].copy()
        return self.store[self.lengths, :, np.arange(len(self.lengths))].transpose(1, 0, 2).copy()


def point_grad(kernels, params, Xb, Yb, carry, point, *, loss, output, act, compensation=None):
    """The gradient side of one update point ``(s, tp, t)`` of the mini-batch ``Xb`` (T, b, D).

    ``compensation``: ARTBP's 1/(1-c) (:func:`compensation`): the gradient is
    multiplied by it at every step boundary it crosses inside the window.

    Returns ``(value, grads)``: the mean loss over the point's loss terms and its
    gradient (an :class:`RNNParams`); or None for a point without a loss
    (``output="last"`` before T: the state is carried, no step). The states
    reached are kept in ``carry``. Reads ``params``, changes nothing else.
    A variable-length batch (``carry.lengths``) has its rows sorted by length,
    longest first: see :func:`_ragged_point_grad`.
    """
    if carry.lengths is not None:
        return _ragged_point_grad(kernels, params, Xb, Yb, carry, point, loss=loss, output=output, act=act,
                                  compensation=compensation)
    s, tp, t = point
    T = Xb.shape[0]
    seq = output == "sequence"
    if not has_step(point, T, output):
        fwd = stack_forward(kernels, params, Xb[tp:t], carry.at(tp), act)
        carry.keep(tp, t, fwd, 0)
        return None
    one_window = _one_window(t - s, compensation)
    value, grads, fwd = loss_and_grad(kernels, params, Xb[s:t], Yb[tp:t] if seq else Yb, carry.at(s), loss, output,
                                      act, one_window, loss_from=(tp - s) if seq else 0)
    carry.keep(tp, t, fwd, tp - s)
    return value, grads


def _one_window(n, compensation):
    """The windows of :func:`fastbptt.engine.core.windows` for one window of ``n`` steps."""
    win = (np.array([n], dtype=np.int64), np.zeros(1, dtype=np.int64))
    return win if compensation is None else win + (compensation,)


def _ragged_point_grad(kernels, params, Xb, Yb, carry, point, *, loss, output, act, compensation=None):
    """:func:`point_grad` of a variable-length batch: the update point runs on the rows still
    active (a prefix: the rows are sorted longest first), each within its own length."""
    s, tp, t = point
    seq = output == "sequence"
    lens = carry.lengths
    if not has_step(point, Xb.shape[0], output, lens):     # carry the active rows' states, no step
        r = int(np.sum(lens > tp))
        if r:
            fwd = stack_forward(kernels, params, np.ascontiguousarray(Xb[tp:t, :r]), carry.at(tp, r), act,
                                pack=packing(np.minimum(lens[:r], t) - tp, t - tp))
            carry.keep(tp, t, fwd, 0, r)
        return None
    r = int(np.sum(lens > s))
    pack = packing(np.minimum(lens[:r], t) - s, t - s)
    lf = tp - s
    last_rows = None
    if seq:
        Y = np.ascontiguousarray(Yb[s:t, :r])
        if pack is None:
            Y = Y[lf:]
        else:               # the valid positions from the loss start on, in the packing's order
            Y = Y.reshape((-1,) + Y.shape[2:])[pack.idx[pack.idx >= lf * r]]
    else:
        rows = np.flatnonzero((lens[:r] > tp) & (lens[:r] <= t))
        last_rows = None if len(rows) == r else rows
        Y = Yb[rows]
    one_window = _one_window(t - s, compensation)
    value, grads, fwd = loss_and_grad(kernels, params, np.ascontiguousarray(Xb[s:t, :r]), Y, carry.at(s, r), loss,
                                      output, act, one_window, loss_from=lf if seq else 0, pack=pack,
                                      last_rows=last_rows)
    carry.keep(tp, t, fwd, lf, r)
    return value, grads


def apply_step(params, optimizer, value, grads, *, clip_norm, lr_at, where, clip_value=None, owner="RNN.fit",
               flat=None):
    """The optimizer side of one update point: check, clip, set the scheduled lr, step.

    Raises ``FloatingPointError`` naming ``owner`` and ``where`` (e.g. "epoch 2,
    update step 5 of the epoch (...)") when the loss, a gradient or the update
    is not finite; ``params`` are then unchanged. The step itself is all or
    nothing (see :mod:`fastbptt.optim`). ``grads`` may be changed in place
    (clipping: the norm to ``clip_norm``, then each entry to ``clip_value``).
    ``flat``: the 1-D array whose consecutive slices ``grads``' arrays are, if the
    caller made them so (:class:`fastbptt.Step`): the checks, the clamp and the
    optimizer's rule then each take one compiled pass over it.
    """
    if not math.isfinite(value):
        raise FloatingPointError(f"{owner}: the loss is {value} at {where}; training diverged. The "
                                 "parameters are those of the last good step. Try a lower lr or clip_norm=...")
    if (flat is not None and clip_norm is None and lr_at is None
            and one_pass_step(params, optimizer, grads, flat, clip_value)):
        return              # (when it refuses, nothing changed: the steps below say why)
    fast = None if flat is None else _compiled()
    clamped = fast is not None and clip_norm is None and clip_value is not None     # (norm first, else)
    if fast is not None:
        bad = fast.check_clamp(flat, clip_value if clamped else 0)
    for name, g in grads.items() if fast is None or bad >= 0 else ():
        if not _all_finite(g):
            raise FloatingPointError(f"{owner}: non-finite gradient of {name} at {where}; training "
                                     "diverged. The parameters are those of the last good step. Try a "
                                     "lower lr or clip_norm=...")
    if clip_norm is not None:
        clip_grad_norm(grads, clip_norm)
    if clip_value is not None and not clamped:
        if fast is None:
            clip_grad_value(grads, clip_value)
        else:
            fast.clamp(flat, clip_value)
    if lr_at is not None:
        optimizer.lr = lr_at(optimizer.step_count)
    try:
        if fast is None:
            optimizer.step(params, grads)
        else:
            with call_scope():
                optimizer._step(params, grads, flat_g=flat)
    except FloatingPointError as exc:
        raise FloatingPointError(f"{owner}: at {where}: {exc}") from None


def one_pass_step(params, optimizer, grads, flat, clip_value):
    """:func:`apply_step` without ``clip_norm`` or a schedule, for gradients that are views of
    ``flat``, in one compiled pass (the optimizer's rule checks the gradients and clamps them into
    ``[-clip_value, clip_value]`` as it reads them). Returns whether it stepped: False when the
    optimizer's rule is not a compiled one, or when a gradient or the update is not finite
    (nothing changed: ``apply_step`` then says which)."""
    if not optimizer._checks_gradients():
        return False
    try:
        with call_scope():
            optimizer._step(params, grads, flat_g=flat, check=0.0 if clip_value is None else clip_value)
    except (_GradientNotFinite, FloatingPointError):
        return False
    return True


def step_where(epoch, step, point):
    """Where an update happens, for messages."""
    return f"epoch {epoch}, update step {step} of the epoch (steps {point[1] + 1}..{point[2]} of a mini-batch)"


def train_batch(kernels, params, optimizer, Xb, Yb, h0s, *, loss, output, act, truncation, clip_norm,
                epoch, counter, points=None, lr_at=None, after_step=None, lengths=None):
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

    ``truncation`` ARTBP's must carry the mini-batch's seed (:func:`batch_truncation`).
    ``points`` are :func:`update_points` (computed here if None: a trainer
    passes them to check them before it changes anything, and to compute them
    once). ``lr_at(step_count)``, if given, is the learning rate to set before
    each optimizer step (a schedule); ``after_step(loss_sum, weight)`` is called
    after each step, once every array this function reads is saved (it may run
    other calls, e.g. a validation pass, on this thread's work arrays).

    ``lengths`` (b,) ints: a variable-length batch (padding never read). The
    update points stay on the absolute time axis; each runs on the rows still
    active, its loss is the mean over the valid steps since the previous update
    point (``output="last"``: over the rows ending there), and an update point
    without a loss carries the state without a step. ``h_T`` holds each row's
    state at its own last step.

    Raises ``FloatingPointError`` naming ``epoch`` and the step when the loss, a
    gradient or an update is not finite; the parameters are then those of the
    last good step.

    Interrupts: each optimizer step is all or nothing (see
    :mod:`fastbptt.optim`), and nothing else here outlives the call, so an
    exception at any point leaves ``params`` and ``optimizer`` at the last
    completed update point.
    """
    T, b, _ = Xb.shape
    if points is None:
        points = update_points(T, truncation)
    comp = compensation(truncation)
    order = None
    if lengths is not None:     # rows sorted longest first: each update point runs on a prefix
        order = np.argsort(-np.asarray(lengths), kind="stable")
        lengths = np.asarray(lengths, dtype=np.int64)[order]
        Xb, h0s = Xb[:, order], np.ascontiguousarray(h0s[:, order])
        Yb = Yb[:, order] if output == "sequence" else Yb[order]
    carry = Carry(h0s, T, len(points), lengths)
    loss_sum, weight = 0.0, 0
    for point in points:
        got = point_grad(kernels, params, Xb, Yb, carry, point, loss=loss, output=output, act=act,
                         compensation=comp)
        if got is None:
            continue
        value, grads = got
        counter[0] += 1
        apply_step(params, optimizer, value, grads, clip_norm=clip_norm, lr_at=lr_at,
                   where=step_where(epoch, counter[0], point))
        w = point_weight(point, b, output, lengths)
        loss_sum += value * w
        weight += w
        if after_step is not None:
            after_step(loss_sum, weight)
    h_T = carry.final(T)
    if order is not None:
        h_T[:, order] = h_T.copy()
    return h_T, loss_sum, weight
