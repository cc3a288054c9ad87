"""The batched on-device augmentation keeps the per-frame promises of mmseg's pipeline:
random scale in range, crop of the crop size, flip half the time, labels resized nearest and
padded with ignore, images bilinear and padded with 0; and the same seed draws the same."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.readers import collate_train
from pipeline.data.transforms import (
    BatchAugment,
    normalize,
    photometric_distortion,
    step_generator,
)


def _frames(sizes: list[tuple[int, int]], seed: int = 0):
    """A padded batch of random frames of `sizes`, as collate_train makes it."""
    g = torch.Generator().manual_seed(seed)
    samples = [
        {
            "image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
            "label": torch.randint(0, 19, (h, w), generator=g, dtype=torch.uint8),
        }
        for h, w in sizes
    ]
    return samples, collate_train(samples)


def _reference(image, label, choice, crop):
    """Resize the whole frame (interpolate), pad, crop, flip: the per-frame recipe."""
    h, w, nh, nw, top, left, flipped = (int(v) for v in choice)
    img = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False)
    lab = F.interpolate(label[None, None].float(), size=(nh, nw), mode="nearest")
    img, lab = img[0], lab[0, 0].long()
    ch, cw = crop
    pad = (0, max(cw - nw, 0), 0, max(ch - nh, 0))
    img, lab = F.pad(img, pad, value=0), F.pad(lab, pad, value=255)
    img, lab = img[:, top : top + ch, left : left + cw], lab[top : top + ch, left : left + cw]
    return (img.flip(-1), lab.flip(-1)) if flipped else (img, lab)


def test_crops_equal_resize_then_crop_of_each_frame():
    sizes = [(37, 53), (20, 31), (9, 60), (40, 12)]  # different sizes: padded in the batch
    samples, batch = _frames(sizes)
    aug = BatchAugment(crop_size=(17, 23), scale_range=(0.3, 2.5))
    for step in range(10):
        choices = aug.draw(batch["size"], step_generator(0, step))
        images, labels = aug.apply(batch["image"], batch["label"], choices)
        assert images.shape == (4, 3, 17, 23) and images.dtype == torch.float32
        assert labels.shape == (4, 17, 23) and labels.dtype == torch.int64
        for s, choice, img, lab in zip(samples, choices, images, labels, strict=True):
            ref_img, ref_lab = _reference(s["image"], s["label"], choice, (17, 23))
            assert torch.equal(lab, ref_lab)  # nearest, ignore padding: exact
            assert (img - ref_img).abs().max() < 1e-3  # bilinear: float rounding only


def test_scale_range_crop_position_and_flip_rate():
    _, batch = _frames([(64, 128)] * 8)
    aug = BatchAugment(crop_size=(32, 48), scale_range=(0.5, 2.0))
    c = torch.cat([aug.draw(batch["size"], step_generator(3, s)) for s in range(250)])
    scale = c[:, 2].double() / 64
    assert scale.min() >= 0.5 - 1 / 64 and scale.max() <= 2.0 + 1 / 64
    assert scale.min() < 0.55 and scale.max() > 1.95  # the whole range is drawn
    assert (c[:, 4] <= (c[:, 2] - 32).clamp(min=0)).all() and (c[:, 4] >= 0).all()
    assert (c[:, 5] <= (c[:, 3] - 48).clamp(min=0)).all() and (c[:, 5] >= 0).all()
    assert abs(c[:, 6].double().mean().item() - 0.5) < 0.05  # 2000 draws: flip rate 0.5
    no_flip = BatchAugment(crop_size=(32, 48), flip=False).draw(batch["size"], step_generator(0, 0))
    assert not no_flip[:, 6].any()


def test_small_frames_are_padded_image_zero_label_ignore():
    image = torch.full((1, 3, 10, 10), 200, dtype=torch.uint8)
    label = torch.full((1, 10, 10), 3, dtype=torch.uint8)
    aug = BatchAugment(crop_size=(30, 30), scale_range=(1.0, 1.0), flip=False)
    img, lab = aug(image, label, torch.tensor([[10, 10]]), step_generator(0, 0))
    assert (lab == 255).sum() == 30 * 30 - 100 and (lab == 3).sum() == 100
    assert torch.allclose(img[0, :, :10, :10], torch.full((3, 10, 10), 200.0), atol=1e-3)
    assert (img[0, :, 10:] == 0).all() and (img[0, :, :, 10:] == 0).all()


def test_same_seed_same_step_same_batch_and_other_steps_differ():
    _, batch = _frames([(40, 60)] * 4)
    aug = BatchAugment(crop_size=(16, 24))

    def run(seed, step, rank=0):
        g = step_generator(seed, step, rank)
        x, y = aug(batch["image"], batch["label"], batch["size"], g)
        return photometric_distortion(x, g), y

    a, b = run(0, 5), run(0, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for other in (run(0, 6), run(1, 5), run(0, 5, rank=1)):
        assert not torch.equal(a[0], other[0])


def test_photometric_distortion_keeps_range_and_normalize_matches_imagenet():
    x = torch.rand(16, 3, 8, 8) * 255
    out = photometric_distortion(x.clone(), step_generator(0, 0))
    assert out.min() >= 0 and out.max() <= 255 and not torch.equal(out, x)
    n = normalize(torch.full((1, 3, 2, 2), 123.675))
    assert n[0, 0].abs().max() < 1e-6  # the ImageNet red mean maps to 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_gpu_draws_what_the_cpu_draws():
    _, batch = _frames([(40, 60)] * 4)
    aug = BatchAugment(crop_size=(16, 24))
    cpu = aug(batch["image"], batch["label"], batch["size"], step_generator(0, 1))
    gpu = aug(batch["image"].cuda(), batch["label"].cuda(), batch["size"], step_generator(0, 1))
    assert torch.equal(cpu[1], gpu[1].cpu()) and (cpu[0] - gpu[0].cpu()).abs().max() < 1e-3
