"""Input checks shared by every public function and class: the one set of validators.

Each check raises a ``ValueError`` or ``TypeError`` naming the argument, what
was expected and what was given. Checks return new arrays (converted,
C-contiguous) and never write to the caller's.
"""

import math
import numbers

import numpy as np

ACTIVATIONS = ("tanh", "relu")
OUTPUTS = ("sequence", "last")


def is_int(v):
    """An integer, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_int(name, value, low=1, *, allow_none=False):
    """An int >= ``low`` (or None when allowed); returns it as a Python int."""
    if value is None and allow_none:
        return None
    what = ("a positive int" if low == 1 else f"an int >= {low}") + (" or None" if allow_none else "")
    if not is_int(value):
        raise TypeError(f"{name}: expected {what}, got {value!r}")
    if value < low:
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return int(value)


def check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def check_positive(name, value, *, allow_none=False):
    """A finite real number > 0 (or None when allowed); returns it as a float."""
    if value is None and allow_none:
        return None
    what = "a finite number > 0" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {what}, got {value!r}")
    if not (math.isfinite(value) and value > 0):     # also refuses NaN
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return float(value)


def check_dtype(name, dtype):
    """float32 or float64, as a numpy dtype."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{name}: expected float32 or float64, got {dtype!r}")
    return dt


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _as_real_array(name, value):
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name}: expected an array of real numbers, got {type(value).__name__}") from exc
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected real numbers (bool, int or float), got dtype {arr.dtype}")
    return arr


def check_finite(name, arr):
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name}: expected finite values, found {arr[tuple(bad)]} at index {tuple(int(i) for i in bad)}")
    return arr


def as_float_array(name, value, shape, dtype, finite=True):
    """``value`` as a new C-contiguous array of ``shape`` and ``dtype`` (checked finite unless not ``finite``)."""
    arr = _as_real_array(name, value)
    if arr.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {arr.shape}")
    arr = np.array(arr, dtype=dtype, order="C", copy=True)
    return check_finite(name, arr) if finite else arr


def check_X(X, params, finite=True):
    """Return ``(X3, single)``: X as a C-contiguous (T, B, D) array of the params' dtype.

    ``finite=False`` leaves the finiteness check to the caller (padding may hold anything).
    """
    arr = _as_real_array("X", X)
    D = params.input_size
    if arr.ndim not in (2, 3):
        raise ValueError(f"X: expected shape (T, B, D) or (T, D) with D={D}, got shape {arr.shape}")
    single = arr.ndim == 2
    X3 = arr[:, None, :] if single else arr
    if X3.shape[-1] != D:
        raise ValueError(f"X: expected last axis of size D={D} (params.input_size), got shape {arr.shape}")
    if X3.shape[0] < 1 or X3.shape[1] < 1:
        raise ValueError(f"X: expected T >= 1 and B >= 1, got shape {arr.shape}")
    X3 = np.array(X3, dtype=params.dtype, order="C", copy=True)
    if finite:
        check_finite("X", X3)
    return X3, single


def check_lengths(lengths, T, B, single):
    """None, or (B,) integer lengths in [1, T] as int64 (a new array)."""
    if lengths is None:
        return None
    if single:
        raise ValueError("lengths: a 2-D X is one sequence of length T; give lengths only with a "
                         f"batch X of shape (T, B, D), got lengths={lengths!r}")
    try:
        arr = np.asarray(lengths)
    except Exception as exc:
        raise TypeError(f"lengths: expected a 1-D array of integers, got {type(lengths).__name__}") from exc
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths: expected integers (an integer dtype), got dtype {arr.dtype}")
    if arr.shape != (B,):
        raise ValueError(f"lengths: expected shape ({B},) (one length per sequence, B={B}), got {arr.shape}")
    if arr.size and (arr.min() < 1 or arr.max() > T):
        raise ValueError(f"lengths: expected values in [1, {T}] (T={T}), got values in [{arr.min()}, {arr.max()}]")
    return np.array(arr, dtype=np.int64, copy=True)


def valid_steps(lengths, T):
    """(T, B) bool: step t of row b is within its length."""
    return np.arange(T)[:, None] < lengths[None, :]


def check_finite_where(name, arr, valid):
    """Finite values at the positions ``valid`` (a boolean mask of the leading axes) only."""
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr[valid])):
        bad = np.argwhere(valid.reshape(valid.shape + (1,) * (arr.ndim - valid.ndim))
                          & ~np.isfinite(arr))[0]
        raise ValueError(f"{name}: expected finite values within each sequence's length, found "
                         f"{arr[tuple(bad)]} at index {tuple(int(i) for i in bad)}")
    return arr


