"""fastconv's functional API: drop-in replacements for ``torch.nn.functional`` ops."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from . import _checks, backends, ops
from .ops import CONV_OPS

#: Every name ``algo=`` accepts. ``"auto"`` chooses per call (:mod:`fastconv.backends`).
CONV_ALGOS: tuple[str, ...] = ("auto",) + tuple(CONV_OPS)


def check_algo(algo: str) -> None:
    if algo not in CONV_ALGOS:
        raise ValueError(f"fastconv: unknown algo {algo!r}; expected one of {CONV_ALGOS}")


def _conv_call(choice: str, input, weight, bias, stride, padding, dilation, groups, relu=False):
    """Runs one algorithm's forward op; `choice` is an algorithm or ``"implicit_gemm/<tile>"``
    (backends.parse_choice), its own arguments come from backends.algo_args; `relu` fuses a ReLU."""
    algo, tile = backends.parse_choice(choice)
    extra = backends.algo_args(algo, tile)
    return ops.call(CONV_OPS[algo].fprop, input, weight, bias, list(stride), list(padding), list(dilation), groups, *extra,
                    relu)


def check_no_forward_ad(op: str, *tensors) -> None:
    """fastconv's ops have reverse-mode derivatives only: refuse forward-mode AD (torch.func.jvp,
    torch.autograd.forward_ad) instead of silently dropping the tangents."""
    if getattr(fwAD, "_current_level", 0) < 0:  # no dual level is open: no tensor carries a tangent
        return
    if torch.compiler.is_compiling():
        return
    if any(isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(
            f"{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) is not supported by fastconv's "
            "ops; use reverse mode (backward, torch.autograd.grad, torch.func.vjp)"
        )


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    *,
    algo: str = "auto",
) -> torch.Tensor:
    """2-D convolution with exactly :func:`torch.nn.functional.conv2d`'s semantics, on fastconv's kernels.

    Args:
        input: ``(N, C, H, W)`` or unbatched ``(C, H, W)``; NCHW, channels_last or any strides.
        weight: ``(K, C / groups, R, S)``.
        bias: optional ``(K,)``.
        stride, dilation: an int or a pair of ints, all positive.
        padding: an int or a pair of non-negative ints (zeros on both sides), ``'valid'`` (none) or
            ``'same'`` (output as large as the input; stride 1 only).
        groups: splits the channels into independent groups (``groups == C`` is depthwise).
        algo: one of :data:`CONV_ALGOS`: ``"direct"``, ``"im2col"`` (im2col + GEMM, the batch chunked to
            the workspace limit of :mod:`fastconv.backends`), ``"implicit_gemm"`` (a GEMM on tensor cores
            whose activation operand is gathered on the fly; CUDA sm_80+ with float16/bfloat16, or float32
            as TF32 while torch.backends.cudnn.allow_tf32 allows it; best with channels_last tensors; a reference twin on the CPU), or ``"auto"`` (chosen
            per call, see :mod:`fastconv.backends`).

    The output has torch's memory format (channels_last if the input or the weight is). Supported dtypes
    are float32, float16 and bfloat16, plus float64 on the CPU; fp16/bf16 accumulate in fp32.
    Differentiable in every tensor argument, twice.
    """
    op = "fastconv.conv2d"
    check_algo(algo)
    if not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: input and weight must be tensors")
    _checks.check_input_rank(op, input.shape)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    output = _conv2d(op, input, weight, bias, stride, padding, dilation, groups, algo, relu=False)
    return output.squeeze(0) if unbatched else output


def _conv2d(op, input, weight, bias, stride, padding, dilation, groups, algo, relu, residual=None):
    """conv2d of a 4-D input after normalising the arguments as torch does; `relu` fuses a ReLU and
    `residual` (the output's shape) is added before it: in the kernel's epilogue with implicit_gemm, by
    fastconv's residual add otherwise."""
    check_no_forward_ad(op, input, weight, bias)
    stride, padding, dilation, (extra_h, extra_w) = _checks.conv2d_params(op, weight.shape, stride, padding, dilation,
                                                                          groups)
    if extra_h or extra_w:  # padding='same' with an odd total: the extra zeros at the bottom/right, as torch
        input = F.pad(input, (0, extra_w, 0, extra_h))
    args = (input, weight, bias, stride, padding, dilation, _checks.conv_groups(op, groups))
    choice = algo
    if algo == "auto":
        def candidates():
            return {c: (lambda c=c: _conv_call(c, *args, relu)) for c in backends.candidate_choices(input)}

        choice = backends.choose_algo(*args, candidates=candidates)
    if residual is None:
        return _conv_call(choice, *args, relu)
    chosen, tile = backends.parse_choice(choice)
    if chosen == "implicit_gemm":
        return ops.call(ops.implicit_gemm_fused, input, weight, None, bias, residual, list(stride), list(padding),
                        list(dilation), groups, tile, relu)
    output = _conv_call(choice, *args, False)
    _check_residual(op, residual, output)
    return ops.call(ops.residual_add, output, residual, 1, relu)


def _check_residual(op: str, residual: torch.Tensor, output: torch.Tensor) -> None:
    # residual_add would zero-pad a residual with fewer channels; here it must match the output exactly
    if residual.shape != output.shape:
        raise ValueError(f"{op}: residual must have the output's shape {list(output.shape)}, got {list(residual.shape)}")


def max_pool2d(
    input: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
):
    """2-D max pooling with exactly :func:`torch.nn.functional.max_pool2d`'s semantics.

    ``stride`` defaults to ``kernel_size``; ``padding`` (implicit -inf) is at most half the kernel;
    ``ceil_mode`` lets the last window hang over the end if it starts inside the input or its left
    padding. NaN propagates. With ``return_indices`` also returns the flat ``h * W + w`` position of each
    maximum in its plane (torch's convention, usable by ``max_unpool2d``). ``(N, C, H, W)`` or unbatched
    ``(C, H, W)``, NCHW or channels_last (the output follows the input), float32/float16/bfloat16 (and
    float64 on the CPU).
    """
    op = "fastconv.max_pool2d"
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{op}: input must be a tensor")
    check_no_forward_ad(op, input)
    _checks.check_input_rank(op, input.shape)
    kernel_size, stride, padding, dilation = _checks.pool2d_params(op, kernel_size, stride, padding, dilation)
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    output, indices = ops.call(ops.max_pool2d, input, list(kernel_size), list(stride), list(padding), list(dilation),
                               bool(ceil_mode))
    if unbatched:
        output, indices = output.squeeze(0), indices.squeeze(0)
    return (output, indices) if return_indices else output


def residual_add(residual: torch.Tensor, shortcut: torch.Tensor, *, stride: int = 1, relu: bool = False) -> torch.Tensor:
    """A ResNet block's skip connection in one kernel: ``relu?(residual + shortcut~)``, where
    ``shortcut~[n, j, p, q] = shortcut[n, j, stride * p, stride * q]`` for the shortcut's ``J`` channels and 0
    for the residual's extra channels (the strided, zero-padded identity shortcut of He et al.'s CIFAR
    ResNets). ``stride=1`` with equal channels is a plain add.

    The residual is ``(N, C, P, Q)`` and the shortcut ``(N, J, H, W)`` with ``J <= C``,
    ``P = ceil(H / stride)`` and ``Q = ceil(W / stride)``; unbatched 3-D tensors work too. Equivalent to
    ``residual + F.pad(shortcut[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, C - J))`` (then ``relu``).
    """
    op = "fastconv.residual_add"
    if not isinstance(residual, torch.Tensor) or not isinstance(shortcut, torch.Tensor):
        raise TypeError(f"{op}: residual and shortcut must be tensors")
    check_no_forward_ad(op, residual, shortcut)
    _checks.check_residual_add_args(op, residual.shape, shortcut.shape, stride)
    unbatched = residual.dim() == 3
    if unbatched:
        residual, shortcut = residual.unsqueeze(0), shortcut.unsqueeze(0)
    output = ops.call(ops.residual_add, residual, shortcut, stride, bool(relu))
    return output.squeeze(0) if unbatched else output


def fold_batch_norm(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps: float):
    """BatchNorm (eval mode) folded into the convolution before it:
    ``w' = w * gamma / sqrt(var + eps)`` (per output channel) and ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.

    Computed in float32 (float64 for float64 weights) and rounded once to the weight's dtype. Differentiable
    in every argument (the fused eval path uses this when parameters require gradients).
    """
    ct = torch.float64 if weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(running_var.to(ct) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(ct)
    folded_weight = weight.to(ct) * scale.view(-1, 1, 1, 1)
    shift = -running_mean.to(ct) if bias is None else bias.to(ct) - running_mean.to(ct)
    folded_bias = shift * scale
    if bn_bias is not None:
        folded_bias = folded_bias + bn_bias.to(ct)
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)


def _update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    # torch's update, (1 - momentum) * running + momentum * batch: the batch mean, and the batch variance made
    # unbiased (count / (count - 1)). Buffers of the statistics' dtype update in place with one lerp (a kernel
    # each, where the three-term form launches four); buffers of another dtype (float16, bfloat16) are updated
    # at the statistics' precision and rounded once. Under torch.compile the three-term form: a lerp's weight
    # is a Scalar argument, which dynamo specialises on, so momentum=None's changing 1/n would recompile every
    # step.
    fused = not torch.compiler.is_compiling()

    def blend_(running, batch):
        if fused and running.dtype == batch.dtype:
            running.lerp_(batch, momentum)
        else:
            running.copy_(momentum * batch + (1 - momentum) * running.to(batch.dtype))

    with torch.no_grad():
        if running_mean is not None:
            blend_(running_mean, mean)
        if running_var is not None:
            blend_(running_var, var * (count / (count - 1)))


def conv_bn_relu(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    bn_weight: torch.Tensor | None = None,
    bn_bias: torch.Tensor | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: str | int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    relu: bool = True,
    algo: str = "auto",
    folded: tuple[torch.Tensor, torch.Tensor] | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``relu(batch_norm(conv2d(input, weight, bias, ...), running_mean, running_var, bn_weight, bn_bias,
    training, momentum, eps) + residual)`` on fastconv's fused kernels; ``relu=False`` drops the ReLU and
    ``residual=None`` (the default) the add. The residual (a ResNet block's shortcut) has the output's shape.

    Arguments are those of :func:`conv2d` and :func:`torch.nn.functional.batch_norm`, with the same meaning:

    * ``training=True``: normalise with the batch's statistics (mean and *biased* variance, as torch does),
      and update ``running_mean`` / ``running_var`` in place when given, with the *unbiased* variance and
      ``momentum`` as the weight of the new value. The convolution runs first, then one kernel reduces
      per-channel statistics in a single pass and one kernel applies normalise + affine + ReLU. Backward:
      one kernel for the ReLU mask and the two per-channel sums, one for the input gradient, then the
      convolution's own backward. Only the conv output and two per-channel vectors are saved.
    * ``training=False``: the running statistics are folded into the convolution
      (:func:`fold_batch_norm`), and conv + bias + ReLU is one kernel launch. ``folded`` may pass weights
      folded beforehand (:class:`fastconv.ConvBNReLU` caches them). With a residual and the
      ``"implicit_gemm"`` algorithm, conv + bias + residual + ReLU is one kernel (a ResNet block's end);
      other algorithms add it with fastconv's residual add.

    ``input`` is 4-D ``(N, C, H, W)``, NCHW or channels_last. BatchNorm parameters may be in the input's
    dtype or float32; statistics are computed in float32 (float64 for float64 input).
    """
    op = "fastconv.conv_bn_relu"
    check_algo(algo)
    if not isinstance(input, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: input and weight must be tensors")
    if input.dim() != 4:
        raise ValueError(f"{op}: expected a 4-D (N, C, H, W) input (BatchNorm2d's), got a {input.dim()}-D tensor "
                         f"of shape {list(input.shape)}")
    check_no_forward_ad(op, input, weight, bias, running_mean, running_var, bn_weight, bn_bias, residual)
    if residual is not None and not isinstance(residual, torch.Tensor):
        raise TypeError(f"{op}: residual must be a tensor or None")
    # torch's batch_norm rules (a zero eps in training divides a constant channel by zero)
    if training and not eps > 0:
        raise ValueError(f"{op}: eps must be positive during training, got {eps}")
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be non-negative, got {eps}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must either both be None or neither be None")
    conv_args = (stride, padding, dilation, groups, algo)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(f"{op}: running_mean and running_var are required when training=False")
        if folded is None:
            folded = fold_batch_norm(weight, bias, running_mean, running_var, bn_weight, bn_bias, eps)
        return _conv2d(op, input, folded[0], folded[1], *conv_args, relu=relu, residual=residual)
    y = _conv2d(op, input, weight, bias, *conv_args, relu=False)
    # with a residual the ReLU comes after the add (residual_add applies it)
    output, mean, var = ops.call(ops.batch_norm_relu, y, bn_weight, bn_bias, float(eps), bool(relu) and residual is None)
    count = y.numel() // y.shape[1] if y.shape[1] else 0
    if count > 0:  # an empty batch leaves the running statistics alone, as torch does
        _update_running_stats(running_mean, running_var, mean, var, count, momentum)
    if residual is not None:
        _check_residual(op, residual, output)
        output = ops.call(ops.residual_add, output, residual, 1, bool(relu))
    return output
