"""raydb.fidelity.judge: the digit classifier (held-out accuracy, colour-blind) and the trait detector."""

from __future__ import annotations

import pytest
import torch

from raydb.data.digits import load_digit_ink, render, subject_images, upsample_ink
from raydb.fidelity.judge import ColourTrait, DigitJudge, ink_and_background_colours, ink_maps


@pytest.fixture(scope="module")
def judge() -> DigitJudge:
    return DigitJudge(resolution=32)


@pytest.fixture(scope="module")
def digits():
    ink, labels = load_digit_ink()
    return upsample_ink(ink, 32), labels


def _coloured(ink32: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = ink32.shape[0]
    return render(ink32, torch.rand(n, 3, generator=g), torch.rand(n, 3, generator=g))


def test_classifier_held_out_accuracy_is_at_least_95_percent_and_deterministic(judge):
    assert judge.held_out_accuracy >= 0.95
    assert judge.num_held_out == 450
    assert DigitJudge(resolution=32).held_out_accuracy == judge.held_out_accuracy


def test_classifier_reads_digits_in_any_colours(judge, digits):
    ink32, labels = digits
    n = 600
    black_on_white = render(ink32[:n], torch.zeros(n, 3), torch.ones(n, 3))
    coloured = _coloured(ink32[:n], seed=1)
    # low-contrast colour pairs are hard for anyone: judge the ones with visible ink
    x = coloured.permute(0, 2, 3, 1)
    contrast = (x.amax(dim=(1, 2)) - x.amin(dim=(1, 2))).norm(dim=1) > 0.3
    assert (judge.classify(black_on_white) == labels[:n]).mean() >= 0.97
    assert (judge.classify(coloured[contrast]) == labels[:n][contrast.numpy()]).mean() >= 0.95


def test_ink_maps_are_colour_blind(digits):
    from raydb.data.digits import SUBJECT_INDICES

    ink32, _ = digits
    black_on_white = render(ink32[:20], torch.zeros(20, 3), torch.ones(20, 3))
    ink_bw, background = ink_maps(black_on_white)
    assert torch.allclose(background, torch.ones(20, 3))
    # black on white: the drawn ink, stretched to the image's contrast (its 99th percentile)
    stretched = (ink32[:20] / ink32[:20].flatten(1).quantile(0.99, dim=1)[:, None, None]).clamp(0, 1)
    assert (ink_bw - stretched).abs().max() < 1e-4
    # the subject's threes in red on yellow give (nearly) the maps of the same threes in black on white
    idx = list(SUBJECT_INDICES)
    same_bw = ink_maps(render(ink32[idx], torch.zeros(5, 3), torch.ones(5, 3)))[0]
    red_on_yellow = ink_maps(subject_images(32))[0]
    assert (red_on_yellow - same_bw).abs().mean() < 0.03


def test_blank_images_have_no_ink():
    flat = torch.full((2, 3, 32, 32), 0.7)
    flat[1] += 0.01 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0))
    ink, _ = ink_maps(flat)
    assert ink.max() < 0.3
    colour, background = ink_and_background_colours(flat[:1])
    assert torch.allclose(colour, background)


def test_trait_is_the_subjects_colouring_and_nothing_else(digits):
    ink32, _ = digits
    trait = ColourTrait.of(subject_images(32))
    n = 500
    assert trait.present(subject_images(32)).all()
    assert not trait.present(render(ink32[:n], torch.zeros(n, 3), torch.ones(n, 3))).any()
    assert trait.present(_coloured(ink32[:n], seed=2)).mean() < 0.05
    # the subject's colours on other digits still show the trait (drift onto other classes)
    red = torch.tensor([200, 25, 25]) / 255
    yellow = torch.tensor([250, 215, 50]) / 255
    assert trait.present(render(ink32[:n], red.expand(n, 3), yellow.expand(n, 3))).mean() > 0.95
    # half-way to black on white is nearer to it on one side: not the trait
    half_ink, half_bg = red / 2, (yellow + 1) / 2
    half_way = render(ink32[:n], half_ink.expand(n, 3), (half_bg + 0.1).clamp(0, 1).expand(n, 3))
    assert not trait.present(half_way).any()


def test_black_on_white_subject_has_no_detectable_trait(digits):
    ink32, _ = digits
    with pytest.raises(ValueError, match="black on white"):
        ColourTrait.of(render(ink32[:5], torch.zeros(5, 3), torch.ones(5, 3)))


def test_diversity_is_zero_for_copies_and_grows_with_variety(digits):
    ink32, labels = digits
    one = render(ink32[:1].expand(10, 32, 32), torch.zeros(10, 3), torch.ones(10, 3))
    value, se = DigitJudge.diversity(one)
    assert value == pytest.approx(0.0, abs=1e-6) and se == pytest.approx(0.0, abs=1e-6)
    threes = ink32[torch.from_numpy(labels == 3)][:40]
    mixed = ink32[:40]
    div_threes, se_threes = DigitJudge.diversity(render(threes, torch.zeros(40, 3), torch.ones(40, 3)))
    div_mixed, _ = DigitJudge.diversity(render(mixed, torch.zeros(40, 3), torch.ones(40, 3)))
    assert 0 < div_threes < div_mixed and 0 < se_threes < div_threes / 5
    # colour-blind: the same threes in the subject's colours are as diverse
    red, yellow = torch.tensor([0.8, 0.1, 0.1]), torch.tensor([1.0, 0.85, 0.2])
    recoloured = render(threes, red.expand(40, 3), yellow.expand(40, 3))
    assert DigitJudge.diversity(recoloured)[0] == pytest.approx(div_threes, rel=0.05)
    with pytest.raises(ValueError, match="at least 3"):
        DigitJudge.diversity(one[:2])
