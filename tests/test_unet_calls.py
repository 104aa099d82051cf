"""A training epoch runs the UNet exactly as often as its floor: no hidden forward pass anywhere."""

import pytest
import torch

import rebel_diffusion.trainer as trainer
from tests.test_trainer import tiny_config


def count_unet_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Make the trainer's policy record `(samples, grad enabled)` for every UNet forward."""
    calls = []
    make_policy = trainer.make_policy

    def counting(*args, **kwargs):
        policy = make_policy(*args, **kwargs)
        policy.pipeline.unet.register_forward_pre_hook(
            lambda module, inputs: calls.append((len(inputs[0]), torch.is_grad_enabled()))
        )
        return policy

    monkeypatch.setattr(trainer, "make_policy", counting)
    return calls


@pytest.mark.parametrize("algorithm, k", [("rebel", 2), ("ppo", 1)])
def test_an_epoch_makes_the_floor_number_of_unet_calls(tiny_lcm_path, tmp_path, monkeypatch, algorithm, k):
    calls = count_unet_calls(monkeypatch)
    config = tiny_config(tiny_lcm_path, tmp_path, algorithm=algorithm, num_epochs=1, **{"grid.num_prompts": 0})
    trainer.train(config)
    num_steps, horizon = config.model.num_steps, config.model.num_steps - 1
    batches, prompts = config.sample.num_batches_per_epoch, config.sample.batch_size
    micro_batches = batches * prompts // config.train.batch_size
    # Sampling: one call per chain step on each batch of k samples per prompt.
    sampling = [(prompts * k, False)] * (num_steps * batches)
    # At kl_coef 0 the logged KL is estimated on kl_log_samples trajectories: policy and base UNet at each step.
    kl_logging = [(config.kl_log_samples, False)] * (2 * horizon)
    # Training: one forward (and backward) per step of each micro-batch of whole groups; nothing else.
    training = [(config.train.batch_size * k, True)] * (horizon * micro_batches * config.train.num_inner_epochs)
    assert calls == sampling + kl_logging + training
