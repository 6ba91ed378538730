"""Stacked and bidirectional models, ``rnn`` and ``rnn_vjp``: parity with torch autograd, every backend.

The oracle is ``torch.nn.RNN`` (+ ``nn.Linear``) in float64 with its own
``bias_ih`` and ``bias_hh`` (both random), read into our params by
``RNNParams.from_torch``. Truncation is torch's way, written here from
DESIGN.md's definition (not from the engine's ``windows``): each window runs
from every layer's state detached at the window's start.

Every compiled backend must be there: a backend that does not load makes its
tests fail (the call raises), it never skips them. Only torch itself may be
missing (then the module skips: the finite differences of
test_stack_contract.py carry the proof).
"""

import functools
import zlib

import numpy as np
import pytest

import fastbptt

from helpers import RTOL, assert_close, check_layer_grads, torch_suffix

torch = pytest.importorskip("torch")
F = torch.nn.functional

BACKENDS = ("numpy", "numba", "cython")
# against torch in float64 (helpers.RTOL): float32 params and data are rounded to float32 first
# and compared with torch float64 on the same (rounded) values.

STRUCTS = [(1, False), (1, True), (2, False), (2, True), (3, False), (3, True)]
STRUCT_IDS = [f"L{L}{'-bi' if bi else ''}" for L, bi in STRUCTS]
SHAPE = (5, 3, 4, 5, 3)                         # T, B, D, H (not a multiple of 8), O


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    """torch's intra-op pool on these tiny tensors costs ~15 ms an op on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------ helpers
def _round(a, dtype):
    return np.asarray(a, dtype=np.float64).astype(dtype).astype(np.float64)


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def _torch_model(D, H, O, L, bi, act, seed, dtype, *, head=True):
    """An nn.RNN (and Linear) in float64, every parameter (bias_hh too) random and representable in ``dtype``."""
    rng = np.random.default_rng(seed)
    dirs = 2 if bi else 1
    with torch.random.fork_rng(devices=[]):     # the constructors draw from torch's global generator
        rnn = torch.nn.RNN(D, H, num_layers=L, nonlinearity=act, bidirectional=bi, dtype=torch.float64)
        lin = torch.nn.Linear(dirs * H, O, dtype=torch.float64) if head else None
    bound = 1.0 / np.sqrt(H)
    with torch.no_grad():
        for p in list(rnn.parameters()) + (list(lin.parameters()) if head else []):
            p.copy_(torch.from_numpy(_round(rng.uniform(-bound, bound, size=tuple(p.shape)), dtype)))
    return rnn, lin


def _our_params(rnn, lin, dtype):
    return fastbptt.RNNParams.from_torch(rnn, lin).astype(dtype)


def _torch_layer_grads(rnn, n, dirs):
    """Per (layer, direction): (weight_ih, weight_hh, bias_ih, bias_hh) gradients."""
    named = dict(rnn.named_parameters())
    return [tuple(named[f"{w}{torch_suffix(i, dirs)}"].grad.numpy().copy()
                  for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")) for i in range(n)]


def _user_state(h, n, single):
    """(n, B, H) -> the user's shape: (B, H) for n = 1, without B for one sequence."""
    h = h[0] if n == 1 else h
    return h[..., 0, :] if single else h


def _oracle_windows(T, truncation):
    """``[(bp_start, loss_start, end)]`` (0-based, end exclusive), as DESIGN.md defines them."""
    if truncation is None:
        return [(0, 0, T)]
    k1, k2 = (truncation, None) if isinstance(truncation, int) else truncation
    out, prev = [], 0
    for t in list(range(k1, T, k1)) + [T]:
        out.append((prev if k2 is None else max(t - k2, 0), prev, t))
        prev = t
    return out


def _loss_sum(o, y, loss):
    if loss == "mse":
        return F.mse_loss(o, y, reduction="sum")
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(o, y, reduction="sum")
    return F.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1), reduction="sum")


def _loss_mean(o, y, loss):
    if loss == "mse":
        return F.mse_loss(o, y)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(o, y)
    return F.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1))


def _last(out, H, bi):
    """``[h_T^fwd ; h_1^bwd]`` of the top layer."""
    return torch.cat([out[-1, :, :H], out[0, :, H:]], 1) if bi else out[-1]


def _targets(rng, loss, lead, O, dtype):
    if loss == "mse":
        return _round(rng.normal(size=lead + (O,)), dtype)
    if loss == "bce":
        return (rng.random(size=lead + (O,)) < 0.5).astype(np.float64)
    return rng.integers(0, O, size=lead)


