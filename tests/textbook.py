"""An independent, deliberately naive oracle for the tests (not the package's code).

It computes the loss step by step from the equations with plain loops, so
that finite differences of it check the package's gradients, including
truncated ones: the truncated gradient is the sum over windows of the
gradient of that window's loss terms, with the state entering the window held
fixed (``detach`` in torch terms).
"""

import numpy as np


def _f(z, activation):
    return np.tanh(z) if activation == "tanh" else np.maximum(z, 0.0)


def states(params, X, h0, activation):
    """h_0 .. h_T for X (T, B, D): list of (B, H) arrays."""
    hs = [h0]
    for t in range(X.shape[0]):
        z = X[t] @ params.W_xh.T + hs[-1] @ params.W_hh.T + params.b_h
        hs.append(_f(z, activation))
    return hs


def step_loss_sum(o, y, loss):
    """Sum over the elements (mse/bce) or positions (ce) of one step's loss."""
    if loss == "mse":
        return np.sum((o - y) ** 2)
    if loss == "bce":
        # -[y log σ(o) + (1-y) log(1-σ(o))]
        return np.sum(y * np.logaddexp(0, -o) + (1 - y) * np.logaddexp(0, o))
    m = o.max(axis=-1, keepdims=True)
    logZ = (m + np.log(np.sum(np.exp(o - m), axis=-1, keepdims=True)))[..., 0]
    return np.sum(logZ - np.take_along_axis(o, y[..., None], axis=-1)[..., 0])


def window_loss(params, X, Y, h_in, t0, t_loss0, t1, loss, output, activation, N):
    """Loss terms of steps [t_loss0, t1) (0-based), run forward from state h_in at step t0."""
    h = h_in
    total = 0.0
    for t in range(t0, t1):
        h = _f(X[t] @ params.W_xh.T + h @ params.W_hh.T + params.b_h, activation)
        if t >= t_loss0:
            o = h @ params.W_hy.T + params.b_y
            if output == "sequence":
                total += step_loss_sum(o, Y[t], loss)
            elif t == X.shape[0] - 1:
                total += step_loss_sum(o, Y, loss)
    return total / N


def truncated_objectives(params0, X, Y, h0, loss, output, activation, wins):
    """Functions f_i(params) whose gradients at params0 sum to the truncated gradient."""
    hs0 = states(params0, X, h0, activation)      # detached states, from params0
    N = Y.size
    fs, loss_start = [], 0
    for end, bp_start in zip(*wins):
        end, bp_start, ls = int(end), int(bp_start), loss_start
        fs.append(lambda p, e=end, b=bp_start, ls=ls: window_loss(
            p, X, Y, hs0[b], b, ls, e, loss, output, activation, N))
        loss_start = end
    return fs


def full_loss(params, X, Y, h0, loss, output, activation):
    return window_loss(params, X, Y, h0, 0, 0, X.shape[0], loss, output, activation, Y.size)


def finite_difference_grad(f, params, eps=1e-6):
    """Central differences of f over the packed parameters (float64)."""
    flat = params.flatten()
    grad = np.empty_like(flat)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f(params.unflatten(flat))
        flat[i] = old - eps
        fm = f(params.unflatten(flat))
        flat[i] = old
        grad[i] = (fp - fm) / (2 * eps)
    return grad
