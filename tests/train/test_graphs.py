"""The graph-ready step (``GraphStep``, ``capture=False``) is today's ``optimizer_step`` for every
model family: whatever conditioning a family's batch carries reaches the static buffers.

``cuda_graphs: auto`` turns this path on for every bf16 CUDA run, so a field the static buffers
drop crashes (or silently mis-conditions) a family's first GPU step. Fast tier, no Ray, float64:
both paths run the same kernels in the same order, so they agree to float64 rounding on any CPU.
"""

from __future__ import annotations

import pytest
import torch

from raydb.models.components import load_components
from raydb.storage import Storage
from raydb.train.data import step_micro_batches
from raydb.train.graphs import GraphStep
from raydb.train.local import prepare_training_data
from raydb.train.step import build_train_state, optimizer_step

EXACT = {"rel": 1e-12, "abs": 1e-15}
FAMILIES = {"sd": "tiny", "sdxl": "tiny-sdxl", "flux": "tiny-flux"}


def _run(cfg, steps: int, *, graph_ready: bool):
    storage = Storage()
    comps = load_components(cfg.model, storage, cfg.workspace, dtype=torch.float64)
    data = prepare_training_data(cfg, comps, storage)
    state = build_train_state(cfg, comps.denoiser, *comps.lora_text_encoders)
    kw = dict(noise_scheduler=comps.noise_scheduler, prediction_type=comps.prediction_type,
              with_prior=data.with_prior, vae=comps.vae)
    step = GraphStep(state, cfg, capture=False, **kw) if graph_ready else None
    n_timesteps = comps.noise_scheduler.config.num_train_timesteps
    metrics = []
    for _ in range(steps):
        micro = step_micro_batches(data, cfg.train, step=state.step, num_train_timesteps=n_timesteps)
        metrics.append(step(micro) if step else optimizer_step(state, micro, cfg=cfg, **kw))
    modules = {"unet": state.unet, "te": state.text_encoder, "te2": state.text_encoder_2}
    lora = {f"{name}.{k}": p.detach().clone() for name, module in modules.items() if module is not None
            for k, p in module.named_parameters() if "lora_" in k}
    return comps.family, metrics, lora, state


@pytest.mark.parametrize(("train_text_encoder", "prior_mode"), [(False, "images"), (True, "images"),
                                                                (True, "model")],
                         ids=["cached-text", "text-lora", "text-lora-model-mode"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_graph_ready_step_equals_eager_for_every_family(make_cfg, tmp_path, class_images_dir, family,
                                                        train_text_encoder, prior_mode):
    """Accumulation 2, a warm-up + linear lr schedule (the lr tensor must follow it), clipping
    active, (second case) text-encoder LoRA fed through ``input_ids`` and (third) ``prior.mode:
    model``: the frozen base pass with every LoRA layer off inside the step."""
    cfg = make_cfg(workspace=str(tmp_path / "ws"), model={"pretrained": FAMILIES[family]},
                   lora={"train_text_encoder": train_text_encoder},
                   prior={"class_data": class_images_dir} if prior_mode == "images" else {"mode": "model"},
                   train={"dtype": "float64", "gradient_accumulation_steps": 2, "max_steps": 3,
                          "resolution": 32, "lr_scheduler": "linear", "lr_warmup_steps": 1,
                          "learning_rate": 1e-2, "max_grad_norm": 0.05})
    got_family, eager, lora_eager, _ = _run(cfg, 3, graph_ready=False)
    _, ready, lora_ready, state = _run(cfg, 3, graph_ready=True)
    assert got_family == family
    assert len({m["lr"] for m in eager}) == 3  # the schedule really changes the lr every step
    for a, b in zip(eager, ready, strict=True):
        assert a["step"] == b["step"] and a["images"] == b["images"]
        for key in ("loss", "loss_instance", "loss_prior", "grad_norm", "grad_norm_clipped", "lr"):
            assert b[key] == pytest.approx(a[key], **EXACT), key
        assert a["grad_norm"] > cfg.train.max_grad_norm  # clipping was active
    assert eager[-1]["loss_prior"] > 1e-8  # (model mode: the adapter has left the base model)
    assert lora_eager.keys() == lora_ready.keys() and lora_eager
    # SDXL with text LoRA trains both encoders: the second one must get its gradient too
    encoders = {k.split(".")[0] for k in lora_eager} - {"unet"}
    assert encoders == ({"te", "te2"} if train_text_encoder and family == "sdxl" else
                        {"te"} if train_text_encoder else set())
    # Losses and norms agree exactly; a few LoRA weights differ by float64 ulps that AdamW's
    # m / sqrt(v) amplifies where gradients are near zero. A real difference — a stale lr, a lost
    # micro-batch, a conditioning field left out — moves weights by ~lr = 1e-2.
    for key in lora_eager:
        torch.testing.assert_close(lora_ready[key], lora_eager[key], rtol=1e-9, atol=1e-12)
    # the lr lives in a tensor the schedule fills in place (what a captured optimizer reads)
    assert isinstance(state.optimizer.param_groups[0]["lr"], torch.Tensor)
