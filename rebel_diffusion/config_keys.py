"""Which config keys apply to which run: a key that belongs to a policy or a reward other than the chosen ones is
rejected when it is set, before any model loads, instead of being silently ignored.

The owners declare their keys:

* a policy class lists the keys it reads in `config_keys` (`rebel_diffusion.policies.Policy`); a key that some policy
  reads but the chosen one does not (`model.max_new_tokens` with `lcm`, `resolution` with `causal_lm`) does not apply;
* a reward factory's keyword parameters are its options (`reward.<parameter>`, what `make_reward_fn` passes it); a
  `reward.*` key that no reward of the run takes (the training reward and the `eval.rewards`) does not apply. A
  `module:function` user reward takes no options; a factory with `**options` takes any. A section's keys
  (`reward.judge.*`) belong to the parameter named after it (`judge`).
* likewise a preference factory's keyword parameters are its `preference.*` options (`bradley_terry` also takes its
  reward's), a section's keys belonging to the parameter named after it (`preference.judge.*` to the judge's
  `judge`); with no `preference.name`, no `preference.*` key applies.

"Set" means different from `configs/base.py`'s default (a key absent there, added by a config file, is always set), so
that configs built on the base, which carry every key, pass. Algorithm sections (`rebel.*`, `ppo.*`, ...) are not
checked: switching `--config.algorithm=grpo` on a REBEL config is meant to work.
"""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from rebel_diffusion.policies import POLICIES, policy_class
from rebel_diffusion.rewards import reward_options, rewards_taking
from rebel_diffusion.rewards.preference import preference_options

_MISSING = object()
# The `reward.*` keys the trainer itself reads: no reward factory is given them.
TRAINER_REWARD_KEYS = frozenset({"name", "aggregate"})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as `{"a.b": value}`."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def base_defaults() -> dict[str, Any] | None:
    """`configs/base.py`'s defaults, flattened; None when the repository's configs are not importable."""
    try:
        from configs.base import get_config
    except ImportError:
        return None
    return flatten(get_config().to_dict())


def policy_keys() -> dict[str, frozenset[str]]:
    """Each policy's keys, by `config.policy` name."""
    return {name: frozenset(policy_class(name).config_keys) for name in POLICIES}


def _is_set(flat: dict[str, Any], defaults: dict[str, Any], key: str) -> bool:
    value = flat.get(key, _MISSING)
    return value is not _MISSING and value != defaults.get(key, _MISSING)


def check_config_keys(config: ConfigDict, eval_rewards: list[str] = ()) -> None:
    """Raise `ValueError` (one line) for the first key set for a policy or reward that does not take it."""
    defaults = base_defaults()
    if defaults is None:
        return
    flat = flatten(config.to_dict())
    owners = policy_keys()
    mine = owners[config.policy]
    policy_owned = frozenset().union(*owners.values())
    for key in sorted(policy_owned - mine):
        if _is_set(flat, defaults, key):
            readers = sorted(name for name, keys in owners.items() if key in keys)
            raise ValueError(f"{key} does not apply to policy {config.policy!r} (only to {', '.join(readers)}); "
                             "remove it from the config")
    _check_preference_keys(flat, defaults)
    specs = [config.reward.name, *eval_rewards]
    taken = [reward_options(spec) for spec in specs]
    if any(options is None for options in taken):
        return  # a factory with **options takes any key
    taken_by_run = frozenset().union(*taken)
    for key in sorted(k for k in flat if k.startswith("reward.")):
        # A nested key belongs to the option of its section: reward.judge.model is the judge factory's `judge`.
        option = key.removeprefix("reward.").split(".")[0]
        if option in TRAINER_REWARD_KEYS or key in policy_owned or option in taken_by_run or not _is_set(flat, defaults, key):
            continue
        others = rewards_taking(option)
        hint = f" (an option of {', '.join(others)})" if others else ""
        names = " or ".join(repr(spec) for spec in dict.fromkeys(specs))
        raise ValueError(f"{key} is set, but reward {names} takes no such option{hint}; remove it from the config")


def _check_preference_keys(flat: dict[str, Any], defaults: dict[str, Any]) -> None:
    """`ValueError` (one line) for the first `preference.*` key set that the run's preference does not take."""
    name = flat.get("preference.name", "")
    taken = preference_options(name, flat.get("preference.reward", "")) if name else frozenset()
    if taken is None:
        return  # a factory with **options takes any key
    for key in sorted(k for k in flat if k.startswith("preference.")):
        option = key.removeprefix("preference.").split(".")[0]  # preference.judge.model: the factory's `judge`
        if option == "name" or option in taken or not _is_set(flat, defaults, key):
            continue
        what = f"preference {name!r} takes no such option" if name else "preference.name is empty (no preference)"
        raise ValueError(f"{key} is set, but {what}; remove it from the config")
