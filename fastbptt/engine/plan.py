"""A planned loss-and-gradient call: what depends on the shapes only, done once per shape.

A :class:`Plan` is made for one (structure, T, B, dtype, loss, output,
activation, windows, backend) and owns its work arrays; calling it runs the
same arithmetic as :func:`fastbptt.engine.model.loss_and_grad`, operation for
operation (so the results are bit-identical at the same thread count), without
re-deriving shapes, windows, work arrays or the backend. One unidirectional
layer without lengths -- the batch-1 / short-chunk case, where a call's
arithmetic is ~10-20 µs and everything else used to be most of it -- runs
one compiled call where the backend has it (:mod:`fastbptt.engine.fused`),
else a straight-line path; other structures run the engine's.

Not thread-safe: one plan per thread (:func:`plan_for`) or per owner.
"""

import threading

import numpy as np

from .._threads import team_size
from . import blas as _blas
from . import fused as _fused
from .checkpoint import block_steps
from .core import column_sums, pmatmul, windows
from .losses import LOSS_FUNCS
from .model import loss_and_grad as model_loss_and_grad


class Plan:
    """See the module docstring. ``run`` takes validated, C-contiguous arrays of the plan's dtype."""

    __slots__ = ("key", "kernels", "loss", "output", "act", "wins", "fast", "fused", "T", "B", "work", "teams",
                 "X1", "W1", "W_hhT", "A", "Hs", "dOut", "dZ", "dW1", "loss_fn", "threads", "small")

    def __init__(self, key, kernels, params, T, B, loss, output, act, wins):
        self.key, self.kernels = key, kernels
        self.loss, self.output, self.act, self.wins = loss, output, act, wins
        self.T, self.B = T, B
        self.loss_fn = LOSS_FUNCS[loss]
        # full BPTT over more than one block sums its GEMMs block by block (engine.checkpoint: bit for
        # bit as checkpointed BPTT): the engine's path then, one single GEMM here otherwise
        full = len(wins) == 2 and wins[0].shape[0] == 1 and wins[1][0] == 0
        self.fast = (params.num_layers == 1 and not params.bidirectional and len(wins) == 2
                     and (not full or T <= block_steps(B)))
        self.fused = self.fast and _fused.applies(kernels, params, T, B, wins)
        if not self.fast:
            return
        D, H, dt = params.input_size, params.hidden_size, params.dtype
        if self.fused:          # the whole call in one (see engine.fused)
            self.work = _fused.work_arrays(T, B, H, params.output_size, output, dt, new=True)
            self.teams = _fused.threads(kernels, params, T, B)
            return
        self.X1 = np.empty((T * B, D + 1), dt)
        self.X1[:, D] = 1
        self.W1 = np.empty((H, D + 1), dt)
        self.W_hhT = np.empty((H, H), dt)
        self.A = np.empty((T, B, H), dt)
        self.Hs = np.empty((T + 1, B, H), dt)
        self.dOut = np.zeros((T, B, H), dt)
        self.dZ = np.empty((T, B, H), dt)
        self.dW1 = np.empty((H, D + 1), dt)
        self.threads = team_size(2 * T * B * H * H, c_team=kernels.TEAM)     # as engine.core.recurrence
        c_team = kernels.TEAM and _blas.pgemm is not None                       # as engine.core.pmatmul
        O = params.output_size
        self.small = all(team_size(2 * T * B * n * H, c_team=c_team) == 1 for n in (D + 1, H, O))

    def run(self, params, X3, Y, h0s, grads=None):
        """``(loss, grads, h_last)``: ``grads`` a list of arrays in ``params.names()`` order
        (written into ``grads`` when given, else new), ``h_last`` (L·dirs, B, H) new."""
        if not self.fast:
            value, g, fwd = model_loss_and_grad(self.kernels, params, X3, Y, h0s, self.loss, self.output,
                                                self.act, self.wins)
            arrays = g.arrays()
            if grads is not None:
                for dst, src in zip(grads, arrays):
                    dst[...] = src
                arrays = grads
            return value, list(arrays), fwd.h_n
        if self.fused:
            if grads is None:
                grads = [np.empty(a.shape, a.dtype) for a in params.arrays()]
            value = _fused.run(self.kernels, params, X3, Y, h0s, self.loss, self.output, self.act, self.wins,
                               grads, self.work, self.teams)
            return value, grads, self.work[2][self.T:].copy()
        return self._run_layer(params, X3, Y, h0s, grads)

    def _run_layer(self, params, X3, Y, h0s, grads):
        # model.loss_and_grad for one unidirectional layer without lengths, operation for operation;
        # when no GEMM of the shape is split between threads, pmatmul is np.matmul: called directly
        kernels, T, B, act = self.kernels, self.T, self.B, self.act
        layer = params.layers[0]
        H, D = layer.W_xh.shape
        X1, W1, A, Hs, dOut, dZ = self.X1, self.W1, self.A, self.Hs, self.dOut, self.dZ
        if self.small:
            def mm(a, b, trans_a=False, trans_b=False, out=None):
                return np.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)
        else:
            def mm(a, b, trans_a=False, trans_b=False, out=None):
                return pmatmul(a, b, trans_a, trans_b, out, kernels)
        X1[:, :D] = X3.reshape(T * B, D)
        W1[:, :D] = layer.W_xh
        W1[:, D] = layer.b_h
        self.W_hhT[...] = layer.W_hh.T
        mm(X1, W1, trans_b=True, out=A.reshape(T * B, H))
        Hs[0] = h0s[0]
        kernels.forward_recurrence(A, self.W_hhT, Hs, act, threads=self.threads)

        W_hy = params.W_hy
        O = W_hy.shape[0]
        seq = self.output == "sequence"
        H_out = Hs[1:].reshape(T * B, H) if seq else Hs[T]
        O_logits = mm(H_out, W_hy, trans_b=True)
        O_logits += params.b_y
        value, dO = self.loss_fn(O_logits.reshape(Y.shape + (O,)) if self.loss == "ce" else
                                 O_logits.reshape(Y.shape), Y)
        dO = dO.reshape(-1, O)
        if grads is None:
            grads = [np.empty(a.shape, a.dtype) for a in params.arrays()]
        g_W_xh, g_W_hh, g_b_h, g_W_hy, g_b_y = grads
        mm(dO, H_out, trans_a=True, out=g_W_hy)
        g_b_y[...] = column_sums(dO)

        if seq:
            mm(dO, W_hy, out=dOut.reshape(T * B, H))
        else:                   # dOut[:T-1] stays zero: only its last step is ever written
            np.matmul(dO, W_hy, out=dOut[T - 1])
        ends, bp_starts = self.wins
        kernels.backward_accumulate(dOut, Hs, np.ascontiguousarray(layer.W_hh), ends, bp_starts, act, dZ,
                                    threads=self.threads)
        dZ2 = dZ.reshape(T * B, H)
        dW1 = mm(dZ2, X1, trans_a=True, out=self.dW1)
        g_W_xh[...] = dW1[:, :D]
        g_b_h[...] = dW1[:, D]
        mm(dZ2, Hs[:T].reshape(T * B, H), trans_a=True, out=g_W_hh)
        return value, grads, Hs[T:].copy()


_local = threading.local()
_MAX_PLANS = 16


def plan_key(kernels, params, T, B, loss, output, act, truncation):
    structure = (params.input_size, params.hidden_size, params.output_size, params.num_layers,
                 params.bidirectional, params.dtype)
    return (kernels, structure, T, B, loss, output, act, truncation, team_size())


def make_plan(kernels, params, T, B, loss, output, act, truncation):
    """A new :class:`Plan` (inside a call scope: it fixes the call's team size)."""
    key = plan_key(kernels, params, T, B, loss, output, act, truncation)
    return Plan(key, kernels, params, T, B, loss, output, act, windows(T, truncation))


def plan_for(kernels, params, T, B, loss, output, act, truncation):
    """This thread's :class:`Plan` for a call (made on first use; the last few shapes are kept)."""
    key = plan_key(kernels, params, T, B, loss, output, act, truncation)
    plans = _local.__dict__.setdefault("plans", {})
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= _MAX_PLANS:
            plans.pop(next(iter(plans)))
        plan = plans[key] = Plan(key, kernels, params, T, B, loss, output, act, windows(T, truncation))
    return plan
