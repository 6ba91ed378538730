"""Gradient clipping, as ``torch.nn.utils.clip_grad_norm_`` and ``clip_grad_value_``."""

import math
import numbers

import numpy as np

from .params import RNNParams
from ._threads import call_scope

__all__ = ["clip_grad_norm", "clip_grad_value"]


def _check_grads(grads):
    if not isinstance(grads, RNNParams):
        raise TypeError(f"grads: expected an RNNParams, got {type(grads).__name__}")


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number > 0, got {value!r}")
    if not value > 0:   # also refuses NaN
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")
    return float(value)


def clip_grad_norm(grads, max_norm, norm_type=2.0):
    """Scale ``grads`` in place when their global norm exceeds ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: the norm is taken over all five
    arrays together, ``total = ‖(‖g_1‖, …, ‖g_5‖)‖``; every array is multiplied
    by ``min(1, max_norm / (total + 1e-6))``.

    Parameters
    ----------
    grads : RNNParams
        Gradients; modified in place.
    max_norm : float > 0
    norm_type : float or inf, default 2
        The p of the p-norm (``float("inf")`` for the max-norm).

    Returns
    -------
    float
        The total norm before clipping (may be inf or NaN if a gradient is;
        the arrays are then left as they are).
    """
    _check_grads(grads)
    max_norm = _check_positive("max_norm", max_norm)
    norm_type = _check_positive("norm_type", norm_type)
    arrays = grads.arrays()
    with call_scope():          # the norms run on BLAS: pinned to one thread, as every call
        return _clip_norm(arrays, max_norm, norm_type)


def _clip_norm(arrays, max_norm, norm_type):
    if math.isinf(norm_type):
        total = max(float(np.max(np.abs(a))) for a in arrays)
    else:
        norms = np.array([np.linalg.norm(a.ravel().astype(np.float64), ord=norm_type) for a in arrays])
        total = float(np.linalg.norm(norms, ord=norm_type))
    if not math.isfinite(total):
        return total
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for a in arrays:
            a *= a.dtype.type(coef)
    return total


def clip_grad_value(grads, clip_value):
    """Clamp every gradient entry into ``[-clip_value, clip_value]`` in place,
    as ``torch.nn.utils.clip_grad_value_``.

    Parameters
    ----------
    grads : RNNParams
        Gradients; modified in place.
    clip_value : float > 0
    """
    _check_grads(grads)
    clip_value = _check_positive("clip_value", clip_value)
    for a in grads.arrays():
        np.minimum(a, clip_value, out=a)        # np.clip's own checks cost more than the clamp here
        np.maximum(a, -clip_value, out=a)
    return None
