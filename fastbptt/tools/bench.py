"""The backend comparison behind ``fastbptt bench`` and the ``benchmarks/`` suite.

One *training step* is what :func:`fastbptt.loss_and_grad` computes: the
forward pass and the full-BPTT gradient of all five parameters (mse loss on
every step, ``O = 8`` outputs). Each implementation -- every fastbptt backend
that loads here and, when installed, the PyTorch and JAX peers
(:mod:`fastbptt.tools.peers`) -- runs the same step on the same data:

- the step is built and called once before timing (``compile_s`` is that
  build + first call: Numba's JIT or its disk cache, JAX's ahead-of-time
  compile; it is reported on its own and never mixed into the timings);
- then ``repeats`` samples are taken, each the mean of enough back-to-back
  calls to last ``min_sample_s``; the result reports the best and the median
  sample (machines are noisy: compare within one run);
- correctness: the gradients of each implementation are compared with the
  NumPy reference in float64 on the same data (``max_rel_err`` = the largest
  ``max|g - g_ref| / max|g_ref|`` over the five parameters).

Threads: ``threads`` (default 2) caps the BLAS pools (threadpoolctl), Numba's
pool and torch's intra-op pool; XLA's pool is fixed when jax is imported (see
:func:`fastbptt.tools.peers.set_threads`).
"""

import datetime
import json
import math
import os
import platform
import time

import numpy as np

from .. import __version__
from .. import _threads
from ..backends import available_backends, unavailable_backends
from .._io import atomic_write
from ..functional import loss_and_grad
from ..params import RNNParams
from .peers import PEERS, make_peer_step, peer_unavailable_reason, peer_version, set_threads

OUTPUT_SIZE = 8

#: name -> (T, B, D, H); O is :data:`OUTPUT_SIZE`
SHAPES = {
    "online": (1000, 1, 8, 32),
    "small": (100, 32, 16, 64),
    "medium": (200, 64, 64, 256),
    "longseq": (2000, 16, 32, 128),
    "large": (100, 128, 256, 1024),
}

#: --quick divides T by this (never below QUICK_MIN_T) and takes fewer samples
QUICK_T_DIVISOR = 5
QUICK_MIN_T = 20

FASTBPTT_IMPLS = ("cython", "numba", "numpy")
ALL_IMPLS = FASTBPTT_IMPLS + PEERS


