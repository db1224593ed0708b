"""raydb.fidelity.metrics: the figures from judged samples, checked on real digits with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from raydb.data.digits import (
    SUBJECT_BACKGROUND,
    SUBJECT_INK,
    load_digit_ink,
    render,
    subject_images,
    upsample_ink,
)
from raydb.fidelity.judge import ColourTrait, DigitJudge
from raydb.fidelity.metrics import fidelity_figures, fidelity_score, standard_error, subject_digit


@pytest.fixture(scope="module")
def setup():
    ink, labels = load_digit_ink()
    ink32 = upsample_ink(ink, 32)
    judge = DigitJudge(resolution=32)
    return judge, ColourTrait.of(subject_images(32)), ink32, torch.from_numpy(labels)


def _draw(ink32: torch.Tensor, *, subject_colours: bool) -> torch.Tensor:
    n = ink32.shape[0]
    if subject_colours:
        ink = torch.tensor(SUBJECT_INK, dtype=torch.float32) / 255
        background = torch.tensor(SUBJECT_BACKGROUND, dtype=torch.float32) / 255
        return render(ink32, ink.expand(n, 3), background.expand(n, 3))
    return render(ink32, torch.zeros(n, 3), torch.ones(n, 3))


def test_figures_count_what_they_say(setup):
    judge, trait, ink32, labels = setup
    threes = ink32[labels == 3][:20]
    fives = ink32[labels == 5][:20]
    # instance samples: 15 red threes, 5 red fives -> fidelity 15/20 (trait AND right digit)
    instance = torch.cat([_draw(threes[:15], subject_colours=True), _draw(fives[:5], subject_colours=True)])
    # class samples: 8 red threes (drift), 12 black threes
    class_samples = torch.cat([_draw(threes[:8], subject_colours=True),
                               _draw(threes[8:], subject_colours=False)])
    others = {d: _draw(ink32[labels == d][:10], subject_colours=d == 7) for d in range(10) if d != 3}
    f = fidelity_figures(judge, trait, 3, instance=instance, class_samples=class_samples, others=others)
    assert f["subject_fidelity"] == pytest.approx(0.75, abs=0.051)  # the judge may misread one
    assert f["drift"] == pytest.approx(8 / 20)
    assert f["class_accuracy"] >= 0.95
    assert f["other_class_accuracy"] >= 0.95
    assert f["other_class_trait"] == pytest.approx(1 / 9)  # the red sevens
    assert f["drift_se"] == pytest.approx(math.sqrt(0.4 * 0.6 / 20))
    assert f["diversity"] > 0 and f["diversity_se"] > 0
    score = fidelity_score(f)
    assert score == pytest.approx((f["subject_fidelity"] + 1 - f["drift"] + f["class_accuracy"]) / 3)


def test_only_the_given_sample_sets_are_scored(setup):
    judge, trait, ink32, labels = setup
    f = fidelity_figures(judge, trait, 3, instance=_draw(ink32[labels == 3][:5], subject_colours=True))
    assert set(f) == {"subject_fidelity", "subject_fidelity_se"} and f["subject_fidelity"] == 1.0


def test_subject_digit_is_the_majority_reading(setup):
    judge, _, ink32, labels = setup
    assert subject_digit(judge, subject_images(32)) == 3
    mixed = torch.cat([_draw(ink32[labels == 8][:3], subject_colours=False),
                       _draw(ink32[labels == 2][:2], subject_colours=False)])
    assert subject_digit(judge, mixed) == 8


def test_standard_error():
    assert standard_error(0.5, 100) == pytest.approx(0.05)
    assert standard_error(1.0, 50) == 0.0
    assert math.isnan(standard_error(0.5, 0))


@pytest.mark.heavy
def test_samples_do_not_depend_on_their_batch_mates(tmp_path):
    from raydb.config import load_config
    from raydb.fidelity.metrics import sample_images
    from raydb.models.components import load_pipeline
    from raydb.storage import Storage

    cfg = load_config(data={"workspace": str(tmp_path), "model": {"pretrained": "tiny"}})
    pipe = load_pipeline(cfg.model, Storage(), cfg.workspace)
    together = sample_images(pipe, "a photo of a dog", [0, 1, 2], steps=2, batch=3)
    apart = sample_images(pipe, "a photo of a dog", [0, 1, 2], steps=2, batch=1)
    assert together.shape == (3, 3, 64, 64) and not torch.equal(together[0], together[1])
    assert torch.allclose(together, apart, atol=1e-4)
