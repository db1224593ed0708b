"""FLUX.1 end to end: ``raydb pipeline --config jobs/configs/flux-demo.yaml`` on CPU with the tiny Flux.

priors (FluxPipeline on Ray Data) -> encode (CLIP pooled, T5 states, text ids) -> train (flow
matching on Ray Train, 2 workers) -> register (+ kohya export) -> serve; then the registered adapter
loads into a plain ``FluxPipeline`` and changes its output, and a served request returns a PNG.
As lean as the SDXL one: tiny sizes, 3 steps, the session's Ray cluster.
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

from raydb.cluster import free_ports
from raydb.config import load_config
from raydb.registry import ADAPTER_META, ADAPTER_WEIGHTS

REPO = Path(__file__).resolve().parents[1]


def _sample(pipe) -> np.ndarray:
    return pipe("a photo of sks toy", num_inference_steps=2, height=64, width=64, output_type="np",
                max_sequence_length=32, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.ray
def test_flux_demo_pipeline_end_to_end(ray_cluster, tmp_path):
    import httpx
    from diffusers import FluxPipeline
    from ray import serve
    from safetensors.torch import load as st_load

    from raydb.pipeline import run_pipeline

    port = free_ports(1)[0]
    cfg = load_config(REPO / "jobs" / "configs" / "flux-demo.yaml",
                      [f"workspace={tmp_path / 'ws'}", f"serve.port={port}", "train.max_steps=3",
                       "prior.num_class_images=2"])  # one class image per worker
    assert cfg.cluster.num_workers == 2
    try:
        result = run_pipeline(cfg, deploy=True, quiet=True)
        assert {s["stage"]: s["status"] for s in result["stages"]} == {
            "prior": "ran", "encode": "ran", "train": "ran", "register": "ran", "serve": "ran"}
        version = Path(result["registered"])
        meta = json.loads((version / ADAPTER_META).read_text())
        assert meta["base_model"]["family"] == "flux"
        assert meta["base_model"]["prediction_type"] == "flow_matching"
        assert meta["metrics"]["num_workers"] == 2 and meta["metrics"]["steps"] == 3
        assert "proj_mlp" in meta["lora"]["target_modules"]  # Flux's default targets, resolved
        assert meta["exports"]["kohya"]["weights"] == "lora_kohya.safetensors"
        kohya = st_load((version / "lora_kohya.safetensors").read_bytes())
        assert any(k.startswith("lora_unet_single_blocks_0_linear1.") for k in kohya)
        assert any(k.startswith("lora_unet_double_blocks_1_txt_attn_qkv.") for k in kohya)
        # The encode cache holds Flux's conditioning: T5 states, CLIP pooled output, text ids.
        encoded = next((tmp_path / "ws" / "encoded").iterdir())
        prompts = st_load((encoded / "prompts.safetensors").read_bytes())
        assert set(prompts) == {"embeds", "ids", "pooled", "ids_2", "text_ids"}
        assert prompts["embeds"].shape == (2, 32, 48) and prompts["text_ids"].shape == (2, 32, 3)

        # The registered adapter loads into a plain FluxPipeline and changes what it draws.
        models = (tmp_path / "ws" / "models").iterdir()
        model_dir = next(p for p in models if p.name.startswith("tiny-flux"))
        pipe = FluxPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        base = _sample(pipe)
        pipe.load_lora_weights(str(version), weight_name=ADAPTER_WEIGHTS)
        assert np.abs(_sample(pipe) - base).max() > 1e-4

        # A served request returns a PNG.
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=180)
        deadline = time.time() + 120
        while client.get("/healthz").status_code != 200:
            assert time.time() < deadline, "server did not become healthy"
            time.sleep(0.5)
        resp = client.post("/v1/generate", headers={"Accept": "image/png"}, json={
            "subject_id": "demo-flux", "prompt": "a photo of sks toy", "seed": 1,
            "num_inference_steps": 2, "width": 64, "height": 64})
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(resp.content)).size == (64, 64)
        bad = client.post("/v1/generate", json={"subject_id": "demo-flux", "prompt": "a toy", "width": 72})
        assert bad.status_code == 422 and "multiple of 16" in bad.text  # the API's validation status
    finally:
        serve.shutdown()
