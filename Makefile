# Two commands do all set-up: `make train` (the main job) and `make test` (the test suite).
# Both first create/refresh the project-local virtualenv in .venv (scripts/setup.sh).
PY := .venv/bin/python

.PHONY: setup train test test-slow
setup:
	bash scripts/setup.sh

train: setup
	.venv/bin/rlpost train configs/grpo_math.yaml

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow
