# The README's two commands: `make train` and `make test`. Both create .venv and install the project first.
# TORCH: the torch requirement installed before the project. On a machine without a GPU the default takes the
# CPU build (2.13.0 is a local CPU wheel on our machines); on a GPU machine use e.g. `make TORCH=torch test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# PYTHONSAFEPATH: `python -m` would put the repo root on sys.path, where kernels/ (installed as lamelm_fast.kernels)
# would shadow the unrelated `kernels` package that transformers and bitsandbytes probe for.
RUN := PYTHONSAFEPATH=1 $(PY)

.PHONY: train test lint install clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)" "setuptools>=69" wheel
	# No build isolation: setup.py imports the torch installed above to build the CUDA extension where CUDA exists.
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The demo starts afresh each time: the previous `make train`'s checkpoints in output/ are replaced.
train: $(STAMP)
	$(RUN) -m lamelm_fast.train --overwrite-output-dir $(ARGS)

test: $(STAMP)
	$(RUN) -m pytest -q -m "not gpu" $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) output build *.egg-info
