"""``raydb.train.lora`` on tiny stand-in modules (no diffusers UNet, no Ray; milliseconds each):
the LoRA settings that reach peft, frozen bases, master-weight dtypes, state dicts, and the saved
adapter file (keys, adapter-config metadata, canonical header)."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from diffusers.loaders.peft import PeftAdapterMixin
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from raydb.config import LoraConfig
from raydb.train.lora import (
    add_lora,
    canonical_header,
    lora_state_dicts,
    read_safetensors_header,
    save_lora,
    trainable_parameters,
)


class _Net(torch.nn.Module, PeftAdapterMixin):
    """UNet-like: attention projection names as in diffusers, plus a module no target names."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.to_q = torch.nn.Linear(4, 4, dtype=dtype)
        self.to_k = torch.nn.Linear(4, 4, dtype=dtype)
        self.proj = torch.nn.Linear(4, 4, dtype=dtype)


class _Wrapped(torch.nn.Module, PeftAdapterMixin):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Net()


class _Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(3, 3)
        self.k_proj = torch.nn.Linear(3, 3)


def _names(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if "lora_" in n}


def test_settings_reach_peft_and_only_lora_trains():
    net = _Net()
    cfg = LoraConfig(rank=3, alpha=6.0, dropout=0.25, target_modules=["to_q"])
    params = add_lora(net, cfg)
    config = net.peft_config["default"]
    assert config.r == 3 and config.lora_alpha == 6.0 and config.lora_dropout == 0.25
    assert config.init_lora_weights == "gaussian" and config.target_modules == {"to_q"}
    assert _names(net) == {"to_q.lora_A.default.weight", "to_q.lora_B.default.weight"}
    named = dict(net.named_parameters())
    assert [id(p) for p in params] == [id(named[n]) for n in sorted(_names(net))]
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in net.named_parameters() if "lora_" not in n)
    assert torch.equal(net.to_q.lora_B["default"].weight, torch.zeros(4, 3))  # adapted == base at step 0
    assert net.to_q.lora_A["default"].weight.abs().sum() > 0
    assert net.to_q.lora_dropout["default"].p == 0.25
    assert net.to_q.scaling["default"] == 2.0  # alpha / rank


def test_alpha_defaults_to_rank():
    net = _Net()
    add_lora(net, LoraConfig(rank=2, target_modules=["to_q", "to_k"]))
    assert net.peft_config["default"].lora_alpha == 2.0 and net.to_k.scaling["default"] == 1.0
    assert net.peft_config["default"].target_modules == {"to_q", "to_k"}


@pytest.mark.parametrize(("base", "master"), [
    (torch.float32, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float64, torch.float64),
])
def test_master_weights_dtype(base, master):
    net = _Net(base)
    params = add_lora(net, LoraConfig(rank=2, target_modules=["to_q"]))
    assert params and all(p.dtype == master for p in params)
    assert net.to_q.base_layer.weight.dtype == base  # the frozen base keeps its dtype


def test_text_encoders_get_their_own_targets_when_they_train():
    net, enc, enc2 = _Net(), _Encoder(), _Encoder()
    cfg = LoraConfig(rank=2, alpha=4.0, dropout=0.5, target_modules=["to_k"], train_text_encoder=True,
                     text_encoder_target_modules=["k_proj"])
    params = add_lora(net, cfg, enc, enc2)
    for encoder in (enc, enc2):
        config = encoder.peft_config["default"]
        assert config.r == 2 and config.lora_alpha == 4.0 and config.lora_dropout == 0.5
        assert config.init_lora_weights == "gaussian" and config.target_modules == {"k_proj"}
        assert _names(encoder) == {"k_proj.lora_A.default.weight", "k_proj.lora_B.default.weight"}
        assert not any(p.requires_grad for n, p in encoder.named_parameters() if "lora_" not in n)
    want = [p for m in (net, enc, enc2) for n, p in m.named_parameters() if "lora_" in n]
    assert [id(p) for p in params] == [id(p) for p in want] and len(params) == 6
    only_second = _Encoder()
    assert len(add_lora(_Net(), cfg, None, only_second)) == 4 and _names(only_second)


