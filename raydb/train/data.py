"""Deterministic, resumable micro-batches laid out ``[instance | class]``.

Every sample of the run has a *global position* ``p`` (counting micro-batches over all workers), and
everything random about it — which image, the latent-sampling noise, the diffusion noise and the
timestep — is drawn from a generator seeded by ``(train.seed, stream, p)``. Consequences:

* a run resumed from a checkpoint at step s sees exactly the batches an uninterrupted run would;
* two DDP workers with batch b see the same samples as one worker with batch 2b (rank r of W takes
  positions ``((step * accum + micro) * W + r) * b + j``), which is how tests show DDP is correct;
* images are visited epoch by epoch, in a fresh seeded permutation each epoch.

The class half comes from one of two sources (``prior.mode``): class images (image mode, or model
mode with a pool in ``prior.class_data``), drawn from their own ``class`` stream; or, in model mode
without a pool, the instance half itself — the same image, latent sample, noise and timestep per
row, under the class prompt (``prior_from_instance``). Sharing the draws is what makes the prior
term ask "does the adapter still predict what the base predicts *for this very input* when the
prompt names only the class?": the adapter is held to the base exactly where the instance term
pulls it, no other draws enter the step (so the instance half is the same in every mode and DDP,
accumulation and resume keep their positions), and the two halves differ only in the prompt.

What a sample's time is depends on the objective: a DDPM timestep (an integer in
``[0, num_train_timesteps)``, SD/SDXL) or, for flow matching (FLUX.1, ``TrainingData.flow``), a
sigma in ``(0, 1]`` drawn from ``train.flow``'s density (``raydb.train.flow.draw_sigma``) — with the
same generator, after the same two noise draws. Guidance-distilled models also get each sample's
guidance input (``TrainingData.guidance``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from raydb.config import FlowConfig, TrainConfig
from raydb.encode.encoders import EncodedImages
from raydb.models.family import check_resolution
from raydb.train.flow import draw_sigma

__all__ = ["TrainingData", "MicroBatch", "training_data", "prompt_inputs", "flow_inputs",
           "make_micro_batch", "step_micro_batches"]


@dataclass
class TrainingData:
    """What the loop samples from. Either cached latents or raw pixels (the uncached reference).

    instance/class_: EncodedImages (cached) or ``[N, 3, H, W]`` pixel tensors (uncached).
    instance_embeds/class_embeds: ``[1, L, D]`` prompt embeddings (None when the text encoder trains).
    instance_ids/class_ids: ``[1, L]`` token ids.

    SDXL only (None for SD 1.x/2.x): instance_pooled/class_pooled ``[1, D2p]`` pooled prompt
    embeddings (None when the text encoders train); instance_time_ids/class_time_ids ``[N, 6]``
    per image, its size/crop conditioning (row i belongs to image i); instance_ids_2/class_ids_2
    ``[1, L]`` the second tokenizer's ids.

    FLUX.1 (flow matching): embeds are the T5 states ``[1, L, D]`` (kept when CLIP's LoRA trains:
    T5 never trains), pooled the CLIP pooled output ``[1, Dp]``, ids / ids_2 the CLIP / T5 ids,
    instance_text_ids/class_text_ids ``[1, L, 3]``; ``flow`` says how sigmas are drawn and
    ``guidance`` is the guidance input of guidance-distilled models (None otherwise).
    """

    instance: EncodedImages | torch.Tensor
    class_: EncodedImages | torch.Tensor | None
    instance_embeds: torch.Tensor | None
    class_embeds: torch.Tensor | None
    instance_ids: torch.Tensor
    class_ids: torch.Tensor | None
    latent_shape: tuple[int, int, int]  # (C, h, w)
    instance_pooled: torch.Tensor | None = None
    class_pooled: torch.Tensor | None = None
    instance_time_ids: torch.Tensor | None = None
    class_time_ids: torch.Tensor | None = None
    instance_ids_2: torch.Tensor | None = None
    class_ids_2: torch.Tensor | None = None
    instance_text_ids: torch.Tensor | None = None
    class_text_ids: torch.Tensor | None = None
    flow: FlowConfig | None = None
    guidance: float | None = None
    prior_from_instance: bool = False  # model mode without a pool: the class half repeats the instance half

    def __post_init__(self) -> None:
        if self.prior_from_instance and self.class_ is not None:
            raise ValueError("the class half comes from class images or from the instance half, not both")

    @property
    def with_prior(self) -> bool:
        return self.class_ is not None or self.prior_from_instance


def training_data(
    instance: EncodedImages | torch.Tensor, class_: EncodedImages | torch.Tensor | None,
    prompt_embeds: torch.Tensor | None, prompt_ids: torch.Tensor, *,
    latent_shape: tuple[int, int, int] | None = None,
    prompt_pooled: torch.Tensor | None = None, prompt_ids_2: torch.Tensor | None = None,
    time_ids: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    prompt_text_ids: torch.Tensor | None = None, flow: FlowConfig | None = None,
    guidance: float | None = None, prior_from_instance: bool = False,
) -> TrainingData:
    """TrainingData from the encoded (or pixel) images and the two prompts.

    ``prior_from_instance`` (model mode without a pool, ``class_`` None): the class half of every
    micro-batch repeats the instance half's draws under the class prompt.

    ``prompt_embeds`` ``[2, L, D]`` / ``prompt_ids`` ``[2, L]`` hold (instance prompt, class prompt);
    pass ``prompt_embeds=None`` when the text encoder trains (the step encodes the ids itself).
    ``latent_shape`` ``(C, h, w)`` is read off cached latents; pixel sources must give it. SDXL:
    ``prompt_pooled`` ``[2, D2p]``, ``prompt_ids_2`` ``[2, L]``, and per-image time ids
    ``(instance [N, 6], class [M, 6])`` — taken from the EncodedImages when not given. FLUX.1:
    ``prompt_text_ids`` ``[2, L, 3]``, ``flow`` (sigma sampling) and ``guidance``.
    """
    if latent_shape is None:
        if not isinstance(instance, EncodedImages):
            raise ValueError("latent_shape is required for pixel (uncached) training data")
        latent_shape = tuple(instance.mean.shape[1:])
    with_prior = class_ is not None or prior_from_instance
    if time_ids is None:
        time_ids = tuple(getattr(src, "time_ids", None) for src in (instance, class_))

    def halves(t: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if t is None:
            return None, None
        return t[0:1], t[1:2] if with_prior else None

    (i_embeds, c_embeds), (i_ids, c_ids) = halves(prompt_embeds), halves(prompt_ids)
    (i_pooled, c_pooled), (i_ids_2, c_ids_2) = halves(prompt_pooled), halves(prompt_ids_2)
    i_text_ids, c_text_ids = halves(prompt_text_ids)
    if c_text_ids is not None and not torch.equal(i_text_ids, c_text_ids):
        # the transformer's rotary embedding takes one set of text positions per batch
        raise ValueError("the instance and class prompts have different text ids (T5 lengths); "
                         "both must be padded to the same max_sequence_length")
    return TrainingData(
        instance=instance, class_=class_, instance_embeds=i_embeds, class_embeds=c_embeds,
        instance_ids=i_ids, class_ids=c_ids, latent_shape=latent_shape,
        instance_pooled=i_pooled, class_pooled=c_pooled, instance_ids_2=i_ids_2, class_ids_2=c_ids_2,
        instance_time_ids=time_ids[0], class_time_ids=time_ids[1] if class_ is not None else None,
        instance_text_ids=i_text_ids, class_text_ids=c_text_ids, flow=flow, guidance=guidance,
        prior_from_instance=prior_from_instance,
    )


def prompt_inputs(
    prompts: dict[str, torch.Tensor], train_text_encoder: bool,
) -> dict[str, torch.Tensor | None]:
    """:func:`training_data`'s prompt arguments from the encode cache's ``prompts.safetensors``
    (``embeds``/``ids``, SDXL's and FLUX.1's ``pooled``/``ids_2``, FLUX.1's ``text_ids``):
    what the trained text encoders compute is dropped, so the step encodes the ids itself — all
    of it for SD/SDXL, only CLIP's pooled output for FLUX.1 (its T5 states stay: T5 never trains)."""
    flux = "text_ids" in prompts
    return {"prompt_embeds": None if train_text_encoder and not flux else prompts["embeds"],
            "prompt_ids": prompts["ids"],
            "prompt_pooled": None if train_text_encoder else prompts.get("pooled"),
            "prompt_ids_2": prompts.get("ids_2"), "prompt_text_ids": prompts.get("text_ids")}


def flow_inputs(tc: TrainConfig, comps) -> dict:
    """:func:`training_data`'s objective arguments for ``comps`` (``raydb.models.components``): for
    FLUX.1 the sigma sampling (``train.flow``) and — guidance-distilled transformers only — the
    guidance input; nothing for the DDPM families."""
    if comps.family != "flux":
        return {}
    check_resolution(tc.resolution, comps.family)
    distilled = comps.transformer.config.guidance_embeds
    return {"flow": tc.flow, "guidance": tc.flow.guidance if distilled else None}


@dataclass
class MicroBatch:
    """One micro-batch, ``[instance | class]`` along dim 0 (size 2B with prior, else B).

    Either ``latent_mean``/``latent_std`` ``[N, C, h, w]`` (cached) or ``pixels`` ``[N, 3, H, W]``;
    ``latent_eps``/``noise`` ``[N, C, h, w]``; ``timesteps`` ``[N]``; ``encoder_hidden_states``
    ``[N, L, D]`` or ``input_ids`` ``[N, L]`` when the text encoder trains. SDXL adds
    ``time_ids`` ``[N, 6]`` and ``pooled`` ``[N, D2p]`` (or ``input_ids_2`` ``[N, L]`` when the
    text encoders train); they stay None for SD 1.x/2.x.

    FLUX.1 (flow matching): ``sigmas`` ``[N]`` fp32 replace ``timesteps`` (None);
    ``encoder_hidden_states`` are the T5 states, ``pooled`` CLIP's (None when CLIP's LoRA trains:
    the step encodes ``input_ids``), ``text_ids`` ``[N, L, 3]`` and, for guidance-distilled
    models, ``guidance`` ``[N]``. Every per-sample tensor is laid out ``[instance | class]`` like
    the latents, so chunking a batch in two hands each half only its own samples' values.
    """

    latent_mean: torch.Tensor | None
    latent_std: torch.Tensor | None
    pixels: torch.Tensor | None
    latent_eps: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor | None
    encoder_hidden_states: torch.Tensor | None
    input_ids: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    input_ids_2: torch.Tensor | None = None
    sigmas: torch.Tensor | None = None
    guidance: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> MicroBatch:
        return MicroBatch(**{k: (v.to(device, non_blocking=non_blocking)
                                 if isinstance(v, torch.Tensor) else v)
                             for k, v in self.__dict__.items()})

    def rows(self, rows: slice) -> MicroBatch:
        """The samples ``rows`` of this batch (every per-sample tensor sliced along dim 0; views)."""
        return MicroBatch(**{k: (v[rows] if isinstance(v, torch.Tensor) else v)
                             for k, v in self.__dict__.items()})

    def pin_memory(self) -> MicroBatch:
        """A copy in page-locked host memory, so a ``non_blocking`` copy to a GPU is truly async."""
        return MicroBatch(**{k: (v.contiguous().pin_memory() if isinstance(v, torch.Tensor) else v)
                             for k, v in self.__dict__.items()})

    @property
    def size(self) -> int:
        return self.noise.shape[0]


def _seed(*parts: int | str) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _image_index(seed: int, stream: str, position: int, count: int) -> int:
    epoch, offset = divmod(position, count)
    g = torch.Generator().manual_seed(_seed(seed, stream, "epoch", epoch))
    return int(torch.randperm(count, generator=g)[offset])


def _expand(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """One prompt's ``[1, ...]`` tensor repeated for ``n`` samples (a view)."""
    return None if t is None else t.expand(n, *t.shape[1:])


def _half(source, prompt, positions, *, seed, stream, latent_shape, num_train_timesteps, flow, guidance):
    """One half (instance or class) of a micro-batch; ``prompt`` holds the half's prompt tensors
    (embeds, ids, pooled, ids_2, text_ids) and per-image ``time_ids``."""
    count = len(source) if isinstance(source, EncodedImages) else source.shape[0]
    idx = [_image_index(seed, stream, p, count) for p in positions]
    eps, noise, steps = [], [], []
    for p in positions:
        g = torch.Generator().manual_seed(_seed(seed, stream, "sample", p))
        eps.append(torch.randn(latent_shape, generator=g))
        noise.append(torch.randn(latent_shape, generator=g))
        steps.append(draw_sigma(flow, g, num_train_timesteps) if flow is not None
                     else int(torch.randint(0, num_train_timesteps, (1,), generator=g)))
    n = len(positions)
    out = {
        "latent_eps": torch.stack(eps),
        "noise": torch.stack(noise),
        "timesteps": None if flow is not None else torch.tensor(steps, dtype=torch.long),
        "sigmas": torch.tensor(steps, dtype=torch.float32) if flow is not None else None,
        "guidance": None if guidance is None else torch.full((n,), float(guidance)),
        "input_ids": _expand(prompt["ids"], n),
        "encoder_hidden_states": _expand(prompt["embeds"], n),
        "pooled": _expand(prompt["pooled"], n),
        "input_ids_2": _expand(prompt["ids_2"], n),
        "text_ids": _expand(prompt["text_ids"], n),
        "time_ids": None if prompt["time_ids"] is None else prompt["time_ids"][idx],
    }
    if isinstance(source, EncodedImages):
        out.update(latent_mean=source.mean[idx], latent_std=source.std[idx], pixels=None)
    else:
        out.update(latent_mean=None, latent_std=None, pixels=source[idx])
    return out


def _prompt(data: TrainingData, half: str) -> dict[str, torch.Tensor | None]:
    return {name: getattr(data, f"{half}_{name}")
            for name in ("embeds", "ids", "pooled", "ids_2", "time_ids", "text_ids")}


def _under_prompt(half: dict[str, torch.Tensor | None], prompt: dict[str, torch.Tensor | None],
                  n: int) -> dict[str, torch.Tensor | None]:
    """``half`` (the instance half's rows) under another prompt: same images, latent samples,
    noise, timesteps (FLUX.1: sigmas and guidance) and per-image time ids; only the prompt tensors
    change."""
    return half | {"input_ids": _expand(prompt["ids"], n),
                   "encoder_hidden_states": _expand(prompt["embeds"], n),
                   "pooled": _expand(prompt["pooled"], n), "input_ids_2": _expand(prompt["ids_2"], n),
                   "text_ids": _expand(prompt["text_ids"], n)}


def make_micro_batch(
    data: TrainingData,
    *,
    step: int,
    micro: int,
    batch_size: int,
    accumulation: int,
    seed: int,
    num_train_timesteps: int,
    rank: int = 0,
    world_size: int = 1,
) -> MicroBatch:
    """The micro-batch ``micro`` of optimizer step ``step`` (0-based) for worker ``rank``."""
    first = ((step * accumulation + micro) * world_size + rank) * batch_size
    positions = range(first, first + batch_size)
    kw = {"seed": seed, "latent_shape": data.latent_shape, "num_train_timesteps": num_train_timesteps,
          "flow": data.flow, "guidance": data.guidance}
    parts = [_half(data.instance, _prompt(data, "instance"), positions, stream="instance", **kw)]
    if data.class_ is not None:
        parts.append(_half(data.class_, _prompt(data, "class"), positions, stream="class", **kw))
    elif data.prior_from_instance:
        parts.append(_under_prompt(parts[0], _prompt(data, "class"), batch_size))
    merged = {}
    for key in parts[0]:
        vals = [part[key] for part in parts]
        merged[key] = None if vals[0] is None else torch.cat(vals)
    return MicroBatch(**merged)


def step_micro_batches(
    data: TrainingData,
    tc: TrainConfig,
    *,
    step: int,
    num_train_timesteps: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> list[MicroBatch]:
    """The ``train.gradient_accumulation_steps`` micro-batches of optimizer step ``step`` for
    worker ``rank``, on ``device`` — what ``optimizer_step`` consumes."""
    return [make_micro_batch(data, step=step, micro=m, batch_size=tc.batch_size,
                             accumulation=tc.gradient_accumulation_steps, seed=tc.seed,
                             num_train_timesteps=num_train_timesteps, rank=rank,
                             world_size=world_size).to(device)
            for m in range(tc.gradient_accumulation_steps)]
