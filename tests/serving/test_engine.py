"""The batching engine without Ray: multi-LoRA layers, the denoising loop, slots, the shape batcher.

The engine tests run the tiny model in float64, where batched and one-by-one kernels differ only in
the last bits (~1e-14 on the latents); they compare final latents with a tolerance of 1e-9, far
below any visible change (the subjects' latents differ from the base by > 1).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest
import torch

from raydb.config import ModelConfig
from raydb.serving.adapters import AdapterCorrupt, AdapterGone
from raydb.serving.multi_lora import (
    AdapterTooLarge,
    AdapterUnsupported,
    LoraFactors,
    MultiLoraLinear,
    SlotRouter,
    parse_adapter,
)
from raydb.serving.status import http_status

TOL = 1e-9


def _params(seed: int, **kw) -> dict:
    return {"prompt": "a photo of sks dog", "negative_prompt": None, "num_inference_steps": 2,
            "guidance_scale": 7.5, "seed": seed, "width": 64, "height": 64, "num_images": 1} | kw


# -- pure layers ----------------------------------------------------------------------------------
def test_multi_lora_linear_routes_each_sample_to_its_slot_and_zero_slot_is_the_base():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).double()
    router = SlotRouter(num_slots=2)
    layer = MultiLoraLinear(base, router, max_rank=4)
    low = LoraFactors(torch.randn(2, 6).double(), torch.randn(5, 2).double(), 0.5)  # rank 2, padded
    full = LoraFactors(torch.randn(4, 6).double(), torch.randn(5, 4).double(), 2.0)
    layer.write_slot(0, low)
    layer.write_slot(1, full)
    x = torch.randn(3, 7, 6).double()
    with router.route(torch.tensor([1, router.zero_slot, 0])):
        out = layer(x)
    assert torch.allclose(out[0], base(x[0]) + 2.0 * x[0] @ full.down.T @ full.up.T, atol=1e-12)
    assert torch.equal(out[1], base(x[1]))  # the zero slot adds exact zeros
    assert torch.allclose(out[2], base(x[2]) + 0.5 * x[2] @ low.down.T @ low.up.T, atol=1e-12)
    assert torch.equal(layer(x), base(x))  # no routing: the base layer
    with pytest.raises(AdapterCorrupt, match="do not fit"):
        layer.write_slot(0, LoraFactors(torch.randn(2, 7), torch.randn(5, 2), 1.0))
    with router.route(torch.tensor([0])), pytest.raises(ValueError, match="3 samples routed with 1"):
        layer(x)


def test_parse_adapter_scales_and_refuses_what_it_cannot_serve():
    down, up = torch.ones(4, 8), torch.ones(8, 4)
    state = {"unet.a.to_q.lora.down.weight": down, "unet.a.to_q.lora.up.weight": up,
             "text_encoder.l.q_proj.lora_linear_layer.down.weight": down[:2],
             "text_encoder.l.q_proj.lora_linear_layer.up.weight": up[:, :2]}
    parsed = parse_adapter(state, {"unet.lora_alpha": 8.0, "text_encoder.lora_alpha": 1.0})
    assert parsed["unet"]["a.to_q"].scale == 2.0 and parsed["text_encoder"]["l.q_proj"].scale == 0.5
    assert parse_adapter(state, {})["unet"]["a.to_q"].scale == 1.0  # no config: alpha = rank
    with pytest.raises(AdapterCorrupt, match="unrecognised tensor 'unet.x.weight'"):
        parse_adapter(state | {"unet.x.weight": down}, {})
    with pytest.raises(AdapterCorrupt, match="unpaired"):
        parse_adapter({"unet.a.to_q.lora.down.weight": down}, {})
    with pytest.raises(AdapterUnsupported, match="DoRA"):
        parse_adapter(state, {"unet.use_dora": True})


# -- the engine over the tiny model ---------------------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A workspace with one trained subject (alpha != rank, text encoder LoRA too) and random
    subjects of ranks 2, 8, 16 (UNet only)."""
    from raydb.config import load_config
    from raydb.pipeline import run_pipeline
    from raydb.storage import Storage
    from tests.helpers.adapters import register_random_adapter

    workspace = str(tmp_path_factory.mktemp("engine-ws"))
    run_pipeline(load_config(data={
        "workspace": workspace, "model": {"pretrained": "tiny"}, "prior": {"enabled": False},
        "subject": {"id": "trained", "instance_prompt": "a photo of sks dog",
                    "class_prompt": "a photo of a dog"},
        "lora": {"rank": 4, "alpha": 8.0, "train_text_encoder": True},
        "train": {"resolution": 64, "max_steps": 2, "learning_rate": 1e-2, "checkpoint_every": 1000,
                  "num_sample_images": 0}}), local=True, quiet=True)  # trained and registered
    storage = Storage()
    for i, rank in enumerate([2, 8, 16]):
        register_random_adapter(storage, workspace, "trained", f"rank{rank}", rank=rank, seed=i,
                                alpha=rank * 1.5)
    return workspace


