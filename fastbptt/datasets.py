"""Small generated datasets (seeded, no download) and a character corpus.

Every generator returns samples-first arrays, as :class:`fastbptt.RNN`
takes them: ``X`` of shape (N, T, D) and targets by task. Each takes a
``seed`` for a local generator; the global NumPy state is never used.

The character corpus is built, on first use, from the docstrings of a
fixed list of pure-Python standard-library modules of the running Python
(read from their source with :mod:`ast`, so it works under ``python -OO``
too). That text is part of CPython and is distributed under the PSF
License, like Python itself; nothing is downloaded and nothing is shipped
in this package. Its exact content depends on the Python version.
"""

import ast
import functools
import importlib.util
import numbers

import numpy as np

__all__ = ["adding_problem", "adding_problem_ragged", "copy_memory", "delayed_echo", "sine_wave", "char_corpus",
           "CharVocab", "stream_windows", "one_hot"]


def _check_int(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int >= {low}, got {value!r}")
    if value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return int(value)


def _rng(seed):
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def adding_problem(n, T, *, distance=None, seed=None, dtype=np.float32):
    """The adding problem (Hochreiter & Schmidhuber 1997).

    Each step carries a value in U(0, 1) and a marker; exactly two steps are
    marked, one in each half of the sequence; the target is the sum of the
    two marked values. Predicting the mean (1.0) gives an MSE of about 1/6.

    With ``distance=d`` the dependency distance is controlled instead: the
    markers are at steps T-1-d and T-1 (0-based), so the first marked value
    must be carried exactly d steps to the output at the last step. Predicting
    the mean still gives 1/6; a model that reads only the last step's value
    (no memory) gets 1/12.

    Parameters
    ----------
    n : int
        Number of sequences.
    T : int >= 2
        Sequence length.
    distance : int in [1, T-1] or None
        The steps between the two markers (None: random, one in each half).
    seed : int, Generator or None

    Returns
    -------
    X : ndarray of shape (n, T, 2)
        ``X[..., 0]`` the values, ``X[..., 1]`` the 0/1 markers.
    Y : ndarray of shape (n, 1)
        For ``loss="mse"``, ``output="last"``.
    """
    n, T = _check_int("n", n), _check_int("T", T, 2)
    if distance is not None:
        distance = _check_int("distance", distance)
        if distance > T - 1:
            raise ValueError(f"distance: expected an int in [1, T-1={T - 1}], got {distance}")
    rng = _rng(seed)
    X = np.zeros((n, T, 2), dtype=dtype)
    X[..., 0] = rng.uniform(0.0, 1.0, size=(n, T))
    if distance is None:
        half = T // 2
        i = rng.integers(0, half, size=n)
        j = rng.integers(half, T, size=n)
    else:
        i, j = np.full(n, T - 1 - distance), np.full(n, T - 1)
    rows = np.arange(n)
    X[rows, i, 1] = 1
    X[rows, j, 1] = 1
    Y = (X[rows, i, 0] + X[rows, j, 0])[:, None].astype(dtype)
    return X, Y


def adding_problem_ragged(n, T_max, *, min_length=2, seed=None, dtype=np.float32):
    """The adding problem with sequences of random lengths, padded to ``T_max``.

    Sequence i has a length ``lengths[i]`` drawn uniformly from
    ``[min_length, T_max]``; within it, as in :func:`adding_problem`, each
    step carries a value in U(0, 1) and a marker, exactly two steps are
    marked, one in each half of the sequence's own length (the first in
    ``[0, L//2)``, the second in ``[L//2, L)``), and the target is the sum of
    the two marked values. Steps ``t >= lengths[i]`` are padding: zeros, never
    marked. Train with ``loss="mse"``, ``output="last"`` (each sequence's own
    last step) and ``lengths=``.

    Parameters
    ----------
    n : int
        Number of sequences.
    T_max : int >= 2
        The padded length (the longest a sequence can be).
    min_length : int, 2 <= min_length <= T_max
        The shortest a sequence can be.
    seed : int, Generator or None

    Returns
    -------
    X : ndarray of shape (n, T_max, 2)
        ``X[..., 0]`` the values, ``X[..., 1]`` the 0/1 markers; zeros at padded steps.
    Y : ndarray of shape (n, 1)
        For ``loss="mse"``, ``output="last"``.
    lengths : int64 ndarray of shape (n,)
        Each sequence's length, in ``[min_length, T_max]``.
    """
    n, T_max = _check_int("n", n), _check_int("T_max", T_max, 2)
    min_length = _check_int("min_length", min_length, 2)
    if min_length > T_max:
        raise ValueError(f"min_length: expected an int in [2, T_max={T_max}], got {min_length}")
    rng = _rng(seed)
    lengths = rng.integers(min_length, T_max + 1, size=n).astype(np.int64)
    valid = np.arange(T_max)[None, :] < lengths[:, None]              # (n, T_max)
    X = np.zeros((n, T_max, 2), dtype=dtype)
    X[..., 0] = np.where(valid, rng.uniform(0.0, 1.0, size=(n, T_max)), 0.0)
    half = lengths // 2                                                # >= 1: both halves non-empty
    i = rng.integers(0, half)
    j = rng.integers(half, lengths)
    rows = np.arange(n)
    X[rows, i, 1] = 1
    X[rows, j, 1] = 1
    Y = (X[rows, i, 0] + X[rows, j, 0])[:, None].astype(dtype)
    return X, Y, lengths


def copy_memory(n, delay, *, n_symbols=8, length=10, seed=None, one_hot_input=True, dtype=np.float32):
    """The copy-memory task: remember ``length`` symbols over ``delay`` blank steps.

    Inputs: ``length`` random symbols in 1..n_symbols, then ``delay - 1``
    blanks (0), then the delimiter (n_symbols + 1), then ``length`` blanks.
    Targets: blanks (0) everywhere except the last ``length`` steps, which
    must reproduce the symbols. ``T = delay + 2·length``. The memoryless
    baseline cross-entropy is ``length·log(n_symbols) / T``.

    Parameters
    ----------
    n, delay : int
    n_symbols, length : int
    seed : int, Generator or None
    one_hot_input : bool
        True: X is one-hot float (n, T, n_symbols + 2). False: integer ids
        (n, T), which :meth:`fastbptt.RNN.fit` one-hot encodes per mini-batch.

    Returns
    -------
    X : ndarray of shape (n, T, n_symbols + 2) or (n, T)
    Y : int64 ndarray of shape (n, T)
        Class ids in [0, n_symbols + 2), for ``loss="ce"``, ``output="sequence"``.
    """
    n, delay = _check_int("n", n), _check_int("delay", delay)
    n_symbols, length = _check_int("n_symbols", n_symbols), _check_int("length", length)
    rng = _rng(seed)
    T = delay + 2 * length
    V = n_symbols + 2
    ids = np.zeros((n, T), dtype=np.int64)
    symbols = rng.integers(1, n_symbols + 1, size=(n, length))
    ids[:, :length] = symbols
    ids[:, length + delay - 1] = n_symbols + 1
    Y = np.zeros((n, T), dtype=np.int64)
    Y[:, -length:] = symbols
    return (one_hot(ids, V, dtype=dtype) if one_hot_input else ids), Y


def delayed_echo(n, T, delay, *, seed=None, dtype=np.float32):
    """Echo a random bit stream ``delay`` steps later: ``y_t = x_{t-delay}`` (0 before).

    Parameters
    ----------
    n, T : int
    delay : int >= 0
    seed : int, Generator or None

    Returns
    -------
    X : ndarray of shape (n, T, 1)
        0/1 bits.
    Y : ndarray of shape (n, T, 1)
        0/1 targets, for ``loss="bce"`` (or ``"mse"``), ``output="sequence"``.
        A memoryless predictor reaches at best ``log 2`` BCE on the echoed steps.
    """
    n, T = _check_int("n", n), _check_int("T", T)
    delay = _check_int("delay", delay, 0)
    rng = _rng(seed)
    X = rng.integers(0, 2, size=(n, T, 1)).astype(dtype)
    Y = np.zeros_like(X)
    if delay < T:
        Y[:, delay:] = X[:, :T - delay]
    return X, Y


def sine_wave(n, T, *, seed=None, noise=0.0, dtype=np.float32):
    """Next-value prediction of sine waves with random frequency, phase and amplitude.

    ``x_t = a·sin(ω t + φ) + noise``, target ``y_t = x_{t+1}`` (noise-free).

    Parameters
    ----------
    n, T : int
    seed : int, Generator or None
    noise : float >= 0
        Standard deviation of Gaussian noise added to the inputs.

    Returns
    -------
    X, Y : ndarrays of shape (n, T, 1)
        For ``loss="mse"``, ``output="sequence"``.
    """
    n, T = _check_int("n", n), _check_int("T", T)
    if not isinstance(noise, numbers.Real) or not noise >= 0:
        raise ValueError(f"noise: expected a real number >= 0, got {noise!r}")
    rng = _rng(seed)
    omega = rng.uniform(0.1, 0.5, size=(n, 1))
    phase = rng.uniform(0.0, 2 * np.pi, size=(n, 1))
    amp = rng.uniform(0.5, 1.0, size=(n, 1))
    t = np.arange(T + 1)[None, :]
    wave = amp * np.sin(omega * t + phase)
    X = wave[:, :T] + (noise * rng.standard_normal((n, T)) if noise else 0.0)
    return X[..., None].astype(dtype), wave[:, 1:, None].astype(dtype)


def one_hot(ids, n_classes, *, dtype=np.float32):
    """One-hot encode integer ids: shape ``ids.shape + (n_classes,)``."""
    ids = np.asarray(ids)
    n_classes = _check_int("n_classes", n_classes)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids: expected integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= n_classes):
        raise ValueError(f"ids: expected values in [0, {n_classes}), got [{ids.min()}, {ids.max()}]")
    out = np.zeros(ids.shape + (n_classes,), dtype=dtype)
    np.put_along_axis(out, ids[..., None], 1, axis=-1)
    return out


