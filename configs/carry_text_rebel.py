"""REBEL on the carry task, Figure 3's text task: the tiny addition model in assets/tiny-lm-carry learned from data that
drops three of every four carries out of the units column ("17+25=32"), so it is most likely wrong wherever the units
carry, at every temperature (`scripts/pretrain_tiny_lm.py --carry-drop 0.75`). The verifier (`addition_exact`) wants
the right sum: RL has to move probability mass onto an answer the model ranks second, not only sharpen it.

The text quickstart's budget and geometry (1024 reward queries and 4 optimizer steps per epoch, 30 epochs), sampled at
temperature 1.0. With the trainer's held-out evaluation (100 sums x 4 seeds) the base model peaks at 0.585, at
temperature 0.55, and gets 0.512 at 1.0 (docs/figure3/text/base_temperatures.md); on its 44 held-out carry sums it is
right at most 14.5% of the time at any temperature from 0.1 to 1.3 (pretrain_tiny_lm.py's own 5-seed check). The other
algorithms' configs are carry_text_<algorithm>.py.
"""

from ml_collections import ConfigDict

from configs.quickstart_text_rebel import get_config as quickstart_text_config

CARRY_MODEL = "assets/tiny-lm-carry"


def carry_task(config: ConfigDict) -> ConfigDict:
    """A text quickstart config moved to the carry task: the carry model, sampled at temperature 1.0."""
    config.model.pretrained = CARRY_MODEL
    config.model.temperature = 1.0
    return config


def get_config() -> ConfigDict:
    return carry_task(quickstart_text_config())
