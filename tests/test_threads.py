"""Threads: BLAS pinned to one thread inside every call, fastbptt's own team, restored after."""

import os
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info

import fastbptt
from fastbptt.backends import reference
from fastbptt import _threads
from helpers import make_problem


def _blas_threads():
    return sorted(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")


@pytest.fixture
def spy(monkeypatch):
    """Records (BLAS pool sizes, team size) each time the reference forward kernel runs."""
    seen = []
    original = reference.forward_recurrence

    def recording(*args, **kwargs):
        seen.append((_blas_threads(), _threads.team_size()))
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, "forward_recurrence", recording)
    return seen


def test_blas_pinned_to_one_inside_a_call_and_restored(spy):
    from threadpoolctl import threadpool_limits
    params, X, Y = make_problem(3, 2, 3, 8, 2, seed=0)
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        assert set(before) == {min(2, os.cpu_count())}
        fastbptt.loss_and_grad(params, X, Y, backend="numpy")
        assert _blas_threads() == before
    assert spy and all(n == 1 for n in spy[0][0])
    assert spy[0][1] == fastbptt.get_num_threads()


def test_team_size_override(spy, monkeypatch):
    params, X, Y = make_problem(3, 2, 3, 8, 2, seed=0)
    monkeypatch.setattr(_threads, "_cpu_count", lambda: 4)
    monkeypatch.setenv("FASTBPTT_NUM_THREADS", "3")
    assert fastbptt.get_num_threads() == 3
    fastbptt.forward(params, X, backend="numpy")
    assert spy[-1][1] == 3
    fastbptt.set_num_threads(1)
    try:
        fastbptt.forward(params, X, backend="numpy")
        assert spy[-1][1] == 1 and fastbptt.get_num_threads() == 1
    finally:
        fastbptt.set_num_threads(None)
    monkeypatch.delenv("FASTBPTT_NUM_THREADS")
    assert fastbptt.get_num_threads() == _threads._cpu_count()
    monkeypatch.setenv("FASTBPTT_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="FASTBPTT_NUM_THREADS.*'many'"):
        fastbptt.forward(params, X, backend="numpy")
    with pytest.raises(ValueError, match="n: expected None or an int >= 0, got -1"):
        fastbptt.set_num_threads(-1)


@pytest.mark.parametrize("bad", [2.5, "4", True, [2]])
def test_set_num_threads_refuses_nonsense(bad):
    with pytest.raises(TypeError, match="n: expected None or an int >= 0"):
        fastbptt.set_num_threads(bad)
    assert fastbptt.get_num_threads() == _threads._cpu_count()


def test_more_threads_than_cpus_are_capped_with_a_warning(monkeypatch):
    """set_num_threads(1000) once started 255 spinning threads on 2 cores (a call: 0.6 -> 160 ms)."""
    cpus = _threads._cpu_count()
    _threads._warned.clear()                        # (warned once per value and source)
    try:
        with pytest.warns(RuntimeWarning, match=f"1000 threads is more than the {cpus} CPUs"):
            fastbptt.set_num_threads(1000)
        assert fastbptt.get_num_threads() == cpus
        params, X, Y = make_problem(3, 2, 3, 8, 2, seed=0)
        fastbptt.loss_and_grad(params, X, Y)
        if "cython" in fastbptt.available_backends():
            from fastbptt.backends.cython import pool
            assert pool.workers() <= max(cpus, 1) + 2      # no team of hundreds was started
    finally:
        fastbptt.set_num_threads(None)
    monkeypatch.setenv("FASTBPTT_NUM_THREADS", str(cpus + 7))
    _threads._warned.clear()
    with pytest.warns(RuntimeWarning, match="FASTBPTT_NUM_THREADS"):
        assert fastbptt.get_num_threads() == cpus


def test_outside_a_call_the_team_is_one_and_small_phases_never_split():
    assert _threads.team_size() == 1
    with _threads.call_scope():
        n = fastbptt.get_num_threads()
        assert _threads.team_size() == n
        assert _threads.team_size(_threads.MIN_SPLIT_FLOPS - 1) == 1
        assert _threads.team_size(_threads.MIN_SPLIT_FLOPS) == n
        assert _threads.team_size(_threads.MIN_SPLIT_FLOPS_C_TEAM - 1, c_team=True) == 1
        assert _threads.team_size(_threads.MIN_SPLIT_FLOPS_C_TEAM, c_team=True) == n
        assert _threads.MIN_SPLIT_FLOPS_C_TEAM < _threads.MIN_SPLIT_FLOPS
        with _threads.call_scope():            # nested: the outer call's team
            assert _threads.team_size() == n
    assert _threads.team_size() == 1


def test_call_scope_takes_a_team_size_per_call():
    """The dispatcher's per-call choice: ``call_scope(threads=n)``; a nested scope keeps the outer team."""
    for n in (1, 2, 3):
        with _threads.call_scope(threads=n):
            assert _threads.team_size() == n and _threads.inside_call()
            assert set(_blas_threads()) == {1}
            with _threads.call_scope(threads=1 if n > 1 else 2):
                assert _threads.team_size() == n
        assert _threads.team_size() == 1 and not _threads.inside_call()
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match=f"threads: expected None or an int >= 1, got {bad!r}"):
            _threads.call_scope(threads=bad)
    assert not _threads.inside_call()


