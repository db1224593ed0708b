"""The one preparation path (image -> flips -> geometry -> conditioning), without a model or Ray."""

from __future__ import annotations

import torch
from PIL import Image, ImageOps

from raydb.data.demo_subject import demo_images
from raydb.data.ingest import ImageGeometry
from raydb.encode.inputs import EncodeInputs, PreparedImages, prepare_inputs, subject_photos
from raydb.models.sdxl import time_ids_for
from raydb.storage import Storage
from tests.helpers.images import image_folder


def _wide(width: int, height: int) -> Image.Image:
    """A picture whose left and right halves differ, so a mirror is visible."""
    img = Image.new("RGB", (width, height), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, width // 3, height))
    return img


def test_flips_append_mirrored_images_with_mirrored_crops():
    geometry = ImageGeometry((300, 400), (64, 85), (0, 5), (64, 64))  # a crop 5 px from the left
    image = _wide(64, 64)
    flipped = PreparedImages([image], [geometry]).flipped()
    assert len(flipped) == 2 and flipped.images[0] is image
    assert list(flipped.images[1].getdata()) == list(ImageOps.mirror(image).getdata())
    # seen from the right, the same crop starts 85 - 64 - 5 = 16 px from the left
    assert flipped.geometry == [geometry, ImageGeometry((300, 400), (64, 85), (0, 16), (64, 64))]
    assert torch.equal(flipped.time_ids(), torch.tensor([[300, 400, 0, 5, 64, 64], [300, 400, 0, 16, 64, 64]],
                                                        dtype=torch.float32))


def test_whole_images_are_uncropped_and_conditioning_is_sdxl_only():
    images = demo_images(2, size=48)
    whole = PreparedImages.whole(images)
    assert whole.geometry == [ImageGeometry((48, 48), (48, 48), (0, 0), (48, 48))] * 2
    empty = PreparedImages([], [])
    assert EncodeInputs(whole, whole, empty, "sd").conditioning() is None
    cond = EncodeInputs(whole, empty, whole, "sdxl").conditioning()
    assert list(cond) == ["instance", "class", "holdout"]  # the order the encode cache key hashes
    assert torch.equal(cond["instance"], time_ids_for(whole.geometry)) and cond["class"].shape == (0, 6)


def test_prepare_inputs_flips_instance_and_class_images_never_the_holdout(make_cfg, tmp_path):
    photos = image_folder(tmp_path / "photos", [_wide(96, 64), _wide(64, 96)])
    classes = image_folder(tmp_path / "classes", [_wide(80, 64) for _ in range(5)])
    cfg = make_cfg(subject={"instance_data": photos}, train={"random_flip": True},
                   prior={"class_data": classes, "num_class_images": 3, "num_holdout": 2})
    inputs = prepare_inputs(cfg, Storage(), family="sdxl", with_holdout=True)
    assert (len(inputs.instance), len(inputs.classes), len(inputs.holdout)) == (4, 6, 2)
    # the photos by the ingestion rules: resized to 64 on the short side and centre-cropped
    assert inputs.instance.geometry[0] == ImageGeometry((64, 96), (64, 96), (0, 16), (64, 64))
    assert inputs.instance.geometry[2] == inputs.instance.geometry[0].mirrored()
    assert inputs.instance.images[:2] == subject_photos(cfg, Storage()).images
    assert inputs.conditioning()["holdout"].shape == (2, 6)
    unflipped = make_cfg(subject={"instance_data": photos},
                         prior={"class_data": classes, "num_class_images": 3, "num_holdout": 2})
    plain = prepare_inputs(unflipped, Storage(), family="sd")
    assert (len(plain.instance), len(plain.classes), len(plain.holdout)) == (2, 3, 0)
