"""Throughput of one training step (forward + full-BPTT gradient) per implementation × shape × dtype.

One callable per test, the implementation as a parameter, ``benchmark.group``
per shape and dtype. ``extra_info`` records the backend, dtype, GFLOP/s (from
the median), the build/JIT time (``compile_s``, measured on its own before
timing) and correctness: ``max_rel_err``, the largest max|g - g_ref|/max|g_ref|
over the five gradients against the NumPy reference in float64 on the same data.

Run: ``pytest benchmarks/test_bench_step.py --benchmark-json=step.json``; select
with ``-k "online and float32"``.
"""

import time

import numpy as np
import pytest

from fastbptt.tools import bench

SHAPES = list(bench.SHAPES)
IMPLS = list(bench.ALL_IMPLS)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_training_step(benchmark, impl, shape, dtype, oracle, require, rate):
    require(impl, dtype)
    dims = bench.SHAPES[shape]
    params, X, Y, ref_loss, ref = oracle(dims, np.dtype(dtype))
    t0 = time.perf_counter()
    step, result = bench.make_step(impl, params, X, Y)
    step()                                           # JIT / compile / caches, before timing
    compile_s = time.perf_counter() - t0
    value, grads = result()

    benchmark.group = f"step {shape} {','.join(map(str, dims))} {dtype}"
    benchmark.extra_info.update({
        "backend": impl, "kind": "peer" if impl in ("torch", "jax") else "fastbptt",
        "dtype": dtype, "shape": shape, "T,B,D,H,O": [*dims, bench.OUTPUT_SIZE],
        "compile_s": compile_s,
        "max_rel_err": bench.max_rel_err(grads, ref),
        "loss_rel_err": abs(value - ref_loss) / abs(ref_loss),
    })
    benchmark.pedantic(step, rounds=5 if dims[1] * dims[3] >= 64 * 256 else 20, warmup_rounds=1)
    rate(benchmark, flops=bench.step_flops(*dims))
    assert benchmark.extra_info["max_rel_err"] < (1e-3 if dtype == "float32" else 1e-9)
