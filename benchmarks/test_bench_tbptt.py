"""Truncated-BPTT variants on the same data: throughput, gradient fidelity and what each learns.

Variants: full, k ∈ {5, 10, 25, 50}, (k1, k2) ∈ {(5, 10), (10, 20), (10, 50)}
(see DESIGN.md, "Truncation" and :mod:`fastbptt.tbptt_study`).

- ``test_gradient_throughput``: one ``loss_and_grad`` with that truncation on a
  batch of each task (group per task); ``extra_info``: time steps/s (T·B per
  second) and the cosine similarity per parameter to the full-BPTT gradient on
  the same batch and weights, at initialisation and with W_hh rescaled to
  spectral radius 1 (a stand-in for trained, stronger recurrent weights).
- ``test_learning``: one cell of the learnability experiment (``fastbptt tbptt``):
  ``RNN.fit`` with that truncation on a task whose dependency spans exactly d
  steps, IRNN, one seed, until the validation loss falls below a tenth of the
  baseline or the budget of mini-batches ends; ``extra_info``: success,
  mini-batches and optimizer steps to it, the final validation loss, wall time.
  One round each (it is a training run).

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


# the learnability experiment's cells (see fastbptt.tools.tbptt_study.LearnConfig): one seed, IRNN
LEARN = S.LearnConfig.quick(budget=200) if os.environ.get("FASTBPTT_BENCH_QUICK") else S.LearnConfig()
LEARN_D = 8 if os.environ.get("FASTBPTT_BENCH_QUICK") else 20
LEARN_VARIANTS = list(S.LEARN_VARIANTS)


@pytest.mark.parametrize("variant", LEARN_VARIANTS, ids=[S.variant_label(v) for v in LEARN_VARIANTS])
@pytest.mark.parametrize("task", S.LEARN_TASKS)
def test_learning(benchmark, task, variant):
    reason = S.estimator_unavailable_reason()
    if reason:
        pytest.skip(reason)
    out = {}

    def cell():
        out["res"] = S.learn_distance_cell(LEARN, task, "irnn", variant, LEARN_D, seed=0)

    benchmark.group = f"tbptt learning {task} irnn d={LEARN_D} (at most {LEARN.budget} mini-batches)"
    benchmark.pedantic(cell, rounds=1, iterations=1)
    res = out["res"]
    benchmark.extra_info.update({k: res[k] for k in ("variant", "task", "d", "T", "success", "batches", "steps",
                                                     "final_val", "threshold", "wall_s", "diverged")})
    assert res["diverged"] or (res["val_curve"] and np.isfinite(res["final_val"]))
