"""The demo's toy world: rendering, captions and the pixel reward."""

from __future__ import annotations

import pytest
import torch

from sdpo.train import toy


def test_reward_is_high_for_matching_images_and_low_for_wrong_attributes():
    generator = torch.Generator().manual_seed(0)
    for spec in toy.all_specs():
        image = toy.render(spec, 16, generator)
        assert toy.reward(image[None], [spec.caption]).item() > 0.8, spec
        for wrong in (
            toy.ToySpec(
                next(c for c in toy.COLORS if c != spec.color), spec.shape, spec.background
            ),
            toy.ToySpec(
                spec.color, next(s for s in toy.SHAPES if s != spec.shape), spec.background
            ),
            toy.ToySpec(
                spec.color, spec.shape, next(b for b in toy.BACKGROUNDS if b != spec.background)
            ),
        ):
            # One attribute wrong costs about a third of the reward.
            assert 0.55 < toy.reward(image[None], [wrong.caption]).item() < 0.75, (spec, wrong)


def test_empty_or_noise_images_score_zero():
    caption = toy.all_specs()[0].caption
    blank = torch.full((1, 3, 16, 16), -1.0)
    noise = torch.rand((8, 3, 16, 16), generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert toy.reward(blank, [caption]).item() == 0.0
    assert toy.reward(noise, [caption] * 8).max().item() < 0.05


def test_label_noise_lowers_the_data_reward_as_expected():
    clean = toy.captioned_images(96, 16, 0.0, seed=0)
    noisy = toy.captioned_images(96, 16, 0.3, seed=0)
    assert toy.reward(clean.images, clean.captions).mean() > 0.95
    # Each attribute is right with probability 0.7: the mean reward is about 0.7.
    assert 0.6 < toy.reward(noisy.images, noisy.captions).mean() < 0.8


def test_pairs_put_the_preferred_image_first_and_are_deterministic():
    first = toy.preference_pairs(16, 16, 0.3, seed=3)
    again = toy.preference_pairs(16, 16, 0.3, seed=3)
    assert torch.equal(first.winners, again.winners) and first.captions == again.captions
    assert torch.all(first.winner_rewards >= first.loser_rewards + 0.05)
    torch.testing.assert_close(toy.reward(first.winners, first.captions), first.winner_rewards)


def test_bad_captions_are_clear_errors():
    with pytest.raises(ValueError, match="caption: expected 'a COLOR SHAPE"):
        toy.ToySpec.from_caption("a red thing")
    with pytest.raises(ValueError, match="unknown attribute"):
        toy.ToySpec.from_caption("a purple circle on a white background")
