# Two commands for a new user; each sets up .venv on first use (pip install -e ".[test]").
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
TESTS ?= tests

.PHONY: quickstart quickstart-ppo test test-slow

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $(STAMP)

## REBEL on the tiny model shipped in assets/tiny-lcm, on the CPU (about 3 minutes on 2 cores)
quickstart: $(STAMP)
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		train.py --config configs/quickstart_rebel.py

quickstart-ppo: $(STAMP)
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		train.py --config configs/quickstart_ppo.py

## The test suite without the slow end-to-end runs (about 4 minutes on 2 cores)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(TESTS)

## Only the slow end-to-end tests: the two quickstart runs and the real-size ViT-L-14 check
test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow $(TESTS)
