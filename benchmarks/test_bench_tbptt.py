"""Truncated-BPTT variants on the same data: throughput, gradient fidelity and what each learns.

Variants: full, k ∈ {5, 10, 25, 50}, (k1, k2) ∈ {(5, 10), (10, 20), (10, 50)}
(see DESIGN.md, "Truncation" and :mod:`fastbptt.tbptt_study`).

- ``test_gradient_throughput``: one ``loss_and_grad`` with that truncation on a
  batch of each task (group per task); ``extra_info``: time steps/s (T·B per
  second) and the cosine similarity per parameter to the full-BPTT gradient on
  the same batch and weights, at initialisation and with W_hh rescaled to
  spectral radius 1 (a stand-in for trained, stronger recurrent weights).
- ``test_learning``: ``RNN.fit`` with that truncation for the same budget of
  time steps (same epochs over the same data); ``extra_info``: validation loss
  reached, its curve, training time steps/s, and the gradient fidelity at the
  trained full-BPTT weights. One round each (it is a training run).

Run: ``pytest benchmarks/test_bench_tbptt.py --benchmark-json=tbptt.json``.
``FASTBPTT_BENCH_QUICK=1`` uses the small configuration.
"""

import os

import numpy as np
import pytest

from fastbptt.tools import tbptt_study as S
from fastbptt.params import RNNParams

CFG = S.StudyConfig.quick() if os.environ.get("FASTBPTT_BENCH_QUICK") else S.StudyConfig()
VARIANTS = list(S.VARIANTS)
IDS = [S.variant_label(v) for v in VARIANTS]

_DATA = {}


def task_data(task):
    if task not in _DATA:
        _DATA[task] = S.make_task(task, CFG)
    return _DATA[task]


def batch(task, n):
    spec, train, _ = task_data(task)
    return S._time_major(train[0][:n], train[1][:n], spec["output"], spec["D"])


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("task", S.TASKS)
def test_gradient_throughput(benchmark, task, variant, rate):
    from fastbptt import loss_and_grad

    spec, _, _ = task_data(task)
    X, Y = batch(task, CFG.batch_size)
    params = RNNParams.init(spec["D"], spec["H"], spec["O"], seed=CFG.seed)
    kw = dict(loss=spec["loss"], output=spec["output"], backend=CFG.backend)
    loss_and_grad(params, X, Y, truncation=variant, **kw)             # warm-up
    fid = {state: S.gradient_fidelity(p, X, Y, [variant], **kw)[S.variant_label(variant)]
           for state, p in (("init", params), ("rho=1", S._with_radius(params, 1.0)))}
    benchmark.group = f"tbptt throughput {task} T={spec['T']} B={X.shape[1]} H={spec['H']}"
    benchmark.extra_info.update({"variant": S.variant_label(variant), "task": task, "cosine": fid})
    benchmark(loss_and_grad, params, X, Y, truncation=variant, **kw)
    rate(benchmark, steps=X.shape[0] * X.shape[1])
    if variant is None:
        assert fid["init"]["all"] == pytest.approx(1.0)


_TRAINED = {}


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("task", S.TASKS)
def test_learning(benchmark, task, variant):
    reason = S.estimator_unavailable_reason()
    if reason:
        pytest.skip(reason)
    spec, train, val = task_data(task)
    out = {}

    def fit():
        out["res"], out["model"] = S.learn(spec, train, val, variant, CFG)

    benchmark.group = f"tbptt learning {task} ({spec['epochs']} epochs x {train[0].shape[0]} seq)"
    benchmark.pedantic(fit, rounds=1, iterations=1)
    res = out["res"]
    if variant is None:
        _TRAINED[task] = out["model"].params.copy()
    info = {"variant": S.variant_label(variant), "task": task, "val_loss": res["val_loss"],
            "val_curve": res["val_curve"], "time_steps": res["time_steps"],
            "time_steps_per_s": res["steps_per_s"]}
    trained = _TRAINED.get(task)
    if trained is not None:
        X, Y = batch(task, CFG.fidelity_batch)
        info["cosine_trained"] = S.gradient_fidelity(
            trained, X, Y, [variant], loss=spec["loss"], output=spec["output"],
            backend=CFG.backend)[S.variant_label(variant)]
        info["spectral_radius_trained"] = S.spectral_radius(trained.W_hh)
    benchmark.extra_info.update(info)
    assert np.isfinite(res["val_loss"])
