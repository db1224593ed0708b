"""The trainer's speed options (channels_last, fused AdamW, torch.compile) change layout, not math.

Fast tier, no Ray. ``compile`` runs through dynamo and AOTAutograd with the ``aot_eager`` backend
here: the same graph capture and backward as inductor, without generating kernels, which takes
minutes on two cores (``bench/compile_parity.py`` checks inductor's gradients on demand).
"""

from __future__ import annotations

import pytest
import torch

from raydb.config import ConfigError
from raydb.models.components import load_components
from raydb.storage import Storage
from raydb.train.data import make_micro_batch
from raydb.train.device_options import use_channels_last, use_fused_adam
from raydb.train.local import prepare_training_data
from raydb.train.step import build_train_state, optimizer_step


def _steps(cfg, steps: int = 3) -> tuple[list[dict], dict[str, torch.Tensor], object]:
    storage = Storage()
    comps = load_components(cfg.model, storage, cfg.workspace)
    data = prepare_training_data(cfg, comps, storage)
    state = build_train_state(cfg, comps.unet, comps.text_encoder)
    metrics = []
    for _ in range(steps):
        micro = [make_micro_batch(data, step=state.step, micro=0, batch_size=1, accumulation=1,
                                  seed=0, num_train_timesteps=1000)]
        metrics.append(optimizer_step(state, micro, cfg=cfg, noise_scheduler=comps.noise_scheduler,
                                      prediction_type=comps.prediction_type,
                                      with_prior=data.with_prior, vae=comps.vae))
    lora = {k: p.detach().clone() for k, p in comps.unet.named_parameters() if "lora_" in k}
    return metrics, lora, state


def _assert_same_training(a, b, *, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    (ma, la, _), (mb, lb, _) = a, b
    for x, y in zip(ma, mb, strict=True):
        for key in ("loss", "loss_instance", "loss_prior", "grad_norm", "grad_norm_clipped"):
            assert x[key] == pytest.approx(y[key], rel=rtol, abs=atol), key
    assert la.keys() == lb.keys() and la
    for key in la:
        torch.testing.assert_close(la[key], lb[key], rtol=rtol, atol=atol)


def test_auto_options_follow_the_device(make_cfg):
    cfg = make_cfg()
    assert cfg.train.channels_last == "auto" and cfg.train.fused_adam == "auto"
    cpu_module = torch.nn.Linear(2, 2)
    assert not use_channels_last(cfg.train, cpu_module)
    assert not use_fused_adam(cfg.train, list(cpu_module.parameters()))
    forced = make_cfg(train={"channels_last": True, "fused_adam": True}).train
    assert use_channels_last(forced, cpu_module) and use_fused_adam(forced, list(cpu_module.parameters()))


def test_channels_last_and_fused_adam_train_the_same(make_cfg):
    base = _steps(make_cfg(train={"channels_last": False, "fused_adam": False}))
    fast = _steps(make_cfg(train={"channels_last": True, "fused_adam": True}))
    conv = fast[2].unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert fast[2].optimizer.defaults["fused"]
    _assert_same_training(base, fast)


def test_compiled_step_trains_like_eager(make_cfg):
    import torch._dynamo

    torch._dynamo.reset()
    eager = _steps(make_cfg())
    for mode in ("full", "blocks"):
        compiled = _steps(make_cfg(train={"compile": mode, "compile_backend": "aot_eager"}))
        state = compiled[2]
        if mode == "full":  # a separate wrapper; the eager UNet (same parameters) stays for sampling
            assert isinstance(state.model, torch._dynamo.eval_frame.OptimizedModule)
            assert state.model._orig_mod is state.unet
        else:  # the UNet itself, its repeated blocks compiled in place
            assert state.model is state.unet
            blocks = [m for m in state.unet.modules() if type(m).__name__ == "ResnetBlock2D"]
            assert blocks and all(b._compiled_call_impl is not None for b in blocks)
        _assert_same_training(eager, compiled)
        # the checkpointed/saved LoRA names are the plain UNet's, not "_orig_mod." ones
        assert all("_orig_mod" not in k for k in compiled[1])


def _build_state(cfg):
    """build_train_state on the tiny model (no data): where the speed options are applied."""
    comps = load_components(cfg.model, Storage(), cfg.workspace)
    return build_train_state(cfg, comps.unet, comps.text_encoder)


def test_full_graph_inductor_is_refused_on_cpu(make_cfg):
    """torch 2.13's inductor CPU code for the whole UNet graph gives wrong LoRA gradients
    (bench/compile_parity.py): the trainer refuses that combination with a clear error."""
    with pytest.raises(ValueError, match="train.compile.*'full'.*inductor.*CPU"):
        _build_state(make_cfg(train={"compile": "full"}))


def test_unknown_compile_backend_is_named(make_cfg):
    for mode in ("full", "blocks"):
        cfg = make_cfg(train={"compile": mode, "compile_backend": "no-such-backend"})
        with pytest.raises(ValueError, match="train.compile_backend.*no-such-backend"):
            _build_state(cfg)


def test_compile_mode_is_validated(make_cfg):
    with pytest.raises(ConfigError, match="train.compile"):
        make_cfg(train={"compile": "yes"})
