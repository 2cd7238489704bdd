# `make demo` and `make test` set everything up themselves (a local .venv) and then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN    := outputs/demo/$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test lint clean

$(BIN)/netprobe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,sweep]'
	$(BIN)/python -c 'from netprobe import native; native.tensor_checks()'  # the slow build, now
	touch $@

setup: $(BIN)/netprobe

demo: setup
	$(BIN)/netprobe train hydra.run.dir=$(RUN)
	$(BIN)/netprobe plot $(RUN)

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check netprobe tests scripts
	$(BIN)/ruff format --check netprobe tests scripts

clean:
	rm -rf $(VENV) build dist *.egg-info
