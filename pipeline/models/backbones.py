"""Backbones: torchvision ResNet-50/101 and MobileNetV3-Large, and the aligned Xception-65.

Every backbone maps an image (B, 3, H, W) to a dict of feature maps:

    "out"        the deepest features, at stride `output_stride` (8, 16 or 32)
    "low_level"  stride-4 features for the DeepLabV3+ decoder (only if asked for)
    "aux"        mid-level features for the auxiliary FCN head (only if asked for)

and has `set_output_stride(os)`, which swaps strides for dilations in place (weights untouched),
so a model trained at output stride 16 can be evaluated at 8.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import (
    MobileNet_V3_Large_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    mobilenet_v3_large,
    resnet50,
    resnet101,
)
from torchvision.models._utils import IntermediateLayerGetter

from pipeline.errors import CheckpointError, ConfigError
from pipeline.models.catalog import BACKBONES, OUTPUT_STRIDES

log = logging.getLogger(__name__)


def check_output_stride(output_stride: int) -> int:
    if output_stride not in OUTPUT_STRIDES:
        raise ConfigError(
            f"output_stride {output_stride!r} is not supported; valid choices: "
            f"{', '.join(map(str, OUTPUT_STRIDES))}"
        )
    return int(output_stride)


def _set_conv(conv: nn.Conv2d, stride: int, dilation: int) -> None:
    """Change a conv's stride and dilation in place, keeping 'same' padding. Weights untouched."""
    k = conv.kernel_size[0]
    conv.stride = (stride, stride)
    conv.dilation = (dilation, dilation)
    conv.padding = (dilation * (k - 1) // 2,) * 2


# --------------------------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------------------------


class ResNetBackbone(IntermediateLayerGetter):
    """torchvision ResNet (v1.5: stride on the 3x3 conv) without avgpool/fc.

    Atrous convolution (DeepLabV3 paper, Sec. 3.1): below the output stride, layer3/layer4 keep
    stride 1 and dilate instead. Multi-grid (DeepLabV3 paper, Sec. 3.2): the three blocks of
    layer4 get rates `rate * multi_grid`, e.g. 2 * (1, 2, 4) = (2, 4, 8) at output stride 16.
    With `multi_grid=None` the dilation follows torchvision's `replace_stride_with_dilation`
    exactly (the first block of a dilated layer keeps the previous rate).
    """

    out_channels = 2048  # layer4
    low_level_channels = 256  # layer1, stride 4
    aux_channels = 1024  # layer3

    def __init__(
        self,
        depth: int,
        *,
        low_level: bool,
        aux: bool,
        multi_grid: Sequence[int] | None,
        output_stride: int,
    ) -> None:
        net = {50: resnet50, 101: resnet101}[depth](weights=None)
        return_layers = {"layer4": "out"}
        if low_level:
            return_layers["layer1"] = "low_level"
        if aux:
            return_layers["layer3"] = "aux"
        super().__init__(net, return_layers=return_layers)
        self.multi_grid = tuple(multi_grid) if multi_grid is not None else None
        self.output_stride = 32
        self.set_output_stride(output_stride)

    def set_output_stride(self, output_stride: int) -> None:
        output_stride = check_output_stride(output_stride)
        # strides of (layer3, layer4); conv1 + maxpool + layer2 already reach stride 8
        layer_strides = {32: (2, 2), 16: (2, 1), 8: (1, 1)}[output_stride]
        dilation = 1
        for name, stride in zip(("layer3", "layer4"), layer_strides, strict=True):
            layer: nn.Sequential = getattr(self, name)
            previous = dilation
            if stride == 1:
                dilation *= 2  # the stride we drop becomes dilation
            for i, block in enumerate(layer):
                if name == "layer4" and self.multi_grid is not None:
                    rate = dilation * self.multi_grid[i]  # DeepLabV3 paper, Sec. 3.2
                else:
                    rate = previous if i == 0 else dilation  # torchvision's convention
                _set_conv(block.conv2, stride if i == 0 else 1, rate)
            layer[0].downsample[0].stride = (stride, stride)  # 1x1 projection shortcut
        self.output_stride = output_stride


# --------------------------------------------------------------------------------------------
# MobileNetV3-Large
# --------------------------------------------------------------------------------------------


class MobileNetV3Backbone(IntermediateLayerGetter):
    """torchvision MobileNetV3-Large `features` (the 1x1 960-channel conv included).

    Like torchvision's `mobilenet_v3_large(dilated=True)` (used by its DeepLabV3), every
    depthwise conv of a stage below the output stride gets stride 1 and the stage's dilation.
    Feature taps follow torchvision's segmentation models: "aux" is the first stride-8 block
    (40 channels), "low_level" the last stride-4 block (24 channels).
    """

    out_channels = 960
    low_level_channels = 24
    aux_channels = 40

    def __init__(self, *, low_level: bool, aux: bool, output_stride: int) -> None:
        features = mobilenet_v3_large(weights=None).features
        return_layers = {str(len(features) - 1): "out"}
        if low_level:
            return_layers["3"] = "low_level"  # (B, 24, H/4, W/4)
        if aux:
            return_layers["4"] = "aux"  # (B, 40, H/8, W/8)
        super().__init__(features, return_layers=return_layers)
        # blocks that halve the resolution ("C_n" in the MobileNetV3 paper)
        self._strided = [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
        self.output_stride = 32
        self.set_output_stride(output_stride)

    def set_output_stride(self, output_stride: int) -> None:
        output_stride = check_output_stride(output_stride)
        current, dilation = 2, 1  # the stem conv has stride 2
        for name, block in self.named_children():
            index = int(name)
            if index == 0 or not hasattr(block, "block"):
                continue  # stem and final 1x1 conv: nothing to dilate
            stride = 1
            if index in self._strided:
                if current >= output_stride:
                    dilation *= 2
                else:
                    stride, current = 2, current * 2
            depthwise = next(
                m for m in block.modules() if isinstance(m, nn.Conv2d) and m.groups > 1
            )
            _set_conv(depthwise, stride, dilation)
        self.output_stride = output_stride


# --------------------------------------------------------------------------------------------
# Aligned Xception-65 (DeepLabV3+ paper, Sec. 3.2 and Fig. 4)
# --------------------------------------------------------------------------------------------


class SeparableConv2d(nn.Sequential):
    """3x3 depthwise -> BN -> ReLU -> 1x1 pointwise -> BN (-> ReLU).

    The BN and ReLU after the depthwise conv are the paper's change to Xception
    (DeepLabV3+ paper, Sec. 3.2: "extra batch normalization and ReLU activation are added
    after each 3x3 depthwise convolution, similar to MobileNet design").
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        relu: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                in_channels,
                3,
                stride,
                dilation,
                dilation,
                groups=in_channels,
                bias=False,
            ),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class XceptionBlock(nn.Module):
    """Three separable convs, the last one strided (max pooling replaced by a strided
    separable conv, DeepLabV3+ paper, Sec. 3.2), with a 1x1 conv shortcut ("conv"), an identity
    shortcut ("sum") or none ("none").

    `pre_activation=True` is Xception's ordering (ReLU before each separable conv, the sum
    un-activated); the last exit-flow block instead ends each separable conv with ReLU,
    as in the reference implementation (tensorflow/models research/deeplab, xception_65).
    """

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, int, int],
        stride: int,
        shortcut: str,
        pre_activation: bool = True,
    ) -> None:
        super().__init__()
        units = []
        c_in = in_channels
        for i, c_out in enumerate(channels):
            sep = SeparableConv2d(c_in, c_out, stride if i == 2 else 1, relu=not pre_activation)
            # not in place: the block input also feeds the shortcut
            units.append(nn.Sequential(nn.ReLU(), sep) if pre_activation else nn.Sequential(sep))
            c_in = c_out
        self.unit1, self.unit2, self.unit3 = units
        self.stride = stride  # the block's stride in the plain (output stride 32) network
        self.has_sum = shortcut != "none"
        self.shortcut: nn.Module | None = None
        if shortcut == "conv":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels[2], 1, stride, bias=False),
                nn.BatchNorm2d(channels[2]),
            )

    def depthwise_convs(self) -> list[nn.Conv2d]:
        return [m for m in self.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]

    def set_stride_dilation(self, stride: int, dilation: int) -> None:
        for i, conv in enumerate(self.depthwise_convs()):
            _set_conv(conv, stride if i == 2 else 1, dilation)
        if self.shortcut is not None:
            self.shortcut[0].stride = (stride, stride)

    def forward_with_mid(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (block output, output of the second separable conv)."""
        mid = self.unit2(self.unit1(x))
        y = self.unit3(mid)
        if self.shortcut is not None:
            y = y + self.shortcut(x)
        elif self.has_sum:
            y = y + x
        return y, mid

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_mid(x)[0]


class XceptionBackbone(nn.Module):
    """Aligned Xception-65 (DeepLabV3+ paper, Fig. 4): entry flow (stem + 3 blocks), middle
    flow (16 blocks, 8 more than Xception's original 8), exit flow (2 blocks).

    "low_level" is taken inside entry block 2, after its second separable conv (stride 4,
    256 channels), as in the reference implementation; "aux" is the middle-flow output (728).
    Output stride follows the reference implementation too: once the target stride is
    reached, a strided block runs at stride 1 with the current rate, and later blocks use
    the rate multiplied by the stride that was dropped. No multi-grid (DeepLabV3+ paper,
    Sec. 4.3: "we do not employ the multi-grid method").
    """

    out_channels = 2048
    low_level_channels = 256
    aux_channels = 728

    def __init__(self, *, low_level: bool, aux: bool, output_stride: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 2, 1, bias=False),  # (B, 32, H/2, W/2)
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, 3, 1, 1, bias=False),  # (B, 64, H/2, W/2)
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.entry_flow = nn.Sequential(
            XceptionBlock(64, (128, 128, 128), 2, "conv"),  # (B, 128, H/4, W/4)
            XceptionBlock(128, (256, 256, 256), 2, "conv"),  # (B, 256, H/8, W/8)
            XceptionBlock(256, (728, 728, 728), 2, "conv"),  # (B, 728, H/16, W/16)
        )
        self.middle_flow = nn.Sequential(
            *[XceptionBlock(728, (728, 728, 728), 1, "sum") for _ in range(16)]  # paper, Fig. 4
        )
        self.exit_flow = nn.Sequential(
            XceptionBlock(728, (728, 1024, 1024), 2, "conv"),  # (B, 1024, H/32, W/32)
            XceptionBlock(
                1024, (1536, 1536, 2048), 1, "none", pre_activation=False
            ),  # (B, 2048, ...)
        )
        self.return_low_level = low_level
        self.return_aux = aux
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.output_stride = 32
        self.set_output_stride(output_stride)

    def _blocks(self) -> list[XceptionBlock]:
        return [*self.entry_flow, *self.middle_flow, *self.exit_flow]

    def set_output_stride(self, output_stride: int) -> None:
        output_stride = check_output_stride(output_stride)
        current, rate = 2, 1  # after the stem
        for block in self._blocks():
            if current >= output_stride:
                block.set_stride_dilation(1, rate)
                rate *= block.stride
            else:
                block.set_stride_dilation(block.stride, 1)
                current *= block.stride
        self.output_stride = output_stride

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        result: dict[str, Tensor] = OrderedDict()
        x = self.stem(x)  # (B, 64, H/2, W/2)
        x = self.entry_flow[0](x)  # (B, 128, H/4, W/4)
        x, low_level = self.entry_flow[1].forward_with_mid(x)  # (B, 256, H/8), (B, 256, H/4)
        if self.return_low_level:
            result["low_level"] = low_level
        x = self.entry_flow[2](x)  # (B, 728, H/16, W/16) at output stride >= 16
        x = self.middle_flow(x)
        if self.return_aux:
            result["aux"] = x
        result["out"] = self.exit_flow(x)  # (B, 2048, H/os, W/os)
        return result


