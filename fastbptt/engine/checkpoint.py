"""Full BPTT of a unidirectional stack in fixed time blocks, and its memory-bounded form.

Memory-bounded full BPTT (Gruslys et al. 2016, ``loss_and_grad(..., checkpoint=s)``):
the forward keeps each layer's state only at the segment starts 0, s, 2s, ...; the
backward takes the segments from the last to the first, runs each one's forward
again from its saved states, then its backward. Memory falls from O(T·B·H) to
O((T/s + s)·B·H), O(√T·B·H) at s ≈ √T, for one more forward pass.

Bit for bit. Plain full BPTT (``segment=None``: one segment, every state kept) runs
through the same code, so the two can differ only where a sum is split
differently. The per-step recurrence is the kernels' own arithmetic either way
(the same thread count as the whole sequence would get, see :func:`_threads`); the
δ chain crosses a segment boundary inside the kernel (see :func:`_backward_segment`).
Every GEMM over time rows -- the input projection, the head, the loss, the weight
gradients -- runs in blocks of ``block_steps(B)`` steps fixed on the absolute time
axis, in both modes, and segments are whole blocks: OpenBLAS's result for a row
depends on how many rows a call has (measured: a call of 1-9 rows differs from
the same rows inside a larger call), and a weight gradient summed over one long
contraction differs from a sum of per-segment ones. The weight gradients are
summed block by block from the last block to the first (the order the
checkpointed backward meets them); the loss's partial sums from the first to the
last.

Arrays are validated and typed; with ``pack`` (:mod:`fastbptt.engine.lengths`) the
rows are sorted by length and the GEMMs run on the valid positions only.
"""

import math
from functools import partial

import numpy as np

from .._threads import row_parts, run as run_tasks, team_size
from ..backends.reference import ACT_TANH
from .core import column_sums, matmul, pmatmul, scratch
from .losses import LOSS_CODES, LOSS_SUMS
from .stack import StackForward, _input_rows_W1, pack_grads

# Rows (steps · batch) of one block of the GEMMs over time. Each block's GEMMs are split
# between the threads on their own, and more blocks cost plain full BPTT time on 2 threads
# (longseq, T=2000, B=16: blocks of 4096 rows +7-22%, 16384 +2%; docs/checkpoint.md).
# Checkpointed segments are whole blocks: with small B they are long (B = 1: 16384 steps).
BLOCK_ROWS = 16384


