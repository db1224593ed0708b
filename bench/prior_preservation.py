"""The prior-preservation finding on the tiny model: val_instance / val_prior for λ = 0 and λ = 1.

Usage: python bench/prior_preservation.py [--steps 100] [--lr 3e-3] [--out docs/prior_preservation.png]
Same seeds, batches, steps and learning rate for both runs; only prior_loss_weight differs.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raydb.config import load_config
    from raydb.testing import prior_preservation_finding

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="docs/prior_preservation.png")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as ws:
        cfg = load_config(data={
            "workspace": ws,
            "train": {"resolution": 64, "max_steps": args.steps, "learning_rate": args.lr},
            "prior": {"num_class_images": 4, "num_holdout": 4, "sample_batch_size": 2,
                      "num_inference_steps": 2}})
        r = prior_preservation_finding(cfg)
    rows = [("base model", r["base"]), ("λ = 0 (no prior)", r["lambda_0"]),
            ("λ = 1 (prior preservation)", r["lambda_1"])]
    print(f"tiny model, 64 px, {args.steps} steps, lr {args.lr:g}, seed 0")
    print(f"{'run':28s} {'val_instance':>13s} {'val_prior':>10s}")
    for name, m in rows:
        print(f"{name:28s} {m['val_instance']:13.4f} {m['val_prior']:10.4f}")
    ratio = r["lambda_1"]["val_prior"] / r["lambda_0"]["val_prior"]
    inst = r["lambda_1"]["val_instance"] / r["lambda_0"]["val_instance"]
    print(f"val_prior  λ=1 / λ=0: {ratio:.3f}")
    print(f"val_instance λ=1 / λ=0: {inst:.3f}")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    width = 0.38
    xs = range(len(rows))
    ax.bar([x - width / 2 for x in xs], [m["val_instance"] for _, m in rows], width, label="val_instance")
    ax.bar([x + width / 2 for x in xs], [m["val_prior"] for _, m in rows], width, label="val_prior")
    ax.set_xticks(list(xs), [n for n, _ in rows])
    ax.set_ylabel("denoising MSE, fixed noise (lower is better)")
    lo = min(min(m["val_instance"], m["val_prior"]) for _, m in rows)
    ax.set_ylim(lo * 0.9, None)
    ax.set_title(f"prior preservation on the tiny model ({args.steps} steps, lr {args.lr:g})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
