"""Where a group's samples come from: the policy, the base model or offline responses (an algorithm's `Mu`).

REBEL's Algorithm 1 draws y from pi_t and y' from a base distribution mu. Every trajectory the trainer trains on means
the same thing whatever drew it: its actions, and their log-probs under pi_t (the weights at sampling time), so that
`log pi_theta - log pi_t` is the log-ratio of the regression. A trajectory of the base model or of offline data is
therefore re-scored under pi_t (`rebel_diffusion.policies.rescore`): one more forward pass per trajectory, without grad.

For an image policy the base model's deterministic steps (LCM's final denoising, a flow policy's ODE steps outside
`sample.sde_window`) are the base model's too: its trajectory is scored on its stochastic steps only, as any is.
"""

from __future__ import annotations

import functools
import random

import torch

from rebel_diffusion.algorithms.base import MU_SOURCES, Mu
from rebel_diffusion.policies import Policy, adapter_disabled, rescore
from rebel_diffusion.prompts import read_offline_responses
from rebel_diffusion.trajectory import Trajectory


@functools.lru_cache(maxsize=4)
def offline_responses(source: str, key: str) -> dict[str, list[str]]:
    """`read_offline_responses`, read once per process: the config check and the run both need it."""
    return read_offline_responses(source, key)


def check_mu(mu: Mu, policy_class: type, prompts: list[str], lora_rank: int, prompt_key: str = "prompt_file") -> None:
    """`ValueError` (one line) for a mu the run cannot draw from, before any model loads: the base model without a
    LoRA adapter to switch off, offline responses for a policy that cannot take them, or offline data that lacks a
    response for some training prompt."""
    if mu.probabilities.get("base", 0) > 0 and lora_rank <= 0:
        raise ValueError("mu draws from the base model, which needs a LoRA adapter to switch off; set lora.rank > 0")
    if mu.probabilities.get("offline", 0) > 0:
        if not hasattr(policy_class, "trajectory_of"):
            raise ValueError(f"{mu.offline_key}: offline responses need a text policy; {policy_class.__name__} "
                             f"samples images (use the base model as mu instead)")
        responses = offline_responses(mu.offline_data, mu.offline_key)
        missing = [p for p in dict.fromkeys(prompts) if p not in responses]
        if missing:
            raise ValueError(f"{mu.offline_key} has no response for {len(missing)} of the {len(set(prompts))} prompts "
                             f"of {prompt_key} (the first: {missing[0]!r}); every training prompt needs one")


def sample_groups(policy: Policy, prompts: list[str], k: int, mu: Mu, with_kl: bool = False) -> tuple[Trajectory, list[str]]:
    """`k` samples for each of the B `prompts`, sample-major as `policy.sample(prompts * k)` returns them (sample j of
    group g at j * B + g), and the source of each. Sample 1 of every group (y') draws its source from
    `mu.probabilities` (Python's `random`, seeded by the trainer as the prompts are), every other sample comes from the
    policy, and an offline sample draws its response uniformly among its prompt's. Each source samples its share in
    one batch.

    With every sample on-policy this is `policy.sample(prompts * k, with_kl=with_kl)` itself, with the same draws.
    """
    flat_prompts = prompts * k
    if mu.probabilities == {"policy": 1.0}:
        return policy.sample(flat_prompts, with_kl=with_kl), ["policy"] * len(flat_prompts)
    names = list(mu.probabilities)
    drawn = random.choices(names, weights=[mu.probabilities[n] for n in names], k=len(prompts))
    sources = ["policy"] * len(prompts) + drawn + ["policy"] * (len(prompts) * (k - 2))
    parts, order = [], []
    for source in MU_SOURCES:
        index = [i for i, s in enumerate(sources) if s == source]
        if not index:
            continue
        part_prompts = [flat_prompts[i] for i in index]
        if source == "policy":
            part = policy.sample(part_prompts, with_kl=with_kl)
        elif source == "base":
            with adapter_disabled(policy):
                part = policy.sample(part_prompts)
            part = rescore(policy, part, with_kl, reference_log_probs=part.log_probs)
        else:
            table = offline_responses(mu.offline_data, mu.offline_key)
            responses = [random.choice(table[p]) for p in part_prompts]
            part = rescore(policy, policy.trajectory_of(part_prompts, responses), with_kl)
        parts.append(part)
        order.extend(index)
    return Trajectory.cat(parts)[torch.argsort(torch.tensor(order))], sources
