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

Reading order: `render_scene` (end of the Drawing section) lists the elements back to front,
one `draw_*` function each. They share a `View` (the camera: horizon, vanishing point, and
from it the `Ground` and any vertical `Plane`), a `Canvas` (the slot map being painted and the
frame's random generator) and, once the ground is drawn, the `Street` layout it chose.

Deterministic: frame `index` of `split` draws from `numpy.random.default_rng((seed, crc32(split),
index))`, so the same seed and arguments give byte-identical PNGs (same numpy / Pillow
versions), however many worker processes generate them and in whatever order.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.atomic import atomic_dir
from pipeline.data.labels import CITYSCAPES_BY_NAME, get_spec
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

_ID = {name: lab.id for name, lab in CITYSCAPES_BY_NAME.items()}
_SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------
# Drawing
#
# `render_scene` calls one function per element of the street, back to front. All of a
# frame's random numbers come from one generator, so the order of the draws is part of the
# output: each function draws its numbers in the order it is written, and moving one draw
# (even a colour jitter before a size) changes every later number and so every file.
# tests/test_synth.py pins the bytes of a few frames to catch that.


def _frac(a: np.ndarray) -> np.ndarray:
    return a - np.floor(a)


def _lowfreq(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """(h, w) float32 smooth noise, std ~1: a coarse random grid upsampled bilinearly."""
    gh, gw = max(2, round(h / cell) + 2), max(2, round(w / cell) + 2)
    grid = Image.fromarray(rng.standard_normal((gh, gw), dtype=np.float32))
    return np.asarray(grid.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def _centres(n: int) -> np.ndarray:
    """(n,) float32 pixel centres 0.5, 1.5, ...: every mask is computed at pixel centres."""
    return np.arange(n, dtype=np.float32) + 0.5


@dataclass(frozen=True)
class View:
    """The camera of one frame: where a point of the street lands in the image (module
    docstring: row `horizon + d`, column `vanish_x + X * d`, `d = height / Z`)."""

    height: float  # frame height in pixels, a float: every size is in proportion to it
    width: float
    horizon: float  # the row where the ground plane vanishes
    vanish_x: float  # the column where lines along the street meet
    ys: np.ndarray  # (H, 1) row centres
    xs: np.ndarray  # (1, W) column centres

    @classmethod
    def random(cls, rng: np.random.Generator, height: int, width: int) -> View:
        """A camera tilted and turned a little per frame, as a dashcam on a straight street."""
        H, W = float(height), float(width)
        horizon = H * rng.uniform(0.36, 0.46)
        vanish_x = W / 2 + H * rng.uniform(-0.25, 0.25)
        return cls(H, W, horizon, vanish_x, _centres(height)[:, None], _centres(width)[None, :])

    @property
    def yrel(self) -> np.ndarray:
        """(H, 1) rows below the horizon, negative above it."""
        return self.ys - self.horizon

    def at(self, lateral: float, depth: float) -> tuple[float, float, float]:
        """Image column and row of a ground point, and the pixels per unit there."""
        px = self.height / depth
        return self.vanish_x + lateral * px, self.horizon + px, px

    def ground(self) -> Ground:
        """The ground plane, per pixel below the horizon."""
        g0 = int(math.ceil(self.horizon))
        d = np.maximum(self.ys[g0:] - self.horizon, 1e-3)  # (Hg, 1) pixels per unit
        return Ground(slice(g0, int(self.height)), self.height / d, (self.xs - self.vanish_x) / d)

    def plane(self, lateral: float) -> Plane:
        """The vertical plane standing `lateral` units left (< 0) or right (> 0) of the camera."""
        d = (self.xs[0] - self.vanish_x) / lateral
        # d <= 0: the column looks at the other side of the street; d <= 0.5: the plane is
        # 2 * height units away or more, under half a pixel per unit (and d = 0 divides by 0).
        on = d > 0.5
        d = np.where(on, d, 1.0)
        return Plane(d, self.height / d, on, self.yrel)


@dataclass(frozen=True)
class Ground:
    """The ground plane at each pixel below the horizon."""

    rows: slice  # the frame rows it covers: the first row below the horizon to the bottom
    Z: np.ndarray  # (Hg, 1) depth of each row
    X: np.ndarray  # (Hg, W) lateral offset of each pixel: < 0 left of the camera, > 0 right


@dataclass(frozen=True)
class Plane:
    """A vertical plane along the street at one lateral offset (facades, a hedge, a fence),
    seen column by column: in column x it stands at depth `z[x]`, `d[x]` pixels per unit."""

    d: np.ndarray  # (W,) pixels per unit; 1 where the column does not see the plane
    z: np.ndarray  # (W,) depth
    on: np.ndarray  # (W,) bool: the columns that see it
    yrel: np.ndarray  # (H, 1) rows below the horizon

    def mask(self, low, high, cols: np.ndarray | None = None) -> np.ndarray:
        """(H, W) pixels of the plane between heights `low` and `high` above the ground
        (units; scalars or (W,)), in the columns `cols` (default: all that see it)."""
        cols = self.on if cols is None else cols
        return (self.yrel < self.d * (1 - low)) & (self.yrel > self.d * (1 - high)) & cols

    def height_above_ground(self) -> np.ndarray:
        """(H, W) height in units of each pixel's point on the plane."""
        return 1 - self.yrel / self.d


class Canvas:
    """One frame: a map of appearance slots, each with a colour, a label id and an instance id.

    Layers are painted back to front into `slot` (numpy masks for the ground and the planes,
    PIL shapes for objects); `render` turns slots into the image, labelIds and instanceIds.
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
        yn = _centres(h)[:, None] / h - 0.5  # (H, 1)
        xn = _centres(w)[None, :] / w - 0.5  # (1, W)
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


@dataclass(frozen=True)
class Street:
    """The layout `draw_ground` chose, in lateral units; the planes and objects stand on it."""

    left: float  # the road's left edge (< 0)
    right: float  # its right edge (> 0)
    road_rgb: tuple[float, float, float]
    kind: dict[int, str]  # per side (-1 left, 1 right): "buildings" or "park"
    walk_out: dict[int, float]  # the outer edge of each sidewalk
    plane: dict[int, float]  # where the facades (buildings) or the tree line (park) stand
    parking: tuple[int, float, float, float] | None  # (side, curb, from depth, to depth)

    def edge(self, side: int) -> float:
        return self.left if side < 0 else self.right


# -- sky and ground (numpy masks) ----------------------------------------------------------


def draw_sky(c: Canvas, v: View) -> None:
    """Sky, clear or overcast, over a skyline of far buildings and tree tops that rises 1-10%
    of the frame above the horizon (a flat horizon line would be an easy shortcut to learn)."""
    r = c.rng
    if r.random() < 0.7:  # clear: deep blue at the top, paler at the horizon
        sky = c.look("sky", c.jitter((125, 170, 220), 0.08), tex=0.12, vgrad=(90, 60, 20))
    else:  # overcast
        sky = c.look("sky", c.jitter((190, 195, 205), 0.06), tex=0.2, vgrad=(30, 30, 25))
    c.slot[:] = sky
    x0 = 0.0
    while x0 < v.width:  # piecewise constant; each piece runs down to the bottom of the frame,
        x1 = x0 + v.width * r.uniform(0.03, 0.15)  # the ground, drawn next, covers the rest
        name = "building" if r.random() < 0.7 else "vegetation"
        rgb = (150, 150, 155) if name == "building" else (80, 110, 70)
        top = v.horizon - v.height * r.uniform(0.01, 0.1)
        cols = (v.xs >= x0) & (v.xs < x1)
        c.fill((v.ys > top) & cols, c.look(name, c.jitter(rgb, 0.1), tex=0.1))
        x0 = x1


def draw_ground(c: Canvas, v: View) -> Street:
    """Everything below the horizon: the road, each roadside, a parking strip, lane marks.
    Returns the layout, which the planes and the objects stand on."""
    r, g = c.rng, v.ground()
    left, right = -r.uniform(1.8, 3.4), r.uniform(1.6, 3.4)
    road_rgb = c.jitter((95, 92, 98), 0.1)
    c.fill(np.ones_like(g.X, dtype=bool), c.look("road", road_rgb, tex=0.08), g.rows)
    kind = {side: "buildings" if r.random() < 0.6 else "park" for side in (-1, 1)}
    if kind[-1] == kind[1] == "park":  # a street: buildings on at least one side
        kind[int(r.choice([-1, 1]))] = "buildings"
    sidewalk_rgb = c.jitter((160, 150, 150), 0.1)
    walk_out, plane = {}, {}
    for side, edge in ((-1, left), (1, right)):
        walk_out[side], plane[side] = draw_roadside(c, g, side, edge, kind[side], sidewalk_rgb)
    parking = draw_parking(c, g, left, right)
    draw_lane_marks(c, g, left, right, parking)
    return Street(left, right, road_rgb, kind, walk_out, plane, parking)


def draw_roadside(
    c: Canvas, g: Ground, side: int, edge: float, kind: str, rgb
) -> tuple[float, float]:
    """One side beyond the road `edge`: a curb and a sidewalk 1.2-2.6 units wide (tiled up
    to depth 30), then more sidewalk up to the facades, or a park (terrain, maybe a dirt
    path). Returns the sidewalk's outer edge and where the vertical plane behind it stands."""
    r = c.rng
    out = edge + side * r.uniform(1.2, 2.6)
    lateral = side * g.X  # > 0 towards this side
    walk = (lateral >= side * edge) & (lateral < side * out)
    c.fill(walk, c.look("sidewalk", rgb, tex=0.07), g.rows)
    tiles = walk & (g.Z < 30) & ((_frac(g.Z / 1.2) < 0.07) | (_frac(g.X / 1.2) < 0.07))
    c.fill(tiles, c.look("sidewalk", [x * 0.8 for x in rgb], tex=0.05), g.rows)
    curb = (lateral >= side * edge) & (lateral < side * edge + 0.15)
    c.fill(curb, c.look("sidewalk", [min(255, x * 1.2) for x in rgb], tex=0.05), g.rows)
    if kind == "buildings":
        c.fill(lateral >= side * out, c.look("sidewalk", rgb, tex=0.07), g.rows)
        return out, out
    plane = out + side * r.uniform(1.5, 5.0)  # the park's tree line
    terrain = c.look("terrain", c.jitter((135, 160, 75), 0.12), tex=0.3)
    c.fill(lateral >= side * out, terrain, g.rows)
    if r.random() < 0.5:  # a dirt path across the park: "ground", void in Cityscapes
        z0 = r.uniform(5, 25)
        path = (lateral >= side * out) & (g.Z > z0) & (g.Z < z0 + r.uniform(3, 8))
        c.fill(path, c.look("ground", c.jitter((125, 105, 85), 0.1), tex=0.2), g.rows)
    return out, plane


def draw_parking(c: Canvas, g: Ground, left: float, right: float):
    """Half the frames: a parking strip 1.3 units wide inside one curb, over 10-30 units of
    depth ("parking" is ignored in evaluation). Returns (side, curb, z0, z1) or None."""
    r = c.rng
    if r.random() >= 0.5:
        return None
    side = int(r.choice([-1, 1]))
    edge = left if side < 0 else right
    z0 = r.uniform(4, 20)
    z1 = z0 + r.uniform(10, 30)
    strip = (side * g.X <= side * edge) & (side * g.X > side * edge - 1.3) & (g.Z > z0) & (g.Z < z1)
    c.fill(strip, c.look("parking", c.jitter((125, 115, 120), 0.1), tex=0.1), g.rows)
    return side, edge, z0, z1


def draw_lane_marks(c: Canvas, g: Ground, left: float, right: float, parking) -> None:
    """A dashed centre line (7-unit period) and a solid line 0.35 inside each curb except
    along the parking strip; labelled road, as in Cityscapes, but bright."""
    r = c.rng
    mark = c.look("road", c.jitter((225, 225, 215), 0.05), tex=0.05)
    mid = (left + right) / 2 + r.uniform(-0.4, 0.4)
    c.fill((np.abs(g.X - mid) < 0.07) & (_frac(g.Z / 7.0) < 0.45) & (g.Z < 120), mark, g.rows)
    for edge, side in ((left, -1), (right, 1)):
        if parking is None or parking[0] != side:
            c.fill((np.abs(g.X - (edge - side * 0.35)) < 0.05) & (g.Z < 120), mark, g.rows)


# -- vertical planes along the street (numpy masks) ------------------------------------------


def draw_street_side(c: Canvas, v: View, street: Street, side: int) -> None:
    """The planes on one side: facades on the sidewalk, or a tree line with buildings 4-10
    units behind it, and a low wall, fence or guard rail at the sidewalk's outer edge."""
    r = c.rng
    dim = r.uniform(0.65, 1.0)  # one side of the street is in shade
    if street.kind[side] == "buildings":
        draw_facade(c, v.plane(street.plane[side]), dim)
    else:
        draw_facade(c, v.plane(street.plane[side] + side * r.uniform(4, 10)), dim)
        draw_tree_line(c, v.plane(street.plane[side]))
    draw_barrier(c, v, street, side)


def draw_facade(c: Canvas, p: Plane, dim: float) -> None:
    """Buildings side by side along `p`, 6-22 units deep and 2.5-9 tall, each with its own
    colours and a grid of windows; per-building values are looked up per column (`seg`)."""
    r = c.rng
    n = 64  # buildings, >= 384 units of street; the last one runs on to the vanishing point
    seg = np.searchsorted(np.cumsum(r.uniform(6, 22, size=n)), p.z).clip(0, n - 1)  # (W,)
    tops = r.uniform(2.5, 9.0, size=n)[seg]
    choices = [(175, 160, 135), (150, 90, 70), (140, 140, 145), (205, 195, 170), (110, 100, 95)]
    walls, glass = np.zeros(n, np.int32), np.zeros(n, np.int32)
    for b in np.unique(seg[p.on]):  # colours only for the buildings in view
        rgb = c.jitter(choices[int(r.integers(len(choices)))], 0.1)
        walls[b] = c.look("building", [x * dim for x in rgb], tex=0.12)
        glass[b] = c.look("building", [x * dim for x in c.jitter((60, 70, 85), 0.15)], tex=0.15)
    wall = p.mask(0.0, tops)
    c.fill(wall, walls[seg])
    # Windows on a facade grid: columns by depth, rows by height above the ground.
    wz, wh = r.uniform(2.0, 3.5, size=n)[seg], r.uniform(2.2, 3.0, size=n)[seg]
    fz = _frac(p.z / wz)
    hgt = p.height_above_ground()  # (H, W)
    fh = _frac(hgt / wh)
    win = wall & ((fz > 0.3) & (fz < 0.75))
    win &= (fh > 0.35) & (fh < 0.8) & (hgt > 1.3) & (hgt < tops - 0.4)
    c.fill(win, glass[seg])


def draw_tree_line(c: Canvas, p: Plane) -> None:
    """A hedge 0.8-1.8 units tall along `p` with round tree crowns rising out of it."""
    r = c.rng
    trees_z = np.cumsum(r.uniform(3, 8, size=48))
    radius = r.uniform(1.5, 3.5, size=48)
    crown = r.uniform(2.5, 6.5, size=48)
    bump = np.clip(1 - ((p.z[None, :] - trees_z[:, None]) / radius[:, None]) ** 2, 0, None)
    top = np.maximum(r.uniform(0.8, 1.8), (crown[:, None] * np.sqrt(bump)).max(axis=0))  # (W,)
    veg = c.jitter((70, 115, 45), 0.12)
    c.fill(p.mask(0.0, top), c.look("vegetation", veg, tex=0.45))


def draw_barrier(c: Canvas, v: View, street: Street, side: int) -> None:
    """A low wall or fence (or, by a park, a guard rail 0.35-0.7 up) at the sidewalk's outer
    edge, over 8-40 units of depth."""
    r = c.rng
    p = v.plane(street.walk_out[side] - side * 0.05)  # just inside the edge: in front of it
    z0 = r.uniform(3, 20)
    span = p.on & (p.z > z0) & (p.z < z0 + r.uniform(8, 40))
    kinds = ["wall", "fence", "guard rail"] if street.kind[side] == "park" else ["wall", "fence"]
    kind = r.choice(kinds)
    if kind == "wall":
        rgb = c.jitter((175, 170, 155), 0.1)
        c.fill(p.mask(0.0, r.uniform(0.8, 2.0), span), c.look("wall", rgb, tex=0.15))
    elif kind == "fence":
        rgb = c.jitter((125, 105, 85) if r.random() < 0.5 else (110, 120, 110), 0.1)
        m = p.mask(0.0, r.uniform(0.8, 1.5), span)
        c.fill(m, c.look("fence", rgb, tex=0.1))
        bars = m & (_frac(p.z / 0.6) < 0.3)  # darker boards every 0.6 units
        c.fill(bars, c.look("fence", [x * 0.6 for x in rgb], tex=0.1))
    else:
        rgb = c.jitter((185, 185, 190), 0.05)
        c.fill(p.mask(0.35, 0.7, span), c.look("guard rail", rgb, tex=0.05))


# -- objects standing on the ground (PIL shapes on the slot map) ------------------------------
#
# Each painter takes (canvas, view, draw, lateral, depth, ...): `draw` paints slot ids into
# the slot map (a 32-bit PIL image), sizes are in units, `u` pixels per unit at the object.

Draw = ImageDraw.ImageDraw
Paint = Callable[[Canvas, View, Draw], None]
_VEHICLE_SIZE = {"car": (0.78, 1.25), "truck": (1.1, 2.9), "bus": (1.2, 2.8)}  # half width, tall
_CAR_COLOURS = [(200, 200, 205), (30, 30, 35), (150, 20, 25), (25, 50, 120), (120, 125, 130),
                (235, 235, 230), (60, 90, 60), (170, 140, 60), (80, 80, 90)]  # fmt: skip


def _box(draw: Draw, x0, y0, x1, y1, slot: int) -> None:
    """A filled rectangle between two corners in any order."""
    draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=slot)


def draw_vehicle(
    c: Canvas, v: View, draw: Draw, lateral: float, depth: float, kind: str, road_rgb
) -> None:
    """A car, truck or bus seen from behind, one instance: shadow (road), tyres, body,
    window, tail lights and plate (all labelled as the vehicle, as Cityscapes does)."""
    r = c.rng
    cx, yb, u = v.at(lateral, depth)
    inst = c.new_instance(kind)
    shadow = c.look("road", [x * 0.45 for x in road_rgb], tex=0.05)
    half, tall = _VEHICLE_SIZE[kind]
    draw.ellipse(
        [cx - half * 1.1 * u, yb - 0.1 * u, cx + half * 1.1 * u, yb + 0.08 * u], fill=shadow
    )
    tyre = c.look(kind, (25, 25, 28), 0.05, inst)
    for sx in (-1, 1):
        _box(draw, cx + sx * (half - 0.05) * u, yb - 0.32 * u, cx + sx * (half - 0.3) * u, yb, tyre)
    palette = _CAR_COLOURS[int(r.integers(len(_CAR_COLOURS)))] if kind == "car" else (210, 205, 190)
    body = c.look(kind, c.jitter(palette, 0.08), 0.06, inst)
    glass = c.look(kind, c.jitter((45, 55, 70), 0.1), 0.1, inst)
    if kind == "car":  # a body to 0.75 units and a narrower cabin on it
        _box(draw, cx - half * u, yb - 0.75 * u, cx + half * u, yb - 0.15 * u, body)
        cabin = [(cx - 0.7 * u, yb - 0.75 * u), (cx - 0.55 * u, yb - tall * u),
                 (cx + 0.55 * u, yb - tall * u), (cx + 0.7 * u, yb - 0.75 * u)]  # fmt: skip
        draw.polygon(cabin, fill=body)
        win = [(cx - 0.6 * u, yb - 0.8 * u), (cx - 0.5 * u, yb - (tall - 0.07) * u),
               (cx + 0.5 * u, yb - (tall - 0.07) * u), (cx + 0.6 * u, yb - 0.8 * u)]  # fmt: skip
        draw.polygon(win, fill=glass)
    else:  # a box, a rear window at the top, a bus's coloured band
        _box(draw, cx - half * u, yb - tall * u, cx + half * u, yb - 0.15 * u, body)
        top = yb - (tall - 0.15) * u
        _box(draw, cx - (half - 0.1) * u, top, cx + (half - 0.1) * u, yb - (tall - 0.8) * u, glass)
        if kind == "bus":
            band = c.look(kind, c.jitter((200, 40, 40), 0.1), 0.06, inst)
            _box(draw, cx - half * u, yb - 0.9 * u, cx + half * u, yb - 0.6 * u, band)
    lamp = c.look(kind, (200, 30, 30), 0.05, inst)
    for sx in (-1, 1):
        x0, x1 = cx + sx * (half - 0.05) * u, cx + sx * (half - 0.25) * u
        _box(draw, x0, yb - 0.65 * u, x1, yb - 0.5 * u, lamp)
    plate = c.look(kind, (225, 225, 215), 0.03, inst)  # license plate: labelled as its car
    _box(draw, cx - 0.22 * u, yb - 0.45 * u, cx + 0.22 * u, yb - 0.33 * u, plate)


def draw_person(
    c: Canvas, v: View, draw: Draw, lateral: float, depth: float, label="person", lift=0.0
) -> None:
    """A person 1.25-1.55 camera heights tall (1.5-1.9 m under a camera ~1.2 m up), one
    instance: legs, or seated `lift` units above the ground (a rider); a torso and a head."""
    r = c.rng
    cx, yb, u = v.at(lateral, depth)
    yb -= lift * u
    inst = c.new_instance(label)
    tall = r.uniform(1.25, 1.55)
    skin_rgb = ((225, 190, 160), (160, 110, 80), (95, 65, 45))[int(r.integers(3))]
    skin = c.look(label, c.jitter(skin_rgb, 0.05), 0.05, inst)
    shirt = c.look(label, c.jitter(tuple(r.uniform(20, 230, size=3)), 0.1), 0.1, inst)
    pants = c.look(label, c.jitter(tuple(r.uniform(20, 120, size=3)), 0.1), 0.1, inst)
    hip, neck = yb - 0.48 * tall * u, yb - 0.84 * tall * u
    if lift == 0:  # standing: two legs from the ground to the hip
        for sx in (-1, 1):
            _box(draw, cx + sx * 0.02 * u, yb, cx + sx * 0.13 * u, hip, pants)
    else:  # seated: the thighs, seen from behind
        _box(draw, cx - 0.13 * u, yb - 0.35 * tall * u, cx + 0.13 * u, hip, pants)
    _box(draw, cx - 0.16 * u, hip, cx + 0.16 * u, neck, shirt)
    head = 0.085 * tall * u  # radius
    draw.ellipse([cx - head, neck - 2 * head, cx + head, neck], fill=skin)


def draw_two_wheeler(
    c: Canvas, v: View, draw: Draw, lateral: float, depth: float, kind: str
) -> None:
    """A bicycle or motorcycle seen from behind (a tall narrow wheel, a handlebar, a body or
    a seat post) and its rider: two instances, as in Cityscapes."""
    r = c.rng
    cx, yb, u = v.at(lateral, depth)
    inst = c.new_instance(kind)
    frame = c.look(kind, c.jitter(tuple(r.uniform(20, 200, size=3)), 0.1), 0.05, inst)
    tyre = c.look(kind, (25, 25, 25), 0.05, inst)
    _box(draw, cx - 0.05 * u, yb, cx + 0.05 * u, yb - 0.65 * u, tyre)
    _box(draw, cx - 0.3 * u, yb - 0.9 * u, cx + 0.3 * u, yb - 0.95 * u, frame)
    if kind == "motorcycle":
        _box(draw, cx - 0.22 * u, yb - 0.3 * u, cx + 0.22 * u, yb - 0.75 * u, frame)
    else:
        _box(draw, cx - 0.03 * u, yb - 0.5 * u, cx + 0.03 * u, yb - 0.95 * u, frame)
    draw_person(c, v, draw, lateral, depth, "rider", lift=0.55)


def draw_pole(c: Canvas, v: View, draw: Draw, lateral: float, depth: float, attach: str) -> None:
    """A pole 0.1 units thick and 3.5-6 tall carrying a traffic sign, a traffic light or a
    street lamp (its arm and lamp labelled pole, as Cityscapes' label policy has it)."""
    r = c.rng
    cx, yb, u = v.at(lateral, depth)
    metal = c.look("pole", c.jitter((125, 125, 130), 0.08), 0.06)
    tall = r.uniform(3.5, 6.0)
    _box(draw, cx - 0.05 * u, yb, cx + 0.05 * u, yb - tall * u, metal)
    if attach == "sign":
        draw_traffic_sign(c, draw, cx, yb, u)
    elif attach == "light":
        draw_traffic_light(c, draw, cx, yb, u, tall)
    else:  # a street lamp: an arm reaching over the road, the lamp at its end
        toward = -1 if lateral > 0 else 1
        _box(draw, cx, yb - tall * u, cx + toward * 1.2 * u, yb - (tall - 0.08) * u, metal)
        x0, x1 = cx + toward * 1.0 * u, cx + toward * 1.35 * u
        _box(draw, x0, yb - tall * u, x1, yb - (tall - 0.15) * u, metal)


def draw_traffic_sign(c: Canvas, draw: Draw, cx: float, yb: float, u: float) -> None:
    """A round, triangular or square sign 2-2.8 units up the pole at column `cx`: a face in
    white, blue or yellow inside a red rim."""
    r = c.rng
    sy = yb - r.uniform(2.0, 2.8) * u  # centre row
    size = r.uniform(0.22, 0.32) * u  # half size, pixels
    face_rgb = ((230, 230, 230), (40, 80, 190), (235, 200, 30))[int(r.integers(3))]
    face = c.look("traffic sign", c.jitter(face_rgb, 0.08), 0.05)
    rim = c.look("traffic sign", c.jitter((200, 30, 30), 0.08), 0.05)
    shape = int(r.integers(3))
    if shape == 0:
        draw.ellipse([cx - size, sy - size, cx + size, sy + size], fill=rim)
        k = 0.7 * size
        draw.ellipse([cx - k, sy - k, cx + k, sy + k], fill=face)
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
        _box(draw, cx - size, sy - 0.8 * size, cx + size, sy + 0.8 * size, face)


def draw_traffic_light(c: Canvas, draw: Draw, cx: float, yb: float, u: float, tall: float) -> None:
    """A traffic light head 0.85 units tall, 2.4-3.5 up the pole (below its top), one of
    red, amber, green lit and the others dim."""
    r = c.rng
    ty = yb - min(tall, r.uniform(2.4, 3.5)) * u  # top row of the head
    body = c.look("traffic light", c.jitter((45, 45, 40), 0.1), 0.05)
    _box(draw, cx - 0.16 * u, ty, cx + 0.16 * u, ty + 0.85 * u, body)
    lit = int(r.integers(3))
    for k, rgb in enumerate(((230, 40, 30), (235, 170, 30), (40, 210, 90))):
        lamp = c.look("traffic light", rgb if k == lit else [x * 0.3 for x in rgb], 0.03)
        ly, rad = ty + (0.15 + 0.27 * k) * u, 0.09 * u
        draw.ellipse([cx - rad, ly - rad, cx + rad, ly + rad], fill=lamp)


def draw_tree(c: Canvas, v: View, draw: Draw, lateral: float, depth: float) -> None:
    """A street tree: a pit of soil (terrain), a trunk 2.5-4 units tall and a round crown,
    both vegetation."""
    r = c.rng
    cx, yb, u = v.at(lateral, depth)
    pit = c.look("terrain", c.jitter((120, 100, 60), 0.1), 0.3)
    draw.ellipse([cx - 0.5 * u, yb - 0.08 * u, cx + 0.5 * u, yb + 0.08 * u], fill=pit)
    leaves = c.look("vegetation", c.jitter((60, 105, 40), 0.12), 0.5)
    bark = c.look("vegetation", c.jitter((85, 65, 50), 0.1), 0.2)
    tall, rad = r.uniform(2.5, 4.0), r.uniform(0.9, 1.6)
    _box(draw, cx - 0.08 * u, yb, cx + 0.08 * u, yb - tall * u, bark)
    draw.ellipse(
        [cx - rad * u, yb - (tall + rad) * u, cx + rad * u, yb - (tall - rad * 0.8) * u],
        fill=leaves,
    )


def draw_bin(c: Canvas, v: View, draw: Draw, lateral: float, depth: float) -> None:
    """A rubbish bin 0.4 x 0.7 units: "static", void in Cityscapes."""
    cx, yb, u = v.at(lateral, depth)
    slot = c.look("static", c.jitter((60, 80, 60), 0.2), 0.1)
    _box(draw, cx - 0.2 * u, yb, cx + 0.2 * u, yb - 0.7 * u, slot)


def _log_depth(r: np.random.Generator, lo: float, hi: float) -> float:
    """A depth uniform in log: as many objects between 5 and 10 units as between 20 and 40."""
    return float(math.exp(r.uniform(math.log(lo), math.log(hi))))


def place_objects(r: np.random.Generator, street: Street) -> list[tuple[float, Paint]]:
    """Where every object stands: (depth, painter), in the order their positions are drawn.
    All positions are drawn first; each painter draws its own looks when it paints."""
    objects = []
    for side in (-1, 1):
        objects += _place_furniture(r, street, side)
    shown = {paint.keywords.get("attach") for _, paint in objects}
    for need in ("sign", "light"):  # every frame shows both kinds
        if need not in shown:
            side = int(r.choice([-1, 1]))
            lat, z = street.edge(side) + side * 0.45, r.uniform(6, 25)
            objects.append((z, partial(draw_pole, lateral=lat, depth=z, attach=need)))
    objects += _place_people(r, street)
    objects += _place_traffic(r, street)
    return objects


def _place_furniture(r: np.random.Generator, street: Street, side: int):
    """One side's poles every 8-20 units just off the curb up to depth 70, trees along the
    outer edge of a buildings side's sidewalk, maybe a bin."""
    edge, objects = street.edge(side), []
    z = r.uniform(3, 8)
    while z < 70:
        attach = str(r.choice(["sign", "light", "lamp"], p=[0.4, 0.3, 0.3]))
        lat = edge + side * r.uniform(0.3, 0.6)
        objects.append((z, partial(draw_pole, lateral=lat, depth=z, attach=attach)))
        z += r.uniform(8, 20)
    if street.kind[side] == "buildings":
        z = r.uniform(4, 12)
        while z < 60:
            lat = street.walk_out[side] - side * r.uniform(0.5, 0.8)
            objects.append((z, partial(draw_tree, lateral=lat, depth=z)))
            z += r.uniform(8, 25)
    if r.random() < 0.5:
        lat, z = street.walk_out[side] - side * 0.4, _log_depth(r, 4, 40)
        objects.append((z, partial(draw_bin, lateral=lat, depth=z)))
    return objects


def _place_people(r: np.random.Generator, street: Street):
    """1 + Poisson(4) people on the sidewalks, 30-90% of the way across."""
    objects = []
    for _ in range(1 + int(r.poisson(4))):
        side = int(r.choice([-1, 1]))
        edge = street.edge(side)
        lat = edge + side * r.uniform(0.3, 0.9) * abs(street.walk_out[side] - edge)
        z = _log_depth(r, 3.5, 45)
        objects.append((z, partial(draw_person, lateral=lat, depth=z)))
    return objects


def _place_traffic(r: np.random.Generator, street: Street):
    """1 + Poisson(3) cars in the lanes, parked cars along the parking strip, maybe a truck
    and a bus, maybe a bicycle or motorcycle inside a curb."""
    objects = []
    for _ in range(1 + int(r.poisson(3))):
        lat, z = r.uniform(street.left + 0.9, street.right - 0.9), _log_depth(r, 4, 80)
        objects.append(_vehicle_at(street, lat, z, "car"))
    if street.parking is not None:
        side, edge, z0, z1 = street.parking
        z = z0 + 3
        while z < z1:  # a space every 5-7 units, 70% taken
            if r.random() < 0.7:
                objects.append(_vehicle_at(street, edge - side * 0.75, z, "car"))
            z += r.uniform(5, 7)
    for kind, p in (("truck", 0.35), ("bus", 0.3)):
        if r.random() < p:
            lat, z = r.uniform(street.left + 1.3, street.right - 1.3), _log_depth(r, 8, 60)
            objects.append(_vehicle_at(street, lat, z, kind))
    if r.random() < 0.6:
        side = int(r.choice([-1, 1]))
        lat = street.edge(side) - side * 0.6
        z, kind = _log_depth(r, 5, 40), str(r.choice(["bicycle", "motorcycle"]))
        objects.append((z, partial(draw_two_wheeler, lateral=lat, depth=z, kind=kind)))
    return objects


def _vehicle_at(street: Street, lat: float, z: float, kind: str) -> tuple[float, Paint]:
    return z, partial(draw_vehicle, lateral=lat, depth=z, kind=kind, road_rgb=street.road_rgb)


def paint_objects(c: Canvas, v: View, objects: list[tuple[float, Paint]]) -> None:
    """Paint far to near, so nearer objects cover farther ones; a stable sort keeps the
    placement order between equal depths."""
    image = Image.fromarray(c.slot)  # mode "I": PIL draws the 32-bit slot ids
    draw = ImageDraw.Draw(image)
    for _, paint in sorted(objects, key=lambda o: -o[0]):
        paint(c, v, draw)
    c.slot = np.array(image, dtype=np.int32)


# -- the camera's own void regions (numpy masks) ----------------------------------------------


def draw_ego_vehicle(c: Canvas, v: View) -> None:
    """The car's bonnet: a parabola 8-16% of the frame high in the middle, lower at the sides."""
    H, W, r = v.height, v.width, c.rng
    hood = H * r.uniform(0.08, 0.16) * (1 - 0.6 * ((v.xs - W / 2) / (W / 2)) ** 2)  # (1, W)
    ego = c.look("ego vehicle", c.jitter((45, 45, 50), 0.2), tex=0.1, vgrad=(60, 60, 60))
    c.fill(v.ys > H - hood, ego)


def draw_out_of_roi(c: Canvas, v: View) -> None:
    """The bottom 4% of rows in a corner 3-7% of the width on each side."""
    H, W = v.height, v.width
    corner = W * c.rng.uniform(0.03, 0.07)
    roi = (v.ys > H - H * 0.04) & ((v.xs < corner) | (v.xs > W - corner))
    c.fill(roi, c.look("out of roi", (20, 20, 20), tex=0.0))


def draw_rectification_border(c: Canvas, v: View) -> None:
    """Black columns at the left and right edges, 0.3-1% of the width at mid-height and three
    times that at the top and bottom rows, as undistortion leaves them."""
    H, W = v.height, v.width
    border = max(1.0, W * c.rng.uniform(0.003, 0.01)) * (1 + 2 * np.abs(v.ys / H - 0.5))  # (H, 1)
    mask = (v.xs < border) | (v.xs > W - border)
    c.fill(mask, c.look("rectification border", (0, 0, 0), tex=0.0))


def render_scene(rng: np.random.Generator, height: int, width: int):
    """Draw one street scene: (image (H, W, 3) uint8, labelIds (H, W) uint8, instanceIds uint16)."""
    c = Canvas(rng, height, width)
    v = View.random(rng, height, width)
    draw_sky(c, v)
    street = draw_ground(c, v)
    for side in (-1, 1):
        draw_street_side(c, v, street, side)
    paint_objects(c, v, place_objects(rng, street))
    draw_ego_vehicle(c, v)
    draw_out_of_roi(c, v)
    draw_rectification_border(c, v)
    return c.render()


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


def _check_target(root: Path, overwrite: bool) -> None:
    """DataError unless `root` is absent, an empty folder, or a synthetic root to overwrite."""
    if not root.exists():
        return
    if not root.is_dir():
        raise DataError(f"{root}: exists and is not a folder; choose another output path")
    if not any(root.iterdir()):
        return
    if not overwrite:
        raise DataError(
            f"{root}: folder exists and is not empty; pass overwrite (--overwrite) to replace it"
        )
    if not (root / SUMMARY_FILE).is_file():
        raise DataError(
            f"{root}: not a synthetic root (no {SUMMARY_FILE}); refusing to overwrite it, delete it yourself"
        )


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
    Frames are written to a temporary sibling folder that replaces `root` at the end
    (`atomic_dir`), so an interrupted run leaves no half-written root. A non-empty `root` raises DataError unless
    `overwrite`, which replaces it only if it is itself a synthetic root.
    `workers`: processes (0 = all CPU cores); the files do not depend on it.
    `progress(done, total)` is called after each frame.
    Returns a summary: frames per split, label ids and evaluated class names present.
    """
    _validate(splits, height, width, seed, workers)
    root = Path(root)
    _check_target(root, overwrite)
    workers = workers or os.cpu_count() or 1
    frames = _frames(splits)
    with atomic_dir(root) as tmp:
        for frame in frames:
            (tmp / "leftImg8bit" / frame.split / frame.city).mkdir(parents=True, exist_ok=True)
            (tmp / "gtFine" / frame.split / frame.city).mkdir(parents=True, exist_ok=True)
        present = _run(tmp, frames, height, width, seed, workers, progress)
        summary = _summary(splits, height, width, seed, present)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        # Again, just before the swap: something may have been written to `root` meanwhile,
        # and atomic_dir replaces whatever is there.
        _check_target(root, overwrite)
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
