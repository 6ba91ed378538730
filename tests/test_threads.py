"""BLAS thread control: every call runs inside one limit, chosen per shape, restored after."""

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import fastbptt
from fastbptt import reference
from helpers import make_problem


def _blas_threads():
    return sorted(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")


@pytest.fixture
def spy(monkeypatch):
    seen = []
    original = reference.forward_recurrence

    def recording(*args):
        seen.append(_blas_threads())
        return original(*args)

    monkeypatch.setattr(reference, "forward_recurrence", recording)
    return seen


@pytest.mark.parametrize("T,H,expected", [(3, 8, 1), (3, 1100, 1), (40, 1100, None)])
def test_limit_by_shape_and_restored(spy, T, H, expected):
    before = _blas_threads()
    params, X, Y = make_problem(T, 2, 3, H, 2, seed=0)
    fastbptt.loss_and_grad(params, X, Y, backend="numpy")
    want = expected or fastbptt._threads._cpu_count()
    assert want == fastbptt.get_num_threads(B=2, H=H, T=T)
    assert spy and all(n == want for n in spy[0])
    assert _blas_threads() == before


def test_override(spy, monkeypatch):
    params, X, Y = make_problem(3, 2, 3, 8, 2, seed=0)
    monkeypatch.setenv("FASTBPTT_NUM_THREADS", "2")
    fastbptt.forward(params, X, backend="numpy")
    assert all(n == 2 for n in spy[-1])
    fastbptt.set_num_threads(1)
    try:
        fastbptt.forward(params, X, backend="numpy")
        assert all(n == 1 for n in spy[-1])
        assert fastbptt.get_num_threads(B=128, H=1024) == 1
    finally:
        fastbptt.set_num_threads(None)
    monkeypatch.setenv("FASTBPTT_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="FASTBPTT_NUM_THREADS.*'many'"):
        fastbptt.forward(params, X, backend="numpy")
    with pytest.raises(ValueError, match="n: expected None or an int >= 0, got -1"):
        fastbptt.set_num_threads(-1)


def test_trainer_runs_inside_one_limit(spy):
    X = np.random.default_rng(0).normal(size=(8, 5, 3))
    Y = np.random.default_rng(1).normal(size=(8, 5, 2))
    fastbptt.RNN(3, 8, 2, batch_size=4, backend="numpy", seed=0).fit(X, Y, epochs=1, progress=False)
    assert spy and all(n == [1] * len(n) for n in spy)
