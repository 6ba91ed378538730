"""min-char-rnn (Karpathy's 2015 gist) two ways: its own pure-NumPy loop, and a :class:`fastbptt.Step`.

Both run the gist's training loop on the same text: chunks of ``seq_length``
characters, one-hot inputs, the hidden state carried from chunk to chunk,
gradients clipped into [-5, 5], Adagrad. The NumPy loop is the gist's
``lossFun`` and update, line for line (float64, sampling left out). The
fastbptt loop differs only where the libraries' definitions do: the loss is
the mean over the chunk's steps (the gist sums them; the gist's gradient is
``seq_length`` times fastbptt's, see :func:`numpy_loss_fun`) and Adagrad adds
eps outside the square root (torch's); the learning rate is scaled so that
both take comparable steps.
"""

import time

import numpy as np

from ..datasets import char_corpus


def corpus_ids(n_chars=20_000, vocab=65):
    """Character ids of the bundled corpus (the ``vocab - 1`` most frequent characters, the rest one id)."""
    text = char_corpus(n_chars)
    chars, counts = np.unique(list(text), return_counts=True)
    keep = chars[np.argsort(-counts, kind="stable")][:vocab - 1]
    index = {c: i for i, c in enumerate(keep)}
    return np.array([index.get(c, vocab - 1) for c in text], dtype=np.int64)


def init_params(vocab, hidden, seed=0, dtype=np.float64):
    """The gist's initialisation: weights ~ N(0, 0.01²), biases zero. ``(Wxh, Whh, Why, bh, by)``."""
    rng = np.random.default_rng(seed)
    Wxh = rng.standard_normal((hidden, vocab)) * 0.01
    Whh = rng.standard_normal((hidden, hidden)) * 0.01
    Why = rng.standard_normal((vocab, hidden)) * 0.01
    return tuple(a.astype(dtype) for a in (Wxh, Whh, Why, np.zeros((hidden, 1)), np.zeros((vocab, 1))))


def numpy_loss_fun(inputs, targets, hprev, Wxh, Whh, Why, bh, by):
    """The gist's ``lossFun``: the summed loss, gradients and the last hidden state ((H, 1) columns)."""
    xs, hs, ys, ps = {}, {}, {}, {}
    hs[-1] = np.copy(hprev)
    loss = 0
    vocab = Wxh.shape[1]
    for t in range(len(inputs)):
        xs[t] = np.zeros((vocab, 1))
        xs[t][inputs[t]] = 1
        hs[t] = np.tanh(np.dot(Wxh, xs[t]) + np.dot(Whh, hs[t - 1]) + bh)
        ys[t] = np.dot(Why, hs[t]) + by
        ps[t] = np.exp(ys[t]) / np.sum(np.exp(ys[t]))
        loss += -np.log(ps[t][targets[t], 0])
    dWxh, dWhh, dWhy = np.zeros_like(Wxh), np.zeros_like(Whh), np.zeros_like(Why)
    dbh, dby = np.zeros_like(bh), np.zeros_like(by)
    dhnext = np.zeros_like(hs[0])
    for t in reversed(range(len(inputs))):
        dy = np.copy(ps[t])
        dy[targets[t]] -= 1
        dWhy += np.dot(dy, hs[t].T)
        dby += dy
        dh = np.dot(Why.T, dy) + dhnext
        dhraw = (1 - hs[t] * hs[t]) * dh
        dbh += dhraw
        dWxh += np.dot(dhraw, xs[t].T)
        dWhh += np.dot(dhraw, hs[t - 1].T)
        dhnext = np.dot(Whh.T, dhraw)
    for dparam in [dWxh, dWhh, dWhy, dbh, dby]:
        np.clip(dparam, -5, 5, out=dparam)
    return loss, dWxh, dWhh, dWhy, dbh, dby, hs[len(inputs) - 1]


def numpy_loop(ids, vocab, hidden, chunks, *, seq_length=25, lr=0.1, seed=0):
    """The gist's training loop for ``chunks`` updates; returns the summed losses per chunk."""
    Wxh, Whh, Why, bh, by = params = init_params(vocab, hidden, seed)
    mems = [np.zeros_like(p) for p in params]
    hprev = np.zeros((hidden, 1))
    losses = np.empty(chunks)
    p = 0
    for n in range(chunks):
        if p + seq_length + 1 >= len(ids):
            p, hprev = 0, np.zeros((hidden, 1))
        inputs, targets = ids[p:p + seq_length], ids[p + 1:p + seq_length + 1]
        loss, dWxh, dWhh, dWhy, dbh, dby, hprev = numpy_loss_fun(inputs, targets, hprev, *params)
        for param, dparam, mem in zip(params, [dWxh, dWhh, dWhy, dbh, dby], mems):
            mem += dparam * dparam
            param += -lr * dparam / np.sqrt(mem + 1e-8)
        losses[n] = loss
        p += seq_length
    return losses


def fastbptt_loop(ids, vocab, hidden, chunks, *, seq_length=25, lr=0.1, seed=0, dtype=np.float64,
                  backend="auto"):
    """The same loop with a :class:`fastbptt.Step`; returns the mean losses per chunk."""
    import fastbptt
    from fastbptt.optim import Adagrad

    Wxh, Whh, Why, bh, by = init_params(vocab, hidden, seed, dtype)
    params = fastbptt.RNNParams(Wxh, Whh, bh[:, 0], Why, by[:, 0])
    step = fastbptt.Step(params, loss="ce", optimizer=Adagrad(lr=lr), clip_value=5.0, backend=backend)
    eye = np.eye(vocab, dtype=dtype)
    h = np.zeros(hidden, dtype)
    losses = np.empty(chunks)
    p = 0
    for n in range(chunks):
        if p + seq_length + 1 >= len(ids):
            p, h = 0, np.zeros(hidden, dtype)
        X = eye[ids[p:p + seq_length]]                 # (T, vocab): one sequence
        losses[n], h = step(X, ids[p + 1:p + seq_length + 1], h)
        p += seq_length
    return losses


def time_loops(chunks=300, *, vocab=65, hidden=100, seq_length=25, dtype=np.float32, backend="auto"):
    """Seconds per chunk of both loops. Untimed first (``warmup_s``): 20 fastbptt chunks (its JIT and
    plans), then more while the dispatcher is still trying its candidates at this shape (a new
    machine's first process; at most 2000 chunks)."""
    from ..backends._wisdom import trials_running

    ids = corpus_ids(vocab=vocab)
    t = time.perf_counter()
    fastbptt_loop(ids, vocab, hidden, 20, seq_length=seq_length, dtype=dtype, backend=backend)
    for _ in range(100):
        if not trials_running():
            break
        fastbptt_loop(ids, vocab, hidden, 20, seq_length=seq_length, dtype=dtype, backend=backend)
    warmup = time.perf_counter() - t
    t = time.perf_counter()
    fastbptt_loop(ids, vocab, hidden, chunks, seq_length=seq_length, dtype=dtype, backend=backend)
    fast = (time.perf_counter() - t) / chunks
    t = time.perf_counter()
    numpy_loop(ids, vocab, hidden, chunks, seq_length=seq_length)
    slow = (time.perf_counter() - t) / chunks
    return {"numpy_s": slow, "fastbptt_s": fast, "speedup": slow / fast, "warmup_s": warmup}
