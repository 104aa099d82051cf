"""The best trial of sweep 'text_grpo': trial 5, IQM of eval_addition_exact 0.6775 over 1 seeds x the last 1 epochs."""

import importlib.util


def get_config():
    spec = importlib.util.spec_from_file_location('sweep_base_config', 'configs/carry_text_grpo.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.log_with = ''
    config.grid.num_prompts = 0
    config.eval.prompt_file = 'docs/figure3/text/validation_prompts.txt'
    config.eval.every = 30
    config.eval.num_seeds = 2
    config.train.learning_rate = 0.027412223681500883
    config.train.batch_size = 64
    config.grpo.clip_range = 0.12346462622779665
    return config
