"""Bad input gets a clear error naming the argument; no call mutates its inputs."""

import numpy as np
import pytest

import fastbptt
from helpers import make_problem

T, B, D, H, O = 5, 3, 4, 6, 2


@pytest.fixture
def problem():
    return make_problem(T, B, D, H, O, seed=0)


def _call(params, X, Y, **kw):
    kw.setdefault("backend", "numpy")
    return fastbptt.loss_and_grad(params, X, Y, **kw)


@pytest.mark.parametrize("kw,exc,words", [
    ({"loss": "hinge"}, ValueError, ["loss", "'mse'", "'hinge'"]),
    ({"output": "all"}, ValueError, ["output", "'sequence'", "'all'"]),
    ({"activation": "sigmoid"}, ValueError, ["activation", "'tanh'", "'sigmoid'"]),
    ({"backend": "cuda"}, ValueError, ["backend", "'numba'", "'cuda'"]),
    ({"backend": 3}, TypeError, ["backend", "int"]),
    ({"truncation": 0}, ValueError, ["truncation", "k >= 1", "0"]),
    ({"truncation": -2}, ValueError, ["truncation", "-2"]),
    ({"truncation": (3, 2)}, ValueError, ["truncation", "k1 <= k2", "(3, 2)"]),
    ({"truncation": (0, 2)}, ValueError, ["truncation", "(0, 2)"]),
    ({"truncation": (1, 2, 3)}, ValueError, ["truncation", "(1, 2, 3)"]),
    ({"truncation": 2.5}, ValueError, ["truncation", "2.5"]),
    ({"truncation": True}, ValueError, ["truncation", "True"]),
    ({"h0": np.zeros((B, H + 1))}, ValueError, ["h0", f"({B}, {H})", f"({B}, {H + 1})"]),
    ({"h0": np.full((B, H), np.nan)}, ValueError, ["h0", "finite", "nan"]),
])
def test_bad_arguments(problem, kw, exc, words):
    params, X, Y = problem
    with pytest.raises(exc) as info:
        _call(params, X, Y, **kw)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("make_X,words", [
    (lambda X: X[:, :, 0], ["X", f"D={D}", "(5, 3)"]),        # 2-D, wrong size on the last axis
    (lambda X: X[None], ["X", "(T, B, D)"]),                  # rank 4
    (lambda X: X[..., :-1], ["X", f"D={D}", "(5, 3, 3)"]),
    (lambda X: X[:0], ["X", "T >= 1"]),
    (lambda X: np.where(np.arange(D) == 1, np.inf, X), ["X", "finite", "inf"]),
    (lambda X: np.where(np.arange(D) == 2, np.nan, X), ["X", "finite", "nan"]),
])
def test_bad_X(problem, make_X, words):
    params, X, Y = problem
    with pytest.raises(ValueError) as info:
        _call(params, make_X(X), Y)
    for word in words:
        assert word in str(info.value)


def test_bad_X_dtypes(problem):
    params, X, Y = problem
    with pytest.raises(TypeError, match=r"X: expected real numbers.*complex128"):
        _call(params, X.astype(complex), Y)
    with pytest.raises(TypeError, match=r"X: expected real numbers.*<U"):
        _call(params, X.astype(str), Y)


@pytest.mark.parametrize("loss,output,bad,exc,words", [
    ("mse", "sequence", lambda Y: Y[:-1], ValueError, ["Y", f"({T}, {B}, {O})", f"({T - 1}, {B}, {O})"]),
    ("mse", "last", lambda Y: np.stack([Y] * T), ValueError, ["Y", f"({B}, {O})", "output='last'"]),
    ("mse", "sequence", lambda Y: np.where(Y > 0, np.nan, Y), ValueError, ["Y", "finite"]),
    ("bce", "sequence", lambda Y: Y * 2, ValueError, ["Y", "[0, 1]", "bce"]),
    ("ce", "sequence", lambda Y: Y + 0.5, TypeError, ["Y", "integer", "float64"]),
    ("ce", "sequence", lambda Y: Y + O, ValueError, ["Y", f"[0, {O})"]),
    ("ce", "sequence", lambda Y: -Y - 1, ValueError, ["Y", f"[0, {O})"]),
    ("ce", "last", lambda Y: Y[:, :, None], ValueError, ["Y", f"({B},)", "ce"]),
])
def test_bad_Y(loss, output, bad, exc, words):
    params, X, Y = make_problem(T, B, D, H, O, loss=loss, output=output, seed=1)
    if loss == "ce" and output == "last":
        Y = np.zeros((T, B), dtype=np.int64)        # a sequence of ids where one per row is expected
    with pytest.raises(exc) as info:
        _call(params, X, bad(Y), loss=loss, output=output)
    for word in words:
        assert word in str(info.value)


