"""DINO: the DreamBooth paper's subject-fidelity score for real models (``eval.dino_model``).

Mean cosine similarity between the ViT ``[CLS]`` embeddings of generated images and of the real
instance photos. The paper prefers it to CLIP-I because a self-supervised DINO model tells apart
two objects of the same class (CLIP embeds both near "a dog"). The user supplies the weights: a
local folder or hub id of any transformers ViT-style model (e.g. ``facebook/dino-vits16``, as the
paper; DINOv2 works the same way), or ``tiny`` — a random ViT built in code, for tests, whose numbers
only prove the path works.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["load_dino", "dino_score"]

_MEAN = (0.485, 0.456, 0.406)  # ImageNet's, as DINO was trained
_STD = (0.229, 0.224, 0.225)


def load_dino(spec: str) -> Any:
    """A ViT-style image model in eval mode; ``tiny`` is built in code with seeded random weights."""
    from transformers import AutoModel, ViTConfig, ViTModel

    if spec == "tiny":
        torch.manual_seed(5678)
        config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8)
        return ViTModel(config, add_pooling_layer=False).eval()
    return AutoModel.from_pretrained(spec).eval()


def _pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """Resize (shorter side) + center crop to ``size``, ImageNet-normalised: ``[N, 3, size, size]``."""
    from raydb.data.ingest import prepare_image

    arr = np.stack([np.asarray(prepare_image(im, size), dtype=np.float32) / 255.0 for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return (x - torch.tensor(_MEAN).view(1, 3, 1, 1)) / torch.tensor(_STD).view(1, 3, 1, 1)


@torch.no_grad()
def dino_score(model: Any, generated: list[Image.Image], references: list[Image.Image]) -> float:
    """Mean cosine similarity (in [-1, 1]) over all (generated, reference) pairs of ``[CLS]`` embeddings."""
    size = model.config.image_size
    size = size if isinstance(size, int) else size[0]

    def embed(images: list[Image.Image]) -> torch.Tensor:
        cls = model(pixel_values=_pixels(images, size)).last_hidden_state[:, 0]
        return torch.nn.functional.normalize(cls.float(), dim=-1)

    return float((embed(generated) @ embed(references).T).mean())
