"""GPU truth, SDXL rows: SDXL-size DreamBooth-LoRA training and prior generation, plus the diffusers
SDXL script run side by side.

The SDXL arm of ``bench/gpu_truth.py`` (it reuses that script's ``Bench``, ``Trainer`` and
``measure_training``, so the timing rules are the same). Builds SDXL base 1.0's architecture from its
published configs — UNet 320/640/1280 with 1/2/10 transformer layers, ``text_time`` conditioning
and 2048-wide cross-attention; CLIP ViT-L (768) and OpenCLIP bigG (1280, projected) text encoders;
the 4-level VAE — with seeded random weights, nothing downloaded, and measures at 1024 px in bf16
with 1 instance + 1 class image per step:

* training images/s of our trainer core with cached latents (the encode stage's cache: both
  encoders' hidden states, the pooled embedding, per-image time ids) and with the VAE run every
  step, with peak memory and MFU;
* prior generation images/s (``StableDiffusionXLPipeline``, Euler, 25 steps, CFG 5.0);
* ``--peer``: diffusers' ``train_dreambooth_lora_sdxl.py`` (from ``--peer-script``, run as a
  subprocess, never imported or copied) on the same random-weights model saved with
  ``save_pretrained``, same resolution / batch / rank / bf16 / prior preservation. Its per-step time
  is the difference of two runs (``--peer-steps`` short and long) divided by the extra steps, so
  process start-up, model loading and the adapter save cancel out.

    python bench/gpu_truth_sdxl.py --out bench/results/gpu_truth_sdxl.json --peer   # on a GPU
    python bench/gpu_truth_sdxl.py --tiny --out /tmp/gpu_truth_sdxl_tiny.json         # CPU smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from gpu_truth import (  # noqa: E402
    SD_SCHEDULE,
    Bench,
    Trainer,
    environment,
    measure_matmul,
    measure_training,
)

from raydb.encode.encoders import EncodedImages  # noqa: E402
from raydb.models.sdxl import encode_prompts_sdxl, tokenize_sdxl  # noqa: E402
from raydb.models.tiny import build_tiny_tokenizer  # noqa: E402
from raydb.models.tiny_sdxl import TINY_SDXL_SPEC  # noqa: E402
from raydb.train.data import TrainingData  # noqa: E402

_VAE_BLOCKS = {"down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4}

# stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/, text_encoder_2/ config.json
SDXL_BASE = {
    "resolution": 1024,
    "unet": {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048, "use_linear_projection": True, "norm_num_groups": 32,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "sample_size": 1024,
            "scaling_factor": 0.13025, "force_upcast": True, **_VAE_BLOCKS},
    "text": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
    "text_2": {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
               "num_attention_heads": 20, "max_position_embeddings": 77, "hidden_act": "gelu",
               "projection_dim": 1280},
}

# The embedded tiny SDXL's widths (raydb.models.tiny_sdxl), at 64 px: the CPU smoke configuration.
_T = TINY_SDXL_SPEC
TINY_SDXL = {
    "resolution": 64,
    "unet": {
        "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "layers_per_block": _T["unet"]["layers_per_block"],
        "block_out_channels": tuple(_T["unet"]["block_out_channels"]),
        "down_block_types": tuple(_T["unet"]["down_block_types"]),
        "up_block_types": tuple(_T["unet"]["up_block_types"]),
        "transformer_layers_per_block": tuple(_T["unet"]["transformer_layers_per_block"]),
        "attention_head_dim": tuple(_T["unet"]["attention_head_dim"]),
        "cross_attention_dim": _T["text"]["hidden_size"] + _T["text_2"]["hidden_size"],
        "use_linear_projection": True, "norm_num_groups": _T["unet"]["norm_num_groups"],
        "addition_embed_type": "text_time", "addition_time_embed_dim": _T["unet"]["addition_time_embed_dim"],
        "projection_class_embeddings_input_dim": 6 * _T["unet"]["addition_time_embed_dim"]
        + _T["text_2"]["projection_dim"],
    },
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
            "layers_per_block": _T["vae"]["layers_per_block"],
            "block_out_channels": tuple(_T["vae"]["block_out_channels"]),
            "norm_num_groups": _T["vae"]["norm_num_groups"], "sample_size": 64,
            "scaling_factor": _T["vae"]["scaling_factor"], "force_upcast": True, **_VAE_BLOCKS},
    "text": {"vocab_size": 1000, "max_position_embeddings": 77, **_T["text"]},
    "text_2": {"vocab_size": 1000, "max_position_embeddings": 77, **_T["text_2"]},
}
GUIDANCE = 5.0  # SDXL base's usual CFG
PROMPTS = ["a photo of sks dog", "a photo of a dog"]


def build_frozen_sdxl(b: Bench):
    """VAE, both text encoders (frozen, training dtype) and both tokenizers (built in code)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizers = (build_tiny_tokenizer(), build_tiny_tokenizer(pad_token="!"))
    torch.manual_seed(1)

    def config(spec: dict, tok) -> CLIPTextConfig:
        return CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **spec)

    with b.device:
        vae = AutoencoderKL(**b.spec["vae"])
        encoders = (CLIPTextModel(config(b.spec["text"], tokenizers[0])),
                    CLIPTextModelWithProjection(config(b.spec["text_2"], tokenizers[1])))
    for m in (vae, *encoders):
        m.to(b.dtype).eval().requires_grad_(False)
    return vae, encoders, tokenizers


