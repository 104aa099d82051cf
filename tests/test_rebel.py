import math

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


# Proof in the small (issue 18): exact tabular policies, a softmax over a few responses per prompt, with REBEL's
# regression solved to its argmin over every (prompt, y, y', y'') weighted by its probability. log pi_theta(y) -
# log pi_theta(y') is linear in the logits, so the weighted loss is a convex quadratic that L-BFGS solves in float64.


def _rebel_argmin(log_pi_t: torch.Tensor, log_mu: torch.Tensor, payoff: torch.Tensor, eta: float) -> torch.Tensor:
    """The logits `(P, n)` minimising E[rebel_loss] over x uniform, y ~ pi_t, y' ~ mu, y'' ~ pi_t, with targets
    `payoff[x, y, y''] - payoff[x, y', y'']` (a reward `r[x, y]` is a payoff that ignores y'')."""
    num_prompts, n = log_pi_t.shape
    x, y, y_prime, y_second = torch.meshgrid(*(torch.arange(m) for m in (num_prompts, n, n, n)), indexing="ij")
    x, y, y_prime, y_second = x.flatten(), y.flatten(), y_prime.flatten(), y_second.flatten()
    weight = (log_pi_t[x, y] + log_mu[x, y_prime] + log_pi_t[x, y_second]).exp() / num_prompts
    # rebel_loss is a plain mean over pairs: scaling a pair's residual by sqrt(w) weighs its square by w.
    root = (weight * len(weight)).sqrt()
    target_a, target_b = payoff[x, y, y_second] * root, payoff[x, y_prime, y_second] * root
    logits = log_pi_t.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([logits], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        log_ratio = torch.log_softmax(logits, dim=-1) - log_pi_t
        loss = rebel_loss(log_ratio[x, y] * root, log_ratio[x, y_prime] * root, target_a, target_b, eta)
        loss.backward()
        return loss

    optimizer.step(closure)
    return torch.log_softmax(logits.detach(), dim=-1)


def _as_payoff(rewards: torch.Tensor) -> torch.Tensor:
    """A reward `(P, n)` as a payoff `(P, n, n)` that does not depend on the third sample."""
    return rewards[:, :, None].expand(-1, -1, rewards.shape[1])


def test_rebel_with_an_offline_mu_is_the_mirror_descent_step():
    # With y' from any fixed mu of full support, the regression's argmin is pi_t * exp(eta * r) / Z (the paper's
    # Eq. 3): the residual can be zero on every pair, and mu only weighs the pairs.
    gen = torch.Generator().manual_seed(0)
    log_pi_t = torch.log_softmax(torch.randn(2, 4, generator=gen, dtype=torch.float64), dim=-1)
    log_mu = torch.log_softmax(3 * torch.randn(2, 4, generator=gen, dtype=torch.float64), dim=-1)
    rewards, eta = torch.rand(2, 4, generator=gen, dtype=torch.float64), 0.7
    log_pi_next = _rebel_argmin(log_pi_t, log_mu, _as_payoff(rewards), eta)
    mirror_descent = torch.log_softmax(log_pi_t + eta * rewards, dim=-1)
    torch.testing.assert_close(log_pi_next, mirror_descent, rtol=0, atol=1e-7)


def _preference_payoff(p_win: torch.Tensor) -> torch.Tensor:
    """l(x, y, y'') = 2 P(y beats y'') - 1 (the paper's Eq. 11), from `p_win (P, n, n)`."""
    return 2 * p_win - 1


def test_preference_rebel_with_a_transitive_preference_reaches_the_best_response():
    # A Bradley-Terry preference on hidden scores: the iterates concentrate on each prompt's highest-scoring response.
    scores = torch.tensor([[0.0, 1.0, 2.0, 0.5], [1.5, 0.0, 0.2, 0.1]], dtype=torch.float64)
    payoff = _preference_payoff(torch.sigmoid(scores[:, :, None] - scores[:, None, :]))
    log_pi = torch.full((2, 4), -math.log(4), dtype=torch.float64)
    for _ in range(40):
        log_pi = _rebel_argmin(log_pi, log_pi, payoff, eta=1.0)  # self-play: y' and y'' from pi_t
    assert log_pi.exp()[0, 2] > 0.99 and log_pi.exp()[1, 0] > 0.99


def test_preference_rebel_average_iterate_approaches_the_minimax_winner_of_rock_paper_scissors():
    # Rock-paper-scissors has no reward model; its minimax winner is uniform. Exact REBEL is multiplicative weights on
    # the gains l(y, pi_t) in [-1, 1], whose regret is at most ln(n) / eta + eta * T * 2^2 / 8 (Hedge's bound for
    # gains of range 2). Self-play gains average zero (l is skew-symmetric), so the average iterate pi_bar has
    # max_y l(y, pi_bar) <= regret / T, and its duality gap DG = 2 max_y l(y, pi_bar) <= 2 (ln 3 / (eta T) + eta / 2).
    beats = torch.tensor([[0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.5]], dtype=torch.float64)  # P(row beats col)
    payoff = _preference_payoff(beats)[None]
    eta, num_iterations = 0.1, 300
    log_pi = torch.log(torch.tensor([[0.6, 0.3, 0.1]], dtype=torch.float64))
    iterates = []
    for _ in range(num_iterations):
        iterates.append(log_pi.exp())
        log_pi = _rebel_argmin(log_pi, log_pi, payoff, eta)

    def duality_gap(pi: torch.Tensor) -> float:
        return 2 * (payoff[0] @ pi[0]).max().item()

    pi_bar = torch.stack(iterates).mean(0)
    bound = 2 * (math.log(3) / (eta * num_iterations) + eta / 2)
    assert duality_gap(pi_bar) <= bound
    torch.testing.assert_close(pi_bar, torch.full((1, 3), 1 / 3, dtype=torch.float64), rtol=0, atol=0.05)
    # The last iterate still cycles far from the winner: the average is what converges.
    assert duality_gap(log_pi.exp()) > bound
