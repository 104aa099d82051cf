import numpy as np
import pytest

from rebel_diffusion.algorithms import PerPromptStatTracker


def test_uses_batch_statistics_until_min_count_then_per_prompt():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)
    prompts = ["a", "a", "b"]
    rewards = np.array([1.0, 3.0, 10.0])
    adv = tracker.update(prompts, rewards)
    # Every buffer holds < 3 rewards: z-score against the whole batch (numpy std, ddof 0).
    expected = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    np.testing.assert_allclose(adv, expected)

    adv = tracker.update(["a", "b"], np.array([5.0, 20.0]))
    # "a" now holds [1, 3, 5] (this batch's reward appended first): its own statistics.
    a_buffer = np.array([1.0, 3.0, 5.0])
    assert adv[0] == pytest.approx((5.0 - a_buffer.mean()) / (a_buffer.std() + 1e-6))
    # "b" holds [10, 20]: still below min_count, so the batch [5, 20] is the reference.
    batch = np.array([5.0, 20.0])
    assert adv[1] == pytest.approx((20.0 - batch.mean()) / (batch.std() + 1e-6))


def test_buffer_keeps_only_the_last_buffer_size_rewards():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=1)
    tracker.update(["a"] * 5, np.arange(5.0))
    assert list(tracker.buffers["a"]) == [2.0, 3.0, 4.0]
    adv = tracker.update(["a"], np.array([10.0]))
    buffer = np.array([3.0, 4.0, 10.0])
    assert adv[0] == pytest.approx((10.0 - buffer.mean()) / (buffer.std() + 1e-6))


def test_identical_rewards_give_zero_advantage_not_nan():
    tracker = PerPromptStatTracker(buffer_size=8, min_count=2)
    adv = tracker.update(["a", "a"], np.array([2.0, 2.0]))
    assert np.all(adv == 0.0)


def test_state_dict_round_trip():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    tracker.update(["a", "b", "a"], np.array([1.0, 2.0, 3.0]))
    restored = PerPromptStatTracker()
    restored.load_state_dict(tracker.state_dict())
    next_prompts, next_rewards = ["a", "b"], np.array([4.0, 0.5])
    np.testing.assert_array_equal(restored.update(next_prompts, next_rewards), tracker.update(next_prompts, next_rewards))
    assert restored.buffers["a"].maxlen == 4
