# fasttrain: `make demo` and `make test` set up .venv first when it is missing or stale.
PY      := .venv/bin/python
STAMP   := .venv/.fasttrain-setup
APT_PKGS := pkg-config libturbojpeg0-dev libopencv-dev
PYTEST_ARGS ?=

.PHONY: setup demo test test-all clean-venv

# The venv is stale when setup.py (the dependency list) is newer than the stamp.
$(STAMP): setup.py scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m fasttrain.cli demo

# Fast suite (default); slow tests with `make test-all` or PYTEST_ARGS="-m slow".
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" tests

clean-venv:
	rm -rf .venv
