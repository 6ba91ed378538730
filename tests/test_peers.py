"""The peers (torch, jax) compute the same loss and gradients as fastbptt.loss_and_grad.

float64 where the peer supports it: torch always; jax with jax_enable_x64, which
must be on before jax makes an array, so the jax float64 checks run in a
subprocess. A peer that is not installed is skipped with the reason.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastbptt
from fastbptt.tools.peers import make_peer_step, peer_unavailable_reason
from helpers import RTOL, make_problem, rel_err

CASES = [("mse", "sequence"), ("bce", "sequence"), ("ce", "sequence"), ("mse", "last"), ("ce", "last")]
CASE_IDS = [f"{loss}-{output}" for loss, output in CASES]


def _need(peer):
    reason = peer_unavailable_reason(peer)
    if reason is not None:
        pytest.skip(f"{peer} is not installed: {reason}")


def _check(peer, dtype, loss, output, activation="tanh", with_h0=False):
    params, X, Y = make_problem(23, 3, 5, 12, 4, loss=loss, output=output, dtype=dtype, seed=7,
                                scale=1.5)
    h0 = np.random.default_rng(1).uniform(-0.5, 0.5, (3, 12)) if with_h0 else None
    before = params.copy()
    ref_loss, ref_grads, _ = fastbptt.loss_and_grad(params, X, Y, h0=h0, loss=loss, output=output,
                                                    activation=activation, backend="numpy")
    step = make_peer_step(peer, params, X, Y, loss=loss, output=output, activation=activation, h0=h0)
    step()                                        # the timed call runs and returns nothing
    value, grads = step.loss_and_grad()
    assert params == before                       # the peer never writes our params
    assert grads.dtype == np.dtype(dtype)
    tol = RTOL[dtype]
    assert abs(value - ref_loss) <= tol * abs(ref_loss)
    for name, g in grads.items():
        assert rel_err(g, getattr(ref_grads, name)) <= tol, name


@pytest.mark.parametrize(("loss", "output"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_torch_matches_reference(dtype, loss, output):
    _need("torch")
    _check("torch", dtype, loss, output)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_torch_activation_and_h0(activation):
    _need("torch")
    _check("torch", np.float64, "mse", "sequence", activation=activation, with_h0=True)


@pytest.mark.parametrize(("loss", "output"), CASES, ids=CASE_IDS)
def test_jax_float32_matches_reference(loss, output):
    _need("jax")
    _check("jax", np.float32, loss, output)


def test_jax_float32_relu_h0():
    _need("jax")
    _check("jax", np.float32, "mse", "sequence", activation="relu", with_h0=True)


_JAX64_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])               # tests/ for helpers
    import fastbptt
    from fastbptt.tools.peers import make_peer_step
    from helpers import make_problem, rel_err
    out = []
    for loss, output, act in [("mse", "sequence", "tanh"), ("bce", "sequence", "tanh"),
                              ("ce", "sequence", "tanh"), ("ce", "last", "tanh"),
                              ("mse", "last", "relu")]:
        params, X, Y = make_problem(23, 3, 5, 12, 4, loss=loss, output=output, dtype=np.float64,
                                    seed=7, scale=1.5)
        h0 = np.random.default_rng(1).uniform(-0.5, 0.5, (3, 12))
        ref_loss, ref, _ = fastbptt.loss_and_grad(params, X, Y, h0=h0, loss=loss, output=output,
                                                  activation=act, backend="numpy")
        value, grads = make_peer_step("jax", params, X, Y, loss=loss, output=output,
                                      activation=act, h0=h0).loss_and_grad()
        out.append({"case": f"{loss}-{output}-{act}", "dtype": str(grads.dtype),
                    "loss": abs(value - ref_loss) / abs(ref_loss),
                    "grads": {n: rel_err(g, getattr(ref, n)) for n, g in grads.items()}})
    print(json.dumps(out))
""")


def test_jax_float64_matches_reference_in_subprocess():
    _need("jax")
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _JAX64_SCRIPT, tests_dir], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 5
    for r in results:
        assert r["dtype"] == "float64", r
        assert r["loss"] <= RTOL[np.float64], r
        assert max(r["grads"].values()) <= RTOL[np.float64], r


def test_jax_float64_without_x64_is_refused():
    _need("jax")
    import jax
    if jax.config.jax_enable_x64:
        pytest.skip("jax_enable_x64 is on in this process")
    params, X, Y = make_problem(5, 2, 3, 4, 2, dtype=np.float64)
    with pytest.raises(ValueError, match="jax_enable_x64"):
        make_peer_step("jax", params, X, Y)


def test_unknown_peer_and_bad_arguments():
    params, X, Y = make_problem(5, 2, 3, 4, 2)
    with pytest.raises(ValueError, match="peer"):
        make_peer_step("tensorflow", params, X, Y)
    _need("torch")
    with pytest.raises(ValueError, match="loss"):
        make_peer_step("torch", params, X, Y, loss="hinge")
    with pytest.raises(ValueError, match="X"):
        make_peer_step("torch", params, X[:, :, :2], Y)
