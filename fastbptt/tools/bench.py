"""The backend comparison behind ``fastbptt bench`` and the ``benchmarks/`` suite.

One *training step* is what :func:`fastbptt.loss_and_grad` computes: the
forward pass and the full-BPTT gradient of all parameters (mse loss on
every step, ``O = 8`` outputs), of one layer or of a stack of layers, one or
two directions (:class:`Shape`). Each implementation -- every fastbptt
backend that loads here and, when installed, the PyTorch and JAX peers
(:mod:`fastbptt.tools.peers`) -- runs the same step on the same data:

- the step is built and called once before timing (``compile_s`` is that
  build + first call: Numba's JIT or its disk cache, JAX's ahead-of-time
  compile; it is reported on its own and never mixed into the timings);
- then ``repeats`` samples are taken, each the mean of enough back-to-back
  calls to last ``min_sample_s``; the result reports the best and the median
  sample (machines are noisy: compare within one run);
- correctness: the gradients of each implementation are compared with the
  NumPy reference in float64 on the same data, field by field in the
  canonical order of ``names()`` / ``arrays()`` (``rel_err_by_field``;
  ``max_rel_err`` = the largest ``max|g - g_ref| / max|g_ref|`` over them).

Threads: ``threads`` (default 2) is fastbptt's team and caps the BLAS pools
(threadpoolctl) and Numba's pool. The peers run at each count of
``peer_threads`` (default 1 and ``threads``) and a peer's cell is its best
one (a peer is often faster on one thread at small shapes: a ratio against
its slower setting would flatter us); every count's figures stay in the
cell's ``by_threads``. torch changes its intra-op pool between steps; XLA's
pool is fixed when jax creates its CPU client, so jax at the count this
process does not have runs in a worker process of its own (same data, same
timing code; see :func:`fastbptt.tools.peers.set_threads`).

Stacked models: a stacked cell's cost per (layer, direction) is read against
single-layer cells of each layer's own shape in the same run
(:func:`stack_ratios`; ``stacked`` with ``stacked_l0`` and ``stacked_l1``).
"""

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np

from .. import __version__
from .. import _threads
from ..backends import available_backends, dispatch, unavailable_backends
from ..backends._wisdom import CACHE_VAR, entry as learned_entry, forget as forget_dispatch, trials_running
from .._io import atomic_write
from ..functional import loss_and_grad
from ..params import RNNParams
from ..step import Step
from .peers import (PEERS, jax_threads, make_peer_step, peer_unavailable_reason, peer_version,
                    set_threads, torch_threads, xla_flags)

OUTPUT_SIZE = 8


class Shape(NamedTuple):
    """A benchmark cell's model and data: ``T, B, D, H`` and the stack (one unidirectional layer by default)."""

    T: int
    B: int
    D: int
    H: int
    num_layers: int = 1
    bidirectional: bool = False

    @property
    def dirs(self):
        return 2 if self.bidirectional else 1

    @property
    def layer_inputs(self):
        """Each layer's input size: D for layer 0, dirs·H above."""
        return tuple(self.D if l == 0 else self.dirs * self.H for l in range(self.num_layers))

    @property
    def stacked(self):
        """Whether this is more than one unidirectional layer."""
        return self.num_layers * self.dirs > 1


#: name -> :class:`Shape`; O is :data:`OUTPUT_SIZE`. ``stacked`` is 2 bidirectional layers;
#: ``stacked_l0`` and ``stacked_l1`` are one unidirectional layer of the shape of its layer 0
#: (input D = 64) and of its layer 1 (input 2H = 256, the two directions of layer 0), so that
#: its cost per (layer, direction) can be read from one run (:func:`stack_ratios`).
SHAPES = {
    "online": Shape(1000, 1, 8, 32),
    "chunk": Shape(25, 1, 64, 100),         # min-char-rnn's and online TBPTT's short chunks
    "small": Shape(100, 32, 16, 64),
    "medium": Shape(200, 64, 64, 256),
    "longseq": Shape(2000, 16, 32, 128),
    "large": Shape(100, 128, 256, 1024),
    "wide": Shape(300, 20, 800, 800),
    "stacked_l0": Shape(200, 64, 64, 128),
    "stacked_l1": Shape(200, 64, 256, 128),
    "stacked": Shape(200, 64, 64, 128, num_layers=2, bidirectional=True),
}

#: --quick divides T by this (never below QUICK_MIN_T) and takes fewer samples
QUICK_T_DIVISOR = 5
QUICK_MIN_T = 20

#: ``auto``: fastbptt's dispatcher, which learns in the run (a cache of its own: :func:`measure`)
AUTO = "auto"
FASTBPTT_IMPLS = ("cython", "numba", AUTO, "numpy")
ALL_IMPLS = FASTBPTT_IMPLS + PEERS
#: calls of ``auto`` before it is timed, at most, while the dispatcher tries its candidates
AUTO_MAX_LEARNING_CALLS = 600

#: rounds of ``auto`` against the best named backend in turns (:func:`auto_against_best`)
AUTO_TURN_ROUNDS = 15


# ----------------------------------------------------------------- shapes
def format_shape(shape):
    """``"T,B,D,H"``, with ``",L"`` for a stack and ``",L,bi"`` for two directions (as :func:`parse_shape` reads it)."""
    shape = Shape(*shape)
    text = ",".join(map(str, shape[:4]))
    if shape.num_layers > 1 or shape.bidirectional:
        text += f",{shape.num_layers}"
    return text + (",bi" if shape.bidirectional else "")


def parse_shape(token):
    """A shape name of :data:`SHAPES` or a custom ``"T,B,D,H[,L[,bi]]"``; returns ``(name, Shape)``.

    ``L`` is the number of layers (default 1); ``bi`` makes them bidirectional
    (``uni``, the default, does not).

    Raises
    ------
    ValueError
        For an unknown name or a malformed / non-positive custom shape.
    """
    if not isinstance(token, str):
        raise TypeError(f"shape: expected a str, got {type(token).__name__}")
    if token in SHAPES:
        return token, SHAPES[token]
    parts = token.split(",")
    bidirectional = False
    if len(parts) == 6 and parts[5].strip() in ("bi", "uni"):
        bidirectional = parts.pop().strip() == "bi"
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) not in (4, 5) or min(dims) < 1:
        raise ValueError(f"shape: expected one of {', '.join(SHAPES)} or 'T,B,D,H' with four positive "
                         f"ints, optionally followed by ',L' (layers) and ',bi' (bidirectional), "
                         f"got {token!r}")
    shape = Shape(*dims, bidirectional=bidirectional) if len(dims) == 5 else Shape(*dims)
    name = f"T{shape.T}_B{shape.B}_D{shape.D}_H{shape.H}"
    if shape.num_layers > 1:
        name += f"_L{shape.num_layers}"
    return name + ("_bi" if bidirectional else ""), shape


