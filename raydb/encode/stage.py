"""The encode stage on Ray Data: frozen VAE + text encoder turn images and prompts into the cache.

Driver (``prepare_encoded``): the subject's photos and the class images, prepared by
``encode/inputs.py`` (the one preparation path: image -> flips -> geometry -> conditioning), then
``run_encode_stage``, which finds an identical encoding (same key, see
:mod:`raydb.encode.cache`) or maps the images and the two prompts through ``ImageEncoder`` actors
and writes the cache. ``read_class_dataset`` hands the encoded class rows to Ray Train.

Needs a running Ray cluster (``raydb.cluster.init_ray``, called by the entry points).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from raydb.config import RaydbConfig
from raydb.encode.cache import EncodedCache, encoded_cache_for, prompts_file, write_encoded
from raydb.encode.encoders import encode_images, encode_prompt_set, images_to_tensor
from raydb.encode.inputs import EncodeInputs, prepare_inputs
from raydb.models.family import check_resolution
from raydb.storage import Storage

__all__ = ["ImageEncoder", "run_encode_stage", "prepare_encoded", "read_class_dataset"]


class ImageEncoder:
    """Ray Data actor holding the frozen VAE and text encoder (no UNet).

    Input rows ``{"index", "kind", "png", "text"}``: images (``kind`` instance/class/holdout, PNG
    bytes) or prompts (``kind == "prompt"``, ``text``). Output rows ``{"index", "kind", "mean",
    "std", "shape"}``: for images the latent distribution, mean/std as fp32 bytes of shape
    ``[C, h, w]``; for prompts ``mean`` is the fp32 embedding ``[L, D]`` and ``std`` the int64
    token ids ``[L]`` (SDXL, FLUX.1: ``pooled`` fp32 ``[D2p]`` and ``ids_2`` int64 ``[L]`` too;
    FLUX.1: ``text_ids`` fp32 ``[L, 3]``; empty otherwise). One actor does both, so the stage
    starts one set of processes, not two.
    """

    def __init__(self, cfg: dict[str, Any]):
        from raydb.models.components import load_components

        self.cfg = RaydbConfig.model_validate(cfg)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        comps = load_components(self.cfg.model, Storage(self.cfg.s3_endpoint_url), self.cfg.workspace,
                                device=self.device, with_unet=False)
        self.comps, self.vae = comps, comps.vae

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        kinds = [str(k) for k in batch["kind"]]
        images = [i for i, k in enumerate(kinds) if k != "prompt"]
        texts = [i for i, k in enumerate(kinds) if k == "prompt"]
        mean: list[bytes] = [b""] * len(kinds)
        std: list[bytes] = [b""] * len(kinds)
        pooled: list[bytes] = [b""] * len(kinds)
        ids_2: list[bytes] = [b""] * len(kinds)
        text_ids: list[bytes] = [b""] * len(kinds)
        shape: list[list[int]] = [[]] * len(kinds)
        if images:
            pixels = images_to_tensor([Image.open(io.BytesIO(batch["png"][i])).convert("RGB")
                                       for i in images])
            enc = encode_images(self.vae, pixels)
            for j, i in enumerate(images):
                mean[i], std[i] = enc.mean[j].numpy().tobytes(), enc.std[j].numpy().tobytes()
                shape[i] = list(enc.mean[j].shape)
        if texts:
            encoded = encode_prompt_set(self.comps, [str(batch["text"][i]) for i in texts])
            embeds, ids = encoded["embeds"], encoded["ids"].to(torch.int64)
            for j, i in enumerate(texts):
                mean[i], std[i] = embeds[j].numpy().tobytes(), ids[j].numpy().tobytes()
                shape[i] = list(embeds[j].shape)
                if "pooled" in encoded:
                    pooled[i] = encoded["pooled"][j].numpy().tobytes()
                    ids_2[i] = encoded["ids_2"][j].to(torch.int64).numpy().tobytes()
                if "text_ids" in encoded:  # FLUX.1: [L, 3] fp32
                    text_ids[i] = encoded["text_ids"][j].float().numpy().tobytes()
        width = max(len(s) for s in shape)  # a ragged list column would not stack
        return {
            "index": batch["index"], "kind": batch["kind"],
            "mean": np.array(mean, dtype=object), "std": np.array(std, dtype=object),
            "pooled": np.array(pooled, dtype=object), "ids_2": np.array(ids_2, dtype=object),
            "text_ids": np.array(text_ids, dtype=object),
            "shape": np.array([s + [0] * (width - len(s)) for s in shape], dtype=np.int32),
        }


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _prompt_tensors(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Prompt rows (instance, class) -> ``embeds [2, L, D]`` fp32, ``ids [2, L]`` int64 (and
    SDXL's / FLUX.1's ``pooled [2, D2p]`` fp32, ``ids_2 [2, L]`` int64; FLUX.1's ``text_ids
    [2, L, 3]`` fp32)."""
    def column(key: str, dtype, shape: bool = False) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.frombuffer(r[key], dtype=dtype).copy()).reshape(
            r["shape"] if shape else (-1,)) for r in rows])

    out = {"embeds": column("mean", np.float32, shape=True), "ids": column("std", np.int64)}
    if all(r["pooled"] for r in rows):
        out |= {"pooled": column("pooled", np.float32), "ids_2": column("ids_2", np.int64)}
    if all(r["text_ids"] for r in rows):
        out["text_ids"] = torch.stack([torch.from_numpy(np.frombuffer(r["text_ids"], dtype=np.float32)
                                                        .copy()).reshape(-1, 3) for r in rows])
    return out



