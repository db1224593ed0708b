"""The embedded tiny model: a real diffusers folder, loaded like real weights from disk, tiny or s3://."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raydb.config import ModelConfig
from raydb.models.components import load_components, model_identity, resolve_model
from raydb.models.tiny import build_tiny_tokenizer, tiny_identity
from raydb.storage import Storage, join

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def test_saved_folder_is_a_diffusers_layout(tiny_model_dir: str) -> None:
    root = Path(tiny_model_dir)
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in SUBFOLDERS:
        assert (root / sub).is_dir(), sub
        assert sub in index
    assert list((root / "unet").glob("*.safetensors"))
    assert json.loads((root / "raydb_identity.json").read_text()) == {"identity": tiny_identity()}


def test_tokenizer_keeps_prompt_words_whole() -> None:
    tok = build_tiny_tokenizer()
    ids = tok("a photo of sks dog").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 2 + 5  # one token per word
    assert tok.model_max_length == 77


def test_load_components_from_folder(tiny_model_dir: str, tmp_path: Path) -> None:
    comps = load_components(ModelConfig(pretrained=tiny_model_dir), Storage(), str(tmp_path / "ws"))
    assert comps.identity == tiny_identity()
    assert comps.prediction_type == "epsilon"
    assert comps.noise_scheduler.config.num_train_timesteps == 1000
    for module in (comps.text_encoder, comps.vae, comps.unet):
        assert not any(p.requires_grad for p in module.parameters())
        assert not module.training
    tokens = comps.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = comps.text_encoder(tokens)[0]  # (1, 77, cross_attention_dim)
        latents = comps.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
        out = comps.unet(latents, torch.tensor([10]), encoder_hidden_states=hidden).sample
    assert hidden.shape == (1, 77, 32)
    assert latents.shape == (1, 4, 8, 8)  # the VAE downsamples by 8 into 4 channels, like SD
    assert out.shape == latents.shape


def test_prediction_type_override(tiny_model_dir: str, tmp_path: Path) -> None:
    cfg = ModelConfig(pretrained=tiny_model_dir, prediction_type="v_prediction")
    comps = load_components(cfg, Storage(), str(tmp_path / "ws"))
    assert comps.prediction_type == "v_prediction"
    assert comps.noise_scheduler.config.prediction_type == "v_prediction"


def test_pipeline_generates_64px_image(tiny_model_dir: str) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks dog", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    assert image.mode == "RGB"


def test_resolve_tiny_materialises_once(tmp_path: Path) -> None:
    workspace = str(tmp_path / "ws")
    cfg = ModelConfig(pretrained="tiny")
    path, identity = resolve_model(cfg, Storage(), workspace)
    assert identity == tiny_identity()
    assert Path(path) == Path(workspace) / "models" / tiny_identity()
    assert (Path(path) / "model_index.json").is_file()
    weights = sorted(Path(path).rglob("*.safetensors"))
    mtimes = [w.stat().st_mtime_ns for w in weights]
    again, identity2 = resolve_model(cfg, Storage(), workspace)
    assert (again, identity2) == (path, identity)
    assert [w.stat().st_mtime_ns for w in weights] == mtimes  # not rewritten
    assert sorted(p.name for p in (Path(workspace) / "models").iterdir()) == [tiny_identity()]


def test_identity_follows_the_spec(monkeypatch) -> None:
    """``tiny_identity()`` is ``tiny-v<version>-<8 hex>`` and changes with every part of TINY_SPEC
    that shapes the weights or the vocabulary (so caches keyed by it never mix two models), but not
    with the order of the spec's keys.

    Deliberate break caught: an identity that ignores the spec (e.g. hashing only the version).
    """
    import copy
    import re

    import raydb.models.tiny as tiny

    base = tiny_identity()
    assert re.fullmatch(rf"tiny-v{tiny.TINY_SPEC['version']}-[0-9a-f]{{8}}", base)
    changes = [("seed", 4321), ("unet.block_out_channels", [32, 96]), ("vae.latent_channels", 8),
               ("text.num_hidden_layers", 3), ("words", [*tiny.TINY_SPEC["words"], "zebra"])]
    seen = {base}
    for dotted, value in changes:
        spec = copy.deepcopy(tiny.TINY_SPEC)
        *parents, leaf = dotted.split(".")
        node = spec
        for key in parents:
            node = node[key]
        node[leaf] = value
        monkeypatch.setattr(tiny, "TINY_SPEC", spec)
        seen.add(tiny_identity())
    assert len(seen) == 1 + len(changes)
    monkeypatch.undo()
    reordered = dict(reversed(list(tiny.TINY_SPEC.items())))
    monkeypatch.setattr(tiny, "TINY_SPEC", reordered)
    assert tiny_identity() == base


def test_identity_is_stable(tiny_model_dir: str, tmp_path: Path) -> None:
    assert model_identity(tiny_model_dir) == tiny_identity()
    _, from_tiny = resolve_model(ModelConfig(pretrained="tiny"), Storage(), str(tmp_path / "ws"))
    _, from_dir = resolve_model(ModelConfig(pretrained=tiny_model_dir), Storage(), str(tmp_path))
    assert from_tiny == from_dir == tiny_identity()
    assert model_identity("org/model") == "hub:org/model"


def test_local_folder_without_marker_gets_content_identity(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text('{"a": 1}')
    first = model_identity(str(folder))
    assert first.startswith("local-") and first == model_identity(str(folder))
    (folder / "model_index.json").write_text('{"a": 2}')
    assert model_identity(str(folder)) != first


def test_s3_model_downloaded_once_and_loads(tiny_model_dir: str, s3_bucket, tmp_path: Path) -> None:
    endpoint, bucket = s3_bucket
    storage = Storage(endpoint)
    prefix = join(bucket, "models/tiny")
    storage.upload_dir(tiny_model_dir, prefix)
    cache = tmp_path / "cache"
    cfg = ModelConfig(pretrained=prefix, cache_dir=str(cache))
    path, identity = resolve_model(cfg, storage, str(tmp_path / "ws"))
    assert Path(path).parent == cache / "models"
    assert identity == tiny_identity()  # a copied raydb model keeps its identity
    index = Path(path) / "model_index.json"
    assert index.read_bytes() == (Path(tiny_model_dir) / "model_index.json").read_bytes()
    before = index.stat().st_mtime_ns
    again = resolve_model(cfg, storage, str(tmp_path / "ws"))
    assert again == (path, identity)
    assert index.stat().st_mtime_ns == before  # cached, not downloaded again
    comps = load_components(cfg, storage, str(tmp_path / "ws"))
    assert comps.path == path and comps.identity == identity
    assert comps.unet.config.cross_attention_dim == 32


def test_empty_s3_prefix_is_a_clear_error(s3_bucket, tmp_path: Path) -> None:
    endpoint, bucket = s3_bucket
    cfg = ModelConfig(pretrained=join(bucket, "nothing"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained"):
        resolve_model(cfg, Storage(endpoint), str(tmp_path))


@pytest.mark.parametrize("missing", ["/definitely/not/here", "./not-here", "~/raydb-no-such-model"])
def test_missing_local_folder_names_the_field(missing: str, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        resolve_model(ModelConfig(pretrained=missing), Storage(), str(tmp_path))
    assert "model.pretrained" in str(info.value)
    assert missing in str(info.value)


def test_folder_that_is_not_a_model_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained: .*not a diffusers folder"):
        resolve_model(ModelConfig(pretrained=str(tmp_path / "empty")), Storage(), str(tmp_path))
