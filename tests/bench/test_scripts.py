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


@pytest.mark.heavy
def test_interleaved_costs_time_both_modes_and_a_prior_block_without_touching_the_cache(make_cfg):
    """The CPU cost rows bench/fidelity.py reads: one real config, both engines and the prior-stage
    generator timed round by round; the timed blocks go to a scratch workspace."""
    from raydb.prior.stage import resolve_prior_cache
    from raydb.storage import Storage

    cfg = make_cfg(train={"max_steps": 2}, prior={"num_class_images": 2, "sample_batch_size": 2})
    costs = prior_cost.interleaved_costs(cfg, rounds=3, blocks=1)
    assert costs["rounds"] == 3 and costs["blocks"] == 1 and costs["block_size"] == 2
    assert costs["step_s_images"] > 0 and costs["step_s_model"] > 0 and costs["seconds_per_class_image"] > 0
    assert costs["model_over_images_step"] == pytest.approx(costs["step_s_model"] / costs["step_s_images"],
                                                            rel=1e-2)
    assert costs["images_per_step"] == 2 * cfg.train.batch_size
    # image mode read the config's cache (its one block, made for it); the timed block (block 1)
    # went to the scratch workspace, not there
    cache = resolve_prior_cache(cfg, Storage(), use_ray=False)
    assert cache.missing_blocks(Storage(), 4) == [1]
    total = prior_cost.totals(costs, class_images=10, steps=7)
    assert total["seconds_images"] == pytest.approx(10 * costs["seconds_per_class_image"]
                                                    + 7 * costs["step_s_images"], abs=0.11)
    assert total["seconds_model"] == pytest.approx(7 * costs["step_s_model"], abs=0.06)


def test_cpu_end_to_end_counts_the_held_out_images_a_plain_run_generates(tmp_path):
    """--digits' rows: image mode pays for n + prior.num_holdout class images, model mode for none."""
    cfg = prior_cost.digits_config(str(tmp_path))
    assert (cfg.model.pretrained, cfg.prior.guidance_scale, cfg.train.batch_size) == ("digits", 7.5, 1)
    costs = {"step_s_images": 0.02, "step_s_model": 0.03, "seconds_per_class_image": 0.25,
             "model_over_images_step": 1.5, "rounds": 30, "torch_threads": 1}
    rows = prior_cost.cpu_end_to_end(costs, cfg, [100], [400, 1000])
    holdout = cfg.prior.num_holdout
    assert [(r["class_images"], r["steps"]) for r in rows] == [(100 + holdout, 400), (100 + holdout, 1000)]
    assert rows[0]["seconds_images"] == pytest.approx((100 + holdout) * 0.25 + 400 * 0.02, abs=0.1)
    assert rows[1]["seconds_model"] == pytest.approx(30.0)
    settings = {"gen_steps": 25, "guidance_scale": 7.5, "gen_batch": 4, "batch": 1}
    text = prior_cost.render({"model": "digits (CPU)", "costs": costs, "cpu_end_to_end": rows,
                              "settings": settings})
    assert f"| {100 + holdout} | 400 |" in text and "guidance 7.5" in text
