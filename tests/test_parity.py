"""Every backend against the NumPy reference, over the whole grid of modes and odd shapes."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck

import fastbptt
from helpers import RTOL, make_problem, rel_err

TRUNCATIONS = [None, 1, 4, 20, (3, 5), (4, 4), (1, 30)]
SHAPES = {  # T, B, D, H, O
    "T1": (1, 3, 4, 5, 2),
    "B1": (9, 1, 3, 7, 4),
    "H1": (6, 2, 3, 1, 2),
    "H13": (11, 4, 5, 13, 3),
    "H40": (8, 3, 6, 40, 5),
    "H70B17": (5, 17, 4, 70, 3),
}


def _compare(backend, params, X, Y, *, dtype, h0=None, **kw):
    ref = fastbptt.loss_and_grad(params, X, Y, h0=h0, backend="numpy", **kw)
    got = fastbptt.loss_and_grad(params, X, Y, h0=h0, backend=backend, **kw)
    rtol = RTOL[dtype]
    assert got[0] == pytest.approx(ref[0], rel=rtol, abs=rtol)
    for name, g_ref in ref[1].items():
        err = rel_err(getattr(got[1], name), g_ref)
        assert err <= rtol, f"{name}: rel err {err:.2e} > {rtol:.0e}"
        assert getattr(got[1], name).dtype == dtype
    assert rel_err(got[2], ref[2]) <= rtol


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("truncation", TRUNCATIONS, ids=str)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("loss,output", [("mse", "sequence"), ("bce", "sequence"), ("ce", "sequence"),
                                         ("mse", "last"), ("bce", "last"), ("ce", "last")])
def test_loss_and_grad_parity(backend, loss, output, activation, truncation, dtype):
    params, X, Y = make_problem(10, 3, 4, 9, 3, loss=loss, output=output, dtype=dtype, seed=1)
    h0 = np.random.default_rng(2).uniform(-0.5, 0.5, size=(3, 9))
    _compare(backend, params, X, Y, dtype=dtype, h0=h0, loss=loss, output=output,
             activation=activation, truncation=truncation)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_odd_shapes(backend, shape, dtype):
    params, X, Y = make_problem(*shape, dtype=dtype, seed=3)
    for activation in ("tanh", "relu"):
        for truncation in (None, 2, (2, 3)):
            _compare(backend, params, X, Y, dtype=dtype, activation=activation, truncation=truncation)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_forward_parity(backend, dtype):
    params, X, _ = make_problem(13, 5, 4, 11, 3, dtype=dtype, seed=6)
    h0 = np.full((5, 11), 0.1)
    for activation in ("tanh", "relu"):
        o_ref, hs_ref = fastbptt.forward(params, X, h0, activation=activation, backend="numpy")
        o, hs = fastbptt.forward(params, X, h0, activation=activation, backend=backend)
        assert rel_err(o, o_ref) <= RTOL[dtype] and rel_err(hs, hs_ref) <= RTOL[dtype]
        assert o.dtype == dtype and hs.shape == (14, 5, 11)


def test_noncontiguous_and_fortran_inputs(backend):
    params, X, Y = make_problem(7, 4, 5, 6, 3, seed=7)
    # params with Fortran-ordered and strided arrays
    p2 = fastbptt.RNNParams(W_xh=np.asfortranarray(params.W_xh), W_hh=np.asfortranarray(params.W_hh),
                            b_h=np.repeat(params.b_h, 2)[::2], W_hy=np.asfortranarray(params.W_hy),
                            b_y=params.b_y.copy())
    Xs = np.asfortranarray(X)
    Ys = np.repeat(Y, 2, axis=2)[:, :, ::2]
    assert not Ys.flags.c_contiguous and not Xs.flags.c_contiguous
    _compare(backend, p2, Xs, Ys, dtype=np.float64, truncation=(2, 3))
    ref = fastbptt.loss_and_grad(params, X, Y, truncation=(2, 3), backend="numpy")
    got = fastbptt.loss_and_grad(p2, Xs, Ys, truncation=(2, 3), backend=backend)
    assert rel_err(got[1].flatten(), ref[1].flatten()) <= RTOL[np.float64]


def test_parity_can_fail(backend):
    """The comparison is sharp enough to see a one-step change of h0."""
    params, X, Y = make_problem(6, 2, 3, 5, 2, seed=8)
    ref = fastbptt.loss_and_grad(params, X, Y, backend="numpy")
    got = fastbptt.loss_and_grad(params, X, Y, h0=np.full((2, 5), 1e-7), backend=backend)
    assert rel_err(got[1].W_hh, ref[1].W_hh) > RTOL[np.float64]


truncations = st.one_of(st.none(), st.integers(1, 12),
                        st.tuples(st.integers(1, 6), st.integers(0, 8)).map(lambda p: (p[0], p[0] + p[1])))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(T=st.integers(1, 12), B=st.integers(1, 5), D=st.integers(1, 6), H=st.integers(1, 20),
       O=st.integers(1, 4), truncation=truncations, loss=st.sampled_from(["mse", "bce", "ce"]),
       output=st.sampled_from(["sequence", "last"]), activation=st.sampled_from(["tanh", "relu"]),
       seed=st.integers(0, 2**16))
def test_property_parity(backend, T, B, D, H, O, truncation, loss, output, activation, seed):
    params, X, Y = make_problem(T, B, D, H, O, loss=loss, output=output, seed=seed)
    _compare(backend, params, X, Y, dtype=np.float64, loss=loss, output=output,
             activation=activation, truncation=truncation)


def test_all_backends_load():
    """After ``pip install .`` both compiled backends must be there: a missing one fails CI."""
    assert fastbptt.available_backends() == ["cython", "numba", "numpy"], \
        fastbptt.backends.unavailable_backends()
