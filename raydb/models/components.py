"""Resolve ``model.pretrained`` to a diffusers folder and load its components.

``tiny`` (and ``tiny-sdxl``, ``tiny-flux``) is materialised once (``save_pretrained``), ``digits``
copied once from the package's shipped weights, and then loaded through the same ``from_pretrained``
path as a real checkpoint; ``s3://`` prefixes are downloaded once into a local cache keyed by the
objects' ETags; local folders are used in place; anything else is a hub id. Every model gets an
*identity* string that keys caches (prior images, encodings) and is recorded in adapters, so a
server can refuse an adapter trained on another base. The model *family* (SD 1.x/2.x, SDXL or
FLUX.1, :mod:`raydb.models.family`) is read from the folder and travels with the components: it
decides the denoiser (a UNet, or FLUX.1's transformer), the text encoders (CLIP; SDXL's second CLIP;
FLUX.1's CLIP + T5) and the training objective (DDPM noise, or flow matching).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raydb.config import ModelConfig
from raydb.models.digits import copy_digits_model, digits_identity
from raydb.models.family import (
    FLOW_MATCHING,
    FLUX,
    SD,
    SDXL,
    detect_family,
    family_of_unet_config,
    family_spec,
    vae_encode_dtype,
)
from raydb.models.tiny import save_tiny_model, tiny_identity
from raydb.models.tiny_flux import save_tiny_flux_model, tiny_flux_identity
from raydb.models.tiny_sdxl import save_tiny_sdxl_model, tiny_sdxl_identity
from raydb.storage import Storage, is_s3

__all__ = ["Components", "resolve_model", "model_family", "load_components", "load_pipeline",
           "model_identity", "hub_revision", "sampling_dtype", "pipeline_call_kwargs", "BUILTIN_MODELS",
           "configured_family"]

# model.pretrained values that ship with raydb: (writer of the folder, identity)
BUILTIN_MODELS = {"tiny": (save_tiny_model, tiny_identity),
                  "tiny-sdxl": (save_tiny_sdxl_model, tiny_sdxl_identity),
                  "tiny-flux": (save_tiny_flux_model, tiny_flux_identity),
                  "digits": (copy_digits_model, digits_identity)}
# what each one's folder says (tests/models/test_flux.py checks them against the folders)
_BUILTIN_FAMILIES = {"tiny": SD, "tiny-sdxl": SDXL, "tiny-flux": FLUX, "digits": SD}

_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Components:
    """The pieces of a checkpoint the trainer needs (frozen unless LoRA is added)."""

    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module | None  # None for FLUX.1, and when loaded with ``with_unet=False``
    noise_scheduler: Any  # DDPMScheduler (add_noise / get_velocity); FLUX.1: its flow-matching one
    identity: str
    path: str
    prediction_type: str  # "epsilon" / "v_prediction"; FLUX.1: "flow_matching"
    family: str = "sd"  # raydb.models.family: "sd", "sdxl" or "flux"
    tokenizer_2: Any = None  # SDXL's second CLIP tokenizer and encoder; FLUX.1's T5 ones
    text_encoder_2: torch.nn.Module | None = None
    transformer: torch.nn.Module | None = None  # FLUX.1's denoiser (None when with_unet=False)

    @property
    def denoiser(self) -> torch.nn.Module | None:
        """What the step trains LoRA on: the UNet, or FLUX.1's transformer."""
        return self.transformer if self.family == FLUX else self.unet

    @property
    def tokenizers(self) -> tuple:
        return tuple(t for t in (self.tokenizer, self.tokenizer_2) if t is not None)

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        return tuple(e for e in (self.text_encoder, self.text_encoder_2) if e is not None)

    @property
    def lora_text_encoders(self) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
        """``(text_encoder, text_encoder_2)`` as ``lora.train_text_encoder`` adapts them: both of
        SDXL's CLIPs; FLUX.1's CLIP only (its T5 is never trained, ``None``)."""
        return (self.text_encoder, None if self.family == FLUX else self.text_encoder_2)


def _default_cache() -> Path:
    return Path(os.environ.get("RAYDB_CACHE", Path.home() / ".cache" / "raydb"))


def _hash_local_dir(path: Path) -> str:
    """Content key of a local diffusers folder: every file's name and full bytes (streamed).

    Hashing only a prefix of each weight file (as before) let two checkpoints that differ past
    their first MiB share an identity, so an adapter trained on one was accepted by the other.
    """
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    # Every stage resolves the model; re-hash only when a file's size or mtime changed.
    signature = (str(path.absolute()), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if signature in _HASH_MEMO:
        return _HASH_MEMO[signature]
    h = hashlib.sha256()
    for file in files:
        h.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):  # noqa: B023 - fh is this iteration's
                h.update(block)
    _HASH_MEMO[signature] = h.hexdigest()[:16]
    return _HASH_MEMO[signature]


