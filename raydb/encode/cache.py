"""The encoded cache on storage: ``<workspace>/encoded/<key>/``.

Files: ``instance.parquet``, ``class.parquet``, ``holdout.parquet`` (latent distributions),
``prompts.safetensors`` (prompt embeddings and token ids) and ``manifest.json`` (written last: the
cache is complete when it exists). The key hashes every input — model identity, image bytes,
resolution, crop/flip, prompts — so a rerun with unchanged inputs finds the cache, and any change
encodes into a new folder.

Row schema of the Parquet files: ``index: int64, mean: binary (fp32 [C, h, w]), std: binary,
shape: list<int32>, time_ids: binary`` (SDXL: the image's fp32 [6] size/crop conditioning; empty
for SD 1.x/2.x).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raydb.config import RaydbConfig
from raydb.encode.encoders import EncodedImages
from raydb.storage import Storage, join

__all__ = ["ENCODED_SCHEMA", "EncodedCache", "encoded_cache_for", "rows_to_encoded", "read_encoded",
           "write_encoded", "load_prompts", "prompts_file"]

ENCODED_SCHEMA = pa.schema([("index", pa.int64()), ("mean", pa.binary()), ("std", pa.binary()),
                            ("shape", pa.list_(pa.int32())), ("time_ids", pa.binary())])


@dataclass(frozen=True)
class EncodedCache:
    """Where one encoding lives and how many images of each kind it holds (JSON-able)."""

    uri: str
    key: str
    num_instance: int
    num_class: int
    num_holdout: int = 0

    @property
    def instance_uri(self) -> str:
        return join(self.uri, "instance.parquet")

    @property
    def class_uri(self) -> str:
        return join(self.uri, "class.parquet")

    @property
    def holdout_uri(self) -> str:
        """Held-out class images: generated with the others, never trained on (validation)."""
        return join(self.uri, "holdout.parquet")

    @property
    def prompts_uri(self) -> str:
        return join(self.uri, "prompts.safetensors")

    @property
    def manifest_uri(self) -> str:
        return join(self.uri, "manifest.json")

    def is_complete(self, storage: Storage) -> bool:
        manifest = storage.read_json_or(self.manifest_uri)
        return bool(manifest) and manifest.get("key") == self.key


def encoded_cache_for(cfg: RaydbConfig, model_identity: str, instance_png: list[bytes],
                      class_png: list[bytes], holdout_png: list[bytes] = (), *, family: str = "sd",
                      conditioning: bytes = b"") -> EncodedCache:
    """The cache location of these inputs (pure: no I/O). Images enter by their PNG bytes, after
    ingestion's resize/crop and any flips, so the key changes exactly when the pixels do;
    ``conditioning`` is any per-image conditioning cached with them (SDXL's time ids)."""
    tc = cfg.train
    h = hashlib.sha256()
    for part in (model_identity, family, cfg.subject.instance_prompt, cfg.subject.class_prompt,
                 str(tc.resolution), str(tc.center_crop), str(tc.random_flip), str(len(class_png))):
        h.update(part.encode() + b"\0")
    for png in [*instance_png, b"--", *class_png, b"--", *holdout_png, b"--", conditioning]:
        h.update(hashlib.sha256(png).digest())
    key = h.hexdigest()[:20]
    return EncodedCache(join(cfg.workspace, "encoded", key), key, len(instance_png), len(class_png),
                        len(holdout_png))


def rows_to_encoded(rows: dict[str, Any]) -> EncodedImages:
    """Parquet/Ray rows (any order) -> EncodedImages sorted by index."""
    order = np.argsort(np.asarray(rows["index"]))
    shape = tuple(int(x) for x in np.asarray(rows["shape"][0]))

    def stack(col: str) -> torch.Tensor:
        return torch.stack([
            torch.from_numpy(np.frombuffer(rows[col][i], dtype=np.float32).reshape(shape).copy())
            for i in order])

    time_ids = None
    if rows.get("time_ids") is not None and all(rows["time_ids"][i] for i in order):
        time_ids = torch.stack([torch.from_numpy(np.frombuffer(rows["time_ids"][i], dtype=np.float32).copy())
                                for i in order])
    return EncodedImages(stack("mean"), stack("std"), time_ids)


def read_encoded(storage: Storage, uri: str) -> EncodedImages:
    """One Parquet file of the cache as EncodedImages."""
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    return rows_to_encoded({c: table[c].to_pylist() for c in table.column_names})


def write_encoded(storage: Storage, uri: str, rows: list[dict[str, Any]]) -> None:
    """Rows of ``ENCODED_SCHEMA`` as one Parquet file (atomic write)."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=ENCODED_SCHEMA), buf)
    storage.write_bytes(uri, buf.getvalue())


def load_prompts(storage: Storage, cache: EncodedCache) -> dict[str, torch.Tensor]:
    """``{"embeds": [2, L, D], "ids": [2, L]}`` for (instance prompt, class prompt); SDXL adds
    ``"pooled": [2, D2p]`` and ``"ids_2": [2, L]``."""
    from safetensors.torch import load

    return load(storage.read_bytes(cache.prompts_uri))


def prompts_file(embeds: torch.Tensor, ids: torch.Tensor, **sdxl: torch.Tensor) -> bytes:
    """``prompts.safetensors`` bytes from ``embeds [2, L, D]`` fp32 and ``ids [2, L]`` int64 (and
    SDXL's ``pooled [2, D2p]`` / ``ids_2 [2, L]``)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in {"embeds": embeds, "ids": ids, **sdxl}.items()})
