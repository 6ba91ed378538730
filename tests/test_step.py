"""fastbptt.Step: the prepared training step against loss_and_grad, the trainer's update and the estimator."""

import numpy as np
import pytest

import fastbptt
from fastbptt.optim import Adagrad, Adam, SGD

from helpers import make_problem

BACKENDS = fastbptt.available_backends()
TRUNCATIONS = [None, 3, (2, 5)]


def _typed(params, X, Y, loss):
    dt = params.dtype
    X = np.ascontiguousarray(X, dtype=dt)
    Y = np.ascontiguousarray(Y) if loss == "ce" else np.ascontiguousarray(Y, dtype=dt)
    return X, Y


def _same(a, b):
    assert a[0] == b[0]
    for (name, x), y in zip(a[1].items(), b[1].arrays()):
        assert np.array_equal(x, y), name
    assert np.array_equal(a[2], b[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss,output", [("mse", "sequence"), ("bce", "sequence"), ("ce", "sequence"),
                                         ("mse", "last"), ("ce", "last")])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("truncation", TRUNCATIONS)
@pytest.mark.parametrize("shape", [(7, 3, 4, 5, 3), (1, 1, 2, 9, 2), (12, 1, 5, 13, 4)])
def test_step_equals_loss_and_grad_bit_for_bit(backend, dtype, loss, output, activation, truncation, shape):
    T, B, D, H, O = shape
    params, X, Y = make_problem(T, B, D, H, O, loss=loss, output=output, dtype=dtype, seed=T + H)
    X, Y = _typed(params, X, Y, loss)
    h0 = np.random.default_rng(1).normal(size=(B, H)).astype(dtype) * 0.5
    kw = dict(loss=loss, output=output, activation=activation, truncation=truncation, backend=backend)
    step = fastbptt.Step(params, **kw)
    want = fastbptt.loss_and_grad(params, X, Y, h0=h0, **kw)
    for _ in range(3):      # the first call checks and plans, the next ones take the fast path
        got = step.loss_and_grad(X, Y, h0)
        _same(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("structure", [dict(num_layers=2), dict(bidirectional=True),
                                       dict(num_layers=2, bidirectional=True)])
def test_step_equals_loss_and_grad_for_stacks(backend, structure):
    params, X, Y = make_problem(6, 2, 3, 5, 2, seed=4, **structure)
    X, Y = _typed(params, X, Y, "mse")
    step = fastbptt.Step(params, backend=backend)
    want = fastbptt.loss_and_grad(params, X, Y, backend=backend)
    for _ in range(2):
        _same(step.loss_and_grad(X, Y), want)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_one_sequence_and_new_shapes(loss):
    params, X, Y = make_problem(9, 1, 3, 6, 4, loss=loss, single=True, seed=2)
    X, Y = _typed(params, X, Y, loss)
    step = fastbptt.Step(params, loss=loss)
    h0 = np.full(6, 0.1)
    for _ in range(2):
        _same(step.loss_and_grad(X, Y, h0), fastbptt.loss_and_grad(params, X, Y, h0=h0, loss=loss))
    # another T, then lists and a float32 X (the checked path converts them): the same numbers
    _same(step.loss_and_grad(X[:5], Y[:5]), fastbptt.loss_and_grad(params, X[:5], Y[:5], loss=loss))
    _same(step.loss_and_grad(X.tolist(), Y.tolist()), fastbptt.loss_and_grad(params, X, Y, loss=loss))
    X32 = X.astype(np.float32)
    _same(step.loss_and_grad(X32, Y), fastbptt.loss_and_grad(params, X32, Y, loss=loss))


def _manual_update(params, optimizer, X, Y, h0, loss, clip_norm, clip_value):
    value, grads, h = fastbptt.loss_and_grad(params, X, Y, h0=h0, loss=loss)
    if clip_norm is not None:
        fastbptt.clip_grad_norm(grads, clip_norm)
    if clip_value is not None:
        fastbptt.clip_grad_value(grads, clip_value)
    optimizer.step(params, grads)
    return value, h


@pytest.mark.parametrize("make_opt", [lambda: SGD(0.1, momentum=0.9), lambda: Adam(1e-2), lambda: Adagrad(0.1)])
@pytest.mark.parametrize("clip", [(None, None), (0.05, None), (None, 1e-3), (0.5, 1e-2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_equals_the_hand_written_loop(make_opt, clip, dtype):
    params, X, Y = make_problem(20, 2, 4, 7, 5, loss="ce", dtype=dtype, seed=3)
    X, Y = _typed(params, X, Y, "ce")
    mine, theirs = params.copy(), params.copy()
    step = fastbptt.Step(mine, loss="ce", optimizer=make_opt(), clip_norm=clip[0], clip_value=clip[1])
    opt = make_opt()
    h1 = h2 = np.zeros((2, 7), dtype)
    for s in range(0, 20, 5):           # online TBPTT: chunks of 5, the state carried
        v1, h1 = step(X[s:s + 5], Y[s:s + 5], h1)
        v2, h2 = _manual_update(theirs, opt, X[s:s + 5], Y[s:s + 5], h2, "ce", *clip)
        assert v1 == v2
        assert np.array_equal(h1, h2)
    for a, b in zip(mine.arrays(), theirs.arrays()):
        assert np.array_equal(a, b)
    assert not np.array_equal(mine.W_hh, params.W_hh)


@pytest.mark.parametrize("truncation", [None, 4])
def test_update_equals_the_estimator(truncation):
    """One mini-batch, one epoch: the estimator's update points are chunks of the step."""
    N, T, D, H, O = 3, 12, 4, 6, 2
    model = fastbptt.RNN(D, H, O, optimizer="adam", lr=0.01, truncation=truncation, clip_norm=1.0,
                         batch_size=N, seed=0, dtype=np.float64)
    params = model.params.copy()
    rng = np.random.default_rng(5)
    X, Y = rng.normal(size=(N, T, D)), rng.normal(size=(N, T, O))
    model.fit(X, Y, shuffle=False, progress=False)
    step = fastbptt.Step(params, optimizer=Adam(0.01), clip_norm=1.0)
    Xt, Yt = np.ascontiguousarray(X.transpose(1, 0, 2)), np.ascontiguousarray(Y.transpose(1, 0, 2))
    k = truncation or T
    h = None
    for s in range(0, T, k):
        _, h = step(Xt[s:s + k], Yt[s:s + k], h)
    for name, a in model.params.items():
        assert np.array_equal(a, dict(params.items())[name]), name


def test_bad_arguments_name_themselves():
    params, X, Y = make_problem(4, 2, 3, 5, 2, seed=0)
    with pytest.raises(TypeError, match="params"):
        fastbptt.Step("weights")
    with pytest.raises(ValueError, match="loss"):
        fastbptt.Step(params, loss="hinge")
    with pytest.raises(TypeError, match="optimizer"):
        fastbptt.Step(params, optimizer="adam")
    with pytest.raises(ValueError, match="clip_value"):
        fastbptt.Step(params, clip_value=-1.0)
    with pytest.raises(ValueError, match="backend"):
        fastbptt.Step(params, backend="fortran")
    with pytest.raises(ValueError, match="optimizer"):
        fastbptt.Step(params)(X, Y)
    step = fastbptt.Step(params, loss="ce")
    ids = np.zeros((4, 2), dtype=np.int64)
    step.loss_and_grad(X, ids)
    with pytest.raises(ValueError, match="Y"):          # out of range: the fast path hands it to the checks
        step.loss_and_grad(X, ids + 2)
    with pytest.raises(ValueError, match="X"):
        step.loss_and_grad(X[:, :, :2], ids)
    with pytest.raises(ValueError, match="h0"):
        step.loss_and_grad(X, ids, np.zeros((3, 5)))


def test_a_diverged_update_changes_nothing():
    params, X, Y = make_problem(4, 2, 3, 5, 2, seed=0)
    X, Y = _typed(params, X, Y, "mse")
    before = params.copy()
    step = fastbptt.Step(params, optimizer=SGD(0.1))
    step(X, Y)                  # planned
    after_one = params.copy()
    X[1, 0, 0] = np.nan         # values are not checked at a planned call: the update refuses the loss
    with pytest.raises(FloatingPointError, match="Step"):
        step(X, Y)
    for a, b in zip(params.arrays(), after_one.arrays()):
        assert np.array_equal(a, b)
    assert not np.array_equal(before.W_hh, params.W_hh)


@pytest.mark.parametrize("clip_value", [None, 0.5])
def test_a_refused_update_changes_nothing_and_says_where(clip_value):
    """An update whose new values would not be finite is refused by the compiled rule (one pass
    with the check and clamp of the gradients): the message names the step's call, nothing changes."""
    params, X, Y = make_problem(4, 2, 3, 5, 2, seed=0)
    X, Y = _typed(params, X, Y, "mse")
    opt = SGD(10.0, momentum=0.9)
    step = fastbptt.Step(params, optimizer=opt, clip_value=clip_value)
    step(X, Y)
    state = opt.state_dict()
    for buf in state["buffers"]["momentum_buffer"].values():
        buf[...] = 1e308                        # p - lr·(0.9·buf + g) overflows
    opt.load_state_dict(state)
    after_one = params.copy()
    with pytest.raises(FloatingPointError, match=r"Step: at call 2: SGD.step: the update of \w+ gives non-finite"):
        step(X, Y)
    assert params == after_one and opt.step_count == 1
    assert all(np.array_equal(a, b) for a, b in zip(opt.state_dict()["buffers"]["momentum_buffer"].values(),
                                                    state["buffers"]["momentum_buffer"].values()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("truncation", [None, 5, (4, 9)])
@pytest.mark.parametrize("T,B", [(12, 2), (40, 64), (1, 1)])     # (40, 64): full BPTT in blocks of 16 steps
@pytest.mark.parametrize("loss,output", [("ce", "sequence"), ("mse", "last")])
def test_plans_equal_the_engine_the_trainer_runs(backend, truncation, T, B, loss, output):
    """loss_and_grad's plans and the engine behind the estimator and the checkpointed path: bit for bit."""
    from fastbptt.backends import resolve_backend
    from fastbptt.engine.core import ACT_CODES, windows
    from fastbptt.engine.model import loss_and_grad as engine
    from fastbptt._threads import call_scope
    from fastbptt import _validation as V
    params, X, Y = make_problem(T, B, 3, 6, 4, loss=loss, output=output, seed=9)
    X, Y = _typed(params, X, Y, loss)
    Y_ = V.check_Y(Y, params, T, B, False, loss, output)
    h0s = np.zeros((1, B, 6))
    with call_scope():
        value, grads, fwd = engine(resolve_backend(backend), params, X, Y_, h0s, loss, output,
                                   ACT_CODES["tanh"], windows(T, truncation))
        h_n = fwd.h_n
    _same(fastbptt.loss_and_grad(params, X, Y, loss=loss, output=output, truncation=truncation, backend=backend),
          (value, grads, h_n[0]))


def test_a_step_learns_with_auto(learn):
    """With learning on, a Step's calls run the dispatcher's trial and take what it learned."""
    from fastbptt.backends import _wisdom as W
    params, X, Y = make_problem(6, 3, 4, 9, 2, dtype=np.float32)
    X, Y = _typed(params, X, Y, "mse")
    step = fastbptt.Step(params)
    for _ in range(400):
        step.loss_and_grad(X, Y)
        if not W._trials:
            break
    assert not W._trials
    choice = W.dispatch("auto", "loss_and_grad", T=6, B=3, D=4, H=9, dtype=params.dtype)
    assert type(choice) is W.Choice
    _same(step.loss_and_grad(X, Y), fastbptt.loss_and_grad(params, X, Y))
