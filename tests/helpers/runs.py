"""What a finished training run left behind, read back from a train stage's result (``run_dir``,
``adapter_uri``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load

from raydb.registry import ADAPTER_WEIGHTS


def run_metrics(result: dict) -> list[dict]:
    """The run's ``metrics.jsonl``, one dict per optimizer step."""
    return [json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]


def adapter_bytes(result: dict) -> bytes:
    """The run's adapter weights file, as bytes."""
    return (Path(result["adapter_uri"]) / ADAPTER_WEIGHTS).read_bytes()


def adapter_tensors(result: dict) -> dict[str, torch.Tensor]:
    return load(adapter_bytes(result))
