"""The contract of stacked and bidirectional models, ``rnn`` and ``rnn_vjp``, beyond torch parity.

(a) central finite differences (float64) on the NumPy reference; (b) ``RNNParams``:
init schemes, shapes, names, torch conversion, structure-keeping helpers; (c) the
forward saved by ``rnn_vjp`` belongs to its ``vjp``; (d) bad input is refused with
a message naming the argument, what was expected and what was given, and nothing
is mutated; (e) the estimator with ``num_layers``, ``bidirectional`` and ``init``.
"""

import numpy as np
import pytest

import fastbptt
from fastbptt import RNN, RNNParams
from fastbptt.optim import SGD

BACKENDS = ("numpy", "numba", "cython")
# finite differences: max |analytic - fd| over max |fd| (central, eps = FD_EPS, float64)
FD_EPS = 1e-6
FD_RTOL = 1e-7
STRUCTS = [(1, False), (2, True), (3, False)]
STRUCT_IDS = ["L1", "L2-bi", "L3"]


def _n(L, bi):
    return L * (2 if bi else 1)


def _state(rng, n, B, H, single=False):
    """A random h0 in the user's shape: (B, H) for one unidirectional layer, else (n, B, H)."""
    h = rng.normal(scale=0.5, size=(n, B, H))
    h = h[0] if n == 1 else h
    return h[..., 0, :] if single else h


def _targets(rng, loss, lead, O):
    if loss == "mse":
        return rng.normal(size=lead + (O,))
    if loss == "bce":
        return (rng.random(size=lead + (O,)) < 0.5).astype(np.float64)
    return rng.integers(0, O, size=lead)


def _rel_err(got, ref):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def _central_diff(f, x):
    """∂f/∂x by central differences; ``x`` is perturbed in place and restored."""
    g = np.empty_like(x)
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + FD_EPS
        fp = f()
        flat[i] = old - FD_EPS
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * FD_EPS)
    return g


# ============================================================ (a) finite differences
@pytest.mark.parametrize("L,bi,loss,output,activation", [
    (2, True, "mse", "sequence", "tanh"),
    (2, True, "bce", "sequence", "tanh"),
    (2, True, "ce", "last", "tanh"),
    (2, True, "mse", "last", "relu"),
    (3, False, "ce", "sequence", "tanh"),
    (1, True, "mse", "sequence", "tanh"),
], ids=["L2-bi-mse", "L2-bi-bce", "L2-bi-ce-last", "L2-bi-mse-last-relu", "L3-ce", "L1-bi-mse"])
def test_loss_and_grad_matches_finite_differences(L, bi, loss, output, activation):
    T, B, D, H, O = 4, 2, 3, 3, 2
    rng = np.random.default_rng(11)
    params = RNNParams.init(D, H, O, num_layers=L, bidirectional=bi, dtype=np.float64, seed=rng)
    X = rng.normal(size=(T, B, D))
    Y = _targets(rng, loss, (T, B) if output == "sequence" else (B,), O)
    h0 = _state(rng, _n(L, bi), B, H)
    kw = dict(h0=h0, loss=loss, output=output, activation=activation, backend="numpy")
    _, grads, _ = fastbptt.loss_and_grad(params, X, Y, **kw)
    flat = params.flatten()
    fd = _central_diff(lambda: fastbptt.loss_and_grad(params.unflatten(flat), X, Y, **kw)[0], flat)
    assert grads.names() == params.names()
    assert _rel_err(grads.flatten(), fd) < FD_RTOL
    # every field on its own too (a small field's error can hide in the global max)
    for (name, g), f in zip(grads.items(), params.unflatten(fd).arrays()):
        assert _rel_err(g, f) < 1e-6, name


@pytest.mark.parametrize("L,bi,activation,single,head", [
    (2, True, "tanh", False, False),
    (3, False, "relu", False, True),
    (1, False, "tanh", False, False),
    (1, True, "tanh", True, False),
    (2, False, "tanh", True, True),
], ids=["L2-bi", "L3-relu-head", "L1", "L1-bi-2D", "L2-2D-head"])
def test_rnn_vjp_matches_finite_differences(L, bi, activation, single, head):
    """dX, dh0 and the param grads of sum(output·dO) + sum(h_n·dH), random dO and dH."""
    T, B, D, H, O = 4, 1 if single else 2, 3, 3, 2
    rng = np.random.default_rng(12)
    params = RNNParams.init(D, H, O if head else None, num_layers=L, bidirectional=bi, dtype=np.float64,
                            seed=rng)
    dirs, n = (2 if bi else 1), _n(L, bi)
    X = rng.normal(size=(T, D) if single else (T, B, D))
    h0 = _state(rng, n, B, H, single)
    out, h_n, vjp = fastbptt.rnn_vjp(params, X, h0, activation=activation, backend="numpy")
    assert out.shape == X.shape[:-1] + (dirs * H,) and h_n.shape == h0.shape
    dO, dH = rng.normal(size=out.shape), rng.normal(size=h_n.shape)
    grads, dX, dh0 = vjp(dO, dH)

    def f(p=params, x=X, h=h0):
        o, hn = fastbptt.rnn(p, x, h, activation=activation, backend="numpy")
        return float(np.sum(o * dO) + np.sum(hn * dH))

    flat = params.flatten()
    fd_p = params.unflatten(_central_diff(lambda: f(p=params.unflatten(flat)), flat))
    for (name, g), ref in zip(grads.items(), fd_p.arrays()):
        if name in ("W_hy", "b_y"):
            assert not np.any(g) and not np.any(ref), name
        else:
            assert _rel_err(g, ref) < 1e-6, name
    assert (grads.W_hy is None) == (not head)
    Xc, h0c = X.copy(), h0.copy()
    assert _rel_err(dX, _central_diff(lambda: f(x=Xc), Xc)) < 1e-6
    assert _rel_err(dh0, _central_diff(lambda: f(h=h0c), h0c)) < 1e-6


