"""The smaller benchmark scripts still run end to end on the tiny model (CPU): the serving engine
bench, the compile-parity check, the cached-latents benchmark and prior.mode's cost rows. Speed is
not asserted here."""

from __future__ import annotations

import json

import pytest

from bench import compile_parity, prior_cost, serve_engine_gpu, train_cache


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


@pytest.mark.heavy
def test_prior_cost_measures_both_modes_and_adds_them_up(tmp_path):
    out = tmp_path / "prior_cost.json"
    result = prior_cost.main(["--tiny", "--cpu", "--batch-sizes", "1", "--class-images", "10",
                              "--steps", "5", "--out", str(out)])
    assert result["errors"] == {} and result["complete"] and json.loads(out.read_text())["end_to_end"]
    rows = {(r["mode"], r["cuda_graphs_option"]): r for r in result["training"]}
    assert set(rows) == {("images", "auto"), ("model", "auto"), ("model", "off")}
    # the first step is at LoRA's identity init: model mode's prior term is exactly zero there, so its
    # loss is the instance term only and differs from image mode's; the eager row is the same math
    assert rows[("model", "auto")]["first_step_loss"] == rows[("model", "off")]["first_step_loss"]
    assert rows[("model", "auto")]["first_step_loss"] != rows[("images", "auto")]["first_step_loss"]
    [total] = result["end_to_end"]
    rate = result["generation"][0]["images_per_s"]
    assert total["prior_stage_s"] == pytest.approx(10 / rate, abs=0.06)
    assert total["seconds_images"] == pytest.approx(
        total["prior_stage_s"] + 5 * rows[("images", "auto")]["step_ms_median"] / 1000, abs=0.1)
    model_step_s = rows[("model", "auto")]["step_ms_median"] / 1000
    assert total["seconds_model"] == pytest.approx(5 * model_step_s, abs=0.06)
    assert "End to end" in prior_cost.render(result)
