"""fastbptt's C thread team (_cython_pool): every part runs once, part 0 on the caller."""

import subprocess
import sys
import tempfile
import threading

import pytest

from fastbptt.backends.cython import pool


@pytest.mark.parametrize("steal", [False, True], ids=["wait", "steal"])
@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_every_part_runs_once_part_zero_on_the_caller(parts, steal):
    old = pool.set_steal(steal)
    try:
        threads, seen, caller = pool._run_probe(parts)
    finally:
        pool.set_steal(old)
    assert all(t != 0 for t in threads)              # every part ran
    assert threads[0] == caller
    if not steal:
        assert len(set(threads)) == parts            # each on a thread of its own
    else:                                            # or on the caller, when no worker had started it
        assert len(set(threads) - {caller}) == len([t for t in threads if t != caller])
    assert seen == [parts] * parts                   # and all agree on the split
    assert pool.workers() >= parts - 1


def test_the_caller_runs_the_parts_of_sleeping_workers():
    """A worker asleep (or descheduled) when the caller is done with part 0 is not waited for."""
    old_spin, old_steal = pool.set_spin_us(0), pool.set_steal(True)    # workers sleep after every job
    try:
        stolen = 0
        for _ in range(2000):       # (on a loaded machine the woken workers can win many times in a row)
            threads, _, caller = pool._run_probe(3)
            assert all(t != 0 for t in threads)
            stolen += sum(t == caller for t in threads[1:])
            if stolen:
                break
        assert stolen > 0
        pool.set_steal(False)
        for _ in range(50):
            threads, _, caller = pool._run_probe(3)
            assert caller not in threads[1:]
    finally:
        pool.set_spin_us(old_spin)
        pool.set_steal(old_steal)


def test_many_jobs_back_to_back_and_after_the_workers_slept():
    for _ in range(2000):
        threads, _, _ = pool._run_probe(2)
        assert all(t != 0 for t in threads)
    old = pool.set_spin_us(0)                        # workers go to sleep at once
    try:
        for _ in range(200):
            threads, _, _ = pool._run_probe(3)
            assert all(t != 0 for t in threads)
    finally:
        pool.set_spin_us(old)


def test_jobs_from_several_python_threads_queue():
    errors = []

    def work():
        for _ in range(300):
            threads, seen, _ = pool._run_probe(2)
            if not all(t != 0 for t in threads) or seen != [2, 2]:
                errors.append((threads, seen))

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="parts: expected an int >= 1, got 0"):
        pool._run_probe(0)
    with pytest.raises(ValueError, match="us: expected a number >= 0, got -1"):
        pool.set_spin_us(-1)


def _python(code):
    """Run ``code`` in a fresh interpreter (outside the source tree: the installed package); its output."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=tempfile.gettempdir())
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(sys.platform != "linux", reason="fork")
def test_a_forked_child_starts_its_own_workers():
    # in a fresh interpreter: this one may hold jax's threads, which fork does not suit
    code = ("import os, sys\n"
            "from fastbptt.backends.cython import pool\n"
            "pool._run_probe(3)\n"                                   # the parent has workers
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    threads, _, _ = pool._run_probe(3)\n"
            "    os._exit(0 if all(t != 0 for t in threads) else 3)\n"
            "_, status = os.waitpid(pid, 0)\n"
            "print(os.waitstatus_to_exitcode(status))\n")
    assert _python(code) == "0"


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_fastbptt_loads_no_openmp_runtime():
    """A process holds one libgomp and torch brings its own (see the module docstring)."""
    code = ("import numpy as np, fastbptt\n"
            "p = fastbptt.RNNParams.init(3, 40, 2, seed=0)\n"
            "X = np.ones((30, 8, 3), np.float32); Y = np.ones((30, 8, 2), np.float32)\n"
            "assert fastbptt.available_backends() == ['cython', 'numba', 'numpy']\n"
            "for b in fastbptt.available_backends(): fastbptt.loss_and_grad(p, X, Y, backend=b)\n"
            "print('libgomp' in open('/proc/self/maps').read())\n")
    assert _python(code) == "False"