def test_rnn_vjp_without_h0_and_d_h_n_matches_finite_differences():
    """h0=None: dh0 is still the gradient at the (zero) initial state; d_h_n=None: no h_n term."""
    T, B, D, H = 3, 2, 2, 3
    rng = np.random.default_rng(13)
    params = RNNParams.init(D, H, None, num_layers=2, bidirectional=True, dtype=np.float64, seed=rng)
    X = rng.normal(size=(T, B, D))
    out, h_n, vjp = fastbptt.rnn_vjp(params, X, backend="numpy")
    dO = rng.normal(size=out.shape)
    _, dX, dh0 = vjp(dO)
    h0 = np.zeros((4, B, H))

    def f():
        return float(np.sum(fastbptt.rnn(params, X, h0, backend="numpy")[0] * dO))

    assert dh0.shape == (4, B, H) and np.any(dh0)
    assert _rel_err(dh0, _central_diff(f, h0)) < 1e-6
    assert _rel_err(dX, _central_diff(f, X)) < 1e-6


# ============================================================ (b) RNNParams
INITS = ("uniform", "identity", "orthogonal")
INIT_STRUCTS = [(1, False), (1, True), (2, False), (3, True)]
INIT_STRUCT_IDS = ["L1", "L1-bi", "L2", "L3-bi"]


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("L,bi", INIT_STRUCTS, ids=INIT_STRUCT_IDS)
def test_init_shapes_and_schemes(L, bi, init):
    D, H, O = 3, 6, 2
    p = RNNParams.init(D, H, O, num_layers=L, bidirectional=bi, init=init, dtype=np.float64, seed=4)
    dirs = 2 if bi else 1
    assert (p.num_layers, p.bidirectional, p.num_directions, p.has_head) == (L, bi, dirs, True)
    assert (p.input_size, p.hidden_size, p.output_size) == (D, H, O)
    assert len(p.layers) == L * dirs
    for i, lay in enumerate(p.layers):
        assert isinstance(lay, fastbptt.RNNLayer)
        assert lay.W_xh.shape == (H, D if i < dirs else dirs * H), i
        assert lay.W_hh.shape == (H, H) and lay.b_h.shape == (H,)
    assert p.W_hy.shape == (O, dirs * H) and p.b_y.shape == (O,)
    assert all(a.dtype == np.float64 for a in p.arrays())
    bound = 1 / np.sqrt(H)
    uniform = [lay.W_xh for lay in p.layers] + [p.W_hy, p.b_y]
    if init == "uniform":
        uniform += [a for lay in p.layers for a in (lay.W_hh, lay.b_h)]
    for a in uniform:
        assert np.all(np.abs(a) <= bound) and np.any(a)
    allu = np.concatenate([a.ravel() for a in uniform])
    assert np.abs(allu).max() > 0.8 * bound                 # spread over the range, not squeezed
    for i, lay in enumerate(p.layers):
        if init == "identity":
            np.testing.assert_array_equal(lay.W_hh, np.eye(H), err_msg=f"layer {i}")
        elif init == "orthogonal":
            np.testing.assert_allclose(lay.W_hh @ lay.W_hh.T, np.eye(H), atol=1e-12, err_msg=f"layer {i}")
            np.testing.assert_allclose(lay.W_hh.T @ lay.W_hh, np.eye(H), atol=1e-12, err_msg=f"layer {i}")
            assert not np.allclose(np.abs(lay.W_hh), np.eye(H))      # a random one, not I
        if init != "uniform":
            np.testing.assert_array_equal(lay.b_h, np.zeros(H), err_msg=f"layer {i}")
    if init == "orthogonal" and len(p.layers) > 1:              # each layer draws its own
        assert not np.allclose(p.layers[0].W_hh, p.layers[1].W_hh)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_init_is_seeded(init, dtype):
    a = RNNParams.init(3, 5, 2, num_layers=2, bidirectional=True, init=init, dtype=dtype, seed=9)
    b = RNNParams.init(3, 5, 2, num_layers=2, bidirectional=True, init=init, dtype=dtype, seed=9)
    c = RNNParams.init(3, 5, 2, num_layers=2, bidirectional=True, init=init, dtype=dtype, seed=10)
    assert a == b and a != c
    assert a.dtype == dtype and all(x.dtype == dtype for x in a.arrays())


@pytest.mark.parametrize("init", ["identity", "orthogonal"])
@pytest.mark.parametrize("L,bi", INIT_STRUCTS, ids=INIT_STRUCT_IDS)
def test_init_scheme_keeps_the_W_xh_of_uniform(L, bi, init):
    """The same seed gives the same W_xh arrays (every layer and direction) whatever ``init``."""
    u = RNNParams.init(3, 5, 2, num_layers=L, bidirectional=bi, dtype=np.float64, seed=21)
    p = RNNParams.init(3, 5, 2, num_layers=L, bidirectional=bi, init=init, dtype=np.float64, seed=21)
    for i, (a, b) in enumerate(zip(u.layers, p.layers)):
        np.testing.assert_array_equal(b.W_xh, a.W_xh, err_msg=f"W_xh of layers[{i}], init={init!r}")


