"""``fastbptt.torch.RNN``: a drop-in for ``torch.nn.RNN`` whose forward and backward run on fastbptt.

Change one line of a torch script::

    rnn = torch.nn.RNN(input_size, hidden_size, num_layers=2)           # before
    rnn = fastbptt.torch.RNN(input_size, hidden_size, num_layers=2)     # after

and the rest -- torch optimizers, ``clip_grad_norm_``, ``state_dict``,
``PackedSequence``, ``torch.compile`` -- stays as it is. The module has
``nn.RNN``'s constructor, parameters (names, shapes, initialisation: the same
values under the same ``torch.manual_seed``) and ``forward(input, hx=None)
-> (output, h_n)``; its gradients are those of ``nn.RNN`` (``bias_ih`` and
``bias_hh`` each receive the gradient of their sum).

How it is built (thin: no second implementation of anything):

- The forward calls :func:`fastbptt.rnn_vjp` on NumPy views of the tensors
  (``Tensor.numpy()``: no copy, whatever the strides; the batch-first
  transpose is a view too) and wraps its results with ``torch.from_numpy``
  (no copy); the backward calls the ``vjp`` it returned (``b_ih`` and
  ``b_hh`` each get db_h). Under ``torch.no_grad()`` it calls
  :func:`fastbptt.rnn` and keeps nothing.
- Two torch custom ops, ``fastbptt::rnn`` (the forward of a stack, as
  ``torch._VF.rnn_tanh``: flat weights ``[w_ih, w_hh, b_ih, b_hh]`` per
  (layer, direction) in torch's order) and ``fastbptt::rnn_backward``, tied
  together by ``register_autograd``; ``register_fake`` gives their shapes, so
  ``torch.compile`` keeps each as one opaque node of its graph. The ``vjp``
  is kept alive by a small tensor the forward op also returns (the *handle*,
  as cuDNN's RNN returns a reserve buffer): the graph saves it, the backward
  op finds the ``vjp`` through it, and the ``vjp`` is freed with the graph. A
  backward op given a handle it does not know recomputes the forward from
  the saved inputs instead: slower, same result.
- Eager calls (not traced, plain tensors) skip the ops' Python wrappers and
  go through an ``autograd.Function`` that keeps the ``vjp`` on its graph
  node: the same two functions underneath, ~0.2 ms less per call (see
  :class:`_RNNFunction`). Both paths are tested against ``nn.RNN``.
- Dropout between layers is torch's ``F.dropout`` on each layer's output
  (on the packed data for a ``PackedSequence``, as ``nn.RNN`` does, so the
  same seed draws the same mask): in training mode with ``dropout > 0`` the
  op runs one layer at a time; otherwise it runs the whole stack in one call.
- ``PackedSequence`` input is unpacked into padded time-major form in its
  sorted order plus ``lengths`` (fastbptt's variable-length sequences), and
  the output is packed back with the input's ``batch_sizes``,
  ``sorted_indices`` and ``unsorted_indices``; ``hx`` and ``h_n`` are
  permuted as ``nn.RNN`` permutes them.

Threads: a call never takes more threads than ``torch.get_num_threads()``
(nor than ``fastbptt.get_num_threads()``), and takes one thread unless a step
is large (``B·H² >= SPLIT_MIN_BHH``): torch's OpenMP threads keep spinning a
while after its own parallel ops, and a second fastbptt thread that must meet
them at every time step loses more than it wins. torch's pools and the BLAS
pools are left as they were (fastbptt pins the NumPy/SciPy BLAS to one thread
inside a call and restores them when it returns).

torch is imported here only: ``import fastbptt`` does not import it.
"""

import threading
import weakref
from contextlib import contextmanager
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import get_num_threads as _fb_get_num_threads, set_num_threads as _fb_set_num_threads
from .functional import _rnn_vjp_trusted as _fb_rnn_vjp, rnn as _fb_rnn   # the private trusted rnn_vjp
from .params import RNNParams

__all__ = ["RNN", "rnn"]

