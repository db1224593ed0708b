"""``torch.compile`` artifacts kept in the workspace: the second run on a base model starts warm.

Compiling SD 1.5's UNet (forward + backward) takes minutes on an H100/H200; every subject trained on
the same base model, GPU type, shapes and options compiles exactly the same graphs, and so does every
serving replica of one base model (forward only). After the first compiled steps (training,
``raydb/train/engine.py``) or denoising loops (serving, ``raydb/serving/engine.py``),
``torch.compiler.save_cache_artifacts()`` serializes what inductor and AOTAutograd produced; a later
run loads it with ``torch.compiler.load_cache_artifacts`` before its first compiled call, and its
compile becomes cache hits.

Layout: ``{workspace}/compile-cache/{key}.bin`` (torch's bytes) and ``{key}.json`` (what the key
was made of, the byte count and SHA-256; written last, so it marks a complete entry). The key is a
hash of (model identity, torch version, device name, shapes, options): anything that changes the
compiled code changes the key, so a stale entry is never loaded — it is simply not found.

Trust: the artifacts are torch's own compile-cache entries (inductor's cache format, which torch
deserializes internally, like its local on-disk cache). Only entries this workspace wrote are read,
and only when their SHA-256 matches the manifest; a workspace writable by others is a trust
boundary for this cache exactly as for the adapters it stores.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from raydb.storage import NotFound, Storage, StorageError, join

__all__ = ["compile_cache_key", "CompileCache", "CompileCacheDamaged"]


class CompileCacheDamaged(ValueError):
    """An entry whose bytes do not match its manifest (size or SHA-256): never handed to torch."""


def compile_cache_key(*, model_identity: str, device_name: str, shapes: Any, options: dict[str, Any],
                      torch_version: str | None = None) -> tuple[str, dict[str, Any]]:
    """``(key, parts)``: a 20-hex-digit hash of what the compiled code depends on, and the parts.

    ``shapes``: JSON-able description of the static inputs (e.g. ``{"micro_batch": [2, 4, 64, 64],
    "accumulation": 1}``); ``options``: the compile-relevant settings (compile mode and backend,
    precision, channels_last, cuda_graphs, LoRA rank/targets, text-encoder LoRA).
    """
    parts = {"model": model_identity, "torch": torch_version or torch.__version__,
             "device": device_name, "shapes": shapes, "options": options}
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20], parts


class CompileCache:
    """One cache entry: ``load()`` before the first compiled step, ``save()`` after it compiled.

    ``save_fn``/``load_fn`` default to ``torch.compiler.save_cache_artifacts`` /
    ``load_cache_artifacts`` (parameters so the storage half can be tested on its own).
    """

    def __init__(self, storage: Storage, workspace: str, key: str, parts: dict[str, Any], *,
                 save_fn: Callable[[], Any] | None = None,
                 load_fn: Callable[[bytes], Any] | None = None) -> None:
        self.storage, self.key, self.parts = storage, key, parts
        self.root = join(workspace, "compile-cache")
        self._save_fn = save_fn or torch.compiler.save_cache_artifacts
        self._load_fn = load_fn or torch.compiler.load_cache_artifacts
        self.loaded = False
        self.saved = False

    @property
    def bin_uri(self) -> str:
        return join(self.root, f"{self.key}.bin")

    @property
    def meta_uri(self) -> str:
        return join(self.root, f"{self.key}.json")

    def load(self) -> bool:
        """Populate torch's compile caches from this entry; False when there is none (cold).

        Raises :class:`CompileCacheDamaged` (before torch sees a byte) when the manifest cannot be
        read as JSON, its ``.bin`` is missing, or size/SHA-256 differ from the manifest.
        """
        try:
            meta = self.storage.read_json_or(self.meta_uri)
        except StorageError as exc:  # not valid JSON (half-written or edited), or unreadable
            raise CompileCacheDamaged(f"compile cache {self.meta_uri}: {exc}; delete it and "
                                      f"{self.bin_uri} to recompile") from exc
        if not meta:
            return False
        try:
            data = self.storage.read_bytes(self.bin_uri)
        except NotFound as exc:
            raise CompileCacheDamaged(f"compile cache {self.meta_uri} names no {self.bin_uri}; delete "
                                      "it to recompile") from exc
        if (not isinstance(meta, dict) or len(data) != meta.get("bytes")
                or hashlib.sha256(data).hexdigest() != meta.get("sha256")):
            raise CompileCacheDamaged(f"compile cache {self.bin_uri}: contents do not match "
                                      f"{self.meta_uri} (size or SHA-256); delete both files to recompile")
        self._load_fn(data)
        self.loaded = True
        return True

    def save(self) -> bool:
        """Write what this process compiled so far (once; skipped when loaded or nothing compiled)."""
        if self.loaded or self.saved:
            return False
        result = self._save_fn()
        if not result:
            return False
        data = result[0]
        self.storage.write_bytes(self.bin_uri, data)
        self.storage.write_json(self.meta_uri, {  # last: marks the entry complete
            **self.parts, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.saved = True
        return True
