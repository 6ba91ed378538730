"""The dispatcher that measures (fastbptt.backends._wisdom): trials, the cache file, the switches.

Learning is off for the rest of the suite (conftest.py); the ``learn`` fixture
turns it on with a cache directory of the test's own.
"""

import json
import os
import subprocess
import sys
import time
import types
import warnings

import numpy as np
import pytest

import fastbptt
from fastbptt import backends as _backends
from fastbptt._threads import call_scope, get_num_threads, team_size
from fastbptt.backends import _wisdom as W

from helpers import RTOL, make_problem, rel_err

COMPILED = [n for n in _backends.BACKENDS if n != "numpy"]


def key_args(X, params, lengths=False):
    T, B, D = X.shape
    return dict(T=T, B=B, D=D, H=params.hidden_size, layers=params.num_layers,
                dirs=2 if params.bidirectional else 1, dtype=params.dtype, lengths=lengths)


def settle(params, X, Y, max_calls=400, **kw):
    """Call loss_and_grad until its trial is over; returns the number of calls."""
    for i in range(max_calls):
        fastbptt.loss_and_grad(params, X, Y, **kw)
        if not W._trials:
            return i + 1
    raise AssertionError(f"the trial did not finish in {max_calls} calls")


def learned_entry(X, params, op="loss_and_grad"):
    key = (op, *key_args(X, params).values(), get_num_threads())
    return W.learned()[W._key_text(key)]


def _delayed(real, when):
    """A copy of backend module ``real`` whose recurrences (the forward kernel, and the whole-layer
    call of engine.fused where it has one) first sleep 4 ms whenever ``when()`` holds."""
    fake = types.ModuleType(real.__name__)
    fake.__dict__.update(vars(real))
    for kernel in ("forward_recurrence", "layer_loss_and_grad"):
        if getattr(real, kernel, None) is not None:
            def delayed(*args, _real=getattr(real, kernel), **kw):
                if when():
                    time.sleep(0.004)
                return _real(*args, **kw)
            setattr(fake, kernel, delayed)
    return fake


def slowed(name, monkeypatch):
    """Make backend ``name`` slower by 4 ms per recurrence, deterministically."""
    fake = _delayed(_backends._load(name), lambda: True)
    monkeypatch.setitem(_backends._loaded, name, fake)
    return fake


@pytest.mark.parametrize("slow", COMPILED)
def test_learning_picks_the_faster_backend(learn, monkeypatch, slow):
    slowed(slow, monkeypatch)
    params, X, Y = make_problem(6, 3, 4, 9, 2, dtype=np.float32)
    calls = settle(params, X, Y)
    entry = learned_entry(X, params)
    assert entry["backend"] != slow, entry
    candidates = len(COMPILED) * len({1, min(2, get_num_threads()), get_num_threads()})
    assert calls >= candidates * (1 + W.MIN_ROUNDS)        # a warm-up and the timed rounds each
    assert sorted(entry["median_s"]) == sorted(f"{n}/{t}" for n in COMPILED
                                               for t in {1, min(2, get_num_threads()), get_num_threads()})
    # then every call takes the winner, without a trial
    choice = W.dispatch("auto", "loss_and_grad", **key_args(X, params))
    assert type(choice) is W.Choice and choice.name == entry["backend"] and choice.threads == entry["threads"]


