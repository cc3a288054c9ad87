"""DeepLabV3 / DeepLabV3+ with ResNet-50/101, MobileNetV3-Large and aligned Xception-65.

from pipeline.models import build_model
model = build_model("deeplabv3plus", "resnet50", num_classes=19, output_stride=16)
model(x)["out"]            # (B, 19, H, W) logits
model.set_output_stride(8)

The names below load on first use (PEP 562), so `pipeline.models.catalog` (the valid
choices) is importable without torch.
"""

from pipeline.models.catalog import ARCHS, BACKBONES, OUTPUT_STRIDES

_LAZY = {
    "DeepLabV3": "pipeline.models.deeplab",
    "DeepLabV3Plus": "pipeline.models.deeplab",
    "build_model": "pipeline.models.deeplab",
    "default_aspp_rates": "pipeline.models.deeplab",
    "build_backbone": "pipeline.models.backbones",
}

__all__ = ["ARCHS", "BACKBONES", "OUTPUT_STRIDES", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline.models' has no attribute {name!r}")
