import math

import numpy as np
import pytest
import torch
from ml_collections import ConfigDict

from rebel_diffusion.algorithms import ALGORITHMS, group_advantages


def test_group_advantages_are_z_scores_within_each_group_with_ddof_0():
    rewards = np.array([[1.0, 2.0, 6.0], [5.0, 5.0, 5.0]])
    std = math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 3)
    expected = [[-2 / (std + 0.5), -1 / (std + 0.5), 3 / (std + 0.5)], [0.0, 0.0, 0.0]]
    np.testing.assert_allclose(group_advantages(rewards, eps=0.5), expected)
    torch.testing.assert_close(group_advantages(torch.tensor(rewards), eps=0.5), torch.tensor(expected, dtype=torch.float64))


def test_group_advantages_reject_flat_rewards():
    with pytest.raises(ValueError, match=r"\(N, k\)"):
        group_advantages(np.zeros(4), eps=1e-4)


def test_grpo_step_loss_is_ppos_clipped_objective_per_step():
    config = ConfigDict({"grpo": {"k": 4, "clip_range": 0.2, "adv_clip_max": 5.0, "eps": 1e-4}})
    grpo = ALGORITHMS["grpo"]
    assert grpo.group_size(config) == 4 and not grpo.kl_in_reward and grpo.step_reduction == "mean"
    log_prob = torch.tensor([[math.log(1.5), math.log(0.5)], [0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([2.0, -9.0])
    loss, info = grpo.step_loss(log_prob, torch.zeros(2, 2), targets, config, 0)
    # sample 0, A = 2: r = 1.5 -> max(-3, -2.4) = -2.4; r = 0.5 -> max(-1, -1.6) = -1
    # sample 1, A clipped to -5: r = 1 -> 5 at both steps
    torch.testing.assert_close(loss, torch.tensor([[-2.4, -1.0], [5.0, 5.0]]))
    loss.sum().backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([[0.0, -2.0 * 0.5], [5.0, 5.0]]))
    assert info["clipfrac"].tolist() == [[1.0, 1.0], [0.0, 0.0]]
