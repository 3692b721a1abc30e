# The two commands of README.md: `make reproduce` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= shapes
ONLY ?=
KERNEL := pseudo-ris
PYTEST_ARGS ?=

.PHONY: install kernel reproduce test lint clean-output

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Re-install when the dependency list changes.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (pseudo-ris)"
	touch $@

install: $(VENV)/.installed

kernel: install
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (pseudo-ris)"

reproduce: install
	$(PY) -m ris_utils.runs --profile $(PROFILE) $(if $(ONLY),--only $(ONLY),)

lint: install
	$(PY) -m ruff check ris_utils tests benchmarks

test: install lint
	CUDA_VISIBLE_DEVICES="" $(PY) -m pytest -q $(PYTEST_ARGS)

clean-output:
	rm -rf papermill_runs/output/$(PROFILE)