def block_steps(B):
    """Steps per block of the time GEMMs for a batch of ``B`` rows: ⌈BLOCK_ROWS / B⌉."""
    return max(1, -(-BLOCK_ROWS // B))


def segment_steps(checkpoint, T, B):
    """The segment length for a validated ``checkpoint`` (an int s >= 1 or "sqrt"), rounded up
    to whole blocks; T or more means one segment (plain full BPTT)."""
    s = math.isqrt(T - 1) + 1 if checkpoint == "sqrt" else checkpoint    # ⌈√T⌉
    g = block_steps(B)
    return -(-s // g) * g


class _Final:
    """What the callers of :func:`loss_and_grad` read of a checkpointed forward: ``h_n``."""

    __slots__ = ("h_n",)

    def __init__(self, h_n):
        self.h_n = h_n


def _threads(kernels, T, B, H):
    """The kernels' thread count for the whole sequence (as ``core.recurrence``), for every segment:
    a kernel splits its rows or columns by it, and the split decides each part's GEMM shape."""
    return team_size(2 * T * B * H * H, c_team=kernels.TEAM)


class _Run:
    """The fixed shape of one call: blocks, positions of the valid rows, threads."""

    def __init__(self, kernels, params, X3, act, pack):
        self.kernels, self.params, self.X3, self.act, self.pack = kernels, params, X3, act, pack
        T, B, D = X3.shape
        H = params.hidden_size
        self.T, self.B, self.D, self.H, self.L = T, B, D, H, params.num_layers
        self.dtype = params.dtype
        self.g = block_steps(B)
        self.threads = _threads(kernels, T, B, H)
        self.W1 = [_input_rows_W1(layer) for layer in params.layers]
        self.W_hhT = [np.ascontiguousarray(layer.W_hh.T) for layer in params.layers]
        self.W_hh = [np.ascontiguousarray(layer.W_hh) for layer in params.layers]
        self.parts = None
        self.keep = None
        if pack is not None:        # valid rows of steps [a, b): pack.idx[pos[a]:pos[b]]
            self.pos = np.concatenate(([0], np.cumsum(pack.batch_sizes))).astype(np.int64)
            if self.threads > 1 and kernels.NAME != "numpy":
                # A kernel splits a variable-length batch by the work of its own steps, so a segment
                # would be split at other rows than the whole sequence (and a part's per-step
                # product has another row count). Split once, by the whole sequence's work.
                self.parts = row_parts(pack.batch_sizes, 0, B, self.threads)

    def kernel(self, kernel, *args, a, b, extra=False):
        """``kernel(*args)`` on steps [a, b) (and b when ``extra``) with the call's thread split."""
        kw = self.batch_sizes(a, b, extra)
        if self.parts is None:
            kernel(*args, threads=self.threads, **kw)
        else:
            run_tasks([partial(kernel, *args, threads=1, rows=part, **kw) for part in self.parts])

    def blocks(self, a, b):
        """The blocks ``(k0, k1)`` of absolute steps that make up the segment [a, b)."""
        return [(k0, min(k0 + self.g, b)) for k0 in range(a, b, self.g)]

    def valid(self, k0, k1, a):
        """With ``pack``: the valid positions of steps [k0, k1) as flat indices of a segment starting at a."""
        return self.pack.idx[self.pos[k0]:self.pos[k1]] - a * self.B

    def rows(self, arr, k0, k1, a):
        """The block's rows of a segment array ``arr`` (n, B, W) (n >= k1 - a): (rows, W), valid rows only
        with ``pack`` (a copy then)."""
        W = arr.shape[2]
        if self.pack is None:
            return arr[k0 - a:k1 - a].reshape(-1, W)
        return arr.reshape(-1, W)[self.valid(k0, k1, a)]

    def gemm_rows(self, arr, k0, k1, a, A, B_, trans_b=False):
        """``op(A)·op(B_)`` (the block's rows) written into the segment array ``arr`` (n, B, W) at the
        block's rows (as :meth:`rows` gives them): straight into place without ``pack``."""
        W = arr.shape[2]
        if self.pack is None:
            pmatmul(A, B_, trans_b=trans_b, out=arr[k0 - a:k1 - a].reshape(-1, W), kernels=self.kernels)
        else:
            arr.reshape(-1, W)[self.valid(k0, k1, a)] = pmatmul(A, B_, trans_b=trans_b, kernels=self.kernels)

    def layer_input(self, l, k0, k1, a, Hs_below):
        """``[input | 1]`` of layer l for the block [k0, k1): (rows, D_in + 1). A work array of the
        block; with ``keep`` (one segment: plain full BPTT, which keeps its inputs anyway) a slice of
        the layer's whole input, built once for the forward and the backward."""
        if self.keep is None:
            return self._input(l, k0, k1, a, Hs_below, "ck.X1")
        X1 = self.keep.get(l)
        if X1 is None:
            X1 = self.keep[l] = self._input(l, 0, self.T, a, Hs_below, f"ck.X1.{l}")
        if self.pack is None:
            return X1[k0 * self.B:k1 * self.B]
        return X1[self.pos[k0]:self.pos[k1]]

    def _input(self, l, k0, k1, a, Hs_below, name):
        if l == 0:
            src, shift = self.X3, 0
        else:
            src, shift = Hs_below, a - 1        # the layer below's output at step t is its Hs[t - a + 1]
        Din = src.shape[2]
        if self.pack is None:
            n_rows = (k1 - k0) * self.B
            X1 = scratch(name, (n_rows, Din + 1), self.dtype)
            X1[:, :Din] = src[k0 - shift:k1 - shift].reshape(n_rows, Din)
        else:
            idx = self.valid(k0, k1, shift)
            X1 = scratch(name, (idx.shape[0], Din + 1), self.dtype)
            X1[:, :Din] = src.reshape(-1, Din)[idx]
        X1[:, Din] = 1
        return X1

    def batch_sizes(self, a, b, extra=False):
        """The kwargs of a kernel call on steps [a, b) (and step b too when ``extra``)."""
        if self.pack is None:
            return {}
        bs = self.pack.batch_sizes[a:b + 1 if extra else b]
        return {"batch_sizes": np.ascontiguousarray(bs, dtype=np.int64)}


def _segment_forward(run, a, b, h_start, Hs_bufs, A_buf):
    """Every layer's forward over steps [a, b) from the states ``h_start`` (L, B, H); fills
    ``Hs_bufs[l][:b - a + 1]`` (``[0]`` = the state at step a)."""
    n, H = b - a, run.H
    A = A_buf[:n]
    for l in range(run.L):
        Hs = Hs_bufs[l][:n + 1]
        for k0, k1 in run.blocks(a, b):
            X1 = run.layer_input(l, k0, k1, a, Hs_bufs[l - 1] if l else None)
            run.gemm_rows(A, k0, k1, a, X1, run.W1[l], trans_b=True)
        Hs[0] = h_start[l]
        run.kernel(run.kernels.forward_recurrence, A, run.W_hhT[l], Hs, run.act, a=a, b=b)


def _backward_segment(run, l, a, b, G_buf, Hs_buf, dZ_buf, carry):
    """Layer l's backward kernel over [a, b), the δ chain arriving from step b included.

    ``G_buf[:b - a]`` holds ∂L/∂h of the segment's steps. A segment that ends before T runs
    the kernel one step further, over [a, b]: there ``G`` is ``carry`` = dz_b (the later
    segment's result) and the state is one where f' = 1 (tanh: 0, relu: 1), so the kernel's
    dz there is dz_b exactly and its own product dz_b·W_hh carries δ into step b - 1, as in
    one kernel call over the whole sequence. Returns ``dZ_buf[:b - a]``.
    """
    n = b - a
    extra = b < run.T
    m = n + 1 if extra else n
    if extra:
        G_buf[n] = carry
        Hs_buf[n + 1] = 0 if run.act == ACT_TANH else 1
    one_window = (np.array([m], dtype=np.int64), np.zeros(1, dtype=np.int64))
    run.kernel(run.kernels.backward_accumulate, G_buf[:m], Hs_buf[:m + 1], run.W_hh[l], one_window[0],
               one_window[1], run.act, dZ_buf[:m], a=a, b=b, extra=extra)
    return dZ_buf[:n]


def loss_and_grad(kernels, params, X3, Y, h0s, loss, output, act, pack=None, segment=None):
    """Loss and gradients of a unidirectional stack by full BPTT; returns ``(loss, grads, fwd)``.

    Arguments as :func:`fastbptt.engine.model.loss_and_grad` (``Y`` for ``pack`` in its
    layout). ``segment``: None keeps every state (plain full BPTT; ``fwd`` is then a
    :class:`~fastbptt.engine.stack.StackForward` in work arrays); an int s keeps each
    layer's state every s steps (a multiple of :func:`block_steps`) and runs the forward of
    each segment again in the backward (``fwd`` then has ``h_n`` only). Both give the same
    floating-point result.
    """
    run = _Run(kernels, params, X3, act, pack)
    T, B, H, L, dt = run.T, run.B, run.H, run.L, run.dtype
    s = T if segment is None or segment >= T else segment
    starts = list(range(0, T, s))
    seg_bounds = [(a, min(a + s, T)) for a in starts]
    n_buf = s + 2 if len(starts) > 1 else s + 1     # room for the one extra step of _backward_segment
    single = len(starts) == 1
    if single:
        run.keep = {}       # layer -> its whole [input | 1]

    Hs_bufs = [scratch(f"ck.Hs.{l}", (n_buf, B, H), dt) for l in range(L)]
    A_buf = scratch("ck.A", (s, B, H), dt)

    # pass 1: the forward; keep the states at segment starts, the final states and the last output
    ckpt = np.empty((len(starts), L, B, H), dtype=dt)
    h_n = np.empty((L, B, H), dtype=dt)
    h = h0s
    for k, (a, b) in enumerate(seg_bounds):
        ckpt[k] = h
        _segment_forward(run, a, b, h, Hs_bufs, A_buf)
        h = np.stack([Hs[b - a] for Hs in Hs_bufs])
        for l in range(L):      # each row's state at its own last step
            if pack is None:
                if b == T:
                    h_n[l] = Hs_bufs[l][b - a]
            else:
                rows = np.flatnonzero((pack.lengths > a) & (pack.lengths <= b))
                h_n[l, rows] = Hs_bufs[l][pack.lengths[rows] - a, rows]

    # the head: for "last" one GEMM on each row's last top state; for "sequence" per block below
    dW_hy = np.zeros_like(params.W_hy)
    db_y = np.zeros_like(params.b_y)
    W_hy = np.ascontiguousarray(params.W_hy)
    n_total = Y.size        # elements (mse, bce) or positions (ce) of the mean
    # the Cython backend's head of a block of rows (kernels.head_loss_and_grad): over n rows in all
    head = getattr(kernels, "head_loss_and_grad", None)
    b_y = np.ascontiguousarray(params.b_y)
    head_rows = n_total if loss == "ce" else n_total // params.output_size
    if output == "last":
        last_out = h_n[L - 1]
        o = pmatmul(last_out, W_hy, trans_b=True, kernels=kernels)
        o += params.b_y
        total, dO = LOSS_SUMS[loss](o, Y, n_total)
        dW_hy += pmatmul(dO, last_out, trans_a=True, kernels=kernels)
        db_y += column_sums(dO)
        dlast = matmul(dO, W_hy)
        value = total / n_total
    else:
        partials = {}
    last_flat = None if pack is None else pack.last

    # pass 2: the backward, segment by segment from the last; within each, block by block from the last
    dW1 = [np.zeros_like(w) for w in run.W1]
    W_xh = [np.ascontiguousarray(layer.W_xh) for layer in params.layers]
    dW_hh = [np.zeros_like(w) for w in run.W_hh]
    G_buf = scratch("ck.G", (min(s + 1, n_buf), B, H), dt)
    dZ_buf = scratch("ck.dZ", (min(s + 1, n_buf), B, H), dt)
    carry = [None] * L
    for k in range(len(starts) - 1, -1, -1):
        a, b = seg_bounds[k]
        n = b - a
        if k < len(starts) - 1:       # (the last segment's states are still there from pass 1)
            _segment_forward(run, a, b, ckpt[k], Hs_bufs, A_buf)
        top = Hs_bufs[L - 1]
        G = G_buf[:n]
        if output == "sequence":
            for k0, k1 in reversed(run.blocks(a, b)):
                H_rows = run.rows(top[1:], k0, k1, a)
                if head is not None and pack is None:     # the block's head in one compiled call
                    y = np.ascontiguousarray(Y[k0:k1].reshape((-1,) + Y.shape[2:]),
                                             np.int64 if loss == "ce" else None)
                    partials[k0] = head(H_rows, W_hy, b_y, y, LOSS_CODES[loss], head_rows, dW_hy, db_y,
                                        G[k0 - a:k1 - a].reshape(-1, H),
                                        team_size(6 * H_rows.shape[0] * H * W_hy.shape[0], c_team=kernels.TEAM))
                    continue
                o = pmatmul(H_rows, W_hy, trans_b=True, kernels=kernels)
                o += params.b_y
                if pack is None:
                    y = Y[k0:k1].reshape((-1,) + Y.shape[2:])
                else:
                    y = Y[run.pos[k0]:run.pos[k1]]
                partials[k0], dO = LOSS_SUMS[loss](o, y if loss == "ce" else y.reshape(o.shape), n_total)
                dW_hy += pmatmul(dO, H_rows, trans_a=True, kernels=kernels)
                db_y += column_sums(dO)
                run.gemm_rows(G, k0, k1, a, dO, W_hy)
        else:
            G[:] = 0
            if pack is None:
                if b == T:
                    G[n - 1] = dlast
            else:
                rows = np.flatnonzero((pack.lengths > a) & (pack.lengths <= b))
                G.reshape(-1, H)[last_flat[rows] - a * B] = dlast[rows]
        for l in range(L - 1, -1, -1):
            dZ = _backward_segment(run, l, a, b, G_buf, Hs_bufs[l], dZ_buf, carry[l])
            carry[l] = dZ[0].copy()
            for k0, k1 in reversed(run.blocks(a, b)):
                dZ_rows = run.rows(dZ, k0, k1, a)
                X1 = run.layer_input(l, k0, k1, a, Hs_bufs[l - 1] if l else None)
                dW1[l] += pmatmul(dZ_rows, X1, trans_a=True, kernels=kernels)
                dW_hh[l] += pmatmul(dZ_rows, run.rows(Hs_bufs[l][:n], k0, k1, a), trans_a=True, kernels=kernels)
                if l:           # ∂L/∂h of the layer below: dZ·W_xh, into G (already read by this layer's kernel)
                    run.gemm_rows(G, k0, k1, a, dZ_rows, W_xh[l])

    if output == "sequence":
        total = 0.0
        for k0 in sorted(partials):
            total += partials[k0]
        value = total / n_total
    D_in = [w.shape[1] - 1 for w in run.W1]
    layer_grads = [(np.ascontiguousarray(dW1[l][:, :D_in[l]]), dW_hh[l], dW1[l][:, D_in[l]].copy())
                   for l in range(L)]
    grads = pack_grads(params, layer_grads, (dW_hy, db_y))
    if single:
        fwd = StackForward(params, kernels, act, pack)
        fwd.Hs = Hs_bufs
        if pack is None:
            fwd._out = Hs_bufs[-1]
    else:
        fwd = _Final(h_n)
    return value, grads, fwd
