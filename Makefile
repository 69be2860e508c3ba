# The two quickstart commands, on a fresh machine with only Python 3 and the package registries:
#   make demo   the offline demo on the synthetic world (README)
#   make test   the test-suite (what CI runs)
#   make app    the web app on http://127.0.0.1:7860 (docs/app.md)
# Both create and then reuse a local virtualenv with the pinned, tested versions (constraints.txt).

PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/python -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed

.PHONY: demo test app lint clean-venv

demo: $(STAMP)
	$(VENV)/bin/python -m customcontrast_world.demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

app: $(STAMP)
	$(VENV)/bin/python -m customcontrast_world.app

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# torch stays pinned (constraints.txt) to the build the suite is tested with; controlnet_aux goes in without its
# dependencies (they would pull torchvision and a CUDA torch): its Canny detector needs only opencv, numpy and PIL.
# The library with every extra, and the synthetic world's package beside it (world/: the demo, the app, the assets).
$(STAMP): pyproject.toml world/pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e ".[test]" -e "./world[app]"
	$(PIP) install -c constraints.txt --no-deps controlnet_aux==0.0.10
	touch $@

clean-venv:
	rm -rf $(VENV)