def _uri(workspace: str, sid: str) -> str:
    from raydb.registry import latest_version
    from raydb.storage import Storage

    return latest_version(Storage(), workspace, "default", sid)["uri"]


def _pipe(workspace: str):
    from raydb.models.components import load_pipeline
    from raydb.storage import Storage

    return load_pipeline(ModelConfig(pretrained="tiny"), Storage(), workspace, dtype=torch.float64)


@pytest.fixture(scope="module")
def engine(adapters):
    from raydb.serving.engine import DiffusionEngine
    from raydb.serving.slots import SlotPool
    from raydb.storage import Storage

    eng = DiffusionEngine(_pipe(adapters), num_slots=3, max_lora_rank=8)
    pool = SlotPool(eng, wait_s=0.2)
    loaded = {sid: pool.load(Storage(), _uri(adapters, sid), sid, "v0001")
              for sid in ("trained", "rank2", "rank8")}
    yield eng, pool, loaded
    eng.close()


def test_mixed_subject_batch_equals_one_by_one_and_diffusers_peft(engine, adapters):
    from raydb.serving.engine import EngineRequest

    eng, _, loaded = engine
    subjects = ["trained", "rank2", None, "rank8"]  # None: the base model shares the batch
    requests = [EngineRequest(_params(seed, num_images=2 if seed == 0 else 1),
                              loaded[sid].slot if sid else None) for seed, sid in enumerate(subjects)]
    rows = [slice(0, 2), slice(2, 3), slice(3, 4), slice(4, 5)]  # request -> its images' latents
    before = eng.unet_forwards
    batched = eng.denoise(requests)
    loop = eng.unet_forwards - before  # PNDM: 3 UNet calls for 2 steps
    alone = [eng.denoise([r]) for r in requests]
    assert eng.unet_forwards - before == loop + 4 * loop  # 4 subjects in one loop vs 4 loops
    for sid, row, one in zip(subjects, rows, alone, strict=True):
        assert (batched[row] - one).abs().max() < TOL, sid
    for i in (0, 1, 2, 4):
        assert (batched[i] - batched[3]).abs().max() > 1.0, f"image {i} looks like the base"
    # The same adapters through diffusers + peft (from the file, so alpha != rank is honoured).
    ref = _pipe(adapters)
    for sid, row, request in zip(subjects, rows, requests, strict=True):
        if sid:
            ref.load_lora_weights(_uri(adapters, sid), weight_name="pytorch_lora_weights.safetensors",
                                  adapter_name=sid)
            ref.set_adapters([sid])
        else:
            ref.disable_lora()
        p = request.params
        generators = [torch.Generator().manual_seed(p["seed"] + i) for i in range(p["num_images"])]
        expected = ref(p["prompt"], num_inference_steps=2, guidance_scale=7.5, width=64, height=64,
                       num_images_per_prompt=p["num_images"], output_type="latent",
                       generator=generators).images
        ref.enable_lora()
        assert (batched[row] - expected).abs().max() < TOL, sid


def test_adapter_above_max_lora_rank_is_refused_before_taking_a_slot(engine, adapters):
    from raydb.storage import Storage

    eng, pool, loaded = engine
    stats = pool.stats()
    with pytest.raises(AdapterTooLarge, match=r"rank 16 .*serve.max_lora_rank=8") as err:
        pool.load(Storage(), _uri(adapters, "rank16"), "rank16", "v0001")
    assert http_status(err.value) == 409
    assert pool.stats() == stats and all(a.loaded for a in loaded.values())


