"""Online DPO (the REBEL paper's Algorithm 2) on the tiny LCM, on the CPU, with the REBEL quickstart's budget: 12 pairs
= 24 reward queries and 3 optimizer steps per epoch."""

from ml_collections import ConfigDict

from configs.quickstart_rebel import get_config as rebel_config


def get_config() -> ConfigDict:
    config = rebel_config()
    config.algorithm = "online_dpo"
    config.dpo.beta = 1.0
    return config
