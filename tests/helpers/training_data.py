"""Synthetic training data whose tensors say where they came from (no model, no Ray).

Every element of image i's latent mean is ``sign * (100 + i)`` (instance images +, class images -),
its std one thousandth of that and, when asked, its time ids the same number, so any batch row can
be traced back to its image with :func:`image_code`: ``+i`` for instance image i, ``-(j + 1)`` for
class image j.
"""

from __future__ import annotations

import torch

from raydb.encode.encoders import EncodedImages
from raydb.train.data import MicroBatch, TrainingData, make_micro_batch

NUM_TRAIN_TIMESTEPS = 1000


def coded(count: int, sign: float, shape: tuple[int, ...], *, with_time_ids: bool = False) -> EncodedImages:
    """``count`` latent distributions of ``shape``, each coded as the module docstring says."""
    mean = torch.stack([torch.full(shape, sign * (100.0 + i)) for i in range(count)])
    time_ids = mean.flatten(1)[:, :1].expand(count, 6).clone() if with_time_ids else None
    return EncodedImages(mean, mean / 1000, time_ids)


def image_code(rows: torch.Tensor) -> list[int]:
    """The image code of each row of a latent-mean (or pixel, or time-id) tensor."""
    values = rows.reshape(rows.shape[0], -1)[:, 0].tolist()
    return [int(v - 100) if v > 0 else -int(-v - 100) - 1 for v in values]


def coded_data(n_instance: int, n_class: int | None, shape: tuple[int, ...], *, embed_dim: int = 32,
               length: int = 77, dtype: torch.dtype = torch.float32) -> TrainingData:
    """Coded instance and (unless ``n_class`` is None) class images, with seeded random prompt
    embeddings ``[1, length, embed_dim]`` and constant token ids (1: instance, 2: class)."""
    g = torch.Generator().manual_seed(7)
    with_prior = n_class is not None
    return TrainingData(
        instance=coded(n_instance, +1.0, shape),
        class_=coded(n_class, -1.0, shape) if with_prior else None,
        instance_embeds=torch.randn(1, length, embed_dim, generator=g, dtype=dtype),
        class_embeds=torch.randn(1, length, embed_dim, generator=g, dtype=dtype) if with_prior else None,
        instance_ids=torch.full((1, length), 1, dtype=torch.long),
        class_ids=torch.full((1, length), 2, dtype=torch.long) if with_prior else None,
        latent_shape=shape,
    )


def micro_batch(data: TrainingData, step: int, *, batch_size: int = 1, micro: int = 0, accumulation: int = 1,
                rank: int = 0, world_size: int = 1, seed: int = 0) -> MicroBatch:
    """``make_micro_batch`` over a 1000-step schedule, rank 0 of 1 and one micro-batch by default."""
    return make_micro_batch(data, step=step, micro=micro, batch_size=batch_size, accumulation=accumulation,
                            seed=seed, num_train_timesteps=NUM_TRAIN_TIMESTEPS, rank=rank,
                            world_size=world_size)
