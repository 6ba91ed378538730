"""Variable-length batches: rows sorted by length, and where their valid steps lie.

A batch with ``lengths`` runs with its rows sorted by length, longest first,
so that step t of the kernels runs on rows ``0 .. n_t-1`` only (``batch_sizes``,
as in torch's ``PackedSequence``). Arrays stay padded (T, B, ...) in that
sorted order; the big GEMMs run on the valid positions only, gathered by
``idx`` into packed (N, ...) rows (N = Σ lengths) and scattered back.
"""

import numpy as np


class Packing:
    """The layout of one variable-length batch (rows sorted, longest first).

    Attributes
    ----------
    order : (B,) int64: sorted row i is the caller's row ``order[i]``.
    lengths : (B,) int64, sorted, non-increasing.
    batch_sizes : (T,) int64: n_t, the rows active at step t.
    idx : (N,) int64: flat indices ``t·B + b`` of the valid positions, step by step.
    rev_src : (N,) int64: for the valid position (t, b) of ``idx``, the flat index of
        ``(len_b - 1 - t, b)``: a reverse direction's step t is time ``len_b - 1 - t``.
    last : (B,) int64: flat index of each row's last valid step, ``(len_b - 1)·B + b``.
    pad : flat indices of the padded positions.
    """

    def __init__(self, lengths, T):
        lengths = np.asarray(lengths, dtype=np.int64)
        B = lengths.shape[0]
        self.T, self.B = T, B
        self.order = np.argsort(-lengths, kind="stable")
        self.lengths = np.ascontiguousarray(lengths[self.order])
        steps = np.arange(T, dtype=np.int64)
        self.batch_sizes = np.ascontiguousarray((self.lengths[None, :] > steps[:, None]).sum(axis=1),
                                                dtype=np.int64)
        valid = steps[:, None] < self.lengths[None, :]               # (T, B)
        self.idx = np.flatnonzero(valid)
        self.pad = np.flatnonzero(~valid)
        t, b = np.divmod(self.idx, B)
        self.rev_src = (self.lengths[b] - 1 - t) * B + b
        self.last = (self.lengths - 1) * B + np.arange(B)
        self.N = self.idx.shape[0]

    def sort(self, a, axis):
        """``a`` with its batch axis in sorted order (a new array)."""
        return np.ascontiguousarray(np.take(a, self.order, axis=axis))

    def unsort(self, a, axis):
        """``a`` (sorted on ``axis``) back in the caller's row order (a new array)."""
        out = np.empty_like(a)
        index = [slice(None)] * a.ndim
        index[axis] = self.order
        out[tuple(index)] = a
        return out


def packing(lengths, T):
    """A :class:`Packing`, or None when every row is full length (the plain path)."""
    if lengths is None or bool(np.all(np.asarray(lengths) == T)):
        return None
    return Packing(lengths, T)
