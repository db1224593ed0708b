"""Export an adapter to the single-file "kohya" LoRA layout that ComfyUI, AUTOMATIC1111 and
kohya's sd-scripts load.

Our adapters are diffusers-format (``pytorch_lora_weights.safetensors``): keys
``unet.<module>.lora.{down,up}.weight`` / ``text_encoder[_2].<module>.lora_linear_layer.{down,up}.weight``
with one ``lora_alpha`` per component in the ``lora_adapter_metadata`` header. The kohya layout
names each adapted module once, with ``.`` replaced by ``_`` and a prefix per component, and stores
three tensors per module::

    lora_unet_<module>.lora_down.weight   (rank, in_features)   = diffusers "down" / peft lora_A
    lora_unet_<module>.lora_up.weight     (out_features, rank)  = diffusers "up"   / peft lora_B
    lora_unet_<module>.alpha              ()                    the module's alpha

The update applied to a layer is ``up @ down * alpha / rank`` in both formats, so tensors are copied
unchanged and only names and alphas move. Prefixes: ``lora_unet_``; ``lora_te_`` for SD 1.x/2.x's
text encoder; ``lora_te1_`` / ``lora_te2_`` for SDXL's two. Text-encoder modules are named from the
CLIP text transformer (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``). UNet module names
are diffusers' own for SD 1.x/2.x (sd-scripts trains those on a diffusers-style UNet:
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``) and Stability's SGM
names for SDXL (sd-scripts trains SDXL on the SGM UNet:
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), which depends on the UNet's
``layers_per_block``. The header carries the ``ss_*`` training metadata those tools display and use
to tell SD 1/2/XL apart (``ss_base_model_version``, ``ss_v2``), ``sshs_model_hash`` (sha256 of the
tensor bytes) and the Stability ``modelspec.*`` fields.

FLUX.1 adapters (``transformer.…`` / ``text_encoder.…`` keys) get BFL's module names, with the
modules BFL fuses (q/k/v; the single blocks' q/k/v + MLP) as one exact block-structured LoRA each:
see :mod:`raydb.export_flux`.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import torch

from raydb.export_flux import FLUX_BASE_MODEL_VERSION, flux_kohya_tensors
from raydb.models.family import FLUX, SDXL, family_of_denoiser_config, sd_version
from raydb.train.lora import canonical_header, read_safetensors_header

__all__ = ["KOHYA_FORMAT", "KOHYA_WEIGHTS", "EXPORT_FORMATS", "to_kohya", "kohya_metadata",
           "kohya_module_name", "export_version"]

KOHYA_FORMAT = "kohya"
KOHYA_WEIGHTS = "lora_kohya.safetensors"
EXPORT_FORMATS = {KOHYA_FORMAT: KOHYA_WEIGHTS}  # format -> file name beside the diffusers weights

# diffusers-format suffix -> kohya suffix (peft's own spelling accepted too)
_SUFFIXES = {
    ".lora.down.weight": "lora_down.weight", ".lora.up.weight": "lora_up.weight",
    ".lora_linear_layer.down.weight": "lora_down.weight",
    ".lora_linear_layer.up.weight": "lora_up.weight",
    ".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
}
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_FLUX_COMPONENTS = ("transformer", "text_encoder")


def _sgm_unet_module(module: str, layers_per_block: int) -> str:
    """diffusers UNet module path -> Stability SGM path (SDXL), for modules inside attention blocks.

    SGM numbers the down path as one flat list: ``input_blocks.0`` is conv_in, then per level
    ``layers_per_block`` (resnet, attention) pairs and a downsampler; the up path has
    ``layers_per_block + 1`` pairs per level. Inside a pair, ``.0`` is the resnet and ``.1`` the
    attention (transformer) block, whose inner names match diffusers'.
    """
    down = re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module)
    if down:
        level, layer, rest = int(down[1]), int(down[2]), down[3]
        return f"input_blocks.{1 + level * (layers_per_block + 1) + layer}.1.{rest}"
    mid = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module)
    if mid:
        return f"middle_block.1.{mid[1]}"
    up = re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module)
    if up:
        level, layer, rest = int(up[1]), int(up[2]), up[3]
        return f"output_blocks.{level * (layers_per_block + 1) + layer}.1.{rest}"
    raise ValueError(
        f"kohya export: SDXL adapters are exported for LoRA layers inside attention blocks "
        f"(lora.target_modules such as to_q/to_k/to_v/to_out.0); unet module {module!r} is not one"
    )


def kohya_module_name(component: str, module: str, unet_config: dict[str, Any]) -> str:
    """The kohya name of one adapted module, e.g. ``("unet", "mid_block.attentions.0…to_q")`` ->
    ``lora_unet_mid_block_attentions_0_…_to_q`` (SD) or ``lora_unet_middle_block_1_…_to_q`` (SDXL)."""
    family = family_of_denoiser_config(unet_config)
    sdxl = family == SDXL
    if component == "unet":
        path = _sgm_unet_module(module, int(unet_config["layers_per_block"])) if sdxl else module
        prefix = "lora_unet"
    elif component in ("text_encoder", "text_encoder_2"):
        if component == "text_encoder_2" and not sdxl:
            raise ValueError("kohya export: a text_encoder_2 adapter needs an SDXL base model")
        # kohya names follow transformers' CLIPTextModel(WithProjection).text_model.* paths
        path = module if module.startswith("text_model.") else f"text_model.{module}"
        # SDXL's two CLIPs are te1 / te2; kohya's FLUX.1 LoRA names its CLIP-L te1 too (T5: te3)
        prefix = {"text_encoder": "lora_te1" if sdxl or family == FLUX else "lora_te",
                  "text_encoder_2": "lora_te2"}[component]
    else:
        raise ValueError(f"kohya export: unknown adapter component {component!r}")
    return f"{prefix}_{path.replace('.', '_')}"


def _alphas(metadata: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per-component peft config (``r``, ``lora_alpha``) from diffusers' ``lora_adapter_metadata``."""
    import json

    raw = metadata.get("lora_adapter_metadata")
    flat = json.loads(raw) if raw else {}
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = key.rpartition(".")
        out.setdefault(component, {})[field] = value
    for component, config in out.items():
        for field in ("rank_pattern", "alpha_pattern"):
            if config.get(field):
                raise ValueError(f"kohya export: per-module {field} ({component}) is not supported")
        if config.get("use_rslora") or config.get("use_dora"):
            raise ValueError(
                f"kohya export: {component} uses rsLoRA/DoRA, which the kohya LoRA layout cannot express"
            )
    return out


