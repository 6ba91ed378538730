"""Optimizers that update :class:`~fastbptt.RNNParams` in place with torch.optim's formulas.

Each optimizer reproduces, for the same settings, the update rule of the
torch.optim class of the same name (single-tensor implementation, defaults
``maximize=False``, ``dampening=0``, ``amsgrad=False``, ``centered=False``,
``lr_decay=0``, ``initial_accumulator_value=0``), so a run can be checked
step for step against torch. With ``g`` the gradient and ``p`` a parameter:

``SGD``      g += wd·p;  buf = g (first step) else momentum·buf + g;
             g = g + momentum·buf (nesterov) or buf;  p -= lr·g
``Adam``     g += wd·p;  m = lerp(m, g, 1-β1);  v = β2·v + (1-β2)·g²;
             p -= (lr / (1-β1^t)) · m / (√v / √(1-β2^t) + eps)
``RMSprop``  v = α·v + (1-α)·g²;  avg = √v + eps;
             buf = momentum·buf + g/avg, p -= lr·buf  (momentum > 0)
             or  p -= lr·g/avg
``Adagrad``  s += g²;  p -= lr · g / (√s + eps)

A step never leaves non-finite parameters behind: every new value is
computed first, and if any parameter or buffer would become NaN or inf the
step raises ``FloatingPointError`` and changes nothing.

State
-----
``state_dict()`` returns a plain dict (numbers, strings and numpy arrays
only, all copies)::

    {"name": "adam", "hyperparams": {"lr": ..., ...}, "step": int,
     "buffers": {"exp_avg": {"W_xh": ndarray, ...}, "exp_avg_sq": {...}}}

A buffer dict is empty until the first step creates it (SGD's momentum
buffer, like torch's, is initialised to the first gradient).
``load_state_dict(d)`` checks the dict and restores hyperparameters, step
count and buffers (as torch's ``load_state_dict`` restores ``param_groups``).
"""

import math
import numbers

import numpy as np

from .params import RNNParams

__all__ = ["Optimizer", "SGD", "Adam", "RMSprop", "Adagrad", "get_optimizer", "OPTIMIZERS"]


