import numpy as np
import pytest
import torch

from rebel_diffusion.algorithms import rebel_loss, regression_targets


def test_rebel_loss_matches_hand_computation():
    # Eq. 1 of Gao et al. 2024: mean over pairs of ((la - lb) / eta - (ra - rb))^2, worked out by hand at eta = 0.5.
    la = torch.tensor([0.5, -1.0, 0.75], requires_grad=True)
    lb = torch.tensor([0.25, 0.0, 0.5], requires_grad=True)
    ra, rb = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 2.0, 1.0])
    loss = rebel_loss(la, lb, ra, rb, eta=0.5)
    # residuals e: 0.25 / 0.5 - 1 = -0.5;  -1 / 0.5 + 2 = 0;  0.25 / 0.5 + 0.5 = 1.  loss = (0.25 + 0 + 1) / 3
    assert loss.item() == pytest.approx(1.25 / 3, rel=1e-6)
    loss.backward()
    # d loss / d la = 2 e / (eta * B) = 2 e / 1.5; d loss / d lb is its negative. Every input is a dyadic fraction,
    # so the only rounding is the final / 3 and / 1.5 (one ulp, 6e-8 relative): rel 1e-6 is 16 ulps.
    assert la.grad.tolist() == pytest.approx([-1 / 1.5, 0.0, 2 / 1.5], rel=1e-6)
    assert lb.grad.tolist() == pytest.approx([1 / 1.5, 0.0, -2 / 1.5], rel=1e-6)


def test_pairs_are_not_summed_across_the_batch():
    # RLCM's reference sums log ratios over the micro-batch; each pair must stand alone.
    la, lb = torch.tensor([1.0, -1.0]), torch.zeros(2)
    ra, rb = torch.tensor([1.0, -1.0]), torch.zeros(2)
    assert rebel_loss(la, lb, ra, rb, eta=1.0).item() == 0.0
    summed = (la.sum() - lb.sum() - (ra - rb)) ** 2
    assert summed.mean().item() > 0  # the batch-summed version would not fit the same data


def test_rebel_loss_rejects_non_vector_log_ratios():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        rebel_loss(torch.zeros(2, 7), torch.zeros(2, 7), torch.zeros(2), torch.zeros(2), 1.0)


def test_regression_targets():
    rewards, advantages = np.array([1.0, 2.0, 6.0]), np.array([0.1, 0.2, 0.3])
    assert regression_targets(rewards, advantages, "advantages") is advantages
    assert regression_targets(rewards, advantages, "rewards") is rewards
    z = regression_targets(rewards, advantages, "batch_zscore")
    np.testing.assert_allclose(z, (rewards - 3.0) / (rewards.std() + 1e-6))
    with pytest.raises(ValueError, match="unknown REBEL target"):
        regression_targets(rewards, advantages, "nope")