def sdxl_training_data(b: Bench, encoders, tokenizers, *, cached: bool) -> TrainingData:
    """Random latents (or pixels) with the real shapes, the real text conditioning, and the time ids
    of uncropped photos at the bench resolution."""
    res = b.spec["resolution"]
    latent_shape = (4, res // 8, res // 8)
    g = torch.Generator().manual_seed(7)

    def source(n: int):
        if cached:
            return EncodedImages(torch.randn(n, *latent_shape, generator=g),
                                 0.05 + 0.1 * torch.rand(n, *latent_shape, generator=g))
        return torch.rand(n, 3, res, res, generator=g) * 2 - 1

    hidden, pooled = encode_prompts_sdxl(tokenizers, encoders, PROMPTS)
    ids, ids_2 = tokenize_sdxl(tokenizers, PROMPTS)
    n_inst, n_class = 4, 8
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32)
    return TrainingData(
        instance=source(n_inst), class_=source(n_class),
        instance_embeds=hidden[:1], class_embeds=hidden[1:], instance_ids=ids[:1], class_ids=ids[1:],
        latent_shape=latent_shape, instance_pooled=pooled[:1], class_pooled=pooled[1:],
        instance_time_ids=time_ids.expand(n_inst, 6), class_time_ids=time_ids.expand(n_class, 6),
        instance_ids_2=ids_2[:1], class_ids_2=ids_2[1:],
    )


def run_sdxl_training(b: Bench, vae, encoders, tokenizers) -> None:
    """Cached latents vs. the VAE every step, ``--batch-sizes`` instance images (+ as many class)."""
    b.results["train"] = []
    trainer = Trainer(b, vae)
    for cached in (True, False):
        data = sdxl_training_data(b, encoders, tokenizers, cached=cached)
        for bs in b.args.batch_sizes:
            arm = "cached latents" if cached else "VAE every step"

            def one(bs=bs, data=data, arm=arm) -> None:
                row = {"arm": arm, **measure_training(b, trainer, data, bs)}
                b.results["train"].append(row)
                print(f"    {arm} {bs}+{bs}: {row['images_per_s']:.2f} img/s", flush=True)

            b.guarded(f"sdxl train {arm} b{bs}", one, needs_s=b.args.reserve_s)
    rows = {(r["arm"], r["instance_per_step"]): r["images_per_s"] for r in b.results["train"]}
    b.results["cached_over_uncached"] = {
        str(bs): round(rows[("cached latents", bs)] / rows[("VAE every step", bs)], 3)
        for bs in b.args.batch_sizes if ("cached latents", bs) in rows and ("VAE every step", bs) in rows
    }


