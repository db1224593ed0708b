"""The smaller benchmark scripts still run end to end on the tiny model (CPU): the serving engine
bench, the compile-parity check and the cached-latents benchmark. Speed is not asserted here."""

from __future__ import annotations

import json

import pytest

from bench import compile_parity, serve_engine_gpu, train_cache


def test_serve_engine_bench_runs_its_load_test(tmp_path):
    out = tmp_path / "serve.json"
    serve_engine_gpu.main(["--tiny", "--cpu", "--seconds", "0.3", "--concurrency", "1", "8",
                           "--steps", "2", "--repeats", "1", "--modes", "eager", "--load-modes", "eager",
                           "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["errors"] == {} and result["complete"]
    assert result["env"]["chip"] and result["date"] and result["fastest"]["batch_1"] == "eager"
    loads = {(r["load"], r["concurrency"], r["max_batch_size"]) for r in result["rows"]}
    assert len(loads) == 3 * 2 * 2 and all(r["requests"] > 0 for r in result["rows"])
    assert set(result["checks"]["eager"]) >= {"speedup_ok", "p50_ok"}


@pytest.mark.heavy
def test_compile_parity_reads_the_engines_gradients():
    """aot_eager compiles in tens of seconds on the CPU and matches eager exactly; the gradients the
    hook reads are the ones the engine reported (their norm is the step's grad_norm)."""
    result = compile_parity.main(["--compile", "full", "--backend", "aot_eager", "--resolution", "32"])
    assert result["ok"] and result["lora_tensors"] > 0 and result["mismatched"] == 0
    for arm in ("eager", "compiled"):
        assert result["grad_norm"][arm] == pytest.approx(result["engine_grad_norm"][arm], rel=1e-5)


def test_train_cache_times_both_arms():
    result = train_cache.main(["--resolution", "32", "--steps", "2", "--warmup", "1", "--chunk", "1"])
    assert result["steps"] == {"cached latents": 2, "VAE every step": 2}
    assert all(v > 0 for v in result["images_per_s"].values()) and result["speedup"] > 0
