"""Preference REBEL on the image quickstart (configs/quickstart_rebel.py) at its budget: 12 prompts per epoch, three
samples each, and a judge asked twice which image is better, `bradley_terry` on `large_shape` at temperature 0.05
(two samples of a prompt differ by ~0.05-0.2 in large_shape: P(a beats b) of 0.7-0.98). Two comparisons per prompt are
its 2 reward queries (24 per epoch, as REBEL); it trains on 12 pairs in 3 optimizer steps."""

from ml_collections import ConfigDict

from configs.quickstart_rebel import get_config as rebel_config


def get_config() -> ConfigDict:
    config = rebel_config()
    config.algorithm = "rebel_preference"
    config.preference.name = "bradley_terry"
    config.preference.reward = "large_shape"
    config.preference.temperature = 0.05
    return config