def _check_number(owner, name, value, *, low=0.0, high=None, high_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{owner}: {name} must be a finite real number, got {value!r}")
    value = float(value)
    if value < low or (high is not None and (value >= high if high_open else value > high)):
        bound = f"[{low}, {high})" if high_open else (f"[{low}, {high}]" if high is not None else f">= {low}")
        raise ValueError(f"{owner}: {name} must be in {bound}, got {value!r}")
    return value


def _check_pair(owner, a, b):
    if not isinstance(a, RNNParams):
        raise TypeError(f"{owner}.step: params must be an RNNParams, got {type(a).__name__}")
    if not isinstance(b, RNNParams):
        raise TypeError(f"{owner}.step: grads must be an RNNParams, got {type(b).__name__}")
    if a.names() != b.names():
        raise ValueError(f"{owner}.step: grads must match params field for field; expected "
                         f"{list(a.names())}, got {list(b.names())}")
    for (name, p), g in zip(a.items(), b.arrays()):
        if p.shape != g.shape or p.dtype != g.dtype:
            raise ValueError(f"{owner}.step: grads.{name} has shape {g.shape} and dtype {g.dtype}, "
                             f"expected {p.shape} and {p.dtype} as params.{name}")


class Optimizer:
    """Base class: hyperparameters, per-parameter buffers, a step count.

    Subclasses define ``name``, ``_buffer_names`` and ``_update(name, p, g,
    bufs)``, which returns ``(new_p, new_bufs)`` without writing anything.
    """

    name = None
    _buffer_names = ()

    def __init__(self):
        self._buffers = {b: {} for b in self._buffer_names}
        self._step = 0

    # -------------------------------------------------------------- public
    @property
    def hyperparams(self):
        """The constructor's arguments, as a dict."""
        return dict(self._hyper)

    @property
    def lr(self):
        return self._hyper["lr"]

    @property
    def step_count(self):
        """Number of steps taken so far."""
        return self._step

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._hyper.items())
        return f"{type(self).__name__}({args})"

    def reset(self):
        """Forget buffers and step count (hyperparameters stay)."""
        self._buffers = {b: {} for b in self._buffer_names}
        self._step = 0

    def step(self, params, grads):
        """Update ``params`` in place from ``grads``.

        Parameters
        ----------
        params : RNNParams
            Updated in place (the same arrays are written).
        grads : RNNParams
            Gradients of the same shapes and dtype; read only.

        Raises
        ------
        FloatingPointError
            If the update would make a parameter or buffer non-finite; then
            nothing is changed.
        """
        owner = type(self).__name__
        _check_pair(owner, params, grads)
        named_p, named_g = dict(params.items()), dict(grads.items())
        for bname, buf in self._buffers.items():
            if buf and set(buf) != set(named_p):
                raise ValueError(f"{owner}.step: buffer {bname} holds {sorted(buf)}, but params has "
                                 f"{list(named_p)} (state loaded for another model?)")
            for name, arr in buf.items():
                p = named_p[name]
                if arr.shape != p.shape or arr.dtype != p.dtype:
                    raise ValueError(f"{owner}.step: buffer {bname}.{name} has shape {arr.shape} and dtype "
                                     f"{arr.dtype}, but params.{name} has {p.shape} and {p.dtype} "
                                     "(state loaded for another model?)")
        self._step += 1
        try:
            new = {}
            for name, p in named_p.items():
                g = named_g[name]
                bufs = {b: self._buffers[b].get(name) for b in self._buffer_names}
                new_p, new_bufs = self._update(p, g, bufs)
                for label, arr in (("params", new_p), *new_bufs.items()):
                    if not np.all(np.isfinite(arr)):
                        raise FloatingPointError(
                            f"{owner}.step: the update of {name} gives non-finite values in {label} "
                            f"(step {self._step}); nothing was changed")
                new[name] = (new_p, new_bufs)
        except BaseException:
            self._step -= 1
            raise
        for name, (new_p, new_bufs) in new.items():
            np.copyto(named_p[name], new_p)
            for b, arr in new_bufs.items():
                self._buffers[b][name] = arr

    def state_dict(self):
        """A plain dict of the state (copies); see the module docstring."""
        return {
            "name": self.name,
            "hyperparams": self.hyperparams,
            "step": int(self._step),
            "buffers": {b: {n: a.copy() for n, a in buf.items()} for b, buf in self._buffers.items()},
        }

    def load_state_dict(self, state):
        """Restore a state produced by :meth:`state_dict` (checked first; copies are kept).

        Raises
        ------
        ValueError or TypeError
            If ``state`` is not such a dict, is for another optimizer, or holds
            buffers of inconsistent shapes, dtypes or non-finite values.
            Nothing is changed then.
        """
        owner = type(self).__name__
        if not isinstance(state, dict):
            raise TypeError(f"{owner}.load_state_dict: expected a dict, got {type(state).__name__}")
        missing = {"name", "hyperparams", "step", "buffers"} - set(state)
        if missing:
            raise ValueError(f"{owner}.load_state_dict: missing keys {sorted(missing)}")
        if state["name"] != self.name:
            raise ValueError(f"{owner}.load_state_dict: the state is for optimizer {state['name']!r}, "
                             f"not {self.name!r}")
        hyper = state["hyperparams"]
        if not isinstance(hyper, dict) or set(hyper) != set(self._hyper):
            raise ValueError(f"{owner}.load_state_dict: hyperparams must have keys {sorted(self._hyper)}, "
                             f"got {sorted(hyper) if isinstance(hyper, dict) else hyper!r}")
        fresh = type(self)(**hyper)   # validates the hyperparameters
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"{owner}.load_state_dict: step must be an int >= 0, got {step!r}")
        buffers = state["buffers"]
        if not isinstance(buffers, dict) or set(buffers) != set(self._buffer_names):
            raise ValueError(f"{owner}.load_state_dict: buffers must have keys {list(self._buffer_names)}, "
                             f"got {sorted(buffers) if isinstance(buffers, dict) else buffers!r}")
        new_buffers = {}
        for bname, buf in buffers.items():
            if not isinstance(buf, dict) or not all(isinstance(n, str) for n in buf):
                raise ValueError(f"{owner}.load_state_dict: buffer {bname!r} must be a dict mapping "
                                 "parameter names to arrays")
            arrays = {}
            for n in buf:
                a = buf[n]
                if not isinstance(a, np.ndarray) or a.dtype not in (np.float32, np.float64):
                    raise TypeError(f"{owner}.load_state_dict: {bname}.{n} must be a float32/float64 ndarray, "
                                    f"got {type(a).__name__} {getattr(a, 'dtype', '')}")
                if not np.all(np.isfinite(a)):
                    raise ValueError(f"{owner}.load_state_dict: {bname}.{n} holds non-finite values")
                arrays[n] = np.array(a, copy=True, order="C")
            if len({a.dtype for a in arrays.values()}) > 1:
                raise ValueError(f"{owner}.load_state_dict: buffer {bname!r} mixes dtypes")
            new_buffers[bname] = arrays
        shapes = {tuple((n, a.shape) for n, a in b.items()) for b in new_buffers.values() if b}
        if len(shapes) > 1:
            raise ValueError(f"{owner}.load_state_dict: buffers have different shapes: {sorted(shapes)}")
        if step == 0 and any(new_buffers.values()):
            raise ValueError(f"{owner}.load_state_dict: buffers present but step is 0")
        self._hyper = fresh._hyper
        self._step = int(step)
        self._buffers = new_buffers


