"""The batching engine serves FLUX.1 adapters: per-sample LoRA slots on the transformer (and CLIP),
guidance as the transformer's input (no classifier-free doubling), and a mixed-subject batch equal
to one-by-one — and to diffusers' ``FluxPipeline`` with the adapter file loaded by
``load_lora_weights``.

Fast tier, no Ray. float64, as in tests/serving/test_engine.py: batched and one-by-one kernels
differ only in the last bits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raydb.config import ModelConfig, load_config
from raydb.registry import ADAPTER_WEIGHTS, latest_version
from raydb.storage import Storage

TOL = 1e-9


def _params(seed: int, **kw) -> dict:
    return {"prompt": "a photo of sks dog", "negative_prompt": None, "num_inference_steps": 2,
            "guidance_scale": 3.5, "seed": seed, "width": 64, "height": 64, "num_images": 1} | kw


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Two trained tiny-Flux subjects: one with CLIP LoRA and alpha != rank, one transformer-only."""
    from raydb.pipeline import run_pipeline

    workspace = str(tmp_path_factory.mktemp("flux-engine-ws"))
    for sid, lora in (("dog", {"rank": 4, "alpha": 8.0, "train_text_encoder": True}), ("cat", {"rank": 2})):
        run_pipeline(load_config(data={
            "workspace": workspace, "model": {"pretrained": "tiny-flux"}, "prior": {"enabled": False},
            "subject": {"id": sid, "instance_prompt": f"a photo of sks {sid}",
                        "class_prompt": f"a photo of a {sid}"},
            "lora": lora, "train": {"resolution": 64, "max_steps": 2, "learning_rate": 5e-2,
                                    "checkpoint_every": 1000, "num_sample_images": 0}}),
            local=True, quiet=True)  # trained and registered
    return workspace


def _pipe(workspace: str):
    from raydb.models.components import load_pipeline

    return load_pipeline(ModelConfig(pretrained="tiny-flux"), Storage(), workspace, dtype=torch.float64)


def test_mixed_subject_flux_batch_equals_one_by_one_and_flux_pipeline(workspace):
    from raydb.serving.engine import DiffusionEngine, EngineRequest
    from raydb.serving.slots import SlotPool

    engine = DiffusionEngine(_pipe(workspace), num_slots=2, max_lora_rank=8)
    assert set(engine.layers) == {"transformer", "text_encoder"}  # T5 is never trained: no slots
    pool = SlotPool(engine, wait_s=0.2)
    uris = {sid: latest_version(Storage(), workspace, "default", sid)["uri"] for sid in ("dog", "cat")}
    loaded = {sid: pool.load(Storage(), uri, sid, "v0001") for sid, uri in uris.items()}
    subjects = ["dog", None, "cat"]  # None: the base model shares the batch
    # each image keeps its own guidance scale (an input of the distilled transformer, not a
    # doubled batch), so different scales — even <= 1, no CFG on SD — share one loop
    scales = [3.5, 1.0, 5.0]
    requests = [EngineRequest(_params(seed, num_images=2 if seed == 0 else 1, guidance_scale=scale),
                              loaded[sid].slot if sid else None)
                for seed, (sid, scale) in enumerate(zip(subjects, scales, strict=True))]
    assert len({engine.key(r.params) for r in requests}) == 1
    rows = [slice(0, 2), slice(2, 3), slice(3, 4)]
    before = engine.unet_forwards
    batched = engine.denoise(requests)
    assert engine.unet_forwards - before == 2  # one transformer call per step for all 4 images, no CFG
    assert batched.shape == (4, 16, 64)  # packed: (64 / 16)^2 tokens of 4 x 16 channels
    alone = [engine.denoise([r]) for r in requests]
    for sid, row, one in zip(subjects, rows, alone, strict=True):
        assert (batched[row] - one).abs().max() < TOL, sid
    for i in (0, 1, 3):
        assert (batched[i] - batched[2]).abs().max() > 1e-3, f"image {i} looks like the base"
    # The same adapters through diffusers' FluxPipeline (from the file: alpha != rank, CLIP LoRA).
    ref = _pipe(workspace)
    for sid, row, request in zip(subjects, rows, requests, strict=True):
        if sid:
            ref.load_lora_weights(uris[sid], weight_name=ADAPTER_WEIGHTS, adapter_name=sid)
            ref.set_adapters([sid])
        else:
            ref.disable_lora()
        p = request.params
        generators = [torch.Generator().manual_seed(p["seed"] + i) for i in range(p["num_images"])]
        expected = ref(p["prompt"], num_inference_steps=2, guidance_scale=p["guidance_scale"], width=64,
                       height=64, num_images_per_prompt=p["num_images"], output_type="latent",
                       max_sequence_length=32, generator=generators).images
        ref.enable_lora()
        assert (batched[row] - expected).abs().max() < TOL, sid
    # decode: one PNG per image at the requested size
    out = engine.decode(batched, requests)
    assert [len(r["images"]) for r in out] == [2, 1, 1] and out[0]["width"] == out[0]["height"] == 64
    engine.close()


def test_flux_sizes_must_be_multiples_of_16(workspace):
    from raydb.config import ServeConfig
    from raydb.errors import RequestError
    from raydb.serving.api import GenerateRequest, validate_generate

    meta = {"base_model": {"family": "flux"}, "subject": {}}
    with pytest.raises(RequestError, match="multiple of 16 for a FLUX.1 model"):
        validate_generate(GenerateRequest(subject_id="dog", prompt="a dog", width=72), ServeConfig(), meta)
    assert validate_generate(GenerateRequest(subject_id="dog", prompt="a dog", width=80), ServeConfig(), meta)
    assert validate_generate(GenerateRequest(subject_id="x", prompt="a dog", width=72), ServeConfig(),
                             {"base_model": {"family": "sd"}, "subject": {}})


def test_another_familys_adapter_is_refused_with_409(workspace):
    from raydb.serving.adapters import AdapterMismatch, read_adapter
    from raydb.serving.status import http_status

    uri = latest_version(Storage(), workspace, "default", "dog")["uri"]
    identity = json.loads(Path(uri, "adapter.json").read_text())["base_model"]["identity"]
    meta, _, _ = read_adapter(Storage(), uri, identity, "flux")
    assert meta["base_model"]["family"] == "flux"
    for family in ("sd", "sdxl"):  # a FLUX.1 adapter on an SD / SDXL server
        with pytest.raises(AdapterMismatch, match="flux model family") as refused:
            read_adapter(Storage(), uri, identity, family)
        assert http_status(refused.value) == 409
