"""Shared set-up of the benchmark suite: threads, problems and the float64 oracle.

Threads: 2 for everything (the machines have 2 cores): fastbptt's own team
(``fastbptt.set_num_threads``; BLAS on one thread inside its calls). BLAS pools are capped
with threadpoolctl, Numba with ``numba.set_num_threads`` and torch with
``torch.set_num_threads`` for the whole session. XLA's CPU pool cannot be
resized once jax is imported; it uses all cores, which is 2 on these machines.
To force one thread for jax, export
``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``
before running (``fastbptt bench`` times jax at both settings by itself, the
other one in a worker process). torch can change its pool between tests: the
step suite also runs it on one thread (``torch@1``).
``FASTBPTT_BENCH_THREADS`` changes the count for the rest.

``FASTBPTT_BENCH_QUICK=1``: T of every shape divided by 5 (at least 20; as
``fastbptt bench --quick``) and the small truncation study: what CI runs.
"""

import os

import pytest

from fastbptt.tools import bench
from fastbptt.tools.peers import jax_threads

THREADS = int(os.environ.get("FASTBPTT_BENCH_THREADS", "2"))
QUICK = bool(os.environ.get("FASTBPTT_BENCH_QUICK"))


@pytest.fixture(scope="session", autouse=True)
def _threads():
    bench.set_threads(THREADS)
    with bench._ThreadLimits(THREADS):
        yield


_REFS = {}


def reference(shape, dtype):
    """(params, X, Y, ref_loss, ref_grads) for a shape and dtype, computed once per session."""
    key = (shape, str(dtype))
    if key not in _REFS:
        params, X, Y = bench.make_problem(shape, dtype)
        ref_loss, ref = bench.reference_grads(params, X, Y)
        _REFS[key] = (params, X, Y, ref_loss, ref)
    return _REFS[key]


def skip_unless_runs(impl, dtype=None):
    """Skip (with the reason) an implementation that does not run here."""
    reason = bench.impl_unavailable_reason(impl)
    if reason is not None:
        pytest.skip(f"{impl} is not available: {reason}")
    if impl == "jax" and dtype is not None and str(dtype) == "float64":
        import jax
        if not jax.config.jax_enable_x64:
            pytest.skip("jax float64 needs JAX_ENABLE_X64=1 in the environment")


def record_rate(benchmark, flops=None, steps=None):
    """Put GFLOP/s and/or time steps/s from the benchmark's median into extra_info."""
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None) if stats else None
    if not median:
        return
    if flops is not None:
        benchmark.extra_info["gflops"] = flops / median / 1e9
    if steps is not None:
        benchmark.extra_info["time_steps_per_s"] = steps / median


def shape_of_name(name):
    """The :class:`~fastbptt.tools.bench.Shape` a named cell runs (T shortened in quick mode)."""
    shape = bench.SHAPES[name]
    return bench.quick_shape(shape) if QUICK else shape


def threads_of_impl(impl):
    """The threads an implementation runs on here: ``torch@1`` on 1, jax on its XLA pool's, the rest on THREADS."""
    if "@" in impl:
        return int(impl.split("@")[1])
    return jax_threads() if impl == "jax" else THREADS


@pytest.fixture
def shape_of():
    """The :func:`shape_of_name` function."""
    return shape_of_name


@pytest.fixture
def threads_of():
    """The :func:`threads_of_impl` function."""
    return threads_of_impl


@pytest.fixture
def oracle():
    """The :func:`reference` function (problems and float64 gradients, cached)."""
    return reference


@pytest.fixture
def require():
    """The :func:`skip_unless_runs` function."""
    return skip_unless_runs


@pytest.fixture
def rate():
    """The :func:`record_rate` function."""
    return record_rate