def test_learning_picks_the_faster_team(learn, monkeypatch):
    """A team of 2 made slow (a sleep in every call that runs on 2 threads) loses to 1 thread."""
    if get_num_threads() < 2:
        pytest.skip("needs 2 CPUs: the team sizes tried are 1 .. fastbptt.get_num_threads()")
    for name in COMPILED:
        monkeypatch.setitem(_backends._loaded, name, _delayed(_backends._load(name), lambda: team_size() > 1))
    params, X, Y = make_problem(6, 3, 4, 9, 2, dtype=np.float32)
    settle(params, X, Y)
    assert learned_entry(X, params)["threads"] == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 3, 5), (7, 1, 4, 13), (9, 5, 3, 17)], ids=["T1", "B1", "H17"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_auto_equals_the_reference_during_and_after_learning(learn, monkeypatch, dtype, shape, activation):
    T, B, D, H = shape
    params, X, Y = make_problem(T, B, D, H, 3, dtype=dtype)
    ref_loss, ref, ref_h = fastbptt.loss_and_grad(params, X, Y, activation=activation, backend="numpy")
    ran = []
    next_call = W._Trial.next_call

    def spy(trial):
        call = next_call(trial)
        ran.append((call.name, call.threads))
        return call

    monkeypatch.setattr(W._Trial, "next_call", spy)
    for i in range(400):
        value, grads, h_last = fastbptt.loss_and_grad(params, X, Y, activation=activation)
        assert value == pytest.approx(ref_loss, rel=RTOL[dtype], abs=RTOL[dtype])
        for g, r in zip(grads.arrays(), ref.arrays()):
            assert rel_err(g, r) <= RTOL[dtype]
        assert rel_err(h_last, ref_h) <= RTOL[dtype]
        if not W._trials:
            break
    assert {n for n, _ in ran} == set(COMPILED) and len(ran) == i + 1   # every candidate ran, and was right
    fastbptt.loss_and_grad(params, X, Y, activation=activation)
    assert len(ran) == i + 1                                            # settled: no more trial calls
    O_ref, Hs_ref = fastbptt.forward(params, X, backend="numpy")
    O, Hs = fastbptt.forward(params, X)
    assert rel_err(O, O_ref) <= RTOL[dtype] and rel_err(Hs, Hs_ref) <= RTOL[dtype]


def test_cache_is_written_atomically_and_read_by_a_new_process(learn, monkeypatch):
    params, X, Y = make_problem(5, 2, 3, 6, 2, dtype=np.float64)
    settle(params, X, Y)
    entry = learned_entry(X, params)
    data = json.loads(learn.read_text())
    assert data["fingerprint"] == W.fingerprint()
    assert [n for n in os.listdir(learn.parent)] == [W.FILE_NAME]       # no temporary file left

    # a new process starts with the winner: no trial
    code = ("import json, numpy as np; from fastbptt.backends import _wisdom as W; "
            f"c = W.dispatch('auto', 'loss_and_grad', T=5, B=2, D=3, H=6, layers=1, dirs=1, "
            f"dtype=np.dtype('float64'), lengths=False); "
            "print(json.dumps([type(c).__name__, c.name, c.threads]))")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ), capture_output=True,
                         text=True, timeout=120, cwd=learn.parent)    # the installed package, not the source tree
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["Choice", entry["backend"], entry["threads"]]

    # a write that fails half-way leaves the old file whole, and nothing beside it
    before = learn.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full (test)")

    monkeypatch.setattr(os, "replace", broken_replace)
    params2, X2, Y2 = make_problem(4, 2, 3, 7, 2, dtype=np.float64)
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        settle(params2, X2, Y2)
    assert learn.read_bytes() == before
    assert os.listdir(learn.parent) == [W.FILE_NAME]
    assert learned_entry(X2, params2)["threads"] >= 1        # kept in this process all the same


def test_cache_merges_what_other_processes_wrote(learn):
    params, X, Y = make_problem(5, 2, 3, 6, 2, dtype=np.float64)
    settle(params, X, Y)
    data = json.loads(learn.read_text())
    other = "loss_and_grad T=99 B=9 D=9 H=9 layers=1 dirs=1 float32 full threads=1"
    data["entries"][other] = {"backend": "numba", "threads": 1}     # another process, meanwhile
    learn.write_text(json.dumps(data))
    params2, X2, Y2 = make_problem(4, 2, 3, 7, 2, dtype=np.float64)
    settle(params2, X2, Y2)
    entries = json.loads(learn.read_text())["entries"]
    assert other in entries and len(entries) == 3


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "something else"}),
                                     json.dumps({"format": W.FORMAT, "fingerprint": {}, "entries": {
                                         "k": {"backend": "fortran", "threads": 1}}})],
                         ids=["not-json", "wrong-format", "bad-entry"])
def test_corrupt_cache_is_ignored_with_a_warning(learn, content):
    learn.write_text(content)
    params, X, Y = make_problem(5, 2, 3, 6, 2, dtype=np.float64)
    with pytest.warns(RuntimeWarning, match="is corrupt"):
        choice = W.dispatch("auto", "loss_and_grad", **key_args(X, params))
    assert isinstance(choice, W._TrialCall)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # once, not at every call
        settle(params, X, Y)
    assert json.loads(learn.read_text())["fingerprint"] == W.fingerprint()     # replaced, whole


