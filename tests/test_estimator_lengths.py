"""The estimator on variable-length data: fit/predict/evaluate with lengths=, ragged lists."""

import numpy as np
import pytest

import fastbptt
from fastbptt.optim import SGD

N, T, D, H, O = 6, 9, 3, 5, 2
LENS = np.array([9, 3, 5, 1, 9, 7])


def _data(seed=0, output="sequence"):
    rng = np.random.default_rng(seed)
    X, Y = rng.normal(size=(N, T, D)), rng.normal(size=(N, T, O))
    if output == "last":
        Y = rng.normal(size=(N, O))
    Xn, Yn = X.copy(), Y.copy()
    for n in range(N):          # padding never read: NaN there
        Xn[n, LENS[n]:] = np.nan
        if output == "sequence":
            Yn[n, LENS[n]:] = np.nan
    return X, Y, Xn, Yn


def _model(**kw):
    cfg = dict(optimizer="sgd", lr=0.1, batch_size=N, dtype=np.float64, seed=0, backend="numpy")
    cfg.update(kw)
    return fastbptt.RNN(D, H, O, **cfg)


@pytest.mark.parametrize("L,bi,output", [(1, False, "sequence"), (2, True, "sequence"), (2, True, "last"),
                                         (2, False, "last")])
def test_fit_equals_loss_and_grad_with_lengths_and_sgd(L, bi, output):
    X, Y, Xn, Yn = _data(output=output)
    m = _model(num_layers=L, bidirectional=bi, output=output)
    p, opt = m.params.copy(), SGD(0.1)
    m.fit(Xn, Yn, lengths=LENS, shuffle=False, epochs=2, progress=False)
    Yt = np.swapaxes(Y, 0, 1) if output == "sequence" else Y
    for _ in range(2):
        _, g, _ = fastbptt.loss_and_grad(p, np.swapaxes(X, 0, 1), Yt, lengths=LENS, output=output, backend="numpy")
        opt.step(p, g)
    assert m.params.allclose(p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("truncation", [None, 3, (2, 4)], ids=str)
@pytest.mark.parametrize("output", ["sequence", "last"])
def test_a_ragged_list_equals_the_padded_array_with_lengths(truncation, output):
    X, Y, Xn, Yn = _data(output=output)
    a, b = (_model(num_layers=2, batch_size=4, output=output, truncation=truncation, backend="auto")
            for _ in range(2))
    Ya = [Y[n, :LENS[n]] for n in range(N)] if output == "sequence" else Y
    a.fit([X[n, :LENS[n]] for n in range(N)], Ya, epochs=2, progress=False)
    b.fit(Xn, Yn, lengths=LENS, epochs=2, progress=False)
    assert a.params == b.params
    assert a.history_["loss"] == b.history_["loss"] and np.isfinite(a.history_["loss"]).all()


def test_truncated_fit_with_lengths_steps_only_where_there_is_a_loss():
    """With output="last", an update point holding no row's last step makes no optimizer step."""
    X, Y, Xn, Yn = _data(output="last")
    m = _model(output="last", truncation=4)           # points at 4, 8, 9; rows end at 9, 3, 5, 1, 9, 7
    m.fit(Xn, Yn, lengths=LENS, shuffle=False, progress=False)
    assert m.optimizer_.step_count == 3
    m = _model(output="last", truncation=4)           # every row ends at 9: one step, at 9
    m.fit(X, Yn, lengths=np.full(N, T), shuffle=False, progress=False)
    assert m.optimizer_.step_count == 1


def test_predict_evaluate_and_state_with_lengths():
    X, Y, Xn, Yn = _data()
    m = _model(num_layers=2, bidirectional=True)
    m.fit(Xn, Yn, lengths=LENS, validation_data=(Xn, Yn, LENS), epochs=1, progress=False)
    out = m.predict(Xn, lengths=LENS)
    assert np.all(out[3, 1:] == 0) and np.isfinite(out).all()
    ref = fastbptt.forward(m.params, np.swapaxes(X, 0, 1), lengths=LENS)[0]
    valid = np.arange(T)[None, :] < LENS[:, None]
    np.testing.assert_allclose(out[valid], np.swapaxes(ref, 0, 1)[valid], rtol=1e-12)
    value = fastbptt.loss_and_grad(m.params, np.swapaxes(X, 0, 1), np.swapaxes(Y, 0, 1), lengths=LENS)[0]
    assert m.evaluate(Xn, Yn, lengths=LENS) == pytest.approx(value, rel=1e-12)
    assert m.history_["val_loss"][-1] == pytest.approx(value, rel=1e-12)
    s = _model(num_layers=2, truncation=4)
    s.fit(Xn, Yn, lengths=LENS, stateful=True, progress=False)
    _, _, h_last = fastbptt.loss_and_grad(s.params, np.swapaxes(X, 0, 1), np.swapaxes(Y, 0, 1), lengths=LENS)
    assert s.state_.shape == (2, N, H) and np.isfinite(s.state_).all()


def test_bad_lengths_for_the_estimator():
    X, Y, Xn, Yn = _data()
    m = _model()
    before = m.params.copy()
    with pytest.raises(ValueError, match="lengths: expected values in"):
        m.fit(Xn, Yn, lengths=LENS + 1)
    with pytest.raises(TypeError, match="lengths: expected integers"):
        m.fit(Xn, Yn, lengths=LENS.astype(float))
    with pytest.raises(ValueError, match="lengths: X is a list"):
        m.fit([X[0, :3], X[1]], Y[:2], lengths=[3, 9])
    with pytest.raises(ValueError, match="X: expected finite"):
        m.fit(Xn, Yn)                                  # NaN padding without lengths
    with pytest.raises(ValueError, match="Y: expected one target sequence per input"):
        m.fit([X[0, :3], X[1]], [Y[0, :2], Y[1]])
    assert m.params == before and m.optimizer_.step_count == 0
