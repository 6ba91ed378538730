"""The functional API: ``forward``, ``loss_and_grad``, ``rnn`` and ``rnn_vjp``.

Each function validates its input, then runs the engine (:mod:`fastbptt.engine`)
on the backend that ``backend=`` names or ``"auto"`` picks.

Shapes are time-major, as ``torch.nn.RNN``'s: ``X`` is (T, B, D), or (T, D)
for one sequence (then the B axis is dropped from ``Y``, ``h0`` and every
output). With L layers and dirs directions (2 if bidirectional), ``h0``,
``h_last`` and ``h_n`` are (B, H) for one unidirectional layer and
(L·dirs, B, H) otherwise, in torch's ``h_0``/``h_n`` order (layer 0
forward, layer 0 reverse, layer 1 forward, ...).

Variable-length batches: ``lengths`` (B,) integers in [1, T], in any order,
as torch's ``pack_padded_sequence(..., enforce_sorted=False)``. Steps
t >= lengths[b] of row b are padding: X and Y there are never read (NaN is
fine), the state does not move, a reverse direction starts at the row's own
last step, ``output`` holds zeros there, ``h_n`` each row's state at its own
last step, losses are means over the valid positions only, and
``output="last"`` takes each row's own last step. The kernels skip the
padding: the cost follows Σ lengths, not T·B.
"""

from time import perf_counter

import numpy as np

from . import _validation as V
from .backends import dispatch
from .engine import checkpoint as _checkpoint
from .engine.core import ACT_CODES, is_artbp, windows
from .engine.lengths import packing
from .engine.losses import LOSSES
from .engine.model import loss_and_grad as _model_loss_and_grad
from .engine.plan import plan_for
from .engine.stack import head_logits, pack_grads, stack_backward, stack_forward
from ._threads import call_scope
from .params import RNNParams

__all__ = ["forward", "loss_and_grad", "rnn", "rnn_vjp"]


def _check_params(params, *, head):
    if not isinstance(params, RNNParams):
        raise TypeError(f"params: expected an RNNParams, got {type(params).__name__}")
    if head and not params.has_head:
        raise ValueError("params: expected parameters with a head (W_hy, b_y), got a stack without one "
                         "(W_hy=None); use fastbptt.rnn / rnn_vjp for the stack alone, or give a head")
    return params


def _prepare(params, X, h0, lengths, *, head):
    """Checked ``(X3, h0s, single, lengths, pack)``; with a ``pack``, X3 and h0s are in its sorted row order."""
    _check_params(params, head=head)
    X3, single = V.check_X(X, params, finite=lengths is None)
    T, B, _ = X3.shape
    lengths = V.check_lengths(lengths, T, B, single)
    if lengths is not None:
        V.check_finite_where("X", X3, V.valid_steps(lengths, T))
    h0s = V.check_h0(h0, params, B, single)
    pack = packing(lengths, T)
    if pack is not None:
        X3, h0s = pack.sort(X3, 1), pack.sort(h0s, 1)
    return X3, h0s, single, lengths, pack


def _unsort(a, pack, axis=1):
    return a if pack is None else pack.unsort(a, axis)


def _dispatch(op, backend, params, X3, pack):
    """The backend and team of one call (``backend="auto"`` learns them per shape: backends._wisdom)."""
    T, B, D = X3.shape
    return dispatch(backend, op, T=T, B=B, D=D, H=params.hidden_size, layers=params.num_layers,
                    dirs=2 if params.bidirectional else 1, dtype=params.dtype, lengths=pack is not None)


def _user_states(h, params, single):
    """(L·dirs, B, H) -> the user's shape (see the module docstring)."""
    if len(params.layers) == 1:
        h = h[0]
    return h[..., 0, :] if single else h


def forward(params, X, h0=None, *, lengths=None, activation="tanh", backend="auto"):
    """Run the RNN and its head forward over a batch of sequences.

    Parameters
    ----------
    params : RNNParams
        With a head.
    X : array_like of shape (T, B, D), or (T, D) for one sequence
    h0 : array_like of shape (B, H) or (L·dirs, B, H) (see the module docstring); zeros if None
    lengths : array_like of B ints in [1, T], optional
        Variable-length sequences (see the module docstring).
    activation : {"tanh", "relu"}
    backend : {"auto", "cython", "numba", "numpy"}

    Returns
    -------
    O_logits : ndarray of shape (T, B, O)  (or (T, O) for 2-D X); unspecified at padded steps
    Hs : ndarray of shape (T+1, B, dirs·H)  (or (T+1, dirs·H))
        ``Hs[1:]`` is the top layer's output (torch's ``output``: both
        directions concatenated), ``Hs[0]`` its initial state(s).
    """
    V.check_choice("activation", activation, V.ACTIVATIONS)
    X3, h0s, single, _, pack = _prepare(params, X, h0, lengths, head=True)
    choice = _dispatch("forward", backend, params, X3, pack)
    kernels, t0 = choice.kernels, perf_counter()
    with call_scope(threads=choice.threads):
        fwd = stack_forward(kernels, params, X3, h0s, ACT_CODES[activation], fresh=True, pack=pack)
        Hs = _unsort(fwd.out, pack)
        O_logits = head_logits(params, Hs[1:], kernels)
    choice.record(perf_counter() - t0)
    if single:
        return O_logits[:, 0, :], Hs[:, 0, :]
    return O_logits, Hs


