"""What prior preservation costs end to end, per ``prior.mode``: the GPU rows at SD 1.5 size.

``images`` pays a prior stage before training — ``prior.num_class_images`` samplings of the class
prompt — and then trains on ``[instance | class]``; ``model`` generates nothing, and each step runs
one extra gradient-free forward of the prior rows through the base model (every LoRA layer off).
Which wins end to end depends on how many class images and how many steps a run has, so this
script measures the two rates and reports the totals for the counts asked:

* ``generation``: prior-stage images/s (``bench/generation.py``: the family's pipeline, seeded
  generators per image, 25 steps, CFG 7.5, PIL output) at ``--gen-batches`` images per call;
* ``training``: seconds per step of the shipped ``TrainEngine`` (``bench/training.py``; on CUDA the
  CUDA-graph step, as users get it) in each mode at ``--batch-sizes`` instance images per step,
  plus, in model mode at the first batch size, the eager step (``cuda_graphs=off``): its first
  steps' losses must equal the graph step's (same init, same batches: same math);
* ``end_to_end``: for each ``--class-images`` x ``--steps``, ``seconds_images`` = prior stage
  (``class images / best images/s``) + steps x step time, ``seconds_model`` = steps x step time,
  and their ratio (the prior stage runs once per class and is cached, so a second subject of the
  same class pays only the training: ``seconds_images_cached``).

The tiny model on the CPU (``--tiny``) runs the same code in seconds (the smoke test); its figures
are no GPU's. SD 1.5's architecture with random weights: speed only, nothing about quality (for
that, ``bench/fidelity.py`` on the learned ``digits`` base).

    python -m bench.prior_cost --out bench/results/prior_cost.json      # on a GPU
    python -m bench.prior_cost --tiny --out /tmp/prior_cost_tiny.json    # CPU smoke run
    python -m bench.prior_cost --render bench/results/prior_cost.json    # tables
    python -m bench.prior_cost --digits --out /tmp/prior_cost_digits.json  # CPU, learned base

``--digits`` measures the CPU rates instead with :func:`interleaved_costs` on the learned ``digits``
base at raydb's *default* prior and training settings (class images: 25 steps, guidance 7.5, 4 per
call; training: batch 1 + 1) and the bench's subject, and adds them up for ``--class-images`` x
``--steps`` (``class images`` there counts the held-out ones a plain run generates too). That is the
other side of ``bench/fidelity.py``'s cost line, which measures the bench's own settings (guidance
1, 20 per call, batch 5 + 5) — the two bracket where ``model`` mode pays off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import training  # noqa: E402
from bench.generation import pipeline, render_generation, run_generation  # noqa: E402
from bench.harness import Run, add_common_args, markdown_table  # noqa: E402
from raydb.config import RaydbConfig  # noqa: E402
from raydb.models.architectures import sd15  # noqa: E402
from raydb.models.tiny import tiny_architecture  # noqa: E402
from raydb.storage import Storage  # noqa: E402
from raydb.train.data import TrainingData  # noqa: E402

MODES = ("images", "model")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, out="bench/results/prior_cost.json", budget_s=420.0, reserve_s=20.0, max_steps=40)
    p.add_argument("--render", metavar="JSON", help="print the markdown tables of a result file and exit")
    p.add_argument("--digits", action="store_true",
                   help="CPU rates on the learned digits base at raydb's default settings (see above)")
    p.add_argument("--rounds", type=int, default=30, help="--digits: interleaved rounds")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="instance images per step")
    p.add_argument("--gen-batches", type=int, nargs="+", default=[8], help="images per pipeline call")
    p.add_argument("--gen-steps", type=int, default=25)
    p.add_argument("--gen-calls", type=int, default=3)
    p.add_argument("--class-images", type=int, nargs="+", default=[100, 200],
                   help="prior.num_class_images of the end-to-end totals")
    p.add_argument("--steps", type=int, nargs="+", default=[400, 1000],
                   help="train.max_steps of the end-to-end totals")
    args = p.parse_args(argv)
    if args.tiny:  # a smoke run of a few seconds on two CPU cores
        args.gen_steps, args.gen_calls, args.gen_batches = 2, 1, [2]
        args.warmup, args.min_steps, args.min_seconds = 1, 2, 0.0
    return args


def model_mode_data(data: TrainingData) -> TrainingData:
    """``data`` as model mode without a pool trains on it: no class images; each prior row repeats
    its instance row under the class prompt."""
    return dataclasses.replace(data, class_=None, class_time_ids=None, prior_from_instance=True)


def run_training(run: Run, parts: training.Frozen) -> None:
    a = run.args
    cached = training.training_data(run, parts, cached=True)
    data = {"images": cached, "model": model_mode_data(cached)}
    run.results["training"] = []
    arms = [(mode, b, "auto") for b in a.batch_sizes for mode in MODES]
    arms.insert(2, ("model", a.batch_sizes[0], "off"))  # same math as the graph step, and its speed
    for mode, batch, graphs in arms:

        def one(mode=mode, batch=batch, graphs=graphs) -> None:
            cfg = training.train_config(run, batch, cuda_graphs=graphs)
            cfg.prior.mode = mode
            with training.make_engine(run, cfg, training.unet(run), parts.vae, data[mode]) as engine:
                row = training.measure(run, engine)
            run.results["training"].append({"mode": mode, "batch": batch, "cuda_graphs_option": graphs,
                                            **row})
            print(f"    {mode} {batch}+{batch} ({'graphs' if row['cuda_graphs'] else 'eager'}): "
                  f"{row['step_ms_median']:.1f} ms/step", flush=True)

        run.measure(f"training {mode} {batch}+{batch} cuda_graphs={graphs}", one, needs_s=a.reserve_s)


def interleaved_costs(cfg: RaydbConfig, storage: Storage | None = None, *, rounds: int = 20,
                      blocks: int = 2) -> dict[str, Any]:
    """The same costs for one real config in this process (the CPU rows of ``bench/fidelity.py``):
    an image-mode step, a model-mode step (both the shipped ``TrainEngine`` on ``cfg``'s model, data
    and batch) and a prior-stage block (the shipped ``BlockGenerator``: one CPU actor, one thread,
    as the prior stage runs by default), interleaved round by round so a change in the machine's
    load hits all three alike; medians. Image mode's class images must exist (the prior cache of
    ``cfg``); the timed blocks go to a scratch workspace, never to ``cfg``'s cache.
    """
    import statistics
    import tempfile
    import time

    from raydb.models.components import load_components
    from raydb.prior.generate import BlockGenerator
    from raydb.prior.stage import resolve_prior_cache
    from raydb.train.engine import TrainEngine
    from raydb.train.local import prepare_training_data
    from raydb.train.step import build_train_state, weights_dtype

    storage = storage or Storage(cfg.s3_endpoint_url)
    engines = {}
    for mode in MODES:
        mode_cfg = cfg.model_copy(deep=True)
        mode_cfg.prior.mode = mode
        # the engine builds batches up to max_steps; the warm-up and the rounds must fit
        mode_cfg.train.max_steps = max(mode_cfg.train.max_steps, rounds + 1)
        comps = load_components(mode_cfg.model, storage, mode_cfg.workspace,
                                dtype=weights_dtype(mode_cfg.train))
        data = prepare_training_data(mode_cfg, comps, storage)
        state = build_train_state(mode_cfg, comps.unet, comps.text_encoder, comps.text_encoder_2)
        engines[mode] = TrainEngine(mode_cfg, state, data, noise_scheduler=comps.noise_scheduler,
                                    prediction_type=comps.prediction_type, vae=comps.vae, device="cpu")
    times: dict[str, list[float]] = {"images": [], "model": [], "block": []}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            gen_cfg = cfg.model_copy(deep=True)
            gen_cfg.workspace = scratch
            cache = resolve_prior_cache(gen_cfg, storage, use_ray=False)
            generator = BlockGenerator(gen_cfg.to_dict(), cache.__dict__, storage.endpoint_url)
            generator({"block": np.array([0])})  # warm-up: kernels, allocator, the PNG path
            for engine in engines.values():
                engine.step()
            every = max(1, rounds // max(blocks, 1))
            for r in range(rounds):
                for mode, engine in engines.items():
                    start = time.perf_counter()
                    engine.step()
                    times[mode].append(time.perf_counter() - start)
                if blocks and r % every == 0 and len(times["block"]) < blocks:
                    out = generator({"block": np.array([1 + len(times["block"])])})
                    times["block"].append(float(out["seconds"][0]))
    finally:
        for engine in engines.values():
            engine.close()
    images, model = statistics.median(times["images"]), statistics.median(times["model"])
    out = {"rounds": rounds, "step_s_images": round(images, 4), "step_s_model": round(model, 4),
           "model_over_images_step": round(model / images, 3),
           "images_per_step": 2 * cfg.train.batch_size * cfg.train.gradient_accumulation_steps,
           "torch_threads": torch.get_num_threads()}
    if times["block"]:
        per_image = statistics.median(times["block"]) / cache.block_size
        out |= {"blocks": len(times["block"]), "block_size": cache.block_size,
                "seconds_per_class_image": round(per_image, 4),
                "generator_threads": cache.settings["cpu_threads"]}
    return out


def totals(costs: dict[str, Any], *, class_images: int, steps: int) -> dict[str, Any]:
    """End-to-end seconds from :func:`interleaved_costs`: image mode = prior stage + training,
    model mode = training."""
    prior = class_images * costs["seconds_per_class_image"]
    seconds_images, seconds_model = prior + steps * costs["step_s_images"], steps * costs["step_s_model"]
    return {"prior_stage_seconds": round(prior, 1),
            "train_seconds_images": round(steps * costs["step_s_images"], 1),
            "seconds_images": round(seconds_images, 1), "seconds_model": round(seconds_model, 1),
            "images_over_model": round(seconds_images / seconds_model, 3)}


def digits_config(workspace: str, num_class_images: int = 100) -> RaydbConfig:
    """The learned base and ``bench/fidelity.py``'s subject at raydb's default prior and training
    settings (32 px, fp32: the CPU)."""
    from bench.fidelity import SETTINGS
    from raydb.config import load_config

    return load_config(data={
        "workspace": workspace, "model": SETTINGS["model"], "subject": SETTINGS["subject"],
        "prior": {"num_class_images": num_class_images},
        "train": {"resolution": 32, "mixed_precision": "no", "num_sample_images": 0,
                  "checkpoint_every": 10_000}})


def cpu_end_to_end(costs: dict[str, Any], cfg: RaydbConfig, class_images: list[int],
                   steps: list[int]) -> list[dict[str, Any]]:
    """:func:`totals` for each ``class_images`` x ``steps``; the class images a plain image-mode
    run generates are ``n + prior.num_holdout``."""
    from raydb.prior.stage import prior_total_images

    rows = []
    for n in class_images:
        counted = cfg.model_copy(deep=True)
        counted.prior.num_class_images = n
        generated = prior_total_images(counted)
        for s in steps:
            rows.append({"class_images": generated, "steps": s}
                        | totals(costs, class_images=generated, steps=s))
    return rows


def run_digits(args: argparse.Namespace) -> dict[str, Any]:
    import datetime as dt
    import tempfile

    from bench.harness import environment

    with tempfile.TemporaryDirectory() as tmp:
        cfg = digits_config(tmp)
        costs = interleaved_costs(cfg, rounds=args.rounds, blocks=3)
    p, t = cfg.prior, cfg.train
    out = {"schema": 1, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "env": environment(torch.device("cpu")), "model": "digits (CPU)",
           "settings": {"gen_steps": p.num_inference_steps, "guidance_scale": p.guidance_scale,
                        "gen_batch": p.sample_batch_size, "batch": t.batch_size,
                        "resolution": t.resolution, "num_holdout": p.num_holdout},
           "costs": costs, "cpu_end_to_end": cpu_end_to_end(costs, cfg, args.class_images, args.steps)}
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    return out


def end_to_end(results: dict[str, Any], class_images: list[int], steps: list[int]) -> list[dict[str, Any]]:
    """Totals from the measured rates: the prior stage at the best generation rate, training at the
    default engine's (graphs where they run) median step, per batch size."""
    gen = [r["images_per_s"] for r in results.get("generation") or []]
    step_ms = {(r["mode"], r["batch"]): r["step_ms_median"]
               for r in results.get("training") or [] if r["cuda_graphs_option"] == "auto"}
    rows = []
    if not gen:
        return rows
    rate = max(gen)
    for batch in sorted({b for _, b in step_ms}):
        if ("images", batch) not in step_ms or ("model", batch) not in step_ms:
            continue
        s_images, s_model = step_ms[("images", batch)] / 1000, step_ms[("model", batch)] / 1000
        for n in class_images:
            prior_s = n / rate
            for s in steps:
                seconds_images, seconds_model = prior_s + s * s_images, s * s_model
                rows.append({"batch": batch, "class_images": n, "steps": s,
                             "prior_stage_s": round(prior_s, 1),
                             "step_s_images": round(s_images, 4), "step_s_model": round(s_model, 4),
                             "seconds_images": round(seconds_images, 1),
                             "seconds_images_cached": round(s * s_images, 1),
                             "seconds_model": round(seconds_model, 1),
                             "images_over_model": round(seconds_images / seconds_model, 3)})
    return rows


