"""GPU row, FLUX.1-dev size (issue 27): raydb's training step against diffusers' Flux DreamBooth script.

At 1024 px in bf16, LoRA rank 16 on FLUX.1's default targets, 1 instance + 1 class image per step
(prior preservation on), on a model folder with FLUX.1-dev's architecture and seeded random weights
written with ``save_pretrained`` and loaded back like real weights (nothing is downloaded):

* **raydb** arms: the shipped path — ``load_components`` from the folder, ``prepare_training_data``
  (the encode cache: VAE latents, T5 states, CLIP pooled output, text ids), ``build_train_state``,
  ``TrainEngine`` (``bench/training.py``, the harness's timing rules: untimed warm-up, a sync per
  timed step, the median) — ``eager`` (``train.cuda_graphs: off``) and ``graphs`` (``auto``: the
  captured step on a bf16 GPU), with peak memory and, for eager, FLOPs and MFU;
* **peer** (``--peer``): diffusers' ``train_dreambooth_lora_flux.py`` (``--peer-script``, default
  under ``$RAYDB_PEERS_DIR`` or ``../shared/peers``; run unmodified as a subprocess, never imported
  or copied) on the same folder and images: same resolution, batch, rank, precision, guidance input,
  prior preservation and cached latents (``--cache_latents``, as ours). Its rate is its own progress
  bar's steady state (``bench/peer_dreambooth.py``), so its start-up and model load do not count.

The model: FLUX.1-dev's transformer (19 double- and 38 single-stream blocks, width 3072, guidance
embedding: 11.9 B parameters) and VAE; CLIP-L; T5 at T5-XXL's width (4096, 64 heads) but 2 of its 24
layers — T5 runs once per prompt in both arms (cached encodings), and its states have the real shape
[512, 4096], which is all a training step sees.

    python -m bench.flux_row --peer --out bench/results/flux_row.json        # on an H100/H200
    python -m bench.flux_row --tiny --out /tmp/flux_row_tiny.json            # CPU smoke run
    python -m bench.flux_row --render bench/results/flux_row.json            # tables

Result keys: the harness's, ``settings``, ``model``, ``build_s``, ``load_s``, ``train`` (one row per
arm: ``training.measure``'s keys plus ``arm``), ``peer`` ``{images_per_s, it_per_s, wall_s, ...}``,
``raydb_over_peer`` (the faster raydb arm's images/s over the peer's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from bench import training  # noqa: E402
from bench.harness import Run, add_common_args, free_memory, markdown_table, pct, peers_dir  # noqa: E402
from bench.peer_dreambooth import CLASS_PROMPT, INSTANCE_PROMPT, peer_command, run_peer, write_images  # noqa: E402

ARMS = ("eager", "graphs")

# black-forest-labs/FLUX.1-dev: transformer/ and vae/ config.json
FLUX_DEV = {
    "transformer": {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)},
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
            "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "sample_size": 1024,
            "scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False,
            "use_post_quant_conv": False, "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4},
    "clip": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
    # T5-XXL's width; 2 of its 24 layers (see the module docstring)
    "t5": {"d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 2, "num_heads": 64,
           "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu"},
    "scheduler": {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, out="bench/results/flux_row.json", budget_s=500.0, reserve_s=40.0, max_steps=30)
    p.add_argument("--render", metavar="JSON", help="print the markdown tables of a result file and exit")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--images", type=int, default=4, help="instance and class images each")
    p.add_argument("--guidance", type=float, default=1.0, help="train.flow.guidance (the peer's "
                   "--guidance_scale): the guidance input during training")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--workdir", help="model folder and images (default: under the result's folder)")
    p.add_argument("--peer", action="store_true", help="also run diffusers' Flux script side by side")
    p.add_argument("--peer-script", default=str(peers_dir() / "diffusers" / "train_dreambooth_lora_flux.py"),
                   help="diffusers' Flux DreamBooth-LoRA script")
    p.add_argument("--peer-steps", type=int, default=25)
    p.add_argument("--peer-site", help="packages only the peer needs (accelerate, torchvision), "
                   "put first on its PYTHONPATH")
    args = p.parse_args(argv)
    if args.tiny:
        args.warmup, args.min_steps, args.min_seconds, args.max_steps = 1, 2, 0.0, 2
        args.peer_steps = 3
    return args


def build_flux_dev(path: Path, *, device: torch.device) -> Path:
    """FLUX.1-dev's architecture with seeded random weights, built in bf16 on ``device`` (11.9 B
    parameters: 24 GB, never materialised in fp32) and written with ``save_pretrained``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from raydb.models.tiny import build_tiny_tokenizer
    from raydb.models.tiny_flux import build_tiny_t5_tokenizer

    torch.manual_seed(0)
    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_t5_tokenizer(model_max_length=512)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            transformer = FluxTransformer2DModel(**FLUX_DEV["transformer"])
            vae = AutoencoderKL(**FLUX_DEV["vae"])
            clip = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **FLUX_DEV["clip"]))
            t5 = T5EncoderModel(T5Config(
                vocab_size=len(tokenizer_2), is_encoder_decoder=False, use_cache=False, pad_token_id=0,
                eos_token_id=1, **FLUX_DEV["t5"]))
    finally:
        torch.set_default_dtype(previous)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV["scheduler"]), vae=vae,
                        text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer_2,
                        transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def _config(run: Run, model: str, root: Path, **train: Any):
    """The run's config: the model folder, the bench's images as subject and class data."""
    from raydb.config import load_config

    a = run.args
    return load_config(data={
        "workspace": str(root / "ws"), "model": {"pretrained": model, "cache_dir": str(root / "models")},
        "subject": {"id": "bench", "instance_data": str(root / "instance"),
                    "instance_prompt": INSTANCE_PROMPT, "class_prompt": CLASS_PROMPT},
        "prior": {"class_data": str(root / "class"), "num_class_images": a.images, "num_holdout": 0},
        "lora": {"rank": a.rank},
        "train": {"resolution": run.resolution, "batch_size": 1, "max_steps": 100_000,
                  "mixed_precision": run.mixed_precision, "learning_rate": 1e-4,
                  "gradient_checkpointing": a.gradient_checkpointing, "flow": {"guidance": a.guidance},
                  **train}})


