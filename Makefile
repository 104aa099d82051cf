# Commands for a new user; each sets up .venv on first use (pip install -e ".[test]"; CPU-only: add TORCH=cpu).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
TESTS ?= tests
LAUNCH := $(VENV)/bin/python -m rebel_diffusion.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

.PHONY: quickstart quickstart-flow quickstart-ppo quickstart-rloo quickstart-grpo quickstart-online-dpo quickstart-text figure3 demo-offline-mu demo-preference test test-slow

# TORCH=cpu (opt-in: `make quickstart TORCH=cpu`) installs torch and torchvision from PyTorch's CPU wheel index before
# the package, so that a CPU-only machine skips the ~6 GB of CUDA wheels the default index's torch pulls in; any other
# tag of that index works the same (TORCH=cu121). The default (TORCH empty) is the plain install that CI runs. Not
# exercised by CI or the tests: their machines reach only the default package registry. It takes effect when .venv is
# (re)created: `rm -rf .venv` first if it exists.
TORCH ?=
TORCH_INDEX := https://download.pytorch.org/whl/$(TORCH)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(VENV)/bin/pip install -q torch torchvision --index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

## REBEL on the tiny LCM shipped in assets/tiny-lcm, large_shape reward, on the CPU (a few minutes on 2 cores)
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

## REBEL with Flow-GRPO's SDE on the tiny SD3-style flow model shipped in assets/tiny-flow, on the CPU
quickstart-flow: $(STAMP)
	$(LAUNCH) train.py --config configs/quickstart_flow_rebel.py

## REBEL on the tiny addition language model shipped in assets/tiny-lm, on the CPU
quickstart-text: $(STAMP)
	$(LAUNCH) train.py --config configs/quickstart_text_rebel.py

## Figure 3 on the CPU: every algorithm tuned with the same sweep budget, then 10 fresh seeds each, on the carry text
## task and the image quickstart task: runs/figure3 and docs/figure3
figure3: $(STAMP)
	$(VENV)/bin/python scripts/figure3.py --task text --trials 6 --seeds 10 --jobs 2 --logdir runs/figure3 --out docs/figure3
	$(VENV)/bin/python scripts/figure3.py --task image --trials 4 --seeds 10 --jobs 2 --algorithms rebel ppo rloo grpo \
		online_dpo --logdir runs/figure3 --out docs/figure3

## REBEL's offline mu (the right sums as y') against mu = pi_t on the text quickstart, 5 seeds each: docs/offline_mu
demo-offline-mu: $(STAMP)
	$(VENV)/bin/python scripts/offline_mu_demo.py --seeds 5 --jobs 2 --logdir runs/offline_mu --out docs/offline_mu

## Preference REBEL with a pairwise shape judge against REBEL on the scalar reward, image quickstart, 5 seeds each
demo-preference: $(STAMP)
	$(VENV)/bin/python scripts/preference_demo.py --seeds 5 --jobs 2 --logdir runs/preference --out docs/preference

## The test suite without the slow end-to-end runs
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(TESTS)

## Only the slow end-to-end tests: the quickstart runs and the real-size ViT-L-14 check
test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow $(TESTS)
