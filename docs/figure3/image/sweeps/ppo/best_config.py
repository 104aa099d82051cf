"""The best trial of sweep 'image_ppo': trial 7, IQM of eval_large_shape 0.813355 over 1 seeds x the last 1 epochs."""

import importlib.util


def get_config():
    spec = importlib.util.spec_from_file_location('sweep_base_config', 'configs/quickstart_ppo.py')
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
    config.train.learning_rate = 0.0004966646653261978
    config.train.batch_size = 8
    config.ppo.clip_range = 0.0037813786278424284
    return config
