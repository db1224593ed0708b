"""Pictures for tests: folders of images as ingestion reads them, and bytes as a client uploads them."""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from raydb.data.demo_subject import demo_images


def image_folder(path: Path, images: Iterable[Image.Image], prefix: str = "img") -> str:
    """Write ``images`` as ``<prefix><i>.png`` into ``path`` (created); returns the folder."""
    path.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        img.save(path / f"{prefix}{i}.png")
    return str(path)


def image_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def demo_photos(count: int = 5, size: int = 256, fmt: str = "PNG") -> list[tuple[str, bytes]]:
    """The built-in demo subject's photos as a client uploads them: ``(file name, bytes)``."""
    suffix = {"PNG": "png", "JPEG": "jpg"}[fmt]
    return [(f"star{i}.{suffix}", image_bytes(img, fmt)) for i, img in enumerate(demo_images(count, size))]
