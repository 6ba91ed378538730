"""The parameter container shared by the model, its gradients and the optimizers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._validation import check_bool, check_choice, check_dtype, check_int
from ._threads import call_scope

__all__ = ["RNNParams", "RNNLayer", "INITS"]

_FIELDS = ("W_xh", "W_hh", "b_h", "W_hy", "b_y")
_LAYER_FIELDS = ("W_xh", "W_hh", "b_h")
_SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
INITS = ("uniform", "identity", "orthogonal")


@dataclass(eq=False)
class RNNLayer:
    """The recurrent weights of one (layer, direction): ``W_xh`` (H, D_in), ``W_hh`` (H, H), ``b_h`` (H,).

    ``D_in`` is the input size for layer 0, ``dirs·H`` for the layers above.
    The arrays are those of the :class:`RNNParams` that holds the layer (no
    copy), so an in-place update of one is an update of the other.
    """

    W_xh: np.ndarray
    W_hh: np.ndarray
    b_h: np.ndarray

    @property
    def input_size(self) -> int:
        return self.W_xh.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.W_hh.shape[0]


def _layer_suffix(layer, direction):
    """torch's parameter-name suffix: ``""`` for (0, forward), ``_l1``, ``_l0_reverse``, ..."""
    if layer == 0 and direction == 0:
        return ""
    return f"_l{layer}" + ("_reverse" if direction else "")


