import math

import pytest
import torch

from rebel_diffusion.algorithms import ppo_loss


def test_ppo_loss_matches_hand_computation():
    log_ratio = torch.tensor([math.log(1.5), math.log(0.5), 0.0], requires_grad=True)
    advantages = torch.tensor([2.0, 1.0, -20.0])
    loss, info = ppo_loss(log_ratio, advantages, clip_range=0.2, adv_clip_max=10.0)
    # sample 0: A=2, r=1.5 -> max(-3, -2.4) = -2.4 (clipped, no gradient)
    # sample 1: A=1, r=0.5 -> max(-0.5, -0.8) = -0.5 (unclipped)
    # sample 2: A clipped to -10, r=1 -> max(10, 10) = 10
    assert loss.item() == pytest.approx((-2.4 - 0.5 + 10.0) / 3)
    loss.backward()
    # gradient of -A * r wrt log_ratio is -A * r, only where the unclipped term is active
    assert log_ratio.grad.tolist() == pytest.approx([0.0, -1.0 * 0.5 / 3, 10.0 * 1.0 / 3])
    assert info["clipfrac"].item() == pytest.approx(2 / 3)
    assert info["approx_kl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)


def test_ppo_gradient_at_ratio_one_is_the_policy_gradient():
    log_ratio = torch.zeros(4, requires_grad=True)
    advantages = torch.tensor([1.0, -2.0, 0.5, 3.0])
    loss, _ = ppo_loss(log_ratio, advantages, clip_range=1e-4, adv_clip_max=10.0)
    loss.backward()
    torch.testing.assert_close(log_ratio.grad, -advantages / 4)