@pytest.mark.parametrize("init", ["identity", "orthogonal"])
@pytest.mark.parametrize("L,bi", INIT_STRUCTS, ids=INIT_STRUCT_IDS)
def test_init_scheme_keeps_the_head_of_uniform(L, bi, init):
    """``RNNParams.init``'s docstring: "The other arrays are the same for one seed whatever init"."""
    u = RNNParams.init(3, 5, 2, num_layers=L, bidirectional=bi, dtype=np.float64, seed=21)
    p = RNNParams.init(3, 5, 2, num_layers=L, bidirectional=bi, init=init, dtype=np.float64, seed=21)
    np.testing.assert_array_equal(p.W_hy, u.W_hy, err_msg=f"W_hy, init={init!r}")
    np.testing.assert_array_equal(p.b_y, u.b_y, err_msg=f"b_y, init={init!r}")


def test_names_order_is_torchs():
    p = RNNParams.init(2, 3, 4, num_layers=2, bidirectional=True, seed=0)
    assert p.names() == ("W_xh", "W_hh", "b_h",
                         "W_xh_l0_reverse", "W_hh_l0_reverse", "b_h_l0_reverse",
                         "W_xh_l1", "W_hh_l1", "b_h_l1",
                         "W_xh_l1_reverse", "W_hh_l1_reverse", "b_h_l1_reverse",
                         "W_hy", "b_y")
    expected = [a for lay in p.layers for a in (lay.W_xh, lay.W_hh, lay.b_h)] + [p.W_hy, p.b_y]
    assert all(a is b for a, b in zip(p.arrays(), expected)) and len(p.arrays()) == len(expected)
    assert [n for n, _ in p.items()] == list(p.names())
    q = RNNParams.init(2, 3, None, num_layers=3, seed=0)
    assert q.names() == ("W_xh", "W_hh", "b_h", "W_xh_l1", "W_hh_l1", "b_h_l1", "W_xh_l2", "W_hh_l2", "b_h_l2")
    assert q.W_hy is None and q.b_y is None and not q.has_head and q.output_size is None
    assert RNNParams.init(2, 3, 4, seed=0).names() == RNNParams.field_names()


