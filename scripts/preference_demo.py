"""Preference REBEL with a pairwise shape judge against REBEL on the scalar reward, on the tiny LCM (image quickstart).

    python scripts/preference_demo.py --seeds 5 --jobs 2 --logdir runs/preference --out docs/preference

Both arms are the image quickstart (configs/quickstart_rebel.py) at the same budget of reward queries: 12 prompts per
epoch, each worth two queries. REBEL scores y and y' with `large_shape`. Preference REBEL draws a third sample y''
and asks a judge twice which image is better: P(y beats y'') and P(y' beats y''). The judge is `bradley_terry` on
`large_shape`, P(a beats b) = sigmoid((r_a - r_b) / temperature). It sees only the comparison, never a score. It also
samples 1.5 times as many images. The arms are compared on the held-out prompts' `large_shape`: in self-play the
preference arm's training reward is the mean l, near 0 by symmetry. Runs that already finished are reused. Writes
`compare.md` (held-out before and after, 95% t-intervals over seeds) and `curves.png`, `curves.csv`, `final.csv`
(IQM per reward query with stratified bootstrap intervals, `rebel_diffusion.compare`) to `--out`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from seeds import compare_arms  # noqa: E402


METRIC = "eval_large_shape"
TEMPERATURE = 0.05  # large_shape differences between two samples of a prompt are ~0.05-0.2: P(a beats b) of 0.7-0.98
ARMS = {
    "rebel": [],
    "rebel_preference": ["--config.algorithm=rebel_preference", "--config.preference.name=bradley_terry",
                         "--config.preference.reward=large_shape", f"--config.preference.temperature={TEMPERATURE}"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    parser.add_argument("--logdir", type=Path, default=Path("runs/preference"))
    parser.add_argument("--out", type=Path, default=Path("docs/preference"))
    args = parser.parse_args(argv)
    return compare_arms("configs/quickstart_rebel.py", ARMS, args.seeds, args.jobs, args.logdir.resolve(), args.out,
                        METRIC, "algorithm")


if __name__ == "__main__":
    sys.exit(main())
