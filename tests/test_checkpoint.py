"""Memory-bounded full BPTT (``loss_and_grad(..., checkpoint=)``): bit for bit the gradient of full BPTT.

Every comparison is ``np.array_equal`` against ``checkpoint=None`` on the same backend. The
time blocks that both sum in (``engine.checkpoint.BLOCK_ROWS``) are made small in most tests
so that short sequences have many segments, and kept at the default in one.
"""


import numpy as np
import pytest

import fastbptt
from fastbptt.engine import checkpoint as ck
from fastbptt.tools.bench import peak_traced_bytes
from helpers import RTOL, make_problem, rel_err

BACKENDS = ["numpy", "numba", "cython"]
DTYPES = [np.float32, np.float64]


def _lengths(T, B, seed=1):
    """Lengths in [1, T], one row full length, in no order."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[B // 2] = T
    return lengths


def _assert_same(a, b):
    (la, ga, ha), (lb, gb, hb) = a, b
    assert la == lb
    for x, y in zip(ga.arrays(), gb.arrays()):
        assert np.array_equal(x, y)
    assert np.array_equal(ha, hb)


@pytest.fixture
def segments(monkeypatch):
    """Counts the segment forwards of each call (a checkpointed call with n segments runs 2n - 1)."""
    calls = []
    real = ck._segment_forward

    def spy(run, a, b, *args):
        calls.append((a, b))
        return real(run, a, b, *args)

    monkeypatch.setattr(ck, "_segment_forward", spy)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("loss, output", [("mse", "sequence"), ("bce", "sequence"), ("ce", "sequence"),
                                          ("mse", "last"), ("ce", "last")])
def test_bit_identical(monkeypatch, segments, backend, dtype, lengths, num_layers, activation, loss, output):
    monkeypatch.setattr(ck, "BLOCK_ROWS", 4)        # B = 3: blocks of 2 steps
    T, B, D, H, O = 17, 3, 4, 13, 3
    params, X, Y = make_problem(T, B, D, H, O, loss=loss, output=output, dtype=dtype, seed=3,
                                num_layers=num_layers, scale=1.5)
    kw = dict(loss=loss, output=output, activation=activation, backend=backend,
              lengths=_lengths(T, B) if lengths else None,
              h0=np.random.default_rng(5).normal(size=(num_layers, B, H)) if num_layers > 1 else None)
    plain = fastbptt.loss_and_grad(params, X, Y, **kw)
    for checkpoint in [1, 3, 4, "sqrt", True]:      # s -> 2, 4, 4, 6 (⌈√17⌉ = 5 rounded up), 6 steps
        segments.clear()
        _assert_same(fastbptt.loss_and_grad(params, X, Y, checkpoint=checkpoint, **kw), plain)
        n_seg = len({a for a, _ in segments})
        assert n_seg > 2 and len(segments) == 2 * n_seg - 1        # really recomputed, segment by segment


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_bit_identical_default_blocks(segments, backend, dtype, lengths):
    """The default block (⌈16384/B⌉ steps: 512 at B = 32), a sequence of 2.1 blocks; kernels split
    between threads."""
    T, B = 1100, 32
    params, X, Y = make_problem(T, B, 5, 96, 2, dtype=dtype, seed=4)     # 2 threads for every backend
    kw = dict(backend=backend, lengths=_lengths(T, B) if lengths else None)
    plain = fastbptt.loss_and_grad(params, X, Y, **kw)
    segments.clear()
    _assert_same(fastbptt.loss_and_grad(params, X, Y, checkpoint="sqrt", **kw), plain)
    assert sorted(set(segments)) == [(0, 512), (512, 1024), (1024, 1100)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T, B, checkpoint, single", [
    (1, 1, 1, False), (1, 1, "sqrt", True), (1, 4, "sqrt", False), (7, 1, 2, True), (7, 1, 3, False),
    (7, 2, 100, False), (10, 1, 5, True), (5, 3, 1, False)],
    ids=["T1", "T1-2d", "T1-B4", "B1-s2-2d", "B1-s3", "s>T", "s-divides-T-2d", "T5-s1"])
def test_odd_shapes(monkeypatch, backend, T, B, checkpoint, single):
    monkeypatch.setattr(ck, "BLOCK_ROWS", 1)        # blocks of one step: segments of exactly s steps
    params, X, Y = make_problem(T, B, 2, 7, 2, loss="ce", dtype=np.float64, seed=T, single=single)
    plain = fastbptt.loss_and_grad(params, X, Y, loss="ce", backend=backend)
    _assert_same(fastbptt.loss_and_grad(params, X, Y, loss="ce", backend=backend, checkpoint=checkpoint), plain)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("B, H", [(1, 32), (4, 64)])
def test_small_batch_product(monkeypatch, backend, dtype, B, H):
    """B <= 4 and H a multiple of 32: the Cython kernels' own matrix-vector product per step."""
    monkeypatch.setattr(ck, "BLOCK_ROWS", 8 * B)       # blocks of 8 steps
    params, X, Y = make_problem(50, B, 3, H, 2, dtype=dtype, seed=9)
    plain = fastbptt.loss_and_grad(params, X, Y, backend=backend)
    _assert_same(fastbptt.loss_and_grad(params, X, Y, backend=backend, checkpoint=1), plain)


