"""A training step prepared once and called per batch or chunk: :class:`Step`.

A hand-written loop -- min-char-rnn's, an online-TBPTT stream's -- calls the
same small computation thousands of times. :func:`fastbptt.loss_and_grad`
checks every argument and derives shapes, windows and work arrays at every
call; a :class:`Step` checks the model and the options once, plans each new
input shape once, and at a call only checks that the arrays have that shape
and dtype. With an optimizer it also clips and updates the parameters in the
same call, on the same thread settings, as :class:`fastbptt.RNN` does.
"""

import math
from time import perf_counter

import numpy as np

from . import _validation as V
from .backends import dispatch_at, resolve_backend
from .engine.core import ACT_CODES
from .engine.losses import LOSSES
from .engine.plan import make_plan
from .engine.training import apply_step, one_pass_step
from .functional import _check_params, loss_and_grad as _checked_loss_and_grad
from .optim import Optimizer
from .params import RNNParams
from ._threads import call_scope, team_size

__all__ = ["Step"]


class Step:
    """``loss_and_grad`` -- and optionally an optimizer update -- prepared for repeated calls.

    Parameters
    ----------
    params : RNNParams
        With a head. The step keeps a reference: an update writes these arrays in place.
    loss, output, activation, truncation, backend
        As :func:`fastbptt.loss_and_grad` (``truncation`` applies within each call's
        chunk; ARTBP is not taken: use ``loss_and_grad`` for it).
    optimizer : fastbptt.optim.Optimizer, optional
        Needed to call the step (an update); :meth:`loss_and_grad` works without.
    clip_norm, clip_value : float > 0, optional
        Before the update, scale the gradients to this global 2-norm
        (:func:`fastbptt.clip_grad_norm`), then clamp them into
        ``[-clip_value, clip_value]`` (:func:`fastbptt.clip_grad_value`).

    Notes
    -----
    At each call ``X``, ``Y`` and ``h0`` must have the same shapes as at an earlier
    call to be fast (any shape works; a new one is checked fully and planned once),
    ``X`` and ``h0`` C-contiguous arrays of the parameters' dtype. Their values are
    not checked for NaN or inf at every call; an update refuses a non-finite loss or
    gradient (``FloatingPointError``, parameters unchanged). The results are
    bit-identical to :func:`fastbptt.loss_and_grad`'s and to :class:`fastbptt.RNN`'s
    steps on the same data at the same thread count. A step is not thread-safe:
    make one per thread.

    Examples
    --------
    min-char-rnn's loop (one sequence, one-hot inputs, class-id targets)::

        step = fastbptt.Step(params, loss="ce", optimizer=fastbptt.optim.Adagrad(lr=0.1),
                             clip_value=5.0)
        h = np.zeros(H, np.float32)
        for X, Y in chunks:                  # X (25, vocab) float32, Y (25,) ints
            loss, h = step(X, Y, h)
    """

    def __init__(self, params, *, loss="mse", output="sequence", activation="tanh", truncation=None,
                 backend="auto", optimizer=None, clip_norm=None, clip_value=None):
        self.params = _check_params(params, head=True)
        V.check_params_finite(params)
        self.loss = V.check_choice("loss", loss, LOSSES)
        self.output = V.check_choice("output", output, V.OUTPUTS)
        self.activation = V.check_choice("activation", activation, V.ACTIVATIONS)
        self.truncation = V.check_truncation(truncation, params.bidirectional)
        if backend != "auto":
            resolve_backend(backend)            # a bad or missing backend fails here, not at the first call
        elif not isinstance(backend, str):
            raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
        self.backend = backend
        if optimizer is not None and not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer: expected a fastbptt.optim.Optimizer or None, got "
                            f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        self.clip_norm = V.check_positive("clip_norm", clip_norm, allow_none=True)
        self.clip_value = V.check_positive("clip_value", clip_value, allow_none=True)
        self._act = ACT_CODES[activation]
        self._shapes = {}           # X.shape -> _Seen, for the shapes that passed the checks
        self._grads = None          # the gradients (RNNParams), reused from call to call: views of
        self._flat = None           # this one array (one pass checks, clamps and updates them all)
        self._grad_list = None      # and as a list, in canonical order
        self._calls = 0

    def __repr__(self):
        return (f"Step(loss={self.loss!r}, output={self.output!r}, activation={self.activation!r}, "
                f"truncation={self.truncation!r}, backend={self.backend!r}, optimizer={self.optimizer!r}, "
                f"clip_norm={self.clip_norm!r}, clip_value={self.clip_value!r})")

    def loss_and_grad(self, X, Y, h0=None):
        """``(loss, grads, h_last)`` as :func:`fastbptt.loss_and_grad` gives them.

        ``grads`` is the step's own :class:`RNNParams`, overwritten by its next call
        (copy it to keep it); ``loss`` and ``h_last`` are new.
        """
        got = self._fast_arrays(X, Y, h0)
        if got is not None:
            choice = self._dispatch(got)
            try:
                with call_scope(threads=choice.threads):
                    return self._run(choice, *got)
            except _BadIds:
                pass
        return self._checked(X, Y, h0)

    def __call__(self, X, Y, h0=None):
        """One update: the gradient of this chunk's loss, clipped, then the optimizer's step.

        Returns ``(loss, h_last)``: the loss before the update and the final state
        (to pass as the next chunk's ``h0``). Raises ``FloatingPointError`` when the
        loss, a gradient or the update is not finite; the parameters are then unchanged.
        """
        if self.optimizer is None:
            raise ValueError("optimizer: a Step called for an update needs an optimizer, got None "
                             "(give Step(..., optimizer=...), or call step.loss_and_grad)")
        got = self._fast_arrays(X, Y, h0)
        if got is not None:
            choice = self._dispatch(got)
            try:
                with call_scope(threads=choice.threads):
                    value, grads, h_last = self._run(choice, *got)
                    self._update(value, grads)
                return value, h_last
            except _BadIds:
                pass
        value, grads, h_last = self._checked(X, Y, h0)
        with call_scope():
            self._update(value, grads)
        return value, h_last

    def _update(self, value, grads):
        self._calls += 1
        opt = self.optimizer
        if (self.clip_norm is None and grads is self._grads and math.isfinite(value)
                and one_pass_step(self.params, opt, grads, self._flat, self.clip_value)):
            return              # (apply_step's own path, without its per-call arguments)
        apply_step(self.params, opt, value, grads, clip_norm=self.clip_norm,
                   clip_value=self.clip_value, lr_at=None, where=f"call {self._calls}", owner="Step",
                   flat=self._flat if grads is self._grads else None)

    def _checked(self, X, Y, h0):
        """A call with a shape not seen yet (or arrays to convert): checked in full, then remembered."""
        value, grads, h_last = _checked_loss_and_grad(
            self.params, X, Y, h0=h0, loss=self.loss, output=self.output, activation=self.activation,
            truncation=self.truncation, backend=self.backend)
        self._remember(X)
        return value, grads, h_last

    def _dispatch(self, got):
        """The backend and team of a planned call (``"auto"`` shares what loss_and_grad learns)."""
        return dispatch_at(self.backend, got[0].where)

    def _run(self, choice, seen, X3, Y_, h0s):
        params = self.params
        key = (choice.kernels, team_size())
        plan = seen.plans.get(key)
        if plan is None:
            if len(seen.plans) >= 4:
                seen.plans.clear()
            plan = seen.plans[key] = make_plan(choice.kernels, params, seen.T, seen.B, self.loss, self.output,
                                               self._act, self.truncation)
        if Y_.dtype.kind in "iu" and not plan.fused and Y_.size and (
                Y_.view(Y_.dtype.str.replace("i", "u")).max() >= params.output_size):
            raise _BadIds      # (the fused call checks the ids itself) the full checks say what is wrong
        grads = self._grads
        if grads is None or grads.dtype != params.dtype:
            grads = self._new_grads()
        t0 = perf_counter()
        try:
            value, _, h_last = plan.run(params, X3, Y_, h0s, self._grad_list)
        except ValueError:          # the fused call's own check of the class ids (nothing written)
            if not seen.ids:
                raise
            raise _BadIds from None
        choice.record(perf_counter() - t0)
        h_last = h_last[0] if len(params.layers) == 1 else h_last
        return value, grads, (h_last[..., 0, :] if seen.single else h_last)

    def _new_grads(self):
        """The gradients' arrays: views of one flat array (one pass checks, clamps and updates them)."""
        params = self.params
        arrays = params.arrays()
        flat = np.empty(sum(a.size for a in arrays), params.dtype)
        ends = np.cumsum([a.size for a in arrays])
        views = [flat[e - a.size:e].reshape(a.shape) for a, e in zip(arrays, ends)]
        self._grads, self._flat, self._grad_list = RNNParams._trusted_like(params, views), flat, views
        return self._grads

    def _remember(self, X):
        """Remember the shape of an input that passed the full checks (the next call with it is fast)."""
        params = self.params
        arr = np.asarray(X)
        if len(self._shapes) >= 8:
            self._shapes.clear()
        self._shapes[arr.shape] = _Seen(params, arr.shape, self.loss, self.output)

    def _fast_arrays(self, X, Y, h0):
        """``(seen, X3, Y, h0s)`` when the arrays have a seen shape and dtype, else None (the class
        ids of ``ce`` are checked in :meth:`_run`, or by the fused call itself)."""
        if type(X) is not np.ndarray or type(Y) is not np.ndarray:
            return None
        seen = self._shapes.get(X.shape)
        if (seen is None or X.dtype != seen.dtype or not X.flags.c_contiguous or Y.shape != seen.y_shape
                or seen.dtype != self.params.dtype):           # (parameters of another dtype put in)
            return None
        if seen.ids:
            if Y.dtype.kind not in "iu":
                return None
        elif Y.dtype != seen.dtype or not Y.flags.c_contiguous:
            return None
        if h0 is None:
            h0s = seen.zeros
        elif (type(h0) is not np.ndarray or h0.shape != seen.state_shape or h0.dtype != seen.dtype
              or not h0.flags.c_contiguous):
            return None
        else:
            h0s = h0.reshape(seen.zeros.shape)
        return seen, X.reshape(seen.x_shape), Y.reshape(seen.y_lead), h0s