def sdxl_pipeline(b: Bench, vae, encoders, tokenizers):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    with b.device:
        unet = UNet2DConditionModel(**b.spec["unet"])
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet.to(b.dtype).eval(), scheduler=scheduler,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_sdxl_generation(b: Bench, pipe) -> None:
    """Prior generation as the prior stage runs it for SDXL: Euler, CFG 5.0, PIL output."""
    res, steps = b.spec["resolution"], b.args.gen_steps
    b.results["generation"] = []

    def call(n: int, num_steps: int) -> None:
        pipe(prompt=[PROMPTS[1]] * n, num_inference_steps=num_steps, guidance_scale=GUIDANCE,
             height=res, width=res, generator=[torch.Generator(b.device).manual_seed(i) for i in range(n)],
             output_type="pil")

    for n in b.args.gen_batches:

        def one(n=n) -> None:
            b.reset_peak()
            call(n, 2)  # warm-up
            times = []
            for _ in range(b.args.gen_calls):
                b.sync()
                t0 = time.perf_counter()
                call(n, steps)
                b.sync()
                times.append(time.perf_counter() - t0)
            median = statistics.median(times)
            b.results["generation"].append({
                "batch": n, "steps": steps, "resolution": res, "guidance_scale": GUIDANCE,
                "scheduler": "Euler", "images_per_s": round(n / median, 3),
                "seconds_per_call": round(median, 3), "calls": len(times), "peak_mem_gb": b.peak_gb(),
            })

        b.guarded(f"sdxl generation batch {n}", one, needs_s=b.args.reserve_s)