@pytest.mark.parametrize("head", [True, False], ids=["head", "no-head"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("L", [1, 2, 3])
def test_torch_round_trip_is_exact(L, bi, bias, head):
    torch = pytest.importorskip("torch")
    dirs = 2 if bi else 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(L * 8 + bi * 4 + bias * 2 + head)
        rnn = torch.nn.RNN(3, 4, num_layers=L, bias=bias, bidirectional=bi, dtype=torch.float64)
        lin = torch.nn.Linear(dirs * 4, 2, dtype=torch.float64) if head else None
    named = {k: v.detach().numpy() for k, v in rnn.named_parameters()}
    p = RNNParams.from_torch(rnn, lin)
    assert (p.num_layers, p.bidirectional, p.has_head, p.dtype) == (L, bi, head, np.float64)
    for i, lay in enumerate(p.layers):
        sfx = f"_l{i // dirs}" + ("_reverse" if i % dirs else "")
        np.testing.assert_array_equal(lay.W_xh, named["weight_ih" + sfx])
        np.testing.assert_array_equal(lay.W_hh, named["weight_hh" + sfx])
        b = named["bias_ih" + sfx] + named["bias_hh" + sfx] if bias else np.zeros(4)
        np.testing.assert_array_equal(lay.b_h, b)
    if head:
        np.testing.assert_array_equal(p.W_hy, lin.weight.detach().numpy())
        np.testing.assert_array_equal(p.b_y, lin.bias.detach().numpy())
    else:
        assert p.W_hy is None and p.b_y is None
    rnn2, lin2 = p.to_torch()
    assert (rnn2.num_layers, rnn2.bidirectional, rnn2.input_size, rnn2.hidden_size) == (L, bi, 3, 4)
    assert (lin2 is None) == (not head)
    named2 = {k: v.detach().numpy() for k, v in rnn2.named_parameters()}
    for i, lay in enumerate(p.layers):
        sfx = f"_l{i // dirs}" + ("_reverse" if i % dirs else "")
        np.testing.assert_array_equal(named2["bias_ih" + sfx], lay.b_h)
        np.testing.assert_array_equal(named2["bias_hh" + sfx], np.zeros(4))
    q = RNNParams.from_torch(rnn2, lin2)
    assert q == p                                   # bit for bit, same structure
    # the converted torch model computes what the original one does
    X = torch.from_numpy(np.random.default_rng(0).normal(size=(5, 2, 3)))
    with torch.no_grad():
        (o1, h1), (o2, h2) = rnn(X), rnn2(X)
        np.testing.assert_allclose(o2.numpy(), o1.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(h2.numpy(), h1.numpy(), rtol=1e-12, atol=1e-14)
        if head:
            np.testing.assert_allclose(lin2(o2).numpy(), lin(o1).numpy(), rtol=1e-12, atol=1e-14)


def test_from_torch_keeps_float32():
    torch = pytest.importorskip("torch")
    rnn = torch.nn.RNN(3, 4, num_layers=2, bidirectional=True)
    p = RNNParams.from_torch(rnn, torch.nn.Linear(8, 2))
    assert p.dtype == np.float32 and all(a.dtype == np.float32 for a in p.arrays())
    assert RNNParams.from_torch(*p.to_torch()) == p


@pytest.mark.parametrize("head", [True, False], ids=["head", "no-head"])
@pytest.mark.parametrize("L,bi", [(2, True), (3, False), (1, True)], ids=["L2-bi", "L3", "L1-bi"])
def test_helpers_keep_the_structure(L, bi, head):
    p = RNNParams.init(3, 4, 2 if head else None, num_layers=L, bidirectional=bi, dtype=np.float64, seed=3)

    def same_structure(q, dtype=np.float64):
        assert isinstance(q, RNNParams)
        assert (q.num_layers, q.bidirectional, q.has_head, q.names()) == (L, bi, head, p.names())
        assert [a.shape for a in q.arrays()] == [a.shape for a in p.arrays()]
        assert all(a.dtype == dtype for a in q.arrays())

    flat = p.flatten()
    assert flat.shape == (p.size,) == (sum(a.size for a in p.arrays()),)
    u = p.unflatten(flat)
    same_structure(u)
    assert u == p
    c = p.copy()
    same_structure(c)
    assert c == p
    assert not any(np.shares_memory(a, b) for a, b in zip(c.arrays(), p.arrays()))
    c.layers[-1].W_xh[0, 0] += 1                    # a deep copy
    assert c != p
    z = p.zeros_like()
    same_structure(z)
    assert not np.any(z.flatten())
    f32 = p.astype(np.float32)
    same_structure(f32, np.float32)
    np.testing.assert_allclose(f32.flatten(), flat, rtol=1e-6)
    assert f32.astype(np.float64).same_structure(p)


def test_first_layer_fields_are_those_of_layers_0():
    p = RNNParams.init(3, 4, 2, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    lay = p.layers[0]
    assert p.W_xh is lay.W_xh and p.W_hh is lay.W_hh and p.b_h is lay.b_h
    before = lay.W_hh.copy()
    p.W_hh[...] += 1
    np.testing.assert_array_equal(p.layers[0].W_hh, before + 1)
    p.W_hh *= 2                                     # an in-place operator assigns the same array back
    assert p.W_hh is p.layers[0].W_hh
    np.testing.assert_array_equal(p.layers[0].W_hh, 2 * (before + 1))
    assert p.layers[2].W_xh.shape == (4, 8) and p.W_xh.shape == (4, 3)


# ============================================================ (c) the vjp's own forward
T_, B_, D_, H_, O_ = 5, 3, 4, 5, 2


def _vjp_problem(L, bi, seed):
    rng = np.random.default_rng(seed)
    params = RNNParams.init(D_, H_, O_, num_layers=L, bidirectional=bi, dtype=np.float64, seed=rng)
    X = rng.normal(size=(T_, B_, D_))
    h0 = _state(rng, _n(L, bi), B_, H_)
    dO = rng.normal(size=(T_, B_, (2 if bi else 1) * H_))
    dH = rng.normal(size=h0.shape)
    Y = rng.normal(size=(T_, B_, O_))
    return rng, params, X, h0, dO, dH, Y


def _results(r):
    grads, dX, dh0 = r
    return [a.copy() for a in grads.arrays()] + [dX.copy(), dh0.copy()]


def _assert_bitwise(got, ref, what):
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, i)
        assert np.array_equal(a, b), f"{what}: result {i} changed"


def _mutate_params(ctx):
    for a in ctx["params"].arrays():
        a += 0.25
    ctx["params"].W_hh[...] += 1


def _optimizer_step(ctx):
    p = ctx["params"]
    rng = np.random.default_rng(5)
    g = p.unflatten(rng.normal(size=p.size))
    opt = SGD(lr=0.3, momentum=0.9)
    opt.step(p, g)
    opt.step(p, g)


def _mutate_X_h0(ctx):
    ctx["X"] += 1.0
    ctx["h0"][...] = 3.0


def _mutate_returned(ctx):
    ctx["out"][...] = 7.0
    ctx["h_n"][...] = -7.0


def _other_calls_same_shapes(ctx):
    p, X, h0, be = ctx["params"], ctx["X"] * 2, ctx["h0"] * -1, ctx["backend"]
    fastbptt.forward(p, X, h0, backend=be)
    fastbptt.loss_and_grad(p, X, ctx["Y"], h0=h0, backend=be)
    if not p.bidirectional:
        fastbptt.loss_and_grad(p, X, ctx["Y"], h0=h0, truncation=(2, 3), backend=be)
    fastbptt.rnn(p, X, h0, activation="relu", backend=be)
    _, _, vjp2 = fastbptt.rnn_vjp(p, X, h0, backend=be)
    vjp2(ctx["dO"] * 3, ctx["dH"] * 3)


def _other_calls_other_shapes(ctx):
    be = ctx["backend"]
    rng = np.random.default_rng(6)
    for L, bi, T, B in [(2, True, 9, 4), (3, False, 2, 1), (1, False, 7, 5)]:
        p = RNNParams.init(D_, H_ + 2, O_, num_layers=L, bidirectional=bi, dtype=np.float64, seed=rng)
        X = rng.normal(size=(T, B, D_))
        out, h_n, vjp2 = fastbptt.rnn_vjp(p, X, backend=be)
        vjp2(rng.normal(size=out.shape), rng.normal(size=h_n.shape))
        fastbptt.loss_and_grad(p, X, rng.normal(size=(T, B, O_)), backend=be)
        fastbptt.forward(p, X, backend=be)


def _modify_vjp_results(ctx):
    grads, dX, dh0 = ctx["vjp"](ctx["dO"], ctx["dH"])
    for a in grads.arrays():
        a += 1.0
    dX += 1.0
    dh0 += 1.0


def _everything(ctx):
    for m in (_mutate_returned, _modify_vjp_results, _optimizer_step, _mutate_params, _mutate_X_h0,
              _other_calls_same_shapes, _other_calls_other_shapes):
        m(ctx)


MUTATIONS = {"params in place": _mutate_params, "optimizer step": _optimizer_step,
             "X and h0 in place": _mutate_X_h0, "returned output and h_n": _mutate_returned,
             "other calls, same shapes": _other_calls_same_shapes,
             "other calls, other shapes": _other_calls_other_shapes,
             "vjp's results modified": _modify_vjp_results, "all of them": _everything}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutation", list(MUTATIONS))
@pytest.mark.parametrize("L,bi", STRUCTS, ids=STRUCT_IDS)
def test_vjp_keeps_its_own_forward(L, bi, mutation, backend):
    _, params, X, h0, dO, dH, Y = _vjp_problem(L, bi, seed=31)
    # the oracle: the same call on pristine copies, never disturbed
    o_ref, hn_ref, vjp_ref = fastbptt.rnn_vjp(params.copy(), X.copy(), h0.copy(), backend=backend)
    ref = _results(vjp_ref(dO, dH))
    out, h_n, vjp = fastbptt.rnn_vjp(params, X, h0, backend=backend)
    _, _, vjp_unused = fastbptt.rnn_vjp(params, X, h0, backend=backend)   # first called after the changes
    np.testing.assert_array_equal(out, o_ref)
    np.testing.assert_array_equal(h_n, hn_ref)
    first = _results(vjp(dO, dH))
    _assert_bitwise(first, ref, "before")
    dO0, dH0 = dO.copy(), dH.copy()
    ctx = dict(params=params, X=X, h0=h0, out=out, h_n=h_n, dO=dO, dH=dH, Y=Y, backend=backend, vjp=vjp)
    MUTATIONS[mutation](ctx)
    _assert_bitwise(_results(vjp(dO, dH)), ref, f"after {mutation}")
    _assert_bitwise(_results(vjp(dO, dH)), ref, f"called again after {mutation}")
    _assert_bitwise(_results(vjp_unused(dO, dH)), ref, f"first call after {mutation}")
    np.testing.assert_array_equal(dO, dO0)          # vjp reads its arguments only
    np.testing.assert_array_equal(dH, dH0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vjp_twice_same_results_and_d_h_n_none(backend):
    _, params, X, h0, dO, dH, _ = _vjp_problem(2, True, seed=32)
    _, _, vjp = fastbptt.rnn_vjp(params, X, h0, backend=backend)
    a, b = _results(vjp(dO)), _results(vjp(dO, None))
    _assert_bitwise(b, a, "d_h_n=None twice")
    c = _results(vjp(dO, np.zeros_like(dH)))
    for x, y in zip(c, a):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-15)       # None means zero
    d = _results(vjp(dO, dH))
    assert not np.allclose(d[-1], a[-1])            # and d_h_n does count (the test can fail)


# ============================================================ (d) bad input
def _arrays(objs):
    out = []
    for o in objs:
        if isinstance(o, RNNParams):
            out += list(o.arrays())
        elif isinstance(o, np.ndarray):
            out.append(o)
        elif isinstance(o, (list, tuple)):
            out += _arrays(o)
    return out


def _refused(exc, fragments, call, *inputs):
    """``call()`` raises ``exc`` whose message holds every fragment; no array of ``inputs`` changed."""
    before = [a.copy() for a in _arrays(inputs)]
    with pytest.raises(exc) as info:
        call()
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in the message {msg!r}"
    after = _arrays(inputs)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), "an input was mutated"
    return msg


@pytest.mark.parametrize("fn", ["forward", "loss_and_grad", "rnn", "rnn_vjp"])
@pytest.mark.parametrize("L,bi", [(2, False), (1, True), (2, True)], ids=["L2", "L1-bi", "L2-bi"])
def test_h0_of_a_stack_must_have_its_shape(L, bi, fn):
    rng = np.random.default_rng(41)
    T, B, D, H, O = 4, 3, 2, 5, 2
    p = RNNParams.init(D, H, O, num_layers=L, bidirectional=bi, dtype=np.float64, seed=0)
    n = _n(L, bi)
    X, Y = rng.normal(size=(T, B, D)), rng.normal(size=(T, B, O))
    h0 = rng.normal(size=(B, H))                    # a one-layer shape
    calls = {"forward": lambda: fastbptt.forward(p, X, h0),
             "loss_and_grad": lambda: fastbptt.loss_and_grad(p, X, Y, h0=h0),
             "rnn": lambda: fastbptt.rnn(p, X, h0),
             "rnn_vjp": lambda: fastbptt.rnn_vjp(p, X, h0)}
    _refused(ValueError, ["h0", str((n, B, H)), str((B, H))], calls[fn], p, X, Y, h0)
    # one sequence (2-D X): (n, H), not (n, 1, H)
    h0_3 = rng.normal(size=(n, 1, H))
    _refused(ValueError, ["h0", str((n, H)), str((n, 1, H))],
             lambda: fastbptt.rnn(p, X[:, 0], h0_3), p, X, h0_3)


@pytest.mark.parametrize("truncation", [5, (2, 4)], ids=str)
def test_truncation_with_bidirectional_is_refused(truncation):
    rng = np.random.default_rng(42)
    p = RNNParams.init(2, 3, 2, num_layers=2, bidirectional=True, dtype=np.float64, seed=0)
    X, Y = rng.normal(size=(6, 2, 2)), rng.normal(size=(6, 2, 2))
    _refused(ValueError, ["truncation", "bidirectional", str(truncation)],
             lambda: fastbptt.loss_and_grad(p, X, Y, truncation=truncation), p, X, Y)
    _refused(ValueError, ["truncation", "bidirectional", str(truncation)],
             lambda: RNN(2, 3, 2, bidirectional=True, truncation=truncation))
    fastbptt.loss_and_grad(p, X, Y, truncation=None)                 # None is fine
    RNN(2, 3, 2, num_layers=2, truncation=truncation)               # and so is a unidirectional stack


@pytest.mark.parametrize("fn", ["forward", "loss_and_grad"])
def test_head_less_params_are_refused_by_forward_and_loss_and_grad(fn):
    rng = np.random.default_rng(43)
    p = RNNParams.init(2, 3, None, num_layers=2, dtype=np.float64, seed=0)
    X, Y = rng.normal(size=(4, 2, 2)), rng.normal(size=(4, 2, 1))
    call = (lambda: fastbptt.forward(p, X)) if fn == "forward" else (lambda: fastbptt.loss_and_grad(p, X, Y))
    msg = _refused(ValueError, ["params", "head"], call, p, X, Y)
    assert "W_hy" in msg and "None" in msg          # what was given
    out, h_n = fastbptt.rnn(p, X)                   # the stack alone takes them
    assert out.shape == (4, 2, 3) and h_n.shape == (2, 2, 3)


@pytest.mark.parametrize("L,bi", STRUCTS, ids=STRUCT_IDS)
def test_vjp_refuses_gradients_of_the_wrong_shape(L, bi):
    _, params, X, h0, dO, dH, _ = _vjp_problem(L, bi, seed=44)
    _, _, vjp = fastbptt.rnn_vjp(params, X, h0, backend="numpy")
    ref = _results(vjp(dO, dH))
    bad_dO = dO[:-1]
    _refused(ValueError, ["d_output", str(dO.shape), str(bad_dO.shape)], lambda: vjp(bad_dO, dH), bad_dO, dH)
    bad_dO = dO[..., :-1]
    _refused(ValueError, ["d_output", str(dO.shape), str(bad_dO.shape)], lambda: vjp(bad_dO), bad_dO)
    bad_dH = dH[..., :-1]
    _refused(ValueError, ["d_h_n", str(dH.shape), str(bad_dH.shape)], lambda: vjp(dO, bad_dH), dO, bad_dH)
    _assert_bitwise(_results(vjp(dO, dH)), ref, "after refused calls")


def _layer(rng, H, D):
    return (rng.normal(size=(H, D)), rng.normal(size=(H, H)), rng.normal(size=H))


def test_rnn_params_refuses_inconsistent_layers():
    rng = np.random.default_rng(45)
    H, D = 4, 3
    good = [_layer(rng, H, D), _layer(rng, H, D), _layer(rng, H, 2 * H), _layer(rng, H, 2 * H)]
    RNNParams(layers=good, bidirectional=True)      # the consistent one is accepted
    # layer 1 fed D inputs instead of the layer below's dirs·H
    bad = [_layer(rng, H, D), _layer(rng, H, D)]
    _refused(ValueError, ["W_xh_l1", str((H, H)), str((H, D))],
             lambda: RNNParams(layers=bad), bad)
    bad = list(good)
    bad[2] = _layer(rng, H, H)                      # (H, H) but the layer below is bidirectional: (H, 2H)
    _refused(ValueError, ["W_xh_l1", str((H, 2 * H)), str((H, H))],
             lambda: RNNParams(layers=bad, bidirectional=True), bad)
    bad = list(good)
    bad[1] = (good[1][0], rng.normal(size=(H, H + 1)), good[1][2])
    _refused(ValueError, ["W_hh_l0_reverse", str((H, H)), str((H, H + 1))],
             lambda: RNNParams(layers=bad, bidirectional=True), bad)
    bad = list(good)
    bad[3] = (good[3][0], good[3][1], rng.normal(size=H + 2))
    _refused(ValueError, ["b_h_l1_reverse", str((H,)), str((H + 2,))],
             lambda: RNNParams(layers=bad, bidirectional=True), bad)
    _refused(ValueError, ["bidirectional", "even", "3"],
             lambda: RNNParams(layers=good[:3], bidirectional=True), good)
    W_hy, b_y = rng.normal(size=(2, H)), rng.normal(size=2)
    _refused(ValueError, ["W_hy", str(2 * H), str((2, H))],
             lambda: RNNParams(layers=good, bidirectional=True, W_hy=W_hy, b_y=b_y), good, W_hy, b_y)
    mixed = [good[0], tuple(a.astype(np.float32) for a in good[1]), good[2], good[3]]
    _refused(TypeError, ["dtype", "float32", "float64"],
             lambda: RNNParams(layers=mixed, bidirectional=True), mixed)


@pytest.mark.parametrize("value,exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                       ("2", TypeError), (True, TypeError), (None, TypeError)],
                         ids=["0", "-1", "1.5", "str", "bool", "None"])
def test_bad_num_layers(value, exc):
    _refused(exc, ["num_layers", repr(value)], lambda: RNNParams.init(2, 3, 1, num_layers=value))
    _refused(exc, ["num_layers", repr(value)], lambda: RNN(2, 3, 1, num_layers=value))


@pytest.mark.parametrize("value", ["xavier", "Identity", None, 1])
def test_bad_init(value):
    _refused(ValueError, ["init", repr(value), "'uniform'", "'identity'", "'orthogonal'"],
             lambda: RNNParams.init(2, 3, 1, init=value))
    _refused(ValueError, ["init", repr(value), "'orthogonal'"], lambda: RNN(2, 3, 1, init=value))


# ============================================================ (e) the estimator
def _samples(seed, N, T, D, O, loss="mse", output="sequence"):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, T, D))
    Y = _targets(rng, loss, (N, T) if output == "sequence" else (N,), O)
    return X, Y


