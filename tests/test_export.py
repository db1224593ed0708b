"""Kohya-layout export: names, alphas and metadata, and a round trip through diffusers' loader.

The round trip is the claim users care about: the exported single file, loaded the way ComfyUI /
AUTOMATIC1111-style loaders read it (here diffusers' ``load_lora_weights``, which reads the kohya
layout), gives the same images as the diffusers-format adapter. Tensors are copied unchanged, so
both loads put bit-identical LoRA weights and scales into the same base model and the images are
compared exactly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from raydb.config import LoraConfig
from raydb.export import KOHYA_WEIGHTS, kohya_metadata, to_kohya
from raydb.train.lora import add_lora, read_safetensors_header, save_lora

ATTN = [f"{attn}_{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out_0")]
TE = [f"self_attn_{proj}" for proj in ("q_proj", "k_proj", "v_proj", "out_proj")]
# The tiny SD UNet's attention blocks (CrossAttnDown at level 0, the mid block, CrossAttnUp at
# level 1 with layers_per_block + 1 = 2 attentions), named as sd-scripts names SD 1.x modules.
LORA_WITH_TE = LoraConfig(rank=4, alpha=8, train_text_encoder=True)
SD_UNET_BLOCKS = [
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0",
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0",
    "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0",
]
# The tiny SDXL UNet (levels: plain, cross-attention; 2 layers per block; 2 transformer layers in
# level 1 and the mid block) in SGM names, as in real SDXL kohya files: down level 1 is
# input_blocks 4 and 5, the mid attention middle_block_1, up level 0 output_blocks 0-2.
SDXL_UNET_BLOCKS = [
    f"lora_unet_{block}_transformer_blocks_{t}"
    for block in ("input_blocks_4_1", "input_blocks_5_1", "middle_block_1",
                  "output_blocks_0_1", "output_blocks_1_1", "output_blocks_2_1")
    for t in (0, 1)
]


def _modules(blocks: list[str], leaves: list[str]) -> set[str]:
    return {f"{b}_{leaf}" for b in blocks for leaf in leaves}


def _keys(names: set[str]) -> set[str]:
    return {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}


def _te_modules(prefix: str) -> set[str]:
    return {f"{prefix}_text_model_encoder_layers_{i}_{leaf}" for i in (0, 1) for leaf in TE}


def _pipeline(family: str, path: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kw = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(path, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _trained_adapter(family: str, path: str, lora: LoraConfig) -> tuple[bytes, dict]:
    """A diffusers-format adapter with random (non-zero) LoRA weights, and the base UNet config."""
    pipe = _pipeline(family, path)
    encoders = (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    params = add_lora(pipe.unet, lora, *encoders)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return save_lora(pipe.unet, *encoders), dict(pipe.unet.config)


def _images(pipe, folder: Path | None = None, weight_name: str = "") -> np.ndarray:
    """One seeded image from ``pipe``, with the adapter ``folder/weight_name`` loaded (then unloaded)."""
    if folder is not None:
        pipe.load_lora_weights(str(folder), weight_name=weight_name)
        encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
        # the text-encoder LoRA layers were loaded too, not silently dropped
        assert all(getattr(e, "peft_config", None) for e in encoders if e is not None)
    out = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(3), output_type="np")
    if folder is not None:
        pipe.unload_lora_weights()
    return out.images


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_kohya_file_gives_the_same_images_as_the_diffusers_adapter(
    family: str, tiny_model_dir: str, tiny_sdxl_dir: str, tmp_path: Path,
) -> None:
    path = tiny_sdxl_dir if family == "sdxl" else tiny_model_dir
    weights, unet_config = _trained_adapter(family, path, LORA_WITH_TE)
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(weights)
    (tmp_path / KOHYA_WEIGHTS).write_bytes(to_kohya(weights, unet_config))

    pipe = _pipeline(family, path)
    base = _images(pipe)
    diffusers_format = _images(pipe, tmp_path, "pytorch_lora_weights.safetensors")
    kohya = _images(pipe, tmp_path, KOHYA_WEIGHTS)
    assert np.abs(diffusers_format - base).max() > 0.05  # the adapter does change the images
    np.testing.assert_array_equal(kohya, diffusers_format)


def test_sd_keys_and_alphas_follow_the_kohya_naming(tiny_model_dir: str) -> None:
    weights, unet_config = _trained_adapter("sd", tiny_model_dir, LORA_WITH_TE)
    tensors = st_load(to_kohya(weights, unet_config))
    names = _modules(SD_UNET_BLOCKS, ATTN) | _te_modules("lora_te")
    assert set(tensors) == _keys(names)
    for name in names:
        assert tensors[f"{name}.alpha"].shape == () and tensors[f"{name}.alpha"].item() == 8.0
        assert tensors[f"{name}.lora_down.weight"].shape[0] == 4  # (rank, in)
        assert tensors[f"{name}.lora_up.weight"].shape[1] == 4  # (out, rank)
    # The tensors are the diffusers file's, unchanged: down = "lora.down", up = "lora.up".
    source = st_load(weights)
    down = source["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora.down.weight"]
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    assert torch.equal(tensors[f"{name}.lora_down.weight"], down)


def test_sdxl_keys_use_sgm_names_and_both_text_encoders(tiny_sdxl_dir: str) -> None:
    lora = LoraConfig(rank=2, alpha=3, train_text_encoder=True)
    weights, unet_config = _trained_adapter("sdxl", tiny_sdxl_dir, lora)
    tensors = st_load(to_kohya(weights, unet_config))
    names = _modules(SDXL_UNET_BLOCKS, ATTN) | _te_modules("lora_te1") | _te_modules("lora_te2")
    assert set(tensors) == _keys(names)
    assert {tensors[f"{n}.alpha"].item() for n in names} == {3.0}


def test_unet_only_adapter_without_header_gets_alpha_equal_to_rank(tiny_model_dir: str) -> None:
    from safetensors.torch import save as st_save

    weights, unet_config = _trained_adapter("sd", tiny_model_dir, LoraConfig(rank=4, alpha=8))
    bare = st_save(st_load(weights))  # no lora_adapter_metadata: loaders assume alpha == rank
    tensors = st_load(to_kohya(bare, unet_config))
    assert not any(k.startswith("lora_te") for k in tensors)
    assert {v.item() for k, v in tensors.items() if k.endswith(".alpha")} == {4.0}


def test_metadata_header_names_the_base_family(tiny_model_dir: str, tiny_sdxl_dir: str) -> None:
    adapter_meta = {"lora": {"rank": 4, "alpha": 8.0},
                    "subject": {"id": "rex", "instance_prompt": "a sks dog"},
                    "base_model": {"pretrained": "tiny", "prediction_type": "epsilon"},
                    "training": {"resolution": 64, "max_steps": 6, "learning_rate": 1e-4},
                    "created_at": "2026-01-01T00:00:00Z"}
    for family, path, version, arch in (
        ("sd", tiny_model_dir, "sd_v1", "stable-diffusion-v1/lora"),
        ("sdxl", tiny_sdxl_dir, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
    ):
        weights, unet_config = _trained_adapter(family, path, LoraConfig(rank=4, alpha=8))
        data = to_kohya(weights, unet_config, kohya_metadata(adapter_meta, unet_config))
        header, offset = read_safetensors_header(data)
        meta = header["__metadata__"]
        assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == arch
        assert (meta["ss_network_module"], meta["ss_network_dim"], meta["ss_network_alpha"]) == (
            "networks.lora", "4", "8.0")
        assert meta["ss_output_name"] == "rex" and meta["ss_resolution"] == "(64, 64)"
        assert meta["sshs_model_hash"] == hashlib.sha256(data[offset:]).hexdigest()
        assert all(isinstance(v, str) for v in meta.values())
        assert json.loads(json.dumps(meta)) == meta


def test_non_lora_keys_and_resnet_targets_on_sdxl_are_refused(tiny_sdxl_dir: str) -> None:
    from safetensors.torch import save as st_save

    unet_config = json.loads((Path(tiny_sdxl_dir) / "unet" / "config.json").read_text())
    with pytest.raises(ValueError, match="unet.conv_in.weight"):
        to_kohya(st_save({"unet.conv_in.weight": torch.zeros(2, 2)}), unet_config)
    resnet = {"unet.down_blocks.0.resnets.0.conv1.lora.down.weight": torch.zeros(2, 4),
              "unet.down_blocks.0.resnets.0.conv1.lora.up.weight": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match="attention blocks"):
        to_kohya(st_save(resnet), unet_config)


# -- export_version reads only the version's own files (issue 24) -----------------------------------
def _registered(make_cfg, tmp_path, meta_extra: dict) -> tuple:
    """A registered adapter whose adapter.json names the config's base model (so nothing but the
    file check stands between export and the weights it names)."""
    from raydb.models.components import resolve_model
    from raydb.registry import register_adapter
    from raydb.storage import Storage

    cfg, storage = make_cfg(), Storage()
    _, identity = resolve_model(cfg.model, storage, cfg.workspace)
    src = tmp_path / "src"
    src.mkdir()
    (src / "pytorch_lora_weights.safetensors").write_bytes(b"w")
    (src / "adapter.json").write_text(json.dumps({"weights_sha256": hashlib.sha256(b"w").hexdigest(),
                                                  "base_model": {"identity": identity, "family": "sd"}}))
    record = register_adapter(storage, cfg.workspace, cfg.subject.tenant, "rex", str(src))
    meta = json.loads((Path(record["uri"]) / "adapter.json").read_text())
    (Path(record["uri"]) / "adapter.json").write_text(json.dumps(meta | meta_extra))
    return cfg, storage, record


def test_export_never_follows_a_weights_field_out_of_the_version(make_cfg, tmp_path, monkeypatch):
    """An adapter.json whose ``weights`` is ``../../…/secret`` is refused before anything is read
    (before: the path was joined unchecked and the file read, converted and written into the
    registry). The version's own weights are the one file export reads, as serving does."""
    from raydb.export import export_version
    from raydb.storage import Storage

    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(b"the operator's secret")
    cfg, storage, record = _registered(make_cfg, tmp_path, {})
    escape = "/".join([".."] * len(Path(record["uri"]).relative_to(tmp_path).parts)) + "/secret.safetensors"
    meta = json.loads((Path(record["uri"]) / "adapter.json").read_text())
    (Path(record["uri"]) / "adapter.json").write_text(json.dumps(meta | {"weights": escape}))
    assert (Path(record["uri"]) / escape).resolve() == secret.resolve()  # the escape is real
    reads = []
    real = Storage.read_bytes
    monkeypatch.setattr(Storage, "read_bytes", lambda self, uri: reads.append(uri) or real(self, uri))
    with pytest.raises(ValueError, match=r"names the weights file '\.\./.*secret\.safetensors'"):
        export_version(storage, cfg, "rex")
    assert not [u for u in reads if Path(u).resolve() == secret.resolve()]
    assert not (Path(record["uri"]) / KOHYA_WEIGHTS).exists()


def test_export_of_an_adapter_json_that_is_not_an_object_names_the_file(make_cfg, tmp_path):
    from raydb.export import export_version
    from raydb.storage import StorageError

    cfg, storage, record = _registered(make_cfg, tmp_path, {})
    (Path(record["uri"]) / "adapter.json").write_text("[1, 2, 3]")
    with pytest.raises(StorageError, match=r"v0001/adapter.json is not a JSON object"):
        export_version(storage, cfg, "rex")
