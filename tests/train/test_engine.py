"""The GPU engine's CPU-testable half: the graph-ready step is today's step, the prefetcher delivers
``make_micro_batch``'s batches, and precision / graph options resolve per device.

Fast tier, no Ray. Step comparisons run in float64 (``train.dtype``): both paths run the same
kernels in the same order, so they agree to float64 rounding on any CPU; in float32 AdamW's
``m / sqrt(v)`` would amplify last-bit differences of near-zero gradients into visible ones.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raydb.config import ConfigError, load_config
from raydb.models.components import load_components
from raydb.storage import Storage
from raydb.train.data import make_micro_batch
from raydb.train.device_options import resolve_mixed_precision, use_cuda_graphs
from raydb.train.graphs import GraphStep, tensor_lr
from raydb.train.local import prepare_training_data
from raydb.train.prefetch import BatchPrefetcher
from raydb.train.step import build_train_state
from tests.helpers.tiny import training_setup

EXACT = {"rel": 1e-12, "abs": 1e-15}


def _lora(state) -> dict[str, torch.Tensor]:
    lora = {k: p.detach().clone() for k, p in state.unet.named_parameters() if "lora_" in k}
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(state, name)
        if encoder is not None:
            lora |= {f"te.{name}.{k}": p.detach().clone()
                     for k, p in encoder.named_parameters() if "lora_" in k}
    return lora


def test_engine_seams_run_the_same_step(make_cfg, tmp_path, class_images_dir):
    """``TrainEngine``'s measuring seams (what ``bench/`` drives): batches built in the calling
    thread (``prefetch=False``) and the graph step forced on (its eager path on the CPU) give the
    default engine's steps — the very numbers, not a copy's."""
    from raydb.train.engine import TrainEngine

    cfg = make_cfg(workspace=str(tmp_path / "ws"), prior={"class_data": class_images_dir},
                   train={"dtype": "float64", "gradient_accumulation_steps": 2, "max_steps": 3,
                          "resolution": 32, "lr_scheduler": "linear", "lr_warmup_steps": 1,
                          "learning_rate": 1e-2, "max_grad_norm": 0.05})
    runs = {}
    for name, seams in (("default", {}), ("no prefetch", {"prefetch": False}),
                        ("graph step", {"graph_step": True}), ("eager", {"graph_step": False})):
        comps, data, state = training_setup(cfg, torch.float64)
        with TrainEngine(cfg, state, data, noise_scheduler=comps.noise_scheduler,
                         prediction_type=comps.prediction_type, vae=comps.vae, device="cpu",
                         **seams) as engine:
            assert (engine.prefetcher is None) == (name == "no prefetch")
            assert (engine.graph_step is not None) == (name == "graph step")  # auto: off on CPU
            runs[name] = ([engine.step() for _ in range(3)], _lora(state))
            if engine.graph_step is not None:
                assert not engine.graph_step.captured and not engine.graph_step.capture
    keys = ("loss", "loss_instance", "loss_prior", "grad_norm", "grad_norm_clipped", "lr", "images")
    base, base_lora = runs["default"]
    for name, (metrics, lora) in runs.items():
        for a, b in zip(base, metrics, strict=True):
            for key in keys:
                if name == "graph step":  # same kernels, its own (flat-buffer) gradient layout
                    assert b[key] == pytest.approx(a[key], **EXACT), (name, key)
                else:  # the same function on the same tensors: bit for bit
                    assert b[key] == a[key], (name, key)
        for key in base_lora:
            torch.testing.assert_close(lora[key], base_lora[key], rtol=1e-9, atol=1e-12)


def test_graph_step_refuses_a_new_shape_and_capture_on_cpu(make_cfg):
    cfg = make_cfg(train={"dtype": "float64", "resolution": 32})
    comps, data, state = training_setup(cfg, torch.float64)
    kw = dict(noise_scheduler=comps.noise_scheduler, prediction_type=comps.prediction_type,
              with_prior=data.with_prior, vae=comps.vae)
    with pytest.raises(ValueError, match="train.cuda_graphs.*CUDA"):
        GraphStep(state, cfg, capture=True, **kw)
    step = GraphStep(state, cfg, capture=False, **kw)
    one = [make_micro_batch(data, step=0, micro=0, batch_size=1, accumulation=1, seed=0,
                            num_train_timesteps=1000)]
    step(one)
    two = [make_micro_batch(data, step=1, micro=0, batch_size=2, accumulation=1, seed=0,
                            num_train_timesteps=1000)]
    with pytest.raises(ValueError, match="changed shape"):
        step(two)


def test_graph_step_refuses_fp16_grad_scaler(make_cfg):
    cfg = make_cfg(train={"mixed_precision": "fp16"})
    comps = load_components(cfg.model, Storage(), cfg.workspace)
    state = build_train_state(cfg, comps.unet, comps.text_encoder)
    assert state.scaler is not None
    with pytest.raises(ValueError, match="train.mixed_precision.*GradScaler"):
        GraphStep(state, cfg, noise_scheduler=comps.noise_scheduler, prediction_type="epsilon",
                  with_prior=True, vae=comps.vae, capture=False)


def test_tensor_lr_checkpoints_as_a_float():
    param = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([param], lr=0.5, foreach=False)
    tensor_lr(opt)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    saved = opt.state_dict()
    assert saved["param_groups"][0]["lr"] == 0.5 and isinstance(saved["param_groups"][0]["lr"], float)
    opt.load_state_dict(saved)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    lr = opt.param_groups[0]["lr"]
    sched.step()
    assert opt.param_groups[0]["lr"] is lr and float(lr) == 0.25  # filled in place


# ---------------------------------------------------------------- the prefetcher


@pytest.fixture(scope="module")
def prefetch_data(tmp_path_factory, class_images_dir):
    """Encoded tiny training data, prepared once for the prefetcher tests."""
    root = tmp_path_factory.mktemp("prefetch")
    cfg = load_config(data={
        "workspace": str(root / "ws"), "model": {"pretrained": "tiny", "cache_dir": str(root / "c")},
        "prior": {"class_data": class_images_dir, "num_class_images": 4},
        "train": {"resolution": 64, "gradient_accumulation_steps": 2, "batch_size": 2}})
    storage = Storage()
    comps = load_components(cfg.model, storage, cfg.workspace)
    return cfg.train, prepare_training_data(cfg, comps, storage)


def test_prefetcher_yields_make_micro_batch(prefetch_data):
    """Same tensors, same order, from step 0 or a resume at ``start``, for any rank."""
    tc, data = prefetch_data
    assert data.with_prior
    for start, rank, world in ((0, 0, 1), (3, 0, 1), (2, 1, 2)):
        with BatchPrefetcher(data, tc, start_step=start, num_train_timesteps=1000, rank=rank,
                             world_size=world, depth=2) as pre:
            for step in range(start, start + 3):
                got = pre.next()
                assert len(got) == tc.gradient_accumulation_steps
                for m, batch in enumerate(got):
                    want = make_micro_batch(data, step=step, micro=m, batch_size=tc.batch_size,
                                            accumulation=tc.gradient_accumulation_steps,
                                            seed=tc.seed, num_train_timesteps=1000, rank=rank,
                                            world_size=world)
                    for name, value in want.__dict__.items():
                        if value is None:
                            assert getattr(batch, name) is None, name
                        else:
                            assert torch.equal(getattr(batch, name), value), (step, m, name)


def test_prefetcher_stops_and_reports_errors(prefetch_data):
    tc, data = prefetch_data
    with BatchPrefetcher(data, tc, start_step=0, num_train_timesteps=1000, stop_step=2) as pre:
        pre.next(), pre.next()
        assert pre.step == 2
        with pytest.raises(RuntimeError, match="stop at 2"):  # an error, not a wait for ever
            pre.next()
    broken = dataclasses.replace(data, latent_shape=(-1, 1, 1))  # torch.randn refuses it
    with BatchPrefetcher(broken, tc, start_step=0, num_train_timesteps=1000) as pre:
        with pytest.raises(RuntimeError):
            pre.next()


# ---------------------------------------------------------------- options per device


def test_mixed_precision_auto_resolves_per_device(make_cfg, monkeypatch):
    tc = make_cfg(train={"mixed_precision": "auto"}).train
    assert resolve_mixed_precision(tc, "cpu") == "no"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_mixed_precision(tc, "cuda:0") == "bf16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert resolve_mixed_precision(tc, "cuda:0") == "fp16"
    assert use_cuda_graphs(tc, "cuda:0") is False  # auto: fp16's GradScaler cannot be captured
    f64 = make_cfg(train={"mixed_precision": "auto", "dtype": "float64"}).train
    assert resolve_mixed_precision(f64, "cuda:0") == "no"
    explicit = make_cfg(train={"mixed_precision": "bf16"}).train
    assert resolve_mixed_precision(explicit, "cpu") == "bf16"


def test_cuda_graphs_resolve_per_device(make_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    auto = make_cfg(train={"cuda_graphs": "auto", "mixed_precision": "auto"}).train
    assert use_cuda_graphs(auto, "cpu") is False
    assert use_cuda_graphs(auto, "cuda:0") is True
    assert use_cuda_graphs(make_cfg(train={"cuda_graphs": "off"}).train, "cuda:0") is False
    on = make_cfg(train={"cuda_graphs": "on"}).train
    with pytest.raises(ValueError, match="train.cuda_graphs.*CUDA device.*cpu"):
        use_cuda_graphs(on, "cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ValueError, match="train.cuda_graphs.*fp16.*GradScaler"):
        use_cuda_graphs(make_cfg(train={"cuda_graphs": "on", "mixed_precision": "auto"}).train,
                        "cuda:0")


def test_config_refuses_fp16_graphs_and_names_the_field(make_cfg):
    assert make_cfg().train.mixed_precision == "auto" and make_cfg().train.cuda_graphs == "auto"
    with pytest.raises(ConfigError, match=r"train.*cuda_graphs.*fp16.*GradScaler"):
        make_cfg(train={"cuda_graphs": "on", "mixed_precision": "fp16"})
    with pytest.raises(ConfigError, match=r"train\.cuda_graphs"):
        make_cfg(train={"cuda_graphs": "yes"})
    assert make_cfg(train={"cuda_graphs": "auto", "mixed_precision": "fp16"}).train  # auto: off
    assert make_cfg(train={"dtype": "float64"}).train.mixed_precision == "auto"  # no on CPU
    with pytest.raises(ConfigError, match=r"train.*float64.*bf16"):
        make_cfg(train={"dtype": "float64", "mixed_precision": "bf16"})
