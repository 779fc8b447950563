"""AlexNet (Krizhevsky, Sutskever and Hinton, 2012) on fastconv's kernels.

``variant="torchvision"`` (default) is torchvision's single-tower version (64-192-384-256-256 filters, any
input size through an adaptive 6x6 average pool); its ``state_dict`` loads into torchvision's
``alexnet()`` and back. ``variant="original"`` is the paper's table on 227x227 input:

    conv 96 x 11x11 / 4          -> 55 x 55 x 96     max pool 3 / 2 -> 27 x 27 x 96
    conv 256 x 5x5, pad 2        -> 27 x 27 x 256    max pool 3 / 2 -> 13 x 13 x 256
    conv 384, 384, 256 x 3x3, pad 1 -> 13 x 13       max pool 3 / 2 -> 6 x 6 x 256
    FC 4096, FC 4096, FC 1000 (no ReLU on the class scores)

(single tower, no local response normalisation). Each conv + ReLU is one kernel (``fastconv.Conv2dReLU``,
the ReLU in the conv's epilogue), so the ``features`` slots where torchvision has its ``nn.ReLU`` hold
``nn.Identity``: indices, names and ``state_dict`` keys stay torchvision's.
"""
from __future__ import annotations

import torch
from torch import nn

from ..functional import check_algo
from ..nn import Conv2dReLU, MaxPool2d

# (out_channels, kernel, stride, padding) per conv; "M" = max pool 3 / 2.
_CONFIGS = {
    "torchvision": [(64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), "M"],
    "original": [(96, 11, 4, 0), "M", (256, 5, 1, 2), "M", (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1), "M"],
}


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, variant: str = "torchvision", *,
                 algo: str = "auto") -> None:
        super().__init__()
        check_algo(algo)
        if variant not in _CONFIGS:
            raise ValueError(f"AlexNet: variant must be one of {tuple(_CONFIGS)}, got {variant!r}")
        self.variant = variant
        layers: list[nn.Module] = []
        channels = 3
        for item in _CONFIGS[variant]:
            if item == "M":
                layers.append(MaxPool2d(kernel_size=3, stride=2))
            else:
                out, kernel, stride, padding = item
                layers += [Conv2dReLU(channels, out, kernel, stride, padding, algo=algo), nn.Identity()]
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def alexnet(variant: str = "torchvision", **kwargs) -> AlexNet:
    return AlexNet(variant=variant, **kwargs)