def _step_kind(row: dict[str, Any]) -> str:
    kind = "graphs" if row["cuda_graphs"] else "eager"
    return kind + (" (default)" if row.get("cuda_graphs_option") == "auto" else "")


def render(results: dict[str, Any]) -> str:
    env = results.get("env", {})
    lines = [f"# prior.mode cost: {results.get('model')} on {env.get('chip')} ({results.get('date')})", ""]
    lines += render_generation(results)
    train_rows = results.get("training") or []
    if train_rows:
        lines += ["Training step (shipped TrainEngine, cached latents):", ""]
        lines += markdown_table(
            ["mode", "instance + prior", "step", "ms/step (median)", "images/s", "first-step loss",
             "peak GB"],
            [[r["mode"], f"{r['batch']} + {r['batch']}", _step_kind(r),
              f"{r['step_ms_median']:.1f}", f"{r['images_per_s']:.1f}", r.get("first_step_loss"),
              r["peak_mem_gb"]] for r in train_rows])
        lines.append("")
    e2e = results.get("end_to_end") or []
    if e2e:
        lines += ["End to end (prior stage + training; 'cached': the class's images already made):", ""]
        lines += markdown_table(
            ["batch", "class images", "steps", "prior stage s", "images s", "images s (cached)", "model s",
             "images / model"],
            [[r["batch"], r["class_images"], r["steps"], r["prior_stage_s"], r["seconds_images"],
              r["seconds_images_cached"], r["seconds_model"], f"{r['images_over_model']:.2f}x"] for r in e2e])
        lines.append("")
    cpu = results.get("cpu_end_to_end") or []
    if cpu:
        c, st = results["costs"], results["settings"]
        lines += [f"CPU rates, interleaved ({c['rounds']} rounds, {c['torch_threads']} torch thread(s)): "
                  f"image-mode step {c['step_s_images'] * 1000:.1f} ms, model-mode step "
                  f"{c['step_s_model'] * 1000:.1f} ms ({c['model_over_images_step']:.2f}x), class image "
                  f"{c['seconds_per_class_image']:.3f} s ({st['gen_steps']} steps, guidance "
                  f"{st['guidance_scale']:g}, {st['gen_batch']} per call); "
                  f"batch {st['batch']} + {st['batch']}",
                  ""]
        lines += markdown_table(
            ["class images", "steps", "prior stage s", "images s", "model s", "images / model"],
            [[r["class_images"], r["steps"], r["prior_stage_seconds"], r["seconds_images"],
              r["seconds_model"], f"{r['images_over_model']:.2f}x"] for r in cpu])
        lines.append("")
    if results.get("errors"):
        lines += ["Errors: " + json.dumps(results["errors"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        with open(args.render) as fh:
            print(render(json.load(fh)))
        return {}
    if args.digits:
        out = run_digits(args)
        print(render(out))
        return out
    run = Run(args, tiny_architecture() if args.tiny else sd15())
    r = run.results
    r["model"] = "tiny" if args.tiny else "sd15-architecture-random-weights"
    r["cuda"] = run.cuda
    r["settings"] = {"resolution": run.resolution, "mixed_precision": run.mixed_precision,
                     "batch_sizes": args.batch_sizes, "gen_batches": args.gen_batches,
                     "gen_steps": args.gen_steps, "class_images": args.class_images, "steps": args.steps}
    parts = training.frozen(run)
    run_generation(run, pipeline(run, parts), family="sd")
    run_training(run, parts)
    r["end_to_end"] = end_to_end(r, args.class_images, args.steps)
    out = run.finish()
    print(render(out))
    return out


if __name__ == "__main__":
    main()
