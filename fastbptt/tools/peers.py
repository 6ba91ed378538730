"""The peers: one training step of the same model in PyTorch and in JAX.

Used by the speed comparison (``fastbptt bench``, ``benchmarks/``) and by the
parity tests. A *training step* is the float32 (or float64) forward pass and
the full-BPTT gradient of all five parameters, exactly what
:func:`fastbptt.loss_and_grad` computes:

- torch: ``torch.nn.RNN`` + ``torch.nn.Linear`` built by
  :meth:`RNNParams.to_torch`, the loss as ``torch.nn.functional`` computes it,
  and ``loss.backward()``;
- jax: ``jax.jit(jax.value_and_grad(loss))`` over a ``lax.scan`` recurrence.

torch and jax are optional and imported here, lazily, on first use. JAX
computes in float64 only with ``jax_enable_x64`` switched on before any array
is made (``JAX_ENABLE_X64=1`` in the environment, or
``jax.config.update("jax_enable_x64", True)``); without it a float64 step
raises ``ValueError`` rather than silently computing in float32.

Threads: torch's intra-op pool is set by :func:`set_threads`
(``torch.set_num_threads``). XLA's CPU thread pool cannot be resized once jax
is imported; :func:`set_threads` sets ``XLA_FLAGS`` for one thread when jax is
not imported yet, and otherwise jax uses every core (2 on our machines).
"""

import os
import sys
import time

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
        flags = os.environ.get("XLA_FLAGS", "")
        extra = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        if extra not in flags:
            os.environ["XLA_FLAGS"] = (flags + " " + extra).strip()
        applied["jax"] = "XLA_FLAGS single-threaded"
    else:
        applied["jax"] = f"XLA default pool (all {os.cpu_count()} cores)"
    return applied


def _check_common(params, X, Y, loss, output, activation):
    if not isinstance(params, RNNParams):
        raise TypeError(f"params: expected an RNNParams, got {type(params).__name__}")
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
    """torch: ``nn.RNN`` + ``nn.Linear``, functional loss, ``loss.backward()``."""

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
        self.h0 = None if h0 is None else torch.from_numpy(
            np.ascontiguousarray(h0, dtype=params.dtype).reshape(1, X.shape[1], params.hidden_size))
        self._params = list(self.rnn.parameters()) + list(self.linear.parameters())
        O = params.output_size
        if loss == "mse":
            self._loss = F.mse_loss
        elif loss == "bce":
            self._loss = F.binary_cross_entropy_with_logits
        else:
            self._loss = lambda logits, y: F.cross_entropy(logits.reshape(-1, O), y.reshape(-1))
        self._last = output == "last"
        self.compile_s = time.perf_counter() - t0

    def _step(self):
        for p in self._params:
            p.grad = None
        out, _ = self.rnn(self.X, self.h0)
        logits = self.linear(out[-1] if self._last else out)
        value = self._loss(logits, self.Y)
        value.backward()
        return value

    def __call__(self):
        self._step()

    def loss_and_grad(self):
        value = float(self._step().item())
        rnn, lin = self.rnn, self.linear

        def np_(t):
            return t.grad.detach().numpy().astype(self._dtype, copy=True)

        # b_h = bias_ih + bias_hh, so dL/db_h equals the gradient of either bias
        grads = RNNParams(W_xh=np_(rnn.weight_ih_l0), W_hh=np_(rnn.weight_hh_l0),
                          b_h=np_(rnn.bias_ih_l0), W_hy=np_(lin.weight), b_y=np_(lin.bias))
        return value, grads


def _jax_loss_fn(loss, output, activation):
    import jax
    import jax.numpy as jnp
    from jax import lax

    f = jnp.tanh if activation == "tanh" else jax.nn.relu

    def loss_fn(p, X, Y, h0):
        W_xh, W_hh, b_h, W_hy, b_y = p
        A = X @ W_xh.T + b_h                      # (T, B, H), one GEMM

        def cell(h, a):
            h = f(a + h @ W_hh.T)                 # h_t = f(z_t)
            return h, h

        h_last, Hs = lax.scan(cell, h0, A)
        logits = (h_last if output == "last" else Hs) @ W_hy.T + b_y
        if loss == "mse":
            return jnp.mean((logits - Y) ** 2)
        if loss == "bce":
            return jnp.mean(jnp.maximum(logits, 0) - logits * Y + jnp.log1p(jnp.exp(-jnp.abs(logits))))
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, Y[..., None], axis=-1))

    return loss_fn


class JaxStep(PeerStep):
    """jax: ``jit(value_and_grad(loss))`` over a ``lax.scan`` recurrence, compiled ahead of time."""

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
        B, H = X.shape[1], params.hidden_size
        h0 = np.zeros((B, H), dtype=params.dtype) if h0 is None else np.ascontiguousarray(
            h0, dtype=params.dtype).reshape(B, H)
        self.args = (tuple(jnp.asarray(a) for a in params.arrays()), jnp.asarray(X),
                     jnp.asarray(Y), jnp.asarray(h0))
        fn = jax.jit(jax.value_and_grad(_jax_loss_fn(loss, output, activation)))
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
        grads = RNNParams(*(np.array(g, dtype=self._dtype) for g in grads))
        return float(value), grads


def make_peer_step(name, params, X, Y, *, loss="mse", output="sequence", activation="tanh", h0=None):
    """Build the training step of peer ``name`` on this data.

    Parameters
    ----------
    name : {"torch", "jax"}
    params : RNNParams
        Copied into the peer; never modified.
    X : ndarray of shape (T, B, D)
    Y : ndarray
        (T, B, O) for mse/bce, (T, B) int for ce; (B, O) / (B,) with ``output="last"``.
    loss, output, activation, h0
        As in :func:`fastbptt.loss_and_grad`.

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
                         f"install it with: pip install {'torch==2.13.0' if name == 'torch' else 'jax'}")
    cls = TorchStep if name == "torch" else JaxStep
    return cls(params, X, Y, loss=loss, output=output, activation=activation, h0=h0)
