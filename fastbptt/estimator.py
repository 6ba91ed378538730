"""The drop-in trainer: :class:`RNN`, a scikit-learn style estimator.

Data is samples first: ``X`` of shape (N, T, D) (or integer token ids of
shape (N, T), see below); targets by loss and output:

=====================  ======================  ===================
``loss``               ``output="sequence"``   ``output="last"``
=====================  ======================  ===================
``"mse"``, ``"bce"``   (N, T, O) floats        (N, O) floats
``"ce"``               (N, T) int class ids    (N,) int class ids
=====================  ======================  ===================

Index input: an *integer* ``X`` of shape (N, T) holds token ids in
``[0, input_size)``; each mini-batch is one-hot encoded on the fly (only
(T, batch_size, input_size) floats at a time), so a character model never
materialises the one-hot array of its whole dataset.

Training (``fit``)
------------------
Each epoch draws a permutation of the N sequences (``shuffle=True``) from
the model's own generator -- seeded by ``seed``, kept in the model, saved
and restored with it -- and cuts it into mini-batches of ``batch_size``.
Each mini-batch is transposed once to time-major (T, B, D) and trained:

* ``truncation=None`` (full BPTT): one optimizer step per mini-batch, on the
  mean loss of the whole mini-batch.
* ``truncation=k``: one step per chunk of k steps, in order: the forward of
  the chunk starts from the hidden state carried from the previous chunk
  (computed with the parameters of that time), the loss is the mean over the
  chunk's steps, and the gradient stays within the chunk.
* ``truncation=(k1, k2)`` (Williams & Peng): one step every k1 steps (and at
  T): the forward is re-run through the last k2 steps (never before step 1)
  from the hidden state stored at t-k2, the loss is the mean over the k1 steps
  since the previous update point, and backpropagation runs through all k2
  steps. The newly reached states are stored for later updates.

Every update's loss is normalised as torch's ``mean`` over the steps (and
batch rows, outputs) it covers. With ``output="last"`` and a truncation,
only the update point at T has a loss: the earlier update points make no
step (the forward still carries the state through them).

``history_["loss"]`` is the mean, over the epoch, of the losses of the
updates as they were computed (weighted by the steps they cover), like
Keras' running training loss; ``val_loss`` is the loss on
``validation_data`` after the epoch, from zero state, full sequences.

Training never silently diverges: a non-finite loss or gradient, or an
update that would make a parameter non-finite, raises ``FloatingPointError``
naming the epoch and update step; the parameters are then those of the last
good step. Bad input raises before anything is changed.
"""

import hashlib
import json
import os
import time

import numpy as np

from . import _validation as V
from . import optim as _optim
from ._io import atomic_write
from ._progress import make_progress
from .backends import BACKENDS, resolve_backend
from .engine.core import ACT_CODES
from .engine.losses import LOSS_FUNCS, LOSSES, predict_from_logits
from .engine.model import hidden_grad_norms
from .engine.stack import head_logits, stack_forward
from ._threads import call_scope
from .engine.training import train_batch
from .diagnostics import recurrent_spectrum
from .params import INITS, RNNParams

__all__ = ["RNN"]

_FORMAT = "fastbptt.RNN"
_FORMAT_VERSION = 1
_META_KEY = "__meta__"
_PREDICT_CHUNK = 1024


def _sha256(arr):
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


