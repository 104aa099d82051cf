"""Train an LCM with REBEL or PPO: `accelerate launch train.py --config configs/aesthetic_rebel.py` (or `python`)."""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "Training configuration file.", lock_config=True)


def main(argv: list[str]) -> int:
    try:
        flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    from rebel_diffusion.trainer import ConfigError, NonFiniteRewardError, train

    try:
        run_dir = train(_CONFIG.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteRewardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
