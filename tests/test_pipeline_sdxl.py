"""SDXL end to end: ``raydb pipeline --config jobs/configs/sdxl-demo.yaml`` on CPU with the tiny SDXL.

priors (StableDiffusionXLPipeline on Ray Data) -> encode (both encoders, pooled embedding, time ids)
-> train (Ray Train) -> register (+ kohya export) -> serve; then the registered adapter loads into
a plain ``StableDiffusionXLPipeline`` and changes its output, and a served request returns a PNG.
The family checks of Serve run without Ray (fast tier).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raydb.cluster import free_port
from raydb.config import load_config
from raydb.registry import ADAPTER_META, ADAPTER_WEIGHTS
from raydb.serving.adapters import AdapterMismatch, read_adapter
from raydb.serving.status import http_status
from raydb.storage import Storage

REPO = Path(__file__).resolve().parents[1]


def _sample(pipe) -> np.ndarray:
    return pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.ray
def test_sdxl_demo_pipeline_end_to_end(ray_cluster, tmp_path):
    import httpx
    from diffusers import StableDiffusionXLPipeline
    from ray import serve
    from safetensors.torch import load as st_load

    from raydb.pipeline import run_pipeline

    port = free_port()
    cfg = load_config(REPO / "jobs" / "configs" / "sdxl-demo.yaml",
                      [f"workspace={tmp_path / 'ws'}", f"serve.port={port}", "train.max_steps=3"])
    try:
        result = run_pipeline(cfg, deploy=True, quiet=True)
        assert {s["stage"]: s["status"] for s in result["stages"]} == {
            "prior": "ran", "encode": "ran", "train": "ran", "register": "ran", "serve": "ran"}
        version = Path(result["registered"])
        meta = json.loads((version / ADAPTER_META).read_text())
        assert meta["base_model"]["family"] == "sdxl"
        assert meta["exports"]["kohya"]["weights"] == "lora_kohya.safetensors"
        assert any(k.startswith("lora_unet_input_blocks_4_1_") for k in
                   st_load((version / "lora_kohya.safetensors").read_bytes()))
        # The encode cache holds SDXL's conditioning: pooled embeddings and per-image time ids.
        encoded = next((tmp_path / "ws" / "encoded").iterdir())
        prompts = st_load((encoded / "prompts.safetensors").read_bytes())
        assert set(prompts) == {"embeds", "ids", "pooled", "ids_2"}

        # The registered adapter loads into a plain SDXL pipeline and changes what it draws.
        model_dir = next(p for p in (tmp_path / "ws" / "models").iterdir() if p.name.startswith("tiny-sdxl"))
        pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        base = _sample(pipe)
        pipe.load_lora_weights(str(version), weight_name=ADAPTER_WEIGHTS)
        assert np.abs(_sample(pipe) - base).max() > 1e-3

        # A served request returns a PNG.
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=180)
        deadline = time.time() + 120
        while client.get("/healthz").status_code != 200:
            assert time.time() < deadline, "server did not become healthy"
            time.sleep(0.5)
        resp = client.post("/v1/generate", headers={"Accept": "image/png"}, json={
            "subject_id": "demo-xl", "prompt": "a photo of sks toy", "seed": 1,
            "num_inference_steps": 2, "width": 64, "height": 64})
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(resp.content)).size == (64, 64)
    finally:
        serve.shutdown()


def _registered(tmp_path: Path, name: str, family: str, identity: str) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / ADAPTER_WEIGHTS).write_bytes(b"unused: the family is checked first")
    (folder / ADAPTER_META).write_text(json.dumps({"base_model": {"identity": identity, "family": family},
                                                   "weights_sha256": "0"}))
    return str(folder)


def test_a_deployment_refuses_adapters_of_the_other_family(tmp_path):
    sd = _registered(tmp_path, "sd", "sd", "tiny-v1-x")
    sdxl = _registered(tmp_path, "sdxl", "sdxl", "tiny-sdxl-v1-y")
    with pytest.raises(AdapterMismatch, match="sd model family") as refused:  # SD adapter, SDXL server
        read_adapter(Storage(), sd, "tiny-sdxl-v1-y", "sdxl")
    assert http_status(refused.value) == 409
    with pytest.raises(AdapterMismatch, match="sdxl model family") as refused:  # and vice versa
        read_adapter(Storage(), sdxl, "tiny-v1-x", "sd")
    assert http_status(refused.value) == 409
