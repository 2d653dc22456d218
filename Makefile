# Two commands for a new user: `make demo` and `make test`. Each sets up what it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test tools viewer lesion-check clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# `dicom-heatmap view` serves OpenSeadragon (npm, pinned; pipelines/viewer/server.py names
# the same version) from the environment's share/ folder
OSD_VERSION := 6.1.1
OSD         := $(VENV)/share/dicom-heatmap/node_modules/openseadragon/build/openseadragon/openseadragon.min.js

$(OSD): | $(STAMP)
	@command -v npm >/dev/null || { echo "npm is needed for the viewer: apt-get install npm" >&2; exit 1; }
	npm install --silent --no-audit --no-fund --prefix $(VENV)/share/dicom-heatmap openseadragon@$(OSD_VERSION)
	@test -f $@

viewer: $(OSD)

# the tests also show the SEG over a slide in the IDC's slide viewer library, served by Orthanc
DMV_VERSION := 0.48.24
DMV         := $(VENV)/share/dicom-heatmap-test/node_modules/dicom-microscopy-viewer/dist/dicomMicroscopyViewer.bundle.min.js

$(DMV): | $(STAMP)
	npm install --silent --no-audit --no-fund --prefix $(VENV)/share/dicom-heatmap-test \
	    dicom-microscopy-viewer@$(DMV_VERSION) dicomweb-client@0.11.3
	@test -f $@

# dciodvfy (dicom3tools) validates every DICOM output in the tests; Orthanc with its
# DICOMweb and GDCM plugins is the real PACS the PACS tests run against (started on loopback
# by pytest); Chromium (headless) loads the viewer page; npm installs OpenSeadragon
APT_PACKAGES := $(if $(shell command -v dciodvfy),,dicom3tools) \
                $(if $(wildcard /usr/sbin/Orthanc),,orthanc) \
                $(if $(wildcard /usr/share/orthanc/plugins/libOrthancDicomWeb.so),,orthanc-dicomweb) \
                $(if $(wildcard /usr/share/orthanc/plugins/libOrthancGdcm.so),,orthanc-gdcm) \
                $(if $(shell command -v chromium),,chromium) \
                $(if $(shell command -v npm),,npm)
tools:
	@if [ -n "$(strip $(APT_PACKAGES))" ]; then \
	  $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(APT_PACKAGES); fi

demo: $(STAMP)
	@$(MAKE) --no-print-directory viewer || echo "(the viewer's library was not installed: see above; the demo runs without it)"
	$(BIN)/dicom-heatmap demo --out demo-output

test: $(STAMP) tools
	$(MAKE) --no-print-directory viewer $(DMV)
	$(BIN)/python -m pytest -q

# the radiology training end to end on labelled series the project makes (about 11 minutes
# on 2 cores): the README's "Train on your own CT or MR" table comes from it
lesion-check: $(STAMP)
	$(BIN)/python -m pipelines.evaluation.lesion_check --out runs/lesion-check

clean:
	rm -rf $(VENV) demo-output .pytest_cache
