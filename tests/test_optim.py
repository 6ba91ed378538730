"""Optimizers and clipping: against hand-written references of torch's rules, and torch itself."""

import math

import numpy as np
import pytest

from fastbptt.clip import clip_grad_norm, clip_grad_value
from fastbptt.params import RNNParams
from fastbptt.optim import SGD, Adagrad, Adam, RMSprop, from_state_dict, get_optimizer

N_STEPS = 12
FIELDS = RNNParams.field_names()


def make(dtype=np.float64, seed=0):
    params = RNNParams.init(3, 5, 2, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 100)
    grads = [RNNParams(*(rng.normal(size=a.shape).astype(dtype) for a in params.arrays()))
             for _ in range(N_STEPS)]
    return params, grads


# ------------------------------------------- hand-written references (torch docs' pseudo-code)

def ref_sgd(p, gs, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    p, buf = p.copy(), None
    for g in gs:
        g = g + weight_decay * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    return p


def ref_adam(p, gs, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    p = p.copy()
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(gs, start=1):
        g = g + weight_decay * p
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat = m / (1 - betas[0] ** t)
        v_hat = v / (1 - betas[1] ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def ref_rmsprop(p, gs, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0):
    p = p.copy()
    v, buf = np.zeros_like(p), np.zeros_like(p)
    for g in gs:
        v = alpha * v + (1 - alpha) * g * g
        if momentum > 0:
            buf = momentum * buf + g / (np.sqrt(v) + eps)
            p = p - lr * buf
        else:
            p = p - lr * g / (np.sqrt(v) + eps)
    return p


def ref_adagrad(p, gs, lr=1e-2, eps=1e-10):
    p = p.copy()
    s = np.zeros_like(p)
    for g in gs:
        s = s + g * g
        p = p - lr * g / (np.sqrt(s) + eps)
    return p


CASES = [
    ("sgd-plain", lambda: SGD(0.1), lambda p, gs: ref_sgd(p, gs, 0.1)),
    ("sgd-momentum", lambda: SGD(0.1, momentum=0.9), lambda p, gs: ref_sgd(p, gs, 0.1, 0.9)),
    ("sgd-nesterov-wd", lambda: SGD(0.05, momentum=0.8, nesterov=True, weight_decay=0.01),
     lambda p, gs: ref_sgd(p, gs, 0.05, 0.8, True, 0.01)),
    ("adam", lambda: Adam(), lambda p, gs: ref_adam(p, gs)),
    ("adam-custom", lambda: Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
     lambda p, gs: ref_adam(p, gs, 0.01, (0.8, 0.99), 1e-6, 0.1)),
    ("adam-beta1-small", lambda: Adam(lr=0.01, betas=(0.3, 0.9)),
     lambda p, gs: ref_adam(p, gs, 0.01, (0.3, 0.9))),
    ("rmsprop", lambda: RMSprop(), lambda p, gs: ref_rmsprop(p, gs)),
    ("rmsprop-momentum", lambda: RMSprop(lr=0.005, alpha=0.9, eps=1e-6, momentum=0.7),
     lambda p, gs: ref_rmsprop(p, gs, 0.005, 0.9, 1e-6, 0.7)),
    ("adagrad", lambda: Adagrad(), lambda p, gs: ref_adagrad(p, gs)),
    ("adagrad-custom", lambda: Adagrad(lr=0.1, eps=1e-6), lambda p, gs: ref_adagrad(p, gs, 0.1, 1e-6)),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,make_opt,ref", CASES, ids=IDS)
def test_matches_hand_reference(name, make_opt, ref):
    params, grads = make()
    start = params.copy()
    opt = make_opt()
    arrays_before = [id(a) for a in params.arrays()]
    for g in grads:
        opt.step(params, g)
    assert [id(a) for a in params.arrays()] == arrays_before     # updated in place
    assert opt.step_count == N_STEPS
    for n in FIELDS:
        expected = ref(getattr(start, n), [getattr(g, n) for g in grads])
        np.testing.assert_allclose(getattr(params, n), expected, rtol=1e-12, atol=1e-14)
    assert not start.allclose(params)


@pytest.mark.parametrize("name,make_opt,ref", CASES, ids=IDS)
def test_state_round_trip_continues_exactly(name, make_opt, ref):
    params, grads = make()
    p_split = params.copy()
    opt = make_opt()
    for g in grads:
        opt.step(params, g)
    opt1 = make_opt()
    for g in grads[:5]:
        opt1.step(p_split, g)
    state = opt1.state_dict()
    for buf in state["buffers"].values():                 # copies, not views
        for a in buf.values():
            a += 1000.0
    state = opt1.state_dict()
    opt2 = make_opt()
    opt2.load_state_dict(state)
    assert opt2.step_count == 5
    for g in grads[5:]:
        opt2.step(p_split, g)
    assert p_split == params
    rebuilt = from_state_dict(state)
    assert type(rebuilt) is type(opt1) and rebuilt.hyperparams == opt1.hyperparams


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name,make_opt,ref", CASES, ids=IDS)
def test_matches_torch(name, make_opt, ref, dtype):
    torch = pytest.importorskip("torch")
    params, grads = make(dtype)
    ours = make_opt()
    h = ours.hyperparams
    tparams = [torch.tensor(a.copy(), requires_grad=True) for a in params.arrays()]
    kind = type(ours).__name__
    if kind == "SGD":
        topt = torch.optim.SGD(tparams, lr=h["lr"], momentum=h["momentum"], nesterov=h["nesterov"],
                               weight_decay=h["weight_decay"])
    elif kind == "Adam":
        topt = torch.optim.Adam(tparams, lr=h["lr"], betas=h["betas"], eps=h["eps"],
                                weight_decay=h["weight_decay"])
    elif kind == "RMSprop":
        topt = torch.optim.RMSprop(tparams, lr=h["lr"], alpha=h["alpha"], eps=h["eps"],
                                   momentum=h["momentum"])
    else:
        topt = torch.optim.Adagrad(tparams, lr=h["lr"], eps=h["eps"])
    for g in grads:
        for t, a in zip(tparams, g.arrays()):
            t.grad = torch.tensor(a.copy())
        topt.step()
        ours.step(params, g)
    rtol, atol = (1e-11, 1e-13) if dtype == np.float64 else (2e-5, 2e-6)
    for t, a in zip(tparams, params.arrays()):
        np.testing.assert_allclose(a, t.detach().numpy(), rtol=rtol, atol=atol)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="lr"):
        SGD(-0.1)
    with pytest.raises(TypeError, match="lr"):
        Adam(lr="fast")
    with pytest.raises(ValueError, match="nesterov"):
        SGD(0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        Adam(betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="betas"):
        Adam(betas=0.9)
    with pytest.raises(TypeError, match="lr"):
        RMSprop(lr=float("nan"))
    with pytest.raises(ValueError, match="optimizer"):
        get_optimizer("adamw")
    with pytest.raises(ValueError, match="lr"):
        get_optimizer(Adam(), lr=0.1)
    assert get_optimizer("adam").lr == 1e-3 and get_optimizer("sgd").lr == 1e-2
    assert get_optimizer("RMSprop", lr=0.5).lr == 0.5


def test_step_checks_shapes_and_dtypes():
    params, grads = make()
    opt = Adam()
    with pytest.raises(TypeError, match="grads"):
        opt.step(params, [g for g in grads[0].arrays()])
    with pytest.raises(ValueError, match="grads.W_xh"):
        opt.step(params, grads[0].astype(np.float32))
    other = RNNParams.init(4, 5, 2, dtype=np.float64, seed=1)
    with pytest.raises(ValueError, match="W_xh"):
        opt.step(params, other)
    assert opt.step_count == 0
    opt.step(params, grads[0])
    small = RNNParams.init(3, 4, 2, dtype=np.float64, seed=1)
    with pytest.raises(ValueError, match="buffer"):
        opt.step(small, small.zeros_like())


def test_non_finite_update_changes_nothing():
    params, grads = make()
    opt = SGD(0.1, momentum=0.9)
    opt.step(params, grads[0])
    before, state = params.copy(), opt.state_dict()
    bad = grads[1].copy()
    bad.W_hh[0, 0] = np.inf
    with pytest.raises(FloatingPointError, match="W_hh"):
        opt.step(params, bad)
    assert params == before and opt.step_count == 1
    after = opt.state_dict()
    for n in FIELDS:
        np.testing.assert_array_equal(after["buffers"]["momentum_buffer"][n],
                                      state["buffers"]["momentum_buffer"][n])


def test_load_state_dict_validates_and_leaves_state():
    params, grads = make()
    opt = Adam(lr=0.01)
    for g in grads[:3]:
        opt.step(params, g)
    good = opt.state_dict()
    target = Adam(lr=0.02)
    for bad, exc in [
        ("nope", TypeError),
        ({**good, "name": "sgd"}, ValueError),
        ({k: v for k, v in good.items() if k != "step"}, ValueError),
        ({**good, "step": -1}, ValueError),
        ({**good, "hyperparams": {**good["hyperparams"], "lr": -1.0}}, ValueError),
        ({**good, "buffers": {**good["buffers"], "exp_avg": {"W_xh": good["buffers"]["exp_avg"]["W_xh"]}}},
         ValueError),
        ({**good, "buffers": {**good["buffers"], "exp_avg": {**good["buffers"]["exp_avg"],
                                                              "W_hh": np.full((5, 5), np.nan)}}}, ValueError),
        ({**good, "buffers": {**good["buffers"], "exp_avg": {**good["buffers"]["exp_avg"],
                                                              "W_hh": np.zeros((4, 4))}}}, ValueError),
        ({**good, "buffers": {**good["buffers"], "exp_avg": {**good["buffers"]["exp_avg"],
                                                              "W_hh": [[0.0]]}}}, TypeError),
    ]:
        with pytest.raises(exc):
            target.load_state_dict(bad)
        assert target.lr == 0.02 and target.step_count == 0
        assert target.state_dict()["buffers"] == {"exp_avg": {}, "exp_avg_sq": {}}
    target.load_state_dict(good)
    assert target.lr == 0.01 and target.step_count == 3


# ------------------------------------------------------------------------ clipping

def test_clip_grad_norm_hand_formula():
    _, grads = make()
    g = grads[0]
    total = math.sqrt(sum(float(np.sum(a * a)) for a in g.arrays()))
    orig = g.copy()
    norm = clip_grad_norm(g, total / 4)
    assert norm == pytest.approx(total, rel=1e-12)
    coef = (total / 4) / (total + 1e-6)
    for a, b in zip(g.arrays(), orig.arrays()):
        np.testing.assert_allclose(a, b * coef, rtol=1e-12)
    new_total = math.sqrt(sum(float(np.sum(a * a)) for a in g.arrays()))
    assert new_total == pytest.approx(total / 4, rel=1e-6)
    g2 = orig.copy()
    assert clip_grad_norm(g2, total * 2) == pytest.approx(total, rel=1e-12)
    assert g2 == orig                                   # below the threshold: untouched
    g3 = orig.copy()
    inf_norm = clip_grad_norm(g3, 0.5, norm_type=float("inf"))
    assert inf_norm == pytest.approx(max(np.abs(a).max() for a in orig.arrays()))
    assert max(np.abs(a).max() for a in g3.arrays()) == pytest.approx(0.5, rel=1e-5)


def test_clip_bad_input():
    _, grads = make()
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(grads[0], 0)
    with pytest.raises(TypeError, match="grads"):
        clip_grad_norm([1.0], 1.0)
    with pytest.raises(ValueError, match="clip_value"):
        clip_grad_value(grads[0], -1)


def test_clip_grad_value():
    _, grads = make()
    g = grads[0]
    orig = g.copy()
    clip_grad_value(g, 0.3)
    for a, b in zip(g.arrays(), orig.arrays()):
        np.testing.assert_array_equal(a, np.clip(b, -0.3, 0.3))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_matches_torch(dtype, max_norm):
    torch = pytest.importorskip("torch")
    _, grads = make(dtype)
    g = grads[0]
    ts = [torch.tensor(a.copy(), requires_grad=True) for a in g.arrays()]
    for t, a in zip(ts, g.arrays()):
        t.grad = torch.tensor(a.copy())
    tnorm = float(torch.nn.utils.clip_grad_norm_(ts, max_norm))
    norm = clip_grad_norm(g, max_norm)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    assert norm == pytest.approx(tnorm, rel=rtol)
    for t, a in zip(ts, g.arrays()):
        np.testing.assert_allclose(a, t.grad.numpy(), rtol=rtol, atol=1e-7)


def test_state_with_buffers_in_another_order_continues_exactly():
    params, grads = make()
    a, b = Adam(lr=0.01), Adam(lr=0.01)
    pa, pb = params.copy(), params.copy()
    for g in grads[:3]:
        a.step(pa, g)
        b.step(pb, g)
    state = b.state_dict()
    state["buffers"] = {k: dict(reversed(list(v.items()))) for k, v in state["buffers"].items()}
    c = Adam(lr=0.01)
    c.load_state_dict(state)
    for g in grads[3:]:
        a.step(pa, g)
        c.step(pb, g)
    assert pa == pb and c.step_count == a.step_count
    for k in ("exp_avg", "exp_avg_sq"):
        assert list(c.state_dict()["buffers"][k]) == list(FIELDS)        # params' order again
        for n in FIELDS:
            np.testing.assert_array_equal(c.state_dict()["buffers"][k][n], a.state_dict()["buffers"][k][n])


def test_read_only_params_are_refused_before_anything_changes():
    params, grads = make()
    params.W_hh.flags.writeable = False
    opt = SGD(0.1, momentum=0.9)
    before = params.copy()
    with pytest.raises(ValueError, match="params.W_hh is read-only"):
        opt.step(params, grads[0])
    assert params == before and opt.step_count == 0 and opt.state_dict()["buffers"]["momentum_buffer"] == {}


def _rule_levels():
    """The rules' instruction sets this CPU runs (these machines run all three)."""
    from fastbptt.backends.cython import update

    have = []
    for level in update.LEVELS:
        try:
            update._set_level(level)
            have.append(level)
        except RuntimeError:
            pass
    update._set_level("auto")
    return have


@pytest.fixture(params=_rule_levels())
def rule_level(request):
    """Each instruction set of the compiled rules in turn (the results are the same at each)."""
    from fastbptt.backends.cython import update

    update._set_level(request.param)
    yield request.param
    update._set_level("auto")


@pytest.mark.parametrize("views", [False, True], ids=["arrays", "one-buffer"])
def test_a_step_checks_again_whatever_changed_since_the_last(views):
    """A step reuses the last step's checks for the same arrays (as fastbptt.Step passes them: its
    gradients rewritten in place) and the state it left; a parameter made read-only, other arrays
    or a loaded state are checked again, and a refused step changes nothing."""
    params, (g0, g1, *_) = make()
    if views:               # (as fastbptt.RNN keeps them: views of one buffer)
        flat = np.concatenate([a.ravel() for a in params.arrays()])
        ends = np.cumsum([a.size for a in params.arrays()])
        params = RNNParams._trusted_like(params, [flat[e - a.size:e].reshape(a.shape)
                                                  for a, e in zip(params.arrays(), ends)])
        assert all(a.base is flat for a in params.arrays())
    grads = g0.copy()
    opt = Adagrad(0.1)
    opt.step(params, grads)
    for a, b in zip(grads.arrays(), g1.arrays()):
        a[...] = b
    params.W_hh.flags.writeable = False
    before, state = params.copy(), opt.state_dict()
    with pytest.raises(ValueError, match="params.W_hh is read-only"):
        opt.step(params, grads)
    assert params == before and opt.step_count == 1
    assert all(np.array_equal(a, b) for a, b in zip(opt.state_dict()["buffers"]["sum"].values(),
                                                    state["buffers"]["sum"].values()))
    params.W_hh.flags.writeable = True
    wrong = RNNParams.init(3, 4, 2, seed=1)
    with pytest.raises(ValueError, match="grads.W_xh has shape"):
        opt.step(params, wrong)
    other = Adagrad(0.1)                  # a state for another model
    other.step(wrong, wrong)
    opt.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="state loaded for another model"):
        opt.step(params, grads)
    opt.load_state_dict(state)
    opt.step(params, grads)
    opt.step(params, grads)
    ref = Adagrad(0.1)
    want, _ = make()
    for g in (g0, g1, g1):
        ref.step(want, g)
    assert all(np.array_equal(a, b) for a, b in zip(params.arrays(), want.arrays()))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name,make_opt,ref", CASES, ids=IDS)
def test_compiled_rules_equal_the_numpy_code_bit_for_bit(monkeypatch, name, make_opt, ref, dtype, rule_level):
    """The one-pass rules of backends/cython/update.pyx, at each instruction set, against each
    optimizer's NumPy code: the same parameters and buffers, bit for bit, at the first step (no
    buffers yet) and at every later one."""
    import fastbptt.optim as optim

    assert optim._compiled() is not None         # built in CI: a missing extension is a failure
    runs = []
    for compiled in (True, False):
        monkeypatch.setattr(optim, "_COMPILED", [optim._COMPILED[0] if compiled else None])
        params, grads = make(dtype)
        opt = make_opt()
        states = []
        for g in grads:
            opt.step(params, g)
            states.append([a.copy() for a in params.arrays()]
                          + [b.copy() for n in opt._buffer_names
                             for b in opt.state_dict()["buffers"].get(n, {}).values()])
        runs.append(states)
    for step, (fast, slow) in enumerate(zip(*runs), start=1):
        assert len(fast) == len(slow)
        for a, b in zip(fast, slow):
            assert a.dtype == b.dtype == dtype and np.array_equal(a, b), (name, step)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n", [0, 1, 7, 16, 1001])
def test_compiled_check_and_clamp_equal_numpy(dtype, n, rule_level):
    """update.check_clamp finds NumPy's first NaN or inf (and then clamps nothing); update.clamp is
    np.minimum then np.maximum, as check_clamp's clamp of finite values."""
    from fastbptt.optim import _compiled

    fast = _compiled()
    assert fast is not None
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 10).astype(dtype)
    if n:
        x[0] = -0.0
    assert fast.check_clamp(x.copy(), 0) == -1
    want = np.maximum(np.minimum(x, 2.5), -2.5)
    for clamp in (lambda a: fast.clamp(a, 2.5), lambda a: fast.check_clamp(a, 2.5)):
        got = x.copy()
        clamp(got)
        assert np.array_equal(got, want) and np.array_equal(np.signbit(got), np.signbit(want))
    for bad in (np.nan, np.inf, -np.inf):
        for at in sorted({n - 1, n // 2, n // 3}) if n else ():
            y = x.copy()
            y[at:] = bad
            before = y.copy()
            assert fast.check_clamp(y, 2.5) == at
            assert np.array_equal(y, before, equal_nan=True)          # nothing clamped


@pytest.mark.parametrize("where,bad", [("W_hy", np.nan), ("b_h", np.inf), ("W_xh", -np.inf)])
@pytest.mark.parametrize("clip", [2.0, None])
@pytest.mark.parametrize("make_opt", [lambda: Adagrad(0.5), lambda: SGD(0.1, momentum=0.5, weight_decay=0.1),
                                      lambda: Adam(0.1), lambda: RMSprop(0.1, momentum=0.5)],
                         ids=["adagrad", "sgd", "adam", "rmsprop"])
def test_flat_gradients_are_checked_clamped_and_stepped_as_the_arrays(make_opt, clip, where, bad, rule_level):
    """apply_step given the one array the gradients are views of (fastbptt.Step's: the compiled
    rule checks and clamps them as it reads them) takes the same steps, bit for bit, as with
    separate arrays (checked, clamped by clip_grad_value, then the step), and names a non-finite
    gradient the same way, changing nothing."""
    from fastbptt.engine.training import apply_step

    runs = []
    for use_flat in (True, False):
        params, grads = make(np.float32)
        opt = make_opt()
        for g in grads[:4]:
            flat = np.concatenate([a.ravel() for a in g.arrays()]) * 3
            views, o = [], 0
            for a in g.arrays():
                views.append(flat[o:o + a.size].reshape(a.shape))
                o += a.size
            g = RNNParams(*views)
            apply_step(params, opt, 1.0, g, clip_norm=None, lr_at=None, where="here", clip_value=clip,
                       owner="T", flat=flat if use_flat else None)
        before, state = params.copy(), opt.state_dict()
        getattr(g, where).flat[-1] = bad
        with pytest.raises(FloatingPointError, match=f"T: non-finite gradient of {where} at here"):
            apply_step(params, opt, 1.0, g, clip_norm=None, lr_at=None, where="here", clip_value=clip,
                       owner="T", flat=flat if use_flat else None)
        assert params == before and opt.step_count == 4
        assert _same_state(opt.state_dict(), state)
        runs.append((params, state))
    (p1, s1), (p2, s2) = runs
    assert all(np.array_equal(a, b) for a, b in zip(p1.arrays(), p2.arrays()))
    assert _same_state(s1, s2)


def _same_state(a, b):
    return a["step"] == b["step"] and a["buffers"].keys() == b["buffers"].keys() and all(
        a["buffers"][k].keys() == b["buffers"][k].keys()
        and all(np.array_equal(a["buffers"][k][n], b["buffers"][k][n]) for n in a["buffers"][k])
        for k in a["buffers"])


@pytest.mark.parametrize("make_opt", [lambda: SGD(0.1, momentum=0.5), lambda: Adagrad(0.1), lambda: Adam(0.1),
                                      lambda: RMSprop(0.1, momentum=0.5)])
def test_an_overflowing_compiled_rule_is_refused(make_opt):
    """The compiled rules report a non-finite value they wrote: the step is refused, nothing changes."""
    params, grads = make(np.float32)
    opt = make_opt()
    opt.step(params, grads[0])
    opt.lr = 1e38
    before, state = params.copy(), opt.state_dict()
    huge = RNNParams(*(np.full(a.shape, 3e38, np.float32) for a in params.arrays()))
    with pytest.raises(FloatingPointError, match="non-finite values in"):
        opt.step(params, huge)
    assert params == before and opt.step_count == 1
    after = opt.state_dict()["buffers"]
    assert all(np.array_equal(after[b][k], state["buffers"][b][k]) for b in after for k in after[b])


def test_compiled_parts_are_checked_before_anything_is_written():
    """The rules read the parameters from their own arrays, and commit_parts writes them back: a
    wrong array is refused by name before any write."""
    from fastbptt.optim import _compiled

    fast = _compiled()
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.float32)
    g = np.ones(10, np.float32)
    new_s, new_p = np.empty(10, np.float32), np.empty(10, np.float32)
    assert fast.adagrad((a, b), g, None, new_s, new_p, 0.5, 1e-10) == 0
    want_p = np.concatenate([a.ravel(), b]) - np.float32(0.5) / (np.float32(1.0) + np.float32(1e-10))
    assert np.array_equal(new_p, want_p)
    for bad in ((a, b[::2]), (a, b.astype(np.float64)), (a, b[:3]), (a, [0.0] * 4)):
        with pytest.raises(ValueError, match="p: expected"):
            fast.adagrad(bad, g, None, new_s, new_p, 0.5, 1e-10)
    d = {"_state": "old"}
    ro = b.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"arrays\[1\]: expected a writable array"):
        fast.commit_parts((a, ro), new_p, d, "_state", "new")
    assert d["_state"] == "old" and np.array_equal(a, np.arange(6).reshape(2, 3))
    fast.commit_parts((a, b), new_p, d, "_state", "new")
    assert d["_state"] == "new" and np.array_equal(np.concatenate([a.ravel(), b]), new_p)