def _time_major(A):
    return np.swapaxes(A, 0, 1) if A.ndim >= 2 else A


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
def test_estimator_stack_fit_predict_evaluate(bi, init):
    N, T, D, H, O = 6, 5, 3, 4, 2
    X, Y = _samples(51, N, T, D, O)
    m = RNN(D, H, O, num_layers=2, bidirectional=bi, init=init, batch_size=4, dtype=np.float64, seed=1,
            lr=1e-2)
    assert (m.params.num_layers, m.params.bidirectional) == (2, bi)
    assert m.params == RNNParams.init(D, H, O, num_layers=2, bidirectional=bi, init=init, dtype=np.float64, seed=1)
    start = m.params.copy()
    m.fit(X, Y, epochs=2, validation_data=(X, Y), progress=False)
    assert len(m.history_["loss"]) == 2 and np.all(np.isfinite(m.history_["loss"]))
    assert m.params != start
    pred = m.predict(X)
    assert pred.shape == (N, T, O)
    logits, _ = fastbptt.forward(m.params, _time_major(X), backend="numpy")
    np.testing.assert_allclose(pred, _time_major(logits), rtol=1e-12, atol=1e-14)
    value = m.evaluate(X, Y)
    ref = fastbptt.loss_and_grad(m.params, _time_major(X), _time_major(Y), backend="numpy")[0]
    assert value == pytest.approx(ref, rel=1e-12)
    assert m.history_["val_loss"][-1] == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_estimator_last_output_of_a_bidirectional_stack(loss):
    """``output="last"``: the head reads [h_T^fwd ; h_1^bwd] of the top layer, in predict and evaluate."""
    N, T, D, H, O = 5, 6, 3, 4, 3
    X, Y = _samples(55, N, T, D, O, loss, "last")
    m = RNN(D, H, O, num_layers=2, bidirectional=True, loss=loss, output="last", dtype=np.float64, seed=8)
    m.fit(X, Y, epochs=1, progress=False)
    out, _ = fastbptt.rnn(m.params, _time_major(X), backend="numpy")
    last = np.concatenate([out[-1, :, :H], out[0, :, H:]], axis=1)
    logits = last @ m.params.W_hy.T + m.params.b_y
    if loss == "ce":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        expected = e / e.sum(axis=1, keepdims=True)
    else:
        expected = logits
    np.testing.assert_allclose(m.predict(X), expected, rtol=1e-12, atol=1e-15)
    ref = fastbptt.loss_and_grad(m.params, _time_major(X), Y, loss=loss, output="last", backend="numpy")[0]
    assert m.evaluate(X, Y) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("loss,output", [("mse", "sequence"), ("ce", "last"), ("bce", "sequence")])
