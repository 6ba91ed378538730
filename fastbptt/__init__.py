"""fastbptt: fast, exact backpropagation through time for Elman RNNs on the CPU."""

from . import datasets, diagnostics, optim
from .backends import available_backends
from .clip import clip_grad_norm, clip_grad_value
from .functional import forward, loss_and_grad, rnn, rnn_vjp
from .params import RNNLayer, RNNParams
from ._threads import get_num_threads, set_num_threads
from .estimator import RNN
from .step import Step

__version__ = "0.1.0"

__all__ = ["RNNParams", "RNNLayer", "forward", "loss_and_grad", "rnn", "rnn_vjp", "available_backends", "RNN", "Step", "optim",
           "clip_grad_norm", "clip_grad_value", "datasets", "diagnostics", "get_num_threads",
           "set_num_threads", "__version__"]
