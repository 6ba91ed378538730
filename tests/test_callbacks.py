"""Watching training: callbacks, progress output, learning-rate schedules, validation inside an epoch, init."""

import io
import json
import math
import warnings

import numpy as np
import pytest

import fastbptt
from fastbptt import datasets as ds
from fastbptt import optim
from fastbptt.estimator import RNN


@pytest.fixture(autouse=True)
def quiet_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # "auto" may fall back to NumPy
        yield


def small(**kw):
    kw.setdefault("backend", "numpy")
    kw.setdefault("seed", 0)
    kw.setdefault("batch_size", 4)
    return RNN(1, 4, 1, **kw)


# --------------------------------------------------------------------------- callbacks

def test_callbacks_get_the_model_and_each_epochs_figures_after_history_holds_it():
    X, Y = ds.sine_wave(12, 10, seed=0)
    Xv, Yv = ds.sine_wave(4, 10, seed=1)
    m = small()
    m.fit(X, Y, epochs=1, progress=False)             # epochs count over every fit of the model
    seen = []

    def cb(model, logs):
        assert model is m
        assert len(model.history_["loss"]) == logs["epoch"]          # the epoch is in history_ already
        assert model.history_["loss"][-1] == logs["loss"]
        assert model.history_["val_loss"][-1] == logs["val_loss"]
        assert logs["steps"] == model.optimizer_.step_count
        seen.append(dict(logs))

    m.fit(X, Y, epochs=3, validation_data=(Xv, Yv), callbacks=[cb], progress=False)
    assert [s["epoch"] for s in seen] == [2, 3, 4]
    for s in seen:
        assert {"epoch", "loss", "val_loss", "seq_per_s", "time_s", "lr", "steps"} <= set(s)
        assert s["seq_per_s"] > 0 and s["time_s"] > 0 and s["lr"] == m.optimizer_.lr
    json.dumps(seen)                                     # plain numbers: loggable as they are
    m.fit(X, Y, callbacks=lambda model, logs: seen.append(logs["epoch"]), progress=False)    # one callable
    assert seen[-1] == 5


def test_a_callback_returning_false_stops_after_that_epoch_and_every_callback_runs():
    X, Y = ds.sine_wave(12, 10, seed=0)
    m = small()
    calls = []
    m.fit(X, Y, epochs=10, progress=False, callbacks=[
        lambda model, logs: False if logs["epoch"] == 3 else None,
        lambda model, logs: calls.append(logs["epoch"]),
    ])
    assert len(m.history_["loss"]) == 3 and calls == [1, 2, 3]
    m.fit(X, Y, epochs=2, progress=False, callbacks=[lambda model, logs: 0])     # only False stops
    assert len(m.history_["loss"]) == 5


def test_early_stopping_with_a_checkpoint_as_documented(tmp_path):
    X, Y = ds.sine_wave(16, 10, seed=0)
    Xv, Yv = ds.sine_wave(8, 10, seed=1)
    path = tmp_path / "best.npz"

    def early_stop(model, logs, best=[float("inf")], waited=[0]):
        if logs["val_loss"] < best[0] - 1e-4:
            best[0], waited[0] = logs["val_loss"], 0
            model.save(path)
        else:
            waited[0] += 1
            if waited[0] >= 2:
                return False

    m = small(optimizer="sgd", lr=1e-9)               # cannot improve: stops after 1 + 2 epochs
    m.fit(X, Y, epochs=50, validation_data=(Xv, Yv), callbacks=[early_stop], progress=False)
    assert len(m.history_["loss"]) == 3
    assert RNN.load(path).history_["loss"] == m.history_["loss"][:1]


