"""Input checks shared by every public function and class: the one set of validators.

Each check raises a ``ValueError`` or ``TypeError`` naming the argument, what
was expected and what was given. Checks return new arrays (converted,
C-contiguous) and never write to the caller's.
"""

import math
import numbers
import os

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


def nonfinite_message(name, value, original, dtype, index):
    """The error for a non-finite ``value`` at ``index``: the caller's ``original`` value there was
    finite but does not fit ``dtype`` ("overflows float32"), or was itself NaN/inf."""
    where = f"at index {tuple(int(i) for i in index)}"
    if original is not None and np.isfinite(original):
        return (f"{name}: the value {original:.6g} {where} overflows {np.dtype(dtype).name} (largest finite "
                f"value {np.finfo(dtype).max:.4g}); scale the data or use float64 parameters")
    return f"{name}: expected finite values, found {value} {where}"


def check_finite(name, arr, source=None):
    """``arr`` if it holds no NaN or inf; else a ValueError naming the first one.

    ``source`` is the caller's array that ``arr`` was converted from (same
    shape): a finite value there that became inf is reported as an overflow
    of the dtype, not as an inf the caller gave.
    """
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = tuple(np.argwhere(~np.isfinite(arr))[0])
        original = None
        if source is not None and np.shape(source) == arr.shape and np.asarray(source).dtype.kind in "biuf":
            original = np.asarray(source)[bad].item()
        raise ValueError(nonfinite_message(name, arr[bad], original, arr.dtype, bad))
    return arr


def _all_finite(a):
    """Whether ``a`` (a float array) holds no NaN or inf: one BLAS dot product, an exact check
    only when it is not finite (NaN and inf propagate into it; a huge finite value can overflow it)."""
    v = a.reshape(-1)
    return np.isfinite(np.dot(v, v)) or bool(np.isfinite(a).all())


def check_params_finite(params, name="params"):
    """Refuse parameters holding NaN or inf, naming the array and the first bad index.

    NaN or inf weights make every output NaN and every gradient NaN: refused
    here rather than returned silently.
    """
    for i, a in enumerate(params.arrays()):
        if not _all_finite(a):
            field = params.names()[i]
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
            raise ValueError(f"{name}.{field}: expected finite parameters, found {a[bad]} at index {bad} "
                             "(NaN or inf weights make every output and gradient NaN)")
    return params


# --------------------------------------------------------------------------- memory
# A call is refused before it copies or allocates anything when it needs more memory than the
# machine has free: a MemoryError after minutes of copying, or the OOM killer, is worse. Below
# this many bytes nothing is checked (reading /proc costs ~30 µs; a call at batch 1 ~300 µs).
MEMORY_CHECK_FROM = 128 << 20


def _read_int(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory():
    """Bytes this process can still allocate, or None if unknown.

    The least of: MemAvailable + SwapFree (``/proc/meminfo``), the cgroup's
    ``memory.max`` less ``memory.current``, and ``RLIMIT_AS`` less the address
    space in use.
    """
    limits = []
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f if ":" in line)
                    if v.split() and v.split()[0].isdigit()}
        if "MemAvailable" in info:
            limits.append(info["MemAvailable"] + info.get("SwapFree", 0))
    except OSError:
        pass
    cg_max, cg_cur = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if cg_max is not None and cg_cur is not None:
        limits.append(max(0, cg_max - cg_cur))
    try:
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY:
            with open("/proc/self/statm") as f:
                used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            limits.append(max(0, soft - used))
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else None


def _bytes(n):
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.3g} {unit}" if unit != "bytes" else f"{int(n)} bytes"
        n /= 1024


def check_memory(name, need, what, hint=""):
    """Refuse a call that needs ``need`` bytes when the machine has less available (a MemoryError
    naming ``name``, the estimate and ``what`` it is made of: a string or a function giving one)."""
    if need < MEMORY_CHECK_FROM:
        return
    free = available_memory()
    if free is not None and need > free:
        what = what() if callable(what) else what
        raise MemoryError(f"{name}: this call needs about {_bytes(need)} of memory ({what}), more than the "
                          f"{_bytes(free)} available; nothing was allocated{'; ' + hint if hint else ''}")


def forward_bytes(T, B, D, params):
    """Bytes a forward pass over (T, B, D) inputs allocates at least: the converted copy of X, and per
    (layer, direction) ``[X | 1]``, the input products and the states, and the head's logits."""
    H, dirs, L = params.hidden_size, params.num_directions, params.num_layers
    per_layer = sum(T * B * ((D if l == 0 else dirs * H) + 1) + T * B * H + (T + 1) * B * H
                    for l in range(L)) * dirs
    head = T * B * (params.output_size or 0)
    return (T * B * D + per_layer + head + (T + 1) * B * dirs * H) * params.dtype.itemsize


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
    # every public call that takes data meets its parameters here first: refuse NaN/inf weights,
    # and a call that needs more memory than the machine has, before anything is copied
    check_params_finite(params)
    T, B = X3.shape[:2]
    check_memory("X", forward_bytes(T, B, D, params),
                 lambda: f"T={T}, B={B}, D={D}, H={params.hidden_size}, {params.dtype.name}: the inputs, states "
                 "and work arrays of the forward pass", "use a shorter T (a long stream cut into windows, "
                 "with h0 carried from one to the next)" + (", a smaller batch or float32 parameters"
                                                           if params.dtype.itemsize > 4 else " or a smaller batch"))
    source = X3
    with np.errstate(over="ignore"):            # an overflow is reported below, as such
        X3 = np.array(X3, dtype=params.dtype, order="C", copy=True)
    if finite:
        check_finite("X", X3, source)
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


