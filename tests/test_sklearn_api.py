"""fastbptt.RNN follows scikit-learn's estimator API: get_params/set_params, clone, score, tags, GridSearchCV."""

import numpy as np
import pytest

import fastbptt
from fastbptt import optim


def data(N=24, T=8, D=3, O=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, T, D)), rng.standard_normal((N, T, O))


def test_get_params_returns_the_arguments_as_given():
    trunc = [3, 5]
    m = fastbptt.RNN(3, 4, 2, dtype=np.float64, truncation=trunc, batch_size=np.int64(7), seed=1)
    p = m.get_params(deep=True)
    assert p["dtype"] is np.float64 and p["truncation"] is trunc and p["batch_size"] is not None
    assert type(p["batch_size"]) is np.int64
    assert m.get_params(deep=False) == p
    again = fastbptt.RNN(**p)
    assert all(again.get_params()[k] is v for k, v in p.items())
    assert again.params == m.params                      # same seed, same draw


def test_set_params_settings_in_place_and_validated():
    X, Y = data()
    m = fastbptt.RNN(3, 4, 2, seed=0, dtype=np.float64).fit(X, Y)
    params, steps = m.params.copy(), m.optimizer_.step_count
    assert m.set_params(batch_size=5, truncation=4, lr=0.05, clip_norm=1.0) is m
    assert m.batch_size == 5 and m.truncation == 4 and m.optimizer_.lr == 0.05
    assert m.params == params and m.optimizer_.step_count == steps and len(m.history_["loss"]) == 1
    with pytest.raises(ValueError, match="batch_size"):
        m.set_params(batch_size=0)
    with pytest.raises(ValueError, match="truncation"):
        m.set_params(truncation=-1, batch_size=3)
    assert m.batch_size == 5 and m.truncation == 4            # nothing changed by a refused call
    with pytest.raises(ValueError, match="invalid parameter nope"):
        m.set_params(nope=1)
    m.set_params(hidden_size=6)                                # structural: a new model
    assert m.params.hidden_size == 6 and m.history_["loss"] == [] and m.optimizer_.step_count == 0
    assert m.params == fastbptt.RNN(3, 6, 2, seed=0, dtype=np.float64).params


def test_score_is_minus_the_mean_loss():
    X, Y = data()
    m = fastbptt.RNN(3, 4, 2, seed=0)
    assert m.score(X, Y) == pytest.approx(-m.evaluate(X, Y))


def test_clone_gives_an_unfitted_equal_config():
    base = pytest.importorskip("sklearn.base")
    X, Y = data()
    m = fastbptt.RNN(3, 4, 2, seed=2, dtype=np.float64, truncation=(2, 4), lr_schedule=optim.StepDecay(5, 0.5))
    m.fit(X, Y, epochs=2)
    c = base.clone(m)
    assert c is not m and c.history_["loss"] == [] and c.optimizer_.step_count == 0
    assert repr(c) == repr(m)
    assert c.params == fastbptt.RNN(3, 4, 2, seed=2, dtype=np.float64).params


def test_tags_and_grid_search():
    pytest.importorskip("sklearn")
    from sklearn.model_selection import GridSearchCV
    from sklearn.utils import get_tags
    X, Y = data(N=30)
    m = fastbptt.RNN(3, 4, 2, seed=0, dtype=np.float64, batch_size=8)
    tags = get_tags(m)
    assert tags.estimator_type == "regressor" and tags.input_tags.three_d_array
    gs = GridSearchCV(m, {"lr": [1e-3, 3e-2], "truncation": [None, 4]}, cv=3).fit(X, Y)
    assert set(gs.best_params_) == {"lr", "truncation"}
    assert np.isfinite(gs.best_score_) and gs.best_score_ < 0
    assert len(gs.best_estimator_.history_["loss"]) == 1