class SGD(Optimizer):
    """Stochastic gradient descent with optional (Nesterov) momentum, as ``torch.optim.SGD``.

    Parameters
    ----------
    lr : float
        Learning rate (>= 0). Required, as in torch.
    momentum : float, default 0
    nesterov : bool, default False
        Needs ``momentum > 0``.
    weight_decay : float, default 0
        L2 penalty added to the gradient: ``g + weight_decay·p``.
    """

    name = "sgd"
    _buffer_names = ("momentum_buffer",)

    def __init__(self, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        o = "SGD"
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"{o}: nesterov must be a bool, got {nesterov!r}")
        self._hyper = {"lr": _check_number(o, "lr", lr),
                       "momentum": _check_number(o, "momentum", momentum),
                       "nesterov": bool(nesterov),
                       "weight_decay": _check_number(o, "weight_decay", weight_decay)}
        if nesterov and self._hyper["momentum"] <= 0:
            raise ValueError(f"{o}: nesterov=True requires momentum > 0, got momentum={momentum!r}")
        super().__init__()

    def _update(self, p, g, bufs):
        h = self._hyper
        if h["weight_decay"]:
            g = g + h["weight_decay"] * p
        new_bufs = {}
        if h["momentum"]:
            buf = bufs["momentum_buffer"]
            buf = g.copy() if buf is None else h["momentum"] * buf + g
            new_bufs["momentum_buffer"] = buf
            g = g + h["momentum"] * buf if h["nesterov"] else buf
        return p - h["lr"] * g, new_bufs