def test_full_slots_make_a_load_wait_for_an_unload(engine, adapters):
    from raydb.storage import Storage

    eng, pool, loaded = engine
    with pytest.raises(AdapterGone, match="no free adapter slot"):  # every slot taken, none freed
        pool.load(Storage(), _uri(adapters, "rank2"), "rank2", "v0002")
    freed = loaded.pop("rank8")
    timer = threading.Timer(0.05, pool.unload, [freed])
    timer.start()
    pool.wait_s = 30.0
    loaded["rank8"] = pool.load(Storage(), _uri(adapters, "rank8"), "rank8", "v0001")
    timer.join()
    assert loaded["rank8"].slot == freed.slot and pool.stats()["unloads"] == 1


def test_decode_overlaps_the_next_batch(engine):
    from raydb.serving.engine import EngineRequest

    eng, _, loaded = engine
    release = threading.Event()
    real_decode = eng.decode

    def slow_decode(latents, requests):
        release.wait(60)
        return real_decode(latents, requests)

    eng.decode = slow_decode
    try:
        first = eng.run_batch([EngineRequest(_params(1), loaded["trained"].slot)])
        second = eng.run_batch([EngineRequest(_params(2))])  # its loop ran while the first decodes
        assert not first.done() and not second.done()
    finally:
        release.set()
        del eng.decode
    results = [first.result(60), second.result(60)]
    assert [len(r[0]["images"]) for r in results] == [1, 1] and results[0][0]["width"] == 64
    assert results[0][0]["images"][0][:8] == b"\x89PNG\r\n\x1a\n"


# -- the shape batcher ----------------------------------------------------------------------------
def test_shape_batcher_groups_by_shape_and_caps_the_batch():
    from raydb.serving.batcher import ShapeBatcher

    batches: list[list[tuple[str, int]]] = []

    def run(items):
        batches.append(items)
        done: Future = Future()
        done.set_result([f"{shape}-{i}" for shape, i in items])
        return done

    async def main():
        batcher = ShapeBatcher(run, key=lambda item: item[0], max_batch_size=3, wait_s=0.2)
        items = [("64px", i) for i in range(5)] + [("128px", i) for i in range(2)]
        results = await asyncio.gather(*(batcher.submit(item) for item in items))
        return results, [size for _, size in batcher.batches]

    results, sizes = asyncio.run(asyncio.wait_for(main(), 30))  # a lost request fails, not hangs
    assert results == [f"64px-{i}" for i in range(5)] + [f"128px-{i}" for i in range(2)]
    assert all(len({shape for shape, _ in batch}) == 1 for batch in batches)  # never mixed
    assert sorted(sizes) == [2, 2, 3] and max(sizes) <= 3


def test_shape_batcher_starts_the_next_batch_before_the_last_one_is_delivered():
    from raydb.serving.batcher import ShapeBatcher

    pending: list[Future] = []

    def run(items):
        pending.append(Future())
        return pending[-1]

    async def main():
        batcher = ShapeBatcher(run, key=lambda item: 0, max_batch_size=1, wait_s=0.0)
        tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
        while len(pending) < 2:  # the second batch runs although the first is undelivered
            await asyncio.sleep(0.01)
        pending[0].set_exception(RuntimeError("decode failed"))
        pending[1].set_result(["second"])
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, second = asyncio.run(asyncio.wait_for(main(), 10))
    assert isinstance(first, RuntimeError) and second == "second"


def test_loading_an_adapter_into_a_compiled_loop_does_not_recompile(engine, adapters):
    from raydb.serving.adapters import read_adapter
    from raydb.serving.engine import EngineRequest
    from raydb.storage import Storage

    eng, _, loaded = engine

    def parsed(sid: str):
        _, state, lora_config = read_adapter(Storage(), _uri(adapters, sid), eng.identity)
        return parse_adapter(state, lora_config)

    slot = loaded["trained"].slot
    requests = [EngineRequest(_params(0), slot), EngineRequest(_params(1))]
    eager = []
    for sid in ("rank2", "trained"):
        eng.write_slot(slot, parsed(sid))
        eager.append(eng.denoise(requests))
    graphs: list[int] = []

    def counting_backend(gm, example_inputs):  # dynamo's graph, run as traced: counts (re)compiles
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    eng.compile_unet(backend=counting_backend)
    try:
        compiled = []
        for sid in ("rank2", "trained"):  # a slot write between two compiled loops
            eng.write_slot(slot, parsed(sid))
            compiled.append(eng.denoise(requests))
            if sid == "rank2":
                first = len(graphs)
    finally:
        eng.unet = eng.pipe.unet
    assert first >= 1 and len(graphs) == first  # the new adapter's weights ran without a recompile
    assert (eager[0] - eager[1]).abs().max() > 1.0  # the two adapters really differ
    for c, e in zip(compiled, eager, strict=True):
        assert (c - e).abs().max() < TOL