def load(run: Run, model: str, root: Path) -> tuple[Any, Any, Any]:
    """What ``train_subject`` builds before its loop: components from the folder, the encoded
    training data, LoRA + AdamW (``build_train_state``)."""
    from raydb.models.components import load_components
    from raydb.storage import Storage
    from raydb.train.local import prepare_training_data
    from raydb.train.step import build_train_state

    cfg = _config(run, model, root)
    storage = Storage()
    comps = load_components(cfg.model, storage, cfg.workspace, dtype=run.dtype, device=run.device)
    data = prepare_training_data(cfg, comps, storage)
    comps.text_encoder_2 = None  # T5 is done (its states are cached); free it for the step
    return comps, data, build_train_state(cfg, comps.denoiser, *comps.lora_text_encoders)


def run_arm(run: Run, arm: str, model: str, root: Path, comps, data, state) -> None:
    """One arm on the shared state: the arms continue one adapter (a step's time does not depend
    on the LoRA's values), so the 24 GB transformer is loaded once. Eager runs first: the graph
    step makes AdamW capturable and owns the gradients from its first call on."""
    cfg = _config(run, model, root, cuda_graphs="off" if arm == "eager" else "auto")
    graph_step = True if arm == "graphs" and not run.cuda else None  # CPU: its eager path
    with training.make_engine(run, cfg, None, comps.vae, data, state=state,
                              noise_scheduler=comps.noise_scheduler, prediction_type=comps.prediction_type,
                              graph_step=graph_step) as engine:
        row = training.measure(run, engine, count_flops=run.cuda and arm == "eager")
    run.results.setdefault("train", []).append({"arm": arm, **row})
    print(f"    raydb {arm}: {row['images_per_s']} images/s, {row['step_ms_median']} ms/step, "
          f"peak {row['peak_mem_gb']} GB", flush=True)


def run_peer_arm(run: Run, model: str, root: Path) -> None:
    a = run.args
    script = Path(a.peer_script)
    if not script.is_file():
        raise FileNotFoundError(f"--peer-script {script} not found")
    command = peer_command(
        script, model=Path(model), instance_dir=root / "instance", class_dir=root / "class",
        output_dir=root / "peer-out", resolution=run.resolution, batch_size=1, rank=a.rank,
        mixed_precision=run.mixed_precision if run.cuda else "no", steps=a.peer_steps,
        num_class_images=a.images)
    command += ["--guidance_scale", str(a.guidance), "--max_sequence_length", "512", "--cache_latents"]
    if a.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    row = {"script": str(script), "command": command,
           **run_peer(command, timeout_s=max(60.0, run.left()), site=a.peer_site)}
    run.results["peer"] = row
    if row["exit_code"] or "it_per_s" not in row:
        raise RuntimeError(f"peer script exit {row['exit_code']}: {row['log_tail']}")
    row["images_per_s"] = round(2 * row["it_per_s"], 3)  # 1 instance + 1 class image per step
    ours = max((r["images_per_s"] for r in run.results.get("train", [])), default=None)
    if ours:
        run.results["raydb_over_peer"] = round(ours / row["images_per_s"], 3)