_HASH_MEMO: dict[tuple, str] = {}


def model_identity(path: str) -> str:
    """Stable identity of a resolved model folder (or hub id)."""
    p = Path(path)
    marker = p / "raydb_identity.json"
    if marker.is_file():
        return json.loads(marker.read_text())["identity"]
    if p.is_dir():
        return f"local-{_hash_local_dir(p)}"
    return f"hub:{path}"


def resolve_model(cfg: ModelConfig, storage: Storage, workspace: str) -> tuple[str, str]:
    """``(local folder or hub id, identity)`` for ``cfg.pretrained``; materialises tiny / s3 once."""
    spec = cfg.pretrained
    if spec in BUILTIN_MODELS:
        save, identity = BUILTIN_MODELS[spec]
        root = Path(workspace) if not is_s3(workspace) else Path(cfg.cache_dir or _default_cache())
        target = root / "models" / identity()
        if not (target / "raydb_identity.json").is_file():
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            save(tmp)
            try:
                os.replace(tmp, target)
            except OSError:  # another process won the race; theirs is identical
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return str(target), identity()
    if is_s3(spec):
        listing = storage.content_ids(spec)  # (name, ETag): changes whenever an object's bytes do
        if not listing:
            raise FileNotFoundError(f"model.pretrained: nothing found under {spec}")
        key = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
        target = Path(cfg.cache_dir or _default_cache()) / "models" / f"s3-{key}"
        if not (target / ".complete").is_file():
            storage.download_dir(spec, target)
            (target / ".complete").write_text(spec + "\n")
        marker = target / "raydb_identity.json"  # a copied raydb model keeps its identity
        return str(target), model_identity(str(target)) if marker.is_file() else f"s3-{key}"
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
            raise FileNotFoundError(
                f"model.pretrained: {path} is not a diffusers folder (no model_index.json or unet/)"
            )
        return str(path.resolve()), model_identity(str(path))
    if spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model.pretrained: folder {spec} does not exist")
    return spec, f"hub:{spec}@{hub_revision(spec, cfg.revision)}"


# what detect_family reads: a folder's index and its denoiser's config, a few kB
_FAMILY_FILES = ("model_index.json", "unet/config.json", "transformer/config.json")


