"""REBEL with an offline mu on the tiny addition LM: y' from the right sums (offline data) against y' from pi_t.

    python scripts/offline_mu_demo.py --seeds 5 --jobs 2 --logdir runs/offline_mu --out docs/offline_mu

Both arms are the text quickstart (configs/quickstart_text_rebel.py) at the same budget: the same prompts, pairs,
reward queries and optimizer steps per epoch; only where y' comes from differs (`rebel.mu`). The offline data is the
right answer to every training prompt, written to `--logdir/sums.jsonl`. They are compared on the held-out sums (the
training reward of the offline arm counts the data's own rewards). Runs that already finished are reused. Writes
`compare.md` (the held-out success rate before and after each arm, 95% t-intervals over seeds), and `curves.png`,
`curves.csv` and `final.csv` of the held-out success rate per reward query (IQM with stratified bootstrap intervals,
`rebel_diffusion.compare`), to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from seeds import compare_arms  # noqa: E402

METRIC = "eval_addition_exact"


def write_sums(path: Path) -> None:
    """The right answer to every training prompt of the text quickstart, as offline `prompt`/`response` records."""
    from configs.quickstart_text_rebel import get_config
    from rebel_diffusion.prompts import read_prompt_source
    from rebel_diffusion.rewards.text import addition_target

    prompts = read_prompt_source(REPO / get_config().prompt_file)
    path.write_text("".join(json.dumps({"prompt": p, "response": str(addition_target(p))}) + "\n" for p in prompts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each on one thread)")
    parser.add_argument("--logdir", type=Path, default=Path("runs/offline_mu"))
    parser.add_argument("--out", type=Path, default=Path("docs/offline_mu"))
    args = parser.parse_args(argv)
    logdir = args.logdir.resolve()
    logdir.mkdir(parents=True, exist_ok=True)
    sums = logdir / "sums.jsonl"
    write_sums(sums)
    arms = {"policy": [], "offline": ["--config.rebel.mu=offline", f"--config.rebel.offline_data={sums}"]}
    return compare_arms("configs/quickstart_text_rebel.py", arms, args.seeds, args.jobs, logdir, args.out, METRIC,
                        "rebel.mu")


if __name__ == "__main__":
    sys.exit(main())