def quick_shape(shape):
    """The --quick version of a shape: T divided by :data:`QUICK_T_DIVISOR` (at least :data:`QUICK_MIN_T`)."""
    shape = Shape(*shape)
    return shape._replace(T=min(shape.T, max(QUICK_MIN_T, shape.T // QUICK_T_DIVISOR)))


def step_flops(T, B, D, H, O=OUTPUT_SIZE, *, num_layers=1, bidirectional=False):
    """Multiply-adds x 2 of one training step; one layer: 2·T·B·H·(2D + 3H + 3O).

    Per (layer, direction) with input size D_in (D for layer 0, dirs·H above):
    forward, the input projection (D_in) and the recurrence (H); backward,
    the δ chain (H), dW_xh (D_in), dW_hh (H), and for layers above the first
    the gradient sent down to the layer below (D_in). The head on dirs·H
    features: the logits, ∂L/∂h from the output and dW_hy (O each).
    Element-wise work is not counted.
    """
    dirs = 2 if bidirectional else 1
    per_row = 3 * dirs * H * O
    for l in range(num_layers):
        d_in = D if l == 0 else dirs * H
        per_row += dirs * H * ((2 if l == 0 else 3) * d_in + 3 * H)
    return 2.0 * T * B * per_row


def shape_flops(shape, O=OUTPUT_SIZE):
    """:func:`step_flops` of a :class:`Shape`."""
    shape = Shape(*shape)
    return step_flops(*shape[:4], O, num_layers=shape.num_layers, bidirectional=shape.bidirectional)


def make_problem(shape, dtype=np.float32, seed=0, O=OUTPUT_SIZE):
    """``(params, X, Y)`` for a shape: torch-style init, X ~ N(0, 1), mse targets ~ N(0, 1).

    A single-layer shape draws exactly what it drew before stacks existed (same seed, same data).
    """
    T, B, D, H, L, bi = Shape(*shape)
    rng = np.random.default_rng(seed)
    params = RNNParams.init(D, H, O, num_layers=L, bidirectional=bi, dtype=dtype, seed=rng)
    X = rng.standard_normal((T, B, D)).astype(dtype)
    Y = rng.standard_normal((T, B, O)).astype(dtype)
    return params, X, Y


# ------------------------------------------------------------ implementations
def impl_unavailable_reason(name):
    """``None`` if implementation ``name`` runs here, else why not."""
    if name in PEERS:
        return peer_unavailable_reason(name)
    if name == AUTO:
        return None                             # (the NumPy reference at worst, with a warning)
    if name in FASTBPTT_IMPLS:
        if name in available_backends():
            return None
        return unavailable_backends().get(name, "not available")
    raise ValueError(f"backend: expected one of {', '.join(ALL_IMPLS)}, got {name!r}")


def make_step(impl, params, X, Y):
    """A zero-argument callable running one training step of ``impl``, and a result getter.

    Returns
    -------
    step : callable
        One forward + full-BPTT gradient; returns nothing useful.
    result : callable
        Runs one step and returns ``(loss, grads RNNParams)``.
    """
    if impl in PEERS:
        peer = make_peer_step(impl, params, X, Y)
        return peer, peer.loss_and_grad

    # a Step, prepared once as the peers' steps are (JAX's jit, torch's modules): what a training
    # loop calls; fastbptt.loss_and_grad runs the same plans after its argument checks
    prepared = Step(params, backend=impl)
    X, Y = np.ascontiguousarray(X, params.dtype), np.ascontiguousarray(Y, params.dtype)

    def result():
        value, grads, _ = prepared.loss_and_grad(X, Y)
        return value, grads.copy()

    def step():
        prepared.loss_and_grad(X, Y)

    return step, result


def reference_grads(params, X, Y):
    """Loss and gradients by the NumPy reference in float64 (the oracle)."""
    value, grads, _ = loss_and_grad(params.astype(np.float64), X.astype(np.float64),
                                    Y.astype(np.float64), backend="numpy")
    return value, grads


def rel_errs(grads, ref):
    """``{name: max|g - g_ref| / max|g_ref|}`` field by field, in the canonical order of ``ref.names()``.

    Raises
    ------
    ValueError
        If the two do not have the same fields (names) and shapes.
    """
    if grads.names() != ref.names():
        raise ValueError(f"grads: expected the fields {ref.names()}, got {grads.names()}")
    out = {}
    for name, g, r in zip(ref.names(), grads.arrays(), ref.arrays()):
        if g.shape != r.shape:
            raise ValueError(f"grads.{name}: expected shape {r.shape}, got {g.shape}")
        r = np.asarray(r, dtype=np.float64)
        diff = np.max(np.abs(np.asarray(g, dtype=np.float64) - r))
        out[name] = float(diff / max(np.max(np.abs(r)), 1e-30))
    return out


def max_rel_err(grads, ref):
    """The largest of :func:`rel_errs`: every field of every (layer, direction) and the head."""
    return max(rel_errs(grads, ref).values())


def time_callable(fn, *, repeats=7, min_sample_s=0.05, budget_s=10.0, min_repeats=3):
    """Time ``fn`` (already warmed up): samples of back-to-back calls.

    Each sample is the mean time of ``number`` calls, ``number`` chosen so a
    sample lasts at least ``min_sample_s``. Takes ``repeats`` samples, fewer
    (never below ``min_repeats``) when they would exceed ``budget_s``.

    Returns
    -------
    list of float
        Seconds per call, one entry per sample.
    """
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    number = max(1, math.ceil(min_sample_s / one))
    n_samples = max(min_repeats, min(repeats, int(budget_s / (one * number))))
    samples = []
    for _ in range(n_samples):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number)
    return samples


def peak_traced_bytes(fn):
    """The peak of Python-traced allocations (numpy's included) while ``fn()`` runs, on a new
    thread: its work arrays (kept per thread) are all new, so every array of the call counts."""
    import threading
    import tracemalloc
    peak = []

    def target():
        tracemalloc.start()
        try:
            fn()
            peak.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if not peak:
        raise RuntimeError("peak_traced_bytes: the call raised (see the thread's traceback above)")
    return peak[0]


def time_interleaved(fns, rounds, min_sample_s=0.05):
    """``{key: [seconds per call, one sample per round]}``: the callables ``fns`` timed in turns,
    so that the machine's drift hits them alike (each sample at least ``min_sample_s``). Every other
    round runs them in reverse order, so that none is always the one timed after the others."""
    number = {}
    for key, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        number[key] = max(1, int(np.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-7))))
    samples = {key: [] for key in fns}
    order = list(fns)
    for r in range(rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            fn = fns[key]
            t0 = time.perf_counter()
            for _ in range(number[key]):
                fn()
            samples[key].append((time.perf_counter() - t0) / number[key])
    return samples


def measure(impl, params, X, Y, *, repeats=7, budget_s=10.0, min_sample_s=0.05, check=True):
    """Build ``impl``'s step on this data, call it once, time it, and run it once more for the check.

    Returns
    -------
    dict
        ``times_s`` (:func:`time_callable`), ``compile_s`` (build + first call),
        and with ``check`` ``result``: ``(loss, grads)`` of one more step.
    """
    with fresh_dispatcher() if impl == AUTO else nullcontext():
        t0 = time.perf_counter()
        step, result = make_step(impl, params, X, Y)
        step()
        if impl == AUTO:        # the dispatcher's trial: its calls count as the build, not as timings
            auto = settle_auto(step, params, X)
        compile_s = time.perf_counter() - t0
        times = time_callable(step, repeats=repeats, budget_s=budget_s, min_sample_s=min_sample_s)
        out = {"times_s": times, "compile_s": compile_s}
        if impl == AUTO:
            out["auto"] = auto
        if check:
            out["result"] = result()
        return out


def settle_auto(step, params, X):
    """Call ``auto``'s ``step`` until the dispatcher has tried its candidates (at most
    :data:`AUTO_MAX_LEARNING_CALLS` calls); returns what it took: ``{"backend", "threads"
    (None: the whole budget -- learning off, the shipped table's choice), "learning_calls"}`` and
    what the trial measured (``"trial_median_s"``: ``{"backend/threads": median}``, ``"trial_calls"``:
    timed calls each; None with learning off)."""
    calls = 1                   # (the step's first call, made by the caller)
    while trials_running() and calls < AUTO_MAX_LEARNING_CALLS:
        step()
        calls += 1
    T, B, D = X.shape
    key = dict(T=T, B=B, D=D, H=params.hidden_size, layers=params.num_layers,
               dirs=2 if params.bidirectional else 1, dtype=params.dtype, lengths=False)
    choice = dispatch(AUTO, "loss_and_grad", **key)
    learned = learned_entry("loss_and_grad", **key) or {}
    return {"backend": choice.name, "threads": choice.threads, "learning_calls": calls,
            "trial_median_s": learned.get("median_s"), "trial_calls": learned.get("calls")}


class fresh_dispatcher:
    """The dispatcher learning from scratch, in a temporary cache (not the user's), while active;
    ``FASTBPTT_LEARN=0`` in the environment is respected (then ``auto`` is the shipped table's).
    Nested: the outer one's (what it learned stays until it ends)."""

    _depth = 0

    def __enter__(self):
        fresh_dispatcher._depth += 1
        self._outer = fresh_dispatcher._depth == 1
        if self._outer:
            self._tmp = tempfile.TemporaryDirectory(prefix="fastbptt-bench-")
            self._old = os.environ.get(CACHE_VAR)
            os.environ[CACHE_VAR] = self._tmp.name
            forget_dispatch()
        return self

    def __exit__(self, *exc):
        fresh_dispatcher._depth -= 1
        if self._outer:
            if self._old is None:
                os.environ.pop(CACHE_VAR, None)
            else:
                os.environ[CACHE_VAR] = self._old
            forget_dispatch()
            self._tmp.cleanup()
        return False


def auto_against_best(cells, params, X, Y, rounds, min_sample_s):
    """Time ``auto`` (as learned already, in the caller's :class:`fresh_dispatcher`) and the fastest
    named backend of ``cells`` (one shape's cells, by median) in turns (:func:`time_interleaved`, at
    least :data:`AUTO_TURN_ROUNDS` rounds); puts ``auto_vs_best`` into the auto cell: ``{"best",
    "ratio"`` (the median over the rounds of auto's sample over the best's of the same round: the
    machine's speed changes over seconds, the two samples of a round see the same speed),
    ``"round_ratios", "auto_median_s", "best_median_s", "rounds"}``."""
    named = [c for c in cells if c["kind"] == "fastbptt"]
    auto = next((c for c in cells if c["impl"] == AUTO), None)
    if auto is None or not named:
        return
    best = min(named, key=lambda c: c["median_s"])
    steps = {AUTO: make_step(AUTO, params, X, Y)[0], best["impl"]: make_step(best["impl"], params, X, Y)[0]}
    settle_auto(steps[AUTO], params, X)
    rounds = max(rounds, AUTO_TURN_ROUNDS)
    samples = time_interleaved(steps, rounds, min_sample_s)
    ratios = [a / b for a, b in zip(samples[AUTO], samples[best["impl"]])]
    auto["auto_vs_best"] = {"best": best["impl"], "ratio": float(np.median(ratios)),
                            "round_ratios": ratios, "auto_median_s": float(np.median(samples[AUTO])),
                            "best_median_s": float(np.median(samples[best["impl"]])), "rounds": rounds}


def peer_thread_plan(impl, threads, peer_threads):
    """``[(n, where), ...]``: the thread counts ``impl`` is timed at, and where (``"here"`` or ``"worker"``).

    fastbptt runs at ``threads`` only. torch at every count of ``peer_threads``,
    in this process. jax at 1 thread or on all cores (XLA has nothing in
    between): the setting this process's jax has runs here, the other one in a
    worker process (:class:`PeerWorker`).
    """
    if impl not in PEERS:
        return [(threads, "here")]
    if impl == "torch":
        return [(n, "here") for n in sorted(set(peer_threads))]
    cores = os.cpu_count() or 1
    here = jax_threads()
    counts = sorted({1 if n == 1 else cores for n in peer_threads})
    return [(n, "here" if n == here else "worker") for n in counts]


class PeerWorker:
    """A Python process that times a peer at a thread count this process cannot give it (jax's
    XLA pool is fixed when jax starts): the same :func:`make_problem` data and :func:`measure`
    code, one JSON line per cell each way, so its figures sit beside this process's.

    ``threads`` sets its ``XLA_FLAGS`` (:func:`fastbptt.tools.peers.xla_flags`), its BLAS
    pools and torch's. Started on first use, closed by :meth:`close`.
    """

    PREFIX = "FASTBPTT-BENCH-CELL "

    def __init__(self, threads):
        self.threads = int(threads)
        self._proc = None
        self._stderr = None

    def _start(self):
        env = dict(os.environ, XLA_FLAGS=xla_flags(self.threads, os.environ.get("XLA_FLAGS", "")))
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from fastbptt.tools.bench import worker_main; "
             "sys.exit(worker_main(sys.argv[1:]))", str(self.threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)

    def _failure(self, what):
        self._stderr.seek(0)
        tail = self._stderr.read()[-2000:]
        return RuntimeError(f"the {self.threads}-thread peer worker {what}: {tail.strip() or '(no output)'}")

    def run(self, impl, shape, dtype, *, repeats, budget_s, min_sample_s, check):
        """One cell in the worker: a dict as :func:`measure`'s, ``result`` replaced by the
        check's figures (``rel_err_by_field``, ``loss_rel_err``), computed there."""
        if self._proc is None:
            self._start()
        request = {"impl": impl, "shape": list(Shape(*shape)), "dtype": str(np.dtype(dtype)),
                   "repeats": repeats, "budget_s": budget_s, "min_sample_s": min_sample_s,
                   "check": bool(check)}
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
            while True:
                line = self._proc.stdout.readline()
                if not line:
                    raise self._failure("stopped")
                if line.startswith(self.PREFIX):
                    break
        except BrokenPipeError:
            raise self._failure("stopped") from None
        reply = json.loads(line[len(self.PREFIX):])
        if "error" in reply:
            raise RuntimeError(f"the {self.threads}-thread peer worker failed on {impl} "
                               f"{format_shape(shape)}: {reply['error']}")
        return reply

    def close(self):
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=60)
            except Exception:  # noqa: BLE001 - a worker that does not stop is killed
                self._proc.kill()
                self._proc.wait()
            self._stderr.close()
            self._proc = None


