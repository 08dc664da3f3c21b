# Two commands do everything on a fresh machine:
#   make run   - set up .venv and run the demo on the bundled pretrained model
#   make test  - set up .venv and run lint + the test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | md5sum | cut -c1-12)
OUT ?= out

.PHONY: venv run test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q --upgrade pip
	# torch and torchvision pinned first: an unpinned resolve pulls a multi-GB build.
	$(BIN)/python -m pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

run: venv
	@mkdir -p $(OUT)
	$(BIN)/python -m ierf.cli demo-image coffee -o $(OUT)/coffee.png
	$(BIN)/ierf explain $(OUT)/coffee.png -o $(OUT)/coffee_srd.png
	@echo "SRD overlay written to $(OUT)/coffee_srd.png"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python benchmarks/srd_speed.py

clean:
	rm -rf $(VENV) $(OUT)
