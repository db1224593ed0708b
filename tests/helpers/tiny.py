"""The tiny model ready to train in this process: components, prepared data and the train state."""

from __future__ import annotations

import torch

from raydb.config import RaydbConfig
from raydb.models.components import Components, load_components
from raydb.storage import Storage
from raydb.train.data import TrainingData
from raydb.train.local import prepare_training_data
from raydb.train.step import TrainState, build_train_state


def training_setup(cfg: RaydbConfig, dtype: torch.dtype = torch.float32,
                   ) -> tuple[Components, TrainingData, TrainState]:
    """What ``train_subject`` builds before its loop: the base model in ``dtype``, the subject's
    prepared (and encoded) data, LoRA + AdamW + schedule."""
    storage = Storage()
    components = load_components(cfg.model, storage, cfg.workspace, dtype=dtype)
    data = prepare_training_data(cfg, components, storage)
    state = build_train_state(cfg, components.denoiser, *components.lora_text_encoders)
    return components, data, state
