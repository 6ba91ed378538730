"""Parity with torch autograd (float64), where torch is installed.

Skips cleanly without torch (``pip install .[peers]`` brings it); the
finite-difference tests carry the proof on their own.
"""

import numpy as np
import pytest

import fastbptt
from fastbptt.engine.core import windows
from helpers import make_problem, rel_err

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_grads(params, X, Y, h0, loss, output, activation, truncation):
    """Gradients by torch autograd, truncation the torch way: each window runs from a detached state."""
    rnn, linear = params.to_torch(nonlinearity=activation)
    Xt, Yt, T, n = torch.from_numpy(X), torch.from_numpy(Y), X.shape[0], Y.size
    h_states = [torch.from_numpy(h0)[None]]
    with torch.no_grad():                       # the states the windows start from (detached)
        for t in range(T):
            h_states.append(rnn(Xt[t:t + 1], h_states[-1])[1])

    def loss_sum(o, y):
        if loss == "mse":
            return F.mse_loss(o, y, reduction="sum")
        if loss == "bce":
            return F.binary_cross_entropy_with_logits(o, y, reduction="sum")
        return F.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1), reduction="sum")

    loss_start = 0
    for end, bp in zip(*windows(T, truncation)):
        end, bp = int(end), int(bp)
        out, _ = rnn(Xt[bp:end], h_states[bp])
        if output == "sequence":
            loss_sum(linear(out[loss_start - bp:]), Yt[loss_start:end]).div(n).backward()
        elif end == T:
            loss_sum(linear(out[-1]), Yt).div(n).backward()
        loss_start = end
    return {"W_xh": rnn.weight_ih_l0.grad.numpy(), "W_hh": rnn.weight_hh_l0.grad.numpy(),
            # b_h = bias_ih + bias_hh, so ∂L/∂b_h is either bias's gradient (they are equal)
            "b_h": rnn.bias_ih_l0.grad.numpy(),
            "W_hy": linear.weight.grad.numpy(), "b_y": linear.bias.grad.numpy()}


@pytest.mark.parametrize("truncation", [None, 3, (2, 4)], ids=str)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("loss,output", [("mse", "sequence"), ("bce", "sequence"), ("ce", "sequence"),
                                         ("mse", "last"), ("ce", "last")])
def test_matches_torch_autograd(loss, output, activation, truncation):
    params, X, Y = make_problem(8, 3, 4, 6, 5, loss=loss, output=output, seed=21)
    h0 = np.random.default_rng(0).uniform(-0.3, 0.3, size=(3, 6))
    value, grads, h_last = fastbptt.loss_and_grad(params, X, Y, h0=h0, loss=loss, output=output,
                                                  activation=activation, truncation=truncation,
                                                  backend="numpy")
    rnn, linear = params.to_torch(nonlinearity=activation)
    Yt = torch.from_numpy(Y)
    out, h_n = rnn(torch.from_numpy(X), torch.from_numpy(h0)[None])
    o = linear(out if output == "sequence" else out[-1])
    ref_loss = {"mse": lambda: F.mse_loss(o, Yt),
                "bce": lambda: F.binary_cross_entropy_with_logits(o, Yt),
                "ce": lambda: F.cross_entropy(o.reshape(-1, o.shape[-1]), Yt.reshape(-1))}[loss]()
    assert value == pytest.approx(ref_loss.item(), rel=1e-12)
    np.testing.assert_allclose(h_last, h_n[0].detach().numpy(), rtol=1e-12, atol=1e-14)

    torch_grads = _torch_grads(params, X, Y, h0, loss, output, activation, truncation)
    for name, g in torch_grads.items():
        assert rel_err(getattr(grads, name), g) < 1e-10, name


def test_torch_round_trip_is_exact():
    params = fastbptt.RNNParams.init(3, 7, 2, dtype=np.float64, seed=4)
    back = fastbptt.RNNParams.from_torch(*params.to_torch())
    assert back == params
    p32 = fastbptt.RNNParams.init(3, 7, 2, dtype=np.float32, seed=4)
    rnn, linear = p32.to_torch()
    assert rnn.weight_hh_l0.dtype == torch.float32
    assert fastbptt.RNNParams.from_torch(rnn, linear) == p32


def test_from_torch_reads_both_biases():
    torch.manual_seed(0)
    rnn, linear = torch.nn.RNN(3, 4, dtype=torch.float64), torch.nn.Linear(4, 2, dtype=torch.float64)
    p = fastbptt.RNNParams.from_torch(rnn, linear)
    np.testing.assert_array_equal(p.b_h, (rnn.bias_ih_l0 + rnn.bias_hh_l0).detach().numpy())
    X = np.random.default_rng(0).normal(size=(5, 2, 3))
    o, hs = fastbptt.forward(p, X, backend="numpy")
    out, _ = rnn(torch.from_numpy(X))
    np.testing.assert_allclose(hs[1:], out.detach().numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(o, linear(out).detach().numpy(), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match=r"W_hy: expected shape \(O, 8\)"):     # a head for H=4, not 2·H
        fastbptt.RNNParams.from_torch(torch.nn.RNN(3, 4, bidirectional=True, dtype=torch.float64), linear)
