"""Instance image ingestion: orientation, RGB, resize + crop, and one error naming every bad file."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from raydb.data.demo import DEMO_URI, demo_images
from raydb.data.ingest import IngestError, load_images, min_image_side, prepare_image
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
