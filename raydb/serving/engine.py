"""The batching diffusion engine: one denoising loop for many requests and many subjects (no Ray).

A replica's GPU is host-bound at batch 1 (0.85 images/s on an H200 at SD 1.5 size vs 5.37 at batch
8), and a multi-tenant service rarely gets several requests for the *same* subject at once. So the
engine runs requests of one *shape* (:func:`shape_key`: size, steps, guidance, scheduler) together,
whatever their subjects: every LoRA-targeted linear layer of the UNet and text encoder is a
:class:`~raydb.serving.multi_lora.MultiLoraLinear`, and each sample is routed to its own adapter
slot (or the zero slot: the base model).

Per batch (``N`` images, ``h x w`` latents, classifier-free guidance doubling the UNet batch)::

    text:    every image's prompt and negative prompt, each under its own slot      -> [N, 77, D] x 2
             (SDXL: both encoders, plus pooled embeddings and size/crop time ids)
    noise:   each image drawn from its own generator (seed + i)                  -> [N, 4, h, w]
    loop:    UNet on [uncond | cond] = [2N, 4, h, w], slots [s | s]; CFG; scheduler.step
    decode:  VAE + PNG on a worker thread, overlapping the next batch's loop

Each image depends only on its own request: its noise comes from its own generator, its text and
LoRA delta from its own slot, and the scheduler math is per-sample (ancestral schedulers get the
per-image generator list, as in diffusers' pipeline). Batched and one-by-one results therefore
differ only by the last bits that batched kernels may round differently.

``unet_forwards`` counts UNet calls, which is what batching saves.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from raydb.config import LoraConfig
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

__all__ = ["EngineRequest", "DiffusionEngine", "shape_key"]


@dataclass
class EngineRequest:
    """One generation request: ``params`` as :class:`raydb.serving.api.GenerateParams` dumps it
    (prompt, negative_prompt, num_inference_steps, guidance_scale, seed, width, height, num_images);
    ``slot``: its adapter's slot, ``None`` for the base model."""

    params: dict[str, Any]
    slot: int | None = None
    should_stop: Callable[[], bool] | None = None  # client gone / deadline passed (polled per step)


def shape_key(params: dict[str, Any], scheduler: str, native_size: int) -> tuple:
    """Requests with equal keys can share a denoising loop (same latent shape and timesteps)."""
    return (params.get("width") or native_size, params.get("height") or native_size,
            params["num_inference_steps"], float(params["guidance_scale"]), scheduler)


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
        defaults = LoraConfig()
        unet_targets = unet_targets or defaults.target_modules
        text_encoder_targets = text_encoder_targets or defaults.text_encoder_target_modules
        self.pipe = pipe
        self.identity: str = pipe.raydb_identity
        self.family: str = getattr(pipe, "raydb_family", "sd")
        self.max_lora_rank = max_lora_rank
        self.router = SlotRouter(num_slots)
        self.layers: dict[str, dict[str, MultiLoraLinear]] = {
            "unet": wrap_linears(pipe.unet, unet_targets, self.router, max_lora_rank),
            "text_encoder": wrap_linears(pipe.text_encoder, text_encoder_targets, self.router,
                                         max_lora_rank),
        }
        if getattr(pipe, "text_encoder_2", None) is not None:  # SDXL's second encoder has slots too
            self.layers["text_encoder_2"] = wrap_linears(pipe.text_encoder_2, text_encoder_targets,
                                                         self.router, max_lora_rank)
        self.native_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self.scheduler_name = type(pipe.scheduler).__name__
        self.unet = pipe.unet  # what the loop calls; compile_unet() swaps in a compiled wrapper
        self.lock = threading.Lock()  # one denoising loop at a time on the device
        self.unet_forwards = 0
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="raydb-decode")

    @property
    def num_slots(self) -> int:
        return self.router.num_slots

    def key(self, params: dict[str, Any]) -> tuple:
        return shape_key(params, self.scheduler_name, self.native_size)

    # -- adapter slots ---------------------------------------------------------------------------
    def check_adapter(self, parsed: dict[str, dict[str, LoraFactors]]) -> None:
        """Refuse (before touching any slot) an adapter the slots cannot hold."""
        rank = max_rank(parsed)
        if rank > self.max_lora_rank:
            raise AdapterTooLarge(f"adapter rank {rank} is above this server's limit "
                                  f"serve.max_lora_rank={self.max_lora_rank}")
        for component, layers in parsed.items():
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
    def compile_unet(self, **compile_kwargs: Any) -> None:
        """Run the loop's UNet through ``torch.compile`` (e.g. ``mode="reduce-overhead"``: CUDA graphs).

        Slot writes are in-place copies into fixed buffers, so loading adapters never recompiles.
        """
        self.unet = torch.compile(self.pipe.unet, **compile_kwargs)

    @torch.no_grad()
    def denoise(self, requests: list[EngineRequest]) -> torch.Tensor:
        """The final latents ``[N, 4, h/8, w/8]`` of all requests' images, request order kept."""
        from diffusers.utils.torch_utils import randn_tensor

        keys = {self.key(r.params) for r in requests}
        if len(keys) != 1:
            raise ValueError(f"one batch needs one shape (size, steps, guidance); got {sorted(keys)}")
        width, height, steps, guidance, _ = keys.pop()
        pipe = self.pipe
        device, dtype = pipe.unet.device, pipe.unet.dtype
        cfg = guidance > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        prompts, negatives, slots, generators = [], [], [], []
        for request in requests:  # one entry per image: image i of a request uses seed + i
            p, n = request.params, request.params["num_images"]
            prompts += [p["prompt"]] * n
            negatives += [p.get("negative_prompt") or ""] * n  # None encodes as "" in diffusers too
            slots += [self.router.zero_slot if request.slot is None else request.slot] * n
            generators += [torch.Generator().manual_seed(p["seed"] + i) for i in range(n)]
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
                        noise = noise_uncond + guidance * (noise_cond - noise_uncond)
                    latents = scheduler.step(noise, t, latents, **step_kw, return_dict=False)[0]
                    if all(r.should_stop is not None and r.should_stop() for r in requests):
                        raise GenerationCancelled(f"all {len(requests)} requests of the batch stopped "
                                                  "(clients gone or deadlines passed)")
        return latents

    def _encode(self, prompts: list[str], negatives: list[str] | None, cfg: bool, height: int,
                width: int) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None]:
        """``(cond, uncond, added_cond_kwargs)``: the family's prompt encoding. SDXL adds the pooled
        embeddings and each image's time ids (whole picture at the requested size: crop (0, 0)),
        ``[uncond | cond]``-ordered like the UNet batch."""
        pipe = self.pipe
        device = pipe.unet.device
        if self.family != "sdxl":
            cond, uncond = pipe.encode_prompt(prompts, device, 1, cfg, negatives)
            return cond, uncond, None
        if negatives is not None and not any(negatives):
            negatives = None  # as the SDXL pipeline does: no negative prompt -> zero embeddings
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
            negative_prompt=negatives)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.dtype,
                                device=device).expand(len(prompts), 6)
        if cfg:
            pooled, time_ids = torch.cat([uncond_pooled, pooled]), torch.cat([time_ids, time_ids])
        return cond, uncond, {"text_embeds": pooled, "time_ids": time_ids}

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
        latents = latents.to(next(vae.parameters()).dtype)  # SDXL's VAE stays fp32 under fp16
        pixels = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
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
