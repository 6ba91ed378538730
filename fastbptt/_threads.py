"""Threads: fastbptt runs its own team of threads, and BLAS on one thread inside it.

numpy and scipy each ship an OpenBLAS with its own pool of threads, and an
OpenBLAS thread keeps spinning on its core for a while after each call. The
sequential part of BPTT is a chain of small products that OpenBLAS runs on
the calling thread, so with a 2-thread BLAS the spinning threads take the
second core from anything else, and they made the single-threaded parts of
a step up to 4x slower on this 2-core machine (a training step at T=25,
B=32, H=64 took 110-160 ms instead of 1-3 ms while the machine was busy).

So inside every public call all BLAS pools are pinned to one thread
(threadpoolctl), and the parallelism is fastbptt's own (:func:`run`): the
two recurrence kernels split the batch between the threads of the team
(each sequence is independent), and the big GEMMs split their rows, each
thread calling single-threaded BLAS on its part. A part runs on a thread of
its own only when it is big enough to pay for the hand-off (``MIN_SPLIT_FLOPS``;
the Cython backend hands parts to its C thread team, much cheaper:
``MIN_SPLIT_FLOPS_C_TEAM``).
The team has one thread per core; ``fastbptt.set_num_threads(n)`` or the
environment variable ``FASTBPTT_NUM_THREADS`` (``0`` / unset: one per core)
sets its size, and 1 turns the splitting off. More threads than the CPUs
this process may use are capped at that number, with a warning.

Interrupts. Python raises a ``KeyboardInterrupt`` between any two bytecodes,
and a trace hook may raise anything at any line -- even just before a
``with`` block's ``__exit__``, which then never runs. So nothing here holds a
lock across code that can be cut short without a second chance to release
it: the one lock (``_lock``) is taken only inside :func:`_locked`, whose
handler releases it whatever was interrupted. Every step of leaving a
:func:`call_scope` can be repeated, and entering and leaving are compiled
(``Scope`` in the Cython extension: the steps of :class:`_Scope` below, with no
Python bytecode of their own): it does them again when an exception cuts them
short, and leaves when it is freed if the ``with`` statement's exit was
skipped. A call interrupted at any line leaves the BLAS pools as they were
before it, this thread outside any call and the lock free.
"""

import os
import sys
import threading
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext

ENV_VAR = "FASTBPTT_NUM_THREADS"

# A phase of a call (one GEMM, one recurrence kernel) is split between threads only from this
# many floating-point operations. Handing a part to a pool of Python threads and waiting for it
# costs ~20-100 µs here, and ~2^24 flops take ~0.2 ms on one core. Measured on the recurrence
# kernels (float32, tanh, one core vs two, best of 50): T=100, B=32, H=64 (2.6e7 flops):
# 0.36 vs 0.29 ms; T=2000, B=16, H=128: 13.2 vs 7.7 ms.
MIN_SPLIT_FLOPS = 1 << 24
# The Cython backend splits on its C thread team, which spins between jobs: a hand-off
# costs ~1-5 µs, and 2^20 flops (~10 µs) pay. A whole step at T=100, B=32, D=16, H=64 (median of
# 300): threshold 2^24: 1.40 ms, 2^22: 1.32, 2^20: 1.04, 2^18: 1.12; one thread: 1.70 ms.
MIN_SPLIT_FLOPS_C_TEAM = 1 << 20

_forced = None
_scope = threading.local()          # .threads: the team size of the call running on this thread;
                                    # .owner: a weak reference to that call's top-level call_scope
_lock = threading.RLock()           # guards _holders, _saved and _pool; taken only in _locked()
_holders = {}                       # thread ident -> token of its top-level scope (threads inside a call)
_saved = {}                         # BLAS library index -> its thread count before fastbptt pinned it
                                    # (None: it was 1 already, nothing to restore)
_controller = None
_pool = None
_warned = set()


