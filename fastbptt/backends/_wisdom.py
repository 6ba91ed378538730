"""The dispatcher behind ``backend="auto"``: it measures instead of guessing, and remembers.

The first calls at a new *key* -- the operation, the shape (T, B, D, H,
layers, directions), the dtype, whether the batch has lengths, and the
thread budget (:func:`fastbptt.get_num_threads`) -- are the user's own calls
run on each *candidate* in turn: every compiled backend at a team of 1 and
of 2 threads (and of the whole budget, when it is more). Each candidate's
first call is a warm-up (Numba's JIT, the C team starting) and is not
counted; then the candidates are timed in rounds, interleaved, until each
has at least :data:`MIN_ROUNDS` calls and :data:`MIN_TRIAL_S` seconds of
them (at most :data:`MAX_ROUNDS`); once each has :data:`MIN_ROUNDS`, a
candidate whose fastest call is :data:`DROP_RATIO` times the leader's median
or more leaves the trial (at min-char-rnn's 40-100 µs calls the thirty
rounds of four candidates took ~360 calls, more than a short script makes,
so nothing was learned and every process tried again). A candidate whose
calls are short (below :data:`SETTLE_BELOW_S`) is visited for :data:`SETTLE_CALLS` untimed
calls and then a timed one: right after another candidate its team's
threads are asleep and its data out of cache, which at 0.2 ms made the
faster team of 2 look slower. The one with the smallest median wins and
every later call at that key takes it: a dict lookup, ~1 µs. (``rnn_vjp``
times its forward only: the backward runs later, in ``vjp``, on the same choice.)

What was learned is kept, like FFTW's wisdom, in ``wisdom.json`` of a
per-user cache directory (``$FASTBPTT_CACHE_DIR``, else
``$XDG_CACHE_HOME/fastbptt``, else ``~/.cache/fastbptt``), so that later
processes start with the winner. The file is written atomically
(:func:`fastbptt._io.atomic_write`), merged with what other processes wrote
meanwhile, and holds a fingerprint of the machine (CPU model, cores,
fastbptt, numpy, numba and BLAS versions): a file that does not parse, or
was written on another machine or by other versions, is ignored with a
warning (and replaced by the next write).

The shipped calibration table (:func:`fastbptt.backends._choose_auto`) is the
starting guess: it runs the warm-up call first. ``FASTBPTT_LEARN=0`` turns
learning off -- neither trials nor the cache: "auto" is the table's choice
on every thread of the budget, fixed, for reproducible runs.
``FASTBPTT_BACKEND`` still forces a backend. A call made inside another
fastbptt call (which keeps the outer team) takes what is learned, never a trial.
"""

import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np

from .. import _threads
from .._io import atomic_write
from . import BACKENDS, ENV_VAR, _choose_auto, _load, available_backends, resolve_backend

LEARN_VAR = "FASTBPTT_LEARN"
CACHE_VAR = "FASTBPTT_CACHE_DIR"
FILE_NAME = "wisdom.json"
FORMAT = "fastbptt-wisdom 1"
#: timed calls per candidate, at least and at most (at 3, one slow call among a candidate's three
#: could make the median: at `large` a trial took a backend that ran its step 1.32x slower)
MIN_ROUNDS = 5
MAX_ROUNDS = 30
#: a candidate is timed until its timed calls add up to this much (short calls are noisy; at 0.01,
#: 40 ms calls had 3 samples each, and one run's noise took a backend 1.13x slower than the best)
MIN_TRIAL_S = 0.2
#: below this, a candidate's visit is SETTLE_CALLS untimed calls, then a timed one (_Trial.next_call)
SETTLE_BELOW_S = 0.02
SETTLE_CALLS = 2
#: with MIN_ROUNDS timed calls each, a candidate whose fastest is this many times the median of the
#: fastest candidate's leaves the trial (clearly slower: "auto" must be within 10 % of the best)
DROP_RATIO = 1.3

_OFF = ("0", "false", "no", "off")


class Choice:
    """What one call runs: ``kernels`` (a backend module) on a team of ``threads`` (None: the budget).

    ``record(seconds)`` reports how long the call took; it matters only during a trial.
    """

    __slots__ = ("kernels", "threads")

    def __init__(self, kernels, threads):
        self.kernels = kernels
        self.threads = threads

    def record(self, seconds):
        pass

    @property
    def name(self):
        return self.kernels.NAME


