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

# dciodvfy (dicom3tools) validates every DICOM output in the tests; Orthanc with its
# DICOMweb plugin is the real PACS the PACS tests run against (started on loopback by pytest)
APT_PACKAGES := $(if $(shell command -v dciodvfy),,dicom3tools) \
                $(if $(wildcard /usr/sbin/Orthanc),,orthanc) \
                $(if $(wildcard /usr/share/orthanc/plugins/libOrthancDicomWeb.so),,orthanc-dicomweb)
tools:
	@if [ -n "$(strip $(APT_PACKAGES))" ]; then \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES); fi

demo: $(STAMP)
	$(BIN)/dicom-heatmap demo --out demo-output

test: $(STAMP) tools
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo-output .pytest_cache