class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (bias-corrected; L2 weight decay added to the gradient).

    Parameters
    ----------
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
        Each in [0, 1).
    eps : float, default 1e-8
        Added to the bias-corrected ``√v``.
    weight_decay : float, default 0
    """

    name = "adam"
    _buffer_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        o = "Adam"
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{o}: betas must be a pair (beta1, beta2), got {betas!r}")
        self._hyper = {"lr": _check_number(o, "lr", lr),
                       "betas": (_check_number(o, "betas[0]", betas[0], high=1.0, high_open=True),
                                 _check_number(o, "betas[1]", betas[1], high=1.0, high_open=True)),
                       "eps": _check_number(o, "eps", eps),
                       "weight_decay": _check_number(o, "weight_decay", weight_decay)}
        super().__init__()

    def _update(self, p, g, bufs):
        h = self._hyper
        beta1, beta2 = h["betas"]
        t = self._step
        if h["weight_decay"]:
            g = g + h["weight_decay"] * p
        m, v = bufs["exp_avg"], bufs["exp_avg_sq"]
        if m is None:
            m, v = np.zeros_like(p), np.zeros_like(p)
        w = 1.0 - beta1                     # torch: exp_avg.lerp_(grad, 1 - beta1)
        m = m + w * (g - m) if w < 0.5 else g - (g - m) * (1.0 - w)
        v = beta2 * v + (1.0 - beta2) * (g * g)
        step_size = h["lr"] / (1.0 - beta1 ** t)
        denom = np.sqrt(v) / math.sqrt(1.0 - beta2 ** t) + h["eps"]
        return p - step_size * m / denom, {"exp_avg": m, "exp_avg_sq": v}


class RMSprop(Optimizer):
    """RMSprop, as ``torch.optim.RMSprop`` (not centered; eps added after the square root).

    Parameters
    ----------
    lr : float, default 1e-2
    alpha : float, default 0.99
        Smoothing constant of the squared-gradient average.
    eps : float, default 1e-8
    momentum : float, default 0
        With momentum > 0 a buffer (initialised to zeros) accumulates ``g/avg``.
    """

    name = "rmsprop"
    _buffer_names = ("square_avg", "momentum_buffer")

    def __init__(self, lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0):
        o = "RMSprop"
        self._hyper = {"lr": _check_number(o, "lr", lr),
                       "alpha": _check_number(o, "alpha", alpha),
                       "eps": _check_number(o, "eps", eps),
                       "momentum": _check_number(o, "momentum", momentum)}
        super().__init__()

    def _update(self, p, g, bufs):
        h = self._hyper
        v = bufs["square_avg"]
        if v is None:
            v = np.zeros_like(p)
        v = h["alpha"] * v + (1.0 - h["alpha"]) * (g * g)
        avg = np.sqrt(v) + h["eps"]
        new_bufs = {"square_avg": v}
        if h["momentum"] > 0:
            buf = bufs["momentum_buffer"]
            if buf is None:
                buf = np.zeros_like(p)
            buf = h["momentum"] * buf + g / avg
            new_bufs["momentum_buffer"] = buf
            return p - h["lr"] * buf, new_bufs
        return p - h["lr"] * g / avg, new_bufs


class Adagrad(Optimizer):
    """Adagrad, as ``torch.optim.Adagrad`` with ``lr_decay=0``, ``initial_accumulator_value=0``.

    Parameters
    ----------
    lr : float, default 1e-2
    eps : float, default 1e-10
        Added after the square root of the accumulated squares.
    """

    name = "adagrad"
    _buffer_names = ("sum",)

    def __init__(self, lr=1e-2, eps=1e-10):
        o = "Adagrad"
        self._hyper = {"lr": _check_number(o, "lr", lr), "eps": _check_number(o, "eps", eps)}
        super().__init__()

    def _update(self, p, g, bufs):
        h = self._hyper
        s = bufs["sum"]
        if s is None:
            s = np.zeros_like(p)
        s = s + g * g
        return p - h["lr"] * g / (np.sqrt(s) + h["eps"]), {"sum": s}


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "rmsprop": RMSprop, "adagrad": Adagrad}
DEFAULT_LR = {"sgd": 1e-2, "adam": 1e-3, "rmsprop": 1e-2, "adagrad": 1e-2}


def get_optimizer(optimizer, lr=None):
    """An optimizer instance from a name (``lr=None`` takes its default) or an instance.

    Parameters
    ----------
    optimizer : {"sgd", "adam", "rmsprop", "adagrad"} or Optimizer
    lr : float or None
        Only with a name; giving ``lr`` with an instance is an error.
    """
    if isinstance(optimizer, Optimizer):
        if lr is not None:
            raise ValueError("lr: set the learning rate on the optimizer instance; lr= only applies "
                             f"when optimizer is a name, got lr={lr!r} with {optimizer!r}")
        return optimizer
    if not isinstance(optimizer, str) or optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {list(OPTIMIZERS)} or a fastbptt.optim.Optimizer "
                         f"instance, got {optimizer!r}")
    name = optimizer.lower()
    return OPTIMIZERS[name](lr=DEFAULT_LR[name] if lr is None else lr)


def from_state_dict(state):
    """Build an optimizer from a :meth:`Optimizer.state_dict` (name, hyperparameters and state)."""
    if not isinstance(state, dict) or state.get("name") not in OPTIMIZERS:
        name = state.get("name") if isinstance(state, dict) else state
        raise ValueError(f"optimizer state: expected one of {list(OPTIMIZERS)} as 'name', got {name!r}")
    hyper = state.get("hyperparams")
    if not isinstance(hyper, dict):
        raise ValueError(f"optimizer state: 'hyperparams' must be a dict, got {hyper!r}")
    try:
        opt = OPTIMIZERS[state["name"]](**hyper)
    except TypeError as exc:
        raise ValueError(f"optimizer state: bad hyperparams {hyper!r}: {exc}") from None
    opt.load_state_dict(state)
    return opt
