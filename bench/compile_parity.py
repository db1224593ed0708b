"""Check: does ``train.compile`` give the gradients eager PyTorch gives? Per LoRA parameter, one step.

Runs the shipped ``TrainEngine`` for one step twice from the same init (``build_train_state`` with
the config's ``train.compile`` off, then on) on the same batches and compares every LoRA gradient,
read by an AdamW step pre-hook — the gradient the update is about to apply (clipping is lifted,
``train.max_grad_norm=1e30``, so it scales nothing). A speed option may change the last bits, never
the gradient; this is how the CPU inductor problem with ``compile=full`` was found (see
raydb/train/device_options.py).

    python -m bench.compile_parity --compile full --backend aot_eager     # seconds
    python -m bench.compile_parity --compile blocks --backend inductor    # minutes on CPU
    python -m bench.compile_parity --compile full --backend inductor --allow-cpu-full
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from raydb.config import RaydbConfig, load_config  # noqa: E402
from raydb.models.components import load_components  # noqa: E402
from raydb.storage import Storage  # noqa: E402
from raydb.train import device_options as speed  # noqa: E402
from raydb.train.engine import TrainEngine  # noqa: E402
from raydb.train.local import prepare_training_data  # noqa: E402
from raydb.train.step import build_train_state  # noqa: E402


def lora_grads(cfg: RaydbConfig, device: str) -> tuple[dict[str, float], dict[str, torch.Tensor], float]:
    """(the step's metrics, {lora parameter: grad}, seconds) of the engine's first step from the
    seeded init."""
    storage = Storage()
    comps = load_components(cfg.model, storage, cfg.workspace, device=device)
    data = prepare_training_data(cfg, comps, storage)
    state = build_train_state(cfg, comps.unet, None)
    names = {id(p): n for n, p in comps.unet.named_parameters()}
    grads: dict[str, torch.Tensor] = {}

    def snapshot(optimizer, args, kwargs) -> None:
        if not grads:
            grads.update({names[id(p)]: p.grad.detach().float().cpu() for p in state.params
                          if p.grad is not None})

    hook = state.optimizer.register_step_pre_hook(snapshot)
    with TrainEngine(cfg, state, data, noise_scheduler=comps.noise_scheduler,
                     prediction_type=comps.prediction_type, vae=comps.vae, device=device) as engine:
        start = time.perf_counter()
        metrics = engine.step()
        seconds = time.perf_counter() - start
    hook.remove()
    return metrics, grads, seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compile", choices=["full", "blocks"], default="full")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--model", default="tiny", help="model.pretrained")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rtol", type=float, default=1e-3, help="allowed max |diff| / max |grad| per tensor")
    p.add_argument("--allow-cpu-full", action="store_true",
                   help="lift the trainer's refusal of compile=full + inductor on CPU (to reproduce it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workspace = tempfile.mkdtemp(prefix="raydb-parity-")
    train = {"resolution": args.resolution, "num_sample_images": 0, "compile_backend": args.backend,
             "max_grad_norm": 1e30}
    base = {"workspace": workspace, "model": {"pretrained": args.model},
            "prior": {"num_class_images": 2, "sample_batch_size": 2, "num_inference_steps": 2,
                      "num_holdout": 0}}
    eager_m, eager, _ = lora_grads(load_config(data=base | {"train": train}), device)
    if args.allow_cpu_full:
        speed._on_cuda = lambda module: True  # reproduce the refused combination
    cfg = load_config(data=base | {"train": train | {"compile": args.compile}})
    compiled_m, compiled, seconds = lora_grads(cfg, device)
    worst = {}
    for name, g in eager.items():
        other = compiled.get(name)
        scale = float(g.abs().max()) or 1e-12
        worst[name] = 1.0 if other is None else float((g - other).abs().max()) / scale
    bad = {k: round(v, 4) for k, v in worst.items() if v > args.rtol}
    norm = lambda gs: float(torch.linalg.vector_norm(torch.stack([x.norm() for x in gs.values()])))  # noqa: E731
    result = {
        "device": device, "compile": args.compile, "backend": args.backend,
        "loss": {"eager": eager_m["loss"], "compiled": compiled_m["loss"]},
        "grad_norm": {"eager": norm(eager), "compiled": norm(compiled)},
        # what the engine reported for the same step: the hook read the gradient it applied
        "engine_grad_norm": {"eager": eager_m["grad_norm"], "compiled": compiled_m["grad_norm"]},
        "lora_tensors": len(eager), "mismatched": len(bad), "worst": dict(sorted(bad.items())[:8]),
        "first_compiled_step_s": round(seconds, 1), "ok": bool(eager) and not bad,
    }
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
