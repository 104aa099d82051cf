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


def test_a_moved_policy_gets_the_clipped_ratio_even_with_one_inner_epoch():
    # One inner epoch, several optimizer steps: a later micro-batch sees a policy that moved since sampling.
    rloo = ALGORITHMS["rloo"]
    assert rloo.step_reduction == "sum" and rloo.kl_in_reward and rloo.group_size(config(1)) == 2
    old = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]])
    ratio = torch.tensor([[1.1, 1.5], [0.5, 1.3]])
    log_prob = (old + ratio.log()).requires_grad_()
    advantages = torch.tensor([2.0, -1.0])
    loss, info = rloo.step_loss(log_prob, old, advantages, config(1), 0)
    # max(-A r, -A clip(r, 0.8, 1.2)): A = 2: r 1.1 -> -2.2, r 1.5 -> -2.4 (clipped); A = -1: r 0.5 -> 0.8 (clipped),
    # r 1.3 -> 1.3 (unclipped: the pessimistic side)
    torch.testing.assert_close(loss, torch.tensor([[-2.2, -2.4], [0.8, 1.3]]))
    assert info["clipfrac"].tolist() == [[0.0, 1.0], [1.0, 1.0]]
    loss.sum().backward()
    # d(-A r)/d log pi = -A r where unclipped, 0 where clipped
    torch.testing.assert_close(log_prob.grad, torch.tensor([[-2.2, 0.0], [0.0, 1.3]]))


@pytest.mark.parametrize("inner_epochs", [1, 2])
def test_at_ratio_one_the_gradient_is_reinforces(inner_epochs):
    rloo = ALGORITHMS["rloo"]
    log_prob = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], requires_grad=True)
    advantages = torch.tensor([2.0, -1.0])
    loss, _ = rloo.step_loss(log_prob, log_prob.detach(), advantages, config(inner_epochs), 0)
    loss.sum().backward()
    reinforce = log_prob.detach().clone().requires_grad_()
    (-advantages[:, None] * reinforce).sum().backward()  # -A * sum_t log pi(a_t)
    torch.testing.assert_close(log_prob.grad, reinforce.grad)
    torch.testing.assert_close(log_prob.grad, torch.tensor([[-2.0, -2.0], [1.0, 1.0]]))


def test_more_inner_epochs_use_the_clipped_ratio():
    rloo = ALGORITHMS["rloo"]
    log_ratio = torch.tensor([[np.log(1.5), 0.0]], dtype=torch.float32)
    loss, info = rloo.step_loss(log_ratio, torch.zeros(1, 2), torch.tensor([1.0]), config(2), 1)
    # A = 1, r = 1.5 -> max(-1.5, -1.2) = -1.2 (clipped); r = 1 -> -1
    torch.testing.assert_close(loss, torch.tensor([[-1.2, -1.0]]))
    assert info["clipfrac"].tolist() == [[1.0, 0.0]]
