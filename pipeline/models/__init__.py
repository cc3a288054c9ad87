"""DeepLabV3 / DeepLabV3+ with ResNet-50/101, MobileNetV3-Large and aligned Xception-65.

from pipeline.models import build_model
model = build_model("deeplabv3plus", "resnet50", num_classes=19, output_stride=16)
model(x)["out"]            # (B, 19, H, W) logits
model.set_output_stride(8)
"""

from pipeline.models.backbones import BACKBONES, OUTPUT_STRIDES, build_backbone
from pipeline.models.deeplab import ARCHS, DeepLabV3, DeepLabV3Plus, build_model, default_aspp_rates

__all__ = [
    "ARCHS",
    "BACKBONES",
    "OUTPUT_STRIDES",
    "DeepLabV3",
    "DeepLabV3Plus",
    "build_backbone",
    "build_model",
    "default_aspp_rates",
]
