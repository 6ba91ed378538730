"""The RNN estimator: training semantics, learning, resumption, persistence and bad input."""

import json
import os
import warnings

import numpy as np
import pytest

import fastbptt
from fastbptt import datasets as ds
from fastbptt.engine.training import update_points
from fastbptt.estimator import RNN
from fastbptt.optim import SGD, Adam

@pytest.fixture(autouse=True)
def quiet_fallback():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # "auto" may fall back to NumPy
        yield


def snapshot(m):
    return (m.params.copy(), m.optimizer_.state_dict(), m._rng.bit_generator.state,
            json.dumps(m.history_), None if m.state_ is None else m.state_.copy())


def assert_same(a, b):
    assert a[0] == b[0]
    sa, sb = a[1], b[1]
    assert sa["name"] == sb["name"] and sa["hyperparams"] == sb["hyperparams"] and sa["step"] == sb["step"]
    assert sa["buffers"].keys() == sb["buffers"].keys()
    for k in sa["buffers"]:
        assert sa["buffers"][k].keys() == sb["buffers"][k].keys()
        for n in sa["buffers"][k]:
            np.testing.assert_array_equal(sa["buffers"][k][n], sb["buffers"][k][n])
    assert a[2] == b[2]
    assert a[3] == b[3]
    if a[4] is None or b[4] is None:
        assert a[4] is None and b[4] is None
    else:
        np.testing.assert_array_equal(a[4], b[4])


# ------------------------------------------------------------------ truncation semantics

def oracle_update(P, xs, h_start, ys):
    """mse on the last len(ys) steps of xs, full backprop through all of xs (float64, plain numpy)."""
    L, m = len(xs), len(ys)
    hs = [h_start]
    for t in range(L):
        hs.append(np.tanh(xs[t] @ P["W_xh"].T + hs[-1] @ P["W_hh"].T + P["b_h"]))
    os_ = [hs[L - m + 1 + i] @ P["W_hy"].T + P["b_y"] for i in range(m)]
    n = ys.size
    loss = sum(float(np.sum((o - y) ** 2)) for o, y in zip(os_, ys)) / n
    g = {k: np.zeros_like(v) for k, v in P.items()}
    dh_next = np.zeros_like(h_start)
    for t in range(L - 1, -1, -1):
        dh = dh_next.copy()
        i = t - (L - m)
        if i >= 0:
            do = 2 * (os_[i] - ys[i]) / n
            g["W_hy"] += do.T @ hs[t + 1]
            g["b_y"] += do.sum(0)
            dh += do @ P["W_hy"]
        dz = dh * (1 - hs[t + 1] ** 2)
        g["W_xh"] += dz.T @ xs[t]
        g["W_hh"] += dz.T @ hs[t]
        g["b_h"] += dz.sum(0)
        dh_next = dz @ P["W_hh"]
    return loss, g, hs


def oracle_fit(P, X, Y, truncation, lr):
    """One batch, online SGD with an update at every update point (DESIGN.md, Training)."""
    X, Y = np.swapaxes(X, 0, 1), np.swapaxes(Y, 0, 1)
    T = X.shape[0]
    states = [np.zeros((X.shape[1], P["W_hh"].shape[0]))]
    if truncation is None:
        points = [(0, 0, T)]
    else:
        k1, k2 = (truncation, None) if isinstance(truncation, int) else truncation
        ends = list(range(k1, T, k1)) + [T]
        prevs = [0] + ends[:-1]
        points = [(p if k2 is None else max(t - k2, 0), p, t) for p, t in zip(prevs, ends)]
    for s, tp, t in points:
        _, g, hs = oracle_update(P, X[s:t], states[s], Y[tp:t])
        for k in P:
            P[k] = P[k] - lr * g[k]
        states.extend(hs[tp - s + 1:])
    return P


@pytest.mark.parametrize("truncation", [None, 4, 5, (3, 3), (3, 7), (4, 6), (1, 1)],
                         ids=["full", "k4", "k5", "k3k3", "k3k7", "k4k6", "k1k1"])
