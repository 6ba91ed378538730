"""Losses on the logits, with torch's default ('mean') reductions.

Each loss takes logits ``o`` of shape (..., O) and targets, and returns
``(value, dO)`` with ``dO = ∂value/∂o``. ``predict`` maps logits to outputs
(identity, sigmoid or softmax).
"""

import numpy as np
from scipy.special import expit, softmax

LOSSES = ("mse", "bce", "ce")


def mse(o, y):
    """mean((o - y)²) over all elements, as ``F.mse_loss``."""
    diff = o - y
    value = float(np.add.reduce((diff * diff).ravel(), dtype=np.float64)) / diff.size  # np.mean, less overhead
    return value, (2.0 / diff.size) * diff


def bce(o, y):
    """mean of -[y log σ(o) + (1-y) log(1-σ(o))], as ``F.binary_cross_entropy_with_logits``."""
    # stable form: max(o, 0) - o·y + log(1 + exp(-|o|))
    per_elem = np.maximum(o, 0) - o * y + np.log1p(np.exp(-np.abs(o)))
    value = float(np.mean(per_elem, dtype=np.float64))
    return value, (expit(o) - y) / o.size


def ce(o, y):
    """mean over positions of -log softmax(o)[y], as ``F.cross_entropy``.

    ``o`` is (..., C), ``y`` holds integer class ids of shape ``o.shape[:-1]``.
    """
    C = o.shape[-1]
    o2 = o.reshape(-1, C)
    rows, cols = np.arange(o2.shape[0]), y.reshape(-1)
    n = rows.shape[0]
    shifted = o2 - o2.max(axis=1, keepdims=True)      # log softmax = shifted - log Σ exp(shifted)
    d = np.exp(shifted)
    s = d.sum(axis=1, keepdims=True)
    value = float(-np.add.reduce(shifted[rows, cols] - np.log(s[:, 0]), dtype=np.float64) / n)
    d *= (1.0 / n) / s                                  # softmax / n, then minus one-hot / n
    d[rows, cols] -= o.dtype.type(1.0 / n)
    return value, d.reshape(o.shape)


LOSS_FUNCS = {"mse": mse, "bce": bce, "ce": ce}


def predict_from_logits(o, loss):
    """Outputs a user reads: logits for mse, probabilities for bce/ce."""
    if loss == "mse":
        return o
    if loss == "bce":
        return expit(o)
    return softmax(o, axis=-1)
