# The README's two commands: `make demo` and `make test`.  Each creates the virtual
# environment .venv on first use (or when pyproject.toml changes) and installs the
# project into it, editable, with the extras the demo and the tests need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test clean

$(INSTALLED): pyproject.toml .ci/constraints.txt
	@echo "setting up $(VENV) (first run only; a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint .ci/constraints.txt --editable '.[test]'
	touch $@

demo: $(INSTALLED)
	$(BIN)/mvn-core demo

test: $(INSTALLED)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) build *.egg-info mvn-core-demo.png
