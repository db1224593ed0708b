"""Instance (and user-supplied class) image ingestion.

Reads a local folder or an ``s3://`` prefix (or a built-in subject, ``builtin:demo`` /
``builtin:red-three``), applies EXIF orientation, converts to RGB, resizes the shorter side to
``resolution`` and center-crops. Every file is checked before anything is returned: corrupt
files, non-images, an empty folder, or images whose shorter side is below the minimum all end
in one :class:`IngestError` that lists every offending file.

Photos are untrusted input (a tenant's upload), so the decoder's attack surface is kept small:

- only JPEG, PNG and WebP are decoded, chosen by *content* (``Image.open(formats=...)``), so a BMP,
  TIFF or EPS renamed ``.png`` is refused before any other Pillow plugin (or Ghostscript) sees it;
- an image over ``Image.MAX_IMAGE_PIXELS`` (~89 MP) is refused from its header, before decoding —
  Pillow itself only warns between 1x and 2x that limit;
- the folder may hold at most ``max_files`` files and ``max_bytes`` bytes in total, checked from
  the listing before any file is read;
- malformed EXIF (which Pillow reports as ValueError, TypeError, struct.error, ...) is named per file.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from raydb.data.demo_subject import DEMO_URI, demo_images
from raydb.data.digits import SUBJECT_URI, subject_images
from raydb.storage import Storage, is_s3, join

__all__ = ["IngestError", "IMAGE_SUFFIXES", "IMAGE_FORMATS", "MAX_FILES", "MAX_BYTES", "ImageGeometry",
           "min_image_side", "load_images", "load_images_with_geometry", "prepare_image",
           "prepare_image_with_geometry"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")  # the only Pillow plugins allowed to parse a file
MAX_FILES = 1000  # DreamBooth needs 3-20 photos; a folder of thousands is a mistake or an attack
MAX_BYTES = 512 * 1024 * 1024


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


@dataclass(frozen=True)
class ImageGeometry:
    """Where a prepared image came from, in (height, width) / (top, left) pixels.

    SDXL is conditioned on it (``add_time_ids``): ``original_size`` is the photo's size before
    resizing, ``crop_top_left`` the corner of the crop in the resized photo (``resized_size``),
    ``target_size`` the size of the prepared image. Recorded here, where the crop happens, so the
    conditioning describes each image's real crop instead of assuming a centred one.
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]

    @classmethod
    def whole(cls, image: Image.Image) -> ImageGeometry:
        """An image taken as it is (a generated prior image): no resize, no crop."""
        size = (image.height, image.width)
        return cls(size, size, (0, 0), size)

    def mirrored(self) -> ImageGeometry:
        """The geometry of the horizontally flipped image: the same crop seen from the right."""
        top, left = self.crop_top_left
        return ImageGeometry(self.original_size, self.resized_size,
                             (top, self.resized_size[1] - self.target_size[1] - left), self.target_size)


def prepare_image(img: Image.Image, resolution: int, center_crop: bool = True) -> Image.Image:
    """EXIF-orient, RGB, resize shorter side to ``resolution``, then center-crop (or squash)."""
    return prepare_image_with_geometry(img, resolution, center_crop)[0]


def prepare_image_with_geometry(
    img: Image.Image, resolution: int, center_crop: bool = True,
) -> tuple[Image.Image, ImageGeometry]:
    """:func:`prepare_image` plus the :class:`ImageGeometry` of what it did."""
    img = ImageOps.exif_transpose(img)
    # alpha channels, and a PNG tRNS entry (a transparent palette index, or colour key of an L / RGB PNG)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")  # transparent areas become white, not black
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    img = img.convert("RGB")
    original = (img.height, img.width)
    target = (resolution, resolution)
    if not center_crop:  # squashed: the whole photo, resized to the target, nothing cropped
        return (img.resize((resolution, resolution), Image.Resampling.BICUBIC),
                ImageGeometry(original, target, (0, 0), target))
    w, h = img.size
    scale = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                     Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return (img.crop((left, top, left + resolution, top + resolution)),
            ImageGeometry(original, (h, w), (top, left), target))


@dataclass
class _Source:
    name: str
    data: bytes


