"""``prior.mode``: class images (``images``) vs. the frozen base model's own prediction (``model``).

The pin below was recorded before ``prior.mode`` existed: image-mode training must stay what it was.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors.torch import load as st_load

from raydb.train.local import train_subject

# Recorded on 2026-12-04 from the code before prior.mode (commit 481bc29): a float64 run of three
# optimizer steps, two accumulated micro-batches each, clipped, through train_subject. The adapter
# file holds the float64 master weights rounded to fp32 and the logged losses are fp32 too, so
# platforms whose float64 kernels differ in the last bits (~1e-16 relative: BLAS, FMA, threads)
# still agree on every one of these bits; a change of the algorithm — draws, chunking, target,
# weighting, accumulation, clipping — changes them all.
IMAGE_MODE_PINS = {
    "sd": ("6ef647a8b5a2e331508dd15c8fb5264f08fc0147bb959dbd11ce063702cd1d45",
           [1.8205196857452393, 1.9079065322875977, 1.8032903671264648],
           [0.9695603251457214, 1.1997005939483643, 1.048168659210205]),
    "sd-text-encoder": ("b484f64b98fb634c13cd847e9ca883dc8d8d7540b78529f88fcfa39b9c8f25c8",
                        [1.8205196857452393, 1.910245656967163, 1.8009600639343262],
                        [0.9695603251457214, 1.2012287378311157, 1.0480717420578003]),
    "sdxl": ("7c5bf222df1272396c129c1ab8e49a8dcbebf0269442fad5b414aa61d2b1e385",
             [1.798067331314087, 1.8741662502288818, 1.772925615310669],
             [0.9925975799560547, 1.180540919303894, 1.0412647724151611]),
}


def _pinned_run(make_cfg, workspace: str, class_dir: str, variant: str, **prior) -> tuple[str, list, list]:
    """(sha256 of the adapter's tensors, losses, prior losses) of the pinned float64 run."""
    cfg = make_cfg(
        workspace=workspace,
        model={"pretrained": "tiny-sdxl" if variant == "sdxl" else "tiny"},
        prior={"class_data": class_dir, "num_class_images": 3, **prior},
        lora={"train_text_encoder": variant == "sd-text-encoder"},
        train={"max_steps": 3, "gradient_accumulation_steps": 2, "dtype": "float64",
               "mixed_precision": "no", "max_grad_norm": 0.05, "prior_loss_weight": 0.7, "seed": 3})
    run = Path(train_subject(cfg, quiet=True, register=False, samples=False)["run_dir"])
    weights = st_load((run / "adapter" / "pytorch_lora_weights.safetensors").read_bytes())
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].numpy().tobytes())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return digest.hexdigest(), [r["loss"] for r in rows], [r["loss_prior"] for r in rows]


@pytest.mark.heavy
@pytest.mark.parametrize("variant", sorted(IMAGE_MODE_PINS))
def test_image_mode_is_the_recorded_run(make_cfg, tmp_path, class_images_dir, variant):
    assert _pinned_run(make_cfg, str(tmp_path / "ws"), class_images_dir, variant) == IMAGE_MODE_PINS[variant]
