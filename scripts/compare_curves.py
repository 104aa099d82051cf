"""Compare learning curves across algorithms and seeds (IQM, stratified bootstrap CIs).

Example:
    python scripts/compare_curves.py rebel='runs/rebel_seed*' ppo='runs/ppo_seed*' \\
        --metric reward_mean --x reward_queries --out results/

See rebel_diffusion/compare.py for the statistics and output formats.
"""

import sys

from rebel_diffusion.compare import main

if __name__ == "__main__":
    sys.exit(main())