def worker_main(argv):
    """The loop of a :class:`PeerWorker` process: ``argv = [threads]``; requests on stdin, cells on stdout."""
    threads = int(argv[0])            # XLA_FLAGS came with the environment; torch never runs here
    with _ThreadLimits(threads):
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                dtype = np.dtype(req["dtype"])
                params, X, Y = make_problem(Shape(*req["shape"]), dtype)
                r = measure(req["impl"], params, X, Y, repeats=req["repeats"], budget_s=req["budget_s"],
                            min_sample_s=req["min_sample_s"], check=req["check"])
                reply = {"times_s": r["times_s"], "compile_s": r["compile_s"]}
                if req["check"]:
                    value, grads = r.pop("result")
                    ref_loss, ref = reference_grads(params, X, Y)
                    reply["rel_err_by_field"] = rel_errs(grads, ref)
                    reply["loss_rel_err"] = abs(value - ref_loss) / max(abs(ref_loss), 1e-30)
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(PeerWorker.PREFIX + json.dumps(reply) + "\n")
            sys.stdout.flush()
    return 0


class _ThreadLimits:
    """Cap BLAS and Numba pools at ``threads`` while active (threadpoolctl).

    fastbptt's own team of threads (:mod:`fastbptt._threads`: BLAS on one thread
    inside a call, the batch and the big GEMMs split between the team's threads
    where a phase is big enough) is set to ``threads`` for the run.
    """

    def __init__(self, threads):
        self.threads = threads
        self._ctl = None
        self._numba_prev = None
        self._forced_prev = None

    def describe(self):
        """How fastbptt's own threads are set during the run (for the results)."""
        return (f"a team of {self.threads} (fastbptt.set_num_threads), BLAS on 1 thread inside it; "
                f"a phase is split from {_threads.MIN_SPLIT_FLOPS_C_TEAM:.2g} flops on the Cython "
                f"backend's C team, from {_threads.MIN_SPLIT_FLOPS:.2g} on the Python pool")

    def __enter__(self):
        from threadpoolctl import threadpool_limits
        self._forced_prev = _threads._forced
        _threads.set_num_threads(self.threads)
        self._ctl = threadpool_limits(limits=self.threads)
        try:
            import numba
            self._numba_prev = numba.get_num_threads()
            numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))
        except Exception:  # numba missing: nothing to cap
            self._numba_prev = None
        return self

    def __exit__(self, *exc):
        self._ctl.restore_original_limits()
        _threads.set_num_threads(self._forced_prev)
        if self._numba_prev is not None:
            import numba
            numba.set_num_threads(self._numba_prev)
        return False


