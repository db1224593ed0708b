"""Does DreamBooth learn the subject, and does prior preservation keep the class? Measured.

Usage: python -m bench.fidelity [--quick] [--samples 50] [--steps 2000] [--grid docs/fidelity.png]
                                [--arms l0,l1,model] [--no-costs] [--workspace DIR] [--json out.json]

The ``digits`` base model (trained on real handwritten digits) learns the built-in subject
``builtin:red-three`` (five real threes in red ink on yellow — a colouring the base never drew) with
LoRA, without prior preservation (λ = 0), with it from generated class images (λ = 1, ``prior.mode:
images``) and with it from the base model's own prediction (λ = 1, ``prior.mode: model``, no class
images): same seeds, steps, batches and learning rate, through raydb's own trainer. Then, from images
sampled with fixed seeds and no guidance (:mod:`raydb.fidelity.experiment`), the judge (a digit
classifier and the trait detector) measures subject fidelity, language drift, class accuracy,
diversity and the other digits' accuracy, beside each run's held-out validation losses. A table
goes to stdout; the last line is one JSON object (keys ``<figure>_<arm>``, e.g. ``drift_l1``, each
fraction's binomial standard error as ``<figure>_<arm>_se``). ``--quick`` (fewer steps and samples)
runs in a few minutes on 2 CPU cores: a smoke run of the whole path, whose figures are not the
finding's.

What each prior mode costs end to end on this machine (unless ``--no-costs``): image mode = the
prior stage (the class images a plain run generates: ``num_class_images + num_holdout``) + steps x
its step time, model mode = steps x its step time (no prior stage). The rates come from
:func:`bench.prior_cost.interleaved_costs` on this bench's config — the shipped ``TrainEngine`` in
each mode and the shipped prior-stage generator, interleaved round by round so the machine's load
hits all three alike (the arms' own ``train_seconds`` do not: they run minutes apart). JSON keys
``seconds_images``, ``seconds_model``, ``images_over_model`` and the rates behind them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The comparison's settings: the base config every arm starts from (arms add their overrides).
SETTINGS = {
    "model": {"pretrained": "digits"},
    "subject": {"id": "red-three", "tenant": "bench", "instance_data": "builtin:red-three",
                "instance_prompt": "a drawing of sks three", "class_prompt": "a drawing of a three"},
    # class images from the base model itself, sampled like the figures' images (no guidance)
    "prior": {"num_class_images": 100, "num_holdout": 20, "sample_batch_size": 20,
              "num_inference_steps": 25, "guidance_scale": 1.0, "seed": 0},
    "lora": {"rank": 8},
    "train": {"resolution": 32, "batch_size": 5, "max_steps": 2000, "learning_rate": 1e-3,
              "lr_scheduler": "constant", "checkpoint_every": 10_000, "num_sample_images": 0,
              "mixed_precision": "no", "seed": 0},
}
QUICK = {"steps": 300, "learning_rate": 4e-3, "samples": 20, "other_samples": 8, "num_class_images": 40}

# Figures of each arm in the JSON line, as <figure>_<arm> (and <figure>_<arm>_se where there is one).
ARM_FIGURES = ("subject_fidelity", "drift", "class_accuracy", "diversity_ratio", "other_class_accuracy",
               "other_class_trait", "fidelity_score", "val_instance", "val_prior", "val_score",
               "train_seconds")  # train_seconds: ~0 when the workspace already held the finished run


def bench_config(workspace: str, *, steps: int, learning_rate: float, num_class_images: int):
    from raydb.config import load_config

    data = json.loads(json.dumps(SETTINGS))
    data["workspace"] = workspace
    data["train"].update(max_steps=steps, learning_rate=learning_rate)
    data["prior"]["num_class_images"] = num_class_images
    return load_config(data=data)


def prior_costs(cfg, *, steps: int, rounds: int, blocks: int) -> dict:
    """End-to-end seconds of a ``steps``-step run in each prior mode from rates measured now
    (:func:`bench.prior_cost.interleaved_costs`; image mode's class images are read from ``cfg``'s
    prior cache, made by then). Keys: the rates (``step_s_images``, ``step_s_model``,
    ``seconds_per_class_image``), ``class_images`` (what image mode's prior stage generates),
    ``prior_stage_seconds``, ``train_seconds_images``, ``seconds_images``, ``seconds_model``,
    ``images_over_model``."""
    from bench.prior_cost import interleaved_costs
    from raydb.prior.stage import prior_total_images

    images_cfg, model_cfg = cfg.model_copy(deep=True), cfg.model_copy(deep=True)
    images_cfg.prior.mode, model_cfg.prior.mode = "images", "model"
    if prior_total_images(model_cfg):  # what makes the comparison: model mode has no prior stage
        raise AssertionError("prior.mode: model would generate class images")
    costs = interleaved_costs(images_cfg, rounds=rounds, blocks=blocks)
    class_images = prior_total_images(images_cfg)
    return cost_figures(costs, class_images=class_images, steps=steps)


def cost_figures(costs: dict, *, class_images: int, steps: int) -> dict:
    """The JSON line's cost keys from :func:`bench.prior_cost.interleaved_costs`' rates."""
    from bench.prior_cost import totals

    keep = ("step_s_images", "step_s_model", "model_over_images_step", "seconds_per_class_image",
            "rounds", "torch_threads", "generator_threads")
    return {k: costs[k] for k in keep if k in costs} | {"class_images": class_images, "cost_steps": steps} \
        | totals(costs, class_images=class_images, steps=steps)


def print_costs(costs: dict) -> None:
    c = costs
    print(f"cost of {c['cost_steps']} steps, rates measured interleaved here: image mode "
          f"{c['class_images']} class images x {c['seconds_per_class_image']:.3f} s = "
          f"{c['prior_stage_seconds']:.1f} s prior stage + {c['train_seconds_images']:.1f} s training "
          f"({c['step_s_images'] * 1000:.1f} ms/step) = {c['seconds_images']:.1f} s; model mode "
          f"{c['seconds_model']:.1f} s training ({c['step_s_model'] * 1000:.1f} ms/step); "
          f"images / model {c['images_over_model']:.2f}x")


def json_line(result: dict, arms, seconds: float, quick: bool, costs: dict | None = None) -> dict:
    """The bench's last line: base figures, ``<figure>_<arm>`` per arm, the picks, the counts."""
    base, settings = result["base"], result["settings"]
    line = {"base_class_accuracy": base["class_accuracy"],
            "base_class_accuracy_se": base["class_accuracy_se"],
            "base_other_class_accuracy": base["other_class_accuracy"],
            "base_drift": base["drift"], "base_subject_fidelity": base["subject_fidelity"],
            "base_diversity": base["diversity"]}
    for arm in arms:
        figures = result[arm.name]
        for name in ARM_FIGURES:
            line[f"{name}_{arm.name}"] = figures[name]
            if f"{name}_se" in figures:
                line[f"{name}_{arm.name}_se"] = figures[f"{name}_se"]
    line |= {"tune_pick": result["tune_pick"], "fidelity_pick": result["fidelity_pick"],
             "samples_per_prompt": settings["samples_per_prompt"],
             "other_samples_per_prompt": settings["other_samples_per_prompt"],
             "steps": settings["steps"], "learning_rate": settings["learning_rate"],
             "judge_held_out_accuracy": settings["judge_held_out_accuracy"], "quick": quick,
             "seconds": round(seconds, 1)}
    line |= costs or {}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in line.items()}


