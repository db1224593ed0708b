"""Model identity (issue 18): full-content hashes for local folders, hub refs pinned to commits."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from raydb.config import ModelConfig
from raydb.models.components import hub_revision, model_identity, resolve_model
from raydb.storage import Storage


def _model(root: Path, weights: bytes) -> Path:
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text("{}")
    (root / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
    return root


def test_identity_covers_every_byte_of_the_weights(tmp_path):
    weights = bytes(range(256)) * (3 * 4096)  # 3 MiB
    changed = bytearray(weights)
    changed[-1] ^= 1  # same size, same first MiB, different weights
    a, b = _model(tmp_path / "a", weights), _model(tmp_path / "b", bytes(changed))
    assert model_identity(str(a)) != model_identity(str(b))
    assert model_identity(str(a)) == model_identity(str(_model(tmp_path / "c", weights)))


def test_hub_refs_resolve_to_commits_online_and_say_so_offline(monkeypatch, tmp_path):
    import huggingface_hub

    sha = "0123456789abcdef0123456789abcdef01234567"
    asked = []

    def model_info(self, repo_id, revision=None, **kw):
        asked.append((repo_id, revision))
        return SimpleNamespace(sha=sha)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert hub_revision("org/model", None) == sha and asked == [("org/model", "main")]
    _, identity = resolve_model(ModelConfig(pretrained="org/model"), Storage(), str(tmp_path))
    assert identity == f"hub:org/model@{sha}"
    assert hub_revision("org/model", sha) == sha and len(asked) == 2  # a commit needs no lookup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_revision("org/model", "v1.0") == "v1.0 (unresolved)" and len(asked) == 2
    _, identity = resolve_model(ModelConfig(pretrained="org/model"), Storage(), str(tmp_path))
    assert identity == "hub:org/model@main (unresolved)"


@pytest.mark.parametrize("error", [OSError("offline"), RuntimeError("401")])
def test_unreachable_hub_keeps_the_ref(monkeypatch, error):
    import huggingface_hub

    def model_info(self, repo_id, revision=None, **kw):
        raise error

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert hub_revision("org/model", "main") == "main (unresolved)"


def test_a_base_model_without_safetensors_weights_is_refused_not_unpickled(tmp_path, tiny_model_dir):
    """Base pipelines and training components load weights with ``use_safetensors=True``: a
    checkpoint whose UNet and VAE are pickled ``.bin`` files (which could run code when loaded) is
    refused with an error naming model.pretrained, never loaded. Fails on the old loaders, which
    fell back to the .bin files."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from raydb.models.components import load_components, load_pipeline

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    for part, cls in [("unet", UNet2DConditionModel), ("vae", AutoencoderKL)]:
        folder = pickled / part
        weights = {k: v.contiguous() for k, v in cls.from_pretrained(folder).state_dict().items()}
        for f in folder.glob("*.safetensors"):
            f.unlink()
        torch.save(weights, folder / "diffusion_pytorch_model.bin")
    cfg = ModelConfig(pretrained=str(pickled))
    for load in (load_pipeline, load_components):
        with pytest.raises(ValueError, match=r"model.pretrained: .*pickled has no safetensors weights"):
            load(cfg, Storage(), str(tmp_path / "ws"))
    load_pipeline(ModelConfig(pretrained=tiny_model_dir), Storage(), str(tmp_path / "ws"))  # safetensors


def test_a_text_encoder_whose_weights_do_not_match_is_refused_not_randomly_filled(tmp_path, tiny_model_dir):
    """transformers fills weights it cannot match with random values and only logs it; the loader
    refuses instead, naming the folder. (How it was found: transformers 5.0-5.5 read the shipped
    ``digits`` text encoder's key names as unknown and sampled with a random encoder.)"""
    import shutil

    from safetensors.torch import load_file, save_file

    from raydb.models.components import load_components

    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_model_dir, renamed)
    [weights] = (renamed / "text_encoder").glob("*.safetensors")
    save_file({f"other.{k}": v.contiguous() for k, v in load_file(weights).items()}, weights)
    with pytest.raises(ValueError, match=r"renamed/text_encoder lacks \d+ of the weights"):
        load_components(ModelConfig(pretrained=str(renamed)), Storage(), str(tmp_path / "ws"))
    load_components(ModelConfig(pretrained=tiny_model_dir), Storage(), str(tmp_path / "ws"))  # complete
