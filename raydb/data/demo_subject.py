"""The built-in demo subject (``subject.instance_data: builtin:demo``).

Five synthetic photos of one distinctive drawn object — a yellow five-pointed star on a blue disc
with a red band — at different positions, scales and backgrounds, so the demo needs no user data
and the subject is easy to recognise in sample grids.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageDraw

__all__ = ["DEMO_URI", "demo_images"]

DEMO_URI = "builtin:demo"
_BACKGROUNDS = [(235, 232, 220), (170, 205, 170), (200, 215, 240), (240, 210, 200), (215, 215, 215)]


def _star(cx: float, cy: float, r_out: float, r_in: float, turn: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        r = r_out if k % 2 == 0 else r_in
        a = turn + k * math.pi / 5 - math.pi / 2
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def demo_images(count: int = 5, size: int = 256) -> list[Image.Image]:
    """``count`` RGB images of the demo object, deterministic for a given ``(count, size)``."""
    rng = random.Random(7)
    images = []
    for i in range(count):
        img = Image.new("RGB", (size, size), _BACKGROUNDS[i % len(_BACKGROUNDS)])
        draw = ImageDraw.Draw(img)
        # a floor line so the object sits in a "scene"
        draw.rectangle([0, int(size * 0.75), size, size], fill=tuple(c - 30 for c in img.getpixel((0, 0))))
        scale = rng.uniform(0.28, 0.4) * size
        cx = rng.uniform(scale, size - scale)
        cy = rng.uniform(scale, size - scale)
        draw.ellipse([cx - scale, cy - scale, cx + scale, cy + scale], fill=(30, 60, 200))
        draw.rectangle([cx - scale * 0.9, cy + scale * 0.45, cx + scale * 0.9, cy + scale * 0.6],
                       fill=(210, 30, 30))
        draw.polygon(_star(cx, cy, scale * 0.8, scale * 0.35, rng.uniform(-0.3, 0.3)), fill=(250, 210, 20))
        images.append(img)
    return images