def _peer_inputs(b: Bench, pipe, root: Path) -> tuple[Path, Path, Path]:
    """The model folder (``save_pretrained``), instance and class images the peer script reads."""
    from PIL import Image

    model, instance, klass = root / "model", root / "instance", root / "class"
    pipe.save_pretrained(model, safe_serialization=True)
    res = b.spec["resolution"]
    g = torch.Generator().manual_seed(3)
    for folder, n in ((instance, 4), (klass, 8)):
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = (torch.rand(res, res, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return model, instance, klass


def run_sdxl_peer(b: Bench, pipe) -> None:
    """diffusers' SDXL DreamBooth-LoRA script, same settings, timed by the two-run difference."""
    script = Path(b.args.peer_script)
    if not script.is_file():
        raise FileNotFoundError(f"--peer-script {script} not found")
    root = Path(tempfile.mkdtemp(prefix="raydb-sdxl-peer-"))
    model, instance, klass = _peer_inputs(b, pipe, root)
    bs = b.args.batch_sizes[0]
    short, long = b.args.peer_steps

    def run(steps: int) -> float:
        cmd = [sys.executable, str(script), f"--pretrained_model_name_or_path={model}",
               f"--instance_data_dir={instance}", f"--class_data_dir={klass}", "--with_prior_preservation",
               "--num_class_images=8", "--instance_prompt=a photo of sks dog",
               "--class_prompt=a photo of a dog", f"--resolution={b.spec['resolution']}",
               f"--train_batch_size={bs}", f"--max_train_steps={steps}", "--rank=4",
               f"--mixed_precision={'bf16' if b.cuda else 'no'}", "--learning_rate=1e-4",
               "--checkpointing_steps=100000", "--report_to=all", "--seed=0",
               f"--output_dir={root / f'out{steps}'}"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=b.left())
        if proc.returncode != 0:
            raise RuntimeError(f"peer exited {proc.returncode}: {proc.stderr[-1500:]}")
        return time.perf_counter() - t0

    t_short, t_long = run(short), run(long)
    step_s = (t_long - t_short) / (long - short)
    b.results["peer"] = {
        "script": str(script), "instance_per_step": bs, "images_per_step": 2 * bs,
        "steps": [short, long], "wall_s": [round(t_short, 1), round(t_long, 1)],
        "step_ms": round(1000 * step_s, 2), "images_per_s": round(2 * bs / step_s, 3),
    }
    ours = next((r for r in b.results.get("train", [])
                 if r["arm"] == "VAE every step" and r["instance_per_step"] == bs), None)
    if ours:  # the peer runs its VAE every step too: the like-for-like comparison
        b.results["peer"]["ours_uncached_over_peer"] = round(ours["images_per_s"] / (2 * bs / step_s), 3)


def _default_peer() -> Path:
    """The peer script under ``shared/peers`` (in the checkout, or beside it as on the dev box)."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [base / "shared" / "peers" / "diffusers" / "train_dreambooth_lora_sdxl.py"
                  for base in (repo, repo.parent, Path("/work"))]
    return next((c for c in candidates if c.is_file()), candidates[0])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/gpu_truth_sdxl.json", help="result JSON (rewritten)")
    p.add_argument("--tiny", action="store_true", help="the tiny SDXL at 64 px (CPU smoke test)")
    p.add_argument("--resolution", type=int, help="override the resolution")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting measurements after this")
    p.add_argument("--reserve-s", type=float, default=20.0, help="budget an ordinary measurement needs")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="instance images per step")
    p.add_argument("--gen-batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--gen-steps", type=int, default=25)
    p.add_argument("--gen-calls", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-steps", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--peer", action="store_true", help="also run diffusers' SDXL script side by side")
    p.add_argument("--peer-script", default=str(_default_peer()), help="diffusers SDXL DreamBooth script")
    p.add_argument("--peer-steps", type=int, nargs=2, default=[5, 25], help="short and long run")
    args = p.parse_args(argv)
    if args.tiny:
        args.gen_batches, args.gen_steps, args.gen_calls = [1], 2, 1
        args.warmup, args.min_steps, args.min_seconds, args.max_steps = 1, 2, 0.0, 2
        args.peer_steps = [1, 3]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    b = Bench(args)  # its spec (SD 1.5 / tiny) is replaced by SDXL's
    b.spec = dict(TINY_SDXL if args.tiny else SDXL_BASE)
    if args.resolution:
        b.spec["resolution"] = args.resolution
    r = b.results
    r.update(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        model="tiny-sdxl" if args.tiny else "sdxl-base-1.0-architecture-random-weights",
        env=environment(b), peak_bf16_tflops=b.peak_tflops(),
        settings={"resolution": b.spec["resolution"], "mixed_precision": b.mixed_precision,
                  "weights_dtype": str(b.dtype), "lora": "rank 4, alpha 4, to_q/to_k/to_v/to_out.0",
                  "prior_preservation": True, "argv": sys.argv[1:] if argv is None else argv},
    )
    print(f"gpu_truth_sdxl: {r['env']['chip']} -> {b.out}", flush=True)
    if b.cuda:
        b.guarded("matmul ceiling", lambda: r.__setitem__("measured_matmul_tflops", measure_matmul(b)))
    frozen = b.guarded("build SDXL VAE + text encoders", lambda: build_frozen_sdxl(b))
    if frozen is None:
        return r
    vae, encoders, tokenizers = frozen
    run_sdxl_training(b, vae, encoders, tokenizers)
    pipe = b.guarded("build SDXL pipeline", lambda: sdxl_pipeline(b, vae, encoders, tokenizers))
    if pipe is not None:
        r["params_m"] = {name: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for name, m in
                         (("unet", pipe.unet), ("vae", vae), ("text_encoder", encoders[0]),
                          ("text_encoder_2", encoders[1]))}
        run_sdxl_generation(b, pipe)
        if args.peer:
            b.guarded("sdxl peer (diffusers script)", lambda: run_sdxl_peer(b, pipe), needs_s=120)
    r["complete"] = not r["errors"] and not r["skipped"]
    b.save()
    print(json_summary(r), flush=True)
    return r


def json_summary(r: dict[str, Any]) -> str:
    lines = [f"SDXL rows ({r['settings']['resolution']} px, {r['settings']['mixed_precision']}):"]
    lines += [f"  train {t['arm']} {t['instance_per_step']}+{t['instance_per_step']}: "
              f"{t['images_per_s']} img/s, {t['step_ms_median']} ms/step, peak {t['peak_mem_gb']} GB, "
              f"MFU {t.get('mfu')}" for t in r.get("train", [])]
    lines += [f"  generation batch {g['batch']}: {g['images_per_s']} img/s" for g in r.get("generation", [])]
    if r.get("peer"):
        lines.append(f"  peer (diffusers SDXL script): {r['peer']['images_per_s']} img/s, "
                     f"{r['peer']['step_ms']} ms/step")
    lines += [f"  error in {k}: {v.splitlines()[0][:200]}" for k, v in r.get("errors", {}).items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