def test_foreign_cache_is_ignored_with_a_warning(learn):
    params, X, Y = make_problem(5, 2, 3, 6, 2, dtype=np.float64)
    key = W._key_text(("loss_and_grad", *key_args(X, params).values(), get_num_threads()))
    foreign = dict(W.fingerprint(), cpu="Some Other CPU")
    learn.write_text(json.dumps({"format": W.FORMAT, "fingerprint": foreign,
                                 "entries": {key: {"backend": "numba", "threads": 1}}}))
    with pytest.warns(RuntimeWarning, match="another machine.*Some Other CPU"):
        choice = W.dispatch("auto", "loss_and_grad", **key_args(X, params))
    assert isinstance(choice, W._TrialCall)          # its entry is not taken

    # the same file with this machine's fingerprint is taken as it is
    W.forget()
    learn.write_text(json.dumps({"format": W.FORMAT, "fingerprint": W.fingerprint(),
                                 "entries": {key: {"backend": "numba", "threads": 1}}}))
    choice = W.dispatch("auto", "loss_and_grad", **key_args(X, params))
    assert (type(choice), choice.name, choice.threads) == (W.Choice, "numba", 1)


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_learning_off_takes_the_table_and_writes_nothing(learn, monkeypatch, value):
    monkeypatch.setenv("FASTBPTT_LEARN", value)
    params, X, Y = make_problem(5, 2, 3, 6, 2, dtype=np.float32)
    first = fastbptt.loss_and_grad(params, X, Y)
    for _ in range(30):
        choice = W.dispatch("auto", "loss_and_grad", **key_args(X, params))
        assert type(choice) is W.Choice and choice.threads is None
        assert choice.name == _backends._choose_auto(5, 2, 6, np.float32)
        again = fastbptt.loss_and_grad(params, X, Y)
        assert again[0] == first[0]
        for a, b in zip(again[1].arrays(), first[1].arrays()):
            np.testing.assert_array_equal(a, b)          # the same bits: reproducible
    assert not W._trials and not learn.exists()


def test_forced_backend_wins_over_learning(learn, monkeypatch):
    monkeypatch.setenv("FASTBPTT_BACKEND", "numpy")
    params, X, Y = make_problem(5, 2, 3, 6, 2, dtype=np.float64)
    for _ in range(20):
        assert W.dispatch("auto", "loss_and_grad", **key_args(X, params)).name == "numpy"
        fastbptt.loss_and_grad(params, X, Y)
    assert not W._trials and not learn.exists()
    # a named backend is never tried against others either
    monkeypatch.delenv("FASTBPTT_BACKEND")
    assert W.dispatch("numba", "loss_and_grad", **key_args(X, params)).name == "numba"
    assert not W._trials


def test_a_call_inside_another_takes_no_trial(learn):
    params, X, _ = make_problem(5, 2, 3, 6, 2, dtype=np.float64)
    with call_scope(threads=1):
        choice = W.dispatch("auto", "loss_and_grad", **key_args(X, params))
    assert type(choice) is W.Choice and not W._trials


def test_info_shows_the_cache_and_what_was_learned(learn):
    params, X, Y = make_problem(5, 2, 3, 6, 2, dtype=np.float64)
    settle(params, X, Y)
    entry = learned_entry(X, params)
    out = subprocess.run([sys.executable, "-m", "fastbptt", "info"], env=dict(os.environ),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(learn) in out.stdout and W.fingerprint()["cpu"] in out.stdout
    line = next(ln for ln in out.stdout.splitlines() if "T=5 B=2 D=3 H=6" in ln)
    assert f"{entry['backend']} on {entry['threads']} thread" in line
    info = json.loads(subprocess.run([sys.executable, "-m", "fastbptt", "info", "--json"],
                                     env=dict(os.environ), capture_output=True, text=True,
                                     timeout=120).stdout)
    assert info["dispatch"]["cache"] == str(learn) and info["dispatch"]["learning"] is True
    assert len(info["dispatch"]["learned"]) == 1


def test_fit_takes_what_was_learned_and_never_a_trial(learn, monkeypatch):
    """The trainer keeps one choice for a whole fit: the one learned for loss_and_grad at its shape."""
    T, B, D, H, O = 6, 4, 3, 5, 2
    model = fastbptt.RNN(D, H, O, batch_size=B, seed=0, dtype=np.float64)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(2 * B, T, D)), rng.normal(size=(2 * B, T, O))
    model.fit(X, Y, epochs=1)                       # nothing learned: the table's guess, no trial
    assert not W._trials and not learn.exists()
    key = W._key_text(("loss_and_grad", T, B, D, H, 1, 1, np.dtype(np.float64), False, get_num_threads()))
    learn.write_text(json.dumps({"format": W.FORMAT, "fingerprint": W.fingerprint(),
                                 "entries": {key: {"backend": "numba", "threads": 1}}}))
    W.forget()
    ran = []
    numba = _backends._load("numba")
    real = numba.forward_recurrence

    def spy(*args, **kw):
        ran.append(team_size())
        return real(*args, **kw)

    monkeypatch.setattr(numba, "forward_recurrence", spy)
    model.fit(X, Y, epochs=1)
    assert ran and set(ran) == {1} and not W._trials


