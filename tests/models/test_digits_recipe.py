"""raydb.models.digits_recipe: the recipe is seeded and reproducible, and its folder loads like a real
checkpoint with provenance that catches changed weights. (The shipped model's own figures are
checked in test_digits.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from raydb.models.digits_recipe import RecipeSettings, main, train_digits_model, verify_provenance

TINY_RECIPE = RecipeSettings(vae_steps=3, vae_batch=8, unet_steps=3, unet_batch=8, unet_warmup=1,
                             eval_samples=1, eval_steps=2)


@pytest.mark.heavy
def test_recipe_is_reproducible_and_its_folder_loads_with_provenance(tmp_path):
    threads = torch.get_num_threads()
    first = train_digits_model(tmp_path / "a", TINY_RECIPE)
    second = train_digits_model(tmp_path / "b", TINY_RECIPE)
    assert torch.get_num_threads() == threads  # the recipe restores what it changed
    assert not torch.are_deterministic_algorithms_enabled()
    # same settings, same seed: the same bytes, so the same identity
    assert first["weights_sha256"] == second["weights_sha256"]
    assert first["identity"] == second["identity"] and first["identity"].startswith("digits-v1-")
    assert set(first["weights_sha256"]) == {"unet/diffusion_pytorch_model.safetensors",
                                            "vae/diffusion_pytorch_model.safetensors",
                                            "text_encoder/model.safetensors"}
    assert first["settings"]["unet_steps"] == 3 and len(first["data"]["sha256"]) == 64
    assert set(first["figures"]["per_digit_accuracy"]) == {"zero", "one", "two", "three", "four", "five",
                                                           "six", "seven", "eight", "nine"}
    assert verify_provenance(tmp_path / "a")["identity"] == first["identity"]
    # another seed trains other weights
    other = train_digits_model(tmp_path / "c", RecipeSettings(**{**TINY_RECIPE.__dict__, "seed": 1}))
    assert other["weights_sha256"] != first["weights_sha256"]

    # a changed weight file no longer matches the provenance
    unet = tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes((tmp_path / "c" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="weight files differ"):
        verify_provenance(tmp_path / "a")

    # the folder is a diffusers checkpoint: raydb loads it as model.pretrained, fp16 weights into fp32
    from raydb.config import load_config
    from raydb.models.components import load_components
    from raydb.storage import Storage

    cfg = load_config(data={"workspace": str(tmp_path / "ws"), "model": {"pretrained": str(tmp_path / "b")}})
    comps = load_components(cfg.model, Storage(), cfg.workspace)
    assert comps.identity == second["identity"]
    assert comps.unet.dtype == torch.float32 and comps.vae.config.scaling_factor == pytest.approx(
        second["vae"]["scaling_factor"])
    assert json.loads((tmp_path / "b" / "scheduler" / "scheduler_config.json").read_text())[
        "_class_name"] == "DDIMScheduler"


def test_recipe_refuses_a_non_empty_output(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file").write_text("keep me")
    assert main(["--output", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x" / "file").read_text() == "keep me"
