# Setup, tests and the demo. `make install` is all a fresh clone needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install test demo clean

install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: on a CPU-only machine this takes the local CPU wheel instead of
	# resolving a fresh torch with gigabytes of CUDA packages.
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e ".[test]"

test:
	$(PY) -m pytest tests

demo:
	$(VENV)/bin/llava chat --image examples/images/shapes.png --prompt "What shapes can you see in the image?"

clean:
	rm -rf $(VENV) out .pytest_cache