# -- tenants can't hurt each other (issue 18) -----------------------------------------------------
class _CountingStorage:
    """A local Storage that counts reads, to see what a cached failure saves."""

    def __init__(self) -> None:
        from raydb.storage import Storage

        self.inner, self.reads = Storage(), 0

    def read_json(self, uri):
        self.reads += 1
        return self.inner.read_json(uri)

    def read_bytes(self, uri):
        self.reads += 1
        return self.inner.read_bytes(uri)


def test_staging_refuses_bad_adapters_before_the_multiplexer_and_caches_it(engine, adapters, tmp_path):
    """What a replica does before Serve's multiplexer (which evicts first) sees a new adapter."""
    import json
    import shutil

    from raydb.serving.adapters import AdapterMismatch

    eng, pool, loaded = engine
    stats, storage = pool.stats(), _CountingStorage()
    cases = {}
    for name, edit in [("alien", lambda m: m["base_model"].update(identity="other-base")),
                       ("escape", lambda m: m.update(weights="../../etc/passwd"))]:
        bad = tmp_path / name
        shutil.copytree(_uri(adapters, "rank2"), bad)
        meta = json.loads((bad / "adapter.json").read_text())
        edit(meta)
        (bad / "adapter.json").write_text(json.dumps(meta))
        cases[name] = str(bad)
    cases["wide"] = _uri(adapters, "rank16")
    for name, uri in cases.items():
        with pytest.raises((AdapterMismatch, AdapterCorrupt, AdapterTooLarge)) as err:
            pool.stage(storage, uri, f"{name}@v0001")
        assert str(tmp_path) not in err.value.public and pool.identity not in err.value.public
    reads = storage.reads
    with pytest.raises(AdapterMismatch):  # cached: no registry read this time
        pool.stage(storage, cases["alien"], "alien@v0001")
    assert storage.reads == reads
    assert pool.stats() == stats and all(a.loaded for a in loaded.values())  # nothing moved
    assert pool.is_resident("rank2@v0001") and not pool.is_resident("alien@v0001")


def test_should_stop_ends_the_denoising_loop_when_every_request_asks(engine):
    from raydb.serving.adapters import GenerationCancelled
    from raydb.serving.engine import EngineRequest

    eng, _, _ = engine
    polls = []

    def stop_after_two():
        polls.append(1)
        return len(polls) >= 2

    start = eng.unet_forwards
    with pytest.raises(GenerationCancelled):
        eng.generate([EngineRequest(_params(0, num_inference_steps=8), None, should_stop=stop_after_two)])
    assert eng.unet_forwards - start == 2  # 2 of the 8 steps ran
    start = eng.unet_forwards
    eng.generate([EngineRequest(_params(1, num_inference_steps=3), None)])
    full = eng.unet_forwards - start  # one whole 3-step loop
    start = eng.unet_forwards  # one request still wants its images: the batch runs to the end
    out = eng.generate([EngineRequest(_params(0, num_inference_steps=3), None, should_stop=lambda: True),
                        EngineRequest(_params(1, num_inference_steps=3), None)])
    assert len(out) == 2 and eng.unet_forwards - start == full


