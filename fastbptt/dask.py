"""Data-parallel training on a Dask cluster: :class:`RNN`, the estimator plus a ``client``.

dask is imported here only (``pip install "fastbptt[dask]"``); ``import
fastbptt`` never imports it.

How a fit runs
--------------
The rows of ``X`` and ``Y`` are placed on the workers once per ``fit`` --
NumPy input is checked on the client and each worker's share is scattered to
it; a Dask array (chunked over samples) is persisted and each chunk is used
on the worker that holds it -- and a small actor on each worker holds its rows
(and, with ``stateful=True``, their hidden state). The client draws the same
permutations and mini-batches as :meth:`fastbptt.RNN.fit` with the same seed.
At every update point (a whole mini-batch with full BPTT, each chunk of k,
every k1 steps) each worker holding rows of the mini-batch runs the shared
online-TBPTT step (:func:`fastbptt.engine.training.point_grad`) on its rows
and returns its mean loss and gradient; the client sums them weighted by the
rows (so the result is the single-machine mean-loss gradient, up to summation
order), takes one optimizer step
(:func:`fastbptt.engine.training.apply_step`) and sends the new parameters
with the next request. Validation data is evaluated on the workers too.

Faults: a worker lost (or a task failing) mid-fit raises a ``RuntimeError``
naming the epoch and update step; the model holds the parameters of its last
completed optimizer step and its completed epochs, and can be saved and fit
again. With ``stateful=True`` the hidden state of a failed fit is not kept
(``state_`` stays as it was before the fit).
"""

import math
import time

import numpy as np

import dask.array as _da
from distributed import default_client, futures_of, get_worker, wait

from . import _validation as V
from ._progress import check_progress, make_progress
from ._threads import call_scope, set_num_threads
from .engine.core import ACT_CODES, is_artbp
from .engine.training import (Carry, apply_step, has_step, point_grad, point_weight, step_where,
                              update_points)
from .estimator import RNN as _LocalRNN

__all__ = ["RNN"]

# How long fit waits for a worker to come up (a LocalCluster starting, a nanny restarting one).
WORKER_WAIT = 60.0


def worker_addresses(client):
    """The sorted addresses of the cluster's workers, waiting up to ``WORKER_WAIT`` s for one.

    Asked of the scheduler directly: ``client.scheduler_info()`` falls back, without a word, to a cached
    summary that lists no workers when the scheduler is slow to answer.
    """
    workers = sorted(client.nthreads())
    if not workers:
        try:
            client.wait_for_workers(1, timeout=WORKER_WAIT)
        except TimeoutError:
            raise RuntimeError(f"client: the cluster has no workers (waited {WORKER_WAIT:g} s)") from None
        workers = sorted(client.nthreads())
    return workers


