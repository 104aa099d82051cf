"""The best trial of sweep 'image_grpo': trial 2, IQM of eval_large_shape 0.821518 over 1 seeds x the last 1 epochs."""

import importlib.util


def get_config():
    spec = importlib.util.spec_from_file_location('sweep_base_config', 'configs/quickstart_grpo.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.log_with = ''
    config.grid.num_prompts = 0
    config.num_epochs = 16
    config.save_freq = 16
    config.eval.prompt_file = 'assets/quickstart_prompts.txt'
    config.eval.every = 16
    config.eval.num_seeds = 4
    config.eval.rewards = 'large_shape'
    config.train.learning_rate = 0.0014890571351562352
    config.train.batch_size = 1
    config.grpo.clip_range = 0.02051226246674708
    return config
