"""The min-char-rnn benchmark computes what the gist computes: its two loops agree."""

import numpy as np
import pytest

import fastbptt
from fastbptt.tools import minchar

from helpers import RTOL


@pytest.mark.parametrize("backend", fastbptt.available_backends())
def test_gist_loss_fun_is_seq_length_times_fastbptts(backend):
    vocab, hidden, T = 11, 7, 6
    ids = minchar.corpus_ids(2000, vocab=vocab)
    Wxh, Whh, Why, bh, by = weights = [w * 30 for w in minchar.init_params(vocab, hidden, seed=1)]
    weights[3][:] = np.linspace(-0.2, 0.2, hidden)[:, None]
    hprev = np.linspace(-0.5, 0.5, hidden)[:, None]
    inputs, targets = ids[:T], ids[1:T + 1]
    loss, *grads, h = minchar.numpy_loss_fun(inputs, targets, hprev, *weights)
    assert all(np.abs(g).max() < 5 for g in grads)          # the gist's clip did nothing here
    params = fastbptt.RNNParams(Wxh, Whh, bh[:, 0], Why, by[:, 0])
    value, mine, h_last = fastbptt.loss_and_grad(params, np.eye(vocab)[inputs], targets, h0=hprev[:, 0],
                                                 loss="ce", backend=backend)
    assert abs(loss - T * value) <= RTOL[np.float64] * abs(loss)
    for theirs, ours in zip(grads, [mine.W_xh, mine.W_hh, mine.W_hy, mine.b_h[:, None], mine.b_y[:, None]]):
        assert np.max(np.abs(theirs - T * ours)) <= RTOL[np.float64] * np.max(np.abs(theirs))
    assert np.allclose(h[:, 0], h_last, rtol=0, atol=1e-14)


def test_both_loops_learn_the_same_way():
    ids = minchar.corpus_ids(5000, vocab=20)
    gist = minchar.numpy_loop(ids, 20, 16, 60) / 25         # the gist sums over the chunk
    ours = minchar.fastbptt_loop(ids, 20, 16, 60)
    assert abs(gist[0] - ours[0]) < 1e-12                    # the same start
    assert ours[-20:].mean() < ours[:5].mean() - 0.2         # both learn
    assert gist[-20:].mean() < gist[:5].mean() - 0.2


def test_time_loops_times_the_loop_after_the_dispatchers_trial(learn):
    from fastbptt.backends import _wisdom as W
    out = minchar.time_loops(3, vocab=9, hidden=6, seq_length=5)
    assert W.trials_running() == 0                     # learned before the timed chunks
    assert out["warmup_s"] > 0 and out["numpy_s"] > 0
    assert out["speedup"] == pytest.approx(out["numpy_s"] / out["fastbptt_s"])
