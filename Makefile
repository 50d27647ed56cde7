# Two entry points: `make demo` and `make test`. Both create .venv when missing and install the pinned CPU stack.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv test demo lint bench lock clean-venv

$(STAMP): requirements/cpu-lock.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first: the CPU wheel, so nothing later pulls the CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The lock is a complete resolved set: --no-deps keeps pip from adding CUDA torchvision/torchaudio.
	$(PY) -m pip install -q --no-deps -r requirements/cpu-lock.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(PY) -m ruff check megatron_dispo tests benchmarks tools examples
	$(PY) tools/run_tests.py $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/megatron-dispo demo

lint: venv
	$(PY) -m ruff check megatron_dispo tests benchmarks tools examples
	$(PY) -m ruff format --check megatron_dispo tests benchmarks tools examples

bench: venv
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lock: venv
	$(PY) -m pip freeze --exclude-editable | grep -v -E '^torch==' > requirements/cpu-lock.txt.new
	mv requirements/cpu-lock.txt.new requirements/cpu-lock.txt

clean-venv:
	rm -rf $(VENV)
