"""Fake (meta) implementations and autograd of the fastconv:: ops.

The schemas live in csrc/fastconv.cpp and the CPU/CUDA kernels in csrc/cpu and csrc/cuda. Here:

* a fake implementation per op, so FakeTensor, ``torch.compile`` and ``torch.export`` see the output's
  shape, dtype and memory format without running a kernel;
* autograd, registered with ``torch.library.register_autograd`` (PyTorch wraps each registration in a
  ``torch.autograd.Function``). Each convolution algorithm is an op family: fprop's backward calls the
  family's dgrad and wgrad ops, and those are differentiable too (the derivative of each step is another
  step of the same family), so double backward works.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch._prims_common import suggest_memory_format

from . import _checks, backends
from ._extension import _C  # noqa: F401  (the ops' schemas; the build instructions when missing)

_lib = torch.ops.fastconv


class ConvOps(NamedTuple):
    """The three ops of one convolution algorithm."""

    fprop: torch._ops.OpOverload
    dgrad: torch._ops.OpOverload
    wgrad: torch._ops.OpOverload


CONV_OPS: dict[str, ConvOps] = {
    "direct": ConvOps(_lib.conv2d_direct.default, _lib.conv2d_direct_dgrad.default, _lib.conv2d_direct_wgrad.default),
    # The im2col ops take one more argument, workspace_bytes; it rides along with the conv arguments.
    "im2col": ConvOps(_lib.conv2d_im2col.default, _lib.conv2d_im2col_dgrad.default, _lib.conv2d_im2col_wgrad.default),
    # The implicit-GEMM ops take the kernel's tile configuration (-1: by size), which rides along the same way.
    "implicit_gemm": ConvOps(_lib.conv2d_implicit_gemm.default, _lib.conv2d_implicit_gemm_dgrad.default,
                             _lib.conv2d_implicit_gemm_wgrad.default),
}

#: relu?(conv(input, weight) * scale + shift + residual) in one implicit-GEMM kernel (csrc/fastconv.cpp).
implicit_gemm_fused = _lib.conv2d_implicit_gemm_fused.default

bias_grad = _lib.conv2d_bias_grad.default


_any_requires_grad = getattr(torch._C, "_any_requires_grad", None)
# the innermost active torch.func transform's level (None outside every transform)
_functorch_level = getattr(getattr(torch._C, "_functorch", None), "maybe_current_level", lambda: 0)


def call(op: torch._ops.OpOverload, *args):
    """``op(*args)``, for the forward paths of fastconv.functional and the modules. When autograd has nothing
    to record (grad mode off, or no argument requires grad) the call goes straight below the autograd key (to
    the CPU/CUDA kernel, or the fake implementation): what the autograd kernel that ``register_autograd``
    generates does itself in that case, without its round trip through Python (about 10 us a call, most of
    a small layer's host time in inference). Under ``torch.compile`` the op is called as it is."""
    if torch.compiler.is_compiling():  # (first: dynamo cannot trace _any_requires_grad)
        return op(*args)
    if _functorch_level() is not None:
        # inside vmap/grad transforms a wrapper reports requires_grad=False while the tensor it wraps needs a
        # gradient, and the dispatch-key state set here would reach the unwrapped call. The autograd.Function
        # that register_autograd generates has no setup_context, which torch.func's transforms require: the op
        # goes through one that has (same setup and backward, see _functorch_function).
        function = _functorch_function(op)
        return function.apply(*args) if function is not None and torch._C.is_grad_enabled() else op(*args)
    if torch._C.is_grad_enabled() and (_any_requires_grad is None or _any_requires_grad(*args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# ---- autograd registration, and its twin for torch.func ---------------------------------------------------

# op -> (setup_context, backward), as given to register_autograd
_AUTOGRAD_RULES: dict = {}
_FUNCTORCH_FUNCTIONS: dict = {}


def register_autograd(op: torch._ops.OpOverload, backward, *, setup_context) -> None:
    """``torch.library.register_autograd``, and the same rule kept for :func:`_functorch_function`."""
    torch.library.register_autograd(op, backward, setup_context=setup_context)
    _AUTOGRAD_RULES[op] = (setup_context, backward)


def _functorch_function(op: torch._ops.OpOverload):
    """An ``autograd.Function`` with ``setup_context`` (as torch.func's grad, vjp, jacrev and vmap need) that
    runs ``op`` and differentiates it by the op's registered setup and backward; None for ops without one.
    ``generate_vmap_rule``: under vmap its forward runs the op under vmap (the ops' batching fallback)."""
    function = _FUNCTORCH_FUNCTIONS.get(op)
    if function is None and op in _AUTOGRAD_RULES:
        setup, backward = _AUTOGRAD_RULES[op]
        schema = op._schema

        def forward(*args):
            return op(*args)  # (grad mode is off here: the op runs its kernel, or the transforms' fallbacks)

        def setup_context(ctx, inputs, output):
            ctx.num_inputs = len(inputs)
            args, _ = torch._library.utils.fill_defaults(schema, inputs, {})  # the rules see every argument
            setup(ctx, tuple(args), output)

        def backward_(ctx, *grads):
            grads_in = backward(ctx, *grads)
            grads_in = grads_in if isinstance(grads_in, tuple) else (grads_in,)
            return grads_in[:ctx.num_inputs]  # (a defaulted argument left out of the call has no gradient)

        function = type(f"{op._schema.name.split('::')[-1]}_functorch", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward_), "generate_vmap_rule": True,
        })
        _FUNCTORCH_FUNCTIONS[op] = function
    return function


def output_memory_format(a: torch.Tensor, b: torch.Tensor) -> torch.memory_format:
    """channels_last if either operand suggests it: the rule torch's own conv2d follows for its output."""
    cl = torch.channels_last in (suggest_memory_format(a), suggest_memory_format(b))
    return torch.channels_last if cl else torch.contiguous_format


def in_memory_format(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``t`` in ``memory_format`` when it suggests another one. The backward kernels lay their results out like
    grad_output, and torch lays the input's and weight's gradients out like the forward's output, whatever layout
    grad_output arrives in (the expanded gradient of a sum, a permuted view): this makes the two agree."""
    return t if suggest_memory_format(t) == memory_format else t.contiguous(memory_format=memory_format)


def _empty(shape, like: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format)


# ---- fake implementations ---------------------------------------------------------------------------


def _register_fakes(algo: str, ops: ConvOps) -> None:
    # `extra` is the algorithm's own arguments after groups (im2col: workspace_bytes; implicit_gemm: tile);
    # fprop's last argument is `relu`.
    @torch.library.register_fake(ops.fprop)
    def _fprop_fake(input, weight, bias, stride, padding, dilation, groups, *extra_and_relu):
        op = f"fastconv::conv2d_{algo}"
        shape = _checks.check_conv2d_fprop(op, input, weight, bias, stride, padding, dilation, groups)
        # (the dispatcher may leave out trailing arguments equal to their defaults, relu=False and tile=-1)
        _checks.check_algo_args(op, algo, extra_and_relu[:len(backends.algo_args(algo))],
                                (input.shape[1], *weight.shape[2:], *shape[2:], stride, padding, input.dtype))
        return _empty(shape, input, output_memory_format(input, weight))

    @torch.library.register_fake(ops.dgrad)
    def _dgrad_fake(grad_output, weight, input_size, stride, padding, dilation, groups, *extra):
        op = f"fastconv::conv2d_{algo}_dgrad"
        _checks.check_conv2d_dgrad(op, grad_output, weight, input_size, stride, padding, dilation, groups)
        _checks.check_algo_args(op, algo, extra, (input_size[1], *weight.shape[2:], *grad_output.shape[2:], stride,
                                                  padding, grad_output.dtype))
        return _empty(input_size, grad_output, output_memory_format(grad_output, weight))

    @torch.library.register_fake(ops.wgrad)
    def _wgrad_fake(grad_output, input, weight_size, stride, padding, dilation, groups, *extra):
        op = f"fastconv::conv2d_{algo}_wgrad"
        _checks.check_conv2d_wgrad(op, grad_output, input, weight_size, stride, padding, dilation, groups)
        _checks.check_algo_args(op, algo, extra, (input.shape[1], *weight_size[2:], *grad_output.shape[2:], stride,
                                                  padding, input.dtype))
        return _empty(weight_size, grad_output, output_memory_format(grad_output, input))


@torch.library.register_fake(bias_grad)
def _bias_grad_fake(grad_output):
    _checks.check_bias_grad("fastconv::conv2d_bias_grad", grad_output)
    return grad_output.new_empty((grad_output.shape[1],))


# ---- autograd --------------------------------------------------------------------------------------
#
# The backward formulas call their ops through `call`: a plain backward runs without grad mode, so the ops go
# straight to their kernels; a double backward (create_graph=True) records them as usual.
#
# With y = fprop(x, w), gx = dgrad(gy, w) and gw = wgrad(gy, x), all bilinear (a fused ReLU first masks gy
# with y > 0, a mask whose derivative is zero almost everywhere):
#   d/d(gy) <ggx, dgrad(gy, w)> = fprop(ggx, w)      d/dw <ggx, dgrad(gy, w)> = wgrad(gy, ggx)
#   d/d(gy) <ggw, wgrad(gy, x)> = fprop(x, ggw)      d/dx <ggw, wgrad(gy, x)> = dgrad(gy, ggw)


def _register_autograd(ops: ConvOps) -> None:
    def fprop_setup(ctx, inputs, output):
        input, weight, bias, *conv_args, relu = inputs
        ctx.save_for_backward(input, weight, output if relu else None)  # the output is the ReLU's mask
        ctx.conv_args = conv_args
        ctx.has_bias = bias is not None
        ctx.output_format = output_memory_format(input, weight)

    def fprop_backward(ctx, grad_output):
        input, weight, output = ctx.saved_tensors
        grad_output = in_memory_format(grad_output, ctx.output_format)
        if output is not None:
            # torch's relu mask (threshold_backward): blocked where output <= 0, so a NaN output passes
            grad_output = torch.where(output <= 0, torch.zeros_like(grad_output), grad_output)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = call(ops.dgrad, grad_output, weight, input.shape, *ctx.conv_args)
        if ctx.needs_input_grad[1]:
            grad_weight = call(ops.wgrad, grad_output, input, weight.shape, *ctx.conv_args)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = call(bias_grad, grad_output)
        return (grad_input, grad_weight, grad_bias) + (None,) * (len(ctx.conv_args) + 1)

    def dgrad_setup(ctx, inputs, output):
        grad_output, weight, input_size, *conv_args = inputs
        ctx.save_for_backward(grad_output, weight)
        ctx.conv_args = conv_args

    def dgrad_backward(ctx, grad_grad_input):
        grad_output, weight = ctx.saved_tensors
        d_grad_output = d_weight = None
        if ctx.needs_input_grad[0]:
            d_grad_output = call(ops.fprop, grad_grad_input, weight, None, *ctx.conv_args)
        if ctx.needs_input_grad[1]:
            d_weight = call(ops.wgrad, grad_output, grad_grad_input, weight.shape, *ctx.conv_args)
        return (d_grad_output, d_weight, None) + (None,) * len(ctx.conv_args)

    def wgrad_setup(ctx, inputs, output):
        grad_output, input, weight_size, *conv_args = inputs
        ctx.save_for_backward(grad_output, input)
        ctx.conv_args = conv_args

    def wgrad_backward(ctx, grad_grad_weight):
        grad_output, input = ctx.saved_tensors
        d_grad_output = d_input = None
        if ctx.needs_input_grad[0]:
            d_grad_output = call(ops.fprop, input, grad_grad_weight, None, *ctx.conv_args)
        if ctx.needs_input_grad[1]:
            d_input = call(ops.dgrad, grad_output, grad_grad_weight, input.shape, *ctx.conv_args)
        return (d_grad_output, d_input, None) + (None,) * len(ctx.conv_args)

    register_autograd(ops.fprop, fprop_backward, setup_context=fprop_setup)
    register_autograd(ops.dgrad, dgrad_backward, setup_context=dgrad_setup)
    register_autograd(ops.wgrad, wgrad_backward, setup_context=wgrad_setup)


def _bias_grad_setup(ctx, inputs, output):
    ctx.grad_output_shape = inputs[0].shape


def _bias_grad_backward(ctx, grad_grad_bias):
    return grad_grad_bias.view(1, -1, 1, 1).expand(ctx.grad_output_shape)


register_autograd(bias_grad, _bias_grad_backward, setup_context=_bias_grad_setup)

for _name, _ops in CONV_OPS.items():
    _register_fakes(_name, _ops)
    _register_autograd(_ops)


# ---- the implicit-GEMM fused epilogue ---------------------------------------------------------------------


@torch.library.register_fake(implicit_gemm_fused)
def _implicit_gemm_fused_fake(input, weight, scale, shift, residual, stride, padding, dilation, groups, tile=-1,
                              relu=False):
    op = "fastconv::conv2d_implicit_gemm_fused"
    shape = _checks.check_conv2d_fprop(op, input, weight, None, stride, padding, dilation, groups)
    _checks.check_conv2d_epilogue(op, input, shape, scale, shift, residual)
    _checks.check_implicit_gemm_tile(op, tile)
    return _empty(shape, input, output_memory_format(input, weight))


# y = relu?(c * scale + shift + residual) with c = conv(x, w): with g the masked grad_output,
#   d residual = g,  d shift = sum(g),  d scale = sum(g * c),  and c's gradient g * scale goes to dgrad/wgrad.
def _implicit_gemm_fused_setup(ctx, inputs, output):
    input, weight, scale, shift, residual, *conv_args, relu = inputs
    ctx.conv_args = conv_args  # stride, padding, dilation, groups, tile
    ctx.has = (scale is not None, shift is not None, residual is not None)
    ctx.output_format = output_memory_format(input, weight)
    ctx.save_for_backward(input, weight, scale, output if relu else None)


def _implicit_gemm_fused_backward(ctx, grad_output):
    input, weight, scale, output = ctx.saved_tensors
    grad_output = in_memory_format(grad_output, ctx.output_format)
    ops = CONV_OPS["implicit_gemm"]
    g = grad_output if output is None else torch.where(output <= 0, torch.zeros_like(grad_output), grad_output)
    has_scale, has_shift, has_residual = ctx.has
    grad_conv = g * scale.view(1, -1, 1, 1) if has_scale else g
    grad_input = grad_weight = grad_scale = grad_shift = grad_residual = None
    if ctx.needs_input_grad[0]:
        grad_input = call(ops.dgrad, grad_conv, weight, input.shape, *ctx.conv_args)
    if ctx.needs_input_grad[1]:
        grad_weight = call(ops.wgrad, grad_conv, input, weight.shape, *ctx.conv_args)
    if has_scale and ctx.needs_input_grad[2]:
        conv = call(ops.fprop, input, weight, None, *ctx.conv_args, False)  # recomputed: the output folds it away
        grad_scale = call(bias_grad, g * conv)
    if has_shift and ctx.needs_input_grad[3]:
        grad_shift = call(bias_grad, g)
    if has_residual and ctx.needs_input_grad[4]:
        grad_residual = g
    return (grad_input, grad_weight, grad_scale, grad_shift, grad_residual) + (None,) * (len(ctx.conv_args) + 1)


register_autograd(implicit_gemm_fused, _implicit_gemm_fused_backward,
                                setup_context=_implicit_gemm_fused_setup)


# ---- max pooling ----------------------------------------------------------------------------------

max_pool2d = _lib.max_pool2d.default
max_pool2d_backward = _lib.max_pool2d_backward.default


@torch.library.register_fake(max_pool2d)
def _max_pool2d_fake(input, kernel_size, stride, padding, dilation, ceil_mode):
    shape = _checks.check_max_pool2d("fastconv::max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode)
    fmt = suggest_memory_format(input)
    return _empty(shape, input, fmt), torch.empty(shape, dtype=torch.int64, device=input.device, memory_format=fmt)


@torch.library.register_fake(max_pool2d_backward)
def _max_pool2d_backward_fake(grad_output, indices, input_size, kernel_size, stride, padding, dilation):
    _checks.check_max_pool2d_backward("fastconv::max_pool2d_backward", grad_output, indices, input_size, kernel_size,
                                      stride, padding, dilation)
    return _empty(input_size, grad_output, suggest_memory_format(grad_output))


def _max_pool2d_setup(ctx, inputs, output):
    input, kernel_size, stride, padding, dilation, _ceil_mode = inputs  # ceil_mode shows in the output shape
    ctx.window = (kernel_size, stride, padding, dilation)
    ctx.input_size = input.shape
    ctx.input_format = suggest_memory_format(input)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _max_pool2d_backward(ctx, grad_output, _grad_indices):
    (indices,) = ctx.saved_tensors
    grad_output = in_memory_format(grad_output, ctx.input_format)  # (the input's gradient in the input's layout)
    return call(max_pool2d_backward, grad_output, indices, ctx.input_size, *ctx.window), None, None, None, None, None


def _max_pool2d_backward_setup(ctx, inputs, output):
    ctx.geometry = inputs[2:]  # input_size, kernel_size, stride, padding, dilation
    ctx.save_for_backward(inputs[1])


def _empty_pool_windows(indices, input_size, kernel_size, stride, padding, dilation):
    """Where a window has no element inside the input (dilation can put all its taps in the padding or past the
    end), as a bool (P, Q) tensor, or None when every window has one. Such a window's output is -inf whatever the
    input, and its index (torch's) may lie outside the plane or alias another element."""
    def covered(out, size, taps, step, pad, dil):
        return [any(0 <= o * step - pad + t * dil < size for t in range(taps)) for o in range(out)]

    rows = covered(indices.shape[-2], input_size[-2], kernel_size[0], stride[0], padding[0], dilation[0])
    cols = covered(indices.shape[-1], input_size[-1], kernel_size[1], stride[1], padding[1], dilation[1])
    if all(rows) and all(cols):
        return None
    rows, cols = (torch.tensor(v, device=indices.device) for v in (rows, cols))
    return ~(rows[:, None] & cols[None, :])


def _max_pool2d_double_backward(ctx, grad_grad_input):
    # max_pool2d_backward is linear in grad_output: a scatter by indices, whose adjoint is the gather. Windows with
    # no element inside the input pass no gradient (backward gathers only over covered elements): zero there.
    (indices,) = ctx.saved_tensors
    empty = _empty_pool_windows(indices, *ctx.geometry)
    if empty is not None:
        indices = indices.masked_fill(empty, 0)
    gathered = grad_grad_input.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)
    if empty is not None:
        gathered = gathered.masked_fill(empty, 0)
    return gathered, None, None, None, None, None, None


register_autograd(max_pool2d, _max_pool2d_backward, setup_context=_max_pool2d_setup)
register_autograd(max_pool2d_backward, _max_pool2d_double_backward,
                                setup_context=_max_pool2d_backward_setup)


# ---- residual add ---------------------------------------------------------------------------------

residual_add = _lib.residual_add.default
residual_add_backward = _lib.residual_add_backward.default


@torch.library.register_fake(residual_add)
def _residual_add_fake(residual, shortcut, stride, relu):
    shape = _checks.check_residual_add("fastconv::residual_add", residual, shortcut, stride)
    return _empty(shape, residual, suggest_memory_format(residual))


@torch.library.register_fake(residual_add_backward)
def _residual_add_backward_fake(grad_output, output, shortcut_size, stride):
    _checks.check_residual_add_backward("fastconv::residual_add_backward", grad_output, output, shortcut_size, stride)
    fmt = suggest_memory_format(grad_output)
    return _empty(grad_output.shape, grad_output, fmt), _empty(shortcut_size, grad_output, fmt)


def _residual_add_setup(ctx, inputs, output):
    residual, shortcut, ctx.stride, relu = inputs
    ctx.shortcut_size = shortcut.shape
    ctx.output_format = suggest_memory_format(residual)  # the output's layout
    ctx.save_for_backward(output if relu else None)  # the ReLU mask is all backward needs


def _residual_add_backward(ctx, grad_output):
    (output,) = ctx.saved_tensors
    # the gradients in the forward's layout whatever grad_output's (the kernel follows grad_output's), so that
    # eager and compiled runs (where AOT may choose grad_output's layout) agree
    grad_output = in_memory_format(grad_output, ctx.output_format)
    grad_residual, grad_shortcut = call(residual_add_backward, grad_output, output, ctx.shortcut_size, ctx.stride)
    return grad_residual, grad_shortcut, None, None


def _residual_add_backward_setup(ctx, inputs, output):
    grad_output, out, shortcut_size, ctx.stride = inputs
    ctx.shortcut_size = shortcut_size
    ctx.save_for_backward(grad_output, out)


def _residual_add_double_backward(ctx, grad_grad_residual, grad_grad_shortcut):
    # Linear in grad_output: d/d(grad_output) = mask * (ggr + the same subsample-and-pad of ggs as forward).
    grad_output, output = ctx.saved_tensors
    if grad_grad_residual is None:
        grad_grad_residual = torch.zeros_like(grad_output)
    if grad_grad_shortcut is None:
        grad_grad_shortcut = grad_output.new_zeros(ctx.shortcut_size)
    total = call(residual_add, grad_grad_residual, grad_grad_shortcut, ctx.stride, False)
    if output is not None:
        total = torch.where(output <= 0, torch.zeros_like(total), total)
    return total, None, None, None


register_autograd(residual_add, _residual_add_backward, setup_context=_residual_add_setup)
register_autograd(residual_add_backward, _residual_add_double_backward,
                                setup_context=_residual_add_backward_setup)


# ---- training-mode BatchNorm + ReLU ---------------------------------------------------------------------

batch_norm_relu = _lib.batch_norm_relu.default
batch_norm_relu_backward = _lib.batch_norm_relu_backward.default


@torch.library.register_fake(batch_norm_relu)
def _batch_norm_relu_fake(input, weight, bias, eps, relu):
    _checks.check_batch_norm_relu("fastconv::batch_norm_relu", input, weight, bias, eps)
    stats = _checks.batch_norm_stats_type(input.dtype)
    c = input.shape[1]
    return (_empty(input.shape, input, suggest_memory_format(input)), input.new_empty((c,), dtype=stats),
            input.new_empty((c,), dtype=stats))


@torch.library.register_fake(batch_norm_relu_backward)
def _batch_norm_relu_backward_fake(grad_output, input, mean, var, weight, bias, eps, relu):
    _checks.check_batch_norm_relu_backward("fastconv::batch_norm_relu_backward", grad_output, input, mean, var,
                                           weight, bias, eps)
    stats = _checks.batch_norm_stats_type(input.dtype)
    c = input.shape[1]
    return (_empty(input.shape, input, suggest_memory_format(input)), input.new_empty((c,), dtype=stats),
            input.new_empty((c,), dtype=stats))


def _batch_norm_relu_setup(ctx, inputs, output):
    input, weight, bias, ctx.eps, ctx.relu = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)  # the caller's running statistics only; not differentiated
    ctx.save_for_backward(input, mean, var, weight, bias)  # not the output: the ReLU mask is recomputed


def _batch_norm_relu_backward(ctx, grad_output, _grad_mean, _grad_var):
    input, mean, var, weight, bias = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = call(batch_norm_relu_backward, grad_output, input, mean, var, weight, bias,
                                              ctx.eps, ctx.relu)
    grad_weight = grad_weight.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
    grad_bias = grad_bias.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
    return grad_input, grad_weight, grad_bias, None, None


def reference_batch_norm_relu_backward(grad_output, input, weight, bias, eps, relu):
    """The backward of batch_norm_relu in differentiable torch ops, with the batch statistics recomputed
    from ``input`` (float64 for float64, else float32). Used for double backward: differentiating through
    it accounts for the statistics' own dependence on the input."""
    stats = _checks.batch_norm_stats_type(input.dtype)
    x = input.to(stats)
    dims = (0, 2, 3)
    mean = x.mean(dims, keepdim=True)
    invstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
    xhat = (x - mean) * invstd
    gamma = weight.to(stats).view(1, -1, 1, 1) if weight is not None else torch.ones_like(mean)
    beta = bias.to(stats).view(1, -1, 1, 1) if bias is not None else torch.zeros_like(mean)
    g = grad_output.to(stats)
    if relu:
        z = (xhat * gamma + beta).to(input.dtype)
        g = torch.where(z <= 0, torch.zeros_like(g), g)
    grad_bias = g.sum(dims)
    grad_weight = (g * xhat).sum(dims)
    m = x.numel() // x.shape[1]
    grad_input = gamma * invstd * (g - grad_bias.view(1, -1, 1, 1) / m - xhat * grad_weight.view(1, -1, 1, 1) / m)
    return grad_input.to(input.dtype), grad_weight, grad_bias


def _batch_norm_relu_backward_setup(ctx, inputs, output):
    grad_output, input, _mean, _var, weight, bias, ctx.eps, ctx.relu = inputs
    ctx.save_for_backward(grad_output, input, weight, bias)


def _batch_norm_relu_double_backward(ctx, gg_input, gg_weight, gg_bias):
    # Double backward treats mean and var as the batch statistics of `input` (what autograd of
    # batch_norm_relu passes): the reference recomputes them, so their derivatives flow into the input's.
    grad_output, input, weight, bias = ctx.saved_tensors
    if input.numel() == 0:  # no element: every derivative is zero (the reference's statistics would divide by 0)
        zeros = [torch.zeros_like(t) if t is not None else None for t in (grad_output, input, weight, bias)]
        return zeros[0], zeros[1], None, None, zeros[2], zeros[3], None, None
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() if t is not None else None for t in (grad_output, input, weight, bias)]
        outs = reference_batch_norm_relu_backward(*leaves, ctx.eps, ctx.relu)
        pairs = [(o, g) for o, g in zip(outs, (gg_input, gg_weight, gg_bias)) if g is not None]
        wrt = [t for t in leaves if t is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True,
                                    create_graph=torch.is_grad_enabled())
    grads = iter(grads)
    d_grad_output, d_input, d_weight, d_bias = (next(grads) if t is not None else None for t in leaves)
    return d_grad_output, d_input, None, None, d_weight, d_bias, None, None


register_autograd(batch_norm_relu, _batch_norm_relu_backward, setup_context=_batch_norm_relu_setup)
register_autograd(batch_norm_relu_backward, _batch_norm_relu_double_backward,
                                setup_context=_batch_norm_relu_backward_setup)
