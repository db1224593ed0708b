"""Training state <-> (safetensors, JSON): checkpoints that never unpickle anything.

``pack_state`` walks a nested structure (dicts, lists, tuples, tensors, numbers, strings, None) and
puts every tensor into a flat safetensors dict, leaving a JSON skeleton with references; ``unpack``
reverses it. Optimizer and lr-scheduler ``state_dict()`` s and RNG states all fit this shape.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

__all__ = ["pack_state", "unpack_state", "state_to_bytes", "state_from_bytes"]


def pack_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, dict):
            return {"__dict__": [[walk(k), walk(v)] for k, v in x.items()]}
        if isinstance(x, list | tuple):
            return {"__list__" if isinstance(x, list) else "__tuple__": [walk(v) for v in x]}
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise TypeError(f"cannot checkpoint a value of type {type(x).__name__}")

    return tensors, walk(obj)


def unpack_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    def walk(x: Any) -> Any:
        if isinstance(x, dict):
            if "__tensor__" in x:
                return tensors[x["__tensor__"]]
            if "__dict__" in x:
                return {walk(k): walk(v) for k, v in x["__dict__"]}
            if "__list__" in x:
                return [walk(v) for v in x["__list__"]]
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
        return x

    return walk(skeleton)


def state_to_bytes(obj: Any) -> tuple[bytes, bytes]:
    """``(safetensors bytes, JSON bytes)`` for a nested state."""
    tensors, skeleton = pack_state(obj)
    return st_save(tensors), json.dumps(skeleton).encode()


def state_from_bytes(tensor_bytes: bytes, json_bytes: bytes) -> Any:
    return unpack_state(st_load(tensor_bytes), json.loads(json_bytes))
