"""The Cython backend's small-batch SIMD kernels against its per-step BLAS path (docs/kernels_simd.md).

Shapes (T, B, H): ``online`` 1000,1,32, ``chunk`` 25,1,100 and ``b4h256`` 100,4,256, float32 and
float64, tanh, full BPTT, one thread. Per (shape, dtype, kernel) one test: the forward or the
backward kernel by the per-step path "auto" took before them (``_path=0``: BLAS, or the small
loop where ``uses_small_loop``) and by the SIMD kernels at each level (``_path=2`` with
``_set_simd_level``), timed in turns (``time_interleaved``); ``extra_info`` has each one's median,
the ratios (> 1: the SIMD kernels are faster) and each one's relative error against the NumPy
reference kernels. The benchmark itself times what "auto" runs now. ``test_loss_and_grad``
compares whole ``loss_and_grad`` calls at online and chunk with the kernels on and off.

Run: ``pytest benchmarks/test_bench_simd.py --benchmark-json=simd.json``.
"""

import os

import numpy as np
import pytest

import fastbptt
import fastbptt.backends.cython.kernels as K
from fastbptt.backends import reference as R
from fastbptt.engine.core import windows
from fastbptt.tools.bench import time_interleaved

QUICK = bool(os.environ.get("FASTBPTT_BENCH_QUICK"))
ROUNDS = 2 if QUICK else 9
SAMPLE_S = 0.005 if QUICK else 0.02        # each timed sample at least this long
SHAPES = {"online": (1000, 1, 32), "chunk": (25, 1, 100), "b4h256": (100, 4, 256)}
LEVELS = ("avx512", "avx2", "portable")
DTYPES = [pytest.param(np.float32, id="f32"), pytest.param(np.float64, id="f64")]


@pytest.fixture(autouse=True)
def _restore_level():
    start = K.SIMD_IMPL
    yield
    K._set_simd_level(start)


def _problem(T, B, H, dtype):
    rng = np.random.default_rng(0)
    A = rng.normal(scale=0.8, size=(T, B, H)).astype(dtype)
    W_hh = rng.normal(scale=1.0 / np.sqrt(H), size=(H, H)).astype(dtype)
    G = rng.normal(size=(T, B, H)).astype(dtype)
    Hs_ref = np.zeros((T + 1, B, H), dtype=dtype)
    R.forward_recurrence(A, np.ascontiguousarray(W_hh.T), Hs_ref, R.ACT_TANH)
    ends, bp_starts = windows(T, None)
    dZ_ref = np.empty_like(G)
    R.backward_accumulate(G, Hs_ref, W_hh, ends, bp_starts, R.ACT_TANH, dZ_ref)
    return A, W_hh, G, Hs_ref, dZ_ref, ends, bp_starts


def _rel(a, b):
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("kernel", ["forward", "backward"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_kernels(benchmark, shape, dtype, kernel):
    T, B, H = SHAPES[shape]
    A, W_hh, G, Hs_ref, dZ_ref, ends, bp_starts = _problem(T, B, H, dtype)
    W_hhT = np.ascontiguousarray(W_hh.T)
    before = 1 if K.uses_small_loop(B, H) else 0

    def call(path, level=None):
        out = np.zeros_like(Hs_ref) if kernel == "forward" else np.empty_like(G)

        def run():
            if level is not None and K.SIMD_IMPL != level:
                K._set_simd_level(level)
            if kernel == "forward":
                K.forward_recurrence(A, W_hhT, out, R.ACT_TANH, _path=path)
            else:
                K.backward_accumulate(G, Hs_ref, W_hh, ends, bp_starts, R.ACT_TANH, out, _path=path)
            return out
        return run

    fns = {"before": call(before)}
    fns.update({f"simd-{level}": call(2, level) for level in LEVELS})
    ref = Hs_ref if kernel == "forward" else dZ_ref
    errors = {key: _rel(fn(), ref) for key, fn in fns.items()}
    samples = time_interleaved(fns, ROUNDS, min_sample_s=SAMPLE_S)
    medians = {key: float(np.median(s)) for key, s in samples.items()}
    benchmark.group = f"simd {shape} {np.dtype(dtype).name} {kernel}"
    benchmark.extra_info.update(
        shape=SHAPES[shape], before="small loop" if before else "BLAS", median_s=medians,
        ratio={key: medians["before"] / m for key, m in medians.items() if key != "before"},
        rel_err=errors, auto_uses_simd=K.uses_simd(B, H, dtype))
    K._set_simd_level("auto")
    benchmark(call(-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["online", "chunk"])
def test_loss_and_grad(benchmark, shape, dtype):
    """A whole call (mse, D = 8 / 64, O = 8), the SIMD kernels on ("auto") and off."""
    T, B, H = SHAPES[shape]
    D = 8 if shape == "online" else 64
    rng = np.random.default_rng(0)
    params = fastbptt.RNNParams.init(D, H, 8, dtype=dtype, seed=0)
    X = rng.normal(size=(T, B, D)).astype(dtype)
    Y = rng.normal(size=(T, B, 8)).astype(dtype)

    def call(level):
        def run():
            if K.SIMD_IMPL != level:
                K._set_simd_level(level)
            return fastbptt.loss_and_grad(params, X, Y, backend="cython")
        return run

    fns = {"off": call("off"), "on": call(K.SIMD_IMPL)}
    (loss_off, g_off, _), (loss_on, g_on, _) = fns["off"](), fns["on"]()
    samples = time_interleaved(fns, ROUNDS, min_sample_s=SAMPLE_S)
    medians = {key: float(np.median(s)) for key, s in samples.items()}
    benchmark.group = f"simd loss_and_grad {shape} {np.dtype(dtype).name}"
    benchmark.extra_info.update(
        median_s=medians, ratio=medians["off"] / medians["on"],
        max_rel_diff=max(_rel(getattr(g_on, n), getattr(g_off, n).astype(np.float64))
                         for n in ("W_xh", "W_hh", "b_h", "W_hy", "b_y")))
    benchmark(fns["on"])
