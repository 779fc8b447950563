"""Swapping torch modules in an existing model for fastconv's."""
from __future__ import annotations

import torch

from .functional import check_algo
from .nn import Conv2d, ConvBNReLU, MaxPool2d


def convert(model: torch.nn.Module, *, algo: str = "auto") -> torch.nn.Module:
    """Make every ``torch.nn.Conv2d`` in ``model`` (the model itself included) a :class:`fastconv.Conv2d`,
    and every ``torch.nn.MaxPool2d`` a :class:`fastconv.MaxPool2d`.

    Modules are converted in place and keep their parameters, buffers, hooks and training mode, so an
    optimizer built before the conversion still holds the right tensors; ``model`` is returned. Only
    modules whose class is exactly ``nn.Conv2d`` or ``nn.MaxPool2d`` are converted (a user subclass may
    override ``forward``); existing fastconv modules (``Conv2d``, ``ConvBNReLU``, the blocks of
    :mod:`fastconv.models`) get the new ``algo``.
    """
    check_algo(algo)
    for module in model.modules():
        if type(module) is torch.nn.Conv2d:
            # fastconv.Conv2d only adds `algo` and the kernels behind _conv_forward: everything nn.Conv2d
            # holds stays valid under the subclass.
            module.__class__ = Conv2d
        elif type(module) is torch.nn.MaxPool2d:
            module.__class__ = MaxPool2d  # adds nothing but the kernels behind forward
        if isinstance(module, Conv2d) or hasattr(module, "_fold_caches") or isinstance(module, ConvBNReLU):
            module.algo = algo  # fastconv convs, fused conv-BN modules and the models' blocks
    return model
