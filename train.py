"""Train an LCM with REBEL or PPO: `python -m rebel_diffusion.launch train.py --config configs/aesthetic_rebel.py` (or `python`)."""

from __future__ import annotations

import os
import re
import sys

from absl import flags
from ml_collections import ConfigDict, config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "Training configuration file.", lock_config=True)


def load_config(argv: list[str]) -> ConfigDict:
    """Parse `--config FILE --config.a.b=value ...`; any problem becomes one line in a `ValueError`."""
    try:
        flags.FLAGS(argv)
        config = _CONFIG.value
        config.algorithm  # noqa: B018 -- the config file is loaded lazily; surface its errors here
    except flags.Error as e:
        raise ValueError(str(e).strip().splitlines()[0]) from None
    except (AttributeError, KeyError) as e:
        text = str(e).replace("\\", "")
        key = re.search(r"'([A-Za-z_]\w*)'", text)
        key = key.group(1) if key else text
        override = next((a for a in argv if a.startswith("--config.") and key in a.split("=")[0].split(".")), key)
        hint = re.search(r'Did you mean "([\w.]+)"', text)
        hint = f' (did you mean "{hint.group(1)}"?)' if hint else ""
        raise ValueError(f"unknown config key {key!r} in {override}{hint}") from None
    except OSError as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        raise ValueError(f"cannot load the --config file: {detail}") from None
    return config


def warn_if_launched_alone() -> None:
    """accelerate launch's single-process launcher (`--num_processes 2` without `--multi_gpu`, as on a CPU) sets the
    address of a rendezvous but starts one process, which would train alone: say so in one line."""
    env = os.environ
    if "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env:
        print("warning: accelerate launch was asked for several processes but started only this one (it needs "
              "--multi_gpu for that, also on a CPU); python -m rebel_diffusion.launch starts them all", file=sys.stderr)


def main(argv: list[str]) -> int:
    warn_if_launched_alone()
    try:
        config = load_config(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from rebel_diffusion.trainer import CheckpointError, ConfigError, NonFiniteError, RewardError, train

    try:
        train(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, NonFiniteError, RewardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
