"""Augmentations on image and label together, on torch tensors (CPU workers or the GPU).

Per-sample geometry (random scale, crop with ignore padding, flip) runs in the loader on uint8
images; photometric distortion and normalisation run batched on the training device.
Defaults follow mmsegmentation's Cityscapes pipeline: ratio range 0.5-2.0, crop 512x1024,
flip p=0.5, PhotoMetricDistortion, ImageNet mean/std.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # on 0..255 pixels, as mmseg / torchvision
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class TrainAugment:
    """Random scale -> random crop (padding the label with ignore) -> horizontal flip.

    Takes {"image": uint8 (3, H, W), "label": uint8 (H, W)} and returns the same keys with
    image uint8 (3, ch, cw) and label int64 (ch, cw). `g` makes it reproducible.
    """

    crop_size: tuple[int, int] = (512, 1024)  # (h, w)
    scale_range: tuple[float, float] = (0.5, 2.0)  # DeepLabV3 paper, Sec. 4 / mmseg ratio_range
    flip: bool = True
    ignore_index: int = 255

    def __call__(self, sample: dict, g: torch.Generator) -> dict:
        image, label = sample["image"], sample["label"]
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * torch.rand((), generator=g).item()
        h, w = image.shape[-2:]
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        if (nh, nw) != (h, w):
            image = resize_image(image, (nh, nw))
            label = F.interpolate(label[None, None], size=(nh, nw), mode="nearest")[0, 0]
        label = label.long()
        image, label = random_crop(image, label, self.crop_size, g, self.ignore_index)
        if self.flip and torch.rand((), generator=g).item() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return {**sample, "image": image.contiguous(), "label": label.contiguous()}


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a uint8 (3, H, W) image, staying uint8.

    torch's uint8 channels-last bilinear kernel: 36x faster on CPU than a float round trip at
    1024x2048 -> 1.5x (3.4 ms vs 124 ms, one thread), within 1 grey level of it."""
    x = image[None].contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0].contiguous()


def random_crop(
    image: torch.Tensor,
    label: torch.Tensor,
    crop_size: tuple[int, int],
    g: torch.Generator,
    ignore_index: int = 255,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop (ch, cw) at a random place; pad first (image 0, label ignore) if smaller."""
    ch, cw = crop_size
    h, w = image.shape[-2:]
    ph, pw = max(ch - h, 0), max(cw - w, 0)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0)
        label = F.pad(label, (0, pw, 0, ph), value=ignore_index)
        h, w = image.shape[-2:]
    y = int(torch.randint(0, h - ch + 1, (), generator=g))
    x = int(torch.randint(0, w - cw + 1, (), generator=g))
    return image[:, y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) with ImageNet mean/std."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() - mean) / std


def photometric_distortion(images: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion, batched, on float 0..255 images (B, 3, H, W).

    Each of brightness (+-32), contrast (0.5-1.5) and saturation (0.5-1.5) applies with p=0.5
    per image. Hue jitter is left out: it needs an HSV round trip per image for a small gain.
    """
    b = images.shape[0]
    dev = images.device

    def rand(*shape):
        return torch.rand(*shape, generator=g).to(dev)

    on = rand(3, b) < 0.5
    delta = (rand(b) * 64 - 32) * on[0]
    images = images + delta.view(b, 1, 1, 1)
    alpha = torch.where(on[1], rand(b) + 0.5, torch.ones(b, device=dev))
    images = images * alpha.view(b, 1, 1, 1)
    gray = (images * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(
        1, keepdim=True
    )
    sat = torch.where(on[2], rand(b) + 0.5, torch.ones(b, device=dev))
    images = gray + (images - gray) * sat.view(b, 1, 1, 1)
    return images.clamp_(0, 255)