def test_online_updates_match_oracle(truncation):
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(5, 14, 2)), rng.normal(size=(5, 14, 3))
    m = RNN(2, 4, 3, optimizer="sgd", lr=0.2, truncation=truncation, batch_size=5,
            dtype=np.float64, backend="numpy", seed=1)
    P = {n: a.copy() for n, a in m.params.items()}
    m.fit(X, Y, shuffle=False, progress=False)
    expected = oracle_fit(P, X, Y, truncation, 0.2)
    for n, a in m.params.items():
        np.testing.assert_allclose(a, expected[n], rtol=1e-10, atol=1e-12)
    n_points = 1 if truncation is None else len(update_points(14, truncation))
    assert m.optimizer_.step_count == n_points


def test_last_output_with_truncation_steps_once_per_batch():
    X, Y = ds.adding_problem(12, 10, seed=0)
    for trunc, n_steps in [(None, 3), (3, 3), ((2, 5), 3)]:
        m = RNN(2, 4, 1, output="last", truncation=trunc, batch_size=4, backend="numpy", seed=0)
        m.fit(X, Y, progress=False)
        assert m.optimizer_.step_count == n_steps
    # with output="last" and k=3 only the last chunk [9, 10) carries gradient to W_xh
    m = RNN(2, 4, 1, output="last", truncation=3, optimizer="sgd", batch_size=12,
            dtype=np.float64, backend="numpy", seed=0)
    p0 = m.params.copy()
    m.fit(X, Y, shuffle=False, progress=False)
    Xt = np.swapaxes(X, 0, 1).astype(np.float64)
    _, _, h = fastbptt.loss_and_grad(p0, Xt[:9], np.zeros((12, 1)), output="last", backend="numpy")
    _, g, _ = fastbptt.loss_and_grad(p0, Xt[9:], Y, h0=h, output="last", backend="numpy")
    np.testing.assert_allclose(m.params.W_xh, p0.W_xh - 0.01 * g.W_xh, rtol=1e-12)


# ----------------------------------------------------------------------------- learning

@pytest.mark.parametrize("truncation", [None, 6, (4, 8)], ids=["full", "k6", "k4k8"])
def test_learns_delayed_echo(truncation):
    X, Y = ds.delayed_echo(256, 30, 3, seed=0)
    Xv, Yv = ds.delayed_echo(64, 30, 3, seed=1)
    m = RNN(1, 16, 1, loss="bce", lr=1e-2, truncation=truncation, seed=0, backend="auto")
    m.fit(X, Y, epochs=12, validation_data=(Xv, Yv), progress=False)
    pred = m.predict(Xv)
    acc = np.mean((pred[:, 3:] > 0.5) == (Yv[:, 3:] > 0.5))
    assert acc > 0.97
    assert m.history_["val_loss"][-1] < 0.1 * np.log(2)
    assert len(m.history_["loss"]) == len(m.history_["seq_per_s"]) == 12
    assert all(v > 0 for v in m.history_["seq_per_s"])


def test_adding_problem_beats_mean_predictor():
    # T = 10: at T = 20, whether 20 epochs leave the plateau turned on the gradients' last bits
    # (seeds 0-4: some stayed at the mean); at T = 10 every seed ends 20-50x below it
    X, Y = ds.adding_problem(2000, 10, seed=0)
    Xv, Yv = ds.adding_problem(500, 10, seed=1)
    m = RNN(2, 32, 1, output="last", lr=1e-2, clip_norm=1.0, seed=0, backend="auto")
    m.fit(X, Y, epochs=20, validation_data=(Xv, Yv), progress=False)
    baseline = float(np.mean((Yv - Y.mean()) ** 2))
    mse = float(np.mean((m.predict(Xv) - Yv) ** 2))
    assert mse == pytest.approx(m.history_["val_loss"][-1], rel=1e-4)
    assert mse * 3 <= baseline


def test_char_model_beats_unigram_entropy():
    text = ds.char_corpus(40_000)
    vocab = ds.CharVocab(text)
    ids = vocab.encode(text)
    p = np.bincount(ids, minlength=len(vocab)) / ids.size
    unigram = float(-np.sum(p[p > 0] * np.log(p[p > 0])))
    windows = ds.stream_windows(ids, 32, 25)
    m = RNN(len(vocab), 64, len(vocab), loss="ce", lr=1e-2, clip_norm=5.0, seed=0, backend="auto")
    for _ in range(12):
        m.reset_state()
        for Xw, Yw in windows:                         # integer index input, stateful rows
            m.fit(Xw, Yw, stateful=True, shuffle=False, progress=False)
    last_epoch = float(np.mean(m.history_["loss"][-len(windows):]))
    assert last_epoch < 0.7 * unigram
    probs = m.predict(windows[0][0][:2])
    assert probs.shape == (2, 25, len(vocab))
    np.testing.assert_allclose(probs.sum(-1), 1, rtol=1e-5)


