"""Checks that every diffusion policy with a window of Gaussian steps (flow matching, DDIM) must pass, each written
once: the tests of each policy call them on its tiny pipeline."""

import pytest
import torch

import rebel_diffusion.trainer as trainer
from configs.base import get_config
from rebel_diffusion.algorithms import ALGORITHMS
from test_trainer import _full_graph_loss, _grads, _zero_grads


def assert_recomputed_log_probs_equal_stored(policy, prompts: list[str], reduction: str) -> None:
    """`policy.log_prob` on each step chunk of a trajectory sampled from `prompts` gives its stored log-probs, with grad."""
    trajectory = policy.sample(prompts, generator=torch.Generator().manual_seed(1))
    assert trajectory.log_probs.shape == (len(prompts), policy.num_actions)
    assert torch.isfinite(trajectory.log_probs).all()
    assert policy.step_chunks() == [range(t, t + 1) for t in range(policy.num_actions)]
    for steps in policy.step_chunks():
        recomputed, kl = policy.log_prob(trajectory, steps)
        assert recomputed.requires_grad and kl is None
        # Sampled with the LoRA merged into W, re-scored unmerged: fp32 rounding; a "sum" over 256+ dims is ~ 1e2-1e3.
        torch.testing.assert_close(recomputed.detach(), trajectory.log_probs[:, steps.start : steps.stop], atol=1e-4,
                                   rtol=1e-5 if reduction == "sum" else 0)


def assert_bf16_keeps_lora_float32_and_log_probs_recomputable(policy, prompts: list[str]) -> None:
    """With bf16 frozen weights (`policy` built with `dtype=torch.bfloat16`) the LoRA weights stay float32, nothing is
    merged for sampling, and the log-probs are finite and recomputable."""
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    assert policy.denoiser.dtype == torch.bfloat16 and policy.vae.dtype == torch.bfloat16
    assert not policy.merge_for_sampling  # a fp32 LoRA merged into bf16 weights would round W + delta
    trajectory = policy.sample(prompts, generator=torch.Generator().manual_seed(0))
    assert trajectory.log_probs.dtype == torch.float32 and torch.isfinite(trajectory.log_probs).all()
    recomputed, _ = policy.log_prob(trajectory, range(0, 1))
    torch.testing.assert_close(recomputed.detach(), trajectory.log_probs[:, :1], atol=1e-5, rtol=0)


