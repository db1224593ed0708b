"""``make demo``: the whole pipeline on a local Ray cluster, then one authenticated HTTP request.

digits model -> built-in subject -> ``run_pipeline`` (prior images, encode, training — or a short
search when the config has ``tune:`` — registration, the Serve app) -> ``POST /v1/generate`` with a
fresh random API key -> the PNG on disk -> Serve shut down. A second ``make demo`` skips every
stage whose inputs are unchanged (see :mod:`raydb.pipeline`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from raydb.cluster import free_port, init_ray
from raydb.config import RaydbConfig
from raydb.registry import LOSS_CURVE, SAMPLES
from raydb.serving import console_url
from raydb.storage import Storage, is_s3, join

__all__ = ["run_demo", "generate_png"]

log = logging.getLogger(__name__)


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def generate_png(url: str, api_key: str | None, body: dict[str, Any], *,
                 timeout: float = 300) -> tuple[int, bytes]:
    """``POST`` ``body`` to ``/v1/generate`` asking for a PNG; returns ``(HTTP status, body bytes)``."""
    headers = {"Content-Type": "application/json", "Accept": "image/png"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _copy_out(storage: Storage, uri: str | None, dest: Path) -> str | None:
    if not uri or not storage.exists(uri):
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(storage.read_bytes(uri))
    return str(dest)


def _enlarged_copy(png: Path, dest: Path, min_side: int = 256) -> None:
    """A small image (the digits model draws 32 px) also saved enlarged, pixels kept sharp, to look at."""
    from PIL import Image

    with Image.open(png) as image:
        factor = -(-min_side // min(image.size))
        if factor > 1:
            image.resize((image.width * factor, image.height * factor), Image.NEAREST).save(dest)


def run_demo(cfg: RaydbConfig, output: str = "demo-output", keep_serving: bool = False) -> dict[str, Any]:
    """Run the pipeline with a Serve deployment, make one authenticated request, print the web
    console's URL and the demo's API key, and shut Serve down (with ``keep_serving``, only after
    Ctrl-C: the console stays up to be looked at). A Ray cluster the demo started is stopped; one it
    joined (``ray job submit``, a test session's) keeps running, less the demo's Serve app."""
    import ray
    from ray import serve

    from raydb.pipeline import run_pipeline

    start = time.perf_counter()
    storage = Storage(cfg.s3_endpoint_url)
    out = Path(output)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = cfg.model_copy(deep=True)
    if not _port_free(cfg.serve.host, cfg.serve.port):  # another server on this machine: move aside
        cfg.serve.port = free_port(cfg.serve.host)
    # A fresh key for this demo only, given the way an operator would: in the environment, before
    # the app is built (only its sha256 digest reaches the replicas).
    api_key = secrets.token_urlsafe(24)
    os.environ[cfg.serve.api_keys_env] = f"{api_key}:{cfg.subject.tenant}"

    started_ray = not ray.is_initialized()  # a cluster we join (a test session's, a user's) stays up
    init_ray(cfg)
    try:
        summary = run_pipeline(cfg, storage, deploy=True)
        url = summary["url"]
        # the subject as it was trained: its instance prompt, DDIM's 25 steps, no guidance (the way
        # bench/fidelity.py samples, so the demo's picture is one of the figures' kind)
        body = {"subject_id": cfg.subject.id, "prompt": cfg.subject.instance_prompt, "seed": 0,
                "num_inference_steps": 25, "guidance_scale": 1.0, "width": cfg.train.resolution,
                "height": cfg.train.resolution}
        denied, _ = generate_png(url, None, body)
        t = time.perf_counter()
        status, png = generate_png(url, api_key, body)
        request_s = time.perf_counter() - t
        if status != 200 or not png.startswith(b"\x89PNG"):
            raise RuntimeError(f"POST {url} answered {status}: {png[:300]!r}")
        (out / "generated.png").write_bytes(png)
        _enlarged_copy(out / "generated.png", out / "generated_large.png")
        log.info("POST %s without a key: %s; with the demo key: %s, %d bytes of PNG in %.1fs -> %s "
                 "(enlarged: %s)", url, denied, status, len(png), request_s, out / "generated.png",
                 out / "generated_large.png")
        log.info("web console: %s -- demo API key (tenant %s): %s", console_url(cfg), cfg.subject.tenant,
                 api_key)
        if keep_serving:
            log.info("serving until Ctrl-C")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        else:
            log.info("the demo stops the server now; `raydb demo --keep-serving` keeps it up for the console")
    finally:
        if started_ray and ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        elif ray.is_initialized():  # only our own app: others on a shared cluster keep serving
            serve.delete(cfg.serve.app_name)

    stages = {s["stage"]: s["outputs"] for s in summary["stages"]}
    learned = stages.get("tune") or stages.get("train") or {}
    run_dir = learned.get("run_dir")
    version = summary["registered"]  # the registry version: its pictures were registered with it
    artifacts = {
        "generated_png": str(out / "generated.png"),
        "generated_large": str(large) if (large := out / "generated_large.png").exists() else None,
        "samples": _copy_out(storage, version and join(version, SAMPLES), out / SAMPLES),
        "loss_curve": _copy_out(storage, version and join(version, LOSS_CURVE), out / LOSS_CURVE),
        "tune_results": stages.get("tune", {}).get("results_csv"),
        "tune_plot": _copy_out(storage, stages.get("tune", {}).get("plot"), out / "tune_trials.png"),
        "adapter": summary["adapter_uri"],
        "registry": summary["registered"],
        "run_dir": run_dir,
        "encoded_cache": stages.get("encode", {}).get("uri"),
        "prior_cache": stages.get("prior", {}).get("cache_uri"),
        "pipeline_summary": summary["summary_uri"],
        "workspace": cfg.workspace if is_s3(cfg.workspace) else str(Path(cfg.workspace).resolve()),
    }
    lines = [f"  {name:17s} {where}" for name, where in artifacts.items() if where]
    log.info("artifacts:\n%s", "\n".join(lines))
    log.info(f"  (served at {summary['url']} during the demo; Serve is shut down now. "
          f"`raydb pipeline --deploy --config ...` keeps it running)")
    return {"artifacts": artifacts, "stages": {s["stage"]: s["status"] for s in summary["stages"]},
            "seconds": round(time.perf_counter() - start, 1)}
