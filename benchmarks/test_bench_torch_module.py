"""``fastbptt.torch.RNN`` inside torch scripts, against ``torch.nn.RNN`` and the functional call.

Three problems, float32, one ``benchmark.group`` each:

- ``charlm``: a char-level language model's training step as a torch user writes
  it -- one-hot input (V = 98), H = 128, B = 32, T = 50, batch-first, an
  ``nn.Linear`` head, ``F.cross_entropy``, ``Adam``, ``clip_grad_norm_``, the
  hidden state carried (detached) from step to step -- with only the RNN module
  swapped: ``fastbptt.torch`` against ``nn.RNN`` on 1 and 2 threads
  (``nn.RNN@1``, ``nn.RNN@2``; compare with its faster row).
- ``step online`` / ``step small`` (the benchmark's shapes, O = 8, mse): the
  same step through the torch script (module + ``nn.Linear`` + ``F.mse_loss`` +
  ``backward``), and ``functional``: :func:`fastbptt.loss_and_grad` on arrays.
- ``stack online`` / ``stack small``: the recurrent stack alone, forward and
  backward with a fixed upstream gradient on ``output`` and ``h_n``:
  ``functional`` (:func:`fastbptt.rnn_vjp` and its ``vjp`` on arrays) against
  ``adapter`` (the module, ``torch.autograd.backward``): the adapter's
  overhead over the functional call, and ``nn.RNN`` for scale.
  ``functional@1`` is the functional call on one thread: the module takes one
  thread for steps below ``B·H² = 2^20`` (``fastbptt.torch.SPLIT_MIN_BHH``),
  which both cells are, so that is the like-for-like row.

fastbptt runs at its default threads: the session's team for the functional
cells; through the module, the team capped by ``torch.get_num_threads()``
(the session's count too) and one thread for small steps. ``extra_info`` has the threads and the
correctness of each cell: the loss and every gradient after one step from
the same weights, against ``nn.RNN`` (``max_rel_err``). ``FASTBPTT_BENCH_QUICK=1``
divides T by 5 (at least 20), as the rest of the suite.

Ratios (``nn.RNN`` at its faster thread count / fastbptt) from one run::

    pytest benchmarks/test_bench_torch_module.py --benchmark-json=torch_module.json
"""

import os
import time
from contextlib import contextmanager

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastbptt  # noqa: E402
import fastbptt.torch as ft  # noqa: E402

F = torch.nn.functional
QUICK = bool(os.environ.get("FASTBPTT_BENCH_QUICK"))
OUTPUT_SIZE = 8
# (T, B, D, H): the benchmark's ``online`` and ``small`` cells (fastbptt.tools.bench.SHAPES)
SHAPES = {"online": (1000, 1, 8, 32), "small": (100, 32, 16, 64)}
CHARLM = dict(V=98, H=128, B=32, T=50)
MODULES = ["fastbptt.torch", "nn.RNN@1", "nn.RNN@2"]


