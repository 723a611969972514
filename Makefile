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
	# the web UI test drives Debian's chromium through Playwright (which never downloads a browser here)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; } } || \
		echo "note: chromium is not installed (apt-get install chromium); the browser test will be skipped"

test:
	$(PY) -m pytest tests

demo:
	$(VENV)/bin/llava chat --image examples/images/shapes.png --prompt "What shapes can you see in the image?"

clean:
	rm -rf $(VENV) out .pytest_cache
