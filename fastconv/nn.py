"""Drop-in modules."""
from __future__ import annotations

import threading

import torch

from . import functional
from .functional import check_algo, conv2d, conv_bn_relu, fold_batch_norm


class Conv2d(torch.nn.Conv2d):
    """:class:`torch.nn.Conv2d` computed by fastconv's kernels.

    Takes exactly ``torch.nn.Conv2d``'s arguments (including ``padding_mode`` ``'zeros'``, ``'reflect'``,
    ``'replicate'`` and ``'circular'``, ``device`` and ``dtype``) plus the keyword ``algo`` (one of
    :data:`fastconv.CONV_ALGOS`). Parameters, initialisation and ``state_dict`` are ``nn.Conv2d``'s, so
    state dicts load in both directions, and ``isinstance(m, torch.nn.Conv2d)`` holds.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        algo: str = "auto",
    ) -> None:
        check_algo(algo)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.algo = algo

    _relu = False  # Conv2dReLU fuses the ReLU into the kernel's epilogue

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            # As nn.Conv2d does: pad explicitly with the mode, then convolve without padding.
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        if not self._relu:
            return conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups, algo=self.algo)
        unbatched = input.dim() == 3
        if unbatched:
            input = input.unsqueeze(0)
        out = functional._conv2d("fastconv.Conv2dReLU", input, weight, bias, self.stride, padding, self.dilation,
                                 self.groups, self.algo, relu=True)
        return out.squeeze(0) if unbatched else out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, algo={self.algo!r}"


class Conv2dReLU(Conv2d):
    """``nn.Sequential(nn.Conv2d, nn.ReLU)`` in one module and one kernel launch: a :class:`Conv2d` (same
    constructor, parameters and ``state_dict`` as ``torch.nn.Conv2d``) whose output goes through a ReLU in
    the convolution kernel's epilogue. The AlexNet of :mod:`fastconv.models` is built from it."""

    _relu = True