def test_estimator_fit_equals_a_loop_of_loss_and_grad_and_sgd(loss, output):
    """Full BPTT, 2 layers, bidirectional, shuffle=False, one batch: fit is loss_and_grad + SGD.step."""
    N, T, D, H, O, epochs = 5, 6, 3, 4, 3, 3
    X, Y = _samples(52, N, T, D, O, loss, output)
    m = RNN(D, H, O, num_layers=2, bidirectional=True, loss=loss, output=output, optimizer="sgd", lr=0.2,
            batch_size=N, dtype=np.float64, backend="numpy", seed=7)
    m.fit(X, Y, epochs=epochs, shuffle=False, progress=False)

    p = RNNParams.init(D, H, O, num_layers=2, bidirectional=True, dtype=np.float64, seed=7)
    opt = SGD(lr=0.2)
    losses = []
    Xt, Yt = _time_major(X), (_time_major(Y) if output == "sequence" else Y)
    for _ in range(epochs):
        value, grads, _ = fastbptt.loss_and_grad(p, Xt, Yt, loss=loss, output=output, backend="numpy")
        opt.step(p, grads)
        losses.append(value)
    assert m.params.same_structure(p)
    for (name, a), b in zip(m.params.items(), p.arrays()):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15, err_msg=name)
    np.testing.assert_allclose(m.history_["loss"], losses, rtol=1e-13)
    assert losses[-1] < losses[0]                     # it trains


