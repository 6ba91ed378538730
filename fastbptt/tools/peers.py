"""The peers: one training step of the same model in PyTorch and in JAX.

Used by the speed comparison (``fastbptt bench``, ``benchmarks/``) and by the
parity tests. A *training step* is the float32 (or float64) forward pass and
the full-BPTT gradient of every parameter, exactly what
:func:`fastbptt.loss_and_grad` computes, for one layer or a stack of layers,
one or two directions:

- torch: ``torch.nn.RNN(num_layers, bidirectional)`` + ``torch.nn.Linear``
  built by :meth:`RNNParams.to_torch`, the loss as ``torch.nn.functional``
  computes it, and ``loss.backward()``;
- jax: ``jax.jit(jax.value_and_grad(loss))`` over one ``lax.scan``
  recurrence per (layer, direction) (a reverse direction is the same scan
  with ``reverse=True``); layer l > 0 takes ``[out_fwd | out_rev]`` of the
  layer below, as torch's stack.

Gradients come back as an :class:`RNNParams` in the structure of the
params (``names()`` / ``arrays()`` in the same canonical order), so they can
be compared with fastbptt's field by field.

torch and jax are optional and imported here, lazily, on first use. JAX
computes in float64 only with ``jax_enable_x64`` switched on before any array
is made (``JAX_ENABLE_X64=1`` in the environment, or
``jax.config.update("jax_enable_x64", True)``); without it a float64 step
raises ``ValueError`` rather than silently computing in float32.

Threads: torch's intra-op pool is set by :func:`set_threads`
(``torch.set_num_threads``) and can change between steps
(:func:`torch_threads`). XLA's CPU thread pool cannot be resized once jax
is imported; :func:`set_threads` sets ``XLA_FLAGS`` for one thread when jax is
not imported yet, and otherwise jax uses every core (2 on our machines):
:func:`jax_threads` says which. A jax step on the other setting needs a
process of its own (:func:`xla_flags` gives its environment).
"""

import os
import sys
import time
from contextlib import contextmanager

import numpy as np

from ..params import RNNParams

PEERS = ("torch", "jax")
_LOSSES = ("mse", "bce", "ce")


def peer_unavailable_reason(name):
    """``None`` if the peer ``name`` imports here, else why not (a short string)."""
    if name not in PEERS:
        raise ValueError(f"peer: expected one of {PEERS}, got {name!r}")
    try:
        if name == "torch":
            import torch  # noqa: F401
        else:
            import jax  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"{type(exc).__name__}: {exc}"
    return None


def available_peers():
    """The peers that import here, among ``("torch", "jax")``."""
    return [name for name in PEERS if peer_unavailable_reason(name) is None]


def peer_version(name):
    """The installed version of a peer (from its package metadata, without importing it), or ``None``."""
    from importlib import metadata

    if name not in PEERS:
        raise ValueError(f"peer: expected one of {PEERS}, got {name!r}")
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


#: the XLA flags of a single-threaded CPU client (read once, when jax creates it)
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def xla_flags(n, flags=""):
    """``XLA_FLAGS`` for a process whose jax should run on ``n`` threads, from the current ``flags``.

    XLA runs on one thread (``n == 1``: :data:`XLA_ONE_THREAD` added) or on all
    cores (any other ``n``: those flags removed); nothing in between.
    """
    flags = " ".join((flags or "").replace(XLA_ONE_THREAD, " ").split())
    return (flags + " " + XLA_ONE_THREAD).strip() if int(n) == 1 else flags


def jax_threads():
    """The threads jax runs on in this process: 1 when ``XLA_FLAGS`` holds :data:`XLA_ONE_THREAD`
    (read when jax creates its CPU client: it holds for the rest of the process), else all cores."""
    return 1 if XLA_ONE_THREAD in os.environ.get("XLA_FLAGS", "") else (os.cpu_count() or 1)


