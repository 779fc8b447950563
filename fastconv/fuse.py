"""``fuse(model)``: Conv2d -> BatchNorm2d (-> ReLU) chains replaced by :class:`fastconv.ConvBNReLU`, and a
residual block's end Conv2d -> BatchNorm2d -> add(shortcut) -> ReLU by one taking the shortcut."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .functional import check_algo
from .nn import Conv2d, ConvBNReLU, MaxPool2d, ResidualAdd, has_hooks

_RELU_FUNCTIONS = (torch.relu, torch.relu_, torch.nn.functional.relu)
_RELU_METHODS = ("relu", "relu_")
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


class _Tracer(fx.Tracer):
    """torch's tracer, with fastconv's modules kept whole (their forward has Python checks on shapes)."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, (Conv2d, MaxPool2d, ResidualAdd, ConvBNReLU)):
            return True
        return super().is_leaf_module(m, qualname)


def _is_conv(m) -> bool:
    return type(m) in (torch.nn.Conv2d, Conv2d)


def _is_bn(m, conv) -> bool:
    return type(m) is torch.nn.BatchNorm2d and m.num_features == conv.out_channels


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is torch.nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _shortcut_of_add(node: fx.Node, operand: fx.Node):
    """The other operand when `node` is a plain two-tensor add of `operand` and one other node (no alpha), else
    None."""
    is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _ADD_METHODS)
    if not is_add or node.kwargs or len(node.args) != 2 or operand not in node.args:
        return None
    other = node.args[1] if node.args[0] is operand else node.args[0]
    return other if isinstance(other, fx.Node) and other is not operand else None


def _relu_of(node: fx.Node, modules: dict) -> fx.Node | None:
    """The ReLU that is `node`'s only user and takes it as its input, if there is one."""
    user = _only_user(node)
    return user if user is not None and _is_relu(user, modules) and user.args[:1] == (node,) else None


def _residual_block_end(bn_node: fx.Node, modules: dict):
    """(add, shortcut, relu) when the BatchNorm's output goes only to a plain add with one other tensor, whose
    output goes only to a ReLU; else None."""
    add = _only_user(bn_node)
    shortcut = _shortcut_of_add(add, bn_node) if add is not None else None
    relu = _relu_of(add, modules) if shortcut is not None else None
    return (add, shortcut, relu) if relu is not None else None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _used_once(graph: fx.Graph, target: str) -> bool:
    """Whether the module at `target` is called at exactly one place and none of its attributes is read
    (fusing replaces the module at that name for every caller)."""
    calls = reads = 0
    for n in graph.nodes:
        if n.op == "call_module" and n.target == target:
            calls += 1
        elif n.op == "get_attr" and (n.target == target or n.target.startswith(target + ".")):
            reads += 1
    return calls == 1 and reads == 0


def fuse(model: torch.nn.Module, *, algo: str = "auto") -> torch.nn.Module:
    """Replace every ``Conv2d -> BatchNorm2d (-> ReLU)`` chain in ``model`` by a :class:`fastconv.ConvBNReLU`.

    A chain whose BatchNorm output is added to another tensor right before the ReLU (a residual block's end,
    ``relu(bn(conv(x)) + shortcut)``) becomes one module called with the shortcut as its ``residual``: with
    ``algo="implicit_gemm"`` in eval mode, conv + BatchNorm + add + ReLU is then one kernel.

    The chains are found in the model's dataflow (``torch.fx`` symbolic tracing), so they are fused wherever
    they appear: in ``nn.Sequential`` containers and in hand-written blocks such as torchvision's ResNet
    ``conv1 -> bn1 -> relu`` (where one ``relu`` module is shared by several call sites), MobileNet's and
    DenseNet's. A chain is fused when the conv's output feeds only the BatchNorm (and the BatchNorm's only the
    ReLU, if one follows); ``ReLU6`` and other activations stay separate (``relu=False``). Chains are left
    alone when the conv or BatchNorm module is called elsewhere too, when the forward reads their
    attributes, or when they carry hooks (pruning, observers), so the fused model always computes what the
    original did.

    Returns a ``torch.fx.GraphModule`` with the original module hierarchy (each fused chain sits at its
    conv's name, with the conv and BatchNorm as its ``conv`` and ``bn`` submodules). Parameters and buffers
    are shared with ``model``, not copied: an optimizer built on ``model`` keeps training the fused model,
    which trains and evaluates exactly like the original. ``model`` itself is left unchanged.

    Models that cannot be traced (data-dependent Python control flow) are fused in place, chains inside
    ``nn.Sequential`` containers only, and returned.
    """
    check_algo(algo)
    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001  (fx raises many kinds of errors on untraceable code)
        return _fuse_sequentials(model, algo)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.training = model.training
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _is_conv(modules.get(node.target)):
            continue
        conv = modules[node.target]
        bn_node = _only_user(node)
        if bn_node is None or bn_node.op != "call_module" or not _is_bn(modules.get(bn_node.target), conv):
            continue
        if bn_node.args != (node,) or bn_node.kwargs:
            continue
        bn = modules[bn_node.target]
        if not (_used_once(gm.graph, node.target) and _used_once(gm.graph, bn_node.target)):
            continue  # a module called twice, or whose parameters the forward reads, keeps its own call
        if has_hooks(conv) or has_hooks(bn):
            continue  # hooks (pruning, quantisation observers, ...) must keep seeing the modules run
        # a residual block's end (bn -> add(shortcut) -> relu) puts the shortcut into the conv's epilogue
        block_end = _residual_block_end(bn_node, modules)
        add_node, shortcut, relu_node = block_end if block_end else (None, None, _relu_of(bn_node, modules))
        fused = ConvBNReLU.from_modules(conv, bn, relu=relu_node is not None, algo=algo)
        gm.add_submodule(node.target, fused)
        if shortcut is not None:
            # the fused call moves to the ReLU's place, where the shortcut (often computed after the bn, as
            # torchvision's downsample is) exists; ConvBNReLU falls back to a plain add for a shortcut that
            # only broadcasts to the output
            with gm.graph.inserting_before(relu_node):
                call = gm.graph.call_module(node.target, (node.args[0],), {"residual": shortcut})
            relu_node.replace_all_uses_with(call)
            for dead in (relu_node, add_node, bn_node, node):
                gm.graph.erase_node(dead)
        else:
            last = relu_node if relu_node is not None else bn_node
            last.replace_all_uses_with(node)
            if relu_node is not None:
                gm.graph.erase_node(relu_node)
            gm.graph.erase_node(bn_node)
        gm.delete_submodule(bn_node.target)  # it lives on as fused.bn: one name per tensor in the state_dict
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _fuse_sequentials(model: torch.nn.Module, algo: str) -> torch.nn.Module:
    for container in list(model.modules()):
        if not isinstance(container, torch.nn.Sequential):
            continue
        names = list(container._modules)
        i = 0
        while i + 1 < len(names):
            conv, bn = container._modules[names[i]], container._modules[names[i + 1]]
            if not (_is_conv(conv) and _is_bn(bn, conv)) or has_hooks(conv) or has_hooks(bn):
                i += 1
                continue
            has_relu = i + 2 < len(names) and type(container._modules[names[i + 2]]) is torch.nn.ReLU
            setattr(container, names[i], ConvBNReLU.from_modules(conv, bn, relu=has_relu, algo=algo))
            setattr(container, names[i + 1], torch.nn.Identity())
            if has_relu:
                setattr(container, names[i + 2], torch.nn.Identity())
            i += 3 if has_relu else 2
    return model