def to_kohya(weights: bytes, unet_config: dict[str, Any], metadata: dict[str, str] | None = None) -> bytes:
    """Convert diffusers-format adapter bytes into kohya-layout safetensors bytes.

    ``unet_config`` is the base model's ``unet/config.json`` (family and, for SDXL,
    ``layers_per_block``) — FLUX.1's ``transformer/config.json`` (its widths); ``metadata``
    (strings) is merged into the header (see :func:`kohya_metadata`). Tensors keep their dtype and
    values. A file without ``lora_adapter_metadata`` gets ``alpha = rank``, which is what
    diffusers' loader assumes for it. Raises ``ValueError`` naming the offending key for anything
    that is not a LoRA tensor.
    """
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    header, _ = read_safetensors_header(weights)
    configs = _alphas(header.get("__metadata__") or {})
    flux = family_of_denoiser_config(unet_config) == FLUX
    components = _FLUX_COMPONENTS if flux else _COMPONENTS
    tensors: dict[str, torch.Tensor] = {}
    transformer: dict[str, dict[str, torch.Tensor]] = {}  # FLUX.1: module -> {down, up}, fused below
    for key, tensor in st_load(weights).items():
        component, _, rest = key.partition(".")
        suffix = next((s for s in _SUFFIXES if rest.endswith(s)), None)
        if component not in components or suffix is None:
            raise ValueError(f"kohya export: {key!r} is not a LoRA weight of {'/'.join(components)}")
        if component == "transformer":
            kind = "down" if _SUFFIXES[suffix] == "lora_down.weight" else "up"
            transformer.setdefault(rest[: -len(suffix)], {})[kind] = tensor
            continue
        name = kohya_module_name(component, rest[: -len(suffix)], unet_config)
        tensors[f"{name}.{_SUFFIXES[suffix]}"] = tensor.contiguous()
        if _SUFFIXES[suffix] == "lora_down.weight":
            rank = tensor.shape[0]
            alpha = configs.get(component, {}).get("lora_alpha", rank)
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    if transformer:
        alpha = configs.get("transformer", {}).get("lora_alpha")
        factors = {}
        for module, pair in transformer.items():
            if set(pair) != {"down", "up"}:
                raise ValueError(f"kohya export: no {'up' if 'down' in pair else 'down'} weight for "
                                 f"transformer.{module}")
            rank = pair["down"].shape[0]
            factors[module] = (pair["down"], pair["up"], float(alpha if alpha is not None else rank) / rank)
        tensors |= flux_kohya_tensors(factors, unet_config)
    missing = [k for k in tensors if k.endswith(".alpha") and k[:-6] + ".lora_up.weight" not in tensors]
    if missing:
        raise ValueError(f"kohya export: no up weight for {missing[0][:-6]}")
    data = st_save(tensors)
    _, offset = read_safetensors_header(data)
    # kohya's model hash ("sshs_model_hash") is the sha256 of the tensor bytes, which a header
    # rewrite leaves untouched, so it can be computed before the metadata goes in.
    update = dict(metadata or {}) | {"sshs_model_hash": hashlib.sha256(data[offset:]).hexdigest()}
    return canonical_header(data, update)


