"""Check: does ``train.compile`` give the gradients eager PyTorch gives? Per LoRA parameter, one step.

Builds the trainer's state twice from the same init (``build_train_state`` with the config's
``train.compile`` off, then on), runs ``forward_loss`` + ``backward`` on the same micro-batch and
compares every LoRA gradient. A speed option may change the last bits, never the gradient; this
is how the CPU inductor problem with ``compile=full`` was found (see raydb/train/device_options.py).

    .venv/bin/python bench/compile_parity.py --compile full --backend aot_eager     # seconds
    .venv/bin/python bench/compile_parity.py --compile blocks --backend inductor    # minutes on CPU
    .venv/bin/python bench/compile_parity.py --compile full --backend inductor --allow-cpu-full
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from raydb.config import load_config  # noqa: E402
from raydb.models.components import load_components  # noqa: E402
from raydb.storage import Storage  # noqa: E402
from raydb.train import device_options as speed  # noqa: E402
from raydb.train.data import step_micro_batches  # noqa: E402
from raydb.train.local import prepare_training_data  # noqa: E402
from raydb.train.step import build_train_state, forward_loss  # noqa: E402


def lora_grads(cfg, device: str) -> tuple[float, dict[str, torch.Tensor], float]:
    """(loss, {lora parameter: grad}, seconds) of one forward/backward from the seeded init."""
    storage = Storage()
    comps = load_components(cfg.model, storage, cfg.workspace, device=device)
    data = prepare_training_data(cfg, comps, storage)
    state = build_train_state(cfg, comps.unet, None)
    (batch,) = step_micro_batches(data, cfg.train, step=0, device=device,
                                  num_train_timesteps=comps.noise_scheduler.config.num_train_timesteps)
    start = time.perf_counter()
    parts = forward_loss(state.model, comps.noise_scheduler, batch, prediction_type=comps.prediction_type,
                         prior_loss_weight=cfg.train.prior_loss_weight, with_prior=data.with_prior,
                         vae=comps.vae)
    parts.total.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in comps.unet.named_parameters()
             if p.grad is not None}
    return parts.total.item(), grads, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compile", choices=["full", "blocks"], default="full")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--model", default="tiny", help="model.pretrained")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rtol", type=float, default=1e-3, help="allowed max |diff| / max |grad| per tensor")
    p.add_argument("--allow-cpu-full", action="store_true",
                   help="lift the trainer's refusal of compile=full + inductor on CPU (to reproduce it)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    workspace = tempfile.mkdtemp(prefix="raydb-parity-")
    train = {"resolution": args.resolution, "num_sample_images": 0, "compile_backend": args.backend}
    base = {"workspace": workspace, "model": {"pretrained": args.model},
            "prior": {"num_class_images": 2, "sample_batch_size": 2, "num_inference_steps": 2,
                      "num_holdout": 0}}
    eager_loss, eager, _ = lora_grads(load_config(data=base | {"train": train}), device)
    if args.allow_cpu_full:
        speed._on_cuda = lambda module: True  # reproduce the refused combination
    cfg = load_config(data=base | {"train": train | {"compile": args.compile}})
    loss, compiled, seconds = lora_grads(cfg, device)
    worst = {}
    for name, g in eager.items():
        other = compiled.get(name)
        scale = float(g.abs().max()) or 1e-12
        worst[name] = 1.0 if other is None else float((g - other).abs().max()) / scale
    bad = {k: round(v, 4) for k, v in worst.items() if v > args.rtol}
    norm = lambda gs: float(torch.linalg.vector_norm(torch.stack([x.norm() for x in gs.values()])))  # noqa: E731
    print(json.dumps({
        "device": device, "compile": args.compile, "backend": args.backend,
        "loss": {"eager": eager_loss, "compiled": loss},
        "grad_norm": {"eager": norm(eager), "compiled": norm(compiled)},
        "lora_tensors": len(eager), "mismatched": len(bad), "worst": dict(sorted(bad.items())[:8]),
        "first_compiled_step_s": round(seconds, 1), "ok": not bad,
    }, indent=1))
    raise SystemExit(0 if not bad else 1)


if __name__ == "__main__":
    main()
