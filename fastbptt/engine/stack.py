"""The recurrent stack: layers and directions over the shared GEMMs and the backend's two loops.

One (layer, direction) at a time, the layer contract is::

    forward:   A = [X | 1]·[W_xh | b_h]ᵀ                 one GEMM over all T·B rows
               Hs[t+1] = f(A[t] + Hs[t]·W_hhᵀ)            the backend's forward kernel
    backward:  G[t] = ∂L/∂h_t arriving at every step (from the head or the layer above)
               dZ = the backend's backward kernel over the truncation windows
               [dW_xh | db_h] = dZᵀ·[X | 1],  dW_hh = dZᵀ·Hs[:-1]      two GEMMs
               dX = dZ·W_xh  (the gradient of the layer's input)       one GEMM
               dh0 = dZ[0]·W_hh  (of its initial state: only a window that starts at step 1
                                  reaches it, and it does)

A reverse direction runs the same kernels on its input taken in reverse
order (one copy per call, not per step); its states come back reversed into
the layer's output. Layer l > 0 takes ``[out_fwd | out_rev]`` of layer l-1.
All arrays here are validated, typed and C-contiguous.

A variable-length batch (``pack``, a :class:`~fastbptt.engine.lengths.Packing`)
has its rows sorted by length; the kernels run step t on the rows still active,
a reverse direction takes each row reversed within its own length, and the
GEMMs run on the valid positions only: ``X1`` then holds the valid rows
(N, D_in+1), in the direction's step order. Values at padded positions of the
(T, B, ...) arrays are undefined unless said otherwise.
"""

import numpy as np

from ..params import RNNParams
from .core import matmul, pmatmul, recurrence, scratch, with_ones


def pack_grads(params, layer_grads, head=None):
    """An :class:`RNNParams` of gradients in ``params``' structure (head zeros when not given)."""
    arrays = [a for g in layer_grads for a in g]
    if params.has_head:
        arrays += list(head) if head is not None else [np.zeros_like(params.W_hy), np.zeros_like(params.b_y)]
    return RNNParams._trusted_like(params, arrays)


class StackForward:
    """The saved forward of a stack: what its backward needs.

    Attributes
    ----------
    X1 : list of (T·B, D_in+1) arrays, per (layer, direction): ``[input | 1]`` in that
        direction's step order.
    Hs : list of (T+1, B, H) arrays, per (layer, direction), in its step order.
    out : (T+1, B, dirs·H) array: ``out[1:]`` is the top layer's output (torch's
        ``output``), ``out[0]`` its initial states; for one unidirectional layer
        it is ``Hs[0]`` itself.
    """

    __slots__ = ("params", "kernels", "act", "pack", "X1", "Hs", "_out")

    def __init__(self, params, kernels, act, pack=None):
        self.params, self.kernels, self.act, self.pack = params, kernels, act, pack
        self.X1, self.Hs, self._out = [], [], None

    @property
    def out(self):
        if self._out is None:   # a variable-length stack builds its padded output only when asked
            self._out = self._padded_output()
        return self._out

    def _padded_output(self):
        """(T+1, B, dirs·H), a new array: the top output (zeros at padded steps)."""
        pack, H = self.pack, self.params.hidden_size
        top = self.Hs[-self.params.num_directions:]
        T1, B = top[0].shape[:2]
        if pack is None:
            out = np.empty((T1, B, len(top) * H), dtype=top[0].dtype)
            for d, Hs in enumerate(top):
                out[0, :, d * H:(d + 1) * H] = Hs[0]
                out[1:, :, d * H:(d + 1) * H] = Hs[:0:-1] if d else Hs[1:]   # reverse step s is time T+1-s
            return out
        out = np.zeros((T1, B, len(top) * H), dtype=top[0].dtype)
        rows = out[1:].reshape(-1, len(top) * H)
        for d, Hs in enumerate(top):
            out[0, :, d * H:(d + 1) * H] = Hs[0]
            rows[pack.rev_src if d else pack.idx, d * H:(d + 1) * H] = Hs[1:].reshape(-1, H)[pack.idx]
        return out

    def _final(self, Hs):
        """(B, H): the final state of one (layer, direction), each row's at its own last step."""
        if self.pack is None:
            return Hs[-1]
        return Hs[1:].reshape(-1, Hs.shape[2])[self.pack.last]

    @property
    def h_n(self):
        """(L·dirs, B, H): each (layer, direction)'s final state (torch's ``h_n``), a new array."""
        if len(self.Hs) == 1 and self.pack is None:
            return self.Hs[0][-1:].copy()
        return np.stack([self._final(Hs) for Hs in self.Hs])

    def last_output(self):
        """(B, dirs·H): each direction's final state of the top layer, ``[h_T^fwd ; h_1^bwd]``."""
        if not self.params.bidirectional:
            return self._final(self.out)
        H = self.params.hidden_size
        return np.concatenate([self._final(self.Hs[-2]), self._final(self.Hs[-1])], axis=1)

    def output_rows(self):
        """The top output at the loss positions: (T·B, dirs·H), or (N, dirs·H) valid rows with ``pack``."""
        if self.pack is None:
            return self.out[1:].reshape(-1, self.out.shape[2])
        return _packed_rows(self.Hs[-self.params.num_directions:], False, self.pack, None, ones=False)