def test_text_encoders_untouched_without_train_text_encoder():
    net, enc = _Net(), _Encoder()
    params = add_lora(net, LoraConfig(rank=2, target_modules=["to_q"]), enc, _Encoder())
    assert len(params) == 2 and not _names(enc) and not hasattr(enc, "peft_config")
    assert all(p.requires_grad for p in enc.parameters())  # not ours to freeze


def test_encoder_targets_are_not_checked_when_the_encoder_does_not_train():
    """Text-encoder targets that match nothing are no error while ``train_text_encoder`` is off: the
    encoder passed along is not adapted, so its targets are not looked at."""
    net, enc = _Net(), _Encoder()
    cfg = LoraConfig(target_modules=["to_q"], text_encoder_target_modules=["to_q"])  # nothing in _Encoder
    assert len(add_lora(net, cfg, enc)) == 2 and not hasattr(enc, "peft_config")


def test_train_text_encoder_without_one_is_refused():
    with pytest.raises(ValueError, match=r"^lora\.train_text_encoder needs the text encoder$"):
        add_lora(_Net(), LoraConfig(target_modules=["to_q"], train_text_encoder=True), None, None)


def test_targets_matching_nothing_are_refused_naming_the_field_and_nothing_is_injected():
    net, enc = _Net(), _Encoder()
    with pytest.raises(ValueError, match="^" + re.escape(
            "lora.target_modules ['attn', 'q'] matched no module of the UNet") + "$"):
        add_lora(net, LoraConfig(target_modules=["attn", "q"]))  # "q" is not a suffix of "to_q"
    bad_te = LoraConfig(target_modules=["to_q"], train_text_encoder=True,
                        text_encoder_target_modules=["to_q"])
    with pytest.raises(ValueError, match="^" + re.escape(
            "lora.text_encoder_target_modules ['to_q'] matched no module of the text encoder") + "$"):
        add_lora(net, bad_te, enc)
    assert not hasattr(net, "peft_config") and not hasattr(enc, "peft_config")
    assert all(p.requires_grad for p in [*net.parameters(), *enc.parameters()])
    wrapped = _Wrapped()  # a target matches as the last part of a dotted name
    assert len(add_lora(wrapped, LoraConfig(rank=2, target_modules=["to_k"]))) == 2
    assert _names(wrapped) == {"block.to_k.lora_A.default.weight", "block.to_k.lora_B.default.weight"}


def test_trainable_parameters_skips_none_and_frozen():
    net, enc = _Net(), _Encoder()
    net.to_k.requires_grad_(False)
    got = trainable_parameters(None, net, None, enc)
    want = [net.to_q.weight, net.to_q.bias, net.proj.weight, net.proj.bias, *enc.parameters()]
    assert [id(p) for p in got] == [id(p) for p in want]


def _adapted(dtype=torch.float64, *encoders, alpha: float = 4.0):
    net = _Net(dtype)
    cfg = LoraConfig(rank=2, alpha=alpha, target_modules=["to_q", "to_k"], train_text_encoder=bool(encoders),
                     text_encoder_target_modules=["q_proj"])
    add_lora(net, cfg, *encoders)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for m in (net, *encoders):
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 1.000000001)
    return net


def test_state_dicts_dtype_device_and_encoders():
    enc, enc2 = _Encoder(), _Encoder()
    net = _adapted(torch.float64, enc, enc2)
    states = lora_state_dicts(net, enc, enc2)
    assert set(states) == {"unet", "text_encoder", "text_encoder_2"}
    assert set(states["unet"]) == {f"{m}.lora_{ab}.weight" for m in ("to_q", "to_k") for ab in "AB"}
    assert set(states["text_encoder"]) == {"q_proj.lora_A.weight", "q_proj.lora_B.weight"}
    for state in states.values():
        assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in state.values())
    exact = lora_state_dicts(net, enc, enc2, dtype=None)
    assert all(v.dtype == torch.float64 for v in exact["unet"].values())
    assert torch.equal(exact["unet"]["to_q.lora_A.weight"], net.to_q.lora_A["default"].weight)
    assert not torch.equal(states["unet"]["to_q.lora_A.weight"].double(), exact["unet"]["to_q.lora_A.weight"])
    assert torch.equal(exact["text_encoder_2"]["q_proj.lora_B.weight"], enc2.q_proj.lora_B["default"].weight)
    assert set(lora_state_dicts(net, _Encoder(), None)) == {"unet"}  # an encoder without LoRA is left out
    assert set(lora_state_dicts(net, None, enc2)) == {"unet", "text_encoder_2"}