# ------------------------------------------------------------------ continuation and state

@pytest.mark.parametrize("truncation", [None, (3, 6)], ids=["full", "k3k6"])
def test_two_fits_equal_one_fit_of_two(truncation):
    X, Y = ds.sine_wave(40, 15, seed=0)
    Xv, Yv = ds.sine_wave(10, 15, seed=1)
    kw = dict(truncation=truncation, batch_size=8, seed=3, backend="numpy", lr=5e-3)
    a, b = RNN(1, 8, 1, **kw), RNN(1, 8, 1, **kw)
    a.fit(X, Y, epochs=2, validation_data=(Xv, Yv), progress=False)
    b.fit(X, Y, epochs=1, validation_data=(Xv, Yv), progress=False)
    b.fit(X, Y, epochs=1, validation_data=(Xv, Yv), progress=False)
    sa, sb = snapshot(a), snapshot(b)
    assert sa[3] != sb[3]                               # seq_per_s differ; compare the rest
    sa, sb = sa[:3] + (None, None), sb[:3] + (None, None)
    assert_same(sa, sb)
    assert a.history_["loss"] == b.history_["loss"] and a.history_["val_loss"] == b.history_["val_loss"]
    c = RNN(1, 8, 1, **kw)                              # and shuffling matters (the test can fail)
    c.fit(X, Y, epochs=1, shuffle=False, progress=False)
    c.fit(X, Y, epochs=1, progress=False)
    assert not c.params.allclose(a.params)


def test_stateful_rows_continue_and_reset():
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(6, 20, 2)), rng.normal(size=(6, 20, 1))
    m = RNN(2, 5, 1, optimizer=SGD(0.0), batch_size=4, dtype=np.float64, backend="numpy", seed=0)
    m.fit(X[:, :10], Y[:, :10], stateful=True, progress=False)     # shuffled rows keep their own state
    m.fit(X[:, 10:], Y[:, 10:], stateful=True, progress=False)
    _, Hs = fastbptt.forward(m.params, np.swapaxes(X, 0, 1), backend="numpy")
    np.testing.assert_allclose(m.state_, Hs[-1], rtol=1e-12)
    with pytest.raises(ValueError, match="reset_state"):
        m.fit(X[:3], Y[:3], stateful=True, progress=False)
    m.reset_state()
    assert m.state_ is None
    m.fit(X[:3, :10], Y[:3, :10], stateful=True, progress=False)
    _, Hs = fastbptt.forward(m.params, np.swapaxes(X[:3, :10], 0, 1), backend="numpy")
    np.testing.assert_allclose(m.state_, Hs[-1], rtol=1e-12)


def test_index_input_equals_one_hot():
    Xo, Y = ds.copy_memory(20, 5, n_symbols=4, length=3, seed=0)
    ids, _ = ds.copy_memory(20, 5, n_symbols=4, length=3, seed=0, one_hot_input=False)
    kw = dict(loss="ce", truncation=4, batch_size=6, seed=2, backend="numpy", dtype=np.float64)
    a, b = RNN(6, 7, 6, **kw), RNN(6, 7, 6, **kw)
    a.fit(Xo, Y, epochs=2, progress=False)
    b.fit(ids, Y, epochs=2, progress=False)
    assert a.params.allclose(b.params, rtol=1e-12)
    np.testing.assert_allclose(a.predict(Xo), b.predict(ids), rtol=1e-12)


# ------------------------------------------------------------------------- persistence

