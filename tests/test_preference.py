"""The preference interface: registry, `module:function` paths, and validation of what a preference returns."""

import math

import pytest
import torch

from configs.base import get_config
from rebel_diffusion.rewards import preference
from rebel_diffusion.rewards.preference import (check_preference_config, check_preference_name, make_preference_fn,
                                                register_preference, validate_probabilities)
from rebel_diffusion.sample import _preference_section, build_parser
from rebel_diffusion.trainer import ConfigError, validate_config


def longer(prompts, outputs_a, outputs_b):
    """A user preference: P(a beats b) = sigmoid(len(a) - len(b))."""
    return [1 / (1 + math.exp(len(b) - len(a))) for a, b in zip(outputs_a, outputs_b)]


def test_user_function_by_path_is_called_and_validated():
    fn = make_preference_fn(f"{__name__}:longer")
    p = fn(["x", "y"], ["aaa", "a"], ["a", "a"])
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, torch.tensor([1 / (1 + math.exp(-2)), 0.5]))


def test_registered_factory_receives_only_its_options():
    seen = {}

    @register_preference("_test_constant", kind="any")
    def constant(device=None, dtype=None, value=0.25):
        seen["value"] = value
        return lambda prompts, a, b: torch.full((len(prompts),), value)

    try:
        fn = make_preference_fn("_test_constant", value=0.75, unrelated=3)
        assert seen == {"value": 0.75}
        assert fn(["p"], ["a"], ["b"]).tolist() == [0.75]
    finally:
        preference._FACTORIES.pop("_test_constant")
        preference._KINDS.pop("_test_constant")


@pytest.mark.parametrize("bad, message", [
    ([0.5, float("nan")], "nan for pair 1"),
    ([0.5, 1.5], "1.5 for pair 1"),
    ([-0.1, 0.5], "-0.1 for pair 0"),
    ([0.5], r"shape \(1,\) for 2 pairs"),
    (["a", "b"], "not an array of numbers"),
])
def test_bad_probabilities_are_one_line_naming_the_preference(bad, message):
    with pytest.raises(ValueError, match=message) as info:
        validate_probabilities("judge", bad, 2)
    assert "'judge'" in str(info.value) and "\n" not in str(info.value)


def test_mismatched_sides_are_refused():
    fn = make_preference_fn(f"{__name__}:longer")
    with pytest.raises(ValueError, match="2 prompts but 2 and 1 outputs"):
        fn(["x", "y"], ["a", "b"], ["a"])


@pytest.mark.parametrize("name, message", [
    ("nonexistent", "unknown preference 'nonexistent'"),
    ("no_such_module_xyz:fn", "cannot import module"),
    (f"{__name__}:missing", "has no function 'missing'"),
])
def test_bad_names_are_one_line(name, message):
    with pytest.raises(ValueError, match=message):
        check_preference_name(name)


def brightness(images, prompts):
    """A user reward: each image's mean pixel value."""
    return images.mean(dim=(1, 2, 3))