# --------------------------------------------------------------------------------------------
# Construction and pretrained weights
# --------------------------------------------------------------------------------------------

_IMAGENET_WEIGHTS = {
    "resnet50": ResNet50_Weights.IMAGENET1K_V2,
    "resnet101": ResNet101_Weights.IMAGENET1K_V2,
    "mobilenet_v3_large": MobileNet_V3_Large_Weights.IMAGENET1K_V1,
}
# keys of a classification checkpoint that a backbone does not have
_CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "aux_classifier.")
# prefixes a checkpoint may carry around the backbone's own keys
_WRAPPER_PREFIXES = ("module.", "backbone.", "features.")


def build_backbone(
    name: str,
    *,
    output_stride: int = 16,
    low_level: bool = False,
    aux: bool = False,
    multi_grid: Sequence[int] | None = (1, 2, 4),
    pretrained: str | Path | None = None,
) -> nn.Module:
    """Build backbone `name` (one of BACKBONES) at `output_stride`.

    `pretrained`: None (random init), "imagenet" (torchvision's weights API; downloads to the
    torch hub cache if not there) or the path of a local state_dict (torch.save) -- either a
    torchvision classification checkpoint or a backbone's own state_dict.
    `multi_grid` applies to ResNet's layer4 only.
    """
    output_stride = check_output_stride(output_stride)
    if multi_grid is not None and len(tuple(multi_grid)) != 3:
        raise ConfigError(
            f"multi_grid must have 3 unit rates (one per block of ResNet layer4, "
            f"DeepLabV3 paper Sec. 3.2), e.g. (1, 2, 4); got {tuple(multi_grid)!r}"
        )
    match name:
        case "resnet50" | "resnet101":
            backbone: nn.Module = ResNetBackbone(
                int(name.removeprefix("resnet")),
                low_level=low_level,
                aux=aux,
                multi_grid=multi_grid,
                output_stride=output_stride,
            )
        case "mobilenet_v3_large":
            backbone = MobileNetV3Backbone(
                low_level=low_level, aux=aux, output_stride=output_stride
            )
        case "xception65":
            backbone = XceptionBackbone(low_level=low_level, aux=aux, output_stride=output_stride)
        case _:
            raise ConfigError(f"unknown backbone {name!r}; valid choices: {', '.join(BACKBONES)}")
    if pretrained is not None:
        load_backbone_weights(backbone, name, pretrained)
    return backbone


