# The README's two commands, `make demo` and `make test`, and `make docs` (the site).  Each
# creates the virtual environment .venv on first use (or when pyproject.toml changes) and
# installs the project into it, editable, with the extras the demo and the tests need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo test docs clean

$(INSTALLED): pyproject.toml .ci/constraints.txt
	@echo "setting up $(VENV) (first run only; a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --constraint .ci/constraints.txt --editable '.[test]'
	touch $@

demo: $(INSTALLED)
	$(BIN)/mvn-core demo

# Every core runs tests, one test file per worker, so that a module's fixtures (a
# distributed launch, a Keras process) are made once.
test: $(INSTALLED)
	$(BIN)/pytest -n auto --dist loadfile

# The documentation site, built strictly (a broken link, a page missing from the nav or
# an API object that cannot be resolved fails) into build/site.  mkdocstrings imports
# the package from a regular install of this checkout in build/docs-package: the rules'
# functions and the adapters' classes are generated at import, and the editable install
# maps folders into the package in a way griffe does not follow.
docs: $(INSTALLED)
	rm -rf build/docs-package
	$(BIN)/python -m pip install --quiet --no-deps --target build/docs-package .
	MVN_CORE_DOCS_PACKAGE=build/docs-package NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

clean:
	rm -rf $(VENV) build *.egg-info mvn-core-demo.png
