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

Where the Cython extension is built, each rule runs as one compiled pass over
the flat arrays (``backends/cython/update.pyx``), bit-identical to the NumPy
code of the optimizer's ``_update``, which runs otherwise.

A step never leaves non-finite parameters behind: every new value is
computed first, and if any parameter or buffer would become NaN or inf the
step raises ``FloatingPointError`` and changes nothing.

A step is all or nothing, interrupts included: the new parameters, buffers
and step count are computed on the side, then written by one call that no
``KeyboardInterrupt`` can cut in half (:func:`fastbptt._atomic.commit`). After
an interrupt at any point the parameters are those of the last completed
step and ``step_count`` counts exactly the steps they have taken.

Schedules
---------
The learning rate can be set between steps (``opt.lr = 0.01``). A schedule
is a callable ``factor(step)`` of the number of steps already taken (0 before
the first), by which the base learning rate is multiplied before each step,
as ``torch.optim.lr_scheduler.LambdaLR`` does: :class:`StepDecay`,
:class:`CosineDecay`, :class:`Warmup` (which can lead into another), or any
function. ``fastbptt.RNN(lr_schedule=...)`` applies one before every
optimizer step; the built-in ones are saved with the model.

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
import operator
from collections import namedtuple

import numpy as np

from ._atomic import commit
from .params import RNNParams
from ._threads import call_scope
from ._validation import _all_finite

__all__ = ["Optimizer", "SGD", "Adam", "RMSprop", "Adagrad", "get_optimizer", "OPTIMIZERS",
           "Schedule", "StepDecay", "CosineDecay", "Warmup", "schedule_from_config"]


