"""The parameter container shared by the model, its gradients and the optimizers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RNNParams"]

_FIELDS = ("W_xh", "W_hh", "b_h", "W_hy", "b_y")
_SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(eq=False)
class RNNParams:
    """Parameters of an Elman RNN (also used, field for field, for gradients).

    Parameters
    ----------
    W_xh : ndarray of shape (H, D)
        Input-to-hidden weights (``rnn.weight_ih_l0`` in torch).
    W_hh : ndarray of shape (H, H)
        Hidden-to-hidden weights (``rnn.weight_hh_l0``).
    b_h : ndarray of shape (H,)
        Hidden bias (``rnn.bias_ih_l0 + rnn.bias_hh_l0``).
    W_hy : ndarray of shape (O, H)
        Hidden-to-output weights (``linear.weight``).
    b_y : ndarray of shape (O,)
        Output bias (``linear.bias``).

    All five arrays share one floating dtype, float32 or float64. The
    constructor checks shapes and dtypes; it keeps the arrays it is given
    (no copy), so an optimizer step on ``params`` updates them in place.
    """

    W_xh: np.ndarray
    W_hh: np.ndarray
    b_h: np.ndarray
    W_hy: np.ndarray
    b_y: np.ndarray

    def __post_init__(self):
        for name in _FIELDS:
            value = getattr(self, name)
            if not isinstance(value, np.ndarray):
                raise TypeError(
                    f"RNNParams.{name}: expected a numpy.ndarray, got {type(value).__name__}"
                )
        dtypes = {name: getattr(self, name).dtype for name in _FIELDS}
        if len(set(dtypes.values())) != 1:
            given = ", ".join(f"{n}={d}" for n, d in dtypes.items())
            raise TypeError(f"RNNParams: all parameters must share one dtype, got {given}")
        dtype = self.W_xh.dtype
        if dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"RNNParams: dtype must be float32 or float64, got {dtype}")
        if self.W_xh.ndim != 2:
            raise ValueError(f"RNNParams.W_xh: expected shape (H, D), got {self.W_xh.shape}")
        H, _ = self.W_xh.shape
        if self.W_hy.ndim != 2:
            raise ValueError(f"RNNParams.W_hy: expected shape (O, H), got {self.W_hy.shape}")
        O = self.W_hy.shape[0]
        expected = {"W_hh": (H, H), "b_h": (H,), "W_hy": (O, H), "b_y": (O,)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"RNNParams.{name}: expected shape {shape} (H={H}, O={O}), "
                    f"got {getattr(self, name).shape}"
                )
        for name in _FIELDS:
            if 0 in getattr(self, name).shape:
                raise ValueError(f"RNNParams.{name}: sizes must be >= 1, got shape {getattr(self, name).shape}")

    @classmethod
    def _trusted(cls, W_xh, W_hh, b_h, W_hy, b_y):
        """An instance without the checks of ``__post_init__``: for arrays made by fastbptt itself
        (gradients: their shapes and dtype come from a checked instance), ~10 µs a call saved."""
        self = object.__new__(cls)
        self.W_xh, self.W_hh, self.b_h, self.W_hy, self.b_y = W_xh, W_hh, b_h, W_hy, b_y
        return self

    # ------------------------------------------------------------------ sizes
    @property
    def input_size(self) -> int:
        """D, the size of one input vector."""
        return self.W_xh.shape[1]

    @property
    def hidden_size(self) -> int:
        """H, the size of the hidden state."""
        return self.W_hh.shape[0]

    @property
    def output_size(self) -> int:
        """O, the size of one output vector."""
        return self.W_hy.shape[0]

    @property
    def dtype(self) -> np.dtype:
        return self.W_xh.dtype

    # --------------------------------------------------------------- helpers
    @staticmethod
    def field_names() -> tuple:
        """The names of the five arrays, in their canonical order."""
        return _FIELDS

    def arrays(self) -> tuple:
        """The five arrays in canonical order (views, not copies)."""
        return tuple(getattr(self, name) for name in _FIELDS)

    def items(self):
        """``(name, array)`` pairs in canonical order."""
        return [(name, getattr(self, name)) for name in _FIELDS]

    def copy(self) -> "RNNParams":
        """A deep copy (new, C-contiguous arrays)."""
        return RNNParams(*(np.array(a, copy=True, order="C") for a in self.arrays()))

    def zeros_like(self) -> "RNNParams":
        return RNNParams(*(np.zeros_like(a) for a in self.arrays()))

    def astype(self, dtype) -> "RNNParams":
        """A copy converted to ``dtype`` (float32 or float64)."""
        return RNNParams(*(np.array(a, dtype=dtype, copy=True, order="C") for a in self.arrays()))

    def flatten(self) -> np.ndarray:
        """All parameters packed into one 1-D array, in canonical order."""
        return np.concatenate([a.ravel() for a in self.arrays()])

    def unflatten(self, flat) -> "RNNParams":
        """New parameters of this shape, read from a packed 1-D array."""
        flat = np.asarray(flat, dtype=self.dtype)
        if flat.shape != (self.size,):
            raise ValueError(f"flat: expected shape ({self.size},), got {flat.shape}")
        out, pos = [], 0
        for a in self.arrays():
            out.append(flat[pos:pos + a.size].reshape(a.shape).copy())
            pos += a.size
        return RNNParams(*out)

    @property
    def size(self) -> int:
        """Total number of scalars."""
        return sum(a.size for a in self.arrays())

    def __eq__(self, other):
        if not isinstance(other, RNNParams):
            return NotImplemented
        return all(np.array_equal(a, b) for a, b in zip(self.arrays(), other.arrays())) and (
            self.dtype == other.dtype
        )

    def allclose(self, other, rtol=1e-7, atol=0.0) -> bool:
        return all(np.allclose(a, b, rtol=rtol, atol=atol) for a, b in zip(self.arrays(), other.arrays()))

    # ------------------------------------------------------------ construction
    @classmethod
    def init(cls, input_size, hidden_size, output_size, *, dtype=np.float32, seed=None):
        """Draw parameters as torch does: every entry from U(-1/sqrt(H), 1/sqrt(H)).

        Parameters
        ----------
        input_size, hidden_size, output_size : int
            D, H and O.
        dtype : float32 or float64
        seed : int, numpy.random.Generator or None
            Seeds a local generator; the global NumPy state is never used.
        """
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("output_size", output_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name}: expected a positive int, got {value!r}")
            if value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        dt = np.dtype(dtype)
        if dt not in _SUPPORTED_DTYPES:
            raise TypeError(f"dtype: expected float32 or float64, got {dtype!r}")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        D, H, O = int(input_size), int(hidden_size), int(output_size)
        bound = 1.0 / np.sqrt(H)

        def draw(*shape):
            return rng.uniform(-bound, bound, size=shape).astype(dt)

        return cls(W_xh=draw(H, D), W_hh=draw(H, H), b_h=draw(H), W_hy=draw(O, H), b_y=draw(O))

    @classmethod
    def from_torch(cls, rnn, linear):
        """Read parameters from a one-layer ``torch.nn.RNN`` and a ``torch.nn.Linear``.

        ``b_h`` is ``bias_ih_l0 + bias_hh_l0``. The RNN must be unidirectional,
        one layer, with biases; ``batch_first`` does not matter here.
        """
        if getattr(rnn, "num_layers", 1) != 1 or getattr(rnn, "bidirectional", False):
            raise ValueError("rnn: expected a one-layer, unidirectional torch.nn.RNN")
        if not getattr(rnn, "bias", True) or linear.bias is None:
            raise ValueError("rnn/linear: expected layers with biases")
        nonlin = getattr(rnn, "nonlinearity", "tanh")
        if nonlin not in ("tanh", "relu"):
            raise ValueError(f"rnn.nonlinearity: expected 'tanh' or 'relu', got {nonlin!r}")

        def np_(t):
            return t.detach().cpu().numpy().copy()

        W_xh, W_hh = np_(rnn.weight_ih_l0), np_(rnn.weight_hh_l0)
        b_h = np_(rnn.bias_ih_l0) + np_(rnn.bias_hh_l0)
        return cls(W_xh=W_xh, W_hh=W_hh, b_h=b_h.astype(W_xh.dtype),
                   W_hy=np_(linear.weight), b_y=np_(linear.bias))

    def to_torch(self, *, nonlinearity="tanh"):
        """Build ``(torch.nn.RNN, torch.nn.Linear)`` holding these parameters.

        ``bias_ih_l0 = b_h`` and ``bias_hh_l0 = 0``, so
        ``RNNParams.from_torch(*p.to_torch())`` gives ``p`` back exactly.
        torch is imported here, lazily; it is an optional dependency.
        """
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - depends on environment
            raise ImportError("to_torch needs PyTorch: pip install torch") from exc
        tdtype = torch.float32 if self.dtype == np.float32 else torch.float64
        rnn = torch.nn.RNN(self.input_size, self.hidden_size, num_layers=1,
                           nonlinearity=nonlinearity, bias=True, dtype=tdtype)
        linear = torch.nn.Linear(self.hidden_size, self.output_size, bias=True, dtype=tdtype)
        with torch.no_grad():
            rnn.weight_ih_l0.copy_(torch.from_numpy(np.ascontiguousarray(self.W_xh)))
            rnn.weight_hh_l0.copy_(torch.from_numpy(np.ascontiguousarray(self.W_hh)))
            rnn.bias_ih_l0.copy_(torch.from_numpy(np.ascontiguousarray(self.b_h)))
            rnn.bias_hh_l0.zero_()
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(self.W_hy)))
            linear.bias.copy_(torch.from_numpy(np.ascontiguousarray(self.b_y)))
        return rnn, linear

