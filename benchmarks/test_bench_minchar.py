"""min-char-rnn's training loop (T=25 chunks, H=100, vocabulary 65, Adagrad, clip by value):
the gist's own pure-NumPy loop against the same loop on a :class:`fastbptt.Step`.

Both loops train on the same text from the same initial weights; the group compares
them (target: the Step loop ≥ 10× the NumPy one). ``extra_info`` records the time per
chunk, and for the fastbptt rows the speed-up over the NumPy loop timed in the same
session. ``FASTBPTT_BENCH_QUICK=1``: fewer chunks.
"""

import os

import numpy as np
import pytest

import fastbptt
from fastbptt.tools import minchar

QUICK = bool(os.environ.get("FASTBPTT_BENCH_QUICK"))
CHUNKS = 60 if QUICK else 200
VOCAB, HIDDEN = 65, 100
_seconds = {}


@pytest.fixture(scope="module")
def ids():
    return minchar.corpus_ids(vocab=VOCAB)


@pytest.mark.parametrize("impl", ["gist", *fastbptt.available_backends()])
def test_minchar_loop(benchmark, impl, ids):
    if impl == "gist":             # the gist's own NumPy loop
        loop = lambda: minchar.numpy_loop(ids, VOCAB, HIDDEN, CHUNKS)          # noqa: E731
    else:
        minchar.fastbptt_loop(ids, VOCAB, HIDDEN, 5, dtype=np.float32, backend=impl)     # JIT, before timing
        loop = lambda: minchar.fastbptt_loop(ids, VOCAB, HIDDEN, CHUNKS, dtype=np.float32,  # noqa: E731
                                             backend=impl)
    losses = benchmark.pedantic(loop, rounds=1 if QUICK else 3, warmup_rounds=0)
    assert np.all(np.isfinite(losses)) and losses[-10:].mean() < losses[:10].mean()     # it learns
    benchmark.group = "min-char-rnn loop" + (" quick" if QUICK else "")
    benchmark.extra_info["chunks"] = CHUNKS
    stats = getattr(benchmark, "stats", None)         # None with --benchmark-disable
    if stats is None:
        return
    median = stats.stats.median
    _seconds[impl] = median
    benchmark.extra_info["seconds_per_chunk"] = median / CHUNKS
    if impl != "gist" and "gist" in _seconds:
        benchmark.extra_info["speedup_vs_gist"] = _seconds["gist"] / median
