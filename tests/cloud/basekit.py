"""Test kit for the frozen base: a deterministic stand-in for the EfficientNet encoder."""

from __future__ import annotations

import torch
from torch import nn

C = 16  # channels of the fake encoder's feature map


class FakeEncoder(nn.Module):
    """(B, 3, H, W) -> (B, C, 7, 7), deterministic, a stand-in for EfficientNet."""

    out_channels = C

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Conv2d(3, C, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)
