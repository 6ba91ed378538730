"""Variable-length batches (``lengths=``): torch's packed sequences, on every backend.

The oracle is ``torch.nn.RNN`` (+ ``nn.Linear``) in float64, fed
``pack_padded_sequence(X, lengths, enforce_sorted=False)`` and read back with
``pad_packed_sequence``; every parameter (``bias_hh`` too) random, read into
our params by ``RNNParams.from_torch``. Losses are written here from
DESIGN.md ("Variable-length sequences"): means over the valid positions only
(mse/bce: valid (t, b, o) elements; ce: valid (t, b)); ``output="last"`` is
``[output[len_b - 1, b, :H] ; output[0, b, H:]]``, each row's own last step
forward and the reverse direction's final state.

Truncation (stacked unidirectional models) has its own oracle, per row: see
:func:`_truncated_oracle`.

Besides parity: padding filled with NaN or inf gives bit-identical results;
the kernels never touch padded rows (sentinels) and the engine hands them only
the active rows (``batch_sizes``); bad ``lengths`` are refused with a message
that names them. Torch's results are computed once per problem and shared by
the backends. A compiled backend that does not load fails its tests (the call
raises); only torch may be missing (then the parity tests skip).
"""

import functools
import re
import zlib

import numpy as np
import pytest

import fastbptt
from fastbptt.backends import reference as R, resolve_backend
from fastbptt.engine.core import windows
from helpers import RTOL, assert_close, check_layer_grads, rel_err, torch_suffix

BACKENDS = ("numpy", "numba", "cython")
F64 = np.float64

STRUCTS = [(1, False), (1, True), (2, False), (2, True), (3, False), (3, True)]
STRUCT_IDS = [f"L{L}{'-bi' if bi else ''}" for L, bi in STRUCTS]
FEW_STRUCTS = [(1, False), (2, True), (3, False)]
FEW_IDS = ["L1", "L2-bi", "L3"]
LOSS_OUTPUTS = [(loss, output) for loss in ("mse", "bce", "ce") for output in ("sequence", "last")]

T_, D_, H_, O_ = 6, 3, 4, 3                     # H not a multiple of 8
# the batch's lengths, by name (B = len(lengths)); every one also used for D, H, O above
LENGTHS = {
    "distinct": (4, 1, 6, 2, 5),                # all different, unsorted, with 1 and T
    "ties": (3, 6, 1, 3, 6),                    # ties: the stable sort order and its inverse
    "all-T": (6, 6, 6, 6, 6),                   # no padding at all (the plain path)
    "all-4": (4, 4, 4, 4, 4),                   # all equal < T: steps 4, 5 run on no row
    "all-1": (1, 1, 1),
    "B1": (2,),                                 # one row, 3-D X
}
PATTERNS = [k for k in LENGTHS if k != "distinct"]


def _seed(*key):
    return zlib.crc32(repr(key).encode())


def _valid(lengths, T):
    """(T, B) bool: step t of row b is within its length."""
    return np.arange(T)[:, None] < np.asarray(lengths)[None, :]


def _user_state(h, n):
    """(n, B, H) -> the user's shape: (B, H) for one unidirectional layer."""
    return h[0] if n == 1 else h


def _fill(a, valid, value):
    """A copy of ``a`` with ``value`` at the padded positions (``valid`` is (T, B))."""
    a = np.array(a, copy=True)
    a[~valid] = value
    return a


def _bad_pad(a, valid, seed):
    """A copy of ``a`` with NaN and ±inf (or, for integer class ids, ids out of range) at padded positions."""
    rng = np.random.default_rng(seed)
    a = np.array(a, copy=True)
    n = int((~valid).sum()) * int(np.prod(a.shape[2:], dtype=int))
    if a.dtype.kind == "f":
        a[~valid] = rng.choice([np.nan, np.inf, -np.inf], size=n).reshape(a[~valid].shape)
    else:
        a[~valid] = rng.choice([-100, -1, 10 ** 6], size=n).reshape(a[~valid].shape)
    return a


# ------------------------------------------------------------------ torch
@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread():
    """torch's intra-op pool on these tiny tensors costs ~ms an op on 2 busy cores; restored after."""
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _torch():
    return pytest.importorskip("torch")


def _torch_model(L, bi, act, seed, dtype=F64, head=True):
    """An nn.RNN (and Linear) in float64, every parameter random and representable in ``dtype``."""
    torch = _torch()
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):     # the constructors draw from torch's global generator
        rnn = torch.nn.RNN(D_, H_, num_layers=L, nonlinearity=act, bidirectional=bi, dtype=torch.float64)
        lin = torch.nn.Linear((2 if bi else 1) * H_, O_, dtype=torch.float64) if head else None
    bound = 1.0 / np.sqrt(H_)
    with torch.no_grad():
        for p in list(rnn.parameters()) + (list(lin.parameters()) if head else []):
            p.copy_(torch.from_numpy(rng.uniform(-bound, bound, size=tuple(p.shape)).astype(dtype).astype(F64)))
    return rnn, lin