_DTYPES = (torch.float32, torch.float64)
_ACTIVATIONS = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}


# ------------------------------------------------------------------ checks
def _check_tensor(name, t):
    """CPU, float32 or float64: anything else is for torch.nn.RNN."""
    if t.device.type != "cpu":
        raise RuntimeError(f"fastbptt.torch.RNN: {name} is on device {t.device}; fastbptt runs on the CPU only. "
                           f"Use torch.nn.RNN for {t.device.type} tensors (or move them with .cpu()).")
    if t.dtype not in _DTYPES:
        raise TypeError(f"fastbptt.torch.RNN: {name} has dtype {t.dtype}; fastbptt computes in float32 or "
                        f"float64 only. Use torch.nn.RNN for {t.dtype} (or convert with .float() / .double()).")


def _check_stack(input, hx, weights, has_biases, num_layers, bidirectional, lengths):
    """The op's own checks (the module checks first with nn.RNN's messages; these guard direct calls)."""
    dirs = 2 if bidirectional else 1
    per = 4 if has_biases else 2
    if num_layers < 1 or len(weights) != per * num_layers * dirs:
        raise ValueError(f"fastbptt::rnn: expected {per} weights per (layer, direction), "
                         f"{per * num_layers * dirs} in all, got {len(weights)}")
    _check_tensor("input", input)
    for i, w in enumerate(weights):
        _check_tensor(f"weights[{i}]", w)
        if w.dtype != input.dtype:
            raise TypeError(f"fastbptt::rnn: weights[{i}] has dtype {w.dtype}, input {input.dtype}")
    if input.dim() != 3:
        raise ValueError(f"fastbptt::rnn: expected input of shape (T, B, D), got {tuple(input.shape)}")
    T, B, _ = input.shape
    H = weights[1].shape[0]
    if hx is not None:
        _check_tensor("hx", hx)
        if tuple(hx.shape) != (num_layers * dirs, B, H):
            raise ValueError(f"fastbptt::rnn: expected hx of shape {(num_layers * dirs, B, H)}, "
                             f"got {tuple(hx.shape)}")
        if hx.dtype != input.dtype:
            raise TypeError(f"fastbptt::rnn: hx has dtype {hx.dtype}, input {input.dtype}")
    if lengths is not None and (lengths.device.type != "cpu" or lengths.dim() != 1 or lengths.shape[0] != B):
        raise ValueError(f"fastbptt::rnn: expected lengths a 1-D CPU tensor of size B={B}, "
                         f"got shape {tuple(lengths.shape)} on {lengths.device}")


# ------------------------------------------------------- tensors <-> arrays
def _np(t):
    """A NumPy view of a CPU tensor (no copy, any strides)."""
    return t.detach().resolve_neg().numpy()


def _params(weights, has_biases, bidirectional):
    """RNNParams (no head) over views of the flat weights; ``b_h = b_ih + b_hh``."""
    per = 4 if has_biases else 2
    layers = []
    for i in range(0, len(weights), per):
        W_xh, W_hh = _np(weights[i]), _np(weights[i + 1])
        if has_biases:
            b_h = _np(weights[i + 2]) + _np(weights[i + 3])
        else:
            b_h = np.zeros(W_hh.shape[0], dtype=W_hh.dtype)
        layers.append((W_xh, W_hh, b_h))
    return RNNParams(layers=layers, bidirectional=bool(bidirectional))


def _lengths_kw(lengths):
    # only given when there are lengths, so that the full-length path does not depend on them
    return {} if lengths is None else {"lengths": _np(lengths).astype(np.int64, copy=False)}


def _states_in(hx):
    """(L·dirs, B, H) -> what fastbptt takes: (B, H) for one unidirectional layer (None: zeros)."""
    if hx is None:
        return None
    h0 = _np(hx)
    return h0[0] if h0.shape[0] == 1 else h0


