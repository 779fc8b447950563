"""fastconv: hand-written CUDA (and C++ CPU) convolution kernels for PyTorch, as drop-in ops and modules."""
import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(
        "fastconv's compiled extension (fastconv._C) is missing or was built for another torch: build it with "
        "`pip install --no-build-isolation .` or `python setup.py build_ext --inplace` (scripts/test.sh does "
        f"this). Original error: {e}"
    ) from e

from . import ops  # noqa: F401  (registers fakes and autograd)
from . import backends, functional
from .convert import convert
from .functional import CONV_ALGOS
from .fuse import fuse
from . import models  # noqa: E402  (after nn: the models are built from its modules)
from .nn import Conv2d, Conv2dReLU, ConvBNReLU, MaxPool2d, ResidualAdd

#: True when the extension was built with its CUDA kernels.
WITH_CUDA: bool = bool(_C.WITH_CUDA)

__version__ = "0.1.0"
__all__ = ["CONV_ALGOS", "backends", "Conv2d", "Conv2dReLU", "ConvBNReLU", "MaxPool2d", "ResidualAdd", "WITH_CUDA", "convert",
           "functional", "fuse", "models"]