class _BadIds(Exception):
    """A class id out of range at a planned call: the call is checked in full (which says what is wrong)."""


class _Seen:
    """An input shape that passed the full checks: what a fast call with it needs."""

    __slots__ = ("dtype", "single", "T", "B", "x_shape", "y_shape", "y_lead", "ids", "state_shape", "zeros",
                 "where", "plans")

    def __init__(self, params, shape, loss, output):
        self.dtype = params.dtype
        self.single = single = len(shape) == 2
        T, B = shape[0], (1 if single else shape[1])
        self.T, self.B, self.x_shape = T, B, (T, B, shape[-1])
        self.ids = loss == "ce"
        O = params.output_size
        seq = output == "sequence"
        user = ((T,) if single else (T, B)) if seq else (() if single else (B,))
        self.y_shape = user if self.ids else user + (O,)
        self.y_lead = ((T, B) if seq else (B,)) + (() if self.ids else (O,))
        self.state_shape = V.state_shape(params, B, single)
        self.zeros = np.zeros((len(params.layers), B, params.hidden_size), params.dtype)
        self.where = ("loss_and_grad", T, B, shape[-1], params.hidden_size, params.num_layers,
                      params.num_directions, params.dtype, False)      # (as dispatch_at takes it)
        self.plans = {}         # (backend module, team size) -> Plan