def machine_info():
    """Versions and thread pools, for the JSON results and ``fastbptt info``."""
    import scipy
    info = {
        "fastbptt": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }
    try:
        import numba
        info["numba"] = numba.__version__
    except Exception:
        info["numba"] = None
    for peer in PEERS:
        info[peer] = peer_version(peer)
    try:
        from threadpoolctl import threadpool_info
        info["threadpools"] = [
            {k: d.get(k) for k in ("user_api", "internal_api", "prefix", "version",
                                   "num_threads", "threading_layer", "architecture")}
            for d in threadpool_info()]
    except Exception as exc:
        info["threadpools"] = f"threadpoolctl failed: {exc}"
    return info


# ----------------------------------------------------------------- the run
def run_benchmark(shapes=None, impls=None, *, dtype=np.float32, threads=2, peer_threads=None, quick=False,
                  repeats=None, budget_s=None, check=True, progress=None, client=None):
    """Run the comparison and return the results as a JSON-ready dict.

    Parameters
    ----------
    shapes : list of str, optional
        Names of :data:`SHAPES` or custom ``"T,B,D,H[,L[,bi]]"`` (:func:`parse_shape`);
        all of :data:`SHAPES` by default.
    impls : list of str, optional
        Among ``cython, numba, numpy, torch, jax``; every one that runs here by
        default. Naming one that does not run here is a ``ValueError``.
    dtype : float32 or float64
    threads : int
        fastbptt's team, and the cap of the BLAS and Numba pools (see module docstring).
    peer_threads : list of int, optional
        The thread counts each peer is timed at (default: 1 and ``threads``); a
        peer's cell is its fastest count (by median), every count is kept in
        ``by_threads``. jax runs on 1 thread or on all cores.
    quick : bool
        T of the named shapes divided by 5 (at least 20; see :func:`quick_shape`), 3 samples,
        at most about 1 s of samples per cell.
    repeats, budget_s : int, float, optional
        Samples per cell and the time budget per cell (defaults 7 and 10 s;
        3 and 2 s with ``quick``).
    check : bool
        Compare every implementation's gradients with the float64 reference.
    progress : callable(str), optional
        Called with a short line before each cell (with ``client``: as each cell comes back).
    client : distributed.Client, optional
        Run each (shape, impl) cell as one task on this Dask cluster (``client.map``,
        :func:`bench_cell`): the worker makes the same data, times the cell and checks it; the
        cells come back in the local run's order, each naming its ``worker``. Which
        implementations run is decided here, so every worker must have them.

    Returns
    -------
    dict
        ``{"meta": ..., "skipped": {impl: reason}, "results": [cell, ...], "stack_ratios": [...]}``;
        one cell per (shape, impl) with ``times_s``, ``best_s``, ``median_s``,
        ``steps_per_s``, ``gflops``, ``compile_s``, ``threads``, ``max_rel_err``,
        ``rel_err_by_field``, ... (a peer's also ``by_threads``); ``stack_ratios``
        is :func:`stack_ratios` of the results.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive int, got {threads!r}")
    peer_threads = sorted({1, threads}) if peer_threads is None else list(peer_threads)
    if not peer_threads or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in peer_threads):
        raise ValueError(f"peer_threads: expected positive ints, got {peer_threads!r}")
    parsed = [parse_shape(s) for s in (list(SHAPES) if shapes is None else shapes)]
    if not parsed:
        raise ValueError("shapes: expected at least one shape, got none")
    # before anything imports jax: XLA reads its thread flags once, at import
    wants_peers = impls is None or any(i in PEERS for i in impls)
    thread_notes = set_threads(threads) if wants_peers else {}
    skipped = {}
    if impls is None:
        impls = []
        for name in ALL_IMPLS:
            reason = impl_unavailable_reason(name)
            if reason is None:
                impls.append(name)
            else:
                skipped[name] = reason
    else:
        impls = list(impls)
        if not impls:
            raise ValueError("backends: expected at least one implementation, got none")
        for name in impls:
            reason = impl_unavailable_reason(name)
            if reason is not None:
                raise ValueError(f"backends: {name!r} is not available here: {reason}")
    if "jax" in impls and dtype == np.float64:
        import jax
        if not jax.config.jax_enable_x64:
            impls.remove("jax")
            skipped["jax"] = "float64 needs JAX_ENABLE_X64=1 in the environment"
    repeats = (3 if quick else 7) if repeats is None else int(repeats)
    budget_s = (1.0 if quick else 10.0) if budget_s is None else float(budget_s)
    min_sample_s = 0.02 if quick else 0.05
    plans = {impl: peer_thread_plan(impl, threads, peer_threads) for impl in impls}
    if any(impl in PEERS for impl in impls):
        thread_notes["peers"] = (
            "each peer timed at " + "; ".join(
                f"{impl}: " + ", ".join(f"{n}" + (" (worker process)" if where == "worker" else "")
                                        for n, where in plans[impl])
                for impl in impls if impl in PEERS)
            + " threads; its row is its fastest count (median), every count in by_threads")

    results = []
    workers = {}
    limits = _ThreadLimits(threads)
    thread_notes = dict(thread_notes, fastbptt=limits.describe())
    cells = []                                    # (name, run_shape) per shape, in table order
    for name, shape in parsed:
        # --quick shortens the named shapes; a custom shape runs as given
        cells.append((name, quick_shape(shape) if quick and name in SHAPES else shape))
    if client is not None:
        # one task per (shape, impl) cell; each worker makes the same data and times the cell itself
        jobs = [(name, run_shape, impl) for name, run_shape in cells for impl in impls]
        results = map_on_client(
            client, bench_cell, [j[0] for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs],
            dtype=str(dtype), threads=threads, peer_threads=peer_threads, repeats=repeats,
            budget_s=budget_s, min_sample_s=min_sample_s, check=check,
            labels=[f"{name} {format_shape(s)} {impl}" for name, s, impl in jobs], progress=progress)
        thread_notes["cluster"] = (f"each (shape, impl) cell ran as one task on a worker of the Dask "
                                   f"scheduler {client.scheduler.address}, timed there (its 'worker')")
    else:
        try:
            with limits:
                for name, run_shape in cells:
                    params, X, Y = make_problem(run_shape, dtype)
                    checks = []
                    shape_cells = []
                    with fresh_dispatcher():        # auto learns once per shape, kept for auto_against_best
                        for impl in impls:
                            def announce(n, where, label=f"{name} {format_shape(run_shape)} {impl}"):
                                if progress is not None:
                                    progress(label + (f" ({n} threads{', worker' if where == 'worker' else ''})"
                                                      if impl in PEERS else ""))
                            runs = _time_runs(impl, plans[impl], run_shape, params, X, Y, dtype, workers,
                                              dict(repeats=repeats, budget_s=budget_s, min_sample_s=min_sample_s,
                                                   check=check), announce)
                            cell = _make_cell(name, run_shape, impl, dtype, runs)
                            if check:
                                for n, r in runs.items():
                                    checks.append((cell, n, r))
                            results.append(cell)
                            shape_cells.append(cell)
                        if progress is not None and AUTO in impls:
                            progress(f"{name} {format_shape(run_shape)} auto against the best backend, in turns")
                        auto_against_best(shape_cells, params, X, Y, repeats, min_sample_s)
                    if check:   # the float64 reference runs after the timings, not between them
                        ref_loss, ref = reference_grads(params, X, Y)
                        for cell, n, r in checks:
                            _check_cell(cell, n, r, ref_loss, ref)
        finally:
            for worker in workers.values():
                worker.close()

    meta = machine_info()
    meta.update({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(dtype), "threads": threads, "peer_threads": peer_threads,
        "thread_settings": thread_notes,
        "scheduler": client.scheduler.address if client is not None else None,
        "quick": bool(quick), "repeats": repeats, "budget_s": budget_s,
        "quick_note": (f"--quick: T of the named shapes divided by {QUICK_T_DIVISOR} (at least "
                       f"{QUICK_MIN_T}), {repeats} samples per cell" if quick else None),
        "backends_available": available_backends(),
        "step": "forward + full-BPTT gradient of all parameters, mse on every step, O=8",
    })
    out = {"meta": meta, "skipped": skipped, "results": results}
    out["stack_ratios"] = stack_ratios(out)
    return out


def _make_cell(name, run_shape, impl, dtype, runs):
    """The result cell of one (shape, impl) from its timed ``runs`` ``{threads: measure() dict}``:
    the fastest thread count (median) is the cell, a peer keeps every count in ``by_threads``."""
    best_n = min(runs, key=lambda n: float(np.median(runs[n]["times_s"])))
    best = runs[best_n]
    T, B, D, H, L, bi = run_shape
    cell = {
        "shape": name, "T": T, "B": B, "D": D, "H": H, "O": OUTPUT_SIZE,
        "num_layers": L, "bidirectional": bi,
        "impl": impl, "kind": "peer" if impl in PEERS else AUTO if impl == AUTO else "fastbptt",
        "dtype": str(np.dtype(dtype)), "threads": best_n, "times_s": best["times_s"],
        "best_s": min(best["times_s"]), "median_s": float(np.median(best["times_s"])),
        "compile_s": best["compile_s"],
    }
    if "auto" in best:
        cell["auto_choice"] = best["auto"]
        cell["threads"] = best["auto"]["threads"] or best_n
    cell["steps_per_s"] = 1.0 / cell["median_s"]
    cell["gflops"] = shape_flops(run_shape) / cell["median_s"] / 1e9
    if impl in PEERS:
        cell["by_threads"] = {
            str(n): {"where": r["where"], "times_s": r["times_s"], "best_s": min(r["times_s"]),
                     "median_s": float(np.median(r["times_s"])), "compile_s": r["compile_s"]}
            for n, r in runs.items()}
    return cell


def _check_cell(cell, n, r, ref_loss, ref):
    """Fold the check of the run at ``n`` threads (``r``) into ``cell``: the worst over the counts."""
    if "result" in r:
        value, grads = r.pop("result")
        errs = rel_errs(grads, ref)
        loss_err = abs(value - ref_loss) / max(abs(ref_loss), 1e-30)
    else:                     # checked in the peer worker, against its own reference
        errs, loss_err = r["rel_err_by_field"], r["loss_rel_err"]
    if "by_threads" in cell:
        cell["by_threads"][str(n)]["max_rel_err"] = max(errs.values())
    worst = cell.setdefault("rel_err_by_field", {})
    for field, e in errs.items():
        worst[field] = max(worst.get(field, 0.0), e)
    cell["max_rel_err"] = max(worst.values())
    cell["loss_rel_err"] = max(cell.get("loss_rel_err", 0.0), loss_err)


def _time_runs(impl, plan, run_shape, params, X, Y, dtype, workers, timing, announce=None):
    """``{threads: run}`` for one (shape, impl) cell: each ``(n, where)`` of its thread ``plan`` timed
    in this process or in a :class:`PeerWorker` (kept in ``workers``), ``timing`` the keyword
    arguments of :func:`measure`."""
    runs = {}
    for n, where in plan:
        if announce is not None:
            announce(n, where)
        if where == "worker":
            runs[n] = workers.setdefault(n, PeerWorker(n)).run(impl, run_shape, dtype, **timing)
        else:
            with torch_threads(n) if impl == "torch" else nullcontext():
                runs[n] = measure(impl, params, X, Y, **timing)
        runs[n]["where"] = where
    return runs


def bench_cell(name, run_shape, impl, *, dtype, threads, peer_threads, repeats, budget_s, min_sample_s,
               check):
    """One (shape, impl) cell, whole, where it runs (a Dask worker): the same data
    (:func:`make_problem`), thread settings, timings and check as :func:`run_benchmark`'s loop.

    Returns the cell dict, with ``worker``: the address of the worker that timed it.
    """
    dtype = np.dtype(dtype)
    run_shape = Shape(*run_shape)
    if impl in PEERS:
        set_threads(threads)
    workers = {}
    try:
        with _ThreadLimits(threads):
            params, X, Y = make_problem(run_shape, dtype)
            runs = _time_runs(impl, peer_thread_plan(impl, threads, peer_threads), run_shape, params, X, Y,
                              dtype, workers, dict(repeats=repeats, budget_s=budget_s,
                                                   min_sample_s=min_sample_s, check=check))
            cell = _make_cell(name, run_shape, impl, dtype, runs)
            if check:
                ref_loss, ref = reference_grads(params, X, Y)
                for n, r in runs.items():
                    _check_cell(cell, n, r, ref_loss, ref)
    finally:
        for worker in workers.values():
            worker.close()
    try:
        from distributed import get_worker
        cell["worker"] = get_worker().address
    except (ImportError, ValueError):           # not on a Dask worker
        cell["worker"] = None
    return cell


def map_on_client(client, fn, *iterables, labels, progress=None, **kwargs):
    """``[fn(*args, **kwargs) for args in zip(*iterables)]``, each call one task on ``client``'s cluster
    (``client.map``, ``pure=False``), in the order given; ``progress(label)`` as each one finishes.

    A task that fails raises its error here, and the tasks still pending are cancelled.
    """
    from distributed import as_completed

    futures = client.map(fn, *iterables, pure=False, **kwargs)
    try:
        if progress is not None:
            index = {f.key: i for i, f in enumerate(futures)}
            for f in as_completed(futures):
                progress(f"{labels[index[f.key]]} (done on the cluster)")
        return client.gather(futures)
    finally:
        client.cancel(futures)


# ------------------------------------------------------------- reporting
def _by_shape(results):
    order, cells = [], {}
    for cell in results["results"]:
        if cell["shape"] not in cells:
            order.append(cell["shape"])
            cells[cell["shape"]] = {}
        cells[cell["shape"]][cell["impl"]] = cell
    return order, cells


def best_fastbptt(cells):
    """The fastest named fastbptt backend's cell (by median) among one shape's cells, or None
    (``auto`` is not one: it is compared with this one)."""
    ours = [c for c in cells.values() if c["kind"] == "fastbptt"]
    return min(ours, key=lambda c: c["median_s"]) if ours else None


def _cell_shape(cell):
    """The :class:`Shape` a result cell ran (files written before stacks hold one layer)."""
    return Shape(cell["T"], cell["B"], cell["D"], cell["H"], cell.get("num_layers", 1),
                 bool(cell.get("bidirectional", False)))


def _describe(shape):
    text = f"T={shape.T}, B={shape.B}, D={shape.D}, H={shape.H}, O={OUTPUT_SIZE}"
    if shape.stacked:
        text += f", {shape.num_layers} layer{'s' * (shape.num_layers > 1)}"
        text += ", bidirectional" if shape.bidirectional else ""
    return text


def stack_ratios(results):
    """The cost of a stacked cell per (layer, direction), against single-layer cells of the same run.

    For every stacked cell whose *twins* ran too -- one unidirectional layer of
    each of its layers' shapes: the same T, B, H and that layer's input size
    (D for layer 0, dirs·H above; e.g. ``stacked`` with ``stacked_l0`` and
    ``stacked_l1``) -- and every implementation in all of them:

    - ``ratio`` = t(stacked) / Σ_layers dirs·t(twin of that layer), by median
      (``ratio_best``: by best sample). 1.0: a (layer, direction) of the stack
      costs what a single-layer step of its shape does.
    - ``flop_ratio``: the stack's flops over its twins' (:func:`step_flops`):
      it does more than the twins -- each layer above the first also sends its
      gradient down (one more GEMM of its input size), and it has one head on
      dirs·H features where the twins have one each -- and ``ratio_per_flop`` =
      ``ratio / flop_ratio`` takes that out.
    - ``ratio_vs_first`` = t(stacked) / (L·dirs·t(layer 0's twin)): the simple
      reading (every layer as layer 0); layers above it have the larger input
      dirs·H, so this one overstates the stack's overhead.

    Returns
    -------
    list of dict
        One per (stacked shape, impl).
    """
    order, cells = _by_shape(results)
    shapes = {name: _cell_shape(next(iter(cells[name].values()))) for name in order}
    by_dims = {}
    for name in order:
        by_dims.setdefault(shapes[name], name)
    out = []
    for name in order:
        shape = shapes[name]
        if not shape.stacked:
            continue
        twins = {d: by_dims.get(Shape(shape.T, shape.B, d, shape.H)) for d in set(shape.layer_inputs)}
        if None in twins.values():
            continue
        f_stack = shape_flops(shape)
        f_twins = sum(shape.dirs * shape_flops(Shape(shape.T, shape.B, d, shape.H)) for d in shape.layer_inputs)
        for impl, c in cells[name].items():
            if not all(impl in cells[t] for t in twins.values()):
                continue

            def twins_s(key):
                return sum(shape.dirs * cells[twins[d]][impl][key] for d in shape.layer_inputs)

            ratio = c["median_s"] / twins_s("median_s")
            first = cells[twins[shape.D]][impl]["median_s"]
            out.append({
                "shape": name, "impl": impl, "num_layers": shape.num_layers, "dirs": shape.dirs,
                "twins": {str(d): twins[d] for d in shape.layer_inputs},
                "stacked_s": c["median_s"], "twins_s": twins_s("median_s"),
                "ratio": ratio, "ratio_best": c["best_s"] / twins_s("best_s"),
                "flop_ratio": f_stack / f_twins, "ratio_per_flop": ratio / (f_stack / f_twins),
                "ratio_vs_first": c["median_s"] / (shape.num_layers * shape.dirs * first),
            })
    return out


def format_stack_ratios(ratios):
    """:func:`stack_ratios` as text lines (none if there are none)."""
    if not ratios:
        return []
    lines = ["", "per (layer, direction) cost of a stack: ratio = t(stack) / Σ dirs·t(one layer of each "
                 "layer's shape), same run (1.00x: no overhead)"]
    groups = {}
    for r in ratios:
        groups.setdefault(r["shape"], []).append(r)
    for name, rows in groups.items():
        r0 = rows[0]
        L, dirs = r0["num_layers"], r0["dirs"]
        inputs = list(r0["twins"])
        parts = [f"{dirs * inputs.count(d)} x {r0['twins'][d]} (input {d})" for d in dict.fromkeys(inputs)]
        first = r0["twins"][inputs[0]]
        lines.append(f"{name} ({L} layers{', bidirectional' if dirs == 2 else ''}) against "
                     + " + ".join(parts) + f"; the stack does {r0['flop_ratio']:.2f}x their flops "
                     "(each layer above the first sends its gradient down; one head instead of one per twin)")
        lines.append(f"  {'impl':<8} {'stack ms':>10} {'twins ms':>10} {'ratio':>7} {'(best)':>8} "
                     f"{'per flop':>9} {'vs ' + str(L * dirs) + ' x ' + first:>{max(14, len(first) + 8)}}")
        for r in rows:
            lines.append(f"  {r['impl']:<8} {r['stacked_s'] * 1e3:>10.3f} {r['twins_s'] * 1e3:>10.3f} "
                         f"{r['ratio']:>6.2f}x {'(' + format(r['ratio_best'], '.2f') + 'x)':>8} "
                         f"{r['ratio_per_flop']:>8.2f}x {r['ratio_vs_first']:>{max(13, len(first) + 7)}.2f}x")
    return lines


def format_table(results):
    """The results as a plain-text table, one block per shape, with speed-ups and a summary."""
    order, cells = _by_shape(results)
    lines = []
    meta = results.get("meta", {})
    if meta.get("quick"):
        lines.append(f"QUICK RUN ({meta.get('quick_note')}): figures are indicative only.")
    lines.append(f"one training step = {meta.get('step', 'forward + BPTT')}; dtype {meta.get('dtype')}, "
                 f"{meta.get('threads')} threads (thr: a row's thread count; a peer's is its fastest); "
                 f"ms per step (median of samples, and the best sample)")
    if meta.get("thread_settings"):
        lines.append("threads: " + "; ".join(f"{k}: {v}" for k, v in meta["thread_settings"].items()))
    peers_here = [p for p in PEERS if any(p in c for c in cells.values())]
    ref_cols = ["numpy"] * any("numpy" in c for c in cells.values()) + peers_here
    header = (f"{'impl':<8} {'thr':>3} {'median ms':>10} {'best ms':>9} {'steps/s':>9} {'GFLOP/s':>8} "
              f"{'compile s':>9} {'rel err':>8}" + "".join(f" {'vs ' + r:>9}" for r in ref_cols))
    summary = []
    for name in order:
        row = cells[name]
        lines.append("")
        lines.append(f"{name}: {_describe(_cell_shape(next(iter(row.values()))))}")
        lines.append(header)
        for impl, c in row.items():
            err = f"{c['max_rel_err']:.1e}" if "max_rel_err" in c else "-"
            ratios = "".join(
                f" {row[r]['median_s'] / c['median_s']:>8.2f}x" if r in row else f" {'-':>9}"
                for r in ref_cols)
            lines.append(f"{impl:<8} {str(c.get('threads', '-')):>3} {c['median_s'] * 1e3:>10.3f} "
                         f"{c['best_s'] * 1e3:>9.3f} {c['steps_per_s']:>9.1f} {c['gflops']:>8.2f} "
                         f"{c['compile_s']:>9.3f} {err:>8}{ratios}")
        per_thread = [f"{impl} " + ", ".join(
            f"{n} thr {t['median_s'] * 1e3:.3f}" + (" (worker)" if t.get("where") == "worker" else "")
            for n, t in c["by_threads"].items())
            for impl, c in row.items() if len(c.get("by_threads", {})) > 1]
        if per_thread:
            lines.append("  peers by threads, median ms: " + "; ".join(per_thread))
        best = best_fastbptt(row)
        if best is not None:
            ups = [f"{r} {row[r]['median_s'] / best['median_s']:.2f}x" for r in ref_cols
                   if r in row and r != best["impl"]]
            auto = row.get(AUTO)
            took = ""
            if auto is not None:
                vs = auto.get("auto_vs_best")
                took = (f"; auto {auto['median_s'] / best['median_s']:.2f}x its time"
                        + (f" ({vs['ratio']:.2f}x {vs['best']}'s timed in turns)" if vs else "")
                        + f" (took {auto.get('auto_choice', {}).get('backend', '?')} on "
                        f"{auto.get('threads', '?')} thr)")
            auto_ups = [f"{r} {row[r]['median_s'] / auto['median_s']:.2f}x" for r in ref_cols
                        if r in row and row[r]["kind"] == "peer"] if auto is not None else []
            summary.append(f"{name}: fastbptt best = {best['impl']} {best['median_s'] * 1e3:.3f} ms{took}"
                           + (f"; speed-up over {', '.join(ups)}" if ups else "")
                           + (f" (auto's: {', '.join(auto_ups)})" if auto_ups else ""))
    if summary:
        lines.append("")
        lines.append("summary (best: the fastest named backend; auto: the dispatcher, learning in this run; "
                     "speed-up = other's median / fastbptt-best's median; > 1: fastbptt faster; "
                     "peers at their fastest thread count):")
        lines.extend("  " + s for s in summary)
    lines.extend(format_stack_ratios(stack_ratios(results)))
    for impl, reason in results.get("skipped", {}).items():
        lines.append(f"skipped {impl}: {reason}")
    return "\n".join(lines)


def compare_table(old, new):
    """Median ms of two result sets side by side, with new/old ratios (lower is faster)."""
    _, a = _by_shape(old)
    order, b = _by_shape(new)
    lines = [f"{'shape':<22} {'impl':<8} {'old ms':>10} {'new ms':>10} {'new/old':>8}"]
    for name in order:
        for impl, c in b[name].items():
            o = a.get(name, {}).get(impl)
            if o is None:
                lines.append(f"{name:<22} {impl:<8} {'-':>10} {c['median_s'] * 1e3:>10.3f} {'-':>8}")
            else:
                note = "" if _cell_shape(o) == _cell_shape(c) else "  (different shape)"
                if o.get("threads") != c.get("threads") and c["kind"] == "peer":
                    note += f"  (threads {o.get('threads', '?')} -> {c.get('threads', '?')})"
                lines.append(f"{name:<22} {impl:<8} {o['median_s'] * 1e3:>10.3f} "
                             f"{c['median_s'] * 1e3:>10.3f} {c['median_s'] / o['median_s']:>7.2f}x{note}")
    return "\n".join(lines)


def read_json(path):
    """Read a results file written by :func:`write_json`; ValueError if it is not one."""
    with open(path) as fh:
        try:
            obj = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not a JSON file ({exc})") from None
    if not isinstance(obj, dict) or "results" not in obj:
        raise ValueError(f"{path}: not a fastbptt results file (no 'results' key)")
    return obj


def require_matplotlib():
    """Import matplotlib with the Agg backend, or raise ValueError saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib, which is not installed: "
                         "pip install matplotlib (or pip install 'fastbptt[plot]')") from None
    return plt


def save_figure(fig, path):
    """Save a matplotlib figure as PNG atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


def plot_results(results, path):
    """A grouped bar chart of ms per step (log scale), one group per shape, as PNG."""
    plt = require_matplotlib()
    order, cells = _by_shape(results)
    impls = [i for i in ALL_IMPLS if any(i in c for c in cells.values())]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(order) + 2), 4.2))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs = [i + (k - (len(impls) - 1) / 2) * width for i, name in enumerate(order) if impl in cells[name]]
        ys = [cells[name][impl]["median_s"] * 1e3 for name in order if impl in cells[name]]
        ax.bar(xs, ys, width=width, label=impl)
    ax.set_xticks(range(len(order)))
    ax.set_xticklabels([f"{n}\n{format_shape(_cell_shape(next(iter(cells[n].values()))))}" for n in order],
                       fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per training step (median, lower is better)")
    meta = results.get("meta", {})
    ax.set_title(f"fastbptt {meta.get('fastbptt', '')}: forward + BPTT, {meta.get('dtype')}, "
                 f"{meta.get('threads')} threads" + (" (quick)" if meta.get("quick") else ""))
    ax.legend()
    ax.grid(axis="y", which="both", alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)