def _check_number(owner, name, value, *, low=0.0, high=None, high_open=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{owner}: {name} must be a finite real number, got {value!r}")
    value = float(value)
    if value < low or (high is not None and (value >= high if high_open else value > high)):
        bound = f"[{low}, {high})" if high_open else (f"[{low}, {high}]" if high is not None else f">= {low}")
        raise ValueError(f"{owner}: {name} must be in {bound}, got {value!r}")
    return value


def _check_pair(owner, a, b):
    """The arrays of params ``a`` and grads ``b``, checked to match (structure, shapes, dtypes)
    and ``a``'s to be writable."""
    if not isinstance(a, RNNParams):
        raise TypeError(f"{owner}.step: params must be an RNNParams, got {type(a).__name__}")
    if not isinstance(b, RNNParams):
        raise TypeError(f"{owner}.step: grads must be an RNNParams, got {type(b).__name__}")
    pa, ga = a.arrays(), b.arrays()
    if (len(pa) != len(ga) or len(a.layers) != len(b.layers) or a.bidirectional != b.bidirectional
            or a.has_head != b.has_head):
        raise ValueError(f"{owner}.step: grads must match params field for field; expected "
                         f"{list(a.names())}, got {list(b.names())}")
    for p, g in zip(pa, ga):
        if p.shape != g.shape or p.dtype != g.dtype or not p.flags.writeable:
            for name, p, g in zip(a.names(), pa, ga):
                if p.shape != g.shape or p.dtype != g.dtype:
                    raise ValueError(f"{owner}.step: grads.{name} has shape {g.shape} and dtype {g.dtype}, "
                                     f"expected {p.shape} and {p.dtype} as params.{name}")
                if not p.flags.writeable:
                    raise ValueError(f"{owner}.step: params.{name} is read-only; the step updates the "
                                     "parameters in place")
    return pa, ga


class _Workspace:
    """The arrays a step computes in, kept from step to step: temporaries, and buffers for the
    new optimizer state. A new buffer goes into an array the committed state does not hold (the
    state before it, double buffering), so an interrupted step leaves the committed one intact."""

    def __init__(self):
        self.n, self.dtype, self.tmps, self.spare, self.taken = 0, None, [], [], []
        self.clip, self.flags = 0.0, None
        self._split_key = self._split = None
        self._left = None           # the buffers the last step committed (recycle's argument)

    def prepare(self, n, dtype, committed):
        if n != self.n or dtype != self.dtype:
            self.n, self.dtype, self.tmps, self.spare = n, dtype, [], []
            self._split_key = self._split = None
        elif committed is not self._left:      # (else no spare array is one of them: recycle's)
            held = {id(a) for a in committed.values()}
            self.spare = [a for a in self.spare if id(a) not in held]
        self.taken = []
        self.flags = None       # a compiled rule's result (0: every value it read and wrote finite)

    def tmp(self, i):
        """Temporary ``i`` (0 may hold the gradient, 3 the parameters)."""
        while len(self.tmps) <= i:
            self.tmps.append(np.empty(self.n, dtype=self.dtype))
        return self.tmps[i]

    def buffer(self, committed):
        """An array for a new buffer (``committed`` the buffer it replaces, or None)."""
        arr = self.spare.pop() if self.spare else np.empty(self.n, dtype=self.dtype)
        if committed is not None:
            self.taken.append(committed)        # spare once the step is committed
        return arr

    def split(self, layout, flat):
        """``layout.split(flat)``, kept while ``flat`` is the same array (a temporary, reused)."""
        key = (id(flat), layout)
        if self._split_key != key:
            self._split_key, self._split = key, layout.split(flat)
        return self._split

    def recycle(self, committed):
        """After a commit of the buffers ``committed``: the ones they replaced are free for the next step."""
        self.spare.extend(self.taken)
        self.taken = []
        self._left = committed


class _Layout(namedtuple("_Layout", "names shapes offsets dtype")):
    """Where each parameter sits in an optimizer's flat buffers (canonical order)."""

    @classmethod
    def of(cls, names, arrays):
        offsets = [0]
        for a in arrays:
            offsets.append(offsets[-1] + a.size)
        return cls(tuple(names), tuple(a.shape for a in arrays), tuple(offsets), arrays[0].dtype)

    def split(self, flat):
        """Views of ``flat``, one per parameter, shaped as the parameters."""
        o = self.offsets
        return [flat[o[i]:o[i + 1]].reshape(shape) for i, shape in enumerate(self.shapes)]

    def where(self, index):
        """The name of the parameter that holds flat ``index``."""
        return self.names[int(np.searchsorted(self.offsets, index, side="right")) - 1]


# Everything a step changes besides the parameters, swapped in one piece: the step count,
# the layout of the buffers, and the buffers (name -> flat array over all parameters).
_State = namedtuple("_State", "step layout buffers")
_EMPTY = _State(0, None, {})
# A step's checks of its arrays (_check_pair, _buffers_for), valid for the next step while the
# parameters and gradients are the same arrays and the optimizer's state is the one it committed.
_Checked = namedtuple("_Checked", "params grads layout flat_p in_place state")


def _same(a, b):
    """Whether the sequences hold the same objects."""
    return len(a) == len(b) and all(map(operator.is_, a, b))


_PARAMS_TMP = 3     # the workspace temporary that holds the parameters (those below: the rules')


def _flat(arrays):
    """The arrays one after the other, as one 1-D array (a copy, except for a single array)."""
    if len(arrays) == 1:
        return arrays[0].ravel()
    return np.concatenate([a.ravel() for a in arrays])


def _address(a):
    return a.__array_interface__["data"][0]


def _one_buffer(arrays):
    """The 1-D array whose consecutive slices the ``arrays`` are, if they are views of one
    contiguous buffer in order (``fastbptt.RNN`` keeps its parameters so), else None. Then a
    step reads them without a copy and writes them with one."""
    base = arrays[0].base
    if base is None or not all(a.base is base and a.flags.c_contiguous for a in arrays):
        return None
    base = base.reshape(-1) if base.flags.c_contiguous else None
    if base is None or base.dtype != arrays[0].dtype:
        return None
    start = (_address(arrays[0]) - _address(base)) // base.itemsize
    pos = _address(arrays[0])
    for a in arrays:
        if _address(a) != pos:
            return None
        pos += a.nbytes
    return base[start:start + sum(a.size for a in arrays)]


class _GradientNotFinite(Exception):
    """Raised by ``Optimizer._step(..., check=c)`` when a gradient is NaN or inf (nothing changed)."""


_COMPILED = []     # [module or None] once looked up


def _compiled():
    """The optimizers' element-wise rules in one compiled pass each (``backends/cython/update.pyx``,
    bit-identical to the NumPy code of each ``_update``), or None without the Cython extension."""
    if not _COMPILED:
        try:
            from .backends.cython import update
        except ImportError:
            update = None
        _COMPILED.append(update)
    return _COMPILED[0]


class Optimizer:
    """Base class: hyperparameters, per-parameter buffers, a step count.

    Subclasses define ``name``, ``_buffer_names`` and ``_update(p, g, bufs, t, ws)``,
    which takes the parameters and gradients as flat arrays (every parameter
    one after the other; ``g`` is a copy it may overwrite), the buffers as
    flat arrays (or None before the first step), the number ``t`` of the step
    being taken and a workspace ``ws``, and returns ``(new_p, new_bufs)``
    without writing to ``p`` or the buffers. New values go into the
    workspace's arrays (``ws.tmp(i)`` for i = 1, 2 or from 4 on -- 0 and 3 may
    hold ``g`` and ``p`` -- and ``ws.buffer(name)`` for a new buffer): a step
    allocates nothing, where fresh arrays of this size cost their page faults
    again every step (half of an SGD step at H=256).
    """

    name = None
    _buffer_names = ()

    def __init__(self):
        self._state = _EMPTY
        self._layout_cache = (None, None, None)
        self._ws = _Workspace()
        self._checked = None    # _Checked: what the last step checked, while its arrays and state stand

    # -------------------------------------------------------------- public
    @property
    def hyperparams(self):
        """The constructor's arguments, as a dict."""
        return dict(self._hyper)

    @property
    def lr(self):
        """The learning rate; can be set between steps (a schedule)."""
        return self._hyper["lr"]

    @lr.setter
    def lr(self, value):
        value = _check_number(type(self).__name__, "lr", value)
        self._hyper = {**self._hyper, "lr": value}          # one assignment: never half-set

    @property
    def step_count(self):
        """Number of steps taken so far."""
        return self._state.step

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._hyper.items())
        return f"{type(self).__name__}({args})"

    def reset(self):
        """Forget buffers and step count (hyperparameters stay)."""
        self._state = _EMPTY

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

        All or nothing: the new values are computed first and written by one
        call that an interrupt cannot cut in half (see the module docstring).
        """
        with call_scope():      # its dot products on BLAS pinned to one thread, as every call
            self._step(params, grads)

    def _step(self, params, grads, flat_g=None, check=None):
        """:meth:`step`'s work. ``flat_g``: the 1-D array whose consecutive slices ``grads``' arrays
        are (a caller that made them so); a compiled rule, which does not write it, reads it as is.

        ``check``: None (the caller checked the gradients), or a float c >= 0 where
        :meth:`_checks_gradients`: the compiled rule checks them as it reads them (raising
        :class:`_GradientNotFinite` before anything changes) and clamps them into [-c, c] when
        c > 0, as :func:`fastbptt.clip_grad_value` would first (the gradients are not written)."""
        owner = type(self).__name__
        state = self._state
        # a compiled rule reads g without writing it, and takes p as the parameters' arrays
        fast = _compiled() if type(self)._update in _COMPILED_RULES else None
        checked = self._checked
        if (checked is not None and checked.state is state and type(params) is RNNParams
                and type(grads) is RNNParams and _same(checked.params, params.arrays())
                and _same(checked.grads, grads.arrays()) and (
                    fast is not None and checked.in_place and checked.flat_p is None       # commit_parts
                    or checked.flat_p is not None and all(a.flags.writeable for a in checked.params))):
            # the same arrays as the last step, which this optimizer's state is from: checked then,
            # but for being writable (commit_parts checks that before its first write)
            p_arrays, g_arrays, layout, flat_p, in_place, buffers = (
                checked.params, checked.grads, checked.layout, checked.flat_p, checked.in_place, state.buffers)
        else:
            p_arrays, g_arrays = _check_pair(owner, params, grads)
            layout, flat_p, buffers = self._buffers_for(owner, params, p_arrays, state)
            in_place = fast is not None and len(p_arrays) <= fast.MAX_PARTS and all(
                a.flags.c_contiguous for a in p_arrays)
        t = state.step + 1
        ws = self._ws
        ws.prepare(layout.offsets[-1], layout.dtype, state.buffers)
        ws.clip = 0.0 if check is None else check
        if flat_g is None or fast is None:
            g = np.concatenate([a.ravel() for a in g_arrays], out=ws.tmp(0))
        else:
            g = flat_g
        if flat_p is not None:
            p = flat_p
        elif in_place:
            p = p_arrays            # the compiled rule reads them where they are
        else:                   # into a temporary no rule writes: no new array at each step
            p = np.concatenate([a.ravel() for a in p_arrays], out=ws.tmp(_PARAMS_TMP))
        new_p, new_bufs = self._update(p, g, {b: buffers.get(b) for b in self._buffer_names}, t, ws)
        flags = ws.flags
        if check is not None and (flags is None or flags & fast.GRAD_BAD):
            if flags is None:
                raise RuntimeError(f"{owner}.step: check= needs a compiled rule")
            raise _GradientNotFinite
        for label, arr in () if flags == 0 else (("params", new_p), *new_bufs.items()):
            if not _all_finite(arr):
                name = layout.where(int(np.flatnonzero(~np.isfinite(arr))[0]))
                raise FloatingPointError(
                    f"{owner}.step: the update of {name} gives non-finite values in {label} "
                    f"(step {t}); nothing was changed")
        new_state = _State(t, layout, new_bufs)
        try:            # (each refuses a read-only array before its first write)
            if flat_p is not None:
                commit((flat_p,), (new_p,), self, _state=new_state)
            elif p is p_arrays:
                fast.commit_parts(p_arrays, new_p, vars(self), "_state", new_state)
            else:
                commit(p_arrays, ws.split(layout, new_p), self, _state=new_state)
        except ValueError:      # a parameter made read-only since the last step's checks: say which
            _check_pair(owner, params, grads)
            raise
        ws.recycle(new_bufs)
        self._checked = _Checked(p_arrays, g_arrays, layout, flat_p, in_place, new_state)

    def _checks_gradients(self):
        """Whether :meth:`_step` can take ``check=``: this optimizer's rule is a compiled one."""
        return type(self)._update in _COMPILED_RULES and _compiled() is not None

    def _buffers_for(self, owner, params, p_arrays, state):
        """``(layout, flat_params, buffers)`` of this step: the buffers in ``params``' order
        (reordered if they were loaded in another order), checked to fit ``params``, and the one
        buffer the parameters are views of (or None). Computes only, writes nothing but a cache."""
        key = tuple(map(id, p_arrays))
        cached_key, layout, flat_p = self._layout_cache
        if cached_key != key or layout.shapes != tuple(a.shape for a in p_arrays) or layout.dtype != p_arrays[0].dtype:
            layout, flat_p = _Layout.of(params.names(), p_arrays), _one_buffer(p_arrays)
            self._layout_cache = (key, layout, flat_p)
        have = state.layout
        if have is None or have == layout:
            return layout, flat_p, state.buffers
        if set(have.names) != set(layout.names) or have.dtype != layout.dtype or any(
                have.shapes[have.names.index(n)] != s for n, s in zip(layout.names, layout.shapes)):
            bname = next(iter(state.buffers), "?")
            described = ", ".join(f"{n} {s}" for n, s in zip(have.names, have.shapes))
            raise ValueError(f"{owner}.step: buffer {bname} holds {described} ({have.dtype}), but params "
                             f"has {', '.join(f'{n} {s}' for n, s in zip(layout.names, layout.shapes))} "
                             f"({layout.dtype}) (state loaded for another model?)")
        order = [have.names.index(n) for n in layout.names]
        buffers = {b: _flat([have.split(flat)[i] for i in order]) for b, flat in state.buffers.items()}
        return layout, flat_p, buffers

    def state_dict(self):
        """A plain dict of the state (copies); see the module docstring."""
        state = self._state
        buffers = {b: {} for b in self._buffer_names}
        for b, flat in state.buffers.items():
            buffers[b] = {n: v.copy() for n, v in zip(state.layout.names, state.layout.split(flat))}
        return {"name": self.name, "hyperparams": self.hyperparams, "step": int(state.step),
                "buffers": buffers}

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
                if not np.isfinite(a).all():
                    raise ValueError(f"{owner}.load_state_dict: {bname}.{n} holds non-finite values")
                arrays[n] = a
            if arrays:
                new_buffers[bname] = arrays
        layouts = {bname: _Layout.of(list(buf), list(buf.values())) if len({a.dtype for a in buf.values()}) == 1
                   else None for bname, buf in new_buffers.items()}
        if any(lay is None for lay in layouts.values()):
            raise ValueError(f"{owner}.load_state_dict: a buffer mixes dtypes")
        shapes = {tuple(sorted(zip(lay.names, lay.shapes))) + (lay.dtype.name,) for lay in layouts.values()}
        if len(shapes) > 1:
            raise ValueError(f"{owner}.load_state_dict: buffers have different shapes: {sorted(shapes)}")
        if step == 0 and new_buffers:
            raise ValueError(f"{owner}.load_state_dict: buffers present but step is 0")
        layout = next(iter(layouts.values()), None)
        flats = {}
        for bname, buf in new_buffers.items():          # each in the first buffer's order, copied
            flats[bname] = np.array(_flat([buf[n] for n in layout.names]), copy=True)
        new_state = _State(int(step), layout, flats)
        commit((), (), self, _hyper=fresh._hyper, _state=new_state)

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

    def _update(self, p, g, bufs, t, ws):
        h = self._hyper
        new_p = ws.tmp(1)
        fast = _compiled()
        if fast is not None:
            buf = bufs["momentum_buffer"]
            new = ws.buffer(buf) if h["momentum"] else None
            ws.flags = fast.sgd(p, g, buf, new, new_p, h["lr"], h["momentum"], h["nesterov"], h["weight_decay"],
                                ws.clip)
            return new_p, ({"momentum_buffer": new} if h["momentum"] else {})
        if h["weight_decay"]:
            g += np.multiply(p, h["weight_decay"], out=new_p)             # g + wd·p
        new_bufs = {}
        if h["momentum"]:
            buf = bufs["momentum_buffer"]
            new = ws.buffer(buf)
            if buf is None:
                new[...] = g                                              # buf = g (first step)
            else:
                np.multiply(buf, h["momentum"], out=new)
                new += g                                                  # momentum·buf + g
            new_bufs["momentum_buffer"] = new
            if h["nesterov"]:
                g += np.multiply(new, h["momentum"], out=new_p)           # g + momentum·buf
            else:
                g = new
        np.multiply(g, h["lr"], out=new_p)
        return np.subtract(p, new_p, out=new_p), new_bufs                 # p - lr·g


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

    def _update(self, p, g, bufs, t, ws):
        h = self._hyper
        beta1, beta2 = h["betas"]
        denom, new_p = ws.tmp(1), ws.tmp(2)
        m, v = bufs["exp_avg"], bufs["exp_avg_sq"]
        fast = _compiled()
        if fast is not None:
            new_m, new_v = ws.buffer(m), ws.buffer(v)
            ws.flags = fast.adam(p, g, m, v, new_m, new_v, new_p, h["lr"], beta1, beta2, h["eps"],
                                 h["weight_decay"], t, ws.clip)
            return new_p, {"exp_avg": new_m, "exp_avg_sq": new_v}
        if h["weight_decay"]:
            g += np.multiply(p, h["weight_decay"], out=new_p)             # g + wd·p
        new_m, new_v = ws.buffer(m), ws.buffer(v)
        if m is None:
            m, v = np.zeros_like(p), np.zeros_like(p)
        w = 1.0 - beta1                     # torch: exp_avg.lerp_(grad, 1 - beta1)
        np.subtract(g, m, out=new_m)
        if w < 0.5:
            new_m *= w
            new_m += m                                                    # m + w·(g - m)
        else:
            new_m *= 1.0 - w
            np.subtract(g, new_m, out=new_m)                              # g - (g - m)·(1 - w)
        np.multiply(g, g, out=g)
        g *= 1.0 - beta2
        np.multiply(v, beta2, out=new_v)
        new_v += g                                                        # β2·v + (1 - β2)·g²
        step_size = h["lr"] / (1.0 - beta1 ** t)
        np.sqrt(new_v, out=denom)
        denom /= math.sqrt(1.0 - beta2 ** t)
        denom += h["eps"]                                                 # √v / √(1 - β2^t) + eps
        np.multiply(new_m, step_size, out=new_p)
        new_p /= denom
        return np.subtract(p, new_p, out=new_p), {"exp_avg": new_m, "exp_avg_sq": new_v}


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

    def _update(self, p, g, bufs, t, ws):
        h = self._hyper
        avg, new_p = ws.tmp(1), ws.tmp(2)
        v = bufs["square_avg"]
        new_v = ws.buffer(v)
        fast = _compiled()
        if fast is not None:
            buf = bufs.get("momentum_buffer")
            new_buf = ws.buffer(buf) if h["momentum"] > 0 else None
            ws.flags = fast.rmsprop(p, g, v, buf, new_v, new_buf, new_p, h["lr"], h["alpha"], h["eps"],
                                    h["momentum"], ws.clip)
            return new_p, ({"square_avg": new_v, "momentum_buffer": new_buf} if h["momentum"] > 0
                           else {"square_avg": new_v})
        if v is None:
            v = np.zeros_like(p)
        np.multiply(g, g, out=avg)
        avg *= 1.0 - h["alpha"]
        np.multiply(v, h["alpha"], out=new_v)
        new_v += avg                                                      # α·v + (1 - α)·g²
        np.sqrt(new_v, out=avg)
        avg += h["eps"]                                                   # √v + eps
        new_bufs = {"square_avg": new_v}
        if h["momentum"] > 0:
            buf = bufs["momentum_buffer"]
            new_buf = ws.buffer(buf)
            if buf is None:
                buf = np.zeros_like(p)
            np.multiply(buf, h["momentum"], out=new_buf)
            new_buf += np.divide(g, avg, out=new_p)                       # momentum·buf + g/avg
            new_bufs["momentum_buffer"] = new_buf
            np.multiply(new_buf, h["lr"], out=new_p)
            return np.subtract(p, new_p, out=new_p), new_bufs             # p - lr·buf
        np.multiply(g, h["lr"], out=new_p)
        new_p /= avg
        return np.subtract(p, new_p, out=new_p), new_bufs                 # p - lr·g/avg


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

    def _update(self, p, g, bufs, t, ws):
        h = self._hyper
        denom, new_p = ws.tmp(1), ws.tmp(2)
        s = bufs["sum"]
        new_s = ws.buffer(s)
        fast = _compiled()
        if fast is not None:
            ws.flags = fast.adagrad(p, g, s, new_s, new_p, h["lr"], h["eps"], ws.clip)
            return new_p, {"sum": new_s}
        if s is None:
            s = np.zeros_like(p)
        np.add(s, np.multiply(g, g, out=denom), out=new_s)                # s + g²
        np.sqrt(new_s, out=denom)
        denom += h["eps"]
        np.multiply(g, h["lr"], out=new_p)
        new_p /= denom
        return np.subtract(p, new_p, out=new_p), {"sum": new_s}           # p - lr·g/(√s + eps)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "rmsprop": RMSprop, "adagrad": Adagrad}