_raw_environ = getattr(os.environ, "_data", None)       # POSIX: bytes -> bytes, the variables as set
if os.name != "posix" or not isinstance(_raw_environ, dict):
    _raw_environ = None


def env_unset(name, _keys={}):
    """Whether the environment variable ``name`` is unset, in ~0.05 µs (``os.environ.get`` takes
    ~0.3-0.6: it encodes the name and decodes the value; a planned call's whole overhead is a few µs)."""
    if _raw_environ is None:
        return name not in os.environ
    key = _keys.get(name)
    if key is None:
        key = _keys[name] = os.fsencode(name)
    return key not in _raw_environ


def _cpu_count():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _cap(n, source):
    """``n`` threads, at most the usable CPUs (warning once per source and value when capped)."""
    cpus = _cpu_count()
    if n <= cpus:
        return n
    if (source, n) not in _warned:
        _warned.add((source, n))
        warnings.warn(f"{source}: {n} threads is more than the {cpus} CPUs this process may use; fastbptt "
                      f"uses {cpus} (threads beyond the cores only wait for each other and spin)",
                      RuntimeWarning, stacklevel=3)
    return cpus


def set_num_threads(n):
    """Fix the number of threads fastbptt uses per call (``None`` or 0: one per core).

    Parameters
    ----------
    n : int >= 0 or None
        More than the CPUs this process may use (``os.sched_getaffinity``)
        is capped at that number, with a ``RuntimeWarning``.
    """
    global _forced
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise TypeError(f"n: expected None or an int >= 0, got {n!r}")
    if n is not None and n < 0:
        raise ValueError(f"n: expected None or an int >= 0, got {n!r}")
    _forced = _cap(n, "set_num_threads") if n else None


def get_num_threads():
    """The number of threads a call may use: :func:`set_num_threads`, else ``FASTBPTT_NUM_THREADS``, else the cores."""
    if _forced:
        return _forced
    env = "" if env_unset(ENV_VAR) else os.environ.get(ENV_VAR, "").strip()
    if env and env != "0":
        if not env.isdigit():
            raise ValueError(f"{ENV_VAR}: expected an int >= 0, got {env!r}")
        return _cap(int(env), ENV_VAR)
    return _cpu_count()


def _blas_libs():
    """``(get, set)`` thread-count functions of each loaded BLAS library (found once).

    For OpenBLAS (numpy's and scipy's), the library's own
    ``openblas_get/set_num_threads`` through ctypes: ~0.3 µs a call, where
    threadpoolctl's wrappers take ~2-3 µs (they look the symbol up each time),
    and a call makes four of them. Other BLAS go through threadpoolctl.
    """
    global _controller
    if _controller is None:
        import scipy.linalg  # noqa: F401  (load scipy's BLAS so that the controller sees it)
        from threadpoolctl import ThreadpoolController
        found = []
        for lc in ThreadpoolController().lib_controllers:
            if lc.user_api != "blas":
                continue
            get = set_ = None
            if lc.internal_api == "openblas" and getattr(lc, "threading_layer", "") != "openmp":
                try:
                    get = lc._get_symbol("openblas_get_num_threads")
                    set_ = lc._get_symbol("openblas_set_num_threads")
                except Exception:   # another threadpoolctl: its public methods below
                    get = set_ = None
            if get is None or set_ is None or get() != lc.get_num_threads():
                get, set_ = lc.get_num_threads, lc.set_num_threads
            found.append((get, set_))
        _controller = found
    return _controller


def _locked(fn, *args):
    """``fn(*args)`` holding ``_lock``, which no exception -- an interrupt at any point -- leaves held.

    There is no ``finally`` whose first line an interrupt could skip: the
    release is the last statement of the ``try``, and the handler releases
    the lock if this thread still holds it (an exception inside ``acquire``
    itself leaves it free).
    """
    try:
        _lock.acquire()
        result = fn(*args)
        _lock.release()
        return result
    except BaseException:
        if _lock._is_owned():
            _lock._release_save()
        raise


