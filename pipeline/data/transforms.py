"""Augmentations on whole batches, on the training device (the GPU, or the CPU in tests).

DataLoader workers only decode; here a batch of decoded uint8 frames becomes a batch of
training crops: random scale -> random crop (padding the label with ignore) -> horizontal
flip (`BatchAugment`), then photometric distortion and normalisation. Defaults follow
mmsegmentation's Cityscapes pipeline: ratio range 0.5-2.0, crop 512x1024, flip p=0.5,
PhotoMetricDistortion, ImageNet mean/std.

Every random number is drawn on the CPU from the step's generator (so a run is the same on
any device and a resumed run draws the same numbers), and each crop is computed directly from
the source frame: the crop's pixels are sampled from the frame at the scaled positions,
exactly the values "resize the whole frame, then crop" gives, without resizing the whole
frame first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # on 0..255 pixels, as mmseg / torchvision
IMAGENET_STD = (58.395, 57.12, 57.375)
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as mmseg's (and OpenCV's) grey conversion


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The CPU generator of one training step on one rank. SeedSequence mixes the three
    numbers into an independent stream per (seed, step, rank): a resumed run recreates the
    stream of any step without replaying the ones before it."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


@dataclass(frozen=True)
class BatchAugment:
    """Random scale -> random crop (label padded with ignore) -> horizontal flip, per frame of
    a batch, in one pass on the batch's device.

    Takes images uint8 (B, 3, H, W), labels uint8 (B, H, W) and `sizes` int64 (B, 2) on the
    CPU: each frame's own (h, w) (frames smaller than H x W are padded at the bottom/right);
    returns images float32 (B, 3, ch, cw) on 0..255 and labels int64 (B, ch, cw).

    Per frame, as mmseg's RandomResize(ratio_range) + RandomCrop + RandomFlip: scale s ~
    U(scale_range); the frame resized to (round(h s), round(w s)) (images bilinear, labels
    nearest, as torch.nn.functional.interpolate's "bilinear" / "nearest"); padded to at least
    the crop (image 0, label ignore); a crop position uniform over the valid ones; flipped
    with p = 0.5.
    """

    crop_size: tuple[int, int] = (512, 1024)  # (h, w)
    scale_range: tuple[float, float] = (0.5, 2.0)  # DeepLabV3 paper, Sec. 4 / mmseg ratio_range
    flip: bool = True
    ignore_index: int = 255

    def draw(self, sizes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The random choices for frames of `sizes` (B, 2): int64 (B, 7) rows of
        (h, w, resized h, resized w, crop top, crop left, flipped)."""
        b = sizes.shape[0]
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * torch.rand(b, generator=g, dtype=torch.float64)
        h, w = sizes[:, 0], sizes[:, 1]
        nh = torch.round(h * scale).long().clamp(min=1)
        nw = torch.round(w * scale).long().clamp(min=1)
        ch, cw = self.crop_size
        top = torch.rand(b, generator=g, dtype=torch.float64) * ((nh - ch).clamp(min=0) + 1)
        left = torch.rand(b, generator=g, dtype=torch.float64) * ((nw - cw).clamp(min=0) + 1)
        flipped = torch.rand(b, generator=g) < 0.5
        if not self.flip:
            flipped = torch.zeros_like(flipped)
        return torch.stack([h, w, nh, nw, top.long(), left.long(), flipped.long()], 1)

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor, g: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(images, labels, self.draw(sizes, g))

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, choices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops of `images`/`labels` for the choices of `draw` (any device)."""
        dev = images.device
        c = _to_device(choices, dev)
        h, w, nh, nw, top, left, flipped = (c[:, i : i + 1] for i in range(7))  # (B, 1) each
        ch, cw = self.crop_size
        # position of each output row / column in the resized frame: (B, ch), (B, cw)
        ry = top + torch.arange(ch, device=dev)
        cols = torch.arange(cw, device=dev)
        rx = left + torch.where(flipped.bool(), cw - 1 - cols, cols)
        inside = (ry < nh)[:, :, None] & (rx < nw)[:, None, :]  # (B, ch, cw); else padding
        H, W = images.shape[-2:]  # the batch's canvas: frames are padded to the largest

        # labels: nearest, as interpolate's "nearest" (source index floor(dst * in / out)),
        # sampled at exactly that pixel's centre
        grid = _grid(_nearest(rx, w, nw), _nearest(ry, h, nh), W, H)
        lab = F.grid_sample(labels[:, None].float(), grid, mode="nearest", align_corners=False)
        lab = torch.where(inside, lab[:, 0].long(), self.ignore_index)

        # images: bilinear with half-pixel centres, as interpolate's "bilinear"
        # (align_corners=False): source positions clamped to the frame, as interpolate does
        grid = _grid(_source(rx, w, nw), _source(ry, h, nh), W, H)
        img = F.grid_sample(images.float(), grid, mode="bilinear", align_corners=False)
        img = img * inside[:, None]  # padding is 0, as mmseg's Pad(pad_val=0)
        return img, lab


def _grid(x: torch.Tensor, y: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Source pixel positions x (B, cw), y (B, ch) -> grid_sample's grid (B, ch, cw, 2)."""
    gx = (2 * x.float() + 1) / width - 1
    gy = (2 * y.float() + 1) / height - 1
    b, ch, cw = y.shape[0], y.shape[1], x.shape[1]
    return torch.stack([gx[:, None, :].expand(b, ch, cw), gy[:, :, None].expand(b, ch, cw)], -1)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor to `device` without waiting for the device (pinned, async)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _nearest(dst: torch.Tensor, size: torch.Tensor, resized: torch.Tensor) -> torch.Tensor:
    """Source index of resized positions `dst`, nearest (floor(dst * in / out), clamped)."""
    scale = size.float() / resized.float()
    return torch.minimum((dst.float() * scale).floor().long(), size - 1).clamp(min=0)


def _source(dst: torch.Tensor, size: torch.Tensor, resized: torch.Tensor) -> torch.Tensor:
    """Continuous source position of resized positions `dst` with half-pixel centres,
    clamped to [0, size - 1] (the edge pixel repeats, as interpolate's bilinear)."""
    scale = size.float() / resized.float()
    src = (dst.float() + 0.5) * scale - 0.5
    return torch.minimum(src.clamp(min=0), (size - 1).float())


_CONSTANTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _constant(name: str, values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(1, 3, 1, 1) constants made once per device: building them from a list every step would
    copy host->device and wait for the device each time."""
    key = (name, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1).to(device)
    return _CONSTANTS[key]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or float 0..255 (B, 3, H, W) -> float (B, 3, H, W) with ImageNet mean/std."""
    dev = images.device
    return (images.float() - _constant("mean", IMAGENET_MEAN, dev)) / _constant(
        "std", IMAGENET_STD, dev
    )


def photometric_distortion(images: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion, batched, on float 0..255 images (B, 3, H, W).

    Each of brightness (+-32), contrast (0.5-1.5) and saturation (0.5-1.5) applies with p=0.5
    per image. Hue jitter is left out: it needs an HSV round trip per image for a small gain.
    The random numbers are drawn on the CPU (from `g`) and sent in one copy.
    """
    b = images.shape[0]
    dev = images.device
    r = torch.rand(6, b, generator=g)  # (on: brightness, contrast, saturation; their amounts)
    on = r[:3] < 0.5
    delta = (r[3] * 64 - 32) * on[0]
    alpha = torch.where(on[1], r[4] + 0.5, 1.0)
    sat = torch.where(on[2], r[5] + 0.5, 1.0)
    delta, alpha, sat = _to_device(torch.stack([delta, alpha, sat]), dev).view(3, b, 1, 1, 1)
    images = (images + delta) * alpha
    gray = (images * _constant("luma", LUMA, dev)).sum(1, keepdim=True)
    images = gray + (images - gray) * sat
    return images.clamp_(0, 255)
