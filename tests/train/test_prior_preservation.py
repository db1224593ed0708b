"""The finding: prior preservation keeps the class prior (val_prior) without hurting the subject
fit (val_instance) — the dual objective of shared/seeds, measured on the tiny model, fixed seeds."""

from __future__ import annotations

from raydb.testing import prior_preservation_finding


def test_prior_preservation_keeps_the_class_prior(make_cfg):
    cfg = make_cfg(train={"max_steps": 100, "learning_rate": 3e-3}, prior={"num_holdout": 4})
    result = prior_preservation_finding(cfg)
    with_prior, without = result["lambda_1"], result["lambda_0"]
    # λ = 1 ends with a clearly lower held-out class loss than λ = 0 at the same steps and lr ...
    assert with_prior["val_prior"] < 0.95 * without["val_prior"], result
    # ... while the subject fit stays within 5% of the no-prior run
    assert with_prior["val_instance"] < 1.05 * without["val_instance"], result