def _set_holder(ident, token, inside, libs):
    """Under the lock: register (``inside``) or unregister thread ``ident``'s scope ``token``,
    then pin every BLAS pool (``libs``: :func:`_blas_libs`) to one thread while some thread is
    inside a call, or restore them all when none is.

    Every step can be repeated: a library's old count is recorded before it is set to 1,
    and forgotten only after it is restored, so an interrupted pass is finished by the next.
    """
    if inside:
        _holders[ident] = token
    elif _holders.get(ident) is token:
        del _holders[ident]
    if _holders:
        for i, (get, set_) in enumerate(libs):
            if i not in _saved:
                old = get()
                _saved[i] = old if old != 1 else None
                if old != 1:
                    set_(1)
    else:
        for i in list(_saved):
            old = _saved[i]
            if old is not None:
                libs[i][1](old)
            del _saved[i]


class _Scope:
    """One top-level call's hold on the pin, without the compiled extension (with it:
    ``backends/cython/pool.pyx``'s ``Scope``, the same steps). ``enter`` and ``leave`` are run by
    :func:`_python_shell`; every step of ``leave`` can be repeated, so the shell can call it again
    when an interrupt cuts it short, and it undoes any prefix of ``enter``."""

    __slots__ = ("_threads", "_token", "_ident", "__weakref__")

    def __init__(self, threads):
        self._threads = threads
        self._token = None          # set while this scope holds the pin

    def enter(self):
        self._ident = threading.get_ident()
        self._token = token = object()
        _scope.owner = weakref.ref(self)
        _scope.threads = self._threads
        _locked(_set_holder, self._ident, token, True, _blas_libs())     # (found once, outside the lock)

    def leave(self):
        token = self._token
        if token is None:
            return
        if threading.get_ident() == self._ident:
            owner = _scope.__dict__.get("owner")
            if owner is not None and owner() is self:
                _scope.threads = 0
                _scope.owner = None
        _locked(_set_holder, self._ident, token, False, _blas_libs())
        self._token = None          # last: until here, a repeat does whatever is left


@contextmanager
def _python_shell(enter, leave):
    """The shell without the compiled extension: every line of it is inside the ``try`` (so an
    interrupt anywhere here is undone), but ``contextlib``'s own ``__enter__``/``__exit__`` are Python
    code, and a real signal at their first bytecodes can still skip ``leave`` until the scope is freed."""
    try:
        enter()
        yield
        leave()
    except BaseException:
        leave()
        raise


_new_scope = None
_NESTED = nullcontext()


def _python_scope(threads):
    scope = _Scope(threads)
    return _python_shell(scope.enter, scope.leave)


def _find_scope():
    """The compiled scope (``Scope`` of the Cython extension: no Python bytecode of its own, so nothing
    can fall between the ``with`` statement and its steps), else :func:`_python_scope`."""
    global _new_scope
    try:
        from .backends.cython import pool
        pool.bind_scope_state(sys.modules[__name__])
        make = pool.Scope
    except Exception:       # not built: see fastbptt.backends.unavailable_backends()
        make = _python_scope
    _new_scope = make
    return make


def call_scope(threads=None):
    """Run one public call: BLAS pinned to one thread, the team size fixed for the call.

    ``with call_scope(): ...``. ``threads``: the team size of this call (an
    int >= 1, as the dispatcher chooses it per shape), or None for
    :func:`get_num_threads`; a nested scope keeps the outer one's. The first scope entered (on any thread) pins
    the pools whose setting is not 1 and the last one left restores them
    (OpenBLAS's own get/set functions: a compiled scope enters and leaves in
    ~2 µs, where ``threadpool_limits`` takes ~20 µs, which matters at batch 1
    where a whole step is ~0.1 ms). A nested scope (the trainer calling the
    core) reuses the outer one.

    Interrupts (see the module docstring): entering and leaving are compiled;
    their steps are done again when an exception cuts them short, and the
    scope leaves when the ``with`` statement's own exit is skipped, so after
    an interrupt at any line the pools are restored, this thread is outside
    any call and the lock is free.
    """
    owner = _scope.__dict__.get("owner")
    if owner is not None and owner() is not None:       # inside a live scope of this thread
        return _NESTED
    if threads is None:
        threads = get_num_threads()                     # may raise (a bad environment variable)
    elif isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected None or an int >= 1, got {threads!r}")
    return (_new_scope or _find_scope())(threads)


