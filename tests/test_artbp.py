"""Unbiased truncation, ``truncation=("artbp", c, seed)`` (Tallec & Ollivier 2017).

The gradient is cut at each step boundary with probability c and multiplied by
1/(1-c) where it crosses one uncut, so that its expectation is full BPTT's.
The statistical tests use fixed seeds: they are deterministic.
"""

import numpy as np
import pytest

import fastbptt
from fastbptt.engine.core import windows
from helpers import RTOL

BACKENDS = ["numpy", "numba", "cython"]
T, B, D, H, O = 24, 3, 3, 6, 2


def _problem(L=2, output="sequence"):
    rng = np.random.default_rng(5)
    params = fastbptt.RNNParams.init(D, H, O, num_layers=L, dtype=np.float64, seed=1)
    X = rng.normal(size=(T, B, D))
    Y = rng.normal(size=(T, B, O)) if output == "sequence" else rng.normal(size=(B, O))
    return params, X, Y


def _grads(params, X, Y, truncation, backend="numpy", **kw):
    return fastbptt.loss_and_grad(params, X, Y, truncation=truncation, backend=backend, **kw)[1].flatten()


@pytest.mark.parametrize("L,output,lengths", [(1, "sequence", None), (2, "sequence", None),
                                              (2, "last", None), (2, "sequence", [24, 9, 17])],
                         ids=["L1", "L2", "L2-last", "L2-lengths"])
def test_mean_gradient_converges_to_full_bptt_at_the_root_n_rate(L, output, lengths):
    params, X, Y = _problem(L, output)
    kw = dict(output=output, lengths=None if lengths is None else np.array(lengths))
    full = _grads(params, X, Y, None, **kw)
    draws = np.array([_grads(params, X, Y, ("artbp", 0.25, seed), **kw) for seed in range(1600)])
    mean, se = draws.mean(axis=0), draws.std(axis=0, ddof=1) / np.sqrt(len(draws))
    random = se > 1e-9 * np.abs(full).max()       # the head's gradient does not depend on the cuts
    z = np.abs(mean - full)[random] / se[random]
    # every component within 5 standard errors of full BPTT (a biased estimator drifts far beyond)
    assert random.sum() > 50 and z.max() < 5, f"max |z| = {z.max():.2f}"
    assert np.allclose(mean[~random], full[~random], rtol=1e-12, atol=1e-15)
    err = [np.linalg.norm(draws[:n].mean(axis=0) - full) for n in (100, 1600)]
    assert 0.1 < err[1] / err[0] < 0.5, f"16x the draws divided the error by {err[0] / err[1]:.2f}, not ~4"


def test_truncation_without_compensation_is_biased():
    """The check above can fail: k-truncation (no compensation) is far outside it."""
    params, X, Y = _problem()
    full = _grads(params, X, Y, None)
    assert np.linalg.norm(_grads(params, X, Y, 4) - full) > 0.05 * np.linalg.norm(full)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_seed_is_deterministic_and_backends_agree(backend):
    params, X, Y = _problem()
    a = _grads(params, X, Y, ("artbp", 0.3, 11), backend)
    assert np.array_equal(a, _grads(params, X, Y, ("artbp", 0.3, 11), backend))
    assert not np.array_equal(a, _grads(params, X, Y, ("artbp", 0.3, 12), backend))
    ref = _grads(params, X, Y, ("artbp", 0.3, 11), "numpy")
    assert np.max(np.abs(a - ref)) <= RTOL[np.float64] * np.max(np.abs(ref))


def test_windows_cut_with_probability_c_and_compensate():
    ends, starts, a = windows(10_000, ("artbp", 0.1, 0))
    assert a == pytest.approx(1 / 0.9)
    assert ends[-1] == 10_000 and starts[0] == 0 and np.array_equal(starts[1:], ends[:-1])
    assert abs(len(ends) - 1 - 0.1 * 9_999) < 4 * np.sqrt(9_999 * 0.1 * 0.9)


@pytest.mark.parametrize("bad", [("artbp", 0), ("artbp", 1.0), ("artbp", -0.1), ("artbp", "x"),
                                 ("artbp", 0.5, -1), ("artbp", 0.5, 1.5), ("artbp", True)])
def test_bad_artbp_settings_are_refused(bad):
    params, X, Y = _problem()
    with pytest.raises(ValueError, match="truncation: "):
        fastbptt.loss_and_grad(params, X, Y, truncation=bad)


def test_the_trainer_refuses_artbp_for_now():
    with pytest.raises(ValueError, match="truncation: .*artbp"):
        fastbptt.RNN(2, 4, 1, truncation=("artbp", 0.2, 0))
