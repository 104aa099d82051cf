"""Compare learning curves across algorithms and seeds (IQM, stratified bootstrap CIs).

Example:
    python scripts/compare_curves.py rebel='runs/seeds/rebel_seed*' ppo='runs/seeds/ppo_seed*' \\
        --metric reward_mean --x reward_queries --out results/
    python scripts/compare_curves.py rebel='runs/rebel_*' ppo='runs/ppo_*' --metric eval_shape_accuracy --out results/

scripts/seeds.py names its runs <logdir>/<algorithm>_seed<N>; a quickstart names its run <algorithm>_<timestamp>
(unless run_name is set). An eval_* metric is read from each run's eval.jsonl.

See rebel_diffusion/compare.py for the statistics and output formats.
"""

import sys

from rebel_diffusion.compare import main

if __name__ == "__main__":
    sys.exit(main())