def inside_call():
    """Whether this thread is inside a :func:`call_scope` (a nested call keeps the outer team)."""
    owner = _scope.__dict__.get("owner")
    return owner is not None and owner() is not None


def team_size(flops=None, c_team=False):
    """Threads for one phase of ``flops`` operations in the current call (1 outside a call).

    ``c_team``: the phase would be split on the Cython extension's C team (a cheaper hand-off).
    """
    n = getattr(_scope, "threads", 0) or 1
    if flops is not None and flops < (MIN_SPLIT_FLOPS_C_TEAM if c_team else MIN_SPLIT_FLOPS):
        return 1
    return n


def parts(n, k):
    """``k`` near-equal ``(start, stop)`` ranges covering ``range(n)`` (fewer if ``n < k``)."""
    k = max(1, min(k, n))
    q, r = divmod(n, k)
    bounds = [i * q + min(i, r) for i in range(k + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def row_parts(batch_sizes, b0, b1, k):
    """``k`` ranges of the rows [b0, b1) of a variable-length batch with near-equal work.

    Row b runs ``len_b = #{t: batch_sizes[t] > b}`` steps; rows sorted longest first, so
    equal row counts would leave the first part with most of the work.
    """
    import numpy as np      # (this module is imported by everything, and needs NumPy only here)

    work = np.cumsum((np.asarray(batch_sizes)[:, None] > np.arange(b0, b1)[None, :]).sum(axis=0))
    k = max(1, min(k, b1 - b0))
    cuts = np.searchsorted(work, work[-1] * np.arange(1, k) / k, side="left") + 1
    bounds = sorted({b0, b1, *(b0 + int(c) for c in cuts if 0 < c < b1 - b0)})
    return list(zip(bounds[:-1], bounds[1:]))


def _reset_after_fork():
    # the child has one thread: no other thread is inside a call, and the lock may have been
    # held by one that is gone; the saved BLAS counts stay, so the child's next call restores them
    global _pool, _lock
    _pool, _lock = None, threading.RLock()
    _holders.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _get_pool(workers):
    global _pool
    if _pool is None or _pool._max_workers < workers:
        _pool = ThreadPoolExecutor(workers, thread_name_prefix="fastbptt")
    return _pool


def _run_into(future, task):
    if future.set_running_or_notify_cancel():          # False: cancelled before it started
        try:
            future.set_result(task())
        except BaseException as exc:
            future.set_exception(exc)


def run(tasks):
    """Run callables at the same time: ``tasks[0]`` on this thread, the others on the pool.

    Returns their results in order. Every task has finished (or was never
    started) when this returns or raises (the first exception, in task
    order, is raised): the tasks write into the caller's arrays, so an
    interrupt here cancels the parts not started and waits for the others.
    """
    if len(tasks) == 1:
        return [tasks[0]()]
    pool = _locked(_get_pool, len(tasks) - 1)
    futures = [Future() for _ in tasks[1:]]             # ours, made before anything is submitted
    try:
        for future, task in zip(futures, tasks[1:]):
            pool.submit(_run_into, future, task)
        first = tasks[0]()
        wait(futures)
    except BaseException:
        for future in futures:          # not started: never will; running: wait for it
            if not future.cancel():
                future.exception()
        raise
    return [first] + [f.result() for f in futures]