def test_bad_callbacks_are_refused_before_anything_changes():
    X, Y = ds.sine_wave(8, 5, seed=0)
    m = small()
    p0 = m.params.copy()
    with pytest.raises(TypeError, match=r"callbacks\[1\]: expected a callable"):
        m.fit(X, Y, callbacks=[lambda m, l: None, "print"], progress=False)
    with pytest.raises(TypeError, match="callbacks: expected None or a sequence"):
        m.fit(X, Y, callbacks=3, progress=False)
    with pytest.raises(ValueError, match="validation_every: needs validation_data"):
        m.fit(X, Y, validation_every=2, progress=False)
    with pytest.raises(TypeError, match="validation_every"):
        m.fit(X, Y, validation_every=1.5, validation_data=(X, Y), progress=False)
    with pytest.raises(TypeError, match="progress"):
        m.fit(X, Y, progress="yes")
    assert m.params == p0 and m.optimizer_.step_count == 0 and m.history_["loss"] == []


def test_an_exception_in_a_callback_leaves_the_epoch_recorded():
    X, Y = ds.sine_wave(8, 5, seed=0)
    m = small()

    def boom(model, logs):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        m.fit(X, Y, epochs=3, callbacks=[boom], progress=False)
    assert len(m.history_["loss"]) == 1 and len(m.history_["seq_per_s"]) == 1
    m.fit(X, Y, progress=False)


# ---------------------------------------------------------------- validation inside epochs

def test_validation_every_n_optimizer_steps_of_a_long_stream():
    rng = np.random.default_rng(0)
    stream = rng.normal(size=(2, 60, 1))
    Xv, Yv = stream[:, :20], np.roll(stream, -1, axis=1)[:, :20]
    m = small(truncation=5, batch_size=2)               # 12 update points per epoch
    seen = []
    m.fit(stream, np.roll(stream, -1, axis=1), epochs=2, validation_data=(Xv, Yv), validation_every=4,
          stateful=True, shuffle=False, progress=False, callbacks=[lambda model, logs: seen.append(logs)])
    vs = m.history_["val_steps"]
    assert len(vs) == 2 and [s for s, _ in vs[0]] == [4, 8, 12] and [s for s, _ in vs[1]] == [16, 20, 24]
    assert vs[1][-1][1] == pytest.approx(m.history_["val_loss"][1], rel=1e-12)   # the last one: end of epoch
    assert seen[0]["val_steps"] == vs[0]
    # counted by the optimizer: over several fits (one window each) too
    m2 = small(truncation=5, batch_size=2)
    for w in range(3):
        m2.fit(stream[:, 20 * w:20 * (w + 1)], np.roll(stream, -1, axis=1)[:, 20 * w:20 * (w + 1)],
               validation_data=(Xv, Yv), validation_every=3, stateful=True, progress=False)
    assert [[s for s, _ in e] for e in m2.history_["val_steps"]] == [[3], [6], [9, 12]]
    m2.fit(stream, stream, validation_data=(Xv, Yv), progress=False)                   # and without it again
    assert m2.history_["val_steps"][-1] == [] and len({len(v) for v in m2.history_.values()}) == 1


# ------------------------------------------------------------------------------ progress

class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_terminal_shows_epoch_percent_rate_eta_then_one_line_per_epoch(monkeypatch):
    from fastbptt import _progress
    term = Terminal()
    monkeypatch.setattr(_progress, "_REDRAW_S", 0.0)
    monkeypatch.setattr("sys.stderr", term)
    X, Y = ds.sine_wave(12, 10, seed=0)
    Xv, Yv = ds.sine_wave(4, 10, seed=1)
    small().fit(X, Y, epochs=2, validation_data=(Xv, Yv))        # progress=None: a terminal -> shown
    out = term.getvalue()
    bars = [seg for seg in out.split("\r") if seg.startswith("epoch 1/2 ") and "%" in seg]
    assert bars and "seq/s" in bars[-1] and "ETA" in bars[-1] and "loss" in bars[-1]
    assert any(" 33% 4/12 seq" in b for b in bars) and any("100% 12/12 seq" in b for b in bars)
    lines = [ln.strip("\r ") for ln in out.split("\n") if ln.strip("\r ")]
    ends = [ln.split("\r")[-1] for ln in lines]
    assert ends[0].startswith("epoch 1/2: loss ") and "val_loss" in ends[0] and "seq/s" in ends[0]
    assert ends[1].startswith("epoch 2/2: loss ")