def loss_and_grad(params, X, Y, *, h0=None, lengths=None, loss="mse", output="sequence",
                  activation="tanh", truncation=None, checkpoint=None, backend="auto"):
    """Loss and gradient of all parameters by (truncated) backpropagation through time.

    Parameters
    ----------
    params : RNNParams
        With a head.
    X : array_like of shape (T, B, D), or (T, D) for one sequence
    Y : array_like
        Targets. ``output="sequence"``: (T, B, O) floats for mse/bce, (T, B)
        int class ids for ce. ``output="last"``: (B, O), or (B,) for ce.
        With 2-D X the B axis is dropped.
    h0 : array_like of shape (B, H) or (L·dirs, B, H), optional; zeros if None
    lengths : array_like of B ints in [1, T], optional
        Variable-length sequences (see the module docstring); truncation
        windows stay on the absolute time axis.
    loss : {"mse", "bce", "ce"}
        Means as torch's ``F.mse_loss``, ``F.binary_cross_entropy_with_logits``
        (on logits) and ``F.cross_entropy`` (on logits, class ids).
    output : {"sequence", "last"}
        ``"last"`` uses each direction's final state of the top layer only,
        ``[h_T^fwd ; h_1^bwd]``.
    activation : {"tanh", "relu"}
    truncation : None, int k >= 1, or (k1, k2) with 1 <= k1 <= k2
        None: full BPTT. ``k``: the gradient does not cross steps k, 2k, ...
        (as detaching h every k steps in torch). ``(k1, k2)``: Williams &
        Peng's TBPTT(k1, k2): update points at k1, 2k1, ... and T; at each,
        the losses since the previous one are backpropagated through its
        last k2 steps only; the gradient is summed over update points.
        ``("artbp", c, seed)``: unbiased truncation (Tallec & Ollivier 2017):
        a cut at each step boundary with probability c (drawn from
        ``numpy.random.default_rng(seed)``), the gradient that crosses a
        boundary uncut multiplied by 1/(1-c): its expectation is full BPTT's.
        A stacked model is cut at the same steps in every layer; a
        bidirectional model takes None only.
    checkpoint : None, int s >= 1, or "sqrt" (True)
        Memory-bounded full BPTT (Gruslys et al. 2016; ``truncation=None``, a
        unidirectional model): keep each layer's state every s steps only
        (``"sqrt"``: s = ⌈√T⌉), and run each segment's forward again in the
        backward. Memory O((T/s + s)·B·H) instead of O(T·B·H), for one more
        forward pass; the loss and gradients equal ``checkpoint=None``'s bit
        for bit. s is rounded up to whole blocks of ⌈16384/B⌉ steps (the blocks
        every full-BPTT sum is taken in); s >= T is plain full BPTT.
    backend : {"auto", "cython", "numba", "numpy"}

    Returns
    -------
    loss : float
        The whole-sequence loss, whatever the truncation.
    grads : RNNParams
        Gradients, in the structure of ``params``.
    h_last : ndarray of shape (B, H) or (L·dirs, B, H) (without B for 2-D X)
        Each (layer, direction)'s final state.
    """
    V.check_choice("loss", loss, LOSSES)
    V.check_choice("output", output, V.OUTPUTS)
    V.check_choice("activation", activation, V.ACTIVATIONS)
    _check_params(params, head=True)
    truncation = V.check_truncation(truncation, params.bidirectional, allow_artbp=True)
    checkpoint = V.check_checkpoint(checkpoint, truncation, params.bidirectional)
    X3, h0s, single, lengths, pack = _prepare(params, X, h0, lengths, head=True)
    T, B, _ = X3.shape
    Y_ = V.check_Y(Y, params, T, B, single, loss, output, lengths)
    if pack is not None:        # sorted rows; for a sequence loss the valid positions only
        Y_ = pack.sort(Y_, 1 if output == "sequence" else 0)
        if output == "sequence":
            Y_ = Y_.reshape((T * B,) + Y_.shape[2:])[pack.idx]
    choice = _dispatch("loss_and_grad", backend, params, X3, pack)     # (checkpointed too: one choice, the same bits)
    kernels, t0 = choice.kernels, perf_counter()
    segment = None if checkpoint is None else _checkpoint.segment_steps(checkpoint, T, B)
    with call_scope(threads=choice.threads):
        if segment is not None and segment < T:     # (one segment is plain full BPTT)
            value, grads, fwd = _checkpoint.loss_and_grad(kernels, params, X3, Y_, h0s, loss, output,
                                                          ACT_CODES[activation], pack=pack, segment=segment)
            h_last = _unsort(fwd.h_n, pack)
        elif pack is None and not is_artbp(truncation):   # the shape's plan, made once (same arithmetic)
            plan = plan_for(kernels, params, T, B, loss, output, ACT_CODES[activation], truncation)
            value, arrays, h_last = plan.run(params, X3, Y_, h0s)
            grads = RNNParams._trusted_like(params, arrays)
        else:
            value, grads, fwd = _model_loss_and_grad(kernels, params, X3, Y_, h0s, loss, output,
                                                     ACT_CODES[activation], windows(T, truncation), pack=pack)
            h_last = _unsort(fwd.h_n, pack)
    choice.record(perf_counter() - t0)
    return value, grads, _user_states(h_last, params, single)