def state_shape(params, B, single):
    """The shape of ``h0`` / ``h_last`` as users see it: (B, H) for one unidirectional layer,
    else (num_layers·dirs, B, H), torch's order; without the B axis for one sequence."""
    H, n = params.hidden_size, len(params.layers)
    lead = () if n == 1 else (n,)
    return lead + ((H,) if single else (B, H))


def check_h0(h0, params, B, single, name="h0"):
    """Return the initial states as (num_layers·dirs, B, H), C-contiguous, of the params' dtype."""
    H, n = params.hidden_size, len(params.layers)
    if h0 is None:
        return np.zeros((n, B, H), dtype=params.dtype)
    arr = _as_real_array(name, h0)
    expected = state_shape(params, B, single)
    if arr.shape != expected:
        stack = "" if n == 1 else f" (num_layers·dirs={n}, torch's h_0 order)"
        raise ValueError(f"{name}: expected shape {expected}{stack}, got {arr.shape}")
    arr = np.array(arr.reshape(n, B, H), dtype=params.dtype, order="C", copy=True)
    return check_finite(name, arr)


def check_Y(Y, params, T, B, single, loss, output, lengths=None):
    """Return targets as (T, B, O) / (B, O) floats, or (T, B) / (B,) int64 for ce.

    With ``lengths`` and ``output="sequence"`` only the valid steps are checked
    (padding may hold anything); the returned copy holds zeros there.
    """
    O = params.output_size
    lead = (T, B) if output == "sequence" else (B,)
    user_lead = ((T,) if single else (T, B)) if output == "sequence" else (() if single else (B,))
    arr = _as_real_array("Y", Y)
    if lengths is not None and output == "sequence" and arr.shape[:2] == (T, B):
        valid = valid_steps(lengths, T)
        clean = np.zeros_like(arr)
        clean[valid] = arr[valid]
        arr = clean
    if loss == "ce":
        expected = user_lead
        if arr.shape != expected:
            raise ValueError(f"Y: expected integer class ids of shape {expected} for loss='ce', "
                             f"output={output!r}, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            else:
                raise TypeError(f"Y: expected integer class ids for loss='ce', got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= O):
            raise ValueError(f"Y: expected class ids in [0, {O}) (O={O}), got values in "
                             f"[{arr.min()}, {arr.max()}]")
        return np.array(arr.reshape(lead), dtype=np.int64, order="C", copy=True)
    expected = user_lead + (O,)
    if arr.shape != expected:
        raise ValueError(f"Y: expected shape {expected} for loss={loss!r}, output={output!r}, got {arr.shape}")
    arr = np.array(arr.reshape(lead + (O,)), dtype=params.dtype, order="C", copy=True)
    check_finite("Y", arr)
    if loss == "bce" and arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(f"Y: expected targets in [0, 1] for loss='bce', got values in [{arr.min()}, {arr.max()}]")
    return arr


def check_truncation(truncation, bidirectional=False, allow_artbp=False):
    """None, k >= 1, (k1, k2) with 1 <= k1 <= k2, or ("artbp", c[, seed]) with 0 < c < 1.

    Returns None, an int, (int, int) or ("artbp", float, int or None).
    """
    if truncation is None:
        return None
    if bidirectional:
        raise ValueError(f"truncation: a bidirectional model takes truncation=None only (its reverse "
                         f"direction runs from the last step back to the first, across every window), "
                         f"got {truncation!r}")
    if is_int(truncation):
        if truncation < 1:
            raise ValueError(f"truncation: expected k >= 1, got {truncation}")
        return int(truncation)
    if isinstance(truncation, (tuple, list)) and len(truncation) == 2 and all(is_int(k) for k in truncation):
        k1, k2 = (int(k) for k in truncation)
        if not 1 <= k1 <= k2:
            raise ValueError(f"truncation: expected (k1, k2) with 1 <= k1 <= k2, got {tuple(truncation)}")
        return (k1, k2)
    if isinstance(truncation, (tuple, list)) and len(truncation) in (2, 3) and truncation[0] == "artbp":
        if not allow_artbp:
            raise ValueError(f"truncation: ('artbp', c) is available in fastbptt.loss_and_grad, not in the "
                             f"trainer yet, got {truncation!r}")
        c = truncation[1]
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 < c < 1:
            raise ValueError(f"truncation: ('artbp', c, seed) takes a truncation probability 0 < c < 1, "
                             f"got c={c!r}")
        seed = truncation[2] if len(truncation) == 3 else None
        if seed is not None and (not is_int(seed) or seed < 0):
            raise ValueError(f"truncation: ('artbp', c, seed) takes a seed None or an int >= 0, got {seed!r}")
        return ("artbp", float(c), None if seed is None else int(seed))
    raise ValueError(f"truncation: expected None, an int k >= 1, a pair (k1, k2) or ('artbp', c, seed), "
                     f"got {truncation!r}")
