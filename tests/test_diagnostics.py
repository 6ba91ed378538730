"""Diagnostics: ‖∂L/∂h_t‖ by finite differences and torch, and the spectrum of W_hh."""

import numpy as np
import pytest

import fastbptt
from fastbptt.diagnostics import hidden_grad_norms, max_singular_value, recurrent_spectrum, spectral_radius
from fastbptt.estimator import RNN


def problem(loss="mse", output="sequence", seed=0, T=7, B=3, D=2, H=5, O=3):
    rng = np.random.default_rng(seed)
    params = fastbptt.RNNParams.init(D, H, O, dtype=np.float64, seed=seed)
    params.W_hh *= 2.0
    X = rng.normal(size=(T, B, D))
    lead = (T, B) if output == "sequence" else (B,)
    Y = rng.integers(0, O, size=lead) if loss == "ce" else rng.normal(size=lead + (O,))
    return params, X, Y


@pytest.mark.parametrize("loss,output", [("mse", "sequence"), ("ce", "last"), ("mse", "last")])
def test_initial_state_gradient_by_finite_differences(loss, output):
    params, X, Y = problem(loss, output)
    norms = hidden_grad_norms(params, X, Y, loss=loss, output=output, backend="numpy")
    assert norms.shape == (X.shape[0] + 1,)
    h0 = np.random.default_rng(1).normal(size=(3, 5)) * 0.1
    norms = hidden_grad_norms(params, X, Y, h0=h0, loss=loss, output=output, backend="numpy")
    eps = 1e-6
    fd = np.zeros_like(h0)
    for idx in np.ndindex(h0.shape):
        hp, hm = h0.copy(), h0.copy()
        hp[idx] += eps
        hm[idx] -= eps
        lp = fastbptt.loss_and_grad(params, X, Y, h0=hp, loss=loss, output=output, backend="numpy")[0]
        lm = fastbptt.loss_and_grad(params, X, Y, h0=hm, loss=loss, output=output, backend="numpy")[0]
        fd[idx] = (lp - lm) / (2 * eps)
    assert norms[0] == pytest.approx(np.linalg.norm(fd), rel=1e-6)


@pytest.mark.parametrize("loss,output", [("mse", "sequence"), ("ce", "sequence"), ("mse", "last")])
def test_matches_torch(loss, output):
    torch = pytest.importorskip("torch")
    params, X, Y = problem(loss, output)
    ours = hidden_grad_norms(params, X, Y, loss=loss, output=output, backend="numpy")
    rnn, lin = params.to_torch()
    T = X.shape[0]
    h = torch.zeros(3, 5, dtype=torch.float64, requires_grad=True)
    hs = [h]
    for t in range(T):
        h = torch.tanh(torch.tensor(X[t]) @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + h @ rnn.weight_hh_l0.T)
        h.retain_grad()
        hs.append(h)
    if output == "sequence":
        o = lin(torch.stack(hs[1:]))
        L = (torch.nn.functional.mse_loss(o, torch.tensor(Y)) if loss == "mse" else
             torch.nn.functional.cross_entropy(o.reshape(-1, 3), torch.tensor(Y).reshape(-1)))
    else:
        L = torch.nn.functional.mse_loss(lin(hs[-1]), torch.tensor(Y))
    L.backward()
    expected = [float(hh.grad.norm()) for hh in hs]
    np.testing.assert_allclose(ours, expected, rtol=1e-10)


def test_estimator_form_and_history():
    from fastbptt.datasets import delayed_echo
    X, Y = delayed_echo(8, 10, 2, seed=0)
    m = RNN(1, 6, 1, loss="bce", seed=0, backend="numpy", batch_size=4, dtype=np.float64)
    norms = hidden_grad_norms(m, X, Y)
    params_norms = hidden_grad_norms(m.params, np.swapaxes(X, 0, 1), np.swapaxes(Y, 0, 1), loss="bce",
                                     backend="numpy")
    np.testing.assert_allclose(norms, params_norms, rtol=1e-12)
    m.fit(X, Y, epochs=2, progress=False)
    m.fit(X, Y, epochs=2, progress=False, diagnostics=True)
    h = m.history_
    assert len(h["grad_norm_by_t"]) == len(h["spectral_radius"]) == len(h["loss"]) == 4
    assert h["grad_norm_by_t"][:2] == [None, None] and np.isnan(h["spectral_radius"][0])
    assert len(h["grad_norm_by_t"][3]) == 11
    assert h["spectral_radius"][3] == pytest.approx(spectral_radius(m.params.W_hh))
    np.testing.assert_allclose(h["grad_norm_by_t"][3], hidden_grad_norms(m, X[:4], Y[:4]), rtol=1e-12)


def test_spectrum():
    W = 0.5 * np.array([[0.0, -1.0], [1.0, 0.0]])            # rotation: |λ| = σ = 0.5
    assert spectral_radius(W) == pytest.approx(0.5) and max_singular_value(W) == pytest.approx(0.5)
    N = np.array([[0.0, 2.0], [0.0, 0.0]])                   # nilpotent: ρ = 0, σ = 2
    assert recurrent_spectrum(N) == {"spectral_radius": pytest.approx(0.0), "max_singular_value": pytest.approx(2.0)}
    params = fastbptt.RNNParams.init(2, 4, 1, seed=0)
    assert max_singular_value(params) >= spectral_radius(params) > 0
    with pytest.raises(ValueError, match="square"):
        spectral_radius(np.ones((2, 3)))
    with pytest.raises(TypeError, match="model"):
        hidden_grad_norms("model", None, None)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_norms_agree_across_backends(backend, activation):
    rng = np.random.default_rng(3)
    params = fastbptt.RNNParams.init(3, 9, 2, dtype=np.float64, seed=rng)
    X, Y = rng.normal(size=(12, 4, 3)), rng.normal(size=(12, 4, 2))
    ref = hidden_grad_norms(params, X, Y, activation=activation, backend="numpy")
    got = hidden_grad_norms(params, X, Y, activation=activation, backend=backend)
    np.testing.assert_allclose(got, ref, rtol=1e-10)