def rnn(params, X, h0=None, *, lengths=None, activation="tanh", backend="auto"):
    """The recurrent stack alone: ``torch.nn.RNN``'s forward (time-major), the head ignored.

    Parameters
    ----------
    params : RNNParams
        With or without a head.
    X : array_like of shape (T, B, D), or (T, D) for one sequence
    h0 : array_like of shape (B, H) or (L·dirs, B, H), optional; zeros if None
    lengths : array_like of B ints in [1, T], optional
        Variable-length sequences (see the module docstring).
    activation : {"tanh", "relu"}
    backend : {"auto", "cython", "numba", "numpy"}

    Returns
    -------
    output : ndarray of shape (T, B, dirs·H)  (or (T, dirs·H))
        The top layer's states, both directions concatenated (zeros at padded steps).
    h_n : ndarray of shape (B, H) or (L·dirs, B, H)  (without B for 2-D X)
    """
    output, h_n, _ = _rnn(params, X, h0, lengths, activation, backend, fresh=False)
    return output, h_n


def rnn_vjp(params, X, h0=None, *, lengths=None, activation="tanh", backend="auto"):
    """The stack's forward and its vector-Jacobian product, for custom losses and adapters.

    Parameters
    ----------
    As :func:`rnn`.

    Returns
    -------
    output, h_n : as :func:`rnn`
    vjp : callable
        ``vjp(d_output, d_h_n=None) -> (grads, dX, dh0)``: the gradients of
        ``sum(output * d_output) + sum(h_n * d_h_n)`` with respect to the
        params (an :class:`RNNParams` in their structure; head fields zero,
        or None without a head), ``X`` (shaped as ``X``; zeros at padded
        steps, where ``d_output`` is not read either) and ``h0`` (shaped
        as ``h0``; zeros included) -- what torch autograd gives for the same
        expression. ``d_output`` is shaped as ``output``, ``d_h_n`` as ``h_n``
        (None: zero). The forward it differentiates is its own: later calls
        and in-place updates of ``params`` or ``X`` do not change it, and
        ``vjp`` can be called more than once.
    """
    return _rnn(params, X, h0, lengths, activation, backend, fresh=True)


