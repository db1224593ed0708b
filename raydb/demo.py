"""``make demo``: the whole pipeline on the embedded tiny model and the built-in demo subject."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from raydb.config import RaydbConfig
from raydb.storage import Storage, is_s3, join

__all__ = ["run_demo"]


def _copy_out(storage: Storage, uri: str, dest: Path) -> str:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(storage.read_bytes(uri))
    return str(dest)


def run_demo(cfg: RaydbConfig, output: str = "demo-output") -> dict[str, Any]:
    """Tiny model -> demo subject -> prior images (Ray Data) -> training -> registry -> pictures."""
    from raydb.data.ingest import load_images
    from raydb.models.components import resolve_model
    from raydb.prior import ensure_prior_images
    from raydb.ray_utils import init_ray
    from raydb.train.outputs import image_grid
    from raydb.train.run import train_subject

    storage = Storage(cfg.s3_endpoint_url)
    out = Path(output)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    model_path, identity = resolve_model(cfg.model, storage, cfg.workspace)
    timings["model"] = time.perf_counter() - t
    print(f"[1/4] base model {cfg.model.pretrained!r} ({identity}) at {model_path}")

    t = time.perf_counter()
    instance = load_images(cfg.subject.instance_data, cfg.train.resolution, storage=storage,
                           center_crop=cfg.train.center_crop)
    image_grid([instance]).save(out / "instance_images.png")
    timings["ingest"] = time.perf_counter() - t
    print(f"[2/4] ingested {len(instance)} instance images from {cfg.subject.instance_data}")

    t = time.perf_counter()
    init_ray(cfg)
    prior = ensure_prior_images(cfg, storage, use_ray=True)
    timings["prior"] = time.perf_counter() - t
    print(f"[3/4] prior cache {prior.cache_uri}: {prior.images_generated} generated now")

    t = time.perf_counter()
    result = train_subject(cfg, storage)
    timings["train"] = time.perf_counter() - t
    print(f"[4/4] trained {result['steps']} steps at {result['images_per_s']:.1f} images/s; "
          f"registered {result.get('registered')}")

    artifacts = {
        "instance_images": str(out / "instance_images.png"),
        "samples": _copy_out(storage, join(result["run_dir"], "samples.png"), out / "samples.png"),
        "loss_curve": _copy_out(storage, join(result["run_dir"], "loss_curve.png"), out / "loss_curve.png"),
        "adapter": result["adapter_uri"],
        "registry": result.get("registered"),
        "run_dir": result["run_dir"],
        "prior_cache": prior.cache_uri,
        "workspace": cfg.workspace if is_s3(cfg.workspace) else str(Path(cfg.workspace).resolve()),
    }
    print("\nArtifacts:")
    for name, where in artifacts.items():
        print(f"  {name:16s} {where}")
    print("  (samples.png: top row base model, bottom row with the adapter; same seeds)")
    return {"artifacts": artifacts, "timings_s": {k: round(v, 2) for k, v in timings.items()}}