def _torch_layer_grads(rnn, n, dirs):
    """Per (layer, direction): (weight_ih, weight_hh, bias_ih, bias_hh) gradients, then cleared."""
    named = dict(rnn.named_parameters())
    out = [tuple(named[f"{w}{torch_suffix(i, dirs)}"].grad.numpy().copy()
                 for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")) for i in range(n)]
    rnn.zero_grad(set_to_none=True)
    return out


def _packed_run(rnn, X, h0, lengths, *, requires_grad=False):
    """nn.RNN on ``pack_padded_sequence(X, lengths, enforce_sorted=False)``: (Xt, h0t, output padded to T, h_n)."""
    torch = _torch()
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
    Xt = torch.tensor(X, requires_grad=requires_grad)
    h0t = torch.tensor(h0, requires_grad=requires_grad)
    packed = pack_padded_sequence(Xt, torch.tensor(np.asarray(lengths, dtype=np.int64)), enforce_sorted=False)
    out_p, h_n = rnn(packed, h0t)
    out, _ = pad_packed_sequence(out_p, total_length=X.shape[0])
    return Xt, h0t, out, h_n


def _loss_mean(o, y, loss):
    """torch's mean reductions over rows ``o`` (N, O) and targets ``y`` (N, O) / (N,)."""
    F = _torch().nn.functional
    if loss == "mse":
        return F.mse_loss(o, y)
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(o, y)
    return F.cross_entropy(o, y)


def _last_rows(out, lengths, bi):
    """``[output[len_b - 1, b, :H] ; output[0, b, H:]]``: each row's own last step (B, dirs·H)."""
    torch = _torch()
    B = out.shape[1]
    fwd = out[torch.tensor(np.asarray(lengths) - 1), torch.arange(B), :H_]
    return torch.cat([fwd, out[0, :, H_:]], 1) if bi else fwd


def _targets(rng, loss, lead):
    if loss == "mse":
        return rng.normal(size=lead + (O_,))
    if loss == "bce":
        return (rng.random(size=lead + (O_,)) < 0.5).astype(F64)
    return rng.integers(0, O_, size=lead)


def _problem(key, L, bi, loss, output, lengths, T=T_, dtype=F64):
    """params (from a random torch model), X, Y, h0 (n, B, H): finite everywhere, padding included."""
    seed = _seed(key, L, bi, loss, output, lengths, T, np.dtype(dtype).name)
    rng = np.random.default_rng(seed)
    B, n = len(lengths), L * (2 if bi else 1)
    X = rng.normal(size=(T, B, D_)).astype(dtype).astype(F64)
    h0 = rng.normal(scale=0.5, size=(n, B, H_)).astype(dtype).astype(F64)
    Y = _targets(rng, loss, (T, B) if output == "sequence" else (B,))
    if loss == "mse":
        Y = Y.astype(dtype).astype(F64)
    return seed, X, Y, h0


@functools.lru_cache(maxsize=None)
def _lg_case(L, bi, loss, output, act, lkey, dtype=F64):
    """Inputs and torch's loss, gradients and h_n for one packed problem (once, for every backend)."""
    torch = _torch()
    lengths = np.array(LENGTHS[lkey], dtype=np.int64)
    n, dirs = L * (2 if bi else 1), 2 if bi else 1
    seed, X, Y, h0 = _problem("lg", L, bi, loss, output, LENGTHS[lkey], dtype=dtype)
    rnn, lin = _torch_model(L, bi, act, seed, dtype)
    _, _, out, h_n = _packed_run(rnn, X, h0, lengths)
    Yt = torch.from_numpy(Y)
    if output == "sequence":
        mask = torch.from_numpy(_valid(lengths, T_))
        value = _loss_mean(lin(out)[mask], Yt[mask], loss)     # the valid positions only
    else:
        value = _loss_mean(lin(_last_rows(out, lengths, bi)), Yt, loss)
    value.backward()
    return {"params": fastbptt.RNNParams.from_torch(rnn, lin).astype(dtype), "X": X, "Y": Y,
            "h0": _user_state(h0, n), "lengths": lengths, "loss": value.item(),
            "layers": _torch_layer_grads(rnn, n, dirs), "W_hy": lin.weight.grad.numpy().copy(),
            "b_y": lin.bias.grad.numpy().copy(), "h_n": _user_state(h_n.detach().numpy(), n)}


def _run_lg_case(L, bi, loss, output, act, lkey, backend, dtype=F64):
    c = _lg_case(L, bi, loss, output, act, lkey, dtype)
    params = c["params"].copy()
    value, grads, h_last = fastbptt.loss_and_grad(params, c["X"].copy(), c["Y"].copy(), h0=c["h0"].copy(),
                                                  lengths=c["lengths"].copy(), loss=loss, output=output,
                                                  activation=act, backend=backend)
    assert isinstance(value, float)
    assert value == pytest.approx(c["loss"], rel=RTOL[dtype], abs=RTOL[dtype]), "loss (mean over valid positions)"
    check_layer_grads(grads, params, c["layers"], dtype)
    assert_close(grads.W_hy, c["W_hy"], dtype, "dW_hy (linear.weight)")
    assert_close(grads.b_y, c["b_y"], dtype, "db_y (linear.bias)")
    assert_close(h_last, c["h_n"], dtype, "h_last vs torch's h_n")


def test_every_backend_is_available():
    missing = fastbptt.backends.unavailable_backends()
    assert set(BACKENDS) <= set(fastbptt.available_backends()), f"backends that do not load: {missing}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("loss,output", LOSS_OUTPUTS)
@pytest.mark.parametrize("L,bi", STRUCTS, ids=STRUCT_IDS)
def test_loss_and_grad_matches_packed_torch(L, bi, loss, output, activation, backend):
    """All lengths different, unsorted, with 1 and T."""
    _run_lg_case(L, bi, loss, output, activation, "distinct", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,output", [("mse", "sequence"), ("ce", "sequence"), ("bce", "last"), ("ce", "last")])
@pytest.mark.parametrize("L,bi", FEW_STRUCTS, ids=FEW_IDS)
@pytest.mark.parametrize("lkey", PATTERNS)
def test_loss_and_grad_length_patterns_match_packed_torch(lkey, L, bi, loss, output, backend):
    _run_lg_case(L, bi, loss, output, "tanh", lkey, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_loss_and_grad_matches_packed_torch(backend):
    """float32 params and data, compared with torch float64 on the same (rounded) values."""
    _run_lg_case(2, True, "mse", "sequence", "tanh", "distinct", backend, dtype=np.float32)
    _run_lg_case(1, False, "ce", "last", "relu", "ties", backend, dtype=np.float32)


# ----------------------------------------------------- forward, rnn, rnn_vjp
@functools.lru_cache(maxsize=None)
def _vjp_case(L, bi, act, lkey, head):
    """torch's output, h_n, logits and the autograd of ``sum(output·dO) + sum(h_n·dH)``."""
    torch = _torch()
    lengths = np.array(LENGTHS[lkey], dtype=np.int64)
    n, dirs = L * (2 if bi else 1), 2 if bi else 1
    seed, X, _, h0 = _problem("vjp", L, bi, "mse", "sequence", LENGTHS[lkey])
    rnn, lin = _torch_model(L, bi, act, seed, head=head)
    rng = np.random.default_rng(seed + 1)
    dO = rng.normal(size=(T_, len(lengths), dirs * H_))       # padded steps too: torch ignores them
    dH = rng.normal(size=(n, len(lengths), H_))
    Xt, h0t, out, h_n = _packed_run(rnn, X, h0, lengths, requires_grad=True)
    ((out * torch.from_numpy(dO)).sum() + (h_n * torch.from_numpy(dH)).sum()).backward()
    with torch.no_grad():
        logits = lin(out).numpy() if head else None
    return {"params": fastbptt.RNNParams.from_torch(rnn, lin), "X": X, "h0": _user_state(h0, n),
            "h0_top": np.concatenate(list(h0[-dirs:]), axis=-1), "lengths": lengths, "dO": dO,
            "dH": _user_state(dH, n), "out": out.detach().numpy(), "h_n": _user_state(h_n.detach().numpy(), n),
            "logits": logits, "dX": Xt.grad.numpy(), "dh0": _user_state(h0t.grad.numpy(), n),
            "layers": _torch_layer_grads(rnn, n, dirs)}


def _run_vjp_case(L, bi, act, lkey, backend, head):
    c = _vjp_case(L, bi, act, lkey, head)
    params, lengths = c["params"].copy(), c["lengths"]
    valid = _valid(lengths, T_)
    if head:
        O_logits, Hs = fastbptt.forward(params, c["X"].copy(), c["h0"].copy(), lengths=lengths.copy(),
                                        activation=act, backend=backend)
        assert_close(Hs[1:], c["out"], F64, "forward Hs[1:] vs torch's pad_packed_sequence(output)")
        assert np.all(Hs[1:][~valid] == 0), "forward: Hs[1:] must hold zeros at padded steps"
        np.testing.assert_array_equal(Hs[0], c["h0_top"], err_msg="forward Hs[0]: the top layer's h0")
        assert_close(O_logits[valid], c["logits"][valid], F64, "forward O_logits at the valid steps")
    output, h_n = fastbptt.rnn(params, c["X"].copy(), c["h0"].copy(), lengths=lengths.copy(),
                               activation=act, backend=backend)
    assert_close(output, c["out"], F64, "rnn output")
    assert np.all(output[~valid] == 0), "rnn: output must hold zeros at padded steps"
    assert_close(h_n, c["h_n"], F64, "rnn h_n")
    output, h_n, vjp = fastbptt.rnn_vjp(params, c["X"].copy(), c["h0"].copy(), lengths=lengths.copy(),
                                        activation=act, backend=backend)
    assert_close(output, c["out"], F64, "rnn_vjp output")
    assert_close(h_n, c["h_n"], F64, "rnn_vjp h_n")
    grads, dX, dh0 = vjp(c["dO"].copy(), c["dH"].copy())
    check_layer_grads(grads, params, c["layers"], F64, "vjp ")
    assert_close(dX, c["dX"], F64, "vjp dX")
    assert np.all(dX[~valid] == 0), "vjp: dX must be zero at padded steps"
    assert_close(dh0, c["dh0"], F64, "vjp dh0")
    if head:
        assert not np.any(grads.W_hy) and not np.any(grads.b_y), "vjp: the head's gradients must be zero"
    else:
        assert grads.W_hy is None and grads.b_y is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("L,bi", STRUCTS, ids=STRUCT_IDS)
def test_forward_rnn_and_vjp_match_packed_torch(L, bi, activation, backend):
    """forward (with a head), rnn, rnn_vjp: outputs, h_n, and the vjp's grads, dX and dh0."""
    _run_vjp_case(L, bi, activation, "distinct", backend, head=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,bi", FEW_STRUCTS, ids=FEW_IDS)
@pytest.mark.parametrize("lkey", PATTERNS)
def test_rnn_and_vjp_length_patterns_match_packed_torch(lkey, L, bi, backend):
    """Head-less params (``from_torch(rnn)``)."""
    _run_vjp_case(L, bi, "tanh", lkey, backend, head=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vjp_without_d_h_n_and_h0_none(backend):
    """``d_h_n=None`` is a zero d_h_n; ``h0=None`` is zeros (dh0 still returned): bit for bit."""
    c = _vjp_case(2, True, "tanh", "distinct", True)
    params, X, lengths = c["params"], c["X"], c["lengths"]
    zeros = np.zeros_like(c["h0"])
    o1, h1, vjp1 = fastbptt.rnn_vjp(params, X, None, lengths=lengths, backend=backend)
    o2, h2, vjp2 = fastbptt.rnn_vjp(params, X, zeros, lengths=lengths, backend=backend)
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(h1, h2)
    r1 = vjp1(c["dO"])
    r2 = vjp2(c["dO"], np.zeros_like(c["dH"]))
    for a, b in zip(list(r1[0].arrays()) + [r1[1], r1[2]], list(r2[0].arrays()) + [r2[1], r2[2]]):
        np.testing.assert_array_equal(a, b)
    assert r1[2].shape == zeros.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_vjp_keeps_its_own_lengths(backend):
    """A vjp differentiates its own forward: calls with other lengths in between change nothing."""
    c = _vjp_case(2, True, "tanh", "distinct", True)
    params, X, h0 = c["params"], c["X"], c["h0"]
    _, _, vjp = fastbptt.rnn_vjp(params, X, h0, lengths=c["lengths"], backend=backend)
    first = vjp(c["dO"], c["dH"])
    other = np.array(LENGTHS["ties"])
    _, _, vjp_other = fastbptt.rnn_vjp(params, X, h0, lengths=other, backend=backend)
    vjp_other(c["dO"], c["dH"])
    fastbptt.loss_and_grad(params, X, np.zeros((T_, len(other), O_)), h0=h0, lengths=other, backend=backend)
    fastbptt.rnn(params, X, h0, backend=backend)
    again = vjp(c["dO"], c["dH"])
    for a, b in zip(list(first[0].arrays()) + [first[1], first[2]], list(again[0].arrays()) + [again[1], again[2]]):
        np.testing.assert_array_equal(a, b)
    assert_close(again[1], c["dX"], F64, "vjp dX after other calls")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lengths_as_list_or_any_integer_dtype(backend):
    """A list, int32, uint8 or a non-contiguous view: the same lengths, bit-identical results; not mutated."""
    c = _lg_case(2, False, "mse", "sequence", "tanh", "ties")
    kw = dict(h0=c["h0"], loss="mse", backend=backend)
    ref = fastbptt.loss_and_grad(c["params"], c["X"], c["Y"], lengths=c["lengths"], **kw)
    strided = np.repeat(c["lengths"], 2)[::2]
    for lengths in (list(LENGTHS["ties"]), c["lengths"].astype(np.int32), c["lengths"].astype(np.uint8), strided):
        before = np.array(lengths, copy=True)
        got = fastbptt.loss_and_grad(c["params"], c["X"], c["Y"], lengths=lengths, **kw)
        assert got[0] == ref[0]
        for a, b in zip(list(got[1].arrays()) + [got[2]], list(ref[1].arrays()) + [ref[2]]):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.asarray(lengths), before)


# ----------------------------------------------------------------- truncation
TRUNC_T = 10
TRUNC_LENGTHS = (7, 10, 1, 3, 6)       # ends inside a window, at T, at step 1, on window boundaries (k = 3)
TRUNCATIONS = [None, 1, 3, (3, 3), (2, 5), (1, 3), (3, 4), 12]


def _truncated_oracle(rnn, lin, X, Y, h0, lengths, loss, output, truncation):
    """torch's gradient of a truncated, variable-length batch: the oracle, row by row.

    Why this is the oracle: rows of a batch are independent sequences, and the
    loss is a sum over rows divided by one batch-wide count of valid positions,
    so the batch gradient is the sum of the per-row gradients of (row's loss
    sum) / count. Row b alone is an ordinary full-length sequence of
    lengths[b] steps, which plain ``nn.RNN`` runs with no packing at all; its
    truncation is DESIGN.md's, "every layer's state detached at the window's
    start", on the absolute time axis: for each window (bp_start, end) of
    ``windows(T, truncation)``, whose losses are the steps since the previous
    window's end, the row's forward is rerun from every layer's detached state
    at bp_start through min(end, lengths[b]) and only that window's losses are
    backpropagated. A row has losses only at its valid steps; with
    ``output="last"`` its one loss is at its step lengths[b], so only the
    window holding that step backpropagates it.
    """
    torch = _torch()
    F = torch.nn.functional
    Xt, Yt, h0t = torch.from_numpy(X), torch.from_numpy(Y), torch.from_numpy(h0)
    count = float(np.sum(lengths)) if output == "sequence" else float(len(lengths))
    if loss != "ce":
        count *= O_
    sums = {"mse": lambda o, y: F.mse_loss(o, y, reduction="sum"),
            "bce": lambda o, y: F.binary_cross_entropy_with_logits(o, y, reduction="sum"),
            "ce": lambda o, y: F.cross_entropy(o, y, reduction="sum")}[loss]
    ends, bp_starts = windows(X.shape[0], truncation)
    for b, Lb in enumerate(lengths.tolist()):
        xb, hb = Xt[:Lb, b:b + 1], h0t[:, b:b + 1]
        with torch.no_grad():
            states = [hb]                           # every layer's state after each step: (n, 1, H)
            for t in range(Lb):
                states.append(rnn(xb[t:t + 1], states[-1])[1])
        loss_start = 0
        for end, bp in zip(ends.tolist(), bp_starts.tolist()):
            lo, hi = loss_start, min(end, Lb)       # this window's loss steps within the row: [lo, hi)
            loss_start = end
            if output == "last":
                lo, hi = (Lb - 1, Lb) if lo <= Lb - 1 < end else (0, 0)
            if lo >= hi:
                continue
            out_w, _ = rnn(xb[bp:hi], states[bp])   # from the detached states at the window's start
            o = lin(out_w[lo - bp:hi - bp, 0])
            y = Yt[lo:hi, b] if output == "sequence" else Yt[b:b + 1]
            (sums(o, y) / count).backward()


@functools.lru_cache(maxsize=None)
def _trunc_case(L, loss, output, act, truncation):
    """Inputs, torch's whole-batch loss and h_n (packed) and the truncated gradients (per-row oracle)."""
    torch = _torch()
    lengths = np.array(TRUNC_LENGTHS, dtype=np.int64)
    seed, X, Y, h0 = _problem("trunc", L, False, loss, output, TRUNC_LENGTHS, T=TRUNC_T)
    rnn, lin = _torch_model(L, False, act, seed)
    with torch.no_grad():
        _, _, out, h_n = _packed_run(rnn, X, h0, lengths)
        if output == "sequence":
            mask = torch.from_numpy(_valid(lengths, TRUNC_T))
            value = _loss_mean(lin(out)[mask], torch.from_numpy(Y)[mask], loss).item()
        else:
            value = _loss_mean(lin(_last_rows(out, lengths, False)), torch.from_numpy(Y), loss).item()
    _truncated_oracle(rnn, lin, X, Y, h0, lengths, loss, output, truncation)
    return {"params": fastbptt.RNNParams.from_torch(rnn, lin), "X": X, "Y": Y, "h0": _user_state(h0, L),
            "lengths": lengths, "loss": value, "layers": _torch_layer_grads(rnn, L, 1),
            "W_hy": lin.weight.grad.numpy().copy(), "b_y": lin.bias.grad.numpy().copy(),
            "h_n": _user_state(h_n.numpy(), L)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("truncation", TRUNCATIONS, ids=str)
@pytest.mark.parametrize("loss,output", [("mse", "sequence"), ("ce", "sequence"), ("bce", "last"), ("mse", "last")])
@pytest.mark.parametrize("L", [1, 2, 3])
def test_truncated_stack_with_lengths_matches_torch(L, loss, output, truncation, backend):
    c = _trunc_case(L, loss, output, "tanh", truncation)
    params = c["params"].copy()
    value, grads, h_last = fastbptt.loss_and_grad(params, c["X"].copy(), c["Y"].copy(), h0=c["h0"].copy(),
                                                  lengths=c["lengths"].copy(), loss=loss, output=output,
                                                  truncation=truncation, backend=backend)
    assert value == pytest.approx(c["loss"], rel=RTOL[F64], abs=RTOL[F64]), "the whole-sequence loss"
    check_layer_grads(grads, params, c["layers"], F64)
    assert_close(grads.W_hy, c["W_hy"], F64, "dW_hy")
    assert_close(grads.b_y, c["b_y"], F64, "db_y")
    assert_close(h_last, c["h_n"], F64, "h_last vs torch's h_n")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("truncation", [3, (2, 5)], ids=str)
def test_truncated_stack_relu_with_lengths_matches_torch(truncation, backend):
    c = _trunc_case(2, "mse", "sequence", "relu", truncation)
    params = c["params"].copy()
    _, grads, _ = fastbptt.loss_and_grad(params, c["X"], c["Y"], h0=c["h0"], lengths=c["lengths"],
                                         activation="relu", truncation=truncation, backend=backend)
    check_layer_grads(grads, params, c["layers"], F64)


@pytest.mark.parametrize("loss,output", [("mse", "sequence"), ("ce", "last")])
def test_truncated_oracle_without_truncation_is_the_packed_gradient(loss, output):
    """The per-row oracle itself: with truncation=None it gives torch's packed-batch gradient."""
    c = _trunc_case(2, loss, output, "tanh", None)
    rnn, lin = c["params"].to_torch()
    torch = _torch()
    _, _, out, _ = _packed_run(rnn, c["X"], c["h0"], c["lengths"])
    if output == "sequence":
        mask = torch.from_numpy(_valid(c["lengths"], TRUNC_T))
        _loss_mean(lin(out)[mask], torch.from_numpy(c["Y"])[mask], loss).backward()
    else:
        _loss_mean(lin(_last_rows(out, c["lengths"], False)), torch.from_numpy(c["Y"]), loss).backward()
    packed = _torch_layer_grads(rnn, 2, 1)
    for i in range(2):
        for w in (0, 1, 2):             # weight_ih, weight_hh, bias_ih (∂L/∂b_h, however b_h is split)
            np.testing.assert_allclose(c["layers"][i][w], packed[i][w], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(c["W_hy"], lin.weight.grad.numpy(), rtol=1e-12, atol=1e-15)


# ------------------------------------------------------ padding is never read
NAN_CASES = [  # (L, bi, loss, output, activation, truncation)
    (2, True, "mse", "sequence", "tanh", None),
    (1, False, "bce", "sequence", "relu", None),
    (3, False, "ce", "sequence", "tanh", (2, 5)),
    (2, False, "mse", "last", "tanh", 3),
    (1, True, "ce", "last", "tanh", None),
    (2, False, "bce", "sequence", "tanh", 1),
]
NAN_IDS = ["L2-bi-mse", "L1-bce-relu", "L3-ce-k2_5", "L2-mse-last-k3", "L1-bi-ce-last", "L2-bce-k1"]


def _assert_same(a, b, what):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
    assert np.array_equal(a, b), f"{what}: not bit-identical (max |diff| {np.nanmax(np.abs(a - b))})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,bi,loss,output,act,truncation", NAN_CASES, ids=NAN_IDS)
def test_loss_and_grad_padding_is_never_read(L, bi, loss, output, act, truncation, backend):
    """Padding in X (and Y for output="sequence") filled with NaN, ±inf or bad class ids: bit-identical results."""
    lengths = np.array(LENGTHS["distinct"])
    valid = _valid(lengths, T_)
    seed, X, Y, h0 = _problem("nan", L, bi, loss, output, LENGTHS["distinct"])
    params = fastbptt.RNNParams.init(D_, H_, O_, num_layers=L, bidirectional=bi, dtype=F64, seed=seed)
    kw = dict(h0=_user_state(h0, L * (2 if bi else 1)), lengths=lengths, loss=loss, output=output,
              activation=act, truncation=truncation, backend=backend)
    ref = fastbptt.loss_and_grad(params, X, Y, **kw)
    X_bad = _bad_pad(X, valid, seed)
    Y_bad = _bad_pad(Y, valid, seed + 1) if output == "sequence" else Y
    X_zero = _fill(X, valid, 0.0)
    for name, (Xp, Yp) in {"NaN/inf": (X_bad, Y_bad), "zeros": (X_zero, Y)}.items():
        Xc, Yc = Xp.copy(), Yp.copy()
        value, grads, h_last = fastbptt.loss_and_grad(params, Xp, Yp, **kw)
        assert value == ref[0], f"{name} padding: loss {value} != {ref[0]}"
        for i, (g, r) in enumerate(zip(grads.arrays(), ref[1].arrays())):
            _assert_same(g, r, f"{name} padding: grads.arrays()[{i}]")
        _assert_same(h_last, ref[2], f"{name} padding: h_last")
        np.testing.assert_array_equal(Xp, Xc, err_msg="X mutated")
        np.testing.assert_array_equal(Yp, Yc, err_msg="Y mutated")
    assert np.isfinite(ref[0]) and all(np.all(np.isfinite(g)) for g in ref[1].arrays())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,bi", [(1, False), (2, True), (3, False)], ids=["L1", "L2-bi", "L3"])
def test_forward_rnn_vjp_padding_is_never_read(L, bi, backend):
    """X and d_output with NaN/inf at padded steps: forward, rnn and rnn_vjp bit-identical.

    ``O_logits`` is compared at the valid steps only (unspecified at padded ones)."""
    lengths = np.array(LENGTHS["ties"])
    valid = _valid(lengths, T_)
    n, dirs = L * (2 if bi else 1), 2 if bi else 1
    seed, X, _, h0 = _problem("nan-vjp", L, bi, "mse", "sequence", LENGTHS["ties"])
    h0 = _user_state(h0, n)
    params = fastbptt.RNNParams.init(D_, H_, O_, num_layers=L, bidirectional=bi, dtype=F64, seed=seed)
    rng = np.random.default_rng(seed)
    dO = rng.normal(size=(T_, len(lengths), dirs * H_))
    dH = rng.normal(size=np.shape(h0))
    X_bad, dO_bad = _bad_pad(X, valid, seed), _bad_pad(dO, valid, seed + 1)

    def run(Xp, dOp):
        O_logits, Hs = fastbptt.forward(params, Xp, h0, lengths=lengths, backend=backend)
        out, h_n = fastbptt.rnn(params, Xp, h0, lengths=lengths, backend=backend)
        out2, h_n2, vjp = fastbptt.rnn_vjp(params, Xp, h0, lengths=lengths, backend=backend)
        grads, dX, dh0 = vjp(dOp, dH)
        return {"O_logits[valid]": O_logits[valid], "Hs": Hs, "rnn output": out, "rnn h_n": h_n,
                "rnn_vjp output": out2, "rnn_vjp h_n": h_n2, "dX": dX, "dh0": dh0,
                **{f"vjp grads[{i}]": g for i, g in enumerate(grads.arrays())}}

    ref = run(X, dO)
    for name, args in {"NaN/inf": (X_bad, dO_bad), "zeros": (_fill(X, valid, 0.0), _fill(dO, valid, 0.0))}.items():
        got = run(*args)
        for key in ref:
            _assert_same(got[key], ref[key], f"{name} padding: {key}")
    assert all(np.all(np.isfinite(v)) for v in ref.values())


# ------------------------------------------------------ padded work is skipped
KERNEL_SHAPES = {        # (T, B, H): Cython's small loop (B·H <= 16), BLAS steps, Numba's loop at B = 1, large H
    "T7B4H3": (7, 4, 3),
    "T9B5H8": (9, 5, 8),
    "T6B3H40": (6, 3, 40),
    "T5B2H129": (5, 2, 129),
    "T8B6H17": (8, 6, 17),
}
KERNEL_TRUNC = {"full": None, "k2": 2, "k1k2_2_3": (2, 3), "k1k2_3_2": (3, 2)}   # (3, 2): windows with gaps
SENTINEL = -1234.5


def _kernel_calls(name):
    """``(label, kwargs)``: the ways to call a backend's kernels (threads, and Cython's forced routes)."""
    calls = [("threads=1", {}), ("threads=2", {"threads": 2})]
    if name == "cython":
        calls += [("small loop", {"_path": 1}), ("BLAS", {"_path": 0}), ("SIMD kernels", {"_path": 2}),
                  ("2 threads, rows", {"threads": 2, "_split": 0}),
                  ("2 threads, columns", {"threads": 2, "_split": 1}),
                  ("packed columns", {"_split": 2}), ("2 threads, packed columns", {"threads": 2, "_split": 2}),
                  ("2 threads, packed rows", {"threads": 2, "_split": 3})]
    return calls


def _kernel_problem(T, B, H, dtype, full_top, seed):
    """Inputs with NaN at every padded position of A and G, lengths sorted (longest first) and batch_sizes."""
    rng = np.random.default_rng(seed)
    lengths = np.sort(rng.integers(1, T, size=B))[::-1].copy()         # all < T: the last step runs on no row
    if full_top:
        lengths[0], lengths[-1] = T, 1
    bs = (lengths[None, :] > np.arange(T)[:, None]).sum(axis=1).astype(np.int64)
    valid = _valid(lengths, T)
    A = _fill(rng.normal(scale=0.8, size=(T, B, H)), valid, np.nan).astype(dtype)
    G = _fill(rng.normal(size=(T, B, H)), valid, np.nan).astype(dtype)
    W_hh = rng.normal(scale=1.2 / np.sqrt(H), size=(H, H)).astype(dtype)
    h0 = rng.normal(scale=0.5, size=(B, H)).astype(dtype)
    return lengths, bs, valid, A, G, W_hh, h0


def _per_row_reference(A, W_hh, h0, G, act, ends, bp_starts, lengths):
    """Each row alone over its own length on the reference kernels (no batch_sizes): Hs[1:], dZ, (T, B, H)."""
    T, B, H = A.shape
    Hs_all, dZ_all = np.zeros_like(A), np.zeros_like(A)
    for b, Lb in enumerate(lengths.tolist()):
        Hs = np.empty((Lb + 1, 1, H), dtype=A.dtype)
        Hs[0] = h0[b]
        R.forward_recurrence(np.ascontiguousarray(A[:Lb, b:b + 1]), np.ascontiguousarray(W_hh.T), Hs, act)
        keep = bp_starts < Lb                       # the windows that reach into the row, cut at its end
        dZ = np.empty((Lb, 1, H), dtype=A.dtype)
        R.backward_accumulate(np.ascontiguousarray(G[:Lb, b:b + 1]), Hs, W_hh,
                              np.minimum(ends[keep], Lb), bp_starts[keep].copy(), act, dZ)
        Hs_all[:Lb, b], dZ_all[:Lb, b] = Hs[1:, 0], dZ[:, 0]
    return Hs_all, dZ_all


@pytest.mark.parametrize("full_top", [False, True], ids=["all-short", "with-T-and-1"])
@pytest.mark.parametrize("truncation", list(KERNEL_TRUNC.values()), ids=list(KERNEL_TRUNC))
@pytest.mark.parametrize("shape", list(KERNEL_SHAPES.values()), ids=list(KERNEL_SHAPES))
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", BACKENDS)
def test_kernels_compute_only_the_active_rows(name, dtype, shape, truncation, full_top):
    """``batch_sizes``: the kernels never write the padded rows of Hs (preset to a sentinel), never read
    A or G there (NaN), and the valid rows equal each row run alone over its own length."""
    kernels = resolve_backend(name)
    T, B, H = shape
    lengths, bs, valid, A, G, W_hh, h0 = _kernel_problem(T, B, H, dtype, full_top, _seed(shape, full_top))
    ends, bp_starts = windows(T, truncation)
    A0, G0, W0 = A.copy(), G.copy(), W_hh.copy()
    for act in (0, 1):
        Hs_ref, dZ_ref = _per_row_reference(A.astype(F64), W_hh.astype(F64), h0.astype(F64),
                                            G.astype(F64), act, ends, bp_starts, lengths)
        for label, kw in _kernel_calls(name):
            Hs = np.full((T + 1, B, H), SENTINEL, dtype=dtype)
            Hs[0] = h0
            kernels.forward_recurrence(A, np.ascontiguousarray(W_hh.T), Hs, act, batch_sizes=bs, **kw)
            assert np.all(Hs[1:][~valid] == SENTINEL), f"{label}, act {act}: the forward wrote padded rows of Hs"
            err = rel_err(Hs[1:][valid], Hs_ref[valid])
            assert err <= RTOL[dtype], f"{label}, act {act}: Hs at valid rows, relative error {err:.3g}"
            dZ = np.full((T, B, H), SENTINEL, dtype=dtype)
            kernels.backward_accumulate(G, Hs, W_hh, ends, bp_starts, act, dZ, batch_sizes=bs, **kw)
            assert np.all(np.isfinite(dZ[valid])), f"{label}, act {act}: padding (NaN) reached dZ"
            err = rel_err(dZ[valid], dZ_ref[valid])
            assert err <= RTOL[dtype], f"{label}, act {act}: dZ at valid rows, relative error {err:.3g}"
            for arr, arr0, nm in ((A, A0, "A"), (G, G0, "G"), (W_hh, W0, "W_hh")):
                assert np.array_equal(arr, arr0, equal_nan=True), f"{label}: the kernels wrote {nm}"


def _dz_cases():
    return [pytest.param(name, truncation, id=f"{name}-{tid}")
            for name in BACKENDS for tid, truncation in KERNEL_TRUNC.items()]


@pytest.mark.parametrize("name,truncation", _dz_cases())
def test_backward_kernel_leaves_padded_rows_of_dZ_alone(name, truncation):
    """The contract: ``dZ[t]`` at rows ``b >= n_t`` (preset to a sentinel) is left alone or zeroed, nothing else."""
    kernels = resolve_backend(name)
    for shape in KERNEL_SHAPES.values():
        T, B, H = shape
        lengths, bs, valid, A, G, W_hh, h0 = _kernel_problem(T, B, H, F64, False, _seed("dZ", shape))
        ends, bp_starts = windows(T, truncation)
        for label, kw in _kernel_calls(name):
            Hs = np.full((T + 1, B, H), SENTINEL)
            Hs[0] = h0
            kernels.forward_recurrence(A, np.ascontiguousarray(W_hh.T), Hs, 0, batch_sizes=bs, **kw)
            dZ = np.full((T, B, H), SENTINEL)
            kernels.backward_accumulate(G, Hs, W_hh, ends, bp_starts, 0, dZ, batch_sizes=bs, **kw)
            pad = dZ[~valid]
            assert np.all((pad == SENTINEL) | (pad == 0)), f"{shape} {label}: the backward wrote padded rows of dZ"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,bi,truncation", [(2, True, None), (2, False, 3), (1, False, (2, 5))],
                         ids=["L2-bi", "L2-k3", "L1-k2_5"])
def test_engine_gives_the_kernels_the_active_rows_only(L, bi, truncation, backend, monkeypatch):
    """Every kernel call of a variable-length batch gets ``batch_sizes``; the forward's add up to Σ lengths."""
    kernels = resolve_backend(backend)
    calls = []

    def recording(kernel, kind):
        def wrapper(*args, **kw):
            calls.append((kind, kw.get("batch_sizes")))
            return kernel(*args, **kw)
        return wrapper

    monkeypatch.setattr(kernels, "forward_recurrence", recording(kernels.forward_recurrence, "forward"))
    monkeypatch.setattr(kernels, "backward_accumulate", recording(kernels.backward_accumulate, "backward"))
    lengths = np.array(LENGTHS["distinct"])
    seed, X, Y, h0 = _problem("work", L, bi, "mse", "sequence", LENGTHS["distinct"])
    params = fastbptt.RNNParams.init(D_, H_, O_, num_layers=L, bidirectional=bi, dtype=F64, seed=seed)
    fastbptt.loss_and_grad(params, X, Y, lengths=lengths, truncation=truncation, backend=backend)
    n = L * (2 if bi else 1)
    assert [k for k, _ in calls].count("forward") == n and "backward" in [k for k, _ in calls]
    expected = np.sort(lengths)[::-1]
    expected_bs = (expected[None, :] > np.arange(T_)[:, None]).sum(axis=1)
    for kind, bs in calls:
        assert bs is not None, f"a {kind} kernel call without batch_sizes: it computes the padding"
        if kind == "forward":
            np.testing.assert_array_equal(bs, expected_bs)
            assert int(np.sum(bs)) == int(lengths.sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,bi,truncation", [(2, True, None), (2, False, 3)], ids=["L2-bi", "L2-k3"])
def test_huge_nan_padding_costs_nothing_and_changes_nothing(L, bi, truncation, backend):
    """T = 3000 padded with NaN around sequences of <= 8 steps: finite, and the result of T = 8."""
    lengths = np.array([5, 1, 8, 3])
    T_short, T_long = 8, 3000
    seed, X, Y, h0 = _problem("huge", L, bi, "mse", "sequence", tuple(lengths), T=T_short)
    params = fastbptt.RNNParams.init(D_, H_, O_, num_layers=L, bidirectional=bi, dtype=F64, seed=seed)
    X_long = np.full((T_long, 4, D_), np.nan)
    Y_long = np.full((T_long, 4, O_), np.nan)
    X_long[:T_short], Y_long[:T_short] = X, Y
    valid = _valid(lengths, T_short)
    X_long[:T_short][~valid] = np.nan
    Y_long[:T_short][~valid] = np.nan
    h0 = _user_state(h0, L * (2 if bi else 1))
    kw = dict(h0=h0, lengths=lengths, truncation=truncation, backend=backend)
    value, grads, h_last = fastbptt.loss_and_grad(params, X_long, Y_long, **kw)
    ref = fastbptt.loss_and_grad(params, X, Y, **kw)    # k = 3 cuts at the same absolute steps
    assert np.isfinite(value) and value == pytest.approx(ref[0], rel=RTOL[F64], abs=RTOL[F64])
    for i, (g, r) in enumerate(zip(grads.arrays(), ref[1].arrays())):
        assert np.all(np.isfinite(g)), f"grads.arrays()[{i}]: padding leaked in"
        assert rel_err(g, r) <= RTOL[F64], f"grads.arrays()[{i}]"
    assert rel_err(h_last, ref[2]) <= RTOL[F64]
    out, _ = fastbptt.rnn(params, X_long, h0, lengths=lengths, backend=backend)
    assert np.all(out[T_short:] == 0) and np.all(np.isfinite(out))


# ----------------------------------------------------------------- bad input
BAD_LENGTHS = [  # (id, lengths for T = 6, B = 5, exception, patterns the message must match)
    ("zero", [4, 0, 6, 2, 5], ValueError, [r"\[1, 6\]", r"got .*\[0, 6\]"]),
    ("T+1", [4, 1, 7, 2, 5], ValueError, [r"\[1, 6\]", r"got .*\[1, 7\]"]),
    ("negative", [4, 1, -3, 2, 5], ValueError, [r"\[1, 6\]", r"-3"]),
    ("too-few", [4, 1, 6, 2], ValueError, [r"\(5,\)", r"got \(4,\)"]),
    ("too-many", [4, 1, 6, 2, 5, 3], ValueError, [r"\(5,\)", r"got \(6,\)"]),
    ("2-D", [[4, 1, 6, 2, 5]], ValueError, [r"\(5,\)", r"got \(1, 5\)"]),
    ("column", [[4], [1], [6], [2], [5]], ValueError, [r"\(5,\)", r"got \(5, 1\)"]),
    ("scalar", 4, ValueError, [r"\(5,\)", r"got \(\)"]),
    ("float", [4.0, 1.0, 6.0, 2.0, 5.0], TypeError, [r"integer", r"float64"]),
    ("float32", np.array([4, 1, 6, 2, 5], dtype=np.float32), TypeError, [r"integer", r"float32"]),
    ("bool", [True, True, True, True, True], TypeError, [r"integer", r"bool"]),
    ("str", ["4", "1", "6", "2", "5"], TypeError, [r"integer", r"U1|str"]),
]


def _call(fn, params, X, Y, h0, lengths, backend):
    if fn == "forward":
        return fastbptt.forward(params, X, h0, lengths=lengths, backend=backend)
    if fn == "loss_and_grad":
        return fastbptt.loss_and_grad(params, X, Y, h0=h0, lengths=lengths, backend=backend)
    if fn == "rnn":
        return fastbptt.rnn(params, X, h0, lengths=lengths, backend=backend)
    return fastbptt.rnn_vjp(params, X, h0, lengths=lengths, backend=backend)


FUNCS = ["forward", "loss_and_grad", "rnn", "rnn_vjp"]


def _snapshot(*arrays):
    return [np.array(a, copy=True) for a in arrays]


def _unchanged(arrays, snapshot):
    return all(np.array_equal(np.asarray(a), s, equal_nan=True) for a, s in zip(arrays, snapshot))


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("case", BAD_LENGTHS, ids=[c[0] for c in BAD_LENGTHS])
def test_bad_lengths_are_refused(case, fn):
    _, lengths, exc, patterns = case
    seed, X, Y, h0 = _problem("bad", 2, False, "mse", "sequence", LENGTHS["distinct"])
    params = fastbptt.RNNParams.init(D_, H_, O_, num_layers=2, dtype=F64, seed=seed)
    inputs = [X, Y, h0] + list(params.arrays())
    before, lengths_before = _snapshot(*inputs), repr(lengths)
    with pytest.raises(exc) as info:
        _call(fn, params, X, Y, h0, lengths, "numpy")
    msg = str(info.value)
    assert msg.startswith("lengths: "), f"the message must name lengths: {msg!r}"
    for pattern in patterns:          # what was expected, what was given
        assert re.search(pattern, msg), f"{pattern!r} not in {msg!r}"
    assert _unchanged(inputs, before) and repr(lengths) == lengths_before, "an input was mutated"


@pytest.mark.parametrize("fn", FUNCS)
def test_lengths_with_2d_x_are_refused(fn):
    """A 2-D X is one sequence of length T: lengths (even a correct [T]) are an error."""
    seed, X, Y, h0 = _problem("bad2d", 1, False, "mse", "sequence", (6,))
    params = fastbptt.RNNParams.init(D_, H_, O_, dtype=F64, seed=seed)
    X2, Y2, h02 = X[:, 0], Y[:, 0], h0[0, 0]
    for lengths in ([6], np.array([3]), 6):
        before = _snapshot(X2, Y2, h02)
        with pytest.raises(ValueError, match=r"^lengths: .*2-D X.*\(T, B, D\).*got lengths="):
            _call(fn, params, X2, Y2, h02, lengths, "numpy")
        assert _unchanged([X2, Y2, h02], before)


@pytest.mark.parametrize("fn", FUNCS)
def test_nan_within_a_length_is_still_refused(fn):
    """Only the padding may hold NaN: a NaN at a valid step of X is an error naming X (and of Y, d_output)."""
    lengths = np.array(LENGTHS["distinct"])
    seed, X, Y, h0 = _problem("nan-valid", 1, True, "mse", "sequence", LENGTHS["distinct"])
    params = fastbptt.RNNParams.init(D_, H_, O_, bidirectional=True, dtype=F64, seed=seed)
    X_bad = X.copy()
    X_bad[lengths[0] - 1, 0, 1] = np.nan                    # row 0's own last step
    with pytest.raises(ValueError, match=r"^X: .*finite"):
        _call(fn, params, X_bad, Y, h0, lengths, "numpy")
    if fn == "loss_and_grad":
        Y_bad = Y.copy()
        Y_bad[0, 1, 0] = np.inf                             # row 1 has length 1: step 0 is valid
        with pytest.raises(ValueError, match=r"^Y: .*finite"):
            fastbptt.loss_and_grad(params, X, Y_bad, h0=h0, lengths=lengths, backend="numpy")
    if fn == "rnn_vjp":
        _, _, vjp = fastbptt.rnn_vjp(params, X, h0, lengths=lengths, backend="numpy")
        dO = np.zeros((T_, len(lengths), 2 * H_))
        dO[lengths[2] - 1, 2, 0] = np.nan
        with pytest.raises(ValueError, match=r"^d_output: .*finite"):
            vjp(dO)
