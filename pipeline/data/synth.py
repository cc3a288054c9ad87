"""Synthetic Cityscapes-format street scenes: the bundled demo data and the test data.

`generate_cityscapes` writes a complete Cityscapes root (leftImg8bit/ + gtFine/ labelIds and
instanceIds) at any size, so every stage runs end to end with no download. The scenes are a
street in perspective: a ground plane (road, sidewalk, parking, terrain) seen from a camera
1 unit (its height) above it, vertical planes along the street (facades, hedges, walls,
fences, guard rails) and upright objects standing on the ground (cars, trucks, buses, people,
riders on bicycles / motorcycles, poles with signs and lights, trees, bins). Each class has a
colour jittered per scene, a texture and a lighting gradient, so a model must learn shape and
context as well as colour; the void ids (ego vehicle, rectification border, out of roi, static)
and ignored classes (ground, parking, guard rail) exercise the labelId -> trainId conversion.

Geometry, in camera-height units: a ground point at lateral offset X and depth Z is drawn at
row `horizon + d` and column `vanish_x + X * d`, with `d = height / Z` pixels; a point Y units
above it is `Y * d` pixels higher. Sizes are therefore in proportion to the frame height.

Deterministic: frame `index` of `split` draws from `numpy.random.default_rng((seed, crc32(split),
index))`, so the same seed and arguments give byte-identical PNGs (same numpy / Pillow
versions), however many worker processes generate them and in whatever order.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import zlib
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import name2label
from PIL import Image, ImageDraw

from pipeline.data.labels import get_spec
from pipeline.data.pngio import encode_png
from pipeline.errors import ConfigError, DataError

# Invented city names per split: obviously synthetic, no underscores (they separate key parts).
CITIES = {
    "train": ("synthtown", "pixelburg", "rastervale"),
    "val": ("mockford", "fakestadt"),
    "test": ("dummyhaven",),
}
SUMMARY_FILE = "synth.json"  # marks a synthetic root; `overwrite` replaces only such roots
FRAME = 19  # Cityscapes annotates frame 19 of each 30-frame snippet

_ID = {name: lab.id for name, lab in name2label.items()}
_HAS_INSTANCES = {lab.id for lab in name2label.values() if lab.hasInstances and lab.id >= 0}
_SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------
# Drawing


def _frac(a: np.ndarray) -> np.ndarray:
    return a - np.floor(a)


def _lowfreq(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """(h, w) float32 smooth noise, std ~1: a coarse random grid upsampled bilinearly."""
    gh, gw = max(2, round(h / cell) + 2), max(2, round(w / cell) + 2)
    grid = Image.fromarray(rng.standard_normal((gh, gw), dtype=np.float32))
    return np.asarray(grid.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


class _Scene:
    """One frame: a map of appearance slots, each with a colour, a label id and an instance id.

    Layers are painted back to front into `slot` (numpy masks for the ground and the planes,
    PIL polygons for objects); `render` turns slots into the image, labelIds and instanceIds.
    """

    def __init__(self, rng: np.random.Generator, height: int, width: int) -> None:
        self.rng, self.h, self.w = rng, height, width
        self.colors: list[tuple[float, float, float]] = []
        self.vgrads: list[tuple[float, float, float]] = []
        self.label_ids: list[int] = []
        self.instance_ids: list[int] = []
        self.textures: list[float] = []
        self.counts: dict[int, int] = {}
        self.slot = np.zeros((height, width), dtype=np.int32)
        self.ys = (np.arange(height, dtype=np.float32) + 0.5)[:, None]  # (H, 1)
        self.xs = (np.arange(width, dtype=np.float32) + 0.5)[None, :]  # (1, W)

    # -- appearance ------------------------------------------------------------------------
    def jitter(self, rgb, sd: float = 0.1, shift: float = 8.0) -> tuple[float, float, float]:
        """A per-scene variant of a base colour: brightness, per-channel gain and offset."""
        r = self.rng
        gain = math.exp(r.normal(0.0, sd))
        return tuple(
            float(
                np.clip(c * gain * math.exp(r.normal(0.0, sd / 2)) + r.normal(0.0, shift), 0, 255)
            )
            for c in rgb
        )

    def look(
        self, label: str, rgb, tex: float = 0.08, inst: int | None = None, vgrad=(0, 0, 0)
    ) -> int:
        """A new slot: `label` (Cityscapes name), colour, texture strength, instance id."""
        lid = _ID[label]
        self.colors.append(tuple(float(c) for c in rgb))
        self.vgrads.append(tuple(float(v) for v in vgrad))
        self.label_ids.append(lid)
        self.instance_ids.append(lid if inst is None else inst)
        self.textures.append(tex)
        return len(self.colors) - 1

    def new_instance(self, label: str) -> int:
        """Cityscapes instance id `labelId * 1000 + n`, n counting from 0 per class."""
        lid = _ID[label]
        n = self.counts.get(lid, 0)
        self.counts[lid] = n + 1
        return lid * 1000 + n

    def fill(self, mask: np.ndarray, slot, rows: slice = slice(None)) -> None:
        """Paint `slot` (an int, or per-pixel slots broadcast to `mask`) where `mask` holds."""
        if isinstance(slot, np.ndarray):
            slot = np.broadcast_to(slot, mask.shape)[mask]
        self.slot[rows][mask] = slot

    # -- output ----------------------------------------------------------------------------
    def render(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r, h, w = self.rng, self.h, self.w
        slot = self.slot
        colors = np.asarray(self.colors, dtype=np.float32)
        vgrads = np.asarray(self.vgrads, dtype=np.float32)
        textures = np.asarray(self.textures, dtype=np.float32)
        yn = self.ys / h - 0.5  # (H, 1)
        xn = self.xs / w - 0.5  # (1, W)
        # Lighting: exposure times a linear gradient (sun side, vignetting-like falloff).
        light = r.uniform(0.8, 1.15) * (1 + r.uniform(-0.3, 0.3) * xn + r.uniform(-0.2, 0.2) * yn)
        texture = 0.6 * _lowfreq(r, h, w, max(4.0, h / 12)) + 0.4 * _lowfreq(
            r, h, w, max(2.0, h / 64)
        )
        shade = light * (1 + textures[slot] * texture)  # (H, W)
        img = colors[slot] + vgrads[slot] * yn[:, :, None]  # (H, W, 3)
        img *= shade[:, :, None]
        img += (r.uniform(2.0, 7.0) * r.standard_normal((h, w), dtype=np.float32))[:, :, None]
        image = np.clip(img, 0, 255).astype(np.uint8)
        label = np.asarray(self.label_ids, dtype=np.uint8)[slot]
        instance = np.asarray(self.instance_ids, dtype=np.uint16)[slot]
        return image, label, instance


def _car_palette(r: np.random.Generator):
    palette = [(200, 200, 205), (30, 30, 35), (150, 20, 25), (25, 50, 120), (120, 125, 130),
               (235, 235, 230), (60, 90, 60), (170, 140, 60), (80, 80, 90)]  # fmt: skip
    return palette[int(r.integers(len(palette)))]


def render_scene(rng: np.random.Generator, height: int, width: int):
    """Draw one street scene: (image (H, W, 3) uint8, labelIds (H, W) uint8, instanceIds uint16)."""
    s = _Scene(rng, height, width)
    r, H, W = rng, float(height), float(width)
    ys, xs = s.ys, s.xs
    hor = H * r.uniform(0.36, 0.46)  # horizon row
    vx = W / 2 + H * r.uniform(-0.25, 0.25)  # vanishing point column
    yrel = ys - hor  # (H, 1) rows below the horizon

    # ---- sky and a distant skyline ------------------------------------------------------
    if r.random() < 0.7:  # clear: deep blue at the top, paler at the horizon
        sky = s.look("sky", s.jitter((125, 170, 220), 0.08), tex=0.12, vgrad=(90, 60, 20))
    else:  # overcast
        sky = s.look("sky", s.jitter((190, 195, 205), 0.06), tex=0.2, vgrad=(30, 30, 25))
    s.slot[:] = sky
    x0 = 0.0
    while x0 < W:  # piecewise-constant skyline of far buildings and tree tops
        x1 = x0 + W * r.uniform(0.03, 0.15)
        name = "building" if r.random() < 0.7 else "vegetation"
        rgb = (150, 150, 155) if name == "building" else (80, 110, 70)
        top = hor - H * r.uniform(0.01, 0.1)
        cols = (xs >= x0) & (xs < x1)
        s.fill((ys > top) & cols, s.look(name, s.jitter(rgb, 0.1), tex=0.1))
        x0 = x1

    # ---- the ground plane ---------------------------------------------------------------
    g0 = int(math.ceil(hor))  # first row below the horizon
    gy = slice(g0, height)
    d = np.maximum(ys[g0:] - hor, 1e-3)  # (Hg, 1) pixels per unit at that row
    Z = H / d  # (Hg, 1) depth
    X = (xs - vx) / d  # (Hg, W) lateral offset
    road_l, road_r = -r.uniform(1.8, 3.4), r.uniform(1.6, 3.4)
    road_rgb = s.jitter((95, 92, 98), 0.1)
    s.fill(np.ones_like(X, dtype=bool), s.look("road", road_rgb, tex=0.08), gy)
    side_kind = {}
    for side in (-1, 1):
        side_kind[side] = "buildings" if r.random() < 0.6 else "park"
    if side_kind[-1] == side_kind[1] == "park":
        side_kind[int(r.choice([-1, 1]))] = "buildings"
    sidewalk_rgb = s.jitter((160, 150, 150), 0.1)
    walk_out, plane = {}, {}
    for side, edge in ((-1, road_l), (1, road_r)):
        out = edge + side * r.uniform(1.2, 2.6)
        walk_out[side] = out
        lateral = side * X  # > 0 towards this side
        walk = (lateral >= side * edge) & (lateral < side * out)
        s.fill(walk, s.look("sidewalk", sidewalk_rgb, tex=0.07), gy)
        tiles = walk & (Z < 30) & ((_frac(Z / 1.2) < 0.07) | (_frac(X / 1.2) < 0.07))
        s.fill(tiles, s.look("sidewalk", [c * 0.8 for c in sidewalk_rgb], tex=0.05), gy)
        curb = (lateral >= side * edge) & (lateral < side * edge + 0.15)
        s.fill(curb, s.look("sidewalk", [min(255, c * 1.2) for c in sidewalk_rgb], tex=0.05), gy)
        if side_kind[side] == "park":
            plane[side] = out + side * r.uniform(1.5, 5.0)
            s.fill(
                lateral >= side * out,
                s.look("terrain", s.jitter((135, 160, 75), 0.12), tex=0.3),
                gy,
            )
            if r.random() < 0.5:  # a dirt path: "ground", void in Cityscapes
                z0 = r.uniform(5, 25)
                path = (lateral >= side * out) & (Z > z0) & (Z < z0 + r.uniform(3, 8))
                s.fill(path, s.look("ground", s.jitter((125, 105, 85), 0.1), tex=0.2), gy)
        else:
            plane[side] = out
            s.fill(lateral >= side * out, s.look("sidewalk", sidewalk_rgb, tex=0.07), gy)
    # Parking strip along one curb (ignored in evaluation), lane markings on the road.
    parking = None
    if r.random() < 0.5:
        side = int(r.choice([-1, 1]))
        edge = road_l if side < 0 else road_r
        z0 = r.uniform(4, 20)
        parking = (side, edge, z0, z0 + r.uniform(10, 30))
        strip = (
            (side * X <= side * edge) & (side * X > side * edge - 1.3) & (Z > z0) & (Z < parking[3])
        )
        s.fill(strip, s.look("parking", s.jitter((125, 115, 120), 0.1), tex=0.1), gy)
    mark = s.look("road", s.jitter((225, 225, 215), 0.05), tex=0.05)
    mid = (road_l + road_r) / 2 + r.uniform(-0.4, 0.4)
    s.fill((np.abs(X - mid) < 0.07) & (_frac(Z / 7.0) < 0.45) & (Z < 120), mark, gy)
    for edge, side in ((road_l, -1), (road_r, 1)):
        if parking is None or parking[0] != side:
            s.fill((np.abs(X - (edge - side * 0.35)) < 0.05) & (Z < 120), mark, gy)

    # ---- vertical planes along the street ------------------------------------------------
    def columns(side: int, lateral: float):
        """Per column on `side`: pixels per unit d (W,) and depth Z, for a plane at `lateral`."""
        dc = (xs[0] - vx) / lateral
        on = dc > 0.5
        dc = np.where(on, dc, 1.0)
        return dc, H / dc, on

    def plane_mask(dc, on, low, high):
        """Pixels of a vertical plane between heights `low` and `high` (units, (W,) or scalar)."""
        return (yrel < dc * (1 - low)) & (yrel > dc * (1 - high)) & on

    def facade(side: int, lateral: float, dim: float) -> None:
        """Buildings side by side along a plane; per-building values are looked up per column."""
        dc, zc, on = columns(side, lateral)
        n = 64
        seg = np.searchsorted(np.cumsum(r.uniform(6, 22, size=n)), zc).clip(0, n - 1)  # (W,)
        tops = r.uniform(2.5, 9.0, size=n)[seg]
        choices = [(175, 160, 135), (150, 90, 70), (140, 140, 145), (205, 195, 170), (110, 100, 95)]
        walls, glass = np.zeros(n, np.int32), np.zeros(n, np.int32)
        for b in np.unique(seg[on]):
            rgb = s.jitter(choices[int(r.integers(len(choices)))], 0.1)
            walls[b] = s.look("building", [c * dim for c in rgb], tex=0.12)
            glass[b] = s.look("building", [c * dim for c in s.jitter((60, 70, 85), 0.15)], tex=0.15)
        wall = plane_mask(dc, on, 0.0, tops)
        s.fill(wall, walls[seg])
        # Windows on a facade grid: columns by depth, rows by height above the ground.
        wz, wh = r.uniform(2.0, 3.5, size=n)[seg], r.uniform(2.2, 3.0, size=n)[seg]
        fz = _frac(zc / wz)
        hgt = 1 - yrel / dc  # (H, W) height above the ground on this plane
        fh = _frac(hgt / wh)
        win = wall & ((fz > 0.3) & (fz < 0.75))
        win &= (fh > 0.35) & (fh < 0.8) & (hgt > 1.3) & (hgt < tops - 0.4)
        s.fill(win, glass[seg])

    for side in (-1, 1):
        dim = r.uniform(0.65, 1.0)
        if side_kind[side] == "buildings":
            facade(side, plane[side], dim)
        else:
            facade(side, plane[side] + side * r.uniform(4, 10), dim)  # buildings behind the park
            dc, zc, on = columns(side, plane[side])
            trees_z = np.cumsum(r.uniform(3, 8, size=48))
            radius = r.uniform(1.5, 3.5, size=48)
            crown = r.uniform(2.5, 6.5, size=48)
            bump = np.clip(1 - ((zc[None, :] - trees_z[:, None]) / radius[:, None]) ** 2, 0, None)
            top = np.maximum(r.uniform(0.8, 1.8), (crown[:, None] * np.sqrt(bump)).max(axis=0))
            veg = s.jitter((70, 115, 45), 0.12)
            s.fill(plane_mask(dc, on, 0.0, top), s.look("vegetation", veg, tex=0.45))
        # A low wall or fence along the inner edge of the plane, or a guard rail by the park.
        wall_at = walk_out[side] - side * 0.05
        dc, zc, on = columns(side, wall_at)
        z0 = r.uniform(3, 20)
        span = on & (zc > z0) & (zc < z0 + r.uniform(8, 40))
        kind = r.choice(
            ["wall", "fence", "guard rail"] if side_kind[side] == "park" else ["wall", "fence"]
        )
        if kind == "wall":
            rgb = s.jitter((175, 170, 155), 0.1)
            s.fill(plane_mask(dc, span, 0.0, r.uniform(0.8, 2.0)), s.look("wall", rgb, tex=0.15))
        elif kind == "fence":
            rgb = s.jitter((125, 105, 85) if r.random() < 0.5 else (110, 120, 110), 0.1)
            m = plane_mask(dc, span, 0.0, r.uniform(0.8, 1.5))
            s.fill(m, s.look("fence", rgb, tex=0.1))
            bars = m & (_frac(zc / 0.6) < 0.3)
            s.fill(bars, s.look("fence", [c * 0.6 for c in rgb], tex=0.1))
        else:
            rgb = s.jitter((185, 185, 190), 0.05)
            s.fill(plane_mask(dc, span, 0.35, 0.7), s.look("guard rail", rgb, tex=0.05))

    # ---- objects standing on the ground, painted far to near -----------------------------
    canvas = Image.fromarray(s.slot)
    draw = ImageDraw.Draw(canvas)
    objects: list[tuple[float, int, Callable[[], None]]] = []

    def at(lateral: float, depth: float):
        """Image position of a ground point and its scale (pixels per unit)."""
        px = H / depth
        return vx + lateral * px, hor + px, px

    def box(x0, y0, x1, y1, slot):
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=slot)

    def vehicle(lateral, depth, kind):
        cx, yb, u = at(lateral, depth)
        label = {"car": "car", "truck": "truck", "bus": "bus"}[kind]
        inst = s.new_instance(label)
        shadow = s.look("road", [c * 0.45 for c in road_rgb], tex=0.05)
        half, tall = {"car": (0.78, 1.25), "truck": (1.1, 2.9), "bus": (1.2, 2.8)}[kind]
        draw.ellipse(
            [cx - half * 1.1 * u, yb - 0.1 * u, cx + half * 1.1 * u, yb + 0.08 * u], fill=shadow
        )
        tyre = s.look(label, (25, 25, 28), 0.05, inst)
        for sx in (-1, 1):
            box(cx + sx * (half - 0.05) * u, yb - 0.32 * u, cx + sx * (half - 0.3) * u, yb, tyre)
        body_rgb = s.jitter(_car_palette(r) if kind == "car" else (210, 205, 190), 0.08)
        body = s.look(label, body_rgb, 0.06, inst)
        glass = s.look(label, s.jitter((45, 55, 70), 0.1), 0.1, inst)
        if kind == "car":
            box(cx - half * u, yb - 0.75 * u, cx + half * u, yb - 0.15 * u, body)
            cabin = [(cx - 0.7 * u, yb - 0.75 * u), (cx - 0.55 * u, yb - tall * u),
                     (cx + 0.55 * u, yb - tall * u), (cx + 0.7 * u, yb - 0.75 * u)]  # fmt: skip
            draw.polygon(cabin, fill=body)
            win = [(cx - 0.6 * u, yb - 0.8 * u), (cx - 0.5 * u, yb - (tall - 0.07) * u),
                   (cx + 0.5 * u, yb - (tall - 0.07) * u), (cx + 0.6 * u, yb - 0.8 * u)]  # fmt: skip
            draw.polygon(win, fill=glass)
        else:
            box(cx - half * u, yb - tall * u, cx + half * u, yb - 0.15 * u, body)
            box(
                cx - (half - 0.1) * u,
                yb - (tall - 0.15) * u,
                cx + (half - 0.1) * u,
                yb - (tall - 0.8) * u,
                glass,
            )
            if kind == "bus":
                band = s.look(label, s.jitter((200, 40, 40), 0.1), 0.06, inst)
                box(cx - half * u, yb - 0.9 * u, cx + half * u, yb - 0.6 * u, band)
        lamp = s.look(label, (200, 30, 30), 0.05, inst)
        for sx in (-1, 1):
            box(
                cx + sx * (half - 0.05) * u,
                yb - 0.65 * u,
                cx + sx * (half - 0.25) * u,
                yb - 0.5 * u,
                lamp,
            )
        plate = s.look(label, (225, 225, 215), 0.03, inst)  # license plate: drawn as its car
        box(cx - 0.22 * u, yb - 0.45 * u, cx + 0.22 * u, yb - 0.33 * u, plate)

    def person(lateral, depth, label="person", lift=0.0, inst=None):
        cx, yb, u = at(lateral, depth)
        yb -= lift * u
        inst = s.new_instance(label) if inst is None else inst
        tall = r.uniform(1.25, 1.55)
        skin = s.look(
            label,
            s.jitter(((225, 190, 160), (160, 110, 80), (95, 65, 45))[int(r.integers(3))], 0.05),
            0.05,
            inst,
        )
        shirt = s.look(label, s.jitter(tuple(r.uniform(20, 230, size=3)), 0.1), 0.1, inst)
        pants = s.look(label, s.jitter(tuple(r.uniform(20, 120, size=3)), 0.1), 0.1, inst)
        if lift == 0:  # legs, standing
            for sx in (-1, 1):
                box(cx + sx * 0.02 * u, yb, cx + sx * 0.13 * u, yb - 0.48 * tall * u, pants)
        else:
            box(cx - 0.13 * u, yb - 0.35 * tall * u, cx + 0.13 * u, yb - 0.48 * tall * u, pants)
        box(cx - 0.16 * u, yb - 0.48 * tall * u, cx + 0.16 * u, yb - 0.84 * tall * u, shirt)
        head = 0.085 * tall * u
        draw.ellipse(
            [cx - head, yb - 0.84 * tall * u - 2 * head, cx + head, yb - 0.84 * tall * u], fill=skin
        )

    def two_wheeler(lateral, depth, kind):
        cx, yb, u = at(lateral, depth)
        label = "bicycle" if kind == "bicycle" else "motorcycle"
        inst = s.new_instance(label)
        frame = s.look(label, s.jitter(tuple(r.uniform(20, 200, size=3)), 0.1), 0.05, inst)
        tyre = s.look(label, (25, 25, 25), 0.05, inst)
        # Seen from behind: a tall narrow wheel, a handlebar, (motorcycle) a body.
        box(cx - 0.05 * u, yb, cx + 0.05 * u, yb - 0.65 * u, tyre)
        box(cx - 0.3 * u, yb - 0.9 * u, cx + 0.3 * u, yb - 0.95 * u, frame)
        if kind == "motorcycle":
            box(cx - 0.22 * u, yb - 0.3 * u, cx + 0.22 * u, yb - 0.75 * u, frame)
        else:
            box(cx - 0.03 * u, yb - 0.5 * u, cx + 0.03 * u, yb - 0.95 * u, frame)
        person(lateral, depth, "rider", lift=0.55)

    def pole(lateral, depth, attach):
        cx, yb, u = at(lateral, depth)
        metal = s.look("pole", s.jitter((125, 125, 130), 0.08), 0.06)
        tall = r.uniform(3.5, 6.0)
        box(cx - 0.05 * u, yb, cx + 0.05 * u, yb - tall * u, metal)
        if attach == "sign":
            sy = yb - r.uniform(2.0, 2.8) * u
            size = r.uniform(0.22, 0.32) * u
            face = s.look(
                "traffic sign",
                s.jitter(
                    ((230, 230, 230), (40, 80, 190), (235, 200, 30))[int(r.integers(3))], 0.08
                ),
                0.05,
            )
            rim = s.look("traffic sign", s.jitter((200, 30, 30), 0.08), 0.05)
            shape = int(r.integers(3))
            if shape == 0:
                draw.ellipse([cx - size, sy - size, cx + size, sy + size], fill=rim)
                draw.ellipse(
                    [cx - 0.7 * size, sy - 0.7 * size, cx + 0.7 * size, sy + 0.7 * size], fill=face
                )
            elif shape == 1:
                draw.polygon(
                    [(cx - size, sy + 0.8 * size), (cx + size, sy + 0.8 * size), (cx, sy - size)],
                    fill=rim,
                )
                draw.polygon(
                    [
                        (cx - 0.6 * size, sy + 0.55 * size),
                        (cx + 0.6 * size, sy + 0.55 * size),
                        (cx, sy - 0.5 * size),
                    ],
                    fill=face,
                )
            else:
                box(cx - size, sy - 0.8 * size, cx + size, sy + 0.8 * size, face)
        elif attach == "light":
            ty = yb - min(tall, r.uniform(2.4, 3.5)) * u
            body = s.look("traffic light", s.jitter((45, 45, 40), 0.1), 0.05)
            box(cx - 0.16 * u, ty, cx + 0.16 * u, ty + 0.85 * u, body)
            lit = int(r.integers(3))
            for k, rgb in enumerate(((230, 40, 30), (235, 170, 30), (40, 210, 90))):
                lamp = s.look("traffic light", rgb if k == lit else [c * 0.3 for c in rgb], 0.03)
                ly = ty + (0.15 + 0.27 * k) * u
                draw.ellipse(
                    [cx - 0.09 * u, ly - 0.09 * u, cx + 0.09 * u, ly + 0.09 * u], fill=lamp
                )
        else:  # street lamp: an arm over the road, its head is part of the pole
            toward = -1 if lateral > 0 else 1
            box(cx, yb - tall * u, cx + toward * 1.2 * u, yb - (tall - 0.08) * u, metal)
            box(
                cx + toward * 1.0 * u,
                yb - tall * u,
                cx + toward * 1.35 * u,
                yb - (tall - 0.15) * u,
                metal,
            )

    def tree(lateral, depth):
        cx, yb, u = at(lateral, depth)
        pit = s.look("terrain", s.jitter((120, 100, 60), 0.1), 0.3)
        draw.ellipse([cx - 0.5 * u, yb - 0.08 * u, cx + 0.5 * u, yb + 0.08 * u], fill=pit)
        leaves = s.look("vegetation", s.jitter((60, 105, 40), 0.12), 0.5)
        bark = s.look("vegetation", s.jitter((85, 65, 50), 0.1), 0.2)
        tall, rad = r.uniform(2.5, 4.0), r.uniform(0.9, 1.6)
        box(cx - 0.08 * u, yb, cx + 0.08 * u, yb - tall * u, bark)
        draw.ellipse(
            [cx - rad * u, yb - (tall + rad) * u, cx + rad * u, yb - (tall - rad * 0.8) * u],
            fill=leaves,
        )

    def bin_(lateral, depth):  # a rubbish bin: "static", void in Cityscapes
        cx, yb, u = at(lateral, depth)
        box(
            cx - 0.2 * u,
            yb,
            cx + 0.2 * u,
            yb - 0.7 * u,
            s.look("static", s.jitter((60, 80, 60), 0.2), 0.1),
        )

    def log_depth(lo: float, hi: float) -> float:
        return float(math.exp(r.uniform(math.log(lo), math.log(hi))))

    order = iter(range(10**6))
    attachments = []
    for side, edge in ((-1, road_l), (1, road_r)):
        z = r.uniform(3, 8)
        while z < 70:
            attach = str(r.choice(["sign", "light", "lamp"], p=[0.4, 0.3, 0.3]))
            attachments.append(attach)
            lat = edge + side * r.uniform(0.3, 0.6)
            objects.append((z, next(order), lambda a=lat, b=z, c=attach: pole(a, b, c)))
            z += r.uniform(8, 20)
        if side_kind[side] == "buildings":
            z = r.uniform(4, 12)
            while z < 60:
                lat = walk_out[side] - side * r.uniform(0.5, 0.8)
                objects.append((z, next(order), lambda a=lat, b=z: tree(a, b)))
                z += r.uniform(8, 25)
        if r.random() < 0.5:
            lat, z = walk_out[side] - side * 0.4, log_depth(4, 40)
            objects.append((z, next(order), lambda a=lat, b=z: bin_(a, b)))
    for need in ("sign", "light"):  # every frame shows both kinds
        if need not in attachments:
            side = int(r.choice([-1, 1]))
            lat = (road_l if side < 0 else road_r) + side * 0.45
            z = r.uniform(6, 25)
            objects.append((z, next(order), lambda a=lat, b=z, c=need: pole(a, b, c)))
    for _ in range(1 + int(r.poisson(4))):  # people on the sidewalks
        side = int(r.choice([-1, 1]))
        edge = road_l if side < 0 else road_r
        lat = edge + side * r.uniform(0.3, 0.9) * abs(walk_out[side] - edge)
        z = log_depth(3.5, 45)
        objects.append((z, next(order), lambda a=lat, b=z: person(a, b)))
    for _ in range(1 + int(r.poisson(3))):  # cars in the lanes
        lat, z = r.uniform(road_l + 0.9, road_r - 0.9), log_depth(4, 80)
        objects.append((z, next(order), lambda a=lat, b=z: vehicle(a, b, "car")))
    if parking is not None:
        side, edge, z0, z1 = parking
        z = z0 + 3
        while z < z1:
            if r.random() < 0.7:
                lat = edge - side * 0.75
                objects.append((z, next(order), lambda a=lat, b=z: vehicle(a, b, "car")))
            z += r.uniform(5, 7)
    for kind, p in (("truck", 0.35), ("bus", 0.3)):
        if r.random() < p:
            lat, z = r.uniform(road_l + 1.3, road_r - 1.3), log_depth(8, 60)
            objects.append((z, next(order), lambda a=lat, b=z, c=kind: vehicle(a, b, c)))
    if r.random() < 0.6:
        side = int(r.choice([-1, 1]))
        lat = (road_l if side < 0 else road_r) - side * 0.6
        z, kind = log_depth(5, 40), str(r.choice(["bicycle", "motorcycle"]))
        objects.append((z, next(order), lambda a=lat, b=z, c=kind: two_wheeler(a, b, c)))
    for _, _, paint in sorted(objects, key=lambda o: (-o[0], o[1])):
        paint()
    s.slot = np.array(canvas, dtype=np.int32)

    # ---- the camera: ego vehicle, out of roi, rectification border (all void) -------------
    hood = H * r.uniform(0.08, 0.16) * (1 - 0.6 * ((xs - W / 2) / (W / 2)) ** 2)  # (1, W)
    ego = s.look("ego vehicle", s.jitter((45, 45, 50), 0.2), tex=0.1, vgrad=(60, 60, 60))
    s.fill(ys > H - hood, ego)
    corner = W * r.uniform(0.03, 0.07)
    roi = (ys > H - H * 0.04) & ((xs < corner) | (xs > W - corner))
    s.fill(roi, s.look("out of roi", (20, 20, 20), tex=0.0))
    border = max(1.0, W * r.uniform(0.003, 0.01)) * (1 + 2 * np.abs(ys / H - 0.5))  # (H, 1)
    s.fill((xs < border) | (xs > W - border), s.look("rectification border", (0, 0, 0), tex=0.0))
    return s.render()


# --------------------------------------------------------------------------------------------
# Writing a root


@dataclass(frozen=True)
class _Frame:
    split: str
    index: int
    city: str
    seq: int

    @property
    def key(self) -> str:
        return f"{self.city}_{self.seq:06d}_{FRAME:06d}"


def _cities(split: str) -> tuple[str, ...]:
    return CITIES.get(split, ("synth" + split.replace("_", ""),))


def _frames(splits: dict[str, int]) -> list[_Frame]:
    out = []
    for split, count in splits.items():
        cities = _cities(split)
        for i in range(count):
            out.append(_Frame(split, i, cities[i % len(cities)], i // len(cities)))
    return out


def frame_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one frame: independent of every other frame and of worker count."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def _write_frame(root: Path, frame: _Frame, height: int, width: int, seed: int) -> list[int]:
    """Render and write one frame's three PNGs; returns the label ids it contains."""
    image, label, instance = render_scene(frame_rng(seed, frame.split, frame.index), height, width)
    img_dir = root / "leftImg8bit" / frame.split / frame.city
    gt_dir = root / "gtFine" / frame.split / frame.city
    (img_dir / f"{frame.key}_leftImg8bit.png").write_bytes(encode_png(image))
    (gt_dir / f"{frame.key}_gtFine_labelIds.png").write_bytes(encode_png(label))
    (gt_dir / f"{frame.key}_gtFine_instanceIds.png").write_bytes(encode_png(instance))
    return np.flatnonzero(np.bincount(label.ravel(), minlength=256)).tolist()


