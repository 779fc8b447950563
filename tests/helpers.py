"""Error measures shared by the tests."""
import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64; inf if actual has a NaN or a shape mismatch."""
    if actual.shape != expected.shape:
        return float("inf")
    a, e = actual.double(), expected.double()
    if torch.isnan(a).any():
        return float("inf")
    if e.numel() == 0:
        return 0.0
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Norm-wise relative error below tol and every element within tol * max|expected| of its reference."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"
    if expected.numel():
        scale = expected.double().abs().max().clamp_min(1e-30)
        worst = ((actual.double() - expected.double()).abs().max() / scale).item()
        assert worst <= 10 * tol, f"{what}: worst element error {worst:.3g} (of max |ref|) > {10 * tol:.3g}"


# Unit roundoff of each dtype: a floor for the low-precision error bound.
EPS = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def randomize_bn(bn: torch.nn.BatchNorm2d) -> None:
    """Non-trivial BatchNorm parameters and running statistics (a fresh module's are 1, 0, 0, 1)."""
    with torch.no_grad():
        if bn.affine:
            bn.weight.normal_(1, 0.3)
            bn.bias.normal_(0, 0.3)
        if bn.track_running_stats:
            bn.running_mean.normal_(0, 0.5)
            bn.running_var.uniform_(0.5, 2.0)


def nontrivial_batch_norms(model: torch.nn.Module, seed: int = 1) -> None:
    """randomize_bn on every BatchNorm2d of `model`, from a fixed seed."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            randomize_bn(m)
