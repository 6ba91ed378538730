"""Throughput of one training step (forward + full-BPTT gradient) per implementation × shape × dtype.

One callable per test, the implementation as a parameter, ``benchmark.group``
per shape and dtype. ``auto`` is the dispatcher, learning from scratch in the
test (a cache of its own; its trial calls are part of ``compile_s``, and
``auto_choice`` is what it took): compare it with the best backend of its group.
``extra_info`` records the backend, its threads, dtype,
GFLOP/s (from the median), the build/JIT time (``compile_s``, measured on its
own before timing) and correctness: ``rel_err_by_field``, max|g - g_ref|/max|g_ref|
for every gradient field (every (layer, direction) and the head, by
``names()``) against the NumPy reference in float64 on the same data, and
``max_rel_err``, the largest of them.

Shapes are :data:`fastbptt.tools.bench.SHAPES`, the single-layer cells and
``stacked`` (2 bidirectional layers) with its single-layer twins
``stacked_l0`` / ``stacked_l1`` (see ``test_bench_stack.py`` for the
per-layer ratio). Peers: torch at the session's thread count and, as
``torch@1``, on one thread (torch is often faster so at small shapes: compare
with its faster row); jax at the count its XLA pool has in this process (see
conftest.py).

Run: ``pytest benchmarks/test_bench_step.py --benchmark-json=step.json``; select
with ``-k "online and float32"``. ``FASTBPTT_BENCH_QUICK=1``: T of every shape
divided by 5 (as ``fastbptt bench --quick``).
"""

import os
import time
from contextlib import nullcontext

import numpy as np
import pytest

from fastbptt.tools import bench
from fastbptt.tools.peers import PEERS

# as conftest.py reads them (a test module cannot import conftest under --import-mode=importlib)
THREADS = int(os.environ.get("FASTBPTT_BENCH_THREADS", "2"))
QUICK = bool(os.environ.get("FASTBPTT_BENCH_QUICK"))
SHAPES = list(bench.SHAPES)
# torch@1: torch on one thread, beside its row at the session's count
IMPLS = list(bench.ALL_IMPLS) + (["torch@1"] if THREADS != 1 else [])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_training_step(benchmark, impl, shape, dtype, oracle, require, rate, threads_of, shape_of):
    name, threads = impl.split("@")[0], threads_of(impl)
    require(name, dtype)
    dims = shape_of(shape)
    params, X, Y, ref_loss, ref = oracle(dims, np.dtype(dtype))
    with bench.torch_threads(threads) if name == "torch" else (
            bench.fresh_dispatcher() if name == bench.AUTO else nullcontext()):
        t0 = time.perf_counter()
        step, result = bench.make_step(name, params, X, Y)
        step()                                       # JIT / compile / caches, before timing
        if name == bench.AUTO:
            benchmark.extra_info["auto_choice"] = bench.settle_auto(step, params, X)
        compile_s = time.perf_counter() - t0
        value, grads = result()

        benchmark.group = f"step {shape} {bench.format_shape(dims)} {dtype}" + (" quick" if QUICK else "")
        errs = bench.rel_errs(grads, ref)             # field by field, by names()
        benchmark.extra_info.update({
            "backend": name, "threads": threads,
            "kind": "peer" if name in PEERS else bench.AUTO if name == bench.AUTO else "fastbptt",
            "dtype": dtype, "shape": shape, "T,B,D,H,O": [*dims[:4], bench.OUTPUT_SIZE],
            "num_layers": dims.num_layers, "bidirectional": dims.bidirectional,
            "compile_s": compile_s,
            "rel_err_by_field": errs, "max_rel_err": max(errs.values()),
            "loss_rel_err": abs(value - ref_loss) / abs(ref_loss),
        })
        benchmark.pedantic(step, rounds=5 if bench.shape_flops(dims) >= 5e9 else 20, warmup_rounds=1)
    rate(benchmark, flops=bench.shape_flops(dims))
    assert benchmark.extra_info["max_rel_err"] < (1e-3 if dtype == "float32" else 1e-9), errs