def _input_rows_W1(layer):
    """``[W_xh | b_h]`` (H, D_in+1)."""
    H, D = layer.W_xh.shape
    W1 = np.empty((H, D + 1), dtype=layer.W_xh.dtype)
    W1[:, :D] = layer.W_xh
    W1[:, D] = layer.b_h
    return W1


def _packed_rows(prev, reverse, pack, name, ones=True):
    """A layer's input at the valid positions, from the previous layer's states ``prev``
    (its Hs per direction): ``[h_fwd | h_rev (| 1)]`` (N, dirs·H (+1)), in the step order of
    the direction that takes it (``reverse``): position k is ``pack.idx[k]`` in that order."""
    H = prev[0].shape[2]
    n = len(prev) * H + (1 if ones else 0)
    out = np.empty((pack.N, n), prev[0].dtype) if name is None else scratch(name, (pack.N, n), prev[0].dtype)
    for d, Hs in enumerate(prev):       # a reverse direction's step s of row b is its time len_b - 1 - s
        src = pack.idx if d == reverse else pack.rev_src
        out[:, d * H:(d + 1) * H] = Hs[1:].reshape(-1, H)[src]
    if ones:
        out[:, -1] = 1
    return out


def _bidirectional_rows(prev, reverse, name):
    """A layer's input from both directions of the full-length layer below:
    ``[h_fwd | h_rev | 1]`` (T·B, 2H+1), in the step order of the direction that takes it."""
    T1, B, H = prev[0].shape
    T = T1 - 1
    out = np.empty((T * B, 2 * H + 1), prev[0].dtype) if name is None else scratch(name, (T * B, 2 * H + 1), prev[0].dtype)
    rows = out.reshape(T, B, 2 * H + 1)
    for d, Hs in enumerate(prev):       # a reverse direction's step s is time T-1-s
        rows[:, :, d * H:(d + 1) * H] = Hs[1:] if d == reverse else Hs[:0:-1]
    out[:, -1] = 1
    return out


def _packed_with_ones(X3, src, name):
    """``[X | 1]`` of the valid positions ``src`` (flat indices into X3's T·B rows): (N, D+1)."""
    D = X3.shape[2]
    X1 = np.empty((src.shape[0], D + 1), X3.dtype) if name is None else scratch(name, (src.shape[0], D + 1), X3.dtype)
    X1[:, :D] = X3.reshape(-1, D)[src]
    X1[:, D] = 1
    return X1


def layer_forward(kernels, layer, X1, h0, act, Hs, pack=None):
    """Fill ``Hs`` (T+1, B, H): ``Hs[0] = h0``, then the recurrence over ``A = X1·W1ᵀ``."""
    T, B, H = Hs.shape[0] - 1, Hs.shape[1], Hs.shape[2]
    A = scratch("A", (T, B, H), Hs.dtype)
    if pack is None:
        pmatmul(X1, _input_rows_W1(layer), trans_b=True, out=A.reshape(T * B, H), kernels=kernels)
    else:                       # the valid rows only, scattered to their places
        A.reshape(T * B, H)[pack.idx] = pmatmul(X1, _input_rows_W1(layer), trans_b=True, kernels=kernels)
    Hs[0] = h0
    recurrence(kernels, T, B, H, kernels.forward_recurrence, A, np.ascontiguousarray(layer.W_hh.T), Hs, act,
               batch_sizes=None if pack is None else pack.batch_sizes)


