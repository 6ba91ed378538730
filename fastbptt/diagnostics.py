"""Training diagnostics: how far back the gradient reaches, and the spectrum of W_hh.

``hidden_grad_norms`` returns ‖∂L/∂h_t‖ for every step t = 0 … T under full BPTT:
δ_t collects the direct term from o_t and the term carried back from t+1,
exactly as in DESIGN.md::

    δ_t     = G_t + W_hhᵀ dz_{t+1},   dz_t = δ_t ⊙ f'(z_t)

A vanishing gradient shows as norms that fall geometrically going back from
the loss steps; an exploding one as norms that grow. The spectral radius ρ
and the largest singular value σ_max of W_hh bound that behaviour for tanh
(‖∂h_t/∂h_{t-1}‖ ≤ σ_max); ρ > 1 is necessary for explosion.

These are plain NumPy loops over the forward's states (the kernels are not
involved in the backward), meant to be run on one batch now and then, e.g.
once per epoch by ``RNN.fit(..., diagnostics=True)``.
"""

import numpy as np

from . import _validation as V
from .backends import resolve_backend
from .engine.threads import call_scope
from .engine.core import _ACT_CODES, _logits, _run_forward, windows
from .engine.losses import LOSS_FUNCS, LOSSES
from .params import RNNParams

__all__ = ["hidden_grad_norms", "spectral_radius", "max_singular_value", "recurrent_spectrum"]


def _hidden_grad_norms(kernels, params, X3, Y, h0, loss, output, act):
    """Validated core: X3 (T, B, D), Y time-major checked, h0 (B, H) or None -> (T+1,) float64.

    The backend's own backward loop (full BPTT) gives dz_t; the gradient
    reaching h_t is then δ_t = G[t] + W_hhᵀ dz_{t+1}, one GEMM for all t.
    """
    T, B, _ = X3.shape
    H = params.hidden_size
    if h0 is None:
        h0 = np.zeros((B, H), dtype=params.dtype)
    Hs = _run_forward(kernels, params, X3, h0, act)
    G = np.zeros((T, B, H), dtype=params.dtype)
    if output == "sequence":
        _, dO = LOSS_FUNCS[loss](_logits(params, Hs[1:], kernels), Y)
        G[:] = (dO.reshape(T * B, -1) @ params.W_hy).reshape(T, B, H)
    else:
        _, dO = LOSS_FUNCS[loss](_logits(params, Hs[T], kernels), Y)
        G[T - 1] = dO @ params.W_hy
    dZ = np.empty((T, B, H), dtype=params.dtype)
    ends, bp_starts = windows(T, None)
    kernels.backward_accumulate(G, Hs, np.ascontiguousarray(params.W_hh), ends, bp_starts, act, dZ)
    carried = (dZ.reshape(T * B, H) @ params.W_hh).reshape(T, B, H)   # W_hhᵀ dz_t = part of δ_{t-1}
    delta = G.astype(np.float64)                              # delta[t] = ∂L/∂h_{t+1} (0-based step t)
    delta[:-1] += carried[1:]
    norms = np.empty(T + 1, dtype=np.float64)
    norms[1:] = np.sqrt(np.einsum("tbh,tbh->t", delta, delta))
    norms[0] = np.linalg.norm(carried[0].astype(np.float64))  # ∂L/∂h_0
    return norms


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
        V.check_choice("loss", loss, LOSSES)
        V.check_choice("output", output, V.OUTPUTS)
        V.check_choice("activation", activation, V.ACTIVATIONS)
        X3, single = V.check_X(X, model)
        T, B, _ = X3.shape
        h0_ = V.check_h0(h0, model, B, single)
        Y_ = V.check_Y(Y, model, T, B, single, loss, output)
        kernels = resolve_backend(backend, T=T, B=B, H=model.hidden_size, dtype=model.dtype)
        with call_scope():
            return _hidden_grad_norms(kernels, model, X3, Y_, h0_, loss, output, _ACT_CODES[activation])
    from .estimator import RNN
    if not isinstance(model, RNN):
        raise TypeError(f"model: expected a fastbptt.RNN or RNNParams, got {type(model).__name__}")
    kind, Xt, Yt = model._check_data(X, Y)
    idx = np.arange(Xt.shape[1])
    Xb = model._batch_X(kind, Xt, idx)
    kernels = model._kernels(Xb.shape[0], Xb.shape[1])
    with call_scope():
        return _hidden_grad_norms(kernels, model.params, Xb, Yt, None, model.loss, model.output,
                                  _ACT_CODES[model.activation])


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
    return float(np.max(np.abs(np.linalg.eigvals(_W(W_hh).astype(np.float64)))))


def max_singular_value(W_hh):
    """The largest singular value (spectral norm) of W_hh (a matrix, an RNNParams or an RNN)."""
    return float(np.linalg.norm(_W(W_hh).astype(np.float64), ord=2))


def recurrent_spectrum(W_hh):
    """``{"spectral_radius": ρ, "max_singular_value": σ_max}`` of W_hh."""
    return {"spectral_radius": spectral_radius(W_hh), "max_singular_value": max_singular_value(W_hh)}
