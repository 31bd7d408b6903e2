"""One builder: `build(spec) -> nn.Module`, assembled from a few small named pieces."""

from __future__ import annotations

import torch
from torch import nn

from models.spec import ConvBlock, NetSpec


class Dropout(nn.Dropout):
    """Element-wise dropout; on the CPU its mask takes 16 random bits per element, four from each 64-bit draw.

    nn.Dropout's CPU mask (`bernoulli_`) draws one random number per element, a large share of a small net's CPU
    step (docs/engine.md; `benchmarks/train_throughput.py --ablate` measures it). The drop probability is quantised
    to 1/65,536. On CUDA, in eval mode and in the cases below it is nn.Dropout itself; the state dict is the same.
    `generator`: the CPU mask's random source (torch's default when None; the sharded CPU step gives each shard its
    own, so that threads draw in a fixed order).
    """

    generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        if not self.training or x.device.type != "cpu" or self.inplace or not dense or not 0 < self.p < 1:
            return super().forward(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
        bits.random_(-2 ** 63, None, generator=self.generator)
        uniform16 = bits.view(torch.int16)[:n].as_strided(x.shape, x.stride())  # laid out like x
        keep = uniform16 >= round(self.p * 65536) - 32768  # P(drop) = p, to 1/65,536
        # bool -> bfloat16 is a slow cast on the CPU; the mask's bytes read as uint8 multiply straight into x's dtype
        return x * keep.view(torch.uint8) * (1 / (1 - self.p))


class ConvBNReLU(nn.Sequential):
    """conv -> BatchNorm (optional) -> ReLU. The conv keeps a bias only when no BatchNorm follows it."""

    def __init__(self, c_in: int, c_out: int, kernel: int, padding: int, batchnorm: bool):
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, padding=padding, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(c_out))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Transition(ConvBNReLU):
    """1x1 conv that squeezes channels."""

    def __init__(self, c_in: int, c_out: int, batchnorm: bool):
        super().__init__(c_in, c_out, 1, 0, batchnorm)


class Head(nn.Module):
    """Logits from feature maps without a Linear layer: a 1x1 conv and global average pooling, in either order."""

    def __init__(self, c_in: int, num_classes: int, conv_first: bool):
        super().__init__()
        self.conv_first = conv_first
        self.conv = nn.Conv2d(c_in, num_classes, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.pool(self.conv(x)) if self.conv_first else self.conv(self.pool(x))
        return x.flatten(1)


def build(spec: NetSpec) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = spec.in_channels
    for block in spec.blocks:
        if isinstance(block, ConvBlock):
            for conv in block.convs:
                layers.append(ConvBNReLU(channels, conv.out_channels, conv.kernel, conv.padding, block.batchnorm))
                channels = conv.out_channels
            if block.dropout > 0:
                layers.append(Dropout(block.dropout))  # element-wise, as in the hand-made answers
        else:
            layers.append(Transition(channels, block.out_channels, block.batchnorm))
            channels = block.out_channels
        if block.pool:
            layers.append(nn.MaxPool2d(2))
    layers.append(Head(channels, spec.num_classes, spec.head.kind == "conv_gap"))
    return nn.Sequential(*layers)
