"""What the encoders see: every image of a training prepared one way, for the Ray encode stage, the
single-process trainer, validation and SDXL alike.

    image -> flips -> geometry -> conditioning

1. **images**: the subject's photos by the ingestion rules (oriented, resized and cropped to
   ``train.resolution``, each with the :class:`~raydb.data.ingest.ImageGeometry` of what was done to
   it), the class images from the prior stage (generated ones are whole pictures at their own size;
   ``prior.class_data`` goes through ingestion too) and, for validation, the held-out class images;
2. **flips**: with ``train.random_flip`` the instance and class images get mirrored copies appended
   (cached as entries of their own), each with its geometry mirrored — a flipped crop's left edge is
   the picture's other side; held-out images are never flipped;
3. **geometry -> conditioning**: SDXL's ``time_ids`` ``[N, 6]`` per image, from its geometry
   (``original_size + crop_top_left + target_size``); SD 1.x/2.x has none.

The encode stage (:func:`raydb.encode.stage.prepare_encoded`), the single-process trainer
(:func:`raydb.train.local.prepare_training_data`), the validator's CLIP photos and the
prior-preservation finding all start here, so an image is flipped, framed and conditioned the same
way whichever of them encodes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageOps

from raydb.config import RaydbConfig
from raydb.data.ingest import ImageGeometry, load_images_with_geometry
from raydb.models.family import SDXL
from raydb.models.sdxl import time_ids_for
from raydb.storage import Storage

__all__ = ["PreparedImages", "EncodeInputs", "subject_photos", "prepare_inputs"]


@dataclass
class PreparedImages:
    """Images at the training resolution, each with what was done to it (same length, same order)."""

    images: list[Image.Image]
    geometry: list[ImageGeometry]

    @classmethod
    def of(cls, pairs: list[tuple[Image.Image, ImageGeometry]]) -> PreparedImages:
        """From ``(image, geometry)`` pairs, as ingestion and the prior stage return them."""
        return cls([image for image, _ in pairs], [geometry for _, geometry in pairs])

    @classmethod
    def whole(cls, images: list[Image.Image]) -> PreparedImages:
        """Images taken as they are: whole, uncropped pictures at their own size."""
        return cls(list(images), [ImageGeometry.whole(image) for image in images])

    def flipped(self) -> PreparedImages:
        """These images, then their horizontal mirrors (whose crops are mirrored too)."""
        return PreparedImages(self.images + [ImageOps.mirror(image) for image in self.images],
                              self.geometry + [g.mirrored() for g in self.geometry])

    def time_ids(self) -> torch.Tensor:
        """SDXL's ``[N, 6]`` fp32 size/crop conditioning of these images."""
        return time_ids_for(self.geometry)

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class EncodeInputs:
    """Everything a training encodes: ``instance``, ``classes`` (empty without prior preservation)
    and ``holdout`` (empty unless validation asked for it), for a base model of ``family``."""

    instance: PreparedImages
    classes: PreparedImages
    holdout: PreparedImages
    family: str

    def conditioning(self) -> dict[str, torch.Tensor] | None:
        """``{"instance", "class", "holdout"}`` -> ``[N, 6]`` time ids for SDXL; None for SD."""
        if self.family != SDXL:
            return None
        return {"instance": self.instance.time_ids(), "class": self.classes.time_ids(),
                "holdout": self.holdout.time_ids()}


def subject_photos(cfg: RaydbConfig, storage: Storage) -> PreparedImages:
    """The subject's photos (``subject.instance_data``) by the ingestion rules, unflipped."""
    return PreparedImages.of(load_images_with_geometry(
        cfg.subject.instance_data, cfg.train.resolution, storage=storage, center_crop=cfg.train.center_crop))


def prepare_inputs(cfg: RaydbConfig, storage: Storage, *, family: str, with_holdout: bool = False,
                   instance: PreparedImages | None = None,
                   classes: PreparedImages | None = None) -> EncodeInputs:
    """Steps 1-2 of the module docstring (step 3 is :meth:`EncodeInputs.conditioning`).

    ``instance`` / ``classes`` replace the subject's photos / the prior stage's class images (tests,
    and experiments that train one set of images several times); they are flipped like the others.
    Reading the class images generates whatever the prior cache still lacks.
    """
    from raydb.prior.stage import class_images_with_geometry

    instance = instance if instance is not None else subject_photos(cfg, storage)
    classes = classes if classes is not None else PreparedImages.of(class_images_with_geometry(cfg, storage))
    holdout = PreparedImages.of(class_images_with_geometry(cfg, storage, holdout=True)) if with_holdout \
        else PreparedImages([], [])
    if cfg.train.random_flip:
        instance, classes = instance.flipped(), classes.flipped()
    return EncodeInputs(instance, classes, holdout, family)
