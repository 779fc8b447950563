"""Train a CIFAR-style ResNet built from fastconv's kernels on scikit-learn's handwritten digits.

    python -m fastconv.demo [--epochs 12] [--depth 20] [--device cuda|cpu] [--algo auto]

The digits data set (1797 grayscale 8x8 images of 0-9) ships inside scikit-learn, so nothing is
downloaded. The network is ``fastconv.models.CifarResNet`` with one input channel: every convolution,
BatchNorm, ReLU and residual add of the training step runs on fastconv's kernels (the CUDA ones when a GPU
is present, else the CPU twins); only the global average pooling, the final linear layer, the loss and the
optimizer are torch's. Prints a progress bar per epoch and the test accuracy after each; a few minutes on a
CPU. Exit status 1 if the final test accuracy is below --target (default 0.97).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from .models import CifarResNet


def load_digits_split(seed: int = 0, test_fraction: float = 0.2):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("fastconv.demo needs scikit-learn (pip install scikit-learn); it holds the digits data") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return (x[train], y[train]), (x[test], y[test])


def progress(epoch: int, epochs: int, done: int, total: int, loss: float, width: int = 30) -> None:
    filled = width * done // total
    bar = "#" * filled + "." * (width - filled)
    sys.stderr.write(f"\repoch {epoch:2d}/{epochs} [{bar}] {done:4d}/{total} loss {loss:.4f}")
    sys.stderr.flush()


@torch.no_grad()
def accuracy(model, x, y, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / len(y)


def train(epochs: int = 12, depth: int = 20, batch_size: int = 64, lr: float = 0.1, device: str | None = None,
          algo: str = "auto", seed: int = 0, verbose: bool = True) -> float:
    """Trains and returns the final test accuracy."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = load_digits_split(seed)
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    model = CifarResNet(depth, num_classes=10, in_channels=1, algo=algo).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = (len(y_train) + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    if verbose:
        print(f"fastconv demo: CifarResNet-{depth} on scikit-learn digits ({len(y_train)} train, {len(y_test)} test "
              f"images, 8x8), {device}, algo={algo}")
    acc = 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        order = torch.randperm(len(y_train), device=device)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if verbose:
                progress(epoch, epochs, step + 1, steps_per_epoch, loss.item())
        acc = accuracy(model, x_test, y_test)
        if verbose:
            sys.stderr.write("\n")
            print(f"epoch {epoch:2d}: test accuracy {acc:.4f} ({time.perf_counter() - start:.1f} s)", flush=True)
    return acc


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--depth", type=int, default=20, help="6n + 2: 20, 32, 44, 56, 110")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--algo", default="auto", help="fastconv conv algorithm: auto, direct or im2col")
    parser.add_argument("--target", type=float, default=0.97, help="exit 1 below this final test accuracy")
    args = parser.parse_args(argv)
    acc = train(args.epochs, args.depth, args.batch_size, args.lr, args.device, args.algo)
    print(f"final test accuracy: {acc:.4f}")
    return 0 if acc >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
