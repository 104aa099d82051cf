import math

import pytest
import torch
from ml_collections import ConfigDict

from rebel_diffusion.algorithms import ALGORITHMS, online_dpo_loss


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_online_dpo_loss_matches_hand_computation():
    la = torch.tensor([0.5, -1.0, 0.3], requires_grad=True)
    lb = torch.tensor([0.25, 0.0, 0.3], requires_grad=True)
    ra, rb = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 2.0, 2.0])
    loss = online_dpo_loss(la, lb, ra, rb, beta=2.0)
    # pair 0: a wins, z = 2 * 0.25 = 0.5; pair 1: b wins, z = 2 * (-1) * (-1) = 2; pair 2: a tie, z = 0
    expected = (-math.log(sigmoid(0.5)) - math.log(sigmoid(2.0)) + math.log(2.0)) / 3
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # d/dla of -log sigmoid(beta * s * (la - lb)) = -beta * s * sigmoid(-z); a tie has no gradient
    assert la.grad.tolist() == pytest.approx([-2 * sigmoid(-0.5) / 3, 2 * sigmoid(-2.0) / 3, 0.0])
    assert lb.grad.tolist() == pytest.approx([2 * sigmoid(-0.5) / 3, -2 * sigmoid(-2.0) / 3, 0.0])


def test_online_dpo_is_a_pair_loss_on_raw_rewards():
    dpo = ALGORITHMS["online_dpo"]
    config = ConfigDict({"dpo": {"beta": 0.5}})
    assert dpo.pair_loss is not None and dpo.kl_in_reward and dpo.group_size(config) == 2
    rewards = torch.tensor([[1.0, 3.0]]).numpy()
    assert (dpo.targets(rewards, ["p"], None, config) == rewards).all()
    loss = dpo.pair_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0]), config)
    assert loss.item() == pytest.approx(-math.log(sigmoid(-0.5)))


def test_online_dpo_loss_rejects_per_step_log_ratios():
    with pytest.raises(ValueError, match=r"\(P,\)"):
        online_dpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), torch.zeros(2), 1.0)
