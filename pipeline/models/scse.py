"""scSE attention (concurrent spatial and channel squeeze-and-excitation) and Inception-v4-scSE.

Inception-v4-scSE is timm's Inception-v4 with an SCSE module after every Inception-A, -B and -C
block (4 + 7 + 3 = 14), as in the attention paper; the reduction blocks stay as they are.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from timm.models.inception_v4 import InceptionA, InceptionB, InceptionC, InceptionV4
from torch import nn

# Output channels of timm's Inception-v4 blocks.
_BLOCK_CHANNELS = {InceptionA: 384, InceptionB: 1024, InceptionC: 1536}


class ChannelSE(nn.Module):
    """cSE: global average pool -> FC C->C/r -> ReLU -> FC C/r->C -> sigmoid -> scale channels.

    ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(channels, max(1, channels // reduction))
        self.fc2 = nn.Linear(max(1, channels // reduction), channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * w[:, :, None, None]


class SpatialSE(nn.Module):
    """sSE: 1x1 conv C->1 -> sigmoid -> scale each spatial position. ``(B, C, H, W)`` in and out."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv(x))


class SCSE(nn.Module):
    """scSE: ``cSE(U) + sSE(U)``. ``(B, C, H, W)`` in and out."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.cse = ChannelSE(channels, reduction)
        self.sse = SpatialSE(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cse(x) + self.sse(x)


def add_scse(model: InceptionV4, reduction: int = 16) -> InceptionV4:
    """Put an SCSE after every Inception-A/B/C block of ``model`` (in place) and return it.

    Each block ``features.<i>`` becomes ``features.<i> = Sequential(block=..., scse=SCSE)``: it
    keeps its index, so timm's ``group_matcher`` (``^features\\.(\\d+)``) puts the SCSE in its
    block's stage. Plain Inception-v4 weights must be loaded *before* this call, since the block's
    keys move from ``features.<i>.*`` to ``features.<i>.block.*``.
    """
    for i, block in enumerate(model.features):
        channels = _BLOCK_CHANNELS.get(type(block))
        if channels is not None:
            model.features[i] = nn.Sequential(
                OrderedDict(block=block, scse=SCSE(channels, reduction))
            )
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": "inception_v4_scse"}
    return model