def test_bench_auto_learns_in_a_cache_of_its_own(learn):
    from fastbptt.tools import bench
    params, X, Y = bench.make_problem(bench.Shape(8, 2, 3, 5), np.float32)
    r = bench.measure("auto", params, X, Y, repeats=3, budget_s=0.2, min_sample_s=0.001)
    got = r["auto"]
    assert got["backend"] in COMPILED and got["threads"] in (1, 2, get_num_threads())
    assert got["learning_calls"] >= 2 * (1 + W.MIN_ROUNDS)
    # what the trial measured, for the JSON: each candidate's median and timed calls
    assert f"{got['backend']}/{got['threads']}" in got["trial_median_s"]
    assert min(got["trial_calls"]) >= W.MIN_ROUNDS and len(got["trial_calls"]) == len(got["trial_median_s"])
    assert os.environ["FASTBPTT_CACHE_DIR"] == str(learn.parent) and not learn.exists()   # the user's: untouched
    assert not W._choices                          # and nothing of it stays in this process


def test_bench_table_compares_auto_with_the_best_backend_in_turns(learn):
    from fastbptt.tools import bench
    out = bench.run_benchmark(["8,2,3,5"], ["cython", "numba", "auto"], quick=True, repeats=3, check=False)
    cells = {c["impl"]: c for c in out["results"]}
    vs = cells["auto"]["auto_vs_best"]
    assert vs["best"] == bench.best_fastbptt(cells)["impl"] and vs["rounds"] == bench.AUTO_TURN_ROUNDS
    assert len(vs["round_ratios"]) == vs["rounds"] and vs["ratio"] == np.median(vs["round_ratios"])
    assert min(vs["round_ratios"]) <= vs["auto_median_s"] / vs["best_median_s"] <= max(vs["round_ratios"])
    assert cells["auto"]["kind"] == "auto" and cells["auto"]["auto_choice"]["backend"] in COMPILED
    assert "auto" in bench.format_table(out) and "timed in turns" in bench.format_table(out)
    assert not learn.exists() and not W._choices


def test_time_interleaved_reverses_the_order_every_other_round():
    from fastbptt.tools import bench
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    samples = bench.time_interleaved(fns, 3, min_sample_s=0)
    assert calls == list("abc") + list("abc") + list("cba") + list("abc")     # one untimed call each first
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rnn_vjp_of_a_stack_with_lengths_equals_the_reference_while_learning(learn, dtype):
    """Each operation and shape learns on its own key; the vjp runs on its forward's choice."""
    T, B, D, H = 7, 3, 4, 6
    params, X, _ = make_problem(T, B, D, H, 2, dtype=dtype, num_layers=2, bidirectional=True)
    lengths = np.array([7, 2, 5])
    rng = np.random.default_rng(1)
    d_out = rng.normal(size=(T, B, 2 * H))
    d_hn = rng.normal(size=(4, B, H))
    out_ref, hn_ref, vjp_ref = fastbptt.rnn_vjp(params, X, lengths=lengths, backend="numpy")
    grads_ref, dX_ref, dh0_ref = vjp_ref(d_out, d_hn)
    for i in range(400):
        out, hn, vjp = fastbptt.rnn_vjp(params, X, lengths=lengths)
        grads, dX, dh0 = vjp(d_out, d_hn)
        for a, b in [(out, out_ref), (hn, hn_ref), (dX, dX_ref), (dh0, dh0_ref),
                     *zip(grads.arrays(), grads_ref.arrays())]:
            assert rel_err(a, b) <= RTOL[dtype]
        if not W._trials:
            break
    assert i > 0
    (key,) = W.learned()
    assert key.startswith("rnn_vjp T=7 B=3 D=4 H=6 layers=2 dirs=2") and " lengths " in key


