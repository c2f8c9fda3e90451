# Two commands for a newcomer: `make demo` (the pipeline end to end on the bundled sample)
# and `make test` (the test suite). Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)
export AWS_EC2_METADATA_DISABLED := true

.PHONY: install system-packages demo test ui clean bench-download bench-embeddings

$(BIN)/laion-assets: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/laion-assets

# chromium, PostgreSQL, Redis, nginx (the tests start them on 127.0.0.1) and iproute2 (apt, when missing)
system-packages:
	bash scripts/system-packages.sh

demo: install
	$(BIN)/laion-assets demo

test: install system-packages
	$(BIN)/python -m pytest laion_assets_tests

ui: install
	LAION_ASSETS_CONFIG=configs/demo.yaml LAION_ASSETS_INPUT=data/demo/input $(BIN)/dagster dev -w workspace.yaml

clean:
	rm -rf data
