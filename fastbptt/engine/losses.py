"""Losses on the logits, with torch's default ('mean') reductions.

Each loss takes logits ``o`` of shape (..., O) and targets, and returns
``(value, dO)`` with ``dO = ∂value/∂o``. ``predict`` maps logits to outputs
(identity, sigmoid or softmax).
"""

import numpy as np
from scipy.special import expit, softmax

LOSSES = ("mse", "bce", "ce")
#: the compiled backend's codes for them (``backends/cython/kernels.pyx``: ``LOSS_CODES``)
LOSS_CODES = {"mse": 0, "bce": 1, "ce": 2}


def mse_sum(o, y, n):
    """Σ (o - y)² (a float) and its gradient for a mean over ``n`` elements."""
    diff = o - y
    return float(np.add.reduce((diff * diff).ravel(), dtype=np.float64)), (2.0 / n) * diff


def bce_sum(o, y, n):
    """Σ -[y log σ(o) + (1-y) log(1-σ(o))] and its gradient for a mean over ``n`` elements."""
    # stable form: max(o, 0) - o·y + log(1 + exp(-|o|))
    per_elem = np.maximum(o, 0) - o * y + np.log1p(np.exp(-np.abs(o)))
    return float(np.add.reduce(per_elem.ravel(), dtype=np.float64)), (expit(o) - y) / n


def ce_sum(o, y, n):
    """Σ -log softmax(o)[y] over positions and its gradient for a mean over ``n`` positions.

    ``o`` is (..., C), ``y`` holds integer class ids of shape ``o.shape[:-1]``.
    """
    C = o.shape[-1]
    o2 = o.reshape(-1, C)
    rows, cols = np.arange(o2.shape[0]), y.reshape(-1)
    shifted = o2 - o2.max(axis=1, keepdims=True)      # log softmax = shifted - log Σ exp(shifted)
    d = np.exp(shifted)
    s = d.sum(axis=1, keepdims=True)
    total = -float(np.add.reduce(shifted[rows, cols] - np.log(s[:, 0]), dtype=np.float64))
    d *= (1.0 / n) / s                                  # softmax / n, then minus one-hot / n
    d[rows, cols] -= o.dtype.type(1.0 / n)
    return total, d.reshape(o.shape)


def mse(o, y):
    """mean((o - y)²) over all elements, as ``F.mse_loss``."""
    total, d = mse_sum(o, y, o.size)
    return total / o.size, d


def bce(o, y):
    """mean of -[y log σ(o) + (1-y) log(1-σ(o))], as ``F.binary_cross_entropy_with_logits``."""
    total, d = bce_sum(o, y, o.size)
    return total / o.size, d


def ce(o, y):
    """mean over positions of -log softmax(o)[y], as ``F.cross_entropy``."""
    total, d = ce_sum(o, y, y.size)
    return total / y.size, d


#: ``(sum, dO)`` of a part of the positions, for a mean over ``n`` of them (a loss summed in blocks)
LOSS_SUMS = {"mse": mse_sum, "bce": bce_sum, "ce": ce_sum}
LOSS_FUNCS = {"mse": mse, "bce": bce, "ce": ce}


def predict_from_logits(o, loss):
    """Outputs a user reads: logits for mse, probabilities for bce/ce."""
    if loss == "mse":
        return o
    if loss == "bce":
        return expit(o)
    return softmax(o, axis=-1)
