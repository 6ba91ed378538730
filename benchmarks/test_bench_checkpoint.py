"""Memory-bounded full BPTT (``checkpoint="sqrt"``) against plain full BPTT: peak memory and time.

The cell: T = 100 000, B = 16, D = 32, H = 128, O = 8, float32, one tanh layer,
mse, ``output="sequence"`` (a loss at every step) and ``"last"`` (one at the
end). The target (issue 15): at most 10 % of plain full BPTT's memory at
most 1.5x its time.

- Peak memory: ``tracemalloc`` (NumPy reports its allocations to it) around
  one call on a new thread, whose work arrays (``engine.core.scratch``, one
  set per thread) are all allocated in that call; the inputs are allocated
  before, so what is counted is what the call adds.
- Time: the two calls timed in turns (:func:`fastbptt.tools.bench.time_interleaved`),
  without tracemalloc; the medians and their ratio go to ``extra_info``.
- Correctness: the two results are compared with ``np.array_equal``.

In quick mode (``FASTBPTT_BENCH_QUICK=1``) T is 5000.

Run: ``pytest benchmarks/test_bench_checkpoint.py --benchmark-json=checkpoint.json``.
"""

import os

import numpy as np
import pytest

import fastbptt
from fastbptt.tools.bench import peak_traced_bytes, time_interleaved

QUICK = bool(os.environ.get("FASTBPTT_BENCH_QUICK"))

T, B, D, H, O = (5000 if QUICK else 100_000), 16, 32, 128, 8


def _problem(output):
    rng = np.random.default_rng(0)
    params = fastbptt.RNNParams.init(D, H, O, seed=0)
    X = rng.standard_normal((T, B, D)).astype(np.float32)
    Y = rng.standard_normal((T, B, O) if output == "sequence" else (B, O)).astype(np.float32)
    return params, X, Y


@pytest.mark.parametrize("output", ["sequence", "last"])
def test_checkpoint_cell(benchmark, output):
    params, X, Y = _problem(output)

    def plain():
        return fastbptt.loss_and_grad(params, X, Y, output=output, backend="cython")

    def checkpointed():
        return fastbptt.loss_and_grad(params, X, Y, output=output, checkpoint="sqrt", backend="cython")

    a, b = plain(), checkpointed()
    identical = a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1].arrays(), b[1].arrays()))
    assert identical
    info = {"T": T, "B": B, "D": D, "H": H, "O": O, "output": output, "bit_identical": identical,
            "states_bytes": (T + 1) * B * H * 4}
    if getattr(benchmark, "disabled", False):          # --benchmark-disable: correctness only
        benchmark(checkpointed)
        return
    info["peak_bytes_plain"] = peak_traced_bytes(plain)
    info["peak_bytes_checkpoint"] = peak_traced_bytes(checkpointed)
    info["memory_ratio"] = info["peak_bytes_checkpoint"] / info["peak_bytes_plain"]
    samples = time_interleaved({"plain": plain, "checkpoint": checkpointed}, rounds=3 if QUICK else 5,
                               min_sample_s=0.0)
    medians = {k: float(np.median(v)) for k, v in samples.items()}
    info.update({f"s_{k}": v for k, v in medians.items()})
    info.update({f"s_best_{k}": min(v) for k, v in samples.items()})
    info["time_ratio"] = medians["checkpoint"] / medians["plain"]
    benchmark.extra_info.update(info)
    benchmark.pedantic(checkpointed, rounds=1, iterations=1)
