"""The reference backend against central finite differences (float64).

Full BPTT is the gradient of the loss; a truncated gradient is the sum over
windows of the gradients of each window's loss terms with the state entering
the window held fixed (textbook.truncated_objectives). Both are checked
against an independent step-by-step loss (tests/textbook.py).
"""

import numpy as np
import pytest

import fastbptt
from fastbptt.engine.core import windows
from helpers import make_problem, rel_err
from textbook import finite_difference_grad, full_loss, truncated_objectives

LOSSES = ["mse", "bce", "ce"]
OUTPUTS = ["sequence", "last"]
ACTIVATIONS = ["tanh", "relu"]
# T = 7: k=3 leaves a partial chunk, k=10 >= T, (1, 10) reaches step 1
TRUNCATIONS = [None, 1, 3, 7, 10, (2, 3), (3, 3), (2, 5), (1, 10)]
FD_RTOL = 1e-6


def _check(params, X, Y, h0, loss, output, activation, truncation):
    value, grads, _ = fastbptt.loss_and_grad(
        params, X, Y, h0=h0, loss=loss, output=output, activation=activation,
        truncation=truncation, backend="numpy")
    X3 = X if X.ndim == 3 else X[:, None, :]
    Y3 = Y
    if X.ndim == 2:  # one sequence: put the B axis back for the textbook oracle
        Y3 = Y[:, None] if output == "sequence" else Y[None]
    B = X3.shape[1]
    h0_ = np.zeros((B, params.hidden_size)) if h0 is None else np.reshape(h0, (B, -1))
    assert value == pytest.approx(full_loss(params, X3, Y3, h0_, loss, output, activation), rel=1e-12)
    trunc = None if truncation is None else truncation
    fs = truncated_objectives(params, X3, Y3, h0_, loss, output, activation,
                              windows(X3.shape[0], trunc))
    expected = sum(finite_difference_grad(f, params) for f in fs)
    err = rel_err(grads.flatten(), expected)
    assert err < FD_RTOL, f"finite differences disagree: rel err {err:.2e}"


@pytest.mark.parametrize("truncation", TRUNCATIONS, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("loss", LOSSES)
def test_reference_matches_finite_differences(loss, output, activation, truncation):
    params, X, Y = make_problem(7, 3, 4, 5, 3, loss=loss, output=output, seed=11)
    h0 = np.random.default_rng(5).normal(scale=0.5, size=(3, 5))
    _check(params, X, Y, h0, loss, output, activation, truncation)


@pytest.mark.parametrize("truncation", [None, 1, (1, 2)], ids=str)
@pytest.mark.parametrize("loss", LOSSES)
def test_T1_B1_single_sequence(loss, truncation):
    params, X, Y = make_problem(1, 1, 2, 3, 4, loss=loss, seed=3, single=True)
    _check(params, X, Y, None, loss, "sequence", "tanh", truncation)


@pytest.mark.parametrize("output", OUTPUTS)
def test_single_sequence_2d_with_h0(output):
    params, X, Y = make_problem(6, 1, 3, 4, 2, loss="bce", output=output, seed=8, single=True)
    h0 = np.linspace(-0.5, 0.5, 4)
    _check(params, X, Y, h0, "bce", output, "relu", (2, 4))


def test_finite_differences_can_fail():
    """The check is sharp: a gradient perturbed by 1e-4 relative is rejected."""
    params, X, Y = make_problem(5, 2, 3, 4, 2, seed=2)
    h0 = np.zeros((2, 4))
    _, grads, _ = fastbptt.loss_and_grad(params, X, Y, backend="numpy")
    expected = finite_difference_grad(
        lambda p: full_loss(p, X, Y, h0, "mse", "sequence", "tanh"), params)
    assert rel_err(grads.flatten(), expected) < FD_RTOL
    wrong = grads.flatten()
    wrong[7] += 1e-4 * np.max(np.abs(wrong))
    assert rel_err(wrong, expected) > FD_RTOL
