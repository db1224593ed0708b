"""Many LoRA adapters on one shared diffusion pipeline (plain PyTorch/diffusers, no Ray).

A diffusion replica loads the base pipeline once and keeps several subjects' adapters resident in it
under distinct adapter names (diffusers' ``load_lora_weights(..., adapter_name=)``). A request
activates exactly its adapter (``set_adapters([name])``) — or none, ``disable_lora()``, for the base
model — and runs the pipeline. Because activation is pipeline-wide state, :class:`AdapterPool` holds
one lock for every use of the pipeline: loading, activating + sampling, unloading.

Loading is defensive: the adapter's ``adapter.json`` must name the replica's base model
(:class:`AdapterMismatch`, 409), the weights must hash to ``weights_sha256`` and parse as
safetensors (:class:`AdapterCorrupt`, 500). Pickle-based formats are never read: the weights go
through ``safetensors.torch.load`` and reach diffusers as a state dict.

Eviction: Ray Serve's multiplexer drops the least recently used :class:`LoadedAdapter` and calls its
``__del__``. A request may still hold that adapter (it got it before the eviction and waits for the
pipeline lock), so unloading is reference-counted: the adapter is deleted from the pipeline when it
is evicted *and* no request is using it.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import struct
import sys
import threading
from typing import Any

import torch

from raydb.registry import ADAPTER_META, ADAPTER_WEIGHTS
from raydb.storage import NotFound, Storage, join

__all__ = ["AdapterError", "AdapterMismatch", "AdapterCorrupt", "AdapterGone", "LoadedAdapter",
           "AdapterPool", "read_adapter"]

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
    """One adapter resident in a pool. ``__del__`` (eviction) unloads it when unused.

    ``pool``: an :class:`AdapterPool` (peft adapter ``name`` in its pipeline) or a
    :class:`raydb.serving.slots.SlotPool` (engine ``slot``); either has ``unload(adapter)``.
    """

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
        """End a use; True when the caller must now :meth:`AdapterPool.unload` it (evicted, unused)."""
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


class AdapterPool:
    """A base ``StableDiffusionPipeline`` (with ``.raydb_identity``) plus resident adapters."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.identity: str = pipe.raydb_identity
        self.lock = threading.RLock()
        self._names = itertools.count()
        self.loads = 0
        self.unloads = 0

    # -- adapters ------------------------------------------------------------------------------
    def read_adapter(
        self, storage: Storage, version_uri: str
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """adapter.json and the verified weights of one registry version."""
        meta, state, _ = read_adapter(storage, version_uri, self.identity)
        return meta, state

    def load(self, storage: Storage, version_uri: str, subject_id: str, version: str) -> LoadedAdapter:
        """Read, verify and add an adapter to the pipeline under a fresh name."""
        meta, state = self.read_adapter(storage, version_uri)
        name = f"adapter{next(self._names)}"  # subject ids may contain '.', which peft names may not
        with self.lock:
            try:
                self.pipe.load_lora_weights(state, adapter_name=name)
            except Exception as exc:
                self._forget(name)
                raise AdapterCorrupt(f"adapter weights do not fit the base model: {exc}") from None
            self.loads += 1
        return LoadedAdapter(self, name, subject_id, version, meta)

    def unload(self, adapter: LoadedAdapter) -> None:
        with self.lock:
            self._forget(adapter.name)
            self.unloads += 1

    def _forget(self, name: str) -> None:
        if any(name in names for names in self.pipe.get_list_adapters().values()):
            self.pipe.delete_adapters(name)

    def resident(self) -> list[str]:
        """Adapter names currently in the pipeline."""
        with self.lock:
            return sorted({n for names in self.pipe.get_list_adapters().values() for n in names})

    # -- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, adapter: LoadedAdapter | None, params: dict[str, Any]) -> dict[str, Any]:
        """``{"images": [PNG bytes], "width", "height"}``; image i uses seed ``seed + i``.

        ``params``: prompt, negative_prompt, num_inference_steps, guidance_scale, seed, width, height,
        num_images (a :class:`raydb.serving.api.GenerateParams` dump). ``adapter=None``: base model.
        """
        generators = [torch.Generator().manual_seed(params["seed"] + i) for i in range(params["num_images"])]
        with self.lock:
            if adapter is None:
                if self.pipe.get_list_adapters():
                    self.pipe.disable_lora()
            else:
                if not adapter.loaded:
                    raise AdapterGone("adapter was unloaded; retry the request")
                self.pipe.enable_lora()
                self.pipe.set_adapters([adapter.name])
            images = self.pipe(
                params["prompt"], negative_prompt=params.get("negative_prompt"),
                num_inference_steps=params["num_inference_steps"], guidance_scale=params["guidance_scale"],
                width=params.get("width"), height=params.get("height"),
                num_images_per_prompt=params["num_images"], generator=generators,
            ).images
        out = []
        for image in images:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(buf.getvalue())
        return {"images": out, "width": images[0].width, "height": images[0].height}
