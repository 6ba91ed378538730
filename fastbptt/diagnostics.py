"""Training diagnostics: how far back the gradient reaches, and the spectrum of W_hh.

``hidden_grad_norms`` returns ‖∂L/∂h_t‖ for every step t = 0 … T under full BPTT:
δ_t collects the direct term from o_t and the term carried back from t+1,
the equations of BPTT::

    δ_t     = G_t + W_hhᵀ dz_{t+1},   dz_t = δ_t ⊙ f'(z_t)

A vanishing gradient shows as norms that fall geometrically going back from
the loss steps; an exploding one as norms that grow. The spectral radius ρ
and the largest singular value σ_max of W_hh bound that behaviour for tanh
(‖∂h_t/∂h_{t-1}‖ ≤ σ_max); ρ > 1 is necessary for explosion.

The backend's own backward loop gives dz_t; δ_t then takes one GEMM for
all t. Meant to be run on one batch now and then, e.g. once per epoch by
``RNN.fit(..., diagnostics=True)``. One unidirectional layer only.
"""

import numpy as np

from . import _validation as V
from .backends import resolve_backend
from .engine.core import ACT_CODES
from .engine.losses import LOSSES
from .engine.model import hidden_grad_norms as _hidden_grad_norms
from ._threads import call_scope
from .params import RNNParams

__all__ = ["hidden_grad_norms", "spectral_radius", "max_singular_value", "recurrent_spectrum"]


def hidden_grad_norms(model, X, Y, *, h0=None, loss="mse", output="sequence", activation="tanh",
                      backend="auto"):
    """‖∂L/∂h_t‖ (Frobenius over the batch) for every step t, full BPTT.

    Parameters
    ----------
    model : fastbptt.RNN or RNNParams
        With an ``RNN``, its loss, output and activation are used (the
        keyword arguments are ignored) and the data is **samples first**, as
        for ``RNN.fit``: X (N, T, D) or integer ids (N, T), Y by loss/output.
        With ``RNNParams`` the data is **time-major**, as for
        :func:`fastbptt.loss_and_grad`: X (T, B, D) or (T, D).
    X, Y : array_like
    h0 : array_like of shape (B, H), optional (RNNParams only); zeros if None
    loss, output, activation, backend : str
        As for :func:`fastbptt.loss_and_grad` (RNNParams only).

    Returns
    -------
    ndarray of shape (T + 1,)
        ``norms[t]`` is ‖∂L/∂h_t‖ for t = 0 … T (``norms[0]``: the initial
        state), where L is the mean loss, as returned by ``loss_and_grad``.
    """
    if isinstance(model, RNNParams):
        _check_one_layer(model)
        V.check_choice("loss", loss, LOSSES)
        V.check_choice("output", output, V.OUTPUTS)
        V.check_choice("activation", activation, V.ACTIVATIONS)
        X3, single = V.check_X(X, model)
        T, B, _ = X3.shape
        h0_ = V.check_h0(h0, model, B, single)
        Y_ = V.check_Y(Y, model, T, B, single, loss, output)
        kernels = resolve_backend(backend, T=T, B=B, H=model.hidden_size, dtype=model.dtype)
        with call_scope():
            return _hidden_grad_norms(kernels, model, X3, Y_, h0_, loss, output, ACT_CODES[activation])
    method = getattr(model, "hidden_grad_norms", None)
    if not callable(method) or not isinstance(getattr(model, "params", None), RNNParams):
        raise TypeError(f"model: expected a fastbptt.RNN or RNNParams, got {type(model).__name__}")
    return method(X, Y)


def _check_one_layer(params):
    if len(params.layers) != 1:
        raise ValueError("model: expected a one-layer unidirectional model (the norms are those of its "
                         f"hidden state), got num_layers={params.num_layers}, bidirectional={params.bidirectional}")


def _W(W_or_params):
    if isinstance(W_or_params, RNNParams):
        return W_or_params.W_hh
    if hasattr(W_or_params, "params") and isinstance(W_or_params.params, RNNParams):
        return W_or_params.params.W_hh
    W = np.asarray(W_or_params)
    if W.ndim != 2 or W.shape[0] != W.shape[1] or W.dtype.kind not in "iuf":
        raise ValueError(f"W_hh: expected a square real matrix, an RNNParams or an RNN, got shape {W.shape}")
    return W


def spectral_radius(W_hh):
    """max |λ| over the eigenvalues of W_hh (a matrix, an RNNParams or an RNN)."""
    W = _W(W_hh).astype(np.float64)
    with call_scope():          # LAPACK on one thread (the BLAS pools stay as the user set them)
        return float(np.max(np.abs(np.linalg.eigvals(W))))


def max_singular_value(W_hh):
    """The largest singular value (spectral norm) of W_hh (a matrix, an RNNParams or an RNN)."""
    W = _W(W_hh).astype(np.float64)
    with call_scope():
        return float(np.linalg.norm(W, ord=2))


def recurrent_spectrum(W_hh):
    """``{"spectral_radius": ρ, "max_singular_value": σ_max}`` of W_hh."""
    return {"spectral_radius": spectral_radius(W_hh), "max_singular_value": max_singular_value(W_hh)}