def stack_forward(kernels, params, X3, h0s, act, fresh=False, pack=None):
    """Run every (layer, direction) forward; returns a :class:`StackForward`.

    ``X3`` (T, B, D), ``h0s`` (L·dirs, B, H), rows in ``pack``'s sorted order if
    given (then ``out`` holds zeros at padded steps). With ``fresh`` every saved
    array is new (the forward belongs to the caller, e.g. a ``vjp``); otherwise
    they are this thread's work arrays, valid until the next call.
    """
    T, B, _ = X3.shape
    H, dirs, L = params.hidden_size, params.num_directions, params.num_layers
    fwd = StackForward(params, kernels, act, pack)

    def array(name, shape):
        return np.empty(shape, dtype=params.dtype) if fresh else scratch(name, shape, params.dtype)

    inp = X3
    for l in range(L):
        for d in range(dirs):
            i = l * dirs + d
            name = None if fresh else f"X1.{i}"
            if pack is None and (l == 0 or dirs == 1):
                X1 = with_ones(inp, reverse=bool(d), name=name)
            elif pack is None:
                X1 = _bidirectional_rows(fwd.Hs[(l - 1) * dirs:l * dirs], bool(d), name)
            elif l == 0:
                X1 = _packed_with_ones(X3, pack.rev_src if d else pack.idx, name)
            else:
                X1 = _packed_rows(fwd.Hs[(l - 1) * dirs:l * dirs], bool(d), pack, name)
            Hs = array(f"Hs.{i}", (T + 1, B, H))
            layer_forward(kernels, params.layers[i], X1, h0s[i], act, Hs, pack)
            fwd.X1.append(X1)
            fwd.Hs.append(Hs)
        if pack is None and dirs == 1:      # otherwise the next layer gathers its input from the states
            inp = fwd.Hs[-1][1:]
            fwd._out = fwd.Hs[-1]
    return fwd


def _layer_grads(kernels, layer, X1, Hs, dZ, want_dX, want_dh0, pack=None):
    """The GEMMs after a layer's backward kernel: ``(dW_xh, dW_hh, db_h, dX or None, dh0 or None)``.

    ``dX`` is (T·B, D_in) in the layer's step order, a new array (with ``pack``: (N, D_in),
    its valid rows in the order of ``pack.idx``).
    """
    T, B, H = dZ.shape
    D = X1.shape[1] - 1
    dZ2, H_prev = dZ.reshape(T * B, H), Hs[:-1].reshape(T * B, H)
    if pack is not None:        # the valid rows only
        dZ2, H_prev = dZ2[pack.idx], H_prev[pack.idx]
    dW1 = pmatmul(dZ2, X1, trans_a=True, kernels=kernels)
    dW_xh, db_h = np.ascontiguousarray(dW1[:, :D]), dW1[:, D].copy()
    dW_hh = pmatmul(dZ2, H_prev, trans_a=True, kernels=kernels)
    dX = pmatmul(dZ2, layer.W_xh, kernels=kernels) if want_dX else None
    dh0 = matmul(dZ[0], layer.W_hh) if want_dh0 else None
    return dW_xh, dW_hh, db_h, dX, dh0


def _compensation(ends, bp_starts, a, T, dtype):
    """ARTBP's compensation as a rescaling the kernels need not know about: (T, 1, 1) ``a**(t - s)``.

    The gradient crossing an uncut step boundary is multiplied by ``a``: δ_t = G_t + a·W_hhᵀ dz_{t+1}.
    With f_t = a^(t - s) in a window starting at s, δ'_t = f_t·δ_t obeys the plain recurrence
    δ'_t = f_t·G_t + W_hhᵀ dz'_{t+1}, dz'_t = f_t·dz_t: the kernels run on G·f and dZ = dZ'/f.
    (The windows are disjoint; a^(t - s) stays far from overflow: the window lengths are
    geometric with mean 1/c, so a^n ~ e^(cn) with cn ~ Exp(1).)
    """
    t = np.arange(T)
    start = np.asarray(bp_starts)[np.searchsorted(np.asarray(ends), t, side="right")]
    return (a ** (t - start)).astype(dtype)[:, None, None]


def _disjoint(ends, bp_starts):
    """Whether no step is in two windows (full BPTT, ``k``, ``(k, k)``)."""
    return bool(np.all(bp_starts[1:] >= ends[:-1]))


