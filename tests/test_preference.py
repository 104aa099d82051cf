"""The preference interface: registry, `module:function` paths, and validation of what a preference returns."""

import math

import pytest
import torch

from rebel_diffusion.rewards import preference
from rebel_diffusion.rewards.preference import (check_preference_name, make_preference_fn, register_preference,
                                                validate_probabilities)


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
