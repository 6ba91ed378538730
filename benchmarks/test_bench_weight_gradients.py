"""The weight gradients' ``Aᵀ·B`` on the tiles of ``tn_kernel.h`` against OpenBLAS.

Shapes (K, M, N): ``longseq``'s block of dW_hh (16384, 128, 128) and of
[dW_xh | db_h] (16384, 128, 33, run transposed), ``small``'s (3200, 64, 64)
and ``medium``'s dW_xh half (6400, 256, 64); float32 and float64, on 1 and 2
threads of the C team (``pgemm``: the contraction split, the parts' sums
added). Per cell, the two are timed in turns: ``blas`` (the tiles switched
off, ``_set_tn(0)``) and ``tiles`` (``_set_tn(1)``). ``extra_info`` holds both
medians, the ratio blas / tiles (> 1: the tiles are faster) and each one's
error against a float64 product; the benchmark itself times the tiles. In
quick mode (``FASTBPTT_BENCH_QUICK=1``) K is divided by 4.

Run: ``pytest benchmarks/test_bench_weight_gradients.py --benchmark-json=tn.json``.
"""

import os

import numpy as np
import pytest

import fastbptt.backends.cython.blas as CB
from fastbptt._threads import call_scope
from fastbptt.tools.bench import time_interleaved

QUICK = bool(os.environ.get("FASTBPTT_BENCH_QUICK"))
CELLS = {"longseq_dW_hh": (16384, 128, 128), "longseq_dW1": (16384, 128, 33), "small_dW_hh": (3200, 64, 64),
         "medium_dW_xh": (6400, 256, 64)}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_tiles_against_blas(benchmark, cell, dtype, threads):
    if not CB.tn_available():
        pytest.skip("this CPU lacks AVX-512F: the tiles do not run here")
    K, M, N = CELLS[cell]
    K = K // 4 if QUICK else K
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(K, M)).astype(dtype), rng.normal(size=(K, N)).astype(dtype)
    want = A.astype(np.float64).T @ B.astype(np.float64)
    out = {key: np.empty((M, N), dtype) for key in ("blas", "tiles")}

    def product(key):
        def call():
            CB._set_tn(0 if key == "blas" else 1)
            CB.pgemm(True, False, A, B, out[key], threads)
        return call

    fns = {key: product(key) for key in ("blas", "tiles")}
    start = CB._set_tn(-1)
    try:
        with call_scope(threads):       # BLAS on one thread inside the parts, as in a public call
            for fn in fns.values():
                fn()
            samples = time_interleaved(fns, rounds=5 if QUICK else 15, min_sample_s=0.02)
            errs = {key: float(np.max(np.abs(out[key] - want)) / np.max(np.abs(want))) for key in out}
            benchmark.group = f"Aᵀ·B {cell} K={K} M={M} N={N} {dtype} threads={threads}" + (" quick" if QUICK else "")
            med = {key: float(np.median(v)) for key, v in samples.items()}
            benchmark.extra_info.update({
                "cell": cell, "dtype": dtype, "threads": threads,
                **{f"{key}_ms": 1e3 * med[key] for key in med},
                "blas_over_tiles": med["blas"] / med["tiles"],
                **{f"{key}_rel_err": errs[key] for key in errs},
            })
            CB._set_tn(1)
            benchmark.pedantic(fns["tiles"], rounds=5, warmup_rounds=1)
    finally:
        CB._set_tn(start)
    tol = 1e-5 if dtype == "float32" else 1e-12
    assert errs["tiles"] <= tol and errs["blas"] <= tol
