# Two commands for a newcomer: `make demo` (the pipeline end to end on the bundled sample)
# and `make test` (the test suite). Both create .venv and install what they need.
# PORT= is the port of the server a target starts: `make ui PORT=3001`, `make demo PORT=8766`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)
export AWS_EC2_METADATA_DISABLED := true
# dg and the UI on the demo lake: its config and input folder (the lake is data/lake)
DEMO_ENV := VIRTUAL_ENV=$(CURDIR)/$(VENV) PATH=$(CURDIR)/$(BIN):$$PATH \
	LAION_ASSETS_CONFIG=configs/demo.yaml LAION_ASSETS_INPUT=data/demo/input

.PHONY: install system-packages demo test ui sample-server check-defs launch clean

# clip-retrieval goes in with --no-deps: the interop test loads only its clip_client.py (which
# needs requests) by path; the package itself pins numpy<2 and open_clip 2.
$(BIN)/laion-assets: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps clip-retrieval==2.45.0
	touch $@

install: $(BIN)/laion-assets

# chromium, PostgreSQL, Redis, nginx (the tests start them on 127.0.0.1) and iproute2 (apt, when missing)
system-packages:
	bash scripts/system-packages.sh

demo: PORT ?= 8765
demo: install
	$(BIN)/laion-assets demo --port $(PORT)

test: install system-packages
	$(BIN)/python -m pytest laion_assets_tests

# the Dagster UI on the demo lake (make demo first), through Dagster's own CLI
ui: PORT ?= 3000
ui: install
	$(DEMO_ENV) dg dev --host 127.0.0.1 --port $(PORT)

# the demo's images again, so the UI can materialize the demo shard
sample-server: PORT ?= 8765
sample-server: install
	$(BIN)/laion-assets sample-server --port $(PORT)

# the definitions load (dg check defs) and list (dg list defs) as the UI sees them
check-defs: install
	$(DEMO_ENV) dg check defs
	$(DEMO_ENV) dg list defs --json > /dev/null

# materialize assets of one shard of the demo lake through dg, e.g.
# make launch ASSETS=images,language PARTITION=demo-00000
launch: install
	$(DEMO_ENV) dg launch --assets $(ASSETS) --partition $(PARTITION)

clean:
	rm -rf data