def _list_sources(storage: Storage, uri: str, field: str, max_files: int, max_bytes: int) -> list[_Source]:
    """Every visible file under ``uri``, read only after the listing passed the count and byte caps."""
    if is_s3(uri):
        # hidden files (.DS_Store, ...) are skipped here exactly as on local disk below
        sized = [(n, size) for n, size in storage.sizes(uri) if not Path(n).name.startswith(".")]
        read = lambda name: storage.read_bytes(join(uri, name))  # noqa: E731
    else:
        root = Path(uri).expanduser()
        if not root.is_dir():
            raise IngestError(field, uri, {str(root): "folder does not exist"})
        files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]
        sized = [(str(p.relative_to(root)), p.stat().st_size) for p in files]
        read = lambda name: (root / name).read_bytes()  # noqa: E731
    if len(sized) > max_files:
        raise IngestError(field, uri, {"<folder>": f"{len(sized)} files, at most {max_files} allowed"})
    total = sum(size for _, size in sized)
    if total > max_bytes:
        raise IngestError(field, uri, {"<folder>": f"{total} bytes in total, at most {max_bytes} allowed"})
    return [_Source(name, read(name)) for name, _ in sized]


def _decode(data: bytes) -> Image.Image:
    """Decode one file's bytes as JPEG/PNG/WebP; raises ``_Refused`` saying why not."""
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; here that is an error too
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
                probe.verify()  # catches truncated / corrupt data without decoding twice later
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            img.load()
    except UnidentifiedImageError:
        raise _Refused("content is not a JPEG, PNG or WebP image (whatever its name says)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _Refused(f"too many pixels: over the {limit} pixel limit (Image.MAX_IMAGE_PIXELS)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _Refused(f"corrupt or unreadable image ({type(exc).__name__})") from None
    return img


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    """Width and height once EXIF orientation is applied; ``_Refused`` for malformed EXIF."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": the tag is skipped
            return ImageOps.exif_transpose(img).size
    except Exception as exc:  # Pillow's EXIF parser raises many types (ValueError, struct.error, ...)
        raise _Refused(f"malformed EXIF data ({type(exc).__name__}: {str(exc)[:80]})") from None


class _Refused(Exception):
    """One file's problem, collected into the IngestError."""


def load_images(
    uri: str,
    resolution: int,
    *,
    storage: Storage | None = None,
    center_crop: bool = True,
    field: str = "subject.instance_data",
    max_files: int = MAX_FILES,
    max_bytes: int = MAX_BYTES,
) -> list[Image.Image]:
    """All images under ``uri`` as RGB ``resolution x resolution`` PIL images, sorted by name."""
    return [im for im, _ in load_images_with_geometry(
        uri, resolution, storage=storage, center_crop=center_crop, field=field, max_files=max_files,
        max_bytes=max_bytes)]


def load_images_with_geometry(
    uri: str,
    resolution: int,
    *,
    storage: Storage | None = None,
    center_crop: bool = True,
    field: str = "subject.instance_data",
    max_files: int = MAX_FILES,
    max_bytes: int = MAX_BYTES,
) -> list[tuple[Image.Image, ImageGeometry]]:
    """:func:`load_images` with each image's :class:`ImageGeometry` (SDXL's size conditioning)."""
    if uri in (DEMO_URI, SUBJECT_URI):  # built-in subjects, drawn in code
        built = demo_images() if uri == DEMO_URI else subject_images(resolution)
        return [prepare_image_with_geometry(im, resolution, center_crop) for im in built]
    storage = storage or Storage()
    sources = _list_sources(storage, uri, field, max_files, max_bytes)
    problems: dict[str, str] = {}
    images: list[tuple[Image.Image, ImageGeometry]] = []
    minimum = min_image_side(resolution)
    for src in sources:
        if Path(src.name).suffix.lower() not in IMAGE_SUFFIXES:
            problems[src.name] = f"not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})"
            continue
        try:
            img = _decode(src.data)
            w, h = _oriented_size(img)
        except _Refused as why:
            problems[src.name] = str(why)
            continue
        if min(w, h) < minimum:
            problems[src.name] = f"too small: {w}x{h}, shorter side must be >= {minimum} px"
            continue
        images.append(prepare_image_with_geometry(img, resolution, center_crop))
    if not sources:
        problems["<folder>"] = "no files found (empty folder or prefix)"
    if problems:
        raise IngestError(field, uri, problems)
    return images