def _T(T):
    return max(20, T // 5) if QUICK else T


@contextmanager
def _fastbptt_threads(n):
    before = fastbptt.get_num_threads()
    if n is not None:
        fastbptt.set_num_threads(n)
    try:
        yield
    finally:
        fastbptt.set_num_threads(before)


@contextmanager
def _torch_threads(n):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _module(impl):
    """``(module class, torch threads or None)`` for an implementation name."""
    if impl == "fastbptt.torch":
        return ft.RNN, None
    return torch.nn.RNN, int(impl.split("@")[1])


def _rel_errs(ours, ref):
    return max(float((a - b).abs().max() / max(float(b.abs().max()), 1e-30)) for a, b in zip(ours, ref))


def _record(benchmark, impl, threads, dims, **extra):
    benchmark.extra_info.update({"impl": impl, "torch_threads": threads if threads else torch.get_num_threads(),
                                 "fastbptt_threads": fastbptt.get_num_threads(), "T,B,D,H": list(dims), **extra})


# ------------------------------------------------------------------ charlm
def _charlm(module_cls, seed=0):
    """A char-RNN training step; returns ``(step, first_step_figures)``."""
    V, H, B, T = CHARLM["V"], CHARLM["H"], CHARLM["B"], _T(CHARLM["T"])
    torch.manual_seed(seed)
    rnn = module_cls(V, H, batch_first=True)
    head = torch.nn.Linear(H, V)
    params = list(rnn.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, V, (B, T + 1), generator=g)
    x = F.one_hot(text[:, :-1], V).float()
    y = text[:, 1:].reshape(-1)
    state = {"h": None}

    def step():
        out, h = rnn(x, state["h"])
        loss = F.cross_entropy(head(out).reshape(-1, V), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        state["h"] = h.detach()
        return loss

    def first():
        loss = step()
        return [loss.detach().reshape(1)] + [p.grad.clone() for p in params]

    return step, first


@pytest.mark.parametrize("impl", MODULES)
def test_charlm_step(benchmark, impl):
    cls, threads = _module(impl)
    with _torch_threads(threads):
        _, first = _charlm(cls)
        got = first()
        ref = _charlm(torch.nn.RNN)[1]()
        step, _ = _charlm(cls)
        t0 = time.perf_counter()
        step()
        benchmark.group = "charlm V=98 H=128 B=32 T=%d float32" % _T(CHARLM["T"]) + (" quick" if QUICK else "")
        _record(benchmark, impl, threads, (_T(CHARLM["T"]), CHARLM["B"], CHARLM["V"], CHARLM["H"]),
                first_call_s=time.perf_counter() - t0, max_rel_err=_rel_errs(got, ref))
        benchmark.pedantic(step, rounds=30, warmup_rounds=3)
    assert benchmark.extra_info["max_rel_err"] < 1e-4


# ------------------------------------------------------------------ the benchmark's step, through torch
def _problem(shape, seed=0):
    T, B, D, H = shape
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rnn = torch.nn.RNN(D, H)
    head = torch.nn.Linear(H, OUTPUT_SIZE)
    x = torch.randn(T, B, D, generator=g)
    y = torch.randn(T, B, OUTPUT_SIZE, generator=g)
    return rnn.state_dict(), head.state_dict(), x, y


def _torch_step(module_cls, shape):
    rnn_state, head_state, x, y = _problem(shape)
    T, B, D, H = shape
    rnn = module_cls(D, H)
    rnn.load_state_dict(rnn_state)
    head = torch.nn.Linear(H, OUTPUT_SIZE)
    head.load_state_dict(head_state)
    params = list(rnn.parameters()) + list(head.parameters())

    def step():
        for p in params:
            p.grad = None
        out, _ = rnn(x)
        loss = F.mse_loss(head(out), y)
        loss.backward()
        return loss

    def figures():
        loss = step()
        return [loss.detach().reshape(1)] + [p.grad.clone() for p in params]

    return step, figures


def _functional_step(shape):
    rnn_state, head_state, x, y = _problem(shape)
    rnn, head = torch.nn.RNN(shape[2], shape[3]), torch.nn.Linear(shape[3], OUTPUT_SIZE)
    rnn.load_state_dict(rnn_state)
    head.load_state_dict(head_state)
    params = fastbptt.RNNParams.from_torch(rnn, head)
    X, Y = x.numpy(), y.numpy()

    def step():
        return fastbptt.loss_and_grad(params, X, Y)

    def figures():
        loss, grads, _ = step()
        g = grads.layers[0]
        arrays = [g.W_xh, g.W_hh, g.b_h, g.b_h, grads.W_hy, grads.b_y]
        return [torch.tensor([loss])] + [torch.from_numpy(np.asarray(a)) for a in arrays]

    return step, figures


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["functional"] + MODULES)
def test_training_step(benchmark, impl, shape):
    T, B, D, H = SHAPES[shape]
    dims = (_T(T), B, D, H)
    threads = None
    if impl == "functional":
        step, figures = _functional_step(dims)
    else:
        cls, threads = _module(impl)
        step, figures = _torch_step(cls, dims)
    with _torch_threads(threads):
        got = figures()
        ref = _torch_step(torch.nn.RNN, dims)[1]()
        benchmark.group = f"step {shape} {','.join(map(str, dims))} float32" + (" quick" if QUICK else "")
        _record(benchmark, impl, threads, dims, max_rel_err=_rel_errs(got, ref))
        benchmark.pedantic(step, rounds=10 if shape == "online" and impl.startswith("nn.") else 30,
                           warmup_rounds=2)
    assert benchmark.extra_info["max_rel_err"] < 1e-4


# ------------------------------------------------------------------ the stack alone: the adapter's overhead
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["functional", "functional@1", "adapter", "nn.RNN@1", "nn.RNN@2"])
def test_stack_forward_backward(benchmark, impl, shape):
    T, B, D, H = SHAPES[shape]
    T = _T(T)
    torch.manual_seed(0)
    ref = torch.nn.RNN(D, H)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, B, D, generator=g)
    d_out = torch.randn(T, B, H, generator=g)
    d_h = torch.randn(1, B, H, generator=g)
    threads = fb_threads = None
    if impl.startswith("functional"):
        fb_threads = 1 if impl == "functional@1" else None
        params = fastbptt.RNNParams.from_torch(ref)
        X, G, GH = x.numpy(), d_out.numpy(), d_h.numpy()[0]

        def step():
            _, _, vjp = fastbptt.rnn_vjp(params, X)
            return vjp(G, GH)

        def figures():
            grads, dX, _ = step()
            lay = grads.layers[0]
            return [torch.from_numpy(a) for a in (lay.W_xh, lay.W_hh, lay.b_h, lay.b_h)]
    else:
        if impl == "adapter":
            module = ft.RNN(D, H)
            module.load_state_dict(ref.state_dict())
        else:
            module, threads = ref, int(impl.split("@")[1])

        def step():
            for p in module.parameters():
                p.grad = None
            out, h = module(x)
            torch.autograd.backward([out, h], [d_out, d_h])

        def figures():
            step()
            return [p.grad.clone() for p in module.parameters()]

    with _torch_threads(threads), _fastbptt_threads(fb_threads):
        got = figures()
        ref.zero_grad()
        out, h = ref(x)
        torch.autograd.backward([out, h], [d_out, d_h])
        want = [p.grad.clone() for p in ref.parameters()]
        benchmark.group = f"stack {shape} {T},{B},{D},{H} float32" + (" quick" if QUICK else "")
        _record(benchmark, impl, threads, (T, B, D, H), max_rel_err=_rel_errs(got, want))
        benchmark.pedantic(step, rounds=10 if shape == "online" and impl.startswith("nn.") else 50,
                           warmup_rounds=3)
    assert benchmark.extra_info["max_rel_err"] < 1e-4
