"""``fastbptt.torch.RNN``: the drop-in for ``torch.nn.RNN``, checked against ``torch.nn.RNN`` itself.

Parity is in float64 to 1e-10 (``helpers.RTOL``): forward (output, h_n) and every
gradient after ``backward`` (input, hx, each parameter), over every constructor
option and input form (padded, packed, unbatched); a torch training loop step for
step; ``state_dict`` both ways; the same initial values under one seed;
``gradcheck`` and ``opcheck``; ``torch.compile``; the errors; the threads.
"""

import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest

from helpers import RTOL, rel_err

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastbptt.torch")
F = torch.nn.functional
rnn_utils = torch.nn.utils.rnn

TOL = RTOL[np.float64]
DT = torch.float64


def _pair(seed=0, **kw):
    """(fastbptt.torch.RNN, torch.nn.RNN) with the same weights (ours drawn under ``seed``)."""
    kw.setdefault("dtype", DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # dropout with one layer warns, as nn.RNN does
        torch.manual_seed(seed)
        ours = ft.RNN(**kw)
        ref = torch.nn.RNN(**kw)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _close(a, b, what):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = rel_err(a.detach().numpy(), b.detach().numpy())
    assert err < TOL, f"{what}: rel err {err:.2e}"


def _lengths(B, T, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[int(torch.randint(0, B, (1,), generator=g))] = T        # one full row
    return lengths


def _run(module, kind, x, hx, lengths):
    """Forward of ``kind`` ("padded", "packed", "unbatched"); returns (output tensor, h_n)."""
    if kind == "packed":
        packed = rnn_utils.pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=False)
        out, h_n = module(packed, hx)
        assert isinstance(out, rnn_utils.PackedSequence)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        assert torch.equal(out.sorted_indices, packed.sorted_indices)
        assert torch.equal(out.unsorted_indices, packed.unsorted_indices)
        return out.data, h_n
    return module(x, hx)


def _inputs(kind, ours, T=6, B=4, seed=0, with_hx=True):
    g = torch.Generator().manual_seed(seed)
    n = ours.num_layers * (2 if ours.bidirectional else 1)
    H = ours.hidden_size
    if kind == "unbatched":
        x = torch.randn(T, ours.input_size, generator=g, dtype=DT)
        hx = torch.randn(n, H, generator=g, dtype=DT) if with_hx else None
    else:
        shape = (B, T, ours.input_size) if ours.batch_first else (T, B, ours.input_size)
        x = torch.randn(*shape, generator=g, dtype=DT)
        hx = torch.randn(n, B, H, generator=g, dtype=DT) if with_hx else None
    x.requires_grad_()
    if hx is not None:
        hx = hx * 0.5
        hx.requires_grad_()
    return x, hx


def _grads_both(ours, ref, kind, x, hx, lengths, seed=1):
    """Forward both, backward a random linear function of (output, h_n); compare everything."""
    out_a, h_a = _run(ours, kind, x, hx, lengths)
    out_b, h_b = _run(ref, kind, x, hx, lengths)
    _close(out_a, out_b, "output")
    _close(h_a, h_b, "h_n")
    g = torch.Generator().manual_seed(seed)
    d_out = torch.randn(out_b.shape, generator=g, dtype=DT)
    d_h = torch.randn(h_b.shape, generator=g, dtype=DT)
    leaves = [x] + ([hx] if hx is not None else [])
    ga = torch.autograd.grad((out_a * d_out).sum() + (h_a * d_h).sum(), leaves + list(ours.parameters()))
    gb = torch.autograd.grad((out_b * d_out).sum() + (h_b * d_h).sum(), leaves + list(ref.parameters()))
    names = ["input"] + (["hx"] if hx is not None else []) + [n for n, _ in ours.named_parameters()]
    for name, a, b in zip(names, ga, gb):
        _close(a, b, f"d {name}")


# ------------------------------------------------------------------ the package stays torch-free
def test_import_fastbptt_does_not_import_torch():
    code = "import sys, fastbptt; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stderr


# ------------------------------------------------------------------ parameters and state_dict
CONFIGS = [dict(num_layers=L, bidirectional=bi, nonlinearity=act, bias=bias)
           for L in (1, 2) for bi in (False, True) for act in ("tanh", "relu") for bias in (True, False)]


def _cfg_id(c):
    return f"L{c['num_layers']}-{'bi' if c['bidirectional'] else 'uni'}-{c['nonlinearity']}-" \
           f"{'bias' if c['bias'] else 'nobias'}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_same_parameters_and_init_as_nn_rnn(cfg, dtype):
    torch.manual_seed(123)
    ours = ft.RNN(5, 7, dtype=dtype, **cfg)
    torch.manual_seed(123)
    ref = torch.nn.RNN(5, 7, dtype=dtype, **cfg)
    a, b = dict(ours.named_parameters()), dict(ref.named_parameters())
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert repr(ours) == repr(ref)
    # the random stream is left where nn.RNN leaves it
    torch.manual_seed(9)
    ft.RNN(5, 7, dtype=dtype, **cfg)
    after_ours = torch.rand(3)
    torch.manual_seed(9)
    torch.nn.RNN(5, 7, dtype=dtype, **cfg)
    assert torch.equal(after_ours, torch.rand(3))


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_state_dict_both_ways(cfg):
    torch.manual_seed(1)
    ours, ref = ft.RNN(3, 4, dtype=DT, **cfg), torch.nn.RNN(3, 4, dtype=DT, **cfg)
    ref2 = torch.nn.RNN(3, 4, dtype=DT, **cfg)
    ours.load_state_dict(ref.state_dict())                 # nn.RNN -> ours (strict)
    ref2.load_state_dict(ours.state_dict())                # ours -> nn.RNN (strict)
    x = torch.randn(5, 2, 3, dtype=DT)
    for a, b in ((ours(x), ref(x)), (ours(x), ref2(x))):
        _close(a[0], b[0], "output")
        _close(a[1], b[1], "h_n")


def test_positional_arguments_and_constructor_errors_as_nn_rnn():
    ours = ft.RNN(3, 4, 2, "relu", False, True, 0.0, True)
    ref = torch.nn.RNN(3, 4, 2, "relu", False, True, 0.0, True)
    assert repr(ours) == repr(ref)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    with pytest.raises(ValueError, match="nonlinearity"):
        ft.RNN(3, 4, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="dropout"):
        ft.RNN(3, 4, dropout=1.5)
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        ft.RNN(3, 4, dropout=0.5)


# ------------------------------------------------------------------ parity: every option x input form
KINDS = ["padded", "packed", "unbatched"]


@pytest.fixture(params=["eager", "op"])
def path(request, monkeypatch):
    """Eager calls take an autograd.Function, traced ones the custom op: run a test on each."""
    if request.param == "op":
        monkeypatch.setattr(ft, "_eager", lambda tensors: False)
    return request.param


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_major", "batch_first"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_parity_with_nn_rnn(cfg, batch_first, kind, path):
    ours, ref = _pair(input_size=3, hidden_size=5, batch_first=batch_first, **cfg)
    x, hx = _inputs(kind, ours, seed=len(str(cfg)))
    lengths = _lengths(x.shape[0] if batch_first else x.shape[1], 6, seed=3) if kind == "packed" else None
    _grads_both(ours, ref, kind, x, hx, lengths)


@pytest.mark.parametrize("kind", KINDS)
def test_parity_without_hx(kind, path):
    ours, ref = _pair(input_size=3, hidden_size=5, num_layers=2, bidirectional=True)
    x, _ = _inputs(kind, ours, with_hx=False)
    _grads_both(ours, ref, kind, x, None, _lengths(4, 6, seed=4) if kind == "packed" else None)


def test_parity_float32():
    ours, ref = _pair(input_size=3, hidden_size=16, num_layers=2, bidirectional=True, dtype=torch.float32)
    x = torch.randn(20, 8, 3)
    (oa, ha), (ob, hb) = ours(x), ref(x)
    assert rel_err(oa.detach().numpy(), ob.detach().numpy()) < 1e-5
    assert rel_err(ha.detach().numpy(), hb.detach().numpy()) < 1e-5
    (oa.sum() + ha.sum()).backward()
    (ob.sum() + hb.sum()).backward()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert rel_err(a.grad.numpy(), b.grad.numpy()) < 1e-5, name


def test_packed_sorted_input_and_hx_permutation():
    """enforce_sorted=True (no indices) and a batch whose lengths tie, with an hx to permute."""
    ours, ref = _pair(input_size=2, hidden_size=3, num_layers=2)
    x = torch.randn(5, 4, 2, dtype=DT, requires_grad=True)
    hx = torch.randn(2, 4, 3, dtype=DT, requires_grad=True)
    packed = rnn_utils.pack_padded_sequence(x, torch.tensor([5, 4, 4, 2]))
    (oa, ha), (ob, hb) = ours(packed, hx), ref(packed, hx)
    assert oa.sorted_indices is None and ob.sorted_indices is None
    _close(oa.data, ob.data, "output")
    _close(ha, hb, "h_n")
    tied = torch.tensor([3, 5, 3, 5])
    packed = rnn_utils.pack_padded_sequence(x.transpose(0, 1), tied, batch_first=True, enforce_sorted=False)
    (oa, ha), (ob, hb) = ours(packed, hx), ref(packed, hx)
    _close(oa.data, ob.data, "output")
    _close(ha, hb, "h_n")
    pa, la = rnn_utils.pad_packed_sequence(oa)
    assert torch.equal(la, tied)
    assert torch.all(pa[3:, [0, 2]] == 0)                    # zeros at padded steps


def test_non_contiguous_input_and_hx():
    ours, ref = _pair(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    base = torch.randn(8, 6, 6, dtype=DT)
    x = base[::2, 1:5, ::2]                                  # (4, 4, 3), every axis strided
    hx = torch.randn(4, 4, 6, dtype=DT)[..., :4]
    assert not x.is_contiguous() and not hx.is_contiguous()
    x.requires_grad_()
    hx.requires_grad_()
    _grads_both(ours, ref, "padded", x, hx, None)


def test_dropout_draws_as_nn_rnn(path):
    """Dropout between layers is torch's: under one seed the same mask as nn.RNN (padded and packed)."""
    for kind in ("padded", "packed"):
        for bf in (False, True):
            ours, ref = _pair(input_size=3, hidden_size=5, num_layers=3, bidirectional=True, dropout=0.4,
                              batch_first=bf)
            x, hx = _inputs(kind, ours, seed=7)
            lengths = _lengths(4, 6, seed=8) if kind == "packed" else None
            torch.manual_seed(42)
            oa, ha = _run(ours, kind, x, hx, lengths)
            torch.manual_seed(42)
            ob, hb = _run(ref, kind, x, hx, lengths)
            _close(oa, ob, f"output with dropout ({kind}, batch_first={bf})")
            _close(ha, hb, "h_n with dropout")
            (oa.square().sum() + ha.sum()).backward()
            (ob.square().sum() + hb.sum()).backward()
            for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
                _close(a.grad, b.grad, f"d {name} with dropout")
            assert not torch.equal(oa, _run(ours.eval(), kind, x, hx, lengths)[0])
            ref.eval()
            _close(_run(ours, kind, x, hx, lengths)[0], _run(ref, kind, x, hx, lengths)[0], "eval: no dropout")


def test_functional_call_and_deepcopy():
    ours, ref = _pair(input_size=3, hidden_size=4)
    x = torch.randn(5, 2, 3, dtype=DT)
    new = {k: v * 2 for k, v in ref.state_dict().items()}
    a = torch.func.functional_call(ours, new, (x,))
    b = torch.func.functional_call(ref, new, (x,))
    _close(a[0], b[0], "functional_call output")
    twin = copy.deepcopy(ours)
    _close(twin(x)[0], ours(x)[0], "deepcopy")


# ------------------------------------------------------------------ a torch training loop, step for step
def _train(module_cls, state, *, steps=36, k=6, seed=0, dropout=0.0, num_layers=1):
    """A char-model loop as torch users write it: Linear head, cross-entropy, Adam, clip_grad_norm_,
    the hidden state carried across windows of k steps and detached between them."""
    V, H, B = 11, 16, 3
    torch.manual_seed(seed)
    rnn = module_cls(V, H, num_layers=num_layers, dropout=dropout, batch_first=True, dtype=DT)
    rnn.load_state_dict(state["rnn"])
    head = torch.nn.Linear(H, V, dtype=DT)
    head.load_state_dict(state["head"])
    opt = torch.optim.Adam(list(rnn.parameters()) + list(head.parameters()), lr=0.01)
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, V, (B, steps * k + 1), generator=g)
    h = None
    losses = []
    for s in range(steps):
        chunk = text[:, s * k:(s + 1) * k + 1]
        x = F.one_hot(chunk[:, :-1], V).to(DT)
        out, h = rnn(x, h)
        loss = F.cross_entropy(head(out).reshape(-1, V), chunk[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(rnn.parameters()) + list(head.parameters()), 0.5)
        opt.step()
        h = h.detach()
        losses.append(loss.item())
    return np.array(losses), rnn.state_dict()


@pytest.mark.parametrize("num_layers,dropout", [(1, 0.0), (2, 0.25)], ids=["L1", "L2-dropout"])
def test_training_loop_matches_nn_rnn_step_for_step(num_layers, dropout, path):
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        init = torch.nn.RNN(11, 16, num_layers=num_layers, batch_first=True, dtype=DT)
    state = {"rnn": init.state_dict(), "head": torch.nn.Linear(16, 11, dtype=DT).state_dict()}
    ours, ours_state = _train(ft.RNN, state, num_layers=num_layers, dropout=dropout)
    ref, ref_state = _train(torch.nn.RNN, state, num_layers=num_layers, dropout=dropout)
    assert len(ours) >= 30
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)
    assert ours[-1] < ours[0]                               # it learns
    for name in ref_state:
        _close(ours_state[name], ref_state[name], f"{name} after training")


# ------------------------------------------------------------------ gradcheck and opcheck
OP_CASES = [
    dict(L=1, bi=False, bias=True, act="tanh", lengths=None),
    dict(L=2, bi=True, bias=True, act="tanh", lengths=None),
    dict(L=2, bi=False, bias=False, act="relu", lengths=None),
    dict(L=1, bi=True, bias=True, act="tanh", lengths=[4, 2, 5]),
    dict(L=2, bi=True, bias=False, act="tanh", lengths=[1, 5, 3]),
]


def _op_args(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    dirs = 2 if case["bi"] else 1
    T, B, D, H = 5, 3, 2, 3
    ours = ft.RNN(D, H, num_layers=case["L"], bidirectional=case["bi"], bias=case["bias"], dtype=DT)
    weights = [w.detach().clone().requires_grad_() for w in ours._weights()]
    x = torch.randn(T, B, D, generator=g, dtype=DT, requires_grad=True)
    hx = (0.5 * torch.randn(case["L"] * dirs, B, H, generator=g, dtype=DT)).requires_grad_()
    lengths = None if case["lengths"] is None else torch.tensor(case["lengths"])
    return x, hx, weights, lengths


def _case_id(c):
    return f"L{c['L']}-{'bi' if c['bi'] else 'uni'}-{'bias' if c['bias'] else 'nobias'}-{c['act']}" + \
           ("-lengths" if c["lengths"] else "")


@pytest.mark.parametrize("case", OP_CASES, ids=_case_id)
def test_gradcheck(case):
    x, hx, weights, lengths = _op_args(case)

    def f(x, hx, *weights):
        out, h_n = ft.rnn(x, hx, list(weights), has_biases=case["bias"], num_layers=case["L"],
                          bidirectional=case["bi"], nonlinearity=case["act"], lengths=lengths)
        return out, h_n

    assert torch.autograd.gradcheck(f, (x, hx, *weights), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", OP_CASES, ids=_case_id)
def test_opcheck(case):
    x, hx, weights, lengths = _op_args(case)
    args = (x, hx, weights, lengths, case["bias"], case["L"], case["bi"], case["act"], True)
    torch.library.opcheck(torch.ops.fastbptt.rnn.default, args)


def test_opcheck_backward_op():
    case = OP_CASES[1]
    x, hx, weights, lengths = _op_args(case)
    out, h_n, handle = torch.ops.fastbptt.rnn(x, hx, weights, lengths, True, 2, True, "tanh", True)
    args = (torch.randn_like(out), torch.randn_like(h_n), handle, x.detach(), hx.detach(),
            [w.detach() for w in weights], lengths, True, 2, True, "tanh")
    torch.library.opcheck(torch.ops.fastbptt.rnn_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_backward_without_the_saved_vjp_recomputes():
    """A handle the backward op does not know: it recomputes the forward, same gradients."""
    x, hx, weights, lengths = _op_args(OP_CASES[1])
    args = (x.detach(), hx.detach(), [w.detach() for w in weights], None, True, 2, True, "tanh")
    out, h_n, handle = torch.ops.fastbptt.rnn(*args, True)
    d_out, d_h = torch.randn_like(out), torch.randn_like(h_n)
    saved = torch.ops.fastbptt.rnn_backward(d_out, d_h, handle, *args)
    recomputed = torch.ops.fastbptt.rnn_backward(d_out, d_h, torch.zeros(1, dtype=torch.int64), *args)
    for a, b in zip([saved[0], saved[1], *saved[2]], [recomputed[0], recomputed[1], *recomputed[2]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["eager", "op"])
def test_saved_vjps_are_freed_with_the_graph(path, monkeypatch):
    import gc
    import weakref
    if path == "op":
        monkeypatch.setattr(ft, "_eager", lambda tensors: False)
    kept = []
    real = ft._fb_rnn_vjp

    def spy(*args, **kw):
        out = real(*args, **kw)
        kept.append(weakref.ref(out[2]))
        return out

    monkeypatch.setattr(ft, "_fb_rnn_vjp", spy)
    ours, _ = _pair(input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=DT)
    gc.collect()
    before = len(ft._VJPS)
    out, h = ours(x)
    assert len(kept) == 1 and kept[0]() is not None
    assert len(ft._VJPS) == before + (path == "op")
    out.sum().backward(retain_graph=True)
    first = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    out.sum().backward()                                   # twice: the vjp can be called again
    for a, p in zip(first, ours.parameters()):
        assert torch.equal(a, p.grad)
    assert len(kept) == 1                                  # the backward used the saved vjp
    del out, h
    gc.collect()
    assert kept[0]() is None and len(ft._VJPS) == before
    with torch.no_grad():                                  # inference: no vjp at all
        ours(x)
    assert len(kept) == 1 and len(ft._VJPS) == before


def test_input_is_not_copied_before_fastbptt():
    """Zero-copy: fastbptt gets NumPy views of the tensors' memory (batch_first transposes included)."""
    seen = []
    real = ft._fb_rnn_vjp

    def spy(params, X, h0=None, **kw):
        seen.append((params, X, h0))
        return real(params, X, h0, **kw)

    ours, _ = _pair(input_size=3, hidden_size=4, batch_first=True)
    x = torch.randn(2, 5, 3, dtype=DT)
    hx = torch.randn(1, 2, 4, dtype=DT)
    ft._fb_rnn_vjp = spy
    try:
        ours(x, hx)
    finally:
        ft._fb_rnn_vjp = real
    params, X, h0 = seen[0]
    assert np.shares_memory(X, x.numpy()) and np.shares_memory(h0, hx.numpy())
    assert np.shares_memory(params.W_xh, ours.weight_ih_l0.detach().numpy())
    assert np.shares_memory(params.W_hh, ours.weight_hh_l0.detach().numpy())


# ------------------------------------------------------------------ torch.compile
def test_torch_compile_one_opaque_op():
    ours, ref = _pair(input_size=3, hidden_size=6, num_layers=2, bidirectional=True, batch_first=True)
    head = torch.nn.Linear(12, 2, dtype=DT)

    def model(rnn, x, h):
        out, h_n = rnn(x, h)
        return head(out).square().mean() + h_n.sum()

    x = torch.randn(4, 7, 3, dtype=DT)
    h = torch.zeros(4, 4, 6, dtype=DT)
    explained = torch._dynamo.explain(model)(ours, x, h)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(ours, x, h)
    loss.backward()
    ref_loss = model(ref, x, h)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-10 * abs(ref_loss.item())
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        _close(a.grad, b.grad, f"compiled d {name}")


def test_torch_compile_inductor_smoke():
    ours, ref = _pair(input_size=3, hidden_size=5, dtype=torch.float32)
    head = torch.nn.Linear(5, 2)

    def step(rnn, x):
        out, _ = rnn(x)
        return F.mse_loss(head(out), torch.ones(out.shape[:-1] + (2,)))

    x = torch.randn(6, 2, 3)
    torch._dynamo.reset()
    loss = torch.compile(step)(ours, x)
    loss.backward()
    ref_loss = step(ref, x)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert rel_err(a.grad.numpy(), b.grad.numpy()) < 1e-5


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_unsupported_dtype_names_it_and_nn_rnn(dtype):
    ours = ft.RNN(3, 4, dtype=dtype)
    with pytest.raises(TypeError, match=rf"{dtype}.*torch\.nn\.RNN"):
        ours(torch.randn(5, 2, 3, dtype=dtype))
    with pytest.raises(TypeError, match=rf"{dtype}.*torch\.nn\.RNN"):
        ours.double()(torch.randn(5, 2, 3, dtype=DT).to(dtype))


def test_mismatched_dtypes_are_refused_as_nn_rnn_does():
    ours = ft.RNN(3, 4, dtype=DT)
    with pytest.raises(ValueError, match="does not match weight dtype"):
        ours(torch.randn(5, 2, 3))
    with pytest.raises(ValueError, match="hx dtype"):
        ours(torch.randn(5, 2, 3, dtype=DT), torch.zeros(1, 2, 4))


def test_non_cpu_tensors_name_the_device_and_nn_rnn():
    ours = ft.RNN(3, 4)
    with pytest.raises(RuntimeError, match=r"meta.*torch\.nn\.RNN"):
        ours(torch.randn(5, 2, 3, device="meta"))
    with pytest.raises(RuntimeError, match=r"meta.*torch\.nn\.RNN"):
        ours(torch.randn(5, 2, 3), torch.zeros(1, 2, 4, device="meta"))
    with pytest.raises(RuntimeError, match=r"meta.*torch\.nn\.RNN"):
        ft.RNN(3, 4, device="meta")(torch.randn(5, 2, 3))
    if torch.cuda.is_available():                                              # pragma: no cover
        with pytest.raises(RuntimeError, match=r"cuda.*torch\.nn\.RNN"):
            ours(torch.randn(5, 2, 3, device="cuda"))


def test_wrong_shapes_have_nn_rnn_messages():
    ours = ft.RNN(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(2, 2, 4\), got \[1, 2, 4\]"):
        ours(x, torch.zeros(1, 2, 4))
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(2, 2, 4\), got \[2, 3, 4\]"):
        ours(x, torch.zeros(2, 3, 4))
    with pytest.raises(RuntimeError, match="hx should also be 3-D"):
        ours(x, torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="hx should also be 2-D"):
        ours(torch.randn(5, 3), torch.zeros(2, 1, 4))
    with pytest.raises(RuntimeError, match="input_size. Expected 3, got 2"):
        ours(torch.randn(5, 2, 2))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        ours(torch.randn(5, 2, 1, 3))
    with pytest.raises(TypeError, match="Tensor or a PackedSequence"):
        ours(np.zeros((5, 2, 3)))


# ------------------------------------------------------------------ threads
def _blas_threads():
    from threadpoolctl import threadpool_info
    return sorted((d["filepath"], d["num_threads"]) for d in threadpool_info())


def test_thread_settings_are_left_as_they_were():
    import fastbptt
    ours = ft.RNN(8, 32, num_layers=2)
    x = torch.randn(50, 16, 8)
    torch_before, fb_before = torch.get_num_threads(), fastbptt.get_num_threads()
    blas_before = _blas_threads()
    out, h = ours(x)
    (out.sum() + h.sum()).backward()
    assert torch.get_num_threads() == torch_before
    assert fastbptt.get_num_threads() == fb_before
    assert _blas_threads() == blas_before


def test_a_call_uses_no_more_threads_than_torch(monkeypatch):
    """One thread for small steps; for large ones at most torch's count; the setting is restored."""
    import fastbptt
    seen = []
    real = ft._fb_rnn_vjp

    def spy(*args, **kw):
        seen.append(fastbptt.get_num_threads())
        return real(*args, **kw)

    monkeypatch.setattr(ft, "_fb_rnn_vjp", spy)
    small = ft.RNN(3, 4)
    large = ft.RNN(3, 128)                    # with B = 64: B·H² = 2^20
    old_torch = torch.get_num_threads()
    fastbptt.set_num_threads(2)
    try:
        torch.set_num_threads(2)
        small(torch.randn(2, 64, 3))[0].sum().backward()
        large(torch.randn(2, 64, 3))[0].sum().backward()
        torch.set_num_threads(1)
        large(torch.randn(2, 64, 3))[0].sum().backward()
        assert torch.get_num_threads() == 1 and fastbptt.get_num_threads() == 2
    finally:
        torch.set_num_threads(old_torch)
        fastbptt.set_num_threads(None)
    assert seen == [1, 2, 1]


@pytest.mark.parametrize("requires_grad", [False, True])
def test_nan_in_the_input_is_refused_on_every_path(requires_grad):
    """With or without autograd, as the README says (nn.RNN would propagate it)."""
    rnn = ft.RNN(3, 4, dtype=torch.float64)
    x = torch.zeros(5, 2, 3, dtype=torch.float64)
    x[2, 1, 0] = float("nan")
    x.requires_grad_(requires_grad)
    with pytest.raises(ValueError, match="input"):
        rnn(x)
