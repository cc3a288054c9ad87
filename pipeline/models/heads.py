"""Heads: ASPP, the DeepLabV3 head, the DeepLabV3+ decoder and the auxiliary FCN head.

Module layout (and so state_dict keys) of ASPP, the DeepLabV3 head and the FCN head is
torchvision's (`torchvision.models.segmentation.deeplabv3`), so torchvision's DeepLabV3
checkpoints load as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pipeline.models.backbones import SeparableConv2d

ASPP_CHANNELS = 256  # DeepLabV3 paper, Sec. 3.3: "256 filters and batch normalization"
ASPP_DROPOUT = 0.1  # reference implementation (tensorflow/models deeplab): keep_prob 0.9
LOW_LEVEL_CHANNELS = 48  # DeepLabV3+ paper, Sec. 3.1 / Table 1: 1x1 conv to 48 channels
DECODER_CHANNELS = 256  # DeepLabV3+ paper, Sec. 3.1 / Table 2: two [3x3, 256] convs


def separable_conv(in_channels: int, out_channels: int, dilation: int = 1) -> nn.Sequential:
    """Atrous depthwise-separable 3x3 conv, the paper's "SC" (DeepLabV3+ paper, Sec. 3.1):
    depthwise 3x3 (dilated) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU."""
    return SeparableConv2d(in_channels, out_channels, dilation=dilation, relu=True)


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1
) -> nn.Sequential:
    padding = dilation * (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def conv3x3(
    in_channels: int, out_channels: int, dilation: int = 1, separable: bool = False
) -> nn.Sequential:
    if separable:
        return separable_conv(in_channels, out_channels, dilation)
    return conv_bn_relu(in_channels, out_channels, 3, dilation)


class ASPPPooling(nn.Sequential):
    """Image-level features (DeepLabV3 paper, Sec. 3.3): global average pool -> 1x1 conv ->
    BN -> ReLU -> bilinear upsampling back to the feature size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)  # (B, C, 1, 1)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (DeepLabV3 paper, Sec. 3.3): one 1x1 conv, three 3x3
    atrous convs (rates 6/12/18 at output stride 16), image pooling; concatenated and
    projected by a 1x1 conv, with BN, ReLU and dropout. (B, C_in, h, w) -> (B, 256, h, w)."""

    def __init__(
        self,
        in_channels: int,
        atrous_rates: Sequence[int],
        out_channels: int = ASPP_CHANNELS,
        separable: bool = False,
        dropout: float = ASPP_DROPOUT,
    ) -> None:
        super().__init__()
        branches: list[nn.Module] = [conv_bn_relu(in_channels, out_channels, 1)]
        for rate in atrous_rates:
            branches.append(conv3x3(in_channels, out_channels, rate, separable))
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    @property
    def atrous_rates(self) -> tuple[int, ...]:
        return tuple(branch[0].dilation[0] for branch in self.convs[1:-1])

    def set_atrous_rates(self, rates: Sequence[int]) -> None:
        """Change the rates in place (weights untouched), e.g. when the output stride changes."""
        atrous = self.convs[1:-1]
        if len(rates) != len(atrous):
            raise ValueError(f"expected {len(atrous)} rates, got {tuple(rates)}")
        for branch, rate in zip(atrous, rates, strict=True):
            conv = branch[0]  # the (depthwise) 3x3 conv of the branch
            conv.dilation = (rate, rate)
            conv.padding = (rate, rate)

    def forward(self, x: Tensor) -> Tensor:
        branches = [conv(x) for conv in self.convs]  # 5 x (B, 256, h, w)
        return self.project(torch.cat(branches, dim=1))  # (B, 256, h, w)


class DeepLabV3Head(nn.Sequential):
    """ASPP -> 3x3 conv 256 -> BN -> ReLU -> 1x1 classifier: (B, C_in, h, w) -> (B, K, h, w).

    The 3x3 conv after ASPP is torchvision's (and mmsegmentation's "bottleneck"); the paper's
    head goes from the ASPP projection straight to the classifier. Kept so the parameter count
    and checkpoints match torchvision's deeplabv3_* models.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        atrous_rates: Sequence[int],
        separable: bool = False,
    ) -> None:
        super().__init__(
            ASPP(in_channels, atrous_rates, separable=separable),
            *conv3x3(ASPP_CHANNELS, ASPP_CHANNELS, separable=separable),
            nn.Conv2d(ASPP_CHANNELS, num_classes, 1),
        )

    @property
    def aspp(self) -> ASPP:
        return self[0]


class DeepLabV3PlusHead(nn.Module):
    """DeepLabV3+ decoder (DeepLabV3+ paper, Sec. 3.1, Fig. 2):

    ASPP(out)                 (B, 256, H/os, W/os) -> bilinear up to the low-level size
    1x1 conv(low_level)       (B, 48, H/4, W/4)
    concat -> two 3x3 convs   (B, 256, H/4, W/4)
    1x1 classifier            (B, K, H/4, W/4)
    """

    def __init__(
        self,
        in_channels: int,
        low_level_channels: int,
        num_classes: int,
        atrous_rates: Sequence[int],
        separable: bool = False,
    ) -> None:
        super().__init__()
        self.aspp = ASPP(in_channels, atrous_rates, separable=separable)
        self.low_level_project = conv_bn_relu(low_level_channels, LOW_LEVEL_CHANNELS, 1)
        self.fuse = nn.Sequential(
            conv3x3(ASPP_CHANNELS + LOW_LEVEL_CHANNELS, DECODER_CHANNELS, separable=separable),
            conv3x3(DECODER_CHANNELS, DECODER_CHANNELS, separable=separable),
        )
        self.classifier = nn.Conv2d(DECODER_CHANNELS, num_classes, 1)

    def forward(self, x: Tensor, low_level: Tensor) -> Tensor:
        low_level = self.low_level_project(low_level)  # (B, 48, H/4, W/4)
        x = self.aspp(x)  # (B, 256, H/os, W/os)
        x = F.interpolate(x, size=low_level.shape[-2:], mode="bilinear", align_corners=False)
        x = self.fuse(torch.cat([x, low_level], dim=1))  # (B, 256, H/4, W/4)
        return self.classifier(x)  # (B, K, H/4, W/4)


class FCNHead(nn.Sequential):
    """Auxiliary FCN head for training (torchvision's FCNHead; mmsegmentation's auxiliary
    head for DeepLab): 3x3 conv to C/4 -> BN -> ReLU -> dropout 0.1 -> 1x1 classifier."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        inter = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(inter, num_classes, 1),
        )