# -- what a batch-mate may not change (issue 24) --------------------------------------------------
def test_guidance_scales_share_a_loop_and_each_image_keeps_its_own(engine):
    """Requests that differ only in guidance_scale (7.5 vs 7.5 + 1e-6 vs 3) run in one loop, and
    each image equals its request run alone. Only guidance on (> 1) vs off splits a batch.

    Deliberate break caught: the old exact-float key (``float(guidance_scale)`` in the shape): 7.5
    and 7.500001 were two shapes, so a tenant varying the scale defeated batching."""
    from raydb.serving.engine import EngineRequest

    eng, _, loaded = engine
    scales = [7.5, 7.5 + 1e-6, 3.0]
    requests = [EngineRequest(_params(seed, guidance_scale=g), loaded["rank2"].slot if seed else None)
                for seed, g in enumerate(scales)]
    assert len({eng.key(r.params) for r in requests}) == 1
    assert eng.key(_params(0, guidance_scale=1.0)) != eng.key(requests[0].params)  # unguided: no CFG
    assert eng.key(_params(0, guidance_scale=1.0)) == eng.key(_params(0, guidance_scale=0.5))
    before = eng.unet_forwards
    batched = eng.denoise(requests)
    loop = eng.unet_forwards - before
    alone = [eng.denoise([r]) for r in requests]
    assert eng.unet_forwards - before == 4 * loop  # one loop for the three, then one each
    for i, one in enumerate(alone):
        assert (batched[i:i + 1] - one).abs().max() < TOL, scales[i]
    nudged, lower = (eng.denoise([EngineRequest(_params(0, guidance_scale=g))]) for g in scales[1:])
    assert (alone[0] - nudged).abs().max() < 1e-3 < (alone[0] - lower).abs().max()  # the scale is applied


def test_different_step_counts_never_share_a_loop(engine):
    """Through the replica's wiring (ShapeBatcher keyed by the engine's shape, engine.run_batch):
    2-step and 3-step requests sent together run as two loops, each image as it is alone."""
    from raydb.serving.batcher import ShapeBatcher
    from raydb.serving.engine import EngineRequest

    eng, _, loaded = engine
    requests = [EngineRequest(_params(seed, num_inference_steps=steps), loaded["trained"].slot)
                for seed, steps in [(0, 2), (1, 3), (2, 2), (3, 3)]]
    alone = [eng.generate([r])[0]["images"][0] for r in requests]

    async def main():
        batcher = ShapeBatcher(eng.run_batch, key=lambda r: eng.key(r.params), max_batch_size=8, wait_s=0.2)
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
        return results, list(batcher.batches)

    results, batches = asyncio.run(asyncio.wait_for(main(), 120))
    assert sorted((key[2], size) for key, size in batches) == [(2, 2), (3, 2)]
    for result, expected in zip(results, alone, strict=True):
        assert abs(_png_pixels(result["images"][0]) - _png_pixels(expected)).max() <= 1