@pytest.mark.parametrize("seconds", [0.001, 0.05])
def test_a_short_candidate_is_timed_after_settling_calls(learn, seconds):
    """Below SETTLE_BELOW_S a visit is SETTLE_CALLS untimed calls and one timed (right after another
    candidate a team's threads are asleep); longer calls are timed at every visit."""
    W._ensure_loaded()
    key = ("loss_and_grad", 5, 1, 3, 8, 1, 1, np.float32, False, 2)
    trial = W._Trial(key, [("cython", 1), ("cython", 2)])
    W._trials[key] = trial
    try:
        pattern = []
        for _ in range(4 + 2 * (W.SETTLE_CALLS + 1) if seconds < W.SETTLE_BELOW_S else 8):
            call = trial.next_call()
            before = [len(s) for s in trial.samples]
            call.record(seconds)
            pattern.append((call.threads, [len(s) for s in trial.samples] != before))
    finally:
        W._trials.pop(key, None)
    # each candidate's first call warms it up, its second is timed
    assert pattern[:4] == [(1, False), (2, False), (1, True), (2, True)]
    if seconds < W.SETTLE_BELOW_S:
        visit = [False] * W.SETTLE_CALLS + [True]
        assert pattern[4:] == [(1, t) for t in visit] + [(2, t) for t in visit]
    else:
        assert pattern[4:8] == [(1, True), (2, True), (1, True), (2, True)]


def test_a_clearly_slower_candidate_leaves_the_trial(learn):
    """With MIN_ROUNDS timed calls each, a candidate DROP_RATIO times slower than the leader's median
    is no longer called; the trial ends as soon as one candidate is left, and that one is learned."""
    W._ensure_loaded()
    key = ("loss_and_grad", 5, 1, 3, 8, 1, 1, np.float32, False, 2)
    candidates = [("cython", 1), ("cython", 2), ("numba", 1)]
    seconds = {("cython", 1): 0.03, ("cython", 2): 0.03 * 1.2, ("numba", 1): 0.03 * W.DROP_RATIO}
    trial = W._Trial(key, candidates)
    W._trials[key] = trial
    called = []
    try:
        while key in W._trials:
            call = trial.next_call()
            called.append((call.name, call.threads))
            call.record(seconds[called[-1]])
    finally:
        W._trials.pop(key, None)
    first = len(candidates) * (1 + W.MIN_ROUNDS)         # each: a warm-up, then MIN_ROUNDS timed calls
    assert called[:first] == candidates * (1 + W.MIN_ROUNDS)
    assert ("numba", 1) not in called[first:]               # 1.3x: gone after its MIN_ROUNDS
    assert trial.alive == [True, True, False]               # 1.2x: stays until the rounds are done
    assert all(sum(s) >= W.MIN_TRIAL_S for s in trial.samples[:2]) and len(trial.samples[2]) == W.MIN_ROUNDS
    assert W._choices[key].name == "cython" and W._choices[key].threads == 1


def test_the_trial_ends_when_one_candidate_is_left(learn):
    W._ensure_loaded()
    key = ("loss_and_grad", 6, 1, 3, 8, 1, 1, np.float32, False, 2)
    candidates = [("cython", 1), ("cython", 2), ("numba", 1), ("numba", 2)]
    seconds = {("cython", 1): 0.05, ("cython", 2): 0.1, ("numba", 1): 0.2, ("numba", 2): 0.2}
    trial = W._Trial(key, candidates)
    W._trials[key] = trial
    calls = 0
    try:
        while key in W._trials:
            call = trial.next_call()
            call.record(seconds[(call.name, call.threads)])
            calls += 1
    finally:
        W._trials.pop(key, None)
    assert calls == len(candidates) * (1 + W.MIN_ROUNDS)    # all but one left at the first chance
    assert W._choices[key].name == "cython" and W._choices[key].threads == 1
