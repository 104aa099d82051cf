"""Preference REBEL on the carry task (configs/carry_text_rebel.py): three answers per prompt, and a judge that only
says which of two answers is right, `bradley_terry` on `addition_exact` at temperature 0.25 (P(right beats wrong) =
0.98). Two comparisons per prompt are its 2 reward queries, so 512 prompts per epoch spend REBEL's 1024; it trains on
512 pairs in 4 optimizer steps, as REBEL does, and samples 1.5 times as many answers."""

from ml_collections import ConfigDict

from configs.carry_text_rebel import get_config as carry_config


def get_config() -> ConfigDict:
    config = carry_config()
    config.algorithm = "rebel_preference"
    config.preference.name = "bradley_terry"
    config.preference.reward = "addition_exact"
    config.preference.temperature = 0.25
    return config
