"""Instance (and user-supplied class) image ingestion.

Reads a local folder or an ``s3://`` prefix (or ``builtin:demo``), applies EXIF orientation,
converts to RGB, resizes the shorter side to ``resolution`` and center-crops. Every file is checked
before anything is returned: corrupt files, non-images, an empty folder, or images whose shorter
side is below the minimum all end in one :class:`IngestError` that lists every offending file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from raydb.data.demo import DEMO_URI, demo_images
from raydb.storage import Storage, is_s3, join

__all__ = ["IngestError", "IMAGE_SUFFIXES", "min_image_side", "load_images", "prepare_image"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class IngestError(ValueError):
    """Bad input images; ``problems`` maps each offending file to what is wrong with it."""

    def __init__(self, field: str, uri: str, problems: dict[str, str]) -> None:
        self.problems = problems
        lines = [f"{field}: {len(problems)} problem(s) with images under {uri}:"]
        lines += [f"  {name}: {why}" for name, why in sorted(problems.items())]
        super().__init__("\n".join(lines))


def min_image_side(resolution: int) -> int:
    """Smallest accepted shorter side: half the training resolution, and never below 32 px.

    Smaller photos would be upscaled more than 2x and teach the model blur.
    """
    return max(32, resolution // 2)


def prepare_image(img: Image.Image, resolution: int, center_crop: bool = True) -> Image.Image:
    """EXIF-orient, RGB, resize shorter side to ``resolution``, then center-crop (or squash)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")  # transparent areas become white, not black
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    img = img.convert("RGB")
    if not center_crop:
        return img.resize((resolution, resolution), Image.Resampling.BICUBIC)
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                     Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


@dataclass
class _Source:
    name: str
    data: bytes


def _list_sources(storage: Storage, uri: str, field: str) -> list[_Source]:
    if is_s3(uri):
        # hidden files (.DS_Store, ...) are skipped here exactly as on local disk below
        names = [n for n in storage.list(uri, recursive=True)
                 if not n.endswith("/") and not Path(n).name.startswith(".")]
        return [_Source(n, storage.read_bytes(join(uri, n))) for n in names]
    root = Path(uri).expanduser()
    if not root.is_dir():
        raise IngestError(field, uri, {str(root): "folder does not exist"})
    return [_Source(str(p.relative_to(root)), p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]


def load_images(
    uri: str,
    resolution: int,
    *,
    storage: Storage | None = None,
    center_crop: bool = True,
    field: str = "subject.instance_data",
) -> list[Image.Image]:
    """All images under ``uri`` as RGB ``resolution x resolution`` PIL images, sorted by name."""
    if uri == DEMO_URI:
        return [prepare_image(im, resolution, center_crop) for im in demo_images()]
    storage = storage or Storage()
    sources = _list_sources(storage, uri, field)
    problems: dict[str, str] = {}
    images: list[Image.Image] = []
    minimum = min_image_side(resolution)
    for src in sources:
        if Path(src.name).suffix.lower() not in IMAGE_SUFFIXES:
            problems[src.name] = f"not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})"
            continue
        try:
            with Image.open(io.BytesIO(src.data)) as probe:
                probe.verify()  # catches truncated / corrupt data without decoding twice later
            img = Image.open(io.BytesIO(src.data))
            img.load()
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError,
                ValueError) as exc:
            problems[src.name] = f"corrupt or unreadable image ({type(exc).__name__})"
            continue
        w, h = ImageOps.exif_transpose(img).size
        if min(w, h) < minimum:
            problems[src.name] = f"too small: {w}x{h}, shorter side must be >= {minimum} px"
            continue
        images.append(prepare_image(img, resolution, center_crop))
    if not sources:
        problems["<folder>"] = "no files found (empty folder or prefix)"
    if problems:
        raise IngestError(field, uri, problems)
    return images
