"""The Cython kernels at wide and large shapes: the packed column split against today's BLAS splits.

Cells (T, B, H): ``wide`` 300, 20, 800 and ``large`` 100, 128, 1024 (the step
suite's cells without the GEMMs around the kernels), float32 and float64, on 1
and 2 threads. Per cell, forward (``forward_recurrence``) and backward
(``backward_accumulate``, full BPTT, tanh) are timed in turns for:

- ``blas``: the split "auto" made before the packed one existed (rows, or
  columns with a BLAS call per step; the packed loop switched off with
  ``_set_wide_level(0)``, which makes "auto" skip it);
- ``packed``: ``_split=2``, each thread's columns of W packed once per call
  and multiplied by the loop of ``wide.h`` every step.

BLAS is pinned to one thread inside the kernels (``call_scope``, as in a public
call). ``extra_info`` holds both medians and the ratio blas / packed (> 1: packed is
faster) for each kernel, and the relative difference of their outputs; the
benchmark itself times the packed forward + backward. In quick mode
(``FASTBPTT_BENCH_QUICK=1``) T is divided by 5.

Run: ``pytest benchmarks/test_bench_kernels_wide.py --benchmark-json=wide.json``.
"""

import os

import numpy as np
import pytest

from fastbptt._threads import call_scope
from fastbptt.backends import resolve_backend
from fastbptt.engine.core import windows
from fastbptt.tools.bench import time_interleaved

QUICK = bool(os.environ.get("FASTBPTT_BENCH_QUICK"))
CELLS = {"wide": (300, 20, 800), "large": (100, 128, 1024)}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_packed_split_against_blas(benchmark, cell, dtype, threads):
    K = resolve_backend("cython")
    start = K._set_wide_level(-1)
    T, B, H = CELLS[cell]
    T = max(20, T // 5) if QUICK else T
    rng = np.random.default_rng(0)
    A = rng.normal(scale=0.8, size=(T, B, H)).astype(dtype)
    W = rng.normal(scale=1.0 / np.sqrt(H), size=(H, H)).astype(dtype)
    W_T = np.ascontiguousarray(W.T)
    G = rng.normal(size=(T, B, H)).astype(dtype)
    ends, bp_starts = windows(T, None)
    out = {k: (np.zeros((T + 1, B, H), dtype), np.empty((T, B, H), dtype)) for k in ("blas", "packed")}

    def kernels(key, which):
        Hs, dZ = out[key]
        split, level = (-1, 0) if key == "blas" else (2, start)

        def call():
            K._set_wide_level(level)
            if which == "forward":
                K.forward_recurrence(A, W_T, Hs, 0, threads=threads, _split=split)
            else:
                K.backward_accumulate(G, Hs, W, ends, bp_starts, 0, dZ, threads=threads, _split=split)
        return call

    fns = {(key, which): kernels(key, which) for which in ("forward", "backward") for key in ("blas", "packed")}
    try:
        with call_scope():          # BLAS on one thread inside the kernels, as in a public call
            for fn in fns.values():
                fn()
            samples = time_interleaved(fns, rounds=3 if QUICK else 7, min_sample_s=0.0)
    finally:
        K._set_wide_level(start)
    med = {key: float(np.median(v)) for key, v in samples.items()}
    diff = max(float(np.max(np.abs(out["packed"][i] - out["blas"][i])) / np.max(np.abs(out["blas"][i])))
               for i in (0, 1))
    benchmark.group = f"kernels {cell} T={T} B={B} H={H} {dtype} threads={threads}" + (" quick" if QUICK else "")
    benchmark.extra_info.update({
        "cell": cell, "dtype": dtype, "threads": threads, "wide_impl": K.WIDE_IMPL,
        **{f"{w}_{k}_ms": 1e3 * med[(k, w)] for k in ("blas", "packed") for w in ("forward", "backward")},
        **{f"{w}_blas_over_packed": med[("blas", w)] / med[("packed", w)] for w in ("forward", "backward")},
        "rel_diff": diff,
    })

    def packed_step():
        with call_scope():
            fns[("packed", "forward")]()
            fns[("packed", "backward")]()
    benchmark.pedantic(packed_step, rounds=3, warmup_rounds=0)
    assert diff < (1e-4 if dtype == "float32" else 1e-10)
