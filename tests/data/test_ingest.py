"""Instance image ingestion: orientation, RGB, resize + crop, and one error naming every bad file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from raydb.data.demo_subject import DEMO_URI, demo_images
from raydb.data.ingest import (
    ImageGeometry,
    IngestError,
    load_images,
    load_images_with_geometry,
    min_image_side,
    prepare_image,
    prepare_image_with_geometry,
)
from raydb.storage import Storage, join


def _solid(size: tuple[int, int], color=(200, 30, 30), mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, color)


def _rotated_jpeg(path: Path) -> None:
    """A 100x60 landscape JPEG whose EXIF says 'rotate 90° clockwise to display' (orientation 6).

    The left half is red and the right half blue, so once oriented the top is red, the bottom blue.
    """
    img = _solid((100, 60), (220, 20, 20))
    img.paste(_solid((50, 60), (20, 20, 220)), (50, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, "JPEG", exif=exif.tobytes(), quality=95)


def test_prepare_applies_exif_orientation(tmp_path: Path) -> None:
    _rotated_jpeg(tmp_path / "rot.jpg")
    with Image.open(tmp_path / "rot.jpg") as raw:
        assert raw.size == (100, 60)
        assert raw.getexif()[0x0112] == 6
        assert ImageOps.exif_transpose(raw).size == (60, 100)  # tall once oriented
        cropped = prepare_image(raw, 40)
    assert cropped.size == (40, 40)
    # the shorter side (60) became 40, so the tall 40x67 image lost its top and bottom rows
    top, bottom = cropped.getpixel((20, 2)), cropped.getpixel((20, 37))
    assert top[0] > 150 and top[2] < 80, top
    assert bottom[2] > 150 and bottom[0] < 80, bottom
    # loading the folder orients the same way
    (loaded,) = load_images(str(tmp_path), 40)
    assert loaded.getpixel((20, 2))[0] > 150 and loaded.getpixel((20, 37))[2] > 150


def test_prepare_resizes_shorter_side_then_center_crops() -> None:
    img = _solid((300, 100), (0, 0, 0))
    img.paste(_solid((100, 100), (255, 255, 255)), (100, 0))  # a white square in the middle
    out = prepare_image(img, 64)
    assert out.size == (64, 64)
    assert min(out.getpixel((x, 32))[0] for x in range(4, 60)) > 200  # only the middle survives
    squashed = prepare_image(img, 64, center_crop=False)
    assert squashed.size == (64, 64)
    assert squashed.getpixel((2, 32))[0] < 50  # the black sides are kept, squeezed


def test_folder_of_formats_loads(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    _rotated_jpeg(folder / "a_rotated.jpg")
    _solid((80, 120), (10, 200, 10, 128), "RGBA").save(folder / "b_rgba.png")
    _solid((90, 90), 128, "L").save(folder / "c_gray.webp")
    _solid((64, 64)).save(folder / "nested" / "d.JPEG")
    (folder / ".DS_Store").write_bytes(b"\x00junk")  # hidden files are skipped
    images = load_images(str(folder), 32)
    assert len(images) == 4
    for img in images:
        assert img.mode == "RGB"
        assert img.size == (32, 32)
    gray = images[2].getpixel((16, 16))
    assert gray[0] == gray[1] == gray[2]


def test_builtin_demo() -> None:
    images = load_images(DEMO_URI, 64)
    assert len(images) == 5
    assert all(img.size == (64, 64) and img.mode == "RGB" for img in images)
    again = demo_images()
    assert [im.tobytes() for im in again] == [im.tobytes() for im in demo_images()]  # deterministic


def _error(uri: str, resolution: int = 64, **kwargs) -> IngestError:
    with pytest.raises(IngestError) as info:
        load_images(uri, resolution, **kwargs)
    return info.value


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    _solid((64, 64)).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    err = _error(str(tmp_path))
    assert "broken.jpg" in str(err) and "corrupt" in str(err)
    assert "good.png" not in str(err)
    assert str(tmp_path) in str(err) and "subject.instance_data" in str(err)


def test_truncated_image_is_named(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert "cut.jpg" in str(_error(str(tmp_path)))


def test_non_image_file_is_named(tmp_path: Path) -> None:
    _solid((64, 64)).save(tmp_path / "good.png")
    (tmp_path / "notes.txt").write_text("my dog's name is Rex")
    err = _error(str(tmp_path))
    assert set(err.problems) == {"notes.txt"}
    assert "notes.txt: not an image" in str(err)


def test_empty_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert "no files found" in str(_error(str(tmp_path / "empty")))
    assert "does not exist" in str(_error(str(tmp_path / "missing")))


def test_too_small_image_is_named(tmp_path: Path) -> None:
    assert min_image_side(512) == 256 and min_image_side(32) == 32
    _solid((200, 31)).save(tmp_path / "strip.png")
    err = _error(str(tmp_path), 64)
    assert "strip.png" in str(err) and "too small" in str(err) and "200x31" in str(err)


def test_all_bad_files_listed_in_one_error(tmp_path: Path) -> None:
    _solid((64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "bad1.png").write_bytes(b"garbage")
    (tmp_path / "readme.md").write_text("hi")
    _solid((10, 10)).save(tmp_path / "tiny.jpg")
    err = _error(str(tmp_path), field="prior.class_data")
    assert set(err.problems) == {"bad1.png", "readme.md", "tiny.jpg"}
    message = str(err)
    assert message.startswith("prior.class_data: 3 problem(s)")
    for name in ("bad1.png", "readme.md", "tiny.jpg"):
        assert name in message


def test_loads_from_s3(s3_bucket, tmp_path: Path) -> None:
    endpoint, bucket = s3_bucket
    storage = Storage(endpoint)
    for i, size in enumerate([(96, 64), (64, 96), (70, 70)]):
        buf = io.BytesIO()
        _solid(size, (i * 80, 0, 0)).save(buf, "PNG")
        storage.write_bytes(join(bucket, f"subject/img{i}.png"), buf.getvalue())
    images = load_images(join(bucket, "subject"), 64, storage=storage)
    assert [im.size for im in images] == [(64, 64)] * 3
    assert [im.getpixel((0, 0))[0] for im in images] == [0, 80, 160]  # sorted by name

    storage.write_bytes(join(bucket, "subject/notes.txt"), b"x")
    err = _error(join(bucket, "subject"), storage=storage)
    assert set(err.problems) == {"notes.txt"}
    assert "no files found" in str(_error(join(bucket, "empty"), storage=storage))


def _one_png_on_s3(s3_bucket) -> tuple[Storage, str, int]:
    """``(storage, subject uri, PNG size)``: one 64x64 PNG under ``<bucket>/subject``."""
    endpoint, bucket = s3_bucket
    storage = Storage(endpoint)
    buf = io.BytesIO()
    _solid((64, 64)).save(buf, "PNG")
    storage.write_bytes(join(bucket, "subject/img.png"), buf.getvalue())
    return storage, join(bucket, "subject"), len(buf.getvalue())


def test_hidden_files_skipped_on_s3_like_on_disk(s3_bucket) -> None:
    storage, subject, _ = _one_png_on_s3(s3_bucket)
    storage.write_bytes(join(subject, ".DS_Store"), b"\x00junk")
    assert len(load_images(subject, 64, storage=storage)) == 1


def test_decompression_bomb_is_an_ingest_error(tmp_path: Path, monkeypatch) -> None:
    _solid((64, 64)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # 64x64 is now over 2x the limit
    err = _error(str(tmp_path))
    assert set(err.problems) == {"huge.png"}


# -- untrusted input (issue 18) ----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF", "PPM", "ICO", "TGA", "PCX", "SGI"])
def test_other_formats_named_png_are_refused_by_content(tmp_path: Path, fmt: str) -> None:
    _solid((64, 64)).save(tmp_path / "sneaky.png", fmt)
    _solid((64, 64)).save(tmp_path / "real.png", "PNG")
    err = _error(str(tmp_path))
    assert set(err.problems) == {"sneaky.png"} and "not a JPEG, PNG or WebP" in err.problems["sneaky.png"]


def _huge_png(path: Path, width: int, height: int) -> None:
    """A valid grayscale PNG of width x height zeros, streamed so it never exists in memory."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row = zlib.compressobj(9), b"\x00" * (width + 1)  # filter byte + one byte per pixel
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    path.write_bytes(png)


