"""The carry task (configs/carry_text_rebel.py) with the text quickstart's GRPO settings and budget."""

from ml_collections import ConfigDict

from configs.carry_text_rebel import carry_task
from configs.quickstart_text_grpo import get_config as quickstart_text_config


def get_config() -> ConfigDict:
    return carry_task(quickstart_text_config())
