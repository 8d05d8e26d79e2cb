"""Small U-Net for fetal skull ellipse segmentation (input 1x1x176x256, output 1x1x176x256 logits)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(ConvBNReLU(cin, cout), ConvBNReLU(cout, cout))


class UNet(nn.Module):
    """Classic U-Net: 4 max-pool stages, bilinear up-sampling (no ConvTranspose), skip concatenation."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128, 160), in_ch: int = 1, out_ch: int = 1) -> None:
        super().__init__()
        self.widths = tuple(widths)
        self.enc = nn.ModuleList()
        c = in_ch
        for w in widths:
            self.enc.append(DoubleConv(c, w))
            c = w
        self.dec = nn.ModuleList()
        for w_skip in reversed(widths[:-1]):
            self.dec.append(DoubleConv(c + w_skip, w_skip))
            c = w_skip
        self.head = nn.Conv2d(c, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.enc):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.dec:
            s = skips.pop()
            x = F.interpolate(x, size=s.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, s], dim=1))
        return self.head(x)