def test_progress_when_piped_prints_each_epoch_line_as_the_epoch_ends(capsys):
    X, Y = ds.sine_wave(8, 5, seed=0)
    printed = []

    def watch(model, logs):            # the epoch's line is already out when the callback runs
        printed.append(capsys.readouterr().err)

    small().fit(X, Y, epochs=3, progress=True, callbacks=[watch])
    assert [p.count("\n") for p in printed] == [1, 1, 1]
    assert all(p.startswith(f"epoch {i}/3: loss ") for i, p in enumerate(printed, 1))
    assert "\r" not in "".join(printed)                  # no bar when stderr is not a terminal
    small().fit(X, Y, progress=None)                     # not a terminal: quiet
    small().fit(X, Y, progress="bar")                    # the bar only: not a terminal, nothing
    small().fit(X, Y, progress=False)
    assert capsys.readouterr().err == ""


def test_progress_bar_only_mode_leaves_no_epoch_lines(monkeypatch):
    from fastbptt import _progress
    term = Terminal()
    monkeypatch.setattr(_progress, "_REDRAW_S", 0.0)
    X, Y = ds.sine_wave(8, 5, seed=0)
    monkeypatch.setattr("sys.stderr", term)
    small().fit(X, Y, epochs=2, progress="bar")
    out = term.getvalue()
    assert "epoch 2/2 " in out and "epoch 1/2:" not in out
    assert out.split("\r")[-1].strip() == ""           # the bar is cleared at the end


# --------------------------------------------------------------------------- schedules

def test_optimizer_lr_can_be_set_between_steps():
    params = fastbptt.RNNParams.init(2, 3, 1, dtype=np.float64, seed=0)
    grads = params._like([np.ones_like(a) for a in params.arrays()])
    opt = optim.SGD(0.1)
    opt.step(params, grads)
    before = params.copy()
    opt.lr = 0.5
    assert opt.lr == 0.5 and opt.hyperparams["lr"] == 0.5 and opt.state_dict()["hyperparams"]["lr"] == 0.5
    opt.step(params, grads)
    np.testing.assert_allclose(params.W_hh, before.W_hh - 0.5, rtol=1e-14)
    for bad, exc in [(-1.0, ValueError), (float("nan"), TypeError), ("fast", TypeError), (True, TypeError)]:
        with pytest.raises(exc, match="lr"):
            opt.lr = bad
    assert opt.lr == 0.5


@pytest.mark.parametrize("schedule,factors", [
    (optim.StepDecay(3, 0.5), [1, 1, 1, 0.5, 0.5, 0.5, 0.25]),
    (optim.CosineDecay(4, 0.2), [1, 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)), 0.6,
                                 0.2 + 0.8 * 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.2, 0.2, 0.2]),
    (optim.Warmup(2), [0.5, 1, 1, 1, 1, 1, 1]),
    (optim.Warmup(2, optim.StepDecay(2, 0.1)), [0.5, 1, 1, 1, 0.1, 0.1, 0.01]),
], ids=["step", "cosine", "warmup", "warmup-then-step"])
def test_schedules(schedule, factors):
    assert [schedule(s) for s in range(7)] == pytest.approx(factors, rel=1e-12)
    assert optim.schedule_from_config(json.loads(json.dumps(schedule.config()))) == schedule


def test_schedules_match_torch_lambdalr():
    torch = pytest.importorskip("torch")
    sched = optim.Warmup(3, optim.CosineDecay(10, 0.1))
    w = torch.nn.Parameter(torch.zeros(1))
    topt = torch.optim.SGD([w], lr=0.2)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, lambda step: sched(step))
    lrs = []
    for _ in range(15):
        lrs.append(topt.param_groups[0]["lr"])
        topt.step()
        tsched.step()
    assert lrs == pytest.approx([0.2 * sched(s) for s in range(15)], rel=1e-12)