class RNN:
    """An Elman RNN trained by (truncated) BPTT, scikit-learn style.

    Parameters
    ----------
    input_size, hidden_size, output_size : int
        D, H and O.
    activation : {"tanh", "relu"}
    loss : {"mse", "bce", "ce"}
        With torch's ``mean`` reductions (``F.mse_loss``,
        ``F.binary_cross_entropy_with_logits``, ``F.cross_entropy``).
    output : {"sequence", "last"}
        A target per step, or one per sequence (many-to-one).
    optimizer : {"adam", "sgd", "rmsprop", "adagrad"} or fastbptt.optim.Optimizer
        A name, or an instance (then used, and updated, by this model).
    lr : float or None
        Learning rate for a named optimizer; None takes its default
        (1e-3 for Adam, 1e-2 for the others).
    truncation : None, int k >= 1 or (k1, k2)
        See the module docstring: an optimizer step at every update point.
    clip_norm : float > 0 or None
        Clip the global gradient norm before every step (as
        ``torch.nn.utils.clip_grad_norm_``).
    batch_size : int >= 1
    dtype : float32 or float64
    backend : {"auto", "cython", "numba", "numpy"}
        Resolved once per call of ``fit``/``predict``.
    seed : int >= 0 or None
        ``params`` are ``RNNParams.init(..., seed=seed)``; the shuffling
        generator is seeded from ``seed`` too.
    num_layers : int >= 1
    bidirectional : bool
        A bidirectional model takes ``truncation=None`` only.
    init : {"uniform", "identity", "orthogonal"}
        See :meth:`RNNParams.init`.

    Attributes
    ----------
    params : RNNParams
        The current parameters, updated in place by ``fit``.
    optimizer_ : fastbptt.optim.Optimizer
        The optimizer and its state.
    history_ : dict of lists
        Per epoch, over all ``fit`` calls: ``loss``, ``seq_per_s``, and
        ``val_loss`` once validation data was given (NaN for epochs without).
        With ``fit(..., diagnostics=True)`` also ``grad_norm_by_t`` (a list of
        T+1 norms ‖∂L/∂h_t‖, t = 0..T, per epoch), ``spectral_radius`` and
        ``max_singular_value`` of W_hh (NaN/None for epochs without).
    state_ : ndarray of shape (N, H), (L·dirs, N, H) for a stack, or None
        The hidden state carried between ``fit(..., stateful=True)`` calls.
    """

    def __init__(self, input_size, hidden_size, output_size, *, activation="tanh", loss="mse",
                 output="sequence", optimizer="adam", lr=None, truncation=None, clip_norm=None,
                 batch_size=32, dtype=np.float32, backend="auto", seed=None, num_layers=1,
                 bidirectional=False, init="uniform"):
        V.check_choice("activation", activation, V.ACTIVATIONS)
        V.check_choice("loss", loss, LOSSES)
        V.check_choice("output", output, V.OUTPUTS)
        bidirectional = V.check_bool("bidirectional", bidirectional)
        truncation = V.check_truncation(truncation, bidirectional)
        clip_norm = V.check_positive("clip_norm", clip_norm, allow_none=True)
        batch_size = V.check_int("batch_size", batch_size)
        V.check_choice("backend", backend, ("auto", *BACKENDS))
        seed = V.check_int("seed", seed, 0, allow_none=True)
        dt = V.check_dtype("dtype", dtype)
        V.check_choice("init", init, INITS)
        opt = _optim.get_optimizer(optimizer, lr)        # validates optimizer and lr
        params = RNNParams.init(input_size, hidden_size, output_size, num_layers=num_layers,
                                bidirectional=bidirectional, init=init, dtype=dt, seed=seed)

        self.input_size, self.hidden_size, self.output_size = int(input_size), int(hidden_size), int(output_size)
        self.activation, self.loss, self.output = activation, loss, output
        self.optimizer, self.lr = optimizer, lr
        self.truncation, self.clip_norm, self.batch_size = truncation, clip_norm, int(batch_size)
        self.dtype, self.backend, self.seed = dt, backend, seed
        self.num_layers, self.bidirectional, self.init = int(num_layers), bidirectional, init

        self.params = params
        self.optimizer_ = opt
        self._rng = np.random.default_rng(None if seed is None else [int(seed), 0x5EED])
        self.history_ = {"loss": [], "seq_per_s": []}
        self.state_ = None

    # ----------------------------------------------------------------- info
    def get_params(self):
        """The constructor's configuration, as a dict."""
        return {"input_size": self.input_size, "hidden_size": self.hidden_size,
                "output_size": self.output_size, "activation": self.activation, "loss": self.loss,
                "output": self.output, "optimizer": self.optimizer, "lr": self.lr,
                "truncation": self.truncation, "clip_norm": self.clip_norm,
                "batch_size": self.batch_size, "dtype": self.dtype, "backend": self.backend,
                "seed": self.seed, "num_layers": self.num_layers, "bidirectional": self.bidirectional,
                "init": self.init}

    def __repr__(self):
        cfg = self.get_params()
        cfg["dtype"] = self.dtype.name
        args = ", ".join(f"{k}={v!r}" for k, v in cfg.items())
        return f"RNN({args})"

    def reset_state(self):
        """Forget the hidden state carried by ``fit(..., stateful=True)``."""
        self.state_ = None

    # ``state_`` is (N, H) for one unidirectional layer, else (L·dirs, N, H); the engine takes (L·dirs, b, H)
    def _state_rows(self):
        return self.state_.shape[-2]

    def _user_state(self, h):
        return h[0] if len(self.params.layers) == 1 else h

    def _internal_state(self, idx):
        return self.state_[None, idx] if self.state_.ndim == 2 else self.state_[:, idx]

    def _set_state(self, idx, h):
        if self.state_.ndim == 2:
            self.state_[idx] = h[0]
        else:
            self.state_[:, idx] = h

    # ----------------------------------------------------------- data checks
    def _check_X(self, X, name="X"):
        """Samples-first X -> ``(kind, arr)``: ("dense", (T, N, D) float C-contiguous)
        or ("ids", (T, N) int64 C-contiguous)."""
        D = self.input_size
        try:
            arr = np.asarray(X)
        except Exception as exc:
            raise TypeError(f"{name}: expected an array of shape (N, T, D), got {type(X).__name__}") from exc
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name}: expected real numbers, got dtype {arr.dtype}")
        if arr.ndim == 2 and arr.dtype.kind in "iu":
            if 0 in arr.shape:
                raise ValueError(f"{name}: expected N >= 1 and T >= 1, got shape {arr.shape}")
            if arr.min() < 0 or arr.max() >= D:
                raise ValueError(f"{name}: integer (N, T) input holds token ids, expected values in "
                                 f"[0, {D}) (input_size={D}), got [{arr.min()}, {arr.max()}]")
            return "ids", np.ascontiguousarray(arr.T, dtype=np.int64)
        if arr.ndim != 3 or arr.shape[2] != D:
            raise ValueError(f"{name}: expected shape (N, T, D) with D={D} (input_size), or integer token "
                             f"ids of shape (N, T), got shape {arr.shape} and dtype {arr.dtype}")
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"{name}: expected N >= 1 and T >= 1, got shape {arr.shape}")
        X3 = np.array(np.swapaxes(arr, 0, 1), dtype=self.dtype, order="C", copy=True)
        if not np.all(np.isfinite(X3)):
            t, n, d = np.argwhere(~np.isfinite(X3))[0]
            raise ValueError(f"{name}: expected finite values, found {X3[t, n, d]} at index {(int(n), int(t), int(d))}")
        return "dense", X3

    def _check_Y(self, Y, T, N, name="Y"):
        """Samples-first targets -> time-major validated: (T, N, O)/(T, N) or (N, O)/(N,)."""
        O = self.output_size
        try:
            arr = np.asarray(Y)
        except Exception as exc:
            raise TypeError(f"{name}: expected an array, got {type(Y).__name__}") from exc
        seq = self.output == "sequence"
        expected = ((N, T) if seq else (N,)) + (() if self.loss == "ce" else (O,))
        if arr.shape != expected:
            what = "integer class ids" if self.loss == "ce" else "targets"
            raise ValueError(f"{name}: expected {what} of shape {expected} for loss={self.loss!r}, "
                             f"output={self.output!r} (N={N}, T={T}, O={O}), got shape {arr.shape}")
        if seq:
            arr = np.swapaxes(arr, 0, 1)
        try:
            return V.check_Y(arr, self.params, T, N, False, self.loss, self.output)
        except (TypeError, ValueError) as exc:
            msg = str(exc)
            raise type(exc)(name + msg[1:] if msg.startswith("Y") else msg) from None

    def _batch_X(self, kind, Xt, idx):
        """(T, b, D) float C-contiguous mini-batch of the rows ``idx``."""
        if kind == "dense":
            return Xt[:, idx]                     # fancy index: a C-contiguous copy
        ids = Xt[:, idx]
        out = np.zeros(ids.shape + (self.input_size,), dtype=self.dtype)
        np.put_along_axis(out, ids[..., None], 1, axis=-1)
        return out

    def _batch_Y(self, Yt, idx):
        return Yt[:, idx] if self.output == "sequence" else Yt[idx]

    def _check_data(self, X, Y, xname="X", yname="Y"):
        kind, Xt = self._check_X(X, xname)
        T, N = Xt.shape[:2]
        Yt = self._check_Y(Y, T, N, yname)
        return kind, Xt, Yt

    # ------------------------------------------------------------- predict
    def _kernels(self, T, B):
        return resolve_backend(self.backend, T=T, B=B, H=self.hidden_size, dtype=self.dtype)

    def _forward_chunks(self, kind, Xt, kernels):
        """Yield ``(rows, logits)`` for chunks of rows, from zero state: (T, b, O) or (b, O) by ``output``."""
        N = Xt.shape[1]
        act = ACT_CODES[self.activation]
        for s in range(0, N, _PREDICT_CHUNK):
            idx = np.arange(s, min(s + _PREDICT_CHUNK, N))
            Xb = self._batch_X(kind, Xt, idx)
            fwd = stack_forward(kernels, self.params, Xb, self._zero_state(len(idx)), act)
            rows = fwd.out[1:] if self.output == "sequence" else fwd.last_output()
            yield idx, head_logits(self.params, rows, kernels)

    def _zero_state(self, b):
        return np.zeros((len(self.params.layers), b, self.hidden_size), dtype=self.dtype)

    def hidden_grad_norms(self, X, Y):
        """‖∂L/∂h_t‖ for t = 0..T under full BPTT, from zero state (see :mod:`fastbptt.diagnostics`).

        Parameters
        ----------
        X, Y : array_like, samples first, as for ``fit``

        Returns
        -------
        ndarray of shape (T + 1,)
        """
        if len(self.params.layers) != 1:
            raise ValueError("hidden_grad_norms: expected a one-layer unidirectional model, got "
                             f"num_layers={self.num_layers}, bidirectional={self.bidirectional}")
        kind, Xt, Yt = self._check_data(X, Y)
        Xb = self._batch_X(kind, Xt, np.arange(Xt.shape[1]))
        kernels = self._kernels(Xb.shape[0], Xb.shape[1])
        with call_scope():
            return hidden_grad_norms(kernels, self.params, Xb, Yt, None, self.loss, self.output,
                                     ACT_CODES[self.activation])

    def predict(self, X):
        """Outputs from a zero initial state (logits for mse, probabilities for bce/ce).

        Parameters
        ----------
        X : array_like of shape (N, T, D), or integer token ids (N, T)

        Returns
        -------
        ndarray of shape (N, T, O) (``output="sequence"``) or (N, O) (``"last"``)
        """
        kind, Xt = self._check_X(X)
        T, N = Xt.shape[:2]
        kernels = self._kernels(T, min(N, _PREDICT_CHUNK))
        seq = self.output == "sequence"
        out = np.empty((N, T, self.output_size) if seq else (N, self.output_size), dtype=self.dtype)
        with call_scope():
            for idx, o in self._forward_chunks(kind, Xt, kernels):
                out[idx] = np.swapaxes(o, 0, 1) if seq else o
        return predict_from_logits(out, self.loss)

    def _evaluate(self, kind, Xt, Yt, kernels):
        total, weight = 0.0, 0
        with call_scope():
            for idx, o in self._forward_chunks(kind, Xt, kernels):
                value, _ = LOSS_FUNCS[self.loss](o, Yt[:, idx] if self.output == "sequence" else Yt[idx])
                total += value * len(idx)
                weight += len(idx)
        return total / weight

    def evaluate(self, X, Y):
        """The mean loss on ``(X, Y)`` from a zero initial state (torch's ``mean`` reduction).

        Parameters
        ----------
        X : array_like of shape (N, T, D), or integer token ids (N, T)
        Y : array_like, targets as for ``fit``

        Returns
        -------
        float
        """
        kind, Xt, Yt = self._check_data(X, Y)
        return self._evaluate(kind, Xt, Yt, self._kernels(Xt.shape[0], min(Xt.shape[1], _PREDICT_CHUNK)))

    # ------------------------------------------------------------------ fit
    def fit(self, X, Y, *, epochs=1, validation_data=None, shuffle=True, stateful=False, progress=None,
            diagnostics=False):
        """Train, continuing from the current parameters and optimizer state.

        Parameters
        ----------
        X : array_like of shape (N, T, D), or integer token ids of shape (N, T)
            Samples first. Integer ids are one-hot encoded per mini-batch.
        Y : array_like
            (N, T, O) / (N, O) floats for mse/bce, (N, T) / (N,) class ids for
            ce, by ``output``.
        epochs : int >= 1
        validation_data : (X_val, Y_val) or None
            Evaluated after every epoch into ``history_["val_loss"]``.
        shuffle : bool
            Shuffle the rows every epoch with the model's own generator.
        stateful : bool
            Row n starts from the hidden state in which row n of the previous
            stateful epoch (of this or an earlier call) ended, kept in
            ``state_`` (N, H); ``reset_state()`` forgets it. Use it for a long
            stream laid out as N parallel rows cut into windows (see
            :func:`fastbptt.datasets.stream_windows`), typically one epoch per
            window. Otherwise every sequence starts from zeros.
        progress : bool or None
            Show a progress bar (tqdm if installed); None: only when stderr is
            a terminal.
        diagnostics : bool
            After every epoch, record in ``history_`` the norms ‖∂L/∂h_t‖ over
            t (on the first ``batch_size`` rows, zero state, full BPTT; see
            :func:`fastbptt.diagnostics.hidden_grad_norms`), and the spectral
            radius and largest singular value of W_hh.

        Returns
        -------
        self

        Raises
        ------
        ValueError, TypeError
            On bad input, before anything is changed.
        FloatingPointError
            When training diverges (see the module docstring).
        """
        epochs = V.check_int("epochs", epochs)
        shuffle = V.check_bool("shuffle", shuffle)
        stateful = V.check_bool("stateful", stateful)
        diagnostics = V.check_bool("diagnostics", diagnostics)
        if progress is not None:
            V.check_bool("progress", progress)
        kind, Xt, Yt = self._check_data(X, Y)
        T, N = Xt.shape[:2]
        val = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
                raise TypeError("validation_data: expected a pair (X_val, Y_val), got "
                                f"{type(validation_data).__name__}")
            val = self._check_data(*validation_data, xname="validation_data[0]", yname="validation_data[1]")
        if stateful and self.state_ is not None and self._state_rows() != N:
            raise ValueError(f"X: stateful=True continues the {self._state_rows()} rows of the previous "
                             f"stateful fit, got N={N} rows; call reset_state() to start afresh")
        B = min(self.batch_size, N)
        kernels = self._kernels(T, B)
        val_kernels = None if val is None else self._kernels(val[1].shape[0], min(val[1].shape[1], _PREDICT_CHUNK))
        act = ACT_CODES[self.activation]
        if diagnostics:
            if len(self.params.layers) != 1:
                raise ValueError("diagnostics: expected a one-layer unidirectional model (the norms are "
                                 f"those of its hidden state), got num_layers={self.num_layers}, "
                                 f"bidirectional={self.bidirectional}")
            d_idx = np.arange(B)
            d_X, d_Y = self._batch_X(kind, Xt, d_idx), self._batch_Y(Yt, d_idx)

        # ---- everything is checked: from here on the model changes
        if stateful and self.state_ is None:
            self.state_ = self._user_state(self._zero_state(N))
        hist = self.history_
        with call_scope():
            bar = make_progress(progress, epochs * N, "fit")
            try:
                for _ in range(epochs):
                    epoch = len(hist["loss"]) + 1
                    t0 = time.perf_counter()
                    order = self._rng.permutation(N) if shuffle else np.arange(N)
                    loss_sum, weight, counter = 0.0, 0, [0]
                    for s in range(0, N, B):
                        idx = order[s:s + B]
                        Xb, Yb = self._batch_X(kind, Xt, idx), self._batch_Y(Yt, idx)
                        h0s = self._internal_state(idx) if stateful else self._zero_state(len(idx))
                        h_T, ls, w = train_batch(kernels, self.params, self.optimizer_, Xb, Yb, h0s,
                                                 loss=self.loss, output=self.output, act=act,
                                                 truncation=self.truncation, clip_norm=self.clip_norm,
                                                 epoch=epoch, counter=counter)
                        if stateful:
                            self._set_state(idx, h_T)
                        loss_sum += ls
                        weight += w
                        elapsed = time.perf_counter() - t0
                        bar.update(len(idx), loss=loss_sum / max(weight, 1),
                                   seq_per_s=(s + len(idx)) / max(elapsed, 1e-12))
                    elapsed = time.perf_counter() - t0
                    hist["loss"].append(loss_sum / weight if weight else float("nan"))
                    hist["seq_per_s"].append(N / max(elapsed, 1e-12))
                    n_before = len(hist["loss"]) - 1
                    if val is not None or "val_loss" in hist:
                        vl = hist.setdefault("val_loss", [float("nan")] * n_before)
                        vl.append(float("nan") if val is None else self._evaluate(*val, val_kernels))
                    if diagnostics or "spectral_radius" in hist:
                        for key in ("grad_norm_by_t", "spectral_radius", "max_singular_value"):
                            hist.setdefault(key, [None if key == "grad_norm_by_t" else float("nan")] * n_before)
                        if diagnostics:
                            norms = hidden_grad_norms(kernels, self.params, d_X, d_Y, None, self.loss,
                                                      self.output, act)
                            spec = recurrent_spectrum(self.params.W_hh)
                            hist["grad_norm_by_t"].append([float(v) for v in norms])
                            hist["spectral_radius"].append(spec["spectral_radius"])
                            hist["max_singular_value"].append(spec["max_singular_value"])
                        else:
                            hist["grad_norm_by_t"].append(None)
                            hist["spectral_radius"].append(float("nan"))
                            hist["max_singular_value"].append(float("nan"))
            finally:
                bar.close()
        return self

    # ------------------------------------------------------------ save/load
    def save(self, path):
        """Write the model to ``path`` atomically (a temporary file, then a rename).

        The file is an ``.npz`` archive (no pickled objects): the arrays
        (parameters, optimizer buffers, stateful hidden state) and one JSON
        entry with the configuration, optimizer hyperparameters and step
        count, the shuffling generator's state, ``history_`` and a SHA-256
        checksum of every array. ``path`` is used as given (no suffix added).
        """
        path = os.fspath(path)
        cfg = self.get_params()
        cfg["dtype"] = self.dtype.name
        cfg["optimizer"] = self.optimizer if isinstance(self.optimizer, str) else None
        opt_state = self.optimizer_.state_dict()
        arrays = {f"params/{n}": a for n, a in self.params.items()}
        for bname, buf in opt_state["buffers"].items():
            for n, a in buf.items():
                arrays[f"optim/{bname}/{n}"] = a
        if self.state_ is not None:
            arrays["state"] = self.state_
        meta = {
            "format": _FORMAT, "version": _FORMAT_VERSION, "config": cfg,
            "optimizer": {"name": opt_state["name"], "hyperparams": opt_state["hyperparams"],
                          "step": opt_state["step"],
                          "buffers": {b: sorted(buf) for b, buf in opt_state["buffers"].items()}},
            "rng_state": self._rng.bit_generator.state,
            "history": self.history_,
            "checksums": {k: _sha256(a) for k, a in arrays.items()},
        }
        arrays[_META_KEY] = np.array(json.dumps(meta))
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path):
        """Read a model written by :meth:`save`; a resumed ``fit`` continues exactly.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the file is not a valid model file: not an npz archive, corrupt
            (checksums), of another format version, or with arrays that do not
            match its configuration.
        """
        path = os.fspath(path)

        def bad(why):
            return ValueError(f"RNN.load: {path!r} is not a valid fastbptt RNN file: {why}")

        if not os.path.exists(path):
            raise FileNotFoundError(f"RNN.load: no such file: {path!r}")
        try:
            with np.load(path, allow_pickle=False) as z:
                files = {k: z[k] for k in z.files}
        except Exception as exc:
            raise bad(f"cannot read it as an npz archive ({type(exc).__name__}: {exc})") from None
        if _META_KEY not in files:
            raise bad(f"no {_META_KEY!r} entry")
        try:
            meta = json.loads(str(files.pop(_META_KEY)))
        except (ValueError, TypeError) as exc:
            raise bad(f"the {_META_KEY!r} entry is not valid JSON ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise bad(f"format is {meta.get('format') if isinstance(meta, dict) else None!r}, expected {_FORMAT!r}")
        if meta.get("version") != _FORMAT_VERSION:
            raise bad(f"format version {meta.get('version')!r}, this fastbptt reads version {_FORMAT_VERSION}")
        for key in ("config", "optimizer", "rng_state", "history", "checksums"):
            if key not in meta:
                raise bad(f"missing {key!r}")
        checks = meta["checksums"]
        if not isinstance(checks, dict) or set(checks) != set(files):
            raise bad(f"the arrays {sorted(files)} do not match the recorded list "
                      f"{sorted(checks) if isinstance(checks, dict) else checks!r}")
        for k, a in files.items():
            if _sha256(a) != checks[k]:
                raise bad(f"array {k!r} fails its checksum (corrupt file)")

        cfg = meta["config"]
        try:
            cfg = dict(cfg)
            cfg["truncation"] = tuple(cfg["truncation"]) if isinstance(cfg["truncation"], list) else cfg["truncation"]
            ostate = meta["optimizer"]
            buffers = {b: {n: files[f"optim/{b}/{n}"] for n in names}
                       for b, names in ostate["buffers"].items()}
            opt = _optim.from_state_dict({"name": ostate["name"], "hyperparams": ostate["hyperparams"],
                                          "step": ostate["step"], "buffers": buffers})
            name = cfg.pop("optimizer")
            lr = cfg.pop("lr")
            if name is not None and name.lower() == opt.name:
                model = cls(**cfg, optimizer=name, lr=lr)
                model.optimizer_ = opt
            else:
                model = cls(**cfg, optimizer=opt)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise bad(f"bad configuration or optimizer state ({type(exc).__name__}: {exc})") from None

        try:
            params = model.params._like([files[f"params/{n}"] for n in model.params.names()])
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"bad parameters ({type(exc).__name__}: {exc})") from None
        for (n, a), (_, ref) in zip(params.items(), model.params.items()):
            if a.shape != ref.shape or a.dtype != ref.dtype:
                raise bad(f"params/{n} has shape {a.shape} and dtype {a.dtype}, the configuration "
                          f"implies {ref.shape} and {ref.dtype}")
            if not np.all(np.isfinite(a)):
                raise bad(f"params/{n} holds non-finite values")
        for b, buf in opt.state_dict()["buffers"].items():
            named = dict(params.items())
            for n, a in buf.items():
                ref = named.get(n)
                if ref is None:
                    raise bad(f"optimizer buffer {b}/{n} names no parameter of this model")
                if a.shape != ref.shape or a.dtype != ref.dtype:
                    raise bad(f"optimizer buffer {b}/{n} has shape {a.shape}, dtype {a.dtype}; "
                              f"params/{n} has {ref.shape}, {ref.dtype}")
        state = files.get("state")
        n_states = len(model.params.layers)
        lead = (n_states,) if n_states > 1 else ()
        if state is not None and (state.ndim != len(lead) + 2 or state.shape[:len(lead)] != lead
                                  or state.shape[-1] != model.hidden_size
                                  or state.dtype != model.dtype or not np.all(np.isfinite(state))):
            raise bad(f"state has shape {state.shape} and dtype {state.dtype}, expected {lead + ('N', model.hidden_size)} "
                      f"finite {model.dtype}")
        try:
            model._rng.bit_generator.state = meta["rng_state"]
        except (TypeError, ValueError, KeyError) as exc:
            raise bad(f"bad random state ({exc})") from None
        hist = meta["history"]
        if (not isinstance(hist, dict) or not all(isinstance(v, list) for v in hist.values())
                or "loss" not in hist or len({len(v) for v in hist.values()}) > 1):
            raise bad("bad history")
        model.params = params.copy()
        model.state_ = None if state is None else np.array(state, copy=True, order="C")
        model.history_ = hist
        return model
