"""The best trial of sweep 'image_rloo': trial 1, IQM of eval_large_shape 0.838452 over 1 seeds x the last 1 epochs."""

import importlib.util


def get_config():
    spec = importlib.util.spec_from_file_location('sweep_base_config', 'configs/quickstart_rloo.py')
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
    config.train.learning_rate = 0.0015891579824072668
    config.train.batch_size = 1
    config.rloo.clip_range = 0.10944032438958623
    return config
