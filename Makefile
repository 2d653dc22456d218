# Two commands for a new user: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test tools clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# dciodvfy (dicom3tools) validates every DICOM output in the tests
tools:
	@command -v dciodvfy >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dicom3tools; }

demo: $(STAMP)
	$(BIN)/dicom-heatmap demo --out demo-output

test: $(STAMP) tools
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-output .pytest_cache
