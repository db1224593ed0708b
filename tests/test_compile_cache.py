"""The workspace compile cache: keys change with what the compiled code depends on, entries round
trip through storage, a damaged entry is refused, and torch's artifacts really warm a fresh process's
compile (inductor on CPU, one small function, separate local inductor cache directories).

Fast tier, no Ray.
"""

from __future__ import annotations

import pytest
import torch

from raydb.compile_cache import CompileCache, CompileCacheDamaged, compile_cache_key
from raydb.storage import Storage

BASE = {"model_identity": "tiny@abc", "device_name": "NVIDIA H200",
        "shapes": {"micro_batch": [2, 4, 64, 64], "accumulation": 1},
        "options": {"compile": "full", "backend": "inductor", "mixed_precision": "bf16"}}


def test_key_changes_with_each_part_and_only_then():
    key, parts = compile_cache_key(**BASE)
    assert key == compile_cache_key(**BASE)[0] and len(key) == 20
    assert parts["torch"] == torch.__version__
    changed = [
        {"model_identity": "tiny@def"},
        {"device_name": "NVIDIA H100 80GB HBM3"},
        {"shapes": {"micro_batch": [4, 4, 64, 64], "accumulation": 1}},
        {"options": {**BASE["options"], "mixed_precision": "fp16"}},
        {"torch_version": "2.99.0"},
    ]
    keys = {compile_cache_key(**(BASE | c))[0] for c in changed}
    assert key not in keys and len(keys) == len(changed)


def test_entry_round_trips_and_refuses_damage(tmp_path):
    storage, ws = Storage(), str(tmp_path / "ws")
    key, parts = compile_cache_key(**BASE)
    loaded: list[bytes] = []
    writer = CompileCache(storage, ws, key, parts, save_fn=lambda: (b"artifacts" * 10, None),
                          load_fn=loaded.append)
    reader = CompileCache(storage, ws, key, parts, save_fn=lambda: None, load_fn=loaded.append)
    assert reader.load() is False and not loaded  # cold: nothing there yet
    assert writer.save() is True and writer.save() is False  # once
    assert storage.read_json(writer.meta_uri)["device"] == "NVIDIA H200"
    assert reader.load() is True and loaded == [b"artifacts" * 10]
    assert reader.save() is False  # a warm run does not rewrite its entry
    storage.write_bytes(writer.bin_uri, b"artifacts" * 9 + b"xrtifacts")
    with pytest.raises(CompileCacheDamaged, match="compile cache.*SHA-256"):
        CompileCache(storage, ws, key, parts, load_fn=loaded.append).load()
    storage.delete(writer.bin_uri)
    with pytest.raises(CompileCacheDamaged, match=r"names no .*\.bin"):
        CompileCache(storage, ws, key, parts, load_fn=loaded.append).load()
    storage.write_bytes(writer.meta_uri, b'{"bytes": 90, "sha2')  # a manifest cut short
    with pytest.raises(CompileCacheDamaged, match="not valid JSON"):
        CompileCache(storage, ws, key, parts, load_fn=loaded.append).load()
    assert loaded == [b"artifacts" * 10]  # no damaged entry ever reached torch
    empty = CompileCache(storage, ws, "k" * 20, parts, save_fn=lambda: None)
    assert empty.save() is False and not storage.exists(empty.meta_uri)


def test_saved_artifacts_make_a_fresh_compile_hit_the_cache(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    def f(x, w):
        return torch.relu(x @ w).sum(-1)

    x, w = torch.randn(8, 16), torch.randn(16, 16, requires_grad=True)
    storage, ws = Storage(), str(tmp_path / "ws")
    key, parts = compile_cache_key(**BASE)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-a"))
    torch.compiler.reset()
    cold = CompileCache(storage, ws, key, parts)
    assert cold.load() is False
    torch.compile(f)(x, w).sum().backward()
    assert cold.save() is True
    # a "new process": no dynamo state, an empty local inductor cache, only the workspace entry
    torch.compiler.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-b"))
    counters.clear()
    warm = CompileCache(storage, ws, key, parts)
    assert warm.load() is True
    expected = f(x, w)
    torch.testing.assert_close(torch.compile(f)(x, w), expected)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1
    assert counters["inductor"].get("fxgraph_cache_miss", 0) == 0
    torch.compiler.reset()