def test_trainer_runs_inside_one_scope(spy):
    X = np.random.default_rng(0).normal(size=(8, 5, 3))
    Y = np.random.default_rng(1).normal(size=(8, 5, 2))
    fastbptt.RNN(3, 8, 2, batch_size=4, backend="numpy", seed=0).fit(X, Y, epochs=1, progress=False)
    assert spy and all(blas == [1] * len(blas) for blas, _ in spy)


@pytest.mark.parametrize("n,k", [(10, 3), (2, 5), (7, 1), (1, 2), (64, 2)])
def test_parts_cover_the_range_evenly(n, k):
    ranges = _threads.parts(n, k)
    assert len(ranges) == min(n, k)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_run_returns_in_order_uses_other_threads_and_waits_on_errors():
    names = _threads.run([lambda i=i: (i, threading.current_thread().name) for i in range(3)])
    assert [i for i, _ in names] == [0, 1, 2]
    assert names[0][1] == threading.current_thread().name
    assert all(name.startswith("fastbptt") for _, name in names[1:])

    done = threading.Event()

    def slow():
        done.wait(0.05)
        done.set()
        return "slow"

    def fail():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _threads.run([fail, slow])
    state = done.is_set()           # the other task had finished, or was never started (cancelled) ...
    done.wait(0.1)
    assert done.is_set() == state   # ... but does not run on after run() raised
    with pytest.raises(RuntimeError, match="boom"):
        _threads.run([lambda: 1, fail])


def test_concurrent_calls_from_user_threads_agree_and_restore_blas():
    from threadpoolctl import threadpool_limits
    params, X, Y = make_problem(6, 4, 3, 8, 2, seed=1)
    want = fastbptt.loss_and_grad(params, X, Y, backend="numpy")[0]
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        out = [None] * 4

        def work(i):
            out[i] = [fastbptt.loss_and_grad(params, X, Y, backend="numpy")[0] for _ in range(20)]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert _blas_threads() == before
    assert all(v == want for vals in out for v in vals)


@pytest.mark.parametrize("helper", ["clip_grad_norm", "optimizer", "spectral_radius", "max_singular_value",
                                    "orthogonal_init"])
def test_helpers_run_on_the_thread_pin(helper, monkeypatch):
    """Nothing in fastbptt wakes a multi-threaded BLAS pool: each helper's BLAS/LAPACK call runs pinned."""
    from threadpoolctl import threadpool_limits
    from fastbptt import diagnostics, optim
    seen = []

    def spy(owner, name):
        original = getattr(owner, name)

        def recording(*args, **kwargs):
            seen.append(_blas_threads())
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, recording)

    params, X, Y = make_problem(3, 2, 3, 8, 2, seed=0)
    _, grads, _ = fastbptt.loss_and_grad(params, X, Y, backend="numpy")
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        if helper == "clip_grad_norm":
            spy(np.linalg, "norm")
            fastbptt.clip_grad_norm(grads, 1e-3)
        elif helper == "optimizer":         # the NumPy rules: their finiteness checks are BLAS dot products
            monkeypatch.setattr(optim, "_COMPILED", [None])
            spy(optim, "_all_finite")
            optim.Adam(1e-3).step(params, grads)
        elif helper == "spectral_radius":
            spy(np.linalg, "eigvals")
            diagnostics.spectral_radius(params)
        elif helper == "max_singular_value":
            spy(np.linalg, "norm")
            diagnostics.max_singular_value(params)
        else:
            spy(np.linalg, "qr")
            fastbptt.RNNParams.init(3, 8, 2, init="orthogonal", seed=0)
        assert _blas_threads() == before
    assert seen and all(set(s) == {1} for s in seen), seen
