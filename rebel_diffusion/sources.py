"""Where a group's samples come from: the policy, the base model or offline responses (an algorithm's `Mu`).

REBEL's Algorithm 1 draws y from pi_t and y' from a base distribution mu. Every trajectory the trainer trains on means
the same thing whatever drew it: its actions, and their log-probs under pi_t (the weights at sampling time), so that
`log pi_theta - log pi_t` is the log-ratio of the regression. A trajectory of the base model or of offline data is
therefore re-scored under pi_t (`rebel_diffusion.policies.rescore`): one more forward pass per trajectory, without grad.

For an image policy the base model's deterministic steps (LCM's final denoising, a flow policy's ODE steps outside
`sample.sde_window`) are the base model's too: its trajectory is scored on its stochastic steps only, as any is.

Offline data is either responses (text policies: `rebel_diffusion.prompts.read_offline_responses`) or trajectories
saved by `python -m rebel_diffusion.sample --save-trajectories` (`save_trajectories`; any policy: for images, the
latents of every step and the image), which must come from the model and sampler settings the run trains
(`TRAJECTORY_KEYS`).
"""

from __future__ import annotations

import dataclasses
import functools
import random
from pathlib import Path
from typing import Any

import torch
from ml_collections import ConfigDict

from rebel_diffusion.algorithms.base import MU_SOURCES, Mu
from rebel_diffusion.policies import Policy, adapter_disabled, rescore
from rebel_diffusion.prompts import read_offline_responses
from rebel_diffusion.trajectory import Trajectory


# What a saved trajectory's states and actions mean: the same model, latent size, steps and stochastic window (for
# text, the same tokenizer and prompt format). What else differs (guidance, noise level, LoRA weights) only makes
# another mu, which any is.
TRAJECTORY_KEYS = ("policy", "model.pretrained", "resolution", "model.num_steps", "model.chat_template", "sample.sde",
                   "sample.sde_window")
TRAJECTORIES_SUFFIX = ".pt"


def _config_value(config: ConfigDict, key: str) -> Any:
    value = config
    for part in key.split("."):
        if part not in value:
            return None
        value = value[part]
    return list(value) if isinstance(value, tuple) else value


def save_trajectories(path: Path, trajectory: Trajectory, config: ConfigDict) -> None:
    """Write `trajectory` (on the CPU) and the `TRAJECTORY_KEYS` of `config` that drew it to `path` (`.pt`), for a
    later run's `rebel.offline_data`."""
    fields = {f.name: getattr(trajectory, f.name) for f in dataclasses.fields(Trajectory)}
    fields = {name: value.cpu() if isinstance(value, torch.Tensor) else value for name, value in fields.items()}
    torch.save({"meta": {key: _config_value(config, key) for key in TRAJECTORY_KEYS}, "fields": fields}, path)


@dataclasses.dataclass(frozen=True)
class OfflineData:
    """Offline samples by prompt: `responses` (text) or rows of the saved `trajectories` (`rows[prompt]`)."""

    responses: dict[str, list[str]]
    trajectories: Trajectory | None = None
    rows: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def prompts(self) -> set[str]:
        return set(self.rows or self.responses)


@functools.lru_cache(maxsize=4)
def offline_data(source: str, key: str) -> OfflineData:
    """The offline samples of `source`, read once per process (the config check and the run both need them):
    trajectories from a `.pt` file written by `save_trajectories`, else responses (`read_offline_responses`)."""
    if not source.endswith(TRAJECTORIES_SUFFIX):
        return OfflineData(read_offline_responses(source, key))
    try:
        saved = torch.load(source, map_location="cpu", weights_only=True)
        trajectory, meta = Trajectory(**saved["fields"]), saved["meta"]
    except FileNotFoundError:
        raise ValueError(f"{key} {source!r} does not exist (trajectories written by `python -m "
                         f"rebel_diffusion.sample --save-trajectories`)") from None
    except Exception as e:  # a damaged or foreign file: torch and pickle raise many types
        raise ValueError(f"{key} {source!r} is not a trajectories file written by `python -m rebel_diffusion.sample "
                         f"--save-trajectories` ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    rows: dict[str, list[int]] = {}
    for row, prompt in enumerate(trajectory.prompts):
        rows.setdefault(prompt, []).append(row)
    return OfflineData({}, trajectory, rows, meta)


def check_mu(mu: Mu, policy_class: type, prompts: list[str], config: ConfigDict, prompt_key: str = "prompt_file") -> None:
    """`ValueError` (one line) for a mu the run cannot draw from, before any model loads: the base model without a
    LoRA adapter to switch off, offline responses for a policy that cannot take them, saved trajectories of another
    model or sampler, or offline data that lacks a sample for some training prompt."""
    if mu.probabilities.get("base", 0) > 0 and config.lora.rank <= 0:
        raise ValueError("mu draws from the base model, which needs a LoRA adapter to switch off; set lora.rank > 0")
    if mu.probabilities.get("offline", 0) > 0:
        data = offline_data(mu.offline_data, mu.offline_key)
        if data.trajectories is None and not hasattr(policy_class, "trajectory_of"):
            raise ValueError(f"{mu.offline_key}: offline responses need a text policy; {policy_class.__name__} "
                             f"samples images: give trajectories saved by `python -m rebel_diffusion.sample "
                             f"--save-trajectories` (a .pt file)")
        for key, value in data.meta.items():
            if value != _config_value(config, key):
                raise ValueError(f"{mu.offline_key}: its trajectories were sampled with {key}={value!r}, but this run "
                                 f"has {key}={_config_value(config, key)!r}; sample them with the run's settings")
        missing = [p for p in dict.fromkeys(prompts) if p not in data.prompts()]
        if missing:
            raise ValueError(f"{mu.offline_key} has no sample for {len(missing)} of the {len(set(prompts))} prompts "
                             f"of {prompt_key} (the first: {missing[0]!r}); every training prompt needs one")


def _offline(policy: Policy, prompts: list[str], data: OfflineData) -> Trajectory:
    """One offline sample per prompt, drawn uniformly among the prompt's, as a trajectory on the policy's device
    (log-probs not yet those of pi_t)."""
    if data.trajectories is None:
        return policy.trajectory_of(prompts, [random.choice(data.responses[p]) for p in prompts])
    part = data.trajectories[[random.choice(data.rows[p]) for p in prompts]]
    device = policy.trainable_parameters()[0].device
    return dataclasses.replace(part, **{f.name: getattr(part, f.name).to(device) for f in dataclasses.fields(part)
                                        if isinstance(getattr(part, f.name), torch.Tensor)})


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
            offline = _offline(policy, part_prompts, offline_data(mu.offline_data, mu.offline_key))
            part = rescore(policy, offline, with_kl)
        parts.append(part)
        order.extend(index)
    return Trajectory.cat(parts)[torch.argsort(torch.tensor(order))], sources