def test_save_load_round_trip_and_resume_exactly(tmp_path):
    X, Y = ds.delayed_echo(30, 12, 2, seed=0)
    kw = dict(loss="bce", truncation=(2, 5), clip_norm=2.0, batch_size=7, seed=5, backend="numpy",
              optimizer="rmsprop", lr=3e-3)
    full = RNN(1, 6, 1, **kw)
    full.fit(X[:, :6], Y[:, :6], stateful=True, progress=False)
    full.fit(X[:, 6:], Y[:, 6:], stateful=True, epochs=2, progress=False)

    half = RNN(1, 6, 1, **kw)
    half.fit(X[:, :6], Y[:, :6], stateful=True, progress=False)
    path = tmp_path / "model.npz"
    half.save(path)
    assert sorted(os.listdir(tmp_path)) == ["model.npz"]          # no temp files left
    loaded = RNN.load(path)
    assert loaded.get_params() == half.get_params()
    assert_same(snapshot(loaded), snapshot(half))
    np.testing.assert_array_equal(loaded.predict(X), half.predict(X))
    loaded.fit(X[:, 6:], Y[:, 6:], stateful=True, epochs=2, progress=False)
    s_loaded, s_full = snapshot(loaded), snapshot(full)
    assert_same(s_loaded[:3] + (None, s_loaded[4]), s_full[:3] + (None, s_full[4]))
    assert loaded.history_["loss"] == full.history_["loss"]


def test_save_with_optimizer_instance_and_overwrite(tmp_path):
    X, Y = ds.sine_wave(10, 8, seed=0)
    m = RNN(1, 3, 1, optimizer=Adam(lr=0.02, betas=(0.5, 0.9)), seed=0, backend="numpy", dtype=np.float64)
    path = tmp_path / "m.bin"
    m.save(path)                                        # before any step: empty buffers
    assert RNN.load(path).optimizer_.step_count == 0
    m.fit(X, Y, progress=False)
    m.save(path)                                        # atomic overwrite
    loaded = RNN.load(path)
    assert loaded.optimizer_.hyperparams == {"lr": 0.02, "betas": (0.5, 0.9), "eps": 1e-8, "weight_decay": 0.0}
    assert_same(snapshot(loaded), snapshot(m))