class _Shard:
    """The actor on one worker: its rows of the data (time-major, checked), their state, and the
    mini-batch in flight. Its methods run on the worker."""

    def __init__(self, config, parts, trusted, state, points):
        try:
            set_num_threads(max(1, int(get_worker().state.nthreads)))
        except Exception:       # pragma: no cover - not on a worker (tests may build it locally)
            pass
        self.model = _LocalRNN(**config)
        self.points = points
        kinds, Xs, Ys = [], [], []
        for lo, hi, X, Y in parts:
            if trusted:
                kind, Xt, Yt = X
            else:
                try:
                    kind, Xt, Yt = self.model._check_data(X, Y)[:3]
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"{exc} (in rows {lo}..{hi - 1} of the Dask arrays)") from None
            kinds.append(kind)
            Xs.append(Xt)
            Ys.append(Yt)
        self.kind = kinds[0]
        self.seq = self.model.output == "sequence"
        self.Xt = Xs[0] if len(Xs) == 1 else np.concatenate(Xs, axis=1)
        self.Yt = Ys[0] if len(Ys) == 1 else np.concatenate(Ys, axis=1 if self.seq else 0)
        self.state = state                      # (L·dirs, n, H) or None
        self.pending = None                     # (rows, h_T) of the last mini-batch, committed at the next
        self.batch = None
        self.template = self.model.params
        self.kernels = None

    def rows(self):
        return self.Xt.shape[1]

    def _params(self, flat):
        return self.template.unflatten(flat)

    def grad(self, flat, rows=None):
        """The next update point's ``(value, flat gradient, weight)`` on this worker's rows of the
        mini-batch; ``rows`` (local indices) start a new mini-batch."""
        params = self._params(flat)
        model = self.model
        with call_scope():
            if rows is not None:
                self._commit()
                Xb, Yb = model._batch_X(self.kind, self.Xt, rows), model._batch_Y(self.Yt, rows)
                T, b = Xb.shape[:2]
                if self.kernels is None or self.kernels[0] != b:
                    self.kernels = (b, model._kernels(T, b))
                h0s = (np.ascontiguousarray(self.state[:, rows]) if self.state is not None
                       else np.zeros((len(model.params.layers), b, model.hidden_size), dtype=model.dtype))
                self.batch = [rows, Xb, Yb, Carry(h0s, T, len(self.points)), 0]
            rows, Xb, Yb, carry, k = self.batch
            act = ACT_CODES[model.activation]
            while True:
                point = self.points[k]
                k += 1
                self.batch[4] = k
                got = point_grad(self.kernels[1], params, Xb, Yb, carry, point, loss=model.loss,
                                 output=model.output, act=act)
                if got is not None:
                    break
            if k == len(self.points) and self.state is not None:
                self.pending = (rows, carry.final(Xb.shape[0]))
            value, grads = got
            return float(value), grads.flatten(), point_weight(point, Xb.shape[1], model.output)

    def _commit(self):
        if self.pending is not None:
            rows, h = self.pending
            self.state[:, rows] = h
            self.pending = None

    def final_state(self):
        self._commit()
        return self.state

    def evaluate(self, flat):
        """``(loss · rows, rows)`` of this worker's rows from zero state."""
        model = self.model
        model.params = self._params(flat)
        model._checked = None
        kernels = model._kernels(self.Xt.shape[0], min(self.Xt.shape[1], 1024))
        value = model._evaluate(self.kind, self.Xt, self.Yt, None, kernels)
        return value * self.Xt.shape[1], self.Xt.shape[1]


