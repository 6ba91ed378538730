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
sets its size, and 1 turns the splitting off.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager

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
_scope = threading.local()          # .threads: the team size of the call running on this thread
_pin_lock = threading.Lock()
_pinned = 0                         # calls (on any thread) inside a scope
_restore = []                       # (BLAS set_num_threads, its count before the first scope)
_controller = None
_pool = None


def _cpu_count():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def set_num_threads(n):
    """Fix the number of threads fastbptt uses per call (``None`` or 0: one per core).

    Parameters
    ----------
    n : int >= 0 or None
    """
    global _forced
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n: expected None or an int >= 0, got {n!r}")
    _forced = n or None


def get_num_threads():
    """The number of threads a call may use: :func:`set_num_threads`, else ``FASTBPTT_NUM_THREADS``, else the cores."""
    if _forced:
        return _forced
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env != "0":
        if not env.isdigit():
            raise ValueError(f"{ENV_VAR}: expected an int >= 0, got {env!r}")
        return int(env)
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


@contextmanager
def call_scope():
    """Run one public call: BLAS pinned to one thread, the team size fixed for the call.

    The first scope entered (on any thread) pins the pools whose setting is
    not 1 and the last one left restores them (a few ctypes calls, ~1-2 µs;
    ``threadpool_limits`` takes ~20 µs, which matters at batch 1 where a
    whole step is ~0.3 ms). A nested scope (the trainer calling the core)
    reuses the outer one.
    """
    global _pinned
    if getattr(_scope, "threads", 0):
        yield
        return
    n = get_num_threads()
    with _pin_lock:
        if _pinned == 0:
            for get, set_ in _blas_libs():
                old = get()
                if old != 1:
                    set_(1)
                    _restore.append((set_, old))
        _pinned += 1
    _scope.threads = n
    try:
        yield
    finally:
        _scope.threads = 0
        with _pin_lock:
            _pinned -= 1
            if _pinned == 0:
                for set_, old in _restore:
                    set_(old)
                _restore.clear()


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
    global _pool, _pin_lock, _pinned
    _pool, _pin_lock, _pinned = None, threading.Lock(), 0
    _restore.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def run(tasks):
    """Run callables at the same time: ``tasks[0]`` on this thread, the others on the pool.

    Returns their results in order. Every task has finished when this returns
    or raises (the first exception, in task order, is raised).
    """
    global _pool
    if len(tasks) == 1:
        return [tasks[0]()]
    with _pin_lock:
        if _pool is None or _pool._max_workers < len(tasks) - 1:
            _pool = ThreadPoolExecutor(len(tasks) - 1, thread_name_prefix="fastbptt")
        pool = _pool
    futures = [pool.submit(task) for task in tasks[1:]]
    try:
        first = tasks[0]()
    finally:
        wait(futures)
    return [first] + [f.result() for f in futures]
