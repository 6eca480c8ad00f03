# The README's two commands: `make demo` and `make test`. Each bootstraps .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch comes from the machine's local wheels; pin it so pip never reaches for a newer CUDA build.
TORCH  ?= torch==2.14.1 torchvision==0.29.1
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: setup test demo data lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]" $(TORCH)
	touch $(STAMP)

# two pytest-xdist workers: most tests run one thread, so 2 cores cut the suite's wall time by a third
test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q -n 2 tests

demo: $(STAMP)
	$(PY) -m unclip.demo

data: $(STAMP)
	$(PY) -m unclip.data.shapes

# ruff, then the import layers of pyproject.toml's [tool.importlinter] (this tree's code, not
# whichever checkout the venv was installed from)
lint: $(STAMP)
	$(VENV)/bin/ruff check unclip tests bench train.py sample.py
	$(VENV)/bin/ruff format --check unclip tests bench train.py sample.py
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix unclip tests bench train.py sample.py
	$(VENV)/bin/ruff format unclip tests bench train.py sample.py

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]" $(TORCH)
	$(PY) bench/prior_bench.py
	$(PY) bench/unet_bench.py
	$(PY) bench/optimizer_bench.py
	$(PY) bench/embedding_reader_bench.py

clean:
	rm -rf $(VENV) runs outputs multirun
