import numpy as np
import pytest
import torch

from rebel_diffusion.algorithms import rebel_loss, regression_targets


def test_rebel_loss_matches_hand_computation():
    la = torch.tensor([0.5, -1.0], requires_grad=True)
    lb = torch.tensor([0.25, 0.0], requires_grad=True)
    ra, rb = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    loss = rebel_loss(la, lb, ra, rb, eta=0.5)
    # residuals: (0.25 / 0.5) - 1 = -0.5 and (-1 / 0.5) - (-2) = 0
    assert loss.item() == pytest.approx((0.25 + 0.0) / 2)
    loss.backward()
    # d/dla of mean(e^2) = 2 e / (eta * B); d/dlb is its negative
    assert la.grad.tolist() == pytest.approx([2 * -0.5 / (0.5 * 2), 0.0])
    assert lb.grad.tolist() == pytest.approx([2 * 0.5 / (0.5 * 2), 0.0])


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


def test_per_step_surrogate_gives_the_exact_gradient():
    # The trainer backpropagates one chain step at a time: value = full log-ratio, gradient through step s only.
    torch.manual_seed(0)
    theta = torch.randn(3, requires_grad=True)
    features = torch.randn(2, 2, 5, 3)  # (side a/b, pairs, steps, dims)
    old = torch.randn(2, 2, 5)
    ra, rb = torch.randn(2), torch.randn(2)

    def step_log_probs():
        return features @ theta - old  # (2, 2, 5) per-step log-ratios

    full = step_log_probs().sum(-1)
    rebel_loss(full[0], full[1], ra, rb, eta=0.7).backward()
    exact = theta.grad.clone()

    theta.grad = None
    with torch.no_grad():
        totals = step_log_probs().sum(-1)
    for s in range(5):
        step = step_log_probs()[..., s]
        ratio = totals + (step - step.detach())
        rebel_loss(ratio[0], ratio[1], ra, rb, eta=0.7).backward()
    torch.testing.assert_close(theta.grad, exact)


def test_regression_targets():
    rewards, advantages = np.array([1.0, 2.0, 6.0]), np.array([0.1, 0.2, 0.3])
    assert regression_targets(rewards, advantages, "advantages") is advantages
    assert regression_targets(rewards, advantages, "rewards") is rewards
    z = regression_targets(rewards, advantages, "batch_zscore")
    np.testing.assert_allclose(z, (rewards - 3.0) / (rewards.std() + 1e-6))
    with pytest.raises(ValueError, match="unknown REBEL target"):
        regression_targets(rewards, advantages, "nope")
