"""Inference at full resolution: whole image or sliding window, multi-scale and flip.

All functions take normalised float images (B, 3, H, W) and return class probabilities
(B, C, H, W) at the input size, summed over the test-time augmentations (argmax is the
prediction). Sliding window follows mmseg's `slide_inference`: windows of `crop` every
`stride`, clamped to the image, logits averaged where windows overlap.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out["out"] if isinstance(out, dict) else out


def slide_logits(
    model: nn.Module, x: torch.Tensor, crop: Sequence[int], stride: Sequence[int], num_classes: int
) -> torch.Tensor:
    """(B, C, H, W) logits from overlapping (crop_h, crop_w) windows every (stride_h, stride_w)."""
    b, _, h, w = x.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    logits = x.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = x.new_zeros((1, 1, h, w), dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * sh, h - ch), min(c * sw, w - cw)
            window = x[:, :, y1 : y1 + ch, x1 : x1 + cw]
            logits[:, :, y1 : y1 + ch, x1 : x1 + cw] += _logits(model, window).float()
            count[:, :, y1 : y1 + ch, x1 : x1 + cw] += 1
    return logits / count


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    x: torch.Tensor,
    num_classes: int,
    mode: str = "whole",
    crop: Sequence[int] = (1024, 1024),
    stride: Sequence[int] = (768, 768),
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> torch.Tensor:
    """Sum of softmax probabilities over scales (and flips), at the input size."""
    h, w = x.shape[-2:]
    total = None
    for scale in scales:
        xs = x if scale == 1.0 else F.interpolate(
            x, scale_factor=scale, mode="bilinear", align_corners=False
        )  # fmt: skip
        for flipped in (False, True) if flip else (False,):
            xi = xs.flip(-1) if flipped else xs
            if mode == "slide":
                logits = slide_logits(model, xi, crop, stride, num_classes)
            elif mode == "whole":
                logits = _logits(model, xi).float()
            else:
                raise ValueError(f"unknown inference mode {mode!r}; valid: whole, slide")
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            probs = logits.softmax(1)
            total = probs if total is None else total + probs
    assert total is not None
    return total
