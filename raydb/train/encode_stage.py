"""The encode stage on Ray Data: frozen VAE + text encoder turn images and prompts into the cache.

Actors holding the frozen VAE and text encoder map batches of images (PNG bytes) to latent
distributions and the two prompts to embeddings; the rows are written with pyarrow as
``<workspace>/encoded/<key>/{instance,class}.parquet`` next to ``prompts.safetensors`` (prompt
embeddings and token ids) and a ``manifest.json``. The key hashes
every input (model identity, image bytes, resolution, crop/flip, prompts), so a rerun with unchanged
inputs skips the stage, and any change re-encodes into a new folder.

Row schema of the Parquet files: ``index: int64, mean: binary (fp32 [C, h, w]), std: binary,
shape: list<int32>``.
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
from PIL import Image

from raydb.config import RaydbConfig
from raydb.storage import Storage, join
from raydb.train.encode import EncodedImages, add_flips, encode_images, images_to_tensor

__all__ = ["EncodedCache", "run_encode_stage", "ImageEncoder", "rows_to_encoded", "load_prompts"]

ENCODED_SCHEMA = pa.schema([("index", pa.int64()), ("mean", pa.binary()), ("std", pa.binary()),
                            ("shape", pa.list_(pa.int32()))])


@dataclass(frozen=True)
class EncodedCache:
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


class ImageEncoder:
    """Ray Data actor holding the frozen VAE and text encoder (no UNet).

    Input rows ``{"index", "kind", "png", "text"}``: images (``kind`` instance/class/holdout, PNG
    bytes) or prompts (``kind == "prompt"``, ``text``). Output rows ``{"index", "kind", "mean",
    "std", "shape"}``: for images the latent distribution, mean/std as fp32 bytes of shape
    ``[C, h, w]``; for prompts ``mean`` is the fp32 embedding ``[L, D]`` and ``std`` the int64
    token ids ``[L]``. One actor does both, so the stage starts one set of processes, not two.
    """

    def __init__(self, cfg: dict[str, Any]):
        from raydb.models.components import load_components

        self.cfg = RaydbConfig.model_validate(cfg)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        comps = load_components(self.cfg.model, Storage(self.cfg.s3_endpoint_url), self.cfg.workspace,
                                device=self.device, with_unet=False)
        self.vae, self.tokenizer, self.text_encoder = comps.vae, comps.tokenizer, comps.text_encoder

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from raydb.train.encode import encode_prompts, tokenize

        kinds = [str(k) for k in batch["kind"]]
        images = [i for i, k in enumerate(kinds) if k != "prompt"]
        texts = [i for i, k in enumerate(kinds) if k == "prompt"]
        mean: list[bytes] = [b""] * len(kinds)
        std: list[bytes] = [b""] * len(kinds)
        shape: list[list[int]] = [[]] * len(kinds)
        if images:
            pixels = images_to_tensor([Image.open(io.BytesIO(batch["png"][i])).convert("RGB")
                                       for i in images])
            enc = encode_images(self.vae, pixels)
            for j, i in enumerate(images):
                mean[i], std[i] = enc.mean[j].numpy().tobytes(), enc.std[j].numpy().tobytes()
                shape[i] = list(enc.mean[j].shape)
        if texts:
            prompts = [str(batch["text"][i]) for i in texts]
            embeds = encode_prompts(self.tokenizer, self.text_encoder, prompts)
            ids = tokenize(self.tokenizer, prompts).to(torch.int64)
            for j, i in enumerate(texts):
                mean[i], std[i] = embeds[j].numpy().tobytes(), ids[j].numpy().tobytes()
                shape[i] = list(embeds[j].shape)
        width = max(len(s) for s in shape)  # a ragged list column would not stack
        return {
            "index": batch["index"], "kind": batch["kind"],
            "mean": np.array(mean, dtype=object), "std": np.array(std, dtype=object),
            "shape": np.array([s + [0] * (width - len(s)) for s in shape], dtype=np.int32),
        }


def rows_to_encoded(rows: dict[str, Any]) -> EncodedImages:
    """Parquet/Ray rows (any order) -> EncodedImages sorted by index."""
    order = np.argsort(np.asarray(rows["index"]))
    shape = tuple(int(x) for x in np.asarray(rows["shape"][0]))

    def stack(col: str) -> torch.Tensor:
        return torch.stack([
            torch.from_numpy(np.frombuffer(rows[col][i], dtype=np.float32).reshape(shape).copy())
            for i in order])

    return EncodedImages(stack("mean"), stack("std"))


def load_prompts(storage: Storage, cache: EncodedCache) -> dict[str, torch.Tensor]:
    """``{"embeds": [2, L, D], "ids": [2, L]}`` for (instance prompt, class prompt)."""
    from safetensors.torch import load

    return load(storage.read_bytes(cache.prompts_uri))


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _prompts_file(rows: list[dict[str, Any]]) -> bytes:
    """Prompt rows (instance, class) -> ``prompts.safetensors`` with ``embeds [2, L, D]``, ``ids [2, L]``."""
    from safetensors.torch import save

    embeds = [torch.from_numpy(np.frombuffer(r["mean"], dtype=np.float32).reshape(r["shape"]).copy())
              for r in rows]
    ids = [torch.from_numpy(np.frombuffer(r["std"], dtype=np.int64).copy()) for r in rows]
    return save({"embeds": torch.stack(embeds).contiguous(), "ids": torch.stack(ids).contiguous()})


def _write_parquet(storage: Storage, uri: str, rows: list[dict[str, Any]]) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=ENCODED_SCHEMA), buf)
    storage.write_bytes(uri, buf.getvalue())


def run_encode_stage(
    cfg: RaydbConfig, storage: Storage, instance_images: list[Image.Image],
    class_images: list[Image.Image], *, model_identity: str, concurrency: int = 1,
    holdout_images: list[Image.Image] | None = None,
) -> tuple[EncodedCache, bool]:
    """Encode on Ray Data unless an identical encoding exists. Returns ``(cache, ran)``."""
    import ray

    tc = cfg.train
    if tc.random_flip:
        instance_images, class_images = add_flips(instance_images), add_flips(class_images)
    inst_png, class_png = [_png(i) for i in instance_images], [_png(i) for i in class_images]
    hold_png = [_png(i) for i in holdout_images or []]
    h = hashlib.sha256()
    for part in (model_identity, cfg.subject.instance_prompt, cfg.subject.class_prompt,
                 str(tc.resolution), str(tc.center_crop), str(tc.random_flip), str(len(class_png))):
        h.update(part.encode() + b"\0")
    for png in inst_png + [b"--"] + class_png + [b"--"] + hold_png:
        h.update(hashlib.sha256(png).digest())
    key = h.hexdigest()[:20]
    cache = EncodedCache(join(cfg.workspace, "encoded", key), key, len(inst_png), len(class_png),
                         len(hold_png))
    manifest = storage.read_json_or(join(cache.uri, "manifest.json"))
    if manifest and manifest.get("key") == key:
        return cache, False
    prompts = [cfg.subject.instance_prompt, cfg.subject.class_prompt]
    rows = [{"index": i, "png": b"", "text": t, "kind": "prompt"} for i, t in enumerate(prompts)]
    rows += [{"index": i, "png": p, "text": "", "kind": "instance"} for i, p in enumerate(inst_png)]
    rows += [{"index": i, "png": p, "text": "", "kind": "class"} for i, p in enumerate(class_png)]
    rows += [{"index": i, "png": p, "text": "", "kind": "holdout"} for i, p in enumerate(hold_png)]
    gpus = int(ray.cluster_resources().get("GPU", 0))
    out: dict[str, list[dict[str, Any]]] = {"instance": [], "class": [], "holdout": [], "prompt": []}
    ds = ray.data.from_items(rows).map_batches(
        ImageEncoder, fn_constructor_kwargs={"cfg": cfg.to_dict()}, batch_size=8,
        compute=ray.data.ActorPoolStrategy(size=max(1, min(concurrency, len(rows)))),
        num_gpus=1 if gpus else 0, num_cpus=1, batch_format="numpy",
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i in range(len(batch["index"])):
            out[str(batch["kind"][i])].append({
                "index": int(batch["index"][i]), "mean": bytes(batch["mean"][i]),
                "std": bytes(batch["std"][i]),
                "shape": [int(x) for x in batch["shape"][i] if x]})  # drop the padding
    _write_parquet(storage, cache.instance_uri, sorted(out["instance"], key=lambda r: r["index"]))
    if out["class"]:
        _write_parquet(storage, cache.class_uri, sorted(out["class"], key=lambda r: r["index"]))
    if out["holdout"]:
        _write_parquet(storage, cache.holdout_uri, sorted(out["holdout"], key=lambda r: r["index"]))
    storage.write_bytes(cache.prompts_uri, _prompts_file(sorted(out["prompt"], key=lambda r: r["index"])))
    storage.write_json(join(cache.uri, "manifest.json"), {
        "key": key, "model": model_identity, "num_instance": len(inst_png), "num_class": len(class_png),
        "num_holdout": len(hold_png),
        "resolution": tc.resolution, "random_flip": tc.random_flip,
    })
    return cache, True


def read_encoded(storage: Storage, uri: str) -> EncodedImages:
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    return rows_to_encoded({c: table[c].to_pylist() for c in table.column_names})