def configured_family(cfg: ModelConfig, storage: Storage) -> str | None:
    """The family of ``cfg.pretrained`` without materialising or downloading the model: a built-in
    model's, a local folder's, or an ``s3://`` folder's from its few config files. None for a hub
    id (its configs need the network; the training job reads them when it loads the model).

    For checks that should answer before any work is queued (a training submission whose
    ``train.resolution`` the family cannot train at).
    """
    import tempfile

    spec = cfg.pretrained
    if spec in _BUILTIN_FAMILIES:
        return _BUILTIN_FAMILIES[spec]
    if is_s3(spec):
        with tempfile.TemporaryDirectory(prefix="raydb-family-") as tmp:
            for name in _FAMILY_FILES:
                uri = f"{spec.rstrip('/')}/{name}"
                if storage.exists(uri):
                    (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                    (Path(tmp) / name).write_bytes(storage.read_bytes(uri))
            return detect_family(tmp)
    path = Path(spec).expanduser()
    return detect_family(path) if path.is_dir() else None


def hub_revision(repo_id: str, revision: str | None) -> str:
    """The commit SHA a hub ref (branch, tag, or None = ``main``) points to now, when online.

    Branches move, so ``main`` names different weights over time; the identity (and the load, see
    :func:`_revision_kw`) pins the commit. Offline (``HF_HUB_OFFLINE=1``) or unreachable, the given
    ref is recorded as such: ``"main (unresolved)"``.
    """
    ref = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", ref):
        return ref
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return f"{ref} (unresolved)"
    try:
        from huggingface_hub import HfApi

        sha = HfApi().model_info(repo_id, revision=ref).sha
    except Exception:  # offline, private without a token, rate-limited: keep the ref, say so
        return f"{ref} (unresolved)"
    return sha or f"{ref} (unresolved)"


# Weights are read from safetensors only: a checkpoint's pickled .bin files could run code when
# loaded, so a base model without safetensors weights is refused, never unpickled.
SAFE_WEIGHTS = {"use_safetensors": True}


@contextmanager
def _safetensors_only(cfg: ModelConfig) -> Iterator[None]:
    """The loaders' "no safetensors file" error as one that names ``model.pretrained`` and why."""
    try:
        yield
    except OSError as exc:
        if ".safetensors" not in str(exc):
            raise
        raise ValueError(f"model.pretrained: {cfg.pretrained} has no safetensors weights ({exc}). raydb "
                         "loads model weights only from safetensors files: pickled .bin checkpoints can "
                         "run code when loaded. Convert the checkpoint (save_pretrained writes "
                         "safetensors) or use one that ships them.") from None


def _revision_kw(cfg: ModelConfig, identity: str) -> dict[str, Any]:
    """``from_pretrained`` kwargs that load exactly the revision the identity names."""
    if identity.startswith("hub:"):
        pinned = identity.rpartition("@")[2]
        if re.fullmatch(r"[0-9a-f]{40}", pinned):
            return {"revision": pinned}
    return {"revision": cfg.revision} if cfg.revision else {}


def model_family(path: str, **kw: Any) -> str:
    """The family of a resolved model: read from the folder, or from a hub id's model index and
    denoiser config."""
    if Path(path).is_dir():
        return detect_family(path)
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    if DiffusionPipeline.load_config(path, **kw).get("_class_name") == "FluxPipeline":
        return FLUX
    return family_of_unet_config(dict(UNet2DConditionModel.load_config(path, subfolder="unet", **kw)))


def sampling_dtype(family: str, device: torch.device | str) -> torch.dtype:
    """The dtype a pipeline samples in on ``device``: fp32 on CPU; on CUDA the family's half
    precision (fp16 for SD/SDXL, bf16 for FLUX.1, which was released and is run in bf16)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return getattr(torch, family_spec(family).cuda_dtype)


def _complete(model_class: Any, path: str, subfolder: str, cfg: ModelConfig, **kw: Any) -> Any:
    """A transformers model whose every weight came from the checkpoint. transformers fills weights
    it cannot match with random values and only logs it — e.g. a text encoder saved by a newer
    release, whose key names an older one does not read, loads as a random encoder that trains and
    samples without an error (found by ``make test-lowest``: transformers 5.0-5.5 on ``digits``)."""
    model, info = model_class.from_pretrained(path, subfolder=subfolder, output_loading_info=True, **kw)
    missing = info.get("missing_keys") or []
    if missing:
        raise ValueError(f"model.pretrained: {cfg.pretrained}/{subfolder} lacks {len(missing)} of the "
                         f"weights {model_class.__name__} needs (e.g. {sorted(missing)[0]!r}); saved by "
                         "another transformers release or damaged")
    return model


def load_components(
    cfg: ModelConfig,
    storage: Storage,
    workspace: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    with_unet: bool = True,
    with_t5: bool = True,
) -> Components:
    """Load tokenizer(s), text encoder(s), VAE, denoiser and the training scheduler, all frozen.

    ``with_unet=False`` skips the denoiser (about 80 % of an SD checkpoint): the encode stage needs
    only the VAE and the text encoder(s). SDXL also gets ``tokenizer_2`` / ``text_encoder_2``; a
    VAE that overflows in fp16 (``force_upcast``, SDXL's) stays in fp32 when ``dtype`` is fp16.
    FLUX.1 gets its T5 as ``tokenizer_2`` / ``text_encoder_2``, its transformer as
    ``transformer`` and its flow-matching scheduler (the objective is not DDPM's);
    ``with_t5=False`` leaves T5-XXL out (``text_encoder_2`` None; 9.5 GB in bf16): a training
    worker reads T5's states from the encode cache, and T5 never trains.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path, identity = resolve_model(cfg, storage, workspace)
    kw = _revision_kw(cfg, identity)
    family = model_family(path, **kw)
    if family == FLUX:
        return _load_flux(cfg, path, identity, kw, dtype=dtype, device=device, with_transformer=with_unet,
                          with_t5=with_t5)
    weights = kw | SAFE_WEIGHTS
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
    tokenizer_2 = text_encoder_2 = None
    with _safetensors_only(cfg):
        text_encoder = _complete(CLIPTextModel, path, "text_encoder", cfg, **weights)
        if family == SDXL:
            tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
            text_encoder_2 = _complete(CLIPTextModelWithProjection, path, "text_encoder_2", cfg, **weights)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **weights) if with_unet else None
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    prediction_type = cfg.prediction_type or scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"model.prediction_type: the scheduler of {cfg.pretrained} predicts {prediction_type!r}; "
            "raydb trains 'epsilon' or 'v_prediction' (set model.prediction_type)"
        )
    scheduler.register_to_config(prediction_type=prediction_type)
    for module in (m for m in (text_encoder, text_encoder_2, vae, unet) if m is not None):
        module.requires_grad_(False)
        module.to(device=device, dtype=vae_encode_dtype(vae.config, dtype) if module is vae else dtype)
        module.eval()
    return Components(tokenizer, text_encoder, vae, unet, scheduler, identity, path, prediction_type,
                      family=family, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2)


def pipeline_call_kwargs(pipe: Any, negative_prompt: str | list[str] | None = None) -> dict[str, Any]:
    """The family-specific keyword arguments of a sampling call of ``pipe``.

    FLUX.1: T5 runs at the tokenizer's own length (what training encoded, 512 for FLUX.1-dev) and
    no negative prompt is passed (FLUX.1-dev is guidance-distilled: ``guidance_scale`` is an
    input of the model, not classifier-free guidance, and a negative prompt would only act
    under ``true_cfg_scale`` > 1). SD / SDXL: the negative prompt, if any.
    """
    from raydb.models.flux import max_sequence_length

    if getattr(pipe, "raydb_family", None) == FLUX or type(pipe).__name__ == "FluxPipeline":
        return {"max_sequence_length": max_sequence_length(pipe.tokenizer_2)}
    return {"negative_prompt": negative_prompt} if negative_prompt else {}


def _load_flux(cfg: ModelConfig, path: str, identity: str, kw: dict[str, Any], *, dtype: torch.dtype,
               device: torch.device | str, with_transformer: bool, with_t5: bool) -> Components:
    """FLUX.1's components: CLIP + T5 encoders, the 16-channel VAE, the transformer, the
    flow-matching scheduler (training draws its own sigmas; the scheduler supplies
    ``num_train_timesteps`` and samples)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, T5EncoderModel

    if cfg.prediction_type:
        raise ValueError(f"model.prediction_type: {cfg.pretrained} is a FLUX.1 model, which is trained "
                         f"with flow matching; {cfg.prediction_type!r} does not apply (unset it)")
    weights = kw | SAFE_WEIGHTS
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
    tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
    with _safetensors_only(cfg):
        text_encoder = _complete(CLIPTextModel, path, "text_encoder", cfg, **weights)
        text_encoder_2 = (_complete(T5EncoderModel, path, "text_encoder_2", cfg, **weights)
                          if with_t5 else None)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)
        transformer = (FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", **weights)
                       if with_transformer else None)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    for module in (m for m in (text_encoder, text_encoder_2, vae, transformer) if m is not None):
        module.requires_grad_(False)
        module.to(device=device, dtype=dtype)
        module.eval()
    return Components(tokenizer, text_encoder, vae, None, scheduler, identity, path, FLOW_MATCHING,
                      family=FLUX, tokenizer_2=tokenizer_2, text_encoder_2=text_encoder_2,
                      transformer=transformer)


def load_pipeline(
    cfg: ModelConfig,
    storage: Storage,
    workspace: str,
    *,
    dtype: torch.dtype | None = torch.float32,
    device: torch.device | str = "cpu",
):
    """The family's pipeline (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` /
    ``FluxPipeline``) for sampling (safety checker off; progress bar off); ``pipe.raydb_identity``
    / ``raydb_family`` say what it is. ``dtype=None``: the family's :func:`sampling_dtype` on
    ``device``."""
    import diffusers

    path, identity = resolve_model(cfg, storage, workspace)
    kw = _revision_kw(cfg, identity)
    family = model_family(path, **kw)
    dtype = dtype or sampling_dtype(family, device)
    pipeline_class = getattr(diffusers, family_spec(family).pipeline_class)
    if family == FLUX and cfg.prediction_type:
        raise ValueError(f"model.prediction_type: {cfg.pretrained} is a FLUX.1 (flow-matching) model; "
                         "unset it")
    if family not in (SDXL, FLUX):  # SDXL and Flux pipelines have no safety checker
        kw.update(safety_checker=None, requires_safety_checker=False)
    with _safetensors_only(cfg):
        pipe = pipeline_class.from_pretrained(path, torch_dtype=dtype, **kw, **SAFE_WEIGHTS)
    if cfg.prediction_type:
        pipe.scheduler.register_to_config(prediction_type=cfg.prediction_type)
    pipe.set_progress_bar_config(disable=True)
    pipe.raydb_identity = identity
    pipe.raydb_family = family
    pipe = pipe.to(device)
    if family == SDXL:  # its VAE overflows in fp16 (``force_upcast``): decode in fp32
        pipe.vae.to(vae_encode_dtype(pipe.vae.config, dtype))
    return pipe