def stack_backward(fwd, dOut, d_hn=None, *, wins, want_dX=False, want_dh0=False):
    """Backpropagate ``dOut`` (T, B, dirs·H) on the top output and ``d_hn`` (L·dirs, B, H) on the
    final states through the stack.

    ``dOut`` is a work array the backward may overwrite (only its valid positions are
    read), or, for a full-length batch, a tuple of one (T, B, H) work array per direction
    in that direction's step order (saves splitting and reversing). ``wins`` are the truncation
    windows ``(ends, bp_starts)`` of :func:`fastbptt.engine.core.windows`: every layer
    is cut at the same steps (as if every layer's state were detached at a window's
    start); the head's gradient enters the top layer at each window's own loss steps.
    A bidirectional stack takes one window (full BPTT).

    Returns ``(layer_grads, dX, dh0)``: ``layer_grads`` a list of ``(dW_xh, dW_hh, db_h)``
    per (layer, direction) in torch's order; ``dX`` (T, B, D) (zeros at padded steps) and
    ``dh0`` (L·dirs, B, H) new arrays when asked for, else None.
    """
    params, kernels, act, pack = fwd.params, fwd.kernels, fwd.act, fwd.pack
    H, dirs, L = params.hidden_size, params.num_directions, params.num_layers
    G_dirs = dOut if isinstance(dOut, tuple) else None     # per direction, in its step order
    T, B = (G_dirs[0] if G_dirs else dOut).shape[:2]
    ends, bp_starts = wins[:2]
    scale = None if len(wins) < 3 else _compensation(ends, bp_starts, wins[2], T, params.dtype)
    bs = None if pack is None else pack.batch_sizes
    grads = [None] * (L * dirs)
    dh0 = np.empty((L * dirs, B, H), dtype=params.dtype) if want_dh0 else None
    if L > 1 and not _disjoint(ends, bp_starts):
        dX = _windowed_backward(fwd, dOut, wins, grads, dh0, want_dX)
        return grads, dX, dh0

    W_hh = [np.ascontiguousarray(lay.W_hh) for lay in params.layers]
    G_above = dOut                      # (T, B, dirs·H): ∂L/∂(this layer's output)
    dX = None
    for l in range(L - 1, -1, -1):
        want = l > 0 or want_dX
        dXs = []
        for d in range(dirs):
            i = l * dirs + d
            if G_dirs is not None:
                G = G_dirs[d]
            elif dirs == 1:
                G = G_above
            else:
                G = scratch("G", (T, B, H), params.dtype)
                if pack is None:
                    G[:] = G_above[::-1, :, H:] if d else G_above[:, :, :H]
                elif d:                     # reverse step t of row b is its time len_b - 1 - t
                    G.reshape(T * B, H)[pack.idx] = G_above.reshape(T * B, 2 * H)[pack.rev_src, H:]
                else:
                    G[:] = G_above[:, :, :H]
            if d_hn is not None:
                if pack is None:
                    G[T - 1] += d_hn[i]
                else:
                    G.reshape(T * B, H)[pack.last] += d_hn[i]
            dZ = scratch("dZ", (T, B, H), params.dtype)
            if scale is not None:       # ARTBP: see _compensation (padded rows hold anything)
                with np.errstate(over="ignore", invalid="ignore"):
                    G *= scale
            recurrence(kernels, T, B, H, kernels.backward_accumulate, G, fwd.Hs[i], W_hh[i],
                       ends, bp_starts, act, dZ, batch_sizes=bs)
            if scale is not None:
                with np.errstate(over="ignore", invalid="ignore"):
                    dZ /= scale
            dW_xh, dW_hh, db_h, dX_i, dh0_i = _layer_grads(kernels, params.layers[i], fwd.X1[i], fwd.Hs[i],
                                                          dZ, want, want_dh0, pack)
            grads[i] = (dW_xh, dW_hh, db_h)
            if want_dh0:
                dh0[i] = dh0_i
            if want:
                dXs.append(dX_i)
        if not want:
            break
        if pack is None and dirs == 2 and l > 0:
            G_dirs = _split_input_grads(dXs, T, B, H)
            continue
        G_dirs, G_above = None, None
        for d, dX_i in enumerate(dXs):
            G_above = _add_input_grad(G_above, dX_i, d, T, B, pack, zero_pad=l == 0)
    if want_dX:
        dX = G_above
    return grads, dX, dh0