# ------------------------------------------------------- the loss_and_grad oracle
@functools.lru_cache(maxsize=None)
def _lg_case(L, bi, loss, output, act, truncation, dtype, shape):
    """Inputs and torch's loss, gradients and h_n for one problem (computed once, shared by backends)."""
    T, B, D, H, O = shape
    dirs, n = (2 if bi else 1), L * (2 if bi else 1)
    seed = _seed(L, bi, loss, output, act, truncation, np.dtype(dtype).name, shape)
    rnn, lin = _torch_model(D, H, O, L, bi, act, seed, dtype)
    params = _our_params(rnn, lin, dtype)
    rng = np.random.default_rng(seed + 1)
    X = _round(rng.normal(size=(T, B, D)), dtype)
    h0 = _round(rng.normal(scale=0.5, size=(n, B, H)), dtype)
    Y = _targets(rng, loss, (T, B) if output == "sequence" else (B,), O, dtype)
    Xt, Yt, h0t = torch.from_numpy(X), torch.from_numpy(Y), torch.from_numpy(h0)

    with torch.no_grad():
        out, h_n = rnn(Xt, h0t)
        value = _loss_mean(lin(out) if output == "sequence" else lin(_last(out, H, bi)), Yt, loss).item()
        states = [h0t]                              # every layer's state at every step (detached)
        if truncation is not None:
            for t in range(T):
                states.append(rnn(Xt[t:t + 1], states[-1])[1])
    for bp, ls, end in _oracle_windows(T, truncation):
        out_w, _ = rnn(Xt[bp:end], states[bp])
        if output == "sequence":
            _loss_sum(lin(out_w[ls - bp:]), Yt[ls:end], loss).div(Y.size).backward()
        elif end == T:
            _loss_sum(lin(_last(out_w, H, bi)), Yt, loss).div(Y.size).backward()
    return {"params": params, "X": X, "Y": Y, "h0": _user_state(h0, n, False), "loss": value,
            "layers": _torch_layer_grads(rnn, n, dirs), "W_hy": lin.weight.grad.numpy().copy(),
            "b_y": lin.bias.grad.numpy().copy(), "h_n": _user_state(h_n.numpy(), n, False)}


def _run_lg_case(L, bi, loss, output, act, backend, *, truncation=None, dtype=np.float64, shape=SHAPE,
                 single=False):
    """``single``: one sequence (2-D X), the B axis (of size 1) dropped from X, Y, h0 and h_last."""
    c = _lg_case(L, bi, loss, output, act, truncation, dtype, shape)
    params = c["params"].copy()
    X, Y, h0, h_n = c["X"].copy(), c["Y"].copy(), c["h0"].copy(), c["h_n"]
    if single:
        assert X.shape[1] == 1
        X, Y = X[:, 0], (Y[:, 0] if output == "sequence" else Y[0])
        h0, h_n = h0[..., 0, :], h_n[..., 0, :]
    value, grads, h_last = fastbptt.loss_and_grad(params, X, Y, h0=h0, loss=loss, output=output,
                                                  activation=act, truncation=truncation, backend=backend)
    assert isinstance(value, float)
    tol = RTOL[dtype]
    assert value == pytest.approx(c["loss"], rel=tol, abs=tol), "loss value"
    check_layer_grads(grads, params, c["layers"], dtype)
    assert_close(grads.W_hy, c["W_hy"], dtype, "dW_hy (linear.weight)")
    assert_close(grads.b_y, c["b_y"], dtype, "db_y (linear.bias)")
    assert_close(h_last, h_n, dtype, "h_last vs torch h_n")


def test_every_backend_is_available():
    missing = fastbptt.backends.unavailable_backends()
    assert set(BACKENDS) <= set(fastbptt.available_backends()), f"backends that do not load: {missing}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("output", ["sequence", "last"])