class MaxPool2d(torch.nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` computed by fastconv's kernels (same constructor and attributes)."""

    def forward(self, input: torch.Tensor):
        return functional.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                                     ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class ResidualAdd(torch.nn.Module):
    """``forward(residual, shortcut)`` = :func:`fastconv.functional.residual_add` with this module's
    ``stride`` and ``relu``: the skip connection of a ResNet block, as a module."""

    def __init__(self, stride: int = 1, relu: bool = False) -> None:
        super().__init__()
        self.stride = stride
        self.relu = relu

    def forward(self, residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return functional.residual_add(residual, shortcut, stride=self.stride, relu=self.relu)

    def extra_repr(self) -> str:
        return f"stride={self.stride}, relu={self.relu}"


class ConvBNReLU(torch.nn.Module):
    """``nn.Sequential(nn.Conv2d, nn.BatchNorm2d, nn.ReLU)`` as one fused module, a drop-in in training and
    in eval mode (see :func:`fastconv.functional.conv_bn_relu` for the kernels).

    The submodules are ``conv`` (a :class:`fastconv.Conv2d`) and ``bn`` (a ``torch.nn.BatchNorm2d``), so the
    ``state_dict`` keys are ``conv.weight``, ``bn.weight``, ``bn.bias``, ``bn.running_mean``,
    ``bn.running_var``, ``bn.num_batches_tracked`` (and ``conv.bias`` with ``bias=True``), and every
    BatchNorm option (``momentum`` including ``None`` for the cumulative average, ``eps``, ``affine``,
    ``track_running_stats``) behaves as in torch, as does the conv's ``padding_mode`` (these three are
    keyword-only here). ``relu=False`` gives conv + BatchNorm only.

    Training normalises with the batch's biased variance and updates ``running_var`` with the unbiased one,
    exactly as ``torch.nn.BatchNorm2d`` does (some texts normalise with 1/(B-1); a drop-in follows torch).

    In eval mode BatchNorm is folded into the convolution's weight and bias and conv + bias + ReLU is one
    kernel. The folded weights are cached and recomputed whenever a parameter or buffer changes (in-place
    updates such as an optimizer step or ``load_state_dict`` bump the tensors' version counters; ``.to()``
    gives new tensors; writes through ``.data`` do not, see :func:`fastconv.nn.invalidate_fold_caches`);
    when gradients are needed for the parameters, they are folded afresh each call so autograd sees the
    fold. When ``conv`` or ``bn`` carries hooks, the modules themselves run (conv, then torch's BatchNorm
    and ReLU) so that the hooks see every call.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        relu: bool = True,
        *,
        padding_mode: str = "zeros",
        affine: bool = True,
        track_running_stats: bool = True,
        algo: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        check_algo(algo)
        super().__init__()
        self.conv = Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           padding_mode, algo=algo, device=device, dtype=dtype)
        self.bn = torch.nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, affine=affine,
                                       track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.relu = bool(relu)
        self.algo = algo
        self._fold_cache = FoldCache()

    @classmethod
    def from_modules(cls, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, relu: bool = True, *,
                     algo: str | None = None) -> "ConvBNReLU":
        """Wraps existing ``conv`` and ``bn`` modules (their parameters and buffers are shared, not copied, so
        an optimizer holding them stays valid). ``algo`` defaults to ``conv.algo`` for a
        :class:`fastconv.Conv2d`, else ``"auto"``."""
        if not isinstance(conv, torch.nn.Conv2d):
            raise TypeError(f"fastconv.ConvBNReLU.from_modules: conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        if not isinstance(bn, torch.nn.BatchNorm2d):
            raise TypeError(
                f"fastconv.ConvBNReLU.from_modules: bn must be a torch.nn.BatchNorm2d, got {type(bn).__name__}"
            )
        if bn.num_features != conv.out_channels:
            raise ValueError(
                f"fastconv.ConvBNReLU.from_modules: bn has {bn.num_features} features but conv has "
                f"{conv.out_channels} output channels"
            )
        algo = algo if algo is not None else getattr(conv, "algo", "auto")
        check_algo(algo)
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module.conv = conv
        module.bn = bn
        module.relu = bool(relu)
        module.algo = algo
        module._fold_cache = FoldCache()
        module.train(bn.training)
        return module

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``relu(bn(conv(input)))``, or with a ``residual`` of the output's shape (a ResNet shortcut)
        ``relu(bn(conv(input)) + residual)``: one kernel in eval mode with ``algo="implicit_gemm"``."""
        return run_conv_bn(self.conv, self.bn, input, relu=self.relu, algo=self.algo, cache=self._fold_cache,
                           residual=residual)

    def extra_repr(self) -> str:
        return f"relu={self.relu}, algo={self.algo!r}"


class FoldCache:
    """The eval-mode folded (weight, bias) of one conv + BatchNorm pair, refolded whenever one of the six
    tensors it reads changes: the key holds each tensor's storage address, version counter (bumped by every
    in-place update: optimizer steps, ``load_state_dict``), dtype and device. Writes that bypass version
    counters (``.data``, NumPy views) need :func:`invalidate_fold_caches`."""

    def __init__(self) -> None:
        self.key = None
        self.value = None
        self._lock = threading.Lock()  # threads sharing a module fold once and never see a half-updated entry

    def __getstate__(self):  # deepcopy and pickle: the lock is not copyable, the folded tensors are
        return {"key": self.key, "value": self.value}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def get(self, weight, bias, running_mean, running_var, bn_weight, bn_bias, eps: float):
        """fold_batch_norm of these tensors (a conv's and its BatchNorm's), from the cache while none changed."""
        tensors = (weight, bias, running_mean, running_var, bn_weight, bn_bias)

        def fold():
            return fold_batch_norm(*tensors, eps)

        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return fold()  # autograd must see the fold
        if torch.compiler.is_compiling():
            return fold()
        try:
            key = (eps, *[None if t is None else (t.data_ptr(), t._version, t.dtype, t.device) for t in tensors])
        except RuntimeError:  # inference tensors have no version counter: fold every call
            return fold()
        with self._lock:
            if self.key != key:
                # never inference tensors: a cache filled under inference_mode serves later autograd calls
                with torch.inference_mode(False), torch.no_grad():
                    self.value = fold()
                self.key = key
            return self.value


def has_hooks(m: torch.nn.Module) -> bool:
    """Whether hooks are registered on the module itself (pruning, observers, ...): fused paths then run it."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def invalidate_fold_caches(model: torch.nn.Module) -> None:
    """Forget every cached eval-mode fold in ``model``. Needed only after writes the version counters do not
    see: through ``.data`` (``conv.weight.data.mul_(2)``) or through memory shared with NumPy."""
    for m in model.modules():
        for cache in m.__dict__.values():
            if isinstance(cache, FoldCache):
                cache.key = None
            elif isinstance(cache, dict):
                for c in cache.values():
                    if isinstance(c, FoldCache):
                        c.key = None


def _conv_output_shape(conv: torch.nn.Conv2d, input: torch.Tensor) -> tuple:
    n, _, h, w = input.shape
    if conv.padding == "same":
        return (n, conv.out_channels, h, w)
    pad = (0, 0) if conv.padding == "valid" else conv.padding
    extents = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, p, d, k, s in zip((h, w), pad, conv.dilation, conv.kernel_size, conv.stride)]
    return (n, conv.out_channels, *extents)


def run_conv_bn(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, input: torch.Tensor, *, relu: bool, algo: str,
                cache: FoldCache, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``relu?(bn(conv(input)) + residual?)`` for any conv + BatchNorm pair, on the fused path (what
    :class:`ConvBNReLU` runs; the models call it on their torchvision-named ``conv1``/``bn1`` pairs, and with
    the shortcut as ``residual`` on a block's last pair)."""
    if input.dim() != 4:
        raise ValueError(f"fastconv.ConvBNReLU: expected 4D input (got {input.dim()}D input)")
    # (parameters and buffers are read once: each read goes through Module.__getattr__, ~0.5 us)
    weight = conv.weight
    if bn.num_features != weight.shape[0]:
        raise ValueError(f"fastconv.ConvBNReLU: conv produces {weight.shape[0]} channels but bn has "
                         f"{bn.num_features} features (changed after construction?)")
    if residual is not None and (tuple(residual.shape) != _conv_output_shape(conv, input)
                                 or residual.dtype != input.dtype or residual.device != input.device):
        # a shortcut that only broadcasts to the output, or needs type promotion: torch's add does that
        out = run_conv_bn(conv, bn, input, relu=False, algo=algo, cache=cache) + residual
        return torch.nn.functional.relu(out) if relu else out
    if has_hooks(conv) or has_hooks(bn):
        # Hooks (pruning's weight re-parametrisation, observers, ...) must see the modules run: call them.
        out = bn(conv(input))
        if residual is not None:
            out = out + residual
        return torch.nn.functional.relu(out) if relu else out
    padding = conv.padding
    if conv.padding_mode != "zeros":
        input = torch.nn.functional.pad(input, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        padding = 0
    # BatchNorm2d.forward's bookkeeping, verbatim in meaning.
    factor = 0.0 if bn.momentum is None else bn.momentum
    counted = bn.training and bn.track_running_stats and bn.num_batches_tracked is not None
    if counted:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bias, running_mean, running_var, bn_weight, bn_bias = conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias
    batch_stats = bn.training or (running_mean is None and running_var is None)
    tracked = not bn.training or bn.track_running_stats
    try:
        folded = None if batch_stats else cache.get(weight, bias, running_mean, running_var, bn_weight, bn_bias, bn.eps)
        return conv_bn_relu(
            input, weight, bias,
            running_mean if tracked else None, running_var if tracked else None, bn_weight, bn_bias,
            stride=conv.stride, padding=padding, dilation=conv.dilation, groups=conv.groups,
            training=batch_stats, momentum=factor, eps=bn.eps, relu=relu, algo=algo,
            folded=folded, residual=residual,
        )
    except Exception:
        if counted:  # torch's conv raises before its BatchNorm counts the batch: a failed call leaves no trace
            bn.num_batches_tracked.sub_(1)
        raise
