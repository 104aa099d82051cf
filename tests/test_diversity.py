"""The diversity metric: the mean distance between outputs of the same prompt, checked against hand computations."""

import math

import pytest
import torch

from rebel_diffusion.policies import same_prompt_pairs
from rebel_diffusion.policies.causal_lm import CausalLMPolicy
from rebel_diffusion.policies.lcm import LCMPolicy
from rebel_diffusion.trainer import epoch_summary

# diversity reads nothing of the policy's model: a bare instance is enough.
IMAGES, TEXT = object.__new__(LCMPolicy), object.__new__(CausalLMPolicy)


def test_pairs_are_every_two_positions_of_the_same_prompt():
    assert same_prompt_pairs(["a", "b", "a", "a", "c"]) == ([0, 0, 2], [2, 3, 3])
    assert same_prompt_pairs(["a", "b"]) == ([], [])


def test_two_identical_images_have_diversity_zero():
    image = torch.rand(1, 3, 4, 4)
    assert IMAGES.diversity(torch.cat([image, image]), ["p", "p"]) == 0.0


def test_image_diversity_is_the_mean_rms_pixel_difference_over_same_prompt_pairs():
    black, white = torch.zeros(3, 2, 2), torch.ones(3, 2, 2)
    one_grey = black.clone()
    one_grey[1, 0, 1] = 0.5  # one of the 12 values differs from black, by 0.5
    other = torch.full((3, 2, 2), 0.25)  # alone with its prompt: in no pair
    outputs = torch.stack([black, other, white, one_grey])
    prompts = ["p", "q", "p", "p"]
    # Pairs of "p": black-white (RMS 1), black-one_grey (sqrt(0.25 / 12)), white-one_grey (sqrt((11 + 0.25) / 12)).
    want = (1 + math.sqrt(0.25 / 12) + math.sqrt(11.25 / 12)) / 3
    assert IMAGES.diversity(outputs, prompts) == pytest.approx(want, rel=1e-6)
    assert math.isnan(IMAGES.diversity(torch.stack([black, white]), ["p", "q"]))  # no prompt twice: no pair


def test_text_diversity_is_the_fraction_of_same_prompt_pairs_that_differ():
    outputs = ["5", "7", "5", "6", "7"]
    prompts = ["1+4=", "3+4=", "1+4=", "1+4=", "3+4="]
    # "1+4=": 5/5 same, 5/6 and 5/6 differ; "3+4=": 7/7 same -> 2 of 4 pairs differ.
    assert TEXT.diversity(outputs, prompts) == 0.5
    assert TEXT.diversity(["5", "5"], ["1+4=", "1+4="]) == 0.0
    assert math.isnan(TEXT.diversity(["5"], ["1+4="]))


def test_the_epoch_summary_line():
    metrics = {"epoch": 2, "reward_mean": 0.8123, "kl": 0.0312, "diversity": 0.21, "seconds": 12.34, "lr": 1e-3}
    line = epoch_summary(3, 24, metrics, {"epoch": 3, "eval_shape_accuracy": 0.78})
    assert line == "epoch 3/24  reward 0.812  kl 0.031  diversity 0.210  eval_shape_accuracy 0.780  12.3 s"
    assert epoch_summary(0, 24, {}, {"epoch": 0, "eval_x": 0.5}) == "epoch 0/24  eval_x 0.500"
    assert "kl 2.50e-08" in epoch_summary(1, 2, {"reward_mean": 1.0, "kl": 2.5e-8}, {})
