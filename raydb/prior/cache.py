"""The shared prior cache: ``<workspace>/priors/<key>/blocks/block-NNNNNN.parquet`` + manifest.json.

The key hashes everything that changes the pixels — base-model identity, class prompt, negative
prompt, resolution, steps, guidance, scheduler, seed, the generation batch size, the device and
dtype (CUDA fp16 or CPU fp32) and the CPU intra-op thread count — so a second subject of the same
class reuses the images, and a different class prompt never collides.

Images are generated in fixed *blocks* of ``sample_batch_size`` consecutive indices (block k holds
``[k*S, (k+1)*S)``), each block from one pipeline call with one generator per image seeded by
``(prior.seed, index)``. Fixed blocks are why the set is bit-identical whatever the number of
actors: batched and unbatched diffusion differ in the last bit on CPU (seen: 1/255 in a pixel), so
the batch composition must not depend on scheduling — and the batch size is part of the key.
For the same reason every CPU generator runs exactly ``CPU_THREADS`` intra-op threads: CPU kernels
split their reductions by thread count, so 1, 2 and 3 threads give three different sets of PNG
bytes (measured with the tiny model). Throughput on CPU scales with actors, one core each.

A block is one Parquet file written atomically, with ``if_absent`` so two jobs filling the same key
at once both end with one identical, duplicate-free set (and the same bytes, since blocks are
deterministic). The block listing is the truth; ``manifest.json`` summarises it for people.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raydb.config import RaydbConfig
from raydb.models.family import family_spec
from raydb.storage import Storage, join

__all__ = ["PriorCache", "prior_cache_for", "image_seed", "BLOCK_SCHEMA", "CPU_THREADS"]

# torch intra-op threads of every CPU generator, whatever the number of actors (see above).
CPU_THREADS = 1

# Only published blocks: temp files of in-flight writes (".block-…tmp") never match.
_BLOCK_NAME = re.compile(r"^block-(\d{6})\.parquet$")

BLOCK_SCHEMA = pa.schema([
    ("index", pa.int64()), ("seed", pa.int64()), ("png", pa.binary()), ("prompt", pa.string()),
    ("negative_prompt", pa.string()), ("num_inference_steps", pa.int32()),
    ("guidance_scale", pa.float32()), ("width", pa.int32()), ("height", pa.int32()),
])


def image_seed(base_seed: int, index: int) -> int:
    """Seed of class image ``index``: independent of actors, batches and other indices."""
    digest = hashlib.blake2b(f"raydb-prior:{base_seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class PriorCache:
    """One content key's location and generation settings (JSON-able, sent to actors)."""

    uri: str
    key: str
    settings: dict

    @property
    def block_size(self) -> int:
        return int(self.settings["sample_batch_size"])

    def block_uri(self, block: int) -> str:
        return join(self.uri, "blocks", f"block-{block:06d}.parquet")

    def blocks_needed(self, count: int) -> list[int]:
        return list(range(-(-count // self.block_size)))

    def done_blocks(self, storage: Storage) -> set[int]:
        """Numbers of the published blocks (a block file exists only once it is complete)."""
        names = storage.list(join(self.uri, "blocks"))
        return {int(m.group(1)) for m in map(_BLOCK_NAME.match, names) if m}

    def missing_blocks(self, storage: Storage, count: int) -> list[int]:
        done = self.done_blocks(storage)
        return [b for b in self.blocks_needed(count) if b not in done]

    def write_block(self, storage: Storage, block: int, rows: list[dict]) -> bool:
        """Atomically publish a block; returns False if an identical block already exists."""
        table = pa.Table.from_pylist(rows, schema=BLOCK_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return storage.write_bytes(self.block_uri(block), buf.getvalue(), if_absent=True)

    def read_table(self, storage: Storage, count: int) -> pa.Table:
        """Rows for indices ``[0, count)``, sorted by index, exactly one per index."""
        tables = [pq.read_table(io.BytesIO(storage.read_bytes(self.block_uri(b))))
                  for b in self.blocks_needed(count)]
        table = pa.concat_tables(tables).sort_by("index")
        table = table.filter(pa.compute.less(table["index"], count))
        indices = table["index"].to_pylist()
        if indices != list(range(count)):
            raise RuntimeError(f"prior cache {self.uri} is incomplete or has duplicates")
        return table

    def read_images(self, storage: Storage, count: int) -> list[Image.Image]:
        return [Image.open(io.BytesIO(b)).convert("RGB")
                for b in self.read_table(storage, count)["png"].to_pylist()]

    def write_manifest(self, storage: Storage) -> dict:
        done = sorted(self.done_blocks(storage))
        manifest = {"key": self.key, "settings": self.settings, "blocks": done,
                    "num_images": len(done) * self.block_size}
        storage.write_json(join(self.uri, "manifest.json"), manifest)
        return manifest


def prior_cache_for(cfg: RaydbConfig, model_identity: str, scheduler_name: str,
                    device: str = "cpu", family: str = "sd") -> PriorCache:
    """The cache location of ``cfg``'s class images (content key over pixel-changing settings).

    ``family`` (SD or SDXL: which pipeline draws them) is part of the key too.

    ``device`` is where the generators run: CUDA generates in half precision (fp16; bf16 for
    FLUX.1), the CPU in fp32, and the two give different pixels, so each has its own key (and the
    generators use the device and dtype named here).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"prior generation device must be 'cpu' or 'cuda', got {device!r}")
    p = cfg.prior
    settings = {
        "device": device, "dtype": family_spec(family).cuda_dtype if device == "cuda" else "float32",
        "model": model_identity, "family": family, "class_prompt": cfg.subject.class_prompt,
        "negative_prompt": p.negative_prompt, "resolution": cfg.train.resolution,
        "num_inference_steps": p.num_inference_steps, "guidance_scale": p.guidance_scale,
        "scheduler": scheduler_name, "seed": p.seed, "sample_batch_size": p.sample_batch_size,
        "cpu_threads": CPU_THREADS,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
    return PriorCache(join(cfg.workspace, "priors", key), key, settings)