# ----------------------------------------------------------------- shapes
def parse_shape(token):
    """A shape name of :data:`SHAPES` or a custom ``"T,B,D,H"``; returns ``(name, (T, B, D, H))``.

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
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise ValueError(f"shape: expected one of {', '.join(SHAPES)} or 'T,B,D,H' with four "
                         f"positive ints, got {token!r}")
    return f"T{dims[0]}_B{dims[1]}_D{dims[2]}_H{dims[3]}", dims


def quick_shape(shape):
    """The --quick version of a shape: T divided by :data:`QUICK_T_DIVISOR` (at least :data:`QUICK_MIN_T`)."""
    T, B, D, H = shape
    return (min(T, max(QUICK_MIN_T, T // QUICK_T_DIVISOR)), B, D, H)


def step_flops(T, B, D, H, O=OUTPUT_SIZE):
    """Multiply-adds x 2 of one training step: 2·T·B·H·(2D + 3H + 3O).

    Forward: input projection (D), recurrence (H), output layer (O); backward:
    ∂L/∂h from the output (O), dW_hy (O), the δ chain (H), dW_xh (D), dW_hh (H).
    Element-wise work is not counted.
    """
    return 2.0 * T * B * H * (2 * D + 3 * H + 3 * O)


def make_problem(shape, dtype=np.float32, seed=0, O=OUTPUT_SIZE):
    """``(params, X, Y)`` for a shape: torch-style init, X ~ N(0, 1), mse targets ~ N(0, 1)."""
    T, B, D, H = shape
    rng = np.random.default_rng(seed)
    params = RNNParams.init(D, H, O, dtype=dtype, seed=rng)
    X = rng.standard_normal((T, B, D)).astype(dtype)
    Y = rng.standard_normal((T, B, O)).astype(dtype)
    return params, X, Y


# ------------------------------------------------------------ implementations
def impl_unavailable_reason(name):
    """``None`` if implementation ``name`` runs here, else why not."""
    if name in PEERS:
        return peer_unavailable_reason(name)
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

    def result():
        value, grads, _ = loss_and_grad(params, X, Y, backend=impl)
        return value, grads

    def step():
        loss_and_grad(params, X, Y, backend=impl)

    return step, result


def reference_grads(params, X, Y):
    """Loss and gradients by the NumPy reference in float64 (the oracle)."""
    value, grads, _ = loss_and_grad(params.astype(np.float64), X.astype(np.float64),
                                    Y.astype(np.float64), backend="numpy")
    return value, grads


def max_rel_err(grads, ref):
    """The largest ``max|g - g_ref| / max|g_ref|`` over the five parameters."""
    worst = 0.0
    for g, r in zip(grads.arrays(), ref.arrays()):
        r = np.asarray(r, dtype=np.float64)
        diff = np.max(np.abs(np.asarray(g, dtype=np.float64) - r))
        worst = max(worst, float(diff / max(np.max(np.abs(r)), 1e-30)))
    return worst


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
def run_benchmark(shapes=None, impls=None, *, dtype=np.float32, threads=2, quick=False,
                  repeats=None, budget_s=None, check=True, progress=None):
    """Run the comparison and return the results as a JSON-ready dict.

    Parameters
    ----------
    shapes : list of str, optional
        Names of :data:`SHAPES` or custom ``"T,B,D,H"``; all five by default.
    impls : list of str, optional
        Among ``cython, numba, numpy, torch, jax``; every one that runs here by
        default. Naming one that does not run here is a ``ValueError``.
    dtype : float32 or float64
    threads : int
        Thread cap for BLAS, Numba and torch (see module docstring).
    quick : bool
        T of the named shapes divided by 5 (at least 20; see :func:`quick_shape`), 3 samples,
        at most about 1 s of samples per cell.
    repeats, budget_s : int, float, optional
        Samples per cell and the time budget per cell (defaults 7 and 10 s;
        3 and 2 s with ``quick``).
    check : bool
        Compare every implementation's gradients with the float64 reference.
    progress : callable(str), optional
        Called with a short line before each cell.

    Returns
    -------
    dict
        ``{"meta": ..., "skipped": {impl: reason}, "results": [cell, ...]}``;
        one cell per (shape, impl) with ``times_s``, ``best_s``, ``median_s``,
        ``steps_per_s``, ``gflops``, ``compile_s``, ``max_rel_err``, ...
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads: expected a positive int, got {threads!r}")
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

    results = []
    limits = _ThreadLimits(threads)
    thread_notes = dict(thread_notes, fastbptt=limits.describe())
    with limits:
        for name, shape in parsed:
            # --quick shortens the named shapes; a custom T,B,D,H runs as given
            run_shape = quick_shape(shape) if quick and name in SHAPES else shape
            T, B, D, H = run_shape
            params, X, Y = make_problem(run_shape, dtype)
            flops = step_flops(T, B, D, H)
            checks = []
            for impl in impls:
                if progress is not None:
                    progress(f"{name} {run_shape} {impl}")
                t0 = time.perf_counter()
                step, result = make_step(impl, params, X, Y)
                step()
                compile_s = time.perf_counter() - t0
                times = time_callable(step, repeats=repeats, budget_s=budget_s,
                                      min_sample_s=0.02 if quick else 0.05)
                cell = {
                    "shape": name, "T": T, "B": B, "D": D, "H": H, "O": OUTPUT_SIZE,
                    "impl": impl, "kind": "peer" if impl in PEERS else "fastbptt",
                    "dtype": str(dtype), "times_s": times,
                    "best_s": min(times), "median_s": float(np.median(times)),
                    "compile_s": compile_s,
                }
                cell["steps_per_s"] = 1.0 / cell["median_s"]
                cell["gflops"] = flops / cell["median_s"] / 1e9
                if check:
                    checks.append((cell, result()))
                results.append(cell)
                del step, result
            if check:   # the float64 reference runs after the timings, not between them
                ref_loss, ref = reference_grads(params, X, Y)
                for cell, (value, grads) in checks:
                    cell["max_rel_err"] = max_rel_err(grads, ref)
                    cell["loss_rel_err"] = abs(value - ref_loss) / max(abs(ref_loss), 1e-30)

    meta = machine_info()
    meta.update({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(dtype), "threads": threads, "thread_settings": thread_notes,
        "quick": bool(quick), "repeats": repeats, "budget_s": budget_s,
        "quick_note": (f"--quick: T of the named shapes divided by {QUICK_T_DIVISOR} (at least "
                       f"{QUICK_MIN_T}), {repeats} samples per cell" if quick else None),
        "backends_available": available_backends(),
        "step": "forward + full-BPTT gradient of all parameters, mse on every step, O=8",
    })
    return {"meta": meta, "skipped": skipped, "results": results}


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
    """The fastest fastbptt backend's cell (by median) among one shape's cells, or None."""
    ours = [c for c in cells.values() if c["kind"] == "fastbptt"]
    return min(ours, key=lambda c: c["median_s"]) if ours else None


