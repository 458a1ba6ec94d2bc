# Everything a fresh machine needs: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch from this machine's disk (pip caps it at 2.14.1 here); any torch >= 2.4 works elsewhere.
TORCH  ?= 'torch>=2.4,<=2.14.1' 'torchvision>=0.19,<=0.29.1'

.PHONY: install demo plan test quick clean

$(BIN)/cadence: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/cadence

demo: install
	$(BIN)/cadence train recipes/demo.yaml

plan: install
	$(BIN)/cadence plan recipes/imagenet-resnet50-progressive.yaml --plot plan.png --csv plan.csv

# a test worker a core, at most 4 (pytest-xdist), each taking the next test when it is free
test: install
	$(BIN)/python -m pytest -n auto --maxprocesses=4 --dist worksteal --durations=15

quick: install
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache build src/*.egg-info
