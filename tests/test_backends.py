"""The registry and the dispatcher: availability with reasons, "auto" from the calibration table."""

import json
import warnings

import numpy as np
import pytest

import fastbptt
from fastbptt import backends as _backends
from fastbptt.backends import DEFAULT_PATH


def test_calibration_table_ships_and_covers_the_grid():
    table = json.loads(DEFAULT_PATH.read_text())
    for dtype in ("float32", "float64"):
        assert len(table["winner"][dtype]) == len(table["grid_B"])
        for row, secs in zip(table["winner"][dtype], table["seconds"][dtype]):
            assert len(row) == len(table["grid_H"])
            for winner, cell in zip(row, secs):
                assert winner == min(cell, key=cell.get)      # the winner is the measured fastest


@pytest.fixture
def fake_table(monkeypatch):
    table = {"grid_B": [1, 64], "grid_H": [32, 512],
             "winner": {"float32": [["cython", "numba"], ["numba", "cython"]],
                        "float64": [["numba", "numba"], ["numba", "numba"]]}}
    monkeypatch.setattr(_backends, "_table", table)
    return table


@pytest.mark.parametrize("B,H,dtype,expected", [
    (1, 32, np.float32, "cython"), (2, 20, np.float32, "cython"),      # nearest point in log scale
    (1, 700, np.float32, "numba"), (100, 40, np.float32, "numba"), (64, 400, np.float32, "cython"),
    (1, 32, np.float64, "numba"),
])
def test_auto_takes_the_nearest_measured_winner(fake_table, B, H, dtype, expected):
    assert _backends._choose_auto(10, B, H, dtype) == expected
    assert _backends.resolve_backend("auto", T=10, B=B, H=H, dtype=dtype).NAME == expected


def test_auto_falls_back_when_the_winner_is_missing(fake_table, monkeypatch):
    monkeypatch.setitem(_backends._failed, "cython", "ImportError: test")
    monkeypatch.delitem(_backends._loaded, "cython", raising=False)
    assert _backends._choose_auto(10, 1, 32, np.float32) == "numba"
    with pytest.raises(ValueError, match=r"backend: 'cython' is not available here: ImportError: test.*pip install"):
        _backends.resolve_backend("cython")
    assert "cython" in _backends.unavailable_backends()
    assert fastbptt.available_backends() == ["numba", "numpy"]


def test_fallback_to_numpy_warns_once(monkeypatch):
    for name in ("cython", "numba"):
        monkeypatch.setitem(_backends._failed, name, "ImportError: test")
        monkeypatch.delitem(_backends._loaded, name, raising=False)
    monkeypatch.setattr(_backends, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="falls back to the NumPy reference"):
        assert _backends.resolve_backend("auto").NAME == "numpy"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backends.resolve_backend("auto").NAME == "numpy"


def test_environment_variable_overrides_auto(fake_table, monkeypatch):
    monkeypatch.setenv("FASTBPTT_BACKEND", "numpy")
    assert _backends.resolve_backend("auto", B=1, H=32, dtype=np.float32).NAME == "numpy"
    monkeypatch.setenv("FASTBPTT_BACKEND", "numba")
    assert _backends.resolve_backend("auto", B=1, H=32, dtype=np.float32).NAME == "numba"
    # an explicit name is not overridden
    assert _backends.resolve_backend("cython").NAME == "cython"


def test_auto_choice_follows_a_new_table(monkeypatch):
    """The per-shape choice is remembered, but never across a change of table or of backends."""
    one = {"grid_B": [1], "grid_H": [32], "winner": {"float32": [["cython"]], "float64": [["cython"]]}}
    two = {"grid_B": [1], "grid_H": [32], "winner": {"float32": [["numba"]], "float64": [["numba"]]}}
    monkeypatch.setattr(_backends, "_table", one)
    assert _backends._choose_auto(10, 3, 30, np.float32) == "cython"
    assert _backends._choose_auto(10, 3, 30, np.float32) == "cython"
    monkeypatch.setattr(_backends, "_table", two)
    assert _backends._choose_auto(10, 3, 30, np.float32) == "numba"
    monkeypatch.setitem(_backends._failed, "numba", "ImportError: test")
    monkeypatch.delitem(_backends._loaded, "numba", raising=False)
    assert _backends._choose_auto(10, 3, 30, np.float32) == "cython"
