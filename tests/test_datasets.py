"""Generated datasets, the character corpus and the stream layout."""

import numpy as np
import pytest

from fastbptt import datasets as ds


def test_adding_problem():
    X, Y = ds.adding_problem(50, 20, seed=3)
    assert X.shape == (50, 20, 2) and Y.shape == (50, 1) and X.dtype == np.float32
    marks = X[..., 1]
    np.testing.assert_array_equal(marks.sum(axis=1), 2)
    assert np.all(marks[:, :10].sum(axis=1) == 1) and np.all(marks[:, 10:].sum(axis=1) == 1)
    np.testing.assert_allclose(Y[:, 0], (X[..., 0] * marks).sum(axis=1), rtol=1e-6)
    X2, Y2 = ds.adding_problem(50, 20, seed=3)
    np.testing.assert_array_equal(X, X2)
    assert not np.array_equal(ds.adding_problem(50, 20, seed=4)[0], X)


@pytest.mark.parametrize("T,d", [(20, 1), (20, 7), (20, 19), (2, 1)])
def test_adding_problem_at_a_distance(T, d):
    X, Y = ds.adding_problem(400, T, distance=d, seed=3)
    marks = X[..., 1]
    assert set(np.flatnonzero(marks.sum(axis=0))) == {T - 1 - d, T - 1}     # the same two steps in every row
    np.testing.assert_array_equal(marks.sum(axis=1), 2)
    np.testing.assert_allclose(Y[:, 0], X[:, T - 1 - d, 0] + X[:, T - 1, 0], rtol=1e-6)
    assert abs(np.mean((Y - 1.0) ** 2) - 1 / 6) < 0.03                      # the mean predictor's baseline
    assert abs(np.mean((Y - 0.5 - X[:, -1:, 0]) ** 2) - 1 / 12) < 0.02      # reading the last step only
    np.testing.assert_array_equal(X, ds.adding_problem(400, T, distance=d, seed=3)[0])


@pytest.mark.parametrize("kwargs,exc,match", [(dict(T=10, distance=10), ValueError, r"distance: .*\[1, T-1=9\], got 10"),
                                              (dict(T=10, distance=0), ValueError, "distance: expected an int >= 1"),
                                              (dict(T=10, distance=2.0), TypeError, "distance: expected an int")])
def test_adding_problem_bad_distance(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ds.adding_problem(5, **kwargs)


def test_adding_problem_ragged():
    X, Y, lengths = ds.adding_problem_ragged(200, 16, min_length=3, seed=3)
    assert X.shape == (200, 16, 2) and Y.shape == (200, 1) and lengths.shape == (200,)
    assert X.dtype == Y.dtype == np.float32 and lengths.dtype == np.int64
    assert lengths.min() >= 3 and lengths.max() <= 16
    assert len(np.unique(lengths)) > 8                     # really ragged: many lengths drawn
    valid = np.arange(16)[None, :] < lengths[:, None]
    np.testing.assert_array_equal(X[~valid], 0)            # padding: zeros, never marked
    assert np.all((X[..., 0][valid] >= 0) & (X[..., 0][valid] < 1))
    marks = X[..., 1]
    np.testing.assert_array_equal(marks.sum(axis=1), 2)
    half = lengths // 2                                    # one marker in each half of its own length
    first = np.arange(16)[None, :] < half[:, None]
    np.testing.assert_array_equal((marks * first).sum(axis=1), 1)
    np.testing.assert_array_equal((marks * (valid & ~first)).sum(axis=1), 1)
    np.testing.assert_allclose(Y[:, 0], (X[..., 0] * marks).sum(axis=1), rtol=1e-6)
    for a, b in zip(ds.adding_problem_ragged(200, 16, min_length=3, seed=3), (X, Y, lengths)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(ds.adding_problem_ragged(200, 16, min_length=3, seed=4)[2], lengths)
    X64, _, l2 = ds.adding_problem_ragged(5, 7, min_length=7, seed=0, dtype=np.float64)
    assert X64.dtype == np.float64 and np.all(l2 == 7)     # min_length = T_max: no padding
    _, _, l2 = ds.adding_problem_ragged(50, 2, seed=0)     # the shortest: both halves one step
    np.testing.assert_array_equal(l2, 2)


def test_adding_problem_ragged_trains_with_lengths():
    """Samples first; time-major with ``lengths`` into loss_and_grad, the loss at each row's own last step."""
    import fastbptt
    X, Y, lengths = ds.adding_problem_ragged(6, 9, seed=1, dtype=np.float64)
    params = fastbptt.RNNParams.init(2, 5, 1, dtype=np.float64, seed=0)
    Xt = np.ascontiguousarray(X.transpose(1, 0, 2))
    value, grads, _ = fastbptt.loss_and_grad(params, Xt, Y, lengths=lengths, output="last", backend="numpy")
    assert np.isfinite(value) and all(np.all(np.isfinite(g)) for g in grads.arrays())
    O_all, _ = fastbptt.forward(params, Xt, lengths=lengths, backend="numpy")
    for b in range(6):        # row b alone, cut to its length: the same output
        L = lengths[b]
        O, _ = fastbptt.forward(params, Xt[:L, b:b + 1], backend="numpy")
        np.testing.assert_allclose(O_all[L - 1, b], O[L - 1, 0], rtol=1e-12)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(n=3, T_max=8, min_length=9), ValueError, "min_length.*T_max=8.*9"),
    (dict(n=3, T_max=8, min_length=1), ValueError, "min_length"),
    (dict(n=3, T_max=1), ValueError, "T_max"),
    (dict(n=3, T_max=8.0), TypeError, "T_max"),
    (dict(n=0, T_max=8), ValueError, "n"),
])
def test_adding_problem_ragged_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ds.adding_problem_ragged(**kwargs)


