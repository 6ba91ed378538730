"""fastbptt: fast, exact backpropagation through time for Elman RNNs on the CPU."""

from ._backends import available_backends
from ._core import forward, loss_and_grad
from ._params import RNNParams

__version__ = "0.1.0"

__all__ = ["RNNParams", "forward", "loss_and_grad", "available_backends", "__version__"]
