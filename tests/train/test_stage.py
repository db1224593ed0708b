"""Ray Train integration: TorchTrainer + DDP on a local CPU cluster with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raydb.data.demo_subject import demo_images
from tests.helpers.images import image_folder
from tests.helpers.runs import adapter_tensors, run_metrics

pytestmark = pytest.mark.ray


def _one_worker_and_many(make_cfg, tmp_path, workers: int, prior: dict, subject: dict | None = None):
    """The same run on 1 worker with batch ``workers`` and on ``workers`` workers with batch 1
    (float64, text-encoder LoRA too: DDP wraps only the denoiser, so the encoder's gradients must
    be averaged across workers by the step itself); returns both results."""
    from raydb.train.stage import train_distributed

    common = {"prior": prior, "subject": subject or {},
              "lora": {"train_text_encoder": True},
              "train": {"max_steps": 2, "checkpoint_every": 100, "learning_rate": 1e-2,
                        "dtype": "float64"}}
    # one workspace: the second run reuses the first one's encoded cache (the run ids differ)
    runs = []
    for num_workers, batch in ((1, workers), (workers, 1)):
        cfg = make_cfg(workspace=str(tmp_path / "ws"), cluster={"num_workers": num_workers},
                       **{**common, "train": {**common["train"], "batch_size": batch}})
        runs.append(train_distributed(cfg, quiet=True))
    return runs


def _assert_same_training(one: dict, many: dict) -> None:
    a, b = adapter_tensors(one), adapter_tensors(many)
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=2.5e-7, atol=0.0)
    la, lb = run_metrics(one), run_metrics(many)
    for x, y in zip(la, lb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6)
        # AdamW is nearly scale-invariant, so the adapters alone would barely notice summed instead
        # of averaged gradients; the (pre-clip) gradient norm doubles.
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-6)
    # and the LoRA actually moved, so the comparison is not between two untouched adapters
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k or "lora.up" in k)
    assert la[-1]["loss_prior"] > 0


def test_ddp_two_workers_match_one_worker_double_batch(ray_cluster, make_cfg, tmp_path):
    """2 workers x batch b == 1 worker x batch 2b: DDP averages gradients correctly.

    The class images are identical copies, so however Ray Data splits them across workers, every
    worker's class half is the same data as the single worker's.

    Run in float64: 1 worker with batch 2 and 2 workers with batch 1 run different CPU kernels
    (GEMM blocking, reduction order), and in float32 AdamW at lr 1e-2 turns their last-bit
    differences in a near-zero gradient into lr-sized steps, which made this test fail on some
    CPUs. In float64 those differences are ~1e-16 relative, far below Adam's eps, so the runs agree
    to ~1e-12 on any CPU. The saved adapters are float32, so they are compared to within two float32
    ulps (the one rounding of identical float64 weights can land either side).

    Summed instead of averaged gradients fail here (checked on 2026-11-27 by multiplying each
    worker's loss by the world size: the adapter comparison fails; the pre-clip gradient norm,
    compared below, doubles as well).
    """
    same = demo_images(1)[0]
    class_dir = image_folder(tmp_path / "class", [same, same, same, same])
    one, two = _one_worker_and_many(make_cfg, tmp_path, 2, {"class_data": class_dir, "num_class_images": 4})
    _assert_same_training(one, two)
    meta = json.loads((Path(two["adapter_uri"]) / "adapter.json").read_text())
    assert (meta["training"]["prior_mode"], meta["training"]["num_workers"]) == ("images", 2)
    assert not (tmp_path / "ws" / "priors").exists()  # class images given: none generated


def test_model_mode_on_four_workers_with_three_photos_matches_one_worker(ray_cluster, make_cfg, tmp_path):
    """``prior.mode: model`` on more workers than photos: 4 workers x batch 1 == 1 worker x batch 4,
    with 3 instance images. No class images exist: each worker forms its prior rows from the
    instance rows it drew and runs the frozen base pass locally, outside DDP; a worker whose
    position wraps past the last photo draws the first one again, as the single worker does."""
    photos = image_folder(tmp_path / "photos", demo_images(3))
    one, four = _one_worker_and_many(make_cfg, tmp_path, 4, {"mode": "model"}, {"instance_data": photos})
    _assert_same_training(one, four)
    assert four["steps"] == 2
    meta = json.loads((Path(four["adapter_uri"]) / "adapter.json").read_text())
    assert (meta["training"]["prior_mode"], meta["training"]["num_workers"]) == ("model", 4)
    assert meta["metrics"]["num_workers"] == 4
    assert not (tmp_path / "ws" / "priors").exists()  # model mode: no class images at all


def test_too_few_class_images_for_workers_is_a_clear_error(ray_cluster, make_cfg):
    from raydb.train.stage import train_distributed

    cfg = make_cfg(cluster={"num_workers": 3}, prior={"num_class_images": 2})
    with pytest.raises(ValueError, match="prior.num_class_images"):
        train_distributed(cfg, quiet=True)