@contextmanager
def torch_threads(n):
    """``torch.set_num_threads(n)`` for the block, then the count before it again."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_threads(n):
    """Ask the peers for ``n`` intra-op threads; returns a dict saying what was applied.

    torch: ``torch.set_num_threads(n)`` (if torch imports). jax: when jax is
    not imported yet and ``n == 1``, adds the XLA flags for a single-threaded
    CPU client to ``XLA_FLAGS``; otherwise XLA keeps its default pool (all
    cores).
    """
    applied = {}
    if peer_unavailable_reason("torch") is None:
        import torch
        torch.set_num_threads(int(n))
        applied["torch"] = f"torch.set_num_threads({int(n)})"
    if "jax" in sys.modules:
        applied["jax"] = f"XLA default pool (all {os.cpu_count()} cores; fixed once jax is imported)"
    elif int(n) == 1:
        os.environ["XLA_FLAGS"] = xla_flags(1, os.environ.get("XLA_FLAGS", ""))
        applied["jax"] = "XLA_FLAGS single-threaded"
    else:
        applied["jax"] = f"XLA default pool (all {os.cpu_count()} cores)"
    return applied


def _check_common(params, X, Y, loss, output, activation):
    if not isinstance(params, RNNParams):
        raise TypeError(f"params: expected an RNNParams, got {type(params).__name__}")
    if not params.has_head:
        raise ValueError("params: expected parameters with a head (W_hy, b_y): a training step "
                         "needs one, got a stack without it")
    if loss not in _LOSSES:
        raise ValueError(f"loss: expected one of {_LOSSES}, got {loss!r}")
    if output not in ("sequence", "last"):
        raise ValueError(f"output: expected 'sequence' or 'last', got {output!r}")
    if activation not in ("tanh", "relu"):
        raise ValueError(f"activation: expected 'tanh' or 'relu', got {activation!r}")
    X = np.asarray(X)
    if X.ndim != 3 or X.shape[2] != params.input_size:
        raise ValueError(f"X: expected shape (T, B, D={params.input_size}), got {X.shape}")
    X = np.ascontiguousarray(X, dtype=params.dtype)
    Y = np.asarray(Y)
    Y = np.ascontiguousarray(Y, dtype=np.int64 if loss == "ce" else params.dtype)
    return X, Y


def _initial_states(params, h0, B):
    """``h0`` as (L·dirs, B, H) (zeros if None): (B, H) is taken for one unidirectional layer."""
    n, H = len(params.layers), params.hidden_size
    if h0 is None:
        return np.zeros((n, B, H), dtype=params.dtype)
    h0 = np.asarray(h0)
    if h0.shape not in ((n, B, H),) + (((B, H),) if n == 1 else ()):
        want = f"(B={B}, H={H})" if n == 1 else f"(L·dirs={n}, B={B}, H={H})"
        raise ValueError(f"h0: expected shape {want}, got {h0.shape}")
    return np.ascontiguousarray(h0, dtype=params.dtype).reshape(n, B, H)


def _grads_like(params, arrays):
    """Gradients (canonical order, as ``params.arrays()``) as an :class:`RNNParams` of ``params``' structure."""
    n = len(params.layers)
    arrays = list(arrays)
    return RNNParams(layers=[tuple(arrays[3 * i:3 * i + 3]) for i in range(n)],
                     W_hy=arrays[3 * n], b_y=arrays[3 * n + 1], bidirectional=params.bidirectional)


class PeerStep:
    """One peer training step, ready to time.

    Calling the object runs forward + full BPTT once and waits for the result
    (the gradients stay in the peer's own arrays). :meth:`loss_and_grad`
    runs one step and returns ``(loss, grads)`` as a float and an
    :class:`RNNParams` of NumPy arrays, for parity checks.

    Attributes
    ----------
    name : str
        ``"torch"`` or ``"jax"``.
    compile_s : float
        Seconds spent building the step before the first call (JIT compile
        for jax, zero for torch's eager mode).
    """

    name = None
    compile_s = 0.0

    def __call__(self):  # pragma: no cover - overridden
        raise NotImplementedError

    def loss_and_grad(self):  # pragma: no cover - overridden
        raise NotImplementedError


