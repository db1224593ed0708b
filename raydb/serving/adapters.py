"""Reading registry adapters safely, and the resident-adapter handle Serve's multiplexer evicts.

Loading is defensive (:func:`read_adapter`): the adapter's ``adapter.json`` must name the replica's
base model (:class:`AdapterMismatch`, 409), the weights must hash to ``weights_sha256`` and parse as
safetensors (:class:`AdapterCorrupt`, 500). Pickle-based formats are never read: the weights go
through ``safetensors.torch.load``. Where the adapter lives once loaded is the engine's business
(:class:`raydb.serving.slots.SlotPool`: a slot of the batching engine).

Eviction: Ray Serve's multiplexer drops the least recently used :class:`LoadedAdapter` and calls its
``__del__``. A request may still hold that adapter (it got it before the eviction and waits for its
batch), so unloading is reference-counted: the adapter leaves its pool when it is evicted *and* no
request is using it.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import threading
from typing import Any

import torch

from raydb.registry import ADAPTER_META, ADAPTER_WEIGHTS
from raydb.storage import NotFound, Storage, join

__all__ = ["AdapterError", "AdapterMismatch", "AdapterCorrupt", "AdapterGone", "LoadedAdapter",
           "read_adapter"]

class AdapterError(RuntimeError):
    """An adapter that cannot serve this request; ``status`` is the HTTP status to answer with."""

    status = 500


class AdapterMismatch(AdapterError):
    status = 409


class AdapterCorrupt(AdapterError):
    status = 500


class AdapterGone(AdapterError):
    """The registry lost the version between lookup and load (or the adapter was unloaded)."""

    status = 503


class LoadedAdapter:
    """One adapter resident in a pool (anything with ``unload(adapter)``, e.g. a
    :class:`raydb.serving.slots.SlotPool`; ``slot`` is its engine slot). ``__del__`` (eviction)
    unloads it when unused."""

    def __init__(self, pool: Any, name: str, subject_id: str, version: str, meta: dict[str, Any],
                 slot: int | None = None):
        self.pool = pool
        self.name = name
        self.slot = slot
        self.subject_id = subject_id
        self.version = version
        self.metadata = meta
        self.loaded = True
        self._users = 0
        self._evicted = False
        self._state = threading.Lock()

    def acquire(self) -> None:
        """Mark the adapter in use (call right after getting it, before any ``await``)."""
        with self._state:
            self._users += 1

    def release(self) -> bool:
        """End a use; True when the caller must now ``pool.unload`` it (evicted, unused)."""
        with self._state:
            self._users -= 1
            return self._take_unload()

    def _take_unload(self) -> bool:
        if self._evicted and self._users == 0 and self.loaded:
            self.loaded = False
            return True
        return False

    def __del__(self) -> None:
        # Called by Serve's LRU eviction (in a worker thread) and again by the garbage collector;
        # the second call finds the adapter unloaded and does nothing. At interpreter exit the
        # pipeline is going away with the process, and diffusers can no longer import what it needs.
        if sys.is_finalizing():
            return
        with self._state:
            self._evicted = True
            drop = self._take_unload()
        if drop:
            self.pool.unload(self)


def read_adapter(
    storage: Storage, version_uri: str, identity: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """adapter.json, the verified weights, and the LoRA config stored in the weights' header.

    The LoRA config is diffusers' ``lora_adapter_metadata`` (``{"unet.lora_alpha": 8, "unet.r": 4,
    ...}``), ``{}`` when the file has none. ``identity`` is the serving base model's.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        meta = storage.read_json(join(version_uri, ADAPTER_META))
        data = storage.read_bytes(join(version_uri, meta.get("weights", ADAPTER_WEIGHTS)))
    except NotFound as exc:
        raise AdapterGone(f"adapter files missing: {exc}") from None
    except ValueError as exc:  # adapter.json that is not JSON
        raise AdapterCorrupt(f"adapter.json is unreadable: {exc}") from None
    base = meta.get("base_model", {}).get("identity")
    if base != identity:
        raise AdapterMismatch(f"adapter was trained on base model {base!r}, this server runs {identity!r}")
    expected = meta.get("weights_sha256")
    if not expected or hashlib.sha256(data).hexdigest() != expected:
        raise AdapterCorrupt("adapter weights failed their integrity check (sha256 mismatch)")
    try:
        state = load_safetensors(data)
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size]).get("__metadata__") or {}
        lora_config = json.loads(header.get("lora_adapter_metadata", "{}"))
    except (SafetensorError, ValueError, RuntimeError, struct.error) as exc:
        raise AdapterCorrupt(f"adapter weights are not valid safetensors: {exc}") from None
    return meta, state, lora_config
