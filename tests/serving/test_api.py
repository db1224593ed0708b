"""The generate API's request checks (no Ray): each limit at, and one past, its boundary; the exact
422 shapes; defaults; the instance-token rule. Messages are compared whole: they are the API."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from raydb.config import ServeConfig
from raydb.errors import RequestError
from raydb.serving.api import (
    GenerateRequest,
    class_noun,
    final_prompt,
    validate_generate,
    validation_detail,
)

CFG = ServeConfig(max_inference_steps=10, default_inference_steps=4, max_size=128, max_images=2,
                  max_prompt_chars=20)
META = {"subject": {"instance_token": "sks", "class_prompt": "a photo of a dog"}}


def _req(**body) -> GenerateRequest:
    return GenerateRequest(**({"subject_id": "a", "prompt": "a dog", "seed": 3} | body))


def _error(**body) -> tuple[str, str]:
    with pytest.raises(RequestError) as err:
        validate_generate(_req(**body), CFG, META)
    assert err.value.detail() == [{"type": "value_error", "loc": ["body", err.value.field],
                                   "msg": err.value.message}]
    assert str(err.value) == f"{err.value.field}: {err.value.message}"
    return err.value.field, err.value.message


def test_every_limit_holds_at_its_boundary():
    params = validate_generate(_req(prompt="a dog " + "x" * 14, negative_prompt="y" * 20,
                                    num_inference_steps=10, width=128, height=8, num_images=2,
                                    guidance_scale=3.0), CFG, META)
    assert params.model_dump() == {
        "prompt": "a sks dog " + "x" * 14, "negative_prompt": "y" * 20, "num_inference_steps": 10,
        "guidance_scale": 3.0, "seed": 3, "width": 128, "height": 8, "num_images": 2}


def test_one_past_each_limit_names_the_field_and_the_limit():
    assert _error(prompt="x" * 21) == ("prompt", "at most 20 characters, got 21")
    assert _error(negative_prompt="x" * 21) == ("negative_prompt", "at most 20 characters")
    assert _error(num_inference_steps=11) == ("num_inference_steps", "at most 10, got 11")
    assert _error(width=136) == ("width", "at most 128, got 136")
    assert _error(height=136) == ("height", "at most 128, got 136")
    assert _error(width=12) == ("width", "must be a multiple of 8 (the VAE downsamples by 8), got 12")
    assert _error(height=20) == ("height", "must be a multiple of 8 (the VAE downsamples by 8), got 20")
    assert _error(num_images=3) == ("num_images", "at most 2, got 3")


def test_defaults_fill_in():
    params = validate_generate(GenerateRequest(subject_id="a", prompt="a dog"), CFG, META)
    assert params.num_inference_steps == 4 and params.negative_prompt is None
    assert (params.width, params.height, params.num_images, params.guidance_scale) == (None, None, 1, 7.5)
    assert 0 <= params.seed < 2**31
    low_max = ServeConfig(max_inference_steps=3, default_inference_steps=4)
    assert validate_generate(_req(), low_max, META).num_inference_steps == 3  # default capped by the max
    # FLUX.1's guidance is the distilled model's input: FluxPipeline's 3.5, not SD's CFG 7.5
    flux = META | {"base_model": {"family": "flux"}}
    assert validate_generate(_req(), CFG, flux).guidance_scale == 3.5
    assert validate_generate(_req(guidance_scale=7.5), CFG, flux).guidance_scale == 7.5
    assert validate_generate(_req(guidance_scale=0.0), CFG, META).guidance_scale == 0.0
    # without a subject (the base model alone) the served base model's family decides
    assert validate_generate(_req(), CFG, {}, base_family="flux").guidance_scale == 3.5
    assert validate_generate(_req(), CFG, {}).guidance_scale == 7.5
    with pytest.raises(RequestError, match="width: must be a multiple of 16 for a FLUX.1 model"):
        validate_generate(_req(width=72), CFG, {}, base_family="flux")
    assert validate_generate(_req(width=72), CFG, {}, base_family="sd").width == 72


def test_unseeded_requests_draw_a_31_bit_seed(monkeypatch):
    import random

    bounds = []
    monkeypatch.setattr(random, "randrange", lambda stop: bounds.append(stop) or 12345)
    assert validate_generate(GenerateRequest(subject_id="a", prompt="p"), CFG, META).seed == 12345
    assert bounds == [2**31]


def test_unseeded_requests_get_different_seeds():
    seeds = {validate_generate(GenerateRequest(subject_id="a", prompt="p"), CFG, META).seed for _ in range(8)}
    assert len(seeds) > 1


def test_pydantic_errors_become_fastapis_422_detail_without_the_input():
    with pytest.raises(ValidationError) as err:
        GenerateRequest(subject_id="a", prompt="p", guidance_scale=99, extra_key="secret-input")
    detail = validation_detail(err.value)
    assert sorted(d["loc"][1] for d in detail) == ["extra_key", "guidance_scale"]
    for d in detail:
        assert set(d) == {"type", "loc", "msg"} and d["loc"][0] == "body" and len(d["loc"]) == 2
    by_field = {d["loc"][1]: d for d in detail}
    assert by_field["extra_key"]["type"] == "extra_forbidden"
    assert by_field["guidance_scale"]["type"] == "less_than_equal"
    assert "secret-input" not in repr(detail)


def test_class_noun_is_the_last_word_without_punctuation():
    assert class_noun("a photo of a dog") == "dog"
    assert class_noun("a photo of a dog.") == "dog"
    assert class_noun("  cat!? ") == "cat"
    assert class_noun("a photo of an XBOX") == "XBOX"  # only punctuation is stripped
    assert class_noun("") is None and class_noun("   ") is None


def test_final_prompt_inserts_the_token_before_the_class_noun_or_first():
    assert final_prompt("a dog on a beach", META) == "a sks dog on a beach"
    assert final_prompt("a sks dog", META) == "a sks dog"
    assert final_prompt("a castle", META) == "sks a castle"
    assert final_prompt("a dog", {"subject": {"class_prompt": "a photo of a dog"}}) == "a dog"  # no token
    assert final_prompt("a dog", {}) == "a dog"
    assert final_prompt("a dog", {"subject": {"instance_token": "sks"}}) == "sks a dog"  # no class prompt
    assert final_prompt("a XXXX", {"subject": {"instance_token": "sks"}}) == "sks a XXXX"


def test_no_subject_means_the_base_model_under_the_same_limits():
    """``subject_id`` left out: the base model alone — the prompt is kept as given (no token to add)
    and every limit still holds."""
    req = GenerateRequest(prompt="a dog on a beach", seed=3)
    assert req.subject_id is None
    params = validate_generate(req, CFG, {})
    assert (params.prompt, params.seed, params.num_inference_steps) == ("a dog on a beach", 3, 4)
    with pytest.raises(RequestError) as err:
        validate_generate(GenerateRequest(prompt="p", width=136), CFG, {})
    assert err.value.field == "width"
    with pytest.raises(ValidationError):
        GenerateRequest(subject_id="", prompt="p")  # given, it must still be an id