class TorchStep(PeerStep):
    """torch: ``nn.RNN`` (any num_layers, bidirectional) + ``nn.Linear``, functional loss, ``loss.backward()``."""

    name = "torch"

    def __init__(self, params, X, Y, *, loss="mse", output="sequence", activation="tanh", h0=None):
        import torch
        import torch.nn.functional as F

        X, Y = _check_common(params, X, Y, loss, output, activation)
        t0 = time.perf_counter()
        self._torch = torch
        self._dtype = params.dtype
        self.rnn, self.linear = params.to_torch(nonlinearity=activation)
        self.X = torch.from_numpy(X)
        self.Y = torch.from_numpy(Y)
        self.h0 = None if h0 is None else torch.from_numpy(_initial_states(params, h0, X.shape[1]))
        self._structure = params
        self._params = list(self.rnn.parameters()) + list(self.linear.parameters())
        O = params.output_size
        if loss == "mse":
            self._loss = F.mse_loss
        elif loss == "bce":
            self._loss = F.binary_cross_entropy_with_logits
        else:
            self._loss = lambda logits, y: F.cross_entropy(logits.reshape(-1, O), y.reshape(-1))
        self._last = output == "last"
        self._bidirectional = params.bidirectional
        self.compile_s = time.perf_counter() - t0

    def _step(self):
        for p in self._params:
            p.grad = None
        out, h_n = self.rnn(self.X, self.h0)
        if not self._last:
            feats = out
        elif self._bidirectional:               # [h_T^fwd ; h_1^bwd]: the top layer's two final states
            feats = self._torch.cat((h_n[-2], h_n[-1]), dim=-1)
        else:
            feats = out[-1]
        value = self._loss(self.linear(feats), self.Y)
        value.backward()
        return value

    def __call__(self):
        self._step()

    def loss_and_grad(self):
        value = float(self._step().item())
        rnn, lin = self.rnn, self.linear

        def np_(t):
            return t.grad.detach().numpy().astype(self._dtype, copy=True)

        # per (layer, direction) in torch's order; b_h = bias_ih + bias_hh, so dL/db_h equals
        # the gradient of either bias
        dirs = 2 if rnn.bidirectional else 1
        arrays = []
        for i in range(rnn.num_layers * dirs):
            sfx = f"_l{i // dirs}" + ("_reverse" if i % dirs else "")
            arrays += [np_(getattr(rnn, "weight_ih" + sfx)), np_(getattr(rnn, "weight_hh" + sfx)),
                       np_(getattr(rnn, "bias_ih" + sfx))]
        return value, _grads_like(self._structure, arrays + [np_(lin.weight), np_(lin.bias)])


def _jax_loss_fn(loss, output, activation, num_layers, bidirectional):
    import jax
    import jax.numpy as jnp
    from jax import lax

    f = jnp.tanh if activation == "tanh" else jax.nn.relu
    dirs = 2 if bidirectional else 1

    def direction(W_xh, W_hh, b_h, inp, h0, reverse):
        A = inp @ W_xh.T + b_h                    # (T, B, H), one GEMM

        def cell(h, a):
            h = f(a + h @ W_hh.T)                 # h_t = f(z_t)
            return h, h

        # reverse=True runs t = T..1 and still returns Hs in time order; h_last is then h_1
        return lax.scan(cell, h0, A, reverse=reverse)

    def loss_fn(p, X, Y, h0):
        """``p``: the arrays in canonical order (per (layer, direction): W_xh, W_hh, b_h; then
        W_hy, b_y); ``h0`` (L·dirs, B, H)."""
        W_hy, b_y = p[-2], p[-1]
        inp = X
        for l in range(num_layers):
            outs, finals = [], []
            for d in range(dirs):
                i = l * dirs + d
                h_last, Hs = direction(*p[3 * i:3 * i + 3], inp, h0[i], reverse=bool(d))
                outs.append(Hs)
                finals.append(h_last)
            inp = outs[0] if dirs == 1 else jnp.concatenate(outs, axis=-1)     # (T, B, dirs·H)
        if output == "last":                      # [h_T^fwd ; h_1^bwd] of the top layer
            feats = finals[0] if dirs == 1 else jnp.concatenate(finals, axis=-1)
        else:
            feats = inp
        logits = feats @ W_hy.T + b_y
        if loss == "mse":
            return jnp.mean((logits - Y) ** 2)
        if loss == "bce":
            return jnp.mean(jnp.maximum(logits, 0) - logits * Y + jnp.log1p(jnp.exp(-jnp.abs(logits))))
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, Y[..., None], axis=-1))

    return loss_fn