class _TrialCall(Choice):
    """One call of a trial: its time goes to candidate ``index`` (not if it is a warm-up)."""

    __slots__ = ("_trial", "_index", "_warm")

    def __init__(self, kernels, threads, trial, index, warm):
        super().__init__(kernels, threads)
        self._trial, self._index, self._warm = trial, index, warm

    def record(self, seconds):
        if not self._warm:
            self._trial.add(self._index, seconds)


class _Trial:
    """The candidates of one key, called in turn, and their timings."""

    def __init__(self, key, candidates):
        self.key = key
        self.candidates = candidates            # [(backend name, threads)], the table's guess first
        self.samples = [[] for _ in candidates]
        self.alive = [True] * len(candidates)  # False: dropped as clearly slower (DROP_RATIO)
        self.warmed = [False] * len(candidates)
        self.calls = 0
        self._timed_next = None                 # the candidate whose visit's timed call comes next

    def next_call(self):
        if self._timed_next is not None:
            i, left = self._timed_next
            self._timed_next = (i, left - 1) if left > 1 else None
            name, threads = self.candidates[i]
            return _TrialCall(_load(name), threads, self, i, left > 1)
        i = self.calls % len(self.candidates)
        self.calls += 1
        while not self.alive[i]:               # (the leader never leaves: one is always alive)
            i = self.calls % len(self.candidates)
            self.calls += 1
        name, threads = self.candidates[i]
        warm = not self.warmed[i]
        self.warmed[i] = True
        if not warm and self.samples[i] and self.samples[i][-1] < SETTLE_BELOW_S:
            # short calls: this one and the next SETTLE_CALLS - 1 settle the candidate's team (the
            # threads another candidate left asleep wake up, its caches fill), then one is timed;
            # timed right after another candidate, a team of 2 at online (0.16 ms) measured 0.24 ms
            self._timed_next, warm = (i, SETTLE_CALLS), True
        return _TrialCall(_load(name), threads, self, i, warm)

    def add(self, index, seconds):
        self.samples[index].append(seconds)
        alive = [s for s, a in zip(self.samples, self.alive) if a]
        if all(len(s) >= MIN_ROUNDS for s in alive):
            lead = min(float(np.median(s)) for s in alive)
            for j, s in enumerate(self.samples):
                if self.alive[j] and min(s) >= DROP_RATIO * lead:
                    self.alive[j] = False
            alive = [s for s, a in zip(self.samples, self.alive) if a]
        if len(alive) == 1 and len(alive[0]) >= MIN_ROUNDS or all(
                len(s) >= MAX_ROUNDS or (len(s) >= MIN_ROUNDS and sum(s) >= MIN_TRIAL_S) for s in alive):
            _learned_from(self)


_choices = {}           # key tuple -> the learned Choice
_trials = {}            # key tuple -> its _Trial while it runs
_state = {"loaded": False, "path": None, "fingerprint": None, "entries": {}, "warned": set()}


def learning():
    """Whether "auto" learns (``FASTBPTT_LEARN`` is not 0/false/no/off)."""
    return os.environ.get(LEARN_VAR, "1").strip().lower() not in _OFF


def cache_path():
    """The wisdom file: ``$FASTBPTT_CACHE_DIR``, ``$XDG_CACHE_HOME/fastbptt`` or ``~/.cache/fastbptt``."""
    folder = os.environ.get(CACHE_VAR, "").strip()
    if not folder:
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
        folder = os.path.join(xdg, "fastbptt") if xdg else os.path.join(Path.home(), ".cache", "fastbptt")
    return Path(folder) / FILE_NAME


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint():
    """The machine and versions the timings belong to (a dict of str)."""
    if _state["fingerprint"] is None:
        from importlib.metadata import PackageNotFoundError, version
        from .. import __version__
        import scipy.linalg  # noqa: F401  (its BLAS is loaded by every call: list it either way)
        from threadpoolctl import threadpool_info
        blas = sorted(f"{d.get('internal_api')} {d.get('version')} {d.get('architecture') or ''}".strip()
                      for d in threadpool_info() if d.get("user_api") == "blas")
        try:
            numba_version = version("numba")
        except PackageNotFoundError:
            numba_version = None
        _state["fingerprint"] = {
            "cpu": _cpu_model(), "cores": str(os.cpu_count()), "fastbptt": __version__,
            "numpy": np.__version__, "numba": str(numba_version), "blas": "; ".join(blas),
            # the Cython kernels' SIMD level moves the small-batch timings (docs/kernels_simd.md)
            "simd": os.environ.get("FASTBPTT_SIMD", "").strip().lower() or "auto",
        }
    return _state["fingerprint"]


