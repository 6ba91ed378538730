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
* ``truncation=("artbp", c)`` (ARTBP, Tallec & Ollivier 2017): every
  mini-batch draws its own cuts -- each step boundary with probability c --
  from the model's generator; each window between cuts is one step, as a
  chunk of ``k``, and its gradient is multiplied by 1/(1-c) at every boundary
  it crosses, so that it is unbiased for that window's full-BPTT gradient
  (:func:`fastbptt.loss_and_grad`'s ``("artbp", c, seed)`` with the same cuts).

Every update's loss is normalised as torch's ``mean`` over the steps (and
batch rows, outputs) it covers. With ``output="last"`` and a truncation,
only the update point at T has a loss: the earlier update points make no
step (the forward still carries the state through them).

``history_["loss"]`` is the mean, over the epoch, of the losses of the
updates as they were computed (weighted by the steps they cover), like
Keras' running training loss; ``val_loss`` is the loss on
``validation_data`` after the epoch, from zero state, full sequences.

Watching training
-----------------
``progress`` shows a bar while an epoch runs (epoch, %, rate, ETA, running
loss) and one line per epoch when it ends. ``callbacks`` are called after
every epoch as ``cb(model, logs)``; one that returns ``False`` stops the
training after that epoch. ``validation_every=n`` also evaluates the
validation data every n optimizer steps (long streams), into
``history_["val_steps"]``. ``lr_schedule`` sets the learning rate before
every optimizer step (see :mod:`fastbptt.optim`).

Interrupts and failures
-----------------------
Training never silently diverges: a non-finite loss or gradient, or an
update that would make a parameter non-finite, raises ``FloatingPointError``
naming the epoch and update step; the parameters are then those of the last
good step. Bad input raises before anything is changed.

An exception at any moment -- a ``KeyboardInterrupt`` included -- leaves
the model consistent: every optimizer step happened entirely or not at all
(the parameters are those of the last completed update point, and the
optimizer's step count matches them), ``history_`` holds the completed
epochs only, every list the same length, and the model can be saved,
loaded and fit again. ``fit`` adds a note saying where it stopped to the
``KeyboardInterrupt`` it lets through. ``save`` writes a temporary file and
renames it: the old file or the whole new one, never half of one.
"""

import hashlib
import json
import math
import numbers
import os
import stat
import sys
import time
import warnings
import zipfile

import numpy as np

from . import _validation as V
from . import optim as _optim
from ._io import atomic_write
from ._progress import check_progress, make_progress
from ._threads import call_scope
from .backends import BACKENDS, dispatch, resolve_backend
from .diagnostics import recurrent_spectrum
from .engine.core import ACT_CODES, is_artbp
from .engine.lengths import packing
from .engine.losses import LOSS_FUNCS, LOSSES, predict_from_logits
from .engine.model import hidden_grad_norms
from .engine.stack import head_logits, stack_forward
from .engine.training import batch_truncation, train_batch, update_points
from .params import INITS, RNNParams

__all__ = ["RNN"]

_FORMAT = "fastbptt.RNN"
_FORMAT_VERSION = 1
_META_KEY = "__meta__"
_META_MAX_BYTES = 64 << 20
_PREDICT_CHUNK = 1024

# history_ keys other than "loss", and the value an epoch that did not record them holds
_MISSING = {"seq_per_s": float("nan"), "val_loss": float("nan"), "lr": float("nan"),
            "grad_norm_by_t": None, "spectral_radius": float("nan"), "max_singular_value": float("nan"),
            "val_steps": ()}


def _missing(key):
    value = _MISSING.get(key, float("nan"))
    return [] if value == () else value


def _is_ragged(X):
    """A list (or tuple) of sequences of different lengths."""
    if not isinstance(X, (list, tuple)) or not X:
        return False
    try:
        return len({np.shape(x)[0] for x in X}) > 1
    except (IndexError, TypeError, ValueError):
        return False


def _pad_ragged(seqs, name, T=None):
    """A list of N sequences (T_i, ...) -> ``(padded (N, T, ...) zeros after each, lengths (N,))``."""
    arrs = [np.asarray(a) for a in seqs]
    tail = arrs[0].shape[1:]
    for i, a in enumerate(arrs):
        if a.ndim < 1 or a.shape[1:] != tail or a.shape[0] < 1 or a.dtype.kind not in "biuf":
            raise ValueError(f"{name}: expected a list of sequences of shape (T_i, {', '.join(map(str, tail))}) "
                             f"with T_i >= 1, of real numbers; item {i} has shape {a.shape} and dtype {a.dtype}")
    lengths = np.array([a.shape[0] for a in arrs], dtype=np.int64)
    out = np.zeros((len(arrs), max(T or 0, int(lengths.max()))) + tail, dtype=np.result_type(*arrs))
    for i, a in enumerate(arrs):
        out[i, :len(a)] = a
    return out, lengths


def _sha256(arr):
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _align_history(hist):
    """Cut every list of ``hist`` to the length of ``hist["loss"]`` (the epochs committed)."""
    n = len(hist["loss"])
    for values in hist.values():
        if len(values) > n:
            del values[n:]


def _append_epoch(hist, record):
    """Append one epoch's figures to ``history_``: all of them or none.

    ``loss`` is appended last: its length is the number of committed epochs,
    and an interruption before it is undone by cutting every list back to it
    (cutting is repeatable: a later call finishes an interrupted one).
    """
    n = len(hist["loss"])
    try:
        for key in hist.keys() | record.keys():
            if key != "loss":
                values = hist.get(key)
                if values is None:
                    values = hist.setdefault(key, [_missing(key) for _ in range(n)])
                values.append(record[key] if key in record else _missing(key))
        hist["loss"].append(record["loss"])
    except BaseException:
        _align_history(hist)
        raise


def _note(exc, text):
    """Attach ``text`` to an exception that is let through (a note in its traceback)."""
    if hasattr(exc, "add_note"):
        exc.add_note(text)
    else:   # pragma: no cover - Python 3.10
        print(text, file=sys.stderr)


def _check_schedule(lr_schedule):
    if lr_schedule is not None and not callable(lr_schedule):
        raise TypeError("lr_schedule: expected None, a fastbptt.optim schedule (StepDecay, CosineDecay, Warmup) "
                        f"or a callable step -> factor, got {lr_schedule!r}")
    return lr_schedule


def _check_config(input_size, hidden_size, output_size, activation, loss, output, optimizer, lr, truncation,
                  clip_norm, batch_size, dtype, backend, seed, num_layers, bidirectional, init, lr_schedule):
    """The constructor's arguments checked and normalised, and the optimizer they name: ``(cfg, opt)``.

    Allocates nothing that depends on the sizes (``load`` checks a file's
    configuration with it before it reads any array)."""
    cfg = {"input_size": V.check_int("input_size", input_size),
           "hidden_size": V.check_int("hidden_size", hidden_size),
           "output_size": V.check_int("output_size", output_size),
           "activation": V.check_choice("activation", activation, V.ACTIVATIONS),
           "loss": V.check_choice("loss", loss, LOSSES),
           "output": V.check_choice("output", output, V.OUTPUTS)}
    bidirectional = V.check_bool("bidirectional", bidirectional)
    cfg.update(truncation=V.check_truncation(truncation, bidirectional, allow_artbp="trainer"),
               clip_norm=V.check_positive("clip_norm", clip_norm, allow_none=True),
               batch_size=V.check_int("batch_size", batch_size),
               dtype=V.check_dtype("dtype", dtype),
               backend=V.check_choice("backend", backend, ("auto", *BACKENDS)),
               seed=V.check_int("seed", seed, 0, allow_none=True),
               num_layers=V.check_int("num_layers", num_layers),
               bidirectional=bidirectional,
               init=V.check_choice("init", init, INITS),
               lr_schedule=_check_schedule(lr_schedule))
    opt = _optim.get_optimizer(optimizer, lr)        # validates optimizer and lr
    cfg.update(optimizer=optimizer, lr=lr)
    return cfg, opt


_CONFIG_NAMES = ("input_size", "hidden_size", "output_size", "activation", "loss", "output", "optimizer", "lr",
                 "truncation", "clip_norm", "batch_size", "dtype", "backend", "seed", "num_layers", "bidirectional",
                 "init", "lr_schedule")


def _same(a, b):
    """Whether two constructor arguments are the same setting (``==``, False when not comparable)."""
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return False


def _param_shapes(cfg):
    """``[(name, shape)]`` of the parameters a configuration implies, in canonical order."""
    D, H, O, L = cfg["input_size"], cfg["hidden_size"], cfg["output_size"], cfg["num_layers"]
    dirs = 2 if cfg["bidirectional"] else 1
    shapes = []
    for i in range(L * dirs):
        shapes += [(H, D if i < dirs else dirs * H), (H, H), (H,)]
    shapes += [(O, dirs * H), (O,)]
    names = RNNParams.init(1, 1, 1, num_layers=L, bidirectional=cfg["bidirectional"]).names()
    return list(zip(names, shapes))


def _on_one_buffer(params):
    """``params`` copied into one contiguous buffer, each array a view of its slice (canonical
    order): an optimizer step then reads and writes all of them at once (see fastbptt.optim)."""
    flat = params.flatten()
    views, pos = [], 0
    for a in params.arrays():
        views.append(flat[pos:pos + a.size].reshape(a.shape))
        pos += a.size
    return params._like(views)


def _open_regular(path, what):
    """A binary file object of the regular file ``path`` (never blocks on a FIFO or a device)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: no such file: {path!r}") from None
    except IsADirectoryError:
        raise ValueError(f"{what}: {path!r} is a directory, expected a model file") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
            raise ValueError(f"{what}: {path!r} is {kind}, expected a model file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _npy_header(zf, member):
    """``(shape, dtype)`` from the header of an .npy member of a zip file, reading nothing else."""
    with zf.open(member) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    return tuple(shape), np.dtype(dtype)


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
    truncation : None, int k >= 1, (k1, k2) or ("artbp", c)
        See the module docstring: an optimizer step at every update point. A
        k (or k2) longer than the sequences is the same as None. ARTBP's cuts
        are drawn per mini-batch from the model's generator (no seed here).
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
        See :meth:`RNNParams.init`: torch's U(-1/√H, 1/√H), IRNN (W_hh = I,
        b_h = 0), or a random orthogonal W_hh (b_h = 0).
    lr_schedule : None, fastbptt.optim schedule or callable
        ``factor(step)``: before every optimizer step the learning rate is set
        to the base learning rate (``lr``, or the optimizer instance's at
        construction) times ``lr_schedule(step_count)``, ``step_count`` the
        steps taken so far -- e.g. ``optim.Warmup(100, optim.CosineDecay(10_000))``.
        The built-in schedules are saved with the model, a plain function is
        not (``save`` warns; set ``model.lr_schedule`` again after ``load``).

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
        ``max_singular_value`` of W_hh (NaN/None for epochs without); with
        ``validation_every``, ``val_steps`` (per epoch a list of
        ``[optimizer step, val_loss]``); with an ``lr_schedule``, ``lr`` (the
        learning rate of the epoch's last step).
    state_ : ndarray of shape (N, H), (L·dirs, N, H) for a stack, or None
        The hidden state carried between ``fit(..., stateful=True)`` calls.
    """

    def __init__(self, input_size, hidden_size, output_size, *, activation="tanh", loss="mse",
                 output="sequence", optimizer="adam", lr=None, truncation=None, clip_norm=None,
                 batch_size=32, dtype=np.float32, backend="auto", seed=None, num_layers=1,
                 bidirectional=False, init="uniform", lr_schedule=None):
        cfg, opt = _check_config(input_size, hidden_size, output_size, activation, loss, output, optimizer, lr,
                                 truncation, clip_norm, batch_size, dtype, backend, seed, num_layers,
                                 bidirectional, init, lr_schedule)
        size = sum(math.prod(s) for _, s in _param_shapes(cfg))
        V.check_memory("hidden_size", size * cfg["dtype"].itemsize * 6,
                       f"{size} parameters of {cfg['dtype'].name}, their gradients and optimizer state")
        params = RNNParams.init(cfg["input_size"], cfg["hidden_size"], cfg["output_size"],
                                num_layers=cfg["num_layers"], bidirectional=cfg["bidirectional"],
                                init=cfg["init"], dtype=cfg["dtype"], seed=cfg["seed"])
        self._configure(cfg, opt, _on_one_buffer(params))
        self._given = {k: (v, getattr(self, k)) for k, v in dict(
            input_size=input_size, hidden_size=hidden_size, output_size=output_size, activation=activation,
            loss=loss, output=output, optimizer=optimizer, lr=lr, truncation=truncation, clip_norm=clip_norm,
            batch_size=batch_size, dtype=dtype, backend=backend, seed=seed, num_layers=num_layers,
            bidirectional=bidirectional, init=init, lr_schedule=lr_schedule).items()}

    def _configure(self, cfg, opt, params, base_lr=None):
        """Set every attribute from a checked configuration (the constructor and ``load``)."""
        self.input_size, self.hidden_size, self.output_size = cfg["input_size"], cfg["hidden_size"], cfg["output_size"]
        self.activation, self.loss, self.output = cfg["activation"], cfg["loss"], cfg["output"]
        self.optimizer, self.lr = cfg["optimizer"], cfg["lr"]
        self.truncation, self.clip_norm, self.batch_size = cfg["truncation"], cfg["clip_norm"], cfg["batch_size"]
        self.dtype, self.backend, self.seed = cfg["dtype"], cfg["backend"], cfg["seed"]
        self.num_layers, self.bidirectional, self.init = cfg["num_layers"], cfg["bidirectional"], cfg["init"]
        self.lr_schedule = cfg["lr_schedule"]

        self.params = params
        self.optimizer_ = opt
        self._base_lr = opt.lr if base_lr is None else base_lr
        self._rng = np.random.default_rng(None if self.seed is None else [int(self.seed), 0x5EED])
        self.history_ = {"loss": [], "seq_per_s": []}
        self.state_ = None
        self._checked = None

    # ----------------------------------------------------------------- info
    def get_params(self, deep=True):
        """The constructor's arguments, as a dict (scikit-learn's estimator API).

        Each is returned as it was given (``dtype=np.float32`` stays the type, not
        ``np.dtype``), unless it was changed since (``set_params``, or an
        attribute assigned); ``deep`` changes nothing (no sub-estimators).
        ``sklearn.base.clone(model)`` gives an unfitted model of the same
        configuration. Without scikit-learn installed all this works too.
        """
        cfg = self._config()
        for name, (given, stored) in self.__dict__.get("_given", {}).items():
            if cfg.get(name) is stored:
                cfg[name] = given
        return cfg

    # the constructor arguments that set_params changes on the model in place (keeping its training);
    # any other one gives a new model, as the constructor would
    _SETTINGS = ("activation", "loss", "output", "lr", "truncation", "clip_norm", "batch_size", "backend",
                 "lr_schedule")

    def set_params(self, **params):
        """Set constructor arguments (scikit-learn's estimator API); returns ``self``.

        Everything is validated before anything changes. The training settings
        (``activation``, ``loss``, ``output``, ``lr``, ``truncation``,
        ``clip_norm``, ``batch_size``, ``backend``, ``lr_schedule``) change in
        place: parameters, optimizer state and ``history_`` are kept (a new
        ``lr`` goes to the optimizer). Any other argument (sizes, layers,
        ``dtype``, ``seed``, ``init``, ``optimizer``) re-creates the model as the
        constructor does: new parameters drawn from ``seed``, a fresh optimizer,
        empty ``history_``.
        """
        if not params:
            return self
        current = self.get_params(deep=False)
        unknown = sorted(set(params) - set(current))
        if unknown:
            raise ValueError(f"set_params: invalid parameter{'s' * (len(unknown) > 1)} {', '.join(unknown)} for "
                             f"{type(self).__name__}; valid parameters: {', '.join(current)}")
        merged = {**current, **params}
        cfg, opt = _check_config(**{k: merged[k] for k in current if k in _CONFIG_NAMES})
        changed = [k for k, v in params.items() if not (v is current[k] or _same(v, current[k]))]
        if any(k not in self._SETTINGS for k in changed):
            type(self).__init__(self, **merged)
            return self
        given = self.__dict__.setdefault("_given", {})
        for k in params:
            setattr(self, k, cfg[k])
            given[k] = (params[k], cfg[k])
        if "lr" in changed and isinstance(self.optimizer, str):
            self.optimizer_.lr = self._base_lr = opt.lr
        return self

    def score(self, X, Y, lengths=None):
        """Minus the mean loss on ``(X, Y)`` (greater is better: scikit-learn's convention); see
        :meth:`evaluate`."""
        return -self.evaluate(X, Y, lengths=lengths)

    def __sklearn_tags__(self):
        """scikit-learn >= 1.6's estimator tags (scikit-learn is imported only when it asks)."""
        from sklearn.utils import InputTags, RegressorTags, Tags, TargetTags
        regressor = self.loss == "mse"
        return Tags(estimator_type="regressor" if regressor else None,
                    target_tags=TargetTags(required=True, multi_output=True, single_output=True),
                    regressor_tags=RegressorTags() if regressor else None,
                    input_tags=InputTags(two_d_array=False, three_d_array=True, allow_nan=False),
                    non_deterministic=self.seed is None, requires_fit=False)

    def __sklearn_is_fitted__(self):
        return bool(self.history_["loss"])

    def _config(self):
        """The configuration as this model holds it (checked and normalised)."""
        return {"input_size": self.input_size, "hidden_size": self.hidden_size,
                "output_size": self.output_size, "activation": self.activation, "loss": self.loss,
                "output": self.output, "optimizer": self.optimizer, "lr": self.lr,
                "truncation": self.truncation, "clip_norm": self.clip_norm,
                "batch_size": self.batch_size, "dtype": self.dtype, "backend": self.backend,
                "seed": self.seed, "num_layers": self.num_layers, "bidirectional": self.bidirectional,
                "init": self.init, "lr_schedule": self.lr_schedule}

    def __repr__(self):
        cfg = self.get_params()
        cfg["dtype"] = self.dtype.name
        if cfg["lr_schedule"] is None:
            del cfg["lr_schedule"]
        args = ", ".join(f"{k}={v!r}" for k, v in cfg.items())
        return f"RNN({args})"

    def reset_state(self):
        """Forget the hidden state carried by ``fit(..., stateful=True)``."""
        self.state_ = None

    def _check_model(self):
        """Before a call uses the model: ``params`` are an RNNParams of the configured structure,
        shapes and dtype (a user may have assigned them), and finite."""
        p = self.params
        if not isinstance(p, RNNParams):
            raise TypeError(f"params: expected an RNNParams, got {type(p).__name__}")
        key = tuple(map(id, p.arrays()))
        if key != self._checked:
            want = _param_shapes(self._config())
            got = [(n, a.shape) for n, a in p.items()]
            if got != want or p.dtype != self.dtype:
                raise ValueError(f"params: expected {want} of {self.dtype.name} (this model's configuration), "
                                 f"got {got} of {p.dtype.name}")
            self._checked = key
        V.check_params_finite(p)
        if not isinstance(self.optimizer_, _optim.Optimizer):
            raise TypeError(f"optimizer_: expected a fastbptt.optim.Optimizer, got {type(self.optimizer_).__name__}")

    def _check_settings(self):
        """The training settings a user may have changed since the constructor (sklearn's
        ``set_params`` style), checked again before ``fit`` changes anything."""
        self.truncation = V.check_truncation(self.truncation, self.bidirectional, allow_artbp="trainer")
        self.clip_norm = V.check_positive("clip_norm", self.clip_norm, allow_none=True)
        self.batch_size = V.check_int("batch_size", self.batch_size)
        V.check_choice("backend", self.backend, ("auto", *BACKENDS))
        _check_schedule(self.lr_schedule)

    def _lr_at(self):
        """``step -> lr`` for the schedule, or None."""
        schedule, base = self.lr_schedule, self._base_lr
        if schedule is None:
            return None
        _check_schedule(schedule)

        def lr_at(step):
            factor = schedule(step)
            if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not (
                    math.isfinite(factor) and factor >= 0):
                raise ValueError(f"lr_schedule: expected a finite factor >= 0 at step {step}, got {factor!r}")
            return base * float(factor)
        return lr_at

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
    def _check_X(self, X, name="X", lengths=None):
        """Samples-first X -> ``(kind, arr, lengths)``: ("dense", (T, N, D) float C-contiguous)
        or ("ids", (T, N) int64 C-contiguous), and the checked lengths (None: full length).

        With ``lengths`` (or X a list of (T_i, D) / (T_i,) sequences, padded here) only
        each row's valid steps are checked; its padding is zeros (ids: 0) in ``arr``.
        """
        if _is_ragged(X):
            if lengths is not None:
                raise ValueError("lengths: X is a list of sequences of their own lengths; give lengths only "
                                 "with a padded array X of shape (N, T, D)")
            X, lengths = _pad_ragged(X, name)
        D = self.input_size
        try:
            arr = np.asarray(X)
        except Exception as exc:
            raise TypeError(f"{name}: expected an array of shape (N, T, D), got {type(X).__name__}") from exc
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name}: expected real numbers, got dtype {arr.dtype}")
        valid = None
        if lengths is not None and arr.ndim in (2, 3) and 0 not in arr.shape:
            lengths = V.check_lengths(lengths, arr.shape[1], arr.shape[0], False)
            valid = V.valid_steps(lengths, arr.shape[1]).T         # (N, T)
            if arr.ndim == 3 and not np.all(valid):                  # padding is never read: zeros here
                arr = np.where(valid[:, :, None], arr, 0)
            elif not np.all(valid):
                arr = np.where(valid, arr, 0)
        if arr.ndim == 2 and arr.dtype.kind in "iu":
            if 0 in arr.shape:
                raise ValueError(f"{name}: expected N >= 1 and T >= 1, got shape {arr.shape}")
            if arr.min() < 0 or arr.max() >= D:
                raise ValueError(f"{name}: integer (N, T) input holds token ids, expected values in "
                                 f"[0, {D}) (input_size={D}), got [{arr.min()}, {arr.max()}]")
            return "ids", np.ascontiguousarray(arr.T, dtype=np.int64), lengths
        if arr.ndim != 3 or arr.shape[2] != D:
            raise ValueError(f"{name}: expected shape (N, T, D) with D={D} (input_size), or integer token "
                             f"ids of shape (N, T), got shape {arr.shape} and dtype {arr.dtype}")
        if arr.shape[0] < 1 or arr.shape[1] < 1:
            raise ValueError(f"{name}: expected N >= 1 and T >= 1, got shape {arr.shape}")
        with np.errstate(over="ignore"):                    # an overflow is reported below, as such
            X3 = np.array(np.swapaxes(arr, 0, 1), dtype=self.dtype, order="C", copy=True)
        if not np.all(np.isfinite(X3)):
            t, n, d = np.argwhere(~np.isfinite(X3))[0]
            raise ValueError(V.nonfinite_message(name, X3[t, n, d], arr[n, t, d].item(), self.dtype, (n, t, d)))
        return "dense", X3, lengths

    def _check_Y(self, Y, T, N, name="Y", lengths=None):
        """Samples-first targets -> time-major validated: (T, N, O)/(T, N) or (N, O)/(N,).

        With ``lengths`` a sequence target is checked at valid steps only (a list of
        (T_i, O) / (T_i,) sequences is padded here)."""
        O = self.output_size
        if self.output == "sequence" and _is_ragged(Y):
            Y, y_lengths = _pad_ragged(Y, name, T)
            if lengths is None or not np.array_equal(y_lengths, lengths):
                raise ValueError(f"{name}: expected one target sequence per input sequence, of its length, "
                                 f"got lengths {y_lengths.tolist()[:8]} for inputs of lengths "
                                 f"{None if lengths is None else lengths.tolist()[:8]}")
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
            return V.check_Y(arr, self.params, T, N, False, self.loss, self.output, lengths)
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

    def _check_data(self, X, Y, xname="X", yname="Y", lengths=None):
        """``(kind, Xt, Yt, lengths)``: see :meth:`_check_X` and :meth:`_check_Y`."""
        kind, Xt, lengths = self._check_X(X, xname, lengths)
        T, N = Xt.shape[:2]
        Yt = self._check_Y(Y, T, N, yname, lengths)
        return kind, Xt, Yt, lengths

    # ------------------------------------------------------------- predict

    # ---------------------------------------------------------------- memory
    def _check_call_memory(self, X, batch, train, extra=(), outputs=False):
        """Refuse a call on ``X`` (and the ``extra`` arrays) that needs more memory than the machine has,
        before anything is copied: the converted copies of the data, the work arrays of one
        mini-batch of ``batch`` rows (forward, and backward when ``train``), and the (N, T, O)
        ``outputs`` when asked."""
        try:
            shapes = [np.shape(X)] + [np.shape(a) for a in extra]
        except Exception:
            return                       # not array-like: the data checks say so
        shape = shapes[0]
        if len(shape) < 2 or not all(isinstance(s, numbers.Integral) for s in shape):
            return
        N, T = int(shape[0]), int(shape[1])
        item = self.dtype.itemsize
        data = sum(math.prod(s) for s in shapes[1:]) * 8 + (N * T * (shape[2] * item if len(shape) > 2 else 8))
        if outputs:
            data += 2 * N * T * self.output_size * item         # the outputs, and the probabilities
        b = max(1, min(batch, N))
        work = V.forward_bytes(T, b, self.input_size, self.params) + b * self.input_size * T * item
        if train:
            L = len(self.params.layers)
            work = 3 * work + (T + 1) * L * b * self.hidden_size * item + 6 * self.params.size * item
        V.check_memory("X", data + work, lambda: f"N={N}, T={T}, batch {b}, H={self.hidden_size}, "
                       f"{self.dtype.name}: the converted data and the work arrays of one mini-batch",
                       "use shorter sequences (a long stream cut into windows, fit(..., stateful=True)), "
                       "fewer rows per call or a smaller batch_size")

    # ------------------------------------------------------------- predict
    def _kernels(self, T, B):
        return resolve_backend(self.backend, T=T, B=B, H=self.hidden_size, dtype=self.dtype)

    def _train_choice(self, T, B, lengths):
        """The backend and team of ``fit``: what ``backend="auto"`` learned for ``loss_and_grad`` at
        this shape, else the table's guess (no trial: one choice for the whole fit)."""
        return dispatch(self.backend, "loss_and_grad", T=T, B=B, D=self.input_size, H=self.hidden_size,
                        layers=self.num_layers, dirs=2 if self.bidirectional else 1, dtype=self.params.dtype,
                        lengths=lengths is not None, trial=False)

    def _forward_chunks(self, kind, Xt, kernels, lengths=None):
        """Yield ``(rows, logits, lengths)`` for chunks of rows, from zero state: logits (T, b, O)
        (unspecified at padded steps) or (b, O) by ``output``."""
        T, N = Xt.shape[:2]
        act = ACT_CODES[self.activation]
        for s in range(0, N, _PREDICT_CHUNK):
            idx = np.arange(s, min(s + _PREDICT_CHUNK, N))
            Xb = self._batch_X(kind, Xt, idx)
            lens = None if lengths is None else lengths[idx]
            pack = packing(lens, T)
            if pack is not None:
                Xb = pack.sort(Xb, 1)
            fwd = stack_forward(kernels, self.params, Xb, self._zero_state(len(idx)), act, pack=pack)
            if self.output == "sequence":
                o = head_logits(self.params, fwd.out[1:], kernels)
                yield idx, (o if pack is None else pack.unsort(o, 1)), lens
            else:
                o = head_logits(self.params, fwd.last_output(), kernels)
                yield idx, (o if pack is None else pack.unsort(o, 0)), lens

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
        self._check_model()
        self._check_call_memory(X, 1 << 30, True, [Y])
        kind, Xt, Yt, lengths = self._check_data(X, Y)
        if lengths is not None:
            raise ValueError("X: hidden_grad_norms takes sequences of one length (an array (N, T, D))")
        Xb = self._batch_X(kind, Xt, np.arange(Xt.shape[1]))
        kernels = self._kernels(Xb.shape[0], Xb.shape[1])
        with call_scope():
            return hidden_grad_norms(kernels, self.params, Xb, Yt, None, self.loss, self.output,
                                     ACT_CODES[self.activation])

    def predict(self, X, lengths=None):
        """Outputs from a zero initial state (logits for mse, probabilities for bce/ce).

        Parameters
        ----------
        X : array_like of shape (N, T, D), integer token ids (N, T), or a list of
            N sequences (T_i, D) / (T_i,) of their own lengths
        lengths : array_like of N ints in [1, T], optional
            Variable-length rows of a padded X (padding is never read).

        Returns
        -------
        ndarray of shape (N, T, O) (``output="sequence"``; zeros at padded steps)
        or (N, O) (``"last"``: each row's own last step)
        """
        self._check_model()
        self._check_call_memory(X, _PREDICT_CHUNK, False, outputs=True)
        kind, Xt, lengths = self._check_X(X, lengths=lengths)
        T, N = Xt.shape[:2]
        kernels = self._kernels(T, min(N, _PREDICT_CHUNK))
        seq = self.output == "sequence"
        out = np.empty((N, T, self.output_size) if seq else (N, self.output_size), dtype=self.dtype)
        with call_scope():
            for idx, o, _ in self._forward_chunks(kind, Xt, kernels, lengths):
                out[idx] = np.swapaxes(o, 0, 1) if seq else o
        out = predict_from_logits(out, self.loss)
        if seq and lengths is not None:
            out[~V.valid_steps(lengths, T).T] = 0
        return out

    def _evaluate(self, kind, Xt, Yt, lengths, kernels):
        total, weight = 0.0, 0
        seq = self.output == "sequence"
        with call_scope():
            for idx, o, lens in self._forward_chunks(kind, Xt, kernels, lengths):
                y = Yt[:, idx] if seq else Yt[idx]
                n = len(idx)
                if seq and lens is not None:          # the mean over valid steps only
                    valid = V.valid_steps(lens, Xt.shape[0])
                    o, y, n = o[valid], y[valid], int(valid.sum())
                value, _ = LOSS_FUNCS[self.loss](o, y)
                total += value * n
                weight += n
        return total / weight

    def evaluate(self, X, Y, lengths=None):
        """The mean loss on ``(X, Y)`` from a zero initial state (torch's ``mean`` reduction).

        Parameters
        ----------
        X : array_like of shape (N, T, D), integer token ids (N, T), or a list of sequences
        Y : array_like, targets as for ``fit``
        lengths : array_like of N ints, optional (as for ``fit``)

        Returns
        -------
        float
        """
        self._check_model()
        self._check_call_memory(X, _PREDICT_CHUNK, False, [Y])
        kind, Xt, Yt, lengths = self._check_data(X, Y, lengths=lengths)
        return self._evaluate(kind, Xt, Yt, lengths,
                              self._kernels(Xt.shape[0], min(Xt.shape[1], _PREDICT_CHUNK)))

    def _end_epoch(self, logs, lr_at, bar, callbacks):
        """An epoch's end (every trainer's): its figures into ``history_`` (all or none), its progress
        line, then the callbacks in order; returns whether one asked to stop."""
        hist = self.history_
        record = {k: (list(logs[k]) if isinstance(logs[k], list) else logs[k])   # not the callbacks' lists
                  for k in ("loss", "seq_per_s", "val_loss", "val_steps", "grad_norm_by_t",
                            "spectral_radius", "max_singular_value") if k in logs}
        if lr_at is not None or "lr" in hist:
            record["lr"] = logs["lr"]
        _append_epoch(hist, record)
        bar.end_epoch(logs)
        stop = False
        for cb in callbacks:
            stop = (cb(self, dict(logs)) is False) or stop
        return stop

    # ------------------------------------------------------------------ fit
    def fit(self, X, Y, *, lengths=None, epochs=1, validation_data=None, shuffle=True, stateful=False,
            progress=None, diagnostics=False, callbacks=None, validation_every=None):
        """Train, continuing from the current parameters and optimizer state.

        Parameters
        ----------
        X : array_like of shape (N, T, D), or integer token ids of shape (N, T)
            Samples first. Integer ids are one-hot encoded per mini-batch. Or a
            list of N sequences (T_i, D) (or token ids (T_i,)) of their own lengths.
        Y : array_like
            (N, T, O) / (N, O) floats for mse/bce, (N, T) / (N,) class ids for
            ce, by ``output``; with a list X and ``output="sequence"``, a list of
            (T_i, O) / (T_i,) targets.
        lengths : array_like of N ints in [1, T], optional
            Variable-length rows of a padded X (torch's packed sequences): the
            padding is never read, the losses are means over valid steps, and
            ``output="last"`` takes each row's own last step.
        epochs : int >= 1
        validation_data : (X_val, Y_val), (X_val, Y_val, lengths_val) or None
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
        progress : None, bool or "bar"
            ``True``: a bar while an epoch runs (on a terminal: epoch, %,
            rate, ETA, running loss) and one line per epoch when it ends
            (always, also when stderr is piped); ``"bar"``: the bar only;
            ``False``: nothing; ``None``: as ``True`` when stderr is a
            terminal, else nothing. On stderr.
        diagnostics : bool
            After every epoch, record in ``history_`` the norms ‖∂L/∂h_t‖ over
            t (on the first ``batch_size`` rows, zero state, full BPTT; see
            :func:`fastbptt.diagnostics.hidden_grad_norms`), and the spectral
            radius and largest singular value of W_hh.
        callbacks : sequence of callables, or None
            Each called after every epoch, in order, as ``cb(model, logs)``:
            ``logs`` is a dict of the epoch's figures -- ``epoch`` (counted over
            every ``fit`` of the model, from 1), ``loss``, ``val_loss`` (with
            validation data), ``seq_per_s``, ``time_s``, ``lr``, ``steps`` (the
            optimizer's step count), and the diagnostics and ``val_steps`` when
            recorded. ``history_`` already holds the epoch. A callback that
            returns ``False`` stops the training after this epoch (the others
            are still called); e.g. early stopping::

                def early_stop(model, logs, best=[float("inf")]):
                    if logs["val_loss"] < best[0] - 1e-4:
                        best[0] = logs["val_loss"]
                        model.save("best.npz")
                    elif logs["epoch"] > 5:
                        return False

        validation_every : int >= 1 or None
            Also evaluate ``validation_data`` every this many optimizer steps
            (counted by the optimizer, so over several ``fit`` calls too), into
            ``history_["val_steps"]`` and onto the progress bar: a long stream
            trained in one epoch can be watched as it goes.

        Returns
        -------
        self

        Raises
        ------
        ValueError, TypeError
            On bad input, before anything is changed.
        MemoryError
            When the call needs more memory than the machine has, before
            anything is allocated.
        FloatingPointError
            When training diverges (see the module docstring).
        KeyboardInterrupt
            Let through, with a note saying where training stopped: the model
            holds the parameters of its last completed update point and its
            completed epochs (see "Interrupts and failures" in the module
            docstring).
        """
        epochs = V.check_int("epochs", epochs)
        shuffle = V.check_bool("shuffle", shuffle)
        stateful = V.check_bool("stateful", stateful)
        diagnostics = V.check_bool("diagnostics", diagnostics)
        check_progress(progress)
        callbacks = self._check_callbacks(callbacks)
        validation_every = V.check_int("validation_every", validation_every, allow_none=True)
        if validation_every is not None and validation_data is None:
            raise ValueError(f"validation_every: needs validation_data, got validation_every={validation_every} "
                             "and validation_data=None")
        self._check_model()
        self._check_settings()
        if validation_data is not None and (not isinstance(validation_data, (tuple, list))
                                            or len(validation_data) not in (2, 3)):
            raise TypeError("validation_data: expected a pair (X_val, Y_val) or (X_val, Y_val, lengths_val), "
                            f"got {type(validation_data).__name__}")
        extra = [Y] + (list(validation_data[:2]) if validation_data is not None else [])
        self._check_call_memory(X, self.batch_size, True, extra)
        kind, Xt, Yt, lengths = self._check_data(X, Y, lengths=lengths)
        T, N = Xt.shape[:2]
        val = None
        if validation_data is not None:
            val = self._check_data(*validation_data[:2], xname="validation_data[0]", yname="validation_data[1]",
                                   lengths=validation_data[2] if len(validation_data) == 3 else None)
        if stateful and self.state_ is not None and self._state_rows() != N:
            raise ValueError(f"X: stateful=True continues the {self._state_rows()} rows of the previous "
                             f"stateful fit, got N={N} rows; call reset_state() to start afresh")
        B = min(self.batch_size, N)
        choice = self._train_choice(T, B, lengths)
        kernels = choice.kernels
        val_kernels = None if val is None else self._kernels(val[1].shape[0], min(val[1].shape[1], _PREDICT_CHUNK))
        act = ACT_CODES[self.activation]
        points = None if is_artbp(self.truncation) else update_points(T, self.truncation)   # ARTBP: per batch
        lr_at = self._lr_at()
        d_batch = None
        if diagnostics:
            if len(self.params.layers) != 1:
                raise ValueError("diagnostics: expected a one-layer unidirectional model (the norms are "
                                 f"those of its hidden state), got num_layers={self.num_layers}, "
                                 f"bidirectional={self.bidirectional}")
            if lengths is not None:
                raise ValueError("diagnostics: expected sequences of one length (no lengths)")
            d_idx = np.arange(B)
            d_batch = (self._batch_X(kind, Xt, d_idx), self._batch_Y(Yt, d_idx))

        # ---- everything is checked: from here on the model changes
        hist = self.history_
        _align_history(hist)
        if stateful and self.state_ is None:
            self.state_ = self._user_state(self._zero_state(N))
        run = dict(kind=kind, Xt=Xt, Yt=Yt, lengths=lengths, B=B, stateful=stateful, shuffle=shuffle, kernels=kernels,
                   threads=choice.threads, act=act,
                   points=points, lr_at=lr_at, val=val, val_kernels=val_kernels,
                   validation_every=validation_every, d_batch=d_batch)
        steps_before = self.optimizer_.step_count
        bar = make_progress(progress, epochs, N)
        try:
            for index in range(1, epochs + 1):
                bar.start_epoch(index)
                logs = self._fit_epoch(run, bar)
                if self._end_epoch(logs, lr_at, bar, callbacks):
                    break
        except KeyboardInterrupt as exc:
            done = self.optimizer_.step_count - steps_before
            n = len(hist["loss"])
            _note(exc, f"RNN.fit: interrupted after {n} completed epoch{'s' * (n != 1)} of the model "
                       f"({done} optimizer step{'s' * (done != 1)} in this call). The model holds the "
                       f"parameters of its last completed update point (optimizer step "
                       f"{self.optimizer_.step_count}) and history_ its completed epochs: it can be "
                       "evaluated, saved, and fit again.")
            raise
        finally:
            bar.close()
        return self

    @staticmethod
    def _check_callbacks(callbacks):
        if callbacks is None:
            return ()
        if callable(callbacks):
            callbacks = [callbacks]
        try:
            callbacks = tuple(callbacks)
        except TypeError:
            raise TypeError(f"callbacks: expected None or a sequence of callables cb(model, logs), got "
                            f"{type(callbacks).__name__}") from None
        for i, cb in enumerate(callbacks):
            if not callable(cb):
                raise TypeError(f"callbacks[{i}]: expected a callable cb(model, logs), got {cb!r}")
        return callbacks

    def _fit_epoch(self, run, bar):
        """Train one epoch; returns its logs (``history_`` is not touched here)."""
        kind, Xt, Yt, B = run["kind"], run["Xt"], run["Yt"], run["B"]
        val, val_kernels, every = run["val"], run["val_kernels"], run["validation_every"]
        N = Xt.shape[1]
        opt = self.optimizer_
        epoch = len(self.history_["loss"]) + 1
        t0 = time.perf_counter()
        order = self._rng.permutation(N) if run["shuffle"] else np.arange(N)
        loss_sum, weight, counter = 0.0, 0, [0]
        val_steps, val_time = [], [0.0]
        after_step = None
        if every is not None:
            def after_step(batch_loss, batch_weight):
                if opt.step_count % every == 0:
                    t = time.perf_counter()
                    value = self._evaluate(*val, val_kernels)
                    val_time[0] += time.perf_counter() - t
                    val_steps.append([opt.step_count, value])
                    bar.update(0, val_loss=value)
        with call_scope(threads=run["threads"]):
            for s in range(0, N, B):
                idx = order[s:s + B]
                Xb, Yb = self._batch_X(kind, Xt, idx), self._batch_Y(Yt, idx)
                h0s = self._internal_state(idx) if run["stateful"] else self._zero_state(len(idx))
                lens = None if run["lengths"] is None else run["lengths"][idx]
                trunc = batch_truncation(self.truncation, self._rng)     # ARTBP: this batch's cuts
                h_T, ls, w = train_batch(run["kernels"], self.params, opt, Xb, Yb, h0s, loss=self.loss,
                                         output=self.output, act=run["act"], truncation=trunc,
                                         clip_norm=self.clip_norm, epoch=epoch, counter=counter,
                                         points=run["points"], lr_at=run["lr_at"], after_step=after_step,
                                         lengths=lens)
                if run["stateful"]:
                    self._set_state(idx, h_T)
                loss_sum += ls
                weight += w
                bar.update(len(idx), loss=loss_sum / max(weight, 1))
            elapsed = time.perf_counter() - t0
            train_time = max(elapsed - val_time[0], 1e-12)
            logs = {"epoch": epoch, "loss": loss_sum / weight if weight else float("nan"),
                    "seq_per_s": N / train_time, "time_s": elapsed, "lr": opt.lr, "steps": opt.step_count}
            if val is not None:
                logs["val_loss"] = self._evaluate(*val, val_kernels)
            if every is not None:
                logs["val_steps"] = val_steps
            if run["d_batch"] is not None:
                norms = hidden_grad_norms(run["kernels"], self.params, *run["d_batch"], None, self.loss,
                                          self.output, run["act"])
                spec = recurrent_spectrum(self.params.W_hh)
                logs["grad_norm_by_t"] = [float(v) for v in norms]
                logs["spectral_radius"] = spec["spectral_radius"]
                logs["max_singular_value"] = spec["max_singular_value"]
        logs["time_s"] = time.perf_counter() - t0
        return logs

    # ------------------------------------------------------------ save/load
    def save(self, path):
        """Write the model to ``path`` atomically (a temporary file, then a rename).

        The file is an ``.npz`` archive (no pickled objects): the arrays
        (parameters, optimizer buffers, stateful hidden state) and one JSON
        entry with the configuration, optimizer hyperparameters and step
        count, the shuffling generator's state, ``history_`` and a SHA-256
        checksum of every array. ``path`` is used as given (no suffix added).
        An interrupted save leaves the old file (or none) and no temporary
        file; temporary files left by a killed process are removed.
        """
        path = os.fspath(path)
        if os.path.isdir(path):
            raise IsADirectoryError(f"path: {path!r} is a directory, expected a file name")
        self._check_model()
        _align_history(self.history_)
        cfg = self._config()
        cfg["dtype"] = self.dtype.name
        cfg["optimizer"] = self.optimizer if isinstance(self.optimizer, str) else None
        schedule = cfg["lr_schedule"]
        if isinstance(schedule, _optim.Schedule):
            cfg["lr_schedule"] = schedule.config()
        elif schedule is not None:
            warnings.warn(f"RNN.save: the lr_schedule {schedule!r} is a plain callable and is not saved; "
                          "after RNN.load set model.lr_schedule to it again", RuntimeWarning, stacklevel=2)
            cfg["lr_schedule"] = None
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
                          "step": opt_state["step"], "base_lr": self._base_lr,
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

        The file is checked before anything is allocated for it: only a
        regular file is opened, the configuration is validated and every
        array's shape and dtype (read from its header) must be the one the
        configuration implies, then the arrays are read and their checksums
        verified.

        Raises
        ------
        FileNotFoundError
            If ``path`` does not exist.
        ValueError
            If the file is not a valid model file: not a regular file, not an
            npz archive, corrupt (checksums), of another format version, or
            with arrays that do not match its configuration.
        """
        path = os.fspath(path)

        def bad(why):
            return ValueError(f"RNN.load: {path!r} is not a valid fastbptt RNN file: {why}")

        with _open_regular(path, "RNN.load") as f:
            try:
                zf = zipfile.ZipFile(f)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                raise bad(f"cannot read it as an npz archive ({type(exc).__name__}: {exc})") from None
            with zf:
                return cls._load_zip(zf, bad)

    @classmethod
    def _load_zip(cls, zf, bad):
        members = {}
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                raise bad(f"unexpected entry {info.filename!r}")
            members[info.filename[:-4]] = info
        if _META_KEY not in members:
            raise bad(f"no {_META_KEY!r} entry")
        try:
            headers = {k: _npy_header(zf, info) for k, info in members.items()}
            shape, dtype = headers[_META_KEY]
            if shape != () or dtype.kind != "U" or members[_META_KEY].file_size > _META_MAX_BYTES:
                raise ValueError(f"the {_META_KEY!r} entry is not a JSON string")
            meta = json.loads(str(np.lib.format.read_array(zf.open(members[_META_KEY]), allow_pickle=False)))
        except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
            raise bad(f"cannot read it as an npz archive ({type(exc).__name__}: {exc})") from None
        del headers[_META_KEY]
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise bad(f"format is {meta.get('format') if isinstance(meta, dict) else None!r}, expected {_FORMAT!r}")
        if meta.get("version") != _FORMAT_VERSION:
            raise bad(f"format version {meta.get('version')!r}, this fastbptt reads version {_FORMAT_VERSION}")
        for key in ("config", "optimizer", "rng_state", "history", "checksums"):
            if key not in meta:
                raise bad(f"missing {key!r}")
        checks = meta["checksums"]
        if not isinstance(checks, dict) or set(checks) != set(headers):
            raise bad(f"the arrays {sorted(headers)} do not match the recorded list "
                      f"{sorted(checks) if isinstance(checks, dict) else checks!r}")

        # the configuration and the arrays' headers agree before any array is read
        try:
            cfg = dict(meta["config"])
            cfg["truncation"] = tuple(cfg["truncation"]) if isinstance(cfg["truncation"], list) else cfg["truncation"]
            schedule = cfg.get("lr_schedule")
            cfg["lr_schedule"] = None if schedule is None else _optim.schedule_from_config(schedule)
            ostate = meta["optimizer"]
            name = cfg.pop("optimizer")
            lr = cfg.pop("lr")
            if not isinstance(name, (str, type(None))):
                raise TypeError(f"optimizer name {name!r}")
            n_params = sum(1 for k in headers if k.startswith("params/"))
            dirs = 2 if cfg.get("bidirectional") else 1
            if not V.is_int(cfg.get("num_layers")) or n_params != 3 * cfg["num_layers"] * dirs + 2:
                raise ValueError(f"num_layers={cfg.get('num_layers')!r} does not match the {n_params} parameter "
                                 "arrays")
            named_opt = name is not None and isinstance(ostate, dict) and name.lower() == ostate.get("name")
            cfg, _ = _check_config(**cfg, optimizer=name if named_opt else "adam", lr=lr if named_opt else None)
            cfg["optimizer"], cfg["lr"] = (name, lr) if named_opt else (None, None)   # None: the instance
            buffer_names = ostate["buffers"]
            if not isinstance(buffer_names, dict) or not all(isinstance(v, list) for v in buffer_names.values()):
                raise TypeError(f"optimizer buffers {buffer_names!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise bad(f"bad configuration or optimizer state ({type(exc).__name__}: {exc})") from None
        shapes = dict(_param_shapes(cfg))
        expected = {f"params/{n}": s for n, s in shapes.items()}
        for b, names in buffer_names.items():
            for n in names:
                if n not in shapes:
                    raise bad(f"optimizer buffer {b}/{n} names no parameter of this model")
                expected[f"optim/{b}/{n}"] = shapes[n]
        n_states = cfg["num_layers"] * dirs
        lead = (n_states,) if n_states > 1 else ()
        for k, (shape, dtype) in headers.items():
            if k == "state":
                if (len(shape) != len(lead) + 2 or shape[:len(lead)] != lead or shape[-1] != cfg["hidden_size"]
                        or dtype != cfg["dtype"]):
                    raise bad(f"state has shape {shape} and dtype {dtype}, expected {lead + ('N', cfg['hidden_size'])} "
                              f"{cfg['dtype']}")
                continue
            if k not in expected:
                raise bad(f"unexpected array {k!r}")
            if shape != expected[k] or dtype != cfg["dtype"]:
                raise bad(f"{k} has shape {shape} and dtype {dtype}, the configuration implies "
                          f"{expected[k]} and {cfg['dtype']}")
        missing = set(expected) - set(headers)
        if missing:
            raise bad(f"missing arrays {sorted(missing)}")
        total = sum(math.prod(s) * d.itemsize for s, d in headers.values())
        V.check_memory("RNN.load", total, f"the {len(headers)} arrays of the file")

        # now read the arrays
        try:
            files = {k: np.lib.format.read_array(zf.open(members[k]), allow_pickle=False) for k in headers}
        except (ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise bad(f"cannot read its arrays ({type(exc).__name__}: {exc})") from None
        for k, a in files.items():
            if _sha256(a) != checks[k]:
                raise bad(f"array {k!r} fails its checksum (corrupt file)")
        for k, a in files.items():
            if not np.isfinite(a).all():
                raise bad(f"{k} holds non-finite values")
        try:
            buffers = {b: {n: files[f"optim/{b}/{n}"] for n in names} for b, names in buffer_names.items()}
            opt = _optim.from_state_dict({"name": ostate["name"], "hyperparams": ostate["hyperparams"],
                                          "step": ostate["step"], "buffers": buffers})
            base_lr = ostate.get("base_lr", opt.lr)
            if isinstance(base_lr, bool) or not isinstance(base_lr, numbers.Real) or not (
                    math.isfinite(base_lr) and base_lr >= 0):
                raise ValueError(f"base_lr {base_lr!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise bad(f"bad optimizer state ({type(exc).__name__}: {exc})") from None
        if cfg["optimizer"] is None:
            cfg["optimizer"] = opt
        params = RNNParams(layers=[[files[f"params/{n}"] for n in names]
                                   for names in zip(*[iter(list(shapes)[:-2])] * 3)],
                           W_hy=files["params/W_hy"], b_y=files["params/b_y"], bidirectional=cfg["bidirectional"])
        model = cls.__new__(cls)
        model._configure(cfg, opt, _on_one_buffer(params), base_lr=float(base_lr))
        try:
            model._rng.bit_generator.state = meta["rng_state"]
        except (TypeError, ValueError, KeyError) as exc:
            raise bad(f"bad random state ({exc})") from None
        hist = meta["history"]
        if (not isinstance(hist, dict) or not all(isinstance(v, list) for v in hist.values())
                or "loss" not in hist or len({len(v) for v in hist.values()}) > 1):
            raise bad("bad history")
        state = files.get("state")
        model.state_ = None if state is None else np.array(state, copy=True, order="C")
        model.history_ = hist
        return model