# --------------------------------------------------------------- threads
# Inside a torch program fastbptt's second thread pays only for large steps: torch's OpenMP
# threads keep spinning for a while after each parallel torch op (the head, the loss, the
# optimizer), and a team that splits every time step then waits for a core they hold.
# A training step (this module + nn.Linear head + mse, torch on 2 threads), fastbptt on 1 vs 2
# threads, best of 7 (ms): T,B,D,H = 1000,1,8,32: 0.95 vs 1.19; 100,32,16,64: 2.54 vs 3.21;
# 50,32,98,128: 4.09 vs 4.69; 100,64,32,128: 12.4 vs 10.4; 50,16,64,256: 6.75 vs 6.07. With
# OMP_WAIT_POLICY=PASSIVE (torch's threads sleep at once) 2 threads won from 100,32,16,64 on,
# but torch's own ops got slower by more. So: one thread below B·H² = 2^20 per step.
SPLIT_MIN_BHH = 1 << 20

_budget_lock = threading.Lock()
_budget_users = 0
_budget_saved = None


def _team(B, H):
    """fastbptt's threads for a call on B rows of H units: at most torch's, one below SPLIT_MIN_BHH."""
    if B * H * H < SPLIT_MIN_BHH:
        return 1
    return max(1, min(torch.get_num_threads(), _fb_get_num_threads()))


@contextmanager
def _threads(n):
    """fastbptt's team at ``n`` threads for the calls inside; the setting before is restored after.

    ``fastbptt.set_num_threads`` is process-wide, so concurrent calls share one
    setting: the first sets it, the last restores it. When it is ``n`` already
    nothing is changed.
    """
    global _budget_users, _budget_saved
    with _budget_lock:
        change = _budget_users > 0 or _fb_get_num_threads() != n
        if change:
            if _budget_users == 0:
                _budget_saved = _fb_get_num_threads()
                _fb_set_num_threads(n)
            _budget_users += 1
    try:
        yield
    finally:
        if change:
            with _budget_lock:
                _budget_users -= 1
                if _budget_users == 0:
                    _fb_set_num_threads(None)                # back to the environment / the cores ...
                    if _fb_get_num_threads() != _budget_saved:
                        _fb_set_num_threads(_budget_saved)   # ... or to what the user had set


# ------------------------------------------------- forward and backward on arrays
def _forward(input, hx, weights, lengths, has_biases, num_layers, bidirectional, nonlinearity, need_grad,
             need_dX=True, need_dh0=True):
    """``(output (T, B, dirs·H), h_n (L·dirs, B, H), vjp or None)``: fastbptt on views of the tensors.

    ``hx`` None is zeros (fastbptt makes them: cheaper than checking a tensor of zeros).
    The arguments are checked already (:func:`_check_stack`, or the module's checks), so
    with ``need_grad`` the forward takes fastbptt's private trusted path (no second
    validation); its vjp computes ``d_input`` only if ``need_dX`` and ``d_hx`` only if
    ``need_dh0`` (else None).
    """
    params = _params(weights, has_biases, bidirectional)
    X = _np(input)
    with _threads(_team(X.shape[1], params.hidden_size)):
        if need_grad:
            output, h_n, vjp = _fb_rnn_vjp(params, X, None if hx is None else _np(hx),
                                           lengths=None if lengths is None else _np(lengths),
                                           activation=nonlinearity, need_dX=need_dX, need_dh0=need_dh0)
        else:
            (output, h_n), vjp = _fb_rnn(params, X, _states_in(hx), activation=nonlinearity,
                                         **_lengths_kw(lengths)), None
    states = (len(params.layers), X.shape[1], params.hidden_size)
    return torch.from_numpy(output), torch.from_numpy(h_n.reshape(states)), vjp


