"""The batching diffusion engine: one denoising loop for many requests and many subjects (no Ray).

A replica's GPU is host-bound at batch 1 (0.85 images/s on an H200 at SD 1.5 size vs 5.37 at batch
8), and a multi-tenant service rarely gets several requests for the *same* subject at once. So the
engine runs requests of one *shape* (:func:`shape_key`: size, steps, guidance on or off, scheduler)
together, whatever their subjects: every LoRA-targeted linear layer of the UNet and text encoder is a
:class:`~raydb.serving.multi_lora.MultiLoraLinear`, and each sample is routed to its own adapter
slot (or the zero slot: the base model).

Per batch (``N`` images, ``h x w`` latents, classifier-free guidance doubling the UNet batch)::

    text:    every image's prompt and negative prompt, each under its own slot      -> [N, 77, D] x 2
             (SDXL: both encoders, plus pooled embeddings and size/crop time ids)
    noise:   each image drawn from its own generator (seed + i)                  -> [N, 4, h, w]
    loop:    UNet on [uncond | cond] = [2N, 4, h, w], slots [s | s]; CFG with each image's own
             guidance scale [N, 1, 1, 1]; scheduler.step
    decode:  VAE + PNG on a worker thread, overlapping the next batch's loop

FLUX.1 (``pipe.raydb_family == "flux"``): the transformer's linears hold the slots (T5 has none: it
is never trained); prompts are encoded once (CLIP's pooled output under each image's slot, T5
states, zero text ids); the noise is drawn and 2x2-packed as ``FluxPipeline`` draws it
(``[N, (h/16)(w/16), 64]``); the loop runs the flow-matching Euler schedule with the pipeline's
resolution-dependent shift, and a guidance-distilled transformer gets ``guidance_scale`` as an
*input* — one forward of ``N`` samples per step, no classifier-free doubling; decoding unpacks and
undoes the VAE's scaling and shift.

Each image depends only on its own request: its noise comes from its own generator, its text and
LoRA delta from its own slot, its guidance scale and (SDXL) its unconditional embeddings from its
own request, and the scheduler math is per-sample (ancestral schedulers get the per-image generator
list, as in diffusers' pipeline). Batched and one-by-one results therefore differ only by the last
bits that batched kernels may round differently. So the guidance scale is not part of the shape —
keyed by its exact float, a tenant varying it by 1e-6 made every request a batch of its own — only
whether guidance is on (> 1) is, since that doubles the UNet batch.

``unet_forwards`` counts UNet calls, which is what batching saves.

Compiled UNet (``serve.compile``): :meth:`DiffusionEngine.compile_unet` wraps the UNet in
``torch.compile`` and runs warm-up loops at the native size for the batch sizes a replica will see
(1 and ``serve.max_batch_size``), so no request pays the compile. With ``serve.compile_cache`` the
workspace compile cache (``raydb/compile_cache.py``, shared with training) is loaded before the
first compiled forward and saved once after the warm-up: the next replica of the same base model,
GPU, shapes and options starts warm. A damaged entry is skipped with a warning (the replica compiles
cold and rewrites it); it is never handed to torch.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from raydb.compile_cache import CompileCache, CompileCacheDamaged, compile_cache_key
from raydb.config import LoraConfig
from raydb.models.family import FLUX, lora_targets
from raydb.models.sdxl import add_time_ids, unet_added_conditions
from raydb.serving.adapters import GenerationCancelled
from raydb.serving.multi_lora import (
    AdapterTooLarge,
    AdapterUnsupported,
    LoraFactors,
    MultiLoraLinear,
    SlotRouter,
    max_rank,
    wrap_linears,
)
from raydb.storage import Storage

__all__ = ["EngineRequest", "DiffusionEngine", "shape_key", "compile_options", "warm_up_batches",
           "serving_compile_cache"]

logger = logging.getLogger(f"ray.serve.{__name__}")  # under Serve's logger: its handlers

# The warm-up loops' shape: the UNet graph depends on the batch (CFG doubles it) and the latent
# size, not on the step count, so two steps compile what a 25-step request runs.
WARM_UP_STEPS = 2
WARM_UP_GUIDANCE = 7.5  # the API's default: classifier-free guidance on


def compile_options(mode: str) -> dict[str, Any]:
    """``torch.compile`` keyword arguments of a ``serve.compile`` mode: ``cudagraphs`` is dynamo's
    CUDA-graph backend (the eager kernels, captured; no inductor), the others are inductor modes
    (``reduce-overhead``: inductor's kernels under CUDA graphs)."""
    return {"backend": "cudagraphs"} if mode == "cudagraphs" else {"mode": mode}


def warm_up_batches(max_batch_size: int) -> list[int]:
    """Images per warm-up loop: a lone request and a full batch (dynamo compiles the first batch
    size statically and, at the second, a graph dynamic in the batch that serves the sizes between)."""
    return sorted({1, max_batch_size})


@dataclass
class EngineRequest:
    """One generation request: ``params`` as :class:`raydb.serving.api.GenerateParams` dumps it
    (prompt, negative_prompt, num_inference_steps, guidance_scale, seed, width, height, num_images);
    ``slot``: its adapter's slot, ``None`` for the base model."""

    params: dict[str, Any]
    slot: int | None = None
    should_stop: Callable[[], bool] | None = None  # client gone / deadline passed (polled per step)


def shape_key(params: dict[str, Any], scheduler: str, native_size: int, *, doubles: bool = True) -> tuple:
    """Requests with equal keys can share a denoising loop: ``(width, height, steps, guided,
    scheduler)`` — the same latent shape and timesteps, and classifier-free guidance on for all
    (``guidance_scale > 1``: the UNet batch is doubled) or for none. The scale itself is each
    image's own. ``doubles=False`` (FLUX.1: guidance is an input of the transformer, never a
    doubled batch): ``guided`` is always False, so any guidance scales share a loop."""
    return (params.get("width") or native_size, params.get("height") or native_size,
            params["num_inference_steps"], doubles and float(params["guidance_scale"]) > 1.0, scheduler)


class DiffusionEngine:
    """A diffusers ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (``.raydb_identity``,
    ``.raydb_family``) turned into a batching engine.

    ``num_slots`` adapters can be resident, each of rank ≤ ``max_lora_rank``; ``unet_targets`` /
    ``text_encoder_targets`` name the LoRA-targeted linears (default: ``lora.target_modules`` /
    ``lora.text_encoder_target_modules``' defaults). The pipeline's modules are wrapped in place, once.
    """

    def __init__(self, pipe: Any, *, num_slots: int, max_lora_rank: int,
                 unet_targets: list[str] | None = None,
                 text_encoder_targets: list[str] | None = None) -> None:
        self.pipe = pipe
        self.identity: str = pipe.raydb_identity
        self.family: str = getattr(pipe, "raydb_family", "sd")
        flux = self.family == FLUX
        unet_targets = lora_targets(unet_targets, self.family)
        text_encoder_targets = text_encoder_targets or LoraConfig().text_encoder_target_modules
        self.max_lora_rank = max_lora_rank
        self.router = SlotRouter(num_slots)
        # the denoiser: the UNet, or FLUX.1's transformer (its adapter component is "transformer")
        self.denoiser = pipe.transformer if flux else pipe.unet
        self.denoiser_key = "transformer" if flux else "unet"
        self.layers: dict[str, dict[str, MultiLoraLinear]] = {
            self.denoiser_key: wrap_linears(self.denoiser, unet_targets, self.router, max_lora_rank),
            "text_encoder": wrap_linears(pipe.text_encoder, text_encoder_targets, self.router,
                                         max_lora_rank),
        }
        if getattr(pipe, "text_encoder_2", None) is not None and not flux:  # SDXL's second CLIP too
            self.layers["text_encoder_2"] = wrap_linears(pipe.text_encoder_2, text_encoder_targets,
                                                         self.router, max_lora_rank)
        self.native_size = (pipe.default_sample_size if flux else pipe.unet.config.sample_size) \
            * pipe.vae_scale_factor
        self.scheduler_name = type(pipe.scheduler).__name__
        self.unet = self.denoiser  # what the loop calls; compile_unet() swaps in a compiled wrapper
        self.lock = threading.Lock()  # one denoising loop at a time on the device
        self.unet_forwards = 0
        self.compile_info: dict[str, Any] = {"compiled": False, "cache": "off", "saved": False,
                                             "warm_up_s": 0.0}
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="raydb-decode")

    @property
    def num_slots(self) -> int:
        return self.router.num_slots

    def key(self, params: dict[str, Any]) -> tuple:
        return shape_key(params, self.scheduler_name, self.native_size, doubles=self.family != FLUX)

    # -- adapter slots ---------------------------------------------------------------------------
    def check_adapter(self, parsed: dict[str, dict[str, LoraFactors]]) -> None:
        """Refuse (before touching any slot) an adapter the slots cannot hold."""
        rank = max_rank(parsed)
        if rank > self.max_lora_rank:
            raise AdapterTooLarge(f"adapter rank {rank} is above this server's limit "
                                  f"serve.max_lora_rank={self.max_lora_rank}")
        for component, layers in parsed.items():
            if component not in self.layers:
                raise AdapterUnsupported(f"adapter has LoRA layers on {component}, which this "
                                         f"{self.family} server does not serve")
            missing = sorted(set(layers) - set(self.layers[component]))
            if missing:
                raise AdapterUnsupported(
                    f"adapter has LoRA layers on {component} modules this server does not serve "
                    f"({missing[0]}, ...); the server wraps lora.target_modules / "
                    "lora.text_encoder_target_modules")

    def write_slot(self, slot: int, parsed: dict[str, dict[str, LoraFactors]] | None) -> None:
        """Copy an adapter into ``slot`` (``None``: clear it).

        No lock: ``slot`` must be one no running batch routes to (``SlotPool`` hands out only free
        slots), so the copy touches rows the running loop does not read, and a load never waits
        for a batch to finish — Serve loads adapters one at a time, and a load that queued behind
        every running loop would split the next batch.
        """
        if parsed is not None:
            self.check_adapter(parsed)
        try:
            for component, layers in self.layers.items():
                given = (parsed or {}).get(component, {})
                for path, layer in layers.items():
                    layer.write_slot(slot, given.get(path))
        except Exception:
            for layers in self.layers.values():  # nothing half-written
                for layer in layers.values():
                    layer.write_slot(slot, None)
            raise

    # -- sampling --------------------------------------------------------------------------------
    def compile_unet(self, *, cache: CompileCache | None = None, warm_up: Sequence[int] = (),
                     **compile_kwargs: Any) -> dict[str, Any]:
        """Run the loop's UNet through ``torch.compile`` (e.g. ``mode="reduce-overhead"``: CUDA graphs).

        ``cache`` (:func:`serving_compile_cache`): loaded before the first compiled forward, saved
        once after the ``warm_up`` loops (one denoising loop of ``n`` base-model images at the
        native size per entry). Returns (and keeps in ``compile_info``) ``{"compiled": True, "cache":
        "off" | "cold" | "warm" | "damaged", "saved", "warm_up_s", "key"}``. Slot writes are
        in-place copies into fixed buffers, so loading adapters never recompiles.
        """
        info: dict[str, Any] = {"compiled": True, "cache": "off", "saved": False, "warm_up_s": 0.0}
        if cache is not None:
            info["key"] = cache.key
            try:
                info["cache"] = "warm" if cache.load() else "cold"
            except CompileCacheDamaged as exc:
                logger.warning("ignoring the compile cache entry (compiling cold, then rewriting it): %s",
                               exc)
                info["cache"] = "damaged"
        self.unet = torch.compile(self.denoiser, **compile_kwargs)
        start = time.perf_counter()
        for n in warm_up:
            self.denoise([EngineRequest(self.warm_up_params(n))])
        info["warm_up_s"] = round(time.perf_counter() - start, 3)
        if cache is not None and warm_up:
            try:
                info["saved"] = cache.save()
            except Exception as exc:  # noqa: BLE001 - a cache that cannot be written costs speed only
                logger.warning("could not save the compile cache entry %s: %s", cache.key, exc)
        self.compile_info = info
        return info

    def warm_up_params(self, num_images: int) -> dict[str, Any]:
        """A warm-up request: ``num_images`` base-model images at the native size, CFG on."""
        return {"prompt": "", "negative_prompt": None, "num_inference_steps": WARM_UP_STEPS,
                "guidance_scale": WARM_UP_GUIDANCE, "seed": 0, "width": self.native_size,
                "height": self.native_size, "num_images": num_images}

    @torch.no_grad()
    def denoise(self, requests: list[EngineRequest]) -> torch.Tensor:
        """The final latents ``[N, 4, h/8, w/8]`` of all requests' images, request order kept."""
        from diffusers.utils.torch_utils import randn_tensor

        keys = {self.key(r.params) for r in requests}
        if len(keys) != 1:
            raise ValueError(f"one batch needs one shape (size, steps, guidance on/off); got {sorted(keys)}")
        width, height, steps, guided, _ = keys.pop()
        if self.family == FLUX:
            return self._denoise_flux(requests, width, height, steps)
        pipe = self.pipe
        device, dtype = pipe.unet.device, pipe.unet.dtype
        cfg = guided and pipe.unet.config.time_cond_proj_dim is None
        prompts, negatives, slots, generators, scales = self._batch_inputs(requests)
        with self.lock:
            with self.router.route(torch.tensor(slots, device=device)):  # each prompt under its adapter
                cond, uncond, added = self._encode(prompts, negatives if cfg else None, cfg, height, width)
            shape = (len(slots), pipe.unet.config.in_channels, height // pipe.vae_scale_factor,
                     width // pipe.vae_scale_factor)
            scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # fresh per-loop state
            scheduler.set_timesteps(steps, device=device)
            latents = randn_tensor(shape, generator=generators, device=device, dtype=dtype)
            latents = latents * scheduler.init_noise_sigma
            embeds = torch.cat([uncond, cond]) if cfg else cond
            index = torch.tensor(slots * 2 if cfg else slots, device=device)
            # [N, 1, 1, 1], at least fp32: an fp16 loop then rounds each product once, exactly as
            # a Python float scale does (its kernels compute in fp32)
            guidance = torch.tensor(scales, dtype=torch.promote_types(dtype, torch.float32),
                                    device=device).view(-1, 1, 1, 1)
            step_kw = self._step_kwargs(scheduler, generators)
            with self.router.route(index):
                for t in scheduler.timesteps:
                    model_in = torch.cat([latents] * 2) if cfg else latents
                    model_in = scheduler.scale_model_input(model_in, t)
                    noise = self.unet(model_in, t, encoder_hidden_states=embeds, added_cond_kwargs=added,
                                      return_dict=False)[0]
                    self.unet_forwards += 1
                    if cfg:
                        noise_uncond, noise_cond = noise.chunk(2)
                        noise = noise_uncond + (guidance * (noise_cond - noise_uncond)).to(noise.dtype)
                    latents = scheduler.step(noise, t, latents, **step_kw, return_dict=False)[0]
                    if all(r.should_stop is not None and r.should_stop() for r in requests):
                        raise GenerationCancelled(f"all {len(requests)} requests of the batch stopped "
                                                  "(clients gone or deadlines passed)")
        return latents

    def _batch_inputs(self, requests: list[EngineRequest]
                      ) -> tuple[list[str], list[str], list[int], list, list[float]]:
        """Per image: prompt, negative prompt, slot, generator and guidance scale (image i of a
        request uses seed + i)."""
        prompts, negatives, slots, generators, scales = [], [], [], [], []
        for request in requests:
            p, n = request.params, request.params["num_images"]
            prompts += [p["prompt"]] * n
            negatives += [p.get("negative_prompt") or ""] * n  # None: no negative prompt (see _encode)
            slots += [self.router.zero_slot if request.slot is None else request.slot] * n
            generators += [torch.Generator().manual_seed(p["seed"] + i) for i in range(n)]
            scales += [float(p["guidance_scale"])] * n
        return prompts, negatives, slots, generators, scales

    def _denoise_flux(self, requests: list[EngineRequest], width: int, height: int,
                      steps: int) -> torch.Tensor:
        """FLUX.1's loop: packed latents ``[N, (h/16)(w/16), 64]`` out (see the module docstring)."""
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        from diffusers.utils.torch_utils import randn_tensor

        from raydb.models.flux import PACK, latent_image_ids, max_sequence_length, pack_latents

        pipe = self.pipe
        scale = pipe.vae_scale_factor * PACK
        if width % scale or height % scale:
            raise ValueError(f"FLUX.1 sizes must be multiples of {scale} (8x VAE, 2x2 packing); "
                             f"got {width}x{height}")
        transformer = pipe.transformer
        device = transformer.device
        prompts, _, slots, generators, scales = self._batch_inputs(requests)  # no negative prompt
        n = len(prompts)
        index = torch.tensor(slots, device=device)
        with self.lock:
            with self.router.route(index):  # CLIP's pooled output under each image's adapter
                embeds, pooled, text_ids = pipe.encode_prompt(
                    prompts, prompt_2=None, device=device,
                    max_sequence_length=max_sequence_length(pipe.tokenizer_2))
            h, w = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
            channels = transformer.config.in_channels // (PACK * PACK)
            latents = pack_latents(randn_tensor((n, channels, h, w), generator=generators, device=device,
                                                dtype=embeds.dtype))
            image_ids = latent_image_ids(h, w, device=device, dtype=embeds.dtype)
            scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # fresh per-loop state
            sc = scheduler.config
            mu = calculate_shift(latents.shape[1], sc.get("base_image_seq_len", 256),
                                 sc.get("max_image_seq_len", 4096), sc.get("base_shift", 0.5),
                                 sc.get("max_shift", 1.15))
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)
            scheduler.set_begin_index(0)
            # each image's own guidance scale, an input of the distilled transformer [N]
            guide = (torch.tensor(scales, device=device, dtype=torch.float32)
                     if transformer.config.guidance_embeds else None)
            step_kw = self._step_kwargs(scheduler, generators)
            with self.router.route(index):
                for t in scheduler.timesteps:
                    velocity = self.unet(
                        hidden_states=latents, timestep=t.expand(n).to(latents.dtype) / 1000, guidance=guide,
                        pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                        img_ids=image_ids, return_dict=False)[0]
                    self.unet_forwards += 1
                    latents = scheduler.step(velocity, t, latents, **step_kw, return_dict=False)[0]
                    if all(r.should_stop is not None and r.should_stop() for r in requests):
                        raise GenerationCancelled(f"all {len(requests)} requests of the batch stopped "
                                                  "(clients gone or deadlines passed)")
        return latents

    def _encode(self, prompts: list[str], negatives: list[str] | None, cfg: bool, height: int,
                width: int) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
        """``(cond, uncond, added_cond_kwargs)``: the family's prompt encoding (``negatives``: one per
        image, ``""`` for none; None without guidance). SDXL adds the pooled embeddings and each
        image's time ids (whole picture at the requested size: ``(h, w) + crop (0, 0) + (h, w)``),
        ``[uncond | cond]``-ordered like the UNet batch.

        SDXL without a negative prompt gets *zero* unconditional embeddings (the pipeline's
        ``force_zeros_for_empty_prompt``), with one its encoding — decided per image: deciding per
        batch gave a request without a negative prompt another image whenever a batch-mate had one.
        SD encodes ``""``, as its pipeline does.
        """
        pipe = self.pipe
        device = pipe.unet.device
        if self.family != "sdxl":
            cond, uncond = pipe.encode_prompt(prompts, device, 1, cfg, negatives)
            return cond, uncond, None
        given = negatives if negatives is not None and any(negatives) else None
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=given)  # None: zeros for all (with force_zeros_for_empty_prompt)
        if given is not None and pipe.config.force_zeros_for_empty_prompt:
            empty = torch.tensor([not n for n in given], device=device)
            uncond = torch.where(empty.view(-1, 1, 1), torch.zeros_like(uncond), uncond)
            uncond_pooled = torch.where(empty.view(-1, 1), torch.zeros_like(uncond_pooled), uncond_pooled)
        time_ids = add_time_ids((height, width), (0, 0), (height, width)).to(device).expand(len(prompts), 6)
        if cfg:
            pooled, time_ids = torch.cat([uncond_pooled, pooled]), torch.cat([time_ids, time_ids])
        return cond, uncond, unet_added_conditions(pooled, time_ids)

    @staticmethod
    def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
        import inspect

        accepted = inspect.signature(scheduler.step).parameters
        kw: dict[str, Any] = {"eta": 0.0} if "eta" in accepted else {}
        if "generator" in accepted:  # per-image generators: ancestral noise stays per request
            kw["generator"] = generators
        return kw

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, requests: list[EngineRequest]) -> list[dict[str, Any]]:
        """Per request ``{"images": [PNG bytes], "width", "height"}`` from :meth:`denoise`'s latents."""
        vae = self.pipe.vae
        if self.family == FLUX:  # packed [N, tokens, 64] -> [N, 16, h, w]; undo scale and shift
            from raydb.models.flux import unpack_latents

            width, height = self.key(requests[0].params)[:2]
            latents = unpack_latents(latents, height // self.pipe.vae_scale_factor,
                                     width // self.pipe.vae_scale_factor)
            latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        else:
            latents = latents / vae.config.scaling_factor
        latents = latents.to(next(vae.parameters()).dtype)  # SDXL's VAE stays fp32 under fp16
        pixels = vae.decode(latents, return_dict=False)[0]
        images = self.pipe.image_processor.postprocess(pixels, output_type="pil")
        out, start = [], 0
        for request in requests:
            n = request.params["num_images"]
            pngs = []
            for image in images[start:start + n]:
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                pngs.append(buf.getvalue())
            out.append({"images": pngs, "width": images[start].width, "height": images[start].height})
            start += n
        return out

    def run_batch(self, requests: list[EngineRequest]) -> Future:
        """Denoise now (in the caller's thread); decode + PNG on the decode thread.

        Returns a future of :meth:`decode`'s list, so the caller can start the next batch's loop
        while this one decodes.
        """
        latents = self.denoise(requests)
        return self._decoder.submit(self.decode, latents, requests)

    def generate(self, requests: list[EngineRequest]) -> list[dict[str, Any]]:
        """Denoise and decode one batch, blocking."""
        return self.run_batch(requests).result()

    def close(self) -> None:
        self._decoder.shutdown(wait=True)


def serving_compile_cache(engine: DiffusionEngine, storage: Storage, workspace: str, *, mode: str,
                          max_batch_size: int) -> CompileCache:
    """The workspace compile-cache entry of ``engine``'s compiled UNet (``raydb/compile_cache.py``).

    The key holds what the compiled code depends on: the base model's identity, torch version and
    device name (``compile_cache_key``), the warm-up shapes (latent ``[C, h, w]`` at the native
    size, batch sizes 1 and ``max_batch_size``, CFG-doubled), the UNet dtype, the slot buffers
    (``num_slots`` x ``max_lora_rank`` on the wrapped modules) and the compile mode.
    """
    unet = engine.denoiser
    device = unet.device
    latent = engine.native_size // engine.pipe.vae_scale_factor
    key, parts = compile_cache_key(
        model_identity=engine.identity,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        shapes={"latent": [unet.config.in_channels, latent, latent], "max_batch_size": max_batch_size,
                "warm_up_batches": warm_up_batches(max_batch_size), "cfg": WARM_UP_GUIDANCE > 1.0},
        options={"compile": compile_options(mode), "dtype": str(unet.dtype),
                 "family": engine.family, "max_lora_rank": engine.max_lora_rank,
                 "num_slots": engine.num_slots,
                 "unet_lora_modules": sorted(engine.layers[engine.denoiser_key])})
    return CompileCache(storage, workspace, key, parts)
