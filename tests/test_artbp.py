"""Unbiased truncation, ``truncation=("artbp", c, seed)`` (Tallec & Ollivier 2017).

The gradient is cut at each step boundary with probability c and multiplied by
1/(1-c) where it crosses one uncut, so that its expectation is full BPTT's.
The statistical tests use fixed seeds: they are deterministic.
"""

import numpy as np
import pytest

import fastbptt
from fastbptt.engine.core import windows
from helpers import RTOL, rel_err

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


# ---------------------------------------------------------------- the trainer: RNN(truncation=("artbp", c))
def _data(N, output, loss="mse", seed=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, T, D))
    if loss == "ce":
        return X, rng.integers(0, O, size=(N, T) if output == "sequence" else (N,))
    return X, rng.normal(size=(N, T, O) if output == "sequence" else (N, O))


def _model(output="sequence", loss="mse", c=0.2, seed=4, **kw):
    return fastbptt.RNN(D, H, O, loss=loss, output=output, truncation=("artbp", c), batch_size=8,
                        dtype=np.float64, seed=seed, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,output,loss,lengths", [(1, "sequence", "mse", None), (2, "sequence", "ce", None),
                                                   (1, "last", "mse", None), (2, "last", "mse", [24, 9, 17, 3]),
                                                   (1, "sequence", "mse", [5, 24, 1, 13])],
                         ids=["L1-seq", "L2-ce", "L1-last", "L2-last-lengths", "L1-seq-lengths"])
def test_the_batch_gradient_is_loss_and_grads_with_the_cuts_drawn_from_the_model(backend, L, output, loss, lengths,
                                                                                  monkeypatch):
    """One mini-batch, no parameter change between its update points (apply_step recorded instead):
    the steps' gradients, weighted by the loss terms they cover, sum to loss_and_grad's ARTBP
    gradient for the seed the model's generator gave that batch -- and each update point is a cut."""
    from fastbptt.engine import training

    B = 4 if lengths is None else len(lengths)
    X, Y = _data(B, output, loss)
    model = _model(output, loss, c=0.25, num_layers=L, backend=backend)
    model.batch_size = B
    params = model.params.copy()
    rng = np.random.default_rng()
    rng.bit_generator.state = model._rng.bit_generator.state
    seed = int(rng.integers(0, 2**63 - 1))          # the one draw of this batch (shuffle=False: no permutation)
    steps = []
    monkeypatch.setattr(training, "apply_step", lambda p, opt, value, grads, **kw: steps.append((value, grads.copy())))
    lens = None if lengths is None else np.array(lengths)
    model.fit(X, Y, lengths=lens, shuffle=False, progress=False)
    assert model.params == params                   # nothing was applied

    Xt = np.swapaxes(X, 0, 1)
    Yt = np.swapaxes(Y, 0, 1) if output == "sequence" else Y
    trunc = ("artbp", 0.25, seed)
    ref_loss, ref, _ = fastbptt.loss_and_grad(params, Xt, Yt, loss=loss, output=output, truncation=trunc,
                                              lengths=lens, backend=backend)
    points = training.update_points(T, trunc)
    weights = [training.point_weight(p, B, output, None if lens is None else np.sort(lens)[::-1])
               for p in points if training.has_step(p, T, output, lens)]
    assert len(steps) == len(weights) and len(points) > 2
    W = sum(weights)
    total = sum(g.flatten() * (w / W) for (_, g), w in zip(steps, weights))
    assert sum(v * w for (v, _), w in zip(steps, weights)) / W == pytest.approx(ref_loss, rel=RTOL[np.float64])
    assert rel_err(total, ref.flatten()) <= RTOL[np.float64]
    # other cuts give another gradient: the check can fail
    _, other, _ = fastbptt.loss_and_grad(params, Xt, Yt, loss=loss, output=output, truncation=("artbp", 0.25, seed + 1),
                                         lengths=lens, backend=backend)
    assert rel_err(total, other.flatten()) > 1e-6


def test_a_fit_is_reproducible_from_its_seed_and_resumes_exactly_after_save_and_load(tmp_path):
    X, Y = _data(40, "sequence")
    a = _model().fit(X, Y, epochs=3, progress=False)
    b = _model().fit(X, Y, epochs=3, progress=False)
    assert a.params == b.params and a.history_["loss"] == b.history_["loss"]
    assert a.optimizer_.step_count == b.optimizer_.step_count
    c = _model(seed=5)
    c.params = a.params.__class__.init(D, H, O, dtype=np.float64, seed=4)      # same start, other generator
    c.fit(X, Y, epochs=3, progress=False)
    assert c.params != a.params                     # the cuts (and shuffles) come from the seed
    # one epoch, save, load, two more: the uninterrupted fit's result
    d = _model().fit(X, Y, progress=False)
    d.save(tmp_path / "m.npz")
    e = fastbptt.RNN.load(tmp_path / "m.npz")
    assert e.truncation == ("artbp", 0.2, None)
    e.fit(X, Y, epochs=2, progress=False)
    assert e.params == a.params and e.history_["loss"] == a.history_["loss"]


def test_the_trainer_takes_a_cut_at_each_update_point_on_average():
    """c = 0.2 over 23 boundaries: about 1 + 4.6 optimizer steps a batch (5 batches, 3 epochs)."""
    X, Y = _data(40, "sequence")
    m = _model().fit(X, Y, epochs=3, progress=False)
    batches = 15
    assert abs(m.optimizer_.step_count - batches * (1 + 0.2 * 23)) < 4 * np.sqrt(batches * 23 * 0.2 * 0.8)


@pytest.mark.parametrize("bad", [("artbp", 0.2, 0), ("artbp", 0.0), ("artbp", 1.5)])
def test_the_trainer_refuses_a_seed_or_a_bad_c(bad):
    with pytest.raises(ValueError, match="truncation: "):
        fastbptt.RNN(2, 4, 1, truncation=bad)
    m = fastbptt.RNN(2, 4, 1)
    m.truncation = bad                              # as set_params would: checked again by fit
    with pytest.raises(ValueError, match="truncation: "):
        m.fit(np.zeros((2, 5, 2)), np.zeros((2, 5, 1)), progress=False)


def test_the_dask_trainer_refuses_artbp():
    pytest.importorskip("distributed")
    import fastbptt.dask as fdask

    m = fdask.RNN(2, 4, 1, truncation=("artbp", 0.2))
    with pytest.raises(ValueError, match="truncation: fastbptt.dask.RNN does not take ARTBP"):
        m.fit(np.zeros((2, 5, 2)), np.zeros((2, 5, 1)), progress=False)