def test_bradley_terry_is_the_sigmoid_of_the_reward_difference_over_the_temperature():
    images_a = torch.tensor([0.9, 0.2, 0.5]).view(3, 1, 1, 1).expand(3, 3, 4, 4)
    images_b = torch.tensor([0.1, 0.6, 0.5]).view(3, 1, 1, 1).expand(3, 3, 4, 4)
    fn = make_preference_fn("bradley_terry", reward=f"{__name__}:brightness", temperature=0.25, unrelated=1)
    p = fn(["x"] * 3, images_a, images_b)
    expected = [1 / (1 + math.exp(-(a - b) / 0.25)) for a, b in ((0.9, 0.1), (0.2, 0.6), (0.5, 0.5))]
    torch.testing.assert_close(p, torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(p + fn(["x"] * 3, images_b, images_a), torch.ones(3))


@pytest.mark.parametrize("section, message", [
    ({"name": "nope"}, "preference.name: unknown preference 'nope'"),
    ({"name": "http://host:notaport"}, "preference.name: preference server URL"),
    ({"name": "bradley_terry", "reward": ""}, "preference.reward is empty"),
    ({"name": "bradley_terry", "reward": "nonexistent_reward"}, "preference.reward: unknown reward 'nonexistent_"),
    ({"name": "bradley_terry", "reward": "large_shape", "temperature": 0.0},
     "preference.temperature must be a positive number, got 0.0"),
    ({"name": "bradley_terry", "reward": "addition_exact"}, "compares text outputs, but the policy produces image"),
    ({"name": "pickscore"}, "preference 'pickscore' compares image outputs, but the policy produces text"),
])
def test_a_bad_preference_section_is_one_line_naming_the_key(section, message):
    policy_kind = "text" if section["name"] == "pickscore" else "image"
    with pytest.raises(ValueError, match=message) as info:
        check_preference_config({"temperature": 1.0, **section}, policy_kind)
    assert "\n" not in str(info.value)
    check_preference_config({"name": "bradley_terry", "reward": "large_shape", "temperature": 0.1}, "image")


@pytest.mark.parametrize("section, message", [
    ({"name": "nope"}, "preference.name: unknown preference 'nope'"),
    ({"name": "pickscore", "temperature": 2.0}, "preference.temperature is set, but preference 'pickscore' takes no"),
    ({"reward": "large_shape"}, "preference.reward is set, but preference.name is empty"),
])
def test_the_trainer_refuses_a_bad_preference_before_loading_anything(section, message):
    config = get_config()
    config.preference.update(section)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)
    config.preference.update({"name": "bradley_terry", "reward": "large_shape", "temperature": 0.5})
    validate_config(config)


def test_a_judge_section_reaches_the_factory_parameter_named_after_it():
    # The config check: preference.judge.* belongs to the judge factory's `judge`, and to no other preference.
    config = get_config()
    config.preference.name = "judge"
    config.preference.judge = {"base_url": "http://127.0.0.1:1/v1", "model": "m", "compare_template": "{prompt}"}
    validate_config(config)
    config.preference.name = "pickscore"
    with pytest.raises(ConfigError, match="preference.judge.base_url is set, but preference 'pickscore' takes no"):
        validate_config(config)
    # The command line: --preference-option judge.model=... sets the nested option over the run's section.
    args = build_parser().parse_args(["--checkpoint", "c", "--out", "o", "--compare-base", "--preference", "judge",
                                      "--preference-option", "judge.model=other", "--preference-option", "retries=0"])
    section = _preference_section(config, args)
    assert section["judge"] == {"base_url": "http://127.0.0.1:1/v1", "model": "other", "compare_template": "{prompt}"}
    assert (section["name"], section["retries"], section["temperature"]) == ("judge", 0, 1.0)


def test_preference_reward_scores_each_compared_sample_with_l_and_the_comparator_with_0():
    # Two groups of three outputs, sample-major: [y_0 of both groups, y_1 of both, y_2 of both]. P(a beats b) is a
    # lookup by hand; l = 2 P - 1 (the paper's Eq. 11).
    p_win = {("a0", "c0"): 0.9, ("b0", "c0"): 0.25, ("a1", "c1"): 0.5, ("b1", "c1"): 1.0}
    calls = []

    def table(prompts, outputs_a, outputs_b):
        calls.append((list(prompts), list(outputs_a), list(outputs_b)))
        return torch.tensor([p_win[a, b] for a, b in zip(outputs_a, outputs_b)])

    reward_fn = preference.preference_reward(table, 3, ((0, 2), (1, 2)))
    rewards = reward_fn(["a0", "a1", "b0", "b1", "c0", "c1"], ["x", "y"] * 3)
    torch.testing.assert_close(rewards, torch.tensor([0.8, 0.0, -0.5, 1.0, 0.0, 0.0]))
    assert calls[0] == (["x", "y"], ["a0", "a1"], ["c0", "c1"]) and len(calls) == 2
