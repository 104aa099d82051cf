# Commands for a new user; each sets up .venv on first use (pip install -e ".[test]").
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
TESTS ?= tests
LAUNCH := $(VENV)/bin/python -m rebel_diffusion.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

.PHONY: quickstart quickstart-ppo quickstart-rloo quickstart-grpo quickstart-online-dpo quickstart-text figure3 test test-slow

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

## REBEL on the tiny LCM shipped in assets/tiny-lcm, shape_fidelity reward, on the CPU (a few minutes on 2 cores)
quickstart: $(STAMP)
	$(LAUNCH) train.py --config configs/quickstart_rebel.py

## The same budget with the other algorithms
quickstart-ppo: $(STAMP)
	$(LAUNCH) train.py --config configs/quickstart_ppo.py
quickstart-rloo: $(STAMP)
	$(LAUNCH) train.py --config configs/quickstart_rloo.py
quickstart-grpo: $(STAMP)
	$(LAUNCH) train.py --config configs/quickstart_grpo.py
quickstart-online-dpo: $(STAMP)
	$(LAUNCH) train.py --config configs/quickstart_online_dpo.py

## REBEL on the tiny addition language model shipped in assets/tiny-lm, on the CPU
quickstart-text: $(STAMP)
	$(LAUNCH) train.py --config configs/quickstart_text_rebel.py

## The five-way comparison over seeds (CPU-scale Figure 3): runs/figure3 and docs/figure3
figure3: $(STAMP)
	$(VENV)/bin/python scripts/figure3.py --seeds 10 --jobs 2 --logdir runs/figure3 --out docs/figure3

## The test suite without the slow end-to-end runs
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(TESTS)

## Only the slow end-to-end tests: the quickstart runs and the real-size ViT-L-14 check
test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow $(TESTS)
