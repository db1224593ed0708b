"""What a run leaves behind: adapter + adapter.json + its pictures (loss curve, sample grid), metrics.jsonl.

``finish_run`` writes them all; ``finished_result`` answers for a run that already finished. Both
return the train stage's summary (``adapter_uri``, ``run_dir``, ``steps``, ...). Neither registers:
the pipeline is the only registrar (:func:`raydb.pipeline.run_pipeline`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import statistics
import time
from typing import Any

import torch
from PIL import Image

from raydb.config import RaydbConfig
from raydb.models.family import lora_targets
from raydb.registry import ADAPTER_META, ADAPTER_WEIGHTS, LOSS_CURVE, SAMPLES
from raydb.storage import Storage, join
from raydb.train.rundir import adapter_uri, run_uri

__all__ = ["adapter_metadata", "write_adapter", "loss_curve_png", "sample_grid_png", "image_grid",
           "metrics_line", "summarize_speed", "finish_run", "finished_result"]

log = logging.getLogger(__name__)


def adapter_metadata(
    cfg: RaydbConfig, *, model_identity: str, weights: bytes, metrics: dict[str, Any],
    prediction_type: str, family: str = "sd",
) -> dict[str, Any]:
    """adapter.json: enough to serve, audit and reproduce the adapter (``base_model.family``: the
    model family it was trained on, which a deployment of the other family refuses)."""
    from raydb.prompts import instance_token

    return {
        "format": "diffusers-lora-v1",
        "weights": ADAPTER_WEIGHTS,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        "base_model": {"pretrained": cfg.model.pretrained, "identity": model_identity,
                       "family": family, "prediction_type": prediction_type},
        "lora": cfg.lora.model_dump(mode="json") | {
            "alpha": cfg.lora.effective_alpha,
            "target_modules": lora_targets(cfg.lora.target_modules, family)},  # resolved for the family
        "subject": {"id": cfg.subject.id, "tenant": cfg.subject.tenant,
                    "instance_prompt": cfg.subject.instance_prompt,
                    "class_prompt": cfg.subject.class_prompt,
                    "instance_token": instance_token(cfg.subject)},
        "training": cfg.train.model_dump(mode="json") | {"prior_enabled": cfg.prior.enabled,
                                                         "prior_mode": cfg.prior.mode,
                                                         "num_class_images": cfg.prior.num_class_images,
                                                         "num_workers": cfg.cluster.num_workers},
        "metrics": metrics,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_adapter(storage: Storage, adapter_uri: str, weights: bytes, meta: dict[str, Any]) -> None:
    storage.write_bytes(join(adapter_uri, ADAPTER_WEIGHTS), weights)
    storage.write_json(join(adapter_uri, ADAPTER_META), meta)  # last: the adapter is complete


def loss_curve_png(metrics: list[dict[str, Any]], title: str = "training loss") -> bytes:
    """Total, instance and prior loss per optimizer step (with a moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, color in (("loss", "black"), ("loss_instance", "tab:blue"), ("loss_prior", "tab:orange")):
        vals = [m.get(key) for m in metrics]
        if all(v is None for v in vals):
            continue
        ax.plot(steps, vals, color=color, alpha=0.25, linewidth=1)
        k = max(1, len(vals) // 20)
        smooth = [sum(vals[max(0, i - k + 1): i + 1]) / len(vals[max(0, i - k + 1): i + 1])
                  for i in range(len(vals))]
        ax.plot(steps, smooth, color=color, label=key, linewidth=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def image_grid(rows: list[list[Image.Image]]) -> Image.Image:
    w, h = rows[0][0].size
    cols = max(len(r) for r in rows)
    grid = Image.new("RGB", (cols * w, len(rows) * h), "white")
    for y, row in enumerate(rows):
        for x, img in enumerate(row):
            grid.paste(img, (x * w, y * h))
    return grid


@torch.no_grad()
def sample_grid_png(
    cfg: RaydbConfig, storage: Storage, adapter_weights: bytes, *, seeds: list[int] | None = None,
    device: torch.device | str = "cpu",
) -> bytes:
    """Top row: base model; bottom row: base + trained adapter; instance prompt, same seeds.

    Samples on ``device`` in the family's sampling dtype there (fp32 on CPU, fp16/bf16 on CUDA):
    the training worker passes its own GPU, where on CPU a real model's grid takes minutes. The
    seeds' noise is drawn on the CPU either way (diffusers moves it), so a seed gives the same
    starting noise on any device."""
    import tempfile
    from pathlib import Path

    from raydb.models.components import load_pipeline, pipeline_call_kwargs

    seeds = seeds or list(range(cfg.train.num_sample_images))
    pipe = load_pipeline(cfg.model, storage, cfg.workspace, dtype=None, device=device)
    res = cfg.train.resolution

    guidance = {} if cfg.train.sample_guidance_scale is None else \
        {"guidance_scale": cfg.train.sample_guidance_scale}

    def row() -> list[Image.Image]:
        return [pipe(cfg.subject.instance_prompt, num_inference_steps=cfg.train.sample_steps,
                     height=res, width=res, generator=torch.Generator().manual_seed(s),
                     **guidance, **pipeline_call_kwargs(pipe)).images[0]
                for s in seeds]

    base = row()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / ADAPTER_WEIGHTS).write_bytes(adapter_weights)
        pipe.load_lora_weights(tmp, weight_name=ADAPTER_WEIGHTS)
    tuned = row()
    buf = io.BytesIO()
    image_grid([base, tuned]).save(buf, format="PNG")
    return buf.getvalue()


def metrics_line(metrics: dict[str, Any]) -> str:
    keys = ("step", "loss", "loss_instance", "loss_prior", "lr", "grad_norm", "images_per_s")
    return json.dumps({k: metrics[k] for k in keys if k in metrics} |
                      {k: v for k, v in metrics.items() if k.startswith("val_")})


def summarize_speed(metrics: list[dict[str, Any]]) -> float:
    """Median images/s over the steps after the first five (warm-up excluded)."""
    vals = [m["images_per_s"] for m in metrics[5:]] or [m["images_per_s"] for m in metrics]
    return float(statistics.median(vals)) if vals else 0.0


def finish_run(
    cfg: RaydbConfig, storage: Storage, state: Any, components: Any, metrics: list[dict[str, Any]],
    *, samples: bool = True, extra_metrics: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Write the adapter, adapter.json, metrics.jsonl and pictures (the finished adapter).

    ``state`` is the ``TrainState`` (its ``unet``/``text_encoder`` hold the trained LoRA and
    ``step`` the steps done); ``components`` supplies the base model's identity; ``device`` is
    where the sample grid is drawn (the one the run trained on).
    """
    from raydb.train.lora import save_lora

    run = run_uri(cfg)
    weights = save_lora(state.unet, state.text_encoder, state.text_encoder_2)
    final = {k: metrics[-1][k] for k in ("loss", "loss_instance", "loss_prior") if metrics}
    final |= {"steps": state.step, "images_per_s": summarize_speed(metrics)} | (extra_metrics or {})
    meta = adapter_metadata(cfg, model_identity=components.identity, weights=weights,
                            metrics=final, prediction_type=components.prediction_type,
                            family=components.family)
    adapter = adapter_uri(cfg)
    storage.write_bytes(join(run, "metrics.jsonl"), "".join(metrics_line(m) + "\n" for m in metrics).encode())
    # the pictures sit beside the weights, so registering the adapter registers them with it
    storage.write_bytes(join(adapter, LOSS_CURVE), loss_curve_png(metrics, f"{cfg.subject.id} loss"))
    if samples and cfg.train.num_sample_images:
        storage.write_bytes(join(adapter, SAMPLES), sample_grid_png(cfg, storage, weights, device=device))
    write_adapter(storage, adapter, weights, meta)  # last: adapter.json marks the adapter complete
    return {"adapter_uri": adapter, "run_dir": run, "steps": state.step,
            "images_per_s": final["images_per_s"], "loss": final.get("loss")}


def finished_result(cfg: RaydbConfig, meta: dict[str, Any], *, quiet: bool) -> dict[str, Any]:
    """A rerun of a finished run (``meta``: its adapter.json): nothing to train."""
    result = {"adapter_uri": adapter_uri(cfg), "run_dir": run_uri(cfg), "steps": meta["metrics"]["steps"],
              "images_per_s": meta["metrics"].get("images_per_s"), "loss": meta["metrics"].get("loss"),
              "skipped": True}
    if not quiet:
        log.info("run %s already finished (%s steps); nothing to train", result["run_dir"], result["steps"])
    return result