def print_table(result: dict, arms) -> None:
    rows = [("base model", result["base"])] + [(a.label or a.name, result[a.name]) for a in arms]
    head = ("run", "fidelity", "drift", "class acc", "diversity", "other acc", "val_inst", "val_prior")
    print(("{:32s}" + " {:>10s}" * 7).format(*head))
    base_div = result["base"]["diversity"]
    for name, f in rows:
        print(f"{name:32s} {f['subject_fidelity']:10.3f} {f['drift']:10.3f} {f['class_accuracy']:10.3f} "
              f"{f['diversity'] / base_div:9.2f}x {f['other_class_accuracy']:10.3f} "
              f"{f['val_instance']:10.4f} {f['val_prior']:10.4f}")
    print(f"Tune's val_score ranks first: {result['tune_pick']}; the fidelity figures favour: "
          f"{result['fidelity_pick']}")


def picture_grid(result: dict, arms, path: str) -> None:
    """Rows: base, each arm; columns: class-prompt samples | instance-prompt samples (same seeds) |
    the other digits' prompts (seed 0 each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    names = ["base"] + [a.name for a in arms]
    labels = ["base model"] + [a.label or a.name for a in arms]
    settings = result["settings"]
    fig, axes = plt.subplots(len(names), 3, figsize=(19, 1.15 * len(names) + 0.8), dpi=100, squeeze=False,
                             gridspec_kw={"width_ratios": [8, 8, 9]})
    others = [d for d in range(10) if d != settings["digit"]]
    titles = {"class": f'"{settings["class_prompt"]}"', "instance": f'"{settings["instance_prompt"]}"',
              "others": f"the other digits' prompts ({', '.join(map(str, others))})"}
    for r, (name, label) in enumerate(zip(names, labels, strict=True)):
        for c, kind in enumerate(("class", "instance", "others")):
            images = result["pictures"][name][kind]  # [k, 3, S, S]
            strip = torch.cat(list(images), dim=2).permute(1, 2, 0).numpy()
            ax = axes[r, c]
            ax.imshow(strip, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
            if r == 0:
                ax.set_title(titles[kind], fontsize=10)
    keep = result["pictures"]["base"]["class"].shape[0]
    fig.suptitle(f"digits model + LoRA on builtin:red-three, {settings['steps']} steps, lr "
                 f"{settings['learning_rate']:g}; seeds 0-{keep - 1}, DDIM "
                 f"{settings['sample_steps']} steps, no guidance", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"picture grid -> {path}")


def main(argv: list[str] | None = None) -> int:
    from raydb.fidelity.experiment import ARMS, DEFAULT_ARMS, run_fidelity

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer steps and samples (a smoke run)")
    ap.add_argument("--steps", type=int, help="training steps per arm (default 2000; quick 300)")
    ap.add_argument("--lr", type=float, help="learning rate (default 1e-3; quick 4e-3)")
    ap.add_argument("--samples", type=int, help="samples per prompt (default 50; quick 20)")
    ap.add_argument("--other-samples", type=int,
                    help="samples per other digit's prompt (default 20; quick 8)")
    ap.add_argument("--arms", default=",".join(a.name for a in DEFAULT_ARMS),
                    help=f"comma-separated arms to train, of {', '.join(ARMS)} (default: %(default)s)")
    ap.add_argument("--no-costs", action="store_true", help="skip the prior modes' cost measurement")
    ap.add_argument("--workspace", help="workspace to keep (default: a temporary one)")
    ap.add_argument("--grid", help="write the picture grid (PNG) here")
    ap.add_argument("--json", help="also write the JSON line here")
    args = ap.parse_args(argv)
    unknown = [name for name in args.arms.split(",") if name not in ARMS]
    if unknown:
        ap.error(f"--arms: unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)}")
    arms = tuple(ARMS[name] for name in args.arms.split(","))
    quick = QUICK if args.quick else {"steps": 2000, "learning_rate": 1e-3, "samples": 50,
                                      "other_samples": 20, "num_class_images": 100}
    steps = args.steps or quick["steps"]
    lr = args.lr or quick["learning_rate"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = bench_config(args.workspace or tmp, steps=steps, learning_rate=lr,
                           num_class_images=quick["num_class_images"])
        result = run_fidelity(cfg, arms, samples=args.samples or quick["samples"],
                              other_samples=args.other_samples or quick["other_samples"],
                              log=lambda msg: print(msg, file=sys.stderr, flush=True))
        costs = None if args.no_costs else prior_costs(
            cfg, steps=steps, rounds=10 if args.quick else 30, blocks=1 if args.quick else 3)
    print_table(result, arms)
    if costs:
        print_costs(costs)
    if args.grid:
        picture_grid(result, arms, args.grid)
    line = json_line(result, arms, time.perf_counter() - start, args.quick, costs)
    if args.json:  # the line with the harness's date and environment, as every bench's JSON
        import datetime as dt

        import torch

        from bench.harness import environment

        record = {"schema": 1, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                  "env": environment(torch.device("cpu")), "settings": result["settings"]} | line
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
