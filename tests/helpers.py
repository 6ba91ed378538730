"""Helpers shared by the test modules (importable: tests/ is on pytest's pythonpath)."""

import numpy as np

import fastbptt
from fastbptt.backends import reference

# The one table of tolerances for a backend (or a peer) against the NumPy reference: max |a - b|
# over max |b| (``rel_err``), so arrays need no atol; a scalar loss is compared with
# ``pytest.approx(ref, rel=RTOL[dtype], abs=RTOL[dtype])``. The tightest value every user
# passes: on the tests' fixed problems, the kernels and loss_and_grad of both compiled backends
# are within ~1.3e-6 (float32) and ~3e-15 (float64) of the reference. Not tighter in float64: in
# a random search of loss_and_grad problems, one in ~10^4 with H <= 3 (a scalar W_hh gradient
# that nearly cancels) reached 1.1e-12, and test_parity's hypothesis test draws such shapes. The
# same search reached 6.7e-5 in float32: a float32 property test would need more than this table.
RTOL = {np.float32: 1e-5, np.float64: 1e-10}


def rel_err(a, b):
    """max |a - b| / max |b| (b is the oracle)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.max(np.abs(b)), 1e-30)
    return float(np.max(np.abs(a - b)) / scale)


def assert_close(got, ref, dtype, what):
    """``got`` (ours) within RTOL[dtype] of ``ref`` (an oracle): shape, dtype, then :func:`rel_err`."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape, f"{what}: shape {got.shape}, the oracle's {ref.shape}"
    assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {np.dtype(dtype)}"
    err = rel_err(got, ref)
    assert err <= RTOL[dtype], f"{what}: relative error {err:.3g} > {RTOL[dtype]}"


def torch_suffix(i, dirs):
    """torch's name suffix of (layer, direction) ``i``: ``_l0``, ``_l0_reverse``, ``_l1``, ..."""
    return f"_l{i // dirs}" + ("_reverse" if i % dirs else "")


def check_layer_grads(grads, params, oracle_layers, dtype, what=""):
    """Every (layer, direction)'s gradients against torch's ``(weight_ih, weight_hh, bias_ih, bias_hh)``
    grads: torch has two biases where we have one, b_h = bias_ih + bias_hh, so both get ∂L/∂b_h."""
    assert isinstance(grads, fastbptt.RNNParams)
    assert grads.bidirectional == params.bidirectional and grads.num_layers == params.num_layers
    assert len(grads.layers) == len(oracle_layers)
    dirs = params.num_directions
    for i, (lay, (g_ih, g_hh, gb_ih, gb_hh)) in enumerate(zip(grads.layers, oracle_layers)):
        sfx = torch_suffix(i, dirs)
        assert_close(lay.W_xh, g_ih, dtype, f"{what}dW_xh (weight_ih{sfx})")
        assert_close(lay.W_hh, g_hh, dtype, f"{what}dW_hh (weight_hh{sfx})")
        assert_close(lay.b_h, gb_ih, dtype, f"{what}db_h (bias_ih{sfx})")
        assert_close(lay.b_h, gb_hh, dtype, f"{what}db_h (bias_hh{sfx})")


def make_problem(T, B, D, H, O, *, loss="mse", output="sequence", dtype=np.float64, seed=0,
                 single=False, scale=1.0, num_layers=1, bidirectional=False):
    """Random params, X, Y for a shape; Y matches loss and output. single=True drops B (B must be 1);
    ``scale`` multiplies every W_hh."""
    rng = np.random.default_rng(seed)
    params = fastbptt.RNNParams.init(D, H, O, num_layers=num_layers, bidirectional=bidirectional,
                                     dtype=dtype, seed=rng)
    if scale != 1.0:
        for layer in params.layers:
            layer.W_hh *= scale
    X = rng.normal(size=(T, B, D))
    lead = (T, B) if output == "sequence" else (B,)
    if loss == "mse":
        Y = rng.normal(size=lead + (O,))
    elif loss == "bce":
        Y = (rng.random(size=lead + (O,)) < 0.5).astype(np.float64)
    else:
        Y = rng.integers(0, O, size=lead)
    if single:
        assert B == 1
        X = X[:, 0]
        Y = Y[:, 0] if output == "sequence" else Y[0]
    return params, X, Y


# every kind of truncation window (fastbptt.engine.core.windows), by name: full BPTT; k: disjoint
# windows (k = 1, k not dividing T, k >= T); (k1, k2): overlapping (k2 > k1), equal, with gaps
# (k2 < k1: losses no window backpropagates) and one reaching back to step 0
TRUNCATIONS = {"full": None, "k1": 1, "k3": 3, "k4": 4, "k1k2_2_2": (2, 2), "k1k2_2_5": (2, 5),
               "k1k2_3_2": (3, 2), "k1k2_4_4": (4, 4), "k1k2_3_7": (3, 7), "k1k2_1_40": (1, 40)}


def kernel_problem(T, B, H, dtype, seed):
    """Random inputs of the kernel contract (``fastbptt.backends.reference``): A, W_hh, h0, G.

    ``W_hh`` has spectral radius ~1.2, so states neither die out nor saturate at once over the
    tests' few steps, and relu's states grow: rounding differences are not hidden.
    """
    rng = np.random.default_rng(seed)
    A = rng.normal(scale=0.8, size=(T, B, H)).astype(dtype)
    W_hh = rng.normal(scale=1.2 / np.sqrt(H), size=(H, H)).astype(dtype)
    h0 = rng.normal(scale=0.5, size=(B, H)).astype(dtype)
    G = rng.normal(size=(T, B, H)).astype(dtype)
    return A, W_hh, h0, G


def reference_kernels(A, W_hh, h0, G, act, ends, bp_starts):
    """The reference kernels' ``Hs`` (T+1, B, H) and ``dZ`` (T, B, H) for these inputs (the oracle)."""
    T, B, H = A.shape
    Hs = np.empty((T + 1, B, H), dtype=A.dtype)
    Hs[0] = h0
    reference.forward_recurrence(A, np.ascontiguousarray(W_hh.T), Hs, act)
    dZ = np.empty_like(G)
    reference.backward_accumulate(G, Hs, W_hh, ends, bp_starts, act, dZ)
    return Hs, dZ