def test_a_150_megapixel_image_is_refused_from_its_header(tmp_path: Path) -> None:
    """Between 1x and 2x Pillow's bomb limit (~89-179 MP) Pillow only warns; ingestion refuses."""
    _huge_png(tmp_path / "huge.png", 12_500, 12_000)  # 150 MP
    assert Image.MAX_IMAGE_PIXELS < 12_500 * 12_000 < 2 * Image.MAX_IMAGE_PIXELS
    err = _error(str(tmp_path))
    assert set(err.problems) == {"huge.png"} and "too many pixels" in err.problems["huge.png"]


def test_malformed_exif_is_named_per_file(tmp_path: Path) -> None:
    import struct

    # orientation 6 (so Pillow rewrites the EXIF) plus an XResolution stored as a NaN float
    entries = [(0x0112, 3, 1, b"\x06\x00\x00\x00"), (0x011A, 11, 1, b"\xff\xff\xff\xff")]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", *e[:3]) + e[3] for e in entries)
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4
    _solid((64, 64)).save(tmp_path / "bad_exif.jpg", "JPEG", exif=exif)
    _rotated_jpeg(tmp_path / "good.jpg")
    err = _error(str(tmp_path))
    assert set(err.problems) == {"bad_exif.jpg"} and "malformed EXIF" in err.problems["bad_exif.jpg"]