def _warn_once(path, what):
    if (str(path), what) not in _state["warned"]:
        _state["warned"].add((str(path), what))
        warnings.warn(f"fastbptt: the dispatcher's cache {path} {what}; it is ignored, and "
                      f"replaced when something is learned", RuntimeWarning, stacklevel=5)


def _valid_entry(entry):
    return (isinstance(entry, dict) and entry.get("backend") in BACKENDS
            and isinstance(entry.get("threads"), int) and not isinstance(entry["threads"], bool)
            and entry["threads"] >= 1)


def _read(path, warn=True):
    """The entries of the file at ``path`` if it is ours and whole, else {} (warning why)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        if warn:
            _warn_once(path, f"cannot be read ({exc})")
        return {}
    try:
        data = json.loads(text)
        ok = (isinstance(data, dict) and data.get("format") == FORMAT
              and isinstance(data.get("fingerprint"), dict) and isinstance(data.get("entries"), dict)
              and all(isinstance(k, str) and _valid_entry(v) for k, v in data["entries"].items()))
    except ValueError:
        ok = False
    if not ok:
        if warn:
            _warn_once(path, "is corrupt (not a wisdom file of this version)")
        return {}
    if data["fingerprint"] != fingerprint():
        if warn:
            theirs = {k: v for k, v in data["fingerprint"].items() if fingerprint().get(k) != v}
            _warn_once(path, f"was written on another machine or by other versions ({theirs})")
        return {}
    return data["entries"]


def _ensure_loaded():
    if not _state["loaded"]:
        path = cache_path()
        _state["entries"] = _read(path)
        _state["path"] = path
        _state["loaded"] = True


def _write(entries):
    """Merge ``entries`` into the file (what other processes wrote stays) and write it atomically.

    No lock (an interrupt could leave one held): two writers at once, in this process or
    another, each write a whole file, and the later one may miss the other's newest entry,
    which that writer still has in memory.
    """
    path = _state["path"]
    try:
        merged = _read(path, warn=False)
        merged.update(entries)
        data = {"format": FORMAT, "fingerprint": fingerprint(), "entries": merged}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(json.dumps(data, indent=1, sort_keys=True) + "\n"),
                     binary=False)
    except OSError as exc:
        _warn_once(path, f"cannot be written ({exc}); what is learned stays in this process")
        return
    _state["entries"] = {**merged, **_state["entries"]}


def _key_text(key):
    op, T, B, D, H, layers, dirs, dtype, lengths, budget = key
    return (f"{op} T={T} B={B} D={D} H={H} layers={layers} dirs={dirs} {np.dtype(dtype).name} "
            f"{'lengths' if lengths else 'full'} threads={budget}")


def _learned_from(trial):
    """Settle a finished trial: its fastest candidate (by median) becomes the key's choice."""
    if _trials.pop(trial.key, None) is None:
        return                                  # settled already (another thread)
    medians = [float(np.median(s)) for s in trial.samples]
    best = min((m, j) for j, m in enumerate(medians) if trial.alive[j])[1]
    name, threads = trial.candidates[best]
    _choices[trial.key] = Choice(_load(name), threads)
    entry = {"backend": name, "threads": threads,
             "median_s": {f"{n}/{t}": m for (n, t), m in zip(trial.candidates, medians)},
             "calls": [len(s) for s in trial.samples],
             "learned": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _state["entries"][_key_text(trial.key)] = entry        # (kept even if the file cannot be written)
    _write({_key_text(trial.key): entry})


def _thread_counts(budget):
    return sorted({1, min(2, budget), budget})


def _table_choice(key):
    op, T, B, D, H, layers, dirs, dtype, lengths, budget = key
    return Choice(resolve_backend("auto", T=T, B=B, H=H, dtype=dtype), None)


def _slow(key, trial_ok=True):
    """The choice at a key not settled yet: from the file, else the next call of its trial
    (``trial_ok`` False, or inside another call: the table's guess)."""
    _ensure_loaded()
    op, T, B, D, H, layers, dirs, dtype, lengths, budget = key
    entry = _state["entries"].get(_key_text(key))
    if entry is not None and entry["threads"] <= budget and _load(entry["backend"]) is not None:
        choice = _choices[key] = Choice(_load(entry["backend"]), entry["threads"])
        return choice
    if not trial_ok or _threads.inside_call():
        return _table_choice(key)
    trial = _trials.get(key)
    if trial is None:
        compiled = [n for n in available_backends() if n != "numpy"]
        guess = _choose_auto(T, B, H, dtype)
        if not compiled:
            return _table_choice(key)
        counts = _thread_counts(budget)
        candidates = [(guess, budget)] if guess in compiled else []
        candidates += [(n, t) for n in compiled for t in counts if (n, t) not in candidates]
        if len(candidates) == 1:
            choice = _choices[key] = Choice(_load(guess), budget)
            return choice
        trial = _trials.setdefault(key, _Trial(key, candidates))
    return trial.next_call()


def dispatch(backend, op, *, T, B, D, H, layers=1, dirs=1, dtype=None, lengths=False, trial=True):
    """The :class:`Choice` (backend module and team size) of one call.

    Parameters
    ----------
    backend : str
        A backend's name (then that backend on the whole thread budget), or ``"auto"``.
    op : str
        What the call computes (``"forward"``, ``"loss_and_grad"``, ``"rnn"``, ...): each
        operation learns its own choice.
    T, B, D, H, layers, dirs : int
        The shape of the call.
    dtype : numpy dtype
    lengths : bool
        Whether the batch has variable lengths.
    trial : bool
        False: what is learned at this key, else the table's guess, never a trial call (for
        callers that keep one choice for many calls: the trainer).

    Returns
    -------
    Choice
        Run the call as ``with call_scope(threads=choice.threads): ...`` on
        ``choice.kernels``, then ``choice.record(seconds)``.
    """
    return dispatch_at(backend, (op, T, B, D, H, layers, dirs, dtype, lengths), trial)


def _budget_key(where):
    """The dispatcher's key of a call (:func:`dispatch_at`'s ``where``) on this thread's budget."""
    return where + (_threads.get_num_threads(),)


def dispatch_at(backend, where, trial=True):
    """:func:`dispatch` with the call given as one tuple ``(op, T, B, D, H, layers, dirs, dtype,
    lengths)``, for a caller that makes the same call many times (:class:`fastbptt.Step`)."""
    if backend == "auto" and _threads.env_unset(ENV_VAR) and _threads.env_unset(LEARN_VAR) or (
            backend == "auto" and os.environ.get(ENV_VAR, "").strip() in ("", "auto") and learning()):
        key = _budget_key(where)
        choice = _choices.get(key)
        return choice if choice is not None else _slow(key, trial)
    # a name, FASTBPTT_BACKEND or the table (learning off): resolve_backend, which checks the
    # name and keeps the table's choice per shape itself (~1 µs)
    _, T, B, _, H, _, _, dtype, _ = where
    return Choice(resolve_backend(backend, T=T, B=B, H=H, dtype=dtype), None)



def learned():
    """``{key text: entry}``: what this process and the cache file know (learning on), for ``fastbptt info``."""
    if learning():
        _ensure_loaded()
    return dict(_state["entries"])


def entry(op, *, T, B, D, H, layers=1, dirs=1, dtype=None, lengths=False):
    """What was learned at the key of :func:`dispatch` with these arguments, on this thread's budget:
    its entry (``backend``, ``threads``, each candidate's ``median_s`` and timed ``calls``), or None."""
    return learned().get(_key_text(_budget_key((op, T, B, D, H, layers, dirs, dtype, lengths))))


def describe():
    """The dispatcher's state as a dict: learning, cache path, fingerprint, learned choices."""
    return {"learning": learning(), "learn_variable": LEARN_VAR, "cache": str(cache_path()),
            "fingerprint": fingerprint(), "learned": learned() if learning() else {},
            "trials_running": len(_trials)}


def trials_running():
    """How many keys are being tried now (0: every key met so far is settled)."""
    return len(_trials)


def forget():
    """Forget everything learned in this process (the file stays) and read the file again on next use."""
    _choices.clear()
    _trials.clear()
    _state.update(loaded=False, path=None, entries={})
    _state["warned"].clear()
