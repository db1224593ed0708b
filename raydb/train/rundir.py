"""A training run's folder: ``<workspace>/tenants/<tenant>/runs/<subject>/<run id>/`` — one owner
for its names (under the tenant's folder, beside its registry: subject ids are per tenant).

The run id hashes every training-relevant setting, so the same command resumes the same run and a
finished run is recognised instead of trained again. Inside the folder:

* ``checkpoints/step-NNNNNNN/`` (single-process runs) or ``checkpoint-step-NNNNNNN/`` (Ray Train's
  checkpoints) each hold ``state.safetensors`` + ``state.json`` (the JSON is written last and marks
  the checkpoint complete): LoRA, optimizer, lr schedule, grad scaler, step, RNG, metrics so far;
* ``adapter/`` (the registry's adapter files: weights, ``adapter.json``, ``loss_curve.png``,
  ``samples.png``), ``metrics.jsonl``, and ``result.json`` (what a Ray Train run hands back to its
  driver).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from raydb.config import RaydbConfig
from raydb.registry import ADAPTER_META, tenant_uri
from raydb.storage import Storage, join
from raydb.train.checkpoint import state_from_bytes, state_to_bytes
from raydb.train.lora import load_lora_state, lora_state_dicts
from raydb.train.step import TrainState

__all__ = ["CHECKPOINT_TENSORS", "CHECKPOINT_META", "RESULT", "run_id", "runs_uri", "run_uri", "adapter_uri",
           "checkpoint_payload", "restore_payload", "write_checkpoint_dir", "restore_checkpoint_dir",
           "save_checkpoint", "latest_checkpoint", "finished_adapter", "checkpoint_dir_name"]

CHECKPOINT_TENSORS = "state.safetensors"
CHECKPOINT_META = "state.json"
RESULT = "result.json"


def run_id(cfg: RaydbConfig) -> str:
    """Deterministic id of a training run: the same command resumes the same run."""
    relevant = {k: cfg.to_dict()[k] for k in ("model", "subject", "prior", "lora", "train")}
    relevant["num_workers"] = cfg.cluster.num_workers
    relevant["train"].pop("checkpoint_every", None)
    relevant["train"].pop("checkpoints_to_keep", None)
    if relevant["prior"]["mode"] == "images":  # the default keeps the ids runs had before prior.mode
        del relevant["prior"]["mode"]
    if relevant["train"].get("sample_guidance_scale") is None:  # likewise (the key came later)
        relevant["train"].pop("sample_guidance_scale", None)
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:10]
    return f"{cfg.subject.id}-{digest}"


def runs_uri(cfg: RaydbConfig) -> str:
    """The folder of every run of the subject (Ray Train's storage path)."""
    return join(tenant_uri(cfg.workspace, cfg.subject.tenant), "runs", cfg.subject.id)


def run_uri(cfg: RaydbConfig) -> str:
    return join(runs_uri(cfg), run_id(cfg))


def adapter_uri(cfg: RaydbConfig) -> str:
    """The run's finished adapter (weights + adapter.json)."""
    return join(run_uri(cfg), "adapter")


def checkpoint_dir_name(step: int) -> str:
    """Ray Train's checkpoint folder name for ``step`` (sortable)."""
    return f"checkpoint-step-{step:07d}"


def checkpoint_payload(state: TrainState, metrics: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    """Checkpoint as (safetensors, JSON): LoRA, optimizer, lr schedule, scaler, step, RNG, metrics."""
    return state_to_bytes({
        "lora": lora_state_dicts(state.unet, state.text_encoder, state.text_encoder_2,
                                 dtype=None),  # the master weights' dtype
        "optimizer": state.optimizer.state_dict(),
        "lr_scheduler": state.lr_scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler else None,
        "step": state.step,
        "rng": torch.get_rng_state(),
        "metrics": json.dumps(metrics),
    })


def restore_payload(state: TrainState, tensor_bytes: bytes, json_bytes: bytes) -> list[dict[str, Any]]:
    """Load a checkpoint into ``state``; returns the metrics history up to its step."""
    payload = state_from_bytes(tensor_bytes, json_bytes)
    load_lora_state(state.unet, payload["lora"], state.text_encoder, state.text_encoder_2)
    state.optimizer.load_state_dict(payload["optimizer"])
    state.lr_scheduler.load_state_dict(payload["lr_scheduler"])
    if state.scaler and payload["scaler"]:
        state.scaler.load_state_dict(payload["scaler"])
    state.step = int(payload["step"])
    torch.set_rng_state(payload["rng"])
    return json.loads(payload["metrics"])


def write_checkpoint_dir(folder: Path, state: TrainState, metrics: list[dict[str, Any]]) -> None:
    """A checkpoint as two files in a local folder (what Ray Train uploads)."""
    tensors, skeleton = checkpoint_payload(state, metrics)
    (folder / CHECKPOINT_TENSORS).write_bytes(tensors)
    (folder / CHECKPOINT_META).write_bytes(skeleton)


def restore_checkpoint_dir(folder: Path, state: TrainState) -> list[dict[str, Any]]:
    """Inverse of :func:`write_checkpoint_dir`."""
    return restore_payload(state, (folder / CHECKPOINT_TENSORS).read_bytes(),
                           (folder / CHECKPOINT_META).read_bytes())


def save_checkpoint(storage: Storage, run: str, state: TrainState, metrics: list[dict[str, Any]],
                    keep: int) -> None:
    """Single-process checkpoint into ``<run>/checkpoints/step-NNNNNNN``; keeps the newest ``keep``."""
    tensors, skeleton = checkpoint_payload(state, metrics)
    uri = join(run, "checkpoints", f"step-{state.step:07d}")
    storage.write_bytes(join(uri, CHECKPOINT_TENSORS), tensors)
    storage.write_bytes(join(uri, CHECKPOINT_META), skeleton)  # written last: marks it complete
    names = sorted(n.rstrip("/") for n in storage.list(join(run, "checkpoints")) if n.startswith("step-"))
    for old in names[:-keep]:
        storage.delete(join(run, "checkpoints", old), recursive=True)


def latest_checkpoint(storage: Storage, run: str) -> str | None:
    """The newest complete single-process checkpoint of ``run`` (None: start from scratch)."""
    names = [n.rstrip("/") for n in storage.list(join(run, "checkpoints")) if n.startswith("step-")]
    for name in sorted(names, reverse=True):
        uri = join(run, "checkpoints", name)
        if storage.exists(join(uri, CHECKPOINT_META)):
            return uri
    return None


def finished_adapter(cfg: RaydbConfig, storage: Storage) -> dict[str, Any] | None:
    """``adapter.json`` of the run if it already trained ``train.max_steps`` (else None)."""
    meta = storage.read_json_or(join(adapter_uri(cfg), ADAPTER_META))
    if meta and meta.get("metrics", {}).get("steps", 0) >= cfg.train.max_steps:
        return meta
    return None
