"""Helpers shared by the test modules (importable: tests/ is on pytest's pythonpath)."""

import numpy as np

import fastbptt

RTOL = {np.float32: 2e-4, np.float64: 1e-10}      # relative to the largest entry


def rel_err(a, b):
    """max |a - b| / max |b| (b is the oracle)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.max(np.abs(b)), 1e-30)
    return float(np.max(np.abs(a - b)) / scale)


def make_problem(T, B, D, H, O, *, loss="mse", output="sequence", dtype=np.float64, seed=0,
                 single=False, scale=1.0):
    """Random params, X, Y for a shape; Y matches loss and output. single=True drops B (B must be 1)."""
    rng = np.random.default_rng(seed)
    params = fastbptt.RNNParams.init(D, H, O, dtype=dtype, seed=rng)
    if scale != 1.0:
        params.W_hh *= scale
    X = rng.normal(size=(T, B, D))
    lead = (T, B) if output == "sequence" else (B,)
    if loss == "mse":
        Y = rng.normal(size=lead + (O,))
    elif loss == "bce":
        Y = (rng.random(size=lead + (O,)) < 0.5).astype(np.float64)
    else:
        Y = rng.integers(0, O, size=lead)
    if single:
        assert B == 1
        X = X[:, 0]
        Y = Y[:, 0] if output == "sequence" else Y[0]
    return params, X, Y
