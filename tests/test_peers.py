"""The peers (torch, jax) compute the same loss and gradients as fastbptt.loss_and_grad.

One layer and stacks (num_layers, bidirectional), compared field by field in
the canonical order of ``names()``. float64 where the peer supports it: torch
always; jax with jax_enable_x64, which must be on before jax makes an array,
so the jax float64 checks run in a subprocess. A peer that is not installed
is skipped with the reason. Also the peers' thread settings
(``xla_flags``, ``jax_threads``, ``torch_threads``, the bench's thread plan).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastbptt
from fastbptt.tools import peers
from fastbptt.tools.bench import peer_thread_plan
from fastbptt.tools.peers import make_peer_step, peer_unavailable_reason
from helpers import RTOL, make_problem, rel_err

CASES = [("mse", "sequence"), ("bce", "sequence"), ("ce", "sequence"), ("mse", "last"), ("ce", "last")]
CASE_IDS = [f"{loss}-{output}" for loss, output in CASES]


def _need(peer):
    reason = peer_unavailable_reason(peer)
    if reason is not None:
        pytest.skip(f"{peer} is not installed: {reason}")


def make_stack_problem(L, bidirectional, loss, output, dtype, *, T=11, B=3, D=5, H=6, O=4, seed=7):
    """Random params of a stack (W_hh scaled by 1.5), X, and Y for the loss and output."""
    return make_problem(T, B, D, H, O, loss=loss, output=output, dtype=dtype, seed=seed, scale=1.5,
                        num_layers=L, bidirectional=bidirectional)


def _check(peer, dtype, loss, output, activation="tanh", with_h0=False, stack=None):
    if stack is None:
        params, X, Y = make_problem(23, 3, 5, 12, 4, loss=loss, output=output, dtype=dtype, seed=7,
                                    scale=1.5)
    else:
        params, X, Y = make_stack_problem(*stack, loss, output, dtype)
    n, B, H = len(params.layers), X.shape[1], params.hidden_size
    h0 = None
    if with_h0:
        h0 = np.random.default_rng(1).uniform(-0.5, 0.5, (B, H) if n == 1 else (n, B, H))
    before = params.copy()
    ref_loss, ref_grads, _ = fastbptt.loss_and_grad(params, X, Y, h0=h0, loss=loss, output=output,
                                                    activation=activation, backend="numpy")
    step = make_peer_step(peer, params, X, Y, loss=loss, output=output, activation=activation, h0=h0)
    step()                                        # the timed call runs and returns nothing
    value, grads = step.loss_and_grad()
    assert params == before                       # the peer never writes our params
    assert grads.dtype == np.dtype(dtype)
    assert grads.same_structure(ref_grads)        # every (layer, direction) and the head
    tol = RTOL[dtype]
    assert abs(value - ref_loss) <= tol * abs(ref_loss)
    for name, g, r in zip(ref_grads.names(), grads.arrays(), ref_grads.arrays()):
        assert rel_err(g, r) <= tol, name


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


# stacks: (num_layers, bidirectional); the bench's cell is 2 bidirectional layers
STACKS = [(2, True), (2, False), (1, True), (3, True)]
STACK_IDS = [f"L{L}{'-bi' if bi else ''}" for L, bi in STACKS]
# "last" of a bidirectional stack is [h_T^fwd ; h_1^bwd]
STACK_CASES = [("mse", "sequence"), ("ce", "last"), ("bce", "last")]
STACK_CASE_IDS = [f"{loss}-{output}" for loss, output in STACK_CASES]


@pytest.mark.parametrize(("loss", "output"), STACK_CASES, ids=STACK_CASE_IDS)
@pytest.mark.parametrize("stack", STACKS, ids=STACK_IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_torch_stack_matches_reference(dtype, stack, loss, output):
    _need("torch")
    _check("torch", dtype, loss, output, stack=stack)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_torch_stack_activation_and_h0(activation):
    _need("torch")
    _check("torch", np.float64, "mse", "sequence", activation=activation, with_h0=True, stack=(2, True))


@pytest.mark.parametrize(("loss", "output"), STACK_CASES[:2], ids=STACK_CASE_IDS[:2])
@pytest.mark.parametrize("stack", STACKS, ids=STACK_IDS)
def test_jax_float32_stack_matches_reference(stack, loss, output):
    _need("jax")
    _check("jax", np.float32, loss, output, stack=stack)


def test_jax_float32_stack_relu_h0():
    _need("jax")
    _check("jax", np.float32, "bce", "last", activation="relu", with_h0=True, stack=(2, True))


@pytest.mark.parametrize("peer", ["torch", "jax"])
def test_stack_h0_of_the_wrong_shape_is_refused(peer):
    _need(peer)
    params, X, Y = make_stack_problem(2, True, "mse", "sequence", np.float32)
    with pytest.raises(ValueError, match="h0"):
        make_peer_step(peer, params, X, Y, h0=np.zeros((3, 6)))      # (B, H): a stack needs (4, B, H)


def test_a_stack_without_a_head_is_refused():
    params = fastbptt.RNNParams.init(5, 6, None, num_layers=2)
    X = np.zeros((4, 2, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="head"):
        make_peer_step("torch", params, X, np.zeros((4, 2, 1), dtype=np.float32))


_JAX64_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    sys.path.insert(0, sys.argv[1])               # tests/ for helpers
    import fastbptt
    from fastbptt.tools.peers import make_peer_step
    from helpers import make_problem, rel_err
    from test_peers import make_stack_problem
    out = []
    for loss, output, act, stack in [("mse", "sequence", "tanh", None), ("bce", "sequence", "tanh", None),
                                     ("ce", "sequence", "tanh", None), ("ce", "last", "tanh", None),
                                     ("mse", "last", "relu", None), ("mse", "sequence", "tanh", (2, True)),
                                     ("ce", "last", "tanh", (2, True)), ("bce", "last", "relu", (3, False))]:
        if stack is None:
            params, X, Y = make_problem(23, 3, 5, 12, 4, loss=loss, output=output, dtype=np.float64,
                                        seed=7, scale=1.5)
        else:
            params, X, Y = make_stack_problem(*stack, loss, output, np.float64)
        n, B, H = len(params.layers), X.shape[1], params.hidden_size
        h0 = np.random.default_rng(1).uniform(-0.5, 0.5, (B, H) if n == 1 else (n, B, H))
        ref_loss, ref, _ = fastbptt.loss_and_grad(params, X, Y, h0=h0, loss=loss, output=output,
                                                  activation=act, backend="numpy")
        value, grads = make_peer_step("jax", params, X, Y, loss=loss, output=output,
                                      activation=act, h0=h0).loss_and_grad()
        assert grads.names() == ref.names()
        out.append({"case": f"{loss}-{output}-{act}-{stack}", "dtype": str(grads.dtype),
                    "loss": abs(value - ref_loss) / abs(ref_loss),
                    "grads": {n: rel_err(g, r) for n, g, r in zip(ref.names(), grads.arrays(), ref.arrays())}})
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
    assert len(results) == 8
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


# ----------------------------------------------------------------- threads
def test_xla_flags_add_or_remove_the_single_thread_flags():
    one = peers.XLA_ONE_THREAD
    assert peers.xla_flags(1, "") == one
    assert peers.xla_flags(1, "--xla_dump_to=/tmp/x") == "--xla_dump_to=/tmp/x " + one
    assert peers.xla_flags(1, one) == one                          # not twice
    assert peers.xla_flags(2, "--a " + one + " --b") == "--a --b"
    assert peers.xla_flags(2, "") == ""


def test_jax_threads_follows_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", peers.xla_flags(1))
    assert peers.jax_threads() == 1
    monkeypatch.setenv("XLA_FLAGS", "")
    assert peers.jax_threads() == os.cpu_count()


def test_torch_threads_restores_the_count():
    _need("torch")
    import torch
    before = torch.get_num_threads()
    with peers.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_bench_thread_plan(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")                            # this process's jax: all cores
    cores = os.cpu_count()
    assert peer_thread_plan("cython", 2, [1, 2]) == [(2, "here")]   # fastbptt at its own count only
    assert peer_thread_plan("torch", 2, [2, 1, 2]) == [(1, "here"), (2, "here")]
    plan = dict(peer_thread_plan("jax", 2, [1, 2]))
    assert plan[1] == ("here" if cores == 1 else "worker")          # XLA's other setting: a worker process
    assert plan[cores] == "here"
    monkeypatch.setenv("XLA_FLAGS", peers.xla_flags(1))
    assert dict(peer_thread_plan("jax", 1, [1]))[1] == "here"
