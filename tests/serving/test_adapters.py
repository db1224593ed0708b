"""Reading a registered adapter defensively (no Ray): format, base model, family, integrity, header.

Every rejection is checked by its class (the HTTP status the server answers with) *and* its message,
because the message is what an operator reads in the log.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save as save_safetensors

from raydb.serving.adapters import (
    AdapterCorrupt,
    AdapterError,
    AdapterGone,
    AdapterMismatch,
    FailureCache,
    read_adapter,
)
from raydb.serving.status import http_status
from raydb.storage import Storage

IDENTITY = "tiny-sd@abc123"
WEIGHTS = {"unet.down.lora_A.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


def _write(tmp_path, meta: dict | str | None, weights: bytes | None, name: str = "v0001") -> str:
    d = tmp_path / name
    d.mkdir()
    if meta is not None:
        (d / "adapter.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    if weights is not None:
        (d / "pytorch_lora_weights.safetensors").write_bytes(weights)
    return str(d)


def _weights(lora_config: dict | None = None) -> bytes:
    metadata = {"lora_adapter_metadata": json.dumps(lora_config)} if lora_config is not None else None
    return save_safetensors(WEIGHTS, metadata=metadata)


def _meta(data: bytes, **extra) -> dict:
    meta = {"format": "diffusers-lora-v1", "weights": "pytorch_lora_weights.safetensors",
            "weights_sha256": hashlib.sha256(data).hexdigest(),
            "base_model": {"identity": IDENTITY, "family": "sd"}}
    meta.update(extra)
    return meta


def test_a_good_adapter_reads_back_its_meta_weights_and_lora_config(tmp_path):
    data = _weights({"unet.r": 4, "unet.lora_alpha": 8})
    meta, state, lora_config = read_adapter(Storage(), _write(tmp_path, _meta(data), data), IDENTITY)
    assert meta == _meta(data)
    assert list(state) == list(WEIGHTS) and torch.equal(state["unet.down.lora_A.weight"],
                                                         WEIGHTS["unet.down.lora_A.weight"])
    assert lora_config == {"unet.r": 4, "unet.lora_alpha": 8}


def test_defaults_format_weights_name_and_family_and_header_without_lora_config(tmp_path):
    """An adapter.json without ``format``/``weights``/``family`` (older adapters) reads as SD,
    diffusers-lora-v1, the fixed weights name; a header without LoRA metadata gives ``{}``."""
    data = _weights(None)
    meta = {"weights_sha256": hashlib.sha256(data).hexdigest(), "base_model": {"identity": IDENTITY}}
    got_meta, _, lora_config = read_adapter(Storage(), _write(tmp_path, meta, data), IDENTITY)
    assert got_meta == meta and lora_config == {}
    with pytest.raises(AdapterMismatch, match="sd model family"):
        read_adapter(Storage(), _write(tmp_path, meta, data, "v2"), IDENTITY, family="sdxl")


@pytest.mark.parametrize(("change", "message"), [
    ({"format": "kohya"}, "unsupported format 'kohya' or weights file 'pytorch_lora_weights.safetensors' "
                          "\\(expected diffusers-lora-v1, pytorch_lora_weights.safetensors\\)"),
    ({"weights": "../other.safetensors"}, "unsupported format 'diffusers-lora-v1' or weights file "
                                          "'../other.safetensors'"),
])
def test_another_format_or_weights_file_is_corrupt(tmp_path, change, message):
    data = _weights()
    with pytest.raises(AdapterCorrupt, match=f"^adapter.json: {message}"):
        read_adapter(Storage(), _write(tmp_path, _meta(data, **change), data), IDENTITY)


def test_unreadable_or_non_object_adapter_json_is_corrupt(tmp_path):
    data = _weights()
    with pytest.raises(AdapterCorrupt, match="^adapter.json is unreadable: "):
        read_adapter(Storage(), _write(tmp_path, "{not json", data), IDENTITY)
    with pytest.raises(AdapterCorrupt, match="^adapter.json is unreadable: adapter.json is not an object$"):
        read_adapter(Storage(), _write(tmp_path, "[1, 2]", data, "v2"), IDENTITY)


def test_missing_files_are_gone_not_corrupt(tmp_path):
    data = _weights()
    with pytest.raises(AdapterGone, match="^adapter files missing: .*adapter.json"):
        read_adapter(Storage(), _write(tmp_path, None, data), IDENTITY)
    with pytest.raises(AdapterGone, match="^adapter files missing: .*pytorch_lora_weights"):
        read_adapter(Storage(), _write(tmp_path, _meta(data), None, "v2"), IDENTITY)


def test_another_base_model_or_family_is_a_mismatch(tmp_path):
    data = _weights()
    other = _meta(data, base_model={"identity": "other@1", "family": "sd"})
    with pytest.raises(AdapterMismatch, match=f"^adapter was trained on base model 'other@1', "
                                              f"this server runs '{IDENTITY}'$"):
        read_adapter(Storage(), _write(tmp_path, other, data), IDENTITY)
    sdxl = _meta(data, base_model={"identity": IDENTITY, "family": "sdxl"})
    with pytest.raises(AdapterMismatch, match=f"^adapter is for the sdxl model family "
                                              f"\\(base '{IDENTITY}'\\); this server runs "
                                              f"an sd model \\('{IDENTITY}'\\)$"):
        read_adapter(Storage(), _write(tmp_path, sdxl, data, "v2"), IDENTITY)
    no_base = {k: v for k, v in _meta(data).items() if k != "base_model"}
    with pytest.raises(AdapterMismatch, match="base model None"):
        read_adapter(Storage(), _write(tmp_path, no_base, data, "v3"), IDENTITY)
    assert http_status(AdapterMismatch("x")) == 409


def test_weights_must_match_their_sha256_and_parse(tmp_path):
    data = _weights()
    bad_sum = _meta(data, weights_sha256=hashlib.sha256(b"x").hexdigest())
    with pytest.raises(AdapterCorrupt, match=r"^adapter weights failed their integrity check \(sha256"):
        read_adapter(Storage(), _write(tmp_path, bad_sum, data), IDENTITY)
    no_sum = {k: v for k, v in _meta(data).items() if k != "weights_sha256"}
    with pytest.raises(AdapterCorrupt, match="integrity check"):
        read_adapter(Storage(), _write(tmp_path, no_sum, data, "v2"), IDENTITY)
    garbage = b"\x08\x00\x00\x00\x00\x00\x00\x00not-json"
    with pytest.raises(AdapterCorrupt, match="^adapter weights are not valid safetensors: "):
        read_adapter(Storage(), _write(tmp_path, _meta(garbage), garbage, "v3"), IDENTITY)
    assert [http_status(e("x")) for e in (AdapterCorrupt, AdapterGone, AdapterError)] == [500, 503, 500]


def test_public_messages_name_no_paths_or_models():
    for cls in (AdapterError, AdapterMismatch, AdapterCorrupt, AdapterGone):
        assert IDENTITY not in cls.public and "/" not in cls.public and cls.public


def test_failure_cache_remembers_for_ttl_then_forgets():
    now = [100.0]
    cache = FailureCache(ttl_s=5.0, clock=lambda: now[0], size=2)
    err = AdapterCorrupt("x")
    assert cache.get("a@v1") is None
    cache.put("a@v1", err)
    now[0] = 104.999
    assert cache.get("a@v1") is err
    now[0] = 105.0  # expiry is inclusive: at put time + ttl it is gone
    assert cache.get("a@v1") is None
    cache.put("a@v1", err)  # a fresh failure after expiry is remembered again
    assert cache.get("a@v1") is err


def test_failure_cache_keeps_the_most_recent_entries_up_to_its_size():
    now = [0.0]
    cache = FailureCache(ttl_s=60.0, clock=lambda: now[0], size=2)
    errors = {name: AdapterCorrupt(name) for name in "abc"}
    cache.put("a", errors["a"])
    cache.put("b", errors["b"])
    cache.put("a", errors["a"])  # touched again: now the newest
    cache.put("c", errors["c"])  # evicts the oldest, b
    assert cache.get("b") is None
    assert cache.get("a") is errors["a"] and cache.get("c") is errors["c"]


def test_failure_cache_with_zero_ttl_remembers_nothing():
    cache = FailureCache(ttl_s=0.0, clock=lambda: 0.0)
    cache.put("a", AdapterCorrupt("x"))
    assert cache.get("a") is None
    assert FailureCache(ttl_s=1.0).size == 256


def test_failure_cache_ttl_below_one_second_still_remembers():
    now = [0.0]
    cache = FailureCache(ttl_s=0.5, clock=lambda: now[0])
    err = AdapterCorrupt("x")
    cache.put("a", err)
    assert cache.get("a") is err


class _Pool:
    def __init__(self) -> None:
        self.unloaded: list[str] = []
        self.evictions: list[object] = []

    def unload(self, adapter) -> None:
        self.unloaded.append(adapter.name)

    def evicted(self, adapter) -> None:
        self.evictions.append(adapter)


def test_loaded_adapter_records_what_it_is():
    from raydb.serving.adapters import LoadedAdapter

    meta = {"subject": {"tenant": "t1"}}
    adapter = LoadedAdapter(_Pool(), "adapter3", "alice", "v0002", meta, slot=3)
    assert (adapter.name, adapter.subject_id, adapter.version, adapter.adapter_id, adapter.slot) == (
        "adapter3", "alice", "v0002", "alice@v0002", 3)
    assert adapter.metadata is meta and adapter.loaded is True
    assert LoadedAdapter(_Pool(), "a", "bob", "v0001", {}).slot is None


def test_two_users_keep_an_evicted_adapter_until_both_release():
    """Deliberate break caught: ``acquire`` setting the count to 1 instead of adding one (the first
    release would unload an adapter another request is still denoising with)."""
    from raydb.serving.adapters import LoadedAdapter

    pool = _Pool()
    adapter = LoadedAdapter(pool, "adapter0", "alice", "v0001", {})
    adapter.acquire()
    adapter.acquire()
    adapter.__del__()  # evicted by Serve's LRU while both hold it
    assert pool.evictions == [adapter]  # the pool hears of the eviction at once, with the adapter
    assert adapter.release() is False and adapter.loaded is True
    assert adapter.release() is True and adapter.loaded is False
    assert adapter.release() is False  # never twice


def test_an_unused_adapter_is_not_unloaded_before_eviction_and_pools_need_no_eviction_hook():
    from raydb.serving.adapters import LoadedAdapter

    class BarePool:  # no ``evicted``: only ``unload``
        def __init__(self) -> None:
            self.unloaded: list[str] = []

        def unload(self, adapter) -> None:
            self.unloaded.append(adapter.name)

    pool = BarePool()
    adapter = LoadedAdapter(pool, "adapter0", "alice", "v0001", {})
    adapter.acquire()
    assert adapter.release() is False and adapter.loaded is True  # in use, then idle: not evicted
    adapter.__del__()
    assert pool.unloaded == ["adapter0"] and adapter.loaded is False
