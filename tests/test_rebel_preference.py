"""Preference REBEL in the trainer: three samples per prompt, y and y' regressed on their preference against y''."""

from __future__ import annotations

import math

import pytest
import torch
from test_sources import SUMS

import rebel_diffusion.trainer as trainer
from configs.quickstart_text_rebel import get_config as text_config
from rebel_diffusion.trainer import ConfigError, train, validate_config

CALLS: list[tuple[list[str], list[str], list[str], torch.Tensor]] = []


def shorter_wins(prompts, outputs_a, outputs_b):
    """P(a beats b) = sigmoid(len(b) - len(a)), recorded."""
    p = torch.tensor([1 / (1 + math.exp(len(a) - len(b))) for a, b in zip(outputs_a, outputs_b)])
    CALLS.append((list(prompts), list(outputs_a), list(outputs_b), p))
    return p


def preference_config(tmp_path, **overrides):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(SUMS) + "\n")
    config = text_config()
    config.algorithm = "rebel_preference"
    config.preference.name = f"{__name__}:shorter_wins"
    config.logdir, config.run_name, config.log_with = str(tmp_path / "runs"), "pref", ""
    config.prompt_file, config.eval.prompt_file, config.grid.num_prompts = str(prompts), "", 0
    config.num_epochs, config.save_freq = 1, 1
    config.sample.batch_size, config.sample.num_batches_per_epoch, config.train.batch_size = 4, 2, 2
    config.model.max_new_tokens = 6
    config.rebel.target = "rewards"
    for key, value in overrides.items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    return config


def test_y_and_y_prime_regress_on_their_preference_against_y_second(tmp_path, monkeypatch):
    CALLS.clear()
    trained = []
    pair_loss_gradients = trainer.pair_loss_gradients

    def recording(accelerator, policy, algorithm, batch, targets, config):
        trained.append((list(batch.prompts), targets.tolist()))
        return pair_loss_gradients(accelerator, policy, algorithm, batch, targets, config)

    monkeypatch.setattr(trainer, "pair_loss_gradients", recording)
    run_dir = train(preference_config(tmp_path))
    # Each sampling batch of 4 prompts: one call comparing y with y'', one comparing y' with y''. Every y'' of a
    # batch is the comparator of both calls.
    assert len(CALLS) == 4 and all(len(c[0]) == 4 for c in CALLS)
    for (prompts_a, _, seconds_a, _), (prompts_b, _, seconds_b, _) in zip(CALLS[0::2], CALLS[1::2]):
        assert prompts_a == prompts_b and seconds_a == seconds_b
    # What each trained pair regresses on: l(y, y'') and l(y', y'') of its own group, l = 2 P - 1; y'' never trains.
    expected = sorted((prompt, round(2 * pa.item() - 1, 6), round(2 * pb.item() - 1, 6))
                      for (prompts, _, _, p_a), (_, _, _, p_b) in zip(CALLS[0::2], CALLS[1::2])
                      for prompt, pa, pb in zip(prompts, p_a, p_b))
    seen = sorted((prompts[i], round(targets[i], 6), round(targets[i + 1], 6))
                  for prompts, targets in trained for i in range(0, len(prompts), 2))
    assert seen == expected
    assert all(prompts[i] == prompts[i + 1] for prompts, _ in trained for i in range(0, len(prompts), 2))
    import json

    (metrics,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics["reward_queries"] == 8 * 2  # two comparisons per prompt are the queries


def test_preference_rebel_needs_a_preference_that_fits_the_policy(tmp_path):
    with pytest.raises(ConfigError, match="set preference.name"):
        validate_config(preference_config(tmp_path, **{"preference.name": ""}))
    with pytest.raises(ConfigError, match="preference.name: unknown preference 'nope'"):
        validate_config(preference_config(tmp_path, **{"preference.name": "nope"}))