def _split_input_grads(dXs, T, B, H):
    """The gradients of the layer below, per direction in its step order, from the input
    gradients (T·B, 2H) of both directions of a full-length layer (the reverse one's in
    reverse order): no (T, B, 2H) sum is formed."""
    dX_f, dX_r = (dX.reshape(T, B, 2 * H) for dX in dXs)
    G_f, G_r = scratch("G.f", (T, B, H), dX_f.dtype), scratch("G.r", (T, B, H), dX_f.dtype)
    np.add(dX_f[:, :, :H], dX_r[::-1, :, :H], out=G_f)
    np.add(dX_f[::-1, :, H:], dX_r[:, :, H:], out=G_r)
    return G_f, G_r


def _add_input_grad(d_in, dX, reverse, T, B, pack, zero_pad=False):
    """``d_in`` (T, B, D_in; None: new) plus one direction's input gradient ``dX`` in its step order.

    With ``pack`` the padded positions of a new ``d_in`` are zeros if ``zero_pad``, else undefined.
    """
    D = dX.shape[1]
    if pack is None:
        dX = dX.reshape(T, B, D)
        if d_in is None:
            return dX[::-1].copy() if reverse else dX
        d_in += dX[::-1] if reverse else dX
        return d_in
    where = pack.rev_src if reverse else pack.idx
    if d_in is None:
        d_in = np.zeros((T, B, D), dX.dtype) if zero_pad else np.empty((T, B, D), dX.dtype)
        d_in.reshape(T * B, D)[where] = dX
    else:
        d_in.reshape(T * B, D)[where] += dX     # each valid position once per direction
    return d_in


def _windowed_backward(fwd, dOut, wins, grads, dh0, want_dX):
    """A stacked unidirectional backward whose windows overlap (``(k1, k2)`` with k2 > k1).

    A window's chain through a lower layer carries what that window's chain of the
    layer above sent down, so each window runs through the whole stack on its own:
    ``Σ_windows`` then gives each layer's dZ, and the GEMMs run once per layer.
    """
    params, kernels, act, pack = fwd.params, fwd.kernels, fwd.act, fwd.pack
    H, L = params.hidden_size, params.num_layers
    T, B = dOut.shape[0], dOut.shape[1]
    ends, bp_starts = wins
    W_hh = [np.ascontiguousarray(lay.W_hh) for lay in params.layers]
    dZ = [np.zeros((T, B, H), dtype=params.dtype) for _ in range(L)]
    one_window = (np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64))
    loss_start = 0
    for end, start in zip(ends.tolist(), bp_starts.tolist()):
        n = end - start
        one_window[0][0] = n
        G = np.array(dOut[start:end])
        G[:loss_start - start] = 0              # this window's losses only: steps [loss_start, end)
        dz = scratch("dZw", (n, B, H), params.dtype)
        for l in range(L - 1, -1, -1):
            recurrence(kernels, n, B, H, kernels.backward_accumulate, G, fwd.Hs[l][start:end + 1], W_hh[l],
                       one_window[0], one_window[1], act, dz,
                       batch_sizes=None if pack is None else pack.batch_sizes[start:end])
            dZ[l][start:end] += dz
            if l > 0:
                G = pmatmul(dz.reshape(n * B, H), params.layers[l].W_xh, kernels=kernels).reshape(n, B, H)
        loss_start = end
    dX = None
    for l in range(L - 1, -1, -1):
        dW_xh, dW_hh, db_h, dX_l, dh0_l = _layer_grads(kernels, params.layers[l], fwd.X1[l], fwd.Hs[l], dZ[l],
                                                       l == 0 and want_dX, dh0 is not None, pack)
        grads[l] = (dW_xh, dW_hh, db_h)
        if dh0 is not None:
            dh0[l] = dh0_l
        if l == 0 and want_dX:
            dX = _add_input_grad(None, dX_l, False, T, B, pack, zero_pad=True)
    return dX


def head_logits(params, rows, kernels=None):
    """o = W_hy h + b_y for every row of ``rows`` (..., dirs·H) -> (..., O)."""
    flat = rows.reshape(-1, rows.shape[-1])
    O_rows = pmatmul(flat, params.W_hy, trans_b=True, kernels=kernels)
    O_rows += params.b_y
    return O_rows.reshape(rows.shape[:-1] + (params.output_size,))
