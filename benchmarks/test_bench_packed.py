"""Variable-length batches: the ``packed`` cell, against torch's packed path and JAX with masking.

The cell is the ``stacked`` model (T=200, B=64, D=64, H=128, 2 layers,
bidirectional; float32, mse on every valid step, O = 8) on a batch whose
lengths are uniform in [20, 200] (``uniform``), or one row of 200 and the
rest of 20 (``skewed``). One training step (forward + gradient of every
parameter) per implementation:

- ``fastbptt``: ``loss_and_grad(..., lengths=)``: rows sorted once, the
  padding never computed;
- ``fastbptt-full``: the same model on the full-length batch (the padding
  computed as if it were data): the packed step should cost the fraction of
  it that the valid steps are (the target is <= 0.7x with ``uniform``);
- ``torch@1``, ``torch@2``: ``pack_padded_sequence(..., enforce_sorted=False)``
  through ``nn.RNN``, its loss over the valid steps;
- ``jax``: a ``lax.scan`` per (layer, direction) over the padded batch with a
  mask (the state holds at padded steps; the reverse direction starts at each
  row's own last step because its state holds at h0 until then), jitted.

The implementations are timed in turns in one test per lengths pattern (the
machine's drift hits them alike); the medians and the ratios go to
``extra_info``, the benchmark itself times fastbptt's step. Every peer's loss
is checked against fastbptt's (and torch's gradient of W_hh of layer 0).
In quick mode (``FASTBPTT_BENCH_QUICK=1``) T is 40 and the rounds few.

Run: ``pytest benchmarks/test_bench_packed.py --benchmark-json=packed.json``.
"""

import os
import time

import numpy as np
import pytest

import fastbptt
from fastbptt.tools.bench import time_interleaved

QUICK = bool(os.environ.get("FASTBPTT_BENCH_QUICK"))

T, B, D, H, O = (40 if QUICK else 200), 64, 64, 128, 8
LAYERS, BI = 2, True


def _lengths(kind, rng):
    if kind == "uniform":
        return rng.integers(T // 10, T + 1, size=B)
    lengths = np.full(B, T // 10)
    lengths[0] = T
    return lengths


def _problem(kind):
    rng = np.random.default_rng(0)
    params = fastbptt.RNNParams.init(D, H, O, num_layers=LAYERS, bidirectional=BI, seed=0)
    X = rng.standard_normal((T, B, D)).astype(np.float32)
    Y = rng.standard_normal((T, B, O)).astype(np.float32)
    return params, X, Y, _lengths(kind, rng)


def _torch_step(params, X, Y, lengths, threads):
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    rnn, linear = params.to_torch()
    x, y = torch.from_numpy(X), torch.from_numpy(Y)
    lens = torch.from_numpy(lengths)
    mask = torch.from_numpy(np.arange(T)[:, None] < lengths[None, :])

    def step():
        torch.set_num_threads(threads)
        rnn.zero_grad()
        linear.zero_grad()
        out, _ = rnn(pack_padded_sequence(x, lens, enforce_sorted=False))
        out, _ = pad_packed_sequence(out, total_length=T)
        loss = torch.nn.functional.mse_loss(linear(out)[mask], y[mask])
        loss.backward()
        return loss.item(), rnn.weight_hh_l0.grad.numpy()
    return step


def _jax_step(params, X, Y, lengths):
    import jax
    import jax.numpy as jnp

    dirs = 2 if BI else 1
    mask = jnp.asarray(np.arange(T)[:, None] < lengths[None, :])          # (T, B)

    def layer(Wx, Wh, b, x, reverse):
        def cell(h, inp):
            xt, mt = inp
            h_new = jnp.tanh(xt @ Wx.T + h @ Wh.T + b)
            h = jnp.where(mt[:, None], h_new, h)                          # padding: the state holds
            return h, jnp.where(mt[:, None], h, 0.0)
        _, out = jax.lax.scan(cell, jnp.zeros((B, H), x.dtype), (x, mask), reverse=reverse)
        return out

    def loss_fn(arrays, x, y):
        inp = x
        for l in range(LAYERS):
            outs = [layer(*arrays[3 * (l * dirs + d):3 * (l * dirs + d) + 3], inp, bool(d)) for d in range(dirs)]
            inp = jnp.concatenate(outs, axis=-1)
        o = inp @ arrays[-2].T + arrays[-1]
        err = jnp.where(mask[:, :, None], o - y, 0.0)
        return jnp.sum(err * err) / (jnp.sum(mask) * O)

    grad = jax.jit(jax.value_and_grad(loss_fn))
    args = (tuple(jnp.asarray(a) for a in params.arrays()), jnp.asarray(X), jnp.asarray(Y))

    def step():
        value, g = grad(*args)
        jax.block_until_ready(g)
        return float(value), None
    t0 = time.perf_counter()
    step()
    step.compile_s = time.perf_counter() - t0
    return step


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
def test_packed_cell(benchmark, kind):
    params, X, Y, lengths = _problem(kind)
    Xn = X.copy()
    Xn[np.arange(T)[:, None] >= lengths[None, :]] = np.nan        # the padding is never read

    def ours():
        return fastbptt.loss_and_grad(params, Xn, Y, lengths=lengths)

    def ours_full():
        return fastbptt.loss_and_grad(params, X, Y)

    value, grads, _ = ours()
    fns = {"fastbptt": ours, "fastbptt-full": ours_full}
    info = {"kind": kind, "T": T, "B": B, "valid_fraction": float(lengths.sum() / (T * B)),
            "loss": value}
    try:
        import torch  # noqa: F401
        for threads in (1, 2):
            step = _torch_step(params, X, Y, lengths, threads)
            t_loss, t_whh = step()
            assert t_loss == pytest.approx(value, rel=1e-4)
            assert np.allclose(t_whh, grads.layers[0].W_hh, rtol=1e-3, atol=1e-5)
            fns[f"torch@{threads}"] = step
    except ImportError:
        info["torch"] = "not installed"
    try:
        step = _jax_step(params, X, Y, lengths)
        assert step()[0] == pytest.approx(value, rel=1e-4)
        info["jax_compile_s"] = step.compile_s
        fns["jax"] = step
    except ImportError:
        info["jax"] = "not installed"

    if getattr(benchmark, "disabled", False):          # --benchmark-disable: correctness only
        benchmark(ours)
        return
    medians = {k: float(np.median(v)) for k, v in time_interleaved(fns, rounds=3 if QUICK else 7).items()}
    info.update({f"ms_{k}": v * 1e3 for k, v in medians.items()})
    info["packed_vs_full"] = medians["fastbptt"] / medians["fastbptt-full"]
    torch_best = min((v for k, v in medians.items() if k.startswith("torch")), default=None)
    if torch_best is not None:
        info["speedup_vs_torch"] = torch_best / medians["fastbptt"]
    if "jax" in medians:
        info["speedup_vs_jax"] = medians["jax"] / medians["fastbptt"]
    benchmark.extra_info.update(info)
    benchmark.pedantic(ours, rounds=3, iterations=1)
