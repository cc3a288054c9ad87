"""Segmentation losses: cross-entropy (ignore, class weights, label smoothing, OHEM) and Dice.

Every loss is a mean over *valid* pixels with the count clamped to >= 1, so a crop whose
pixels are all ignore gives a loss of 0 (and zero gradients), never NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def inverse_log_weights(pixel_counts, c: float = 1.02) -> torch.Tensor:
    """ENet's class weighting 1 / ln(c + frequency), from the manifest's per-class pixel counts.
    Absent classes get the largest weight rather than an infinite one."""
    counts = torch.as_tensor(pixel_counts, dtype=torch.float64)
    freq = counts / counts.sum().clamp(min=1)
    return (1.0 / torch.log(c + freq)).float()


class SegLoss(nn.Module):
    """weights["ce"] * CE + weights["dice"] * Dice, on logits (B, C, H, W) and targets (B, H, W)."""

    def __init__(
        self,
        num_classes: int,
        weights: dict[str, float] | None = None,
        class_weights: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        ohem: bool = False,
        ohem_thresh: float = 0.7,
        ohem_min_kept: int = 100000,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.weights = dict(weights or {"ce": 1.0})
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.label_smoothing = label_smoothing
        self.ohem, self.ohem_thresh, self.ohem_min_kept = ohem, ohem_thresh, ohem_min_kept
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros((), dtype=torch.float32)
        if self.weights.get("ce"):
            total = total + self.weights["ce"] * self.cross_entropy(logits, target)
        if self.weights.get("dice"):
            total = total + self.weights["dice"] * self.dice(logits, target)
        return total

    def cross_entropy(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        pixel = F.cross_entropy(
            logits, target, weight=self.class_weights, ignore_index=self.ignore_index,
            reduction="none", label_smoothing=self.label_smoothing,
        )  # (B, H, W), 0 at ignored pixels  # fmt: skip
        valid = target != self.ignore_index
        if self.ohem:
            valid = valid & self._hard_pixels(logits, target, valid)
        if self.class_weights is not None:
            # PyTorch's weighted mean divides by the weights of the valid targets (a product
            # with the mask, not a masked selection: that would wait for the GPU)
            denom = (self.class_weights[target.clamp(max=self.num_classes - 1)] * valid).sum()
        else:
            denom = valid.sum()
        return (pixel * valid).sum() / denom.clamp(min=1)

    @torch.no_grad()
    def _hard_pixels(self, logits, target, valid) -> torch.Tensor:
        """mmseg's OHEMPixelSampler: keep pixels whose true-class probability is below
        `thresh`, and at least `min_kept` of the hardest ones. All on the device: the k-th
        smallest probability (kthvalue, no sort) stays a tensor, never copied to the host.
        Ignored pixels count as probability 1.0: with fewer valid pixels than `min_kept`, the
        threshold reaches 1.0 and every valid pixel is kept (the caller masks with `valid`)."""
        true = target.clamp(max=self.num_classes - 1).unsqueeze(1)
        prob = logits.softmax(1).gather(1, true)[:, 0].masked_fill(~valid, 1.0)
        kth = kth_smallest(prob.flatten(), min(self.ohem_min_kept, prob.numel()))
        return prob <= kth.clamp(min=self.ohem_thresh)

    def dice(self, logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
        """Soft multi-class Dice over valid pixels, mean over classes (smoothed with eps)."""
        valid = (target != self.ignore_index).unsqueeze(1)  # (B, 1, H, W)
        prob = logits.float().softmax(1) * valid
        onehot = F.one_hot(target.clamp(max=self.num_classes - 1), self.num_classes)
        onehot = onehot.permute(0, 3, 1, 2).float() * valid
        inter = (prob * onehot).sum((0, 2, 3))
        union = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
        return 1 - ((2 * inter + eps) / (union + eps)).mean()


def kth_smallest(values: torch.Tensor, k: int, method: str | None = None) -> torch.Tensor:
    """The k-th smallest of a 1-D tensor (k from 1), as a 0-d tensor on its device. `method`:
    kthvalue (one pass, fastest on CPU), sort, or topk; None picks kthvalue on CPU and sort on
    CUDA, where kthvalue runs a single-block radix select over the whole batch (~20x slower
    than sort, as reported for PyTorch; benchmarks/gpu_check.sh times all three)."""
    method = method or ("kthvalue" if values.device.type == "cpu" else "sort")
    match method:
        case "kthvalue":
            return values.kthvalue(k).values
        case "sort":
            return values.sort().values[k - 1]
        case "topk":
            return values.topk(k, largest=False, sorted=False).values.max()
    raise ValueError(f"method {method!r}: one of kthvalue, sort, topk")


def poly_lr(step: int, total: int, base: float, power: float = 0.9, min_lr: float = 0.0) -> float:
    """DeepLab's poly schedule: base * (1 - step/total)^power, floored at min_lr (mmseg)."""
    return (base - min_lr) * (1 - min(step, total) / total) ** power + min_lr


def cosine_lr(step: int, total: int, base: float, min_lr: float = 0.0) -> float:
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * min(step, total) / total))
