"""Parameters and multiply-adds of a model, measured with torch's FLOP counter.

Models are built and run on the "meta" device: shapes only, no memory, no arithmetic, so
ResNet-101 at 1024x2048 and output stride 8 is measured in a second on any machine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.errors import ConfigError
from pipeline.models.backbones import check_output_stride
from pipeline.models.catalog import ARCHS, BACKBONES
from pipeline.models.deeplab import build_model

# Multiply-adds the DeepLabV3+ paper reports at 513x513 (PASCAL VOC, 21 classes), single
# scale, no flip. Key: (arch, backbone, output_stride, separable).
PAPER_MACS: dict[tuple[str, str, int, bool], float] = {
    # DeepLabV3+ paper, Table 3 (ResNet-101; the paper's DeepLabv3 is the no-decoder row)
    ("deeplabv3", "resnet101", 32, False): 52.43e9,
    ("deeplabv3", "resnet101", 16, False): 81.02e9,
    ("deeplabv3", "resnet101", 8, False): 276.18e9,
    ("deeplabv3plus", "resnet101", 32, False): 74.20e9,
    ("deeplabv3plus", "resnet101", 16, False): 101.28e9,
    ("deeplabv3plus", "resnet101", 8, False): 297.92e9,
    # DeepLabV3+ paper, Table 5 (modified aligned Xception-65)
    ("deeplabv3", "xception65", 16, False): 68.00e9,
    ("deeplabv3", "xception65", 8, False): 240.85e9,
    ("deeplabv3plus", "xception65", 16, False): 89.76e9,
    ("deeplabv3plus", "xception65", 8, False): 262.59e9,
    ("deeplabv3plus", "xception65", 16, True): 54.17e9,
    ("deeplabv3plus", "xception65", 8, True): 177.10e9,
}
PAPER_INPUT_SIZE = (513, 513)


@dataclass(frozen=True)
class Complexity:
    arch: str
    backbone: str
    output_stride: int
    input_size: tuple[int, int]  # (H, W)
    separable: bool
    num_classes: int
    params: int
    macs: int  # multiply-adds of one forward pass, batch 1
    paper_macs: float | None  # the paper's figure for the same setting, when it gives one

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int], batch_size: int = 1) -> int:
    """Multiply-adds of one forward pass in eval mode (torch's FLOP counter counts a
    multiply-add as 2 FLOPs; convolutions and matmuls only, as the papers do)."""
    device = next(model.parameters()).device
    x = torch.zeros(batch_size, 3, *input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def measure(
    arch: str,
    backbone: str,
    *,
    input_size: tuple[int, int] = PAPER_INPUT_SIZE,
    output_stride: int = 16,
    num_classes: int = 19,
    separable: bool = False,
) -> Complexity:
    """Parameters and multiply-adds of one configuration, measured on the meta device."""
    h, w = (int(s) for s in input_size)
    if h < 1 or w < 1:
        raise ConfigError(f"input size must be positive, got {h}x{w}")
    with torch.device("meta"):
        model = build_model(
            arch,
            backbone,
            num_classes=num_classes,
            output_stride=output_stride,
            separable_head=separable,
        )
    paper = None
    if (h, w) == PAPER_INPUT_SIZE:
        paper = PAPER_MACS.get((arch, backbone, output_stride, separable))
    return Complexity(
        arch=arch,
        backbone=backbone,
        output_stride=output_stride,
        input_size=(h, w),
        separable=separable,
        num_classes=num_classes,
        params=count_parameters(model),
        macs=count_macs(model, (h, w)),
        paper_macs=paper,
    )


def complexity_table(
    archs: Iterable[str] = ARCHS,
    backbones: Iterable[str] = BACKBONES,
    input_sizes: Sequence[tuple[int, int]] = (PAPER_INPUT_SIZE,),
    output_strides: Sequence[int] = (16,),
    num_classes: int = 19,
    separable: bool = False,
) -> list[Complexity]:
    """One row per (backbone, arch, input size, output stride); choices are checked up front."""
    archs, backbones = list(archs), list(backbones)
    for a in archs:
        if a not in ARCHS:
            raise ConfigError(f"unknown arch {a!r}; valid choices: {', '.join(ARCHS)}")
    for b in backbones:
        if b not in BACKBONES:
            raise ConfigError(f"unknown backbone {b!r}; valid choices: {', '.join(BACKBONES)}")
    for os_ in output_strides:
        check_output_stride(os_)
    return [
        measure(
            a, b, input_size=size, output_stride=os_, num_classes=num_classes, separable=separable
        )
        for b in backbones
        for a in archs
        for size in input_sizes
        for os_ in output_strides
    ]
