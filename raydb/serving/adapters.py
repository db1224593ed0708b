"""Reading registry adapters safely, and the resident-adapter handle Serve's multiplexer evicts.

Loading is defensive (:func:`read_adapter`): the adapter's ``adapter.json`` must be
``diffusers-lora-v1`` and name the replica's model family (SD vs. SDXL) and base model
(:class:`AdapterMismatch`); the weights
file name is fixed (``pytorch_lora_weights.safetensors``, never taken from the metadata), and the
weights must hash to ``weights_sha256`` and parse as safetensors (:class:`AdapterCorrupt`). The HTTP
status of each is in :mod:`raydb.serving.status` (409, 500).
Pickle-based formats are never read: the weights go through ``safetensors.torch.load``. Where the
adapter lives once loaded is the engine's business
(:class:`raydb.serving.slots.SlotPool`: a slot of the batching engine), which validates an adapter
*before* it enters Serve's multiplexer (``SlotPool.stage``): the multiplexer evicts before it loads,
so an adapter failing there would cost a healthy one its slot. Failures are remembered briefly
(:class:`FailureCache`). Errors carry two messages: ``public`` (generic, for any client: no paths,
no model identities) and ``str(exc)`` (details, for the log only).

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
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from raydb.registry import ADAPTER_META, ADAPTER_WEIGHTS
from raydb.storage import NotFound, Storage, join

__all__ = ["AdapterError", "AdapterMismatch", "AdapterCorrupt", "AdapterGone", "GenerationCancelled",
           "FailureCache", "LoadedAdapter", "read_adapter"]

FORMAT = "diffusers-lora-v1"


class AdapterError(RuntimeError):
    """An adapter that cannot serve this request; ``public`` is the message a client may see
    (``str(exc)`` has the details, for the log only)."""

    public = "the subject's adapter cannot be served"


class AdapterMismatch(AdapterError):
    public = "the subject's adapter was trained on a different base model than this server runs"


class AdapterCorrupt(AdapterError):
    public = "the subject's adapter is corrupt (failed validation)"


class AdapterGone(AdapterError):
    """The registry lost the version between lookup and load (or the adapter was unloaded)."""

    public = "the subject's adapter is unavailable right now; retry"


class GenerationCancelled(RuntimeError):
    """The denoising loop was stopped: its clients went away or their deadlines passed."""


class FailureCache:
    """Adapter id -> the AdapterError its last load attempt raised, kept for ``ttl_s`` seconds."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic, size: int = 256) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.size = size
        self._errors: OrderedDict[str, tuple[float, AdapterError]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, adapter_id: str) -> AdapterError | None:
        with self._lock:
            hit = self._errors.get(adapter_id)
            if hit is None:
                return None
            if self.clock() >= hit[0]:
                del self._errors[adapter_id]
                return None
            return hit[1]

    def put(self, adapter_id: str, error: AdapterError) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            self._errors[adapter_id] = (self.clock() + self.ttl_s, error)
            self._errors.move_to_end(adapter_id)
            while len(self._errors) > self.size:
                self._errors.popitem(last=False)


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
        self.adapter_id = f"{subject_id}@{version}"
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
        if hasattr(self.pool, "evicted"):
            self.pool.evicted(self)
        if drop:
            self.pool.unload(self)


def read_adapter(
    storage: Storage, version_uri: str, identity: str, family: str = "sd",
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """adapter.json, the verified weights, and the LoRA config stored in the weights' header.

    The LoRA config is diffusers' ``lora_adapter_metadata`` (``{"unet.lora_alpha": 8, "unet.r": 4,
    ...}``), ``{}`` when the file has none. ``identity`` and ``family`` are the serving base model's.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    try:
        # parsed here, not by Storage.read_json: JSON that does not parse is a corrupt adapter, while a
        # storage failure (S3 unreachable) is not
        meta = json.loads(storage.read_bytes(join(version_uri, ADAPTER_META)))
        if not isinstance(meta, dict):
            raise ValueError("adapter.json is not an object")
        named = meta.get("weights", ADAPTER_WEIGHTS)
        if meta.get("format", FORMAT) != FORMAT or named != ADAPTER_WEIGHTS:
            raise AdapterCorrupt(f"adapter.json: unsupported format {meta.get('format')!r} or weights "
                                 f"file {named!r} (expected {FORMAT}, {ADAPTER_WEIGHTS})")
        data = storage.read_bytes(join(version_uri, ADAPTER_WEIGHTS))
    except NotFound as exc:
        raise AdapterGone(f"adapter files missing: {exc}") from None
    except ValueError as exc:  # adapter.json that is not JSON
        raise AdapterCorrupt(f"adapter.json is unreadable: {exc}") from None
    base = (meta.get("base_model") or {}).get("identity")
    adapter_family = (meta.get("base_model") or {}).get("family", "sd")  # adapters predating SDXL: SD
    if adapter_family != family:
        raise AdapterMismatch(f"adapter is for the {adapter_family} model family (base {base!r}); "
                              f"this server runs an {family} model ({identity!r})")
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