def test_bad_params():
    with pytest.raises(TypeError, match="params: expected an RNNParams, got dict"):
        fastbptt.forward({}, np.zeros((2, 3, 4)))
    p = fastbptt.RNNParams.init(4, 5, 2, dtype=np.float64, seed=0)
    with pytest.raises(TypeError, match="one dtype.*W_hh=float32"):
        fastbptt.RNNParams(p.W_xh, p.W_hh.astype(np.float32), p.b_h, p.W_hy, p.b_y)
    with pytest.raises(ValueError, match=r"W_hh: expected shape \(5, 5\).*got \(5, 4\)"):
        fastbptt.RNNParams(p.W_xh, p.W_hh[:, :4], p.b_h, p.W_hy, p.b_y)
    with pytest.raises(TypeError, match="float32 or float64, got int64"):
        fastbptt.RNNParams(*(a.astype(np.int64) for a in p.arrays()))
    with pytest.raises(ValueError, match="hidden_size: expected a positive int, got 0"):
        fastbptt.RNNParams.init(3, 0, 2)
    with pytest.raises(TypeError, match="input_size: expected a positive int, got 2.0"):
        fastbptt.RNNParams.init(2.0, 3, 2)


def test_environment_override(problem, monkeypatch):
    params, X, Y = problem
    monkeypatch.setenv("FASTBPTT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTBPTT_BACKEND.*'nonsense'"):
        fastbptt.loss_and_grad(params, X, Y)
    monkeypatch.setenv("FASTBPTT_BACKEND", "numpy")
    value, _, _ = fastbptt.loss_and_grad(params, X, Y)
    assert value == _call(params, X, Y)[0]


@pytest.mark.parametrize("backend", ["numpy", "numba", "cython"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_no_input_is_mutated(backend, dtype):
    """Neither params, X, Y nor h0 change, whatever the backend, dtype or mode."""
    for loss, output in (("mse", "sequence"), ("ce", "last"), ("bce", "sequence")):
        params, X, Y = make_problem(T, B, D, H, O, loss=loss, output=output, dtype=dtype, seed=2)
        X = X.astype(dtype)                          # already the params' dtype: no implicit copy
        if loss != "ce":
            Y = Y.astype(dtype)
        h0 = np.full((B, H), 0.25, dtype=dtype)
        before = [a.copy() for a in (*params.arrays(), X, Y, h0)]
        fastbptt.forward(params, X, h0, backend=backend)
        fastbptt.loss_and_grad(params, X, Y, h0=h0, loss=loss, output=output, truncation=(2, 3),
                               backend=backend)
        for a, b in zip((*params.arrays(), X, Y, h0), before):
            np.testing.assert_array_equal(a, b)


def test_data_converted_to_params_dtype():
    p32 = fastbptt.RNNParams.init(3, 4, 2, dtype=np.float32, seed=0)
    X = np.random.default_rng(0).normal(size=(5, 2, 3))              # float64 data
    Y = np.random.default_rng(1).normal(size=(5, 2, 2))
    value, grads, h = fastbptt.loss_and_grad(p32, X, Y, backend="numpy")
    assert grads.dtype == np.float32 and h.dtype == np.float32
    o, hs = fastbptt.forward(p32, X.astype(int), backend="numpy")
    assert o.dtype == np.float32