def _png_pixels(png: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_each_request_of_a_batch_gets_its_own_decoded_images(engine):
    """One batch of three requests (2 images, 1, 1; two subjects and the base): each gets its own
    images, in its own order, as when it runs alone — the decode splits the batch by request."""
    from raydb.serving.engine import EngineRequest

    eng, _, loaded = engine
    requests = [EngineRequest(_params(0, num_images=2), loaded["trained"].slot),
                EngineRequest(_params(5), None), EngineRequest(_params(9), loaded["rank8"].slot)]
    batched = eng.generate(requests)
    assert [len(r["images"]) for r in batched] == [2, 1, 1]
    assert all((r["width"], r["height"]) == (64, 64) for r in batched)
    images = [_png_pixels(png) for r in batched for png in r["images"]]
    expected = [_png_pixels(png) for r in requests for png in eng.generate([r])[0]["images"]]
    for got, want in zip(images, expected, strict=True):
        assert abs(got - want).max() <= 1
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert abs(images[i] - images[j]).mean() > 1.0, (i, j)  # none got another's image


@pytest.fixture(scope="module")
def sdxl_engine(tmp_path_factory):
    """The engine over the tiny SDXL in float64, with a plain diffusers SDXL pipeline beside it."""
    from raydb.models.components import load_pipeline
    from raydb.serving.engine import DiffusionEngine
    from raydb.storage import Storage

    workspace = str(tmp_path_factory.mktemp("sdxl-engine-ws"))
    cfg = ModelConfig(pretrained="tiny-sdxl")
    eng = DiffusionEngine(load_pipeline(cfg, Storage(), workspace, dtype=torch.float64), num_slots=1,
                          max_lora_rank=4)
    yield eng, load_pipeline(cfg, Storage(), workspace, dtype=torch.float64)
    eng.close()


def test_sdxl_serving_matches_its_pipeline_at_a_non_square_size(sdxl_engine):
    """SDXL's size conditioning at 64 wide x 48 high: the time ids are (h, w, 0, 0, h, w), as the
    diffusers pipeline makes them; no negative prompt gives zero unconditional embeddings, one
    gives its encoding. Deliberate break caught: time ids as (w, h, ...)."""
    from raydb.serving.engine import EngineRequest

    eng, ref = sdxl_engine
    for negative in (None, "blurry"):
        params = _params(4, width=64, height=48, negative_prompt=negative)
        ours = eng.denoise([EngineRequest(params)])
        expected = ref(params["prompt"], negative_prompt=negative, num_inference_steps=2, guidance_scale=7.5,
                       width=64, height=48, generator=[torch.Generator().manual_seed(4)],
                       output_type="latent").images
        assert ours.shape == (1, 4, 6, 8) and (ours - expected).abs().max() < TOL, negative
    square = eng.denoise([EngineRequest(_params(4, width=48, height=64))])
    assert square.shape == (1, 4, 8, 6)


def test_an_sdxl_batch_mates_negative_prompt_does_not_change_another_image(sdxl_engine):
    """Deliberate break caught: the per-batch rule (any negative prompt in the batch -> every image
    without one got "" encoded instead of zeros): the same seed gave another image batched."""
    from raydb.serving.engine import EngineRequest

    eng, _ = sdxl_engine
    plain = EngineRequest(_params(7))
    negative = EngineRequest(_params(8, negative_prompt="blurry"))
    alone = [eng.denoise([plain]), eng.denoise([negative])]
    batched = eng.denoise([plain, negative])
    assert (batched[0:1] - alone[0]).abs().max() < TOL
    assert (batched[1:2] - alone[1]).abs().max() < TOL
    empty = eng.denoise([EngineRequest(_params(7, negative_prompt="")), negative])  # "" is no negative prompt
    assert (empty[0:1] - alone[0]).abs().max() < TOL


# -- the compiled UNet and its workspace compile cache (serve.compile, serve.compile_cache) ---------
def _engine_like(*, identity="sd15@abc", device="cpu", dtype=torch.float16, native_size=512,
                 max_lora_rank=32, num_slots=16):
    """What ``serving_compile_cache`` reads from an engine, without building one per variation."""
    from types import SimpleNamespace

    unet = SimpleNamespace(device=torch.device(device), dtype=dtype, config=SimpleNamespace(in_channels=4))
    return SimpleNamespace(pipe=SimpleNamespace(unet=unet, vae_scale_factor=8), identity=identity,
                           denoiser=unet, denoiser_key="unet",
                           family="sd", native_size=native_size, max_lora_rank=max_lora_rank,
                           num_slots=num_slots, layers={"unet": {"down.0.to_q": None, "down.0.to_k": None}})


def test_serving_compile_cache_key_changes_with_each_part(monkeypatch, tmp_path):
    from raydb.serving.engine import compile_options, serving_compile_cache
    from raydb.storage import Storage

    gpu = ["NVIDIA H200"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu[0])

    def key(engine_kw=None, *, mode="reduce-overhead", max_batch_size=8):
        return serving_compile_cache(_engine_like(**(engine_kw or {})), Storage(), str(tmp_path), mode=mode,
                                     max_batch_size=max_batch_size).key

    base = key()
    assert base == key() and len(base) == 20
    variations = [key({"identity": "sd15@def"}), key({"device": "cuda"}), key({"dtype": torch.bfloat16}),
                  key({"native_size": 768}), key({"max_lora_rank": 64}), key({"num_slots": 12}),
                  key(mode="max-autotune"), key(mode="cudagraphs"), key(max_batch_size=4)]
    gpu[0] = "NVIDIA H100 80GB HBM3"  # another GPU of the same device type
    variations.append(key({"device": "cuda"}))
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    variations.append(key())
    assert base not in variations and len(set(variations)) == len(variations)
    assert compile_options("cudagraphs") == {"backend": "cudagraphs"}
    assert compile_options("reduce-overhead") == {"mode": "reduce-overhead"}


def test_compiled_engine_loads_its_cache_first_saves_once_and_skips_a_damaged_entry(engine, tmp_path,
                                                                                      caplog):
    """Injected save/load functions stand in for torch's (whose round trip ``test_compile_cache.py``
    checks with a real inductor compile); the backend runs dynamo's graph as traced."""
    import logging

    from raydb.compile_cache import CompileCache
    from raydb.serving.engine import EngineRequest, serving_compile_cache
    from raydb.storage import Storage

    eng, _, _ = engine
    events: list = []
    ws = str(tmp_path / "ws")
    entry = serving_compile_cache(eng, Storage(), ws, mode="reduce-overhead", max_batch_size=2)

    class Recorded(CompileCache):
        def load(self) -> bool:
            events.append("lookup")
            return super().load()

    def cache() -> Recorded:
        return Recorded(Storage(), ws, entry.key, entry.parts,
                        save_fn=lambda: events.append("save") or (b"torch-artifacts", None),
                        load_fn=lambda data: events.append(("load", data)))

    def backend(gm, example_inputs):
        events.append("compile")
        return gm.forward

    try:
        before = eng.unet_forwards
        cold = eng.compile_unet(cache=cache(), warm_up=[1, 2], backend=backend)
        assert cold["cache"] == "cold" and cold["saved"] is True and eng.compile_info is cold
        assert events[:2] == ["lookup", "compile"] and events[-1] == "save" and events.count("save") == 1
        assert eng.unet_forwards - before == 6  # two 2-step PNDM loops (3 UNet calls each)
        eng.denoise([EngineRequest(_params(0))])
        assert events.count("save") == 1  # after the warm-up, never again

        events.clear()  # the next replica of this base model: the entry is loaded before compiling
        eng.unet = eng.pipe.unet
        torch.compiler.reset()
        warm = eng.compile_unet(cache=cache(), warm_up=[1, 2], backend=backend)
        assert warm["cache"] == "warm" and warm["saved"] is False
        assert events[:3] == ["lookup", ("load", b"torch-artifacts"), "compile"] and "save" not in events

        events.clear()  # a damaged entry: never handed to torch, compiled cold, rewritten
        Storage().write_bytes(entry.bin_uri, b"torch-artifactz")
        eng.unet = eng.pipe.unet
        torch.compiler.reset()
        with caplog.at_level(logging.WARNING, logger="raydb.serving.engine"):
            damaged = eng.compile_unet(cache=cache(), warm_up=[1], backend=backend)
        assert damaged["cache"] == "damaged" and damaged["saved"] is True
        assert not [e for e in events if isinstance(e, tuple)]  # load_fn never called
        assert "ignoring the compile cache entry" in caplog.text and "SHA-256" in caplog.text
        assert cache().load() is True and events[-1] == ("load", b"torch-artifacts")  # healed
    finally:
        eng.unet = eng.pipe.unet
        torch.compiler.reset()


def test_a_replica_with_serve_compile_warms_up_and_the_next_one_starts_warm(make_cfg, monkeypatch):
    """The deployment's start-up wiring, without Ray: ``torch.compile`` and torch's artifact
    functions are recording stand-ins (the real ones are covered above and in test_compile_cache)."""
    from raydb.compile_cache import CompileCache
    from raydb.serving.deployments import DiffusionDeployment
    from raydb.storage import Storage

    compiled: list[dict] = []
    loaded: list[bytes] = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(kw) or model)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", loaded.append)
    cfg = make_cfg(serve={"compile": "reduce-overhead", "compile_cache": True, "max_batch_size": 3})
    threads = torch.get_num_threads()
    replicas = []
    try:
        for _ in range(2):
            replicas.append(DiffusionDeployment.func_or_class(cfg.model_dump(mode="json")))
    finally:
        torch.set_num_threads(threads)  # a replica sets its own thread count
        for replica in replicas:
            replica.engine.close()
    first, second = (r.stats()["compile"] for r in replicas)
    assert compiled == [{"mode": "reduce-overhead"}] * 2
    assert first["cache"] == "cold" and first["saved"] is True and replicas[0].engine.unet_forwards == 6
    assert second["cache"] == "warm" and second["saved"] is False and loaded == [b"artifacts"]
    entry = CompileCache(Storage(), cfg.workspace, first["key"], {})
    manifest = Storage().read_json(entry.meta_uri)
    assert manifest["shapes"]["warm_up_batches"] == [1, 3] and manifest["options"]["compile"] == {
        "mode": "reduce-overhead"} and manifest["model"] == replicas[0].engine.identity
