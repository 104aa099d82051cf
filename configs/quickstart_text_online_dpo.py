"""Online DPO on the tiny addition language model, with exactly the REBEL text quickstart's budget per epoch: two
samples per prompt (256 reward queries) and 4 optimizer steps of 32 pairs."""

from ml_collections import ConfigDict

from configs.quickstart_text_rebel import get_config as rebel_config


def get_config() -> ConfigDict:
    config = rebel_config()
    config.algorithm = "online_dpo"
    return config