class RNN(_LocalRNN):
    """:class:`fastbptt.RNN` trained data-parallel on a Dask cluster.

    Parameters
    ----------
    *args, **kwargs
        As :class:`fastbptt.RNN`.
    client : distributed.Client or None
        The cluster to train on; None takes the current client
        (``distributed.default_client()``) when ``fit`` runs.

    ``fit`` gives the same parameters and ``history_`` as :meth:`fastbptt.RNN.fit`
    with the same seed, up to the order of summation. ``predict``, ``evaluate``,
    ``save`` run on the client.
    """

    def __init__(self, input_size, hidden_size, output_size, *, client=None, **kwargs):
        super().__init__(input_size, hidden_size, output_size, **kwargs)
        self.client = client

    def get_params(self, deep=True):
        params = super().get_params(deep)
        params["client"] = self.client
        return params

    def set_params(self, **params):
        if "client" in params:
            self.client = params.pop("client")
        return super().set_params(**params)

    def _worker_config(self):
        """The configuration a worker's model is built with (a named optimizer: it takes no step)."""
        cfg = _LocalRNN.get_params(self)
        cfg.update(optimizer="sgd", lr=None, lr_schedule=None, seed=0)
        return cfg

    def _client(self):
        if self.client is not None:
            return self.client
        try:
            return default_client()
        except ValueError:
            raise ValueError("client: no Dask client given and none is running; start one "
                             "(distributed.Client(...)) or pass client=...") from None

    # ------------------------------------------------------------- placement
    def _place(self, client, X, Y, state, points, what=("X", "Y")):
        """Actors holding the rows of ``(X, Y)``: ``(actors, shard_of, local_of, N, T)``."""
        workers = worker_addresses(client)
        cfg = self._worker_config()
        if isinstance(X, _da.Array) or isinstance(Y, _da.Array):
            groups, N, T = self._dask_parts(client, X, Y, what)
            trusted = False
        else:
            kind, Xt, Yt = self._check_data(X, Y, *what)[:3]
            T, N = Xt.shape[:2]
            groups = {}
            for w, rows in zip(workers, np.array_split(np.arange(N), min(len(workers), N))):
                lo, hi = int(rows[0]), int(rows[-1]) + 1
                y = Yt[:, lo:hi] if self.output == "sequence" else Yt[lo:hi]
                part = client.scatter((kind, np.ascontiguousarray(Xt[:, lo:hi]), np.ascontiguousarray(y)),
                                      workers=[w], hash=False)
                groups[w] = [(lo, hi, part, None)]
            trusted = True
        shard_of = np.empty(N, dtype=np.int64)
        local_of = np.empty(N, dtype=np.int64)
        futures = []
        for i, (w, parts) in enumerate(groups.items()):
            pos = 0
            for lo, hi, _, _ in parts:
                shard_of[lo:hi] = i
                local_of[lo:hi] = np.arange(pos, pos + hi - lo)
                pos += hi - lo
            rows = np.concatenate([np.arange(lo, hi) for lo, hi, _, _ in parts])
            st = None if state is None else np.ascontiguousarray(state[:, rows])
            futures.append(client.submit(_Shard, cfg, parts, trusted, st, points, workers=[w],
                                         allow_other_workers=False, actor=True, pure=False))
        actors = [f.result() for f in futures]
        return actors, shard_of, local_of, N, T

    def _dask_parts(self, client, X, Y, what):
        """Check a Dask array's shape on the client; persist it and group its chunks by worker."""
        if not isinstance(X, _da.Array):
            X = _da.from_array(np.asarray(X), chunks=(max(1, len(X) // 2),) + (-1,) * (np.ndim(X) - 1))
        if any(math.isnan(c) for c in X.chunks[0]):
            raise ValueError(f"{what[0]}: a Dask array of unknown chunk sizes; call X.compute_chunk_sizes() first")
        if X.ndim not in (2, 3) or (X.ndim == 3 and X.shape[2] != self.input_size) or 0 in X.shape:
            raise ValueError(f"{what[0]}: expected shape (N, T, D) with D={self.input_size} (input_size), or "
                             f"integer token ids of shape (N, T), got shape {X.shape} and dtype {X.dtype}")
        N, T = X.shape[:2]
        X = X.rechunk((X.chunks[0],) + (-1,) * (X.ndim - 1))
        if not isinstance(Y, _da.Array):
            Y = np.asarray(Y)
            if Y.shape[:1] != (N,):
                raise ValueError(f"{what[1]}: expected {N} rows (as {what[0]}), got shape {Y.shape}")
            Y = _da.from_array(Y, chunks=(X.chunks[0],) + (-1,) * (Y.ndim - 1))
        if Y.shape[:1] != (N,):
            raise ValueError(f"{what[1]}: expected {N} rows (as {what[0]}), got shape {Y.shape}")
        Y = Y.rechunk((X.chunks[0],) + (-1,) * (Y.ndim - 1))
        Xp, Yp = client.persist([X, Y])
        wait([Xp, Yp])
        xf = sorted(futures_of(Xp), key=lambda f: f.key[1])
        yf = sorted(futures_of(Yp), key=lambda f: f.key[1])
        who = client.who_has(xf)
        groups, lo = {}, 0
        for c, n in enumerate(X.chunks[0]):
            w = sorted(who[xf[c].key])[0]
            groups.setdefault(w, []).append((lo, lo + n, xf[c], yf[c]))
            lo += n
        return groups, N, T

    # ------------------------------------------------------------------ fit
    def fit(self, X, Y, *, epochs=1, validation_data=None, shuffle=True, stateful=False, progress=None,
            callbacks=None):
        """Train data-parallel on the cluster; as :meth:`fastbptt.RNN.fit` (the same steps).

        ``X``, ``Y`` and ``validation_data`` may be NumPy or Dask arrays (chunked
        over samples, the first axis). Raises ``RuntimeError`` naming the epoch
        and update step when a worker is lost or a task fails; the model then
        holds its last completed optimizer step.
        """
        epochs = V.check_int("epochs", epochs)
        shuffle = V.check_bool("shuffle", shuffle)
        stateful = V.check_bool("stateful", stateful)
        check_progress(progress)
        callbacks = self._check_callbacks(callbacks)
        self._check_model()
        self._check_settings()
        if is_artbp(self.truncation):
            raise ValueError(f"truncation: fastbptt.dask.RNN does not take ARTBP yet (its cuts are drawn per "
                             f"mini-batch), got {self.truncation!r}; train it with fastbptt.RNN")
        if validation_data is not None and (not isinstance(validation_data, (tuple, list))
                                            or len(validation_data) != 2):
            raise TypeError("validation_data: expected a pair (X_val, Y_val), got "
                            f"{type(validation_data).__name__}")
        client = self._client()
        N = int(np.shape(X)[0]) if np.ndim(X) >= 1 else 0
        if stateful and self.state_ is not None and self._state_rows() != N:
            raise ValueError(f"X: stateful=True continues the {self._state_rows()} rows of the previous "
                             f"stateful fit, got N={N} rows; call reset_state() to start afresh")
        state = None
        if stateful:
            state = self._zero_state(N) if self.state_ is None else (
                self.state_[None] if self.state_.ndim == 2 else self.state_)
        T = int(np.shape(X)[1]) if np.ndim(X) >= 2 else 0
        points = update_points(T, self.truncation) if T else ()
        actors, shard_of, local_of, N, T = self._place(client, X, Y, state, points)
        val = None
        if validation_data is not None:
            val = self._place(client, *validation_data, None, points,
                              what=("validation_data[0]", "validation_data[1]"))[0]
        lr_at = self._lr_at()
        step_points = [p for p in points if has_step(p, T, self.output)]
        B = min(self.batch_size, N)

        # ---- everything is checked and placed: from here on the model changes
        hist = self.history_
        bar = make_progress(progress, epochs, N)
        where = ["before the first update"]
        try:
            for _ in range(epochs):
                epoch = len(hist["loss"]) + 1
                bar.start_epoch(epoch)
                t0 = time.perf_counter()
                order = self._rng.permutation(N) if shuffle else np.arange(N)
                loss_sum, weight, counter = 0.0, 0, 0
                for s in range(0, N, B):
                    idx = order[s:s + B]
                    owner = shard_of[idx]
                    parts = [(actors[i], local_of[idx[owner == i]]) for i in np.unique(owner)]
                    for k, point in enumerate(step_points):
                        counter += 1
                        where[0] = step_where(epoch, counter, point)
                        flat = self.params.flatten()
                        try:
                            futs = [a.grad(flat, rows if k == 0 else None) for a, rows in parts]
                            results = [f.result() for f in futs]
                        except Exception as exc:
                            raise RuntimeError(f"fastbptt.dask.RNN.fit: a worker failed at {where[0]} "
                                               f"({type(exc).__name__}: {exc}). The model holds the parameters "
                                               f"of its last completed update (optimizer step "
                                               f"{self.optimizer_.step_count}) and its completed epochs; it can "
                                               "be saved and fit again.") from exc
                        w_total = sum(r[2] for r in results)
                        value = sum(r[0] * (r[2] / w_total) for r in results)
                        g = results[0][1] * (results[0][2] / w_total)
                        for r in results[1:]:
                            g += r[1] * (r[2] / w_total)
                        apply_step(self.params, self.optimizer_, value, self.params.unflatten(g),
                                   clip_norm=self.clip_norm, lr_at=lr_at, where=where[0])
                        loss_sum += value * w_total
                        weight += w_total
                    bar.update(len(idx), loss=loss_sum / max(weight, 1))
                elapsed = time.perf_counter() - t0
                logs = {"epoch": epoch, "loss": loss_sum / weight if weight else float("nan"),
                        "seq_per_s": N / max(elapsed, 1e-12), "time_s": elapsed, "lr": self.optimizer_.lr,
                        "steps": self.optimizer_.step_count}
                if val is not None:
                    where[0] = f"epoch {epoch}, validation"
                    flat = self.params.flatten()
                    try:
                        got = [f.result() for f in [a.evaluate(flat) for a in val]]
                    except Exception as exc:
                        raise RuntimeError(f"fastbptt.dask.RNN.fit: a worker failed at {where[0]} "
                                           f"({type(exc).__name__}: {exc}). The model holds its last "
                                           "completed update; it can be saved and fit again.") from exc
                    logs["val_loss"] = sum(v for v, _ in got) / sum(n for _, n in got)
                if self._end_epoch(logs, lr_at, bar, callbacks):
                    break
            if stateful:
                try:
                    states = [f.result() for f in [a.final_state() for a in actors]]
                except Exception as exc:
                    raise RuntimeError(f"fastbptt.dask.RNN.fit: a worker failed after the last epoch, while "
                                       f"fetching the hidden state ({type(exc).__name__}: {exc}); the model "
                                       "holds its parameters and epochs, state_ is as before the fit") from exc
                new = np.empty_like(state)
                for i, st in enumerate(states):
                    new[:, shard_of == i] = st
                self.state_ = new[0] if len(self.params.layers) == 1 else new
        finally:
            bar.close()
            del actors, val
        return self
