"""Small MobileNet-style CNN for normal/pneumonia chest X-ray classification (1x1xHxW gray -> (1,2) logits)."""
from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear project, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, kernel: int = 3) -> None:
        super().__init__()
        mid = cin * expand
        layers = []
        if expand != 1:
            layers.append(conv_bn(cin, mid, 1))
        layers += [conv_bn(mid, mid, kernel, stride, groups=mid), conv_bn(mid, cout, 1, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


# (expand, out channels, repeats, first stride)
DEFAULT_CFG = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 3, 2), (4, 96, 2, 1), (4, 128, 2, 2))


def cfg_with_final_stride(cfg=DEFAULT_CFG, final_stride: int = 2) -> tuple:
    """cfg with the last stage's first stride replaced: 2 (DEFAULT_CFG, total stride 32: a 4x4 final grid at 128 px,
    the 1.0.0 model) or 1 (total stride 16: an 8x8 final grid, a finer class activation map; same weights' shapes)."""
    *head, (t, c, n, _s) = cfg
    return tuple(head) + ((t, c, n, final_stride),)


def receptive_field(cfg=DEFAULT_CFG, spatial_blocks: int | None = None) -> tuple[int, int]:
    """(receptive field in input pixels, total stride) of the final feature maps: the 3x3 stem, then each block's
    depthwise kernel (3, or 1 past the first spatial_blocks blocks)."""
    rf, jump, b = 3, 2, 0
    for _t, _c, n, s in cfg:
        for i in range(n):
            k = 3 if spatial_blocks is None or b < spatial_blocks else 1
            rf += (k - 1) * jump
            jump *= s if i == 0 else 1
            b += 1
    return rf, jump


class CXRNet(nn.Module):
    """spatial_blocks: how many inverted-residual blocks (from the stem) keep their 3x3 depthwise conv; the later
    ones get a 1x1 one, so the final feature maps see a bounded patch of the input (receptive_field) and the class
    activation map becomes a sum of local evidence: deleting the pixels under a cell removes that cell's evidence
    (issue 15). None: every block is 3x3 (the 1.0.0 model, each final cell sees the whole 128 px input)."""

    def __init__(self, cfg=DEFAULT_CFG, stem: int = 24, last: int = 384, n_classes: int = 2, dropout: float = 0.2,
                 final_stride: int | None = None, spatial_blocks: int | None = None) -> None:
        super().__init__()
        if final_stride is not None:
            cfg = cfg_with_final_stride(cfg, final_stride)
        self.cfg = tuple(cfg)
        self.spatial_blocks = spatial_blocks
        layers = [conv_bn(1, stem, 3, 2)]
        c, b = stem, 0
        for t, cout, n, s in cfg:
            for i in range(n):
                k = 3 if spatial_blocks is None or b < spatial_blocks else 1
                layers.append(InvertedResidual(c, cout, s if i == 0 else 1, t, k))
                c, b = cout, b + 1
        layers.append(conv_bn(c, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(last, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.fc(self.drop(x))