def kohya_metadata(adapter_meta: dict[str, Any], unet_config: dict[str, Any]) -> dict[str, str]:
    """The ``ss_*`` / ``modelspec.*`` header fields for an adapter, from its ``adapter.json``.

    These are what AUTOMATIC1111 shows and uses to match the adapter to SD 1/2/XL, what kohya's
    tools read (network module, dim, alpha) and the Stability model-spec fields ComfyUI and
    others display. Every value is a string (safetensors metadata is str -> str).
    """
    flux = family_of_denoiser_config(unet_config) == FLUX
    version = FLUX_BASE_MODEL_VERSION if flux else sd_version(unet_config)
    sdxl = version.startswith("sdxl")
    lora = adapter_meta.get("lora", {})
    base = adapter_meta.get("base_model", {})
    training = adapter_meta.get("training", {})
    subject = adapter_meta.get("subject", {})
    resolution = int(training.get("resolution", 1024 if sdxl or flux else 512))
    v_pred = base.get("prediction_type") == "v_prediction"
    guidance_distilled = bool(unet_config.get("guidance_embeds"))
    fields: dict[str, Any] = {
        "ss_network_module": "networks.lora_flux" if flux else "networks.lora",
        "ss_network_dim": lora.get("rank"),
        "ss_network_alpha": lora.get("alpha"),
        "ss_base_model_version": version,
        "ss_v2": version == "sd_v2",
        "ss_v_parameterization": v_pred,
        "ss_sd_model_name": base.get("pretrained"),
        "ss_output_name": subject.get("id"),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_max_train_steps": training.get("max_steps"),
        "ss_learning_rate": training.get("learning_rate"),
        "ss_prior_loss_weight": training.get("prior_loss_weight"),
        "ss_seed": training.get("seed"),
        "ss_training_comment": f"raydb DreamBooth-LoRA; instance prompt: {subject.get('instance_prompt')}",
        "ss_training_finished_at": adapter_meta.get("created_at"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": (
            ("flux-1-dev/lora" if guidance_distilled else "flux-1-schnell/lora") if flux else
            "stable-diffusion-xl-v1-base/lora" if sdxl else
            "stable-diffusion-v2/lora" if version == "sd_v2" else "stable-diffusion-v1/lora"),
        "modelspec.implementation": (
            "https://github.com/black-forest-labs/flux" if flux else
            "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers"
        ),
        "modelspec.title": subject.get("id"),
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "flow" if flux else "v" if v_pred else "epsilon",
        "modelspec.date": adapter_meta.get("created_at"),
    }
    return {k: str(v) for k, v in fields.items() if v is not None}


