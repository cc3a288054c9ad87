"""Virtual KITTI 2: RGB colour masks mapped to class indices through each scene's colors.txt.

Layout (one folder per scene and rendering variation):

    {root}/Scene01/clone/colors.txt                       "Category r g b" then "Terrain 210 0 200"
    {root}/Scene01/clone/frames/rgb/Camera_0/rgb_00000.jpg
    {root}/Scene01/clone/frames/classSegmentation/Camera_0/classgt_00000.png

VKITTI2 has no official split. The default here holds one whole scene out for validation
(`val_scenes=("Scene20",)`; train = every other scene), so no frame of a validation scene,
in any variation, is seen in training.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipeline.data.adapter import SourceSample
from pipeline.data.labels import IGNORE_INDEX, get_spec
from pipeline.data.pngio import read_png
from pipeline.errors import ConfigError, DataError

UNDEFINED = "Undefined"  # colors.txt category (0, 0, 0): pixels with no class -> ignore
_RGB_NAME = re.compile(r"^rgb_(\d+)\.jpg$")


def _pack(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) int32 colour code 0xRRGGBB."""
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


class VKitti2Adapter:
    """Samples of `train` / `val` under a VKITTI2 root; key `{scene}_{variation}_{camera}_{frame:05d}`.

    `val_scenes`: scenes held out as `val`; `variations`: e.g. ("clone",), None for all found;
    `cameras`: the stereo cameras to use, None for all found (Camera_1 nearly repeats Camera_0).
    """

    splits = ("train", "val")

    def __init__(
        self,
        val_scenes: tuple[str, ...] = ("Scene20",),
        variations: tuple[str, ...] | None = None,
        cameras: tuple[str, ...] | None = ("Camera_0",),
    ) -> None:
        self.spec = get_spec("vkitti2")
        self.val_scenes = tuple(val_scenes)
        self.variations = None if variations is None else tuple(variations)
        self.cameras = None if cameras is None else tuple(cameras)
        self._tables: dict[Path, dict[int, int]] = {}

    def samples(self, root: Path, split: str) -> list[SourceSample]:
        root = Path(root)
        if split not in self.splits:
            raise ConfigError(f"vkitti2: unknown split {split!r}; valid: {', '.join(self.splits)}")
        if not root.is_dir():
            raise DataError(
                f"{root}: no such folder (expected a Virtual KITTI 2 root with Scene01/ ...)"
            )
        scenes = sorted(p.name for p in root.glob("Scene*") if p.is_dir())
        if not scenes:
            raise DataError(f"{root}: no Scene* folders (expected a Virtual KITTI 2 root)")
        wanted = [s for s in scenes if (s in self.val_scenes) == (split == "val")]
        out = []
        for scene in wanted:
            for var_dir in sorted(p for p in (root / scene).iterdir() if (p / "frames").is_dir()):
                if self.variations is not None and var_dir.name not in self.variations:
                    continue
                out.extend(self._variation_samples(scene, var_dir))
        if not out:
            raise DataError(
                f"{root}: split {split!r} has no frames (scenes {wanted or 'none'}, val_scenes "
                f"{list(self.val_scenes)}, variations {self.variations or 'all'}, cameras {self.cameras or 'all'})"
            )
        return sorted(out, key=lambda s: s.key)

    def _variation_samples(self, scene: str, var_dir: Path) -> list[SourceSample]:
        colors = var_dir / "colors.txt"
        if not colors.is_file():
            raise DataError(f"{colors}: missing class colour table for {var_dir}")
        out = []
        for cam_dir in sorted(
            p for p in (var_dir / "frames" / "rgb").glob("Camera_*") if p.is_dir()
        ):
            camera = cam_dir.name
            if self.cameras is not None and camera not in self.cameras:
                continue
            for image in sorted(cam_dir.glob("rgb_*.jpg")):
                m = _RGB_NAME.match(image.name)
                if m is None:
                    continue
                frame = int(m.group(1))
                label = (
                    var_dir / "frames" / "classSegmentation" / camera / f"classgt_{m.group(1)}.png"
                )
                if not label.is_file():
                    raise DataError(f"{label}: missing class mask for image {image}")
                meta = {
                    "scene": scene,
                    "variation": var_dir.name,
                    "camera": camera,
                    "colors": str(colors),
                }
                key = f"{scene}_{var_dir.name}_{camera}_{frame:05d}"
                out.append(SourceSample(key=key, image=image, label=label, meta=meta))
        return out

    def color_table(self, colors: Path) -> dict[int, int]:
        """colors.txt -> {0xRRGGBB: class index in the order of the spec}; Undefined -> 255."""
        colors = Path(colors)
        if colors in self._tables:
            return self._tables[colors]
        try:
            lines = colors.read_text().splitlines()
        except OSError as exc:
            raise DataError(f"{colors}: cannot read class colour table ({exc})") from None
        index = {name.lower(): i for i, name in enumerate(self.spec.class_names)}
        table: dict[int, int] = {}
        for n, line in enumerate(lines, 1):
            parts = line.split()
            if not parts or (n == 1 and parts[0].lower() == "category"):
                continue
            try:
                name, (r, g, b) = " ".join(parts[:-3]), (int(v) for v in parts[-3:])
            except ValueError:
                raise DataError(f"{colors}:{n}: expected 'Category r g b', got {line!r}") from None
            if not name or not all(0 <= v <= 255 for v in (r, g, b)):
                raise DataError(
                    f"{colors}:{n}: expected 'Category r g b' with 0..255, got {line!r}"
                )
            if name.lower() == UNDEFINED.lower():
                cls = IGNORE_INDEX
            elif name.lower() in index:
                cls = index[name.lower()]
            else:
                raise DataError(
                    f"{colors}:{n}: category {name!r} is not a vkitti2 class "
                    f"({', '.join(self.spec.class_names)}, {UNDEFINED})"
                )
            table[(r << 16) | (g << 8) | b] = cls
        if not table:
            raise DataError(f"{colors}: class colour table lists no categories")
        self._tables[colors] = table
        return table

    def read_label(self, sample: SourceSample) -> np.ndarray:
        assert sample.label is not None
        colors = sample.meta.get("colors") or sample.label.parents[3] / "colors.txt"
        table = self.color_table(Path(colors))
        rgb = read_png(sample.label, mode="RGB")
        codes, inverse = np.unique(_pack(rgb), return_inverse=True)  # few colours, many pixels
        lut = np.empty(codes.size, dtype=np.uint8)
        for i, code in enumerate(codes.tolist()):
            if code not in table:
                color = ((code >> 16) & 255, (code >> 8) & 255, code & 255)
                raise DataError(f"{sample.label}: colour {color} is not in {colors}")
            lut[i] = table[code]
        return lut[inverse.reshape(rgb.shape[:2])]