def _rnn(params, X, h0, lengths, activation, backend, fresh):
    V.check_choice("activation", activation, V.ACTIVATIONS)
    X3, h0s, single, lengths, pack = _prepare(params, X, h0, lengths, head=False)
    choice = _dispatch("rnn_vjp" if fresh else "rnn", backend, params, X3, pack)
    kernels = choice.kernels
    if fresh:       # the vjp's own copy of the weights (an optimizer step writes params in place)
        params = params.copy()
    t0 = perf_counter()
    with call_scope(threads=choice.threads):
        fwd = stack_forward(kernels, params, X3, h0s, ACT_CODES[activation], fresh=fresh, pack=pack)
        output = fwd.out[1:].copy() if pack is None else pack.unsort(fwd.out[1:], 1)
        h_n = _unsort(fwd.h_n, pack)
    choice.record(perf_counter() - t0)
    output_u = output[:, 0, :] if single else output
    h_n_u = _user_states(h_n, params, single)
    if not fresh:
        return output_u, h_n_u, None
    T, B = X3.shape[:2]
    full = windows(T, None)

    def vjp(d_output, d_h_n=None):
        d_out = V.as_float_array("d_output", d_output, output_u.shape, params.dtype, finite=lengths is None)
        if lengths is not None:                 # padded steps are not read: NaN is fine there
            V.check_finite_where("d_output", d_out, V.valid_steps(lengths, T))
        d_hn = None
        if d_h_n is not None:
            d_hn = V.as_float_array("d_h_n", d_h_n, h_n_u.shape, params.dtype).reshape(h_n.shape)
        d_out = d_out.reshape(output.shape)
        if pack is not None:
            d_out, d_hn = pack.sort(d_out, 1), (None if d_hn is None else pack.sort(d_hn, 1))
        with call_scope(threads=choice.threads):
            layer_grads, dX, dh0 = stack_backward(fwd, d_out, d_hn, wins=full, want_dX=True, want_dh0=True)
        grads = pack_grads(params, layer_grads)
        dX, dh0 = _unsort(dX, pack), _unsort(dh0, pack)
        return grads, (dX[:, 0, :] if single else dX), _user_states(dh0, params, single)

    return output_u, h_n_u, vjp


def _rnn_vjp_trusted(params, X3, h0s=None, *, lengths=None, activation="tanh", need_dX=True, need_dh0=True):
    """Private: :func:`rnn_vjp` for ``fastbptt.torch``, on arguments its caller has checked.

    ``params`` a stack (its arrays may be views of the caller's: copied here for the
    vjp); ``X3`` (T, B, D) and ``h0s`` (L·dirs, B, H) or None (zeros) arrays of the
    params' dtype, any strides (copied here); ``lengths`` None or (B,) ints;
    ``activation`` "tanh" or "relu". The input and the initial state are checked
    finite (outside the padding), as by :func:`rnn_vjp`; ``d_output`` is not. Returns ``(output (T, B, dirs·H), h_n (L·dirs, B, H),
    vjp)`` with ``vjp(d_output, d_h_n=None) -> (grads, dX or None, dh0 or None)``:
    ``d_output`` (T, B, dirs·H) and ``d_h_n`` (L·dirs, B, H) arrays (not written);
    dX is computed only when ``need_dX``, dh0 only when ``need_dh0``. The results
    are those of :func:`rnn_vjp` on the same arrays.
    """
    T, B, _ = X3.shape
    dtype = params.dtype
    params = params.copy()          # the vjp's own weights (an optimizer step writes them in place)
    X3 = np.array(X3, dtype=dtype, order="C", copy=True)
    h0s = (np.zeros((len(params.layers), B, params.hidden_size), dtype=dtype) if h0s is None
           else np.array(h0s, dtype=dtype, order="C", copy=True))
    pack = None
    V.check_finite("hx", h0s)
    if lengths is None:
        V.check_finite("input", X3)
    else:
        lengths = V.check_lengths(lengths, T, B, False)
        V.check_finite_where("input", X3, V.valid_steps(lengths, T))
        pack = packing(lengths, T)
        if pack is not None:
            X3, h0s = pack.sort(X3, 1), pack.sort(h0s, 1)
    choice = _dispatch("rnn_vjp", "auto", params, X3, pack)
    kernels, t0 = choice.kernels, perf_counter()
    with call_scope(threads=choice.threads):
        fwd = stack_forward(kernels, params, X3, h0s, ACT_CODES[activation], fresh=True, pack=pack)
        output = fwd.out[1:].copy() if pack is None else pack.unsort(fwd.out[1:], 1)
        h_n = _unsort(fwd.h_n, pack)
    choice.record(perf_counter() - t0)
    full = windows(T, None)

    def vjp(d_output, d_h_n=None):
        d_out = np.array(d_output, dtype=dtype, order="C", copy=True)     # a work array for the engine
        d_hn = None if d_h_n is None else np.array(d_h_n, dtype=dtype, order="C", copy=True)
        if pack is not None:
            d_out, d_hn = pack.sort(d_out, 1), (None if d_hn is None else pack.sort(d_hn, 1))
        with call_scope(threads=choice.threads):
            layer_grads, dX, dh0 = stack_backward(fwd, d_out, d_hn, wins=full, want_dX=need_dX,
                                                  want_dh0=need_dh0)
        grads = pack_grads(params, layer_grads)
        return grads, (None if dX is None else _unsort(dX, pack)), (None if dh0 is None else _unsort(dh0, pack))

    return output, h_n, vjp