@pytest.mark.parametrize("loss", ["mse", "bce", "ce"])
@pytest.mark.parametrize("L,bi", STRUCTS, ids=STRUCT_IDS)
def test_loss_and_grad_matches_torch(L, bi, loss, output, activation, backend):
    _run_lg_case(L, bi, loss, output, activation, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("L,bi", STRUCTS, ids=STRUCT_IDS)
def test_forward_matches_torch(L, bi, activation, backend):
    T, B, D, H, O = SHAPE
    n = L * (2 if bi else 1)
    rnn, lin = _torch_model(D, H, O, L, bi, activation, _seed("fwd", L, bi, activation), np.float64)
    params = _our_params(rnn, lin, np.float64)
    rng = np.random.default_rng(_seed("fwd-data", L, bi))
    X, h0 = rng.normal(size=(T, B, D)), rng.normal(scale=0.5, size=(n, B, H))
    O_logits, Hs = fastbptt.forward(params, X, _user_state(h0, n, False), activation=activation, backend=backend)
    with torch.no_grad():
        out, _ = rnn(torch.from_numpy(X), torch.from_numpy(h0))
        logits = lin(out)
    top = h0[-2:] if bi else h0[-1:]                 # the top layer's initial state(s), concatenated
    assert_close(Hs[1:], out.numpy(), np.float64, "Hs[1:] vs torch output")
    np.testing.assert_array_equal(Hs[0], np.concatenate(list(top), axis=-1), err_msg="Hs[0]")
    assert_close(O_logits, logits.numpy(), np.float64, "O_logits vs linear(output)")


# ----------------------------------------------------------------- truncation
TRUNCATIONS = [3, (3, 3), (2, 5), (3, 4), (1, 3), 12]
TRUNC_SHAPE = (10, 2, 3, 5, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("truncation", TRUNCATIONS, ids=str)
@pytest.mark.parametrize("loss,output", [("mse", "sequence"), ("ce", "sequence"), ("bce", "last")])
@pytest.mark.parametrize("L", [1, 2, 3])
def test_truncated_stack_matches_torch(L, loss, output, truncation, backend):
    """Every layer's state detached at each window's start; (k1, k2) with k2 > k1 overlaps windows."""
    _run_lg_case(L, False, loss, output, "tanh", backend, truncation=truncation, shape=TRUNC_SHAPE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("truncation", [3, (2, 5)], ids=str)
def test_truncated_stack_relu_matches_torch(truncation, backend):
    _run_lg_case(2, False, "mse", "sequence", "relu", backend, truncation=truncation, shape=TRUNC_SHAPE)


# ------------------------------------------------------------- rnn / rnn_vjp
def _torch_vjp(rnn, X3, h0_3, dO, dH):
    """torch autograd of ``sum(output·dO) + sum(h_n·dH)`` (dH None: no h_n term)."""
    rnn.zero_grad(set_to_none=True)
    Xt = torch.tensor(X3, requires_grad=True)
    h0t = torch.tensor(h0_3, requires_grad=True)
    out, h_n = rnn(Xt, h0t)
    f = (out * torch.from_numpy(dO)).sum()
    if dH is not None:
        f = f + (h_n * torch.from_numpy(dH)).sum()
    f.backward()
    return out.detach().numpy(), h_n.detach().numpy(), Xt.grad.numpy(), h0t.grad.numpy()


@functools.lru_cache(maxsize=None)
def _vjp_case(L, bi, act, variant, dtype, shape):
    """Inputs (in the user's shapes for ``variant``) and torch's output, h_n, dX, dh0 and weight grads."""
    T, B, D, H, O = shape
    dirs, n = (2 if bi else 1), L * (2 if bi else 1)
    single = variant == "2-D X"
    if single:
        B = 1
    seed = _seed("vjp", L, bi, act, variant, np.dtype(dtype).name, shape)
    rnn, lin = _torch_model(D, H, O, L, bi, act, seed, dtype)
    params = _our_params(rnn, lin if variant == "with head" else None, dtype)
    rng = np.random.default_rng(seed + 1)
    X = _round(rng.normal(size=(T, B, D)), dtype)
    h0 = np.zeros((n, B, H)) if variant == "h0=None" else _round(rng.normal(scale=0.5, size=(n, B, H)), dtype)
    dO = _round(rng.normal(size=(T, B, dirs * H)), dtype)
    dH = None if variant == "d_h_n=None" else _round(rng.normal(size=(n, B, H)), dtype)
    out, h_n, dX, dh0 = _torch_vjp(rnn, X, h0, dO, dH)

    def user(a):                                 # (T, B, ...) -> without B for one sequence
        return a[:, 0] if single else a

    return {"params": params, "X": user(X), "h0": None if variant == "h0=None" else _user_state(h0, n, single),
            "dO": user(dO), "dH": None if dH is None else _user_state(dH, n, single),
            "out": user(out), "h_n": _user_state(h_n, n, single), "dX": user(dX),
            "dh0": _user_state(dh0, n, single), "layers": _torch_layer_grads(rnn, n, dirs)}


def _run_vjp_case(L, bi, act, variant, backend, *, dtype=np.float64, shape=SHAPE):
    c = _vjp_case(L, bi, act, variant, dtype, shape)
    params = c["params"].copy()
    h0 = None if c["h0"] is None else c["h0"].copy()
    output, h_n = fastbptt.rnn(params, c["X"].copy(), h0, activation=act, backend=backend)
    assert_close(output, c["out"], dtype, "rnn output")
    assert_close(h_n, c["h_n"], dtype, "rnn h_n")
    output, h_n, vjp = fastbptt.rnn_vjp(params, c["X"].copy(), h0, activation=act, backend=backend)
    assert_close(output, c["out"], dtype, "rnn_vjp output")
    assert_close(h_n, c["h_n"], dtype, "rnn_vjp h_n")
    if c["dH"] is None:
        grads, dX, dh0 = vjp(c["dO"].copy())
    else:
        grads, dX, dh0 = vjp(c["dO"].copy(), c["dH"].copy())
    check_layer_grads(grads, params, c["layers"], dtype, "vjp ")
    assert_close(dX, c["dX"], dtype, "vjp dX")
    assert_close(dh0, c["dh0"], dtype, "vjp dh0")
    if params.has_head:
        assert grads.W_hy.shape == params.W_hy.shape and grads.b_y.shape == params.b_y.shape
        assert not np.any(grads.W_hy) and not np.any(grads.b_y), "the head's gradients must be zero"
    else:
        assert grads.W_hy is None and grads.b_y is None, "head-less params: head grads must be None"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("L,bi", STRUCTS, ids=STRUCT_IDS)
def test_rnn_vjp_matches_torch(L, bi, activation, backend):
    """Head-less params (``from_torch(rnn)``), given h0 and d_h_n."""
    _run_vjp_case(L, bi, activation, "head-less", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["d_h_n=None", "2-D X", "with head", "h0=None"])
@pytest.mark.parametrize("L,bi", STRUCTS, ids=STRUCT_IDS)
def test_rnn_vjp_variants_match_torch(L, bi, variant, backend):
    _run_vjp_case(L, bi, "tanh", variant, backend)


# -------------------------------------------------------------- odd shapes
ODD_SHAPES = [(1, 3, 4, 5, 3), (5, 1, 4, 3, 3), (4, 2, 3, 9, 2), (1, 1, 2, 1, 2)]
ODD_IDS = ["T1", "B1-H3", "H9", "T1-B1-H1"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,bi", [(1, False), (2, True), (3, False)], ids=["L1", "L2-bi", "L3"])
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=ODD_IDS)
def test_odd_shapes_match_torch(shape, L, bi, backend):
    _run_lg_case(L, bi, "mse", "sequence", "tanh", backend, shape=shape)
    _run_lg_case(L, bi, "ce", "last", "relu", backend, shape=shape)
    _run_vjp_case(L, bi, "tanh", "head-less", backend, shape=shape)
    if not bi:
        _run_lg_case(L, False, "mse", "sequence", "tanh", backend, truncation=(1, 2), shape=shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,output", [("mse", "sequence"), ("ce", "sequence"), ("bce", "last"), ("ce", "last")])
@pytest.mark.parametrize("L,bi", [(1, False), (1, True), (2, True), (3, False)], ids=["L1", "L1-bi", "L2-bi", "L3"])
def test_one_sequence_loss_and_grad_matches_torch(L, bi, loss, output, backend):
    """2-D X: Y, h0 and h_last drop the B axis too."""
    _run_lg_case(L, bi, loss, output, "tanh", backend, shape=(6, 1, 3, 4, 3), single=True)
    if not bi:
        _run_lg_case(L, bi, loss, output, "tanh", backend, shape=(6, 1, 3, 4, 3), single=True, truncation=(2, 3))


# ------------------------------------------------------------------ float32
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,bi,loss,output,activation", [(2, True, "ce", "last", "tanh"),
                                                         (3, False, "mse", "sequence", "relu"),
                                                         (2, True, "bce", "sequence", "tanh")],
                         ids=["L2-bi-ce-last", "L3-mse-relu", "L2-bi-bce"])
def test_float32_loss_and_grad_matches_torch(L, bi, loss, output, activation, backend):
    _run_lg_case(L, bi, loss, output, activation, backend, dtype=np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_truncated_stack_matches_torch(backend):
    _run_lg_case(2, False, "mse", "sequence", "tanh", backend, truncation=(2, 5), dtype=np.float32,
                 shape=TRUNC_SHAPE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,bi,variant", [(2, True, "head-less"), (3, False, "2-D X")],
                         ids=["L2-bi", "L3-2D"])
def test_float32_rnn_vjp_matches_torch(L, bi, variant, backend):
    _run_vjp_case(L, bi, "tanh", variant, backend, dtype=np.float32)