def test_copy_memory():
    X, Y = ds.copy_memory(6, 15, n_symbols=5, length=4, seed=0)
    T = 15 + 8
    assert X.shape == (6, T, 7) and Y.shape == (6, T)
    ids = X.argmax(-1)
    np.testing.assert_array_equal(X.sum(-1), 1)
    assert np.all((ids[:, :4] >= 1) & (ids[:, :4] <= 5))
    assert np.all(ids[:, 4 + 15 - 1] == 6)                # the delimiter
    np.testing.assert_array_equal(Y[:, -4:], ids[:, :4])
    np.testing.assert_array_equal(Y[:, :-4], 0)
    ids2, _ = ds.copy_memory(6, 15, n_symbols=5, length=4, seed=0, one_hot_input=False)
    np.testing.assert_array_equal(ids2, ids)


def test_delayed_echo_and_sine():
    X, Y = ds.delayed_echo(4, 12, 3, seed=1)
    assert X.shape == Y.shape == (4, 12, 1)
    np.testing.assert_array_equal(Y[:, 3:], X[:, :-3])
    np.testing.assert_array_equal(Y[:, :3], 0)
    assert set(np.unique(X)) <= {0.0, 1.0}
    X, Y = ds.sine_wave(3, 30, seed=2)
    assert X.shape == Y.shape == (3, 30, 1)
    np.testing.assert_allclose(Y[:, :-1], X[:, 1:], rtol=1e-6)
    with pytest.raises(ValueError, match="noise"):
        ds.sine_wave(3, 30, noise=-1)
    with pytest.raises(TypeError, match="T"):
        ds.delayed_echo(3, 2.5, 1)


def test_char_corpus_and_vocab():
    text = ds.char_corpus(None)
    assert 50_000 < len(text) <= 400_000
    assert text.isascii() and text == ds.char_corpus(None)
    short = ds.char_corpus(1000)
    assert short == text[:1000]
    vocab = ds.CharVocab(text)
    assert list(vocab.chars) == sorted(set(text))
    ids = vocab.encode(short)
    assert ids.dtype == np.int64 and vocab.decode(ids) == short
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ds.CharVocab("abc").encode("abd")
    with pytest.raises(ValueError, match="ids"):
        vocab.decode(np.array([len(vocab)]))


def test_stream_windows_rows_continue():
    tokens = np.arange(103)
    wins = ds.stream_windows(tokens, 4, 6)
    per_row = 102 // 4                                   # 25 -> 4 windows of 6
    assert len(wins) == per_row // 6
    full_X = np.concatenate([x for x, _ in wins], axis=1)
    full_Y = np.concatenate([y for _, y in wins], axis=1)
    for b in range(4):                                   # each row: one contiguous stretch
        np.testing.assert_array_equal(full_X[b], np.arange(b * per_row, b * per_row + 24))
    np.testing.assert_array_equal(full_Y, full_X + 1)
    with pytest.raises(ValueError, match="too few"):
        ds.stream_windows(np.arange(10), 4, 6)


def test_one_hot():
    out = ds.one_hot(np.array([[0, 2], [1, 1]]), 3)
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out.argmax(-1), [[0, 2], [1, 1]])
    with pytest.raises(ValueError):
        ds.one_hot(np.array([3]), 3)