def check_batch_sizes(batch_sizes, T, B):
    """A kernel's ``batch_sizes``: None, or T non-increasing counts in [0, B] (int64, C-contiguous)."""
    if batch_sizes is None:
        return None
    bs = np.ascontiguousarray(batch_sizes, dtype=np.int64)
    if bs.shape != (T,) or (T and (bs[0] > B or bs[-1] < 0 or np.any(bs[1:] > bs[:-1]))):
        raise ValueError(f"batch_sizes: expected {T} non-increasing counts in [0, {B}], got {batch_sizes!r}")
    return bs


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
    source = arr.reshape(n, B, H)
    with np.errstate(over="ignore"):
        arr = np.array(source, dtype=params.dtype, order="C", copy=True)
    return check_finite(name, arr, source)


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
    source = arr.reshape(lead + (O,))
    with np.errstate(over="ignore"):
        arr = np.array(source, dtype=params.dtype, order="C", copy=True)
    check_finite("Y", arr, source)
    if loss == "mse":
        check_squared_error_fits("Y", arr)
    if loss == "bce" and arr.size and (arr.min() < 0 or arr.max() > 1):
        raise ValueError(f"Y: expected targets in [0, 1] for loss='bce', got values in [{arr.min()}, {arr.max()}]")
    return arr


def check_squared_error_fits(name, Y):
    """Refuse mse targets so large that their squared error overflows the dtype (the loss would be
    inf, every gradient NaN): |y| must stay below sqrt(max)/2 (the output may be as far on the other side)."""
    if Y.size:
        limit = np.sqrt(np.finfo(Y.dtype).max) / 2
        peak = float(np.max(np.abs(Y)))
        if peak > limit:
            bad = tuple(int(i) for i in np.unravel_index(int(np.argmax(np.abs(Y))), Y.shape))
            raise ValueError(f"{name}: the target {Y[bad].item():.6g} at index {bad} overflows {Y.dtype.name} in the "
                             f"squared error (mse needs |y| < {limit:.3g} in {Y.dtype.name}); scale the targets "
                             "or use float64 parameters")
    return Y


def check_truncation(truncation, bidirectional=False, allow_artbp=False):
    """None, k >= 1, (k1, k2) with 1 <= k1 <= k2, or ("artbp", c[, seed]) with 0 < c < 1.

    ``allow_artbp``: False refuses ARTBP, True takes it, ``"trainer"`` takes it
    without a seed only (the estimator draws the cuts from its own generator).

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
            raise ValueError(f"truncation: ('artbp', c) is available in fastbptt.loss_and_grad and "
                             f"fastbptt.RNN, not here, got {truncation!r}")
        c = truncation[1]
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 < c < 1:
            raise ValueError(f"truncation: ('artbp', c, seed) takes a truncation probability 0 < c < 1, "
                             f"got c={c!r}")
        seed = truncation[2] if len(truncation) == 3 else None
        if seed is not None and (not is_int(seed) or seed < 0):
            raise ValueError(f"truncation: ('artbp', c, seed) takes a seed None or an int >= 0, got {seed!r}")
        if allow_artbp == "trainer" and seed is not None:
            raise ValueError(f"truncation: the trainer draws ARTBP's cuts for every mini-batch from the "
                             f"model's own generator (seed=...): expected ('artbp', c) without a seed, "
                             f"got {tuple(truncation)!r}")
        return ("artbp", float(c), None if seed is None else int(seed))
    raise ValueError(f"truncation: expected None, an int k >= 1, a pair (k1, k2) or ('artbp', c, seed), "
                     f"got {truncation!r}")


def check_checkpoint(checkpoint, truncation, bidirectional=False):
    """None (or False), an int s >= 1, or "sqrt" (or True); only with full BPTT, unidirectional.

    Returns None, an int or "sqrt".
    """
    if checkpoint is None or checkpoint is False:
        return None
    if checkpoint is True or (isinstance(checkpoint, str) and checkpoint == "sqrt"):
        checkpoint = "sqrt"
    elif isinstance(checkpoint, str):
        raise ValueError(f"checkpoint: expected None, an int s >= 1 or 'sqrt', got {checkpoint!r}")
    elif not is_int(checkpoint):
        raise TypeError(f"checkpoint: expected None, an int s >= 1 (keep the state every s steps) or "
                        f"'sqrt' (s = ceil(sqrt(T))), got {checkpoint!r}")
    elif checkpoint < 1:
        raise ValueError(f"checkpoint: expected an int s >= 1 or 'sqrt', got {checkpoint!r}")
    if truncation is not None:
        raise ValueError(f"checkpoint: recomputing the forward is for full BPTT (truncation=None), whose "
                         f"memory grows with T; got checkpoint={checkpoint!r} with truncation={truncation!r}")
    if bidirectional:
        raise ValueError(f"checkpoint: a bidirectional model takes checkpoint=None only (its reverse direction "
                         f"would need its own checkpoints), got {checkpoint!r}")
    return checkpoint if checkpoint == "sqrt" else int(checkpoint)
