"""Thread control: fastbptt never lets BLAS pools oversubscribe the cores.

numpy and scipy each ship an OpenBLAS with its own pool of spinning threads.
The sequential part of BPTT is a chain of small products, and on a 2-core
machine a second BLAS thread there is at best useless and at worst (another
pool spinning, another process on the other core) 10-100x slower: measured
on a character model (T=25, B=32, H=64), one training step took 1-3 ms with
one BLAS thread and 110-160 ms with the default two while the machine was
busy. Threads pay only where the products are big enough to share
(B·H >= 2048 and T·B·H >= 65536, measured; see MIN_BATCH_X_HIDDEN_FOR_THREADS).

So every public call runs inside one limit on all BLAS pools (threadpoolctl),
chosen per shape, restored on exit; nested calls (the trainer calling the
core) reuse the outer limit. Override with ``fastbptt.set_num_threads(n)`` or
the environment variable ``FASTBPTT_NUM_THREADS`` (``0`` / unset: automatic).
"""

import os
from contextlib import contextmanager

ENV_VAR = "FASTBPTT_NUM_THREADS"
# Where a second thread starts to pay: measured per backend on a quiet 2-core
# machine (best of ~2 s of steps, float32, 1 vs 2 threads): T=1000, B=1, H=32
# 0.34 vs 0.33 ms (even); B=32, H=64 1.60 vs 1.47 ms; B=16, H=128 5.2 vs 4.3 ms;
# B=64, H=256 78 vs 49 ms; B=128, H=1024 1091 vs 576 ms.
MIN_BATCH_X_HIDDEN_FOR_THREADS = 2048
# ... and only for enough steps: T=5, B=32, H=128 (a truncated-BPTT update)
# 0.41 ms with one thread, 0.55 ms with two; T=100 there: 8.1 vs 6.1 ms.
MIN_WORK_FOR_THREADS = 65536          # T·B·H

_controller = None
_forced = None
_depth = 0


def _cpu_count():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def set_num_threads(n):
    """Fix the number of BLAS threads fastbptt uses (``None`` or 0: automatic, per shape).

    Parameters
    ----------
    n : int >= 0 or None
    """
    global _forced
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n: expected None or an int >= 0, got {n!r}")
    _forced = n or None


def get_num_threads(B=1, H=1, T=None):
    """The number of BLAS threads a call of ``T`` steps (None: many), batch ``B`` and hidden size ``H`` runs with."""
    if _forced:
        return _forced
    env = os.environ.get(ENV_VAR, "").strip()
    if env and env != "0":
        if not env.isdigit():
            raise ValueError(f"{ENV_VAR}: expected an int >= 0, got {env!r}")
        return int(env)
    big = B * H >= MIN_BATCH_X_HIDDEN_FOR_THREADS and (T is None or T * B * H >= MIN_WORK_FOR_THREADS)
    return _cpu_count() if big else 1


def _blas_libs():
    """threadpoolctl's controllers of the loaded BLAS libraries (found once)."""
    global _controller
    if _controller is None:
        import scipy.linalg  # noqa: F401  (load scipy's BLAS so that the controller sees it)
        from threadpoolctl import ThreadpoolController
        _controller = [lc for lc in ThreadpoolController().lib_controllers if lc.user_api == "blas"]
    return _controller


@contextmanager
def blas_threads(B=1, H=1, T=None):
    """Run the block with the BLAS pools limited as :func:`get_num_threads` says.

    Only the pools whose setting differs are changed, and they are restored
    on exit (a few ctypes calls, ~1-2 µs, where ``threadpool_limits`` takes
    ~20 µs: it matters at batch 1, where a whole step is ~0.3 ms).
    """
    global _depth
    if _depth:
        yield
        return
    n = get_num_threads(B, H, T)
    changed = []
    _depth += 1
    try:
        for lib in _blas_libs():
            old = lib.get_num_threads()
            if old != n:
                lib.set_num_threads(n)
                changed.append((lib, old))
        yield
    finally:
        for lib, old in changed:
            lib.set_num_threads(old)
        _depth -= 1