def load_backbone_weights(backbone: nn.Module, name: str, source: str | Path) -> None:
    """Load ImageNet weights ("imagenet") or a local state_dict file into `backbone`."""
    if str(source) == "imagenet":
        if name not in _IMAGENET_WEIGHTS:
            raise ConfigError(
                f"torchvision has no ImageNet weights for {name!r} (it has them for "
                f"{', '.join(_IMAGENET_WEIGHTS)}); pass the path of a local weights file instead"
            )
        weights = _IMAGENET_WEIGHTS[name]
        log.info("loading %s ImageNet weights (%s)", name, weights)
        state = weights.get_state_dict(progress=False, check_hash=True)
        where = f"torchvision {weights}"
    else:
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(
                f"backbone weights file not found: {path} (pass an existing state_dict saved "
                f"with torch.save, 'imagenet', or None)"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt file, pickle with code, ...
            raise CheckpointError(f"cannot read backbone weights {path}: {exc}") from exc
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a state_dict (got {type(state).__name__})")
        where = str(path)
    state = _normalize_keys(state, set(backbone.state_dict()))
    missing, unexpected = _diff_keys(backbone, state)
    if missing or unexpected:
        raise CheckpointError(
            f"{where} does not fit backbone {name!r}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointError(f"{where} does not fit backbone {name!r}: {exc}") from exc


def _normalize_keys(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Strip wrapper prefixes and drop classifier keys, so a torchvision classification
    checkpoint, a backbone state_dict and a whole segmentation model's state_dict all fit."""
    out = {}
    for key, value in state.items():
        k = key
        while k not in expected:
            prefix = next((p for p in _WRAPPER_PREFIXES if k.startswith(p)), None)
            if prefix is None:
                break
            k = k[len(prefix) :]
        if k not in expected and key.startswith(_CLASSIFIER_PREFIXES):
            continue  # the classification / segmentation head, not part of a backbone
        out[k] = value
    return out


def _diff_keys(module: nn.Module, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    return missing, unexpected