class JaxStep(PeerStep):
    """jax: ``jit(value_and_grad(loss))`` over ``lax.scan`` recurrences (one per layer and
    direction), compiled ahead of time."""

    name = "jax"

    def __init__(self, params, X, Y, *, loss="mse", output="sequence", activation="tanh", h0=None):
        import jax
        import jax.numpy as jnp

        X, Y = _check_common(params, X, Y, loss, output, activation)
        if params.dtype == np.float64 and not jax.config.jax_enable_x64:
            raise ValueError("params: float64 needs jax_enable_x64 (set JAX_ENABLE_X64=1 before "
                             "importing jax, or jax.config.update('jax_enable_x64', True)); "
                             "jax would otherwise compute in float32")
        self._dtype = params.dtype
        self._structure = params
        h0 = _initial_states(params, h0, X.shape[1])
        self.args = (tuple(jnp.asarray(a) for a in params.arrays()), jnp.asarray(X),
                     jnp.asarray(Y), jnp.asarray(h0))
        fn = jax.jit(jax.value_and_grad(_jax_loss_fn(loss, output, activation, params.num_layers,
                                                     params.bidirectional)))
        t0 = time.perf_counter()
        self._compiled = fn.lower(*self.args).compile()
        self.compile_s = time.perf_counter() - t0

    def __call__(self):
        value, grads = self._compiled(*self.args)
        value.block_until_ready()
        for g in grads:
            g.block_until_ready()

    def loss_and_grad(self):
        value, grads = self._compiled(*self.args)
        return float(value), _grads_like(self._structure, [np.array(g, dtype=self._dtype) for g in grads])


def make_peer_step(name, params, X, Y, *, loss="mse", output="sequence", activation="tanh", h0=None):
    """Build the training step of peer ``name`` on this data.

    Parameters
    ----------
    name : {"torch", "jax"}
    params : RNNParams
        With a head; any num_layers, one or two directions. Copied into the
        peer; never modified.
    X : ndarray of shape (T, B, D)
    Y : ndarray
        (T, B, O) for mse/bce, (T, B) int for ce; (B, O) / (B,) with ``output="last"``.
    loss, output, activation, h0
        As in :func:`fastbptt.loss_and_grad` (``h0`` (B, H) for one unidirectional
        layer, else (L·dirs, B, H); ``output="last"`` takes ``[h_T^fwd ; h_1^bwd]``).

    Returns
    -------
    PeerStep
        ``step()`` runs one timed step; ``step.loss_and_grad()`` returns
        ``(loss, RNNParams grads)``; ``step.compile_s`` is the build/compile time.

    Raises
    ------
    ValueError
        Unknown peer, a peer that is not installed (the message says why), or bad arguments.
    """
    if name not in PEERS:
        raise ValueError(f"peer: expected one of {PEERS}, got {name!r}")
    reason = peer_unavailable_reason(name)
    if reason is not None:
        raise ValueError(f"peer: {name!r} is not available here ({reason}); "
                         f"install it with: pip install "
                         f"{'torch --index-url https://download.pytorch.org/whl/cpu' if name == 'torch' else 'jax'}")
    cls = TorchStep if name == "torch" else JaxStep
    return cls(params, X, Y, loss=loss, output=output, activation=activation, h0=h0)
