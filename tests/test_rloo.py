import numpy as np
import pytest
import torch
from ml_collections import ConfigDict

from rebel_diffusion.algorithms import ALGORITHMS, rloo_advantages


def test_rloo_advantages_leave_one_out():
    rewards = np.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    # row 0: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5; row 1: 0 - 1.5, 0 - 1.5, 3 - 0
    np.testing.assert_allclose(rloo_advantages(rewards), [[-3.0, -1.5, 4.5], [-1.5, -1.5, 3.0]])
    torch.testing.assert_close(rloo_advantages(torch.tensor(rewards)), torch.tensor([[-3.0, -1.5, 4.5], [-1.5, -1.5, 3.0]],
                                                                                    dtype=torch.float64))


def test_rloo_advantages_need_two_samples():
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(np.zeros((3, 1)))


def config(inner_epochs: int) -> ConfigDict:
    return ConfigDict({"train": {"num_inner_epochs": inner_epochs}, "rloo": {"k": 2, "clip_range": 0.2}})


def test_one_inner_epoch_is_reinforce_on_the_summed_log_probs():
    rloo = ALGORITHMS["rloo"]
    assert rloo.step_reduction == "sum" and rloo.kl_in_reward and rloo.group_size(config(1)) == 2
    log_prob = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], requires_grad=True)
    advantages = torch.tensor([2.0, -1.0])
    loss, _ = rloo.step_loss(log_prob, log_prob.detach() + 0.1, advantages, config(1), 0)
    # -A_i * log pi per step: [[2, 4], [-0.5, -0.5]]; the trainer sums over steps and averages over samples
    torch.testing.assert_close(loss, torch.tensor([[2.0, 4.0], [-0.5, -0.5]]))
    loss.sum().backward()
    torch.testing.assert_close(log_prob.grad, torch.tensor([[-2.0, -2.0], [1.0, 1.0]]))


def test_more_inner_epochs_use_the_clipped_ratio():
    rloo = ALGORITHMS["rloo"]
    log_ratio = torch.tensor([[np.log(1.5), 0.0]], dtype=torch.float32)
    loss, info = rloo.step_loss(log_ratio, torch.zeros(1, 2), torch.tensor([1.0]), config(2), 1)
    # A = 1, r = 1.5 -> max(-1.5, -1.2) = -1.2 (clipped); r = 1 -> -1
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.0]]))
    assert info["clipfrac"].tolist() == [[1.0, 0.0]]