def test_file_count_and_byte_caps_are_checked_before_reading(tmp_path: Path) -> None:
    for i in range(3):
        _solid((64, 64)).save(tmp_path / f"img{i}.png")
    assert len(load_images(str(tmp_path), 64, max_files=3)) == 3
    with pytest.raises(IngestError, match="3 files, at most 2"):
        load_images(str(tmp_path), 64, max_files=2)
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    with pytest.raises(IngestError, match=f"{total} bytes in total, at most {total - 1}"):
        load_images(str(tmp_path), 64, max_bytes=total - 1)


def test_byte_cap_on_s3_uses_the_listing(s3_bucket) -> None:
    storage, subject, size = _one_png_on_s3(s3_bucket)
    assert storage.sizes(subject) == [("img.png", size)]
    with pytest.raises(IngestError, match="bytes in total"):
        load_images(subject, 64, storage=storage, max_bytes=10)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_areas_become_white(tmp_path: Path, mode: str) -> None:
    """Transparency is composited on white: fully transparent pixels come out (255, 255, 255), opaque
    ones keep their colour, half-transparent ones are blended half way to white — for RGBA, LA and
    palette images with a transparent index, read from disk like any instance photo.

    Deliberate break caught: the compositing branch removed from ``prepare_image`` (``convert("RGB")``
    then drops alpha and the hidden colour — here red, or black — shows through).
    """
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # left: transparent, hidden colour red
    rgba.paste(Image.new("RGBA", (32, 64), (0, 0, 200, 255)), (32, 0))  # right: opaque blue
    rgba.paste(Image.new("RGBA", (32, 16), (0, 0, 200, 128)), (32, 48))  # bottom right: half alpha
    if mode == "LA":
        img = Image.new("LA", (64, 64), (0, 0))  # transparent black
        img.paste(Image.new("LA", (32, 64), (80, 255)), (32, 0))
    elif mode == "P":
        img = rgba.convert("RGB").quantize(colors=4)
        red = img.getpixel((0, 0))  # the palette index of the (hidden) red left half
        img.info["transparency"] = red
    else:
        img = rgba
    img.save(tmp_path / "x.png", **({"transparency": img.info["transparency"]} if mode == "P" else {}))
    [out] = load_images(str(tmp_path), 64, field="subject.instance_data")
    px = np.asarray(out, dtype=np.int16)
    assert (px[:, :28] == 255).all()  # the transparent left half: white, not red or black
    if mode == "LA":
        assert (px[:, 36:] == 80).all()
    else:
        assert (np.abs(px[4:40, 36:] - [0, 0, 200]) <= 1).all()  # opaque: unchanged
    if mode == "RGBA":
        # alpha 128/255 over white: 200*a + 255*(1-a) for blue, 255*(1-a) for red and green
        a = 128 / 255
        expected = np.array([255 * (1 - a), 255 * (1 - a), 200 * a + 255 * (1 - a)])
        assert (np.abs(px[52:60, 36:60] - expected) <= 1.5).all()


# -- exact messages, boundaries and geometry (issue 19: pinned so that a changed limit or message fails) ----
def _save(img: Image.Image, path: Path, fmt: str | None = None, **kwargs) -> Path:
    img.save(path, fmt, **kwargs)
    return path


def test_ingest_error_message_lists_problems_sorted_one_per_line() -> None:
    err = IngestError("prior.class_data", "s3://b/p", {"z.png": "why z", "a.png": "why a"})
    assert err.problems == {"z.png": "why z", "a.png": "why a"}
    assert str(err) == ("prior.class_data: 2 problem(s) with images under s3://b/p:\n"
                        "  a.png: why a\n  z.png: why z")