def test_saved_adapter_keys_metadata_and_canonical_header():
    enc = _Encoder()
    net = _adapted(torch.float32, enc, alpha=8.0)
    data = save_lora(net, enc)
    tensors = st_load(data)
    assert set(tensors) == ({f"unet.{m}.lora.{d}.weight" for m in ("to_q", "to_k") for d in ("down", "up")}
                            | {f"text_encoder.q_proj.lora_{ab}.weight" for ab in "AB"})
    assert torch.equal(tensors["unet.to_q.lora.down.weight"], net.to_q.lora_A["default"].weight)
    header, offset = read_safetensors_header(data)
    meta = json.loads(header["__metadata__"]["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 8.0 and meta["unet.r"] == 2
    assert meta["unet.target_modules"] == ["to_k", "to_q"]  # sorted, whatever the set order
    assert meta["text_encoder.lora_alpha"] == 8.0 and meta["text_encoder.target_modules"] == ["q_proj"]
    assert data == canonical_header(data)  # already canonical
    assert data == save_lora(net, enc)  # deterministic bytes
    assert offset % 8 == 0
    unet_header = read_safetensors_header(save_lora(net))[0]
    unet_only = json.loads(unet_header["__metadata__"]["lora_adapter_metadata"])
    assert not any(k.startswith("text_encoder") for k in unet_only) and unet_only["unet.r"] == 2


def test_sdxl_adapter_carries_the_second_encoder():
    enc, enc2 = _Encoder(), _Encoder()
    net = _adapted(torch.float32, enc, enc2)
    data = save_lora(net, enc, enc2)
    keys = set(st_load(data))
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert torch.equal(st_load(data)["text_encoder_2.q_proj.lora_B.weight"],
                       enc2.q_proj.lora_B["default"].weight)
    meta = json.loads(read_safetensors_header(data)[0]["__metadata__"]["lora_adapter_metadata"])
    assert meta["text_encoder_2.target_modules"] == ["q_proj"]


def test_canonical_header_sorts_pads_merges_and_keeps_tensor_bytes():
    tensors = {"b": torch.arange(3, dtype=torch.float32), "a": torch.ones(2, 2, dtype=torch.float64)}
    data = st_save(tensors, metadata={"zeta": "1", "alpha": "2"})
    header, offset = read_safetensors_header(data)
    (size,) = struct.unpack("<Q", data[:8])
    assert offset == 8 + size and header == json.loads(data[8:offset])
    assert header["__metadata__"] == {"zeta": "1", "alpha": "2"}

    out = canonical_header(data, {"alpha": "3", "new": "x"})
    new_header, new_offset = read_safetensors_header(out)
    text = out[8:new_offset]
    assert len(text) % 8 == 0
    assert text.rstrip(b" ") == json.dumps(new_header, sort_keys=True, separators=(",", ":")).encode()
    assert text == text.rstrip(b" ") + b" " * (len(text) - len(text.rstrip(b" ")))
    assert new_header["__metadata__"] == {"zeta": "1", "alpha": "3", "new": "x"}
    assert out[new_offset:] == data[offset:]
    loaded = st_load(out)
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    plain = canonical_header(st_save(tensors))  # no metadata, none added
    assert "__metadata__" not in read_safetensors_header(plain)[0]
    added = canonical_header(st_save(tensors), {"k": "v"})  # no metadata yet: the update is all of it
    assert read_safetensors_header(added)[0]["__metadata__"] == {"k": "v"}
    assert canonical_header(data, {}) == canonical_header(data)
    assert read_safetensors_header(canonical_header(data))[0]["__metadata__"] == {"zeta": "1", "alpha": "2"}
