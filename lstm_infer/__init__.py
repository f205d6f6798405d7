"""lstm-infer: fast CPU inference for LSTM / GRU / RNN language models, with Numba kernels."""

from ._threading import preload_tbb

preload_tbb()  # before any kernel runs: Numba picks its threading layer at the first parallel call

from .errors import LstmInferError  # noqa: E402
from .model import Model, load  # noqa: E402

__version__ = "0.1.0"
__all__ = ["LstmInferError", "Model", "load", "__version__"]