def test_load_refuses_corrupt_and_mismatched_files(tmp_path):
    X, Y = ds.sine_wave(10, 8, seed=0)
    m = RNN(1, 4, 1, seed=0, backend="numpy")
    m.fit(X, Y, progress=False)
    good = tmp_path / "good.npz"
    m.save(good)
    raw = good.read_bytes()

    def write(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    with pytest.raises(ValueError, match="npz"):
        RNN.load(write("garbage", b"not a zip file at all"))
    with pytest.raises(ValueError, match="not a valid"):
        RNN.load(write("truncated", raw[: len(raw) // 2]))
    with pytest.raises(FileNotFoundError):
        RNN.load(tmp_path / "missing.npz")

    # flip one byte inside the stored parameter data: the zip CRC or our checksum refuses it
    pos = raw.find(b"params/W_hh.npy")
    pos = raw.find(b"\x00", raw.find(b"}", pos)) + 40
    flipped = bytearray(raw)
    flipped[pos] ^= 0xFF
    with pytest.raises(ValueError, match="not a valid"):
        RNN.load(write("flipped", bytes(flipped)))

    def rewrite(name, edit_meta=None, edit_arrays=None):
        with np.load(good) as z:
            files = {k: z[k] for k in z.files}
        meta = json.loads(str(files["__meta__"]))
        if edit_meta:
            edit_meta(meta)
        if edit_arrays:
            edit_arrays(files)
        files["__meta__"] = np.array(json.dumps(meta))
        p = tmp_path / name
        with open(p, "wb") as f:
            np.savez(f, **files)
        return p

    def bigger(meta):
        meta["config"]["hidden_size"] = 5

    with pytest.raises(ValueError, match="shape"):
        RNN.load(rewrite("mismatch", bigger))

    def version(meta):
        meta["version"] = 99

    with pytest.raises(ValueError, match="version"):
        RNN.load(rewrite("version", version))

    def tamper(files):
        files["params/b_y"] = files["params/b_y"] + 1

    with pytest.raises(ValueError, match="checksum"):
        RNN.load(rewrite("tamper", edit_arrays=tamper))

    def bad_opt(meta):
        meta["optimizer"]["hyperparams"]["lr"] = -1

    with pytest.raises(ValueError, match="lr"):
        RNN.load(rewrite("badopt", bad_opt))
    assert RNN.load(rewrite("same")).params == m.params        # the rewriter itself is faithful


# ------------------------------------------------------------------------ bad input

def test_bad_input_leaves_model_untouched(tmp_path):
    X, Y = ds.delayed_echo(10, 8, 1, seed=0)
    m = RNN(1, 4, 1, loss="bce", seed=0, backend="numpy", batch_size=4)
    m.fit(X, Y, epochs=1, stateful=True, progress=False)
    before = snapshot(m)
    nan_X = X.copy()
    nan_X[3, 2, 0] = np.nan
    cases = [
        ((X[..., 0], Y), {}, ValueError, "X"),                 # float (N, T): not index input
        ((X, Y[:, :5]), {}, ValueError, "Y"),
        ((nan_X, Y), {}, ValueError, r"X.*\(3, 2, 0\)"),
        ((X, Y * 2), {}, ValueError, "Y"),                     # bce targets outside [0, 1]
        ((X, Y), {"epochs": 0}, ValueError, "epochs"),
        ((X, Y), {"shuffle": "yes"}, TypeError, "shuffle"),
        ((X, Y), {"validation_data": (X, Y[:, :3])}, ValueError, "validation_data"),
        ((X, Y), {"validation_data": X}, TypeError, "validation_data"),
        ((X[:5], Y[:5]), {"stateful": True}, ValueError, "reset_state"),
        ((np.full((10, 8), 3), Y), {}, ValueError, "token ids"),
        ((X.astype(str), Y), {}, TypeError, "X"),
    ]
    for args, kw, exc, match in cases:
        with pytest.raises(exc, match=match):
            m.fit(*args, progress=False, **kw)
        assert_same(snapshot(m), before)
    with pytest.raises(ValueError, match="X"):
        m.predict(X[..., None])
    assert_same(snapshot(m), before)


def test_bad_configuration():
    for kw, exc, match in [
        ({"activation": "sigmoid"}, ValueError, "activation"),
        ({"loss": "nll"}, ValueError, "loss"),
        ({"output": "all"}, ValueError, "output"),
        ({"optimizer": "adamw"}, ValueError, "optimizer"),
        ({"optimizer": Adam(), "lr": 0.1}, ValueError, "lr"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"truncation": 0}, ValueError, "truncation"),
        ({"truncation": (5, 2)}, ValueError, "truncation"),
        ({"clip_norm": 0}, ValueError, "clip_norm"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.5}, TypeError, "batch_size"),
        ({"dtype": np.int32}, TypeError, "dtype"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"seed": -3}, ValueError, "seed"),
    ]:
        with pytest.raises(exc, match=match):
            RNN(2, 3, 1, **kw)
    with pytest.raises(ValueError, match="hidden_size"):
        RNN(2, 0, 1)
    m = RNN(2, 3, 1, seed=7)
    assert m.params == fastbptt.RNNParams.init(2, 3, 1, seed=7)
    assert m.optimizer_.lr == 1e-3 and RNN(2, 3, 1, optimizer="sgd").optimizer_.lr == 1e-2


def test_divergence_raises_and_keeps_last_good_params():
    X, Y = ds.sine_wave(16, 10, seed=0)
    m = RNN(1, 4, 1, activation="relu", optimizer="sgd", lr=1e12, batch_size=4, backend="numpy", seed=0)
    with pytest.raises(FloatingPointError, match=r"epoch 1, update step \d+"):
        m.fit(X, Y, epochs=3, progress=False)
    assert all(np.all(np.isfinite(a)) for a in m.params.arrays())
    assert m.history_["loss"] == []


def test_progress_lines_and_quiet_modes(capsys):
    """The display itself is tested in test_callbacks.py; here: what goes where."""
    import io
    from fastbptt._progress import make_progress
    X, Y = ds.sine_wave(8, 5, seed=0)
    m = RNN(1, 3, 1, backend="numpy", seed=0, batch_size=4)
    m.fit(X, Y, progress=True)
    err = capsys.readouterr().err
    assert err.startswith("epoch 1/1: loss ") and err.count("\n") == 1
    m.fit(X, Y, progress=False)
    assert capsys.readouterr().err == ""
    assert type(make_progress(None, 1, 8, io.StringIO())).__name__ == "_Null"   # not a TTY
    with pytest.raises(TypeError, match="progress"):
        m.fit(X, Y, progress="yes")
