"""DeepLabV3 and DeepLabV3+ assembled from a backbone and a head: backbone -> head (-> aux).

    DeepLabV3   "Rethinking Atrous Convolution for Semantic Image Segmentation" (arXiv:1706.05587)
    DeepLabV3+  "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
                Segmentation" (arXiv:1802.02611)

Both return {"out": (B, K, H, W) logits} at the input size, plus {"aux": (B, K, H, W)} from
the auxiliary FCN head when it exists and the model is in training mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn
from torch.nn import functional as F

from pipeline.errors import ConfigError
from pipeline.models.backbones import build_backbone, check_output_stride
from pipeline.models.catalog import ARCHS, BACKBONES
from pipeline.models.heads import ASPP, DeepLabV3Head, DeepLabV3PlusHead, FCNHead

# DeepLabV3 paper, Sec. 3.3: rates (6, 12, 18) at output stride 16, doubled at 8
ASPP_RATES_OS16 = (6, 12, 18)


def default_aspp_rates(output_stride: int) -> tuple[int, ...]:
    """(6, 12, 18) at output stride 16, scaled with the feature resolution: (12, 24, 36) at 8,
    (3, 6, 9) at 32."""
    return tuple(max(1, r * 16 // output_stride) for r in ASPP_RATES_OS16)


class _DeepLab(nn.Module):
    arch = ""

    def __init__(
        self,
        backbone: nn.Module,
        classifier: nn.Module,
        aux_classifier: nn.Module | None,
        *,
        backbone_name: str,
        aspp_rates: Sequence[int] | None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier
        self.backbone_name = backbone_name
        # explicit rates are given for the output stride the model is built at; None follows
        # the paper's rule at every output stride
        self._aspp_rates = None if aspp_rates is None else tuple(aspp_rates)
        self._aspp_rates_os = backbone.output_stride

    @property
    def aspp(self) -> ASPP:
        return self.classifier.aspp

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def set_output_stride(self, output_stride: int) -> None:
        """Switch output stride (e.g. train at 16, evaluate at 8) without touching weights:
        backbone strides become dilations (or back) and ASPP rates scale with the resolution."""
        output_stride = check_output_stride(output_stride)
        self.backbone.set_output_stride(output_stride)
        if self._aspp_rates is None:
            rates = default_aspp_rates(output_stride)
        else:
            scale = self._aspp_rates_os / output_stride
            rates = tuple(max(1, round(r * scale)) for r in self._aspp_rates)
        self.aspp.set_atrous_rates(rates)

    def _logits(self, features: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)  # {"out": (B, C, H/os, W/os), ...}
        logits = self._logits(features)
        result = {"out": F.interpolate(logits, size=size, mode="bilinear", align_corners=False)}
        if self.aux_classifier is not None and self.training:
            aux = self.aux_classifier(features["aux"])
            result["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return result

    def extra_repr(self) -> str:
        return f"backbone={self.backbone_name}, output_stride={self.output_stride}"


class DeepLabV3(_DeepLab):
    """backbone -> ASPP head on the deepest features -> bilinear upsampling to the input."""

    arch = "deeplabv3"

    def _logits(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(features["out"])  # (B, K, H/os, W/os)


class DeepLabV3Plus(_DeepLab):
    """backbone -> ASPP + decoder with stride-4 features -> bilinear upsampling to the input."""

    arch = "deeplabv3plus"

    def _logits(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(features["out"], features["low_level"])  # (B, K, H/4, W/4)


def build_model(
    arch: str = "deeplabv3plus",
    backbone: str = "resnet50",
    num_classes: int = 19,
    output_stride: int = 16,
    aux_head: bool = False,
    separable_head: bool = False,
    pretrained_backbone: str | Path | None = None,
    resnet_multi_grid: Sequence[int] | None = (1, 2, 4),
    aspp_rates: Sequence[int] | None = None,
) -> DeepLabV3 | DeepLabV3Plus:
    """Build a DeepLabV3 / DeepLabV3+ model.

    arch: one of ARCHS; backbone: one of BACKBONES; output_stride: 8, 16 or 32.
    aux_head: add the auxiliary FCN head (its output is returned in training mode only).
    separable_head: depthwise-separable 3x3 convs in the head, ASPP and decoder (the paper's
        "SC").
    pretrained_backbone: None, "imagenet" (torchvision's weights) or a local state_dict path.
    resnet_multi_grid: unit rates of ResNet's layer4 (DeepLabV3 paper, Sec. 3.2); None gives
        torchvision's dilation scheme. Ignored by MobileNetV3 and Xception (which the
        DeepLabV3+ paper trains without multi-grid).
    aspp_rates: the three ASPP atrous rates at `output_stride`; None gives (6, 12, 18) at
        output stride 16, doubled at 8.
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; valid choices: {', '.join(ARCHS)}")
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}; valid choices: {', '.join(BACKBONES)}")
    output_stride = check_output_stride(output_stride)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    if aspp_rates is not None:
        aspp_rates = tuple(aspp_rates)
        if len(aspp_rates) != 3 or not all(isinstance(r, int) and r >= 1 for r in aspp_rates):
            raise ConfigError(
                f"aspp_rates must be 3 positive integers (DeepLabV3 paper, Sec. 3.3), e.g. "
                f"{ASPP_RATES_OS16} at output stride 16 or {default_aspp_rates(8)} at 8; "
                f"got {aspp_rates!r}"
            )
    plus = arch == "deeplabv3plus"
    body = build_backbone(
        backbone,
        output_stride=output_stride,
        low_level=plus,
        aux=aux_head,
        multi_grid=resnet_multi_grid,
        pretrained=pretrained_backbone,
    )
    rates = aspp_rates if aspp_rates is not None else default_aspp_rates(output_stride)
    aux = FCNHead(body.aux_channels, num_classes) if aux_head else None
    if plus:
        head = DeepLabV3PlusHead(
            body.out_channels, body.low_level_channels, num_classes, rates, separable_head
        )
        return DeepLabV3Plus(body, head, aux, backbone_name=backbone, aspp_rates=aspp_rates)
    head = DeepLabV3Head(body.out_channels, num_classes, rates, separable_head)
    return DeepLabV3(body, head, aux, backbone_name=backbone, aspp_rates=aspp_rates)