class RNNParams:
    """Parameters of an Elman RNN -- one layer or a stack, one or two directions -- and its head.

    Also used, field for field, for gradients.

    Parameters
    ----------
    W_xh : ndarray of shape (H, D)
        Input-to-hidden weights of a one-layer model (``rnn.weight_ih_l0`` in torch).
    W_hh : ndarray of shape (H, H)
        Hidden-to-hidden weights (``rnn.weight_hh_l0``).
    b_h : ndarray of shape (H,)
        Hidden bias (``rnn.bias_ih_l0 + rnn.bias_hh_l0``).
    W_hy : ndarray of shape (O, dirs·H), or None
        Hidden-to-output weights (``linear.weight``); None for a stack
        without a head (then ``b_y`` is None too).
    b_y : ndarray of shape (O,), or None
        Output bias (``linear.bias``).
    layers : sequence of RNNLayer or of (W_xh, W_hh, b_h) triples, keyword only
        Instead of ``W_xh, W_hh, b_h``: the recurrent weights of every (layer,
        direction) in torch's order (layer 0 forward, layer 0 reverse, layer
        1 forward, ...). Layer 0 takes the inputs (``W_xh`` (H, D)); layer
        l > 0 takes the previous layer's output (``W_xh`` (H, dirs·H)).
    bidirectional : bool, keyword only
        Whether ``layers`` alternate forward and reverse directions.

    All arrays share one floating dtype, float32 or float64. The constructor
    checks shapes and dtypes; it keeps the arrays it is given (no copy), so an
    optimizer step on ``params`` updates them in place.

    Attributes
    ----------
    layers : tuple of RNNLayer
    num_layers, num_directions : int
    bidirectional : bool
    W_xh, W_hh, b_h : ndarray
        Those of ``layers[0]``.
    """

    __slots__ = ("layers", "W_hy", "b_y", "bidirectional")

    def __init__(self, W_xh=None, W_hh=None, b_h=None, W_hy=None, b_y=None, *, layers=None,
                 bidirectional=False):
        if not isinstance(bidirectional, (bool, np.bool_)):
            raise TypeError(f"RNNParams: bidirectional must be True or False, got {bidirectional!r}")
        single = (W_xh, W_hh, b_h)
        if layers is None:
            if any(a is None for a in single):
                missing = [n for n, a in zip(_LAYER_FIELDS, single) if a is None]
                raise TypeError(f"RNNParams: expected W_xh, W_hh and b_h (or layers=), missing {missing}")
            layers = [single]
        elif any(a is not None for a in single):
            raise TypeError("RNNParams: give either W_xh, W_hh, b_h (one layer) or layers=, not both")
        try:
            layers = [lay if isinstance(lay, RNNLayer) else RNNLayer(*lay) for lay in layers]
        except TypeError as exc:
            raise TypeError(f"RNNParams: layers must be RNNLayer or (W_xh, W_hh, b_h) triples ({exc})") from None
        if (W_hy is None) != (b_y is None):
            raise TypeError("RNNParams: give both W_hy and b_y, or neither (a stack without a head)")
        self.layers = tuple(layers)
        self.W_hy, self.b_y = W_hy, b_y
        self.bidirectional = bool(bidirectional)
        self._check()

    def _check(self):
        named = self.items()
        for name, value in named:
            if not isinstance(value, np.ndarray):
                raise TypeError(f"RNNParams.{name}: expected a numpy.ndarray, got {type(value).__name__}")
        dtypes = {name: a.dtype for name, a in named}
        if len(set(dtypes.values())) != 1:
            given = ", ".join(f"{n}={d}" for n, d in dtypes.items())
            raise TypeError(f"RNNParams: all parameters must share one dtype, got {given}")
        dtype = named[0][1].dtype
        if dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"RNNParams: dtype must be float32 or float64, got {dtype}")
        dirs = self.num_directions
        if len(self.layers) % dirs:
            raise ValueError(f"RNNParams: a bidirectional model needs an even number of layers "
                             f"(forward, reverse per layer), got {len(self.layers)}")
        first = self.layers[0].W_xh
        if first.ndim != 2:
            raise ValueError(f"RNNParams.W_xh: expected shape (H, D), got {first.shape}")
        H, D = first.shape
        for i, lay in enumerate(self.layers):
            sfx = _layer_suffix(i // dirs, i % dirs)
            d_in = D if i < dirs else dirs * H
            for name, shape in (("W_xh", (H, d_in)), ("W_hh", (H, H)), ("b_h", (H,))):
                got = getattr(lay, name).shape
                if got != shape:
                    raise ValueError(f"RNNParams.{name}{sfx}: expected shape {shape} (H={H}, input "
                                     f"size {d_in}), got {got}")
        if self.W_hy is not None:
            if self.W_hy.ndim != 2 or self.W_hy.shape[1] != dirs * H:
                raise ValueError(f"RNNParams.W_hy: expected shape (O, {dirs * H}) (dirs·H), got {self.W_hy.shape}")
            O = self.W_hy.shape[0]
            if self.b_y.shape != (O,):
                raise ValueError(f"RNNParams.b_y: expected shape ({O},) (O={O}), got {self.b_y.shape}")
        for name, a in named:
            if 0 in a.shape:
                raise ValueError(f"RNNParams.{name}: sizes must be >= 1, got shape {a.shape}")

    @classmethod
    def _trusted_like(cls, template, arrays):
        """New params of ``template``'s structure from ``arrays`` in canonical order, without the
        checks: for arrays made by fastbptt itself (gradients), ~10 µs a call saved."""
        self = object.__new__(cls)
        n = 3 * len(template.layers)
        self.layers = tuple(RNNLayer(*arrays[i:i + 3]) for i in range(0, n, 3))
        self.W_hy, self.b_y = (arrays[n], arrays[n + 1]) if template.W_hy is not None else (None, None)
        self.bidirectional = template.bidirectional
        return self

    def _like(self, arrays):
        """New (checked) params of this structure from ``arrays`` in canonical order."""
        n = 3 * len(self.layers)
        head = arrays[n:n + 2] if self.W_hy is not None else (None, None)
        return type(self)(layers=[arrays[i:i + 3] for i in range(0, n, 3)], W_hy=head[0], b_y=head[1],
                          bidirectional=self.bidirectional)

    # ------------------------------------------------------------------ sizes
    def _first_layer_field(name, doc):
        def get(self):
            return getattr(self.layers[0], name)

        def set_(self, value):      # ``params.W_hh *= 2`` assigns the same array back
            old = getattr(self.layers[0], name)
            if not isinstance(value, np.ndarray) or value.shape != old.shape or value.dtype != old.dtype:
                raise ValueError(f"RNNParams.{name}: expected an ndarray of shape {old.shape} and dtype "
                                 f"{old.dtype}, got {getattr(value, 'shape', type(value).__name__)} "
                                 f"{getattr(value, 'dtype', '')}")
            setattr(self.layers[0], name, value)
        return property(get, set_, doc=doc)

    W_xh = _first_layer_field("W_xh", "``layers[0].W_xh`` (H, D).")
    W_hh = _first_layer_field("W_hh", "``layers[0].W_hh`` (H, H).")
    b_h = _first_layer_field("b_h", "``layers[0].b_h`` (H,).")
    del _first_layer_field

    @property
    def input_size(self) -> int:
        """D, the size of one input vector."""
        return self.layers[0].W_xh.shape[1]

    @property
    def hidden_size(self) -> int:
        """H, the size of the hidden state of each layer and direction."""
        return self.layers[0].W_hh.shape[0]

    @property
    def output_size(self):
        """O, the size of one output vector (None without a head)."""
        return None if self.W_hy is None else self.W_hy.shape[0]

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def num_layers(self) -> int:
        return len(self.layers) // self.num_directions

    @property
    def has_head(self) -> bool:
        return self.W_hy is not None

    @property
    def dtype(self) -> np.dtype:
        return self.layers[0].W_xh.dtype

    # --------------------------------------------------------------- helpers
    @staticmethod
    def field_names() -> tuple:
        """The names of a one-layer model's five arrays, in canonical order (see :meth:`names`)."""
        return _FIELDS

    def names(self) -> tuple:
        """The names of this model's arrays in canonical order: each (layer, direction) in
        torch's order (``W_xh, W_hh, b_h`` for layer 0, then ``W_xh_l0_reverse``, ...,
        ``W_xh_l1``, ...), then the head ``W_hy, b_y`` if there is one."""
        dirs = self.num_directions
        out = [f"{f}{_layer_suffix(i // dirs, i % dirs)}" for i in range(len(self.layers)) for f in _LAYER_FIELDS]
        if self.W_hy is not None:
            out += ["W_hy", "b_y"]
        return tuple(out)

    def arrays(self) -> tuple:
        """The arrays in canonical order (views, not copies)."""
        out = [a for lay in self.layers for a in (lay.W_xh, lay.W_hh, lay.b_h)]
        if self.W_hy is not None:
            out += [self.W_hy, self.b_y]
        return tuple(out)

    def items(self):
        """``(name, array)`` pairs in canonical order."""
        return list(zip(self.names(), self.arrays()))

    def copy(self) -> "RNNParams":
        """A deep copy (new, C-contiguous arrays)."""
        return self._like([np.array(a, copy=True, order="C") for a in self.arrays()])

    def zeros_like(self) -> "RNNParams":
        return self._like([np.zeros_like(a) for a in self.arrays()])

    def astype(self, dtype) -> "RNNParams":
        """A copy converted to ``dtype`` (float32 or float64)."""
        return self._like([np.array(a, dtype=dtype, copy=True, order="C") for a in self.arrays()])

    def flatten(self) -> np.ndarray:
        """All parameters packed into one 1-D array, in canonical order."""
        return np.concatenate([a.ravel() for a in self.arrays()])

    def unflatten(self, flat) -> "RNNParams":
        """New parameters of this structure, read from a packed 1-D array."""
        flat = np.asarray(flat, dtype=self.dtype)
        if flat.shape != (self.size,):
            raise ValueError(f"flat: expected shape ({self.size},), got {flat.shape}")
        out, pos = [], 0
        for a in self.arrays():
            out.append(flat[pos:pos + a.size].reshape(a.shape).copy())
            pos += a.size
        return self._like(out)

    @property
    def size(self) -> int:
        """Total number of scalars."""
        return sum(a.size for a in self.arrays())

    def same_structure(self, other) -> bool:
        """Whether ``other`` has the same layers, directions, head and array shapes and dtype."""
        return (isinstance(other, RNNParams) and self.bidirectional == other.bidirectional
                and self.names() == other.names() and self.dtype == other.dtype
                and all(a.shape == b.shape for a, b in zip(self.arrays(), other.arrays())))

    def __eq__(self, other):
        if not isinstance(other, RNNParams):
            return NotImplemented
        return self.same_structure(other) and all(np.array_equal(a, b) for a, b in
                                                  zip(self.arrays(), other.arrays()))

    __hash__ = None

    def allclose(self, other, rtol=1e-7, atol=0.0) -> bool:
        return self.same_structure(other) and all(np.allclose(a, b, rtol=rtol, atol=atol)
                                                  for a, b in zip(self.arrays(), other.arrays()))

    def __repr__(self):
        head = f", output_size={self.output_size}" if self.has_head else ", no head"
        return (f"RNNParams(input_size={self.input_size}, hidden_size={self.hidden_size}{head}, "
                f"num_layers={self.num_layers}, bidirectional={self.bidirectional}, dtype={self.dtype.name})")

    # ------------------------------------------------------------ construction
    @classmethod
    def init(cls, input_size, hidden_size, output_size, *, num_layers=1, bidirectional=False,
             init="uniform", dtype=np.float32, seed=None):
        """Draw parameters as torch does: every entry from U(-1/sqrt(H), 1/sqrt(H)).

        Parameters
        ----------
        input_size, hidden_size : int
            D and H.
        output_size : int or None
            O; None for a stack without a head (``W_hy``, ``b_y`` are None).
        num_layers : int >= 1
        bidirectional : bool
        init : {"uniform", "identity", "orthogonal"}
            ``"uniform"``: torch's default, everything U(-1/√H, 1/√H).
            ``"identity"`` (IRNN, Le, Jaitly & Hinton 2015): every ``W_hh = I``
            and ``b_h = 0``, the rest uniform. ``"orthogonal"``: every
            ``W_hh`` a random orthogonal matrix (QR of a Gaussian matrix,
            signs fixed so that it is Haar-distributed) and ``b_h = 0``, the
            rest uniform. The other arrays are the same for one seed
            whatever ``init``.
        dtype : float32 or float64
        seed : int, numpy.random.Generator or None
            Seeds a local generator; the global NumPy state is never used.
        """
        D = check_int("input_size", input_size)
        H = check_int("hidden_size", hidden_size)
        O = check_int("output_size", output_size, allow_none=True)
        L = check_int("num_layers", num_layers)
        bidirectional = check_bool("bidirectional", bidirectional)
        check_choice("init", init, INITS)
        dt = check_dtype("dtype", dtype)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        dirs = 2 if bidirectional else 1
        bound = 1.0 / np.sqrt(H)

        def draw(*shape):
            return rng.uniform(-bound, bound, size=shape).astype(dt)

        layers = [[draw(H, D if i < dirs else dirs * H), draw(H, H), draw(H)] for i in range(L * dirs)]
        head = (draw(O, dirs * H), draw(O)) if O is not None else (None, None)
        for lay in layers:          # after every uniform draw, so that those do not depend on ``init``
            if init == "identity":
                lay[1:] = np.eye(H, dtype=dt), np.zeros(H, dtype=dt)
            elif init == "orthogonal":
                with call_scope():      # LAPACK on one thread, as every fastbptt call
                    q, r = np.linalg.qr(rng.standard_normal((H, H)))
                lay[1:] = np.ascontiguousarray(q * np.sign(np.diag(r)), dtype=dt), np.zeros(H, dtype=dt)
        return cls(layers=layers, W_hy=head[0], b_y=head[1], bidirectional=bool(bidirectional))

    @classmethod
    def from_torch(cls, rnn, linear=None):
        """Read parameters from any ``torch.nn.RNN`` and, optionally, a ``torch.nn.Linear`` head.

        Every (layer, direction) gives ``W_xh = weight_ih_l{k}[_reverse]``,
        ``W_hh = weight_hh_l{k}[_reverse]`` and ``b_h = bias_ih + bias_hh``
        (zeros for ``bias=False``); ``batch_first`` and ``nonlinearity`` are
        not parameters (pass ``activation=`` to the functions). Without
        ``linear`` the params have no head.
        """
        import torch  # noqa: F401  (the caller has torch: it gave a torch module)

        if not isinstance(rnn, torch.nn.RNN):
            raise TypeError(f"rnn: expected a torch.nn.RNN, got {type(rnn).__name__}")
        if linear is not None and not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear: expected a torch.nn.Linear or None, got {type(linear).__name__}")

        def np_(t):
            return t.detach().cpu().numpy().copy()

        dirs = 2 if rnn.bidirectional else 1
        layers = []
        for i in range(rnn.num_layers * dirs):
            sfx = f"_l{i // dirs}" + ("_reverse" if i % dirs else "")
            W_xh, W_hh = np_(getattr(rnn, "weight_ih" + sfx)), np_(getattr(rnn, "weight_hh" + sfx))
            if rnn.bias:
                b_h = np_(getattr(rnn, "bias_ih" + sfx)) + np_(getattr(rnn, "bias_hh" + sfx))
            else:
                b_h = np.zeros(W_hh.shape[0], dtype=W_hh.dtype)
            layers.append((W_xh, W_hh, b_h.astype(W_xh.dtype)))
        if linear is None:
            return cls(layers=layers, bidirectional=bool(rnn.bidirectional))
        b_y = np_(linear.bias) if linear.bias is not None else np.zeros(linear.out_features, dtype=layers[0][0].dtype)
        return cls(layers=layers, W_hy=np_(linear.weight), b_y=b_y, bidirectional=bool(rnn.bidirectional))

    def to_torch(self, *, nonlinearity="tanh"):
        """Build ``(torch.nn.RNN, torch.nn.Linear or None)`` holding these parameters.

        ``bias_ih = b_h`` and ``bias_hh = 0``, so ``RNNParams.from_torch(*p.to_torch())``
        gives ``p`` back exactly. torch is imported here, lazily; it is an
        optional dependency.
        """
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - depends on environment
            raise ImportError("to_torch needs PyTorch (CPU build: pip install torch "
                              "--index-url https://download.pytorch.org/whl/cpu)") from exc
        tdtype = torch.float32 if self.dtype == np.float32 else torch.float64
        rnn = torch.nn.RNN(self.input_size, self.hidden_size, num_layers=self.num_layers,
                           nonlinearity=nonlinearity, bias=True, bidirectional=self.bidirectional, dtype=tdtype)
        dirs = self.num_directions

        def t_(a):
            return torch.from_numpy(np.ascontiguousarray(a))

        with torch.no_grad():
            for i, lay in enumerate(self.layers):
                sfx = f"_l{i // dirs}" + ("_reverse" if i % dirs else "")
                getattr(rnn, "weight_ih" + sfx).copy_(t_(lay.W_xh))
                getattr(rnn, "weight_hh" + sfx).copy_(t_(lay.W_hh))
                getattr(rnn, "bias_ih" + sfx).copy_(t_(lay.b_h))
                getattr(rnn, "bias_hh" + sfx).zero_()
        linear = None
        if self.has_head:
            linear = torch.nn.Linear(dirs * self.hidden_size, self.output_size, bias=True, dtype=tdtype)
            with torch.no_grad():
                linear.weight.copy_(t_(self.W_hy))
                linear.bias.copy_(t_(self.b_y))
        return rnn, linear