def test_estimator_truncated_stack_equals_a_loop_of_chunks():
    """truncation=k, 2 layers: one SGD step per chunk, every layer's state carried across chunks."""
    N, T, D, H, O, L, k = 4, 7, 2, 3, 2, 2, 3
    X, Y = _samples(56, N, T, D, O)
    m = RNN(D, H, O, num_layers=L, truncation=k, optimizer="sgd", lr=0.2, batch_size=N, dtype=np.float64,
            backend="numpy", seed=9)
    m.fit(X, Y, epochs=2, shuffle=False, progress=False)
    p = RNNParams.init(D, H, O, num_layers=L, dtype=np.float64, seed=9)
    opt = SGD(lr=0.2)
    Xt, Yt = _time_major(X), _time_major(Y)
    for _ in range(2):
        state = np.zeros((L, N, H))
        for s in range(0, T, k):                    # chunks [0, 3), [3, 6), [6, 7)
            _, grads, state = fastbptt.loss_and_grad(p, Xt[s:s + k], Yt[s:s + k], h0=state, backend="numpy")
            opt.step(p, grads)
    assert m.params.allclose(p, rtol=1e-13, atol=1e-15)
    assert opt.step_count == 6 and m.optimizer_.step_count == 6


@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
def test_estimator_stack_save_load_and_resume_exactly(tmp_path, bi):
    N, T, D, H, O = 8, 5, 3, 4, 2
    X, Y = _samples(53, N, T, D, O, "ce", "last")
    kw = dict(num_layers=2, bidirectional=bi, init="orthogonal", loss="ce", output="last", optimizer="adam",
              lr=1e-2, batch_size=3, dtype=np.float64, backend="numpy", seed=4)
    full = RNN(D, H, O, **kw)
    full.fit(X, Y, epochs=3, progress=False)
    half = RNN(D, H, O, **kw)
    half.fit(X, Y, epochs=1, progress=False)
    path = tmp_path / "stack.npz"
    half.save(path)
    loaded = RNN.load(path)
    assert loaded.get_params() == half.get_params()
    assert (loaded.params.num_layers, loaded.params.bidirectional, loaded.init) == (2, bi, "orthogonal")
    assert loaded.params == half.params
    np.testing.assert_array_equal(loaded.predict(X), half.predict(X))
    loaded.fit(X, Y, epochs=2, progress=False)
    assert loaded.params == full.params             # bit for bit: params, Adam state, shuffling
    assert loaded.history_["loss"] == full.history_["loss"]
    half.fit(X, Y, epochs=2, progress=False)
    assert half.params == full.params


