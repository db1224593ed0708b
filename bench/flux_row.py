"""GPU row, FLUX.1-dev size: raydb's shipped training loop against diffusers' Flux DreamBooth script.

What it measures, at 1024 px in bf16, LoRA rank 16 on Flux's default targets, 1 instance + 1 class
image per step (prior preservation on):

* **raydb**: ``raydb.train.local.train_subject`` — the shipped loop users run (prepare the data, the
  encode cache in-process, then ``TrainEngine`` steps: the prefetcher and, on CUDA, the captured
  graph step) — on a model folder with FLUX.1-dev's architecture and seeded random weights, saved
  with ``save_pretrained`` and loaded like real weights. Images/s is the loop's own median over the
  steps after the first five (``adapter.json``'s ``images_per_s``), with peak device memory.
* **peer** (``--peer``): diffusers' ``train_dreambooth_lora_flux.py`` (``--peer-script``, run as a
  subprocess, never imported or copied) on the same folder and images, same resolution, batch,
  rank, precision, guidance input and prior preservation. Its rate is the one its own progress bar
  reports (``bench/peer_dreambooth.py``).

The model: FLUX.1-dev's transformer (19 double- and 38 single-stream blocks, width 3072, guidance
embedding: 11.9 B parameters) and VAE; CLIP-L; T5 at T5-XXL's width (4096, 64 heads) but 2 layers
instead of 24 — T5 runs once per prompt in both arms (cached encodings), and its states have the
real shape [512, 4096], which is all a training step sees. ``--tiny`` runs the embedded tiny Flux
at 64 px on the CPU (a smoke test of this script).

    python bench/flux_row.py --out /tmp/flux_row.json --peer --peer-script .peer/train_dreambooth_lora_flux.py
    python bench/flux_row.py --tiny --out /tmp/flux_row_tiny.json                    # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.peer_dreambooth import CLASS_PROMPT, INSTANCE_PROMPT, peer_command, run_peer, write_images

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


def build_flux_dev(path: Path, *, device: str) -> Path:
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
        with torch.device(device):
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
    del pipe, transformer, vae, clip, t5
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def measure_raydb(model: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The shipped loop (``train_subject``) for ``args.steps`` steps; its own speed summary."""
    from raydb.config import load_config
    from raydb.train.local import train_subject

    cfg = load_config(data={
        "workspace": str(root / "ws"), "model": {"pretrained": model},
        "subject": {"id": "bench", "instance_data": str(root / "instance"),
                    "instance_prompt": INSTANCE_PROMPT, "class_prompt": CLASS_PROMPT},
        "prior": {"class_data": str(root / "class"), "num_class_images": args.images, "num_holdout": 0},
        "lora": {"rank": args.rank},
        "train": {"resolution": args.resolution, "batch_size": 1, "max_steps": args.steps,
                  "learning_rate": 1e-4, "checkpoint_every": 10 * args.steps, "num_sample_images": 0,
                  "gradient_checkpointing": args.gradient_checkpointing,
                  "mixed_precision": "no" if args.tiny else "bf16", "cuda_graphs": args.cuda_graphs,
                  "flow": {"guidance": args.guidance}}})
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = train_subject(cfg, samples=False, quiet=True)
    meta = json.loads(Path(result["adapter_uri"], "adapter.json").read_text())
    row = {"images_per_s": round(meta["metrics"]["images_per_s"], 3), "steps": result["steps"],
           "wall_s": round(time.perf_counter() - t0, 1), "cuda_graphs": args.cuda_graphs,
           "gradient_checkpointing": args.gradient_checkpointing}
    if torch.cuda.is_available():
        row["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return row


def measure_peer(model: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """diffusers' Flux DreamBooth-LoRA script on the same folder and images (a subprocess)."""
    command = peer_command(
        Path(args.peer_script), model=Path(model), instance_dir=root / "instance", class_dir=root / "class",
        output_dir=root / "peer-out", resolution=args.resolution, batch_size=1, rank=args.rank,
        mixed_precision="bf16", steps=args.steps, num_class_images=args.images)
    command += ["--guidance_scale", str(args.guidance), "--max_sequence_length", "512"]
    if args.gradient_checkpointing:
        command.append("--gradient_checkpointing")
    row = run_peer(command, timeout_s=args.peer_timeout_s, site=args.peer_site)
    if "it_per_s" in row:
        row["images_per_s"] = round(2 * row["it_per_s"], 3)  # 1 instance + 1 class image per step
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--tiny", action="store_true", help="the embedded tiny Flux at 64 px (CPU smoke test)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--images", type=int, default=4, help="instance and class images each")
    p.add_argument("--guidance", type=float, default=1.0, help="the guidance input during training")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--peer", action="store_true", help="also run diffusers' Flux script")
    p.add_argument("--peer-script", default=".peer/train_dreambooth_lora_flux.py")
    p.add_argument("--peer-site", default=None, help="extra packages for the peer only")
    p.add_argument("--peer-timeout-s", type=float, default=420)
    p.add_argument("--workdir", default=None,
                   help="where the model folder and images go (default: a temp dir)")
    args = p.parse_args(argv)
    args.resolution = 64 if args.tiny else 1024
    if not args.tiny and not torch.cuda.is_available():
        print("flux_row: FLUX.1-dev size needs a CUDA device (use --tiny on a CPU)", file=sys.stderr)
        return 2
    root = Path(args.workdir or tempfile.mkdtemp(prefix="flux-row-"))
    write_images(root / "instance", args.images, args.resolution, seed=1)
    write_images(root / "class", args.images, args.resolution, seed=2)
    out: dict[str, Any] = {"settings": {"resolution": args.resolution, "rank": args.rank, "per_step": "1 + 1",
                                        "precision": "fp32 (CPU)" if args.tiny else "bf16",
                                        "steps": args.steps, "guidance": args.guidance,
                                        "model": "tiny-flux" if args.tiny else "FLUX.1-dev architecture"}}
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
    t0 = time.perf_counter()
    model = "tiny-flux" if args.tiny else str(build_flux_dev(root / "flux-dev", device="cuda"))
    out["build_s"] = round(time.perf_counter() - t0, 1)
    for arm, measure in (("raydb", measure_raydb), ("peer", measure_peer)):
        if arm == "peer" and not args.peer:
            continue
        try:
            out[arm] = measure(model, root, args)
        except Exception as exc:  # noqa: BLE001 - one arm's failure is recorded, the other still runs
            out[arm] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")  # after every arm: partial results
    ours, peer = out["raydb"].get("images_per_s"), out.get("peer", {}).get("images_per_s")
    if ours and peer:
        out["raydb_over_peer"] = round(ours / peer, 2)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0 if "error" not in out["raydb"] else 1


if __name__ == "__main__":
    sys.exit(main())