_COMPILED_RULES = {cls._update for cls in OPTIMIZERS.values()}     # (a subclass may override _update)
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


# ---------------------------------------------------------------------------- schedules

def _check_steps(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int >= 1 (optimizer steps), got {value!r}")
    if value < 1:
        raise ValueError(f"{owner}: {name} must be an int >= 1 (optimizer steps), got {value!r}")
    return int(value)


class Schedule:
    """A learning-rate schedule: ``schedule(step)`` is the factor of the base learning rate for the
    optimizer step that follows ``step`` completed ones. ``config()`` describes it (saved with a
    model; :func:`schedule_from_config` rebuilds it)."""

    kind = None

    def __call__(self, step):
        raise NotImplementedError

    def config(self):
        return {"kind": self.kind, **{k: (v.config() if isinstance(v, Schedule) else v)
                                       for k, v in self._args.items()}}

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._args.items())})"

    def __eq__(self, other):
        return type(other) is type(self) and other._args == self._args

    __hash__ = None


class StepDecay(Schedule):
    """``gamma ** (step // every)``: the learning rate times ``gamma`` every ``every`` steps
    (``torch.optim.lr_scheduler.StepLR`` counted in optimizer steps)."""

    kind = "step"

    def __init__(self, every, gamma=0.1):
        o = "StepDecay"
        self._args = {"every": _check_steps(o, "every", every), "gamma": _check_number(o, "gamma", gamma)}

    def __call__(self, step):
        return self._args["gamma"] ** (step // self._args["every"])


class CosineDecay(Schedule):
    """From 1 down to ``min_factor`` along half a cosine over ``total`` steps, then ``min_factor``
    (``CosineAnnealingLR`` with ``eta_min = min_factor · lr``)."""

    kind = "cosine"

    def __init__(self, total, min_factor=0.0):
        o = "CosineDecay"
        self._args = {"total": _check_steps(o, "total", total),
                      "min_factor": _check_number(o, "min_factor", min_factor, high=1.0)}

    def __call__(self, step):
        total, low = self._args["total"], self._args["min_factor"]
        if step >= total:
            return low
        return low + (1.0 - low) * 0.5 * (1.0 + math.cos(math.pi * step / total))


class Warmup(Schedule):
    """A linear warm-up, ``(step + 1) / steps`` for the first ``steps`` steps, then ``then`` (a
    schedule, counted from the end of the warm-up; None: 1)."""

    kind = "warmup"

    def __init__(self, steps, then=None):
        o = "Warmup"
        if then is not None and not isinstance(then, Schedule):
            raise TypeError(f"{o}: then must be a fastbptt.optim schedule or None, got {then!r}")
        self._args = {"steps": _check_steps(o, "steps", steps), "then": then}

    def __call__(self, step):
        steps, then = self._args["steps"], self._args["then"]
        if step < steps:
            return (step + 1) / steps * (then(0) if then is not None else 1.0)
        return then(step - steps) if then is not None else 1.0


_SCHEDULES = {cls.kind: cls for cls in (StepDecay, CosineDecay, Warmup)}


def schedule_from_config(config):
    """Rebuild a schedule from its :meth:`Schedule.config` (ValueError if it is not one)."""
    if not isinstance(config, dict) or config.get("kind") not in _SCHEDULES:
        raise ValueError(f"lr_schedule: expected a config with 'kind' in {list(_SCHEDULES)}, got {config!r}")
    args = {k: v for k, v in config.items() if k != "kind"}
    if isinstance(args.get("then"), dict):
        args["then"] = schedule_from_config(args["then"])
    try:
        return _SCHEDULES[config["kind"]](**args)
    except TypeError as exc:
        raise ValueError(f"lr_schedule: bad config {config!r} ({exc})") from None