# --------------------------------------------------------------- characters

# pure-Python stdlib modules with long English docstrings, present on every CPython
_CORPUS_MODULES = ("textwrap", "string", "argparse", "collections", "functools", "json",
                   "logging", "pathlib", "subprocess", "threading", "unittest.case",
                   "difflib", "inspect", "tarfile", "zipfile", "email.message", "calendar",
                   "fractions", "decimal", "heapq", "bisect", "random", "shutil", "tempfile",
                   "typing", "dataclasses", "enum", "datetime", "configparser", "csv", "pprint")


@functools.lru_cache(maxsize=None)
def _stdlib_docstrings():
    parts = []
    for mod in _CORPUS_MODULES:
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            with open(spec.origin, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    parts.append(doc.strip())
    text = "\n\n".join(parts)
    return "".join(c for c in text if c.isascii())


def char_corpus(max_chars=200_000):
    """An English text corpus from the Python standard library's docstrings.

    The docstrings of a fixed list of pure-Python stdlib modules, read from
    their source files (PSF License; see the module docstring), ASCII only,
    joined by blank lines. Deterministic for a given Python version.

    Parameters
    ----------
    max_chars : int or None
        Keep only the first ``max_chars`` characters (None: all, a few
        hundred KB).

    Returns
    -------
    str
    """
    text = _stdlib_docstrings()
    if not text:
        raise RuntimeError("char_corpus: no standard-library source files were found to read "
                           "docstrings from (an installation without .py sources?)")
    if max_chars is not None:
        text = text[:_check_int("max_chars", max_chars)]
    return text


class CharVocab:
    """Character <-> index mapping.

    Parameters
    ----------
    chars : str or iterable of str
        The alphabet; duplicates are dropped and the rest sorted, so the same
        text always gives the same ids. ``CharVocab(text)`` builds it from a text.

    Attributes
    ----------
    chars : str
        The sorted alphabet; ``chars[i]`` is the character of id ``i``.
    """

    def __init__(self, chars):
        chars = sorted(set(chars))
        if not chars or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise ValueError("chars: expected a non-empty text or iterable of single characters")
        self.chars = "".join(chars)
        self._index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self):
        return len(self.chars)

    def __repr__(self):
        return f"CharVocab({len(self)} chars)"

    def encode(self, text):
        """int64 ids of shape (len(text),); unknown characters raise ValueError."""
        try:
            return np.fromiter((self._index[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError as exc:
            raise ValueError(f"text: character {exc.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids):
        """The text of a 1-D sequence of ids."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"ids: expected a 1-D integer array, got shape {ids.shape}, dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise ValueError(f"ids: expected values in [0, {len(self)}), got [{ids.min()}, {ids.max()}]")
        return "".join(self.chars[i] for i in ids)


def stream_windows(tokens, n_rows, window):
    """Lay a 1-D token stream out as ``n_rows`` parallel rows cut into windows.

    The stream (minus its last token, which is only a target) is trimmed to
    a multiple of ``n_rows`` and reshaped so that row b holds one contiguous
    stretch of it; the rows are then cut into consecutive windows of
    ``window`` steps (a last shorter window is dropped). Inputs are the
    tokens, targets the next tokens. Window w+1 of row b continues window w
    of row b, which is what ``RNN.fit(..., stateful=True)`` expects::

        for Xw, Yw in stream_windows(ids, 32, 50):
            model.fit(Xw, Yw, stateful=True, shuffle=False)

    Parameters
    ----------
    tokens : 1-D int array_like
    n_rows : int
        B, the number of parallel rows.
    window : int
        T, the steps per window.

    Returns
    -------
    list of (X, Y)
        Integer arrays of shape (n_rows, window) each: inputs (token ids,
        taken by :meth:`fastbptt.RNN.fit` as index input) and next-token ids.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        raise ValueError(f"tokens: expected a 1-D integer array, got shape {tokens.shape}, dtype {tokens.dtype}")
    n_rows, window = _check_int("n_rows", n_rows), _check_int("window", window)
    per_row = (tokens.size - 1) // n_rows
    n_win = per_row // window
    if n_win < 1:
        raise ValueError(f"tokens: {tokens.size} tokens are too few for {n_rows} rows of at least one "
                         f"window of {window} steps")
    used = n_win * window
    X = tokens[:n_rows * per_row].reshape(n_rows, per_row)[:, :used].astype(np.int64)
    Y = tokens[1:n_rows * per_row + 1].reshape(n_rows, per_row)[:, :used].astype(np.int64)
    return [(X[:, w * window:(w + 1) * window].copy(), Y[:, w * window:(w + 1) * window].copy())
            for w in range(n_win)]
