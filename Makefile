# Set-up on a fresh machine: `make demo` then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU wheel keeps installs small and deterministic; any torch >= 2.4 works (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test lint demo bench clean

$(BIN)/vggtctl: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

install: $(BIN)/vggtctl

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: install
	$(BIN)/ruff check vggtctl tests bench
	$(BIN)/ruff format --check vggtctl tests bench

demo: install
	$(BIN)/vggtctl demo demo-data

bench: install
	$(BIN)/python bench/scan.py --files 200000
	$(BIN)/python bench/staging.py

clean:
	rm -rf $(VENV) demo-data .benchout