def _backward_arrays(vjp, grad_output, grad_hy, has_biases, bidirectional, hx_shape):
    """``(d_input, d_hx, d_weights)`` from a saved vjp; ``b_ih`` and ``b_hh`` each get db_h.

    ``grad_hy`` None is zeros; ``hx_shape`` None (no hx was given) makes ``d_hx`` None.
    """
    d_hn = None if grad_hy is None else _np(grad_hy)
    with _threads(_team(grad_output.shape[1], grad_output.shape[2] // (2 if bidirectional else 1))):
        grads, dX, dh0 = vjp(_np(grad_output), d_hn)
    d_weights = []
    for layer in grads.layers:
        d_weights += [torch.from_numpy(layer.W_xh), torch.from_numpy(layer.W_hh)]
        if has_biases:
            d_weights += [torch.from_numpy(layer.b_h), torch.from_numpy(layer.b_h.copy())]
    d_hx = None if hx_shape is None or dh0 is None else torch.from_numpy(dh0.reshape(hx_shape))
    return (None if dX is None else torch.from_numpy(dX)), d_hx, d_weights


# ------------------------------------------------------------- eager mode
class _RNNFunction(torch.autograd.Function):
    """The eager path: the forward keeps its vjp on the graph node, the backward calls it.

    The same computation as the custom op below, with less of torch's Python
    around it. Measured at T=20, B=1, H=32 (forward + backward, best of 5 x 300):
    fastbptt alone ~100 µs, through this Function ~325 µs, through the custom op
    ~550 µs -- its autograd wrapper flattens and unflattens the weight list with
    pytree and checks aliasing at every call. So eager calls take this path and
    traced ones (``torch.compile``, ``torch.export``, fake tensors) the op.
    """

    @staticmethod
    def forward(ctx, input, hx, lengths, config, *weights):
        ctx.set_materialize_grads(False)
        # d_input and d_hx only when autograd asks for them (skips the dX GEMM of layer 0 for data)
        need_dX, need_dh0 = ctx.needs_input_grad[0], hx is not None and ctx.needs_input_grad[1]
        output, h_n, ctx.vjp = _forward(input, hx, weights, lengths, *config, True, need_dX, need_dh0)
        ctx.flags, ctx.hx_shape = (config[0], config[2]), (None if hx is None else hx.shape)
        ctx.output_shape, ctx.dtype = output.shape, output.dtype
        return output, h_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, grad_hy):
        if grad_output is None:             # only h_n was used
            grad_output = torch.zeros(ctx.output_shape, dtype=ctx.dtype)
        d_input, d_hx, d_weights = _backward_arrays(ctx.vjp, grad_output, grad_hy, *ctx.flags, ctx.hx_shape)
        return (d_input, d_hx, None, None, *d_weights)


# ---------------------------------------------------------- the custom ops
# The forward op returns a one-element int64 tensor over a NumPy array (``torch.from_numpy``
# keeps the array alive as long as any tensor uses its storage): the *handle*. The array's
# address keys the vjp here, and the array's finaliser drops the entry, so the vjp lives
# exactly as long as the autograd graph that saved the handle. Its value is always 0, so the
# op's outputs compare equal from run to run (opcheck, compiled vs eager).
_VJPS = {}


def _keep(vjp):
    arr = np.zeros(1, dtype=np.int64)
    key = arr.ctypes.data
    _VJPS[key] = vjp
    weakref.finalize(arr, _VJPS.pop, key, None)
    return torch.from_numpy(arr)


@torch.library.custom_op("fastbptt::rnn", mutates_args=(), device_types="cpu")
def _rnn_op(input: Tensor, hx: Tensor, weights: List[Tensor], lengths: Optional[Tensor], has_biases: bool,
            num_layers: int, bidirectional: bool, nonlinearity: str,
            need_grad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The forward of an Elman RNN stack, as ``torch._VF.rnn_tanh`` / ``rnn_relu`` (time-major, no dropout).

    input (T, B, D); hx (L·dirs, B, H); weights: ``[w_ih, w_hh, b_ih, b_hh]`` (or
    ``[w_ih, w_hh]`` without biases) per (layer, direction) in torch's order;
    lengths: None or (B,) int64 (steps at and after ``lengths[b]`` are padding);
    nonlinearity: "tanh" or "relu"; need_grad: keep the vjp for the backward.
    Returns ``(output (T, B, dirs·H), h_n (L·dirs, B, H), handle)``.
    """
    _check_stack(input, hx, weights, has_biases, num_layers, bidirectional, lengths)
    output, h_n, vjp = _forward(input, hx, weights, lengths, has_biases, num_layers, bidirectional, nonlinearity,
                                need_grad)
    return output, h_n, (_keep(vjp) if vjp is not None else torch.zeros(1, dtype=torch.int64))


@_rnn_op.register_fake
def _rnn_op_fake(input, hx, weights, lengths, has_biases, num_layers, bidirectional, nonlinearity, need_grad):
    T, B = input.shape[0], input.shape[1]
    dirs = 2 if bidirectional else 1
    return (input.new_empty((T, B, dirs * hx.shape[-1])), hx.new_empty(hx.shape),
            input.new_empty((1,), dtype=torch.int64))


@torch.library.custom_op("fastbptt::rnn_backward", mutates_args=(), device_types="cpu")
def _rnn_backward_op(grad_output: Tensor, grad_hy: Tensor, handle: Tensor, input: Tensor, hx: Tensor,
                     weights: List[Tensor], lengths: Optional[Tensor], has_biases: bool, num_layers: int,
                     bidirectional: bool, nonlinearity: str) -> Tuple[Tensor, Tensor, List[Tensor]]:
    """The gradients of ``sum(output·grad_output) + sum(h_n·grad_hy)`` for ``fastbptt::rnn``.

    Returns ``(d_input, d_hx, d_weights)``, ``d_weights`` in the order of
    ``weights``; ``b_ih`` and ``b_hh`` each get db_h. Uses the vjp that ``handle``
    keeps, or recomputes the forward if the handle is not known here.
    """
    vjp = _VJPS.get(handle.data_ptr()) if handle.numel() == 1 else None
    if vjp is None:
        _check_stack(input, hx, weights, has_biases, num_layers, bidirectional, lengths)
        vjp = _forward(input, hx, weights, lengths, has_biases, num_layers, bidirectional, nonlinearity, True)[2]
    return _backward_arrays(vjp, grad_output, grad_hy, has_biases, bidirectional, hx.shape)


@_rnn_backward_op.register_fake
def _rnn_backward_op_fake(grad_output, grad_hy, handle, input, hx, weights, lengths, has_biases, num_layers,
                          bidirectional, nonlinearity):
    return input.new_empty(input.shape), hx.new_empty(hx.shape), [w.new_empty(w.shape) for w in weights]


def _setup_context(ctx, inputs, output):
    input, hx, weights, lengths, has_biases, num_layers, bidirectional, nonlinearity, _ = inputs
    ctx.save_for_backward(input, hx, lengths, output[2], *weights)
    ctx.config = (has_biases, num_layers, bidirectional, nonlinearity)


def _backward(ctx, grad_output, grad_hy, _grad_handle):
    input, hx, lengths, handle, *weights = ctx.saved_tensors
    if grad_output is None:
        grad_output = input.new_zeros((input.shape[0], input.shape[1], (2 if ctx.config[2] else 1) * hx.shape[-1]))
    if grad_hy is None:
        grad_hy = torch.zeros_like(hx)
    d_input, d_hx, d_weights = torch.ops.fastbptt.rnn_backward(grad_output, grad_hy, handle, input, hx, weights,
                                                              lengths, *ctx.config)
    return d_input, d_hx, list(d_weights), None, None, None, None, None, None


_rnn_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------ the entry point
_PLAIN = (Tensor, torch.nn.Parameter)


def _eager(tensors):
    """Whether a call can take the eager path: not traced, and only plain CPU tensors."""
    return not torch.compiler.is_compiling() and all(t is None or type(t) in _PLAIN for t in tensors)


def rnn(input, hx, weights, *, has_biases=True, num_layers=1, bidirectional=False, nonlinearity="tanh",
        lengths=None):
    """The stack's forward by fastbptt, differentiable: ``(output, h_n)``.

    The functional form under :class:`RNN` (no dropout, time-major), with
    ``torch._VF.rnn_tanh``'s flat weights. Traced (``torch.compile``) it is the
    custom op ``torch.ops.fastbptt.rnn``.

    Parameters
    ----------
    input : Tensor of shape (T, B, D)
    hx : Tensor of shape (L·dirs, B, H), or None (zeros)
    weights : list of Tensor
        ``[w_ih, w_hh, b_ih, b_hh]`` (``[w_ih, w_hh]`` if not ``has_biases``) per
        (layer, direction) in torch's order (layer 0, layer 0 reverse, layer 1, ...).
    has_biases : bool
    num_layers : int
    bidirectional : bool
    nonlinearity : {"tanh", "relu"}
    lengths : None or int64 Tensor of shape (B,)
        Each row's number of valid steps (any order); later steps are padding:
        output zeros there, ``h_n`` at each row's own last valid step.
    """
    weights = list(weights)
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"fastbptt.torch.rnn: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    _check_stack(input, hx, weights, has_biases, num_layers, bidirectional, lengths)
    return _call(input, hx, weights, lengths, (bool(has_biases), int(num_layers), bool(bidirectional), nonlinearity))


def _call(input, hx, weights, lengths, config):
    """:func:`rnn` on checked arguments: the eager Function, or the custom op when traced."""
    need_grad = torch.is_grad_enabled() and (input.requires_grad or (hx is not None and hx.requires_grad)
                                             or any(w.requires_grad for w in weights))
    if _eager([input, hx, lengths, *weights]):
        if need_grad:
            return _RNNFunction.apply(input, hx, lengths, config, *weights)
        return _forward(input, hx, weights, lengths, *config, False)[:2]
    if hx is None:
        dirs = 2 if config[2] else 1
        hx = input.new_zeros((config[1] * dirs, input.shape[1], weights[1].shape[0]))
    output, h_n, _ = torch.ops.fastbptt.rnn(input, hx, weights, lengths, *config, need_grad)
    return output, h_n


# -------------------------------------------------------------------- module
class RNN(torch.nn.RNNBase):
    """An Elman RNN with ``torch.nn.RNN``'s interface, computed by fastbptt.

    Parameters
    ----------
    input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout, bidirectional, device, dtype
        As ``torch.nn.RNN`` (same parameters, names, shapes and initialisation;
        ``state_dict`` loads both ways). Tensors must be float32 or float64 on
        the CPU when the module runs.

    Notes
    -----
    ``forward(input, hx=None) -> (output, h_n)`` as ``torch.nn.RNN``: input
    (T, B, D), (B, T, D) with ``batch_first``, (T, D) unbatched, or a
    ``PackedSequence``. Gradients reach the input, ``hx`` and every parameter.

    The class derives from ``torch.nn.RNNBase`` (parameters, ``_apply``,
    ``extra_repr``) but not from ``torch.nn.RNN``: ``torch.compile`` declines
    to trace an ``nn.RNN`` (it breaks the graph there), and traces this
    module, whose work is one opaque custom op.
    """

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None):
        modes = {"tanh": "RNN_TANH", "relu": "RNN_RELU"}
        if nonlinearity not in modes:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(modes[nonlinearity], input_size, hidden_size, num_layers=num_layers, bias=bias,
                         batch_first=batch_first, dropout=dropout, bidirectional=bidirectional,
                         device=device, dtype=dtype)

    def _weights(self):
        # by name at every call, so that torch.func.functional_call and reassigned parameters are seen
        return [getattr(self, name) for name in self._flat_weights_names]

    def forward(self, input, hx=None):
        num_directions = 2 if self.bidirectional else 1
        n_states = self.num_layers * num_directions
        weights = self._weights()
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            _check_tensor("input", data)
            self._check_dtype(data, weights)
            # padded, time-major, in the packed (sorted) order: lengths descending
            X, lengths = pad_packed_sequence(PackedSequence(data, batch_sizes))
            B = X.shape[1]
            if hx is not None:
                self._check_hx(hx, 3, (n_states, B, self.hidden_size))
                hx = self.permute_hidden(hx, sorted_indices)
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"fastbptt.torch.RNN: expected a Tensor or a PackedSequence as input, "
                                f"got {type(input).__name__}")
            _check_tensor("input", input)
            self._check_dtype(input, weights)
            if input.dim() not in (2, 3):
                raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")
            batched = input.dim() == 3
            X = input if batched else input.unsqueeze(0 if self.batch_first else 1)
            if self.batch_first:
                X = X.transpose(0, 1)                  # a view: the op takes any strides
            if X.shape[-1] != self.input_size:
                raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                                   f"got {X.shape[-1]}")
            B = X.shape[1]
            lengths = None
            if hx is None:
                pass                                    # zeros, made by fastbptt
            elif batched:
                self._check_hx(hx, 3, (n_states, B, self.hidden_size))
            else:
                self._check_hx(hx, 2, (n_states, self.hidden_size))
                hx = hx.unsqueeze(1)

        output, h_n = self._stack(X, hx, weights, lengths, batch_sizes if packed else None)

        if packed:
            out_data = pack_padded_sequence(output, lengths).data
            return PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices), \
                self.permute_hidden(h_n, unsorted_indices)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n = h_n.squeeze(1)
        return output, h_n

    def _stack(self, X, hx, weights, lengths, batch_sizes):
        """The layers: one op call, or one per layer with torch's dropout between them."""
        act = _ACTIVATIONS[self.mode]
        if not (self.dropout > 0 and self.training and self.num_layers > 1):
            return _call(X, hx, weights, lengths, (self.bias, self.num_layers, self.bidirectional, act))
        dirs = 2 if self.bidirectional else 1
        per = (4 if self.bias else 2) * dirs
        h_n = []
        inp = X
        for l in range(self.num_layers):
            h0 = None if hx is None else hx[l * dirs:(l + 1) * dirs]
            out, h_l = _call(inp, h0, weights[l * per:(l + 1) * per], lengths, (self.bias, 1, self.bidirectional, act))
            h_n.append(h_l)
            if l < self.num_layers - 1:
                if batch_sizes is None:
                    inp = torch.nn.functional.dropout(out, self.dropout, training=True)
                else:   # on the packed data, as nn.RNN draws its mask
                    data = torch.nn.functional.dropout(pack_padded_sequence(out, lengths).data, self.dropout,
                                                       training=True)
                    inp, _ = pad_packed_sequence(PackedSequence(data, batch_sizes))
            else:
                inp = out
        return inp, torch.cat(h_n, 0)

    def _check_dtype(self, input, weights):
        for name, w in zip(self._flat_weights_names, weights):
            _check_tensor(f"parameter {name}", w)
        w = weights[0]
        if any(v.dtype != w.dtype for v in weights):
            raise TypeError(f"fastbptt.torch.RNN: the parameters must share one dtype, got "
                            f"{sorted({str(v.dtype) for v in weights})}")
        if input.dtype != w.dtype:
            raise ValueError(f"RNN input dtype ({input.dtype}) does not match weight dtype ({w.dtype}). "
                             f"Convert input: input.to({w.dtype}), or convert model: model.to({input.dtype})")

    def _check_hx(self, hx, dim, expected):
        if not isinstance(hx, Tensor):
            raise TypeError(f"fastbptt.torch.RNN: hx must be a Tensor or None, got {type(hx).__name__}")
        _check_tensor("hx", hx)
        if hx.dim() != dim:
            kind = "unbatched 2-D" if dim == 2 else "batched 3-D"
            raise RuntimeError(f"For {kind} input, hx should also be {dim}-D but got {hx.dim()}-D tensor")
        if tuple(hx.shape) != tuple(expected):
            raise RuntimeError(f"Expected hidden size {tuple(expected)}, got {list(hx.shape)}")
        w = getattr(self, self._flat_weights_names[0])
        if hx.dtype != w.dtype:
            raise ValueError(f"fastbptt.torch.RNN: hx dtype ({hx.dtype}) does not match weight dtype ({w.dtype})")