@pytest.mark.parametrize("batch_size", [4, 2], ids=["one-batch", "two-batches"])
@pytest.mark.parametrize("bi", [False, True], ids=["uni", "bi"])
def test_estimator_stateful_stack_carries_every_layers_state(tmp_path, bi, batch_size):
    N, T, D, H, O, L = 4, 4, 2, 3, 2, 2
    n = _n(L, bi)
    X, Y = _samples(54, N, 3 * T, D, O)
    kw = dict(num_layers=L, bidirectional=bi, optimizer="sgd", lr=0.1, batch_size=batch_size, dtype=np.float64,
              backend="numpy", seed=2)
    m = RNN(D, H, O, **kw)
    p = RNNParams.init(D, H, O, num_layers=L, bidirectional=bi, dtype=np.float64, seed=2)
    opt, state = SGD(lr=0.1), np.zeros((n, N, H))
    for w in range(3):
        Xw, Yw = X[:, w * T:(w + 1) * T], Y[:, w * T:(w + 1) * T]
        m.fit(Xw, Yw, shuffle=False, stateful=True, progress=False)
        assert m.state_.shape == (n, N, H)
        for s in range(0, N, batch_size):
            idx = np.arange(s, min(s + batch_size, N))
            _, grads, h_last = fastbptt.loss_and_grad(p, _time_major(Xw[idx]), _time_major(Yw[idx]),
                                                      h0=state[:, idx], backend="numpy")
            opt.step(p, grads)
            state[:, idx] = h_last
        np.testing.assert_allclose(m.state_, state, rtol=1e-13, atol=1e-15, err_msg=f"window {w}")
        assert m.params.allclose(p, rtol=1e-13, atol=1e-15), f"window {w}"
        if w == 1:
            path = tmp_path / "stateful.npz"
            m.save(path)
            saved_state = m.state_.copy()
    fresh = RNN.load(path)
    np.testing.assert_array_equal(fresh.state_, saved_state)
    fresh.fit(X[:, 2 * T:], Y[:, 2 * T:], shuffle=False, stateful=True, progress=False)
    assert fresh.params == m.params and np.array_equal(fresh.state_, m.state_)   # saved state resumes
    # the state matters: from zeros the last window trains to other params
    fresh2 = RNN.load(path)
    fresh2.reset_state()
    assert fresh2.state_ is None
    fresh2.fit(X[:, 2 * T:], Y[:, 2 * T:], shuffle=False, stateful=True, progress=False)
    assert not fresh2.params.allclose(m.params, rtol=1e-8)
