"""Tests of weighted reward specs ("a:1.0,b:0.5") and of the validation of every reward's output."""

from __future__ import annotations

import sys

import pytest
import torch

from rebel_diffusion.rewards import (
    WeightedReward,
    check_reward_name,
    make_reward_fn,
    make_weighted_reward,
    parse_reward_spec,
    register_reward,
    reward_kind,
)
from rebel_diffusion.rewards.jpeg import jpeg_size_kb

USER_MODULE = "rebel_test_user_rewards"
USER_CODE = """
import numpy as np
import torch

def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))

def as_list(images, prompts):
    return [1.0] * len(prompts)

def too_short(images, prompts):
    return [1.0]

def column(images, prompts):
    return torch.zeros(len(prompts), 1)

def strings(images, prompts):
    return ["good"] * len(prompts)

def complex_scores(images, prompts):
    return torch.zeros(len(prompts), dtype=torch.complex64)

def nones(images, prompts):
    return [None] * len(prompts)
"""


@pytest.fixture(autouse=True)
def user_module(tmp_path, monkeypatch):
    (tmp_path / f"{USER_MODULE}.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop(USER_MODULE, None)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@register_reward("test_text_length", kind="text")
def _text_length(device=None, dtype=None):
    return lambda responses, prompts: torch.tensor([float(len(r)) for r in responses])


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("jpeg_compressibility", [("jpeg_compressibility", 1.0)]),
        ("jpeg_compressibility:2", [("jpeg_compressibility", 2.0)]),
        (" jpeg_compressibility:1.0 , jpeg_incompressibility:-0.5 ", [("jpeg_compressibility", 1.0),
                                                                     ("jpeg_incompressibility", -0.5)]),
        (f"{USER_MODULE}:brightness", [(f"{USER_MODULE}:brightness", 1.0)]),
        (f"{USER_MODULE}:brightness:0.5", [(f"{USER_MODULE}:brightness", 0.5)]),
        (f"jpeg_compressibility,{USER_MODULE}:brightness:1e-2", [("jpeg_compressibility", 1.0),
                                                                 (f"{USER_MODULE}:brightness", 0.01)]),
    ],
)
def test_parse_reward_spec(spec, expected):
    assert parse_reward_spec(spec) == expected
    check_reward_name(spec)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("jpeg_compressibility,beauty:0.5", "unknown reward 'beauty'"),
        ("jpeg_compressibility:heavy", "weight 'heavy' is not a number"),
        (f"{USER_MODULE}:brightness:abc", "weight 'abc' is not a number"),
        ("jpeg_compressibility:nan", "not a finite number"),
        ("jpeg_compressibility,,jpeg_incompressibility", "empty component"),
        ("jpeg_compressibility:1,jpeg_compressibility:2", "more than once"),
        ("jpeg_compressibility,test_text_length", "mixes image and text"),
        (f"jpeg_compressibility,{USER_MODULE}:missing", "has no function 'missing'"),
    ],
)
def test_bad_specs_are_one_line_value_errors(spec, message):
    for check in (parse_reward_spec, check_reward_name):
        with pytest.raises(ValueError, match=message) as error:
            check(spec)
        assert "\n" not in str(error.value)


def test_reward_kind_of_specs():
    assert reward_kind("jpeg_compressibility:1,jpeg_incompressibility:2") == "image"
    assert reward_kind(f"jpeg_compressibility,{USER_MODULE}:brightness") == "image"
    assert reward_kind(f"{USER_MODULE}:brightness:2") == "any"
    assert reward_kind("test_text_length:3") == "text"
    assert reward_kind("unknown_name") == "any"  # unchanged: names are checked by check_reward_name
    with pytest.raises(ValueError, match="mixes image and text"):
        reward_kind("jpeg_compressibility,test_text_length")


def test_weighted_total_and_components(images):
    prompts = ["a", "b", "c"]
    reward = make_weighted_reward(f"jpeg_incompressibility:0.5,{USER_MODULE}:brightness:-2")
    assert isinstance(reward, WeightedReward)
    assert reward.names == ["jpeg_incompressibility", f"{USER_MODULE}:brightness"]
    total = reward(images, prompts)
    size, brightness = jpeg_size_kb(images), images.mean(dim=(1, 2, 3))
    assert total.shape == (3,) and total.dtype == torch.float32
    torch.testing.assert_close(total, 0.5 * size - 2 * brightness)
    torch.testing.assert_close(reward.last_components["jpeg_incompressibility"], size)
    torch.testing.assert_close(reward.last_components[f"{USER_MODULE}:brightness"], brightness)
    # make_reward_fn builds the same for a spec, so the trainer's reward.name accepts lists unchanged.
    torch.testing.assert_close(make_reward_fn(f"jpeg_incompressibility:0.5,{USER_MODULE}:brightness:-2")(images, prompts),
                               total)


def test_single_unweighted_name_is_todays_reward(images):
    single = make_weighted_reward("jpeg_compressibility")
    assert torch.equal(single(images, ["a"] * 3), make_reward_fn("jpeg_compressibility")(images, ["a"] * 3))
    assert torch.equal(single.last_components["jpeg_compressibility"], -jpeg_size_kb(images))
    assert not isinstance(make_reward_fn("jpeg_compressibility"), WeightedReward)


def test_factories_receive_their_options_in_a_spec(images):
    seen = []

    @register_reward("test_scaled_mean")
    def factory(device=None, dtype=None, scale: float = 1.0):
        seen.append(scale)
        return lambda outputs, prompts: scale * outputs.mean(dim=(1, 2, 3))

    reward = make_weighted_reward("test_scaled_mean:2,jpeg_compressibility:0", scale=3.0, head_path="/x")
    torch.testing.assert_close(reward(images, ["a"] * 3), 6 * images.mean(dim=(1, 2, 3)))
    assert seen == [3.0]


def test_list_scores_become_float32_tensors(images):
    scores = make_reward_fn(f"{USER_MODULE}:as_list")(images, ["a", "b", "c"])
    assert isinstance(scores, torch.Tensor) and scores.dtype == torch.float32 and scores.tolist() == [1.0] * 3


@pytest.mark.parametrize(
    "function, message",
    [
        ("too_short", r"shape \(1,\) for 3 outputs"),
        ("column", r"shape \(3, 1\)"),
        ("strings", "expected numbers"),
        ("nones", "expected numbers"),
        ("complex_scores", "expected real numbers"),
    ],
)
def test_bad_reward_outputs_name_the_reward(images, function, message):
    name = f"{USER_MODULE}:{function}"
    for build in (make_reward_fn, make_weighted_reward):
        with pytest.raises(ValueError, match=f"reward '{name}' returned .*{message}") as error:
            build(name)(images, ["a", "b", "c"])
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=f"reward '{name}'"):
        make_weighted_reward(f"jpeg_compressibility,{name}:2")(images, ["a", "b", "c"])
