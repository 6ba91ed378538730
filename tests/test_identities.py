"""Identities between truncation modes that must hold exactly (every backend)."""

import numpy as np
import pytest

import fastbptt
from helpers import make_problem, rel_err

T = 12
CASES = [("mse", "sequence"), ("bce", "sequence"), ("ce", "sequence"), ("mse", "last"), ("ce", "last")]


def _grads(backend, params, X, Y, loss, output, truncation, activation="tanh"):
    return fastbptt.loss_and_grad(params, X, Y, loss=loss, output=output, activation=activation,
                                  truncation=truncation, backend=backend)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("loss,output", CASES)
def test_truncation_identities(backend, loss, output, dtype):
    params, X, Y = make_problem(T, 3, 4, 6, 5, loss=loss, output=output, dtype=dtype, seed=4)
    l_full, g_full, h_full = _grads(backend, params, X, Y, loss, output, None)
    tol = 1e-12 if dtype == np.float64 else 1e-6

    def same(a, b):
        assert rel_err(a.flatten(), b.flatten()) <= tol

    # truncation = T (and anything larger) is full BPTT
    for k in (T, T + 5):
        same(_grads(backend, params, X, Y, loss, output, k)[1], g_full)
    # (1, k2 >= T) is full BPTT: every step is an update point reaching back to step 1
    same(_grads(backend, params, X, Y, loss, output, (1, T))[1], g_full)
    # (k, k) equals k when k divides T
    for k in (1, 3, 4, 6):
        same(_grads(backend, params, X, Y, loss, output, (k, k))[1], _grads(backend, params, X, Y, loss, output, k)[1])
    # truncation changes neither the loss, the last state nor the output-layer gradients
    for trunc in (1, 5, (2, 3), (5, 7)):
        value, g, h = _grads(backend, params, X, Y, loss, output, trunc)
        assert value == l_full
        np.testing.assert_array_equal(h, h_full)
        np.testing.assert_allclose(g.W_hy, g_full.W_hy, rtol=tol, atol=0)
        np.testing.assert_allclose(g.b_y, g_full.b_y, rtol=tol, atol=0)


def test_truncation_changes_recurrent_gradients(backend):
    """The identities above are not vacuous: a real truncation changes dW_hh."""
    params, X, Y = make_problem(T, 2, 3, 5, 2, seed=9, scale=3.0)
    g_full = _grads(backend, params, X, Y, "mse", "sequence", None)[1]
    g_k = _grads(backend, params, X, Y, "mse", "sequence", 3)[1]
    g_k1k2 = _grads(backend, params, X, Y, "mse", "sequence", (3, 5))[1]
    assert rel_err(g_k.W_hh, g_full.W_hh) > 1e-3
    assert rel_err(g_k1k2.W_hh, g_k.W_hh) > 1e-3


def test_k_differs_from_k_k_when_k_does_not_divide_T(backend):
    """k cuts at 3, 6, 9, 12 ... but (3, 3)'s last window (T=11) reaches back across the cut at 9."""
    params, X, Y = make_problem(11, 2, 3, 5, 2, seed=10, scale=3.0)
    g_k = _grads(backend, params, X, Y, "mse", "sequence", 3)[1]
    g_kk = _grads(backend, params, X, Y, "mse", "sequence", (3, 3))[1]
    assert rel_err(g_kk.W_hh, g_k.W_hh) > 1e-4
