"""The backend registry: lazy loading, availability with reasons, and "auto".

A backend is a module implementing the kernel contract of
:mod:`fastbptt.backends.reference` (``forward_recurrence`` and ``backward_accumulate``).
Backends are imported on first use; one that fails records why, and
importing :mod:`fastbptt` never fails because a backend is missing.
"""

import importlib
import json
import os
import warnings
from pathlib import Path

import numpy as np

# name -> (module, how to get it when missing); order is the order of preference
_MODULES = {
    "cython": ("fastbptt.backends.cython.kernels",
               "the Cython extension is built by 'pip install .' (needs a C compiler, "
               "Cython, numpy and scipy at build time); reinstall and read the build log"),
    "numba": ("fastbptt.backends.numba", "install numba: pip install numba"),
    "numpy": ("fastbptt.backends.reference", "numpy is always available"),
}
ENV_VAR = "FASTBPTT_BACKEND"
#: every backend's name, in order of preference
BACKENDS = tuple(_MODULES)
#: the calibration table "auto" reads (written by ``python -m fastbptt.tools.calibrate``)
DEFAULT_PATH = Path(__file__).with_name("calibration.json")

_loaded = {}    # name -> module
_failed = {}    # name -> reason
_warned_fallback = False


def _load(name):
    if name in _loaded:
        return _loaded[name]
    if name in _failed:
        return None
    module_name, _ = _MODULES[name]
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or a broken build raising anything else
        _failed[name] = f"{type(exc).__name__}: {exc}"
        return None
    _loaded[name] = module
    return module


def available_backends():
    """Names of the backends that load here, in order of preference.

    Returns
    -------
    list of str
        e.g. ``["cython", "numba", "numpy"]``; ``"numpy"`` is always last.
    """
    return [name for name in _MODULES if _load(name) is not None]


def unavailable_backends():
    """``{name: reason}`` for each backend that failed to load."""
    available_backends()
    return {name: f"{reason} ({_MODULES[name][1]})" for name, reason in _failed.items()}


_table = None


def _calibration():
    """The table written by ``python -m fastbptt.tools.calibrate`` (None if absent or unreadable)."""
    global _table
    if _table is None:
        try:
            table = json.loads(DEFAULT_PATH.read_text())
            ok = all(len(row) == len(table["grid_H"])
                     for dt in ("float32", "float64") for row in table["winner"][dt])
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        _table = table if ok else {}
    return _table or None


def _nearest(grid, value):
    """Index of the grid point nearest to ``value`` in log scale."""
    return int(np.argmin(np.abs(np.log2(np.asarray(grid, dtype=float)) - np.log2(max(value, 1)))))


_chosen = {}                # (B, H, dtype, available backends) -> (table, backend name)


def _choose_auto(T, B, H, dtype):
    """The backend "auto" takes for this shape.

    The fastest compiled backend at the nearest point (log B, log H) of the
    calibration table measured by :mod:`fastbptt.tools.calibrate`; if that one is
    not available (or there is no table), the first available in order of
    preference.
    """
    names = available_backends()
    table = _calibration()
    key = (B, H, dtype, tuple(names))
    seen = _chosen.get(key)
    if seen is not None and seen[0] is table:   # the lookup below takes ~15 µs, a step at batch 1 ~300
        return seen[1]
    choice = names[0]
    if table is not None:
        name = np.dtype(dtype if dtype is not None else np.float32).name
        winner = table["winner"].get(name, table["winner"]["float32"])
        best = winner[_nearest(table["grid_B"], B)][_nearest(table["grid_H"], H)]
        if best in names:
            choice = best
    if len(_chosen) > 1024:
        _chosen.clear()
    _chosen[key] = (table, choice)
    return choice


def resolve_backend(backend, *, T=1, B=1, H=1, dtype=None):
    """The backend module for ``backend`` (a name or ``"auto"``) and this shape.

    ``"auto"`` takes ``FASTBPTT_BACKEND`` when it is set, else the fastest
    backend for the shape (:func:`_choose_auto`), and warns once if that is
    the NumPy reference. A named backend that is not available raises a
    ``ValueError`` saying why and how to get it.
    """
    global _warned_fallback
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, one of {['auto', *_MODULES]}, got {type(backend).__name__}")
    if backend == "auto":
        forced = os.environ.get(ENV_VAR, "").strip()
        if forced and forced != "auto":
            if forced not in _MODULES:
                raise ValueError(f"{ENV_VAR}: expected one of {['auto', *_MODULES]}, got {forced!r}")
            return resolve_backend(forced)
        name = _choose_auto(T, B, H, dtype)
        if name == "numpy" and not _warned_fallback:
            _warned_fallback = True
            reasons = "; ".join(f"{n}: {r}" for n, r in unavailable_backends().items())
            warnings.warn(
                "fastbptt: no compiled backend is available, backend='auto' falls back to the "
                f"NumPy reference, which is 10-100x slower ({reasons})",
                RuntimeWarning, stacklevel=3)
        return _loaded[name]
    if backend not in _MODULES:
        raise ValueError(f"backend: expected one of {['auto', *_MODULES]}, got {backend!r}")
    module = _load(backend)
    if module is None:
        raise ValueError(
            f"backend: {backend!r} is not available here: {_failed[backend]}. "
            f"To get it: {_MODULES[backend][1]}")
    return module


# the dispatcher that measures (it reads the registry above)
from ._wisdom import Choice, describe as dispatch_info, dispatch, dispatch_at  # noqa: E402