def _validate(splits, height, width, seed, workers) -> None:
    if not isinstance(splits, dict) or not splits:
        raise ConfigError("synth: give at least one split, e.g. {'train': 40, 'val': 10}")
    for split, count in splits.items():
        if not isinstance(split, str) or not _SPLIT_NAME.match(split):
            raise ConfigError(f"synth: split name {split!r} must be lowercase letters, digits, '_'")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ConfigError(
                f"synth: frame count of split {split!r} must be an integer >= 0, got {count!r}"
            )
    if sum(splits.values()) == 0:
        raise ConfigError("synth: every split has 0 frames; ask for at least one")
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 32:
            raise ConfigError(f"synth: {name} must be an integer >= 32, got {value!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"synth: seed must be an integer >= 0, got {seed!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"synth: workers must be >= 0 (0 = all CPU cores), got {workers!r}")


def _check_target(root: Path, overwrite: bool) -> bool:
    """True if `root` exists and must be replaced; DataError if it may not be."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise DataError(f"{root}: exists and is not a folder; choose another output path")
    if not any(root.iterdir()):
        return False
    if not overwrite:
        raise DataError(
            f"{root}: folder exists and is not empty; pass overwrite (--overwrite) to replace it"
        )
    if not (root / SUMMARY_FILE).is_file():
        raise DataError(
            f"{root}: not a synthetic root (no {SUMMARY_FILE}); refusing to overwrite it, delete it yourself"
        )
    return True


def _run(
    tmp: Path, frames: list[_Frame], height, width, seed, workers, progress
) -> dict[str, set[int]]:
    present: dict[str, set[int]] = {}
    total = len(frames)
    if progress:
        progress(0, total)
    if workers == 1 or total == 1:
        for done, frame in enumerate(frames, 1):
            present.setdefault(frame.split, set()).update(
                _write_frame(tmp, frame, height, width, seed)
            )
            if progress:
                progress(done, total)
        return present
    # spawn, not fork: the caller may hold threads (torch, Prefect) that fork would copy badly.
    with ProcessPoolExecutor(
        max_workers=min(workers, total), mp_context=get_context("spawn")
    ) as pool:
        pending = {pool.submit(_write_frame, tmp, f, height, width, seed): f for f in frames}
        done = 0
        while pending:
            finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in finished:
                frame = pending.pop(fut)
                if fut.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise fut.exception()
                present.setdefault(frame.split, set()).update(fut.result())
                done += 1
                if progress:
                    progress(done, total)
    return present


def generate_cityscapes(
    root: Path,
    splits: dict[str, int],
    height: int = 128,
    width: int = 256,
    seed: int = 0,
    workers: int = 1,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> dict:
    """Write a synthetic Cityscapes root with `splits[split]` frames per split.

    Layout: `leftImg8bit/{split}/{city}/{key}_leftImg8bit.png` (RGB) and
    `gtFine/{split}/{city}/{key}_gtFine_{labelIds,instanceIds}.png` with `key` =
    `{city}_{seq:06d}_000019`, plus `synth.json` (the arguments and the classes present).
    Frames are written to a temporary sibling folder that is renamed to `root` at the end, so
    an interrupted run leaves no half-written root. A non-empty `root` raises DataError unless
    `overwrite`, which replaces it only if it is itself a synthetic root.
    `workers`: processes (0 = all CPU cores); the files do not depend on it.
    `progress(done, total)` is called after each frame.
    Returns a summary: frames per split, label ids and evaluated class names present.
    """
    _validate(splits, height, width, seed, workers)
    root = Path(root)
    replace = _check_target(root, overwrite)
    workers = workers or os.cpu_count() or 1
    frames = _frames(splits)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.synth-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for frame in frames:
            (tmp / "leftImg8bit" / frame.split / frame.city).mkdir(parents=True, exist_ok=True)
            (tmp / "gtFine" / frame.split / frame.city).mkdir(parents=True, exist_ok=True)
        present = _run(tmp, frames, height, width, seed, workers, progress)
        summary = _summary(splits, height, width, seed, present)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        _install(tmp, root, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"root": str(root), **summary}


def _summary(splits, height, width, seed, present: dict[str, set[int]]) -> dict:
    spec = get_spec("cityscapes")

    def classes(ids: set[int]) -> list[str]:
        train = sorted({int(spec.label_to_train[i]) for i in ids} - {spec.ignore_index})
        return [spec.class_names[t] for t in train]

    union = set().union(*present.values())
    return {
        "generator": "pipeline.data.synth",
        "height": height,
        "width": width,
        "seed": seed,
        "frames": {split: count for split, count in splits.items()},
        "label_ids": sorted(union),
        "classes": classes(union),
        "classes_per_split": {split: classes(present.get(split, set())) for split in splits},
    }


def _install(tmp: Path, root: Path, replace: bool) -> None:
    """Rename `tmp` to `root`; an old root is moved aside first and deleted last."""
    if not replace:
        try:
            if root.exists():
                root.rmdir()  # checked empty up front
            tmp.rename(root)
        except OSError:
            raise DataError(
                f"{root}: something was written there while generating; not replacing it"
            ) from None
        return
    old = root.parent / f".{root.name}.synth-old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    root.rename(old)
    try:
        tmp.rename(root)
    except BaseException:
        old.rename(root)
        raise
    shutil.rmtree(old, ignore_errors=True)