@pytest.mark.parametrize("loader", [load_images, load_images_with_geometry])
def test_every_refusal_is_reported_with_its_exact_reason(tmp_path: Path, loader) -> None:
    """Each kind of bad file, sorted so that every kind is followed by another bad file: the scan goes
    on after each refusal, and the image exactly at the minimum side is accepted (not listed). The
    field defaults to ``subject.instance_data``."""
    _save(_solid((200, 31)), tmp_path / "a_tiny.png")  # 64 -> minimum 32 px
    (tmp_path / "b_notes.txt").write_text("not a photo")
    (tmp_path / "c_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _save(_solid((64, 64)), tmp_path / "d_sneaky.png", "BMP")
    _save(_solid((200, 32)), tmp_path / "e_edge.png")  # exactly the minimum: fine
    _save(_solid((31, 90)), tmp_path / "f_narrow.webp")
    with pytest.raises(IngestError) as info:
        loader(str(tmp_path), 64)
    problems = {
        "a_tiny.png": "too small: 200x31, shorter side must be >= 32 px",
        "b_notes.txt": "not an image file (expected one of .jpg, .jpeg, .png, .webp)",
        "c_broken.jpg": "corrupt or unreadable image (OSError)",
        "d_sneaky.png": "content is not a JPEG, PNG or WebP image (whatever its name says)",
        "f_narrow.webp": "too small: 31x90, shorter side must be >= 32 px",
    }
    assert info.value.problems == problems
    assert str(info.value) == "\n".join(
        [f"subject.instance_data: 5 problem(s) with images under {tmp_path}:"]
        + [f"  {name}: {why}" for name, why in problems.items()])


def test_minimum_side_is_half_the_resolution_rounded_down_and_at_least_32(tmp_path: Path) -> None:
    assert [min_image_side(r) for r in (16, 64, 65, 66, 101, 512)] == [32, 32, 32, 33, 50, 256]
    assert all(type(min_image_side(r)) is int for r in (65, 101))
    _save(_solid((50, 120)), tmp_path / "edge.png")
    assert len(load_images(str(tmp_path), 101)) == 1  # 50 == min_image_side(101)
    _save(_solid((120, 49)), tmp_path / "small.png")
    assert _error(str(tmp_path), 101).problems == {
        "small.png": "too small: 120x49, shorter side must be >= 50 px"}


def test_file_and_byte_caps_are_inclusive_and_reported_exactly(tmp_path: Path) -> None:
    for i in range(3):
        _save(_solid((64, 64)), tmp_path / f"img{i}.png")
    total = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert len(load_images(str(tmp_path), 64, max_files=3, max_bytes=total)) == 3
    err = _error(str(tmp_path), max_files=2, field="prior.class_data")
    assert err.problems == {"<folder>": "3 files, at most 2 allowed"}
    assert str(err) == (f"prior.class_data: 1 problem(s) with images under {tmp_path}:\n"
                        "  <folder>: 3 files, at most 2 allowed")
    with pytest.raises(IngestError) as info:
        load_images_with_geometry(str(tmp_path), 64, max_bytes=total - 1, field="prior.class_data")
    assert str(info.value) == (f"prior.class_data: 1 problem(s) with images under {tmp_path}:\n"
                               f"  <folder>: {total} bytes in total, at most {total - 1} allowed")


def test_missing_and_empty_folders_are_reported_exactly(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    err = _error(str(missing), field="prior.class_data")
    assert str(err) == (f"prior.class_data: 1 problem(s) with images under {missing}:\n"
                        f"  {missing}: folder does not exist")
    assert err.problems == {str(missing): "folder does not exist"}
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_bytes(b"x")  # hidden files do not count
    with pytest.raises(IngestError) as info:
        load_images_with_geometry(str(tmp_path / "empty"), 64, field="prior.class_data")
    assert str(info.value) == (f"prior.class_data: 1 problem(s) with images under {tmp_path / 'empty'}:\n"
                               "  <folder>: no files found (empty folder or prefix)")


# 64 x 64 over 2x the limit (Pillow's error), then between 1x and 2x (only Pillow's warning)
@pytest.mark.parametrize("limit", [64 * 64 // 2 - 1, 64 * 64 - 1])
def test_pixel_limit_refusal_names_the_limit(tmp_path: Path, monkeypatch, limit: int) -> None:
    _save(_solid((64, 64)), tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    assert _error(str(tmp_path)).problems == {
        "huge.png": f"too many pixels: over the {limit} pixel limit (Image.MAX_IMAGE_PIXELS)"}
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)  # exactly at the limit: fine
    assert len(load_images(str(tmp_path), 64)) == 1


def _exif_jpeg(path: Path, entries: list[tuple[int, int, int, bytes]], size=(64, 48)) -> None:
    """A JPEG whose EXIF IFD holds ``entries`` (tag, type, count, 4-byte value or offset)."""
    import struct

    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", *e[:3]) + e[3] for e in entries)
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd + b"\x00" * 4
    _solid(size).save(path, "JPEG", exif=exif)


def test_skippable_exif_damage_warns_but_the_photo_is_accepted_and_oriented(tmp_path: Path) -> None:
    """A tag pointing past the end of the file: Pillow warns (UserWarning) and skips the tag, both when
    decoding and when orienting; that is not a reason to refuse the photo (only the pixel-limit warning
    is), and the orientation tag (6: rotate) is still applied."""
    import struct

    _exif_jpeg(tmp_path / "skippable.jpg", [(0x0112, 3, 1, b"\x06\x00\x00\x00"),
                                            (0x010E, 2, 100, struct.pack("<I", 5000))])
    with pytest.warns(UserWarning):  # the wording varies by Pillow release
        [(img, geometry)] = load_images_with_geometry(str(tmp_path), 32)
    assert img.size == (32, 32)
    assert geometry.original_size == (64, 48)  # (height, width) once rotated: portrait


def test_malformed_exif_reason_names_the_error_cut_to_80_characters(tmp_path: Path, monkeypatch) -> None:
    """Pillow's EXIF parser can raise anything with any message; the per-file reason keeps the type and at
    most 80 characters of the message (fault injected, as the parser's messages are short)."""
    _save(_solid((64, 64)), tmp_path / "a.png")

    def broken(image, **kwargs):
        raise struct_error("0123456789" * 10)

    struct_error = type("error", (Exception,), {})
    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    assert _error(str(tmp_path)).problems == {"a.png": f"malformed EXIF data (error: {'0123456789' * 8})"}


def test_only_jpeg_png_webp_plugins_ever_parse_a_file(tmp_path: Path, monkeypatch) -> None:
    """Every ``Image.open`` that ingestion makes is restricted to the three formats, so a BMP named
    ``.png`` is refused before the BMP plugin parses a byte of it."""
    from PIL import BmpImagePlugin

    _save(_solid((64, 64)), tmp_path / "a_real.png")
    _save(_solid((64, 64)), tmp_path / "b_sneaky.png", "BMP")
    opened, bmp_parsed, real_open = [], [], Image.open

    def spy_open(fp, mode="r", formats=None):
        opened.append(formats)
        return real_open(fp, mode, formats)

    real_bmp_open = BmpImagePlugin.BmpImageFile._open

    def spy_bmp(self):
        bmp_parsed.append(True)
        return real_bmp_open(self)

    monkeypatch.setattr(Image, "open", spy_open)
    monkeypatch.setattr(BmpImagePlugin.BmpImageFile, "_open", spy_bmp)
    assert set(_error(str(tmp_path)).problems) == {"b_sneaky.png"}
    assert opened and all(tuple(f) == ("JPEG", "PNG", "WEBP") for f in opened), opened
    assert bmp_parsed == []


def _two_tone(size: tuple[int, int]) -> Image.Image:
    """A horizontal gradient (red) over a vertical one (green): every column and row differs."""
    w, h = size
    px = np.zeros((h, w, 3), dtype=np.uint8)
    px[..., 0] = (np.arange(w) * 255 // (w - 1))[None, :]
    px[..., 1] = (np.arange(h) * 255 // (h - 1))[:, None]
    return Image.fromarray(px)


@pytest.mark.parametrize(("size", "resized", "corner"), [
    ((64, 48), (32, 43), (0, 5)),  # landscape: 64 * 32 / 48 = 42.7 -> 43 wide, (43 - 32) // 2 = 5 cut left
    ((48, 64), (43, 32), (5, 0)),  # portrait: the same, top and bottom
    ((40, 40), (32, 32), (0, 0)),
])
def test_center_crop_geometry_and_pixels(size, resized, corner) -> None:
    """Shorter side resized to the resolution (bicubic), then the centred square cut out; the geometry
    (all (height, width) / (top, left)) says exactly where the crop came from, and the default is to crop."""
    img = _two_tone(size)
    out, geometry = prepare_image_with_geometry(img, 32)
    assert geometry == ImageGeometry((size[1], size[0]), resized, corner, (32, 32))
    top, left = corner
    expected = img.resize(resized[::-1], Image.Resampling.BICUBIC).crop((left, top, left + 32, top + 32))
    assert out.size == (32, 32) and out.tobytes() == expected.tobytes()
    assert prepare_image(img, 32).tobytes() == expected.tobytes()


def test_squash_geometry_and_pixels() -> None:
    img = _two_tone((64, 48))
    out, geometry = prepare_image_with_geometry(img, 32, center_crop=False)
    assert geometry == ImageGeometry((48, 64), (32, 32), (0, 0), (32, 32))
    assert out.tobytes() == img.resize((32, 32), Image.Resampling.BICUBIC).tobytes()


def test_loaders_crop_by_default_and_squash_on_request(tmp_path: Path) -> None:
    img = _two_tone((64, 48))
    _save(img, tmp_path / "photo.png")
    cropped = prepare_image(img, 32).tobytes()
    squashed = prepare_image(img, 32, center_crop=False).tobytes()
    assert cropped != squashed
    [(default, geometry)] = load_images_with_geometry(str(tmp_path), 32)
    assert default.tobytes() == cropped and geometry.crop_top_left == (0, 5)
    [(flat, geometry)] = load_images_with_geometry(str(tmp_path), 32, center_crop=False)
    assert flat.tobytes() == squashed and geometry.resized_size == (32, 32)
    assert [im.tobytes() for im in load_images(str(tmp_path), 32)] == [cropped]
    assert [im.tobytes() for im in load_images(str(tmp_path), 32, center_crop=True)] == [cropped]
    assert [im.tobytes() for im in load_images(str(tmp_path), 32, center_crop=False)] == [squashed]


def test_geometry_of_a_whole_image_and_of_a_mirrored_crop() -> None:
    whole = ImageGeometry.whole(Image.new("RGB", (40, 30)))
    assert whole == ImageGeometry((30, 40), (30, 40), (0, 0), (30, 40))
    # flipped left-right, the 32 px crop starting 5 px from the left of a 43 px row starts 43 - 32 - 5 = 6
    # px from the left of the flipped row
    geometry = ImageGeometry((48, 64), (32, 43), (0, 5), (32, 32))
    assert geometry.mirrored() == ImageGeometry((48, 64), (32, 43), (0, 6), (32, 32))
    assert ImageGeometry((64, 48), (43, 32), (5, 0), (32, 32)).mirrored().crop_top_left == (5, 0)
    resized = _two_tone((43, 32))
    crop = resized.crop((5, 0, 37, 32)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    flipped = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert flipped.crop((6, 0, 38, 32)).tobytes() == crop.tobytes()


def test_gray_and_cmyk_photos_come_out_rgb(tmp_path: Path) -> None:
    _save(Image.new("L", (40, 40), 90), tmp_path / "a_gray.png")
    _save(Image.new("CMYK", (40, 40), (0, 0, 0, 0)), tmp_path / "b_cmyk.jpg")
    gray, cmyk = load_images(str(tmp_path), 32)
    assert gray.mode == cmyk.mode == "RGB"
    assert gray.getpixel((16, 16)) == (90, 90, 90)
    assert all(c >= 250 for c in cmyk.getpixel((16, 16)))  # no ink: white


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_colour_key_transparency_becomes_white(tmp_path: Path, mode: str) -> None:
    """A gray or RGB PNG may mark one colour transparent (a tRNS chunk): those pixels come out white too.

    Bug found by mutation testing (issue 19): only alpha modes and palette images were composited, so a
    colour-keyed PNG showed its hidden key colour.
    """
    key, shown = (7, 200) if mode == "L" else ((10, 20, 30), (0, 0, 200))
    img = Image.new(mode, (64, 64), key)
    img.paste(Image.new(mode, (32, 64), shown), (32, 0))
    _save(img, tmp_path / "keyed.png", transparency=key)
    [out] = load_images(str(tmp_path), 64)
    px = np.asarray(out)
    assert (px[:, :30] == 255).all()
    expected = [shown] * 3 if mode == "L" else list(shown)
    assert (px[:, 34:] == expected).all()


def test_palette_with_alpha_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.paste(Image.new("RGBA", (20, 40), (0, 0, 200, 255)), (20, 0))
    pa = rgba.convert("PA")
    assert pa.mode == "PA"
    px = np.asarray(prepare_image(pa, 40, center_crop=False))
    assert (px[:, :18] == 255).all()
    assert (px[:, 22:] == [0, 0, 200]).all()
