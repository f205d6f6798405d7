"""lstm-infer: fast CPU inference for LSTM / GRU / RNN language models, with Numba kernels."""

from .errors import LstmInferError
from .model import Model, load

__version__ = "0.1.0"
__all__ = ["LstmInferError", "Model", "load", "__version__"]