def test_bad_schedules():
    with pytest.raises(ValueError, match="every"):
        optim.StepDecay(0)
    with pytest.raises(TypeError, match="total"):
        optim.CosineDecay(2.5)
    with pytest.raises(ValueError, match="min_factor"):
        optim.CosineDecay(10, 1.5)
    with pytest.raises(TypeError, match="then"):
        optim.Warmup(3, then=lambda s: 1.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        optim.schedule_from_config({"kind": "exponential"})
    with pytest.raises(TypeError, match="lr_schedule"):
        RNN(1, 2, 1, lr_schedule=0.5)


def test_estimator_sets_the_scheduled_lr_before_every_step_and_saves_the_schedule(tmp_path):
    X, Y = ds.sine_wave(8, 6, seed=0)
    sched = optim.Warmup(2, optim.StepDecay(3, 0.5))
    kw = dict(optimizer="sgd", lr=0.1, truncation=3, batch_size=4, dtype=np.float64, lr_schedule=sched)
    m = small(**kw)
    seen = []
    real_step = m.optimizer_.step

    def step(params, grads):
        seen.append((m.optimizer_.step_count, m.optimizer_.lr))
        real_step(params, grads)

    m.optimizer_.step = step
    m.fit(X, Y, epochs=2, shuffle=False, progress=False)
    assert [lr for _, lr in seen] == pytest.approx([0.1 * sched(s) for s, _ in seen], rel=1e-15)
    assert [s for s, _ in seen] == list(range(8))
    assert m.history_["lr"] == pytest.approx([0.1 * sched(3), 0.1 * sched(7)])
    path = tmp_path / "m.npz"
    m.optimizer_.step = real_step
    m.save(path)
    loaded = RNN.load(path)
    assert loaded.lr_schedule == sched and loaded._base_lr == 0.1
    a, b = RNN.load(path), m
    a.fit(X, Y, progress=False, shuffle=False)
    b.fit(X, Y, progress=False, shuffle=False)
    assert a.params == b.params and a.optimizer_.lr == b.optimizer_.lr


def test_a_plain_function_schedule_is_used_but_not_saved(tmp_path):
    X, Y = ds.sine_wave(8, 6, seed=0)
    m = small(optimizer="sgd", lr=0.1, lr_schedule=lambda step: 1.0 / (1 + step))
    m.fit(X, Y, epochs=2, progress=False)
    assert m.optimizer_.lr == pytest.approx(0.1 / 4)
    with pytest.warns(RuntimeWarning, match="not saved"):
        m.save(tmp_path / "m.npz")
    assert RNN.load(tmp_path / "m.npz").lr_schedule is None
    bad = small(lr_schedule=lambda step: float("nan"))
    with pytest.raises(ValueError, match="lr_schedule: expected a finite factor >= 0 at step 0"):
        bad.fit(X, Y, progress=False)
    assert bad.optimizer_.step_count == 0 and bad.history_["loss"] == []


# ------------------------------------------------------------------------------ init

@pytest.mark.parametrize("init", ["uniform", "identity", "orthogonal"])
def test_init_on_the_estimator(init, tmp_path):
    m = RNN(2, 5, 1, init=init, seed=3, num_layers=2)
    assert m.params == fastbptt.RNNParams.init(2, 5, 1, init=init, seed=3, num_layers=2)
    if init == "identity":
        assert all(np.array_equal(lay.W_hh, np.eye(5)) for lay in m.params.layers)
    if init == "orthogonal":
        W = m.params.W_hh.astype(np.float64)
        np.testing.assert_allclose(W @ W.T, np.eye(5), atol=1e-6)
    m.save(tmp_path / "m.npz")
    assert RNN.load(tmp_path / "m.npz").init == init
    with pytest.raises(ValueError, match="init: expected one of 'uniform', 'identity', 'orthogonal'"):
        RNN(2, 5, 1, init="xavier")
