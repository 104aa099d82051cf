"""The best trial of sweep 'text_rebel': trial 4, IQM of eval_addition_exact 0.7275 over 1 seeds x the last 1 epochs."""

import importlib.util


def get_config():
    spec = importlib.util.spec_from_file_location('sweep_base_config', 'configs/carry_text_rebel.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.log_with = ''
    config.grid.num_prompts = 0
    config.eval.prompt_file = 'docs/figure3/text/validation_prompts.txt'
    config.eval.every = 30
    config.eval.num_seeds = 2
    config.train.learning_rate = 0.020039219186721018
    config.train.batch_size = 256
    config.rebel.eta = 0.38608546014376294
    return config