def assert_kls_equal_torch_distributions(policy, trajectory, base: torch.nn.Module, gaussian) -> None:
    """`trajectory.kl` (sampled `with_kl`) is the sampled log-ratio to the reference (k1) and the KL of
    `policy.log_prob(..., with_kl=True)` the exact Gaussian KL, both as `torch.distributions` compute them (mean over
    the latent dims) from the test's own `gaussian(network, step, state) -> (mean, std)` for the policy's adapted
    network and for `base`, a separately loaded base network."""
    sampled, exact = [], []
    with torch.no_grad():
        _, kl = policy.log_prob(trajectory, range(policy.num_actions), with_kl=True)
        for step in range(policy.num_actions):
            state, action = trajectory.states[:, step], trajectory.actions[:, step]
            (mean, std), (mean_ref, _) = gaussian(policy.denoiser, step, state), gaussian(base, step, state)
            pi, pi_ref = torch.distributions.Normal(mean, std), torch.distributions.Normal(mean_ref, std)
            sampled.append((pi.log_prob(action) - pi_ref.log_prob(action)).flatten(1).mean(1))
            exact.append(torch.distributions.kl_divergence(pi, pi_ref).flatten(1).mean(1))
    sampled, exact = torch.stack(sampled, dim=1), torch.stack(exact, dim=1)
    assert exact.min() > 0
    torch.testing.assert_close(trajectory.kl, sampled, rtol=0, atol=2e-5)
    torch.testing.assert_close(kl, exact, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(trajectory.kl, exact, rtol=1e-2, atol=0)  # k1 is not the exact KL


def assert_chunked_gradients_equal_full_graph(policy, name: str, prompts: list[str], perturb) -> None:
    """For a diffusion policy with a window of steps (flow, DDIM): the trainer's gradients of algorithm `name`, one step
    graph at a time, equal `_full_graph_loss`'s on a batch sampled from the 4 `prompts`. `perturb(policy)` moves the
    LoRA weights, before sampling and after it (so that the log-ratios are not zero)."""
    from accelerate import Accelerator

    algorithm, config = ALGORITHMS[name], get_config()
    config.kl_coef = 0.0 if algorithm.kl_in_reward else 0.3  # the KL loss term is part of the gradient checked
    config.ppo.clip_range = config.grpo.clip_range = config.rloo.clip_range = 0.05
    config.dpo.beta = 5.0
    perturb(policy)
    batch = policy.sample(prompts, generator=torch.Generator().manual_seed(4))
    perturb(policy)
    targets = torch.randn(4, generator=torch.Generator().manual_seed(5))
    _full_graph_loss(policy, algorithm, batch, targets, config).backward()
    expected = _grads(policy)
    _zero_grads(policy)
    if algorithm.pair_loss is not None:
        stats = trainer.pair_loss_gradients(Accelerator(cpu=True), policy, algorithm, batch, targets, config)
    else:
        stats = trainer.step_loss_gradients(Accelerator(cpu=True), policy, algorithm, batch, targets, config, 0)
    assert torch.isfinite(stats["loss"]) and any(g.abs().sum() > 0 for g in expected)
    # Chunked and full-graph backward add the steps' gradients in other orders. The late steps have small stds (flow_sde
    # ~6e-3, DDIM's last ~2e-2), whose 1 / std^2 makes their gradients far larger than the sum where steps cancel: a few
    # elements differ by up to 2e-5 of the tensor's largest (measured on flow_sde: 3 of 256 at 8.5e-9 against a max of
    # 4e-4). A missing step, a wrong sign or scale is off by O(1) of the max.
    for got, want in zip(_grads(policy), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def count_denoiser_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """The (batch size, grad enabled) of every call of the policy's `denoiser` that `trainer.train` makes from now on
    (its first input, positional for a UNet, `hidden_states=` for a transformer)."""
    calls, make = [], trainer.make_policy

    def counting(*args, **kwargs):
        policy = make(*args, **kwargs)
        policy.denoiser.register_forward_pre_hook(
            lambda module, args, kwargs: calls.append((len(args[0] if args else kwargs["hidden_states"]),
                                                       torch.is_grad_enabled())), with_kwargs=True)
        return policy

    monkeypatch.setattr(trainer, "make_policy", counting)
    return calls


def floor_denoiser_calls(config, num_steps: int, window: int, cfg: bool = True) -> list[tuple[int, bool]]:
    """What `count_denoiser_calls` must see in one REBEL epoch at kl_coef 0 of a diffusion policy whose `window` of its
    `num_steps` steps are actions, with no sample grids: guided by classifier-free guidance (`cfg`) or not (SD3 with
    `train.cfg` False, FLUX's embedded guidance)."""
    k = 2  # REBEL's pairs
    cfg = 2 if cfg else 1  # with guidance every call carries the unconditional and the conditional batch
    batches, prompts = config.sample.num_batches_per_epoch, config.sample.batch_size
    micro_batches = batches * prompts // config.train.batch_size
    # Sampling: every step, the deterministic ones outside the window too, on each batch of k samples per prompt.
    sampling = [(prompts * k * cfg, False)] * (num_steps * batches)
    # At kl_coef 0 the logged KL is estimated on kl_log_samples trajectories: policy and base at each window step.
    kl_logging = [(config.kl_log_samples * cfg, False)] * (2 * window)
    # Training: one forward (and backward) per window step of each micro-batch, not per step of the chain.
    training = [(config.train.batch_size * k * cfg, True)] * (window * micro_batches)
    return sampling + kl_logging + training
