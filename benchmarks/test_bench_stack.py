"""What a stacked model costs per (layer, direction), against one layer of the same shape.

The ``stacked`` cell (T=200, B=64, D=64, H=128, 2 layers, bidirectional)
runs four (layer, direction)s: two of layer 0 (input D = 64) and two of
layer 1, whose input is layer 0's output, 2H = 256 wide. So the honest
single-layer comparison is per layer: ``stacked_l0`` (one unidirectional
layer, input 64) and ``stacked_l1`` (input 256), and

    ratio = t(stacked) / (2·t(stacked_l0) + 2·t(stacked_l1))

(1.0: a (layer, direction) inside the stack costs what a single-layer step of
its shape does). The stack also does work its twins do not -- layer 1 sends
its gradient down to layer 0 (one more GEMM of input size 256 per
direction), and it has one head on 2H features where the twins have four on
H -- about 1.16x their flops: ``ratio_per_flop`` takes that out.
``ratio_vs_first`` = t(stacked) / (4·t(stacked_l0)) is the simple reading,
every layer taken as layer 0; it overstates the overhead. All as
:func:`fastbptt.tools.bench.stack_ratios` computes them for ``fastbptt bench``.

One test per implementation (float32, the session's threads): the three steps
are timed in turns (stacked, l0, l1, stacked, ...) so that the machine's
drift hits them alike; the ratios go to ``extra_info``, and the benchmark
itself times the stacked step. With ``--benchmark-disable`` only correctness
runs (each step once, the stacked gradients against the float64 reference).

Run: ``pytest benchmarks/test_bench_stack.py --benchmark-json=stack.json``.
"""

import numpy as np
import pytest

from fastbptt.tools import bench

IMPLS = [i for i in bench.ALL_IMPLS if i != bench.AUTO]     # the backends' own costs
TWINS = ("stacked_l0", "stacked_l1")


@pytest.mark.parametrize("impl", IMPLS)
def test_stack_per_layer_cost(benchmark, impl, oracle, require, rate, shape_of, threads_of):
    require(impl, "float32")
    dtype = np.dtype("float32")
    shapes = {name: shape_of(name) for name in ("stacked",) + TWINS}
    stacked = shapes["stacked"]
    # the twins are one unidirectional layer of each of the stack's layers' shapes
    assert [shapes[t] for t in TWINS] == [bench.Shape(stacked.T, stacked.B, d, stacked.H)
                                         for d in stacked.layer_inputs]
    steps = {}
    for name, shape in shapes.items():
        params, X, Y, ref_loss, ref = oracle(shape, dtype)
        steps[name], result = bench.make_step(impl, params, X, Y)
        steps[name]()                                   # JIT / compile / caches
        if name == "stacked":
            value, grads = result()
            errs = bench.rel_errs(grads, ref)           # every (layer, direction) and the head
            assert max(errs.values()) < 1e-3, errs

    benchmark.group = f"stack per (layer, direction) {bench.format_shape(stacked)} float32"
    benchmark.extra_info.update({"backend": impl, "threads": threads_of(impl),
                                 "shapes": {k: bench.format_shape(v) for k, v in shapes.items()},
                                 "stacked_rel_err_by_field": errs, "max_rel_err": max(errs.values())})
    if not benchmark.disabled:
        samples = bench.time_interleaved(steps, rounds=7)
        cells = [{"shape": name, "impl": impl, "kind": "any", "T": s.T, "B": s.B, "D": s.D, "H": s.H,
                  "num_layers": s.num_layers, "bidirectional": s.bidirectional,
                  "median_s": float(np.median(samples[name])), "best_s": min(samples[name])}
                 for name, s in shapes.items()]
        (r,) = bench.stack_ratios({"results": cells})
        benchmark.extra_info.update({k: r[k] for k in ("ratio", "ratio_best", "ratio_per_flop", "flop_ratio",
                                                        "ratio_vs_first", "stacked_s", "twins_s")})
        benchmark.extra_info["median_s"] = {c["shape"]: c["median_s"] for c in cells}
    benchmark.pedantic(steps["stacked"], rounds=5, warmup_rounds=0)
    rate(benchmark, flops=bench.shape_flops(stacked))
