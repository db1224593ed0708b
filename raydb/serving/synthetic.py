"""Random adapters for tests and benchmarks: many distinct subjects without training each one.

Serving tests need eight or more subjects (and adapters of a chosen rank, e.g. one above
``serve.max_lora_rank``); training each costs seconds. :func:`register_random_adapter` takes a
trained subject's ``adapter.json`` as the template (tenant, tokens, base model), writes seeded random
LoRA factors for the same modules in diffusers' format — with the LoRA config in the safetensors
header, exactly as training writes it — and registers the result as a new subject.
"""

from __future__ import annotations

import hashlib
import json

import torch

from raydb.registry import ADAPTER_META, ADAPTER_WEIGHTS, latest_version, register_adapter
from raydb.serving.adapters import read_adapter
from raydb.storage import Storage, join

__all__ = ["random_lora_weights", "register_random_adapter"]


def random_lora_weights(shapes: dict[str, tuple[int, int]], *, rank: int, alpha: float, seed: int,
                        config: dict | None = None, std: float = 0.5) -> bytes:
    """safetensors bytes: for each ``"unet.<module>"`` -> (out, in), a random rank-``rank`` LoRA.

    ``config``: the template's header LoRA config (diffusers needs its ``unet.target_modules``).
    ``down`` [rank, in] ~ N(0, 1/in), ``up`` [out, rank] ~ N(0, std^2/rank): a delta of roughly
    ``std * alpha / rank`` times the input's scale, enough to change images visibly.
    """
    from safetensors.torch import save

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, (out_features, in_features) in sorted(shapes.items()):
        tensors[f"{key}.lora.down.weight"] = torch.randn(rank, in_features, generator=gen) / in_features**0.5
        tensors[f"{key}.lora.up.weight"] = torch.randn(out_features, rank, generator=gen) * std / rank**0.5
    config = {k: v for k, v in (config or {}).items() if k.startswith("unet.")}
    config |= {"unet.r": rank, "unet.lora_alpha": alpha, "unet.use_rslora": False, "unet.use_dora": False}
    return save(tensors, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})


def register_random_adapter(storage: Storage, workspace: str, template_subject: str, subject_id: str, *,
                            rank: int, seed: int, alpha: float | None = None) -> dict:
    """Register ``subject_id``: ``template_subject``'s adapter.json with random weights.

    Returns the registry record ``{subject_id, version, uri, registered_at}``.
    """
    template = latest_version(storage, workspace, template_subject)["uri"]
    meta = storage.read_json(join(template, ADAPTER_META))
    _, state, lora_config = read_adapter(storage, template, meta["base_model"]["identity"])
    shapes = {key.removesuffix(".lora.down.weight"): (0, tensor.shape[1])
              for key, tensor in state.items() if key.endswith(".lora.down.weight")}
    for key, tensor in state.items():
        if key.endswith(".lora.up.weight"):
            module = key.removesuffix(".lora.up.weight")
            shapes[module] = (tensor.shape[0], shapes[module][1])
    weights = random_lora_weights(shapes, rank=rank, alpha=float(alpha or rank), seed=seed,
                                  config=lora_config)
    meta = meta | {"weights": ADAPTER_WEIGHTS, "weights_sha256": hashlib.sha256(weights).hexdigest(),
                   "subject": meta["subject"] | {"id": subject_id},
                   "lora": meta.get("lora", {}) | {"rank": rank, "alpha": float(alpha or rank)}}
    staging = join(workspace, "synthetic-adapters", subject_id)
    storage.write_bytes(join(staging, ADAPTER_WEIGHTS), weights)
    storage.write_json(join(staging, ADAPTER_META), meta)
    return register_adapter(storage, workspace, subject_id, staging)