def run_encode_stage(
    cfg: RaydbConfig, storage: Storage, inputs: EncodeInputs, *, model_identity: str, concurrency: int = 1,
) -> tuple[EncodedCache, bool]:
    """Encode ``inputs`` (prepared and flipped already, see ``encode/inputs.py``) on Ray Data unless
    an identical encoding exists. Returns ``(cache, ran)``. SDXL also caches each image's time ids."""
    import ray

    family = inputs.family
    inst_png, class_png = [_png(i) for i in inputs.instance.images], [_png(i) for i in inputs.classes.images]
    hold_png = [_png(i) for i in inputs.holdout.images]
    time_ids = inputs.conditioning() or {}
    cache = encoded_cache_for(cfg, model_identity, inst_png, class_png, hold_png, family=family,
                              conditioning=b"".join(t.numpy().tobytes() for t in time_ids.values()))
    if cache.is_complete(storage):
        return cache, False
    prompts = [cfg.subject.instance_prompt, cfg.subject.class_prompt]
    rows = [{"index": i, "png": b"", "text": t, "kind": "prompt"} for i, t in enumerate(prompts)]
    for kind, pngs in (("instance", inst_png), ("class", class_png), ("holdout", hold_png)):
        rows += [{"index": i, "png": p, "text": "", "kind": kind} for i, p in enumerate(pngs)]
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
                "std": bytes(batch["std"][i]), "pooled": bytes(batch["pooled"][i]),
                "ids_2": bytes(batch["ids_2"][i]), "text_ids": bytes(batch["text_ids"][i]),
                "shape": [int(x) for x in batch["shape"][i] if x]})  # drop the padding
    for kind, uri in (("instance", cache.instance_uri), ("class", cache.class_uri),
                      ("holdout", cache.holdout_uri)):
        if out[kind] or kind == "instance":
            rows = [{k: r[k] for k in ("index", "mean", "std", "shape")}
                    | {"time_ids": time_ids[kind][r["index"]].numpy().tobytes() if time_ids else b""}
                    for r in sorted(out[kind], key=lambda r: r["index"])]
            write_encoded(storage, uri, rows)
    storage.write_bytes(cache.prompts_uri,
                        prompts_file(**_prompt_tensors(sorted(out["prompt"], key=lambda r: r["index"]))))
    storage.write_json(cache.manifest_uri, {  # last: marks the cache complete
        "key": cache.key, "model": model_identity, "family": family, "num_instance": cache.num_instance,
        "num_class": cache.num_class, "num_holdout": cache.num_holdout,
        "resolution": cfg.train.resolution, "random_flip": cfg.train.random_flip,
    })
    return cache, True


def prepare_encoded(cfg: RaydbConfig, storage: Storage, *,
                    with_holdout: bool = False) -> tuple[EncodedCache, bool]:
    """Prior images (shared cache, generated if missing) and the encode stage: ``(cache, ran)``.

    ``with_holdout`` also encodes the held-out class images that validation (Tune) scores. Class
    images are encoded only when some run trains on them (image mode, or a pool in model mode).
    """
    from raydb.models.components import model_family, resolve_model

    split = cfg.prior.enabled and (bool(cfg.prior.class_data) or "images" in cfg.prior_modes())
    if split and cfg.prior.num_class_images < cfg.cluster.num_workers:
        raise ValueError(f"prior.num_class_images ({cfg.prior.num_class_images}) must be at least "
                         f"cluster.num_workers ({cfg.cluster.num_workers}): class images are split "
                         "across workers")
    path, identity = resolve_model(cfg.model, storage, cfg.workspace)
    family = model_family(path)
    check_resolution(cfg.train.resolution, family)  # FLUX.1: multiples of 16, before anything is encoded
    inputs = prepare_inputs(cfg, storage, family=family, with_holdout=with_holdout)
    return run_encode_stage(cfg, storage, inputs, model_identity=identity)


def read_class_dataset(storage: Storage, cache: EncodedCache):
    """The encoded class rows as an in-memory Ray dataset (split across Train workers).

    Read by the caller's process with pyarrow and handed to Ray with ``from_items``, which builds
    the blocks in this process: the set is small (about 130 kB per 512 px image), any Ray Data read
    or ``from_arrow`` costs tasks in fresh worker processes (seconds of imports each), and a
    streaming read inside a Tune trial is limited to the trial's own tiny CPU share and never
    starts. One block per row (at most 256) lets Ray Train give every worker an equal share.
    """
    import ray

    table = pq.read_table(io.BytesIO(storage.read_bytes(cache.class_uri)))
    return ray.data.from_items(table.to_pylist(), override_num_blocks=max(1, min(table.num_rows, 256)))