def format_table(results):
    """The results as a plain-text table, one block per shape, with speed-ups and a summary."""
    order, cells = _by_shape(results)
    lines = []
    meta = results.get("meta", {})
    if meta.get("quick"):
        lines.append(f"QUICK RUN ({meta.get('quick_note')}): figures are indicative only.")
    lines.append(f"one training step = {meta.get('step', 'forward + BPTT')}; dtype {meta.get('dtype')}, "
                 f"{meta.get('threads')} threads; ms per step (median of samples, best in brackets)")
    if meta.get("thread_settings"):
        lines.append("threads: " + "; ".join(f"{k}: {v}" for k, v in meta["thread_settings"].items()))
    peers_here = [p for p in PEERS if any(p in c for c in cells.values())]
    ref_cols = ["numpy"] * any("numpy" in c for c in cells.values()) + peers_here
    header = (f"{'impl':<8} {'median ms':>10} {'best ms':>9} {'steps/s':>9} {'GFLOP/s':>8} "
              f"{'compile s':>9} {'rel err':>8}" + "".join(f" {'vs ' + r:>9}" for r in ref_cols))
    summary = []
    for name in order:
        row = cells[name]
        any_cell = next(iter(row.values()))
        lines.append("")
        lines.append(f"{name}: T={any_cell['T']}, B={any_cell['B']}, D={any_cell['D']}, "
                     f"H={any_cell['H']}, O={any_cell['O']}")
        lines.append(header)
        for impl, c in row.items():
            err = f"{c['max_rel_err']:.1e}" if "max_rel_err" in c else "-"
            ratios = "".join(
                f" {row[r]['median_s'] / c['median_s']:>8.2f}x" if r in row else f" {'-':>9}"
                for r in ref_cols)
            lines.append(f"{impl:<8} {c['median_s'] * 1e3:>10.3f} {c['best_s'] * 1e3:>9.3f} "
                         f"{c['steps_per_s']:>9.1f} {c['gflops']:>8.2f} {c['compile_s']:>9.3f} "
                         f"{err:>8}{ratios}")
        best = best_fastbptt(row)
        if best is not None:
            ups = [f"{r} {row[r]['median_s'] / best['median_s']:.2f}x" for r in ref_cols
                   if r in row and r != best["impl"]]
            summary.append(f"{name}: fastbptt best = {best['impl']} {best['median_s'] * 1e3:.3f} ms"
                           + (f"; speed-up over {', '.join(ups)}" if ups else ""))
    if summary:
        lines.append("")
        lines.append("summary (speed-up = other's median / fastbptt-best's median; > 1: fastbptt faster):")
        lines.extend("  " + s for s in summary)
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
                note = "" if (o["T"], o["B"], o["D"], o["H"]) == (c["T"], c["B"], c["D"], c["H"]) \
                    else "  (different T/B/D/H)"
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
    ax.set_xticklabels([f"{n}\nT={next(iter(cells[n].values()))['T']}" for n in order])
    ax.set_yscale("log")
    ax.set_ylabel("ms per training step (median, lower is better)")
    meta = results.get("meta", {})
    ax.set_title(f"fastbptt {meta.get('fastbptt', '')}: forward + BPTT, {meta.get('dtype')}, "
                 f"{meta.get('threads')} threads" + (" (quick)" if meta.get("quick") else ""))
    ax.legend()
    ax.grid(axis="y", which="both", alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)
