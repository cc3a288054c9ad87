"""Inference at full resolution: whole image or sliding window, multi-scale and flip.

`predict_scores` takes normalised float images (B, 3, H, W) and returns class scores
(B, C, H, W) at the input size whose argmax is the prediction: the logits for a single view,
the sum of softmax probabilities over several test-time views (scales x flips). Sliding
window follows mmseg's `slide_inference`: windows of `crop` every `stride`, clamped to the
image, logits averaged where windows overlap; the windows of all images go through the model
together, `window_batch` at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out["out"] if isinstance(out, dict) else out


def window_grid(
    h: int, w: int, crop: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of mmseg's sliding windows over an h x w image."""
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    return [
        (min(r * sh, h - ch), min(c * sw, w - cw), ch, cw) for r in range(rows) for c in range(cols)
    ]


def slide_logits(
    model: nn.Module,
    x: torch.Tensor,
    crop: Sequence[int],
    stride: Sequence[int],
    num_classes: int,
    window_batch: int = 16,
) -> torch.Tensor:
    """(B, C, H, W) float logits from overlapping windows, averaged where they overlap."""
    b, _, h, w = x.shape
    windows = window_grid(h, w, crop, stride)
    logits = torch.zeros((b, num_classes, h, w), dtype=torch.float32, device=x.device)
    count = torch.zeros((1, 1, h, w), dtype=torch.float32, device=x.device)
    # every window of every image, as one stack of (B * windows) crops of one size
    crops = torch.cat([x[:, :, t : t + ch, s : s + cw] for t, s, ch, cw in windows])
    chunk = max(1, window_batch)
    out = torch.cat([_logits(model, crops[i : i + chunk]) for i in range(0, len(crops), chunk)])
    for k, (t, s, ch, cw) in enumerate(windows):
        logits[:, :, t : t + ch, s : s + cw] += out[k * b : (k + 1) * b].float()
        count[:, :, t : t + ch, s : s + cw] += 1
    return logits / count


@torch.no_grad()
def predict_scores(
    model: nn.Module,
    x: torch.Tensor,
    num_classes: int,
    mode: str = "whole",
    crop: Sequence[int] = (1024, 1024),
    stride: Sequence[int] = (768, 768),
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    window_batch: int = 16,
) -> torch.Tensor:
    """Class scores (B, C, H, W) at the input size; argmax is the prediction (see module)."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"unknown inference mode {mode!r}; valid: whole, slide")
    h, w = x.shape[-2:]
    views = [(s, f) for s in scales for f in ((False, True) if flip else (False,))]
    total = None
    for scale, flipped in views:
        xi = x if scale == 1.0 else F.interpolate(
            x, scale_factor=scale, mode="bilinear", align_corners=False
        )  # fmt: skip
        if flipped:
            xi = xi.flip(-1)
        if mode == "slide":
            logits = slide_logits(model, xi, crop, stride, num_classes, window_batch)
        else:
            logits = _logits(model, xi).float()
        if flipped:
            logits = logits.flip(-1)
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        # one view: its logits (the argmax of softmax is the argmax of the logits, and a
        # full-resolution softmax costs memory); several: their probabilities add up
        scores = logits if len(views) == 1 else logits.softmax(1)
        total = scores if total is None else total + scores
    assert total is not None
    return total