def test_segment_steps():
    assert ck.block_steps(16) == 1024 and ck.block_steps(1) == 16384 and ck.block_steps(20000) == 1
    assert ck.segment_steps("sqrt", 100_000, 16) == 1024        # ⌈√100000⌉ = 317, whole blocks of 1024
    assert ck.segment_steps("sqrt", 10 ** 8, 16384) == 10_000   # √T itself with blocks of one step
    assert ck.segment_steps(1, 100, 16384) == 1
    assert ck.segment_steps(1025, 10_000, 16) == 2048


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_plain_full_bptt_matches_reference(monkeypatch, dtype):
    """Full BPTT summed in blocks stays within the tolerance table of the NumPy reference."""
    monkeypatch.setattr(ck, "BLOCK_ROWS", 5)
    params, X, Y = make_problem(23, 4, 3, 9, 2, dtype=dtype, seed=7, num_layers=2)
    lengths = _lengths(23, 4)
    ref = fastbptt.loss_and_grad(params, X, Y, lengths=lengths, backend="numpy", checkpoint=2)
    for backend in ["numba", "cython"]:
        value, grads, h = fastbptt.loss_and_grad(params, X, Y, lengths=lengths, backend=backend, checkpoint=2)
        assert value == pytest.approx(ref[0], rel=RTOL[dtype], abs=RTOL[dtype])
        for a, b in zip(grads.arrays(), ref[1].arrays()):
            assert rel_err(a, b) <= RTOL[dtype]


@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("loss, output", [("mse", "sequence"), ("bce", "sequence"), ("ce", "sequence"),
                                          ("mse", "last"), ("ce", "last")])
def test_blocks_sum_to_the_whole(monkeypatch, lengths, loss, output):
    """Full BPTT summed over blocks of 1-3 steps equals one block over the whole sequence (float64, to the
    tolerance table): no block is lost or counted twice, with or without checkpoints."""
    T, B = 19, 3
    params, X, Y = make_problem(T, B, 4, 6, 3, loss=loss, output=output, seed=11, num_layers=2)
    kw = dict(loss=loss, output=output, lengths=_lengths(T, B) if lengths else None, backend="cython")
    whole = fastbptt.loss_and_grad(params, X, Y, **kw)
    for rows in (1, 5, 9):
        monkeypatch.setattr(ck, "BLOCK_ROWS", rows)
        for checkpoint in (None, 1):
            value, grads, h = fastbptt.loss_and_grad(params, X, Y, checkpoint=checkpoint, **kw)
            assert value == pytest.approx(whole[0], rel=RTOL[np.float64], abs=RTOL[np.float64])
            for a, b in zip(grads.arrays(), whole[1].arrays()):
                assert rel_err(a, b) <= RTOL[np.float64]
            assert rel_err(h, whole[2]) <= RTOL[np.float64]      # (A's GEMM rows differ by call size)


def test_memory_bounded(monkeypatch):
    """At T = 4096 (segments of 64 steps) the checkpointed call holds a small fraction of full BPTT's states."""
    monkeypatch.setattr(ck, "BLOCK_ROWS", 16 * 64)
    T, B, H = 4096, 16, 32
    params, X, Y = make_problem(T, B, 2, H, 1, output="last", dtype=np.float64, seed=0)
    X, Y = np.ascontiguousarray(X), np.ascontiguousarray(Y)
    plain = peak_traced_bytes(lambda: fastbptt.loss_and_grad(params, X, Y, output="last", backend="cython"))
    checked = peak_traced_bytes(lambda: fastbptt.loss_and_grad(params, X, Y, output="last", backend="cython",
                                                         checkpoint="sqrt"))
    states = (T + 1) * B * H * 8
    assert plain > 3 * states           # Hs, A, G, dZ: (T, B, H) each
    assert checked < 0.2 * states       # X's own copy, √T states and one segment's work arrays


@pytest.mark.parametrize("checkpoint, error, match", [
    (0, ValueError, "checkpoint: expected an int s >= 1"),
    (-3, ValueError, "checkpoint: expected an int s >= 1"),
    ("half", ValueError, "checkpoint: expected None, an int s >= 1 or 'sqrt', got 'half'"),
    (2.0, TypeError, "checkpoint: expected None, an int s >= 1"),
    ([4], TypeError, "checkpoint: expected None"),
])
def test_bad_checkpoint(checkpoint, error, match):
    params, X, Y = make_problem(5, 2, 3, 4, 2)
    with pytest.raises(error, match=match.replace("(", r"\(").replace(")", r"\)")):
        fastbptt.loss_and_grad(params, X, Y, checkpoint=checkpoint)


@pytest.mark.parametrize("truncation", [3, (2, 4), ("artbp", 0.2, 0)])
def test_checkpoint_with_truncation_refused(truncation):
    params, X, Y = make_problem(5, 2, 3, 4, 2)
    with pytest.raises(ValueError, match="checkpoint: recomputing the forward is for full BPTT"):
        fastbptt.loss_and_grad(params, X, Y, truncation=truncation, checkpoint=2)


def test_checkpoint_bidirectional_refused():
    params, X, Y = make_problem(5, 2, 3, 4, 2, bidirectional=True)
    with pytest.raises(ValueError, match="checkpoint: a bidirectional model takes checkpoint=None only"):
        fastbptt.loss_and_grad(params, X, Y, checkpoint="sqrt")


def test_checkpoint_off_values():
    """None and False are plain full BPTT; the caller's arrays are not written."""
    params, X, Y = make_problem(6, 2, 3, 4, 2)
    X0, Y0, P0 = X.copy(), Y.copy(), [a.copy() for a in params.arrays()]
    _assert_same(fastbptt.loss_and_grad(params, X, Y, checkpoint=False), fastbptt.loss_and_grad(params, X, Y))
    fastbptt.loss_and_grad(params, X, Y, checkpoint=1)
    assert np.array_equal(X, X0) and np.array_equal(Y, Y0)
    assert all(np.array_equal(a, b) for a, b in zip(params.arrays(), P0))
