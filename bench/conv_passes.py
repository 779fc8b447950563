"""One pass (fprop, dgrad or wgrad) of one fastconv convolution algorithm on a bench/shapes.py layer, as a
callable: the op called directly with the layer's arguments (im2col's workspace limit included). Shared by
the conv benchmark and the profiling target."""
from fastconv import backends
from fastconv.ops import CONV_OPS


def conv_args(layer):
    """(stride, padding, dilation, groups) as the ops take them."""
    return ([layer.stride] * 2, [layer.padding] * 2, [1, 1], layer.groups)


def fastconv_pass(algo: str, pas: str, x, w, gy, layer):
    """`algo` is an algorithm or "implicit_gemm/<tile>" (one tile configuration)."""
    algo, tile = backends.parse_choice(algo)
    ops, extra = CONV_OPS[algo], backends.algo_args(algo, tile)
    args = conv_args(layer)
    if pas == "fprop":
        return lambda: ops.fprop(x, w, None, *args, *extra, False)
    if pas == "dgrad":
        return lambda: ops.dgrad(gy, w, list(x.shape), *args, *extra)
    if pas == "wgrad":
        return lambda: ops.wgrad(gy, x, list(w.shape), *args, *extra)
    raise ValueError(f"unknown pass {pas!r}: fprop, dgrad or wgrad")
