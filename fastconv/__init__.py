"""fastconv: hand-written CUDA (and C++ CPU) convolution kernels for PyTorch, as drop-in ops and modules."""
import torch  # noqa: F401  (loads libtorch before the extension)

__version__ = "0.1.0"
__all__ = ["CONV_ALGOS", "backends", "Conv2d", "Conv2dReLU", "ConvBNReLU", "MaxPool2d", "ResidualAdd", "WITH_CUDA",
           "convert", "functional", "fuse", "models"]

try:
    from ._extension import _C
except ImportError as _missing:  # pragma: no cover - depends on the build
    # Without the compiled extension the package still imports, so that fastconv.cupy's build-free path (NVRTC)
    # works; everything else raises the build instructions when first used.
    _EXTENSION_ERROR = _missing
    WITH_CUDA = False

    def __getattr__(name: str):
        if name not in __all__:  # a submodule such as fastconv.cupy: `from fastconv import x` goes on to import it
            raise AttributeError(f"module 'fastconv' has no attribute {name!r}")
        raise ImportError(f"fastconv.{name}: {_EXTENSION_ERROR}") from _EXTENSION_ERROR

else:
    from . import ops  # noqa: F401  (registers fakes and autograd)
    from . import backends, functional
    from .convert import convert
    from .functional import CONV_ALGOS
    from .fuse import fuse
    from . import models  # noqa: E402  (after nn: the models are built from its modules)
    from .nn import Conv2d, Conv2dReLU, ConvBNReLU, MaxPool2d, ResidualAdd

    #: True when the extension was built with its CUDA kernels.
    WITH_CUDA: bool = bool(_C.WITH_CUDA)