def _unet_config(path: str, **kw: Any) -> dict[str, Any]:
    """The denoiser's config: ``unet/config.json``, or FLUX.1's ``transformer/config.json``."""
    import json
    from pathlib import Path

    from raydb.models.components import model_family

    subfolder = "transformer" if model_family(path, **kw) == FLUX else "unet"
    local = Path(path) / subfolder / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from diffusers import ConfigMixin

    return dict(ConfigMixin.load_config(path, subfolder=subfolder, **kw))


def export_version(
    storage: Any, cfg: Any, subject_id: str, version: str | None = None, *,
    fmt: str = KOHYA_FORMAT, output: str | None = None,
) -> dict[str, Any]:
    """Export one registered adapter of ``cfg.subject.tenant`` (``version``, default the latest) to
    ``fmt``.

    The file is stored beside the diffusers weights in the registry version
    (``tenants/<tenant>/subjects/<id>/<version>/lora_kohya.safetensors``) and listed in its
    adapter.json under ``exports``; ``output`` (a local path or s3:// URI) also gets a copy.
    ``cfg.model`` must resolve to the adapter's base model (its UNet layout names the keys). The
    weights read are the version's own ``pytorch_lora_weights.safetensors``, the one file serving
    reads too: an adapter.json whose ``weights`` names any other file (``../``, another version's)
    is refused, never followed. Returns ``{"format", "uri", "sha256", "subject_id", "version"}``
    (and ``"output"``).
    """
    from raydb.models.components import model_family, resolve_model
    from raydb.registry import ADAPTER_META, ADAPTER_WEIGHTS, latest_version, read_metadata, version_uri
    from raydb.storage import join

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format {fmt!r} is not supported (supported: {', '.join(EXPORT_FORMATS)})")
    tenant = cfg.subject.tenant
    version = version or latest_version(storage, cfg.workspace, tenant, subject_id)["version"]
    target = version_uri(cfg.workspace, tenant, subject_id, version)
    meta = read_metadata(storage, target)  # JSON that is not an object: a StorageError naming the file
    if meta.get("weights", ADAPTER_WEIGHTS) != ADAPTER_WEIGHTS:
        raise ValueError(f"export: {join(target, ADAPTER_META)} names the weights file "
                         f"{meta.get('weights')!r}; a registered adapter's weights are {ADAPTER_WEIGHTS}")
    base = meta.get("base_model") if isinstance(meta.get("base_model"), dict) else {}
    path, identity = resolve_model(cfg.model, storage, cfg.workspace)
    if base.get("identity") != identity:
        raise ValueError(
            f"export: {subject_id} {version} was trained on base model {base.get('identity')!r} "
            f"({base.get('pretrained')}); model.pretrained resolves to {identity!r} — set "
            "model.pretrained to the adapter's base"
        )
    kw = {"revision": cfg.model.revision} if cfg.model.revision else {}
    unet_config = _unet_config(path, **kw)
    if base.get("family", family_of_denoiser_config(unet_config)) != model_family(path, **kw):
        raise ValueError(f"export: adapter family {base.get('family')!r} does not match the base model")
    data = to_kohya(storage.read_bytes(join(target, ADAPTER_WEIGHTS)), unet_config,
                    kohya_metadata(meta, unet_config))
    name = EXPORT_FORMATS[fmt]
    digest = hashlib.sha256(data).hexdigest()
    storage.write_bytes(join(target, name), data)
    meta.setdefault("exports", {})[fmt] = {"weights": name, "sha256": digest}
    storage.write_json(join(target, ADAPTER_META), meta)  # last: lists only a complete file
    result = {"format": fmt, "uri": join(target, name), "sha256": digest, "subject_id": subject_id,
              "version": version}
    if output:
        storage.write_bytes(output, data)
        result["output"] = output
    return result
