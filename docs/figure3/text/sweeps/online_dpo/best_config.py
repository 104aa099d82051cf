"""The best trial of sweep 'text_online_dpo': trial 0, IQM of eval_addition_exact 0.7525 over 1 seeds x the last 1 epochs."""

import importlib.util


def get_config():
    spec = importlib.util.spec_from_file_location('sweep_base_config', 'configs/carry_text_online_dpo.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.log_with = ''
    config.grid.num_prompts = 0
    config.eval.prompt_file = 'docs/figure3/text/validation_prompts.txt'
    config.eval.every = 30
    config.eval.num_seeds = 2
    config.train.learning_rate = 0.0210891839987098
    config.train.batch_size = 128
    config.dpo.beta = 2.3909307914245828
    return config
