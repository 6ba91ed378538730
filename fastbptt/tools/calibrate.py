"""Measure which compiled backend is fastest per shape; write the table "auto" reads.

Run ``python -m fastbptt.tools.calibrate`` (or ``fastbptt calibrate``) on a quiet
machine: it times one training step (forward + full BPTT, ``loss_and_grad``)
of every compiled backend on a grid of batch sizes B and hidden sizes H, for
both dtypes, best of repeats taken in turn for at least a second per cell, and writes the winner per grid point to
``fastbptt/data/calibration.json`` (atomically). The dispatcher maps a shape
to the nearest grid point (in log B, log H). T and D barely matter for the
choice: the per-step cost is what differs between backends.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from .._io import write_json
from ..backends import DEFAULT_PATH

GRID_B = (1, 4, 16, 64, 256)
GRID_H = (8, 32, 64, 128, 256, 512, 1024)


def _time_steps(backends, params, X, Y, min_repeats, min_seconds):
    """Best time of one step per backend, the backends timed in turn (drift hits all alike)."""
    from .. import loss_and_grad
    for b in backends:
        loss_and_grad(params, X, Y, backend=b)              # warm (JIT, caches)
    best = dict.fromkeys(backends, np.inf)
    start, n = time.perf_counter(), 0
    while n < min_repeats or time.perf_counter() - start < min_seconds:
        for b in backends:
            t0 = time.perf_counter()
            loss_and_grad(params, X, Y, backend=b)
            best[b] = min(best[b], time.perf_counter() - t0)
        n += 1
    return best


def calibrate(backends=("cython", "numba"), grid_B=GRID_B, grid_H=GRID_H, T=64, D=16, O=8,
              repeats=5, min_seconds=1.0, log=print):
    """Time every backend on the grid; return the table as a JSON-able dict."""
    from .. import RNNParams
    table = {"grid_B": list(grid_B), "grid_H": list(grid_H), "T": T, "D": D, "O": O,
             "backends": list(backends), "winner": {}, "seconds": {},
             "machine": {"cpus": os.cpu_count(), "numpy": np.__version__}}
    for dtype in (np.float32, np.float64):
        name = np.dtype(dtype).name
        table["winner"][name], table["seconds"][name] = [], []
        for B in grid_B:
            row_w, row_s = [], []
            for H in grid_H:
                rng = np.random.default_rng(0)
                params = RNNParams.init(D, H, O, dtype=dtype, seed=rng)
                X = rng.normal(size=(T, B, D)).astype(dtype)
                Y = rng.normal(size=(T, B, O)).astype(dtype)
                times = _time_steps(backends, params, X, Y, repeats, min_seconds)
                win = min(times, key=times.get)
                row_w.append(win)
                row_s.append({b: round(t, 7) for b, t in times.items()})
                log(f"{name} B={B:4d} H={H:5d}  " + "  ".join(f"{b} {t * 1e3:8.3f} ms" for b, t in times.items())
                    + f"  -> {win}")
            table["winner"][name].append(row_w)
            table["seconds"][name].append(row_s)
    return table


def write_table(table, path=DEFAULT_PATH):
    """Write ``table`` to ``path`` atomically (temporary file + rename)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(table, path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastbptt.tools.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_PATH), help="where to write the table (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="least timed repeats per cell, best kept (default: 5)")
    parser.add_argument("--seconds", type=float, default=1.0, help="least time per cell (default: 1.0)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: expected an int >= 1, got {args.repeats}")
    from .. import available_backends
    compiled = [b for b in available_backends() if b != "numpy"]
    if len(compiled) < 2:
        print(f"fastbptt: error: calibration needs two compiled backends, have {compiled}", file=sys.stderr)
        return 2
    write_table(calibrate(tuple(compiled), repeats=args.repeats, min_seconds=args.seconds), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