def render(r: dict[str, Any]) -> str:
    env, s = r.get("env", {}), r.get("settings", {})
    lines = [f"FLUX.1-dev-size row — **{env.get('chip')}**, {r.get('date', '?')[:10]}, torch "
             f"{env.get('torch')}; {r.get('model')}; {s.get('resolution')} px, {s.get('precision')}, "
             f"LoRA r={s.get('rank')}, 1 + 1 images per step.", ""]
    lines += markdown_table(
        ["arm", "images/s", "ms/step", "peak GB", "TFLOP/s", "MFU (989)", "captured"],
        [[row["arm"], f"{row['images_per_s']:.2f}", f"{row['step_ms_median']:.1f}", row["peak_mem_gb"],
          row.get("tflops_per_s"), pct(row.get("mfu")), row["captured"]] for row in r.get("train", [])])
    peer = r.get("peer") or {}
    if "images_per_s" in peer:
        lines += ["", f"diffusers Flux script: {peer['images_per_s']} images/s ({peer['it_per_s']} it/s); "
                  f"raydb / peer: {r.get('raydb_over_peer')}"]
    lines += [f"- error in {k}: `{v.splitlines()[0][:200]}`" for k, v in r.get("errors", {}).items()]
    lines += [f"- skipped {item}" for item in r.get("skipped", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return {}
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    run = Run(args, {"resolution": 64 if args.tiny else 1024})
    if not args.tiny and not run.cuda:
        raise SystemExit("flux_row: FLUX.1-dev size needs a CUDA device (use --tiny on a CPU)")
    r = run.results
    r.update(model="tiny-flux" if args.tiny else "FLUX.1-dev architecture, random weights",
             settings={"resolution": run.resolution, "rank": args.rank, "per_step": "1 + 1",
                       "precision": run.mixed_precision if run.cuda else "fp32 (CPU)",
                       "guidance": args.guidance, "gradient_checkpointing": args.gradient_checkpointing,
                       "targets": "FLUX.1 default (attention + MLP projections)",
                       "argv": sys.argv[1:] if argv is None else argv})
    root = Path(args.workdir or run.out.parent / "flux-row-work")
    write_images(root / "instance", args.images, run.resolution, seed=1)
    write_images(root / "class", args.images, run.resolution, seed=2)
    print(f"flux_row: {r['env']['chip']} -> {run.out}", flush=True)
    t0 = time.perf_counter()
    model = run.measure("build model", lambda: "tiny-flux" if args.tiny
                        else str(build_flux_dev(root / "flux-dev", device=run.device)))
    r["build_s"] = round(time.perf_counter() - t0, 1)
    free_memory()
    if model is None:
        return run.finish()
    if args.tiny and args.peer:  # the peer reads a folder: the tiny model's, as raydb wrote it
        from raydb.models.components import resolve_model
        from raydb.storage import Storage

        cfg = _config(run, model, root)
        model_dir = resolve_model(cfg.model, Storage(), cfg.workspace)[0]
    else:
        model_dir = model
    t0 = time.perf_counter()
    loaded = run.measure("load + encode", lambda: load(run, model, root))
    r["load_s"] = round(time.perf_counter() - t0, 1)
    if loaded is not None:
        for arm in sorted(args.arms, key=ARMS.index):  # eager before graphs (see run_arm)
            run.measure(f"raydb {arm}", lambda arm=arm: run_arm(run, arm, model, root, *loaded),
                        needs_s=args.reserve_s)
    loaded = None  # the transformer goes before the peer loads its own
    free_memory()
    if args.peer:
        run.measure("peer (diffusers Flux script)", lambda: run_peer_arm(run, model_dir, root),
                    needs_s=4 * args.reserve_s)
    run.finish()
    print(render(r), flush=True)
    return r


if __name__ == "__main__":
    main()
